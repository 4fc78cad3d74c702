"""The dispatch suite: every registered dispatcher's dispatch, combine and round trip across the
ranks of the group, next to raw `dist.all_to_all_single` moving the same rows (the baseline).

Bytes are counted from the routing: a token leaves its rank once per other rank owning >= 1 of its
experts, H * itemsize bytes each time. Besides each dispatcher at its defaults, the suite times the
static-shape modes (STATIC_VARIANTS), a dispatch that reuses an earlier dispatch's handle (for
dispatchers whose dispatch takes `handle=`), and with --cuda-graph the CUDA-graph replays of the
implementations that capture (CAPTURABLE) and of the baseline.
"""
from __future__ import annotations

import inspect
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .settings import DTYPES, Progress, Results, Settings, dtype_name, reason
from .timing import Stats, measure, measure_cuda_graph, sum_over_group

BASELINE = "all_to_all_single"
GRAPH = " (graph)"  # suffix of an op timed as CUDA-graph replays


@dataclass(frozen=True)
class Variant:
    """One timed configuration: row label, registered dispatcher, and its constructor options for
    T tokens per rank on R ranks (None: the dispatcher's defaults, built once per layer shape)."""

    impl: str
    dispatcher: str
    options: Optional[Callable[[int, int], dict]] = None
    min_tokens: int = 0  # timed only from this many tokens per rank up


# Static-shape modes (no host sync; sized for exactly T tokens per rank): DeepEP's num_worst_tokens
# (a rank receives at most T from each of R ranks) and MoRI's static plan.
STATIC_VARIANTS = (
    Variant("deepep_normal static", "deepep_normal",
            lambda T, R: dict(num_worst_tokens=max(T, 1) * R, num_max_dispatch_tokens_per_rank=max(T, 1))),
    Variant("mori static", "mori", lambda T, R: dict(max_dispatch_tokens_per_rank=max(T, 1), static=True)),
)
# --fp8: each dispatcher with an fp8 payload again with use_fp8=True (tokens quantized on the sender).
FP8_DISPATCHERS = ("deepep_normal", "deepep_ll", "mori")
FP8 = " fp8"
# The exchange dispatchers choose their transport (`auto`, see peer_transport); these rows pin each
# one beside them (the NVLink transport's copy engine, and its SM copy kernel at two SM budgets).
TRANSPORT_VARIANTS = (
    *(Variant(f"{name} {transport}", name, lambda T, R, transport=transport: dict(transport=transport))
      for name in ("deepep_normal", "mori", "deepep_ll") for transport in ("nccl", "nvlink")),
    *(Variant(f"deepep_normal sms={n}", "deepep_normal", lambda T, R, n=n: dict(transport="nvlink", num_sms=n),
              min_tokens=4096) for n in (24, 64)),
    # static plans replayed from CUDA graphs show the transports' device time without the host's
    *(Variant(f"{v.impl} {transport}", v.dispatcher, lambda T, R, v=v, transport=transport:
              dict(v.options(T, R), transport=transport)) for v in STATIC_VARIANTS for transport in ("nccl", "nvlink")),
)
# Implementations with static shapes and no host sync: --cuda-graph also times their replays.
CAPTURABLE = ("deepep_ll", "deepep_ll nccl", "deepep_ll nvlink", "deepep_ll" + FP8,
              *(f"{v.impl}{transport}" for v in STATIC_VARIANTS for transport in ("", " nccl", " nvlink")))

# Intermediate size of the torch runner that prepares combine inputs (a multiple of 16 elements keeps
# torch._grouped_mm's alignment rules happy in bf16).
_PREP_INTERMEDIATE = 64


def uniform_topk(gen: torch.Generator, num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """[T, K] int32: K distinct experts per token, uniform over E (no -1 slots)."""
    if num_tokens == 0:
        return torch.zeros(0, top_k, dtype=torch.int32)
    return torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)


def zipf_topk(gen: torch.Generator, num_tokens: int, num_experts: int, top_k: int, exponent: float,
              order_seed: Optional[int] = None) -> torch.Tensor:
    """[T, K] int32: K distinct experts per token drawn without replacement with probability
    proportional to 1 / popularity_rank**exponent. order_seed None: expert e has rank e + 1 (expert 0
    is the hottest, so the default contiguous placement puts the hottest experts on rank 0); an int:
    ranks from a permutation seeded by it. Either way the same hot experts on every rank."""
    if num_tokens == 0:
        return torch.zeros(0, top_k, dtype=torch.int32)
    log_p = -exponent * torch.arange(1, num_experts + 1, dtype=torch.float64).log()
    if order_seed is not None:
        log_p = log_p[torch.randperm(num_experts, generator=torch.Generator().manual_seed(order_seed)).argsort()]
    # Gumbel top-k: the K largest of log p + Gumbel noise are a draw without replacement.
    u = torch.rand(num_tokens, num_experts, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)
    return (log_p - (-u.log()).log()).topk(top_k, dim=1).indices.to(torch.int32)


def routing_topk(routing: str, gen: torch.Generator, num_tokens: int, num_experts: int, top_k: int,
                 seed: int = 0) -> torch.Tensor:
    """[T, K] int32 for a --routing spec: "uniform", "zipf:S" (expert 0 hottest) or "zipf:S:shuffled"
    (hot experts spread by a permutation seeded by `seed`)."""
    kind, exponent, shuffled = parse_routing(routing)
    if kind == "uniform":
        return uniform_topk(gen, num_tokens, num_experts, top_k)
    return zipf_topk(gen, num_tokens, num_experts, top_k, exponent, seed if shuffled else None)


def parse_routing(routing: str) -> tuple[str, float, bool]:
    """(kind, exponent, shuffled) of a --routing spec; an error naming the value and what is allowed."""
    kind, _, rest = routing.partition(":")
    if kind == "uniform" and not rest:
        return "uniform", 0.0, False
    value, _, order = rest.partition(":")
    if kind == "zipf" and order in ("", "shuffled"):
        try:
            exponent = float(value)
        except ValueError:
            exponent = -1.0
        if 0 <= exponent < float("inf"):
            return "zipf", exponent, order == "shuffled"
    raise ValueError(f"routing={routing!r}; allowed: uniform, zipf:S or zipf:S:shuffled with a number S >= 0 "
                     f"(e.g. zipf:1.2)")


def tokens_per_destination(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """[T, R] bool: token t goes to rank r (owns >= 1 of its experts, under the default placement)."""
    from ..placement import ExpertPlacement

    owner = ExpertPlacement(num_experts, ep_size).rank_of(topk_ids.long())
    return (owner.unsqueeze(2) == torch.arange(ep_size, device=topk_ids.device)).any(1)


def bytes_leaving_rank(topk_ids: torch.Tensor, num_experts: int, ep_size: int, rank: int,
                       hidden_size: int, itemsize: int) -> int:
    """Payload bytes this rank sends to other ranks in one dispatch (each token once per rank)."""
    per_rank = tokens_per_destination(topk_ids, num_experts, ep_size).sum(0)
    return int(per_rank.sum() - per_rank[rank]) * hidden_size * itemsize


def dispatch_suite(settings: Settings, group: Any, device: torch.device, progress: bool) -> Results:
    """Every registered dispatcher (and the all_to_all_single baseline) on this rank; collective."""
    from .. import dispatchers
    from ..config import MoeConfig
    from ..routing import TopKOutput

    rank, R = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[settings.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    chosen = [n for n in dispatchers.registered() if settings.dispatchers is None or n in settings.dispatchers]
    variants = [Variant(n, n) for n in chosen] + [v for v in STATIC_VARIANTS if v.dispatcher in chosen]
    if device.type == "cuda" and R > 1:  # the transports differ only there
        variants += [v for v in TRANSPORT_VARIANTS if v.dispatcher in chosen]
    if settings.fp8:  # bytes and GB/s of these rows count the tokens' dtype (what the fp8 rows stand for)
        variants += [Variant(n + FP8, n, lambda T, R: dict(use_fp8=True)) for n in chosen if n in FP8_DISPATCHERS]
    graphs = settings.cuda_graph and device.type == "cuda"
    timing = settings.timing(device, group)
    results = Results()
    bar = Progress(len(settings.cases()) * len(settings.tokens) * (1 + len(variants)), progress and rank == 0,
                   "dispatch")
    try:
        for E, K, H in settings.cases():
            if E % R:
                raise ValueError(f"num_experts={E} is not divisible by the {R} ranks; pick --experts divisible by {R}")
            config = MoeConfig(E, K, H, settings.intermediate_size)
            # Combine needs expert outputs in each format's layout: the torch runner makes them once per
            # input with a small intermediate size (dispatch and combine never look at I).
            prep_config = MoeConfig(E, K, H, _PREP_INTERMEDIATE)
            made = {v.impl: _make(v, config, prep_config, group, dtype, device, T=0, R=R)
                    for v in variants if v.options is None}
            for T in settings.tokens:
                shape = dict(num_experts=E, top_k=K, hidden_size=H, tokens_per_rank=T)
                if settings.routing != "uniform":
                    shape["routing"] = settings.routing
                gen = torch.Generator().manual_seed(settings.seed * 1000003 + rank * 7919 + T)
                xs, topks, sent_bytes = [], [], []
                for _ in range(settings.rotate):
                    ids = routing_topk(settings.routing, gen, T, E, K, seed=settings.seed)
                    weights = torch.rand(T, K, generator=gen) + 0.1
                    xs.append(torch.randn(T, H, generator=gen).to(dtype).to(device))
                    topks.append(TopKOutput(ids.to(device), weights.to(device)))
                    sent_bytes.append(bytes_leaving_rank(ids, E, R, rank, H, itemsize))
                mean_bytes = statistics.fmean(sent_bytes)
                bytes_per_rank = sum_over_group([mean_bytes], group, device)[0] / R  # mean over ranks and inputs

                for op, stats in _time_all_to_all(xs, topks, E, R, group, timing, graphs):
                    results.dispatch.append(_dispatch_row(BASELINE, op, shape, stats, bytes_per_rank, R, dtype))
                bar.step(f"a2a T={T}")
                for v in variants:
                    bar.step(f"{v.impl} T={T}")
                    if T < v.min_tokens:
                        continue
                    entry = made[v.impl] if v.options is None else _make(v, config, prep_config, group, dtype,
                                                                          device, T=T, R=R)
                    if isinstance(entry, Exception):
                        results.skipped.append(dict(suite="dispatch", impl=v.impl, **shape, reason=reason(entry)))
                        continue
                    disp = entry[0]
                    moved = bytes_per_rank if (disp.shards_experts and R > 1) else 0.0
                    for op, outcome in _time_dispatcher(*entry, xs, topks, timing, graphs and v.impl in CAPTURABLE):
                        if isinstance(outcome, Exception):
                            results.skipped.append(dict(suite="dispatch", impl=v.impl, **shape,
                                                        reason=f"{op}: {reason(outcome)}"))
                            continue
                        round_trip = op.startswith("round_trip")
                        results.dispatch.append(_dispatch_row(v.impl, op, shape, outcome,
                                                              2 * moved if round_trip else moved, R, dtype))
                    del entry, disp
            del made
        _add_baseline_ratios(results.dispatch)
    finally:
        bar.close()
    return results


def _make(variant: Variant, config, prep_config, group, dtype: torch.dtype, device: torch.device, T: int, R: int):
    """(dispatcher, torch MoeRunner over its placement, random expert weights), or the exception
    that says why this variant cannot run here (reported, not fatal)."""
    from .. import dispatchers, runners
    from ..config import ExpertWeights
    from ..runner_core import MoeRunner

    try:
        options = variant.options(T, R) if variant.options is not None else {}
        disp = dispatchers.create(variant.dispatcher, config, group=group, **options)
        L, H, inter = disp.placement.num_local_experts, prep_config.hidden_size, prep_config.intermediate_size
        weights = ExpertWeights(torch.randn(L, prep_config.w13_rows, H, dtype=dtype, device=device) * H ** -0.5,
                                torch.randn(L, H, inter, dtype=dtype, device=device) * inter ** -0.5)
        return disp, MoeRunner(runners.create("torch", prep_config), prep_config, disp.placement), weights
    except Exception as err:  # noqa: BLE001 - a dispatcher that cannot run here is reported, not fatal
        return err


def _takes_handle(disp) -> bool:
    """Whether dispatch accepts the handle of an earlier dispatch with the same routing (DeepEP's)."""
    return "handle" in inspect.signature(disp.dispatch).parameters


@torch.no_grad()
def _time_dispatcher(disp, runner, expert_weights, xs, topks, timing: dict,
                     graphs: bool) -> Iterator[tuple[str, "Stats | Exception"]]:
    """Yield (op, Stats or the exception that stopped it) for dispatch, dispatch with a reused handle,
    combine and round trip over the rotated inputs (and their graph replays when `graphs`)."""
    from ..runner_core import CombineInput

    rot = len(xs)
    rows, outs = [], []
    try:
        for k in range(rot):  # expert outputs per rotated input, in the format's layout (untimed)
            out = disp.dispatch(xs[k], topks[k])
            combine_input = runner.run(out, expert_weights)
            rows.append(combine_input.hidden_states.detach().clone())
            outs.append(out)
            disp.combine(combine_input)
    except Exception as err:  # noqa: BLE001 - e.g. T over a static buffer's capacity
        yield "dispatch", err
        return

    def dispatch(i):
        return disp.dispatch(xs[i % rot], topks[i % rot])

    def dispatch_reused_handle(i):
        return disp.dispatch(xs[i % rot], topks[i % rot], handle=outs[i % rot].handle)

    def combine_after(i, dispatch_output):  # keeps dispatch/combine paired for stateful dispatchers
        disp.combine(CombineInput(rows[i % rot], dispatch_output))

    def dispatched(i):
        return i, dispatch(i)

    def combine(arg):
        i, dispatch_output = arg
        return disp.combine(CombineInput(rows[i % rot], dispatch_output))

    def round_trip(i):
        return disp.combine(CombineInput(rows[i % rot], dispatch(i)))

    ops = [("dispatch", lambda: measure(dispatch, teardown=combine_after, **timing))]
    if _takes_handle(disp):
        ops.append(("dispatch (reused handle)", lambda: measure(dispatch_reused_handle, teardown=combine_after,
                                                                **timing)))
    ops += [("combine", lambda: measure(combine, setup=dispatched, **timing)),
            ("round_trip", lambda: measure(round_trip, **timing))]
    if graphs:
        # Replays of the combine read the eager dispatch outputs made above (static shapes).
        graph = dict(rotate=rot, before_capture=disp.raise_deferred, **timing)
        ops += [("dispatch" + GRAPH, lambda: measure_cuda_graph(dispatch, **graph)),
                ("combine" + GRAPH, lambda: measure_cuda_graph(
                    lambda k: disp.combine(CombineInput(rows[k], outs[k])), **graph)),
                ("round_trip" + GRAPH, lambda: measure_cuda_graph(round_trip, **graph))]
    for op, timed in ops:
        try:
            yield op, timed()
        except Exception as err:  # noqa: BLE001 - e.g. T over a static buffer's capacity, not capturable
            yield op, err
            if not op.endswith(GRAPH):
                return  # the eager ops share one state: stop at the first failure


def _time_all_to_all(xs, topks, E: int, R: int, group, timing: dict, graphs: bool) -> Iterator[tuple[str, Stats]]:
    """Raw all_to_all_single with the split sizes a dispatch of the same routing needs (each token
    once per destination rank, this rank included), over the same rotated inputs."""
    sends, recvs, in_splits, out_splits = [], [], [], []
    for x, (ids, _) in zip(xs, topks):
        dest = tokens_per_destination(ids, E, R)  # [T, R]
        counts = dest.sum(0)
        sends.append(torch.cat([x[dest[:, r]] for r in range(R)]) if x.shape[0] else x)
        if R > 1:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=group)
        else:
            recv_counts = counts
        in_splits.append(counts.tolist())
        out_splits.append(recv_counts.tolist())
        recvs.append(x.new_empty(int(recv_counts.sum()), x.shape[1]))
    rot = len(xs)

    def a2a(i):
        k = i % rot
        dist.all_to_all_single(recvs[k], sends[k], out_splits[k], in_splits[k], group=group)

    yield "all_to_all", measure(a2a, **timing)
    if graphs:
        yield "all_to_all" + GRAPH, measure_cuda_graph(a2a, rotate=rot, **timing)


def _dispatch_row(impl: str, op: str, shape: dict, stats: Stats, moved_bytes: float, R: int,
                  dtype: torch.dtype) -> dict:
    gbps = moved_bytes / (stats.median_us * 1e-6) / 1e9 if moved_bytes > 0 and stats.median_us > 0 else None
    return dict(impl=impl, op=op, **shape, world_size=R, dtype=dtype_name(dtype),
                bytes_per_rank=moved_bytes, gbps=gbps, **asdict(stats))


def _add_baseline_ratios(rows: list[dict]) -> None:
    """vs_baseline: GB/s relative to all_to_all_single moving the same rows (round trip: both ways),
    timed the same way (graph replays against the baseline's graph replays). vs_unquantized (the
    " fp8" rows of --fp8): median time over the same dispatcher's without use_fp8, same op and shape,
    same run (the fp8 dispatch target is a time ratio of the same dispatcher)."""
    keys = ("num_experts", "top_k", "hidden_size", "tokens_per_rank")
    base = {(*(r[k] for k in keys), r["op"]): r for r in rows if r["impl"] == BASELINE}
    by_impl = {(r["impl"], *(r[k] for k in keys), r["op"]): r for r in rows}
    for r in rows:
        b = base.get((*(r[k] for k in keys), "all_to_all" + (GRAPH if r["op"].endswith(GRAPH) else "")))
        r["vs_baseline"] = (r["gbps"] / b["gbps"]) if (b and r["gbps"] and b["gbps"]) else None
        fp8 = r["impl"].endswith(FP8)
        plain = by_impl.get((r["impl"].removesuffix(FP8), *(r[k] for k in keys), r["op"])) if fp8 else None
        r["vs_unquantized"] = (r["median_us"] / plain["median_us"]) if plain and plain["median_us"] > 0 else None
