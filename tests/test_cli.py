"""The `ep-runtime` command: demo spawns ranks itself and joins a torchrun job; env prints the knobs."""
import os
import shutil
import subprocess
import sys

import pytest


def _run(args, **kw):
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kw)


def test_demo_spawns_local_ranks():
    out = _run([sys.executable, "-m", "ep_runtime", "demo", "--world-size", "2"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("demo: OK")
    assert "standard" in out.stdout


def test_demo_joins_torchrun():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found next to this python")
    from ep_runtime.distributed import free_port
    out = _run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "ep_runtime", "demo"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "demo: OK" in out.stdout
    assert "     2 " in out.stdout  # the table reports 2 ranks


def test_env_lists_every_knob():
    from ep_runtime import envs
    out = _run([sys.executable, "-m", "ep_runtime", "env"])
    assert out.returncode == 0, out.stderr
    for name in envs.KNOBS:
        assert name in out.stdout


@pytest.mark.parametrize("args,message", [
    (["demo", "--world-size", "0"], "0 is out of range; allowed 1..1048576"),
    (["demo", "--world-size", "two"], "'two' is not an integer"),
    (["nope"], "invalid choice: 'nope'"),
    (["env", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_cli_arguments(args, message):
    out = _run([sys.executable, "-m", "ep_runtime", *args])
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_bad_knob_value_fails_demo_with_the_name():
    env = dict(os.environ, EP_RUNTIME_TIMEOUT_S="soon")
    out = subprocess.run([sys.executable, "-m", "ep_runtime", "demo"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode != 0 and "EP_RUNTIME_TIMEOUT_S='soon' is not a valid float" in out.stderr
