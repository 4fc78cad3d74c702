"""The rule every registry (runners, dispatchers, formats, conversions, fused pairs) follows: a key is
registered once. A second registration means two modules claim one name; failing loudly beats the
later import silently replacing the earlier one."""
from __future__ import annotations

import difflib
import inspect
import re
from typing import Any, Sequence


def add_once(registry: dict, key: Any, value: Any, what: str) -> None:
    """registry[key] = value, or raise naming `what` and who registered it first."""
    if key in registry:
        first = registry[key]
        by = f" (by {first.__module__}.{first.__qualname__})" if hasattr(first, "__qualname__") else ""
        raise ValueError(f"{what} is already registered{by}; each name is registered once")
    registry[key] = value


def build(cls: type, kind: str, name: str, fixed: dict, options: dict) -> Any:
    """cls(**fixed, **options), where an option its constructor does not take raises a TypeError naming
    kind `name`, the option and the options it names instead of Python's bare "unexpected keyword
    argument" (fixed: the arguments the caller gives, not options). Only that error is translated, so a
    class that takes options through **kwargs itself keeps working."""
    try:
        return cls(**fixed, **options)
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None or unknown.group(1) not in options:
            raise
        allowed = ", ".join(named_options(cls, tuple(fixed))) or "none"
        raise TypeError(f"{kind} {name} has no option {unknown.group(1)!r}; allowed: {allowed}") from err


def named_options(cls: type, fixed: tuple) -> list[str]:
    """The keyword arguments cls's constructor names, besides `fixed`, following **kwargs up to the
    base classes that name them."""
    allowed: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
        allowed += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and p.name not in ("self",) + fixed and p.name not in allowed]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return allowed


def register_named(registry: dict, cls: type, kind: str) -> type:
    """Register class `cls` under its `name` class attribute (kind: "runner", "dispatcher")."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{kind} class {cls.__qualname__} has no name")
    add_once(registry, cls.name, cls, f"{kind} {cls.name!r}")
    return cls


def check_config(config: Any) -> None:
    """create()'s config must be an ep.MoeConfig (anything else failed deep inside a constructor, or
    built a runner on it silently)."""
    from .config import MoeConfig
    if not isinstance(config, MoeConfig):
        raise TypeError(f"config={config!r}; allowed: an ep.MoeConfig (e.g. layer.config)")


def did_you_mean(name: Any, allowed: Sequence[str], most: int = 2, cutoff: float = 0.5, prefix: str = "") -> str:
    """' (did you mean X?)' for the allowed names closest to a misspelt one (`deepep` for deepep_normal or
    deepep_ll), or ''; every unknown-name error of a registry, the knobs and the command line ends with it.
    prefix: a part every name shares (EP_RUNTIME_), left out of the comparison (it would make every name look
    close) and kept in the suggestion."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name.removeprefix(prefix), [a.removeprefix(prefix) for a in allowed],
                                      n=most, cutoff=cutoff)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""
