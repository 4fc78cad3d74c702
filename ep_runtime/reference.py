"""The float64 single-process reference every test and the demo compare against:
    y_t = routed_scaling_factor * sum_k w_tk * expert_{id_tk}(x_t)      (id -1 adds nothing)
Written independently of the runners (no shared helpers), so a bug in one does not hide in both."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import MoeConfig


def _activation(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "silu":
        return h / (1 + torch.exp(-h))
    if name == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
    inner = math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)
    return 0.5 * h * (1 + torch.tanh(inner))


def fp8_round_trip(v: torch.Tensor, group: int = 128, ue8m0: bool = False) -> torch.Tensor:
    """Rows v [P, C] float64 rounded through float8_e4m3fn with one scale per row and `group` channels
    (scale = amax / 448, kept in float64; ue8m0: the next power of two up): what w8a8 fp8 kernels feed
    their GEMMs."""
    P, C = v.shape
    G = -(-C // group)
    padded = torch.zeros(P, G * group, dtype=torch.float64, device=v.device)
    padded[:, :C] = v
    groups = padded.view(P, G, group)
    scale = groups.abs().amax(dim=2, keepdim=True).clamp(min=1e-10) / 448.0
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (groups / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float64)
    return (q * scale).view(P, G * group)[:, :C]


def expert_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, config: MoeConfig,
                     b13: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                     fp8_activations: bool = False) -> torch.Tensor:
    """One expert on rows x [P, H]: w13 [2I or I, H], w2 [H, I] -> [P, H]. fp8_activations: the
    intermediate activation is rounded through fp8 before w2 (w8a8; the caller rounds x)."""
    h = torch.einsum("ph,oh->po", x, w13)
    if b13 is not None:
        h = h + b13
    I = config.intermediate_size
    if not config.is_gated:
        a = _activation(h, config.activation)
    else:
        gate, up = h[:, :I], h[:, I:]
        if config.gemm1_clamp_limit is not None:
            limit = config.gemm1_clamp_limit
            gate = torch.minimum(gate, torch.full_like(gate, limit))
            up = torch.maximum(torch.minimum(up, torch.full_like(up, limit)), torch.full_like(up, -limit))
        if config.gemm1_alpha is not None:
            a = gate / (1 + torch.exp(-config.gemm1_alpha * gate)) * (up + 1)
        else:
            a = _activation(gate, config.activation) * up
    if fp8_activations:
        a = fp8_round_trip(a)
    out = torch.einsum("pi,hi->ph", a, w2)
    return out + b2 if b2 is not None else out


def moe_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  w13: torch.Tensor, w2: torch.Tensor, config: MoeConfig,
                  b13: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                  fp8_activations: bool = False, fp8_input: Optional[bool] = None) -> torch.Tensor:
    """Global-weight reference in float64: x [T, H], ids [T, K] global (-1 = nothing), weights [T, K],
    w13 [E, 2I or I, H], w2 [E, H, I]. Differentiable (float64 autograd). fp8_activations: each
    expert's input rows and intermediate activation are rounded through fp8 per row and 128 channels
    (fp8_round_trip), as w8a8 kernels compute; pass the dequantized fp8 weights. fp8_input=False: x is
    already rounded (e.g. with ue8m0 scales by an fp8 dispatch); only the activation is rounded here."""
    f64 = lambda t: None if t is None else t.to(device=x.device, dtype=torch.float64)  # noqa: E731
    topk_ids = topk_ids.to(x.device)
    x, topk_weights, w13, w2, b13, b2 = map(f64, (x, topk_weights, w13, w2, b13, b2))
    if fp8_activations if fp8_input is None else fp8_input:
        x = fp8_round_trip(x)
    T, K = topk_ids.shape
    y = torch.zeros(T, x.shape[1], dtype=torch.float64, device=x.device)
    for e in range(config.num_experts):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        w = topk_weights[token, slot].unsqueeze(1)
        inputs = x[token] * w if config.apply_router_weight_on_input else x[token]
        out = expert_reference(inputs, w13[e], w2[e], config,
                               None if b13 is None else b13[e], None if b2 is None else b2[e], fp8_activations)
        contribution = out if config.apply_router_weight_on_input else out * w
        y = y.index_add(0, token, contribution)
    return y * config.routed_scaling_factor


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; the absolute norm when expected is all zero."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    if diff != diff:
        return float("inf")
    return diff / scale if scale > 0 else diff
