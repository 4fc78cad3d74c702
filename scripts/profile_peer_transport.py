"""Host cost of one NVLink transport call, piece by piece (2 ranks): `torchrun --nproc-per-node 2
scripts/profile_peer_transport.py`; rank 0 prints microseconds per piece and a cProfile of 200 calls."""
import argparse
import cProfile
import pstats
import time

import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.dispatchers import peer_transport as pt


def _per_call_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_peer_transport needs CUDA GPUs (the NVLink transport), under torchrun")
        return 2
    group = ep.init_distributed()
    R, me = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device())
    peer = pt.peer_transport(group, device, R, "nvlink")
    x = torch.randn(R * 64, 7200, device=device, dtype=torch.bfloat16)
    peer.fits(x.numel() * 2)
    pieces = {
        "all_to_all": lambda: peer.all_to_all(x, R * 64, chunk=64),
        "all_to_all sms=24": lambda: peer.all_to_all(x, R * 64, chunk=64, num_sms=24),
        "copy to peer": lambda: peer._region.views[1 - me][:x.numel()].copy_(x.view(torch.uint8)[:x.numel()]),
        "check": peer.check,
        "open kernel": lambda: pt._open_kernel[(1,)](peer._flag_ptrs, peer._epoch, peer._device_error,
                                                     peer._waits[0], me, R, *peer._waits[1:], INTERPRET=False,
                                                     num_warps=1),
        "signal kernel": lambda: pt._signal_kernel[(1,)](peer._flag_ptrs, peer._epoch, peer._device_error,
                                                         peer._waits[0], me, R, *peer._waits[1:], INTERPRET=False,
                                                         num_warps=1),
        "torch add_": lambda: x.add_(0),
    }
    for name, fn in pieces.items():
        us = _per_call_us(fn)
        if me == 0:
            print(f"{name:>18}: {us:8.1f} us per call (host)")
    prof = cProfile.Profile()
    prof.enable()
    _per_call_us(pieces["all_to_all"])
    prof.disable()
    if me == 0:
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    ep.destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
