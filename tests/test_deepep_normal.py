"""deepep_normal on gloo ranks: layout, counts, EPMoE == float64 reference (outputs and gradients),
handle reuse and static (num_worst_tokens) shapes."""
from contextlib import nullcontext

import pytest
import torch

import ep_runtime as ep
from ep_runtime.dispatchers import exchange_kernels as xk
from ep_runtime.dispatchers.rank_exchange import dispatch_layout
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import check_layer, make_problem, random_topk_ids, run_ranks, tolerance


def _python_layout(ids, E, R):
    L = E // R
    per_rank, per_expert = [0] * R, [0] * E
    in_rank = [[False] * R for _ in ids]
    for t, row in enumerate(ids):
        for e in row:
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // L] = True
        for r in range(R):
            per_rank[r] += in_rank[t][r]
    return per_rank, per_expert, in_rank


@pytest.mark.parametrize("T,E,K,R", [(0, 8, 2, 2), (1, 4, 1, 4), (57, 64, 8, 4), (33, 16, 4, 2), (20, 8, 8, 1)])
def test_layout_equals_python_reference(T, E, K, R):
    ids = random_topk_ids(torch.Generator().manual_seed(T + E), T, E, K, R, minus_one_fraction=0.3)
    layout = dispatch_layout(ids, E, R)
    per_rank, per_expert, in_rank = _python_layout(ids.tolist(), E, R)
    assert layout.num_tokens_per_rank.tolist() == per_rank
    assert layout.num_tokens_per_expert.tolist() == per_expert
    assert layout.is_token_in_rank.tolist() == in_rank


def _torch_layout(ids, placement):
    """DeepEP's layout from the placement's ownership table with plain torch ops."""
    E, R = placement.num_experts, placement.ep_size
    valid = ids >= 0
    in_rank = torch.zeros(ids.shape[0], R, dtype=torch.bool)
    for r in range(R):
        in_rank[:, r] = ((placement.rank_of(ids) == r) & valid).any(1)
    per_expert = torch.bincount(ids[valid].long(), minlength=E)
    return in_rank.sum(0).tolist(), per_expert.tolist(), in_rank.tolist()


def _get_dispatch_layout_rank(rank, world_size, E, K):
    dispatcher = ep.dispatchers.create("deepep_normal", ep.MoeConfig(E, K, 16, 8))
    ids = random_topk_ids(torch.Generator().manual_seed(rank), 19 + rank, E, K, world_size, minus_one_fraction=0.3)
    layout = dispatcher.get_dispatch_layout(ids)
    got = (layout.num_tokens_per_rank.tolist(), layout.num_tokens_per_expert.tolist(), layout.is_token_in_rank.tolist())
    shapes = [tuple(t.shape) for t in layout]
    return got, _torch_layout(ids, dispatcher.placement), shapes, ids.shape[0]


@pytest.mark.parametrize("E,K", [(8, 2), (16, 4)])
def test_get_dispatch_layout_matches_torch_reference(E, K):
    """The public DeepEP-style verb: num_tokens_per_rank [R], num_tokens_per_expert [E], is_token_in_rank
    [T, R] of this rank's routing, on 2 gloo ranks."""
    for got, expected, shapes, T in run_ranks(_get_dispatch_layout_rank, 2, E, K):
        assert shapes == [(2,), (E,), (T, 2)]
        assert got == expected


@pytest.mark.parametrize("ids,error", [
    (torch.tensor([[0, 9], [1, -1]]), "ValueError: topk_ids has id 9 at [0, 1]; allowed -1..7 (num_experts=8)"),
    (torch.tensor([[0, -2], [1, -1]], dtype=torch.int16), "ValueError: topk_ids has id -2 at [0, 1]; allowed -1..7"),
    (torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "TypeError: topk_ids has dtype torch.float32; expected a signed integer"),
    (torch.tensor([0, 1]), "ValueError: topk_ids has shape [2]; expected [T, 2]"),
    (torch.tensor([[0, 1, 2]]), "ValueError: topk_ids has shape [1, 3]; expected [T, 2]"),
])
def test_get_dispatch_layout_refuses_bad_ids_naming_them(ids, error):
    """An id outside [-1, E) was left out of every count without a word, float ids were counted as experts and
    1-D ids failed inside torch's scatter; now each is refused as dispatch refuses it."""
    dispatcher = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 16, 8))
    with pytest.raises((ValueError, TypeError)) as info:
        dispatcher.get_dispatch_layout(ids)
    assert f"{info.typename}: {info.value}".startswith(error), info.value
    layout = dispatcher.get_dispatch_layout(torch.zeros(0, 2, dtype=torch.int64))  # T = 0 is fine
    assert layout.num_tokens_per_expert.tolist() == [0] * 8


def _tokens(R):
    # Uneven, one rank (rank 1) with none.
    return [[13], [9, 0], [9, 0, 23], [9, 0, 23, 4]][R - 1]


def _normal_rank(rank, world_size, E, K, options):
    layer = ep.EPMoE(E, K, 32, 16, dispatcher="deepep_normal", runner="torch", dispatcher_options=options)
    problem = make_problem(layer.config, _tokens(world_size), seed=11 + E + K, ep_size=world_size)
    errors = check_layer(layer, problem, rank)
    # Token conservation: the per-expert receive counts equal the true counts over all ranks' tokens.
    out = layer.dispatcher.dispatch(problem.xs[rank].float(), ep.TopKOutput(problem.topk_ids[rank],
                                                                            problem.topk_weights[rank]))
    all_ids = torch.cat(problem.topk_ids).long()
    lo = layer.placement.first_expert
    truth = [int((all_ids == lo + e).sum()) for e in range(layer.placement.num_local_experts)]
    counted = out.num_recv_tokens_per_expert_tensor.tolist()
    real = (out.recv_topk_ids >= 0).sum().item()
    return errors, truth, counted, out.num_recv_tokens_per_expert, real


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("E,K", [(64, 8), (8, 2)])
def test_layer_matches_reference_on_ranks(R, E, K):
    results = (run_ranks(_normal_rank, R, E, K, {}) if R > 1 else [_normal_rank(0, 1, E, K, {})])
    for errors, truth, counted, listed, real in results:
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert counted == truth and listed == truth and real == sum(truth)


@pytest.mark.parametrize("R,per_peer", [(2, False), (4, False), (4, True)])
def test_static_shapes_num_worst_tokens(R, per_peer):
    # Every rank receives at most sum(tokens) rows; static mode pads to W and gives the same result.
    # per_peer: chunks of max(tokens) rows per peer instead of W.
    W = sum(_tokens(R))
    opts = {"num_worst_tokens": W, **({"num_max_dispatch_tokens_per_rank": max(_tokens(R))} if per_peer else {})}
    for errors, truth, counted, listed, real in run_ranks(_normal_rank, R, 16, 4, opts):
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert counted == truth and listed == [] and real == sum(truth)


def _too_small_rank(rank, world_size, options, message):
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", dispatcher_options=options)
    x = torch.randn(10, 16)
    ids = torch.zeros(10, 2, dtype=torch.int32)  # every token to expert 0 and -1
    ids[:, 1] = -1
    with pytest.raises(ValueError, match=message):
        layer(x, ids, torch.ones(10, 2))
    return True


@pytest.mark.parametrize("options,message", [
    # every token of both ranks goes to expert 0: 10 per peer chunk, 20 received by rank 0
    ({"num_worst_tokens": 3}, "num_worst_tokens=3 is too small for this step.*: raise num_worst_tokens to at least 20$"),
    ({"num_worst_tokens": 40, "num_max_dispatch_tokens_per_rank": 9},
     "num_worst_tokens=40 / num_max_dispatch_tokens_per_rank=9 is too small for this step.*: raise "
     "num_max_dispatch_tokens_per_rank to at least 10$"),
])
def test_num_worst_tokens_too_small_fails_every_rank(options, message):
    assert run_ranks(_too_small_rank, 2, options, message) == [True, True]


def _reuse_rank(rank, world_size):
    cfg = ep.MoeConfig(16, 4, 24, 8)
    d = ep.dispatchers.create("deepep_normal", cfg, alignment=4)
    gen = torch.Generator().manual_seed(rank)
    ids = random_topk_ids(gen, 19, 16, 4, world_size)
    x, w = torch.randn(19, 24, generator=gen), torch.rand(19, 4, generator=gen)
    first = d.dispatch(x, ep.TopKOutput(ids, w))
    again = d.dispatch(2 * x, ep.TopKOutput(ids, w), handle=first.handle)
    assert torch.equal(again.recv_x, 2 * first.recv_x)
    assert torch.equal(again.recv_topk_ids, first.recv_topk_ids)
    assert all(c % 4 == 0 for c in first.num_recv_tokens_per_expert)
    # Combine of the received rows themselves: each token comes back once per rank it visited.
    y = d.combine(ep.CombineInput(first.recv_x, first))
    visits = first.handle.layout.is_token_in_rank.sum(1, keepdim=True).float()
    assert torch.allclose(y, x * visits, rtol=1e-6, atol=1e-6)
    return True


@pytest.mark.parametrize("R", [2, 4])
def test_handle_reuse_and_alignment(R):
    assert run_ranks(_reuse_rank, R) == [True] * R


def _cached_dispatch_rank(rank, world_size, options):
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(16, 4, 24, 8), **options)
    gen = torch.Generator().manual_seed(rank)
    ids = random_topk_ids(gen, 19, 16, 4, world_size)
    x, w = torch.randn(19, 24, generator=gen, dtype=torch.float64), torch.rand(19, 4, generator=gen)
    first = d.dispatch(x, ep.TopKOutput(ids, w))
    cached = d.dispatch(3 * x, handle=first.handle)  # DeepEP's cached dispatch: x and the handle only
    same = (torch.equal(cached.recv_x, 3 * first.recv_x) and torch.equal(cached.recv_topk_ids, first.recv_topk_ids)
            and torch.equal(cached.recv_topk_weights, first.recv_topk_weights)
            and cached.num_recv_tokens_per_expert == first.num_recv_tokens_per_expert)
    y = d.combine(ep.CombineInput(cached.recv_x, cached))
    visits = first.handle.layout.is_token_in_rank.sum(1, keepdim=True).double()
    errors = []
    for call, message in ((lambda: d.dispatch(x), "topk=None with handle=NoneType"),
                          (lambda: d.dispatch(x[:7], handle=first.handle), "handle was made for 19 tokens; x has 7")):
        try:
            call()
        except (TypeError, ValueError) as e:
            errors.append(message in str(e))
    # The handle keeps the caller's tensors (weights in the dtype they travel in, float64 for float64 x, are not
    # copied either): routing written into them in place since (a buffer reused for the next step's routing) no
    # longer matches the plan, which would send pairs to ranks without their experts. Each rank changes its own, so
    # each refuses before any exchange.
    w = w.double()
    for name, t in (("topk_ids", ids), ("topk_weights", w)):
        handle = d.dispatch(x, ep.TopKOutput(ids, w)).handle
        t.copy_(random_topk_ids(gen, 19, 16, 4, world_size) if t is ids else torch.rand(19, 4, generator=gen))
        try:
            d.dispatch(x, handle=handle)
            errors.append(False)
        except ValueError as e:
            errors.append(f"handle's {name} changed in place since the handle was made" in str(e))
    return same, torch.equal(y, 3 * x * visits), errors


@pytest.mark.parametrize("options", [{}, {"num_worst_tokens": 40}])
def test_cached_dispatch_takes_x_and_the_handle(options):
    assert run_ranks(_cached_dispatch_rank, 2, options) == [(True, True, [True] * 4)] * 2


def _refilled_ids_rank(rank, world_size):
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 16, 8))
    gen = torch.Generator().manual_seed(rank)
    ids, w = random_topk_ids(gen, 6, 8, 2, world_size), torch.rand(6, 2, generator=gen)
    x = torch.randn(6, 16, generator=gen)
    first = d.dispatch(x, ep.TopKOutput(ids, w))
    w.mul_(2)  # new weights for the same routing: sent as given
    again = d.dispatch(x, ep.TopKOutput(ids, w), handle=first.handle)
    ids.copy_(random_topk_ids(gen, 6, 8, 2, world_size))  # the routing buffer refilled for the next step
    try:
        d.dispatch(x, ep.TopKOutput(ids, w), handle=first.handle)
        message = "no error"
    except ValueError as err:
        message = str(err)
    d.dispatch(x, ep.TopKOutput(ids, w))  # the group is still in step
    return message, torch.equal(again.recv_topk_weights, 2 * first.recv_topk_weights)


def test_a_handle_given_its_own_ids_changed_in_place_is_refused():
    """dispatch(x, TopKOutput(ids, w), handle=h) with ids the very tensor h was made with, refilled in place since
    (a routing buffer reused each step): the old plan sent the new ids' pairs to the old ranks, which dropped those
    whose expert they do not hold (rank 1 received 10 of its 13 pairs, no error). Refused now, as the cached
    dispatch without topk refuses it; weights changed in place are sent as given."""
    for message, weights_sent in run_ranks(_refilled_ids_rank, 2):
        assert weights_sent
        assert message == ("handle's topk_ids changed in place since the handle was made (version 0 -> 1); its plan no "
                           "longer matches them: dispatch without the handle for new routing, or pass topk= the "
                           "routing it was made for"), message


def _other_ids_rank(rank, world_size, options):
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 16, 8), **options)
    gen = torch.Generator().manual_seed(rank)
    ids, w = random_topk_ids(gen, 6, 8, 2, world_size), torch.rand(6, 2, generator=gen)
    x = torch.randn(6, 16, generator=gen)
    first = d.dispatch(x, ep.TopKOutput(ids, w))
    # the same routing in another tensor (another dtype too): accepted, sent by the handle's plan
    same = d.dispatch(2 * x, ep.TopKOutput(ids.clone().long(), w), handle=first.handle)
    other = ids.clone()
    other[4, 1] = (int(ids[4, 1]) + 3) % 8  # one id to another expert (on another rank for half of them)
    if int(other[4, 1]) == int(other[4, 0]):
        other[4, 1] = (int(other[4, 1]) + 1) % 8
    try:
        d.dispatch(x, ep.TopKOutput(other, w), handle=first.handle)
        message = "no error"
    except ValueError as err:
        message = str(err)
    again = d.dispatch(x, ep.TopKOutput(other, w))  # the group is still in step
    return (message, int(ids[4, 1]), int(other[4, 1]), torch.equal(same.recv_x, 2 * first.recv_x),
            torch.equal(same.recv_topk_ids, first.recv_topk_ids), again.recv_x.shape[1])


@pytest.mark.parametrize("options", [{}, {"num_worst_tokens": 24}])
def test_a_handle_given_other_ids_is_refused(options):
    """dispatch(x, TopKOutput(ids, w), handle=h) with ids another tensor than h was made with: the same routing is
    accepted (a clone, int64), other routing is refused naming topk_ids and the first place it differs (it was sent
    by the handle's plan: pairs whose expert moved to another rank were dropped, without a word)."""
    for message, made, given, same_x, same_ids, H in run_ranks(_other_ids_rank, 2, options):
        assert same_x and same_ids and H == 16
        assert message == (f"topk_ids[4, 1] = {given}, but the handle was made for routing with {made} there (1 ids "
                           f"differ); a handle fixes the routing (each token's ranks and each id's local expert, as "
                           f"DeepEP's): pass topk with the ids it was made for (or topk=None), or dispatch without "
                           f"handle= for new routing"), message


def _foreign_handle_rank(rank, world_size):
    """A handle sends each token to the ranks its plan named and tells them the local expert of each id: one
    made over another placement (another dispatcher's experts, or the layer's own before apply_placement moved
    experts between ranks) is an error naming both placements before any collective (its pairs reached ranks
    that no longer hold their experts, which dropped them); one of a dispatcher with the same placement serves."""
    E, K, H = 6, 2, 16
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(rank)
    ids = random_topk_ids(gen, 9, E, K, world_size)
    x, w = torch.randn(9, H, generator=gen, dtype=torch.float64), torch.rand(9, K, generator=gen)
    layer = ep.EPMoE(E, K, H, 8, dispatcher="deepep_normal", runner="torch", dtype=torch.float64)
    twin = ep.dispatchers.create("deepep_normal", layer.config)  # the same experts on the same ranks
    wider = ep.dispatchers.create("deepep_normal", ep.MoeConfig(2 * E, K, H, 8))
    handle = layer.dispatcher.dispatch(x, ep.TopKOutput(ids, w)).handle
    fresh = twin.dispatch(x, ep.TopKOutput(ids, w))
    served = twin.dispatch(x, handle=handle)
    same = torch.equal(served.recv_x, fresh.recv_x) and torch.equal(served.recv_topk_ids, fresh.recv_topk_ids)
    errors = []
    try:
        wider.dispatch(x, ep.TopKOutput(ids, w), handle=handle)
    except ValueError as err:
        errors.append(str(err))
    layer.apply_placement(ep.ExpertPlacement(E, world_size, rank, [(e + 1) % world_size for e in range(E)]))
    try:
        layer.dispatcher.dispatch(x, handle=handle)
    except ValueError as err:
        errors.append(str(err))
    try:
        layer.dispatcher.dispatch(x, ep.TopKOutput(ids, w), handle=fresh)
    except TypeError as err:
        errors.append(str(err))
    y = layer(x, ids, w)  # a fresh dispatch after the move is right
    experts = layer.gather_experts()
    return same, errors, rel_err(y, moe_reference(x, ids, w.double(), experts.w13, experts.w2, layer.config))


def test_a_handle_made_over_another_placement_is_refused():
    contiguous = "num_experts=6, ep_size=3, expert_to_rank=contiguous"
    for same, errors, err in run_ranks(_foreign_handle_rank, 3):
        assert same and err <= 1e-12, err
        assert errors == [
            f"handle was made for {contiguous}; allowed: a handle made for this dispatcher's experts and ranks, "
            "num_experts=12, ep_size=3, expert_to_rank=contiguous (reuse a handle only for the placement it was made "
            "over: after apply_placement moved experts between ranks, dispatch again without it)",
            f"handle was made for {contiguous}; allowed: a handle made for this dispatcher's experts and ranks, "
            "num_experts=6, ep_size=3, expert_to_rank=[1, 2, 0, 1, 2, 0] (reuse a handle only for the placement it "
            "was made over: after apply_placement moved experts between ranks, dispatch again without it)",
            "handle=DeepEPNormalDispatchOutput; allowed: None or the handle of an earlier deepep_normal dispatch",
        ], errors


def _handle_of_other_shapes_rank(rank, world_size):
    """A handle made by a dispatcher whose receive side is shaped otherwise (host plan vs num_worst_tokens W, another
    W, another chunk) over the same experts: each reuse is refused before any exchange (the host plan's handle in a
    num_worst_tokens=30 dispatcher gave its variable row counts, breaking the static shapes a CUDA graph needs, and
    the static handle in a host-plan dispatcher gave 30 rows and no counts)."""
    config = ep.MoeConfig(8, 2, 16, 8)
    gen = torch.Generator().manual_seed(rank)
    topk = ep.TopKOutput(random_topk_ids(gen, 6, 8, 2, world_size), torch.rand(6, 2, generator=gen))
    x = torch.randn(6, 16, generator=gen)
    options = [{}, {"num_worst_tokens": 30}, {"num_worst_tokens": 40}, {"num_worst_tokens": 30,
                                                                          "num_max_dispatch_tokens_per_rank": 12}]
    made = [ep.dispatchers.create("deepep_normal", config, **o) for o in options]
    outs = [d.dispatch(x, topk) for d in made]
    errors = {}
    for i, d in enumerate(made):
        for j, out in enumerate(outs):
            try:
                again = d.dispatch(x, topk, handle=out.handle)
                errors[(i, j)] = torch.equal(again.recv_x, out.recv_x)
            except ValueError as err:
                errors[(i, j)] = str(err)
    return errors


def test_a_handle_of_other_receive_shapes_is_refused():
    settings = ["num_worst_tokens=None", "num_worst_tokens=30", "num_worst_tokens=40",
                "num_worst_tokens=30 / num_max_dispatch_tokens_per_rank=12"]
    for errors in run_ranks(_handle_of_other_shapes_rank, 2):
        for (i, j), got in errors.items():
            assert got == (True if i == j else f"handle was made with {settings[j]}; allowed: a handle made with this "
                           f"dispatcher's {settings[i]} (its receive shapes)"), (i, j, got)


def _reuse_in_another_dtype_rank(rank, world_size, options):
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 16, 8), **options)
    gen = torch.Generator().manual_seed(rank)
    topk = ep.TopKOutput(random_topk_ids(gen, 6, 8, 2, world_size), torch.rand(6, 2, generator=gen))
    x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    out = d.dispatch(x, topk)
    try:
        d.dispatch(x.float(), topk, handle=out.handle)
        message = "no error"
    except TypeError as err:
        message = str(err)
    again = d.dispatch(2 * x, handle=out.handle)  # the group is still in step
    return message, torch.equal(again.recv_x, 2 * out.recv_x)


@pytest.mark.parametrize("options", [{}, {"num_worst_tokens": 24}], ids=["host_plan", "static_plan"])
def test_a_handle_reused_with_x_of_another_dtype_is_refused(options):
    """The count table checks x's dtype alike on every rank; a reuse reads none, so one rank reusing the handle
    with x of another dtype sent rows of another byte count and gloo aborted the process ("Received data size
    doesn't match expected size"). Now the handle names the dtype it was made for, on the rank that changed it,
    before any exchange (a dtype change dispatches without the handle, whose count table checks every rank)."""
    for message, same in run_ranks(_reuse_in_another_dtype_rank, 2, options):
        assert message == ("handle was made for x of dtype torch.float64; x has dtype torch.float32 (allowed: "
                           "torch.float64; for another dtype dispatch without the handle, which checks that every "
                           "rank changed it)"), message
        assert same


def _inference_handle_rank(rank, world_size, options):
    """A handle made under torch.inference_mode (an evaluation pass), reused by a dispatch that needs
    gradients: outputs and gradients of x and of the router weights equal the float64 reference."""
    from ep_runtime.reference import moe_reference, rel_err
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", dtype=torch.float64,
                     dispatcher_options=options)
    problem = make_problem(layer.config, [11, 5], seed=5, ep_size=world_size)
    layer.load_experts(problem.w13, problem.w2)
    ids, weights = problem.topk_ids[rank], problem.topk_weights[rank].double()
    with torch.inference_mode():
        handle = layer.dispatcher.dispatch(problem.xs[rank], ep.TopKOutput(ids, weights)).handle
    x, w = problem.xs[rank].clone().requires_grad_(True), weights.clone().requires_grad_(True)
    y = layer.experts_and_combine(layer.dispatcher.dispatch(x, ep.TopKOutput(ids, w), handle=handle))
    (y * problem.grad_outputs[rank]).sum().backward()
    x64, w64 = problem.xs[rank].clone().requires_grad_(True), weights.clone().requires_grad_(True)
    ref = moe_reference(x64, ids, w64, problem.w13, problem.w2, layer.config)
    (ref * problem.grad_outputs[rank]).sum().backward()
    # the experts' gradients are covered by the matrix tests; here: what crosses the reused plan
    return rel_err(y.detach(), ref.detach()), rel_err(x.grad, x64.grad), rel_err(w.grad, w64.grad)


@pytest.mark.parametrize("options", [None, {"num_worst_tokens": 24}], ids=["host_plan", "static_plan"])
def test_handle_made_in_inference_mode_serves_a_training_dispatch(options):
    for errors in run_ranks(_inference_handle_rank, 2, options):
        # float64 layer; the router weights' gradient comes through fp32 (the dispatch's weights are fp32)
        assert max(errors[:2]) <= tolerance(torch.float64) and errors[2] <= tolerance(torch.float32), errors


def _one_bad_rank(rank, world_size, dispatcher):
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch")
    ids = torch.tensor([[0, 5], [3, 7]], dtype=torch.int32)
    if rank == 1:
        ids[1, 0] = 8
    layer(torch.randn(2, 16), ids, torch.ones(2, 2))


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "mori"])
def test_one_rank_with_bad_ids_fails_every_rank_at_once(dispatcher):
    # The ids check rides in the count table, so rank 0 learns of rank 1's bad input at once (no timeout).
    with pytest.raises(ep.testing.RankFailure) as failure:
        run_ranks(_one_bad_rank, 2, dispatcher, timeout=60, group_timeout=300)
    text = str(failure.value)
    assert "topk_ids has id 8 at [1, 0]; allowed -1..7" in text
    assert "rank 1 got invalid topk_ids or topk_weights" in text


def _receiver_view_rank(rank, world_size, options, kernels):
    """What DeepEP's receiver sees, from every rank's seeded routing (-1 holes, repeated experts): rows
    from each source rank in token order, ids local to this rank (-1 where the expert lives elsewhere or
    nowhere), weights kept only where the id is kept (0 elsewhere), static pad rows id -1 weight 0."""
    E, K, H = 8, 3, 16
    L = E // world_size
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(E, K, H, 8), **options)
    inputs = []
    for r in range(world_size):
        gen = torch.Generator().manual_seed(100 + r)
        T = 5 + 3 * r
        inputs.append((torch.randn(T, H, generator=gen), torch.randint(-1, E, (T, K), generator=gen),
                       torch.rand(T, K, generator=gen)))
    x, ids, weights = inputs[rank]
    weights = weights.clone().requires_grad_()
    with xk.forced() if kernels else nullcontext():
        out = d.dispatch(x, ep.TopKOutput(ids, weights))
        out.recv_topk_weights.sum().backward()
    want_ids, want_weights = [], []
    for _, src_ids, src_weights in inputs:
        here = (src_ids >= 0) & (src_ids // L == rank)
        want_ids.append(torch.where(here, src_ids - rank * L, -1)[here.any(1)])
        want_weights.append(torch.where(here, src_weights, 0.0)[here.any(1)])
    want_ids, want_weights = torch.cat(want_ids), torch.cat(want_weights)
    pad = out.recv_topk_ids.shape[0] - want_ids.shape[0]  # static mode: rows past the received ones
    want_ids = torch.cat([want_ids, want_ids.new_full((pad, K), -1)])
    want_weights = torch.cat([want_weights, want_weights.new_zeros(pad, K)])
    # each kept (token, slot) reaches exactly one rank, so d(sum of received weights)/d(weight) is 1 there
    return (torch.equal(out.recv_topk_ids.long(), want_ids), torch.equal(out.recv_topk_weights, want_weights),
            torch.equal(weights.grad, (ids >= 0).float()))


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("options", [{}, {"num_worst_tokens": 40}])
def test_receiver_sees_deepep_ids_and_weights(R, options):
    # DeepEP's intranode dispatch zeroes recv_topk_weights where recv_topk_idx is -1 (its test sums the
    # received weights over ranks back into the sent ones); ours did not.
    assert run_ranks(_receiver_view_rank, R, options, False) == [(True, True, True)] * R


@pytest.mark.skipif(xk.triton is None, reason="triton not installed")
def test_receiver_sees_deepep_ids_and_weights_kernel_path():
    assert run_ranks(_receiver_view_rank, 2, {}, True, timeout=240) == [(True, True, True)] * 2


def test_compiled_dispatch_with_per_call_options_traces_no_cached_helper():
    """dispatch(..., handle=None) under torch.compile: the per-call options' check read an lru_cache'd helper,
    which dynamo traces through with a warning naming our code ('Dynamo detected a call to a
    functools.lru_cache-wrapped function'); it is now read plainly while tracing, and the output is the eager one."""
    import warnings

    torch.manual_seed(0)
    layer = ep.EPMoE(num_experts=4, top_k=2, hidden_size=8, intermediate_size=8, dispatcher="deepep_normal",
                     runner="torch")
    dispatcher = layer.dispatcher

    def rows(x, ids, w):
        return dispatcher.dispatch(x, ep.TopKOutput(ids, w), handle=None).recv_x * 2

    x, ids, w = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(rows, backend="aot_eager")(x, ids, w)
    assert torch.equal(got, rows(x, ids, w))
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]


def test_huge_num_worst_tokens_is_refused_before_any_allocation():
    """Static buffers larger than the machine's memory are an error naming the setting and the memory, when built."""
    cfg = ep.MoeConfig(8, 2, 4096, 8)  # (H large enough that 2**31 rows exceed any GPU's or host's memory)
    with pytest.raises(ValueError, match=r"num_worst_tokens=2147483647: its buffers would take at least"):
        ep.dispatchers.create("deepep_normal", cfg, num_worst_tokens=2 ** 31 - 1)
    with pytest.raises(ValueError, match=r"num_worst_tokens=64 / num_max_dispatch_tokens_per_rank=2147483647: its"):
        ep.dispatchers.create("deepep_normal", cfg, num_worst_tokens=64, num_max_dispatch_tokens_per_rank=2 ** 31 - 1)
    assert ep.dispatchers.create("deepep_normal", cfg, num_worst_tokens=8192 * 8).num_worst_tokens == 8192 * 8
