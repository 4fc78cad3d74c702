"""One decode step of a whole EPMoE layer, eager against its CUDA-graph replay.

    python benchmarks/bench_decode_layer.py                      # one GPU: DeepSeek-V3 and a toy shape, ~1 min on an H200
    python benchmarks/bench_decode_layer.py --shapes toy --tokens 48
    torchrun --nproc-per-node 2 benchmarks/bench_decode_layer.py # one rank per GPU, experts sharded (rank 0 prints)

The layer is deepep_ll + masked (the static-shape decode path), bf16, its E experts spread over the ranks
(all on one rank without torchrun), fed T tokens per rank and step. "eager" is the time per step of 40 back-to-back forward calls (no sync between them: what
a serving loop that does not capture graphs sees), "host" the CPU time of one such call, "graph" the time per
replay of the same step captured once. At a real model's shape the step reads gigabytes of expert weights
and the host's launches hide under it; at a toy shape the host is the step. Without CUDA it says so and
exits 0.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import ep_runtime as ep
from ep_runtime.bench.settings import int_at_least

SHAPES = {"deepseek-v3": (256, 8, 7168, 2048), "toy": (16, 4, 512, 256)}  # (E, K, H, I)


def step_times(E: int, K: int, H: int, I: int, T: int, group, device: torch.device, steps: int = 40) -> dict:
    """Per-step eager time, host time and graph replay time of one layer (weights N(0, 1/fan_in))."""
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_ll", runner="masked", group=group, dtype=torch.bfloat16,
                     device="meta",                     dispatcher_options={"num_max_dispatch_tokens_per_rank": max(T, 1)})
    layer.to_empty(device=device)  # weights drawn on the device: 22 GB of DeepSeek-V3 experts in a second
    with torch.no_grad():
        layer.w13.normal_(0, H ** -0.5)
        layer.w2.normal_(0, I ** -0.5)
    inputs = []
    for _ in range(4):
        scores = torch.rand(T, E, device=device).topk(K, dim=1)
        inputs.append((torch.randn(T, H, device=device, dtype=torch.bfloat16), scores.indices.to(torch.int32),
                       torch.softmax(scores.values, dim=1)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        for i in range(5):
            layer(*inputs[i % 4])
        layer.dispatcher.raise_deferred()
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        for i in range(steps):
            layer(*inputs[i % 4])
        host = (time.perf_counter() - t0) * 1e6 / steps
        end.record()
        end.synchronize()
        eager = start.elapsed_time(end) * 1e3 / steps
        layer.dispatcher.raise_deferred()  # the eager calls' deferred checks, before the capture
        static = [t.clone() for t in inputs[0]]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                layer(*static)
        torch.cuda.current_stream().wait_stream(side)
        layer.dispatcher.raise_deferred()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(*static)
        want = layer(*static).clone()
        graph.replay()
        torch.cuda.synchronize()
        same = torch.equal(out, want)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        replay = start.elapsed_time(end) * 1e3 / steps
    return {"eager_us": round(eager, 1), "host_us": round(host, 1), "graph_us": round(replay, 1),
            "eager_over_graph": round(eager / replay, 3), "replay_equals_eager": same}


def layer_ranks(group) -> int:
    return torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="deepseek-v3,toy", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--tokens", type=int_at_least(0), default=128, help="tokens per step (default 128)")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    shapes = args.shapes.split(",")
    for name in shapes:  # checked before anything runs (on a machine without CUDA too)
        if name not in SHAPES:
            p.error(f"--shapes: {name!r} is none of {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        print("bench_decode_layer: skipped: needs a CUDA GPU (CUDA graphs)")
        return 0
    group = ep.init_distributed()  # a single process without a launcher: one rank, every expert local
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    device = ep.distributed.device_for_rank()
    rows = []
    for name in shapes:
        E, K, H, I = SHAPES[name]
        row = {"shape": name, "E": E, "K": K, "H": H, "I": I, "T": args.tokens, "ranks": layer_ranks(group),
               **step_times(E, K, H, I, args.tokens, group, device)}
        if rank == 0:
            print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    ep.destroy_distributed()
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(row["replay_equals_eager"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
