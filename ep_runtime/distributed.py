"""One call to join whatever launched this job: torchrun, Slurm (srun), MPI (mpirun) or nothing.

Backend: NCCL when CUDA is available, gloo otherwise. The group gets a timeout
(EP_RUNTIME_TIMEOUT_S unless given), so a dead or stalled rank makes the others fail instead of
hanging. A group created here is destroyed at interpreter exit (gloo can abort the process at
shutdown otherwise); call destroy_distributed() to do it earlier.

Why destroy_distributed() waits for gloo's worker threads: a ProcessGroupGloo runs collectives on
its own threads, and the thread that ran a collective may be the last owner of that work's tensors.
Freeing a tensor that Python also sees takes the GIL. Python still references the group after
torch's destroy_process_group (the `group` a script keeps, every layer's dispatcher), so those
threads live on until interpreter shutdown; a thread that only then gets round to freeing its last
work (it was waiting for a CPU, or for the GIL) is stopped by Python while it unwinds a noexcept
destructor: "terminate called without an active exception", SIGABRT, after the job's results were
printed (torch issue 190489). So destroy_distributed() releases the GIL until no gloo worker thread
is runnable any more, i.e. each has finished its last work and sleeps waiting for the next.
"""
from __future__ import annotations

import atexit
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import envs


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int
    init_method: str


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list")
    prefix, bracket = head.group(1), head.group(3)
    if bracket is None:
        return prefix
    return prefix + bracket.split(",")[0].split("-")[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def detect_launch() -> LaunchInfo:
    """Which launcher started this process, and this process's place in the job.

    Order: torchrun (RANK and WORLD_SIZE; also torchrun under srun, as slurm/ep_multinode.sbatch
    does), Open MPI's mpirun (OMPI_COMM_WORLD_SIZE: it wins over Slurm's variables because mpirun
    inside an allocation starts its daemons with srun, so every rank on a node would inherit the
    daemon's SLURM_PROCID), a Slurm step (srun: SLURM_STEP_ID and SLURM_PROCID; a batch script
    itself has no step id and counts as a single process), MPICH/PMI (PMI_SIZE), else a single
    process. Under MPI every rank must call this together (rank 0 broadcasts the address).
    """
    if envs.launcher("RANK", int) is not None and envs.launcher("WORLD_SIZE", int) is not None:
        return LaunchInfo("torchrun", envs.launcher("RANK", int), envs.launcher("WORLD_SIZE", int),
                          envs.launcher("LOCAL_RANK", int) or 0, "env://")
    if envs.launcher("OMPI_COMM_WORLD_SIZE", int) is not None:
        return _mpi_launch()
    if envs.launcher("SLURM_STEP_ID") is not None and envs.launcher("SLURM_PROCID", int) is not None:
        return _slurm_launch()
    if envs.launcher("PMI_SIZE", int) is not None:
        return _mpi_launch()
    return LaunchInfo("single", 0, 1, 0, "")


def slurm_port(job_id: int, step_id: int) -> int:
    """Rendezvous port of a Slurm step: the same on every task of the step, different for the next
    step of the job and for neighbouring jobs; in 15000..29999, below Linux's ephemeral range."""
    return 15000 + (job_id * 7 + step_id) % 15000


def _slurm_launch() -> LaunchInfo:
    ntasks = envs.launcher("SLURM_STEP_NUM_TASKS", int) or envs.launcher("SLURM_NTASKS", int) or 1
    nodelist = envs.launcher("SLURM_STEP_NODELIST") or envs.launcher("SLURM_JOB_NODELIST") or "localhost"
    # MASTER_ADDR / MASTER_PORT, when exported, override (a head node known by another name).
    host = envs.launcher("MASTER_ADDR") or first_slurm_host(nodelist)
    step = envs.launcher("SLURM_STEP_ID", int) or 0  # "batch"/"extern" steps never run ranks
    port = envs.launcher("MASTER_PORT", int) or slurm_port(envs.launcher("SLURM_JOB_ID", int) or 0, step)
    return LaunchInfo("slurm", envs.launcher("SLURM_PROCID", int), ntasks,
                      envs.launcher("SLURM_LOCALID", int) or 0, f"tcp://{host}:{port}")


_MPI_LAUNCH: Optional[LaunchInfo] = None


def _mpi_launch() -> LaunchInfo:
    """Rank 0 picks its host name and a free port and broadcasts them with mpi4py (once per process)."""
    global _MPI_LAUNCH
    if _MPI_LAUNCH is not None:
        return _MPI_LAUNCH
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError("started by mpirun but mpi4py is missing: pip install 'ep-runtime[mpi]' "
                           "(scripts/setup_mpi.sh installs Open MPI and mpi4py)") from err
    comm = MPI.COMM_WORLD
    address = None
    if comm.Get_rank() == 0:
        address = (envs.launcher("MASTER_ADDR") or socket.gethostname(), free_port())
    host, port = comm.bcast(address, root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    local.Free()
    _MPI_LAUNCH = LaunchInfo("mpi", comm.Get_rank(), comm.Get_size(), local_rank, f"tcp://{host}:{port}")
    return _MPI_LAUNCH


def check_timeout(timeout_s) -> float:
    """timeout_s as float seconds, or an error: a finite number in the range of EP_RUNTIME_TIMEOUT_S
    (an infinite or NaN timeout would let a job hang forever)."""
    knob = envs.KNOBS[envs.PREFIX + "TIMEOUT_S"]
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"timeout_s={timeout_s!r} must be a number of seconds (int or float)")
    if not knob.minimum <= timeout_s <= knob.maximum:  # False for NaN too
        raise ValueError(f"timeout_s={timeout_s!r}; allowed: {knob.minimum:g} <= seconds <= {knob.maximum:g} "
                         f"(the range of {knob.name})")
    return float(timeout_s)


_CREATED_HERE = False


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> dist.ProcessGroup:
    """Initialise the default process group from the launcher's environment and return it.

    Safe to call twice (the second call returns the existing group). Sets the CUDA device from the
    local rank. timeout_s: how long a collective waits for a missing rank (EP_RUNTIME_TIMEOUT_S).
    """
    global _CREATED_HERE
    if dist.is_initialized():
        return dist.group.WORLD
    launch = detect_launch()
    envs.validate_all(warn=launch.rank == 0)  # unknown EP_RUNTIME_* variables: one warning per job
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo", "mpi"):
        raise ValueError(f"backend={backend!r}; allowed: nccl, gloo, mpi")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend='nccl' needs CUDA; this process sees no GPU (use backend='gloo')")
    timeout = timedelta(seconds=check_timeout(timeout_s) if timeout_s is not None else envs.get("TIMEOUT_S"))
    kwargs = {}
    if use_cuda:
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device
    if launch.launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
    else:
        dist.init_process_group(backend, init_method=launch.init_method, rank=launch.rank,
                                world_size=launch.world_size, timeout=timeout, **kwargs)
    if not _CREATED_HERE:
        atexit.register(destroy_distributed)
    _CREATED_HERE = True
    return dist.group.WORLD


def destroy_distributed() -> None:
    """Destroy the default process group if one exists (idempotent), then wait until gloo's worker
    threads have released their last work (see the module doc: a thread still doing so when the
    interpreter shuts down aborts the process). Free CUDA graphs that captured collectives of the
    group first: NCCL waits for their work to be released when it destroys the communicator."""
    if dist.is_available() and dist.is_initialized():
        from ep_runtime.dispatchers.peer_transport import release_transports
        release_transports()  # their symmetric memory belongs to the group
        if dist.get_backend() == "nccl":
            torch.cuda.synchronize()  # no kernel of this group still in flight when its communicator goes
        dist.destroy_process_group()
    wait_for_idle_gloo_workers()


GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads


def gloo_worker_states() -> list[str]:
    """Scheduler state of each gloo worker thread of this process ("R" runnable, "S" sleeping, ...),
    read from /proc (Linux); empty where there is none or no /proc."""
    states = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return states
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != GLOO_WORKER_THREAD:
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:  # the thread ended meanwhile
            continue
    return states


def wait_for_idle_gloo_workers(limit_s: float = 5.0) -> bool:
    """Release the GIL until no gloo worker thread is runnable in two samples in a row (each sample
    follows a sleep, during which a worker waiting for the GIL gets it); True when they went idle,
    False after limit_s. A worker blocked inside a collective sleeps too, so this never waits for a
    peer. Returns at once when the process has no gloo worker."""
    if not gloo_worker_states():
        return True
    deadline = time.monotonic() + limit_s
    quiet = 0
    while quiet < 2:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
        quiet = quiet + 1 if "R" not in gloo_worker_states() else 0
    return True


def device_for_rank() -> torch.device:
    """This process's CUDA device when the group runs on NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PeerFailure(RuntimeError):
    """A collective of a layer failed because another rank did not answer in time (stalled, or on a
    different code path) or its process ended. The message names the dispatcher, the operation,
    the peer rank(s) and EP_RUNTIME_TIMEOUT_S; the backend's own error is chained (__cause__)."""


# What gloo says when a peer does not answer ("Timed out waiting 3000ms for recv operation to
# complete") or its process ended ("Connection closed by peer", "Connection reset by peer").
_PEER_TIMEOUT = re.compile(r"timed out", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe", re.IGNORECASE)
_WAITED_MS = re.compile(r"waiting (\d+)ms")


@contextmanager
def naming_peer_failures(dispatcher, operation: str) -> Iterator[None]:
    """Re-raise a collective's timeout or lost connection inside the block as a PeerFailure that
    says which dispatcher and operation waited, for which rank(s), and which knob sets the wait
    (EP_RUNTIME_TIMEOUT_S); every other error passes through unchanged. `dispatcher` gives name,
    rank and world_size."""
    try:
        yield
    except RuntimeError as exc:  # torch's DistBackendError is a RuntimeError
        text = str(exc)
        timed_out, gone = _PEER_TIMEOUT.search(text), _PEER_GONE.search(text)
        if isinstance(exc, PeerFailure) or not (timed_out or gone):
            raise
        rank, size = dispatcher.rank, dispatcher.world_size
        others = [r for r in range(size) if r != rank]
        peers = f"rank {others[0]}" if len(others) == 1 else f"one or more of ranks {', '.join(map(str, others))}"
        knob = envs.PREFIX + "TIMEOUT_S"
        if gone:
            what = (f"lost its connection to {peers}: that rank's process ended (see its own error first); "
                    f"a rank that stalls instead is given up on after {knob}")
        else:
            waited = _WAITED_MS.search(text)
            limit = f"{int(waited.group(1)) / 1000:g} s" if waited else f"{envs.get('TIMEOUT_S'):g} s by default"
            what = (f"waited in vain for {peers}: no answer within the group's timeout ({limit}; set it with {knob} "
                    f"or init_distributed(timeout_s=...)); that rank stalled, died, or took a different code path")
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise PeerFailure(f"{dispatcher.name} {operation} on rank {rank} of {size} {what}. Backend error: "
                          f"{first_line}") from exc
