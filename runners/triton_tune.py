"""Tune the triton runner's block sizes for one MoE shape on this device and write a table.

    python -m ep_runtime.runners.triton_tune --experts 8 --top-k 2 --hidden 4096 --intermediate 14336 \
        --tokens 1 16 64 256 1024 4096 16384 --out runners/configs/NVIDIA_H200.json

For each token count and BLOCK_M, GEMM 1 and GEMM 2 are timed separately over a list of tiles (the
two GEMMs share only BLOCK_M, through the pair alignment); the fastest (BLOCK_M, tiles1, tiles2) by
summed time goes in the table under this shape's key. An existing file is updated, not replaced.
The runner picks the entry with the nearest token count (runners/triton_kernels.py: pick_config).
--dtype float8_e4m3fn tunes the block-scaled fp8 path (ep.QuantConfig(): [128, 128] weight blocks,
GEMM 1 writing fp8 in its epilogue; BLOCK_K at most 128), stored under the fp8 key the runner reads.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ep_runtime.placement import ExpertPlacement
from ep_runtime.quant import QuantConfig

from . import triton_kernels as kernels
from .triton_runner import interpreted

# (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Few rows per block: the GEMMs stream weights,
# so wide K tiles and several stages keep loads in flight; many rows: square-ish tiles for the MMA.
SMALL_M_TILES = [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 3)]
LARGE_M_TILES = [(64, 128, 8, 4, 4), (128, 64, 8, 4, 4), (128, 64, 8, 8, 3), (256, 64, 8, 8, 3), (128, 128, 8, 8, 3)]
BLOCK_MS = (16, 32, 64, 128)


def default_candidates(num_tokens: int, top_k: int, num_local_experts: int) -> list[tuple[int, kernels.GemmTiles]]:
    """(BLOCK_M, tiles) pairs worth timing: BLOCK_M no larger than twice the mean rows per expert."""
    rows = num_tokens * top_k / max(num_local_experts, 1)
    block_ms = [m for m in BLOCK_MS if m == 16 or m <= 2 * rows]
    return [(m, kernels.GemmTiles(*t)) for m in block_ms for t in (SMALL_M_TILES if m <= 32 else LARGE_M_TILES)]


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    def measure(fn):
        fn()  # compile and warm up
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeats
    return measure


def tune(num_local_experts: int, top_k: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
         token_counts: Sequence[int], out: Path, candidates: Optional[Sequence[kernels.BlockConfig]] = None,
         device: str = "cuda", repeats: int = 10, seed: int = 0, log: Callable[[str], None] = lambda s: None) -> dict:
    """Time the candidates for every token count and write/update `out`; returns the shape's table.
    candidates: full BlockConfigs to time as given (default: BLOCK_M x TILES, each GEMM tuned alone)."""
    dev = torch.device(device)
    interp = interpreted()
    L, K, H, I = num_local_experts, top_k, hidden_size, intermediate_size
    gen = torch.Generator(device=dev).manual_seed(seed)
    fp8 = dtype == torch.float8_e4m3fn
    quant = QuantConfig() if fp8 else None
    w13 = torch.randn(L, 2 * I, H, device=dev, generator=gen) * H ** -0.5
    w2 = torch.randn(L, H, I, device=dev, generator=gen) * I ** -0.5
    if fp8:
        (w13, s13), (w2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    measure = _timer(dev, repeats)
    table = {}
    for T in token_counts:
        x = torch.randn(T, H, device=dev, generator=gen)
        a = torch.randn(T * K, I, device=dev, generator=gen)
        ids = torch.rand(T, L, device=dev, generator=gen).topk(K, dim=1).indices.to(torch.int32)
        mask = ExpertPlacement(L).local_mask_with_sink(dev)
        if fp8:  # GEMM 1 as the runner runs it: fp8 in, activation and fp8 out in the epilogue
            (x, x_s), (a, a_s) = quant.quantize_activation(x), quant.quantize_activation(a)
            h = torch.empty(T * K, I, dtype=dtype, device=dev)
            h_s = torch.empty(T * K, quant.num_groups(I), device=dev)
            extra1 = dict(a_scale=x_s, w_scale=s13, fuse_activation="silu", out_quant=quant, out_scale=h_s)
            extra2 = dict(a_scale=a_s, w_scale=s2)
            o = torch.empty(T * K, H, dtype=torch.bfloat16, device=dev)
        else:
            x, a = x.to(dtype), a.to(dtype)
            h = torch.empty(T * K, 2 * I, dtype=dtype, device=dev)
            o = torch.empty(T * K, H, dtype=dtype, device=dev)
            extra1 = extra2 = {}
        if candidates is not None:
            pairs = [(c.BLOCK_M, c) for c in candidates]
        else:
            pairs = default_candidates(T, K, L)
        if fp8:  # one activation and one weight scale per K step
            pairs = [(m, t) for m, t in pairs if (t.gemm1 if isinstance(t, kernels.BlockConfig) else t).BLOCK_K <= 128]
        best1: dict[int, tuple[float, kernels.GemmTiles]] = {}
        best2: dict[int, tuple[float, kernels.GemmTiles]] = {}
        for block_m, cand in pairs:
            aligned = kernels.align_pairs(ids, mask, 0, L, block_m)
            t1s = [cand.gemm1] if isinstance(cand, kernels.BlockConfig) else [cand]
            t2s = [cand.gemm2] if isinstance(cand, kernels.BlockConfig) else [cand]
            for tiles in t1s:
                try:
                    ms = measure(lambda: kernels.grouped_gemm(x, w13, h, aligned, tiles, K, interpreted=interp,
                                                              **extra1))
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile (shared memory) is skipped
                    log(f"T={T} BLOCK_M={block_m} gemm1 {tiles}: skipped ({type(exc).__name__})")
                    continue
                if block_m not in best1 or ms < best1[block_m][0]:
                    best1[block_m] = (ms, tiles)
            for tiles in t2s:
                try:
                    ms = measure(lambda: kernels.grouped_gemm(a, w2, o, aligned, tiles, 1, interpreted=interp, **extra2))
                except Exception as exc:  # noqa: BLE001
                    log(f"T={T} BLOCK_M={block_m} gemm2 {tiles}: skipped ({type(exc).__name__})")
                    continue
                if block_m not in best2 or ms < best2[block_m][0]:
                    best2[block_m] = (ms, tiles)
        if candidates is not None:  # given configs are timed whole, as listed
            scored = []
            for c in candidates:
                if c.BLOCK_M in best1 and c.BLOCK_M in best2:
                    scored.append((best1[c.BLOCK_M][0] + best2[c.BLOCK_M][0], c))
            ms, chosen = min(scored, key=lambda s: s[0])
            chosen = kernels.BlockConfig(chosen.BLOCK_M, best1[chosen.BLOCK_M][1], best2[chosen.BLOCK_M][1])
        else:
            block_m = min((m for m in best1 if m in best2), key=lambda m: best1[m][0] + best2[m][0])
            ms = best1[block_m][0] + best2[block_m][0]
            chosen = kernels.BlockConfig(block_m, best1[block_m][1], best2[block_m][1])
        table[str(T)] = chosen.to_json()
        log(f"T={T}: {ms:.3f} ms (GEMMs) with {chosen.to_json()}")

    out = Path(out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[kernels.shape_key(L, K, H, I, dtype)] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")
    kernels._load_table.cache_clear()
    return table


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, required=True, help="L: local experts on one rank")
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--intermediate", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "float8_e4m3fn"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096, 16384])
    p.add_argument("--out", type=Path, default=None,
                   help="table to write (default: the shipped table of this device in runners/configs/)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("triton_tune needs a CUDA device (tables are per GPU model)")
    out = args.out or kernels.device_file(torch.cuda.get_device_name())
    tune(args.experts, args.top_k, args.hidden, args.intermediate, getattr(torch, args.dtype), args.tokens, out,
         repeats=args.repeats, log=print)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
