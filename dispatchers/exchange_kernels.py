"""Fused Triton kernels around the exchange (CUDA; CPU tensors only under TRITON_INTERPRET=1).

pack_rows: one kernel builds the send payload: each sent row's hidden state and its [weights;
ids] metadata (ids remapped to the destination's local ids when asked). gather_sum: one kernel adds
each token's returned rows (at most R) in fp32 and writes the token's output; no atomics, so it is
deterministic. Both are autograd Functions whose backward is the inverse gather/scatter.
rank_exchange uses them on CUDA for bf16/fp16/fp32 and plain torch ops elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch path runs instead
    triton = None

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def enabled(x: torch.Tensor) -> bool:
    """Use the kernels for this tensor: CUDA, a dtype they accumulate correctly, triton present."""
    return triton is not None and x.is_cuda and x.dtype in _DTYPES


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
    def _gather_sum_kernel(back_ptr, index_ptr, y_ptr, S, H, R, BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        hb = tl.program_id(1)
        cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for r in range(R):
            src = tl.load(index_ptr + t.to(tl.int64) * R + r)
            h_real = tl.where(src < S, H, 0)
            acc += tl.load(back_ptr + src.to(tl.int64) * H + cols, mask=cols < h_real, other=0.0).to(tl.float32)
        tl.store(y_ptr + t.to(tl.int64) * H + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < H)


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
        T, R = combine_index.shape
        S, H = back.shape
        y = back.new_empty(T, H)
        if T:
            BLOCK_H = _block_h(H)
            _gather_sum_kernel[(T, triton.cdiv(H, BLOCK_H))](back.contiguous(), combine_index.contiguous(), y,
                                                             S, H, R, BLOCK_H=BLOCK_H)
        ctx.save_for_backward(send_token)
        return y

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
