"""standard: no exchange. R = 1, or every rank holds every expert and computes its own tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ep_runtime import envs
from ep_runtime.runner_core import CombineInput, DispatchOutput, RunnerInput, needs_grad, register_format
from ep_runtime.validation import capturing, check_topk_values

from . import exchange_kernels, register
from .base import Dispatcher
from .deferred import DeferredChecks


@dataclass
class StandardDispatchOutput(DispatchOutput):
    """hidden_states [T, H]; topk_ids [T, K] int32 global (-1 = nowhere; int64 ids stay int64);
    topk_weights [T, K] fp32 (float64 for float64 x); count_row [1 + 1 + E + 2] int32: the flag kernel's row (T, tokens with an
    expert, pairs per expert, value flags) where it ran, else None."""

    format = "standard"
    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    count_row: Optional[torch.Tensor] = None

    @property
    def num_tokens_per_expert(self) -> Optional[torch.Tensor]:
        """[E] int32 pairs per expert (ids outside [0, E) not counted), or None where no kernel ran."""
        return None if self.count_row is None else self.count_row[2:-2]


@register
class StandardDispatcher(Dispatcher):
    name = "standard"
    format = "standard"
    shards_experts = False
    checks_values_in_exchange = True  # checked in _dispatch: one fused flag kernel on CUDA

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync_checks = envs.get("SYNC_CHECKS")
        E = self.config.num_experts
        self._deferred = DeferredChecks(
            self._check_deferred, "the value flags of a standard dispatch",
            f"topk_ids/topk_weights were invalid (ids outside -1..{E - 1} or non-finite weights) and have been "
            f"overwritten since, so the value cannot be named")

    def _dispatch(self, x, topk):
        """On CUDA (eager, nothing needing a gradient) the flag kernel's row lands in pinned
        memory and is checked CHECK_LAG calls later or at raise_deferred(): no host sync. Bad ids reach
        the runner meanwhile, which sends every id outside [0, E) to the sink (runner_core)."""
        ids, weights = topk
        if not (exchange_kernels.on_gpu(ids) and ids.numel() and not capturing()):
            check_topk_values(ids, weights, self.config.num_experts)
            return StandardDispatchOutput(x, ids, weights)
        # torch.compile traces the plain form (an immediate read), not state kept across calls
        eager = not torch.compiler.is_compiling()
        defer = eager and ids.is_cuda and not self.sync_checks and not needs_grad(x, weights)
        if defer:
            self._deferred.make_room()
        # one kernel, not ~12 ops; one "rank" holds every expert here: the owner table is all zeros. Its
        # is_token_in_rank output is never read here: kept scratch
        in_rank = exchange_kernels.kept("standard in_rank", (ids.shape[0], 1), torch.bool, ids.device)
        _, row = exchange_kernels.layout_row(ids, weights, self.placement.expert_rank_table(ids.device), 1, 2,
                                             in_rank)
        if defer:
            self._deferred.defer(row, (ids, weights))
        else:
            check_topk_values(ids, weights, self.config.num_experts, row[-2:].tolist())
        return StandardDispatchOutput(x, ids, weights, row)

    def _check_deferred(self, row: list, call: tuple) -> None:
        flags = row[-2:]
        check_topk_values(*call, self.config.num_experts, flags)
        if any(flags):  # flagged, yet nothing bad there now: the caller changed its tensors since
            raise LookupError("overwritten")

    def __del__(self) -> None:
        """Pending value checks of the last calls: checked where landed, a bad one warned of (DeferredChecks.drop)."""
        deferred = self.__dict__.get("_deferred")
        if deferred:
            deferred.drop(f"a {self.name} dispatcher")

    def raise_deferred(self) -> None:
        """Check every pending dispatch's value flags now (waits for their copies); the first bad call
        raises the error it would have raised at once, naming which call it was."""
        self._deferred.flush()

    def check_combine_input(self, combine_input: CombineInput) -> None:
        """One row per dispatched token, in x's dtype: combine returns them as they are, so T and the
        dtype must match (combine returns [T, H] in x's dtype, as every dispatcher's does)."""
        super().check_combine_input(combine_input)
        rows, x = combine_input.hidden_states, combine_input.dispatch_output.hidden_states
        if rows.dim() != 2 or rows.shape[0] != x.shape[0]:
            raise ValueError(f"combine_input.hidden_states has shape {list(rows.shape)}; expected "
                             f"[{x.shape[0]}, {self.config.hidden_size}] (one row per dispatched token)")
        if rows.dtype != x.dtype:
            raise TypeError(f"combine_input.hidden_states has dtype {rows.dtype}; expected {x.dtype}, the dtype of the "
                            f"dispatched x (combine returns y in it)")

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        return combine_input.hidden_states


def _runner_input(out: StandardDispatchOutput, placement, config) -> RunnerInput:
    return RunnerInput.from_global_ids(out.hidden_states, out.topk_ids, out.topk_weights, placement, defer=True)


register_format("standard", RunnerInput, _runner_input)  # the rows go to combine as they are
