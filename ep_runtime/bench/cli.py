"""`ep-runtime bench` command line: arguments -> Settings, the run in whatever launch this process is
in, and the report (text on stdout; --json, --markdown, --plot files)."""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .. import envs
from ..cli import check_world_size_flag, fail_with_the_job
from ..distributed import KnobsError, RendezvousError, check_rendezvous, detect_launch
from ..envs import MAX_LOCAL_RANKS, MAX_TOKENS
from .dispatch import FP8_DISPATCHERS, dispatch_suite, parse_routing
from .eplb import eplb_suite
from .overlap import VARIANTS as OVERLAP_VARIANTS
from .overlap import overlap_suite
from .report import MISSING_MATPLOTLIB, has_matplotlib, plot, read_json, render_markdown, render_text, write_json
from .runner import runner_suite
from .settings import DEFAULT_SUITES, DTYPES, PRESETS, RUNNER_FORMATS, SUITES, Results, Settings, int_at_least


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 or v > MAX_TOKENS for v in values):  # (beyond int32: a C++ overflow traceback)
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 0 and <= {MAX_TOKENS}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:  # (each case ran as often as given, its rows and their 'vs' ratios mixed up in the tables)
        raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(map(str, twice))} given more than once; allowed: "
                                         f"distinct integers >= 0")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ep-runtime bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark every registered dispatcher (against raw all_to_all_single) and every available "
                    "runner backend (against the torch runner, a raw torch._grouped_mm baseline and the device's "
                    "roofline).",
        epilog="presets:\n" + "\n".join(f"  {p.name:<20}{p.note}" for p in PRESETS.values()) +
               "\n\nexamples:\n  ep-runtime bench                                  # CPU: 2 local gloo ranks, tiny"
               "\n  torchrun --nproc-per-node 4 -m ep_runtime bench --preset deepseek-v3 --json out.json --plot out.png"
               "\n  ep-runtime bench --suite runner --preset deepseek-v3 --runner-ep-size 8 --cuda-graph"
               "   # one GPU: a rank of EP=8"
               "\n  torchrun --nproc-per-node 2 -m ep_runtime bench --preset deepseek-v3 --suite eplb --routing zipf:1.2"
               " --tokens 4096 --redundant-experts 32 --runners triton   # load balancing, before/after"
               "\n  torchrun --nproc-per-node 2 -m ep_runtime bench --suite overlap --preset deepseek-v3 --tokens 64,4096"
               " --cuda-graph")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default tiny)")
    p.add_argument("--tokens", type=_int_list, default=None,
                   help="tokens per rank to sweep, comma-separated (default: the preset's GPU or CPU sweep)")
    p.add_argument("--hidden", type=_int_list, default=None, help="hidden sizes H to sweep (default: preset)")
    p.add_argument("--experts", type=_int_list, default=None, help="expert counts E to sweep (default: preset)")
    p.add_argument("--top-k", type=_int_list, default=None, help="top-k values K to sweep (default: preset)")
    p.add_argument("--intermediate", type=int_at_least(1), default=None, help="intermediate size I (default: preset)")
    p.add_argument("--dtype", choices=sorted(DTYPES) + ["fp8"], default=None,
                   help="default bf16 on CUDA, fp32 on CPU; fp8: bf16 tokens plus the fp8 rows of --fp8")
    p.add_argument("--fp8", action="store_true",
                   help="also fp8 in the same run: runners on fp8 block-scaled experts (fed fp8 dispatch rows where "
                        "the format has them) with fp8 baselines, and each dispatcher's use_fp8=True dispatch")
    p.add_argument("--triton-fp8-gemm", type=_name_list, default=[],
                   help="with --fp8: also the triton runner's fp8 rows with EP_RUNTIME_TRITON_FP8_GEMM set to each of "
                        "these (e.g. triton: 'triton fp8 triton' rows, triton's kernels where the default, auto, may "
                        "take the Gluon ones; standard format only; default: none)")
    p.add_argument("--suite", type=_name_list, default=list(DEFAULT_SUITES),
                   help="comma-separated: dispatch, runner, eplb, overlap (default dispatch,runner); eplb times the "
                        "whole EPMoE forward without redundant experts, with them, and after one rebalance; overlap: "
                        "a layer step in two micro-batches, sequential vs exchanges overlapped with the other half's "
                        "experts")
    p.add_argument("--routing", default="uniform",
                   help="how tokens pick experts: uniform (default), or zipf:S: expert e is picked with weight "
                        "1/(e+1)^S (e.g. zipf:1.2; expert 0 hottest, the same on every rank), zipf:S:shuffled: "
                        "the hot experts spread over the ids by a permutation seeded by --seed")
    p.add_argument("--redundant-experts", type=int, default=None,
                   help="eplb suite: redundant experts N (default E/8, rounded up so E+N divides over the ranks)")
    p.add_argument("--dispatchers", type=_name_list, default=None,
                   help="only these dispatchers, and their static modes (default: all registered)")
    p.add_argument("--runners", type=_name_list, default=None, help="only these runners (default: all available)")
    p.add_argument("--runner-formats", type=_name_list, default=list(RUNNER_FORMATS),
                   help="runner suite: the dispatch formats fed to the runners, each made by that dispatcher on "
                        f"one rank (default {','.join(RUNNER_FORMATS)})")
    p.add_argument("--runner-ep-size", type=int_at_least(1), default=None,
                   help="runner suite: compute E / this many local experts (default: the number of ranks)")
    p.add_argument("--world-size", type=int_at_least(1, MAX_LOCAL_RANKS), default=None,
                   help=f"local CPU ranks to spawn when no launcher is detected (default {SPAWNED_RANKS})")
    p.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--repeats", type=int_at_least(1), default=None,
                   help="timed repeats (default 100 on CUDA, 10 on CPU); on CUDA as many again for the host time")
    p.add_argument("--rotate", type=int_at_least(1), default=4, help="distinct inputs cycled through (default 4)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on CUDA, also time CUDA-graph replays: every runner, and the dispatch suite's static-shape "
                        "implementations and baseline (what cannot be captured is listed under skipped)")
    # (bounded: 10**20 ended in torch's "Overflow when unpacking long long" traceback; seeds derived per rank and
    # size, seed * 1000003 + ..., stay within int64 below 2**32)
    p.add_argument("--seed", type=int_at_least(0, 2 ** 32 - 1), default=0,
                   help="seed of the inputs, weights and shuffled routing, 0..2**32-1 (default 0)")
    p.add_argument("--json", metavar="FILE", help="write every result and the run's metadata as JSON (default: none)")
    p.add_argument("--plot", metavar="FILE.png", help="write latency-vs-tokens plots (needs matplotlib; default: none)")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown (for docs/performance.md; default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: print, plot or convert the results of an earlier --json FILE (e.g. a GPU "
                        "run's, on a machine that has matplotlib; default: none, run the suites)")
    return p


SPAWNED_RANKS = 2  # --world-size's default


def settings_from_args(args: argparse.Namespace, cuda: bool) -> Settings:
    from .. import dispatchers

    preset = PRESETS[args.preset]
    suites = args.suite
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ValueError(f"--suite {','.join(suites)}: allowed {', '.join(SUITES)}")
    for flag, names in (("--dispatchers", args.dispatchers), ("--runners", args.runners)):
        if names is not None and not names:  # (--dispatchers '' timed the all_to_all baseline alone, without a word)
            raise ValueError(f"{flag} '': names none; allowed: one or more names, comma-separated (or no {flag}: "
                             f"all)")
    formats = args.runner_formats
    if not formats or any(f not in dispatchers.registered() for f in formats):
        raise ValueError(f"--runner-formats {','.join(formats)}: allowed {', '.join(dispatchers.registered())}")
    for flag, values in (("--hidden", args.hidden), ("--experts", args.experts), ("--top-k", args.top_k)):
        if values is not None and min(values) < 1:
            raise ValueError(f"{flag} {','.join(map(str, values))}: every value must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} must be >= 0")
    try:
        parse_routing(args.routing)
    except ValueError:
        raise ValueError(f"--routing {args.routing}: allowed uniform, zipf:S or zipf:S:shuffled with a number "
                         f"S >= 0 (e.g. zipf:1.2)") from None
    gemm_knob = envs.KNOBS[envs.PREFIX + "TRITON_FP8_GEMM"]
    if any(g not in gemm_knob.choices for g in args.triton_fp8_gemm):
        raise ValueError(f"--triton-fp8-gemm {','.join(args.triton_fp8_gemm)}: allowed {', '.join(gemm_knob.choices)}")
    if args.triton_fp8_gemm and not (args.fp8 or args.dtype == "fp8"):
        raise ValueError("--triton-fp8-gemm times fp8 rows: add --fp8")
    if args.triton_fp8_gemm and ("standard" not in formats or (args.runners is not None and "triton" not in args.runners)):
        raise ValueError("--triton-fp8-gemm times the triton runner on the standard format: keep both in --runners and "
                         "--runner-formats")
    fp8 = "--fp8" if args.fp8 else "--dtype fp8"
    fp8_dispatchers = [n for n in FP8_DISPATCHERS if args.dispatchers is None or n in args.dispatchers]
    if (args.fp8 or args.dtype == "fp8") and "runner" not in suites and ("dispatch" not in suites or not fp8_dispatchers):
        # (its fp8 rows were left out without a word: the eplb and overlap suites time none, nor a dispatcher without it)
        raise ValueError(f"{fp8} adds fp8 rows to the runner suite and to the dispatch suite's "
                         f"{', '.join(FP8_DISPATCHERS)}; --suite {','.join(suites)}"
                         + (f" --dispatchers {','.join(args.dispatchers)}" if "dispatch" in suites else "")
                         + " would time none; allowed: --suite with runner, or dispatch with one of those dispatchers")
    overlapped = sorted({v.dispatcher for v in OVERLAP_VARIANTS})
    if "overlap" in suites and args.dispatchers is not None and not set(args.dispatchers) & set(overlapped):
        raise ValueError(f"--suite overlap --dispatchers {','.join(args.dispatchers)}: the overlap suite times "
                         f"{' and '.join(overlapped)} only (it would time nothing); allowed: --dispatchers naming one "
                         f"of them")
    if args.cuda_graph and not cuda:  # (it was ignored: no graph row, nothing under skipped, as --help promises)
        raise ValueError("--cuda-graph: this host has no CUDA device (torch.cuda.is_available() is False), so there is "
                         "nothing to capture; allowed: --cuda-graph on a CUDA host only")
    if args.redundant_experts is not None and args.redundant_experts < 0:
        raise ValueError(f"--redundant-experts {args.redundant_experts}: allowed an int >= 0")
    return Settings(
        preset=preset.name,
        tokens=args.tokens or list(preset.tokens_gpu if cuda else preset.tokens_cpu),
        hidden_sizes=args.hidden or [preset.hidden_size],
        num_experts=args.experts or [preset.num_experts],
        top_ks=args.top_k or [preset.top_k],
        intermediate_size=args.intermediate or preset.intermediate_size,
        dtype=("bf16" if args.dtype == "fp8" else args.dtype) or ("bf16" if cuda else "fp32"),
        fp8=args.fp8 or args.dtype == "fp8", triton_fp8_gemms=args.triton_fp8_gemm,
        suites=suites, dispatchers=args.dispatchers, runners=args.runners, runner_ep_size=args.runner_ep_size,
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 2),
        repeats=args.repeats or (100 if cuda else 10), rotate=args.rotate, cuda_graph=args.cuda_graph,
        seed=args.seed, progress=not args.no_progress, runner_formats=formats, routing=args.routing,
        redundant_experts=args.redundant_experts)


def bench_rank(rank: int, world_size: int, settings: Settings) -> Optional[dict]:
    """The multi-rank suites (dispatch, eplb) on this rank of the default group; returns rank 0's
    results as a dict."""
    from ..distributed import device_for_rank

    torch.manual_seed(settings.seed)
    results = Results()
    for suite, fn in _GROUP_SUITES.items():
        if suite in settings.suites:
            results.merge(fn(settings, dist.group.WORLD, device_for_rank(), settings.progress))
    return asdict(results) if rank == 0 else None


# Suites that run across the ranks of the group (the runner suite runs on one rank).
_GROUP_SUITES = {"dispatch": dispatch_suite, "eplb": eplb_suite, "overlap": overlap_suite}


def run(settings: Settings, world_size: Optional[int] = None) -> Optional[Results]:
    """Run the chosen suites in whatever launch this process is in; rank 0 gets the Results."""
    from ..distributed import destroy_distributed, detect_launch, device_for_rank, init_distributed
    from ..testing import run_ranks

    launch = detect_launch()
    envs.validate_all(warn=launch.rank == 0)  # one warning per job, as init_distributed gives
    results = Results()
    if launch.launcher != "single" or (world_size or 1) == 1:
        init_distributed()
        try:
            rank, R = dist.get_rank(), dist.get_world_size()
            device = device_for_rank()
            for suite, fn in _GROUP_SUITES.items():
                if suite in settings.suites:
                    results.merge(fn(settings, dist.group.WORLD, device, settings.progress))
            runner_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
            if "runner" in settings.suites:
                # The runner suite's dispatchers work on one rank; making those groups takes every rank.
                solo = dist.group.WORLD if R == 1 else dist.new_subgroups(group_size=1)[0]
                if rank == 0 or runner_device.type == "cuda":
                    # Each GPU rank times its own GPU; on CPU only rank 0 runs (the ranks share the cores).
                    results.merge(runner_suite(settings, runner_device, settings.runner_ep_size or R,
                                               settings.progress and rank == 0, group=solo))
            results.meta = _meta(settings, launch.launcher, R, dist.get_backend(), device, runner_device)
            dist.barrier()
        finally:
            destroy_distributed()
        return results if rank == 0 else None

    # No launcher: spawn local CPU ranks (gloo) for the dispatch, eplb and overlap suites; the runner suite runs here.
    if any(suite in settings.suites for suite in _GROUP_SUITES):
        timeout = max(600.0, float(envs.get("TIMEOUT_S")))
        per_rank = run_ranks(bench_rank, world_size, settings, timeout=24 * 3600.0, group_timeout=timeout)
        results.merge(Results(**{k: v for k, v in per_rank[0].items() if k != "meta"}))
    runner_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if "runner" in settings.suites:
        results.merge(runner_suite(settings, runner_device, settings.runner_ep_size or world_size,
                                   settings.progress))
    results.meta = _meta(settings, "spawn", world_size, "gloo", torch.device("cpu"), runner_device)
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _meta(settings: Settings, launcher: str, world_size: int, backend: str, device: torch.device,
          runner_device: torch.device) -> dict:
    from .. import __version__
    cuda = device.type == "cuda" or runner_device.type == "cuda"
    return dict(
        command=settings.command,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), ep_runtime=__version__, torch=torch.__version__,
        cuda=torch.version.cuda, launcher=launcher, world_size=world_size, backend=backend,
        dispatch_device=_device_name(device), runner_device=_device_name(runner_device),
        settings=asdict(settings),
        timing=("CUDA events per repeat" if cuda else "wall time per repeat")
        + f"; {settings.warmup} warm-up + {settings.repeats} timed repeats over {settings.rotate} rotated inputs;"
          " barrier before each repeat; a repeat's time is the slowest rank's; host us: median CPU time of one call"
          " with no device sync after it" + (f", on {settings.repeats} more repeats" if cuda else " (the wall time)")
        + ("; graph: CUDA-graph replays" if settings.cuda_graph and cuda else ""),
    )


def _check_experts_divide(settings: Settings, world_size: int) -> None:
    """The dispatch, eplb and overlap suites shard every E over the job's ranks (a launcher's, else --world-size
    spawned here; eplb's layer without copies too) and the runner suite computes E / --runner-ep-size (default:
    those ranks): a ValueError naming the flag when an E does not divide, before any rank starts (the suites raise
    it on every rank otherwise; eplb and overlap skipped every row and ended "no benchmark produced a result")."""
    from ..distributed import detect_launch

    launch = detect_launch()
    ranks = launch.world_size if launch.launcher != "single" else world_size
    job = f"the {ranks} ranks (--world-size or the launcher's)"
    ep_size = settings.runner_ep_size
    checks = [(suite, ranks, job) for suite in ("dispatch", "eplb", "overlap")]
    checks.append(("runner", ep_size or ranks, f"--runner-ep-size {ep_size}" if ep_size else job))
    for suite, size, what in checks:
        bad = [E for E in settings.num_experts if E % size]
        if suite in settings.suites and bad:
            raise ValueError(f"--experts {','.join(map(str, bad))}: the {suite} suite divides E over {what}; "
                             f"allowed: multiples of {size}")
    N = settings.redundant_experts  # (its default is chosen per E to fit)
    for E in settings.num_experts if "eplb" in settings.suites and N is not None else []:
        if N > E * (ranks - 1) or (E + N) % ranks:
            raise ValueError(f"--redundant-experts {N}: the eplb suite adds N copies to --experts {E} over {job}; "
                             f"allowed: at most {E * (ranks - 1)} (one copy of an expert per rank) with E + N a "
                             f"multiple of {ranks}")


def _check_outputs_writable(args: argparse.Namespace) -> None:
    """--json, --markdown and --plot files can be written, checked on rank 0 (the rank that writes them) before
    the run: they are written after it, where a missing directory cost the whole run and ended in a traceback.
    Probed by opening the file for appending (a file made by the probe is removed again)."""
    outputs = [(flag, path) for flag, path in (("--json", args.json), ("--markdown", args.markdown),
                                              ("--plot", args.plot)) if path]
    if not outputs or detect_launch().rank != 0:
        return
    for flag, path in outputs:
        existed = os.path.exists(path)
        try:
            with open(path, "a"):
                pass
        except OSError as err:
            raise ValueError(f"{flag} {path}: cannot write it ({err.strerror}); allowed: a file path in an existing, "
                             f"writable directory") from None
        if not existed:
            os.remove(path)


def _available_host_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (None where there is none to read: not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_host_memory(settings: Settings, world_size: int, available: Optional[int]) -> None:
    """CPU runs: the experts the suites draw must fit in the host's available memory. An allocation larger than
    it does not fail on Linux: the pages are drawn one by one until the OOM killer ends this run or another
    process (on 2 CPU ranks `--preset deepseek-v3` draws 128 experts for the runner suite, 22 GiB in fp32, and
    as much again while scaling them). Counted per process, times the ranks spawned here (a launcher's ranks:
    this one's share only): the runner suite's E / its EP size experts twice (drawn, then scaled), the eplb
    suite's (E + copies) / R and the overlap suite's E / R; the dispatch suite holds no experts. And every suite's
    --rotate token inputs [T, H] per rank."""
    from ..distributed import detect_launch
    from .eplb import default_redundant_experts

    if available is None:
        return
    launch = detect_launch()
    ranks = launch.world_size if launch.launcher != "single" else world_size
    here = 1 if launch.launcher != "single" else ranks
    itemsize = DTYPES[settings.dtype].itemsize
    for E, K, H in settings.cases():
        expert = 3 * settings.intermediate_size * H * itemsize  # w13 [2I, H] and w2 [H, I]
        N = settings.redundant_experts if settings.redundant_experts is not None else default_redundant_experts(E, ranks)
        needs = {"runner": 2 * E // (settings.runner_ep_size or ranks) * expert,
                 "eplb": here * (E + N) // ranks * expert, "overlap": here * E // ranks * expert}
        for suite, need in needs.items():
            if suite in settings.suites and need > available:
                raise ValueError(
                    f"--experts {E} --hidden {H} --intermediate {settings.intermediate_size} ({settings.dtype}): the "
                    f"{suite} suite would hold {need / 2**30:.1f} GiB of experts on this host, which has "
                    f"{available / 2**30:.1f} GiB available; allowed: what fits: "
                    + ("a larger --runner-ep-size (the runner suite computes E / it experts), " if suite == "runner"
                       else "") + "smaller --experts/--hidden/--intermediate, --dtype bf16, or --suite without "
                    f"{suite} (the dispatch suite holds no experts)")
        # Every suite draws --rotate inputs [T, H] per rank (in fp32 first): --tokens 100000000 failed in an
        # allocation traceback (or went to the OOM killer) after the smaller sweeps had run.
        T = max(settings.tokens)
        rows = (here if set(settings.suites) & set(_GROUP_SUITES) else 1) * settings.rotate * T * H * 4
        if rows > available:
            raise ValueError(f"--tokens {T} --hidden {H}: the suites would draw {rows / 2**30:.1f} GiB of token rows "
                             f"on this host ({settings.rotate} inputs [T, H] per rank, --rotate), which has "
                             f"{available / 2**30:.1f} GiB available; allowed: what fits: smaller --tokens, "
                             f"--hidden or --rotate")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    knob_error = None
    try:
        settings = settings_from_args(args, torch.cuda.is_available())
        settings.command = " ".join(["ep-runtime bench", *map(shlex.quote, argv)])
        for K in settings.top_ks:
            for E in settings.num_experts:
                if K > E:
                    raise ValueError(f"--top-k {K} is more than --experts {E}")
        _check_outputs_writable(args)
        if not args.from_json:
            launch = detect_launch()
            check_rendezvous(launch)
            check_world_size_flag(args.world_size, launch)
            try:  # (a bad knob failed in run(): a ValueError traceback, exit 1; an unknown one: every rank warned)
                envs.validate_all(warn=launch.rank == 0)
            except ValueError as err:
                knob_error = err
        world_size = args.world_size or SPAWNED_RANKS
        if not args.from_json:  # (nothing runs then)
            _check_experts_divide(settings, world_size)
            if not torch.cuda.is_available():  # (GPU runs hold the experts in device memory)
                _check_host_memory(settings, world_size, _available_host_bytes())
    except ValueError as err:
        parser.error(str(err))
    if knob_error is not None:  # after the other checks: under a launcher this rank joins the job to fail it
        if launch.launcher != "single":
            fail_with_the_job(knob_error, parser.error)
        parser.error(str(knob_error))
    if args.plot and not has_matplotlib():
        if not (args.json or args.markdown):  # nothing would be kept: fail before the run
            parser.error(MISSING_MATPLOTLIB)
        print(f"warning: {MISSING_MATPLOTLIB}; the run goes on and --plot fails after --json/--markdown are "
              "written (plot them later with --from-json)", file=sys.stderr)
    if args.from_json:
        try:  # a missing or foreign file: one line naming it, not a traceback
            results = read_json(args.from_json)
        except (OSError, ValueError, TypeError) as err:
            parser.error(f"--from-json {args.from_json}: cannot read it as an earlier run's --json file ({err})")
    else:
        try:
            results = run(settings, world_size)
        except (RendezvousError, KnobsError) as err:  # MASTER_PORT taken, a peer's bad knob: one line, no traceback
            parser.error(str(err))
    if results is None:  # not rank 0
        return 0
    print(render_text(results), end="")
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_markdown(results))
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(results, args.plot)
        except RuntimeError as err:
            print(f"ep-runtime bench: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    measured = len(results.dispatch) + len(results.runner) + len(results.eplb) + len(results.overlap)
    if not measured:  # (exit status 1 alone, after an empty report, says nothing)
        print("ep-runtime bench: error: no benchmark produced a result"
              + (" (the skipped table says why)" if results.skipped else ""), file=sys.stderr)
    return 0 if measured else 1
