"""The `ep-runtime` command: demo, env, bench."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from . import runners


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ep-runtime", description="Expert-parallel MoE runtime for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run every dispatcher forward and backward against the float64 reference")
    demo.add_argument("--world-size", type=_positive_int, default=None,
                      help="local CPU ranks to spawn when no launcher is detected (default EP_RUNTIME_DEMO_WORLD_SIZE)")
    demo.add_argument("--runner", default="torch", help="runner backend (default torch)")
    demo.add_argument("--tokens", type=_positive_int, default=48, help="tokens on rank 0 (rank 1 gets none)")

    env = sub.add_parser("env", help="print every EP_RUNTIME_* knob: value, default, doc")
    env.add_argument("--markdown", action="store_true", help="print docs/environment_variables.md instead")

    sub.add_parser("bench", help="benchmark dispatchers and runners (see `ep-runtime bench --help`)",
                   add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main
        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "env":
            return _env(args.markdown)
        runners.check_name(args.runner)
        return _demo(args)
    except (ValueError, TypeError) as err:  # user errors (bad knob, unknown runner): one line, no traceback
        print(f"ep-runtime {args.command}: error: {err}", file=sys.stderr)
        return 2


def _positive_int(text: str, most: int = 1 << 20) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"{value} is out of range; allowed 1..{most}")
    return value


def _env(markdown: bool) -> int:
    from . import envs
    if markdown:
        sys.stdout.write(envs.markdown())
        return 0
    envs.validate_all()
    for name, value, default, doc in envs.describe():
        print(f"{name}={value}  (default {default})\n    {doc}")
    for name in envs.unknown():
        print(f"{name}  (unknown: not an ep-runtime knob, ignored)")
    return 0


def _demo(args) -> int:
    from . import envs
    from .distributed import destroy_distributed, detect_launch, init_distributed
    from .testing import run_ranks

    envs.validate_all()
    launch = detect_launch()
    if launch.launcher != "single":
        # Started by torchrun, srun or mpirun: this process is one rank of that job.
        import torch.distributed as dist
        init_distributed()
        try:
            rank, world_size = dist.get_rank(), dist.get_world_size()
            rows = demo_rank(rank, world_size, args.runner, args.tokens)
            gathered = [None] * world_size
            dist.all_gather_object(gathered, rows)
            backend = dist.get_backend()
        finally:
            destroy_distributed()
        if rank != 0:
            return 0
        print(f"demo: joined a {launch.launcher} job: {world_size} ranks, backend {backend}")
        return _report(gathered)
    world_size = args.world_size or envs.get("DEMO_WORLD_SIZE")
    return _report(run_ranks(demo_rank, world_size, args.runner, args.tokens, timeout=300))


def demo_rank(rank: int, world_size: int, runner: str, tokens: int) -> list[tuple]:
    """Every registered dispatcher with `runner`: forward + backward vs the reference on this rank."""
    import torch.distributed as dist

    from . import dispatchers
    from .distributed import device_for_rank
    from .layer import EPMoE
    from .testing import check_layer, make_problem

    device = device_for_rank()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    num_experts = 16 if 16 % world_size == 0 else 4 * world_size
    tokens_per_rank = [tokens if r != 1 else 0 for r in range(world_size)]  # rank 1 routes nothing
    rows = []
    for name in dispatchers.registered():
        layer = EPMoE(num_experts, 4, 64, 32, dispatcher=name, runner=runner, dtype=dtype, device=device)
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
