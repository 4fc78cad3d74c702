"""ep_runtime.triton_launch on CPU: the host-side helpers against Triton's own, and FastKernel's choice
between Triton's path and the direct launch with a stand-in kernel (the GPU test in test_gpu.py checks
the direct launches of real kernels)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from ep_runtime.triton_launch import cdiv, next_power_of_2, triton_interpreted  # noqa: E402

VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 127, 128, 129, 1000, 1023, 1024, 1025, 7168,
          (1 << 31) - 1, 1 << 31, (1 << 31) + 1, 3 * (1 << 40) + 7]


@pytest.mark.parametrize("n", VALUES)
def test_next_power_of_2_equals_tritons(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)


@pytest.mark.parametrize("b", [1, 2, 3, 16, 64, 127, 128, 1024])
def test_cdiv_equals_tritons(b):
    for a in VALUES:
        assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


@pytest.mark.skipif(not hasattr(getattr(triton, "knobs", None), "runtime"), reason="Triton without knobs.runtime")
@pytest.mark.parametrize("value", ["1", "0", "true", "TRUE", "yes", "On", "y", "Y", "off", "2", "t", " 1", "1 ", ""])
def test_triton_interpreted_reads_the_variable_as_tritons_knob(monkeypatch, value):
    """runners, the masked runner and the NVLink transport take CPU ranks as Triton-interpreted by this reading:
    where it differed from Triton's (" 1" read as interpreted while Triton ran no interpreter; "y" the other way),
    runner='triton' was offered on CPU tensors Triton could not run, or refused where Triton interprets."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreted() == bool(triton.knobs.runtime.interpret), value


class _Compiled:
    """Stands in for Triton's CompiledKernel: a loaded function and its launcher."""

    def __init__(self, spec, launches):
        self.spec, self.launches, self.function, self.packed_metadata = spec, launches, object(), ()

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *args):
        self.launches.append(("direct", self.spec, (g0, g1, g2), args))


class _Kernel:
    """Stands in for a @triton.jit kernel: Triton's path compiles one kernel per specialisation (here the
    argument's parity) and launches it; its binder is the last entry of device_caches[device]."""

    __name__ = "fake_kernel"

    def __init__(self):
        self.launches, self.compiled, self.device_caches = [], {}, {}

    @staticmethod
    def binder(n, *, BLOCK=4):
        if not isinstance(n, int):
            raise TypeError(f"failed to specialize argument of type: {type(n).__name__}")
        return {"n": n, "BLOCK": BLOCK}, [("i32", "odd" if n % 2 else "even"), ("constexpr", BLOCK)], {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.device_caches.setdefault(0, ({}, self.binder))
            _, spec, _ = self.binder(*args, **kwargs)
            compiled = self.compiled.setdefault(tuple(spec), _Compiled(tuple(spec), self.launches))
            self.launches.append(("triton", tuple(spec), tuple(grid), args))
            return compiled
        return launch


def test_fast_kernel_caches_per_specialisation_and_survives_caller_errors(monkeypatch):
    """The direct path launches the kernel Triton compiled for the same specialisation (never another
    one's), and a caller's bad argument raises Triton's error without turning the direct path off."""
    from ep_runtime import triton_launch

    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    monkeypatch.setattr(triton_launch, "_DISABLED", [])
    kernel = _Kernel()
    fast = triton_launch.FastKernel(kernel)
    for n in (2, 2, 2, 3, 3, 3, 4):
        fast[(n,)](n)
    paths = [(path, spec[0][1]) for path, spec, _, _ in kernel.launches]
    assert paths == [("triton", "even"), ("triton", "even"), ("direct", "even"),
                     ("triton", "odd"), ("direct", "odd"), ("direct", "odd"), ("direct", "even")]
    assert kernel.launches[-1][2:] == ((4, 1, 1), (4, 4))  # the grid padded to 3-D, every parameter in order
    with pytest.raises(TypeError, match="failed to specialize"):
        fast[(1,)]("not an int")
    assert triton_launch._DISABLED == []
    fast[(1,)](5, BLOCK=8)  # a new constexpr value: Triton's path once, then direct
    fast[(1,)](5, BLOCK=8)
    assert [p for p, spec, _, _ in kernel.launches[-2:]] == ["triton", "direct"]
    assert kernel.launches[-1][1] == (("i32", "odd"), ("constexpr", 8))


class _TensorKernel(_Kernel):
    """A stand-in kernel of two parameters, a tensor and an int, and a constexpr: specialised on the tensor's dtype
    and 16-byte alignment and on the int's parity, as Triton specialises them."""

    @staticmethod
    def binder(t, n, *, BLOCK=4):
        spec = [(str(t.dtype), t.data_ptr() % 16 == 0), ("i32", n % 2), ("constexpr", BLOCK)]
        return {"t": t, "n": n, "BLOCK": BLOCK}, spec, {}


def test_bound_launch_skips_the_binder_only_for_tensors_specialised_alike(monkeypatch):
    """bind(): from the call after FastKernel keeps the compiled kernel, every call launches it directly with the
    arguments in the binder's order and the SLOT replaced by that call's tensor; a tensor of another dtype or
    16-byte alignment, or the direct path turned off, goes through FastKernel (Triton's kernel for it)."""
    from ep_runtime import triton_launch
    from ep_runtime.triton_launch import SLOT, bind

    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    monkeypatch.setattr(triton_launch, "_DISABLED", [])
    kernel = _TensorKernel()
    go = bind(triton_launch.FastKernel(kernel), (3,), SLOT, 7, BLOCK=8)
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base[:8], base[8:16], base[16:24]]  # 32-byte steps: all 16-byte aligned
    for t in tensors:
        go(t)
    assert [p for p, *_ in kernel.launches] == ["triton", "triton", "direct"]  # kept at the second, direct after
    path, spec, grid, args = kernel.launches[-1]
    assert grid == (3, 1, 1) and args[0] is tensors[2] and args[1:] == (7, 8)
    go(base[1:9])  # 4 bytes off the 16-byte grid: another specialisation, Triton's path
    assert kernel.launches[-1][0] == "triton" and kernel.launches[-1][1][0] == ("torch.float32", False)
    go(base[5:13])  # misaligned again: FastKernel's direct path (it keeps that kernel now), and this launch keeps it
    go(base[9:17])
    assert kernel.launches[-1][0] == "direct" and kernel.launches[-1][3][0].data_ptr() == base[9:17].data_ptr()
    go(torch.zeros(8, dtype=torch.float64))  # another dtype likewise
    assert kernel.launches[-1][0] == "triton" and kernel.launches[-1][1][0][0] == "torch.float64"
    go(tensors[1])  # the first kept kernel's tensors again: direct; no tensor of an earlier call is held
    assert kernel.launches[-1][0] == "direct" and kernel.launches[-1][3][0] is tensors[1]
    assert len(go.kept) == 3 and all(not isinstance(v, torch.Tensor) for kept in go.kept.values() for v in kept[3])
    monkeypatch.setattr(triton_launch, "_DISABLED", ["turned off"])
    go(tensors[0])
    assert kernel.launches[-1][0] == "triton"


def test_bind_under_the_interpreter_fills_the_slots_in_order():
    """A kernel that is no FastKernel (the interpreter's) gets the SLOT positions' tensors through kernel[grid]."""
    from ep_runtime.triton_launch import SLOT, bind
    kernel = _TensorKernel()
    a, b = torch.zeros(4), torch.ones(4)
    bind(kernel, (2,), SLOT, 5, BLOCK=16)(a)
    bind(kernel, (1,), b, 3)(*())
    assert [(grid, args) for _, _, grid, args in kernel.launches] == [((2,), (a, 5)), ((1,), (b, 3))]
