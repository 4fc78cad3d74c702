"""The rule every registry (runners, dispatchers, formats, conversions, fused pairs) follows: a key is
registered once. A second registration means two modules claim one name; failing loudly beats the
later import silently replacing the earlier one."""
from __future__ import annotations

from typing import Any


def add_once(registry: dict, key: Any, value: Any, what: str) -> None:
    """registry[key] = value, or raise naming `what` and who registered it first."""
    if key in registry:
        first = registry[key]
        by = f" (by {first.__module__}.{first.__qualname__})" if hasattr(first, "__qualname__") else ""
        raise ValueError(f"{what} is already registered{by}; each name is registered once")
    registry[key] = value


def register_named(registry: dict, cls: type, kind: str) -> type:
    """Register class `cls` under its `name` class attribute (kind: "runner", "dispatcher")."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{kind} class {cls.__qualname__} has no name")
    add_once(registry, cls.name, cls, f"{kind} {cls.name!r}")
    return cls
