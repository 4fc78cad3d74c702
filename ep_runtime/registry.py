"""The rule every registry (runners, dispatchers, formats, conversions, fused pairs) follows: a key is
registered once. A second registration means two modules claim one name; failing loudly beats the
later import silently replacing the earlier one."""
from __future__ import annotations

import inspect
from typing import Any


def add_once(registry: dict, key: Any, value: Any, what: str) -> None:
    """registry[key] = value, or raise naming `what` and who registered it first."""
    if key in registry:
        first = registry[key]
        by = f" (by {first.__module__}.{first.__qualname__})" if hasattr(first, "__qualname__") else ""
        raise ValueError(f"{what} is already registered{by}; each name is registered once")
    registry[key] = value


def check_options(cls: type, kind: str, name: str, options: dict, fixed: tuple) -> None:
    """Raise naming kind `name`, the option and the options it takes when `options` holds a keyword
    cls's constructor does not take (fixed: its arguments given by the caller, not options). **kwargs
    are followed up to the base classes that name them."""
    allowed: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
        allowed += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and p.name not in ("self",) + fixed and p.name not in allowed]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    for option in options:
        if option not in allowed:
            raise TypeError(f"{kind} {name} has no option {option!r}; allowed: {', '.join(allowed) or 'none'}")


def register_named(registry: dict, cls: type, kind: str) -> type:
    """Register class `cls` under its `name` class attribute (kind: "runner", "dispatcher")."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{kind} class {cls.__qualname__} has no name")
    add_once(registry, cls.name, cls, f"{kind} {cls.name!r}")
    return cls
