"""One report path for every suite: Results -> tables (text, Markdown), JSON, and a latency plot."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any, Optional

from .dispatch import BASELINE, GRAPH
from .overlap import overlap_rows
from .runner import RAW_BASELINE
from .settings import Results

MISSING_MATPLOTLIB = ("--plot needs matplotlib, which is not installed: pip install 'ep-runtime[bench]' "
                      "(or pip install matplotlib)")


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
    """(title, header, rows) for each suite that has rows. Rows of an older JSON without the host
    time, format or mode print '-'."""
    out = []
    if results.dispatch:
        header = ["E", "K", "H", "T/rank", "impl", "op", "median us", "p10 us", "p90 us", "host us", "MB/rank",
                  "GB/s", "vs a2a", "time vs unquantized"]
        rows = [[str(r["num_experts"]), str(r["top_k"]), str(r["hidden_size"]), str(r["tokens_per_rank"]),
                 r["impl"], r["op"], _fmt(r["median_us"]), _fmt(r["p10_us"]), _fmt(r["p90_us"]),
                 _fmt(r.get("host_us")), _rate(r["bytes_per_rank"] / 1e6), _rate(r["gbps"]),
                 _fmt(r["vs_baseline"], 2), _fmt(r.get("vs_unquantized"), 2)] for r in results.dispatch]
        R = results.dispatch[0]["world_size"]
        out.append((f"dispatch: {R} ranks, {results.dispatch[0]['dtype']}; MB/rank = payload leaving a rank "
                    "(round trip: both ways); host us = CPU time of one call, no device sync after it; "
                    "vs a2a = GB/s over all_to_all_single's; time vs unquantized = an fp8 row's median time over "
                    "the same dispatcher's without use_fp8 (same op, same run)", header, rows))
    if results.roofline:
        header = ["impl", "size", "dtype", "median us", "host us", "GB/s", "TFLOP/s"]
        rows = [[r["impl"], r["size"], r["dtype"], _fmt(r["median_us"]), _fmt(r.get("host_us")), _rate(r["gbps"]),
                 _rate(r["tflops"])] for r in results.roofline]
        out.append(("roofline: this device, same run (copy GB/s counts read + write)", header, rows))
    if results.runner:
        header = ["E", "K", "H", "I", "L", "T/rank", "pairs", "runner", "format", "mode", "median us", "p10 us",
                  "p90 us", "host us", "TFLOP/s", "weights GB/s", "% roof", "vs torch", "vs raw"]
        rows = [[str(r["num_experts"]), str(r["top_k"]), str(r["hidden_size"]), str(r["intermediate_size"]),
                 str(r["local_experts"]), str(r["tokens_per_rank"]), _fmt(r["pairs"], 0), r["impl"],
                 r.get("format", "-"), r.get("mode", "-"), _fmt(r["median_us"]), _fmt(r["p10_us"]),
                 _fmt(r["p90_us"]), _fmt(r.get("host_us")), _rate(r["tflops"]), _rate(r["weight_gbps"]),
                 _fmt(r.get("pct_roofline"), 0), _fmt(r["speedup_vs_torch"], 2), _fmt(r.get("speedup_vs_raw"), 2)]
                for r in results.runner]
        out.append((f"runner: one rank, {results.runner[0]['dtype']}; L local experts, T*K pairs; % roof = the "
                    "nearer of TFLOP/s over the matmul's and weights GB/s over the copy's; vs raw (unquantized rows of "
                    f"the last mode) = the {RAW_BASELINE} baseline's time per call over the row's, both run in "
                    "the row's mode and timed interleaved in blocks of back-to-back calls", header, rows))
    if results.eplb:
        header = ["E", "K", "H", "T/rank", "routing", "dispatcher", "runner", "layer", "median us", "p10 us",
                  "p90 us", "host us", "max/mean", "vs no copies"]
        rows = [[str(r["num_experts"]), str(r["top_k"]), str(r["hidden_size"]), str(r["tokens_per_rank"]),
                 r["routing"], r["dispatcher"], r["runner"], r["impl"], _fmt(r["median_us"]), _fmt(r["p10_us"]),
                 _fmt(r["p90_us"]), _fmt(r.get("host_us")), _fmt(r["max_over_mean"], 3), _fmt(r["vs_no_copies"], 2)]
                for r in results.eplb]
        out.append((f"eplb: EPMoE forward (dispatch + runner + combine), {results.eplb[0]['world_size']} ranks, "
                    f"{results.eplb[0]['dtype']}, run one after the other on the same inputs; max/mean = pairs the "
                    "busiest rank receives over the mean; rebalanced = one rebalance from the load counted while "
                    "timing the initial placement", header, rows))
    overlap = overlap_rows(results)
    if overlap is not None:
        first = results.overlap[0]
        out.append((f"overlap: {first['world_size']} ranks, {first['dtype']}; one layer step in micro-batches "
                    "(T/rank: batches x tokens each), sequential vs exchanges overlapped with the other batch's "
                    "experts; ratio = overlapped / sequential (median); identical: overlapped outputs equal the "
                    "sequential ones bit for bit on every rank", *overlap))
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
    ran = ([f"dispatch on {m.get('dispatch_device')} x{m.get('world_size')} ({m.get('backend')})"]
           if results.dispatch or results.overlap else []) + ([f"runner on {m.get('runner_device')}"] if results.runner else [])
    lines = [f"Machine: {m.get('host')}: {', '.join(ran) or 'no results'}; torch {m.get('torch')}"
             f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}. Date: {m.get('date')}.",
             "", f"Command: `{m.get('command')}`", "", f"Timing: {m.get('timing')}.", ""]
    for title, header, rows in tables(results):
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def write_json(results: Results, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(results), f, indent=1)


def read_json(path: str) -> Results:
    with open(path) as f:
        return Results(**json.load(f))


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: Results, path: str) -> None:
    """Latency (median, p10-p90 band) against tokens per rank, one line per implementation; one panel
    per dispatch op (the all_to_all_single baseline timed the same way drawn in each) and one for the
    runners."""
    if not has_matplotlib():
        raise RuntimeError(MISSING_MATPLOTLIB)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in results.dispatch if r["impl"] != BASELINE))
    panels = []
    for op in ops:
        baseline = "all_to_all" + (GRAPH if op.endswith(GRAPH) else "")
        panels.append((op, [r for r in results.dispatch if r["op"] in (op, baseline)]))
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
            if r["impl"] == BASELINE:  # a round trip moves the baseline's bytes twice
                label = ("2x " if title.startswith("round_trip") else "") + BASELINE
            elif "format" in r:
                label += f" {r['format']} {r['mode']}"
            shape = f" E{r['num_experts']} K{r['top_k']} H{r['hidden_size']}"
            lines.setdefault(label + shape, []).append(r)
        for label, pts in sorted(lines.items()):
            pts.sort(key=lambda r: r["tokens_per_rank"])
            t = [max(r["tokens_per_rank"], 1) for r in pts]
            scale = 2.0 if label.startswith("2x ") else 1.0
            style = "--" if BASELINE in label or label.startswith(RAW_BASELINE) else "-"
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
