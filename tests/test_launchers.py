"""`ep-runtime demo` joins a job started by each launcher: torchrun, mpirun (Open MPI + mpi4py) and
Slurm (sbatch + srun on a real one-node cluster on localhost, and on a real two-node cluster whose
nodes are network namespaces of this machine).

mpirun and Slurm come from scripts/setup_mpi.sh, scripts/setup_slurm.sh and
scripts/setup_slurm_nodes.sh, which install Debian's packages when root and start the clusters; a
test skips only where that is impossible (not root and not installed, no apt-get, no network
namespaces), with the script's reason. Where the scripts can run they must succeed.
"""
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ep_runtime import distributed

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: python, ep-runtime, torchrun
CANNOT_INSTALL = 2  # the setup scripts' exit code for "not possible here"


def launcher_free_env(**extra):
    """This environment without any launcher's variables (pytest itself may run under Slurm or MPI),
    with the venv first on PATH so jobs find its python and ep-runtime."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def setup(script, *args) -> str:
    """Run a setup script and return its output; skip with its reason when it says installing is
    impossible here."""
    out = subprocess.run([str(REPO / "scripts" / script), *args], capture_output=True, text=True, timeout=900,
                         env=launcher_free_env(VENV=str(BIN.parent)))
    if out.returncode == CANNOT_INSTALL:
        pytest.skip(out.stderr.strip() or f"{script}: cannot install here")
    assert out.returncode == 0, f"{script} {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def mpirun():
    setup("setup_mpi.sh")
    return "mpirun"


@pytest.fixture(scope="module")
def slurm():
    setup("setup_slurm.sh")


@pytest.fixture(scope="module")
def two_nodes():
    """The environment for jobs on scripts/setup_slurm_nodes.sh's cluster (nodes ep-node1 and ep-node2,
    each a network namespace), torn down after this module's tests. It has its own slurm.conf, named
    by SLURM_CONF, so the one-node cluster keeps /etc/slurm/slurm.conf and runs beside it whatever the
    order of the tests. The lock keeps another pytest session's teardown from removing the nodes
    under these tests."""
    with open("/tmp/ep-runtime-slurm-nodes-tests.lock", "w") as lock:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another pytest session has held the two-node cluster for 600 s")
                time.sleep(1)
        conf = re.search(r"^SLURM_CONF=(\S+)$", setup("setup_slurm_nodes.sh"), re.M)
        assert conf, "setup_slurm_nodes.sh did not say where its slurm.conf is"
        try:
            yield launcher_free_env(SLURM_CONF=conf.group(1))
        finally:
            setup("setup_slurm_nodes.sh", "down")
            netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
            assert "ep-node" not in netns, f"teardown left network namespaces behind:\n{netns}"


def assert_demo_ok(out, launcher):
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert re.search(rf"demo: joined a {launcher} job: 2 ranks, backend (gloo|nccl)", out.stdout), text
    assert out.stdout.rstrip().endswith("demo: OK"), text


def test_torchrun_runs_demo():
    # (torch.distributed.run is what the torchrun script runs; through this interpreter, the job runs this tree's
    # ep_runtime, whatever interpreter a copied venv's torchrun script names in its #! line)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(distributed.free_port()), "-m", "ep_runtime", "demo"],
                         capture_output=True, text=True, timeout=180, env=launcher_free_env(), cwd=REPO)
    assert_demo_ok(out, "torchrun")


def test_mpirun_runs_demo(mpirun):
    out = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
                          sys.executable, "-m", "ep_runtime", "demo"],
                         capture_output=True, text=True, timeout=180, env=launcher_free_env(), cwd=REPO)
    assert_demo_ok(out, "mpi")


def sbatch_wait(args, output: Path, timeout=300, env=None):
    """sbatch --wait; returns (exit code, job output). Cancels the job if it outlives `timeout`.
    `env` (default: launcher_free_env()) picks the cluster through SLURM_CONF."""
    env = env or launcher_free_env()
    cmd = ["sbatch", "--wait", "--parsable", f"--output={output}", "--time=5", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        job = stdout.strip().split(";")[0]
        state = ""
        if job:  # why it did not finish (e.g. pending for resources) goes into the failure
            state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                                   timeout=30, env=env).stdout
            subprocess.run(["scancel", job], timeout=30, env=env)
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (job {job}):\n{state}\n"
                    f"{output.read_text() if output.exists() else ''}")
    for _ in range(20):  # the output file can land a moment after sbatch --wait returns
        if output.exists() and output.stat().st_size:
            break
        time.sleep(0.1)
    text = output.read_text() if output.exists() else ""
    return proc.returncode, f"{text}\n--- sbatch ---\n{stdout}{stderr}"


def test_sbatch_runs_demo(slurm, tmp_path):
    code, text = sbatch_wait(["--ntasks=2", str(REPO / "slurm" / "ep_demo.sbatch")], tmp_path / "demo.out")
    assert code == 0, text
    assert re.search(r"demo: joined a slurm job: 2 ranks, backend (gloo|nccl)", text), text
    assert "demo: OK" in text, text


def ranks_per_host(text) -> dict[str, list[int]]:
    """The demo's `demo: ranks per host: ep-node1 [0, 1], ep-node2 [2, 3]` line as a dict."""
    line = re.search(r"^demo: ranks per host: (.*)$", text, re.M)
    assert line, text
    return {host: json.loads(ranks) for host, ranks in re.findall(r"(\S+) (\[[\d, ]*\])", line.group(1))}


def test_sbatch_runs_demo_on_two_nodes(two_nodes, tmp_path):
    # srun starts every rank; they meet at the first node of the step (ep-node1), whose name must
    # resolve to an address that the ranks on ep-node2 reach. Host names are the nodes' own (each
    # slurmd runs in a UTS namespace), so the ranks say where they ran.
    code, text = sbatch_wait(["--nodes=2", "--ntasks=4", "--ntasks-per-node=2",
                              str(REPO / "slurm" / "ep_demo.sbatch")], tmp_path / "demo.out", env=two_nodes)
    assert code == 0, text
    assert re.search(r"demo: joined a slurm job: 4 ranks, backend gloo", text), text
    assert ranks_per_host(text) == {"ep-node1": [0, 1], "ep-node2": [2, 3]}, text  # srun's block distribution
    assert "demo: OK" in text, text


def test_sbatch_multinode_template_runs_demo_on_two_nodes(two_nodes, tmp_path):
    # One torchrun per node, 2 CPU workers each (GPUS_PER_NODE overrides the one task per node), c10d
    # rendezvous on ep-node1. Which node's workers get ranks 0-1 is the rendezvous' choice.
    code, text = sbatch_wait(["--nodes=2", "--ntasks-per-node=1", "--export=ALL,GPUS_PER_NODE=2",
                              str(REPO / "slurm" / "ep_multinode.sbatch")], tmp_path / "multinode.out", env=two_nodes)
    assert code == 0, text
    assert re.search(r"demo: joined a torchrun job: 4 ranks, backend gloo", text), text
    hosts = ranks_per_host(text)
    assert sorted(hosts) == ["ep-node1", "ep-node2"] and sorted(hosts.values()) == [[0, 1], [2, 3]], text
    assert "demo: OK" in text, text


# ---------------------------------------------------------------- detection from the variables

def test_first_slurm_host_parses_node_lists():
    assert distributed.first_slurm_host("gpu[03-05,09],cpu1") == "gpu03"
    assert distributed.first_slurm_host("node7") == "node7"
    assert distributed.first_slurm_host("a-[1-2]") == "a-1"


def test_first_slurm_host_of_names_with_several_ranges():
    """Slurm expands every bracket of a name (`scontrol show hostnames 'rack[1-2]-n[07-08]'` starts with
    rack1-n07); only the first was, so the rendezvous host was 'rack1', a host of no node."""
    assert distributed.first_slurm_host("rack[1-2]-n[07-08]") == "rack1-n07"
    assert distributed.first_slurm_host("x[1-2]y[3-4],z") == "x1y3"
    assert distributed.first_slurm_host("c[3,1-2]n[5-6]") == "c3n5"


def clear_launcher_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "PMI_")) or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name)


def test_slurm_step_is_detected_with_port_from_job_id(monkeypatch):
    clear_launcher_variables(monkeypatch)
    for name, value in dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="1", SLURM_PROCID="3", SLURM_LOCALID="1",
                            SLURM_STEP_NUM_TASKS="4", SLURM_NTASKS="8",
                            SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_NODELIST="gpu[07-09]").items():
        monkeypatch.setenv(name, value)
    info = distributed.detect_launch()
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 3, 4, 1)
    assert info.init_method == f"tcp://gpu07:{distributed.slurm_port(4242, 1)}"
    assert 15000 <= distributed.slurm_port(4242, 1) < 30000
    assert distributed.slurm_port(4242, 1) != distributed.slurm_port(4242, 2)


def test_slurm_batch_script_without_srun_is_a_single_process(monkeypatch):
    # The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step: it must not wait
    # for a second rank that srun never started.
    clear_launcher_variables(monkeypatch)
    for name, value in dict(SLURM_JOB_ID="5", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="vm").items():
        monkeypatch.setenv(name, value)
    assert distributed.detect_launch().launcher == "single"


def test_torchrun_variables_win_over_slurm(monkeypatch):
    clear_launcher_variables(monkeypatch)
    for name, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", SLURM_STEP_ID="0", SLURM_PROCID="0",
                            SLURM_JOB_ID="9").items():
        monkeypatch.setenv(name, value)
    info = distributed.detect_launch()
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.init_method) == \
        ("torchrun", 5, 8, 1, "env://")


@pytest.mark.parametrize("env,variable", [
    (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"), "WORLD_SIZE=2"),
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="4"), "SLURM_STEP_NUM_TASKS=4"),
    (dict(OMPI_COMM_WORLD_SIZE="2"), "OMPI_COMM_WORLD_SIZE=2"),
])
def test_sharded_layer_without_a_group_in_a_launched_job_names_init_distributed(monkeypatch, env, variable):
    """`torchrun --nproc-per-node 2 script.py` whose script builds its layer before (or without)
    ep.init_distributed(): each rank held every expert and ran alone, with no error."""
    import torch

    import ep_runtime as ep
    clear_launcher_variables(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=rf"dispatcher='deepep_normal' .*{variable}.*call ep.init_distributed\(\)"):
        ep.EPMoE(8, 2, 16, 24, dispatcher="deepep_normal")
    with pytest.raises(RuntimeError, match=rf"dispatcher='mori' .*{variable}"):
        ep.dispatchers.create("mori", ep.MoeConfig(8, 2, 16, 24))
    layer = ep.EPMoE(8, 2, 16, 24, dispatcher="standard")  # every rank holds every expert anyway
    assert layer(torch.randn(3, 16), router_logits=torch.randn(3, 8)).shape == (3, 16)
    clear_launcher_variables(monkeypatch)  # a plain process (or a one-task srun step) runs alone
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert ep.EPMoE(8, 2, 16, 24, dispatcher="deepep_normal").placement.ep_size == 1


@pytest.mark.parametrize("env,local_rank", [
    (dict(SLURM_STEP_ID="3", SLURM_PROCID="3", SLURM_LOCALID="1"), 1),
    (dict(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1"), 1),
    (dict(SLURM_STEP_ID="3", SLURM_LOCALID="1", LOCAL_RANK="0"), 0),  # torchrun's own wins
    (dict(SLURM_LOCALID="1"), 0),  # a batch script (no step) is not a rank of the node
    # Open MPI's mpirun in an allocation: SLURM_LOCALID is the daemon step's (0 on every rank of a node)
    (dict(SLURM_STEP_ID="0", SLURM_LOCALID="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1"), 1),
])
def test_hand_set_rank_and_world_size_take_the_launchers_local_rank(monkeypatch, env, local_rank):
    """srun (or mpirun) running a script that exports RANK and WORLD_SIZE but not LOCAL_RANK: every
    rank got local rank 0, so every rank of a node took cuda:0."""
    clear_launcher_variables(monkeypatch)
    for name, value in dict(env, RANK="3", WORLD_SIZE="4").items():
        monkeypatch.setenv(name, value)
    info = distributed.detect_launch()
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("torchrun", 3, 4, local_rank)


@pytest.mark.parametrize("pmi,launcher", [
    (dict(PMI_SIZE="4", PMI_RANK="3"), "mpi"),  # mpiexec's proxy started this rank
    (dict(PMI_SIZE="2", PMI_RANK="1"), "slurm"),  # srun --mpi=pmi2 started it: the same numbers
])
def test_mpich_mpiexec_under_slurm_is_an_mpi_launch(monkeypatch, pmi, launcher):
    """MPICH's (and Intel MPI's) mpiexec in an allocation of 2 nodes: srun starts one proxy per node
    (a step of 2 tasks), each proxy starts its node's 2 ranks, and every rank inherits its proxy's
    SLURM_PROCID. Each rank was taken for Slurm rank 1 of 2 (or 0 of 2): two ranks per number, four
    processes in a group of two. PMI's numbers disagree with Slurm's there; the rank is MPI's."""
    if launcher == "mpi":
        pytest.importorskip("mpi4py", reason="an MPI launch needs mpi4py (scripts/setup_mpi.sh)")
    clear_launcher_variables(monkeypatch)
    monkeypatch.setattr(distributed, "_MPI_LAUNCH", None)  # this process's MPI launch is made afresh
    for name, value in dict(pmi, SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_LOCALID="0",
                            SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="n[1-2]").items():
        monkeypatch.setenv(name, value)
    assert distributed.detect_launch().launcher == launcher


@pytest.mark.parametrize("name", ["OMPI_COMM_WORLD_SIZE"])
def test_mpi_size_that_mpi_does_not_see_fails_naming_it(monkeypatch, name):
    """mpi4py built for another MPI than the launching mpirun (or the variable left over from another job):
    MPI saw a singleton, and `ep-runtime demo` ran as 'a mpi job: 1 ranks', each rank alone. Now an error
    naming the variable, its value and the size MPI sees."""
    pytest.importorskip("mpi4py", reason="an MPI launch needs mpi4py (scripts/setup_mpi.sh)")
    clear_launcher_variables(monkeypatch)
    monkeypatch.setattr(distributed, "_MPI_LAUNCH", None)  # this process's MPI launch is made afresh
    monkeypatch.setenv(name, "2")
    with pytest.raises(ValueError, match=rf"launcher variable {name}=2, but MPI \(mpi4py on .*\) sees 1 rank\(s\)"):
        distributed.detect_launch()
    assert distributed._MPI_LAUNCH is None


@pytest.mark.parametrize("env,match", [
    (dict(RANK="3", WORLD_SIZE="2"), r"RANK=3; allowed: 0\.\.1 \(WORLD_SIZE=2\)"),
    (dict(RANK="-1", WORLD_SIZE="2"), r"RANK=-1; allowed: 0\.\.1 \(WORLD_SIZE=2\)"),
    (dict(RANK="0", WORLD_SIZE="0"), r"WORLD_SIZE=0; allowed: an int >= 1"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="-2"), r"LOCAL_RANK=-2; allowed: an int >= 0"),
    (dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="notaport"),
     r"MASTER_PORT='notaport' is not a valid int"),
    (dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="70000"), r"MASTER_PORT=70000; allowed: 1\.\.65535"),
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="4", SLURM_NTASKS="4", SLURM_JOB_NODELIST="vm"),
     r"SLURM_PROCID=4; allowed: 0\.\.3 \(SLURM_NTASKS=4\)"),
    (dict(SLURM_STEP_ID="3", SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="4"),
     r"SLURM_PROCID=1; allowed: 0\.\.0 \(SLURM_STEP_NUM_TASKS=1\)"),
    # A Slurm step without its task count (a hand-made environment): rank 0 ran alone as a job of 1, with no error.
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_JOB_NODELIST="vm"),
     r"SLURM_PROCID=0 is set in a Slurm step \(SLURM_STEP_ID=0\) but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS"),
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="0"), r"SLURM_NTASKS=0; allowed: an int >= 1"),
    # The step's node list is the one read: the error named SLURM_JOB_NODELIST, which held a valid list.
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_STEP_NODELIST="a[1-2",
          SLURM_JOB_NODELIST="a[1-4]"), r"launcher variable SLURM_STEP_NODELIST='a\[1-2' is not a Slurm node list"),
    # Half of torchrun's variables (a hand-written launch): ran as a one-process job.
    (dict(RANK="1"), r"RANK=1 is set but WORLD_SIZE is not; torchrun sets both"),
    # RANK and WORLD_SIZE by hand without the address: torch's env:// raised from inside init_process_group.
    (dict(RANK="0", WORLD_SIZE="2"), r"MASTER_ADDR and MASTER_PORT not set while RANK=0 and WORLD_SIZE=2 are"),
    (dict(RANK="0", WORLD_SIZE="1", MASTER_PORT="29500"), r"variable MASTER_ADDR not set while RANK=0"),
    (dict(SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="abc"),
     r"SLURM_NTASKS='abc' is not a valid int; allowed: an integer \(Slurm: number of tasks\)"),
    (dict(WORLD_SIZE="2", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="1"), r"WORLD_SIZE=2 is set but RANK is not"),
])
def test_launcher_variables_outside_the_job_fail_at_once_naming_them(monkeypatch, env, match):
    """A rank outside [0, world size) waited at the rendezvous for the whole timeout, then failed with a
    connection error naming no variable; a bad MASTER_PORT failed inside torch with "invalid literal for
    int()". Now init_distributed raises at once, before any process group, naming the variable."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    clear_launcher_variables(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        distributed.init_distributed(backend="gloo", timeout_s=5)
    assert not dist.is_initialized()


def test_free_port_is_outside_the_ephemeral_range_and_never_repeats():
    """free_port's ports lie in 10000..14999: below the kernel's ephemeral range (a port there can be given to
    another process's outgoing connection before the rendezvous binds it: EADDRINUSE in CI) and the Slurm steps'
    ports; a seeded `random` (forked ranks share its state) does not make it repeat; each is free."""
    import random
    import socket

    ports = []
    for _ in range(20):
        random.seed(0)
        ports.append(distributed.free_port())
    assert len(set(ports)) == len(ports), ports
    assert all(10000 <= p < 15000 for p in ports), ports
    assert distributed.slurm_port(0, 0) >= 15000
    for port in ports[:3]:
        with socket.socket() as server:
            server.bind(("", port))


@pytest.mark.parametrize("master_port", [False, True])
def test_rendezvous_port_in_use_names_where_it_came_from(monkeypatch, master_port):
    """Rank 0 of a Slurm step whose port (derived from the job id, or MASTER_PORT) another process
    holds: torch's EADDRINUSE named the port only, not the variable that chose it."""
    import socket

    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    clear_launcher_variables(monkeypatch)
    with socket.socket() as holder:
        for job in range(1000, 2000):  # a job id whose derived port is free, then held here
            try:
                holder.bind(("", distributed.slurm_port(job, 0)))
                break
            except OSError:
                continue
        holder.listen()
        port = holder.getsockname()[1]
        env = dict(SLURM_JOB_ID=str(job), SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_NTASKS="1",
                   SLURM_JOB_NODELIST="localhost")
        if master_port:
            env.update(SLURM_JOB_ID="1", MASTER_PORT=str(port))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        expected = (f"MASTER_PORT={port} (export a free port instead)" if master_port else
                    f"port {port}, derived from SLURM_JOB_ID={job} and SLURM_STEP_ID=0 (export MASTER_PORT")
        with pytest.raises(RuntimeError, match=re.escape(f"rank 0 cannot host the rendezvous: {expected}")):
            distributed.init_distributed(backend="gloo", timeout_s=5)
    assert not dist.is_initialized()


@pytest.mark.parametrize("rank,message", [
    ("0", "rank 0 waited in vain for the other ranks of its torchrun job of 2 ranks (MASTER_ADDR=127.0.0.1 "
          "MASTER_PORT={port}) within 1 s (EP_RUNTIME_TIMEOUT_S): "),
    ("1", "rank 1 cannot reach the rendezvous of its torchrun job of 2 ranks (MASTER_ADDR=127.0.0.1 "
          "MASTER_PORT={port}) within 1 s (EP_RUNTIME_TIMEOUT_S): "),
])
def test_rendezvous_that_no_peer_joins_names_the_job_and_the_timeout(monkeypatch, rank, message):
    """A rank started alone (a srun step or a hand-set RANK/WORLD_SIZE of another job): rank 0 failed with
    torch's DistStoreError traceback ('1/2 clients joined'), another rank with DistNetworkError; neither named
    the job's size, its address variables or the knob that bounds the wait. Now a RendezvousError does."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    clear_launcher_variables(monkeypatch)
    port = distributed.free_port()
    for name, value in dict(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.RendezvousError, match=re.escape(message.format(port=port))):
        distributed.init_distributed(backend="gloo", timeout_s=1)
    assert not dist.is_initialized()


def test_slurm_rendezvous_that_cannot_be_reached_names_the_node_list(monkeypatch):
    """A srun step's (or another job's) variables whose node list names a host that does not answer: the error
    named tcp://host:port only; now also the variable the host came from and how the port was derived."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    clear_launcher_variables(monkeypatch)
    for name, value in dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="1", SLURM_PROCID="1", SLURM_NTASKS="2",
                            SLURM_JOB_NODELIST="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    port = distributed.slurm_port(4242, 1)
    with pytest.raises(distributed.RendezvousError, match=re.escape(
            f"rank 1 cannot reach the rendezvous of its slurm job of 2 ranks (tcp://127.0.0.1:{port}: the first host "
            f"of SLURM_JOB_NODELIST=127.0.0.1, port {port}, derived from SLURM_JOB_ID=4242 and SLURM_STEP_ID=1")):
        distributed.init_distributed(backend="gloo", timeout_s=1)
    assert not dist.is_initialized()


def test_init_distributed_again_meets_at_the_new_master_port(monkeypatch):
    """The rendezvous store kept for a re-made group is the one of the launcher's current address: a
    process told to meet elsewhere (MASTER_PORT changed) must not stay on the old store."""
    import socket

    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    clear_launcher_variables(monkeypatch)
    for name, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    for _ in range(2):
        port = distributed.free_port()
        monkeypatch.setenv("MASTER_PORT", str(port))
        try:
            distributed.init_distributed(backend="gloo", timeout_s=5)
            with socket.socket() as probe, pytest.raises(OSError):  # rank 0 hosts the store there now
                probe.bind(("127.0.0.1", port))
        finally:
            distributed.destroy_distributed()


def test_init_distributed_twice_returns_the_same_group(monkeypatch):
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    clear_launcher_variables(monkeypatch)
    try:
        group = distributed.init_distributed(backend="gloo")
        assert distributed.init_distributed() is group
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert distributed.device_for_rank().type == "cpu"
    finally:
        distributed.destroy_distributed()
    assert not dist.is_initialized()
    distributed.destroy_distributed()  # idempotent


# ---------------------------------------------------------------- destroy, then initialise again

REINIT_GROUPS = 8


def _reinit_rank(rank, world_size, env):
    """REINIT_GROUPS groups in a row through init_distributed / destroy_distributed, each checked with
    an all_reduce and a deepep_normal layer. Rank 0 is slow to come back each time, so rank 1 reaches
    the store first. (Whether rank 1 then dials the stale address depends on which side of the pair
    gloo makes connect, one chance in two per group: 7 re-made groups miss it 1 time in 128.)"""
    import torch
    import torch.distributed as dist

    import ep_runtime as ep
    dist.destroy_process_group()  # the harness's group: these are made as a launched job's are
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    sums = []
    for generation in range(REINIT_GROUPS):
        if rank == 0 and generation:
            time.sleep(0.15)
        group = ep.init_distributed(backend="gloo", timeout_s=2)
        x = torch.full((1,), float(rank + 1 + generation))
        dist.all_reduce(x)
        layer = ep.EPMoE(4, 2, 8, 8, dispatcher="deepep_normal", runner="torch", group=group)
        y = layer(torch.ones(3, 8), router_logits=torch.ones(3, 4))
        sums.append((x.item(), tuple(y.shape)))
        ep.destroy_distributed()
    return sums


def test_init_distributed_again_after_destroy_under_torchrun():
    """torchrun's workers meet on the agent's store, which outlives every group. torch writes each
    default group's addresses under the same keys, so the second group's rank 1 read rank 0's address
    of the first group and failed (gloo "Connect timeout"). Each group now has its own keys."""
    from datetime import timedelta

    import torch.distributed as dist

    from ep_runtime.testing import run_ranks
    port = distributed.free_port()
    agent = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)  # torchrun's agent's
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    try:
        sums = run_ranks(_reinit_rank, 2, env, timeout=60)
    finally:
        del agent
    assert sums[0] == sums[1] == [(3.0 + 2 * g, (3, 8)) for g in range(REINIT_GROUPS)]


def test_init_distributed_on_the_callers_group_takes_timeout_s(monkeypatch):
    """A framework made the group (torchtitan, SGLang); ep.init_distributed(timeout_s=7) returned it
    and dropped the 7: ep-runtime's waits (NCCL count table, NVLink transport) kept the knob's 300 s."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    clear_launcher_variables(monkeypatch)
    monkeypatch.delenv("EP_RUNTIME_TIMEOUT_S", raising=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        assert distributed.init_distributed(timeout_s=7) is group
        assert distributed.timeout_s() == 7.0
        assert dist.is_initialized() and dist.group.WORLD is group  # reused, not made again
    finally:
        distributed.destroy_distributed()
    assert distributed.timeout_s() == 300.0  # the knob's default again once the group is gone


@pytest.mark.parametrize("variable", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_mpi_launch_whose_mpi_library_cannot_load_names_it(variable, tmp_path):
    """mpi4py installed (a wheel) but no MPI library it can load: init_distributed raised mpi4py's multi-line
    RuntimeError naming no launcher, and `ep-runtime env` / `demo` died in a traceback. Now one error naming the
    launcher variable and what to install; the CLI prints it as a usage error (exit 2). Real processes, the
    library hidden by mpi4py's own MPI4PY_LIBMPI."""
    pytest.importorskip("mpi4py", reason="mpi4py is what fails to load here")
    env = launcher_free_env(**{variable: "2", "MPI4PY_LIBMPI": str(tmp_path / "libmpi.so")})
    init = subprocess.run([sys.executable, "-c", "import ep_runtime as ep; ep.init_distributed(timeout_s=5)"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert init.returncode == 1, init.stdout + init.stderr
    assert re.search(rf"RendezvousError: started by mpirun \(launcher variable {variable}=2\) but mpi4py cannot load "
                     rf"an MPI library \(.*libmpi\.so.*\): install the MPI", init.stderr), init.stderr
    for command in (["env"], ["demo"]):
        cli = subprocess.run([sys.executable, "-m", "ep_runtime", *command], capture_output=True, text=True, timeout=60,
                             env=env, cwd=REPO)
        assert cli.returncode == 2, cli.stdout + cli.stderr
        assert "Traceback" not in cli.stderr, cli.stderr
        assert f"error: started by mpirun (launcher variable {variable}=2) but mpi4py cannot load" in cli.stderr


def _layer_after_destroy_rank(rank, world_size, port):
    """Layers on the default group (passed, and taken with group=None), used after destroy_distributed, and
    again once a new default group exists; a layer built anew then runs."""
    import torch
    import torch.distributed as dist

    import ep_runtime as ep
    from ep_runtime.reference import moe_reference, rel_err
    dist.destroy_process_group()  # the harness's group: this one is made as a launched job's is
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    E, K, H, I = 4, 2, 8, 16
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1 + rank))
    ids, weights = ep.select_experts(torch.randn(5, E, generator=gen), ep.TopKConfig(top_k=K))

    def layer_on(group, dispatcher):
        layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", group=group)
        layer.load_experts(w13, w2)
        assert rel_err(layer(x, ids, weights), moe_reference(x, ids, weights, w13, w2, layer.config)) < 1e-5
        return layer

    ep.init_distributed(backend="gloo", timeout_s=5)
    # A dispatcher built with group=None keeps None (the default group, whichever exists when it runs).
    dispatcher = ep.dispatchers.create("deepep_normal", ep.MoeConfig(E, K, H, I), group=None)
    dispatcher.dispatch(x, (ids, weights))
    ep.destroy_distributed()
    try:
        dispatcher.dispatch(x, (ids, weights))
        bare = "ran"
    except RuntimeError as err:
        bare = str(err)
    group = ep.init_distributed(backend="gloo", timeout_s=5)
    dispatcher.dispatch(x, (ids, weights))  # the new default group
    layers = {(d, name): layer_on(given, d) for d in ("deepep_normal", "deepep_ll")
              for name, given in (("passed", group), ("none", None))}
    errors = {("bare dispatcher",): bare}
    for generation in ("destroyed", "new group"):
        if generation == "destroyed":
            ep.destroy_distributed()
        else:
            layer_on(ep.init_distributed(backend="gloo", timeout_s=5), "deepep_normal")
        for key, layer in layers.items():
            try:
                layer(x, ids, weights)
                errors[key + (generation,)] = "ran"
            except RuntimeError as err:
                errors[key + (generation,)] = str(err)
    ep.destroy_distributed()
    return errors


def test_layer_used_after_destroy_fails_naming_the_destroyed_group():
    """A layer called after ep.destroy_distributed() went on exchanging over the destroyed gloo group (its
    pairs stay connected), with no error, even after a new default group was made. Now every rank raises at
    once, before any collective, saying the group was destroyed and to rebuild the layer (which then runs)."""
    from ep_runtime.testing import run_ranks
    results = run_ranks(_layer_after_destroy_rank, 2, distributed.free_port(), timeout=60)
    for errors in results:
        assert len(errors) == 9, errors
        assert errors.pop(("bare dispatcher",)) == (
            "deepep_normal dispatch: the default process group was destroyed (ep.destroy_distributed() or "
            "dist.destroy_process_group()) after the layer was built; allowed: a layer on a live group: call "
            "ep.init_distributed() and build the layer again")
        for key, message in errors.items():
            assert re.fullmatch(rf"{key[0]} dispatch: its process group was destroyed \(ep\.destroy_distributed\(\) "
                                rf"or dist\.destroy_process_group\(\)\) after the layer was built; allowed: a layer on "
                                rf"a live group: call ep\.init_distributed\(\) and build the layer again", message), \
                (key, message)


def _second_init_rank(rank, world_size):
    """The harness made the default group, as a framework would; init_distributed's calls on top of it."""
    import torch
    import torch.distributed as dist

    import ep_runtime as ep
    theirs = dist.group.WORLD
    outcome = {"same": ep.init_distributed(timeout_s=5) is theirs and ep.init_distributed(backend="gloo") is theirs}
    for backend in ("mpi", "nccl", "bogus"):
        try:
            ep.init_distributed(backend=backend)
            outcome[backend] = "returned"
        except ValueError as err:
            outcome[backend] = str(err)
    x = torch.full((1,), float(rank + 1))
    dist.all_reduce(x)  # the caller's group is untouched
    outcome["sum"] = x.item()
    return outcome


def test_second_init_distributed_checks_its_backend_against_the_group():
    """init_distributed(backend='mpi') (or any name at all: 'bogus') on a process whose default gloo group exists
    returned that group, with no word that the backend asked for was not the one in use. Now a ValueError naming
    the argument, the existing backend and what is allowed; the caller's group is returned as it is otherwise."""
    from ep_runtime.testing import run_ranks
    for outcome in run_ranks(_second_init_rank, 2, timeout=60):
        assert outcome["same"] and outcome["sum"] == 3.0, outcome
        for backend in ("mpi", "nccl"):
            assert outcome[backend] == (f"backend='{backend}', but the default process group exists with backend 'gloo'; "
                                        f"allowed: None or 'gloo' (it is returned as it is), or ep.destroy_distributed() "
                                        f"first to make a {backend} group"), outcome
        assert outcome["bogus"] == "backend='bogus'; allowed: None (nccl with CUDA, gloo without), nccl, gloo, mpi", outcome
