"""Token dispatchers, one module each; every module registers its class here on import.

    ep_runtime.dispatchers.create("deepep_normal", group=group, config=cfg)
"""
from __future__ import annotations

from typing import Any, Optional

from ep_runtime import envs
from ep_runtime.config import MoeConfig
from ep_runtime.registry import build, check_config, did_you_mean, register_named
from ep_runtime.validation import as_device

from .base import Dispatcher, join_settings_check
from .overlap import ExchangeWork, ReceiveHook

_DISPATCHERS: dict[str, type[Dispatcher]] = {}


def register(cls: type[Dispatcher]) -> type[Dispatcher]:
    """Class decorator: make dispatcher `cls.name` available to create(); a name is registered once."""
    return register_named(_DISPATCHERS, cls, "dispatcher")


def registered() -> list[str]:
    return list(_DISPATCHERS)


def get(name: str) -> type[Dispatcher]:
    if not isinstance(name, str) or name not in _DISPATCHERS:  # (a list or dict is no name: not a bare "unhashable")
        raise ValueError(f"dispatcher={name!r} is unknown; registered: {', '.join(_DISPATCHERS)}"
                         f"{did_you_mean(name, list(_DISPATCHERS))}")
    return _DISPATCHERS[name]


def create(name: str, config: MoeConfig, group: Optional[Any] = None, device: Optional[Any] = None,
           **options: Any) -> Dispatcher:
    """Build dispatcher `name` over `group` (a ProcessGroup holding this rank or a 1-D DeviceMesh; None: the
    default group, or a single process). Every rank of the group must call this together: it checks that
    they all built the same settings (on `device` when the group is NCCL; None: the current CUDA device), and a
    rank that cannot build its dispatcher fails the others there, naming it and its error."""
    cls = get(name)
    try:
        # Every knob, not only this dispatcher's: one read at each call (EP_RUNTIME_SCRATCH_MB, the Triton GEMM
        # choices) invalid on one rank only was not noticed here, on CPU ranks never, and on GPUs that rank
        # raised between dispatch and combine while the others waited in combine until the timeout.
        envs.validate_all(warn=False)
        check_config(config)
        if device is not None:  # (a gloo group ignored a bad one, silently)
            as_device(device)
        dispatcher = build(cls, "dispatcher", name, dict(config=config, group=group), options)
    except Exception as error:  # on this rank only, maybe: the others would wait in the settings check
        join_settings_check(name, group, error, device)
        raise
    dispatcher.check_same_settings_on_every_rank(device)
    return dispatcher


from . import deepep_ll, deepep_normal, mori, standard  # noqa: E402,F401  (each registers itself)

__all__ = ["Dispatcher", "ExchangeWork", "ReceiveHook", "create", "get", "register", "registered"]
