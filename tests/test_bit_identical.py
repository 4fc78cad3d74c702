"""Behaviour unchanged by the runner-layout/placement restructuring: every (dispatcher, runner) pair that ran before
it gives bit-identical outputs and gradients on 2 gloo ranks (fp32, CPU; triton and masked through the
interpreter) to the tree before it, commit bdbf96f, whose results are recorded as SHA-256 digests in
tests/data/bdbf96f_outputs.json (by running tests/bit_identical_case.py there)."""
import hashlib
import json
from pathlib import Path

import pytest
from bit_identical_case import PAIRS, rank_outputs

import ep_runtime as ep
from ep_runtime.testing import run_ranks

RECORDED = json.loads((Path(__file__).parent / "data" / "bdbf96f_outputs.json").read_text())


def _digests(rank, world_size, dispatcher, runner):
    out = rank_outputs(rank, world_size, dispatcher, runner)
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:32] for k, v in out.items()}


@pytest.mark.parametrize("dispatcher,runner", PAIRS)
def test_outputs_and_gradients_are_bit_identical_to_before(dispatcher, runner):
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    got = run_ranks(_digests, 2, dispatcher, runner, timeout=240)
    want = RECORDED[f"{dispatcher}/{runner}"]
    differ = [(rank, key) for rank in range(2) for key in want[rank] if got[rank][key] != want[rank][key]]
    assert not differ, f"{dispatcher}/{runner}: these (rank, tensor) differ from bdbf96f: {differ}"
