"""mori: MoRI semantics. A token-major padded receive buffer [N_buf, H] with global ids; the runner
core maps them to this rank's experts through the placement (ids of other ranks' experts go to the
sink) instead of the sender remapping them.

N_buf = max_dispatch_tokens_per_rank * R, or prealloc_max_recv_tokens when set. Rows past
num_recv_tokens (a device int32 tensor of shape [1], MoRI's totalRecvTokenNum as its dispatch returns
it) are padding with id -1. Real rows come in (source rank, token) order (MoRI's order depends on
timing; its callers map rows back with get_dispatch_src_token_pos).

Truncation (max_input_tokens n, EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS): the runner sees only the
first rows of the buffer so kernel configs fit the real size. Upstream, an n below the received
count silently dropped tokens. Here:
- eager (host plan, counts already on the host): the runner sees max(n, received) rows, so a small
  n never changes a result;
- static plan (CUDA-graph capture, or static=True): the runner sees n rows and a received count
  above n is an error naming the knob and the value needed (device-side assert on CUDA).
A buffer too small for the step's traffic is an error on every rank, never a drop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ep_runtime.routing import TopKOutput
from ep_runtime.runner_core import DispatchOutput, RunnerInput, register_format
from ep_runtime.validation import assert_on_device, capturing

from . import fp8_payload, register
from .base import ExchangeDispatcher, check_buffer_memory, resolve_int
from .rank_exchange import Capacity, ExchangeHandle

_INPUT_KNOB = "max_input_tokens / EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS"  # (set either way: errors name both)


@dataclass
class MoriDispatchOutput(DispatchOutput):
    """recv_x [N_buf, H]; recv_topk_ids [N_buf, K] int32 global (-1: none or padding);
    recv_topk_weights [N_buf, K] fp32 (float64 for float64 x); num_recv_tokens: [1] device int32; num_runner_rows: rows
    handed to the runner. use_fp8: recv_x float8_e4m3fn with recv_x_scale [N_buf, ceil(H/128)] (fp32,
    or uint8 UE8M0 exponents); x_dtype: the tokens' dtype before quantization."""

    format = "mori"
    recv_x: torch.Tensor
    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens: torch.Tensor
    num_runner_rows: int
    handle: ExchangeHandle
    recv_x_scale: Optional[torch.Tensor] = None
    x_dtype: Optional[torch.dtype] = None


@dataclass(frozen=True)
class MoriOptions:
    """max_dispatch_tokens_per_rank: most tokens a rank dispatches; prealloc_max_recv_tokens as resolved (0 =
    off; kept so that the settings check names it, not only the N_buf it derives); num_buffer_rows N_buf and
    the setting that sized it (buffer_setting, for errors); max_input_tokens: runner rows (0 = off);
    static: None (static plan while capturing), True or False."""

    max_dispatch_tokens_per_rank: int
    prealloc_max_recv_tokens: int
    num_buffer_rows: int
    buffer_setting: str
    max_input_tokens: int
    static: Optional[bool]
    use_fp8: bool = False
    fp8_scale_encoding: str = "fp32"


@register
class MoriDispatcher(ExchangeDispatcher):
    """max_dispatch_tokens_per_rank (EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK): most tokens a
    rank may dispatch. prealloc_max_recv_tokens (EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS, 0 = off):
    receive buffer rows instead of max * R. max_input_tokens (EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS,
    0 = off): runner rows, see the module doc. static: None picks the static plan while a CUDA graph
    is being captured and the host plan otherwise. use_fp8 / fp8_scale_encoding
    (EP_RUNTIME_DISPATCH_FP8*): tokens travel as fp8 with per-128-channel scales; inference only.
    hierarchical / ranks_per_node (EP_RUNTIME_HIERARCHICAL, EP_RUNTIME_RANKS_PER_NODE): the node-aware
    exchange of the host plan (dispatchers/hierarchical.py); the static plan stays flat."""

    name = "mori"
    format = "mori"

    def __init__(self, config, group=None, max_dispatch_tokens_per_rank: Optional[int] = None,
                 prealloc_max_recv_tokens: Optional[int] = None, max_input_tokens: Optional[int] = None,
                 static: Optional[bool] = None, expert_to_rank=None, transport: Optional[str] = None,
                 num_sms: Optional[int] = None, use_fp8: Optional[bool] = None, fp8_scale_encoding: Optional[str] = None,
                 hierarchical: Optional[str] = None, ranks_per_node: Optional[int] = None):
        super().__init__(config, group, expert_to_rank, transport, num_sms, hierarchical, ranks_per_node)
        M = resolve_int("max_dispatch_tokens_per_rank", max_dispatch_tokens_per_rank,
                        "MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK")
        prealloc = resolve_int("prealloc_max_recv_tokens", prealloc_max_recv_tokens, "MORI_PREALLOC_MAX_RECV_TOKENS", 0)
        if static is not None and not isinstance(static, bool):  # (1 == True: `in` let 0, 1 and 1.0 pass)
            raise ValueError(f"static={static!r}; allowed: None (static while capturing a CUDA graph), True or False")
        self.options = MoriOptions(
            M, prealloc, prealloc or M * self.world_size,
            "prealloc_max_recv_tokens / EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS" if prealloc else
            "max_dispatch_tokens_per_rank / EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK x R",
            resolve_int("max_input_tokens", max_input_tokens, "MORI_MOE_MAX_INPUT_TOKENS", 0), static,
            *fp8_payload.resolve(use_fp8, fp8_scale_encoding))
        check_buffer_memory(f"{self.options.buffer_setting} = {self.options.num_buffer_rows}",
                            self.options.num_buffer_rows, config.hidden_size, M * self.world_size)
        setting = "max_dispatch_tokens_per_rank (or EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK)"
        self.exchange.max_tokens = (M, f"mori allows at most max_dispatch_tokens_per_rank={M} "
                                       f"(EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK) per rank", setting)
        # made once, for errors: which settings size the peer chunks (static plan) and the receive rows
        self._capacity = Capacity(
            f"{self.options.buffer_setting} = {self.options.num_buffer_rows}", setting,
            "prealloc_max_recv_tokens (or EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS)" if prealloc else setting,
            1 if prealloc else self.world_size)

    def _static(self) -> bool:
        static = self.options.static
        return capturing() if static is None else static

    def _table_plan(self):
        return (self.options.max_dispatch_tokens_per_rank if self._static() else None), None

    def _dispatch(self, x, topk: TopKOutput):
        ids, weights = topk
        x_dtype, quant = x.dtype, self.fp8  # (checked for a gradient in _checked_topk)
        (chunk, distinct), options = self._table_plan(), self.options
        static, N, n = chunk is not None, options.num_buffer_rows, options.max_input_tokens
        handle, recv_x, recv_ids, recv_weights = self.exchange.plan_and_send(
            x, ids, weights, local_ids=False, chunk=chunk, rows=N, capacity=self._capacity, distinct=distinct,
            quant=quant)
        if n <= 0:
            rows = N
        elif static:
            rows = min(n, N)
            self._check_truncation(handle.most_received, rows)
        else:
            rows = min(N, max(n, sum(handle.recv_splits)))
        recv_x, recv_x_scale = self._received(recv_x)
        return MoriDispatchOutput(recv_x, recv_ids, recv_weights, handle.num_recv_tokens, rows, handle, recv_x_scale,
                                  x_dtype)

    def _check_truncation(self, most_received: torch.Tensor, rows: int) -> None:
        """Symmetric: every rank checks the largest receive count of any rank."""
        message = f"{_INPUT_KNOB}={self.max_input_tokens} is below the tokens a rank received"
        if most_received.is_cuda:
            assert_on_device(most_received <= rows, message)
        elif int(most_received) > rows:
            needed = int(most_received)
            raise ValueError(f"{message} ({needed}); allowed: 0 (off) or >= {needed}")



def _runner_input(out: MoriDispatchOutput, placement, config) -> RunnerInput:
    """Global ids map to this rank's weight rows through the placement (any placement)."""
    r = out.num_runner_rows
    scale = out.recv_x_scale[:r] if out.recv_x_scale is not None else None
    rows = RunnerInput.from_global_ids(out.recv_x[:r], out.recv_topk_ids[:r], out.recv_topk_weights[:r], placement,
                                       scale, out.x_dtype, defer=True)
    rows.padded_rows = True  # rows past num_recv_tokens are padding
    return rows


register_format("mori", RunnerInput, _runner_input)  # the rows go to combine as they are
