"""Behaviour unchanged by the runner-layout/placement restructuring: every (dispatcher, runner) pair that ran before
it gives bit-identical outputs and gradients on 2 gloo ranks (fp32, CPU; triton and masked through the
interpreter) to the tree before it, commit bdbf96f, whose results are recorded as SHA-256 digests in
tests/data/bdbf96f_outputs*.json, one file per machine kind (the same tree gives other bits on other CPUs:
MKL's code paths differ), each made by running tests/bit_identical_case.py there. A run passes when it equals
one machine kind's recording in every tensor; on a machine kind not recorded yet it fails, saying how to
record one."""
import json
from pathlib import Path

import pytest
from bit_identical_case import PAIRS, digests

import ep_runtime as ep
from ep_runtime.testing import run_ranks

RECORDED = {path.name: json.loads(path.read_text())
            for path in sorted((Path(__file__).parent / "data").glob("bdbf96f_outputs*.json"))}


@pytest.mark.parametrize("dispatcher,runner", PAIRS)
def test_outputs_and_gradients_are_bit_identical_to_before(dispatcher, runner):
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    got = run_ranks(digests, 2, dispatcher, runner, timeout=240)
    differ = {name: [(rank, key) for rank in range(2) for key in want[f"{dispatcher}/{runner}"][rank]
                     if got[rank][key] != want[f"{dispatcher}/{runner}"][rank][key]]
              for name, want in RECORDED.items()}
    assert any(not d for d in differ.values()), (
        f"{dispatcher}/{runner}: these (rank, tensor) differ from bdbf96f's recordings: {differ} (a machine kind "
        f"not recorded yet gives other bits from the same tree: record it as tests/bit_identical_case.py says)")
