"""The layer inside a training loop's machinery (torch.autocast, ...) on 2 gloo ranks, against the
float64 reference."""
import contextlib

import pytest
import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import (
    check_layer,
    make_problem,
    mean_loss_reference,
    run_ranks,
    tolerance,
    training_step,
    training_step_errors,
)

OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 16}, "mori": {"max_dispatch_tokens_per_rank": 16}}
DISPATCHERS = ["standard", "deepep_normal", "deepep_ll", "mori"]


def _autocast_rank(rank, world_size, dispatcher, layer_dtype, x_dtype):
    """Under torch.autocast(cpu, bf16) the layer takes x in whatever dtype the previous op returned
    (a Linear's bf16, a LayerNorm's float32), as torch's own layers do; y comes back in the layer's dtype."""
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", dtype=layer_dtype,
                     dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [11, 7][:world_size], seed=21, ep_size=world_size)
    layer.load_experts(problem.w13.to(layer_dtype), problem.w2.to(layer_dtype))
    x = problem.xs[rank].to(x_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, problem.topk_ids[rank], problem.topk_weights[rank])
        routed, _ = layer.routed_and_shared(x.detach(), ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank]),
                                            shared_experts=torch.nn.Identity())
    (y.double() * problem.grad_outputs[rank]).sum().backward()
    # Reference: every rank's tokens as they were given, experts in float64 (dispatch sends them to their owners).
    w13, w2 = (w.to(layer_dtype).double().requires_grad_(True) for w in (problem.w13, problem.w2))
    xs = [t.to(x_dtype).double().requires_grad_(True) for t in problem.xs]
    loss = sum((moe_reference(xs[r], problem.topk_ids[r], problem.topk_weights[r].double(), w13, w2, layer.config)
                * problem.grad_outputs[r]).sum() for r in range(world_size))
    loss.backward()
    ref = moe_reference(xs[rank].detach(), problem.topk_ids[rank], problem.topk_weights[rank].double(),
                        w13.detach(), w2.detach(), layer.config)
    mine = layer.placement.local_expert_ids()
    errors = {"y": rel_err(y.detach(), ref), "dx": rel_err(x.grad, xs[rank].grad), "routed": rel_err(routed, ref)}
    if layer.dispatcher.shards_experts:  # replicated experts see this rank's tokens only
        errors.update(dw13=rel_err(layer.w13.grad, w13.grad[mine]), dw2=rel_err(layer.w2.grad, w2.grad[mine]))
    return (str(y.dtype), str(x.grad.dtype), str(layer.w13.grad.dtype)), errors


@pytest.mark.parametrize("layer_dtype,x_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_autocast_takes_x_in_another_dtype(dispatcher, layer_dtype, x_dtype):
    for dtypes, errors in run_ranks(_autocast_rank, 2, dispatcher, layer_dtype, x_dtype):
        assert dtypes == (str(layer_dtype), str(x_dtype), str(layer_dtype))
        assert max(errors.values()) <= tolerance(torch.bfloat16), errors  # autocast runs the GEMMs in bf16


def _mismatch_outside_autocast_rank(rank, world_size):
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="deepep_normal", runner="torch")
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16; this layer's weights are torch.float32"):
        layer(x, torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, 2))


def test_x_of_another_dtype_without_autocast_is_an_error():
    run_ranks(_mismatch_outside_autocast_rank, 2)


def _deepcopy_rank(rank, world_size, dispatcher):
    """copy.deepcopy of a model holding the layer (what torch.optim.swa_utils.AveragedModel and EMA copies do):
    the copy computes what the layer computes, forward and gradients, and owns its weights."""
    import copy
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [11, 7][:world_size], seed=22, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    twin = copy.deepcopy(layer)
    results = []
    for module in (layer, twin):
        x = problem.xs[rank].float().requires_grad_(True)
        y = module(x, problem.topk_ids[rank], problem.topk_weights[rank])
        (y * problem.grad_outputs[rank].float()).sum().backward()
        results.append((y.detach(), x.grad, module.w13.grad, module.w2.grad))
    errors = [rel_err(a, b) for a, b in zip(*results)]
    with torch.no_grad():
        twin.w13.mul_(2.0)  # the copy's weights are its own
    averaged = torch.optim.swa_utils.AveragedModel(layer)
    averaged.update_parameters(layer)
    y_avg = averaged(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
    errors.append(rel_err(y_avg.detach(), results[0][0]))
    return errors, twin.w13.data_ptr() != layer.w13.data_ptr(), torch.equal(layer.w13, problem.w13.float()[
        layer.placement.local_expert_ids()])


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_deepcopy_computes_the_same_and_owns_its_weights(dispatcher):
    for errors, own_storage, original_unchanged in run_ranks(_deepcopy_rank, 2, dispatcher):
        assert max(errors) == 0.0, errors  # the same kernels on the same values: bit for bit
        assert own_storage and original_unchanged


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_normal"])
def test_pickling_is_refused_naming_what_to_save_instead(dispatcher):
    """torch.save(model) / pickle of a model holding the layer raised a bare "cannot pickle 'WeakMethod' object";
    it names the layer and the way out, and copy.copy / copy.deepcopy still work."""
    import copy
    import io
    import pickle

    from torch import nn
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch")
    model = nn.Sequential(nn.Linear(32, 32), layer)
    for save in (lambda: pickle.dumps(model), lambda: torch.save(model, io.BytesIO())):
        with pytest.raises(TypeError, match=rf"EPMoE\(num_experts=8, dispatcher='{dispatcher}'\) cannot be pickled "
                                            r".*torch.save\(model.state_dict\(\)\).*export_state_dict"):
            save()
    assert copy.copy(layer).w13 is layer.w13
    assert copy.deepcopy(model)[1].w13.data_ptr() != layer.w13.data_ptr()
    torch.save(model.state_dict(), io.BytesIO())  # what it names


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_normal"])
def test_torch_func_transforms_are_refused_by_name(dispatcher):
    """Under torch.func.grad / vmap the layer failed inside: functorch's "in-place operation ... would mutate a
    captured Tensor" from its load counter (one rank), or "attempting to call Tensor.requires_grad_()" from the
    exchange (over ranks). It now names the transform and the way out; functional_call outside one still works."""
    from torch.func import functional_call
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch")
    gen = torch.Generator().manual_seed(5)
    x, ids, weights = torch.randn(6, 32, generator=gen), torch.randint(0, 8, (6, 2), generator=gen), torch.rand(6, 2)
    params = {"w13": layer.w13.detach() * 2, "w2": layer.w2.detach()}
    with pytest.raises(RuntimeError, match=r"inside a torch.func transform \(Grad: .*loss.backward\(\)"):
        torch.func.grad(lambda p: functional_call(layer, p, (x, ids, weights)).square().sum())(params)
    with pytest.raises(RuntimeError, match=r"inside a torch.func transform \(Vmap: "):
        torch.func.vmap(lambda xb: layer(xb, ids, weights))(x.unsqueeze(0).repeat(2, 1, 1))
    twin = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch")
    twin.load_experts(params["w13"], params["w2"])
    assert torch.equal(functional_call(layer, params, (x, ids, weights)), twin(x, ids, weights))
    layer(x, ids, weights)  # (nothing left behind)


def _parametrized_experts_rank(rank, world_size):
    """weight_norm on w2 (torch.nn.utils.parametrize): forward and backward read the parametrized w2 and its
    originals get their gradients; the verbs that write or move the experts in place refuse it by name."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.parametrizations import weight_norm
    make = lambda **kw: ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch", dtype=torch.float64, **kw)  # noqa: E731
    layer = make()
    problem = make_problem(layer.config, [6, 5], seed=23, ep_size=world_size)
    layer.load_experts(problem.w13, problem.w2)
    weight_norm(layer, "w2", dim=0)
    x = problem.xs[rank].clone().requires_grad_(True)
    y = layer(x, problem.topk_ids[rank], problem.topk_weights[rank].double())
    (y * problem.grad_outputs[rank]).sum().backward()
    w13, w2 = problem.w13.clone().requires_grad_(True), problem.w2.clone().requires_grad_(True)
    refs = [moe_reference(problem.xs[r], problem.topk_ids[r], problem.topk_weights[r].double(), w13, w2, layer.config)
            for r in range(world_size)]
    sum((ref * problem.grad_outputs[r]).sum() for r, ref in enumerate(refs)).backward()
    mine = layer.placement.local_expert_ids()
    g, v = layer.parametrizations.w2.original0, layer.parametrizations.w2.original1
    g64, v64 = g.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    torch._weight_norm(v64, g64, 0).backward(w2.grad[mine])  # the chain rule through weight_norm, in float64
    errors = {"y": rel_err(y.detach(), refs[rank].detach()), "dw13": rel_err(layer.w13.grad, w13.grad[mine]),
              "dg": rel_err(g.grad, g64.grad), "dv": rel_err(v.grad, v64.grad)}
    # (each wrote into the w2 computed for that access and was lost, no error: the experts stayed as they were)
    other_w13, other_w2 = problem.w13 * 2, problem.w2 * 3
    copies = make(num_redundant_experts=2)
    weight_norm(copies, "w2", dim=0)
    copies(problem.xs[rank], problem.topk_ids[rank], problem.topk_weights[rank].double()).sum().backward()
    refused = []
    round_robin = make(expert_to_rank=[e % world_size for e in range(8)]).state_dict()  # (its load moves the slots)
    for verb, call in (("load_experts", lambda: layer.load_experts(other_w13, other_w2)),
                       ("load_state_dict", lambda: layer.load_state_dict(round_robin, strict=False)),
                       ("load_expert", lambda: layer.load_expert(0, w2=other_w2[0])),
                       ("reset_parameters", layer.reset_parameters),
                       ("apply_placement", lambda: layer.apply_placement(layer.placement)),
                       ("rebalance", layer.rebalance),
                       ("reduce_replica_grads", copies.reduce_replica_grads)):
        with pytest.raises(RuntimeError) as err:
            call()
        refused.append(str(err.value).startswith(f"{verb}: this layer's w2 is computed from other tensors at each "
                                                 f"access") and "remove_parametrizations(layer, 'w2')" in str(err.value))
    pruned = make()  # prune's hook-based reparametrization (as the old weight_norm and spectral_norm): the same
    prune.l1_unstructured(pruned, "w2", amount=0.5)
    with pytest.raises(RuntimeError, match=r"^load_experts: this layer's w2 is computed .*prune.remove\(layer, 'w2'\)"):
        pruned.load_experts(other_w13, other_w2)
    errors["y unchanged"] = rel_err(layer(problem.xs[rank], problem.topk_ids[rank], problem.topk_weights[rank].double()),
                                    refs[rank].detach())
    parametrize.remove_parametrizations(layer, "w2")  # the way out it names
    layer.load_experts(other_w13, other_w2)
    errors["y loaded"] = rel_err(layer(problem.xs[rank], problem.topk_ids[rank], problem.topk_weights[rank].double()),
                                 moe_reference(problem.xs[rank], problem.topk_ids[rank],
                                               problem.topk_weights[rank].double(), other_w13, other_w2, layer.config))
    if rank == 0:  # parametrized on one rank only: that rank's refusal fails every rank before the load's exchange
        weight_norm(layer, "w2", dim=0)
    with pytest.raises(RuntimeError, match=r"rank 0: load_experts: this layer's w2 is computed from other tensors"):
        layer.load_experts(problem.w13, problem.w2)
    # reduce_replica_grads with w2 parametrized on rank 0 only: rank 0 raised before its all_reduces, leaving rank 1
    # in them until the group's timeout; now it joins them (adding zeros) and then raises
    copies = make(num_redundant_experts=2)
    copies(problem.xs[rank], problem.topk_ids[rank], problem.topk_weights[rank].double()).sum().backward()
    if rank == 0:
        weight_norm(copies, "w2", dim=0)
        with pytest.raises(RuntimeError, match=r"^reduce_replica_grads: this layer's w2 is computed"):
            copies.reduce_replica_grads()
    else:
        copies.reduce_replica_grads()
    after = torch.tensor([1.0 + rank])  # the ranks' collectives still pair up: the next one sums these
    dist.all_reduce(after)
    refused.append(after.item() == 3.0)
    return errors, refused


def test_parametrized_experts_train_and_refuse_in_place_writes():
    """register_parametrization / weight_norm / prune on w2: load_experts, load_expert and reset_parameters wrote
    into the w2 computed for that access (lost: the layer kept its experts, no error), and apply_placement, rebalance,
    load_state_dict of another placement and reduce_replica_grads moved or summed that copy. Now they raise naming w2 and the way out; forward and
    backward (the parametrized w2, gradients into its originals) equal the float64 reference."""
    for errors, refused in run_ranks(_parametrized_experts_rank, 2):
        assert max(errors.values()) <= tolerance(torch.float64), errors
        assert all(refused), refused


def _ddp_rank(rank, world_size, dispatcher, wrapper):
    """docs/api.md's recipe: DistributedDataParallel (or FSDP2's fully_shard) over a model holding the layer,
    told to leave the sharded experts alone. Without it DDP overwrites every rank's experts with rank 0's at
    construction and averages different experts' gradients (fully_shard all-gathers pieces of different
    ranks' experts); with it the experts stay, the dense gradients are averaged over the ranks, and the
    experts' gradients (summed over every rank's tokens by the exchange, then divided by R) are those of
    the mean loss."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    model.append(ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher)))
    problem = make_problem(model[2].config, [11, 7][:world_size], seed=23, ep_size=world_size)
    model[2].load_experts(problem.w13.float(), problem.w2.float())
    model.forward = lambda x, ids, weights: model[2](model[1](model[0](x)), ids, weights)

    # the recipe
    experts = [".".join(filter(None, (name, p))) for name, m in model.named_modules()
               if isinstance(m, ep.EPMoE) and m.dispatcher.shards_experts for p, _ in m.named_parameters(recurse=False)]
    if wrapper == "ddp":
        DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
        wrapped = DDP(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        wrapped = fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)),
                              ignored_params={p for name, p in model.named_parameters() if name in experts})
    lin = nn.Linear(32, 32).double()
    lin.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model[0].state_dict().items()})
    y = wrapped(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
    (y * problem.grad_outputs[rank].float()).sum().backward()  # DDP or fully_shard averages the dense gradients
    for name, p in model.named_parameters():
        if name in experts:
            p.grad /= world_size

    w13, w2 = mean_loss_reference(lin, problem, model[2].config, world_size)
    mine = model[2].placement.local_expert_ids()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 - fully_shard's DTensors
    return {"dlinear": rel_err(full(model[0].weight.grad), lin.weight.grad),
            "dw13": rel_err(full(model[2].w13.grad), w13.grad[mine]), "dw2": rel_err(full(model[2].w2.grad), w2.grad[mine]),
            "w13_kept": rel_err(full(model[2].w13.detach()), problem.w13.float()[mine])}


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
@pytest.mark.parametrize("dispatcher", ["standard", "deepep_normal"])
def test_data_parallel_recipe_keeps_the_experts_and_their_gradients(dispatcher, wrapper):
    for errors in run_ranks(_ddp_rank, 2, dispatcher, wrapper):
        assert max(errors.values()) <= tolerance(torch.float32), errors



def _fsdp_shared_experts_rank(rank, world_size, dispatcher):
    """Shared experts sharded by FSDP2's fully_shard of their own (their forward all-gathers their weights on the
    default group, the layer's): on CPU ranks they ran while the exchange thread moved the rows, so the two
    threads' collectives paired in another order on each rank (gloo aborted the process: "Received data size
    doesn't match expected size", or the ranks waited until the timeout). Now they run before the dispatch is
    issued: three steps give what the same model computes unwrapped, routed and shared one after the other."""
    import copy

    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(32, 48), nn.SiLU(), nn.Linear(48, 32))
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    model.append(ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", shared_experts=shared,
                          dispatcher_options=OPTIONS.get(dispatcher)))
    problem = make_problem(model[2].config, [11, 7][:world_size], seed=27, ep_size=world_size)
    model[2].load_experts(problem.w13.float(), problem.w2.float())
    twin = copy.deepcopy(model)
    model.forward = lambda x, ids, weights: model[2](model[1](model[0](x)), ids, weights)
    mesh = init_device_mesh("cpu", (world_size,))
    fully_shard(shared[0], mesh=mesh)
    fully_shard(shared[2], mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params={model[2].w13, model[2].w2})
    errors = []
    for step in range(3):
        x, ids, weights = problem.xs[rank].float() * (step + 1), problem.topk_ids[rank], problem.topk_weights[rank]
        grad_output = problem.grad_outputs[rank].float()
        y = model(x, ids, weights)
        (y * grad_output).sum().backward()
        h = twin[1](twin[0](x))
        y_twin = twin[2]._routed(h, ep.TopKOutput(ids, weights)) + twin[2].shared_experts(h)
        (y_twin * grad_output).sum().backward()
        errors.append(rel_err(y.detach(), y_twin.detach()))
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 - fully_shard's DTensors
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        want = q.grad.clone()
        if name not in ("2.w13", "2.w2"):  # replicated: fully_shard averages their gradients over the ranks
            torch.distributed.all_reduce(want)
            want /= world_size
        errors.append(rel_err(full(p.grad), want))
    return errors


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_shared_experts_sharded_by_fully_shard_keep_the_collectives_in_order(dispatcher):
    for errors in run_ranks(_fsdp_shared_experts_rank, 2, dispatcher, timeout=90, group_timeout=30):
        assert max(errors) <= tolerance(torch.float32), errors



def _fully_shard_standard_init_rank(rank, world_size):
    """torchtitan's initialisation under FSDP2: the model built on the meta device, fully_shard (a "standard"
    layer's experts, replicated weights, become DTensors), to_empty, then the weights initialised or loaded.
    reset_parameters, load_experts and gather_experts raised "got mixed torch.Tensor and DTensor"; now they give
    what a layer built normally gives, and load_expert (rows a rank may not hold) is refused naming why."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    plain = ep.EPMoE(8, 2, 32, 16, dispatcher="standard", runner="torch")
    with torch.device("meta"):
        layer = ep.EPMoE(8, 2, 32, 16, dispatcher="standard", runner="torch")
    fully_shard(layer, mesh=init_device_mesh("cpu", (world_size,)))
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    results = {"reset": torch.equal(layer.w13.full_tensor(), plain.w13) and torch.equal(layer.w2.full_tensor(), plain.w2)}
    problem = make_problem(plain.config, [11, 7][:world_size], seed=28, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    gathered = layer.gather_experts()
    results["load_gather"] = (torch.equal(gathered.w13, problem.w13.float()) and torch.equal(gathered.w2, problem.w2.float()))
    with pytest.raises(RuntimeError, match="experts are DTensors .FSDP2's fully_shard sharded them."):
        layer.load_expert(3, w13=problem.w13[3].float())
    y = layer(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
    results["y"] = rel_err(y.detach(), moe_reference(problem.xs[rank], problem.topk_ids[rank],
                                                     problem.topk_weights[rank].double(), problem.w13, problem.w2,
                                                     plain.config)) <= tolerance(torch.float32)
    return results


def test_standard_layer_under_fully_shard_initialises_and_loads():
    for results in run_ranks(_fully_shard_standard_init_rank, 2, timeout=60):
        assert results == {"reset": True, "load_gather": True, "y": True}, results



def _fsdp_mixed_precision_rank(rank, world_size, dispatcher):
    """docs/api.md: FSDP2's MixedPrecisionPolicy casts the dense parameters and the wrapped modules' inputs to
    bf16, not the ignored float32 experts; the layer names the dtypes, and under torch.autocast it takes the bf16 x
    (float32 master experts, bf16 GEMMs) and gives the reference within bf16's bound."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    model.append(ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher)))
    problem = make_problem(model[2].config, [11, 7][:world_size], seed=29, ep_size=world_size)
    model[2].load_experts(problem.w13.float(), problem.w2.float())
    lin = nn.Linear(32, 32).double()
    lin.load_state_dict(model[0].state_dict())
    model.forward = lambda x, ids, weights: model[2](model[1](model[0](x)), ids, weights)
    experts = {model[2].w13, model[2].w2}
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), ignored_params=experts,
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    args = problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank]
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16; this layer's weights are torch.float32"):
        model(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(*args)
    (y.float() * problem.grad_outputs[rank].float()).sum().backward()
    for p in experts:
        p.grad /= world_size
    w13, w2 = mean_loss_reference(lin, problem, model[2].config, world_size)
    mine = model[2].placement.local_expert_ids()
    ref = moe_reference(torch.tanh(lin(problem.xs[rank])), *args[1:], problem.w13, problem.w2, model[2].config)
    return (str(y.dtype), rel_err(y.detach(), ref), rel_err(model[0].weight.grad.full_tensor(), lin.weight.grad),
            rel_err(model[2].w13.grad, w13.grad[mine]), rel_err(model[2].w2.grad, w2.grad[mine]))


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "mori"])
def test_fsdp_mixed_precision_takes_float32_experts_under_autocast(dispatcher):
    for dtype, *errors in run_ranks(_fsdp_mixed_precision_rank, 2, dispatcher, timeout=60):
        assert dtype == "torch.float32"
        assert max(errors) <= tolerance(torch.bfloat16), errors


def _checkpointed_load_rank(rank, world_size, dispatcher):
    """Activation checkpointing runs the layer's forward again inside backward: expert_load still counts
    each (token, expert) pair of a step once."""
    from torch.utils.checkpoint import checkpoint
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [11, 7][:world_size], seed=24, ep_size=world_size)
    x = problem.xs[rank].float().requires_grad_(True)
    ids, weights = problem.topk_ids[rank], problem.topk_weights[rank]
    layer(x, ids, weights).sum().backward()
    once = layer.expert_load(reset=True)
    loads = []
    for reentrant in (True, False):
        checkpoint(lambda t: layer(t, ids, weights), x, use_reentrant=reentrant).sum().backward()
        loads.append(layer.expert_load(reset=True))
    return once.tolist(), [load.tolist() for load in loads]


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_normal", "mori"])
def test_activation_checkpointing_counts_the_load_once(dispatcher):
    for once, checkpointed in run_ranks(_checkpointed_load_rank, 2, dispatcher):
        assert sum(once) > 0
        assert checkpointed == [once, once]


def _checkpointed_compiled_load_rank(rank, world_size):
    """torch.compile(layer) called inside activation checkpointing (checkpoint around a compiled block): the
    recompute in backward runs the compiled forward again, whose counter add was traced unconditionally (the
    check that tells a recompute apart ran only eagerly), so expert_load counted each pair twice. Checkpointing
    inside the compiled region counts once too."""
    from torch.utils.checkpoint import checkpoint
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="deepep_normal", runner="torch")
    problem = make_problem(layer.config, [11, 7][:world_size], seed=24, ep_size=world_size)
    x = problem.xs[rank].float().requires_grad_(True)
    ids, weights = problem.topk_ids[rank], problem.topk_weights[rank]
    layer(x, ids, weights).sum().backward()
    once = layer.expert_load(reset=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    inside = torch.compile(lambda t: checkpoint(lambda u: layer(u, ids, weights), t, use_reentrant=False),
                           backend="aot_eager")
    loads = []
    for step in (lambda: checkpoint(lambda t: compiled(t, ids, weights), x, use_reentrant=False),
                 lambda: checkpoint(lambda t: compiled(t, ids, weights), x, use_reentrant=True),
                 lambda: compiled(x, ids, weights), lambda: inside(x)):
        step().sum().backward()
        loads.append(layer.expert_load(reset=True).tolist())
    return once.tolist(), loads


def test_activation_checkpointing_of_a_compiled_layer_counts_the_load_once():
    for once, checkpointed in run_ranks(_checkpointed_compiled_load_rank, 2, timeout=240):
        assert sum(once) > 0
        assert checkpointed == [once] * 4


def _experts_trainable_on_some_ranks_rank(rank, world_size):
    """Fine-tuning some ranks' experts only (the others frozen), under a frozen embedding and router, with a
    trainable head on every rank: the trainable experts get their float64 reference gradients (from every
    rank's tokens), the frozen ones stay None, and no rank's backward waits for an exchange another skips."""
    results = {}
    for dispatcher in ["deepep_normal", "deepep_ll", "mori"]:
        layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher))
        problem = make_problem(layer.config, [9, 6][:world_size], seed=25, ep_size=world_size)
        layer.load_experts(problem.w13.float(), problem.w2.float())
        trainable = rank == 0
        layer.requires_grad_(trainable)
        head = torch.nn.Parameter(torch.tensor(1.5))
        y = layer(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
        (y * head * problem.grad_outputs[rank].float()).sum().backward()

        w13, w2 = problem.w13.clone().requires_grad_(True), problem.w2.clone().requires_grad_(True)
        sum((moe_reference(problem.xs[r], problem.topk_ids[r], problem.topk_weights[r].double(), w13, w2, layer.config)
             * 1.5 * problem.grad_outputs[r]).sum() for r in range(world_size)).backward()
        mine = layer.placement.local_expert_ids()
        if trainable:
            results[dispatcher] = max(rel_err(layer.w13.grad, w13.grad[mine]), rel_err(layer.w2.grad, w2.grad[mine]))
        else:
            results[dispatcher] = (layer.w13.grad, layer.w2.grad)
    return results


def test_experts_trainable_on_some_ranks_only():
    trained, frozen = run_ranks(_experts_trainable_on_some_ranks_rank, 2, timeout=30)
    assert max(trained.values()) <= tolerance(torch.float32), trained
    assert all(grads == (None, None) for grads in frozen.values()), frozen


def _replicas_trainable_on_some_ranks_rank(rank, world_size):
    """Redundant experts (a copy of experts on both ranks) fine-tuned on rank 0 only, rank 1's frozen: both call
    reduce_replica_grads() after backward, as documented. Rank 1 has no gradients and skipped its all_reduces,
    so rank 0 waited in the first one until the group's timeout (or lost the connection). Now every rank joins:
    rank 1 adds zeros and keeps no gradient, rank 0's copies keep their own gradients (at most one copy of an
    expert per rank, and rank 1's frozen copies add nothing)."""
    import time
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="deepep_normal", runner="torch", num_redundant_experts=4)
    problem = make_problem(layer.config, [9, 6], seed=26, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    layer.requires_grad_(rank == 0)
    head = torch.nn.Parameter(torch.tensor(1.5))
    y = layer(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
    (y * head * problem.grad_outputs[rank].float()).sum().backward()
    before = None if layer.w13.grad is None else (layer.w13.grad.clone(), layer.w2.grad.clone())
    start = time.monotonic()
    layer.reduce_replica_grads()
    seconds = time.monotonic() - start
    if before is None:
        return seconds, (layer.w13.grad, layer.w2.grad)
    return seconds, (torch.equal(layer.w13.grad, before[0]), torch.equal(layer.w2.grad, before[1]),
                     before[0].abs().sum().item() > 0)


def test_reduce_replica_grads_with_experts_frozen_on_some_ranks():
    (seconds0, trained), (seconds1, frozen) = run_ranks(_replicas_trainable_on_some_ranks_rank, 2, timeout=60,
                                                        group_timeout=20)
    assert seconds0 < 5 and seconds1 < 5, (seconds0, seconds1)
    assert trained == (True, True, True), trained
    assert frozen == (None, None), frozen


def _inference_tensors_on_one_rank_rank(rank, world_size):
    """Rank 1's x, ids and weights were made under torch.inference_mode (a data pipeline's), then fed to a
    training step (experts needing gradients, x none). The layer sends such an x as needing a gradient (so
    every rank runs the reverse exchanges) with x.detach().requires_grad_(), which torch refuses for an
    inference tensor: rank 1 raised there alone, after the checks that tell the others, and rank 0 went on
    into the exchange (gloo aborted it: "Received data size doesn't match expected size"). The exchange does
    the same where another rank's x or weights need a gradient (frozen experts, rank 0's x and weights needing
    one): rank 1 raised mid-dispatch, rank 0 waited until the timeout. Rank 1 now sends a copy: every rank's
    output and gradients equal the float64 reference's."""
    errors = {}
    for dispatcher in ["deepep_normal", "deepep_ll", "mori"]:
        for frozen in (False, True):
            layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch",
                             dispatcher_options=OPTIONS.get(dispatcher))
            problem = make_problem(layer.config, [9, 6], seed=27, ep_size=world_size)
            layer.load_experts(problem.w13.float(), problem.w2.float())
            layer.requires_grad_(not frozen)
            with torch.inference_mode(rank == 1):
                x, ids = problem.xs[rank].float().clone(), problem.topk_ids[rank].clone()
                weights = problem.topk_weights[rank].clone()
            if frozen and rank == 0:
                x.requires_grad_(True), weights.requires_grad_(True)
            y = layer(x, ids, weights)
            (y * problem.grad_outputs[rank].float()).sum().backward()
            w13, w2 = problem.w13.clone().requires_grad_(True), problem.w2.clone().requires_grad_(True)
            xs = [t.clone().requires_grad_(True) for t in problem.xs]
            ws = [t.double().requires_grad_(True) for t in problem.topk_weights]
            refs = [moe_reference(xs[r], problem.topk_ids[r], ws[r], w13, w2, layer.config) for r in range(world_size)]
            sum((refs[r] * problem.grad_outputs[r]).sum() for r in range(world_size)).backward()
            mine = layer.placement.local_expert_ids()
            errs = [rel_err(y.detach(), refs[rank].detach())]
            if not frozen:
                errs += [rel_err(layer.w13.grad, w13.grad[mine]), rel_err(layer.w2.grad, w2.grad[mine])]
            elif rank == 0:
                errs += [rel_err(x.grad, xs[0].grad), rel_err(weights.grad, ws[0].grad)]
            errors[dispatcher, frozen] = max(errs)
    return errors


def test_inference_tensors_on_one_rank_in_a_training_step():
    for errors in run_ranks(_inference_tensors_on_one_rank_rank, 2, timeout=60, group_timeout=20):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def _gradient_penalty_rank(rank, world_size):
    """Double backward (torch.autograd.grad(create_graph=True), as a gradient penalty takes it): the
    penalty's gradients through dispatch, runner and combine equal the float64 reference's (the kernel
    runners' backward recomputes with torch). Before, the reverse exchange and that recompute returned
    constants, so the penalty had no graph."""
    errors = {}
    for dispatcher, runner in [("deepep_normal", "torch"), ("deepep_ll", "torch"), ("mori", "torch")]:
        layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner=runner, dispatcher_options=OPTIONS.get(dispatcher))
        problem = make_problem(layer.config, [9, 5][:world_size], seed=26, ep_size=world_size)
        layer.load_experts(problem.w13.float(), problem.w2.float())
        x = problem.xs[rank].float().requires_grad_(True)
        y = layer(x, problem.topk_ids[rank], problem.topk_weights[rank])
        dx, = torch.autograd.grad((y * problem.grad_outputs[rank].float()).sum(), [x], create_graph=True)
        dx.square().sum().backward()

        w13, w2 = problem.w13.clone().requires_grad_(True), problem.w2.clone().requires_grad_(True)
        xs = [t.clone().requires_grad_(True) for t in problem.xs]
        penalty = 0
        for r in range(world_size):
            y_ref = moe_reference(xs[r], problem.topk_ids[r], problem.topk_weights[r].double(), w13, w2, layer.config)
            dx_ref, = torch.autograd.grad((y_ref * problem.grad_outputs[r]).sum(), [xs[r]], create_graph=True)
            penalty = penalty + dx_ref.square().sum()
        penalty.backward()
        mine = layer.placement.local_expert_ids()
        errors[f"{dispatcher}/{runner}"] = max(rel_err(x.grad, xs[rank].grad), rel_err(layer.w13.grad, w13.grad[mine]),
                                               rel_err(layer.w2.grad, w2.grad[mine]))
    return errors


def test_gradient_penalty_through_the_exchange():
    for errors in run_ranks(_gradient_penalty_rank, 2, timeout=60):
        assert errors and max(errors.values()) <= tolerance(torch.float32), errors


def _loss_scaler_rank(rank, world_size, clip=None):
    """The loss-scaler recipe of docs/api.md: an overflow in one rank's expert gradients skips the step
    on every rank and leaves every rank with the same scale (one scale for the whole exchange: the
    backward adds every rank's scaled gradients into each rank's experts), then a clean step equals
    the unscaled SGD step, float64 reference's gradients. clip: unscale_ and ep.clip_grad_norm_ before the step
    (the overflowing step's norm is inf on every rank; the clean step is the clipped one)."""
    import torch.distributed as dist
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="deepep_normal", runner="torch")
    problem = make_problem(layer.config, [11, 7][:world_size], seed=27, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0 ** 10, process_group=dist.group.WORLD)
    start = layer.w13.detach().clone(), layer.w2.detach().clone()
    norms = []

    def step(overflow_here: bool) -> None:
        optimizer.zero_grad()
        y = layer(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
        scaler.scale((y * problem.grad_outputs[rank].float()).sum()).backward()
        if overflow_here:
            layer.w13.grad[0, 0, 0] = float("inf")
        if clip is not None:
            scaler.unscale_(optimizer)
            norms.append(ep.clip_grad_norm_(layer, clip).item())
        scaler.step(optimizer)
        scaler.update()

    step(overflow_here=rank == 0)
    skipped = (torch.equal(layer.w13, start[0]) and torch.equal(layer.w2, start[1]), scaler.get_scale())
    step(overflow_here=False)
    w13, w2 = problem.w13.clone().requires_grad_(True), problem.w2.clone().requires_grad_(True)
    sum((moe_reference(problem.xs[r], problem.topk_ids[r], problem.topk_weights[r].double(), w13, w2, layer.config)
         * problem.grad_outputs[r]).sum() for r in range(world_size)).backward()
    if clip is not None:
        want = torch.nn.utils.clip_grad_norm_([w13, w2], clip).item()
        assert norms[0] == float("inf") and want > clip and abs(norms[1] - want) <= 1e-5 * want, (norms, want)
    mine = layer.placement.local_expert_ids()
    stepped = {"w13": rel_err(layer.w13.detach(), (problem.w13 - 0.5 * w13.grad)[mine]),
               "w2": rel_err(layer.w2.detach(), (problem.w2 - 0.5 * w2.grad)[mine])}
    return skipped, stepped


@pytest.mark.parametrize("clip", [None, 1.0])
def test_loss_scaler_recipe_skips_an_overflowing_step_on_every_rank(clip):
    results = run_ranks(_loss_scaler_rank, 2, clip, timeout=30)
    assert [skipped for skipped, _ in results] == [(True, 2.0 ** 9)] * 2, results
    for _, stepped in results:
        assert max(stepped.values()) <= tolerance(torch.float32), stepped


SMALL = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 4}, "mori": {"max_dispatch_tokens_per_rank": 4}}


def _deterministic_mode_rank(rank, world_size, dispatcher, runner):
    """torch.use_deterministic_algorithms(True), as torchtitan's --debug.deterministic and Megatron's deterministic
    mode set it: PyTorch raises for an op without a deterministic implementation and fills the memory of every
    torch.empty with NaN (integers: their largest value; torch.utils.deterministic.fill_uninitialized_memory), CPU
    tensors too, so a result that depends on a row nobody wrote (padding, a scratch buffer's tail) shows. The layer
    runs forward and backward first under the mode, with the scratch cache emptied (every buffer the runner and the
    exchange keep is made there: NaN), then outside it on those buffers."""
    from ep_runtime.scratch import SCRATCH
    layer = ep.EPMoE(4, 2, 16, 8, dispatcher=dispatcher, runner=runner, dispatcher_options=SMALL.get(dispatcher))
    problem = make_problem(layer.config, [4, 3][:world_size], seed=28, ep_size=world_size)
    seen = []
    layer.register_forward_hook(lambda module, args, y: seen.append((args[0], y.detach())))
    runs = []
    for deterministic in (True, False):
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            if deterministic:
                SCRATCH.clear()
            errors = check_layer(layer, problem, rank)
        finally:
            torch.use_deterministic_algorithms(was)
        x, y = seen[-1]
        runs.append((errors, [y, x.grad, layer.w13.grad, layer.w2.grad]))
    (inside, tensors_inside), (outside, tensors_outside) = runs
    return inside, outside, all(torch.equal(a, b) for a, b in zip(tensors_inside, tensors_outside))


# each dispatcher with the torch and triton runners, and deepep_ll with its own (masked: padding rows stay unwritten)
@pytest.mark.parametrize("dispatcher,runner", [(d, r) for r in ("torch", "triton") for d in DISPATCHERS]
                         + [("deepep_ll", "masked")])
def test_deterministic_mode_gives_the_reference_and_the_same_bits(dispatcher, runner):
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    for inside, outside, same in run_ranks(_deterministic_mode_rank, 2, dispatcher, runner):
        assert max(inside.values()) <= tolerance(torch.float32), inside
        assert max(outside.values()) <= tolerance(torch.float32), outside
        assert same  # CPU kernels on one thread: the mode changes no sum's order


# Ops whose CUDA kernels add float values with atomics outside torch.use_deterministic_algorithms (PyTorch's list of
# ops the mode makes deterministic): index_add (also index_select's and repeat_interleave's backward), scatter_add
# (gather's backward), scatter_reduce, index_reduce, put_, float cumsum, histc, bincount with weights. index_put
# with accumulate=True (the backward of x[index]) is not among them: its CUDA kernel sorts the indices first.
_FLOAT_ATOMICS = {"index_add", "scatter_add", "scatter_reduce", "index_reduce", "put", "cumsum", "histc", "bincount"}


def _float_atomics_rank(rank, world_size, dispatcher, runner):
    """One training step (x and topk_weights need gradients) on the GPU code path (exchange kernels forced onto
    these CPU ranks; the Triton runner's kernels interpreted), then on the exchange's torch path (CUDA without
    triton, float64), every aten op each runs, forward and backward, recorded by a TorchDispatchMode. Returns
    [(the float-valued ops of _FLOAT_ATOMICS it ran, errors against float64)] for each."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ep_runtime.dispatchers import exchange_kernels as xk

    class Ran(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__.rstrip("_")
            first = out[0] if isinstance(out, (tuple, list)) else out
            if name in _FLOAT_ATOMICS and isinstance(first, torch.Tensor) and first.is_floating_point():
                self.names.add(str(func))
            return out

    layer = ep.EPMoE(8, 3, 16, 8, dispatcher=dispatcher, runner=runner, dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [7, 5], seed=2, ep_size=world_size)
    results = []
    for kernels in (True, False):
        ran = Ran()
        with xk.forced() if kernels else contextlib.nullcontext(), ran:
            step = training_step(layer, problem, rank)
        results.append((sorted(ran.names), training_step_errors(layer, problem, rank, step)))
    return results


@pytest.mark.skipif("triton" not in ep.runners.available(), reason="the GPU code path needs triton (interpreted here)")
# each dispatcher with the torch runner; the triton runner once (its kernels are no aten ops; its backward is the
# torch runner's recompute); masked on its own format and on a token-major one (the layout conversion's way back
# sums each token's rows)
@pytest.mark.parametrize("dispatcher,runner", [(d, "torch") for d in DISPATCHERS]
                         + [("deepep_normal", "triton"), ("deepep_ll", "masked"), ("standard", "masked")])
def test_training_step_adds_no_float_values_with_atomics(dispatcher, runner):
    """Outside deterministic mode a CUDA training step is bit-reproducible run to run only if no op on its forward
    or backward adds float values with atomics (their order varies): on the GPU code path (kernels forced onto
    CPU ranks) and on the exchange's torch path the layer runs none of them, and its output and gradients (x,
    topk_weights, experts) equal the float64 reference. Before, pack_rows' backward, the torch path's
    x.index_select(0, send_token) (its backward), the torch runner's per-token sum (also every kernel runner's
    backward recompute) and the expert-major conversion's way back were index_adds."""
    for results in run_ranks(_float_atomics_rank, 2, dispatcher, runner):
        for ran, errors in results:
            assert ran == [], ran
            assert max(errors.values()) <= tolerance(torch.float32), errors


class _RoutedBlock(torch.nn.Module):
    """A transformer block's MoE half as torchtitan builds it: a dense input layer, a router (Linear) whose logits
    the layer routes (softmax top-k, renormalized), shared experts, the EPMoE layer."""

    def __init__(self, dispatcher, redundant=0):
        from torch import nn
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.router = nn.Linear(16, 8, bias=False)
        shared = nn.Sequential(nn.Linear(16, 12), nn.SiLU(), nn.Linear(12, 16))
        self.moe = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch", shared_experts=shared,
                            topk_config=ep.TopKConfig(2, renormalize=True), num_redundant_experts=redundant,
                            dispatcher_options=OPTIONS.get(dispatcher))

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.moe(h, router_logits=self.router(h))


def _block_reference(params, x, config):
    """_RoutedBlock in float64 from its global parameters, routing included (written from DESIGN.md)."""
    h = torch.tanh(x @ params["inp.weight"].T + params["inp.bias"])
    weights, ids = (h @ params["router.weight"].T).softmax(-1).topk(config.top_k, dim=-1)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    shared = torch.nn.functional.silu(h @ params["moe.shared_experts.0.weight"].T + params["moe.shared_experts.0.bias"])
    shared = shared @ params["moe.shared_experts.2.weight"].T + params["moe.shared_experts.2.bias"]
    return moe_reference(h, ids.int(), weights, params["moe.w13"], params["moe.w2"], config) + shared


def _clipped_training_rank(rank, world_size, dispatcher, redundant, optimizer, norm_type, wrapper=None):
    """Three optimizer steps of two micro-batches each (rank 1 without tokens in one), the dense gradients
    all-reduced over the ranks (as DDP does; or by FSDP2's fully_shard, the experts left out, docs/api.md's
    recipe: its DTensor gradients count over their mesh), reduce_replica_grads, ep.clip_grad_norm_, an eval call under no_grad
    between steps: every rank's parameters and returned norms equal the float64 model's trained on every rank's
    tokens (torch's clip_grad_norm_ on it). docs/api.md's former recipe (sum the experts' squared norms over the
    group) counted each redundant expert once per copy; torch's clip_grad_norm_ gives each rank its own norm."""
    import torch.distributed as dist
    torch.manual_seed(0)
    model = _RoutedBlock(dispatcher, redundant)
    full = model.moe.gather_experts()
    names = {"moe.w13": full.w13, "moe.w2": full.w2}
    params = {n: names.get(n, p).detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    experts = {model.moe.w13, model.moe.w2} if model.moe.dispatcher.shards_experts else set()
    if wrapper == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), ignored_params=experts)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2)}
    opt, ref_opt = make[optimizer](model.parameters()), make[optimizer](params.values())
    norms = []
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        for micro in range(2):
            gen = torch.Generator().manual_seed(10 * step + micro)
            tokens = [9, 0 if step == 1 else 6][:world_size]
            xs = [torch.randn(t, 16, generator=gen, dtype=torch.float64) for t in tokens]
            gs = [torch.randn(t, 16, generator=gen, dtype=torch.float64) for t in tokens]
            # (fully_shard averages the dense gradients over the ranks; the experts are divided below)
            (model(xs[rank].float()) * gs[rank].float()).sum().div(2 * (1 if wrapper else world_size)).backward()
            sum((_block_reference(params, xs[r], model.moe.config) * gs[r]).sum()
                for r in range(world_size)).div(2 * world_size).backward()
        for p in model.parameters():
            if wrapper and p in experts:
                p.grad /= world_size
            elif not wrapper and p not in experts and p.grad is not None and world_size > 1:
                dist.all_reduce(p.grad)
        model.moe.reduce_replica_grads()
        norms.append((ep.clip_grad_norm_(model, 0.3, norm_type).item(),
                      torch.nn.utils.clip_grad_norm_(params.values(), 0.3, norm_type).item()))
        opt.step()
        ref_opt.step()
        model.eval()
        with torch.no_grad():
            model(torch.randn(3, 16))
        model.train()
    full = model.moe.gather_experts()
    mine = {"moe.w13": full.w13, "moe.w2": full.w2}
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 - fully_shard's DTensors
    errors = {n: rel_err(whole(mine.get(n, p).detach()), params[n].detach()) for n, p in model.named_parameters()}
    errors.update({f"norm{step}": abs(a - b) / b for step, (a, b) in enumerate(norms)})
    return errors, [a for a, _ in norms], [b for _, b in norms]


@pytest.mark.parametrize("dispatcher,redundant,optimizer,norm_type", [
    ("deepep_normal", 4, "sgd", 2.0), ("deepep_normal", 0, "adam", float("inf")), ("mori", 0, "adam", 2.0),
    ("deepep_ll", 4, "sgd", float("inf")), ("standard", 0, "sgd", 2.0)])
def test_clip_grad_norm_trains_as_the_float64_model(dispatcher, redundant, optimizer, norm_type):
    results = run_ranks(_clipped_training_rank, 2, dispatcher, redundant, optimizer, norm_type, timeout=120)
    for errors, norms, ref_norms in results:
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert min(ref_norms) > 0.3  # every step clipped
        assert norms == results[0][1]  # the same norm on every rank


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "mori"])
def test_clip_grad_norm_under_fully_shard_trains_as_the_float64_model(dispatcher):
    results = run_ranks(_clipped_training_rank, 2, dispatcher, 0, "adam", 2.0, "fsdp", timeout=120)
    for errors, norms, ref_norms in results:
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert min(ref_norms) > 0.3
        assert norms == results[0][1]


def _clip_frozen_rank(rank, world_size):
    """Experts frozen on rank 1 (no .grad): its call still joins the all_reduce (no wait until the timeout) and
    the norm counts rank 0's experts; a bad argument is named."""
    torch.manual_seed(0)
    model = _RoutedBlock("deepep_normal")
    model.moe.requires_grad_(rank == 0)
    model.moe.shared_experts.requires_grad_(True)
    model(torch.randn(5, 16)).square().sum().backward()
    experts = [model.moe.w13, model.moe.w2]
    dense = [p.grad for p in model.parameters() if p.grad is not None and all(p is not w for w in experts)]
    expert_grads = [p.grad for p in experts if p.grad is not None]
    with pytest.raises(TypeError, match="model=<generator object .*allowed: an nn.Module"):
        ep.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(ValueError, match="norm_type=-1.0; allowed: a number > 0"):
        ep.clip_grad_norm_(model, 1.0, norm_type=-1.0)
    square = lambda grads: sum(g.double().square().sum().item() for g in grads)  # noqa: E731
    return square(dense), square(expert_grads), ep.clip_grad_norm_(model, 1e9).item() ** 2


def test_clip_grad_norm_with_experts_frozen_on_some_ranks():
    (dense0, experts0, total0), (dense1, experts1, total1) = run_ranks(_clip_frozen_rank, 2, timeout=60,
                                                                       group_timeout=20)
    assert experts0 > 0 and experts1 == 0
    # each rank's own dense gradients plus the experts' (rank 0's, over the group)
    assert abs(total0 - (dense0 + experts0)) <= 1e-5 * total0
    assert abs(total1 - (dense1 + experts0)) <= 1e-5 * total1


def _checkpointed_gradients_rank(rank, world_size, dispatcher):
    """Activation checkpointing (reentrant, non-reentrant, and torchtitan's selective form that keeps the matmuls'
    outputs and recomputes the rest) around a block that routes router logits to the layer with shared experts:
    backward runs the layer's forward, exchanges included, again on every rank (rank 1 without tokens), and every
    gradient (x, the router, the dense and shared parameters summed over the ranks, the experts) equals the float64
    model's."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
    keep = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    policy = lambda ctx, op, *args, **kwargs: (  # noqa: E731
        CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE)
    selective = functools.partial(create_selective_checkpoint_contexts, policy)
    torch.manual_seed(0)
    model = _RoutedBlock(dispatcher)
    full = model.moe.gather_experts()
    names = {"moe.w13": full.w13, "moe.w2": full.w2}
    params = {n: names.get(n, p).detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(31)
    xs = [torch.randn(t, 16, generator=gen, dtype=torch.float64) for t in [9, 0][:world_size]]
    gs = [torch.randn(t, 16, generator=gen, dtype=torch.float64) for t in [9, 0][:world_size]]
    x64 = [x.clone().requires_grad_(True) for x in xs]
    sum((_block_reference(params, x64[r], model.moe.config) * gs[r]).sum() for r in range(world_size)).backward()
    mine = model.moe.placement.local_expert_ids()
    want = {n: p.grad[mine] if n in names else p.grad for n, p in params.items()}
    errors = {}
    for form in ({"use_reentrant": True}, {"use_reentrant": False}, {"use_reentrant": False, "context_fn": selective}):
        model.zero_grad(set_to_none=True)
        x = xs[rank].float().requires_grad_(True)
        (checkpoint(model, x, **form) * gs[rank].float()).sum().backward()
        got = dict(model.named_parameters())
        for n, p in got.items():
            if n not in names:  # replicated: the ranks' gradients summed (DDP would average them)
                torch.distributed.all_reduce(p.grad)
        key = "selective" if "context_fn" in form else f"reentrant={form['use_reentrant']}"
        errors[key] = max([rel_err(got[n].grad, want[n]) for n in want] + [rel_err(x.grad, x64[rank].grad)
                                                                            if x64[rank].grad is not None else 0.0])
    return errors


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_activation_checkpointing_gives_the_float64_gradients(dispatcher):
    for errors in run_ranks(_checkpointed_gradients_rank, 2, dispatcher, timeout=90):
        assert max(errors.values()) <= tolerance(torch.float32), errors
