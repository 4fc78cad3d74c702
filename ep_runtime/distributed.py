"""One call to join whatever launched this job: torchrun, Slurm (srun), MPI (mpirun) or nothing.

Backend: NCCL when CUDA is available, gloo otherwise. A gloo group gets the timeout
(EP_RUNTIME_TIMEOUT_S unless given), so a dead or stalled rank makes the others fail instead of
hanging. On NCCL, collectives do not wait on the host: each wait of ep-runtime's own polls with that
deadline, then aborts the group and raises (wait_on_device, at the end of this module), and the
group's own timeout, which drives NCCL's watchdog, is set 30 s later (nccl_watchdog_settings). A group created here is destroyed at interpreter exit (gloo can abort the process at
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
import numbers
import os
import random
import re
import socket
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, NoReturn, Optional, Sequence

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


def first_slurm_host(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> str:
    """First host of a Slurm node list, as `scontrol show hostnames` gives it: 'gpu[03-05,09],cpu1' ->
    'gpu03'; a name with several ranges is their product, 'rack[1-2]-n[07-08]' -> 'rack1-n07'. name: the
    variable the list came from, for the error."""
    head = re.match(r"(?:[^,\[\]]|\[[^\[\]]+\])+", nodelist.strip())  # up to the first comma outside brackets
    if head is None or nodelist.strip()[head.end():head.end() + 1] not in ("", ","):
        raise ValueError(f"launcher variable {name}={nodelist!r} is not a Slurm node list; allowed: host names and "
                         f"bracketed ranges, such as 'node[01-04,07],login1'")
    return re.sub(r"\[([^\]]+)\]", lambda bracket: bracket.group(1).split(",")[0].split("-")[0], head.group(0))


_PORTS_GIVEN: set = set()  # by free_port in this process: two calls never hand out the same port
_FREE_PORTS = range(10000, 15000)  # below the Slurm steps' ports (slurm_port) and the kernel's ephemeral range


def free_port() -> int:
    """A TCP port that is free now, for a rendezvous server that binds it a moment later.

    Taken from 10000..14999, below the Slurm steps' ports (slurm_port: 15000..29999) and Linux's ephemeral
    range (32768.. by default; Kubernetes' NodePorts are 30000..32767): a port from bind(("", 0)) lies in the
    ephemeral range, where another process's outgoing connection (a gloo pair, a store client) may be given it
    before the server binds it (EADDRINUSE, seen in CI). Random (from the OS, not the `random` module a test
    may seed, or forked ranks would pick alike) and never the same twice in one process; bind(0) only when 64
    tries found none free."""
    pick = random.SystemRandom()
    for _ in range(64):
        port = pick.choice(_FREE_PORTS)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    _PORTS_GIVEN.add(port)
    return port


def detect_launch() -> LaunchInfo:
    """Which launcher started this process, and this process's place in the job.

    Order: torchrun (RANK and WORLD_SIZE; also torchrun under srun, as slurm/ep_multinode.sbatch
    does; one of the two without the other is an error), Open MPI's mpirun (OMPI_COMM_WORLD_SIZE: it wins over Slurm's variables because mpirun
    inside an allocation starts its daemons with srun, so every rank on a node would inherit the
    daemon's SLURM_PROCID), a Slurm step (srun: SLURM_STEP_ID and SLURM_PROCID; a batch script
    itself has no step id and counts as a single process; not when PMI's numbers disagree with it:
    MPICH's mpiexec under Slurm, see _started_by_mpi_proxy), MPICH/PMI (PMI_SIZE), else a single
    process. Under MPI every rank must call this together (rank 0 broadcasts the address).
    """
    rank, world_size = envs.launcher("RANK", int), envs.launcher("WORLD_SIZE", int)
    if (rank is None) != (world_size is None):  # else a rank of a job would run alone as a single process
        given, missing = ("RANK", "WORLD_SIZE") if world_size is None else ("WORLD_SIZE", "RANK")
        raise ValueError(f"launcher variable {given}={rank if world_size is None else world_size} is set but "
                         f"{missing} is not; torchrun sets both (with MASTER_ADDR, MASTER_PORT): set both, or "
                         f"neither for Slurm, MPI or a single process")
    if rank is not None:
        _check_port(envs.launcher("MASTER_PORT", int))  # read by torch's env:// (its error names no variable)
        local_name = _local_rank_variable()
        local_rank = envs.launcher(local_name, int) if local_name else 0
        return _checked(LaunchInfo("torchrun", rank, world_size, local_rank, "env://"), "RANK", "WORLD_SIZE",
                        local_name or "LOCAL_RANK")
    if envs.launcher("OMPI_COMM_WORLD_SIZE", int) is not None:
        return _mpi_launch()
    if (envs.launcher("SLURM_STEP_ID") is not None and envs.launcher("SLURM_PROCID", int) is not None
            and not _started_by_mpi_proxy()):
        return _slurm_launch()
    if envs.launcher("PMI_SIZE", int) is not None:
        return _mpi_launch()
    return LaunchInfo("single", 0, 1, 0, "")


def launched_job_size() -> tuple[Optional[str], int]:
    """(variable, ranks) of the job a launcher started this process in, read from its variables alone (no
    MPI broadcast, unlike detect_launch): (None, 1) for a single process or an srun step of one task."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if (size := envs.launcher(name, int)) is not None:
            return name, size
    if envs.launcher("SLURM_STEP_ID") is not None:  # a batch script itself (no step) runs as one process
        name, size = _slurm_task_count()
        if size is not None:
            return name, size
    return None, 1


def _started_by_mpi_proxy() -> bool:
    """MPICH's and Intel MPI's mpiexec inside an allocation start one proxy per node with srun, and the
    proxy starts that node's ranks: each rank inherits the proxy's SLURM_PROCID and the step's task
    count (one task per node), so every rank of a node took the same Slurm rank. PMI's numbers then
    differ from Slurm's; srun --mpi=pmi2, which starts each rank itself, gives equal ones."""
    pmi_size = envs.launcher("PMI_SIZE", int)
    if pmi_size is None:
        return False
    slurm_size = _slurm_task_count()[1]
    pmi_rank = envs.launcher("PMI_RANK", int)
    return pmi_size != slurm_size or (pmi_rank is not None and pmi_rank != envs.launcher("SLURM_PROCID", int))


def _local_rank_variable() -> Optional[str]:
    """The variable that holds this rank's index on its node in a torchrun-style launch: LOCAL_RANK; where
    RANK and WORLD_SIZE were exported by hand in an srun or mpirun job and LOCAL_RANK was not, that
    launcher's own (SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK), so each rank of a node gets a GPU of its
    own (every rank took cuda:0, and NCCL failed on the duplicate GPU). None: no such variable (0)."""
    candidates = ["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"]
    # A batch script's SLURM_LOCALID is not a rank's, nor is an MPI rank's inside an allocation (inherited from
    # the srun step that started mpirun's daemons or mpiexec's proxies, 0 on every rank of a node).
    mpi = envs.launcher("OMPI_COMM_WORLD_SIZE") is not None or _started_by_mpi_proxy()
    if envs.launcher("SLURM_STEP_ID") is not None and not mpi:
        candidates.insert(1, "SLURM_LOCALID")
    return next((name for name in candidates if envs.launcher(name) is not None), None)


def _checked(launch: LaunchInfo, rank: str, size: str, local_rank: str) -> LaunchInfo:
    """The launcher's numbers, checked: a rank outside the job would otherwise wait at the rendezvous
    until the timeout and fail with a connection error that names no variable."""
    if launch.world_size < 1:
        raise ValueError(f"launcher variable {size}={launch.world_size}; allowed: an int >= 1 (the job's process count)")
    if not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"launcher variable {rank}={launch.rank}; allowed: 0..{launch.world_size - 1} "
                         f"({size}={launch.world_size})")
    if launch.local_rank < 0:
        raise ValueError(f"launcher variable {local_rank}={launch.local_rank}; allowed: an int >= 0")
    return launch


def check_rendezvous(launch: LaunchInfo) -> None:
    """The rendezvous variables a torchrun-style launch needs (RANK and WORLD_SIZE set by hand without them):
    torch's env:// failed inside init_process_group with a traceback ("environment variable MASTER_ADDR
    expected, but not set"). Checked by init_distributed and, before any work, by the CLI."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if envs.launcher(name) is None]
    if launch.launcher == "torchrun" and missing:
        raise ValueError(f"launcher variable{'s' if len(missing) > 1 else ''} {' and '.join(missing)} not set while "
                         f"RANK={launch.rank} and WORLD_SIZE={launch.world_size} are; torchrun sets all four: set "
                         f"{' and '.join(missing)} (rank 0's host and a free port, the same on every rank), or unset "
                         f"RANK and WORLD_SIZE for Slurm, MPI or a single process")


class RendezvousError(RuntimeError):
    """This rank cannot host or reach the job's rendezvous (its port is taken, its host does not answer, the
    MPI that launched it cannot be loaded): the message names the variable or launcher the address came from.
    The CLI prints it as one line."""


class KnobsError(ValueError):
    """init_distributed under a launcher: a rank's EP_RUNTIME_* knob is invalid, raised on every rank of the job
    at once, naming the rank, the variable and its value. The CLI prints it as one line."""


def _check_port(port: Optional[int]) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"launcher variable MASTER_PORT={port}; allowed: 1..65535")


def slurm_port(job_id: int, step_id: int) -> int:
    """Rendezvous port of a Slurm step: the same on every task of the step, different for the next
    step of the job and for neighbouring jobs; in 15000..29999, below Linux's ephemeral range."""
    return 15000 + (job_id * 7 + step_id) % 15000


def _slurm_task_count() -> tuple[str, Optional[int]]:
    """(variable, value) of a Slurm step's task count: SLURM_STEP_NUM_TASKS, else SLURM_NTASKS; value None
    when neither is set. (A 0 or an unset count was read as 1: rank 0 ran the job alone, with no error.)"""
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if (size := envs.launcher(name, int)) is not None:
            return name, size
    return "SLURM_STEP_NUM_TASKS / SLURM_NTASKS", None


def _slurm_launch() -> LaunchInfo:
    size_name, ntasks = _slurm_task_count()
    if ntasks is None:  # srun sets both; a hand-made environment may lack them
        raise ValueError(f"launcher variable SLURM_PROCID={envs.launcher('SLURM_PROCID')} is set in a Slurm step "
                         f"(SLURM_STEP_ID={envs.launcher('SLURM_STEP_ID')}) but neither SLURM_STEP_NUM_TASKS nor "
                         f"SLURM_NTASKS is; srun sets them: set SLURM_NTASKS to the job's process count, or unset "
                         f"SLURM_STEP_ID for a single process")
    nodelist_name = next((name for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if envs.launcher(name)), None)
    nodelist = envs.launcher(nodelist_name) if nodelist_name else "localhost"
    # MASTER_ADDR / MASTER_PORT, when exported, override (a head node known by another name).
    host = envs.launcher("MASTER_ADDR") or first_slurm_host(nodelist, nodelist_name)
    step = envs.launcher("SLURM_STEP_ID", int) or 0  # "batch"/"extern" steps never run ranks
    _check_port(envs.launcher("MASTER_PORT", int))
    port = envs.launcher("MASTER_PORT", int) or slurm_port(envs.launcher("SLURM_JOB_ID", int) or 0, step)
    return _checked(LaunchInfo("slurm", envs.launcher("SLURM_PROCID", int), ntasks,
                               envs.launcher("SLURM_LOCALID", int) or 0, f"tcp://{host}:{port}"),
                    "SLURM_PROCID", size_name, "SLURM_LOCALID")


_MPI_LAUNCH: Optional[LaunchInfo] = None


def _mpi_launch() -> LaunchInfo:
    """Rank 0 picks its host name and a free port and broadcasts them with mpi4py (once per process)."""
    global _MPI_LAUNCH
    if _MPI_LAUNCH is not None:
        return _MPI_LAUNCH
    variable = next(f"{name}={envs.launcher(name)}" for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
                    if envs.launcher(name) is not None)
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RendezvousError(f"started by mpirun (launcher variable {variable}) but mpi4py is missing: pip install "
                              f"'ep-runtime[mpi]' (scripts/setup_mpi.sh installs Open MPI and mpi4py)") from err
    except RuntimeError as err:  # mpi4py installed, but no MPI library it can load: its multi-line message
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise RendezvousError(f"started by mpirun (launcher variable {variable}) but mpi4py cannot load an MPI "
                              f"library ({lines[min(1, len(lines) - 1)]}): install the MPI that launched the job (scripts/setup_mpi.sh "
                              f"installs Open MPI), or point MPI4PY_LIBMPI at its libmpi.so") from err
    comm = MPI.COMM_WORLD
    # mpi4py built for another MPI than the Open MPI mpirun that started us (or the variable left over from
    # one): every rank is a singleton, rank 0 of 1, and each would run the whole job alone.
    size = envs.launcher("OMPI_COMM_WORLD_SIZE", int)
    if size is not None and size != comm.Get_size():
        library = MPI.Get_library_version().strip().split(",")[0]
        raise ValueError(f"launcher variable OMPI_COMM_WORLD_SIZE={size}, but MPI (mpi4py on {library}) sees "
                         f"{comm.Get_size()} rank(s): mpi4py was built for another MPI than the mpirun that started "
                         f"this process, or OMPI_COMM_WORLD_SIZE was left over from another job; allowed: mpi4py of "
                         f"the launching MPI (pip install --no-binary mpi4py mpi4py), or unset OMPI_COMM_WORLD_SIZE")
    address = None
    if comm.Get_rank() == 0:
        address = (envs.launcher("MASTER_ADDR") or socket.gethostname(), free_port())
    host, port = comm.bcast(address, root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    local.Free()
    _MPI_LAUNCH = LaunchInfo("mpi", comm.Get_rank(), comm.Get_size(), local_rank, f"tcp://{host}:{port}")
    return _MPI_LAUNCH


def check_timeout(timeout_s, name: str = "timeout_s") -> float:
    """timeout_s as float seconds, or an error naming the argument `name`: a finite number in the range of
    EP_RUNTIME_TIMEOUT_S (an infinite or NaN timeout would let a job hang forever)."""
    knob = envs.KNOBS[envs.PREFIX + "TIMEOUT_S"]
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real):  # numpy's numbers too
        raise TypeError(f"{name}={timeout_s!r} must be a number of seconds (int or float)")
    if not knob.minimum <= timeout_s <= knob.maximum:  # False for NaN too
        raise ValueError(f"{name}={timeout_s!r}; allowed: {knob.minimum:g} <= seconds <= {knob.maximum:g} "
                         f"(the range of {knob.name})")
    return float(timeout_s)


_CREATED_HERE = False
_MADE_HERE: Optional[weakref.ref] = None  # the default group init_distributed made last
_RENDEZVOUS: dict = {}  # (init_method, MASTER_ADDR, MASTER_PORT, rank, world_size) -> [store, groups made on it]


def _rendezvous(launch: LaunchInfo, timeout: timedelta) -> dist.Store:
    """The launcher's rendezvous store, with keys of its own for each group made on it.

    torch's init_process_group writes every default group's addresses under the same keys, and the
    store can outlive a group (torchrun's agent hosts it for the whole job; rank 0's is shared within
    its process): a group made after destroy_distributed() then read a peer's address of the group
    before and failed with gloo's "Connect timeout". The store is kept for the process (as torchrun's
    agent keeps its own), and every rank makes its groups in the same order, so the n-th group of each
    rank meets under the n-th prefix."""
    key = (launch.init_method, envs.launcher("MASTER_ADDR"), envs.launcher("MASTER_PORT"), launch.rank, launch.world_size)
    if key not in _RENDEZVOUS:
        try:
            store, _, _ = next(dist.rendezvous(launch.init_method, launch.rank, launch.world_size, timeout=timeout))
        except (dist.DistNetworkError, dist.DistStoreError) as err:  # torch's message names no variable
            if "EADDRINUSE" in str(err):
                raise RendezvousError(f"rank {launch.rank} cannot host the rendezvous: {_port_origin(launch)} is in use "
                                      f"on this host (by another job, or a process left over from one)") from err
            first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
            waited = isinstance(err, dist.DistStoreError)
            what = "waited in vain for the other ranks of its" if waited else "cannot reach the rendezvous of its"
            hint = (f"were all {launch.world_size} ranks started, with the same address?" if waited else
                    "is that host up, reachable from here, and rank 0's?")
            raise RendezvousError(f"rank {launch.rank} {what} {launch.launcher} job of {launch.world_size} ranks "
                                  f"({_address_origin(launch)}) within {timeout.total_seconds():g} s "
                                  f"({envs.PREFIX}TIMEOUT_S): {first}; {hint}") from err
        _RENDEZVOUS[key] = [store, 0]
    store, made = _RENDEZVOUS[key]
    _RENDEZVOUS[key][1] += 1
    store.set_timeout(timeout)
    return dist.PrefixStore(f"ep_runtime/group{made}", store)


def _address_origin(launch: LaunchInfo) -> str:
    """The rendezvous address of `launch` and the variables it came from."""
    if launch.init_method == "env://" or (envs.launcher("MASTER_ADDR") and launch.launcher != "mpi"):
        return f"MASTER_ADDR={envs.launcher('MASTER_ADDR')} MASTER_PORT={envs.launcher('MASTER_PORT')}"
    if launch.launcher == "slurm":
        nodelist = next(name for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", None)
                        if name is None or envs.launcher(name) is not None)
        host = f"the first host of {nodelist}={envs.launcher(nodelist)}" if nodelist else "localhost (no node list)"
        return f"{launch.init_method}: {host}, {_port_origin(launch)}"
    return f"{launch.init_method}: {_port_origin(launch)}"


def _port_origin(launch: LaunchInfo) -> str:
    """Where the rendezvous port of `launch` came from, and how to choose another."""
    if envs.launcher("MASTER_PORT") is not None and launch.launcher != "mpi":
        return f"MASTER_PORT={envs.launcher('MASTER_PORT')} (export a free port instead)"
    port = launch.init_method.rsplit(":", 1)[-1]
    if launch.launcher == "slurm":
        return (f"port {port}, derived from SLURM_JOB_ID={envs.launcher('SLURM_JOB_ID')} and "
                f"SLURM_STEP_ID={envs.launcher('SLURM_STEP_ID')} (export MASTER_PORT to choose a free one)")
    return f"port {port}, free when rank 0 picked it a moment before (start the job again)"


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> dist.ProcessGroup:
    """Initialise the default process group from the launcher's environment and return it.

    Safe to call twice (the second call checks timeout_s and backend, and returns the existing group; a timeout_s
    other than the one the group was made with here is an error, as torch cannot change a group's timeout). A group
    the caller made (dist.init_process_group, as torchtitan and SGLang do) is returned as it is, never destroyed here;
    timeout_s then bounds ep-runtime's own waits (the group keeps the timeout it was made with). Sets the
    CUDA device from the local rank. backend: None (nccl with CUDA, gloo without), "nccl", "gloo" or "mpi". timeout_s: how
    long a collective waits for a missing rank (EP_RUNTIME_TIMEOUT_S).
    """
    global _CREATED_HERE
    given = check_timeout(timeout_s) if timeout_s is not None else None  # checked on a second call too
    global _TIMEOUT_S, _MADE_HERE
    if backend not in (None, "nccl", "gloo", "mpi"):  # checked on a second call too (it was returned the group)
        raise ValueError(f"backend={backend!r}; allowed: None (nccl with CUDA, gloo without), nccl, gloo, mpi")
    if dist.is_initialized():
        existing = str(dist.get_backend())  # "gloo", or a device map such as "cuda:nccl,cpu:gloo"
        if backend is not None and backend not in re.split(r"[:,]", existing):
            raise ValueError(f"backend={backend!r}, but the default process group exists with backend {existing!r}; "
                             f"allowed: None or {existing!r} (it is returned as it is), or ep.destroy_distributed() "
                             f"first to make a {backend} group")
        made_here = _MADE_HERE is not None and _MADE_HERE() is dist.group.WORLD
        if given is not None and not made_here:  # the caller's group: its own timeout is set; ours take this one
            _TIMEOUT_S = given
        elif given is not None and given != _TIMEOUT_S:  # our group was made with its timeout: it cannot change
            raise ValueError(f"timeout_s={timeout_s!r}, but the default process group exists with timeout_s="
                             f"{_TIMEOUT_S:g}; allowed: None or {_TIMEOUT_S:g} (it is returned as it is), or "
                             f"ep.destroy_distributed() first to make a group with timeout_s={timeout_s!r}")
        return dist.group.WORLD
    launch = detect_launch()
    check_rendezvous(launch)
    knob_error = None
    try:
        envs.validate_all(warn=launch.rank == 0)  # unknown EP_RUNTIME_* variables: one warning per job
    except ValueError as err:
        if launch.launcher == "single":
            raise
        # A bad value on this rank only: its peers would wait in the rendezvous until their timeout, then read that
        # a rank never started. Joined first, every rank raises naming this rank and the value (below).
        knob_error = err
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend='nccl' needs CUDA; this process sees no GPU (use backend='gloo')")
    if given is not None:
        ours = given
    elif envs.problem_of("TIMEOUT_S"):  # (a bad value is this rank's knob_error, raised on every rank below)
        ours = envs.KNOBS[envs.PREFIX + "TIMEOUT_S"].default
    else:
        ours = envs.get("TIMEOUT_S")
    timeout = timedelta(seconds=ours)
    kwargs = {}
    if use_cuda:
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device
    if backend == "nccl":  # our own waits give up after `ours`; NCCL's watchdog only backs them up
        nccl_watchdog_settings()
        timeout = timedelta(seconds=nccl_group_timeout(ours))
    if launch.launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
    else:
        # (the MPI backend meets through MPI itself: torch ignores a store there, so none is made)
        meet = dict(init_method=launch.init_method) if backend == "mpi" else dict(store=_rendezvous(launch, timeout))
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **meet,
                                **kwargs)
    _FAILED.clear()  # a new default group: earlier failures were of the old one
    if not _CREATED_HERE:
        atexit.register(destroy_distributed)
    _CREATED_HERE = True
    _MADE_HERE = weakref.ref(dist.group.WORLD)
    _TIMEOUT_S = ours
    if launch.launcher != "single":
        from ep_runtime.dispatchers.base import agree_before_collectives
        try:  # every rank's knob check, one small all_gather: a rank's bad value fails every rank here, at once
            agree_before_collectives(dist.group.WORLD, dist.get_world_size(), knob_error,
                                     "every rank stops in init_distributed; the group is destroyed",
                                     **envs.values_on_every_rank())  # the knobs that must agree: in the same gather
        except ValueError as err:
            destroy_distributed()
            raise KnobsError(str(err)) from None
        except Exception:
            destroy_distributed()
            raise
    return dist.group.WORLD


# Seconds NCCL's watchdog waits beyond EP_RUNTIME_TIMEOUT_S before it acts on a collective itself: our
# own waits (the count-table read, the deferred check, synchronize()) run out first, abort the group
# and raise; the watchdog is left for waits that are not ours (a user's .item() on a layer's output).
NCCL_WATCHDOG_MARGIN_S = 30.0
_TIMEOUT_S: Optional[float] = None  # the timeout init_distributed was given (None: the knob's)


def nccl_group_timeout(timeout_s: float) -> float:
    """The timeout an NCCL group gets: ours plus NCCL_WATCHDOG_MARGIN_S, so NCCL's watchdog never
    acts on a collective before our own deadline for it has run out."""
    return timeout_s + NCCL_WATCHDOG_MARGIN_S


def timeout_s() -> float:
    """Seconds our waits for other ranks last: init_distributed's timeout_s, else EP_RUNTIME_TIMEOUT_S."""
    return _TIMEOUT_S if _TIMEOUT_S is not None else envs.get("TIMEOUT_S")


def nccl_watchdog_settings() -> dict[str, str]:
    """Give torch's NCCL watchdog settings that neither beat nor slow our own timeout, unless the user
    set them (their values win); returns the values in force. Read by ProcessGroupNCCL when a group
    is created, so init_distributed calls this first.

    - TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly): when a collective outlives the group's timeout
      (ours + NCCL_WATCHDOG_MARGIN_S: only waits that are not ours get there), the watchdog aborts
      the communicator, which ends the stuck kernel, and leaves the process alive, so the next call
      on the group raises in Python. torch's default (3) ends the process from a C++ thread instead.
    - TORCH_NCCL_DUMP_ON_TIMEOUT=0 and TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC=500: no flight-recorder
      dump, and the watchdog's grace before it aborts (4x that wait) is 2 s instead of 60 s.
      EP_RUNTIME_NCCL_DUMP_ON_TIMEOUT=1 keeps torch's dump and its grace (and our own abort writes a
      dump first).
    """
    values = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": envs.set_torch_nccl_default("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")}
    if not envs.get("NCCL_DUMP_ON_TIMEOUT"):
        values["TORCH_NCCL_DUMP_ON_TIMEOUT"] = envs.set_torch_nccl_default("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
        values["TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"] = envs.set_torch_nccl_default(
            "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "500")
    return values


def destroy_distributed() -> None:
    """Destroy the default process group if one exists (idempotent), then wait until gloo's worker
    threads have released their last work (see the module doc: a thread still doing so when the
    interpreter shuts down aborts the process). Free CUDA graphs that captured collectives of the
    group first: NCCL waits for their work to be released when it destroys the communicator."""
    global _TIMEOUT_S
    _TIMEOUT_S = None
    if dist.is_available() and dist.is_initialized():
        from ep_runtime.dispatchers.overlap import release_workers
        from ep_runtime.dispatchers.peer_transport import release_transports
        release_transports()  # their symmetric memory belongs to the group
        release_workers()  # each exchange thread holds its group
        if _current_failures():  # a group was aborted after a peer failed: nothing to flush, and a wait could hang
            abort_group(None)
        else:
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


def global_rank(group, rank: int) -> int:
    """The global rank of rank `rank` of `group` (the same number in the default group, or without one)."""
    if group is None or group is dist.GroupMember.WORLD or not (dist.is_available() and dist.is_initialized()):
        return rank
    try:
        return dist.get_global_rank(group, rank)
    except (ValueError, RuntimeError):  # not a group of this process's default group
        return rank


def rank_name(group, rank: int, size: Optional[int] = None) -> str:
    """'rank r' (size given: 'rank r of n') for rank r of `group`, with its global rank where the two differ
    ('rank 1 of 2 (global rank 3)': a subgroup, such as a dp x ep DeviceMesh's ep group), so a message
    names the process a log shows."""
    g = global_rank(group, rank)
    return f"rank {rank}" + ("" if size is None else f" of {size}") + ("" if g == rank else f" (global rank {g})")


def ranks_name(group, ranks: Sequence[int], size: Optional[int] = None) -> str:
    """rank_name for several ranks of `group`: 'ranks 0, 2' (size given: 'ranks 0, 2 of 3'), with their global
    ranks where those differ ('ranks 0, 2 of 3 (global ranks 1, 3)'); one rank: rank_name's words."""
    if len(ranks) == 1:
        return rank_name(group, ranks[0], size)
    named = f"ranks {', '.join(map(str, ranks))}" + ("" if size is None else f" of {size}")
    global_ranks = [global_rank(group, r) for r in ranks]
    return named if global_ranks == list(ranks) else f"{named} (global ranks {', '.join(map(str, global_ranks))})"


def _peers(rank: int, size: int, group=None) -> str:
    """The rank(s) of `group` that did not answer, as far as a collective can tell: the other rank of a
    2-rank group; otherwise any of the others (neither gloo nor NCCL says which)."""
    others = [r for r in range(size) if r != rank]
    return ranks_name(group, others) if len(others) == 1 else f"one or more of {ranks_name(group, others)}"


# What NCCL says once its communicator was aborted (by NCCL's watchdog, after the group's timeout).
_NCCL_ABORTED = re.compile(r"communicator was aborted|watchdog caught collective operation timeout", re.IGNORECASE)


@contextmanager
def naming_peer_failures(dispatcher, operation: str) -> Iterator[None]:
    """Re-raise a collective's timeout or lost connection inside the block as a PeerFailure that
    says which dispatcher and operation waited, for which rank(s), and which knob sets the wait
    (EP_RUNTIME_TIMEOUT_S); every other error passes through unchanged. `dispatcher` gives name,
    rank and world_size. (A per-call path writes try/except RuntimeError: raise_peer_failure instead: a
    generator context manager costs microseconds of host time per call.)"""
    try:
        yield
    except RuntimeError as exc:  # torch's DistBackendError is a RuntimeError
        raise_peer_failure(dispatcher, operation, exc)


def raise_peer_failure(dispatcher, operation: str, exc: RuntimeError) -> NoReturn:
    """Raise exc (a RuntimeError caught around a dispatcher's `operation`) as naming_peer_failures does: a
    collective's timeout or lost connection as a PeerFailure, anything else as it is."""
    text = str(exc)
    timed_out, gone, aborted = _PEER_TIMEOUT.search(text), _PEER_GONE.search(text), _NCCL_ABORTED.search(text)
    if isinstance(exc, PeerFailure) or not (timed_out or gone or aborted):
        raise exc
    rank, size, group = dispatcher.rank, dispatcher.world_size, getattr(dispatcher, "group", None)
    peers = _peers(rank, size, group)
    knob = envs.PREFIX + "TIMEOUT_S"
    # A subgroup (new_group, a DeviceMesh dimension) keeps the timeout torch gave it when it was made (without
    # timeout=: torch's default, 30 min on gloo), which neither the knob nor init_distributed sets.
    subgroup = _group_key(group) != "WORLD"
    if aborted:
        what = (f"waited in vain for {peers}: the group's NCCL communicator was aborted by NCCL's watchdog, "
                f"after a collective failed or outlived the group's timeout ({knob} + "
                f"{NCCL_WATCHDOG_MARGIN_S:g} s) in a wait outside ep-runtime (e.g. a read of an earlier output); "
                f"that rank stalled, died, or took a different code path")
    elif gone:
        limit = "the subgroup's timeout" if subgroup else knob
        what = (f"lost its connection to {peers}: that rank's process ended (see its own error first); "
                f"a rank that stalls instead is given up on after {limit}")
    else:
        waited = _WAITED_MS.search(text)
        limit = f"{int(waited.group(1)) / 1000:g} s" if waited else f"{envs.get('TIMEOUT_S'):g} s by default"
        setting = (f"set it with {knob} or init_distributed(timeout_s=...)" if not subgroup else
                   "a subgroup's own, given when it is made: dist.new_group(ranks, timeout=...)")
        what = (f"waited in vain for {peers}: no answer within the group's timeout ({limit}; {setting}); "
                f"that rank stalled, died, or took a different code path")
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    raise PeerFailure(f"{dispatcher.name} {operation} on {rank_name(group, rank, size)} {what}. Backend error: "
                      f"{first_line}") from exc


# ---------------------------------------------------------------- bounded waits on the device (NCCL)
#
# On NCCL a collective is queued on the GPU and returns at once; the host waits only where it reads a
# result. Each such wait of ours polls a CUDA event (query() and short sleeps, never a blocking
# synchronize) until EP_RUNTIME_TIMEOUT_S after the collective was issued. On expiry the group's
# communicator is aborted (ncclCommAbort through torch: NCCL's kernels waiting for the missing rank
# see the abort flag and return, so the stream drains and nothing later waits on them), the group is
# recorded as failed (later calls through ep-runtime raise at once instead of queueing work on it),
# and a PeerFailure is raised on this rank. Every survivor waits on its own copy of the collective, so
# every survivor raises.

_FAILED: dict = {}  # group (or "WORLD" for the default group) -> the PeerFailure message that ended it
_FAILED_UNDER = None  # the default group in place when those were recorded
ABORT_WAIT_S = 4.0  # how long a failing wait waits for the abort before it raises anyway
_ABORTING: Optional[threading.Thread] = None  # the abort under way (or the last one)


def _group_key(group):
    return "WORLD" if group is None or group is dist.GroupMember.WORLD else group


def check_group(group, name: str, operation: str, world_size: int = 1) -> None:
    """Raise a PeerFailure at once when an earlier wait gave up on this group (its communicator is
    aborted: anything queued on it would fail or hang); raise a RuntimeError when the group of a layer of
    several ranks (world_size; group None: the default group) was destroyed. A destroyed gloo group still
    ran collectives: a layer used after destroy_distributed() went on exchanging over it, with no error."""
    if world_size > 1 and _destroyed(group):
        which = "the default process group" if group is None else "its process group"
        raise RuntimeError(f"{name} {operation}: {which} was destroyed (ep.destroy_distributed() or "
                           f"dist.destroy_process_group()) after the layer was built; allowed: a layer on a live "
                           f"group: call ep.init_distributed() and build the layer again")
    if _current_failures():
        earlier = _FAILED.get(_group_key(group)) or _FAILED.get("WORLD")  # aborting WORLD aborted every group
        if earlier is not None:
            raise PeerFailure(f"{name} {operation}: this group failed earlier and its communicator was aborted; "
                              f"rebuild the process group (and the layer) to go on. The earlier failure: {earlier}")


def _destroyed(group) -> bool:
    """Whether `group` (None: the default group) is no longer one of torch's live process groups."""
    if group is None:
        return not dist.is_initialized()
    live = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)  # None: unknown, unchecked
    return isinstance(group, dist.ProcessGroup) and live is not None and group not in live


def wait_on_device(event: "torch.cuda.Event", *, issued_at: float, group, name: str, operation: str,
                   rank: int, world_size: int, waited_for: str = "the count table's all_gather",
                   limit_s: Optional[float] = None, setting: Optional[str] = None) -> None:
    """Return once `event` has completed; raise PeerFailure (after aborting the group) when it has not
    completed EP_RUNTIME_TIMEOUT_S (or limit_s, set as `setting` says) after `issued_at` (time.monotonic()
    when the awaited collective was queued). Polls: queries alone for the first 2 ms (the usual wait is tens
    of microseconds, and a blocking synchronize spins too), then with sleeps of 50 us until 20 ms, then of 1 ms."""
    if event.query():
        return
    limit = timeout_s() if limit_s is None else limit_s
    deadline = issued_at + limit
    start = time.monotonic()
    while not event.query():
        now = time.monotonic()
        if now >= deadline:
            if event.query():
                return
            knob = envs.PREFIX + "TIMEOUT_S"
            message = (f"{name} {operation} on {rank_name(group, rank, world_size)} waited in vain for "
                       f"{_peers(rank, world_size, group)}: {waited_for} had not completed {now - issued_at:.1f} s after it "
                       f"was issued (the timeout is {limit:g} s; "
                       f"{setting or f'set it with {knob} or init_distributed(timeout_s=...)'}); that rank stalled, died, or took a different code path. "
                       f"The group's NCCL communicator has been aborted, so no later call waits on it")
            done = abort_group(group, message)
            if not done:
                message += (f" (or so it was asked: the abort had not finished after {ABORT_WAIT_S:g} s, or it failed; "
                            f"ep-runtime queues nothing more on this group either way)")
            raise PeerFailure(message)
        if now - start > 0.002:
            time.sleep(50e-6 if now - start < 0.02 else 1e-3)


def synchronize(group, name: str, rank: int, world_size: int, operation: str = "synchronize") -> None:
    """Wait, bounded by EP_RUNTIME_TIMEOUT_S, until the work queued so far on the current CUDA stream
    has finished (e.g. a replayed CUDA graph holding a layer's exchange); on expiry abort the group
    and raise PeerFailure. Nothing to wait for on CPU ranks (gloo's collectives wait themselves)."""
    check_group(group, name, operation, world_size)
    if not dist.is_initialized() or dist.get_backend(group) != "nccl" or torch.cuda.is_current_stream_capturing():
        return
    event = torch.cuda.Event()
    event.record()
    wait_on_device(event, issued_at=time.monotonic(), group=group, name=name, operation=operation, rank=rank,
                   world_size=world_size, waited_for="the work queued on the current CUDA stream")


def record_failure(group, message: str) -> None:
    """Record `group` as failed without an abort (a group with no NCCL communicator): later calls
    through ep-runtime raise at once (check_group)."""
    global _FAILED_UNDER
    if not _current_failures():
        _FAILED_UNDER = dist.GroupMember.WORLD
    _FAILED[_group_key(group)] = message


def _current_failures() -> dict:
    """_FAILED, emptied first when a default group other than the one it was recorded under exists
    (dist.init_process_group after a destroy or an abort, as a long-lived server re-initialises): the
    groups of that time went with their default group, and none made since has failed."""
    if _FAILED and dist.is_initialized() and dist.GroupMember.WORLD is not _FAILED_UNDER:
        _FAILED.clear()
    return _FAILED


def abort_group(group, message: Optional[str] = None) -> bool:
    """Abort `group`'s communicator (None: the default group, and with it every group) through torch's
    abort path, which ends NCCL's kernels still waiting; record the group as failed (with `message`).
    The abort runs on a helper thread and is waited for at most ABORT_WAIT_S, so a failing wait stays
    bounded even if NCCL's abort stalls. Returns True when the abort finished."""
    global _ABORTING
    key = _group_key(group)
    if message is not None:
        record_failure(group, message)
    wait_s = ABORT_WAIT_S + (30.0 if envs.get("NCCL_DUMP_ON_TIMEOUT") else 0.0)
    if _ABORTING is not None and _ABORTING.is_alive():  # never two aborts of one communicator at once
        _ABORTING.join(wait_s)
        return not _ABORTING.is_alive()
    if key == "WORLD" and not dist.is_initialized():
        return True
    errors: list = []

    def run() -> None:
        try:
            if envs.get("NCCL_DUMP_ON_TIMEOUT"):
                _dump_flight_recorder()
            c10d = dist.distributed_c10d
            if hasattr(c10d, "_abort_process_group"):  # torch >= 2.5: every backend of the group
                c10d._abort_process_group(None if key == "WORLD" else group)
            else:
                pg = dist.GroupMember.WORLD if key == "WORLD" else group
                backend = pg._get_backend(torch.device("cuda")) if hasattr(pg, "_get_backend") else pg
                backend.abort()
        except Exception as exc:  # noqa: BLE001 - already gone, or no abort here: reported below
            errors.append(exc)

    _ABORTING = threading.Thread(target=run, name="ep_runtime_abort", daemon=True)
    _ABORTING.start()
    _ABORTING.join(wait_s)
    return not _ABORTING.is_alive() and not errors


def _dump_flight_recorder() -> None:
    """Write torch's NCCL flight recorder where its watchdog would (TORCH_NCCL_DEBUG_INFO_TEMP_FILE +
    global rank), before our abort discards it. Best effort: nothing when torch has no recorder."""
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is None or not dist.is_initialized():
        return
    prefix = envs.torch_nccl("TORCH_NCCL_DEBUG_INFO_TEMP_FILE") or "/tmp/nccl_trace_rank_"
    with open(f"{prefix}{dist.get_rank()}", "wb") as f:
        f.write(dump())
