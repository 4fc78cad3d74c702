"""A 2-rank job exits 0 on every rank, every time.

A gloo worker thread that still had to release its last work when the interpreter shut down
aborted the process ("terminate called without an active exception", SIGABRT) in about 1 run in 12
of examples/quickstart.py; ep.destroy_distributed() now waits for those threads. tests/exit_jobs.py
repeats a job with the workers starved of CPU (the failure then shows in about 1 job in 4 without
the fix: 7 of 30 measured), so 16 jobs miss it with probability about 0.75**16 = 1%.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
JOBS = 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pins threads through /proc (Linux)")
def test_two_rank_jobs_exit_cleanly_every_time():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, str(TESTS / "exit_jobs.py"), str(JOBS)], check=False,
                         capture_output=True, text=True, timeout=300, env=env, cwd=TESTS.parent)
    assert out.returncode == 0, out.stderr
    assert f"exit_jobs: 0 of {JOBS} jobs" in out.stdout, out.stdout + out.stderr
    assert "terminate called" not in out.stderr, out.stderr


# One rank of a job launched as srun would (Slurm's variables, set here by hand): a layer forward, then what
# `mode` says on rank 1, while rank 0 runs a second forward that rank 1 never joins. Neither calls
# ep.destroy_distributed(): the group is destroyed at interpreter exit.
RANK_SCRIPT = """
import sys, torch, ep_runtime as ep
mode, rank = sys.argv[1], int(sys.argv[2])
layer = ep.EPMoE(4, 2, 8, 16, dispatcher="deepep_normal", runner="torch", group=ep.init_distributed(timeout_s=10))
gen = torch.Generator().manual_seed(rank)
x, logits = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
layer(x, router_logits=logits)
print(f"rank {rank}: first forward done", flush=True)
if rank == 1 and mode == "raise":
    raise RuntimeError("an error of this rank's own")
if rank == 1 and mode == "exit":
    sys.exit(3)
if mode != "finish":
    layer(x, router_logits=logits)
print(f"rank {rank}: end", flush=True)
"""


@pytest.mark.parametrize("mode,codes", [("finish", [0, 0]), ("raise", [1, 1]), ("exit", [1, 3])])
def test_job_whose_rank_fails_or_exits_midway_ends_every_rank_promptly(mode, codes):
    """A rank that raises or calls sys.exit mid-job, and ranks that never call destroy_distributed: every process
    ends with its own exit code within 60 s (the survivor's next forward raises
    ep.PeerFailure naming the peer), with no abort at interpreter shutdown and no hang at exit."""
    from ep_runtime.distributed import free_port
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, mode, str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=TESTS.parent,
                              env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)))
             for rank in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    text = "\n".join(out + err for out, err in outputs)
    assert [proc.returncode for proc in procs] == codes, text
    assert "terminate called" not in text and "Aborted" not in text, text
    for rank in range(2):
        assert f"rank {rank}: first forward done" in outputs[rank][0], text
    if mode == "finish":
        assert all(f"rank {rank}: end" in outputs[rank][0] for rank in range(2)), text
    else:
        assert re.search(r"ep_runtime\.distributed\.PeerFailure: deepep_normal (dispatch|combine) on rank 0 of 2 "
                         r"(lost its connection to rank 1|waited in vain for rank 1)", outputs[0][1]), text
