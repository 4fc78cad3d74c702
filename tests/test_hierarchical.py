"""The node-aware exchange on 4 gloo ranks pretending to be 2 nodes x 2 (ranks_per_node=2): dispatch
outputs bit-identical to the flat exchange, combine and gradients within the fp32 summation-order
bound (bit-identical for tokens whose experts sit on one node), the layer against the float64
reference, the bytes per link class against the counting rule, and the inter-node reduction at
2 x 8 ranks for DeepSeek-V3 routing counted on random routing."""
import math
import os

import pytest
import torch

import ep_runtime as ep
from ep_runtime.bench.cost_model import uniform_rows_per_token
from ep_runtime.dispatchers.hierarchical import LinkBytes, LinkRows, NodeLayout, count_link_rows, use_two_stages
from ep_runtime.testing import check_layer, host_syncs, make_problem, random_topk_ids, run_ranks, tolerance

# One rank sends nothing; ranks 1 and 2 do, so stage 2's arrival order (relay by relay) differs
# from the flat order (source by source) and the receiver's reordering is exercised.
TOKENS = [9, 23, 4, 0]
U32 = 2.0 ** -24  # fp32 unit roundoff


def _destinations(placement, topk_ids):
    """[[ranks owning an expert of token t] per token] per rank (-1 slots go nowhere)."""
    return [[sorted({placement.rank_of(torch.tensor([e])).item() for e in row if e >= 0}) for row in ids.tolist()]
            for ids in topk_ids]


def _compare_rank(rank, world_size, name):
    """Flat vs node-aware dispatcher on the same inputs: outputs, combine, gradients and link rows."""
    cfg = ep.MoeConfig(16, 4, 24, 8)
    problem = make_problem(cfg, TOKENS, seed=5, ep_size=world_size, minus_one_fraction=0.25)
    made = {mode: ep.dispatchers.create(name, cfg, hierarchical=mode, ranks_per_node=2) for mode in ("off", "on")}
    scale = torch.tensor([0.75, 1.5, -1.25, 2.0])  # partial of rank d: its rows times scale[d]
    runs = {}
    for mode, d in made.items():
        x = problem.xs[rank].float().requires_grad_()
        w = problem.topk_weights[rank].clone().requires_grad_()
        out = d.dispatch(x, ep.TopKOutput(problem.topk_ids[rank], w))
        ids = out.recv_topk_ids
        mine = (ids >= 0) if name == "deepep_normal" else (d.placement.rank_of(ids.clamp(min=0)) == rank) & (ids >= 0)
        # Like a runner: each row weighted by this rank's experts' weights only.
        partial = out.recv_x * (out.recv_topk_weights * mine).sum(1, keepdim=True) * scale[rank]
        y = d.combine(ep.CombineInput(partial, out))
        (y * problem.grad_outputs[rank].float()).sum().backward()
        reused = True
        if name == "deepep_normal":  # a later dispatch with the same routing reuses the (two-stage) plan
            again = d.dispatch(x.detach() * 2, ep.TopKOutput(problem.topk_ids[rank], w.detach()), handle=out.handle)
            reused = torch.equal(again.recv_x, out.recv_x.detach() * 2)
        runs[mode] = dict(out=out, y=y.detach(), dx=x.grad, dw=w.grad, links=out.handle.links, reused=reused,
                          bytes=d.link_bytes(out), relay=out.handle.relay is not None)
    flat, aware = runs["off"], runs["on"]
    fields = ["recv_x", "recv_topk_ids", "recv_topk_weights"] + (
        ["num_recv_tokens_per_expert"] if name == "deepep_normal" else ["num_recv_tokens"])
    same_dispatch = all(torch.equal(torch.as_tensor(getattr(flat["out"], f)), torch.as_tensor(getattr(aware["out"], f)))
                        for f in fields)
    # Sum-order bound per element: 2 (R - 1) u sum |partials| (each order within (R - 1) u of the exact sum).
    dests = _destinations(made["on"].placement, problem.topk_ids)
    x, w = problem.xs[rank].float(), problem.topk_weights[rank]
    spread = torch.tensor([sum(float(scale[d].abs()) for d in ds) for ds in dests[rank]])  # sum |scale| per token
    bound = 2 * (world_size - 1) * U32 * (x.abs() * (w.sum(1) * spread).unsqueeze(1))
    one_node = torch.tensor([len({d // 2 for d in ds}) <= 1 for ds in dests[rank]], dtype=torch.bool)
    g = problem.grad_outputs[rank].float()
    grad_bound = 2 * (world_size - 1) * U32 * (g.abs() * (w.sum(1) * spread).unsqueeze(1))
    nodes = NodeLayout.blocks(world_size, 2)
    auto = _auto_modes(rank, cfg, problem) if name == "deepep_normal" else None
    expected = {mode: count_link_rows(dests, nodes, node_aware=mode == "on")[rank] for mode in runs}
    return dict(
        same_dispatch=same_dispatch, relay=(flat["relay"], aware["relay"]), reused=aware["reused"],
        y_within=bool(((flat["y"] - aware["y"]).abs() <= bound + 1e-30).all()),
        y_one_node_equal=torch.equal(flat["y"][one_node], aware["y"][one_node]),
        dx_within=bool(((flat["dx"] - aware["dx"]).abs() <= grad_bound + 1e-30).all()),
        dx_one_node_equal=torch.equal(flat["dx"][one_node], aware["dx"][one_node]),
        dw_close=torch.allclose(flat["dw"], aware["dw"], rtol=1e-5, atol=1e-6),
        links={mode: (runs[mode]["links"], expected[mode]) for mode in runs},
        bytes={mode: (runs[mode]["bytes"], LinkBytes.of(expected[mode], 24 * 4 + 8 * 4, 24 * 4)) for mode in runs},
        multi_node_tokens=int((~one_node).sum()), auto=auto)


def _float64_link_bytes_rank(rank, world_size, name):
    cfg = ep.MoeConfig(8, 2, 5, 4)
    options = {"max_dispatch_tokens_per_rank": 4} if name == "mori" else {}
    d = ep.dispatchers.create(name, cfg, hierarchical="on", ranks_per_node=1, **options)
    x = torch.randn(3, 5, dtype=torch.float64)
    out = d.dispatch(x, ep.TopKOutput(torch.tensor([[0, 7], [2, 5], [1, -1]]), torch.rand(3, 2)))
    return d.link_bytes(out), out.handle.links, out.recv_topk_weights.dtype


@pytest.mark.parametrize("name", ["deepep_normal", "mori"])
def test_link_bytes_count_float64_weights_and_ids_at_8_bytes(name):
    """float64 tokens send their K weights as float64 (and the K ids beside them in the same float64 metadata
    rows): link_bytes counted 4 bytes each, 8 K bytes short per dispatch row."""
    for got, links, weights in run_ranks(_float64_link_bytes_rank, 2, name):
        assert weights == torch.float64
        assert got == LinkBytes.of(links, 5 * 8 + 2 * 2 * 8, 5 * 8)


def _auto_modes(rank, cfg, problem):
    """hierarchical='auto' (the default) under three node sources: this one host (flat), torchrun's
    GROUP_RANK saying 2 nodes, EP_RUNTIME_RANKS_PER_NODE=2 (both node-aware)."""
    topk = ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])
    went = []
    for env in ({}, {"GROUP_RANK": str(rank // 2)}, {"EP_RUNTIME_RANKS_PER_NODE": "2"}):
        os.environ.update(env)
        try:
            d = ep.dispatchers.create("deepep_normal", cfg)
            out = d.dispatch(problem.xs[rank].float(), topk)
            went.append((out.handle.relay is not None, d.exchange.nodes.node_of))
        finally:
            for k in env:
                del os.environ[k]
    return went


@pytest.mark.parametrize("name", ["deepep_normal", "mori"])
def test_node_aware_equals_flat_on_2x2(name):
    results = run_ranks(_compare_rank, 4, name)
    for r in results:
        assert r["relay"] == (False, True)
        assert r["same_dispatch"], "dispatch outputs must be bit-identical to the flat exchange"
        assert r["reused"]
        assert r["y_within"] and r["dx_within"] and r["dw_close"]
        assert r["y_one_node_equal"] and r["dx_one_node_equal"]
        for got, want in r["links"].values():
            assert got == want
        for got, want in r["bytes"].values():
            assert got == want
    if name == "deepep_normal":
        two = (0, 0, 1, 1)
        assert all(r["auto"] == [(False, (0, 0, 0, 0)), (True, two), (True, two)] for r in results)
    assert sum(r["multi_node_tokens"] for r in results) > 0  # the bound was exercised, not only equality
    flat_other = sum(r["links"]["off"][0].dispatch_other_node for r in results)
    aware_other = sum(r["links"]["on"][0].dispatch_other_node for r in results)
    assert aware_other < flat_other


def _layer_rank(rank, world_size, name):
    layer = ep.EPMoE(48, 6, 32, 16, dispatcher=name, runner="torch",
                     dispatcher_options={"hierarchical": "on", "ranks_per_node": 2})
    problem = make_problem(layer.config, TOKENS[:world_size], seed=17, ep_size=world_size)
    return check_layer(layer, problem, rank), layer.dispatcher.exchange.nodes.node_of


@pytest.mark.parametrize("name,R", [("deepep_normal", 4), ("mori", 4), ("deepep_normal", 3)])
def test_node_aware_layer_matches_reference(name, R):
    """The whole layer (runner masks for -1 slots and other ranks' experts, an empty rank) forward and
    backward against float64; with 3 ranks the nodes are uneven (2 + 1 ranks)."""
    for errors, node_of in run_ranks(_layer_rank, R, name):
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert node_of == (0, 0, 1, 1)[:R]


def test_count_link_rows_by_hand():
    """2 nodes x 2: rank 0's token to ranks {1, 2, 3}: flat 1 same-node + 2 other-node rows; node-aware
    1 row to relay 2, which forwards 1 row to rank 3 (same node there), plus 1 to rank 1."""
    nodes = NodeLayout.blocks(4, 2)
    dests = [[[1, 2, 3]], [], [], []]
    flat = count_link_rows(dests, nodes, node_aware=False)
    aware = count_link_rows(dests, nodes, node_aware=True)
    assert flat[0] == LinkRows(1, 2, 0, 0) and flat[2] == LinkRows(0, 0, 0, 1)
    assert aware[0] == LinkRows(1, 1, 0, 0)
    assert aware[2] == LinkRows(1, 0, 0, 1) and aware[3] == LinkRows(0, 0, 1, 0)
    assert nodes.relay(1, 1) == 3 and nodes.relay(2, 0) == 0
    assert use_two_stages("auto", nodes) and not use_two_stages("auto", NodeLayout.blocks(4, 4))
    assert not use_two_stages("auto", NodeLayout.blocks(4, 1)) and use_two_stages("on", NodeLayout.blocks(4, 1))


def test_deepseek_v3_reduction_at_2x8():
    """K=8 of 256 uniform at 2 nodes x 8 ranks: inter-node rows counted on random routing match the
    hypergeometric expectation and shrink by its factor (~3.26x)."""
    E, K, R, G, T = 256, 8, 16, 8, 512
    gen = torch.Generator().manual_seed(0)
    L = E // R
    dests = [[sorted(set((torch.randperm(E, generator=gen)[:K] // L).tolist())) for _ in range(T)] for _ in range(R)]
    nodes = NodeLayout.blocks(R, G)
    flat = sum(r.dispatch_other_node for r in count_link_rows(dests, nodes, node_aware=False))
    aware = sum(r.dispatch_other_node for r in count_link_rows(dests, nodes, node_aware=True))
    per_token = uniform_rows_per_token(E, K, R, G)
    factor = per_token.flat_other_node / per_token.aware_other_node
    miss_rank = math.prod((E - L - i) / (E - i) for i in range(K))  # no expert on a given rank: 0.5924
    miss_node = math.prod((E - G * L - i) / (E - i) for i in range(K))  # none on a given node: 0.00343
    assert math.isclose(factor, (R - G) * (1 - miss_rank) / (1 - miss_node), rel_tol=1e-12)
    assert 3.26 < factor < 3.28
    # 8192 tokens: the counts' relative standard error is ~1% (flat) and ~0.1% (node-aware).
    assert abs(flat / (R * T) - per_token.flat_other_node) < 0.04 * per_token.flat_other_node
    assert abs(aware / (R * T) - per_token.aware_other_node) < 0.01 * per_token.aware_other_node
    assert abs(flat / aware - factor) < 0.05 * factor


def test_cost_model_by_hand():
    """One number by hand: flat dispatch at 2 x 8, 4096 tok/rank, is network-bound: alpha + the bytes to
    the other node at 50 GB/s + one 5 us message latency. And the 2x H200 check: the model fitted on
    1024 and 4096 tok/rank predicts 128 tok/rank inside the measured eager range (37-61 us)."""
    from ep_runtime.bench import cost_model as cm
    p_rank = 1 - math.prod((240 - i) / (256 - i) for i in range(8))
    network_bytes = 4096 * 8 * p_rank * (7168 * 2 + 8 * 8)  # 8 other-node ranks, row + 8 weights + 8 ids
    want = cm.ALPHA_US + network_bytes / 50e3 + 5.0
    assert math.isclose(cm.predict(4096, 7168, 256, 8, 16, 8).flat, want, rel_tol=1e-9)
    assert 3890 < want < 3900
    intra = cm.predict(128, 7168, 256, 8, 2, 2, combine=True).flat
    assert 37 <= intra <= 61


def _mpirun_nodes_rank(rank, world_size):
    """Ranks of one host started by Open MPI's mpirun inside a Slurm job: SLURM_NODEID is what each rank
    inherited (mpirun's own node: the batch script's 0; a daemon's node: its srun step's index), so ranks
    of different hosts can share one and ranks of one host differ. The node then comes from the host name."""
    os.environ.update(OMPI_COMM_WORLD_SIZE=str(world_size), SLURM_NODEID=str(rank))
    cfg = ep.MoeConfig(8, 2, 16, 8)
    problem = make_problem(cfg, [4, 5], seed=4, ep_size=world_size)
    d = ep.dispatchers.create("deepep_normal", cfg)
    d.dispatch(problem.xs[rank].float(), ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank]))
    return d.exchange.nodes.node_of


def test_mpirun_nodes_come_from_host_names_not_slurm_nodeid():
    assert run_ranks(_mpirun_nodes_rank, 2) == [(0, 0), (0, 0)]


def _collectives_rank(rank, world_size, mode="on", ranks_per_node=1):
    """all_to_all_single calls of one dispatch and of its combine (by default node-aware, 2 nodes x 1
    rank), after a first dispatch that resolved the nodes."""
    import torch.distributed as dist
    cfg = ep.MoeConfig(8, 2, 16, 8)
    problem = make_problem(cfg, [6, 3], seed=2, ep_size=world_size)
    d = ep.dispatchers.create("deepep_normal", cfg, hierarchical=mode, ranks_per_node=ranks_per_node)
    topk = ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])
    d.dispatch(problem.xs[rank].float(), topk)
    calls, exchange = [], dist.all_to_all_single

    def counted(*args, **kwargs):
        calls.append(1)
        return exchange(*args, **kwargs)

    dist.all_to_all_single = counted
    try:
        out = d.dispatch(problem.xs[rank].float(), topk)
        dispatched = len(calls)
        d.combine(ep.CombineInput(out.recv_x, out))
    finally:
        dist.all_to_all_single = exchange
    return out.handle.relay is not None, dispatched, len(calls) - dispatched


def _one_node_rank(rank, world_size):
    return [_collectives_rank(rank, world_size, mode, ranks_per_node=world_size) for mode in ("off", "on")]


def test_on_with_one_node_runs_the_flat_exchange():
    """hierarchical='on' on one node (ranks_per_node = R): every relay would be the sender itself, so the
    flat plan runs (no relay, the flat path's collectives; it ran both stages: 4 + 2 all_to_alls), and
    the cost model predicts the flat time for it."""
    from ep_runtime.bench import cost_model as cm
    for flat, on in run_ranks(_one_node_rank, 2):
        assert on == flat and not flat[0]
    assert not use_two_stages("on", NodeLayout.blocks(4, 4)) and use_two_stages("on", NodeLayout.blocks(4, 2))
    for combine in (False, True):
        p = cm.predict(4096, 7168, 256, 8, 8, 8, combine=combine)
        assert p.aware == p.aware_pipelined == p.flat


def test_cost_model_counts_the_collectives_node_aware_runs():
    """The model charges alpha per collective the node-aware exchange really issues: dispatch sends each
    stage's rows and then their weights and ids (4), combine one stage each way back (2)."""
    from ep_runtime.bench import cost_model as cm
    for relay, dispatched, combined in run_ranks(_collectives_rank, 2):
        assert relay and (dispatched, combined) == cm.AWARE_COLLECTIVES
    rows = cm.uniform_rows_per_token(256, 8, 16, 8)
    for combine in (False, True):
        row_bytes = 7168 * 2 + (0 if combine else 8 * 8)
        net = cm.NETWORK_400G.time_us(4096 * rows.aware_other_node * row_bytes)
        nvl = cm.NVLINK_2XH200.time_us(4096 * rows.aware_same_node * row_bytes)
        want = (2 if combine else 4) * cm.ALPHA_US + net + nvl
        assert math.isclose(cm.predict(4096, 7168, 256, 8, 16, 8, combine=combine).aware, want, rel_tol=1e-9)


@pytest.mark.parametrize("args,message", [
    (["--nodes", "1"], "argument --nodes: 1: allowed an int >= 2"),
    (["--ranks-per-node", "0"], "argument --ranks-per-node: 0: allowed an int >= 1"),
    (["--network-gbs", "0"], "argument --network-gbs: '0': allowed a finite number of GB/s > 0"),
    (["--nvlink-gbs", "-5"], "argument --nvlink-gbs: '-5': allowed a finite number of GB/s > 0"),
    (["--network-gbs", "nan"], "argument --network-gbs: 'nan': allowed a finite number of GB/s > 0"),
    (["--nodes", "3"], "--nodes 3 --ranks-per-node 8: 24 ranks do not divide DeepSeek-V3's 256 experts"),
])
def test_cost_model_command_names_the_flag_it_cannot_model(args, message, capsys):
    """(Before: ZeroDivisionError or ValueError tracebacks, or negative times printed.)"""
    from ep_runtime.bench import cost_model as cm
    with pytest.raises(SystemExit) as exit_info:
        cm.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    cm.main(["--nodes", "4", "--ranks-per-node", "4", "--network-gbs", "25.5"])
    assert "| 4096 | combine |" in capsys.readouterr().out


@pytest.mark.parametrize("options,message", [({"hierarchical": "yes"}, "hierarchical='yes'; allowed: 'auto', 'on', 'off'"),
                                             ({"ranks_per_node": -1}, "ranks_per_node=-1; allowed: an int >= 0"),
                                             # an argument holds to its knob's maximum (it let 2**31 - 1 pass)
                                             ({"num_sms": 2000}, r"num_sms=2000; allowed: an int >= 0 and <= 1024 "
                                                                 r"\(also settable as EP_RUNTIME_NUM_SMS\)")])
def test_bad_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        ep.dispatchers.create("deepep_normal", ep.MoeConfig(8, 2, 16, 8), **options)


def _gpu_rank(rank, world_size, name, grad):
    """bf16 on GPUs over NCCL, flat vs node-aware (ranks_per_node = R / 2): inference (the flat path on
    the fused kernel path, node-aware on torch ops) and training."""
    from ep_runtime.distributed import device_for_rank
    device = device_for_rank()
    cfg = ep.MoeConfig(32, 4, 256, 64)
    tokens = [64, 37, 100, 0][:world_size] if world_size > 2 else [64, 37]
    problem = make_problem(cfg, tokens, seed=3, ep_size=world_size)
    out, syncs = {}, {}
    for mode in ("off", "on"):
        d = ep.dispatchers.create(name, cfg, device=device, hierarchical=mode, ranks_per_node=max(1, world_size // 2))
        x = problem.xs[rank].to(device, torch.bfloat16).requires_grad_(grad)
        o = d.dispatch(x, ep.TopKOutput(problem.topk_ids[rank].to(device), problem.topk_weights[rank].to(device)))
        y = d.combine(ep.CombineInput(o.recv_x * 0.5, o))
        out[mode] = (o.recv_x.float().cpu(), o.recv_topk_ids.cpu(), o.recv_topk_weights.cpu(), y.detach().float().cpu(),
                     o.handle.relay is not None)
        # host syncs of a second call (the count table is read by polling an event: not one): none, also
        # between the node-aware path's two stages
        topk = ep.TopKOutput(problem.topk_ids[rank].to(device), problem.topk_weights[rank].to(device))
        sent = []
        syncs[mode] = (len(host_syncs(lambda: sent.append(d.dispatch(x, topk)))),
                       len(host_syncs(lambda: d.combine(ep.CombineInput(sent[0].recv_x * 0.5, sent[0])))))
    (fx, fi, fw, fy, frel), (ax, ai, aw, ay, arel) = out["off"], out["on"]
    return dict(relay=(frel, arel), same=torch.equal(fx, ax) and torch.equal(fi, ai) and torch.equal(fw, aw),
                y_err=float((fy - ay).norm() / fy.norm().clamp(min=1e-30)), y_equal=torch.equal(fy, ay), syncs=syncs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", ["deepep_normal", "mori"])
def test_gpu_node_aware_equals_flat(name, grad):
    R = 4 if torch.cuda.device_count() >= 4 else 2
    for r in run_ranks(_gpu_rank, R, name, grad, backend="nccl", timeout=130, group_timeout=100):
        assert r["relay"] == (False, True) and r["same"]
        assert r["syncs"] == {"off": (0, 0), "on": (0, 0)}, r["syncs"]
        assert r["y_err"] <= 2e-2
        if R == 2:  # one rank per node: every node sum is one partial, so combine is bit-identical too
            assert r["y_equal"]


def _two_calls_rank(rank, world_size):
    """Two dispatches (different routing) through one flat and one node-aware dispatcher (2 nodes x 1
    rank), each combined; what the node-aware plans keep on the device for the layout after the first."""
    cfg = ep.MoeConfig(8, 2, 16, 8)
    problems = [make_problem(cfg, tokens, seed=seed, ep_size=world_size) for seed, tokens in ((11, [7, 5]), (12, [3, 9]))]
    made = {mode: ep.dispatchers.create("deepep_normal", cfg, hierarchical=mode, ranks_per_node=1)
            for mode in ("off", "on")}
    outs, kept = {mode: [] for mode in made}, []
    for problem in problems:
        for mode, d in made.items():
            out = d.dispatch(problem.xs[rank].float(), ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank]))
            y = d.combine(ep.CombineInput(out.recv_x * (rank + 0.5), out))
            outs[mode].append((out.recv_x, out.recv_topk_ids, out.recv_topk_weights, y, out.handle.relay is not None))
        kept.append(dict(made["on"].exchange.nodes._on_device))
    same = all(torch.equal(a, b) for flat, aware in zip(outs["off"], outs["on"]) for a, b in zip(flat[:4], aware[:4]))
    relays = [(flat[4], aware[4]) for flat, aware in zip(outs["off"], outs["on"])]
    return same, relays, {what for what, _ in kept[0]}, kept[1].keys() == kept[0].keys() and all(
        kept[1][k] is v for k, v in kept[0].items())


def test_node_aware_keeps_the_layouts_constants_across_dispatches():
    """A second node-aware dispatch reuses the device tensors the first made for the layout (stage 1's
    relays, the node's ranks and mask) and still equals the flat exchange bit for bit, dispatch and
    combine (one rank per node: every node sum is one partial, summed in rank order as the flat path's)."""
    for rank, (same, relays, kept, reused) in enumerate(run_ranks(_two_calls_rank, 2)):
        assert same and relays == [(False, True)] * 2
        assert kept == {"node_of", ("relays", rank), ("node_mask", rank), ("node_ranks", rank)}, kept  # node = rank
        assert reused


def _half_combine_rank(rank, world_size, dtype_name):
    """Flat and node-aware combine of the same half-precision partials (2 nodes x 2, K = 4 of 8, no -1
    slots): the elementwise difference, and the documented bound for it, computed in float64 from each
    (token, rank) partial as the owning rank makes it."""
    dtype = getattr(torch, dtype_name)
    cfg = ep.MoeConfig(8, 4, 64, 8)
    gen = torch.Generator().manual_seed(10 + rank)
    ids = random_topk_ids(gen, 32, 8, 4, world_size, minus_one_fraction=0.0)
    x, w = torch.randn(32, 64, generator=gen).to(dtype), torch.rand(32, 4, generator=gen)
    scale = torch.tensor([0.75, 1.5, -1.25, 2.0])

    def partial(rows, weights, r):  # rank r's partial of rows whose weights on r's experts sum to `weights`
        return (rows.float() * weights * scale[r]).to(dtype)

    y = {}
    for mode in ("off", "on"):
        d = ep.dispatchers.create("deepep_normal", cfg, hierarchical=mode, ranks_per_node=2)
        out = d.dispatch(x, ep.TopKOutput(ids, w))
        y[mode] = d.combine(ep.CombineInput(partial(out.recv_x, out.recv_topk_weights.sum(1, keepdim=True), rank), out))
    owner = d.placement.rank_of(ids)
    node_sums = torch.zeros(2, 32, 64, dtype=torch.float64)
    magnitude = torch.zeros(32, 64, dtype=torch.float64)
    for r in range(world_size):
        p = partial(x, (w * (owner == r)).sum(1, keepdim=True), r).double() * (owner == r).any(1, keepdim=True)
        node_sums[r // 2] += p
        magnitude += p.abs()
    rho = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    flat, aware = y["off"].double(), y["on"].double()
    bound = 2 * (world_size - 1) * U32 * magnitude + rho * node_sums.abs().sum(0) + 2 * rho * flat.abs()  # ulp(y)
    one_node = (owner // 2 == owner[:, :1] // 2).all(1)
    return (bool(((flat - aware).abs() <= bound).all()), torch.equal(flat[one_node], aware[one_node]),
            int((flat != aware).sum()))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_node_aware_combine_of_half_partials_within_the_documented_bound(dtype_name):
    """docs/multinode.md's bound for bf16/fp16 partials: the fp32 summation-order term, one rounding of each
    node's sum, and one ulp of the output (each path rounds its fp32 sum to the partials' dtype once, and the
    two sums may round to neighbouring values). Without the last term, which the page left out, about a third
    of the differing elements were outside its bound."""
    for within, one_node_equal, differing in run_ranks(_half_combine_rank, 4, dtype_name):
        assert within and one_node_equal and differing > 0
