"""Where a dispatch's host time goes (GPU, under torchrun): per dispatcher and op, the median CPU
wall time of one call with no device sync after it, the device time, the host syncs counted by
torch.cuda.set_sync_debug_mode, and torch.profiler's top CPU ops.

    torchrun --nproc-per-node 2 scripts/profile_host.py --out DIR [--tokens 128,4096]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.runner_core import CombineInput
from ep_runtime.testing import host_syncs


def routing(T, E, K, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, device=device, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device=device, generator=gen)
    return ids, w / w.sum(1, keepdim=True)


def host_us(fn, repeats=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    samples.sort()
    return samples[len(samples) // 2]


def device_us(fn, repeats=30, warmup=5):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        dist.barrier()
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def profile_table(fn, rows=25):
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def trace_file(path):
    """A function that writes a torch.profiler chrome trace (CPU ops and CUDA kernels) of 5 calls to path."""
    def run(fn):
        from torch.profiler import ProfilerActivity, profile
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        prof.export_chrome_trace(path)
        return path
    run.__name__ = "trace"
    return run


def python_table(fn, calls=50, rows=30):
    """cProfile of `calls` calls (no device sync between them): where the Python time goes, by own time."""
    import cProfile
    import io
    import pstats
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def floor_us(device) -> dict:
    """What one launch costs the host here: a torch op, an empty Triton kernel through Triton's launch
    path, and the same kernel through ep_runtime.triton_launch (the direct launch our kernels use)."""
    import triton
    import triton.language as tl

    from ep_runtime import triton_launch

    @triton.jit
    def _noop(ptr, n):
        tl.store(ptr + tl.arange(0, 16), tl.arange(0, 16), mask=tl.arange(0, 16) < n)

    buf = torch.zeros(16, device=device, dtype=torch.int32)
    direct = triton_launch.fast_launch(_noop)
    return {"torch add_": host_us(lambda: buf.add_(1)), "torch.empty": host_us(lambda: torch.empty(16, device=device)),
            "triton launch": host_us(lambda: _noop[(1,)](buf, 16)),
            "fast_launch": host_us(lambda: direct[(1,)](buf, 16)),
            "fast_launch disabled": list(triton_launch._DISABLED)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/profile_host")
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--profile", action="store_true", help="torch.profiler's top CPU ops per case")
    p.add_argument("--python", action="store_true", help="cProfile's top Python functions per case")
    p.add_argument("--trace", action="store_true", help="a chrome trace per case and op (rank 0) in --out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_host needs CUDA GPUs (device times, host syncs), under torchrun")
        return 2
    group = ep.init_distributed()
    rank, R = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    E, K, H = 256, 8, 7168
    config = ep.MoeConfig(E, K, H, 2048)
    report = {"R": R, "rows": [], "profiles": {}, "floor": floor_us(device)}
    if rank == 0:
        print("floor (host us per call):", report["floor"], flush=True)
    # (label, dispatcher, its options at T tokens per rank; None: not profiled at that T)
    cases = [("standard", "standard", lambda T: {}),
             ("deepep_normal", "deepep_normal", lambda T: {}),
             ("deepep_normal_static", "deepep_normal", lambda T: {"num_worst_tokens": T * R}),
             ("mori", "mori", lambda T: {"max_dispatch_tokens_per_rank": T}),
             ("deepep_ll", "deepep_ll", lambda T: {"num_max_dispatch_tokens_per_rank": T} if T <= 256 else None)]
    for T in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        ids, w = routing(T, E, K, device, 1000 + rank)
        topk = ep.TopKOutput(ids, w)
        for label, name, options in cases:
            opts = options(T)
            if opts is None:
                continue
            d = ep.dispatchers.create(name, config, group=group, device=device, **opts)
            out = d.dispatch(x, topk)
            # combine's rows: the received rows as they came (standard receives x itself)
            y_rows = (out.hidden_states if name == "standard" else out.recv_x).clone()
            ci = CombineInput(y_rows, out)
            row = {"dispatcher": label, "T": T}
            row["dispatch_host_us"] = host_us(lambda: d.dispatch(x, topk))
            row["dispatch_dev_us"] = device_us(lambda: d.dispatch(x, topk))
            row["combine_host_us"] = host_us(lambda: d.combine(ci))
            row["combine_dev_us"] = device_us(lambda: d.combine(ci))
            row["dispatch_syncs"] = host_syncs(lambda: d.dispatch(x, topk))
            row["combine_syncs"] = host_syncs(lambda: d.combine(ci))
            if label == "deepep_normal":
                row["reuse_host_us"] = host_us(lambda: d.dispatch(x, topk, handle=out.handle))
                row["reuse_dev_us"] = device_us(lambda: d.dispatch(x, topk, handle=out.handle))
                row["reuse_syncs"] = host_syncs(lambda: d.dispatch(x, topk, handle=out.handle))
            if rank == 0:
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("syncs")}), flush=True)
                print("  syncs:", {k: len(v) for k, v in row.items() if k.endswith("syncs")},
                      row["dispatch_syncs"][:3], flush=True)
            report["rows"].append(row)
            ops = {"dispatch": lambda: d.dispatch(x, topk), "combine": lambda: d.combine(ci)}
            if label == "deepep_normal":
                ops["reuse"] = lambda: d.dispatch(x, topk, handle=out.handle)
            os.makedirs(args.out, exist_ok=True)
            for op, fn in ops.items():
                tables = [t for flag, t in ((args.profile, profile_table), (args.python, python_table),
                                            (args.trace, trace_file(os.path.join(
                                                args.out, f"trace_{label}_T{T}_{op}.r{rank}.json")))) if flag]
                for table in tables:
                    report["profiles"][f"{label}/T{T}/{op}/{table.__name__}"] = table(fn)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_host.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "profile_tables.txt"), "w") as f:
            for key, table in report["profiles"].items():
                f.write(f"===== {key}\n{table}\n")
    ep.destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
