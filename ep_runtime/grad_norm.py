"""Gradient clipping for a model holding EPMoE layers: one global norm, the same on every rank."""
from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from .dispatchers.overlap import in_call_order
from .layer import EPMoE, _is_dtensor
from .validation import check_type, finite_float


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model holding EPMoE layers; call it on every rank of the layers'
    groups. Returns the total norm (a 0-d float32 tensor, the same on every rank).

    torch's own computes each rank's norm from that rank's experts only, so ranks clip by different factors.
    Here each sharded layer's expert gradients (w13, w2, b13, b2) count over the layer's group (one all_reduce
    per group), each logical expert once: with redundant experts only its first copy counts, so call it after
    reduce_replica_grads(), which makes the copies' gradients equal. Every other gradient (dense parameters,
    shared experts, a "standard" layer's replicated experts) counts once, as this rank holds it: after DDP's
    all-reduce (or FSDP2's reduce-scatter: DTensor gradients count over their mesh) and, in a dp x ep job,
    after the experts' dp reduction (docs/api.md's recipes). Experts frozen on some ranks (no .grad) add
    nothing but their ranks still join the all_reduce."""
    check_type("model", model, nn.Module, "an nn.Module holding the EPMoE layers (e.g. the whole model)")
    max_norm = finite_float("max_norm", max_norm)
    p = float(norm_type) if isinstance(norm_type, numbers.Real) and not isinstance(norm_type, bool) else None
    if p is None or math.isnan(p) or p <= 0:
        raise ValueError(f"norm_type={norm_type!r}; allowed: a number > 0, or math.inf")
    params = [q for q in model.parameters() if q.grad is not None]
    expert_ids, by_group = set(), {}  # id(group) -> (group, size, device, [the norms of this rank's experts])
    for layer in model.modules():
        if not isinstance(layer, EPMoE) or not layer.dispatcher.shards_experts:
            continue
        placement, rank = layer.placement, layer.dispatcher.rank
        keep = [j for j, e in enumerate(placement.local_expert_ids().tolist())
                if placement.replicas_of(e)[0] == (rank, j)]  # each logical expert's first copy
        group = layer.dispatcher.group
        *_, pieces = by_group.setdefault(id(group), (group, layer.dispatcher.world_size, layer.w13.device, []))
        for weight in (layer.w13, layer.w2, layer.b13, layer.b2):
            if weight is None:
                continue
            expert_ids.add(id(weight))
            if weight.grad is not None and keep:
                rows = weight.grad[torch.tensor(keep, device=weight.grad.device)]
                # float32 on every rank (the all_reduce pairs them); float64 rows are not narrowed by dtype=
                # (vector_norm refused them, on the ranks holding first copies only: the others waited below)
                wide = rows.dtype == torch.float64
                pieces.append(torch.linalg.vector_norm(rows, p, dtype=None if wide else torch.float32).float())
    dense = [q.grad for q in params if id(q) not in expert_ids]
    norms = []
    for grads in ([g for g in dense if not _is_dtensor(g)], [g for g in dense if _is_dtensor(g)]):
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, p, foreach=foreach).float()
            norms.append(norm.full_tensor() if _is_dtensor(norm) else norm)
    for group, size, device, pieces in by_group.values():
        # every rank joins, with or without gradients of its own
        part = _combine([t.to(device) for t in pieces], p, device)
        if size > 1:
            op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
            powered = part if math.isinf(p) else part ** p
            in_call_order(group, lambda t=powered, o=op, g=group: dist.all_reduce(t, op=o, group=g))
            part = powered if math.isinf(p) else powered ** (1.0 / p)
        norms.append(part)
    device = params[0].grad.device if params else torch.device("cpu")
    total = _combine([t.to(device) for t in norms], p, device)
    if error_if_nonfinite and not torch.isfinite(total).item():
        raise RuntimeError(f"the total norm of order {p} of the gradients is {total.item()} (non-finite), so they "
                           f"cannot be clipped; set error_if_nonfinite=False to clip anyway")
    for split in ([q for q in params if not _is_dtensor(q.grad)], [q for q in params if _is_dtensor(q.grad)]):
        if split:  # (torch's foreach kernels take no list mixing DTensors and tensors)
            torch.nn.utils.clip_grads_with_norm_(split, max_norm, total, foreach=foreach)
    return total


def _combine(norms: list, p: float, device) -> torch.Tensor:
    """The norm of order p of the concatenation of vectors whose norms are `norms` (0-d; none: 0)."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    stacked = torch.stack(norms)
    return stacked.max() if math.isinf(p) else torch.linalg.vector_norm(stacked, p)
