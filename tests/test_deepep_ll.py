"""deepep_ll on gloo ranks: EPMoE == float64 reference, masked_m == true counts, capacity M,
and rows past masked_m never read."""
import os

import pytest
import torch

import ep_runtime as ep
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

TOKENS = {1: [13], 2: [16, 0], 4: [9, 0, 16, 4]}  # uneven, rank 1 empty, one rank at T = M


def _ll_rank(rank, world_size, E, K, extra=None):
    layer = ep.EPMoE(E, K, 32, 16, dispatcher="deepep_ll", runner="torch",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 16}, **(extra or {}))
    problem = make_problem(layer.config, TOKENS[world_size], seed=31 + E, ep_size=world_size)
    errors = check_layer(layer, problem, rank)
    topk = ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])
    x = problem.xs[rank].float()
    out = layer.dispatcher.dispatch(x, topk)
    ids = torch.cat(problem.topk_ids).long()
    lo, L = layer.placement.first_expert, layer.placement.num_local_experts
    truth = [int((ids == lo + e).sum()) for e in range(L)]
    # Poison every row past masked_m: the runner must not read them, combine must not use them.
    poisoned = out.recv_x.clone()
    for e, m in enumerate(out.masked_m.tolist()):
        poisoned[e, m:] = float("nan")
    clean = layer.dispatcher.combine(layer.runner.run(out, layer.weights))
    out.recv_x = poisoned
    dirty = layer.dispatcher.combine(layer.runner.run(out, layer.weights))
    return errors, out.masked_m.tolist() == truth, tuple(out.recv_x.shape), bool(torch.equal(clean, dirty))


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("E,K", [(16, 4), (64, 8)])
def test_layer_matches_reference_on_ranks(R, E, K):
    results = run_ranks(_ll_rank, R, E, K) if R > 1 else [_ll_rank(0, 1, E, K)]
    for errors, counts_ok, shape, poison_free in results:
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert counts_ok and poison_free
        assert shape == (E // R, 16 * R, 32)


@pytest.mark.parametrize("extra", [dict(apply_router_weight_on_input=True), dict(routed_scaling_factor=2.5),
                                   dict(activation="gelu", has_bias=True)])
def test_config_fields_on_ranks(extra):
    for errors, counts_ok, _, poison_free in run_ranks(_ll_rank, 2, 8, 2, extra):
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert counts_ok and poison_free


def _over_capacity(rank, world_size, T):
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_ll", runner="torch",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 4})
    x, ids = torch.randn(T, 16), torch.randint(0, 8, (T, 2), dtype=torch.int32)
    ids[:, 1] = (ids[:, 0] + 1) % 8
    return tuple(layer(x, ids, torch.rand(T, 2)).shape)


def _node_knobs_rank(rank, world_size):
    if rank == 1:  # knobs of the node-aware exchange (host plans), set on one rank only
        os.environ.update(EP_RUNTIME_HIERARCHICAL="on", EP_RUNTIME_RANKS_PER_NODE="1")
    try:
        layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_ll", runner="torch",
                         dispatcher_options={"num_max_dispatch_tokens_per_rank": 8})
    finally:
        for knob in ("EP_RUNTIME_HIERARCHICAL", "EP_RUNTIME_RANKS_PER_NODE"):
            os.environ.pop(knob, None)
    problem = make_problem(layer.config, [5, 3], seed=2, ep_size=world_size)
    return check_layer(layer, problem, rank), layer.dispatcher.settings()["hierarchical"]


def test_node_aware_knobs_are_neither_read_nor_compared():
    """deepep_ll's static plan never goes node-aware: ranks that differ in EP_RUNTIME_HIERARCHICAL /
    EP_RUNTIME_RANKS_PER_NODE build it and match the reference (the settings check refused them)."""
    for errors, mode in run_ranks(_node_knobs_rank, 2):
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert mode == "off"


def test_t_equal_m_works_and_m_plus_one_fails_every_rank():
    assert run_ranks(_over_capacity, 2, 4) == [(4, 16), (4, 16)]
    with pytest.raises(ep.testing.RankFailure) as failure:
        run_ranks(_over_capacity, 2, 5)
    assert str(failure.value).count("x has 5 tokens on rank 0; deepep_ll allows at most num_max_dispatch_tokens_per_rank M=4") == 2
    assert str(failure.value).count("raise num_max_dispatch_tokens_per_rank (or EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK) "
                                    "to at least 5, or dispatch at most 4 tokens per call") == 2


def _one_rank_capturing(rank, world_size):
    """Rank 0 runs the plan as under CUDA-graph capture (no host read, so no value checks), rank 1
    eagerly: the count rows they exchange must have one length (a graph replayed next to an eager
    call), and the step must give the reference result on both."""
    from ep_runtime.dispatchers import rank_exchange
    if rank == 0:
        rank_exchange.capturing = lambda: True
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_ll", runner="torch", apply_router_weight_on_input=True,
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 8})
    return check_layer(layer, make_problem(layer.config, [5, 3], seed=3, ep_size=2), rank, backward=False)


def test_a_capturing_rank_and_an_eager_rank_exchange_rows_of_one_length():
    for errors in run_ranks(_one_rank_capturing, 2, timeout=60, group_timeout=15):
        assert errors["y"] <= tolerance(torch.float32), errors


def _inference_then_training_rank(rank, world_size, runner):
    from ep_runtime import runner_core
    runner_core._CAPACITY_ROWS.clear()  # (this process's first expert-major -> token-rows conversion of the shape)
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="deepep_ll", runner=runner,
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 12})
    problem = make_problem(layer.config, [9, 7], seed=3, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    with torch.inference_mode():  # a serving call first: the conversion's kept tensors are made here
        layer(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
    return check_layer(layer, problem, rank)


@pytest.mark.parametrize("runner", ["torch", "triton"])
def test_a_training_step_after_an_inference_mode_call_matches_the_reference(runner):
    """deepep_ll's [L, M*R, H] rows reach a token-row runner through a conversion whose constant tensors (row
    slots, expert ids, unit weights) are kept per shape: made under torch.inference_mode by a serving call they
    were inference tensors, and the next training step failed ("Inference tensors cannot be saved for
    backward") when the triton runner's autograd function saved the unit weights. Float64 reference, fp32
    tolerance (DESIGN.md); random tokens and experts."""
    if runner == "triton":
        pytest.importorskip("triton")
    for errors in run_ranks(_inference_then_training_rank, 2, runner):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def test_huge_max_tokens_is_refused_before_any_allocation(monkeypatch):
    """M = 10**9 made every call allocate an int64 plan of R*M entries (8 GB), and the process was OOM-killed: the
    layer now refuses it when built, naming the argument, the knob, the value and the memory it would need."""
    monkeypatch.setenv("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", str(10 ** 9))
    with pytest.raises(ValueError, match=r"num_max_dispatch_tokens_per_rank=1000000000 \(or EP_RUNTIME_LL_MAX_"
                                         r"DISPATCH_TOKENS_PER_RANK\): its buffers would take at least .* GiB"):
        ep.EPMoE(8, 2, 64, 8, dispatcher="deepep_ll", runner="torch")  # L*M*H: 512 GB at least
    monkeypatch.setenv("EP_RUNTIME_LL_MAX_DISPATCH_TOKENS_PER_RANK", "8192")  # DeepSeek-V3's largest: allowed
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_ll", runner="torch")
    assert layer.dispatcher.num_max_dispatch_tokens_per_rank == 8192
