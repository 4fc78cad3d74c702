"""The rule every registry (runners, dispatchers, formats, conversions, fused pairs) follows: a key is
registered once. A second registration means two modules claim one name; failing loudly beats the
later import silently replacing the earlier one."""
from __future__ import annotations

import inspect
from typing import Any, Optional


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


def check_create_args(cls: type, kind: str, config: Any, options: dict, fixed: tuple[str, ...]) -> None:
    """What create() hands `cls`, checked before building it: `config` an ep.MoeConfig, and every
    option one that cls.__init__ takes (a misspelt option would otherwise surface as a TypeError
    naming a private __init__, or as an AttributeError deep inside the constructor). fixed: the
    parameters create() passes itself, left out of the allowed list."""
    from .config import MoeConfig
    if not isinstance(config, MoeConfig):
        raise TypeError(f"config={config!r}; allowed: an ep.MoeConfig (e.g. layer.config)")
    allowed = _keywords(cls)
    unknown = sorted(set(options) - set(allowed)) if allowed is not None else []
    if unknown:
        names = [n for n in allowed if n not in fixed and n != "config"]
        raise TypeError(f"{kind} {cls.name!r} has no option {unknown[0]!r}; allowed: {', '.join(names) or 'none'}")


def _keywords(cls: type) -> Optional[list]:
    """The keyword parameters cls(...) accepts, through __init__s that only pass (*args, **kwargs) on
    to their base's; None when an __init__ takes arbitrary keywords of its own (a plugin's **options)."""
    for base in cls.__mro__:
        if "__init__" not in vars(base):
            continue
        params = list(inspect.signature(vars(base)["__init__"]).parameters.values())[1:]  # past self
        if [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return None
