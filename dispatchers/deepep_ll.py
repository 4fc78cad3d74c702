"""deepep_ll: low-latency mode with DeepEP semantics. Static shapes and no host sync inside a CUDA
graph, so dispatch -> runner -> combine captures into one graph and replays without the host. The
count table carries every rank's T and id/weight flags, so bad input on one rank fails every rank
instead of hanging them: eager calls on CPU ranks read it at once, eager calls on CUDA check it two
calls later without a sync (rank_exchange's deferred check), and while capturing nothing is read.

Each rank sends a fixed chunk of M = num_max_dispatch_tokens_per_rank rows to every peer (each
token once per owning rank; rank_exchange's static plan), and the receiver lays the rows out
expert-major: recv_x [L, M*R, H], row p of expert l valid when p < masked_m[l]. Rows come in
source order (rank, token). Combine weights each expert row by its topk weight, sums a token's
rows on this rank, sends one partial per token home and adds the partials in fp32 there.
apply_router_weight_on_input is folded into recv_x here (the runner then sees weight 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ep_runtime.routing import TopKOutput
from ep_runtime.runner_core import (
    CombineInput,
    DispatchOutput,
    ExpertMajorInput,
    earlier_slots,
    register_format,
    weighted_rows,
)

from . import exchange_kernels, fp8_payload, register
from .base import ExchangeDispatcher, check_buffer_memory, resolve_int
from .rank_exchange import Capacity, ExchangeHandle, running_count


@dataclass
class LLHandle:
    """exchange: the chunked exchange; slot_index [N, K]: flat row l*N + p of each received (row,
    topk slot) in recv_x viewed as [L*N, H] (L*N = not here); slot_weight [N, K] fp32: the weight
    combine applies (0 where not here). N = M * R received rows."""

    exchange: ExchangeHandle
    slot_index: torch.Tensor
    slot_weight: torch.Tensor


@dataclass
class DeepEPLLDispatchOutput(DispatchOutput):
    """recv_x [L, M*R, H] expert-major (rows past masked_m are not data); masked_m [L] int32.
    use_fp8: recv_x float8_e4m3fn with recv_x_scale [L, M*R, ceil(H/128)] (fp32, or uint8 UE8M0
    exponents), as DeepEP's low-latency (x, scales); x_dtype: the tokens' dtype before quantization."""

    format = "deepep_ll"
    recv_x: torch.Tensor
    masked_m: torch.Tensor
    handle: LLHandle
    recv_x_scale: Optional[torch.Tensor] = None
    x_dtype: Optional[torch.dtype] = None


@dataclass(frozen=True)
class DeepEPLLOptions:
    """num_max_dispatch_tokens_per_rank M: the most tokens a rank dispatches per call (buffer rows)."""

    num_max_dispatch_tokens_per_rank: int
    use_fp8: bool = False
    fp8_scale_encoding: str = "fp32"


@register
class DeepEPLLDispatcher(ExchangeDispatcher):
    """num_max_dispatch_tokens_per_rank M (EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK): most tokens a
    rank may dispatch per step; T > M is an error, never a drop. use_fp8 / fp8_scale_encoding
    (EP_RUNTIME_DISPATCH_FP8*): tokens travel as fp8 with per-128-channel scales; inference only.
    Its plan is static, so the node-aware exchange's knobs (EP_RUNTIME_HIERARCHICAL,
    EP_RUNTIME_RANKS_PER_NODE: host plans only) are neither read nor compared across ranks."""

    name = "deepep_ll"
    format = "deepep_ll"
    supports_recv_hook = True
    puts_rows = True  # the token put and the sum put (docs/transports.md)

    def __init__(self, config, group=None, num_max_dispatch_tokens_per_rank: Optional[int] = None,
                 expert_to_rank=None, transport: Optional[str] = None, num_sms: Optional[int] = None,
                 use_fp8: Optional[bool] = None, fp8_scale_encoding: Optional[str] = None):
        super().__init__(config, group, expert_to_rank, transport, num_sms, hierarchical="off", ranks_per_node=0)
        M = resolve_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank,
                        "LL_MAX_DISPATCH_TOKENS_PER_RANK")
        check_buffer_memory(f"num_max_dispatch_tokens_per_rank={M} (or EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK)",
                            self.placement.num_local_experts * M * self.world_size, config.hidden_size,
                            M * self.world_size)  # recv_x [L, M*R, H]; the per-call plan of R*M rows
        self.options = DeepEPLLOptions(M, *fp8_payload.resolve(use_fp8, fp8_scale_encoding))
        if self.options.use_fp8 and config.apply_router_weight_on_input:
            given = "use_fp8=True" if use_fp8 is not None else "use_fp8=None with EP_RUNTIME_DISPATCH_FP8=1"
            raise ValueError(f"{given} on deepep_ll cannot fold apply_router_weight_on_input into the received rows "
                             f"(fp8 bytes); use use_fp8=False or deepep_normal / mori")
        rule = (f"deepep_ll allows at most num_max_dispatch_tokens_per_rank M={M} per rank "
                f"(EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK)")
        setting = "num_max_dispatch_tokens_per_rank (or EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK)"
        self.exchange.max_tokens = (M, rule, setting)
        self._capacity = Capacity(f"num_max_dispatch_tokens_per_rank={M}", setting)  # made once: errors name it
        # A token's row goes to an expert once; with the weight folded into that row, a repeated
        # expert would need two rows with different weights.
        self.distinct_ids = None
        if config.apply_router_weight_on_input and config.top_k > 1:
            self.distinct_ids = ("deepep_ll with apply_router_weight_on_input needs distinct experts per token "
                                 "(one row per token and expert, scaled by that slot's weight)")

    def _table_plan(self):
        return self.options.num_max_dispatch_tokens_per_rank, self.distinct_ids

    def _dispatch(self, x, topk: TopKOutput):
        ids, weights = topk
        x_dtype, quant = x.dtype, self.fp8  # (checked for a gradient in _checked_topk)
        (chunk, distinct), L = self._table_plan(), self.exchange.num_local_experts
        handle, rows, recv_ids, recv_w = self.exchange.plan_and_send(
            x, ids, weights, local_ids=True, chunk=chunk, capacity=self._capacity,
            distinct=distinct, transient=True, quant=quant, by_token=True)  # rows scattered into recv_x below
        N, H = rows.shape[0], rows.shape[1]  # N = M * R received rows
        # (the received rows, not x: where another rank's x or weights need a gradient, send made this rank's
        # rows need one too, and they must reach recv_x through autograd, or this rank skips their reverse exchange)
        if exchange_kernels.inference_path(rows, recv_w):  # one kernel for the slot plan, one for the rows
            slot_index, first, slot_weight, scale, masked_m = exchange_kernels.ll_plan(
                recv_ids, recv_w, L, fold=self.config.apply_router_weight_on_input)
            # L*N slots: a (row, k) naming no local expert writes nothing
            recv_x, recv_x_scale = self._received(exchange_kernels.ll_scatter(rows, first, scale, L * N).view(L, N, H))
            return DeepEPLLDispatchOutput(recv_x, masked_m, LLHandle(handle, slot_index, slot_weight), recv_x_scale,
                                          x_dtype)
        here = recv_ids >= 0
        slot_index, masked_m = _slots(recv_ids, L)
        slot_weight = torch.where(here, recv_w, torch.zeros_like(recv_w))
        scale = None
        if self.config.apply_router_weight_on_input:
            scale, slot_weight = slot_weight, here.to(slot_weight.dtype)
        # Only valid rows are written, each once (a token listing one expert twice has one row there);
        # rows past masked_m stay unwritten (never read), as in DeepEP.
        recv_x = _scatter(rows, _first_of_each_slot(slot_index, L * N), scale, L * N + 1)[:L * N].view(L, N, H)
        recv_x, recv_x_scale = self._received(recv_x)
        return DeepEPLLDispatchOutput(recv_x, masked_m, LLHandle(handle, slot_index, slot_weight), recv_x_scale,
                                      x_dtype)

    def combined_tokens(self, dispatch_output) -> Optional[int]:
        return dispatch_output.handle.exchange.num_tokens

    def check_combine_input(self, combine_input: CombineInput) -> None:
        """The expert outputs must have recv_x's [L, M*R, H] layout: combine reads row l*N + p of them
        flat, so any other N would read the wrong rows (or past the end) without an error."""
        super().check_combine_input(combine_input)
        rows, recv_x = combine_input.hidden_states, combine_input.dispatch_output.recv_x
        want = (*recv_x.shape[:2], self.config.hidden_size)
        if tuple(rows.shape) != want:
            raise ValueError(f"combine_input.hidden_states has shape {list(rows.shape)}; expected {list(want)} "
                             f"(recv_x's [L, M*R, H] layout, M=num_max_dispatch_tokens_per_rank="
                             f"{self.options.num_max_dispatch_tokens_per_rank}, R={self.world_size})")

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        out: torch.Tensor = combine_input.hidden_states  # [L, N, H]
        handle: LLHandle = combine_input.dispatch_output.handle
        L, N, H = out.shape
        rows = out.reshape(L * N, H)  # (once: each view costs host time)
        if exchange_kernels.inference_path(out, handle.slot_weight):  # NVLink: the partials go home as they are made
            back = self.exchange.put_sums(rows, handle.slot_index, handle.slot_weight, handle.exchange)
            if back is not None:
                return back
        partial = _gather(rows, handle.slot_index, handle.slot_weight)
        return self.exchange.reduce(partial, handle.exchange)


# Each step below has one fused kernel on CUDA (inference; the slot plan always) and torch ops
# elsewhere and under autograd.

def _slots(local_ids: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_index [N, K]: flat row l*N + p of each (received row, topk slot) (L*N = none); masked_m [L]."""
    if exchange_kernels.on_gpu(local_ids):
        return exchange_kernels.ll_slots(local_ids, L)
    N = local_ids.shape[0]
    here = local_ids >= 0
    col = torch.where(here, local_ids.long(), L)
    present = torch.zeros(N, L + 1, dtype=torch.bool, device=local_ids.device).scatter_(1, col, True)[:, :L]
    pos = running_count(present).gather(1, col.clamp(max=L - 1))  # row of each pair inside its expert
    return torch.where(here, col * N + pos, L * N), present.sum(0).to(torch.int32)


def _first_of_each_slot(slot_index: torch.Tensor, none: int) -> torch.Tensor:
    """slot_index with every repeat of a slot within a row (a token listing one expert twice) set to
    `none`, so the slot is written once and its gradient flows back once."""
    K = slot_index.shape[1]
    repeat = ((slot_index.unsqueeze(2) == slot_index.unsqueeze(1)) & earlier_slots(K, slot_index.device)).any(2)
    return torch.where(repeat, torch.full_like(slot_index, none), slot_index)


def _scatter(rows: torch.Tensor, slot_index: torch.Tensor, scale: Optional[torch.Tensor], num_slots: int) -> torch.Tensor:
    """[num_slots, H]: row n copied to slot_index[n, k] for every k (times scale[n, k] when given)."""
    if exchange_kernels.inference_path(rows, scale):
        return exchange_kernels.ll_scatter(rows, slot_index, scale, num_slots)
    N, K = slot_index.shape
    values = rows.unsqueeze(1).expand(N, K, rows.shape[1])
    if scale is not None:
        values = weighted_rows(values, scale.unsqueeze(-1))
    buffer = rows.new_empty(num_slots, rows.shape[1])
    return buffer.index_put_((slot_index.reshape(-1),), values.reshape(N * K, -1))


def _gather(out: torch.Tensor, slot_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, H] in out's dtype: sum_k weight[n, k] * out[slot_index[n, k]], accumulated in fp32 (fp64 kept)."""
    if exchange_kernels.inference_path(out, weight):
        return exchange_kernels.ll_gather(out, slot_index, weight)
    S, H = out.shape
    N, K = slot_index.shape
    rows = out[slot_index.clamp(max=S - 1).reshape(-1)].view(N, K, H)
    rows = torch.where((slot_index < S).unsqueeze(-1), rows, rows.new_zeros(()))  # unwritten rows may be NaN
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    return (rows.to(acc) * weight.unsqueeze(-1).to(acc)).sum(1).to(out.dtype)


def _runner_input(out: DeepEPLLDispatchOutput, placement, config) -> ExpertMajorInput:
    return ExpertMajorInput(out.recv_x, out.masked_m, out.recv_x_scale, out.x_dtype)


register_format("deepep_ll", ExpertMajorInput, _runner_input)  # the [L, M*R, H] result goes to combine as it is
