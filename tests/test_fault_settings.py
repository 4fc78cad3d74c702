"""The settings init_distributed gives NCCL's watchdog so that it neither beats nor slows our own
timeout (the waits themselves are exercised on GPUs by tests/test_gpu_faults.py), and that gloo
groups keep exactly the timeout they are given (the CPU guarantees of tests/test_reliability.py)."""
from datetime import timedelta

import pytest
import torch

import ep_runtime as ep
from ep_runtime import distributed

WATCHDOG = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC")


@pytest.fixture
def clean_env(monkeypatch):
    """No watchdog variable and no dump knob set; whatever a test sets is undone afterwards."""
    for name in WATCHDOG + ("EP_RUNTIME_NCCL_DUMP_ON_TIMEOUT",):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_watchdog_defaults_leave_our_timeout_first(clean_env):
    import os

    assert distributed.nccl_watchdog_settings() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
                                                    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
                                                    "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "500"}
    assert {name: os.environ[name] for name in WATCHDOG} == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
                                                             "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
                                                             "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "500"}
    for ours in (1.0, 10.0, 300.0, 1e9):
        # the watchdog acts only after our deadline, our abort's bounded wait and a margin have passed
        group = distributed.nccl_group_timeout(ours)
        assert group >= ours + distributed.ABORT_WAIT_S + 10
        timedelta(seconds=group)  # what init_process_group is handed


def test_user_values_win(clean_env):
    import os

    clean_env.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    clean_env.setenv("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    values = distributed.nccl_watchdog_settings()
    assert values["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and values["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


def test_dump_knob_keeps_torchs_flight_recorder(clean_env):
    import os

    clean_env.setenv("EP_RUNTIME_NCCL_DUMP_ON_TIMEOUT", "1")
    assert distributed.nccl_watchdog_settings() == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    assert "TORCH_NCCL_DUMP_ON_TIMEOUT" not in os.environ and "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC" not in os.environ


def test_gloo_group_gets_exactly_our_timeout_and_no_nccl_settings(clean_env):
    import os

    group = ep.init_distributed(backend="gloo", timeout_s=7)
    try:
        assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=7)
        assert distributed.timeout_s() == 7.0
        assert not [name for name in WATCHDOG if name in os.environ]
    finally:
        ep.destroy_distributed()


def test_watchdog_abort_is_named_like_our_own(clean_env):
    """An error from a collective on a communicator NCCL's watchdog aborted (a wait outside ours ran
    past the group's timeout) reads as a PeerFailure naming the dispatcher, operation, peer and knob."""
    class Dispatcher:
        name, rank, world_size = "deepep_normal", 0, 2

    with pytest.raises(ep.PeerFailure) as failure:
        with distributed.naming_peer_failures(Dispatcher, "dispatch"):
            raise RuntimeError("NCCL communicator was aborted on rank 0. Original reason for failure was: ...")
    assert str(failure.value).startswith("deepep_normal dispatch on rank 0 of 2 waited in vain for rank 1: the "
                                         "group's NCCL communicator was aborted by NCCL's watchdog")
    assert "EP_RUNTIME_TIMEOUT_S" in str(failure.value)
