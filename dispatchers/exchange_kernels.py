"""Fused Triton kernels around the exchange (CUDA; CPU tensors only under TRITON_INTERPRET=1).

layout_row: one kernel turns topk ids into is_token_in_rank and the count row [T; per rank; per
expert; value flags] that ranks all-gather. table_plan: one kernel (a program per destination rank
scanning the tokens) places every (token, rank) pair in the send order from the gathered table:
send_token, send_rank, combine_index, plus receive counts and the static compaction.
pack_rows: one kernel builds the send payload: each sent row's hidden state and its [weights;
ids] metadata (ids remapped to the destination's local ids when asked); for an fp8 dispatch the
same kernel quantizes each row per 128 channels as it reads it and writes the fp8 values and
their scales (quant_kernels.quantize_groups, the one rule) straight into the payload. gather_sum:
one kernel adds each token's returned rows (at most R) in fp32 and writes the token's output; no
atomics, so it is deterministic. Both are autograd Functions whose backward is the other one's gather:
pack_rows' adds each token's sent rows' gradients over the plan's combine_index (the same kernel, no
atomics), gather_sum's hands each row its token's gradient.
rank_exchange uses them on CUDA for bf16/fp16/fp32 and plain torch ops elsewhere.

The inference fast path (no autograd) launches each kernel directly, without an autograd Function
around it, and sends metadata as int32 ([weights as fp32 bits; ids]) so the receiver takes ids
and weights as views: every saved torch op is ~8 us of host time on a GPU host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ep_runtime.quant import MIN_AMAX, QuantConfig
from ep_runtime.runner_core import needs_grad
from ep_runtime.scratch import SCRATCH
from ep_runtime.triton_launch import cdiv, fast_launch, interpreted, next_power_of_2

from . import fp8_payload

try:
    import triton
    import triton.language as tl

    from ep_runtime.quant_kernels import quantize_groups, stored_scale
except ImportError:  # triton is optional: the torch path runs instead
    triton = None

# uint8: fp8 dispatch rows with their scales as bytes (dispatchers/fp8_payload.py), received or (off the
# inference path) encoded before packing: copied and laid out, never accumulated.
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.uint8)


@dataclass(frozen=True)
class RowLayout:
    """Where each field of a rank's count row (int32) sits, and its length: [T; tokens to each rank
    (ranks); pairs per expert (experts); tokens to each node (nodes: node-aware plans, else none);
    with `wants`, the gradient bits and x's dtype code (grads_at, dtype_at); value flags (num_flags:
    0, 2 bad id / non-finite weight, or 3 and a repeated expert)]. The one description of the row
    every maker and reader of a count table uses: ranks all-gather their rows, so rows of different
    lengths would pair wrongly (gloo aborts, NCCL hangs)."""

    ranks: int
    experts: int
    num_flags: int
    nodes: int = 0
    wants: bool = True

    @functools.cached_property
    def nodes_at(self) -> int:
        return 1 + self.ranks + self.experts

    @functools.cached_property
    def grads_at(self) -> int:
        """(with `wants`) the gradient bits: 1 when x needs a gradient on that rank, 2 when topk_weights does, 4
        when grad mode is on there (rank_exchange._wants)."""
        return self.nodes_at + self.nodes

    @functools.cached_property
    def dtype_at(self) -> int:
        """(with `wants`) x's dtype code (rank_exchange's; 0: no x)."""
        return self.grads_at + 1

    @functools.cached_property
    def flags_at(self) -> int:
        return self.grads_at + (2 if self.wants else 0)

    @functools.cached_property
    def length(self) -> int:
        return self.flags_at + self.num_flags


def memoized_eagerly(fn):
    """fn's results made once per arguments (a per-call host cost then reads a dict), and made plainly while
    torch.compile traces (dynamo traces an lru_cache's function and warns at every call of it)."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **kwargs) if torch.compiler.is_compiling() else cached(*args, **kwargs)
    return call


@memoized_eagerly
def row_layout(ranks: int, experts: int, num_flags: int, nodes: int = 0, wants: bool = True) -> RowLayout:
    """RowLayout(ranks, experts, num_flags, nodes, wants), made once (a dispatch then reads its offsets
    as plain attributes: host time)."""
    return RowLayout(ranks, experts, num_flags, nodes, wants)


_FORCED = False  # tests: run the kernels on CPU tensors (TRITON_INTERPRET=1) as on a GPU


def enabled(x: torch.Tensor) -> bool:
    """Use the kernels for this tensor: CUDA, a dtype they accumulate correctly, triton present."""
    return on_gpu(x) and x.dtype in _DTYPES


def on_gpu(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _FORCED)


def inference_path(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """The fast kernel path: kernels enabled for x and nothing needs a gradient (autograd takes the
    differentiable path)."""
    return enabled(x) and not needs_grad(x, *others)


class forced:
    """Context manager for tests: the kernel paths serve CPU tensors too (under TRITON_INTERPRET=1),
    so CI runs the GPU code path end to end on gloo ranks."""

    def __enter__(self):
        global _FORCED
        self.before, _FORCED = _FORCED, triton is not None
        return self

    def __exit__(self, *exc):
        global _FORCED
        _FORCED = self.before


if triton is not None:

    @triton.jit
    def _gather_one(src_ptr, index_ptr, weight_ptr, n, cols, K, H, none, WEIGHTED: tl.constexpr,
                    BLOCK_H: tl.constexpr):
        """Columns `cols` of sum_k (weight[n, k] *) src[index[n, k]] in fp32 (index >= none adds
        nothing): the one summing rule of gather_rows and the NVLink transport's partial put."""
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in range(K):
            row = tl.load(index_ptr + n.to(tl.int64) * K + k)
            h_real = tl.where(row < none, H, 0)
            value = tl.load(src_ptr + tl.where(row < none, row, 0).to(tl.int64) * H + cols, mask=cols < h_real,
                            other=0.0).to(tl.float32)
            if WEIGHTED:
                value = value * tl.load(weight_ptr + n.to(tl.int64) * K + k)
            acc += value
        return acc

    @fast_launch
    @triton.jit
    def _gather_rows_kernel(src_ptr, index_ptr, weight_ptr, out_ptr, K, H, none, WEIGHTED: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        """out[n] = sum_k (weight[n, k] *) src[index[n, k]], fp32 accumulation; index >= none adds nothing."""
        n = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        acc = _gather_one(src_ptr, index_ptr, weight_ptr, n, cols, K, H, none, WEIGHTED, BLOCK_H)
        tl.store(out_ptr + n.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


    @fast_launch
    @triton.jit
    def _ll_slots_kernel(ids_ptr, w_ptr, ids_stride, w_stride, slot_ptr, first_ptr, weight_ptr, scale_ptr, masked_m_ptr,
                         N, K, L, WEIGHTS: tl.constexpr, FOLD: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        """Program e < L: the rows holding local expert e, in order, get slots e*N + 0, 1, ... (slot_ptr:
        every topk slot naming e; first_ptr: only the first slot of a row naming e, so a repeated
        expert is written once); with WEIGHTS, weight_ptr gets the slot's weight (FOLD: the weight goes
        to scale_ptr and weight_ptr gets 1). Program L writes the slots naming no local expert (none,
        weight 0), so every output entry is written exactly once and nothing needs pre-filling."""
        e = tl.program_id(0)
        k = tl.arange(0, BLOCK_K)
        none = L * N
        carry = tl.zeros([], dtype=tl.int64)
        for start in range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = (n[:, None] < N) & (k[None, :] < K)
            ids = tl.load(ids_ptr + n[:, None].to(tl.int64) * ids_stride + k[None, :], mask=inside, other=-1)
            flat = n[:, None].to(tl.int64) * K + k[None, :]
            if e < L:
                match = (ids == e) & inside
                present = tl.max(match.to(tl.int64), axis=1)
                slot = e.to(tl.int64) * N + carry + tl.cumsum(present, axis=0) - 1
                slot2 = slot[:, None] + tl.zeros_like(flat)
                first_k = tl.min(tl.where(match, k[None, :], BLOCK_K), axis=1)
                tl.store(slot_ptr + flat, slot2, mask=match)
                tl.store(first_ptr + flat, tl.where(k[None, :] == first_k[:, None], slot2, none), mask=match)
                if WEIGHTS:
                    w = tl.load(w_ptr + n[:, None].to(tl.int64) * w_stride + k[None, :], mask=match, other=0.0)
                    if FOLD:
                        tl.store(scale_ptr + flat, w, mask=match)
                        tl.store(weight_ptr + flat, tl.full(w.shape, 1.0, tl.float32), mask=match)
                    else:
                        tl.store(weight_ptr + flat, w, mask=match)
                carry += tl.sum(present, axis=0)
            else:
                elsewhere = inside & ((ids < 0) | (ids >= L))
                tl.store(slot_ptr + flat, none + tl.zeros_like(flat), mask=elsewhere)
                tl.store(first_ptr + flat, none + tl.zeros_like(flat), mask=elsewhere)
                if WEIGHTS:
                    zero = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
                    tl.store(weight_ptr + flat, zero, mask=elsewhere)
                    if FOLD:
                        tl.store(scale_ptr + flat, zero, mask=elsewhere)
        if e < L:
            tl.store(masked_m_ptr + e, carry.to(tl.int32))

    @fast_launch
    @triton.jit
    def _ll_scatter_kernel(rows_ptr, slot_ptr, scale_ptr, out_ptr, K, H, row_stride, none, SCALE: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (n, h): block h of received row n, read once if any of its K slots is here, stored
        at each of them (times its scale with SCALE)."""
        n = tl.program_id(0)
        hb = tl.program_id(1)
        k = tl.arange(0, BLOCK_K)
        slots = tl.load(slot_ptr + n.to(tl.int64) * K + k, mask=k < K, other=none)
        if tl.min(slots) < none:  # pads and rows for other ranks' experts (most of them) read nothing
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            row = tl.load(rows_ptr + n.to(tl.int64) * row_stride + cols, mask=cols < H, other=0.0)
            for j in range(K):
                slot = tl.load(slot_ptr + n.to(tl.int64) * K + j)
                if slot < none:
                    value = row
                    if SCALE:
                        value = (row.to(tl.float32) * tl.load(scale_ptr + n.to(tl.int64) * K + j)).to(row.dtype)
                    tl.store(out_ptr + slot * H + cols, value, mask=cols < H)

    @fast_launch
    @triton.jit(do_not_specialize=["grads", "dtype_code"])
    def _layout_kernel(ids_ptr, w_ptr, rank_of_ptr, in_rank_ptr, row_ptr, T, K, E, R, flags_at, grads_at, grads,
                       dtype_code, FLAGS: tl.constexpr, DISTINCT: tl.constexpr, WANTS: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        """A program per BLOCK_T tokens: is_token_in_rank, tokens per destination rank and pairs per
        expert (row[1:1+R], row[1+R:1+R+E]), with WANTS the gradient bits and x's dtype code (given,
        at row[grads_at], row[grads_at + 1]), and the value flags at row[flags_at:] (an id outside
        [-1, E), a non-finite weight, and with DISTINCT a token listing one expert twice)."""
        pid = tl.program_id(0)
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        k = tl.arange(0, BLOCK_K)
        inside = (t[:, None] < T) & (k[None, :] < K)
        offs = t[:, None].to(tl.int64) * K + k[None, :]
        ids, valid, owner = _owned_ids(ids_ptr, offs, inside, rank_of_ptr, E)
        if pid == 0:
            tl.store(row_ptr, T)
            if WANTS:
                tl.store(row_ptr + grads_at, grads)
                tl.store(row_ptr + grads_at + 1, dtype_code)
        for r in range(R):
            hit = tl.max((owner == r).to(tl.int32), axis=1)
            tl.store(in_rank_ptr + t.to(tl.int64) * R + r, hit.to(tl.int8), mask=t < T)
            tl.atomic_add(row_ptr + 1 + r, tl.sum(hit))
        tl.atomic_add(row_ptr + 1 + R + tl.where(valid, ids, 0), tl.full(ids.shape, 1, tl.int32), mask=valid)
        if FLAGS:
            bad_id, bad_w, repeated = _value_flags(ids, w_ptr, offs, inside, valid, k, E, DISTINCT)
            tl.atomic_max(row_ptr + flags_at, bad_id)
            tl.atomic_max(row_ptr + flags_at + 1, bad_w)
            if DISTINCT:
                tl.atomic_max(row_ptr + flags_at + 2, repeated)

    @triton.jit
    def _owned_ids(ids_ptr, offs, inside, rank_of_ptr, E):
        """(ids as int64 (int32 or int64 inputs: never wrapped; -1 outside `inside`), valid: ids in
        [0, E), owner: each valid id's rank (-1 elsewhere)): bad ids are flagged, never used as an index."""
        ids = tl.load(ids_ptr + offs, mask=inside, other=-1).to(tl.int64)
        valid = inside & (ids >= 0) & (ids < E)
        owner = tl.load(rank_of_ptr + tl.where(valid, ids, 0), mask=valid, other=-1)
        return ids, valid, owner

    @triton.jit
    def _value_flags(ids, w_ptr, offs, inside, valid, k, E, DISTINCT: tl.constexpr):
        """The count row's value flags over a block of tokens' ids [BLOCK_T, BLOCK_K] (int64; `inside`:
        real entries, `valid`: ids in [0, E)): (an id outside [-1, E), a non-finite weight, and with
        DISTINCT a token listing one expert twice), each 0 or 1."""
        bad_id = tl.max(tl.max((inside & ((ids < -1) | (ids >= E))).to(tl.int32), axis=1), axis=0)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        bad_w = tl.max(tl.max((w - w != 0).to(tl.int32), axis=1), axis=0)  # NaN and +-inf give NaN
        repeated = tl.zeros([], tl.int32)
        if DISTINCT:
            later = k[None, :, None] > k[None, None, :]
            same = (ids[:, :, None] == ids[:, None, :]) & later & valid[:, :, None] & valid[:, None, :]
            repeated = tl.max(tl.max(tl.max(same.to(tl.int32), axis=2), axis=1), axis=0)
        return bad_id, bad_w, repeated

    @triton.jit
    def _count_row(ids_ptr, w_ptr, rank_of_ptr, T, K, E, R, out_ptr, flags_at, FLAGS: tl.constexpr,
                   DISTINCT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_E: tl.constexpr, in_rank_ptr, IN_RANK: tl.constexpr):
        """layout_row's count row [T; tokens per rank (R); pairs per expert (E); flags at flags_at
        (RowLayout's)] of all T tokens in one program, stored at out_ptr (int32) without atomics or a
        zeroed buffer (the NVLink token put stores it straight into the peers' tables; layout_row at
        small T). BLOCK_E > E: ids outside [0, E) count in bin BLOCK_E - 1, which is not stored. With
        IN_RANK also is_token_in_rank [T, R] at in_rank_ptr (0/1 bytes)."""
        k = tl.arange(0, BLOCK_K)
        r = tl.arange(0, BLOCK_R)
        per_rank = tl.zeros([BLOCK_R], tl.int32)
        per_expert = tl.zeros([BLOCK_E], tl.int32)
        bad_id = tl.zeros([], tl.int32)
        bad_w = tl.zeros([], tl.int32)
        repeated = tl.zeros([], tl.int32)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            inside = (t[:, None] < T) & (k[None, :] < K)
            offs = t[:, None].to(tl.int64) * K + k[None, :]
            ids, valid, owner = _owned_ids(ids_ptr, offs, inside, rank_of_ptr, E)
            hit = tl.max((owner[:, :, None] == r[None, None, :]).to(tl.int32), axis=1)  # [BLOCK_T, BLOCK_R]
            per_rank += tl.sum(hit, axis=0)
            if IN_RANK:
                tl.store(in_rank_ptr + t[:, None].to(tl.int64) * R + r[None, :], hit.to(tl.int8),
                         mask=(t[:, None] < T) & (r[None, :] < R))
            bins = tl.reshape(tl.where(valid, ids, BLOCK_E - 1).to(tl.int32), [BLOCK_T * BLOCK_K])
            per_expert += tl.histogram(bins, BLOCK_E)
            if FLAGS:
                b_id, b_w, rep = _value_flags(ids, w_ptr, offs, inside, valid, k, E, DISTINCT)
                bad_id = tl.maximum(bad_id, b_id)
                bad_w = tl.maximum(bad_w, b_w)
                repeated = tl.maximum(repeated, rep)
        tl.store(out_ptr, T)
        tl.store(out_ptr + 1 + r, per_rank, mask=r < R)
        e = tl.arange(0, BLOCK_E)
        tl.store(out_ptr + 1 + R + e, per_expert, mask=e < E)
        if FLAGS:
            tl.store(out_ptr + flags_at, bad_id)
            tl.store(out_ptr + flags_at + 1, bad_w)
            if DISTINCT:
                tl.store(out_ptr + flags_at + 2, repeated)

    @fast_launch
    @triton.jit(do_not_specialize=["grads", "dtype_code"])
    def _layout_one_kernel(ids_ptr, w_ptr, rank_of_ptr, in_rank_ptr, row_ptr, T, K, E, R, flags_at, grads_at, grads,
                           dtype_code, FLAGS: tl.constexpr, DISTINCT: tl.constexpr, WANTS: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_E: tl.constexpr):
        """_layout_kernel's outputs in one program (small T): every entry of the row is stored (_count_row),
        so it needs no zeroed buffer and no atomics."""
        _count_row(ids_ptr, w_ptr, rank_of_ptr, T, K, E, R, row_ptr, flags_at, FLAGS, DISTINCT, BLOCK_T, BLOCK_K,
                   BLOCK_R, BLOCK_E, in_rank_ptr, True)
        if WANTS:
            tl.store(row_ptr + grads_at, grads)
            tl.store(row_ptr + grads_at + 1, dtype_code)

    @triton.jit
    def _scan_destination(in_rank_ptr, send_token_ptr, send_rank_ptr, index_ptr, r, base, limit, T, R, total,
                          RANKS: tl.constexpr, BLOCK_T: tl.constexpr):
        """Pairs (t, r) in token order take send rows base, base + 1, ... while below limit (RANKS: their
        send_rank too)."""
        carry = tl.zeros([], dtype=tl.int64)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            flag = tl.load(in_rank_ptr + t.to(tl.int64) * R + r, mask=t < T, other=0).to(tl.int64)
            pos = carry + tl.cumsum(flag, axis=0) - 1
            ok = (flag > 0) & (pos < limit)
            dest = tl.where(ok, base + pos, total)
            tl.store(send_token_ptr + dest, t.to(tl.int64), mask=ok)
            if RANKS:
                tl.store(send_rank_ptr + dest, tl.zeros_like(dest) + r, mask=ok)
            tl.store(index_ptr + t.to(tl.int64) * R + r, dest, mask=t < T)
            carry += tl.sum(flag, axis=0)

    # Whether these kernels run under the interpreter (fixed when they were decorated: read once).
    INTERPRETED = interpreted(_scan_destination)

    @fast_launch
    @triton.jit
    def _table_plan_kernel(in_rank_ptr, table_ptr, global_of_ptr, send_token_ptr, send_rank_ptr, index_ptr,
                           summary_ptr, recv_pos_ptr, recv_rows_ptr, T, R, ROW, me, L, chunk, total, rows,
                           STATIC: tl.constexpr, COMPACT: tl.constexpr, RANKS: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
        """The whole plan from the all-gathered count table on the device (no host values needed).
        Program r: the send rows for destination r (exact offsets, or chunk r when STATIC; RANKS: their
        send_rank too, else the caller's holds them); with COMPACT, where chunk r of the receive buffer
        lands among `rows` compact rows. Program 0 also writes summary = [pairs per local expert (L);
        rows received; most rows any rank receives]."""
        r = tl.program_id(0)
        rr = tl.arange(0, BLOCK_R)
        to_each = tl.load(table_ptr + me * ROW + 1 + rr, mask=rr < R, other=0)  # tokens I send to each rank
        from_each = tl.load(table_ptr + rr * ROW + 1 + me, mask=rr < R, other=0)  # tokens each rank sends me
        if STATIC:
            base = r * chunk
            limit = chunk
            real = tl.minimum(tl.sum(tl.where(rr == r, to_each, 0)), chunk)
            for start in range(0, chunk, BLOCK_T):  # pad rows of chunk r too: every entry is written
                j = start + tl.arange(0, BLOCK_T)
                if RANKS:
                    tl.store(send_rank_ptr + base + j, (tl.zeros_like(j) + r).to(tl.int64), mask=j < chunk)
                tl.store(send_token_ptr + base + j, (tl.zeros_like(j) + T).to(tl.int64), mask=(j >= real) & (j < chunk))
        else:
            base = tl.sum(tl.where(rr < r, to_each, 0))
            limit = tl.sum(tl.where(rr == r, to_each, 0))
            if r == 0:  # rows past the S sent ones (a plan sized before S was known): pad token T
                sent = tl.sum(to_each)
                for start in range(sent, total, BLOCK_T):
                    j = start + tl.arange(0, BLOCK_T)
                    tl.store(send_token_ptr + j, (tl.zeros_like(j) + T).to(tl.int64), mask=j < total)
        _scan_destination(in_rank_ptr, send_token_ptr, send_rank_ptr, index_ptr, r, base, limit, T, R, total, RANKS,
                          BLOCK_T)
        if COMPACT:  # chunk row (r, j) lands at compact row offset[r] + j; rows = dropped pad
            offset = tl.sum(tl.where(rr < r, from_each, 0))
            count = tl.sum(tl.where(rr == r, from_each, 0))
            for start in range(0, chunk, BLOCK_T):
                j = start + tl.arange(0, BLOCK_T)
                compact = offset + j
                ok = (j < count) & (compact < rows)
                tl.store(recv_pos_ptr + r * chunk + j, tl.where(ok, compact, rows).to(tl.int64), mask=j < chunk)
                tl.store(recv_rows_ptr + compact, (r * chunk + j).to(tl.int64), mask=ok & (j < chunk))
            # every other compact row is pad (R*chunk), so recv_rows needs no pre-fill: the rows of r's
            # tokens past its chunk (an overflow, reported as an error), and program 0 those past all
            for start in range(chunk, count, BLOCK_T):
                j = start + tl.arange(0, BLOCK_T)
                tl.store(recv_rows_ptr + offset + j, (tl.zeros_like(j) + R * chunk).to(tl.int64),
                         mask=(j < count) & (offset + j < rows))
            if r == 0:
                for start in range(tl.sum(from_each), rows, BLOCK_T):
                    p = start + tl.arange(0, BLOCK_T)
                    tl.store(recv_rows_ptr + p, (tl.zeros_like(p) + R * chunk).to(tl.int64), mask=p < rows)
        if r == 0:
            _summarize(table_ptr, global_of_ptr, summary_ptr, R, ROW, me, L, BLOCK_R, BLOCK_L)

    @triton.jit
    def _summarize(table_ptr, global_of_ptr, summary_ptr, R, ROW, me, L, BLOCK_R: tl.constexpr,
                   BLOCK_L: tl.constexpr):
        """summary = [pairs per local expert (L); rows this rank receives; most rows any rank receives]
        from the count table [R, ROW] (rows [T; tokens to each rank; pairs per expert; ...])."""
        rr = tl.arange(0, BLOCK_R)
        lane = tl.arange(0, BLOCK_L)
        g = tl.load(global_of_ptr + lane, mask=lane < L, other=0)
        per_expert = tl.zeros([BLOCK_L], dtype=tl.int32)
        received = tl.zeros([BLOCK_R], dtype=tl.int32)
        for s in range(R):
            per_expert += tl.load(table_ptr + s * ROW + 1 + R + g, mask=lane < L, other=0)
            received += tl.load(table_ptr + s * ROW + 1 + rr, mask=rr < R, other=0)
        tl.store(summary_ptr + lane, per_expert, mask=lane < L)
        tl.store(summary_ptr + L, tl.sum(tl.where(rr == me, received, 0)))
        tl.store(summary_ptr + L + 1, tl.max(received))

    @fast_launch
    @triton.jit
    def _summary_kernel(table_ptr, global_of_ptr, summary_ptr, R, ROW, me, L, BLOCK_R: tl.constexpr,
                        BLOCK_L: tl.constexpr):
        _summarize(table_ptr, global_of_ptr, summary_ptr, R, ROW, me, L, BLOCK_R, BLOCK_L)

    @triton.jit
    def _pack_one(x_ptr, ids_ptr, w_ptr, tok, dest, hb, rank_of_ptr, local_of_ptr, values_out, scales_out, meta_out,
                  T, H, K, E, store_h, fp8_max, min_amax, LOCAL: tl.constexpr, INT_META: tl.constexpr,
                  QUANT: tl.constexpr, UE8M0: tl.constexpr, SCALE_BYTE: tl.constexpr, ROUND_FIRST: tl.constexpr,
                  GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """Block hb of one send row, x[tok] for rank `dest`, stored at values_out (and scales_out) with
        its metadata [weights; ids] at meta_out (block 0 only): the one packing rule, for the packing
        kernel (rows of a local payload) and the NVLink transport's token put (rows in the peers'
        memory). INT_META: int32, weights as fp32 bits; else fp32 values. ids as the destination's
        local ids when LOCAL, -1 where the expert lives elsewhere or is out of range (weight 0). Pad token T:
        zeros, -1. store_h: channels stored (H; 0 stores only the metadata). QUANT (fp8 dispatch): the
        row is quantized as it is read, GROUPS groups of GROUP channels per program, by
        quant_kernels.quantize_groups, fp8 values and their scales (a pad row: all zero bytes)."""
        h_real = tl.where(tok < T, H, 0)  # a pad row reads nothing (no scalar-bool masks)
        k_real = tl.where(tok < T, K, 0)
        if QUANT:
            g = hb * GROUPS + tl.arange(0, GROUPS)
            cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            v = tl.load(x_ptr + tok.to(tl.int64) * H + cols, mask=cols < h_real, other=0.0).to(tl.float32)
            q, scale = quantize_groups(v, fp8_max, min_amax, UE8M0, ROUND_FIRST, True)  # (tokens: the quotient)
            tl.store(values_out + cols, q.to(values_out.dtype.element_ty), mask=cols < store_h)
            scale = tl.where(tok < T, scale, 0.0)
            tl.store(scales_out + g, stored_scale(scale, SCALE_BYTE), mask=g * GROUP < store_h)
        else:
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            row = tl.load(x_ptr + tok.to(tl.int64) * H + cols, mask=cols < h_real, other=0.0)
            tl.store(values_out + cols, row, mask=cols < store_h)
        if hb == 0:
            k = tl.arange(0, BLOCK_K)
            ids = tl.load(ids_ptr + tok.to(tl.int64) * K + k, mask=k < k_real, other=-1).to(tl.int64)
            w = tl.load(w_ptr + tok.to(tl.int64) * K + k, mask=k < k_real, other=0.0).to(tl.float32)
            valid = (ids >= 0) & (ids < E)
            if LOCAL:
                owner = tl.load(rank_of_ptr + tl.where(valid, ids, 0), mask=valid, other=-1)
                local = tl.load(local_of_ptr + tl.where(valid, ids, 0), mask=valid, other=-1)
                ids = tl.where(owner == dest, local, -1)
                w = tl.where(ids >= 0, w, 0.0)  # as DeepEP: a slot whose expert is elsewhere weighs 0 here
            else:  # an id outside [-1, E) (flagged, checked later) never reaches a receiver as an index
                ids = tl.where(valid, ids, -1)
            if INT_META:
                tl.store(meta_out + k, w.to(tl.int32, bitcast=True), mask=k < K)
                tl.store(meta_out + K + k, ids.to(tl.int32), mask=k < K)
            else:
                tl.store(meta_out + k, w, mask=k < K)
                tl.store(meta_out + K + k, ids.to(tl.float32), mask=k < K)

    @fast_launch
    @triton.jit
    def _pack_kernel(x_ptr, ids_ptr, w_ptr, token_ptr, rank_ptr, rank_of_ptr, local_of_ptr, rows_ptr, scale_ptr,
                     meta_ptr, T, H, K, E, row_stride, scale_stride, meta_stride, fp8_max, min_amax,
                     LOCAL: tl.constexpr, SKIP_PAD: tl.constexpr, INT_META: tl.constexpr, QUANT: tl.constexpr,
                     UE8M0: tl.constexpr, SCALE_BYTE: tl.constexpr, ROUND_FIRST: tl.constexpr,
                     GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     PAYLOAD: tl.constexpr):
        """Send row i: x[token[i]] for rank[i], packed by _pack_one (SKIP_PAD: pad token T rows are left
        unwritten, for rows past what a host plan sends). PAYLOAD: rows_ptr is the uint8 payload itself (rows
        row_stride bytes apart; in each, the values at byte 0, the scales at byte scale_stride, the int32
        metadata at byte meta_stride: payload_views' and fp8_payload's layout), written without views of it."""
        i = tl.program_id(0)
        hb = tl.program_id(1)
        tok = tl.load(token_ptr + i)
        if SKIP_PAD:
            if tok >= T:
                return
        row = i.to(tl.int64)
        if PAYLOAD:
            at = rows_ptr + row * row_stride
            if QUANT:
                values = at.to(tl.pointer_type(tl.float8e4nv))
            else:
                values = at.to(tl.pointer_type(x_ptr.dtype.element_ty))
            if SCALE_BYTE:
                scales = at + scale_stride
            else:
                scales = (at + scale_stride).to(tl.pointer_type(tl.float32))
            meta = (at + meta_stride).to(tl.pointer_type(tl.int32))
        else:
            values = rows_ptr + row * row_stride
            scales = scale_ptr + row * scale_stride
            meta = meta_ptr + row * meta_stride
        _pack_one(x_ptr, ids_ptr, w_ptr, tok, tl.load(rank_ptr + i), hb, rank_of_ptr, local_of_ptr, values, scales, meta,
                  T, H, K, E, H, fp8_max, min_amax, LOCAL, INT_META, QUANT, UE8M0, SCALE_BYTE, ROUND_FIRST, GROUP,
                  GROUPS, BLOCK_H, BLOCK_K)

    @fast_launch
    @triton.jit
    def _take_rows_kernel(x_ptr, meta_ptr, index_ptr, out_x_ptr, out_meta_ptr, out_ids_ptr, H, K, x_stride, meta_stride,
                          none, BYTES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K2: tl.constexpr):
        """Output row i = received row index[i] (payload and metadata); index >= none: a pad row
        (zeros, weights 0, ids -1). BYTES: x_ptr is the uint8 payload itself (rows x_stride bytes apart, the
        metadata at byte meta_stride of each: payload_views' layout), read without views of it, and the
        metadata goes out as weights [n, K] fp32 (out_meta_ptr) and ids [n, K] int32 (out_ids_ptr)."""
        i = tl.program_id(0)
        hb = tl.program_id(1)
        src = tl.load(index_ptr + i)
        h_real = tl.where(src < none, H, 0)
        k_real = tl.where(src < none, 2 * K, 0)
        src = tl.where(src < none, src, 0).to(tl.int64)
        cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        if BYTES:
            at = x_ptr + src * x_stride
            src_x = at.to(tl.pointer_type(out_x_ptr.dtype.element_ty))
            src_meta = (at + meta_stride).to(tl.pointer_type(tl.int32))
        else:
            src_x = x_ptr + src * x_stride
            src_meta = meta_ptr + src * meta_stride
        row = tl.load(src_x + cols, mask=cols < h_real, other=0.0)
        tl.store(out_x_ptr + i.to(tl.int64) * H + cols, row, mask=cols < H)
        if hb == 0:
            c = tl.arange(0, BLOCK_K2)
            m = tl.load(src_meta + c, mask=c < k_real, other=0)
            m = tl.where((c < k_real) | (c < K), m, -1)  # pad: weight bits 0, ids -1
            if BYTES:
                out_w = out_meta_ptr.to(tl.pointer_type(tl.int32)) + i.to(tl.int64) * K  # (the fp32 weights' bits)
                tl.store(out_w + c, m, mask=c < K)
                tl.store(out_ids_ptr + i.to(tl.int64) * K + (c - K), m, mask=(c >= K) & (c < 2 * K))
            else:
                tl.store(out_meta_ptr + i.to(tl.int64) * 2 * K + c, m, mask=c < 2 * K)

def layout_row(topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor], rank_of: torch.Tensor, ep_size: int,
               num_flags: int, in_rank: Optional[torch.Tensor] = None, wants: Optional[tuple[int, int]] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_token_in_rank [T, R] bool, row int32 = [T; tokens per rank; pairs per expert; (wants;) flags],
    placed by RowLayout). rank_of [E] int32: owning rank of each expert. num_flags: 0 (no weights
    needed), 2 (bad id, non-finite weight) or 3 (and a repeated expert in a token). wants: (gradient
    bits, x's dtype code), RowLayout's entries, stored by the same kernel (None: a row without them).
    in_rank: a contiguous int8 or bool buffer of at least T*R entries that the caller never reads
    (standard), written and returned as it is instead of a new tensor (two torch ops fewer)."""
    T, K = topk_ids.shape
    E = rank_of.numel()
    layout = row_layout(ep_size, E, num_flags, 0, wants is not None)
    device = topk_ids.device
    if in_rank is None:  # bool: the kernel stores 0/1 bytes (no int8 -> bool view per call)
        in_rank = torch.empty(T, ep_size, dtype=torch.bool, device=device)
    grads, dtype_code = wants if wants is not None else (0, 0)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    w = rank_of if topk_weights is None else topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    if T <= _ONE_PROGRAM_TOKENS:  # one program stores every entry: no zero-filled row (a torch op fewer)
        row = torch.empty(layout.length, dtype=torch.int32, device=device)
        _layout_one_kernel[(1,)](ids, w, rank_of, in_rank, row, T, K, E, ep_size, layout.flags_at, layout.grads_at,
                                 grads, dtype_code, FLAGS=num_flags > 0, DISTINCT=num_flags > 2,
                                 WANTS=wants is not None, **_one_program_blocks(K, ep_size, E))
        return in_rank, row
    row = torch.zeros(layout.length, dtype=torch.int32, device=device)  # the programs add into it
    BLOCK_T = 64
    _layout_kernel[(cdiv(T, BLOCK_T),)](
        ids, w, rank_of, in_rank, row, T, K, E, ep_size, layout.flags_at, layout.grads_at, grads, dtype_code,
        FLAGS=num_flags > 0, DISTINCT=num_flags > 2, WANTS=wants is not None, BLOCK_T=BLOCK_T,
        BLOCK_K=next_power_of_2(max(K, 2)))
    return in_rank, row


# layout_row runs one program up to this many tokens (decode sizes: a few block iterations), many above
_ONE_PROGRAM_TOKENS = 256


@memoized_eagerly
def _one_program_blocks(K: int, R: int, E: int) -> dict:
    """_layout_one_kernel's blocks, made once per shape: BLOCK_T tokens per step, so that the [BLOCK_T, BLOCK_K,
    BLOCK_R] owner test stays within 8192 entries (registers) where it can: the histogram takes at least 128 ids (one per thread; the NVLink token put's
    note), which wins over it; BLOCK_E > E (_count_row's bin for ids outside [0, E))."""
    BLOCK_K, BLOCK_R = next_power_of_2(max(K, 2)), next_power_of_2(max(R, 2))
    return dict(BLOCK_T=max(1, 128 // BLOCK_K, min(64, 8192 // (BLOCK_K * BLOCK_R))), BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
                BLOCK_E=next_power_of_2(E + 1))


class TablePlan(NamedTuple):
    send_token: torch.Tensor  # [total] int64: source token of each send row (T = pad)
    send_rank: torch.Tensor  # [total] int64: destination of each send row
    combine_index: torch.Tensor  # [T, R] int64: send row of (token, rank); total = not sent
    summary: torch.Tensor  # [L + 2] int32: pairs per local expert, rows received, most any rank receives
    recv_pos: Optional[torch.Tensor]  # [R*chunk] int64 (compact row of each chunk row; rows = pad)
    recv_rows: Optional[torch.Tensor]  # [rows] int64 (chunk row of each compact row; R*chunk = pad)


def table_plan(in_rank: torch.Tensor, table: torch.Tensor, rank: int, global_of: torch.Tensor, total: int,
               chunk: Optional[int] = None, rows: Optional[int] = None,
               send_rank: Optional[torch.Tensor] = None) -> TablePlan:
    """One kernel: the send plan (exact offsets, or fixed `chunk` rows per peer), the receive-side
    compaction into `rows` rows (static plans given rows) and the receive counts, all read from the
    all-gathered count table [R, ROW] on the device. global_of [L]: this rank's experts' global ids.
    send_rank (static plans): the plan's send_rank made once by the caller (chunk rows of rank r: r, the
    same every call), returned as it is instead of a new one written by the kernel."""
    T, R = in_rank.shape
    device = in_rank.device
    L = global_of.numel()
    static, compact = chunk is not None, chunk is not None and rows is not None
    send_token = torch.empty(total, dtype=torch.long, device=device)  # every entry written by the kernel
    ranks = send_rank is None or not static  # the kernel writes send_rank
    if ranks:
        send_rank = torch.empty(total, dtype=torch.long, device=device)
    index = torch.empty(T, R, dtype=torch.long, device=device)
    summary = torch.empty(L + 2, dtype=torch.int32, device=device)
    recv_pos = torch.empty(R * chunk, dtype=torch.long, device=device) if compact else None
    recv_rows = torch.empty(rows, dtype=torch.long, device=device) if compact else None  # every entry written
    _table_plan_kernel[(R,)](
        in_rank, table, global_of, send_token, send_rank, index, summary,
        recv_pos if compact else index, recv_rows if compact else index, T, R, table.shape[1], rank, L,
        chunk or 0, total, rows or 0, STATIC=static, COMPACT=compact, RANKS=ranks, BLOCK_T=256,
        BLOCK_R=next_power_of_2(max(R, 2)), BLOCK_L=next_power_of_2(max(L, 2)))
    return TablePlan(send_token, send_rank, index, summary, recv_pos, recv_rows)


def summarize(table: torch.Tensor, rank: int, global_of: torch.Tensor) -> torch.Tensor:
    """[L + 2] int32 (table_plan's summary: pairs per local expert, rows received, most any rank
    receives) from a count table [R, ROW] that may be a view (one kernel)."""
    R, L = table.shape[0], global_of.numel()
    summary = torch.empty(L + 2, dtype=torch.int32, device=table.device)
    _summary_kernel[(1,)](table, global_of, summary, R, table.stride(0), rank, L,
                          BLOCK_R=next_power_of_2(max(R, 2)), BLOCK_L=next_power_of_2(max(L, 2)))
    return summary


def payload_views(payload: torch.Tensor, hidden: int, dtype: torch.dtype, top_k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 payload [S, B] seen as (rows [S, H] of `dtype`, meta [S, 2K] int32), both strided views:
    one exchange moves a row and its metadata together."""
    width = _meta_offset(hidden, dtype)
    return payload[:, :hidden * dtype.itemsize].view(dtype), payload[:, width:width + 8 * top_k].view(torch.int32)


def payload_fields(payload: torch.Tensor, hidden: int, dtype: torch.dtype, top_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A uint8 payload [S, B] seen as (rows [S, H] of `dtype`, ids [S, K] int32, weights [S, K] fp32), strided
    views: payload_views' rows and its metadata's two halves, in six view ops where that path takes seven."""
    width = _meta_offset(hidden, dtype)
    middle = width + 4 * top_k
    return (payload[:, :hidden * dtype.itemsize].view(dtype), payload[:, middle:middle + 4 * top_k].view(torch.int32),
            payload[:, width:middle].view(torch.float32))


def _meta_offset(hidden: int, dtype: torch.dtype) -> int:
    """Bytes of a payload row before its metadata (the hidden state, padded to a multiple of 8)."""
    return -(-hidden * dtype.itemsize // 8) * 8


def payload_bytes(hidden: int, dtype: torch.dtype, top_k: int) -> int:
    return _meta_offset(hidden, dtype) + 8 * top_k


def row_format(x: torch.Tensor, quant: Optional[QuantConfig]) -> tuple[int, torch.dtype]:
    """(elements, dtype) of the row x [T, H] sends: x's own, or with quant (an fp8 dispatch) the bytes
    of its wire row (fp8_payload.row_layout: values and scales)."""
    if quant is None:
        return x.shape[1], x.dtype
    return fp8_payload.row_layout(x.shape[1], quant)[0], torch.uint8


def kept(what, shape: tuple, dtype: torch.dtype, device: torch.device, make=None):
    """The scratch `what` (any hashable name) of this shape, kept across calls (ep_runtime.scratch: per
    stream and thread, never inside a graph capture). Only for tensors a call rewrites whole before
    anything reads them and never hands out. make(tensor): what to keep instead of the bare tensor
    (e.g. it with its views)."""
    def build():
        tensor = torch.empty(shape, dtype=dtype, device=device)
        return make(tensor) if make is not None else tensor
    return SCRATCH.get(("exchange", what, shape, dtype), device, build)


def pack_payload(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, send_token: torch.Tensor,
                 send_rank: torch.Tensor, rank_of: torch.Tensor, local_of: Optional[torch.Tensor],
                 skip_pad: bool = False, quant: Optional[QuantConfig] = None, reuse: bool = False) -> torch.Tensor:
    """Inference path: payload [S, payload_bytes] uint8 holding x[send_token] and [weights bits; ids]
    per row (see payload_views; row_format gives the row's elements and dtype); ids as the
    destination's local ids when local_of [E] is given. skip_pad: rows of pad token T stay unwritten
    (they are never sent). quant: an fp8 dispatch: each row is quantized as it is packed, into its wire
    row (fp8_payload.views reads values and scales), in the same one kernel: no quantized copy of x,
    and a token sent to several ranks is quantized the same way (bit for bit) for each. reuse: a kept
    buffer (`kept`) for a payload that is never handed out and has every row written (skip_pad False): a
    static plan's (RankExchange._send_payload says when)."""
    S, K = send_token.numel(), ids.shape[1]
    width, dtype = row_format(x, quant)
    shape = (S, payload_bytes(width, dtype, K))
    if reuse and not skip_pad:
        payload = kept(("payload", width, dtype, K), shape, torch.uint8, x.device)
    else:
        payload = torch.empty(shape, dtype=torch.uint8, device=x.device)
    if S:  # the kernel writes the payload's bytes (PAYLOAD): no views of it
        T, H = x.shape
        fp8_max, min_amax, blocks = pack_params(H, K, quant)
        scale_at = fp8_payload.row_layout(H, quant)[1] if quant is not None else 0
        _pack_kernel[(S, cdiv(H, blocks["BLOCK_H"]))](
            x.contiguous(), ids.contiguous(), weights.contiguous(), send_token, send_rank, rank_of,
            local_of if local_of is not None else rank_of, payload, payload, payload, T, H, K, rank_of.numel(),
            payload.stride(0), scale_at, _meta_offset(width, dtype), fp8_max, min_amax, LOCAL=local_of is not None,
            SKIP_PAD=skip_pad, INT_META=True, **blocks, PAYLOAD=True)
    return payload


def _pack(x, ids, weights, send_token, send_rank, rank_of, local_of, rows, meta, skip_pad: bool,
          quant: Optional[QuantConfig] = None) -> None:
    """Launch the packing kernel: rows [S, H] (any row stride; with quant the uint8 wire rows [S, W])
    and meta [S, 2K] (int32 bits or fp32)."""
    (S,), (T, H), K = send_token.shape, x.shape, ids.shape[1]
    values, scales = (rows, rows) if quant is None else fp8_payload.views(rows, H, quant)
    fp8_max, min_amax, blocks = pack_params(H, K, quant)
    _pack_kernel[(S, cdiv(H, blocks["BLOCK_H"]))](
        x.contiguous(), ids.contiguous(), weights.contiguous(), send_token, send_rank, rank_of,
        local_of if local_of is not None else rank_of, values, scales, meta, T, H, K, rank_of.numel(),
        values.stride(0), scales.stride(0), meta.stride(0), fp8_max, min_amax, LOCAL=local_of is not None,
        SKIP_PAD=skip_pad, INT_META=meta.dtype == torch.int32, **blocks, PAYLOAD=False)


def pack_params(H: int, K: int, quant: Optional[QuantConfig]) -> tuple[float, float, dict]:
    """(fp8_max, min_amax, the constexprs of _pack_one but LOCAL / INT_META) for rows of H channels and
    K slots: one choice for the packing kernel and the NVLink transport's token put, so both pack a
    row bit for bit alike."""
    group = groups = 1
    fp8_max = min_amax = 0.0
    if quant is None:
        BLOCK_H = block_h(H)
    else:
        group, fp8_max, min_amax = quant.activation_group, quant.spec.max_value, MIN_AMAX
        # Groups per program: 1024 channels on a GPU (as the unquantized rows); the interpreter runs
        # whole rows (its cost is per program).
        groups = min(next_power_of_2(quant.num_groups(H)), 64 if INTERPRETED else max(1, 1024 // group))
        BLOCK_H = groups * group
    ue8m0 = quant is not None and quant.ue8m0
    return fp8_max, min_amax, dict(QUANT=quant is not None, UE8M0=ue8m0, SCALE_BYTE=ue8m0, ROUND_FIRST=INTERPRETED,
                                   GROUP=group, GROUPS=groups, BLOCK_H=BLOCK_H, BLOCK_K=next_power_of_2(max(K, 2)))


def take_rows(rows: torch.Tensor, meta: torch.Tensor, index: torch.Tensor, none: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, H], meta [n, 2K] int32), contiguous: row i is received row index[i]; index >= none gives a
    pad row (zeros, weight 0, id -1)."""
    (n,), H, K = index.shape, rows.shape[1], meta.shape[1] // 2
    out_x = rows.new_empty(n, H)
    out_meta = torch.empty(n, 2 * K, dtype=torch.int32, device=rows.device)
    if n:
        BLOCK_H = block_h(H)
        _take_rows_kernel[(n, cdiv(H, BLOCK_H))](
            rows, meta, index, out_x, out_meta, out_meta, H, K, rows.stride(0), meta.stride(0), none, BYTES=False,
            BLOCK_H=BLOCK_H, BLOCK_K2=next_power_of_2(max(2 * K, 2)))
    return out_x, out_meta


def take_payload_rows(payload: torch.Tensor, index: torch.Tensor, hidden: int, dtype: torch.dtype, top_k: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """take_rows of the rows and metadata of a uint8 payload [S, B] (payload_views' layout; rows may be
    strided), read by the kernel from the payload's bytes (none of payload_views' views is made): (x [n, H],
    ids [n, K] int32, weights [n, K] fp32), each contiguous (no views of a metadata block either)."""
    n, K, device = index.shape[0], top_k, payload.device
    out_x = torch.empty(n, hidden, dtype=dtype, device=device)
    out_ids = torch.empty(n, K, dtype=torch.int32, device=device)
    out_w = torch.empty(n, K, dtype=torch.float32, device=device)
    if n:
        BLOCK_H = block_h(hidden)
        _take_rows_kernel[(n, cdiv(hidden, BLOCK_H))](
            payload, payload, index, out_x, out_w, out_ids, hidden, K, payload.stride(0), _meta_offset(hidden, dtype),
            payload.shape[0], BYTES=True, BLOCK_H=BLOCK_H, BLOCK_K2=next_power_of_2(max(2 * K, 2)))
    return out_x, out_ids, out_w


def ll_slots(local_ids: torch.Tensor, num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """deepep_ll's expert-major placement: slot_index [N, K] (l*N + row within expert l; L*N = none)
    and masked_m [L] int32. One kernel (a program per local expert scanning the rows)."""
    slot, _, _, _, masked_m = ll_plan(local_ids, None, num_local_experts, fold=False)
    return slot, masked_m


def ll_plan(local_ids: torch.Tensor, weights: Optional[torch.Tensor], num_local_experts: int, fold: bool
            ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """(slot_index [N, K], scatter_index [N, K] (repeats of a slot in a row set to none), slot_weight
    [N, K] fp32 (0 where not here; 1 when fold), scale [N, K] (the weights, when fold), masked_m [L]).
    local_ids and weights [N, K] may be strided row views (the received metadata). One kernel.
    scatter_index and scale are kept scratch (`kept`): valid until the next ll_plan on this stream."""
    N, K = local_ids.shape
    L, device = num_local_experts, local_ids.device
    slot = torch.empty(N, K, dtype=torch.long, device=device)
    # scatter_index and scale: read by ll_scatter only, every entry written by the kernel: kept
    first = kept("ll_plan first", (N, K), torch.long, device)
    weight = torch.empty(N, K, dtype=torch.float32, device=device) if weights is not None else None
    scale = kept("ll_plan scale", (N, K), torch.float32, device) if fold else None
    masked_m = torch.empty(L, dtype=torch.int32, device=device)
    ids = local_ids if local_ids.dtype == torch.int32 else local_ids.to(torch.int32)
    _ll_slots_kernel[(L + 1,)](
        ids, weights if weights is not None else ids, ids.stride(0), weights.stride(0) if weights is not None else 0,
        slot, first, weight if weight is not None else slot, scale if fold else slot, masked_m, N, K, L,
        WEIGHTS=weights is not None, FOLD=fold, BLOCK_N=128, BLOCK_K=next_power_of_2(max(K, 2)))
    return slot, first, weight, scale, masked_m


def ll_scatter(rows: torch.Tensor, slot_index: torch.Tensor, scale: Optional[torch.Tensor], num_slots: int
               ) -> torch.Tensor:
    """buffer [num_slots, H]: row n lands at slot_index[n, k] for each k (times scale[n, k] when given);
    slots nobody writes stay unwritten. rows may be a row-strided view. Inference only (no autograd)."""
    (N, H), K = rows.shape, slot_index.shape[1]
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = rows.new_empty(num_slots, H)
    if N * K:
        BLOCK_H = block_h(H)
        if scale is not None and scale.dtype != torch.float32:  # (a dtype test: .float() is an op)
            scale = scale.float()
        _ll_scatter_kernel[(N, cdiv(H, BLOCK_H))](
            rows, slot_index.contiguous(), scale.contiguous() if scale is not None else slot_index,
            out, K, H, rows.stride(0), num_slots, SCALE=scale is not None, BLOCK_H=BLOCK_H,
            BLOCK_K=next_power_of_2(max(K, 2)))
    return out


def ll_gather(out: torch.Tensor, slot_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """partial [N, H] = sum_k weight[n, k] * out[slot_index[n, k]] (fp32 accumulation; none skipped).
    Inference only (no autograd). partial is kept scratch (`kept`; combine only sends it): valid until
    the next ll_gather of this shape on this stream."""
    N, H = slot_index.shape[0], out.shape[1]
    weight = weight if weight.dtype == torch.float32 else weight.float()  # (a dtype test: .float() is an op)
    return gather_rows(out, slot_index, weight, kept("ll_gather", (N, H), out.dtype, out.device))


def gather_rows(src: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, H] in src's dtype: row n = sum_k (weight[n, k] *) src[index[n, k]]; index >= len(src) adds nothing.
    index [N, K], or [N] (K = 1). out: a contiguous [N, H] tensor of src's dtype to write (default: a new one)."""
    S, H = src.shape
    N, K = index.shape if index.dim() == 2 else (index.shape[0], 1)
    out = src.new_empty(N, H) if out is None else out
    if N:
        BLOCK_H = block_h(H)
        _gather_rows_kernel[(N, cdiv(H, BLOCK_H))](
            src.contiguous(), index.contiguous(), weight.contiguous() if weight is not None else index, out, K, H, S,
            WEIGHTED=weight is not None, BLOCK_H=BLOCK_H)
    return out


def block_h(H: int) -> int:
    """BLOCK_H of the row kernels (here and the NVLink transport's): H's power of two, 16..1024."""
    return min(1024, next_power_of_2(max(H, 16)))


def sum_rows(back: torch.Tensor, combine_index: torch.Tensor) -> torch.Tensor:
    """[S, H], [T, C] -> [T, H]: row t sums back[combine_index[t, c]] over c in order (index >= S: nothing),
    in fp32 (fp64 stays fp64), returned in back's dtype. Torch ops: differentiable, any device."""
    acc = torch.float64 if back.dtype == torch.float64 else torch.float32
    back = torch.cat([back, back.new_zeros(1, back.shape[1])])  # row S: "not sent" (an early plan marks more)
    return back[combine_index.clamp(max=back.shape[0] - 1)].sum(1, dtype=acc).to(back.dtype)


def sent_rows(x: torch.Tensor, combine_index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Torch ops: [S, H] = x[send_token] (zero rows for pad token T), written through the plan's inverse
    combine_index [T, C] (the row of each (token, c); >= S: not sent), each row once. Differentiable, and the
    gradient is a gather (each token's rows, summed over C in order: sum_rows' sum), never an index_add over
    send_token (x.index_select's and x[send_token]'s backward), whose CUDA atomics add in a varying order."""
    index = combine_index.clamp(max=num_rows)  # row S: every unsent pair's, dropped
    return x.new_zeros(num_rows + 1, x.shape[1]).index_put((index,), x.unsqueeze(1))[:num_rows]  # (no [T, C, H] copy)


def _sum_sent_rows(grad: torch.Tensor, combine_index: torch.Tensor) -> torch.Tensor:
    """Adjoint of the row gather x[send_token] (pad token T): [T, H] in grad's dtype, token t's gradient the
    sum of its sent rows' grads, rows combine_index[t, :] (>= S: none) in column order, in fp32. A gather, as
    combine's gather_sum: the same bits on every run, where an index_add_ over send_token adds a token's rows
    with CUDA atomics in a varying order. The kernel, or torch ops under create_graph=True (double backward:
    they keep the graph)."""
    if torch.is_grad_enabled():
        return sum_rows(grad, combine_index)
    return gather_rows(grad.contiguous(), combine_index)


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, weights, send_token, send_rank, rank_of, local_of, combine_index):
        S, H, K = send_token.numel(), x.shape[1], ids.shape[1]
        rows = x.new_empty(S, H)
        meta = torch.empty(S, 2 * K, dtype=torch.float32, device=x.device)
        if S:
            _pack(x, ids, weights.float(), send_token, send_rank, rank_of, local_of, rows, meta, skip_pad=False)
        # local ids: a slot sent as -1 carries weight 0, so no gradient flows back to its weight
        ctx.save_for_backward(combine_index, meta[:, K:] >= 0 if local_of is not None else None)
        ctx.K, ctx.dtypes = K, (x.dtype, weights.dtype)
        return rows, meta

    @staticmethod
    def backward(ctx, grad_rows, grad_meta):
        combine_index, kept = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0] and grad_rows is not None:
            grad_x = _sum_sent_rows(grad_rows, combine_index).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2] and grad_meta is not None:
            grad_weights = grad_meta[:, :ctx.K]
            if kept is not None:
                grad_weights = torch.where(kept, grad_weights, grad_weights.new_zeros(()))
            grad_w = _sum_sent_rows(grad_weights, combine_index).to(ctx.dtypes[1])
        return grad_x, None, grad_w, None, None, None, None, None


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, back, combine_index, send_token):
        ctx.save_for_backward(send_token)
        return gather_rows(back, combine_index)

    @staticmethod
    def backward(ctx, grad_y):
        (send_token,) = ctx.saved_tensors
        # Row i of back went to token send_token[i] (T: a pad row, no token).
        padded = torch.cat([grad_y, grad_y.new_zeros(1, grad_y.shape[1])])
        return padded[send_token], None, None


def pack_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, send_token: torch.Tensor,
              send_rank: torch.Tensor, rank_of: torch.Tensor, local_of: Optional[torch.Tensor],
              combine_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable: rows [S, H] = x[send_token] (zeros for pad token T); meta [S, 2K] fp32 =
    [weights; ids], ids as destination-local ids when local_of [E] is given (-1 where the expert is
    elsewhere). rank_of [E]: owning rank of each expert. combine_index [T, C]: the plan's inverse of
    send_token (the rows sent from each token; >= S: none), which the backward gathers and sums."""
    return _Pack.apply(x, ids, weights, send_token, send_rank, rank_of, local_of, combine_index)


def gather_sum(back: torch.Tensor, combine_index: torch.Tensor, send_token: torch.Tensor) -> torch.Tensor:
    """y[t] = sum over r of back[combine_index[t, r]] (index S = nothing), accumulated in fp32."""
    return _GatherSum.apply(back, combine_index, send_token)
