"""The NVLink transport alone against NCCL's all_to_all_single on the same bytes, on every GPU of one
host: `torchrun --nproc-per-node 2 scripts/bench_peer_transport.py`. Prints, per payload size and SM
budget, the device time of one exchange (CUDA events, median), its host time, and GB/s of bytes
leaving a rank (the raw copy loop and the copy engine copy one peer's rows: those bytes; the local copy:
the whole input); rank 0 prints.
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import ep_runtime as ep
from ep_runtime.dispatchers import peer_transport as pt


@triton.jit
def _raw_copy(src_ptr, dst_address, n, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """The transport's copy loop alone: n words into the peer's region, no flags."""
    dst = pt._words_at(dst_address, 0, 1, src_ptr.dtype.element_ty, VEC)
    pt._copy_words(src_ptr, dst, n, tl.program_id(0), tl.num_programs(0), VEC, BLOCK)


def _time(fn, repeats=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    device_us, host_us = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn()
        host_us.append((time.perf_counter() - t0) * 1e6)
        end.record()
        torch.cuda.synchronize()
        device_us.append(start.elapsed_time(end) * 1e3)
    return statistics.median(device_us), statistics.median(host_us)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_peer_transport needs CUDA GPUs (the NVLink transport), under torchrun")
        return 2
    group = ep.init_distributed()
    R, me = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device())
    peer = pt.peer_transport(group, device, R, "nvlink")
    row_bytes = 7168 * 2 + 64  # a DeepSeek-V3 payload row: bf16 hidden state and its metadata
    if me == 0:
        print(f"{'rows/peer':>9} {'MB out':>7} {'impl':>14} {'sms':>4} {'warps':>5} {'device us':>9} {'host us':>8} "
              f"{'GB/s':>7}")
    for rows in (64, 2048, 4096):
        x = torch.randint(0, 255, (R * rows, row_bytes), dtype=torch.uint8, device=device)
        out_bytes = (R - 1) * rows * row_bytes  # the exchanges: every other rank's rows
        peer_bytes = rows * row_bytes  # the raw copy loop and the copy engine: one peer's rows
        peer.fits(R * rows * row_bytes)
        ref = torch.empty_like(x)
        dist.all_to_all_single(ref, x)
        d, h = _time(lambda: dist.all_to_all_single(torch.empty_like(x), x))
        if me == 0:
            print(f"{rows:>9} {out_bytes / 1e6:>7.2f} {'nccl a2a':>14} {'-':>4} {'-':>5} {d:>9.1f} {h:>8.1f} "
                  f"{out_bytes / d / 1e3:>7.1f}")
        words = x[:rows].view(torch.int64).reshape(-1)
        peer_address = peer._region.addresses[(me + 1) % R]
        for sms in (24, 64):  # the SM copy loop alone (8 warps, 4096-word steps)
            d, h = _time(lambda: _raw_copy[(sms,)](words, peer_address, words.numel(), VEC=2, BLOCK=4096,
                                                   num_warps=8))
            if me == 0:
                print(f"{rows:>9} {peer_bytes / 1e6:>7.2f} {'raw copy loop':>14} {sms:>4} {8:>5} "
                      f"{d:>9.1f} {h:>8.1f} {peer_bytes / d / 1e3:>7.1f}")
        # The copy engine alone (cudaMemcpyAsync into the peer's mapped region): no SM at all.
        src = x[:rows].reshape(-1)
        dst = peer._region.views[(me + 1) % R][:src.numel()]
        d, h = _time(lambda: dst.copy_(src))
        if me == 0:
            print(f"{rows:>9} {peer_bytes / 1e6:>7.2f} {'copy engine':>14} {0:>4} {'-':>5} {d:>9.1f} {h:>8.1f} "
                  f"{peer_bytes / d / 1e3:>7.1f}")
        for sms in (0, 24, 64):  # the whole transport call: copy engine (0), copy kernel
            got = peer.all_to_all(x, R * rows, chunk=rows, num_sms=sms)
            assert torch.equal(got, ref)
            d, h = _time(lambda: peer.all_to_all(x, R * rows, chunk=rows, num_sms=sms))
            if me == 0:
                print(f"{rows:>9} {out_bytes / 1e6:>7.2f} {'nvlink':>14} {sms:>4} {pt._WARPS if sms else 1:>5} "
                      f"{d:>9.1f} {h:>8.1f} {out_bytes / d / 1e3:>7.1f}")
        d, h = _time(lambda: ref.copy_(x))
        if me == 0:
            print(f"{rows:>9} {x.numel() / 1e6:>7.2f} {'local copy':>14} {'-':>4} {'-':>5} {d:>9.1f} {h:>8.1f} "
                  f"{x.numel() / d / 1e3:>7.1f}")
    peer.check()
    ep.destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
