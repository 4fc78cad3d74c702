"""Tune the triton runner's block sizes for one MoE shape on this device and write a table.

    python -m ep_runtime.runners.triton_tune --experts 8 --top-k 2 --hidden 4096 --intermediate 14336 \
        --tokens 1 16 64 256 1024 4096 16384 --out runners/configs/NVIDIA_H200.json

For each token count and BLOCK_M, GEMM 1 (as the runner runs it: gate and up with the activation in its
epilogue) and GEMM 2 are timed separately over a list of tiles (the two GEMMs share only BLOCK_M, through the
pair alignment), under each grouped GEMM kernel of --kernels (default: all of them, less the TMA ones where
the GPU has no TMA). The fastest (BLOCK_M, tiles1, tiles2) by summed time over all kernels, each GEMM keeping
its own kernel, goes in the table under this shape's key (what the runner reads by default); each kernel's own
fastest goes under the shape's key with ",kernel=<name>" (what it reads when EP_RUNTIME_TRITON_GEMM_KERNEL
forces that kernel). An existing file is updated, not replaced: entries of other shapes and of token counts
not swept stay. The runner picks the entry with the nearest token count (runners/triton_kernels.py:
pick_config). --dtype float8_e4m3fn tunes the block-scaled fp8 path (ep.QuantConfig(): [128, 128] weight
blocks, GEMM 1 writing fp8 in its epilogue; BLOCK_K at most 128), stored under the fp8 key the runner reads.
"""
from __future__ import annotations

import argparse
import dataclasses
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
# The persistent kernels (one program per SM, weight tiles by TMA on Hopper): wgmma-sized tiles, 3-4
# stages of 128 x 64 A and BLOCK_N x 64 B in shared memory (<= 192 KB for BLOCK_N 256).
# (..., "flatten": pipelined across work items, which keeps the epilogue's buffers apart: +32 KB at 256;
# "dynamic": work items taken from a counter as programs free up, GemmTiles.dynamic).
PERSISTENT_LARGE_M_TILES = [(256, 64, 8, 8, 3), (256, 64, 8, 8, 3, "flatten"), (256, 64, 8, 8, 3, "dynamic"),
                            (256, 64, 8, 8, 4), (256, 64, 8, 8, 4, "flatten"), (256, 64, 8, 8, 4, "dynamic"),
                            (256, 64, 4, 8, 4), (256, 64, 16, 8, 4), (128, 64, 8, 8, 4), (128, 64, 8, 4, 4),
                            (128, 128, 8, 8, 3)]
BLOCK_MS = (16, 32, 64, 128)
# GEMM 2's K loop split over this many programs (GemmTiles.split_k; the portable kernel, decode sizes: at most
# SPLIT_MAX_ROWS mean rows per expert): few experts with long weight rows give too few tiles to stream from
# every SM. (Its fp32 partial sums are split_k x T*K x H: prefill sizes would take gigabytes.)
SPLITS = (2, 4, 8)
SPLIT_MAX_ROWS = 32


def default_kernels(device: torch.device) -> tuple[str, ...]:
    """The kernels worth timing on this device: the TMA ones only where the GPU has TMA (capability >= 9)."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return kernels.GEMM_KERNELS if hopper else tuple(k for k in kernels.GEMM_KERNELS if k not in kernels.TMA_KERNELS)


def default_candidates(num_tokens: int, top_k: int, num_local_experts: int, kernel: str = "portable",
                       fp8: bool = False) -> list[tuple[int, kernels.GemmTiles]]:
    """(BLOCK_M, tiles) pairs worth timing: BLOCK_M no larger than twice the mean rows per expert.
    fp8: BLOCK_K doubled, to at most 128 (one scale per K step): a byte per element, so the same shared
    memory per stage as the 16-bit tile, and the K depth fp8 tensor-core instructions want. The portable
    kernel's decode tiles also come with GEMM 2's K loop split (SPLITS, up to SPLIT_MAX_ROWS rows per
    expert; timed for GEMM 2 only)."""
    rows = num_tokens * top_k / max(num_local_experts, 1)
    block_ms = [m for m in BLOCK_MS if m == 16 or m <= 2 * rows]
    large = LARGE_M_TILES if kernel == "portable" else PERSISTENT_LARGE_M_TILES
    out = []
    for m in block_ms:
        for t in SMALL_M_TILES if m <= 32 else large:
            block_k = min(2 * t[1], 128) if fp8 else t[1]
            pair = (m, kernels.GemmTiles(t[0], block_k, *t[2:5], kernel=kernel, flatten=t[5:] == ("flatten",),
                                         dynamic=t[5:] == ("dynamic",)))
            if pair not in out:
                out.append(pair)
            if kernel == "portable" and m <= 32 and rows <= SPLIT_MAX_ROWS:
                out += [(m, dataclasses.replace(pair[1], split_k=s)) for s in SPLITS]
    return out


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
         device: str = "cuda", repeats: int = 10, seed: int = 0, log: Callable[[str], None] = lambda s: None,
         gemm_kernels: Optional[Sequence[str]] = None) -> dict:
    """Time the candidates for every token count and write/update `out`; returns the shape's table.
    candidates: full BlockConfigs to time as given (default: BLOCK_M x TILES, each GEMM tuned alone).
    gemm_kernels: time every candidate under each of these kernels (default: the candidates' own kernels
    when given, else default_kernels); each kernel's best goes in its own table (shape_key(..., kernel)),
    the best of all, GEMM by GEMM, in the shape's table the runner reads by default."""
    dev = torch.device(device)
    interp = interpreted()
    L, K, H, I = num_local_experts, top_k, hidden_size, intermediate_size
    if gemm_kernels is None and candidates is None:
        gemm_kernels = default_kernels(dev)
    for k in gemm_kernels or ():
        if k not in kernels.GEMM_KERNELS:
            raise ValueError(f"gemm_kernels has {k!r}; allowed: {', '.join(kernels.GEMM_KERNELS)}")
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
    tables: dict[str, dict] = {}
    for T in token_counts:
        x = torch.randn(T, H, device=dev, generator=gen)
        ids = torch.rand(T, L, device=dev, generator=gen).topk(K, dim=1).indices.to(torch.int32)
        mask = ExpertPlacement(L).local_mask_with_sink(dev)
        # (BLOCK_M, GEMM 1 tiles, GEMM 2 tiles) to time, each GEMM alone
        if candidates is not None:
            runs = [(c.BLOCK_M, c.gemm1, c.gemm2) for c in candidates]
            if gemm_kernels:
                runs = [(m, dataclasses.replace(t1, kernel=k), dataclasses.replace(t2, kernel=k))
                        for k in gemm_kernels for m, t1, t2 in runs]
        else:
            runs = [(m, t, t) for k in gemm_kernels for m, t in default_candidates(T, K, L, k, fp8)]
        if fp8:  # one activation and one weight scale per K step
            runs = [(m, t1, t2) for m, t1, t2 in runs if t1.BLOCK_K <= 128 and t2.BLOCK_K <= 128]
        # GEMM 1 as the runner runs it: gate and up in one tile, the activation in the epilogue, its [rows,
        # I] output in sorted order (timed unfused, tma_stacked is tma and the tiles' register and epilogue
        # costs differ: picks that measured slower in the runner's step); GEMM 2 reads those rows. rows:
        # the most sorted rows of any BLOCK_M timed.
        rows = max((kernels.sorted_rows(T * K, L, m) for m, _, _ in runs), default=0)
        a = torch.randn(rows, I, device=dev, generator=gen)
        h = torch.empty(rows, I, dtype=dtype, device=dev)
        extra1, extra2 = dict(fuse_activation="silu", out_sorted=True), dict(a_sorted=True)
        if fp8:  # fp8 in, and GEMM 2's fp8 input out of GEMM 1's epilogue
            (x, x_s), (a, a_s) = quant.quantize_activation(x), quant.quantize_activation(a)
            h_s = torch.empty(rows, quant.num_groups(I), device=dev)
            extra1.update(a_scale=x_s, w_scale=s13, out_quant=quant, out_scale=h_s)
            extra2.update(a_scale=a_s, w_scale=s2)
            o = torch.empty(T * K, H, dtype=torch.bfloat16, device=dev)
        else:
            x, a = x.to(dtype), a.to(dtype)
            o = torch.empty(T * K, H, dtype=dtype, device=dev)
        splits = max((t2.split_k for _, _, t2 in runs), default=1)  # one buffer, each split's sums a slice of it
        partial_sums = torch.empty(splits, T * K, H, device=dev) if splits > 1 else None
        best1: dict[tuple[str, int], tuple[float, kernels.GemmTiles]] = {}  # (kernel, BLOCK_M) -> best
        best2: dict[tuple[str, int], tuple[float, kernels.GemmTiles]] = {}
        timed = set()
        for block_m, t1, t2 in runs:
            aligned = kernels.align_pairs(ids, mask, 0, L, block_m)
            gemm1 = lambda t: kernels.grouped_gemm(x, w13, h, aligned, t, K, interpreted=interp, **extra1)  # noqa: E731
            gemm2 = lambda t: kernels.grouped_gemm(a, w2, o if t.split_k == 1 else partial_sums[:t.split_k],  # noqa: E731
                                                   aligned, t, 1, interpreted=interp, **extra2)
            for name, best, tiles, gemm in (("gemm1", best1, t1, gemm1), ("gemm2", best2, t2, gemm2)):
                if (name, block_m, tiles) in timed or (name == "gemm1" and tiles.split_k > 1):
                    continue  # (default candidates share tiles between the GEMMs; only GEMM 2 splits K)
                timed.add((name, block_m, tiles))
                key = (tiles.kernel, block_m)
                try:
                    ms = measure(lambda: gemm(tiles))
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile (shared memory) is skipped
                    log(f"T={T} BLOCK_M={block_m} {name} {tiles}: skipped "
                        f"({type(exc).__name__}: {str(exc).strip()[:120]})")
                    continue
                if key not in best or ms < best[key][0]:
                    best[key] = (ms, tiles)
        for kernel in sorted({k for k, _ in best1} | {k for k, _ in best2}):
            chosen = _choose({m: v for (k, m), v in best1.items() if k == kernel},
                             {m: v for (k, m), v in best2.items() if k == kernel})
            if chosen is not None:
                tables.setdefault(kernel, {})[str(T)] = chosen[1].to_json()
                log(f"T={T} {kernel}: {chosen[0]:.3f} ms (GEMMs) with {chosen[1].to_json()}")
        overall = _choose(_fastest(best1), _fastest(best2))
        if overall is None:
            raise RuntimeError(f"T={T}: no candidate ran for both GEMMs (see the log)")
        tables.setdefault("auto", {})[str(T)] = overall[1].to_json()
        log(f"T={T} auto: {overall[0]:.3f} ms (GEMMs) with {overall[1].to_json()}")

    out = Path(out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    for kernel, table in tables.items():
        if kernel == "auto" or gemm_kernels:  # given candidates alone: the shape's table only
            # merged by token count: a sweep of some token counts keeps the others' entries
            existing.setdefault(kernels.shape_key(L, K, H, I, dtype, kernel), {}).update(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")  # as NVIDIA_H200.json
    kernels.reload_tables()
    return tables["auto"]


def _fastest(best: dict) -> dict:
    """{(kernel, BLOCK_M): (ms, tiles)} -> {BLOCK_M: the fastest (ms, tiles) over kernels}."""
    out: dict = {}
    for (_, m), v in best.items():
        if m not in out or v[0] < out[m][0]:
            out[m] = v
    return out


def _choose(best1: dict, best2: dict) -> Optional[tuple[float, kernels.BlockConfig]]:
    """The BLOCK_M with the least summed time of both GEMMs' best tiles, as (ms, BlockConfig)."""
    both = [m for m in best1 if m in best2]
    if not both:
        return None
    m = min(both, key=lambda m: best1[m][0] + best2[m][0])
    return best1[m][0] + best2[m][0], kernels.BlockConfig(m, best1[m][1], best2[m][1])


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
    p.add_argument("--kernels", nargs="+", default=None, choices=list(kernels.GEMM_KERNELS),
                   help="grouped GEMM kernels to sweep (default: all; the TMA ones only on CUDA capability >= 9)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("triton_tune needs a CUDA device (tables are per GPU model)")
    out = args.out or kernels.device_file(torch.cuda.get_device_name())
    tune(args.experts, args.top_k, args.hidden, args.intermediate, getattr(torch, args.dtype), args.tokens, out,
         repeats=args.repeats, log=print, gemm_kernels=args.kernels)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
