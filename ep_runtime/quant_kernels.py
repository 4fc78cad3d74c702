"""The fused activation quantization kernel (CUDA; CPU tensors under TRITON_INTERPRET=1), beside its
launcher. One pass per row reads the group, takes its amax, writes the fp8 values and the scale (fp32,
or one UE8M0 exponent byte), into any row-strided destination: the triton and masked runners point it
at their GEMM inputs. The rule itself is one jit function, quantize_groups, which the dispatch packing
kernel (dispatchers/exchange_kernels.py) calls too, quantizing each token as it packs the send rows.

The torch reference is QuantConfig.quantize_activation (ep_runtime/quant.py); the two agree bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .quant import MIN_AMAX, QuantConfig
from .triton_launch import cdiv, fast_launch, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: callers use QuantConfig.quantize_activation instead
    triton = None


if triton is not None:

    @triton.jit
    def round_to_e4m3(v):
        """v (fp32, |v| <= 448) rounded to the nearest e4m3 value (ties to even), still fp32: the
        interpreter's fp32 -> fp8 cast truncates (31.3 became 16, a carry into the exponent is lost;
        values below 2^-9 became 0), so under it the kernel rounds first and the cast is then exact."""
        exponent = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: 2^-9 steps
        ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        r = (tl.abs(v) / ulp + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds to even
        return tl.where(v < 0, -r, r) * ulp

    @triton.jit
    def _max_keeping_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def quantize_groups(v, fp8_max, min_amax, UE8M0: tl.constexpr, ROUND_FIRST: tl.constexpr, QUOTIENT: tl.constexpr):
        """The activation rule, shared by every kernel that quantizes (this file's and the dispatch
        packing kernel): v [GROUPS, GROUP] fp32 (zeros past the row) -> (q [GROUPS, GROUP] fp32, exact
        once cast to e4m3; scale [GROUPS] fp32). s = max(amax, min_amax) / fp8_max (UE8M0: rounded up
        to 2^n on the bits, exactly as quant.round_up_pow2), q = x * r clamped to +-fp8_max, r = 1 / s
        correctly rounded once per group (a correctly rounded quotient per element is a branching
        routine that left GEMM 1's tensor cores idle ~10% of the Gluon kernel's time: the GEMM epilogues'
        rule); QUOTIENT (the tokens' rule: memory-bound kernels, and bf16 tokens' 8 significant bits often put
        x / s exactly halfway between two e4m3 values, where x * r fell on the other side ~1 value in 2000,
        which the activation's own fp8 rounding amplified past the bf16 bound): q = x / s correctly rounded;
        ROUND_FIRST
        (the interpreter) rounds q onto the e4m3 grid here, as the GPU's cast does. A NaN or infinity
        makes its group's scale and values non-finite, as in torch: max and clamp keep NaN operands
        (a GPU's plain max drops them, which turned a NaN token into finite values)."""
        amax = tl.maximum(tl.reduce(tl.abs(v), 1, _max_keeping_nan), min_amax, propagate_nan=tl.PropagateNan.ALL)
        scale = tl.div_rn(amax, fp8_max)  # correctly rounded (a plain / is approximate on GPUs)
        if UE8M0:
            bits = scale.to(tl.int32, bitcast=True)
            exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
            scale = tl.where(scale == scale, (exponent << 23).to(tl.float32, bitcast=True), scale)  # NaN stays NaN
        if QUOTIENT:
            q = tl.div_rn(v, scale[:, None])
        else:
            q = v * tl.div_rn(1.0, scale)[:, None]
        q = tl.minimum(tl.maximum(q, -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max,
                       propagate_nan=tl.PropagateNan.ALL)
        if ROUND_FIRST:
            q = round_to_e4m3(q)
        return q, scale

    @triton.jit
    def stored_scale(scale, SCALE_BYTE: tl.constexpr):
        """A scale as it is stored: fp32, or (SCALE_BYTE, UE8M0 scales) its exponent byte."""
        if SCALE_BYTE:
            stored = ((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8)
        else:
            stored = scale
        return stored

    @triton.jit
    def quantize_row_groups(x_ptr, q_ptr, s_ptr, row, group_block, H, G, stride_x, stride_q, stride_s, fp8_max,
                            min_amax, GROUP: tl.constexpr, GROUPS: tl.constexpr, UE8M0: tl.constexpr,
                            SCALE_BYTE: tl.constexpr, ROUND_FIRST: tl.constexpr):
        """Row `row` (int64), groups group_block * GROUPS .. + GROUPS quantized by quantize_groups: one
        program's share of quantize_rows (the triton runner's alignment kernel runs it too)."""
        g = group_block * GROUPS + tl.arange(0, GROUPS)
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        inside = (cols < H) & (g[:, None] < G)
        v = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        q, scale = quantize_groups(v, fp8_max, min_amax, UE8M0, ROUND_FIRST, True)  # (tokens: the quotient)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=inside)
        tl.store(s_ptr + row * stride_s + g, stored_scale(scale, SCALE_BYTE), mask=g < G)

    @fast_launch
    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, filter_ptr, span, H, G, stride_x, stride_q, stride_s,
                              fp8_max, min_amax, GROUP: tl.constexpr, GROUPS: tl.constexpr, UE8M0: tl.constexpr,
                              SCALE_BYTE: tl.constexpr, ROUND_FIRST: tl.constexpr, ROW_FILTER: tl.constexpr,
                              SPAN_PAD: tl.constexpr = 1):
        """Program (r, b): row r's groups of block b. Rows the filter leaves out are neither read nor
        written: ROW_FILTER 1, a flag per row (0: skip); 2, a count per block of `span` rows (rows of the
        block from that count on are skipped: an expert-major buffer's padding past masked_m); 3, a flag per
        pair, `span` pairs per row (SPAN_PAD >= span): a row none of whose pairs is computed is skipped."""
        row = tl.program_id(0).to(tl.int64)
        if ROW_FILTER == 1:
            if tl.load(filter_ptr + row) == 0:
                return
        if ROW_FILTER == 2:
            if row % span >= tl.load(filter_ptr + row // span):
                return
        if ROW_FILTER == 3:
            k = tl.arange(0, SPAN_PAD)
            if tl.max(tl.load(filter_ptr + row * span + k, mask=k < span, other=0).to(tl.int32), 0) == 0:
                return
        quantize_row_groups(x_ptr, q_ptr, s_ptr, row, tl.program_id(1), H, G, stride_x, stride_q, stride_s, fp8_max,
                            min_amax, GROUP, GROUPS, UE8M0, SCALE_BYTE, ROUND_FIRST)


@dataclass
class RowQuantization:
    """One quantize_rows call, set up but not launched: x [T, H] row-strided, its outputs q [T, H] fp8 and
    scale [T, G] (fp32, or uint8 exponent bytes), `group_blocks` programs per row, and the kernel's
    remaining arguments (`args`, after the three pointers) and constexprs (`meta`). launch() runs it as
    its own kernel; the triton runner's alignment kernel may run its programs instead (one launch less)."""

    x: torch.Tensor
    q: torch.Tensor
    scale: torch.Tensor
    group_blocks: int
    args: tuple
    meta: dict

    def launch(self, row_ok: Optional[torch.Tensor] = None, row_counts: Optional[torch.Tensor] = None,
               rows_per_count: int = 1, computed_pairs: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """row_ok [T] bool, or row_counts [T / rows_per_count] int, or computed_pairs [T * K] bool (a row is
        quantized when one of its K pairs is computed: an alignment's AlignedPairs.computed, whose GEMM reads
        no other row): the rows to quantize (quantize_rows)."""
        if sum(f is not None for f in (row_ok, row_counts, computed_pairs)) > 1:
            raise ValueError("quantize_rows takes one of row_ok, row_counts or computed_pairs")
        T = self.x.shape[0]
        # (rows_per_count 0 with no rows: an expert-major buffer of 0 rows per expert, a call routing no pair)
        if row_counts is not None and (rows_per_count < min(T, 1) or row_counts.numel() * rows_per_count != T):
            raise ValueError(f"row_counts has {row_counts.numel()} counts of rows_per_count={rows_per_count} rows; x has "
                             f"{T} rows (one count per block of rows, rows_per_count >= 1, or 0 with no rows)")
        if computed_pairs is not None and (computed_pairs.dtype != torch.bool or (T and computed_pairs.numel() % T)
                                           or not computed_pairs.is_contiguous()):
            raise ValueError(f"computed_pairs has {computed_pairs.numel()} {computed_pairs.dtype} entries; x has {T} rows "
                             f"(a contiguous bool per pair, read flat, the same number of pairs per row)")
        if T:
            filter_by, span, mode = self.x, rows_per_count, 0
            if row_ok is not None:
                filter_by, mode = row_ok.view(torch.uint8), 1
            elif row_counts is not None:
                filter_by, mode = row_counts, 2
            elif computed_pairs is not None:
                filter_by, span, mode = computed_pairs.view(torch.uint8), computed_pairs.numel() // T, 3
            _quantize_rows_kernel[(T, self.group_blocks)](
                self.x, self.q, self.scale, filter_by, span, *self.args, ROW_FILTER=mode,
                SPAN_PAD=next_power_of_2(max(span, 1)) if mode == 3 else 1, num_warps=4, **self.meta)
        return self.q, self.scale


def plan_rows(x: torch.Tensor, config: QuantConfig, q: Optional[torch.Tensor] = None,
              scale: Optional[torch.Tensor] = None, interpreted: bool = False) -> RowQuantization:
    """quantize_rows' checks, outputs and launch arguments, without the launch."""
    if triton is None:
        raise RuntimeError("quantize_rows needs triton; use QuantConfig.quantize_activation")
    T, H = x.shape
    G, group = config.num_groups(H), config.activation_group
    if x.stride(1) != 1:
        x = x.contiguous()
    if q is None:
        q = torch.empty(T, H, dtype=config.dtype, device=x.device)
    if scale is None:
        scale = torch.empty(T, G, dtype=torch.float32, device=x.device)
    if scale.dtype == torch.uint8 and not config.ue8m0:
        raise ValueError("uint8 scales (exponent bytes) need scale_encoding='ue8m0'")
    groups = max(1, min(next_power_of_2(G), 4096 // group if not interpreted else 64))
    args = (H, G, x.stride(0), q.stride(0), scale.stride(0), config.spec.max_value, MIN_AMAX)
    meta = dict(GROUP=group, GROUPS=groups, UE8M0=config.ue8m0, SCALE_BYTE=scale.dtype == torch.uint8,
                ROUND_FIRST=interpreted)
    return RowQuantization(x, q, scale, cdiv(G, groups), args, meta)


def quantize_rows(x: torch.Tensor, config: QuantConfig, q: Optional[torch.Tensor] = None,
                  scale: Optional[torch.Tensor] = None, row_ok: Optional[torch.Tensor] = None,
                  interpreted: bool = False, row_counts: Optional[torch.Tensor] = None,
                  rows_per_count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (any float dtype, row-strided) -> (q [T, H] fp8, scale [T, G] fp32, or uint8 exponent
    bytes when `scale` is given as uint8 under ue8m0). q and scale may be row-strided views of one
    buffer (the send payload). Rows left out are neither read nor written: row_ok [T] bool (False: left
    out), or row_counts [T / rows_per_count] int32 (of each block of rows_per_count rows, those from
    its count on: the masked runner's padding rows past masked_m)."""
    return plan_rows(x, config, q, scale, interpreted).launch(row_ok, row_counts, rows_per_count)
