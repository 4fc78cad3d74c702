"""The correctness contract over the whole registry: every registered (dispatcher, runner) pair that
can run here (triton and masked through the interpreter) equals the float64 reference on 2 gloo
ranks, forward and gradients. A new dispatcher or runner is covered as soon as it registers."""
import pytest
import torch

import ep_runtime as ep
from ep_runtime.runner_core import registered_pairs
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 16}, "mori": {"max_dispatch_tokens_per_rank": 16}}
PAIRS = [(fmt, runner) for fmt, runner in registered_pairs() if fmt in ep.dispatchers.registered()]


def _pair_rank(rank, world_size, dispatcher, runner):
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner=runner, dispatcher_options=OPTIONS.get(dispatcher))
    return check_layer(layer, make_problem(layer.config, [11, 0][:world_size], seed=4, ep_size=world_size), rank)


@pytest.mark.parametrize("dispatcher,runner", PAIRS)
def test_every_registered_pair_matches_reference(dispatcher, runner):
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    for errors in run_ranks(_pair_rank, 2, dispatcher, runner):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def test_every_dispatcher_has_a_torch_path():
    assert {fmt for fmt, runner in PAIRS if runner == "torch"} == set(ep.dispatchers.registered())
