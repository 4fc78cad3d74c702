"""Which rank owns which experts: the one table every dispatcher, runner and loader reads.

E global experts over R ranks, L = E / R on each. `expert_to_rank[e]` is the rank holding expert e
(default contiguous: rank r holds [r*L, (r+1)*L)); on its owner, expert e has the local index given
by its position among that rank's experts in ascending global id. Nothing else derives ownership.

What an exchange calls (device tensors are cached per device and shared: read them, never write):
    placement.expert_rank_table(device)          [E] int32  owning rank of each global expert
                                                 (replaces `ids // L`; a kernel takes its pointer)
    placement.expert_local_index_table(device)   [E] int32  each expert's index on its owner (replaces
                                                 `ids - owner * L` when sending receiver-local ids)
    placement.experts_of_rank(rank, device)      [L] int64  `rank`'s global experts in local order
                                                 (replaces the column range me*L..(me+1)*L of
                                                 per-expert counts: gather those columns instead)
    placement.global_mask(device)                [E] bool   this rank's experts (mori's mask)
    placement.rank_of(ids), placement.local_index(ids)   the same lookups elementwise (-1 stays -1)
The runner side reads global_to_local_table / local_mask_with_sink through RunnerInput's constructors;
load_experts slices local_expert_ids().
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """E experts over R ranks, L = E / R each; this object describes rank `rank`'s view.

    expert_to_rank: None (contiguous) or a length-E sequence of ranks in [0, R) naming each expert's
    owner, every rank named exactly L times (e.g. experts assigned round-robin or by a permutation).
    """

    num_experts: int
    ep_size: int = 1
    rank: int = 0
    expert_to_rank: Optional[Sequence[int]] = None

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
        if self.expert_to_rank is None:
            return
        table = tuple(int(r) for r in self.expert_to_rank)
        if len(table) != self.num_experts:
            raise ValueError(f"expert_to_rank has {len(table)} entries; expected num_experts={self.num_experts}")
        for e, r in enumerate(table):
            if not 0 <= r < self.ep_size:
                raise ValueError(f"expert_to_rank[{e}]={r} out of range [0, {self.ep_size}) (ep_size={self.ep_size})")
        for r in range(self.ep_size):
            if table.count(r) != self.num_local_experts:
                raise ValueError(f"expert_to_rank gives rank {r} {table.count(r)} experts; every rank must hold "
                                 f"num_experts / ep_size = {self.num_local_experts}")
        object.__setattr__(self, "expert_to_rank", table)  # hashable: device tables are cached per placement

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def sink(self) -> int:
        """Local index of the sink slot: where -1 and remote ids are rerouted (mask entry 0)."""
        return self.num_local_experts

    @property
    def is_contiguous(self) -> bool:
        return self.expert_to_rank is None or self._owners() == _contiguous(self.num_experts, self.ep_size)

    @property
    def first_expert(self) -> int:
        """This rank's first global expert; only a contiguous placement has one (else: local_expert_ids)."""
        if not self.is_contiguous:
            raise ValueError("first_expert is undefined for a non-contiguous placement (expert_to_rank given); "
                             "use local_expert_ids() for this rank's global expert ids")
        return self.rank * self.num_local_experts

    def describe_local_experts(self) -> str:
        """This rank's global experts for messages: "4..7" when contiguous, else the list."""
        ids = [e for e, r in enumerate(self._owners()) if r == self.rank]
        return f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids)

    # ------------------------------------------------------------------ host-side tables (tuples)

    def _owners(self) -> tuple[int, ...]:
        return self.expert_to_rank if self.expert_to_rank is not None else _contiguous(self.num_experts, self.ep_size)

    def _local_indices(self) -> tuple[int, ...]:
        seen = [0] * self.ep_size
        index = []
        for r in self._owners():
            index.append(seen[r])
            seen[r] += 1
        return tuple(index)

    # ------------------------------------------------------------------ device tables (cached)

    def expert_rank_table(self, device=None) -> torch.Tensor:
        """[E] int32: the rank owning each global expert."""
        return _cached(self, "rank", _device(device))

    def expert_local_index_table(self, device=None) -> torch.Tensor:
        """[E] int32: each global expert's index among its owner's L experts (its weight row there)."""
        return _cached(self, "local_index", _device(device))

    def experts_of_rank(self, rank: int, device=None) -> torch.Tensor:
        """[L] int64: global ids of `rank`'s experts in local order (local index -> global id)."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank={rank} out of range [0, {self.ep_size})")
        return _cached(self, ("experts_of", rank), _device(device))

    def local_expert_ids(self, device=None) -> torch.Tensor:
        """[L] int64: this rank's global expert ids in local order (what load_experts slices)."""
        return self.experts_of_rank(self.rank, device)

    def global_to_local_table(self, device=None) -> torch.Tensor:
        """[E + 1] int32: this rank's local index of each global id, the sink L for experts elsewhere;
        entry E (where a -1 id is rerouted) is the sink too. RunnerInput.from_global_ids reads it."""
        return _cached(self, "global_to_local", _device(device))

    def local_mask_with_sink(self, device=None) -> torch.Tensor:
        """[L+1] bool: every local expert on, the sink slot L off."""
        return _cached(self, "local_mask", _device(device))

    def global_mask(self, device=None) -> torch.Tensor:
        """[E] bool: 1 for this rank's experts (the mori format's mask; not a range when non-contiguous)."""
        return _cached(self, "global_mask", _device(device))

    # ------------------------------------------------------------------ elementwise lookups

    def rank_of(self, global_ids: torch.Tensor) -> torch.Tensor:
        """Rank owning each global id; -1 stays -1."""
        return _lookup(self.expert_rank_table(global_ids.device), global_ids)

    def local_index(self, global_ids: torch.Tensor) -> torch.Tensor:
        """Each global id's index on its owner (whichever rank that is); -1 stays -1."""
        return _lookup(self.expert_local_index_table(global_ids.device), global_ids)

    def to_local(self, global_ids: torch.Tensor) -> torch.Tensor:
        """Local id for experts on this rank, -1 for -1 and for experts elsewhere."""
        mine = self.rank_of(global_ids) == self.rank
        return torch.where(mine, self.local_index(global_ids), torch.full_like(global_ids, -1))

    def to_global(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Global id of this rank's local ids; -1 stays -1."""
        return _lookup(self.local_expert_ids(local_ids.device).to(local_ids.dtype), local_ids)


def _contiguous(num_experts: int, ep_size: int) -> tuple[int, ...]:
    L = num_experts // ep_size
    return tuple(e // L for e in range(num_experts))


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] in ids' dtype, -1 kept as -1."""
    found = table.to(ids.dtype)[ids.clamp(min=0).long()]
    return torch.where(ids >= 0, found, ids)


@functools.lru_cache(maxsize=None)
def _cached(placement: ExpertPlacement, kind, device: torch.device) -> torch.Tensor:
    """Built on the host once per (placement, table, device). On CUDA the first call copies to the
    device: run one eager step before capturing a CUDA graph (the usual warm-up does)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # a host copy cannot be captured
        raise RuntimeError(f"the expert placement's {kind} table for {device} is built on the first eager call; "
                           "run one eager step (the usual warm-up) before capturing a CUDA graph")
    name, *args = kind if isinstance(kind, tuple) else (kind,)
    return _TABLES[name](placement, *args).to(device)


def _global_to_local(p: ExpertPlacement) -> torch.Tensor:
    local = [i if r == p.rank else p.sink for r, i in zip(p._owners(), p._local_indices())]
    return torch.tensor(local + [p.sink], dtype=torch.int32)


_TABLES = {
    "rank": lambda p: torch.tensor(p._owners(), dtype=torch.int32),
    "local_index": lambda p: torch.tensor(p._local_indices(), dtype=torch.int32),
    "experts_of": lambda p, rank: torch.tensor([e for e, r in enumerate(p._owners()) if r == rank], dtype=torch.int64),
    "global_to_local": _global_to_local,
    "local_mask": lambda p: torch.tensor([True] * p.num_local_experts + [False]),
    "global_mask": lambda p: torch.tensor([r == p.rank for r in p._owners()]),
}
