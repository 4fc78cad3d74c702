"""Runner backends, one module each; every module registers its class here on import.

    ep_runtime.runners.create("torch", config=cfg)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ep_runtime.config import MoeConfig

from .base import GemmHooks, RunnerBackend

_RUNNERS: dict[str, type[RunnerBackend]] = {}


def register(cls: type[RunnerBackend]) -> type[RunnerBackend]:
    _RUNNERS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of backends that can run in this process (e.g. triton needs a GPU or TRITON_INTERPRET)."""
    return [name for name, cls in _RUNNERS.items() if cls.is_available()]


def registered() -> list[str]:
    return list(_RUNNERS)


# "auto" takes the first of these that runs here and has a path for the dispatch format.
AUTO_PREFERENCE = ("masked", "triton", "torch")


def resolve(name: str, device: Any = None, format: Optional[str] = None) -> str:
    """Resolve "auto": on CUDA the fastest available backend registered for `format` (masked for
    deepep_ll, triton for the others), else torch. Any other name is returned as is."""
    if name != "auto":
        return name
    import torch
    from ep_runtime.runner_core import registered_pairs
    if device is None or torch.device(device).type != "cuda":
        return "torch"
    pairs = registered_pairs()
    for backend in AUTO_PREFERENCE:
        if backend in available() and (format or "standard", backend) in pairs:
            return backend
    return "torch"


def check_name(name: str) -> None:
    """Raise naming the registered backends when `name` is neither one of them nor "auto"."""
    if name != "auto" and name not in _RUNNERS:
        raise ValueError(f"runner={name!r} is unknown; registered: {', '.join(_RUNNERS)} (or 'auto')")


def create(name: str, config: MoeConfig, hooks: Optional[GemmHooks] = None, *, device: Any = None,
           format: Optional[str] = None, **options: Any) -> RunnerBackend:
    """Build runner backend `name` for `config`; rejects config fields it cannot compute. "auto" is
    resolved for `device` and dispatch `format` (see resolve; no device: torch)."""
    check_name(name)
    name = resolve(name, device, format)
    cls = _RUNNERS[name]
    if not cls.is_available():
        raise RuntimeError(f"runner={name!r} cannot run here: {cls.unavailable_reason()}")
    return cls(config, hooks=hooks, **options)


from . import torch_runner  # noqa: E402,F401  (registers "torch")
from . import masked_runner  # noqa: E402,F401  (registers "masked" and its deepep_ll path; needs triton and CUDA or TRITON_INTERPRET=1)
from . import triton_runner  # noqa: E402,F401  (registers "triton"; available with triton and CUDA or TRITON_INTERPRET=1)
from .triton_runner import fused_experts  # noqa: E402

__all__ = ["GemmHooks", "RunnerBackend", "fused_experts", "available", "check_name", "create", "register", "registered", "resolve"]
