"""A 2-rank job exits 0 on every rank, every time.

A gloo worker thread that still had to release its last work when the interpreter shut down
aborted the process ("terminate called without an active exception", SIGABRT) in about 1 run in 12
of examples/quickstart.py; ep.destroy_distributed() now waits for those threads. tests/exit_jobs.py
repeats a job with the workers starved of CPU (the failure then shows in about 1 job in 4 without
the fix: 7 of 30 measured), so 16 jobs miss it with probability about 0.75**16 = 1%.
"""
import os
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
