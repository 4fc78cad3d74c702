"""Send each token once to every rank owning one of its experts, and bring partial results home.

The piece deepep_normal, mori and deepep_ll share. A plan fixes where every row goes:
- host plan: one all_gather of a small count table (a row of ints per rank, laid out by
  exchange_kernels.RowLayout: T, tokens per destination, pairs per expert, whether x and
  topk_weights need gradients, x's dtype, and flags for bad ids/weights), read on the host once;
  exact split sizes, no padding bytes;
- static plan (`chunk` rows per peer): each rank sends a fixed chunk to every peer (pad rows carry
  id -1), so shapes never change and a CUDA graph can capture it. Received chunks can be compacted
  into `rows` rows, valid rows first. The table is read on the host as well, except while a graph
  is being captured (nothing can be read then: overflow becomes a device-side assert).
Every rank sees the whole table, so one rank's bad ids or weights, too many tokens or a capacity
overflow fails every rank with the same error, before any payload moves; a rank whose input failed its
shape/dtype/device checks still joins the all_gather, with a row marking it (join_with_bad_input), so
the others fail at once too where they read the table at once.

Inference on CUDA takes the kernel path: layout, value flags and counts in one kernel, one
all_gather, the plan built from the gathered table on the device by one kernel, and each row sent
together with its metadata in one exchange. A static plan there does not read the table on the host:
it is copied to pinned memory without a sync and checked CHECK_LAG static calls later on this
exchange (or by `raise_deferred()`; dispatchers/deferred.py), every rank raising the same error at the same call;
EP_RUNTIME_SYNC_CHECKS=1 reads it at once instead. CPU ranks always read it at once.

Every read of the table on CUDA goes through _read_table (and the deferred check through
_wait_deferred): the host polls an event recorded after the table's copy to pinned memory, with a deadline of
EP_RUNTIME_TIMEOUT_S after the collective was issued, instead of blocking in a synchronize; a peer
that never joins makes this rank abort the group's communicator and raise ep.PeerFailure
(ep_runtime.distributed.wait_on_device). On CPU ranks gloo's collective itself waits and fails.
"""
from __future__ import annotations

import functools
import math
import operator
import time
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import torch

from ep_runtime import envs
from ep_runtime.distributed import rank_name, ranks_name, wait_on_device
from ep_runtime.placement import ExpertPlacement
from ep_runtime.quant import QuantConfig
from ep_runtime.runner_core import grad_leaf, needs_grad, untraced
from ep_runtime.validation import assert_on_device, capturing, check_topk_values, topk_value_flags

from . import exchange_kernels, fp8_payload, hierarchical
from .deferred import CHECK_LAG, DeferredChecks, land
from .exchange_kernels import RowLayout
from .hierarchical import LinkRows, NodeLayout, RelayPlan
from .peer_transport import check_transport, peer_transport, put_bytes
from .transport import all_gather_rows, all_to_all, host_values

# x's dtype as an int for the count table (0: no x): the payload crosses ranks as raw bytes, so ranks
# dispatching different dtypes would read each other's rows as garbage (bf16 vs fp16) or exchange
# mismatched byte counts (gloo then aborts the process); the table lets every rank see every dtype.
_DTYPE_CODE = {t: i + 1 for i, t in enumerate(dict.fromkeys(
    t for t in vars(torch).values() if isinstance(t, torch.dtype) and t.is_floating_point))}
_CODE_DTYPE = {i: t for t, i in _DTYPE_CODE.items()}
# A rank whose dispatch input failed its own checks (before any collective) still joins the count table's
# all_gather (RankExchange.join_with_bad_input): its row has the length a good row would have, every count
# 0, its first flag set and T = -1 - (the index of its error's type here), so every other rank's flag check
# raises that type at once, before any payload moves. (A rank that cannot build its dispatcher sends its error's
# type too, in the settings check: Dispatcher.check_same_settings_on_every_rank.)
BAD_INPUT_TYPES = (ValueError, TypeError, RuntimeError)


class Layout(NamedTuple):
    """DeepEP's get_dispatch_layout, computed on the device without a host sync."""

    num_tokens_per_rank: torch.Tensor  # [R] int32: tokens this rank sends to each rank
    num_tokens_per_expert: torch.Tensor  # [E] int32: (token, expert) pairs per global expert
    is_token_in_rank: torch.Tensor  # [T, R] bool


def running_count(mask: torch.Tensor) -> torch.Tensor:
    """[T, C] bool -> [T, C] int64: how many True entries precede each entry in its column (its row
    among that column's Trues). Scans along the contiguous dim: a dim-0 scan of a narrow [T, C]
    tensor is a slow strided kernel on CUDA."""
    return (mask.t().contiguous().long().cumsum(1) - 1).t()


def dispatch_layout(topk_ids: torch.Tensor, num_experts: int, ep_size: int,
                    rank_of: Optional[torch.Tensor] = None) -> Layout:
    return count_row(topk_ids, num_experts, ep_size, rank_of)[0]


def count_row(topk_ids: torch.Tensor, num_experts: int, ep_size: int, rank_of: Optional[torch.Tensor] = None
              ) -> tuple[Layout, torch.Tensor]:
    """The layout and the row every rank all-gathers: [T; tokens per rank; pairs per expert] int32
    (the layout's counts are views into it). rank_of [E]: owning rank of each expert (default:
    contiguous placement). One kernel on CUDA."""
    R = ep_size
    if rank_of is None:
        rank_of = ExpertPlacement(num_experts, R).expert_rank_table(topk_ids.device)
    if exchange_kernels.on_gpu(topk_ids):
        in_rank, row = exchange_kernels.layout_row(topk_ids, None, rank_of.to(torch.int32), R, 0)
        return Layout(row[1:1 + R], row[1 + R:], in_rank), row
    T = topk_ids.shape[0]
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < num_experts)  # bad ids are flagged in the count table, never used
    owner = torch.where(valid, rank_of.long()[torch.where(valid, ids, 0)], torch.full_like(ids, R))  # R = nowhere
    in_rank = torch.zeros(T, R + 1, dtype=torch.bool, device=ids.device)
    in_rank.scatter_(1, owner, True)
    in_rank = in_rank[:, :R]
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    per_expert.scatter_add_(0, torch.where(valid, ids, num_experts).reshape(-1), torch.ones_like(ids).reshape(-1))
    row = torch.cat([torch.full((1,), T, dtype=torch.int64, device=ids.device), in_rank.sum(0),
                     per_expert[:num_experts]]).to(torch.int32)
    return Layout(row[1:1 + R], row[1 + R:], in_rank), row


def row_plan(in_rank: torch.Tensor, base: torch.Tensor, limit: torch.Tensor, total: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Send order: pair (t, r) goes to row base[r] + (its rank among the tokens going to r) while
    that rank is below limit[r]. Returns send_token [total] (T = pad), send_rank [total] and
    combine_index [T, R] (total = not sent). Torch ops (the kernel path plans with table_plan)."""
    T, R = in_rank.shape
    pos = running_count(in_rank)
    target = torch.where(in_rank & (pos < limit), base + pos, total)
    flat = target.reshape(-1)
    send_token = torch.full((total + 1,), T, dtype=torch.long, device=in_rank.device)
    send_token = send_token.scatter_(0, flat, torch.arange(T, device=in_rank.device).repeat_interleave(R))[:total]
    send_rank = torch.zeros(total + 1, dtype=torch.long, device=in_rank.device)
    send_rank = send_rank.scatter_(0, flat, torch.arange(R, device=in_rank.device).repeat(T))[:total]
    return send_token, send_rank, target


@dataclass
class ExchangeHandle:
    """Where every row went. send_token [S]: source token of each sent row, rank-major (T = pad row);
    combine_index [T, R]: the inverse, row of (token, rank) among the S sent rows (S: not sent).
    Host plan: send_splits / recv_splits (lists). Static plan: chunk rows per peer; when compacted,
    recv_pos [R*chunk] (compact row of each chunk row; `rows` = dropped pad) and recv_rows [rows]
    (chunk row of each compact row; R*chunk = pad). rows: receive rows handed out (None: as
    received). layout (DeepEP's), num_recv_tokens_per_expert_tensor [L], num_recv_tokens ([1] device int:
    real received rows, shaped as MoRI's dispatch_recv_num_token) and most_received (the largest count any rank received, the same
    on every rank, for symmetric capacity errors) are properties: views of the count row and of the
    plan's summary, made when first read (most calls read none, and each view costs a few us of host
    time on a GPU host)."""

    num_tokens: int
    counts: tuple  # (count row [1 + R + E + ...] int32 as count_row makes it, is_token_in_rank [T, R], E)
    send_token: torch.Tensor
    send_rank: torch.Tensor  # [S]: destination rank of each sent row
    combine_index: torch.Tensor  # [T, R]: row of (token, rank) among the sent rows; S = not sent
    received: torch.Tensor  # [L + 2] int32: pairs per local expert, rows received, most any rank receives
    send_splits: Optional[list[int]] = None
    recv_splits: Optional[list[int]] = None
    num_recv_tokens_per_expert: Optional[list[int]] = None  # host plan only
    chunk: Optional[int] = None
    rows: Optional[int] = None
    recv_pos: Optional[torch.Tensor] = None
    recv_rows: Optional[torch.Tensor] = None
    sent: Optional[list] = None  # kernel path, exact plans: the count table's sent[s][d], read on the host
    most_rows: Optional[int] = None  # kernel path, exact plans: most rows any rank receives, either way
    # Host plans: rows this rank puts on each link class (dispatch and combine); static plans: None.
    links: Optional[LinkRows] = None
    # Node-aware host plans (dispatchers/hierarchical.py): send_token, send_rank and combine_index are
    # then stage 1's (to the relays), send_splits / recv_splits still the tokens to / from each rank.
    relay: Optional[RelayPlan] = None
    # (topk_ids, topk_weights) the plan was made for, and the placement it was made over, kept by a
    # dispatcher whose handle may be reused without them (deepep_normal, as DeepEP's cached dispatch); with
    # their version counters then (None for inference tensors, which have none): a reuse checks them unchanged.
    # x_dtype: the dispatched x's, which the count table checked alike on every rank (a reuse reads no table)
    topk: Optional[tuple] = None
    topk_versions: Optional[tuple] = None
    placement: Optional[ExpertPlacement] = None
    x_dtype: Optional[torch.dtype] = None
    # Plans whose table was read on the host when made (not a deferred or captured static plan, nor the
    # NVLink token put): whether x and topk_weights need gradients on any rank (send then makes this
    # rank's need them too); None elsewhere.
    grads: Optional[tuple[bool, bool]] = None

    @property
    def static(self) -> bool:
        return self.chunk is not None

    @property
    def differentiable(self) -> bool:
        """Some rank's x or topk_weights needed a gradient when the plan was made (grads) and grad mode is on
        here: this rank's send must be differentiable too."""
        return self.grads is not None and any(self.grads) and torch.is_grad_enabled()

    @functools.cached_property
    def layout(self) -> Layout:
        row, in_rank, E = self.counts
        R = in_rank.shape[1]
        return Layout(row[1:1 + R], row[1 + R:1 + R + E], in_rank)

    @functools.cached_property
    def num_recv_tokens_per_expert_tensor(self) -> torch.Tensor:
        return self.received[:-2]

    @functools.cached_property
    def num_recv_tokens(self) -> torch.Tensor:
        return self.received[-2:-1]

    @functools.cached_property
    def most_received(self) -> torch.Tensor:
        return self.received[-1]

    def for_autograd(self) -> "ExchangeHandle":
        """This handle, or, when it was made under torch.inference_mode, one with normal copies of its
        tensors: a dispatch that needs gradients saves the plan's index tensors for backward, which
        inference tensors cannot be. (Every tensor of a plan is made in one mode: one check suffices.)"""
        if not self.send_token.is_inference():
            return self
        with torch.inference_mode(False):
            changes = {f.name: _normal_copy(getattr(self, f.name)) for f in fields(self)}
            if self.relay is not None:
                changes["relay"] = replace(self.relay, **{f.name: _normal_copy(getattr(self.relay, f.name))
                                                          for f in fields(self.relay)})
        return replace(self, **changes)


def _normal_copy(value):
    """value with each inference tensor in it (a tensor, or a tuple of them) cloned into a normal one."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple):
        return tuple(_normal_copy(v) for v in value)
    return value


# The gradient bits of a count row (RowLayout.grads_at): x needs a gradient, topk_weights does, grad mode is on.
_X_GRAD, _WEIGHTS_GRAD, _GRAD_MODE = 1, 2, 4


def _wants(x: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor]) -> tuple[int, int]:
    """A count row's RowLayout.wants entries for this rank: (gradient bits: _X_GRAD where x needs a gradient,
    _WEIGHTS_GRAD where topk_weights does, _GRAD_MODE where grad mode is on; x's dtype code)."""
    bits = _X_GRAD * needs_grad(x) + _WEIGHTS_GRAD * needs_grad(topk_weights) + _GRAD_MODE * torch.is_grad_enabled()
    return bits, _DTYPE_CODE.get(getattr(x, "dtype", None), 0)


def _sent_on_host(host_table: list, R: int) -> tuple[list, int]:
    """(sent[s][d]: tokens rank s sends to rank d, the most tokens any rank receives) from the count table."""
    sent = [row[1:1 + R] for row in host_table]
    return sent, max(map(sum, zip(*sent)))


@dataclass(frozen=True)
class Capacity:
    """The settings that size a static plan's buffers, as its overflow errors name them. setting: their values
    ("num_worst_tokens=5"); chunk: the argument (and knob) that sets the rows of each peer chunk; rows: the one
    that sets the compacted receive rows (None: the same as chunk); rows_per_unit: receive rows per unit of
    `rows` (mori without a preallocated buffer: R rows per max_dispatch_tokens_per_rank)."""

    setting: str
    chunk: str = ""
    rows: Optional[str] = None
    rows_per_unit: int = 1

    def __str__(self) -> str:
        return self.setting

    def raise_hint(self, chunk: bool = True) -> str:
        """'; raise <chunk setting> or <rows setting>' for a message that cannot say by how much (a device-side
        assert), or '' where the settings are not named. chunk=False: the peer chunks cannot overflow, so only
        the receive rows' setting is named (a CUDA assert keeps 255 characters: the cut dropped it after the
        chunk's, and named only a setting that could not help)."""
        names = " or ".join(dict.fromkeys(n for n in ((self.chunk if chunk else ""), self.rows or self.chunk) if n))
        return f"; raise {names}" if names else ""

    def fix(self, per_peer: int, received: int, chunk: Optional[int], rows: Optional[int]) -> str:
        """What to raise, and to at least what, so that a step needing `per_peer` tokens in a peer chunk and
        `received` receive rows on a rank fits buffers of `chunk` and `rows`."""
        need: dict[str, int] = {}
        if chunk is not None and per_peer > chunk:
            need[self.chunk] = per_peer
        if rows is not None and received > rows:
            name = self.rows or self.chunk
            need[name] = max(need.get(name, 0), -(-received // self.rows_per_unit))
        return " and ".join(f"raise {name} to at least {value}" for name, value in need.items() if name)


class _StaticCall(NamedTuple):
    """What the deferred check of a static plan's count table needs besides the table."""

    issued_at: float  # time.monotonic() when the table's all_gather was queued: the wait's deadline counts from it
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    distinct: Optional[str]
    chunk: int
    rows: Optional[int]
    capacity: Capacity
    layout: RowLayout  # of the table's rows


class RankExchange:
    """placement: which rank holds which expert (this rank's view: E, R, rank); group: the ranks.
    max_tokens: (most tokens a rank may send, the rule as the error states it, the argument and knob that
    set it): the host plan checks every rank's T against it in the count table, so one rank over it fails
    every rank at once."""

    def __init__(self, placement: ExpertPlacement, group, max_tokens: Optional[tuple[int, str, str]] = None,
                 name: str = "exchange", transport: str = "auto", num_sms: int = 0, hierarchical: str = "auto",
                 ranks_per_node: int = 0):
        """name: the dispatcher's, for the errors a peer that does not answer causes. hierarchical
        (auto/on/off), ranks_per_node (0: from the launcher): the node-aware exchange, see
        dispatchers/hierarchical.py."""
        self.placement, self.group, self.name = placement, group, name
        self.num_experts, self.rank, self.world_size = placement.num_experts, placement.rank, placement.ep_size
        self.num_local_experts = placement.num_local_experts
        self.max_tokens = max_tokens
        self._tables: dict = {}
        self._aranges: dict = {}
        self._send_ranks: dict = {}  # (chunk, device) -> send_rank of a by-token static plan, made once
        self._deferred = DeferredChecks(
            self._check_deferred, "the count table of a static-plan call on this exchange",
            f"{rank_name(group, self.rank)}'s topk_ids/topk_weights were invalid (ids outside -1..{self.num_experts - 1} or "
            f"non-finite weights) and have been overwritten since, so the value cannot be named", self._wait_deferred)
        self.sync_checks = envs.get("SYNC_CHECKS")
        self.transport, self.num_sms = transport, num_sms  # the kernel path's (see peer_transport)
        self._landing = None  # (pinned copy of a table the host reads now, its event): deferred.land
        self.hierarchical, self.ranks_per_node = hierarchical, ranks_per_node
        self.nodes: Optional[NodeLayout] = None  # resolved on the first host plan

    def _two_stages(self, chunk: Optional[int], device: torch.device) -> Optional[NodeLayout]:
        """The node layout when this plan goes node-aware (host plans only), else None. The first host
        plan resolves every rank's node (one small all_gather unless ranks_per_node is set)."""
        if chunk is not None:
            return None
        nodes = self.node_layout(device)
        return nodes if hierarchical.use_two_stages(self.hierarchical, nodes) else None

    def node_layout(self, device: torch.device) -> NodeLayout:
        """Every rank's node, resolved once (one small all_gather unless ranks_per_node is set; every rank
        calls it together the first time) and kept: the host plans' and rebalance's one source."""
        if self.nodes is None:
            self.nodes = hierarchical.resolve_nodes(self.group, self.world_size, self.ranks_per_node, device)
        return self.nodes

    def _read_table(self, table: torch.Tensor, issued_at: float, landed: bool = False,
                    waited_for: str = "the count table's all_gather") -> list:
        """The all-gathered count table on the host: every host read of it goes through here. On CUDA:
        the table is copied to pinned memory right after the all_gather (_land_table) and the host polls
        an event recorded after that copy until it completes (deadline EP_RUNTIME_TIMEOUT_S after
        issued_at, the time the all_gather was queued; past it the group is aborted and a PeerFailure
        names the dispatcher, the operation, the peer(s) and the knob), then reads the pinned copy: no
        device sync, and no wait for the kernels queued after the copy (the plan and the pack).
        landed: the caller called _land_table right after the all_gather. waited_for: what the wait's
        error names."""
        if table.is_cuda and not capturing():  # (while capturing nothing can be read: tolist raises as ever)
            if not landed:
                self._land_table(table)
            landed, event = self._landing
            wait_on_device(event, issued_at=issued_at, group=self.group, name=self.name,
                           operation="dispatch", rank=self.rank, world_size=self.world_size, waited_for=waited_for)
            return landed.tolist()
        return table.tolist()

    def _land_table(self, table: torch.Tensor) -> None:
        """Queue the table's copy to pinned host memory and an event after it (no sync). One landing
        buffer serves every read: each is read on the host before its call returns."""
        self._landing = land(table, self._landing)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rank_of [E], local_of [E], global_of [L]) int32 on `device`, made once: the placement as
        the kernels read it (owning rank and local index of each expert; this rank's experts' ids)."""
        if device not in self._tables:
            p = self.placement
            with torch.inference_mode(False):  # (kept for every later call, training ones too)
                self._tables[device] = (p.expert_rank_table(device), p.expert_local_index_table(device),
                                        p.local_expert_ids(device).to(torch.int32))
            columns = [1 + self.world_size + g for g in p.local_expert_ids().tolist()]
            first = columns[0] if columns else 0
            if columns == list(range(first, first + len(columns))):  # contiguous: one C-level slice per row
                self._local_columns = operator.itemgetter(slice(first, first + len(columns)))
            else:
                self._local_columns = lambda row: [row[c] for c in columns]
        return self._tables[device]

    def _per_local_expert(self, host_table: list) -> list:
        """Pairs this rank receives per local expert, summed over the host table's rows (every rank's
        counts): one C-level map per row over its local columns (a slice for contiguous placements).
        E = 256 columns made a Python loop 100 us, a transpose of the whole table 40 us (2 ranks)."""
        per_expert = self._local_columns(host_table[0])  # a new list
        for row in host_table[1:]:
            per_expert = list(map(operator.add, per_expert, self._local_columns(row)))
        return per_expert

    def _arange(self, n: int, device: torch.device) -> torch.Tensor:
        if (n, device) not in self._aranges:
            with torch.inference_mode(False):  # (kept: a later training call may index rows with it)
                self._aranges[(n, device)] = torch.arange(n, device=device)
        return self._aranges[(n, device)]

    # Host work around a collective and a host read: under torch.compile it runs as it is (one graph break).
    # Traced, it filled the exchange's tables and node layout inside the first trace, dynamo guarded on them
    # empty, and a compiled layer's second call compiled again; each of its graph breaks cost frames too.
    @untraced
    def plan(self, topk_ids: torch.Tensor, chunk: Optional[int] = None, rows: Optional[int] = None,
             capacity: Capacity = Capacity(""), topk_weights: Optional[torch.Tensor] = None,
             distinct: Optional[str] = None, x: Optional[torch.Tensor] = None) -> ExchangeHandle:
        """chunk None: host plan; else static. rows: pad/compact the receive side to this many rows;
        `capacity` names the setting that sized chunk/rows, for the overflow error. topk_weights:
        check ids and weights (and, given `distinct`, the reason, repeated experts in a token) inside
        the count table, so they fail every rank (skipped while capturing a CUDA graph). x, topk_weights:
        whether they need gradients rides in the table too (handle.grads; see send)."""
        nodes = self._two_stages(chunk, topk_ids.device)
        if topk_weights is not None and exchange_kernels.on_gpu(topk_ids) and nodes is None:
            return self._device_plan(topk_ids, topk_weights, chunk, rows, capacity, distinct, _wants(x, topk_weights))[0]
        R, E, me = self.world_size, self.num_experts, self.rank
        T = topk_ids.shape[0]
        row_layout = self.row_layout(nodes, distinct, topk_weights is not None)
        layout, row = count_row(topk_ids, E, R, self.tables(topk_ids.device)[0])
        counts = (row, layout.is_token_in_rank, E)  # (the row before the node and flag entries join it)
        if nodes is not None:  # tokens per destination node: stage 1's splits, in the same table
            row = torch.cat([row, hierarchical.tokens_per_node(layout.is_token_in_rank, nodes)])
        # whether x and topk_weights need gradients here, for handle.grads, and x's dtype
        row = torch.cat([row, host_values(list(_wants(x, topk_weights)), torch.int32, row.device)])
        read = chunk is None or not capturing()
        if topk_weights is not None:  # the flag slots are always sent (zeros while capturing), so a
            # rank replaying a graph and a rank running eagerly still exchange rows of one length
            flags = (topk_value_flags(topk_ids, topk_weights, E, distinct is not None) if read else
                     torch.zeros(row_layout.num_flags, dtype=torch.int32, device=row.device))
            row = torch.cat([row, flags])
        assert row.shape[0] == row_layout.length, (row.shape, row_layout)  # what join_with_bad_input's row matches
        issued_at = time.monotonic()
        table = all_gather_rows(row, self.group, R)  # [R_src, row_layout.length]
        sent = table[:, 1:1 + R]  # sent[s, d]: tokens rank s sends to rank d
        # the kernel plan's summary: pairs per local expert (this rank's experts' columns), rows received, most received
        summary = torch.cat([table[:, 1 + R + self.tables(table.device)[2].long()].sum(0), sent[:, me].sum().view(1),
                             sent.sum(0).max().view(1)]).to(torch.int32)
        host = self._read_table(table, issued_at) if read else None  # the one wait
        grads = self._check_host_table(host, row_layout, topk_ids, topk_weights, distinct) if host is not None else None
        if chunk is None:
            handle = self._host_plan(counts, host, sent, summary, rows, capacity, row_layout, nodes)
        else:
            handle = self._static_plan(counts, host, sent, summary, T, chunk, rows, capacity)
        handle.grads = grads
        return handle

    def _device_plan(self, topk_ids, topk_weights, chunk, rows, capacity, distinct, wants, x=None, local_ids=False,
                     quant=None):
        """The kernel plan (CUDA): layout, flags and counts in one kernel, one all_gather, the plan in
        one kernel from the table on the device. A host plan reads the table once (its one wait); a
        static plan defers the read on CUDA (see the module doc). wants: _wants(x, topk_weights), carried
        in the row. Given x, a host plan also packs the payload before that read (sized for the most
        rows T * min(R, K) could need), so the device plans and packs while the host waits; returns
        (handle, payload or None)."""
        R, E, L, me = self.world_size, self.num_experts, self.num_local_experts, self.rank
        T, K = topk_ids.shape
        static, now = chunk is not None, capturing()
        defer = static and not now and topk_ids.is_cuda and not self.sync_checks
        if static and (now or defer):  # the table is not read now: this rank checks its own T first
            self._check_local_tokens(T)
        if defer:  # before this call's collectives, so every rank raises at the same point
            self._deferred.make_room()
        rank_of, local_of, global_of = self.tables(topk_ids.device)
        row_layout = self.row_layout(None, distinct)
        in_rank, row = exchange_kernels.layout_row(topk_ids, topk_weights, rank_of, R, row_layout.num_flags,
                                                   wants=wants)
        assert row.shape[0] == row_layout.length, (row.shape, row_layout)  # what join_with_bad_input's row matches
        issued_at = time.monotonic()
        table = all_gather_rows(row, self.group, R)  # [R_src, row_layout.length]
        if not static and not now and table.is_cuda:  # the event the read below polls: right after the all_gather, not
            self._land_table(table)  # before the plan and pack queued next
        plan = payload = None
        if not static and x is not None:  # plan and pack first: the read below then overlaps them
            plan = exchange_kernels.table_plan(in_rank, table, me, global_of, T * min(R, K))
            payload = exchange_kernels.pack_payload(x, topk_ids, topk_weights, plan.send_token, plan.send_rank,
                                                    rank_of, local_of if local_ids else None, skip_pad=True,
                                                    quant=quant)
        send_splits = recv_splits = per_expert_host = most_rows = links = grads = None
        if static:
            total = R * chunk
            if defer:
                self._deferred.defer(table, _StaticCall(issued_at, topk_ids, topk_weights, distinct, chunk, rows,
                                                        capacity, row_layout))
            elif not now:
                host = self._read_table(table, issued_at)
                grads = self._check_host_table(host, row_layout, topk_ids, topk_weights, distinct)
                self._check_static(host, chunk, rows, capacity)
        else:
            host = self._read_table(table, issued_at, landed=True)  # the one wait
            grads = self._check_host_table(host, row_layout, topk_ids, topk_weights, distinct)
            sent, most = _sent_on_host(host, R)
            self._check_receive_rows(most, rows, capacity)
            most_rows = max(most, max(map(sum, sent)))
            send_splits, recv_splits = sent[me], [row[me] for row in sent]
            per_expert_host = self._per_local_expert(host)
            total = sum(send_splits)
            links = hierarchical.flat_link_rows(send_splits, recv_splits, me, self.nodes)
        if plan is None:
            plan = exchange_kernels.table_plan(in_rank, table, me, global_of, total, chunk, rows,
                                               self._static_send_rank(chunk, table.device) if static else None)
        summary = plan.summary
        if now:  # capturing: nothing can be read, so an overflow is a device-side error
            self._assert_fits(table[:, 1:1 + R], summary[L + 1], chunk, rows, capacity)
        # Rows past `total` of an early plan are unused; its combine_index marks unsent pairs with a
        # larger value than total, which every reader treats as "not sent". (A plan of `total` rows, as
        # static plans are, is kept as it is: a view costs host time.)
        send_token, send_rank = plan.send_token, plan.send_rank
        if send_token.shape[0] != total:
            send_token, send_rank = send_token[:total], send_rank[:total]
        handle = ExchangeHandle(T, (row, in_rank, E), send_token, send_rank, plan.combine_index, summary,
                                send_splits, recv_splits, per_expert_host, chunk=chunk, rows=rows, recv_pos=plan.recv_pos,
                                recv_rows=plan.recv_rows, sent=None if static else sent, most_rows=most_rows,
                                links=links, grads=grads)
        if payload is not None and payload.shape[0] != total:
            payload = payload[:total]
        return handle, payload

    def plan_and_send(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, local_ids: bool,
                      chunk: Optional[int] = None, rows: Optional[int] = None, capacity: Capacity = Capacity(""),
                      distinct: Optional[str] = None, transient: bool = False, quant: Optional[QuantConfig] = None,
                      by_token: bool = False) -> tuple[ExchangeHandle, torch.Tensor, torch.Tensor, torch.Tensor]:
        """plan() then send() (their arguments); on the kernel path in one go, packing before the
        count table is read. transient: the caller consumes the received rows before its next
        exchange (they may stay in the NVLink transport's region). by_token (static plans, T <=
        chunk by max_tokens, no compaction): the received rows may come as token t of source s at
        row s*chunk + t (pad rows between, ids -1) instead of packed at the front of each chunk; the
        NVLink transport then puts the rows without a count-table collective (_put_tokens). Returns
        (handle, recv_x, recv_ids, recv_weights)."""
        if (exchange_kernels.on_gpu(topk_ids) and exchange_kernels.inference_path(x, topk_weights)
                and self._two_stages(chunk, topk_ids.device) is None):
            if by_token and transient and rows is None:
                put = self._put_tokens(x, topk_ids, topk_weights, chunk, capacity, distinct, quant)
                if put is not None:
                    return put
            handle, payload = self._device_plan(topk_ids, topk_weights, chunk, rows, capacity, distinct,
                                                _wants(x, topk_weights), x, local_ids, quant)
            if quant is None and handle.differentiable:  # another rank's x or weights need a gradient: send()
                return (handle, *self.send(x, topk_ids, topk_weights, handle, local_ids))
            if payload is None:
                return (handle, *self._send_payload(x, topk_ids, topk_weights, handle, local_ids, transient, quant))
            return (handle, *self._receive_payload(payload, handle, *exchange_kernels.row_format(x, quant),
                                                   topk_ids.shape[1], transient))
        handle = self.plan(topk_ids, chunk, rows, capacity, topk_weights, distinct, x)
        return (handle, *self.send(x, topk_ids, topk_weights, handle, local_ids, quant))

    def _put_tokens(self, x, topk_ids, topk_weights, chunk: int, capacity: Capacity, distinct: Optional[str],
                    quant: Optional[QuantConfig]):
        """plan_and_send's by_token layout over the NVLink transport (None where it is not chosen or
        the region cannot grow now): the token put (PeerTransport.put_tokens: the layout, the rows and
        the count rows straight into the peers' memory, then the signal), the summary from the table
        that arrived with the rows. The table is checked as a static plan's (deferred on CUDA; at once on
        CPU ranks or with EP_RUNTIME_SYNC_CHECKS), every rank raising the same error at the same call."""
        R, E, me = self.world_size, self.num_experts, self.rank
        peer = peer_transport(self.group, x.device, R, self.transport, puts=True)
        if peer is None or self.max_tokens is None or self.max_tokens[0] > chunk:
            return None
        T = topk_ids.shape[0]
        row_layout = self.row_layout(None, distinct, wants=False)  # the token put's rows
        if not peer.fits(put_bytes(x, topk_ids.shape[1], quant, chunk, R, row_layout.length)):
            return None
        now = capturing()
        defer = not now and topk_ids.is_cuda and not self.sync_checks
        if now or defer:  # the table is not read now: this rank checks its own T (T <= chunk: nothing else can
            self._check_local_tokens(T)  # overflow a chunk); read at once, T > chunk fails every rank below
        peer.check(self.name, "dispatch")  # a wait that gave up: PeerFailure, before any table is checked
        if defer:
            self._deferred.make_room()
        rank_of, local_of, global_of = self.tables(x.device)
        in_rank = torch.empty(T, R, dtype=torch.bool, device=x.device)  # every entry written by the put
        row = torch.empty(row_layout.length, dtype=torch.int32, device=x.device)
        combine_index = torch.empty(T, R, dtype=torch.long, device=x.device)
        send_token = torch.empty(R * chunk, dtype=torch.long, device=x.device)
        issued_at = time.monotonic()
        received, table = peer.put_tokens(x, topk_ids, topk_weights, rank_of, local_of, chunk, quant,
                                          row_layout, in_rank, row, combine_index, send_token)
        summary = exchange_kernels.summarize(table, me, global_of)
        call = _StaticCall(issued_at, topk_ids, topk_weights, distinct, chunk, None, capacity, row_layout)
        if defer:
            self._deferred.defer(table, call)
        elif not now:
            host = self._read_table(table, issued_at, waited_for="the count table of the NVLink token put")
            peer.check(self.name, "dispatch")  # a peer that never wrote its row: PeerFailure, not a stale-row error
            self._check_deferred(host, call)
        send_rank = self._static_send_rank(chunk, x.device)
        if send_rank is None:  # capturing: this call's own
            send_rank = torch.arange(R * chunk, device=x.device) // chunk
        handle = ExchangeHandle(T, (row, in_rank, E), send_token, send_rank, combine_index,
                                summary, chunk=chunk)
        return (handle, *exchange_kernels.payload_fields(received, *exchange_kernels.row_format(x, quant),
                                                         topk_ids.shape[1]))

    def _static_send_rank(self, chunk: int, device: torch.device) -> Optional[torch.Tensor]:
        """send_rank of a static plan [R*chunk] (chunk rows of rank r: r), the same every call: made once per
        (chunk, device) and shared by the handles, which only read it. None while a CUDA graph is captured
        before an eager call made it (made there it would hold its values only in replays): the caller
        makes that call's own."""
        key = (chunk, device)
        send_rank = self._send_ranks.get(key)
        if send_rank is None and not capturing():
            with torch.inference_mode(False):  # (a normal tensor: it serves training calls too)
                send_rank = self._send_ranks[key] = torch.arange(self.world_size * chunk, device=device) // chunk
        return send_rank

    def __del__(self) -> None:
        """Pending static-plan tables of the last calls: checked where landed, a bad one warned of
        (DeferredChecks.drop)."""
        deferred = self.__dict__.get("_deferred")
        if deferred:
            deferred.drop(f"a {self.name} dispatcher's exchange")

    def raise_deferred(self) -> None:
        """Check every pending static-plan table now (waits for their copies). Call it on every rank
        together, e.g. after the last step; the first bad table raises its call's error."""
        self._deferred.flush()

    def _wait_deferred(self, ready: "torch.cuda.Event", call: _StaticCall) -> None:
        # Work this old has normally finished: no wait. A peer that never joined that call's
        # all_gather: abort the group and raise, EP_RUNTIME_TIMEOUT_S after the all_gather was issued.
        wait_on_device(ready, issued_at=call.issued_at, group=self.group, name=self.name, operation="dispatch",
                       rank=self.rank, world_size=self.world_size,
                       waited_for=f"the count table (all-gathered, or put by the NVLink transport) of the static-plan "
                                  f"call {CHECK_LAG} calls back (its deferred check)")
        # a wait on the NVLink transport that gave up leaves that table stale: PeerFailure, not a value error
        check_transport(self.group, self.name, "dispatch")

    def _check_deferred(self, host: list, call: _StaticCall) -> None:
        self._check_host_table(host, call.layout, call.topk_ids, call.topk_weights, call.distinct)
        self._check_static(host, call.chunk, call.rows, call.capacity)

    def _check_host_table(self, host: list, layout: RowLayout, topk_ids, topk_weights,
                          distinct) -> Optional[tuple[bool, bool]]:
        """Every rank raises on the count table read on the host (rows of `layout`): bad ids or weights on any
        rank (rows with flags), too many tokens, ranks dispatching x in different dtypes or grad modes (rows
        with them). Returns the plan's grads from the gradient bits (rows with them; else None)."""
        if layout.num_flags:
            self._check_flags(host, layout.flags_at, topk_ids, topk_weights, distinct)
        self._check_tokens([row[0] for row in host])
        if not layout.wants:
            return None
        self._check_dtypes([row[layout.dtype_at] for row in host])
        return self._check_grad_modes([row[layout.grads_at] for row in host])

    @staticmethod
    def _check_receive_rows(most: int, rows: Optional[int], capacity: Capacity) -> None:
        if rows is not None and most > rows:
            raise ValueError(f"{capacity} is too small for this step: a rank receives {most} tokens and {rows} fit "
                             f"(allowed: at least {most}); {capacity.fix(0, most, None, rows)}")

    @staticmethod
    def _static_message(chunk: int, rows: Optional[int], capacity: Capacity, chunk_fits: bool = False) -> str:
        """chunk_fits: only the receive rows can overflow (the chunks go unnamed: a device assert keeps 255
        characters)."""
        if chunk_fits and rows is not None:
            return f"{capacity} is too small for this step: a rank receives at most {rows}"
        return (f"{capacity} is too small for this step: every peer chunk holds {chunk} tokens"
                + (f" and a rank receives at most {rows}" if rows is not None else ""))

    def _assert_fits(self, sent: torch.Tensor, most_received: torch.Tensor, chunk: int, rows: Optional[int],
                     capacity: Capacity) -> None:
        """While capturing: a device-side assert that every peer chunk and the receive rows hold the step.
        None where it cannot fail (five small kernels fewer in the graph): without compaction (rows None)
        a peer chunk holds at most its sender's T, which every rank checks against max_tokens <= chunk
        before any capture (check_tokens_while_capturing)."""
        chunk_fits = self.max_tokens is not None and self.max_tokens[0] <= chunk
        if rows is None and chunk_fits:
            return
        overflow = None if chunk_fits else sent.max() > chunk
        if rows is not None:
            overflow = most_received > rows if overflow is None else overflow | (most_received > rows)
        assert_on_device(~overflow, self._static_message(chunk, rows, capacity, chunk_fits)
                         + capacity.raise_hint(not chunk_fits))

    def _check_static(self, host: list, chunk: int, rows: Optional[int], capacity: Capacity) -> None:
        """Every rank raises when a peer chunk or the compacted receive rows cannot hold the step."""
        sent, received = _sent_on_host(host, self.world_size)
        per_peer = max(max(row) for row in sent)
        if per_peer > chunk or (rows is not None and received > rows):
            raise ValueError(f"{self._static_message(chunk, rows, capacity)}; this step needs {per_peer} per peer "
                             f"and {received} received: {capacity.fix(per_peer, received, chunk, rows)}")

    def _check_local_tokens(self, num_tokens: int) -> None:
        if self.max_tokens is not None and num_tokens > self.max_tokens[0]:
            raise ValueError(f"x has {num_tokens} tokens; {self.max_tokens[1]}; {self._tokens_fix(num_tokens)}")

    def _tokens_fix(self, num_tokens: int) -> str:
        most, _, setting = self.max_tokens
        return f"raise {setting} to at least {num_tokens}, or dispatch at most {most} tokens per call"

    def _host_plan(self, counts, host_table, sent, summary, rows, capacity, row_layout: RowLayout,
                   nodes: Optional[NodeLayout] = None) -> ExchangeHandle:
        """host_table: the count table read on the host (rows of row_layout). nodes: go node-aware
        (send_token etc. are then stage 1's)."""
        R, me = self.world_size, self.rank
        T = host_table[me][0]
        host, most = _sent_on_host(host_table, R)
        per_expert_host = self._per_local_expert(host_table)
        self._check_receive_rows(most, rows, capacity)
        send_splits = host[me]
        recv_splits = [host[s][me] for s in range(R)]
        in_rank, per_rank, relay = counts[1], sent[me].long(), None
        if nodes is not None:
            at = row_layout.nodes_at
            per_node = [row[at:at + nodes.num_nodes] for row in host_table]
            relay = RelayPlan.from_counts(host, per_node, nodes, me, in_rank.device)
            in_rank = RelayPlan.stage_one(in_rank, nodes, me)
            per_rank = host_values(relay.send1, torch.long, in_rank.device)
        send_token, send_rank, combine_index = row_plan(in_rank, per_rank.cumsum(0) - per_rank, per_rank,
                                                        sum(relay.send1) if relay else sum(send_splits))
        links = (relay.link_rows(me) if relay is not None
                 else hierarchical.flat_link_rows(send_splits, recv_splits, me, self.nodes))
        return ExchangeHandle(T, counts, send_token, send_rank, combine_index, summary, send_splits,
                              recv_splits, per_expert_host, rows=rows, links=links, relay=relay)

    def join_with_bad_input(self, chunk: Optional[int], distinct: Optional[str], error: Exception,
                            device: torch.device) -> None:
        """This rank's dispatch input failed its checks with `error`, before any collective: take part in
        the count table's all_gather that the other ranks' dispatch (a plan with this chunk and distinct, as
        plan's) starts with, so that they raise at once too (_check_flags) instead of waiting for this rank
        until the timeout. The row is the length theirs is (row_layout's, as plan's), made on `device` from
        the settings alone (the bad input is not touched): every count 0, the first flag set, and T = -1 -
        the index of error's type in BAD_INPUT_TYPES. The caller decides where the peers read the table at
        once (not for static plans on CUDA)."""
        nodes = self._two_stages(chunk, device)  # (the first host plan's node all_gather comes first on every rank)
        layout = self.row_layout(nodes, distinct)
        row = torch.zeros(layout.length, dtype=torch.int32)
        row[0] = -1 - next((i for i, t in enumerate(BAD_INPUT_TYPES) if isinstance(error, t)), 0)
        row[layout.flags_at] = 1  # the first flag (bad ids): the peers' flag pass (_check_flags) finds this row
        all_gather_rows(row.to(device), self.group, self.world_size)

    def row_layout(self, nodes: Optional[NodeLayout], distinct: Optional[str], checked: bool = True,
                   wants: bool = True) -> RowLayout:
        """The count row of a plan with these settings, as plan takes them (node-aware over `nodes`;
        `distinct`; checked: topk_weights given, so the row carries value flags; wants: the gradient and
        dtype entries, which only the NVLink token put's rows lack): the one source for plan, _device_plan,
        _put_tokens and join_with_bad_input, whose rows the ranks all-gather together."""
        return exchange_kernels.row_layout(self.world_size, self.num_experts,
                                           (2 + (distinct is not None)) if checked else 0,
                                           nodes.num_nodes if nodes is not None else 0, wants)

    def check_tokens_while_capturing(self, num_tokens: int) -> None:
        """While a CUDA graph is being captured the table is not read, so this rank checks its own T
        (before any collective); otherwise the table check fails every rank together."""
        if capturing():
            self._check_local_tokens(num_tokens)

    def _check_tokens(self, tokens: list) -> None:
        if self.max_tokens is None:
            return
        most, rule, _ = self.max_tokens
        over = [r for r, t in enumerate(tokens) if t > most]
        if over:
            raise ValueError(f"x has {tokens[over[0]]} tokens on {rank_name(self.group, over[0])}; {rule}; "
                             f"{self._tokens_fix(max(tokens))} (every rank stops here)")

    def _check_dtypes(self, codes: list) -> None:
        """Every rank raises, naming each rank's x dtype, when the ranks dispatch x in different dtypes."""
        if any(code != codes[0] for code in codes):
            dtypes = ", ".join(f"{_CODE_DTYPE.get(code)} on {rank_name(self.group, r)}" for r, code in enumerate(codes))
            raise TypeError(f"x has dtype {_CODE_DTYPE.get(codes[self.rank])} on {rank_name(self.group, self.rank)}, but "
                            f"the ranks differ ({dtypes}); allowed: one dtype on every rank (rows cross ranks as raw bytes); every "
                            f"rank stops here")

    def _check_grad_modes(self, bits: list) -> tuple[bool, bool]:
        """(whether x, whether topk_weights need a gradient on some rank: the plan's grads) from each rank's
        gradient bits. Every rank raises, naming each rank's grad mode, when some rank needs a gradient (its x
        or topk_weights, or, through the layer, its experts) while another runs with grad mode off
        (torch.no_grad, torch.inference_mode): the backward's reverse exchanges would wait for a rank that
        recorded none (a hang until the timeout, or collectives paired with that rank's next forward)."""
        union = functools.reduce(operator.or_, bits)
        grads = bool(union & _X_GRAD), bool(union & _WEIGHTS_GRAD)
        if not any(grads) or all(b & _GRAD_MODE for b in bits):
            return grads
        modes = ", ".join(f"{rank_name(self.group, r)}: grad mode {'on' if b & _GRAD_MODE else 'off'}"
                          f"{', needs a gradient' if b & (_X_GRAD | _WEIGHTS_GRAD) else ''}"
                          for r, b in enumerate(bits))
        raise RuntimeError(f"{self.name} dispatch: the ranks' grad modes differ ({modes}); allowed: grad mode on "
                           f"every rank where any rank needs a gradient (its backward's exchanges need every rank: "
                           f"call the layer under torch.no_grad() / torch.inference_mode() on every rank or on none); "
                           f"every rank stops here")

    def _check_flags(self, host: list, flags_at: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     distinct: Optional[str]) -> None:
        """Every rank raises when any rank's ids or weights are bad; the bad rank names the value. host: the
        count table read on the host, its rows' flags from flags_at on. Rows of ranks whose input failed
        their own checks (join_with_bad_input) set a flag too, so the same pass finds them: every rank then
        raises naming them instead (with the type their error has)."""
        flags = [row[flags_at:] for row in host]
        check_topk_values(topk_ids, topk_weights, self.num_experts, flags[self.rank], distinct)
        bad = [r for r, f in enumerate(flags) if any(f)]
        if bad:
            refused = [r for r in bad if host[r][0] < 0]
            if refused:
                kind = -1 - host[refused[0]][0]
                one = len(refused) == 1
                ranks = (f"{ranks_name(self.group, refused, self.world_size)} {'was' if one else 'were'} given bad input "
                         f"({'its own error names the argument' if one else 'their own errors name the arguments'})")
                raise BAD_INPUT_TYPES[kind](f"{self.name} dispatch: {ranks}; no token was sent")
            raise ValueError(f"{rank_name(self.group, bad[0])} got invalid topk_ids or topk_weights (ids outside -1..{self.num_experts - 1}"
                             f"{', a repeated expert' if distinct else ''} or non-finite weights; its own error names "
                             f"the value); every rank stops here")

    def _static_plan(self, counts, host_table, sent, summary, T, chunk, rows, capacity) -> ExchangeHandle:
        """host_table: the count table read on the host, or None while capturing a CUDA graph."""
        R, me, device = self.world_size, self.rank, sent.device
        if host_table is None:  # capturing: nothing can be read, so a device-side error
            self._assert_fits(sent, summary[-1], chunk, rows, capacity)
        else:
            self._check_static(host_table, chunk, rows, capacity)
        base = torch.arange(R, device=device) * chunk
        send_token, send_rank, target = row_plan(counts[1], base, torch.full_like(base, chunk), R * chunk)
        handle = ExchangeHandle(T, counts, send_token, send_rank, target, summary, chunk=chunk, rows=rows)
        if rows is not None:  # chunk row (s, j) lands at compact row offset[s] + j
            from_each = sent[:, me]
            j = torch.arange(chunk, device=device)
            compact = (from_each.cumsum(0) - from_each).unsqueeze(1) + j
            valid = (j < from_each.unsqueeze(1)) & (compact < rows)
            handle.recv_pos = torch.where(valid, compact, rows).reshape(-1)
            recv_rows = torch.full((rows + 1,), R * chunk, dtype=torch.long, device=device)
            handle.recv_rows = recv_rows.scatter_(0, handle.recv_pos, torch.arange(R * chunk, device=device))[:rows]
        return handle

    def send(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, handle: ExchangeHandle,
             local_ids: bool, quant: Optional[QuantConfig] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recv_x, recv_ids int32, recv_weights fp32). local_ids: ids as the receiver's local
        experts (-1 where the expert lives elsewhere); else global ids. Pad rows: zeros, id -1.
        On the kernel path recv_x, ids and weights may be row-strided views of one receive buffer.
        quant: an fp8 dispatch; recv_x is then its uint8 wire rows (fp8_payload), quantized by the
        packing kernel on the kernel path, else by fp8_payload.encode first."""
        if quant is None and handle.differentiable:
            # The backward of each exchange is the reverse exchange, run by every rank whose sent rows need a
            # gradient. Where some rank's x (or weights) need one, every rank's must, or this rank (T = 0 with an
            # empty x made here, say) skips reverse exchanges the others run (and on the kernel path takes the
            # inference kernels' one exchange where the others run two): a collective mismatch.
            x, weights = (t if t.requires_grad or not wanted else grad_leaf(t)
                          for t, wanted in zip((x, weights), handle.grads))
        if exchange_kernels.inference_path(x, weights) and handle.relay is None:
            return self._send_payload(x, ids, weights, handle, local_ids, quant=quant)
        if quant is not None:
            x = fp8_payload.encode(x, quant)
        R, K = self.world_size, ids.shape[1]
        pad = x.new_zeros(1, x.shape[1])
        if handle.relay is not None:  # node-aware: two stages, rows back in this order
            recv_x, recv_meta = handle.relay.send(x, ids, weights, handle.send_token, handle.send_rank,
                                                  handle.combine_index, local_ids, self._pack,
                                                  self.tables(x.device)[0], self.group, self.rank)
        else:
            rows, meta = self._pack(x, ids, weights, handle.send_token, handle.send_rank, handle.combine_index,
                                    local_ids)
            recv_x = all_to_all(rows, handle.recv_splits, handle.send_splits, self.group, R)
            recv_meta = all_to_all(meta, handle.recv_splits, handle.send_splits, self.group, R)
        meta_pad = torch.cat([weights.new_zeros(1, K), weights.new_full((1, K), -1.0)], 1)
        if handle.recv_rows is not None:
            recv_x = torch.cat([recv_x, pad])[handle.recv_rows]
            recv_meta = torch.cat([recv_meta, meta_pad])[handle.recv_rows]
        elif handle.rows is not None and not handle.static:
            missing = handle.rows - recv_x.shape[0]
            recv_x = torch.cat([recv_x, pad.expand(missing, -1)])
            recv_meta = torch.cat([recv_meta, meta_pad.expand(missing, -1)])
        return recv_x, recv_meta[:, K:].round().to(torch.int32), recv_meta[:, :K]

    def _pack(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, token: torch.Tensor,
              send_rank: torch.Tensor, combine_index: torch.Tensor, local_ids: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable (training, CPU): rows [S, H] = x[token] (token T: a zero pad row, static plans)
        and meta [S, 2K] fp32 = [weights; ids], the ids local to send_rank (-1 elsewhere, its weight
        then 0, as DeepEP's recv_topk_weights) when local_ids. ids ride with the weights in one fp32
        payload (ids < 2^24 are exact in fp32). combine_index [T, C]: token's inverse; the backward sums
        each token's rows through it (a gather, on either path)."""
        E, K = self.num_experts, ids.shape[1]
        rank_of, local_of, _ = self.tables(x.device)
        if exchange_kernels.enabled(x):
            return exchange_kernels.pack_rows(x, ids, weights, token, send_rank, rank_of,
                                              local_of if local_ids else None, combine_index)
        S = token.numel()
        rows = exchange_kernels.sent_rows(x, combine_index, S)
        ids_rows = torch.cat([ids, ids.new_full((1, K), -1)])[token].long()
        weight_rows = exchange_kernels.sent_rows(weights, combine_index, S)
        if local_ids:
            valid = (ids_rows >= 0) & (ids_rows < E)
            expert = torch.where(valid, ids_rows, 0)
            here = valid & (rank_of[expert] == send_rank.unsqueeze(1))
            ids_rows = torch.where(here, local_of[expert].long(), torch.full_like(ids_rows, -1))
            weight_rows = torch.where(here, weight_rows, weight_rows.new_zeros(()))  # as DeepEP: 0 where the id is -1
        meta = torch.cat([weight_rows, ids_rows.float()], dim=1)
        return rows, meta

    def _send_payload(self, x, ids, weights, handle: ExchangeHandle, local_ids: bool, transient: bool = False,
                      quant: Optional[QuantConfig] = None):
        """The kernel path: one packing kernel (quantizing with quant), one exchange of rows with their
        metadata, and for padded or compacted receive sides one kernel laying the rows out."""
        rank_of, local_of, _ = self.tables(x.device)
        # A static plan's payload is read by the exchange on R > 1 ranks, and on one rank (where the exchange hands
        # it back as it is) by this call's compaction: never handed out, so its buffer is kept across calls. (Not
        # deepep_ll's transient rows on one rank: views of a kept buffer, a normal tensor, cost more host time
        # under inference_mode than the new buffer they would save.)
        reuse = handle.static and (self.world_size > 1 or handle.recv_rows is not None)
        payload = exchange_kernels.pack_payload(x, ids, weights, handle.send_token, handle.send_rank, rank_of,
                                                local_of if local_ids else None, quant=quant, reuse=reuse)
        return self._receive_payload(payload, handle, *exchange_kernels.row_format(x, quant), ids.shape[1],
                                     transient)

    def _move(self, rows: torch.Tensor, handle: ExchangeHandle, to_owner: bool, keep: bool) -> torch.Tensor:
        """The kernel path's exchange of one plan's rows: dispatch (to the experts' ranks) or, with
        to_owner, combine (back to the senders). Through the NVLink transport where it is chosen
        (peer_transport) and the rows fit, else the collective. keep: the result outlives this rank's
        next exchange (the NVLink transport's rows are then copied out of its region)."""
        R = self.world_size
        peer = peer_transport(self.group, rows.device, R, self.transport)
        if peer is not None and (handle.static or handle.sent is not None):
            row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
            if peer.fits((R * handle.chunk if handle.static else handle.most_rows) * row_bytes):
                if handle.static:
                    moved = peer.all_to_all(rows, R * handle.chunk, chunk=handle.chunk, num_sms=self.num_sms)
                else:
                    out_rows = sum(handle.send_splits if to_owner else handle.recv_splits)
                    moved = peer.all_to_all(rows, out_rows, sent=handle.sent, to_owner=to_owner,
                                            num_sms=self.num_sms)
                return moved.clone() if keep else moved
        if to_owner:
            return all_to_all(rows, handle.send_splits, handle.recv_splits, self.group, R)
        return all_to_all(rows, handle.recv_splits, handle.send_splits, self.group, R)

    def _receive_payload(self, payload, handle: ExchangeHandle, hidden: int, dtype: torch.dtype, top_k: int,
                         transient: bool = False):
        """transient: the caller reads the rows before its next exchange and keeps none of them."""
        taken = handle.recv_rows is not None or (handle.rows is not None and not handle.static)
        received = self._move(payload, handle, to_owner=False, keep=not (taken or transient))
        if taken:  # rows past the received ones: padding (the kernel reads the payload's bytes: no views)
            index = handle.recv_rows if handle.recv_rows is not None else self._arange(handle.rows, payload.device)
            return exchange_kernels.take_payload_rows(received, index, hidden, dtype, top_k)
        return exchange_kernels.payload_fields(received, hidden, dtype, top_k)

    def put_sums(self, src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, handle: ExchangeHandle
                 ) -> Optional[torch.Tensor]:
        """reduce() of the partials [N, H] = sum_k weight[n, k] * src[index[n, k]] (exchange_kernels.ll_gather's,
        one per received row of a static plan without compaction), the partials made and sent home in
        one kernel over the NVLink transport (PeerTransport.put_sums): bit-identical to ll_gather then
        reduce. None where that transport is not chosen or its region cannot grow now (the caller
        gathers and reduces)."""
        R = self.world_size
        if not handle.static or handle.recv_pos is not None:
            return None
        peer = peer_transport(self.group, src.device, R, self.transport, puts=True)
        if peer is None or not peer.fits(R * handle.chunk * src.shape[1] * src.element_size()):
            return None
        peer.check(self.name, "combine")
        return exchange_kernels.gather_rows(peer.put_sums(src, index, weight, handle.chunk), handle.combine_index)

    def reduce(self, partial: torch.Tensor, handle: ExchangeHandle) -> torch.Tensor:
        """partial: one row per received row (at least the real ones, in receive order) -> [T, H]:
        each token's partials summed in fp32 (fp64 stays fp64), returned in partial's dtype."""
        if exchange_kernels.inference_path(partial) and handle.relay is None:
            if handle.recv_pos is not None:  # back into the chunk layout; rows past partial are padding
                if partial.shape[0] != handle.rows:
                    partial = partial[:handle.rows]
                index = handle.recv_pos  # [R*chunk]: one row each (no [R*chunk, 1] view: host time)
                partial = exchange_kernels.gather_rows(partial, index, out=exchange_kernels.kept(
                    "chunk rows", (index.shape[0], partial.shape[1]), partial.dtype, partial.device))
            elif not handle.static:
                received = sum(handle.recv_splits)
                if partial.shape[0] != received:  # (a view costs host time: none when the rows are exact)
                    partial = partial[:received]
            return exchange_kernels.gather_rows(self._move(partial, handle, to_owner=True, keep=False),
                                                handle.combine_index)
        zero = partial.new_zeros(1, partial.shape[1])
        if handle.recv_pos is not None:
            if partial.shape[0] < handle.rows:  # a truncated runner input: the rest is padding
                partial = torch.cat([partial, zero.expand(handle.rows - partial.shape[0], -1)])
            partial = torch.cat([partial[:handle.rows], zero])[handle.recv_pos]
        elif not handle.static:
            partial = partial[:sum(handle.recv_splits)]
        if handle.relay is not None:  # node-aware: summed within each node first, one row per node back
            back = handle.relay.reduce(partial, exchange_kernels.sum_rows, self.group)
        else:
            back = all_to_all(partial, handle.send_splits, handle.recv_splits, self.group, self.world_size)
        # Gather each token's (at most R) rows and sum them: no atomics, deterministic.
        if exchange_kernels.enabled(back):
            return exchange_kernels.gather_sum(back, handle.combine_index, handle.send_token)
        return exchange_kernels.sum_rows(back, handle.combine_index)

