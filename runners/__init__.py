"""Runner backends, one module each; every module registers its class here on import.

    ep_runtime.runners.create("torch", config=cfg)
"""
from __future__ import annotations

from typing import Any, Optional

from ep_runtime.config import MoeConfig
from ep_runtime.quant import QuantConfig
from ep_runtime.registry import build, check_config, did_you_mean, register_named
from ep_runtime.validation import as_device, float_dtype

from .base import GemmHooks, RunnerBackend, check_hooks

_RUNNERS: dict[str, type[RunnerBackend]] = {}


def register(cls: type[RunnerBackend]) -> type[RunnerBackend]:
    """Class decorator: make backend `cls.name` available to create(); a name is registered once."""
    if not cls.layouts:
        raise ValueError(f"runner {cls.name!r} declares no input layouts (RunnerBackend.layouts)")
    return register_named(_RUNNERS, cls, "runner")


def available() -> list[str]:
    """Names of backends that can run in this process (e.g. triton needs a GPU or TRITON_INTERPRET)."""
    return [name for name, cls in _RUNNERS.items() if cls.is_available()]


def registered() -> list[str]:
    return list(_RUNNERS)


# "auto" on CUDA takes the first of these that runs here and computes the format's layout natively.
AUTO_PREFERENCE = ("masked", "triton", "torch")


def resolve(name: str, device: Any = None, format: Optional[str] = None, dtype: Any = None,
            hooks: Optional[GemmHooks] = None, quant: Optional[QuantConfig] = None) -> str:
    """Resolve "auto": on CUDA the first backend of AUTO_PREFERENCE that is available and computes, when
    given, `dtype`, GEMM `hooks` and experts stored in `quant`'s format (RunnerBackend.refusal), preferring
    one that computes the dispatch format's layout natively (masked for deepep_ll, triton for the others; with
    hooks deepep_ll's rows go to triton's kernels through the layout conversion; with hooks neither captures); else
    torch, which computes them all. Any other name is returned as is. An unknown format is an error on any
    device and for any name (a named backend took format="nope" or 3 without a word)."""
    import torch

    from ep_runtime.runner_core import format_path
    layout = format_path(format or "standard").layout  # (first: a format that is not registered is named anywhere)
    if name != "auto":
        return name
    if device is None or torch.device(device).type != "cuda":
        return "torch"
    hooks, here = check_hooks(hooks), available()
    able = [backend for backend in AUTO_PREFERENCE if backend in here and not _RUNNERS[backend].refusal(hooks, quant)
            and (dtype is None or _RUNNERS[backend].dtypes is None or dtype in _RUNNERS[backend].dtypes)]
    native = [backend for backend in able if layout in _RUNNERS[backend].layouts]
    return (native or able or ["torch"])[0]


def get(name: str) -> type[RunnerBackend]:
    """The registered backend class `name`."""
    check_name(name)
    if name == "auto":
        raise ValueError("runner='auto' is no class; resolve it first (runners.resolve)")
    return _RUNNERS[name]


def check_name(name: str) -> None:
    """Raise naming the registered backends when `name` is neither one of them nor "auto"."""
    if not isinstance(name, str) or name != "auto" and name not in _RUNNERS:  # (a list is no name: not "unhashable")
        raise ValueError(f"runner={name!r} is unknown; registered: {', '.join(_RUNNERS)} (or 'auto')"
                         f"{did_you_mean(name, list(_RUNNERS))}")


def create(name: str, config: MoeConfig, hooks: Optional[GemmHooks] = None, *, device: Any = None,
           format: Optional[str] = None, dtype: Any = None, quant: Optional[QuantConfig] = None,
           **options: Any) -> RunnerBackend:
    """Build runner backend `name` for `config`; rejects config fields it cannot compute and, when
    given, a `dtype` (the tokens') it cannot compute in, and experts stored in `quant`'s format it cannot
    compute with its `hooks`. "auto" is resolved for `device`, dispatch `format`, `dtype`, `hooks` and
    `quant` (see resolve; no device: torch)."""
    check_name(name)
    if dtype is not None:  # (checked before "auto" compares it with each backend's dtypes)
        dtype = float_dtype(dtype)
    if device is not None:  # (a named backend ignored a bad one; "auto" failed in torch.device naming nothing)
        device = as_device(device)
    name = resolve(name, device, format, dtype, hooks, quant)
    cls = get(name)
    if not cls.is_available():
        raise RuntimeError(f"runner={name!r} cannot run here: {cls.unavailable_reason()}")
    check_config(config)
    if dtype is not None:
        cls.check_dtype(dtype)
    backend = build(cls, "runner", name, dict(config=config, hooks=hooks), options)
    if quant is not None:
        backend.check_quant(quant)
    return backend


# Registration order is the order registered() and error messages list the backends.
# isort: off
from . import torch_runner  # noqa: E402,F401  (registers "torch")
from . import triton_runner  # noqa: E402,F401  (registers "triton"; available with triton and CUDA or TRITON_INTERPRET=1)
from . import masked_runner  # noqa: E402,F401  (registers "masked"; same needs as triton)
# isort: on
from .triton_runner import fused_experts  # noqa: E402

__all__ = ["GemmHooks", "RunnerBackend", "fused_experts", "available", "check_name", "create", "get", "register",
           "registered", "resolve"]
