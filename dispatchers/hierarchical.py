"""Node-aware exchange: a token crosses the network once per destination node, then fans out inside it.

The flat exchange (rank_exchange) sends a token once to every rank owning one of its experts, so a
token whose experts sit on three ranks of another node crosses the network three times. Node-aware
(DeepEP's internode layout), for host plans:
- stage 1: rank s sends each token once to each node holding one of its experts, to that node's
  rank with s's local index (its relay; s itself for its own node);
- stage 2: each relay forwards the rows it received to the ranks of its node owning their experts,
  with ids as the flat path gives them (local to the receiver, or global).
The receiver reorders what arrived into the flat exchange's order (source rank, then token), so a
dispatch's outputs are bit-identical to the flat path's. Combine runs it backwards: each rank sends
its partial rows to the relays, a relay adds one token's partials from its node (fp32, rank order)
and sends one row per token back over the network in the partials' dtype, and the source adds the
node sums (fp32, node order). How that compares with the flat path's single sum: docs/multinode.md.

Every split size comes from the one count table (one extra column per node: tokens a rank sends to
that node), so no host sync is added. Dispatch runs four all_to_alls (each stage: the rows, then their
weights and ids), combine two (ep_runtime.bench.cost_model.AWARE_COLLECTIVES). Built from
differentiable gathers and exchanges, so autograd works as on the flat path (dispatch's backward is
this combine, combine's backward this dispatch).

Which node a rank is on: EP_RUNTIME_RANKS_PER_NODE / ranks_per_node=n (> 0: group ranks [0, n) are
node 0, ...), else the launcher's node index (torchrun's GROUP_RANK, Slurm's SLURM_NODEID, except under
Open MPI's mpirun), else the host name; gathered once, on the first host plan.
"""
from __future__ import annotations

import socket
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ep_runtime import envs

from .transport import all_gather_rows, all_to_all, host_values

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class NodeLayout:
    """node_of[r]: the node of group rank r, numbered 0.. in order of first appearance."""

    node_of: tuple[int, ...]
    # (what, device) -> the constant tensors below, made once per device (every node-aware dispatch reads them)
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_keys(cls, keys: Sequence) -> "NodeLayout":
        number: dict = {}
        return cls(tuple(number.setdefault(k, len(number)) for k in keys))

    @classmethod
    def blocks(cls, world_size: int, ranks_per_node: int) -> "NodeLayout":
        """Ranks [0, n) on node 0, [n, 2n) on node 1, ... (the last node may hold fewer)."""
        return cls(tuple(r // ranks_per_node for r in range(world_size)))

    @property
    def num_nodes(self) -> int:
        return max(self.node_of) + 1

    def ranks_on(self, node: int) -> tuple[int, ...]:
        return tuple(r for r, b in enumerate(self.node_of) if b == node)

    def relay(self, rank: int, node: int) -> int:
        """The rank of `node` that receives rank's stage-1 rows: the one with rank's local index
        (modulo the node's size, for nodes of unequal size)."""
        here = self.ranks_on(self.node_of[rank])
        there = self.ranks_on(node)
        return there[here.index(rank) % len(there)]

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of[a] == self.node_of[b]

    def node_of_on(self, device: torch.device) -> torch.Tensor:
        """node_of as an int64 tensor on `device`."""
        return self._constant("node_of", device, lambda: self.node_of, torch.long)

    def relays_on(self, rank: int, device: torch.device) -> torch.Tensor:
        """[N] int64 on `device`: rank's relay on each node (where its stage-1 rows go)."""
        return self._constant(("relays", rank), device, lambda: [self.relay(rank, b) for b in range(self.num_nodes)],
                              torch.long)

    def node_mask_on(self, node: int, device: torch.device) -> torch.Tensor:
        """[R] bool on `device`: which ranks are on `node`."""
        return self._constant(("node_mask", node), device, lambda: [b == node for b in self.node_of], torch.bool)

    def node_ranks_on(self, node: int, device: torch.device) -> torch.Tensor:
        """ranks_on(node) as an int64 tensor on `device`."""
        return self._constant(("node_ranks", node), device, lambda: self.ranks_on(node), torch.long)

    def _constant(self, what, device: torch.device, values: Callable[[], Sequence], dtype: torch.dtype) -> torch.Tensor:
        """values() on `device`, made once per (what, device): the layout never changes, so a dispatch
        copies nothing host-to-device for it after the first."""
        made = self._on_device.get((what, device))
        if made is None:
            made = self._on_device[(what, device)] = host_values(list(values()), dtype, device)
        return made


def use_two_stages(mode: str, nodes: NodeLayout) -> bool:
    """auto: only where it can save network bytes (several nodes, some holding several ranks); on:
    wherever there are several nodes (on one node every relay is the sender itself, so stage 1 would
    only move each rank's rows to itself: the flat plan is the same exchange, one stage)."""
    if mode == "auto":
        return 1 < nodes.num_nodes < len(nodes.node_of)
    return mode == "on" and nodes.num_nodes > 1


def _node_key() -> int:
    """This rank's node, as far as it knows alone: the launcher's node index, else a hash of the host name."""
    # Under Open MPI's mpirun a SLURM_NODEID is not this job's: mpirun starts its daemons with an srun step
    # of the other nodes (numbered from 0 there) and its own node's ranks inherit the batch script's 0, so two
    # nodes would read one (detect_launch ignores the Slurm variables there too); the host name tells them apart.
    mpirun = envs.launcher("OMPI_COMM_WORLD_SIZE") is not None
    for name in ("GROUP_RANK",) if mpirun else ("GROUP_RANK", "SLURM_NODEID"):
        index = envs.launcher(name, int)
        if index is not None:
            return index
    return zlib.crc32(socket.gethostname().encode())  # same host name, same node (a clash only costs speed)


def resolve_nodes(group, world_size: int, ranks_per_node: int, device: torch.device) -> NodeLayout:
    """Every rank's node: from ranks_per_node alone when > 0, else one all_gather of each rank's key
    (call it on every rank together)."""
    if ranks_per_node > 0 or world_size == 1:
        return NodeLayout.blocks(world_size, ranks_per_node or 1)
    mine = torch.tensor([_node_key()], dtype=torch.int64, device=device)
    return NodeLayout.from_keys(all_gather_rows(mine, group, world_size).view(-1).tolist())


@dataclass(frozen=True)
class LinkRows:
    """Rows one rank puts on each class of link, in one dispatch and in its combine (which sends the
    received rows back): same_node (inside a node: NVLink), other_node (between nodes: the network).
    Rows a rank sends to itself cross no link and count in neither."""

    dispatch_same_node: int
    dispatch_other_node: int
    combine_same_node: int
    combine_other_node: int


@dataclass(frozen=True)
class LinkBytes:
    """LinkRows in bytes: a dispatch row is the token's wire row plus its K weights and K ids (4 bytes
    each; 8 with float64 tokens, whose weights travel as float64); a combine row is H values of the tokens' dtype. The count table's all_gather (a few ints
    per rank and expert) is not counted."""

    dispatch_same_node: int
    dispatch_other_node: int
    combine_same_node: int
    combine_other_node: int

    @classmethod
    def of(cls, rows: LinkRows, dispatch_row_bytes: int, combine_row_bytes: int) -> "LinkBytes":
        return cls(rows.dispatch_same_node * dispatch_row_bytes, rows.dispatch_other_node * dispatch_row_bytes,
                   rows.combine_same_node * combine_row_bytes, rows.combine_other_node * combine_row_bytes)


def _by_link(splits: Sequence[int], me: int, nodes: NodeLayout) -> tuple[int, int]:
    """(same-node rows, other-node rows) of per-peer row counts, the rows to `me` itself excluded."""
    same = sum(n for d, n in enumerate(splits) if d != me and nodes.same_node(d, me))
    other = sum(n for d, n in enumerate(splits) if not nodes.same_node(d, me))
    return same, other


def flat_link_rows(send_splits: Sequence[int], recv_splits: Sequence[int], me: int, nodes: NodeLayout) -> LinkRows:
    return LinkRows(*_by_link(send_splits, me, nodes), *_by_link(recv_splits, me, nodes))


def count_link_rows(destinations: Sequence[Sequence[Sequence[int]]], nodes: NodeLayout,
                    node_aware: bool) -> list[LinkRows]:
    """Pure Python, no process group: every rank's LinkRows for a routing. destinations[s][t]: the
    ranks owning at least one expert of rank s's token t (any order). Counts the rules directly:
    flat, one row per destination rank; node-aware, one row per destination node to the relay, then
    one per destination rank of that node from the relay."""
    R = len(nodes.node_of)
    sent = [[0, 0] for _ in range(R)]  # per rank: dispatch rows (same node, other node)
    received = [[0, 0] for _ in range(R)]

    def move(src: int, dst: int) -> None:
        if src != dst:
            link = 0 if nodes.same_node(src, dst) else 1
            sent[src][link] += 1
            received[dst][link] += 1

    for s, tokens in enumerate(destinations):
        for dests in tokens:
            if not node_aware:
                for d in set(dests):
                    move(s, d)
                continue
            for b in sorted({nodes.node_of[d] for d in dests}):
                relay = nodes.relay(s, b)
                move(s, relay)
                for d in {d for d in dests if nodes.node_of[d] == b}:
                    move(relay, d)
    return [LinkRows(sent[r][0], sent[r][1], received[r][0], received[r][1]) for r in range(R)]


def tokens_per_node(in_rank: torch.Tensor, nodes: NodeLayout) -> torch.Tensor:
    """[T, R] bool -> [N] int32: tokens with at least one destination on each node (the count table's
    extra columns)."""
    return _in_node(in_rank, nodes).sum(0).to(torch.int32)


def _in_node(in_rank: torch.Tensor, nodes: NodeLayout) -> torch.Tensor:
    node_of = nodes.node_of_on(in_rank.device)
    hits = torch.zeros(in_rank.shape[0], nodes.num_nodes, dtype=torch.int32, device=in_rank.device)
    return hits.index_add_(1, node_of, in_rank.to(torch.int32)) > 0


def _starts(counts: Sequence[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out


# (x, ids [., K] int, weights [., K], token [S], dest [S], token's inverse [., C], local_ids) -> (rows [S, H],
# meta [S, 2K] fp32): the flat exchange's packing, handed in so both stages pack exactly as the flat path does.
Pack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool],
                tuple[torch.Tensor, torch.Tensor]]
# (rows [S, H], combine_index [T, C]) -> [T, H]: the flat exchange's fp32 gather-sum.
SumRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RelayPlan:
    """The node-aware part of a host plan (rank me). Stage 1 (me -> relays) is the handle's own send
    plan (send_token, send_rank, combine_index); this holds its splits and stage 2. Splits are per
    group rank. forward_token [S2]: received stage-1 row of each row me forwards, rank-major;
    forward_rank [S2]: its destination; forward_index [R1, G]: row among those S2 of (received row,
    rank of me's node), S2 = not forwarded; order [N_recv]: the stage-2 row that is the flat path's
    i-th received row; unorder: its inverse."""

    nodes: NodeLayout
    send1: list[int]
    recv1: list[int]
    send2: list[int]
    recv2: list[int]
    order: torch.Tensor
    unorder: torch.Tensor
    forward_token: Optional[torch.Tensor] = None  # set by send() (made from the received ids)
    forward_rank: Optional[torch.Tensor] = None
    forward_index: Optional[torch.Tensor] = None

    @classmethod
    def stage_one(cls, in_rank: torch.Tensor, nodes: NodeLayout, me: int) -> torch.Tensor:
        """[T, R] bool: token t goes to rank q in stage 1 (q: the relay of each of t's nodes)."""
        out = torch.zeros_like(in_rank)
        out[:, nodes.relays_on(me, in_rank.device)] = _in_node(in_rank, nodes)
        return out

    @classmethod
    def from_counts(cls, sent: list, per_node: list, nodes: NodeLayout, me: int, device: torch.device) -> "RelayPlan":
        """sent[s][d]: tokens s sends to d in the flat exchange; per_node[s][b]: tokens s sends to node b."""
        R, mine = len(nodes.node_of), nodes.node_of[me]
        send1, recv1, send2, recv2 = [0] * R, [0] * R, [0] * R, [0] * R
        for b in range(nodes.num_nodes):
            send1[nodes.relay(me, b)] = per_node[me][b]
        for s in range(R):
            if nodes.relay(s, mine) == me:
                recv1[s] = per_node[s][mine]
                for d in nodes.ranks_on(mine):
                    send2[d] += sent[s][d]
            recv2[nodes.relay(s, mine)] += sent[s][me]
        # Stage 2 delivers relay by relay (rank order), each relay's rows by source (rank order): the
        # flat path's source-major order is a permutation of those blocks.
        counts = [sent[s][me] for s in range(R)]
        arrival = sorted(range(R), key=lambda s: (nodes.relay(s, mine), s))
        at = dict(zip(arrival, _starts([counts[s] for s in arrival])))
        shift = torch.tensor([at[s] - flat for s, flat in enumerate(_starts(counts))], dtype=torch.long)
        total = sum(counts)
        order = host_values(torch.repeat_interleave(shift, torch.tensor(counts, dtype=torch.long), output_size=total)
                            + torch.arange(total), torch.long, device)
        unorder = torch.empty_like(order).scatter_(0, order, torch.arange(total, device=device))
        return cls(nodes, send1, recv1, send2, recv2, order, unorder)

    def link_rows(self, me: int) -> LinkRows:
        d_same, _ = _by_link(self.send2, me, self.nodes)
        _, d_other = _by_link(self.send1, me, self.nodes)
        c_same, _ = _by_link(self.recv2, me, self.nodes)
        _, c_other = _by_link(self.recv1, me, self.nodes)
        return LinkRows(d_same, d_other, c_same, c_other)

    def send(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, send_token: torch.Tensor,
             send_rank: torch.Tensor, combine_index: torch.Tensor, local_ids: bool, pack: Pack, rank_of: torch.Tensor,
             group, me: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stages; returns (recv_x [N_recv, H], recv_meta [N_recv, 2K] fp32: weights then ids) in the
        flat exchange's row order."""
        R, K = len(self.nodes.node_of), ids.shape[1]
        rows, meta = pack(x, ids, weights, send_token, send_rank, combine_index, False)  # global ids: the relay routes by them
        rows = all_to_all(rows, self.recv1, self.send1, group, R)
        meta = all_to_all(meta, self.recv1, self.send1, group, R)
        relayed_ids = meta[:, K:].round().to(torch.int32)
        if self.forward_token is None:
            self._plan_forward(relayed_ids, rank_of, me)
        rows, meta = pack(rows, relayed_ids, meta[:, :K], self.forward_token, self.forward_rank, self.forward_index,
                          local_ids)
        rows = all_to_all(rows, self.recv2, self.send2, group, R)
        meta = all_to_all(meta, self.recv2, self.send2, group, R)
        return rows.index_select(0, self.order), meta.index_select(0, self.order)

    def _plan_forward(self, relayed_ids: torch.Tensor, rank_of: torch.Tensor, me: int) -> None:
        from .rank_exchange import row_plan  # (rank_exchange imports this module)
        R = len(self.nodes.node_of)
        ids = relayed_ids.long()
        valid = ids >= 0
        owner = torch.where(valid, rank_of.long()[torch.where(valid, ids, 0)], torch.full_like(ids, R))
        to = torch.zeros(ids.shape[0], R + 1, dtype=torch.bool, device=ids.device).scatter_(1, owner, True)[:, :R]
        mine = self.nodes.node_of[me]
        # (a host list made a device tensor without a sync: this runs between the two stages)
        counts = host_values(self.send2, torch.long, ids.device)
        self.forward_token, self.forward_rank, index = row_plan(to & self.nodes.node_mask_on(mine, ids.device),
                                                                counts.cumsum(0) - counts, counts, sum(self.send2))
        self.forward_index = index[:, self.nodes.node_ranks_on(mine, ids.device)]

    def reduce(self, partial: torch.Tensor, sum_rows: SumRows, group) -> torch.Tensor:
        """partial [N_recv, H] in the flat path's receive order -> each stage-1 row's node sum, back at
        its sender: [S1, H] in stage-1 send order, for the sender's gather-sum (as the flat path's)."""
        R = len(self.nodes.node_of)
        back = all_to_all(partial.index_select(0, self.unorder), self.send2, self.recv2, group, R)
        node_sums = sum_rows(back, self.forward_index)  # [R1, H]: one token's partials from this node
        return all_to_all(node_sums, self.send1, self.recv1, group, R)
