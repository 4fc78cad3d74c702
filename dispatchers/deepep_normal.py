"""deepep_normal: throughput-mode exchange with DeepEP "normal" semantics.

A token goes once to each rank owning at least one of its experts. One all_gather of a small count
table ([R + E] ints per rank) tells every rank every split size, so capacity errors are raised on
all ranks together; then the payload crosses with all_to_all_single. The only host sync is reading
that table. Given the handle of an earlier dispatch with the same routing, the table is reused and
nothing syncs. With `num_worst_tokens` W every shape is static (each rank sends a W-row chunk to
every peer and compacts what it receives into W rows on the device): no host sync, graph-capturable.

Combine sends each received row (that rank's weighted partial sum) home and adds the partials per
token in fp32. Everything is built from differentiable gathers, index_adds and exchanges, so the
backward of dispatch is a combine and the backward of combine a dispatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ep_runtime import envs
from ep_runtime.routing import TopKOutput
from ep_runtime.runner_core import CombineInput, DispatchOutput, local_runner_input, register_permute
from ep_runtime.validation import capturing

from . import register
from .base import Dispatcher
from .transport import all_gather_rows, all_to_all


class Layout(NamedTuple):
    """DeepEP's get_dispatch_layout, computed on the device without a host sync."""

    num_tokens_per_rank: torch.Tensor  # [R] int64: tokens this rank sends to each rank
    num_tokens_per_expert: torch.Tensor  # [E] int64: (token, expert) pairs per global expert
    is_token_in_rank: torch.Tensor  # [T, R] bool


def dispatch_layout(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> Layout:
    T = topk_ids.shape[0]
    L = num_experts // ep_size
    ids = topk_ids.long()
    valid = ids >= 0
    owner = torch.where(valid, ids // L, torch.full_like(ids, ep_size))  # ep_size = nowhere
    in_rank = torch.zeros(T, ep_size + 1, dtype=torch.bool, device=ids.device)
    in_rank.scatter_(1, owner, True)
    in_rank = in_rank[:, :ep_size]
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    per_expert.scatter_add_(0, torch.where(valid, ids, num_experts).reshape(-1), torch.ones_like(ids).reshape(-1))
    return Layout(in_rank.sum(0), per_expert[:num_experts], in_rank)


@dataclass
class NormalHandle:
    """Where every row came from; pass it to a later dispatch with the same routing to skip the
    count exchange. send_token [S]: the source token of each sent row (rank-major; T marks a pad row
    in static mode). Static mode only: recv_pos [R*W] (compact row of each received chunk row, W =
    pad) and recv_rows [W] (chunk row of each compact row, R*W = pad)."""

    num_tokens: int
    layout: Layout
    send_token: torch.Tensor
    send_splits: Optional[list[int]]
    recv_splits: Optional[list[int]]
    num_recv_tokens_per_expert: list[int]
    num_recv_tokens_per_expert_tensor: torch.Tensor
    recv_pos: Optional[torch.Tensor] = None
    recv_rows: Optional[torch.Tensor] = None


@dataclass
class DeepEPNormalDispatchOutput(DispatchOutput):
    """recv_x [N, H]; recv_topk_ids [N, K] int32 local (-1: expert elsewhere or none); recv_topk_weights
    [N, K] fp32; num_recv_tokens_per_expert: list (rounded up to the alignment; empty in static
    mode, where num_recv_tokens_per_expert_tensor [L] holds the true counts on the device)."""

    format = "deepep_normal"
    recv_x: torch.Tensor
    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: list[int]
    num_recv_tokens_per_expert_tensor: torch.Tensor
    handle: NormalHandle


@register
class DeepEPNormalDispatcher(Dispatcher):
    """alignment: round num_recv_tokens_per_expert up to a multiple (EP_RUNTIME_NORMAL_ALIGNMENT).
    num_worst_tokens: an upper bound on the tokens any rank receives; static shapes, no host sync."""

    name = "deepep_normal"
    format = "deepep_normal"

    def __init__(self, config, group=None, alignment: Optional[int] = None,
                 num_worst_tokens: Optional[int] = None):
        super().__init__(config, group)
        self.alignment = envs.get("NORMAL_ALIGNMENT") if alignment is None else alignment
        if not isinstance(self.alignment, int) or self.alignment < 1:
            raise ValueError(f"alignment={self.alignment!r}; allowed: an int >= 1")
        if num_worst_tokens is not None and (not isinstance(num_worst_tokens, int) or num_worst_tokens < 1):
            raise ValueError(f"num_worst_tokens={num_worst_tokens!r}; allowed: None or an int >= 1")
        self.num_worst_tokens = num_worst_tokens

    def get_dispatch_layout(self, topk_ids: torch.Tensor) -> Layout:
        return dispatch_layout(topk_ids, self.config.num_experts, self.world_size)

    def dispatch(self, x, topk, handle: Optional[NormalHandle] = None) -> DeepEPNormalDispatchOutput:
        return super().dispatch(x, topk, handle=handle)

    def _dispatch(self, x, topk: TopKOutput, handle: Optional[NormalHandle] = None):
        ids, weights = topk
        if handle is None:
            handle = self.plan(ids)
        elif handle.num_tokens != x.shape[0]:
            raise ValueError(f"handle was made for {handle.num_tokens} tokens; x has {x.shape[0]} "
                             f"(a handle is only valid for a dispatch with the same routing)")
        R, L = self.world_size, self.placement.num_local_experts
        token = handle.send_token
        dest = self._send_rank(token, handle)
        pad = torch.zeros(1, x.shape[1], dtype=x.dtype, device=x.device)
        rows = torch.cat([x, pad])[token]
        # Local ids as the destination sees them (-1 where the expert lives elsewhere), packed with
        # the weights into one fp32 payload (ids < 2^24 are exact in fp32).
        ids_pad = torch.cat([ids, ids.new_full((1, ids.shape[1]), -1)])[token].long()
        local = ids_pad - dest.unsqueeze(1) * L
        local = torch.where((ids_pad >= 0) & (local >= 0) & (local < L), local, torch.full_like(local, -1))
        w_pad = torch.cat([weights, weights.new_zeros(1, weights.shape[1])])[token]
        meta = torch.cat([w_pad, local.float()], dim=1)

        recv_x = all_to_all(rows, handle.recv_splits, handle.send_splits, self.group, R)
        recv_meta = all_to_all(meta, handle.recv_splits, handle.send_splits, self.group, R)
        if handle.recv_rows is not None:  # static mode: compact R chunks of W rows into W rows
            recv_x = torch.cat([recv_x, pad])[handle.recv_rows]
            meta_pad = torch.cat([weights.new_zeros(1, ids.shape[1]), weights.new_full((1, ids.shape[1]), -1.0)], 1)
            recv_meta = torch.cat([recv_meta, meta_pad])[handle.recv_rows]
        K = ids.shape[1]
        recv_weights, recv_ids = recv_meta[:, :K], recv_meta[:, K:].round().to(torch.int32)
        return DeepEPNormalDispatchOutput(recv_x, recv_ids, recv_weights, handle.num_recv_tokens_per_expert,
                                          handle.num_recv_tokens_per_expert_tensor, handle)

    def _send_rank(self, token: torch.Tensor, handle: NormalHandle) -> torch.Tensor:
        """Destination rank of each sent row."""
        R = self.world_size
        if handle.send_splits is None:
            return torch.arange(R, device=token.device).repeat_interleave(self.num_worst_tokens)
        return torch.repeat_interleave(torch.arange(R, device=token.device),
                                       torch.tensor(handle.send_splits, device=token.device),
                                       output_size=token.numel())

    def plan(self, topk_ids: torch.Tensor) -> NormalHandle:
        """Layout, count exchange and row order for one routing."""
        R, E, L, me = self.world_size, self.config.num_experts, self.placement.num_local_experts, self.rank
        T = topk_ids.shape[0]
        layout = self.get_dispatch_layout(topk_ids)
        table = all_gather_rows(torch.cat([layout.num_tokens_per_rank, layout.num_tokens_per_expert]),
                                self.group, R)  # [R_src, R + E]
        sent = table[:, :R]  # sent[s, d]: tokens rank s sends to rank d
        per_expert = table[:, R + me * L:R + (me + 1) * L].sum(0)
        # Rows leave rank-major, tokens ascending within a destination.
        flat = layout.is_token_in_rank.t().reshape(-1)
        W = self.num_worst_tokens
        if W is None:
            host = sent.tolist()  # the one host sync
            send_splits = host[me]
            recv_splits = [host[s][me] for s in range(R)]
            order = torch.argsort((~flat).to(torch.int8), stable=True)[:sum(send_splits)]
            rounded = [-(-int(c) // self.alignment) * self.alignment for c in per_expert.tolist()]
            return NormalHandle(T, layout, order % max(T, 1), send_splits, recv_splits, rounded, per_expert)
        return self._static_plan(layout, sent, per_expert, T, W)

    def _static_plan(self, layout: Layout, sent: torch.Tensor, per_expert: torch.Tensor, T: int,
                     W: int) -> NormalHandle:
        R, me, device = self.world_size, self.rank, sent.device
        recv_counts = sent[:, me]
        overflow = sent.sum(0).max() > W  # the same verdict on every rank
        message = (f"num_worst_tokens={W} is below the tokens a rank receives; allowed: >= the largest "
                   f"per-rank receive count (raise num_worst_tokens)")
        if device.type == "cuda":
            torch._assert_async(~overflow, message)
        elif bool(overflow):
            raise ValueError(message + f" (largest here: {int(sent.sum(0).max())})")
        # Send side: row j of the chunk for rank d is the j-th token going to d.
        in_rank = layout.is_token_in_rank
        pos = in_rank.long().cumsum(0) - 1  # [T, R]
        target = torch.arange(R, device=device) * W + pos
        target = torch.where(in_rank & (pos < W), target, R * W).t().reshape(-1)
        tokens = torch.arange(T, device=device).repeat(R)
        send_token = torch.full((R * W + 1,), T, dtype=torch.long, device=device).scatter_(0, target, tokens)[:R * W]
        # Receive side: chunk row (s, j) lands at compact row offset[s] + j.
        j = torch.arange(W, device=device)
        offset = recv_counts.cumsum(0) - recv_counts
        compact = offset.unsqueeze(1) + j
        valid = (j < recv_counts.unsqueeze(1)) & (compact < W)
        recv_pos = torch.where(valid, compact, W).reshape(-1)
        recv_rows = torch.full((W + 1,), R * W, dtype=torch.long, device=device)
        recv_rows = recv_rows.scatter_(0, recv_pos, torch.arange(R * W, device=device))[:W]
        return NormalHandle(T, layout, send_token, None, None, [], per_expert, recv_pos, recv_rows)

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        out: DeepEPNormalDispatchOutput = combine_input.dispatch_output
        handle = out.handle
        partial = combine_input.hidden_states
        if handle.recv_pos is not None:  # static mode: back into R chunks of W rows
            partial = torch.cat([partial, partial.new_zeros(1, partial.shape[1])])[handle.recv_pos]
        back = all_to_all(partial, handle.send_splits, handle.recv_splits, self.group, self.world_size)
        T = handle.num_tokens
        y = torch.zeros(T + 1, partial.shape[1], dtype=torch.float32 if partial.dtype != torch.float64
                        else torch.float64, device=partial.device)
        y = y.index_add(0, handle.send_token, back.to(y.dtype))[:T]
        return y.to(partial.dtype)


def _pre(out: DeepEPNormalDispatchOutput, placement, config):
    return local_runner_input(out.recv_x, out.recv_topk_ids, out.recv_topk_weights, placement)


def _post(y: torch.Tensor, out: DeepEPNormalDispatchOutput) -> CombineInput:
    return CombineInput(y, out)


register_permute("deepep_normal", ("torch", "triton"), _pre, _post)
