"""The collective transport: how rows cross ranks through torch.distributed, everywhere (NCCL on GPU,
gloo on CPU, across hosts). The other transport, NVLink stores into symmetric memory
(peer_transport.py), is chosen per exchange by rank_exchange (peer_transport(): None means this one).

all_to_all_single for payloads, all_gather for the small count tables. `all_to_all` is differentiable:
its backward is the reverse exchange, which is what makes dispatch's backward a combine and combine's
a dispatch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ep_runtime.distributed import check_group

from .overlap import in_call_order


def _exchange(x: torch.Tensor, recv_splits: Optional[Sequence[int]], send_splits: Optional[Sequence[int]],
              group) -> torch.Tensor:
    x = x.contiguous()
    rows = x.shape[0] if recv_splits is None else int(sum(recv_splits))
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=None if recv_splits is None else list(recv_splits),
                           input_split_sizes=None if send_splits is None else list(send_splits), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        return _exchange(x, recv_splits, send_splits, group)

    @staticmethod
    def backward(ctx, grad):
        # The reverse exchange, itself differentiable: under create_graph=True (a gradient penalty, double
        # backward) the gradient keeps its graph through the exchange instead of arriving as a constant.
        recv_splits, send_splits = ctx.splits
        # a forward run before its group was destroyed (or failed): named, as a forward call is (a destroyed gloo
        # group still exchanged; a destroyed or aborted NCCL one fails or hangs)
        check_group(ctx.group, "an ep-runtime layer's", "backward (the reverse exchange of its forward)", 2)
        if torch.is_grad_enabled() and grad.requires_grad:
            return _AllToAll.apply(grad, send_splits, recv_splits, ctx.group), None, None, None
        # CPU ranks: after the group's async exchanges issued so far (another micro-batch's dispatch in
        # flight during this backward), in call order on every rank
        back = in_call_order(ctx.group, lambda: _exchange(grad, send_splits, recv_splits, ctx.group))
        return back, None, None, None


def all_to_all(x: torch.Tensor, recv_splits: Optional[Sequence[int]], send_splits: Optional[Sequence[int]],
               group, world_size: int) -> torch.Tensor:
    """Rows [sum(send_splits), ...] out, [sum(recv_splits), ...] in; None splits = equal chunks
    (static shapes, CUDA-graph capturable). Identity on one rank. Differentiable."""
    if world_size == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll.apply(x, recv_splits, send_splits, group)
    return _exchange(x, recv_splits, send_splits, group)


def host_values(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list, or a CPU tensor) as a tensor on `device` without a host sync: on CUDA copied from
    pinned memory without blocking (torch.tensor(values, device="cuda") first waits for the stream's queued
    work)."""
    made = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return made.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else made


def all_gather_rows(row: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """[n] on each rank -> [world_size, n] (every rank's row, in rank order)."""
    if world_size == 1:
        return row.unsqueeze(0)
    # Zeros on CUDA: if a peer never answers, the group is aborted and the kernels queued behind this
    # read a table of zeros (nothing to send, nothing received), never leftover memory as counts.
    out = row.new_zeros(world_size * row.numel()) if row.is_cuda else row.new_empty(world_size * row.numel())
    _all_gather_single(out, row.contiguous() if row.dim() == 1 else row.contiguous().reshape(-1), group=group)
    return out.view((world_size,) + tuple(row.shape))


# torch >= 2.13 renamed all_gather_into_tensor (the old name warns); older releases lack the new one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
