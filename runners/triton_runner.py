"""The triton runner: fused MoE kernels (runners/triton_kernels.py) behind the runner core and a
functional API. `fused_forward` is the one kernel sequence; the backend and `fused_experts` both
call it, so the two entry points cannot drift apart.

Autograd: the forward runs the kernels; the backward recomputes the layer with the torch runner's
differentiable ops (activation checkpointing with a torch recompute) and back-propagates through
that, so training with runner="triton" gives the torch runner's gradients.

Quantized experts (fp8 block weights) take the same sequence as w8a8: the input rows are quantized per
token and 128 channels by one fused kernel (or arrive quantized from an fp8 dispatch), both GEMMs are
block-scaled fp8 (the same grouped GEMM kernel, BLOCK_SCALED), and GEMM 1's epilogue writes its
activation output as fp8 with one scale per row and 128 channels (QUANT_OUT), GEMM 2's input. Inference
only (GEMM hooks: use runner="torch").

Each GEMM's kernel (portable, persistent, tma, tma_stacked: runners/triton_kernels.py) comes with its
tiles: from the block_config given, else the device table or EP_RUNTIME_TRITON_GEMM_KERNEL. On Hopper, fp8
steps of prefill size run both GEMMs as Gluon kernels instead (runners/gluon_kernels.py; _fp8_gemm says
when, EP_RUNTIME_TRITON_FP8_GEMM overrides): GEMM 1's rows gathered in expert order first, the same
activation and quantization rule in its epilogue, the same alignment and reduction around them.

Host time: an eager call of a shape seen before reuses that shape's plan (_Plan: tiles, scratch key and the
kernels' prepared launches, made from shapes, strides and dtypes only), so it checks and computes nothing again and
only launches; the kernels take the widths and strides a layer fixes as constexprs (fewer launch parameters).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import torch

from ep_runtime import envs
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.placement import ExpertPlacement
from ep_runtime.quant import INFERENCE_ONLY, QuantConfig, as_quant_config, decode_scales
from ep_runtime.runner_core import RunnerInput, needs_grad, weighted_rows
from ep_runtime.scratch import SCRATCH
from ep_runtime.triton_launch import triton_interpreted as interpreted
from ep_runtime.validation import (
    capturing,
    check_expert_dtypes,
    check_hidden_states,
    check_ids_not_below_minus_one,
    check_topk,
    is_int_at_least,
)

from . import register
from .base import _NO_HOOKS, GemmHooks, TritonBackend, call_hook, check_hooks, recompute_backward

try:
    import triton  # noqa: F401

    from ep_runtime.quant_kernels import RowQuantization, plan_rows

    from . import gluon_kernels
    from . import triton_kernels as kernels
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # triton is optional (`pip install ep-runtime[triton]`)
    kernels = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"triton does not import ({exc}); pip install triton"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(f"runner='triton' got tensors on {x.device}; it needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for CPU tensors through the interpreter)")


def _check_block_config(block_config) -> None:
    """At both entry points (TritonRunner's construction, fused_experts): a block_config of another type failed
    inside the first forward, between a layer's dispatch and combine."""
    if block_config is not None and not isinstance(block_config, kernels.BlockConfig):
        raise TypeError(f"block_config is a {type(block_config).__name__}; allowed: None or a "
                        f"ep_runtime.runners.triton_kernels.BlockConfig")


def fused_forward(inp: RunnerInput, weights: ExpertWeights, config: MoeConfig, hooks: Optional[GemmHooks] = None,
                  block_config: Optional["kernels.BlockConfig"] = None) -> torch.Tensor:
    """The kernel sequence: align pairs -> GEMM 1 with the activation fused in its epilogue (or, with an
    after_gemm1 hook, GEMM 1 -> hook -> filtered activation) -> GEMM 2 -> weighted top-k reduction.
    Returns [N, H] in x's dtype. Not differentiable by itself (see _FusedExperts). The ids may still
    need their id_table: the alignment kernels look them up (hooks see mapped ids).
    The decisions and launch arguments that depend only on the call's shapes (a _Plan) are made once per shape
    and kept (_PLANS) for eager calls without hooks, fp8 ones included: a call of a shape seen before checks
    nothing again (its key holds every check's input) and only quantizes its rows (fp8) and launches."""
    hooks = hooks or _NO_HOOKS
    hooked = hooks.after_gemm1 is not None or hooks.after_gemm2 is not None
    quant, interp = weights.quant, kernels.INTERPRETED
    key = knobs = None
    if not (hooked or torch.compiler.is_compiling()):
        knobs = _gemm_knobs()
        key = _plan_key(inp, weights, config, block_config, knobs)
        plan = _PLANS.get(key)
        if plan is not None:
            return plan.run(inp, weights, hooks, *_gemm_input(inp, quant, interp))
    _check_device(inp.hidden_states)
    # (float64 would reach tl.dot with an fp32 accumulator: garbage under the interpreter, no kernel on GPU)
    TritonRunner.check_dtype(inp.output_dtype, "x dtype")
    if quant is None:
        TritonRunner.check_dtype(weights.w13.dtype, "w13 dtype")
    if quant is not None and hooked:
        raise ValueError(_NO_FP8_HOOKS)
    if hooked:
        if capturing():  # (named here: the compaction's sync invalidated the capture with a bare CUDA error)
            raise RuntimeError("runner='triton' with GEMM hooks cannot run inside a CUDA graph capture: the hooks "
                               "take the computed (token, expert) pairs compacted ([P, ...]), whose count P is "
                               "data-dependent (a host sync); capture a layer without hooks")
        inp = inp.routed()
    if quant is not None and _fp8_gemm(inp, weights, config, inp.hidden_states, block_config) == "gluon":
        return _gluon_fp8_forward(inp, weights, config)
    x, x_scale, to_quantize = _gemm_input(inp, quant, interp)
    plan = _Plan(inp, weights, config, hooked, block_config, x, knobs or _gemm_knobs())
    if key is not None:
        if len(_PLANS) >= _MAX_PLANS:  # (a bound, not an LRU: a dropped plan costs one call of the unplanned path)
            _PLANS.clear()
        _PLANS[key] = plan
    return plan.run(inp, weights, hooks, x, x_scale, to_quantize)


_PLANS: dict = {}  # _plan_key -> _Plan (shapes, dtypes, strides and knobs only: no tensor is kept)
_MAX_PLANS = 256
_NO_FP8_HOOKS = "runner='triton' with quantized (fp8) experts takes no GEMM hooks; use runner='torch'"


def _gemm_knobs() -> tuple[str, str]:
    """(EP_RUNTIME_TRITON_GEMM_KERNEL, EP_RUNTIME_TRITON_GEMM_SCHEDULE), read at every call."""
    return envs.get("TRITON_GEMM_KERNEL"), envs.get("TRITON_GEMM_SCHEDULE")


def _plan_key(inp: RunnerInput, weights: ExpertWeights, config: MoeConfig, block_config, knobs: tuple) -> tuple:
    """Everything a _Plan of an unhooked call reads: the config and tiles, the knobs read per call, the ids',
    rows' and weights' shapes, strides and dtypes, the device, and the weights' 16-byte alignment (whether TMA can
    load them), and how often the tuned tables were reloaded (a plan keeps the tiles picked from the tables it
    saw: after reload_tables the next call picks again). The weights' shapes and dtypes are the config's and x's:
    every caller checks them first (check_weights). fp8: the experts' format and scales' strides, the rows'
    scales, and what _fp8_gemm decides from (a call it sends to the Gluon GEMMs never makes a plan)."""
    x, ids, table, w13, w2 = inp.hidden_states, inp.topk_ids, inp.id_table, weights.w13, weights.w2
    key = (config, block_config, knobs, kernels.TABLES_READ, ids.shape,
           ids.dtype, None if table is None else table.shape, inp.expert_mask.shape, x.shape, x.stride(), x.dtype,
           x.device, inp.out_dtype, inp.capacity_rows, w13.dtype, w13.stride(), w2.stride(), w13.data_ptr() % 16,
           w2.data_ptr() % 16, weights.b13 is None, weights.b2 is None)
    scale, quant = inp.hidden_scale, weights.quant
    if scale is None and quant is None:
        return key
    rows = None if scale is None else (scale.shape, scale.stride(), scale.dtype)
    if quant is None:
        return key + (rows,)
    return key + (rows, quant, weights.w13_scale_inv.stride(), weights.w2_scale_inv.stride(), inp.padded_rows,
                  envs.get("TRITON_FP8_GEMM"), _prefill_sized(inp, weights))


class _Plan:
    """fused_forward for one shape: its tiles, scratch and prepared launches (made at the first run; they hold no
    tensor), so that run() on tensors of the same shapes, strides and dtypes only launches the sequence."""

    def __init__(self, inp: RunnerInput, weights: ExpertWeights, config: MoeConfig, hooked: bool,
                 block_config: Optional["kernels.BlockConfig"], x: torch.Tensor, knobs: tuple):
        """knobs: (EP_RUNTIME_TRITON_GEMM_KERNEL, EP_RUNTIME_TRITON_GEMM_SCHEDULE) as this call read them."""
        interp, quant = kernels.INTERPRETED, weights.quant
        N, K = inp.topk_ids.shape
        H, I = config.hidden_size, config.intermediate_size
        L = weights.num_local_experts
        picked = block_config is None
        if picked:
            kernel, schedule = knobs
            block_config = kernels.pick_config(N, L, K, H, I, x.dtype, x.device, interp, kernel, schedule,
                                               inp.capacity_rows)
            if kernel == "auto":
                block_config = _runnable(block_config, weights, interp)
            else:  # forced: a kernel that cannot run here is an error naming the knob that forced it
                for tiles, w in ((block_config.gemm1, weights.w13), (block_config.gemm2, weights.w2)):
                    why = kernels.tma_unsupported(w, interp) if tiles.kernel in kernels.TMA_KERNELS else None
                    if why is not None:
                        raise ValueError(f"EP_RUNTIME_TRITON_GEMM_KERNEL={kernel!r} cannot run here: {why}; allowed "
                                         f"here: 'auto', 'portable' or 'persistent'")
        if quant is not None:
            untuned = picked and not kernels.has_tuned_shape(L, K, H, I, x.dtype, x.device, interp)
            block_config = _fit_k_tiles(block_config, quant.weight_block[1], untuned)
        if hooked and block_config.gemm2.split_k > 1:  # (the after_gemm2 hook takes GEMM 2's whole [P, H] output)
            block_config = dataclasses.replace(block_config,
                                               gemm2=dataclasses.replace(block_config.gemm2, split_k=1))
        self.config, self.block_config, self.hooked, self.top_k, self.L = config, block_config, hooked, K, L
        self.P, self.out_dtype = N * K, inp.output_dtype
        # Every buffer but the result is scratch, kept per shape across calls (SCRATCH), except where hooks
        # see and write them (fresh then). Rows of pairs never computed stay uninitialized; no result depends on
        # them. Without hooks GEMM 1 writes its output in sorted order (each expert's rows contiguous) and GEMM 2
        # reads it so: the TMA kernels load GEMM 2's input rows a block at a time instead of gathering them by
        # pair (a block's padding rows come along, uninitialized; their results are never stored).
        self.in_sorted_order = not hooked
        split = block_config.gemm2.split_k
        self.make = functools.partial(_scratch, self.P, L, block_config.BLOCK_M, H, I, self.out_dtype, quant,
                                      x.device, self.in_sorted_order, split)
        self.scratch_key = ("triton", self.P, L, block_config.BLOCK_M, H, I, self.out_dtype, quant, split)
        self.launches = None  # (align, GEMM 1, GEMM 2, reduction), prepared at the first run

    def _prepare(self, inp, weights, x, x_scale, aligned, a, a_scale, o, h, scale) -> tuple:
        config, quant, interp, K = self.config, weights.quant, kernels.INTERPRETED, self.top_k
        gemm1, gemm2 = self.block_config.gemm1, self.block_config.gemm2
        kernels.check_id_table(inp.id_table)
        align = kernels.prepare_align(aligned, self.L, 0, None if inp.id_table is None else inp.id_table.numel(),
                                      inp.expert_mask.numel())
        fp8 = {}
        if quant is not None:  # GEMM 2's fp8 input and its scales come out of GEMM 1's epilogue
            fp8 = dict(a_scale=x_scale, w_scale=weights.w13_scale_inv, scale_block=quant.weight_block, out_quant=quant,
                       out_scale=a_scale)
        if h is None:  # the activation in GEMM 1's epilogue: h [P, 2I] never reaches memory
            first = kernels.prepare_grouped_gemm(
                x, weights.w13, a, aligned, gemm1, K, weights.b13, scale, interp, config.activation,
                config.is_gated, config.gemm1_alpha, config.gemm1_clamp_limit, out_sorted=self.in_sorted_order, **fp8)
        else:
            first = kernels.prepare_grouped_gemm(x, weights.w13, h, aligned, gemm1, K, weights.b13, scale, interp)
        if quant is not None:
            fp8 = dict(a_scale=a_scale, w_scale=weights.w2_scale_inv, scale_block=quant.weight_block)
        second = kernels.prepare_grouped_gemm(a, weights.w2, o, aligned, gemm2, 1, weights.b2, interpreted=interp,
                                              a_sorted=self.in_sorted_order, **fp8)
        reduce = kernels.prepare_topk_reduce(o, K, not config.apply_router_weight_on_input,
                                             config.routed_scaling_factor, self.out_dtype, interp)
        return align, first, second, reduce

    def run(self, inp: RunnerInput, weights: ExpertWeights, hooks: GemmHooks, x: torch.Tensor,
            x_scale: Optional[torch.Tensor], to_quantize: Optional["RowQuantization"]) -> torch.Tensor:
        config, P, K = self.config, self.P, self.top_k
        weight = inp.topk_weights.float().contiguous()  # [N, K], read flat by pair p = t*K + k
        scale = weight if config.apply_router_weight_on_input else None
        aligned, a, a_scale, o = self.make() if self.hooked else SCRATCH.get(self.scratch_key, x.device, self.make)
        # (the hook needs GEMM 1's raw output: h, the hook, then the filtered activation pass)
        h = torch.empty(P, config.w13_rows, dtype=x.dtype, device=x.device) if hooks.after_gemm1 is not None else None
        launches = self.launches
        if launches is None or self.hooked:  # (a hooked plan serves one call)
            launches = self.launches = self._prepare(inp, weights, x, x_scale, aligned, a, a_scale, o, h, scale)
        align, first, second, reduce = launches
        if to_quantize is None:
            align(*kernels.align_inputs(inp.topk_ids, inp.expert_mask, inp.id_table), aligned)
        else:  # (x's quantization launched with the alignment)
            kernels.align_pairs(inp.topk_ids, inp.expert_mask, 0, self.L, self.block_config.BLOCK_M, out=aligned,
                                id_table=inp.id_table, quantize=to_quantize)
        if self.hooked:  # computed pairs grouped by expert (host sync: hooks take compacted [P, ...] tensors)
            pairs = aligned.sorted_pair_ids[aligned.sorted_pair_ids < P].long()
            expert_index = inp.topk_ids.reshape(-1).long()[pairs]
        if h is None:
            first(x, weights.w13, a, aligned, weights.b13, scale, x_scale, weights.w13_scale_inv, a_scale)
        else:
            first(x, weights.w13, h, aligned, weights.b13, scale)
            rows = x[pairs // K]
            if config.apply_router_weight_on_input:
                rows = weighted_rows(rows, weight.reshape(-1)[pairs].unsqueeze(1))
            _apply_hook("after_gemm1", hooks.after_gemm1, rows, h, pairs, expert_index)
            kernels.act_and_mul(h, config.intermediate_size, config.activation, config.is_gated, aligned.computed,
                                config.gemm1_alpha, config.gemm1_clamp_limit, out=a, interpreted=kernels.INTERPRETED)
        second(a, weights.w2, o, aligned, weights.b2, None, a_scale, weights.w2_scale_inv)
        if hooks.after_gemm2 is not None:
            _apply_hook("after_gemm2", hooks.after_gemm2, a[pairs], o, pairs, expert_index)
        return reduce(o, aligned.computed, None if config.apply_router_weight_on_input else weight)


# From this many (token, expert) slots per local expert on (N*K over L: the host's bound on the computed pairs,
# known without a sync) the Gluon GEMMs were faster on an H200 (2026-12-02, graph replays, the fp8 step's time
# with triton's kernels over Gluon's): DeepSeek-V3 shard (32 experts, K=8) 0.87x / 0.95x / 1.10x / 1.20x /
# 1.19x at 16 / 64 / 256 / 1024 / 4096 slots per expert; Mixtral (8 experts, K=2) 0.95x / 1.06x / 1.29x /
# 1.20x / 1.33x at the same.
GLUON_MIN_PAIRS_PER_EXPERT = 256


def _prefill_sized(inp: RunnerInput, weights: ExpertWeights) -> bool:
    """Whether a call has GLUON_MIN_PAIRS_PER_EXPERT pairs per local expert as the host knows them
    (RunnerInput.local_pairs, else N*K): _fp8_gemm's size test, which a plan's key holds too."""
    N, K = inp.topk_ids.shape
    pairs = N * K if inp.local_pairs is None else inp.local_pairs
    return pairs >= GLUON_MIN_PAIRS_PER_EXPERT * weights.num_local_experts


def _fp8_gemm(inp: RunnerInput, weights: ExpertWeights, config: MoeConfig, x: torch.Tensor,
              block_config: Optional["kernels.BlockConfig"]) -> str:
    """EP_RUNTIME_TRITON_FP8_GEMM resolved for this call: 'auto' takes the Gluon GEMMs where they can run, for
    bf16 results (their GEMM 2 stores bf16), prefill-sized inputs (GLUON_MIN_PAIRS_PER_EXPERT pairs per local
    expert, as the host knows them: RunnerInput.local_pairs, else N*K; never a receive buffer's padded rows or
    an expert-major buffer's capacity rows, whose real count only the device knows), and nothing chosen for
    triton's kernels (a block_config given, EP_RUNTIME_TRITON_GEMM_KERNEL or _SCHEDULE set); else 'triton'.
    'gluon' where it cannot run is an error naming the knob and why."""
    choice = envs.get("TRITON_FP8_GEMM")
    if choice == "triton":
        return choice
    if choice == "auto":
        if (block_config is not None or inp.capacity_rows or inp.padded_rows or inp.output_dtype != torch.bfloat16
                or not _prefill_sized(inp, weights)
                or envs.get("TRITON_GEMM_KERNEL") != "auto" or envs.get("TRITON_GEMM_SCHEDULE") != "auto"):
            return "triton"
    why = _gluon_unsupported(weights, config, x)
    if why is None:
        return "gluon"
    if choice == "auto":
        return "triton"
    raise ValueError(f"EP_RUNTIME_TRITON_FP8_GEMM='gluon' cannot run here: {why}; allowed here: 'auto', 'triton'")


def _gluon_unsupported(weights: ExpertWeights, config: MoeConfig, x: torch.Tensor) -> Optional[str]:
    """Why the Gluon fp8 step cannot run this layer here (None: it can): what the layer asks first (the same
    answer on any machine), then what this machine can run."""
    H, I, quant = config.hidden_size, config.intermediate_size, weights.quant
    if weights.b13 is not None or weights.b2 is not None:
        return "biases are not supported"
    if config.apply_router_weight_on_input:
        return "apply_router_weight_on_input is not supported"
    if quant.dtype != torch.float8_e4m3fn:
        return f"format={quant.format!r} stores {quant.dtype}; the kernels take float8_e4m3fn"
    if tuple(quant.weight_block) != (gluon_kernels.GROUP,) * 2 or quant.activation_group != gluon_kernels.GROUP:
        return (f"weight_block={tuple(quant.weight_block)} and activation_group={quant.activation_group}: the "
                f"kernels take 128 x 128 weight blocks and 128-channel activation groups")
    if not all(t.is_contiguous() for t in (weights.w13, weights.w2, weights.w13_scale_inv, weights.w2_scale_inv)):
        return "the expert weights and their scales must be contiguous (TMA descriptors over them)"
    return gluon_kernels.unsupported(x, I, H, H, I)


def _gluon_fp8_forward(inp: RunnerInput, weights: ExpertWeights, config: MoeConfig) -> torch.Tensor:
    """fused_forward's fp8 step on the Gluon GEMMs (runners/gluon_kernels.py), where _fp8_gemm takes them:
    align pairs -> GEMM 1's rows in sorted order (each pair's sorted row noted; x quantized there, once a token,
    unless an fp8 dispatch did) -> GEMM 1 with the activation and its fp8 quantization in the epilogue -> GEMM 2
    (rows in sorted order) -> weighted top-k reduction, reading each pair's row through that map. Scratch, kept
    per shape (SCRATCH): rows gathered [S, H] fp8, the activation [S, I] fp8, o [S, H] bf16 (whatever x's
    dtype), pair_rows [P] int32; S the sorted rows (BLOCK_M 128 blocks)."""
    N, K = inp.topk_ids.shape
    H, I, L, quant = config.hidden_size, config.intermediate_size, weights.num_local_experts, weights.quant
    P, device, out_dtype = N * K, inp.hidden_states.device, inp.output_dtype
    block = gluon_kernels.BLOCK_M

    def make():
        aligned = kernels.align_workspace(P, L, block, device)
        S = aligned.sorted_pair_ids.numel()
        return (aligned, torch.empty(S, H, dtype=quant.dtype, device=device),
                torch.empty(S, quant.num_groups(H), dtype=torch.float32, device=device),
                torch.empty(S, I, dtype=quant.dtype, device=device),
                torch.empty(S, quant.num_groups(I), dtype=torch.float32, device=device),
                torch.empty(S, H, dtype=torch.bfloat16, device=device), torch.empty(P, dtype=torch.int32, device=device))

    aligned, a1, s1, a2, s2, o, pair_rows = SCRATCH.get(("gluon fp8", P, L, H, I, config.w13_rows, quant), device, make)
    kernels.align_pairs(inp.topk_ids, inp.expert_mask, 0, L, block, out=aligned, id_table=inp.id_table)
    if P:
        # Row m of GEMM 1 is token sorted_pair_ids[m] // K's; padding rows keep whatever the scratch held (row by
        # row, only their own results see it, and the reduction reads none of them), nor are blocks past the
        # used ones written or read.
        x = inp.hidden_states if inp.hidden_states.stride(1) == 1 else inp.hidden_states.contiguous()
        x_scale = None if inp.hidden_scale is None else _dispatched_scale(inp, quant)
        kernels.sort_rows(x, x_scale, aligned, K, a1, s1, pair_rows, quant)
        gluon_kernels.gemm_act_quant(a1, s1, weights.w13, weights.w13_scale_inv, a2, s2, aligned, config, quant)
        gluon_kernels.gemm_sorted(a2, s2, weights.w2, weights.w2_scale_inv, o, aligned)
    weight = inp.topk_weights.float().contiguous()
    return kernels.topk_reduce(o, aligned.computed, K, weight, config.routed_scaling_factor, out_dtype,
                               pair_rows=pair_rows)


def _scratch(P: int, L: int, block_m: int, H: int, I: int, out_dtype: torch.dtype, quant: Optional[QuantConfig],
             device: torch.device, in_sorted_order: bool, split: int = 1) -> tuple:
    """fused_forward's buffers other than its result: (aligned pairs, GEMM 1's output a [rows, I] (fp8 with
    quant), a's scales [rows, I/group] fp32 or None, GEMM 2's output o [P, H], or its fp32 partial sums
    [split, P, H] when its K loop is split); rows: one per sorted row of the aligned pairs (in_sorted_order)
    or per pair."""
    aligned = kernels.align_workspace(P, L, block_m, device)
    rows = aligned.sorted_pair_ids.numel() if in_sorted_order else P
    a_scale = None if quant is None else torch.empty(rows, quant.num_groups(I), dtype=torch.float32, device=device)
    o = (torch.empty(P, H, dtype=out_dtype, device=device) if split == 1
         else torch.empty(split, P, H, dtype=torch.float32, device=device))
    return (aligned, torch.empty(rows, I, dtype=out_dtype if quant is None else quant.dtype, device=device), a_scale, o)


def _gemm_input(inp: RunnerInput, quant: Optional[QuantConfig], interp: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional["RowQuantization"]]:
    """(rows, their fp32 scales or None, their quantization still to launch or None) as GEMM 1 reads
    them: fp8 experts take fp8 rows (quantized by the fused kernel, which the alignment launches with
    its own work, unless an fp8 dispatch already did); unquantized experts take float rows (fp8
    dispatch rows dequantized first)."""
    x = inp.hidden_states
    if inp.hidden_scale is None:
        if quant is None:
            return x.contiguous(), None, None
        rows = plan_rows(x, quant, interpreted=interp)
        return rows.q, rows.scale, rows
    if quant is None:
        return QuantConfig().dequantize_activation(x, inp.hidden_scale).to(inp.output_dtype), None, None
    return x, _dispatched_scale(inp, quant), None


def _dispatched_scale(inp: RunnerInput, quant: QuantConfig) -> torch.Tensor:
    """An fp8 dispatch's row scales as fp32 [N, G], checked against the experts' activation groups."""
    scale, H = decode_scales(inp.hidden_scale), inp.hidden_states.shape[-1]
    if scale.shape[-1] != quant.num_groups(H):
        raise ValueError(f"hidden_scale has {scale.shape[-1]} groups per row; the experts' {quant.format} needs "
                         f"{quant.num_groups(H)} (activation_group={quant.activation_group})")
    return scale


@functools.lru_cache(maxsize=256)  # per fp8 call; three checked dataclass rebuilds were ~3 us of host time
def _fit_k_tiles(block_config: "kernels.BlockConfig", group_k: int, untuned: bool) -> "kernels.BlockConfig":
    """BLOCK_K no larger than a scale group (one activation and one weight scale per K step); for tiles
    not tuned for this fp8 shape (defaults, or a bf16 "default" entry) exactly one group: 128 one-byte
    values are the bytes of a 64-wide bf16 tile. `triton_tune --dtype float8_e4m3fn` tunes fp8 shapes."""
    fit = lambda t: dataclasses.replace(t, BLOCK_K=group_k if untuned else min(t.BLOCK_K, group_k))  # noqa: E731
    return dataclasses.replace(block_config, gemm1=fit(block_config.gemm1), gemm2=fit(block_config.gemm2))


def _runnable(block_config: "kernels.BlockConfig", weights: ExpertWeights, interp: bool) -> "kernels.BlockConfig":
    """A tuned table's TMA GEMM runs as "portable" where these weights or this GPU cannot take TMA
    (e.g. a strided weight view): the table's choice is a speed hint, the forced kernel an order."""
    def fit(tiles, w):
        if tiles.kernel in kernels.TMA_KERNELS and kernels.tma_unsupported(w, interp) is not None:
            return dataclasses.replace(tiles, kernel="portable")
        return tiles
    gemm1, gemm2 = fit(block_config.gemm1, weights.w13), fit(block_config.gemm2, weights.w2)
    if gemm1 is block_config.gemm1 and gemm2 is block_config.gemm2:
        return block_config  # (the common case: no new config object per call)
    return dataclasses.replace(block_config, gemm1=gemm1, gemm2=gemm2)


def _apply_hook(name, hook, inputs, outputs, pairs, expert_index) -> None:
    selected = outputs[pairs]
    replaced = call_hook(name, hook, inputs, selected, expert_index)
    if replaced is not selected:
        outputs[pairs] = replaced.to(outputs.dtype)


class _FusedExperts(torch.autograd.Function):
    """Forward: the triton kernels. Backward: recompute with the torch runner and back-propagate."""

    @staticmethod
    def forward(ctx, x, topk_weights, w13, w2, b13, b2, ids, mask, config, hooks, block_config):
        ctx.save_for_backward(x, topk_weights, w13, w2, b13, b2, ids, mask)
        ctx.config, ctx.hooks = config, hooks
        return fused_forward(RunnerInput(x, ids, topk_weights, mask), ExpertWeights(w13, w2, b13, b2), config,
                             hooks, block_config)

    @staticmethod
    def backward(ctx, grad_y):
        from .torch_runner import TorchRunner
        *inputs, ids, mask = ctx.saved_tensors

        def recompute(x, topk_weights, w13, w2, b13, b2):
            # (run_checked: the forward checked these; run() would check the ids again, a device assert per step)
            return TorchRunner(ctx.config, ctx.hooks).run_checked(RunnerInput(x, ids, topk_weights, mask),
                                                                  ExpertWeights(w13, w2, b13, b2))

        hooked = ctx.hooks.after_gemm1 is not None or ctx.hooks.after_gemm2 is not None
        grads = recompute_backward(recompute, inputs, ctx.needs_input_grad[:6], grad_y, into_every_leaf=hooked)
        return (*grads, None, None, None, None, None)


def run_fused(inp: RunnerInput, weights: ExpertWeights, config: MoeConfig, hooks: Optional[GemmHooks] = None,
              block_config: Optional["kernels.BlockConfig"] = None) -> torch.Tensor:
    """fused_forward with autograd when any input needs a gradient. With GEMM hooks and none: the torch
    runner's forward (what the backward recomputes), since parameters a hook owns (LoRA adapters on frozen
    experts and tokens) may need one, and autograd sees them only where the hooks run with it enabled."""
    tensors = (inp.hidden_states, inp.topk_weights, weights.w13, weights.w2, weights.b13, weights.b2)
    hooked = hooks is not None and (hooks.after_gemm1 is not None or hooks.after_gemm2 is not None)
    grad = needs_grad(*tensors)
    if hooked and torch.is_grad_enabled() and not grad and not weights.quantized:
        from .torch_runner import TorchRunner
        return TorchRunner(config, hooks).run_checked(inp, weights)  # (both callers checked the weights)
    if grad:
        if weights.quantized or inp.hidden_scale is not None:
            raise RuntimeError(INFERENCE_ONLY)
        inp = inp.routed()  # the backward's torch recompute reads the ids as they are
        return _FusedExperts.apply(*tensors, inp.topk_ids, inp.expert_mask, config, hooks or _NO_HOOKS, block_config)
    return fused_forward(inp, weights, config, hooks, block_config)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, *, b13: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                  activation: str = "silu", is_gated: bool = True, gemm1_alpha: Optional[float] = None,
                  gemm1_clamp_limit: Optional[float] = None, routed_scaling_factor: float = 1.0,
                  apply_router_weight_on_input: bool = False, first_expert: int = 0,
                  hooks: Optional[GemmHooks] = None, block_config: Optional["kernels.BlockConfig"] = None,
                  w13_scale_inv: Optional[torch.Tensor] = None, w2_scale_inv: Optional[torch.Tensor] = None,
                  quant: Optional[Union[str, QuantConfig]] = None) -> torch.Tensor:
    """Functional fused MoE on one device: x [T, H]; w13 [L, 2I, H] ([gate; up]) or [L, I, H] when not
    gated; w2 [L, H, I]; topk_ids [T, K] int, -1 = no expert (below -1: an error on CPU), ids outside [first_expert, first_expert+L)
    are skipped (another rank's experts); topk_weights [T, K]; b13 [L, 2I or I] and b2 [L, H] optional (both or neither).
    fp8 experts: w13/w2 float8_e4m3fn with w13_scale_inv [L, ceil(2I/128), ceil(H/128)] and
    w2_scale_inv [L, ceil(H/128), ceil(I/128)] fp32 (quant: an ep.QuantConfig or a format's name, default
    ep.QuantConfig()); x stays float
    and is quantized per token and 128 channels inside (w8a8), inference only.
    Returns [T, H] in x's dtype: routed_scaling_factor * sum_k w_k * expert_{id_k}(x). Differentiable
    (unquantized experts). Scale values (finite, > 0) are checked as load_experts checks them on CPU only: on
    CUDA the read would cost a host sync per call, so check them once where the weights are loaded."""
    if kernels is None:
        raise RuntimeError(f"fused_experts needs triton: {_IMPORT_ERROR}")
    if not is_int_at_least(first_expert, 0):  # -1 would make every -1 slot expert 0's; 1.5 would round ids
        raise ValueError(f"first_expert={first_expert!r}; allowed: an int >= 0 (the global id of w13[0])")
    hooks = check_hooks(hooks)
    _check_block_config(block_config)
    quant = as_quant_config("quant", quant)  # (a format's name, as load_experts' quantize takes it)
    for name, t in (("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} has shape {shape}; expected [L, 2I or I, H] (w13) and [L, H, I] (w2)")
    L, w13_rows, H = w13.shape
    # I from w13 (checked to be even when gated): a w2 of the wrong width is then named as w2
    intermediate = w13_rows // 2 if is_gated else w13_rows
    check_hidden_states(x, H, name="x")
    check_topk(topk_ids, topk_weights, x.shape[0], L, None, x.device, values=False)
    check_ids_not_below_minus_one(topk_ids, "global ids; those outside [first_expert, first_expert + L) are skipped")
    for name, t in (("w13", w13), ("w2", w2), ("b13", b13), ("b2", b2), ("w13_scale_inv", w13_scale_inv),
                    ("w2_scale_inv", w2_scale_inv)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}; expected {x.device} (the device of x)")
    # top_k may exceed L: a token's other experts live on other ranks (skipped). The runner never reads
    # config.num_experts; it only has to admit top_k.
    config = MoeConfig(max(L, topk_ids.shape[1]), topk_ids.shape[1], H, intermediate, activation=activation,
                       is_gated=is_gated, has_bias=b13 is not None, gemm1_alpha=gemm1_alpha,
                       gemm1_clamp_limit=gemm1_clamp_limit, routed_scaling_factor=routed_scaling_factor,
                       apply_router_weight_on_input=apply_router_weight_on_input)
    if (b13 is None) != (b2 is None):  # (else named as "missing" by a config the caller never made)
        given, missing = ("b13", "b2") if b2 is None else ("b2", "b13")
        raise ValueError(f"{given} was given without {missing}; fused_experts takes both biases or neither (b13 "
                         f"[L, 2I or I], b2 [L, H]: pass zeros for the one a model lacks)")
    if quant is None and (w13_scale_inv is not None or w2_scale_inv is not None):
        quant = QuantConfig()
    weights = ExpertWeights(w13, w2, b13, b2, w13_scale_inv, w2_scale_inv, quant)
    check_expert_dtypes(weights, x.dtype, "x")
    weights.check(config, L, values=x.device.type == "cpu")  # (CPU: no sync to save; see the docstring)
    # The runner core's input: local ids whose mapping (the alignment kernels do it) sends every id outside
    # [0, L), -1 included, to the sink L (masked out); shifted by first_expert in int64 (never wrapped),
    # else as given (int32 and int64 ids are read as they are: no conversion kernel at decode sizes).
    local_ids = topk_ids.long() - first_expert if first_expert else topk_ids
    inp = RunnerInput.from_local_ids(x, local_ids, topk_weights, ExpertPlacement(L), defer=True)
    return run_fused(inp, weights, config, hooks, block_config)


@register
class TritonRunner(TritonBackend):
    """Fused Triton kernels; every MoeConfig field is supported, and both GEMM hooks."""

    name = "triton"
    layouts = (RunnerInput,)
    reads_id_table = True  # the alignment kernels map the ids
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    import_error = _IMPORT_ERROR

    def __init__(self, config: MoeConfig, hooks: Optional[GemmHooks] = None,
                 block_config: Optional["kernels.BlockConfig"] = None):
        super().__init__(config, hooks)
        if config.activation not in kernels.ACTIVATION_CODES:
            raise ValueError(f"runner='triton' does not implement activation={config.activation!r}; "
                             f"supported: {', '.join(kernels.ACTIVATION_CODES)}")
        _check_block_config(block_config)
        self.block_config = block_config

    @classmethod
    def refusal(cls, hooks: GemmHooks, quant: Optional[QuantConfig]) -> str:
        return _NO_FP8_HOOKS if quant is not None and (hooks.after_gemm1 is not None
                                                       or hooks.after_gemm2 is not None) else ""

    def compute(self, inp: RunnerInput, weights: ExpertWeights) -> torch.Tensor:
        return run_fused(inp, weights, self.config, self.hooks, self.block_config)
