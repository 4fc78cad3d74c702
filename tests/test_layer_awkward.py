"""EPMoE on awkward but valid input, every dispatcher x runner on 2 gloo ranks, against the float64 reference:
non-finite tokens stay in their own rows, and strided views (expanded, transposed, offset, narrow id dtypes) give
what contiguous copies give, gradients included."""
import pytest
import torch

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import run_ranks, tolerance

OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 8}, "mori": {"max_dispatch_tokens_per_rank": 8}}
DISPATCHERS = ["standard", "deepep_normal", "deepep_ll", "mori"]
E, K, H, I = 8, 2, 16, 8


def _layers(dispatcher):
    """(runner, layer) for each backend that runs here, all holding the same random experts."""
    torch.manual_seed(3)
    for runner in ("torch", "triton", "masked"):
        if runner in ep.runners.available():
            yield runner, ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner,
                                   dispatcher_options=OPTIONS.get(dispatcher))


def _inputs(rank, T=6):
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(T, H, generator=gen)
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    return x, ids, torch.rand(T, K, generator=gen) + 0.1


def _non_finite_rank(rank, world_size, dispatcher):
    errors = {}
    for runner, layer in _layers(dispatcher):
        experts = layer.gather_experts()  # every expert, [E, ...], for the reference
        for value in (float("nan"), float("inf")):
            x, ids, w = _inputs(rank)
            x[1] = value  # a whole non-finite row that goes to no expert: it adds nothing, y[1] = 0
            ids[1] = -1
            x[2, 0] = value  # routed: its own output is non-finite, nobody else's
            y = layer(x, ids, w)
            assert not torch.isfinite(y[2]).all(), (runner, value)
            assert torch.equal(y[1], torch.zeros(H)), (runner, value, y[1])
            keep = [0, 1, 3, 4, 5]
            want = moe_reference(x[keep], ids[keep], w[keep], experts.w13, experts.w2, layer.config)
            errors[f"{runner} {value}"] = rel_err(y[keep], want)
    return errors


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_non_finite_tokens_stay_in_their_rows(dispatcher):
    # A token's NaN or inf must not reach other tokens through a padded GEMM, a shared expert block or a combine
    # (0 * NaN is NaN), nor a row whose slots are all -1.
    for errors in run_ranks(_non_finite_rank, 2, dispatcher):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def _strided_rank(rank, world_size, dispatcher):
    errors = {}
    for runner, layer in _layers(dispatcher):
        experts = layer.gather_experts()
        x, ids, w = _inputs(rank)
        row = x[rank:rank + 1].clone().requires_grad_(True)
        wide = torch.zeros(K, 3 + 6, dtype=torch.float64)
        wide[:, 3:] = w.t()
        weights = wide[:, 3:].t().requires_grad_(True)  # transposed float64 view with a storage offset
        views = [  # (x, ids, weights), none of them contiguous
            (row.expand(6, H), ids.t().contiguous().t(), weights),
            (row.expand(6, H), ids[:1].to(torch.int16).expand(6, K), w[:1].expand(6, K)),
            (row.expand(6, H), ids.to(torch.uint8)[:, [1, 0]].t().contiguous().t(), w.t().contiguous().t()),
        ]
        for n, (xv, idv, wv) in enumerate(views):
            row.grad = weights.grad = None
            y = layer(xv, idv, wv)
            y.square().sum().backward()
            row64 = row.detach().double().requires_grad_(True)
            w64 = wv.detach().double().requires_grad_(True)
            # (x's and the weights' gradients come from this rank's tokens only, as the reference's do)
            want = moe_reference(row64.expand(6, H), idv.long(), w64, experts.w13, experts.w2, layer.config)
            want.square().sum().backward()
            errors[f"{runner} {n} y"] = rel_err(y.detach(), want.detach())
            errors[f"{runner} {n} dx"] = rel_err(row.grad, row64.grad)
            if wv.requires_grad:
                errors[f"{runner} {n} dw"] = rel_err(weights.grad, w64.grad)
    return errors


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_strided_inputs_match_reference(dispatcher):
    # x broadcast from one row (stride 0, a leaf that needs a gradient), transposed ids, expanded ids and weights,
    # a float64 weights view with a storage offset, int16 and uint8 ids: as contiguous copies would give.
    for errors in run_ranks(_strided_rank, 2, dispatcher):
        assert max(errors.values()) <= tolerance(torch.float32), errors


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_move_to_unsupported_dtype_is_refused_before_moving(dtype):
    """layer.to(complex64) used to succeed (nn.Module.to takes complex and float8 dtypes) and the next forward
    blamed x's dtype; now .to() names the dtype and the allowed ones, and the layer keeps its float32 experts."""
    torch.manual_seed(0)
    E, K, H, I = 8, 2, 16, 8
    layer = ep.EPMoE(E, K, H, I, dispatcher="standard", runner="torch")
    w13, w2 = torch.randn(E, 2 * I, H) * 0.3, torch.randn(E, H, I) * 0.3
    layer.load_experts(w13, w2)
    with pytest.raises(ValueError, match=rf"EPMoE.to\(...\): dtype={dtype}; allowed: torch.float32"):
        layer.to(dtype)
    assert layer.w13.dtype == layer.w2.dtype == torch.float32
    x, ids, w = torch.randn(6, H), torch.randint(0, E, (6, K), dtype=torch.int32), torch.rand(6, K)
    y = layer(x, ids, w)
    assert rel_err(y.double(), moe_reference(x.double(), ids, w.double(), w13.double(), w2.double(),
                                             layer.config)) < tolerance(torch.float32)
    assert layer.double()(x.double(), ids, w).dtype == torch.float64  # supported moves still work
