"""Token dispatchers, one module each; every module registers its class here on import.

    ep_runtime.dispatchers.create("deepep_normal", group=group, config=cfg)
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

from ep_runtime.config import MoeConfig
from ep_runtime.registry import register_named

from .base import Dispatcher
from .overlap import ExchangeWork, ReceiveHook

_DISPATCHERS: dict[str, type[Dispatcher]] = {}


def register(cls: type[Dispatcher]) -> type[Dispatcher]:
    """Class decorator: make dispatcher `cls.name` available to create(); a name is registered once."""
    return register_named(_DISPATCHERS, cls, "dispatcher")


def registered() -> list[str]:
    return list(_DISPATCHERS)


def get(name: str) -> type[Dispatcher]:
    if name not in _DISPATCHERS:
        raise ValueError(f"dispatcher={name!r} is unknown; registered: {', '.join(_DISPATCHERS)}")
    return _DISPATCHERS[name]


def create(name: str, config: MoeConfig, group: Optional[Any] = None, device: Optional[Any] = None,
           **options: Any) -> Dispatcher:
    """Build dispatcher `name` over `group` (None: the default group, or a single process). Every
    rank of the group must call this together: it checks that they all built the same settings
    (on `device` when the group is NCCL; None: the current CUDA device)."""
    cls = get(name)
    allowed = options_of(cls)
    for option in options:
        if option not in allowed:
            raise TypeError(f"dispatcher {name} has no option {option!r}; allowed: {', '.join(allowed)}")
    dispatcher = cls(config, group=group, **options)
    dispatcher.check_same_settings_on_every_rank(device)
    return dispatcher


def options_of(cls: type[Dispatcher]) -> list[str]:
    """The options (keyword arguments besides config and group) cls's constructor takes, following
    **kwargs up to the base classes that name them."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name not in ("self", "config", "group") and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


from . import deepep_ll, deepep_normal, mori, standard  # noqa: E402,F401  (each registers itself)

__all__ = ["Dispatcher", "ExchangeWork", "ReceiveHook", "create", "get", "register", "registered"]
