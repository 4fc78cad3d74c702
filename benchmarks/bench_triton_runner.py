"""GPU checks and benchmark of the triton runner (one script, one device call).

    python benchmarks/bench_triton_runner.py [--tune] [--sweep gemm1 gemm2] [--shapes mixtral deepseek]
        [--out DIR] [--quick]

1. Roofline of this GPU: device-to-device copy bandwidth (read + write) and an 8192^3 bf16 matmul.
2. bf16 correctness against the float64 reference, for T in {1, 7, 64, 512, 4096, 16384}: a rank that
   owns 8 of 256 experts (global ids, mask [E+1], first_expert = 24, as the mori format gives it),
   K=8, some rows with every id -1 and some whose experts all live elsewhere (both must come out
   exactly zero); the torch runner's error alongside. Plus a fp32 check, a CUDA-graph capture/replay,
   and EPMoE(runner="triton") forward+backward in bf16 against the reference.
3. --tune: python -m ep_runtime.runners.triton_tune for both benchmark shapes, table -> DIR.
   --sweep gemm1 gemm2: re-pick each GEMM's tiles at --tune-tokens, keeping the table's BLOCK_M and the
   other GEMM's tiles (a wider list at T >= 4096); GEMM 1 is timed with the activation fused in its epilogue (the runner's path
   without an after_gemm1 hook), beside the unfused GEMM 1 + activation pass. Table -> the tree's copy and DIR.
4. Timing, triton vs the torch runner (torch._grouped_mm) in the same run: Mixtral-like (E=8, K=2,
   H=4096, I=14336) and DeepSeek-like (32 local experts of 256, K=8, H=7168, I=2048). CUDA events
   around each repeat, inputs rotated over 4 routings, median of the repeats. TFLOP/s counts
   2*3*H*I per computed pair; GB/s counts the weights of every expert hit, read once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ep_runtime import runners
from ep_runtime.bench import measure
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import RunnerInput
from ep_runtime.runners import triton_kernels as kernels
from ep_runtime.testing import check_layer, make_problem

DEV = torch.device("cuda")
LOG: list[Path] = []  # the Markdown log, appended line by line so a cut-off run keeps what it measured


def say(line: str = "") -> None:
    print(line, flush=True)
    for path in LOG:
        with path.open("a") as f:
            f.write(line + "\n")


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn(i) (i = call index, for rotating inputs): ep_runtime.bench.measure."""
    return measure(fn, repeats=repeats, warmup=warmup, device=DEV).median_us / 1e3


def roofline() -> dict:
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = median_ms(lambda i: dst.copy_(src), 20)
    copy_tbs = 2 * n * 2 / t / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t = median_ms(lambda i: a @ b, 20)
    mm_tflops = 2 * 8192 ** 3 / t / 1e9
    say(f"roofline: copy {copy_tbs:.2f} TB/s (read+write), bf16 8192^3 matmul {mm_tflops:.0f} TFLOP/s")
    return {"copy_TBps": copy_tbs, "matmul_TFLOPs": mm_tflops}


def mori_like_input(gen, T, E, K, L, first, H, dtype, all_minus_one_rows=3, elsewhere_rows=3):
    x = torch.randn(T, H, device=DEV, generator=gen).to(dtype)
    ids = torch.rand(T, E, device=DEV, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    # Bias a quarter of the tokens towards this rank's experts so every local expert sees pairs.
    pick = torch.rand(T, device=DEV, generator=gen) < 0.25
    local = first + torch.randint(0, L, (T,), device=DEV, generator=gen, dtype=torch.int32)
    ids[:, 0] = torch.where(pick & ~(ids == local[:, None]).any(1), local, ids[:, 0])
    n1 = min(all_minus_one_rows, T)
    ids[:n1] = -1
    n2 = min(elsewhere_rows, T - n1)
    if n2 > 0:
        ids[n1:n1 + n2] = torch.arange(K, device=DEV, dtype=torch.int32)  # experts 0..K-1: another rank's
    w = torch.rand(T, K, device=DEV, generator=gen)
    return x, ids, w


def correctness(quick: bool) -> dict:
    say("## bf16 correctness (rank owning experts 24..31 of E=256, K=8, H=1024, I=512)")
    E, K, L, first, H, I = 256, 8, 8, 24, 1024, 512
    cfg = MoeConfig(E, K, H, I)
    gen = torch.Generator(device=DEV).manual_seed(0)
    w13 = (torch.randn(L, 2 * I, H, device=DEV, generator=gen) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(L, H, I, device=DEV, generator=gen) * I ** -0.5).to(torch.bfloat16)
    weights = ExpertWeights(w13, w2)
    mask = torch.zeros(E + 1, dtype=torch.bool, device=DEV)
    mask[first:first + L] = True
    triton_backend, torch_backend = runners.create("triton", cfg), runners.create("torch", cfg)
    results = {}
    ok_all = True
    for T in ([1, 7, 64] if quick else [1, 7, 64, 512, 4096, 16384]):
        x, ids, w = mori_like_input(gen, T, E, K, L, first, H, torch.bfloat16)
        sink_ids = torch.where(ids < 0, torch.full_like(ids, E), ids)
        inp = RunnerInput(x, sink_ids, w, mask, first)
        y = triton_backend.run(inp, weights)
        y_torch = torch_backend.run(inp, weights)
        local_ids = torch.where((ids >= first) & (ids < first + L), ids - first, torch.full_like(ids, -1))
        ref = moe_reference(x, local_ids, w.double(), w13, w2, MoeConfig(L, K, H, I))
        zero_rows = min(6, T)
        err, err_torch = rel_err(y, ref), rel_err(y_torch, ref)
        zeros_ok = bool((y[:zero_rows] == 0).all()) and not bool(y.isnan().any())
        ok = err <= 2e-2 and zeros_ok
        ok_all &= ok
        results[T] = {"triton": err, "torch": err_torch, "zero_rows_ok": zeros_ok}
        say(f"T={T:6d}: rel err triton {err:.2e}, torch runner {err_torch:.2e}, "
            f"all--1/elsewhere rows zero and no NaN: {zeros_ok} -> {'OK' if ok else 'FAIL'}")

    # fp32 on GPU: the dots use input_precision="ieee", so DESIGN.md's 1e-5 holds.
    cfg32 = MoeConfig(8, 2, 256, 128)
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(100, 256, device=DEV, generator=g)
    w13f = torch.randn(8, 256, 256, device=DEV, generator=g) / 16
    w2f = torch.randn(8, 256, 128, device=DEV, generator=g) / 11
    ids = torch.randint(-1, 8, (100, 2), device=DEV, generator=g, dtype=torch.int32)
    w = torch.rand(100, 2, device=DEV, generator=g)
    err32 = rel_err(runners.fused_experts(x, w13f, w2f, ids, w), moe_reference(x, ids, w.double(), w13f, w2f, cfg32))
    ok_all &= err32 <= 1e-5
    say(f"fp32 fused_experts: rel err {err32:.2e} (bound 1e-5)")

    # CUDA graph: alignment is sync-free, so the whole sequence captures; replay equals eager.
    x, ids, w = mori_like_input(gen, 64, E, K, L, first, H, torch.bfloat16)
    inp = RunnerInput(x, torch.where(ids < 0, torch.full_like(ids, E), ids), w, mask, first)
    eager = triton_backend.run(inp, weights)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        triton_backend.run(inp, weights)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_backend.run(inp, weights)
    graph.replay()
    torch.cuda.synchronize()
    graph_ok = torch.equal(captured, eager)
    ok_all &= graph_ok
    say(f"CUDA graph replay equals eager: {graph_ok}")

    # The layer, forward and backward (the backward recomputes with torch ops).
    import ep_runtime as ep
    layer = ep.EPMoE(16, 4, 512, 256, runner="triton", dtype=torch.bfloat16, device="cuda")
    errors = check_layer(layer, make_problem(layer.config, [300], seed=3), 0)
    layer_ok = max(errors.values()) <= 2e-2
    ok_all &= layer_ok
    say("EPMoE(runner='triton') bf16 vs float64: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    say(f"correctness: {'ALL OK' if ok_all else 'FAILURES'}")
    return {"bf16": results, "fp32": err32, "cuda_graph": graph_ok, "layer": errors, "ok": ok_all}


SHAPES = {
    "mixtral": dict(E=8, L=8, K=2, H=4096, I=14336),
    "deepseek": dict(E=256, L=32, K=8, H=7168, I=2048),  # one rank of EP=8
}


def bench(shape: str, tokens, roof: dict, repeats: int) -> list[dict]:
    s = SHAPES[shape]
    E, L, K, H, I = s["E"], s["L"], s["K"], s["H"], s["I"]
    say(f"## {shape}: E={E}, L={L} local, K={K}, H={H}, I={I}, bf16")
    say("| T | pairs | experts hit | torch ms | triton ms | speedup | triton TFLOP/s | triton TB/s (weights) "
        "| % copy bw | % matmul | triton graph ms | graph TB/s | graph % copy | graph % matmul |")
    say("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cfg = MoeConfig(L, K, H, I)
    gen = torch.Generator(device=DEV).manual_seed(7)
    w13 = (torch.randn(L, 2 * I, H, device=DEV, generator=gen) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(L, H, I, device=DEV, generator=gen) * I ** -0.5).to(torch.bfloat16)
    weights = ExpertWeights(w13, w2)
    mask = torch.ones(L + 1, dtype=torch.bool, device=DEV)
    mask[L] = False
    backends = {"triton": runners.create("triton", cfg), "torch": runners.create("torch", cfg)}
    rows = []
    for T in tokens:
        # One rank's share (as ep-runtime bench and PLATFORM.md's baseline): T*K pairs spread uniformly
        # over the L local experts, K distinct experts per token.
        inputs = []
        for _ in range(4):
            ids = torch.rand(T, L, device=DEV, generator=gen).topk(K, dim=1).indices.to(torch.int32)
            x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
            inputs.append(RunnerInput(x, ids, torch.rand(T, K, device=DEV, generator=gen), mask, 0))
        pairs = statistics.mean(int((i.topk_ids < L).sum()) for i in inputs)
        hit = statistics.mean(int(torch.unique(i.topk_ids[i.topk_ids < L]).numel()) for i in inputs)
        med = {}
        with torch.inference_mode():
            for name, b in backends.items():
                med[name] = median_ms(lambda i: b.run(inputs[i % 4], weights), repeats)
            # The triton sequence is sync-free: a CUDA graph per input removes the host launch time.
            graphs = []
            b = backends["triton"]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                b.run(inputs[0], weights)
            torch.cuda.current_stream().wait_stream(side)
            for inp in inputs:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    b.run(inp, weights)
                graphs.append(g)
            med["graph"] = median_ms(lambda i: graphs[i % 4].replay(), repeats)
            del graphs
        flops = 2 * 3 * H * I * pairs
        wbytes = hit * 3 * H * I * 2
        t = med["triton"]
        row = dict(shape=shape, T=T, pairs=pairs, experts_hit=hit, triton_ms=t, torch_ms=med["torch"],
                   speedup=med["torch"] / t, triton_TFLOPs=flops / t / 1e9, triton_TBps=wbytes / t / 1e9,
                   torch_TFLOPs=flops / med["torch"] / 1e9, torch_TBps=wbytes / med["torch"] / 1e9)
        row["pct_copy"] = 100 * row["triton_TBps"] / roof["copy_TBps"]
        row["pct_matmul"] = 100 * row["triton_TFLOPs"] / roof["matmul_TFLOPs"]
        g = med["graph"]
        row.update(graph_ms=g, graph_TBps=wbytes / g / 1e9, graph_TFLOPs=flops / g / 1e9)
        row["graph_pct_copy"] = 100 * row["graph_TBps"] / roof["copy_TBps"]
        row["graph_pct_matmul"] = 100 * row["graph_TFLOPs"] / roof["matmul_TFLOPs"]
        rows.append(row)
        say(f"| {T} | {pairs:.0f} | {hit:.1f} | {med['torch']:.3f} | {t:.3f} | {row['speedup']:.2f}x | "
            f"{row['triton_TFLOPs']:.0f} | {row['triton_TBps']:.2f} | {row['pct_copy']:.0f}% | {row['pct_matmul']:.0f}% | "
            f"{g:.3f} | {row['graph_TBps']:.2f} | {row['graph_pct_copy']:.0f}% | {row['graph_pct_matmul']:.0f}% |")
    del w13, w2, weights, inputs
    torch.cuda.empty_cache()
    return rows

# Tiles tried by the sweeps: (BLOCK_N = weight rows per program, BLOCK_K, GROUP_M, warps, stages).
SWEEP_SMALL_M = [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 3), (128, 64, 1, 4, 4),
                 (128, 128, 1, 8, 3)]
SWEEP_LARGE_M = [(128, 64, 8, 4, 4), (128, 64, 8, 8, 3), (256, 64, 8, 8, 3), (256, 64, 8, 8, 4), (256, 64, 16, 8, 3),
                 (256, 64, 16, 8, 4), (256, 64, 4, 8, 4), (256, 32, 8, 8, 6), (128, 128, 8, 8, 3), (128, 64, 8, 8, 4)]
# T >= 4096 (compute-bound): more orderings (GROUP_M) and pipeline depths around 128 x 256 with 8 warps.
SWEEP_LARGE_T = SWEEP_LARGE_M + [(256, 64, 32, 8, 4), (256, 64, 2, 8, 4), (256, 32, 8, 8, 5),
                                 (256, 128, 8, 8, 2), (256, 64, 1, 8, 4)]


def sweep(shape: str, tokens, gemm: str, repeats: int = 10) -> None:
    """Re-pick one GEMM's tiles per token count, keeping the table's BLOCK_M and the other GEMM's tiles;
    GEMM 1 is timed with the activation fused (the runner's path without an after_gemm1 hook), beside
    the unfused GEMM 1 + activation pass. Writes the tree's table."""
    s = SHAPES[shape]
    L, K, H, I = s["L"], s["K"], s["H"], s["I"]
    say(f"## {gemm} sweep, {shape}: L={L}, K={K}, H={H}, I={I}")
    gen = torch.Generator(device=DEV).manual_seed(3)
    if gemm == "gemm1":
        w = (torch.randn(L, 2 * I, H, device=DEV, generator=gen) * H ** -0.5).to(torch.bfloat16)
    else:
        w = (torch.randn(L, H, I, device=DEV, generator=gen) * I ** -0.5).to(torch.bfloat16)
    mask = torch.ones(L + 1, dtype=torch.bool, device=DEV)
    mask[L] = False
    path = kernels.device_file(torch.cuda.get_device_name())
    table = json.loads(path.read_text()) if path.exists() else {}
    entries = table.setdefault(kernels.shape_key(L, K, H, I, torch.bfloat16), {})

    def med(fn):
        return median_ms(lambda i: fn(), repeats, warmup=2)

    for T in tokens:
        cfg = kernels.pick_config(T, L, K, H, I, torch.bfloat16, DEV, False)
        ids = torch.rand(T, L, device=DEV, generator=gen).topk(K, dim=1).indices.to(torch.int32)
        aligned = kernels.align_pairs(ids, mask, 0, L, cfg.BLOCK_M)
        a = torch.randn(T * K, I, device=DEV, generator=gen).to(torch.bfloat16)
        note = ""
        if gemm == "gemm1":
            x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
            h = torch.empty(T * K, 2 * I, device=DEV, dtype=torch.bfloat16)
            unfused = med(lambda: (kernels.grouped_gemm(x, w, h, aligned, cfg.gemm1, K),
                                   kernels.act_and_mul(h, I, computed=aligned.computed, out=a)))
            note = f"unfused GEMM1+act {unfused:.3f} ms; "
            run = lambda tiles: kernels.grouped_gemm(x, w, a, aligned, tiles, K, fuse_activation="silu")  # noqa: E731
        else:
            o = torch.empty(T * K, H, device=DEV, dtype=torch.bfloat16)
            run = lambda tiles: kernels.grouped_gemm(a, w, o, aligned, tiles, 1)  # noqa: E731
        current = getattr(cfg, gemm)
        listed = SWEEP_SMALL_M if cfg.BLOCK_M <= 32 else (SWEEP_LARGE_T if T >= 4096 else SWEEP_LARGE_M)
        cands = [current] + [kernels.GemmTiles(*t) for t in listed]
        results = []
        for tiles in dict.fromkeys(cands):
            try:
                results.append((med(lambda: run(tiles)), tiles))
            except Exception as exc:  # noqa: BLE001 - out of shared memory etc.
                say(f"  T={T} {tiles}: skipped ({type(exc).__name__})")
        best_ms, best = min(results, key=lambda r: r[0])
        say(f"T={T} BLOCK_M={cfg.BLOCK_M}: {note}{gemm} with the table's tiles {results[0][0]:.3f} ms; "
            f"best {best_ms:.3f} ms {asdict(best)}")
        entry = cfg.to_json()
        entry[gemm] = asdict(best)
        entries[str(T)] = entry
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    kernels._load_table.cache_clear()
    del w
    torch.cuda.empty_cache()


def profile(shape: str, T: int) -> None:
    """Where the time of one small call goes: host time per call, graph-replay time, kernel table."""
    s = SHAPES[shape]
    L, K, H, I = s["L"], s["K"], s["H"], s["I"]
    cfg = MoeConfig(L, K, H, I)
    w13 = torch.randn(L, 2 * I, H, device=DEV).to(torch.bfloat16) * H ** -0.5
    w2 = torch.randn(L, H, I, device=DEV).to(torch.bfloat16) * I ** -0.5
    weights = ExpertWeights(w13, w2)
    mask = torch.ones(L + 1, dtype=torch.bool, device=DEV)
    mask[L] = False
    ids = torch.rand(T, L, device=DEV).topk(K, dim=1).indices.to(torch.int32)
    inp = RunnerInput(torch.randn(T, H, device=DEV).to(torch.bfloat16), ids, torch.rand(T, K, device=DEV), mask, 0)
    b = runners.create("triton", cfg)
    with torch.inference_mode():
        for _ in range(3):
            b.run(inp, weights)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            b.run(inp, weights)
        host = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            b.run(inp, weights)
        replay = median_ms(lambda i: graph.replay(), 20)
        say(f"profile {shape} T={T}: host {host:.3f} ms per call (launch only), graph replay {replay:.3f} ms")
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                b.run(inp, weights)
            torch.cuda.synchronize()
        say(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14))
        say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--tune", action="store_true", help="tune both shapes first, write the table to --out")
    p.add_argument("--sweep", nargs="+", choices=["gemm1", "gemm2"], default=[],
                   help="re-pick these GEMMs' tiles at --tune-tokens (after --tune, if given); table -> --out")
    p.add_argument("--tune-tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096, 16384])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096, 16384])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                   help="shapes to sweep and benchmark (default: both)")
    p.add_argument("--profile", action="store_true", help="only profile small calls, then exit")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    LOG.append(args.out / "bench_triton_runner.md")
    name = torch.cuda.get_device_name()
    say(f"# {name}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, command: {' '.join(sys.argv)}")
    if args.profile:
        for shape, T in (("mixtral", 1), ("mixtral", 16)):
            profile(shape, T)
        return
    result = {"device": name, "roofline": roofline()}
    if not args.skip_correctness:
        result["correctness"] = correctness(args.quick)
    if args.tune:
        from ep_runtime.runners import triton_tune
        table_path = kernels.device_file(name)  # the tree's copy, so the benchmark below uses it
        for shape in ("mixtral", "deepseek"):
            s = SHAPES[shape]
            t0 = time.time()
            triton_tune.tune(s["L"], s["K"], s["H"], s["I"], torch.bfloat16, args.tune_tokens, table_path,
                             repeats=5, log=say)
            say(f"tuned {shape} in {time.time() - t0:.0f} s")
        (args.out / table_path.name).write_text(table_path.read_text())
    if args.sweep:
        for gemm in args.sweep:
            for shape in args.shapes:
                sweep(shape, args.tune_tokens, gemm)
        table_path = kernels.device_file(name)
        (args.out / table_path.name).write_text(table_path.read_text())
    result["bench"] = []
    for shape in args.shapes:
        result["bench"] += bench(shape, args.tokens, result["roofline"], args.repeats)
        (args.out / "bench_triton_runner.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
