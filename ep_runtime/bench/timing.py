"""The one timer of every `ep-runtime bench` suite: `measure` (and `measure_cuda_graph`, which times replays
with it).

A repeat's device time is one pair of CUDA events around the call on the current stream (wall time
on CPU), after an untimed device sync and a barrier across the group; it is the slowest rank's. For
CUDA graph replays (device_only) a sleep kernel ahead of the first event keeps the GPU busy while the
replay is submitted: their time is the replay's device work (DeepEP's and the papers' kernel times).
Host time is measured on separate repeats: CPU wall time of the call alone, with no device sync
after it, which is what a serving loop pays per call in Python and launches (on CPU it is the wall
time of the timed repeats themselves).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

# Sleep-kernel cycles ahead of a device_only repeat's first event: ~25 us at an H100/H200's ~2 GHz, longer
# than submitting a CUDA graph replay takes (4-20 us of host time per replay measured on H200 hosts), so
# the replay is queued behind the sleep and the events time its device work alone. Without it an event
# pair around one replay on an idle GPU also timed the submission: ~5% of a 110 us decode step, which a
# model's own graph (every layer in one replay) pays once per step, not per layer.
LAUNCH_COVER_CYCLES = 50_000


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
    host_us: Optional[float] = None  # median CPU wall time of one call, no device sync after it

    @classmethod
    def from_seconds(cls, seconds: Sequence[float], method: str,
                     host_seconds: Optional[Sequence[float]] = None) -> "Stats":
        us = sorted(s * 1e6 for s in seconds)
        host = sorted(s * 1e6 for s in host_seconds) if host_seconds else us
        return cls(percentile(us, 50), percentile(us, 10), percentile(us, 90), statistics.fmean(us), us[0],
                   len(us), method, percentile(host, 50))


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
            group: Optional[Any] = None, device_only: bool = False) -> Stats:
    """Time fn(arg) `repeats` times after `warmup` untimed calls; on CUDA then `repeats` more calls
    for the host time.

    arg = setup(i) (untimed; default i, the repeat index: use i % rotate to pick rotated inputs);
    teardown(arg, result) runs untimed after each call. With a process group, every repeat starts
    after a barrier and its time is the maximum over the group's ranks. On CUDA the device time is
    between two CUDA events around fn on the current stream; on CPU it is wall time. device_only
    (CUDA graph replays): the GPU is kept busy while fn submits its work (a sleep kernel before the
    first event), so the events time the work alone, not its submission (which host_us reports).
    """
    seconds, host_seconds = _samples(fn, repeats, warmup, device, setup, teardown, group, device_only=device_only)
    return Stats.from_seconds(seconds, "cuda_events" if device.type == "cuda" else "wall", host_seconds)


def measure_interleaved(fns: Sequence[Callable[[Any], Any]], *, repeats: int, warmup: int, device: torch.device,
                        group: Optional[Any] = None, calls: int = 1, host: bool = True,
                        device_only: bool = False) -> list[Stats]:
    """measure() of several functions whose repeats alternate (a, b, a, b, ...), each fn getting
    arguments 0, 1, 2, ... as with measure: a comparison of them is not skewed by what drifts during a
    run (clocks, temperature), as timing one after the other would be.

    calls: each repeat is that many back-to-back calls of one fn, timed together (the Stats are per
    call). What one fn leaves behind (a hot, power-capped GPU after a long kernel) slows the next fn's
    first call; in a block of calls that carry-over weighs 1/calls, and the block runs as a layer
    stack does, under sustained load. host=False skips the host-time repeats (host_us is then the
    device time's median). device_only: as in measure."""
    n = len(fns)
    if calls < 1:
        raise ValueError(f"calls={calls} must be >= 1")

    def block(i):
        first = i // n * calls
        return [fns[i % n](first + j) for j in range(calls)]

    seconds, host_seconds = _samples(block, n * repeats, n * warmup, device, None, None, group, host, device_only)
    method = "cuda_events" if device.type == "cuda" else "wall"
    per_call = lambda values: [v / calls for v in values]  # noqa: E731
    return [Stats.from_seconds(per_call(seconds[k::n]), method, per_call(host_seconds[k::n]) if host_seconds else None)
            for k in range(n)]


def _samples(fn, repeats: int, warmup: int, device: torch.device, setup, teardown, group, host: bool = True,
             device_only: bool = False) -> tuple[list[float], Optional[list[float]]]:
    """(seconds of each timed repeat, host seconds of each host repeat or None off CUDA or without host);
    see measure."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # noqa: E731
    barrier = (lambda: dist.barrier(group=group)) if group is not None else (lambda: None)  # noqa: E731

    def timed_calls(first: int, count: int, events: Optional[list]) -> list[float]:
        """Wall seconds of fn per call, or CUDA event pairs appended to `events` when given."""
        seconds = []
        for i in range(first, first + count):
            arg = setup(i) if setup is not None else i
            sync()
            barrier()
            if events is not None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if device_only:
                    torch.cuda._sleep(LAUNCH_COVER_CYCLES)
                start.record()
                result = fn(arg)
                end.record()
                events.append((start, end))
            else:
                t0 = time.perf_counter()
                result = fn(arg)
                seconds.append(time.perf_counter() - t0)
            if teardown is not None:
                teardown(arg, result)
        return seconds

    timed_calls(0, warmup, None)
    events: Optional[list] = [] if cuda else None
    seconds = timed_calls(warmup, repeats, events)
    host_seconds = None
    if cuda:
        sync()
        seconds = [start.elapsed_time(end) * 1e-3 for start, end in events]
        if host:
            host_seconds = timed_calls(warmup + repeats, repeats, None)  # the repeat index keeps rotating
            sync()
            host_seconds = max_over_group(host_seconds, group, device)
    return max_over_group(seconds, group, device), host_seconds


def capture_graphs(fn: Callable[[int], Any], rotate: int, device: torch.device, warmup: int = 1,
                   before_capture: Optional[Callable[[], Any]] = None) -> tuple[list, list]:
    """One CUDA graph per rotation slot of fn(k), after `warmup` passes over the slots on a side stream
    (as torch.cuda.graphs recommends); (graphs, outputs). before_capture runs between the two (e.g. a
    dispatcher's raise_deferred, so the warm-up's deferred checks cannot fire inside the capture).
    Raises when fn cannot be captured (a host sync, ...); every rank must capture the same calls."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for k in range(rotate):
                fn(k)
    torch.cuda.current_stream(device).wait_stream(stream)
    if before_capture is not None:
        before_capture()
    graphs, outs = [], []
    # A failed capture leaves torch.cuda.graph's capture stream current: the outer context restores ours.
    with torch.cuda.stream(torch.cuda.current_stream(device)):
        for k in range(rotate):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs.append(fn(k))
            graphs.append(graph)
    return graphs, outs


def measure_cuda_graph(fn: Callable[[int], Any], *, repeats: int, warmup: int, rotate: int,
                       device: torch.device, group: Optional[Any] = None,
                       before_capture: Optional[Callable[[], Any]] = None) -> Stats:
    """Capture fn(k) for each rotation slot k into a CUDA graph (capture_graphs, before_capture as
    there: pass the dispatcher's raise_deferred where fn dispatches), then time replays with `measure`."""
    stats = measure(graph_replays(fn, rotate, device, before_capture), repeats=repeats, warmup=warmup,
                    device=device, group=group, device_only=True)
    stats.method = "cuda_graph"
    return stats


def graph_replays(fn: Callable[[int], Any], rotate: int, device: torch.device,
                  before_capture: Optional[Callable[[], Any]] = None) -> Callable[[int], Any]:
    """replay(i): the CUDA graph of fn(i % rotate) replayed (capture_graphs' graphs; raises as it does)."""
    graphs, _ = capture_graphs(fn, rotate, device, before_capture=before_capture)
    return lambda i: graphs[i % rotate].replay()


def _on_group_device(group: Any, device: torch.device) -> torch.device:
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def max_over_group(values: list[float], group: Optional[Any], device: torch.device) -> list[float]:
    """Element-wise maximum over the group's ranks (a collective is done when its slowest rank is)."""
    if group is None or dist.get_world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_on_group_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def sum_over_group(values: list[float], group: Optional[Any], device: torch.device) -> list[float]:
    if group is None or dist.get_world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_on_group_device(group, device))
    dist.all_reduce(t, group=group)
    return t.tolist()
