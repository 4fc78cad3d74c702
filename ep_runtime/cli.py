"""The `ep-runtime` command: demo, env, bench."""
from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from . import envs, runners
from .distributed import KnobsError, RendezvousError, check_rendezvous, detect_launch
from .registry import did_you_mean


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Every input is checked before any work: a user error is one line naming the flag (or knob) and
    what is allowed, exit code 2 (argparse's `parser.error`), no traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `ep-runtime demo | head -1`: the reader left; end quietly, as Unix tools do
        # (stdout to /dev/null: Python's own flush at exit would report the closed pipe again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Optional[Sequence[str]]) -> int:
    warnings.formatwarning = _one_line_warning
    parser, commands = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(bench_arguments(rest, interactive=sys.stdout.isatty() and sys.stderr.isatty()))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    command = commands[args.command]
    if args.command == "env" and args.markdown:  # the registry's docs, whatever the environment holds
        return _env(markdown=True)
    knobs_checked = False
    try:
        launch = detect_launch()
        if args.command == "demo":
            check_rendezvous(launch)
            check_world_size_flag(args.world_size, launch)
        knobs_checked = True
        envs.validate_all(warn=launch.rank == 0)
    except (ValueError, RendezvousError) as err:  # a bad knob value (or launcher variable): named by the registry
        # (RendezvousError: mpirun's variables, but no mpi4py or MPI library to join its job with)
        if args.command == "env":  # the listing first: every knob's value, the invalid ones marked
            _env(markdown=False)
        elif knobs_checked and launch.launcher != "single":
            fail_with_the_job(err, command.error)
        command.error(str(err))
    if args.command == "env":
        return _env(markdown=False)
    if envs.get("DISPATCH_FP8"):  # (the ranks failed in a RuntimeError traceback at the first backward)
        command.error(f"{envs.PREFIX}DISPATCH_FP8 is on: fp8 dispatch is inference-only, and the demo checks gradients against the float64 reference; "
                      f"allowed: unset it (or 0) for the demo")
    runner, flag, auto = args.runner, f"--runner {args.runner}", "auto, "
    if runner == "auto" and envs.get("RUNNER") != "auto":  # as EPMoE(runner="auto") and bench's layers take it
        runner = envs.get("RUNNER")
        flag, auto = f"{envs.PREFIX}RUNNER={runner} (which --runner auto takes)", f"--runner (or unset {envs.PREFIX}RUNNER) "
    if runner != "auto" and runner not in runners.registered():
        command.error(f"{flag}: unknown; allowed: auto, {', '.join(runners.registered())}"
                      f"{did_you_mean(runner, runners.registered())}")
    if runner != "auto" and runner not in runners.available():
        command.error(f"{flag}: cannot run here ({_unavailable_reason(runner)}); available "
                      f"here: {auto}{', '.join(runners.available())}")
    device = torch.device("cuda" if launch.launcher != "single" and torch.cuda.is_available() else "cpu")
    plan = demo_plan(runner, device, args.tokens)
    for name, option, knob in demo_capacity_conflicts(plan, args.tokens):
        otherwise = ("unset, the demo sizes it from --tokens" if knob == DEMO_CAPACITY[name][1] else
                     f"or to 0: {name}'s receive rows are then {DEMO_CAPACITY[name][0]} x R")
        command.error(f"--tokens {args.tokens}: above {envs.PREFIX}{knob}={envs.get(knob)}, which sizes {name}'s "
                      f"{option}; allowed: --tokens at most {envs.get(knob)}, or set {envs.PREFIX}{knob} to at least "
                      f"{args.tokens} ({otherwise})")
    if not any(runner for _, runner, _ in plan):
        reasons = "; ".join(f"{name}: {why}" for name, _, why in plan)
        command.error(f"{flag} serves no dispatcher here ({reasons}); allowed here: {auto}"
                      f"{', '.join(runners.available())}")
    try:
        return _demo(args, launch, plan)
    except (RendezvousError, KnobsError) as err:  # MASTER_PORT taken, a peer's bad knob: one line, no traceback
        command.error(str(err))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `ep-runtime` parser and its commands' parsers by name (bench's options are
    ep_runtime.bench.cli.build_parser's: it takes the rest of the command line)."""
    parser = argparse.ArgumentParser(prog="ep-runtime", description="Expert-parallel MoE runtime for PyTorch.")
    from . import __version__  # (what a bug report asks first; `--version` was "arguments are required: command")
    parser.add_argument("--version", action="version", version=f"ep-runtime {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run every dispatcher forward and backward against the float64 reference",
                          description="Run every registered dispatcher forward and backward against the float64 "
                                      "reference: on local CPU ranks, or as one rank of a torchrun, srun or mpirun "
                                      "job.")
    demo.add_argument("--world-size", type=_positive_int, default=None,
                      help=f"local CPU ranks to spawn when no launcher is detected (default "
                           f"{_knob_value('DEMO_WORLD_SIZE')}, from EP_RUNTIME_DEMO_WORLD_SIZE)")
    demo.add_argument("--runner", default="auto",
                      help="runner backend for every dispatcher it serves (default auto: EP_RUNTIME_RUNNER where "
                           "set, as EPMoE(runner='auto') takes it, else per dispatcher the best available one that "
                           "serves it)")
    demo.add_argument("--tokens", type=lambda text: _positive_int(text, DEMO_MAX_TOKENS), default=DEMO_TOKENS,
                      help=f"tokens on rank 0, 1..{DEMO_MAX_TOKENS} (default {DEMO_TOKENS}; rank 1 gets none); sizes "
                           f"the static buffers (deepep_ll's M, mori's max tokens per rank) unless their knob is set")

    env = sub.add_parser("env", help="print every EP_RUNTIME_* knob: value, default, doc")
    env.add_argument("--markdown", action="store_true",
                     help="print docs/environment_variables.md instead (default: the knobs' values here)")

    sub.add_parser("bench", help="benchmark dispatchers and runners (see `ep-runtime bench --help`)",
                   add_help=False)
    return parser, sub.choices


DEMO_MAX_TOKENS = 1 << 16
DEMO_TOKENS = 48

# Options that size a dispatcher's static buffers for the tokens one rank sends: the demo sets them from
# --tokens unless the user set the knob (a dispatcher absent here has no static buffer to size).
DEMO_CAPACITY = {
    "deepep_ll": ("num_max_dispatch_tokens_per_rank", "LL_MAX_DISPATCH_TOKENS_PER_RANK"),
    "mori": ("max_dispatch_tokens_per_rank", "MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK"),
}
# Knobs that size a receive buffer which the demo leaves as the user set it (0 = off): rank 0's --tokens tokens
# may all reach one rank, so one set below --tokens is refused with those above.
DEMO_RECEIVE_ROWS = {"mori": ("prealloc_max_recv_tokens", "MORI_PREALLOC_MAX_RECV_TOKENS")}


def demo_plan(runner: str, device: torch.device, tokens: int) -> list[tuple[str, Optional[str], Any]]:
    """One row per registered dispatcher: (dispatcher, runner backend, dispatcher options), or
    (dispatcher, None, why it is skipped) when `runner` cannot serve it here. "auto" picks per
    dispatcher (runners.resolve); a named runner serves the dispatchers whose format it has a path
    for (ep.registered_pairs())."""
    from . import dispatchers
    from .runner_core import registered_pairs
    pairs = registered_pairs()
    plan = []
    for name in dispatchers.registered():
        fmt = dispatchers.get(name).format
        backend = runners.resolve(runner, device, fmt)
        if backend not in runners.available():
            plan.append((name, None, f"runner {backend} cannot run here ({_unavailable_reason(backend)})"))
            continue
        if (fmt, backend) not in pairs:
            served = ", ".join(f for f, b in pairs if b == backend) or "none"
            plan.append((name, None, f"runner {backend} has no path for the {fmt} format (it serves: {served})"))
            continue
        options = {}
        if name in DEMO_CAPACITY and not envs.is_set(DEMO_CAPACITY[name][1]):
            options[DEMO_CAPACITY[name][0]] = tokens  # buffers of the demo's size, not the knob's default
        plan.append((name, backend, options))
    return plan


def demo_capacity_conflicts(plan, tokens: int) -> list[tuple[str, str, str]]:
    """(dispatcher, option, knob) for each dispatcher the demo runs whose buffer the user sized, by its knob,
    below --tokens (the demo would fail inside the ranks: T > M, or more rows received than fit)."""
    return [(name, option, knob) for name, runner, _ in plan if runner is not None
            for option, knob in (sizing.get(name) for sizing in (DEMO_CAPACITY, DEMO_RECEIVE_ROWS) if name in sizing)
            if envs.is_set(knob) and 0 < envs.get(knob) < tokens]


def fail_with_the_job(err: ValueError, error: Callable[[str], Any]) -> None:
    """A knob invalid on this rank of a launched job (demo, bench): before, this rank alone stopped, and the others
    waited in the rendezvous until EP_RUNTIME_TIMEOUT_S, then read that a rank was never started. It joins the job
    instead: init_distributed raises on every rank at once naming this rank and the value; `error` prints it."""
    from .distributed import destroy_distributed, init_distributed
    try:
        init_distributed()
    except (RendezvousError, KnobsError) as joined:
        error(str(joined))
    destroy_distributed()  # (not reached: init_distributed checks the same knobs)
    error(str(err))


def check_world_size_flag(world_size: Optional[int], launch) -> None:
    """demo's and bench's --world-size sizes the ranks spawned without a launcher: under torchrun, srun or mpirun,
    a value other than the job's was ignored without a word (2 ranks ran for --world-size 4)."""
    if world_size is not None and launch.launcher != "single" and world_size != launch.world_size:
        raise ValueError(f"--world-size {world_size}: this process is rank {launch.rank} of a {launch.launcher} job of "
                         f"{launch.world_size} ranks, and the launcher sizes the job; allowed: no --world-size (or "
                         f"--world-size {launch.world_size}) under a launcher")


_PYTHON_FORMAT_WARNING = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """ep-runtime's own warnings (an unknown EP_RUNTIME_* variable, ...) as one line in the CLI,
    'ep-runtime: warning: ...': Python's format added our source path and code line, which read like a
    traceback of a failure. Other packages' warnings keep Python's format (their location helps)."""
    from . import dispatchers
    own = [os.path.dirname(os.path.abspath(module.__file__)) + os.sep for module in (sys.modules[__package__],
                                                                                     dispatchers, runners)]
    if any(os.path.abspath(filename).startswith(folder) for folder in own):
        return f"ep-runtime: warning: {message}\n"
    return _PYTHON_FORMAT_WARNING(message, category, filename, lineno, line)


def _knob_value(name: str) -> object:
    """A knob's value for --help: its default where the environment's value is invalid (reported when a
    command runs, not while printing help)."""
    try:
        return envs.get(name)
    except ValueError:
        return envs.KNOBS[envs.PREFIX + name].default


def bench_arguments(argv: Sequence[str], interactive: bool) -> list[str]:
    """`ep-runtime bench` arguments checked before any work (argparse's one-line errors, exit 2):
    dispatcher and runner names (registered, and for runners, available here), --plot's matplotlib.
    Returns the arguments to run with: --no-progress added when output is not a terminal."""
    from . import dispatchers
    from .bench.cli import build_parser as bench_parser
    argv = list(argv)
    parser = bench_parser()
    args = parser.parse_args(argv)
    for name in args.dispatchers or []:
        if name not in dispatchers.registered():
            parser.error(f"--dispatchers {name}: unknown; allowed: {', '.join(dispatchers.registered())}"
                         f"{did_you_mean(name, dispatchers.registered())}")
    for name in [] if args.from_json else args.runners or []:
        if name not in runners.registered():
            parser.error(f"--runners {name}: unknown; allowed: {', '.join(runners.registered())}"
                         f"{did_you_mean(name, runners.registered())}")
        if name not in runners.available():
            parser.error(f"--runners {name}: cannot run here ({_unavailable_reason(name)}); available here: "
                         f"{', '.join(runners.available())}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        later = ("run this --from-json on a machine that has it" if args.from_json else
                 "drop --plot and plot a --json file later with --from-json")  # (--from-json: it was that advice)
        parser.error(f"--plot {args.plot}: needs matplotlib, which is not installed (pip install 'ep-runtime[bench]' "
                     f"or matplotlib, or {later})")
    if not interactive and not args.no_progress:
        argv.append("--no-progress")
    return argv


def _unavailable_reason(name: str) -> str:
    from .runners import _RUNNERS  # the registry: each backend class says why it cannot run here
    return _RUNNERS[name].unavailable_reason() or "not available"


def _positive_int(text: str, most: int = envs.MAX_LOCAL_RANKS) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"{value} is out of range; allowed 1..{most}")
    return value


def _env(markdown: bool) -> int:
    if markdown:
        sys.stdout.write(envs.markdown())
        return 0
    for name, value, default, doc in envs.describe():
        print(f"{name}={value}  (default {default})\n    {doc}")
        problem = envs.problem_of(name)
        if problem:
            print(f"    INVALID: {problem}")
    for name in envs.unknown():
        print(f"{name}  (unknown: not an ep-runtime knob, ignored){envs.suggestion(name)}")
    # What init_distributed would join here, and from which variables (a launcher problem is the usual question).
    for name, doc in envs.LAUNCHER_VARIABLES.items():
        if envs.launcher(name) is not None:
            print(f"{name}={envs.launcher(name)}  ({doc})")
    try:
        launch = detect_launch()
    except (ValueError, RendezvousError) as err:  # (RendezvousError: mpirun without mpi4py or an MPI library)
        print(f"launch: INVALID: {err}")
    else:
        print(f"launch: {launch.launcher}" + (" process (no launcher detected)" if launch.launcher == "single" else
                                               f", rank {launch.rank} of {launch.world_size}, local rank "
                                               f"{launch.local_rank}, rendezvous {launch.init_method}"))
    return 0


def _demo(args, launch, plan) -> int:
    from .distributed import destroy_distributed, init_distributed
    from .testing import run_ranks

    for name, runner, why in plan:
        if runner is None and launch.rank == 0:  # once per job
            print(f"demo: skipping {name}: {why}")
    runnable = [(name, runner, options) for name, runner, options in plan if runner is not None]
    if launch.launcher != "single":
        # Started by torchrun, srun or mpirun: this process is one rank of that job.
        import torch.distributed as dist
        init_distributed()
        try:
            rank, world_size = dist.get_rank(), dist.get_world_size()
            rows = demo_rank(rank, world_size, runnable, args.tokens)
            gathered = [None] * world_size
            dist.all_gather_object(gathered, (socket.gethostname(), rows))
            backend = dist.get_backend()
        finally:
            destroy_distributed()
        if rank != 0:
            return 0
        print(f"demo: joined a {launch.launcher} job: {world_size} ranks, backend {backend}")
        # Where the ranks ran: a multi-node launch shows whether it really spans its nodes.
        ranks_of_host: dict[str, list[int]] = {}
        for r, (host, _) in enumerate(gathered):
            ranks_of_host.setdefault(host, []).append(r)
        print("demo: ranks per host: " + ", ".join(f"{host} {ranks}" for host, ranks in ranks_of_host.items()))
        return _report([rows for _, rows in gathered])
    world_size = args.world_size or envs.get("DEMO_WORLD_SIZE")
    return _report(run_ranks(demo_rank, world_size, runnable, args.tokens, timeout=300))


def demo_rank(rank: int, world_size: int, plan: list[tuple[str, str, dict]], tokens: int) -> list[tuple]:
    """Each (dispatcher, runner, dispatcher options) of `plan`: forward + backward vs the reference
    on this rank."""
    import torch.distributed as dist

    from .distributed import device_for_rank
    from .layer import EPMoE
    from .testing import check_layer, make_problem

    device = device_for_rank()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    num_experts = 16 if 16 % world_size == 0 else 4 * world_size
    tokens_per_rank = [tokens if r != 1 else 0 for r in range(world_size)]  # rank 1 routes nothing
    rows = []
    for name, runner, options in plan:
        layer = EPMoE(num_experts, 4, 64, 32, dispatcher=name, runner=runner, dtype=dtype, device=device,
                      dispatcher_options=options)
        problem = make_problem(layer.config, tokens_per_rank, seed=1234, ep_size=world_size)
        dist.barrier()
        start = time.perf_counter()
        errors = check_layer(layer, problem, rank)
        elapsed = time.perf_counter() - start
        rows.append((name, layer.runner.backend.name, world_size, max(errors.values()), elapsed, str(dtype)))
    return rows


def _report(per_rank_rows: list[list[tuple]]) -> int:
    from .testing import tolerance
    ok = True
    print(f"{'dispatcher':<15}{'runner':<8}{'ranks':>6}{'max rel err':>14}{'time s':>9}  dtype")
    for i, row in enumerate(per_rank_rows[0]):
        name, runner, ranks, _, _, dtype = row
        err = max(rows[i][3] for rows in per_rank_rows)
        elapsed = max(rows[i][4] for rows in per_rank_rows)
        limit = tolerance(getattr(torch, dtype.split(".")[-1]))
        status = "ok" if err <= limit else f"FAIL (> {limit:g})"
        ok &= err <= limit
        print(f"{name:<15}{runner:<8}{ranks:>6}{err:>14.2e}{elapsed:>9.3f}  {dtype}  {status}")
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1
