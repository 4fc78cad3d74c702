"""Triton kernel launches without Triton's per-launch Python.

`kernel[grid](*args)` runs ~40 Python-level steps per launch (knobs, hooks, a string cache key, a
LazyDict of launch metadata, a global-value check) before the C launcher; on the lent GPU hosts that
is 10-100 us a launch, more than most of our kernels run. `fast_launch` keeps Triton's own binder
(so a kernel is specialised exactly as Triton would: dtypes, 16-byte alignment, integer values) and
looks the compiled kernel up in a dict keyed by that specialisation; a miss, a callable grid, launch
hooks or the interpreter go through Triton's path unchanged (which compiles and is then cached here).
"""
from __future__ import annotations

from typing import Any

import torch

_DISABLED: list[str] = []  # why the direct launch was turned off (Triton's internals differ): Triton's path then
_KNOBS: list = []  # (triton.knobs.runtime, triton.knobs.compilation), imported on the first launch; [] without


class FastKernel:
    """A launched @triton.jit kernel: fk[grid](*args, **kwargs) as with the kernel itself."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self._compiled: dict = {}
        self._binders: dict = {}

    def __getattr__(self, name: str) -> Any:  # .fn, .warmup, .cache, ...: the kernel's own
        if name.startswith("__") or name in ("kernel", "_compiled", "_binders"):  # (copy/pickle before __init__)
            raise AttributeError(name)
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args: tuple, kwargs: dict):
        # torch.compile traces Triton's own launch (a kernel node), never this cache
        if callable(grid) or _DISABLED or torch.compiler.is_compiling() or not _plain_launches():
            return self.kernel[grid](*args, **kwargs)
        key = None
        try:
            device = torch._C._cuda_getDevice()  # (absent from CPU builds of torch: Triton's path then)
            binder = self._binders.get(device)
            if binder is None:
                caches = self.kernel.device_caches.get(device)
                binder = None if caches is None else self._binders.setdefault(device, caches[-1])
            if binder is not None:  # else the kernel has not run on this device yet: Triton sets it up
                bound, specialization, options = binder(*args, **kwargs)
                runtime, compilation = _KNOBS
                # Triton's own key also holds these two knobs (it adds them to the options)
                key = (device, runtime.debug, getattr(compilation, "instrumentation_mode", None),
                       tuple(specialization), tuple(options.items()))
                try:
                    compiled = self._compiled.get(key)
                except TypeError:  # an unhashable constexpr value
                    key = _hashable(key)
                    compiled = self._compiled.get(key)
                if compiled is not None:
                    g1 = grid[1] if len(grid) > 1 else 1
                    g2 = grid[2] if len(grid) > 2 else 1
                    compiled.run(grid[0], g1, g2, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                                 compiled.packed_metadata, None, None, None, *bound.values())
                    return compiled
        except Exception as err:
            # Triton's path: a caller's error (bad arguments) raises there again and changes nothing; if
            # Triton launches what failed here, its internals differ from what this module expects, and
            # every launch takes Triton's path from now on.
            result = self.kernel[grid](*args, **kwargs)
            _DISABLED.append(f"{self.kernel.__name__}: {type(err).__name__}: {err}")
            return result
        return self._first(grid, args, kwargs, key)

    def _first(self, grid, args, kwargs, key):
        """Triton's own launch (it compiles on a miss); its compiled kernel is kept for the next call."""
        compiled = self.kernel[grid](*args, **kwargs)
        if key is None:
            return compiled
        if compiled is not None and getattr(compiled, "function", None) is not None:
            self._compiled[key] = compiled
        return compiled


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple((k, _hashable(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _plain_launches() -> bool:
    """False while a Triton launch hook is set (a profiler wants every launch through Triton), and on
    Triton < 3.4 (no triton.knobs: its own path always)."""
    if not _KNOBS:
        try:
            from triton import knobs
        except ImportError:
            _DISABLED.append(f"triton {_triton_version()} has no triton.knobs (3.4+)")
            return False
        _KNOBS.extend((knobs.runtime, knobs.compilation))
    runtime = _KNOBS[0]
    return _no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook)


def _triton_version() -> str:
    import triton
    return triton.__version__


def _no_hook(hook: Any) -> bool:
    """None, or an empty chain (Triton >= 3.5 keeps a HookChain that is empty unless a profiler is on)."""
    return hook is None or getattr(hook, "calls", None) == []


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: plain integers (Triton's is a constexpr function, ~10x slower to call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for host code (0 for n <= 0, as Triton's)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def interpreted(kernel: Any) -> bool:
    """Whether a @triton.jit kernel runs under Triton's interpreter: decided when it was decorated
    (TRITON_INTERPRET=1 then), whatever the environment says later, so callers may read it once."""
    return not hasattr(kernel, "device_caches")


def fast_launch(kernel: Any) -> Any:
    """Wrap a @triton.jit kernel that Python launches (never one that other kernels call). Under the
    interpreter (TRITON_INTERPRET=1) the kernel is returned as it is."""
    return kernel if interpreted(kernel) else FastKernel(kernel)
