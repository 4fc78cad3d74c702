"""The reference runner: plain PyTorch on CPU and GPU, full autograd (torch._grouped_mm on CUDA bf16).

Quantized experts (fp8 block weights) run as the fp8 kernels compute them, in fp32 from dequantized
tensors: the expert input and the intermediate activation are rounded to fp8 per token and 128
channels (w8a8), the weights are dequantized blockwise. fp8 rows from an fp8 dispatch are
dequantized; with unquantized weights the layer then computes in the tokens' dtype."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.quant import QuantConfig
from ep_runtime.runner_core import RunnerInput, weighted_rows

from . import register
from .base import RunnerBackend, call_hook, untraced


def activate(h: torch.Tensor, config: MoeConfig) -> torch.Tensor:
    """[P, w13_rows] -> [P, I]: the activation (and the gate multiply when gated)."""
    if not config.is_gated:
        return _act(h, config.activation)
    gate, up = h.split(config.intermediate_size, dim=-1)
    limit = config.gemm1_clamp_limit
    if limit is not None:  # gpt-oss's and DeepSeek-V4's clamped SwiGLU
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    if config.gemm1_alpha is not None:  # gpt-oss SwiGLU
        return gate * torch.sigmoid(config.gemm1_alpha * gate) * (up + 1)
    return _act(gate, config.activation) * up


def _act(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return F.silu(h)
    return F.gelu(h, approximate="tanh" if name == "gelu_tanh" else "none")


@register
class TorchRunner(RunnerBackend):
    name = "torch"
    layouts = (RunnerInput,)

    def compute(self, inp: RunnerInput, weights: ExpertWeights) -> torch.Tensor:
        if weights.quant is None:
            return self._compute(inp, weights)
        # fp8 experts: the w8a8 math in fp32 whatever autocast says (its bf16 GEMMs would round the
        # dequantized operands and GEMM 1's output before the activation's fp8 rounding)
        with torch.autocast(inp.hidden_states.device.type, enabled=False):
            return self._compute(inp, weights)

    def _compute(self, inp: RunnerInput, weights: ExpertWeights) -> torch.Tensor:
        pairs = inp.pairs_by_expert("runner='torch'")  # first: it refuses a graph capture before any work
        cfg = self.config
        quant = weights.quant
        x = activation_input(inp, quant)
        w13, w2, b13, b2 = weights.w13, weights.w2, weights.b13, weights.b2
        if quant is not None:
            w13 = quant.dequantize_weight(w13, weights.w13_scale_inv)
            w2 = quant.dequantize_weight(w2, weights.w2_scale_inv)
            b13, b2 = (None if b is None else b.float() for b in (b13, b2))
        token, expert, weight, counts = pairs.token, pairs.expert, pairs.weight, pairs.counts

        rows = x[token]
        if cfg.apply_router_weight_on_input:
            rows = weighted_rows(rows, weight.unsqueeze(1))
        # Each GEMM's loop is its own untraced function, called from this frame (the graph break is here): one
        # helper around both loops broke inside itself, so dynamo compiled that helper as a frame, for w13's
        # shapes and again for w2's in a compiled layer's first call (error_on_recompile raised there).
        h = _grouped_mm(rows, w13, counts) if _grouped_mm_takes(rows, w13) else _gemm1_per_expert(rows, w13, counts)
        h = call_hook("after_gemm1", self.hooks.after_gemm1, rows, _plus_bias(h, b13, expert), expert)
        a = activate(h, cfg)
        if quant is not None:  # GEMM 2's input is rounded to fp8 as the w8a8 kernels' epilogues round it
            a = quant.dequantize_activation(*quant.quantize_activation(a, reciprocal=True))
        o = _grouped_mm(a, w2, counts) if _grouped_mm_takes(a, w2) else _gemm2_per_expert(a, w2, counts)
        o = call_hook("after_gemm2", self.hooks.after_gemm2, a, _plus_bias(o, b2, expert), expert)

        acc = torch.promote_types(inp.output_dtype, torch.float32)
        o = o.to(acc)
        if not cfg.apply_router_weight_on_input:
            o = o * weight.unsqueeze(1).to(acc)
        # (the token count read here, not kept in an int across the GEMMs' graph breaks: the frame after them
        # took it as a constant of the first call's routing, and compiled again when the received rows changed)
        y = pairs.sum_per_token(o, *inp.topk_ids.shape)
        if cfg.routed_scaling_factor != 1.0:
            y = y * cfg.routed_scaling_factor
        return y.to(inp.output_dtype)


def activation_input(inp: RunnerInput, quant: Optional[QuantConfig]) -> torch.Tensor:
    """The expert input as this runner computes it: fp8 rows dequantized (fp32 with quantized weights,
    else the tokens' dtype); float rows rounded through fp8 when the weights are quantized (w8a8)."""
    x = inp.hidden_states
    if inp.hidden_scale is not None:  # (the default QuantConfig built only here: ~4 us of host time a call)
        x = (quant or QuantConfig()).dequantize_activation(x, inp.hidden_scale)
        return x if quant is not None else x.to(inp.output_dtype)
    if quant is not None:
        return quant.dequantize_activation(*quant.quantize_activation(x))
    return x


def _grouped_mm_takes(rows: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes rows [P, in] @ w[e]^T (w [L, out, in]): CUDA bf16 rows, at least one,
    every stride but the unit one, and both bases, 16-byte aligned (it raises "strides should be multiple of
    16 bytes" otherwise, e.g. for H or I not a multiple of 8 in bf16; the per-expert loop serves those), out
    included.
    Under torch.compile the bases are not read: dynamo cannot trace data_ptr() % 16 (it gave up on the
    runner's frame there and ran the rest eagerly), and the rows are tensors the graph allocates, the
    weights parameters the allocator placed (aligned: inductor assumes as much of every tensor)."""
    if not (rows.is_cuda and rows.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and rows.shape[0] > 0):
        return False
    size = rows.element_size()
    strides = (*rows.stride(), *w.stride(), w.shape[1])  # (w.shape[1]: the output's row stride)
    return (all(s == 1 or (s * size) % 16 == 0 for s in strides)
            and (torch.compiler.is_compiling() or rows.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0))


def _grouped_mm(rows: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows [P, in] grouped by expert (counts [L] rows each) -> [P, out]: the rows of expert e times w[e]^T."""
    return torch._grouped_mm(rows, w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))


def _plus_bias(out: torch.Tensor, b: Optional[torch.Tensor], expert: torch.Tensor) -> torch.Tensor:
    return out if b is None else out + b[expert]


def _per_expert(rows: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """_grouped_mm as a loop: one matmul per expert with rows (counts read on the host)."""
    pieces = []
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            pieces.append(rows[start:start + count] @ w[e].t())
            start += count
    return torch.cat(pieces) if pieces else rows[:0] @ w[0].t()  # keeps the autograd graph


# Untraced (traced, dynamo would guard on every expert's count: a compiled layer compiled again at each routing),
# one wrapper per GEMM: dynamo compiles a wrapper's frame once per shape, and a wrapper shared by GEMM 1 and 2
# compiled again for GEMM 2's shapes in a compiled layer's first call. Their output [P, out] enters the traced
# code marked dynamic, as the pairs do (untraced's dynamic_rows).
_gemm1_per_expert = untraced(_per_expert, "gemm1_per_expert", dynamic_rows=lambda out: (out,))
_gemm2_per_expert = untraced(_per_expert, "gemm2_per_expert", dynamic_rows=lambda out: (out,))
