"""One fixed fp32 problem per (dispatcher, runner) pair, for tests/test_bit_identical.py: the layer's
output and gradients on each of 2 gloo ranks, built only from the public API so that the same code
runs on the tree before the runner-layout/placement restructuring (commit bdbf96f) to record what it gave.

The bits depend on the machine (MKL takes other code paths on other CPUs: an AMD EPYC's digests differ from
those first recorded), so each machine kind has its own recording, made by the old tree on it:

    git worktree add /tmp/old bdbf96f && pip install --no-deps --no-build-isolation --target /tmp/old_site /tmp/old
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/old_site python tests/bit_identical_case.py tests/data/bdbf96f_outputs_<kind>.json
"""
import hashlib
import json
import sys

import torch

import ep_runtime as ep

# The pairs that ran before the restructuring (masked ran only under deepep_ll, triton not under it).
PAIRS = [("standard", "torch"), ("standard", "triton"), ("deepep_normal", "torch"), ("deepep_normal", "triton"),
         ("mori", "torch"), ("mori", "triton"), ("deepep_ll", "torch"), ("deepep_ll", "masked")]
OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 16}, "mori": {"max_dispatch_tokens_per_rank": 16}}


def rank_outputs(rank, world_size, dispatcher, runner):
    E, K, H, I, T = 8, 3, 32, 16, (11, 7)
    gen = torch.Generator().manual_seed(21)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=gen) / I ** 0.5
    xs = [torch.randn(t, H, generator=gen) for t in T]
    ids = [torch.rand(t, E, generator=gen).topk(K, dim=1).indices.to(torch.int32) for t in T]
    for i in ids:
        i[::4, 1] = -1
    ws = [torch.rand(t, K, generator=gen) + 0.1 for t in T]
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dispatcher_options=OPTIONS.get(dispatcher))
    layer.load_experts(w13, w2)
    x = xs[rank].clone().requires_grad_(True)
    y = layer(x, ids[rank], ws[rank])
    (y * torch.linspace(-1, 1, H)).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw13": layer.w13.grad, "dw2": layer.w2.grad}


def digests(rank, world_size, dispatcher, runner):
    """SHA-256 (first 32 hex digits) of each tensor rank_outputs returns."""
    out = rank_outputs(rank, world_size, dispatcher, runner)
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:32] for k, v in out.items()}


if __name__ == "__main__":  # record this tree's digests on this machine (see the module docstring)
    from ep_runtime.testing import run_ranks
    recorded = {f"{d}/{r}": run_ranks(digests, 2, d, r, timeout=240) for d, r in PAIRS}
    with open(sys.argv[1], "w") as f:
        json.dump(recorded, f, indent=1, sort_keys=True)
