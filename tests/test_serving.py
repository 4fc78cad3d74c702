"""A serving (or long-running) caller's view of the layer over many calls, on gloo ranks against float64: token
counts that change every call and differ between ranks (0, 1, odd sizes) under inference_mode, no_grad and
training, with kept state that does not grow with the calls; deferred checks still pending when a dispatcher is
dropped; a layer built under torch.inference_mode, then loaded and trained outside it; layers on two subgroup
partitions interleaved; an earlier dispatch's output combined with a later call's rows."""
import gc
import re
import warnings

import pytest
import torch

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import CombineInput, MoeRunner
from ep_runtime.testing import run_ranks, tolerance

E, K, H, I = 8, 2, 16, 8
M = 12  # the static capacities below: the most tokens a rank dispatches here
CASES = {
    "standard": ("standard", {}),
    "deepep_normal": ("deepep_normal", {}),
    "deepep_normal static": ("deepep_normal", {"num_worst_tokens": 4 * M}),  # (4 ranks' M tokens each)
    "deepep_ll": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": M}),
    "mori": ("mori", {"max_dispatch_tokens_per_rank": M}),
    "mori static": ("mori", {"max_dispatch_tokens_per_rank": M, "static": True}),
}


def _inputs(gen: torch.Generator, T: int):
    """x [T, H] (float32 values exact in float64), global ids [T, K] with -1 holes and a whole -1 token, weights."""
    x = torch.randn(T, H, generator=gen, dtype=torch.float64).float()
    ids = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    if T > 2:
        ids[1, 0] = -1
    if T > 3:
        ids[3] = -1
    return x, ids, torch.rand(T, K, generator=gen) + 0.1


def _schedule(world_size: int, calls: int) -> list:
    """Every rank's T per call, the same list on every rank: random 0..M, with calls where one rank has 0 tokens,
    where every rank has 0 (under inference_mode and in training), where ranks have 1, and M."""
    gen = torch.Generator().manual_seed(1234)
    sizes = [torch.randint(0, M + 1, (world_size,), generator=gen).tolist() for _ in range(calls)]
    sizes[0] = [0] * world_size
    sizes[1] = [1] * world_size
    sizes[2] = [0] + [M] * (world_size - 1)
    sizes[3] = [1] + [0] * (world_size - 1)
    sizes[4] = [M - 1 - r for r in range(world_size)]
    sizes[5] = [0] * world_size  # (a training call: calls 2, 5, 8, ... train)
    return sizes


def _kept_state(layer) -> dict:
    """Entries of what the layer's calls keep for later calls (scratch buffers, per-shape tables, pending
    deferred checks): none may grow once the calls' shapes have all been seen."""
    from ep_runtime import runner_core
    from ep_runtime.scratch import SCRATCH
    d = layer.dispatcher
    exchange = getattr(d, "exchange", None)
    checks = [getattr(d, "_deferred", None), d.__dict__.get("_routing_checks"), getattr(exchange, "_deferred", None)]
    state = {"scratch": len(SCRATCH._entries), "scratch bytes": SCRATCH._bytes,
             "capacity rows": len(runner_core._CAPACITY_ROWS),
             "pending checks": sum(len(c) for c in checks if c is not None)}
    if exchange is not None:
        state.update({name: len(getattr(exchange, name)) for name in ("_tables", "_aranges", "_send_ranks")})
    return state


def _python_objects() -> int:
    """Python objects the collector tracks (containers, tensors, dataclass instances: what a cache would hold), once
    the garbage is collected. (tracemalloc's bytes grow by a few small objects per call inside torch's own ops.)"""
    gc.collect()
    return len(gc.get_objects())


def _varying_rank(rank, world_size, case):
    name, options = CASES[case]
    torch.manual_seed(3)
    layer = ep.EPMoE(E, K, H, I, dispatcher=name, runner="torch", dispatcher_options=options)
    experts = layer.gather_experts()
    half = 16
    sizes = _schedule(world_size, half)
    sizes += sizes  # the second half repeats the first's shapes (new values): nothing kept may grow there
    gen = torch.Generator().manual_seed(100 + rank)
    errors, states, python = [], [], []
    for call, Ts in enumerate(sizes):
        x, ids, w = _inputs(gen, Ts[rank])
        want = moe_reference(x.double(), ids.long(), w.double(), experts.w13, experts.w2, layer.config)
        mode = ("inference_mode", "no_grad", "train")[call % 3]
        if mode == "train":
            xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            y = layer(xg, ids, wg)
            grad = torch.randn(y.shape, generator=gen, dtype=torch.float64).float()
            y.backward(grad)
            x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
            ref = moe_reference(x64, ids.long(), w64, experts.w13, experts.w2, layer.config)
            (ref + 0 * (x64.sum() + w64.sum())).backward(grad.double())  # (a token-less call has no graph)
            if Ts[rank]:
                errors += [(call, "dx", rel_err(xg.grad, x64.grad)), (call, "dw", rel_err(wg.grad, w64.grad))]
        else:
            with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
                y = layer(x, ids, w)
        assert y.shape == (Ts[rank], H) and y.dtype == torch.float32, (call, y.shape, y.dtype)
        if Ts[rank]:
            errors.append((call, mode, rel_err(y, want)))
        if call + 1 in (half, 2 * half):
            states.append(_kept_state(layer))
            python.append(_python_objects())
    layer.dispatcher.raise_deferred()
    return errors, states, python


# world size 4 for one dispatcher of each plan kind (host plan, static by expert, static by token)
@pytest.mark.parametrize("case,world_size", [(case, 2) for case in CASES] +
                         [(case, 4) for case in ("deepep_normal", "deepep_ll", "mori static")])
def test_token_counts_varying_every_call_and_between_ranks(case, world_size):
    """32 calls whose T changes every call and differs between ranks (0 on some ranks, on every rank, 1, odd,
    the static capacity), under inference_mode, no_grad and training in turn: every call's output (and dx, dweights)
    equals the float64 reference, and a second run of the same shapes keeps nothing more (scratch entries, tables,
    pending checks, Python objects)."""
    for errors, states, python in run_ranks(_varying_rank, world_size, case, timeout=300):
        assert len(errors) > 32, errors
        worst = max(errors, key=lambda e: e[2])
        assert worst[2] <= tolerance(torch.float32), worst
        assert states[1] == states[0], states
        assert states[1]["pending checks"] == 0
        assert python[1] - python[0] <= 8, python


# ---------------------------------------------------------------- deferred checks pending at a drop

def _pending(checks, values: torch.Tensor, context) -> None:
    """Queue a deferred check as a CUDA call does (make_room, then defer): host values take the same bookkeeping."""
    checks.make_room()
    checks.defer(values, context)


def _dropped(make, queue, cycle: bool = False) -> list:
    """Warnings raised while the object `make()` returns is dropped with the checks `queue(obj)` left pending (cycle:
    in a reference cycle, collected by the cyclic collector)."""
    obj = make()
    queue(obj)
    if cycle:
        obj.cycle = obj
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del obj
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_layer_dropped_with_a_failing_deferred_check_warns_naming_the_value():
    """A standard layer's value checks are deferred on CUDA: one dropped (a model swapped out, a server's shutdown)
    before raise_deferred() after its last calls lost a bad id of those calls without a word. The checks whose
    values have landed now run at the drop, and a failing one is a RuntimeWarning with the error it would have
    raised (a finalizer cannot raise); good pending checks say nothing."""
    from ep_runtime.validation import topk_value_flags

    def layer():
        return ep.EPMoE(E, K, H, I, dispatcher="standard", runner="torch")

    def queue(ids):  # the flags row a CUDA dispatch lands (its last two entries are topk_value_flags')
        weights = torch.rand(ids.shape)
        return lambda obj: _pending(obj.dispatcher._deferred, topk_value_flags(ids, weights, E), (ids, weights))

    bad = torch.tensor([[0, 1], [2, 9], [3, -1]], dtype=torch.int32)
    messages = _dropped(layer, queue(bad))
    assert messages == ["a standard dispatcher was dropped with a deferred check pending, which fails: topk_ids has "
                        "id 9 at [1, 1]; allowed -1..7 (num_experts=8) [found by the deferred check of the value flags "
                        "of a standard dispatch: the last call, whose output is not valid; EP_RUNTIME_SYNC_CHECKS=1 "
                        "raises at the call itself] (call its raise_deferred() after the last call to get this error "
                        "raised)"], messages
    assert _dropped(layer, queue(bad.clamp(max=E - 1))) == []


def _routing_drop_rank(rank, world_size):
    """deepep_normal: topk_ids given with a reused handle are compared on the device on CUDA, the flag checked two
    reusing calls later: a dispatcher dropped before then lost the mismatch. Its compare needs no method of the
    dispatcher, so it runs in a collected cycle too."""
    config = ep.MoeConfig(E, K, H, I)
    made = torch.tensor([[0, 5], [7, -1]], dtype=torch.int32)
    other = torch.tensor([[0, 5], [6, -1]], dtype=torch.int32)
    results = {}
    for label, ids in (("other ids", other), ("same ids", made.clone())):
        def queue(d, ids=ids):
            _pending(d._routing_checks, (ids != made).any().reshape(1).int(), (ids, made))
        results[label] = _dropped(lambda: ep.dispatchers.create("deepep_normal", config), queue)
        results[label + ", in a cycle"] = _dropped(lambda: ep.dispatchers.create("deepep_normal", config), queue,
                                                   cycle=True)
    return results


def test_a_deepep_normal_dispatcher_dropped_with_a_failing_routing_check_warns():
    for results in run_ranks(_routing_drop_rank, 2, timeout=120):
        assert results["same ids"] == results["same ids, in a cycle"] == [], results
        [message] = results["other ids"]
        assert results["other ids, in a cycle"] == [message], results
        assert message.startswith("a deepep_normal dispatcher was dropped with a deferred check pending, which fails: "
                                  "topk_ids[1, 0] = 6, but the handle was made for routing with 7 there"), message


def test_checks_pending_in_a_collected_cycle_neither_raise_nor_warn():
    """An owner collected by the cyclic collector has lost its check methods (weak references are cleared first):
    its pending checks are skipped, not reported wrongly, and nothing raises from the finalizer."""
    from ep_runtime.validation import topk_value_flags
    d = ep.dispatchers.create("standard", ep.MoeConfig(E, K, H, I))
    ids, weights = torch.tensor([[9, 0]], dtype=torch.int32), torch.rand(1, 2)
    _pending(d._deferred, topk_value_flags(ids, weights, E), (ids, weights))
    d.cycle = d
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del d
        gc.collect()
    assert [str(w.message) for w in caught] == []


# ---------------------------------------------------------------- lifecycle

def _inference_built_rank(rank, world_size, case):
    """A layer built (and first called) under torch.inference_mode, as a server sets its model up, then loaded and
    trained outside it: its experts were inference tensors, so load_experts raised ("Inplace update to inference
    tensor outside InferenceMode") and a training forward "Inference tensors cannot be saved for backward"."""
    name, options = CASES[case]
    gen = torch.Generator().manual_seed(5)
    w13 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=gen, dtype=torch.float64) * I ** -0.5
    with torch.inference_mode():
        layer = ep.EPMoE(E, K, H, I, dispatcher=name, runner="torch", dispatcher_options=options)
        layer(*_inputs(torch.Generator().manual_seed(rank), 5))
    layer.load_experts(w13.float(), w2.float())
    layer = layer.to(torch.float64)  # (a move outside inference mode too)
    with torch.inference_mode():
        layer.to(torch.float32)  # (and one inside it: the experts stay normal tensors)
    # every rank's tokens and output gradient: a sharded layer's expert gradients sum every rank's tokens
    ranks = range(world_size) if layer.dispatcher.shards_experts else [rank]
    calls = {r: (*_inputs(torch.Generator().manual_seed(10 + r), 7),
                 torch.randn(7, H, generator=torch.Generator().manual_seed(20 + r))) for r in ranks}
    x, ids, w, grad = calls[rank]
    xg = x.clone().requires_grad_(True)
    y = layer(xg, ids, w)
    y.backward(grad)
    # the reference with the experts as float32 holds them: the layer ran in float32 after the last .to()
    w13_32, w2_32 = w13.float().double().requires_grad_(True), w2.float().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    loss = 0
    for r, (xr, idr, wr, gr) in calls.items():
        out = moe_reference(x64 if r == rank else xr.double(), idr.long(), wr.double(), w13_32, w2_32, layer.config)
        if r == rank:
            want = out.detach()
        loss = loss + (out * gr.double()).sum()
    loss.backward()
    mine = layer.placement.local_expert_ids()
    return {"inference": [p.is_inference() for p in layer.parameters()], "y": rel_err(y, want),
            "dx": rel_err(xg.grad, x64.grad), "dw13": rel_err(layer.w13.grad, w13_32.grad[mine]),
            "dw2": rel_err(layer.w2.grad, w2_32.grad[mine])}


@pytest.mark.parametrize("case", ["standard", "deepep_normal", "deepep_ll", "mori"])
def test_a_layer_built_under_inference_mode_loads_and_trains_outside_it(case):
    for result in run_ranks(_inference_built_rank, 2, case, timeout=120):
        assert result.pop("inference") == [False, False], result
        assert max(result.values()) <= tolerance(torch.float32), result


def _subgroups_rank(rank, world_size):
    """Two layers on two partitions of 4 ranks into pairs ({0,1},{2,3} and {0,2},{1,3}), called in alternating
    order with T changing every call (0 included), some calls training through both layers at once."""
    import torch.distributed as dist
    rows = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cols = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    torch.manual_seed(1)
    a = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch", group=rows[rank // 2])
    b = ep.EPMoE(E, K, H, I, dispatcher="mori", runner="torch", group=cols[rank % 2],
                 dispatcher_options={"max_dispatch_tokens_per_rank": M})
    experts = {id(a): a.gather_experts(), id(b): b.gather_experts()}
    errors = []
    for call, Ts in enumerate(_schedule(world_size, 12)):
        gen = torch.Generator().manual_seed(call * 10 + rank)
        x, ids, w = _inputs(gen, Ts[rank])
        train = call % 3 == 0
        xg, x64 = x.clone().requires_grad_(train), x.double().requires_grad_(train)
        ys, refs = [], []
        for layer in ([a, b] if call % 2 else [b, a]):  # both forwards, then one backward through both
            ex = experts[id(layer)]
            ys.append(layer(xg, ids, w))
            refs.append(moe_reference(x64, ids.long(), w.double(), ex.w13, ex.w2, layer.config))
            if Ts[rank]:
                errors.append(rel_err(ys[-1], refs[-1].detach()))
        if train:
            (ys[0] + 2 * ys[1]).sum().backward()
            (refs[0] + 2 * refs[1] + 0 * x64.sum()).sum().backward()  # (a token-less call has no graph)
            if Ts[rank]:
                errors.append(rel_err(xg.grad, x64.grad))
    for group in rows + cols:
        dist.destroy_process_group(group)
    return errors


def test_layers_on_two_subgroup_partitions_interleaved():
    for errors in run_ranks(_subgroups_rank, 4, timeout=300):
        assert len(errors) >= 12 and max(errors) <= tolerance(torch.float32), errors


def _destroyed_subgroup_rank(rank, world_size):
    """Layers on a subgroup of the world, the subgroup destroyed between a training forward and its backward: the
    backward's reverse exchanges went on over the destroyed gloo group (a destroyed NCCL one fails or hangs), as
    a forward did before check_group; now they raise naming it, as the layers' next calls and a dispatch reusing
    an earlier handle do. The world group stays usable: a layer on it then gives the float64 output."""
    import torch.distributed as dist
    sub = dist.new_group([0, 1])
    x, ids, w = _inputs(torch.Generator().manual_seed(rank), 6)
    messages = {}
    pending = []
    for case in ("deepep_normal", "deepep_ll", "mori static"):
        name, options = CASES[case]
        layer = ep.EPMoE(E, K, H, I, dispatcher=name, runner="torch", group=sub, dispatcher_options=options)
        pending.append((case, layer, layer(x.clone().requires_grad_(True), ids, w)))
    handle = ep.dispatchers.create("deepep_normal", ep.MoeConfig(E, K, H, I), group=sub).dispatch(x, (ids, w)).handle
    dist.destroy_process_group(sub)
    calls = [(f"{case} backward", lambda y=y: y.sum().backward()) for case, _, y in pending]
    calls += [(f"{case} forward", lambda layer=layer: layer(x, ids, w)) for case, layer, _ in pending]
    calls.append(("reused handle", lambda: pending[0][1].dispatcher.dispatch(x, None, handle=handle)))
    for label, call in calls:
        try:
            call()
            messages[label] = "ran"
        except RuntimeError as err:
            messages[label] = str(err)
    torch.manual_seed(2)
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_normal", runner="torch")  # the world group
    experts = layer.gather_experts()
    error = rel_err(layer(x, ids, w), moe_reference(x.double(), ids.long(), w.double(), experts.w13, experts.w2,
                                                    layer.config))
    return messages, error


def test_a_destroyed_subgroup_fails_its_layers_calls_and_backward_naming_it():
    destroyed = (r"its process group was destroyed \(ep\.destroy_distributed\(\) or dist\.destroy_process_group\(\)\) "
                 r"after the layer was built; allowed: a layer on a live group: call ep\.init_distributed\(\) and build "
                 r"the layer again")
    for messages, error in run_ranks(_destroyed_subgroup_rank, 2, timeout=120):
        assert error <= tolerance(torch.float32), error
        assert len(messages) == 7, messages
        for label, message in messages.items():
            operation = (re.escape("an ep-runtime layer's backward (the reverse exchange of its forward)")
                         if label.endswith("backward") else r"\w+ dispatch")
            assert re.fullmatch(f"{operation}: {destroyed}", message), (label, message)


# ---------------------------------------------------------------- an earlier dispatch's output

def _stale_output_rank(rank, world_size):
    """deepep_normal (host plan) dispatched twice with different T: a later call's runner rows combined with the
    earlier call's dispatch_output (a caller keeping the wrong one) read the earlier handle's first rows as its
    partials, with no error, when the later call had received more rows."""
    d = ep.dispatchers.create("deepep_normal", ep.MoeConfig(E, K, H, I))
    runner = MoeRunner(ep.runners.create("torch", d.config), d.config, d.placement)
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64)
    w2 = torch.randn(E, H, I, generator=gen, dtype=torch.float64)
    mine = d.placement.local_expert_ids()
    weights = ep.ExpertWeights(w13[mine].float(), w2[mine].float())
    gen = torch.Generator().manual_seed(rank)
    earlier, later = [], []
    for T, calls in ((3, earlier), (11, later)):
        x, ids, w = _inputs(gen, T)
        ids[:, 0] = torch.arange(T) % E  # every rank receives rows from every peer
        out = d.dispatch(x, ep.TopKOutput(ids, w))
        calls += [x, ids, w, out, runner.run(out, weights)]
    received = (sum(earlier[3].handle.recv_splits), sum(later[3].handle.recv_splits))
    messages = []
    for rows, out in ((later[4].hidden_states, earlier[3]), (earlier[4].hidden_states, later[3])):
        try:
            d.combine(CombineInput(rows, out))
            messages.append("combined")
        except ValueError as err:
            messages.append(str(err))
    errors = [rel_err(d.combine(combine), moe_reference(x.double(), ids.long(), w.double(), w13, w2, d.config))
              for x, ids, w, _, combine in (earlier, later)]  # the ranks are still in step
    return received, messages, errors


def test_combine_of_an_earlier_dispatchs_output_with_later_rows_is_refused():
    for (early, late), messages, errors in run_ranks(_stale_output_rank, 2, timeout=120):
        assert early < late, (early, late)
        assert messages == [
            f"combine_input.hidden_states has shape [{late}, {H}]; expected [{early}, {H}] (the rows this rank "
            f"received in the dispatch that made combine_input.dispatch_output)",
            f"combine_input.hidden_states has shape [{early}, {H}]; expected [{late}, {H}] (the rows this rank "
            f"received in the dispatch that made combine_input.dispatch_output)"], messages
        assert max(errors) <= tolerance(torch.float32), errors
