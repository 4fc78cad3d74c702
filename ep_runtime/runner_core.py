"""The shared runner core: dispatch output -> normalized runner input -> backend -> combine input.

Every (dispatch format, runner backend) pair registers a pre-permute (format -> RunnerInput) and a
post-permute (backend output -> CombineInput), or one fused function doing the whole step. -1 ids
are rerouted to a sink slot here, once, for every backend; a backend only ever sees RunnerInput.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from .config import ExpertWeights, MoeConfig
from .placement import ExpertPlacement


class DispatchOutput:
    """Base of every dispatcher's output dataclass; `format` keys the permute registry."""

    format: ClassVar[str] = ""


@dataclass
class CombineInput:
    """What a dispatcher's combine takes: the runner's rows in that format's layout, plus the dispatch
    output (its handle says where each row goes home)."""

    hidden_states: torch.Tensor
    dispatch_output: Any


@dataclass
class RunnerInput:
    """The one normalized input every runner backend computes.

    hidden_states [N, H]; topk_ids [N, K] int32 in [0, S) where S = expert_mask.numel() and slot
    S-1 is the sink (mask 0) that -1 ids were rerouted to; topk_weights [N, K] fp32;
    expert_mask [S] bool: an id whose mask entry is 0 is skipped (no FLOPs, contributes zero);
    first_expert: the weight index of an unmasked id is id - first_expert (0 for local-id formats,
    rank*L for formats that keep global ids, such as mori).
    The backend returns [N, H]: per row, routed_scaling_factor * sum_k w_k * expert_k(x).
    """

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    expert_mask: torch.Tensor
    first_expert: int = 0


def reroute_to_sink(ids: torch.Tensor, sink: int) -> torch.Tensor:
    """int32 ids with every negative id replaced by the sink slot."""
    ids = ids.to(torch.int32)
    return torch.where(ids < 0, torch.full_like(ids, sink), ids)


def local_runner_input(hidden_states: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor,
                       placement: ExpertPlacement) -> RunnerInput:
    """RunnerInput for formats carrying local ids (-1 = elsewhere or nowhere): sink L, mask [L+1]."""
    return RunnerInput(hidden_states, reroute_to_sink(local_ids, placement.sink), weights.float(),
                       placement.local_mask_with_sink(hidden_states.device))


def global_runner_input(hidden_states: torch.Tensor, global_ids: torch.Tensor, weights: torch.Tensor,
                        placement: ExpertPlacement) -> RunnerInput:
    """RunnerInput for formats carrying global ids: mask [E] of this rank's experts plus sink slot E."""
    mask = torch.cat([placement.global_mask(hidden_states.device),
                      torch.zeros(1, dtype=torch.bool, device=hidden_states.device)])
    return RunnerInput(hidden_states, reroute_to_sink(global_ids, placement.num_experts), weights.float(),
                       mask, placement.first_expert)


PrePermute = Callable[[Any, ExpertPlacement, MoeConfig], RunnerInput]
PostPermute = Callable[[torch.Tensor, Any], CombineInput]
Fused = Callable[["MoeRunner", Any, ExpertWeights], CombineInput]

_PRE: dict[tuple[str, str], PrePermute] = {}
_POST: dict[tuple[str, str], PostPermute] = {}
_FUSED: dict[tuple[str, str], Fused] = {}


def register_permute(format: str, backends: tuple[str, ...], pre: PrePermute, post: PostPermute) -> None:
    """Register pre/post-permute functions for (format, backend) for each backend listed."""
    for backend in backends:
        _PRE[(format, backend)] = pre
        _POST[(backend, format)] = post


def register_fused(format: str, backend: str, fn: Fused) -> None:
    """Register one function doing pre-permute, compute and post-permute for (format, backend)."""
    _FUSED[(format, backend)] = fn


def registered_pairs() -> list[tuple[str, str]]:
    """Every (format, backend) pair the core can run."""
    return sorted(set(_PRE) | set(_FUSED))


def supported_formats(backend: str) -> list[str]:
    return sorted({fmt for fmt, be in registered_pairs() if be == backend})


def _ensure_registrations() -> None:
    # Dispatcher and runner modules register their pairs on import.
    from . import dispatchers, runners  # noqa: F401


class MoeRunner:
    """Runs one backend on any registered dispatch format (the layer never branches on backend)."""

    def __init__(self, backend: Any, config: MoeConfig, placement: ExpertPlacement):
        self.backend = backend
        self.config = config
        self.placement = placement

    def check_format(self, format: str) -> None:
        _ensure_registrations()
        key = (format, self.backend.name)
        if key not in _FUSED and key not in _PRE:
            pairs = ", ".join(f"({f}, {b})" for f, b in registered_pairs())
            raise ValueError(f"no runner path for dispatch format {format!r} with runner backend "
                             f"{self.backend.name!r}; registered (format, backend) pairs: {pairs}")

    def run(self, dispatch_output: DispatchOutput, weights: ExpertWeights) -> CombineInput:
        key = (dispatch_output.format, self.backend.name)
        if key in _FUSED:
            return _FUSED[key](self, dispatch_output, weights)
        if key not in _PRE:
            self.check_format(dispatch_output.format)
        runner_input = _PRE[key](dispatch_output, self.placement, self.config)
        out = self.backend.run(runner_input, weights)
        return _POST[(self.backend.name, dispatch_output.format)](out, dispatch_output)
