"""deepep_normal: throughput-mode exchange with DeepEP "normal" semantics.

A token goes once to each rank owning at least one of its experts (rank_exchange does the moving).
The host plan reads one small count table per dispatch, its only host sync; given the handle of
an earlier dispatch with the same routing it reuses the plan and nothing syncs. With
`num_worst_tokens` W every shape is static (W-row chunks per peer, compacted into W received rows on
the device): no host sync, graph-capturable. Combine sends each received row (that rank's weighted
partial sum) home and adds the partials per token in fp32. Built from differentiable gathers,
index_adds and exchanges, so dispatch's backward is a combine and combine's backward a dispatch;
inference on CUDA takes rank_exchange's kernel path (recv_x, recv_topk_ids and recv_topk_weights are
then row-strided views of one receive buffer).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ep_runtime.routing import TopKOutput
from ep_runtime.runner_core import DispatchOutput, RunnerInput, needs_grad, register_format
from ep_runtime.validation import capturing, check_topk_ids

from . import fp8_payload, register
from .base import ExchangeDispatcher, check_buffer_memory, raise_bad_input, resolve_int
from .deferred import DeferredChecks
from .rank_exchange import Capacity, ExchangeHandle, Layout, dispatch_layout


@dataclass
class DeepEPNormalDispatchOutput(DispatchOutput):
    """recv_x [N, H]; recv_topk_ids [N, K] int32 local (-1: expert elsewhere or none); recv_topk_weights
    [N, K] fp32 (0 where the id is -1, as DeepEP); num_recv_tokens_per_expert: list rounded up to the alignment (empty in static mode,
    as DeepEP's num_worst_tokens gives; num_recv_tokens_per_expert_tensor [L] int32 always holds the true
    counts on the device). use_fp8: recv_x is float8_e4m3fn and recv_x_scale [N, ceil(H/128)] holds
    its scales (fp32, or uint8 UE8M0 exponents), as DeepEP's (x, scales) pair; x_dtype is the tokens'
    dtype before quantization (the runner's output and combine's dtype)."""

    format = "deepep_normal"
    recv_x: torch.Tensor
    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: list[int]
    num_recv_tokens_per_expert_tensor: torch.Tensor
    handle: ExchangeHandle
    recv_x_scale: Optional[torch.Tensor] = None
    x_dtype: Optional[torch.dtype] = None

    def data_dependent_rows(self) -> tuple[Optional[torch.Tensor], ...]:
        """N, received rows: the routing's, except in static mode (num_worst_tokens)."""
        if self.handle.static:
            return ()
        return self.recv_x, self.recv_topk_ids, self.recv_topk_weights, self.recv_x_scale


@dataclass(frozen=True)
class DeepEPNormalOptions:
    """alignment of the listed per-expert counts; num_worst_tokens: receive rows of the static mode
    (None: host plan); chunk: rows per peer in the static mode (num_max_dispatch_tokens_per_rank, else
    num_worst_tokens)."""

    alignment: int
    num_worst_tokens: Optional[int]
    chunk: Optional[int]
    use_fp8: bool = False
    fp8_scale_encoding: str = "fp32"


@register
class DeepEPNormalDispatcher(ExchangeDispatcher):
    """alignment: round num_recv_tokens_per_expert up to a multiple (EP_RUNTIME_NORMAL_ALIGNMENT).
    num_worst_tokens: an upper bound on the tokens any rank receives; static shapes, no host sync.
    num_max_dispatch_tokens_per_rank (static mode): the most tokens a rank sends to one peer, i.e.
    the fixed chunk per peer (default num_worst_tokens); set it to cut the padding bytes by ~R.
    use_fp8 (EP_RUNTIME_DISPATCH_FP8): tokens travel as fp8 with per-128-channel scales
    (fp8_scale_encoding fp32 or ue8m0, EP_RUNTIME_DISPATCH_FP8_SCALE_ENCODING); inference only.
    hierarchical (EP_RUNTIME_HIERARCHICAL auto/on/off) and ranks_per_node (EP_RUNTIME_RANKS_PER_NODE):
    the node-aware exchange of the host plan (dispatchers/hierarchical.py); static mode stays flat."""

    name = "deepep_normal"
    format = "deepep_normal"
    supports_recv_hook = True
    # with a reused handle the values are not checked again: they were when the handle was made

    def __init__(self, config, group=None, alignment: Optional[int] = None,
                 num_worst_tokens: Optional[int] = None, num_max_dispatch_tokens_per_rank: Optional[int] = None,
                 expert_to_rank=None, transport: Optional[str] = None, num_sms: Optional[int] = None,
                 use_fp8: Optional[bool] = None, fp8_scale_encoding: Optional[str] = None,
                 hierarchical: Optional[str] = None, ranks_per_node: Optional[int] = None):
        super().__init__(config, group, expert_to_rank, transport, num_sms, hierarchical, ranks_per_node)
        W = resolve_int("num_worst_tokens", num_worst_tokens, optional=True)
        M = resolve_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, optional=True)
        if M is not None and W is None:
            raise ValueError(f"num_max_dispatch_tokens_per_rank={M!r}; allowed: None, or an int >= 1 with "
                             f"num_worst_tokens set (it sizes the static mode's chunks)")
        if W is not None:  # static mode: W receive rows, a chunk of M (default W) rows per peer
            check_buffer_memory(_static_setting(W, M or W), W + (M or W) * self.world_size, config.hidden_size,
                                (M or W) * self.world_size)
        self.options = DeepEPNormalOptions(resolve_int("alignment", alignment, "NORMAL_ALIGNMENT"), W, M or W,
                                           *fp8_payload.resolve(use_fp8, fp8_scale_encoding))
        # the static mode's capacity as its errors name it (made once)
        self._capacity = Capacity(_static_setting(W, M or W), "num_worst_tokens" if M is None else
                                  "num_max_dispatch_tokens_per_rank", "num_worst_tokens")

    def get_dispatch_layout(self, topk_ids: torch.Tensor) -> Layout:
        """DeepEP's layout: num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool (topk_ids [T, K] global, -1 = none). topk_ids are checked as dispatch
        checks them (an id outside [-1, E) was left out of every count with no error, float ids were counted),
        with one host read for their values (none while capturing a CUDA graph)."""
        check_topk_ids(topk_ids, self.config.num_experts, self.config.top_k)
        return dispatch_layout(topk_ids, self.config.num_experts, self.world_size,
                               self.exchange.tables(topk_ids.device)[0])

    def dispatch(self, x, topk=None, handle: Optional[ExchangeHandle] = None, *, async_op: bool = False,
                 return_recv_hook: bool = False, previous_event=None):
        """handle: from an earlier dispatch with the same routing (same topk_ids on every rank), by this
        dispatcher or one with the same experts on the same ranks and the same num_worst_tokens and chunk (another
        is an error), for x of the same T and dtype: its plan is reused, nothing syncs, and the ids are not checked
        again (they were when it was made).
        With a handle, topk may be None (DeepEP's cached dispatch: same layout, new x): the handle's
        routing is sent again (its weights detached: pass topk for a weight gradient). The handle keeps the
        caller's topk tensors, not copies: changed in place since, they no longer match its plan (pairs would
        go to ranks that do not hold their experts), which such a reuse refuses (inference tensors keep no
        version counter to check: do not change them while their handle is in use). topk_ids given as another
        tensor must hold the handle's ids (a handle fixes the routing, as DeepEP's): see _check_same_routing.
        async_op, return_recv_hook, previous_event: see Dispatcher.dispatch (the host plan's count read
        then waits for the communication stream only, never for the caller's later work)."""
        if topk is None and (not isinstance(handle, ExchangeHandle) or handle.topk is None):
            error = TypeError(f"topk=None with handle={type(handle).__name__}; allowed: topk=ep.TopKOutput(ids, "
                              f"weights), or topk=None with the handle of an earlier deepep_normal dispatch")
            raise_bad_input(self, error, {"handle": handle})
        if handle is not None:  # here, not in the exchange: an async call raises at the call, not at wait()
            self._check_handle(handle)
            if isinstance(x, torch.Tensor) and x.dim() == 2:  # (before topk's shape check names the handle's ids)
                _check_handle_input(handle, x)
            _check_unchanged(handle, topk)
            self._check_same_routing(handle, topk)
        if topk is None:
            topk = (handle.topk[0], handle.topk[1].detach())
        return super().dispatch(x, topk, handle=handle, async_op=async_op, return_recv_hook=return_recv_hook,
                                previous_event=previous_event)

    def _check_same_routing(self, handle: ExchangeHandle, topk) -> None:
        """topk_ids given with a handle, as another tensor than the one it was made with: the same ids (a handle
        fixes the layout, as DeepEP's: each token's ranks, each id's local expert), or an error naming topk_ids.
        CPU: compared at once. CUDA: one fused compare on the device whose flag lands in pinned memory and is
        checked CHECK_LAG reusing calls later or at raise_deferred() (no host sync; EP_RUNTIME_SYNC_CHECKS=1:
        at once); not while capturing a CUDA graph or under torch.compile."""
        ids = topk[0] if isinstance(topk, (tuple, list)) and len(topk) == 2 else None
        made = handle.topk[0] if handle.topk is not None else None
        if not isinstance(ids, torch.Tensor) or made is None or ids is made:
            return  # (a malformed topk is named by the dispatch's own checks; the handle's own ids: _check_unchanged)
        version = (handle.topk_versions or (None,))[0]
        if version is not None and made._version != version:
            raise ValueError(f"topk_ids is another tensor than the handle was made with, and that one changed in "
                             f"place since (version {version} -> {made._version}), so the routing the handle fixes "
                             f"is unknown: dispatch without the handle for new routing")
        if ids.shape != made.shape or ids.device != made.device:
            raise ValueError(f"topk_ids has shape {list(ids.shape)} on {ids.device}; the handle was made for "
                             f"{list(made.shape)} on {made.device} (a handle fixes the routing: dispatch without it "
                             f"for new routing)")
        if not ids.is_cuda or self.exchange.sync_checks:
            _check_ids_equal(ids, made)
        elif not capturing() and not torch.compiler.is_compiling():
            self._routing_checks.make_room()
            self._routing_checks.defer((ids != made).any().reshape(1).int(), (ids, made))

    @functools.cached_property
    def _routing_checks(self) -> DeferredChecks:
        return DeferredChecks(_check_routing_flag, "a dispatch's topk_ids against its reused handle",
                              "topk_ids differed from the routing its handle was made for, and the two have been "
                              "overwritten since, so the place cannot be named")

    def __del__(self) -> None:
        """Pending compares of topk_ids given with a reused handle: checked where landed, a bad one warned of
        (DeferredChecks.drop; the exchange's own checks go with the exchange)."""
        routing = self.__dict__.get("_routing_checks")
        if routing:
            routing.drop(f"a {self.name} dispatcher")

    def raise_deferred(self) -> None:
        """The exchange's deferred checks, then those of topk_ids given with a reused handle (see Dispatcher)."""
        if "_routing_checks" in self.__dict__:
            self._routing_checks.flush()
        super().raise_deferred()

    def _table_plan(self, handle=None):
        return None if handle is not None else (self.options.chunk, None)  # a reused handle: no count table

    def _dispatch(self, x, topk: TopKOutput, handle: Optional[ExchangeHandle] = None):
        ids, weights = topk
        x_dtype, quant = x.dtype, self.fp8  # (checked for a gradient in _checked_topk)
        options = self.options
        if handle is None:
            chunk, distinct = self._table_plan()
            handle, recv_x, recv_ids, recv_weights = self.exchange.plan_and_send(
                x, ids, weights, local_ids=True, chunk=chunk, rows=options.num_worst_tokens,
                capacity=self._capacity, distinct=distinct, quant=quant)
            handle.topk = (ids, weights)  # a reuse given only the handle sends these again (detached then)
            handle.topk_versions = tuple(None if t.is_inference() else t._version for t in handle.topk)
            handle.placement = self.placement
            handle.x_dtype = x_dtype
        else:
            if needs_grad(x, weights):  # a handle made under torch.inference_mode, reused in training
                handle = handle.for_autograd()
            recv_x, recv_ids, recv_weights = self.exchange.send(x, ids, weights, handle, local_ids=True, quant=quant)
        align = options.alignment  # a local: this runs per expert on every call
        counts = handle.num_recv_tokens_per_expert or []
        # a new list each call (the caller may keep or change it); alignment 1 needs no rounding loop
        listed = list(counts) if align == 1 else [-(-c // align) * align for c in counts]
        recv_x, recv_x_scale = self._received(recv_x)
        return DeepEPNormalDispatchOutput(recv_x, recv_ids, recv_weights, listed,
                                          handle.num_recv_tokens_per_expert_tensor, handle, recv_x_scale, x_dtype)

    def _check_handle(self, handle) -> None:
        """A handle names the ranks each token goes to and, there, the local expert of each id: one made
        over another placement (another dispatcher's, or this layer's before apply_placement moved slots
        between ranks) would send pairs to ranks that no longer hold their experts, which drop them."""
        if not isinstance(handle, ExchangeHandle):
            raise TypeError(f"handle={type(handle).__name__}; allowed: None or the handle of an earlier "
                            f"deepep_normal dispatch")
        made, mine = handle.placement, self.placement
        if made is not None and (handle.rows, handle.chunk) != (self.options.num_worst_tokens, self.options.chunk):
            # (a host plan's handle in a num_worst_tokens dispatcher gave its variable rows, and the reverse)
            raise ValueError(f"handle was made with {_static_setting(handle.rows, handle.chunk)}; allowed: a handle "
                             f"made with this dispatcher's {self._capacity} (its receive shapes)")
        if made is mine:
            return
        if made is None or (made.num_experts, made.ep_size, made._owners()) != (mine.num_experts, mine.ep_size,
                                                                                mine._owners()):
            raise ValueError(f"handle was made {'by another dispatcher' if made is None else 'for ' + _owners(made)}; "
                             f"allowed: a handle made for this dispatcher's experts and ranks, {_owners(mine)} "
                             f"(reuse a handle only for the placement it was made over: after apply_placement "
                             f"moved experts between ranks, dispatch again without it)")


def _static_setting(num_worst_tokens: Optional[int], chunk: Optional[int]) -> str:
    """The options that shape a dispatch's receive side, as its errors name them."""
    return f"num_worst_tokens={num_worst_tokens}" + (
        f" / num_max_dispatch_tokens_per_rank={chunk}" if chunk != num_worst_tokens else "")


def _owners(placement) -> str:
    """A placement's experts and their ranks, as a handle check names them."""
    owners = "contiguous" if placement.is_contiguous else list(placement._owners())
    return f"num_experts={placement.num_experts}, ep_size={placement.ep_size}, expert_to_rank={owners}"


def _check_unchanged(handle: ExchangeHandle, topk) -> None:
    """A reuse without topk sends the handle's own (ids, weights) again, and one given the handle's own ids tensor
    (a routing buffer refilled in place each step) sends those ids: they must be what its plan was made for (ids
    changed since went by the old plan, and pairs now owned by another rank were dropped without a word)."""
    given = topk[0] if isinstance(topk, (tuple, list)) and len(topk) == 2 else None  # (a bad topk: named later)
    for name, t, version in zip(("topk_ids", "topk_weights"), handle.topk, handle.topk_versions or (None, None)):
        if topk is not None and not (name == "topk_ids" and t is given):
            continue
        if version is not None and t._version != version:
            raise ValueError(f"handle's {name} changed in place since the handle was made (version {version} -> "
                             f"{t._version}); its plan no longer matches them: dispatch without the handle for new "
                             f"routing, or pass topk= the routing it was made for")


def _check_ids_equal(ids: torch.Tensor, made: torch.Tensor) -> None:
    """ids equal to `made`, the ids a reused handle was made for, or a ValueError naming the first difference."""
    differ = (ids != made).nonzero()
    if differ.shape[0]:
        t, k = differ[0].tolist()
        raise ValueError(f"topk_ids[{t}, {k}] = {int(ids[t, k])}, but the handle was made for routing with "
                         f"{int(made[t, k])} there ({differ.shape[0]} ids differ); a handle fixes the routing (each "
                         f"token's ranks and each id's local expert, as DeepEP's): pass topk with the ids it was made "
                         f"for (or topk=None), or dispatch without handle= for new routing")


def _check_routing_flag(flag: list, call: tuple) -> None:
    """The deferred form of _check_ids_equal (CUDA): flag [1] set where the ids differed."""
    if flag[0]:
        _check_ids_equal(*call)
        raise LookupError("overwritten")  # flagged, yet equal now: the caller changed its tensors since


def _check_handle_input(handle: ExchangeHandle, x: torch.Tensor) -> None:
    """x as the handle's plan was made for: its T, and its dtype, which the plan's count table checked alike on
    every rank (a reuse reads no table: a rank reusing it with x of another dtype sent rows of another byte count,
    and gloo aborted the process)."""
    if handle.num_tokens != x.shape[0]:
        raise ValueError(f"handle was made for {handle.num_tokens} tokens; x has {x.shape[0]} "
                         f"(a handle is only valid for a dispatch with the same routing)")
    if handle.x_dtype is not None and x.dtype != handle.x_dtype:
        raise TypeError(f"handle was made for x of dtype {handle.x_dtype}; x has dtype {x.dtype} (allowed: "
                        f"{handle.x_dtype}; for another dtype dispatch without the handle, which checks that every "
                        f"rank changed it)")


def _runner_input(out: DeepEPNormalDispatchOutput, placement, config) -> RunnerInput:
    rows = RunnerInput.from_local_ids(out.recv_x, out.recv_topk_ids, out.recv_topk_weights, placement,
                                      out.recv_x_scale, out.x_dtype, defer=True)
    if out.handle.static:  # num_worst_tokens rows, the received ones first
        rows.padded_rows = True
    else:  # the count table (rounded up to the alignment): most of N*K slots are other ranks' experts
        rows.local_pairs = sum(out.num_recv_tokens_per_expert)
    return rows


register_format("deepep_normal", RunnerInput, _runner_input)  # the rows go to combine as they are
