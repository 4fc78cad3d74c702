"""The NVLink transport: a rank stores its rows straight into its peers' memory and signals them;
no NCCL call, no host sync, no SM for the bytes (or a fixed number of them).

Every rank of a group maps one symmetric region of every other rank (PyTorch symmetric memory on
CUDA), and a few flag words. Where each rank's rows go is known on the host (`shares`: fixed chunks
for static plans, the count table the host plan read for exact ones). A call of `all_to_all` on the
caller's stream:
- free, then copy: by default (num_sms=0) one program tells every peer that this rank is done with
  the rows of its previous call (its "free" flag: everything earlier on this stream has run) and
  waits until every peer has said the same to it; then one cudaMemcpyAsync per peer stores this
  rank's share into that peer's region, at the row offset this rank owns there: the GPU's copy
  engines move the bytes over NVLink (measured faster than NCCL and than an SM copy loop on 2x
  H200, docs/transports.md), and a large own share is copied on a side stream meanwhile. With
  num_sms > 0 instead one kernel of that many programs does both (program 0 frees, every program
  copies each peer's share once that peer is free, own rows last);
- signal: one program raises this rank's "ready" flag in every peer (the call's epoch, release
  semantics), waits until every peer's ready flag here reaches it (acquire; bounded by
  EP_RUNTIME_TIMEOUT_S, after which it records the silent rank in host memory and gives up), and
  advances the epoch.
The result is a view of this rank's region, valid until its next call on the transport (callers
that hand rows to users copy them; the exchange's own kernels read them at once). The epoch lives
on the device, so CUDA-graph replays keep counting (a replay repeats the captured copies, so only
static plans are captured, as everywhere).

The region is sized by the largest call so far, and grows (a collective re-allocation, the same
decision on every rank because it is made from sizes every rank knows) outside graph capture; a
call that does not fit while a graph is captured takes the collective transport instead.

On CPU ranks of one host the same kernels run under TRITON_INTERPRET=1 over shared-memory files
standing in for symmetric memory (the copies are plain CPU copies): tests check every offset,
signal and copy without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import uuid
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from ep_runtime import envs
from ep_runtime.distributed import PeerFailure, abort_group, rank_name, ranks_name, record_failure, timeout_s
from ep_runtime.quant import QuantConfig
from ep_runtime.triton_launch import cdiv, fast_launch, next_power_of_2, triton_interpreted
from ep_runtime.validation import capturing

from . import exchange_kernels, fp8_payload
from .transport import host_values

try:
    import triton
    import triton.language as tl

    from .exchange_kernels import _count_row, _gather_one, _owned_ids, _pack_one
except ImportError:  # triton is optional: the collective transport runs instead
    triton = None

_GRANULE = 1 << 20  # regions grow in whole MiB, to at least twice the old size
_WORD = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_BLOCK, _WARPS = 4096, 8  # words per program per step (32 KiB of int64), warps per program
_SIDE_BYTES = 4 << 20  # a rank's own rows from this size on are copied on a side stream, beside the peers'

if triton is not None:

    @triton.jit
    def _words_at(address, first_row, row_words, ty: tl.constexpr, VEC: tl.constexpr):
        """Pointer to word 0 of row `first_row` of the rows at `address` (an int, 16-byte aligned)."""
        base = tl.multiple_of(address, 16).to(tl.pointer_type(ty))
        return base + tl.multiple_of(tl.cast(first_row, tl.int64) * row_words, VEC)

    @triton.jit
    def _copy_words(src_ptr, dst_ptr, n, pid, nprog, VEC: tl.constexpr, BLOCK: tl.constexpr):
        """Copy n words, BLOCK per program per step (VEC: words known aligned, for wide accesses)."""
        cols = tl.arange(0, BLOCK)
        for start in range(pid * BLOCK, n, nprog * BLOCK):
            offs = tl.multiple_of(start, VEC) + cols
            mask = offs < n
            tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)

    @triton.jit
    def _clock_ns(INTERPRET: tl.constexpr):
        if INTERPRET:
            return 0
        else:
            return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                             pack=1)

    @triton.jit
    def _acquire(INTERPRET: tl.constexpr):
        """A system-scope acquire fence: what a peer stored before raising the flag just seen is
        visible to every read after this (the interpreter runs programs in order: nothing to do)."""
        if not INTERPRET:
            tl.inline_asm_elementwise("fence.acq_rel.sys; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                      pack=1)

    @triton.jit
    def _wait_for(flag, epoch, start, timeout_ns, max_polls, error, host_error, peer, INTERPRET: tl.constexpr):
        """Spin until the flag word reaches `epoch`, or record `peer` as silent and go on. Plain
        volatile loads poll (no atomics: a program's threads would all hit one address); a wait that
        is followed by reads of the peer's rows needs _acquire() after it. The error word lives on the
        device (every program reads it); a wait that gives up also writes it to host memory, where
        the host reads it without a sync."""
        polls = 0
        seen = tl.load(flag, volatile=True)
        if tl.load(error, volatile=True) != 0:  # a wait of this rank gave up already: none waits again
            seen = epoch
        while seen < epoch:
            polls += 1
            if (_clock_ns(INTERPRET) - start > timeout_ns) | (polls > max_polls):
                tl.store(error, peer + 1)
                tl.store(host_error, peer + 1)
                seen = epoch  # give up: the host reads the error and raises
            else:
                seen = tl.load(flag, volatile=True)

    @triton.jit
    def _free_flags(flag_ptrs, done, me, R):
        """Tell every peer that this rank is done with the rows of its previous call (everything earlier
        on this stream has run): release its "free" word there."""
        for peer in range(0, R):
            free = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int64)) + R + me
            tl.atomic_xchg(free, done, sem="release", scope="sys")

    @fast_launch
    @triton.jit
    def _open_kernel(flag_ptrs, epoch_ptr, error, host_error_ptr, me, R, timeout_ns, max_polls,
                     INTERPRET: tl.constexpr):
        """One program, before the copy engine stores into the peers: free every peer, then wait until
        every peer has freed this rank (its region there may be overwritten)."""
        done = tl.load(epoch_ptr)
        _free_flags(flag_ptrs, done, me, R)
        mine = tl.load(flag_ptrs + me).to(tl.pointer_type(tl.int64))
        host_error = host_error_ptr.to(tl.pointer_type(tl.int32))
        start = _clock_ns(INTERPRET)
        for peer in range(0, R):
            if peer != me:
                _wait_for(mine + R + peer, done, start, timeout_ns, max_polls, error, host_error, peer, INTERPRET)

    @fast_launch
    @triton.jit
    def _put_kernel(src_ptr, region_ptrs, shares_ptr, flag_ptrs, epoch_ptr, error, host_error_ptr, me, R, row_words,
                    timeout_ns, max_polls, VEC: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        """The SM copy: every outgoing row into its destination's region. One peer's rows are
        contiguous on both sides, so each share (rows, first source row, first destination row: see
        `shares`) is one flat copy. Flags: [ready (R words); free (R words)]."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        ty = src_ptr.dtype.element_ty
        done = tl.load(epoch_ptr)  # calls this rank has finished, the same count on every rank
        if pid == 0:
            _free_flags(flag_ptrs, done, me, R)
        mine = tl.load(flag_ptrs + me).to(tl.pointer_type(tl.int64))
        host_error = host_error_ptr.to(tl.pointer_type(tl.int32))
        start = _clock_ns(INTERPRET)
        for step in range(1, R + 1):  # peers first, this rank last
            peer = (me + step) % R
            count = tl.load(shares_ptr + 3 * peer)
            src = tl.load(shares_ptr + 3 * peer + 1)
            dst = tl.load(shares_ptr + 3 * peer + 2)
            if peer != me:  # no fence after: the stores below depend on the flag seen, nothing is read
                _wait_for(mine + R + peer, done, start, timeout_ns, max_polls, error, host_error, peer, INTERPRET)
            _copy_words(src_ptr + tl.multiple_of(src * row_words, VEC),
                        _words_at(tl.load(region_ptrs + peer), dst, row_words, ty, VEC),
                        count * row_words, pid, nprog, VEC, BLOCK)

    @fast_launch
    @triton.jit
    def _signal_kernel(flag_ptrs, epoch_ptr, error, host_error_ptr, me, R, timeout_ns, max_polls,
                       INTERPRET: tl.constexpr):
        """One program: raise this call's ready flag in every peer (the put kernel before this one has
        finished: its stores precede the release), wait for every peer's, advance the epoch."""
        epoch = tl.load(epoch_ptr) + 1
        for peer in range(0, R):
            ready = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int64)) + me
            tl.atomic_xchg(ready, epoch, sem="release", scope="sys")
        mine = tl.load(flag_ptrs + me).to(tl.pointer_type(tl.int64))
        host_error = host_error_ptr.to(tl.pointer_type(tl.int32))
        start = _clock_ns(INTERPRET)
        for peer in range(0, R):
            _wait_for(mine + peer, epoch, start, timeout_ns, max_polls, error, host_error, peer, INTERPRET)
        _acquire(INTERPRET)  # the rows the peers stored before their flags are visible after this kernel
        tl.store(epoch_ptr, epoch)


    @fast_launch
    @triton.jit
    def _put_tokens_kernel(x_ptr, ids_ptr, w_ptr, in_rank_ptr, rank_of_ptr, local_of_ptr, count_row_ptr, region_ptrs,
                           index_ptr, send_token_ptr, T, H, K, E, R, me, M, row_bytes, scale_at, meta_at, header_at,
                           ROW, flags_at, fp8_max, min_amax, QUANT: tl.constexpr, UE8M0: tl.constexpr,
                           SCALE_BYTE: tl.constexpr, ROUND_FIRST: tl.constexpr, GROUP: tl.constexpr,
                           GROUPS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                           FLAGS: tl.constexpr, DISTINCT: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr):
        """Program (t, h, r), t < M: block h of token t's row, packed (exchange_kernels._pack_one) straight
        into rank r's region at row me*M + t (the open kernel before it waited until r freed it: no
        program here waits) if one of the token's experts lives on r; else (or t >= T) a pad row's
        metadata there only (ids -1: stale bytes never look like data). Block 0 also writes the plan
        entries (is_token_in_rank[t, r], combine_index[t, r], send_token[r*M + t]). Program (M, 0, r):
        this rank's count row (exchange_kernels._count_row) into r's table at header_at; (M + 1, 0, me):
        the same row into count_row, for the handle. No layout kernel runs before this one."""
        t = tl.program_id(0)
        hb = tl.program_id(1)
        r = tl.program_id(2)
        if t < M:
            k = tl.arange(0, BLOCK_K)
            _, _, owner = _owned_ids(ids_ptr, t.to(tl.int64) * K + k, k < tl.where(t < T, K, 0), rank_of_ptr, E)
            going = tl.max((owner == r).to(tl.int32), axis=0) != 0
            tok = tl.where(going, t, T)
            region = tl.load(region_ptrs + r)
            row = tl.multiple_of(region + (me * M + t).to(tl.int64) * row_bytes, ALIGN)
            if QUANT:
                values = row.to(tl.pointer_type(tl.float8e4nv))
            else:
                values = row.to(tl.pointer_type(x_ptr.dtype.element_ty))
            if SCALE_BYTE:
                scales = (row + scale_at).to(tl.pointer_type(tl.uint8))
            else:
                scales = (row + scale_at).to(tl.pointer_type(tl.float32))
            _pack_one(x_ptr, ids_ptr, w_ptr, tok, r, hb, rank_of_ptr, local_of_ptr, values, scales,
                      (row + meta_at).to(tl.pointer_type(tl.int32)), T, H, K, E, tl.where(going, H, 0), fp8_max,
                      min_amax, True, True, QUANT, UE8M0, SCALE_BYTE, ROUND_FIRST, GROUP, GROUPS, BLOCK_H, BLOCK_K)
            if hb == 0:
                if t < T:
                    tl.store(in_rank_ptr + t.to(tl.int64) * R + r, going.to(tl.int8))
                    tl.store(index_ptr + t.to(tl.int64) * R + r, tl.where(going, r * M + t, R * M).to(tl.int64))
                tl.store(send_token_ptr + r * M + t, tok.to(tl.int64))
        elif hb == 0:
            if t == M:
                out = (tl.load(region_ptrs + r) + header_at).to(tl.pointer_type(tl.int32)) + me * ROW
                _count_row(ids_ptr, w_ptr, rank_of_ptr, T, K, E, R, out, flags_at, FLAGS, DISTINCT, BLOCK_T, BLOCK_K,
                           BLOCK_R, BLOCK_E, in_rank_ptr, False)
            elif r == me:
                _count_row(ids_ptr, w_ptr, rank_of_ptr, T, K, E, R, count_row_ptr, flags_at, FLAGS, DISTINCT, BLOCK_T,
                           BLOCK_K, BLOCK_R, BLOCK_E, in_rank_ptr, False)

    @fast_launch
    @triton.jit
    def _put_sums_kernel(src_ptr, index_ptr, weight_ptr, region_ptrs, K, H, none, me, chunk, row_bytes,
                         BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
        """Program (n, h): block h of received row n's partial, sum_k weight[n, k] * src[index[n, k]] in
        fp32 (exchange_kernels._gather_one), stored in src's dtype straight into row me*chunk + n % chunk
        of rank n // chunk (the row's sender; the open kernel before it waited until that rank freed its
        region). A row naming no slot here (a pad, or a token that came for nothing here) is not stored:
        its sender never reads it."""
        n = tl.program_id(0)
        hb = tl.program_id(1)
        owner = n // chunk
        k = tl.arange(0, BLOCK_K)
        slots = tl.load(index_ptr + n.to(tl.int64) * K + k, mask=k < K, other=none)
        if tl.min(slots) < none:
            cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            acc = _gather_one(src_ptr, index_ptr, weight_ptr, n, cols, K, H, none, True, BLOCK_H)
            ty = src_ptr.dtype.element_ty
            at = tl.load(region_ptrs + owner) + (me * chunk + n % chunk).to(tl.int64) * row_bytes
            tl.store(tl.multiple_of(at, ALIGN).to(tl.pointer_type(ty)) + cols, acc.to(ty), mask=cols < H)


def _word(row_bytes: int) -> torch.dtype:
    """The widest integer type that divides a row (wide loads and stores move the bytes)."""
    return next(dtype for size, dtype in _WORD.items() if row_bytes % size == 0)


def _token_row(x: torch.Tensor, top_k: int, quant: Optional[QuantConfig], rows: int) -> tuple[int, int, int, int]:
    """(row bytes, byte offsets of the scales and the metadata in a row, of the table after `rows`
    rows) of the token put's layout: exchange_kernels' payload rows (values, fp8 scales, [weights;
    ids]), then the count table, 16-byte aligned."""
    width, dtype = exchange_kernels.row_format(x, quant)
    row_bytes = exchange_kernels.payload_bytes(width, dtype, top_k)
    scale_at = fp8_payload.row_layout(x.shape[1], quant)[1] if quant is not None else 0
    meta_at = row_bytes - 8 * top_k
    return row_bytes, scale_at, meta_at, -(-rows * row_bytes // 16) * 16


def put_bytes(x: torch.Tensor, top_k: int, quant: Optional[QuantConfig], chunk: int, world_size: int,
              row_ints: int) -> int:
    """Region bytes a token put needs (received rows, then the table of count rows of row_ints ints)."""
    return _token_row(x, top_k, quant, world_size * chunk)[3] + world_size * row_ints * 4


class _Region:
    """This rank's symmetric allocation, every rank's address of it (index = group rank), and every
    rank's as a byte tensor mapped here (what the copy engine stores into)."""

    def __init__(self, local: torch.Tensor, addresses: list, views: list, keep: object = None):
        self.local, self.addresses, self.views, self.keep = local, addresses, views, keep

    @property
    def nbytes(self) -> int:
        return self.local.numel()


def _cuda_region(nbytes: int, group, device: torch.device) -> _Region:
    from torch.distributed import _symmetric_memory as symm_mem
    local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(local, group)
    me = dist.get_rank(group)
    views = [local if r == me else handle.get_buffer(r, (nbytes,), torch.uint8)
             for r in range(dist.get_world_size(group))]
    return _Region(local, list(handle.buffer_ptrs), views, handle)


def _shared_file_region(nbytes: int, group, device: torch.device) -> _Region:
    """CPU stand-in for tests: one file per rank in /dev/shm, mapped by every rank of the group."""
    name = [uuid.uuid4().hex if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(name, group_src=0, group=group)
    R, me = dist.get_world_size(group), dist.get_rank(group)
    paths = [f"/dev/shm/ep_runtime_{name[0]}_{r}" for r in range(R)]
    with open(paths[me], "wb") as f:
        f.truncate(nbytes)
    dist.barrier(group=group)
    maps = [torch.from_file(p, shared=True, size=nbytes, dtype=torch.uint8) for p in paths]
    dist.barrier(group=group)
    os.unlink(paths[me])  # the mappings keep the memory; nothing is left behind at exit
    return _Region(maps[me], [m.data_ptr() for m in maps], maps)


def _kept_tensors():
    """Where a transport makes the tensors it keeps for every later call (its flags, epoch, regions, static shares):
    outside inference mode. Made by a first call under torch.inference_mode they were inference tensors, and the
    next call outside it (no_grad serving, a training step) failed storing rows into the region ("Inplace update to
    inference tensor outside InferenceMode")."""
    return torch.inference_mode(False)


def _map_region(nbytes: int, group, device: torch.device) -> _Region:
    return (_cuda_region if device.type == "cuda" else _shared_file_region)(nbytes, group, device)


class PeerTransport:
    """Rows between the ranks of `group` by stores into each other's memory. One per (group,
    device), shared by every layer on the group (see `peer_transport`)."""

    def __init__(self, group, device: torch.device):
        group = group if group is not None else dist.group.WORLD  # the rendezvous needs the object
        # weakly: _TRANSPORTS keeps this transport exactly as long as its group lives
        self._group, self.device = weakref.ref(group), device
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        R = self.world_size
        # flags [ready; free] x R: the last call rank s finished storing here / is done reading there
        self._flags = _map_region(16 * R, group, device)
        self._flags.local.zero_()
        self._flag_ptrs = torch.tensor(self._flags.addresses, dtype=torch.int64, device=device)
        self._region: Optional[_Region] = None
        self._region_ptrs: Optional[torch.Tensor] = None  # the region's addresses on the device (copy kernel)
        self._retired: list = []  # regions a CUDA graph captured earlier may still use (kept, see fits)
        self._epoch = torch.zeros(1, dtype=torch.int64, device=device)  # calls finished
        self._error = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")  # read by the host
        self._device_error = torch.zeros(1, dtype=torch.int32, device=device)  # read by the kernels
        self._failed: Optional[str] = None
        # the side stream of large own-row copies, made here: never first inside a graph capture
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._shares: dict = {}  # static shares tuple -> its device tensor (the copy kernel's), kept for good
        self._timeout_s = timeout_s()  # init_distributed's timeout_s, else EP_RUNTIME_TIMEOUT_S
        interpret = device.type != "cuda"  # CPU tensors: the Triton interpreter (polls bound its waits)
        self._waits = (self._error.data_ptr(), int(self._timeout_s * 1e9),
                       int(self._timeout_s * 2000) if interpret else 2 ** 62)
        self._interpret = interpret
        dist.barrier(group=group)  # every flag word is zero before any rank signals

    @property
    def group(self):
        return self._group()

    @property
    def nbytes(self) -> int:
        """Memory this rank holds for the transport (the region, the ones it outgrew, the flags)."""
        regions = [self._region] + [old for old, _ in self._retired] if self._region is not None else []
        return sum(region.nbytes for region in regions) + self._flags.nbytes

    @property
    def calls(self) -> int:
        """Exchanges made so far (the device epoch; reading it waits for them)."""
        return int(self._epoch[0])

    def fits(self, nbytes: int) -> bool:
        """Make room for a call moving at most `nbytes` into any rank (the same answer on every rank);
        False while capturing a graph when the region is too small (the caller takes the collective)."""
        have = self._region.nbytes if self._region is not None else 0
        if self._region is not None and nbytes <= have:
            return True
        if capturing():
            return False
        want = -(-max(nbytes, 2 * have, 1) // _GRANULE) * _GRANULE
        if self._region is not None:  # graphs captured before hold its addresses: never freed while we live
            self._retired.append((self._region, self._region_ptrs))
        with _kept_tensors():
            self._region = _map_region(want, self.group, self.device)
            self._region_ptrs = torch.tensor(self._region.addresses, dtype=torch.int64).to(self.device)
        return True

    def check(self, name: str = "exchange", operation: str = "call") -> None:
        """Raise PeerFailure when a wait gave up on a peer (read from host memory: no sync), naming the
        caller (name, operation) as every PeerFailure does. The first time, the group is recorded as
        failed and its NCCL communicator aborted (distributed.abort_group), as a timed-out collective
        would: later calls through any dispatcher of the group raise at once."""
        if self._failed is None and int(self._error[0]):
            peer = int(self._error[0]) - 1
            silent = rank_name(self.group, peer)
            self._failed = (f"{name} {operation} on {rank_name(self.group, self.rank, self.world_size)} waited in vain "
                            f"for {silent}: a wait on the group's NVLink transport (this call's or an earlier one's, of "
                            f"any layer on the group) gave up: {silent} did not signal within the timeout "
                            f"({self._timeout_s:g} s; set it with EP_RUNTIME_TIMEOUT_S or init_distributed(timeout_s=...)) "
                            f"(stalled, ended, or took a different code path); outputs since are not valid")
            if dist.get_backend(self.group) == "nccl":
                self._failed += ". The group's NCCL communicator has been aborted, so no later call waits on it"
                if not abort_group(self.group, self._failed):
                    self._failed += (" (or so it was asked: the abort had not finished in time, or it failed; "
                                     "ep-runtime queues nothing more on this group either way)")
                    record_failure(self.group, self._failed)
            else:
                record_failure(self.group, self._failed)
        if self._failed is not None:
            raise PeerFailure(self._failed)

    def all_to_all(self, x: torch.Tensor, rows_out: int, chunk: Optional[int] = None, sent: Optional[list] = None,
                   to_owner: bool = False, gather: bool = False, num_sms: int = 0) -> torch.Tensor:
        """x [S, ...] -> [rows_out, ...], rows grouped by source rank in rank order: a view of this
        rank's region, valid until its next call here. Where the rows go (see `shares`): static plans
        `chunk` rows to every peer (x holds R chunks, peer-major; with `gather` all of x to every
        peer); exact plans from the count table read on the host, `sent[s][d]` rows from rank s to d,
        `to_owner` (combine) sending received rows back to their senders. num_sms: 0, the copy engine
        stores the rows (no SM); else that many programs of the copy kernel. Call fits() first."""
        self.check()
        x = x.contiguous()
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        parts = shares(self.rank, self.world_size, chunk, gather, sent, to_owner)
        if num_sms == 0:
            self._engine_copy(x.view(torch.uint8).reshape(-1), row_bytes, parts)
        else:
            words_in = x.view(torch.uint8).view(_word(row_bytes))
            vec = max(1, 16 // words_in.element_size()) if row_bytes % 16 == 0 else 1  # 16-byte accesses
            _put_kernel[(num_sms,)](
                words_in, self._region_ptrs, self._shares_tensor(parts, sent is None), self._flag_ptrs, self._epoch,
                self._device_error, self._waits[0], self.rank, self.world_size, row_bytes // words_in.element_size(),
                *self._waits[1:], VEC=vec, BLOCK=_BLOCK, INTERPRET=self._interpret, num_warps=_WARPS)
        received = self._finish(rows_out * row_bytes)
        return received.view(x.dtype).view((rows_out,) + tuple(x.shape[1:]))

    def _open(self) -> None:
        """One program frees every peer and waits until every peer has freed this rank: the stores that
        follow (copy engine or kernel) never wait, so no grid of programs spins on a flag (it could hold
        the SMs a peer's other work needs to reach its own free)."""
        _open_kernel[(1,)](self._flag_ptrs, self._epoch, self._device_error, self._waits[0], self.rank,
                           self.world_size, *self._waits[1:], INTERPRET=self._interpret, num_warps=1)

    def _finish(self, nbytes: int) -> torch.Tensor:
        """Signal every peer and wait for theirs (one program); the first nbytes of this rank's region."""
        _signal_kernel[(1,)](self._flag_ptrs, self._epoch, self._device_error, self._waits[0], self.rank,
                             self.world_size, *self._waits[1:], INTERPRET=self._interpret, num_warps=1)
        return self._region.local[:nbytes]

    def put_tokens(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, rank_of: torch.Tensor,
                   local_of: torch.Tensor, chunk: int, quant: Optional[QuantConfig], layout: exchange_kernels.RowLayout,
                   in_rank: torch.Tensor, count_row: torch.Tensor, combine_index: torch.Tensor,
                   send_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token put (deepep_ll's dispatch, T <= chunk): after the open kernel, one kernel packs
        token t's row (its hidden state, or fp8 wire row with quant, and [weights; local ids]) straight
        into row me*chunk + t of every rank one of its experts lives on, with pad metadata everywhere
        else, and makes this rank's count row (exchange_kernels.layout_row's, placed by `layout`: a
        RowLayout of R ranks and E experts without nodes or wants) straight into every rank's table;
        then the signal. No layout kernel, no count-table collective, no payload in this rank's memory.
        Fills in_rank [T, R] bool (is_token_in_rank), count_row [layout.length] int32 (this rank's
        row), combine_index [T, R] (r*chunk + t, R*chunk = not sent) and send_token [R*chunk] (T =
        pad): the layout and static plan of this call. Returns (received payload [R*chunk, B] uint8:
        row s*chunk + t is source s's token t, the table [R, layout.length] int32 of every rank's
        count row), views of this rank's region valid until its next call here. Call
        fits(put_bytes(...)) first."""
        self.check()
        R, me, (T, H), (_, K), E = self.world_size, self.rank, x.shape, topk_ids.shape, rank_of.numel()
        row_bytes, scale_at, meta_at, header_at = _token_row(x, K, quant, R * chunk)
        ROW = layout.length
        want = exchange_kernels.row_layout(R, E, layout.num_flags, wants=False)  # the rows the kernel writes
        if layout.num_flags not in (0, 2, 3) or layout != want or count_row.numel() != ROW:
            raise ValueError(f"layout is {layout} and count_row has {count_row.numel()} entries; need num_flags in "
                             f"(0, 2, 3), {want} and layout.length = {ROW} entries")
        fp8_max, min_amax, blocks = exchange_kernels.pack_params(H, K, quant)
        self._open()
        _put_tokens_kernel[(chunk + 2, cdiv(H, blocks["BLOCK_H"]), R)](
            x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), in_rank, rank_of, local_of, count_row,
            self._region_ptrs, combine_index, send_token, T, H, K, E, R, me, chunk, row_bytes, scale_at,
            meta_at, header_at, ROW, layout.flags_at, fp8_max, min_amax, FLAGS=layout.num_flags > 0,
            DISTINCT=layout.num_flags > 2,
            # (64 tokens: the count row's histogram takes >= 128 ids, at least one per thread)
            BLOCK_T=64, BLOCK_R=next_power_of_2(max(R, 2)), BLOCK_E=next_power_of_2(E + 1), ALIGN=math.gcd(row_bytes, 16), **blocks)
        region = self._finish(header_at + R * ROW * 4)
        return region[:R * chunk * row_bytes].view(R * chunk, row_bytes), region[header_at:].view(torch.int32).view(R, ROW)

    def put_sums(self, src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
        """A static plan's combine in one kernel: each received row n's partial (exchange_kernels.ll_gather's
        sum over index [N, K] into src [S, H], times weight) goes straight home, to row me*chunk + n %
        chunk of rank n // chunk (N = R * chunk > 0); then the signal. Returns this rank's [R * chunk, H]
        rows (row d*chunk + j: its token of send row j's partial from rank d; rows nobody sent are
        stale), a view of its region valid until its next call here. Call fits(R * chunk * H *
        itemsize) first."""
        self.check()
        (N, K), H = index.shape, src.shape[1]
        BLOCK_H = exchange_kernels.block_h(H)
        row_bytes = H * src.element_size()
        self._open()
        _put_sums_kernel[(N, cdiv(H, BLOCK_H))](
            src.contiguous(), index.contiguous(), weight.float().contiguous(), self._region_ptrs, K, H, src.shape[0],
            self.rank, chunk, row_bytes, BLOCK_H=BLOCK_H, BLOCK_K=next_power_of_2(max(K, 2)),
            ALIGN=math.gcd(row_bytes, 16))
        return self._finish(N * H * src.element_size()).view(src.dtype).view(N, H)

    def _engine_copy(self, data: torch.Tensor, row_bytes: int, parts: list) -> None:
        """Free the peers and wait until they free this rank (one program), then one copy per peer
        into its region (cudaMemcpyAsync: the copy engine, over NVLink; no SM), peers first. This
        rank's own share goes on a side stream meanwhile when it is large (it overlaps the peers')."""
        self._open()
        R, me, views = self.world_size, self.rank, self._region.views

        def copy(peer):
            count, src, dst = parts[peer]
            if count:
                views[peer][dst * row_bytes:(dst + count) * row_bytes].copy_(
                    data[src * row_bytes:(src + count) * row_bytes])

        side = self._side if parts[me][0] * row_bytes >= _SIDE_BYTES else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                copy(me)
        for step in range(1, R):
            copy((me + step) % R)
        if side is None:
            copy(me)
        else:
            torch.cuda.current_stream(self.device).wait_stream(side)

    def _shares_tensor(self, parts: list, static: bool) -> torch.Tensor:
        """The shares on the device for the copy kernel. Static plans repeat theirs: kept for good, so a
        CUDA graph replays the tensor made before capture (a first one while capturing is an error).
        Exact plans (never captured): a fresh one per call, copied from pinned memory without a sync."""
        key = tuple(parts)
        if static and key in self._shares:
            return self._shares[key]
        if capturing():
            raise RuntimeError(f"the NVLink transport's copy kernel (num_sms > 0) met the plan {key} first while a "
                               f"CUDA graph was captured; run the same call eagerly once before capturing")
        with _kept_tensors() if static else contextlib.nullcontext():
            made = host_values(parts, torch.int64, self.device)
        if static:
            self._shares[key] = made
        return made


def shares(me: int, R: int, chunk: Optional[int] = None, gather: bool = False, sent: Optional[list] = None,
           to_owner: bool = False) -> list:
    """(rows, first source row, first destination row) of what rank `me` sends each rank (index =
    rank). Static: `chunk` rows to every rank from x's rank-major chunks (gather: all of x, chunk =
    its rows), landing in chunk `me` there. Exact: a[i][j] = rows i sends j (sent, or its transpose
    for to_owner: rows go back to where their sender took them from); rank `me` sends its rows rank
    by rank, and they land after the rows of lower sending ranks."""
    if sent is None:
        return [(chunk, 0 if gather else peer * chunk, me * chunk) for peer in range(R)]
    a = [[sent[j][i] for j in range(R)] for i in range(R)] if to_owner else sent
    out, src = [], 0
    for peer in range(R):
        out.append((a[me][peer], src, sum(a[k][peer] for k in range(me))))
        src += a[me][peer]
    return out


# group object -> {device: PeerTransport}, dropped with the group (its memory too): a process that makes
# and drops groups (a serving loop, an elastic job) would otherwise keep every group's transport
_TRANSPORTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# group -> {device: (why no rank may map some peer's memory, why `auto` should not count on it)}, None: fine
_VERDICTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
TRANSPORTS = ("auto", "nccl", "nvlink")


def peer_transport(group, device: torch.device, world_size: int, mode: str, puts: bool = False
                   ) -> Optional[PeerTransport]:
    """The NVLink transport of (group, device) for an exchange whose transport setting is `mode`, or
    None for the collective one. `nvlink`: always (an error naming why where it cannot be: several
    hosts, a GPU without peer access to another, CPU ranks outside the interpreter). `nccl`: never.
    `auto`: for callers whose own kernels put the rows (`puts`: deepep_ll's token and sum puts; its
    dispatch faster than through NCCL eagerly and graph-replayed on 2x H200, a round trip 1.45x) wherever
    every rank can map every other's GPU memory and that could be checked; else the collective: moving a plan's rows with the copy engines or the copy kernel was
    not measured faster than NCCL in any case (docs/transports.md). Made on first use, shared by
    every exchange on the group after; collective then (every rank reaches its first exchange together)."""
    if world_size == 1 or mode == "nccl" or (mode == "auto" and not (puts and device.type == "cuda")):
        return None
    # None names the default group of the moment: after a destroy and a new init, a new group
    key = group if group is not None else dist.group.WORLD
    found = _TRANSPORTS.get(key, {}).get(device)
    if found is None:
        verdicts = _VERDICTS.setdefault(key, {})
        if device not in verdicts and capturing():  # the check takes collectives, which a graph cannot capture
            return _not_while_capturing(mode)
        if device not in verdicts:
            verdicts[device] = _cannot_map(group, device, world_size)
        reason, unsure = verdicts[device]
        if reason is None and (mode == "nvlink" or unsure is None):
            if capturing():  # the rendezvous is collective too
                return _not_while_capturing(mode)
            with _kept_tensors():
                found = _TRANSPORTS.setdefault(key, {})[device] = PeerTransport(group, device)
        elif mode == "auto":
            return None
        else:
            _impossible(reason)
    return found


def check_cpu_ranks(device: torch.device, world_size: int, mode: str) -> None:
    """`nvlink` asked for on CPU ranks outside the interpreter: the error peer_transport raises, for the
    exchanges that never ask it (the autograd path moves rows through the collective). No collective."""
    if mode == "nvlink" and world_size > 1 and device.type == "cpu":
        reason, _ = _cannot_map(None, device, world_size)
        if reason is not None:
            _impossible(reason)


def check_num_sms(num_sms: int, device: torch.device) -> None:
    """num_sms (programs of the NVLink transport's copy kernel) at most the SMs of the GPU an exchange runs
    on (more would only wait for each other's SMs): an error naming it, before any collective. CPU ranks
    (the interpreter's stand-in) have no SM count."""
    if num_sms and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms, name = _gpu_sms(index)
        if num_sms > sms:
            raise ValueError(f"num_sms={num_sms}; allowed: 0..{sms} (the SMs of cuda:{index}, {name}; also settable "
                             f"as {envs.PREFIX}NUM_SMS)")


@functools.lru_cache(maxsize=None)
def _gpu_sms(index: int) -> tuple[int, str]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.name


def _impossible(reason: str) -> None:
    raise RuntimeError(f"transport='nvlink' (EP_RUNTIME_TRANSPORT) is impossible here: {reason}; "
                       f"allowed here: 'auto' or 'nccl'")


def _not_while_capturing(mode: str) -> None:
    if mode == "auto":
        return None
    raise RuntimeError("transport='nvlink': the group's first exchange ran while a CUDA graph was being captured; "
                       "run one exchange eagerly first (the NVLink transport is made then)")


def describe(group, mode: str, puts: bool = False, device: Optional[torch.device] = None) -> str:
    """What an exchange with transport setting `mode` on `group` uses (puts, device: as peer_transport's),
    as far as known without a collective (an nvlink transport is made at the group's first exchange):
    for layer reprs. `auto` names its choice once made: the collective wherever peer_transport never
    considers NVLink, or where the group's first exchange found it unusable."""
    if mode == "nvlink" or (mode == "auto" and puts):
        for where, found in _of_group(group).items():
            chosen = "nvlink" if mode == "nvlink" else "auto (nvlink)"
            return f"transport={chosen} ({found.nbytes / 2 ** 20:.1f} MiB on {where}, shared by the group)"
    if mode == "auto":
        grouped = dist.is_available() and dist.is_initialized()
        key = group if group is not None else (dist.group.WORLD if grouped else None)
        considered = puts and device is not None and device.type == "cuda" and grouped and dist.get_world_size(group) > 1
        if not considered or device in _VERDICTS.get(key, {}):
            return "transport=auto (collective)"
    return f"transport={mode}"


def check_transport(group, name: str, operation: str) -> None:
    """PeerTransport.check of the group's NVLink transport, if it has one (a replayed CUDA graph's
    waits give up on the device; the host learns it here, e.g. in a dispatcher's synchronize)."""
    for found in _of_group(group).values():
        found.check(name, operation)


def _of_group(group) -> dict:
    """{device: PeerTransport} of `group` (None: the default group), empty when it has none."""
    if group is None:
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return _TRANSPORTS.get(group, {}) if group is not None else {}


def release_transports() -> None:
    """Drop every transport (their memory goes with them); before the process groups are destroyed."""
    _TRANSPORTS.clear()
    _VERDICTS.clear()


def shared_gpu(every: list, group=None) -> Optional[str]:
    """Why ranks sharing one GPU cannot take the NVLink transport (None: one GPU per rank). every: each
    rank's (host, device index, GPU uuid), in rank order of `group` (named with their global ranks where
    those differ). Symmetric memory maps one allocation per GPU; two ranks on one GPU make its rendezvous
    fail deep inside torch."""
    seen: dict = {}
    for rank, (host, _, gpu) in enumerate(every):
        first = seen.setdefault((host, gpu), rank)
        if first != rank:
            return f"{ranks_name(group, [first, rank])} share one GPU ({gpu}); the NVLink transport needs one GPU per rank"
    return None


def _cannot_map(group, device: torch.device, world_size: int) -> tuple[Optional[str], Optional[str]]:
    """(why some rank cannot map some peer's memory, why `auto` should not rely on it although `nvlink`
    may try), None where nothing stands in the way; the same on every rank."""
    import socket
    if triton is None:
        return "triton is not installed", None
    if device.type != "cuda":  # CPU ranks: only the test stand-in, under the interpreter
        return (None if triton_interpreted() else "the ranks are CPU processes (no GPU memory to map)"), None
    index = device.index if device.index is not None else torch.cuda.current_device()
    mine = (socket.gethostname(), index, str(torch.cuda.get_device_properties(index).uuid))
    every = [None] * world_size
    with torch.cuda.device(device):
        dist.all_gather_object(every, mine, group=group)
    hosts = sorted({host for host, _, _ in every})
    if len(hosts) > 1:
        return f"the group spans {len(hosts)} hosts ({', '.join(hosts)})", None
    shared = shared_gpu(every, group)
    if shared is not None:
        return shared, None
    missing = [r for r, (_, other, _) in enumerate(every) if other != index
               and not torch.cuda.can_device_access_peer(index, other)]
    verdicts = [None] * world_size
    with torch.cuda.device(device):
        dist.all_gather_object(verdicts, missing, group=group)
    for rank, unreachable in enumerate(verdicts):
        if unreachable:
            return (f"the GPU of {rank_name(group, rank)} has no peer access to the GPU of "
                    f"{rank_name(group, unreachable[0])}"), None
    # each process seeing only its own GPU (CUDA_VISIBLE_DEVICES per rank): peer access unchecked (decided
    # from `every`, the same list on every rank, so every rank gives the same answer)
    hidden = [(a, b) for a in range(world_size) for b in range(a) if every[a][1] == every[b][1]
              and every[a][2] != every[b][2]]
    if hidden:
        return None, (f"{ranks_name(group, hidden[0][::-1])} see different GPUs under one device index, so their "
                      f"peer access cannot be checked")
    return None, None
