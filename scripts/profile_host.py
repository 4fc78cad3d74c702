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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/profile_host")
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    group = ep.init_distributed()
    rank, R = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    E, K, H = 256, 8, 7168
    config = ep.MoeConfig(E, K, H, 2048)
    report = {"R": R, "rows": [], "profiles": {}}
    cases = [("standard", {}), ("deepep_normal", {}), ("deepep_normal", {"num_worst_tokens": None}),
             ("mori", {}), ("deepep_ll", {})]
    for T in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        ids, w = routing(T, E, K, device, 1000 + rank)
        topk = ep.TopKOutput(ids, w)
        for name, opts in cases:
            opts = dict(opts)
            label = name
            if "num_worst_tokens" in opts:
                opts["num_worst_tokens"] = T * R
                label = "deepep_normal_static"
            if name == "mori":
                opts["max_dispatch_tokens_per_rank"] = T
            if name == "deepep_ll":
                if T > 256:
                    continue
                opts["num_max_dispatch_tokens_per_rank"] = T
            d = ep.dispatchers.create(name, config, group=group, device=device, **opts)
            out = d.dispatch(x, topk)
            if name == "deepep_ll":
                y_rows = out.recv_x.clone()
            elif name == "mori":
                y_rows = out.recv_x.clone()
            elif name == "standard":
                y_rows = out.hidden_states.clone()
            else:
                y_rows = out.recv_x.clone()
            ci = CombineInput(y_rows, out)
            row = {"dispatcher": label, "T": T}
            row["dispatch_host_us"] = host_us(lambda: d.dispatch(x, topk))
            row["dispatch_dev_us"] = device_us(lambda: d.dispatch(x, topk))
            row["combine_host_us"] = host_us(lambda: d.combine(ci))
            row["combine_dev_us"] = device_us(lambda: d.combine(ci))
            row["dispatch_syncs"] = host_syncs(lambda: d.dispatch(x, topk))
            row["combine_syncs"] = host_syncs(lambda: d.combine(ci))
            if name == "deepep_normal" and label == "deepep_normal":
                row["reuse_host_us"] = host_us(lambda: d.dispatch(x, topk, handle=out.handle))
                row["reuse_dev_us"] = device_us(lambda: d.dispatch(x, topk, handle=out.handle))
                row["reuse_syncs"] = host_syncs(lambda: d.dispatch(x, topk, handle=out.handle))
            if rank == 0:
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("syncs")}), flush=True)
                print("  syncs:", {k: len(v) for k, v in row.items() if k.endswith("syncs")},
                      row["dispatch_syncs"][:3], flush=True)
            report["rows"].append(row)
            if args.profile:
                report["profiles"][f"{label}/T{T}/dispatch"] = profile_table(lambda: d.dispatch(x, topk))
                report["profiles"][f"{label}/T{T}/combine"] = profile_table(lambda: d.combine(ci))
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_host.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "profile_tables.txt"), "w") as f:
            for key, table in report["profiles"].items():
                f.write(f"===== {key}\n{table}\n")
    ep.destroy_distributed()


if __name__ == "__main__":
    main()
