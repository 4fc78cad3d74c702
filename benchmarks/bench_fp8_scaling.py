"""What block scaling costs a Triton fp8 GEMM on this GPU: one dense GEMM, one persistent TMA kernel, four ways.

    python benchmarks/bench_fp8_scaling.py                 # ~30 s on one H200
    TRITON_INTERPRET=1 python benchmarks/bench_fp8_scaling.py --size tiny   # a check of this script on CPU
                                                           # (its bf16 row is wrong there: the interpreter's bf16 dot is)

C [M, N] = A [M, K] @ B [N, K]^T, bf16 out, in the same kernel:
  bf16           bf16 operands, one dot per K step into the accumulator
  fp8            e4m3 operands, no scales: the fp8 tensor-core rate the kernel can reach
  fp8 scaled     e4m3 with DeepSeek-V3's scales (A per row and 128 channels, B per 128 x 128 block): each
                 128-channel step's product is scaled and added (the triton runner's BLOCK_SCALED step)
  fp8 scaled x2  the same, two 128-channel dots per loop step, so the second dot can run while the
                 first one's product is scaled
beside cuBLAS (torch.mm bf16, torch._scaled_mm fp8 with row-wise scales). Why: the triton runner's fp8
path (block-scaled w8a8) is bounded by "fp8 scaled" here, not by the fp8 tensor-core rate: the scaled
product must leave the tensor cores every K step, and Triton (3.6, Hopper) waits for it there.
Each row is checked against an fp32 product of the dequantized operands.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ep_runtime.bench.settings import int_at_least

SIZES = {"deepseek": (8192, 4096, 7168), "tiny": (128, 256, 512)}  # (M, N, K); deepseek: one gate_up GEMM
GROUP = 128  # scale block (DeepSeek-V3: activations 1 x 128, weights 128 x 128)
# (label, dtype, mode, BLOCK_M, BLOCK_N, BLOCK_K per loop step, num_stages, num_warps)
VARIANTS = [("bf16", "bf16", "plain", 128, 256, 64, 3, 8),
            ("fp8", "fp8", "plain", 128, 256, 128, 3, 8),
            ("fp8 scaled", "fp8", "scaled", 128, 128, 128, 4, 8),
            ("fp8 scaled", "fp8", "scaled", 64, 256, 128, 4, 8),
            ("fp8 scaled x2", "fp8", "scaled2", 128, 128, 256, 3, 8)]
MODES = {"plain": 0, "scaled": 1, "scaled2": 2}


@triton.jit
def _scaled_dot(acc, a, b, a_scale_ptr, b_scale_ptr, rows, cols, group, stride_asm, stride_bsn,
                GROUP_N: tl.constexpr):
    a_s = tl.load(a_scale_ptr + rows * stride_asm + group)
    b_s = tl.load(b_scale_ptr + (cols // GROUP_N) * stride_bsn + group)
    return acc + tl.dot(a, b.T) * (a_s[:, None] * b_s[None, :])


@triton.jit
def _gemm_kernel(a_desc, b_desc, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K, stride_cm, stride_asm, stride_bsn,
                 NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 MODE: tl.constexpr, GROUP: tl.constexpr, GROUP_M: tl.constexpr):
    # Persistent: program i takes tiles i, i + NUM_PROGRAMS, ... in grouped order (GROUP_M row blocks
    # sweep the column tiles together). MODE 0 plain, 1 one scaled dot per step, 2 two (BLOCK_K = 2 groups).
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS):
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        m0 = (first_m + (tile % per_group) % size) * BLOCK_M
        n0 = ((tile % per_group) // size) * BLOCK_N
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K // BLOCK_K):
            k0 = k * BLOCK_K
            if MODE == 0:
                acc = tl.dot(a_desc.load([m0, k0]), b_desc.load([n0, k0]).T, acc)
            elif MODE == 1:
                acc = _scaled_dot(acc, a_desc.load([m0, k0]), b_desc.load([n0, k0]), a_scale_ptr, b_scale_ptr,
                                  rows, cols, k0 // GROUP, stride_asm, stride_bsn, GROUP)
            else:
                half: tl.constexpr = BLOCK_K // 2
                acc = _scaled_dot(acc, a_desc.load([m0, k0]), b_desc.load([n0, k0]), a_scale_ptr, b_scale_ptr,
                                  rows, cols, k0 // GROUP, stride_asm, stride_bsn, GROUP)
                acc = _scaled_dot(acc, a_desc.load([m0, k0 + half]), b_desc.load([n0, k0 + half]), a_scale_ptr,
                                  b_scale_ptr, rows, cols, k0 // GROUP + 1, stride_asm, stride_bsn, GROUP)
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty))


def _operands(M: int, N: int, K: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(M, K, device=device, generator=gen)
    b = torch.randn(N, K, device=device, generator=gen) * K ** -0.5
    return dict(a_bf16=a.bfloat16(), b_bf16=b.bfloat16(), a_fp8=a.to(torch.float8_e4m3fn),
                b_fp8=b.to(torch.float8_e4m3fn),
                a_scale=torch.rand(M, K // GROUP, device=device, generator=gen) + 0.5,
                b_scale=torch.rand(N // GROUP, K // GROUP, device=device, generator=gen) + 0.5)


def _reference(ops: dict, dtype: str, mode: str) -> torch.Tensor:
    a, b = ops[f"a_{dtype}"].float(), ops[f"b_{dtype}"].float()
    if mode != "plain":
        a = a * ops["a_scale"].repeat_interleave(GROUP, 1)
        b = b * ops["b_scale"].repeat_interleave(GROUP, 0).repeat_interleave(GROUP, 1)
    return a @ b.T


def _time_us(fn, repeats: int, device: torch.device) -> float:
    import time
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="deepseek")
    p.add_argument("--repeats", type=int_at_least(1), default=20)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    interp = not hasattr(_gemm_kernel, "device_caches")
    if not torch.cuda.is_available() and not interp:
        print("bench_fp8_scaling needs a CUDA GPU (or TRITON_INTERPRET=1 to check the script on CPU)")
        return 2
    device = torch.device("cpu" if interp else "cuda")
    M, N, K = SIZES[args.size]
    ops = _operands(M, N, K, device)
    flops = 2 * M * N * K
    programs = 2 if interp else torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
              f"M={M} N={N} K={K}", flush=True)
        a_rows = ops["a_bf16"].float().abs().amax(1, keepdim=True) / 448  # row-wise scales for cuBLAS fp8
        b_rows = ops["b_bf16"].float().abs().amax(1, keepdim=True) / 448
        a8 = (ops["a_bf16"].float() / a_rows).to(torch.float8_e4m3fn)
        b8 = (ops["b_bf16"].float() / b_rows).to(torch.float8_e4m3fn)
        for label, fn in (("cuBLAS bf16 (torch.mm)", lambda: ops["a_bf16"] @ ops["b_bf16"].T),
                          ("cuBLAS fp8 row-wise (torch._scaled_mm)",
                           lambda: torch._scaled_mm(a8, b8.T, a_rows, b_rows.T, out_dtype=torch.bfloat16))):
            rows.append(dict(impl=label, tflops=flops / _time_us(fn, args.repeats, device) / 1e6))
    for label, dtype, mode, bm, bn, bk, stages, warps in VARIANTS:
        row = dict(impl=label, tiles=f"M{bm} N{bn} K{bk} s{stages} w{warps}")
        rows.append(row)
        try:
            a, b = ops[f"a_{dtype}"], ops[f"b_{dtype}"]
            load_k = bk // 2 if mode == "scaled2" else bk
            a_desc = TensorDescriptor.from_tensor(a, [bm, load_k])
            b_desc = TensorDescriptor.from_tensor(b, [bn, load_k])
            c = torch.empty(M, N, device=device, dtype=torch.bfloat16)

            def run():
                _gemm_kernel[(programs,)](a_desc, b_desc, c, ops["a_scale"], ops["b_scale"], M, N, K, c.stride(0),
                                          ops["a_scale"].stride(0), ops["b_scale"].stride(0), NUM_PROGRAMS=programs,
                                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, MODE=MODES[mode], GROUP=GROUP,
                                          GROUP_M=8, num_stages=stages, num_warps=warps)
            us = _time_us(run, args.repeats, device)
            ref = _reference(ops, dtype, mode)
            row["rel_err"] = ((c.float() - ref).norm() / ref.norm()).item()
            row["tflops"] = flops / us / 1e6
        except Exception as err:  # noqa: BLE001 - reported on its row (e.g. out of shared memory)
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}"
    bf16 = next((r["tflops"] for r in rows if r["impl"] == "bf16" and "tflops" in r), None)
    print(f"{'impl':<40} {'tiles':<22} {'TFLOP/s':>8} {'x bf16':>7}  check")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<40} {r.get('tiles', ''):<22} {r['error']}")
            continue
        ratio = f"{r['tflops'] / bf16:.2f}" if bf16 else "-"
        check = f"rel err {r['rel_err']:.1e}" if "rel_err" in r else "-"
        # (rel err: bf16 rounding of the output and fp32 accumulation order; ~1e-3 at K=7168)
        print(f"{r['impl']:<40} {r.get('tiles', ''):<22} {r['tflops']:>8.0f} {ratio:>7}  {check}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
