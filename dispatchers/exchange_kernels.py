"""Fused Triton kernels around the exchange (CUDA; CPU tensors only under TRITON_INTERPRET=1).

layout_row: one kernel turns topk ids into is_token_in_rank and the count row [T; per rank; per
expert] that ranks all-gather. row_plan: one kernel (a program per destination rank scanning the
tokens) places every (token, rank) pair in the send order: send_token, send_rank, combine_index.
pack_rows: one kernel builds the send payload: each sent row's hidden state and its [weights;
ids] metadata (ids remapped to the destination's local ids when asked). gather_sum: one kernel adds
each token's returned rows (at most R) in fp32 and writes the token's output; no atomics, so it is
deterministic. Both are autograd Functions whose backward is the inverse gather/scatter.
rank_exchange uses them on CUDA for bf16/fp16/fp32 and plain torch ops elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch

from ep_runtime.validation import int32_ids

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch path runs instead
    triton = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def enabled(x: torch.Tensor) -> bool:
    """Use the kernels for this tensor: CUDA, a dtype they accumulate correctly, triton present."""
    return on_gpu(x) and x.dtype in _DTYPES


def on_gpu(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _pack_kernel(x_ptr, ids_ptr, w_ptr, token_ptr, rank_ptr, rows_ptr, meta_ptr, T, H, K, L,
                     LOCAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        i = tl.program_id(0)
        hb = tl.program_id(1)
        tok = tl.load(token_ptr + i)
        # A pad row (tok == T) reads nothing: its column limits drop to 0 (no scalar-bool masks).
        h_real = tl.where(tok < T, H, 0)
        k_real = tl.where(tok < T, K, 0)
        cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        row = tl.load(x_ptr + tok.to(tl.int64) * H + cols, mask=cols < h_real, other=0.0)
        tl.store(rows_ptr + i.to(tl.int64) * H + cols, row, mask=cols < H)
        if hb == 0:
            k = tl.arange(0, BLOCK_K)
            kmask = k < K
            ids = tl.load(ids_ptr + tok.to(tl.int64) * K + k, mask=k < k_real, other=-1)
            w = tl.load(w_ptr + tok.to(tl.int64) * K + k, mask=k < k_real, other=0.0)
            if LOCAL:
                dest = tl.load(rank_ptr + i)
                local = ids - dest * L
                ids = tl.where((ids >= 0) & (local >= 0) & (local < L), local, -1)
            tl.store(meta_ptr + i.to(tl.int64) * 2 * K + k, w, mask=kmask)
            tl.store(meta_ptr + i.to(tl.int64) * 2 * K + K + k, ids.to(tl.float32), mask=kmask)

    @triton.jit
    def _gather_rows_kernel(src_ptr, index_ptr, weight_ptr, out_ptr, K, H, none, WEIGHTED: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        """out[n] = sum_k (weight[n, k] *) src[index[n, k]], fp32 accumulation; index >= none adds nothing."""
        n = tl.program_id(0)
        hb = tl.program_id(1)
        cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in range(K):
            row = tl.load(index_ptr + n.to(tl.int64) * K + k)
            h_real = tl.where(row < none, H, 0)
            value = tl.load(src_ptr + tl.where(row < none, row, 0).to(tl.int64) * H + cols, mask=cols < h_real,
                            other=0.0).to(tl.float32)
            if WEIGHTED:
                value = value * tl.load(weight_ptr + n.to(tl.int64) * K + k)
            acc += value
        tl.store(out_ptr + n.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


    @triton.jit
    def _ll_slots_kernel(ids_ptr, slot_ptr, masked_m_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program l: the rows holding local expert l, in order, get slots l*N + 0, 1, ..."""
        e = tl.program_id(0)
        k = tl.arange(0, BLOCK_K)
        carry = tl.zeros([], dtype=tl.int64)
        for start in range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = (n[:, None] < N) & (k[None, :] < K)
            ids = tl.load(ids_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=inside, other=-1)
            match = ids == e
            present = tl.max(match.to(tl.int64), axis=1)
            pos = carry + tl.cumsum(present, axis=0) - 1
            slot = e.to(tl.int64) * N + pos
            tl.store(slot_ptr + n[:, None].to(tl.int64) * K + k[None, :], slot[:, None] + tl.zeros_like(ids).to(tl.int64),
                     mask=match & inside)
            carry += tl.sum(present, axis=0)
        tl.store(masked_m_ptr + e, carry.to(tl.int32))

    @triton.jit
    def _ll_scatter_kernel(rows_ptr, slot_ptr, scale_ptr, out_ptr, K, H, none, SCALE: tl.constexpr,
                           BLOCK_H: tl.constexpr):
        i = tl.program_id(0)  # one (received row, topk slot)
        hb = tl.program_id(1)
        slot = tl.load(slot_ptr + i)
        if slot < none:
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            row = tl.load(rows_ptr + (i // K).to(tl.int64) * H + cols, mask=cols < H, other=0.0)
            if SCALE:
                row = (row.to(tl.float32) * tl.load(scale_ptr + i)).to(row.dtype)
            tl.store(out_ptr + slot * H + cols, row, mask=cols < H)

    @triton.jit
    def _layout_kernel(ids_ptr, in_rank_ptr, row_ptr, T, K, L, R, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        k = tl.arange(0, BLOCK_K)
        inside = (t[:, None] < T) & (k[None, :] < K)
        ids = tl.load(ids_ptr + t[:, None].to(tl.int64) * K + k[None, :], mask=inside, other=-1)
        valid = (ids >= 0) & (ids < L * R)  # bad ids are flagged elsewhere; never index with them
        owner = tl.where(valid, ids // L, -1)
        if pid == 0:
            tl.store(row_ptr, T)
        for r in range(R):
            hit = tl.max((owner == r).to(tl.int32), axis=1)
            tl.store(in_rank_ptr + t.to(tl.int64) * R + r, hit.to(tl.int8), mask=t < T)
            tl.atomic_add(row_ptr + 1 + r, tl.sum(hit))
        tl.atomic_add(row_ptr + 1 + R + tl.where(valid, ids, 0), tl.full(ids.shape, 1, tl.int32), mask=valid)

    @triton.jit
    def _row_plan_kernel(in_rank_ptr, base_ptr, limit_ptr, send_token_ptr, send_rank_ptr, index_ptr, T, R, total,
                         BLOCK_T: tl.constexpr):
        r = tl.program_id(0)
        base = tl.load(base_ptr + r)
        limit = tl.load(limit_ptr + r)
        carry = tl.zeros([], dtype=tl.int64)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            flag = tl.load(in_rank_ptr + t.to(tl.int64) * R + r, mask=t < T, other=0).to(tl.int64)
            pos = carry + tl.cumsum(flag, axis=0) - 1
            ok = (flag > 0) & (pos < limit)
            dest = tl.where(ok, base + pos, total)
            tl.store(send_token_ptr + dest, t.to(tl.int64), mask=ok)
            tl.store(send_rank_ptr + dest, tl.zeros_like(dest) + r, mask=ok)
            tl.store(index_ptr + t.to(tl.int64) * R + r, dest, mask=t < T)
            carry += tl.sum(flag, axis=0)


def layout_row(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_token_in_rank [T, R] bool, row [1 + R + E] int32 = [T; tokens per rank; pairs per expert])."""
    T, K = topk_ids.shape
    in_rank = torch.empty(T, ep_size, dtype=torch.int8, device=topk_ids.device)
    row = torch.zeros(1 + ep_size + num_experts, dtype=torch.int32, device=topk_ids.device)
    BLOCK_T = 64
    _layout_kernel[(max(1, triton.cdiv(T, BLOCK_T)),)](
        int32_ids(topk_ids).contiguous(), in_rank, row, T, K, num_experts // ep_size, ep_size,
        BLOCK_T=BLOCK_T, BLOCK_K=triton.next_power_of_2(max(K, 2)))
    return in_rank.view(torch.bool), row


def row_plan(in_rank: torch.Tensor, base: torch.Tensor, limit: torch.Tensor, total: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair (t, r) with in_rank goes to send row base[r] + (its rank among rank r's tokens) while that
    is below limit[r]: (send_token [total] (T = pad), send_rank [total], combine_index [T, R] (total
    = not sent))."""
    T, R = in_rank.shape
    device = in_rank.device
    send_token = torch.full((total,), T, dtype=torch.long, device=device)
    send_rank = torch.zeros(total, dtype=torch.long, device=device)
    index = torch.empty(T, R, dtype=torch.long, device=device)
    _row_plan_kernel[(R,)](in_rank.view(torch.int8).contiguous(), base.long().contiguous(), limit.long().contiguous(),
                           send_token, send_rank, index, T, R, total, BLOCK_T=256)
    return send_token, send_rank, index


def ll_slots(local_ids: torch.Tensor, num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """deepep_ll's expert-major placement: slot_index [N, K] (l*N + row within expert l; L*N = none)
    and masked_m [L] int32. One kernel (a program per local expert scanning the rows)."""
    N, K = local_ids.shape
    L = num_local_experts
    slot = torch.full((N, K), L * N, dtype=torch.long, device=local_ids.device)
    masked_m = torch.empty(L, dtype=torch.int32, device=local_ids.device)
    _ll_slots_kernel[(L,)](local_ids.to(torch.int32).contiguous(), slot, masked_m, N, K,
                           BLOCK_N=128, BLOCK_K=triton.next_power_of_2(max(K, 2)))
    return slot, masked_m


def ll_scatter(rows: torch.Tensor, slot_index: torch.Tensor, scale: Optional[torch.Tensor], num_slots: int
               ) -> torch.Tensor:
    """buffer [num_slots, H]: row n lands at slot_index[n, k] for each k (times scale[n, k] when given);
    slots nobody writes stay unwritten. Inference only (no autograd)."""
    (N, H), K = rows.shape, slot_index.shape[1]
    out = rows.new_empty(num_slots, H)
    if N * K:
        BLOCK_H = _block_h(H)
        _ll_scatter_kernel[(N * K, triton.cdiv(H, BLOCK_H))](
            rows.contiguous(), slot_index.contiguous(), scale.float().contiguous() if scale is not None else slot_index,
            out, K, H, num_slots, SCALE=scale is not None, BLOCK_H=BLOCK_H)
    return out


def ll_gather(out: torch.Tensor, slot_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """partial [N, H] = sum_k weight[n, k] * out[slot_index[n, k]] (fp32 accumulation; none skipped).
    Inference only (no autograd)."""
    return _gather_rows(out, slot_index, weight.float())


def _gather_rows(src: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, H] in src's dtype: row n = sum_k (weight[n, k] *) src[index[n, k]]; index >= len(src) adds nothing."""
    S, H = src.shape
    N, K = index.shape
    out = src.new_empty(N, H)
    if N:
        BLOCK_H = _block_h(H)
        _gather_rows_kernel[(N, triton.cdiv(H, BLOCK_H))](
            src.contiguous(), index.contiguous(), weight.contiguous() if weight is not None else index, out, K, H, S,
            WEIGHTED=weight is not None, BLOCK_H=BLOCK_H)
    return out


def _block_h(H: int) -> int:
    return min(1024, triton.next_power_of_2(max(H, 16)))


def _scatter_rows(grad: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Adjoint of a row gather with pad index num_rows: sum the grads of rows that came from each row."""
    out = torch.zeros(num_rows + 1, grad.shape[1], dtype=torch.float32, device=grad.device)
    return out.index_add_(0, index, grad.float())[:num_rows]


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, weights, send_token, send_rank, num_local_experts):
        S, (T, H), K = send_token.numel(), x.shape, ids.shape[1]
        rows = x.new_empty(S, H)
        meta = torch.empty(S, 2 * K, dtype=torch.float32, device=x.device)
        if S:
            BLOCK_H = _block_h(H)
            _pack_kernel[(S, triton.cdiv(H, BLOCK_H))](
                x.contiguous(), ids.contiguous(), weights.float().contiguous(), send_token, send_rank, rows, meta,
                T, H, K, num_local_experts or 0, LOCAL=num_local_experts is not None,
                BLOCK_H=BLOCK_H, BLOCK_K=triton.next_power_of_2(max(K, 2)))
        ctx.save_for_backward(send_token)
        ctx.T, ctx.K, ctx.dtypes = T, K, (x.dtype, weights.dtype)
        return rows, meta

    @staticmethod
    def backward(ctx, grad_rows, grad_meta):
        (send_token,) = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0] and grad_rows is not None:
            grad_x = _scatter_rows(grad_rows, send_token, ctx.T).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2] and grad_meta is not None:
            grad_w = _scatter_rows(grad_meta[:, :ctx.K], send_token, ctx.T).to(ctx.dtypes[1])
        return grad_x, None, grad_w, None, None, None


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, back, combine_index, send_token):
        ctx.save_for_backward(send_token)
        return _gather_rows(back, combine_index)

    @staticmethod
    def backward(ctx, grad_y):
        (send_token,) = ctx.saved_tensors
        # Row i of back went to token send_token[i] (T: a pad row, no token).
        padded = torch.cat([grad_y, grad_y.new_zeros(1, grad_y.shape[1])])
        return padded[send_token], None, None


def pack_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, send_token: torch.Tensor,
              send_rank: torch.Tensor, num_local_experts: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [S, H] = x[send_token] (zeros for pad token T); meta [S, 2K] fp32 = [weights; ids], ids
    as destination-local ids when num_local_experts is given (-1 where the expert is elsewhere)."""
    return _Pack.apply(x, ids.to(torch.int32), weights, send_token, send_rank, num_local_experts)


def gather_sum(back: torch.Tensor, combine_index: torch.Tensor, send_token: torch.Tensor) -> torch.Tensor:
    """y[t] = sum over r of back[combine_index[t, r]] (index S = nothing), accumulated in fp32."""
    return _GatherSum.apply(back, combine_index, send_token)
