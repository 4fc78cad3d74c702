"""torch.distributed.checkpoint (DCP) for models holding EPMoE layers.

model.state_dict() holds each rank's expert slots as plain tensors under the same names on every rank,
and DCP takes same-named plain tensors for copies of one tensor (it keeps one). The functions here give
and take the same dict with each sharded layer's slots as DTensors over its EP group, so DCP saves every
rank's slots and reshards them on load, as torch.distributed.checkpoint.state_dict's
get_model_state_dict / set_model_state_dict do for FSDP:

    state = ep.distributed_state_dict(model)
    dcp.save(state, checkpoint_id=path)
    ...
    state = ep.distributed_state_dict(model)          # a model built as the saved one, at any EP size
    dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())   # fills `state` in place
    ep.load_distributed_state_dict(model, state)

The optimizer's state of the expert parameters (Adam's moments, SGD's momentum) is per rank in the same
way; distributed_optimizer_state_dict / load_distributed_optimizer_state_dict wrap torch's
get_optimizer_state_dict / set_optimizer_state_dict likewise.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .dispatchers.base import agree_before_collectives
from .layer import _EXPERT_TENSORS, PLACEMENT_KEY, EPMoE, _first_copies, _placement_tables
from .placement import ExpertPlacement
from .quant import is_quantized_dtype
from .validation import check_type


def distributed_state_dict(model: nn.Module) -> dict[str, Any]:
    """`model.state_dict()` for torch.distributed.checkpoint. Every rank calls it; the dict shares its
    tensors with the model (dcp.load writes into the layers). For each EPMoE whose experts are sharded
    (every dispatcher but "standard"), with L slots per rank and P = E + N slots over R ranks:

    - `<layer>.w13`, `w2` (and `b13`, `b2`, fp8's `w13_scale_inv`, `w2_scale_inv`): a DTensor over a
      1-D DeviceMesh of the layer's group, placement Shard(0), global shape [P, ...]: row r*L + j is rank
      r's local slot j (physical slot r*L + j in a contiguous placement; with an expert_to_rank that
      interleaves the ranks, the slots in rank order). Plain tensors when no process group is initialized.
    - `<layer>.expert_placement`: int64 [2, P], for every EPMoE layer (the per-rank state_dict has it only off
      the default placement): each physical slot's rank, then its logical expert; the same on every rank. A
      "standard" layer's (every slot on rank 0, slot e holding expert e) lets a sharded layer load its rows, and
      a sharded layer's lets a "standard" one put the rows of its slots in expert order.

    Everything else is what model.state_dict() holds: replicated parameters (a "standard" layer's
    experts included) as plain tensors, which DCP saves once."""
    check_type("model", model, nn.Module, "a torch.nn.Module holding EPMoE layers")
    state = model.state_dict()
    for prefix, layer in _expert_layers(model):
        mesh = _mesh(layer) if layer.dispatcher.shards_experts else None
        for name in _EXPERT_TENSORS:
            t = getattr(layer, name)
            if layer.dispatcher.shards_experts:
                _check_not_distributed(prefix + name, t)
            if t is not None and mesh is not None:
                state[prefix + name] = DTensor.from_local(t.detach(), mesh, [Shard(0)], run_check=False)
        state[prefix + PLACEMENT_KEY] = torch.tensor(_placement_tables(layer.placement), dtype=torch.int64,
                                                     device="cpu")
    return state


def load_distributed_state_dict(model: nn.Module, state_dict: dict[str, Any], strict: bool = True):
    """Load a dict made by distributed_state_dict (after dcp.load filled it in place) into `model`; every
    rank calls it. Each sharded EPMoE may have been saved at another EP size, with the same number of
    physical slots P: its rows then hold the experts the checkpoint's placement put there, and the layer
    runs in the placement they make: at the saved EP size the saved one (rebalanced or built with
    expert_to_rank, as it was), at another one the layer's own slot ranks, each slot holding the expert
    of its row. Everything else loads as model.load_state_dict(state, strict) loads it (which it returns).
    A layer's expert rows without its `expert_placement` are an error naming the key (strict=False: they load
    as the default placement, the key in the result's missing_keys).
    Another number of slots (num_redundant_experts) is an error naming the layer; so is a placement whose
    copies of an expert would share a rank at this EP size."""
    check_type("model", model, nn.Module, "a torch.nn.Module holding EPMoE layers")
    check_type("state_dict", state_dict, Mapping, "a dict (the one ep.distributed_state_dict made, filled by dcp.load)")
    state = dict(state_dict)
    for prefix, layer in _expert_layers(model):
        if not layer.dispatcher.shards_experts:
            _rows_in_expert_order(layer, prefix, state)
    missing = []  # layers' placement keys absent (strict=False: their rows load as the default placement)
    for prefix, layer in _sharded_layers(model):
        error = None
        try:
            for name in _EXPERT_TENSORS:
                if isinstance(state.get(prefix + name), DTensor):
                    state[prefix + name] = state[prefix + name].to_local()
            if prefix + PLACEMENT_KEY in state:  # the placement of the rows, as the per-rank load_state_dict takes it
                state[prefix + PLACEMENT_KEY] = _placement_of_rows(layer, prefix, state[prefix + PLACEMENT_KEY])
            elif any(prefix + name in state for name in _EXPERT_TENSORS):  # rows in an unknown placement
                missing.append(prefix + PLACEMENT_KEY)
                if strict:
                    raise ValueError(_no_placement(prefix))
        except Exception as err:  # noqa: BLE001 - whatever stops this rank stops every rank (raised below)
            error = err
        if layer.placement.ep_size > 1:  # one all_gather per layer: a rank's error fails every rank, naming it,
            # instead of leaving the others in the load's own all_gather until the timeout
            agree_before_collectives(layer.dispatcher.group, layer.placement.ep_size, error,
                                     "load_distributed_state_dict: every rank stops before loading", layer.w13.device)
        elif error is not None:
            raise error
    result = model.load_state_dict(state, strict=strict)
    result.missing_keys.extend(missing)
    return result


def _rows_in_expert_order(layer: EPMoE, prefix: str, state: dict) -> None:
    """A replicated ("standard") layer's rows in `state`, as dcp.load filled them, put in expert order: a sharded
    layer saved them in its slots' order, rank by rank (a round-robin or rebalanced placement's rows are not its
    experts in order). Without its expert_placement, the rows are taken as they are (as model.state_dict() holds
    them)."""
    layer._loaded_row_order = None
    table = state.pop(prefix + PLACEMENT_KEY, None)
    if table is None:
        return
    experts = _placement_of_rows(layer, prefix, table)[1].tolist()  # the expert of each row (no copies: P = E)
    row_of = [experts.index(e) for e in range(len(experts))]
    # the optimizer's rows of these experts were saved in the same order: load_distributed_optimizer_state_dict
    # puts them in expert order too (left in the slots' order, each expert stepped with another's moments)
    layer._loaded_row_order = None if row_of == list(range(len(row_of))) else row_of
    if layer._loaded_row_order is None:
        return
    for name in _EXPERT_TENSORS:
        rows = state.get(prefix + name)
        if isinstance(rows, torch.Tensor):
            state[prefix + name] = _in_expert_order(rows, row_of)


def _in_expert_order(rows: torch.Tensor, row_of: list) -> torch.Tensor:
    """rows[row_of]: a replicated layer's [E, ...] rows in expert order (a DTensor, as FSDP2's fully_shard shards
    the replicated experts: whole, then its piece)."""
    if isinstance(rows, DTensor):
        return distribute_tensor(_first_copies(rows.full_tensor(), row_of), rows.device_mesh, rows.placements,
                                 src_data_rank=None)
    return _first_copies(rows, row_of)


def _no_placement(prefix: str) -> str:
    key = prefix + PLACEMENT_KEY
    return (f"state_dict holds {prefix.rstrip('.') or 'the model'}'s expert rows but no {key!r} (the placement they "
            f"were saved in, which ep.distributed_state_dict always adds): without it they would load into the wrong "
            f"slots. Allowed: the dict ep.distributed_state_dict made, filled by dcp.load; strict=False loads the rows "
            f"as the default placement and reports the key missing")


def distributed_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """torch's `get_optimizer_state_dict(model, optimizer)` for torch.distributed.checkpoint, with the
    state of each sharded EPMoE layer's expert parameters that has a row per slot (Adam's exp_avg and
    exp_avg_sq, SGD's momentum_buffer, a factored optimizer's rows: first dimension L) as DTensors over the
    layer's EP group, Shard(0) over the physical slots as distributed_state_dict gives the parameters (plain tensors there, DCP
    would save rank 0's state for every rank). Scalars (Adam's step) and every other parameter's state
    stay as torch gives them. Every rank calls it; an optimizer without state yet gets it initialised
    (torch does that, with a step of learning rate 0), so a fresh optimizer gives the dict to load into:

        dcp.save({"model": ep.distributed_state_dict(model),
                  "optim": ep.distributed_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)
        ...
        state = {"model": ep.distributed_state_dict(model), "optim": ep.distributed_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=path, planner=ep.ExpertLoadPlanner())
        ep.load_distributed_state_dict(model, state["model"])   # first: the layers take the rows' placement
        ep.load_distributed_optimizer_state_dict(model, optimizer, state["optim"])

    At another EP size each rank's state rows follow its parameter rows (the same slots)."""
    check_type("model", model, nn.Module, "a torch.nn.Module holding EPMoE layers")
    check_type("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer of the model's parameters")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer)
    key_of = _state_keys(optimizer, state)
    for prefix, layer in _sharded_layers(model):
        mesh = _mesh(layer)
        for name in _EXPERT_TENSORS:
            param = getattr(layer, name)
            _check_not_distributed(prefix + name, param)
            key = key_of.get(id(param))
            if mesh is None or param is None or not state["state"].get(key):
                continue
            # Per-slot state (Adam's moments, a factored optimizer's rows: first dimension L) is sharded as the
            # slots; scalars (step) stay. (A new dict: torch's may be the optimizer's own, kept plain.)
            state["state"][key] = {
                k: DTensor.from_local(v, mesh, [Shard(0)], run_check=False)
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == param.shape[0] else v
                for k, v in state["state"][key].items()}
    return state


def load_distributed_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                          state_dict: dict[str, Any]) -> None:
    """Load a dict made by distributed_optimizer_state_dict (after dcp.load filled it) into `optimizer`
    with torch's `set_optimizer_state_dict`; every rank calls it, after load_distributed_state_dict: the state
    rows of each layer's experts then follow its weights' rows (a replicated layer's, put in expert order from a
    sharded layer's slot order, take the same order)."""
    check_type("model", model, nn.Module, "a torch.nn.Module holding EPMoE layers")
    check_type("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer of the model's parameters")
    check_type("state_dict", state_dict, Mapping, "a dict (the one ep.distributed_optimizer_state_dict made, filled by dcp.load)")
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    # Only the experts' state goes back to plain tensors: other DTensors (the state of parameters FSDP2's
    # fully_shard made DTensors) are what torch takes for those parameters, and as plain tensors the next
    # optimizer.step() mixed them with the DTensor parameters and raised.
    key_of = _state_keys(optimizer, state_dict)
    experts = {key_of.get(id(getattr(layer, name))) for _, layer in _sharded_layers(model)
               for name in _EXPERT_TENSORS if getattr(layer, name) is not None}
    state = {**state_dict, "state": {fqn: {key: value.to_local() if isinstance(value, DTensor) else value
                                           for key, value in per_param.items()} if fqn in experts else per_param
                                     for fqn, per_param in state_dict["state"].items()}}
    for _, layer in _expert_layers(model):  # a replicated layer whose weights load_distributed_state_dict reordered
        row_of = getattr(layer, "_loaded_row_order", None)
        for param in (getattr(layer, name) for name in _EXPERT_TENSORS) if row_of is not None else ():
            per_param = state["state"].get(key_of.get(id(param)))
            if param is not None and per_param:
                state["state"][key_of[id(param)]] = {
                    k: _in_expert_order(v, row_of) if isinstance(v, torch.Tensor) and v.dim() > 0
                    and v.shape[0] == len(row_of) else v for k, v in per_param.items()}
    set_optimizer_state_dict(model, optimizer, state)
    for _, layer in _expert_layers(model):
        layer._loaded_row_order = None  # (used once: a later load without the model's would reorder again)


def _state_keys(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[int, str]:
    """Each parameter's key in torch's optimizer state_dict, by identity: its param_groups list the keys in
    the optimizer's order (torch drops wrappers' prefixes, DDP's "module.", torch.compile's "_orig_mod.")."""
    return {id(p): key for group, saved in zip(optimizer.param_groups, state_dict["param_groups"])
            for p, key in zip(group["params"], saved["params"])}


class ExpertLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner that first checks every EPMoE layer in the state_dict against the
    checkpoint: `dcp.load(state, checkpoint_id=..., planner=ep.ExpertLoadPlanner())`. A layer with
    another number of physical slots than the saved one (num_experts + num_redundant_experts) is named
    with both counts and the way to convert it (without this planner dcp.load stops at its own size
    check, "Size mismatch between saved torch.Size([2, 10]) and current: torch.Size([2, 8]) for
    <layer>.expert_placement" or the same for an expert tensor). Experts saved fp8 loading into a layer
    built unquantized (or the reverse) are named too: dcp.load casts the saved values to the layer's dtype
    and leaves the scales behind, so fp8 values loaded unscaled into a bf16 layer (no error). Takes
    DefaultLoadPlanner's arguments.
    A layer's expert_placement the checkpoint does not hold (a "standard" layer's, saved before
    distributed_state_dict gave those one) is read as what such a layer saves: its experts in order, one row
    each."""

    def create_local_plan(self):
        unsaved = {}
        for key, table in self.state_dict.items():
            saved = self.metadata.state_dict_metadata.get(key)
            prefix, _, name = key.rpartition(".")
            if name == PLACEMENT_KEY and saved is None:
                P = table.shape[-1]
                table.copy_(torch.stack([torch.zeros(P, dtype=table.dtype), torch.arange(P, dtype=table.dtype)]))
                unsaved[key] = table
            if name == PLACEMENT_KEY and saved is not None and hasattr(saved, "size"):
                _check_slot_count(key, int(saved.size[-1]), int(table.shape[-1]))
            layer_key = (prefix + "." if prefix else "") + PLACEMENT_KEY
            if name in ("w13", "w2") and layer_key in self.state_dict and hasattr(saved, "properties"):
                _check_expert_format(key, saved.properties.dtype, table.dtype)
        for key in unsaved:  # (nothing to read for them: DCP's own plan would stop at "Missing key in checkpoint")
            del self.state_dict[key]
        try:
            return super().create_local_plan()
        finally:
            self.state_dict.update(unsaved)


def _mesh(layer: EPMoE):
    """A 1-D DeviceMesh over the layer's EP group; None without a process group (one process)."""
    group = layer.dispatcher.group
    return DeviceMesh.from_group(group, layer.w13.device.type) if group is not None and dist.is_initialized() else None


def _check_not_distributed(key: str, t: Any) -> None:
    """The layer's own [L, ...] slots, not a DTensor: experts that FSDP2's fully_shard sharded further (over
    a dp mesh, as torchtitan shards experts) have no row layout here to put them in."""
    if isinstance(t, DTensor):
        raise ValueError(f"{key} is a DTensor over {t.device_mesh} ({', '.join(map(str, t.placements))}): the "
                         f"experts were sharded by FSDP2 (fully_shard over the layer or its parent). Allowed: the "
                         f"layer's own [L, ...] slots; leave the experts out of fully_shard (ignored_params) and "
                         f"reduce their gradients over the data-parallel replicas as docs/api.md's dp x ep recipe does")


def _expert_layers(model: nn.Module):
    """(state_dict prefix, layer) of every EPMoE in `model`. The prefix is the one model.state_dict() gives the
    layer's w13 (found by identity), not always its module path: a wrapper may rename keys (checkpoint_wrapper, as
    torchtitan's activation checkpointing wraps blocks, drops its `_checkpoint_wrapped_module.`), and the module
    path put the DTensors beside the plain per-rank experts, which DCP then saved once, rank 0's for every rank."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, EPMoE)]
    keys = {id(v): k for k, v in model.state_dict(keep_vars=True).items()} if layers else {}
    for name, module in layers:
        key = keys.get(id(module.w13))
        yield (key[:-len("w13")] if key is not None else (name + "." if name else "")), module


def _sharded_layers(model: nn.Module):
    """_expert_layers' layers whose ranks hold different experts."""
    return ((prefix, layer) for prefix, layer in _expert_layers(model) if layer.dispatcher.shards_experts)


def _check_slot_count(key: str, saved: int, have: int) -> None:
    if saved != have:
        layer = key[:-len(PLACEMENT_KEY)].rstrip(".") or "the model"
        raise ValueError(f"{layer}: the checkpoint holds {saved} physical expert slots ({key} [2, {saved}]), this "
                         f"layer {have} (num_experts + num_redundant_experts); a distributed checkpoint loads at any "
                         f"EP size but into the same number of slots. To change num_redundant_experts, build the "
                         f"model as it was saved, load it, gather_experts() and load_experts() the [E, ...] "
                         f"weights into the new layer")


def _check_expert_format(key: str, saved: torch.dtype, have: torch.dtype) -> None:
    """Experts saved fp8 into a float layer (or the reverse) are an error: dcp.load would cast the values and
    leave the scales behind (or find none)."""
    fp8 = is_quantized_dtype(saved)
    if fp8 == is_quantized_dtype(have):
        return
    way = ("build the layer with quant_config=ep.QuantConfig() as saved" if fp8 else
           "build the layer without quant_config as saved, load it, then load_experts() its gather_experts() "
           "weights with quantize='fp8_block'")
    raise ValueError(f"{key.rpartition('.')[0] or 'the model'}: the checkpoint holds {key} as {saved}, this layer "
                     f"stores it as {have} (dcp.load would cast the values "
                     f"{'and leave their block scales behind' if fp8 else 'and find no block scales'}). Allowed: {way}")


def _placement_of_rows(layer: EPMoE, prefix: str, table: Any) -> torch.Tensor:
    """The placement table ([2, P]: each physical slot's rank, then its logical expert) of the slots this
    layer's ranks hold after dcp.load gave them the rows of a checkpoint saved in placement `table`."""
    current = layer.placement
    P, R = current.num_physical_experts, current.ep_size
    key = prefix + PLACEMENT_KEY
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != 2:
        shape = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"state_dict[{key!r}] has shape {shape}; expected [2, {P}] (each physical slot's rank and "
                         f"logical expert)")
    _check_slot_count(key, table.shape[1], P)
    owners, logical = (tuple(int(v) for v in row) for row in table.tolist())
    saved_size = max(owners) + 1  # every rank holds P / R >= 1 slots
    row_experts = [logical[q] for q in _slots_in_rank_order(owners, saved_size)]  # the expert of each row
    slot_ranks = owners if saved_size == R else current._owners()
    experts = [0] * P
    for row, q in enumerate(_slots_in_rank_order(slot_ranks, R)):
        experts[q] = row_experts[row]
    try:
        ExpertPlacement(current.num_experts, R, current.rank, slot_ranks, experts)
    except ValueError as err:  # copies of one expert in rows that now share a rank
        raise ValueError(f"{prefix.rstrip('.') or 'the model'}: the checkpoint's {P} slots, saved at ep_size="
                         f"{saved_size}, in rows of {P // R} per rank at ep_size={R}: {err}. Load it at ep_size="
                         f"{saved_size}, then gather_experts() and load_experts() the [E, ...] weights into the layer "
                         f"at this EP size") from None
    return torch.tensor([slot_ranks, experts], dtype=torch.int64)


def _slots_in_rank_order(owners: tuple, ep_size: int) -> list[int]:
    """The physical slots of rank 0 (ascending), then rank 1's, ...: the DTensor's rows."""
    return [q for r in range(ep_size) for q, owner in enumerate(owners) if owner == r]
