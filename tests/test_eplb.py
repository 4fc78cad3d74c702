"""Expert load balancing: redundant copies, load statistics, plans and weight moves.

Every sharded dispatcher x runner pair with copies of experts on a non-contiguous placement equals the
float64 reference (forward and gradients), before and after a rebalance; each (token, expert) pair
lands on exactly one copy; the load counters equal a host count; weights come back bit for bit after
a round trip of placements; on 4 ranks with Zipf(1.2) routing one rebalance brings the most-loaded
rank within 10% of the mean.
"""
import os
import warnings

import pytest
import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime import ExpertPlacement, bench, eplb
from ep_runtime.bench.dispatch import zipf_topk
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance, training_step

OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 16}, "mori": {"max_dispatch_tokens_per_rank": 16}}
SHARDED = [d for d in ep.dispatchers.registered()
           if ep.dispatchers.get(d).__module__.startswith("ep_runtime.") and ep.dispatchers.get(d).shards_experts]
RUNNERS = [r for r in ep.runners.registered() if ep.runners.get(r).__module__.startswith("ep_runtime.")]

# E=8 plus 4 copies over 2 ranks (6 slots each), owners interleaved: a non-contiguous placement.
E, N = 8, 4
SLOT_RANKS = [0, 1] * 6
SLOT_EXPERTS = [0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 5, 1]  # experts 0, 3, 5, 1 on both ranks


# ---------------------------------------------------------------- placement and to_physical (one process)

def _random_placement(gen, E, N, R, rank):
    """E experts plus N copies over R ranks: random owners, at most one copy of an expert per rank."""
    while True:
        extra = torch.randint(0, E, (N,), generator=gen).tolist()
        experts = list(range(E)) + extra
        owners = [r for r in range(R) for _ in range((E + N) // R)]
        owners = [owners[i] for i in torch.randperm(E + N, generator=gen).tolist()]
        try:
            return ExpertPlacement(E, R, rank, owners, experts)
        except ValueError:  # two copies landed on one rank: draw again
            continue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_pair_lands_on_exactly_one_copy_of_its_expert(seed):
    gen = torch.Generator().manual_seed(seed)
    E, N, R, T, K = 12, 8, 4, 64, 4
    for rank in range(R):
        p = _random_placement(gen, E, N, R, rank)
        ids = torch.randint(-1, E, (T, K), generator=gen, dtype=torch.int32)
        physical = p.to_physical(ids)
        assert physical.dtype == torch.int32 and physical.shape == ids.shape
        assert torch.equal(p.logical_of(physical), ids)  # the pair's expert, -1 kept
        valid = ids >= 0
        assert ((physical >= 0) & (physical < p.num_physical_experts)).eq(valid).all()
        # Experts with a copy here never leave the rank; the others spread over every copy.
        owner = p.physical().rank_of(physical)
        local = torch.tensor([any(r == rank for r, _ in p.replicas_of(e)) for e in range(E)])
        here = valid & local[ids.clamp(min=0).long()]
        assert owner[here].eq(rank).all() and owner[valid & ~here].ne(rank).all()
        for e in range(E):
            copies = p.replicas_of(e)
            if len(copies) > 1 and not local[e]:
                hit = physical[ids == e].unique().numel()
                assert hit == min(len(copies), int((ids == e).sum())), (e, copies)


def test_bad_logical_ids_stay_out_of_range():
    p = ExpertPlacement(4, 2, 0, physical_to_logical=[0, 1, 2, 3, 0, 1])
    ids = torch.tensor([[-1, 4], [5, 6], [-3, 2]], dtype=torch.int64)
    physical = p.to_physical(ids)
    assert physical.dtype == torch.int64
    assert physical.tolist()[0][0] == -1 and physical.tolist()[1][1] == 6 and physical.tolist()[2][0] == -3
    assert physical.tolist()[0][1] == -2 and physical.tolist()[1][0] == -2  # inside -1..P-1 otherwise


def test_placement_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"num_redundant_experts=3: .*= 11 is not divisible by ep_size=2; allowed: values"):
        ExpertPlacement.with_redundant_experts(8, 3, 2)
    with pytest.raises(ValueError, match=r"num_redundant_experts=9; allowed: an int in 0..8"):
        ExpertPlacement.with_redundant_experts(8, 9, 2)
    # E not a multiple of R, no copies asked for: num_experts is named (it named num_redundant_experts=0)
    with pytest.raises(ValueError, match=r"^num_experts=8 is not divisible by ep_size=3; allowed: a multiple of 3 "
                                         r"\(.*\), or num_redundant_experts=1 copies"):
        ExpertPlacement.with_redundant_experts(8, 0, 3)
    assert ExpertPlacement.with_redundant_experts(8, 1, 3).num_local_experts == 3
    with pytest.raises(ValueError, match=r"physical_to_logical\[1\]=9 out of range \[0, 4\)"):
        ExpertPlacement(4, 1, 0, physical_to_logical=[0, 9, 1, 2, 3])
    with pytest.raises(ValueError, match=r"no slot for expert 3"):
        ExpertPlacement(4, 2, 0, physical_to_logical=[0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"two copies of expert 0 on rank 0"):
        ExpertPlacement(4, 2, 0, physical_to_logical=[0, 0, 1, 2, 3, 1])
    with pytest.raises(ValueError, match=r"num_redundant_experts=2; allowed: 0 with dispatcher='standard'"):
        ep.EPMoE(8, 2, 16, 8, dispatcher="standard", num_redundant_experts=2)


# ---------------------------------------------------------------- plan (one process)

def _zipf_load(E, seed=0):
    w = torch.arange(1, E + 1, dtype=torch.float64) ** -1.2
    load = torch.empty(E, dtype=torch.float64)
    load[torch.randperm(E, generator=torch.Generator().manual_seed(seed))] = (w / w.sum() * 1e5).round()
    return load.long()


@pytest.mark.parametrize("E,R,P,nodes", [(64, 4, 80, None), (64, 4, 64, None), (16, 8, 32, 2), (256, 2, 288, None)])
def test_plan_is_a_valid_balanced_placement(E, R, P, nodes):
    load = _zipf_load(E)
    plan = eplb.plan(load, R, P, num_nodes=nodes)
    assert plan == eplb.plan(load.tolist(), R, P, num_nodes=nodes)  # deterministic, any sequence
    placements = [plan.placement(r) for r in range(R)]  # validates: every expert, one copy per rank
    assert placements[0].num_physical_experts == P and sorted(set(plan.physical_to_logical)) == list(range(E))
    # The expected rank loads add up to the total; with copies the hottest rank is near the mean.
    copies = torch.bincount(torch.tensor(plan.physical_to_logical), minlength=E).double()
    per_slot = load.double()[list(plan.physical_to_logical)] / copies[list(plan.physical_to_logical)]
    assert torch.allclose(per_slot.view(R, -1).sum(1), torch.tensor(plan.rank_load, dtype=torch.float64))
    if P > E:
        assert plan.imbalance <= (1.05 if nodes else 1.02), plan.imbalance  # nodes constrain the packing
    if nodes:  # every copy of an expert stays in one node
        node_of = torch.arange(P) // (P // nodes)
        for e in range(E):
            assert node_of[torch.tensor(plan.physical_to_logical) == e].unique().numel() == 1


def test_plan_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"num_physical_experts=81; allowed: a multiple of num_ranks=4 in 64..256"):
        eplb.plan(torch.ones(64), 4, 81)
    with pytest.raises(ValueError, match=r"load\[2\]=-1.0; allowed: finite counts >= 0"):
        eplb.plan([1, 1, -1, 1], 2, 4)
    with pytest.raises(ValueError, match=r"load has shape \[2, 2\]"):
        eplb.plan(torch.ones(2, 2), 2, 4)
    with pytest.raises(ValueError, match=r"num_nodes=3; allowed: None or an int >= 1 dividing num_ranks=4"):
        eplb.plan(torch.ones(8), 4, 12, num_nodes=3)
    with pytest.raises(ValueError, match=r"num_ranks=0; allowed: an int >= 1"):
        eplb.plan(torch.ones(8), 0, 8)


def test_on_nodes_names_a_node_of_that_does_not_fit_the_plan():
    """on_nodes moves a plan onto R ranks in G nodes of R/G ranks each: a node_of of another length, nodes
    of unequal size, or one numbered past a missing node names node_of (it returned a plan whose slots
    missed experts, or had another number of slots than the ranks hold)."""
    plan = eplb.plan(torch.arange(1.0, 9.0), 4, 12, num_nodes=2)
    moved = eplb.on_nodes(plan, [0, 1, 0, 1])
    assert moved.physical_to_logical == plan.physical_to_logical[:3] + plan.physical_to_logical[6:9] + \
        plan.physical_to_logical[3:6] + plan.physical_to_logical[9:]
    for node_of in ([0, 0, 0, 1], [0, 1, 0], [0, 2, 0, 2], [0, -1, 0, -1], [0.0, 1.0, 0.0, 1.0]):
        with pytest.raises(ValueError, match=r"^node_of=\[.*\]; allowed: the node \(0..G-1\) of each of the plan's "
                                             r"num_ranks=4 ranks, every node holding R/G of them"):
            eplb.on_nodes(plan, node_of)
    for node_of in (2, None, "0101"):  # (was: TypeError "'int' object is not iterable"; a str's characters)
        with pytest.raises(ValueError, match=rf"^node_of={node_of!r}; allowed: the node \(0..G-1\) of each"):
            eplb.on_nodes(plan, node_of)
    with pytest.raises(TypeError, match=r"plan must be an ep.eplb.Plan \(eplb.plan's result\); got NoneType"):
        eplb.on_nodes(None, [0, 1, 0, 1])  # (was: AttributeError 'NoneType' object has no attribute 'num_ranks')
    with pytest.raises(ValueError, match=r"load='1234'; expected a 1-D tensor or sequence of counts"):
        eplb.plan("1234", 2, 4)  # (was: the loads 1, 2, 3, 4 of four experts, silently)


# ---------------------------------------------------------------- every pair, load counts, moves (2 ranks)

def _pairs_rank(rank, world_size):
    """Every sharded dispatcher x runner with copies on a non-contiguous placement: reference errors
    before and after a rebalance, load counters against a host count, and bad logical ids."""
    out = {}
    problem = None
    for dispatcher in SHARDED:
        for runner in RUNNERS:
            if runner not in ep.runners.available():
                continue
            layer = ep.EPMoE(E, 2, 32, 16, dispatcher=dispatcher, runner=runner, num_redundant_experts=N,
                             dispatcher_options=OPTIONS.get(dispatcher))
            layer.apply_placement(ExpertPlacement(E, 2, rank, SLOT_RANKS, SLOT_EXPERTS))  # copies of 0, 1, 3, 5
            problem = make_problem(layer.config, [11, 7], seed=5, ep_size=world_size)
            errors = check_layer(layer, problem, rank)
            counted = layer.expert_load(reset=True)
            host = torch.bincount(problem.topk_ids[rank][problem.topk_ids[rank] >= 0].long(), minlength=E)
            plan = layer.rebalance()  # all-reduced load -> plan -> weights moved
            after = check_layer(layer, problem, rank)
            out[(dispatcher, runner)] = (max(errors.values()), max(after.values()), counted.tolist(), host.tolist(),
                                         plan.physical_to_logical)
    # A bad logical id on rank 1 fails both ranks; rank 1 names its value in logical terms.
    layer = ep.EPMoE(E, 2, 32, 16, dispatcher="deepep_normal", runner="torch", num_redundant_experts=N)
    ids = problem.topk_ids[rank].clone()
    if rank == 1:
        ids[2, 1] = E + 1  # a valid physical id (P = 12), an invalid logical one
    try:
        layer(problem.xs[rank].float(), ids, problem.topk_weights[rank])
        out["bad"] = None
    except ValueError as err:
        out["bad"] = str(err)
    return out


def test_every_pair_with_copies_matches_reference_and_counts_load():
    results = run_ranks(_pairs_rank, 2, timeout=300)
    for rank, out in enumerate(results):
        bad = out.pop("bad")
        assert bad is not None
        if rank == 1:
            assert bad.startswith("topk_ids has id 9 at [2, 1]; allowed -1..7 (num_experts=8)"), bad
        else:
            assert "rank 1 got invalid topk_ids" in bad and "topk_ids are logical, -1..7" in bad, bad
        assert {(d, r) for d, r in out} == {(d, r) for d in SHARDED for r in RUNNERS if r in ep.runners.available()}
        for pair, (before, after, counted, host, plan) in out.items():
            assert before <= tolerance(torch.float32), (pair, before)
            assert after <= tolerance(torch.float32), (pair, after)
            assert counted == host, pair
            assert plan == results[0][pair][4]  # every rank applied the same plan


def _shared_bad_id_rank(rank, world_size):
    """A layer with copies and shared experts dispatches asynchronously (the shared experts run meanwhile),
    so the count table's error comes from wait(): it must still name the caller's logical id."""
    raised = {}
    for dispatcher in ["deepep_normal", "deepep_ll", "mori"]:
        layer = ep.EPMoE(E, 2, 16, 8, dispatcher=dispatcher, runner="torch", num_redundant_experts=N,
                         dispatcher_options=OPTIONS.get(dispatcher), shared_experts=torch.nn.Linear(16, 16))
        gen = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, E, (5, 2), generator=gen)
        if rank == 1:
            ids[2, 1] = E + 1  # a valid physical id (P = 12), an invalid logical one
        try:
            layer(torch.randn(5, 16, generator=gen), ids, torch.rand(5, 2, generator=gen))
        except ValueError as err:
            raised[dispatcher] = str(err)
    return raised


def test_bad_logical_id_with_shared_experts_names_the_logical_value():
    for rank, raised in enumerate(run_ranks(_shared_bad_id_rank, 2)):
        assert len(raised) == 3, raised
        for dispatcher, message in raised.items():
            if rank == 1:
                assert message.startswith("topk_ids has id 9 at [2, 1]; allowed -1..7 (num_experts=8)"), message
            else:
                assert "rank 1 got invalid topk_ids" in message and "topk_ids are logical, -1..7" in message, message


def _refused_and_respelled_rank(rank, world_size):
    """A rebalance refused for its num_nodes or its optimizer (named, not an AttributeError) keeps the load
    counted so far; the same placement spelled two ways on two ranks (expert_to_rank None, or its
    contiguous table) is one plan, applied on every rank."""
    torch.manual_seed(0)
    layer = ep.EPMoE(E, 2, 16, 8, dispatcher="deepep_normal", runner="torch", num_redundant_experts=N)
    problem = make_problem(layer.config, [7, 5], seed=6, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    x, ids, w = problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank]
    ref = moe_reference(problem.xs[rank], ids, w.double(), problem.w13, problem.w2, layer.config)
    with torch.no_grad():
        layer(x, ids, w)
    counted = layer.expert_load()
    try:
        layer.rebalance(num_nodes=4)
        refused = None
    except ValueError as err:
        refused = str(err)
    try:
        layer.rebalance(optimizer=[torch.optim.SGD(layer.parameters(), lr=0.1)])
    except TypeError as err:
        refused += " | " + str(err)
    kept = torch.equal(layer.expert_load(), counted)
    owners = None if rank == 0 else [r for r in range(world_size) for _ in range((E + N) // world_size)]
    layer.apply_placement(ExpertPlacement(E, world_size, rank, owners, [5, 4, 3, 2, 1, 0, 7, 6, 5, 3, 1, 0]))
    with torch.no_grad():
        errors = [rel_err(layer(x, ids, w).double(), ref)]
        layer.rebalance()
        errors.append(rel_err(layer(x, ids, w).double(), ref))
    return refused, kept, errors, int(layer.expert_load().sum()) == int((ids >= 0).sum())


def test_a_refused_rebalance_keeps_the_load_and_one_placement_spelled_two_ways_applies():
    for refused, kept, errors, counted_once in run_ranks(_refused_and_respelled_rank, 2):
        assert refused == ("num_nodes=4; allowed: None or an int >= 1 dividing num_ranks=2, num_experts=8 and "
                           "num_physical_experts=12 | optimizer=list; allowed: None or the optimizer of this layer's "
                           "parameters (a torch.optim.Optimizer: its per-parameter .state moves with the slots)"), refused
        assert kept and counted_once
        assert max(errors) <= tolerance(torch.float32), errors


def test_rebalance_without_counted_load_warns():
    """A rebalance planned from zero load (the counts reset just before, or no forward since) places the experts
    as if all were equally loaded: a warning says so and how to read the load without resetting it."""
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="torch")
    layer(torch.randn(4, 16), torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 2))
    layer.expert_load(reset=True)
    with pytest.warns(UserWarning, match=r"no load was counted since the last reset .*read it with expert_load\(\)"):
        layer.rebalance()
    layer(torch.randn(4, 16), torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.rebalance()


def _moves_rank(rank, world_size):
    """Weights, gradients and Adam's moments follow their experts through placements A -> B -> A,
    bit for bit; gather_experts returns the loaded weights exactly at every step."""
    torch.manual_seed(0)
    E, R = 16, world_size
    layer = ep.EPMoE(E, 2, 8, 4, dispatcher="deepep_normal", runner="torch", num_redundant_experts=8, has_bias=True)
    gen = torch.Generator().manual_seed(3)
    full = ep.ExpertWeights(torch.randn(E, 8, 8, generator=gen), torch.randn(E, 8, 4, generator=gen),
                            torch.randn(E, 8, generator=gen), torch.randn(E, 8, generator=gen))
    layer.load_experts(full.w13, full.w2, full.b13, full.b2)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x = torch.randn(6, 8, generator=gen)
    ids = torch.randint(0, E, (6, 2), generator=gen)
    layer(x, ids, torch.rand(6, 2, generator=gen)).sum().backward()
    opt.step()
    start = {name: t.detach().clone() for name, t in layer.named_parameters()}
    start_state = {name: opt.state[t]["exp_avg"].clone() for name, t in layer.named_parameters()}
    start_grad = {name: t.grad.clone() for name, t in layer.named_parameters()}
    gathered_start = layer.gather_experts()
    original = layer.placement
    plan_b = eplb.plan(torch.arange(E, dtype=torch.float64) ** 2, R, E + 8)
    exact = []
    for target in (plan_b, original):
        layer.apply_placement(target, optimizer=opt)
        g = layer.gather_experts()
        exact.append(all(torch.equal(getattr(g, n), getattr(gathered_start, n)) for n in ("w13", "w2", "b13", "b2")))
        # every local slot holds its logical expert's loaded rows (params are still the optimizer's)
        mine = layer.placement.local_expert_ids()
        exact.append(torch.equal(layer.b2.detach(), gathered_start.b2[mine]))
        exact.append(all(id(p) in {id(q) for q in opt.param_groups[0]["params"]} for p in layer.parameters()))
    back = all(torch.equal(t.detach(), start[n]) for n, t in layer.named_parameters())
    back_state = all(torch.equal(opt.state[t]["exp_avg"], start_state[n]) for n, t in layer.named_parameters())
    back_grad = all(torch.equal(t.grad, start_grad[n]) for n, t in layer.named_parameters())
    moved = layer.placement != plan_b.placement(rank)
    # A plan of the wrong size is an error on every rank before any collective, naming its size: a hand-made
    # Plan with more slots than the layer's (was: "two copies of expert 0 on rank 0", a consequence) and an
    # ExpertPlacement of one rank (was: "rank=1; allowed: an int in 0..0" on rank 1).
    wrong = []
    for bad in (eplb.plan(torch.ones(E), R, E), eplb.Plan(E, R, tuple(range(E)) * 3, (0.0,) * R),
                ExpertPlacement(E, 1, 0), eplb.Plan(E, R, torch.tensor(3), (0.0,) * R)):
        try:
            layer.apply_placement(bad)
            wrong.append(None)
        except ValueError as err:
            wrong.append(str(err))
    return exact, back, back_state, back_grad, moved, wrong


def test_weight_moves_are_exact_after_a_round_trip_of_placements():
    for exact, back, back_state, back_grad, moved, wrong in run_ranks(_moves_rank, 2):
        assert all(exact) and back and back_state and back_grad and moved
        assert wrong == ["plan has num_physical_experts=16; this layer has 24 (allowed: 24; the weights' shapes are "
                         "fixed)",
                         "plan has num_physical_experts=48; this layer has 24 (allowed: 24; the weights' shapes are "
                         "fixed)",
                         "plan is for num_ranks=1; this layer's placement has ep_size=2 (allowed: 2)",
                         "physical_to_logical=tensor(3); allowed: None or a sequence of ints (one per expert slot)"], wrong


def _state_dict_rank(rank, world_size, redundant):
    """A layer's state_dict holds its slots in the placement of the moment: saved after a rebalance and
    loaded into a fresh layer (initial placement), or saved fresh and loaded into a rebalanced layer, the
    loading layer must compute the loaded experts (float64 reference on the global weights)."""
    torch.manual_seed(0)
    E, K, H, I = 8, 2, 16, 8
    config = ep.MoeConfig(E, K, H, I)

    def make():
        return ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64,
                        num_redundant_experts=redundant)
    gen = torch.Generator().manual_seed(1)
    w13 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=gen, dtype=torch.float64) * I ** -0.5
    x = torch.randn(12, H, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)
    ids = torch.randint(0, 3, (12, K), generator=torch.Generator().manual_seed(20 + rank))  # skewed: 0..2 hot
    ids[:, 1] = (ids[:, 0] + 1 + rank) % E
    weights = torch.rand(12, K, generator=gen).float()  # routing weights are fp32 (the layer keeps them so)
    want = moe_reference(x, ids, weights.double(), w13, w2, config)
    rebalanced = make()
    rebalanced.load_experts(w13, w2)
    fresh_state = {k: v.clone() for k, v in rebalanced.state_dict().items()}
    with torch.no_grad():
        rebalanced(x, ids, weights)
        rebalanced.rebalance()
        moved = rebalanced.placement != make().placement
        saved = rebalanced.state_dict()
        fresh = make()
        fresh.load_state_dict(saved)  # strict: the placement entry is the layer's own
        errors = [rel_err(fresh(x, ids, weights), want)]
        rebalanced.load_state_dict(fresh_state)  # no placement entry: the initial placement's slots
        errors.append(rel_err(rebalanced(x, ids, weights), want))
        back_home = rebalanced.placement == make().placement
    return moved, sorted(fresh_state), sorted(saved), errors, back_home


@pytest.mark.parametrize("redundant", [0, 4])
def test_state_dict_after_a_rebalance_loads_into_a_fresh_layer_and_back(redundant):
    for moved, fresh_keys, saved_keys, errors, back_home in run_ranks(_state_dict_rank, 2, redundant):
        assert moved  # the skewed load moved experts: the test means something
        assert fresh_keys == ["w13", "w2"] and saved_keys == ["expert_placement", "w13", "w2"]
        assert max(errors) < tolerance(torch.float64), errors
        assert back_home


# ---------------------------------------------------------------- the balance target (4 ranks, Zipf 1.2)

def _received(layer, x, ids, weights):
    """(tokens, pairs) this rank receives in one deepep_normal dispatch of logical ids."""
    out = layer.dispatcher.dispatch(x, ep.TopKOutput(layer.placement.to_physical(ids), weights))
    return out.recv_x.shape[0], int(out.num_recv_tokens_per_expert_tensor.sum())


def _zipf_rank(rank, world_size, E, K, N, T):
    torch.manual_seed(0)
    H, I = 16, 8
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", num_redundant_experts=N,
                     dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(E, H, I, generator=gen) / I ** 0.5
    layer.load_experts(w13.double(), w2.double())
    flat = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64)  # no copies
    flat.load_experts(w13.double(), w2.double())

    def step(seed):
        g = torch.Generator().manual_seed(seed * 100 + rank)
        ids = zipf_topk(g, T, E, K, 1.2)
        x = torch.randn(T, H, generator=g, dtype=torch.float64)
        weights = torch.rand(T, K, generator=g) + 0.1
        ref = moe_reference(x, ids, weights.double(), w13.double(), w2.double(), layer.config)
        return x, ids, weights, ref

    def imbalance(counts):
        every = torch.tensor(counts, dtype=torch.float64)
        gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(gathered, every)
        table = torch.stack(gathered)
        return (table.max(0).values / table.mean(0)).tolist()  # [tokens, pairs]

    with torch.inference_mode():
        x, ids, weights, ref = step(0)
        errors = [rel_err(flat(x, ids, weights), ref), rel_err(layer(x, ids, weights), ref)]
        before = imbalance(_received(flat, x, ids, weights))
        plan = layer.rebalance()  # from the load of step 0
        x, ids, weights, ref = step(1)  # fresh tokens from the same distribution
        errors.append(rel_err(layer(x, ids, weights), ref))
        after = imbalance(_received(layer, x, ids, weights))
    return errors, before, after, plan.imbalance


def test_one_rebalance_brings_zipf_load_within_ten_percent():
    E, K, N, T = 64, 6, 16, 1024
    for errors, before, after, expected in run_ranks(_zipf_rank, 4, E, K, N, T, timeout=300):
        assert max(errors) <= tolerance(torch.float64) * 10, errors
        assert before[1] > 1.5, before  # Zipf(1.2) without copies: the hottest rank gets far more pairs
        assert after[0] <= 1.10 and after[1] <= 1.10, (before, after, expected)


# ---------------------------------------------------------------- the bench suite (2 CPU ranks)

def test_bench_eplb_suite_times_before_and_after_a_rebalance(capsys):
    from ep_runtime.bench.cli import build_parser, settings_from_args
    args = build_parser().parse_args(["--suite", "eplb", "--routing", "zipf:1.2", "--experts", "16", "--top-k", "4",
                                      "--hidden", "32", "--intermediate", "16", "--tokens", "256", "--repeats", "2",
                                      "--warmup", "0", "--rotate", "2", "--no-progress"])
    results = bench.run(settings_from_args(args, cuda=False), world_size=2)
    assert not results.skipped and not results.dispatch and not results.runner
    impls = [r["impl"] for r in results.eplb]
    assert impls == ["EPMoE no copies", "EPMoE +2 copies, initial", "EPMoE +2 copies, rebalanced"]
    before, _, after = results.eplb
    assert before["max_over_mean"] > 1.3 and after["max_over_mean"] <= 1.10, results.eplb
    assert after["routing"] == "zipf:1.2" and after["redundant_experts"] == 2 and after["vs_no_copies"] > 0
    assert "vs no copies" in bench.render_text(results)


@pytest.mark.parametrize("spec", ["zipf", "zipf:-1", "zipf:1.2:sorted", "gauss:1"])
def test_bad_routing_spec_is_named(spec, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--routing", spec])
    assert f"--routing {spec}: allowed uniform, zipf:S or zipf:S:shuffled" in capsys.readouterr().err


def test_load_counts_survive_inference_mode_and_a_permutation_plan():
    """One process (R = 1, no copies): a placement permuting the slots; counters made under
    inference_mode still count a later training step, and the output is unchanged by the move."""
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    gen = torch.Generator().manual_seed(0)
    x, ids, w = torch.randn(6, 16, generator=gen), torch.randint(0, 8, (6, 2), generator=gen), torch.rand(6, 2)
    with torch.inference_mode():
        before = layer(x, ids, w)
        layer.apply_placement(ExpertPlacement(8, physical_to_logical=range(7, -1, -1)))
    assert layer.placement.maps_ids  # slot order changed: ids are mapped
    y = layer(x, ids, w)
    y.sum().backward()
    assert torch.equal(y.detach(), before)
    host = torch.bincount(ids.reshape(-1), minlength=8)
    assert torch.equal(layer.expert_load(reset=True), 2 * host) and layer.expert_load().sum() == 0


def _real_nodes_rank(rank, world_size):
    """4 ranks dealt out to 2 nodes round-robin (torchrun's GROUP_RANK: ranks 0, 2 on node 0 and 1, 3 on
    node 1), routing skewed to experts 0 and 1 so they get the copies; rebalance(num_nodes=2)."""
    os.environ["GROUP_RANK"] = str(rank % 2)
    try:
        layer = ep.EPMoE(E, 2, 16, 8, dispatcher="deepep_normal", runner="torch", num_redundant_experts=N)
        problem = make_problem(layer.config, [6, 5, 7, 4], seed=9, ep_size=world_size)
        for ids in problem.topk_ids:  # every rank's (the reference's gradients see them all): experts 0, 1 hot
            ids[:, 0] = torch.arange(len(ids)) % 2
        check_layer(layer, problem, rank, backward=False)  # counts the load
        layer.rebalance(num_nodes=2)
        errors = check_layer(layer, problem, rank)
        os.environ["GROUP_RANK"] = str(rank // 3)  # nodes of 3 and 1 ranks: no even split per node
        uneven = ep.EPMoE(E, 2, 16, 8, dispatcher="deepep_normal", runner="torch", num_redundant_experts=N)
        refused = None
        try:
            uneven.rebalance(num_nodes=2)
        except ValueError as err:
            refused = str(err)
    finally:
        del os.environ["GROUP_RANK"]
    owners = [[r for r in range(world_size) if e in layer.placement.at_rank(r).local_expert_ids().tolist()]
              for e in range(E)]
    return owners, errors, refused


def test_rebalance_per_node_keeps_each_experts_copies_on_its_real_node():
    """The plan's nodes are the ranks' real nodes, not consecutive ranks (it put node 0's experts on ranks
    0 and 1, one of each node, so traffic to an expert's copies crossed nodes)."""
    for owners, errors, refused in run_ranks(_real_nodes_rank, 4):
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert refused.startswith("num_nodes=2: this layer's group has [3, 1] ranks on its nodes"), refused
        assert all(len({r % 2 for r in ranks}) == 1 for ranks in owners), owners
        assert len(owners[0]) == 2 and len(owners[1]) == 2, owners  # the hot experts got the copies


def test_a_reset_flag_that_is_no_bool_is_named_and_resets_nothing():
    """expert_load(reset=...) and rebalance(reset=...) take True or False: "yes" or 1 read as true reset the counts
    without a word."""
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="torch")
    layer(torch.randn(4, 16), torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 2))
    for call in (lambda: layer.expert_load(reset="yes"), lambda: layer.rebalance(reset=1)):
        with pytest.raises(TypeError, match=r"reset=('yes'|1); allowed: True or False"):
            call()
    assert int(layer.expert_load().sum()) == 8  # nothing was reset


def _states_by_expert(layer, opt):
    """{(param name, state key): [E, ...] float64} with each expert's row (from its first copy), every rank's
    slots gathered: the optimizer state seen per logical expert, whatever the placement."""
    group = layer.dispatcher.group
    local = layer.placement.local_expert_ids()
    experts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(experts, local, group=group)
    experts = torch.cat(experts).tolist()
    first = [experts.index(e) for e in range(layer.config.num_experts)]
    out = {}
    for name, param in (("w13", layer.w13), ("w2", layer.w2), ("b13", layer.b13), ("b2", layer.b2)):
        if param is None:  # (a layer without biases)
            continue
        for key, t in list(opt.state[param].items()) + [("param", param.detach()), ("grad", param.grad)]:
            if isinstance(t, torch.Tensor) and t.dim() == param.dim() and t.shape[0] == param.shape[0]:  # per slot
                rows = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                dist.all_gather(rows, t.contiguous(), group=group)
                out[(name, key)] = torch.cat(rows)[first]
    return out


def _rebalanced_training_rank(rank, world_size, mode):
    """Two Adam steps in float64 on two identical layers; then one is rebalanced (experts cross ranks, hot ones
    get the copies) and both take a third step. `mode`: "optimizer" passes the optimizer to apply_placement;
    "remap" does not (the third optimizer.step() then raises, naming remap_optimizer_state) and calls
    remap_optimizer_state(optimizer); "unmapped" claims the state already sits in the new slots
    (from_placement=the new placement), leaving it where it was. Returns, per expert tensor and state, whether
    the rebalanced layer's rows by logical expert equal the other's before the third step, and the relative error
    after it."""
    E, K, H, I = 8, 2, 8, 4
    layers, opts = [], []
    for _ in range(2):
        layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64,
                         has_bias=True, num_redundant_experts=2)
        layer.load_experts(*(torch.randn(*s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                             for i, s in enumerate([(E, 2 * I, H), (E, H, I), (E, 2 * I), (E, H)])))
        layers.append(layer)
        opts.append(torch.optim.Adam(layer.parameters(), lr=1e-2))
    gen = torch.Generator().manual_seed(10 + rank)
    batches = [(torch.randn(12, H, generator=gen, dtype=torch.float64),
                torch.rand(12, E, generator=gen).topk(K, dim=1).indices,
                torch.rand(12, K, generator=gen, dtype=torch.float64),
                torch.randn(12, H, generator=gen, dtype=torch.float64)) for _ in range(3)]

    def step(layer, opt, batch):
        x, ids, w, g = batch
        opt.zero_grad()
        (layer(x, ids, w) * g).sum().backward()
        layer.reduce_replica_grads()
        opt.step()

    for batch in batches[:2]:
        for layer, opt in zip(layers, opts):
            step(layer, opt, batch)
    target = eplb.plan(torch.arange(E, dtype=torch.float64) ** 3, world_size, E + 2)
    layers[0].apply_placement(target, optimizer=opts[0] if mode == "optimizer" else None)
    crossed = sorted(layers[0].placement.local_expert_ids().tolist()) != sorted(
        layers[1].placement.local_expert_ids().tolist())
    refused = None
    if mode != "optimizer":
        try:
            step(layers[0], opts[0], batches[2])
        except RuntimeError as err:
            refused = str(err)
        layers[0].remap_optimizer_state(opts[0], from_placement=layers[0].placement if mode == "unmapped" else None)
    before = [_states_by_expert(layer, opt) for layer, opt in zip(layers, opts)]
    for layer, opt in zip(layers, opts):
        step(layer, opt, batches[2])
    after = [_states_by_expert(layer, opt) for layer, opt in zip(layers, opts)]
    exact = {f"{n}.{k}": torch.equal(before[0][n, k], before[1][n, k]) for n, k in before[1]}
    errors = {f"{n}.{k}": float((after[0][n, k] - after[1][n, k]).norm() / after[1][n, k].norm())
              for n, k in after[1]}
    return crossed, refused, exact, errors


@pytest.mark.parametrize("mode", ["optimizer", "remap", "unmapped"])
def test_optimizer_state_follows_its_expert_through_a_rebalance(mode):
    """A rebalance with the optimizer, or without it and then remap_optimizer_state, leaves every expert's Adam
    moments with their expert (bit for bit; the next step equals the unrebalanced run's within 1e-12, float64).
    Without either, the next optimizer.step() raises naming remap_optimizer_state (it applied expert a's moments
    to the weights of whichever expert took a's slot, silently); state left in its slots differs (the check
    tells them apart)."""
    for crossed, refused, exact, errors in run_ranks(_rebalanced_training_rank, 2, mode, timeout=120):
        assert crossed
        moments = [k for k in exact if k.endswith((".exp_avg", ".exp_avg_sq"))]
        assert len(moments) == 8, sorted(exact)
        if mode == "optimizer":
            assert refused is None
        else:
            assert refused is not None and refused.startswith(
                "Adam.step(): the optimizer's state exp_avg, exp_avg_sq of an EPMoE expert parameter of shape ["), refused
            assert "layer.remap_optimizer_state(optimizer) on every rank" in refused, refused
        if mode == "unmapped":
            assert not any(exact[k] for k in moments), exact
            assert max(errors[k] for k in moments) > 1e-3, errors
        else:  # (after a refused step the layer holds that step's gradients: the rest must be exact)
            assert all(v for k, v in exact.items() if mode == "optimizer" or not k.endswith(".grad")), exact
            assert max(errors.values()) < 1e-12, errors


def _adafactor_rank(rank, world_size, mode):
    """One Adafactor step in float64 on two identical layers without biases; one is moved to another placement
    (experts cross ranks), with the optimizer or ("remap") without it and then remap_optimizer_state. Returns the
    refused step's error (remap) and, per state, whether the moved layer's rows by logical expert equal the other's."""
    E, K, H, I = 8, 2, 8, 4
    layers, opts = [], []
    for _ in range(2):
        layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64,
                         num_redundant_experts=2)
        layer.load_experts(torch.randn(E, 2 * I, H, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                           torch.randn(E, H, I, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        layers.append(layer)
        opts.append(torch.optim.Adafactor(layer.parameters(), lr=1e-2))
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(12, H, generator=gen, dtype=torch.float64)
    ids = torch.rand(12, E, generator=gen).topk(K, dim=1).indices
    w = torch.rand(12, K, generator=gen, dtype=torch.float64)
    for layer, opt in zip(layers, opts):
        layer(x, ids, w).sum().backward()
        layer.reduce_replica_grads()
        opt.step()
    target = eplb.plan(torch.arange(E, dtype=torch.float64) ** 3, world_size, E + 2)
    layers[0].apply_placement(target, optimizer=opts[0] if mode == "optimizer" else None)
    refused = None
    if mode == "remap":
        try:
            opts[0].step()
        except RuntimeError as err:
            refused = str(err)
        layers[0].remap_optimizer_state(opts[0])
    moved, kept = (_states_by_expert(layer, opt) for layer, opt in zip(layers, opts))
    return refused, {f"{n}.{k}": torch.equal(moved[n, k], kept[n, k]) for n, k in kept}


@pytest.mark.parametrize("mode", ["optimizer", "remap"])
def test_adafactor_factored_state_follows_its_expert(mode):
    """Adafactor's factored second moments of a [L, 2I, H] weight are row_var [L, 2I, 1] and col_var [L, 1, H]:
    one row per slot, not the weight's shape, so a rebalance left them in their old slots (another expert's
    statistics, no error, and no refused step without optimizer=). They move with their expert now."""
    for refused, same in run_ranks(_adafactor_rank, 2, mode):
        assert {"w13.row_var", "w13.col_var", "w2.row_var", "w2.col_var", "w13.param", "w2.grad"} <= set(same), same
        assert all(same.values()), same
        if mode == "remap":
            assert refused is not None and refused.startswith(
                "Adafactor.step(): the optimizer's state row_var, col_var of an EPMoE expert parameter"), refused


def _stale_state_rank(rank, world_size):
    """After apply_placement without the optimizer: moving the stale state on with apply_placement(optimizer=)
    is refused on every rank, naming remap_optimizer_state; remap_optimizer_state of no optimizer is named;
    dropping the state lets the next step (and a move with the optimizer) run."""
    E = 8
    layer = ep.EPMoE(E, 2, 8, 4, dispatcher="deepep_normal", runner="torch")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x, ids = torch.randn(6, 8), torch.randint(0, E, (6, 2))
    layer(x, ids, torch.rand(6, 2)).sum().backward()
    opt.step()
    original = layer.placement
    layer.apply_placement(eplb.plan(torch.arange(E, dtype=torch.float64) ** 2, world_size, E))
    messages = []
    for call in (lambda: layer.apply_placement(original, optimizer=opt),
                 lambda: layer.remap_optimizer_state([opt])):
        try:
            call()
            messages.append(None)
        except (RuntimeError, TypeError) as err:
            messages.append(f"{type(err).__name__}: {err}")
    for p in layer.parameters():
        opt.state.pop(p, None)
    opt.zero_grad()
    layer(x, ids, torch.rand(6, 2)).sum().backward()
    opt.step()  # state made now, in the new slots
    layer.apply_placement(original, optimizer=opt)
    return messages, layer.placement == original


def test_stale_optimizer_state_is_refused_until_remapped_or_dropped():
    for messages, back in run_ranks(_stale_state_rank, 2):
        assert back
        moved, remap = messages
        assert moved is not None and moved.startswith(
            "RuntimeError: apply_placement(optimizer=...): the optimizer's state momentum_buffer of an EPMoE expert "
            "parameter of shape ["), moved
        assert "remap_optimizer_state(optimizer) on every rank" in moved, moved
        assert remap == ("TypeError: optimizer=list; allowed: the optimizer of this layer's parameters (a "
                         "torch.optim.Optimizer: its per-parameter .state moves with the slots)"), remap


def _float64_clip_rank(rank, world_size):
    """ep.clip_grad_norm_ of a float64 layer whose first copies all sit on rank 0 (N = E: every rank holds
    every expert): the norm over the ranks, each expert once."""
    layer = ep.EPMoE(4, 2, 8, 4, dispatcher="deepep_normal", runner="torch", num_redundant_experts=4,
                     dtype=torch.float64)
    problem = make_problem(layer.config, [6, 5], seed=8, ep_size=world_size)
    training_step(layer, problem, rank)  # backward, then reduce_replica_grads
    norm = ep.clip_grad_norm_(layer, 1e9).item()
    w13, w2 = problem.w13.clone().requires_grad_(True), problem.w2.clone().requires_grad_(True)
    sum((moe_reference(problem.xs[r], problem.topk_ids[r], problem.topk_weights[r].double(), w13, w2, layer.config)
         * problem.grad_outputs[r]).sum() for r in range(world_size)).backward()
    return norm, torch.cat([w13.grad.flatten(), w2.grad.flatten()]).norm().item()


def test_clip_grad_norm_of_float64_experts_with_copies():
    """The expert rows' norm was taken with dtype=float32, which vector_norm refuses for float64 rows: the ranks
    holding first copies raised while the others waited in the norm's all_reduce."""
    for norm, want in run_ranks(_float64_clip_rank, 2):
        assert abs(norm - want) <= 1e-5 * want, (norm, want)


# ---------------------------------------------------------------- fp8 experts (block scales) on the move

def _fp8_rebalance_rank(rank, world_size, dispatcher, runner, use_fp8):
    """fp8 experts from a DeepSeek-V3-layout checkpoint on a layer with copies; rank 1 sends no token. Before and
    after an inference rebalance (no optimizer): each slot's fp8 bytes and block scales are its expert's, the output
    matches the float64 w8a8 reference, and the rebalanced layer's state_dict computes the same in a fresh layer."""
    from ep_runtime.quant import QuantConfig
    from ep_runtime.reference import fp8_round_trip
    E, K, H, I = 8, 2, 256, 128
    gen = torch.Generator().manual_seed(31)
    quant = QuantConfig()
    (q13, s13), (q2, s2) = (quant.quantize_weight(torch.randn(E, *shape, generator=gen) * shape[1] ** -0.5)
                            for shape in ((2 * I, H), (H, I)))
    tokens = [(torch.randn(n, H, generator=gen).to(torch.bfloat16), torch.randint(-1, E, (n, K), generator=gen),
               torch.rand(n, K, generator=gen)) for n in (10, 0)]
    x, ids, weights = tokens[rank]
    options = {**OPTIONS.get(dispatcher, {}), "use_fp8": use_fp8}
    make = lambda: ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16,  # noqa: E731
                            num_redundant_experts=N, dispatcher_options=options)
    layer = make()
    layer.load_experts(q13, q2, w13_scale_inv=s13, w2_scale_inv=s2)
    want = moe_reference(fp8_round_trip(x.double()), ids, weights.double(), quant.dequantize_weight(q13, s13).double(),
                         quant.dequantize_weight(q2, s2).double(), layer.config, fp8_activations=True, fp8_input=False)

    def slots_hold_their_experts(layer):
        mine = layer.placement.local_expert_ids()
        return all(torch.equal(getattr(layer, name).view(torch.uint8), full[mine].view(torch.uint8))
                   for name, full in (("w13", q13), ("w2", q2), ("w13_scale_inv", s13), ("w2_scale_inv", s2)))

    out = {"held before": slots_hold_their_experts(layer)}
    with torch.no_grad():
        out["before"] = rel_err(layer(x, ids, weights), want)
        layer(x, torch.zeros_like(ids), weights)  # expert 0 hot: the plan moves experts and their copies
        before = layer.placement
        layer.rebalance()
        out["moved"] = ep.layer._placement_tables(layer.placement) != ep.layer._placement_tables(before)
        out["held after"] = slots_hold_their_experts(layer)
        y = layer(x, ids, weights)
        out["after"] = rel_err(y, want)
        back = layer.gather_experts()
        out["gathered"] = all(torch.equal(getattr(back, name).view(torch.uint8), full.view(torch.uint8))
                              for name, full in (("w13", q13), ("w2", q2), ("w13_scale_inv", s13), ("w2_scale_inv", s2)))
        fresh = make()
        fresh.load_state_dict(layer.state_dict())
        out["fresh"] = torch.equal(fresh(x, ids, weights), y) and slots_hold_their_experts(fresh)
    return out


@pytest.mark.parametrize("dispatcher,runner,use_fp8", [("deepep_normal", "triton", True), ("deepep_ll", "masked", True),
                                                      ("mori", "torch", False)])
def test_fp8_experts_and_their_scales_move_together_in_a_rebalance(dispatcher, runner, use_fp8):
    """fp8 experts with copies (E=8 + 4 over 2 ranks): a rebalance moves each expert's fp8 bytes and block scales into
    every slot that now holds it, copies included; the output matches the float64 reference on the dequantized weights
    (x and the intermediate activation rounded through fp8; bf16 bound, see tests/test_fp8.py) before and after, the
    experts gather back bit for bit, and the rebalanced state_dict loads into a fresh layer that computes the same."""
    for rank, out in enumerate(run_ranks(_fp8_rebalance_rank, 2, dispatcher, runner, use_fp8, timeout=400)):
        assert out.pop("moved") and all(out.pop(k) for k in ("held before", "held after", "gathered", "fresh")), (rank, out)
        if rank == 0:
            assert max(out.values()) < tolerance(torch.bfloat16), out
