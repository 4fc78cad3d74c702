"""The slow calls every rank of a layer's group makes together (gather_experts, rebalance, apply_placement):
a bad argument on one rank only, or an argument that must be equal on every rank but is not, fails every
rank at once with the same error, naming the argument, the value, what is allowed and the rank(s), before
any collective; the group stays usable and the good call works afterwards.

Before, the rank with the bad argument raised alone and the others waited in the call's first collective
until the group's timeout (or, with different dst / num_nodes / plans, paired different collectives)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.placement import ExpertPlacement
from ep_runtime.testing import run_ranks

TIMEOUT_S = 3  # the gloo group's timeout: a rank left waiting in a collective fails after it, too late for the test
E, K, H, I = 8, 2, 16, 8


def _reversed_placement(R: int) -> ExpertPlacement:
    """Slot p holds expert E - 1 - p: every expert crosses ranks."""
    return ExpertPlacement(E, R, 0, physical_to_logical=list(reversed(range(E))))


# case -> (call(layer, bad, rank, world_size) made by every rank; bad: this rank passes the bad argument,
#          the message every rank must raise ({bad} is the bad rank's name), the call that must work afterwards)
CASES = {
    "gather_experts_dst_out_of_range": (
        lambda layer, bad, rank, R: layer.gather_experts(dst=R + 3 if bad else 0),
        "ValueError: rank {bad}: dst={R3}; allowed: None (every rank) or a rank 0..{Rm1} of the layer's group "
        "(gather_experts: every rank stops before gathering)",
        lambda layer: None),
    "gather_experts_dst_differs": (
        lambda layer, bad, rank, R: layer.gather_experts(dst=1 if bad else 0),
        "ValueError: rank {bad} was given a different dst than rank 0 ({each}); allowed: the same dst on every "
        "rank (gather_experts: every rank stops before gathering)",
        lambda layer: None),
    "rebalance_num_nodes_out_of_range": (
        lambda layer, bad, rank, R: layer.rebalance(num_nodes=3 if bad else None),
        "ValueError: rank {bad}: num_nodes=3; allowed: None or an int >= 1 dividing num_ranks={R}, num_experts=8 "
        "and num_physical_experts=8 (rebalance: every rank stops before its first collective)",
        lambda layer: layer.rebalance()),
    "rebalance_num_nodes_differs": (
        lambda layer, bad, rank, R: layer.rebalance(num_nodes=2 if bad else None),
        "ValueError: rank {bad} was given a different num_nodes than rank 0 ({each_nodes}); allowed: the same "
        "num_nodes on every rank (rebalance: every rank stops before its first collective)",
        lambda layer: layer.rebalance()),
    "rebalance_optimizer_not_an_optimizer": (
        lambda layer, bad, rank, R: layer.rebalance(optimizer=object() if bad else None),
        "TypeError: rank {bad}: optimizer=object; allowed: None or the optimizer of this layer's parameters (a "
        "torch.optim.Optimizer: its per-parameter .state moves with the slots) (rebalance: every rank stops before "
        "its first collective)",
        lambda layer: layer.rebalance()),
    "rebalance_dp_group_on_one_rank": (  # (every rank makes the group: new_group is collective)
        lambda layer, bad, rank, R: (lambda dp: layer.rebalance(dp_group=dp if bad else None))(dist.new_group()),
        "ValueError: rank {bad} was given a different dp_group size than rank 0 ({each_dp}); allowed: the same "
        "dp_group size on every rank (rebalance: every rank stops before its first collective)",
        lambda layer: layer.rebalance()),
    "apply_placement_plan_not_a_plan": (
        lambda layer, bad, rank, R: layer.apply_placement("contiguous" if bad else _reversed_placement(R)),
        "TypeError: rank {bad}: plan must be an ep.eplb.Plan or an ep.ExpertPlacement; got str (apply_placement: "
        "every rank stops before moving its slots)",
        lambda layer: layer.apply_placement(_reversed_placement(layer.placement.ep_size))),
    "apply_placement_plan_for_other_ranks": (
        lambda layer, bad, rank, R: layer.apply_placement(
            ep.eplb.plan(torch.ones(E), 2 * R if bad else R, E)),
        "ValueError: rank {bad}: plan is for num_ranks={R2}; this layer's placement has ep_size={R} (allowed: {R}) "
        "(apply_placement: every rank stops before moving its slots)",
        lambda layer: layer.apply_placement(_reversed_placement(layer.placement.ep_size))),
    "apply_placement_plan_differs": (
        lambda layer, bad, rank, R: layer.apply_placement(
            _reversed_placement(R) if bad else ExpertPlacement(E, R, 0, physical_to_logical=[1, 0] + list(range(2, E)))),
        "ValueError: rank {bad} was given a different plan than rank 0",
        lambda layer: layer.apply_placement(_reversed_placement(layer.placement.ep_size))),
    "apply_placement_optimizer_on_one_rank": (
        lambda layer, bad, rank, R: layer.apply_placement(_reversed_placement(R), optimizer=layer.optimizer if bad
                                                          else None),
        "ValueError: rank {bad} was given a different set of .grad and optimizer state tensors to move than rank 0",
        lambda layer: layer.apply_placement(_reversed_placement(layer.placement.ep_size), optimizer=layer.optimizer)),
}



def _bad_then_good(layer, bad, good, w13, w2):
    """(what bad() raised, or "returned"; its seconds; whether layer.w13 stayed as it was; whether, after good()
    (the group still usable, the good call working), gather_experts gives back the global w13 and w2)."""
    before = layer.w13.detach().clone()
    start, message = time.monotonic(), "returned"
    try:
        bad()
    except Exception as err:  # noqa: BLE001 - every rank reports what it raised
        message = f"{type(err).__name__}: {err}"
    seconds, unchanged = time.monotonic() - start, torch.equal(layer.w13, before)
    good()
    gathered = layer.gather_experts()
    return message, seconds, unchanged, torch.equal(gathered.w13, w13) and torch.equal(gathered.w2, w2)

def _case_rank(rank, world_size, case):
    """Every rank builds the layer from the same global weights, runs a training step (so there is a load,
    .grad and Adam state), then makes the case's call, the last rank with the bad argument."""
    call, _, good = CASES[case]
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", group=None)
    layer.load_experts(w13, w2)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(rank + 1))
    layer(x, router_logits=torch.randn(6, E, generator=gen)).square().sum().backward()
    layer.optimizer = torch.optim.Adam(layer.parameters(), lr=0.0)  # lr 0: the weights stay the loaded ones
    layer.optimizer.step()
    message, seconds, _, same = _bad_then_good(layer, lambda: call(layer, rank == world_size - 1, rank, world_size),
                                               lambda: good(layer), w13, w2)
    return message, seconds, same  # same: the experts survived every move


def _expected(case: str, R: int) -> str:
    bad = R - 1
    names = [f"rank {r} has {1 if r == bad else 0}" for r in range(R)]
    nodes = [f"rank {r} has {2 if r == bad else None}" for r in range(R)]
    dp = [f"rank {r} has {R if r == bad else None}" for r in range(R)]
    return CASES[case][1].format(bad=bad, R=R, R2=2 * R, R3=R + 3, Rm1=R - 1, each=", ".join(names),
                                 each_nodes=", ".join(nodes), each_dp=", ".join(dp))


@pytest.mark.parametrize("case, world_size", [(case, 2) for case in CASES] + [
    (case, 4) for case in ("gather_experts_dst_differs", "rebalance_num_nodes_out_of_range",
                           "apply_placement_plan_differs")])
def test_one_rank_with_a_bad_or_different_argument_fails_every_rank_at_once(case, world_size):
    results = run_ranks(_case_rank, world_size, case, timeout=60, group_timeout=TIMEOUT_S)
    expected = _expected(case, world_size)
    messages = [message for message, _, _ in results]
    assert all(message == messages[0] for message in messages), messages  # the same error on every rank
    assert messages[0].startswith(expected), (messages[0], expected)
    for rank, (_, seconds, same) in enumerate(results):
        assert seconds < TIMEOUT_S / 2, (rank, seconds)  # at once: no rank waited out a collective
        assert same, rank


# ---------------------------------------------------------------- load_state_dict

def _bad_state_dict_rank(rank, world_size, case):
    """Every rank loads its own per-rank state_dict; the last rank's holds a NaN (in the layer's own placement:
    no slot moves) or a placement table of the wrong shape (the others' table moves the slots), or ("placement")
    is valid alone but in the default placement (no table) while the others' were saved after a move, or
    ("tensors") lacks w2 (a strict=False load) where every rank's load moves the slots."""
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    moved = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch",
                     expert_to_rank=[e % world_size for e in range(E)])
    moved.load_experts(w13, w2)
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    good = {k: v.clone() for k, v in (moved if case in ("table", "placement", "tensors") else layer).state_dict().items()}
    if case == "nan":
        layer.load_experts(w13, w2)
        good = {k: v.clone() for k, v in layer.state_dict().items()}
    state = {k: v.clone() for k, v in good.items()}
    if case == "placement":  # (every rank builds it: building a layer is collective)
        plain = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
        plain.load_experts(w13, w2)
        if rank == world_size - 1:
            state = {k: v.clone() for k, v in plain.state_dict().items()}
    elif case == "tensors":
        if rank == world_size - 1:  # (its w2 would move to the others' placement: one exchange they do not make)
            del state["w2"]
    elif rank == world_size - 1:
        if case == "nan":
            state["w13"][1, 2, 3] = float("nan")
        else:
            state["expert_placement"] = state["expert_placement"][:, :-1]
    return _bad_then_good(layer, lambda: layer.load_state_dict(state), lambda: layer.load_state_dict(good), w13, w2)


@pytest.mark.parametrize("case, expected", [
    ("nan", "ValueError: rank {bad}: state_dict['w13'] has a non-finite value nan at [1, 2, 3] (each rank's "
            "state_dict; every rank stops before loading it)"),
    ("table", "ValueError: rank {bad}: state_dict['expert_placement'] has shape [2, 7]; expected [2, 8] (each "
              "physical slot's rank and logical expert) (each rank's state_dict; every rank stops before loading it)"),
])
@pytest.mark.parametrize("world_size", [2, 4])
def test_one_rank_with_a_bad_state_dict_fails_every_rank_at_once(case, expected, world_size):
    """load_state_dict with a bad value or placement table on one rank only: before, that rank raised alone
    and the others loaded (their next forward then waited for it) or went into the move's collectives and
    waited there until the timeout."""
    results = run_ranks(_bad_state_dict_rank, world_size, case, timeout=60, group_timeout=TIMEOUT_S)
    for rank, (message, seconds, unchanged, good_load_works) in enumerate(results):
        assert message == expected.format(bad=world_size - 1), (rank, message)
        assert seconds < TIMEOUT_S / 2 and unchanged and good_load_works, (rank, seconds, unchanged, good_load_works)


@pytest.mark.parametrize("case, what", [
    ("placement", "placement (state_dict['expert_placement'], the default one where absent)"),
    ("tensors", "set of expert tensors in the state_dict"),
])
@pytest.mark.parametrize("world_size", [2, 4])
def test_state_dicts_of_different_placements_fail_every_rank_at_once(case, what, world_size):
    """load_state_dict where one rank's state_dict names another placement than the others', or holds other expert
    tensors where the load moves the slots: before, the ranks made different moves (that rank none, or one
    exchange more), so they paired different collectives (the others waited until the timeout, or read garbage)."""
    results = run_ranks(_bad_state_dict_rank, world_size, case, timeout=60, group_timeout=TIMEOUT_S)
    for rank, (message, seconds, unchanged, good_load_works) in enumerate(results):
        assert message.startswith(f"ValueError: rank {world_size - 1} was given a different {what} than rank 0"), \
            (rank, message)
        assert message.endswith(f"; allowed: the same {what} on every rank (each rank's state_dict; every rank stops "
                                f"before loading it)"), (rank, message)
        assert seconds < TIMEOUT_S / 2 and unchanged and good_load_works, (rank, seconds, unchanged, good_load_works)


# ---------------------------------------------------------------- load_experts

def _bad_load_experts_rank(rank, world_size, case):
    """Every rank loads the same global weights; the last rank's copy holds a NaN in one of its own experts
    (the last one), or its w2 has another shape."""
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    bad13, bad2 = w13.clone(), w2
    if rank == world_size - 1:
        if case == "nan":
            bad13[E - 1, 2, 3] = float("nan")
        else:
            bad2 = w2[:, :, :-1]
    return _bad_then_good(layer, lambda: layer.load_experts(bad13, bad2), lambda: layer.load_experts(w13, w2), w13, w2)


@pytest.mark.parametrize("case, expected", [
    ("nan", "ValueError: rank {bad}: w13 (experts {experts}) has a non-finite value nan at [{row}, 2, 3] "
            "(load_experts: every rank stops before loading)"),
    ("shape", "ValueError: rank {bad}: w2 has shape [8, 16, 7]; expected [8, 16, 8] (load_experts: every rank stops "
              "before loading)"),
])
@pytest.mark.parametrize("world_size", [2, 4])
def test_one_rank_with_a_bad_expert_tensor_fails_every_rank_at_once(case, expected, world_size):
    """load_experts with a NaN or a wrong shape on one rank only: before, that rank raised alone and the others
    loaded and went on into their next forward, where they waited for it."""
    results = run_ranks(_bad_load_experts_rank, world_size, case, timeout=60, group_timeout=TIMEOUT_S)
    L = E // world_size
    first = (world_size - 1) * L
    expected = expected.format(bad=world_size - 1, experts=f"{first}..{E - 1}", row=L - 1)
    for rank, (message, seconds, unchanged, good_load_works) in enumerate(results):
        assert message == expected, (rank, message, expected)
        assert seconds < TIMEOUT_S / 2 and unchanged and good_load_works, (rank, seconds, unchanged, good_load_works)


# ---------------------------------------------------------------- distributed checkpoints

def _bad_distributed_state_dict_rank(rank, world_size):
    """ep.load_distributed_state_dict of the dict ep.distributed_state_dict gave (as dcp.load fills it), the last
    rank's placement table cut short (a table of another number of slots)."""
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    layer.load_experts(w13, w2)
    state = ep.distributed_state_dict(layer)
    if rank == world_size - 1:
        state = {**state, "expert_placement": state["expert_placement"][:, :-1]}
    message, seconds, _, good_load_works = _bad_then_good(
        layer, lambda: ep.load_distributed_state_dict(layer, state),
        lambda: ep.load_distributed_state_dict(layer, ep.distributed_state_dict(layer)), w13, w2)
    return message, seconds, good_load_works


def test_one_rank_with_a_bad_distributed_state_dict_fails_every_rank_at_once():
    """The rank whose table could not be read raised alone; the others went on into the load and waited in its
    all_gather until the timeout."""
    results = run_ranks(_bad_distributed_state_dict_rank, 2, timeout=60, group_timeout=TIMEOUT_S)
    for rank, (message, seconds, good_load_works) in enumerate(results):
        assert message.startswith("ValueError: rank 1: the model: the checkpoint holds 7 physical expert slots "
                                  "(expert_placement [2, 7]), this layer 8"), (rank, message)
        assert message.endswith("(load_distributed_state_dict: every rank stops before loading)"), (rank, message)
        assert seconds < TIMEOUT_S / 2 and good_load_works, (rank, seconds, good_load_works)


def _cast_on_one_rank(rank, world_size, call):
    """The last rank's layer is cast to bfloat16 (.to(dtype) there only), then every rank makes `call`, which
    exchanges the experts' bytes; then every rank casts back, and the call works."""
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    layer.load_experts(w13, w2)
    if rank == world_size - 1:
        layer.to(torch.bfloat16)
    run = {"gather_experts": lambda: layer.gather_experts(),
           "apply_placement": lambda: layer.apply_placement(_reversed_placement(world_size))}[call]
    start, message = time.monotonic(), "returned"
    try:
        run()
    except Exception as err:  # noqa: BLE001 - every rank reports what it raised
        message = f"{type(err).__name__}: {err}"
    seconds = time.monotonic() - start
    layer.float()
    run()
    return message, seconds


@pytest.mark.parametrize("call, stops", [("gather_experts", "gather_experts: every rank stops before gathering"),
                                         ("apply_placement", "apply_placement: every rank stops before moving its "
                                                             "slots")])
def test_experts_of_another_dtype_on_one_rank_fail_every_rank_at_once(call, stops):
    """gather_experts and apply_placement (rebalance) send the experts' raw bytes: a layer cast to another dtype
    on one rank only made gloo abort a process ("Received data size doesn't match expected size"), or, for
    dtypes of one size, read one dtype's bits as the other's. The dtypes now ride in the argument check's
    all_gather: every rank raises the same error naming each rank's, before any byte moves."""
    results = run_ranks(_cast_on_one_rank, 2, call, timeout=60, group_timeout=TIMEOUT_S)
    expected = (f"ValueError: rank 1 was given a different expert dtype than rank 0 (rank 0 has 'w13 torch.float32, "
                f"w2 torch.float32', rank 1 has 'w13 torch.bfloat16, w2 torch.bfloat16'); allowed: the same expert "
                f"dtype on every rank ({stops})")
    for rank, (message, seconds) in enumerate(results):
        assert message == expected, (rank, message)
        assert seconds < TIMEOUT_S / 2, (rank, seconds)
