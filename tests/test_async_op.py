"""dispatch/combine(async_op=True) return (output, work) as DESIGN.md fixes, for every dispatcher:
the output equals the synchronous call's and work.wait() orders the caller after the exchange."""
import threading
import time

import pytest
import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.distributed import free_port
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import CombineInput, MoeRunner
from ep_runtime.testing import make_problem, run_ranks, tolerance

OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 16}, "mori": {"max_dispatch_tokens_per_rank": 16}}


def _async_rank(rank, world_size, name):
    d = ep.dispatchers.create(name, ep.MoeConfig(8, 2, 32, 16), **OPTIONS.get(name, {}))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(9, 32, generator=gen)
    topk = ep.TopKOutput(torch.rand(9, 8, generator=gen).topk(2, dim=1).indices.int(), torch.rand(9, 2, generator=gen))
    sync = d.dispatch(x, topk)
    out, work = d.dispatch(x, topk, async_op=True)
    work.wait()
    rows = out.hidden_states if name == "standard" else out.recv_x
    y_sync = d.combine(CombineInput(rows * 2, sync))
    y, work = d.combine(CombineInput(rows * 2, out), async_op=True)
    work.wait()
    # deepep_ll's rows past masked_m hold no data: compare its combined result only
    same_rows = name == "deepep_ll" or torch.equal(rows, sync.hidden_states if name == "standard" else sync.recv_x)
    return same_rows and torch.equal(y, y_sync) and work.is_completed()


@pytest.mark.parametrize("name", ep.dispatchers.registered())
def test_async_op_returns_output_and_work(name):
    assert all(run_ranks(_async_rank, 2, name, timeout=120))


def test_a_resolved_option_cannot_be_changed_in_place():
    """Options are checked across ranks when a dispatcher is built: assigning one later is an error
    naming it, not a silent divergence between the dispatcher and its settings."""
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 32, 16), alignment=2)
    with pytest.raises(AttributeError, match=r"alignment is a resolved option .* build a new one with alignment=4"):
        d.alignment = 4
    assert d.alignment == 2 and d.options.alignment == 2


def _exchange_threads() -> int:
    return sum(t.name.startswith("ep-runtime-exchange") for t in threading.enumerate())


def _async_after_reinit_rank(rank, world_size, port):
    """A long-lived process: layers on a group, ep.destroy_distributed(), a new default group and new
    layers, async exchanges on each. The old group's exchange thread ends with its group (it held the
    group, and with it its connections, for the life of the process); the new layers' outputs equal
    the float64 reference."""
    errors, threads = [], []
    for generation in range(2):
        if generation:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
        problem = make_problem(layer.config, [5, 7], seed=generation, ep_size=world_size)
        layer.load_experts(problem.w13.float(), problem.w2.float())
        topk = ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])
        with torch.no_grad():
            out, work = layer.dispatcher.dispatch(problem.xs[rank].float(), topk, async_op=True)
            work.wait()
            y = layer.dispatcher.combine(layer.runner.run(out, layer.weights))
        want = moe_reference(problem.xs[rank], problem.topk_ids[rank], problem.topk_weights[rank].double(),
                             problem.w13, problem.w2, layer.config)
        errors.append(rel_err(y.double(), want))
        threads.append(_exchange_threads())
        ep.destroy_distributed()
    deadline = time.monotonic() + 5
    while _exchange_threads() and time.monotonic() < deadline:  # each ends after its last exchange
        time.sleep(0.01)
    return errors, threads, _exchange_threads()


def test_exchange_threads_end_with_their_group():
    for errors, threads, left in run_ranks(_async_after_reinit_rank, 2, free_port(), timeout=120):
        assert max(errors) < tolerance(torch.float32), errors
        assert threads == [1, 1] and left == 0, (threads, left)


WAIT_TIMEOUT_S = 2  # the waits' timeout below; the group's own (gloo's) is 60 s


def _never_joins_rank(rank, world_size, how):
    """Rank 1 never joins rank 0's async dispatch (it stays alive, waiting on the store): rank 0's
    work.wait() gives up after the timeout given to it (`how`: a number, a timedelta, or
    EP_RUNTIME_TIMEOUT_S), not after the group's own 60 s, with an ep.PeerFailure naming the dispatcher,
    the peer and the timeout; the group is then marked failed (the next call raises at once). Rank 1 then
    leaves; rank 0's pending exchange ends with the lost connection, which the work reports."""
    from datetime import timedelta

    store = dist.distributed_c10d._get_default_store()
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 32, 16))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(5, 32, generator=gen)
    topk = ep.TopKOutput(torch.rand(5, 8, generator=gen).topk(2, dim=1).indices.int(), torch.rand(5, 2, generator=gen))
    d.dispatch(x, topk)  # both ranks are in step up to here
    if rank == 1:
        store.get("rank 0 gave up")  # alive, never dispatching again
        return None
    out, work = d.dispatch(x, topk, async_op=True)
    future = work.get_future()
    start = time.monotonic()
    try:
        if how == "knob":
            with ep.envs.overridden("TIMEOUT_S", WAIT_TIMEOUT_S):
                work.wait()
        else:
            work.wait(timeout=timedelta(seconds=WAIT_TIMEOUT_S) if how == "timedelta" else WAIT_TIMEOUT_S)
        failure = None
    except ep.PeerFailure as err:
        failure = str(err)
    waited = time.monotonic() - start
    pending = not work.is_completed() and not future.done()
    start = time.monotonic()
    try:
        d.dispatch(x, topk)
        later = None
    except ep.PeerFailure as err:
        later = str(err)
    refused_in = time.monotonic() - start
    store.set("rank 0 gave up", "1")
    deadline = time.monotonic() + 30  # rank 1's process ends: the pending exchange loses its connection
    while not work.is_completed() and time.monotonic() < deadline:
        time.sleep(0.01)
    ended = work.is_completed() and not work.is_success() and work.exception() is not None
    return failure, waited, pending, later, refused_in, ended


@pytest.mark.parametrize("how", ["seconds", "timedelta", "knob"])
def test_wait_gives_up_after_its_timeout_when_a_peer_never_joins(how):
    started = time.monotonic()
    failure, waited, pending, later, refused_in, ended = run_ranks(_never_joins_rank, 2, how, timeout=60)[0]
    assert failure is not None, "work.wait() returned although rank 1 never joined"
    assert WAIT_TIMEOUT_S - 0.1 <= waited < WAIT_TIMEOUT_S + 1.5, waited
    setting = "EP_RUNTIME_TIMEOUT_S" if how == "knob" else f"timeout={WAIT_TIMEOUT_S} s given to work.wait()"
    assert failure.startswith("deepep_normal dispatch on rank 0 of 2: work.wait() waited in vain for rank 1: "
                              "the exchange had not completed within the timeout ("), failure
    assert setting in failure and f"{WAIT_TIMEOUT_S} s" in failure, failure
    assert pending, "the exchange should still be pending when the wait gave up"
    assert later is not None and "this group failed earlier" in later and refused_in < 1.0, (later, refused_in)
    assert ended
    assert time.monotonic() - started < 40


def _future_rank(rank, world_size):
    """torch.distributed.Work's surface on a completed exchange: get_future()'s value and result() are the
    output's own tensors, is_success() and exception() report no error; a bad timeout is named."""
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 32, 16))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(9, 32, generator=gen)
    topk = ep.TopKOutput(torch.rand(9, 8, generator=gen).topk(2, dim=1).indices.int(), torch.rand(9, 2, generator=gen))
    sync = d.dispatch(x, topk)
    out, work = d.dispatch(x, topk, async_op=True)
    got = work.get_future().wait()
    fields = [out.recv_x, out.recv_topk_ids, out.recv_topk_weights, out.num_recv_tokens_per_expert_tensor]
    same = torch.equal(out.recv_x, sync.recv_x) and work.is_success() and work.exception() is None
    same = same and [id(t) for t in got] == [id(t) for t in work.result()] == [id(t) for t in fields]
    y, work = d.combine(CombineInput(out.recv_x * 2, out), async_op=True)
    [got] = work.get_future().wait()
    same = same and got is y and torch.equal(y, d.combine(CombineInput(sync.recv_x * 2, sync)))
    errors = []
    for bad in (0.5, float("inf"), "2"):
        try:
            work.wait(timeout=bad)
        except (TypeError, ValueError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    return same, errors


def test_work_offers_torch_work_surface():
    for same, errors in run_ranks(_future_rank, 2, timeout=60):
        assert same
        assert errors == ["ValueError: timeout=0.5; allowed: 1 <= seconds <= 1e+09 (the range of EP_RUNTIME_TIMEOUT_S)",
                          "ValueError: timeout=inf; allowed: 1 <= seconds <= 1e+09 (the range of EP_RUNTIME_TIMEOUT_S)",
                          "TypeError: timeout='2' must be a number of seconds (int or float)"], errors


def _callback_rank(rank, world_size):
    """A get_future() callback runs on the group's exchange thread (CPU ranks): a synchronous combine made there
    equals the one made outside, at once (queued behind the callback, it waited for itself until the timeout,
    then raised ep.PeerFailure blaming the peer and marked the group failed); waiting there for an exchange queued
    behind the callback raises at once naming the misuse, and the group goes on."""
    config = ep.MoeConfig(8, 2, 32, 16)
    problem = make_problem(config, [13, 9], seed=2, ep_size=world_size)
    x, topk = problem.xs[rank].float(), ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])
    want = moe_reference(problem.xs[rank], problem.topk_ids[rank], problem.topk_weights[rank].double(),
                         problem.w13, problem.w2, config)
    results, start = [], time.monotonic()
    with torch.no_grad(), ep.envs.overridden("TIMEOUT_S", 3):
        for name in ("deepep_normal", "deepep_ll", "mori"):
            d = ep.dispatchers.create(name, config, **OPTIONS.get(name, {}))
            runner = MoeRunner(ep.runners.create("torch", config), config, d.placement)
            mine = d.placement.local_expert_ids()
            weights = ep.ExpertWeights(problem.w13.float()[mine], problem.w2.float()[mine])
            expected = d.combine(runner.run(d.dispatch(x, topk), weights))
            got = {}

            def then(future, d=d, runner=runner, weights=weights, got=got):
                try:
                    got["y"] = d.combine(runner.run(got["out"], weights))
                    got["y2"], got["work"] = d.combine(runner.run(got["out"], weights), async_op=True)
                    got["work"].wait()
                except Exception as err:  # noqa: BLE001 - what the callback met is the result
                    got["error"] = f"{type(err).__name__}: {err}"
            got["out"], work = d.dispatch(x, topk, async_op=True)
            work.get_future().then(then).wait()
            if "work" not in got:  # the synchronous combine in the callback failed
                return got["error"], time.monotonic() - start
            got["work"].wait()  # outside the callback: completes
            results.append((torch.equal(got["y"], expected), torch.equal(got["y2"], expected),
                            rel_err(got["y"].double(), want), got.get("error", "")))
    return results, time.monotonic() - start


def test_calls_from_a_future_callback_run_at_once_or_name_the_wait():
    for results, elapsed in run_ranks(_callback_rank, 2, timeout=60):
        assert isinstance(results, list), results
        assert elapsed < 2.5, elapsed
        for same, same_async, err, error in results:
            assert same and same_async and err <= tolerance(torch.float32), (same, same_async, err)
            assert error.startswith("RuntimeError: work.wait() of a combine called on its group's exchange thread "
                                    "(from a get_future() callback)"), error
