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
