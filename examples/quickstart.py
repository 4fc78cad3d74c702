"""Quick start: `torchrun --nproc-per-node 2 examples/quickstart.py` (CPU ranks or GPUs)."""
import torch

import ep_runtime as ep

group = ep.init_distributed()  # torchrun, srun, mpirun or a single process
rank, device = torch.distributed.get_rank(), ep.distributed.device_for_rank()
dispatcher = "deepep_normal" if "deepep_normal" in ep.dispatchers.registered() else "standard"
layer = ep.EPMoE(num_experts=8, top_k=2, hidden_size=64, intermediate_size=128,
                 dispatcher=dispatcher, group=group, device=device)
torch.manual_seed(0)  # the same global experts on every rank; each rank keeps its own shard
layer.load_experts(torch.randn(8, 256, 64) / 8, torch.randn(8, 64, 128) / 11)
router = torch.nn.Linear(64, 8, device=device)
torch.manual_seed(1 + rank)  # each rank routes its own tokens
x = torch.randn(10 + rank, 64, device=device)
y = layer(x, router_logits=router(x))  # dispatch -> experts on their owners -> combine
y.sum().backward()  # autograd flows back through the exchange
print(f"rank {rank}: {dispatcher} layer {tuple(x.shape)} -> {tuple(y.shape)}, "
      f"local experts {layer.placement.describe_local_experts()}")
ep.destroy_distributed()
