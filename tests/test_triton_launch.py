"""Host-side helpers of ep_runtime.triton_launch against Triton's own (the GPU test in test_gpu.py
checks the direct launches themselves)."""
import pytest

triton = pytest.importorskip("triton")

from ep_runtime.triton_launch import cdiv, next_power_of_2  # noqa: E402

VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 127, 128, 129, 1000, 1023, 1024, 1025, 7168,
          (1 << 31) - 1, 1 << 31, (1 << 31) + 1, 3 * (1 << 40) + 7]


@pytest.mark.parametrize("n", VALUES)
def test_next_power_of_2_equals_tritons(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)


@pytest.mark.parametrize("b", [1, 2, 3, 16, 64, 127, 128, 1024])
def test_cdiv_equals_tritons(b):
    for a in VALUES:
        assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
