"""What every runner backend is: a config, optional GEMM hooks, and run(RunnerInput, weights)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.runner_core import RunnerInput

# hook(inputs [P, in], outputs [P, out], expert_index [P]) -> replacement outputs or None.
# P counts computed (token, expert) pairs, grouped by expert; expert_index is the local weight index.
GemmHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class GemmHooks:
    """Called after each grouped GEMM (LoRA adapters add their low-rank term here)."""

    after_gemm1: Optional[GemmHook] = None
    after_gemm2: Optional[GemmHook] = None


class RunnerBackend:
    name: ClassVar[str] = ""

    def __init__(self, config: MoeConfig, hooks: Optional[GemmHooks] = None):
        self.config = config
        self.hooks = hooks or GemmHooks()

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def unavailable_reason(cls) -> str:
        return ""

    def run(self, runner_input: RunnerInput, weights: ExpertWeights) -> torch.Tensor:
        """[N, H] in the input's dtype: per row, routed_scaling_factor * sum_k w_k * expert(x)."""
        raise NotImplementedError


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter."""
    from ep_runtime import envs
    return (envs.launcher("TRITON_INTERPRET") or "0").strip().lower() in ("1", "true", "yes", "on")


class TritonBackend(RunnerBackend):
    """A backend whose kernels are Triton: it runs on CUDA, or on CPU tensors under the interpreter.
    Subclasses set import_error to why their kernels did not import (None when they did)."""

    import_error: ClassVar[Optional[str]] = None

    def __init__(self, config: MoeConfig, hooks: Optional[GemmHooks] = None):
        super().__init__(config, hooks)
        if self.import_error is not None:
            raise RuntimeError(f"runner={self.name!r} cannot run here: {self.import_error}")

    @classmethod
    def is_available(cls) -> bool:
        return cls.import_error is None and (torch.cuda.is_available() or triton_interpreted())

    @classmethod
    def unavailable_reason(cls) -> str:
        return cls.import_error or ("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU through "
                                    "the interpreter)")
