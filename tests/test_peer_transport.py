"""The NVLink transport's kernels (puts into peers' memory, free/ready signals, bounded waits) run on
gloo ranks under the Triton interpreter, over shared-memory files standing in for symmetric memory:
every row lands where the collective transport puts it (stored by the copy engine's stand-in, a
plain copy, or by the copy kernel), over several back-to-back calls (each one
waits until its peers are done reading the last), across a growth of the region, and a silent peer
is reported, not waited for."""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import ep_runtime as ep
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.dispatchers import exchange_kernels as xk
from ep_runtime.dispatchers import peer_transport as pt
from ep_runtime.dispatchers.transport import all_gather_rows
from ep_runtime.distributed import free_port
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.runner_core import MoeRunner
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

pytestmark = pytest.mark.skipif(xk.triton is None, reason="triton not installed")


def _transport_rank(rank, world_size, sms):
    group = dist.group.WORLD
    peer = pt.peer_transport(group, torch.device("cpu"), world_size, "nvlink")
    gen = torch.Generator().manual_seed(100 + rank)
    mismatches = []
    for call, H in enumerate([6, 6, 5, 40, 6]):  # H=40 after H=6: the region grows between calls
        # static: 3 rows to every peer (rows differ per destination)
        chunk = 3
        x = torch.randn(world_size * chunk, H, generator=gen).to(torch.bfloat16)
        want = torch.empty_like(x)
        dist.all_to_all_single(want, x)
        assert peer.fits(world_size * chunk * H * 2)
        got = peer.all_to_all(x, world_size * chunk, chunk=chunk, num_sms=sms)
        if not torch.equal(got, want):
            mismatches.append(("static", call))
        # all-gather: every peer gets all of x
        row = torch.randint(-50, 50, (1, H), generator=gen, dtype=torch.int32)
        gathered = [torch.empty_like(row) for _ in range(world_size)]
        dist.all_gather(gathered, row)
        assert peer.fits(world_size * H * 4)
        if not torch.equal(peer.all_to_all(row, world_size, chunk=1, gather=True, num_sms=sms and 3), torch.cat(gathered)):
            mismatches.append(("gather", call))
        # exact plan from a count table: uneven rows per peer (zero included), then back to the owners
        sent_row = torch.randint(0, 4, (world_size,), generator=gen, dtype=torch.int32)
        sent_row[(rank + call) % world_size] = 0
        table = all_gather_rows(torch.cat([torch.tensor([7], dtype=torch.int32), sent_row]), group, world_size)
        send_splits = sent_row.tolist()
        recv_splits = table[:, 1 + rank].tolist()
        x = torch.randn(sum(send_splits), H, generator=gen)
        want = x.new_empty(sum(recv_splits), H)
        dist.all_to_all_single(want, x, recv_splits, send_splits)
        most = max(int(table[:, 1:].sum(0).max()), int(table[:, 1:].sum(1).max()))
        assert peer.fits(most * H * 4)
        sent = table[:, 1:].tolist()
        got = peer.all_to_all(x, sum(recv_splits), sent=sent, num_sms=sms)
        if not torch.equal(got, want):
            mismatches.append(("table", call))
        back = peer.all_to_all(got * 2, sum(send_splits), sent=sent, to_owner=True, num_sms=sms)
        if not torch.equal(back, x * 2):
            mismatches.append(("to_owner", call))
    return {"mismatches": mismatches, "bytes": peer.nbytes}


@pytest.mark.parametrize("sms", [0, 2], ids=["copy_engine", "copy_kernel"])
def test_rows_land_where_the_collective_puts_them(sms):
    for result in run_ranks(_transport_rank, 3, sms, timeout=240):
        assert result["mismatches"] == [], result
        assert result["bytes"] > 1 << 20, result  # a region of at least one MiB, and the flags


def _silent_peer_rank(rank, world_size, sms):
    """Rank 1 never calls: rank 0's wait gives up (its poll bound) and its next call raises, naming rank 1."""
    os.environ["EP_RUNTIME_TIMEOUT_S"] = "1"
    peer = pt.peer_transport(dist.group.WORLD, torch.device("cpu"), world_size, "nvlink")
    x = torch.randn(world_size * 2, 4)
    assert peer.fits(x.numel() * 4)
    if rank == 1:
        dist.barrier()
        return "silent"
    peer.all_to_all(x, world_size * 2, chunk=2, num_sms=sms)
    try:
        peer.check()
    except ep.PeerFailure as err:
        dist.barrier()
        return str(err)
    dist.barrier()
    return "no error"


@pytest.mark.parametrize("sms", [0, 1], ids=["copy_engine", "copy_kernel"])
def test_a_silent_peer_is_reported_not_waited_for(sms):
    message = run_ranks(_silent_peer_rank, 2, sms, timeout=120)[0]
    assert "rank 1 did not signal within the timeout (1 s; set it with EP_RUNTIME_TIMEOUT_S" in message, message


def _init_distributed_timeout_rank(rank, world_size, port, store_port):
    """init_distributed(timeout_s=1) with EP_RUNTIME_TIMEOUT_S at its default (300 s): the transport's
    waits give up after that 1 s, as every other wait of the group does. (Rank 1 waits for rank 0 on
    a store of its own: any collective of the group would give up after 1 s.)"""
    dist.destroy_process_group()  # the harness's group: this one is made as a launched job's is
    store = dist.TCPStore("127.0.0.1", store_port, world_size, rank == 0, timeout=timedelta(seconds=60))
    os.environ.pop("EP_RUNTIME_TIMEOUT_S", None)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ep.init_distributed(backend="gloo", timeout_s=1)
    peer = pt.peer_transport(dist.group.WORLD, torch.device("cpu"), world_size, "nvlink")
    x = torch.randn(world_size * 2, 4)
    assert peer.fits(x.numel() * 4)
    message = "silent"
    if rank == 0:
        start = time.monotonic()
        peer.all_to_all(x, world_size * 2, chunk=2)
        with pytest.raises(ep.PeerFailure) as failure:
            peer.check()
        message = (str(failure.value), time.monotonic() - start)
        store.set("done", "1")
    else:
        store.wait(["done"])
    ep.destroy_distributed()
    return message


def test_a_silent_peer_is_given_up_on_after_init_distributeds_timeout():
    message, seconds = run_ranks(_init_distributed_timeout_rank, 2, free_port(), free_port(), timeout=120)[0]
    assert "rank 1 did not signal within the timeout (1 s;" in message and seconds < 10, (message, seconds)


def _failure_then_new_group_rank(rank, world_size, port):
    """A peer failure recorded on the default group (rank 1 goes silent on its NVLink transport) ends
    that group; a default group made after it (destroyed, then dist.init_process_group, as a
    long-lived server re-initialises) is a new group: its layers run."""
    os.environ["EP_RUNTIME_TIMEOUT_S"] = "1"
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    problem = make_problem(layer.config, [5, 6], seed=4, ep_size=world_size)
    peer = pt.peer_transport(dist.group.WORLD, torch.device("cpu"), world_size, "nvlink")
    x = torch.randn(world_size * 2, 4)
    assert peer.fits(x.numel() * 4)
    before = "silent"
    if rank == 0:
        peer.all_to_all(x, world_size * 2, chunk=2)
        with pytest.raises(ep.PeerFailure, match="rank 1 did not signal"):
            peer.check()
        with pytest.raises(ep.PeerFailure, match="this group failed earlier"):  # the record is in force
            layer(problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank])
        before = "failed"
    dist.barrier()
    ep.destroy_distributed()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch")
    return before, check_layer(layer, problem, rank, backward=False)["y"]


def test_a_failure_does_not_outlive_its_group():
    results = run_ranks(_failure_then_new_group_rank, 2, free_port(), timeout=120)
    assert [before for before, _ in results] == ["failed", "silent"]
    assert max(err for _, err in results) < tolerance(torch.float32), results


def _new_default_group_transport_rank(rank, world_size, port, store_port):
    """A dispatcher built with group=None (the default group) takes the NVLink transport of the default
    group of the moment: after dist.destroy_process_group and a new default group, a new transport,
    not the old group's (which rank 1's silence failed for good on rank 0)."""
    os.environ["EP_RUNTIME_TIMEOUT_S"] = "1"
    store = dist.TCPStore("127.0.0.1", store_port, world_size, rank == 0, timeout=timedelta(seconds=60))
    config = MoeConfig(8, 2, 16, 8)
    problem = make_problem(config, [5, 6], seed=9, ep_size=world_size)
    old = pt.peer_transport(None, torch.device("cpu"), world_size, "nvlink")
    x = torch.randn(world_size * 2, 4)
    assert old.fits(x.numel() * 4)
    if rank == 0:
        old.all_to_all(x, world_size * 2, chunk=2)
        with pytest.raises(ep.PeerFailure, match="rank 1 did not signal"):
            old.check()
        store.set("failed", "1")
    else:
        store.wait(["failed"])
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    err = _ll_step_error(config, problem, rank, None)
    new = pt.peer_transport(None, torch.device("cpu"), world_size, "nvlink")
    return new is not old and new.calls > 0, err


def _ll_step_error(config, problem, rank, group) -> float:
    """One deepep_ll dispatch -> torch runner -> combine on `group`'s NVLink transport (the kernel path under
    the interpreter): the output's error against the float64 reference."""
    dispatcher = ep.dispatchers.create("deepep_ll", config, group=group, num_max_dispatch_tokens_per_rank=8,
                                       transport="nvlink")
    runner = MoeRunner(ep.runners.create("torch", config, format=dispatcher.format), config, dispatcher.placement)
    mine = dispatcher.placement.local_expert_ids()
    weights = ExpertWeights(problem.w13[mine].float(), problem.w2[mine].float())
    with torch.no_grad(), xk.forced():
        out = dispatcher.dispatch(problem.xs[rank].float(), ep.TopKOutput(problem.topk_ids[rank],
                                                                          problem.topk_weights[rank]))
        y = dispatcher.combine(runner.run(out, weights))
    want = moe_reference(problem.xs[rank], problem.topk_ids[rank], problem.topk_weights[rank].double(), problem.w13,
                         problem.w2, config)
    return rel_err(y.double(), want)


def test_a_new_default_group_gets_a_new_transport():
    results = run_ranks(_new_default_group_transport_rank, 2, free_port(), free_port(), timeout=120)
    assert all(fresh for fresh, _ in results), results
    assert max(err for _, err in results) < tolerance(torch.float32), results


def _dropped_groups_transport_rank(rank, world_size, rounds):
    """A process that makes a group, runs a layer's exchanges on its NVLink transport and drops it, over
    and over (a serving loop rebuilding its groups, an elastic job): each dropped group's transport goes,
    and its mapped memory with it."""
    import gc
    import weakref
    config = MoeConfig(8, 2, 16, 8)
    problem = make_problem(config, [5, 6], seed=9, ep_size=world_size)
    transports, errors = [], []
    for _ in range(rounds):
        group = dist.new_group(list(range(world_size)))
        errors.append(_ll_step_error(config, problem, rank, group))
        peer = pt.peer_transport(group, torch.device("cpu"), world_size, "nvlink")
        assert peer.calls > 0  # the exchanges took this transport
        transports.append(weakref.ref(peer))
        dist.destroy_process_group(group)
        del peer, group
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = maps.read().count("/dev/shm/ep_runtime_")
    return errors, sum(ref() is not None for ref in transports), mapped


def test_a_dropped_group_frees_its_transport():
    for errors, live, mapped in run_ranks(_dropped_groups_transport_rank, 2, 3, timeout=120):
        assert max(errors) < tolerance(torch.float32), errors
        assert (live, mapped) == (0, 0)


# M = 12: one more than the most tokens a rank sends (11), so every rank's region has pad rows; the
# transports' kernels run a program per region row (R*M), and the interpreter's cost is per program.
CASES = {
    "deepep_normal": ("deepep_normal", {}),
    "mori_static": ("mori", {"max_dispatch_tokens_per_rank": 12, "static": True, "max_input_tokens": 20}),
    "deepep_ll": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": 12}),
    "deepep_ll_fp8": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": 12, "use_fp8": True}),
}


def _layer_rank(rank, world_size, case):
    """The same layer call on the collective transport and on the NVLink one: identical outputs, and
    the same receive summary in a dispatch's exchange handle, read after a later exchange on the group
    (the token put's table lives in the transport's region, which that exchange overwrites)."""
    name, options = CASES[case]
    outputs, summaries = {}, {}
    for transport in ("nccl", "nvlink"):
        torch.manual_seed(0)
        layer = ep.EPMoE(12, 3, 32, 16, dispatcher=name, runner="torch",
                         dispatcher_options=dict(options, transport=transport))
        problem = make_problem(layer.config, [11, 7, 9][:world_size], seed=6, ep_size=world_size)
        x = problem.xs[rank].float()
        with torch.no_grad(), xk.forced():
            outputs[transport] = [layer(x, problem.topk_ids[rank], problem.topk_weights[rank]) for _ in range(2)]
            sent = layer.dispatcher.dispatch(x, ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank]))
            later = problem.topk_ids[rank][: 5 + rank].flip(0)  # other tokens, other counts
            layer.dispatcher.dispatch(x[: 5 + rank], ep.TopKOutput(later, problem.topk_weights[rank][: 5 + rank]))
        exchange = getattr(sent.handle, "exchange", sent.handle)  # deepep_ll's handle holds the exchange's
        summaries[transport] = (exchange.num_recv_tokens_per_expert_tensor.tolist(), int(exchange.num_recv_tokens),
                                int(exchange.most_received))
    calls = pt.peer_transport(dist.group.WORLD, x.device, world_size, "nvlink").calls  # 2 x (dispatch + combine) + 2
    same = all(torch.equal(a, b) for a, b in zip(outputs["nccl"], outputs["nvlink"]))
    return calls, same and summaries["nccl"] == summaries["nvlink"]


@pytest.mark.parametrize("case", list(CASES))
def test_layer_outputs_equal_the_collective_transport(case):
    R = 2 if case == "deepep_ll_fp8" else 3  # (fp8 under the interpreter is slow: the same put path at 2 ranks)
    assert run_ranks(_layer_rank, R, case, timeout=300) == [(6, True)] * R


def _token_put_rank(rank, world_size, encoding):
    """PeerTransport.put_tokens against rows built here from every rank's inputs (all-gathered): row
    s*M + t of this rank's region holds source s's token t with its weights and this rank's local
    ids where the token comes here (weight 0 where the id is -1), pad metadata (ids -1, weight 0) everywhere else, over calls that
    reuse the region with fewer tokens (stale rows must read as pads) and an empty rank; the table
    is every rank's count row; combine_index and send_token are the by-token static plan."""
    from ep_runtime.dispatchers import fp8_payload
    R, M, E, K, H = world_size, 8, 6, 3, 160
    L = E // R
    quant = ep.QuantConfig(scale_encoding=encoding) if encoding else None
    peer = pt.peer_transport(dist.group.WORLD, torch.device("cpu"), R, "nvlink")
    rank_of = (torch.arange(E) // L).to(torch.int32)
    local_of = (torch.arange(E) % L).to(torch.int32)
    gen = torch.Generator().manual_seed(300 + rank)
    problems, bad = [], []
    for call, sizes in enumerate([[8, 5, 7], [3, 0, 8], [1, 6, 2]]):
        T = sizes[rank % 3]
        x = (torch.randn(T, H, generator=gen) * 4).to(torch.bfloat16)
        ids = torch.randint(-1, E, (T, K), generator=gen)
        w = torch.rand(T, K, generator=gen)
        if call == 2 and rank == 1:  # the count row's flags: a bad id and a non-finite weight
            ids[0, 0], w[-1, -1] = E, float("inf")
        num_flags = 3 if call == 1 else 2  # call 1 also flags a token listing one expert twice
        if call == 1 and rank == 0:
            ids[0, 1] = ids[0, 0] = 1
        with xk.forced():
            want_in_rank, want_row = xk.layout_row(ids, w, rank_of, R, num_flags)  # (tested against torch elsewhere)
            assert peer.fits(pt.put_bytes(x, K, quant, M, R, want_row.numel()))
            in_rank = torch.empty(T, R, dtype=torch.bool)
            row = torch.empty_like(want_row)
            combine_index = torch.empty(T, R, dtype=torch.long)
            send_token = torch.empty(R * M, dtype=torch.long)
            received, table = peer.put_tokens(x, ids, w, rank_of, local_of, M, quant,
                                              xk.row_layout(R, E, num_flags, wants=False), in_rank, row,
                                              combine_index, send_token)
            received, table = received.clone(), table.clone()
        if not torch.equal(in_rank, want_in_rank) or not torch.equal(row, want_row):
            bad.append(("layout", call))
        every = [None] * R
        dist.all_gather_object(every, (x, ids, w, want_row))
        problems.append((call, received, table, combine_index, send_token, every, x, ids))
    for call, received, table, combine_index, send_token, every, x, ids in problems:
        width, dtype = xk.row_format(x, quant)
        rows, meta = xk.payload_views(received, width, dtype, K)
        if not torch.equal(table, torch.stack([r for *_, r in every])):
            bad.append(("table", call))
        for s, (xs, ids_s, w_s, _) in enumerate(every):
            for t in range(M):
                n = s * M + t
                owners = {int(rank_of[e]) for e in ids_s[t].tolist() if 0 <= e < E} if t < xs.shape[0] else set()
                got_ids, got_w = meta[n, K:], meta[n, :K].view(torch.float32)
                if rank not in owners:
                    if got_ids.tolist() != [-1] * K or got_w.tolist() != [0.0] * K:
                        bad.append(("pad", call, s, t))
                    continue
                want_ids = [int(local_of[e]) if 0 <= e < E and int(rank_of[e]) == rank else -1
                            for e in ids_s[t].tolist()]
                if quant is None:
                    same = torch.equal(rows[n], xs[t])
                else:  # values and scales (the wire row's padding bytes are not data)
                    want = fp8_payload.views(fp8_payload.encode(xs[t:t + 1], quant), H, quant)
                    got = fp8_payload.views(rows[n:n + 1], H, quant)
                    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want))
                # a slot whose expert lives elsewhere weighs 0 here (DeepEP's recv_topk_weights)
                want_w = torch.where(torch.tensor(want_ids) >= 0, w_s[t], torch.zeros(()))
                if got_ids.tolist() != want_ids or not torch.equal(got_w, want_w) or not same:
                    bad.append(("row", call, s, t))
        T = x.shape[0]
        goes = torch.zeros(T, R, dtype=torch.bool)
        for t in range(T):
            for e in ids[t].tolist():
                if 0 <= e < E:
                    goes[t, int(rank_of[e])] = True
        want_index = torch.where(goes, torch.arange(R) * M + torch.arange(T).unsqueeze(1), R * M)
        want_token = torch.where(goes.t(), torch.arange(T), T) if T else torch.empty(R, 0, dtype=torch.long)
        want_token = torch.cat([want_token, torch.full((R, M - T), T)], 1).reshape(-1)
        if not torch.equal(combine_index, want_index) or not torch.equal(send_token, want_token):
            bad.append(("plan", call))
    return bad


@pytest.mark.parametrize("encoding", [None, "fp32", "ue8m0"], ids=["bf16", "fp8", "fp8_ue8m0"])
def test_token_put_lands_every_row_at_its_token(encoding):
    assert run_ranks(_token_put_rank, 3, encoding, timeout=300) == [[]] * 3


def _bad_id_rank(rank, world_size):
    """deepep_ll on the NVLink transport (its token put: no count-table collective) with rank 1's ids
    out of range: every rank raises, rank 1 naming the value, the others naming rank 1."""
    layer = ep.EPMoE(12, 3, 32, 16, dispatcher="deepep_ll", runner="torch",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 16, "transport": "nvlink"})
    problem = make_problem(layer.config, [11, 7, 9], seed=8, ep_size=world_size)
    ids = problem.topk_ids[rank].clone()
    if rank == 1:
        ids[2, 1] = 999
    try:
        with torch.no_grad(), xk.forced():
            layer(problem.xs[rank].float(), ids, problem.topk_weights[rank])
    except ValueError as err:
        return str(err)
    return "no error"


def test_a_bad_id_on_one_rank_fails_every_rank_on_the_token_put():
    errors = run_ranks(_bad_id_rank, 3, timeout=300)
    assert "999" in errors[1], errors
    assert all("rank 1 got invalid topk_ids" in e for e in (errors[0], errors[2])), errors


def _sum_put_rank(rank, world_size):
    """PeerTransport.put_sums against exchange_kernels.gather_rows (ll_gather's partials) sent home by
    all_to_all_single: bit-identical on every row that names a slot, over calls that reuse the region."""
    R, M, K, H, S = world_size, 6, 3, 96, 20
    peer = pt.peer_transport(dist.group.WORLD, torch.device("cpu"), R, "nvlink")
    gen = torch.Generator().manual_seed(500 + rank)
    bad = []
    for call in range(3):
        src = torch.randn(S, H, generator=gen).to(torch.bfloat16)
        index = torch.randint(0, S + 1, (R * M, K), generator=gen)  # S: no slot
        index[torch.rand(R * M, generator=gen) < 0.3] = S  # whole rows naming nothing here: never stored
        weight = torch.rand(R * M, K, generator=gen)
        with xk.forced():
            partial = xk.gather_rows(src, index, weight)
            assert peer.fits(R * M * H * 2)
            got = peer.put_sums(src, index, weight, M).clone()
        want = torch.empty_like(partial)
        dist.all_to_all_single(want, partial)
        named = torch.empty(R * M, dtype=torch.bool)
        dist.all_to_all_single(named, (index < S).any(1))
        if not named.any() or not torch.equal(got[named], want[named]):
            bad.append(call)
    return bad


def test_sum_put_equals_the_gathered_partials_sent_home():
    assert run_ranks(_sum_put_rank, 3, timeout=300) == [[]] * 3


def test_ranks_sharing_one_gpu_are_refused_the_nvlink_transport_by_name():
    """Two ranks on one GPU (one uuid) cannot rendezvous symmetric memory (torch raises deep inside):
    the verdict names both ranks, so `auto` keeps the collective and `nvlink` raises that reason."""
    one_gpu = [("node0", 0, "GPU-a"), ("node0", 0, "GPU-a")]
    reason = pt.shared_gpu(one_gpu)
    assert reason is not None and "ranks 0, 1 share one GPU (GPU-a)" in reason
    # one GPU per rank: under one device index each (CUDA_VISIBLE_DEVICES per rank) or several indices
    assert pt.shared_gpu([("node0", 0, "GPU-a"), ("node0", 0, "GPU-b"), ("node0", 1, "GPU-c")]) is None
    assert pt.shared_gpu([("node0", 0, "GPU-a"), ("node0", 1, "GPU-b"), ("node0", 1, "GPU-b")]).startswith(
        "ranks 1, 2 share one GPU")


def _nvlink_on_cpu_rank(rank, world_size, dispatcher):
    os.environ.pop("TRITON_INTERPRET", None)  # plain CPU ranks: no stand-in for GPU memory
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch",
                     dispatcher_options={"transport": "nvlink"})
    x, ids, w = torch.randn(3, 16), torch.tensor([[0, 5], [7, -1], [2, 4]]), torch.rand(3, 2)
    messages = []
    for grad in (True, False):  # the autograd path and the inference path
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError) as err:
            layer(x, ids, w)
        messages.append(str(err.value))
    auto = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch")
    auto(x, ids, w)
    messages.append(repr(auto).partition(", transport=")[2])  # what print(layer) says the exchange used
    return messages


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_nvlink_on_cpu_ranks_is_an_error_on_every_rank(dispatcher):
    """transport='nvlink' is "an error where impossible" (docs/transports.md names CPU ranks); on CPU
    ranks outside the interpreter the exchange silently went through gloo instead, since only the
    kernel path asked for the transport. transport='auto' takes the collective there, and print(layer) says so
    (it printed "transport=auto", not the transport in use)."""
    expected = ("transport='nvlink' (EP_RUNTIME_TRANSPORT) is impossible here: the ranks are CPU processes (no GPU "
                "memory to map); allowed here: 'auto' or 'nccl'")
    assert run_ranks(_nvlink_on_cpu_rank, 2, dispatcher) == [[expected] * 2 + ["auto (collective))"]] * 2


def _inference_mode_first_rank(rank, world_size, name):
    """A serving call under torch.inference_mode first (the group's transport and its region are made there), then
    one under torch.no_grad and a training step; each checked against the float64 reference."""
    # (mori's inference output is its receive buffer, padded to prealloc_max_recv_tokens rows: 8192 by default,
    # each a program under the interpreter, 28 s a call)
    options = {"transport": "nvlink", **({"prealloc_max_recv_tokens": 48} if name == "mori" else {})}
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=name, runner="torch", dispatcher_options=options)
    problem = make_problem(layer.config, [11, 6], seed=5, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    x, ids, weights = problem.xs[rank].float(), problem.topk_ids[rank], problem.topk_weights[rank]
    want = moe_reference(problem.xs[rank], ids, weights.double(), problem.w13.float().double(),
                         problem.w2.float().double(), layer.config)
    errors = {}
    with xk.forced():
        for mode, context in (("inference_mode", torch.inference_mode), ("no_grad", torch.no_grad)):
            with context():
                errors[mode] = rel_err(layer(x, ids, weights), want)
        errors.update(check_layer(layer, problem, rank))
    return errors


@pytest.mark.parametrize("name", ["deepep_normal", "mori"])
def test_a_transport_made_under_inference_mode_serves_later_calls_outside_it(name):
    """The transport is made by a group's first exchange and kept for every later one, with its region: made by a
    first call under torch.inference_mode they were inference tensors, and the next call outside it (no_grad
    serving, a training step) failed storing its rows into the region ("Inplace update to inference tensor outside
    InferenceMode"). Float64 reference, fp32 tolerance (DESIGN.md); random tokens and experts."""
    for errors in run_ranks(_inference_mode_first_rank, 2, name, timeout=240):
        assert max(errors.values()) <= tolerance(torch.float32), errors
