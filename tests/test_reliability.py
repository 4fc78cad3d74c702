"""Reliability: failure injection, symmetric bad input, invalid knobs, a short CLI/knob fuzz pass.

Failure injection runs real jobs the way a launcher would: R processes with torchrun's variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and EP_RUNTIME_TIMEOUT_S, each calling
ep.init_distributed() and running EPMoE forwards. Mid-forward (inside the runner, after dispatch
and before combine) one rank raises, is SIGKILLed, or stalls. The survivors must exit with an error
within EP_RUNTIME_TIMEOUT_S + 10 s of the fault; the test kills every process it started, so it
never hangs. Ranks fork from the harness's torch-preloaded server (fast); one test starts fresh
interpreters, with this file as the worker: `python tests/test_reliability.py DISPATCHER FAULT DIR`.
"""
from __future__ import annotations

import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

import ep_runtime as ep
from ep_runtime.distributed import free_port
from ep_runtime.runner_core import CombineInput
from ep_runtime.testing import RankFailure, _context, check_layer, make_problem, run_ranks, tolerance

TIMEOUT_S = 3  # EP_RUNTIME_TIMEOUT_S in the injected jobs
FAULT_RANK = 1
SHARDED = [name for name in ep.dispatchers.registered() if ep.dispatchers.get(name).shards_experts]
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the worker (one rank of a job)

def _worker(dispatcher: str, fault: str, folder: Path) -> None:
    import torch.distributed as dist

    group = ep.init_distributed(backend="gloo")
    rank = dist.get_rank()
    step = {"n": 0}

    def after_gemm1(inputs, outputs, expert_index):
        # Fault on the third forward: the first two complete, so the job was healthy until then.
        if rank == FAULT_RANK and step["n"] == 2:
            (folder / "fault_at").write_text(repr(time.time()))
            if fault == "raise":
                raise RuntimeError("injected failure mid-forward")
            if fault == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "stall":
                time.sleep(600)
        return None

    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch", group=group,
                     hooks=ep.runners.GemmHooks(after_gemm1=after_gemm1))
    gen = torch.Generator().manual_seed(rank)
    for step["n"] in range(4):
        x = torch.randn(6, 16, generator=gen)
        ids = torch.stack([torch.arange(6) % 8, (torch.arange(6) + 4) % 8], 1)  # every rank gets rows
        layer(x, ids, torch.rand(6, 2, generator=gen))
        (folder / f"rank{rank}_step{step['n']}").touch()
    (folder / f"rank{rank}_done").touch()


def _forked_rank(rank: int, env: dict, dispatcher: str, fault: str, folder: Path) -> None:
    """One rank forked from the harness's torch-preloaded server (fast start); the same bootstrap
    as a launched process: the launcher's variables, then init_distributed()."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        _worker(dispatcher, fault, folder)
    except BaseException:
        (folder / f"rank{rank}_error").write_text(traceback.format_exc())
        raise


def _run_job(folder: Path, dispatcher: str, fault: str, launch: str, world_size: int = 2):
    """Start the job ("fork": processes from the forkserver; "exec": fresh interpreters, as torchrun
    starts them). Returns (fault time, {survivor: (exit code, exit time, error text)}, survivors
    still running TIMEOUT_S + 10 s after the fault). Every process started here is killed."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size),
               EP_RUNTIME_TIMEOUT_S=str(TIMEOUT_S))
    procs, survivors = {}, {}
    fault_file = folder / "fault_at"
    try:
        for r in range(world_size):
            if launch == "exec":
                procs[r] = subprocess.Popen([sys.executable, __file__, dispatcher, fault, str(folder)],
                                            env=dict(os.environ, **env, RANK=str(r), LOCAL_RANK=str(r),
                                                     PYTHONPATH=str(ROOT)),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            else:
                procs[r] = _context().Process(target=_forked_rank, args=(r, env, dispatcher, fault, folder),
                                              daemon=True)
                procs[r].start()
        exit_code = (lambda p: p.poll()) if launch == "exec" else (lambda p: p.exitcode)
        deadline = time.monotonic() + 90  # start-up on a busy machine, until the fault fires
        pending = {r for r in procs if r != FAULT_RANK}
        while pending and time.monotonic() < deadline:
            if fault_file.exists() and deadline - time.monotonic() > TIMEOUT_S + 10:
                deadline = time.monotonic() + TIMEOUT_S + 10
            for r in sorted(pending):
                if exit_code(procs[r]) is not None:
                    text = (procs[r].stderr.read() if launch == "exec" else
                            (folder / f"rank{r}_error").read_text() if (folder / f"rank{r}_error").exists() else "")
                    survivors[r] = (exit_code(procs[r]), time.time(), text)
                    pending.discard(r)
            time.sleep(0.05)
        fault_at = float(fault_file.read_text()) if fault_file.exists() else None
        return fault_at, survivors, pending
    finally:
        for p in procs.values():
            if launch == "exec":
                if p.poll() is None:
                    p.kill()
                p.wait()
                p.stderr.close()
            else:
                if p.is_alive():
                    p.kill()
                p.join()


def _check_survivors(folder: Path, fault_at, survivors, hung) -> None:
    assert fault_at is not None, f"the fault never fired; survivors: {survivors}"
    assert not hung, f"ranks {sorted(hung)} still running {TIMEOUT_S + 10} s after the fault"
    assert (folder / "rank0_step1").exists()  # healthy until the fault
    for r, (code, exited_at, error) in survivors.items():
        assert code != 0, f"rank {r} exited 0 after rank {FAULT_RANK} failed:\n{error}"
        assert exited_at - fault_at <= TIMEOUT_S + 10, f"rank {r} took {exited_at - fault_at:.1f} s"
        assert not (folder / f"rank{r}_done").exists()
        assert "RuntimeError" in error, error  # torch.distributed's error, not a silent exit
        assert "PeerFailure: " in error and " on rank 0 of 2 " in error and "rank 1" in error, error


FAULTS = ["raise", "sigkill", "stall"]


@pytest.fixture(scope="module")
def forked_jobs(tmp_path_factory):
    """{(dispatcher, fault): (its folder, its _run_job future)}: every job started at once (a job's
    survivors mostly wait out the timeout, on idle cores); each case's test checks its own."""
    from concurrent.futures import ThreadPoolExecutor
    cases = [(dispatcher, fault) for dispatcher in SHARDED for fault in FAULTS]
    folders = {case: tmp_path_factory.mktemp("-".join(case)) for case in cases}
    _context()  # the forkserver, started once before the threads use it
    with ThreadPoolExecutor(len(cases)) as pool:
        jobs = {case: pool.submit(_run_job, folders[case], *case, "fork") for case in cases}
    return {case: (folders[case], job) for case, job in jobs.items()}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("dispatcher", SHARDED)
def test_survivors_fail_within_the_timeout(forked_jobs, dispatcher, fault):
    folder, job = forked_jobs[(dispatcher, fault)]
    _check_survivors(folder, *job.result())


@pytest.mark.parametrize("fault", ["raise", "sigkill"])
def test_launched_job_survivors_exit_within_the_timeout(tmp_path, fault):
    """The same with fresh interpreters, as torchrun starts ranks: the uncaught error ends the
    process with a non-zero exit code (and the group is destroyed at exit)."""
    _check_survivors(tmp_path, *_run_job(tmp_path, SHARDED[-1], fault, "exec"))


# ---------------------------------------------------------------- symmetric bad input

BAD_INPUT = {
    "id_too_big": "topk_ids has id 8 at [2, 0]; allowed -1..7 (num_experts=8)",
    "id_below_minus_one": "topk_ids has id -2 at [1, 1]; allowed -1..7 (num_experts=8)",
    # int64 2**40 + 1 must not wrap to expert 1 when ids become int32.
    "id_beyond_int32": "topk_ids has id 1099511627777 at [0, 1]; allowed -1..7 (num_experts=8)",
    "float_ids": "topk_ids has dtype torch.float32; expected a signed integer dtype (int32 or int64;",
    "uint32_ids": "topk_ids has dtype torch.uint32; expected a signed integer dtype",
    "ids_shape": "topk_ids has shape [3, 2]; expected [4, 2] (T rows of x, top_k)",
    "weights_shape": "topk_weights has shape [4, 3]; expected [4, 2] (T rows of x, top_k)",
    "int_weights": "topk_weights has dtype torch.int64; expected a floating dtype",
    "x_hidden": "x has shape [4, 17]; expected [T, 16] (hidden_size=16)",
    "x_dtype": "x has dtype torch.float64; this layer's weights are torch.float32",
    "x_3d": "topk_ids has shape [4, 1, 2]; expected [1, 4, 2] (x's leading dims, then top_k) or [4, 2] (flattened)",
    "nan_weight": "topk_weights has a non-finite value nan at [3, 1]",
}
CAPACITY = {  # T = 5 over a capacity of 4 tokens per rank
    "deepep_ll": "x has 5 tokens on rank 0; deepep_ll allows at most num_max_dispatch_tokens_per_rank M=4 per rank",
    "mori": "x has 5 tokens on rank 0; mori allows at most max_dispatch_tokens_per_rank=4",
}


def _layer_and_input(dispatcher, case):
    E, K, H, T = 8, 2, 16, 4
    options = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 4},
               "mori": {"max_dispatch_tokens_per_rank": 4}}.get(dispatcher, {})
    layer = ep.EPMoE(E, K, H, 8, dispatcher=dispatcher, runner="torch", dispatcher_options=options)
    x, ids, weights = torch.randn(T, H), torch.tensor([[0, 5], [1, 2], [7, -1], [3, 4]]), torch.rand(T, K)
    if case == "id_too_big":
        ids[2, 0] = 8
    elif case == "id_below_minus_one":
        ids[1, 1] = -2
    elif case == "id_beyond_int32":
        ids[0, 1] = 2 ** 40 + 1
    elif case == "float_ids":
        ids = ids.float()
    elif case == "uint32_ids":  # 2**32 - 1 would read as -1 (a dropped slot) if accepted
        ids = ids.to(torch.uint32)
        ids[0, 0] = 2 ** 32 - 1
    elif case == "ids_shape":
        ids = ids[:3]
    elif case == "weights_shape":
        weights = torch.rand(T, K + 1)
    elif case == "int_weights":
        weights = torch.ones(T, K, dtype=torch.long)
    elif case == "x_hidden":
        x = torch.randn(T, H + 1)
    elif case == "x_dtype":
        x = x.double()
    elif case == "x_3d":  # ([4, 2] ids are taken for x [1, 4, H]: flattened)
        x, ids = x.unsqueeze(0), ids.unsqueeze(1)
    elif case == "nan_weight":
        weights[3, 1] = float("nan")
    elif case == "too_many_tokens":
        x, ids, weights = torch.randn(5, H), torch.zeros(5, K, dtype=torch.long), torch.rand(5, K)
        ids[:, 1] = 1
    return layer, x, ids, weights


def _bad_input_rank(rank, world_size, dispatcher, cases):
    """Every rank gets the same bad input; the checks run before any collective, so each rank
    raises on its own and the ranks stay in step for the next case."""
    messages = {}
    for case in cases:
        layer, x, ids, weights = _layer_and_input(dispatcher, case)
        try:
            layer(x, ids, weights)
            messages[case] = "no error"
        except (ValueError, TypeError) as err:
            messages[case] = f"{type(err).__name__}: {err}"
    layer, x, ids, weights = _layer_and_input(dispatcher, "good")  # the group still works afterwards
    return messages, list(layer(x, ids, weights).shape)


@pytest.mark.parametrize("dispatcher", ep.dispatchers.registered())
def test_symmetric_bad_input_fails_every_rank_with_the_same_message(dispatcher):
    cases = dict(BAD_INPUT, **({"too_many_tokens": CAPACITY[dispatcher]} if dispatcher in CAPACITY else {}))
    results = run_ranks(_bad_input_rank, 2, dispatcher, list(cases), timeout=120, group_timeout=TIMEOUT_S)
    for messages, shape in results:
        assert messages == results[0][0]  # the same error on every rank
        for case, expected in cases.items():
            assert expected in messages[case], f"{case}: {messages[case]}"
        assert shape == [4, 16]


def _mismatched_layer_rank(rank, world_size, dispatcher, field):
    kwargs = dict(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    options = {}
    if field == "hidden_size":
        kwargs["hidden_size"] += 16 * rank
    elif field == "dispatcher":  # rank 1 builds mori
        dispatcher, options = ("mori", {"max_dispatch_tokens_per_rank": 4}) if rank else (dispatcher, options)
    elif field == "sync_checks":  # the knob set on rank 1 only
        os.environ["EP_RUNTIME_SYNC_CHECKS"] = "1" if rank else "0"
    else:  # a dispatcher setting, as a knob set on one rank only would give
        options = {field: 4 + 4 * rank}
    try:
        ep.EPMoE(**kwargs, dispatcher=dispatcher, runner="torch", dispatcher_options=options)
        return "built"
    except ValueError as err:
        return str(err)


@pytest.mark.parametrize("dispatcher,field", [("deepep_normal", "hidden_size"),
                                              ("deepep_ll", "num_max_dispatch_tokens_per_rank"),
                                              ("mori", "max_dispatch_tokens_per_rank"),
                                              ("mori", "prealloc_max_recv_tokens"),  # (its derived rows differ too)
                                              ("deepep_normal", "num_worst_tokens"),  # (its derived chunk differs too)
                                              ("deepep_normal", "dispatcher"),
                                              ("deepep_ll", "sync_checks")])
def test_ranks_built_with_different_settings_fail_every_rank_naming_the_setting(dispatcher, field):
    """Mismatched settings would exchange mismatched byte counts later (gloo aborts the process);
    building the layer compares them once and raises on every rank instead. Different dispatchers
    are named as such (not by the first option in which they differ, e.g. deepep_normal's alignment)."""
    small, large = {"hidden_size": (16, 32), "dispatcher": ("'deepep_normal'", "'mori'"),
                    "sync_checks": (False, True)}.get(field, (4, 8))
    names = (dispatcher, "mori" if field == "dispatcher" else dispatcher)
    assert run_ranks(_mismatched_layer_rank, 2, dispatcher, field, timeout=60, group_timeout=TIMEOUT_S) == [
        f"ranks disagree on {names[0]} setting {field}: rank 0 has {small}, rank 1 has {large}; every rank must "
        "build the layer with the same arguments and EP_RUNTIME_* knobs",
        f"ranks disagree on {names[1]} setting {field}: rank 1 has {large}, rank 0 has {small}; every rank must "
        "build the layer with the same arguments and EP_RUNTIME_* knobs"]


def _two_argument_hook(inputs, outputs):
    return None


def _bad_hooks_rank(rank, world_size, case):
    """Every rank builds a layer with the same bad hooks: refused there (it failed inside the first forward,
    or, for hooks given as a bare function, with an AttributeError in the runner)."""
    try:
        if case == "not_callable":
            hooks = ep.runners.GemmHooks(after_gemm1=3)
        elif case == "two_arguments":
            hooks = ep.runners.GemmHooks(after_gemm2=_two_argument_hook)
        else:  # a hook given where the GemmHooks go
            hooks = _two_argument_hook
        layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", hooks=hooks)
    except TypeError as err:
        return str(err)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 8, (4, 2), generator=gen)
    try:
        layer(torch.randn(4, 16, generator=gen), ids, torch.rand(4, 2, generator=gen))
    except Exception as err:  # noqa: BLE001 - the test reads what a forward raised
        return f"built; the forward raised {type(err).__name__}: {err}"
    return "built"


@pytest.mark.parametrize("case,message", [
    ("not_callable", "hooks.after_gemm1=3 is not callable; allowed: None or a callable hook(inputs [P, in], "
                     "outputs [P, out], expert_index [P])"),
    ("two_arguments", "hooks.after_gemm2=<function _two_argument_hook at 0x"),
    ("bare_function", "hooks=<function _two_argument_hook at 0x"),
])
def test_bad_gemm_hooks_are_refused_at_construction_naming_the_field(case, message):
    results = run_ranks(_bad_hooks_rank, 2, case, timeout=60, group_timeout=TIMEOUT_S)
    for result in results:
        assert result.startswith(message), result
    if case == "two_arguments":
        assert "has the signature (inputs, outputs), which cannot take three positional arguments" in results[0]
    if case == "bare_function":
        assert "allowed: None or an ep.runners.GemmHooks(after_gemm1=..., after_gemm2=...)" in results[0]


def _grad_mode_rank(rank, world_size, dispatcher, mode):
    """Rank 0 trains (its experts need gradients); rank 1 calls the same forward with grad mode off."""
    from contextlib import nullcontext
    torch.manual_seed(rank)
    layer, x, ids, weights = _layer_and_input(dispatcher, "good")
    off = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "no_grad_async": torch.no_grad}[mode]
    try:
        with off() if rank == 1 else nullcontext():
            if mode == "no_grad_async":  # the dispatch's plan runs on the group's exchange thread (CPU ranks)
                routed, shared = layer.routed_and_shared(x, ep.TopKOutput(ids, weights), torch.nn.Identity())
                y = routed + shared
            else:
                y = layer(x, ids, weights)
        if rank == 0:
            y.square().sum().backward()
    except RuntimeError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


@pytest.mark.parametrize("dispatcher,mode", [(name, "no_grad") for name in SHARDED] +
                         [("deepep_normal", "inference_mode"), ("deepep_normal", "no_grad_async")])
def test_one_rank_without_grad_mode_fails_every_rank_at_the_forward(dispatcher, mode):
    """Rank 1 under torch.no_grad() (or inference_mode) records no backward, so rank 0's backward waited in
    its reverse exchanges until the timeout (a PeerFailure naming no cause); grad mode rides in the count
    table, and both ranks' forward raises naming every rank's mode."""
    results = run_ranks(_grad_mode_rank, 2, dispatcher, mode, timeout=60, group_timeout=TIMEOUT_S)
    assert results[0] == results[1] == (
        f"RuntimeError: {dispatcher} dispatch: the ranks' grad modes differ (rank 0: grad mode on, needs a gradient, "
        f"rank 1: grad mode off); allowed: grad mode on every rank where any rank needs a gradient (its backward's "
        f"exchanges need every rank: call the layer under torch.no_grad() / torch.inference_mode() on every rank or "
        f"on none); every rank stops here"), results


def _frozen_rank_without_grad_mode(rank, world_size):
    """Nothing needs a gradient on any rank: grad mode may differ (no backward runs)."""
    torch.manual_seed(rank)
    layer, x, ids, weights = _layer_and_input("deepep_normal", "good")
    layer.requires_grad_(False)
    with torch.no_grad() if rank == 1 else torch.enable_grad():
        return list(layer(x, ids, weights).shape)


def test_grad_modes_may_differ_where_no_rank_needs_a_gradient():
    assert run_ranks(_frozen_rank_without_grad_mode, 2, timeout=60, group_timeout=TIMEOUT_S) == [[4, 16], [4, 16]]


def _one_rank_cannot_build_rank(rank, world_size, cases):
    """For each case in turn, rank 1 alone gets an argument (or a runner) it cannot build its layer with; rank 0
    builds its own. {case: (what this rank raised, or "built"; seconds it took)}."""
    os.environ.pop("TRITON_INTERPRET", None)  # runner="triton" cannot run on these CPU ranks
    outcome = {}
    for case in cases:
        dispatcher = "deepep_ll" if case.startswith("dispatcher_options") else "deepep_normal"
        kwargs = dict(runner="torch")
        if rank == 1:
            kwargs.update({"activation": dict(activation="relu"),
                           "runner": dict(runner="triton"),
                           "hooks": dict(hooks=3),
                           "expert_to_rank": dict(expert_to_rank=[0, 1, 0]),
                           "dispatcher_options": dict(dispatcher_options={"num_max_dispatch_tokens_per_rank": 0}),
                           "dispatcher_options_list": dict(dispatcher_options=[("num_max_dispatch_tokens_per_rank",
                                                                                 8)]),
                           "runner_options_str": dict(runner_options="none"),
                           "device": dict(device="bogus"),
                           }[case])
        start = time.monotonic()
        try:
            ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, **kwargs)
            outcome[case] = "built", time.monotonic() - start
        except Exception as err:  # noqa: BLE001 - the test reads what each rank raised
            outcome[case] = f"{type(err).__name__}: {err}", time.monotonic() - start
    if rank == 1:  # its process lives on a while (a framework that caught the error): no lost connection
        time.sleep(LINGER_S)
    return outcome


LINGER_S = 5
CANNOT_BUILD = {
    "activation": "ValueError: activation='relu'; allowed: ",
    "runner": "RuntimeError: runner='triton' cannot run here: ",
    "hooks": "TypeError: hooks=3; allowed: None or an ep.runners.GemmHooks(",
    "expert_to_rank": "ValueError: expert_to_rank",
    "dispatcher_options": "ValueError: num_max_dispatch_tokens_per_rank=0; allowed: ",
    # options that are no dict: named (dict() of them said "dictionary update sequence element #0 ...")
    "dispatcher_options_list": "TypeError: dispatcher_options=[('num_max_dispatch_tokens_per_rank', 8)]; allowed: "
                               "None or a dict",
    "runner_options_str": "TypeError: runner_options='none'; allowed: None or a dict",
    # a device that is no device: the join with it failed silently, leaving rank 0 to the timeout
    "device": "ValueError: device='bogus' is not a torch device",
}


@pytest.fixture(scope="module")
def cannot_build_outcomes():
    """Every case in one group of ranks, one after another (each case's settings check leaves the group usable)."""
    return run_ranks(_one_rank_cannot_build_rank, 2, list(CANNOT_BUILD), timeout=90, group_timeout=30)


@pytest.mark.parametrize("case", list(CANNOT_BUILD))
def test_a_rank_that_cannot_build_its_layer_fails_every_rank_naming_it(case, cannot_build_outcomes):
    """Rank 1 raised on its own while rank 0 waited in the settings check's all_gather until the timeout (a
    bad argument, a dispatcher option), or built its layer and waited in the first forward (a runner that
    cannot run on rank 1, bad hooks). Rank 1 now joins the settings check with its error: rank 0 raises
    there at once, naming rank 1 and the error."""
    (rank0, seconds), (rank1, _) = (outcome[case] for outcome in cannot_build_outcomes)
    assert rank1.startswith(CANNOT_BUILD[case]), rank1
    kind, _, message = rank1.partition(": ")
    assert rank0 == (f"{kind}: rank 1 could not build its layer or dispatcher ({kind}: {message}); every rank stops "
                     f"here (every rank must build it with the same arguments and EP_RUNTIME_* knobs, and with a "
                     f"runner that runs there)"), rank0
    # at once: not once rank 1's process ended (it lingers LINGER_S after its last case), nor the group's timeout
    assert seconds < LINGER_S - 1, seconds


def _non_finite_state_dict_rank(rank, world_size):
    """Each rank loads its own per-rank state_dict with one non-finite expert weight at a random place: rank 0
    a NaN in w13, rank 1 a float64 w2 value past float32's range (inf once stored in this float32 layer)."""
    torch.manual_seed(5)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    gen = torch.Generator().manual_seed(10 + rank)
    state = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64 if rank else v.dtype)
             for k, v in before.items()}
    name = "w2" if rank else "w13"
    where = tuple(int(torch.randint(0, n, (), generator=gen)) for n in state[name].shape)
    state[name][where] = 1e300 if rank else float("nan")
    try:
        layer.load_state_dict(state)
        message = "loaded"
    except ValueError as err:
        message = str(err)
    unchanged = all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    del state[name]
    layer.load_state_dict(state, strict=False)  # the finite tensors load
    x, ids, weights = torch.randn(4, 16, generator=gen), torch.randint(0, 8, (4, 2), generator=gen), torch.rand(4, 2)
    return message, list(where), unchanged, bool(layer(x, ids, weights).isfinite().all())


def test_load_state_dict_refuses_non_finite_expert_weights_naming_the_key():
    """NaN / inf expert weights loaded silently through load_state_dict (load_experts refuses them) and made
    every token routed to that expert NaN, on every rank that sent one; refused now, naming the key and
    the place, before the layer changes; every rank's error on every rank (each rank loads its own state_dict)."""
    results = run_ranks(_non_finite_state_dict_rank, 2, timeout=60, group_timeout=TIMEOUT_S)
    expected = "; ".join(f"rank {rank}: state_dict['{name}'] has a non-finite value {value} at {where}"
                         for rank, ((value, name), (_, where, _, _)) in enumerate(zip((("nan", "w13"), ("inf", "w2")),
                                                                                      results)))
    for message, _, unchanged, finite in results:
        assert message == expected + " (each rank's state_dict; every rank stops before loading it)", message
        assert unchanged and finite



def _non_finite_moving_load_rank(rank, world_size):
    """A checkpoint saved in another placement (round-robin experts) loads into a fresh layer (contiguous
    experts): the load moves the layer's slots between ranks, collectives every rank runs. Rank 1's state_dict
    holds a NaN."""
    E = 8
    saved = ep.EPMoE(E, 2, 16, 8, dispatcher="deepep_normal", runner="torch",
                     expert_to_rank=[e % world_size for e in range(E)])
    state = {k: v.clone() for k, v in saved.state_dict().items()}
    if rank == 1:
        state["w13"][1, 2, 3] = float("nan")
    layer = ep.EPMoE(E, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    before = [layer.placement.local_expert_ids().tolist(), layer.w13.detach().clone()]
    start = time.monotonic()
    try:
        layer.load_state_dict(state)
        message = "loaded"
    except ValueError as err:
        message = str(err)
    unchanged = layer.placement.local_expert_ids().tolist() == before[0] and torch.equal(layer.w13, before[1])
    return message, unchanged, time.monotonic() - start


def test_a_non_finite_weight_on_one_rank_fails_every_rank_before_the_placement_moves():
    """Rank 1 alone refused its NaN, while rank 0 went on into the collectives that move the slots to the
    checkpoint's placement and waited there until the timeout: now both raise at once, naming rank 1."""
    results = run_ranks(_non_finite_moving_load_rank, 2, timeout=60, group_timeout=TIMEOUT_S)
    for message, unchanged, seconds in results:
        assert message == ("rank 1: state_dict['w13'] has a non-finite value nan at [1, 2, 3] (each rank's "
                           "state_dict; every rank stops before loading it)"), message
        assert unchanged and seconds < TIMEOUT_S / 2, (unchanged, seconds)

def _asymmetric_bad_input_rank(rank, world_size, dispatcher, case, linger):
    layer, x, ids, weights = _layer_and_input(dispatcher, case if rank == 1 else "good")
    try:
        return list(layer(x, ids, weights).shape)
    except (ValueError, TypeError):
        time.sleep(linger)  # linger > 0: the process lives on (a framework that caught the error)
        raise


def _bad_values_on_rank_one(dispatcher) -> dict[str, tuple[str, BaseException | None, float]]:
    """{case: (what rank 0 must raise, what the job raised or None, its seconds)}, one job per case in turn."""
    cases = {"id_too_big": "ValueError: rank 1 got invalid topk_ids or topk_weights",
             "nan_weight": "ValueError: rank 1 got invalid topk_ids or topk_weights"}
    if dispatcher in CAPACITY:
        cases["too_many_tokens"] = "x has 5 tokens on rank 1; "
    jobs = {}
    for case, on_rank0 in cases.items():
        start, error = time.monotonic(), None
        # linger: rank 1 lives on for a second after raising; rank 0 woken by its exit would raise a lost
        # connection (a PeerFailure), not the ValueError naming rank 1 checked below
        try:
            run_ranks(_asymmetric_bad_input_rank, 2, dispatcher, case, 1.0, timeout=60, group_timeout=TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the dispatcher's test reads it
            error = err
        jobs[case] = (on_rank0, error, time.monotonic() - start)
    return jobs


@pytest.fixture(scope="module")
def bad_values_jobs():
    """Each dispatcher's jobs, the dispatchers' at once (rank 1 lingers a second after each error, on
    idle cores); each dispatcher's test checks its own."""
    from concurrent.futures import ThreadPoolExecutor
    _context()  # the forkserver, started once before the threads use it
    with ThreadPoolExecutor(len(SHARDED)) as pool:
        return {dispatcher: pool.submit(_bad_values_on_rank_one, dispatcher) for dispatcher in SHARDED}


@pytest.mark.parametrize("dispatcher", SHARDED)
def test_one_rank_with_bad_values_fails_every_rank_at_once(dispatcher, bad_values_jobs):
    """Bad ids or weights, or too many tokens, on rank 1 only: every sharded dispatcher carries these
    checks in its count table, so rank 0 fails at once too, naming rank 1, and no payload moves."""
    for case, (on_rank0, failure, seconds) in bad_values_jobs[dispatcher].result().items():
        assert isinstance(failure, RankFailure), (case, failure)
        rank0, _, rank1 = str(failure).partition("--- rank 1 ---")
        assert (BAD_INPUT.get(case) or CAPACITY[dispatcher].replace("rank 0", "rank 1")) in rank1, (case, rank1)
        assert on_rank0 in rank0, (case, rank0)
        # rank 0's own ValueError (above) shows it did not wait out a collective; the bound only catches a hang
        assert seconds < 2 * TIMEOUT_S + 30, (case, seconds)


# Rank 1's bad input (rank 0's is good) and the error rank 1 raises, checked before any collective.
# The dispatcher's own checks (layer.dispatcher.dispatch), then the layer's (forward, routed_and_shared).
ONE_RANK_BAD = {
    "x_hidden": "ValueError: x has shape [4, 17]; expected [T, 16] (hidden_size=16)",
    "ids_shape": "ValueError: topk_ids has shape [3, 2]; expected [4, 2] (T rows of x, top_k)",
    "int_weights": "TypeError: topk_weights has dtype torch.int64; expected a floating dtype",
    "x_on_meta": "ValueError: x is on the meta device (it has no values); allowed: a tensor holding the tokens",
    "async_x_hidden": "ValueError: x has shape [4, 17]; expected [T, 16] (hidden_size=16)",
    "layer_x_dtype": "TypeError: x has dtype torch.float64; this layer's weights are torch.float32",
    "layer_x_on_meta": "ValueError: x is on meta; this layer is on cpu",
    "layer_x_3d": "ValueError: topk_ids has shape [4, 1, 2]; expected [1, 4, 2] (x's leading dims, then top_k) or "
                  "[4, 2] (flattened)",
    "layer_logits_shape": "ValueError: router_logits has shape [4, 7]; expected [4, 8] (T, num_experts)",
    "shared_x_hidden": "ValueError: x has shape [4, 17]; expected [T, 16] (hidden_size=16)",
}
ONE_RANK_PLANS = {**{case: (case.replace("_static", ""), options) for case, options in {
    "deepep_normal": {}, "deepep_normal_static": {"num_worst_tokens": 16},
    "deepep_ll": {"num_max_dispatch_tokens_per_rank": 8}, "mori": {"max_dispatch_tokens_per_rank": 8},
    "mori_static": {"max_dispatch_tokens_per_rank": 8, "static": True, "max_input_tokens": 12}}.items()},
    # node-aware host plans (two ranks as two nodes): their count row carries tokens per node too
    "deepep_normal_nodes": ("deepep_normal", {"hierarchical": "on", "ranks_per_node": 1}),
    "mori_nodes": ("mori", {"max_dispatch_tokens_per_rank": 8, "hierarchical": "on", "ranks_per_node": 1}),
    # apply_router_weight_on_input with top_k > 1: deepep_ll's count row carries a third flag (repeated experts)
    "deepep_ll_weight_on_input": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": 8})}


def _one_rank_bad_call(layer, case, bad):
    """One dispatch (or forward) of rank 1's bad input `case` (bad=True) or of good input."""
    x, ids, weights = torch.randn(4, 16), torch.tensor([[0, 5], [1, 2], [7, -1], [3, 4]]), torch.rand(4, 2)
    if bad and case in ("x_hidden", "async_x_hidden", "shared_x_hidden"):
        x = torch.randn(4, 17)
    elif bad and case == "ids_shape":
        ids = ids[:3]
    elif bad and case == "int_weights":
        weights = torch.ones(4, 2, dtype=torch.long)
    elif bad and case in ("x_on_meta", "layer_x_on_meta"):
        x = x.to("meta")
    elif bad and case == "layer_x_dtype":
        x = x.double()
    elif bad and case == "layer_x_3d":
        x, ids = x.unsqueeze(0), ids.unsqueeze(1)
    if case == "async_x_hidden":  # CPU ranks: the exchange runs on the group's thread; its error comes at wait()
        out, work = layer.dispatcher.dispatch(x, ep.TopKOutput(ids, weights), async_op=True)
        work.wait()
    elif case == "shared_x_hidden":  # the layer's async dispatch, shared experts running meanwhile
        layer.routed_and_shared(x, ep.TopKOutput(ids, weights), torch.nn.Identity())
    elif case == "layer_logits_shape":
        layer(x, router_logits=torch.randn(4, 7 if bad else 8))
    elif case.startswith("layer_"):
        layer(x, ids, weights)
    else:
        layer.dispatcher.dispatch(x, ep.TopKOutput(ids, weights))


def _one_rank_bad_shape_rank(rank, world_size, plan):
    name, options = ONE_RANK_PLANS[plan]
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=name, runner="torch", dispatcher_options=options,
                     apply_router_weight_on_input=plan.endswith("weight_on_input"))
    raised = {}
    for case in ONE_RANK_BAD:  # the first is the group's first dispatch: node-aware plans resolve the nodes first
        start = time.monotonic()
        try:
            _one_rank_bad_call(layer, case, bad=rank == 1)
            raised[case] = ("no error", time.monotonic() - start)
        except Exception as err:  # noqa: BLE001 - each rank reports what it raised
            raised[case] = (f"{type(err).__name__}: {err}", time.monotonic() - start)
    problem = make_problem(layer.config, [6, 5], seed=3, ep_size=world_size)  # the group is still in step
    return raised, check_layer(layer, problem, rank, backward=False)["y"]


@pytest.mark.parametrize("plan", list(ONE_RANK_PLANS))
def test_one_rank_with_a_bad_shape_fails_every_rank_at_once(plan):
    """A shape, dtype or device error on rank 1 only (the dispatcher's checks, sync and async, and the
    layer's) is raised there before any collective; rank 1 still joins the count table's all_gather, with a
    row marking its input as bad, so rank 0 raises at once too (the same exception type), naming rank 1,
    before any payload moves (it waited in that all_gather until EP_RUNTIME_TIMEOUT_S, or until rank 1's
    process ended). Afterwards a good forward on both ranks equals the float64 reference."""
    name = ONE_RANK_PLANS[plan][0]
    (good, y_error0), (bad, y_error1) = run_ranks(_one_rank_bad_shape_rank, 2, plan, timeout=60,
                                                  group_timeout=TIMEOUT_S)
    for case, expected in ONE_RANK_BAD.items():
        assert bad[case][0].startswith(expected), (case, bad[case])
        kind = expected.partition(":")[0]
        assert good[case][0] == (f"{kind}: {name} dispatch: rank 1 of 2 was given bad input (its own error names "
                                 f"the argument); no token was sent"), (case, good[case])
        assert good[case][1] < TIMEOUT_S / 2, (case, good[case])  # at once, not after the timeout
    assert max(y_error0, y_error1) <= tolerance(torch.float32)


def _reused_handle_rank(rank, world_size, folder):
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 16, 8))
    topk = ep.TopKOutput(torch.tensor([[0, 5], [1, 2], [7, -1], [3, 4]]), torch.rand(4, 2))
    handle = d.dispatch(torch.randn(4, 16), topk).handle
    try:
        d.dispatch(torch.randn(4, 17 if rank == 1 else 16), topk, handle=handle)
        return "no error"
    except (ValueError, RuntimeError) as err:
        if rank == 0:
            (folder / "rank0_raised").touch()
        else:  # rank 1 lives on (a framework that caught the error) until rank 0 has given up on it
            deadline = time.monotonic() + 30
            while not (folder / "rank0_raised").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return f"{type(err).__module__}.{type(err).__name__}: {err}"


def test_one_rank_with_a_bad_shape_and_a_reused_handle_leaves_the_others_to_the_timeout(tmp_path):
    """A dispatch given a handle sends the payload at once, with no count table to mark rank 1's bad input
    in: rank 0 waits in the payload exchange and raises ep.PeerFailure after the group's timeout, naming
    the dispatcher, the operation, rank 1 and the knob (what a user can act on, issue 15 item 4)."""
    start = time.monotonic()
    rank0, rank1 = run_ranks(_reused_handle_rank, 2, tmp_path, timeout=60, group_timeout=1)
    assert rank1 == "builtins.ValueError: x has shape [4, 17]; expected [T, 16] (hidden_size=16)", rank1
    assert rank0.startswith("ep_runtime.distributed.PeerFailure: deepep_normal dispatch on rank 0 of 2 waited in vain "
                            "for rank 1: no answer within the group's timeout (1 s; set it with EP_RUNTIME_TIMEOUT_S "
                            "or init_distributed(timeout_s=...))"), rank0
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------- ranks whose calls differ

EXCHANGES = {"deepep_normal": {}, "deepep_normal_static": {"num_worst_tokens": 16},
             "deepep_ll": {"num_max_dispatch_tokens_per_rank": 8}, "mori": {"max_dispatch_tokens_per_rank": 8},
             "mori_static": {"max_dispatch_tokens_per_rank": 8, "static": True, "max_input_tokens": 8}}


def _exchange_and_input(case, rank):
    name = case.replace("_static", "")
    d = ep.dispatchers.create(name, ep.MoeConfig(8, 2, 16, 8), **EXCHANGES[case])
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))
    return d, x, ep.TopKOutput(torch.tensor([[0, 5], [1, 2], [7, -1], [3, 4]]), torch.rand(4, 2))


def _different_dtypes_rank(rank, world_size, case):
    d, x, topk = _exchange_and_input(case, rank)
    messages = []
    for dtypes in ((torch.bfloat16, torch.float16), (torch.float32, torch.float64)):
        try:  # bf16 and fp16 rows have the same size: read as each other they were garbage, with no error
            d.dispatch(x.to(dtypes[rank % 2]), topk)  # fp32 vs fp64: gloo aborted the process (size mismatch)
            messages.append("no error")
        except TypeError as err:
            messages.append(str(err))
    out = d.dispatch(x, topk)  # every rank stopped before the payload: the ranks are still in step
    y = d.combine(CombineInput(out.recv_x * 2, out))
    return messages, list(y.shape)


@pytest.mark.parametrize("case", list(EXCHANGES))
def test_ranks_dispatching_x_in_different_dtypes_fail_every_rank_naming_them(case):
    """x's dtype rides in the count table, so ranks that disagree all raise before any payload moves."""
    results = run_ranks(_different_dtypes_rank, 2, case, timeout=60, group_timeout=TIMEOUT_S)
    for rank, (messages, shape) in enumerate(results):
        assert shape == [4, 16]
        for dtypes, message in zip(((torch.bfloat16, torch.float16), (torch.float32, torch.float64)), messages):
            assert message == (f"x has dtype {dtypes[rank]} on rank {rank}, but the ranks differ ({dtypes[0]} on "
                               f"rank 0, {dtypes[1]} on rank 1); allowed: one dtype on every rank (rows cross ranks "
                               f"as raw bytes); every rank stops here"), message


def _refused_x_rank(rank, world_size, case):
    d, x, topk = _exchange_and_input(case, rank) if case != "standard" else (
        ep.dispatchers.create("standard", ep.MoeConfig(8, 2, 16, 8)), torch.randn(4, 16),
        ep.TopKOutput(torch.tensor([[0, 5], [1, 2], [7, -1], [3, 4]]), torch.rand(4, 2)))
    messages = []
    for bad in (torch.float8_e4m3fn, torch.float8_e5m2, "meta"):
        try:
            d.dispatch(x.to(bad), ep.TopKOutput(*(t.to(bad) if bad == "meta" else t for t in topk)))
            messages.append("no error")
        except Exception as err:  # noqa: BLE001 - the type is part of what is checked
            messages.append(f"{type(err).__name__}: {err}")
    out = d.dispatch(x, topk)  # refused before any collective: the ranks are still in step
    rows = out.hidden_states if case == "standard" else out.recv_x
    return messages, list(d.combine(CombineInput(rows, out)).shape)


@pytest.mark.parametrize("case", ["standard"] + list(EXCHANGES))
def test_x_in_float8_or_on_meta_is_refused_naming_it(case):
    """A float8 x is a floating tensor, but no dispatcher or runner computes on it (an fp8 dispatch quantizes
    x itself, use_fp8=True): it was accepted, then gloo refused it inside the payload exchange ("Invalid scalar
    type", naming nothing); standard handed it on to the runner. An x on the meta device (with its topk there
    too) failed inside torch ("Tensor on device cpu is not on the expected device meta!", "Cannot copy out of
    meta tensor"), naming nothing."""
    results = (run_ranks(_refused_x_rank, 2, case, timeout=60, group_timeout=TIMEOUT_S) if case != "standard"
               else [_refused_x_rank(0, 1, case)])
    for messages, shape in results:
        assert shape == [4, 16]
        assert messages == [f"TypeError: x has dtype {dtype}; allowed: torch.float32, torch.bfloat16, torch.float16, "
                            f"torch.float64 (tokens travel and are computed in one of them; for an fp8 dispatch pass "
                            f"them so with use_fp8=True)" for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)] + [
            "ValueError: x is on the meta device (it has no values); allowed: a tensor holding the tokens, on the "
            "group's device (cpu for gloo, cuda for NCCL)"], messages


def _combine_dtype_rank(rank, world_size, case):
    d, x, topk = _exchange_and_input(case, rank)
    out = d.dispatch(x, topk)
    rows = out.recv_x * 2
    return list(d.combine(CombineInput(rows.half() if rank == 1 else rows, out)).shape)


@pytest.mark.parametrize("case", ["deepep_normal", "deepep_ll", "mori_static"])
def test_combine_rows_in_another_dtype_than_x_are_named_before_the_exchange(case):
    """fp16 runner rows on rank 1 for an fp32 dispatch: raised there before the exchange (they crossed as
    raw bytes: gloo aborted a process on the size mismatch); rank 0 then fails in its exchange."""
    with pytest.raises(RankFailure) as failure:
        run_ranks(_combine_dtype_rank, 2, case, timeout=60, group_timeout=TIMEOUT_S)
    rank0, _, rank1 = str(failure.value).partition("--- rank 1 ---")
    assert ("TypeError: combine_input.hidden_states has dtype torch.float16; expected torch.float32, the dtype of "
            "the dispatched x") in rank1, rank1
    assert "RuntimeError" in rank0 and "died with exit code" not in rank0, rank0


def _user_code_raises_rank(rank, world_size, case):
    d, x, topk = _exchange_and_input(case, rank)
    out = d.dispatch(x, topk)
    if rank == 1:  # the user's own code between dispatch and combine; the process lives on a while
        time.sleep(TIMEOUT_S + 2)
        raise RuntimeError("user code failed between dispatch and combine")
    return list(d.combine(CombineInput(out.recv_x * 2, out)).shape)


USER_CODE_CASES = ["deepep_normal", "deepep_ll", "mori_static"]


def _user_code_job(case) -> tuple[BaseException | None, float]:
    """(what the job raised, None if nothing; its seconds)."""
    start = time.monotonic()
    try:
        run_ranks(_user_code_raises_rank, 2, case, timeout=60, group_timeout=TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - the case's test reads it
        return error, time.monotonic() - start
    return None, time.monotonic() - start


@pytest.fixture(scope="module")
def user_code_jobs():
    """Each case's job, all started at once: their ranks sleep or wait out the timeout (idle cores), so
    the three take the time of one; each case's test reads its own job."""
    from concurrent.futures import ThreadPoolExecutor
    _context()  # the forkserver, started once before the threads use it
    with ThreadPoolExecutor(len(USER_CODE_CASES)) as pool:
        return dict(zip(USER_CODE_CASES, pool.map(_user_code_job, USER_CODE_CASES)))


@pytest.mark.parametrize("case", USER_CODE_CASES)
def test_user_code_raising_between_dispatch_and_combine_names_the_peer(case, user_code_jobs):
    """The low-level API (ep.dispatchers.create): the survivor's combine raises ep.PeerFailure naming
    the dispatcher, the operation, the peer and the knob within the timeout, as the layer's does (it
    raised gloo's bare "Timed out waiting 3000ms for send operation to complete")."""
    failure, seconds = user_code_jobs[case]
    assert isinstance(failure, RankFailure), f"{case}: {failure!r}"
    rank0, _, rank1 = str(failure).partition("--- rank 1 ---")
    assert "RuntimeError: user code failed between dispatch and combine" in rank1, rank1
    name = case.replace("_static", "")
    assert (f"ep_runtime.distributed.PeerFailure: {name} combine on rank 0 of 2 waited in vain for rank 1: no answer "
            f"within the group's timeout ({TIMEOUT_S} s; set it with EP_RUNTIME_TIMEOUT_S") in rank0, rank0
    assert seconds < 2 * TIMEOUT_S + 30


def _async_combine_after_peer_left_rank(rank, world_size, case):
    d, x, topk = _exchange_and_input(case, rank)
    out = d.dispatch(x, topk)
    if rank == 1:  # the user's code fails here and the process ends: its connections close
        raise RuntimeError("user code failed between dispatch and combine")
    y, work = d.combine(CombineInput(out.recv_x * 2, out), async_op=True)  # on the group's exchange thread
    work.wait()
    return list(y.shape)


def test_async_combine_names_the_peer_at_the_wait():
    """async_op=True on CPU ranks: the exchange runs on the group's exchange thread and its error reaches
    the caller at work.wait(); it is ep.PeerFailure there too (it was gloo's bare RuntimeError)."""
    with pytest.raises(RankFailure) as failure:
        run_ranks(_async_combine_after_peer_left_rank, 2, "deepep_normal", timeout=60, group_timeout=TIMEOUT_S)
    rank0, _, rank1 = str(failure.value).partition("--- rank 1 ---")
    assert "RuntimeError: user code failed between dispatch and combine" in rank1, rank1
    assert "ep_runtime.distributed.PeerFailure: deepep_normal combine on rank 0 of 2 " in rank0, rank0
    assert "rank 1" in rank0.partition("PeerFailure")[2], rank0


# ---------------------------------------------------------------- knobs

KNOB_CASES = [
    ("EP_RUNTIME_TIMEOUT_S", "soon", "EP_RUNTIME_TIMEOUT_S='soon' is not a valid float; allowed: float >= 1"),
    ("EP_RUNTIME_TIMEOUT_S", "0.5", "EP_RUNTIME_TIMEOUT_S='0.5' is below the minimum; allowed: float >= 1"),
    ("EP_RUNTIME_TIMEOUT_S", "nan", "EP_RUNTIME_TIMEOUT_S='nan' is not a valid float"),
    ("EP_RUNTIME_TIMEOUT_S", "inf", "EP_RUNTIME_TIMEOUT_S='inf' is not a valid float"),
    ("EP_RUNTIME_TIMEOUT_S", "1e20", "EP_RUNTIME_TIMEOUT_S='1e20' is above the maximum; allowed: float >= 1 and <= 1e+09"),
    ("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", "0", "EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK='0' is below"),
    ("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", "1.5",
     "EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK='1.5' is not a valid int"),
    ("EP_RUNTIME_NORMAL_ALIGNMENT", "-4", "EP_RUNTIME_NORMAL_ALIGNMENT='-4' is below the minimum"),
    ("EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS", "many",
     "EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS='many' is not a valid int"),
    ("EP_RUNTIME_RUNNER", "cuda", "EP_RUNTIME_RUNNER='cuda' is not allowed; allowed: auto, torch, triton, masked"),
    ("EP_RUNTIME_DEMO_WORLD_SIZE", "0", "EP_RUNTIME_DEMO_WORLD_SIZE='0' is below the minimum"),
    # (as --world-size: a huge value built that many Process objects, then hung or ran out of memory)
    ("EP_RUNTIME_DEMO_WORLD_SIZE", str(2 ** 21), f"EP_RUNTIME_DEMO_WORLD_SIZE='{2 ** 21}' is above the maximum"),
]


@pytest.mark.parametrize("name,value,message", KNOB_CASES)
def test_invalid_knob_fails_init_distributed_before_any_group(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as err:
        ep.init_distributed(backend="gloo")
    assert message in str(err.value)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("bad", [0, 0.5, -1.0, float("nan"), float("inf"), 1e20])
def test_init_distributed_timeout_argument_is_checked(bad):
    with pytest.raises(ValueError, match=re.escape(f"timeout_s={bad!r}; allowed: 1 <= seconds <= 1e+09")):
        ep.init_distributed(backend="gloo", timeout_s=bad)
    with pytest.raises(TypeError, match="timeout_s='5' must be a number of seconds"):
        ep.init_distributed(backend="gloo", timeout_s="5")
    assert not torch.distributed.is_initialized()
    group = ep.init_distributed(backend="gloo")  # a second call returns the group, but checks its argument too
    try:
        with pytest.raises(ValueError, match=re.escape(f"timeout_s={bad!r}; allowed: 1 <= seconds <= 1e+09")):
            ep.init_distributed(backend="gloo", timeout_s=bad)
        assert ep.init_distributed(backend="gloo", timeout_s=300) is group  # the timeout it was made with
        assert ep.init_distributed(backend="gloo", timeout_s=np.int64(300)) is group  # numpy's numbers are numbers
    finally:
        ep.destroy_distributed()
    group = ep.init_distributed(backend="gloo", timeout_s=2.5)
    try:
        assert ep.init_distributed(backend="gloo", timeout_s=np.float32(2.5)) is group
    finally:
        ep.destroy_distributed()
    assert ep.distributed.check_timeout(np.float32(2.5)) == 2.5


def test_second_init_distributed_refuses_another_timeout():
    """A second call with another timeout_s than the group was made with raises naming both (it was ignored
    without a word: the group and ep-runtime's waits kept the first timeout)."""
    group = ep.init_distributed(backend="gloo", timeout_s=30)
    try:
        message = ("timeout_s=5, but the default process group exists with timeout_s=30; allowed: None or 30 "
                   "(it is returned as it is), or ep.destroy_distributed() first")
        with pytest.raises(ValueError, match=re.escape(message)):
            ep.init_distributed(backend="gloo", timeout_s=5)
        assert ep.distributed.timeout_s() == 30
        assert ep.init_distributed(backend="gloo") is group and ep.init_distributed(timeout_s=30.0) is group
    finally:
        ep.destroy_distributed()


def test_numpy_integers_are_taken_as_ints():
    """Where an int is taken, a numpy integer is too (they were refused as not an int)."""
    from ep_runtime import hf
    placement = ep.ExpertPlacement.with_redundant_experts(8, np.int64(4), ep_size=2, rank=1)
    assert placement.num_physical_experts == 12 and type(placement.num_physical_experts) is int
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    assert torch.equal(layer.gather_experts(dst=np.int64(0)).w13, layer.gather_experts().w13)
    assert hf.export_state_dict(torch.nn.Linear(2, 2), dst=np.int32(0)).keys() == {"weight", "bias"}


JUNK = ["", "0", "-1", "1", "7", "1e9", "1e20", "abc", "nan", "inf", "-inf", "--", "1.5", " 3 ", "\t", "-0",
        "99999999999999999999", "\u00fc", "None", "True", "yes", "0x10", "1_0", "auto", "torch", "triton"]


def test_fuzz_knob_values(monkeypatch):
    """Every knob x junk value (and seeded random strings): the registry returns a value of the
    knob's type inside its range, or raises a ValueError naming the variable and what is allowed."""
    rng = random.Random(8)
    alphabet = "0123456789.-+eE_xnaifINF \t"
    values = JUNK + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(40)]
    for name, knob in ep.envs.KNOBS.items():
        for value in values:
            monkeypatch.setenv(name, value)
            try:
                got = ep.envs.get(name)
            except ValueError as err:
                assert f"{name}={value!r}" in str(err) and "allowed" in str(err), str(err)
                continue
            if value.strip() == "":  # empty or blank: unset, the default
                assert got == knob.default
                continue
            assert isinstance(got, knob.type), (name, value, got)
            if knob.type is float:
                assert math.isfinite(got), (name, value, got)
            assert knob.minimum is None or got >= knob.minimum, (name, value, got)
            assert knob.maximum is None or got <= knob.maximum, (name, value, got)
            assert knob.choices is None or got in knob.choices, (name, value, got)
            if name == "EP_RUNTIME_TIMEOUT_S":
                timedelta(seconds=got)  # what init_distributed hands torch.distributed


# ---------------------------------------------------------------- the CLI

def _cli(args, env=None, timeout=120):
    full = dict(os.environ, **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_ID"):
        full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "ep_runtime", *args], capture_output=True, text=True,
                          timeout=timeout, env=full)


def _cli_fuzz_cases(n: int, seed: int = 8) -> list[list[str]]:
    """Seeded invalid command lines (values the parser must reject: no demo actually runs)."""
    rng = random.Random(seed)
    not_positive = ["0", "-1", "1e9", "abc", "nan", "", "1.5", "--", "\u00fc", "0x10"]
    makers = [
        lambda: ["demo", "--world-size", rng.choice(not_positive)],
        lambda: ["demo", "--tokens", rng.choice(not_positive)],
        lambda: ["demo", rng.choice(["--world", "--bogus", "-x", "extra"])],
        lambda: ["env", rng.choice(["junk", "--md", "-1"])],
        lambda: [rng.choice(["", "dem", "Demo", "--", "-h-", "bnech"])],
        lambda: ["bench", "--" + rng.choice(["nope", "world-size", "tokens"])],
        lambda: [],
    ]
    return [rng.choice(makers)() for _ in range(n)]


def test_fuzz_cli_arguments(capsys):
    """Each invalid command line exits 2 with an argparse error naming what was wrong: many cases
    through cli.main in this process, the first through the real console entry point."""
    from ep_runtime.cli import main
    cases = _cli_fuzz_cases(60)
    for args in cases:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "error:" in err.strip().splitlines()[-1], f"{args}: {err}"
    for args in cases[:1]:
        out = _cli(args)
        context = f"{args}: rc={out.returncode}\n{out.stderr[-1500:]}"
        assert out.returncode == 2 and "error:" in out.stderr.strip().splitlines()[-1], context
        assert "Traceback" not in out.stderr, context


def _cli_in_process(args, env, monkeypatch, capsys):
    """(exit code, stdout, stderr) of cli.main(args) in this process with env set: what the console
    entry point exits with and prints, less a fresh interpreter (about 7 s each on the CI machine)."""
    from ep_runtime.cli import main
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name,value", [("EP_RUNTIME_TIMEOUT_S", "nan"), ("EP_RUNTIME_RUNNER", "cuda"),
                                        ("EP_RUNTIME_DEMO_WORLD_SIZE", "-2")])
def test_bad_knob_value_fails_the_cli_naming_it(name, value, monkeypatch, capsys):
    """In this process (a bad knob through the console entry point in a fresh interpreter: the first
    case of test_cli_user_errors_are_one_line_without_a_traceback)."""
    code, _, err = _cli_in_process(["env"], {name: value}, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code != 0 and f"{name}={value!r}" in last and "allowed" in last, err


CLI_USER_ERRORS = [
    (["env"], {"EP_RUNTIME_TIMEOUT_S": "soon"}, "EP_RUNTIME_TIMEOUT_S='soon' is not a valid float"),
    (["demo", "--world-size", "1", "--runner", "nope"], {}, "--runner nope: unknown; allowed: auto, "),
    (["demo", "--world-size", "1", "--tokens", "99999999999999999999"], {}, "--tokens"),
]


@pytest.mark.parametrize("args,env,expected", CLI_USER_ERRORS)
def test_cli_user_errors_are_one_line_without_a_traceback(args, env, expected, monkeypatch, capsys):
    """Each case through cli.main in this process; the first (a bad knob) also through the console
    entry point in a fresh interpreter, where a knob read at import or an abort at interpreter exit
    would show (a bad argument through it: test_fuzz_cli_arguments)."""
    code, _, err = _cli_in_process(args, env, monkeypatch, capsys)
    assert code != 0 and expected in err, err[-1500:]
    assert "Traceback" not in err and "frame #" not in err, err[-1500:]
    if (args, env, expected) == CLI_USER_ERRORS[0]:
        out = _cli(args, env)
        assert out.returncode != 0 and expected in out.stderr, out.stderr[-1500:]
        assert "Traceback" not in out.stderr and "frame #" not in out.stderr, out.stderr[-1500:]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
