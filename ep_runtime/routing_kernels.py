"""Top-k routing in one kernel (CUDA; CPU tensors under TRITON_INTERPRET=1), beside its launcher.

Why: select_experts in torch ops is 8 to 20 small kernels and ~75 us of host time per call (one H200
host, T=1), about a decode step's own length, for [T, E] logits a single program row reads at once.
The kernel scores, groups and picks exactly as routing.select_experts does (its torch code is the
reference and the CPU, autograd and torch.compile path): softmax or sigmoid in fp32; a -inf logit's
choice is -1 (below every score, above an excluded group's -inf) unless a correction bias is added;
groups scored by their best or best two choices, the best topk_group kept; K picks by choice, ties
to the lower expert id, a NaN choice first (torch.topk ranks NaN highest); weights gathered from the
scores, renormalized by sum + 1e-20, scaled. Results equal the torch path's up to fp32 rounding of
exp (so the same picks wherever two choices differ by more than that). Float64 logits never come here:
select_experts scores them in float64 on its torch path (a float64 layer's reference and gradchecks).
"""
from __future__ import annotations

from typing import Optional

import torch

from .triton_launch import cdiv, fast_launch, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: routing.select_experts keeps its torch path
    triton = None

MAX_EXPERTS = 4096  # one program row holds a token's E scores (padded to a power of two)
# A program takes 256 // E_PAD tokens (at least one) on one warp: each token's picks are a chain of reductions,
# so many small programs beat fewer wide ones (one H200, graph replays, DeepSeek-V3's router: 5.2 us at T=1,
# 18.8 us at 4096; 16 tokens on 4 warps a program: 7.9 and 36.7 us).
_ROW_ELEMENTS = 256
_NUM_WARPS = 1


def usable(router_logits: torch.Tensor) -> bool:
    """The kernel serves these logits: on the current CUDA device (where a launch goes), triton present, E within
    MAX_EXPERTS. (routing.select_experts also keeps autograd and torch.compile on its torch path.)"""
    return (triton is not None and router_logits.is_cuda and router_logits.shape[-1] <= MAX_EXPERTS
            and router_logits.device.index == torch.cuda.current_device())


if triton is not None:

    @triton.jit
    def _first_max(values, candidates, cols, NONE: tl.constexpr):
        """Per row: the lowest column among `candidates` holding the row's largest candidate value (NONE
        where a row has no candidate)."""
        best = tl.max(tl.where(candidates, values, float("-inf")), axis=1)
        return tl.min(tl.where(candidates & (values == best[:, None]), cols[None, :], NONE), axis=1)

    @fast_launch
    @triton.jit
    def _select_experts_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, T, E, stride_t, stride_e, stride_bias,
                               scaling,
                               K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                               SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
                               GROUPS: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr,
                               TOP2: tl.constexpr):
        """logits [T, E] (any float dtype) -> ids [T, K] int32, weights [T, K] fp32; GROUPS 0: no groups."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, E_PAD)
        valid = (rows < T)[:, None] & (cols < E)[None, :]
        offsets = rows[:, None].to(tl.int64) * stride_t + cols[None, :].to(tl.int64) * stride_e
        x = tl.load(logits_ptr + offsets, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            scores = tl.div_rn(1.0, 1.0 + tl.exp(-x))
        else:  # (a NaN, a +inf or a row of -inf makes the row NaN, as torch's softmax does)
            shifted = tl.exp(x - tl.max(x, axis=1)[:, None])
            scores = tl.div_rn(shifted, tl.sum(shifted, axis=1)[:, None])
        choice = tl.where(x == float("-inf"), -1.0, scores)
        if HAS_BIAS:  # (as the torch path: the bias is added to the scores, the -1 of a -inf logit dropped)
            bias = tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=cols < E, other=0.0).to(tl.float32)
            choice = scores + bias[None, :]
        choice = tl.where(choice != choice, float("inf"), choice)  # NaN first, as torch.topk ranks it
        if GROUPS > 0:
            size = E // GROUPS
            group_of = cols // size
            group_cols = tl.arange(0, G_PAD)
            group_scores = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
            for g in tl.static_range(GROUPS):
                members = valid & (group_of == g)[None, :]
                score = tl.max(tl.where(members, choice, float("-inf")), axis=1)
                if TOP2:  # its best two: the best one's column left out once
                    first = _first_max(choice, members, cols, E_PAD)
                    score += tl.max(tl.where(members & (cols[None, :] != first[:, None]), choice, float("-inf")),
                                    axis=1)
                group_scores = tl.where(group_cols[None, :] == g, score[:, None], group_scores)
            group_scores = tl.where(group_scores != group_scores, float("inf"), group_scores)
            kept = tl.zeros((BLOCK_T, G_PAD), tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                best = _first_max(group_scores, (group_cols[None, :] < GROUPS) & ~kept, group_cols, G_PAD)
                kept = kept | (group_cols[None, :] == best[:, None])
            eligible = tl.zeros((BLOCK_T, E_PAD), tl.int1)
            for g in tl.static_range(GROUPS):
                group_kept = tl.max(tl.where(group_cols[None, :] == g, kept.to(tl.int32), 0), axis=1) > 0
                eligible = eligible | (group_kept[:, None] & (group_of == g)[None, :])
            choice = tl.where(eligible, choice, float("-inf"))
        picks = tl.arange(0, K_PAD)
        ids = tl.zeros((BLOCK_T, K_PAD), tl.int32)
        weights = tl.zeros((BLOCK_T, K_PAD), tl.float32)
        open_ = valid
        for k in tl.static_range(K):
            pick = _first_max(choice, open_, cols, E_PAD)
            hit = cols[None, :] == pick[:, None]
            weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
            open_ = open_ & ~hit
            ids = tl.where(picks[None, :] == k, pick[:, None], ids)
            weights = tl.where(picks[None, :] == k, weight[:, None], weights)
        if RENORMALIZE:
            weights = tl.div_rn(weights, tl.sum(weights, axis=1)[:, None] + 1e-20)
        weights = weights * scaling
        out = rows[:, None].to(tl.int64) * K + picks[None, :]
        mask = (rows < T)[:, None] & (picks < K)[None, :]
        tl.store(ids_ptr + out, ids, mask=mask)
        tl.store(weights_ptr + out, weights, mask=mask)


def select_experts(router_logits: torch.Tensor, config, correction_bias: Optional[torch.Tensor],
                   top2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """routing.select_experts' (ids [T, K] int32, weights [T, K] fp32) in one launch. router_logits [T, E] and
    correction_bias [E] as routing.select_experts checked them (it calls this where usable() says so); config a
    TopKConfig that config.check(E) accepted; top2: groups are scored by their best two choices (else their
    best), as TopKConfig.group_rule says."""
    T, E = router_logits.shape
    K = config.top_k
    ids = torch.empty(T, K, dtype=torch.int32, device=router_logits.device)
    weights = torch.empty(T, K, dtype=torch.float32, device=router_logits.device)
    if T == 0:
        return ids, weights
    E_PAD = next_power_of_2(E)
    BLOCK_T = max(1, min(next_power_of_2(T), _ROW_ELEMENTS // E_PAD))
    groups = config.num_expert_group or 0
    bias = correction_bias if correction_bias is not None else weights  # (a placeholder pointer, never read)
    _select_experts_kernel[(cdiv(T, BLOCK_T), )](
        router_logits, bias, ids, weights, T, E, router_logits.stride(0), router_logits.stride(1), bias.stride(0),
        float(config.routed_scaling_factor), K=K, K_PAD=next_power_of_2(K), E_PAD=E_PAD, BLOCK_T=BLOCK_T,
        SIGMOID=config.scoring == "sigmoid", HAS_BIAS=correction_bias is not None, RENORMALIZE=config.renormalize,
        GROUPS=groups, G_PAD=max(next_power_of_2(groups), 1), TOPK_GROUP=config.topk_group or 0, TOP2=top2,
        num_warps=_NUM_WARPS)
    return ids, weights
