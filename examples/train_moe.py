"""Train a tiny MoE transformer with expert parallelism: `torchrun --nproc-per-node 2 examples/train_moe.py`.

Each rank holds the dense weights (embeddings, attention, routers: data parallel, gradients averaged
with all_reduce) and 1/R of every MoE layer's experts (expert parallel: the dispatcher's backward
brings the gradients of every rank's tokens home to the expert's owner). The task: continue
x[t+1] = (x[t] + step) mod V, with `step` drawn per sequence, so the model must read the context.

Checked (the script fails otherwise):
- step 0: loss and gradients equal those of a single-process replica (same weights, every expert in
  one process, dispatcher "standard") run on the batches of all ranks together;
- the loss falls.
Runs on CPU ranks (gloo) or GPUs (NCCL); a single process without a launcher works too.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ep_runtime as ep
from ep_runtime.reference import rel_err

V, H, HEADS, E, K, I, LAYERS, SEQ, BATCH = 32, 64, 4, 8, 2, 64, 2, 16, 16


class Block(nn.Module):
    def __init__(self, dispatcher, group, device):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.attn = nn.MultiheadAttention(H, HEADS, batch_first=True)
        self.router = nn.Linear(H, E, bias=False)
        self.moe = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", group=group, device=device)

    def forward(self, x, causal):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = self.norm2(x).flatten(0, 1)  # [T, H], T = batch * seq
        weights, ids = self.router(h).softmax(-1).topk(K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return x + self.moe(h, ids.int(), weights).view_as(x)


class TinyMoE(nn.Module):
    def __init__(self, dispatcher, group, device):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.pos = nn.Parameter(torch.randn(SEQ, H) * 0.02)
        self.blocks = nn.ModuleList(Block(dispatcher, group, device) for _ in range(LAYERS))
        self.head = nn.Linear(H, V)

    def forward(self, tokens):  # tokens [B, SEQ] -> logits [B, SEQ, V]
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool, device=tokens.device).triu(1)
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x, causal)
        return self.head(x)

    def is_expert(self, name):
        return ".moe." in name


def batch(gen, device):
    start = torch.randint(0, V, (BATCH, 1), generator=gen)
    step = torch.randint(1, 4, (BATCH, 1), generator=gen)
    seq = (start + step * torch.arange(SEQ + 1)) % V
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def loss_fn(model, tokens, targets):
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def average_gradients(model, world_size):
    """Loss = mean over ranks. Dense weights are replicated: average their gradients. Expert weights
    live on one rank and already hold the sum over every rank's tokens: divide by R."""
    dense = [p.grad for n, p in model.named_parameters() if not model.is_expert(n) and p.grad is not None]
    if world_size > 1:
        flat = torch.cat([g.flatten() for g in dense])
        dist.all_reduce(flat)
        offset = 0
        for g in dense:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= world_size


def check_step0_against_replica(model, expert_weights, tokens, targets, rank, world_size, device):
    """Gradients of the EP model (already averaged) vs a one-process replica on all ranks' batches."""
    replica = TinyMoE("standard", None, device)  # "standard": every expert here, no exchange
    replica.load_state_dict({n: t for n, t in model.state_dict().items() if not model.is_expert(n)}, strict=False)
    for block, (w13, w2) in zip(replica.blocks, expert_weights):
        block.moe.load_experts(w13, w2)
    if world_size > 1:
        all_tokens, all_targets = [torch.empty_like(tokens) for _ in range(world_size)], [
            torch.empty_like(targets) for _ in range(world_size)]
        dist.all_gather(all_tokens, tokens)
        dist.all_gather(all_targets, targets)
        tokens, targets = torch.cat(all_tokens), torch.cat(all_targets)
    replica_loss = loss_fn(replica, tokens, targets)
    replica_loss.backward()
    worst = 0.0
    replica_params = dict(replica.named_parameters())
    for name, p in model.named_parameters():
        expected = replica_params[name].grad
        if model.is_expert(name):  # this rank's shard of the replica's experts
            block = model.blocks[int(name.split(".")[1])]
            expected = expected[block.moe.placement.local_expert_ids()]
        err = rel_err(p.grad, expected)
        assert err < 1e-4, f"rank {rank}: step-0 gradient of {name} differs from the replica's: rel err {err:.2e}"
        worst = max(worst, err)
    return replica_loss.item(), worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps, >= 20 (default 300)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate, > 0 (default 3e-3)")
    args = parser.parse_args()
    # The loss check compares the mean loss of the first 10 steps with the last 10's: with fewer than 20
    # steps they overlap (with none, both are 0) and "loss did not fall" would blame the model.
    if args.steps < 20:
        parser.error(f"--steps {args.steps}: allowed an int >= 20 (the check compares the mean loss of the "
                     f"first 10 steps with that of the last 10)")
    if not 0 < args.lr < float("inf"):
        parser.error(f"--lr {args.lr}: allowed a finite float > 0")

    group = ep.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = ep.distributed.device_for_rank()
    dispatcher = "deepep_normal" if "deepep_normal" in ep.dispatchers.registered() else "standard"

    torch.manual_seed(0)  # same dense weights on every rank
    model = TinyMoE(dispatcher, group, device).to(device)
    gen = torch.Generator().manual_seed(1)  # same global experts on every rank; each keeps its shard
    expert_weights = [(torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5,
                       torch.randn(E, H, I, generator=gen) * I ** -0.5) for _ in range(LAYERS)]
    for block, (w13, w2) in zip(model.blocks, expert_weights):
        block.moe.load_experts(w13.to(device), w2.to(device))
    expert_weights = [(w13.to(device), w2.to(device)) for w13, w2 in expert_weights]

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own batches
    losses = []
    for step in range(args.steps):
        tokens, targets = batch(data, device)
        loss = loss_fn(model, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(model, world_size)
        global_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
        global_loss = global_loss.item() / world_size
        if step == 0:
            replica_loss, worst = check_step0_against_replica(model, expert_weights, tokens, targets, rank,
                                                              world_size, device)
            assert abs(replica_loss - global_loss) < 1e-5 * abs(replica_loss), (replica_loss, global_loss)
            if rank == 0:
                print(f"step 0: loss {global_loss:.4f} = replica's {replica_loss:.4f}; "
                      f"gradients match the replica's (max rel err {worst:.1e} on rank 0)")
        optimizer.step()
        losses.append(global_loss)
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {global_loss:.4f}")

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"
    if rank == 0:
        print(f"train_moe: OK ({world_size} ranks, dispatcher {dispatcher}): loss {first:.3f} -> {last:.3f}")
    ep.destroy_distributed()


if __name__ == "__main__":
    main()
