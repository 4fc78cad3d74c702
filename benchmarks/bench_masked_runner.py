"""GPU check and benchmark of runner='masked' on deepep_ll's [L, M*R, H] layout (one GPU, bf16):

    python benchmarks/bench_masked_runner.py --out DIR          (--quick: fewer shapes and iterations)

1. Correctness, bf16: every config field at a small shape, and every benchmark shape, against the
   float64 reference on the rows below masked_m (rel. error <= 2e-2); padding rows poisoned with NaN
   must not change the valid rows; a CUDA graph captured once and replayed with fresh recv_x and
   masked_m equals the eager run.
2. Timing (CUDA events, median / p10 / p90 of --iters after warm-up) at DeepSeek-like sizes: H=7168,
   I=2048, M=128 tokens per rank, top-8, L in {32, 64} local experts, R in {2, 4} (E = L*R; masked_m
   drawn by routing M*R tokens uniformly, mean M*K/L rows per expert in a buffer of M*R rows):
   masked kernels for a few tile configs (eager and CUDA-graph replay of the best), beside
   torch._grouped_mm on the valid rows only (compacted beforehand, so its gather is not counted) and
   torch.bmm over the whole padded buffer (what ignoring masked_m costs).
Writes DIR/bench_masked_runner.json and DIR/bench_masked_runner.md; prints the markdown.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ep_runtime.bench import measure
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.reference import expert_reference, rel_err
from ep_runtime.runners.masked_runner import MaskedRunner, MaskedTiles

TILE_CANDIDATES = [
    MaskedTiles(),  # the default
    MaskedTiles(16, 64, 128, 128, 4, 4),
    MaskedTiles(32, 64, 64, 128, 4, 4),
    MaskedTiles(32, 32, 64, 256, 4, 3),
    MaskedTiles(16, 32, 64, 256, 4, 4),
    MaskedTiles(64, 128, 128, 64, 8, 3),
]
CONFIG_FIELDS = {
    "silu": {}, "gelu": dict(activation="gelu"), "gelu_tanh": dict(activation="gelu_tanh"),
    "not_gated": dict(is_gated=False), "bias": dict(has_bias=True),
    "gpt_oss": dict(gemm1_alpha=1.702, gemm1_clamp_limit=7.0, has_bias=True),
    "routed_scaling_factor": dict(routed_scaling_factor=2.5),
}


def cuda_time(fn, iters: int, warmup: int = 5) -> dict:
    """Median, p10, p90 in microseconds of fn(): ep_runtime.bench.measure (one CUDA-event pair per call)."""
    stats = measure(lambda _: fn(), repeats=iters, warmup=warmup, device=torch.device("cuda"))
    return {"median_us": stats.median_us, "p10_us": stats.p10_us, "p90_us": stats.p90_us}


def routed_masked_m(M: int, R: int, K: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of this rank's L experts (global 0..L-1 of E = L*R) when every rank sends M tokens, each
    to K distinct experts chosen uniformly."""
    ids = torch.rand(M * R, L * R, generator=gen, device="cuda").topk(K, dim=1).indices
    return torch.bincount(ids[ids < L], minlength=L).to(torch.int32)


def make_weights(config: MoeConfig, L: int, dtype, gen: torch.Generator) -> ExpertWeights:
    H, I = config.hidden_size, config.intermediate_size
    randn = lambda *s, std: (torch.randn(*s, generator=gen, device="cuda") * std).to(dtype)  # noqa: E731
    return ExpertWeights(randn(L, config.w13_rows, H, std=H ** -0.5), randn(L, H, I, std=I ** -0.5),
                         randn(L, config.w13_rows, std=0.1) if config.has_bias else None,
                         randn(L, H, std=0.1) if config.has_bias else None)


def poisoned_input(L: int, rows: int, H: int, masked_m: torch.Tensor, dtype, gen) -> torch.Tensor:
    x = torch.randn(L, rows, H, generator=gen, device="cuda").to(dtype)
    pad = torch.arange(rows, device="cuda")[None, :] >= masked_m.long()[:, None]
    return x.masked_fill(pad.unsqueeze(-1), float("nan"))


def check_against_reference(out, recv_x, masked_m, weights, config) -> float:
    """Worst relative error over experts (float64 reference on the valid rows)."""
    worst = 0.0
    f64 = lambda t, e: None if t is None else t[e].double()  # noqa: E731
    for e, m in enumerate(masked_m.tolist()):
        if m == 0:
            continue
        ref = config.routed_scaling_factor * expert_reference(
            recv_x[e, :m].double(), weights.w13[e].double(), weights.w2[e].double(), config,
            f64(weights.b13, e), f64(weights.b2, e))
        valid = out[e, :m]
        worst = max(worst, float("inf") if not torch.isfinite(valid).all() else rel_err(valid, ref))
    return worst


def correctness_fields(dtype, gen) -> list[dict]:
    rows_out = []
    L, rows, H, I = 8, 256, 1024, 512
    for name, fields in CONFIG_FIELDS.items():
        config = MoeConfig(L * 4, 8, H, I, **fields)
        weights = make_weights(config, L, dtype, gen)
        masked_m = torch.tensor([0, 1, 17, 64, 65, 200, 256, 3], dtype=torch.int32, device="cuda")
        recv_x = poisoned_input(L, rows, H, masked_m, dtype, gen)
        out = MaskedRunner(config).run_masked(recv_x, masked_m, weights)
        err = check_against_reference(out, recv_x, masked_m, weights, config)
        rows_out.append({"config": name, "rel_err": err, "ok": err <= 2e-2})
    return rows_out


def graph_check(runner, weights, L, rows, H, dtype, gen, M, R, K) -> dict:
    """Capture run_masked once; replay 3 times with fresh recv_x/masked_m copied in; == eager."""
    static_m = routed_masked_m(M, R, K, L, gen)
    static_x = poisoned_input(L, rows, H, static_m, dtype, gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            runner.run_masked(static_x, static_m, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = runner.run_masked(static_x, static_m, weights)
    ok = True
    for _ in range(3):
        m = routed_masked_m(M, R, K, L, gen)
        x = poisoned_input(L, rows, H, m, dtype, gen)
        static_m.copy_(m)
        static_x.copy_(x)
        graph.replay()
        eager = runner.run_masked(x, m, weights)
        for e, n in enumerate(m.tolist()):
            ok &= bool(torch.equal(static_out[e, :n], eager[e, :n]))
    return {"graph_replay_equals_eager": ok, "graph": graph, "out": static_out}


def torch_baselines(recv_x, masked_m, weights, config, iters) -> dict:
    L, rows, H = recv_x.shape
    I = config.intermediate_size
    valid = torch.arange(rows, device="cuda")[None, :] < masked_m.long()[:, None]
    compact = recv_x[valid]  # [P, H] valid rows grouped by expert
    offs = masked_m.cumsum(0).to(torch.int32)
    w13_t, w2_t = weights.w13.transpose(1, 2), weights.w2.transpose(1, 2)
    padded = torch.nan_to_num(recv_x)

    def grouped():
        h = torch._grouped_mm(compact, w13_t, offs=offs)
        return torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2_t, offs=offs)

    def bmm_padded():
        h = torch.bmm(padded, w13_t)
        return torch.bmm(F.silu(h[..., :I]) * h[..., I:], w2_t)

    result = {}
    for name, fn in (("torch_grouped_mm_valid_rows", grouped), ("torch_bmm_padded", bmm_padded)):
        try:
            result[name] = cuda_time(fn, iters)
        except Exception as exc:  # noqa: BLE001 - a missing op must not hide the other numbers
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for bench_masked_runner.json / .md")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="one shape, two tile configs, 20 iterations")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype, M, K, H, I = torch.bfloat16, 128, 8, 7168, 2048
    shapes = [(32, 2), (32, 4), (64, 2), (64, 4)] if not args.quick else [(32, 4)]
    candidates = TILE_CANDIDATES if not args.quick else TILE_CANDIDATES[:2]
    iters = args.iters if not args.quick else 20
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bf16",
              "M": M, "K": K, "H": H, "I": I, "fields": [], "shapes": []}
    import triton
    report["triton"] = triton.__version__
    t0 = time.time()
    report["fields"] = correctness_fields(dtype, gen)
    print(f"config-field correctness done in {time.time() - t0:.0f} s", flush=True)

    weights_by_L = {}
    for L, R in shapes:
        rows = M * R
        config = MoeConfig(L * R, K, H, I)
        if L not in weights_by_L:
            weights_by_L.clear()
            torch.cuda.empty_cache()
            weights_by_L[L] = make_weights(config, L, dtype, gen)
        weights = weights_by_L[L]
        masked_m = routed_masked_m(M, R, K, L, gen)
        recv_x = poisoned_input(L, rows, H, masked_m, dtype, gen)
        P = int(masked_m.sum())
        active = int((masked_m > 0).sum())
        weight_bytes = active * (config.w13_rows * H + H * I) * 2
        entry = {"L": L, "R": R, "E": L * R, "buffer_rows": rows, "valid_rows": P,
                 "masked_m_mean": P / L, "masked_m_max": int(masked_m.max()), "tiles": []}
        best = None
        for tiles in candidates:
            row = {"tiles": asdict(tiles)}
            try:
                runner = MaskedRunner(config, tiles=tiles)
                with torch.no_grad():
                    out = runner.run_masked(recv_x, masked_m, weights)
                    clean = runner.run_masked(torch.nan_to_num(recv_x), masked_m, weights)
                    row["rel_err"] = check_against_reference(out, recv_x, masked_m, weights, config)
                    row["poison_free"] = all(bool(torch.equal(out[e, :m], clean[e, :m]))
                                             for e, m in enumerate(masked_m.tolist()))
                    row.update(cuda_time(lambda: runner.run_masked(recv_x, masked_m, weights), iters))
                row["weight_TBps"] = weight_bytes / (row["median_us"] * 1e-6) / 1e12
                row["TFLOPs"] = 6 * P * H * I / (row["median_us"] * 1e-6) / 1e12
                if best is None or row["median_us"] < best[1]["median_us"]:
                    best = (tiles, row)
            except Exception as exc:  # noqa: BLE001 - a tile that does not fit must not stop the sweep
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            entry["tiles"].append(row)
        if best is not None:
            runner = MaskedRunner(config, tiles=best[0])
            graph = graph_check(runner, weights, L, rows, H, dtype, gen, M, R, K)
            entry["graph_replay_equals_eager"] = graph["graph_replay_equals_eager"]
            entry["best_tiles"] = asdict(best[0])
            entry["best_eager"] = {k: best[1][k] for k in ("median_us", "p10_us", "p90_us", "weight_TBps")}
            entry["best_graph"] = cuda_time(graph["graph"].replay, iters)
            del graph
        entry["baselines"] = torch_baselines(recv_x, masked_m, weights, config, iters)
        report["shapes"].append(entry)
        print(f"L={L} R={R} done at {time.time() - t0:.0f} s", flush=True)

    (out_dir / "bench_masked_runner.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out_dir / "bench_masked_runner.md").write_text(md)
    print(md)


def markdown(report: dict) -> str:
    us = lambda d: f"{d['median_us']:.1f}" if "median_us" in d else d.get("error", "-")  # noqa: E731
    lines = [f"# runner='masked' on {report['device']} (torch {report['torch']}, triton {report['triton']}, bf16)", "",
             f"M={report['M']} tokens per rank, top-{report['K']}, H={report['H']}, I={report['I']}; "
             "median of CUDA-event timings in us.", "",
             "## Correctness of config fields (L=8, 256 buffer rows, H=1024, I=512)", "",
             "| config | rel. err | ok |", "| --- | --- | --- |"]
    lines += [f"| {f['config']} | {f['rel_err']:.2e} | {f['ok']} |" for f in report["fields"]]
    lines += ["", "## DeepSeek-like shapes", "",
              "| L | R | buffer rows | valid rows (mean/max per expert) | masked best eager | masked graph | "
              "weights TB/s | grouped_mm valid rows | bmm padded | rel. err | poison-free | graph == eager |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["shapes"]:
        ok_rows = [t for t in s["tiles"] if "median_us" in t]
        err = max((t["rel_err"] for t in ok_rows), default=float("nan"))
        poison = all(t["poison_free"] for t in ok_rows)
        be, bg = s.get("best_eager", {}), s.get("best_graph", {})
        lines.append(f"| {s['L']} | {s['R']} | {s['buffer_rows']} | {s['valid_rows']} ({s['masked_m_mean']:.1f}/"
                     f"{s['masked_m_max']}) | {us(be) if be else '-'} | {us(bg) if bg else '-'} | "
                     f"{be.get('weight_TBps', float('nan')):.2f} | {us(s['baselines']['torch_grouped_mm_valid_rows'])} | "
                     f"{us(s['baselines']['torch_bmm_padded'])} | {err:.2e} | {poison} | "
                     f"{s.get('graph_replay_equals_eager', '-')} |")
    lines += ["", "## Tile sweep (eager median us; tiles = BLOCK_M, BLOCK_N1, BLOCK_N2, BLOCK_K, warps, stages, splits)", ""]
    for s in report["shapes"]:
        cells = []
        for t in s["tiles"]:
            tiles = ",".join(str(v) for v in t["tiles"].values())
            cells.append(f"({tiles}) {us(t) if 'median_us' in t else 'error: ' + t['error'][:60]}")
        lines.append(f"- L={s['L']} R={s['R']}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
