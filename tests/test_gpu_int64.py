"""On one GPU (marker `gpu`; skipped without CUDA): the kernels at shapes whose buffers hold more than 2**31
elements (or bytes) past one row base, where an offset computed in int32 wraps. H = 7168 (DeepSeek-V3): a row
index at or past WRAP_ROWS starts past element 2**31. Each test checks sampled rows (the last ones, all past the
wrap, some random ones and row 0) against a float64 reference, and every output row for finiteness; each fits in
an H200's memory with room to spare (the largest, ~20 GB) and runs in seconds once its kernels are compiled.

- the triton runner (fused_experts), bf16 and fp8 w8a8: T = 65536 tokens x K = 8 pairs (GEMM 2's [P, H] output
  rows, the fp8 path's sorted [S, H] rows);
- the masked runner, bf16 and fp8: an expert-major buffer [L, M*R, H] with M*R > WRAP_ROWS valid rows in one expert
  (its kernels took each row's offset in int32 before this was fixed: rows * H wrapped inside an expert);
- the exchange kernels: gather_rows over [S, H] rows, ll_scatter / ll_gather over deepep_ll's [L*N, H] slots, and
  pack_payload / take_payload_rows over a payload of S rows of ~14 KB.
"""
import pytest
import torch

import ep_runtime as ep
from ep_runtime import runners
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.quant import QuantConfig
from ep_runtime.reference import expert_reference, moe_reference, rel_err
from ep_runtime.testing import tolerance

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")]

H = 7168
WRAP_ROWS = 2 ** 31 // H + 1  # 299594: the first row whose first element lies past 2**31 - 1


def _sample(n: int, seed: int, count: int = 48) -> torch.Tensor:
    """Rows to check (sorted, on the GPU): the last `count` (past the wrap when n > WRAP_ROWS + count), `count`
    random ones and row 0."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.arange(n - count, n), torch.randint(0, n, (count,), generator=gen), torch.zeros(1).long()])
    return rows.unique().cuda()


def _release() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("fp8", [False, True])
def test_triton_runner_pair_rows_past_2_31_elements_match_float64(fp8):
    """P = 65536 * 8 = 524288 pairs of H: GEMM 2's output [P, H] holds 3.8e9 elements (its rows past pair 299594
    start past 2**31), and on the fp8 path the tokens' rows in sorted order [S, H] too. 16 local experts, I = 256
    (the GEMMs' shape along I does not move the row offsets). bf16: within DESIGN.md's bf16 bound of float64; fp8:
    against float64 with the tokens and activations rounded through fp8 as w8a8 computes, the same bound."""
    if "triton" not in runners.available():
        pytest.skip("runner='triton' is not available here")
    T, K, L, I = 65536, 8, 16, 256
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(T, H, device="cuda", generator=gen, dtype=torch.bfloat16)
    ids = torch.rand(T, L, device="cuda", generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device="cuda", generator=gen)
    w13 = torch.randn(L, 2 * I, H, device="cuda", generator=gen) * H ** -0.5
    w2 = torch.randn(L, H, I, device="cuda", generator=gen) * I ** -0.5
    with torch.no_grad():
        if fp8:
            quant = QuantConfig()
            (q13, s13), (q2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
            y = ep.runners.fused_experts(x, q13, q2, ids, w, w13_scale_inv=s13, w2_scale_inv=s2)
            w13, w2 = quant.dequantize_weight(q13, s13), quant.dequantize_weight(q2, s2)
        else:
            w13, w2 = w13.bfloat16(), w2.bfloat16()
            y = ep.runners.fused_experts(x, w13, w2, ids, w)
    assert y.shape == (T, H) and torch.isfinite(y).all()
    rows = _sample(T, 1)
    ref = moe_reference(x[rows].double(), ids[rows], w[rows].double(), w13.double(), w2.double(),
                        MoeConfig(L, K, H, I), fp8_activations=fp8)
    assert rel_err(y[rows], ref) <= tolerance(torch.bfloat16), rel_err(y[rows], ref)
    del x, y, w13, w2
    _release()


@pytest.mark.parametrize("fp8", [False, True])
def test_masked_runner_expert_rows_past_2_31_elements_match_float64(fp8):
    """An expert-major buffer [2, 319594, H] (deepep_ll's [L, M*R, H] at M*R = 319594, or the masked runner under a
    token-major dispatcher at that many pairs of one expert), expert 0 holding every row: its rows past 299594 start
    past element 2**31 inside the expert, where int32 row offsets wrapped (gemm1's loads and gemm2's stores read and
    wrote other rows, or outside the buffer). Expert 1 holds a third. bf16 within the bf16 bound of float64; fp8
    against the unquantized float64 reference within tests/test_masked_runner.py's fp8 bound (0.1: weights and rows
    each rounded through e4m3)."""
    from ep_runtime.runners.masked_runner import masked_forward
    if "masked" not in runners.available():
        pytest.skip("runner='masked' is not available here")
    L, I, rows = 2, 256, WRAP_ROWS + 20000
    config = MoeConfig(4, 2, H, I)
    gen = torch.Generator(device="cuda").manual_seed(12)
    recv_x = torch.randn(L, rows, H, device="cuda", generator=gen, dtype=torch.bfloat16)
    masked_m = torch.tensor([rows, rows // 3], dtype=torch.int32, device="cuda")
    w13 = torch.randn(L, 2 * I, H, device="cuda", generator=gen) * H ** -0.5
    w2 = torch.randn(L, H, I, device="cuda", generator=gen) * I ** -0.5
    if fp8:
        quant = QuantConfig()
        (q13, s13), (q2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
        weights = ExpertWeights(q13, q2, None, None, s13, s2, quant)
    else:
        weights = ExpertWeights(w13.bfloat16(), w2.bfloat16())
        w13, w2 = weights.w13, weights.w2
    with torch.no_grad():
        out = masked_forward(recv_x, masked_m, weights, config)
    for e, m in enumerate(masked_m.tolist()):
        assert torch.isfinite(out[e, :m]).all(), e
        sample = _sample(m, 2 + e)
        ref = expert_reference(recv_x[e, sample].double(), w13[e].double(), w2[e].double(), config)
        err = rel_err(out[e, sample], ref)
        assert err <= (0.1 if fp8 else tolerance(torch.bfloat16)), (e, err)
    del recv_x, out, weights
    _release()


def test_gather_rows_reads_source_rows_past_2_31_elements():
    """gather_rows over src [319594, H] bf16: each output row sums K = 4 source rows, most of them past row 299594
    (plus `none` entries that add nothing); against float64 sums within the bf16 bound (fp32 sums, rounded once)."""
    from ep_runtime.dispatchers import exchange_kernels as xk
    S, N, K = WRAP_ROWS + 20000, 512, 4
    gen = torch.Generator(device="cuda").manual_seed(13)
    src = torch.randn(S, H, device="cuda", generator=gen, dtype=torch.bfloat16)
    index = torch.randint(WRAP_ROWS, S, (N, K), device="cuda", generator=gen)
    index[:, 0] = torch.randint(0, S, (N,), device="cuda", generator=gen)
    index[::7, 1] = S  # none: adds nothing
    weight = torch.rand(N, K, device="cuda", generator=gen)
    got = xk.gather_rows(src, index, weight)
    ok = index < S
    want = (src[index.clamp(max=S - 1)].double() * (weight.double() * ok)[:, :, None]).sum(1)
    assert rel_err(got, want) <= tolerance(torch.bfloat16), rel_err(got, want)
    del src
    _release()


def test_ll_scatter_and_gather_reach_slots_past_2_31_elements():
    """deepep_ll's expert-major placement on one rank: N = 65536 received rows, K = 8 slots into L = 8 local experts,
    a [L*N, H] buffer of 3.8e9 elements (expert l's slots start at l*N: experts 5..7 past 2**31). Each written slot
    holds its row exactly; ll_gather's weighted sums of the slots equal float64 within the bf16 bound."""
    from ep_runtime.dispatchers import exchange_kernels as xk
    N, K, L = 65536, 8, 8
    gen = torch.Generator(device="cuda").manual_seed(14)
    ids = torch.rand(N, L + 1, device="cuda", generator=gen).topk(K, dim=1).indices.to(torch.int32)
    ids = torch.where(ids == L, -1, ids)  # slot L: no local expert here
    slot, first, slot_weight, _, masked_m = xk.ll_plan(ids, torch.rand(N, K, device="cuda", generator=gen), L,
                                                       fold=False)
    assert masked_m.sum().item() == (ids >= 0).sum().item()
    rows = torch.randn(N, H, device="cuda", generator=gen, dtype=torch.bfloat16)
    buffer = xk.ll_scatter(rows, first, None, L * N)
    check = _sample(N, 4)
    here = slot[check] < L * N
    sampled_slots, owners = slot[check][here], check[:, None].expand(-1, K)[here]
    assert (sampled_slots >= WRAP_ROWS).any()  # the sample reaches past the wrap
    assert torch.equal(buffer[sampled_slots], rows[owners])
    partial = xk.ll_gather(buffer, slot, slot_weight)
    want = rows[check].double() * slot_weight[check].double().sum(1, keepdim=True)
    assert rel_err(partial[check], want) <= tolerance(torch.bfloat16), rel_err(partial[check], want)
    del buffer, rows
    _release()


def test_payload_rows_past_2_31_bytes_pack_and_take_exactly():
    """pack_payload of S = 160000 send rows of H bf16 values and K = 8 metadata pairs (14400 bytes a row: 2.3e9
    bytes, rows past 149130 start past byte 2**31), then take_payload_rows of sampled rows (and a pad index): the
    rows, global ids and weights come back exactly as sent, pad token T's rows as zeros, ids -1, weight 0."""
    from ep_runtime.dispatchers import exchange_kernels as xk
    T, S, K, E = 4096, 160000, 8, 64
    gen = torch.Generator(device="cuda").manual_seed(15)
    x = torch.randn(T, H, device="cuda", generator=gen, dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(T, K, device="cuda", generator=gen)
    send_token = torch.randint(0, T + 1, (S,), device="cuda", generator=gen)  # T: pad rows
    send_rank = torch.zeros(S, dtype=torch.long, device="cuda")
    rank_of = torch.zeros(E, dtype=torch.int32, device="cuda")
    payload = xk.pack_payload(x, ids, w, send_token, send_rank, rank_of, None)
    assert payload.shape[0] * payload.stride(0) > 2 ** 31
    index = torch.cat([_sample(S, 5), torch.tensor([S], device="cuda")])  # S: a pad row
    got_x, got_ids, got_w = xk.take_payload_rows(payload, index, H, torch.bfloat16, K)
    token = torch.cat([send_token, torch.tensor([T], device="cuda")])[index.clamp(max=S)]
    x_pad = torch.cat([x, x.new_zeros(1, H)])
    ids_pad = torch.cat([ids, ids.new_full((1, K), -1)])
    w_pad = torch.cat([w, w.new_zeros(1, K)])
    assert torch.equal(got_x, x_pad[token]) and torch.equal(got_ids, ids_pad[token])
    assert torch.equal(got_w, w_pad[token])
    del payload, x
    _release()
