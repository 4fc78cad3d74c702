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

Redundant experts (load balancing, see ep_runtime.eplb): `physical_to_logical` names the logical
expert held by each of P >= E physical slots, so a hot expert can have copies on several ranks.
Then `expert_to_rank` has P entries (the rank of each slot), the tables above are indexed by
physical id, and `to_physical(ids)` maps the router's logical ids to physical ids once, on the
device, before the dispatcher. `physical()` is the replica-free view (P experts) the dispatcher and
the runner are built on, so they only ever see "expert ids + a rank table". local_expert_ids() and
experts_of_rank() name logical experts: the checkpoint rows a rank's slots hold (copies of one
expert hold the same weights).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .validation import is_int_at_least


@dataclass(frozen=True)
class ExpertPlacement:
    """E logical experts in P physical slots over R ranks, L = P / R slots each; this object
    describes rank `rank`'s view (P = E and slot e holds expert e unless physical_to_logical is given).

    expert_to_rank: None (contiguous: rank r holds slots [r*L, (r+1)*L)) or a length-P sequence of
    ranks in [0, R) naming each slot's owner, every rank named exactly L times (e.g. experts assigned
    round-robin or by a permutation).
    physical_to_logical: None, or a length-P sequence naming the logical expert of each slot; every
    expert has at least one slot, and the copies of one expert sit on different ranks.
    """

    num_experts: int
    ep_size: int = 1
    rank: int = 0
    expert_to_rank: Optional[Sequence[int]] = None
    physical_to_logical: Optional[Sequence[int]] = None

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        self._validate()
        # Hashed once (the tables are cached per placement and looked up several times per layer call:
        # hashing two length-P tuples each time cost microseconds of host time per lookup)
        object.__setattr__(self, "_hash", hash((self.num_experts, self.ep_size, self.rank, self.expert_to_rank,
                                                self.physical_to_logical)))

    def _validate(self) -> None:
        for name in ("num_experts", "ep_size"):
            if not is_int_at_least(getattr(self, name), 1):
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: an int >= 1")
        # (not truncated or compared as they are: rank=1.5 matched no slot's rank and held no experts, silently)
        if not (is_int_at_least(self.rank, 0) and self.rank < self.ep_size):
            raise ValueError(f"rank={self.rank!r}; allowed: an int in 0..{self.ep_size - 1} (ep_size={self.ep_size})")
        for name in ("num_experts", "ep_size", "rank"):  # (a numpy integer becomes Python's)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.physical_to_logical is not None:
            self._check_physical_to_logical()
        P = self.num_physical_experts
        if P % self.ep_size != 0:
            what = (f"num_experts={self.num_experts}" if self.physical_to_logical is None else
                    f"the number of physical experts {P} (num_experts {self.num_experts} + "
                    f"{P - self.num_experts} redundant)")
            raise ValueError(f"{what} is not divisible by ep_size={self.ep_size}; "
                             f"pick an ep_size that divides it (each rank must own the same number of experts)")
        if self.expert_to_rank is not None:
            self._check_expert_to_rank()
        if self.physical_to_logical is not None:
            owners = self._owners()
            for e, slots in enumerate(self._replicas()):
                ranks = [owners[q] for q in slots]
                if len(set(ranks)) != len(ranks):
                    twice = max(ranks, key=ranks.count)
                    raise ValueError(f"physical_to_logical puts two copies of expert {e} on rank {twice} (slots "
                                     f"{[q for q in slots if owners[q] == twice]}); copies of one expert must sit "
                                     f"on different ranks")

    def _check_physical_to_logical(self) -> None:
        table = _int_table("physical_to_logical", self.physical_to_logical)
        E = self.num_experts
        for q, e in enumerate(table):
            if not 0 <= e < E:
                raise ValueError(f"physical_to_logical[{q}]={e} out of range [0, {E}) (num_experts={E})")
        missing = sorted(set(range(E)) - set(table))
        if missing:
            raise ValueError(f"physical_to_logical has no slot for expert {missing[0]}; every expert 0..{E - 1} "
                             f"needs at least one")
        object.__setattr__(self, "physical_to_logical", table)  # hashable: device tables are cached per placement

    def _check_expert_to_rank(self) -> None:
        table = _int_table("expert_to_rank", self.expert_to_rank)
        P = self.num_physical_experts
        if len(table) != P:
            expected = (f"num_experts={P}" if self.physical_to_logical is None else
                        f"one per physical expert ({P} = len(physical_to_logical))")
            raise ValueError(f"expert_to_rank has {len(table)} entries; expected {expected}")
        for e, r in enumerate(table):
            if not 0 <= r < self.ep_size:
                raise ValueError(f"expert_to_rank[{e}]={r} out of range [0, {self.ep_size}) (ep_size={self.ep_size})")
        for r in range(self.ep_size):
            if table.count(r) != self.num_local_experts:
                total = "num_experts" if self.physical_to_logical is None else "physical experts"
                raise ValueError(f"expert_to_rank gives rank {r} {table.count(r)} experts; every rank must hold "
                                 f"{total} / ep_size = {self.num_local_experts}")
        object.__setattr__(self, "expert_to_rank", table)

    @classmethod
    def with_redundant_experts(cls, num_experts: int, num_redundant_experts: int, ep_size: int = 1,
                               rank: int = 0) -> "ExpertPlacement":
        """The starting placement of E experts plus N copies, before any load is measured: P = E + N
        slots, contiguous over the ranks, slot p holding expert p % E (with N < E, experts 0..N-1 get a
        second copy). ep.eplb.plan computes a better one from measured load."""
        for name, value in (("num_experts", num_experts), ("ep_size", ep_size)):  # first: the limit is made of them
            if not is_int_at_least(value, 1):  # (ep_size=0 blamed num_redundant_experts, "allowed: 0..-8")
                raise ValueError(f"{name}={value!r}; allowed: an int >= 1")
        limit = num_experts * (ep_size - 1)
        if not is_int_at_least(num_redundant_experts, 0) or num_redundant_experts > limit:
            raise ValueError(f"num_redundant_experts={num_redundant_experts!r}; allowed: an int in 0..{limit} "
                             f"(num_experts * (ep_size - 1) = {num_experts} * ({ep_size} - 1): at most one copy "
                             f"of an expert per rank)")
        num_redundant_experts = int(num_redundant_experts)  # (a numpy integer becomes Python's)
        P = num_experts + num_redundant_experts
        if P % ep_size and num_redundant_experts == 0:  # (the caller's argument is num_experts, not the copies)
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}; allowed: a multiple of "
                             f"{ep_size} (each rank holds the same number of experts), or num_redundant_experts="
                             f"{-P % ep_size} copies of hot experts to fill the ranks' slots")
        if P % ep_size:
            raise ValueError(f"num_redundant_experts={num_redundant_experts}: num_experts + num_redundant_experts = "
                             f"{P} is not divisible by ep_size={ep_size}; allowed: values that make it a multiple "
                             f"of {ep_size}")
        if num_redundant_experts == 0:
            return cls(num_experts, ep_size, rank)
        return cls(num_experts, ep_size, rank, physical_to_logical=tuple(q % num_experts for q in range(P)))

    @property
    def num_physical_experts(self) -> int:
        """P: slots over all ranks (E without redundant experts)."""
        return self.num_experts if self.physical_to_logical is None else len(self.physical_to_logical)

    @property
    def num_redundant_experts(self) -> int:
        return self.num_physical_experts - self.num_experts

    @property
    def maps_ids(self) -> bool:
        """Whether logical ids must become physical ids before the dispatcher (False: they are equal)."""
        return self.physical_to_logical is not None and self.physical_to_logical != tuple(range(self.num_experts))

    def physical(self) -> "ExpertPlacement":
        """The view dispatchers and runners are built on: the P physical slots as experts, no copies."""
        if self.physical_to_logical is None:
            return self
        return ExpertPlacement(self.num_physical_experts, self.ep_size, self.rank, self.expert_to_rank)

    def at_rank(self, rank: int) -> "ExpertPlacement":
        """The same placement as rank `rank` sees it."""
        return ExpertPlacement(self.num_experts, self.ep_size, rank, self.expert_to_rank, self.physical_to_logical)

    @property
    def num_local_experts(self) -> int:
        return self.num_physical_experts // self.ep_size

    @property
    def sink(self) -> int:
        """Local index of the sink slot: where -1 and remote ids are rerouted (mask entry 0)."""
        return self.num_local_experts

    @property
    def is_contiguous(self) -> bool:
        return not self.maps_ids and (self.expert_to_rank is None or
                                      self._owners() == _contiguous(self.num_physical_experts, self.ep_size))

    @property
    def first_expert(self) -> int:
        """This rank's first global expert; only a contiguous placement has one (else: local_expert_ids)."""
        if not self.is_contiguous:
            raise ValueError("first_expert is undefined for a non-contiguous placement (expert_to_rank or "
                             "redundant experts given); use local_expert_ids() for this rank's global expert ids")
        return self.rank * self.num_local_experts

    def describe_local_experts(self) -> str:
        """This rank's global experts for messages: "4..7" when contiguous, else the list."""
        ids = self.logical_experts_of_rank(self.rank)
        return f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids)

    # ------------------------------------------------------------------ host-side tables (tuples)

    def _owners(self) -> tuple[int, ...]:
        """[P]: the rank of each physical slot."""
        return (self.expert_to_rank if self.expert_to_rank is not None
                else _contiguous(self.num_physical_experts, self.ep_size))

    def _logical(self) -> tuple[int, ...]:
        """[P]: the logical expert of each physical slot."""
        return self.physical_to_logical if self.physical_to_logical is not None else tuple(range(self.num_experts))

    def _local_indices(self) -> tuple[int, ...]:
        seen = [0] * self.ep_size
        index = []
        for r in self._owners():
            index.append(seen[r])
            seen[r] += 1
        return tuple(index)

    def _replicas(self) -> list[list[int]]:
        """[E] lists: the physical slots of each logical expert, ascending."""
        slots: list[list[int]] = [[] for _ in range(self.num_experts)]
        for q, e in enumerate(self._logical()):
            slots[e].append(q)
        return slots

    def physical_slots_of_rank(self, rank: int) -> list[int]:
        """`rank`'s physical slots in local order (ascending physical id)."""
        _check_index("rank", rank, self.ep_size, f"ep_size={self.ep_size}")  # (5 or 1.5 held no slots, silently)
        return [q for q, r in enumerate(self._owners()) if r == rank]

    def logical_experts_of_rank(self, rank: int) -> list[int]:
        """The logical expert of each of `rank`'s slots, in local order."""
        logical = self._logical()
        return [logical[q] for q in self.physical_slots_of_rank(rank)]

    def replicas_of(self, expert: int) -> list[tuple[int, int]]:
        """(rank, local index) of every copy of logical `expert`."""
        _check_index("expert", expert, self.num_experts, f"num_experts={self.num_experts}")  # (-1: the last one's)
        owners, local = self._owners(), self._local_indices()
        return [(owners[q], local[q]) for q in self._replicas()[expert]]

    # ------------------------------------------------------------------ device tables (cached)

    def expert_rank_table(self, device=None) -> torch.Tensor:
        """[E] int32: the rank owning each global expert ([P]: each physical slot, with copies)."""
        return _table(self, "rank", _device(device))

    def expert_local_index_table(self, device=None) -> torch.Tensor:
        """[E] int32: each global expert's index among its owner's L experts (its weight row there)."""
        return _table(self, "local_index", _device(device))

    def experts_of_rank(self, rank: int, device=None) -> torch.Tensor:
        """[L] int64: global (logical) ids of `rank`'s experts in local order (local index -> global id)."""
        _check_index("rank", rank, self.ep_size, f"ep_size={self.ep_size}")  # (True read as 1, 1.5 as no rank)
        return _table(self, ("experts_of", rank), _device(device))

    def local_expert_ids(self, device=None) -> torch.Tensor:
        """[L] int64: this rank's global expert ids in local order (what load_experts slices)."""
        return self.experts_of_rank(self.rank, device)

    def global_to_local_table(self, device=None) -> torch.Tensor:
        """[E + 1] int32: this rank's local index of each global id, the sink L for experts elsewhere;
        entry E (where a -1 id is rerouted) is the sink too. RunnerInput.from_global_ids reads it."""
        return _table(self, "global_to_local", _device(device))

    def local_to_local_table(self, device=None) -> torch.Tensor:
        """[L + 1] int32: 0..L-1, then the sink L; RunnerInput.from_local_ids reads it (any id outside
        [0, L), -1 included, becomes the sink)."""
        return _table(self, "local_to_local", _device(device))

    def local_mask_with_sink(self, device=None) -> torch.Tensor:
        """[L+1] bool: every local expert on, the sink slot L off."""
        return _table(self, "local_mask", _device(device))

    def global_mask(self, device=None) -> torch.Tensor:
        """[P] bool, one per physical slot (P = E without redundant experts): 1 for this rank's slots (the view of
        the mori format's global ids as a mask; not a range when non-contiguous)."""
        return _table(self, "global_mask", _device(device))

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
        """Global (logical) id of this rank's local ids; -1 stays -1."""
        return _lookup(self.local_expert_ids(local_ids.device).to(local_ids.dtype), local_ids)

    # ------------------------------------------------------------------ logical -> physical (copies)

    def to_physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, K] logical (-1 = none) -> [T, K] physical ids, on the device, no host sync.
        Each (token, expert) pair goes to exactly one copy of its expert: the copy on this rank when
        there is one (it never leaves the rank), else copy (t + rank) mod c of the expert's c copies
        for token t, so senders spread their pairs evenly over the copies. -1 stays -1; an id outside
        -1..E-1 stays outside -1..P-1 (the caller's value when it already is, else -2), so the
        dispatcher's check still fails every rank. int64 ids stay int64, others become int32.
        Without copies (or with slot e holding expert e) the ids come back as they are."""
        if not self.maps_ids:
            return topk_ids
        device = topk_ids.device
        choice, count, local = (_table(self, name, device) for name in ("replica_choice", "replica_count",
                                                                              "replica_local"))
        E, P = self.num_experts, self.num_physical_experts
        ids = topk_ids.long()
        valid = (ids >= 0) & (ids < E)
        row = torch.where(valid, ids, E)  # row E: -1 and bad ids (one "copy", slot -1)
        token = torch.arange(ids.shape[0], device=device).unsqueeze(1) + self.rank
        here = local[row]
        physical = torch.where(here >= 0, here, choice[row, token % count[row]])
        bad = torch.where((ids < -1) | (ids >= P), ids, torch.full_like(ids, -2))
        physical = torch.where(valid | (ids == -1), physical, bad)
        return physical if topk_ids.dtype == torch.int64 else physical.to(torch.int32)

    def logical_of(self, physical_ids: torch.Tensor) -> torch.Tensor:
        """The logical expert of each physical id; -1 stays -1."""
        return _lookup(_table(self, "logical", physical_ids.device), physical_ids)


def _check_index(name: str, value, limit: int, why: str) -> None:
    """An error naming `name` unless `value` is an int in 0..limit-1 (bools and floats are not)."""
    if not (is_int_at_least(value, 0) and value < limit):
        raise ValueError(f"{name}={value!r}; allowed: an int in 0..{limit - 1} ({why})")


def _contiguous(num_experts: int, ep_size: int) -> tuple[int, ...]:
    L = num_experts // ep_size
    return tuple(e // L for e in range(num_experts))


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] in ids' dtype, -1 kept as -1."""
    found = table.to(ids.dtype)[ids.clamp(min=0).long()]
    return torch.where(ids >= 0, found, ids)


# Tables kept at most: every rebalance makes a new placement (and a few tables for it), so an unbounded
# cache would keep every placement a long job ever used. A layer reads ~15 tables per device (its
# logical and physical views), so this keeps ~270 layers' tables without rebuilding any.
TABLE_CACHE_SIZE = 4096


def _table(placement: ExpertPlacement, kind, device: torch.device) -> torch.Tensor:
    """The placement's `kind` table on `device`: from the cache eagerly; built plainly while torch.compile
    traces (dynamo does not keep an lru_cache's entries, it traces the wrapped function and warns at every
    call site; the table becomes a constant of the compiled graph either way)."""
    if torch.compiler.is_compiling():
        return _build(placement, kind, device)
    return _cached(placement, kind, device)


@functools.lru_cache(maxsize=TABLE_CACHE_SIZE)
def _cached(placement: ExpertPlacement, kind, device: torch.device) -> torch.Tensor:
    """Built on the host once per (placement, table, device), the least recently used dropped beyond
    TABLE_CACHE_SIZE. On CUDA the first call copies to the device: run one eager step before capturing
    a CUDA graph (the usual warm-up does)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # a host copy cannot be captured
        raise RuntimeError(f"the expert placement's {kind} table for {device} is built on the first eager call; "
                           "run one eager step (the usual warm-up) before capturing a CUDA graph")
    with torch.inference_mode(False):  # kept for later calls, training ones included: never an inference tensor
        return _build(placement, kind, device)


def _build(placement: ExpertPlacement, kind, device: torch.device) -> torch.Tensor:
    name, *args = kind if isinstance(kind, tuple) else (kind,)
    return _TABLES[name](placement, *args).to(device)


def _global_to_local(p: ExpertPlacement) -> torch.Tensor:
    local = [i if r == p.rank else p.sink for r, i in zip(p._owners(), p._local_indices())]
    return torch.tensor(local + [p.sink], dtype=torch.int32)


def _replica_table(p: ExpertPlacement, name: str) -> torch.Tensor:
    """replica_choice [E+1, C]: each expert's physical slots repeated to C (the most copies of any
    expert; row E, for -1: all -1); replica_count [E+1]: copies (1 in row E); replica_local [E+1]:
    the copy on this rank, -1 when there is none (row E: -1)."""
    slots, owners = p._replicas(), p._owners()
    C = max(len(s) for s in slots)
    tables = {"replica_choice": [[s[i % len(s)] for i in range(C)] for s in slots] + [[-1] * C],
              "replica_count": [len(s) for s in slots] + [1],
              "replica_local": [next((q for q in s if owners[q] == p.rank), -1) for s in slots] + [-1]}
    return torch.tensor(tables[name], dtype=torch.int64)


_TABLES = {
    "rank": lambda p: torch.tensor(p._owners(), dtype=torch.int32),
    "local_index": lambda p: torch.tensor(p._local_indices(), dtype=torch.int32),
    "experts_of": lambda p, rank: torch.tensor(p.logical_experts_of_rank(rank), dtype=torch.int64),
    "logical": lambda p: torch.tensor(p._logical(), dtype=torch.int64),
    "replica_choice": lambda p: _replica_table(p, "replica_choice"),
    "replica_count": lambda p: _replica_table(p, "replica_count"),
    "replica_local": lambda p: _replica_table(p, "replica_local"),
    "global_to_local": _global_to_local,
    "local_to_local": lambda p: torch.arange(p.num_local_experts + 1, dtype=torch.int32),
    "local_mask": lambda p: torch.tensor([True] * p.num_local_experts + [False]),
    "global_mask": lambda p: torch.tensor([r == p.rank for r in p._owners()]),
}


def _int_table(name: str, values: Sequence) -> tuple:
    """values as a tuple of Python ints (integer tensors and numpy ints too); an entry that is no
    integer (0.7, True, "1") is an error naming it, not truncated onto some rank or expert by int()."""
    if isinstance(values, torch.Tensor) and values.dim() == 0 or not isinstance(values, Iterable):
        # (iterating failed naming neither the argument nor the value: "'int' object is not iterable")
        raise ValueError(f"{name}={values!r}; allowed: None or a sequence of ints (one per expert slot)")
    table = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not (v.is_floating_point() or v.dtype == torch.bool):
            v = v.item()
        if not is_int_at_least(v, -2 ** 63):
            raise ValueError(f"{name}[{i}]={v!r}; allowed: an int (a rank or an expert id)")
        table.append(int(v))
    return tuple(table)
