"""Property tests for every registered dispatcher on CPU gloo ranks (hypothesis).

Hypothesis draws the examples once, in the test process (derandomized, no database, generate phase
only), and every rank gets the same list, so all ranks walk the same example sequence. Four ranks
start once per dispatcher and loop over the examples; each example runs at R = 1, 2 or 4 on
subgroups made once ([r], [0,1]/[2,3], all four), so every rank is busy at every R.

Per example (E = R*L, K, per-rank T >= 0, a -1 density and an id pattern; ids in a row distinct):
- dispatch -> identity experts -> combine returns sum_k w_k * x (slots with -1 add nothing);
- every (token, expert) pair is received exactly once, by the expert's owner (a token's rank and
  index ride in x's first two columns, so each received row says where it came from);
- the counts the dispatcher reports equal the true counts.
A rank records a broken property and goes on (checks are local, so ranks stay in step); the test
fails listing the examples. An exception inside a dispatcher fails the run with its traceback.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ep_runtime as ep
from ep_runtime.testing import run_ranks

NUM_EXAMPLES = 200
WORLD = 4
PATTERNS = ("random", "all_minus_one", "no_minus_one", "token_on_one_rank", "hot_rank", "hot_expert")


@st.composite
def example(draw, dispatcher: str):
    R = draw(st.sampled_from([1, 2, 4]))
    # sampled_from draws evenly; st.integers leans hard on its lower bound (a third of all draws).
    E = R * draw(st.sampled_from(range(1, 7)))
    return dict(
        R=R, E=E, K=draw(st.sampled_from(range(1, min(E, 6) + 1))), H=draw(st.sampled_from(range(2, 10))),
        tokens=draw(st.lists(st.sampled_from([0] * 3 + list(range(1, 21))), min_size=R, max_size=R)),
        pattern=draw(st.sampled_from(PATTERNS)),
        minus_one=draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 0.95])),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        ids_dtype=draw(st.sampled_from(["int32", "int64"])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        # Dispatcher options: capacities at or above what the data needs (slack 0 = exactly at it).
        slack=draw(st.integers(0, 3)),
        static=draw(st.booleans()) if dispatcher in ("deepep_normal", "mori") else False,
        alignment=draw(st.sampled_from([1, 1, 2, 4, 8])) if dispatcher == "deepep_normal" else 1,
        reuse_handle=draw(st.booleans()) if dispatcher == "deepep_normal" else False,
        prealloc=draw(st.booleans()) if dispatcher == "mori" else False,
        max_input_tokens=draw(st.just(0) | st.integers(1, 90)) if dispatcher == "mori" else 0,
    )


def draw_examples(dispatcher: str, n: int = NUM_EXAMPLES) -> list[dict]:
    drawn: list[dict] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(example(dispatcher))
    def collect(ex):
        drawn.append(ex)

    collect()
    return drawn


# ---------------------------------------------------------------- data, identical on every rank

def make_ids(gen: torch.Generator, T: int, ex: dict) -> torch.Tensor:
    """[T, K] global ids, distinct per row, -1 holes, following ex['pattern']."""
    E, K, R = ex["E"], ex["K"], ex["R"]
    L = E // R
    owner = torch.arange(E) // L
    scores = torch.rand(T, E, generator=gen)
    pattern = ex["pattern"]
    allowed = torch.ones(T, E, dtype=torch.bool)
    if pattern == "token_on_one_rank":  # each token's experts on one (random) rank
        allowed = owner[None, :] == torch.randint(0, R, (T, 1), generator=gen)
    elif pattern == "hot_rank":  # every token of every rank goes to rank 0's experts
        allowed = (owner == 0).expand(T, E)
    elif pattern == "hot_expert":  # every token picks expert E-1 first
        scores[:, E - 1] += 2.0
    scores = torch.where(allowed, scores + 1.0, scores - 2.0)
    order = scores.topk(K, dim=1)
    ids = torch.where(order.values > 0, order.indices, -1)  # slots past the allowed experts: -1
    p = {"all_minus_one": 1.0, "no_minus_one": 0.0}.get(pattern, ex["minus_one"])
    holes = torch.rand(T, K, generator=gen) < p
    return torch.where(holes, -1, ids).to(getattr(torch, ex["ids_dtype"]))


def make_inputs(ex: dict, seed: int):
    """Every group rank's (x, ids, weights); x[:, 0] = source rank, x[:, 1] = token index."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, ex["dtype"])
    inputs = []
    for s, T in enumerate(ex["tokens"]):
        x = torch.randn(T, ex["H"], generator=gen, dtype=torch.float64)
        x[:, 0], x[:, 1] = s, torch.arange(T)
        weights = torch.randn(T, ex["K"], generator=gen)
        inputs.append((x.to(dtype), make_ids(gen, T, ex), weights))
    return inputs


def true_pairs(inputs, lo: int, hi: int) -> Counter:
    """(source rank, token, global expert) for every pair whose expert is in [lo, hi)."""
    pairs = Counter()
    for s, (_, ids, _) in enumerate(inputs):
        for t, k in ((ids >= lo) & (ids < hi)).nonzero().tolist():
            pairs[(s, t, int(ids[t, k]))] += 1
    return pairs


def most_received(inputs, R: int, L: int) -> int:
    """The largest number of tokens any rank receives (a token counts once per owning rank)."""
    per_rank = [0] * R
    for _, ids, _ in inputs:
        owner = torch.where(ids >= 0, ids.long() // L, R)
        for d in range(R):
            per_rank[d] += int((owner == d).any(1).sum())
    return max(per_rank)


def build_dispatcher(name: str, ex: dict, inputs, group):
    config = ep.MoeConfig(ex["E"], ex["K"], ex["H"], 4)
    max_T = max(ex["tokens"])
    need = most_received(inputs, ex["R"], ex["E"] // ex["R"])
    options = {}
    if name == "deepep_normal":
        options = dict(alignment=ex["alignment"], num_worst_tokens=max(1, need + ex["slack"]) if ex["static"] else None)
    elif name == "deepep_ll":
        options = dict(num_max_dispatch_tokens_per_rank=max(1, max_T + ex["slack"]))
    elif name == "mori":
        n = ex["max_input_tokens"]
        if ex["static"] and n:
            n = max(n, need)  # a static plan needs n >= the received rows (a smaller n is an error)
        options = dict(max_dispatch_tokens_per_rank=max(1, max_T + ex["slack"]), static=ex["static"],
                       prealloc_max_recv_tokens=need + ex["slack"] if ex["prealloc"] else 0, max_input_tokens=n)
    return ep.dispatchers.create(name, config, group=group, **options)


# ---------------------------------------------------------------- what each format received

def weighted_rows(rows: torch.Tensor, here: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Identity experts: per row, sum over slots `here` of w_k * row."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    w = torch.where(here, weights, 0).to(acc)
    return (w.sum(1, keepdim=True) * rows.to(acc)).to(rows.dtype)


def received(name: str, out, d, inputs, g: int, ex: dict):
    """(combine input rows, received pairs, count problems) for this rank's dispatch output."""
    lo, L = d.placement.first_expert, d.placement.num_local_experts
    problems = []
    if name not in ("standard", "deepep_normal", "deepep_ll", "mori"):
        raise NotImplementedError(f"dispatcher {name!r} (format {d.format!r}) is registered but this test has no "
                                  f"reader for its format: add one to received()")
    if name == "standard":
        x, ids, w = out.hidden_states, out.topk_ids, out.topk_weights
        here = ids >= 0
        pairs = Counter((g, t, int(ids[t, k])) for t, k in here.nonzero().tolist())
        return weighted_rows(x, here, w), pairs, problems
    truth = true_pairs(inputs, lo, lo + L)
    true_counts = [sum(c for (_, _, e), c in truth.items() if e == lo + l) for l in range(L)]
    true_tokens = len({(s, t) for s, t, _ in truth})
    if name == "deepep_ll":
        masked_m = out.masked_m.tolist()
        if masked_m != true_counts:
            problems.append(f"masked_m {masked_m} != true counts {true_counts}")
        M = d.num_max_dispatch_tokens_per_rank
        if tuple(out.recv_x.shape) != (L, M * ex["R"], ex["H"]):
            problems.append(f"recv_x shape {tuple(out.recv_x.shape)} != {(L, M * ex['R'], ex['H'])}")
        pairs = Counter()
        for l, m in enumerate(masked_m):
            for src, tok in out.recv_x[l, :m, :2].double().tolist():
                pairs[(int(src), int(tok), lo + l)] += 1
        return out.recv_x, pairs, problems  # identity experts: the expert rows themselves
    x, ids, w = out.recv_x, out.recv_topk_ids.long(), out.recv_topk_weights
    if name == "deepep_normal":
        here = ids >= 0
        ids = torch.where(here, ids + lo, -1)
        real = here.any(1)
        if out.num_recv_tokens_per_expert_tensor.tolist() != true_counts:
            problems.append(f"num_recv_tokens_per_expert_tensor {out.num_recv_tokens_per_expert_tensor.tolist()} "
                            f"!= {true_counts}")
        listed = [] if ex["static"] else [math.ceil(c / ex["alignment"]) * ex["alignment"] for c in true_counts]
        if out.num_recv_tokens_per_expert != listed:
            problems.append(f"num_recv_tokens_per_expert {out.num_recv_tokens_per_expert} != {listed}")
        if ex["static"] and x.shape[0] != d.num_worst_tokens:
            problems.append(f"static recv_x has {x.shape[0]} rows; num_worst_tokens={d.num_worst_tokens}")
        if int(real.sum()) != true_tokens:
            problems.append(f"{int(real.sum())} real rows; {true_tokens} tokens have an expert here")
    else:  # mori: global ids, rows past num_recv_tokens are padding
        n = int(out.num_recv_tokens)
        if n != true_tokens:
            problems.append(f"num_recv_tokens {n} != {true_tokens}")
        if x.shape[0] != d.num_buffer_rows or bool((ids[n:] != -1).any()):
            problems.append(f"buffer {x.shape[0]} rows (N_buf {d.num_buffer_rows}) or padding ids not -1")
        if not n <= out.num_runner_rows <= d.num_buffer_rows:
            problems.append(f"num_runner_rows {out.num_runner_rows} outside [{n}, {d.num_buffer_rows}]")
        here = (ids >= lo) & (ids < lo + L)
        real = torch.arange(x.shape[0]) < n
        rows = out.num_runner_rows
        x, here, w = x[:rows], here[:rows], w[:rows]
    sources = [(int(s), int(t)) for s, t in out.recv_x[real][:, :2].double().tolist()]
    if len(set(sources)) != len(sources):
        problems.append("a token arrived twice on one rank")
    pairs = Counter()
    for n, k in here.nonzero().tolist():
        pairs[(int(x[n, 0]), int(x[n, 1]), int(ids[n, k]))] += 1
    return weighted_rows(x, here, w), pairs, problems


def _property_rank(rank, world_size, name, examples):
    torch.manual_seed(0)
    groups = {1: [dist.new_group([r]) for r in range(world_size)],
              2: [dist.new_group([0, 1]), dist.new_group([2, 3])],
              4: [dist.group.WORLD]}
    failures = []
    for i, ex in enumerate(examples):
        R = ex["R"]
        g, group_index = rank % R, rank // R
        inputs = make_inputs(ex, ex["seed"] + group_index)  # parallel groups run different data
        x, ids, weights = inputs[g]
        try:
            d = build_dispatcher(name, ex, inputs, groups[R][group_index])
            out = d.dispatch(x, ep.TopKOutput(ids, weights))
            if ex["reuse_handle"]:
                again = d.dispatch(x, ep.TopKOutput(ids, weights), handle=out.handle)
                assert torch.equal(again.recv_x, out.recv_x), "dispatch with the handle differs"
            rows, pairs, problems = received(name, out, d, inputs, g, ex)
            y = d.combine(ep.CombineInput(rows, out))
        except Exception as err:
            raise RuntimeError(f"example {i} (group {group_index}, rank {g}): {ex}") from err
        lo, L = d.placement.first_expert, d.placement.num_local_experts
        truth = (Counter((g, t, int(ids[t, k])) for t, k in (ids >= 0).nonzero().tolist()) if name == "standard"
                 else true_pairs(inputs, lo, lo + L))
        if pairs != truth:
            problems.append(f"received pairs differ: missing {sorted((truth - pairs).elements())[:5]}, "
                            f"extra {sorted((pairs - truth).elements())[:5]}")
        expected = (torch.where(ids >= 0, weights, 0).double().sum(1, keepdim=True) * x.double())
        tol = 1e-12 if x.dtype == torch.float64 else 1e-5
        if y.shape != x.shape or y.dtype != x.dtype:
            problems.append(f"y {list(y.shape)} {y.dtype}; expected {list(x.shape)} {x.dtype}")
        elif not torch.allclose(y.double(), expected, rtol=tol, atol=tol):
            problems.append(f"combine != sum_k w_k x: max abs err {float((y.double() - expected).abs().max()):.3g}")
        if problems:
            failures.append((i, group_index, g, ex, problems))
    return len(examples), failures


@pytest.mark.parametrize("name", ep.dispatchers.registered())
def test_dispatch_identity_combine_properties(name):
    examples = draw_examples(name)
    assert len(examples) >= NUM_EXAMPLES
    results = run_ranks(_property_rank, WORLD, name, examples, timeout=240, group_timeout=60)
    failures = [f for _, rank_failures in results for f in rank_failures]
    assert all(count == len(examples) for count, _ in results)
    assert not failures, "\n".join(f"example {i} group {gi} rank {g}: {problems}\n  {ex}"
                                   for i, gi, g, ex, problems in failures[:8])
