"""Which rank owns which experts: rank r owns global experts [r*L, (r+1)*L)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous placement of E experts over R ranks (L = E / R per rank)."""

    num_experts: int
    ep_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size={self.ep_size} must be >= 1")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be >= 1")
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}; "
                f"pick an ep_size that divides it (each rank must own the same number of experts)")
        if not 0 <= self.rank < self.ep_size:
            raise ValueError(f"rank={self.rank} out of range [0, {self.ep_size})")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        return self.rank * self.num_local_experts

    @property
    def sink(self) -> int:
        """Local index of the sink slot: where -1 and remote ids are rerouted (mask entry 0)."""
        return self.num_local_experts

    def owner(self, global_ids: torch.Tensor) -> torch.Tensor:
        """Rank owning each global id; -1 stays -1."""
        return torch.where(global_ids >= 0, global_ids // self.num_local_experts, global_ids)

    def to_local(self, global_ids: torch.Tensor) -> torch.Tensor:
        """Local id for experts on this rank, -1 for -1 and for experts elsewhere."""
        local = global_ids - self.first_expert
        mine = (global_ids >= 0) & (local >= 0) & (local < self.num_local_experts)
        return torch.where(mine, local, torch.full_like(local, -1))

    def to_global(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Global id of local ids; -1 stays -1."""
        return torch.where(local_ids >= 0, local_ids + self.first_expert, local_ids)

    def local_mask_with_sink(self, device=None) -> torch.Tensor:
        """[L+1] bool: every local expert on, the sink slot L off."""
        mask = torch.ones(self.num_local_experts + 1, dtype=torch.bool, device=device)
        mask[-1] = False
        return mask

    def global_mask(self, device=None) -> torch.Tensor:
        """[E] bool: 1 for this rank's experts (the mori format's mask)."""
        mask = torch.zeros(self.num_experts, dtype=torch.bool, device=device)
        mask[self.first_expert:self.first_expert + self.num_local_experts] = True
        return mask
