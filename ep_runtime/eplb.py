"""Expert load balancing: where to put E experts and their redundant copies so no rank carries more
than its share.

Routing is skewed (a few experts get several times the mean load), and the rank holding the hot
experts sets the pace of every exchange and every GEMM step. `plan(load, R, P)` gives the hottest
experts extra copies on other ranks (P - E copies in all) and packs the P slots onto the R ranks so
the most-loaded rank carries as little as possible; `EPMoE.apply_placement(plan)` moves the weights.

    load = layer.expert_load(reset=True)           # [E] pairs this rank sent since the last reset
    dist.all_reduce(load)                          # the global load
    layer.apply_placement(ep.eplb.plan(load, num_ranks=R, num_physical_experts=layer.placement.num_physical_experts))

(or `layer.rebalance()`, which does these three steps). The plan is a pure function of its
arguments, so every rank computes the same one from the same all-reduced load.

Algorithm (the one DeepSeek published for EPLB, written anew here): give one more copy to the
expert with the largest load per copy until P slots are used (at most one copy per rank); pack the
copies, heaviest first, onto the least-loaded rank that has a free slot and no copy of that expert;
then swap pairs of copies between the most-loaded rank and the others while that lowers it. With
`num_nodes`, experts are first split over nodes by the same packing (each node gets E / nodes
experts and P / nodes slots), then balanced within each node, so every copy of an expert stays on
the node that holds it (traffic to it stays on that node's fast links).
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .placement import ExpertPlacement
from .validation import is_int_at_least


@dataclass(frozen=True)
class Plan:
    """A placement for every rank: physical_to_logical [P] names the logical expert of each physical
    slot, slots [r*L, (r+1)*L) on rank r (L = P / R); rank_load [R]: the load each rank is expected
    to receive if each expert's load splits evenly over its copies (what the plan minimised)."""

    num_experts: int
    num_ranks: int
    physical_to_logical: tuple[int, ...]
    rank_load: tuple[float, ...]

    @property
    def num_physical_experts(self) -> int:
        return len(self.physical_to_logical)

    @property
    def imbalance(self) -> float:
        """Expected max / mean load per rank (1.0 = perfect; 1.0 when there is no load)."""
        mean = sum(self.rank_load) / self.num_ranks
        return max(self.rank_load) / mean if mean > 0 else 1.0

    def placement(self, rank: int = 0) -> ExpertPlacement:
        """The placement as rank `rank` sees it."""
        return ExpertPlacement(self.num_experts, self.num_ranks, rank, physical_to_logical=self.physical_to_logical)


def plan(load, num_ranks: int, num_physical_experts: int, num_nodes: Optional[int] = None,
         max_swaps: int = 256) -> Plan:
    """load: [E] global (token, expert) pair counts (e.g. the all-reduced `layer.expert_load()`), a
    tensor or sequence of non-negative numbers; num_ranks R; num_physical_experts P: E plus the
    redundant copies, a multiple of R in E..E*R; num_nodes: ranks are grouped into this many nodes of
    R / num_nodes consecutive ranks (hierarchical balancing; None: one level; other layouts: on_nodes,
    which EPMoE.rebalance applies for the group's real nodes). max_swaps bounds the
    refinement. Deterministic: the same arguments give the same plan on every rank."""
    loads = _check_load(load)
    E = len(loads)
    if not is_int_at_least(num_ranks, 1):
        raise ValueError(f"num_ranks={num_ranks!r}; allowed: an int >= 1")
    if not is_int_at_least(num_physical_experts, 1) or not E <= num_physical_experts <= E * num_ranks or \
            num_physical_experts % num_ranks:
        raise ValueError(f"num_physical_experts={num_physical_experts!r}; allowed: a multiple of num_ranks={num_ranks} "
                         f"in {E}..{E * num_ranks} (num_experts={E} plus at most num_ranks - 1 copies of each)")
    if not is_int_at_least(max_swaps, 0):
        raise ValueError(f"max_swaps={max_swaps!r}; allowed: an int >= 0")
    G = check_num_nodes(num_nodes, num_ranks, E, num_physical_experts)
    R, P = num_ranks, num_physical_experts
    # Level 1: experts to nodes (each node E/G experts); level 2: within each node, copies and ranks.
    nodes = _pack(list(range(E)), [loads[e] for e in range(E)], G, E // G, max_swaps) if G > 1 else [list(range(E))]
    ranks_per_node, slots_per_node = R // G, P // G
    slots: list[list[int]] = []
    rank_load: list[float] = []
    for experts in nodes:
        node_slots, node_load = _balance(experts, [loads[e] for e in experts], ranks_per_node, slots_per_node,
                                         max_swaps)
        slots += node_slots
        rank_load += node_load
    return Plan(E, R, tuple(e for rank_slots in slots for e in rank_slots), tuple(rank_load))


def check_num_nodes(num_nodes, num_ranks: int, num_experts: int, num_physical_experts: int) -> int:
    """plan's num_nodes for these sizes, as the number of node groups G (1 for None); an error naming it and
    what is allowed otherwise. EPMoE.rebalance checks it before its first collective."""
    G = 1 if num_nodes is None else num_nodes
    E = num_experts
    if not is_int_at_least(G, 1) or num_ranks % G or E % G or num_physical_experts % G:
        raise ValueError(f"num_nodes={num_nodes!r}; allowed: None or an int >= 1 dividing num_ranks={num_ranks}, "
                         f"num_experts={E} and num_physical_experts={num_physical_experts}")
    if G > 1 and num_physical_experts // G > (E // G) * (num_ranks // G):
        raise ValueError(f"num_physical_experts={num_physical_experts} is too many for num_nodes={G}: each node "
                         f"gets {E // G} experts and {num_ranks // G} ranks, room for at most "
                         f"{(E // G) * (num_ranks // G) * G} slots in all")
    return int(G)


def on_nodes(plan: Plan, node_of: Sequence[int]) -> Plan:
    """`plan`, made with num_nodes=G for nodes of consecutive ranks (node g: ranks [g*n, (g+1)*n), n = R / G),
    moved onto ranks whose nodes are node_of[r] (G nodes numbered 0.. in order of first appearance, n ranks
    each, in any order, e.g. a launcher that deals ranks out to nodes round-robin): the i-th rank of node
    g takes the slots of rank g*n + i, so every copy of an expert still stays on one node."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an ep.eplb.Plan (eplb.plan's result); got {type(plan).__name__}")
    # (a str listed its characters; an int or None failed in list() naming nothing: "'int' object is not iterable")
    given, R = node_of, plan.num_ranks
    node_of = list(node_of) if isinstance(node_of, Iterable) and not isinstance(node_of, str) else []
    G = max(node_of) + 1 if node_of and all(is_int_at_least(b, 0) for b in node_of) else 0
    if len(node_of) != R or G == 0 or any(node_of.count(b) != R // G for b in range(G)):
        raise ValueError(f"node_of={given!r}; allowed: the node (0..G-1) of each of the plan's num_ranks={R} ranks, "
                         f"every node holding R/G of them (the plan's num_nodes=G)")
    n, L = R // G, plan.num_physical_experts // R
    index = {b: 0 for b in range(G)}
    source = []  # the consecutive-layout rank whose slots rank r takes
    for b in node_of:
        source.append(b * n + index[b])
        index[b] += 1
    slots = [plan.physical_to_logical[s * L:(s + 1) * L] for s in source]
    return Plan(plan.num_experts, R, tuple(e for rank_slots in slots for e in rank_slots),
                tuple(plan.rank_load[s] for s in source))


def _check_load(load) -> list[float]:
    if isinstance(load, torch.Tensor):
        if load.dim() != 1 or load.numel() == 0:
            raise ValueError(f"load has shape {list(load.shape)}; expected [num_experts] (one count per expert)")
        values = load.detach().double().cpu().tolist()
    else:
        try:
            if isinstance(load, (str, bytes)):  # ("1234" read as the loads 1, 2, 3 and 4 of four experts)
                raise TypeError
            values = [float(v) for v in load]
        except (TypeError, ValueError):
            raise ValueError(f"load={load!r}; expected a 1-D tensor or sequence of counts, one per expert") from None
        if not values:
            raise ValueError("load is empty; expected one count per expert")
    for e, v in enumerate(values):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"load[{e}]={v}; allowed: finite counts >= 0")
    return values


def _balance(experts: Sequence[int], loads: Sequence[float], num_ranks: int, num_slots: int,
             max_swaps: int) -> tuple[list[list[int]], list[float]]:
    """Copies for `experts` (num_slots in all, at most one per rank) packed onto num_ranks ranks of
    num_slots / num_ranks slots. Returns each rank's experts (ascending) and its expected load."""
    copies = _copies(loads, num_slots, num_ranks)
    items, weights = [], []
    for i, e in enumerate(experts):
        items += [e] * copies[i]
        weights += [loads[i] / copies[i]] * copies[i]
    bins = _pack(items, weights, num_ranks, num_slots // num_ranks, max_swaps)
    per_copy = {e: loads[i] / copies[i] for i, e in enumerate(experts)}
    return [sorted(b) for b in bins], [sum(per_copy[e] for e in b) for b in bins]


def _copies(loads: Sequence[float], num_slots: int, max_copies: int) -> list[int]:
    """How many copies each expert gets: one each, then one more at a time to the expert with the
    largest load per copy (never more than max_copies)."""
    copies = [1] * len(loads)
    heap = [(-load, i) for i, load in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(num_slots - len(loads)):
        while True:
            _, i = heapq.heappop(heap)
            if copies[i] < max_copies:
                break
        copies[i] += 1
        if copies[i] < max_copies:
            heapq.heappush(heap, (-loads[i] / copies[i], i))
    return copies


def _pack(items: Sequence[int], weights: Sequence[float], num_bins: int, capacity: int,
          max_swaps: int) -> list[list[int]]:
    """items (expert ids, an id at most once per bin) into num_bins bins of exactly `capacity` each,
    minimising the heaviest bin: heaviest first onto the lightest bin with room, then swaps."""
    order = sorted(range(len(items)), key=lambda i: (-weights[i], items[i]))
    bins: list[list[int]] = [[] for _ in range(num_bins)]  # indices into items
    total = [0.0] * num_bins
    held: list[set] = [set() for _ in range(num_bins)]
    for i in order:
        open_bins = [b for b in range(num_bins) if len(bins[b]) < capacity and items[i] not in held[b]]
        if open_bins:
            b = min(open_bins, key=lambda b: (total[b], len(bins[b]), b))
        else:  # every bin with room holds this expert: make room by moving another item out
            b = _make_room(items, weights, bins, total, held, items[i], capacity)
        bins[b].append(i)
        total[b] += weights[i]
        held[b].add(items[i])
    _swap_down(items, weights, bins, total, held, max_swaps)
    return [[items[i] for i in b] for b in bins]


def _make_room(items, weights, bins, total, held, expert: int, capacity: int) -> int:
    """A bin with room holds `expert`: move one of its items to a full bin that lacks `expert`,
    taking from there an item the first bin lacks. Returns the bin that now accepts `expert`."""
    room = next(b for b in range(len(bins)) if len(bins[b]) < capacity)
    for full in range(len(bins)):
        if expert in held[full]:
            continue
        for j in bins[full]:
            if items[j] not in held[room]:
                bins[full].remove(j)
                total[full] -= weights[j]
                held[full].discard(items[j])
                bins[room].append(j)
                total[room] += weights[j]
                held[room].add(items[j])
                return full
    raise ValueError(f"cannot place the copies of expert {expert}: more copies than ranks")


def _swap_down(items, weights, bins, total, held, max_swaps: int) -> None:
    """Swap an item of the heaviest bin with a lighter item elsewhere while that lowers the heavier
    of the two bins (which never raises the heaviest bin); the best swap first."""
    for _ in range(max_swaps):
        top = max(range(len(bins)), key=lambda b: (total[b], -b))
        best = None
        for other in range(len(bins)):
            if other == top:
                continue
            for i in bins[top]:
                for j in bins[other]:
                    delta = weights[i] - weights[j]
                    if delta <= 1e-12 or (items[i] != items[j] and (items[i] in held[other] or items[j] in held[top])):
                        continue
                    new_max = max(total[top] - delta, total[other] + delta)
                    if new_max < total[top] - 1e-12 and (best is None or new_max < best[0]):
                        best = (new_max, other, i, j, delta)
        if best is None:
            return
        _, other, i, j, delta = best
        bins[top][bins[top].index(i)] = j
        bins[other][bins[other].index(j)] = i
        total[top] -= delta
        total[other] += delta
        held[top].discard(items[i])
        held[top].add(items[j])
        held[other].discard(items[j])
        held[other].add(items[i])
