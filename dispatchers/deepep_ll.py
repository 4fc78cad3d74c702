"""deepep_ll: low-latency mode with DeepEP semantics. Static shapes and no host sync, so dispatch ->
runner -> combine captures into one CUDA graph.

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

from ep_runtime import envs
from ep_runtime.routing import TopKOutput
from ep_runtime.runner_core import CombineInput, DispatchOutput, RunnerInput, register_permute

from . import register
from .base import Dispatcher
from .rank_exchange import ExchangeHandle, RankExchange, running_count


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
    """recv_x [L, M*R, H] expert-major (rows past masked_m are not data); masked_m [L] int32."""

    format = "deepep_ll"
    recv_x: torch.Tensor
    masked_m: torch.Tensor
    handle: LLHandle


@register
class DeepEPLLDispatcher(Dispatcher):
    """num_max_dispatch_tokens_per_rank M (EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK): most tokens a
    rank may dispatch per step; T > M is an error, never a drop."""

    name = "deepep_ll"
    format = "deepep_ll"

    def __init__(self, config, group=None, num_max_dispatch_tokens_per_rank: Optional[int] = None):
        super().__init__(config, group)
        M = num_max_dispatch_tokens_per_rank
        M = envs.get("LL_MAX_DISPATCH_TOKENS_PER_RANK") if M is None else M
        if not isinstance(M, int) or M < 1:
            raise ValueError(f"num_max_dispatch_tokens_per_rank={M!r}; allowed: an int >= 1")
        self.num_max_dispatch_tokens_per_rank = M
        self.exchange = RankExchange(config.num_experts, self.group, self.rank, self.world_size)

    def check_capacity(self, num_tokens: int) -> None:
        M = self.num_max_dispatch_tokens_per_rank
        if num_tokens > M:
            raise ValueError(f"x has T={num_tokens} tokens; deepep_ll allows at most num_max_dispatch_tokens_per_rank "
                             f"M={M} per rank (EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK)")

    def _dispatch(self, x, topk: TopKOutput):
        ids, weights = topk
        M, L = self.num_max_dispatch_tokens_per_rank, self.placement.num_local_experts
        handle = self.exchange.plan(ids, chunk=M, capacity=f"num_max_dispatch_tokens_per_rank={M}")
        rows, recv_ids, recv_w = self.exchange.send(x, ids, weights, handle, local_ids=True)
        N, K, H = rows.shape[0], recv_ids.shape[1], rows.shape[1]  # N = M * R received rows
        here = recv_ids >= 0
        col = torch.where(here, recv_ids.long(), L)
        present = torch.zeros(N, L + 1, dtype=torch.bool, device=x.device).scatter_(1, col, True)[:, :L]
        masked_m = present.sum(0).to(torch.int32)
        slot = running_count(present)  # [N, L]: row of each (received row, expert) in that expert
        pos = slot.gather(1, col.clamp(max=L - 1))
        slot_index = torch.where(here, col * N + pos, L * N)  # [N, K]
        slot_weight = torch.where(here, recv_w, torch.zeros_like(recv_w))
        values = rows.unsqueeze(1).expand(N, K, H)
        if self.config.apply_router_weight_on_input:
            values = values * slot_weight.unsqueeze(-1).to(values.dtype)
            slot_weight = here.to(slot_weight.dtype)
        # Only valid rows are written; rows past masked_m stay unwritten (never read), as in DeepEP.
        buffer = rows.new_empty(L * N + 1, H)
        buffer = buffer.index_put_((slot_index.reshape(-1),), values.reshape(N * K, H))
        recv_x = buffer[:L * N].view(L, N, H)
        return DeepEPLLDispatchOutput(recv_x, masked_m, LLHandle(handle, slot_index, slot_weight))

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        out: torch.Tensor = combine_input.hidden_states  # [L, N, H]
        handle: LLHandle = combine_input.dispatch_output.handle
        L, N, H = out.shape
        index = handle.slot_index
        K = index.shape[1]
        rows = out.reshape(L * N, H)[index.clamp(max=L * N - 1).reshape(-1)].view(N, K, H)
        rows = torch.where((index < L * N).unsqueeze(-1), rows, rows.new_zeros(()))  # unwritten rows may be NaN
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        partial = (rows.to(acc) * handle.slot_weight.unsqueeze(-1).to(acc)).sum(1)
        return self.exchange.reduce(partial.to(out.dtype), handle.exchange)


def _pre(out: DeepEPLLDispatchOutput, placement, config) -> RunnerInput:
    """Flatten [L, N, H] to rows with id l (valid) or the sink (past masked_m); weight 1."""
    L, N, H = out.recv_x.shape
    row = torch.arange(N, device=out.recv_x.device)
    ids = torch.where(row < out.masked_m.unsqueeze(1), torch.arange(L, device=row.device).unsqueeze(1), L)
    ones = torch.ones(L * N, 1, dtype=torch.float32, device=row.device)
    return RunnerInput(out.recv_x.reshape(L * N, H), ids.reshape(-1, 1).to(torch.int32), ones,
                       placement.local_mask_with_sink(row.device))


def _post(y: torch.Tensor, out: DeepEPLLDispatchOutput) -> CombineInput:
    return CombineInput(y.view(out.recv_x.shape), out)


register_permute("deepep_ll", ("torch",), _pre, _post)
