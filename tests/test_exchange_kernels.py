"""The fused exchange kernels (run here through TRITON_INTERPRET=1 on CPU tensors) against plain
torch: packing of sent rows and metadata, the per-token gather-sum, and their gradients."""
import pytest
import torch

from ep_runtime.dispatchers import exchange_kernels as xk

pytestmark = pytest.mark.skipif(xk.triton is None, reason="triton not installed")


def _case(T=9, H=40, K=3, E=8, R=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids = torch.randint(-1, E, (T, K), generator=gen, dtype=torch.int32)
    w = torch.rand(T, K, generator=gen)
    S = 2 * T + 3
    send_token = torch.randint(0, T + 1, (S,), generator=gen)  # T = pad rows
    send_rank = torch.randint(0, R, (S,), generator=gen)
    return x, ids, w, send_token, send_rank, E // R


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("local", [True, False])
def test_pack_rows_matches_torch(dtype, local):
    x, ids, w, send_token, send_rank, L = _case(dtype=dtype)
    rows, meta = xk.pack_rows(x, ids, w, send_token, send_rank, L if local else None)
    T, K = ids.shape
    x_pad = torch.cat([x, torch.zeros(1, x.shape[1], dtype=dtype)])
    ids_pad = torch.cat([ids, torch.full((1, K), -1, dtype=torch.int32)]).long()[send_token]
    if local:
        loc = ids_pad - send_rank[:, None] * L
        ids_pad = torch.where((ids_pad >= 0) & (loc >= 0) & (loc < L), loc, -1)
    w_pad = torch.cat([w, torch.zeros(1, K)])[send_token]
    assert torch.equal(rows, x_pad[send_token])
    assert torch.equal(meta[:, :K], w_pad) and torch.equal(meta[:, K:], ids_pad.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_sum_matches_float64(dtype):
    gen = torch.Generator().manual_seed(1)
    T, R, H, S = 11, 4, 70, 25
    back = torch.randn(S, H, generator=gen).to(dtype)
    index = torch.randint(0, S + 1, (T, R), generator=gen)  # S = nothing
    y = xk.gather_sum(back, index, torch.zeros(S, dtype=torch.long))
    ref = torch.cat([back.double(), torch.zeros(1, H, dtype=torch.float64)])[index].sum(1)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert y.dtype == dtype and torch.allclose(y.double(), ref, rtol=tol, atol=tol)


def test_gradients_equal_torch_gathers():
    x, ids, w, send_token, send_rank, L = _case(seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    rows, meta = xk.pack_rows(x, ids, w, send_token, send_rank, L)
    g_rows, g_meta = torch.randn_like(rows), torch.randn_like(meta)
    (rows * g_rows).sum().add((meta * g_meta).sum()).backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    pad = lambda t: torch.cat([t, torch.zeros(1, t.shape[1])])  # noqa: E731
    ((pad(x2)[send_token] * g_rows).sum() + (pad(w2)[send_token] * g_meta[:, :ids.shape[1]]).sum()).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(w.grad, w2.grad, atol=1e-6)
    # gather_sum's backward sends each token's gradient to the rows it summed (send_token is the inverse).
    T, S = x.shape[0], send_token.numel()
    index = torch.full((T, 1), S)
    index[send_token[send_token < T], 0] = torch.nonzero(send_token < T).squeeze(1)
    back = torch.randn(S, x.shape[1], requires_grad=True)
    y = xk.gather_sum(back, index, send_token)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    expected = pad(g)[send_token] * (index.view(-1)[send_token.clamp(max=T - 1)] == torch.arange(S)).float()[:, None]
    used = torch.zeros(S, dtype=torch.bool)
    used[index[index < S]] = True
    assert torch.allclose(back.grad[used], expected[used], atol=1e-6)


@pytest.mark.parametrize("T,E,K,R", [(0, 8, 2, 2), (1, 4, 1, 4), (130, 64, 8, 4), (77, 16, 3, 2)])
def test_layout_kernel_matches_torch(T, E, K, R):
    from ep_runtime.dispatchers.rank_exchange import count_row
    from ep_runtime.testing import random_topk_ids
    ids = random_topk_ids(torch.Generator().manual_seed(T + K), T, E, K, R, minus_one_fraction=0.3)
    in_rank, row = xk.layout_row(ids, E, R)
    layout, torch_row = count_row(ids, E, R)  # CPU tensors: the torch path
    assert torch.equal(in_rank, layout.is_token_in_rank) and torch.equal(row, torch_row)


@pytest.mark.parametrize("static", [False, True])
def test_row_plan_kernel_matches_torch(static):
    from ep_runtime.dispatchers.rank_exchange import row_plan
    gen = torch.Generator().manual_seed(5)
    T, R = 300, 4  # more tokens than one block of the scan
    in_rank = torch.rand(T, R, generator=gen) < 0.6
    counts = in_rank.sum(0)
    if static:
        chunk = int(counts.max()) - 7  # some pairs do not fit: they must be dropped from the plan
        base, limit, total = torch.arange(R) * chunk, torch.full((R,), chunk), R * chunk
    else:
        base, limit, total = counts.cumsum(0) - counts, counts, int(counts.sum())
    got = xk.row_plan(in_rank, base, limit, total)
    want = row_plan(in_rank, base, limit, total)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_ll_kernels_match_torch(dtype, scaled):
    from ep_runtime.dispatchers import deepep_ll
    gen = torch.Generator().manual_seed(9)
    N, K, L, H = 150, 4, 6, 24  # N above one scan block
    ids = torch.randint(-1, L, (N, K), generator=gen, dtype=torch.int32)
    slot, masked_m = xk.ll_slots(ids, L)
    want_slot, want_m = deepep_ll._slots(ids, L)  # CPU tensors: the torch path
    assert torch.equal(slot, want_slot) and torch.equal(masked_m, want_m)
    rows = torch.randn(N, H, generator=gen).to(dtype)
    scale = torch.rand(N, K, generator=gen) if scaled else None
    got = xk.ll_scatter(rows, slot, scale, L * N + 1)
    want = deepep_ll._scatter(rows, slot, scale, L * N + 1)
    written = torch.zeros(L * N + 1, dtype=torch.bool)
    written[slot[slot < L * N]] = True
    assert torch.equal(got[written], want[written])
    out = torch.randn(L * N, H, generator=gen).to(dtype)
    out[~written[:-1]] = float("nan")  # unwritten rows are never read
    weight = torch.rand(N, K, generator=gen)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.allclose(xk.ll_gather(out, slot, weight).double(), deepep_ll._gather(out, slot, weight).double(),
                          rtol=tol, atol=tol)


def test_layout_ignores_out_of_range_ids():
    """Bad ids reach the layout before the count table flags them: both paths count them nowhere
    (the kernel must not add to a count past the row's end)."""
    from ep_runtime.dispatchers.rank_exchange import count_row
    E, R = 8, 2
    ids = torch.tensor([[0, 8], [2 ** 31 - 1, -2], [5, 3]], dtype=torch.int32)
    in_rank, row = xk.layout_row(ids, E, R)
    layout, torch_row = count_row(ids, E, R)
    expected = torch.tensor([3, 2, 1] + [1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.int32)  # T; per rank; per expert
    assert torch.equal(row, expected) and torch.equal(torch_row, expected)
    assert torch.equal(in_rank, layout.is_token_in_rank)
