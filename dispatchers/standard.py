"""standard: no exchange. R = 1, or every rank holds every expert and computes its own tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ep_runtime.runner_core import CombineInput, DispatchOutput, RunnerInput, register_format
from ep_runtime.validation import capturing, check_topk_values

from . import exchange_kernels, register
from .base import Dispatcher


@dataclass
class StandardDispatchOutput(DispatchOutput):
    """hidden_states [T, H]; topk_ids [T, K] int32 global (-1 = nowhere); topk_weights [T, K] fp32."""

    format = "standard"
    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


@register
class StandardDispatcher(Dispatcher):
    name = "standard"
    format = "standard"
    shards_experts = False
    checks_values_in_exchange = True  # checked in _dispatch: one fused flag kernel on CUDA

    def _dispatch(self, x, topk):
        ids, weights = topk
        flags = None
        if exchange_kernels.on_gpu(ids) and ids.numel() and not capturing():  # one kernel + one read, not ~12 ops
            # one "rank" holds every expert here: the placement's owner table is all zeros
            _, row = exchange_kernels.layout_row(ids, weights, self.placement.expert_rank_table(ids.device), 1, 2)
            flags = row[-2:].tolist()
        check_topk_values(ids, weights, self.config.num_experts, flags)
        return StandardDispatchOutput(x, ids, weights)

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        return combine_input.hidden_states


def _runner_input(out: StandardDispatchOutput, placement, config) -> RunnerInput:
    return RunnerInput.from_global_ids(out.hidden_states, out.topk_ids, out.topk_weights, placement)


register_format("standard", RunnerInput, _runner_input)  # the rows go to combine as they are
