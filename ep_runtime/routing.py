"""Top-k routing: router logits [T, E] -> TopKOutput(ids [T, K] int32 global, weights [T, K] fp32; float64 for
float64 logits)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import routing_kernels
from .validation import (
    check_finite,
    check_float_tensor,
    check_routed_scaling_factor,
    is_bool,
    is_int_at_least,
    weights_dtype,
)

GROUP_SCORES = ("max", "top2_sum")


class TopKOutput(NamedTuple):
    """ids [T, K] int32 global expert ids (-1 = slot goes nowhere); weights [T, K] fp32 (select_experts gives
    float64 for float64 logits)."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


@dataclass(frozen=True)
class TopKConfig:
    """How router logits pick experts.

    scoring: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3).
    renormalize: divide the chosen K weights by their sum + 1e-20 (DeepSeek-V3's rule: exact wherever the
        sum is above ~1e-13, and a sum of sigmoid scores of logits below about -45 is not).
    num_expert_group / topk_group: grouped top-k (DeepSeek): experts split in num_expert_group
        groups, only the best topk_group groups are eligible.
    group_score: how a group is scored: "max" (its best expert, DeepSeek-V2) or "top2_sum" (the sum
        of its best two, DeepSeek-V3). None: top2_sum when a correction bias is given, else max.
    routed_scaling_factor: multiplies the final weights (DeepSeek-V3's gate does this; leave
        MoeConfig.routed_scaling_factor at 1 when you use it here).
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_expert_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: float = 1.0
    group_score: Optional[str] = None

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring={self.scoring!r}; allowed: softmax, sigmoid")
        if not is_int_at_least(self.top_k, 1):
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 1")
        if not is_bool(self.renormalize):
            raise TypeError(f"renormalize={self.renormalize!r}; allowed: True or False")
        object.__setattr__(self, "renormalize", bool(self.renormalize))  # numpy's bool becomes a plain bool
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError(f"num_expert_group={self.num_expert_group!r} and topk_group={self.topk_group!r}: give "
                             f"both (grouped top-k) or neither")
        if self.num_expert_group is not None:
            if not is_int_at_least(self.num_expert_group, 1):
                raise ValueError(f"num_expert_group={self.num_expert_group!r} must be an int >= 1")
            if not is_int_at_least(self.topk_group, 1) or self.topk_group > self.num_expert_group:
                raise ValueError(f"topk_group={self.topk_group!r} must be in [1, num_expert_group={self.num_expert_group}]")
        if self.group_score not in (None,) + GROUP_SCORES:
            raise ValueError(f"group_score={self.group_score!r}; allowed: None (inferred), {', '.join(GROUP_SCORES)}")
        if self.group_score is not None and self.num_expert_group is None:
            raise ValueError(f"group_score={self.group_score!r} scores expert groups; give num_expert_group and "
                             f"topk_group too (or leave group_score None)")
        object.__setattr__(self, "routed_scaling_factor", check_routed_scaling_factor(self.routed_scaling_factor))
        for name in ("top_k", "num_expert_group", "topk_group"):  # numpy ints become plain ints
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    def group_rule(self, num_experts: int, with_bias: bool) -> str:
        """How groups are scored ("max" or "top2_sum"): group_score, else top2_sum with a correction bias (and
        two experts or more per group), max without."""
        if self.group_score is not None:
            return self.group_score
        return "top2_sum" if with_bias and num_experts // self.num_expert_group >= 2 else "max"

    def check(self, num_experts: int) -> None:
        """Raise when this routing cannot pick top_k of num_experts experts (checked when a layer is
        built, not at the first forward)."""
        if self.top_k > num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={num_experts}; allowed 1..{num_experts}")
        G = self.num_expert_group
        if G is None:
            return
        if num_experts % G != 0:
            raise ValueError(f"num_experts={num_experts} is not divisible by num_expert_group={G}; allowed: a "
                             f"divisor of {num_experts}")
        eligible = self.topk_group * (num_experts // G)
        if self.top_k > eligible:
            raise ValueError(f"top_k={self.top_k} exceeds the {eligible} experts in topk_group="
                             f"{self.topk_group} groups of {num_experts // G}; allowed 1..{eligible}")
        if self.group_score == "top2_sum" and num_experts // G < 2:
            raise ValueError(f"group_score='top2_sum' needs at least 2 experts per group; "
                             f"num_experts={num_experts} / num_expert_group={G} = {num_experts // G}")


def select_experts(router_logits: torch.Tensor, config: TopKConfig,
                   correction_bias: Optional[torch.Tensor] = None) -> TopKOutput:
    """Pick K experts per token. router_logits [T, E] (any float dtype; scored in fp32, float64 logits in
    float64, as a float64 layer needs for its reference and gradchecks);
    correction_bias [E] (DeepSeek-V3's e_score_correction_bias) shifts the choice only, never the
    weights (a non-finite entry, or under float32 scoring one past float32's range, is an error, checked for CPU
    tensors). Returns TopKOutput(ids [T, K] int32 global, K distinct per token, never -1; weights [T, K] in the
    scoring dtype: fp32, float64 for float64 logits, validation.weights_dtype's rule). On the current CUDA device,
    with no gradient needed, nothing tracing it and logits other than float64, one Triton kernel computes it
    (ep_runtime/routing_kernels.py, fp32: the same picks up to fp32 rounding of exp); elsewhere torch ops do. On
    both the ids come best first, an exact tie to the lower id (and group)."""
    if not isinstance(config, TopKConfig):
        raise TypeError(f"config={config!r}; expected an ep.TopKConfig")
    check_float_tensor("router_logits", router_logits)
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits has shape {list(router_logits.shape)}; expected [T, E] (flatten the leading "
                         f"dims: router_logits.flatten(0, -2); a layer's router_logits= takes [..., E] as it is)")
    T, E = router_logits.shape
    if E < 1:  # (config.check would say "allowed 1..0")
        raise ValueError(f"router_logits has shape {list(router_logits.shape)}: no expert to pick from; expected [T, E] "
                         f"with E >= 1 (E >= top_k={config.top_k})")
    config.check(E)
    if correction_bias is not None:
        check_float_tensor("correction_bias", correction_bias, router_logits.device, "router_logits")
        if tuple(correction_bias.shape) != (E,):
            raise ValueError(f"correction_bias has shape {list(correction_bias.shape)}; expected [{E}]")
        if not correction_bias.is_cuda:  # (on CUDA the host read would cost a sync per step)
            # topk picks a NaN first, and its weight is finite: no later check would see it (widened: torch has
            # no isfinite for float8, and widening to float32 or float64 keeps every value)
            check_finite("correction_bias", correction_bias.to(weights_dtype(correction_bias.dtype)))
            # A float64 entry beyond float32's range is inf once added to float32 scores: +inf picks its expert for
            # every token, -inf ties it with the experts of groups left out (so one of those could be picked).
            over = ~torch.isfinite(correction_bias.to(weights_dtype(router_logits.dtype)))
            if bool(over.any()):
                e = int(over.nonzero()[0])
                raise ValueError(f"correction_bias has {float(correction_bias[e])} at [{e}], beyond float32's range "
                                 f"(router_logits of dtype {router_logits.dtype} are scored in float32); allowed: "
                                 f"|bias| <= {torch.finfo(torch.float32).max:.6g}")
    # one kernel where it can serve: not for autograd (the router's gradient) nor torch.compile (traces the ops)
    differentiable = torch.is_grad_enabled() and router_logits.requires_grad
    scoring = weights_dtype(router_logits.dtype)  # float64 logits keep float64 (DeepEP/SGLang score in fp32)
    if (scoring == torch.float32 and routing_kernels.usable(router_logits) and not differentiable
            and not torch.compiler.is_compiling()):
        top2 = config.num_expert_group is not None and config.group_rule(E, correction_bias is not None) == "top2_sum"
        return TopKOutput(*routing_kernels.select_experts(router_logits, config, correction_bias, top2))
    logits = router_logits.to(scoring)  # (widened first: torch has no isneginf for float8 logits)
    scores = logits.softmax(dim=-1) if config.scoring == "softmax" else logits.sigmoid()
    # A -inf logit (an expert the token may not take) scores 0, as may a finite logit far below the others
    # (softmax and sigmoid underflow): rank it below every score (>= 0) so topk never prefers it
    # to a finite logit, yet above the -inf of groups left out below.
    choice = scores.masked_fill(torch.isneginf(logits), -1.0)
    if correction_bias is not None:
        choice = scores + correction_bias.to(scoring)
    if config.num_expert_group is not None:
        G = config.num_expert_group
        per_group = choice.view(T, G, E // G)
        if config.group_rule(E, correction_bias is not None) == "top2_sum":
            group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = per_group.max(dim=-1).values
        best_groups = _largest(group_scores, config.topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        eligible = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        choice = choice.masked_fill(~eligible, float("-inf"))
    ids = _largest(choice, config.top_k)
    weights = scores.gather(1, ids)
    if config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return TopKOutput(ids.to(torch.int32), weights.to(scoring))


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest of each row of values [T, N], largest first, NaN first (as torch.topk ranks it), an
    exact tie to the lower index: the routing kernel's order. (torch.topk leaves ties unspecified, CPU and CUDA
    differ, so a zero-initialised router or bf16 logits routed differently in training and in inference.)"""
    return values.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def name_non_finite_logits(router_logits: torch.Tensor, config: TopKConfig, err: ValueError) -> None:
    """A dispatcher's error about non-finite topk_weights, when select_experts made them from router_logits
    [T, E] in this call: raise one naming the logit behind them (NaN, or under softmax +inf or a row of -inf);
    else return. Scoring widens the logits (fp32, float64 for float64), so a logit finite as given stays finite.
    (The dispatcher checks the weights with the counts every rank exchanges, so every rank stops together:
    checking the logits here, before the exchange, would stop this rank alone.)"""
    if not str(err).startswith("topk_weights has a non-finite value") or "[found by the deferred check" in str(err):
        return  # (a deferred check's error is about an earlier call's weights: its message says which)
    logits = router_logits.detach().to(weights_dtype(router_logits.dtype))  # (float8: no isposinf; values kept)
    softmax = config.scoring == "softmax"
    bad = torch.isnan(logits) | (torch.isposinf(logits) if softmax else torch.zeros_like(logits, dtype=torch.bool))
    masked_rows = torch.isneginf(logits).all(dim=1) if softmax else torch.zeros_like(bad[:, 0])
    rows = (bad.any(dim=1) | masked_rows).nonzero()
    if rows.numel() == 0:
        return
    t = int(rows[0])
    where = bad[t].nonzero()
    if where.numel():
        e = int(where[0])
        what = f"{float(logits[t, e])} at [{t}, {e}]"
    else:
        what = f"-inf in every entry of row {t}"
    allowed = ("finite logits or -inf (an expert the token may not take), at least one finite per row" if softmax
               else "logits that are not NaN")
    raise ValueError(f"router_logits has {what}, which gives non-finite routing weights; allowed: {allowed} "
                     f"(scoring={config.scoring!r})") from None
