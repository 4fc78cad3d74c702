"""The triton runner's kernels, each beside its launcher, and the block-size table that picks their tiles.

The sequence (runners/triton_runner.py strings it together; nothing else does):

    align_pairs       (token, expert) pairs P = N*K -> pair ids sorted by expert, padded to BLOCK_M per
                      expert, one expert per block; filtered pairs (sink, masked, other ranks') get no block;
                      one launch up to SINGLE_PROGRAM_MAX_PAIRS pairs (decode), four above
    grouped_gemm      GEMM 1 with the activation in its epilogue (FUSE_ACT, the default path): each program
                      computes a tile of gate columns and the same columns of up (interleaved in one
                      weight tile, one dot) and writes a[s] = act(gate) * up (or act(h)) directly at
                      the pair's sorted row s, so h never reaches memory
    -- or, when an after_gemm1 hook needs the raw GEMM 1 output --
    grouped_gemm      GEMM 1: h[p] = x[p // K] @ w13[e]^T (+ b13[e])  for every pair p in an expert's blocks
    act_and_mul       a[p] = act(gate) * up  (or act(h)); rows of filtered pairs are written as zeros
                      without being read (they hold whatever the allocator left there)
    grouped_gemm      GEMM 2: o[p] = a[s] @ w2[e]^T (+ b2[e])  (a[p] on the hooked path)
    topk_reduce       y[t] = scale * sum_k w[t,k] * o[t*K+k] over computed pairs, in slot order k = 0..K-1
                      (deterministic: no atomics, the same sum on every run)

No separate permute/unpermute: the row gather sits in GEMM 1's A loads, the scatter in GEMM 2's stores
(o has one row per pair p = t*K + k). Between the GEMMs, a is in sorted order: row s belongs to the pair
sorted_pair_ids[s] (each expert's rows contiguous, so GEMM 2's TMA kernels load a block's rows as one
box); on the hooked path h and a have one row per pair, as the hooks see them. Both paths share one
activation function (activate, also the masked runner's epilogue) and one GEMM kernel (FUSE_ACT is a
constexpr).
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ep_runtime.quant import MIN_AMAX, QuantConfig
from ep_runtime.quant_kernels import RowQuantization, quantize_groups, quantize_row_groups
from ep_runtime.triton_launch import SLOT, bind, cdiv, fast_launch, interpreted, next_power_of_2
from ep_runtime.validation import check_tile_sides, is_int_at_least

try:  # host-side TMA descriptors (triton >= 3.4; the TMA GEMM kernels)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the portable and persistent kernels only
    _TensorDescriptor = None

# The one activation table: activate()'s ACTIVATION constexpr (gpt-oss SwiGLU is the SWIGLU_ALPHA flag).
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# --------------------------------------------------------------------------- block configs

# Grouped GEMM kernels (GemmTiles.kernel): one tile computation, several ways of handing out tiles and
# loading weights. "portable": one program per (row block, column tile), pointer loads (any GPU, the
# interpreter). "persistent": one wave of programs (as many as the GPU holds at once) looping over the
# same (row block, column tile) work items, pointer loads. "tma": "persistent" with the weight tiles loaded
# by TMA through a host-side tensor descriptor (Hopper and newer), and A's rows too where they are in sorted
# order (GEMM 2's, a_sorted); rows gathered by pair (GEMM 1's) stay pointer loads: Hopper's TMA has no row
# gather. "tma_stacked": "tma" with gated GEMM 1's gate and up tiles in one box and one dot.
GEMM_KERNELS = ("portable", "persistent", "tma", "tma_stacked")
TMA_KERNELS = ("tma", "tma_stacked")
# A kernel without a table of its own reads this one's before the shape's auto table (the same tiles fit).
BORROWS_TILES_OF = {"tma_stacked": "tma"}


@dataclass(frozen=True)
class GemmTiles:
    """BLOCK_N counts weight rows per program: for GEMM 1 with the activation fused and gated, each
    program takes BLOCK_N // 2 gate rows and the same BLOCK_N // 2 up rows (the same weight bytes,
    accumulator size and shared memory per program as the unfused tile of BLOCK_N)."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "portable"  # which grouped GEMM kernel runs these tiles: one of GEMM_KERNELS
    flatten: bool = False  # persistent kernels: pipeline across work items (tl.range(flatten=True))
    # persistent kernels: each program takes the next work item from a counter as it frees up instead of a
    # fixed share (flatten does not apply): measured faster at some sizes (the tuned tables say which), and
    # no program that starts late (its SM held by an overlapped exchange's kernel) holds the GEMM back
    dynamic: bool = False
    # portable GEMM 2 only: each tile's K loop split over this many programs, each writing fp32 partial sums
    # that the top-k reduction adds in split order (deterministic). Decode with few experts and long
    # weight rows (Mixtral's I = 14336: 64 tiles of GEMM 2 at T=1 on 132 SMs) gets more weight streams.
    split_k: int = 1

    def __post_init__(self) -> None:
        check_tile_sides("GemmTiles", self, ("BLOCK_N", "BLOCK_K"))
        if not is_int_at_least(self.GROUP_M, 1):  # (0: a division by zero in the tile order)
            raise ValueError(f"GemmTiles.GROUP_M={self.GROUP_M!r}; allowed: an int >= 1")
        if not is_int_at_least(self.split_k, 1):
            raise ValueError(f"GemmTiles.split_k={self.split_k!r}; allowed: an int >= 1 (1: one K loop per tile)")
        object.__setattr__(self, "split_k", int(self.split_k))  # (numpy ints: a plain int for the constexpr)


@dataclass(frozen=True)
class BlockConfig:
    """Tiles of one forward: BLOCK_M is shared by both GEMMs (the pair alignment is done once)."""

    BLOCK_M: int
    gemm1: GemmTiles
    gemm2: GemmTiles

    def __post_init__(self) -> None:
        check_tile_sides("BlockConfig", self, ("BLOCK_M",))
        for name in ("gemm1", "gemm2"):
            if not isinstance(getattr(self, name), GemmTiles):
                raise TypeError(f"BlockConfig.{name} is a {type(getattr(self, name)).__name__}; allowed: a GemmTiles")
        if self.gemm1.split_k != 1:
            raise ValueError(f"BlockConfig.gemm1.split_k={self.gemm1.split_k}; allowed: 1 (only GEMM 2 splits its K "
                             "loop: GEMM 1's activation needs whole sums)")

    def to_json(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "gemm1": asdict(self.gemm1), "gemm2": asdict(self.gemm2)}

    def with_kernel(self, kernel: str) -> "BlockConfig":
        """The same tiles run by `kernel` in both GEMMs (split_k only under the portable one)."""
        return self.with_tiles(kernel=kernel) if kernel == "portable" else self.with_tiles(kernel=kernel, split_k=1)

    def with_tiles(self, **changes) -> "BlockConfig":
        """Both GEMMs' tiles with these GemmTiles fields changed."""
        return BlockConfig(self.BLOCK_M, replace(self.gemm1, **changes), replace(self.gemm2, **changes))

    @staticmethod
    def from_json(d: dict) -> "BlockConfig":
        return BlockConfig(int(d["BLOCK_M"]), GemmTiles(**d["gemm1"]), GemmTiles(**d["gemm2"]))


def shape_key(num_local_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
              dtype: torch.dtype, kernel: str = "auto") -> str:
    """A table's key: "auto" entries hold the fastest measured per GEMM, whichever kernel; a kernel's own
    entries (",kernel=tma" appended) the fastest tiles of that kernel, read when it is forced."""
    key = f"L={num_local_experts},K={top_k},H={hidden_size},I={intermediate_size},dtype={str(dtype).removeprefix('torch.')}"
    return key if kernel == "auto" else f"{key},kernel={kernel}"


def device_file(device_name: str) -> Path:
    """configs/<device name with spaces as _>.json, e.g. configs/NVIDIA_H100_80GB_HBM3.json."""
    return CONFIG_DIR / (device_name.replace(" ", "_").replace("/", "_") + ".json")


TABLES_READ = 0  # how many times reload_tables ran: part of the triton runner's plan keys (a plan keeps its pick)


def reload_tables() -> None:
    """Forget the tables read so far and the configs picked from them (after triton_tune writes one), the triton
    runner's per-shape plans' picks included (their keys hold TABLES_READ)."""
    global TABLES_READ
    _load_table.cache_clear()
    pick_config.cache_clear()
    TABLES_READ += 1


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    return json.loads(p.read_text())


def _nearest(table: dict, num_tokens: int) -> Optional[dict]:
    """The entry whose token count is nearest (in ratio) to num_tokens."""
    if not table:
        return None
    import math
    best = min(table, key=lambda k: abs(math.log2(max(int(k), 1)) - math.log2(max(num_tokens, 1))))
    return table[best]


def default_config(num_tokens: int, top_k: int, num_local_experts: int, interpreted: bool,
                   capacity_rows: bool = False) -> BlockConfig:
    """Used when the device's table has no entry: small tiles for decode, large for prefill.
    capacity_rows (RunnerInput.capacity_rows): the rows are mostly padding; decode tiles at any count."""
    if interpreted:  # few, small programs keep the CPU interpreter fast
        return BlockConfig(16, GemmTiles(64, 64, 1, 4, 1), GemmTiles(64, 64, 1, 4, 1))
    rows_per_expert = num_tokens * top_k / max(num_local_experts, 1)
    if rows_per_expert <= 16:
        return BlockConfig(16, GemmTiles(64, 128, 1, 4, 4), GemmTiles(64, 128, 1, 4, 4))
    if capacity_rows:  # expert-major rows taken as tokens (deepep_ll's output here): M*R capacity rows per
        # expert, mostly empty (the real count is on the device), so the decode tile at any capacity (H200,
        # DeepSeek-V3 dims, 64 tokens into 32 experts: GEMMs 392 against 1393 us per step with fp8 rows
        # under BLOCK_M 64, 682 against 764 with bf16; the fp8 step took 2.3 ms under BLOCK_M 128 at M=128)
        return BlockConfig(32, GemmTiles(64, 128, 1, 4, 4), GemmTiles(64, 128, 1, 4, 4))
    if rows_per_expert <= 64:
        return BlockConfig(64, GemmTiles(64, 128, 8, 4, 4), GemmTiles(64, 128, 8, 4, 4))
    return BlockConfig(128, GemmTiles(128, 64, 8, 8, 3), GemmTiles(128, 64, 8, 8, 3))


def has_tuned_shape(num_local_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                    dtype: torch.dtype, device: torch.device, interpreted: bool) -> bool:
    """Whether this device's table has entries for exactly this shape and dtype (not "default")."""
    if interpreted or device.type != "cuda":
        return False
    table = _load_table(str(device_file(torch.cuda.get_device_name(device))))
    return shape_key(num_local_experts, top_k, hidden_size, intermediate_size, dtype) in table


@functools.lru_cache(maxsize=4096)
def pick_config(num_tokens: int, num_local_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                dtype: torch.dtype, device: torch.device, interpreted: bool, kernel: str = "auto",
                schedule: str = "auto", capacity_rows: bool = False) -> BlockConfig:
    """The tuned table entry for this device and shape (nearest token count), else default_config.
    kernel "auto": the entry as tuned (each GEMM's kernel included); a GEMM_KERNELS name: that kernel's
    own entry where tuned (or BORROWS_TILES_OF's), else the auto entry's (or default) tiles run by it.
    schedule "auto": each GEMM's `dynamic` as tuned; "static" or "dynamic": that one for both.
    Memoized (a per-call table lookup is host time): reload_tables() after rewriting a table."""
    config = None
    if not interpreted and device.type == "cuda":
        table = _load_table(str(device_file(torch.cuda.get_device_name(device))))
        key = functools.partial(shape_key, num_local_experts, top_k, hidden_size, intermediate_size, dtype)
        own = table.get(key(kernel)) or table.get(key(BORROWS_TILES_OF.get(kernel, kernel)))
        entry = _nearest(own or table.get(key()) or table.get("default") or {}, num_tokens)
        if entry is not None:
            config = BlockConfig.from_json(entry)
    if config is None:
        config = default_config(num_tokens, top_k, num_local_experts, interpreted, capacity_rows)
    if kernel != "auto":
        config = config.with_kernel(kernel)
    return config if schedule == "auto" else config.with_tiles(dynamic=schedule == "dynamic")


# --------------------------------------------------------------------------- block alignment

ALIGN_CHUNK = 128  # pairs per chunk of the four-kernel path (one program each)
# Up to this many pairs one program aligns them all in one launch (three launches' host time saved);
# above it four kernels spread the chunks over programs. Measured on an H200 (graph replay, the presets'
# shards): the four kernels take 8-10 us at any count up to 2048 pairs, one program 6-9 us up to 256
# pairs but 10-22 us at 512 and 18-41 us at 1024 (its chunks run one after another).
SINGLE_PROGRAM_MAX_PAIRS = 256


def single_program_chunk(e_pad: int, num_pairs: int) -> int:
    """Pairs per chunk of the one-program path: all of them in one pass where its [chunk, E_PAD] tiles
    stay at 8192 values (64 per thread), else ALIGN_CHUNK; no wider than the pairs (at least 16), so a
    decode step's few pairs do not scan a 128-row tile."""
    return min(max(ALIGN_CHUNK, min(SINGLE_PROGRAM_MAX_PAIRS, 8192 // e_pad)), max(16, next_power_of_2(num_pairs)))


@dataclass
class AlignedPairs:
    """Pairs p = t*K + k sorted by expert and padded per expert to a multiple of BLOCK_M.

    sorted_pair_ids [num_blocks * BLOCK_M] int32: pair ids, padding = num_pairs (never a real pair);
    block_expert [num_blocks] int32: the local expert of each block, -1 for blocks past the last used
    one (num_blocks is a static upper bound so nothing here reads the device);
    computed [num_pairs] bool: the pair has a local, unmasked expert;
    used_blocks [1] int32: how many leading blocks have an expert (on the device: the persistent GEMM
    kernels hand out only these blocks' work items).
    chunk_counts, chunk_offsets [num_chunks, E_PAD] and padded [2 * E_PAD + 1] int32: the four-kernel
    path's scratch (per-chunk counts and first slots; each expert's padded start, end, and the used
    blocks, which used_blocks views).
    work_queue [2] int32, zero between launches: the persistent GEMM kernels' dynamic schedule (the next
    work item, the programs done); the alignment zeroes it, and the last program out of each GEMM sets
    both back to zero for the next one.
    """

    sorted_pair_ids: torch.Tensor
    block_expert: torch.Tensor
    computed: torch.Tensor
    num_pairs: int
    block_m: int
    used_blocks: torch.Tensor
    chunk_counts: Optional[torch.Tensor] = None
    chunk_offsets: Optional[torch.Tensor] = None
    padded: Optional[torch.Tensor] = None
    work_queue: Optional[torch.Tensor] = None


def sorted_rows(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """Length of AlignedPairs.sorted_pair_ids: every expert's pairs padded to a multiple of block_m (at
    most one partial block per expert that has pairs), a static bound that reads nothing on the device."""
    return (cdiv(num_pairs, block_m) + min(num_local_experts, num_pairs)) * block_m


# The most sorted rows an alignment may have: sorted_pair_ids and the inverse map hold pair ids and rows as int32
# (and the kernels index them in int32), so num_pairs (N*K) and the padded rows stay below 2**31.
MAX_SORTED_ROWS = 2 ** 31 - 1


def align_workspace(num_pairs: int, num_local_experts: int, block_m: int, device: torch.device) -> AlignedPairs:
    """Every buffer align_pairs writes for this shape, carved from one allocation (one allocator call
    instead of six; a caller that keeps it across calls pays none)."""
    P, e_pad = num_pairs, next_power_of_2(num_local_experts + 1)
    rows = sorted_rows(P, num_local_experts, block_m)
    if rows > MAX_SORTED_ROWS:
        raise ValueError(f"num_pairs={P} (tokens x top_k) pads to {rows} sorted rows (num_local_experts="
                         f"{num_local_experts}, BLOCK_M={block_m}); allowed: at most {MAX_SORTED_ROWS} rows (int32 pair "
                         f"ids): split the tokens over several calls")
    num_blocks = rows // block_m
    chunk_ints = cdiv(P, ALIGN_CHUNK) * e_pad
    sizes = (num_blocks * block_m, num_blocks, 2 * e_pad + 1, chunk_ints, chunk_ints, cdiv(P, 4), 2)
    # No pairs: nothing will write it, so used_blocks and the work queue must already say 0 (zeros: a few ints).
    # Else the alignment kernels zero the work queue each call (a zero_() here was a kernel of its own inside
    # every CUDA graph that captured a fresh workspace: ~2 us of a decode step).
    sorted_pair_ids, block_expert, padded, counts, offsets, flags, work_queue = (torch.empty if P else torch.zeros)(
        sum(sizes), dtype=torch.int32, device=device).split(sizes)
    return AlignedPairs(sorted_pair_ids, block_expert, flags.view(torch.uint8)[:P].view(torch.bool), P, block_m,
                        padded[2 * e_pad:], counts.view(-1, e_pad), offsets.view(-1, e_pad), padded, work_queue)


@triton.jit
def _pair_ids(ids_ptr, table_ptr, pair, in_range, table_size, HAS_TABLE: tl.constexpr):
    # Each pair's id, through the table when given (runner_core.reroute_to_sink's rule: ids clamped to
    # [-1, n], -1 meaning the last entry n = the sink); -1 past the pairs.
    ids = tl.load(ids_ptr + pair, mask=in_range, other=-1)
    if HAS_TABLE:
        n = table_size - 1
        slot = tl.minimum(tl.maximum(ids, -1), n)
        slot = tl.where(slot < 0, n, slot).to(tl.int32)
        ids = tl.where(in_range, tl.load(table_ptr + slot, mask=in_range, other=0), -1)
    return ids


@triton.jit
def _pair_experts(ids_ptr, table_ptr, mask_ptr, pair, in_range, first_expert, table_size, mask_size,
                  L: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr):
    # (computed, local expert) of each pair: computed = a local expert the mask does not turn off.
    ids = _pair_ids(ids_ptr, table_ptr, pair, in_range, table_size, HAS_TABLE)
    local = ids - first_expert
    ok = in_range & (local >= 0) & (local < L)
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + tl.minimum(tl.maximum(ids, 0), mask_size - 1), mask=in_range, other=0) != 0)
    return ok, local


@triton.jit
def _expert_counts(ok, local, L: tl.constexpr, E_PAD: tl.constexpr):
    # [E_PAD] computed pairs per local expert (filtered pairs land in slot L, which nobody reads).
    bucket = tl.where(ok, local, L)
    return tl.sum((bucket[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32), axis=0)


@triton.jit
def _padded_bounds(counts, L: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    # Each expert's counts padded to BLOCK_M: (start, end (int32 max past the L experts), blocks used).
    experts = tl.arange(0, E_PAD)
    counts = tl.where(experts < L, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    return padded_end - padded, tl.where(experts < L, padded_end, 2147483647), tl.sum(padded, axis=0) // BLOCK_M


@triton.jit
def _fill_blocks(block, padded_end, block_expert_ptr, sorted_pair_ids_ptr, num_pairs, num_blocks,
                 BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
    # The owner of each block (-1 past the last used block), and sentinel pair ids in every slot (the
    # scatter overwrites the real ones afterwards).
    owner = tl.sum((padded_end[None, :] <= (block * BLOCK_M)[:, None]).to(tl.int32), axis=1)
    used_end = tl.max(tl.where(padded_end < 2147483647, padded_end, 0), axis=0)
    owner = tl.where(block * BLOCK_M < used_end, owner, -1)
    tl.store(block_expert_ptr + block, owner, mask=block < num_blocks)
    slot = block[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_pair_ids_ptr + slot, tl.zeros((BLOCKS, BLOCK_M), dtype=tl.int32) + num_pairs,
             mask=(block < num_blocks)[:, None])


@triton.jit
def _rank_in_chunk(ok, local, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    # Each computed pair's count of earlier pairs of its expert in the chunk (pairs keep ascending
    # order within an expert): a running count per expert ([CHUNK, E_PAD]) where there are fewer
    # experts than pairs, else every pair against every other ([CHUNK, CHUNK]).
    bucket = tl.where(ok, local, -1)
    if E_PAD < CHUNK:
        one_hot = (bucket[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
        return tl.sum((tl.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=1)
    idx = tl.arange(0, CHUNK)
    earlier = (bucket[:, None] == bucket[None, :]) & (idx[None, :] < idx[:, None])
    return tl.sum(earlier.to(tl.int32), axis=1)


@triton.jit
def _clear_work_queue(work_queue_ptr):
    # The persistent GEMM kernels' dynamic schedule starts from zeros (they leave it so): set here, in the
    # alignment that precedes them every call, not once per workspace.
    tl.store(work_queue_ptr + tl.arange(0, 2), tl.zeros((2,), dtype=tl.int32))


@triton.jit
def _align_single(ids_ptr, table_ptr, mask_ptr, computed_ptr, padded_ptr, block_expert_ptr, sorted_pair_ids_ptr,
                  work_queue_ptr, num_pairs, num_blocks, first_expert, table_size, mask_size, L: tl.constexpr,
                  HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
    # The four kernels below in one program: count every chunk, pad, fill the blocks, then scatter
    # chunk by chunk with the running count of each expert's pairs as the chunk's offset.
    idx = tl.arange(0, CHUNK)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        pair = c0 + idx
        in_range = pair < num_pairs
        ok, local = _pair_experts(ids_ptr, table_ptr, mask_ptr, pair, in_range, first_expert, table_size, mask_size, L,
                                  HAS_TABLE, HAS_MASK)
        tl.store(computed_ptr + pair, ok, mask=in_range)
        counts += _expert_counts(ok, local, L, E_PAD)
    start, end, used_blocks = _padded_bounds(counts, L, BLOCK_M, E_PAD)
    tl.store(padded_ptr + 2 * E_PAD, used_blocks)
    _clear_work_queue(work_queue_ptr)
    for b0 in range(0, num_blocks, BLOCKS):
        _fill_blocks(b0 + tl.arange(0, BLOCKS), end, block_expert_ptr, sorted_pair_ids_ptr, num_pairs, num_blocks,
                     BLOCK_M, BLOCKS)
    tl.debug_barrier()  # the scatter overwrites sentinels that other threads of this program stored
    experts = tl.arange(0, E_PAD)
    running = start  # each expert's next free slot
    for c0 in range(0, num_pairs, CHUNK):
        pair = c0 + idx
        in_range = pair < num_pairs
        ok, local = _pair_experts(ids_ptr, table_ptr, mask_ptr, pair, in_range, first_expert, table_size, mask_size, L,
                                  HAS_TABLE, HAS_MASK)
        base = tl.sum(tl.where(local[:, None] == experts[None, :], running[None, :], 0), axis=1)
        tl.store(sorted_pair_ids_ptr + base + _rank_in_chunk(ok, local, CHUNK, E_PAD), pair, mask=ok)
        running += _expert_counts(ok, local, L, E_PAD)


@fast_launch
@triton.jit
def _align_single_kernel(ids_ptr, table_ptr, mask_ptr, computed_ptr, padded_ptr, block_expert_ptr,
                         sorted_pair_ids_ptr, work_queue_ptr, num_pairs, num_blocks, first_expert: tl.constexpr,
                         table_size: tl.constexpr, mask_size: tl.constexpr, L: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr,
                         CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
    _align_single(ids_ptr, table_ptr, mask_ptr, computed_ptr, padded_ptr, block_expert_ptr, sorted_pair_ids_ptr,
                  work_queue_ptr, num_pairs, num_blocks, first_expert, table_size, mask_size, L, HAS_TABLE, HAS_MASK,
                  CHUNK, E_PAD, BLOCK_M, BLOCKS)


@fast_launch
@triton.jit
def _align_quantize_kernel(ids_ptr, table_ptr, mask_ptr, computed_ptr, padded_ptr, block_expert_ptr,
                           sorted_pair_ids_ptr, work_queue_ptr, num_pairs, num_blocks, first_expert: tl.constexpr,
                           table_size: tl.constexpr, mask_size: tl.constexpr,
                           x_ptr, q_ptr, s_ptr, group_blocks, H, G, stride_x, stride_q, stride_s, fp8_max, min_amax,
                           L: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr,
                           E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr, GROUP: tl.constexpr,
                           GROUPS: tl.constexpr, UE8M0: tl.constexpr, SCALE_BYTE: tl.constexpr,
                           ROUND_FIRST: tl.constexpr):
    # Program 0 aligns the pairs (_align_single); program 1 + i quantizes the i-th group block of the
    # rows (quantize_rows' programs in row order). Independent work in one launch: at decode the two
    # kernels and the gap between them were ~1/4 of an fp8 step's non-GEMM time.
    pid = tl.program_id(0)
    if pid == 0:
        _align_single(ids_ptr, table_ptr, mask_ptr, computed_ptr, padded_ptr, block_expert_ptr, sorted_pair_ids_ptr,
                      work_queue_ptr, num_pairs, num_blocks, first_expert, table_size, mask_size, L, HAS_TABLE,
                      HAS_MASK, CHUNK, E_PAD, BLOCK_M, BLOCKS)
    else:
        work = pid - 1
        quantize_row_groups(x_ptr, q_ptr, s_ptr, (work // group_blocks).to(tl.int64), work % group_blocks, H, G,
                            stride_x, stride_q, stride_s, fp8_max, min_amax, GROUP, GROUPS, UE8M0, SCALE_BYTE,
                            ROUND_FIRST)


@fast_launch
@triton.jit
def _align_count_kernel(ids_ptr, table_ptr, mask_ptr, computed_ptr, chunk_counts_ptr, num_pairs,
                        first_expert: tl.constexpr, table_size: tl.constexpr, mask_size: tl.constexpr, L: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr,
                        CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    # One chunk of pairs: which are computed, and how many go to each local expert.
    chunk = tl.program_id(0)
    pair = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = pair < num_pairs
    ok, local = _pair_experts(ids_ptr, table_ptr, mask_ptr, pair, in_range, first_expert, table_size, mask_size, L,
                              HAS_TABLE, HAS_MASK)
    tl.store(computed_ptr + pair, ok, mask=in_range)
    tl.store(chunk_counts_ptr + chunk * E_PAD + tl.arange(0, E_PAD), _expert_counts(ok, local, L, E_PAD))


@fast_launch
@triton.jit
def _align_offsets_kernel(chunk_counts_ptr, chunk_offsets_ptr, padded_ptr, work_queue_ptr, num_chunks,
                          L: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK_TILE: tl.constexpr):
    # One program: each chunk's first slot per expert (exclusive prefix over chunks), then each
    # expert's padded start and end: padded_ptr[0:E_PAD] = start, padded_ptr[E_PAD:2*E_PAD] = end,
    # padded_ptr[2*E_PAD] = the blocks they fill.
    experts = tl.arange(0, E_PAD)
    running = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_TILE):
        rows = c0 + tl.arange(0, CHUNK_TILE)
        ptrs = rows[:, None] * E_PAD + experts[None, :]
        tile = tl.load(chunk_counts_ptr + ptrs, mask=(rows < num_chunks)[:, None], other=0)
        tl.store(chunk_offsets_ptr + ptrs, tl.cumsum(tile, axis=0) - tile + running[None, :],
                 mask=(rows < num_chunks)[:, None])
        running += tl.sum(tile, axis=0)
    start, end, used_blocks = _padded_bounds(running, L, BLOCK_M, E_PAD)
    tl.store(padded_ptr + experts, start)
    tl.store(padded_ptr + E_PAD + experts, end)
    tl.store(padded_ptr + 2 * E_PAD, used_blocks)
    _clear_work_queue(work_queue_ptr)


@fast_launch
@triton.jit
def _align_blocks_kernel(padded_ptr, block_expert_ptr, sorted_pair_ids_ptr, num_pairs, num_blocks,
                         BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, BLOCKS: tl.constexpr):
    # BLOCKS blocks per program: their owners and sentinels.
    _fill_blocks(tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS), tl.load(padded_ptr + E_PAD + tl.arange(0, E_PAD)),
                 block_expert_ptr, sorted_pair_ids_ptr, num_pairs, num_blocks, BLOCK_M, BLOCKS)


@fast_launch
@triton.jit
def _align_scatter_kernel(ids_ptr, table_ptr, computed_ptr, chunk_offsets_ptr, padded_start_ptr, sorted_pair_ids_ptr,
                          num_pairs, first_expert: tl.constexpr, table_size: tl.constexpr, HAS_TABLE: tl.constexpr,
                          CHUNK: tl.constexpr,
                          E_PAD: tl.constexpr):
    # Slot of each computed pair: its expert's padded start + earlier chunks' pairs of that expert +
    # earlier pairs of that expert in this chunk.
    chunk = tl.program_id(0)
    pair = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = pair < num_pairs
    ok = tl.load(computed_ptr + pair, mask=in_range, other=0) != 0
    local = _pair_ids(ids_ptr, table_ptr, pair, in_range, table_size, HAS_TABLE) - first_expert
    safe = tl.where(ok, local, 0)
    base = tl.load(padded_start_ptr + safe, mask=ok, other=0) + \
        tl.load(chunk_offsets_ptr + chunk * E_PAD + safe, mask=ok, other=0)
    tl.store(sorted_pair_ids_ptr + base + _rank_in_chunk(ok, local, CHUNK, E_PAD), pair, mask=ok)


def align_pairs(topk_ids: torch.Tensor, expert_mask: Optional[torch.Tensor], first_expert: int,
                num_local_experts: int, block_m: int, out: Optional[AlignedPairs] = None,
                single_program: Optional[bool] = None, id_table: Optional[torch.Tensor] = None,
                quantize: Optional[RowQuantization] = None) -> AlignedPairs:
    """topk_ids [N, K] int (any id; ids outside [first_expert, first_expert + L) are filtered);
    expert_mask [S] bool indexed by id (0 = filtered; ids are clamped into [0, S) for the lookup), or None.
    id_table [n + 1] int32 or None: the ids are first mapped through it as runner_core.reroute_to_sink
    maps them (RunnerInput.id_table), in the kernels instead of two torch ops before them.
    out: align_workspace(N*K, L, block_m, device) to write into (a caller reusing it across calls
    allocates nothing); None allocates one. single_program: one launch (default up to
    SINGLE_PROGRAM_MAX_PAIRS pairs) or four; the same result either way. quantize: rows to quantize as
    well (quant_kernels.plan_rows), every row in the same launch on the one-program path, else by their own
    kernel after the alignment, only rows with a computed pair (the others, which no GEMM reads, are left as
    they were: an expert-major buffer's capacity rows are mostly padding). Sync-free: shapes depend on N, K, L and BLOCK_M only (CUDA-graph capturable)."""
    L = num_local_experts
    if quantize is not None and quantize.x.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"quantize has {quantize.x.shape[0]} rows; topk_ids {topk_ids.shape[0]} (the rows are the ids' "
                         f"tokens: one row per row of topk_ids)")
    ids, table, mask = align_inputs(topk_ids, expert_mask, id_table)
    P = ids.numel()
    aligned = align_workspace(P, L, block_m, ids.device) if out is None else out
    if P == 0:  # (the workspace's used_blocks is 0 from the start: no write, so a kept one stays valid)
        if quantize is not None:
            quantize.launch()
        return aligned
    check_id_table(id_table)
    table_size = table.numel() if id_table is not None else None
    mask_size = mask.numel() if expert_mask is not None else None
    if quantize is None:
        prepare_align(aligned, L, first_expert, table_size, mask_size, single_program)(ids, table, mask, aligned)
        return aligned
    if _one_program(single_program, P):
        sizes, meta = _align_args(aligned, L, first_expert, table_size, mask_size)
        work = quantize.x.shape[0] * quantize.group_blocks
        _align_quantize_kernel[(1 + work,)](ids, table, mask, aligned.computed, aligned.padded, aligned.block_expert,
                                            aligned.sorted_pair_ids, aligned.work_queue, *sizes, quantize.x,
                                            quantize.q, quantize.scale, quantize.group_blocks, *quantize.args, **meta,
                                            **quantize.meta)
        return aligned
    prepare_align(aligned, L, first_expert, table_size, mask_size, False)(ids, table, mask, aligned)
    # only rows with a computed pair (capacity or padded buffers: mostly none)
    quantize.launch(computed_pairs=aligned.computed)
    return aligned


def _one_program(single_program: Optional[bool], num_pairs: int) -> bool:
    """Whether the alignment runs as one program: as asked, else up to SINGLE_PROGRAM_MAX_PAIRS pairs."""
    return single_program if single_program is not None else num_pairs <= SINGLE_PROGRAM_MAX_PAIRS


def _align_args(aligned: AlignedPairs, L: int, first_expert: int, table_size: Optional[int],
                mask_size: Optional[int]) -> tuple[tuple, dict]:
    """The one-program alignment kernels' (_align_single_kernel, _align_quantize_kernel) arguments after the
    workspace's tensors: (num_pairs, num_blocks, first_expert, table_size, mask_size) and their constexprs."""
    P, e_pad = aligned.num_pairs, aligned.padded.numel() // 2
    # (constexprs: the layer's, 0 where unread, never the pair count, which would compile a kernel per count)
    args = (P, aligned.block_expert.numel(), first_expert, table_size or 0, mask_size or 0)
    return args, dict(L=L, CHUNK=single_program_chunk(e_pad, P), E_PAD=e_pad, BLOCK_M=aligned.block_m,
                      BLOCKS=max(1, 4096 // max(e_pad, aligned.block_m)), num_warps=4,
                      HAS_TABLE=table_size is not None, HAS_MASK=mask_size is not None)


def check_id_table(id_table: Optional[torch.Tensor]) -> None:
    if id_table is not None and id_table.dim() != 1:
        raise ValueError(f"id_table must be 1-D [n + 1]; got shape {list(id_table.shape)}")


def align_inputs(topk_ids: torch.Tensor, expert_mask: Optional[torch.Tensor], id_table: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, table, mask) as the alignment kernels read them, flat: pair p = t*K + k; int64 ids stay int64 before a
    table (clamped there, never wrapped), else int32; the table and mask contiguous, or ids where absent."""
    keep = id_table is not None and topk_ids.dtype == torch.int64
    ids = (topk_ids if keep else topk_ids.to(torch.int32)).contiguous()
    return (ids, id_table.contiguous() if id_table is not None else ids,
            expert_mask.contiguous() if expert_mask is not None else ids)


def prepare_align(aligned: AlignedPairs, num_local_experts: int, first_expert: int, table_size: Optional[int],
                  mask_size: Optional[int], single_program: Optional[bool] = None) -> Callable[..., None]:
    """align_pairs' launches (without quantize) for a workspace of aligned's sizes, made once: returns
    launch(ids, table, mask, aligned) for ids [N*K] contiguous int32 (int64 before a table), the id_table [n + 1]
    of table_size entries (None: no table; ids is passed in its place) and the mask of mask_size (likewise),
    both contiguous, writing into a workspace of the same sizes. The triton runner keeps it in a per-shape plan."""
    L, P, block_m = num_local_experts, aligned.num_pairs, aligned.block_m
    if P == 0:  # (the workspace's used_blocks is 0 from the start: no write, so a kept one stays valid)
        return _no_launch
    args, meta = _align_args(aligned, L, first_expert, table_size, mask_size)
    if _one_program(single_program, P):
        single = bind(_align_single_kernel, (1,), *(SLOT,) * 8, *args, **meta)

        def launch(ids, table, mask, aligned):
            single(ids, table, mask, aligned.computed, aligned.padded, aligned.block_expert, aligned.sorted_pair_ids,
                   aligned.work_queue)
        return launch
    num_blocks, sizes = args[1], args[2:]
    e_pad, blocks_per_program = meta["E_PAD"], meta["BLOCKS"]
    lookup = dict(HAS_TABLE=meta["HAS_TABLE"], HAS_MASK=meta["HAS_MASK"])
    num_chunks = cdiv(P, ALIGN_CHUNK)
    count, offsets = _align_count_kernel[(num_chunks,)], _align_offsets_kernel[(1,)]
    blocks, scatter = _align_blocks_kernel[(cdiv(num_blocks, blocks_per_program),)], _align_scatter_kernel[(num_chunks,)]

    def launch(ids, table, mask, aligned):
        count(ids, table, mask, aligned.computed, aligned.chunk_counts, P, *sizes, L=L, CHUNK=ALIGN_CHUNK, E_PAD=e_pad,
              num_warps=4, **lookup)
        offsets(aligned.chunk_counts, aligned.chunk_offsets, aligned.padded, aligned.work_queue, num_chunks, L=L,
                BLOCK_M=block_m, E_PAD=e_pad, CHUNK_TILE=max(1, 4096 // e_pad), num_warps=4)
        blocks(aligned.padded, aligned.block_expert, aligned.sorted_pair_ids, P, num_blocks, BLOCK_M=block_m,
               E_PAD=e_pad, BLOCKS=blocks_per_program, num_warps=4)
        scatter(ids, table, aligned.computed, aligned.chunk_offsets, aligned.padded, aligned.sorted_pair_ids, P,
                *sizes[:2], HAS_TABLE=lookup["HAS_TABLE"], CHUNK=ALIGN_CHUNK, E_PAD=e_pad, num_warps=4)
    return launch


# --------------------------------------------------------------------------- activation math

def activation_args(activation: str, is_gated: bool, gemm1_alpha: Optional[float],
                    gemm1_clamp_limit: Optional[float]) -> dict:
    """activate()'s scalars and constexprs as launch keywords; every kernel calling activate() is launched
    with these, so the code table lives in one place."""
    return dict(alpha=float(gemm1_alpha or 0.0), limit=float(gemm1_clamp_limit or 0.0),
                ACTIVATION=ACTIVATION_CODES[activation], GATED=is_gated,
                SWIGLU_ALPHA=gemm1_alpha is not None, HAS_LIMIT=gemm1_clamp_limit is not None and is_gated)


@triton.jit
def activate(g, u, alpha, limit, ACTIVATION: tl.constexpr, GATED: tl.constexpr, SWIGLU_ALPHA: tl.constexpr,
             HAS_LIMIT: tl.constexpr):
    """fp32 gate g and up u (ignored when not gated) -> fp32 act(g) * u, or act(g); the one copy of the
    activation math, used by GEMM 1's fused epilogue, _act_and_mul_kernel, the masked runner and the Gluon GEMM.
    HAS_LIMIT (gated): gate clamped above, up clamped both sides first (gpt-oss, DeepSeek-V4)."""
    if HAS_LIMIT:
        g = tl.minimum(g, limit)
        u = tl.maximum(tl.minimum(u, limit), -limit)
    if SWIGLU_ALPHA:  # gpt-oss: up + 1
        a = g * tl.sigmoid(alpha * g) * (u + 1.0)
    else:
        if ACTIVATION == 0:
            a = g * tl.sigmoid(g)
        elif ACTIVATION == 1:
            a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:  # 0.5 g (1 + tanh(z)) with 1 + tanh(z) = 2 sigmoid(2z): one formula on every triton version
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g * tl.sigmoid(2.0 * z)
        if GATED:
            a = a * u
    return a


# Whether these kernels run under the interpreter (fixed when they were decorated: read once, not per call).
INTERPRETED = interpreted(activate)


# --------------------------------------------------------------------------- grouped GEMM


@triton.jit
def _tile_coords(tile, num_blocks, num_n, GROUP_M: tl.constexpr):
    # Work item -> (row block, column tile). Grouped ordering: GROUP_M row blocks sweep the column tiles
    # together, so an expert's weight tile is read from HBM once and reused from L2 by its neighbouring
    # row blocks. Every kernel maps its work items through here.
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_size
    pid_n = (tile % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _gemm_epilogue(gate, up, pair, out_row, row_ok, expert, pid_n, N, split, bias_ptr, stride_bias_e, scale_ptr, out_ptr,
                   stride_om, stride_on, out_scale_ptr, stride_os, fp8_max, min_amax, alpha, limit,
                   HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, QUANT_OUT: tl.constexpr, UE8M0: tl.constexpr,
                   ROUND_FIRST: tl.constexpr, OUT_N: tl.constexpr, FUSE_ACT: tl.constexpr, TWO: tl.constexpr,
                   ACTIVATION: tl.constexpr, GATED: tl.constexpr, SWIGLU_ALPHA: tl.constexpr,
                   HAS_LIMIT: tl.constexpr):
    # gate [BLOCK_M, OUT_N] fp32: the tile's product for output columns offs_n (weight rows offs_n);
    # up: the same columns' up rows (weight rows N + offs_n) when TWO, else unused. Applies the router
    # weight (on the input: (w x) W^T = w (x W^T), before the bias), the bias, the activation and the
    # fp8 output quantization, and stores the pairs' results in rows out_row (the pair's own row, or its
    # sorted row: OUT_SORTED); padding rows are not stored. split: the K split this program summed (the bias
    # goes into split 0's partial sums only).
    offs_n = pid_n * OUT_N + tl.arange(0, OUT_N)
    n_ok = offs_n < N
    if HAS_SCALE:
        row_scale = tl.load(scale_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        gate = gate * row_scale
        if TWO:
            up = up * row_scale
    if HAS_BIAS:
        bias_row = bias_ptr + expert * stride_bias_e + offs_n
        bias_ok = n_ok & (offs_n * 0 == split)  # (full-shape: the interpreter takes no scalar bool in a mask)
        gate = gate + tl.load(bias_row, mask=bias_ok, other=0.0).to(tl.float32)[None, :]
        if TWO:
            up = up + tl.load(bias_row + N, mask=bias_ok, other=0.0).to(tl.float32)[None, :]
    if TWO:  # (filtered pairs have no rows here at all)
        res = activate(gate, up, alpha, limit, ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT)
    elif FUSE_ACT:
        res = activate(gate, gate, alpha, limit, ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT)
    else:
        res = gate
    if QUANT_OUT:  # fp8 GEMM 2 input straight from the fp32 result: OUT_N is one scale group of a row
        res, group_scale = quantize_groups(tl.where(n_ok[None, :], res, 0.0), fp8_max, min_amax, UE8M0, ROUND_FIRST, False)
        tl.store(out_scale_ptr + out_row * stride_os + pid_n, group_scale, mask=row_ok)
    out_ptrs = out_ptr + out_row[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@fast_launch
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, scale_ptr, out_ptr, sorted_pair_ids_ptr, block_expert_ptr, a_scale_ptr, b_scale_ptr,
    num_pairs, N: tl.constexpr, K_dim: tl.constexpr, num_blocks,
    stride_am: tl.constexpr, stride_ak: tl.constexpr, stride_be: tl.constexpr, stride_bn: tl.constexpr,
    stride_bk: tl.constexpr, stride_bias_e: tl.constexpr, stride_om: tl.constexpr, stride_on: tl.constexpr,
    stride_asm: tl.constexpr, stride_ask: tl.constexpr, stride_bse: tl.constexpr, stride_bsn: tl.constexpr,
    stride_bsk: tl.constexpr,
    out_scale_ptr, stride_os: tl.constexpr, fp8_max, min_amax,
    alpha, limit, stride_split,
    ROWS_PER_A_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
    QUANT_OUT: tl.constexpr, UE8M0: tl.constexpr, ROUND_FIRST: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FUSE_ACT: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, SWIGLU_ALPHA: tl.constexpr,
    HAS_LIMIT: tl.constexpr, ONE_SCALE: tl.constexpr, A_SORTED: tl.constexpr, OUT_SORTED: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # "portable": one program per work item (and K split: program_id(1) of SPLIT_K).
    # The widths and strides are constexprs: they follow from the layer's shape (H, I, the weights' layout), not
    # from the token count, so a layer compiles once per shape as before, and each launch binds 16 parameters
    # fewer (Triton's binder and launcher cost host time per runtime parameter: ~0.3 us each on an H200 host).
    # out[p, n] = sum_k a[p // ROWS_PER_A_ROW, k] * b[e, n, k]  for the pairs p of block pid_m (expert e).
    # BLOCK_SCALED (fp8 w8a8): a and b are fp8; each K step (BLOCK_K divides SCALE_K) multiplies its fp32
    # product by a's scale of (row, k group) and b's scale of (row block n // SCALE_N, k group).
    # FUSE_ACT: out[p, n] = activate(that with b's row n, that with b's row N + n if GATED); N = I.
    # A_SORTED: a's row for pair p is its sorted row s (sorted_pair_ids[s] = p) instead of p // ROWS_PER_A_ROW;
    # OUT_SORTED: the result goes to out's row s instead of row p (GEMM 1 -> GEMM 2 in sorted order).
    # SPLIT_K: this program sums K steps [split * per_split, (split + 1) * per_split) into out + split *
    # stride_split (the bias in split 0 only); the top-k reduction adds the splits.
    # BLOCK_N weight rows per program. When TWO they interleave gate and up rows (column 2j: gate row
    # n0 + j, column 2j + 1: up row N + n0 + j), so one dot of the full width (wgmma's widest N, one
    # read of the A tile from shared memory) serves both, and the epilogue splits adjacent columns.
    TWO: tl.constexpr = FUSE_ACT and GATED
    OUT_N: tl.constexpr = BLOCK_N // 2 if TWO else BLOCK_N  # output columns per program
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_blocks, tl.cdiv(N, OUT_N), GROUP_M)

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)
    row_ok = pair < num_pairs
    a_row = offs_m.to(tl.int64) if A_SORTED else pair // ROWS_PER_A_ROW
    out_row = offs_m.to(tl.int64) if OUT_SORTED else pair
    cols = tl.arange(0, BLOCK_N)
    if TWO:
        col_n = pid_n * OUT_N + cols // 2  # the output column each weight row feeds
        w_row = col_n + (cols % 2) * N
    else:
        col_n = pid_n * BLOCK_N + cols
        w_row = col_n
    n_ok = col_n < N
    split = tl.program_id(1)
    steps = tl.cdiv(K_dim, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    first_step = split * per_split
    offs_k = first_step * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + w_row[None, :] * stride_bn + offs_k[:, None] * stride_bk
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(first_step, tl.minimum(first_step + per_split, steps)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K_dim - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong; fp32 operands are exact there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if BLOCK_SCALED:  # (the interpreter's fp8 x fp8 dot is exact: no upcast needed)
            group_k = (k * BLOCK_K) // SCALE_K
            a_s = tl.load(a_scale_ptr + a_row * stride_asm + group_k * stride_ask, mask=row_ok, other=0.0)
            acc = scaled_step(acc, tl.dot(a, b), a_s, b_scale_ptr + expert * stride_bse + group_k * stride_bsk, w_row,
                               n_ok, stride_bsn, SCALE_N, ONE_SCALE)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if TWO:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, OUT_N, 2)))
    else:
        gate = acc
        up = acc
    _gemm_epilogue(gate, up, pair, out_row, row_ok, expert, pid_n, N, split, bias_ptr, stride_bias_e, scale_ptr,
                   out_ptr + split.to(tl.int64) * stride_split, stride_om, stride_on, out_scale_ptr, stride_os, fp8_max,
                   min_amax, alpha, limit, HAS_BIAS, HAS_SCALE, QUANT_OUT, UE8M0, ROUND_FIRST, OUT_N, FUSE_ACT, TWO,
                   ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT)


@triton.jit
def _weight_tile(b_ptr, b_desc, expert, row0, k, N_ROWS, K_dim, stride_be, stride_bn, stride_bk,
                 OUT_N: tl.constexpr, BLOCK_K: tl.constexpr, B_DESC: tl.constexpr):
    # Weight rows row0 .. row0 + OUT_N of the expert, channels k .. k + BLOCK_K: [OUT_N, BLOCK_K].
    # Through the descriptor ([L * N_ROWS, K_dim] view of b): rows past the expert's read the next
    # expert's (finite, their columns are never stored) or zeros past the last; channels past K_dim
    # are zeros. Pointer loads give zeros for both.
    if B_DESC:
        tile = b_desc.load([(expert * N_ROWS + row0).to(tl.int32), k])
    else:
        rows = row0 + tl.arange(0, OUT_N)
        chans = k + tl.arange(0, BLOCK_K)
        tile = tl.load(b_ptr + expert * stride_be + rows[:, None] * stride_bn + chans[None, :] * stride_bk,
                       mask=(rows < N_ROWS)[:, None] & (chans < K_dim)[None, :], other=0.0)
    return tile


def one_weight_scale(scale_rows: int, tile_rows: int, up_rows_from: Optional[int]) -> bool:
    """scaled_step's ONE_SCALE: a weight tile of tile_rows rows (gate and up loaded apart) lies in one
    block of scale_rows rows: tiles never straddle a block, and the up rows (from row up_rows_from;
    None: no up rows) start on a block boundary."""
    return scale_rows % tile_rows == 0 and (up_rows_from is None or up_rows_from % scale_rows == 0)


@triton.jit
def scaled_step(acc, product, a_s, b_scale_row, w_row, n_ok, stride_bsn, SCALE_N: tl.constexpr,
                 ONE_SCALE: tl.constexpr):
    # acc + one K step's fp32 product times a's scale (per row) and w's (per block of SCALE_N weight
    # rows). ONE_SCALE: the tile's weight rows lie in one scale block, so w's scale is one number and
    # the step costs one multiply-add per element (the general case: a scale outer product first).
    if ONE_SCALE:
        b_s = tl.load(b_scale_row + (tl.min(w_row, axis=0) // SCALE_N) * stride_bsn)
        return acc + product * (a_s * b_s)[:, None]
    else:
        b_s = tl.load(b_scale_row + (w_row // SCALE_N) * stride_bsn, mask=n_ok, other=0.0)
        return acc + product * (a_s[:, None] * b_s[None, :])


@triton.jit
def _persistent_tile(
    tile, num_blocks, num_n, a_ptr, a_desc, b_ptr, b_desc, bias_ptr, scale_ptr, out_ptr, sorted_pair_ids_ptr,
    block_expert_ptr, a_scale_ptr, b_scale_ptr, num_pairs, N, K_dim, stride_am, stride_ak, stride_be, stride_bn,
    stride_bk, stride_bias_e, stride_om, stride_on, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    out_scale_ptr, stride_os, fp8_max, min_amax, alpha, limit, ROWS_PER_A_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_SCALED: tl.constexpr, SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr, QUANT_OUT: tl.constexpr, UE8M0: tl.constexpr, ROUND_FIRST: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FUSE_ACT: tl.constexpr,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, SWIGLU_ALPHA: tl.constexpr, HAS_LIMIT: tl.constexpr,
    ONE_SCALE: tl.constexpr, B_DESC: tl.constexpr, STACKED: tl.constexpr, A_SORTED: tl.constexpr,
    A_DESC: tl.constexpr, OUT_SORTED: tl.constexpr,
):
    # One work item of the persistent kernels: the row block and column tile `tile` names (_tile_coords).
    # A_DESC (with A_SORTED): the block's rows of a are contiguous, one TMA box per K step.
    TWO: tl.constexpr = FUSE_ACT and GATED
    OUT_N: tl.constexpr = BLOCK_N // 2 if TWO else BLOCK_N
    N_ROWS = 2 * N if TWO else N  # weight rows per expert
    pid_m, pid_n = _tile_coords(tile, num_blocks, num_n, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)
    row_ok = pair < num_pairs
    a_row = offs_m.to(tl.int64) if A_SORTED else pair // ROWS_PER_A_ROW
    out_row = offs_m.to(tl.int64) if OUT_SORTED else pair
    col_n = pid_n * OUT_N + tl.arange(0, OUT_N)
    n_ok = col_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    gate = tl.zeros((BLOCK_M, OUT_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, OUT_N), dtype=tl.float32)  # (unused unless TWO)
    if STACKED:
        acc = tl.zeros((BLOCK_M, 2 * OUT_N), dtype=tl.float32)
        stacked = tl.arange(0, 2 * OUT_N)
        stacked_n = pid_n * OUT_N + stacked % OUT_N
        stacked_row = stacked_n + (stacked // OUT_N) * N  # gate rows, then the same up rows
    for k in range(0, tl.cdiv(K_dim, BLOCK_K)):
        if A_DESC:  # (padding rows load whatever their row holds; their results are never stored)
            a = a_desc.load([(pid_m * BLOCK_M).to(tl.int32), k * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < K_dim - k * BLOCK_K)[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter's bf16 dot is wrong; fp32 operands are exact there
            a = a.to(tl.float32)
        if BLOCK_SCALED:
            group_k = (k * BLOCK_K) // SCALE_K
            a_s = tl.load(a_scale_ptr + a_row * stride_asm + group_k * stride_ask, mask=row_ok, other=0.0)
            b_scale_row = b_scale_ptr + expert * stride_bse + group_k * stride_bsk
        if STACKED:
            b = tl.reshape(b_desc.load([(2 * expert).to(tl.int32), pid_n * OUT_N, k * BLOCK_K]),
                           (2 * OUT_N, BLOCK_K)).T
            if UPCAST:
                b = b.to(tl.float32)
            if BLOCK_SCALED:
                b_s = tl.load(b_scale_row + (stacked_row // SCALE_N) * stride_bsn, mask=stacked_n < N,
                              other=0.0)
                acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            b_gate = _weight_tile(b_ptr, b_desc, expert, pid_n * OUT_N, k * BLOCK_K, N_ROWS, K_dim, stride_be,
                                  stride_bn, stride_bk, OUT_N, BLOCK_K, B_DESC).T
            if UPCAST:
                b_gate = b_gate.to(tl.float32)
            if BLOCK_SCALED:
                gate = scaled_step(gate, tl.dot(a, b_gate), a_s, b_scale_row, col_n, n_ok, stride_bsn,
                                    SCALE_N, ONE_SCALE)
            else:
                gate = tl.dot(a, b_gate, gate, input_precision=PRECISION)
            if TWO:
                b_up = _weight_tile(b_ptr, b_desc, expert, N + pid_n * OUT_N, k * BLOCK_K, N_ROWS, K_dim,
                                    stride_be, stride_bn, stride_bk, OUT_N, BLOCK_K, B_DESC).T
                if UPCAST:
                    b_up = b_up.to(tl.float32)
                if BLOCK_SCALED:
                    up = scaled_step(up, tl.dot(a, b_up), a_s, b_scale_row, N + col_n, n_ok, stride_bsn,
                                      SCALE_N, ONE_SCALE)
                else:
                    up = tl.dot(a, b_up, up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
    if STACKED:  # columns [gate | up] -> the two halves
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, OUT_N)), (0, 2, 1)))
    _gemm_epilogue(gate, up, pair, out_row, row_ok, expert, pid_n, N, 0, bias_ptr, stride_bias_e, scale_ptr,
                   out_ptr, stride_om, stride_on, out_scale_ptr, stride_os, fp8_max, min_amax, alpha, limit,
                   HAS_BIAS, HAS_SCALE, QUANT_OUT, UE8M0, ROUND_FIRST, OUT_N, FUSE_ACT, TWO,
                   ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT)


@fast_launch
@triton.jit(do_not_specialize=["num_programs"])  # one compiled variant whatever the grid
def _grouped_gemm_persistent_kernel(

    a_ptr, a_desc, b_ptr, b_desc, bias_ptr, scale_ptr, out_ptr, sorted_pair_ids_ptr, block_expert_ptr, a_scale_ptr,
    b_scale_ptr, num_pairs, N, K_dim, used_blocks_ptr, work_queue_ptr, num_programs,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_bias_e, stride_om, stride_on,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    out_scale_ptr, stride_os, fp8_max, min_amax,
    alpha, limit,
    ROWS_PER_A_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
    QUANT_OUT: tl.constexpr, UE8M0: tl.constexpr, ROUND_FIRST: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FUSE_ACT: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, SWIGLU_ALPHA: tl.constexpr,
    HAS_LIMIT: tl.constexpr, ONE_SCALE: tl.constexpr, B_DESC: tl.constexpr, STACKED: tl.constexpr,
    FLATTEN: tl.constexpr, DYNAMIC: tl.constexpr, A_SORTED: tl.constexpr, A_DESC: tl.constexpr,
    OUT_SORTED: tl.constexpr,
):
    # "persistent", "tma" (B_DESC) and "tma_stacked" (B_DESC and STACKED): num_programs programs over the
    # work items of the used blocks (the portable kernel's mapping, _tile_coords, over those). Static
    # schedule: program i takes items i, i + num_programs, ...; FLATTEN lets the compiler pipeline across
    # them (the next item's first loads during this one's epilogue). DYNAMIC: each program takes the next
    # item from a counter (work_queue_ptr[0]) until none is left, so programs that start late (their SMs
    # held by another stream's kernel, an exchange's) take fewer items instead of stretching the whole
    # GEMM by that kernel's duration; the last program to finish (counted in work_queue_ptr[1]) sets both
    # words back to zero for the next launch. Same math as _grouped_gemm_kernel, but gate and up are two
    # weight tiles of contiguous rows (what one TMA box reads of a 2D view) and two dots of BLOCK_N // 2
    # columns each, instead of one interleaved tile; STACKED (gated GEMM 1 only): one box of a 3D view
    # [L * 2, N, K_dim] holds the gate rows and the same up rows, one dot of BLOCK_N columns [gate | up].
    TWO: tl.constexpr = FUSE_ACT and GATED
    OUT_N: tl.constexpr = BLOCK_N // 2 if TWO else BLOCK_N
    num_n = tl.cdiv(N, OUT_N)
    num_blocks = tl.load(used_blocks_ptr)
    num_tiles = num_blocks * num_n
    # Two loops over one body: a counter's loop has no trip count, so only the static one can be a
    # tl.range the compiler pipelines across work items (FLATTEN).
    if DYNAMIC:
        tile = tl.atomic_add(work_queue_ptr, 1)
        while tile < num_tiles:
            _persistent_tile(
                tile, num_blocks, num_n, a_ptr, a_desc, b_ptr, b_desc, bias_ptr, scale_ptr, out_ptr,
                sorted_pair_ids_ptr, block_expert_ptr, a_scale_ptr, b_scale_ptr, num_pairs, N, K_dim, stride_am,
                stride_ak, stride_be, stride_bn, stride_bk, stride_bias_e, stride_om, stride_on, stride_asm,
                stride_ask, stride_bse, stride_bsn, stride_bsk, out_scale_ptr, stride_os, fp8_max, min_amax, alpha,
                limit, ROWS_PER_A_ROW,
                HAS_BIAS, HAS_SCALE, BLOCK_SCALED, SCALE_N, SCALE_K, QUANT_OUT, UE8M0, ROUND_FIRST, UPCAST,
                PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, FUSE_ACT, ACTIVATION, GATED, SWIGLU_ALPHA,
                HAS_LIMIT, ONE_SCALE, B_DESC, STACKED, A_SORTED, A_DESC, OUT_SORTED)
            tile = tl.atomic_add(work_queue_ptr, 1)
        if tl.atomic_add(work_queue_ptr + 1, 1) == num_programs - 1:  # the last program out
            tl.atomic_xchg(work_queue_ptr, 0)
            tl.atomic_xchg(work_queue_ptr + 1, 0)
    else:
        for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
            _persistent_tile(
                tile, num_blocks, num_n, a_ptr, a_desc, b_ptr, b_desc, bias_ptr, scale_ptr, out_ptr,
                sorted_pair_ids_ptr, block_expert_ptr, a_scale_ptr, b_scale_ptr, num_pairs, N, K_dim, stride_am,
                stride_ak, stride_be, stride_bn, stride_bk, stride_bias_e, stride_om, stride_on, stride_asm,
                stride_ask, stride_bse, stride_bsn, stride_bsk, out_scale_ptr, stride_os, fp8_max, min_amax, alpha,
                limit, ROWS_PER_A_ROW,
                HAS_BIAS, HAS_SCALE, BLOCK_SCALED, SCALE_N, SCALE_K, QUANT_OUT, UE8M0, ROUND_FIRST, UPCAST,
                PRECISION, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, FUSE_ACT, ACTIVATION, GATED, SWIGLU_ALPHA,
                HAS_LIMIT, ONE_SCALE, B_DESC, STACKED, A_SORTED, A_DESC, OUT_SORTED)


def tma_unsupported(w: torch.Tensor, interpreted: bool) -> Optional[str]:
    """Why the TMA kernels cannot load this weight tensor here (None: they can). The descriptor views w
    [L, rows, K_dim] as [L * rows, K_dim] (or [L * 2, rows / 2, K_dim]): K_dim contiguous, experts back
    to back, 16-byte aligned."""
    if _TensorDescriptor is None:
        return f"triton {triton.__version__} has no triton.tools.tensor_descriptor.TensorDescriptor"
    if not interpreted:
        if w.device.type != "cuda":
            return f"weights on {w.device}, not CUDA"
        major, minor = _capability(w.device.index)
        if major < 9:
            return f"CUDA capability {major}.{minor} < 9.0 (TMA needs Hopper or newer)"
    L, rows, K_dim = w.shape
    if w.stride(2) != 1 or (L > 1 and w.stride(0) != rows * w.stride(1)):
        return f"weights with strides {tuple(w.stride())} are not [L * rows, K_dim] row-major"
    if (w.stride(1) * w.element_size()) % 16 or w.data_ptr() % 16:
        return (f"weight rows of {w.stride(1) * w.element_size()} bytes at address {w.data_ptr()} are not "
                "16-byte aligned")
    return None


def _describable(t: torch.Tensor) -> bool:
    """Whether a 2D TMA descriptor can view t: rows contiguous, row stride and base 16-byte aligned."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_PROGRAMS_PER_SM: dict = {}  # (device, dtypes, constexprs) -> resident programs per SM


def _persistent_programs(kernel, args: tuple, meta: dict, device: torch.device) -> int:
    """SMs x the programs of this compiled variant that fit on one SM at once (shared memory, registers,
    warps): one wave of programs, each looping over work items. Compiles the variant on its first use
    (Triton's warm-up: no launch), then reads the count from a cache."""
    key = (device.index, tuple(getattr(a, "dtype", None) for a in args[:3]), tuple(sorted(meta.items())))
    if key not in _PROGRAMS_PER_SM:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        try:  # (triton internals: a version without them gets one program per SM, the same results)
            compiled._init_handles()
            props = triton.runtime.driver.active.utils.get_device_properties(device.index)
            warps = compiled.metadata.num_warps
            fits = min(props["max_shared_mem"] // max(compiled.metadata.shared, 1),
                       props["max_num_regs"] // max(compiled.n_regs * 32 * warps, 1), 64 // warps)
            _PROGRAMS_PER_SM[key] = (props["multiprocessor_count"], max(1, fits))
        except (AttributeError, KeyError, TypeError) as err:
            warnings.warn(f"grouped GEMM: no occupancy from this triton ({err!r}); one program per SM")
            _PROGRAMS_PER_SM[key] = (torch.cuda.get_device_properties(device).multi_processor_count, 1)
    sms, per_sm = _PROGRAMS_PER_SM[key]
    return sms * per_sm


@functools.lru_cache(maxsize=1024)
def _gemm_meta(rows_per_a_row: int, has_bias: bool, has_scale: bool, scaled: bool, scale_block: tuple[int, int],
               quant_out_ue8m0: Optional[bool], interpreted: bool, upcast: bool, precision: Optional[str],
               even_k: bool, block_m: int, block_n: int, tiles: GemmTiles, fuse_activation: Optional[str],
               is_gated: bool, gemm1_alpha: Optional[float], gemm1_clamp_limit: Optional[float],
               one_scale: bool, a_sorted: bool, out_sorted: bool) -> dict:
    """The grouped GEMM kernels' constexprs and launch options, built once per combination (a dict of
    ~25 entries per launch is host time at decode sizes). Shared: callers copy before changing it.
    quant_out_ue8m0: None without QUANT_OUT, else whether its scales are UE8M0."""
    quant_out = quant_out_ue8m0 is not None
    return dict(
        ROWS_PER_A_ROW=rows_per_a_row, HAS_BIAS=has_bias, HAS_SCALE=has_scale,
        BLOCK_SCALED=scaled, SCALE_N=scale_block[0], SCALE_K=scale_block[1], QUANT_OUT=quant_out,
        UE8M0=bool(quant_out_ue8m0), ROUND_FIRST=interpreted and quant_out,
        UPCAST=upcast, PRECISION=precision, EVEN_K=even_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=tiles.BLOCK_K, GROUP_M=tiles.GROUP_M,
        FUSE_ACT=fuse_activation is not None,
        **(activation_args(fuse_activation, is_gated, gemm1_alpha, gemm1_clamp_limit) if fuse_activation is not None
           else activation_args("silu", is_gated, None, None)),
        ONE_SCALE=one_scale, A_SORTED=a_sorted, OUT_SORTED=out_sorted, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, aligned: AlignedPairs, tiles: GemmTiles,
                 rows_per_a_row: int, bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                 interpreted: bool = False, fuse_activation: Optional[str] = None, is_gated: bool = True,
                 gemm1_alpha: Optional[float] = None, gemm1_clamp_limit: Optional[float] = None,
                 a_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                 scale_block: tuple[int, int] = (128, 128), out_quant: Optional[QuantConfig] = None,
                 out_scale: Optional[torch.Tensor] = None, num_programs: Optional[int] = None,
                 a_sorted: bool = False, out_sorted: bool = False) -> torch.Tensor:
    """out[p] = a[p // rows_per_a_row] @ w[e(p)]^T (* scale[p]) (+ bias[e(p)]) for every computed pair p.

    Sorted order (a_sorted, out_sorted): pair p's row is its place s in aligned.sorted_pair_ids
    ([num_blocks * BLOCK_M] rows, each expert's pairs contiguous) instead of p. out_sorted writes GEMM 1's
    result (and out_scale) at sorted rows; a_sorted reads GEMM 2's input (and a_scale) there
    (rows_per_a_row must be 1), and the TMA kernels then load each block's rows as one box instead of
    gathering them row by row. Padding rows are never written; read by a box, they only feed padding
    results, which are never stored.

    Block-scaled fp8 (a_scale and w_scale given): a and w float8_e4m3fn, a_scale [rows, ceil(K_dim/bk)]
    fp32 (one per row and bk channels), w_scale [L, ceil(N/bn), ceil(K_dim/bk)] fp32, (bn, bk) =
    scale_block; the product is a's and w's dequantized values, accumulated in fp32.
    out_quant (with fuse_activation): out is fp8 and out_scale [out's rows, ceil(I/group)] fp32 gets one
    scale per pair and group: GEMM 2's w8a8 input quantized in the epilogue (a program's output columns
    are exactly one group), never rounded to 16 bits first.

    a [rows, K_dim]; w [L, N, K_dim]; out [num_pairs, N], or [sorted rows, N] with out_sorted (rows of
    filtered pairs and padding are left untouched);
    bias [L, N] or None; scale [num_pairs] (or [N, K]) contiguous fp32, read by pair index, or None.
    fuse_activation ("silu", "gelu", "gelu_tanh") or None: GEMM 1 with act_and_mul's math in the epilogue;
    w [L, 2I, K_dim] ([gate; up]) when is_gated else [L, I, K_dim], out [.., I], as act_and_mul
    of the unfused output would give (but from the fp32 accumulator, not a rounded h).
    tiles.kernel picks the kernel (GEMM_KERNELS); the TMA ones raise where tma_unsupported says why not.
    num_programs: programs of the persistent kernels (default: as many as the GPU holds at once, one
    wave: SMs x resident programs per SM; 3 in the interpreter); with tiles.dynamic they take work items
    from aligned.work_queue as they free up.
    tiles.split_k > 1 (portable kernel, no activation): out [split_k, rows, N] fp32 gets each K split's
    partial sums (the bias in split 0); their sum is the product (topk_reduce adds them)."""
    prepare_grouped_gemm(a, w, out, aligned, tiles, rows_per_a_row, bias, scale, interpreted, fuse_activation, is_gated,
                         gemm1_alpha, gemm1_clamp_limit, a_scale, w_scale, scale_block, out_quant, out_scale, num_programs,
                         a_sorted, out_sorted)(a, w, out, aligned, bias, scale, a_scale, w_scale, out_scale)
    return out


def prepare_grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, aligned: AlignedPairs, tiles: GemmTiles,
                 rows_per_a_row: int, bias: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                 interpreted: bool = False, fuse_activation: Optional[str] = None, is_gated: bool = True,
                 gemm1_alpha: Optional[float] = None, gemm1_clamp_limit: Optional[float] = None,
                 a_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                 scale_block: tuple[int, int] = (128, 128), out_quant: Optional[QuantConfig] = None,
                 out_scale: Optional[torch.Tensor] = None, num_programs: Optional[int] = None,
                 a_sorted: bool = False, out_sorted: bool = False) -> Callable[..., None]:
    """grouped_gemm's checks and launch arguments, made once for these tensors' shapes, strides and dtypes (never
    their values or addresses): returns launch(a, w, out, aligned, bias, scale, a_scale, w_scale, out_scale), which
    launches the GEMM on tensors of the same shapes, strides and dtypes (none: those given here). grouped_gemm calls
    it at once; the triton runner keeps it in a per-shape plan, so a call of a shape seen before only launches."""
    split = tiles.split_k
    if a.dim() != 2 or w.dim() != 3 or out.dim() != (2 if split == 1 else 3):
        raise ValueError(f"grouped_gemm takes a [rows, K], w [L, N, K] and out [rows, N] ([split_k, rows, N] with "
                         f"split_k > 1); got a {list(a.shape)}, w {list(w.shape)}, out {list(out.shape)}, "
                         f"split_k={split}")
    if split != 1:
        if tiles.kernel != "portable" or fuse_activation is not None or out.shape[0] != split:
            raise ValueError(f"GemmTiles.split_k={split} needs the tiles run by the portable kernel (got "
                             f"{tiles.kernel!r}), no fused activation (GEMM 2) and out [split_k, rows, N] "
                             f"(got {list(out.shape)})")
        if out.dtype != torch.float32:
            raise ValueError(f"GemmTiles.split_k={split} writes fp32 partial sums; out is {out.dtype}")
    N, K_dim = w.shape[1], w.shape[2]
    num_sorted = aligned.sorted_pair_ids.numel()
    if a_sorted and (rows_per_a_row != 1 or a.shape[0] < num_sorted):
        raise ValueError(f"a_sorted needs rows_per_a_row=1 (got {rows_per_a_row}) and {num_sorted} rows "
                         f"(aligned.sorted_pair_ids' length); a has {a.shape[0]}")
    if out_sorted and out.shape[-2] < num_sorted:
        raise ValueError(f"out_sorted needs {num_sorted} rows (aligned.sorted_pair_ids' length); out has "
                         f"{out.shape[-2]}")
    for name, scales, by_sorted in (("a_scale", a_scale, a_sorted), ("out_scale", out_scale, out_sorted)):
        if by_sorted and scales is not None and scales.shape[0] < num_sorted:
            raise ValueError(f"{name} has {scales.shape[0]} rows; in sorted order it needs {num_sorted} "
                             "(aligned.sorted_pair_ids' length)")
    fuse = fuse_activation is not None
    two = fuse and is_gated
    if two:
        if N % 2:
            raise ValueError(f"gated GEMM 1 needs an even number of w13 rows, got {N}")
        N //= 2
    if out.shape[-1] != N:
        raise ValueError(f"out has {out.shape[-1]} columns; expected {N}")
    if tiles.kernel not in GEMM_KERNELS:
        raise ValueError(f"GemmTiles.kernel={tiles.kernel!r}; allowed: {', '.join(GEMM_KERNELS)}")
    block_n = max(32, tiles.BLOCK_N) if two else tiles.BLOCK_N  # weight rows per program (gate and up)
    if out_quant is not None:
        if not fuse or out_scale is None:
            raise ValueError("out_quant needs fuse_activation and out_scale")
        block_n = out_quant.activation_group * (2 if two else 1)
    out_n = block_n // 2 if two else block_n
    num_blocks = aligned.block_expert.numel()
    if num_blocks == 0:
        return _no_launch
    upcast = interpreted and a.dtype == torch.bfloat16
    precision = "ieee" if (a.dtype == torch.float32 or upcast) else None
    scaled = a_scale is not None
    if scaled != (w_scale is not None):
        raise ValueError("a_scale and w_scale come together (block-scaled fp8) or not at all")
    if scaled and scale_block[1] % tiles.BLOCK_K:
        raise ValueError(f"BLOCK_K={tiles.BLOCK_K} must divide the scale block's {scale_block[1]} channels")
    num_tiles = num_blocks * cdiv(N, out_n)
    has_bias, has_scale, quant_out = bias is not None, scale is not None, out_quant is not None
    if has_bias:
        bias = bias.contiguous()  # the epilogue steps through a bias row with stride 1
    sizes = (aligned.num_pairs, N, K_dim)
    strides = (*a.stride(), *w.stride(),  # (one call each)
               bias.stride(0) if has_bias else 0, *out.stride()[-2:],
               *(a_scale.stride() + w_scale.stride() if scaled else (0,) * 5))
    out_scale_stride = out_scale.stride(0) if quant_out else 0
    fp8_values = (out_quant.spec.max_value if quant_out else 1.0, MIN_AMAX)
    # the portable kernel's gated tile interleaves gate and up rows (two scale blocks)
    one_scale = (scaled and not (two and tiles.kernel == "portable")
                 and one_weight_scale(scale_block[0], out_n, N if two else None))
    meta = _gemm_meta(rows_per_a_row, has_bias, has_scale, scaled, scale_block,
                      None if out_quant is None else out_quant.ue8m0, interpreted, upcast, precision,
                      K_dim % tiles.BLOCK_K == 0, aligned.block_m, block_n, tiles, fuse_activation, is_gated,
                      gemm1_alpha, gemm1_clamp_limit, one_scale, a_sorted, out_sorted)

    def pointers(a, w, out, aligned, bias, scale, a_scale, w_scale):
        # (unused pointers get a tensor that is never read: the kernel's constexprs turn their loads off)
        return (bias.contiguous() if has_bias else w, scale if has_scale else a, out, aligned.sorted_pair_ids,
                aligned.block_expert, a_scale if scaled else a, w_scale if scaled else a)

    if tiles.kernel == "portable":
        meta = dict(meta, stride_split=out.stride(0) if split > 1 else 0, SPLIT_K=split)
        portable = bind(_grouped_gemm_kernel, (num_tiles, split), *(SLOT,) * 9, *sizes, num_blocks, *strides, SLOT,
                        out_scale_stride, *fp8_values, **meta)

        def launch(a, w, out, aligned, bias=None, scale=None, a_scale=None, w_scale=None, out_scale=None):
            portable(a, w, *pointers(a, w, out, aligned, bias, scale, a_scale, w_scale), out_scale if quant_out else a)
        return launch
    stacked = tiles.kernel == "tma_stacked" and two

    def launch(a, w, out, aligned, bias=None, scale=None, a_scale=None, w_scale=None, out_scale=None):
        # the persistent kernels: TMA descriptors hold the tensors' addresses, made per call
        b_desc, a_desc = w, a
        if tiles.kernel in TMA_KERNELS:
            why = tma_unsupported(w, interpreted)
            if why is not None:
                raise ValueError(f"GemmTiles.kernel={tiles.kernel!r} cannot run here: {why}; use 'persistent' or "
                                 "'portable'")
            L, rows = w.shape[0], w.shape[1]
            if stacked:  # [L * 2, N, K_dim]: one box holds N-rows of gate and the same rows of up
                b_desc = _TensorDescriptor(w, [L * 2, N, K_dim], [N * w.stride(1), w.stride(1), 1],
                                           [2, out_n, tiles.BLOCK_K])
            else:
                b_desc = _TensorDescriptor(w, [L * rows, K_dim], [w.stride(1), 1], [out_n, tiles.BLOCK_K])
            if a_sorted and _describable(a):
                a_desc = _TensorDescriptor(a, [num_sorted, K_dim], [a.stride(0), 1],
                                           [aligned.block_m, tiles.BLOCK_K])
        launch_meta = dict(meta, B_DESC=tiles.kernel in TMA_KERNELS, STACKED=stacked, FLATTEN=tiles.flatten,
                           DYNAMIC=tiles.dynamic, A_DESC=a_desc is not a)
        call = (a, a_desc, w, b_desc, *pointers(a, w, out, aligned, bias, scale, a_scale, w_scale), *sizes,
                aligned.used_blocks, aligned.work_queue if tiles.dynamic else aligned.used_blocks)
        tail = (*strides, out_scale if quant_out else a, out_scale_stride, *fp8_values)
        programs = num_programs
        if programs is None:
            programs = 3 if interpreted else _persistent_programs(_grouped_gemm_persistent_kernel,
                                                                  (*call, num_tiles, *tail), launch_meta, a.device)
        programs = max(1, min(programs, num_tiles))
        _grouped_gemm_persistent_kernel[(programs,)](*call, programs, *tail, **launch_meta)
    return launch


def _no_launch(*args, **kwargs) -> None:
    """A prepared launch with nothing to compute (no blocks)."""


# --------------------------------------------------------------------------- activation (unfused)

@fast_launch
@triton.jit
def _act_and_mul_kernel(h_ptr, out_ptr, computed_ptr, P, I, stride_h, stride_o, alpha, limit,
                        ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_FILTER: tl.constexpr,
                        SWIGLU_ALPHA: tl.constexpr, HAS_LIMIT: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = rows < P
    if HAS_FILTER:
        keep = keep & (tl.load(computed_ptr + rows, mask=rows < P, other=0) != 0)
    rows = rows.to(tl.int64)
    # Filtered rows are never read (they may hold NaN from a previous allocation) and come out zero.
    read = keep[:, None] & (cols < I)[None, :]
    g_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
    g = tl.load(g_ptrs, mask=read, other=0.0).to(tl.float32)
    u = g
    if GATED:
        u = tl.load(g_ptrs + I, mask=read, other=0.0).to(tl.float32)
    a = activate(g, u, alpha, limit, ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT)
    a = tl.where(keep[:, None], a, 0.0)
    out_mask = (rows < P)[:, None] & (cols < I)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], a.to(out_ptr.dtype.element_ty), mask=out_mask)


def _row_blocks(cols: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK) for the elementwise kernels: ~4K elements per program on GPU; larger
    programs under the interpreter, whose cost is per program."""
    block = min(1024, next_power_of_2(cols))
    return (max(1, (16384 if interpreted else 4096) // block), block)


# Measured on an H200 (graph replay, 2026-12-02): the top-k reduction at decode sizes is latency-bound, and
# more, smaller programs finish sooner: T=1, H=7168, K=8: 2.8 us with 4 x 1024 tiles (7 programs), 1.6 us
# with 1 x 256 (28); T=16 of a GEMM 2 split 8 ways: 4.4 -> 2.2 us.
MIN_REDUCE_PROGRAMS = 264  # two per SM of an H100/H200


def _reduce_blocks(num_tokens: int, cols: int, interpreted: bool, indexed: bool = False) -> tuple[int, int]:
    """topk_reduce's (BLOCK_ROWS, BLOCK): _row_blocks' tiles, halved (rows first, then columns down to
    256) while the grid would have fewer than MIN_REDUCE_PROGRAMS programs; as they are at prefill sizes
    and under the interpreter. indexed (rows found through pair_rows): one token a program, whose K rows lie
    apart (an H200, the DeepSeek-V3 shard at 4096 / 16384 tokens: 179 -> 128 / 685 -> 497 us, the speed of
    rows by pair; four tokens a program read them 1.4x slower)."""
    rows, block = _row_blocks(cols, interpreted)
    if indexed and not interpreted:
        rows = 1
    while not interpreted and cdiv(num_tokens, rows) * cdiv(cols, block) < MIN_REDUCE_PROGRAMS:
        if rows > 1:
            rows //= 2
        elif block > 256:
            block //= 2
        else:
            break
    return rows, block


def act_and_mul(h: torch.Tensor, intermediate_size: int, activation: str = "silu", is_gated: bool = True,
                computed: Optional[torch.Tensor] = None, gemm1_alpha: Optional[float] = None,
                gemm1_clamp_limit: Optional[float] = None, out: Optional[torch.Tensor] = None,
                interpreted: bool = False) -> torch.Tensor:
    """h [P, 2I] ([gate | up]) or [P, I] (not gated) -> [P, I] in h's dtype, math in fp32.

    computed [P] bool or None: rows with False are written as zeros and their h row is not read;
    None computes every row (the unfiltered path; with an all-True mask the result is bit-identical)."""
    P, I = h.shape[0], intermediate_size
    if out is None:
        out = torch.empty(P, I, dtype=h.dtype, device=h.device)
    if P == 0:
        return out
    block_rows, block = _row_blocks(I, interpreted)
    grid = (cdiv(P, block_rows), cdiv(I, block))
    _act_and_mul_kernel[grid](
        h, out, computed if computed is not None else h, P, I, h.stride(0), out.stride(0),
        HAS_FILTER=computed is not None, **activation_args(activation, is_gated, gemm1_alpha, gemm1_clamp_limit),
        BLOCK_ROWS=block_rows, BLOCK=block, num_warps=4,
    )
    return out


# --------------------------------------------------------------------------- weighted top-k reduction

@fast_launch
@triton.jit
def _topk_reduce_kernel(o_ptr, weight_ptr, computed_ptr, y_ptr, pair_rows_ptr, N, H: tl.constexpr,
                        stride_o: tl.constexpr, stride_y: tl.constexpr, scale, stride_split,
                        TOP_K: tl.constexpr, HAS_WEIGHT: tl.constexpr, SPLITS: tl.constexpr, PAIR_ROWS: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    token_ok = tokens < N
    col_ok = cols < H
    acc = tl.zeros((BLOCK_ROWS, BLOCK), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pair = tokens * TOP_K + k
        keep = token_ok & (tl.load(computed_ptr + pair, mask=token_ok, other=0) != 0)
        # Rows of filtered pairs are never loaded: their contents are undefined.
        if PAIR_ROWS:  # o in another row order: the pair's row is pair_rows[pair]
            row = o_ptr + tl.load(pair_rows_ptr + pair, mask=keep, other=0).to(tl.int64)[:, None] * stride_o + cols[None, :]
        else:
            row = o_ptr + pair[:, None] * stride_o + cols[None, :]
        v = tl.load(row, mask=keep[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        split_row = row
        for s in tl.static_range(1, SPLITS):  # a split GEMM 2's partial sums, in split order
            split_row += stride_split  # (a step at a time: s * stride_split would wrap in int32 past 2**31)
            v += tl.load(split_row, mask=keep[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v = v * tl.load(weight_ptr + pair, mask=keep, other=0.0)[:, None]
        acc += v
    tl.store(y_ptr + tokens[:, None] * stride_y + cols[None, :], (acc * scale).to(y_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


def topk_reduce(o: torch.Tensor, computed: torch.Tensor, top_k: int, weights: Optional[torch.Tensor],
                scale: float, out_dtype: torch.dtype, interpreted: bool = False,
                pair_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """o [N*K, H] pair rows -> y [N, H] = scale * sum_k weights[t, k] * o[t*K + k] over computed pairs,
    accumulated in fp32 in slot order (deterministic). weights [N*K] (or [N, K]) contiguous fp32, or None (all ones).
    o [S, N*K, H]: a split GEMM 2's partial sums (GemmTiles.split_k), each pair's S rows added first, in order.
    pair_rows [N*K] int32: o holds pair p's row at o[pair_rows[p]] instead (any number of rows; the Gluon GEMM 2's
    rows in sorted order, sort_rows' map), read for computed pairs only."""
    num_pairs = computed.numel() if pair_rows is not None else None
    return prepare_topk_reduce(o, top_k, weights is not None, scale, out_dtype, interpreted, num_pairs)(
        o, computed, weights, pair_rows)


def prepare_topk_reduce(o: torch.Tensor, top_k: int, has_weights: bool, scale: float, out_dtype: torch.dtype,
                        interpreted: bool = False, num_pairs: Optional[int] = None) -> Callable[..., torch.Tensor]:
    """topk_reduce's launch for o of this shape, strides and dtype, made once: returns reduce(o, computed, weights,
    pair_rows=None) -> y, for o of the same and weights given exactly when has_weights. num_pairs: o's rows are
    found through a pair_rows map of that many pairs (always given then), not o's row count. The triton runner
    keeps it in a per-shape plan."""
    splits = o.shape[0] if o.dim() == 3 else 1
    P, H = o.shape[-2:]
    P = P if num_pairs is None else num_pairs
    N = P // top_k
    device = o.device
    if N == 0:
        return lambda o, computed, weights, pair_rows=None: torch.empty(N, H, dtype=out_dtype, device=device)
    block_rows, block = _reduce_blocks(N, H, interpreted, num_pairs is not None)
    # y [N, H] is contiguous: its row stride is H
    sizes = (N, H, o.stride(-2), H, float(scale), o.stride(0) if splits > 1 else 0)
    kernel = bind(_topk_reduce_kernel, (cdiv(N, block_rows), cdiv(H, block)), *(SLOT,) * 5, *sizes, TOP_K=top_k,
                  HAS_WEIGHT=has_weights, SPLITS=splits, PAIR_ROWS=num_pairs is not None, BLOCK_ROWS=block_rows,
                  BLOCK=block, num_warps=4)

    def reduce(o, computed, weights, pair_rows=None):
        y = torch.empty(N, H, dtype=out_dtype, device=device)
        kernel(o, weights if has_weights else o, computed, y, computed if pair_rows is None else pair_rows)
        return y
    return reduce


@fast_launch
@triton.jit
def _invert_sorted_pairs_kernel(sorted_pair_ids_ptr, used_blocks_ptr, pair_rows_ptr, num_pairs,
                                BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    first = tl.program_id(0) * BLOCK
    used_rows = tl.load(used_blocks_ptr) * BLOCK_M
    if first < used_rows:  # programs past the used blocks (most of them at decode sizes) read nothing else
        rows = first + tl.arange(0, BLOCK)
        pair = tl.load(sorted_pair_ids_ptr + rows, mask=rows < used_rows, other=num_pairs)
        tl.store(pair_rows_ptr + pair, rows, mask=pair < num_pairs)


@fast_launch
@triton.jit
def _sort_rows_kernel(src_ptr, src_scale_ptr, computed_ptr, pair_rows_ptr, out_ptr, out_scale_ptr, H, G, stride_src,
                      stride_src_scale, stride_out, stride_out_scale, fp8_max, min_amax, TOP_K: tl.constexpr,
                      K_PAD: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, QUANTIZE: tl.constexpr,
                      UE8M0: tl.constexpr, ROUND_FIRST: tl.constexpr):
    """Program (t, b): token t's columns [b * GROUPS * GROUP, ...), read once (and quantized once: QUANTIZE),
    written to the sorted row of each of its computed pairs; a token with none is not read."""
    t = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_PAD)
    if tl.max(tl.load(computed_ptr + t * TOP_K + slots, mask=slots < TOP_K, other=0).to(tl.int32), 0) != 0:
        g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        inside = cols < H
        if QUANTIZE:  # the activation rule, as quantize_rows applies it (bit for bit)
            q, scale = quantize_groups(tl.load(src_ptr + t * stride_src + cols, mask=inside, other=0.0).to(tl.float32),
                                       fp8_max, min_amax, UE8M0, ROUND_FIRST, True)  # (tokens: the quotient)
            q = q.to(out_ptr.dtype.element_ty)
            scale_cols = g
        else:  # fp8 rows (bytes) and their scales, as they are: program 0 of the token copies every scale
            q = tl.load(src_ptr + t * stride_src + cols, mask=inside)
            scale_cols = tl.where(tl.program_id(1) == 0, tl.arange(0, BLOCK_G), G)
            scale = tl.load(src_scale_ptr + t * stride_src_scale + scale_cols, mask=scale_cols < G)
        for k in tl.static_range(TOP_K):
            pair = t * TOP_K + k
            if tl.load(computed_ptr + pair) != 0:
                row = tl.load(pair_rows_ptr + pair).to(tl.int64)
                tl.store(out_ptr + row * stride_out + cols, q, mask=inside)
                tl.store(out_scale_ptr + row * stride_out_scale + scale_cols, scale, mask=scale_cols < G)


def sort_rows(src: torch.Tensor, src_scale: Optional[torch.Tensor], aligned: AlignedPairs, top_k: int,
              out: torch.Tensor, out_scale: torch.Tensor, pair_rows: torch.Tensor, quant: Optional[QuantConfig] = None,
              interpreted: bool = False) -> None:
    """GEMM 1's input rows in expert order, for a GEMM that loads them a block at a time (TMA has no row gather):
    out[m] = token sorted_pair_ids[m] // top_k's row and out_scale[m] its scales, for the sorted rows m of the
    used blocks (aligned.used_blocks, read on the device) that hold a pair. src [N, H] rows unit-strided: fp8 rows
    with src_scale [N, G] fp32, copied as they are; or (src_scale None) float rows quantized here by quant's
    activation rule (quantize_rows' bits). out [S, H] fp8 and out_scale [S, G] fp32 (S =
    sorted_pair_ids.numel()), rows unit-strided. Padding rows and blocks past the used ones are not written, nor
    tokens without a computed pair read: only traffic for the pairs computed.
    pair_rows [num_pairs] int32: pair_rows[sorted_pair_ids[m]] = m, the inverse map (topk_reduce reads GEMM 2's
    rows in sorted order through it); entries of pairs not computed are not written.
    Two launches: the map, then one program per (token, column block) that reads its token's row once (and
    quantizes it once) and writes it to each of its pairs' rows: a gather by sorted row read each token's row K
    times, and ran 1.4x (4096 tokens) to 1.6x (16384) slower with the quantization's own launch before it (the
    DeepSeek-V3 shard, H200, docs/performance.md)."""
    N, H = src.shape
    S = aligned.sorted_pair_ids.numel()
    if S == 0 or N == 0:
        return
    block = min(1024, next_power_of_2(S))
    _invert_sorted_pairs_kernel[(cdiv(S, block), )](aligned.sorted_pair_ids, aligned.used_blocks, pair_rows,
                                                   aligned.num_pairs, BLOCK_M=aligned.block_m, BLOCK=block,
                                                   num_warps=4)
    quantize = src_scale is None
    if quantize:
        G, group, fp8_max, ue8m0 = quant.num_groups(H), quant.activation_group, quant.spec.max_value, quant.ue8m0
        src_scale = out_scale  # (unread)
    else:  # bytes, in 128-byte groups; the scales copied whole
        G, group, fp8_max, ue8m0 = src_scale.shape[1], 128, 0.0, False
        src, out = src.view(torch.uint8), out.view(torch.uint8)
    columns = cdiv(H, group)
    groups = min(next_power_of_2(columns), 64 if interpreted else 16)  # 16: run BY's fastest (2048 bf16 values)
    _sort_rows_kernel[(N, cdiv(columns, groups))](
        src, src_scale, aligned.computed, pair_rows, out, out_scale, H, G, src.stride(0), src_scale.stride(0),
        out.stride(0), out_scale.stride(0), fp8_max, MIN_AMAX, TOP_K=top_k, K_PAD=next_power_of_2(top_k), GROUP=group, GROUPS=groups,
        BLOCK_G=next_power_of_2(G), QUANTIZE=quantize, UE8M0=ue8m0, ROUND_FIRST=interpreted, num_warps=4)
