"""What every dispatcher is: dispatch(x, topk) -> its format's DispatchOutput; combine(CombineInput) -> y."""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.distributed as dist

from ep_runtime import distributed, envs
from ep_runtime.config import MoeConfig
from ep_runtime.placement import ExpertPlacement
from ep_runtime.quant import QuantConfig
from ep_runtime.routing import TopKOutput
from ep_runtime.runner_core import CombineInput, DispatchOutput
from ep_runtime.validation import check_hidden_states, check_topk, is_int_at_least

from . import fp8_payload
from .peer_transport import TRANSPORTS
from .rank_exchange import RankExchange


class ExchangeWork:
    """What dispatch/combine return beside their output when called with async_op=True (the
    torch.distributed convention): wait() orders the caller after the exchange. The exchange is
    issued on the caller's stream today, so it is already ordered and wait() returns at once (no
    overlap with other work on a communication stream yet)."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def resolve_int(name: str, value: Any, knob: Optional[str] = None, minimum: int = 1,
                optional: bool = False) -> Optional[int]:
    """A dispatcher's integer option: the argument, else its knob (EP_RUNTIME_<knob>), else None when
    optional; one error wording for every dispatcher, naming the argument, its value and the range."""
    if value is None and knob is not None:
        value = envs.get(knob)
    if value is None and optional:
        return None
    if not is_int_at_least(value, minimum):
        none = "None or " if optional else ""
        also = f" (also settable as {envs.PREFIX}{knob})" if knob else ""
        raise ValueError(f"{name}={value!r}; allowed: {none}an int >= {minimum}{also}")
    return int(value)


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in `group`; (0, 1) when no process group exists (a plain single process)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


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

    def __init__(self, config: MoeConfig, group: Optional[dist.ProcessGroup] = None,
                 expert_to_rank: Optional[Sequence[int]] = None):
        """expert_to_rank: the rank holding each global expert (None: contiguous, rank r holds
        [r*L, (r+1)*L)); ignored by dispatchers that do not shard experts."""
        self.config = config
        self.group = group
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
        which aborts the process instead of raising. Raises on every rank, naming the setting."""
        if self.world_size == 1 or not self.shards_experts:
            return
        mine = self.settings()
        every = [None] * self.world_size
        device = torch.device(device) if device is not None else None
        with torch.cuda.device(device) if device is not None and device.type == "cuda" else nullcontext():
            dist.all_gather_object(every, mine, group=self.group)  # NCCL: on the current CUDA device
        for rank, theirs in enumerate(every):
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if differ:
                k = differ[0]
                raise ValueError(f"ranks disagree on {self.name} setting {k}: rank {self.rank} has {mine.get(k)!r}, "
                                 f"rank {rank} has {theirs.get(k)!r}; every rank must build the layer with the "
                                 f"same arguments and EP_RUNTIME_* knobs")

    def dispatch(self, x: torch.Tensor, topk: TopKOutput, *, async_op: bool = False, **options: Any):
        """x [T, H]; topk: TopKOutput(topk_ids [T, K] int global (-1 = nowhere), topk_weights [T, K]),
        or any (ids, weights) pair. Checked before any collective. options: per-call extras a
        dispatcher documents (deepep_normal: handle). async_op=True returns (output, work), see
        ExchangeWork."""
        distributed.check_group(self.group, self.name, "dispatch")
        out = self._checked_dispatch(x, topk, **options)
        return (out, ExchangeWork()) if async_op else out

    def _checked_dispatch(self, x: torch.Tensor, topk: TopKOutput, **options: Any) -> DispatchOutput:
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
        ids = ids if ids.dtype == torch.int64 else ids.to(torch.int32)
        return self._dispatch(x, TopKOutput(ids, weights.float()), **options)

    def combine(self, combine_input: CombineInput, *, async_op: bool = False):
        """The runner's rows, reduced per original token: [T, H] in x's dtype. async_op=True returns
        (y, work), see ExchangeWork."""
        distributed.check_group(self.group, self.name, "combine")
        y = self._combine(combine_input)
        return (y, ExchangeWork()) if async_op else y

    def raise_deferred(self) -> None:
        """Run now the count-table checks that static plans on CUDA defer (docs/reliability.md), e.g.
        after a job's last step; call it on every rank together. Nothing to run here."""

    def synchronize(self, operation: str = "synchronize") -> None:
        """Wait until the work queued so far on the current CUDA stream has finished (a replayed CUDA
        graph holding this dispatcher's exchange, say), at most EP_RUNTIME_TIMEOUT_S: a peer that does
        not answer makes every waiting rank abort the group's communicator and raise ep.PeerFailure
        naming this dispatcher, `operation` and the peer(s). Call it instead of
        torch.cuda.synchronize() where a host waits for a graph's results. Returns at once on CPU."""
        if self.world_size == 1 or not self.shards_experts:
            return torch.cuda.synchronize() if torch.cuda.is_available() else None
        distributed.synchronize(self.group, self.name, self.rank, self.world_size, operation)

    def check_capacity(self, num_tokens: int) -> None:
        """Raise when T exceeds a fixed buffer (dispatchers with static buffers override)."""

    def _dispatch(self, x: torch.Tensor, topk: TopKOutput, **options: Any) -> DispatchOutput:
        raise NotImplementedError

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TransportOptions:
    """How an exchange moves rows on GPUs. transport: 'auto' (NVLink stores into peers' memory where
    every rank's GPU maps every other's, else NCCL), 'nccl' or 'nvlink' (an error where impossible);
    num_sms: SMs each NVLink transport kernel uses. Every rank must agree (checked at construction)."""

    transport: str
    num_sms: int


def resolve_transport(transport: Optional[str], num_sms: Optional[int]) -> TransportOptions:
    transport = envs.get("TRANSPORT") if transport is None else transport
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r}; allowed: {', '.join(map(repr, TRANSPORTS))} "
                         f"(also settable as {envs.PREFIX}TRANSPORT)")
    return TransportOptions(transport, resolve_int("num_sms", num_sms, "NUM_SMS"))


class ExchangeDispatcher(Dispatcher):
    """A dispatcher whose rows travel through a RankExchange (deepep_normal, deepep_ll, mori): it
    checks ids and weights in the exchange's count table, and combine sends each received row (that
    rank's partial sum) home, where a token's partials are added (deepep_ll gathers its expert rows
    into those partials first). transport, num_sms: see TransportOptions."""

    checks_values_in_exchange = True

    def __init__(self, config: MoeConfig, group: Optional[dist.ProcessGroup] = None,
                 expert_to_rank: Optional[Sequence[int]] = None, transport: Optional[str] = None,
                 num_sms: Optional[int] = None):
        super().__init__(config, group, expert_to_rank)
        self.transport_options = resolve_transport(transport, num_sms)
        self.exchange = RankExchange(self.placement, self.group, name=self.name,
                                     transport=self.transport_options.transport,
                                     num_sms=self.transport_options.num_sms)

    @functools.cached_property
    def fp8(self) -> Optional[QuantConfig]:
        """The activation format of an fp8 dispatch (options use_fp8, fp8_scale_encoding), else None;
        made once (the options are frozen)."""
        options = self.__dict__["options"]
        if not getattr(options, "use_fp8", False):
            return None
        return QuantConfig(scale_encoding=options.fp8_scale_encoding)

    def _wire_rows(self, x: torch.Tensor) -> torch.Tensor:
        """What travels: x itself, or with use_fp8 its fp8 wire rows (quantized once per token)."""
        quant = self.fp8
        return x if quant is None else fp8_payload.encode(x, quant)

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

    def _combine(self, combine_input: CombineInput) -> torch.Tensor:
        return self.exchange.reduce(combine_input.hidden_states, combine_input.dispatch_output.handle)
