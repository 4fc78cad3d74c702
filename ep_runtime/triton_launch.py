"""Triton kernel launches without Triton's per-launch Python.

`kernel[grid](*args)` runs ~40 Python-level steps per launch (knobs, hooks, a string cache key, a
LazyDict of launch metadata, a global-value check) before the C launcher; on the lent GPU hosts that
is 10-100 us a launch, more than most of our kernels run. `fast_launch` keeps Triton's own binder
(so a kernel is specialised exactly as Triton would: dtypes, 16-byte alignment, integer values) and
looks the compiled kernel up in a dict keyed by that specialisation; a miss, a callable grid, launch
hooks or the interpreter go through Triton's path unchanged (which compiles and is then cached here).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import torch

from . import envs

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
                key, compiled = self._lookup(device, specialization, options)
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

    def _lookup(self, device: int, specialization, options: dict) -> tuple:
        """(key, the compiled kernel kept for it or None) of a launch the binder specialised so."""
        # Triton's own key also holds these two knobs (it adds them to the options)
        key = (device, *_knob_values(), tuple(specialization), tuple(options.items()))
        try:
            return key, self._compiled.get(key)
        except TypeError:  # an unhashable constexpr value
            key = _hashable(key)
            return key, self._compiled.get(key)

    def _first(self, grid, args, kwargs, key):
        """Triton's own launch (it compiles on a miss); its compiled kernel is kept for the next call."""
        compiled = self.kernel[grid](*args, **kwargs)
        if key is None:
            return compiled
        if compiled is not None and getattr(compiled, "function", None) is not None:
            self._compiled[key] = compiled
        return compiled


class _Slot:
    def __repr__(self) -> str:
        return "SLOT"


SLOT = _Slot()  # bind()'s marker of an argument given at each call


def bind(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """kernel[grid](*args, **kwargs) for a launch whose arguments are the same at every call but for the tensors
    marked SLOT (a per-shape plan's launch): returns go(*tensors), which launches with the SLOT positions' tensors
    in order. For a fast_launch kernel, a call after the first skips Triton's binder and this module's key (a
    BoundLaunch); the interpreter's kernels go through kernel[grid] at every call."""
    if isinstance(kernel, FastKernel):
        return BoundLaunch(kernel, grid, args, kwargs)
    slots = [i for i, a in enumerate(args) if a is SLOT]
    launch = kernel[grid]

    def go(*tensors):
        full = list(args)
        for i, t in zip(slots, tensors):
            full[i] = t
        return launch(*full, **kwargs)
    return go


class BoundLaunch:
    """bind()'s launch of a FastKernel. The first calls go through FastKernel (Triton compiles on a miss); from
    the second, each specialisation of the tensors met (their dtypes and 16-byte alignment, all Triton specialises
    a tensor on; a few at most) keeps its compiled kernel and every argument in the order the launcher takes them
    (the binder's: one more binder call, which a launch made once never pays), so a later call of a kept
    specialisation on the same device launches that kernel at once: no binder, no key (~0.3 us a parameter of
    host time, the constexprs included). Anything else (a launch hook, torch.compile, the direct path turned off)
    takes FastKernel's path, which is the first call's."""

    MAX_KEPT = 8  # specialisations kept per launch (a plan's tensors take one or two: aligned or not)

    def __init__(self, fast: FastKernel, grid: tuple, args: tuple, kwargs: dict):
        self.fast, self.args, self.kwargs = fast, args, kwargs
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.slots = tuple(i for i, a in enumerate(args) if a is SLOT)
        self.kept: dict = {}  # the tensors' (dtype, aligned) -> (device, knobs, compiled, arguments)
        self.calls = 0  # through FastKernel's path: a launch made once (a plan of one call) records nothing

    def __call__(self, *tensors: torch.Tensor):
        spec = tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors)
        ready = self.kept.get(spec)
        if ready is not None and not _DISABLED and _plain_launches() and not torch.compiler.is_compiling():
            device, knobs, compiled, template = ready
            if torch._C._cuda_getDevice() == device and _knob_values() == knobs:
                values = template.copy()
                for i, t in zip(self.slots, tensors):
                    values[i] = t
                g0, g1, g2 = self.grid
                compiled.run(g0, g1, g2, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                             compiled.packed_metadata, None, None, None, *values)
                return compiled
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        result = self.fast._launch(self.grid, tuple(args), self.kwargs)
        if self.calls and ready is None and len(self.kept) < self.MAX_KEPT:
            ready = self._record(args, tensors)
            if ready is not None:
                self.kept[spec] = ready
        self.calls += 1
        return result

    def _record(self, args: list, tensors: tuple) -> Optional[tuple]:
        """What a direct launch of these arguments needs, or None where FastKernel keeps no compiled kernel for
        them (yet), or Triton's internals differ from what this expects."""
        if _DISABLED or not _KNOBS or torch.compiler.is_compiling():
            return None
        try:
            device = torch._C._cuda_getDevice()
            binder = self.fast._binders.get(device)
            if binder is None:
                return None
            bound, specialization, options = binder(*args, **self.kwargs)
            _, compiled = self.fast._lookup(device, specialization, options)
            template = list(bound.values())
            if compiled is None or any(template[i] is not t for i, t in zip(self.slots, tensors)):
                return None  # (positional arguments first, in order: else the slots are not where we put them)
            for i in self.slots:  # (no tensor kept: each call puts its own there)
                template[i] = None
            return device, _knob_values(), compiled, template
        except Exception:  # noqa: BLE001 - FastKernel's path then, at every call (correct, only slower)
            return None


def _knob_values() -> tuple:
    """The two Triton knobs its cache key holds besides the arguments (runtime.debug, instrumentation_mode)."""
    runtime, compilation = _KNOBS
    return runtime.debug, getattr(compilation, "instrumentation_mode", None)


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


def triton_interpreted() -> bool:
    """Whether TRITON_INTERPRET asks Triton to run kernels on CPU tensors through its interpreter, read as Triton
    reads it (1, true, yes, on or y, in any case, no spaces around): the environment now, where
    interpreted(kernel) is what a kernel was decorated under."""
    return (envs.launcher("TRITON_INTERPRET") or "0").lower() in ("1", "true", "yes", "on", "y")


def interpreted(kernel: Any) -> bool:
    """Whether a @triton.jit kernel runs under Triton's interpreter: decided when it was decorated
    (TRITON_INTERPRET=1 then), whatever the environment says later, so callers may read it once."""
    return not hasattr(kernel, "device_caches")


def fast_launch(kernel: Any) -> Any:
    """Wrap a @triton.jit kernel that Python launches (never one that other kernels call). Under the
    interpreter (TRITON_INTERPRET=1) its launches run one at a time (InterpretedKernel)."""
    return InterpretedKernel(kernel) if interpreted(kernel) else FastKernel(kernel)


# Triton's interpreter swaps triton.language's functions for its own, process-wide, for the length of each
# launch and puts them back after: two threads launching at once (two layers called from two threads) undid
# each other's swap, and a kernel failed with "Did you forget to add @triton.jit ?" or "x >= grid_dim[0]".
_INTERPRETER_LOCK = threading.RLock()


class InterpretedKernel:
    """An interpreted @triton.jit kernel: ik[grid](*args, **kwargs) as with the kernel itself, one launch at a
    time in the process (_INTERPRETER_LOCK)."""

    def __init__(self, kernel: Any):
        self.kernel = kernel
        self.__name__ = getattr(kernel, "__name__", type(kernel).__name__)

    def __getattr__(self, name: str) -> Any:  # .fn, .warmup, ...: the kernel's own
        if name.startswith("__") or name == "kernel":  # (copy/pickle before __init__)
            raise AttributeError(name)
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def locked(*args, **kwargs):
            with _INTERPRETER_LOCK:
                return launch(*args, **kwargs)
        return locked
