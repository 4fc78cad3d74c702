"""`ep-runtime bench`: how fast are the dispatchers and runners on this machine.

Two suites, over sweeps of tokens per rank T (and optionally H, E, K), for a model preset:

- dispatch: every registered dispatcher's dispatch, combine and round trip (dispatch + combine, no
  expert compute) across the ranks of the group, next to raw `dist.all_to_all_single` moving the
  same rows (the baseline, measured in the same run). Bytes are counted from the routing: a token
  leaves its rank once per other rank owning >= 1 of its experts, H * itemsize bytes each time.
- runner: every available runner backend on one rank computing that rank's share of the experts
  (L = E / R local experts, T*K (token, expert) pairs routed uniformly over them), next to the torch
  runner. FLOPs: 2*3*H*I per computed pair (gated; 2*2*H*I not gated); bytes: the expert weights of
  every expert that received >= 1 pair, read once.

Timing: on CUDA one pair of CUDA events per repeat (optionally CUDA-graph replay for the runner
suite); on CPU wall time. Every measurement has warm-up repeats, then `--repeats` timed repeats over
`--rotate` different inputs (so caches do not flatter), each repeat preceded by an untimed barrier
across the group; a repeat's time is the slowest rank's. Reported: median, p10, p90, mean, min.

Launch: under torchrun / srun / mpirun every rank joins the job's group (NCCL on GPUs); with no
launcher it spawns `--world-size` local CPU ranks (gloo) for the dispatch suite and runs the runner
suite in this process.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

# ---------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """One model's MoE layer shape and the default sweep of tokens per rank."""

    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    tokens_gpu: tuple[int, ...] = (1, 8, 32, 128, 512, 2048, 4096)
    tokens_cpu: tuple[int, ...] = (1, 16)
    note: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("tiny", 16, 4, 256, 128, tokens_gpu=(1, 16, 128, 1024), tokens_cpu=(8, 32, 128),
           note="small shapes for CPU and CI"),
    Preset("mixtral-8x7b", 8, 2, 4096, 14336, note="Mixtral 8x7B: E=8, K=2, H=4096, I=14336"),
    Preset("qwen3-moe-30b-a3b", 128, 8, 2048, 768, note="Qwen3-30B-A3B: E=128, K=8, H=2048, I=768"),
    Preset("deepseek-v3", 256, 8, 7168, 2048, note="DeepSeek-V3 routed experts: E=256, K=8, H=7168, I=2048"),
)}

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

# ---------------------------------------------------------------- timing


@dataclass
class Stats:
    """Times of one measurement in microseconds (a repeat's time is its slowest rank's)."""

    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    min_us: float
    repeats: int
    method: str  # "cuda_events" | "cuda_graph" | "wall"

    @classmethod
    def from_seconds(cls, seconds: Sequence[float], method: str) -> "Stats":
        us = sorted(s * 1e6 for s in seconds)
        return cls(percentile(us, 50), percentile(us, 10), percentile(us, 90), statistics.fmean(us), us[0],
                   len(us), method)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) of already sorted values, linear interpolation (numpy's default)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(fn: Callable[[Any], Any], *, repeats: int, warmup: int, device: torch.device,
            setup: Optional[Callable[[int], Any]] = None, teardown: Optional[Callable[[Any, Any], None]] = None,
            group: Optional[Any] = None) -> Stats:
    """Time fn(arg) `repeats` times after `warmup` untimed calls.

    arg = setup(i) (untimed; default i, the repeat index: use i % rotate to pick rotated inputs);
    teardown(arg, result) runs untimed after each call. With a process group, every repeat starts
    after a barrier and its time is the maximum over the group's ranks. On CUDA the time is between
    two CUDA events around fn on the current stream; on CPU it is wall time.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # noqa: E731
    barrier = (lambda: dist.barrier(group=group)) if group is not None else (lambda: None)  # noqa: E731
    events = []
    seconds = []
    for i in range(warmup + repeats):
        arg = setup(i) if setup is not None else i
        sync()
        barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(arg)
            end.record()
            if i >= warmup:
                events.append((start, end))
        else:
            t0 = time.perf_counter()
            result = fn(arg)
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                seconds.append(elapsed)
        if teardown is not None:
            teardown(arg, result)
    sync()
    if cuda:
        seconds = [start.elapsed_time(end) * 1e-3 for start, end in events]
    seconds = _max_over_group(seconds, group, device)
    return Stats.from_seconds(seconds, "cuda_events" if cuda else "wall")


def measure_cuda_graph(fn: Callable[[int], Any], *, repeats: int, warmup: int, rotate: int,
                       device: torch.device) -> Stats:
    """Capture fn(k) for each rotation slot k into a CUDA graph, then time replays with CUDA events.
    Raises when fn cannot be captured (a host sync, a collective on another rank, ...)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for k in range(rotate):  # warm-up on a side stream, as torch.cuda.graphs recommends
            fn(k)
    torch.cuda.current_stream(device).wait_stream(stream)
    graphs = []
    for k in range(rotate):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(k)
        graphs.append(graph)
    stats = measure(lambda i: graphs[i % rotate].replay(), repeats=repeats, warmup=warmup, device=device)
    stats.method = "cuda_graph"
    return stats


def _max_over_group(seconds: list[float], group: Optional[Any], device: torch.device) -> list[float]:
    if group is None or dist.get_world_size(group) == 1:
        return seconds
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(seconds, dtype=torch.float64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _sum_over_group(values: list[float], group: Optional[Any], device: torch.device) -> list[float]:
    if group is None or dist.get_world_size(group) == 1:
        return values
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t, group=group)
    return t.tolist()


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything one bench run needs; plain values so it pickles to spawned ranks."""

    preset: str
    tokens: list[int]
    hidden_sizes: list[int]
    num_experts: list[int]
    top_ks: list[int]
    intermediate_size: int
    dtype: str
    suites: list[str]
    dispatchers: Optional[list[str]]
    runners: Optional[list[str]]
    runner_ep_size: Optional[int]
    warmup: int
    repeats: int
    rotate: int
    cuda_graph: bool
    seed: int
    progress: bool
    command: str = "ep-runtime bench"

    def cases(self) -> list[tuple[int, int, int]]:
        """(E, K, H) of every swept layer shape."""
        return list(itertools.product(self.num_experts, self.top_ks, self.hidden_sizes))


@dataclass
class Results:
    meta: dict = field(default_factory=dict)
    dispatch: list[dict] = field(default_factory=list)
    runner: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


class _Progress:
    """tqdm on rank 0 when asked for and installed; otherwise silent."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled and total:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit="bench", leave=False, file=sys.stderr)

    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- routing and bytes


def uniform_topk(gen: torch.Generator, num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """[T, K] int32: K distinct experts per token, uniform over E (no -1 slots)."""
    if num_tokens == 0:
        return torch.zeros(0, top_k, dtype=torch.int32)
    return torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)


def tokens_per_destination(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """[T, R] bool: token t goes to rank r (owns >= 1 of its experts; expert e lives on e // (E/R))."""
    L = num_experts // ep_size
    ids = topk_ids.long()
    valid = ids >= 0
    owner = torch.where(valid, ids // L, -1)
    return (owner.unsqueeze(2) == torch.arange(ep_size, device=ids.device)).any(1)


def bytes_leaving_rank(topk_ids: torch.Tensor, num_experts: int, ep_size: int, rank: int,
                       hidden_size: int, itemsize: int) -> int:
    """Payload bytes this rank sends to other ranks in one dispatch (each token once per rank)."""
    per_rank = tokens_per_destination(topk_ids, num_experts, ep_size).sum(0)
    return int(per_rank.sum() - per_rank[rank]) * hidden_size * itemsize


# ---------------------------------------------------------------- dispatch suite

# Intermediate size of the torch runner that prepares combine inputs (a multiple of 16 elements keeps
# torch._grouped_mm's alignment rules happy in bf16).
_PREP_INTERMEDIATE = 64


def dispatch_suite(settings: Settings, group: Any, device: torch.device, progress: bool) -> Results:
    """Every registered dispatcher (and the all_to_all_single baseline) on this rank; collective."""
    from . import dispatchers
    from .config import MoeConfig
    from .routing import TopKOutput

    rank, R = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[settings.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    names = [n for n in dispatchers.registered() if settings.dispatchers is None or n in settings.dispatchers]
    results = Results()
    total = len(settings.cases()) * len(settings.tokens) * (1 + 3 * len(names))
    bar = _Progress(total, progress and rank == 0, "dispatch")
    timing = dict(repeats=settings.repeats, warmup=settings.warmup, device=device, group=group)
    try:
        for E, K, H in settings.cases():
            if E % R:
                raise ValueError(f"num_experts={E} is not divisible by the {R} ranks; pick --experts divisible by {R}")
            config = MoeConfig(E, K, H, settings.intermediate_size)
            # Combine needs expert outputs in each format's layout: the torch runner makes them once per
            # input with a small intermediate size (dispatch and combine never look at I).
            tiny = MoeConfig(E, K, H, _PREP_INTERMEDIATE)
            made = {}
            for name in names:
                try:
                    disp = dispatchers.create(name, config, group=group)
                    made[name] = (disp, *_combine_input_maker(disp, tiny, dtype, device))
                except Exception as err:  # noqa: BLE001 - a dispatcher that cannot run here is reported, not fatal
                    made[name] = err
            for T in settings.tokens:
                shape = dict(num_experts=E, top_k=K, hidden_size=H, tokens_per_rank=T)
                gen = torch.Generator().manual_seed(settings.seed * 1000003 + rank * 7919 + T)
                xs, topks, sent_bytes = [], [], []
                for _ in range(settings.rotate):
                    ids = uniform_topk(gen, T, E, K)
                    weights = torch.rand(T, K, generator=gen) + 0.1
                    xs.append(torch.randn(T, H, generator=gen).to(dtype).to(device))
                    topks.append(TopKOutput(ids.to(device), weights.to(device)))
                    sent_bytes.append(bytes_leaving_rank(ids, E, R, rank, H, itemsize))
                mean_bytes = statistics.fmean(sent_bytes)
                bytes_per_rank = _sum_over_group([mean_bytes], group, device)[0] / R  # mean over ranks and inputs

                baseline = _all_to_all_baseline(xs, topks, E, R, group, device, timing)
                results.dispatch.append(_dispatch_row("all_to_all_single", "all_to_all", shape, baseline,
                                                      bytes_per_rank, R, dtype))
                bar.step(f"a2a T={T}")
                for name in names:
                    if isinstance(made[name], Exception):
                        results.skipped.append(dict(suite="dispatch", impl=name, **shape, reason=_reason(made[name])))
                        for _ in range(3):
                            bar.step(name)
                        continue
                    disp, runner, expert_weights = made[name]
                    moved = bytes_per_rank if (disp.shards_experts and R > 1) else 0.0
                    try:
                        for op, stats in _time_dispatcher(disp, runner, expert_weights, xs, topks, timing):
                            results.dispatch.append(_dispatch_row(name, op, shape, stats,
                                                                  2 * moved if op == "round_trip" else moved, R, dtype))
                            bar.step(f"{name} {op} T={T}")
                    except Exception as err:  # noqa: BLE001 - e.g. T over a static buffer's capacity
                        results.skipped.append(dict(suite="dispatch", impl=name, **shape, reason=_reason(err)))
                        done = sum(1 for r in results.dispatch if r["impl"] == name and _same_case(r, shape))
                        for _ in range(3 - done):
                            bar.step(name)
            del made
        _add_baseline_ratios(results.dispatch)
    finally:
        bar.close()
    return results


def _combine_input_maker(disp, config, dtype: torch.dtype, device: torch.device):
    """A torch runner (and random weights) over `disp`'s placement, to make combine inputs once."""
    from . import runners
    from .config import ExpertWeights
    from .runner_core import MoeRunner

    L, H, I = disp.placement.num_local_experts, config.hidden_size, config.intermediate_size
    weights = ExpertWeights(torch.randn(L, config.w13_rows, H, dtype=dtype, device=device) * H ** -0.5,
                            torch.randn(L, H, I, dtype=dtype, device=device) * I ** -0.5)
    runner = MoeRunner(runners.create("torch", config), config, disp.placement)
    runner.check_format(disp.format)
    return runner, weights


@torch.no_grad()
def _time_dispatcher(disp, runner, expert_weights, xs, topks, timing):
    """Yield (op, Stats) for dispatch, combine and round_trip over the rotated inputs."""
    from .runner_core import CombineInput

    rot = len(xs)
    rows = []
    for k in range(rot):  # expert outputs per rotated input, in the format's layout (untimed)
        combine_input = runner.run(disp.dispatch(xs[k], topks[k]), expert_weights)
        rows.append(combine_input.hidden_states.detach().clone())
        disp.combine(combine_input)

    def dispatch(i):
        return disp.dispatch(xs[i % rot], topks[i % rot])

    def combine_after(i, dispatch_output):  # keeps dispatch/combine paired for stateful dispatchers
        disp.combine(CombineInput(rows[i % rot], dispatch_output))

    def dispatched(i):
        return i, dispatch(i)

    def combine(arg):
        i, dispatch_output = arg
        return disp.combine(CombineInput(rows[i % rot], dispatch_output))

    def round_trip(i):
        return disp.combine(CombineInput(rows[i % rot], dispatch(i)))

    yield "dispatch", measure(dispatch, teardown=combine_after, **timing)
    yield "combine", measure(combine, setup=dispatched, **timing)
    yield "round_trip", measure(round_trip, **timing)


def _all_to_all_baseline(xs, topks, E, R, group, device, timing) -> Stats:
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

    return measure(a2a, **timing)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dispatch_row(impl: str, op: str, shape: dict, stats: Stats, moved_bytes: float, R: int,
                  dtype: torch.dtype) -> dict:
    gbps = moved_bytes / (stats.median_us * 1e-6) / 1e9 if moved_bytes > 0 and stats.median_us > 0 else None
    return dict(impl=impl, op=op, **shape, world_size=R, dtype=_dtype_name(dtype),
                bytes_per_rank=moved_bytes, gbps=gbps, **asdict(stats))


def _same_case(row: dict, shape: dict) -> bool:
    return all(row[k] == v for k, v in shape.items())


def _add_baseline_ratios(rows: list[dict]) -> None:
    """vs_baseline: GB/s relative to all_to_all_single moving the same rows (round trip: both ways)."""
    keys = ("num_experts", "top_k", "hidden_size", "tokens_per_rank")
    base = {tuple(r[k] for k in keys): r for r in rows if r["op"] == "all_to_all"}
    for r in rows:
        b = base.get(tuple(r[k] for k in keys))
        r["vs_baseline"] = (r["gbps"] / b["gbps"]) if (b and r["gbps"] and b["gbps"]) else None


# ---------------------------------------------------------------- runner suite


def runner_problem(gen: torch.Generator, num_tokens: int, num_local_experts: int, top_k: int,
                   hidden_size: int, dtype: torch.dtype, device: torch.device):
    """One rank's runner input under uniform routing: T*K (token, expert) pairs over L local experts.

    Rows carry min(K, L) distinct local ids each (the other slots are the sink, L); with L < K there
    are ceil(T*K / L) rows so the pair count stays T*K. Returns RunnerInput and the pair count.
    """
    from .runner_core import RunnerInput

    L, K = num_local_experts, top_k
    per_row = min(K, L)
    rows = math.ceil(num_tokens * K / per_row)
    ids = torch.rand(rows, L, generator=gen).topk(per_row, dim=1).indices
    if per_row < K:
        ids = torch.cat([ids, torch.full((rows, K - per_row), L, dtype=ids.dtype)], dim=1)
    weights = torch.rand(rows, K, generator=gen) + 0.1
    mask = torch.ones(L + 1, dtype=torch.bool)
    mask[L] = False
    x = torch.randn(rows, hidden_size, generator=gen).to(dtype)
    inp = RunnerInput(x.to(device), ids.to(torch.int32).to(device), weights.to(device), mask.to(device))
    touched = int(torch.bincount(ids.reshape(-1), minlength=L + 1)[:L].gt(0).sum())
    return inp, rows * per_row, touched


def runner_suite(settings: Settings, device: torch.device, ep_size: int, progress: bool) -> Results:
    """Every available runner backend (torch first: the baseline) on this rank; no collectives."""
    from . import runners
    from .config import ExpertWeights, MoeConfig

    dtype = DTYPES[settings.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    names = [n for n in runners.available() if settings.runners is None or n in settings.runners]
    names.sort(key=lambda n: n != "torch")
    results = Results()
    bar = _Progress(len(settings.cases()) * len(settings.tokens) * len(names), progress, "runner")
    I = settings.intermediate_size
    try:
        for E, K, H in settings.cases():
            if E % ep_size:
                raise ValueError(f"num_experts={E} is not divisible by ep size {ep_size} (--runner-ep-size)")
            L = E // ep_size
            config = MoeConfig(E, K, H, I)
            gen = torch.Generator().manual_seed(settings.seed + 1)
            # Made on the device: DeepSeek-V3's 64 local experts are 2.8e9 numbers.
            weights = ExpertWeights(torch.randn(L, config.w13_rows, H, dtype=dtype, device=device) * H ** -0.5,
                                    torch.randn(L, H, I, dtype=dtype, device=device) * I ** -0.5)
            flops_per_pair = 2 * (3 if config.is_gated else 2) * H * I
            weight_bytes_per_expert = (config.w13_rows * H + H * I) * itemsize
            backends = {}
            for name in names:
                try:
                    backends[name] = runners.create(name, config)
                except Exception as err:  # noqa: BLE001
                    backends[name] = err
            for T in settings.tokens:
                shape = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, tokens_per_rank=T,
                             local_experts=L)
                problems = [runner_problem(gen, T, L, K, H, dtype, device) for _ in range(settings.rotate)]
                pairs = statistics.fmean(p[1] for p in problems)
                touched = statistics.fmean(p[2] for p in problems)
                for name in names:
                    backend = backends[name]
                    bar.step(f"{name} T={T}")
                    if isinstance(backend, Exception):
                        results.skipped.append(dict(suite="runner", impl=name, **shape, reason=_reason(backend)))
                        continue
                    try:
                        with torch.no_grad():
                            stats = _time_runner(backend, problems, weights, settings, device)
                    except Exception as err:  # noqa: BLE001
                        results.skipped.append(dict(suite="runner", impl=name, **shape, reason=_reason(err)))
                        continue
                    seconds = stats.median_us * 1e-6
                    results.runner.append(dict(
                        impl=name, **shape, dtype=_dtype_name(dtype), pairs=pairs, experts_touched=touched,
                        tflops=pairs * flops_per_pair / seconds / 1e12,
                        weight_gbps=touched * weight_bytes_per_expert / seconds / 1e9, **asdict(stats)))
            del weights, backends
        keys = ("num_experts", "top_k", "hidden_size", "intermediate_size", "tokens_per_rank")
        base = {tuple(r[k] for k in keys): r for r in results.runner if r["impl"] == "torch"}
        for r in results.runner:
            b = base.get(tuple(r[k] for k in keys))
            r["speedup_vs_torch"] = b["median_us"] / r["median_us"] if b else None
    finally:
        bar.close()
    return results


def masked_layout(inp) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (token, expert) pairs in deepep_ll's expert-major layout: recv_x [L, P, H] (P = the
    largest per-expert count, rounded up to 16; rows past masked_m are padding) and masked_m [L] int32."""
    L = inp.expert_mask.numel() - 1
    ids = inp.topk_ids.long()
    pair = (ids < L).reshape(-1).nonzero().squeeze(1)
    expert = ids.reshape(-1)[pair]
    order = torch.argsort(expert, stable=True)
    pair, expert = pair[order], expert[order]
    counts = torch.bincount(expert, minlength=L)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(expert.numel(), device=expert.device) - start[expert]
    width = max(16, -(-int(counts.max()) // 16) * 16) if expert.numel() else 16
    x = inp.hidden_states
    recv_x = x.new_zeros(L, width, x.shape[1])
    recv_x[expert, slot] = x[pair // ids.shape[1]]
    return recv_x, counts.to(torch.int32)


def _time_runner(backend, problems, weights, settings: Settings, device: torch.device) -> Stats:
    rot = len(problems)
    if hasattr(backend, "run_masked"):  # a backend for deepep_ll's [L, M*R, H] layout only (e.g. "masked")
        masked = [masked_layout(p[0]) for p in problems]

        def run(i):
            return backend.run_masked(*masked[i % rot], weights)
    else:
        def run(i):
            return backend.run(problems[i % rot][0], weights)

    timing = dict(repeats=settings.repeats, warmup=settings.warmup, device=device)
    if settings.cuda_graph and device.type == "cuda":
        try:
            return measure_cuda_graph(run, rotate=rot, **timing)
        except Exception:  # noqa: BLE001 - not capturable (e.g. a host sync): fall back to events
            torch.cuda.synchronize(device)
    return measure(run, **timing)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------- orchestration


def bench_rank(rank: int, world_size: int, settings: Settings) -> Optional[dict]:
    """Dispatch suite on this rank of the default group; returns rank 0's results as a dict."""
    from .distributed import device_for_rank

    device = device_for_rank()
    torch.manual_seed(settings.seed)
    results = dispatch_suite(settings, dist.group.WORLD, device, settings.progress)
    return asdict(results) if rank == 0 else None


def run(settings: Settings, world_size: Optional[int] = None) -> Optional[Results]:
    """Run the chosen suites in whatever launch this process is in; rank 0 gets the Results."""
    from . import envs
    from .distributed import destroy_distributed, detect_launch, init_distributed
    from .testing import run_ranks

    envs.validate_all()
    launch = detect_launch()
    results = Results()
    if launch.launcher != "single" or (world_size or 1) == 1:
        init_distributed()
        try:
            from .distributed import device_for_rank
            rank, R = dist.get_rank(), dist.get_world_size()
            device = device_for_rank()
            if "dispatch" in settings.suites:
                _merge(results, dispatch_suite(settings, dist.group.WORLD, device, settings.progress))
            runner_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else device
            if "runner" in settings.suites and (rank == 0 or runner_device.type == "cuda"):
                # Each GPU rank times its own GPU; on CPU only rank 0 runs (the ranks share the cores).
                _merge(results, runner_suite(settings, runner_device, settings.runner_ep_size or R,
                                             settings.progress and rank == 0))
            results.meta = _meta(settings, launch.launcher, R, dist.get_backend(), device, runner_device)
            dist.barrier()
        finally:
            destroy_distributed()
        return results if rank == 0 else None

    # No launcher: spawn local CPU ranks (gloo) for the dispatch suite; the runner suite runs here.
    if "dispatch" in settings.suites:
        timeout = max(600.0, float(envs.get("TIMEOUT_S")))
        per_rank = run_ranks(bench_rank, world_size, settings, timeout=24 * 3600.0,
                             group_timeout=timeout)
        _merge(results, Results(**{k: v for k, v in per_rank[0].items() if k != "meta"}))
    runner_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if "runner" in settings.suites:
        _merge(results, runner_suite(settings, runner_device, settings.runner_ep_size or world_size,
                                     settings.progress))
    results.meta = _meta(settings, "spawn", world_size, "gloo", torch.device("cpu"), runner_device)
    return results


def _merge(into: Results, other: Results) -> None:
    into.dispatch += other.dispatch
    into.runner += other.runner
    into.skipped += other.skipped


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _meta(settings: Settings, launcher: str, world_size: int, backend: str, device: torch.device,
          runner_device: torch.device) -> dict:
    from . import __version__
    return dict(
        command=settings.command,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), ep_runtime=__version__, torch=torch.__version__,
        cuda=torch.version.cuda, launcher=launcher, world_size=world_size, backend=backend,
        dispatch_device=_device_name(device), runner_device=_device_name(runner_device),
        settings=asdict(settings),
        timing=("CUDA events per repeat" if device.type == "cuda" else "wall time per repeat")
        + f"; {settings.warmup} warm-up + {settings.repeats} timed repeats over {settings.rotate} rotated inputs;"
          " barrier before each repeat; a repeat's time is the slowest rank's",
    )


# ---------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rate(value: Optional[float]) -> str:
    """Three significant digits without exponents: 0.00412, 3.14, 294."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def tables(results: Results) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for each suite that has rows."""
    out = []
    if results.dispatch:
        header = ["E", "K", "H", "T/rank", "impl", "op", "median us", "p10 us", "p90 us", "MB/rank", "GB/s",
                  "vs a2a"]
        rows = [[str(r["num_experts"]), str(r["top_k"]), str(r["hidden_size"]), str(r["tokens_per_rank"]),
                 r["impl"], r["op"], _fmt(r["median_us"]), _fmt(r["p10_us"]), _fmt(r["p90_us"]),
                 _rate(r["bytes_per_rank"] / 1e6), _rate(r["gbps"]), _fmt(r["vs_baseline"], 2)]
                for r in results.dispatch]
        R = results.dispatch[0]["world_size"]
        out.append((f"dispatch: {R} ranks, {results.dispatch[0]['dtype']}; MB/rank = payload leaving a rank "
                    "(round trip: both ways); vs a2a = GB/s over all_to_all_single's", header, rows))
    if results.runner:
        header = ["E", "K", "H", "I", "L", "T/rank", "pairs", "runner", "median us", "p10 us", "p90 us", "TFLOP/s",
                  "weights GB/s", "vs torch"]
        rows = [[str(r["num_experts"]), str(r["top_k"]), str(r["hidden_size"]), str(r["intermediate_size"]),
                 str(r["local_experts"]), str(r["tokens_per_rank"]), _fmt(r["pairs"], 0), r["impl"],
                 _fmt(r["median_us"]), _fmt(r["p10_us"]), _fmt(r["p90_us"]), _rate(r["tflops"]),
                 _rate(r["weight_gbps"]), _fmt(r["speedup_vs_torch"], 2)] for r in results.runner]
        out.append((f"runner: one rank, {results.runner[0]['dtype']}; L local experts, T*K pairs",
                    header, rows))
    if results.skipped:
        header = ["suite", "impl", "E", "K", "H", "T/rank", "reason"]
        rows = [[s["suite"], s["impl"], str(s["num_experts"]), str(s["top_k"]), str(s["hidden_size"]),
                 str(s["tokens_per_rank"]), s["reason"]] for s in results.skipped]
        out.append(("skipped", header, rows))
    return out


def render_text(results: Results) -> str:
    chunks = []
    for title, header, rows in tables(results):
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        line = lambda cells: "  ".join(c.rjust(w) if c[:1].isdigit() or c[:1] == "-" else c.ljust(w)  # noqa: E731
                                       for c, w in zip(cells, widths)).rstrip()
        chunks.append("\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)]))
    return "\n\n".join(chunks) + "\n"


def render_markdown(results: Results) -> str:
    m = results.meta
    lines = [f"Machine: {m.get('host')}: dispatch on {m.get('dispatch_device')} x{m.get('world_size')} "
             f"({m.get('backend')}), runner on {m.get('runner_device')}; torch {m.get('torch')}"
             f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}. Date: {m.get('date')}.",
             "", f"Command: `{m.get('command')}`", "", f"Timing: {m.get('timing')}.", ""]
    for title, header, rows in tables(results):
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


MISSING_MATPLOTLIB = ("--plot needs matplotlib, which is not installed: pip install 'ep-runtime[bench]' "
                      "(or pip install matplotlib)")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: Results, path: str) -> None:
    """Latency (median, p10-p90 band) against tokens per rank, one line per implementation; one panel
    per dispatch op (all_to_all_single drawn in each) and one for the runners."""
    if not _has_matplotlib():
        raise RuntimeError(MISSING_MATPLOTLIB)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(op, [r for r in results.dispatch if r["op"] in (op, "all_to_all")])
              for op in ("dispatch", "combine", "round_trip") if any(r["op"] == op for r in results.dispatch)]
    if results.runner:
        panels.append(("runner", results.runner))
    if not panels:
        raise RuntimeError("nothing to plot: no benchmark produced a result (see the skipped table)")
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, rows) in zip(axes.flat, panels):
        lines: dict[str, list[dict]] = {}
        for r in rows:
            label = r["impl"]
            if r.get("op") == "all_to_all":  # the baseline; a round trip moves its bytes twice
                label = "2x all_to_all_single" if title == "round_trip" else "all_to_all_single"
            shape = f" E{r['num_experts']} K{r['top_k']} H{r['hidden_size']}"
            lines.setdefault(label + shape, []).append(r)
        for label, pts in sorted(lines.items()):
            pts.sort(key=lambda r: r["tokens_per_rank"])
            t = [max(r["tokens_per_rank"], 1) for r in pts]
            scale = 2.0 if label.startswith("2x ") else 1.0
            style = "--" if "all_to_all" in label else "-"
            ax.plot(t, [scale * r["median_us"] for r in pts], style, marker="o", label=label)
            ax.fill_between(t, [scale * r["p10_us"] for r in pts], [scale * r["p90_us"] for r in pts], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("time, us (median; band p10-p90)")
        ax.set_title(title.replace("_", " "))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = results.meta
    fig.suptitle(f"ep-runtime bench {m.get('settings', {}).get('preset', '')}: {m.get('world_size')} ranks, "
                 f"{m.get('dispatch_device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 0")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ep-runtime bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark every registered dispatcher (against raw all_to_all_single) and every available "
                    "runner backend (against the torch runner).",
        epilog="presets:\n" + "\n".join(f"  {p.name:<20}{p.note}" for p in PRESETS.values()) +
               "\n\nexamples:\n  ep-runtime bench                                  # CPU: 2 local gloo ranks, tiny"
               "\n  torchrun --nproc-per-node 4 -m ep_runtime bench --preset deepseek-v3 --json out.json --plot out.png")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default tiny)")
    p.add_argument("--tokens", type=_int_list, default=None,
                   help="tokens per rank to sweep, comma-separated (default: the preset's GPU or CPU sweep)")
    p.add_argument("--hidden", type=_int_list, default=None, help="hidden sizes H to sweep (default: preset)")
    p.add_argument("--experts", type=_int_list, default=None, help="expert counts E to sweep (default: preset)")
    p.add_argument("--top-k", type=_int_list, default=None, help="top-k values K to sweep (default: preset)")
    p.add_argument("--intermediate", type=_positive, default=None, help="intermediate size I (default: preset)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--suite", type=_name_list, default=["dispatch", "runner"],
                   help="comma-separated: dispatch, runner (default both)")
    p.add_argument("--dispatchers", type=_name_list, default=None, help="only these dispatchers (default: all registered)")
    p.add_argument("--runners", type=_name_list, default=None, help="only these runners (default: all available)")
    p.add_argument("--runner-ep-size", type=_positive, default=None,
                   help="runner suite: compute E / this many local experts (default: the number of ranks)")
    p.add_argument("--world-size", type=_positive, default=2,
                   help="local CPU ranks to spawn when no launcher is detected (default 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats (default 100 on CUDA, 10 on CPU)")
    p.add_argument("--rotate", type=_positive, default=4, help="distinct inputs cycled through (default 4)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="runner suite on CUDA: time CUDA-graph replays (falls back to events when not capturable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write every result and the run's metadata as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write latency-vs-tokens plots (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown (for docs/performance.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: print, plot or convert the results of an earlier --json FILE (e.g. a GPU "
                        "run's, on a machine that has matplotlib)")
    return p


def settings_from_args(args: argparse.Namespace, cuda: bool) -> Settings:
    preset = PRESETS[args.preset]
    suites = args.suite
    unknown = [s for s in suites if s not in ("dispatch", "runner")]
    if unknown or not suites:
        raise ValueError(f"--suite {','.join(suites)}: allowed dispatch, runner")
    for flag, values in (("--hidden", args.hidden), ("--experts", args.experts), ("--top-k", args.top_k)):
        if values is not None and min(values) < 1:
            raise ValueError(f"{flag} {','.join(map(str, values))}: every value must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup} must be >= 0")
    return Settings(
        preset=preset.name,
        tokens=args.tokens or list(preset.tokens_gpu if cuda else preset.tokens_cpu),
        hidden_sizes=args.hidden or [preset.hidden_size],
        num_experts=args.experts or [preset.num_experts],
        top_ks=args.top_k or [preset.top_k],
        intermediate_size=args.intermediate or preset.intermediate_size,
        dtype=args.dtype or ("bf16" if cuda else "fp32"),
        suites=suites, dispatchers=args.dispatchers, runners=args.runners, runner_ep_size=args.runner_ep_size,
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 2),
        repeats=args.repeats or (100 if cuda else 10), rotate=args.rotate, cuda_graph=args.cuda_graph,
        seed=args.seed, progress=not args.no_progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, torch.cuda.is_available())
        settings.command = " ".join(["ep-runtime bench", *map(shlex.quote, argv)])
        for K in settings.top_ks:
            for E in settings.num_experts:
                if K > E:
                    raise ValueError(f"--top-k {K} is more than --experts {E}")
    except ValueError as err:
        parser.error(str(err))
    if args.plot and not _has_matplotlib():
        if not (args.json or args.markdown):  # nothing would be kept: fail before the run
            parser.error(MISSING_MATPLOTLIB)
        print(f"warning: {MISSING_MATPLOTLIB}; the run goes on and --plot fails after --json/--markdown are "
              "written (plot them later with --from-json)", file=sys.stderr)
    if args.from_json:
        with open(args.from_json) as f:
            results = Results(**json.load(f))
    else:
        results = run(settings, args.world_size)
    if results is None:  # not rank 0
        return 0
    print(render_text(results), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(results), f, indent=1)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_markdown(results))
        print(f"wrote {args.markdown}")
    if args.plot:
        try:
            plot(results, args.plot)
        except RuntimeError as err:
            print(f"ep-runtime bench: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    measured = len(results.dispatch) + len(results.runner)
    return 0 if measured else 1
