"""`ep-runtime bench`: how fast are the dispatchers and runners on this machine.

Suites, over sweeps of tokens per rank T (and optionally H, E, K), for a model preset:

- dispatch (bench/dispatch.py): every registered dispatcher's dispatch, combine and round trip
  across the ranks of the group, next to raw `dist.all_to_all_single` moving the same rows.
- runner (bench/runner.py): every available runner backend on one rank, driven the way the layer
  drives it, next to the torch runner, a raw `torch._grouped_mm` baseline and the device's roofline.
- eplb (bench/eplb.py, on request): the whole EPMoE forward without redundant experts, with them,
  and after one rebalance, under --routing (e.g. zipf:1.2): what load balancing buys here.
- overlap (bench/overlap.py, on request): one layer step in two micro-batches, run sequentially and
  overlapped (each exchange on the communication stream while the other micro-batch's experts run).

One timer serves every suite (bench/timing.py: `measure`, `measure_interleaved` for comparisons,
`measure_cuda_graph`); one report path prints, writes and plots the results (bench/report.py);
bench/cli.py is the command.

Launch: under torchrun / srun / mpirun every rank joins the job's group (NCCL on GPUs); with no
launcher it spawns `--world-size` local CPU ranks (gloo) for the multi-rank suites (dispatch, eplb,
overlap) and runs the runner suite in this process.
"""
from .cli import main, run
from .dispatch import (
           bytes_leaving_rank,
           dispatch_suite,
           parse_routing,
           routing_topk,
           tokens_per_destination,
           uniform_topk,
           zipf_topk,
)
from .eplb import eplb_suite
from .report import plot, render_markdown, render_text, tables
from .runner import roofline, runner_problem, runner_suite
from .settings import PRESETS, Preset, Results, Settings
from .timing import Stats, measure, measure_cuda_graph, measure_interleaved, percentile

__all__ = ["PRESETS", "Preset", "Results", "Settings", "Stats", "bytes_leaving_rank", "dispatch_suite", "eplb_suite",
           "main", "measure", "measure_cuda_graph", "measure_interleaved", "parse_routing", "percentile", "plot",
           "render_markdown", "render_text", "roofline", "routing_topk", "run", "runner_problem", "runner_suite",
           "tables", "tokens_per_destination", "uniform_topk", "zipf_topk"]
