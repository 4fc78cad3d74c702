"""Smallest EP job: `torchrun --nproc-per-node 2 examples/torchrun_basic.py` (CPU or GPU).

Every rank routes its own random tokens; the layer exchanges them with the
ranks owning the experts and checks the result against the float64 reference.
"""
import torch

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err


def main() -> None:
    group = ep.init_distributed()
    rank = torch.distributed.get_rank(group) if group is not None else 0
    device = ep.distributed.device_for_rank()
    E, K, H, I = 8, 2, 64, 128
    gen = torch.Generator().manual_seed(0)  # same global weights on every rank
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5
    dispatcher = "deepep_normal" if "deepep_normal" in ep.dispatchers.registered() else "standard"
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, group=group, device=device)
    layer.load_experts(w13, w2)
    torch.manual_seed(1 + rank)
    x = torch.randn(16 + rank, H, device=device)
    ids, weights = ep.select_experts(torch.randn(x.shape[0], E, device=device), ep.TopKConfig(top_k=K))
    y = layer(x, ids, weights)
    ref = moe_reference(x, ids, weights, w13, w2, layer.config)
    print(f"rank {rank}: dispatcher={dispatcher} tokens={x.shape[0]} rel_err={rel_err(y, ref):.2e}")
    ep.destroy_distributed()


if __name__ == "__main__":
    main()
