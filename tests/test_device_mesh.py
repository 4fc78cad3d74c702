"""The layer inside a larger job, as torchtitan builds it: a 2-D DeviceMesh, world 4 = dp 2 x ep 2, each
layer over mesh["ep"].get_group() ([0, 1] and [2, 3]); the ranks holding the same experts (mesh["dp"]:
[0, 2] and [1, 3]) are data-parallel replicas. Each ep group routes its own tokens (different data per
group). Four gloo ranks on a small machine: tiny shapes, one process start per test."""
import os
import re

import pytest
import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.distributed import naming_peer_failures
from ep_runtime.reference import rel_err
from ep_runtime.testing import check_layer, make_problem, mean_loss_reference, run_ranks, tolerance

WORLD, DP, EP = 4, 2, 2


def _mesh():
    """(dp x ep mesh, this rank's dp coordinate): ep groups [0, 1], [2, 3]; dp groups [0, 2], [1, 3]."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (DP, EP), mesh_dim_names=("dp", "ep"))
    return mesh, mesh.get_coordinate()[0]


def _rebalance_rank(rank, world_size, path):
    """Each dp replica sees other hot experts; rebalance(dp_group=...) sums the load over the replicas too,
    so every replica applies one plan (before, each planned from its own load: replica 0 and replica 1 put
    different experts in the same slots, silently, and a dcp.save of the model kept some rows of each)."""
    import torch.distributed.checkpoint as dcp
    mesh, dp = _mesh()
    torch.manual_seed(0)  # the replicas start with the same experts
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", group=mesh["ep"].get_group(),
                     num_redundant_experts=2)
    hot = [0, 1] if dp == 0 else [6, 7]
    ids = torch.tensor([hot] * 20 + [[2, 3]] * 2, dtype=torch.int32)
    layer(torch.randn(ids.shape[0], 16), ids, torch.ones(ids.shape))
    world_load = layer.expert_load()
    dist.all_reduce(world_load)
    if dp == 1:  # ep group [2, 3], its rank 1 given another plan: named by both numbers, nothing moves
        own = ep.eplb.plan(layer.expert_load() if rank == 3 else world_load, EP, layer.placement.num_physical_experts)
        with pytest.raises(ValueError, match=r"rank 1 \(global rank 3\) was given a different plan than rank 0 "
                                             r"\(global rank 2\)"):
            layer.apply_placement(own)
    plan = layer.rebalance(dp_group=mesh["dp"])  # (the mesh's dimension, or its group: mesh["dp"].get_group())
    expected = ep.eplb.plan(world_load, EP, layer.placement.num_physical_experts).physical_to_logical
    dcp.save(ep.distributed_state_dict(layer), checkpoint_id=path)
    return list(plan.physical_to_logical), list(expected), layer.gather_experts().w13.tolist()


def _load_rank(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    torch.manual_seed(1)  # other experts: the checkpoint's must replace them
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", num_redundant_experts=2)
    state = ep.distributed_state_dict(layer)
    dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())
    ep.load_distributed_state_dict(layer, state)
    return list(layer.placement.physical_to_logical), layer.gather_experts().w13.tolist()


def test_rebalance_over_dp_replicas_and_their_checkpoint(tmp_path):
    saved = run_ranks(_rebalance_rank, WORLD, str(tmp_path), timeout=60)
    plans = [plan for plan, _, _ in saved]
    assert plans == [saved[0][1]] * WORLD, plans  # one plan everywhere, from the world's load
    assert all(w13 == saved[0][2] for _, _, w13 in saved)  # (lists of floats: bit for bit)
    # DCP keeps one copy of the replicas' identical shards (twice the expert bytes if it kept both) ...
    expert_bytes = 10 * (16 * 16 + 16 * 8) * 4
    assert sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".distcp")) < 2 * expert_bytes
    # ... and they load in a plain ep 2 job: the same placement, the same experts, bit for bit
    for placement, w13 in run_ranks(_load_rank, EP, str(tmp_path), timeout=60):
        assert placement == plans[0] and w13 == saved[0][2]


def _ep_subgroup_rank(rank, world_size):
    """Forward and gradients of a layer over an ep subgroup, both groups running at once on different data,
    against the float64 reference over its group's tokens."""
    mesh, dp = _mesh()
    group = mesh["ep"].get_group()
    errors = {}
    for dispatcher, options in [("deepep_normal", None), ("mori", {"max_dispatch_tokens_per_rank": 8})]:
        layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch", group=group, dispatcher_options=options)
        problem = make_problem(layer.config, [7, 5], seed=40 + dp, ep_size=EP)  # other tokens and experts per group
        errors[dispatcher] = check_layer(layer, problem, dist.get_rank(group))
    # Messages about a rank of the group name its global rank too (the process a log shows): settings that
    # differ (a real all_gather over the group) and a peer that does not answer (gloo's words for it).
    g = dist.get_rank(group)
    with pytest.raises(ValueError) as disagree:
        ep.dispatchers.create("deepep_normal", layer.config, group=group, alignment=1 + g)
    with pytest.raises(ep.PeerFailure) as failure:
        with naming_peer_failures(layer.dispatcher, "dispatch"):
            raise RuntimeError("[gloo] Timed out waiting 3000ms for recv operation to complete")
    # group= takes the mesh's dimension itself; a group this rank is not in is named as such
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", group=mesh["ep"])
    assert (layer.dispatcher.group, layer.placement.rank, layer.placement.ep_size) == (group, g, EP)
    first_group = dist.new_group([0, 1])  # every rank creates it; ranks 2 and 3 are not in it
    if rank >= 2:
        with pytest.raises(ValueError, match=rf"group holds global ranks \[0, 1\]; this process \(global rank {rank}\) "
                                             r"is not one of them"):
            ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", group=first_group)
    return errors, str(disagree.value), str(failure.value)


def test_layers_on_ep_subgroups_match_the_reference():
    results = run_ranks(_ep_subgroup_rank, WORLD, timeout=60)
    for errors, _, _ in results:
        for dispatcher, e in errors.items():
            assert max(e.values()) <= tolerance(torch.float32), (dispatcher, e)
    # ep group [0, 1]: group ranks are global ranks; [2, 3]: both numbers
    assert "rank 0 has 1, rank 1 has 2" in results[0][1], results[0][1]
    assert "rank 0 (global rank 2) has 1, rank 1 (global rank 3) has 2" in results[2][1], results[2][1]
    assert results[1][2].startswith("mori dispatch on rank 1 of 2 waited in vain for rank 0: "), results[1][2]
    assert results[3][2].startswith("mori dispatch on rank 1 of 2 (global rank 3) waited in vain for rank 0 (global "
                                    "rank 2): "), results[3][2]
    # the timeout that ran out is the subgroup's own (torch's default unless new_group got timeout=), which
    # EP_RUNTIME_TIMEOUT_S does not set: the message said to set it with that knob
    for _, _, message in results:
        assert "(3 s; a subgroup's own, given when it is made: dist.new_group(ranks, timeout=...))" in message, message


def _dp_x_ep_recipe_rank(rank, world_size):
    """docs/api.md's dp x ep recipe: DDP over the world with the experts left alone, then each expert
    gradient summed over its dp replicas and divided by the world size; every gradient is then the mean
    loss's over the world's tokens (dense ones by DDP's average)."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    mesh, _ = _mesh()
    ep_group, dp_group = mesh["ep"].get_group(), mesh["dp"].get_group()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal",
                                                                runner="torch", group=ep_group))
    problem = make_problem(model[2].config, [7, 5, 6, 4], seed=41, ep_size=EP)  # rank r's tokens: xs[r]
    model[2].load_experts(problem.w13.float(), problem.w2.float())
    model.forward = lambda x, ids, weights: model[2](model[1](model[0](x)), ids, weights)

    # the recipe
    experts = [".".join(filter(None, (name, p))) for name, m in model.named_modules()
               if isinstance(m, ep.EPMoE) and m.dispatcher.shards_experts for p, _ in m.named_parameters(recurse=False)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
    wrapped = DDP(model)
    y = wrapped(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
    (y * problem.grad_outputs[rank].float()).sum().backward()
    for name, p in model.named_parameters():
        if name in experts and p.grad is not None:
            dist.all_reduce(p.grad, group=dp_group)
            p.grad /= world_size

    lin = nn.Linear(16, 16).double()
    lin.load_state_dict(model[0].state_dict())
    w13, w2 = mean_loss_reference(lin, problem, model[2].config, world_size)
    mine = model[2].placement.local_expert_ids()
    # Experts sharded further by fully_shard over dp (torchtitan's way) have no slot rows for a checkpoint
    from torch.distributed.fsdp import fully_shard
    sharded = fully_shard(ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", group=ep_group),
                          mesh=mesh["dp"])
    with pytest.raises(ValueError, match=r"w13 is a DTensor over .*: the experts were sharded by FSDP2"):
        ep.distributed_state_dict(sharded)
    errors = {"dlinear": rel_err(model[0].weight.grad, lin.weight.grad), "dbias": rel_err(model[0].bias.grad, lin.bias.grad),
              "dw13": rel_err(model[2].w13.grad, w13.grad[mine]), "dw2": rel_err(model[2].w2.grad, w2.grad[mine])}
    # ep.clip_grad_norm_ after the recipe: the experts' norms summed over ep only (the dp replicas hold the same)
    reference = [lin.weight, lin.bias, w13, w2]
    want = torch.nn.utils.clip_grad_norm_(reference, 1e-3)
    errors["norm"] = rel_err(ep.clip_grad_norm_(model, 1e-3), want)
    errors["clipped_dw13"] = rel_err(model[2].w13.grad, w13.grad[mine])
    errors["clipped_dlinear"] = rel_err(model[0].weight.grad, lin.weight.grad)
    return errors


def test_dp_x_ep_training_recipe_gives_the_mean_loss_gradients():
    for errors in run_ranks(_dp_x_ep_recipe_rank, WORLD, timeout=60):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def _bad_group_rank(rank, world_size):
    """Every rank passes the same group that is no group; then builds its layer on the default group."""
    messages = []
    for bad in ("ep", 5, [0, 1]):
        for build in (lambda: ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", group=bad),
                      lambda: ep.dispatchers.create("mori", ep.MoeConfig(8, 2, 16, 8), group=bad),
                      lambda: ep.dispatchers.create("standard", ep.MoeConfig(8, 2, 16, 8), group=bad)):
            try:
                build()
                messages.append(None)
            except TypeError as err:
                messages.append(str(err))
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    problem = make_problem(layer.config, [5, 3], seed=1, ep_size=world_size)
    return messages, check_layer(layer, problem, rank)


def test_a_group_that_is_no_group_is_named():
    """group= something that is neither None, a ProcessGroup nor a 1-D DeviceMesh (a mesh dimension's name, a
    list of ranks) was taken as it was and failed in torch ("Default process group has not been initialized",
    "Group ep is not registered"), naming no argument; it is now refused naming it and what is allowed, on
    every rank before any collective, and the group stays usable (a layer on the default group then matches
    the float64 reference: output and gradients, float32 bound)."""
    for messages, errors in run_ranks(_bad_group_rank, 2, timeout=120, group_timeout=30):
        assert len(messages) == 9 and all(m is not None and re.fullmatch(
            r"group=('ep'|5|\[0, 1\]); allowed: None \(the default group\), a torch.distributed ProcessGroup, or a "
            r"1-D DeviceMesh such as mesh\['ep'\]", m) for m in messages), messages
        assert max(errors.values()) <= tolerance(torch.float32), errors


def _several_ranks_named_rank(rank, world_size):
    """An ep group of global ranks [1, 2, 3] (rank 0 outside it); two of its ranks dispatch an x of the wrong
    hidden size, and two of its ranks claim one GPU (the NVLink transport's verdict, computed alike on every rank)."""
    from ep_runtime.dispatchers import peer_transport
    group = dist.new_group([1, 2, 3])
    if rank == 0:
        return None
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(6, 2, 16, 8), group=group)
    g = dist.get_rank(group)
    try:
        d.dispatch(torch.randn(3, 15 if g in (0, 2) else 16), ep.TopKOutput(torch.tensor([[0, 5]] * 3), torch.rand(3, 2)))
    except ValueError as err:
        message = str(err)
    one_gpu = peer_transport.shared_gpu([("node0", 0, "GPU-a"), ("node0", 1, "GPU-b"), ("node0", 0, "GPU-a")], group)
    return message, one_gpu


def test_messages_naming_several_ranks_of_a_subgroup_give_their_global_ranks():
    """Several ranks named at once: 'ranks 0, 2 of 3 were given bad input' named the group's ranks only, while
    one rank gets 'rank 1 of 3 (global rank 2)' (docs/api.md: messages add the global ranks where they differ)."""
    results = run_ranks(_several_ranks_named_rank, WORLD, timeout=60)
    assert results[0] is None
    assert results[2][0] == ("deepep_normal dispatch: ranks 0, 2 of 3 (global ranks 1, 3) were given bad input (their "
                             "own errors name the arguments); no token was sent"), results[2][0]
    assert all(r[1].startswith("ranks 0, 2 (global ranks 1, 3) share one GPU (GPU-a)") for r in results[1:]), results
