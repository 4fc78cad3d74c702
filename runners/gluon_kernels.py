"""The fp8 grouped GEMM in Gluon (Triton's lower-level dialect: explicit layouts, TMA, mbarriers, async wgmma),
for Hopper (compute capability 9.0): block-scaled w8a8 (activations 1 x 128, weights 128 x 128, fp32 scales)
with each K step's promotion (acc += product * sa * sw) issued while the next step's wgmma runs.

Why: Triton's code for `acc += tl.dot(a, b) * scale` waits for every wgmma before scaling its product, so the
tensor cores idle through each promotion; the triton runner's block-scaled GEMMs reach ~1.1x of bf16 there.
Here the K steps go in unrolled groups of GROUP_STEPS: inside a group, step i's product is promoted after
step i+1's wgmma is issued, behind a wait that leaves that wgmma running; the group's last step waits alone.
(One wgmma kept in flight across the loop's back edge instead made ptxas serialize every wgmma of the kernel,
C7514; groups of 5 or more spill.) One load warp issues every TMA load (warp specialization, Pipeline): the
math warps hand each ring slot back as its wgmma finishes, and the ring stays full across passes, work items
and epilogues. On an H200 each GEMM runs at ~1000 TFLOP/s on the DeepSeek-V3 and Mixtral shapes, 1.2-1.3x the
runner's Triton fp8 kernels (docs/performance.md).

A persistent program takes (row block, column tile) work items of the used blocks of AlignedPairs (rows in
sorted order: BLOCK_M rows of one expert per block, block_expert[b]); A [S, K] fp8 in sorted order (TMA), W
[L, W_ROWS, K] fp8 viewed as [L*W_ROWS, K] (TMA rows expert*W_ROWS + n0), sw viewed likewise per 128 rows.
GEMM 1 (gemm_act_quant) computes each item's gate tile, parks it in shared memory (bf16 by default:
Pipeline.gate_bf16), computes the up tile (W rows I further), and stores act(gate) * up quantized to fp8 per
128 columns, with its scales, in sorted order: GEMM 2's input, never rounded to bf16 (as the triton runner's
fused GEMM 1; the activation and the quantization rule are the same jit functions). GEMM 2 (gemm_sorted) stores bf16 rows in sorted order
too, padding rows included ([S, N]; the top-k reduction finds a pair's row through sort_rows'
pair_rows): each tile one asynchronous TMA store, where a store by pair (no TMA scatter on Hopper) held the
math warps through every tile's epilogue (run BV: GEMM 2 9% faster on the DeepSeek-V3 shard's short items).
No interpreter: CPU tests cannot run these kernels (GPU tests do); scripts/compile_sm90.py --gluon compiles
them for sm_90a on a machine without a GPU.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch

from ep_runtime.quant import MIN_AMAX
from ep_runtime.quant_kernels import quantize_groups

from .triton_kernels import _capability, _sm_count, activate, activation_args

GROUP = 128  # the scale block (activations 1 x 128, weights 128 x 128) and BLOCK_N, BLOCK_K
BLOCK_M, NUM_WARPS, GROUP_STEPS = 128, 8, 4
# With a load warp, its registers go to the two math warpgroups (setmaxnreg): 168 a thread at launch (65536
# over 12 warps), then 24 for the load warp's warpgroup and 240 for the math ones.
LOAD_WARP_REGS, MATH_REGS, MAX_REGS = 24, 240, 168


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How one GEMM's kernel runs. None of it changes the order of any sum: outputs are bit-identical, for one
    gate_bf16."""

    stages: int = 4  # ring slots, each one K step's A and W tiles (32 KB)
    group_m: int = 4  # row blocks that sweep the column tiles together
    # One load warp issues every TMA load, running `stages` steps ahead across passes and work items, through
    # each epilogue; else the math warps issue them.
    warp_specialize: bool = True
    # 2 (with the load warp): each math warpgroup a partition of its own (64 rows of a tile), handing ring slots
    # back on its own, so one's promotion or epilogue runs beside the other's wgmma; 1: both in one, in step.
    math_partitions: int = 1
    # GEMM 1: the gate's product parked in shared memory as bf16 (32 KB, room for a fifth ring stage) instead
    # of fp32 (64 KB): the gate rounded to bf16 before the activation (other bits than fp32's, the same sums).
    gate_bf16: bool = False

    def __post_init__(self):
        if self.stages < 2 or self.group_m < 1 or self.math_partitions not in (1, 2):
            raise ValueError(f"{self}: stages >= 2 (one slot in use, one filling), group_m >= 1, math_partitions "
                             f"1 or 2 (the two math warpgroups)")


# Measured on one H200, both shapes, 4096 and 16384 tokens (docs/performance.md, runs AB, AC, AE): the load
# warp +4-19% (GEMM 1) and up to +24% (GEMM 2); two math partitions and 5 stages the fastest GEMM 2 on average.
# GEMM 1 gains from two partitions since its quantization multiplies by a reciprocal (run BT: -2% / -6%; with a
# division per value they cost 3%), and from a fifth stage where its gate tile is parked as bf16 (run BY, 4096
# tokens: -4.7% DeepSeek-V3 shard, -3.5% Mixtral; with an fp32 gate 4 stages fit; the gate's rounding moves ~2%
# of the fp8 outputs by one e4m3 step, far inside e4m3's own rounding of them).
GEMM1_PIPELINE = Pipeline(stages=5, math_partitions=2, gate_bf16=True)
GEMM2_PIPELINE = Pipeline(stages=5, math_partitions=2)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the TMA copies' names: triton 3.6 (the lent GPUs' build) has only the old ones; newer releases removed them
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # warp_specialize([(function, args), ...], warps, registers) since triton 3.6; older releases took the
    # partitions another way: there the kernels run without the load warp (the same bits, a little slower)
    _WARP_SPECIALIZE_API = "functions_and_args" in inspect.signature(gl.warp_specialize).parameters
    _IMPORT_ERROR: Optional[str] = None
except (ImportError, AttributeError) as exc:  # an older triton, or none
    gluon = None
    _IMPORT_ERROR = f"triton's Gluon Hopper API does not import ({type(exc).__name__}: {exc})"


def unsupported(x: torch.Tensor, N1: int, K1: int, N2: int, K2: int) -> Optional[str]:
    """Why the Gluon GEMMs cannot run these shapes here (None: they can): GEMM 1 [*, K1] x [N1, K1]^T and GEMM 2
    [*, K2] x [N2, K2]^T. They need the Gluon API, a CUDA device of capability 9.0 (wgmma), and N and K multiples
    of 128 (the scale blocks)."""
    for name, size, multiple in (("N1", N1, GROUP), ("N2", N2, GROUP), ("K1", K1, GROUP), ("K2", K2, GROUP)):
        if size % multiple:
            return f"{name}={size} is not a multiple of {multiple}"
    if gluon is None:
        return _IMPORT_ERROR
    if x.device.type != "cuda":
        return f"the tensors are on {x.device} (CUDA only; no interpreter)"
    capability = _capability(x.device.index)
    if capability != (9, 0):
        return f"the GPU has compute capability {capability} (wgmma needs 9.0)"
    return None


if gluon is not None:

    @gluon.jit
    def _tile_origin(tile, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """Work item `tile`'s first row and column; GROUP_M row blocks sweep the column tiles together."""
        num_m, per_group = gl.cdiv(M, BLOCK_M), GROUP_M * gl.cdiv(N, BLOCK_N)
        first_m = (tile // per_group) * GROUP_M
        size = gl.minimum(num_m - first_m, GROUP_M)
        return (first_m + (tile % per_group) % size) * BLOCK_M, ((tile % per_group) // size) * BLOCK_N

    @gluon.jit
    def _work_item(tile, num_tiles, M, N, W_ROWS, block_expert_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   GROUP_M: gl.constexpr):
        """(first sorted row, first output column, first row of W viewed as [L*W_ROWS, K]) of work item `tile`; a
        tile past the last is clamped (its loads are then issued with pred False)."""
        m0, n0 = _tile_origin(gl.maximum(gl.minimum(tile, num_tiles - 1), 0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        return m0, n0, gl.load(block_expert_ptr + m0 // BLOCK_M) * W_ROWS + n0

    @gluon.jit
    def _issue_load(ring, base, j, k_steps, m0, b_row, pred):
        """TMA loads of K step j (when j < k_steps and pred) into ring position base + j."""
        a_desc, b_desc, a_ring, b_ring, ready, _ = ring
        slot, k0 = (base + j) % a_ring.shape[0], j * a_desc.block_type.shape[1]
        pred = pred & (j < k_steps)
        mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        _tma_load(a_desc, [m0, k0], ready.index(slot), a_ring.index(slot), pred)
        _tma_load(b_desc, [b_row, k0], ready.index(slot), b_ring.index(slot), pred)

    @gluon.jit
    def _issue_mma(ring, position, acc, use_acc, row0: gl.constexpr):
        """Wait for ring position's tiles, then start acc (+)= A_tile[row0:row0 + acc rows] @ B_tile^T (returns at
        once)."""
        _, _, a_ring, b_ring, ready, _ = ring
        slot = position % a_ring.shape[0]
        mbarrier.wait(ready.index(slot), (position // a_ring.shape[0]) & 1)
        a = a_ring.index(slot)
        if acc.shape[0] < a.shape[0]:
            a = a.slice(row0, acc.shape[0])
        # fp8 wgmma takes both operands K-major: B's [BLOCK_N, BLOCK_K] tile viewed as [BLOCK_K, BLOCK_N]
        return warpgroup_mma(a, b_ring.index(slot).permute((1, 0)), acc, use_acc=use_acc, is_async=True)

    @gluon.jit
    def _step_scale(sa_rows, sw_ptr, b_row, k, stride_sw):
        """K step k's scale [rows, 1]: each row's activation scale times the tile's one weight-block scale."""
        return gl.expand_dims(gl.load(sa_rows + k) * gl.load(sw_ptr + (b_row // 128) * stride_sw + k), 1)

    @gluon.jit
    def _recycle(ring, step, done, k_steps, m0, b_row, WARP_SPECIALIZE: gl.constexpr):
        """K step `done`'s wgmma has finished: its slot is free. Hand it back to the load warp, or refill it with
        step done + (ring slots)'s tiles."""
        if WARP_SPECIALIZE:
            mbarrier.arrive(ring[5].index((step + done) % ring[2].shape[0]), count=1)
        else:
            _issue_load(ring, step, done + ring[2].shape[0], k_steps, m0, b_row, True)

    @gluon.jit
    def _promote_behind(ring, step, k, k_steps, m0, b_row, pending, pending_scale, acc, zero, sa_rows, sw_ptr,
                        stride_sw, WARP_SPECIALIZE: gl.constexpr, row0: gl.constexpr):
        """Start K step k's wgmma; then wait for step k-1's (`pending`), recycle its slot and add its scaled
        product while step k runs. Returns step k's (in flight, its scale) and acc."""
        # an empty asm with side effects: LLVM would sink the previous step's multiply-adds below this issue,
        # three accumulators live at once (255 registers, spills: ptxas then serializes every wgmma)
        acc = gl.inline_asm_elementwise("", "=r,0", [acc], dtype=gl.float32, is_pure=False, pack=1)
        issued = _issue_mma(ring, step + k, zero, False, row0)
        scale = _step_scale(sa_rows, sw_ptr, b_row, k, stride_sw)
        done = warpgroup_mma_wait(num_outstanding=1, deps=(pending, ))
        _recycle(ring, step, k - 1, k_steps, m0, b_row, WARP_SPECIALIZE)
        return issued, scale, acc + done * pending_scale

    @gluon.jit
    def _k_loop(ring, step, m0, b_row, k_steps, sa_rows, sw_ptr, stride_sw, zero, GROUP_STEPS: gl.constexpr,
                WARP_SPECIALIZE: gl.constexpr, row0: gl.constexpr):
        """One work item's scaled product over K (its first loads issued, here or by the load warp): returns acc.
        The steps past the last whole group (K not a multiple of 128 * GROUP_STEPS) run one at a time, each
        waited."""
        acc = zero
        grouped = k_steps - k_steps % GROUP_STEPS
        for k in range(0, grouped, GROUP_STEPS):
            pending = _issue_mma(ring, step + k, zero, False, row0)
            scale = _step_scale(sa_rows, sw_ptr, b_row, k, stride_sw)
            for i in gl.static_range(1, GROUP_STEPS):
                pending, scale, acc = _promote_behind(ring, step, k + i, k_steps, m0, b_row, pending, scale, acc,
                                                      zero, sa_rows, sw_ptr, stride_sw, WARP_SPECIALIZE, row0)
            done = warpgroup_mma_wait(num_outstanding=0, deps=(pending, ))
            _recycle(ring, step, k + GROUP_STEPS - 1, k_steps, m0, b_row, WARP_SPECIALIZE)
            acc = acc + done * scale
        for k in range(grouped, k_steps):
            pending = _issue_mma(ring, step + k, zero, False, row0)
            scale = _step_scale(sa_rows, sw_ptr, b_row, k, stride_sw)
            done = warpgroup_mma_wait(num_outstanding=0, deps=(pending, ))
            _recycle(ring, step, k, k_steps, m0, b_row, WARP_SPECIALIZE)
            acc = acc + done * scale
        return acc

    @gluon.jit
    def _tile_count(used_blocks_ptr, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
        """(rows M the work items cover: the used blocks', number of work items, K steps of each pass)."""
        used = gl.load(used_blocks_ptr)
        return gl.maximum(used, 1) * BLOCK_M, used * (N // BLOCK_N), K // BLOCK_K

    @gluon.jit
    def _produce(ring, block_expert_ptr, used_blocks_ptr, N, W_ROWS, K, PASSES: gl.constexpr, GROUP_M: gl.constexpr):
        """The load warp: every K step of this program's work items (each pass's W rows N further), in the math
        warps' order, each as soon as they hand its ring slot back."""
        a_desc, b_desc, a_ring, b_ring, ready, empty = ring
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_ring.shape[0]
        M, num_tiles, k_steps = _tile_count(used_blocks_ptr, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
        position = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            m0, n0, b_row = _work_item(tile, num_tiles, M, N, W_ROWS, block_expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
            for p in gl.static_range(PASSES):
                for k in range(k_steps):
                    slot = position % STAGES
                    # a barrier starts with its phase 1 complete: the first lap through the ring does not wait
                    mbarrier.wait(empty.index(slot), ((position // STAGES) & 1) ^ 1)
                    mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                    _tma_load(a_desc, [m0, k * BLOCK_K], ready.index(slot), a_ring.index(slot))
                    _tma_load(b_desc, [b_row + p * N, k * BLOCK_K], ready.index(slot), b_ring.index(slot))
                    position += 1

    @gluon.jit
    def _consume(ring, out, c_smem, gate_smem, pointers, sizes, epilogue, GROUP_STEPS: gl.constexpr,
                 GROUP_M: gl.constexpr, ACT_QUANT: gl.constexpr,
                 ACTIVATION: gl.constexpr, GATED: gl.constexpr, SWIGLU_ALPHA: gl.constexpr, HAS_LIMIT: gl.constexpr,
                 UE8M0: gl.constexpr, WARP_SPECIALIZE: gl.constexpr, PART: gl.constexpr, num_warps: gl.constexpr):
        """The math warps: each work item's passes (wgmma, promotion) and its epilogue, over the tile's rows
        [PART * ROWS, (PART + 1) * ROWS), ROWS = 16 a warp; without warp specialization they also issue the loads
        (a slot refilled as soon as its wgmma finishes; the next pass's or item's first ones, a slot each, after
        a pass's last wait)."""
        a_desc, b_desc, a_ring, _, _, _ = ring
        sa_ptr, sw_ptr, block_expert_ptr, used_blocks_ptr = pointers
        N, W_ROWS, K, stride_sa, stride_sw = sizes
        out_scale_ptr, stride_out_scale, fp8_max, min_amax, alpha, limit = epilogue
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_ring.shape[0]
        PASSES: gl.constexpr = 2 if (ACT_QUANT and GATED) else 1
        ROWS: gl.constexpr = 16 * num_warps  # (num_warps: this partition's, as the kernel's)
        row0: gl.constexpr = PART * ROWS
        if ROWS < BLOCK_M:  # this partition's rows (its wgmmas read theirs of each A tile)
            c_smem = c_smem.slice(row0, ROWS)
            if PASSES == 2:
                gate_smem = gate_smem.slice(row0, ROWS)
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        zero = gl.zeros((ROWS, BLOCK_N), dtype=gl.float32, layout=mma_layout)
        M, num_tiles, k_steps = _tile_count(used_blocks_ptr, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
        step = 0  # K steps this program has consumed: the ring position and the barriers' phase
        if not WARP_SPECIALIZE:
            m0, n0, b_row = _work_item(gl.program_id(0), num_tiles, M, N, W_ROWS, block_expert_ptr, BLOCK_M,
                                       BLOCK_N, GROUP_M)
            for j in gl.static_range(STAGES):  # every slot; then each is refilled as its wgmma finishes
                _issue_load(ring, 0, j, k_steps, m0, b_row, gl.program_id(0) < num_tiles)
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            m0, n0, b_row = _work_item(tile, num_tiles, M, N, W_ROWS, block_expert_ptr, BLOCK_M, BLOCK_N, GROUP_M)
            sa_rows = sa_ptr + (m0 + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma_layout))) * stride_sa
            for p in gl.static_range(PASSES):
                acc = _k_loop(ring, step, m0, b_row + p * N, k_steps, sa_rows, sw_ptr, stride_sw, zero, GROUP_STEPS,
                              WARP_SPECIALIZE, row0)
                step += k_steps
                # every slot is free after the loop's last wait: without the load warp, prefetch the next pass
                # (the up rows) or item
                if p + 1 < PASSES:
                    if not WARP_SPECIALIZE:
                        for j in gl.static_range(STAGES):
                            _issue_load(ring, step, j, k_steps, m0, b_row + (p + 1) * N, True)
                    gate_smem.store(acc.to(gate_smem.dtype))  # read back below by the thread that wrote it: no barrier needed
                elif not WARP_SPECIALIZE:
                    next_tile = tile + gl.num_programs(0)
                    next_m0, next_n0, next_b_row = _work_item(next_tile, num_tiles, M, N, W_ROWS, block_expert_ptr,
                                                              BLOCK_M, BLOCK_N, GROUP_M)
                    for j in gl.static_range(STAGES):
                        _issue_load(ring, step, j, k_steps, next_m0, next_b_row, next_tile < num_tiles)
            value = acc  # GEMM 2: bf16 rows in sorted order
            if ACT_QUANT:
                if PASSES == 2:
                    value = activate(gate_smem.load(mma_layout).to(gl.float32), acc, alpha, limit, ACTIVATION, True, SWIGLU_ALPHA,
                                     HAS_LIMIT)
                else:
                    value = activate(acc, acc, alpha, limit, ACTIVATION, False, SWIGLU_ALPHA, HAS_LIMIT)
                value, row_scale = quantize_groups(value, fp8_max, min_amax, UE8M0, False, False)
                scale_rows = m0 + row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma_layout))
                gl.store(out_scale_ptr + scale_rows * stride_out_scale + n0 // BLOCK_N, row_scale)
            # the tile's rows in sorted order (padding rows too): one TMA box, stored while the next item runs
            tma.store_wait(pendings=0)  # the previous item's store has left c_smem
            c_smem.store(value.to(out.dtype))
            fence_async_shared()
            _tma_store(out, [m0 + row0, n0], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _grouped_kernel(a_desc, b_desc, out, sa_ptr, sw_ptr, block_expert_ptr, used_blocks_ptr,
                        N, W_ROWS, K, stride_sa, stride_sw, NUM_STAGES: gl.constexpr,
                        GROUP_STEPS: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr,
                        out_scale_ptr=None, stride_out_scale=0, fp8_max=0.0, min_amax=0.0, alpha=0.0, limit=0.0,
                        ACT_QUANT: gl.constexpr = False, ACTIVATION: gl.constexpr = 0, GATED: gl.constexpr = True,
                        SWIGLU_ALPHA: gl.constexpr = False, HAS_LIMIT: gl.constexpr = False,
                        UE8M0: gl.constexpr = False, WARP_SPECIALIZE: gl.constexpr = False,
                        MATH_PARTITIONS: gl.constexpr = 1, LOAD_WARP_REGS: gl.constexpr = 24,
                        MATH_REGS: gl.constexpr = 240, GATE_BF16: gl.constexpr = False):
        """ACT_QUANT (GEMM 1): the activation (activate(); gated: gate columns n and up columns N + n of W's
        W_ROWS = 2N rows per expert, two K passes per item, the gate's product parked in shared memory) quantized
        per 128 columns (quantize_groups()): fp8 rows in sorted order (TMA) and their scales [S, N/128] fp32.
        Else (GEMM 2): bf16 rows in sorted order (TMA). out: the output's TMA descriptor (one partition's rows).
        WARP_SPECIALIZE: one more warp issues the loads (_produce), and the math warpgroups form MATH_PARTITIONS
        partitions (1 or 2; 2: num_warps is one warpgroup's, 4)."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        PASSES: gl.constexpr = 2 if (ACT_QUANT and GATED) else 1
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_ring = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES] + b_desc.block_type.shape, b_desc.layout)
        c_smem = gl.allocate_shared_memory(out.dtype, [BLOCK_M, BLOCK_N], out.layout)  # (out's box: a partition's rows)
        gate_smem = a_ring  # a placeholder where unused: a partition's arguments cannot be None
        if PASSES == 2:
            gate_dtype: gl.constexpr = gl.bfloat16 if GATE_BF16 else gl.float32
            gate_smem = gl.allocate_shared_memory(gate_dtype, [BLOCK_M, BLOCK_N],
                                                  gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gate_dtype))
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = ready  # (unused without the load warp)
        if WARP_SPECIALIZE:
            empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            if WARP_SPECIALIZE:
                mbarrier.init(empty.index(i), count=MATH_PARTITIONS)
        ring = (a_desc, b_desc, a_ring, b_ring, ready, empty)
        epilogue = (out_scale_ptr if ACT_QUANT else sa_ptr, stride_out_scale, fp8_max, min_amax, alpha, limit)
        pointers = (sa_ptr, sw_ptr, block_expert_ptr, used_blocks_ptr)
        sizes = (N, W_ROWS, K, stride_sa, stride_sw)
        # (constexprs inline: in a tuple assigned to a name first they turn into tensors)
        if WARP_SPECIALIZE and MATH_PARTITIONS == 2:
            gl.warp_specialize([
                (_consume, (ring, out, c_smem, gate_smem, pointers, sizes, epilogue, GROUP_STEPS, GROUP_M, ACT_QUANT,
                            ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT, UE8M0, True, 0, num_warps)),
                (_produce, (ring, block_expert_ptr, used_blocks_ptr, N, W_ROWS, K, PASSES, GROUP_M)),
                (_consume, (ring, out, c_smem, gate_smem, pointers, sizes, epilogue, GROUP_STEPS, GROUP_M, ACT_QUANT,
                            ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT, UE8M0, True, 1, num_warps)),
            ], [1, num_warps], [LOAD_WARP_REGS, MATH_REGS])
        elif WARP_SPECIALIZE:
            gl.warp_specialize([
                (_consume, (ring, out, c_smem, gate_smem, pointers, sizes, epilogue, GROUP_STEPS, GROUP_M, ACT_QUANT,
                            ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT, UE8M0, True, 0, num_warps)),
                (_produce, (ring, block_expert_ptr, used_blocks_ptr, N, W_ROWS, K, PASSES, GROUP_M)),
            ], [1], [LOAD_WARP_REGS])
        else:
            _consume(ring, out, c_smem, gate_smem, pointers, sizes, epilogue, GROUP_STEPS, GROUP_M, ACT_QUANT,
                     ACTIVATION, GATED, SWIGLU_ALPHA, HAS_LIMIT, UE8M0, False, 0, num_warps)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))
            if WARP_SPECIALIZE:
                mbarrier.invalidate(empty.index(i))


def _check(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, aligned) -> None:
    S = a.shape[0]
    if aligned.block_m != BLOCK_M or S != aligned.sorted_pair_ids.numel():
        raise ValueError(f"a has {S} rows in blocks of {aligned.block_m}; the Gluon GEMM needs the aligned pairs' "
                         f"{aligned.sorted_pair_ids.numel()} sorted rows in blocks of {BLOCK_M}")
    if not (w.is_contiguous() and w_scale.is_contiguous() and a.is_contiguous() and a_scale.stride(1) == 1):
        raise ValueError("w, w_scale and a must be contiguous and a_scale's rows unit-strided (TMA, flat scale rows)")


def _launch(a, a_scale, w, w_scale, out, aligned, N: int, pipeline: Pipeline, **epilogue) -> None:
    """One persistent wave over the used blocks' (row block, BLOCK_N columns of N) work items."""
    if not _WARP_SPECIALIZE_API:
        pipeline = dataclasses.replace(pipeline, warp_specialize=False)
    (_, K), (num_experts, w_rows, _) = a.shape, w.shape
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, GROUP],
                                          gl.NVMMASharedLayout.get_default_for([BLOCK_M, GROUP], gl.float8e4nv))
    b_desc = TensorDescriptor.from_tensor(w.view(num_experts * w_rows, K), [GROUP, GROUP],
                                          gl.NVMMASharedLayout.get_default_for([GROUP, GROUP], gl.float8e4nv))
    parts = pipeline.math_partitions if pipeline.warp_specialize else 1
    rows = BLOCK_M // parts  # one math partition's rows of a tile
    target = TensorDescriptor.from_tensor(out, [rows, GROUP], gl.NVMMASharedLayout.get_default_for(
        [rows, GROUP], gl.float8e4nv if out.dtype == torch.float8_e4m3fn else gl.bfloat16))
    grid = (max(1, min(_sm_count(a.device.index), aligned.block_expert.numel() * (N // GROUP))), )
    _grouped_kernel[grid](a_desc, b_desc, target, a_scale, w_scale, aligned.block_expert, aligned.used_blocks, N,
                          w_rows, K, a_scale.stride(0), w_scale.shape[-1], NUM_STAGES=pipeline.stages,
                          GROUP_STEPS=GROUP_STEPS, GROUP_M=pipeline.group_m, num_warps=NUM_WARPS // parts,
                          WARP_SPECIALIZE=pipeline.warp_specialize, MATH_PARTITIONS=parts,
                          LOAD_WARP_REGS=LOAD_WARP_REGS, MATH_REGS=MATH_REGS, GATE_BF16=pipeline.gate_bf16,
                          **(dict(maxnreg=MAX_REGS) if pipeline.warp_specialize else {}), **epilogue)


def gemm_act_quant(a: torch.Tensor, a_scale: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                   out: torch.Tensor, out_scale: torch.Tensor, aligned, config, quant) -> tuple:
    """GEMM 1 with its epilogue: (out, out_scale) = quantize(act((a * a_scale) @ (w13[e] * w13_scale[e])^T)) per
    row block, e = aligned.block_expert of the block. a [S, H] float8_e4m3fn in sorted order (S =
    aligned.sorted_pair_ids.numel(), BLOCK_M-row blocks), a_scale [S, H/128] fp32; w13 [L, 2I, H] ([gate; up];
    [L, I, H] not gated) float8_e4m3fn, w13_scale [L, 2I/128, H/128] fp32, contiguous; out [S, I] float8_e4m3fn
    and out_scale [S, I/128] fp32 in sorted order: config's activation (triton_kernels.activate) from the fp32
    products and quant's activation rule (quant_kernels.quantize_groups), as the triton runner's fused GEMM 1.
    Rows of blocks past aligned.used_blocks are not written. Shapes as unsupported() admits them."""
    _check(a, a_scale, w13, w13_scale, aligned)
    _launch(a, a_scale, w13, w13_scale, out, aligned, config.intermediate_size, GEMM1_PIPELINE, ACT_QUANT=True,
            out_scale_ptr=out_scale, stride_out_scale=out_scale.stride(0), fp8_max=quant.spec.max_value,
            min_amax=MIN_AMAX, UE8M0=quant.ue8m0,
            **activation_args(config.activation, config.is_gated, config.gemm1_alpha, config.gemm1_clamp_limit))
    return out, out_scale


def gemm_sorted(a: torch.Tensor, a_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, out: torch.Tensor,
                aligned) -> torch.Tensor:
    """GEMM 2: out[m] = (a[m] * a_scale[m]) @ (w2[e] * w2_scale[e])^T, e the expert of row m's block. a [S, I]
    float8_e4m3fn and a_scale [S, I/128] fp32 in sorted order (as gemm_act_quant writes them); w2 [L, H, I]
    float8_e4m3fn, w2_scale [L, H/128, I/128] fp32, contiguous; out [S, H] bf16, contiguous, in sorted order (a
    padding row holds its padding row's product; rows of blocks past aligned.used_blocks are not written)."""
    _check(a, a_scale, w2, w2_scale, aligned)
    _launch(a, a_scale, w2, w2_scale, out, aligned, w2.shape[1], GEMM2_PIPELINE)
    return out
