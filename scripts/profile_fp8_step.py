"""Where the triton runner's fp8 prefill step spends its time, on one GPU: each kernel of the step (torch
profiler, CUDA time per kernel name) under EP_RUNTIME_TRITON_FP8_GEMM=triton and =gluon, then the Gluon GEMMs
alone under other pipeline settings (a load warp or none, the math warpgroups in one partition or two, ring
stages, row blocks swept together), each checked equal to the default's output (bit for bit: none changes the
order of any sum; the output is filled with NaN bytes before each, so rows a variant skips show).

    python scripts/profile_fp8_step.py [--shape deepseek|mixtral] [--tokens 4096,16384] [--repeats 10]
                                       [--json out.json]
    ncu -k regex:_grouped_kernel -c 2 --section SpeedOfLight --section WarpStateStats \
        python scripts/profile_fp8_step.py --tokens 4096 --one-step    # the Gluon GEMMs under Nsight Compute

Shape (--shape): one rank of DeepSeek-V3 at EP 8 (32 local experts, K=8, H=7168, I=2048), or Mixtral-8x7B
(8 experts, K=2, H=4096, I=14336); routing uniform as the runner bench draws it. Kernel times are CUDA events
over back-to-back calls after warm-up, eager. --one-step: only one step on the Gluon GEMMs, untimed (for a
profiler around the process).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

import ep_runtime as ep
from ep_runtime.bench.runner import runner_problem
from ep_runtime.quant import QuantConfig

SHAPES = {"deepseek": (32, 8, 7168, 2048), "mixtral": (8, 2, 4096, 14336)}  # L, K, H, I


def _time_us(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


def _kernels(fn) -> dict[str, float]:
    """{kernel name: us per call} of one call of fn, as the CUDA profiler saw it."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key[:60]: round(e.device_time_total, 1) for e in prof.key_averages() if e.device_time_total > 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--json", default=None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="deepseek")
    parser.add_argument("--repeats", type=int, default=10, help="back-to-back calls per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timings of each variant, interleaved")
    parser.add_argument("--one-step", action="store_true", help="one untimed step on the Gluon GEMMs, then exit")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_fp8_step needs a CUDA GPU (Hopper or newer: the Gluon fp8 GEMMs)")
        return 2
    L, K, H, I = SHAPES[args.shape]
    from ep_runtime.runners import gluon_kernels
    from ep_runtime.scratch import SCRATCH

    os.environ["EP_RUNTIME_SCRATCH_MB"] = "16384"  # keep the step's buffers: the GEMMs alone reuse them

    device = torch.device("cuda", 0)
    gen = torch.Generator().manual_seed(0)
    quant = QuantConfig()
    w13, s13 = quant.quantize_weight((torch.randn(L, 2 * I, H, device=device) * H ** -0.5))
    w2, s2 = quant.quantize_weight((torch.randn(L, H, I, device=device) * I ** -0.5))
    flops_per_pair = 2 * 3 * H * I
    report = {"device": torch.cuda.get_device_name(device), "steps": {}, "variants": {}}
    for T in (int(t) for t in args.tokens.split(",")):
        x, topk, pairs, _ = runner_problem(gen, T, L, K, H, torch.bfloat16, device)

        def step():
            with torch.inference_mode():
                return ep.runners.fused_experts(x, w13, w2, topk.topk_ids, topk.topk_weights, w13_scale_inv=s13,
                                                w2_scale_inv=s2)

        if args.one_step:
            os.environ["EP_RUNTIME_TRITON_FP8_GEMM"] = "gluon"
            step()
            torch.cuda.synchronize()
            return 0
        for gemm in ("triton", "gluon"):
            os.environ["EP_RUNTIME_TRITON_FP8_GEMM"] = gemm
            us = _time_us(step, args.repeats)
            entry = dict(us=round(us, 1), tflops=round(pairs * flops_per_pair / us / 1e6, 1), kernels=_kernels(step))
            report["steps"][f"{gemm} T={T}"] = entry
            print(f"T={T} {gemm}: {us:.1f} us, {entry['tflops']} TFLOP/s")
            for name, t in sorted(entry["kernels"].items(), key=lambda kv: -kv[1]):
                print(f"    {t:10.1f} us  {name}")
        # The Gluon GEMMs alone: the step's scratch as the last gluon call left it.
        os.environ["EP_RUNTIME_TRITON_FP8_GEMM"] = "gluon"
        step()
        aligned, a1, sa1, a2, sa2, o, _ = next(buffers for key, (buffers, _) in SCRATCH._entries.items()
                                            if key[0][:2] == ("gluon fp8", pairs))
        config = ep.MoeConfig(L * 8, K, H, I)
        gemm1 = lambda: gluon_kernels.gemm_act_quant(a1, sa1, w13, s13, a2, sa2, aligned, config, quant)  # noqa: E731
        gemm2 = lambda: gluon_kernels.gemm_sorted(a2, sa2, w2, s2, o, aligned)  # noqa: E731
        poison = lambda t: t.view(torch.uint8).fill_(255)  # noqa: E731 - NaN bytes: rows a variant skips show
        poison(a2)
        gemm1()
        poison(o)
        gemm2()
        want1, want2 = a2.clone(), o.clone()
        flops1, flops2 = pairs * 2 * 2 * H * I, pairs * 2 * H * I
        Pipeline = gluon_kernels.Pipeline
        # (GEMM 1 holds a 64 KB gate tile and a 16 KB output tile beside the ring: 4 stages of 32 KB at most; a
        # bf16 gate (32 KB) leaves room for 5. Outputs of the other gate dtype than the shipped one's are compared
        # by how many e4m3 codes differ, not bitwise; the shipped GEMM 1 runs last, so GEMM 2 reads its output.)
        two = dict(math_partitions=2)
        runs = [("gemm1", "GEMM1_PIPELINE", gemm1, flops1, a2, want1, pipeline)
                for pipeline in (Pipeline(), Pipeline(**two), Pipeline(gate_bf16=True, **two),
                                 gluon_kernels.GEMM1_PIPELINE)]
        runs += [("gemm2", "GEMM2_PIPELINE", gemm2, flops2, o, want2, pipeline)
                 for pipeline in (Pipeline(), Pipeline(stages=5, **two))]
        # Rounds: every variant once per round, in turn, so the GPU's clock drift under its power cap (5-10%
        # between calls) falls on all of them alike; each variant's median over the rounds is reported.
        times, failed = {}, {}
        for round_ in range(args.rounds):
            for name, setting, fn, flops, got, want, pipeline in runs:
                changed = " ".join(f"{k}={v}" for k, v in dataclasses.asdict(pipeline).items()
                                   if v != getattr(Pipeline(), k))
                label = f"T={T} {name} {changed or 'Pipeline()'}"
                if label in failed:
                    continue
                default = getattr(gluon_kernels, setting)
                setattr(gluon_kernels, setting, pipeline)
                try:
                    if round_ == 0:  # outputs checked once, against the shipped pipelines'
                        poison(got)
                        fn()
                        if pipeline.gate_bf16 != default.gate_bf16:  # the gate's rounding: codes one step apart
                            step = (got.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()
                            print(f"{label}: {(step > 0).float().mean().item():.2e} of the codes differ, by at most "
                                  f"{step.max().item()}")
                        elif not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                            failed[label] = "output differs from the shipped pipeline's"
                            continue
                    times.setdefault(label, (flops, []))[1].append(_time_us(fn, args.repeats))
                except Exception as err:  # noqa: BLE001 - e.g. more shared memory than the SM has
                    failed[label] = str(err).splitlines()[0][:200]
                finally:
                    setattr(gluon_kernels, setting, default)
        for label, why in failed.items():
            report["variants"][label] = why
            print(f"{label}: {why}")
        for label, (flops, samples) in times.items():
            us = sorted(samples)[len(samples) // 2]
            report["variants"][label] = dict(us=round(us, 1), tflops=round(flops / us / 1e6, 1),
                                             rounds=[round(t, 1) for t in samples])
            print(f"{label}: median {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s (min {min(samples):.1f}, max "
                  f"{max(samples):.1f} us over {len(samples)} rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
