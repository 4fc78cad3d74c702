"""Compile the triton runner's grouped GEMM kernels for Hopper (sm_90a) on a machine without a GPU.

    python scripts/compile_sm90.py                      # every kernel, a few tiles, bf16 and fp8
    python scripts/compile_sm90.py --kernels tma_stacked --flatten
    python scripts/compile_sm90.py --kernels portable --split-k 4    # GEMM 2 with its K loop split
    python scripts/compile_sm90.py --masked                        # the masked runner's kernels, default tiles
    python scripts/compile_sm90.py --gluon          # the Gluon fp8 GEMMs (triton 3.6, as on the lent GPUs)
    python scripts/compile_sm90.py --others         # every other runner, quantization and exchange kernel

Nothing is launched: a stand-in driver reports a CUDA capability 9.0 target, every launch only
compiles (Triton's own warm-up path), and ptxas (bundled with triton) reports registers and spills
for sm_90a. Per kernel and tile it prints shared memory, registers, spill bytes and how many TMA
copies (cp.async.bulk.tensor), wgmma and mma.sync instructions the PTX holds: whether a kernel
compiles with this triton, fits shared memory, and uses TMA and wgmma, before a GPU run. Uses
triton internals (driver.set_active, JITFunction.run); tensors are CPU placeholders.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
TILES = [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4), (16, 64, 128, 1, 4, 4)]
PATTERNS = {"tma": r"cp\.async\.bulk\.tensor", "wgmma": r"wgmma\.mma_async", "mma.sync": r"mma\.sync"}


class _Hopper:
    """The driver calls a compile-only launch makes."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="+", default=None)
    p.add_argument("--flatten", action="store_true", help="the persistent kernels' tiles with flatten=True")
    p.add_argument("--split-k", type=int, default=1, help="the portable kernel's GEMM 2 with GemmTiles.split_k")
    p.add_argument("--masked", action="store_true", help="the masked runner's two GEMMs instead (its default tiles)")
    p.add_argument("--gluon", action="store_true", help="the Gluon fp8 GEMMs instead (runners/gluon_kernels.py)")
    p.add_argument("--others", action="store_true",
                   help="instead, the kernels around the GEMMs: alignment, quantization, activation, reduction, and "
                        "the exchange's layout, plan, packing and gathers (compiles or not, per launcher)")
    args = p.parse_args()
    driver.set_active(_Hopper())
    compiled = []
    launch = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        kernel = launch(self, *a, grid=grid, warmup=True, **kw)
        compiled.append(kernel)
        return kernel
    JITFunction.run = compile_only

    from ep_runtime.quant import QuantConfig
    from ep_runtime.runners import triton_kernels as kernels

    kernels.tma_unsupported = lambda w, interpreted: None  # CPU placeholders stand for CUDA weights
    print(f"triton {triton.__version__}, target sm_90a")
    if args.masked:
        return _compile_masked(compiled)
    if args.gluon:
        return _compile_gluon(compiled, compile_only)
    if args.others:
        return _compile_others(compiled)
    for kernel in args.kernels or kernels.GEMM_KERNELS:
        for fp8 in (False, True):
            for fuse in (True, False):
                for m, n, k, g, w, s in TILES[:2] if fp8 else TILES:
                    tiles = kernels.GemmTiles(n, 128 if fp8 else k, g, w, s, kernel,
                                              args.flatten and kernel != "portable",
                                              split_k=args.split_k if kernel == "portable" and not fuse else 1)
                    label = f"{kernel:<12} {'fp8 ' if fp8 else 'bf16'} {'gemm1' if fuse else 'gemm2'} M{m} N{n} " \
                            f"K{tiles.BLOCK_K} w{w} s{s}" + (f" split{tiles.split_k}" if tiles.split_k > 1 else "")
                    try:
                        _compile_gemm(kernels, tiles, m, fuse, QuantConfig() if fp8 else None)
                        print(f"{label:<52} {_describe(compiled[-1])}", flush=True)
                    except Exception as err:  # noqa: BLE001 - reported, the next one compiles
                        print(f"{label:<52} FAILED {type(err).__name__}: {str(err).strip()[:300]}", flush=True)


def _compile_gemm(kernels, tiles, block_m: int, fuse: bool, quant) -> None:
    """DeepSeek-V3-sized GEMM 1 (activation fused) or GEMM 2 on 8 experts, 256 tokens, K=8."""
    L, H, I, T, K = 8, 7168, 2048, 256, 8
    rows, k_dim = (2 * I, H) if fuse else (H, I)
    aligned = kernels.align_pairs(torch.randint(0, L, (T, K), dtype=torch.int32), None, 0, L, block_m)
    dtype = quant.dtype if quant is not None else torch.bfloat16
    sorted_rows = aligned.sorted_pair_ids.numel()  # GEMM 1 writes, GEMM 2 reads sorted rows (as the runner)
    a = torch.empty(T if fuse else sorted_rows, k_dim, dtype=dtype)
    w = torch.empty(L, rows, k_dim, dtype=dtype)
    out = torch.empty(sorted_rows if fuse else T * K, I if fuse else H, dtype=dtype if fuse else torch.bfloat16)
    if tiles.split_k > 1:  # fp32 partial sums, one slice per K split
        out = torch.empty(tiles.split_k, T * K, H)
    extra = dict(out_sorted=True) if fuse else dict(a_sorted=True)
    if quant is not None:
        extra.update(a_scale=torch.empty(a.shape[0], k_dim // 128), w_scale=torch.empty(L, rows // 128, k_dim // 128))
        if fuse:
            extra.update(out_quant=quant, out_scale=torch.empty(sorted_rows, I // 128))
    kernels.grouped_gemm(a, w, out, aligned, tiles, K if fuse else 1, fuse_activation="silu" if fuse else None,
                         num_programs=132, **extra)


def _compile_masked(compiled: list) -> None:
    """The masked runner's gemm1 and gemm2 (DeepSeek-V3 shard: 32 experts; Mixtral: 8 experts, whose gemm2 splits
    K at decode; 128 buffer rows), bf16 and fp8 experts, each with the tiles and splits masked_forward picks on an
    H200."""
    from ep_runtime.config import ExpertWeights, MoeConfig
    from ep_runtime.quant import QuantConfig
    from ep_runtime.runners import masked_runner

    masked_runner._capability = lambda index: (9, 0)
    masked_runner._sm_count = lambda index: 132
    for model, (L, rows, E, K, H, I) in (("deepseek", (32, 128, 256, 8, 7168, 2048)),
                                         ("mixtral", (8, 128, 8, 2, 4096, 14336))):
        for quant in (None, QuantConfig()):
            dtype = quant.dtype if quant is not None else torch.bfloat16
            weights = ExpertWeights(torch.empty(L, 2 * I, H, dtype=dtype), torch.empty(L, H, I, dtype=dtype),
                                    w13_scale_inv=torch.empty(L, 2 * I // 128, H // 128) if quant else None,
                                    w2_scale_inv=torch.empty(L, H // 128, I // 128) if quant else None, quant=quant)
            x = torch.empty(L, rows, H, dtype=dtype)
            scale = torch.empty(L, rows, H // 128) if quant else None
            tiles = masked_runner._default_tiles(quant is not None, torch.device("cuda", 0))
            first = len(compiled)
            masked_runner.masked_forward(x, torch.zeros(L, dtype=torch.int32), weights, MoeConfig(E, K, H, I), tiles,
                                         recv_scale=scale, out_dtype=torch.bfloat16)
            for name, kernel in zip(("gemm1", "gemm2"), compiled[first:]):
                print(f"masked {model} {'fp8 ' if quant else 'bf16'} {name} {tiles}: {_describe(kernel)}", flush=True)


def _compile_gluon(compiled: list, compile_only) -> None:
    """The Gluon fp8 GEMMs at DeepSeek-V3's sizes (8 experts, 256 tokens, K=8): GEMM 1 with its epilogue under
    each activation config and scale encoding, and GEMM 2."""
    from triton.experimental.gluon._runtime import GluonJITFunction

    from ep_runtime.config import MoeConfig
    from ep_runtime.quant import QuantConfig
    from ep_runtime.runners import gluon_kernels
    from ep_runtime.runners import triton_kernels as kernels

    GluonJITFunction.run = compile_only
    gluon_kernels._sm_count = lambda index: 132
    L, H, I, T, K, f8 = 8, 7168, 2048, 256, 8, torch.float8_e4m3fn
    aligned = kernels.align_pairs(torch.randint(0, L, (T, K), dtype=torch.int32), None, 0, L, gluon_kernels.BLOCK_M)
    S = aligned.sorted_pair_ids.numel()
    for name, config, quant in (("silu", MoeConfig(256, K, H, I), QuantConfig()),
                                ("silu ue8m0", MoeConfig(256, K, H, I), QuantConfig(scale_encoding="ue8m0")),
                                ("gelu, not gated", MoeConfig(256, K, H, I, activation="gelu", is_gated=False),
                                 QuantConfig()),
                                ("swiglu alpha, limit", MoeConfig(256, K, H, I, gemm1_alpha=1.702, gemm1_clamp_limit=7.0),
                                 QuantConfig())):
        w13 = torch.empty(L, config.w13_rows, H, dtype=f8)
        gluon_kernels.gemm_act_quant(torch.empty(S, H, dtype=f8), torch.empty(S, H // 128), w13,
                                     torch.empty(L, config.w13_rows // 128, H // 128), torch.empty(S, I, dtype=f8),
                                     torch.empty(S, I // 128), aligned, config, quant)
        print(f"gluon gemm1 {name:<20} {_describe(compiled[-1])}", flush=True)
    for H, I in ((H, I), (2048, 768)):  # 768: a K tail of two steps after the groups of GROUP_STEPS (Qwen3-30B-A3B)
        gluon_kernels.gemm_sorted(torch.empty(S, I, dtype=f8), torch.empty(S, I // 128),
                                  torch.empty(L, H, I, dtype=f8), torch.empty(L, H // 128, I // 128),
                                  torch.empty(S, H, dtype=torch.bfloat16), aligned)
        print(f"gluon gemm2 {f'sorted, K={I}':<20} {_describe(compiled[-1])}", flush=True)


def _compile_others(compiled: list) -> None:
    """Each launcher of the kernels that are not GEMMs, on small CPU placeholders: which kernels it compiles, or
    why it failed (a triton release that changed the language shows here before any GPU run)."""
    from ep_runtime import TopKConfig, quant_kernels, routing_kernels
    from ep_runtime.dispatchers import exchange_kernels as exchange
    from ep_runtime.quant import QuantConfig
    from ep_runtime.runners import triton_kernels as kernels

    T, K, L, E, R, H, I = 16, 4, 4, 8, 2, 512, 256
    ids, weights = torch.randint(0, L, (T, K), dtype=torch.int32), torch.rand(T, K)
    x, slots = torch.empty(T, H, dtype=torch.bfloat16), torch.zeros(T, K, dtype=torch.long)
    rank_of, global_of = torch.arange(E, dtype=torch.int32) // (E // R), torch.arange(L, dtype=torch.int32)
    table = torch.zeros(R, exchange.row_layout(R, E, 2).length, dtype=torch.int32)
    send_token = send_rank = torch.zeros(2 * T, dtype=torch.long)
    rows, meta = exchange.payload_views(torch.empty(2 * T, exchange.payload_bytes(H, x.dtype, K), dtype=torch.uint8),
                                        H, x.dtype, K)
    launchers = {
        "align_pairs (one program, with quantize_rows)": lambda: kernels.align_pairs(
            ids, None, 0, L, 64, single_program=True, quantize=quant_kernels.plan_rows(x, QuantConfig())),
        "align_pairs (four kernels, then quantize_rows)": lambda: kernels.align_pairs(
            ids, None, 0, L, 64, single_program=False, quantize=quant_kernels.plan_rows(x, QuantConfig())),
        "quantize_rows (ue8m0 bytes)": lambda: quant_kernels.quantize_rows(
            x, QuantConfig(scale_encoding="ue8m0"), scale=torch.empty(T, H // 128, dtype=torch.uint8)),
        "act_and_mul": lambda: kernels.act_and_mul(torch.empty(T * K, 2 * I, dtype=x.dtype), I),
        "topk_reduce": lambda: kernels.topk_reduce(torch.empty(T * K, H, dtype=x.dtype),
                                                   kernels.align_workspace(T * K, L, 64, x.device).computed, K,
                                                   weights, 1.0, x.dtype),
        "layout_row": lambda: exchange.layout_row(ids, weights, rank_of, R, 3, wants=(1, 2)),
        "table_plan (static)": lambda: exchange.table_plan(torch.zeros(T, R, dtype=torch.bool), table, 0, global_of,
                                                           2 * T, chunk=T, rows=T + 8),
        "summarize": lambda: exchange.summarize(table, 0, global_of),
        "pack_payload (fp8)": lambda: exchange.pack_payload(x, ids, weights, send_token, send_rank, rank_of, None,
                                                            quant=QuantConfig()),
        "take_rows": lambda: exchange.take_rows(rows, meta, torch.zeros(8, dtype=torch.long), 2 * T),
        "ll_plan": lambda: exchange.ll_plan(ids, weights, L, True),
        "ll_scatter": lambda: exchange.ll_scatter(x, slots, weights, L * T),
        "gather_rows": lambda: exchange.gather_rows(x, slots, weights),
        "routing (sigmoid, 256 experts in 8 groups, bias)": lambda: routing_kernels.select_experts(
            torch.empty(T, 256), TopKConfig(8, "sigmoid", True, 8, 4), torch.empty(256), True),
        "routing (softmax, 60 experts)": lambda: routing_kernels.select_experts(
            torch.empty(T, 60, dtype=torch.bfloat16), TopKConfig(4, renormalize=True), None, False),
    }
    for name, launch in launchers.items():
        first = len(compiled)
        try:
            launch()
            print(f"{name:<48} {', '.join(k.name for k in compiled[first:])}", flush=True)
        except Exception as err:  # noqa: BLE001 - reported, the next one compiles
            print(f"{name:<48} FAILED {type(err).__name__}: {str(err).strip()[:300]}", flush=True)


def _describe(kernel) -> str:
    ptx = kernel.asm["ptx"]
    counts = " ".join(f"{name}={len(re.findall(pattern, ptx))}" for name, pattern in PATTERNS.items())
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for ptxas in ("ptxas", "ptxas-blackwell"):  # newer triton writes PTX its plain ptxas is too old to read
        info = subprocess.run([os.path.join(tools, ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True).stderr
        if "Unsupported .version" not in info:
            break
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    warnings = " ".join(line.strip() for line in info.splitlines() if "warning" in line.lower())  # e.g. C7514
    return (f"smem {kernel.metadata.shared // 1024} KB, regs {regs.group(1) if regs else '?'}, "
            f"spill {spills.group(1) if spills else '?'} B, {counts}" + (f"; ptxas: {warnings}" if warnings else ""))


if __name__ == "__main__":
    main()
