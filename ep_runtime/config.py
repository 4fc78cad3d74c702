"""Runner configuration and expert weights: what the experts compute, kept apart from the tensors."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ep_runtime.quant import QuantConfig, check_scale_tensor
from ep_runtime.validation import check_routed_scaling_factor, finite_float, is_bool, is_int_at_least

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class MoeConfig:
    """Shape and math of one MoE layer's experts.

    num_experts E, top_k K, hidden_size H, intermediate_size I.
    Expert e computes  w2[e] @ act(gate @ x) * (up @ x)  (gated; w13 = [gate; up], 2I rows) or
    w2[e] @ act(w1 @ x) (not gated; w13 has I rows).
    gemm1_alpha / gemm1_clamp_limit select gpt-oss's SwiGLU (gated silu only):
        gate = min(gate, limit); up = clamp(up, -limit, limit); h = gate * sigmoid(alpha * gate) * (up + 1).
    gemm1_clamp_limit alone clamps the same way before a gated activation (DeepSeek-V4's SwiGLU):
        gate = min(gate, limit); up = clamp(up, -limit, limit); h = act(gate) * up.
    routed_scaling_factor multiplies the layer output (DeepSeek); apply_router_weight_on_input
    multiplies each (token, expert) input by its weight instead of the output (Llama 4).
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    is_gated: bool = True
    has_bias: bool = False
    gemm1_alpha: Optional[float] = None
    gemm1_clamp_limit: Optional[float] = None
    routed_scaling_factor: float = 1.0
    apply_router_weight_on_input: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not is_int_at_least(value, 1):
                raise ValueError(f"{name}={value!r} must be an int >= 1")
            object.__setattr__(self, name, int(value))  # numpy ints become plain ints
        for name in ("is_gated", "has_bias", "apply_router_weight_on_input"):
            value = getattr(self, name)
            if not is_bool(value):  # a config file's "False" is truthy: a gated layer, weights on the input
                raise TypeError(f"{name}={value!r}; allowed: True or False")
            object.__setattr__(self, name, bool(value))  # numpy's bool becomes a plain bool
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if self.gemm1_alpha is not None and not (self.is_gated and self.activation == "silu"):
            raise ValueError("gemm1_alpha (gpt-oss SwiGLU) needs is_gated=True and activation='silu'; "
                             f"got is_gated={self.is_gated}, activation={self.activation!r}")
        if self.gemm1_clamp_limit is not None and not self.is_gated:
            raise ValueError(f"gemm1_clamp_limit={self.gemm1_clamp_limit} clamps gate and up: it needs is_gated=True")
        if self.gemm1_alpha is not None:
            object.__setattr__(self, "gemm1_alpha", finite_float("gemm1_alpha", self.gemm1_alpha))
        if self.gemm1_clamp_limit is not None:
            limit = self.gemm1_clamp_limit  # (a str failed on '>' naming nothing; True and tensors passed as they were)
            if not isinstance(limit, numbers.Real) or isinstance(limit, bool) or not limit > 0:
                raise ValueError(f"gemm1_clamp_limit={limit!r} must be a number > 0 (inf: no clamp)")
            object.__setattr__(self, "gemm1_clamp_limit", float(limit))
        object.__setattr__(self, "routed_scaling_factor", check_routed_scaling_factor(self.routed_scaling_factor))

    @property
    def w13_rows(self) -> int:
        """Rows of one expert's first matrix: 2I when gated ([gate; up]), I otherwise."""
        return 2 * self.intermediate_size if self.is_gated else self.intermediate_size


@dataclass
class ExpertWeights:
    """Weights of the experts one rank computes (QuantInfo-style: the tensors and their scales).

    w13 [L, 2I, H] (gated, gate rows then up rows) or [L, I, H]; w2 [L, H, I];
    b13 [L, 2I] / [L, I] and b2 [L, H] when the config has biases (EPMoE.gather_experts returns
    every expert: E in place of L).
    Quantized (quant set): w13/w2 in quant's dtype (float8_e4m3fn) with w13_scale_inv
    [L, ceil(2I/128), ceil(H/128)] and w2_scale_inv [L, ceil(H/128), ceil(I/128)] fp32 (DeepSeek-V3's
    layout: w = q * scale_inv per [128, 128] block); biases stay in the layer's dtype.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    b13: Optional[torch.Tensor] = None
    b2: Optional[torch.Tensor] = None
    w13_scale_inv: Optional[torch.Tensor] = None
    w2_scale_inv: Optional[torch.Tensor] = None
    quant: Optional[QuantConfig] = None

    @property
    def num_local_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def check(self, config: MoeConfig, num_local_experts: int, values: bool = False) -> None:
        """Raise naming the tensor when a shape (or, quantized, a dtype or scale) does not match the config.
        values: also read the scales (finite, > 0; one host read, done when weights are loaded)."""
        L, H, I = num_local_experts, config.hidden_size, config.intermediate_size
        expected = {"w13": (L, config.w13_rows, H), "w2": (L, H, I)}
        if config.has_bias:
            expected.update(b13=(L, config.w13_rows), b2=(L, H))
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is None and name in ("b13", "b2"):  # (w13 / w2 None: named by the type check below)
                raise ValueError(f"{name} is missing; the config has has_bias=True so it needs shape {list(shape)}")
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():  # an int tensor was cast
                what = f"dtype {tensor.dtype}" if isinstance(tensor, torch.Tensor) else f"type {type(tensor).__name__}"
                raise TypeError(f"{name} has {what}; expected a floating torch.Tensor")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {list(tensor.shape)}; expected {list(shape)}")
        if not config.has_bias and (self.b13 is not None or self.b2 is not None):
            raise ValueError("biases were given but the config has has_bias=False")
        if self.quant is None:
            for name in ("w13_scale_inv", "w2_scale_inv"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} was given but quant is None (unquantized weights take no scales)")
            return
        for name in ("w13", "w2"):
            tensor, scale_name = getattr(self, name), f"{name}_scale_inv"
            if tensor.dtype != self.quant.dtype:
                raise ValueError(f"{name} has dtype {tensor.dtype}; quant format {self.quant.format!r} stores "
                                 f"{self.quant.dtype}")
            check_scale_tensor(scale_name, getattr(self, scale_name), self.quant.weight_scale_shape(*tensor.shape),
                               values=values)
