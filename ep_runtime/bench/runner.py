"""The runner suite: every available runner backend on one rank computing that rank's share of the
experts (L = E / R local experts, T*K (token, expert) pairs routed uniformly over them).

Runners are driven only through the public path a layer uses: a dispatcher on a one-rank group
turns the tokens into its format's output (untimed), and `MoeRunner(backend, config,
placement).run(dispatch_output, weights)` is timed, for each format in --runner-formats (a pair
that does not run is listed under skipped). Beside them, in the same run: the device's roofline
(copy bandwidth and a dense matmul) and a raw baseline, `torch._grouped_mm` for both GEMMs plus the
activation on rows already grouped by expert (no permutation, no weighting: what a user would
write instead of fused kernels). Each unquantized runner row of the suite's last mode (graph replay with
--cuda-graph, else eager; rows that cannot run in it have none) is timed once more interleaved with
that baseline run in the same mode, in blocks of PAIRED_CALLS back-to-back calls (`measure_interleaved`):
`vs raw` is the baseline's median time per call over the row's from those repeats (> 1: ours is
faster); the rows' own times and the standalone raw row (eager) are timed on their own.
FLOPs: 2*3*H*I per computed pair (gated; 2*2*H*I not gated); bytes: the expert weights of every
expert that received >= 1 pair, read once.

--fp8 adds, in the same run, every backend on fp8 block-scaled experts ("<runner> fp8" rows: 1-byte
weights; fed the fp8 rows of a use_fp8=True dispatcher where the format has one, else quantizing
inside) and the fp8 baselines a user would write instead: the weights dequantized to the tokens' dtype
every call, then torch._grouped_mm ("dequant + grouped_mm (raw)"); torch._scaled_grouped_mm with
rowwise scales ("scaled_grouped_mm rowwise (raw)", where this torch and device support it); and one
torch._scaled_mm per expert with the experts' own block scales ("scaled_mm blockwise per expert (raw)":
cuBLAS's DeepSeek recipe, 1 x 128 activations and 128 x 128 weights, Hopper with CUDA >= 12.9).
--triton-fp8-gemm adds the triton runner's fp8 rows under other values of EP_RUNTIME_TRITON_FP8_GEMM ("triton
fp8 triton" rows: its Triton kernels at every size, where the default "triton fp8" rows take the Gluon GEMMs at
prefill sizes on Hopper), on the standard format only (the prefill comparison it exists for).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict
from typing import Any, Callable, Optional

import torch

from .settings import DTYPES, Progress, Results, Settings, dtype_name, reason
from .timing import Stats, graph_replays, measure, measure_interleaved

RAW_BASELINE = "grouped_mm (raw)"
FP8_BASELINES = ("dequant + grouped_mm (raw)", "scaled_grouped_mm rowwise (raw)", "scaled_mm blockwise per expert (raw)")
FP8 = " fp8"
# Back-to-back calls per repeat when a row is timed interleaved with the raw baseline: one call of either
# side leaves the GPU hot for the next (measured: the raw GEMMs ran ~8% slower right after our step than
# on their own), so single alternating calls would skew the ratio; in a block of 8 that carry-over is 1/8.
PAIRED_CALLS = 8
# Roofline sizes: elements copied (read + write) and the square matmul's side, per device type.
_ROOFLINE_SIZES = {"cuda": (1 << 30, 8192), "cpu": (1 << 22, 512)}
SUSTAINED_S = 1.0  # seconds of back-to-back matmuls before the "matmul (sustained)" roofline row


def runner_problem(gen: torch.Generator, num_tokens: int, num_local_experts: int, top_k: int,
                   hidden_size: int, dtype: torch.dtype, device: torch.device):
    """One rank's tokens under uniform routing: T*K (token, expert) pairs over L local experts.

    Each row picks min(K, L) distinct experts; with L < K there are ceil(T*K / L) rows so the pair
    count stays T*K. Returns x [N, H], TopKOutput (ids [N, min(K, L)] int32, weights fp32), the
    pair count and the number of experts that received >= 1 pair.
    """
    from ..routing import TopKOutput

    L, K = num_local_experts, top_k
    per_row = min(K, L)
    rows = math.ceil(num_tokens * K / per_row)
    ids = torch.rand(rows, L, generator=gen).topk(per_row, dim=1).indices.to(torch.int32)
    weights = torch.rand(rows, per_row, generator=gen) + 0.1
    x = torch.randn(rows, hidden_size, generator=gen).to(dtype)
    touched = int(torch.bincount(ids.reshape(-1).long(), minlength=L).gt(0).sum())
    return x.to(device), TopKOutput(ids.to(device), weights.to(device)), rows * per_row, touched


def runner_suite(settings: Settings, device: torch.device, ep_size: int, progress: bool,
                 group: Optional[Any] = None) -> Results:
    """Every available runner backend (torch first: the baseline) under each runner format, on this
    rank; `group` is a one-rank group for the dispatchers (None in a process without one)."""
    from .. import dispatchers, envs, runners
    from ..config import ExpertWeights, MoeConfig

    dtype = DTYPES[settings.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    names = [n for n in runners.available() if settings.runners is None or n in settings.runners]
    names.sort(key=lambda n: n != "torch")
    modes = ["eager"] + (["graph"] if settings.cuda_graph and device.type == "cuda" else [])
    results = Results()
    timing = settings.timing(device)
    results.roofline = roofline(dtype, device, timing)
    peak = {r["impl"]: r for r in results.roofline}
    fp8_names = [n for n in names if settings.fp8 and not (n == "torch" and device.type == "cuda")]
    fp8_gemms = settings.triton_fp8_gemms if "triton" in fp8_names and "standard" in settings.runner_formats else []
    total = len(settings.cases()) * len(settings.tokens) * (
        (len(names) + len(fp8_names)) * len(settings.runner_formats) + len(fp8_gemms) + 1 + (len(FP8_BASELINES) if settings.fp8 else 0))
    bar = Progress(total, progress, "runner")
    inter = settings.intermediate_size
    try:
        for E, K, H in settings.cases():
            if E % ep_size:
                raise ValueError(f"num_experts={E} is not divisible by ep size {ep_size} (--runner-ep-size)")
            L = E // ep_size
            # The rank's share as a layer of its own: L experts, all local on a one-rank group.
            config = MoeConfig(L, min(K, L), H, inter)
            gen = torch.Generator().manual_seed(settings.seed + 1)
            # Made on the device: DeepSeek-V3's 64 local experts are 2.8e9 numbers.
            weights = ExpertWeights(torch.randn(L, config.w13_rows, H, dtype=dtype, device=device) * H ** -0.5,
                                    torch.randn(L, H, inter, dtype=dtype, device=device) * inter ** -0.5)
            flops_per_pair = 2 * (3 if config.is_gated else 2) * H * inter
            weight_bytes_per_expert = (config.w13_rows * H + H * inter) * itemsize
            backends = {name: _try(lambda: runners.create(name, config)) for name in names}
            formats = {fmt: _try(lambda: dispatchers.create(fmt, config, group=group))
                       for fmt in settings.runner_formats}
            # (row label suffix, weights, bytes per expert, backends, dispatchers by format, TRITON_FP8_GEMM)
            variants = [("", weights, weight_bytes_per_expert, names, formats, None)]
            if settings.fp8:
                fp8_weights, fp8_formats = _fp8_setup(weights, config, group, settings.runner_formats, formats)
                variants.append((FP8, fp8_weights, config.w13_rows * H + H * inter, fp8_names, fp8_formats, None))
                variants += [(f"{FP8} {gemm}", fp8_weights, variants[1][2], ["triton"],
                              {"standard": fp8_formats["standard"]}, gemm) for gemm in fp8_gemms]
            for T in settings.tokens:
                shape = dict(num_experts=E, top_k=K, hidden_size=H, intermediate_size=inter, tokens_per_rank=T,
                             local_experts=L)
                problems = [runner_problem(gen, T, L, K, H, dtype, device) for _ in range(settings.rotate)]
                pairs = statistics.fmean(p[2] for p in problems)
                touched = statistics.fmean(p[3] for p in problems)

                def row(impl: str, fmt: str, mode: str, stats: Stats, expert_bytes: float = weight_bytes_per_expert,
                        row_dtype: str = dtype_name(dtype), vs_raw: Optional[float] = None) -> dict:
                    seconds = stats.median_us * 1e-6
                    tflops = pairs * flops_per_pair / seconds / 1e12
                    gbps = touched * expert_bytes / seconds / 1e9
                    roof = max(tflops / peak["matmul"]["tflops"], gbps / peak["copy"]["gbps"]) if peak else None
                    return dict(impl=impl, format=fmt, mode=mode, **shape, dtype=row_dtype, pairs=pairs,
                                experts_touched=touched, tflops=tflops, weight_gbps=gbps,
                                pct_roofline=None if roof is None else 100 * roof, **asdict(stats),
                                speedup_vs_raw=vs_raw)

                def skip(impl: str, err: BaseException, what: str = "") -> None:
                    results.skipped.append(dict(suite="runner", impl=impl, **shape, reason=what + reason(err)))

                raw_run = _try(lambda: _grouped_mm_call(problems, weights, config))
                raw_stats = raw_run if isinstance(raw_run, Exception) else _try(lambda: measure(raw_run, **timing))
                # The unquantized rows of the last mode (graph replay where timed) are also timed interleaved
                # with the raw baseline in that mode (vs raw): drift during the run (clocks, temperature)
                # moves both sides of that ratio alike.
                for suffix, run_weights, expert_bytes, run_names, run_formats, fp8_gemm in variants:
                    paired = None if suffix or isinstance(raw_stats, Exception) else raw_run
                    knob = (lambda: envs.overridden("TRITON_FP8_GEMM", fp8_gemm)) if fp8_gemm else contextlib.nullcontext
                    for fmt, disp in run_formats.items():
                        outs = _dispatch_all(disp, problems)
                        for name in run_names:
                            impl = name + suffix
                            bar.step(f"{impl} {fmt} T={T}")
                            failure = next((e for e in (backends[name], outs) if isinstance(e, Exception)), None)
                            if failure is not None:
                                skip(impl, failure, f"{fmt}: ")
                                continue
                            run = _runner_call(backends[name], config, disp, outs, run_weights)
                            for mode in modes:
                                with knob():
                                    timed = _try(lambda: _time(run, mode, len(outs), timing,
                                                               paired if mode == modes[-1] else None))
                                if isinstance(timed, Exception):
                                    skip(impl, timed, f"{fmt} {mode}: ")
                                    if mode == "eager":
                                        break
                                    continue
                                stats, vs_raw = timed
                                if isinstance(vs_raw, Exception):
                                    skip(f"{impl} vs {RAW_BASELINE}", vs_raw, f"{fmt} {mode}: ")
                                    vs_raw = None
                                results.runner.append(row(impl, fmt, mode, stats, expert_bytes,
                                                          "fp8_e4m3" if suffix else dtype_name(dtype), vs_raw))
                bar.step(f"{RAW_BASELINE} T={T}")
                if isinstance(raw_stats, Exception):
                    skip(RAW_BASELINE, raw_stats)
                else:
                    results.runner.append(row(RAW_BASELINE, "pre-grouped", "eager", raw_stats))
                if settings.fp8:
                    for impl, timer in zip(FP8_BASELINES, (_time_dequant_grouped_mm, _time_scaled_grouped_mm,
                                                             _time_scaled_mm_per_expert)):
                        bar.step(f"{impl} T={T}")
                        stats = _try(lambda: timer(problems, variants[1][1], config, timing))
                        if isinstance(stats, Exception):
                            skip(impl, stats)
                        else:
                            results.runner.append(row(impl, "pre-grouped", "eager", stats, variants[1][2], "fp8_e4m3"))
        _add_speedups(results.runner)
    finally:
        bar.close()
    return results


def _try(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or the exception it raised (a case that cannot run here is reported, not fatal)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        return err


def _dispatch_all(disp, problems) -> "list | Exception":
    """The dispatcher's output for each rotated input (untimed), or why it cannot make them."""
    if isinstance(disp, Exception):
        return disp
    with torch.no_grad():
        return _try(lambda: [disp.dispatch(x, topk) for x, topk, *_ in problems])


def _runner_call(backend, config, disp, outs: list, weights) -> Callable[[int], Any]:
    """run(i): the layer's runner step on rotated dispatch output i % len(outs)."""
    from ..runner_core import MoeRunner

    moe_runner = MoeRunner(backend, config, disp.placement)
    return lambda i: moe_runner.run(outs[i % len(outs)], weights)


@torch.no_grad()
def _time(run: Callable[[int], Any], mode: str, rotate: int, timing: dict,
          paired: Optional[Callable[[int], Any]] = None) -> "tuple[Stats, float | Exception | None]":
    """(stats of run in `mode`, vs): with `paired`, vs is paired's median over run's, the two run in `mode`
    and timed interleaved in blocks of PAIRED_CALLS (or why that failed); None without `paired`."""
    run = _in_mode(run, mode, rotate, timing["device"])
    graph = mode == "graph"  # (replays: their device work, as measure_cuda_graph times it)
    stats, vs = measure(run, device_only=graph, **timing), None
    if paired is not None:
        try:
            ours, theirs = measure_interleaved((run, _in_mode(paired, mode, rotate, timing["device"])),
                                               calls=PAIRED_CALLS, host=False, device_only=graph, **timing)
            vs = theirs.median_us / ours.median_us
        except Exception as err:  # noqa: BLE001 (the row stands; its vs raw is reported as skipped)
            vs = err
    stats.method = "cuda_graph" if mode == "graph" else stats.method
    return stats, vs


def _in_mode(run: Callable[[int], Any], mode: str, rotate: int, device: torch.device) -> Callable[[int], Any]:
    """run itself ("eager"), or the replay of its CUDA graph for rotation slot i % rotate ("graph")."""
    if mode == "eager":
        return run
    try:
        return graph_replays(run, rotate, device)
    except Exception:
        torch.cuda.synchronize(device)  # not capturable (e.g. a host sync): leave the device idle
        raise


@torch.no_grad()
def _grouped_mm_call(problems, weights, config) -> Callable[[int], Any]:
    """run(i): both GEMMs with torch._grouped_mm plus the activation, on rotated input i's (token, expert)
    pairs already grouped by expert (the grouping is done here, untimed)."""
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    from ..runners.torch_runner import activate

    w13_t, w2_t = weights.w13.transpose(1, 2), weights.w2.transpose(1, 2)  # [L, H, 2I], [L, I, H]
    grouped = _grouped_rows(problems, weights.w13.shape[0])

    @torch.no_grad()
    def run(i):
        rows, offsets = grouped[i % len(grouped)]
        h = torch._grouped_mm(rows, w13_t, offs=offsets)
        return torch._grouped_mm(activate(h, config), w2_t, offs=offsets)

    return run


def _fp8_setup(weights, config, group, formats: list, plain: dict):
    """fp8 block-scaled copies of the experts, and per format the dispatcher whose rows the fp8 runners
    take: use_fp8=True where the format has an fp8 payload, else the plain one (the runner quantizes)."""
    from .. import dispatchers
    from ..config import ExpertWeights
    from ..quant import QuantConfig
    from .dispatch import FP8_DISPATCHERS as FP8_FORMATS

    quant = QuantConfig()
    q13, s13 = _quantize_per_expert(quant, weights.w13)
    q2, s2 = _quantize_per_expert(quant, weights.w2)
    fp8_formats = {fmt: (_try(lambda: dispatchers.create(fmt, config, group=group, use_fp8=True))
                         if fmt in FP8_FORMATS else plain[fmt]) for fmt in formats}
    return ExpertWeights(q13, q2, None, None, s13, s2, quant), fp8_formats


def _quantize_per_expert(quant, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantConfig.quantize_weight one expert at a time (its fp32 staging copy of all 256 DeepSeek
    experts at once would be tens of GB)."""
    parts = [quant.quantize_weight(w[e:e + 1]) for e in range(w.shape[0])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _grouped_rows(problems, num_local_experts: int) -> list:
    """Each input's rows grouped by expert (untimed) and the int32 group ends torch._grouped_mm takes."""
    grouped = []
    for x, topk, *_ in problems:
        ids = topk.topk_ids.reshape(-1).long()
        order = torch.argsort(ids, stable=True)
        offsets = torch.cumsum(torch.bincount(ids, minlength=num_local_experts), 0).to(torch.int32)
        grouped.append((x[order // topk.topk_ids.shape[1]].contiguous(), offsets))
    return grouped


@torch.no_grad()
def _time_dequant_grouped_mm(problems, fp8_weights, config, timing: dict) -> Stats:
    """The fp8 experts dequantized to the tokens' dtype on every call, then _grouped_mm_call's GEMMs."""
    from ..runners.torch_runner import activate

    quant = fp8_weights.quant
    grouped = _grouped_rows(problems, fp8_weights.w13.shape[0])
    dtype = grouped[0][0].dtype

    def dequantized(q, scale):
        bn, bk = quant.weight_block
        s = scale.repeat_interleave(bn, 1)[:, :q.shape[1]].repeat_interleave(bk, 2)[:, :, :q.shape[2]]
        return (q.to(dtype) * s.to(dtype)).transpose(1, 2)

    def run(i):
        rows, offsets = grouped[i % len(grouped)]
        h = torch._grouped_mm(rows, dequantized(fp8_weights.w13, fp8_weights.w13_scale_inv), offs=offsets)
        return torch._grouped_mm(activate(h, config), dequantized(fp8_weights.w2, fp8_weights.w2_scale_inv),
                                 offs=offsets)

    return measure(run, **timing)


@torch.no_grad()
def _time_scaled_grouped_mm(problems, fp8_weights, config, timing: dict) -> Stats:
    """torch._scaled_grouped_mm with rowwise scales (one per token row, one per weight output row;
    block scales are not among its scalings): the weights requantized rowwise once (untimed), the
    rows and the activation quantized rowwise with torch ops inside the timing."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._scaled_grouped_mm")
    from ..runners.torch_runner import activate

    quant = fp8_weights.quant
    fp8 = quant.dtype
    grouped = _grouped_rows(problems, fp8_weights.w13.shape[0])
    dtype = grouped[0][0].dtype

    def rowwise(w):  # [L, N, K] float -> fp8 [L, K, N] (column-major view) and scales [L, N]
        scale = w.abs().amax(dim=2).clamp(min=1e-10) / 448.0
        q = (w / scale.unsqueeze(2)).clamp(-448, 448).to(fp8)
        return q.transpose(1, 2), scale.float()

    def quant_rows(x):
        scale = x.abs().amax(dim=1).float().clamp(min=1e-10) / 448.0
        return (x.float() / scale.unsqueeze(1)).clamp(-448, 448).to(fp8), scale

    w13_q, w13_s = rowwise(quant.dequantize_weight(fp8_weights.w13, fp8_weights.w13_scale_inv))
    w2_q, w2_s = rowwise(quant.dequantize_weight(fp8_weights.w2, fp8_weights.w2_scale_inv))

    def run(i):
        rows, offsets = grouped[i % len(grouped)]
        a, a_s = quant_rows(rows)
        h = torch._scaled_grouped_mm(a, w13_q, a_s, w13_s, offs=offsets, out_dtype=dtype)
        b, b_s = quant_rows(activate(h, config))
        return torch._scaled_grouped_mm(b, w2_q, b_s, w2_s, offs=offsets, out_dtype=dtype)

    return measure(run, **timing)


@torch.no_grad()
def _time_scaled_mm_per_expert(problems, fp8_weights, config, timing: dict) -> Stats:
    """One torch._scaled_mm per expert and GEMM with the experts' own 128 x 128 block scales and the rows
    quantized per 128 channels inside the timing by the runners' own kernel (what vLLM's block-wise torch
    backend does with its own):
    each expert's rows padded to a multiple of 4 (cuBLASLt's rule) once, untimed, and the loop's bounds
    read on the host then (a real runner would need a host sync per call for them)."""
    from ..quant_kernels import quantize_rows
    from ..runners.torch_runner import activate

    quant = fp8_weights.quant
    block = quant.activation_group
    if fp8_weights.w13_scale_inv.dtype != torch.float32 or quant.weight_block != (block, block) or fp8_weights.w13.shape[2] % (4 * block) or \
            fp8_weights.w2.shape[2] % (4 * block):
        raise RuntimeError(f"cuBLAS's block recipe takes fp32 scales of {block} x {block} weight blocks and H, I "
                           f"multiples of {4 * block}")
    inputs = []
    for rows, offsets in _grouped_rows(problems, fp8_weights.w13.shape[0]):
        ends = [0, *offsets.tolist()]
        groups = [(e, rows[a:b]) for e, (a, b) in enumerate(zip(ends, ends[1:])) if b > a]
        inputs.append([(e, torch.cat([g, g.new_zeros(-len(g) % 4, g.shape[1])])) for e, g in groups])

    def quant_rows(x):  # [m, K] -> fp8 [m, K], scales [m, K / 128] column-major (cuBLAS's layout)
        q, scale = quantize_rows(x, quant) if x.is_cuda else quant.quantize_activation(x)
        return q, scale.t().contiguous().t()

    def run(i):
        out = []
        for e, rows in inputs[i % len(inputs)]:
            a, a_s = quant_rows(rows)
            h = torch._scaled_mm(a, fp8_weights.w13[e].t(), a_s, fp8_weights.w13_scale_inv[e].t(),
                                 out_dtype=rows.dtype)
            b, b_s = quant_rows(activate(h, config))
            out.append(torch._scaled_mm(b, fp8_weights.w2[e].t(), b_s, fp8_weights.w2_scale_inv[e].t(),
                                        out_dtype=rows.dtype))
        return out

    return measure(run, **timing)


@torch.no_grad()
def roofline(dtype: torch.dtype, device: torch.device, timing: dict) -> list[dict]:
    """This device's reference rates in the same run: a device-to-device copy (GB/s, read + write)
    and a square matmul (TFLOP/s), in the suite's dtype; on CUDA the matmul once more right after
    SUSTAINED_S of back-to-back matmuls ("matmul (sustained)"). Why twice: a GPU under sustained GEMM load
    runs at its power cap (one H200: ~676 W, SM clock 1980 -> 1275-1470 MHz within ~0.2 s), as the
    long runner rows do, while the short matmul row runs at the clock of a cool GPU. "% roof" uses the
    short one (the higher rate)."""
    elements, n = _ROOFLINE_SIZES["cuda" if device.type == "cuda" else "cpu"]
    rows = [_copy_rate(elements, dtype, device, timing), _matmul_rate(n, dtype, device, timing)]
    if device.type == "cuda":
        rows.append(_matmul_rate(n, dtype, device, timing, sustain_s=SUSTAINED_S))
    return rows


def _copy_rate(elements: int, dtype: torch.dtype, device: torch.device, timing: dict) -> dict:
    src = torch.randn(elements, device=device).to(dtype)
    dst = torch.empty_like(src)
    stats = measure(lambda i: dst.copy_(src), **timing)
    return dict(impl="copy", size=f"{elements} elements", dtype=dtype_name(dtype), tflops=None,
                gbps=2 * src.numel() * src.element_size() / (stats.median_us * 1e-6) / 1e9, **asdict(stats))


def _matmul_rate(n: int, dtype: torch.dtype, device: torch.device, timing: dict, sustain_s: float = 0.0) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if sustain_s > 0:  # load the GPU until it settles at its power cap, then time at once
        end = time.perf_counter() + sustain_s
        while time.perf_counter() < end:
            for _ in range(8):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    stats = measure(lambda i: a @ b, **timing)
    return dict(impl="matmul (sustained)" if sustain_s > 0 else "matmul", size=f"{n}x{n}x{n}",
                dtype=dtype_name(dtype), gbps=None,
                tflops=2 * n ** 3 / (stats.median_us * 1e-6) / 1e12, **asdict(stats))


def _add_speedups(rows: list[dict]) -> None:
    """speedup_vs_torch: the torch runner's median over this row's, same shape, format and mode."""
    keys = ("num_experts", "top_k", "hidden_size", "intermediate_size", "tokens_per_rank", "format", "mode")
    base = {tuple(r[k] for k in keys): r for r in rows if r["impl"] == "torch"}
    for r in rows:
        b = base.get(tuple(r[k] for k in keys))
        r["speedup_vs_torch"] = b["median_us"] / r["median_us"] if b else None
