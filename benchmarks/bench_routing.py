"""Top-k routing (ep.select_experts) on one GPU: the routing kernel against the same call on torch ops.

    python benchmarks/bench_routing.py [--tokens 1,128,4096,16384] [--json out.json]     # ~20 s on an H200

Routers: DeepSeek-V3 (256 experts, sigmoid, 8 groups of which 4 kept by their best two, correction bias, top-8,
renormalized, scaled by 2.5), Qwen3-MoE (128, softmax, top-8, renormalized), Mixtral (8, softmax, top-2,
renormalized); fp32 logits N(0, 1). Per path and T: "device" the time per call of 50 back-to-back calls
(CUDA events), "graph" per call of a CUDA graph holding 10 calls, "host" the median CPU time of one call with
no sync after it. Also how many rows pick other experts than the torch path (near-ties in fp32: the two
compute exp differently). Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

import ep_runtime as ep
from ep_runtime import routing_kernels

ROUTERS = {
    "deepseek-v3": (256, ep.TopKConfig(8, "sigmoid", True, 8, 4, routed_scaling_factor=2.5), True),
    "qwen3-moe": (128, ep.TopKConfig(8, "softmax", True), False),
    "mixtral": (8, ep.TopKConfig(2, "softmax", True), False),
}


def _times(fn, calls: int = 50) -> tuple[float, float, float]:
    """(device us per call back to back, us per call replayed in a graph of 10, host us of one call)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    device = start.elapsed_time(end) * 1e3 / calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    replay = start.elapsed_time(end) * 1e3 / 50
    host = []
    for _ in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return device, replay, sorted(host)[len(host) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,128,4096,16384")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_routing: no CUDA device; nothing to measure")
        return 0
    device = torch.device("cuda", 0)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    print(f"{'router':<12} {'T':>6} {'path':<7} {'device us':>10} {'graph us':>9} {'host us':>8}  rows picking otherwise")
    for name, (E, config, with_bias) in ROUTERS.items():
        bias = torch.randn(E, device=device, generator=gen) * 0.1 if with_bias else None
        for T in (int(t) for t in args.tokens.split(",")):
            logits = torch.randn(T, E, device=device, generator=gen)
            with torch.inference_mode():
                fused = ep.select_experts(logits, config, bias)
                with mock.patch.object(routing_kernels, "usable", lambda logits: False):
                    plain = ep.select_experts(logits, config, bias)
                    torch_times = _times(lambda: ep.select_experts(logits, config, bias))
                kernel_times = _times(lambda: ep.select_experts(logits, config, bias))
            differ = int((fused.topk_ids.sort(1).values != plain.topk_ids.sort(1).values).any(1).sum())
            for path, (dev, graph, host) in (("torch", torch_times), ("kernel", kernel_times)):
                rows.append(dict(router=name, T=T, path=path, device_us=round(dev, 2), graph_us=round(graph, 2),
                                 host_us=round(host, 1), rows_differ=differ))
                print(f"{name:<12} {T:>6} {path:<7} {dev:>10.2f} {graph:>9.2f} {host:>8.1f}  "
                      f"{differ if path == 'kernel' else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
