"""The NVLink transport: a rank stores its rows straight into its peers' memory and signals them;
no NCCL call, no host sync, a fixed number of SMs.

Every rank of a group maps one symmetric region of every other rank (PyTorch symmetric memory on
CUDA). A call of `all_to_all` runs two kernels on the caller's stream:
- put: `num_sms` programs copy each outgoing row into the destination rank's region, at the row
  offset this rank owns there (fixed chunks for static plans; for exact plans the offsets come
  from the all-gathered count table on the device, the same table that planned the rows);
- wait: program 0 raises this rank's flag in every peer (the call's epoch, with release
  semantics), every program waits until every peer's flag here reaches the epoch (acquire; bounded
  by EP_RUNTIME_TIMEOUT_S, after which it records the silent rank in host memory and gives up), then
  the programs copy the received rows out into an ordinary tensor, and the last one to finish
  advances the epoch.
The epoch lives on the device, so CUDA-graph replays keep counting. Calls alternate between two
halves of the region (by epoch parity): a peer can be at most one call ahead (its next call waits
for this rank's signal), so it never writes the half this rank is still copying out.

The region is sized by the largest call so far, and grows (a collective re-allocation, the same
decision on every rank because it is made from sizes every rank knows) outside graph capture; a
call that does not fit while a graph is captured takes the collective transport instead.

On CPU ranks of one host the same kernels run under TRITON_INTERPRET=1 over shared-memory files
standing in for symmetric memory: tests check every offset, signal and copy without a GPU.
"""
from __future__ import annotations

import math
import os
import uuid
from typing import Optional

import torch
import torch.distributed as dist

from ep_runtime import envs
from ep_runtime.distributed import PeerFailure
from ep_runtime.validation import capturing

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the collective transport runs instead
    triton = None

_GRANULE = 1 << 20  # regions grow in whole MiB, to at least twice the old size
_WORD = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

if triton is not None:

    @triton.jit
    def _table_offsets(table_ptr, stride, me, peer, R, TO_OWNER: tl.constexpr):
        """(rows, first source row, first destination row) of what this rank sends `peer`, read from
        the count table (sent[s][d] at table[s, 1 + d]). Dispatch: rank `me` sends sent[me][peer]
        rows, which land after the rows of lower source ranks. TO_OWNER (combine): the rows `me`
        received from `peer` go back to where `peer` sent them from."""
        if TO_OWNER:
            count = tl.load(table_ptr + peer * stride + 1 + me)
            src = 0
            for s in range(0, peer):
                src += tl.load(table_ptr + s * stride + 1 + me)
            dst = 0
            for d in range(0, me):
                dst += tl.load(table_ptr + peer * stride + 1 + d)
        else:
            count = tl.load(table_ptr + me * stride + 1 + peer)
            src = 0
            for d in range(0, peer):
                src += tl.load(table_ptr + me * stride + 1 + d)
            dst = 0
            for s in range(0, me):
                dst += tl.load(table_ptr + s * stride + 1 + peer)
        return count, src, dst

    @triton.jit
    def _put_kernel(src_ptr, region_ptrs, epoch_ptr, table_ptr, table_stride, me, R, chunk, src_step, row_words,
                    half_words, TABLE: tl.constexpr, TO_OWNER: tl.constexpr, BLOCK: tl.constexpr):
        """Copy every outgoing row into its destination's region (the half of this call's parity)."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        half = (tl.load(epoch_ptr) % 2) * half_words
        cols = tl.arange(0, BLOCK)
        for peer in range(0, R):
            if TABLE:
                count, src, dst = _table_offsets(table_ptr, table_stride, me, peer, R, TO_OWNER)
            else:
                count = chunk
                src = peer * src_step
                dst = me * chunk
            base = tl.load(region_ptrs + peer).to(tl.pointer_type(src_ptr.dtype.element_ty)) + half
            for r in range(pid, count, nprog):
                src_row = src_ptr + tl.cast(src + r, tl.int64) * row_words
                dst_row = base + tl.cast(dst + r, tl.int64) * row_words
                for c in range(0, row_words, BLOCK):
                    mask = c + cols < row_words
                    tl.store(dst_row + c + cols, tl.load(src_row + c + cols, mask=mask), mask=mask)

    @triton.jit
    def _clock_ns(INTERPRET: tl.constexpr):
        if INTERPRET:
            return 0
        else:
            return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                             pack=1)

    @triton.jit
    def _wait_kernel(out_ptr, region_ptrs, flag_ptrs, epoch_ptr, done_ptr, error_ptr, me, R, rows, row_words,
                     half_words, timeout_ns, max_polls, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
        """Signal every peer, wait for every peer's signal, copy the received rows [0, rows) out."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        epoch = tl.load(epoch_ptr) + 1  # this call's number, the same on every rank
        half = (epoch - 1) % 2 * half_words
        if pid == 0:  # the put kernel before this one has finished: its stores precede the release
            for peer in range(0, R):
                flag = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int64)) + me
                tl.atomic_xchg(flag, epoch, sem="release", scope="sys")
        mine = tl.load(flag_ptrs + me).to(tl.pointer_type(tl.int64))
        error = error_ptr.to(tl.pointer_type(tl.int32))
        start = _clock_ns(INTERPRET)
        for peer in range(0, R):
            polls = 0
            seen = tl.atomic_add(mine + peer, 0, sem="acquire", scope="sys")
            while seen < epoch:
                polls += 1
                late = (_clock_ns(INTERPRET) - start > timeout_ns) | (polls > max_polls)
                if late:
                    tl.store(error, peer + 1)
                    seen = epoch  # give up: the host reads the error and raises
                else:
                    seen = tl.atomic_add(mine + peer, 0, sem="acquire", scope="sys")
        local = tl.load(region_ptrs + me).to(tl.pointer_type(out_ptr.dtype.element_ty)) + half
        cols = tl.arange(0, BLOCK)
        for r in range(pid, rows, nprog):
            for c in range(0, row_words, BLOCK):
                mask = c + cols < row_words
                value = tl.load(local + tl.cast(r, tl.int64) * row_words + c + cols, mask=mask)
                tl.store(out_ptr + tl.cast(r, tl.int64) * row_words + c + cols, value, mask=mask)
        if tl.atomic_add(done_ptr, 1) == nprog - 1:  # the last program out advances the epoch
            tl.store(done_ptr, 0)
            tl.store(epoch_ptr, epoch)


def _word(row_bytes: int) -> torch.dtype:
    """The widest integer type that divides a row (wide loads and stores move the bytes)."""
    return next(dtype for size, dtype in _WORD.items() if row_bytes % size == 0)


class _Region:
    """This rank's symmetric allocation and every rank's address of it (index = group rank)."""

    def __init__(self, local: torch.Tensor, addresses: list, keep: object = None):
        self.local, self.addresses, self.keep = local, addresses, keep

    @property
    def nbytes(self) -> int:
        return self.local.numel()


def _cuda_region(nbytes: int, group, device: torch.device) -> _Region:
    from torch.distributed import _symmetric_memory as symm_mem
    local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(local, group)
    return _Region(local, list(handle.buffer_ptrs), handle)


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


def _map_region(nbytes: int, group, device: torch.device) -> _Region:
    return (_cuda_region if device.type == "cuda" else _shared_file_region)(nbytes, group, device)


class PeerTransport:
    """Rows between the ranks of `group` by stores into each other's memory. One per (group,
    device), shared by every layer on the group (see `peer_transport`)."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        R = self.world_size
        self._flags = _map_region(8 * R, group, device)  # flags[s]: the last epoch rank s signalled here
        self._flags.local.zero_()
        self._flag_ptrs = torch.tensor(self._flags.addresses, dtype=torch.int64, device=device)
        self._region: Optional[_Region] = None
        self._region_ptrs = torch.zeros(R, dtype=torch.int64, device=device)  # updated in place on growth
        self._epoch = torch.zeros(2, dtype=torch.int64, device=device)  # [epoch, programs done]
        self._error = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._failed: Optional[str] = None
        dist.barrier(group=group)  # every flag word is zero before any rank signals

    @property
    def nbytes(self) -> int:
        """Device memory this rank holds for the transport (both halves of the region, and flags)."""
        return (self._region.nbytes if self._region is not None else 0) + self._flags.nbytes

    @property
    def calls(self) -> int:
        """Exchanges made so far (the device epoch; reading it waits for them)."""
        return int(self._epoch[0])

    def fits(self, half_bytes: int) -> bool:
        """Make room for a call moving at most `half_bytes` into any rank (identical on every rank);
        False while capturing a graph when the region is too small (the caller takes the collective)."""
        have = self._region.nbytes // 2 if self._region is not None else 0
        if self._region is not None and half_bytes <= have:
            return True
        if capturing():
            return False
        want = max(half_bytes, 2 * have, 1)
        want = -(-want // _GRANULE) * _GRANULE
        if self._region is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing of ours still reads or writes the old region
        self._region = _map_region(2 * want, self.group, self.device)
        self._region_ptrs.copy_(torch.tensor(self._region.addresses, dtype=torch.int64))
        return True

    def check(self) -> None:
        """Raise when a wait gave up on a peer (read from host memory: no sync)."""
        if self._failed is None and int(self._error[0]):
            peer = int(self._error[0]) - 1
            self._failed = (f"rank {peer} did not signal its rows within EP_RUNTIME_TIMEOUT_S="
                            f"{envs.get('TIMEOUT_S'):g}s on the NVLink transport (stalled or ended); "
                            f"outputs since are not valid")
        if self._failed is not None:
            raise PeerFailure(self._failed)

    def all_to_all(self, x: torch.Tensor, rows_out: int, chunk: Optional[int] = None,
                   table: Optional[torch.Tensor] = None, to_owner: bool = False, gather: bool = False,
                   num_sms: int = 24) -> torch.Tensor:
        """x [S, ...] -> [rows_out, ...], rows grouped by source rank in rank order. Static plans:
        `chunk` rows to every peer (x holds R chunks, peer-major), or with `gather` all of x (chunk =
        S) to every peer. Exact plans: `table` [R, 1 + R + ...] int32, the all-gathered count table
        (sent[s][d] = table[s, 1 + d]); dispatch sends x's rows peer by peer, `to_owner` (combine)
        sends received rows back to their senders. Call fits() first."""
        self.check()
        x = x.contiguous()
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        word = _word(row_bytes)
        out = torch.empty((rows_out,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        words_in, words_out = x.view(torch.uint8).view(word), out.view(torch.uint8).view(word)
        row_words = row_bytes // words_in.element_size()
        half_words = self._region.nbytes // 2 // words_in.element_size()
        block = min(triton.next_power_of_2(max(row_words, 16)), 2048)
        interpret = not x.is_cuda  # CPU tensors: the Triton interpreter
        timeout_s = envs.get("TIMEOUT_S")
        _put_kernel[(num_sms,)](
            words_in, self._region_ptrs, self._epoch, table if table is not None else self._epoch,
            table.shape[1] if table is not None else 0, self.rank, self.world_size, chunk or 0,
            0 if gather else (chunk or 0), row_words, half_words, TABLE=table is not None, TO_OWNER=to_owner,
            BLOCK=block)
        _wait_kernel[(num_sms,)](
            words_out, self._region_ptrs, self._flag_ptrs, self._epoch, self._epoch[1:], self._error.data_ptr(),
            self.rank, self.world_size, rows_out, row_words, half_words, int(timeout_s * 1e9),
            int(timeout_s * 2000) if interpret else 2 ** 62, BLOCK=block, INTERPRET=interpret)
        return out


_TRANSPORTS: dict = {}  # (group, device) -> PeerTransport, or why there can be none (a str)
TRANSPORTS = ("auto", "nccl", "nvlink")


def peer_transport(group, device: torch.device, world_size: int, mode: str) -> Optional[PeerTransport]:
    """The NVLink transport of (group, device) for an exchange whose transport setting is `mode`:
    `auto` takes it when every rank's GPU maps every other's memory (one host, peer access), `nccl`
    never, `nvlink` always (an error naming why where it cannot be). None: the collective transport.
    Made on first use, shared by every exchange on the group after; collective then (every rank
    reaches its first exchange together)."""
    if mode == "nccl" or world_size == 1 or (mode == "auto" and device.type != "cuda"):
        return None  # CPU ranks take the stand-in only when asked (tests)
    key = (group, device)
    if key not in _TRANSPORTS:
        reason = _cannot_map(group, device, world_size)
        _TRANSPORTS[key] = reason if reason is not None else PeerTransport(group, device)
    found = _TRANSPORTS[key]
    if isinstance(found, str):
        if mode == "nvlink":
            raise RuntimeError(f"transport='nvlink' (EP_RUNTIME_TRANSPORT) is impossible here: {found}; "
                               f"allowed here: 'auto' or 'nccl'")
        return None
    return found


def release_transports() -> None:
    """Drop every transport (their memory goes with them); before the process groups are destroyed."""
    _TRANSPORTS.clear()


def _interpreting() -> bool:
    return envs.launcher("TRITON_INTERPRET") == "1"


def _cannot_map(group, device: torch.device, world_size: int) -> Optional[str]:
    """Why some rank cannot map some peer's memory (None: every rank can), the same on every rank."""
    import socket
    if triton is None:
        return "triton is not installed"
    if device.type != "cuda":  # CPU ranks: only the test stand-in, under the interpreter
        return None if _interpreting() else "the ranks are CPU processes (no GPU memory to map)"
    mine = (socket.gethostname(), device.index if device.index is not None else torch.cuda.current_device())
    every = [None] * world_size
    with torch.cuda.device(device):
        dist.all_gather_object(every, mine, group=group)
    hosts = sorted({host for host, _ in every})
    if len(hosts) > 1:
        return f"the group spans {len(hosts)} hosts ({', '.join(hosts)})"
    missing = [r for r, (_, index) in enumerate(every) if index != mine[1]
               and not torch.cuda.can_device_access_peer(mine[1], index)]
    verdicts = [None] * world_size
    with torch.cuda.device(device):
        dist.all_gather_object(verdicts, missing, group=group)
    for rank, unreachable in enumerate(verdicts):
        if unreachable:
            return f"rank {rank}'s GPU has no peer access to rank {unreachable[0]}'s GPU"
    return None
