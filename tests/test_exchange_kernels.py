"""The fused exchange kernels (run here through TRITON_INTERPRET=1 on CPU tensors) against plain
torch: packing of sent rows and metadata, the per-token gather-sum, and their gradients."""
import pytest
import torch

from ep_runtime.dispatchers import exchange_kernels as xk

pytestmark = pytest.mark.skipif(xk.triton is None, reason="triton not installed")


def _tables(E, R):
    """Contiguous placement as the kernels read it: owning rank and local index of each expert."""
    experts = torch.arange(E, dtype=torch.int32)
    return experts // (E // R), experts % (E // R)


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
    rank_of, local_of = _tables(8, 2)
    T, K = ids.shape
    rows, meta = xk.pack_rows(x, ids, w, send_token, send_rank, rank_of, local_of if local else None,
                              _inverse(send_token, T, send_token.numel()))
    x_pad = torch.cat([x, torch.zeros(1, x.shape[1], dtype=dtype)])
    ids_pad = torch.cat([ids, torch.full((1, K), -1, dtype=torch.int32)]).long()[send_token]
    if local:
        loc = ids_pad - send_rank[:, None] * L
        ids_pad = torch.where((ids_pad >= 0) & (loc >= 0) & (loc < L), loc, -1)
    w_pad = torch.cat([w, torch.zeros(1, K)])[send_token]
    if local:  # as DeepEP: a slot whose expert lives elsewhere weighs 0 at the destination
        w_pad = torch.where(ids_pad >= 0, w_pad, 0.0)
    assert torch.equal(rows, x_pad[send_token])
    assert torch.equal(meta[:, :K], w_pad) and torch.equal(meta[:, K:], ids_pad.float())
    # the inference path: one payload, rows and int32 metadata as views of it
    payload = xk.pack_payload(x, ids, w, send_token, send_rank, rank_of, local_of if local else None)
    rows2, meta2 = xk.payload_views(payload, x.shape[1], dtype, K)
    assert torch.equal(rows2, x_pad[send_token])
    assert torch.equal(meta2[:, :K].view(torch.float32), w_pad) and torch.equal(meta2[:, K:], ids_pad.int())


@pytest.mark.parametrize("H", [40, 7])  # odd H: the metadata starts at an aligned offset
def test_take_rows_lays_out_received_rows_and_pads(H):
    x, ids, w, send_token, send_rank, L = _case(H=H, dtype=torch.float16)
    rank_of, local_of = _tables(8, 2)
    payload = xk.pack_payload(x, ids, w, send_token, send_rank, rank_of, None)
    rows, meta = xk.payload_views(payload, H, torch.float16, ids.shape[1])
    S, K = rows.shape[0], ids.shape[1]
    index = torch.tensor([3, S, 0, S + 4, S - 1])  # >= S: pad rows
    out_x, out_meta = xk.take_rows(rows, meta, index, S)
    real = index < S
    assert torch.equal(out_x[real], rows[index[real]]) and torch.equal(out_meta[real], meta[index[real]])
    assert not out_x[~real].any() and not out_meta[~real][:, :K].any() and (out_meta[~real][:, K:] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_sum_matches_float64(dtype):
    gen = torch.Generator().manual_seed(1)
    T, R, H, S = 11, 4, 70, 25
    back = torch.randn(S, H, generator=gen).to(dtype)
    index = torch.randint(0, S + 1, (T, R), generator=gen)  # S = nothing
    y = xk.gather_sum(back, index, torch.zeros(S, dtype=torch.long))
    ref = torch.cat([back.double(), torch.zeros(1, H, dtype=torch.float64)])[index].sum(1)
    # up to R rows summed in fp32, rounded once to the output dtype: fp16's half ulp (2^-11) relative (2e-3 let
    # four fp16 roundings through); fp32's few u of the rows' magnitudes (~1 here), under 1e-6 absolute
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (2 ** -11, 0.0)
    assert y.dtype == dtype and torch.allclose(y.double(), ref, rtol=rtol, atol=atol)


def _inverse(send_token: torch.Tensor, T: int, not_sent: int) -> torch.Tensor:
    """combine_index [T, C] as a plan makes it: the rows sent from each token, in row order, then not_sent (>= S)."""
    rows = [torch.nonzero(send_token == t).squeeze(1).tolist() for t in range(T)]
    C = max(1, max(map(len, rows)))
    return torch.tensor([r + [not_sent] * (C - len(r)) for r in rows], dtype=torch.long)


def test_gradients_equal_torch_gathers():
    x, ids, w, send_token, send_rank, L = _case(seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    rank_of, local_of = _tables(8, 2)
    rows, meta = xk.pack_rows(x, ids, w, send_token, send_rank, rank_of, local_of,
                              _inverse(send_token, x.shape[0], send_token.numel()))
    g_rows, g_meta = torch.randn_like(rows), torch.randn_like(meta)
    (rows * g_rows).sum().add((meta * g_meta).sum()).backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    pad = lambda t: torch.cat([t, torch.zeros(1, t.shape[1])])  # noqa: E731
    kept = meta[:, ids.shape[1]:] >= 0  # local ids: a slot sent as -1 carries weight 0 (no gradient)
    w_rows = torch.where(kept, pad(w2)[send_token], 0.0)
    ((pad(x2)[send_token] * g_rows).sum() + (w_rows * g_meta[:, :ids.shape[1]]).sum()).backward()
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



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pack_rows_backward_sums_each_tokens_rows_by_gather(dtype):
    """pack_rows' backward: token t's gradient is the sum of the gradients of the rows sent from it (a token
    sent to several ranks, pad rows of token T that reach no token), gathered through the plan's combine_index
    (an early plan marks unsent pairs with values past S) in fp32 and rounded once, equal to the float64 sum;
    no index_add_ over send_token, whose CUDA atomics add a token's rows in a varying order. Under
    create_graph=True (double backward) the torch gather gives them too and keeps the graph."""
    gen = torch.Generator().manual_seed(4)
    T, H, K, E, R = 13, 70, 3, 8, 4
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids = torch.randint(-1, E, (T, K), generator=gen, dtype=torch.int32)
    w = torch.rand(T, K, generator=gen)
    send_token = torch.cat([torch.arange(T), torch.randint(0, T, (2 * T,), generator=gen), torch.full((5,), T)])
    send_token = send_token[torch.randperm(send_token.numel(), generator=gen)]  # tokens repeated, pads among them
    S = send_token.numel()
    combine_index = _inverse(send_token, T, S + 7)
    assert combine_index.shape[1] > 2  # some token's gradient sums 3 or more rows
    send_rank = torch.randint(0, R, (S,), generator=gen)
    rank_of = torch.arange(E, dtype=torch.int32) // (E // R)
    g_rows = torch.randn(S, H, generator=gen).to(dtype)
    g_w = torch.randn(S, K, generator=gen)
    ref_x = torch.zeros(T + 1, H, dtype=torch.float64).index_add_(0, send_token, g_rows.double())[:T]
    ref_w = torch.zeros(T + 1, K, dtype=torch.float64).index_add_(0, send_token, g_w.double())[:T]
    for create_graph in (False, True):
        x_in, w_in = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        rows, meta = xk.pack_rows(x_in, ids, w_in, send_token, send_rank, rank_of, None, combine_index)
        g = g_rows.clone().requires_grad_(create_graph)  # (a gradient with a graph of its own)
        g_meta = torch.cat([g_w, torch.zeros(S, K)], 1)
        dx, dw = torch.autograd.grad((rows * g).sum() + (meta * g_meta).sum(), [x_in, w_in], create_graph=create_graph)
        assert dx.dtype == dtype and dw.dtype == torch.float32
        assert dx.requires_grad == create_graph
        # one rounding of an fp32 sum of a few rows: fp16's half ulp (2^-11) relative, fp32's far below 1e-6
        tol = 1e-6 if dtype == torch.float32 else 2 ** -11
        assert torch.allclose(dx.double(), ref_x, rtol=tol, atol=tol), (dx.double() - ref_x).abs().max()
        assert torch.allclose(dw.double(), ref_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,E,K,R", [(0, 8, 2, 2), (1, 4, 1, 4), (130, 64, 8, 4), (77, 16, 3, 2), (300, 64, 8, 4)])
@pytest.mark.parametrize("distinct", [False, True])
def test_layout_kernel_matches_torch(T, E, K, R, distinct):  # T=300: the many-program kernel (atomics)
    from ep_runtime.dispatchers.rank_exchange import count_row
    from ep_runtime.testing import random_topk_ids
    from ep_runtime.validation import topk_value_flags
    gen = torch.Generator().manual_seed(T + K)
    ids = random_topk_ids(gen, T, E, K, R, minus_one_fraction=0.3)
    w = torch.rand(T, K, generator=gen)
    if T > 1:  # a repeated expert and a NaN weight must raise their flags
        ids[T // 2, :2] = ids[T // 2, 0].clamp(min=0)
        w[1, 0] = float("nan")
    rank_of, _ = _tables(E, R)
    in_rank, row = xk.layout_row(ids, w, rank_of, R, 3 if distinct else 2)
    layout, torch_row = count_row(ids, E, R)  # CPU tensors: the torch path
    flags = topk_value_flags(ids, w, E, distinct)
    assert torch.equal(in_rank, layout.is_token_in_rank) and torch.equal(row, torch.cat([torch_row, flags]))
    assert T <= 1 or row[-2 if distinct else -1:].tolist() == [1] * (2 if distinct else 1)  # NaN weight (, repeat)


def test_layout_kernel_follows_a_non_contiguous_placement():
    from ep_runtime.dispatchers.rank_exchange import count_row
    E, R, T, K = 8, 2, 50, 3
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(-1, E, (T, K), generator=gen, dtype=torch.int32)
    rank_of = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0], dtype=torch.int32)
    in_rank, row = xk.layout_row(ids, None, rank_of, R, 0)
    layout, torch_row = count_row(ids, E, R, rank_of)
    want = torch.zeros(T, R, dtype=torch.bool)
    for t in range(T):
        for e in ids[t].tolist():
            if e >= 0:
                want[t, rank_of[e]] = True
    assert torch.equal(in_rank, want) and torch.equal(layout.is_token_in_rank, want) and torch.equal(row, torch_row)


@pytest.mark.parametrize("static", [False, True])
def test_table_plan_kernel_matches_torch(static):
    """The device plan from the gathered table equals the torch plan: send order, combine index,
    receive counts and (static) the compaction of received chunks."""
    from ep_runtime.dispatchers.rank_exchange import row_plan
    gen = torch.Generator().manual_seed(5)
    T, R, L, me = 300, 4, 3, 2  # more tokens than one block of the scan
    E = R * L
    in_rank = torch.rand(T, R, generator=gen) < 0.6
    counts = in_rank.sum(0)
    table = torch.randint(0, 90, (R, 1 + R + E + 2), generator=gen, dtype=torch.int32)
    table[me, 1:1 + R] = counts.int()
    global_of = torch.arange(me * L, (me + 1) * L, dtype=torch.int32)
    if static:
        chunk = int(counts.max()) - 7  # some pairs do not fit: they must be dropped from the plan
        rows = int(table[:, 1 + me].sum()) - 5  # and some received rows do not fit the compact buffer
        base, limit, total = torch.arange(R) * chunk, torch.full((R,), chunk), R * chunk
    else:
        chunk = rows = None
        base, limit, total = counts.cumsum(0) - counts, counts, int(counts.sum())
    got = xk.table_plan(in_rank, table, me, global_of, total, chunk, rows)
    want = row_plan(in_rank, base, limit, total)
    real = want[0] < T  # pad rows carry no token; their destination is their chunk's (torch: 0)
    assert torch.equal(got.send_token, want[0]) and torch.equal(got.combine_index, want[2])
    assert torch.equal(got.send_rank[real], want[1][real])
    if static:
        assert torch.equal(got.send_rank, torch.arange(R).repeat_interleave(chunk))
    else:  # a plan sized before the total was known (T * R rows): the rows past it are pad rows
        early = xk.table_plan(in_rank, table, me, global_of, T * R)
        assert torch.equal(early.send_token[:total], want[0]) and (early.send_token[total:] == T).all()
        assert torch.equal(torch.where(early.combine_index < total, early.combine_index, total), want[2])
    sent = table[:, 1:1 + R].long()
    assert got.summary.tolist() == (table[:, 1 + R + me * L:1 + R + (me + 1) * L].sum(0).tolist()
                                    + [int(sent[:, me].sum()), int(sent.sum(0).max())])
    if static:  # compact rows too few (rows), and more than received: pad rows after the received ones
        recv = sent[:, me]
        j = torch.arange(chunk)
        compact = (recv.cumsum(0) - recv).unsqueeze(1) + j
        for rows in (rows, int(recv.sum()) + 7):
            got = xk.table_plan(in_rank, table, me, global_of, total, chunk, rows)
            valid = (j < recv.unsqueeze(1)) & (compact < rows)
            recv_pos = torch.where(valid, compact, rows).reshape(-1)
            recv_rows = torch.full((rows + 1,), R * chunk).scatter_(0, recv_pos, torch.arange(R * chunk))[:rows]
            assert torch.equal(got.recv_pos, recv_pos) and torch.equal(got.recv_rows, recv_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
def test_ll_kernels_match_torch(dtype, scaled):
    from ep_runtime.dispatchers import deepep_ll
    gen = torch.Generator().manual_seed(9)
    N, K, L, H = 150, 4, 6, 24  # N above one scan block
    ids = torch.randint(-1, L, (N, K), generator=gen, dtype=torch.int32)
    ids[7, :2] = 3  # a repeated expert: written once, counted in both slots at combine
    slot, masked_m = xk.ll_slots(ids, L)
    want_slot, want_m = deepep_ll._slots(ids, L)  # CPU tensors: the torch path
    assert torch.equal(slot, want_slot) and torch.equal(masked_m, want_m)
    # the received metadata is a strided view [N, 2K] int32 of weights' bits and ids
    w = torch.rand(N, K, generator=gen)
    meta = torch.cat([w.view(torch.int32), ids], 1)
    slot2, first, slot_w, scale, m2 = xk.ll_plan(meta[:, K:], meta[:, :K].view(torch.float32), L, fold=scaled)
    here = ids >= 0
    assert torch.equal(slot2, want_slot) and torch.equal(m2, want_m)
    assert torch.equal(first, deepep_ll._first_of_each_slot(want_slot, L * N))
    if scaled:
        assert torch.equal(scale, torch.where(here, w, 0.0)) and torch.equal(slot_w, here.float())
    else:
        assert scale is None and torch.equal(slot_w, torch.where(here, w, 0.0))
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
    (the kernel must not add to a count past the row's end), and the kernel raises the id flag."""
    from ep_runtime.dispatchers.rank_exchange import count_row
    E, R = 8, 2
    ids = torch.tensor([[0, 8], [2 ** 31 - 1, -2], [5, 3]], dtype=torch.int32)
    in_rank, row = xk.layout_row(ids, torch.ones(3, 2), _tables(E, R)[0], R, 2)
    layout, torch_row = count_row(ids, E, R)
    expected = torch.tensor([3, 2, 1] + [1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.int32)  # T; per rank; per expert
    assert torch.equal(row, torch.cat([expected, torch.tensor([1, 0], dtype=torch.int32)]))
    assert torch.equal(torch_row, expected) and torch.equal(in_rank, layout.is_token_in_rank)
    wide = torch.tensor([[2 ** 32 + 3, 1]])  # int64 beyond int32: never wraps onto a valid expert
    _, row = xk.layout_row(wide, torch.ones(1, 2), _tables(E, R)[0], R, 2)
    assert row[-2] == 1 and row[1 + R:1 + R + E].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def test_layout_kernel_reads_strided_ids_and_weights():
    """Ids and weights may be views (a column slice, a transpose): same row as their contiguous copies."""
    gen = torch.Generator().manual_seed(6)
    full = torch.randint(-1, 8, (20, 6), generator=gen, dtype=torch.int32)
    ids, w = full[:, ::2], torch.rand(20, 6, generator=gen)[:, 1::2]
    w[4, 1] = float("inf")
    rank_of, _ = _tables(8, 2)
    got = xk.layout_row(ids, w, rank_of, 2, 2)
    want = xk.layout_row(ids.contiguous(), w.contiguous(), rank_of, 2, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[1][-1] == 1


def test_pack_never_forwards_an_out_of_range_global_id():
    """Global ids outside [-1, E) (flagged in the count table, raised later on a deferred check) reach
    the receiver as -1, never as an index; int64 beyond int32 does not wrap onto an expert."""
    x = torch.randn(2, 16)
    ids = torch.tensor([[0, 100], [1, 2 ** 32 + 1]])
    rank_of, _ = _tables(8, 2)
    payload = xk.pack_payload(x, ids, torch.rand(2, 2), torch.tensor([0, 1]), torch.tensor([0, 0]), rank_of, None)
    _, meta = xk.payload_views(payload, 16, x.dtype, 2)
    assert meta[:, 2:].tolist() == [[0, -1], [1, -1]]


def test_take_payload_rows_reads_rows_whose_byte_offset_passes_int32():
    """A payload view whose rows lie 2**30 + 64 bytes apart (storage reserved, three rows touched): row 2 starts at
    byte 2**31 + 128. The kernel takes the row as int64 before the stride multiplies it (a prefill's S rows of
    ~14 KB pass 2**31 bytes from S = 149130); rows, ids and weights equal the packed ones."""
    x, ids, w, send_token, send_rank, L = _case(T=4, H=40, dtype=torch.float16)
    rank_of, _ = _tables(8, 2)
    packed = xk.pack_payload(x, ids, w, send_token[:3], send_rank[:3], rank_of, None)
    stride = 2 ** 30 + 64
    payload = torch.empty(2 * stride + packed.shape[1], dtype=torch.uint8).as_strided(packed.shape, (stride, 1))
    payload.copy_(packed)  # (~2.1 GB reserved, three rows written)
    index = torch.tensor([2, 0, 3, 1])  # 3 >= S: a pad row
    got_x, got_ids, got_w = xk.take_payload_rows(payload, index, 40, torch.float16, ids.shape[1])
    want_x, want_ids, want_w = xk.take_payload_rows(packed, index, 40, torch.float16, ids.shape[1])
    rows, ids_in, w_in = xk.payload_fields(packed, 40, torch.float16, ids.shape[1])
    assert torch.equal(got_x[:2], rows[[2, 0]]) and torch.equal(got_ids[:2], ids_in[[2, 0]])
    assert torch.equal(got_x, want_x) and torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)
    assert torch.equal(got_w[:2], w_in[[2, 0]]) and not got_x[2].any() and (got_ids[2] == -1).all()
