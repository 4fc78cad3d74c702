"""The masked runner: Triton grouped GEMMs over deepep_ll's expert-major layout [L, M*R, H].

Expert l's rows p < masked_m[l] are tokens; the rest of its M*R rows are padding that is never read
(it may hold NaN). Each kernel program reads masked_m[l] on the device and loops only over the row
blocks below it, so the launch is data-independent (no host sync: the whole step captures into a
CUDA graph) while the cost follows the real row count, not the buffer size.

    gemm1     a[l, p] = act(x[l, p] @ gate[l]^T + b_gate) * (x[l, p] @ up[l]^T + b_up)   (activation
              and multiply in the epilogue, on the fp32 accumulators; not gated: act(x @ w1^T + b1))
    gemm2     y[l, p] = routed_scaling_factor * (a[l, p] @ w2[l]^T + b2[l])

The output is unweighted (deepep_ll's combine applies the topk weights; with
apply_router_weight_on_input the dispatcher already scaled recv_x). Rows p >= masked_m[l] of the
output are left unwritten (whatever the allocator held; combine never reads them): zeroing them would
cost a full [L, M*R, H] write, more than the GEMMs themselves move at decode sizes.

The backend computes the expert-major layout (ExpertMajorInput) natively; token-row formats reach
it through the runner core's conversion (pairs grouped into [L, C, H], one host sync for C).

Quantized experts (fp8 block weights): both GEMMs are block-scaled fp8 (BLOCK_SCALED) over fp8 rows with
one scale per row and 128 channels: an fp8 dispatch's rows as they arrive (else recv_x quantized by
the fused row kernel), and gemm1's epilogue writes its output as fp8 plus scales (QUANT_OUT; a
program's BLOCK_N1 columns are one scale group). Inference only.

Autograd: the forward runs the kernels; the backward recomputes the valid rows with the torch
runner's differentiable ops and back-propagates through them, so training gives the torch runner's
gradients. GEMM hooks are not supported (rejected at construction): use runner="torch" or "triton".

Host time: an eager call of a shape seen before reuses that shape's plan (_Plan: tiles, scratch key and the two
prepared launches, made from shapes, strides and dtypes only) and only launches.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.quant import INFERENCE_ONLY, MIN_AMAX, QuantConfig, decode_scales
from ep_runtime.runner_core import ExpertMajorInput, needs_grad
from ep_runtime.scratch import SCRATCH
from ep_runtime.triton_launch import SLOT, bind, cdiv, fast_launch, next_power_of_2
from ep_runtime.triton_launch import triton_interpreted as interpreted
from ep_runtime.validation import check_tile_sides

from . import register
from .base import GemmHooks, TritonBackend, recompute_backward

try:
    import triton
    import triton.language as tl

    from ep_runtime.quant_kernels import quantize_groups, quantize_rows

    from .triton_kernels import (
        ACTIVATION_CODES,
        INTERPRETED,
        _capability,
        _sm_count,
        activate,
        activation_args,
        one_weight_scale,
        scaled_step,
    )
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # triton is optional (`pip install ep-runtime[triton]`)
    triton = tl = None  # type: ignore[assignment]
    ACTIVATION_CODES = {}
    INTERPRETED = False
    _IMPORT_ERROR = f"triton does not import ({exc}); pip install triton"


@dataclass(frozen=True)
class MaskedTiles:
    """Tiles of both GEMMs. A program owns one expert's BLOCK_N output columns and loops over that
    expert's row blocks below masked_m[l], taking every ROW_SPLITS-th one (ROW_SPLITS programs share
    the rows: they run side by side, so each weight tile comes from HBM once for all of them and stays in
    L2, where one program reads it again per row block; and more programs fill the GPU when few experts
    are local). ROW_SPLITS None: row_splits() picks it from the buffer's rows per expert. K_SPLITS: programs
    sharing gemm2's K loop for an expert whose rows fit one block when the experts holding rows leave SMs idle
    (decode); None: k_splits() picks it from the layer's shape, the GPU's SMs and the row splits (whose programs
    split K then). BLOCK_N1 counts output columns of gemm1 (of I: a gated program keeps a gate
    and an up accumulator of BLOCK_N1 columns each)."""

    BLOCK_M: int = 64
    BLOCK_N1: int = 64
    BLOCK_N2: int = 128
    BLOCK_K: int = 64
    num_warps: int = 4
    num_stages: int = 4
    ROW_SPLITS: Optional[int] = None
    K_SPLITS: Optional[int] = None

    def __post_init__(self) -> None:
        check_tile_sides("MaskedTiles", self, ("BLOCK_M", "BLOCK_N1", "BLOCK_N2", "BLOCK_K"))
        for name in ("ROW_SPLITS", "K_SPLITS"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"MaskedTiles.{name}={value!r}; allowed: None (chosen per shape) or an int >= 1")


# 8 splits ran 5-13% faster than 4 at 1024 rows per expert but up to 25% slower at 64 (below): a buffer sized for
# the largest batch (deepep_ll's M) is often far from full, so the bound keeps to 4.
MAX_ROW_SPLITS = 4


def row_splits(rows: int, config: MoeConfig, block_m: int) -> int:
    """ROW_SPLITS for a buffer of `rows` rows per expert: the row blocks an expert holds when every rank sends its
    full M tokens and the routing is uniform (rows * top_k / num_experts rows: deepep_ll's buffer holds M*R rows
    per expert), rounded down to a power of two, 1..MAX_ROW_SPLITS. Graph replay on an H200 (fp8 and bf16, experts
    filled to 64 / 256 / 1024 rows; 2026-12-03): Mixtral with 1 local expert, ROW_SPLITS 1 -> 4 at 256 rows
    323 -> 159 us fp8, 538 -> 222 us bf16, at 1024 rows 1240 -> 599 us; DeepSeek-V3 with 4 or 8 local experts
    1.3-1.8x at 256 and 1024 rows. Splits past an expert's rows are programs that exit at once, but not free
    (at 64 rows, 8 splits cost Mixtral 90 -> 113 us): so the expectation, not the buffer's size, decides."""
    expected = rows * config.top_k // config.num_experts
    splits = 1
    while splits * 2 <= min(MAX_ROW_SPLITS, expected // block_m):
        splits *= 2
    return splits


def _row_programs(tiles: MaskedTiles, rows: int) -> int:
    """The programs that share an expert's row blocks: ROW_SPLITS, at most one per row block of the buffer."""
    return max(1, min(tiles.ROW_SPLITS, cdiv(rows, tiles.BLOCK_M)))


MAX_K_SPLITS = 8


def k_splits(num_local_experts: int, config: MoeConfig, block_n: int, sms: int, row_splits: int) -> int:
    """K_SPLITS for gemm2. At decode one token's top_k experts hold rows: min(L, top_k) x (H / BLOCK_N2) programs
    stream their w2 (Mixtral on one rank: 2 x 32 = 64 programs for an H200's 132 SMs; DeepSeek-V3's shard of 32
    experts: 8 x 56 = 448). Where the row splits launch several programs per column block, those split K (an
    expert they would leave idle); else, where min(L, top_k) experts' column blocks fill under half the SMs, S
    programs a column block, up to two per SM, a power of two <= MAX_K_SPLITS; else none: a grid of programs that
    exit at once costs time too (docs/performance.md, runs BK to BN)."""
    if row_splits > 1:
        return row_splits
    programs = min(num_local_experts, config.top_k) * cdiv(config.hidden_size, block_n)
    if programs * 2 > sms:
        return 1
    splits = 1
    while splits * 2 <= MAX_K_SPLITS and programs * splits * 2 <= 2 * sms:
        splits *= 2
    return splits


INTERPRETER_TILES = MaskedTiles(16, 32, 32, 32, 4, 1)  # few, small programs keep the CPU interpreter fast
# fp8 experts (1-byte weights, a scale per 128 x 128 block): a K step of a whole scale block, eight warps. Graph
# replay on an H200, DeepSeek-V3 shard (L=32, 128 buffer rows per expert), fp8 rows: T=64 577.5 -> 402.6 us
# (57% -> 82% of the copy rate on the weights touched) against the default tiles (2026-12-02, a sweep of 33
# configs). At T=1 BLOCK_M=16 with these was fastest (166.6 -> 101.4 us; BLOCK_M=64 ones were > 110 us) but
# slower at T=64, where experts hold ~16 rows each and 16-row blocks read the weights again per block.
# Measured and not adopted (2026-12-02): 16-row tiles gain 8-10% at 1-16 rows per expert but take 2x past 16 rows
# (and skewed routing has such experts); one kernel choosing 16- or 64-row blocks per expert on the device from
# masked_m ran its 16-row path slower than 16-row tiles alone (one token's 8 experts 117.9 against 102.5 us, and
# 111.1 for these tiles).
FP8_TILES = MaskedTiles(64, 64, 128, 128, 8, 4)


def _default_tiles(fp8: bool, device: torch.device) -> MaskedTiles:
    """The tiles masked_forward runs without a caller's: FP8_TILES only where they fit (four stages of a
    gate-and-up weight tile need over 120 KB of shared memory: Hopper and newer; an Ada GPU has ~100 KB)."""
    if INTERPRETED:
        return INTERPRETER_TILES
    index = device.index if device.index is not None else torch.cuda.current_device()
    return FP8_TILES if fp8 and _capability(index) >= (9, 0) else MaskedTiles()


if triton is not None:

    @triton.jit
    def _rows_times_weights(a_base, w_base, a_scale_ptr, w_scale_ptr, expert, rows, row_ok, cols, col_ok, ks, k_lo,
                            k_hi, up_offset, stride_am, stride_ak, stride_wn, stride_wk, stride_asl, stride_asm,
                            stride_ask, stride_wsl, stride_wsn, stride_wsk, GATED: tl.constexpr,
                            FP32_DOT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SCALED: tl.constexpr,
                            SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, ONE_SCALE: tl.constexpr):
        """(acc, acc_up) [BLOCK_M, BLOCK_N] fp32: the rows' products with the weight columns over K in [k_lo, k_hi)
        (k_lo a multiple of BLOCK_K; acc_up: the up half's, GATED). Row offsets in int64, once per call: an
        expert's rows * H pass 2**31 at M*R > 299593 rows (H=7168), where int32 wrapped."""
        a_ptrs = a_base + rows[:, None].to(tl.int64) * stride_am + (k_lo + ks)[None, :] * stride_ak
        w_ptrs = w_base + k_lo * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = ks < k_hi - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the CPU interpreter's bf16 dot is wrong; fp32 operands are exact there
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if BLOCK_SCALED:
                group_k = k0 // SCALE_K
                a_s = tl.load(a_scale_ptr + expert * stride_asl + rows * stride_asm + group_k * stride_ask,
                              mask=row_ok, other=0.0)
                w_scale_row = w_scale_ptr + expert * stride_wsl + group_k * stride_wsk
                acc = scaled_step(acc, tl.dot(a, w), a_s, w_scale_row, cols, col_ok, stride_wsn, SCALE_N,
                                   ONE_SCALE)
            elif FP32_DOT:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
            if GATED:
                w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    w_up = w_up.to(tl.float32)
                if BLOCK_SCALED:
                    acc_up = scaled_step(acc_up, tl.dot(a, w_up), a_s, w_scale_row, cols + up_offset, col_ok,
                                          stride_wsn, SCALE_N, ONE_SCALE)
                elif FP32_DOT:
                    acc_up += tl.dot(a, w_up, input_precision="ieee")
                else:
                    acc_up += tl.dot(a, w_up)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        return acc, acc_up

    @triton.jit
    def _epilogue(acc, acc_up, bias_ptr, out_ptr, out_scale_ptr, expert, rows, row_ok, cols, col_ok, pid_n,
                  up_offset, stride_bl, stride_bn, stride_ol, stride_om, stride_on, stride_osl, stride_osm, fp8_max,
                  min_amax, scale, alpha, limit, FUSE_ACT: tl.constexpr, ACTIVATION: tl.constexpr,
                  GATED: tl.constexpr, SWIGLU_ALPHA: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  QUANT_OUT: tl.constexpr, UE8M0: tl.constexpr, ROUND_FIRST: tl.constexpr):
        """Bias, then activate() (gemm1) or scale * acc (gemm2), then the store (fp8 plus a scale per row with
        QUANT_OUT: the program's BLOCK_N columns are one scale group). Row offsets in int64 (as the loads')."""
        rows = rows.to(tl.int64)
        if HAS_BIAS:
            b_ptrs = bias_ptr + expert * stride_bl + cols * stride_bn
            acc += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(b_ptrs + up_offset * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if FUSE_ACT:
            result = activate(acc, acc_up, alpha, limit, ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT)
        else:
            result = acc * scale
        if QUANT_OUT:
            result, group_scale = quantize_groups(tl.where(col_ok[None, :], result, 0.0), fp8_max, min_amax,
                                                  UE8M0, ROUND_FIRST, False)
            tl.store(out_scale_ptr + expert * stride_osl + rows * stride_osm + pid_n, group_scale, mask=row_ok)
        out_ptrs = out_ptr + expert * stride_ol + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @fast_launch
    @triton.jit
    def _masked_gemm_kernel(
        a_ptr, w_ptr, bias_ptr, out_ptr, masked_m_ptr, partial_ptr, arrived_ptr,
        num_buffer_rows, row_splits, split_below, N: tl.constexpr, K: tl.constexpr, up_offset: tl.constexpr,
        stride_al, stride_am: tl.constexpr, stride_ak: tl.constexpr,
        stride_wl: tl.constexpr, stride_wn: tl.constexpr, stride_wk: tl.constexpr,
        stride_bl: tl.constexpr, stride_bn: tl.constexpr,
        stride_ol, stride_om: tl.constexpr, stride_on: tl.constexpr,
        a_scale_ptr, stride_asl, stride_asm: tl.constexpr, stride_ask: tl.constexpr,
        w_scale_ptr, stride_wsl: tl.constexpr, stride_wsn: tl.constexpr, stride_wsk: tl.constexpr,
        out_scale_ptr, stride_osl, stride_osm: tl.constexpr, fp8_max, min_amax,
        scale, alpha, limit,
        FUSE_ACT: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, SWIGLU_ALPHA: tl.constexpr,
        HAS_LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, QUANT_OUT: tl.constexpr,
        UE8M0: tl.constexpr, ROUND_FIRST: tl.constexpr, ONE_SCALE: tl.constexpr, K_SPLIT: tl.constexpr,
        L_PAD: tl.constexpr,
    ):
        """out[l, p, n] = epilogue(sum_k a[l, p, k] * w[l, n, k] (+ bias[l, n])) for p < masked_m[l].

        Grid (S, column blocks, L). Row mode: program s < row_splits loops over the row blocks s, s + row_splits,
        ... of its expert that start below masked_m[l]: the launch never depends on the data (no host sync) and no
        program exists per padding block (a grid over all M*R rows would launch mostly empty programs at decode
        sizes). K_SPLIT (gemm2 only): when the experts holding rows have fewer column blocks than split_below (the
        GPU's SMs: decode, where few experts hold rows, so few programs would stream the weights), an expert whose
        rows fit one block is computed by all S programs of its column block instead, each over its S-th of K;
        each stores its fp32 partial [BLOCK_M, BLOCK_N] in `partial` at the column block's slot (numbered over the
        experts holding rows: fewer than split_below) and counts itself in `arrived`; the last to arrive adds the S
        partials in split order (deterministic for given masked_m), applies the epilogue and sets the count back to
        0 for the next launch. GATED: a second accumulator reads w rows up_offset + n (the
        up half) and the epilogue multiplies. FUSE_ACT: the epilogue is activate() (gemm1), else it writes scale *
        acc (gemm2). BLOCK_SCALED: fp8 a and w, each K step's product times a's (row, k group) and w's (row
        block, k group) scales. QUANT_OUT: the epilogue writes fp8 and one scale per row for its BLOCK_N columns.
        The widths and strides that follow from the layer's shape are constexprs (a launch binds 18 parameters
        fewer); those that follow from the buffer's rows per expert (num_buffer_rows, the expert strides of a, out
        and their scales) stay runtime: a token-major format's conversion sizes that buffer per call."""
        pid_s = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.program_id(2).to(tl.int64)
        # ExpertMajorInput.check refuses a count above the buffer's rows; the bound keeps every load inside them
        # even so (masked_forward called directly, or a CUDA assert that lands after this kernel started)
        num_rows = tl.minimum(tl.load(masked_m_ptr + expert), num_buffer_rows)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_base = a_ptr + expert * stride_al
        w_base = w_ptr + expert * stride_wl + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        split = False
        slot = 0
        if K_SPLIT:
            experts = tl.arange(0, L_PAD)
            holding = tl.load(masked_m_ptr + experts, mask=experts < tl.num_programs(2), other=0) > 0
            split = (num_rows <= BLOCK_M) & (tl.sum(holding.to(tl.int32)) * tl.num_programs(1) < split_below)
            slot = tl.sum((holding & (experts < expert)).to(tl.int32)) * tl.num_programs(1) + pid_n
        if split:
            if num_rows > 0:
                splits = tl.num_programs(0)
                steps = tl.cdiv(tl.cdiv(K, BLOCK_K), splits)  # K steps per split
                k_lo = pid_s * steps * BLOCK_K
                rows = tl.arange(0, BLOCK_M)
                row_ok = rows < num_rows
                acc, acc_up = _rows_times_weights(
                    a_base, w_base, a_scale_ptr, w_scale_ptr, expert, rows, row_ok, cols, col_ok, ks, k_lo,
                    tl.minimum(K, k_lo + steps * BLOCK_K), up_offset, stride_am, stride_ak, stride_wn, stride_wk,
                    stride_asl, stride_asm, stride_ask, stride_wsl, stride_wsn, stride_wsk, GATED, FP32_DOT, UPCAST,
                    BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_SCALED, SCALE_N, SCALE_K, ONE_SCALE)
                tile_ptrs = (partial_ptr + slot.to(tl.int64) * splits * BLOCK_M * BLOCK_N + rows[:, None] * BLOCK_N
                             + tl.arange(0, BLOCK_N)[None, :])
                tl.store(tile_ptrs + pid_s * BLOCK_M * BLOCK_N, acc, mask=row_ok[:, None])
                tl.debug_barrier()  # every thread's partial is stored before the count says so (release below)
                if tl.atomic_add(arrived_ptr + slot, 1, sem="acq_rel") == splits - 1:
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for s in range(0, splits):  # in split order, whichever program came last
                        total += tl.load(tile_ptrs + s * BLOCK_M * BLOCK_N, mask=row_ok[:, None], other=0.0,
                                         cache_modifier=".cg")
                    tl.store(arrived_ptr + slot, 0)
                    _epilogue(total, acc_up, bias_ptr, out_ptr, out_scale_ptr, expert, rows, row_ok, cols, col_ok,
                              pid_n, up_offset, stride_bl, stride_bn, stride_ol, stride_om, stride_on, stride_osl,
                              stride_osm, fp8_max, min_amax, scale, alpha, limit, FUSE_ACT, ACTIVATION, GATED,
                              SWIGLU_ALPHA, HAS_LIMIT, HAS_BIAS, QUANT_OUT, UE8M0, ROUND_FIRST)
        elif pid_s < row_splits:
            for m0 in range(pid_s * BLOCK_M, num_rows, row_splits * BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                row_ok = rows < num_rows  # padding rows are never loaded (they may be NaN)
                acc, acc_up = _rows_times_weights(
                    a_base, w_base, a_scale_ptr, w_scale_ptr, expert, rows, row_ok, cols, col_ok, ks, 0, K,
                    up_offset, stride_am, stride_ak, stride_wn, stride_wk, stride_asl, stride_asm, stride_ask,
                    stride_wsl, stride_wsn, stride_wsk, GATED, FP32_DOT, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
                    BLOCK_SCALED, SCALE_N, SCALE_K, ONE_SCALE)
                _epilogue(acc, acc_up, bias_ptr, out_ptr, out_scale_ptr, expert, rows, row_ok, cols, col_ok, pid_n,
                          up_offset, stride_bl, stride_bn, stride_ol, stride_om, stride_on, stride_osl, stride_osm,
                          fp8_max, min_amax, scale, alpha, limit, FUSE_ACT, ACTIVATION, GATED, SWIGLU_ALPHA,
                          HAS_LIMIT, HAS_BIAS, QUANT_OUT, UE8M0, ROUND_FIRST)


def _launch(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
            N: int, block_n: int, tiles: MaskedTiles, *,
            activation: Optional[MoeConfig] = None, scale: float = 1.0, quant: Optional[QuantConfig] = None,
            a_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
            out_scale: Optional[torch.Tensor] = None, k_splits: int = 1, split_below: int = 0) -> Callable[..., None]:
    """One grouped GEMM, prepared for these tensors' shapes, strides and dtypes (never their values or addresses):
    returns launch(a, w, bias, out, masked_m, a_scale, w_scale, out_scale, partial, arrived), which launches it on
    tensors of the same (masked_forward keeps it in a per-shape plan). a [L, M*R, K] x w [L, N (or 2N when gated),
    K]^T -> out [L, M*R, N]. activation: the config whose activation the epilogue applies (gemm1), or None (gemm2:
    scale * acc). quant: block-scaled fp8 (a_scale [L, M*R, G_K], w_scale [L, G_N, G_K]); out_scale [L, M*R, G_N]:
    out is fp8, quantized in the epilogue (block_n must be the activation group). k_splits > 1 (gemm2 only): an
    expert of one row block is split over K when the experts holding rows have fewer than split_below column
    blocks (partial and arrived: split_scratch(launch.split_sizes); None when nothing is split)."""
    L, rows, K = a.shape
    splits = _row_programs(tiles, rows)
    if k_splits > 1 and activation is not None:
        raise ValueError("k_splits > 1 is gemm2's (gemm1's epilogue needs whole rows of K)")
    act = None if activation is None else (activation.activation, activation.is_gated, activation.gemm1_alpha,
                                           activation.gemm1_clamp_limit)
    gated = activation is not None and activation.is_gated
    one_scale = quant is not None and one_weight_scale(quant.weight_block[0], block_n, N if gated else None)
    upcast = INTERPRETED and a.dtype == torch.bfloat16
    meta = _meta(act, bias is not None, a.dtype == torch.float32 or upcast, upcast, block_n, tiles, quant,
                 out_scale is not None, one_scale)
    has_bias, scaled, quant_out = bias is not None, quant is not None, out_scale is not None
    k_splits = min(k_splits, cdiv(K, meta["BLOCK_K"]))  # (no program without a K step)
    programs = max(splits, k_splits) if k_splits > 1 else splits  # a K split takes every program of the first axis
    sizes = (rows, N, K, N if meta["GATED"] else 0, *a.stride(), *w.stride(),
             *(bias.stride() if has_bias else (0, 0)), *out.stride())
    a_scale_strides = a_scale.stride() if scaled else (0, 0, 0)
    w_scale_strides = w_scale.stride() if scaled else (0, 0, 0)
    out_scale_strides = out_scale.stride()[:2] if quant_out else (0, 0)
    values = (quant.spec.max_value if scaled else 1.0, MIN_AMAX, float(scale))
    kernel = bind(_masked_gemm_kernel, (programs, cdiv(N, block_n), L), *(SLOT,) * 7, rows, splits, split_below,
                  *sizes[1:], SLOT, *a_scale_strides, SLOT, *w_scale_strides, SLOT, *out_scale_strides, *values,
                  K_SPLIT=k_splits > 1, L_PAD=next_power_of_2(L) if k_splits > 1 else 1, **meta)

    def launch(a, w, bias, out, masked_m, a_scale=None, w_scale=None, out_scale=None, partial=None, arrived=None):
        # (unused pointers get a tensor that is never read: the kernel's constexprs turn their loads off)
        kernel(a, w, bias if has_bias else w, out, masked_m, partial if k_splits > 1 else a,
               arrived if k_splits > 1 else masked_m, a_scale if scaled else a, w_scale if scaled else a,
               out_scale if quant_out else a)
    slots = min(L * cdiv(N, block_n), split_below)  # (a split launch has fewer column blocks holding rows)
    launch.split_sizes = (slots * programs * tiles.BLOCK_M * block_n, slots) if k_splits > 1 else None
    return launch


def split_scratch(sizes: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A K split's buffers (sizes: its launch's split_sizes): the fp32 partials (every entry read was written in
    the same launch) and an arrival count per slot, int32, zero between launches (the last program of a column
    block sets its count back)."""
    return (torch.empty(sizes[0], dtype=torch.float32, device=device),
            torch.zeros(sizes[1], dtype=torch.int32, device=device))


@functools.lru_cache(maxsize=1024)
def _meta(activation: Optional[tuple], has_bias: bool, fp32_dot: bool, upcast: bool, block_n: int, tiles: MaskedTiles,
          quant: Optional[QuantConfig], quant_out: bool, one_scale: bool) -> dict:
    """_masked_gemm_kernel's constexprs and launch options, built once per combination (rebuilding ~25
    entries per launch is host time at decode sizes). Shared: never changed by a caller. activation:
    (activation, is_gated, gemm1_alpha, gemm1_clamp_limit) of gemm1's epilogue, or None (gemm2)."""
    act = activation_args(*activation) if activation is not None else activation_args("silu", False, None, None)
    scaled = quant is not None
    return dict(
        FUSE_ACT=activation is not None, **act, HAS_BIAS=has_bias, FP32_DOT=fp32_dot, UPCAST=upcast,
        BLOCK_M=tiles.BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=min(tiles.BLOCK_K, quant.weight_block[1]) if scaled else tiles.BLOCK_K,
        BLOCK_SCALED=scaled, SCALE_N=quant.weight_block[0] if scaled else 1,
        SCALE_K=quant.weight_block[1] if scaled else 1, QUANT_OUT=quant_out, UE8M0=quant_out and quant.ue8m0,
        ROUND_FIRST=quant_out and INTERPRETED, ONE_SCALE=one_scale, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def _check_tiles(tiles) -> None:
    """At both entry points (MaskedRunner's construction, masked_forward): tiles of another type failed inside the
    first forward, between a layer's dispatch and combine."""
    if tiles is not None and not isinstance(tiles, MaskedTiles):
        raise TypeError(f"tiles is a {type(tiles).__name__}; allowed: None or a MaskedTiles")


def masked_forward(recv_x: torch.Tensor, masked_m: torch.Tensor, weights: ExpertWeights, config: MoeConfig,
                   tiles: Optional[MaskedTiles] = None, recv_scale: Optional[torch.Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The kernel sequence (gemm1 with fused activation, gemm2). recv_x [L, M*R, H]; masked_m [L] int32
    on recv_x's device; recv_scale [L, M*R, G]: recv_x's fp8 scales (an fp8 dispatch). Returns
    [L, M*R, H] in out_dtype (default recv_x's dtype); rows past masked_m are unwritten.
    Not differentiable by itself (see _MaskedExperts)."""
    _check_tiles(tiles)
    quant = weights.quant
    key = None
    if not torch.compiler.is_compiling():
        w13, w2, b13, b2 = weights.w13, weights.w2, weights.b13, weights.b2
        key = (recv_x.shape, recv_x.stride(), recv_x.dtype, recv_x.device, out_dtype, config, tiles, w13.stride(),
               w2.stride(), None if b13 is None else b13.stride(), None if b2 is None else b2.stride())
        if quant is not None:  # the experts' format, their scales' and the rows' scales' layout
            key += (quant, weights.w13_scale_inv.stride(), weights.w2_scale_inv.stride(),
                    None if recv_scale is None else (recv_scale.shape, recv_scale.stride(), recv_scale.dtype))
        plan = _PLANS.get(key)
        if plan is not None:
            return plan.run(recv_x, masked_m, weights, recv_scale)
    if tiles is None:
        tiles = _default_tiles(quant is not None, recv_x.device)
    plan = _Plan(recv_x, weights, config, tiles, out_dtype)
    if key is not None:
        if len(_PLANS) >= _MAX_PLANS:  # (a bound, not an LRU: shapes beyond it are rare)
            _PLANS.clear()
        _PLANS[key] = plan
    return plan.run(recv_x, masked_m, weights, recv_scale)


_PLANS: dict = {}  # masked_forward's key -> _Plan (shapes, dtypes and strides only: no tensor is kept)
_MAX_PLANS = 256


class _Plan:
    """masked_forward for one shape: its tiles, scratch and prepared launches (made at the first run; they hold no
    tensor), so that run() on tensors of the same shapes, strides and dtypes only launches the two GEMMs. The
    weights' shapes and dtypes are the config's and the rows': every caller checks them first."""

    def __init__(self, recv_x: torch.Tensor, weights: ExpertWeights, config: MoeConfig, tiles: MaskedTiles,
                 out_dtype: Optional[torch.dtype]):
        L, rows, H = recv_x.shape
        I, quant, device = config.intermediate_size, weights.quant, recv_x.device
        if tiles.ROW_SPLITS is None:
            tiles = dataclasses.replace(tiles, ROW_SPLITS=row_splits(rows, config, tiles.BLOCK_M))
        # (split_below: the interpreter has no SMs to fill; it keeps one split unless the tiles ask for more, and
        # then splits every expert of one row block)
        self.split_below = 1 << 20
        if not INTERPRETED and tiles.K_SPLITS != 1:
            self.split_below = _sm_count(device.index)  # (a CUDA tensor's device always has its index)
        if tiles.K_SPLITS is None:
            tiles = dataclasses.replace(tiles, K_SPLITS=1 if INTERPRETED else k_splits(
                L, config, tiles.BLOCK_N2, self.split_below, _row_programs(tiles, rows)))
        self.config, self.tiles, self.shape = config, tiles, (L, rows, H)
        self.out_dtype = out_dtype or recv_x.dtype
        # gemm1's output (and its fp8 scales) is scratch, kept per shape across calls; the result is not.
        self.scratch_key = ("masked", L, rows, I, self.out_dtype, quant)
        self.make = functools.partial(_scratch, L, rows, I, self.out_dtype, quant, device)
        self.launches = None  # (gemm1, gemm2), prepared at the first run
        self.split_key = None  # gemm2's K-split buffers' scratch key (made with the launches: None, no split)

    def run(self, recv_x: torch.Tensor, masked_m: torch.Tensor, weights: ExpertWeights,
            recv_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        config, tiles, quant, (L, rows, H) = self.config, self.tiles, weights.quant, self.shape
        masked_m = masked_m.to(torch.int32).contiguous()  # the kernels read masked_m[l] at offset l
        device = recv_x.device
        a, a_scale = SCRATCH.get(self.scratch_key, device, self.make)
        if quant is not None:
            if recv_scale is None:  # float rows: quantized here, each expert's first masked_m rows (the padding is
                # never read)
                q, recv_scale = quantize_rows(recv_x.reshape(L * rows, H), quant, interpreted=INTERPRETED,
                                              row_counts=masked_m, rows_per_count=rows)
                recv_x, recv_scale = q.view(L, rows, H), recv_scale.view(L, rows, recv_scale.shape[1])
            recv_scale = decode_scales(recv_scale)
        out = torch.empty(L, rows, H, dtype=self.out_dtype, device=device)
        launches = self.launches
        if launches is None:
            fp8 = {} if quant is None else dict(quant=quant, a_scale=recv_scale, w_scale=weights.w13_scale_inv,
                                                out_scale=a_scale)
            first = _launch(recv_x, weights.w13, weights.b13, a, config.intermediate_size,
                            tiles.BLOCK_N1 if quant is None else quant.activation_group, tiles, activation=config,
                            **fp8)
            fp8 = {} if quant is None else dict(quant=quant, a_scale=a_scale, w_scale=weights.w2_scale_inv)
            second = _launch(a, weights.w2, weights.b2, out, H, tiles.BLOCK_N2, tiles,
                             scale=config.routed_scaling_factor, k_splits=tiles.K_SPLITS,
                             split_below=self.split_below, **fp8)
            if second.split_sizes is not None:  # (any launch on this stream may share them: counts end at 0)
                self.split_key = ("masked split", second.split_sizes)
            launches = self.launches = (first, second)
        first, second = launches
        first(recv_x, weights.w13, weights.b13, a, masked_m, recv_scale, weights.w13_scale_inv, a_scale)
        split = (None, None)
        if self.split_key is not None:
            split = SCRATCH.get(self.split_key, device, functools.partial(split_scratch, self.split_key[1], device))
        second(a, weights.w2, weights.b2, out, masked_m, a_scale, weights.w2_scale_inv, None, *split)
        return out


def _scratch(L: int, rows: int, I: int, out_dtype: torch.dtype, quant: Optional[QuantConfig],
             device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """gemm1's output [L, M*R, I] (fp8 with quant) and its scales [L, M*R, I/group] fp32 (None without)."""
    if quant is None:
        return torch.empty(L, rows, I, dtype=out_dtype, device=device), None
    return (torch.empty(L, rows, I, dtype=quant.dtype, device=device),
            torch.empty(L, rows, quant.num_groups(I), dtype=torch.float32, device=device))


class _MaskedExperts(torch.autograd.Function):
    """Forward: the Triton kernels. Backward: recompute the valid rows with the torch runner (through the
    runner core's expert-major -> token-rows conversion) and back-propagate."""

    @staticmethod
    def forward(ctx, recv_x, masked_m, w13, w2, b13, b2, config, tiles):
        ctx.save_for_backward(recv_x, masked_m, w13, w2, b13, b2)
        ctx.config = config
        return masked_forward(recv_x, masked_m, ExpertWeights(w13, w2, b13, b2), config, tiles)

    @staticmethod
    def backward(ctx, grad_y):
        from .torch_runner import TorchRunner
        recv_x, masked_m, *params = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6])

        def recompute(x, w13, w2, b13, b2):
            return TorchRunner(ctx.config).run(ExpertMajorInput(x, masked_m), ExpertWeights(w13, w2, b13, b2))

        x_grad, *param_grads = recompute_backward(recompute, (recv_x, *params), needs, grad_y)
        return (x_grad, None, *param_grads, None, None)


def _check_inputs(recv_x: torch.Tensor, masked_m: torch.Tensor, weights: ExpertWeights) -> None:
    """What the kernels need beyond RunnerBackend.check_weights (the weights' shapes and dtypes, checked
    once per call before compute: by run(), or by the runner core) and ExpertMajorInput.check."""
    device = recv_x.device
    for name, t in (("recv_x", recv_x), ("masked_m", masked_m), ("w13", weights.w13), ("w2", weights.w2)):
        # (recv_x's device checked first: the others on that device pass both checks, per call host time)
        if t is recv_x or t.device != device:
            if t.device.type != "cuda" and not interpreted():
                raise ValueError(f"runner='masked' got {name} on {t.device}; it needs CUDA tensors "
                                 "(or TRITON_INTERPRET=1 for CPU tensors through the interpreter)")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but recv_x is on {device}")


@register
class MaskedRunner(TritonBackend):
    """Triton grouped GEMMs over the expert-major [L, M*R, H] layout that skip rows past masked_m.
    Every MoeConfig field is supported; GEMM hooks are not."""

    name = "masked"
    layouts = (ExpertMajorInput,)
    # float64 would reach tl.dot with an fp32 accumulator: a Triton CompilationError on GPU ("Loop-carried
    # variable acc ... re-assigned to fp64"; only the interpreter runs it)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    import_error = _IMPORT_ERROR

    def __init__(self, config: MoeConfig, hooks: Optional[GemmHooks] = None, tiles: Optional[MaskedTiles] = None):
        super().__init__(config, hooks)
        if config.activation not in ACTIVATION_CODES:
            raise ValueError(f"runner='masked' does not implement activation={config.activation!r}; "
                             f"supported: {', '.join(ACTIVATION_CODES)}")
        _check_tiles(tiles)
        self.tiles = tiles

    @classmethod
    def refusal(cls, hooks: GemmHooks, quant: Optional[QuantConfig]) -> str:
        if hooks.after_gemm1 is not None or hooks.after_gemm2 is not None:
            return ("runner='masked' does not support GEMM hooks (after_gemm1/after_gemm2); use runner='torch' "
                    "(or runner='triton' with unquantized experts) with hooks")
        return ""

    def compute(self, inp: ExpertMajorInput, weights: ExpertWeights) -> torch.Tensor:
        """inp.hidden_states [L, M*R, H], rows p >= masked_m[l] never read. Returns [L, M*R, H] in its
        dtype: routed_scaling_factor * expert_l(row) for valid rows (no topk weight), rows past masked_m
        unwritten. Differentiable."""
        MaskedRunner.check_dtype(inp.output_dtype, "x dtype")  # (a layer moved to another dtype after it was built)
        # (the kernels read masked_m[l] for each of L experts; run() checked it too, with the counts' range)
        inp.check(self.config.hidden_size, counts=False)
        recv_x, masked_m, recv_scale = inp.hidden_states, inp.masked_m, inp.hidden_scale
        if recv_scale is not None and weights.quant is None:  # fp8 rows, unquantized experts: dequantized first
            recv_x, recv_scale = QuantConfig().dequantize_activation(recv_x, recv_scale).to(inp.output_dtype), None
        _check_inputs(recv_x, masked_m, weights)
        if weights.quant is not None or recv_scale is not None:
            if needs_grad(recv_x, weights.b13, weights.b2):
                raise RuntimeError(INFERENCE_ONLY)
            return masked_forward(recv_x, masked_m, weights, self.config, self.tiles, recv_scale, inp.output_dtype)
        if needs_grad(recv_x, weights.w13, weights.w2, weights.b13, weights.b2):
            return _MaskedExperts.apply(recv_x, masked_m, weights.w13, weights.w2, weights.b13, weights.b2,
                                        self.config, self.tiles)
        return masked_forward(recv_x, masked_m, weights, self.config, self.tiles)

    def run_masked(self, recv_x: torch.Tensor, masked_m: torch.Tensor, weights: ExpertWeights) -> torch.Tensor:
        """run() on deepep_ll's tensors as they come (recv_x [L, M*R, H], masked_m [L] int32)."""
        return self.run(ExpertMajorInput(recv_x, masked_m), weights)
