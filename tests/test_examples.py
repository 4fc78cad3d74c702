"""Every example runs to its own success line under torchrun (2 CPU ranks here; GPU ones under the
`gpu` marker). The examples assert their own properties (train_moe: step-0 gradients equal a
single-process replica's and the loss falls; hf_mixtral: logits equal the original model's)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ep_runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def torchrun(script, *args, nproc=2, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
                          str(REPO / "examples" / script), *args],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_quickstart():
    out = torchrun("quickstart.py")
    for rank, tokens in ((0, 10), (1, 11)):
        assert re.search(rf"rank {rank}: \w+ layer \({tokens}, 64\) -> \({tokens}, 64\)", out), out
    assert "local experts 0..3" in out and "local experts 4..7" in out, out


def test_torchrun_basic():
    out = torchrun("torchrun_basic.py")
    # The ranks' lines can interleave in torchrun's output (one's newline after the other's text):
    # read the number alone.
    errors = [float(e) for e in re.findall(r"rel_err=([0-9.eE+-]+)", out)]
    assert len(errors) == 2 and max(errors) < 1e-5, out


def test_eplb_rebalances_and_keeps_outputs():
    out = torchrun("eplb.py")  # asserts its outputs equal the float64 reference before and after
    assert "eplb: OK" in out, out
    before, after = map(float, re.search(r"receives ([0-9.]+)x the mean pairs before, ([0-9.]+)x after", out).groups())
    assert after <= 1.10 and after < before, out


def test_train_moe_matches_replica_and_loss_falls():
    out = torchrun("train_moe.py", "--steps", "30")  # the mean loss of the first 10 steps 1.96, of the last 10 0.19 (it must halve)
    assert "gradients match the replica's" in out, out
    assert "train_moe: OK (2 ranks" in out, out


@pytest.mark.parametrize("args,message", [
    (["--steps", "5"], "--steps 5: allowed an int >= 20"),
    (["--steps", "0"], "--steps 0: allowed an int >= 20"),
    (["--lr", "0"], "--lr 0.0: allowed a finite float > 0"),
    (["--lr", "nan"], "--lr nan: allowed a finite float > 0"),
])
def test_train_moe_refuses_arguments_its_checks_cannot_judge(args, message):
    # (Before: every step ran, then "AssertionError: loss did not fall" blamed the model.)
    out = subprocess.run([sys.executable, str(REPO / "examples" / "train_moe.py"), *args],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_hf_mixtral_logits_equal_original():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install 'ep-runtime[dev]' installs it)")
    out = torchrun("hf_mixtral.py")
    assert "hf_mixtral: OK (2 ranks)" in out, out


def test_two_batch_overlap_is_bit_identical_to_sequential():
    out = torchrun("two_batch_overlap.py", "--repeats", "2")
    for phase in ("decode", "prefill"):
        assert re.search(rf"{phase}: 2x\d+ tok/rank, .* speed-up [0-9.]+x\); bit-identical: yes", out), out
    assert "two_batch_overlap: OK (2 ranks" in out, out


@pytest.mark.parametrize("args,message", [
    (["--experts", "12"], "--experts 12 --top-k 4: DeepSeek-V3's router (8 expert groups, the best 4 picked) needs "
                          "--experts a multiple of 8, at least 16, and --top-k at most --experts / 2"),
    (["--experts", "16", "--top-k", "9"], "--experts 16 --top-k 9: DeepSeek-V3's router"),
    (["--decode", "0"], "argument --decode: 0: allowed an int >= 1"),
    (["--repeats", "0"], "argument --repeats: 0: allowed an int >= 1"),
])
def test_two_batch_overlap_names_the_flag_it_cannot_run(args, message):
    # (Before: a traceback naming the layer's num_max_dispatch_tokens_per_rank or num_expert_group, or
    # --repeats 0 silently taken as the default.) CPU shapes apply: no CUDA device in this process.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(REPO / "examples" / "two_batch_overlap.py"), *args],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_inference_cuda_graph_explains_and_exits_0_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_inference_cuda_graph covers it")
    out = subprocess.run([sys.executable, str(REPO / "examples" / "inference_cuda_graph.py")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "inference_cuda_graph: skipped: needs a CUDA GPU" in out.stdout, out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
def test_inference_cuda_graph():
    out = torchrun("inference_cuda_graph.py", nproc=min(2, torch.cuda.device_count()))
    if "skipped" in out:
        pytest.skip(out.strip().splitlines()[-1])
    assert "inference_cuda_graph: OK" in out, out
