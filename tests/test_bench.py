"""`ep-runtime bench`: the timing helpers measure what they claim; the CPU run yields sane JSON."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from ep_runtime import bench
from ep_runtime.bench.timing import graph_replays
from ep_runtime.testing import run_ranks

CPU = torch.device("cpu")


def _within(measured_us: float, expected_s: float, tol: float = 0.10) -> bool:
    """Within tol of a sleep of expected_s; late by up to 5 ms more on a loaded machine (a sleeping thread
    wakes when the scheduler lets it: never early, sometimes late)."""
    measured = measured_us * 1e-6
    return expected_s * (1 - tol) <= measured <= expected_s * (1 + tol) + 5e-3


def test_measure_cpu_sleep_within_10_percent():
    stats = bench.measure(lambda i: time.sleep(0.02), repeats=7, warmup=1, device=CPU)
    assert stats.method == "wall" and stats.repeats == 7
    assert _within(stats.median_us, 0.02), stats
    assert stats.min_us <= stats.p10_us <= stats.median_us <= stats.p90_us


def test_setup_and_teardown_are_not_timed():
    stats = bench.measure(lambda arg: time.sleep(0.01), setup=lambda i: time.sleep(0.03),
                          teardown=lambda arg, result: time.sleep(0.03), repeats=5, warmup=0, device=CPU)
    assert _within(stats.median_us, 0.01), stats


def test_measure_passes_repeat_index_for_rotation():
    seen = []
    bench.measure(seen.append, setup=lambda i: i % 3, repeats=4, warmup=2, device=CPU)
    assert seen == [0, 1, 2, 0, 1, 2]


def test_measure_interleaved_alternates_the_functions_and_times_each():
    calls = []
    fast, slow = bench.measure_interleaved((lambda i: (calls.append(("fast", i)), time.sleep(0.01)),
                                            lambda i: (calls.append(("slow", i)), time.sleep(0.03))),
                                           repeats=3, warmup=1, device=CPU)
    assert calls == [(name, i) for i in range(4) for name in ("fast", "slow")]  # a, b, a, b with arguments 0, 1, ...
    assert fast.repeats == slow.repeats == 3
    assert _within(fast.median_us, 0.01) and _within(slow.median_us, 0.03), (fast, slow)


def test_measure_interleaved_in_blocks_times_each_call():
    """calls=3: a repeat is three back-to-back calls of one function (arguments keep counting), and the
    times are per call."""
    calls = []
    fast, slow = bench.measure_interleaved((lambda i: (calls.append(("fast", i)), time.sleep(0.01)),
                                            lambda i: (calls.append(("slow", i)), time.sleep(0.03))),
                                           repeats=2, warmup=1, device=CPU, calls=3)
    assert calls == [(name, 3 * r + j) for r in range(3) for name in ("fast", "slow") for j in range(3)]
    assert fast.repeats == slow.repeats == 2
    assert _within(fast.median_us, 0.01) and _within(slow.median_us, 0.03), (fast, slow)
    with pytest.raises(ValueError, match="calls=0"):
        bench.measure_interleaved((lambda i: None,), repeats=1, warmup=0, device=CPU, calls=0)


def test_vs_raw_is_the_baselines_time_over_the_rows_from_paired_blocks():
    from ep_runtime.bench.runner import _time
    stats, vs_raw = _time(lambda i: time.sleep(0.01), "eager", 1, dict(repeats=2, warmup=0, device=CPU, group=None),
                          paired=lambda i: time.sleep(0.03))
    assert _within(stats.median_us, 0.01) and abs(vs_raw - 3.0) < 0.3, (stats, vs_raw)
    assert _time(lambda i: None, "eager", 1, dict(repeats=1, warmup=0, device=CPU, group=None))[1] is None


def _slow_rank_one(rank, world_size):
    import torch.distributed as dist
    stats = bench.measure(lambda i: time.sleep(0.04 if rank == 1 else 0.01), repeats=5, warmup=1,
                          device=torch.device("cpu"), group=dist.group.WORLD)
    return stats.median_us


def test_repeat_time_is_the_slowest_ranks():
    medians = run_ranks(_slow_rank_one, 2, timeout=60)
    for median in medians:
        assert _within(median, 0.04), medians


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_measure_a_sleep_kernel_within_10_percent():
    device = torch.device("cuda")
    cycles = 10_000_000
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    expected = (time.perf_counter() - t0) / 5
    stats = bench.measure(lambda i: torch.cuda._sleep(cycles), repeats=10, warmup=2, device=device)
    assert stats.method == "cuda_events"
    assert _within(stats.median_us, expected), (stats, expected)
    graph = bench.measure_cuda_graph(lambda k: torch.cuda._sleep(cycles), repeats=10, warmup=2, rotate=2,
                                     device=device)
    assert graph.method == "cuda_graph" and _within(graph.median_us, expected), (graph, expected)
    # Host time: the launch alone (no sync after it), far below the kernel's 10^7 cycles.
    assert stats.host_us < 0.2 * stats.median_us and graph.host_us < 0.2 * graph.median_us, (stats, graph)
    # A replay of tiny kernels: the events time its device work, not its submission (measure_cuda_graph keeps
    # the GPU busy meanwhile). Timed with the replay's submission on an idle GPU, it takes longer.
    x = torch.ones(64, device=device)
    tiny = bench.measure_cuda_graph(lambda k: [x.add_(1) for _ in range(4)], repeats=30, warmup=3, rotate=1, device=device)
    replay = graph_replays(lambda k: [x.add_(1) for _ in range(4)], 1, device)
    submitted = bench.measure(replay, repeats=30, warmup=3, device=device)
    assert tiny.median_us < submitted.median_us, (tiny, submitted)


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 10) == pytest.approx(1.4)
    assert bench.percentile(values, 90) == pytest.approx(4.6)
    assert bench.percentile([7.0], 90) == 7.0


def test_bytes_count_each_token_once_per_other_rank():
    # E=8 over R=4 ranks: experts 2r, 2r+1 live on rank r.
    ids = torch.tensor([[0, 1], [2, 3], [0, 6], [4, -1], [-1, -1]], dtype=torch.int32)
    dest = bench.tokens_per_destination(ids, 8, 4)
    assert dest.tolist() == [[True, False, False, False], [False, True, False, False],
                             [True, False, False, True], [False, False, True, False],
                             [False, False, False, False]]
    # rank 0 sends token 1 to rank 1, token 2 to rank 3, token 3 to rank 2: 3 rows of H=16 fp32.
    assert bench.bytes_leaving_rank(ids, 8, 4, rank=0, hidden_size=16, itemsize=4) == 3 * 16 * 4


def test_fp8_rows_report_their_time_over_the_same_dispatchers_unquantized_one():
    """--fp8: each " fp8" row's median time over the same dispatcher's, same op and shape (the fp8
    dispatch target is this ratio), printed in the dispatch table; other rows and unmatched ones: none."""
    from ep_runtime.bench.dispatch import _add_baseline_ratios
    from ep_runtime.bench.report import render_text
    from ep_runtime.bench.settings import Results

    def row(impl, op, median_us, T=4096):
        return dict(impl=impl, op=op, num_experts=256, top_k=8, hidden_size=7168, tokens_per_rank=T, world_size=2,
                    dtype="bfloat16", median_us=median_us, p10_us=median_us, p90_us=median_us, bytes_per_rank=1.0,
                    gbps=None)

    rows = [row("deepep_normal", "dispatch", 1000.0), row("deepep_normal fp8", "dispatch", 550.0),
            row("deepep_normal", "combine", 300.0), row("deepep_normal fp8", "combine", 330.0),
            row("deepep_normal fp8", "dispatch", 90.0, T=128), row("mori fp8", "dispatch", 70.0)]
    _add_baseline_ratios(rows)
    assert [r["vs_unquantized"] for r in rows] == [None, pytest.approx(0.55), None, pytest.approx(1.1), None, None]
    lines = render_text(Results(dispatch=rows)).splitlines()
    assert lines[1].rstrip().endswith("time vs unquantized")
    assert lines[4].rstrip().endswith("0.55") and lines[3].rstrip().endswith("-")


def test_runner_problem_keeps_t_times_k_pairs():
    gen = torch.Generator().manual_seed(0)
    x, topk, pairs, touched = bench.runner_problem(gen, 10, 1, 2, 8, torch.float32, CPU)  # L=1 < K=2
    assert pairs == 20 and x.shape == (20, 8) and topk.topk_ids.shape == (20, 1) and touched == 1
    x, topk, pairs, _ = bench.runner_problem(gen, 10, 8, 2, 8, torch.float32, CPU)
    assert pairs == 20 and topk.topk_ids.shape == (10, 2) and int(topk.topk_ids.max()) < 8
    assert all(len(set(row)) == 2 for row in topk.topk_ids.tolist())  # K distinct experts per token


def test_host_time_is_the_wall_time_on_cpu():
    stats = bench.measure(lambda i: time.sleep(0.01), repeats=3, warmup=0, device=CPU)
    assert stats.host_us == stats.median_us


def _tiny_settings(**changes) -> "bench.Settings":
    values = dict(preset="tiny", tokens=[4], hidden_sizes=[64], num_experts=[8], top_ks=[2], intermediate_size=32,
                  dtype="fp32", suites=["runner"], dispatchers=None, runners=None, runner_ep_size=None, warmup=0,
                  repeats=1, rotate=1, cuda_graph=False, seed=0, progress=False)
    return bench.Settings(**{**values, **changes})


def test_masked_runner_is_timed_through_the_layers_path_under_deepep_ll():
    """The runner suite feeds every runner a dispatcher's output through MoeRunner: masked gets
    deepep_ll's expert-major layout that way (run under the Triton interpreter here)."""
    from ep_runtime import runners
    if "masked" not in runners.available():
        pytest.skip("runner='masked' cannot run here (needs triton with CUDA or TRITON_INTERPRET=1)")
    results = bench.runner_suite(_tiny_settings(runners=["masked"], runner_formats=["deepep_ll"]), CPU,
                                 ep_size=1, progress=False)
    masked = [r for r in results.runner if r["impl"] == "masked"]
    assert len(masked) == 1 and masked[0]["format"] == "deepep_ll" and masked[0]["pairs"] == 8
    assert _finite_positive(masked[0]["host_us"]) and _finite_positive(masked[0]["pct_roofline"])
    assert {r["impl"] for r in results.roofline} == {"copy", "matmul"}


def test_sustained_matmul_row_loads_the_device_first_then_times_the_same_product():
    """The roofline's "matmul (sustained)" row: timed after sustain_s of back-to-back matmuls (the power
    cap a long runner row runs at on a GPU); same product, same rate formula."""
    from ep_runtime.bench.runner import _matmul_rate
    timing = dict(repeats=3, warmup=1, device=CPU)
    start = time.perf_counter()
    row = _matmul_rate(64, torch.float32, CPU, timing, sustain_s=0.2)
    assert time.perf_counter() - start >= 0.2
    assert row["impl"] == "matmul (sustained)" and row["size"] == "64x64x64"
    assert row["tflops"] == pytest.approx(2 * 64 ** 3 / (row["median_us"] * 1e-6) / 1e12)
    assert _matmul_rate(64, torch.float32, CPU, timing)["impl"] == "matmul"


def test_a_pair_that_does_not_run_is_skipped_with_its_format():
    results = bench.runner_suite(_tiny_settings(runners=["torch"], runner_formats=["standard"], tokens=[3]),
                                 CPU, ep_size=2, progress=False)
    assert [(r["impl"], r["format"]) for r in results.runner] == [("torch", "standard"),
                                                                  ("grouped_mm (raw)", "pre-grouped")]
    assert results.runner[0]["local_experts"] == 4 and results.runner[0]["speedup_vs_torch"] == 1.0
    deepep_ll_over_capacity = bench.runner_suite(
        _tiny_settings(runners=["torch"], runner_formats=["deepep_ll"], tokens=[200]), CPU, ep_size=1,
        progress=False)
    assert not [r for r in deepep_ll_over_capacity.runner if r["impl"] == "torch"]
    assert any("deepep_ll" in s["reason"] and "200" in s["reason"] for s in deepep_ll_over_capacity.skipped)


def test_a_baseline_that_cannot_run_leaves_the_runner_rows(monkeypatch):
    """torch._grouped_mm failing here: the raw row is listed as skipped, every runner row stays (with no
    vs raw), and fp8 rows are never paired with the unquantized baseline."""
    def broken(*args, **kwargs):
        raise RuntimeError("no grouped GEMM on this device")

    monkeypatch.setattr(torch, "_grouped_mm", broken)
    results = bench.runner_suite(_tiny_settings(runners=["torch"], runner_formats=["standard"], fp8=True), CPU,
                                 ep_size=1, progress=False)
    assert [(r["impl"], r["speedup_vs_raw"]) for r in results.runner] == [("torch", None), ("torch fp8", None)]
    assert any(s["impl"] == "grouped_mm (raw)" and "no grouped GEMM" in s["reason"] for s in results.skipped)
    monkeypatch.undo()
    paired = bench.runner_suite(_tiny_settings(runners=["torch"], runner_formats=["standard"], fp8=True), CPU,
                                ep_size=1, progress=False)
    vs = {r["impl"]: r["speedup_vs_raw"] for r in paired.runner}
    assert _finite_positive(vs["torch"]) and vs["torch fp8"] is None and vs["grouped_mm (raw)"] is None


def test_triton_fp8_rows_under_another_fp8_gemm_are_their_own_rows_or_skipped_with_why():
    """--triton-fp8-gemm gluon: the triton runner's fp8 rows once more with EP_RUNTIME_TRITON_FP8_GEMM=gluon
    ("triton fp8 gluon", standard format): where that path cannot run (here: no GPU, sizes under 512) the row
    is skipped with the runner's error naming the knob, the other rows stay, and the knob is as before after."""
    from ep_runtime import envs, runners
    if "triton" not in runners.available():
        pytest.skip("runner='triton' cannot run here (needs triton with CUDA or TRITON_INTERPRET=1)")
    results = bench.runner_suite(_tiny_settings(runners=["triton"], runner_formats=["standard", "deepep_ll"],
                                                fp8=True, triton_fp8_gemms=["gluon"]), CPU, ep_size=1, progress=False)
    impls = [(r["impl"], r["format"]) for r in results.runner]
    assert ("triton fp8", "standard") in impls and ("triton fp8", "deepep_ll") in impls
    gluon = [s for s in results.skipped if s["impl"] == "triton fp8 gluon"]
    assert len(gluon) == 1 and "EP_RUNTIME_TRITON_FP8_GEMM='gluon' cannot run here" in gluon[0]["reason"], gluon
    assert gluon[0]["reason"].startswith("standard ")
    assert envs.get("TRITON_FP8_GEMM") == "auto"


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cli_cpu_run_writes_sane_json(tmp_path):
    from ep_runtime import dispatchers
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = [sys.executable, "-m", "ep_runtime", "bench", "--preset", "tiny", "--tokens", "4,32",
            "--repeats", "3", "--warmup", "1", "--rotate", "2", "--runners", "torch", "--no-progress",
            "--json", str(out_json), "--markdown", str(out_md)]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(tmp_path / "bench.png")]
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)  # (a hang fails, not a slow host)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all_to_all_single" in proc.stdout and "runner" in proc.stdout

    data = json.loads(out_json.read_text())
    assert set(data) == {"meta", "dispatch", "runner", "roofline", "skipped", "eplb", "overlap"}
    assert data["eplb"] == []  # the eplb suite runs only when asked for (--suite eplb)
    meta = data["meta"]
    assert meta["world_size"] == 2 and meta["launcher"] == "spawn" and meta["command"].startswith("ep-runtime bench")
    rows = data["dispatch"]
    for T in (4, 32):
        base = [r for r in rows if r["tokens_per_rank"] == T and r["op"] == "all_to_all"]
        assert len(base) == 1 and _finite_positive(base[0]["gbps"])
        for name in dispatchers.registered() + ["deepep_normal static", "mori static"]:
            ops = {r["op"] for r in rows if r["impl"] == name and r["tokens_per_rank"] == T}
            skipped = [s for s in data["skipped"] if s["impl"] == name and s["tokens_per_rank"] == T]
            expected = {"dispatch", "combine", "round_trip"}
            if name.startswith("deepep_normal"):  # its dispatch takes the handle of an earlier one
                expected.add("dispatch (reused handle)")
            # every dispatcher runs on CPU ranks: the bench turns an exception inside one into a `skipped` row, so
            # "or skipped" (as this read) passed a dispatcher that failed
            assert ops == expected and not skipped, (name, T, ops, skipped)
    for r in rows + data["runner"] + data["roofline"]:
        for key in ("median_us", "p10_us", "p90_us", "mean_us", "min_us", "host_us"):
            assert _finite_positive(r[key]), (key, r)
        assert r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["repeats"] == 3 and r["method"] == "wall"
    for r in rows:
        assert r["gbps"] is None or _finite_positive(r["gbps"])
        assert r["bytes_per_rank"] >= 0
    std = [r for r in rows if r["impl"] == "standard"]
    assert std and all(r["bytes_per_rank"] == 0 and r["gbps"] is None for r in std)  # moves nothing
    runner_rows = data["runner"]
    for fmt in ("standard", "deepep_ll"):  # the torch runner under each format, fed by that dispatcher
        assert {r["tokens_per_rank"] for r in runner_rows if r["impl"] == "torch" and r["format"] == fmt} == {4, 32}
    assert {r["tokens_per_rank"] for r in runner_rows if r["impl"] == "grouped_mm (raw)"} == {4, 32}
    for r in runner_rows:
        assert _finite_positive(r["tflops"]) and _finite_positive(r["weight_gbps"]) and r["mode"] == "eager"
        assert r["local_experts"] == 8 and r["pairs"] == r["tokens_per_rank"] * 4
    torch_rows = [r for r in runner_rows if r["impl"] == "torch"]
    assert all(r["speedup_vs_torch"] == 1.0 for r in torch_rows)
    # Every unquantized runner row was timed interleaved with the raw baseline; the baseline's own row was not.
    assert all(_finite_positive(r["speedup_vs_raw"]) for r in torch_rows)
    assert all(r["speedup_vs_raw"] is None for r in runner_rows if r["impl"] == "grouped_mm (raw)")
    assert {r["impl"] for r in data["roofline"]} == {"copy", "matmul"}
    md = out_md.read_text()
    assert "| E | K | H |" in md and "| host us |" in md

    # A run's JSON renders again elsewhere (a GPU run's, plotted on a machine with matplotlib).
    again = tmp_path / "again.md"
    assert bench.main(["--from-json", str(out_json), "--markdown", str(again)]) == 0
    assert again.read_text() == out_md.read_text()


def test_plot_without_matplotlib_names_the_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match="pip install 'ep-runtime\\[bench\\]'"):
        bench.plot(bench.Results(), "x.png")
    with pytest.raises(SystemExit):  # nothing else would be kept: refused before the run
        bench.main(["--plot", str(tmp_path / "x.png")])
    assert "needs matplotlib" in capsys.readouterr().err
    # With --json the results are kept and the plot fails at the end, naming the package.
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps({"meta": {}, "dispatch": [], "runner": [], "skipped": []}))  # an older run's keys
    assert bench.main(["--from-json", str(saved), "--json", str(tmp_path / "copy.json"),
                       "--plot", str(tmp_path / "x.png")]) == 2
    assert (tmp_path / "copy.json").exists() and "needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--suite", "nope"], "allowed dispatch, runner"),
    (["--runner-formats", "standard,nope"], "--runner-formats standard,nope: allowed deepep_ll,"),
    (["--tokens", "a,b"], "not a comma-separated list"),
    (["--preset", "gpt9"], "invalid choice: 'gpt9'"),
    (["--experts", "4", "--top-k", "8"], "--top-k 8 is more than --experts 4"),
    (["--experts", "8,9", "--top-k", "2", "--world-size", "3"], "--experts 8: the dispatch suite divides E over the 3"),
    (["--suite", "runner", "--experts", "8", "--top-k", "2", "--runner-ep-size", "3"], "--experts 8: the runner suite"),
    # eplb's layer without copies and overlap's layers shard E too: every row was skipped, after the whole run
    (["--suite", "eplb", "--world-size", "3"], "--experts 16: the eplb suite divides E over the 3 ranks"),
    (["--suite", "overlap", "--world-size", "3"], "--experts 16: the overlap suite divides E over the 3 ranks"),
    (["--fp8", "--triton-fp8-gemm", "cublas"], "--triton-fp8-gemm cublas: allowed auto, triton, gluon"),
    (["--triton-fp8-gemm", "gluon"], "--triton-fp8-gemm times fp8 rows: add --fp8"),
    (["--fp8", "--triton-fp8-gemm", "gluon", "--runner-formats", "deepep_ll"], "keep both in --runners and --runner-formats"),
    (["--fp8", "--triton-fp8-gemm", "gluon", "--runners", "masked"], "keep both in --runners and --runner-formats"),
    # fp8 rows are the runner suite's and fp8 dispatchers': other suites ran without them, no word
    (["--dtype", "fp8", "--suite", "eplb"], "--dtype fp8 adds fp8 rows to the runner suite and to the dispatch suite's "
     "deepep_normal, deepep_ll, mori; --suite eplb would time none"),
    (["--fp8", "--suite", "dispatch,overlap", "--dispatchers", "standard"], "--suite dispatch,overlap --dispatchers "
     "standard would time none; allowed: --suite with runner, or dispatch with one of those dispatchers"),
    (["--suite", "eplb", "--redundant-experts", "3", "--world-size", "2"],
     "--redundant-experts 3: the eplb suite adds N copies to --experts 16 over the 2 ranks (--world-size or the "
     "launcher's); allowed: at most 16 (one copy of an expert per rank) with E + N a multiple of 2"),
    (["--suite", "eplb", "--redundant-experts", "18", "--world-size", "2"], "--redundant-experts 18: the eplb suite"),
    (["--suite", "eplb", "--redundant-experts", "1", "--world-size", "1"], "allowed: at most 0"),
    (["--suite", "overlap", "--dispatchers", "mori,standard"], "--suite overlap --dispatchers mori,standard: the "
     "overlap suite times deepep_ll and deepep_normal only (it would time nothing); allowed: --dispatchers naming one"),
    # an empty list timed the all_to_all baseline (or the raw grouped_mm) alone, without a word
    (["--dispatchers", ""], "--dispatchers '': names none; allowed: one or more names, comma-separated"),
    (["--runners", " , "], "--runners '': names none; allowed: one or more names, comma-separated"),
    # (10**20: torch's "Overflow when unpacking long long" traceback after the argument checks)
    (["--seed", str(10 ** 20)], f"argument --seed: {10 ** 20}: allowed an int >= 0 and <= 4294967295"),
    (["--seed", "-1"], "argument --seed: -1: allowed an int >= 0 and <= 4294967295"),
    # (no maximum, where demo's --world-size and EP_RUNTIME_DEMO_WORLD_SIZE stop at 2**20: it built that many
    # processes once the E checks passed)
    (["--world-size", str(2 ** 21)], f"argument --world-size: {2 ** 21}: allowed an int >= 1 and <= 1048576"),
])
def test_bad_arguments_fail_before_running(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_from_json_that_cannot_be_read_names_the_file(tmp_path, capsys):
    not_json = tmp_path / "out.md"
    not_json.write_text("| E | K |\n")
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps({"rows": [1, 2]}))
    for path, why in ((tmp_path / "missing.json", "No such file"), (not_json, "Expecting value"),
                      (other_json, "unexpected keyword argument 'rows'")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--from-json", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert f"--from-json {path}: cannot read it as an earlier run's --json file" in err and why in err, err


def test_experts_larger_than_the_host_memory_fail_before_running(capsys):
    # On CPU an allocation larger than the memory is no error: the OOM killer ends the run (or another process).
    from ep_runtime.bench.cli import _check_host_memory, build_parser, settings_from_args
    GiB = 2 ** 30
    settings = settings_from_args(build_parser().parse_args(["--preset", "deepseek-v3"]), cuda=False)
    # 2 ranks: the runner suite draws E / 2 = 128 experts of 3 * 2048 * 7168 fp32, and as much again scaling them.
    with pytest.raises(ValueError, match=r"--experts 256 --hidden 7168 --intermediate 2048 \(fp32\): the runner suite "
                                         r"would hold 42.0 GiB of experts on this host, which has 16.0 GiB available; "
                                         r"allowed: what fits: a larger --runner-ep-size"):
        _check_host_memory(settings, 2, 16 * GiB)
    _check_host_memory(settings, 2, 43 * GiB)
    settings.runner_ep_size = 8  # 32 experts: 10.5 GiB
    _check_host_memory(settings, 2, 16 * GiB)
    settings.suites = ["eplb"]  # every rank's (E + 32 copies) / R experts, the ranks spawned on this host
    with pytest.raises(ValueError, match=r"the eplb suite would hold 47.2 GiB .* or --suite without eplb"):
        _check_host_memory(settings, 2, 16 * GiB)
    settings.suites = ["dispatch"]
    _check_host_memory(settings, 2, 1 * GiB)
    if torch.cuda.is_available():
        return
    # The command refuses on this host's memory before any rank starts: 16 experts of 3 * 2^40 numbers.
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--experts", "16", "--hidden", str(2 ** 20), "--intermediate", str(2 ** 20), "--suite", "runner"])
    assert exit_info.value.code == 2
    assert "the runner suite would hold" in capsys.readouterr().err


def test_a_run_that_measured_nothing_says_so(tmp_path, capsys):
    # (It printed an empty report, or the skipped table alone, and exited 1 without a word.)
    empty, skipped = tmp_path / "empty.json", tmp_path / "skipped.json"
    empty.write_text(json.dumps({"meta": {}, "dispatch": [], "runner": [], "skipped": []}))
    skipped.write_text(json.dumps({"meta": {}, "dispatch": [], "runner": [], "skipped": [dict(
        suite="eplb", impl="standard", num_experts=16, top_k=4, hidden_size=256, tokens_per_rank=8,
        reason="ValueError: num_redundant_experts=2; allowed: 0 with dispatcher='standard'")]}))
    assert bench.main(["--from-json", str(empty)]) == 1
    assert capsys.readouterr().err == "ep-runtime bench: error: no benchmark produced a result\n"
    assert bench.main(["--from-json", str(skipped)]) == 1
    out = capsys.readouterr()
    assert "num_redundant_experts=2" in out.out
    assert out.err == "ep-runtime bench: error: no benchmark produced a result (the skipped table says why)\n"


def _overlap_rank(rank, world_size):
    import torch.distributed as dist

    from ep_runtime.bench.overlap import overlap_suite
    settings = _tiny_settings(suites=["overlap"], tokens=[6], num_experts=[16], top_ks=[4])
    return overlap_suite(settings, dist.group.WORLD, CPU, progress=False)


def test_overlap_suite_times_both_schedules_and_finds_them_identical():
    results = run_ranks(_overlap_rank, 2, timeout=120)[0]
    rows = {r["impl"]: r for r in results.overlap}
    assert set(rows) == {"deepep_normal", "deepep_normal static", "deepep_ll"} and not results.skipped
    for r in rows.values():
        assert r["identical"] and r["mode"] == "eager" and r["micro_batches"] == 2 and r["tokens_per_rank"] == 6
        assert r["sequential"]["median_us"] > 0 and r["ratio"] == pytest.approx(
            r["overlapped"]["median_us"] / r["sequential"]["median_us"])
    text = bench.render_text(results)
    assert "overlap: 2 ranks, float32" in text and "deepep_normal static" in text, text


def _script(folder: str, name: str):
    """The module of folder/name.py (benchmarks/, scripts/), its `main(argv)` not run."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_{folder}_{name}",
                                                  os.path.join(os.path.dirname(__file__), "..", folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
@pytest.mark.parametrize("script", ["bench_peer_transport", "profile_host", "profile_peer_transport",
                                    "profile_fp8_step"])
def test_gpu_only_scripts_refuse_a_machine_without_cuda_in_one_line(script, capsys):
    # (They ended in a traceback from torch.cuda.current_device(), or from the first CUDA tensor.)
    assert _script("scripts", script).main([]) == 2
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and out.out.startswith(f"{script} needs") and "CUDA" in out.out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the script's CPU check (TRITON_INTERPRET=1)")
def test_grouped_gemm_bench_gives_every_row_its_time_over_the_raw_baselines(tmp_path):
    # (portable ran before the baseline: its x raw was "-" in the table and null in the JSON.)
    out = tmp_path / "rows.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_grouped_gemm.py")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, script, "--models", "tiny", "--tokens", "16", "--repeats", "1",
                           "--candidates", "0", "--stacked-candidates", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    raw = next(r for r in rows if r["impl"] == "grouped_mm (raw)")
    assert [r["impl"] for r in rows][:2] == ["grouped_mm (raw)", "portable"]
    for row in rows:
        assert "error" not in row and "WRONG" not in row["check"], row
        assert row["vs_raw"] == pytest.approx(raw["ms"] / row["ms"], rel=1e-12), row


@pytest.mark.parametrize("script,args,message", [
    ("bench_grouped_gemm", ["--tokens", "-1"], "argument --tokens: -1: allowed an int >= 0"),
    ("bench_grouped_gemm", ["--repeats", "0"], "argument --repeats: 0: allowed an int >= 1"),
    ("bench_grouped_gemm", ["--candidates", "-1"], "argument --candidates: -1: allowed an int >= 0"),
    ("bench_fp8_scaling", ["--repeats", "0"], "argument --repeats: 0: allowed an int >= 1"),
    ("bench_decode_layer", ["--tokens", "-1"], "argument --tokens: -1: allowed an int >= 0"),
    ("bench_decode_layer", ["--shapes", "toy,gpt9"], "--shapes: 'gpt9' is none of deepseek-v3, toy"),
])
def test_benchmark_scripts_refuse_bad_arguments_before_running(script, args, message, capsys):
    # (--tokens -1 ended in a traceback from torch.randn; --repeats 0 printed every row as failed and exited 0;
    # bench_decode_layer checked --shapes only on a GPU, after the process group was up.)
    with pytest.raises(SystemExit) as exit_info:
        _script("benchmarks", script).main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("rank", [0, 1])
def test_knobs_are_checked_before_running_and_an_unknown_one_is_warned_of_by_rank_0(monkeypatch, capsys, recwarn, rank):
    """A bad EP_RUNTIME_* value ended `ep-runtime bench` in a ValueError traceback (exit 1) from run(); now exit 2
    and one line, before any work, as demo and env give. An unknown variable: one warning per job (rank 0), as
    init_distributed gives (run() warned on every rank of a launched job)."""
    from ep_runtime import envs
    from ep_runtime.distributed import free_port
    monkeypatch.setattr(envs, "_WARNED", set())  # as in a fresh process
    for name, value in dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port()), EP_RUNTIME_TIMEOUT="5").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:  # (E = 3 does not divide over the 2 ranks: stops before any work)
        bench.main(["--experts", "3", "--top-k", "2"])
    assert exit_info.value.code == 2 and "--experts 3: the dispatch suite divides E" in capsys.readouterr().err
    warned = [str(w.message) for w in recwarn if "EP_RUNTIME_TIMEOUT" in str(w.message)]
    assert warned == (["ignoring unknown variable EP_RUNTIME_TIMEOUT (did you mean EP_RUNTIME_TIMEOUT_S?): no such "
                       "ep-runtime knob (`ep-runtime env` lists them)"] if rank == 0 else []), warned
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # one process: no job to join
        monkeypatch.delenv(name)
    monkeypatch.setenv("EP_RUNTIME_TIMEOUT_S", "abc")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--suite", "runner", "--tokens", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "error: environment variable EP_RUNTIME_TIMEOUT_S='abc' is not a valid float" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["demo", "--tokens", "4"],
                                     ["bench", "--suite", "runner", "--tokens", "4", "--repeats", "1", "--warmup", "0"]])
def test_a_knob_invalid_on_one_rank_of_a_job_fails_every_rank_at_once(command):
    """demo and bench checked the knobs before joining the job: the rank with a bad value stopped (exit 2) and its
    peers waited in the rendezvous for EP_RUNTIME_TIMEOUT_S, then failed in a RendezvousError. That rank now joins
    the job, and every rank stops at once with one line naming it and the value."""
    import os
    import subprocess
    import sys
    import time

    from ep_runtime.distributed import free_port
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               EP_RUNTIME_TIMEOUT_S="60")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "ep_runtime", *command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r),
                                       **({"EP_RUNTIME_SCRATCH_MB": "lots"} if r == 1 else {})))
             for r in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    assert time.monotonic() - start < 40, "a good rank waited for the timeout"
    for err in errs:
        assert ("error: rank 1: environment variable EP_RUNTIME_SCRATCH_MB='lots' is not a valid int; allowed: int "
                ">= 0 (every rank stops in init_distributed; the group is destroyed)") in err and "Traceback" not in err, errs
