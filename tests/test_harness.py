"""The multi-rank harness itself: results come back, failures carry the rank's traceback, hangs time out."""
import time

import pytest
import torch
import torch.distributed as dist

from ep_runtime.testing import RankFailure, run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()


def _rank_zero_sleeps(rank, world_size):
    if rank == 0:
        time.sleep(60)
    return rank


def test_results_come_back_per_rank():
    assert run_ranks(_sum_ranks, 3) == [6.0, 6.0, 6.0]


def test_exception_fails_with_that_ranks_traceback():
    with pytest.raises(RankFailure, match=r"(?s)rank 1.*ValueError: boom on rank one"):
        run_ranks(_rank_one_raises, 2, timeout=60, group_timeout=5)


def test_hang_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 2 did not finish within 3 s"):
        run_ranks(_rank_zero_sleeps, 2, timeout=3)
    assert time.monotonic() - start < 20
