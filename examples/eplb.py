"""Expert load balancing: `torchrun --nproc-per-node 4 examples/eplb.py` (CPU ranks or GPUs; 2 work too).

Tokens pick experts with a Zipf(1.2) skew, so the rank holding the hottest experts receives far more
(token, expert) pairs than the others. The layer has 16 redundant experts (64 + 16 physical slots);
it trains a few steps with Adam while counting the load, then one `layer.rebalance(optimizer=...)`
copies the hot experts onto other ranks and moves the weights and Adam's state. The busiest rank's
share drops to near the mean, and the layer's output is unchanged (checked against a float64
reference before and after).
"""
import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.bench import zipf_topk
from ep_runtime.reference import moe_reference, rel_err

E, K, H, I, T = 64, 6, 32, 16, 512

group = ep.init_distributed()
rank, R, device = dist.get_rank(), dist.get_world_size(), ep.distributed.device_for_rank()
copies = 16 if R > 1 and (E + 16) % R == 0 else 0  # one process holds every expert: nothing to spread
dtype = torch.float32
layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", group=group, device=device, dtype=dtype,
                 num_redundant_experts=copies)
torch.manual_seed(0)  # the same global experts on every rank
w13, w2 = torch.randn(E, 2 * I, H) / H ** 0.5, torch.randn(E, H, I) / I ** 0.5
layer.load_experts(w13, w2)
optimizer = torch.optim.Adam(layer.parameters(), lr=1e-4)


def tokens(seed):
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    ids = zipf_topk(gen, T, E, K, 1.2)  # expert 0 the hottest, on every rank
    return (torch.randn(T, H, generator=gen).to(device), ids.to(device),
            (torch.rand(T, K, generator=gen) + 0.1).to(device))


def received_max_over_mean(ids):
    """Pairs the busiest rank receives over the mean, under the layer's current placement."""
    owner = layer.dispatcher.placement.rank_of(layer.placement.to_physical(ids).long())
    per_rank = torch.bincount(owner[owner >= 0].cpu(), minlength=R).double()
    dist.all_reduce(per_rank)
    return float(per_rank.max() / per_rank.mean())


for step in range(3):  # training steps; the layer counts its load as it goes
    x, ids, weights = tokens(step)
    layer(x, ids, weights).square().mean().backward()
    layer.reduce_replica_grads()  # copies of an expert get the sum of their gradients: they stay equal
    optimizer.step()
    optimizer.zero_grad()

x, ids, weights = tokens(100)
with torch.no_grad():
    before = layer(x, ids, weights)
    full = layer.gather_experts()  # every expert, as a checkpoint holds it
    reference = moe_reference(x.double().cpu(), ids.cpu(), weights.double().cpu(), full.w13.double().cpu(),
                              full.w2.double().cpu(), layer.config)
imbalance_before = received_max_over_mean(ids)

plan = layer.rebalance(optimizer=optimizer)  # all-reduced load -> ep.eplb.plan -> weights and Adam state move
with torch.no_grad():
    after = layer(x, ids, weights)
imbalance_after = received_max_over_mean(ids)
errors = (rel_err(before.double().cpu(), reference), rel_err(after.double().cpu(), reference))
assert max(errors) < 1e-5, errors
if rank == 0:
    print(f"eplb: {R} ranks, E={E} + {copies} redundant; busiest rank receives {imbalance_before:.2f}x the mean "
          f"pairs before, {imbalance_after:.2f}x after one rebalance (planned {plan.imbalance:.3f}); "
          f"rel_err vs float64 before {errors[0]:.1e}, after {errors[1]:.1e}")
    print("eplb: OK")
ep.destroy_distributed()
