"""The eplb suite: what expert load balancing buys on this machine, measured in one run.

For each layer shape and T (tokens per rank), with the routing of --routing (skewed: zipf:1.2),
the whole EPMoE forward (route-free: given ids; dispatch + runner + combine) is timed three times,
one after the other, on the same inputs: a layer without copies; a layer with N redundant experts
in its starting placement; the same layer after one rebalance from the load it counted while
warming up (`layer.rebalance()`). Each row also gives the pairs the busiest rank receives over the
mean (max/mean), computed from the routing and the layer's placement.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .dispatch import routing_topk
from .settings import DTYPES, Progress, Results, Settings, dtype_name, reason
from .timing import measure, sum_over_group

DEFAULT_DISPATCHER = "deepep_normal"


def default_redundant_experts(num_experts: int, world_size: int) -> int:
    """E / 8 copies (32 for DeepSeek-V3's 256 experts), rounded up so E + N divides over the ranks."""
    n = max(num_experts // 8, 1)
    while (num_experts + n) % world_size:
        n += 1
    return min(n, num_experts * (world_size - 1))


def eplb_suite(settings: Settings, group: Any, device: torch.device, progress: bool) -> Results:
    """Collective: every rank of `group` runs it; rows are the same on every rank."""
    from ..layer import EPMoE
    from ..routing import TopKOutput

    rank, R = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[settings.dtype]
    names = settings.dispatchers or [DEFAULT_DISPATCHER]
    runner = (settings.runners or ["auto"])[0]
    results = Results()
    bar = Progress(len(settings.cases()) * len(settings.tokens) * len(names), progress and rank == 0, "eplb")
    try:
        for E, K, H in settings.cases():
            N = settings.redundant_experts if settings.redundant_experts is not None else \
                default_redundant_experts(E, R)
            for T in settings.tokens:
                gen = torch.Generator().manual_seed(settings.seed * 1000003 + rank * 7919 + T)
                xs, topks = [], []
                for _ in range(settings.rotate):
                    ids = routing_topk(settings.routing, gen, T, E, K, seed=settings.seed)
                    xs.append(torch.randn(T, H, generator=gen).to(dtype).to(device))
                    topks.append(TopKOutput(ids.to(device), (torch.rand(T, K, generator=gen) + 0.1).to(device)))
                shape = dict(num_experts=E, top_k=K, hidden_size=H, tokens_per_rank=T, routing=settings.routing,
                             redundant_experts=N)
                for name in names:
                    bar.step(f"{name} T={T}")
                    try:
                        rows = _time_layers(EPMoE, name, runner, settings, E, K, H, N, group, dtype, device, xs,
                                            topks)
                    except Exception as err:  # noqa: BLE001 - reported in the skipped table, not fatal
                        results.skipped.append(dict(suite="eplb", impl=name, num_experts=E, top_k=K, hidden_size=H,
                                                    tokens_per_rank=T, reason=reason(err)))
                        continue
                    base = rows[0]["median_us"]
                    for row in rows:
                        row.update(shape, dispatcher=name, world_size=R, dtype=dtype_name(dtype),
                                   vs_no_copies=base / row["median_us"] if row["median_us"] > 0 else None)
                        results.eplb.append(row)
    finally:
        bar.close()
    return results


def _build(EPMoE, name: str, runner: str, settings: Settings, E: int, K: int, H: int, N: int, group,
           dtype: torch.dtype, device: torch.device):
    """A layer with random experts drawn on the device (built on meta: no host-side init of large shapes)."""
    from .. import dispatchers, envs, runners
    runner = runners.resolve(envs.get("RUNNER") if runner == "auto" else runner, device, dispatchers.get(name).format)
    layer = EPMoE(E, K, H, settings.intermediate_size, dispatcher=name, runner=runner, group=group, dtype=dtype,
                  device="meta", num_redundant_experts=N).to_empty(device=device)
    with torch.no_grad():
        layer.w13.normal_(0.0, H ** -0.5)
        layer.w2.normal_(0.0, settings.intermediate_size ** -0.5)
    return layer


def _time_layers(EPMoE, name, runner, settings, E, K, H, N, group, dtype, device, xs, topks) -> list[dict]:
    """Rows: no copies; N copies as built; the same layer after one rebalance from the load it
    counted during its own timing (warm-up and repeats over the rotated inputs)."""
    rot = len(xs)
    timing = settings.timing(device, group)

    def row(label, layer, plan=None):
        stats = measure(lambda i: layer(xs[i % rot], *topks[i % rot]), **timing)
        out = dict(impl=f"EPMoE {label}", runner=layer.runner.backend.name,
                   max_over_mean=_max_over_mean(layer, topks, group, device), **stats.__dict__)
        out["planned_max_over_mean"] = plan.imbalance if plan is not None else None
        return out

    with torch.inference_mode():
        layer = _build(EPMoE, name, runner, settings, E, K, H, 0, group, dtype, device)
        rows = [row("no copies", layer)]
        del layer
        layer = _build(EPMoE, name, runner, settings, E, K, H, N, group, dtype, device)
        layer.expert_load(reset=True)
        rows.append(row(f"+{N} copies, initial", layer))
        plan = layer.rebalance()
        rows.append(row(f"+{N} copies, rebalanced", layer, plan))
    return rows


def _max_over_mean(layer, topks, group, device) -> float:
    """Pairs received by the busiest rank over the mean, over the rotated inputs, under the layer's placement."""
    R = layer.placement.ep_size
    received = torch.zeros(R, dtype=torch.float64)
    for ids, _ in topks:
        physical = layer.placement.to_physical(ids).long()
        owner = layer.dispatcher.placement.rank_of(physical)
        owner = owner[physical >= 0].cpu()
        received += torch.bincount(owner, minlength=R).double()
    total = torch.tensor(sum_over_group(received.tolist(), group, device), dtype=torch.float64)
    return float(total.max() / total.mean()) if total.sum() > 0 else 1.0
