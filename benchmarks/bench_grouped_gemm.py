"""The triton runner's grouped GEMM kernels against raw torch._grouped_mm on one GPU, in one run.

    python benchmarks/bench_grouped_gemm.py                      # ~3 minutes on one H200
    python benchmarks/bench_grouped_gemm.py --tokens 4096 --models mixtral-8x7b --json out.json

For each model shape (one rank's local experts) and token count, the triton runner's forward
(`fused_experts`: pair alignment, GEMM 1 with the activation, GEMM 2, top-k reduction) with
  portable     the portable kernel and the device table's tiles (the runner's path before the others)
  persistent   the persistent kernel, same tiles
  tma <tiles>  the persistent kernel with TMA weight loads: the table's tma tiles, then CANDIDATES
  tma_stacked  the same with GEMM 1's gate and up rows in one TMA box and one dot
and the raw baseline: torch._grouped_mm for both GEMMs plus the activation on rows already grouped by
expert (grouping untimed), as the bench's runner suite times it. TFLOP/s count 2*3*H*I per pair.

Every row is checked: portable against an fp32 recomputation of a few tokens, the others against
portable's output. A kernel that does not compile, fails, or is wrong is reported on its row and the
run goes on; rows are measured kernel by kernel (the baseline and portable first, for every case), so
a failure that leaves the CUDA context unusable still leaves the earlier rows printed. Rows not started
within --budget-s are listed as not run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import triton

from ep_runtime.bench.runner import _grouped_mm_call, _matmul_rate
from ep_runtime.bench.settings import int_at_least
from ep_runtime.bench.timing import measure
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.reference import rel_err
from ep_runtime.routing import TopKOutput
from ep_runtime.runners import triton_kernels as kernels
from ep_runtime.runners.triton_runner import fused_experts, interpreted

# (L local experts, K, H, I): DeepSeek-V3 at EP 8 (256 experts / 8 ranks), Mixtral 8x7B whole.
# "tiny": a check of this script itself (on CPU with TRITON_INTERPRET=1: --models tiny --tokens 16).
MODELS = {"deepseek-v3-ep8": (32, 8, 7168, 2048), "mixtral-8x7b": (8, 2, 4096, 14336), "tiny": (4, 2, 64, 64)}
# (BLOCK_M, BLOCK_N weight rows per program, BLOCK_K, GROUP_M, num_warps, num_stages, flatten) for the
# TMA kernels, the first --candidates / --stacked-candidates of them after the table's tiles.
CANDIDATES = [(128, 256, 64, 8, 8, 3, False), (128, 256, 64, 8, 8, 3, True), (128, 256, 64, 8, 8, 4, False),
              (128, 128, 64, 8, 4, 4, False), (64, 256, 64, 8, 4, 4, False)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deepseek-v3-ep8", "mixtral-8x7b"], choices=list(MODELS))
    p.add_argument("--tokens", type=int_at_least(0), nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--candidates", type=int_at_least(0), default=3, help="how many of CANDIDATES to time with tma")
    p.add_argument("--stacked-candidates", type=int_at_least(0), default=2, help="... and with tma_stacked")
    p.add_argument("--repeats", type=int_at_least(1), default=10)
    p.add_argument("--budget-s", type=float, default=170.0, help="start no row after this many seconds")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    interp = interpreted()
    if not torch.cuda.is_available() and not interp:
        print("bench_grouped_gemm needs a CUDA GPU (or TRITON_INTERPRET=1 to check the script on CPU)")
        return 2
    start = time.time()
    device = torch.device("cpu" if interp else "cuda")
    dtype = torch.bfloat16
    timing = dict(repeats=args.repeats, warmup=3, device=device)
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
              f"capability {torch.cuda.get_device_capability()}", flush=True)
        print(f"dense bf16 matmul 8192^3: {_matmul_rate(8192, dtype, device, timing)['tflops']:.0f} TFLOP/s",
              flush=True)

    cases = {}  # (model, T) -> inputs, weights, expected output
    for model in args.models:
        L, K, H, I = MODELS[model]
        gen = torch.Generator(device=device).manual_seed(0)
        w13 = (torch.randn(L, 2 * I, H, device=device, generator=gen) * H ** -0.5).to(dtype)
        w2 = (torch.randn(L, H, I, device=device, generator=gen) * I ** -0.5).to(dtype)
        for T in args.tokens:
            x = torch.randn(T, H, device=device, generator=gen).to(dtype)
            ids = torch.rand(T, L, device=device, generator=gen).topk(K, dim=1).indices.to(torch.int32)
            weights = torch.rand(T, K, device=device, generator=gen)
            cases[(model, T)] = dict(x=x, ids=ids, weights=weights, w13=w13, w2=w2, L=L, K=K, H=H, I=I, T=T)

    def configs(case) -> list[tuple[str, object]]:
        """(label, BlockConfig or None for the raw baseline) in the order rows are run."""
        L, K, H, I, T = (case[k] for k in "LKHIT")

        def pick(kernel):
            return kernels.pick_config(T, L, K, H, I, dtype, device, interp, kernel)
        def candidates(kernel, count):
            out = [pick(kernel)]
            for m, n, k, g, w, s, flatten in CANDIDATES[:count]:
                tiles = kernels.GemmTiles(n, k, g, w, s, kernel, flatten)
                if kernels.BlockConfig(m, tiles, tiles) not in out:
                    out.append(kernels.BlockConfig(m, tiles, tiles))
            return [(f"{kernel} {_tiles(c)}", c) for c in out]
        # The baseline first: each later row's x raw is its time over the baseline's.
        return ([("grouped_mm (raw)", None), ("portable", pick("portable")), ("persistent", pick("persistent"))]
                + candidates("tma", args.candidates) + candidates("tma_stacked", args.stacked_candidates))

    rows, dead = [], None
    plan = [(i, key) for key in cases for i in range(len(configs(cases[key])))]
    plan.sort(key=lambda item: item[0])  # kernel by kernel across cases: the baseline and portable first
    print(f"{'model':<16} {'T':>6}  {'impl':<58} {'ms':>8} {'TFLOP/s':>8} {'x raw':>6}  check", flush=True)
    for index, key in plan:
        case = cases[key]
        label, cfg = configs(case)[index]
        row = dict(model=key[0], tokens=key[1], impl=label, block_config=None if cfg is None else cfg.to_json())
        rows.append(row)
        if time.time() - start > args.budget_s:
            row["error"] = "not run (budget)"
        elif dead is not None:
            row["error"] = f"not run (CUDA context lost: {dead})"
        else:
            try:
                _run_row(row, case, cfg, rows, timing)
            except Exception as err:  # noqa: BLE001 - reported on its row; the run goes on
                row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                row["traceback"] = traceback.format_exc(limit=4)
                if _context_lost(err):
                    dead = row["error"]
        _print_row(row)
    _summary(rows)
    print(f"done in {time.time() - start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _tiles(cfg) -> str:
    def one(t):
        return f"N{t.BLOCK_N} K{t.BLOCK_K} w{t.num_warps} s{t.num_stages}" + (" flat" if t.flatten else "")
    return f"M{cfg.BLOCK_M} " + (one(cfg.gemm1) if cfg.gemm1 == cfg.gemm2 else f"{one(cfg.gemm1)} / {one(cfg.gemm2)}")


def _run_row(row: dict, case: dict, cfg, rows: list, timing: dict) -> None:
    """Check and time one (case, kernel config) row; cfg None: the raw torch._grouped_mm baseline."""
    x, ids, weights, w13, w2 = (case[k] for k in ("x", "ids", "weights", "w13", "w2"))
    L, K, H, I, T = (case[k] for k in "LKHIT")
    flops = 2 * 3 * H * I * T * K
    with torch.inference_mode():
        if cfg is None:
            stats = measure(_grouped_mm_call([(x, TopKOutput(ids, weights))], ExpertWeights(w13, w2),
                                             MoeConfig(L, K, H, I)), **timing)
            row["check"] = "-"
        else:
            y = fused_experts(x, w13, w2, ids, weights, block_config=cfg)
            if x.is_cuda:
                torch.cuda.synchronize()
            if row["impl"] == "portable":
                err = _spot_error(x, ids, weights, w13, w2, y, I)
                row["check"] = f"rel err {err:.1e} vs fp32 on 8 tokens" + ("" if err < 2e-2 else "  WRONG")
                case["expected"] = y
            else:
                expected = case.get("expected")
                if expected is None:
                    row["check"] = "unchecked (no portable output)"
                else:
                    err = rel_err(y, expected)
                    row["check"] = f"rel err {err:.1e} vs portable" + ("" if err < 2e-2 else "  WRONG")
            stats = measure(lambda i: fused_experts(x, w13, w2, ids, weights, block_config=cfg), **timing)
    row["ms"] = stats.median_us / 1e3
    row["tflops"] = flops / (stats.median_us * 1e-6) / 1e12
    raw = next((r for r in rows if r["model"] == row["model"] and r["tokens"] == row["tokens"]
                and r["impl"] == "grouped_mm (raw)" and "ms" in r), None)
    row["vs_raw"] = raw["ms"] / row["ms"] if raw else None


def _spot_error(x, ids, weights, w13, w2, y, I) -> float:
    """The relative error of y's first 8 tokens against an fp32 recomputation, one (token, expert) at a time."""
    ref = torch.zeros(min(8, x.shape[0]), x.shape[1], device=x.device)
    for t in range(ref.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].float() @ x[t].float()
            a = torch.nn.functional.silu(h[:I]) * h[I:]
            ref[t] += weights[t, k] * (w2[e].float() @ a)
    return rel_err(y[:ref.shape[0]].double(), ref.double())


def _summary(rows: list) -> None:
    """Per case: the raw baseline, portable, and the fastest correct row of the other kernels."""
    print("\nsummary (TFLOP/s; x raw = raw time / row time)")
    for key in dict.fromkeys((r["model"], r["tokens"]) for r in rows):
        ok = [r for r in rows if (r["model"], r["tokens"]) == key and "ms" in r and "WRONG" not in r["check"]]
        by = {r["impl"]: r for r in ok}
        best = max((r for r in ok if r["impl"] not in ("portable", "grouped_mm (raw)")), key=lambda r: r["tflops"],
                   default=None)
        parts = [f"{name} {by[name]['tflops']:.0f}" for name in ("grouped_mm (raw)", "portable") if name in by]
        if best is not None:
            vs = f" ({best['vs_raw']:.2f}x raw)" if best.get("vs_raw") else ""
            parts.append(f"best other: {best['impl']} {best['tflops']:.0f}{vs}")
        print(f"  {key[0]:<16} T={key[1]:<6} " + "; ".join(parts), flush=True)


def _context_lost(err: BaseException) -> bool:
    """A CUDA fault (illegal address, launch failure) poisons every later call in this process."""
    text = str(err).lower()
    return any(s in text for s in ("illegal memory access", "illegal instruction", "unspecified launch failure",
                                   "misaligned address", "device-side assert"))


def _print_row(row) -> None:
    head = f"{row['model']:<16} {row['tokens']:>6}  {row['impl']:<58}"
    if "error" in row:
        print(f"{head} FAILED: {row['error']}", flush=True)
        return
    vs = f"{row['vs_raw']:.2f}" if row.get("vs_raw") else "-"
    print(f"{head} {row['ms']:8.3f} {row['tflops']:8.0f} {vs:>6}  {row['check']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
