"""Hugging Face transformers (>= 5) drop-in: spread a model's MoE experts over the ranks of a group.

transformers 5 gives its MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, ...) one shape: a
router `gate` (with `top_k`) returning (logits, weights, ids) and an `experts` module holding
gate_up_proj [E, 2I, H] ([gate; up]) and down_proj [E, H, I], called as
experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]). `replace_experts` swaps
each such `experts` for `EPExperts`, which keeps this rank's slice and runs an EPMoE layer; the
router, shared experts and everything else stay HF's own, so outputs and gradients are unchanged:

    model = AutoModelForCausalLM.from_config(config)     # the same weights on every rank
    ep.hf.replace_experts(model, dispatcher="deepep_normal", group=ep.init_distributed())

and back to a Hugging Face checkpoint (every rank calls export_state_dict; rank 0 gets HF's names
and layout, gate_up_proj [E, 2I, H] and down_proj [E, H, I], with every expert):

    state_dict = ep.hf.export_state_dict(model)
    if state_dict is not None:
        model.save_pretrained(path, state_dict=state_dict)

A replaced model's own state_dict holds each EPExperts' `layer.w13` / `layer.w2` (this rank's shard; torch.save it
per rank). Its save_pretrained(path) (that of every transformers model replace_experts was given or found inside it)
writes export_state_dict's instead, so from_pretrained loads the experts back; where the experts are split over ranks
that needs every rank, so it raises naming the way above (a state_dict= given is written as it is). Its
load_state_dict also takes a Hugging Face state_dict (HF's names, every expert, as
from_pretrained's model or export_state_dict has it), of which each rank keeps its experts, so a model built on the
meta device and replaced there loads the checkpoint after `model.to_empty(device=...)`. Pickling it
(torch.save(model)) is refused by name.

Clamped SwiGLUs run as EPMoE's gemm1_clamp_limit / gemm1_alpha (gpt-oss, DeepSeek-V4, MiniMax-M3, the OpenAI privacy
filter, whose biased experts run with has_bias). DBRX's w1 / v1 / w2 [E * I, H] experts are converted in and out as
gpt-oss's are (_LAYOUTS), and so are ungated ones (NemotronH's up_proj / down_proj: is_gated=False; its relu2 is
refused by name). Llama 4's experts, which its block calls on every expert's router-scaled rows, are called the
same way (each non-zero row one token of its expert). An MoE
block it cannot swap exactly (Switch Transformers' per-expert modules, Doge's one-neuron embedding
experts, LongCat-Flash's identity experts where its experts module gets their ids (transformers < 5.25), MXFP4
weights, a softcapped gate as Inkling 2's, Ernie 4.5 VL's per-modality blocks over several ranks, ...) is never
skipped silently: replace_experts raises naming it and why before anything changes; strict=False swaps the others
and warns.
"""
from __future__ import annotations

import inspect
import math
import numbers
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .config import MoeConfig
from .dispatchers.base import as_process_group, group_rank_and_size, join_settings_check
from .layer import PLACEMENT_KEY, EPMoE, _placement_tables
from .quant import QuantConfig, is_quantized_dtype
from .registry import did_you_mean, named_options
from .routing import TopKOutput
from .validation import check_type, is_int_at_least

# activation name -> function, to recognise an experts module's act_fn by what it computes
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def is_hf_experts(module: nn.Module) -> bool:
    """A transformers >= 5 experts module with 3-D gate_up_proj / down_proj weights."""
    w13, w2 = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor) and w13.dim() == 3 and w2.dim() == 3


def _describe(act_fn: Any) -> str:
    """act_fn's repr on one line: a module whose repr spans lines (Inkling 2's softcapped SwiGLU) as its class
    and the numbers it and its submodules hold (`Inkling2SoftcappedSwiGLU(gate_softcap.softcap=4.0, ...)`)."""
    text = repr(act_fn)
    if "\n" not in text or not isinstance(act_fn, nn.Module):
        return text
    settings = [f"{prefix}{'.' if prefix else ''}{key}={value!r}" for prefix, m in act_fn.named_modules()
                for key, value in vars(m).items() if isinstance(value, numbers.Real) and not isinstance(value, bool)
                and not key.startswith("_")]
    return f"{type(act_fn).__name__}({', '.join(settings)})"


def activation_name(act_fn: Any) -> str:
    """Which of EPMoE's activations `act_fn` computes (probed on a fixed tensor); an error otherwise."""
    # also far out: transformers' gelu_10 is gelu clipped to [-10, 10], equal to gelu on [-6, 6]
    far = torch.logspace(1, 6, 26, dtype=torch.float64)
    probe = torch.cat([torch.linspace(-6, 6, 97, dtype=torch.float64), far, -far])
    try:
        out = act_fn(probe.clone())  # (an in-place activation must not change what it is compared with)
    except Exception as err:  # noqa: BLE001  (anything that is not a plain elementwise activation)
        raise ValueError(f"act_fn={_describe(act_fn)} cannot be probed as act(gate) ({err}); EPExperts supports "
                         f"{', '.join(_ACTIVATIONS)}") from None
    for name, fn in _ACTIVATIONS.items():
        if torch.allclose(out, fn(probe), rtol=1e-6, atol=1e-9):
            return name
    raise ValueError(f"act_fn={_describe(act_fn)} is none of {', '.join(_ACTIVATIONS)}; EPExperts cannot run it")


def _fp8_format(experts: nn.Module) -> tuple[QuantConfig, torch.dtype]:
    """(QuantConfig, compute dtype) of transformers' fp8 experts; an error naming what is not supported."""
    block = getattr(experts, "block_size", None)
    scales = [getattr(experts, name, None) for name in ("gate_up_proj_scale_inv", "down_proj_scale_inv")]
    scheme = getattr(experts, "activation_scheme", "dynamic")
    if block is None or scheme != "dynamic" or any(not isinstance(s, torch.Tensor) or s.dtype != torch.float32
                                                   for s in scales):
        raise ValueError(f"experts={type(experts).__name__} holds fp8 weights with block_size={block!r}, "
                         f"activation_scheme={scheme!r} and scale dtypes {[getattr(s, 'dtype', None) for s in scales]}; "
                         f"EPExperts takes fp8 blocks (block_size set), dynamic activation scales and float32 "
                         f"*_scale_inv")
    config = getattr(experts, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    return QuantConfig(weight_block=tuple(block), activation_group=block[1]), dtype


# an _apply_gate override's settings (transformers' FP8Experts takes them from the model config): named in the
# error when the gate is none of the forms EPMoE computes, and the candidates _gate_form probes
_GATE_KNOBS = ("gate_softcap", "up_softcap", "swiglu_alpha", "alpha", "swiglu_limit", "limit")


def _called_densely(experts: nn.Module) -> bool:
    """Whether `experts` is called as Llama 4's: forward(hidden_states) on [E * T, H] rows, rows e * T .. e * T + T - 1
    expert e's tokens times their router score (0 where the token is not routed to e: apply_router_weight_on_input),
    weights laid out for bmm (gate_up_proj [E, H, 2I], down_proj [E, I, H]); the block sums the E outputs per token.
    Told by its forward taking the hidden states alone, where transformers' experts take top_k_index and weights."""
    try:
        params = list(inspect.signature(experts.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _check_plain_swiglu(experts: nn.Module) -> tuple[bool, bool]:
    """(transposed, biased): whether `experts` holds its weights transposed (is_transposed=True, as Aria's:
    gate_up_proj [E, H, 2I] with [gate | up] columns, down_proj [E, I, H]) and has biases (gate_up_proj_bias
    [E, 2I] in [gate; up] order and down_proj_bias [E, H], both: the OpenAI privacy filter's); an error naming what
    makes it compute something other than sum_k w_k * (down_proj[e] @ gated(gate, up) + b2[e]),
    [gate; up] = gate_up_proj[e] @ x + b13[e], with E experts on every tensor (the gate itself: _gate_form)."""
    name = type(experts).__name__
    flags = {"is_concatenated": True, "has_gate": True,
             "has_post_expert_norm": False}  # what transformers' use_experts_implementation records
    for flag, plain in flags.items():
        value = getattr(experts, flag, plain)
        if value != plain:
            raise ValueError(f"experts={name} has {flag}={value!r}; EPExperts supports {flag}={plain!r} only")
    if isinstance(getattr(experts, "post_expert_norm", None), nn.Module):
        raise ValueError(f"experts={name} has a post_expert_norm (a norm on each expert's output before the "
                         f"router weight); EPExperts does not apply it")
    w13, w2 = experts.gate_up_proj, experts.down_proj
    zero_experts = getattr(experts, "zero_expert_num", 0)
    if zero_experts:  # LongCat-Flash: ids >= n_routed_experts return the token itself, times its weight
        raise ValueError(f"experts={name} has zero_expert_num={zero_experts!r} identity (zero-computation) experts "
                         f"after its {w2.shape[0]} gated ones (gate_up_proj {list(w13.shape)}, down_proj "
                         f"{list(w2.shape)}); EPExperts has no identity experts")
    transposed = getattr(experts, "is_transposed", False) is True or _called_densely(experts)
    E, two_i, H = (w13.shape[0], w13.shape[2], w13.shape[1]) if transposed else w13.shape
    if two_i % 2 or tuple(w2.shape) != ((E, two_i // 2, H) if transposed else (E, H, two_i // 2)):
        layout = "[E, H, 2I] and [E, I, H] (is_transposed=True)" if transposed else "[E, 2I, H] and [E, H, I]"
        raise ValueError(f"experts={name} has gate_up_proj {list(w13.shape)} and down_proj {list(w2.shape)}; "
                         f"EPExperts needs {layout}, one weight per expert")
    # transformers' experts functions add the biases when has_bias says so, the module's own forward when it has them
    biases = {b: getattr(experts, b, None) for b in ("gate_up_proj_bias", "down_proj_bias")}
    biased = getattr(experts, "has_bias", any(b is not None for b in biases.values()))
    shapes = {b: list(t.shape) if isinstance(t, torch.Tensor) else t for b, t in biases.items()}
    if biased is not False and (biased is not True or shapes != {"gate_up_proj_bias": [E, two_i],
                                                                "down_proj_bias": [E, H]}):
        raise ValueError(f"experts={name} has has_bias={getattr(experts, 'has_bias', None)!r}, gate_up_proj_bias "
                         f"{shapes['gate_up_proj_bias']} and down_proj_bias {shapes['down_proj_bias']}; EPExperts "
                         f"takes biased experts with both, [E, 2I] = [{E}, {two_i}] ([gate; up]) and [E, H] = "
                         f"[{E}, {H}]")
    held = [b for b, t in biases.items() if t is not None]
    if not biased and held:
        raise ValueError(f"experts={name} has has_bias=False and holds {', '.join(held)}, which its forward may add "
                         f"or not; EPExperts cannot tell which")
    return transposed, biased


def _gate_form(experts: nn.Module, activation: Optional[str]) -> tuple[str, Optional[float], Optional[float]]:
    """(activation, gemm1_alpha, gemm1_clamp_limit) under which EPMoE computes what `experts` does to [gate; up];
    activation: what its act_fn computes (None: it has none). Without an _apply_gate override that is
    act_fn(gate) * up. An override (DeepSeek-V4's clamped SwiGLU, MiniMax-M3's gpt-oss gate on [gate; up],
    transformers' FP8Experts with the model's swiglu_limit / swiglu_alpha) is taken when one of the forms its own
    settings name computes what it computes on a probe (magnitudes 1e-3..1e6 either sign, and around each named
    limit; given a copy, so an in-place gate cannot change the comparison; a gate computing in float32 passes:
    1e-5 relative, and its underflow); else an error naming it."""
    name = type(experts).__name__
    apply_gate = getattr(experts, "_apply_gate", None)
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - a transformers without the experts interface
        _default_apply_gate = None
    if apply_gate is None or getattr(apply_gate, "__func__", None) is _default_apply_gate:
        if activation is None:
            raise ValueError(f"experts={name} has no act_fn; EPExperts supports {', '.join(_ACTIVATIONS)}")
        return activation, None, None
    knobs = {k: getattr(experts, k) for k in _GATE_KNOBS if getattr(experts, k, None) is not None}
    numbers_of = lambda keys: [float(knobs[k]) for k in keys if isinstance(knobs.get(k), numbers.Real)  # noqa: E731
                               and not isinstance(knobs[k], bool) and math.isfinite(knobs[k])]
    limits, alphas = [v for v in numbers_of(("swiglu_limit", "limit")) if v > 0], numbers_of(("swiglu_alpha", "alpha"))
    values = torch.cat([torch.logspace(-3, 6, 28, dtype=torch.float64)] +
                       [torch.tensor([0.5, 0.99, 1.01, 2.0, 3.0], dtype=torch.float64) * v for v in limits])
    values = torch.cat([values, -values])
    n = values.numel()  # rows [gate | up]: every gate value beside two ups of either sign
    probe = torch.stack([torch.cat([values, values.flip(0)]), torch.cat([values, values.roll(1)])])
    try:
        out = experts._apply_gate(probe.clone())
    except Exception:  # noqa: BLE001 - a gate that cannot take a float64 probe is not one of ours
        out = None
    if isinstance(out, torch.Tensor) and out.shape == (2, n):
        from .runners.torch_runner import activate
        acts = [activation] if activation is not None else list(_ACTIVATIONS)
        candidates = ([(a, None, None) for a in acts] + [(a, None, lim) for a in acts for lim in limits] +
                      [("silu", alpha, lim) for alpha in alphas for lim in limits])
        for act, alpha, limit in candidates:
            config = MoeConfig(1, 1, 1, n, activation=act, gemm1_alpha=alpha, gemm1_clamp_limit=limit)
            if torch.allclose(out.double(), activate(probe, config), rtol=1e-5, atol=1e-30):  # (fp32 inside)
                return act, alpha, limit
    # transformers 5.25's Step3p7 / Bailing experts (and FP8Experts with limit_after_act) clamp act(gate), not gate
    after_act = (" (limit_after_act=True: it clamps act(gate), after the activation; gemm1_clamp_limit clamps the gate "
                 "before it, which differs unless the limit is far out)" if getattr(experts, "limit_after_act", False)
                 is True and limits else "")
    raise ValueError(f"experts={name} overrides _apply_gate with {getattr(apply_gate, '__qualname__', apply_gate)}"
                     f"{f' ({knobs})' if knobs else ''}, which computes none of act(gate) * up, its clamped form "
                     f"(gemm1_clamp_limit) or gpt-oss's (gemm1_alpha and gemm1_clamp_limit) on a probe{after_act}")


def _gpt_oss_gate(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's SwiGLU on its interleaved [g0, u0, g1, u1, ...] layout (what EPMoE computes on [gate; up])."""
    gate, up = gate_up[..., ::2].clamp(max=limit), gate_up[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _is_gpt_oss(experts: nn.Module) -> bool:
    """transformers' gpt-oss experts layout: gate_up_proj [E, H, 2I] with gate / up columns interleaved,
    biases, down_proj [E, I, H], and an _apply_gate that computes gpt-oss's clamped SwiGLU (checked on a probe)."""
    flags = dict(is_transposed=True, is_concatenated=False, has_bias=True, has_gate=True)
    if any(getattr(experts, k, None) != v for k, v in flags.items()) or getattr(experts, "has_post_expert_norm", False):
        return False
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (alpha, limit)) or not limit > 0:
        return False
    if not all(isinstance(getattr(experts, b, None), torch.Tensor) for b in ("gate_up_proj_bias", "down_proj_bias")):
        return False
    probe = torch.linspace(-2 * limit, 2 * limit, 64, dtype=torch.float64).view(4, 16)
    try:
        out = experts._apply_gate(probe)
    except Exception:  # noqa: BLE001
        return False
    return isinstance(out, torch.Tensor) and out.shape == (4, 8) and torch.allclose(
        out, _gpt_oss_gate(probe, alpha, limit), rtol=1e-9, atol=1e-12)


def _from_gpt_oss(t: dict[str, torch.Tensor], E: int) -> tuple[torch.Tensor, ...]:
    """gpt-oss weights -> EPMoE's (w13 [E, 2I, H] = [gate; up], w2 [E, H, I], b13 [E, 2I], b2 [E, H])."""
    w, b = t["gate_up_proj"], t["gate_up_proj_bias"]
    w13 = torch.cat((w[..., ::2], w[..., 1::2]), dim=2).transpose(1, 2).contiguous()
    b13 = torch.cat((b[..., ::2], b[..., 1::2]), dim=1)
    return w13, t["down_proj"].transpose(1, 2).contiguous(), b13, t["down_proj_bias"]


def _to_gpt_oss(w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor, b2: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of _from_gpt_oss, under gpt-oss's parameter names."""
    E, two_i, H = w13.shape
    i = two_i // 2
    return {"gate_up_proj": torch.stack((w13[:, :i], w13[:, i:]), dim=2).reshape(E, two_i, H).transpose(1, 2).contiguous(),
            "gate_up_proj_bias": torch.stack((b13[:, :i], b13[:, i:]), dim=2).reshape(E, two_i),
            "down_proj": w2.transpose(1, 2).contiguous(), "down_proj_bias": b2}


def _is_dbrx(experts: nn.Module) -> bool:
    """DBRX's experts layout: `mlp` holding w1 (gate), v1 (up) and w2 (down, as [I, H] per expert), each a floating
    [E * I, H] matrix, E = num_experts, called as transformers' experts are (hidden_states, top_k_index, weights)."""
    mlp, E = getattr(experts, "mlp", None), getattr(experts, "num_experts", None)
    weights = [getattr(mlp, w, None) for w in ("w1", "v1", "w2")]
    return (is_int_at_least(E, 1) and all(isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point()
                                          and not is_quantized_dtype(w.dtype) and w.shape == weights[0].shape
                                          and w.dtype == weights[0].dtype for w in weights)
            and weights[0].shape[0] % E == 0)


def _from_dbrx(t: dict[str, torch.Tensor], E: int) -> tuple[torch.Tensor, ...]:
    """DBRX weights -> EPMoE's (w13 [E, 2I, H] = [w1; v1], w2 [E, H, I], no biases)."""
    w1, v1, w2 = (t[f"mlp.{w}"].reshape(E, -1, t[f"mlp.{w}"].shape[-1]) for w in ("w1", "v1", "w2"))
    return torch.cat((w1, v1), dim=1), w2.transpose(1, 2).contiguous(), None, None


def _to_dbrx(w13: torch.Tensor, w2: torch.Tensor, b13: Optional[torch.Tensor],
             b2: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of _from_dbrx, under DBRX's parameter names."""
    E, two_i, H = w13.shape
    i = two_i // 2
    return {"mlp.w1": w13[:, :i].reshape(E * i, H), "mlp.v1": w13[:, i:].reshape(E * i, H),
            "mlp.w2": w2.transpose(1, 2).reshape(E * i, H)}


def _is_ungated(experts: nn.Module) -> bool:
    """Ungated experts (has_gate=False, NemotronH's): up_proj [E, I, H] and down_proj [E, H, I], floating, no
    gate_up_proj: expert e computes down_proj[e] @ act(up_proj[e] @ x)."""
    up, down = getattr(experts, "up_proj", None), getattr(experts, "down_proj", None)
    return (getattr(experts, "gate_up_proj", None) is None and getattr(experts, "has_gate", False) is not True
            and all(isinstance(w, torch.Tensor) and w.dim() == 3 and w.is_floating_point()
                    and not is_quantized_dtype(w.dtype) for w in (up, down))
            and up.dtype == down.dtype and tuple(down.shape) == (up.shape[0], up.shape[2], up.shape[1]))


@dataclass(frozen=True)
class _Layout:
    """An experts layout EPExperts converts in and out (not transformers' gate_up_proj / down_proj, plain or
    transposed): `keys` its tensors under the experts module (checkpoint order), `to_layer` them (with E) to EPMoE's
    global (w13, w2, b13, b2), `to_hf` the inverse, `settings` the EPMoE settings it runs with, `sources` which keys
    each EPMoE tensor is made of (frozen where they all are)."""
    keys: tuple[str, ...]
    is_it: Callable[[nn.Module], bool]
    to_layer: Callable[[dict[str, torch.Tensor], int], tuple]
    to_hf: Callable[..., dict[str, torch.Tensor]]
    settings: Callable[[nn.Module], dict[str, Any]]
    sources: dict[str, tuple[str, ...]]


_LAYOUTS = {
    "gpt_oss": _Layout(("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"), _is_gpt_oss,
                       _from_gpt_oss, _to_gpt_oss,
                       lambda m: dict(activation="silu", gemm1_alpha=float(m.alpha), gemm1_clamp_limit=float(m.limit),
                                      has_bias=True),
                       dict(w13=("gate_up_proj",), w2=("down_proj",), b13=("gate_up_proj_bias",),
                            b2=("down_proj_bias",))),
    "dbrx": _Layout(("mlp.w1", "mlp.v1", "mlp.w2"), _is_dbrx, _from_dbrx, _to_dbrx,
                    lambda m: dict(activation=activation_name(m.mlp.activation_fn), gemm1_alpha=None,
                                   gemm1_clamp_limit=None, has_bias=False),
                    dict(w13=("mlp.w1", "mlp.v1"), w2=("mlp.w2",))),
    "ungated": _Layout(("up_proj", "down_proj"), _is_ungated, lambda t, E: (t["up_proj"], t["down_proj"], None, None),
                       lambda w13, w2, b13, b2: {"up_proj": w13, "down_proj": w2},
                       lambda m: dict(activation=activation_name(getattr(m, "act_fn", None)), gemm1_alpha=None,
                                      gemm1_clamp_limit=None, has_bias=False, is_gated=False),
                       dict(w13=("up_proj",), w2=("down_proj",))),
}
_PLAIN_SOURCES = dict(w13=("gate_up_proj",), w2=("down_proj",), b13=("gate_up_proj_bias",), b2=("down_proj_bias",))


def _router_top_k(block: nn.Module) -> Optional[int]:
    """top_k of a transformers MoE block's router (`gate` or `router`: its top_k, else its config's
    top_k_experts as Gemma 4's router reads it), None if it has none."""
    def as_int(value: Any) -> Optional[int]:
        return int(value) if is_int_at_least(value, -2 ** 63) else None

    for name in ("gate", "router"):
        router = getattr(block, name, None)
        if isinstance(router, nn.Module):
            top_k = as_int(getattr(router, "top_k", None))
            if top_k is None:
                top_k = as_int(getattr(getattr(router, "config", None), "top_k_experts", None))
            if top_k is not None:
                return top_k
    return None


@dataclass(frozen=True)
class _Conversion:
    """How one transformers experts module becomes an EPMoE, checked once: a _LAYOUTS layout (gpt-oss's, DBRX's:
    converted in and out) or the plain [gate; up] one (layout None), possibly transposed (Aria's: transposed in and
    out) and biased (the privacy filter's), with its activation, its gate's clamp and alpha (_gate_form) and, for fp8
    experts, their format."""
    layout: Optional[str]
    transposed: bool
    activation: str
    gemm1_alpha: Optional[float]
    gemm1_clamp_limit: Optional[float]
    quant: Optional[QuantConfig]
    dtype: torch.dtype
    has_bias: bool = False
    dense: bool = False  # called as Llama 4's: _called_densely
    is_gated: bool = True


def _tensor(module: nn.Module, key: str) -> Optional[torch.Tensor]:
    """The tensor at `key` ("mlp.w1") under `module`, None if there is none."""
    for part in key.split("."):
        module = getattr(module, part, None)
    return module if isinstance(module, torch.Tensor) else None


def _tensor_owner(module: nn.Module, key: str) -> Optional[nn.Module]:
    """The module holding `key` under `module` (itself for a name without dots), None if there is none."""
    for part in key.split(".")[:-1]:
        module = getattr(module, part, None)
    return module if isinstance(module, nn.Module) else None


def _check_unparametrized(experts: nn.Module, keys: tuple[str, ...]) -> None:
    """An error naming the tensors of `experts` (keys under it) that are parametrized: their values are computed
    (LoRA-style adapters, weight norm, ...) and EPExperts would copy them once."""
    owners = {key: _tensor_owner(experts, key) for key in keys}
    parametrized = [key for key, owner in owners.items() if isinstance(owner, nn.Module)
                    and parametrize.is_parametrized(owner, key.rpartition(".")[2])]
    if parametrized:
        raise ValueError(f"experts={type(experts).__name__} has parametrizations on {', '.join(parametrized)} "
                         f"(LoRA-style adapters or another torch.nn.utils.parametrize function): EPExperts would "
                         f"copy the weights they compute once, dropping them (their parameters leave the model and "
                         f"the merged experts train instead); replace_experts before adding them, or merge them first "
                         f"(torch.nn.utils.parametrize.remove_parametrizations(experts, name), PEFT's merge_and_unload)")


def _conversion(experts: nn.Module) -> _Conversion:
    """What EPExperts needs to run `experts` exactly; a ValueError naming what it cannot run."""
    name = type(experts).__name__
    layout = next((key for key, known in _LAYOUTS.items() if known.is_it(experts)), None)
    if layout is not None and not is_hf_experts(experts):  # (gpt-oss's: after the checks below)
        return _layout_conversion(experts, layout)
    if not is_hf_experts(experts):
        if all(isinstance(getattr(experts, w, None), torch.Tensor) and getattr(experts, w).dim() == 3
               for w in ("up_proj", "down_proj")):
            raise ValueError(f"experts={name} with up_proj {list(experts.up_proj.shape)} {experts.up_proj.dtype} and "
                             f"down_proj {list(experts.down_proj.shape)} {experts.down_proj.dtype} and no gate_up_proj "
                             f"(has_gate={getattr(experts, 'has_gate', None)!r}); EPExperts runs ungated experts as "
                             f"up_proj [E, I, H] and down_proj [E, H, I] in float32 / bfloat16 / float16 / float64 "
                             f"(fp8 experts gated only)")
        base = getattr(experts, "base_layer", None)
        if isinstance(base, nn.Module) and (is_hf_experts(base) or isinstance(getattr(base, "base_layer", None),
                                                                              nn.Module)):
            raise ValueError(f"experts={name} wraps {type(base).__name__} as its base_layer (an adapter, as PEFT's "
                             f"LoRA on target_parameters wraps experts): EPExperts would take the base experts and "
                             f"drop the adapter; replace_experts before adding adapters, or merge them first (PEFT's "
                             f"merge_and_unload)")
        raise ValueError(f"experts={name} has no 3-D gate_up_proj / down_proj (transformers >= 5 fused experts, "
                         f"[E, 2I, H] and [E, H, I]); EPExperts cannot take per-expert modules or other layouts")
    _check_unparametrized(experts, ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"))
    if getattr(experts, "_is_expert_parallel", False) is True:  # set by transformers' MoEParamShard
        raise ValueError(f"experts={name} is already split over ranks by transformers' own expert parallelism "
                         f"(DistributedConfig ep_size: _is_expert_parallel=True, num_experts="
                         f"{getattr(experts, 'num_experts', None)!r} here); EPExperts takes the whole model's experts: "
                         f"load the model without ep_size")
    w13 = experts.gate_up_proj
    if not (w13.is_floating_point() and experts.down_proj.dtype == w13.dtype):
        raise ValueError(f"experts={name} has gate_up_proj {w13.dtype} and down_proj {experts.down_proj.dtype} "
                         f"(packed quantized weights, e.g. MXFP4); EPExperts takes floating or fp8 weights")
    if layout is not None:
        E, H, two_i = w13.shape
        if two_i % 2 or tuple(experts.down_proj.shape) != (E, two_i // 2, H):
            raise ValueError(f"experts={name} has gate_up_proj {list(w13.shape)} and down_proj "
                             f"{list(experts.down_proj.shape)}; gpt-oss's layout is [E, H, 2I] and [E, I, H]")
        return _layout_conversion(experts, layout)
    transposed, biased = _check_plain_swiglu(experts)
    dense = _called_densely(experts)
    if dense and biased:  # (a row of zeros, a token not routed there, would get the biases' output)
        raise ValueError(f"experts={name} is called on every expert's rows (forward(hidden_states), as Llama 4's) "
                         f"and has biases; EPExperts runs such experts without biases only")
    if (transposed or biased) and is_quantized_dtype(w13.dtype):
        raise ValueError(f"experts={name} holds fp8 weights with is_transposed={transposed} and has_bias={biased}; "
                         f"EPExperts takes fp8 experts as [E, 2I, H] and [E, H, I] without biases, with their block "
                         f"scales in that layout only")
    quant, dtype = _fp8_format(experts) if is_quantized_dtype(w13.dtype) else (None, w13.dtype)
    act_fn = getattr(experts, "act_fn", None)
    try:
        activation = None if act_fn is None else activation_name(act_fn)
    except ValueError as err:
        raise ValueError(f"experts={name}: {err}") from None
    return _Conversion(None, transposed, *_gate_form(experts, activation), quant=quant, dtype=dtype, has_bias=biased,
                       dense=dense)


def _layout_conversion(experts: nn.Module, layout: str) -> _Conversion:
    """The _Conversion of experts in one of _LAYOUTS (its parametrized tensors refused as the plain layout's are)."""
    known = _LAYOUTS[layout]
    _check_unparametrized(experts, known.keys)
    for mine, theirs in known.sources.items():  # (one layer tensor needs a gradient or not: _keep_frozen)
        needs = {k: _tensor(experts, k).requires_grad for k in theirs}
        if len(set(needs.values())) > 1:
            flags = ", ".join(f"{k} requires_grad={v}" for k, v in needs.items())
            raise ValueError(f"experts={type(experts).__name__} has {flags}, which EPExperts holds as one tensor "
                             f"({mine}); freeze or unfreeze them together")
    try:
        settings = known.settings(experts)
    except ValueError as err:  # (its activation)
        raise ValueError(f"experts={type(experts).__name__}: {err}") from None
    activation = settings.pop("activation")
    return _Conversion(layout, False, activation, settings.pop("gemm1_alpha"), settings.pop("gemm1_clamp_limit"),
                       quant=None, dtype=_tensor(experts, known.keys[0]).dtype, **settings)


class EPExperts(nn.Module):
    """Drop-in for a transformers >= 5 experts module, with its experts spread over `group`.

    Takes the module's global weights once (gate_up_proj [E, 2I, H] = [gate; up], down_proj
    [E, H, I]) and keeps this rank's slice in `self.layer` (an EPMoE). Called like the original:
    forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]; an index equal
    to E (HF's "no expert") or -1 adds nothing. gpt-oss's experts (gate_up_proj [E, H, 2I] with gate and
    up columns interleaved, down_proj [E, I, H], biases, clamped SwiGLU with alpha / limit) are converted
    to EPMoE's layout with has_bias, gemm1_alpha and gemm1_clamp_limit; export_state_dict converts back.
    Transposed experts (is_transposed=True, Aria's: gate_up_proj [E, H, 2I] = [gate | up] columns, down_proj
    [E, I, H]) are transposed in, and back by export_state_dict; biases of [gate; up] experts (gate_up_proj_bias
    [E, 2I], down_proj_bias [E, H]: the OpenAI privacy filter's) run with has_bias. DBRX's (mlp.w1 / v1 / w2
    [E * I, H], called on [B, S, H] states) and ungated ones (NemotronH's up_proj / down_proj: is_gated=False) are
    converted in and out (_LAYOUTS). Llama 4's experts, called as forward(rows [E * T, H]) on each expert's
    router-scaled tokens, keep that call (_dense_forward). A clamped SwiGLU on [gate; up]
    (DeepSeek-V4; MiniMax-M3's and the privacy filter's gpt-oss gate) runs as gemm1_clamp_limit (and gemm1_alpha).
    Other biases and activations are rejected. num_redundant_experts: extra copies of experts, as
    EPMoE takes them (e.g. when E is not a multiple of the group's size).
    fp8 experts (transformers' FP8Experts: float8_e4m3fn gate_up_proj / down_proj with fp32
    *_scale_inv blocks of `block_size`, dynamic activation scales) are kept fp8 and run w8a8
    (inference only); the layer computes in the model config's dtype (bf16 when it names none).
    Frozen experts stay frozen: w13 / w2 (b13 / b2) need a gradient where the weights they came from did.
    Experts on the meta device (a model built under `with torch.device("meta"):`) make a layer on meta (a real
    `device` is an error): `model.to_empty(device=...)`, then load them (load_state_dict of a Hugging Face state_dict
    or a replaced model's, or layer.load_experts). transformers' `model.init_weights()` does not initialise an EPExperts (its
    _init_weights knows its own experts classes only): after to_empty its experts hold whatever memory they got
    until loaded or initialised, e.g. `torch.nn.init.normal_(experts.layer.w13, std=config.initializer_range)`.
    """

    def __init__(self, experts: nn.Module, top_k: int, *, dispatcher: str = "deepep_normal", runner: str = "auto",
                 group: Optional[Any] = None, device: Any = None, dispatcher_options: Optional[dict] = None,
                 runner_options: Optional[dict] = None, num_redundant_experts: int = 0,
                 _conversion_checked: Optional[_Conversion] = None):
        super().__init__()
        self._shared: Optional[_SharedHandoff] = None  # set by overlap_shared_experts
        # replace_experts checked every block before changing any; it hands that check over
        conversion = _conversion_checked or _conversion(experts)
        _check_meta_source(experts, device)
        self.layout = conversion.layout  # a _LAYOUTS layout: converted in and out (export_state_dict)
        self.transposed = conversion.transposed  # its layout is transposed in and out (export_state_dict)
        w13, w2 = (experts.gate_up_proj, experts.down_proj) if self.layout is None else (None, None)
        biases = ((experts.gate_up_proj_bias, experts.down_proj_bias) if conversion.has_bias else (None, None))
        if self.layout is not None:
            known = _LAYOUTS[self.layout]
            w13, w2, *biases = known.to_layer({k: _tensor(experts, k).detach() for k in known.keys},
                                              getattr(experts, "num_experts", None))
        if self.transposed:  # [E, H, 2I] and [E, I, H] -> EPMoE's [E, 2I, H] and [E, H, I]
            w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        E, two_i, H = w13.shape
        self.num_experts = E
        self.dense = conversion.dense  # each of its rows is one token of one expert: top_k 1
        self._dense_top_k = top_k  # (its router's: how many of a token's rows may be non-zero)
        quant = conversion.quant
        self.layer = EPMoE(E, 1 if self.dense else top_k, H, two_i // 2 if conversion.is_gated else two_i,
                           dispatcher=dispatcher, runner=runner, group=group,
                           dtype=conversion.dtype, device=w13.device if device is None else device,
                           activation=conversion.activation, is_gated=conversion.is_gated,
                           gemm1_alpha=conversion.gemm1_alpha,
                           gemm1_clamp_limit=conversion.gemm1_clamp_limit, has_bias=conversion.has_bias,
                           dispatcher_options=dispatcher_options, runner_options=runner_options,
                           num_redundant_experts=num_redundant_experts)
        if quant is None:
            self.layer.load_experts(w13.detach(), w2.detach(), *(b.detach() for b in biases if b is not None))
        else:
            self.layer.load_experts(w13.detach(), w2.detach(), w13_scale_inv=experts.gate_up_proj_scale_inv.detach(),
                                    w2_scale_inv=experts.down_proj_scale_inv.detach(), quantize=quant)
        self._keep_frozen(experts)

    def _keep_frozen(self, experts: nn.Module) -> None:
        """The layer's w13 / w2 (b13 / b2) need a gradient where the module's weights they came from did: frozen
        experts (fine-tuning the rest, or adapters) stay frozen, and get no .grad, as before the swap."""
        sources = _PLAIN_SOURCES if self.layout is None else _LAYOUTS[self.layout].sources
        for mine, theirs in sources.items():
            param = getattr(self.layer, mine)
            made_of = [_tensor(experts, k) for k in theirs]
            if isinstance(param, nn.Parameter) and all(isinstance(t, torch.Tensor) and not t.requires_grad
                                                       for t in made_of):
                param.requires_grad_(False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """load_state_dict of a Hugging Face state_dict (the model's before replace_experts, or export_state_dict's):
        this module's HF keys (gate_up_proj [E, 2I, H] and down_proj [E, H, I] with every expert, gpt-oss's and Aria's
        layouts, fp8 *_scale_inv) become its layer's keys holding this rank's experts, as load_experts slices them
        (they were unexpected keys, and the layer's missing). Each tensor with every expert (dim 0 E) is taken; any
        other, or a state_dict holding the layer's own key too, is left as it is for torch to name."""
        E = self.num_experts
        local = self.layer.placement.local_expert_ids()
        converted_any = []

        def hf(name: str, dims: int, layer_name: str, convert=lambda t: t) -> None:
            key, mine = prefix + name, f"{prefix}layer.{layer_name}"
            t = state_dict.get(key)
            if (isinstance(t, torch.Tensor) and t.dim() == dims and t.shape[0] == E and mine not in state_dict
                    and type(t).__name__ != "DTensor"):
                state_dict[mine] = convert(t)[local.to(t.device)].contiguous()  # (assign=True keeps it)
                del state_dict[key]
                converted_any.append(mine)

        transpose = lambda t: t.transpose(1, 2)  # noqa: E731
        if self.layout is not None:  # all of its tensors, converted together (_LAYOUTS)
            known = _LAYOUTS[self.layout]
            given = {k: state_dict.get(prefix + k) for k in known.keys}
            if (all(isinstance(t, torch.Tensor) and type(t).__name__ != "DTensor" for t in given.values())
                    and not any(f"{prefix}layer.{mine}" in state_dict for mine in known.sources)):
                converted = dict(zip(("w13", "w2", "b13", "b2"), known.to_layer(given, E)))
                if converted["w13"].shape[0] == E:
                    for mine, t in converted.items():
                        if t is not None:
                            state_dict[f"{prefix}layer.{mine}"] = t[local.to(t.device)].contiguous()
                            converted_any.append(mine)
                    for k in known.keys:
                        del state_dict[prefix + k]
        else:
            hf("gate_up_proj", 3, "w13", transpose if self.transposed else lambda t: t)
            hf("down_proj", 3, "w2", transpose if self.transposed else lambda t: t)
            if self.layer.config.has_bias:  # ([gate; up] and [H] in either layout)
                hf("gate_up_proj_bias", 2, "b13")
                hf("down_proj_bias", 2, "b2")
            if not self.transposed:  # fp8 experts' block scales (plain layout only)
                hf("gate_up_proj_scale_inv", 3, "w13_scale_inv")
                hf("down_proj_scale_inv", 3, "w2_scale_inv")
        if converted_any:  # the rows sit in the layer's current slots: say so (without it the layer took them for
            # the default placement's, so a rebalanced layer moved back and computed other experts' weights)
            state_dict[f"{prefix}layer.{PLACEMENT_KEY}"] = torch.tensor(_placement_tables(self.layer.placement),
                                                                         dtype=torch.int64)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, hidden_states: torch.Tensor, top_k_index: Optional[torch.Tensor] = None,
                top_k_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if getattr(self, "dense", False) and top_k_index is None and top_k_weights is None:
            return self._dense_forward(hidden_states)
        # (anything but a tensor goes to the layer as it is: its checks name it, and fail every rank's dispatch
        # with it; mapping it here raised an unnamed TypeError on this rank alone, the others left in the exchange)
        ids = (torch.where(top_k_index == self.num_experts, torch.full_like(top_k_index, -1), top_k_index)
               if isinstance(top_k_index, torch.Tensor) else top_k_index)
        if (isinstance(hidden_states, torch.Tensor) and isinstance(ids, torch.Tensor) and hidden_states.dim() > 2
                and ids.dim() == 2 and ids.shape[0] == hidden_states.shape[:-1].numel()):
            # DBRX's block hands [B, S, H] states with ids of its [B * S] tokens, and takes [B, S, H] back
            return self.forward(hidden_states.reshape(-1, hidden_states.shape[-1]), top_k_index,
                                top_k_weights).view(hidden_states.shape)
        if self._shared is None or not self._shared.enabled:
            return self.layer(hidden_states, ids, top_k_weights)
        # The block's shared experts run while the dispatch is in flight; the block then gets their
        # output from its own call of them (the hand-off), so it adds exactly what it added before.
        routed, shared = self.layer.routed_and_shared(hidden_states, TopKOutput(ids, top_k_weights),
                                                      self._shared.compute)
        self._shared.stash(hidden_states, shared)
        return routed


    def _dense_forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Llama 4's call (_called_densely) on [E * T, H] rows: each token's non-zero rows (at most its router's
        top_k; more fail an assert) become tokens of one expert each, weight 1 (the router's weight is in them
        already), so T * top_k tokens are dispatched, not E * T; the rest of the [E * T, H] result is 0, as the
        module's is on a row of zeros (no biases, act(0) = 0). No host sync (ids from a device-side mask)."""
        E, H, K = self.num_experts, rows.shape[-1], self._dense_top_k
        routed = rows.detach().reshape(E, -1, H).ne(0).any(dim=-1).t()  # [T, E]
        T = routed.shape[0]
        torch._assert_async(routed.sum(dim=1).le(K).all(), f"experts called on more than top_k={K} non-zero rows "
                                                           f"of one token")
        hit, experts = routed.float().topk(min(K, E), dim=1)  # [T, K]: its experts, then any others (hit 0)
        ids = torch.where(hit.bool(), experts, torch.full_like(experts, -1)).reshape(-1, 1)
        where = (experts * T + torch.arange(T, device=rows.device).unsqueeze(1)).reshape(-1)  # their rows
        flat = rows.reshape(E * T, H)
        out = self.layer(flat[where], ids, torch.ones(ids.shape, dtype=torch.float32, device=rows.device))
        return torch.zeros_like(flat).index_copy(0, where, out)


def _check_meta_source(experts: nn.Module, device: Any) -> None:
    """Experts on the meta device (a model built under `with torch.device("meta"):`) have no values to copy: with a
    real `device` that was load_experts' "w13 is on the meta device" error, naming neither device nor the way out."""
    try:
        target = None if device is None else torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        return  # (EPMoE names a device it cannot take)
    if any(p.is_meta for p in experts.parameters()) and target is not None and target.type != "meta":
        raise ValueError(f"experts={type(experts).__name__} holds its weights on the meta device (no values) and "
                         f"device={device!r} asks for this rank's experts there: EPExperts copies the experts' values, "
                         f"which it has none of. Leave device out (the experts stay on meta; then model.to_empty("
                         f"device=...) and load them: load_state_dict of a Hugging Face state_dict or a replaced "
                         f"model's, or each EPExperts' layer.load_experts), or replace the experts of a model holding "
                         f"its weights")


class _SharedHandoff:
    """A Hugging Face block's shared-experts module whose output EPExperts computes during its
    dispatch: the module's own forward is wrapped (its parameters and state_dict names stay where
    they are) to return that output when the block calls it on the same tokens, else to compute.

    A block that calls its shared experts without a hand-off waiting for those tokens (it calls them
    before its routed experts, as AfMoE, ERNIE-4.5-MoE and Laguna do, or on other tokens) turns the
    hand-off off for good: otherwise every forward would compute them twice and leave a stash
    behind for the next call."""

    def __init__(self, module: nn.Module):
        self.compute = module.forward  # the original bound forward
        self.enabled = True
        self._stashed: Optional[tuple[torch.Tensor, tuple, torch.Tensor]] = None
        module.forward = self  # an instance attribute: nn.Module.__call__ finds it before the class's

    def stash(self, x: torch.Tensor, shared: torch.Tensor) -> None:
        # x is held until the hand-off: no other tensor can take its memory and pass for it
        self._stashed = (x, _identity(x), shared)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        stashed, self._stashed = self._stashed, None
        if stashed is not None and not args and not kwargs and _identity(x) == stashed[1]:
            return stashed[2].view(x.shape)
        self.enabled = False
        return self.compute(x, *args, **kwargs)


def _identity(x: torch.Tensor) -> tuple:
    """The same tokens, unchanged: same memory, elements, last dim and version (an in-place write
    in between would bump it; inference tensors have no version counter). A block may pass its
    [B, S, H] input where the experts got [T, H]."""
    return (x.device, x.data_ptr(), x.numel(), x.shape[-1], x.stride()[-1], None if x.is_inference() else x._version)


def _own_top_k(module: nn.Module) -> Optional[int]:
    """The int top_k a module routes with itself (a router, or a block routing without one, as Doge's), else None."""
    top_k = getattr(module, "top_k", None)
    return int(top_k) if is_int_at_least(top_k, -2 ** 63) else None


def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE block of `model` not swapped yet: the outermost module holding an
    `experts` module, or routing with a `gate` / `router` that has a top_k (JetMoE's MLP, which keeps
    its experts elsewhere), or with a top_k of its own (Doge's retrieval experts). What such a block
    holds (its router, a routed `experts` module as JetMoE's mixture of attention heads) is that
    block's, not a second one; a swapped block (its experts an EPExperts) is no block, nor what it holds."""
    outer: list[str] = []  # blocks found and swapped blocks, outermost first (named_modules is pre-order)
    found = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{prefix}.") or not prefix for prefix in outer):
            continue
        experts = getattr(m, "experts", None)
        if isinstance(experts, EPExperts):
            outer.append(name)
        elif isinstance(experts, nn.Module) or _router_top_k(m) is not None or _own_top_k(m) is not None:
            outer.append(name)
            found.append((name, m))
    return found


def _swap_check(block: nn.Module) -> tuple[int, _Conversion]:
    """(top_k, conversion) for an MoE block EPExperts can take; a ValueError saying why not."""
    name = type(block).__name__
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        top_k = _router_top_k(block)
        top_k = _own_top_k(block) if top_k is None else top_k
        tables = {n: list(c.weight.shape) for n, c in block.named_children() if isinstance(c, nn.Embedding)}
        if tables:  # Doge's CDMoE: product-key retrieval of one-neuron experts, act(down_embed[e] . x) * up_embed[e]
            raise ValueError(f"block={name} routes with top_k={top_k} to experts that are rows of embedding tables "
                             f"({', '.join(f'{n} {shape}' for n, shape in tables.items())}): one neuron each, not "
                             f"gated MLPs with gate_up_proj / down_proj; EPExperts cannot run them")
        raise ValueError(f"block={name} routes with top_k={top_k} but has no `experts` module "
                         f"(its modules: {', '.join(sorted({type(c).__name__ for c in block.children()}))}); "
                         f"EPExperts swaps a block's `experts`")
    top_k = _router_top_k(block)
    top_k = _own_top_k(block) if top_k is None else top_k  # (DBRX's block routes itself: its router gives logits)
    if top_k is None and (is_hf_experts(experts) or any(known.is_it(experts) for known in _LAYOUTS.values())):
        raise ValueError(f"block={name} has experts={type(experts).__name__} but no router `gate` or `router` "
                         f"with an int top_k, nor a top_k of its own; EPExperts cannot tell its top_k")
    try:
        conversion = _conversion(experts)
    except ValueError as err:
        raise ValueError(f"block={name}: {err}") from None
    return top_k, conversion


def _sibling_blocks_check(model: nn.Module, names: list[str], options: dict) -> dict[str, str]:
    """{name: why} for swappable MoE blocks that are siblings: several blocks held by one module (not a layer
    list), as Ernie 4.5 VL's text_moe / vision_moe, which its block calls only when its tokens hold that modality.
    Over a group whose dispatcher exchanges tokens, every rank must enter the same layers' exchanges in the same
    order; ranks whose batches differ would not (a collective mismatch: a hang, an abort, or tokens computed by
    another layer's experts), so such blocks are refused there. One rank, or dispatcher="standard", runs them."""
    from . import dispatchers
    modules = dict(model.named_modules())
    siblings: dict[str, list[str]] = {}
    for name in names:
        parent = name.rpartition(".")[0]
        if name and not isinstance(modules.get(parent), (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            siblings.setdefault(parent, []).append(name)
    siblings = {parent: held for parent, held in siblings.items() if len(held) > 1}
    if not siblings:
        return {}
    dispatcher = options.get("dispatcher", "deepep_normal")
    _, size = group_rank_and_size(as_process_group(options.get("group")))
    if size == 1 or not dispatchers.get(dispatcher).shards_experts:
        return {}
    return {name: f"block={type(modules[name]).__name__} is one of {len(held)} MoE blocks of "
                  f"{type(modules[parent]).__name__} ({', '.join(n.rpartition('.')[2] for n in held)}), which it may "
                  f"call on some of its tokens only (Ernie 4.5 VL: each modality's experts when the batch holds that "
                  f"modality); with dispatcher={dispatcher!r} over {size} ranks, ranks whose batches differ would "
                  f"enter different blocks' exchanges; EPExperts swaps them on one rank or with dispatcher='standard'"
            for parent, held in siblings.items() for name in held}


def _check_model(model: Any) -> None:
    """replace_experts' and export_state_dict's model must be an nn.Module (else: AttributeError 'str' object has
    no attribute 'named_modules')."""
    check_type("model", model, nn.Module, "a torch.nn.Module (a transformers model)")


def _check_options(options: dict) -> None:
    """replace_experts' **options are EPExperts' keyword arguments; any other is named with the ones there are (it
    was EPExperts.__init__'s bare unexpected-keyword TypeError, and a model with no block to swap took any), and
    the dispatcher and runner names are checked before any block is (a model with none took any name)."""
    from . import dispatchers, runners
    allowed = [name for name in named_options(EPExperts, ("experts", "top_k")) if not name.startswith("_")]
    for key, value in options.items():
        if key not in allowed:
            why = " (each block's top_k is its router's)" if key == "top_k" else ""
            raise TypeError(f"replace_experts has no option {key}={value!r}{why}; allowed: overlap_shared_experts, "
                            f"strict, {', '.join(allowed)}{did_you_mean(key, allowed)}")
    if "dispatcher" in options:
        dispatchers.get(options["dispatcher"])
    if "runner" in options:
        runners.check_name(options["runner"])


def replace_experts(model: nn.Module, *, overlap_shared_experts: bool = False, strict: bool = True,
                    **options: Any) -> int:
    """Swap the `experts` of every MoE block in `model` (a block with an HF experts module and a router
    `gate` or `router` that has `top_k`: Mixtral, Qwen-MoE, DeepSeek, OLMoE, GraniteMoE, Phi-MoE, Jamba,
    gpt-oss, Gemma 4, Aria, Llama 4, the OpenAI privacy filter, DBRX (whose block has the top_k), ...) for EPExperts(experts, top_k, **options). Every rank must call it on the same
    model. Returns how many blocks it changed (blocks swapped by an earlier call are left as they are).

    An MoE block it cannot swap exactly is never skipped silently: with strict=True (the default) it
    raises a ValueError naming every such block (its path, class, and why), before any block is
    changed. Such blocks: experts that are not transformers' fused 3-D gate_up_proj / down_proj
    (JetMoE, Switch Transformers, NLLB-MoE, VitPose: per-expert modules or other layouts; Doge:
    one-neuron experts in embedding tables, found by its own top_k), relu2 (NemotronH's: ungated silu / gelu ones swap), identity
    experts handed to the experts module (LongCat-Flash's zero_expert_num before transformers 5.25, whose block
    computes them itself and swaps), packed quantized (MXFP4) weights, no router top_k, interleaved
    weights other than gpt-oss's, other shapes, biases other than gate_up_proj_bias [E, 2I] with down_proj_bias
    [E, H] (the OpenAI privacy filter's swap) or on experts called on every expert's rows (Llama 4's swap), a custom _apply_gate computing none of EPMoE's gates (act(gate) clamped after the activation,
    below ~12 for silu: Step3p7's, Bailing-hybrid's limit_after_act), a post-expert norm (MuSE-Spark), an
    activation other than silu / gelu / gelu_tanh (Inkling 2's softcapped SwiGLU), experts transformers' own expert
    parallelism already split (DistributedConfig ep_size), parametrized weights (torch.nn.utils.parametrize, e.g.
    LoRA) or experts wrapped by an adapter (PEFT's LoRA on target_parameters: merge them first), sibling blocks their
    module may call on some tokens only (Ernie 4.5 VL's text_moe / vision_moe) over more than one rank of an
    exchanging dispatcher. strict=False
    swaps the blocks it can, leaves the others as they are (they keep computing every expert on every rank) and
    warns (UserWarning) naming them. An experts module given as `model` is an error.

    overlap_shared_experts=True: a block whose `shared_experts` module runs after its experts
    (DeepSeek-V3's order) gets their output computed while the dispatch is in flight, off the
    critical path; outputs and gradients are unchanged. Blocks that call their shared experts before
    the routed ones (Qwen2-MoE, AfMoE, ERNIE-4.5-MoE, Laguna) keep computing them first, once.

    The transformers models in `model` (itself and those inside it) save_pretrained a Hugging Face checkpoint
    (export_state_dict's) where no state_dict is given, and raise naming export_state_dict where their experts are
    split over ranks (gathering them needs every rank); give replace_experts the model you save (a model above it
    keeps transformers' save_pretrained, which writes the layers' shards: pass it export_state_dict's)."""
    _check_model(model)
    for flag, value in (("overlap_shared_experts", overlap_shared_experts), ("strict", strict)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}={value!r}; allowed: True or False")
    _check_options(options)
    if is_hf_experts(model) and not _moe_blocks(model):
        raise ValueError(f"model={type(model).__name__} is an experts module itself, not a model or MoE block (its "
                         f"router, which gives top_k, is in the block above it); give replace_experts the model or "
                         f"the block, or build ep.hf.EPExperts(experts, top_k)")
    swaps, refused, checked = [], {}, []
    for name, block in _moe_blocks(model):  # check every block before changing any
        try:
            checked.append((name, block, *_swap_check(block)))
        except ValueError as err:
            refused.setdefault(str(err), []).append(name or "<model>")
    split = _sibling_blocks_check(model, [name for name, *_ in checked], options)
    for name, *swap in checked:
        if name in split:
            refused.setdefault(split[name], []).append(name)
        else:
            swaps.append(tuple(swap))
    if refused:
        blocks = sum(len(names) for names in refused.values())
        reasons = "\n".join(f"  {', '.join(names[:3])}{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}: "
                             f"{reason}" for reason, names in refused.items())
        message = f"replace_experts cannot swap {blocks} of the model's {blocks + len(swaps)} MoE blocks:\n{reasons}"
        if strict:
            error = ValueError(f"{message}\nNothing was changed; strict=False leaves these as they are, swaps the "
                               f"other {len(swaps)} and warns")
            # Every rank should refuse alike (the same model everywhere); a rank whose model differs joins the settings
            # check the others' first EPExperts ends with, so they fail at once naming it, not at the group's timeout
            join_settings_check(options.get("dispatcher", "deepep_normal"), options.get("group"), error,
                                options.get("device"))
            raise error
        warnings.warn(f"{message}\nThese blocks stay as they are (every rank computes all of their experts); "
                      f"the other {len(swaps)} were swapped", stacklevel=2)
    # Blocks that share one experts module (tied experts) share its EPExperts, so they keep training one set
    # of weights; such an EPExperts has no one block's shared experts to compute during its dispatch.
    users: dict[int, int] = {}
    for block, _, _ in swaps:
        users[id(block.experts)] = users.get(id(block.experts), 0) + 1
    made: dict[int, EPExperts] = {}
    for block, top_k, conversion in swaps:
        experts = block.experts
        if id(experts) not in made:
            # (outside inference mode, as the weights it swaps were made: under torch.inference_mode the new experts
            # were inference tensors, which no training step can use and no later load outside it can write)
            with torch.inference_mode(False):
                made[id(experts)] = EPExperts(experts, top_k, _conversion_checked=conversion, **options)
        block.experts = made[id(experts)]
        shared = getattr(block, "shared_experts", None)
        if overlap_shared_experts and isinstance(shared, nn.Module) and users[id(experts)] == 1:
            block.experts._shared = _SharedHandoff(shared)
    _save_as_hugging_face(model)
    return len(swaps)


def _save_as_hugging_face(model: nn.Module) -> None:
    """Give every transformers model in `model` (itself included) that holds an EPExperts the save_pretrained of
    _save_pretrained: its own wrote the replaced state_dict (this rank's shard under the layer's names), which
    from_pretrained took as unexpected keys while it initialised every expert at random."""
    for m in model.modules():
        save = getattr(type(m), "save_pretrained", None)
        patched = m.__dict__.get("save_pretrained")
        if (callable(save) and getattr(patched, "__func__", None) is not _save_pretrained
                and any(isinstance(e, EPExperts) for e in m.modules())):
            m.save_pretrained = types.MethodType(_save_pretrained, m)  # (an instance attribute; copies rebind it)


def _save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """transformers' save_pretrained, writing export_state_dict's Hugging Face checkpoint where no state_dict is
    given (one given is written as it is). Where that needs every rank (experts split over ranks) it raises, before
    any collective, naming the way: save_pretrained is often called on one rank only (transformers' Trainer does),
    where a gather would wait for ranks that are elsewhere, or meet their next layer's exchange."""
    save = type(self).save_pretrained
    try:
        call = inspect.signature(save).bind(self, save_directory, *args, **kwargs)
    except TypeError:
        return save(self, save_directory, *args, **kwargs)  # (it names what it does not take)
    if call.arguments.get("state_dict") is None:
        split = {name: m.layer for name, m in self.named_modules() if isinstance(m, EPExperts)
                 and m.layer.gathers_collectively()}
        if split:
            name, layer = next(iter(split.items()))
            raise ValueError(f"{type(self).__name__}.save_pretrained({str(save_directory)!r}) without state_dict: "
                             f"{len(split)} replaced experts modules ({name}, ...) hold only this rank's experts "
                             f"(dispatcher={layer.dispatcher.name!r} over {layer.dispatcher.world_size} ranks), and "
                             f"gathering them needs every rank; on every rank: state_dict = "
                             f"ep.hf.export_state_dict(model), then where it is not None: "
                             f"model.save_pretrained(path, state_dict=state_dict) (or pass state_dict=model.state_dict() "
                             f"to write this rank's experts under the layer's names)")
        call.arguments["state_dict"] = export_state_dict(self, dst=None)
    return save(*call.args, **call.kwargs)


def export_state_dict(model: nn.Module, dst: Optional[int] = 0) -> Optional[dict[str, torch.Tensor]]:
    """`model.state_dict()` as the Hugging Face model had it before replace_experts: each EPExperts'
    `<prefix>.layer.w13` / `.layer.w2` (this rank's shard) become `<prefix>.gate_up_proj` [E, 2I, H]
    and `<prefix>.down_proj` [E, H, I] with every expert, gathered over the layer's group (fp8 experts:
    also their `gate_up_proj_scale_inv` / `down_proj_scale_inv`; gpt-oss: its own layout). Every rank
    must call it (one gather per expert tensor); dst r: the dict on rank r of the layers' group only (with
    layers over a dp x ep DeviceMesh's ep group: on rank r of each ep group), None elsewhere (dst None: on
    every rank). Feed it to `model.save_pretrained(path, state_dict=...)`."""
    _check_model(model)
    # every name, also a second one of an EPExperts that several blocks share (the state_dict holds both)
    experts = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, EPExperts)}
    if not experts:  # nothing swapped (e.g. strict=False refused every block): still on dst only
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if dst is not None and not (is_int_at_least(dst, 0) and dst < world_size):
            raise ValueError(f"dst={dst!r}; allowed: None (every rank) or a rank 0..{world_size - 1}")
        return None if dst is not None and world_size > 1 and dist.get_rank() != dst else model.state_dict()
    gathered, by_module = {}, {}  # one gather per EPExperts (a shared one has several names), same order on every rank
    for name, m in experts.items():
        if id(m) not in by_module:
            by_module[id(m)] = m.layer.gather_experts(dst)
        gathered[name] = by_module[id(m)]
    if any(w is None for w in gathered.values()):
        return None
    hf_keys = {}  # each EPExperts' HF keys, in the order its HF module registered them
    for name, weights in gathered.items():
        if experts[name].layout is not None:
            hf_keys[name] = {f"{name}.{key}": value for key, value in _LAYOUTS[experts[name].layout].to_hf(
                weights.w13, weights.w2, weights.b13, weights.b2).items()}
            continue
        transpose = (lambda w: w.transpose(1, 2).contiguous()) if experts[name].transposed else (lambda w: w)
        keys = hf_keys[name] = {f"{name}.gate_up_proj": transpose(weights.w13)}
        if weights.quantized:  # FP8Experts' block scales, in its layout (the layer keeps them as loaded)
            keys[f"{name}.gate_up_proj_scale_inv"] = weights.w13_scale_inv
        if weights.b13 is not None:  # (the privacy filter's order: each bias after its weight)
            keys[f"{name}.gate_up_proj_bias"] = weights.b13
        keys[f"{name}.down_proj"] = transpose(weights.w2)
        if weights.quantized:
            keys[f"{name}.down_proj_scale_inv"] = weights.w2_scale_inv
        if weights.b2 is not None:
            keys[f"{name}.down_proj_bias"] = weights.b2
    out = {}  # model.state_dict()'s order, each EPExperts' HF keys where its layer's keys were
    for key, value in model.state_dict().items():
        owner = next((name for name in experts if key.startswith(f"{name}.layer.")), None)
        if owner is None:
            out[key] = value
        elif owner in hf_keys:
            out.update(hf_keys.pop(owner))
    for keys in hf_keys.values():  # (an EPExperts whose layer has no state_dict entry: none expected)
        out.update(keys)
    return out
