"""Top-k routing: router logits [T, E] -> TopKOutput(ids [T, K] int32 global, weights [T, K] fp32)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


class TopKOutput(NamedTuple):
    """ids [T, K] int32 global expert ids (-1 = slot goes nowhere); weights [T, K] fp32."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


@dataclass(frozen=True)
class TopKConfig:
    """How router logits pick experts.

    scoring: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3).
    renormalize: divide the chosen K weights by their sum.
    num_expert_group / topk_group: grouped top-k (DeepSeek): experts split in num_expert_group
        groups, only the best topk_group groups are eligible. A group's score is its best expert
        (no correction bias) or the sum of its best two (with a correction bias, as V3 does).
    routed_scaling_factor: multiplies the final weights (DeepSeek-V3's gate does this; leave
        MoeConfig.routed_scaling_factor at 1 when you use it here).
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_expert_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring={self.scoring!r}; allowed: softmax, sigmoid")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("num_expert_group and topk_group must be given together")
        if self.num_expert_group is not None and not 1 <= self.topk_group <= self.num_expert_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, num_expert_group={self.num_expert_group}]")


def select_experts(router_logits: torch.Tensor, config: TopKConfig,
                   correction_bias: Optional[torch.Tensor] = None) -> TopKOutput:
    """Pick K experts per token. router_logits [T, E]; correction_bias [E] (DeepSeek-V3's
    e_score_correction_bias) shifts the choice only, never the weights."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits has shape {list(router_logits.shape)}; expected [T, E]")
    T, E = router_logits.shape
    if config.top_k > E:
        raise ValueError(f"top_k={config.top_k} exceeds num_experts={E} (router_logits.shape[1])")
    scores = router_logits.float()
    scores = scores.softmax(dim=-1) if config.scoring == "softmax" else scores.sigmoid()
    choice = scores
    if correction_bias is not None:
        if tuple(correction_bias.shape) != (E,):
            raise ValueError(f"correction_bias has shape {list(correction_bias.shape)}; expected [{E}]")
        choice = scores + correction_bias.float()
    if config.num_expert_group is not None:
        G = config.num_expert_group
        if E % G != 0:
            raise ValueError(f"num_experts={E} is not divisible by num_expert_group={G}")
        per_group = choice.view(T, G, E // G)
        if correction_bias is not None and E // G >= 2:
            group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = per_group.max(dim=-1).values
        best_groups = group_scores.topk(config.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        eligible = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        eligible_count = config.topk_group * (E // G)
        if config.top_k > eligible_count:
            raise ValueError(f"top_k={config.top_k} exceeds the {eligible_count} experts in topk_group="
                             f"{config.topk_group} groups of {E // G}")
        choice = choice.masked_fill(~eligible, float("-inf"))
    ids = choice.topk(config.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return TopKOutput(ids.to(torch.int32), weights.float())
