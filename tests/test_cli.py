"""The `ep-runtime` command: demo spawns ranks itself and joins a torchrun job; env prints the knobs."""
import os
import subprocess
import sys

import pytest
import torch


def _run(args, env_extra=None, **kw):
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kw)


def test_demo_spawns_local_ranks():
    out = _run([sys.executable, "-m", "ep_runtime", "demo", "--world-size", "2"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("demo: OK")
    assert "standard" in out.stdout


def test_env_lists_every_knob(capsys, monkeypatch):
    """Through cli.main in this process (`python -m ep_runtime` in a fresh interpreter: the demo test above;
    `env` there: test_reliability's test_cli_user_errors_are_one_line_without_a_traceback)."""
    from ep_runtime import envs
    from ep_runtime.cli import main
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["env"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for name in envs.KNOBS:
        assert name in out


@pytest.mark.parametrize("args,message", [
    (["demo", "--world-size", "0"], "0 is out of range; allowed 1..1048576"),
    (["demo", "--world-size", "two"], "'two' is not an integer"),
    (["nope"], "invalid choice: 'nope'"),
    (["env", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_cli_arguments(args, message, capsys):
    # in this process (the console entry point's own exit codes: test_reliability's CLI tests)
    from ep_runtime.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err


def test_bad_knob_value_fails_demo_with_the_name(capsys, monkeypatch):
    # in this process, before any rank starts (a bad knob through the console entry point in a fresh
    # interpreter: test_reliability's test_cli_user_errors_are_one_line_without_a_traceback)
    from ep_runtime.cli import main
    monkeypatch.setenv("EP_RUNTIME_TIMEOUT_S", "soon")
    with pytest.raises(SystemExit) as exit_:
        main(["demo"])
    out, err = capsys.readouterr()
    assert exit_.value.code != 0 and "EP_RUNTIME_TIMEOUT_S='soon' is not a valid float" in err, err
    assert out == "", out


# ---------------------------------------------------------------- user errors up front

def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("args,expected", [
    (["demo", "--runner", "nope"], "--runner nope: unknown; allowed: auto, torch"),
    (["demo", "--runner", "trition"], "(did you mean triton?)"),
    (["demo", "--tokens", "70000"], "argument --tokens: 70000 is out of range; allowed 1..65536"),
    (["bench", "--runners", "nope"], "--runners nope: unknown; allowed: torch"),
    (["bench", "--dispatchers", "deepep"], "--dispatchers deepep: unknown; allowed: deepep_ll, deepep_normal, mori, "
                                           "standard (did you mean deepep_ll or deepep_normal?)"),
    (["bench", "--dispatchers", "standard,nope"], "--dispatchers nope: unknown"),
    (["bench", "--suite", "dispatch", "--runners", "triton"], "--runners triton: cannot run here"),
    (["bench", "--plot", "out.png", "--json", "out.json"], "--plot out.png: needs matplotlib, which is not installed "
                                                           "(pip install 'ep-runtime[bench]' or matplotlib, or drop --plot"),
    (["bench", "--from-json", "out.json", "--plot", "out.png"], "or run this --from-json on a machine that has it)"),
    (["demo", "--runner", "masked"], "--runner masked: cannot run here"),
    (["bench", "--tokens", "99999999999999999999"], "argument --tokens: '99999999999999999999': give one or more "
                                                     "integers >= 0 and <= 2147483647"),
    (["bench", "--tokens", "2147483647", "--hidden", "65536"], "--tokens 2147483647 --hidden 65536: the suites would "
                                                              "draw"),
    (["bench", "--suite", "runner", "--tokens", "4", "--cuda-graph"], "--cuda-graph: this host has no CUDA device"),
    (["bench", "--tokens", "4,8,4"], "argument --tokens: '4,8,4': 4 given more than once; allowed: distinct"),
    (["bench", "--json", "/nonexistent-dir/out.json"], "--json /nonexistent-dir/out.json: cannot write it (No such"),
    (["bench", "--suite", "runner", "--markdown", "/proc/out.md"], "--markdown /proc/out.md: cannot write it ("),
])
def test_cli_user_error_is_one_line_before_any_work(args, expected, capsys, monkeypatch):
    """In process, so nothing can have started: exit 2, the last line names the flag and what is
    allowed, nothing on stdout (no rank ran), no traceback."""
    from ep_runtime import runners
    from ep_runtime.cli import main
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if "triton" in args or "masked" in args:
        if {"triton", "masked"} & set(runners.available()):
            pytest.skip("Triton runs here (GPU)")
    if "--cuda-graph" in args and torch.cuda.is_available():
        pytest.skip("CUDA here")
    if "--plot" in args and _has("matplotlib"):
        pytest.skip("matplotlib is installed")
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ep-runtime {args[0]}: error: ") and expected in last, err
    assert out == "" and "Traceback" not in err, out + err


def test_demo_sizes_deepep_ll_from_tokens(capsys, monkeypatch):
    """--tokens above deepep_ll's default M (128) used to fail inside the ranks (T > M). Through cli.main
    in this process: the ranks are spawned all the same (the console entry point: test_demo_spawns_local_ranks)."""
    from ep_runtime.cli import main
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["demo", "--world-size", "2", "--tokens", "500"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "deepep_ll" in out and out.strip().endswith("demo: OK"), out


def test_demo_sizes_static_buffers_from_tokens_unless_the_knob_is_set(monkeypatch, capsys):
    """Unset knobs: buffers of --tokens rows (smaller ones too: not mori's default 4096 x R rows). A knob the
    user set is kept as it is; below --tokens it is a one-line error before any work, naming both."""
    import torch

    from ep_runtime.cli import demo_capacity_conflicts, demo_plan, main
    cpu = torch.device("cpu")
    for name in ("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", "EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK"):
        monkeypatch.delenv(name, raising=False)
    options = {name: opts for name, _, opts in demo_plan("auto", cpu, 48)}
    assert options["deepep_ll"] == {"num_max_dispatch_tokens_per_rank": 48}, options
    assert options["mori"] == {"max_dispatch_tokens_per_rank": 48}, options
    monkeypatch.setenv("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", "256")
    monkeypatch.setenv("EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "16")
    plan = demo_plan("auto", cpu, 48)
    assert {name: opts for name, _, opts in plan}["deepep_ll"] == {} and dict(
        (name, opts) for name, _, opts in plan)["mori"] == {}, plan
    assert demo_capacity_conflicts(plan, 48) == [
        ("mori", "max_dispatch_tokens_per_rank", "MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK")]
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--tokens", "48"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err == (
        "ep-runtime demo: error: --tokens 48: above EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK=16, which sizes "
        "mori's max_dispatch_tokens_per_rank; allowed: --tokens at most 16, or set "
        "EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK to at least 48 (unset, the demo sizes it from --tokens)"), err


def test_demo_refuses_a_mori_receive_buffer_knob_below_tokens_in_one_line(monkeypatch, capsys):
    """EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS sizes mori's receive rows instead of max tokens x R; the demo's
    rank 0 sends --tokens tokens, which may all reach one rank. Set below --tokens it failed inside the ranks in a
    RankFailure traceback ('... = 4 is too small for this step'); 0 (off) is no conflict."""
    import torch

    from ep_runtime.cli import demo_capacity_conflicts, demo_plan, main
    monkeypatch.delenv("EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK", raising=False)
    monkeypatch.setenv("EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS", "0")
    assert demo_capacity_conflicts(demo_plan("torch", torch.device("cpu"), 48), 48) == []
    monkeypatch.setenv("EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS", "4")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--runner", "torch", "--tokens", "48"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err == (
        "ep-runtime demo: error: --tokens 48: above EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS=4, which sizes "
        "mori's prealloc_max_recv_tokens; allowed: --tokens at most 4, or set "
        "EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS to at least 48 (or to 0: mori's receive rows are then "
        "max_dispatch_tokens_per_rank x R)"), err


def test_version_prints_ours_and_torchs(capsys):
    import torch

    import ep_runtime as ep
    from ep_runtime.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ep-runtime {ep.__version__} (torch {torch.__version__})\n"


def test_help_states_every_options_default():
    """Every option of `ep-runtime demo|env|bench --help` that takes a value says its default (switches are off
    unless given)."""
    from ep_runtime.bench.cli import build_parser as bench_parser
    from ep_runtime.cli import build_parser
    parsers = dict(build_parser()[1], bench=bench_parser())
    missing = [f"{command} {action.option_strings[0]}" for command, parser in parsers.items()
               for action in parser._actions if action.option_strings and action.nargs != 0
               and "default" not in (action.help or "")]
    assert not missing, missing


def test_demo_plan_picks_a_runner_per_dispatcher_or_says_why_not(monkeypatch):
    import torch

    import ep_runtime as ep
    from ep_runtime.cli import demo_plan
    cpu = torch.device("cpu")
    auto = demo_plan("auto", cpu, 48)
    assert [name for name, _, _ in auto] == ep.dispatchers.registered()
    assert all(runner == "torch" for _, runner, _ in auto), auto  # auto on CPU: the reference backend
    options = {name: opts for name, _, opts in demo_plan("torch", cpu, 500)}
    assert options["deepep_ll"] == {"num_max_dispatch_tokens_per_rank": 500}, options
    assert options["mori"] == {"max_dispatch_tokens_per_rank": 500}, options
    assert options["standard"] == {} and options["deepep_normal"] == {}, options
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if "masked" not in ep.runners.available():
        pytest.skip("triton is not installed")
    for name, runner, why in demo_plan("masked", cpu, 48):
        fmt = ep.dispatchers.get(name).format
        if (fmt, "masked") in ep.registered_pairs():
            assert runner == "masked", (name, why)
        else:
            assert runner is None and f"runner masked has no path for the {fmt} format" in why, (name, why)


def test_demo_runner_auto_takes_the_runner_knob_as_layers_do(monkeypatch, capsys):
    """--runner auto (the default) takes EP_RUNTIME_RUNNER, as EPMoE(runner="auto") and the bench's layers do
    (the demo ran the torch runner on CPU whatever the knob said); --runner given wins."""
    import ep_runtime as ep
    from ep_runtime.cli import main
    if "masked" not in ep.runners.available():
        pytest.skip("the masked runner cannot run here (triton, with CUDA or TRITON_INTERPRET=1)")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EP_RUNTIME_RUNNER", "masked")
    assert main(["demo", "--world-size", "1", "--tokens", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith(" ok")]
    assert len(rows) == len(ep.dispatchers.registered()) and all(row[1] == "masked" for row in rows), rows
    assert main(["demo", "--world-size", "1", "--tokens", "4", "--runner", "torch"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith(" ok")]
    assert rows and all(row[1] == "torch" for row in rows), rows


def test_bench_progress_bar_only_on_a_terminal():
    from ep_runtime.cli import bench_arguments
    assert bench_arguments(["--suite", "dispatch"], interactive=False) == ["--suite", "dispatch", "--no-progress"]
    assert bench_arguments(["--suite", "dispatch"], interactive=True) == ["--suite", "dispatch"]


def test_demo_rendezvous_port_in_use_is_one_line():
    """A torchrun-style launch whose MASTER_PORT another process holds: the demo ended in a RuntimeError
    traceback from init_distributed; now one argparse-style line naming MASTER_PORT, exit 2."""
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = _run([sys.executable, "-m", "ep_runtime", "demo", "--tokens", "4"],
                   env_extra=dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2, out.stdout + out.stderr
    assert last.startswith(f"ep-runtime demo: error: rank 0 cannot host the rendezvous: MASTER_PORT={port}"), out.stderr
    assert "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_world_size_flag_that_contradicts_the_launcher_is_an_error(command, capsys, monkeypatch):
    """`torchrun --nproc-per-node 2 -m ep_runtime demo --world-size 4` ran 2 ranks and said nothing of the 4:
    --world-size sizes only the ranks spawned without a launcher. Now one line naming both sizes, exit 2."""
    from ep_runtime.cli import main
    for name, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        main([command, "--world-size", "4"])
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and out == "", out + err
    assert last == (f"ep-runtime {command}: error: --world-size 4: this process is rank 0 of a torchrun job of 1 "
                    f"ranks, and the launcher sizes the job; allowed: no --world-size (or --world-size 1) under a "
                    f"launcher"), err


def test_unknown_variable_warning_is_one_line():
    """An EP_RUNTIME_* typo warned as '<path>/ep_runtime/cli.py:33: UserWarning: ...' followed by our code line
    ('  envs.validate_all(...)'), which read like a traceback; the CLI now prints our warnings as one line."""
    out = _run([sys.executable, "-m", "ep_runtime", "env"], env_extra=dict(EP_RUNTIME_TIMOUT_S="5"))
    assert out.returncode == 0, out.stderr
    assert out.stderr == ("ep-runtime: warning: ignoring unknown variable EP_RUNTIME_TIMOUT_S (did you mean "
                          "EP_RUNTIME_TIMEOUT_S?): no such ep-runtime knob (`ep-runtime env` lists them)\n"), out.stderr


def test_demo_with_fp8_dispatch_knob_on_is_one_line(capsys, monkeypatch):
    """EP_RUNTIME_DISPATCH_FP8=1 (an inference job's setting left in the environment): every rank of the demo,
    which checks gradients, died in a RuntimeError traceback (fp8 dispatch is inference-only). Now one line
    naming the knob, before any rank starts."""
    from ep_runtime.cli import main
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EP_RUNTIME_DISPATCH_FP8", "1")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--world-size", "1", "--tokens", "4"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "", out + err
    assert err.strip().splitlines()[-1] == (
        "ep-runtime demo: error: EP_RUNTIME_DISPATCH_FP8 is on: fp8 dispatch is inference-only, and the demo checks "
        "gradients against the float64 reference; allowed: unset it (or 0) for the demo"), err


@pytest.mark.parametrize("args", [["env"], ["env", "--markdown"]])
def test_output_into_a_closed_pipe_ends_quietly(args):
    """`ep-runtime demo | head -1`: once the reader left, the next print ended in a BrokenPipeError traceback.
    Now the command ends quietly (exit 1, nothing on stderr), as Unix tools do."""
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "ep_runtime", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and err == "", err


def test_env_shows_the_launcher_variables_and_the_launch_they_make(capsys, monkeypatch):
    """`ep-runtime env` listed the knobs only: the launcher variables the registry keeps "so `ep-runtime env` can
    show what was detected" and the launch init_distributed would join were nowhere (the first question when a
    torchrun or srun job does not start)."""
    from ep_runtime.cli import main
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "MASTER_PORT=29500  (torchrun: rendezvous port)\n" in out, out
    assert out.endswith("launch: torchrun, rank 0 of 1, local rank 0, rendezvous env://\n"), out
