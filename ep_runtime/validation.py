"""Input checks that run before any communication. Every rank runs the same checks on its own
input, so symmetric bad input fails every rank together; messages name the argument, the value and
the allowed range. Value checks (id range) read one scalar per tensor; they are skipped while a CUDA
graph is being captured, where a host read is impossible (shapes and dtypes are still checked)."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

ID_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def is_int_at_least(value, minimum: int) -> bool:
    """An integer (Python or numpy; bool excluded: True would pass as 1) no smaller than `minimum`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def is_power_of_two_at_least(value, minimum: int) -> bool:
    """An integer (as is_int_at_least takes) no smaller than `minimum` that is a power of two."""
    return is_int_at_least(value, minimum) and value & (value - 1) == 0


def check_tile_sides(owner: str, tiles, names: tuple[str, ...]) -> None:
    """Raise naming the first of `tiles`' fields `names` (a Triton kernel's block sides) that is not a power of
    two >= 16: tl.arange takes powers of two only and tl.dot on a GPU sides of 16 or more; another value
    failed inside Triton (an InterpreterError, a ZeroDivisionError, a compile error) naming no argument."""
    for name in names:
        value = getattr(tiles, name)
        if not is_power_of_two_at_least(value, 16):
            raise ValueError(f"{owner}.{name}={value!r}; allowed: a power of two >= 16 (16, 32, 64, ...)")


def check_type(name: str, value, kind: type, allowed: str) -> None:
    """Raise naming argument `name`, its value (cut to 80 characters) and type, and `allowed`, when `value` is no
    `kind` (a module, a dict or an optimizer of the wrong kind failed later as "'NoneType' object has no attribute
    ..." or "... is not iterable", naming neither)."""
    if not isinstance(value, kind):
        text = repr(value)
        raise TypeError(f"{name}={text if len(text) <= 80 else text[:77] + '...'} ({type(value).__name__}); "
                        f"allowed: {allowed}")


def is_bool(value) -> bool:
    """True or False: Python's, or a numpy bool scalar (not 0 / 1, not None)."""
    return isinstance(value, bool) or (getattr(getattr(value, "dtype", None), "kind", None) == "b"
                                       and getattr(value, "ndim", None) == 0)


def finite_float(name: str, value) -> float:
    """`value` as a float when it is a finite real number (Python or numpy; not bool), else an error."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def check_routed_scaling_factor(value) -> float:
    """A routed_scaling_factor as a float: finite and > 0 (0 would silently zero every routed output, a negative one
    flip its sign; no model scales so, and SGLang / vLLM take either without a word)."""
    value = finite_float("routed_scaling_factor", value)
    if not value > 0:
        raise ValueError(f"routed_scaling_factor={value!r}; allowed: a finite number > 0 (1.0: no scaling)")
    return value


_CUDA: list = []  # torch.cuda.is_available(), asked once: it costs ~2 us and capturing() runs several times a call


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (False without CUDA)."""
    if torch.compiler.is_compiling():  # dynamo folds is_available(); it would guard on the cache's first fill
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()  # and compile again
    if not _CUDA:
        _CUDA.append(torch.cuda.is_available())
    return _CUDA[0] and torch.cuda.is_current_stream_capturing()


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """torch._assert_async(condition, message) with the message cut to what CUDA takes (under 255 characters: a
    longer one raised at the call, inside a CUDA graph capture; the CPU takes any). The cut keeps the start, where
    the settings are named."""
    torch._assert_async(condition, message if len(message) < 255 else message[:251] + "...")


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def float_dtype(dtype) -> torch.dtype:
    """A layer's or runner's token dtype checked: a floating torch.dtype of WEIGHT_DTYPES or its name (e.g.
    "bfloat16"); None: torch's default (e.g. a Hugging Face config's torch_dtype left unset)."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(map(str, WEIGHT_DTYPES))} (or their names)")
    return dtype


def as_device(device) -> torch.device:
    """`device` (a torch.device, "cuda:0", an index) as a torch.device; anything else raises naming the argument
    (torch's own error names neither, e.g. "device() received an invalid combination of arguments")."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:  # (torch's message is several lines for a wrong type: keep its first)
        raise ValueError(f"device={device!r} is not a torch device ({str(err).splitlines()[0]}); allowed: a "
                         f"torch.device, its name ('cpu', 'cuda', 'cuda:1', ...) or a CUDA index >= 0") from None


def layer_dtype_and_device(dtype, device) -> tuple[torch.dtype, torch.device]:
    """A layer's dtype (a floating torch.dtype or its name, e.g. "bfloat16"; None: torch's default) and
    device (None: torch's default device, which `with torch.device("meta"):` and
    torch.set_default_device set, as for torch's own modules; cpu unless changed), checked: a wrong
    one would otherwise surface as a torch error far from the argument."""
    dtype = float_dtype(dtype)
    device = torch.get_default_device() if device is None else as_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} needs CUDA, and this process has none (torch.cuda.is_available() "
                         f"is False); use device='cpu'")
    return dtype, device


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise naming the tensor and the first non-finite entry (one host read; meta tensors pass)."""
    if t.is_meta:
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        # (detached: float() of a tensor needing a gradient warns, and under -W error replaced this error)
        raise ValueError(f"{name} has a non-finite value {float(t.detach()[tuple(where)])} at {where}")


def check_float_tensor(name: str, t, device: Optional[torch.device] = None, device_of: str = "x") -> None:
    """`t` is a floating torch.Tensor (on `device`, the device of `device_of`, when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}; expected {device} (the device of {device_of})")


def check_hidden_states(x: torch.Tensor, hidden_size: int, dtype: Optional[torch.dtype] = None,
                        device: Optional[torch.device] = None, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"{name} has shape {list(x.shape)}; expected [T, {hidden_size}] (hidden_size={hidden_size})")
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}; expected a floating dtype")
    if x.dtype not in WEIGHT_DTYPES:  # float8 is floating too: gloo refused it mid-exchange ("Invalid scalar type")
        raise TypeError(f"{name} has dtype {x.dtype}; allowed: {', '.join(map(str, WEIGHT_DTYPES))} (tokens travel "
                        f"and are computed in one of them; for an fp8 dispatch pass them so with use_fp8=True)")
    if device is None and x.is_meta:  # (a layer names its own device below) torch failed mid-dispatch, naming nothing
        raise ValueError(f"{name} is on the meta device (it has no values); allowed: a tensor holding the tokens, on "
                         f"the group's device (cpu for gloo, cuda for NCCL)")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}; this layer's weights are {dtype} (cast {name} with "
                        f".to({dtype}), build the layer in {x.dtype}, or run it under torch.autocast)")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"{name} is on {x.device}; this layer is on {torch.device(device)}")


def check_expert_dtypes(weights, dtype: torch.dtype, tokens: str) -> None:
    """Unquantized experts compute in the tokens' dtype: raise naming the first of w13, w2, b13, b2 (an
    ExpertWeights' tensors) of another dtype, which would otherwise fail inside a matmul or a Triton
    kernel naming neither. dtype: the tokens'; tokens: where it comes from, e.g. "x". Quantized experts
    (weights.quant set) pass: ExpertWeights.check holds their dtypes."""
    if weights.quant is not None:
        return
    for name in ("w13", "w2", "b13", "b2"):
        t = getattr(weights, name)
        if t is not None and t.dtype != dtype:
            fp8 = name in ("w13", "w2") and t.element_size() == 1
            fp8 = " (float8 experts need w13_scale_inv and w2_scale_inv)" if fp8 else ""
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: {dtype}, the dtype of {tokens} (unquantized "
                            f"experts compute in the tokens' dtype){fp8}")


def check_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int, num_experts: int,
               top_k: Optional[int], device: Optional[torch.device] = None, values: bool = True) -> None:
    """ids [T, K] integer in [-1, E); weights [T, K] floating, same device. values=False: shapes,
    dtypes and devices only (the caller checks values, e.g. inside its count exchange)."""
    device = torch.device(device) if device is not None else None
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        _check_topk_tensor(name, t, num_tokens, top_k, device)
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids {list(topk_ids.shape)} and topk_weights {list(topk_weights.shape)} differ in shape")
    _check_ids_dtype(topk_ids)
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights has dtype {topk_weights.dtype}; expected a floating dtype")
    if values:
        check_topk_values(topk_ids, topk_weights, num_experts)


def _check_topk_tensor(name: str, t, num_tokens: Optional[int], top_k: Optional[int],
                       device: Optional[torch.device]) -> None:
    """`t` (topk_ids or topk_weights) is a [num_tokens, top_k] tensor on `device` (None: any T, K, device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 2 or num_tokens not in (None, t.shape[0]) or (top_k is not None and t.shape[1] != top_k):
        k = top_k if top_k is not None else "K"
        raise ValueError(f"{name} has shape {list(t.shape)}; expected [{'T' if num_tokens is None else num_tokens}, "
                         f"{k}] (T rows of x, top_k)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}; expected {device} (the device of x)")


def _check_ids_dtype(topk_ids: torch.Tensor) -> None:
    if topk_ids.dtype not in ID_DTYPES:  # unsigned wider types would hide -1 (uint32 2**32-1 reads as -1)
        raise TypeError(f"topk_ids has dtype {topk_ids.dtype}; expected a signed integer dtype (int32 or int64; "
                        f"int8, int16 and uint8 also accepted)")


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int, top_k: Optional[int]) -> None:
    """topk_ids on their own (a layout of them, no dispatch): [T, top_k], a signed integer dtype, ids in
    [-1, E) (one host read; none while capturing a CUDA graph, as check_topk_values)."""
    _check_topk_tensor("topk_ids", topk_ids, None, top_k, None)
    _check_ids_dtype(topk_ids)
    if topk_ids.numel() and not capturing() and bool(_out_of_range(topk_ids, num_experts).any()):
        _raise_bad_id(topk_ids, num_experts)


def weights_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The dtype topk_weights travel and scale the experts' outputs in, for tokens of `x_dtype`: float32, and
    float64 for float64 tokens (rounding their weights to float32 cut a float64 layer's results, and its weights'
    gradients, to float32's precision: 1e-8 off the float64 reference). Every rank's x has one dtype (the count
    table checks it), so every rank sends its weights in the same one."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def topk_value_flags(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                     distinct: bool = False) -> torch.Tensor:
    """[2] int32 on the device, no sync: (any id outside [-1, E), any non-finite weight), and a third,
    any token listing one expert twice, when `distinct`. Exchanges that read a count table on the host
    carry these in it, so every rank sees any rank's bad input."""
    flags = [_out_of_range(topk_ids, num_experts).any(), ~torch.isfinite(topk_weights).all()]
    if distinct:
        flags.append(_repeated(topk_ids).any())
    return torch.stack(flags).to(torch.int32)


def _out_of_range(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, K] bool: ids outside [-1, num_experts). Narrow ids are compared as int32: in their own dtype -1 wraps
    to 255 for uint8 (every id read as < -1) and 128 or 256 to -128 or 0 for int8 (every id read as >= E)."""
    if topk_ids.dtype not in (torch.int32, torch.int64):
        topk_ids = topk_ids.to(torch.int32)
    return (topk_ids < -1) | (topk_ids >= num_experts)


def _repeated(topk_ids: torch.Tensor) -> torch.Tensor:
    """[T, K-1] bool over the ids sorted per token: an expert (not -1) equal to the one before it."""
    ids = topk_ids.sort(dim=1).values
    return (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)


def check_topk_values(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                      flags: Optional[list] = None, distinct: Optional[str] = None) -> None:
    """Raise naming the first bad id or weight (one host read; none while capturing a CUDA graph).
    flags: this rank's topk_value_flags already read on the host. distinct: why no token may list
    one expert twice, when the caller needs that (None: repeats are fine)."""
    if topk_ids.numel() == 0 or (flags is None and capturing()):
        return
    if flags is None:
        flags = topk_value_flags(topk_ids, topk_weights, num_experts, distinct is not None).tolist()
    bad_id, bad_weight = flags[:2]
    if bad_id:
        _raise_bad_id(topk_ids, num_experts)
    if bad_weight:
        check_finite("topk_weights", topk_weights)
    if len(flags) > 2 and flags[2]:
        t = int(_repeated(topk_ids).any(1).nonzero()[0])
        raise ValueError(f"topk_ids row {t} lists an expert twice: {topk_ids[t].tolist()}; {distinct}")


def _raise_bad_id(topk_ids: torch.Tensor, num_experts: int, why: Optional[str] = None) -> None:
    """Raise naming the first id outside [-1, E) of topk_ids (which holds one), its position and `why` that range
    (default: num_experts)."""
    where = _out_of_range(topk_ids, num_experts).nonzero()[0].tolist()
    value = int(topk_ids[where[0], where[1]])
    raise ValueError(f"topk_ids has id {value} at {where}; allowed -1..{num_experts - 1} "
                     f"({why or f'num_experts={num_experts}'})")


def check_ids_not_below_minus_one(topk_ids: torch.Tensor, why: str) -> None:
    """No id below -1 (which no expert has, on any rank: a caller's bug, else silently skipped as another rank's
    expert), checked on the host for CPU ids only: on CUDA the check (four small ops, ~8 us of a decode step's
    ~100 us graph replay) is not made, and such an id is skipped as another rank's."""
    if topk_ids.numel() == 0 or topk_ids.device.type != "cpu":
        return
    below = topk_ids < -1
    if bool(below.any()):
        where = [int(i) for i in below.nonzero()[0]]
        raise ValueError(f"topk_ids has id {int(topk_ids[tuple(where)])} at {where}; allowed: -1 (no expert) or an id "
                         f">= 0 ({why})")


def check_local_ids(topk_ids: torch.Tensor, num_local_experts: int) -> None:
    """A runner input's mapped ids in -1..L (L the sink, -1 no expert): on the host for CPU ids, a device-side
    assert on CUDA (no host sync). For inputs made by hand: an id above L indexed past the expert mask (an
    IndexError naming neither) or was skipped by the triton kernels, one below -1 was skipped everywhere."""
    if topk_ids.numel() == 0 or topk_ids.is_meta:
        return
    L = num_local_experts
    why = f"local expert indices, {L}: the sink; -1: no expert"
    if topk_ids.is_cuda:
        assert_on_device(~_out_of_range(topk_ids, L + 1).any(), f"topk_ids has an id outside -1..{L} ({why})")
    elif bool(_out_of_range(topk_ids, L + 1).any()):
        _raise_bad_id(topk_ids, L + 1, why)
