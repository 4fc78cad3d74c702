"""What every dispatcher is: dispatch(x, topk) -> its format's DispatchOutput; combine(CombineInput) -> y."""
from __future__ import annotations

import functools
import inspect
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from ep_runtime import distributed, envs
from ep_runtime.config import MoeConfig
from ep_runtime.placement import ExpertPlacement
from ep_runtime.quant import QuantConfig
from ep_runtime.routing import TopKOutput
from ep_runtime.runner_core import CombineInput, DispatchOutput, untraced
from ep_runtime.validation import capturing, check_hidden_states, check_topk, is_int_at_least, weights_dtype

from . import exchange_kernels, fp8_payload, overlap
from .hierarchical import MODES, LinkBytes
from .overlap import ExchangeWork, PendingOutput, ReceiveHook
from .peer_transport import TRANSPORTS, check_cpu_ranks, check_num_sms, check_transport
from .rank_exchange import BAD_INPUT_TYPES, RankExchange


def resolve_int(name: str, value: Any, knob: Optional[str] = None, minimum: int = 1,
                optional: bool = False) -> Optional[int]:
    """A dispatcher's integer option: the argument, else its knob (EP_RUNTIME_<knob>), else None when
    optional; one error wording for every dispatcher, naming the argument, its value and the range (at most
    the knob's own maximum, else envs.MAX_TOKENS: counts travel as int32; an argument was let past its knob's
    maximum, num_sms=2**31-1 where EP_RUNTIME_NUM_SMS stops at 1024)."""
    if value is None and knob is not None:
        value = envs.get(knob)
    if value is None and optional:
        return None
    limit = envs.KNOBS[envs.PREFIX + knob].maximum if knob is not None else None
    most = envs.MAX_TOKENS if limit is None else int(limit)
    if not is_int_at_least(value, minimum) or value > most:
        none = "None or " if optional else ""
        also = f" (also settable as {envs.PREFIX}{knob})" if knob else ""
        raise ValueError(f"{name}={value!r}; allowed: {none}an int >= {minimum} and <= {most}{also}")
    return int(value)


def memory_bound() -> tuple[int, str]:
    """Bytes the static buffers may take at most, and where: the current GPU's total memory once this process
    has initialised CUDA (the buffers live there), else the host's (asking the GPU would initialise CUDA here,
    which a CPU job, or a process forked after, must not have done for it)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "GPU"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host"


def check_buffer_memory(setting: str, rows: int, hidden_size: int, plan_entries: int) -> None:
    """Refuse a size setting whose buffers cannot fit in memory, before anything is allocated (a huge
    EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK got the process OOM-killed allocating its per-call plan).
    Counted at the least they take (receive rows of one byte a channel, as fp8; the plan's int64 entries), so
    only values no run could use are refused: DeepSeek-V3 on deepep_ll (L=4, M=8192, R=64, H=7168) needs 15 GiB."""
    need = rows * hidden_size + 8 * plan_entries
    total, where = memory_bound()
    if need > total:
        raise ValueError(f"{setting}: its buffers would take at least {need / 2 ** 30:.1f} GiB ({rows} receive "
                         f"rows of hidden_size={hidden_size} at one byte a channel, a plan of {plan_entries} int64 "
                         f"entries); allowed: at most the {where}'s {total / 2 ** 30:.1f} GiB of memory")


def as_process_group(group: Any, name: str = "group", dim: str = "ep") -> Optional[dist.ProcessGroup]:
    """`group` (the argument `name`) as a ProcessGroup: a 1-D DeviceMesh (torchtitan's mesh["ep"]) gives its
    group; a ProcessGroup or None stays as it is; anything else is refused naming the argument (torch's own
    error, e.g. "Default process group has not been initialized", named nothing). dim: the mesh dimension the
    argument is meant to be."""
    if type(group).__name__ != "DeviceMesh":
        # (new_group's NON_GROUP_MEMBER, what a rank outside the new group gets, is named by group_rank_and_size)
        if group is not None and not isinstance(group, dist.ProcessGroup) and not (
                isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER):
            raise TypeError(f"{name}={group!r}; allowed: None (the default group), a torch.distributed "
                            f"ProcessGroup, or a 1-D DeviceMesh such as mesh['{dim}']")
        return group
    if group.ndim != 1:
        raise ValueError(f"{name}={group!r} is a {group.ndim}-D DeviceMesh; allowed: a ProcessGroup, or a 1-D "
                         f"DeviceMesh such as mesh['{dim}']")
    return group.get_group()


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in `group`; (0, 1) when no process group exists (a plain single process). A group
    this process is not in is an error naming its ranks."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group holds global ranks {dist.get_process_group_ranks(group)}; this process (global "
                         f"rank {dist.get_rank()}) is not one of them. Allowed: a group this rank belongs to (in a "
                         f"dp x ep DeviceMesh, each rank's own mesh['ep'].get_group())")
    return rank, dist.get_world_size(group)


def refuse_missing_group(name: str, group: Optional[dist.ProcessGroup]) -> None:
    """No process group in a process that a launcher started as one rank of several: a dispatcher that shards
    experts would hold every expert on every rank and exchange nothing, with no error (ep.init_distributed()
    forgotten, or called after the layer was built)."""
    if group is not None or (dist.is_available() and dist.is_initialized()):
        return
    variable, size = distributed.launched_job_size()
    if size > 1:
        raise RuntimeError(f"dispatcher={name!r} was built with no process group, but {variable}={size}: this "
                           f"process is one rank of a {size}-rank job; call ep.init_distributed() before building "
                           f"the layer (or pass group=)")


def refuse_placement_unless_sharded(name: str, shards_experts: bool, expert_to_rank) -> None:
    """An expert_to_rank given to a dispatcher that does not shard experts is an error (ignored, any table would
    pass unchecked)."""
    if expert_to_rank is not None and not shards_experts:
        raise ValueError(f"expert_to_rank={expert_to_rank!r}; allowed: None with dispatcher={name!r} (every rank holds "
                         f"every expert)")


class BuildFailure(NamedTuple):
    """What a rank that could not build its dispatcher or layer sends in the settings check's all_gather
    instead of its settings (join_settings_check): its error's type name and message."""

    error_type: str
    message: str


# The types a peer's BuildFailure is raised as on the other ranks (any other: RuntimeError).
_BUILD_ERROR_TYPES = {t.__name__: t for t in BAD_INPUT_TYPES}


def gather_objects(group: Optional[dist.ProcessGroup], world_size: int, mine: Any,
                   device: Optional[Any] = None) -> list:
    """Every rank's `mine` (settings, a BuildFailure, a load's error), in group-rank order: one all_gather of small
    objects (the settings check's; load_state_dict's before a placement change)."""
    every = [None] * world_size
    device = torch.device(device) if device is not None else None
    with (torch.cuda.device(device) if device is not None and device.type == "cuda" and torch.cuda.is_available()
          else nullcontext()):
        # (NCCL: on the current CUDA device; CPU ranks: after the group's pending async exchanges)
        overlap.in_call_order(group, lambda: dist.all_gather_object(every, mine, group=group))
    return every


def agree_before_collectives(group: Optional[dist.ProcessGroup], world_size: int, error: Optional[Exception],
                             stops: str, device: Optional[Any] = None, **same: Any) -> None:
    """For a slow call every rank of `group` makes together (EPMoE's gather_experts, rebalance, apply_placement,
    load_experts, load_state_dict): one gather_objects of every rank's argument checks before the call's first
    collective or change. error: this rank's check's error (None: its arguments passed); same: values every rank
    must have alike (dst, num_nodes, a plan). Raises on every rank at once, naming the rank(s) (`stops` ends the
    message: what every rank stops before): the failed checks' messages, in the first failed one's type (the
    same error on every rank: that error, as one process raises it), else a ValueError naming the value that
    differs and each rank's. Without it the rank that raised left the others waiting in the call's first
    collective until the group's timeout, and ranks with different values paired different collectives.
    Not for dispatch / combine: their checks ride in the count table (no extra collective per call)."""
    every = gather_objects(group, world_size, (None if error is None else BuildFailure(type(error).__name__,
                                                                                       str(error)), same), device)
    failed = [(rank, failure) for rank, (failure, _) in enumerate(every) if failure is not None]
    if failed and error is not None and len(failed) == world_size and all(f == failed[0][1] for _, f in failed):
        raise error  # the same error on every rank (the same bad argument everywhere): as one process raises it
    if failed:
        ranks = {}  # message -> the ranks that raised it (a failure and its ranks, in rank order)
        for rank, f in failed:
            ranks.setdefault(f, []).append(distributed.rank_name(group, rank))
        raise _BUILD_ERROR_TYPES.get(failed[0][1].error_type, RuntimeError)(
            "; ".join(f"{', '.join(names)}: {f.message}" for f, names in ranks.items()) + f" ({stops})") from error
    for name in same:
        values = [theirs[name] for _, theirs in every]
        differ = [rank for rank, value in enumerate(values) if value != values[0]]
        if differ:
            each = ", ".join(f"{distributed.rank_name(group, rank)} has {value!r}" for rank, value in enumerate(values))
            raise ValueError(f"{', '.join(distributed.rank_name(group, rank) for rank in differ)} "
                             f"{'was' if len(differ) == 1 else 'were'} given a different {name} than "
                             f"{distributed.rank_name(group, 0)}" + (f" ({each})" if len(each) <= 300 else "") +
                             f"; allowed: the same {name} on every rank ({stops})")


def join_settings_check(name: Any, group: Any, error: Exception, device: Optional[Any] = None) -> None:
    """This rank could not build dispatcher `name` (or the layer holding it): `error`, raised before the
    settings check every rank's dispatchers.create ends with (Dispatcher.check_same_settings_on_every_rank).
    Take part in that check's all_gather anyway, carrying the error, so the other ranks raise at once naming
    this rank and the error instead of waiting in it until the timeout. The caller raises `error` after.
    Nothing where the others run no such check (one rank, a dispatcher that does not shard experts, a name
    no dispatcher has); a join that fails (a group this rank is not in, peers elsewhere) is dropped: `error`
    is this rank's to raise."""
    from ep_runtime import dispatchers
    try:
        if not dispatchers.get(name).shards_experts:
            return
        group = as_process_group(group)
        _, size = group_rank_and_size(group)
        if size > 1:
            gather_objects(group, size, BuildFailure(type(error).__name__, str(error)), _joinable_device(device))
    except Exception:  # noqa: BLE001 - see above: error is raised anyway
        pass


def _joinable_device(device: Optional[Any]) -> Optional[torch.device]:
    """`device` for join_settings_check's all_gather, or None (the current device) where it is no device this
    process has: the rank's error may be that very argument (device='bogus', a CUDA index past the GPUs), and
    the join must not fail on it (the others would then wait in the settings check until the timeout)."""
    try:
        device = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError, ValueError):
        return None
    if device is not None and device.type == "cuda" and not (
            torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())):
        return None
    return device


def _call_options(cls: type) -> Optional[frozenset]:
    """The per-call options (keyword arguments past x and topk) cls._dispatch takes; None: any (**options).
    Cached eagerly; read plainly while torch.compile traces (dynamo warns at every lru_cache it traces through,
    as placement._table notes)."""
    if torch.compiler.is_compiling():
        return _read_call_options(cls)
    return _cached_call_options(cls)


def _read_call_options(cls: type) -> Optional[frozenset]:
    params = list(inspect.signature(cls._dispatch).parameters.values())[3:]  # (self, x, topk first)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


_cached_call_options = functools.lru_cache(maxsize=None)(_read_call_options)


def _join_and_raise(dispatcher: "Dispatcher", error: Exception, options: Optional[dict] = None) -> None:
    """dispatcher.join_with_bad_input(error, **options), then raise error. Untraced under torch.compile, and
    called outside the `except` that caught error: a check that dynamo traced and saw fail (a shape or
    dtype) raised inside the traced frame, and dynamo then skipped that frame's code for good (every layer
    of the process: EPMoE.forward, the dispatch, ran eagerly from then on, their callees as frames of their
    own)."""
    dispatcher.join_with_bad_input(error, **(options or {}))
    raise error


raise_bad_input = untraced(_join_and_raise, "raise_bad_input")


class Dispatcher:
    """Ships (token, expert) pairs to the ranks owning the experts and brings the results home.

    Subclasses set `name` and `format` and implement _dispatch / _combine. `shards_experts` says
    whether experts are spread over the group (False: every rank holds every expert).
    """

    name: ClassVar[str] = ""
    format: ClassVar[str] = ""
    shards_experts: ClassVar[bool] = True
    # True when the exchange checks id range and weights itself, in a count table every rank reads:
    # one rank's bad input then fails every rank at once, with no extra sync.
    checks_values_in_exchange: ClassVar[bool] = False
    # True where dispatch/combine offer return_recv_hook=True (the low-latency and normal modes, as DeepEP).
    supports_recv_hook: ClassVar[bool] = False

    def __init__(self, config: MoeConfig, group: Optional[dist.ProcessGroup] = None,
                 expert_to_rank: Optional[Sequence[int]] = None):
        """expert_to_rank: the rank holding each global expert (None: contiguous, rank r holds
        [r*L, (r+1)*L)); None for dispatchers that do not shard experts (any other is an error)."""
        refuse_placement_unless_sharded(self.name, self.shards_experts, expert_to_rank)
        self.config = config
        self.group = group = as_process_group(group)
        if self.shards_experts:
            refuse_missing_group(self.name, group)
        rank, size = group_rank_and_size(group)
        self.rank, self.world_size = rank, size
        self.placement = (ExpertPlacement(config.num_experts, size, rank, expert_to_rank) if self.shards_experts
                          else ExpertPlacement(config.num_experts))

    def __getattr__(self, name: str) -> Any:
        """A resolved option reads as an attribute too (d.num_buffer_rows is d.options.num_buffer_rows)."""
        options = self.__dict__.get("options")
        if options is not None and name in getattr(options, "__dataclass_fields__", {}):
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        options = self.__dict__.get("options")
        if options is not None and name in getattr(options, "__dataclass_fields__", {}):
            raise AttributeError(f"{name} is a resolved option of this {self.name} dispatcher (frozen: every rank "
                                 f"checked it when the dispatcher was built); build a new one with {name}={value!r}")
        super().__setattr__(name, value)

    def settings(self) -> dict:
        """What every rank must agree on: the config, the placement and the dispatcher's resolved
        options (its frozen `options` dataclass: buffer sizes, alignment, ...; knobs included,
        whichever way they were set)."""
        options = asdict(self.options) if getattr(self, "options", None) is not None else {}
        if getattr(self, "transport_options", None) is not None:
            options.update(asdict(self.transport_options))
        return {"dispatcher": self.name, **asdict(self.config), **options,
                "expert_to_rank": self.placement.expert_to_rank}

    def check_same_settings_on_every_rank(self, device: Optional[Any] = None) -> None:
        """One small all_gather when the dispatcher is built: ranks that disagree (a different
        hidden_size, or a knob set on one rank only) would otherwise exchange mismatched byte counts,
        which aborts the process instead of raising. Raises on every rank, naming the setting. A rank that
        could not build its dispatcher or layer joins with its error instead (join_settings_check): every
        other rank raises naming it and its error."""
        if self.world_size == 1 or not self.shards_experts:
            return
        mine = self.settings()
        every = gather_objects(self.group, self.world_size, mine, device)
        failed = [(rank, theirs) for rank, theirs in enumerate(every) if isinstance(theirs, BuildFailure)]
        if failed:
            causes = "; ".join(f"{distributed.rank_name(self.group, rank)} could not build its layer or dispatcher "
                               f"({f.error_type}: {f.message})" for rank, f in failed)
            raise _BUILD_ERROR_TYPES.get(failed[0][1].error_type, RuntimeError)(
                f"{causes}; every rank stops here (every rank must build it with the same arguments and "
                f"EP_RUNTIME_* knobs, and with a runner that runs there)")
        for rank, theirs in enumerate(every):
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if differ:  # another dispatcher differs in its options too: name the dispatcher then
                # the first that is an argument of this dispatcher: a derived field (deepep_normal's chunk, from
                # num_worst_tokens) named alone does not say which argument or knob to make the same
                arguments = inspect.signature(type(self).__init__).parameters
                k = "dispatcher" if "dispatcher" in differ else min(differ, key=lambda name: name not in arguments)
                me, them = (distributed.rank_name(self.group, r) for r in (self.rank, rank))
                raise ValueError(f"ranks disagree on {self.name} setting {k}: {me} has {mine.get(k)!r}, {them} has "
                                 f"{theirs.get(k)!r}; every rank must build the layer with the same arguments and "
                                 f"EP_RUNTIME_* knobs")

    def dispatch(self, x: torch.Tensor, topk: Optional[TopKOutput] = None, *, async_op: bool = False,
                 return_recv_hook: bool = False, previous_event: Any = None, **options: Any):
        """x [T, H]; topk: TopKOutput(topk_ids [T, K] int global (-1 = nowhere), topk_weights [T, K]),
        or any (ids, weights) pair. Checked before any collective. options: per-call extras a
        dispatcher documents (deepep_normal: handle). topk is required; its default None is refused by
        those checks, so a call without it (DeepEP's cached dispatch, dispatch(x, handle=h)) fails the
        other ranks at once too, not in Python's argument binding before any check.

        async_op=True returns (output, work): the exchange runs on the device's communication
        stream (CPU ranks: its group's exchange thread) and work.wait() must be called before the
        output is read (see dispatchers/overlap.py). return_recv_hook=True (dispatchers with
        `supports_recv_hook`) returns (output, hook) instead: calling hook() completes the receive.
        previous_event: a torch.cuda.Event or an ExchangeWork the exchange is ordered after. x, topk
        must not be changed before the wait. Input that fails a check on one rank only fails the others'
        dispatch at once too, where it starts with a count table (see join_with_bad_input)."""
        distributed.check_group(self.group, self.name, "dispatch", self.world_size)
        bad_input = None
        try:
            self._check_options(options)
            self._check_async(async_op, return_recv_hook, previous_event)
            topk = self._checked_topk(x, topk)
        except Exception as error:
            bad_input = error
        if bad_input is not None:  # (raised outside the handler: see raise_bad_input)
            known = _call_options(type(self))
            raise_bad_input(self, bad_input, {k: v for k, v in options.items() if known is None or k in known})
        if self._plain(async_op, return_recv_hook, previous_event):
            return self._named_dispatch("dispatch", self._dispatch, x, topk, **options)
        with distributed.naming_peer_failures(self, "dispatch"):  # a peer that does not answer: ep.PeerFailure
            return self._issue("dispatch", lambda: self._dispatch(x, topk, **options), x.device, (x, *topk),
                               async_op, return_recv_hook, previous_event, PendingOutput, PendingOutput._become)

    def _check_options(self, options: dict) -> None:
        """A per-call option this dispatcher's dispatch does not take (handle= on mori) raises here, before any
        collective and through join_with_bad_input: raised by _dispatch, the other ranks waited in the count
        table for this one until the timeout."""
        known = _call_options(type(self)) if options else None
        unknown = sorted(options.keys() - known) if known is not None else []
        if unknown:
            given = ", ".join(f"{k}={type(options[k]).__name__}" for k in unknown)
            raise TypeError(f"{self.name} dispatch got {given}; allowed per-call options: "
                            f"{', '.join(sorted(known)) or 'none'} (besides async_op, return_recv_hook, previous_event)")

    def join_with_bad_input(self, error: Exception, **options: Any) -> None:
        """This rank's dispatch input failed its checks (`error`, raised before any collective; options:
        the dispatch's): where the other ranks' dispatch starts with a count table that they read at once,
        take part in it anyway, so that they raise at once too, naming this rank, instead of waiting for it
        until EP_RUNTIME_TIMEOUT_S (ExchangeDispatcher). The caller raises `error` after. Nothing here: no
        exchange."""

    def _checked_topk(self, x: torch.Tensor, topk: TopKOutput) -> TopKOutput:
        check_hidden_states(x, self.config.hidden_size)
        if isinstance(topk, torch.Tensor) or not isinstance(topk, (tuple, list)) or len(topk) != 2:
            raise TypeError(f"topk must be ep.TopKOutput(topk_ids, topk_weights) (or an (ids, weights) pair); got "
                            f"{type(topk).__name__}{' of shape ' + str(list(topk.shape)) if isinstance(topk, torch.Tensor) else ''}")
        ids, weights = topk
        check_topk(ids, weights, x.shape[0], self.config.num_experts, self.config.top_k, x.device,
                   values=not self.checks_values_in_exchange)
        self.check_capacity(x.shape[0])
        # int64 ids stay int64 until checked (a count-table check names the caller's value); the
        # narrower accepted types become int32 losslessly.
        # (dtype tests, not no-op conversions: each skipped call saves ~2 us of host time per dispatch)
        ids = ids if ids.dtype in (torch.int64, torch.int32) else ids.to(torch.int32)
        wdtype = weights_dtype(x.dtype)
        return TopKOutput(ids, weights if weights.dtype == wdtype else weights.to(wdtype))

    def combine(self, combine_input: CombineInput, *, async_op: bool = False, return_recv_hook: bool = False,
                previous_event: Any = None):
        """The runner's rows, reduced per original token: [T, H] in x's dtype. async_op=True returns
        (y, work), return_recv_hook=True (y, hook), as dispatch does; previous_event likewise."""
        self._check_async(async_op, return_recv_hook, previous_event)
        distributed.check_group(self.group, self.name, "combine", self.world_size)
        self.check_combine_input(combine_input)
        if self._plain(async_op, return_recv_hook, previous_event):
            return self._named_combine("combine", self._combine, combine_input)
        with distributed.naming_peer_failures(self, "combine"):  # a peer that does not answer: ep.PeerFailure
            T = None
            if ((async_op or return_recv_hook) and self._moves_rows()
                    and combine_input.hidden_states.device.type != "cuda"):
                T = self.combined_tokens(combine_input.dispatch_output)
            rows = combine_input.hidden_states
            shell = None if T is None else (lambda: rows.new_empty(T, rows.shape[-1]))
            return self._issue("combine", lambda: self._combine(combine_input), rows.device, combine_input,
                               async_op, return_recv_hook, previous_event, shell, lambda y, real: y.copy_(real))

    def _named_call(self, operation: str, fn, *args: Any, **kwargs: Any):
        """fn(*args, **kwargs), the exchange `operation` ("dispatch" or "combine"): a peer that does not answer
        raises ep.PeerFailure naming this dispatcher, the operation and the peer(s)."""
        try:  # (as naming_peer_failures; a plain try here: every dispatch and combine call runs it)
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            distributed.raise_peer_failure(self, operation, exc)

    # what dispatch's and combine's synchronous calls run (ExchangeDispatcher: each its own untraced wrapper)
    _named_dispatch = _named_combine = _named_call

    def _named(self, operation: str, fn):
        """fn, raising a peer that does not answer as ep.PeerFailure on the group's exchange thread: an async
        call on CPU ranks runs there, and its error reaches the caller at work.wait() (or the receive hook),
        outside dispatch's and combine's own naming (a CUDA call runs fn in dispatch/combine, inside it)."""
        return lambda: self._named_call(operation, fn)

    def check_combine_input(self, combine_input: CombineInput) -> None:
        """Raise naming combine_input.hidden_states when it cannot be this dispatch's runner output (checked
        before any exchange, from shapes only: no host sync). Here: a tensor whose rows have hidden_size
        columns; dispatchers with a fixed layout check their rows too."""
        if not isinstance(combine_input, CombineInput):  # (a tensor or None read as rows of None)
            raise TypeError(f"combine_input must be an ep.CombineInput (the runner's output for this dispatcher's "
                            f"dispatch: MoeRunner.run(dispatch_output, weights)); got {type(combine_input).__name__}")
        # (a dispatch not waited for yet raises, saying so; None or another object raised AttributeError 'format')
        made_by = getattr(combine_input.dispatch_output, "format", None)
        if not isinstance(made_by, str):
            raise TypeError(f"combine_input.dispatch_output must be this {self.name} dispatcher's dispatch output; got "
                            f"{type(combine_input.dispatch_output).__name__}")
        if made_by != self.format:  # another dispatcher's rows failed on an attribute of its handle, or combined
            raise ValueError(f"combine_input.dispatch_output is a {made_by!r} dispatch's output; allowed: this "
                             f"{self.name} dispatcher's own dispatch output (format {self.format!r})")
        rows = combine_input.hidden_states
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"combine_input.hidden_states must be a torch.Tensor; got {type(rows).__name__}")
        if rows.dim() < 2 or rows.shape[-1] != self.config.hidden_size:
            raise ValueError(f"combine_input.hidden_states has shape {list(rows.shape)}; expected rows of "
                             f"hidden_size={self.config.hidden_size} (the {self.name} runner output)")
        dispatched = getattr(combine_input.dispatch_output, "recv_x", None)  # (standard: the rows it handed on)
        device = (dispatched if dispatched is not None else combine_input.dispatch_output.hidden_states).device
        if rows.device != device:  # the exchange failed on it naming nothing; standard returned y there
            raise ValueError(f"combine_input.hidden_states is on {rows.device}; expected {device} (the device of "
                             f"the {self.name} dispatch output's rows)")

    def combined_tokens(self, dispatch_output: DispatchOutput) -> Optional[int]:
        """T of the dispatch `dispatch_output` came from (the rows combine returns); None when unknown,
        and an async combine on CPU ranks then completes before it returns."""
        return None

    @staticmethod
    def _plain(async_op: bool, return_recv_hook: bool, previous_event: Any) -> bool:
        """A synchronous call in a process that has run nothing asynchronously: the exchange runs here,
        as it is (what torch.compile traces, with no stream or thread bookkeeping)."""
        return not (async_op or return_recv_hook) and previous_event is None and not overlap.used()

    def _moves_rows(self) -> bool:
        return self.world_size > 1 and self.shards_experts

    def _check_async(self, async_op: Any, return_recv_hook: Any, previous_event: Any) -> None:
        for name, value in (("async_op", async_op), ("return_recv_hook", return_recv_hook)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r}; allowed: True or False")
        if async_op and return_recv_hook:
            raise ValueError("async_op=True and return_recv_hook=True; allowed: one of them (the hook is the "
                             "receive side's wait)")
        if return_recv_hook and not self.supports_recv_hook:
            raise ValueError(f"return_recv_hook=True on the {self.name} dispatcher; allowed: False here (receive "
                             f"hooks are offered by deepep_ll and deepep_normal)")
        overlap.check_previous_event(previous_event)

    def _issue(self, operation: str, fn, device: torch.device, inputs: Any, async_op: bool, return_recv_hook: bool,
               previous_event: Any, make_shell, fill):
        """Run fn (the exchange `operation`) now, on the communication stream or on the group's exchange
        thread; see dispatchers/overlap.py. make_shell/fill: the CPU output until wait() and how it is
        filled."""
        wanted = async_op or return_recv_hook
        moves = self._moves_rows()
        if device.type == "cuda":
            if wanted and moves:
                out, work = overlap.launch_cuda(device, fn, inputs, previous_event)
            else:
                overlap.order_caller_after(device)
                if previous_event is not None:
                    event = previous_event.event if isinstance(previous_event, ExchangeWork) else previous_event
                    if event is not None:
                        torch.cuda.current_stream(device).wait_event(event)
                out = fn()
                # an async call that moves nothing ran on the caller's current stream: its work still
                # orders a waiter on another stream after it
                work = overlap.finished_here(device, out) if wanted else ExchangeWork()
        # (a synchronous call made on the group's exchange thread itself, from a get_future() callback, runs in
        # place, in the last branch: queued there, it waited for itself until the timeout, then blamed a peer)
        elif moves and (wanted or (overlap.has_worker(self.group) and not overlap.on_worker(self.group))):
            prior = previous_event if isinstance(previous_event, ExchangeWork) else None
            fn = self._named(operation, fn)  # (its error may reach the caller outside dispatch's own naming)
            out = make_shell() if wanted and make_shell is not None else None
            if prior is not None:
                fn = lambda fn=fn: (prior.finished(), fn())[1]  # noqa: E731
            if out is not None:  # filled on the exchange thread, as the exchange's last step: a call ordered after
                # this one by previous_event=work reads it filled (filled at wait(), it read the empty shell)
                fn = overlap.filled(fn, out, fill)
            future = overlap.submit(self.group, fn)
            if out is None:  # in call order after the pending async exchanges (waited as a work: bounded)
                ExchangeWork(future=future)._made_by(self, operation, None).wait()
                out, work = future.result(), ExchangeWork()
            else:
                work = ExchangeWork(future=future)
        else:
            if isinstance(previous_event, ExchangeWork):  # nothing moves here: ordered after it by waiting for it
                previous_event.finished()
            out, work = fn(), ExchangeWork()
        if not wanted:
            return out
        work._made_by(self, operation, out)  # what its timeout's error names, get_future's value
        return (out, ReceiveHook(work)) if return_recv_hook else (out, work)

    def raise_deferred(self) -> None:
        """Run now the value checks that CUDA calls defer (static plans' count tables, standard's id/weight
        flags; docs/reliability.md), e.g. after a job's last step or before capturing a CUDA graph;
        call it on every rank together. Nothing to run here."""

    def synchronize(self, operation: str = "synchronize") -> None:
        """Wait until the work queued so far on the current CUDA stream has finished (a replayed CUDA
        graph holding this dispatcher's exchange, say), at most EP_RUNTIME_TIMEOUT_S: a peer that does
        not answer makes every waiting rank abort the group's communicator and raise ep.PeerFailure
        naming this dispatcher, `operation` and the peer(s). Call it instead of
        torch.cuda.synchronize() where a host waits for a graph's results. Returns at once on CPU."""
        if self.world_size == 1 or not self.shards_experts:
            return torch.cuda.synchronize() if torch.cuda.is_available() else None
        distributed.synchronize(self.group, self.name, self.rank, self.world_size, operation)
        check_transport(self.group, self.name, operation)  # a wait on the NVLink transport that gave up

    def check_capacity(self, num_tokens: int) -> None:
        """Raise when T exceeds a fixed buffer (dispatchers with static buffers override)."""

    def _dispatch(self, x: torch.Tensor, topk: TopKOutput, **options: Any) -> DispatchOutput:
        raise NotImplementedError

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TransportOptions:
    """How an exchange moves rows. transport (GPUs): 'auto' (the fastest measured, see peer_transport:
    NVLink for dispatchers whose kernels put rows themselves, deepep_ll, where the GPUs map each
    other's memory; NCCL otherwise), 'nccl' or 'nvlink' (stores into peers' memory; an error where impossible);
    num_sms: SMs the NVLink transport copies rows with (0: none, the copy engines do). hierarchical:
    'auto' (node-aware where the group spans several nodes), 'on' or 'off', for host plans
    (dispatchers/hierarchical.py); ranks_per_node: > 0 sets the nodes (ranks [0, n) on node 0, ...),
    0 takes them from the launcher. Every rank must agree (checked at construction)."""

    transport: str
    num_sms: int
    hierarchical: str = "auto"
    ranks_per_node: int = 0


def resolve_transport(transport: Optional[str], num_sms: Optional[int], hierarchical: Optional[str] = None,
                      ranks_per_node: Optional[int] = None) -> TransportOptions:
    transport = envs.get("TRANSPORT") if transport is None else transport
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r}; allowed: {', '.join(map(repr, TRANSPORTS))} "
                         f"(also settable as {envs.PREFIX}TRANSPORT)")
    hierarchical = envs.get("HIERARCHICAL") if hierarchical is None else hierarchical
    if hierarchical not in MODES:
        raise ValueError(f"hierarchical={hierarchical!r}; allowed: {', '.join(map(repr, MODES))} "
                         f"(also settable as {envs.PREFIX}HIERARCHICAL)")
    return TransportOptions(transport, resolve_int("num_sms", num_sms, "NUM_SMS", minimum=0), hierarchical,
                            resolve_int("ranks_per_node", ranks_per_node, "RANKS_PER_NODE", minimum=0))


def _received_rows(output: DispatchOutput):
    return output.data_dependent_rows()


class ExchangeDispatcher(Dispatcher):
    """A dispatcher whose rows travel through a RankExchange (deepep_normal, deepep_ll, mori): it
    checks ids and weights in the exchange's count table, and combine sends each received row (that
    rank's partial sum) home, where a token's partials are added (deepep_ll gathers its expert rows
    into those partials first). transport, num_sms, hierarchical, ranks_per_node: see TransportOptions."""

    checks_values_in_exchange = True
    puts_rows = False  # its own kernels store rows into peers' memory (transport 'auto' then takes NVLink)
    # Under torch.compile a synchronous exchange (count table, collectives, host reads) runs as it is: one graph
    # break per dispatch or combine. Traced, it broke the graph at each collective and host read, inside
    # naming_peer_failures (a generator context manager, which dynamo cannot resume in): dynamo skipped the
    # whole dispatch frame and compiled each function under it as a frame of its own.
    # The dispatch output's data-dependent row counts enter the traced code marked dynamic (untraced's
    # dynamic_rows): a later routing compiles nothing again.
    _named_dispatch = untraced(Dispatcher._named_call, "dispatch", dynamic_rows=_received_rows)
    _named_combine = untraced(Dispatcher._named_call, "combine")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # One wrapper per dispatcher class and operation: dynamo keeps at most 8 compiled frames per wrapper
        # (per code object), one per arguments' shapes and gradient mode; shared by every class, a process
        # compiling layers of three dispatchers in training and under no_grad went past that, and shared by
        # dispatch and combine, a compiled layer's first call compiled the wrapper again for combine's
        # arguments (error_on_recompile raised there).
        super().__init_subclass__(**kwargs)
        cls._named_dispatch = untraced(Dispatcher._named_call, f"{cls.__name__}_dispatch",
                                       dynamic_rows=_received_rows)
        cls._named_combine = untraced(Dispatcher._named_call, f"{cls.__name__}_combine")

    def __init__(self, config: MoeConfig, group: Optional[dist.ProcessGroup] = None,
                 expert_to_rank: Optional[Sequence[int]] = None, transport: Optional[str] = None,
                 num_sms: Optional[int] = None, hierarchical: Optional[str] = None,
                 ranks_per_node: Optional[int] = None):
        super().__init__(config, group, expert_to_rank)
        options = self.transport_options = resolve_transport(transport, num_sms, hierarchical, ranks_per_node)
        self.exchange = RankExchange(self.placement, self.group, name=self.name, transport=options.transport,
                                     num_sms=options.num_sms, hierarchical=options.hierarchical,
                                     ranks_per_node=options.ranks_per_node)

    def _table_plan(self, **options: Any) -> Optional[tuple[Optional[int], Optional[str]]]:
        """(chunk, distinct) of the count table a dispatch with these options starts with, as
        RankExchange.plan takes them; None where it starts with none (a reused handle) or is not known
        (a subclass that does not say: its peers wait until the timeout, as before). A subclass's
        _dispatch takes its plan's chunk and distinct from here, so a bad-input join's row (made from
        these) always has the length of the good ranks' rows."""
        return None

    def join_with_bad_input(self, error: Exception, **options: Any) -> None:
        """Dispatcher.join_with_bad_input: one all_gather of a row marking this rank's input as bad
        (RankExchange.join_with_bad_input), in call order after the group's pending async exchanges. Where
        the peers read their table at once: gloo groups (CPU ranks, every plan) and, on NCCL groups, host
        plans (deepep_normal without num_worst_tokens, mori outside static). Not while capturing a CUDA
        graph, nor for static plans on CUDA (their table is read CHECK_LAG calls later, if at all), nor
        where deepep_ll's rows may be put by the NVLink transport (no table all_gather then), nor on a group
        of other backends: there the peers wait until the timeout, as before. A join that fails (a peer
        elsewhere, options a dispatch would refuse) is dropped: `error` is this rank's to raise."""
        if self.world_size == 1 or capturing():
            return
        try:
            plan = self._table_plan(**options)
            backend = dist.get_backend(self.group)
            # the device the peers' tables are on (NCCL: the current CUDA device, as the settings check's)
            device = (torch.device("cpu") if backend == "gloo" else
                      torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None)
            if plan is None or device is None:
                return
            chunk, distinct = plan
            if chunk is not None:  # a static plan
                if device.type == "cuda":
                    return
                if (self.puts_rows and self.transport_options.transport == "nvlink"
                        and exchange_kernels.on_gpu(torch.empty(0, device=device))):  # (kernels forced on CPU ranks)
                    return
            overlap.in_call_order(self.group, lambda: self.exchange.join_with_bad_input(chunk, distinct, error,
                                                                                         device))
        except Exception:  # noqa: BLE001 - the peers are elsewhere (stalled, in another call): raise error anyway
            pass

    def settings(self) -> dict:
        """Dispatcher.settings, and EP_RUNTIME_SYNC_CHECKS: ranks that read the count table at different calls
        (at once on some, CHECK_LAG calls later on others) would raise a bad input at different calls."""
        return {**super().settings(), "sync_checks": self.exchange.sync_checks}

    def _checked_topk(self, x: torch.Tensor, topk: TopKOutput) -> TopKOutput:
        check_cpu_ranks(x.device, self.world_size, self.transport_options.transport)  # on every rank: same settings
        check_num_sms(self.transport_options.num_sms, x.device)
        topk = super()._checked_topk(x, topk)
        if self.fp8 is not None:  # raised at the call before any collective, also when issued async
            fp8_payload.check_inference(x, topk[1])
        return topk

    def check_combine_input(self, combine_input: CombineInput) -> None:
        """Token rows in the dispatched x's dtype: one per row this rank received when the plan has the
        received count on the host (host plans; at least that many where a receive buffer pads them, mori's);
        static plans (device-only counts, not read here): at least the rows the runner was handed."""
        super().check_combine_input(combine_input)
        out = combine_input.dispatch_output
        handle = getattr(out, "handle", None)
        splits = getattr(handle, "recv_splits", None)
        rows = combine_input.hidden_states
        x_dtype = getattr(out, "x_dtype", None)
        if x_dtype is not None and rows.dtype != x_dtype:  # (every rank dispatched x_dtype: the count table checks it)
            raise TypeError(f"combine_input.hidden_states has dtype {rows.dtype}; expected {x_dtype}, the dtype of the "
                            f"dispatched x (the rows cross ranks as raw bytes, so every rank must send that dtype)")
        # (handle.rows None: a host plan hands out the rows as received, deepep_normal's, so there is no padding and
        # more rows are another dispatch's, a later call's runner output given an earlier call's dispatch_output)
        received = sum(splits) if splits is not None else None
        if received is not None and (rows.dim() != 2 or rows.shape[0] < received or (
                handle.rows is None and rows.shape[0] != received)):
            expected = (f"[{received}, {self.config.hidden_size}] (the rows this rank received in the dispatch that "
                        f"made combine_input.dispatch_output)" if handle.rows is None else
                        f"[N, {self.config.hidden_size}] with N >= {received} (the rows this rank received; rows "
                        f"past them are padding)")
            raise ValueError(f"combine_input.hidden_states has shape {list(rows.shape)}; expected {expected}")
        if getattr(handle, "static", False) and handle.rows is not None:
            handed = getattr(out, "num_runner_rows", handle.rows)
            if rows.dim() != 2 or rows.shape[0] < handed:
                raise ValueError(f"combine_input.hidden_states has shape {list(rows.shape)}; expected [N, "
                                 f"{self.config.hidden_size}] with N >= {handed} (the rows the runner was handed, "
                                 f"a static plan's receive rows)")

    def link_bytes(self, dispatch_output: DispatchOutput) -> Optional[LinkBytes]:
        """Bytes this rank sends over links inside its node and between nodes, for the dispatch that
        made `dispatch_output` and its combine (ep.dispatchers.hierarchical.LinkBytes); None for static
        plans (fixed chunks, padding included). A dispatch row is the wire row (x, or its fp8 row with
        scales) plus K weights and K ids, each in the weights' dtype (weights_dtype: float32, float64 for
        float64 x); a combine row H values of x's dtype."""
        handle = getattr(dispatch_output.handle, "exchange", dispatch_output.handle)
        if handle.links is None:
            return None
        H, K = self.config.hidden_size, self.config.top_k
        dtype = dispatch_output.x_dtype or dispatch_output.recv_x.dtype
        quant = self.fp8
        wire = fp8_payload.row_layout(H, quant)[0] if quant is not None else H * dtype.itemsize
        return LinkBytes.of(handle.links, wire + 2 * K * weights_dtype(dtype).itemsize, H * dtype.itemsize)

    @functools.cached_property
    def fp8(self) -> Optional[QuantConfig]:
        """The activation format of an fp8 dispatch (options use_fp8, fp8_scale_encoding), else None (x
        travels as it is); made once (the options are frozen). The exchange quantizes (on the kernel path
        inside its packing kernel); _checked_topk refuses a gradient before any collective."""
        options = self.__dict__["options"]
        if not getattr(options, "use_fp8", False):
            return None
        return QuantConfig(scale_encoding=options.fp8_scale_encoding)

    def _received(self, rows: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(recv_x, recv_x_scale): received rows as they are, or an fp8 dispatch's values and scales."""
        quant = self.fp8
        if quant is None:
            return rows, None
        return fp8_payload.views(rows, self.config.hidden_size, quant)

    def check_capacity(self, num_tokens: int) -> None:
        self.exchange.check_tokens_while_capturing(num_tokens)

    def raise_deferred(self) -> None:
        self.exchange.raise_deferred()

    def combined_tokens(self, dispatch_output: DispatchOutput) -> Optional[int]:
        return dispatch_output.handle.num_tokens

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        return self.exchange.reduce(combine_input.hidden_states, combine_input.dispatch_output.handle)
