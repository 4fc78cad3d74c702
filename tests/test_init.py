"""Issue 15, item 3: a layer's initial experts depend only on the seed and each expert's global id.

Two gloo ranks and one plain process build the same layer after the same torch.manual_seed, without
load_experts: each rank's shard equals the one-process layer's experts [r*L, (r+1)*L) bit for bit,
and the EP layer's output equals the one-process layer's (and the float64 reference computed from
the one-process weights) on every rank's tokens. Before, every rank drew the same local block, so
rank 0's experts 0..3 equalled rank 1's experts 4..7.
"""
import pytest
import torch

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import run_ranks

E, K, H, I = 8, 2, 16, 24
SEED = 1234


def _tokens(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5 + rank, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(x.shape[0])])
    return x, ids, torch.rand(x.shape[0], K, generator=gen)


def _ep_rank(rank, world_size, dispatcher):
    torch.manual_seed(SEED)
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch")
    after = torch.rand(()).item()  # the global generator is left where a one-process layer leaves it
    x, ids, weights = _tokens(rank)
    with torch.no_grad():
        y = layer(x, ids, weights)
    return layer.placement.first_expert, layer.w13.tolist(), layer.w2.tolist(), y.tolist(), after


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_ep_layer_starts_equal_to_a_one_process_layer(dispatcher):
    torch.manual_seed(SEED)
    single = ep.EPMoE(E, K, H, I, dispatcher="standard", runner="torch")  # no process group: all E experts
    after = torch.rand(()).item()
    L = E // 2
    for rank, (first, w13, w2, y, rank_after) in enumerate(run_ranks(_ep_rank, 2, dispatcher, timeout=120)):
        assert first == rank * L
        assert torch.equal(torch.tensor(w13), single.w13.detach()[first:first + L]), f"rank {rank} w13"
        assert torch.equal(torch.tensor(w2), single.w2.detach()[first:first + L]), f"rank {rank} w2"
        assert rank_after == after
        x, ids, weights = _tokens(rank)
        ref = moe_reference(x.double(), ids, weights.double(), single.w13.detach().double(),
                            single.w2.detach().double(), single.config)
        with torch.no_grad():
            y_single = single(x, ids, weights)
        assert rel_err(torch.tensor(y, dtype=torch.float64), ref) < 1e-5  # float32 vs float64 (contract)
        assert rel_err(torch.tensor(y), y_single) < 1e-5


def test_experts_differ_and_follow_the_seed():
    torch.manual_seed(SEED)
    a = ep.EPMoE(E, K, H, I, runner="torch")
    torch.manual_seed(SEED)
    b = ep.EPMoE(E, K, H, I, runner="torch")
    torch.manual_seed(SEED + 1)
    c = ep.EPMoE(E, K, H, I, runner="torch")
    assert torch.equal(a.w13, b.w13) and torch.equal(a.w2, b.w2)
    assert not torch.equal(a.w13, c.w13)
    w13 = a.w13.detach()
    for e in range(1, E):  # no expert is a copy of another
        assert not torch.equal(w13[0], w13[e])
    # std 1/sqrt(H) and 1/sqrt(I): 8*48*16 and 8*16*24 draws, so within 5% of the target
    assert abs(w13.std().item() * H ** 0.5 - 1) < 0.05
    assert abs(a.w2.detach().std().item() * I ** 0.5 - 1) < 0.05
