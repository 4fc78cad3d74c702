"""fp8 dispatch rows: each token quantized on the sender and sent as bytes with its scales.

A wire row is [H fp8 values | pad to 16 bytes | G scales | pad to 16 bytes], G = ceil(H / 128): fp32
scales (4 bytes each), or UE8M0 exponent bytes (1 byte each) under scale_encoding="ue8m0". The rows
are plain uint8 to the exchange (rank_exchange moves and lays them out like any other rows, never
adding them), and the receiver takes the values and the scales as two strided views of the same
bytes: no copy, no decode. H bf16 = 2H bytes per row becomes H + 4G (fp32 scales, 0.52x) or H + G.

Where the exchange kernels run (CUDA), the packing kernel writes these rows itself, quantizing each
token as it reads it (exchange_kernels.pack_payload); encode is the torch path of the same bytes.
"""
from __future__ import annotations

from typing import Optional

import torch

from ep_runtime import envs
from ep_runtime.quant import INFERENCE_ONLY, SCALE_ENCODINGS, QuantConfig, encode_ue8m0
from ep_runtime.runner_core import needs_grad

_ALIGN = 16


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def row_layout(hidden: int, quant: QuantConfig) -> tuple[int, int, int]:
    """(bytes per wire row, byte offset of the scales, scale itemsize)."""
    itemsize = 1 if quant.ue8m0 else 4
    offset = _up(hidden)
    return _up(offset + quant.num_groups(hidden) * itemsize), offset, itemsize


def resolve(use_fp8: Optional[bool], scale_encoding: Optional[str]) -> tuple[bool, str]:
    """A dispatcher's fp8 options: the arguments, else EP_RUNTIME_DISPATCH_FP8 /
    EP_RUNTIME_DISPATCH_FP8_SCALE_ENCODING; errors name the argument and what is allowed."""
    use = envs.get("DISPATCH_FP8") if use_fp8 is None else use_fp8
    if not isinstance(use, bool):
        raise ValueError(f"use_fp8={use_fp8!r}; allowed: None (EP_RUNTIME_DISPATCH_FP8), True or False")
    encoding = envs.get("DISPATCH_FP8_SCALE_ENCODING") if scale_encoding is None else scale_encoding
    if encoding not in SCALE_ENCODINGS:
        raise ValueError(f"fp8_scale_encoding={scale_encoding!r}; allowed: None (EP_RUNTIME_DISPATCH_FP8_SCALE_ENCODING), "
                         f"{', '.join(SCALE_ENCODINGS)}")
    return use, encoding


def check_inference(x: torch.Tensor, topk_weights: Optional[torch.Tensor] = None) -> None:
    """fp8 dispatch defines no gradient: raise before any collective when x (or topk_weights) needs one."""
    if needs_grad(x, topk_weights):
        raise RuntimeError(f"use_fp8=True dispatch (the argument, or EP_RUNTIME_DISPATCH_FP8=1 where it is None): "
                           f"{INFERENCE_ONLY}")


def encode(x: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """x [T, H] float -> wire rows [T, W] uint8 with torch ops (QuantConfig.quantize_activation): the
    path where the exchange kernels do not run (CPU ranks, autograd). On the kernel path the packing
    kernel quantizes each row as it packs it (exchange_kernels.pack_payload), bit for bit the same."""
    check_inference(x)
    T, H = x.shape
    rows = torch.empty(T, row_layout(H, quant)[0], dtype=torch.uint8, device=x.device)
    q, scale = views(rows, H, quant)
    q_ref, scale_ref = quant.quantize_activation(x)
    q.copy_(q_ref)
    scale.copy_(encode_ue8m0(scale_ref) if quant.ue8m0 else scale_ref)
    return rows


def views(rows: torch.Tensor, hidden: int, quant: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Wire rows [..., W] uint8 (any leading dims, row-strided) -> (values [..., H] fp8, scales [..., G]
    fp32, or uint8 exponent bytes under ue8m0): views of the same bytes."""
    _, offset, itemsize = row_layout(hidden, quant)
    G = quant.num_groups(hidden)
    values = rows[..., :hidden].view(quant.dtype)
    scales = rows[..., offset:offset + G * itemsize]
    return values, scales if quant.ue8m0 else scales.view(torch.float32)
