"""Decode-style inference with a deepep_ll layer captured in a CUDA graph (GPU only).

    torchrun --nproc-per-node 2 examples/inference_cuda_graph.py      # one rank per GPU
    python examples/inference_cuda_graph.py                           # one GPU

deepep_ll has static shapes (every rank sends M = num_max_dispatch_tokens_per_rank rows to every
peer) and no host sync, so route -> dispatch -> experts -> combine captures into one CUDA graph.
The script captures the layer once, then for a few decode steps copies new tokens into the graph's
static inputs, replays, and checks the result against an eager run and the float64 reference.
Without CUDA, or where the deepep_ll dispatcher is not registered, it says so and exits 0.
"""
import sys
import time

import torch

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import tolerance

E, K, H, I, M, T = 16, 4, 512, 256, 64, 48  # T tokens per rank and step (T <= M), bf16 weights


def pick_runner() -> str:
    """The best available runner that computes the deepep_ll format ("masked" reads masked_m)."""
    for name in ("masked", "triton", "torch"):
        if name in ep.runners.available() and "deepep_ll" in ep.supported_formats(name):
            return name
    raise RuntimeError(f"no available runner computes deepep_ll; registered pairs: {ep.registered_pairs()}")


def main() -> int:
    if not torch.cuda.is_available():
        print("inference_cuda_graph: skipped: needs a CUDA GPU (CUDA graphs); this process sees none")
        return 0
    if "deepep_ll" not in ep.dispatchers.registered():
        print(f"inference_cuda_graph: skipped: the deepep_ll dispatcher is not registered "
              f"(registered: {', '.join(ep.dispatchers.registered())})")
        return 0

    group = ep.init_distributed()  # NCCL; each rank on the GPU of its local rank
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = ep.distributed.device_for_rank()
    runner = pick_runner()
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_ll", runner=runner, group=group, dtype=torch.bfloat16,
                     device=device, dispatcher_options={"num_max_dispatch_tokens_per_rank": M})
    gen = torch.Generator().manual_seed(0)  # the same global experts on every rank
    w13 = (torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=gen) * I ** -0.5).to(torch.bfloat16)
    layer.load_experts(w13.to(device), w2.to(device))
    router = torch.randn(H, E, generator=gen).to(device, torch.bfloat16)

    # The graph reads these buffers; each step copies its tokens in.
    static_x = torch.zeros(T, H, dtype=torch.bfloat16, device=device)
    tokens = torch.Generator().manual_seed(1 + rank)

    def new_tokens():
        return torch.randn(T, H, generator=tokens).to(device, torch.bfloat16)

    def forward(x):
        return layer(x, router_logits=x @ router)  # routing is captured too

    with torch.inference_mode():
        static_x.copy_(new_tokens())
        side = torch.cuda.Stream()  # warm up (allocations, kernel selection) off the capture stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = forward(static_x)

        worst_vs_eager, worst_vs_ref = 0.0, 0.0
        for step in range(5):
            x = new_tokens()
            static_x.copy_(x)
            graph.replay()
            eager = forward(x)
            torch.cuda.synchronize()
            worst_vs_eager = max(worst_vs_eager, rel_err(static_y.float(), eager.float()))
            ids, weights = ep.select_experts(x @ router, layer.topk_config)
            ref = moe_reference(x.double().cpu(), ids.cpu(), weights.double().cpu(), w13.double(), w2.double(),
                                layer.config)
            worst_vs_ref = max(worst_vs_ref, rel_err(static_y.double().cpu(), ref))

        timings = {}
        for name, run in (("graph replay", graph.replay), ("eager", lambda: forward(static_x))):
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            torch.distributed.barrier()
            start = time.perf_counter()
            for _ in range(50):
                run()
            torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - start) / 50 * 1e6

    limit = tolerance(torch.bfloat16)
    print(f"rank {rank}: deepep_ll + {runner}, {world_size} ranks, T={T} M={M}: replay vs eager rel err "
          f"{worst_vs_eager:.1e}, vs float64 reference {worst_vs_ref:.1e}; "
          f"{timings['graph replay']:.0f} us per replay, {timings['eager']:.0f} us eager")
    ok = worst_vs_eager <= limit and worst_vs_ref <= limit
    flags = torch.tensor([int(ok)], device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    all_ok = bool(flags.item())
    # The graph holds the NCCL work it captured, and NCCL's communicator waits for such work to be
    # released when it is destroyed: free the graph (and let the device finish) before the group
    # goes, or the process never exits.
    graph.reset()
    del graph
    torch.cuda.synchronize()
    ep.destroy_distributed()
    if rank == 0:
        print("inference_cuda_graph: OK" if all_ok else f"inference_cuda_graph: FAILED (limit {limit:g})")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
