"""Asynchronous dispatch/combine on gloo ranks: the exchange really runs while the caller goes on,
waits may come in any order (the exchanges stay in call order on every rank), outputs equal the
synchronous run bit for bit and the float64 reference, buffers can be reused once waited, receive
hooks complete the receive, bad arguments fail before any collective, and EPMoE's shared experts
run during the dispatch with an unchanged result."""
import importlib.util
import re
import time

import pytest
import torch

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import MoeRunner
from ep_runtime.testing import make_problem, run_ranks, tolerance

EXCHANGES = ["deepep_normal", "deepep_ll", "mori"]
OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 24}, "mori": {"max_dispatch_tokens_per_rank": 24}}
CONFIG = ep.MoeConfig(8, 2, 32, 16)


def _setup(rank, world_size, name, tokens=(17, 11, 20, 9)):
    d = ep.dispatchers.create(name, CONFIG, **OPTIONS.get(name, {}))
    runner = MoeRunner(ep.runners.create("torch", CONFIG), CONFIG, d.placement)
    problem = make_problem(CONFIG, [tokens[i % len(tokens)] for i in range(2 * world_size)], seed=5,
                           ep_size=world_size)
    w13, w2 = problem.w13.float(), problem.w2.float()
    mine = d.placement.local_expert_ids()
    weights = ep.ExpertWeights(w13[mine], w2[mine])
    batches = [(problem.xs[2 * rank + b].float(), ep.TopKOutput(problem.topk_ids[2 * rank + b],
                                                                  problem.topk_weights[2 * rank + b]))
               for b in range(2)]
    return d, runner, weights, batches, problem


def _two_batches_rank(rank, world_size, name):
    """Two micro-batches, the second's exchange in flight while the first's experts run; rank 0
    waits in call order, rank 1 in reverse order."""
    d, runner, weights, batches, problem = _setup(rank, world_size, name)
    sequential = [d.combine(runner.run(d.dispatch(x, topk), weights)) for x, topk in batches]
    with torch.no_grad():
        sent = [d.dispatch(x, topk, async_op=True) for x, topk in batches]
        order = [0, 1] if rank == 0 else [1, 0]
        for b in order:
            sent[b][1].wait()
        # previous_event: each combine also after its own dispatch's work (already ordered: a no-op wait)
        pending = [d.combine(runner.run(out, weights), async_op=True, previous_event=work) for out, work in sent]
        for b in order:
            pending[b][1].wait()
    ys = [y for y, _ in pending]
    refs = [moe_reference(problem.xs[2 * rank + b], problem.topk_ids[2 * rank + b],
                          problem.topk_weights[2 * rank + b].double(), problem.w13, problem.w2, CONFIG)
            for b in range(2)]
    return ([torch.equal(y, s) for y, s in zip(ys, sequential)], [rel_err(y, ref) for y, ref in zip(ys, refs)],
            all(w.is_completed() for _, w in sent + pending))


@pytest.mark.parametrize("name", EXCHANGES)
def test_out_of_order_waits_give_the_sequential_bits(name):
    for same, errors, completed in run_ranks(_two_batches_rank, 2, name, timeout=120):
        assert same == [True, True] and completed
        assert max(errors) <= tolerance(torch.float32), errors


def _dropped_groups_rank(rank, world_size, rounds):
    """A process that makes a group, runs async exchanges on it and drops it, over and over (a serving
    loop rebuilding its groups, an elastic job): each dropped group goes, and its exchange thread too."""
    import gc
    import threading
    import weakref

    import torch.distributed as dist
    groups, errors = [], []
    for _ in range(rounds):
        group = dist.new_group(list(range(world_size)))
        d = ep.dispatchers.create("deepep_normal", CONFIG, group=group)
        runner = MoeRunner(ep.runners.create("torch", CONFIG), CONFIG, d.placement)
        _, _, weights, batches, problem = _setup(rank, world_size, "deepep_normal")
        x, topk = batches[0]
        with torch.no_grad():
            out, work = d.dispatch(x, topk, async_op=True)
            work.wait()
            y, work = d.combine(runner.run(out, weights), async_op=True)
            work.wait()
        errors.append(rel_err(y, moe_reference(problem.xs[2 * rank], problem.topk_ids[2 * rank],
                                               problem.topk_weights[2 * rank].double(), problem.w13, problem.w2,
                                               CONFIG)))
        groups.append(weakref.ref(group))
        dist.destroy_process_group(group)
        del d, runner, out, work, group
    gc.collect()
    for thread in threading.enumerate():  # (a thread ends shortly after its executor goes)
        if thread.name.startswith("ep-runtime-exchange"):
            thread.join(timeout=10)
    threads = [t.name for t in threading.enumerate() if t.name.startswith("ep-runtime-exchange")]
    return errors, sum(ref() is not None for ref in groups), threads


def test_dropped_groups_free_their_exchange_threads():
    for errors, live_groups, threads in run_ranks(_dropped_groups_rank, 2, 3, timeout=120):
        assert max(errors) <= tolerance(torch.float32), errors
        assert live_groups == 0 and threads == [], (live_groups, threads)


def _in_flight_rank(rank, world_size):
    """Rank 1 joins the exchange 0.6 s late: rank 0's async call returns at once and its caller
    computes meanwhile; wait() is what blocks."""
    d, runner, weights, batches, _ = _setup(rank, world_size, "deepep_normal")
    x, topk = batches[0]
    sync = d.dispatch(x, topk)
    if rank == 1:
        time.sleep(0.6)
    start = time.perf_counter()
    out, work = d.dispatch(x, topk, async_op=True)
    returned = time.perf_counter() - start
    busy = not work.is_completed()
    with pytest.raises(RuntimeError, match="not ready: call work.wait"):
        out.recv_x
    work.wait()
    waited = time.perf_counter() - start
    same = torch.equal(out.recv_x, sync.recv_x) and torch.equal(out.recv_topk_ids, sync.recv_topk_ids)
    return returned, busy, waited, same


def test_the_call_returns_while_the_exchange_is_in_flight():
    (returned, busy, waited, same), other = run_ranks(_in_flight_rank, 2, timeout=60)
    assert returned < 0.3 and busy and waited >= 0.4, (returned, busy, waited)
    assert same and other[3]


def _reuse_rank(rank, world_size, name):
    """Inputs overwritten right after wait() leave the outputs as they were: nothing still reads
    them, and no output aliases them. A synchronous call issued behind pending async ones waits its
    turn (the exchanges keep their order on every rank)."""
    d, runner, weights, batches, _ = _setup(rank, world_size, name)
    x, topk = batches[0]
    expected = d.combine(runner.run(d.dispatch(x, topk), weights))
    x_buffer = x.clone()
    out, work = d.dispatch(x_buffer, topk, async_op=True)
    late = d.dispatch(batches[1][0], batches[1][1])  # synchronous, behind the async one
    work.wait()
    x_buffer.fill_(float("nan"))
    combine_input = runner.run(out, weights)
    y, work = d.combine(combine_input, async_op=True)
    work.wait()
    combine_input.hidden_states.fill_(float("nan"))
    again = d.combine(runner.run(late, weights))
    return torch.equal(y, expected), bool(torch.isfinite(again).all())


@pytest.mark.parametrize("name", ["deepep_normal", "deepep_ll"])
def test_a_buffer_is_reused_only_after_its_wait(name):
    for same, finite in run_ranks(_reuse_rank, 2, name, timeout=120):
        assert same and finite


def _polling_rank(rank, world_size, name):
    """A caller that polls work.is_completed() (torch.distributed's Work) instead of calling wait(): it
    becomes True once the exchange is done, and the output is then ready (it stayed False until wait(),
    so a polling loop spun forever)."""
    d, runner, weights, batches, _ = _setup(rank, world_size, name)
    x, topk = batches[0]
    expected = d.combine(runner.run(d.dispatch(x, topk), weights))
    out, work = d.dispatch(x, topk, async_op=True)
    deadline = time.monotonic() + 10
    while not work.is_completed() and time.monotonic() < deadline:
        time.sleep(0.001)
    y, work = d.combine(runner.run(out, weights), async_op=True)
    while not work.is_completed() and time.monotonic() < deadline:
        time.sleep(0.001)
    return torch.equal(y, expected)


@pytest.mark.parametrize("name", EXCHANGES)
def test_polling_is_completed_completes_the_exchange(name):
    assert all(run_ranks(_polling_rank, 2, name, timeout=60))


def _modes_at_wait_rank(rank, world_size, name):
    """The output of an async combine keeps the autograd modes of its call, whatever the modes at the wait:
    called with a gradient and waited under no_grad, its gradient equals the synchronous one (the CPU output
    had no grad_fn: the experts' gradient was silently lost); called under inference_mode and waited outside
    it, the output equals the synchronous one (the wait raised "Inplace update to inference tensor")."""
    d, runner, weights, batches, _ = _setup(rank, world_size, name)
    (x, topk), grad_out = batches[0], torch.randn(batches[0][0].shape, generator=torch.Generator().manual_seed(rank))
    grads = []
    for use_async in (False, True):
        xg = x.clone().requires_grad_()
        rows = runner.run(d.dispatch(xg, topk), weights)
        if use_async:
            y, work = d.combine(rows, async_op=True)
            with torch.no_grad():
                work.wait()
        else:
            y = d.combine(rows)
        (y * grad_out).sum().backward()
        grads.append(xg.grad)
    expected = d.combine(runner.run(d.dispatch(x, topk), weights))
    with torch.inference_mode():
        y, work = d.combine(runner.run(d.dispatch(x, topk), weights), async_op=True)
    work.wait()
    return torch.equal(grads[0], grads[1]), torch.equal(y, expected)


@pytest.mark.parametrize("name", EXCHANGES)
def test_async_combine_output_keeps_the_modes_of_its_call(name):
    for same_grad, same in run_ranks(_modes_at_wait_rank, 2, name, timeout=60):
        assert same_grad and same


def _chained_rank(rank, world_size, name):
    """Layer 1's async combine output fed to layer 2's dispatch with previous_event=its work, and no wait
    in between (DeepEP's previous_event chaining): layer 2's exchange reads the combined values, as the
    synchronous calls do (on CPU ranks it read the combine's empty shell, filled only at wait(); a
    dispatcher that moves nothing, standard, ignored previous_event)."""
    first, runner, weights, batches, problem = _setup(rank, world_size, "deepep_normal")
    second = ep.dispatchers.create(name, CONFIG, **OPTIONS.get(name, {}))
    second_runner = MoeRunner(ep.runners.create("torch", CONFIG), CONFIG, second.placement)
    mine = second.placement.local_expert_ids()
    second_weights = ep.ExpertWeights(problem.w13.float()[mine], problem.w2.float()[mine])
    x, topk = batches[0]
    y = first.combine(runner.run(first.dispatch(x, topk), weights))
    expected = second.combine(second_runner.run(second.dispatch(y, topk), second_weights))
    y, work = first.combine(runner.run(first.dispatch(x, topk), weights), async_op=True)
    out, second_work = second.dispatch(y, topk, async_op=True, previous_event=work)
    second_work.wait()
    chained = second.combine(second_runner.run(out, second_weights))
    work.wait()
    return torch.equal(chained, expected)


@pytest.mark.parametrize("name", ["deepep_normal", "mori", "standard"])
def test_previous_event_orders_an_exchange_after_the_output_of_another(name):
    assert all(run_ranks(_chained_rank, 2, name, timeout=60))


def _hook_rank(rank, world_size, name):
    d, runner, weights, batches, _ = _setup(rank, world_size, name)
    x, topk = batches[0]
    expected = d.combine(runner.run(d.dispatch(x, topk), weights))
    out, hook = d.dispatch(x, topk, return_recv_hook=True)
    assert isinstance(hook, ep.dispatchers.ReceiveHook)
    hook()
    y, hook = d.combine(runner.run(out, weights), return_recv_hook=True)
    hook()
    return torch.equal(y, expected)


@pytest.mark.parametrize("name", ["deepep_normal", "deepep_ll"])
def test_receive_hook_completes_the_receive(name):
    assert all(run_ranks(_hook_rank, 2, name, timeout=120))


def _errors_rank(rank, world_size):
    d, runner, weights, batches, _ = _setup(rank, world_size, "deepep_ll")
    x, topk = batches[0]
    raised = []
    for kwargs, error in ((dict(async_op=True, return_recv_hook=True), ValueError),
                          (dict(async_op=1), TypeError), (dict(previous_event="now"), TypeError)):
        try:
            d.dispatch(x, topk, **kwargs)
        except error as err:
            raised.append(str(err).splitlines()[0])
    try:  # bad shape: raised at the call, before any collective, on every rank
        d.dispatch(x[:, :5], topk, async_op=True)
    except ValueError as err:
        raised.append(str(err).splitlines()[0])
    mori = ep.dispatchers.create("mori", CONFIG, max_dispatch_tokens_per_rank=24)
    try:
        mori.dispatch(x, topk, return_recv_hook=True)
    except ValueError as err:
        raised.append(str(err))
    # Checks of this rank's arguments that the exchange used to make (raised by wait(), on its thread): at the call.
    fp8 = ep.dispatchers.create("deepep_ll", CONFIG, num_max_dispatch_tokens_per_rank=24, use_fp8=True)
    normal = ep.dispatchers.create("deepep_normal", CONFIG)
    handle = normal.dispatch(x, topk).handle
    for call, error in ((lambda: fp8.dispatch(x.clone().requires_grad_(), topk, async_op=True), RuntimeError),
                        (lambda: normal.dispatch(x[:3], ep.TopKOutput(topk[0][:3], topk[1][:3]), handle=handle,
                                                 return_recv_hook=True), ValueError)):
        try:
            call()
        except error as err:
            raised.append(str(err).splitlines()[0])
    # An id out of range on rank 0 only: found in the count table, raised by wait() on every rank.
    ids = topk.topk_ids.clone()
    if rank == 0:
        ids[3, 1] = 99
    out, work = d.dispatch(x, ep.TopKOutput(ids, topk.topk_weights), async_op=True)
    try:
        work.wait()
    except ValueError as err:
        raised.append(str(err).splitlines()[0])
    return raised


def test_bad_arguments_raise_on_every_rank():
    for rank, raised in enumerate(run_ranks(_errors_rank, 2, timeout=60)):
        assert len(raised) == 8, raised
        assert "async_op=True and return_recv_hook=True" in raised[0]
        assert "async_op=1; allowed: True or False" in raised[1]
        assert "previous_event='now'; allowed: None, a torch.cuda.Event or an ExchangeWork" in raised[2]
        # the argument, its value and what is allowed (was: "hidden" or "32" anywhere in the message)
        assert re.fullmatch(r"x has shape \[\d+, 5\]; expected \[T, 32\] \(hidden_size=32\)", raised[3]), raised[3]
        assert "return_recv_hook=True on the mori dispatcher; allowed: False" in raised[4]
        assert raised[5].startswith("use_fp8=True dispatch (the argument, or EP_RUNTIME_DISPATCH_FP8=1 where it is "
                                    "None): quantized (fp8) experts and fp8 dispatch are inference-only")
        assert raised[6].startswith("handle was made for ") and raised[6].endswith(
            " tokens; x has 3 (a handle is only valid for a dispatch with the same routing)"), raised[6]
        # rank 0 names its bad value; rank 1 says which rank had one (either substring passed on either rank)
        assert raised[7] == ("topk_ids has id 99 at [3, 1]; allowed -1..7 (num_experts=8)" if rank == 0 else
                             "rank 0 got invalid topk_ids or topk_weights (ids outside -1..7 or non-finite weights; its "
                             "own error names the value); every rank stops here"), raised[7]


def _collectives_while_pending_rank(rank, world_size):
    """The layer's own collectives (rebalance, a new layer's settings check, gather_experts,
    reduce_replica_grads) called while an async dispatch of the group is still in flight: they run after
    it, in call order, on every rank (run beside it, their collectives paired with the exchange's in
    another order on each rank: a hang until the timeout); the layer computes its experts after the move."""
    E, H, I = 9, 16, 8
    torch.manual_seed(0)
    layer = ep.EPMoE(E, 2, H, I, dispatcher="deepep_normal", runner="torch", num_redundant_experts=world_size)
    problem = make_problem(layer.config, [9, 6, 7], seed=4, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    x, ids, w = problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank]
    ref = moe_reference(problem.xs[rank], ids, w.double(), problem.w13, problem.w2, layer.config)
    with torch.no_grad():
        layer(x, ids, w)  # some load to plan from
        out, work = layer.dispatcher.dispatch(x, ep.TopKOutput(layer.placement.to_physical(ids), w), async_op=True)
        placement = layer.placement
        layer.rebalance()  # an all_reduce, the plan check (all_gather) and the weight moves (all_to_all)
        other = ep.EPMoE(E, 2, H, I, dispatcher="mori", runner="torch")  # its settings are all-gathered
        gathered = layer.gather_experts()
        layer.reduce_replica_grads()
        work.wait()
        y = layer(x, ids, w)
    return (rel_err(y.double(), ref), torch.equal(gathered.w13, problem.w13.float()), other.placement.num_experts,
            layer.placement != placement)


def test_collectives_of_the_layer_wait_for_pending_async_exchanges():
    for err, same, experts, moved in run_ranks(_collectives_while_pending_rank, 3, timeout=60, group_timeout=10):
        assert err <= tolerance(torch.float32), err
        assert same and experts == 9 and moved


def _two_batch_rebalanced_rank(rank, world_size):
    """run_sequential / run_overlapped take the router's ids, as the layer's forward does: on a layer with
    copies of experts after a rebalance they go to the slots holding their experts (sent to the slots with
    those numbers, they met other experts) and count in expert_load; both equal the float64 reference."""
    from ep_runtime.bench.overlap import run_overlapped, run_sequential
    E = 6
    problem = make_problem(ep.MoeConfig(E, 2, 16, 8), [5, 7, 6, 4, 3, 5], seed=1, ep_size=world_size)
    mine = range(2 * rank, 2 * rank + 2)
    batches = [(problem.xs[b].float(), ep.TopKOutput(problem.topk_ids[b], problem.topk_weights[b])) for b in mine]
    refs = [moe_reference(problem.xs[b], problem.topk_ids[b], problem.topk_weights[b].double(), problem.w13,
                          problem.w2, problem.config) for b in mine]
    ids = torch.cat([problem.topk_ids[b] for b in mine])
    out = {}
    for name in ["deepep_normal", "deepep_ll"]:
        layer = ep.EPMoE(E, 2, 16, 8, dispatcher=name, runner="torch", num_redundant_experts=world_size,
                         dispatcher_options=OPTIONS.get(name))
        layer.load_experts(problem.w13.float(), problem.w2.float())
        layer.apply_placement(ep.eplb.plan(torch.arange(E, dtype=torch.float64) ** 2, world_size, E + world_size))
        with torch.no_grad():
            ys = run_sequential(layer, batches) + run_overlapped(layer, batches)
        counted = torch.equal(layer.expert_load(), 2 * torch.bincount(ids[ids >= 0].long(), minlength=E))
        out[name] = [rel_err(y.double(), ref) for y, ref in zip(ys, refs * 2)], counted
    return out


def test_two_batch_overlap_of_a_rebalanced_layer_with_copies():
    for out in run_ranks(_two_batch_rebalanced_rank, 3):
        for name, (errors, counted) in out.items():
            assert max(errors) <= tolerance(torch.float32), (name, errors)
            assert counted, name


def _bad_micro_batch_rank(rank, world_size, name, bad):
    """run_overlapped / run_sequential with micro-batch 1 bad on rank 0 only (x of another dtype than the
    layer's: checked before anything is dispatched, as forward checks it; topk_ids of another shape: found
    by that micro-batch's dispatch at the call): every rank raises (rank 0 its own error, the others the
    count table's) and the group stays usable, the next step equal to the sequential one. (run_overlapped's
    rank 0 raised before issuing micro-batch 0's combine, which the others issued: the next step's exchanges
    paired with it out of order, and every rank timed out. An x of another dtype failed in the runner after
    the dispatch, naming w13.)"""
    from ep_runtime.bench.overlap import run_overlapped, run_sequential
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=name, runner="torch", dispatcher_options=OPTIONS.get(name))
    problem = make_problem(layer.config, [5, 7, 6, 4], seed=1, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    batches = [(problem.xs[b].float(), ep.TopKOutput(problem.topk_ids[b], problem.topk_weights[b]))
               for b in range(2 * rank, 2 * rank + 2)]
    x, (ids, weights) = batches[1]
    wrong = (x.double(), (ids, weights)) if bad == "x_dtype" else (x, (torch.cat([ids, ids[:, :1]], 1), weights))
    raised = []
    with torch.no_grad():
        for schedule in (run_overlapped, run_sequential):
            try:
                schedule(layer, [batches[0], wrong] if rank == 0 else batches)
                raised.append(None)
            except (TypeError, ValueError) as err:
                raised.append(str(err))
        expected = run_sequential(layer, batches)
        again = run_overlapped(layer, batches)
    return raised, all(torch.equal(a, b) for a, b in zip(again, expected))


@pytest.mark.parametrize("bad", ["x_dtype", "topk_ids"])
@pytest.mark.parametrize("name", ["deepep_normal", "deepep_ll"])
def test_a_micro_batch_bad_on_one_rank_fails_every_rank_and_leaves_the_group_usable(name, bad):
    (raised0, same0), (raised1, same1) = run_ranks(_bad_micro_batch_rank, 2, name, bad, timeout=60,
                                                   group_timeout=10)
    own = "x has dtype torch.float64; this layer's weights" if bad == "x_dtype" else "topk_ids has shape [7, 3]"
    assert all(message.startswith(own) for message in raised0), raised0
    assert all("rank 0 of 2 was given bad input" in message for message in raised1), raised1
    assert same0 and same1


def _failed_exchange_rank(rank, world_size):
    """What a failed async exchange leaves in its output. A dispatch failed by the count table (rank 0's bad id;
    wait() raises on every rank): reading its output names the failure (it said "not ready: call work.wait()"
    after that very wait had raised), and the group goes on. A combine whose peer is gone, polled with
    is_completed() (True for a failed exchange too): its output holds NaN, not uninitialised memory passing as
    the result."""
    d, runner, weights, batches, problem = _setup(rank, world_size, "deepep_normal")
    (x, topk), errors = batches[0], []
    ids = topk.topk_ids.clone()
    if rank == 0:
        ids[2, 0] = 99
    out, work = d.dispatch(x, ep.TopKOutput(ids, topk.topk_weights), async_op=True)
    for read in (work.wait, lambda: out.recv_x):
        try:
            read()
        except (ValueError, RuntimeError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    with torch.no_grad():
        rows = runner.run(d.dispatch(x, topk), weights)
        y = d.combine(rows)
    ref = moe_reference(problem.xs[2 * rank], problem.topk_ids[2 * rank], problem.topk_weights[2 * rank].double(),
                        problem.w13, problem.w2, CONFIG)
    if rank == 1:  # leaves: rank 0's next exchange loses its connection
        return errors, rel_err(y, ref), None
    with torch.no_grad():
        lost, work = d.combine(rows, async_op=True)
    deadline = time.monotonic() + 10
    while not work.is_completed() and time.monotonic() < deadline:
        time.sleep(0.001)
    return errors, rel_err(y, ref), (work.exception() is not None, bool(lost.isnan().all()))


def test_a_failed_async_exchange_leaves_no_output_passing_as_a_result():
    for rank, (errors, err, lost) in enumerate(run_ranks(_failed_exchange_rank, 2, timeout=60, group_timeout=10)):
        assert len(errors) == 2 and errors[0].startswith("ValueError: "), errors
        assert errors[1].startswith("RuntimeError: this dispatch output has no value: its exchange failed "
                                    f"({errors[0]}) (attribute 'recv_x')"), errors
        assert err <= tolerance(torch.float32), err
        assert lost == ((True, True) if rank == 0 else None), lost


def _backward_while_pending_rank(rank, world_size):
    """Training with overlap: the next micro-batch's dispatch is in flight (async) while this one's backward
    runs, whose reverse exchanges are collectives on the same group. They run after the pending exchange,
    in call order, on every rank. (Here rank 1's exchange thread starts late, after a previous_event, and
    rank 0's backward starts late: run beside each other, the two ranks paired the backward's exchange
    with the dispatch's, and both hung until the timeout.) The gradient equals the float64 reference."""
    import threading
    from concurrent.futures import Future
    torch.manual_seed(0)
    layer = ep.EPMoE(6, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    problem = make_problem(layer.config, [5, 7], seed=1, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    x, ids, w = problem.xs[rank].float().requires_grad_(), problem.topk_ids[rank], problem.topk_weights[rank]
    y = layer(x, ids, w)
    later = Future()
    threading.Timer(0.5, later.set_result, (None,)).start()
    with torch.no_grad():
        _, work = layer.dispatcher.dispatch(x.detach(), ep.TopKOutput(ids, w), async_op=True,
                                            previous_event=ep.dispatchers.ExchangeWork(future=later) if rank else None)
    if rank == 0:
        time.sleep(0.5)
    (y * problem.grad_outputs[rank].float()).sum().backward()
    work.wait()
    x64 = problem.xs[rank].clone().requires_grad_()
    ref = moe_reference(x64, ids, w.double(), problem.w13, problem.w2, layer.config)
    (ref * problem.grad_outputs[rank]).sum().backward()
    return rel_err(x.grad, x64.grad)


def test_backward_runs_after_a_pending_async_dispatch():
    for err in run_ranks(_backward_while_pending_rank, 2, timeout=60, group_timeout=5):
        assert err <= tolerance(torch.float32), err


class SharedMLP(torch.nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.up = torch.nn.Linear(hidden, inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def _shared_rank(rank, world_size, dispatcher):
    E, K, H, I = 8, 2, 32, 16
    torch.manual_seed(0)
    shared = SharedMLP(H, 24)
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", shared_experts=shared,
                     dispatcher_options=OPTIONS.get(dispatcher))
    torch.manual_seed(0)
    plain = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [13, 19], seed=2, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    plain.load_experts(problem.w13.float(), problem.w2.float())
    x = problem.xs[rank].float().requires_grad_(True)
    ids, w = problem.topk_ids[rank], problem.topk_weights[rank]
    y = layer(x, ids, w)
    sequential = plain(x, ids, w) + shared(x)
    y.square().sum().backward()
    grad_shared = shared.up.weight.grad.clone()
    shared.zero_grad()
    sequential.square().sum().backward()
    x64 = problem.xs[rank]
    s64 = shared.down.weight.double() @ torch.nn.functional.silu(shared.up.weight.double() @ x64.T)
    ref = moe_reference(x64, ids, w.double(), problem.w13, problem.w2, layer.config) + s64.T
    return (torch.equal(y, sequential), torch.equal(grad_shared, shared.up.weight.grad), rel_err(y.detach(), ref),
            "shared_experts" in repr(layer) and "shared_experts.up.weight" in layer.state_dict())


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll"])
def test_shared_experts_run_during_dispatch_with_unchanged_result(dispatcher):
    for same, same_grad, err, listed in run_ranks(_shared_rank, 2, dispatcher, timeout=120):
        assert same and same_grad and listed
        assert err <= tolerance(torch.float32), err


def _two_batch_shared_rank(rank, world_size, dispatcher):
    """run_sequential / run_overlapped on a layer with shared experts give layer(x) for each micro-batch, bit
    for bit, shared experts included (they returned the routed experts' output alone), and the float64
    reference with the shared MLP added."""
    from ep_runtime.bench.overlap import run_overlapped, run_sequential
    E, K, H, I = 8, 2, 32, 16
    torch.manual_seed(0)
    shared = SharedMLP(H, 24)
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", shared_experts=shared,
                     dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [13, 19, 7, 11], seed=3, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    mine = (2 * rank, 2 * rank + 1)
    batches = [(problem.xs[b].float(), ep.TopKOutput(problem.topk_ids[b], problem.topk_weights[b])) for b in mine]
    with torch.no_grad():
        forward = [layer(x, topk.topk_ids, topk.topk_weights) for x, topk in batches]
        sequential, overlapped = run_sequential(layer, batches), run_overlapped(layer, batches)
    errors = []
    for b, y in zip(mine, overlapped):
        x64 = problem.xs[b]
        s64 = (shared.down.weight.double() @ torch.nn.functional.silu(shared.up.weight.double() @ x64.T)).T
        errors.append(rel_err(y.double(), moe_reference(x64, problem.topk_ids[b], problem.topk_weights[b].double(),
                                                        problem.w13, problem.w2, layer.config) + s64))
    return all(map(torch.equal, forward, sequential)) and all(map(torch.equal, forward, overlapped)), max(errors)


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "mori"])
def test_two_batch_schedules_add_the_shared_experts_as_forward_does(dispatcher):
    for same, err in run_ranks(_two_batch_shared_rank, 2, dispatcher, timeout=120):
        assert same
        assert err <= tolerance(torch.float32), err


class _ScalarPerToken(torch.nn.Module):
    """A shared 'expert' of the wrong shape: [T, H] -> [T, 1] (a gate's logit, say)."""
    def __init__(self, hidden):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, 1, bias=False)

    def forward(self, x):
        return self.proj(x)


def _wrong_shared_shape_rank(rank, world_size, dispatcher):
    E, K, H, I = 8, 2, 32, 16
    torch.manual_seed(0)  # the same modules on every rank
    shared = _ScalarPerToken(H)
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", shared_experts=shared,
                     dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [9, 6], seed=3, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    x, ids, w = problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank]
    errors = []
    for call in (lambda: layer(x, ids, w), lambda: layer.routed_and_shared(x, ep.TopKOutput(ids, w))):
        try:
            call()
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    layer.shared_experts = None  # the group still works: the routed experts alone equal the float64 reference
    ref = moe_reference(problem.xs[rank], ids, w.double(), problem.w13, problem.w2, layer.config)
    return errors, rel_err(layer(x, ids, w), ref)


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_normal", "deepep_ll"])
def test_shared_experts_of_the_wrong_shape_are_named_not_broadcast(dispatcher):
    """A shared_experts module returning [T, 1] (not [T, H]) was broadcast against the routed experts' [T, H]
    output: forward returned a wrong [T, H] without a word. Now forward and routed_and_shared raise naming the
    module's output shape and x's, on every rank, once the exchange has completed (the group stays usable)."""
    for errors, err in run_ranks(_wrong_shared_shape_rank, 2, dispatcher, timeout=120):
        for message in errors:
            assert message is not None and message.startswith("shared_experts returned shape ["), errors
            assert ", 1] for x of shape [" in message and "allowed: a tensor of x's shape" in message, message
        assert err <= tolerance(torch.float32), err


def test_two_batch_schedules_name_a_micro_batch_that_is_no_pair():
    """(x, ids, weights) instead of (x, (ids, weights)) failed deep inside the layer ("got multiple values for
    argument 'async_op'"); both schedules name the micro-batch and the form they take."""
    from ep_runtime.bench.overlap import run_overlapped, run_sequential
    layer = ep.EPMoE(4, 2, 16, 8, dispatcher="standard", runner="torch")
    x, ids, weights = torch.randn(3, 16), torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, 2)
    for schedule in (run_sequential, run_overlapped):
        with pytest.raises(ValueError, match=r"batches\[1\] is 3 items; allowed: a pair \(x \[T, H\], topk\)"):
            schedule(layer, [(x, (ids, weights)), (x, ids, weights)])
        assert schedule(layer, []) == []  # nothing to run
    # any iterable of pairs, e.g. a zip of the inputs and the routings
    assert torch.equal(run_overlapped(layer, zip([x], [(ids, weights)]))[0],
                       run_sequential(layer, iter([(x, (ids, weights))]))[0])


def test_shared_experts_must_be_a_module():
    with pytest.raises(TypeError, match="shared_experts=function; allowed: None or an nn.Module"):
        ep.EPMoE(8, 2, 32, 16, shared_experts=lambda x: x)


def test_routed_and_shared_without_shared_experts_names_the_argument():
    """A layer built without shared experts, asked for routed_and_shared with none: an error naming
    the argument before anything is dispatched (not NoneType's 'not callable' after the exchange was
    issued), and the layer still works after it."""
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 32, 16, runner="torch")
    x = torch.randn(5, 32)
    topk = ep.select_experts(torch.randn(5, 8), ep.TopKConfig(top_k=2))
    with pytest.raises(ValueError, match="shared_experts=None and this layer has none"):
        layer.routed_and_shared(x, topk)
    assert layer.expert_load().sum() == 0  # nothing was dispatched
    y = layer(x, *topk)
    ref = moe_reference(x, topk.topk_ids, topk.topk_weights, layer.w13, layer.w2, layer.config)
    assert rel_err(y, ref) <= tolerance(torch.float32)


def test_routed_and_shared_checks_x_as_forward_does():
    """routed_and_shared (what ep.hf's overlapped shared experts call) takes x as forward does: x in
    another dtype than the layer's is named before anything is dispatched or computed (it failed inside
    the shared module with torch's "mat1 and mat2 must have the same dtype"), and under torch.autocast
    it is cast to the layer's dtype."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(32, 32)
    layer = ep.EPMoE(8, 2, 32, 16, runner="torch", shared_experts=shared)
    x = torch.randn(5, 32, dtype=torch.float64)
    topk = ep.select_experts(torch.randn(5, 8), ep.TopKConfig(top_k=2))
    with pytest.raises(TypeError, match=r"^x has dtype torch.float64; this layer's weights are torch.float32"):
        layer.routed_and_shared(x, topk)
    assert layer.expert_load().sum() == 0  # nothing was dispatched
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=True):
        routed, out = layer.routed_and_shared(x, topk)
    assert routed.dtype == torch.float32
    ref = moe_reference(x.float(), topk.topk_ids, topk.topk_weights, layer.w13, layer.w2, layer.config)
    assert rel_err(routed, ref) <= tolerance(torch.bfloat16)  # autocast runs the GEMMs in bf16


def _nvlink_rank(rank, world_size, name):
    """The kernel path through the NVLink transport (its CPU stand-in under the Triton interpreter):
    the overlapped schedule's exchanges keep their order, so the transport's per-call signals line
    up on every rank and the outputs equal the sequential ones."""
    from ep_runtime.bench.overlap import run_overlapped, run_sequential
    from ep_runtime.dispatchers import exchange_kernels as xk

    torch.manual_seed(0)
    layer = ep.EPMoE(4, 2, 16, 8, dispatcher=name, runner="torch",
                     dispatcher_options=dict(num_max_dispatch_tokens_per_rank=4, transport="nvlink"))
    problem = make_problem(layer.config, [4, 3, 2, 4], seed=4, ep_size=world_size)
    batches = [(problem.xs[2 * rank + b].float(), ep.TopKOutput(problem.topk_ids[2 * rank + b],
                                                               problem.topk_weights[2 * rank + b])) for b in range(2)]
    with torch.no_grad(), xk.forced():
        sequential = run_sequential(layer, batches)
        overlapped = run_overlapped(layer, batches)
    return all(torch.equal(a, b) for a, b in zip(sequential, overlapped))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_overlap_through_the_nvlink_transport():
    assert all(run_ranks(_nvlink_rank, 2, "deepep_ll", timeout=240))
