"""The overlap suite: one EPMoE layer step split in two micro-batches, run sequentially (dispatch,
experts, combine of the first, then of the second) and overlapped (each exchange on the device's
communication stream while the other micro-batch's experts run), timed on the same inputs, with the
overlapped outputs checked bit-identical to the sequential ones.

Implementations: deepep_normal with its host plan (prefill as it comes), deepep_normal static
(num_worst_tokens: no host sync, what a prefill step that wants overlap uses) and deepep_ll (decode;
with --cuda-graph also as CUDA-graph replays, the decode target). `run_sequential` and
`run_overlapped` are the two schedules (examples/two_batch_overlap.py uses them too).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .settings import DTYPES, Progress, Results, Settings, dtype_name, reason
from .timing import Stats, capture_graphs, measure_interleaved

MICRO_BATCHES = 2
# Largest expert-major receive buffer (deepep_ll's [L, M*R, H]) the suite allocates per micro-batch.
_LL_BUFFER_LIMIT_BYTES = 4 << 30


@dataclass(frozen=True)
class OverlapVariant:
    """A timed layer: row label, dispatcher, its options for T tokens per micro-batch on R ranks,
    and whether its step captures into a CUDA graph."""

    impl: str
    dispatcher: str
    options: Callable[[int, int], dict]
    capturable: bool = False


VARIANTS = (
    OverlapVariant("deepep_normal", "deepep_normal", lambda T, R: {}),
    OverlapVariant("deepep_normal static", "deepep_normal",
                   lambda T, R: dict(num_worst_tokens=max(T, 1) * R, num_max_dispatch_tokens_per_rank=max(T, 1)),
                   capturable=True),
    OverlapVariant("deepep_ll", "deepep_ll", lambda T, R: dict(num_max_dispatch_tokens_per_rank=max(T, 1)),
                   capturable=True),
)

# On GPUs of one host, again through the NVLink transport: its copy engines move the rows without
# taking SMs from the other micro-batch's experts (NCCL's kernels do take them).
NVLINK_VARIANTS = (
    OverlapVariant("deepep_normal nvlink", "deepep_normal", lambda T, R: dict(transport="nvlink")),
    OverlapVariant("deepep_ll nvlink", "deepep_ll",
                   lambda T, R: dict(num_max_dispatch_tokens_per_rank=max(T, 1), transport="nvlink"), capturable=True),
)


def expert_weights(expert: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                   device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert `expert`'s (w13 [2I, H], w2 [H, I]), drawn on `device` from a generator seeded by
    (seed, expert): the same on every rank of one device type, and fast for DeepSeek-V3-sized layers."""
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + expert)
    w13 = torch.randn(2 * intermediate_size, hidden_size, generator=gen, device=device) * hidden_size ** -0.5
    w2 = torch.randn(hidden_size, intermediate_size, generator=gen, device=device) * intermediate_size ** -0.5
    return w13.to(dtype), w2.to(dtype)


def build_layer(num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, dispatcher: str,
                dispatcher_options: dict, group: Any, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """An EPMoE (runner "auto" for `device`) built on the meta device and given this rank's experts
    from expert_weights: drawing 128 DeepSeek-V3 experts on the CPU, as a fresh layer does, takes
    about a minute; this takes a moment."""
    from .. import dispatchers, envs, runners
    from ..layer import EPMoE

    runner = runners.resolve(envs.get("RUNNER"), device, dispatchers.get(dispatcher).format)
    layer = EPMoE(num_experts, top_k, hidden_size, intermediate_size, dispatcher=dispatcher, runner=runner,
                  group=group, dtype=dtype, device="meta", dispatcher_options=dispatcher_options)
    layer.to_empty(device=device)
    with torch.no_grad():
        for local, expert in enumerate(layer.placement.local_expert_ids().tolist()):
            w13, w2 = expert_weights(expert, hidden_size, intermediate_size, dtype, device, seed)
            layer.w13[local].copy_(w13)
            layer.w2[local].copy_(w2)
    return layer


def run_sequential(layer, batches: Iterable[tuple[torch.Tensor, Any]]) -> list[torch.Tensor]:
    """Each micro-batch (x [T, H], TopKOutput of the router's ids, as the layer's forward takes them)
    through dispatch, experts and combine, one after the other: layer(x, topk) each, the layer's shared
    experts added as its forward adds them. As in the layer's forward, the ids go to the layer's physical
    slots (its copies of experts, after a rebalance) and the pairs are counted in expert_load."""
    if layer.shared_experts is None:
        return [layer._routed(x, topk) for x, topk in _checked(layer, batches)]
    return [routed + shared for routed, shared in (layer._routed_and_shared(x, topk, layer.shared_experts)
                                                   for x, topk in _checked(layer, batches))]


def _checked(layer, batches: Iterable[tuple[torch.Tensor, Any]]) -> list[tuple[torch.Tensor, Any]]:
    """_pairs(batches), each x checked as the layer's forward checks it (its dtype and device, cast under
    torch.autocast) before anything is dispatched: an x of another dtype failed in the runner, after its
    dispatch, naming w13. On one rank only, its error joins the others' first dispatch (join_with_bad_input),
    so they raise too."""
    try:
        return [(layer._checked_tokens(x), topk) for x, topk in _pairs(batches)]
    except Exception as error:
        layer.dispatcher.join_with_bad_input(error)
        raise


def _pairs(batches: Iterable[tuple[torch.Tensor, Any]]) -> list[tuple[torch.Tensor, Any]]:
    """batches (any iterable: a list, a zip) as a list, checked: (x, topk) pairs (an (x, ids, weights) triple
    failed deep inside the layer with "got multiple values for argument 'async_op'"); none: nothing to run."""
    batches = list(batches)
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            what = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
            raise ValueError(f"batches[{i}] is {what}; allowed: a pair (x [T, H], topk), topk an ep.TopKOutput or an "
                             f"(ids, weights) pair: write (x, (ids, weights)), not (x, ids, weights)")
    return batches


_INPUTS_READY: dict = {}  # device -> the stream run_overlapped issues later dispatches from


def run_overlapped(layer, batches: Iterable[tuple[torch.Tensor, Any]]) -> list[torch.Tensor]:
    """The same work, exchanges asynchronous: per micro-batch wait for its dispatch, queue its experts,
    then issue the next micro-batch's dispatch (its host work, e.g. a count-table read, runs while the
    device computes these experts, and its exchange overlaps them) and this one's combine (which
    overlaps the next micro-batch's experts); wait for the combines last. The layer's shared experts (if
    any) run on every micro-batch before the first dispatch is issued (on CUDA on the layer's side stream,
    beside the exchanges: EPMoE._start_shared) and are added last, as run_sequential adds them.

    On CUDA an exchange is ordered after everything queued on its caller's current stream, so the next
    micro-batch's dispatch is issued from a stream that has waited for the inputs only: issued from the
    caller's stream it would wait behind the experts just queued there and overlap nothing (measured on
    2x H200: the next dispatch's first kernel started only when the previous experts ended)."""
    batches = _checked(layer, batches)
    if not batches:
        return []
    device = batches[0][0].device
    caller = torch.cuda.current_stream(device) if device.type == "cuda" else None
    inputs_ready = None  # CUDA: a stream holding nothing but a wait for the work queued before this call
    if caller is not None:
        if device not in _INPUTS_READY:
            _INPUTS_READY[device] = torch.cuda.Stream(device)
        inputs_ready = _INPUTS_READY[device]
        inputs_ready.wait_stream(caller)
    shared = None if layer.shared_experts is None else layer._start_shared(layer.shared_experts,
                                                                        [x for x, _ in batches])
    pending = layer._dispatch(*batches[0], async_op=True)  # ((output, work), the physical ids sent)
    combined = []
    for i in range(len(batches)):
        (out, work), physical = pending
        with layer._naming_logical_ids(batches[i][1], physical):
            work.wait()
        layer._count_load(out, physical)
        expert_out = layer.runner.run(out, layer.weights)
        if i + 1 < len(batches):
            try:
                with torch.cuda.stream(inputs_ready) if inputs_ready is not None else contextlib.nullcontext():
                    pending = layer._dispatch(*batches[i + 1], async_op=True)
            except Exception:
                # this rank's micro-batch failed its checks at the call; the other ranks' dispatch fails at its
                # wait, after they issued this combine: issue it too, so every rank's exchanges stay paired (the
                # combine missing here, the group's next exchanges paired with theirs out of order: a timeout)
                layer.dispatcher.combine(expert_out, async_op=True)
                raise
        combined.append(layer.dispatcher.combine(expert_out, async_op=True))
    for _, work in combined:
        work.wait()
    if caller is not None:  # joins the side stream back (a CUDA-graph capture needs every fork joined)
        caller.wait_stream(inputs_ready)
    ys = [y for y, _ in combined]
    if shared is None:
        return ys
    return [y + s for y, s in zip(ys, layer._finish_shared(shared, ys))]


def overlap_suite(settings: Settings, group: Any, device: torch.device, progress: bool) -> Results:
    """Every variant (of settings.dispatchers) at each T (tokens per micro-batch and rank); collective."""
    from ..routing import TopKOutput
    from .dispatch import uniform_topk

    rank, R = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[settings.dtype]
    nvlink = NVLINK_VARIANTS if device.type == "cuda" and R > 1 else ()
    variants = [v for v in VARIANTS + nvlink if settings.dispatchers is None or v.dispatcher in settings.dispatchers
                or v.impl in settings.dispatchers]
    graphs = settings.cuda_graph and device.type == "cuda"
    timing = settings.timing(device, group)
    results = Results()
    bar = Progress(len(settings.cases()) * len(settings.tokens) * len(variants), progress and rank == 0, "overlap")
    try:
        for E, K, H in settings.cases():
            I = settings.intermediate_size  # noqa: E741
            for T in settings.tokens:
                shape = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, tokens_per_rank=T,
                             micro_batches=MICRO_BATCHES)
                gen = torch.Generator().manual_seed(settings.seed * 1000003 + rank * 7919 + T)
                inputs = []
                for _ in range(settings.rotate):
                    inputs.append([(torch.randn(T, H, generator=gen).to(dtype).to(device),
                                    TopKOutput(uniform_topk(gen, T, E, K).to(device),
                                               (torch.rand(T, K, generator=gen) + 0.1).to(device)))
                                   for _ in range(MICRO_BATCHES)])
                for v in variants:
                    bar.step(f"{v.impl} T={T}")
                    skip = dict(suite="overlap", impl=v.impl, num_experts=E, top_k=K, hidden_size=H,
                                tokens_per_rank=T)
                    L = E // R if E % R == 0 else E
                    if v.dispatcher == "deepep_ll" and L * T * R * H * dtype.itemsize > _LL_BUFFER_LIMIT_BYTES:
                        results.skipped.append(dict(skip, reason=f"expert-major buffer [L={L}, M*R={T * R}, H={H}] "
                                                                 f"over {_LL_BUFFER_LIMIT_BYTES >> 30} GiB"))
                        continue
                    rows = []
                    try:
                        layer = build_layer(E, K, H, I, v.dispatcher, v.options(T, R), group, dtype, device,
                                            settings.seed)
                        rows.append(_time_eager(layer, inputs, timing, group, device))
                        if graphs and v.capturable:
                            rows.append(_time_graphs(layer, inputs, timing, group, device))
                    except Exception as err:  # noqa: BLE001 - reported, the suite goes on
                        results.skipped.append(dict(skip, reason=("graph: " if rows else "") + reason(err)))
                    finally:
                        layer = None
                    for mode, sequential, overlapped, identical in rows:
                        results.overlap.append(dict(impl=v.impl, mode=mode, **shape, world_size=R,
                                                    dtype=dtype_name(dtype), identical=identical,
                                                    sequential=asdict(sequential), overlapped=asdict(overlapped),
                                                    ratio=overlapped.median_us / sequential.median_us
                                                    if sequential.median_us > 0 else None))
    finally:
        bar.close()
    return results


@torch.inference_mode()
def _time_eager(layer, inputs: list, timing: dict, group: Any, device: torch.device
                ) -> tuple[str, Stats, Stats, bool]:
    """(mode, sequential Stats, overlapped Stats, bit-identical on every rank), eager calls."""
    rot = len(inputs)
    identical = all(all(torch.equal(a, b) for a, b in zip(run_sequential(layer, batches),
                                                          run_overlapped(layer, batches))) for batches in inputs)
    sequential, overlapped = measure_interleaved((lambda i: run_sequential(layer, inputs[i % rot]),
                                                  lambda i: run_overlapped(layer, inputs[i % rot])), **timing)
    return "eager", sequential, overlapped, _all_ranks(identical, group, device)


@torch.inference_mode()
def _time_graphs(layer, inputs: list, timing: dict, group: Any, device: torch.device
                 ) -> tuple[str, Stats, Stats, bool]:
    """The same as CUDA-graph replays: both schedules captured per rotated input; identical compares the
    replays' outputs with the eager sequential run's."""
    rot = len(inputs)
    eager = [run_sequential(layer, batches) for batches in inputs]
    flush = layer.dispatcher.raise_deferred  # the warm-up's deferred checks, before each capture
    sequential, seq_out = capture_graphs(lambda k: run_sequential(layer, inputs[k]), rot, device, before_capture=flush)
    overlapped, over_out = capture_graphs(lambda k: run_overlapped(layer, inputs[k]), rot, device, before_capture=flush)
    try:
        for k in range(rot):
            sequential[k].replay()
            overlapped[k].replay()
        torch.cuda.synchronize(device)
        same = all(torch.equal(a, b) and torch.equal(a, c)
                   for k in range(rot) for a, b, c in zip(eager[k], seq_out[k], over_out[k]))
        times = measure_interleaved((lambda i: sequential[i % rot].replay(), lambda i: overlapped[i % rot].replay()),
                                    device_only=True, **timing)
        return ("graph", *times, _all_ranks(same, group, device))
    finally:
        torch.cuda.synchronize(device)
        for g in sequential + overlapped:  # a graph holding NCCL work must go before the group does
            g.reset()


def _all_ranks(flag: bool, group: Any, device: torch.device) -> bool:
    if group is None or dist.get_world_size(group) == 1:
        return flag
    t = torch.tensor([int(flag)], device=device if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def overlap_rows(results: Results) -> Optional[tuple[list[str], list[list[str]]]]:
    """(header, rows) of the overlap table, or None without results."""
    if not results.overlap:
        return None
    header = ["E", "K", "H", "I", "T/rank", "impl", "mode", "sequential us", "overlapped us",
              "host us (seq/ovl)", "ratio", "identical"]
    rows = [[str(r["num_experts"]), str(r["top_k"]), str(r["hidden_size"]), str(r["intermediate_size"]),
             f"{r['micro_batches']}x{r['tokens_per_rank']}", r["impl"], r["mode"],
             f"{r['sequential']['median_us']:.1f}", f"{r['overlapped']['median_us']:.1f}",
             f"{r['sequential'].get('host_us') or 0:.0f}/{r['overlapped'].get('host_us') or 0:.0f}",
             "-" if r["ratio"] is None else f"{r['ratio']:.3f}", "yes" if r["identical"] else "NO"]
            for r in results.overlap]
    return header, rows
