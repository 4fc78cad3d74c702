"""Quantization: one config (QuantConfig) for the expert weights' format with their block scales and the
activations' per-token group scales, plus the torch reference of every conversion.

fp8_block (DeepSeek-V3's format): weights float8_e4m3fn with one scale per [128, 128] block of each
expert matrix (checkpoint name `*_scale_inv`: the dequantization multiplier, w = q * scale_inv);
activations float8_e4m3fn with one scale per token and 128 channels ([T, ceil(H/128)] fp32). Scale
encoding "fp32" keeps amax / 448; "ue8m0" rounds every scale up to a power of two (what DeepGEMM on
Blackwell consumes), and dispatch payloads then carry each activation scale as its one exponent byte.

A format is a registry entry (register_format), so later formats (MXFP8, NVFP4) add an entry and
keep this API. fp8 is inference-only: the layer raises under autograd (no straight-through gradient
is defined).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .registry import add_once
from .validation import is_int_at_least, is_power_of_two_at_least


@dataclass(frozen=True)
class QuantFormat:
    """What a format stores: element dtype and its largest finite value (the scale maps a block's
    amax there)."""

    name: str
    dtype: torch.dtype
    max_value: float
    doc: str


_FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> None:
    add_once(_FORMATS, fmt.name, fmt, f"quantization format {fmt.name!r}")


register_format(QuantFormat("fp8_block", torch.float8_e4m3fn, 448.0,
                            "float8_e4m3fn weights with [128, 128] block scales, activations per token and 128 "
                            "channels"))

SCALE_ENCODINGS = ("fp32", "ue8m0")
INFERENCE_ONLY = ("quantized (fp8) experts and fp8 dispatch are inference-only: no gradient is defined through "
                  "fp8 rounding. Run under torch.no_grad() / torch.inference_mode() (or detach the inputs); train "
                  "with unquantized experts and use_fp8=False")
FP8_DTYPES = (torch.float8_e4m3fn,)
# Scales derive from amax / max_value; an all-zero group gets this amax so its scale stays a normal
# fp32 (and a power of two >= 2^-126 under ue8m0) instead of 0.
MIN_AMAX = 1e-10


@dataclass(frozen=True)
class QuantConfig:
    """format: a registered format (fp8_block). weight_block: [rows, cols] of one weight scale block
    (DeepSeek-V3: [128, 128]). activation_group: channels per activation scale; it must equal
    weight_block[1], because the GEMMs multiply one activation scale by one weight scale per K group.
    scale_encoding: fp32 (amax / 448) or ue8m0 (rounded up to a power of two)."""

    format: str = "fp8_block"
    weight_block: tuple[int, int] = (128, 128)
    activation_group: int = 128
    scale_encoding: str = "fp32"

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or self.format not in _FORMATS:  # (a list is no name: not "unhashable")
            raise ValueError(f"format={self.format!r}; allowed: {', '.join(_FORMATS)}")
        block = tuple(self.weight_block) if isinstance(self.weight_block, (tuple, list)) else None
        if block is None or len(block) != 2 or not all(is_power_of_two_at_least(b, 16) for b in block):
            raise ValueError(f"weight_block={self.weight_block!r}; allowed: two powers of two >= 16, e.g. (128, 128)")
        block = tuple(int(b) for b in block)  # numpy ints become plain ints
        object.__setattr__(self, "weight_block", block)
        if not is_int_at_least(self.activation_group, 1) or self.activation_group != block[1]:
            raise ValueError(f"activation_group={self.activation_group!r} must equal weight_block[1]={block[1]} "
                             f"(one activation scale and one weight scale per K group)")
        object.__setattr__(self, "activation_group", block[1])
        if self.scale_encoding not in SCALE_ENCODINGS:
            raise ValueError(f"scale_encoding={self.scale_encoding!r}; allowed: {', '.join(SCALE_ENCODINGS)}")

    @property
    def spec(self) -> QuantFormat:
        return _FORMATS[self.format]

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    @property
    def ue8m0(self) -> bool:
        return self.scale_encoding == "ue8m0"

    def weight_scale_shape(self, num_experts: int, rows: int, cols: int) -> tuple[int, int, int]:
        """[E, ceil(rows / block rows), ceil(cols / block cols)]: DeepSeek-V3's scale_inv layout."""
        return (num_experts, -(-rows // self.weight_block[0]), -(-cols // self.weight_block[1]))

    def num_groups(self, channels: int) -> int:
        return -(-channels // self.activation_group)

    # ------------------------------------------------------------------ torch conversions (reference)

    def quantize_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w [E, N, K] float -> (q [E, N, K] in the format's dtype, scale_inv [E, ceil(N/bn), ceil(K/bk)]
        fp32) with w ~= q * scale_inv blockwise."""
        _check_dims("w", w, 3, "[E, N, K] (a stack of expert matrices; one matrix [N, K] is w.unsqueeze(0))")
        E, N, K = w.shape
        bn, bk = self.weight_block
        _, gn, gk = self.weight_scale_shape(E, N, K)
        padded = torch.zeros(E, gn * bn, gk * bk, dtype=torch.float32, device=w.device)
        padded[:, :N, :K] = w.float()
        blocks = padded.view(E, gn, bn, gk, bk)
        scale = self._scale(blocks.abs().amax(dim=(2, 4)))  # [E, gn, gk]
        q = (blocks / scale[:, :, None, :, None]).view(E, gn * bn, gk * bk)[:, :N, :K]
        return self._cast(q), scale

    def dequantize_weight(self, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
        """(q [E, N, K], scale_inv [E, gn, gk]) -> fp32 [E, N, K]."""
        _check_dims("q", q, 3, "[E, N, K] (a stack of expert matrices)")
        _check_dims("scale_inv", scale_inv, 3, f"{list(self.weight_scale_shape(*q.shape))} (one scale per "
                                                f"{list(self.weight_block)} block of q)")  # (a list: AttributeError)
        if tuple(scale_inv.shape) != self.weight_scale_shape(*q.shape):
            raise ValueError(f"scale_inv has shape {list(scale_inv.shape)}; expected "
                             f"{list(self.weight_scale_shape(*q.shape))} (one scale per {list(self.weight_block)} block of q)")
        bn, bk = self.weight_block
        N, K = q.shape[1], q.shape[2]
        s = scale_inv.float().repeat_interleave(bn, 1)[:, :N].repeat_interleave(bk, 2)[:, :, :K]
        return q.float() * s

    def quantize_activation(self, x: torch.Tensor, reciprocal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (q [T, H], scale [T, ceil(H / group)] fp32): one scale per token and group, q = x / scale
        correctly rounded, as the token kernels (quant_kernels.quantize_groups with QUOTIENT). reciprocal: q = x
        times the group's correctly rounded reciprocal instead, as the GEMM epilogues quantize the activation."""
        _check_dims("x", x, 2, "[T, H] (one row per token)")
        T, H = x.shape
        g = self.activation_group
        G = self.num_groups(H)
        padded = torch.zeros(T, G * g, dtype=torch.float32, device=x.device)
        padded[:, :H] = x.float()
        groups = padded.view(T, G, g)
        scale = self._scale(groups.abs().amax(dim=2))
        q = groups * (torch.ones_like(scale) / scale).unsqueeze(2) if reciprocal else groups / scale.unsqueeze(2)
        return self._cast(q.view(T, G * g)[:, :H]), scale

    def dequantize_activation(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(q [..., H], scale [..., G] fp32, or uint8 exponents under ue8m0) -> fp32 [..., H]."""
        H = q.shape[-1]
        expected = (*q.shape[:-1], self.num_groups(H))  # (another group count: a broadcast error naming nothing)
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != expected:
            got = list(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise ValueError(f"scale has shape {got}; expected {list(expected)} (one scale per row and "
                             f"{self.activation_group} channels of q)")
        s = decode_scales(scale).repeat_interleave(self.activation_group, -1)[..., :H]
        return q.float() * s

    def _scale(self, amax: torch.Tensor) -> torch.Tensor:
        # divided by a tensor: a Python-number divisor is a multiply by its reciprocal on CUDA, which
        # rounds differently from the correctly rounded quotient the kernels compute
        scale = amax.clamp(min=MIN_AMAX) / torch.full_like(amax, self.spec.max_value)
        return round_up_pow2(scale) if self.ue8m0 else scale

    def _cast(self, v: torch.Tensor) -> torch.Tensor:
        limit = self.spec.max_value  # |v| <= max by construction; the clamp guards fp32 rounding
        return v.clamp(-limit, limit).to(self.dtype)


def as_quant_config(name: str, value) -> Optional[QuantConfig]:
    """`value` given as argument `name`: None, an ep.QuantConfig, or a registered format's name (its default
    QuantConfig); anything else raises naming the argument, as every entry point that takes a format does."""
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, str) and value in _FORMATS:
        return QuantConfig(format=value)
    raise ValueError(f"{name}={value!r}; allowed: None, {', '.join(_FORMATS)} or an ep.QuantConfig")


def _check_dims(name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    """The conversions' argument `name` has `dims` dims, as `layout` says (its unpacking said only "too many values")."""
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} has shape {shape}; expected {layout}")


def round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Each positive fp32 rounded up to a power of two, exactly (on the bits: any mantissa bumps the
    exponent), as the kernels do; NaN stays NaN (bumped, its exponent overflowed into -0.0)."""
    bits = scale.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.where(scale.isnan(), scale.float(), (exponent << 23).view(torch.float32))


def encode_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales -> uint8 exponent bytes (2^(e - 127))."""
    return ((scale.float().contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def decode_scales(scale: torch.Tensor) -> torch.Tensor:
    """fp32 scales as they are; uint8 UE8M0 exponent bytes -> fp32 2^(e - 127)."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.int32) << 23).view(torch.float32)
    return scale.float()


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def check_expert_dtype(name: str, t, scaled: bool = True) -> None:
    """Expert weights of a 1-byte float dtype mean something only under their block scales: raise naming `name`
    for another fp8 flavour than a registered format's (e5m2, e4m3fnuz: no format reads them; cast as numbers
    they were silently off by their scales), and for float8_e4m3fn where no scale was given (not scaled)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype.itemsize != 1:
        return
    if not is_quantized_dtype(t.dtype):
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: {', '.join(map(str, FP8_DTYPES))} with its block "
                         f"scales (DeepSeek-V3's format), or a float dtype (bf16, fp16, fp32: quantize= stores it "
                         f"fp8); dequantize other fp8 flavours first")
    if not scaled:
        raise ValueError(f"{name} has dtype {t.dtype} but no block scales were given: fp8 values mean something only "
                         f"under their *_scale_inv (fp32 [E, ceil(rows/128), ceil(cols/128)]); allowed: w13_scale_inv "
                         f"and w2_scale_inv with them, or {name} cast to a float dtype first where its values are meant "
                         f"as they are (scale 1)")


def check_scale_tensor(name: str, scale: torch.Tensor, shape: tuple, values: bool = True) -> None:
    """Raise naming the argument when a scale tensor has the wrong type, shape or dtype, or (values)
    holds a value that is not finite and > 0 (one host read)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)} float32; got {type(scale).__name__}")
    if tuple(scale.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {list(scale.shape)}; expected {list(shape)} (one scale per block)")
    if scale.dtype != torch.float32:
        raise ValueError(f"{name} has dtype {scale.dtype}; expected torch.float32 (DeepSeek-V3's scale_inv)")
    if values:
        check_scale_values(name, scale)


def check_scale_values(name: str, scale: torch.Tensor) -> None:
    """Raise naming the argument when a scale tensor holds a value that is not finite and > 0 (one host read)."""
    if scale.is_meta or scale.numel() == 0:
        return
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        value = scale[tuple(where)].item()
        raise ValueError(f"{name} has {value!r} at {where}; allowed: finite values > 0")


def fp8_relative_step() -> float:
    """u = 2^-4: the largest relative rounding error of e4m3 on normal values (3 mantissa bits)."""
    return math.ldexp(1.0, -4)
