"""Checkpoints in and out of an expert-parallel layer.

- load_experts takes this rank's shard [L, ...] as well as the global [E, ...] weights: same layer.
- load_expert takes one expert's checkpoint tensors (gate, up, down apart, fp8 with scales), as an engine reads them.
- a layer built on the meta device, materialised with to_empty and loaded, equals one built normally;
  so does one built inside `with torch.device("meta"):` (as torchtitan builds a model).
- gather_experts hands every expert back in checkpoint layout, on every rank or on one.
- Hugging Face: HF -> replace_experts (2 gloo ranks) -> export_state_dict -> save_pretrained ->
  from_pretrained gives back the original state dict and logits exactly.
- torch.distributed.checkpoint: ep.distributed_state_dict -> dcp.save at 2 ranks -> dcp.load ->
  ep.load_distributed_state_dict into a model built with another seed, at 2 ranks and at 1 and 4; with
  Adam's state through ep.distributed_optimizer_state_dict, the step after resuming equals the uninterrupted one.
All on 2 gloo ranks against a one-process view of the same seeded weights.
"""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import run_ranks, tolerance

E, K, H, I = 8, 2, 16, 24


def _global_weights():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5, torch.randn(E, H, I, generator=gen) * I ** -0.5


def _tokens(rank):
    gen = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(6 + rank, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(x.shape[0])])
    return x, ids, torch.rand(x.shape[0], K, generator=gen)


def _checkpoint_rank(rank, world_size, dispatcher):
    w13, w2 = _global_weights()
    L = E // world_size
    lo = rank * L
    from_global = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch")
    from_global.load_experts(w13, w2)
    from_shard = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch")
    from_shard.load_experts(w13[lo:lo + L].clone(), w2[lo:lo + L].clone())
    on_meta = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", device="meta")
    assert on_meta.w13.is_meta
    on_meta.to_empty(device="cpu")
    on_meta.load_experts(w13[lo:lo + L].clone(), w2[lo:lo + L].clone())
    x, ids, weights = _tokens(rank)
    ref = moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(), from_global.config)
    with torch.no_grad():
        errors = {name: rel_err(layer(x, ids, weights), ref)
                  for name, layer in (("global", from_global), ("shard", from_shard), ("meta", on_meta))}
    same = torch.equal(from_shard.w13, from_global.w13) and torch.equal(on_meta.w2, from_global.w2)
    everywhere = from_shard.gather_experts()
    on_root = from_shard.gather_experts(dst=0)
    gathered = {"everywhere": torch.equal(everywhere.w13, w13) and torch.equal(everywhere.w2, w2),
                "on_root": (on_root is None) if rank != 0 else
                           (torch.equal(on_root.w13, w13) and torch.equal(on_root.w2, w2))}
    bad = {}
    for name, args in (("experts", (w13[:3], w2[:3])), ("w2", (w13, w2[:L]))):
        try:
            from_global.load_experts(*args)
        except ValueError as err:
            bad[name] = str(err)
    return errors, same, gathered, bad


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll"])
def test_shard_meta_and_gather_round_trip(dispatcher):
    for rank, (errors, same, gathered, bad) in enumerate(run_ranks(_checkpoint_rank, 2, dispatcher, timeout=120)):
        assert max(errors.values()) < 1e-5, (rank, errors)  # float32 vs float64 (the contract's bound)
        assert same, rank
        assert gathered == {"everywhere": True, "on_root": True}, (rank, gathered)
        assert bad["experts"] == ("w13 has shape [3, 48, 16]; dim 0 must be num_experts=8 (global weights) or "
                                  "this rank's num_local_experts=4 (its shard)"), bad
        assert bad["w2"] == "w2 has shape [4, 16, 24]; expected [8, 16, 24]", bad


def _meta_context_rank(rank, world_size):
    """Built inside `with torch.device("meta"):` without a device argument, as torchtitan and transformers
    build a model: the experts take the default device (meta, no memory), then to_empty + load_experts
    or reset_parameters give a working layer."""
    w13, w2 = _global_weights()
    torch.manual_seed(3)
    with torch.device("meta"):
        layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    on_meta = layer.w13.is_meta and layer.w2.is_meta
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    layer.reset_parameters()
    torch.manual_seed(3)
    same_init = torch.equal(layer.w13, ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch").w13)
    layer.load_experts(w13, w2)
    x, ids, weights = _tokens(rank)
    x = x.double().requires_grad_(True)
    layer.double()
    y = layer(x, ids, weights.double())
    y.sum().backward()
    x64 = x.detach().clone().requires_grad_(True)
    ref = moe_reference(x64, ids, weights.double(), w13.double(), w2.double(), layer.config)
    ref.sum().backward()
    return on_meta, same_init, rel_err(y.detach(), ref.detach()), rel_err(x.grad, x64.grad)


def test_layer_built_under_a_meta_device_context():
    for rank, (on_meta, same_init, err_y, err_dx) in enumerate(run_ranks(_meta_context_rank, 2)):
        assert on_meta and same_init, rank
        assert max(err_y, err_dx) < 1e-12, (rank, err_y, err_dx)  # float64 layer against the float64 reference



def _one_expert_at_a_time_rank(rank, world_size):
    """An inference engine's weight loader: each checkpoint tensor once per expert (gate_proj and up_proj
    apart, down_proj stored transposed), into a layer with redundant experts built on the meta device."""
    w13, w2 = _global_weights()
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", device="meta", num_redundant_experts=2)
    layer.to_empty(device="cpu")
    written = [0] * E
    for e in range(E):
        down_proj = w2[e].t().contiguous()  # a checkpoint holding [I, H]
        written[e] = layer.load_expert(e, gate=w13[e, :I].clone())
        assert layer.load_expert(e, up=w13[e, I:].clone(), w2=down_proj.t()) == written[e]
    whole = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", num_redundant_experts=2)
    whole.load_experts(w13, w2)
    x, ids, weights = _tokens(rank)
    with torch.no_grad():
        y = layer(x, ids, weights)
    ref = moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(), layer.config)
    # fp8 experts, block rows 16: I=24 splits a block between gate and up, so w13 comes whole
    fp8 = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", quant_config=ep.QuantConfig(
        weight_block=(16, 16), activation_group=16))
    fp8_whole = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", quant_config=fp8.quant)
    fp8_whole.load_experts(w13, w2)
    fp8_checkpoint = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", quant_config=fp8.quant)
    (q13, s13), (q2, s2) = fp8.quant.quantize_weight(w13), fp8.quant.quantize_weight(w2)
    for e in range(E):
        fp8.load_expert(e, w13=w13[e], w2=w2[e])  # float, quantized on the way
        fp8_checkpoint.load_expert(e, w13=q13[e], w13_scale_inv=s13[e], w2=q2[e], w2_scale_inv=s2[e])
    fp8_same = all(torch.equal(getattr(loaded, n).view(torch.uint8), getattr(fp8_whole, n).view(torch.uint8))
                   for n in ("w13", "w2", "w13_scale_inv", "w2_scale_inv") for loaded in (fp8, fp8_checkpoint))
    messages = []
    for kwargs in (dict(expert_id=E, w2=w2[0]), dict(expert_id=True, w2=w2[0]), dict(expert_id=0, gate=w13[0, :I].t()),
                   dict(expert_id=0, w13=w13[0], up=w13[0, I:]), dict(expert_id=0, w2=w2[0].half().to(torch.float8_e4m3fn))):
        with pytest.raises(ValueError) as err:
            layer.load_expert(**kwargs)
        messages.append(str(err.value))
    with pytest.raises(ValueError) as err:
        fp8.load_expert(0, gate=w13[0, :I])
    messages.append(str(err.value))
    return (written, torch.equal(layer.w13, whole.w13) and torch.equal(layer.w2, whole.w2), rel_err(y, ref), fp8_same,
            messages)


def test_load_expert_one_checkpoint_tensor_at_a_time():
    """An engine loads a checkpoint expert by expert and projection by projection (vLLM's weight_loader
    with shard_id w1 / w3 / w2 and expert_id); load_experts took [E, ...] or [L, ...] tensors only, so
    each rank had to build its whole shard (a second copy of its experts) and know which slots hold which
    expert. load_expert(expert_id, gate=..., up=..., w2=...) writes every local copy of that expert."""
    results = run_ranks(_one_expert_at_a_time_rank, 2, timeout=120)
    copies = [sum(counts) for counts in zip(*(written for written, *_ in results))]
    assert sorted(copies) == [1] * (E - 2) + [2, 2], copies  # two redundant copies: 10 slots, 5 per rank
    for rank, (written, same, error, fp8_same, messages) in enumerate(results):
        assert sum(written) == 5 and same and fp8_same, (rank, written, same, fp8_same)
        assert error < tolerance(torch.float32), (rank, error)
        assert messages == [
            f"expert_id={E}; allowed: an int 0..{E - 1} (a global expert id, num_experts={E})",
            f"expert_id=True; allowed: an int 0..{E - 1} (a global expert id, num_experts={E})",
            f"gate has shape [{H}, {I}]; expected [{I}, {H}] (one expert, [out, in] as nn.Linear stores it; a "
            f"checkpoint storing it transposed passes gate.t())",
            "w13 was given with gate / up; allowed: w13 ([gate; up] rows), or gate and / or up",
            "w2 has dtype torch.float8_e4m3fn; this layer stores w2 as torch.float32 (fp8 experts one at a time need "
            "a layer built with quant_config=ep.QuantConfig(); load_experts switches a whole layer)",
            f"gate fills rows 0..{I - 1} of w13, whose [16, 16] scale blocks it shares with the other half "
            f"(intermediate_size={I} is not a multiple of weight_block[0]=16); give w13 whole ([gate; up])"], messages

def _non_float_weights_rank(rank, world_size):
    w13, w2 = _global_weights()
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    messages = []
    for args in ((w13.round().int(), w2), (w13, w2 > 0), (w13, w2.tolist()), (w13.tolist(), w2), (w13, None)):
        with pytest.raises(TypeError) as err:
            layer.load_experts(*args)
        messages.append(str(err.value))
    layer.load_experts(w13, w2)  # the layer is still usable, and unchanged by the refused loads
    return messages, torch.equal(layer.gather_experts().w13, w13)


def test_integer_or_bool_weights_are_refused_naming_the_tensor():
    """load_experts cast an int32 or bool checkpoint tensor into the layer's dtype without a word
    (w13.round().int() loaded as whole numbers); a list for w2 failed with AttributeError 'shape', one for w13
    was named by its whole repr as a shape, and w2=None was "missing; the config has has_bias=True" without biases."""
    for messages, loaded in run_ranks(_non_float_weights_rank, 2, timeout=120):
        assert messages == ["w13 has dtype torch.int32; expected a floating torch.Tensor",
                            "w2 has dtype torch.bool; expected a floating torch.Tensor",
                            "w2 has type list; expected a floating torch.Tensor",
                            "w13 has type list; expected a floating torch.Tensor",
                            "w2 has type NoneType; expected a floating torch.Tensor"], messages
        assert loaded


def _bad_state_dict_rank(rank, world_size):
    w13, w2 = _global_weights()
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    layer.load_experts(w13, w2)
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.manual_seed(3)
    wide = ep.EPMoE(E, K, 2 * H, I, dispatcher="deepep_normal", runner="torch").state_dict()  # another hidden_size
    one_rank = ep.EPMoE(E, K, H, I, dispatcher="standard", runner="torch").state_dict()  # [E, ...]: saved at 1 rank
    messages = []
    for state in ({"w13": wide["w13"], "w2": wide["w2"]} if rank == 0 else good,  # rank 0's alone
                  one_rank,
                  {**good, "w2": good["w2"].round().long()},
                  ep.distributed_state_dict(layer)):  # DTensors [E, ...]: for ep.load_distributed_state_dict
        with pytest.raises((TypeError, ValueError)) as err:
            layer.load_state_dict(state)
        messages.append(f"{type(err.value).__name__}: {err.value}")
    x, ids, weights = _tokens(rank)
    ref = moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(), layer.config)
    with torch.no_grad():  # every rank refused every load: the layer is as loaded, and the ranks still pair up
        return messages, rel_err(layer(x, ids, weights), ref)


def test_a_bad_state_dict_on_one_rank_fails_every_rank_naming_it():
    """load_state_dict of a per-rank state_dict of another shape raised torch's size mismatch on that rank
    alone: the other rank loaded its own and went on to wait for it in the next forward. One saved at another EP
    size (or ep.distributed_state_dict's DTensors) was torch's size mismatch without the way out, and an int64 w2
    loaded silently as whole numbers. Every rank now refuses them together before loading, naming the key, both
    shapes (or the dtype) and the rank."""
    for messages, err in run_ranks(_bad_state_dict_rank, 2, timeout=120, group_timeout=30):
        assert messages == [
            f"ValueError: rank 0: state_dict['w13'] has shape [4, {2 * I}, {2 * H}]; expected [4, {2 * I}, {H}] "
            f"(num_experts={E}, hidden_size={H}, intermediate_size={I}, 4 expert slots on this rank) (each rank's "
            f"state_dict; every rank stops before loading it)",
            f"ValueError: state_dict['w13'] has shape [{E}, {2 * I}, {H}]; expected [4, {2 * I}, {H}] (this rank's 4 "
            f"expert slots: num_experts={E} + num_redundant_experts=0 over ep_size=2; a per-rank state_dict loads at "
            f"the num_experts and EP size it was saved at; to change the EP size, gather_experts() then load_experts())",
            "TypeError: state_dict['w2'] has dtype torch.int64; expected a floating dtype (this layer stores w2 as "
            "torch.float32)",
            f"ValueError: state_dict['w13'] is a DTensor of shape [{E}, {2 * I}, {H}] (the rows of every rank, as "
            f"ep.distributed_state_dict gives them); allowed here: this rank's [4, {2 * I}, {H}]. Load a distributed "
            f"state with ep.load_distributed_state_dict(model, state)"], messages
        assert err < tolerance(torch.float32), err


def test_one_rank_shard_is_the_global_weights():
    w13, w2 = _global_weights()
    layer = ep.EPMoE(E, K, H, I, runner="torch")
    layer.load_experts(w13, w2)
    back = layer.gather_experts()
    assert torch.equal(back.w13, w13) and torch.equal(back.w2, w2)


def _every_expert_on_every_rank(rank, world_size):
    w13, w2 = _global_weights()
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", num_redundant_experts=E)  # L = E
    slots = list(range(E)) + list(range(E))[::-1]  # rank 1 holds the experts in reverse order
    layer.apply_placement(ep.ExpertPlacement(E, world_size, rank, physical_to_logical=slots))
    layer.load_experts(w13, w2)
    x, ids, weights = _tokens(rank)
    with torch.no_grad():
        error = rel_err(layer(x, ids, weights), moe_reference(x.double(), ids, weights.double(), w13.double(),
                                                              w2.double(), layer.config))
    mine = slots[rank * E:(rank + 1) * E]
    return torch.equal(layer.w13, w13[mine]) and torch.equal(layer.w2, w2[mine]), error


def test_e_rows_are_the_global_weights_where_each_rank_holds_every_expert():
    """L == E (a copy of every expert on every rank, in another order on rank 1): load_experts reads E
    rows as the global weights, one per expert, not as the rank's slots in order (docs/api.md)."""
    for by_expert, error in run_ranks(_every_expert_on_every_rank, 2):
        assert by_expert and error <= tolerance(torch.float32), error


def test_gather_experts_on_one_rank_follows_the_placement():
    """On one rank gather_experts returned the slots as they were: after apply_placement with a
    permutation (or a checkpoint loaded in another placement) the experts came back out of order."""
    w13, w2 = _global_weights()
    quant = ep.QuantConfig()
    (q13, s13), (q2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
    permuted = ep.ExpertPlacement(E, 1, 0, physical_to_logical=[3, 1, 2, 0, 4, 5, 7, 6])
    for quant_config, loaded in ((None, dict(w13=w13, w2=w2)),
                                 (quant, dict(w13=q13, w2=q2, w13_scale_inv=s13, w2_scale_inv=s2))):
        layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", quant_config=quant_config)
        layer.load_experts(**loaded)
        layer.apply_placement(permuted)
        back = layer.gather_experts()
        for name, want in loaded.items():  # fp8 too, exactly, as float64
            assert torch.equal(getattr(back, name).double(), want.double()), (quant_config, name)


# ---------------------------------------------------------------- Hugging Face round trip

def _hf_round_trip_rank(rank, world_size, family, folder):
    transformers = pytest.importorskip("transformers")
    from test_hf import COMMON, FAMILIES
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(0)  # the same model on every rank
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    assert ep.hf.replace_experts(model, dispatcher="deepep_normal", runner="torch") == 2
    assert any(k.endswith("experts.layer.w13") for k in model.state_dict())  # the EP layout now
    exported = ep.hf.export_state_dict(model)
    everywhere = ep.hf.export_state_dict(model, dst=None)
    if rank != 0:
        return exported is None and everywhere is not None
    same = (sorted(exported) == sorted(original), all(torch.equal(exported[k], original[k]) for k in original),
            all(torch.equal(everywhere[k], original[k]) for k in original))
    model.save_pretrained(folder, state_dict=exported)  # may drop keys from the dict it is given
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        logits = reloaded(ids).logits
    return same + (torch.equal(logits, expected),)


HF_FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss", "aria"]


def _hf_round_trips_rank(rank, world_size, folders):
    """{family: _hf_round_trip_rank's result, or the traceback it raised}."""
    import traceback
    results = {}
    for family, folder in folders.items():
        try:
            results[family] = _hf_round_trip_rank(rank, world_size, family, folder)
        except Exception:  # noqa: BLE001 - the family's test reports it
            results[family] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def hf_round_trips(tmp_path_factory):
    """Every family's round trip from one spawn (its ranks import transformers and its safetensors I/O once,
    not once per family)."""
    pytest.importorskip("transformers")
    folders = {family: str(tmp_path_factory.mktemp(family)) for family in HF_FAMILIES}
    return run_ranks(_hf_round_trips_rank, 2, folders, timeout=300)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_round_trip(family, hf_round_trips):
    rank0, rank1 = (per_rank[family] for per_rank in hf_round_trips)
    assert rank1 is True, rank1
    assert rank0 == (True, True, True, True), rank0  # same keys, same tensors, same reloaded logits


def _gather_dst_rank(rank, world_size):
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="torch")
    to_zero = layer.gather_experts(dst=0)
    try:
        layer.gather_experts(dst=7)
        bad = "no error"
    except ValueError as err:
        bad = str(err)
    return to_zero is None, bad


def test_gather_experts_to_one_rank_also_when_experts_are_replicated():
    """dispatcher='standard' (every rank holds every expert): dst=0 gives the weights on rank 0 only,
    and a dst outside the group is an error naming it."""
    results = run_ranks(_gather_dst_rank, 2)
    assert [r[0] for r in results] == [False, True], results
    assert all("dst=7; allowed: None (every rank) or a rank 0..1" in r[1] for r in results), results


# ---------------------------------------------------------------- refused loads change nothing

def _refused_load_rank(rank, world_size):
    w13, w2 = (w.double() for w in _global_weights())
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64)
    layer.load_experts(w13, w2)
    quant = ep.QuantConfig()
    (q13, s13), (q2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
    nan_w2 = w2.clone()
    nan_w2[E - 1, 0, 0] = float("nan")  # expert 7: rank 1's on 2 ranks
    nan_w13 = w13.clone()
    nan_w13[[3, E - 1], 0, 0] = float("nan")  # an expert of each rank
    refused = {"fp8 scales": lambda: layer.load_experts(q13, q2, w13_scale_inv=s13, w2_scale_inv=s2[:3]),
               "nan w2": lambda: layer.load_experts(w13 * (1 + rank), nan_w2),  # rank 0 loads what it holds
               "quantize nan": lambda: layer.load_experts(nan_w13, w2, quantize="fp8_block")}
    messages = {}
    for name, load in refused.items():
        try:
            load()
        except ValueError as err:
            messages[name] = str(err)
    x, ids, weights = _tokens(rank)
    ref = moe_reference(x.double(), ids, weights.double(), w13, w2, layer.config)
    with torch.no_grad():
        error = rel_err(layer(x.double(), ids, weights), ref)
    return messages, layer.quant, layer.w13.dtype, error


def test_a_refused_load_leaves_the_layer_as_it_was():
    """load_experts switched a float layer to fp8 storage (uninitialised fp8 weights, quant set) before
    finding a scale of the wrong shape, and copied w13 before finding a NaN in w2: the refused load left
    the layer broken or half-loaded. Every check now runs before the layer changes, on every rank together."""
    for rank, (messages, quant, dtype, error) in enumerate(run_ranks(_refused_load_rank, 2, timeout=120)):
        # the same error on every rank: as one process raises it
        assert messages["fp8 scales"] == "w2_scale_inv has shape [3, 1, 1]; expected [8, 1, 1] (one scale per block)"
        # each rank checks the experts it keeps (expert 7 is rank 1's), and every rank raises naming the rank(s)
        stops = " (load_experts: every rank stops before loading)"
        assert messages["nan w2"] == "rank 1: w2 (experts 4..7) has a non-finite value nan at [3, 0, 0]" + stops
        assert messages["quantize nan"] == ("rank 0: w13 (experts 0..3) has a non-finite value nan at [3, 0, 0]; "
                                            "rank 1: w13 (experts 4..7) has a non-finite value nan at [3, 0, 0]" + stops)
        assert quant is None and dtype == torch.float64
        assert error < tolerance(torch.float64), (rank, error)  # both ranks still hold w13, w2


def test_weights_on_the_meta_device_are_named():
    """Weights of a model built on the meta device (from_config under torch.device("meta"), never
    materialised) failed inside torch with "Cannot copy out of meta tensor", naming no argument."""
    w13, w2 = _global_weights()
    layer = ep.EPMoE(E, K, H, I, runner="torch", has_bias=True)
    for name, args in (("w13", (w13.to("meta"), w2, torch.zeros(E, 2 * I), torch.zeros(E, H))),
                       ("b2", (w13, w2, torch.zeros(E, 2 * I), torch.zeros(E, H, device="meta")))):
        with pytest.raises(ValueError) as err:
            layer.load_experts(*args)
        assert str(err.value) == (f"{name} is on the meta device (it has no values); allowed: a tensor holding the "
                                  f"checkpoint's values, on any device (this layer's is cpu)")
    on_meta = ep.EPMoE(E, K, H, I, runner="torch", device="meta")
    on_meta.load_experts(w13.to("meta"), w2.to("meta"))  # meta into meta: shapes checked, nothing to copy
    # values into a layer still on the meta device: nothing to copy them into (they were dropped, no error)
    with pytest.raises(RuntimeError) as err:
        on_meta.load_experts(w13, w2.to("meta"))
    assert str(err.value) == ("w13 holds values but this layer's experts are on the meta device (no memory to load "
                              "into); layer.to_empty(device=...) first"), str(err.value)
    assert on_meta.w13.is_meta


def _meta_forward_rank(rank, world_size):
    w13, w2 = _global_weights()
    x, ids, weights = _tokens(rank)
    messages = []
    on_meta = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", device="meta")
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    # w13 given values by an assign=True load of a state_dict without w2: w2 stays on the meta device
    half_meta = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", device="meta")
    half_meta.load_state_dict({"w13": layer.state_dict()["w13"].clone()}, strict=False, assign=True)
    # a layer with no values: RuntimeError (a state, not an argument); x on the wrong device: ValueError
    for module, tokens, error in ((on_meta, x.to("meta"), RuntimeError), (on_meta, x, RuntimeError),
                                  (layer, x.to("meta"), ValueError), (half_meta, x, RuntimeError)):
        with pytest.raises(error) as err:
            module(tokens, ids.to(tokens.device), weights.to(tokens.device))
        messages.append(str(err.value))
    layer.load_experts(w13, w2)  # nothing was dispatched: the group goes on as usual
    y = layer(x, ids, weights)
    return messages, rel_err(y, moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(),
                                              layer.config))


def test_meta_device_forward_is_named():
    """A forward on a layer still on the meta device (built there, never materialised), or of x on the
    meta device into a CPU layer, failed inside torch.autocast's device lookup ("unknown device type for
    autocast"), naming neither the layer nor x. Now: an error naming what to do, or x's device. A layer whose
    w13 holds values but w2 is still on the meta device (load_state_dict(..., assign=True) of a state_dict without
    w2; torch.func.functional_call with a meta w2) returned numbers read from uninitialised memory: now an error
    naming w2."""
    not_materialised = ("this layer's experts are on the meta device (built with device='meta' or under `with "
                        "torch.device('meta'):`), so they have no values to compute with; materialise them first: "
                        "layer.to_empty(device=...), then layer.load_experts(...)")
    w2_on_meta = ("this layer's w2 is on the meta device while w13 holds values (a meta tensor put in place: "
                  "load_state_dict(..., assign=True) of a state_dict without it, or torch.func.functional_call), so "
                  "there are no values to compute with; give them values: load_state_dict({...}, assign=True) with "
                  "them, or layer.to_empty(device=...) then layer.load_experts(...)")
    for messages, error in run_ranks(_meta_forward_rank, 2):
        assert messages == [not_materialised, not_materialised, "x is on meta; this layer is on cpu", w2_on_meta]
        assert error <= tolerance(torch.float32)


def _assign_into_meta_rank(rank, world_size):
    w13, w2 = (w.double() for w in _global_weights())
    make = lambda **kw: ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64,  # noqa: E731
                                 num_redundant_experts=2, **kw)
    saved = make()
    saved.load_experts(w13, w2)
    layer = make(device="meta")
    layer.load_state_dict({k: v.clone() for k, v in saved.state_dict().items()}, assign=True)
    x, ids, weights = _tokens(rank)
    ref = moe_reference(x.double(), ids, weights.double(), w13, w2, layer.config)
    with torch.no_grad():
        errors = [rel_err(layer(x.double(), ids, weights), ref)]
        saved(x.double(), ids, weights)
        load = layer.expert_load()
        same_load = load.device == torch.device("cpu") and torch.equal(load, saved.expert_load())
        layer.rebalance()  # reads the counts: they must hold values
        errors.append(rel_err(layer(x.double(), ids, weights), ref))
    return same_load, errors


def test_load_state_dict_assign_into_a_meta_layer_counts_expert_load():
    """A layer built on the meta device and given its weights by load_state_dict(..., assign=True) kept
    its load counters on the meta device: expert_load() returned a meta tensor and rebalance() failed
    with "Cannot copy out of meta tensor"."""
    for same_load, errors in run_ranks(_assign_into_meta_rank, 2, timeout=120):
        assert same_load
        assert max(errors) < tolerance(torch.float64), errors


def _partial_state_dict_rank(rank, world_size):
    torch.manual_seed(0)
    w13, w2 = (w.double() for w in _global_weights())
    gen = torch.Generator().manual_seed(8)
    b13, b2 = torch.randn(E, 2 * I, generator=gen, dtype=torch.float64), torch.randn(E, H, generator=gen, dtype=torch.float64)

    def make():
        layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64,
                         has_bias=True, num_redundant_experts=2)
        layer.load_experts(w13, w2, b13, b2)
        return layer
    x, ids, weights = _tokens(rank)
    ids[:, 0] = rank  # experts 0 and 1 hot: the rebalance moves experts
    ref = moe_reference(x.double(), ids, weights.double(), w13, w2, make().config, b13, b2)
    rebalanced = make()
    with torch.no_grad():
        rebalanced(x.double(), ids, weights)
        rebalanced.rebalance()
    moved = rebalanced.placement != make().placement
    fresh_weights = {k: v for k, v in make().state_dict().items() if k in ("w13", "w2")}
    rebalanced_w2 = {k: v.clone() for k, v in rebalanced.state_dict().items() if k != "w13"}
    errors = {}
    with torch.no_grad():
        rebalanced.load_state_dict(fresh_weights, strict=False)  # biases not in it: they keep their experts
        errors["no biases"] = rel_err(rebalanced(x.double(), ids, weights), ref)
        fresh = make()
        fresh.load_state_dict(rebalanced_w2, strict=False)  # no w13: it keeps its experts in the saved slots
        errors["no w13"] = rel_err(fresh(x.double(), ids, weights), ref)
    return moved, errors


def test_a_partial_state_dict_in_another_placement_keeps_the_other_experts():
    """load_state_dict(strict=False) of a state_dict in another placement (saved before or after a
    rebalance) that holds only some expert tensors: the layer took the state_dict's placement, or, without
    w13, ignored it, and the tensors it did not hold (biases, w13) stayed in the old slots, silently
    attached to other experts."""
    for moved, errors in run_ranks(_partial_state_dict_rank, 2, timeout=120):
        assert moved
        assert max(errors.values()) < tolerance(torch.float64), errors


def _rebalanced_state_rank(rank, world_size):
    torch.manual_seed(0)
    w13, w2 = _global_weights()
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    layer.load_experts(w13, w2)
    x, ids, weights = _tokens(rank)
    ids[:, 0] = 0  # expert 0 hot: the rebalance moves experts
    with torch.no_grad():
        layer(x, ids, weights)
        layer.rebalance()
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}  # by value through the result queue


def _load_other_ep_size_rank(rank, world_size, states):
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    with pytest.raises(ValueError) as err:
        layer.load_state_dict({k: torch.from_numpy(v) for k, v in states[rank % len(states)].items()})
    return str(err.value)


def test_a_rebalanced_state_dict_at_another_ep_size_is_named():
    """A per-rank state_dict saved after a rebalance at EP=2 and loaded at EP=4 failed with
    "expert_to_rank gives rank 0 4 experts ...", naming an argument the caller never gave."""
    states = run_ranks(_rebalanced_state_rank, 2)
    assert all("expert_placement" in s for s in states)
    for message in run_ranks(_load_other_ep_size_rank, 4, states):
        assert message.startswith("state_dict['expert_placement'] places the 8 slots on ranks 0..1; this layer has "
                                  "ep_size=4, num_experts=8 (expert_to_rank gives rank 0 4 experts;"), message
        assert message.endswith("A per-rank state_dict loads at the EP size it was saved at; to change it, "
                                "gather_experts() then load_experts()"), message


def _placement_less_state_rank(rank, world_size):
    w13, w2 = (w.double() for w in _global_weights())
    make = lambda **kw: ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", dtype=torch.float64, **kw)  # noqa: E731
    round_robin = dict(expert_to_rank=[e % world_size for e in range(E)])
    redundant_swapped = dict(num_redundant_experts=2, expert_to_rank=[0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
    x, ids, weights = _tokens(rank)
    ref = moe_reference(x.double(), ids, weights.double(), w13, w2, make().config)
    errors, keys = {}, {}
    for name, saver_kw, loader_kw in (("default into round-robin", {}, round_robin),
                                      ("round-robin into default", round_robin, {}),
                                      ("redundant into other slots", dict(num_redundant_experts=2), redundant_swapped)):
        saver = make(**saver_kw)
        saver.load_experts(w13, w2)
        state = {k: v.clone() for k, v in saver.state_dict().items()}
        keys[name] = sorted(state)
        loader = make(**loader_kw)
        loader.load_state_dict(state)
        with torch.no_grad():
            errors[name] = rel_err(loader(x.double(), ids, weights), ref)
    return keys, errors


def test_a_state_dict_without_placement_loads_into_a_layer_built_with_another_placement():
    """A per-rank state_dict named its placement only off the saving layer's initial placement, and one
    without the entry was read as the loading layer's initial placement: saved by a default layer and
    loaded into one built with expert_to_rank (or the other way round), every slot silently took another
    expert's weights. The entry is now written whenever the slots are not in the default placement (E
    + N slots contiguous over the ranks, slot p holding expert p % E), and no entry means that one."""
    for keys, errors in run_ranks(_placement_less_state_rank, 2, timeout=120):
        assert keys == {"default into round-robin": ["w13", "w2"],  # a default layer's state_dict is as it was
                        "round-robin into default": ["expert_placement", "w13", "w2"],
                        "redundant into other slots": ["w13", "w2"]}, keys
        assert max(errors.values()) < tolerance(torch.float64), errors


# ---------------------------------------------------------------- torch.distributed.checkpoint (DCP)

class _Model(nn.Module):
    """Two sharded EPMoE layers (fp8 experts, then float ones with biases), a replicated Linear between
    them and a replicated (dispatcher="standard") EPMoE beside the second."""

    def __init__(self, expert_to_rank=None):
        super().__init__()
        self.moe1 = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", quant_config=ep.QuantConfig(),
                             expert_to_rank=expert_to_rank)
        self.proj = nn.Linear(H, H)
        self.moe2 = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", has_bias=True)
        self.replicated = ep.EPMoE(E, K, H, I, dispatcher="standard", runner="torch")

    def forward(self, x, ids, weights):
        h = self.proj(x + self.moe1(x, ids, weights))
        return h + self.moe2(h, ids, weights) + self.replicated(h, ids, weights)


def _experts(model) -> dict:
    """Every layer's experts in checkpoint layout ([E, ...], float64) and the sharded layers' placements."""
    out = {f"{name}.placement": [list(row) for row in ep.layer._placement_tables(getattr(model, name).placement)]
           for name in ("moe1", "moe2")}
    for name in ("moe1", "moe2", "replicated"):
        for field, t in vars(getattr(model, name).gather_experts()).items():
            if isinstance(t, torch.Tensor):
                out[f"{name}.{field}"] = t.double().numpy()
    out["proj.weight"] = model.proj.weight.detach().double().numpy()
    return out


def _outputs(model, ranks) -> list:
    """The model's output on the tokens of each saving rank in `ranks` (float64 numpy)."""
    with torch.no_grad():
        return [model(*_tokens(r)).double().numpy() for r in ranks]


def _dcp_save_rank(rank, world_size, path):
    torch.manual_seed(0)
    model = _Model(expert_to_rank=[e % world_size for e in range(E)])  # round-robin: rank r's rows are slots r, r+2, ...
    w13, w2 = _global_weights()
    quant = ep.QuantConfig()
    (q13, s13), (q2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
    model.moe1.load_experts(q13, q2, w13_scale_inv=s13 * 1.5, w2_scale_inv=s2)  # scales unlike the initial ones
    gen = torch.Generator().manual_seed(9)
    model.moe2.load_experts(w13.flip(0), w2.flip(0), torch.randn(E, 2 * I, generator=gen), torch.randn(E, H, generator=gen))
    x, ids, weights = _tokens(rank)
    with torch.no_grad():
        model.moe2(x, torch.zeros_like(ids) + torch.arange(K), weights)  # experts 0 and 1 hot
        model.moe2.rebalance()
    state = ep.distributed_state_dict(model)
    kinds = {k: type(v).__name__ for k, v in state.items()}
    dcp.save(state, checkpoint_id=path)
    return _experts(model), _outputs(model, [rank]), kinds


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    """A DCP checkpoint of _Model saved at 2 ranks: (path, experts, each rank's outputs, state_dict types)."""
    path = str(tmp_path_factory.mktemp("dcp"))
    saved = run_ranks(_dcp_save_rank, 2, path, timeout=120)
    return path, saved[0][0], [y for _, (y,), _ in saved], saved[0][2]


def _dcp_load_rank(rank, world_size, path):
    torch.manual_seed(1)  # another initialisation than the saved model's
    model = _Model()
    state = ep.distributed_state_dict(model)
    dcp.load(state, checkpoint_id=path)
    ep.load_distributed_state_dict(model, state)
    ranks = [0, 1] if world_size == 1 else [rank % 2]  # the saving ranks' tokens, run here
    return _experts(model), _outputs(model, ranks), ranks


def test_dcp_round_trip_at_the_saved_ep_size(dcp_checkpoint):
    """dcp.save of model.state_dict() kept one of the same-named expert tensors of the two ranks, and
    dcp.load then gave every rank rank 0's experts, silently. ep.distributed_state_dict makes each
    sharded layer's experts (fp8 ones with their scales too) DTensors sharded over the EP group, and the
    placements come back with them: the rebalanced layer's, and the round-robin one into a model built
    with the default placement."""
    path, experts, outputs, kinds = dcp_checkpoint
    for name in ("moe1.w13", "moe1.w2", "moe1.w13_scale_inv", "moe1.w2_scale_inv", "moe2.w13", "moe2.b2"):
        assert kinds[name] == "DTensor", (name, kinds)
    assert {kinds[name] for name in ("proj.weight", "replicated.w13", "moe2.expert_placement")} == {"Tensor"}, kinds
    assert experts["moe1.placement"][0] == [0, 1] * (E // 2)  # round-robin: the rows are not the slots
    assert experts["moe2.placement"][1] != list(range(E))  # the rebalance moved experts: the round trip means something
    for rank, (loaded, ys, ranks) in enumerate(run_ranks(_dcp_load_rank, 2, path, timeout=120)):
        assert sorted(loaded) == sorted(experts)
        for name, want in experts.items():
            assert torch.equal(torch.as_tensor(loaded[name]), torch.as_tensor(want)), (rank, name)  # bit for bit, in float64
        for y, r in zip(ys, ranks):
            assert rel_err(torch.from_numpy(y), torch.from_numpy(outputs[r])) < tolerance(torch.float32), (rank, r)


@pytest.mark.parametrize("world_size", [1, 4])
def test_dcp_loads_at_another_ep_size(dcp_checkpoint, world_size):
    """Saved at 2 ranks, loaded at 1 or 4: DCP reshards the [E, ...] slot tensors over the new ranks; each
    rank's slots hold the experts of the rows it got (the rebalanced layer keeps its experts' order), and
    the model computes what the saved one did."""
    path, experts, outputs, _ = dcp_checkpoint
    for rank, (loaded, ys, ranks) in enumerate(run_ranks(_dcp_load_rank, world_size, path, timeout=120)):
        for name, want in experts.items():
            if not name.endswith("placement"):  # the slots' ranks follow the EP size
                assert torch.equal(torch.as_tensor(loaded[name]), torch.as_tensor(want)), (rank, name)
        for y, r in zip(ys, ranks):
            assert rel_err(torch.from_numpy(y), torch.from_numpy(outputs[r])) < tolerance(torch.float32), (rank, r)


def _dcp_without_placement_rank(rank, world_size, path):
    w13, w2 = _global_weights()
    make = lambda **kw: nn.ModuleDict({"moe": ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", **kw)})  # noqa: E731
    saved = make(expert_to_rank=[e % world_size for e in range(E)])  # round-robin: the rows are not the slots
    saved["moe"].load_experts(w13, w2)
    dcp.save(ep.distributed_state_dict(saved), checkpoint_id=path)
    torch.manual_seed(1)
    model = make()
    state = ep.distributed_state_dict(model)
    dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())
    state.pop("moe.expert_placement")
    with pytest.raises(ValueError) as err:
        ep.load_distributed_state_dict(model, state)
    missing = ep.load_distributed_state_dict(model, state, strict=False).missing_keys
    state = ep.distributed_state_dict(model)
    dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())
    ep.load_distributed_state_dict(model, state)  # with the placement: the saved experts
    x, ids, weights = _tokens(rank)
    ref = moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(), model["moe"].config)
    with torch.no_grad():
        return str(err.value), missing, rel_err(model["moe"](x, ids, weights), ref)


@pytest.mark.parametrize("call,match", [
    (lambda m, o: ep.distributed_state_dict(None), r"model=None \(NoneType\); allowed: a torch.nn.Module"),
    (lambda m, o: ep.load_distributed_state_dict(m, None), r"state_dict=None \(NoneType\); allowed: a dict"),
    (lambda m, o: ep.load_distributed_state_dict("model", {}), r"model='model' \(str\); allowed: a torch.nn.Module"),
    (lambda m, o: ep.distributed_optimizer_state_dict(m, None), r"optimizer=None \(NoneType\); allowed: a torch.optim"),
    (lambda m, o: ep.load_distributed_optimizer_state_dict(m, o, [1]), r"state_dict=\[1\] \(list\); allowed: a dict"),
    (lambda m, o: ep.load_distributed_optimizer_state_dict(m, {}, {}), r"optimizer=\{\} \(dict\); allowed: a torch.optim"),
])
def test_checkpoint_arguments_of_the_wrong_type_are_named(call, match):
    """The dcp helpers' model, state_dict and optimizer of the wrong type are named with what is allowed (was:
    AttributeError 'NoneType' object has no attribute 'state_dict', or "'NoneType' object is not iterable")."""
    model = nn.ModuleDict({"moe": ep.EPMoE(8, 2, 16, 8, runner="torch")})
    with pytest.raises(TypeError, match=match):
        call(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_dcp_state_without_the_placement_is_named(tmp_path):
    """A state without a layer's expert_placement (which distributed_state_dict always adds) loaded its rows as
    the default placement under strict=True with no word: a round-robin checkpoint's experts went into the wrong
    slots. strict=True now names the key on every rank; strict=False loads the rows so and reports the key in
    missing_keys."""
    for message, missing, err in run_ranks(_dcp_without_placement_rank, 2, str(tmp_path), timeout=120,
                                                      group_timeout=30):
        assert message == (
            "state_dict holds moe's expert rows but no 'moe.expert_placement' (the placement they were saved in, which "
            "ep.distributed_state_dict always adds): without it they would load into the wrong slots. Allowed: the "
            "dict ep.distributed_state_dict made, filled by dcp.load; strict=False loads the rows as the default "
            "placement and reports the key missing"), message
        assert missing == ["moe.expert_placement"], missing
        assert err < tolerance(torch.float32), err


def _dcp_slot_counts_rank(rank, world_size, path):
    make = lambda e, n: nn.ModuleDict({"moe": ep.EPMoE(e, K, H, I, dispatcher="deepep_normal", runner="torch",  # noqa: E731
                                                       num_redundant_experts=n)})
    saved = make(E, 2)
    dcp.save(ep.distributed_state_dict(saved), checkpoint_id=path)
    messages = {}
    with pytest.raises(CheckpointException) as err:  # DCP's size check, before any layer sees the state
        dcp.load(ep.distributed_state_dict(make(E, 0)), checkpoint_id=path)
    messages["dcp"] = str(err.value)
    with pytest.raises(CheckpointException) as err:
        dcp.load(ep.distributed_state_dict(make(E, 0)), checkpoint_id=path, planner=ep.ExpertLoadPlanner())
    messages["planner"] = str(next(iter(err.value.failures.values()))[0])
    with pytest.raises(ValueError) as err:
        ep.load_distributed_state_dict(make(E, 0), ep.distributed_state_dict(saved))
    messages["load"] = str(err.value)
    # 4 experts + 4 copies saved at 4 ranks, 2 slots each: rows 0..3 (rank 0's at 2 ranks) hold expert 0 twice
    copies = make(4, 4)
    state = ep.distributed_state_dict(copies)
    state["moe.expert_placement"] = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 2, 3, 1, 2, 3]])
    with pytest.raises(ValueError) as err:
        ep.load_distributed_state_dict(copies, state)
    messages["copies"] = str(err.value)
    return messages


def test_dcp_checkpoint_with_other_slot_counts_is_named(tmp_path):
    """A DCP checkpoint of a layer with 2 redundant experts (10 slots) loaded into one without (8): DCP
    stops at its size check; ExpertLoadPlanner and load_distributed_state_dict name the layer, both slot
    counts and the way out. Rows that would put two copies of an expert on one rank are named too."""
    for messages in run_ranks(_dcp_slot_counts_rank, 2, str(tmp_path), timeout=120):
        assert "ValueError: Size mismatch between saved torch.Size([" in messages["dcp"], messages["dcp"]
        slots = ("moe: the checkpoint holds 10 physical expert slots (moe.expert_placement [2, 10]), this layer 8 "
                 "(num_experts + num_redundant_experts); a distributed checkpoint loads at any EP size but into the "
                 "same number of slots. To change num_redundant_experts, build the model as it was saved, load it, "
                 "gather_experts() and load_experts() the [E, ...] weights into the new layer")
        assert messages["planner"] == slots and messages["load"] == slots, messages
        assert messages["copies"] == (
            "moe: the checkpoint's 8 slots, saved at ep_size=4, in rows of 4 per rank at ep_size=2: "
            "physical_to_logical puts two copies of expert 0 on rank 0 (slots [0, 2]); copies of one expert must sit "
            "on different ranks. Load it at ep_size=4, then gather_experts() and load_experts() the [E, ...] weights "
            "into the layer at this EP size"), messages["copies"]


def _dcp_other_format_rank(rank, world_size, path):
    """fp8 experts saved, loaded into a layer built unquantized (and float experts into an fp8 layer)."""
    w13, w2 = _global_weights()
    make = lambda **kw: nn.ModuleDict({"moe": ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", **kw)})  # noqa: E731
    messages, unchanged = {}, []
    for saved_quant, loading_quant in ((ep.QuantConfig(), None), (None, ep.QuantConfig())):
        saved = make()
        saved["moe"].load_experts(w13, w2, quantize=saved_quant)
        folder = f"{path}/{'fp8' if saved_quant else 'float'}"
        dcp.save(ep.distributed_state_dict(saved), checkpoint_id=folder)
        model = make(quant_config=loading_quant)
        before = {name: t.clone() for name, t in model.state_dict().items()}
        with pytest.raises(CheckpointException) as err:
            dcp.load(ep.distributed_state_dict(model), checkpoint_id=folder, planner=ep.ExpertLoadPlanner())
        messages["fp8" if saved_quant else "float"] = str(next(iter(err.value.failures.values()))[0])
        unchanged.append(all(torch.equal(t.view(torch.uint8), before[name].view(torch.uint8))
                             for name, t in model.state_dict().items()))
    return messages, unchanged


def test_dcp_checkpoint_of_another_expert_format_is_named(tmp_path):
    """fp8 experts saved through ep.distributed_state_dict loaded into a layer built without quant_config: dcp.load
    cast the fp8 values to the layer's dtype and left the scales in the checkpoint, so the layer computed with
    unscaled weights (outputs ~1e9 times too large), no error. ExpertLoadPlanner now names the tensor, both dtypes
    and the way out on every rank before anything is read, in both directions (float experts into an fp8 layer
    stopped at DCP's "Missing key in checkpoint state_dict: moe.w13_scale_inv")."""
    for messages, unchanged in run_ranks(_dcp_other_format_rank, 2, str(tmp_path), timeout=120, group_timeout=30):
        assert messages["fp8"] == (
            "moe: the checkpoint holds moe.w13 as torch.float8_e4m3fn, this layer stores it as torch.float32 (dcp.load "
            "would cast the values and leave their block scales behind). Allowed: build the layer with "
            "quant_config=ep.QuantConfig() as saved"), messages["fp8"]
        assert messages["float"] == (
            "moe: the checkpoint holds moe.w13 as torch.float32, this layer stores it as torch.float8_e4m3fn (dcp.load "
            "would cast the values and find no block scales). Allowed: build the layer without quant_config as saved, "
            "load it, then load_experts() its gather_experts() weights with quantize='fp8_block'"), messages["float"]
        assert unchanged == [True, True]


def _dcp_replicated_rank(rank, world_size, path):
    """DCP checkpoints between a sharded layer and a replicated (dispatcher="standard") one, both ways, and fp8
    experts of a replicated layer into a float one. Returns (each case's gathered experts equal the saved ones, its
    relative error against the float64 reference), and the planner's message for the fp8 case."""
    w13, w2 = _global_weights()
    make = lambda dispatcher, **kw: nn.ModuleDict({"moe": ep.EPMoE(  # noqa: E731
        E, K, H, I, dispatcher=dispatcher, runner="torch", **kw)})
    x, ids, weights = _tokens(rank)
    ref = moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(), make("standard")["moe"].config)
    round_robin = {"expert_to_rank": [e % world_size for e in range(E)]}  # rank r's rows are slots r, r+2, ...
    results = {}
    for case, (saved_as, saving, loading_as, loading) in {
            "sharded -> replicated": ("deepep_normal", round_robin, "standard", {}),
            "replicated -> sharded": ("standard", {}, "deepep_normal", round_robin),
            "replicated (no table) -> sharded": ("standard", {}, "deepep_normal", round_robin)}.items():
        saved = make(saved_as, **saving)
        saved["moe"].load_experts(w13, w2)
        # (no table: a replicated layer's state as distributed_state_dict gave it before it added one)
        dcp.save(saved.state_dict() if "no table" in case else ep.distributed_state_dict(saved),
                 checkpoint_id=f"{path}/{len(results)}")
        torch.manual_seed(1)
        model = make(loading_as, **loading)
        state = ep.distributed_state_dict(model)
        dcp.load(state, checkpoint_id=f"{path}/{len(results)}", planner=ep.ExpertLoadPlanner())
        ep.load_distributed_state_dict(model, state)
        gathered = model["moe"].gather_experts()
        with torch.no_grad():
            results[case] = (torch.equal(gathered.w13, w13) and torch.equal(gathered.w2, w2),
                             rel_err(model["moe"](x, ids, weights), ref))
    saved = make("standard", quant_config=ep.QuantConfig())
    saved["moe"].load_experts(w13, w2)
    dcp.save(ep.distributed_state_dict(saved), checkpoint_id=f"{path}/fp8")
    with pytest.raises(CheckpointException) as err:
        dcp.load(ep.distributed_state_dict(make("standard")), checkpoint_id=f"{path}/fp8", planner=ep.ExpertLoadPlanner())
    return results, str(next(iter(err.value.failures.values()))[0])


def test_dcp_between_sharded_and_replicated_layers(tmp_path):
    """A DCP checkpoint holds a sharded layer's experts in its slots' order (rank by rank): a replicated
    (dispatcher="standard") layer took those rows as its experts in order, so a round-robin or rebalanced
    checkpoint gave it every expert's weights to another expert, no error (relative error ~1); and fp8 experts
    of a replicated layer loaded into a float one unscaled (the planner named that for sharded layers only).
    distributed_state_dict now gives every EPMoE layer its expert_placement, the replicated layer puts the rows in
    expert order, and a replicated checkpoint (with its table, or without one as saved before) loads into a
    sharded layer of any placement."""
    for results, fp8 in run_ranks(_dcp_replicated_rank, 2, str(tmp_path), timeout=120, group_timeout=30):
        for case, (same, err) in results.items():
            assert same and err < tolerance(torch.float32), (case, same, err)
        assert fp8.startswith("moe: the checkpoint holds moe.w13 as torch.float8_e4m3fn, this layer stores it as "
                              "torch.float32"), fp8


def _train_step(model, optimizer, ranks):
    """One Adam step on the saving ranks' tokens in `ranks` (at 1 rank: both ranks' tokens, the same loss)."""
    optimizer.zero_grad()
    loss = 0
    for r in ranks:
        x, ids, weights = _tokens(r)
        y = model.moe(x, ids, weights)
        loss = loss + (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(80 + r))).sum()
    loss.backward()
    optimizer.step()


def _adam_model(seed):
    torch.manual_seed(seed)
    model = nn.Module()
    model.moe = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _dcp_optimizer_save_rank(rank, world_size, path):
    model, optimizer = _adam_model(0)
    model.moe.load_experts(*_global_weights())
    for _ in range(2):
        _train_step(model, optimizer, [rank])
    wrapped = torch.compile(model)  # a wrapper (never run): torch's optimizer keys drop its "_orig_mod." prefix
    state = {"model": ep.distributed_state_dict(model), "optim": ep.distributed_optimizer_state_dict(wrapped, optimizer)}
    kinds = {k: type(v).__name__ for k, v in state["optim"]["state"]["moe.w13"].items()}
    dcp.save(state, checkpoint_id=path)
    _train_step(model, optimizer, [rank])
    gathered = model.moe.gather_experts()
    return kinds, gathered.w13.numpy(), gathered.w2.numpy()  # (numpy: pickled by value)


def _dcp_optimizer_load_rank(rank, world_size, path):
    model, optimizer = _adam_model(1)  # another initialisation, a fresh optimizer
    return _load_and_step(model, optimizer, path, rank, world_size)


def _load_and_step(model, optimizer, path, rank, world_size):
    """Load the model and optimizer from the DCP checkpoint at path, take one step (all the saved ranks' tokens
    at 1 rank): the experts after it, gathered (numpy: pickled by value)."""
    state = {"model": ep.distributed_state_dict(model), "optim": ep.distributed_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())
    ep.load_distributed_state_dict(model, state["model"])
    ep.load_distributed_optimizer_state_dict(model, optimizer, state["optim"])
    _train_step(model, optimizer, [0, 1] if world_size == 1 else [rank])
    gathered = model.moe.gather_experts()
    return gathered.w13.numpy(), gathered.w2.numpy()


@pytest.fixture(scope="module")
def dcp_optimizer_checkpoint(tmp_path_factory):
    """(path, what each rank's dict held for moe.w13, the experts after one more step) of an Adam run saved at 2 ranks."""
    path = str(tmp_path_factory.mktemp("dcp_optim"))
    saved = run_ranks(_dcp_optimizer_save_rank, 2, path, timeout=60)
    return path, saved[0][0], [torch.from_numpy(w) for w in saved[0][1:]]


@pytest.mark.parametrize("world_size", [2, 1])
def test_dcp_optimizer_state_resumes_training(dcp_optimizer_checkpoint, world_size):
    """Adam's moments of the expert parameters are per rank like the experts: through
    torch's get_optimizer_state_dict DCP saved rank 0's moments and loaded them on every rank (the step
    after resuming differed from the uninterrupted one, silently). ep.distributed_optimizer_state_dict
    shards them as the experts, also given a wrapped model (torch.compile's, DDP's: torch's keys drop the
    wrapper's prefix); the step after loading, at the saved EP size or at 1 rank, equals the uninterrupted run's."""
    path, kinds, (want13, want2) = dcp_optimizer_checkpoint
    assert kinds == {"step": "Tensor", "exp_avg": "DTensor", "exp_avg_sq": "DTensor"}, kinds
    for w13, w2 in run_ranks(_dcp_optimizer_load_rank, world_size, path, timeout=60):
        errors = rel_err(torch.from_numpy(w13), want13), rel_err(torch.from_numpy(w2), want2)
        assert max(errors) <= tolerance(torch.float32), errors


def _rebalanced_optimizer_save_rank(rank, world_size, path):
    """Adam steps with a rebalance between them (the slots then hold the experts in a
    non-contiguous order, their moments moved with them); saved, then one more step: the uninterrupted run."""
    torch.manual_seed(0)
    model = nn.Module()
    model.moe = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    model.moe.load_experts(*_global_weights())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_step(model, optimizer, [rank])
    model.moe.apply_placement(ep.eplb.plan(torch.arange(E, dtype=torch.float64) ** 3, world_size, E), optimizer=optimizer)
    _train_step(model, optimizer, [rank])
    dcp.save({"model": ep.distributed_state_dict(model), "optim": ep.distributed_optimizer_state_dict(model, optimizer)},
             checkpoint_id=path)
    _train_step(model, optimizer, [rank])
    gathered = model.moe.gather_experts()
    return model.moe.placement.is_contiguous, gathered.w13.numpy(), gathered.w2.numpy()


def _rebalanced_optimizer_load_rank(rank, world_size, path, dispatcher):
    torch.manual_seed(1)  # another initialisation, a fresh optimizer
    model = nn.Module()
    model.moe = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch")
    return _load_and_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), path, rank, world_size)


@pytest.mark.parametrize("dispatcher, world_size", [("deepep_normal", 2), ("deepep_normal", 1), ("standard", 1)])
def test_dcp_optimizer_state_of_a_rebalanced_layer_follows_its_experts(tmp_path, dispatcher, world_size):
    """A checkpoint saved after a rebalance (slots in a non-contiguous order, Adam's moments moved with them) resumes
    with each expert's moments on its expert: the step after loading, sharded at the saved EP size, at 1 rank, or
    into a replicated (dispatcher="standard") layer, equals the uninterrupted run's. The replicated layer
    put the weights' rows in expert order but left the moments in the slots' order: each expert stepped with
    another's moments, silently."""
    saved = run_ranks(_rebalanced_optimizer_save_rank, 2, str(tmp_path), timeout=60)
    contiguous, want13, want2 = saved[0][0], *(torch.from_numpy(w) for w in saved[0][1:])
    assert not contiguous
    for w13, w2 in run_ranks(_rebalanced_optimizer_load_rank, world_size, str(tmp_path), dispatcher, timeout=60):
        errors = rel_err(torch.from_numpy(w13), want13), rel_err(torch.from_numpy(w2), want2)
        assert max(errors) <= tolerance(torch.float32), errors


class _DenseThenMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.moe = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")

    def forward(self, x, ids, weights):
        return self.moe(self.proj(x), ids, weights)


def _fsdp_adam_model(seed, world_size):
    """A dense Linear sharded by FSDP2's fully_shard (its parameters and Adam's state DTensors) in front of an
    expert-parallel layer left out of it, as docs/api.md's data-parallel recipe builds it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = _DenseThenMoE()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), ignored_params=set(model.moe.parameters()))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _fsdp_step(model, optimizer, rank):
    optimizer.zero_grad()
    x, ids, weights = _tokens(rank)
    y = model(x, ids, weights)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(80 + rank))).sum().backward()
    optimizer.step()


def _dcp_optimizer_fsdp_rank(rank, world_size, path):
    model, optimizer = _fsdp_adam_model(0, world_size)
    for _ in range(2):
        _fsdp_step(model, optimizer, rank)
    dcp.save({"model": ep.distributed_state_dict(model), "optim": ep.distributed_optimizer_state_dict(model, optimizer)},
             checkpoint_id=path)
    _fsdp_step(model, optimizer, rank)  # the uninterrupted run's third step

    resumed, resumed_optimizer = _fsdp_adam_model(1, world_size)  # another initialisation, a fresh optimizer
    state = {"model": ep.distributed_state_dict(resumed),
             "optim": ep.distributed_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())
    ep.load_distributed_state_dict(resumed, state["model"])
    ep.load_distributed_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
    kinds = {name: type(resumed_optimizer.state[p]["exp_avg"]).__name__ for name, p in resumed.named_parameters()}
    _fsdp_step(resumed, resumed_optimizer, rank)
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    want = dict(model.named_parameters())
    return kinds, {name: rel_err(full(p.detach()), full(want[name].detach())) for name, p in resumed.named_parameters()}


def test_dcp_optimizer_state_of_an_fsdp_model_resumes_training(tmp_path):
    """load_distributed_optimizer_state_dict turned every DTensor of the loaded state into a plain tensor, the
    state of FSDP2's sharded parameters too: the first optimizer.step() after resuming raised ("got mixed
    torch.Tensor and DTensor"). Only the experts' state is made plain; the step after resuming equals the
    uninterrupted run's (the same ops on the same values)."""
    for kinds, errors in run_ranks(_dcp_optimizer_fsdp_rank, 2, str(tmp_path), timeout=60):
        assert kinds == {"proj.weight": "DTensor", "proj.bias": "DTensor", "moe.w13": "Tensor", "moe.w2": "Tensor"}, kinds
        assert max(errors.values()) <= tolerance(torch.float32), errors


def _checkpoint_wrapped_model(seed, wrap):
    """A block holding a sharded layer, wrapped by torch's checkpoint_wrapper as torchtitan's activation
    checkpointing wraps its blocks (its state_dict keys drop `_checkpoint_wrapped_module.`), or not."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    torch.manual_seed(seed)
    block = nn.Module()
    block.moe = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")
    model = nn.Module()
    model.block = checkpoint_wrapper(block) if wrap else block
    return model, block.moe


def _dcp_checkpoint_wrapper_rank(rank, world_size, path):
    model, layer = _checkpoint_wrapped_model(0, wrap=True)
    layer.load_experts(*_global_weights())
    state = ep.distributed_state_dict(model)
    kinds = {k: type(v).__name__ for k, v in state.items()}
    dcp.save(state, checkpoint_id=path)
    loaded = {}
    for wrap in (True, False):  # into a model wrapped the same way, and into one without the wrapper
        fresh, fresh_layer = _checkpoint_wrapped_model(1, wrap)
        state = ep.distributed_state_dict(fresh)
        dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())
        ep.load_distributed_state_dict(fresh, state)
        gathered = fresh_layer.gather_experts()
        loaded[wrap] = [torch.equal(got, want) for got, want in zip((gathered.w13, gathered.w2), _global_weights())]
    return kinds, loaded


def test_dcp_state_of_a_checkpoint_wrapped_layer(tmp_path):
    """ep.distributed_state_dict named a layer by its module path, "block._checkpoint_wrapped_module.moe.", while
    state_dict() (checkpoint_wrapper's hook) names its tensors "block.moe.": the DTensors went in beside the plain
    per-rank experts, which DCP saved once (rank 0's), and the load failed on the keys. The layer is named as
    state_dict() names its w13: one DTensor per expert tensor, and the experts come back in a model wrapped the
    same way or not wrapped."""
    for kinds, loaded in run_ranks(_dcp_checkpoint_wrapper_rank, 2, str(tmp_path), timeout=60):
        assert kinds == {"block.moe.w13": "DTensor", "block.moe.w2": "DTensor", "block.moe.expert_placement": "Tensor"}, kinds
        assert loaded == {True: [True, True], False: [True, True]}, loaded
