"""The triton runner against the float64 reference and the torch runner.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) in fp32 and fp16 only: the
interpreter's bf16 dot is wrong and its fp32->bf16 store truncates instead of rounding, so bf16 is
checked on GPU (tests/test_gpu.py, `pytest -m gpu`). Tolerances: fp32 1e-5 (DESIGN.md; fp32
accumulation over H, I <= 64 lands near 1e-7); fp16 2e-2 (DESIGN.md's low-precision bound; the
intermediates h, a, o are rounded to fp16, about 5e-4 each).
"""
import gc
import inspect
import itertools
import json
import subprocess
import sys
import weakref
from dataclasses import replace

import pytest
import torch
from test_matrix import frames_compiled_per_call

import ep_runtime as ep
from ep_runtime import runners
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.quant import QuantConfig
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import RunnerInput, reroute_to_sink
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

triton_runner = pytest.importorskip("ep_runtime.runners.triton_runner")
kernels = pytest.importorskip("ep_runtime.runners.triton_kernels")


def _weights(gen, E, H, I, gated=True, dtype=torch.float32, bias=False):
    rows = 2 * I if gated else I
    w13 = (torch.randn(E, rows, H, generator=gen) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) * I ** -0.5).to(dtype)
    b13 = (torch.randn(E, rows, generator=gen) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(E, H, generator=gen) * 0.1).to(dtype) if bias else None
    return w13, w2, b13, b2


def _ids(gen, T, E, K, minus_one=0.2):
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    holes = torch.rand(T, K, generator=gen) < minus_one
    return torch.where(holes, torch.full_like(ids, -1), ids).to(torch.int32)


@pytest.mark.parametrize("block_m,T,K,L", [(16, 30, 4, 6), (128, 5, 8, 32), (16, 0, 2, 3), (16, 9, 6, 5)])
@pytest.mark.parametrize("quantize", [False, True])
def test_sort_rows_writes_each_computed_pairs_row_and_scales_and_nothing_else(block_m, T, K, L, quantize):
    """sort_rows (GEMM 1's input rows in expert order for the Gluon GEMMs): sorted row m of a used block holds
    token sorted_pair_ids[m] // K's fp8 row and scales, bit for bit: an fp8 dispatch's bytes as they came, or
    float rows quantized by the activation rule exactly as quantize_rows quantizes them (fp32 and UE8M0 scales);
    padding rows and blocks past the used ones keep what they held (each GEMM reads only its own rows: no
    traffic for pairs never computed); pair_rows maps each computed pair to its sorted row (GEMM 2's rows in
    that order reach the reduction through it) and leaves the other pairs' entries alone. Slots -1 and a masked
    expert; (128, 5, 8, 32): a decode-sized step, most of 32 blocks unused; K=6: slots padded to 8; H=400: a
    partial last group."""
    gen = torch.Generator().manual_seed(T + L + K)
    H = 400
    ids = torch.randint(-1, L, (T, K), generator=gen, dtype=torch.int32)
    mask = torch.ones(L + 1, dtype=torch.bool)
    mask[min(1, L - 1)] = False
    mask[L] = False
    aligned = kernels.align_pairs(torch.where(ids < 0, L, ids), mask, 0, L, block_m)
    quant = QuantConfig(scale_encoding="ue8m0" if K % 2 else "fp32")
    G = quant.num_groups(H)
    if quantize:
        src, src_scale = torch.randn(T, H, generator=gen).to(torch.bfloat16), None
        rows, scales = quant.quantize_activation(src.float())
        want_rows, want_scales = rows.view(torch.uint8), scales
    else:
        src = torch.randint(0, 256, (T, H), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)
        src_scale = torch.rand(T, G, generator=gen) + 0.5
        want_rows, want_scales = src.view(torch.uint8), src_scale
    S = aligned.sorted_pair_ids.numel()
    out = torch.full((S, H), 0x5A, dtype=torch.uint8).view(torch.float8_e4m3fn)
    out_scale = torch.full((S, G), -7.0)
    pair_rows = torch.full((T * K, ), -3, dtype=torch.int32)
    kernels.sort_rows(src, src_scale, aligned, K, out, out_scale, pair_rows, quant, interpreted=True)
    pairs = aligned.sorted_pair_ids.long()
    written = (pairs < T * K) & (torch.arange(S) < int(aligned.used_blocks) * block_m)
    assert int(written.sum()) == int(aligned.computed.sum())
    assert torch.equal(pair_rows[pairs[written]].long(), torch.arange(S)[written])
    assert bool((pair_rows[~aligned.computed] == -3).all())
    token = pairs[written] // K
    assert torch.equal(out.view(torch.uint8)[written], want_rows[token])
    assert torch.equal(out_scale[written], want_scales[token])
    assert bool((out.view(torch.uint8)[~written] == 0x5A).all()) and bool((out_scale[~written] == -7.0).all())


# ------------------------------------------------------------------------------------ alignment

@pytest.mark.parametrize("single_program", [True, False])
@pytest.mark.parametrize("block_m,T,K,E,L,first", [
    (1, 23, 3, 12, 4, 4),  # this rank owns global experts 4..7; the sink is id 12
    (4, 23, 3, 12, 4, 4),
    (16, 23, 3, 12, 4, 4),
    (16, 150, 4, 80, 40, 40),  # several 128-pair chunks, L + 1 > 32 experts
    (16, 40, 4, 300, 140, 10),  # more expert slots (256) than a chunk's pairs: ranked pair against pair
])
def test_align_pairs_places_every_computed_pair_once_in_its_experts_blocks(block_m, T, K, E, L, first,
                                                                          single_program):
    gen = torch.Generator().manual_seed(block_m + T)
    ids = torch.randint(0, E + 1, (T, K), generator=gen, dtype=torch.int32)
    mask = torch.zeros(E + 1, dtype=torch.bool)
    mask[first:first + L] = True
    mask[first + 2] = False  # a masked-out local expert gets no blocks
    aligned = kernels.align_pairs(ids, mask, first, L, block_m, single_program=single_program)
    P = T * K
    flat = ids.reshape(-1).long()
    expected = mask[flat] & (flat >= first) & (flat < first + L)
    assert torch.equal(aligned.computed, expected)

    sorted_ids = aligned.sorted_pair_ids.long()
    assert sorted_ids.numel() == aligned.block_expert.numel() * block_m
    real = sorted_ids[sorted_ids < P]
    assert sorted(real.tolist()) == expected.nonzero().squeeze(1).tolist()  # each computed pair exactly once
    block_of = torch.arange(sorted_ids.numel()) // block_m
    owner = aligned.block_expert.long()[block_of]
    assert torch.equal(owner[sorted_ids < P], flat[real] - first)  # in a block of its own expert
    used = aligned.block_expert >= 0
    assert int(aligned.used_blocks) == int(used.sum())  # the count the persistent GEMM kernels read
    assert used.sum() == sum(-(-int((flat[expected] - first == e).sum()) // block_m) for e in range(L))
    assert not used[int(used.sum()):].any()  # unused blocks trail
    for e in range(L):  # ascending pair order inside an expert (the torch runner's order)
        mine = real[flat[real] - first == e]
        assert torch.equal(mine, mine.sort().values)


@pytest.mark.parametrize("block_m,T,K,L,first,masked", [
    (16, 0, 8, 32, 0, True),  # no pairs
    (16, 1, 8, 32, 0, True),  # decode: one token, DeepSeek's local shard
    (1, 37, 3, 5, 2, False),  # no mask: the id range alone filters
    (64, 300, 4, 7, 0, True),  # 1200 pairs: more than SINGLE_PROGRAM_MAX_PAIRS; 10 chunks (5 in one program)
    (16, 100, 8, 16, 0, True),  # Qwen3's local shard at decode: 800 pairs, four 256-pair chunks in one program
])
def test_align_pairs_in_one_program_equals_the_four_kernel_path(block_m, T, K, L, first, masked):
    # The one-launch path (decode sizes) must produce the very buffers the four kernels do, so the
    # GEMMs downstream compute bit for bit the same; out= reuses a workspace that holds another
    # call's result (stale values must not leak through). With rows to quantize (fp8 experts) the
    # one-launch path runs the quantization's programs beside the alignment's (every row), the four-kernel
    # path its own kernel after them, on the rows with a computed pair only (the others are left as they
    # were: no GEMM reads them): the alignment unchanged, the rows quantized by the torch rule's bits.
    from ep_runtime.quant_kernels import plan_rows
    gen = torch.Generator().manual_seed(T + block_m)
    ids = torch.randint(-1, first + L + 2, (T, K), generator=gen, dtype=torch.int32)
    if T > 1:
        ids[-1] = -1  # a row with no computed pair
    mask = (torch.rand(first + L + 3, generator=gen) > 0.2) if masked else None
    four = kernels.align_pairs(ids, mask, first, L, block_m, single_program=False)
    stale = kernels.align_pairs(torch.randint(0, L, (T, K), generator=gen, dtype=torch.int32), None, 0, L, block_m)
    if T:  # the alignment (either path) zeroes the GEMM kernels' work queue: nothing else does per call
        stale.work_queue.fill_(7)
        assert kernels.align_pairs(ids, mask, first, L, block_m, out=stale, single_program=False).work_queue.tolist() \
            == [0, 0]
        stale.work_queue.fill_(7)
    one = kernels.align_pairs(ids, mask, first, L, block_m, out=stale, single_program=True)
    assert one is stale and one.work_queue.tolist() == [0, 0]
    quant = QuantConfig(scale_encoding="ue8m0")
    x = (torch.randn(T, 300, generator=gen) * 10).to(torch.bfloat16)  # three groups, one partial
    want_q, want_s = quant.quantize_activation(x)
    with_pair = four.computed.view(T, K).any(1)
    assert T <= 1 or not with_pair.all()
    for single in (True, False) if T <= 40 else (True,) if T <= 100 else ():  # (interpreted: a program per row)
        rows = plan_rows(x, quant, interpreted=True)
        rows.q.view(torch.uint8).fill_(0x55)
        rows.scale.fill_(-1.0)
        with_rows = kernels.align_pairs(ids, mask, first, L, block_m, single_program=single, quantize=rows)
        done = torch.ones_like(with_pair) if single else with_pair
        assert torch.equal(rows.q.view(torch.uint8)[done], want_q.view(torch.uint8)[done])
        assert torch.equal(rows.scale[done], want_s[done])
        assert (rows.q.view(torch.uint8)[~done] == 0x55).all() and (rows.scale[~done] == -1.0).all()
        for name in ("sorted_pair_ids", "block_expert", "computed", "used_blocks"):
            assert torch.equal(getattr(with_rows, name), getattr(four, name)), (name, single)
    for name in ("sorted_pair_ids", "block_expert", "computed", "used_blocks"):
        assert torch.equal(getattr(one, name), getattr(four, name)), name
    assert torch.equal(kernels.align_pairs(ids, mask, first, L, block_m).sorted_pair_ids, four.sorted_pair_ids)
    with pytest.raises(ValueError, match=f"quantize has {T + 1} rows; topk_ids {T} "):  # rows not the ids' tokens
        kernels.align_pairs(ids, mask, first, L, block_m, quantize=plan_rows(torch.zeros(T + 1, 300), quant))


# ------------------------------------------------------------------------------------ kernels alone

@pytest.mark.parametrize("dtype,strided_bias", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_grouped_gemm_matches_float64(dtype, strided_bias):
    gen = torch.Generator().manual_seed(1)
    T, K, L, N, Kd = 13, 2, 3, 48, 40  # K_dim not a multiple of BLOCK_K: the masked tail path
    x = torch.randn(T, Kd, generator=gen).to(dtype)
    w = (torch.randn(L, N, Kd, generator=gen) * Kd ** -0.5).to(dtype)
    # strided_bias: [L, N] with strides (1, L), as a transposed checkpoint tensor arrives
    bias = (torch.randn(N, L, generator=gen).t() if strided_bias else torch.randn(L, N, generator=gen)).to(dtype)
    scale = torch.rand(T * K, generator=gen)
    ids = torch.randint(-1, L, (T, K), generator=gen, dtype=torch.int32)
    ids = torch.where(ids < 0, torch.full_like(ids, L), ids)
    mask = torch.tensor([True] * L + [False])
    aligned = kernels.align_pairs(ids, mask, 0, L, 16)
    out = torch.full((T * K, N), float("nan"), dtype=dtype)
    kernels.grouped_gemm(x, w, out, aligned, kernels.GemmTiles(32, 32, 2), rows_per_a_row=K, bias=bias,
                         scale=scale, interpreted=True)
    pair = aligned.computed.nonzero().squeeze(1)
    e = ids.reshape(-1)[pair].long()
    ref = torch.einsum("ph,pnh->pn", x.double()[pair // K], w.double()[e]) * scale.double()[pair, None] + bias.double()[e]
    assert rel_err(out[pair], ref) <= tolerance(dtype) / (2 if dtype == torch.float16 else 1)
    assert out[~aligned.computed].isnan().all()  # filtered pairs' rows are never written


@pytest.mark.parametrize("kernel", ["portable", "persistent"])
def test_grouped_gemm_reads_token_rows_whose_offset_passes_int32(kernel):
    """x a strided view whose rows lie 2**30 + 64 elements apart (storage reserved, three rows touched): token 2's
    row starts at element 2**31 + 128. The kernels take a's row as int64 before the stride multiplies it (pair rows
    times H pass 2**31 from P = 299594 pairs at H=7168); every computed pair equals float64."""
    gen = torch.Generator().manual_seed(5)
    T, K, L, N, Kd = 3, 2, 2, 32, 64
    stride = 2 ** 30 + 64
    x = torch.empty(2 * stride + Kd, dtype=torch.float16).as_strided((T, Kd), (stride, 1))  # (~4.3 GB reserved)
    x.copy_(torch.randn(T, Kd, generator=gen).half())
    w = (torch.randn(L, N, Kd, generator=gen) * Kd ** -0.5).half()
    ids = torch.tensor([[0, 1], [1, 0], [1, 0]], dtype=torch.int32)
    aligned = kernels.align_pairs(ids, None, 0, L, 16)
    out = torch.full((T * K, N), float("nan"), dtype=torch.float16)
    kernels.grouped_gemm(x, w, out, aligned, kernels.GemmTiles(32, 32, 1, kernel=kernel), rows_per_a_row=K,
                         interpreted=True)
    pair = torch.arange(T * K)
    ref = torch.einsum("ph,pnh->pn", x.double()[pair // K], w.double()[ids.reshape(-1).long()])
    assert rel_err(out, ref) <= tolerance(torch.float16) / 2, rel_err(out, ref)


def test_alignment_refuses_pairs_past_int32_before_allocating():
    """sorted_pair_ids and the inverse map hold pair ids and rows as int32: num_pairs whose padded rows pass
    2**31 - 1 is refused by name (nothing allocated), one below is sized as before."""
    with pytest.raises(ValueError, match=r"num_pairs=2147483600 .* allowed: at most 2147483647 rows"):
        kernels.align_workspace(2 ** 31 - 48, 8, 64, torch.device("cpu"))
    assert kernels.align_workspace(100, 8, 64, torch.device("cpu")).sorted_pair_ids.numel() == \
        kernels.sorted_rows(100, 8, 64)


ACTIVATIONS = {
    "silu": dict(), "gelu": dict(activation="gelu"), "gelu_tanh": dict(activation="gelu_tanh"),
    "non_gated_gelu": dict(activation="gelu", is_gated=False),
    "gpt_oss": dict(gemm1_alpha=1.702, gemm1_clamp_limit=0.4), "gpt_oss_no_limit": dict(gemm1_alpha=1.702),
    "clamped_silu": dict(gemm1_clamp_limit=0.4), "clamped_gelu_tanh": dict(activation="gelu_tanh", gemm1_clamp_limit=0.4),
}


def _act_reference(h, I, activation="silu", is_gated=True, gemm1_alpha=None, gemm1_clamp_limit=None):
    from ep_runtime.reference import expert_reference
    cfg = MoeConfig(1, 1, I, I, activation=activation, is_gated=is_gated, gemm1_alpha=gemm1_alpha,
                    gemm1_clamp_limit=gemm1_clamp_limit)
    # expert_reference with identity matrices isolates its activation: w13 = 1 (rows), w2 = 1.
    rows = h.shape[1]
    return expert_reference(h.double(), torch.eye(rows, dtype=torch.float64), torch.eye(I, dtype=torch.float64), cfg)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("skip_ratio", [0.0, 0.3, 0.8, 1.0])
def test_filtered_activation(name, skip_ratio):
    gen = torch.Generator().manual_seed(int(skip_ratio * 10))
    kw = ACTIVATIONS[name]
    P, I = 37, 24
    rows = I if kw.get("is_gated") is False else 2 * I
    h = torch.randn(P, rows, generator=gen) * 2
    computed = torch.rand(P, generator=gen) >= skip_ratio
    h[~computed] = float("nan")  # poison: a filtered row must never be read
    a = kernels.act_and_mul(h, I, computed=computed, interpreted=True, **kw)
    assert not a.isnan().any()
    assert (a[~computed] == 0).all()
    if computed.any():
        assert rel_err(a[computed], _act_reference(h[computed], I, **kw)) <= 1e-6
    if skip_ratio == 0.0:  # none skipped: bit-identical to the unfiltered path
        assert torch.equal(a, kernels.act_and_mul(h, I, computed=None, interpreted=True, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gemm1_with_fused_activation_matches_unfused_gemm_then_act_and_mul(name, dtype):
    # The fused epilogue (gate and up tiles in one program) against GEMM 1 -> act_and_mul, with bias,
    # router weight on the input, I not a multiple of the half tile and K_dim not of BLOCK_K.
    kw = ACTIVATIONS[name]
    gated = kw.get("is_gated", True)
    gen = torch.Generator().manual_seed(len(name))
    T, K, L, I, Kd = 13, 2, 3, 40, 40
    rows = 2 * I if gated else I
    x = torch.randn(T, Kd, generator=gen).to(dtype)
    w = (torch.randn(L, rows, Kd, generator=gen) * Kd ** -0.5).to(dtype)
    bias = (torch.randn(L, rows, generator=gen) * 0.3).to(dtype)
    scale = torch.rand(T * K, generator=gen)
    ids = torch.randint(-1, L, (T, K), generator=gen, dtype=torch.int32)
    ids = torch.where(ids < 0, torch.full_like(ids, L), ids)
    aligned = kernels.align_pairs(ids, torch.tensor([True] * L + [False]), 0, L, 16)
    tiles = kernels.GemmTiles(32, 32, 2)
    fused = torch.full((T * K, I), float("nan"), dtype=dtype)
    kernels.grouped_gemm(x, w, fused, aligned, tiles, rows_per_a_row=K, bias=bias, scale=scale, interpreted=True,
                         fuse_activation=kw.get("activation", "silu"), is_gated=gated,
                         gemm1_alpha=kw.get("gemm1_alpha"), gemm1_clamp_limit=kw.get("gemm1_clamp_limit"))
    pair = aligned.computed.nonzero().squeeze(1)
    e = ids.reshape(-1)[pair].long()
    h = torch.einsum("ph,pnh->pn", x.double()[pair // K], w.double()[e]) * scale.double()[pair, None] + bias.double()[e]
    ref = _act_reference(h, I, **kw)
    assert rel_err(fused[pair], ref) <= (1e-6 if dtype == torch.float32 else 2e-3)
    assert fused[~aligned.computed].isnan().all()  # filtered pairs' rows are never written
    unfused = torch.empty(T * K, rows, dtype=dtype)
    kernels.grouped_gemm(x, w, unfused, aligned, tiles, rows_per_a_row=K, bias=bias, scale=scale, interpreted=True)
    a = kernels.act_and_mul(unfused, I, computed=aligned.computed, interpreted=True, **kw)
    assert rel_err(fused[pair], a[pair].double()) <= (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype,dynamic", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
@pytest.mark.parametrize("kernel", ["persistent", "tma", "tma_stacked"])
def test_persistent_kernels_match_float64_and_the_portable_kernel(kernel, dtype, dynamic):
    # Three programs (the interpreter's default) loop over 2-4x as many work items, blocks without an
    # expert among them; every computed pair's row must come out right, so no work item is missed.
    # "tma" runs the same loop with the weight tiles from a host TensorDescriptor (the interpreter
    # executes descriptor loads): rows past an expert's last read the next expert's (or zeros past the
    # last) and are never stored, channels past K_dim are zeros; "tma_stacked" loads gated GEMM 1's
    # gate and up rows as one 3D box and splits one dot's columns. Cases: plain GEMM (bias, router weight,
    # K_dim not a multiple of BLOCK_K), gated SiLU and non-gated GELU in the epilogue with I not a
    # multiple of the 16-column half tile. dynamic: the programs take work items from the workspace's
    # counter (the interpreter runs them one after another: the first takes every item), which the last
    # program out leaves at zero, so the next launch on the same workspace computes every item again.
    gen = torch.Generator().manual_seed(7)
    T, K, L, I, Kd = 13, 2, 3, 40, 40
    tiles = kernels.GemmTiles(32, 32, 2, kernel=kernel, dynamic=dynamic)
    for fuse, gated, rows in [(None, True, 48), ("silu", True, 2 * I), ("gelu", False, I)]:
        x = torch.randn(T, Kd, generator=gen).to(dtype)
        w = (torch.randn(L, rows, Kd, generator=gen) * Kd ** -0.5).to(dtype)
        bias = (torch.randn(L, rows, generator=gen) * 0.3).to(dtype)
        scale = torch.rand(T * K, generator=gen)
        ids = torch.randint(0, L + 1, (T, K), generator=gen, dtype=torch.int32)  # L: the sink, filtered
        aligned = kernels.align_pairs(ids, torch.tensor([True] * L + [False]), 0, L, 16)
        cols = rows if fuse is None else I
        out = torch.full((T * K, cols), float("nan"), dtype=dtype)
        kw = dict(rows_per_a_row=K, bias=bias, scale=scale, interpreted=True, fuse_activation=fuse, is_gated=gated)
        kernels.grouped_gemm(x, w, out, aligned, tiles, **kw)
        if dynamic:
            assert aligned.work_queue.tolist() == [0, 0]
            again = torch.full_like(out, float("nan"))
            kernels.grouped_gemm(x, w, again, aligned, tiles, **kw)
            assert torch.equal(again.nan_to_num(7.0), out.nan_to_num(7.0)) and aligned.work_queue.tolist() == [0, 0]
        pair = aligned.computed.nonzero().squeeze(1)
        e = ids.reshape(-1)[pair].long()
        h = torch.einsum("ph,pnh->pn", x.double()[pair // K], w.double()[e]) * scale.double()[pair, None] + bias.double()[e]
        ref = h if fuse is None else _act_reference(h, I, activation=fuse, is_gated=gated)
        assert rel_err(out[pair], ref) <= (1e-6 if dtype == torch.float32 else 2e-3), (fuse, gated)
        assert out[~aligned.computed].isnan().all()  # filtered pairs' rows are never written
        portable = torch.empty_like(out)
        kernels.grouped_gemm(x, w, portable, aligned, kernels.GemmTiles(32, 32, 2), **kw)
        assert rel_err(out[pair], portable[pair].double()) <= (1e-6 if dtype == torch.float32 else 2e-3)
    # every pair filtered: no used block, no work item, nothing written
    aligned = kernels.align_pairs(torch.full((T, K), L, dtype=torch.int32), torch.tensor([True] * L + [False]), 0, L, 16)
    out = torch.full((T * K, cols), float("nan"), dtype=dtype)
    kernels.grouped_gemm(x, w, out, aligned, tiles, **kw)
    assert int(aligned.used_blocks) == 0 and out.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn],
                         ids=["fp32", "fp16", "bf16", "fp8"])
@pytest.mark.parametrize("kernel", kernels.GEMM_KERNELS)
def test_gemms_in_sorted_order_equal_the_pair_indexed_gemms(kernel, dtype, monkeypatch):
    # The runner's default: GEMM 1 writes its fused output (fp8: and its scales) at sorted rows
    # (out_sorted), GEMM 2 reads them there (a_sorted; under "tma"/"tma_stacked" one descriptor box per
    # block, checked below, I = 48 not a multiple of BLOCK_K: the box's tail columns are zeros; bf16:
    # upcast after the box under the interpreter). Padding rows of the sorted buffers are poisoned with
    # NaN: a box reads them, and only padding results (never stored) may see them. The same products as
    # the pair-indexed path, so the same bits; unquantized, within tolerance of float64 too.
    from ep_runtime.quant import QuantConfig
    described = []
    real = kernels._TensorDescriptor
    monkeypatch.setattr(kernels, "_TensorDescriptor", lambda t, *a: described.append(t.data_ptr()) or real(t, *a))
    gen = torch.Generator().manual_seed(11)
    T, K, L, H, I = 13, 2, 3, 48, 48  # (fp8 weight rows of I bytes: 16-byte aligned for TMA)
    fp8 = dtype == torch.float8_e4m3fn
    tiles = kernels.GemmTiles(32, 128 if fp8 else 32, 2, kernel=kernel)
    x = torch.randn(T, H, generator=gen)
    w13 = torch.randn(L, 2 * I, H, generator=gen) * H ** -0.5
    w2 = torch.randn(L, H, I, generator=gen) * I ** -0.5
    ids = torch.randint(0, L + 1, (T, K), generator=gen, dtype=torch.int32)  # L: the sink, filtered
    aligned = kernels.align_pairs(ids, torch.tensor([True] * L + [False]), 0, L, 16)
    rows = aligned.sorted_pair_ids.numel()
    assert rows == kernels.sorted_rows(T * K, L, 16)
    quant = QuantConfig() if fp8 else None
    if fp8:
        (x, x_s), (w13, s13), (w2, s2) = quant.quantize_activation(x), quant.quantize_weight(w13), quant.quantize_weight(w2)
    else:
        x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    out_dtype = torch.bfloat16 if fp8 else dtype

    def gemms(sorted_):
        a = torch.full((rows if sorted_ else T * K, I), float("nan")).to(dtype)  # (NaN as fp8 too)
        kw1 = dict(fuse_activation="silu", out_sorted=sorted_)
        kw2 = dict(a_sorted=sorted_)
        if fp8:
            a_s = torch.full((a.shape[0], quant.num_groups(I)), float("nan"))
            kw1.update(a_scale=x_s, w_scale=s13, out_quant=quant, out_scale=a_s)
            kw2.update(a_scale=a_s, w_scale=s2)
        kernels.grouped_gemm(x, w13, a, aligned, tiles, K, interpreted=True, **kw1)
        out = torch.full((T * K, H), float("nan"), dtype=out_dtype)
        kernels.grouped_gemm(a, w2, out, aligned, tiles, 1, interpreted=True, **kw2)
        return a, out

    described.clear()
    sorted_a, out = gemms(True)
    assert (kernel in kernels.TMA_KERNELS) == (sorted_a.data_ptr() in described)  # GEMM 2's rows by TMA box
    pair_a, pair_out = gemms(False)
    slots = aligned.sorted_pair_ids.long()
    real_rows = slots < T * K
    assert torch.equal(sorted_a[real_rows].view(torch.uint8), pair_a[slots[real_rows]].view(torch.uint8))
    assert sorted_a[~real_rows].float().isnan().all()  # padding rows never written
    pair = aligned.computed.nonzero().squeeze(1)
    assert torch.equal(out[pair], pair_out[pair]) and out[~aligned.computed].isnan().all()
    if not fp8:
        e = ids.reshape(-1)[pair].long()
        h = torch.einsum("ph,pnh->pn", x.double()[pair // K], w13.double()[e])
        ref = torch.einsum("pi,phi->ph", _act_reference(h, I), w2.double()[e])
        assert rel_err(out[pair], ref) <= {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    with pytest.raises(ValueError, match=f"a_sorted needs rows_per_a_row=1 .* and {rows} rows"):
        kernels.grouped_gemm(pair_a, w2, out, aligned, tiles, 1, interpreted=True, a_sorted=True)


def test_tma_kernel_refuses_weights_it_cannot_describe(monkeypatch):
    # A strided weight view cannot be a [L * rows, K_dim] descriptor: forced through the knob, the
    # runner says why instead of reading the wrong bytes.
    gen = torch.Generator().manual_seed(8)
    L, H, I = 2, 32, 32
    w13 = torch.randn(L, H, 2 * I, generator=gen).transpose(1, 2)  # [L, 2I, H], H not contiguous
    w2 = torch.randn(L, H, I, generator=gen)
    assert "not [L * rows, K_dim] row-major" in kernels.tma_unsupported(w13, True)
    assert kernels.tma_unsupported(w2, True) is None
    x = torch.randn(5, H, generator=gen)
    ids = torch.randint(0, L, (5, 2), generator=gen, dtype=torch.int32)
    monkeypatch.setenv("EP_RUNTIME_TRITON_GEMM_KERNEL", "tma")
    with pytest.raises(ValueError, match="EP_RUNTIME_TRITON_GEMM_KERNEL='tma' cannot run here: .*row-major"):
        triton_runner.fused_experts(x, w13, w2, ids, torch.rand(5, 2, generator=gen))


def test_topk_reduce_is_weighted_slot_order_sum_and_skips_filtered_rows():
    gen = torch.Generator().manual_seed(3)
    N, K, H = 11, 3, 40
    o = torch.randn(N * K, H, generator=gen)
    computed = torch.rand(N * K, generator=gen) > 0.3
    o[~computed] = float("nan")
    w = torch.rand(N * K, generator=gen)
    y = kernels.topk_reduce(o, computed, K, w, 2.5, torch.float32, interpreted=True)
    contrib = torch.where(computed[:, None], o.double() * w.double()[:, None], torch.zeros((), dtype=torch.float64))
    assert rel_err(y, 2.5 * contrib.reshape(N, K, H).sum(1)) <= 1e-6
    assert torch.equal(y, kernels.topk_reduce(o, computed, K, w, 2.5, torch.float32, interpreted=True))
    # the GPU's tiles (interpreted=False picks them; the kernel still runs interpreted): at this size one
    # token per program (spread over more programs, as at decode), the same sums bit for bit
    assert kernels._reduce_blocks(N, H, False) == (1, 64)
    assert torch.equal(y, kernels.topk_reduce(o, computed, K, w, 2.5, torch.float32, interpreted=False))
    assert kernels._reduce_blocks(1, 7168, False) == (1, 256)  # T=1, DeepSeek-V3: 28 programs, not 7
    assert kernels._reduce_blocks(4096, 7168, False) == kernels._row_blocks(7168, False)  # prefill: as they were
    # o in another row order, more rows than pairs (the Gluon GEMM 2's sorted rows): pair p's row is o[pair_rows[p]];
    # the rows no computed pair maps to are never read (NaN), nor are the map's entries of filtered pairs (-1)
    order = torch.randperm(N * K + 7, generator=gen)[:N * K]
    shuffled = torch.full((N * K + 7, H), float("nan"))
    shuffled[order] = o
    pair_rows = torch.where(computed, order, -1).to(torch.int32)
    assert torch.equal(y, kernels.topk_reduce(shuffled, computed, K, w, 2.5, torch.float32, interpreted=True,
                                              pair_rows=pair_rows))


# ------------------------------------------------------------------------------------ functional API

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 29])
def test_fused_experts_matches_float64_reference(T, dtype):
    gen = torch.Generator().manual_seed(T)
    E, K, H, I = 6, 2, 32, 48
    cfg = MoeConfig(E, K, H, I)
    w13, w2, _, _ = _weights(gen, E, H, I, dtype=dtype)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids, w = _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
    if T:
        ids[0] = -1  # a row with every slot -1 comes out zero
    y = runners.fused_experts(x, w13, w2, ids, w)
    ref = moe_reference(x, ids, w.double(), w13, w2, cfg)
    assert y.dtype == dtype and y.shape == (T, H)
    assert rel_err(y, ref) <= tolerance(dtype)
    if T:
        assert (y[0] == 0).all()



@pytest.mark.parametrize("split,dtype", [(2, torch.float32), (3, torch.float16), (4, torch.float32)])
def test_split_k_gemm2_matches_float64_and_adds_the_bias_once(split, dtype):
    """GEMM 2's K loop split over programs (GemmTiles.split_k), its fp32 partial sums added by the top-k
    reduction: I = 72 is 4.5 K steps of 16 (the last one masked), so the splits are uneven and, at 4, the
    last split has no step at all (it stores zeros). b2 is added in the first split only."""
    gen = torch.Generator().manual_seed(split)
    E, K, H, I, T = 6, 2, 32, 72, 13
    cfg = MoeConfig(E, K, H, I, has_bias=True)
    w13, w2, b13, b2 = _weights(gen, E, H, I, dtype=dtype, bias=True)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ids, w = _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
    tiles = kernels.GemmTiles(32, 16, 1)
    whole = kernels.BlockConfig(16, tiles, tiles)
    config = kernels.BlockConfig(16, tiles, kernels.GemmTiles(32, 16, 1, split_k=split))
    y = runners.fused_experts(x, w13, w2, ids, w, b13=b13, b2=b2, block_config=config)
    ref = moe_reference(x, ids, w.double(), w13, w2, cfg, b13=b13, b2=b2)
    assert y.dtype == dtype and rel_err(y, ref) <= tolerance(dtype)
    unsplit = runners.fused_experts(x, w13, w2, ids, w, b13=b13, b2=b2, block_config=whole)
    # fp32 partial sums, added in another association than one K loop: within fp32 rounding of the
    # unsplit step (fp32), or one fp16 rounding step of it (fp16 output)
    assert rel_err(y, unsplit) <= (1e-6 if dtype == torch.float32 else 1e-3)
    with pytest.raises(ValueError, match="split_k=2 needs .* the portable kernel"):
        kernels.grouped_gemm(x, w2, torch.empty(2, T * K, H), kernels.align_pairs(ids, None, 0, E, 16),
                             kernels.GemmTiles(32, 16, 1, kernel="persistent", split_k=2), 1, interpreted=True)


def test_split_k_partial_sums_lie_past_2_31_elements():
    """A split's partial sums start split * out.stride(0) elements into out: past 2**31 at prefill sizes
    (T=16384 x K=8 pairs of H=7168, split 4: split 3 starts at element 2.8e9), an offset int32 wraps.
    Here 3 splits 2**30 elements apart (8 GiB of address space, untouched but for the rows written), so
    split 2's rows start at element 2**31; GEMM 2 writes them and the top-k reduction reads them."""
    gen = torch.Generator().manual_seed(31)
    E, K, H, I, T = 2, 2, 16, 48, 3
    w2 = torch.randn(E, H, I, generator=gen) * I ** -0.5
    b2 = torch.randn(E, H, generator=gen) * 0.1
    a = torch.randn(T * K, I, generator=gen)
    ids = _ids(gen, T, E, K)
    aligned = kernels.align_pairs(ids, None, 0, E, 16)
    out = torch.empty_strided((3, T * K, H), (2 ** 30, H, 1))
    # I = 48: three K steps of 16, one per split
    kernels.grouped_gemm(a, w2, out, aligned, kernels.GemmTiles(16, 16, 1, split_k=3), 1, bias=b2, interpreted=True)
    y = kernels.topk_reduce(out, aligned.computed, K, None, 1.0, torch.float32, interpreted=True)
    expert = ids.reshape(-1).long()
    o = torch.einsum("pi,phi->ph", a.double(), w2.double()[expert.clamp(min=0)]) + b2.double()[expert.clamp(min=0)]
    want = torch.where((expert >= 0)[:, None], o, 0.0).view(T, K, H).sum(1)
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("split_k", [0, -1, 2.0])
def test_split_k_below_one_or_not_an_int_is_named(split_k):
    """A GemmTiles.split_k below 1 (or a float from a hand-edited table) is rejected where the tiles are
    made, naming the field and the allowed values, not as a tensor of negative size in the runner."""
    gen = torch.Generator().manual_seed(32)
    E, K, H, I, T = 2, 2, 16, 32, 3
    w13, w2, _, _ = _weights(gen, E, H, I)
    x, ids, w = torch.randn(T, H, generator=gen), _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
    with pytest.raises(ValueError, match=rf"GemmTiles.split_k={split_k!r}; allowed: an int >= 1"):
        tiles = kernels.GemmTiles(32, 16, 1)
        runners.fused_experts(x, w13, w2, ids, w, block_config=kernels.BlockConfig(
            16, tiles, kernels.GemmTiles(32, 16, 1, split_k=split_k)))


@pytest.mark.parametrize("make,match", [
    (lambda g: kernels.BlockConfig(24, g, g), r"BlockConfig.BLOCK_M=24; allowed: a power of two >= 16"),
    (lambda g: kernels.BlockConfig(0, g, g), r"BlockConfig.BLOCK_M=0; allowed: a power of two >= 16"),
    (lambda g: kernels.BlockConfig(16, replace(g, BLOCK_N=48), g), r"GemmTiles.BLOCK_N=48; allowed: a power of two"),
    (lambda g: kernels.BlockConfig(16, g, replace(g, BLOCK_K=0)), r"GemmTiles.BLOCK_K=0; allowed: a power of two"),
    (lambda g: kernels.BlockConfig(16, replace(g, GROUP_M=0), g), r"GemmTiles.GROUP_M=0; allowed: an int >= 1"),
    (lambda g: kernels.BlockConfig(16, (32, 16), g), r"BlockConfig.gemm1 is a tuple; allowed: a GemmTiles"),
    (lambda g: (16, g, g), r"block_config is a tuple; allowed: None or a ep_runtime.runners.triton_kernels.BlockConfig"),
])
def test_tiles_that_no_kernel_takes_are_named(make, match):
    """Hand-made tiles a Triton kernel cannot take failed inside it naming nothing: a side of 24 or 48 with an
    InterpreterError "arange's range must be a power of 2", 0 with a ZeroDivisionError, a tuple for the config or
    a GEMM's tiles with an AttributeError. (GROUP_M=0 divides by zero in the tile order.)"""
    gen = torch.Generator().manual_seed(34)
    w13, w2, _, _ = _weights(gen, 2, 16, 8)
    x, ids, w = torch.randn(3, 16, generator=gen), _ids(gen, 3, 2, 2), torch.rand(3, 2, generator=gen)
    with pytest.raises((ValueError, TypeError), match=match):
        runners.fused_experts(x, w13, w2, ids, w, block_config=make(kernels.GemmTiles(32, 16, 1)))
    if "block_config is a" in match:  # the runner refuses it when built, not inside a layer's first forward
        with pytest.raises(TypeError, match=match):
            runners.create("triton", ep.MoeConfig(2, 2, 16, 8), block_config=make(kernels.GemmTiles(32, 16, 1)))


def test_gemm1_split_k_is_named():
    """Only GEMM 2 splits its K loop (GEMM 1's activation needs whole sums): a BlockConfig whose gemm1 tiles
    have split_k > 1 (e.g. from with_tiles(split_k=2), which changes both GEMMs) is rejected naming the field,
    not as a grouped_gemm output-shape mismatch."""
    gen = torch.Generator().manual_seed(33)
    E, K, H, I, T = 2, 2, 16, 32, 3
    w13, w2, _, _ = _weights(gen, E, H, I)
    x, ids, w = torch.randn(T, H, generator=gen), _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
    tiles = kernels.GemmTiles(32, 16, 1)
    with pytest.raises(ValueError, match=r"BlockConfig.gemm1.split_k=2; allowed: 1 \(only GEMM 2"):
        runners.fused_experts(x, w13, w2, ids, w, block_config=kernels.BlockConfig(16, tiles, tiles).with_tiles(split_k=2))


def test_fused_experts_skips_other_ranks_experts():
    gen = torch.Generator().manual_seed(4)
    E, K, H, I, first = 8, 3, 16, 32, 4
    w13, w2, _, _ = _weights(gen, E, H, I)
    x, ids, w = torch.randn(9, H, generator=gen), _ids(gen, 9, E, K), torch.rand(9, K, generator=gen)
    y = runners.fused_experts(x, w13[first:], w2[first:], ids, w, first_expert=first)
    local_ids = torch.where(ids >= first, ids, torch.full_like(ids, -1))  # experts 0..3 live elsewhere
    assert rel_err(y, moe_reference(x, local_ids, w.double(), w13, w2, MoeConfig(E, K, H, I))) <= 1e-5


def test_deterministic():
    gen = torch.Generator().manual_seed(5)
    w13, w2, _, _ = _weights(gen, 4, 32, 16)
    x, ids, w = torch.randn(17, 32, generator=gen), _ids(gen, 17, 4, 2), torch.rand(17, 2, generator=gen)
    assert torch.equal(runners.fused_experts(x, w13, w2, ids, w), runners.fused_experts(x, w13, w2, ids, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scratch_reuse_and_either_alignment_path_give_the_same_bits(dtype, monkeypatch):
    # Two calls of one shape share their scratch (kept across calls): the first result, still held,
    # must not change when the second call runs (both are checked after it). Forcing the
    # four-kernel alignment (no single-program path) must give bit-identical results.
    gen = torch.Generator().manual_seed(11)
    E, K, H, I, T = 6, 2, 32, 48, 29
    cfg = MoeConfig(E, K, H, I)
    w13, w2, _, _ = _weights(gen, E, H, I, dtype=dtype)
    calls = [(torch.randn(T, H, generator=gen).to(dtype), _ids(gen, T, E, K), torch.rand(T, K, generator=gen))
             for _ in range(2)]
    ys = [runners.fused_experts(x, w13, w2, ids, w) for x, ids, w in calls]
    for y, (x, ids, w) in zip(ys, calls):
        assert rel_err(y, moe_reference(x, ids, w.double(), w13, w2, cfg)) <= tolerance(dtype)
    monkeypatch.setattr(kernels, "SINGLE_PROGRAM_MAX_PAIRS", 0)
    assert torch.equal(ys[1], runners.fused_experts(calls[1][0], w13, w2, *calls[1][1:]))


@pytest.mark.parametrize("T", [0, 3])
def test_scratch_kept_in_inference_mode_serves_calls_outside_it(T):
    # Buffers kept from a call under torch.inference_mode are inference tensors: a later call outside
    # it may write them only through kernels, never a torch op (T=0, no pairs, once zeroed one).
    from ep_runtime.scratch import SCRATCH
    gen = torch.Generator().manual_seed(12)
    w13, w2, _, _ = _weights(gen, 4, 16, 8)
    x, ids, w = torch.randn(T, 16, generator=gen), _ids(gen, T, 4, 2), torch.rand(T, 2, generator=gen)
    SCRATCH.clear()
    with torch.inference_mode():
        y = runners.fused_experts(x, w13, w2, ids, w)
    with torch.no_grad():
        assert torch.equal(runners.fused_experts(x, w13, w2, ids, w), y)


def test_scratch_cache_keys_by_thread_and_keeps_within_its_budget(monkeypatch):
    import threading

    from ep_runtime.scratch import ScratchCache
    cache, cpu = ScratchCache(), torch.device("cpu")
    made = []

    def make(n):
        return lambda: made.append(n) or torch.empty(n, 1024, dtype=torch.uint8)  # n KiB
    first = cache.get(("a",), cpu, make(1))
    assert cache.get(("a",), cpu, make(1)) is first and made == [1]  # a hit allocates nothing
    other = []
    thread = threading.Thread(target=lambda: other.append(cache.get(("a",), cpu, make(1))))
    thread.start()
    thread.join()
    assert other[0] is not first  # another thread never shares a buffer
    monkeypatch.setenv("EP_RUNTIME_SCRATCH_MB", "1")
    big = cache.get(("big",), cpu, make(1025))  # larger than the budget: returned, not kept
    assert cache.get(("big",), cpu, make(1025)) is not big
    cache.clear()
    kept = [cache.get((n,), cpu, make(300)) for n in range(3)]  # 900 KiB
    cache.get((0,), cpu, make(300))  # 0 becomes the most recently used
    cache.get((3,), cpu, make(300))  # 1200 KiB: the least recently used (1) goes
    assert cache.get((0,), cpu, make(300)) is kept[0] and cache.get((2,), cpu, make(300)) is kept[2]
    assert cache.get((1,), cpu, make(300)) is not kept[1]
    monkeypatch.setenv("EP_RUNTIME_SCRATCH_MB", "0")
    cache.clear()
    assert cache.get(("a",), cpu, make(1)) is not cache.get(("a",), cpu, make(1))  # 0: nothing kept


def test_scratch_cache_frees_what_a_lowered_budget_no_longer_covers(monkeypatch):
    """EP_RUNTIME_SCRATCH_MB lowered in a running process (e.g. to 0 to hand memory to a KV cache):
    the next buffer made frees the kept ones beyond the new budget; they were kept for good before
    (a buffer too large to keep returned before anything was freed)."""
    from ep_runtime.scratch import ScratchCache
    cache, cpu = ScratchCache(), torch.device("cpu")
    monkeypatch.setenv("EP_RUNTIME_SCRATCH_MB", "2")
    kept = [cache.get((n,), cpu, lambda: torch.empty(300 << 10, dtype=torch.uint8)) for n in range(3)]  # 900 KiB
    monkeypatch.setenv("EP_RUNTIME_SCRATCH_MB", "0")
    cache.get(("other",), cpu, lambda: torch.empty(1, dtype=torch.uint8))
    assert cache._bytes == 0 and not cache._entries
    assert cache.get((0,), cpu, lambda: torch.empty(300 << 10, dtype=torch.uint8)) is not kept[0]
    monkeypatch.setenv("EP_RUNTIME_SCRATCH_MB", "1")
    kept = [cache.get((n,), cpu, lambda: torch.empty(300 << 10, dtype=torch.uint8)) for n in range(3)]
    monkeypatch.setenv("EP_RUNTIME_SCRATCH_MB", "0")
    cache.get(("big",), cpu, lambda: torch.empty(2 << 20, dtype=torch.uint8))  # too large to keep: still frees
    assert cache._bytes == 0 and not cache._entries


# ------------------------------------------------------------------------------------ backend

CONFIGS = {
    "silu": dict(),
    "gelu": dict(activation="gelu"),
    "gelu_tanh_bias": dict(activation="gelu_tanh", has_bias=True),
    "non_gated_silu": dict(is_gated=False),
    "gpt_oss_swiglu": dict(gemm1_alpha=1.702, gemm1_clamp_limit=0.3, has_bias=True),
    "gpt_oss_no_limit": dict(gemm1_alpha=1.702),
    "clamped_swiglu": dict(gemm1_clamp_limit=0.3),
    "routed_scaling": dict(routed_scaling_factor=2.5),
    "weight_on_input": dict(apply_router_weight_on_input=True, has_bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_config_field_matches_reference_and_torch_runner(name):
    layer = ep.EPMoE(8, 2, 32, 16, runner="triton", **CONFIGS[name])
    problem = make_problem(layer.config, [21], seed=11)
    errors = check_layer(layer, problem, 0)  # y, dx, dw13, dw2 against float64
    assert max(errors.values()) <= tolerance(torch.float32), errors

    torch_layer = ep.EPMoE(8, 2, 32, 16, runner="torch", **CONFIGS[name])
    torch_layer.load_state_dict(layer.state_dict())
    x, ids, w = problem.xs[0], problem.topk_ids[0], problem.topk_weights[0]
    with torch.no_grad():
        assert rel_err(layer(x.float(), ids, w), torch_layer(x.float(), ids, w).double()) <= 1e-5


@pytest.mark.parametrize("single_program", [True, False])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_align_pairs_maps_ids_through_a_table_as_reroute_to_sink_does(single_program, dtype):
    """id_table: the kernels look each id up (clamped to [-1, n], -1 meaning the sink) and give the very
    buffers align_pairs gives the ids mapped by reroute_to_sink first; ids far outside the table (and an
    int64 id past int32, which must not wrap onto a real expert) land on the sink."""
    gen = torch.Generator().manual_seed(11 + (dtype == torch.int64))
    E, L, K, T = 12, 4, 3, 150  # 450 pairs: several chunks either way
    placement = ep.ExpertPlacement(E, 3, 1, expert_to_rank=[e % 3 for e in range(E)])  # rank 1: 1, 4, 7, 10
    ids = torch.randint(-3, E + 3, (T, K), generator=gen).to(dtype)
    if dtype == torch.int64:
        ids[0, 0], ids[1, 1] = 2 ** 32 + 4, -(2 ** 33) + 1  # wrapped to int32: 4 and 1, both local experts
    table, mask = placement.global_to_local_table(), placement.local_mask_with_sink()
    want = kernels.align_pairs(reroute_to_sink(ids, table), mask, 0, L, 16, single_program=single_program)
    got = kernels.align_pairs(ids, mask, 0, L, 16, single_program=single_program, id_table=table)
    for name in ("sorted_pair_ids", "block_expert", "computed", "used_blocks"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert int(got.computed.sum()) == int(((ids % 3 == 1) & (ids >= 0) & (ids < E)).sum())


def test_triton_runner_maps_deferred_ids_in_its_kernels_bit_for_bit():
    """A format's input with the ids left to the backend (defer=True) gives the triton runner's result
    bit for bit as the mapped input does, hooks (which take mapped ids) included."""
    gen = torch.Generator().manual_seed(12)
    E, K, H, I, L = 8, 2, 16, 32, 4
    cfg = MoeConfig(E, K, H, I)
    w13, w2, _, _ = _weights(gen, L, H, I)
    placement = ep.ExpertPlacement(E, 2, 1, expert_to_rank=[e % 2 for e in range(E)])
    ids = torch.randint(-2, E + 2, (15, K), generator=gen, dtype=torch.int32)
    x, w = torch.randn(15, H, generator=gen), torch.rand(15, K, generator=gen)
    deferred = RunnerInput.from_global_ids(x, ids, w, placement, defer=True)
    mapped = RunnerInput.from_global_ids(x, ids, w, placement)
    weights = ExpertWeights(w13, w2)
    backend = runners.create("triton", cfg)
    assert torch.equal(backend.run(deferred, weights), backend.run(mapped, weights))
    seen = []
    hooks = runners.GemmHooks(after_gemm2=lambda inputs, outputs, expert: seen.append(expert) or outputs * 2)
    hooked = runners.create("triton", cfg, hooks=hooks)
    assert torch.equal(hooked.run(deferred, weights), hooked.run(mapped, weights))
    assert torch.equal(seen[0], seen[1]) and int(seen[0].max()) < L


def _round_robin_local_ids(ids, E):
    """Rank 1's local ids when experts are dealt round-robin over 2 ranks (it holds 1, 3, 5, 7 as 0..3), written
    out here rather than read from the placement: other ranks' experts and ids outside [0, E) become -1."""
    return torch.where((ids >= 0) & (ids < E) & (ids % 2 == 1), torch.div(ids, 2, rounding_mode="floor"), -1)


def test_triton_runner_backward_with_deferred_ids_matches_the_reference():
    """Training through a format's deferred ids under a non-identity placement: the backward's torch
    recompute must see the mapped ids (raw global ids would pick the wrong experts' weights). Checked
    against float64: the backward *is* the torch runner's recompute, so comparing with the torch runner
    would compare the gradients with themselves."""
    gen = torch.Generator().manual_seed(13)
    E, K, H, I, L = 8, 2, 16, 32, 4
    cfg = MoeConfig(E, K, H, I)
    w13, w2, _, _ = _weights(gen, L, H, I)
    placement = ep.ExpertPlacement(E, 2, 1, expert_to_rank=[e % 2 for e in range(E)])  # rank 1: 1, 3, 5, 7
    ids = torch.randint(-2, E + 2, (15, K), generator=gen, dtype=torch.int32)
    x, w = torch.randn(15, H, generator=gen), torch.rand(15, K, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
    inp = RunnerInput.from_global_ids(leaves[0], ids, w, placement, defer=True)
    y = runners.create("triton", cfg).run(inp, ExpertWeights(leaves[1], leaves[2]))
    y.square().sum().backward()
    refs = [t.double().requires_grad_() for t in (x, w13, w2)]
    y_ref = moe_reference(refs[0], _round_robin_local_ids(ids, E), w.double(), refs[1], refs[2], MoeConfig(L, K, H, I))
    y_ref.square().sum().backward()
    assert rel_err(y.detach(), y_ref.detach()) <= tolerance(torch.float32)
    for got, want in zip(leaves, refs):
        assert rel_err(got.grad, want.grad) <= tolerance(torch.float32)


def test_global_ids_through_a_non_contiguous_placement_match_the_reference():
    # The mori-style input: global ids mapped to this rank's weight rows through the placement's table
    # (experts dealt round-robin over 2 ranks: rank 1 holds 1, 3, 5, 7), -1 and other ranks' ids -> sink.
    gen = torch.Generator().manual_seed(6)
    E, K, H, I, L = 8, 2, 16, 32, 4
    cfg = MoeConfig(E, K, H, I)
    w13, w2, _, _ = _weights(gen, L, H, I)
    ids = torch.randint(-1, E, (15, K), generator=gen, dtype=torch.int32)
    placement = ep.ExpertPlacement(E, 2, 1, expert_to_rank=[e % 2 for e in range(E)])
    x, w = torch.randn(15, H, generator=gen), torch.rand(15, K, generator=gen)
    inp = RunnerInput.from_global_ids(x, ids, w, placement)
    y = runners.create("triton", cfg).run(inp, ExpertWeights(w13, w2))
    # float64 over the local ids written out in the test (the torch runner reads the same RunnerInput mapping)
    want = moe_reference(x, _round_robin_local_ids(ids, E), w.double(), w13, w2, MoeConfig(L, K, H, I))
    assert rel_err(y, want) <= tolerance(torch.float32)


def test_an_expert_mask_given_as_a_strided_view_is_read_by_value():
    # RunnerInput.expert_mask [L+1] as a view with a stride (a column of a per-expert table, here with expert 1
    # masked out): the alignment kernels read mask[id], not the id-th byte after its first element (expert 1
    # then read the table's [0, 1] entry, True, and expert 2 read [1, 0], False); == the float64 reference.
    gen = torch.Generator().manual_seed(8)
    E, K, H, I, L = 4, 2, 16, 32, 4
    cfg = MoeConfig(E, K, H, I)
    w13, w2, _, _ = _weights(gen, L, H, I)
    mask = torch.tensor([True, False, True, True, False])  # sink L = 4 off, as the runner core's masks
    column = torch.stack([mask, ~mask], 1)[:, 0]
    assert not column.is_contiguous() and torch.equal(column, mask)
    ids = torch.randint(0, L + 1, (9, K), generator=gen, dtype=torch.int32)
    x, w = torch.randn(9, H, generator=gen), torch.rand(9, K, generator=gen)
    y = runners.create("triton", cfg).run(RunnerInput(x, ids, w, column), ExpertWeights(w13, w2))
    kept = torch.where(mask[ids.long()], ids, -1)  # expert 1 and the sink add nothing
    assert (kept != ids).any() and rel_err(y, moe_reference(x, kept, w.double(), w13, w2, cfg)) <= tolerance(torch.float32)


def _lora_hooks(gen, L, H, I, rank=4):
    a1 = (torch.randn(L, rank, H, generator=gen) * 0.3).requires_grad_()
    b1 = (torch.randn(L, 2 * I, rank, generator=gen) * 0.3).requires_grad_()
    a2 = (torch.randn(L, rank, I, generator=gen) * 0.3).requires_grad_()
    b2 = (torch.randn(L, H, rank, generator=gen) * 0.3).requires_grad_()
    seen = []

    def lora(a, b):
        def hook(inputs, outputs, expert_index):
            seen.append(expert_index.clone())
            low = torch.einsum("pi,pri->pr", inputs, a[expert_index])
            return outputs + torch.einsum("pr,por->po", low, b[expert_index])
        return hook

    return runners.GemmHooks(lora(a1, b1), lora(a2, b2)), (a1, b1, a2, b2), seen


def _hooked_layer(runner, E, K, H, I, pick, dispatcher="standard"):
    """A layer on `runner` with the hooks `pick` makes of the LoRA hooks, loaded with a fixed problem."""
    hooks, params, seen = _lora_hooks(torch.Generator().manual_seed(8), E, H, I)
    options = {"num_max_dispatch_tokens_per_rank": 13} if dispatcher == "deepep_ll" else None
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, hooks=pick(hooks), dispatcher_options=options)
    problem = make_problem(layer.config, [13], seed=9)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    return layer, problem, params, seen


def _lora_reference(problem, x, w13, w2, params, K, I):
    """float64 y of the LoRA-hooked experts on problem's tokens, written out per (token, slot): GEMM 1's output
    gets b1 @ (a1 @ x), GEMM 2's b2 @ (a2 @ a); differentiable in every argument."""
    a1, b1, a2, b2 = params
    ref = torch.zeros(x.shape, dtype=torch.float64)
    for t, k in itertools.product(range(x.shape[0]), range(K)):
        e = int(problem.topk_ids[0][t, k])
        if e < 0:
            continue
        h = w13[e] @ x[t] + b1[e] @ (a1[e] @ x[t])
        a = torch.nn.functional.silu(h[:I]) * h[I:]
        ref[t] += problem.topk_weights[0][t, k].double() * (w2[e] @ a + b2[e] @ (a2[e] @ a))
    return ref


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_ll"])
def test_gemm_hooks_match_the_reference_forward_and_backward(dispatcher):
    # y and every gradient (tokens, experts, adapters) against float64; the triton runner's backward recomputes
    # with the torch runner, so the torch runner is no independent check of the gradients. deepep_ll: its
    # expert-major rows converted to token rows (where runner="auto" sends them with hooks)
    E, K, H, I = 4, 2, 16, 24
    seen_by = {}
    for name in ("torch", "triton"):
        layer, problem, params, seen = _hooked_layer(name, E, K, H, I, lambda hooks: hooks, dispatcher)
        x = problem.xs[0].float().requires_grad_()
        y = layer(x, problem.topk_ids[0], problem.topk_weights[0])
        (y * problem.grad_outputs[0].float()).sum().backward()
        seen_by[name] = seen[:2]
        leaves = [t.detach().double().requires_grad_() for t in (x, layer.w13, layer.w2, *params)]
        ref = _lora_reference(problem, *leaves[:3], leaves[3:], K, I)
        (ref * problem.grad_outputs[0]).sum().backward()
        assert rel_err(y.detach(), ref.detach()) <= tolerance(torch.float32), name
        for got, want in zip((x, layer.w13, layer.w2, *params), leaves):
            assert got.grad is not None and rel_err(got.grad, want.grad) <= tolerance(torch.float32), name
    assert all(torch.equal(r, g) for r, g in zip(seen_by["torch"], seen_by["triton"]))  # the same pair grouping


def test_lora_hooks_on_frozen_experts_and_tokens_get_the_reference_gradients():
    # LoRA fine-tuning: the experts and the tokens need no gradient, only the adapters the hooks own do. Both
    # runners give the adapters the float64 reference's gradients (triton gave none: y needed no gradient).
    E, K, H, I = 4, 2, 16, 24
    for name in ("torch", "triton"):
        layer, problem, params, _ = _hooked_layer(name, E, K, H, I, lambda hooks: hooks)
        layer.requires_grad_(False)
        y = layer(problem.xs[0].float(), problem.topk_ids[0], problem.topk_weights[0])
        (y * problem.grad_outputs[0].float()).sum().backward()

        refs = [p.detach().double().requires_grad_() for p in params]
        ref = _lora_reference(problem, problem.xs[0], problem.w13, problem.w2, refs, K, I)
        (ref * problem.grad_outputs[0]).sum().backward()
        assert rel_err(y.detach(), ref.detach()) <= tolerance(torch.float32), name
        for got, want in zip(params, refs):
            assert got.grad is not None, name
            assert rel_err(got.grad, want.grad) <= tolerance(torch.float32), name


def test_double_backward_matches_the_reference():
    # A gradient penalty (torch.autograd.grad(create_graph=True)) through the kernels: the backward's torch
    # recompute keeps its graph, so the penalty's gradients are the float64 reference's (they were missing).
    E, K, H, I = 4, 2, 16, 8
    layer = ep.EPMoE(E, K, H, I, runner="triton")
    problem = make_problem(layer.config, [7], seed=12)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    x = problem.xs[0].float().requires_grad_()
    y = layer(x, problem.topk_ids[0], problem.topk_weights[0])
    dx, = torch.autograd.grad((y * problem.grad_outputs[0].float()).sum(), [x], create_graph=True)
    dx.square().sum().backward()
    x_ref, w13, w2 = (t.clone().requires_grad_() for t in (problem.xs[0], problem.w13, problem.w2))
    y_ref = moe_reference(x_ref, problem.topk_ids[0], problem.topk_weights[0].double(), w13, w2, layer.config)
    dx_ref, = torch.autograd.grad((y_ref * problem.grad_outputs[0]).sum(), [x_ref], create_graph=True)
    dx_ref.square().sum().backward()
    for got, want in ((x.grad, x_ref.grad), (layer.w13.grad, w13.grad), (layer.w2.grad, w2.grad)):
        assert rel_err(got, want) <= tolerance(torch.float32)

    hooked, problem, _, _ = _hooked_layer("triton", E, K, H, I, lambda hooks: hooks)  # not supported: says so
    y = hooked(x, problem.topk_ids[0][:7], problem.topk_weights[0][:7])
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) through GEMM hooks .* runner='torch'"):
        torch.autograd.grad(y.sum(), [x], create_graph=True)


def test_after_gemm2_hook_alone_keeps_the_fused_activation_and_matches_the_reference():
    # No after_gemm1 hook: GEMM 1 runs with the activation fused; the GEMM 2 hook still sees a[pairs]. y equals
    # the float64 LoRA reference with GEMM 1's adapter left out (a1 = 0), on both runners.
    E, K, H, I = 4, 2, 16, 24
    seen_by = {}
    for name in ("torch", "triton"):
        layer, problem, params, seen = _hooked_layer(name, E, K, H, I,
                                                     lambda hooks: runners.GemmHooks(None, hooks.after_gemm2))
        with torch.no_grad():
            y = layer(problem.xs[0].float(), problem.topk_ids[0], problem.topk_weights[0])
            a1, b1, a2, b2 = (p.detach().double() for p in params)
            ref = _lora_reference(problem, problem.xs[0], problem.w13, problem.w2, (torch.zeros_like(a1), b1, a2, b2),
                                  K, I)
        assert rel_err(y, ref) <= tolerance(torch.float32), name
        seen_by[name] = seen[0]
    assert torch.equal(seen_by["triton"], seen_by["torch"])  # the same pair grouping


def test_router_weight_gradient_flows():
    # topk_weights from a differentiable router (softmax, top-k, renormalized) get the float64 reference's
    # gradient (the backward is the torch runner's recompute: the torch runner is no independent check).
    E, K, H, I = 4, 2, 16, 8
    torch.manual_seed(0)
    layer = ep.EPMoE(E, K, H, I, runner="triton", topk_config=ep.TopKConfig(top_k=K, renormalize=True))
    x = torch.randn(7, H)
    logits = torch.randn(7, E, requires_grad=True)
    y = layer(x, router_logits=logits)
    y.square().sum().backward()
    logits64 = logits.detach().double().requires_grad_()
    probs = torch.softmax(logits64, -1)
    ids = probs.detach().topk(K, dim=1).indices
    chosen = probs.gather(1, ids)
    y_ref = moe_reference(x.double(), ids, chosen / chosen.sum(1, keepdim=True), layer.w13.detach(), layer.w2.detach(),
                          layer.config)
    y_ref.square().sum().backward()
    assert rel_err(y.detach(), y_ref.detach()) <= tolerance(torch.float32)
    assert rel_err(logits.grad, logits64.grad) <= tolerance(torch.float32)


def test_training_after_a_call_under_inference_mode():
    # Tables and buffers the first call caches (under inference_mode here) must not be inference tensors:
    # a later training step saves them for backward. Gradients as the float64 reference's.
    E, K, H, I = 4, 2, 32, 16
    torch.manual_seed(0)
    layer = ep.EPMoE(E, K, H, I, runner="triton")
    x, ids, w = torch.randn(5, H), torch.randint(-1, E, (5, K)), torch.rand(5, K)
    with torch.inference_mode():
        layer(x, ids, w)
    x = x.clone().requires_grad_()
    layer(x, ids, w).square().sum().backward()
    x64, w13, w2 = (t.detach().double().requires_grad_() for t in (x, layer.w13, layer.w2))
    moe_reference(x64, ids, w.double(), w13, w2, layer.config).square().sum().backward()
    for got, want in ((x, x64), (layer.w13, w13), (layer.w2, w2)):
        assert rel_err(got.grad, want.grad) <= tolerance(torch.float32)


def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = MoeConfig(4, 1, 16, 16)
    if not torch.cuda.is_available():
        assert "triton" not in runners.available()
        with pytest.raises(RuntimeError, match="runner='triton' cannot run here: no CUDA device"):
            runners.create("triton", cfg)
    backend = triton_runner.TritonRunner(cfg)
    inp = RunnerInput.from_local_ids(torch.randn(2, 16), torch.zeros(2, 1), torch.ones(2, 1), ep.ExpertPlacement(4))
    w = ExpertWeights(torch.randn(4, 32, 16), torch.randn(4, 16, 16))
    with pytest.raises(ValueError, match="runner='triton' got tensors on cpu; it needs CUDA tensors"):
        backend.run(inp, w)


# ------------------------------------------------------------------------------------ layer on ranks

def _triton_on_ranks(rank, world_size):
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="standard", runner="triton")
    problem = make_problem(layer.config, [9 + 4 * r for r in range(world_size)], seed=5)
    return check_layer(layer, problem, rank)


@pytest.mark.parametrize("R", [1, 2])
def test_epmoe_standard_triton_on_gloo_ranks(R):
    for errors in run_ranks(_triton_on_ranks, R):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def test_epmoe_triton_trains():
    torch.manual_seed(0)
    layer = ep.EPMoE(4, 2, 16, 8, runner="triton")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x, ids, w = torch.randn(12, 16), torch.randint(0, 4, (12, 2), dtype=torch.int32), torch.rand(12, 2)
    target = torch.randn(12, 16) * 0.1
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (layer(x, ids, w) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------ block configs

def test_shipped_tables_parse_and_pick_nearest_token_count(tmp_path):
    for path in kernels.CONFIG_DIR.glob("*.json"):
        for shape, table in json.loads(path.read_text()).items():
            own = shape.partition(",kernel=")[2]  # a kernel's own table holds only that kernel's tiles
            for tokens, entry in table.items():
                int(tokens)
                config = kernels.BlockConfig.from_json(entry)
                assert {config.gemm1.kernel, config.gemm2.kernel} <= set(kernels.GEMM_KERNELS)
                assert not own or {config.gemm1.kernel, config.gemm2.kernel} == {own}, (path, shape, tokens)
    table = {"1": {"x": 1}, "64": {"x": 64}, "4096": {"x": 4096}}
    assert kernels._nearest(table, 3) == {"x": 1} and kernels._nearest(table, 100) == {"x": 64}
    assert kernels._nearest(table, 100000) == {"x": 4096}


def test_the_kernel_knob_offers_exactly_the_kernels():
    from ep_runtime import envs
    assert envs.KNOBS["EP_RUNTIME_TRITON_GEMM_KERNEL"].choices == ("auto", *kernels.GEMM_KERNELS)


def test_tuner_times_gemm2_splits_at_decode_sizes_only():
    """Split GEMM 2 candidates (fp32 partial sums of split_k x T*K x H) only where experts get few rows: at
    prefill sizes they would take gigabytes (the DeepSeek-V3 shard at T=16384: ~53 GB for splits 2, 4, 8)."""
    from ep_runtime.runners import triton_tune

    def splits(T):
        return {t.split_k for _, t in triton_tune.default_candidates(T, 8, 32, "portable", fp8=True)}
    assert splits(1) == {1, *triton_tune.SPLITS} and splits(64) == {1, *triton_tune.SPLITS}
    assert splits(1024) == splits(16384) == {1}
    assert {t.split_k for _, t in triton_tune.default_candidates(1, 8, 32, "tma", fp8=True)} == {1}


def test_tune_writes_a_table(tmp_path):
    from ep_runtime.runners import triton_tune
    out = tmp_path / "table.json"
    candidates = [kernels.BlockConfig(16, kernels.GemmTiles(32, 32, 1), kernels.GemmTiles(32, 32, 1)),
                  kernels.BlockConfig(32, kernels.GemmTiles(64, 64, 1), kernels.GemmTiles(64, 64, 1))]
    triton_tune.tune(num_local_experts=2, top_k=2, hidden_size=32, intermediate_size=32, dtype=torch.float32,
                     token_counts=[2, 8], out=out, candidates=candidates, device="cpu", repeats=1)
    table = json.loads(out.read_text())
    key = kernels.shape_key(2, 2, 32, 32, torch.float32)
    assert set(table[key]) == {"2", "8"}
    assert all(kernels.BlockConfig.from_json(e) in candidates for e in table[key].values())


def test_tune_sweeps_each_kernel_into_its_own_table_and_the_fastest_into_the_shape_table(tmp_path):
    from ep_runtime.runners import triton_tune
    out = tmp_path / "table.json"
    candidate = kernels.BlockConfig(16, kernels.GemmTiles(32, 32, 1), kernels.GemmTiles(32, 32, 1))
    swept = ("portable", "tma")
    triton_tune.tune(num_local_experts=2, top_k=2, hidden_size=32, intermediate_size=32, dtype=torch.float32,
                     token_counts=[4], out=out, candidates=[candidate], device="cpu", repeats=1,
                     gemm_kernels=swept)
    table = json.loads(out.read_text())
    for kernel in swept:
        own = kernels.BlockConfig.from_json(table[kernels.shape_key(2, 2, 32, 32, torch.float32, kernel)]["4"])
        assert own == candidate.with_kernel(kernel)
    fastest = kernels.BlockConfig.from_json(table[kernels.shape_key(2, 2, 32, 32, torch.float32)]["4"])
    assert {fastest.gemm1.kernel, fastest.gemm2.kernel} <= set(swept)
    assert fastest.with_kernel("portable") == candidate


@pytest.mark.parametrize("runner", ["triton", "masked"])
@pytest.mark.parametrize("dispatcher", ["standard", "deepep_ll"])
def test_torch_compile_of_a_layer_with_triton_kernels_equals_eager(runner, dispatcher):
    """torch.compile (aot_eager) around a layer whose runner launches Triton kernels: the runner runs
    as it is inside the compiled layer (no tracing into the launch code); output and dx equal eager."""
    if runner not in runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner=runner)
    x, logits = torch.randn(5, 16, requires_grad=True), torch.randn(5, 8)
    y = layer(x, router_logits=logits)
    y.sum().backward()
    dx, x.grad = x.grad.clone(), None
    y_compiled = torch.compile(layer, backend="aot_eager")(x, router_logits=logits)
    y_compiled.sum().backward()
    assert torch.equal(y, y_compiled) and torch.equal(dx, x.grad)


def _compiled_experts_frames(rank, world_size):
    torch.manual_seed(0)
    layer = ep.EPMoE(4, 2, 16, 8, runner="triton")
    x, logits = torch.randn(5, 16), torch.randn(5, 4)
    dispatch_output = layer.dispatcher.dispatch(x, layer.route(x, None, None, logits, None))
    return frames_compiled_per_call(torch.compile(layer.experts_and_combine, backend="eager"), dispatch_output)


def test_torch_compile_of_triton_experts_compiles_nothing_after_their_first_call():
    """The compiled experts (runner and combine) of a Triton runner called again on the same input reuse what
    their first call compiled (no recompile a user's error_on_recompile or recompile_limit would catch): the
    runner's dynamo-disabled wrapper is made where dynamo does not guard on it. In a fresh process (one
    rank): an earlier compiled call makes that wrapper."""
    if "triton" not in runners.available():
        pytest.skip("runner triton cannot run here")
    (compiled,) = run_ranks(_compiled_experts_frames, 1)
    assert compiled[0] > 0 and compiled[1:] == [0, 0], compiled


def test_import_leaves_dynamo_to_torch_compile():
    """`import ep_runtime` does not import torch._dynamo (2 s of every process's start, `import torch`'s
    3 s aside): the Triton runners' torch.compiler.disable wrapper is made at the first compiled call
    (the test above). A fresh interpreter: the harness's forkserver preloads torch._dynamo for its ranks."""
    code = "import sys, ep_runtime; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_capacity_rows_take_the_decode_tile_and_real_top1_tokens_keep_the_prefill_tile():
    """deepep_ll's expert-major rows reach token-row runners as top-1 capacity slots (mostly padding: the
    conversion marks them); real top-1 routing at prefill sizes must not get the decode tile."""
    from ep_runtime.runner_core import ExpertMajorInput, convert
    from ep_runtime.runners import triton_kernels as kernels
    L, N, H = 4, 6, 8
    inp = ExpertMajorInput(torch.randn(L, N, H), torch.tensor([2, 0, 6, 1], dtype=torch.int32))
    rows, _ = convert(inp, RunnerInput, None)
    assert rows.capacity_rows and not RunnerInput.from_local_ids(
        torch.randn(3, H), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), ep.ExpertPlacement(L)).capacity_rows
    rows_per_expert = 256
    capacity = kernels.default_config(32 * rows_per_expert, 1, 32, False, capacity_rows=True)
    real = kernels.default_config(32 * rows_per_expert, 1, 32, False)
    assert (capacity.BLOCK_M, real.BLOCK_M) == (32, 128)


@pytest.mark.parametrize("runner,fmt,other_dtype", [("triton", "deepep_normal", torch.float32),
                                                      ("masked", "deepep_ll", torch.bfloat16)])
def test_float64_is_rejected_naming_the_dtype_not_computed_as_garbage(runner, fmt, other_dtype):
    """Both Triton runners accumulate tl.dot in fp32: float64 operands gave inf/garbage under the
    interpreter (the triton layer's y off by 370%) and do not compile on a GPU ("Loop-carried variable
    acc has initial type fp32 but is re-assigned to fp64"). A float64 layer is refused when built, a
    layer moved to float64 (and fused_experts) when called, and "auto" does not pick the runner for
    float64; the torch runner computes float64 right."""
    msg = rf"dtype=torch.float64; {runner=!r} computes in torch.float32, torch.bfloat16, torch.float16"
    with pytest.raises(ValueError, match=msg):
        ep.EPMoE(8, 2, 16, 8, runner=runner, dtype=torch.float64)
    layer = ep.EPMoE(8, 2, 16, 8, runner=runner).to(torch.float64)
    x, ids, w = torch.randn(3, 16, dtype=torch.float64), torch.tensor([[0, 1], [2, -1], [7, 3]]), torch.rand(3, 2)
    with pytest.raises(ValueError, match="x " + msg):
        layer(x, ids, w)
    if runner == "triton":
        gen = torch.Generator().manual_seed(0)
        w13, w2, _, _ = _weights(gen, 8, 16, 8, dtype=torch.float64)
        with pytest.raises(ValueError, match="x " + msg):
            runners.fused_experts(x, w13, w2, ids, w)
    assert runners.resolve("auto", "cuda", fmt, torch.float64) == "torch"
    assert runners.resolve("auto", "cuda", fmt, other_dtype) == runner
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch", dtype=torch.float64)
    errors = check_layer(layer, make_problem(layer.config, [7], seed=1), 0)
    assert max(errors.values()) <= tolerance(torch.float64), errors


@pytest.mark.parametrize("bad,error,match", [
    (dict(topk_ids="float"), TypeError, r"topk_ids has dtype torch.float32; expected a signed integer dtype"),
    (dict(topk_ids="bool"), TypeError, r"topk_ids has dtype torch.bool; expected a signed integer dtype"),
    (dict(topk_weights="int"), TypeError, r"topk_weights has dtype torch.int64; expected a floating dtype"),
    (dict(x="fp16"), TypeError, r"w13 has dtype torch.float32; allowed: torch.float16, the dtype of x \(unquantized"),
    (dict(w2="fp16"), TypeError, r"w2 has dtype torch.float16; allowed: torch.float32, the dtype of x \(unquantized"),
    (dict(w2="wide"), ValueError, r"w2 has shape \[4, 16, 9\]; expected \[4, 16, 8\]"),
    (dict(x="int"), TypeError, r"x has dtype torch.int64; expected a floating dtype"),
    # one bias alone was named "missing" by a config the caller never made ("b13 is missing; the config has
    # has_bias=True")
    (dict(b2="bias"), ValueError, r"b2 was given without b13; fused_experts takes both biases or neither"),
    (dict(b13="bias"), ValueError, r"b13 was given without b2; fused_experts takes both biases or neither"),
])
def test_fused_experts_names_the_bad_argument(bad, error, match):
    """fused_experts took float and bool ids (2.7 silently became expert 2) and integer weights as
    they were; x and expert weights of different dtypes failed inside Triton (an interpreter
    AssertionError 'Both operands must be same dtype', a compile error on GPU); a w2 of the wrong
    width was reported as a wrong w13. Each now raises naming the argument, as the layer does."""
    gen = torch.Generator().manual_seed(0)
    w13, w2, b13, b2 = _weights(gen, 4, 16, 8, bias=True)
    x, ids, w = torch.randn(3, 16, generator=gen), torch.tensor([[0, 1], [2, -1], [3, 3]]), torch.rand(3, 2)
    args = dict(x=x, w13=w13, w2=w2, topk_ids=ids, topk_weights=w, b13=None, b2=None)
    biases = dict(b13=b13, b2=b2)
    change = {"float": lambda t: t.float() + 0.7, "bool": lambda t: t > 0, "int": lambda t: t.long(),
              "fp16": lambda t: t.half(), "wide": lambda t: torch.randn(4, 16, 9)}
    for name, how in bad.items():
        args[name] = biases[name] if how == "bias" else change[how](args[name])
    with pytest.raises(error, match=match):
        runners.fused_experts(**args)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8])
def test_fused_experts_names_an_id_below_minus_one(dtype):
    """An id of -2 (no expert has it on any rank) was skipped as another rank's expert: its slot silently dropped
    (y lost that expert's share). It is now named with its position; -1 and ids >= L stay skipped, matching the
    float64 reference of the slots that remain."""
    gen = torch.Generator().manual_seed(3)
    w13, w2, _, _ = _weights(gen, 4, 16, 8)
    x, w = torch.randn(3, 16, generator=gen), torch.rand(3, 2, generator=gen)
    with pytest.raises(ValueError, match=r"topk_ids has id -2 at \[1, 1\]; allowed: -1 \(no expert\) or an id >= 0"):
        runners.fused_experts(x, w13, w2, torch.tensor([[0, 1], [2, -2], [3, 3]], dtype=dtype), w)
    ids = torch.tensor([[0, 1], [2, -1], [3, 9]], dtype=dtype)
    y = runners.fused_experts(x, w13, w2, ids, w).double()
    ref = torch.zeros(3, 16, dtype=torch.float64)
    for t in range(3):
        for k in range(2):
            e = int(ids[t, k])
            if 0 <= e < 4:
                h = w13[e].double() @ x[t].double()
                ref[t] += w[t, k].double() * (w2[e].double() @ (torch.nn.functional.silu(h[:8]) * h[8:]))
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first", [-1, 1.5, True, None])
def test_fused_experts_names_a_first_expert_that_is_not_an_int_at_least_0(first):
    """first_expert=-1 shifted every -1 slot onto local expert 0 (computed: a wrong y, 80% off), 1.5 gave fractional
    ids the kernels truncated, True and None failed inside torch's subtraction naming no argument."""
    gen = torch.Generator().manual_seed(0)
    w13, w2, _, _ = _weights(gen, 4, 16, 8)
    x, ids, w = torch.randn(3, 16, generator=gen), torch.tensor([[0, -1], [2, -1], [-1, -1]]), torch.rand(3, 2)
    with pytest.raises(ValueError, match=rf"first_expert={first!r}; allowed: an int >= 0"):
        runners.fused_experts(x, w13, w2, ids, w, first_expert=first)


@pytest.mark.parametrize("L,K,first", [(4, 6, 4), (1, 2, 3)])
def test_fused_experts_takes_more_slots_than_local_experts(L, K, first):
    """A rank's shard may hold fewer experts than a token's top_k (DeepSeek: K=8 over 4 local experts;
    one expert per rank with K=2); the other slots name other ranks' experts and are skipped. It raised
    'top_k=6 must be <= num_experts=4' (the shard's L taken as num_experts)."""
    gen = torch.Generator().manual_seed(L)
    E, H, I, T = 8, 16, 8, 7
    w13, w2, _, _ = _weights(gen, E, H, I)
    x, ids, w = torch.randn(T, H, generator=gen), _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
    xg = x.clone().requires_grad_(True)
    y = runners.fused_experts(xg, w13[first:first + L], w2[first:first + L], ids, w, first_expert=first)
    mine = (ids >= first) & (ids < first + L)
    x64 = x.double().requires_grad_(True)
    ref = moe_reference(x64, torch.where(mine, ids, torch.full_like(ids, -1)), w.double(), w13, w2,
                        MoeConfig(E, K, H, I))
    assert rel_err(y, ref) <= 1e-5
    y.sum().backward()
    ref.sum().backward()
    assert rel_err(xg.grad, x64.grad) <= 1e-5


@pytest.mark.parametrize("runner", ["torch", "triton", "masked", "fused_experts"])
def test_hooks_that_are_not_gemm_hooks_are_named(runner):
    """A bare function for hooks: the torch and triton runners took it when the layer was built and failed at its
    first call, the masked runner and fused_experts failed at once, each with an AttributeError ('function' object
    has no attribute 'after_gemm1'); a hook that is not callable failed only when called."""
    hook = lambda i, o, e: o  # noqa: E731
    with pytest.raises(TypeError, match=r"hooks=<function .*>; allowed: None or an ep.runners.GemmHooks\("):
        if runner == "fused_experts":
            gen = torch.Generator().manual_seed(0)
            w13, w2, _, _ = _weights(gen, 4, 16, 8)
            runners.fused_experts(torch.randn(2, 16), w13, w2, torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2),
                                  hooks=hook)
        else:
            ep.EPMoE(4, 2, 16, 8, runner=runner, hooks=hook)
    with pytest.raises(TypeError, match=r"hooks.after_gemm2='lora' is not callable; allowed: None or a callable"):
        runners.GemmHooks(after_gemm2="lora")


@pytest.mark.parametrize("runner", ["torch", "triton"])
def test_a_hook_returning_another_shape_is_an_error_naming_it(runner):
    # A [2I] row returned for GEMM 1's [P, 2I] was broadcast over every pair by triton's row store (silently
    # wrong); a [P, H - 1] block failed inside index_add or a matmul, naming neither the hook nor the shape.
    E, K, H, I = 4, 2, 16, 8
    problem = make_problem(MoeConfig(E, K, H, I), [5], seed=13)
    shape_of_outputs = r"allowed: None or the outputs' shape \[\d+, 16\]"
    # a tensor of the wrong shape: ValueError; not a tensor at all: TypeError (each pinned, not either)
    for name, bad, error, message in [
            ("after_gemm1", lambda i, o, e: o.sum(0), ValueError, r"a tensor of shape \[16\]; " + shape_of_outputs),
            ("after_gemm2", lambda i, o, e: o[:, :-1], ValueError, r"a tensor of shape \[\d+, 15\]; " + shape_of_outputs),
            ("after_gemm2", lambda i, o, e: 3.0, TypeError, "float; allowed: None or a tensor")]:
        layer = ep.EPMoE(E, K, H, I, runner=runner, hooks=runners.GemmHooks(**{name: bad}))
        with pytest.raises(error, match=f"hooks.{name} returned " + message):
            layer(problem.xs[0].float(), problem.topk_ids[0], problem.topk_weights[0])


# ------------------------------------------------------------------------------------ per-shape plans

class _ConstexprSpy:
    """Stands in for a @triton.jit kernel: launches it and records each launch's constexpr arguments (by name), the
    values a GPU compiles a variant for."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches
        fn = kernel.fn if hasattr(kernel, "fn") else kernel.kernel.fn
        self.params = list(inspect.signature(fn).parameters)
        self.constexpr = {p for p in self.params if "constexpr" in str(fn.__annotations__.get(p, ""))}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.params, args)), **kwargs}
            self.launches.append((self.kernel.__name__, {k: v for k, v in named.items() if k in self.constexpr}))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _spy_on(monkeypatch, module, names):
    launches = []
    for name in names:
        monkeypatch.setattr(module, name, _ConstexprSpy(getattr(module, name), launches))
    return launches


def test_kernels_compile_per_layer_shape_not_per_token_count(monkeypatch):
    """The constexprs the runner's kernels are launched with (a GPU compiles a variant per value) are the same at
    every token count: widths and strides follow from the layer (only the one-program alignment's CHUNK follows
    the pair count, by powers of two). A count-dependent constexpr would compile at every new batch size."""
    monkeypatch.setattr(triton_runner, "_PLANS", {})
    names = ["_align_single_kernel", "_align_count_kernel", "_align_offsets_kernel", "_align_blocks_kernel",
             "_align_scatter_kernel", "_grouped_gemm_kernel", "_topk_reduce_kernel"]
    launches = _spy_on(monkeypatch, kernels, names)
    gen = torch.Generator().manual_seed(0)
    E, K, H, I = 6, 2, 32, 48
    for bias, on_input in ((False, False), (True, True)):
        w13, w2, b13, b2 = _weights(gen, E, H, I, bias=bias)
        seen: dict = {}
        for T in (1, 3, 29, 200):  # (200 * 2 pairs: the four-kernel alignment)
            x, ids, w = torch.randn(T, H, generator=gen), _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
            launches.clear()
            runners.fused_experts(x, w13, w2, ids, w, b13=b13, b2=b2, apply_router_weight_on_input=on_input)
            for i, (name, constexprs) in enumerate(launches):
                constexprs.pop("CHUNK", None)
                seen.setdefault((i if name == "_grouped_gemm_kernel" else name), []).append(constexprs)
        assert {"_align_single_kernel", "_align_count_kernel", "_topk_reduce_kernel"} <= set(seen)
        for name, each in seen.items():
            assert all(c == each[0] for c in each), (name, each)


def test_a_kept_plan_serves_only_its_layout_and_keeps_no_tensor_alive():
    """fused_forward keeps a plan per shape: a later call whose weights or rows have the same shapes but other
    strides takes its own and gives the same bits; no tensor of a call outlives it through a kept plan."""
    gen = torch.Generator().manual_seed(1)
    E, K, H, I, T = 6, 2, 32, 48, 5
    w13, w2, b13, b2 = _weights(gen, E, H, I, bias=True)
    x, ids, w = torch.randn(T, H, generator=gen), _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
    y = runners.fused_experts(x, w13, w2, ids, w, b13=b13, b2=b2)
    cfg = MoeConfig(E, K, H, I, has_bias=True)
    assert rel_err(y, moe_reference(x, ids, w.double(), w13, w2, cfg, b13, b2)) <= tolerance(torch.float32)
    w2_columns = w2.transpose(1, 2).contiguous().transpose(1, 2)  # [E, H, I] read along dim 1
    w13_rows = torch.cat([w13, w13], dim=2)[:, :, :H]  # rows of 2H
    b13_strided = torch.stack([b13, b13], dim=2)[:, :, 0]
    x_strided = torch.cat([x, x], dim=1)[:, H:]
    for args in ((x, w13, w2_columns, b13), (x, w13_rows, w2, b13), (x, w13, w2, b13_strided),
                 (x_strided, w13, w2, b13)):
        assert torch.equal(runners.fused_experts(args[0], args[1], args[2], ids, w, b13=args[3], b2=b2), y)
    gone = torch.randn(E, H, I, generator=gen)
    kept = weakref.ref(gone)
    runners.fused_experts(x, w13, gone, ids, w, b13=b13, b2=b2)
    del gone
    gc.collect()
    assert kept() is None


def test_reload_tables_makes_the_next_call_pick_its_tiles_again(monkeypatch):
    """A kept plan holds the tiles picked from the tuned tables it saw; reload_tables (triton_tune calls it after
    writing a table) forgets the picks, so the next call of a planned shape must plan again, not keep the tiles of
    the table before (on a GPU the rewritten table's entry was never used until the process restarted)."""
    monkeypatch.setattr(triton_runner, "_PLANS", {})
    gen = torch.Generator().manual_seed(2)
    E, K, H, I, T = 6, 2, 32, 48, 5
    w13, w2, _, _ = _weights(gen, E, H, I, bias=False)
    x, ids, w = torch.randn(T, H, generator=gen), _ids(gen, T, E, K), torch.rand(T, K, generator=gen)
    y = runners.fused_experts(x, w13, w2, ids, w)
    before = list(triton_runner._PLANS.values())
    assert len(before) == 1
    assert torch.equal(runners.fused_experts(x, w13, w2, ids, w), y)
    assert list(triton_runner._PLANS.values()) == before  # the same shape reuses its plan
    kernels.reload_tables()
    assert torch.equal(runners.fused_experts(x, w13, w2, ids, w), y)
    assert [plan for plan in triton_runner._PLANS.values() if all(plan is not old for old in before)], \
        "the call after reload_tables reused the plan picked from the tables before"


def test_two_layers_from_two_threads_at_once():
    """Two triton-runner layers called from two Python threads at the same time equal the reference. Under the
    interpreter (CPU) each launch swaps triton.language's functions process-wide: unserialized launches from two
    threads undid each other's swap and a kernel failed ("Did you forget to add @triton.jit ?")."""
    import threading
    gen = torch.Generator().manual_seed(11)
    layers, weights = [], []
    for activation, bias in (("silu", False), ("gelu", True)):
        layer = ep.EPMoE(6, 2, 16, 16, dispatcher="standard", runner="triton", dtype=torch.float32,
                         activation=activation, has_bias=bias)
        w = _weights(gen, 6, 16, 16, bias=bias)
        layer.load_experts(*w)
        layers.append(layer)
        weights.append(w)
    inputs = [[(torch.randn(9, 16, generator=gen), _ids(gen, 9, 6, 2), torch.rand(9, 2, generator=gen))
               for _ in range(6)] for _ in layers]
    errors, outputs = [], [[], []]
    start = threading.Barrier(2)

    def calls(i):
        try:
            start.wait()
            for x, ids, w in inputs[i]:
                with torch.no_grad():
                    outputs[i].append(layers[i](x, ids, w))
        except Exception as err:  # noqa: BLE001 - reported by the test's thread
            errors.append(err)

    threads = [threading.Thread(target=calls, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for layer, (w13, w2, b13, b2), ins, outs in zip(layers, weights, inputs, outputs):
        for (x, ids, w), y in zip(ins, outs):
            expected = moe_reference(x.double(), ids, w.double(), w13.double(), w2.double(), layer.config,
                                     b13=b13.double() if b13 is not None else None,
                                     b2=b2.double() if b2 is not None else None)
            assert rel_err(y, expected) < 1e-5
