"""On 2 GPUs (marker `gpu`): a peer that stalls or dies makes every survivor raise ep.PeerFailure
within EP_RUNTIME_TIMEOUT_S + 5 s, for each exchange dispatcher eager (deepep_normal, mori,
deepep_ll) and replayed from a CUDA graph (deepep_ll's layer; the static modes of deepep_normal and
mori, dispatch -> combine), each replay followed by `layer.synchronize()`.

Every case is a real job of two fresh processes on NCCL (scripts/fault_probe.py starts them as
torchrun would, each calling ep.init_distributed()); after a few healthy steps and a barrier rank 1
sleeps or SIGKILLs itself and rank 0 keeps stepping. All twelve jobs run at once after one healthy
warm-up job (which fills Triton's kernel cache), so the module takes about the timeout plus start-up.
The measured times are written to the terminal, one `fault_probe:` line per case.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 10  # EP_RUNTIME_TIMEOUT_S of the jobs
sys.path.insert(0, str(ROOT / "scripts"))
from fault_probe import CASES, FAULTS, table  # noqa: E402

OPERATION = {case: "synchronize" if case.endswith("_graph") else "dispatch" for case in CASES}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, request) -> dict:
    folder = tmp_path_factory.mktemp("faults")
    out = folder / "times.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_probe.py"), "--timeout", str(TIMEOUT_S),
                          "--json", str(out), "--dir", str(folder / "jobs")], capture_output=True, text=True,
                         timeout=600)  # the probe bounds itself (240 s warm-up, 180 s of jobs)
    assert run.returncode == 0 and out.exists(), run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(out.read_text())["results"]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:  # the times, for the record, also when every test passes
        with capture.global_and_fixture_disabled():  # (a fixture's output is captured, and dropped on a pass)
            for line in table(results, TIMEOUT_S).splitlines():
                reporter.write_line(line)
    return {f"{r['case']}/{r['fault']}": r for r in results}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("case", CASES)
def test_survivor_raises_peer_failure_within_the_timeout(outcomes, case, fault):
    r = outcomes[f"{case}/{fault}"]
    context = f"{case}/{fault}: {json.dumps({k: v for k, v in r.items() if k != 'log_tail'})}\n{r['log_tail']}"
    assert r["fault_at"] is not None, "the fault never fired: " + context
    assert r["raised"], "rank 0 did not raise: " + context
    assert r["type"] == "PeerFailure", context
    assert r["raise_s"] <= TIMEOUT_S + 5, context
    dispatcher = case.removesuffix("_graph").removesuffix("_static")
    # the dispatcher, the operation, this rank, the peer that did not answer, the knob
    assert r["message"].startswith(f"{dispatcher} {OPERATION[case]} on rank 0 of 2 waited in vain for rank 1: "), context
    assert "EP_RUNTIME_TIMEOUT_S" in r["message"] and "aborted" in r["message"], context
    # a later call on the aborted group fails at once instead of queueing work on it
    assert r["again"].startswith(f"PeerFailure: {dispatcher} "), context
    assert "failed earlier" in r["again"] and r["again_s"] < 2, context


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("case", CASES)
def test_survivor_process_ends_after_its_error(outcomes, case, fault):
    """Left uncaught, the error ends rank 0's process (non-zero exit) within the probe's bound of the
    timeout + 30 s: nothing at exit waits on the aborted communicator."""
    r = outcomes[f"{case}/{fault}"]
    context = f"{case}/{fault}: {json.dumps({k: v for k, v in r.items() if k != 'log_tail'})}\n{r['log_tail']}"
    assert r["raised"], context
    assert r["exit_code"] not in (None, 0), "rank 0 did not exit after its error: " + context
