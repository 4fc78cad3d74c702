"""Two-batch overlap: a decode step and a prefill step of a DeepSeek-V3-shaped MoE layer, each split
in two micro-batches whose exchanges run while the other micro-batch's experts compute.

    torchrun --nproc-per-node 2 examples/two_batch_overlap.py      # GPUs: E=256, K=8, H=7168, I=2048, bf16
    torchrun --nproc-per-node 2 examples/two_batch_overlap.py      # CPU ranks (gloo): small shapes, fp32

Sequential: dispatch, experts, combine of micro-batch 0, then of micro-batch 1. Overlapped
(ep_runtime.bench.overlap.run_overlapped): micro-batch 0's dispatch issued with async_op=True (on the
device's communication stream; on CPU ranks its exchange thread), then each micro-batch waits for its
own dispatch, queues its experts, and issues the next micro-batch's dispatch and its own combine
asynchronously, so micro-batch 1's dispatch and micro-batch 0's combine travel while the other
computes. Decode uses deepep_ll (on GPUs timed as CUDA-graph replays, both schedules captured);
prefill uses deepep_normal with num_worst_tokens (static shapes, no host sync). The overlapped outputs
must equal the sequential ones bit for bit on every rank; the speed-up is printed.
"""
import argparse
import sys

import torch

import ep_runtime as ep
from ep_runtime.bench.overlap import build_layer, capture_graphs, expert_weights, run_overlapped, run_sequential
from ep_runtime.bench.settings import int_at_least
from ep_runtime.bench.timing import measure_interleaved
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import tolerance

GPU_SHAPE = dict(experts=256, top_k=8, hidden=7168, intermediate=2048, decode=64, prefill=4096)
CPU_SHAPE = dict(experts=16, top_k=4, hidden=64, intermediate=32, decode=8, prefill=48)


def parse() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in GPU_SHAPE:
        p.add_argument(f"--{name.replace('_', '-')}", type=int_at_least(1), default=None,
                       help=f"default {GPU_SHAPE[name]} on GPUs, {CPU_SHAPE[name]} on CPU ranks"
                       + (" (tokens per micro-batch and rank)" if name in ("decode", "prefill") else ""))
    p.add_argument("--repeats", type=int_at_least(1), default=None, help="timed repeats (default 20 on GPUs, 5 on CPU)")
    return p, p.parse_args()


def main() -> int:
    parser, args = parse()
    group = ep.init_distributed()
    rank, R = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = ep.distributed.device_for_rank()
    cuda = device.type == "cuda"
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v
             for k, v in (GPU_SHAPE if cuda else CPU_SHAPE).items()}
    E, K, H, I = shape["experts"], shape["top_k"], shape["hidden"], shape["intermediate"]  # noqa: E741
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = args.repeats or (20 if cuda else 5)
    routing = ep.TopKConfig(top_k=K, scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=4,
                            routed_scaling_factor=2.5, group_score="top2_sum")  # DeepSeek-V3's router
    try:
        routing.check(E)
    except ValueError as err:  # named by the flags: the router's arguments are not the user's
        parser.error(f"--experts {E} --top-k {K}: DeepSeek-V3's router (8 expert groups, the best 4 picked) needs "
                     f"--experts a multiple of 8, at least 16, and --top-k at most --experts / 2 ({err})")
    gen = torch.Generator().manual_seed(0)  # the same router on every rank
    router = (torch.randn(H, E, generator=gen) * H ** -0.5).to(device, dtype)
    tokens = torch.Generator().manual_seed(1 + rank)
    all_ok = True
    phases = (("decode", shape["decode"], "deepep_ll", lambda T: dict(num_max_dispatch_tokens_per_rank=T)),
              ("prefill", shape["prefill"], "deepep_normal",
               lambda T: dict(num_worst_tokens=R * T, num_max_dispatch_tokens_per_rank=T)))
    for phase, T, dispatcher, options in phases:
        # Each rank draws its own experts on its device (the same expert from the same seed everywhere).
        layer = build_layer(E, K, H, I, dispatcher, options(T), group, dtype, device)
        with torch.inference_mode():
            batches = []
            for _ in range(2):
                x = torch.randn(T, H, generator=tokens).to(device, dtype)
                batches.append((x, ep.select_experts(x @ router, routing)))
            sequential, overlapped = run_sequential(layer, batches), run_overlapped(layer, batches)
            identical = all(torch.equal(a, b) for a, b in zip(sequential, overlapped))
            worst = 0.0
            if H * E <= 1 << 16:  # small shapes: the float64 reference too, from every expert's weights
                w13, w2 = (torch.stack(w).double().cpu() for w in zip(*(
                    expert_weights(e, H, I, dtype, device) for e in range(E))))
                for (x, (ids, weights)), y in zip(batches, overlapped):
                    ref = moe_reference(x.double().cpu(), ids.cpu(), weights.double().cpu(), w13, w2, layer.config)
                    worst = max(worst, rel_err(y.double().cpu(), ref))
            timing = dict(repeats=repeats, warmup=3, device=device, group=group)
            graphs = cuda and phase == "decode"
            if graphs:  # decode: both schedules captured, replays timed and compared
                seq_graph, seq_out = capture_graphs(lambda k: run_sequential(layer, batches), 1, device)
                ovl_graph, ovl_out = capture_graphs(lambda k: run_overlapped(layer, batches), 1, device)
                seq_graph[0].replay()
                ovl_graph[0].replay()
                torch.cuda.synchronize(device)
                identical = identical and all(torch.equal(a, b) for a, b in zip(seq_out[0], ovl_out[0])) and all(
                    torch.equal(a, b) for a, b in zip(seq_out[0], sequential))
                t_seq, t_ovl = (stats.median_us for stats in measure_interleaved(
                    (lambda i: seq_graph[0].replay(), lambda i: ovl_graph[0].replay()), **timing))
                torch.cuda.synchronize(device)
                for g in seq_graph + ovl_graph:  # a graph holding NCCL work must go before the group does
                    g.reset()
            else:
                t_seq, t_ovl = (stats.median_us for stats in measure_interleaved(
                    (lambda i: run_sequential(layer, batches), lambda i: run_overlapped(layer, batches)), **timing))
        ok = identical and worst <= tolerance(dtype)
        flag = torch.tensor([int(ok)], device=device if cuda else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        all_ok = all_ok and bool(flag.item())
        if rank == 0:
            print(f"{phase}: 2x{T} tok/rank, {dispatcher} + {layer.runner.backend.name}"
                  f"{', CUDA-graph replays' if graphs else ''}: sequential {t_seq:.0f} us, overlapped {t_ovl:.0f} us "
                  f"({t_ovl / t_seq:.2f}x sequential, speed-up {t_seq / t_ovl:.2f}x); bit-identical: "
                  f"{'yes' if identical else 'NO'}" + (f"; vs float64 reference {worst:.1e}" if worst else ""),
                  flush=True)
    ep.destroy_distributed()
    if rank == 0:
        print(f"two_batch_overlap: {'OK' if all_ok else 'FAILED'} ({R} ranks, E={E} K={K} H={H} I={I}, "
              f"{str(dtype).removeprefix('torch.')})")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
