import re
from pathlib import Path

import pytest

from ep_runtime import envs

ROOT = Path(__file__).resolve().parents[1]


def test_docs_are_generated_from_the_registry():
    doc = (ROOT / "docs" / "environment_variables.md").read_text()
    assert doc == envs.markdown(), "regenerate with `make docs` (ep-runtime env --markdown)"


def test_no_module_reads_os_environ_outside_the_registry():
    # any use of the names environ / getenv (the word, not "environment"): the substrings "os.environ" and
    # "os.getenv" missed `from os import environ, getenv` and `import os as _os; _os.environ`
    offenders = []
    for folder in ("ep_runtime", "dispatchers", "runners"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "envs.py":
                continue
            if re.search(r"\b(environ|environb|getenv|getenvb)\b", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_defaults_and_typed_values(monkeypatch):
    monkeypatch.delenv("EP_RUNTIME_TIMEOUT_S", raising=False)
    assert envs.get("TIMEOUT_S") == 300.0
    monkeypatch.setenv("EP_RUNTIME_TIMEOUT_S", "12.5")
    assert envs.get("EP_RUNTIME_TIMEOUT_S") == 12.5


@pytest.mark.parametrize("name,value,match", [
    ("EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS", "abc", r"EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS='abc' is not a valid int"),
    ("EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS", "-3", r"'-3' is below the minimum; allowed: int >= 0"),
    ("EP_RUNTIME_TIMEOUT_S", "0", r"EP_RUNTIME_TIMEOUT_S='0' is below the minimum; allowed: float >= 1"),
    ("EP_RUNTIME_RUNNER", "cuda", r"EP_RUNTIME_RUNNER='cuda' is not allowed; allowed: auto, torch, triton, masked"),
    # beyond int32 (the count table's): failed deep inside torch ("int too big to convert") at the first dispatch
    ("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", str(2 ** 64),
     r"'18446744073709551616' is above the maximum; allowed: int >= 1 and <= 2147483647"),
])
def test_invalid_values_name_the_variable(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        envs.get(name)
    with pytest.raises(ValueError, match=match):
        envs.validate_all()


def test_overridden_sets_a_knob_inside_the_block_and_restores_it(monkeypatch):
    """envs.overridden: the value inside the block, the earlier value (or none) after it, also when the block
    raises; a bad value is refused as the knob's parser refuses it, before anything is set."""
    monkeypatch.delenv("EP_RUNTIME_TRITON_FP8_GEMM", raising=False)
    with envs.overridden("TRITON_FP8_GEMM", "gluon"):
        assert envs.get("TRITON_FP8_GEMM") == "gluon"
    assert envs.get("TRITON_FP8_GEMM") == "auto" and "EP_RUNTIME_TRITON_FP8_GEMM" not in envs.os.environ
    monkeypatch.setenv("EP_RUNTIME_SCRATCH_MB", "64")
    with pytest.raises(RuntimeError, match="inside"), envs.overridden("SCRATCH_MB", 0):
        assert envs.get("SCRATCH_MB") == 0
        raise RuntimeError("inside")
    assert envs.get("SCRATCH_MB") == 64
    with pytest.raises(ValueError, match="EP_RUNTIME_TRITON_FP8_GEMM='cublas' is not allowed"):
        with envs.overridden("TRITON_FP8_GEMM", "cublas"):
            pass
    assert envs.get("TRITON_FP8_GEMM") == "auto"


def test_is_set_tells_a_chosen_value_from_the_default(monkeypatch):
    """A value equal to the default still counts as set (the user chose it); empty reads as unset, as get does."""
    monkeypatch.delenv("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", raising=False)
    assert not envs.is_set("LL_MAX_DISPATCH_TOKENS_PER_RANK")
    monkeypatch.setenv("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", "128")
    assert envs.is_set("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK") and envs.is_set("LL_MAX_DISPATCH_TOKENS_PER_RANK")
    monkeypatch.setenv("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", "")
    assert not envs.is_set("LL_MAX_DISPATCH_TOKENS_PER_RANK")
    with pytest.raises(KeyError, match="unknown knob EP_RUNTIME_NOPE"):
        envs.is_set("NOPE")


def test_unknown_knob():
    with pytest.raises(KeyError, match="unknown knob EP_RUNTIME_NOPE"):
        envs.get("NOPE")


def test_a_mistyped_variable_is_reported(monkeypatch, capsys):
    from ep_runtime import cli
    monkeypatch.setenv("EP_RUNTIME_MORI_MAX_INPUT_TOKENS", "64")  # the knob is ..._MORI_MOE_MAX_INPUT_TOKENS
    assert "EP_RUNTIME_MORI_MAX_INPUT_TOKENS" in envs.unknown()
    assert not set(envs.unknown()) & set(envs.KNOBS)
    monkeypatch.setattr(envs, "_WARNED", set())  # as in a fresh process
    with pytest.warns(UserWarning, match=r"ignoring unknown variable EP_RUNTIME_MORI_MAX_INPUT_TOKENS \(did you mean "
                                         r"EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS\?\)"):
        envs.validate_all()
    assert cli.main(["env"]) == 0
    assert ("EP_RUNTIME_MORI_MAX_INPUT_TOKENS  (unknown: not an ep-runtime knob, ignored) (did you mean "
            "EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS?)") in capsys.readouterr().out


def test_unknown_variable_warning_once_per_process_and_on_rank_0_only(monkeypatch, recwarn):
    """The unknown-knob warning comes once per process, on rank 0 only, with a did-you-mean."""
    monkeypatch.setattr(envs, "_WARNED", set())
    monkeypatch.setenv("EP_RUNTIME_RUNNERS", "torch")  # the knob is EP_RUNTIME_RUNNER
    envs.validate_all(warn=False)  # what every rank but 0 does
    assert len(recwarn) == 0
    for _ in range(3):
        envs.validate_all()
    messages = [str(w.message) for w in recwarn]
    assert messages == ["ignoring unknown variable EP_RUNTIME_RUNNERS (did you mean EP_RUNTIME_RUNNER?): no such "
                        "ep-runtime knob (`ep-runtime env` lists them)"], messages
    monkeypatch.setenv("EP_RUNTIME_ZZZZZZ", "1")  # a new one is reported; no knob is close to it
    envs.validate_all()
    assert [str(w.message) for w in recwarn][1:] == [
        "ignoring unknown variable EP_RUNTIME_ZZZZZZ: no such ep-runtime knob (`ep-runtime env` lists them)"]


def test_unknown_variable_is_reported_by_rank_0_of_a_job_only():
    import os
    import subprocess
    import sys

    from ep_runtime.distributed import free_port
    code = "import ep_runtime as ep; ep.init_distributed(backend='gloo'); ep.destroy_distributed()"
    env = dict(os.environ, EP_RUNTIME_RUNNERS="torch", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "did you mean EP_RUNTIME_RUNNER?" in errs[0] and "EP_RUNTIME_RUNNERS" not in errs[1], errs


def test_a_runner_from_the_runner_knob_that_cannot_build_names_the_knob(monkeypatch):
    """EPMoE(runner="auto") takes EP_RUNTIME_RUNNER; where that backend cannot run here (triton without CUDA
    or TRITON_INTERPRET) or cannot compute the layer (float64), the error named runner='triton', a name the
    caller never wrote."""
    import torch

    import ep_runtime as ep
    monkeypatch.setenv("EP_RUNTIME_RUNNER", "triton")
    with pytest.raises((RuntimeError, ValueError), match=r"runner='triton'.*\(runner='auto' took "
                                                         r"EP_RUNTIME_RUNNER='triton': unset it, or pass runner=\.\.\.\)$"):
        ep.EPMoE(8, 2, 16, 8, dispatcher="standard", dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError)) as explicit:  # named by the caller: nothing to add
        ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="triton", dtype=torch.float64)
    assert "EP_RUNTIME_RUNNER" not in str(explicit.value)
    monkeypatch.setenv("EP_RUNTIME_RUNNER", "torch")
    assert ep.EPMoE(8, 2, 16, 8, dispatcher="standard", dtype=torch.float64).runner.backend.name == "torch"


def test_fp8_experts_the_runner_knobs_backend_refuses_name_the_knob(monkeypatch):
    """runner='triton' takes no GEMM hooks with fp8 experts, refused when the layer is built with quant_config
    (RunnerBackend.check_quant). Where EP_RUNTIME_RUNNER chose triton for runner='auto', that error named
    runner='triton' alone, a name the caller never wrote, as the backend's other refusals no longer do."""
    import torch

    import ep_runtime as ep
    if "triton" not in ep.runners.available():
        pytest.skip("runner='triton' cannot run here (triton with CUDA or TRITON_INTERPRET=1)")
    hooks = ep.runners.GemmHooks(after_gemm1=lambda inputs, outputs, expert_index: None)
    monkeypatch.setenv("EP_RUNTIME_RUNNER", "triton")
    with pytest.raises(ValueError, match=r"^runner='triton' with quantized \(fp8\) experts takes no GEMM hooks; use "
                                         r"runner='torch' \(runner='auto' took EP_RUNTIME_RUNNER='triton': unset it, "
                                         r"or pass runner=\.\.\.\)$"):
        ep.EPMoE(8, 2, 256, 128, dispatcher="standard", dtype=torch.bfloat16, hooks=hooks,
                 quant_config=ep.QuantConfig())
    layer = ep.EPMoE(8, 2, 256, 128, dispatcher="standard", dtype=torch.bfloat16, hooks=hooks)  # and its fp8 load
    with pytest.raises(ValueError, match=r"takes no GEMM hooks; use runner='torch' \(runner='auto' took "
                                         r"EP_RUNTIME_RUNNER='triton': unset it, or pass runner=\.\.\.\)$"):
        layer.load_experts(torch.randn(8, 256, 256), torch.randn(8, 256, 128), quantize="fp8_block")
    with pytest.raises(ValueError) as explicit:  # named by the caller: nothing to add
        ep.EPMoE(8, 2, 256, 128, dispatcher="standard", runner="triton", dtype=torch.bfloat16, hooks=hooks,
                 quant_config=ep.QuantConfig())
    assert str(explicit.value) == "runner='triton' with quantized (fp8) experts takes no GEMM hooks; use runner='torch'"


def test_env_lists_every_knob_marking_each_invalid_value(monkeypatch, capsys):
    """`ep-runtime env` with bad values: it printed the first bad knob's error alone (no listing, and the next
    bad knob only after fixing that one). Now the listing marks each invalid value, and the error names all."""
    from ep_runtime import cli
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EP_RUNTIME_TIMEOUT_S", "0")
    monkeypatch.setenv("EP_RUNTIME_NUM_SMS", "many")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["env"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    for name in envs.KNOBS:
        assert name in out
    assert ("EP_RUNTIME_TIMEOUT_S=0  (default 300.0)\n    Seconds a collective may wait" in out
            and "    INVALID: environment variable EP_RUNTIME_TIMEOUT_S='0' is below the minimum; allowed: float >= 1"
            in out), out
    assert "    INVALID: environment variable EP_RUNTIME_NUM_SMS='many' is not a valid int; allowed: int >= 0" in out
    assert "EP_RUNTIME_TIMEOUT_S='0'" in err and "EP_RUNTIME_NUM_SMS='many'" in err and "Traceback" not in err, err


@pytest.mark.parametrize("typo,knob", [("EP_RUNTIME_timeout_s", "EP_RUNTIME_TIMEOUT_S"),
                                       ("EP_RUNTIME_Num_Sms", "EP_RUNTIME_NUM_SMS")])
def test_a_variable_in_the_wrong_case_gets_the_knobs_name(typo, knob):
    """EP_RUNTIME_timeout_s was reported as unknown with no suggestion: the comparison was case-sensitive."""
    assert envs.suggestion(typo) == f" (did you mean {knob}?)"


def test_describe_shows_an_empty_value_as_empty(monkeypatch):
    """EP_RUNTIME_TIMEOUT_S set to '' was listed by `ep-runtime env` as '(unset)' though it is in the
    environment; it reads as the default, and the listing now says both."""
    monkeypatch.setenv("EP_RUNTIME_TIMEOUT_S", "")
    monkeypatch.delenv("EP_RUNTIME_NUM_SMS", raising=False)
    rows = {name: value for name, value, _, _ in envs.describe()}
    assert rows["EP_RUNTIME_TIMEOUT_S"] == "'' (empty: the default)" and rows["EP_RUNTIME_NUM_SMS"] == "(unset)"
    assert envs.get("TIMEOUT_S") == 300.0


@pytest.mark.parametrize("raw", ["", " ", "\t", "  \n"])
def test_an_empty_or_blank_value_is_the_default_for_every_knob(monkeypatch, raw):
    """`EP_RUNTIME_X=` in a script means unset: '' read as the default, but ' ' failed ("not a valid int", and
    for a choice knob "not allowed"). Now both are unset everywhere: get, is_set, validate_all and the listing."""
    for name, knob in envs.KNOBS.items():
        monkeypatch.setenv(name, raw)
        assert envs.get(name) == knob.default and not envs.is_set(name), name
    envs.validate_all(warn=False)
    assert {value for _, value, _, _ in envs.describe()} == {f"{raw!r} (empty: the default)"}


@pytest.mark.parametrize("name,raw,value", [
    ("EP_RUNTIME_HIERARCHICAL", "OFF", "off"), ("EP_RUNTIME_TRANSPORT", " NCCL ", "nccl"),
    ("EP_RUNTIME_DISPATCH_FP8_SCALE_ENCODING", "UE8M0", "ue8m0"), ("EP_RUNTIME_RUNNER", "Torch", "torch"),
    ("EP_RUNTIME_TRITON_GEMM_KERNEL", "TMA_Stacked", "tma_stacked"), ("EP_RUNTIME_SYNC_CHECKS", "OFF", False),
    ("EP_RUNTIME_SYNC_CHECKS", "True", True), ("EP_RUNTIME_DISPATCH_FP8", " yes ", True),
    ("EP_RUNTIME_SCRATCH_MB", "1_024", 1024), ("EP_RUNTIME_TIMEOUT_S", "1e3", 1000.0),
])
def test_values_are_read_as_documented(monkeypatch, name, raw, value):
    """Booleans were read in any case (OFF) but named choices only in lower case (EP_RUNTIME_HIERARCHICAL=OFF was
    'not allowed'); a choice comes back as the registry spells it."""
    monkeypatch.setenv(name, raw)
    assert envs.get(name) == value and type(envs.get(name)) is type(value)


@pytest.mark.parametrize("name,raw,match", [
    ("EP_RUNTIME_NUM_SMS", "0x10", r"EP_RUNTIME_NUM_SMS='0x10' is not a valid int; allowed: int >= 0 and <= 1024"),
    ("EP_RUNTIME_SCRATCH_MB", "2.0", r"EP_RUNTIME_SCRATCH_MB='2.0' is not a valid int; allowed: int >= 0"),
    ("EP_RUNTIME_SYNC_CHECKS", "2", r"EP_RUNTIME_SYNC_CHECKS='2' is not a valid bool; allowed: 0, 1, true"),
    ("EP_RUNTIME_HIERARCHICAL", "of", r"EP_RUNTIME_HIERARCHICAL='of' is not allowed; allowed: auto, on, off"),
    # (int() and float() read other scripts' digits: Arabic-Indic three and fullwidth one were taken as 3 and 1)
    ("EP_RUNTIME_NUM_SMS", "\u0663", r"EP_RUNTIME_NUM_SMS='\u0663' is not a valid int"),
    ("EP_RUNTIME_TIMEOUT_S", "\uff11\uff10", r"EP_RUNTIME_TIMEOUT_S='\uff11\uff10' is not a valid float"),
    # (no maximum: 2**40 passed the registry, then failed as ranks_per_node=..., an argument never given)
    ("EP_RUNTIME_RANKS_PER_NODE", str(2 ** 40), r"EP_RUNTIME_RANKS_PER_NODE='1099511627776' is above the maximum; "
                                                r"allowed: int >= 0 and <= 1048576"),
])
def test_awkward_values_fail_naming_the_variable_value_and_allowed(monkeypatch, name, raw, match):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=match):
        envs.get(name)


def _build_with_a_knob_on_rank_1(rank, world_size, name, raw):
    import os

    import ep_runtime as ep
    if rank == 1:
        os.environ[name] = raw  # this worker process only
    try:
        ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    except ValueError as err:
        return str(err)
    return "built"


@pytest.mark.parametrize("name,raw", [("EP_RUNTIME_SCRATCH_MB", "lots"), ("EP_RUNTIME_TRITON_GEMM_SCHEDULE", "fast")])
def test_a_knob_read_at_each_call_invalid_on_one_rank_fails_every_rank_at_build(name, raw):
    """A knob read only at each call (not a dispatcher option) set to a bad value on one rank: the layer built on
    every rank, the value was never noticed on CPU ranks, and on GPUs that rank raised between dispatch and combine
    while the others waited in combine until the timeout. Now every rank's build fails at once, naming it."""
    from ep_runtime.testing import run_ranks
    results = run_ranks(_build_with_a_knob_on_rank_1, 2, name, raw, timeout=60, group_timeout=300)
    assert all(f"{name}={raw!r}" in result for result in results), results
    assert "rank 1 could not build its layer or dispatcher" in results[0], results


def test_a_knob_invalid_on_one_rank_fails_init_distributed_on_every_rank_at_once():
    """init_distributed checked the knobs before the rendezvous: the rank with a bad value raised, and its peers
    waited in the rendezvous for EP_RUNTIME_TIMEOUT_S, then read that a rank was never started. Now every rank
    joins, and all raise at once naming the rank and the value; the group is destroyed."""
    import os
    import subprocess
    import sys
    import time

    from ep_runtime.distributed import free_port
    code = ("import ep_runtime as ep, torch.distributed as dist\n"
            "try:\n    ep.init_distributed(backend='gloo')\n"
            "except ValueError as err:\n    print(err)\n    assert not dist.is_initialized()\n")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               EP_RUNTIME_TIMEOUT_S="60")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r),
                                       **({"EP_RUNTIME_SCRATCH_MB": "lots"} if r == 1 else {})))
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert time.monotonic() - start < 40, "the good rank waited for the timeout"
    for out, _ in outs:
        assert ("rank 1: environment variable EP_RUNTIME_SCRATCH_MB='lots' is not a valid int; allowed: int >= 0 "
                "(every rank stops in init_distributed; the group is destroyed)") in out, outs


def _init_with_env_per_rank(env_per_rank):
    """Start init_distributed on 2 gloo processes, rank r with env_per_rank[r] added; each one's stdout."""
    import os
    import subprocess
    import sys

    from ep_runtime.distributed import free_port
    code = ("import ep_runtime as ep, torch.distributed as dist\n"
            "try:\n    ep.init_distributed(backend='gloo')\n    print('joined')\n    ep.destroy_distributed()\n"
            "except ep.distributed.KnobsError as err:\n    print(err)\n    assert not dist.is_initialized()\n")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               EP_RUNTIME_TIMEOUT_S="60")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r), **env_per_rank[r])) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return [out for out, _ in outs]


def test_a_knob_that_differs_between_ranks_fails_init_distributed_on_every_rank():
    """A knob that must agree across ranks (fp8 dispatch, buffer sizes, transport) set on one rank only: every
    rank joined, and the layers' exchanges paired different byte counts (or the build's check came late, after
    collectives of their own). Now the knob check's one all_gather compares them: every rank raises KnobsError
    naming the knob and each rank's value. Equal values written differently (0 and the default False) agree."""
    outs = _init_with_env_per_rank([{}, {"EP_RUNTIME_DISPATCH_FP8": "1", "EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK": "64"}])
    for out in outs:
        assert ("rank 1 was given a different EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK than rank 0 (rank 0 has 128, "
                "rank 1 has 64); allowed: the same EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK on every rank (every "
                "rank stops in init_distributed; the group is destroyed)") in out, outs
    outs = _init_with_env_per_rank([{"EP_RUNTIME_DISPATCH_FP8": "0", "EP_RUNTIME_TRANSPORT": "auto"},
                                    {"EP_RUNTIME_TRANSPORT": "AUTO"}])
    assert outs == ["joined\n", "joined\n"], outs


def test_a_blank_launcher_or_torch_nccl_variable_is_unset_as_a_knob_is(monkeypatch):
    """RANK=' ' failed as "not a valid int" while RANK='' read as unset, and a blank TORCH_NCCL_* variable counted as
    the user's value (init_distributed then left torch's default in force): blank is unset everywhere."""
    monkeypatch.setenv("RANK", " ")
    monkeypatch.setenv("TORCH_NCCL_DUMP_ON_TIMEOUT", "\t")
    assert envs.launcher("RANK", int) is None and envs.torch_nccl("TORCH_NCCL_DUMP_ON_TIMEOUT") is None
    monkeypatch.setenv("RANK", " 3 ")
    assert envs.launcher("RANK", int) == 3
