"""mori on gloo ranks: EPMoE == float64 reference; the truncation knob never changes a result;
buffer overflow fails every rank; the receive buffer's padding and counts."""
import pytest
import torch

import ep_runtime as ep
from ep_runtime.dispatchers.rank_exchange import Capacity, RankExchange
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

TOKENS = {1: [13], 2: [17, 0], 4: [9, 0, 23, 4]}  # uneven, rank 1 empty


def _mori_rank(rank, world_size, options, E=16, K=4):
    layer = ep.EPMoE(E, K, 32, 16, dispatcher="mori", runner="torch", dispatcher_options=options)
    problem = make_problem(layer.config, TOKENS[world_size], seed=21 + E, ep_size=world_size)
    errors = check_layer(layer, problem, rank)
    out = layer.dispatcher.dispatch(problem.xs[rank].float(),
                                    ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank]))
    # The receive buffer: real rows first, then padding (id -1) up to N_buf.
    ids = torch.cat(problem.topk_ids).long()
    owner = torch.where(ids >= 0, ids // layer.placement.num_local_experts, -1)
    true_recv = int((owner == rank).any(1).sum())
    n = int(out.num_recv_tokens)
    pad_ok = bool((out.recv_topk_ids[n:] == -1).all()) and out.recv_x.shape[0] == layer.dispatcher.num_buffer_rows
    mine = out.recv_topk_ids[:n].long()
    local_pairs = int(((mine >= layer.placement.first_expert) &
                       (mine < layer.placement.first_expert + layer.placement.num_local_experts)).sum())
    true_pairs = int(((ids >= layer.placement.first_expert) &
                      (ids < layer.placement.first_expert + layer.placement.num_local_experts)).sum())
    return errors, n == true_recv, pad_ok, local_pairs == true_pairs, out.num_runner_rows, n


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("E,K", [(16, 4), (64, 8)])
def test_layer_matches_reference_on_ranks(R, E, K):
    opts = {"max_dispatch_tokens_per_rank": 32}
    results = run_ranks(_mori_rank, R, opts, E, K) if R > 1 else [_mori_rank(0, 1, opts, E, K)]
    for errors, count_ok, pad_ok, pairs_ok, rows, n in results:
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert count_ok and pad_ok and pairs_ok
        assert rows == 32 * R  # knob off: the whole buffer


@pytest.mark.parametrize("n", [1, 5, 20, 200])
def test_truncation_never_changes_results(n):
    # n below, near and above the received counts; eager mode hands the runner max(n, received) rows.
    R = 4
    for errors, _, _, _, rows, received in run_ranks(
            _mori_rank, R, {"max_dispatch_tokens_per_rank": 32, "max_input_tokens": n}):
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert rows == min(32 * R, max(n, received))


def test_static_plan_matches_and_small_knob_is_an_error():
    opts = {"max_dispatch_tokens_per_rank": 32, "static": True}
    results = run_ranks(_mori_rank, 2, opts)
    for errors, count_ok, pad_ok, pairs_ok, rows, _ in results:
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert count_ok and pad_ok and pairs_ok
    most = max(received for *_, received in results)
    # Static plan: the runner gets exactly n rows; n at the largest receive count is fine...
    for errors, *_, rows, _ in run_ranks(_mori_rank, 2, dict(opts, max_input_tokens=most)):
        assert max(errors.values()) <= tolerance(torch.float32) and rows == most, errors
    # ... and one below it is an error naming the argument, its knob and the value needed, on every rank.
    with pytest.raises(ep.testing.RankFailure) as failure:
        run_ranks(_mori_rank, 2, dict(opts, max_input_tokens=most - 1))
    text = str(failure.value)
    assert text.count(f"max_input_tokens / EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS={most - 1} is below the tokens a rank "
                      f"received ({most}); allowed: 0 (off) or >= {most}") == 2


@pytest.mark.parametrize("static", [False, True])
def test_buffer_too_small_fails_every_rank(static):
    opts = {"max_dispatch_tokens_per_rank": 32, "prealloc_max_recv_tokens": 5, "static": static}
    with pytest.raises(ep.testing.RankFailure) as failure:
        run_ranks(_mori_rank, 2, opts)
    assert str(failure.value).count("prealloc_max_recv_tokens / EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS = 5 is too "
                                    "small for this step") == 2
    # what to raise, and to what: the most any rank received
    assert str(failure.value).count("raise prealloc_max_recv_tokens (or EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS) to "
                                    "at least ") == 2


def _capturing_rank(rank, world_size):
    """As under CUDA-graph capture on every rank (nothing read on the host: the device-side assert, which the CPU
    raises at once): every token of both ranks goes to expert 0, so rank 0 receives 8 rows; the buffer holds 5."""
    from ep_runtime.dispatchers import base, mori, rank_exchange
    rank_exchange.capturing = mori.capturing = base.capturing = lambda: True
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="mori", runner="torch",
                     dispatcher_options={"max_dispatch_tokens_per_rank": 4, "prealloc_max_recv_tokens": 5})
    ids = torch.tensor([[0, -1]] * 4, dtype=torch.int32)
    layer(torch.randn(4, 16), ids, torch.ones(4, 2))


def test_a_small_buffer_while_capturing_names_the_buffer_setting(monkeypatch):
    """While capturing, mori's peer chunks cannot overflow (T <= max_dispatch_tokens_per_rank is checked before any
    collective): only the preallocated receive rows can. The device-side assert's message (at most 255 characters
    on CUDA) named max_dispatch_tokens_per_rank first and was cut before prealloc_max_recv_tokens, so it told the
    user to raise a setting that cannot help; it names the buffer's setting, whole (under 255 characters at any
    allowed value), on every rank."""
    with pytest.raises(ep.testing.RankFailure) as failure:
        run_ranks(_capturing_rank, 2, timeout=60)
    text = str(failure.value)
    assert text.count("prealloc_max_recv_tokens / EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS = 5 is too small for this "
                      "step: a rank receives at most 5; raise prealloc_max_recv_tokens (or "
                      "EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS)\n") == 2, text
    assert "raise max_dispatch_tokens_per_rank" not in text
    # the largest buffer the knob allows (on a machine whose memory would hold it): the message still fits
    # CUDA's assert whole
    most = ep.envs.MAX_TOKENS
    monkeypatch.setattr(ep.dispatchers.base, "memory_bound", lambda: (2 ** 62, "host"))
    mori = ep.dispatchers.create("mori", ep.MoeConfig(8, 2, 16, 8), max_dispatch_tokens_per_rank=most,
                                 prealloc_max_recv_tokens=most)
    message = RankExchange._static_message(most, most, mori._capacity, True) + mori._capacity.raise_hint(False)
    assert len(message) < 255 and message.endswith("raise prealloc_max_recv_tokens (or "
                                                   "EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS)"), message


def test_capacity_error_names_the_setting_to_raise_and_the_least_value_that_fits():
    """Without a preallocated buffer mori's receive rows are max_dispatch_tokens_per_rank x R: 9 rows on 2 ranks
    need 5 per rank; the peer chunk and the receive rows may need different settings raised (deepep_normal with
    num_max_dispatch_tokens_per_rank), each named once, with the larger need where they are one setting."""
    mori = Capacity("max_dispatch_tokens_per_rank x R = 8", "max_dispatch_tokens_per_rank", None, 2)
    assert mori.fix(3, 9, 4, 8) == "raise max_dispatch_tokens_per_rank to at least 5"
    assert mori.fix(6, 9, 4, 8) == "raise max_dispatch_tokens_per_rank to at least 6"
    normal = Capacity("num_worst_tokens=20 / num_max_dispatch_tokens_per_rank=4", "num_max_dispatch_tokens_per_rank",
                      "num_worst_tokens")
    assert normal.fix(10, 25, 4, 20) == ("raise num_max_dispatch_tokens_per_rank to at least 10 and raise "
                                         "num_worst_tokens to at least 25")


def test_too_many_tokens_names_the_knob():
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="mori", runner="torch",
                     dispatcher_options={"max_dispatch_tokens_per_rank": 4})
    with pytest.raises(ValueError, match=r"x has 5 tokens on rank 0; mori allows at most max_dispatch_tokens_per_rank=4"
                       r".*; raise max_dispatch_tokens_per_rank \(or EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK\) "
                       r"to at least 5, or dispatch at most 4 tokens per call"):
        layer(torch.randn(5, 16), torch.zeros(5, 2, dtype=torch.int32), torch.ones(5, 2))


def test_knobs_are_read_and_validated(monkeypatch):
    cfg = ep.MoeConfig(8, 2, 16, 8)
    monkeypatch.setenv("EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS", "7")
    monkeypatch.setenv("EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_PER_RANK", "12")
    d = ep.dispatchers.create("mori", cfg)
    assert (d.max_input_tokens, d.num_buffer_rows) == (7, 12)
    monkeypatch.setenv("EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS", "50")
    assert ep.dispatchers.create("mori", cfg).num_buffer_rows == 50
    for bad in ("abc", "-3"):
        monkeypatch.setenv("EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS", bad)
        with pytest.raises(ValueError, match="EP_RUNTIME_MORI_MOE_MAX_INPUT_TOKENS"):
            ep.dispatchers.create("mori", cfg)


def _one_rank_over(rank, world_size):
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="mori", runner="torch",
                     dispatcher_options={"max_dispatch_tokens_per_rank": 4})
    T = 5 if rank == 1 else 2
    ids = torch.stack([torch.arange(T) % 8, (torch.arange(T) + 3) % 8], 1).int()
    layer(torch.randn(T, 16), ids, torch.ones(T, 2))


def test_one_rank_over_capacity_fails_every_rank_at_once():
    # T travels in the count table: rank 0 learns of rank 1's overflow at once (no timeout).
    with pytest.raises(ep.testing.RankFailure) as failure:
        run_ranks(_one_rank_over, 2, timeout=60, group_timeout=300)
    assert str(failure.value).count("x has 5 tokens on rank 1; mori allows at most max_dispatch_tokens_per_rank=4") == 2


def _receiver_view_rank(rank, world_size, options):
    """MoRI's receiver view, from every rank's seeded routing (-1 holes, repeated experts): each token with
    an expert here arrives once, with all K global ids and weights as sent; dispatch_recv_num_token is
    an int32 tensor of shape [1] (MoRI's callers read it as [0]); combine of the received rows
    themselves returns each token times the number of ranks it visited."""
    E, K, H = 8, 3, 16
    L = E // world_size
    d = ep.dispatchers.create("mori", ep.MoeConfig(E, K, H, 8), max_dispatch_tokens_per_rank=16, **options)
    inputs = []
    for r in range(world_size):
        gen = torch.Generator().manual_seed(200 + r)
        T = 6 + 4 * r
        inputs.append((torch.randn(T, H, generator=gen, dtype=torch.float64),
                       torch.randint(-1, E, (T, K), generator=gen), torch.rand(T, K, generator=gen)))
    x, ids, weights = inputs[rank]
    out = d.dispatch(x, ep.TopKOutput(ids, weights))
    count = out.num_recv_tokens
    n = int(count[0])
    rows = [(src_x[t], src_ids[t], src_weights[t]) for src_x, src_ids, src_weights in inputs
            for t in range(src_ids.shape[0]) if bool(((src_ids[t] >= 0) & (src_ids[t] // L == rank)).any())]
    got = sorted(zip(out.recv_x[:n].tolist(), out.recv_topk_ids[:n].tolist(), out.recv_topk_weights[:n].tolist()))
    want = sorted((r[0].tolist(), r[1].tolist(), r[2].tolist()) for r in rows)
    y = d.combine(ep.CombineInput(out.recv_x, out))
    visits = ((ids >= 0).unsqueeze(2) & ((ids // L).unsqueeze(2) == torch.arange(world_size))).any(1).sum(1)
    return (tuple(count.shape), count.dtype, got == want, torch.equal(y, x * visits.unsqueeze(1)))


@pytest.mark.parametrize("static", [False, True])
def test_receiver_sees_mori_rows_and_count(static):
    for result in run_ranks(_receiver_view_rank, 2, {"static": static}):
        assert result == ((1,), torch.int32, True, True)


@pytest.mark.parametrize("static", [1, 0, 1.0, "yes"])
def test_static_must_be_none_or_a_bool(static):
    # 0 and 1 compared equal to False and True, so they passed the check and became the frozen option as they were
    with pytest.raises(ValueError, match=rf"static={static!r}; allowed: None \(static while capturing a CUDA graph\), "
                                         r"True or False"):
        ep.dispatchers.create("mori", ep.MoeConfig(8, 2, 16, 8), static=static)


def _unknown_option_rank(rank, world_size, async_op, with_topk):
    """Rank 0 passes a per-call option mori does not take (deepep_normal's handle=), with topk or, as DeepEP's
    cached dispatch, without it; rank 1 dispatches as usual."""
    d = ep.dispatchers.create("mori", ep.MoeConfig(8, 2, 16, 8), max_dispatch_tokens_per_rank=8)
    gen = torch.Generator().manual_seed(rank)
    x, topk = torch.randn(5, 16, generator=gen), ep.TopKOutput(torch.randint(0, 8, (5, 2), generator=gen),
                                                               torch.rand(5, 2, generator=gen))
    handle = d.dispatch(x, topk).handle
    args, options = ((x, topk) if with_topk or rank else (x,)), ({"handle": handle} if rank == 0 else {})
    try:
        if async_op:
            d.dispatch(*args, async_op=True, **options)[1].wait()
        else:
            d.dispatch(*args, **options)
    except TypeError as err:
        return str(err)
    return "dispatched"


@pytest.mark.parametrize("async_op,with_topk", [(False, True), (True, True), (False, False)])
def test_an_option_mori_does_not_take_fails_every_rank_at_once(async_op, with_topk):
    # raised by _dispatch, rank 0's TypeError left rank 1 in the count table's all_gather until the timeout; and
    # d.dispatch(x, handle=h) raised Python's "missing 1 required positional argument: 'topk'" before any check
    got = run_ranks(_unknown_option_rank, 2, async_op, with_topk, timeout=60, group_timeout=60)
    assert got == ["mori dispatch got handle=ExchangeHandle; allowed per-call options: none (besides async_op, "
                   "return_recv_hook, previous_event)",
                   "mori dispatch: rank 0 of 2 was given bad input (its own error names the argument); no token was sent"]


def test_huge_buffer_knobs_are_refused_before_any_allocation(monkeypatch):
    """A receive buffer larger than the machine's memory is an error naming the setting and the memory, when built."""
    cfg = ep.MoeConfig(8, 2, 4096, 8)  # (H large enough that 2**31 rows exceed any GPU's or host's memory)
    monkeypatch.setenv("EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS", str(2 ** 31 - 1))
    with pytest.raises(ValueError, match=r"prealloc_max_recv_tokens / EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS = "
                                         r"2147483647: its buffers would take at least"):
        ep.dispatchers.create("mori", cfg, max_dispatch_tokens_per_rank=4)
    monkeypatch.setenv("EP_RUNTIME_MORI_PREALLOC_MAX_RECV_TOKENS", "0")
    with pytest.raises(ValueError, match=r"max_dispatch_tokens_per_rank / EP_RUNTIME_MORI_NUM_MAX_DISPATCH_TOKENS_"
                                         r"PER_RANK x R = 2147483647: its buffers"):
        ep.dispatchers.create("mori", cfg, max_dispatch_tokens_per_rank=2 ** 31 - 1)
    assert ep.dispatchers.create("mori", cfg, max_dispatch_tokens_per_rank=8192).num_buffer_rows == 8192
