"""Acceptance tests written from DESIGN.md and docs/ alone, driving only the public API (ep.EPMoE, ep.TopKConfig,
ep.dispatchers.create) on 1, 2 and 4 gloo ranks, against a float64 reference written here from the formula
y_t = sum_k w_tk * w2_e @ (act(gate_e @ x_t) * (up_e @ x_t)) (slots with id -1 add nothing).

What the other suites leave out: every dispatcher x runner (auto included) x dtype (fp32, bf16, fp64) at R = 4,
the experts' gradients against the sum over every rank's tokens, ranks that differ in T (0 too), in ids' and
weights' dtypes, in which of x / topk_weights need gradients and in x's strides; K = 1, K = E, E = R, duplicate
ids; routing through TopKConfig (groups, sigmoid with a correction bias, renormalize, scaling) with the router
logits' gradients; counts with repeated experts; and bad input on one rank of four failing every rank."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

import ep_runtime as ep
from ep_runtime.testing import run_ranks

DISPATCHERS = ["standard", "deepep_normal", "deepep_ll", "mori"]
RUNNERS = ["torch", "triton", "masked", "auto"]
CAP = 16  # deepep_ll's M and mori's max tokens per rank
OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": CAP}, "mori": {"max_dispatch_tokens_per_rank": CAP}}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}


# ---------------------------------------------------------------- the reference (float64, from DESIGN.md)

def ref_expert(x, w13, w2, act="silu"):
    """One gated expert on rows x [n, H]: w2 @ (act(gate @ x) * (up @ x)), w13 = [gate; up]."""
    inter = w13.shape[0] // 2
    h = x @ w13.t()
    gate, up = h[:, :inter], h[:, inter:]
    a = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[act](gate)
    return (a * up) @ w2.t()


def ref_moe(x, ids, w, W13, W2, scale=1.0):
    """y_t = scale * sum_k w_tk expert_{id_tk}(x_t); id -1 adds nothing. Differentiable in x, w, W13, W2."""
    y = x.new_zeros(x.shape)
    for k in range(ids.shape[1]):
        for e in range(W13.shape[0]):
            hit = (ids[:, k] == e).to(x.dtype)[:, None]
            y = y + hit * w[:, k:k + 1] * ref_expert(x, W13[e], W2[e])
    return y * scale


def ref_route(logits, cfg, bias=None):
    """TopKConfig's routing as docs/routing.md and its docstring describe it, in float64."""
    scores = torch.softmax(logits, -1) if cfg.scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias
    T, E = logits.shape
    if cfg.num_expert_group:
        G = cfg.num_expert_group
        rule = cfg.group_score or ("top2_sum" if bias is not None and E // G >= 2 else "max")
        grouped = choice.detach().view(T, G, E // G)
        gscore = grouped.max(-1).values if rule == "max" else grouped.topk(2, -1).values.sum(-1)
        keep = torch.zeros(T, G, dtype=torch.bool)
        keep.scatter_(1, gscore.sort(dim=-1, descending=True, stable=True).indices[:, :cfg.topk_group], True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, 1), -math.inf)
    # best first, an exact tie to the lower id: a stable descending sort
    ids = choice.detach().sort(dim=-1, descending=True, stable=True).indices[:, :cfg.top_k]
    w = scores.gather(1, ids)
    if cfg.renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * cfg.routed_scaling_factor


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0 or b.norm() == 0:
        return float((a - b).norm())
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- problems every rank can rebuild

def problem(R, E, K, H, I, tokens, pattern, seed):
    """Global experts and every rank's (x, ids, weights, cotangent), all float64, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    W13 = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) / H ** 0.5
    W2 = torch.randn(E, H, I, generator=g, dtype=torch.float64) / I ** 0.5
    ranks = []
    for r in range(R):
        T = tokens[r]
        x = torch.randn(T, H, generator=g, dtype=torch.float64)
        ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]  # distinct experts per token
        if pattern == "minus_one":
            ids[torch.rand(T, K, generator=g) < 0.3] = -1
        elif pattern == "all_minus_one" or (pattern == "rank_minus_one" and r == R - 1):
            ids[:] = -1
        elif pattern == "hot":  # every token of every rank lists expert 0 (and another): its rows fill M * R
            ids[:, 0] = 0
            ids[:, 1:] = 1 + torch.rand(T, E - 1, generator=g).argsort(1)[:, :K - 1]
        elif pattern == "duplicates" and K > 1:
            ids[::2, 1] = ids[::2, 0]  # every other token lists one expert twice
            ids[1::3, -1] = -1
        w = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
        if pattern == "negative_weights":  # nothing says router weights are positive
            w = torch.randn(T, K, generator=g, dtype=torch.float64)
        dy = torch.randn(T, H, generator=g, dtype=torch.float64)
        if r >= 2:  # one row repeated: that rank hands backward an expanded (stride 0) view of it
            dy[:] = dy[:1].clone() if T else dy
        ranks.append((x, ids, w, dy))
    return W13, W2, ranks


def reference_grads(R, W13, W2, ranks, rank, sharded):
    """y and the gradients of x, weights and experts of the loss sum_r <y_r, dy_r> (what backward on every rank
    of y_r with grad dy_r computes). Sharded experts gather every rank's tokens; replicated ones (standard) see
    this rank's own."""
    W13 = W13.clone().requires_grad_(True)
    W2 = W2.clone().requires_grad_(True)
    out = {}
    total = 0
    for r, (x, ids, w, dy) in enumerate(ranks):
        if not sharded and r != rank:
            continue
        x = x.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        y = ref_moe(x, ids, w, W13, W2)
        total = total + (y * dy).sum()
        if r == rank:
            out["y"], out["x"], out["w"] = y, x, w
    total.backward()
    return out["y"].detach(), out["x"].grad, out["w"].grad, W13.grad, W2.grad


# ---------------------------------------------------------------- the matrix

IDS_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int64]
W_DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16]
NEEDS_GRAD = [(True, True), (True, False), (False, True), (False, False)]  # (x, topk_weights) per rank


def _as_x(x, dtype, style):
    """x in `dtype` laid out three ways: contiguous, a transposed view, a strided slice of a wider tensor."""
    if style == 0:
        return x.to(dtype, copy=True)
    if style == 1:
        return x.t().contiguous().to(dtype).t()
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=dtype)
    wide[:, 1::2] = x.to(dtype)
    return wide[:, 1::2]


def _matrix_rank(rank, R, dispatcher, case, dtypes, runners):
    E, K, H, I, tokens, pattern = case
    sharded = ep.dispatchers.get(dispatcher).shards_experts
    W13, W2, ranks = problem(R, E, K, H, I, tokens, pattern, seed=17)
    ry, rdx, rdw, rdW13, rdW2 = reference_grads(R, W13, W2, ranks, rank, sharded)
    x64, ids64, w64, dy64 = ranks[rank]
    results = {}
    for dtype in dtypes:
        for n, runner in enumerate(runners):
            key = f"{dtype} {runner}"
            try:
                layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dtype=dtype,
                                 dispatcher_options=OPTIONS.get(dispatcher))
            except (TypeError, ValueError) as e:  # a runner may refuse a dtype at construction, naming it
                results[key] = ("refused", f"{type(e).__name__}: {e}")
                continue
            layer.load_experts(W13.to(dtype), W2.to(dtype))
            # Each rank (and each runner) takes other ids/weights dtypes, strides and gradient needs.
            pick = (rank + n) % 4
            x = _as_x(x64, dtype, pick % 3)
            x_grad, w_grad = NEEDS_GRAD[pick]
            if x_grad:
                x.requires_grad_(True)
            wdtype = W_DTYPES[pick] if dtype != torch.float64 else torch.float64
            w = w64.to(wdtype, copy=True).requires_grad_(w_grad)
            ids = ids64.to(IDS_DTYPES[pick])
            y = layer(x, ids, w)
            assert y.shape == x.shape and y.dtype == dtype, (key, y.shape, y.dtype)
            # y's gradient as a contiguous tensor, a transposed view or a stride-0 expansion (as y.sum() gives)
            dy = dy64.to(dtype)
            if rank == 1:
                dy = dy.t().contiguous().t()
            elif rank >= 2 and dy.shape[0]:
                dy = dy[:1].expand(dy.shape)
            y.backward(dy)
            # The reference on the values the layer was actually given (rounded to their dtypes).
            W13r, W2r = W13.to(dtype).double(), W2.to(dtype).double()
            pr = [(xx.to(dtype).double(), ii, (ww.to(wdtype).double() if r == rank else ww.to(W_DTYPES[(r + n) % 4]
                   if dtype != torch.float64 else torch.float64).double()), dd.to(dtype).double())
                  for r, (xx, ii, ww, dd) in enumerate(ranks)]
            ry, rdx, rdw, rdW13, rdW2 = reference_grads(R, W13r, W2r, pr, rank, sharded)
            tol = TOL[dtype]
            L = layer.w13.shape[0]
            lo = rank * L if sharded else 0
            errs = {"y": rel(y, ry), "dW13": rel(layer.w13.grad, rdW13[lo:lo + L]),
                    "dW2": rel(layer.w2.grad, rdW2[lo:lo + L])}
            if x_grad:
                errs["dx"] = rel(x.grad, rdx)
            if w_grad:
                assert w.grad is not None and w.grad.dtype == wdtype, (key, None if w.grad is None else w.grad.dtype)
                errs["dw"] = rel(w.grad, rdw)
                # -1 slots get no gradient
                assert torch.all(w.grad[ids64 < 0] == 0), key
                tol = max(tol, TOL[wdtype])
            results[key] = ("ran", errs, tol)
    return results


def _in_one_job(rank, R, fn, cases):
    """[fn(rank, R, *case) for each case] in one group of R processes: a spawn of R ranks costs ~1 s on a 2-core
    CI machine, more than most cases; every case leaves the group usable for the next."""
    return [fn(rank, R, *case) for case in cases]


def _check(results):
    """Every run within its tolerance; returns the refusals other than the kernel runners' float64, which
    they refuse at construction naming the dtype, what they compute in and runner='torch'."""
    bad, refused = [], []
    for rank, per in enumerate(results):
        for key, res in per.items():
            if res[0] == "refused":
                if not (key.split()[1] in ("triton", "masked") and key.startswith("torch.float64")
                        and "dtype=torch.float64" in res[1] and "torch.float32" in res[1]
                        and "runner='torch'" in res[1]):
                    refused.append((rank, key, res[1]))
                continue
            _, errs, tol = res
            over = {k: v for k, v in errs.items() if not v <= tol}
            if over:
                bad.append((rank, key, over, tol))
    assert not bad, bad
    return refused


# (E, K, H, I, tokens at R = 4 (prefix for fewer ranks), id pattern)
CASES = {
    "uneven_T_minus_one": (8, 2, 16, 8, [5, 7, 0, 3], "minus_one"),
    "K1": (8, 1, 16, 8, [4, 0, 6, 2], "minus_one"),
    "K_equals_E": (4, 4, 16, 8, [3, 5, 2, 0], "minus_one"),
    "duplicates": (8, 3, 16, 8, [6, 4, 5, 3], "duplicates"),
    "one_rank_all_minus_one": (8, 2, 16, 8, [4, 5, 3, 6], "rank_minus_one"),
    "all_minus_one": (8, 2, 16, 8, [3, 0, 2, 4], "all_minus_one"),
    "T0_on_rank0": (8, 2, 16, 8, [0, 5, 3, 4], "minus_one"),
    "T0_everywhere": (8, 2, 16, 8, [0, 0, 0, 0], "minus_one"),
    "negative_weights": (8, 3, 16, 8, [4, 6, 3, 5], "negative_weights"),
    "capacity_full_hot_expert": (8, 2, 16, 8, [CAP] * 4, "hot"),
}


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_every_runner_and_dtype_matches_the_float64_reference(dispatcher, R):
    """Every runner (auto too) x fp32 / bf16 / fp16 / fp64, forward and every gradient, on awkward but valid
    input."""
    case = CASES["uneven_T_minus_one"]
    refused = _check(run_ranks(_matrix_rank, R, dispatcher, case,
                               [torch.float32, torch.bfloat16, torch.float16, torch.float64], RUNNERS, timeout=600))
    assert not refused, refused


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_awkward_routing_at_four_ranks(dispatcher):
    names = [n for n in CASES if n != "uneven_T_minus_one"]
    cases = [(dispatcher, CASES[name], [torch.float32], ["torch", "triton", "masked"]) for name in names]
    per_rank = run_ranks(_in_one_job, 4, _matrix_rank, cases, timeout=900)
    for i, name in enumerate(names):
        refused = _check([results[i] for results in per_rank])
        assert not refused, (name, refused)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_one_expert_per_rank(dispatcher, R):
    """E = R (L = 1): K = 1 and, where R > 1, K = 2."""
    for K in sorted({1, min(2, R)}):
        case = (R, K, 16, 8, [3, 4, 0, 5], "minus_one")
        refused = _check(run_ranks(_matrix_rank, R, dispatcher, case, [torch.float32], ["torch", "masked"],
                                   timeout=600))
        assert not refused, refused


# ---------------------------------------------------------------- routing inside the layer (TopKConfig)

ROUTINGS = {
    "softmax_renormalize": (8, dict(top_k=2, renormalize=True), False, 1.0),
    "softmax_groups_max": (8, dict(top_k=3, num_expert_group=4, topk_group=2), False, 1.0),
    "deepseek_v3": (8, dict(top_k=3, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                            routed_scaling_factor=2.5, group_score="top2_sum"), True, 1.0),
    "sigmoid_bias_groups_default_rule": (8, dict(top_k=3, scoring="sigmoid", num_expert_group=4, topk_group=2),
                                         True, 1.0),
    "sigmoid_K1_layer_scaling": (4, dict(top_k=1, scoring="sigmoid"), True, 1.5),
    "softmax_K_equals_E": (4, dict(top_k=4), False, 1.0),
    # routing.md: a logit of -inf is an expert the token may not take (weight 0, picked after every finite one)
    "softmax_minus_inf_logits": (8, dict(top_k=3, renormalize=True, num_expert_group=4, topk_group=3), False, 1.0),
    "sigmoid_minus_inf_logits": (8, dict(top_k=2, scoring="sigmoid"), False, 1.0),
    # exact ties (a zero-initialised router): the lower expert id, between groups the lower group
    "ties": (8, dict(top_k=3, num_expert_group=4, topk_group=2), False, 1.0),
}


def _routing_rank(rank, R, dispatcher, runner, name, dtype):
    E, kw, with_bias, layer_scale = ROUTINGS[name]
    cfg = ep.TopKConfig(**kw)
    K, H, I = cfg.top_k, 16, 8
    sharded = ep.dispatchers.get(dispatcher).shards_experts
    tokens = [6, 0, 5, 4][:R] if R > 1 else [6]
    g = torch.Generator().manual_seed(5)
    W13 = torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) / H ** 0.5
    W2 = torch.randn(E, H, I, generator=g, dtype=torch.float64) / I ** 0.5
    bias = (torch.randn(E, generator=g, dtype=torch.float64) * 0.5).to(dtype) if with_bias else None
    data = [(torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype),
             (torch.randn(T, E, generator=g, dtype=torch.float64) * 2).to(dtype),
             torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)) for T in tokens]
    for _, logits, _ in data:
        if "minus_inf" in name:  # two or three experts per token barred (never a whole row, never a whole group)
            logits[:, 1::4] = -math.inf
            logits[::2, 2] = -math.inf
        elif name == "ties":
            logits[:] = 0.5
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dtype=dtype, topk_config=cfg,
                     routed_scaling_factor=layer_scale, dispatcher_options=OPTIONS.get(dispatcher))
    layer.load_experts(W13.to(dtype), W2.to(dtype))
    x, logits, dy = (t.clone() for t in data[rank])
    x.requires_grad_(True)
    logits.requires_grad_(True)
    y = layer(x, router_logits=logits, correction_bias=bias)
    y.backward(dy)
    # Reference: float64 routing and experts on the same (rounded) values.
    W13r = W13.to(dtype).double().requires_grad_(True)
    W2r = W2.to(dtype).double().requires_grad_(True)
    total, mine = 0, None
    for r, (xr, lr, dyr) in enumerate(data):
        if not sharded and r != rank:
            continue
        xr, lr = xr.double().requires_grad_(True), lr.double().requires_grad_(True)
        ids, w = ref_route(lr, cfg, None if bias is None else bias.double())
        yr = ref_moe(xr, ids, w, W13r, W2r, scale=layer_scale)
        total = total + (yr * dyr.double()).sum()
        if r == rank:
            mine = (yr, xr, lr)
    total.backward()
    yr, xr, lr = mine
    L = layer.w13.shape[0]
    lo = rank * L if sharded else 0
    return {"y": rel(y, yr), "dx": rel(x.grad, xr.grad), "dlogits": rel(logits.grad, lr.grad),
            "dW13": rel(layer.w13.grad, W13r.grad[lo:lo + L]), "dW2": rel(layer.w2.grad, W2r.grad[lo:lo + L])}


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_router_logits_through_topk_config_at_four_ranks(dispatcher):
    """y and the gradients of x, the router logits and the experts through TopKConfig routing (groups, sigmoid
    with a correction bias, renormalize, both scaling factors), one rank without tokens."""
    runs = (("torch", torch.float32), ("triton", torch.float32), ("masked", torch.bfloat16), ("torch", torch.float64))
    for R in sorted({min(4, spec[0]) for spec in ROUTINGS.values()}):  # one group per rank count
        cases = [(dispatcher, runner, name, dtype) for name in ROUTINGS if min(4, ROUTINGS[name][0]) == R
                 for runner, dtype in runs]
        for per in run_ranks(_in_one_job, R, _routing_rank, cases, timeout=900):
            for (_, runner, name, dtype), errors in zip(cases, per):
                assert max(errors.values()) <= TOL[dtype], (name, runner, dtype, errors)


# ---------------------------------------------------------------- counts with repeated experts

def _counts_rank(rank, R, dispatcher):
    E, K, H = 8, 3, 4
    L = E // R
    layer = ep.EPMoE(E, K, H, 8, dispatcher=dispatcher, runner="torch",
                     dispatcher_options={**OPTIONS.get(dispatcher, {}),
                                         **({"alignment": 1} if dispatcher == "deepep_normal" else {})})
    tokens = [5, 0, 7, 3]
    g = torch.Generator().manual_seed(11)
    every = []
    for T in tokens:
        ids = torch.randint(-1, E, (T, K), generator=g)
        ids[::2, 2] = ids[::2, 0]  # repeats (also of -1)
        every.append((torch.randn(T, H, generator=g), ids, torch.rand(T, K, generator=g)))
    x, ids, w = every[rank]
    d = layer.dispatcher
    out = d.dispatch(x, ep.TopKOutput(ids, w))
    mine = range(rank * L, (rank + 1) * L)
    pairs = [sum(int((i == e).sum()) for _, i, _ in every) for e in mine]  # slots, repeats counted twice
    rows = [sum(int((i == e).any(1).sum()) for _, i, _ in every) for e in mine]  # tokens listing e
    tokens_here = sum(int(((i >= rank * L) & (i < (rank + 1) * L)).any(1).sum()) for _, i, _ in every)
    got = {}
    if dispatcher == "deepep_normal":
        got["list"] = (list(out.num_recv_tokens_per_expert), pairs)
        got["tensor"] = (out.num_recv_tokens_per_expert_tensor.tolist(), pairs)
        got["N_recv"] = (out.recv_x.shape[0], tokens_here)
        lay = d.get_dispatch_layout(ids)
        got["per_expert"] = (lay.num_tokens_per_expert.tolist(), [int((ids == e).sum()) for e in range(E)])
        got["per_rank"] = (lay.num_tokens_per_rank.tolist(),
                           [int(((ids >= r * L) & (ids < (r + 1) * L)).any(1).sum()) for r in range(R)])
    elif dispatcher == "deepep_ll":
        got["masked_m"] = (out.masked_m.tolist(), rows)
    elif dispatcher == "mori":
        got["num_recv_tokens"] = (int(out.num_recv_tokens[0]), tokens_here)
    # and the round trip still gives the reference
    experts = layer.gather_experts()
    y = d.combine(layer.runner.run(out, layer.weights))
    want = ref_moe(x.double(), ids, w.double(), experts.w13.double(), experts.w2.double())
    got["y"] = (rel(y, want) <= 1e-5, True)
    return got


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_reported_counts_with_repeated_experts_at_four_ranks(dispatcher):
    """formats.md: num_recv_tokens_per_expert counts pairs (a repeated expert twice), masked_m rows (once),
    mori's num_recv_tokens tokens (once per owning rank)."""
    for rank, got in enumerate(run_ranks(_counts_rank, 4, dispatcher, timeout=300)):
        for key, (have, want) in got.items():
            assert have == want, (rank, key, have, want)


# ---------------------------------------------------------------- bad input on one rank of four

BAD_CASES = {  # name: (what the bad rank's message must hold)
    "id_equal_E": ["topk_ids", "8", "-1"],
    "id_below_minus_one": ["topk_ids", "-2", "-1"],
    "id_wraps_in_int32": ["topk_ids", str(2 ** 32 + 3), "-1"],  # int64 that a cast to int32 would make 3
    "nan_weight": ["topk_weights", "nan"],
    "inf_weight": ["topk_weights", "inf"],
    "wrong_hidden": ["x", "17", "16"],
    "ids_wider_than_K": ["topk_ids", "3", "2"],
    "float_ids": ["topk_ids", "float32"],
    "integer_weights": ["topk_weights", "int64"],
    "x_fp16_in_fp32_layer": ["x", "float16", "float32"],
    "too_many_tokens": ["17", "16"],
    "logits_wrong_E": ["router_logits", "9", "8"],
    "nan_logit": ["router_logits", "[1, 3]"],
    "bias_wrong_shape": ["correction_bias", "9", "8"],
    "bias_nan": ["correction_bias", "nan"],
    "plus_inf_logit_softmax": ["router_logits", "[2, 6]"],
    "row_of_minus_inf_softmax": ["router_logits", "row 4", "-inf"],
    "weights_missing": ["topk_weights"],
    "ids_and_logits": ["router_logits", "topk_ids"],
}
ROUTED = ep.TopKConfig(top_k=2, scoring="sigmoid", renormalize=True)


def _bad_input_rank(rank, R, dispatcher, case, bad_rank):
    E, K, H, I = 8, 2, 16, 8
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher),
                     topk_config=ep.TopKConfig(top_k=2) if case.endswith("softmax") else ROUTED)
    g = torch.Generator().manual_seed(rank)
    T = 0 if (bad_rank != 2 and rank == 2) else 5  # with the bad rank elsewhere, rank 2 has no tokens
    routed = "logit" in case or "bias" in case or "minus_inf" in case
    logits, bias = torch.randn(T, E, generator=g), torch.randn(E, generator=g)
    x, ids, w = torch.randn(T, H, generator=g), torch.randint(0, E, (T, K), generator=g), torch.rand(T, K)
    if rank == bad_rank:
        if case == "id_equal_E":
            ids[3, 1] = E
        elif case == "id_below_minus_one":
            ids[2, 0] = -2
        elif case == "id_wraps_in_int32":
            ids[0, 0] = 2 ** 32 + 3
        elif case == "nan_weight":
            w[1, 1] = float("nan")
        elif case == "inf_weight":
            w[4, 0] = float("inf")
        elif case == "wrong_hidden":
            x = torch.randn(T, H + 1)
        elif case == "ids_wider_than_K":
            ids, w = torch.randint(0, E, (T, K + 1)), torch.rand(T, K + 1)
        elif case == "float_ids":
            ids = ids.float()
        elif case == "integer_weights":
            w = torch.ones(T, K, dtype=torch.int64)
        elif case == "x_fp16_in_fp32_layer":
            x = x.half()
        elif case == "too_many_tokens":
            x, ids, w = torch.randn(CAP + 1, H), torch.randint(0, E, (CAP + 1, K)), torch.rand(CAP + 1, K)
        elif case == "logits_wrong_E":
            logits = torch.randn(T, E + 1)
        elif case == "nan_logit":
            logits[1, 3] = float("nan")
        elif case == "bias_wrong_shape":
            bias = torch.randn(E + 1)
        elif case == "bias_nan":
            bias[5] = float("nan")
        elif case == "plus_inf_logit_softmax":
            logits[2, 6] = math.inf
        elif case == "row_of_minus_inf_softmax":
            logits[4] = -math.inf
        elif case == "weights_missing":
            w = None
    start = time.monotonic()
    try:
        if case == "ids_and_logits" and rank == bad_rank:
            layer(x, ids, w, router_logits=logits)
        elif routed:
            layer(x, router_logits=logits, correction_bias=None if case.endswith("softmax") else bias)
        else:
            layer(x, ids, w)
        outcome = None
    except Exception as e:  # every rank must get here, fast
        outcome = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - start
    # the group stays usable: a good step afterwards on every rank
    x, ids, w = torch.randn(T, H, generator=g), torch.randint(-1, E, (T, K), generator=g), torch.rand(T, K)
    y = layer(x, ids, w)
    experts = layer.gather_experts()
    good = rel(y, ref_moe(x.double(), ids, w.double(), experts.w13.double(), experts.w2.double()))
    return outcome, seconds, good


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_bad_input_on_one_rank_of_four_fails_every_rank_naming_it(dispatcher):
    # (deepep_normal has no per-rank token capacity)
    _bad_input_everywhere(dispatcher, [(case, 2) for case in BAD_CASES
                                       if not (case == "too_many_tokens" and dispatcher == "deepep_normal")])


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_bad_input_on_the_first_or_last_rank_with_an_empty_rank(dispatcher):
    _bad_input_everywhere(dispatcher, [(case, bad_rank) for case in ("id_equal_E", "wrong_hidden", "bias_nan",
                                                                     "float_ids") for bad_rank in (0, 3)])


def _bad_input_everywhere(dispatcher, cases):
    """Each (case, bad rank) in turn on one group of four ranks (each leaves it usable: a good step follows)."""
    per_rank = run_ranks(_in_one_job, 4, _bad_input_rank, [(dispatcher, case, bad) for case, bad in cases],
                         timeout=600, group_timeout=30)
    for rank, results in enumerate(per_rank):
        for (case, bad_rank), (outcome, seconds, good) in zip(cases, results):
            assert outcome is not None, (case, rank, "no error")
            assert seconds < 10, (case, rank, seconds, outcome)  # not the group's timeout
            assert good <= 1e-5, (case, rank, good)
            if rank == bad_rank:
                for word in BAD_CASES[case]:
                    assert word in outcome, (case, word, outcome)
            else:
                assert f"rank {bad_rank}" in outcome, (case, rank, outcome)


# ---------------------------------------------------------------- settings that cannot work

def _bad_settings_rank(rank, R, dispatcher, name, runner="torch"):
    try:
        kwargs = SETTINGS[name][0]()
        ep.EPMoE(**{"num_experts": 8, "top_k": 2, "hidden_size": 16, "intermediate_size": 8, "runner": runner,
                    "dispatcher": dispatcher, "dispatcher_options": OPTIONS.get(dispatcher), **kwargs})
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


SETTINGS = {  # name: (EPMoE arguments, made on the rank; what every rank's message must hold)
    "E_not_divisible_by_R": (lambda: dict(num_experts=6), ["num_experts", "6", "4"]),
    "top_k_above_E": (lambda: dict(top_k=9), ["top_k", "9", "8"]),
    "groups_not_dividing_E": (lambda: dict(topk_config=ep.TopKConfig(top_k=2, num_expert_group=3, topk_group=1)),
                              ["num_expert_group", "3", "8"]),
    "topk_group_above_groups": (lambda: dict(topk_config=ep.TopKConfig(top_k=2, num_expert_group=4, topk_group=5)),
                                ["topk_group", "5", "4"]),
    "groups_too_few_for_K": (lambda: dict(top_k=4, topk_config=ep.TopKConfig(top_k=4, num_expert_group=4,
                                                                             topk_group=1)), ["topk_group", "4"]),
    "topk_config_K_differs": (lambda: dict(topk_config=ep.TopKConfig(top_k=3)), ["top_k", "3", "2"]),
    "alpha_with_gelu": (lambda: dict(activation="gelu", gemm1_alpha=1.702), ["gemm1_alpha", "gelu", "silu"]),
    "alpha_not_gated": (lambda: dict(is_gated=False, gemm1_alpha=1.702), ["gemm1_alpha", "is_gated"]),
    "unknown_activation": (lambda: dict(activation="relu"), ["activation", "relu", "silu"]),
    "scaling_zero": (lambda: dict(routed_scaling_factor=0.0), ["routed_scaling_factor", "0"]),
    "scaling_nan": (lambda: dict(routed_scaling_factor=math.nan), ["routed_scaling_factor", "nan"]),
    "topk_scaling_negative": (lambda: dict(topk_config=ep.TopKConfig(top_k=2, routed_scaling_factor=-1.0)),
                              ["routed_scaling_factor", "-1"]),
    "top_k_zero": (lambda: dict(top_k=0), ["top_k", "0"]),
    "hidden_zero": (lambda: dict(hidden_size=0), ["hidden_size", "0"]),
    "integer_dtype": (lambda: dict(dtype=torch.int32), ["dtype", "int32"]),
    "expert_to_rank_out_of_range": (lambda: dict(expert_to_rank=[0, 1, 2, 4, 0, 1, 2, 3]),
                                    ["expert_to_rank", "4"]),
    "expert_to_rank_uneven": (lambda: dict(expert_to_rank=[0, 0, 0, 1, 1, 2, 2, 3]), ["expert_to_rank"]),
    "negative_redundant": (lambda: dict(num_redundant_experts=-4), ["num_redundant_experts", "-4"]),
}


CONFIG_FIELDS = ("alpha_with_gelu", "alpha_not_gated", "unknown_activation", "scaling_zero", "scaling_nan")


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_settings_that_cannot_work_fail_every_rank_naming_them(dispatcher):
    """DESIGN.md: every runner supports every config field or rejects it at construction, naming it. (standard
    holds every expert on every rank: no placement settings there.)"""
    placement = ("E_not_divisible_by_R", "expert_to_rank_out_of_range", "expert_to_rank_uneven", "negative_redundant")
    cases = [(dispatcher, name, runner) for name in SETTINGS
             for runner in (("torch", "triton", "masked") if name in CONFIG_FIELDS else ("torch",))
             if ep.dispatchers.get(dispatcher).shards_experts or name not in placement]
    for rank, messages in enumerate(run_ranks(_in_one_job, 4, _bad_settings_rank, cases, timeout=600,
                                              group_timeout=30)):
        for (_, name, runner), message in zip(cases, messages):
            assert message is not None, (rank, name, runner)
            for word in SETTINGS[name][1]:
                assert word in message, (rank, name, runner, word, message)


# ---------------------------------------------------------------- config fields, inference, placements, x [..., H]

def ref_expert_cfg(x, w13, w2, b13, b2, kw):
    """MoeConfig's docstring: gated (gate; up) or not, an activation, gpt-oss's alpha / clamp, biases."""
    h = x @ w13.t() + (b13 if b13 is not None else 0)
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[
        kw.get("activation", "silu")]
    limit, alpha = kw.get("gemm1_clamp_limit"), kw.get("gemm1_alpha")
    if kw.get("is_gated", True):
        inter = w13.shape[0] // 2
        gate, up = h[:, :inter], h[:, inter:]
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        a = gate * torch.sigmoid(alpha * gate) * (up + 1) if alpha is not None else act(gate) * up
    else:
        a = act(h)
    return a @ w2.t() + (b2 if b2 is not None else 0)


def ref_moe_cfg(x, ids, w, ex, kw):
    on_input = kw.get("apply_router_weight_on_input", False)
    y = x.new_zeros(x.shape)
    for k in range(ids.shape[1]):
        for e in range(ex["w13"].shape[0]):
            hit = (ids[:, k] == e).to(x.dtype)[:, None]
            b13, b2 = (ex["b13"][e], ex["b2"][e]) if "b13" in ex else (None, None)
            wk = w[:, k:k + 1]
            out = (ref_expert_cfg(wk * x, ex["w13"][e], ex["w2"][e], b13, b2, kw) if on_input
                   else wk * ref_expert_cfg(x, ex["w13"][e], ex["w2"][e], b13, b2, kw))
            y = y + hit * out
    return y * kw.get("routed_scaling_factor", 1.0)


VARIANTS = {  # name: (E, K, EPMoE keyword arguments)
    "gelu_not_gated": (8, 2, dict(activation="gelu", is_gated=False)),
    "gpt_oss_swiglu_biases": (8, 2, dict(has_bias=True, gemm1_alpha=1.702, gemm1_clamp_limit=0.5)),
    "clamp_gelu_tanh_scaled": (8, 3, dict(activation="gelu_tanh", gemm1_clamp_limit=0.4, routed_scaling_factor=2.0)),
    "weight_on_input_K1": (8, 1, dict(apply_router_weight_on_input=True)),
    "weight_on_input_K2": (8, 2, dict(apply_router_weight_on_input=True, has_bias=True)),
    "placement_scattered": (8, 2, dict(expert_to_rank=[3, 1, 0, 2, 2, 0, 1, 3])),
    "redundant_experts": (8, 2, dict(num_redundant_experts=4)),
}


def _variant_rank(rank, R, dispatcher, name, runners, dtype, mode, options=None):
    E, K, kw = VARIANTS[name]
    H, I = 16, 8
    tokens = [5, 7, 0, 3][:R] if R > 1 else [5]
    g = torch.Generator().manual_seed(23)
    inter = 2 * I if kw.get("is_gated", True) else I
    ex = {"w13": torch.randn(E, inter, H, generator=g, dtype=torch.float64) / H ** 0.5,
          "w2": torch.randn(E, H, I, generator=g, dtype=torch.float64) / I ** 0.5}
    if kw.get("has_bias"):
        ex["b13"] = torch.randn(E, inter, generator=g, dtype=torch.float64) * 0.3
        ex["b2"] = torch.randn(E, H, generator=g, dtype=torch.float64) * 0.3
    data = []
    for T in tokens:
        ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]
        ids[torch.rand(T, K, generator=g) < 0.25] = -1
        data.append((torch.randn(T, H, generator=g, dtype=torch.float64), ids,
                     torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1,
                     torch.randn(T, H, generator=g, dtype=torch.float64)))
    errors = {}
    for runner in runners:
        kwargs = dict(kw)
        layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dtype=dtype,
                         dispatcher_options={**OPTIONS.get(dispatcher, {}), **(options or {})}, **kwargs)
        layer.load_experts(*(ex[k].to(dtype) for k in ("w13", "w2", "b13", "b2") if k in ex))
        exr = {k: v.to(dtype).double() for k, v in ex.items()}
        x64, ids, w64, dy64 = data[rank]
        x, w = x64.to(dtype), w64.float()
        want = ref_moe_cfg(x.double(), ids, w.double(), exr, kw)
        if mode == "inference":
            with torch.inference_mode():
                errors[runner] = rel(layer(x, ids, w), want)
        elif mode == "no_grad":
            with torch.no_grad():
                errors[runner] = rel(layer(x, ids, w), want)
        elif mode == "batched":
            # x [B, S, H] with ids / weights [B, S, K]; y comes back in x's shape (forward's docstring).
            T = x.shape[0]
            y = layer(x.view(1, T, H), ids.view(1, T, K), w.view(1, T, K))
            assert y.shape == (1, T, H), y.shape
            errors[runner] = rel(y.view(T, H), want)
        elif mode == "router_only":
            # experts frozen, x needing no gradient anywhere, the weights needing one on ranks 0 and 3 only
            layer.requires_grad_(False)
            w.requires_grad_(rank in (0, 3))
            y = layer(x, ids, w)
            errors[runner] = rel(y, want)
            if y.requires_grad:
                y.backward(dy64.to(dtype))
            if rank in (0, 3):
                wr = w.detach().double().requires_grad_(True)
                (ref_moe_cfg(x.double(), ids, wr, exr, kw) * dy64.to(dtype).double()).sum().backward()
                errors[f"{runner} dw"] = rel(w.grad, wr.grad)
        else:  # training, experts frozen or not
            frozen = mode == "frozen_experts"
            if frozen:
                layer.requires_grad_(False)
            x.requires_grad_(True)
            w.requires_grad_(True)
            y = layer(x, ids, w)
            y.backward(dy64.to(dtype))
            xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
            (ref_moe_cfg(xr, ids, wr, exr, kw) * dy64.to(dtype).double()).sum().backward()
            errors[runner] = max(rel(y, want), rel(x.grad, xr.grad), rel(w.grad, wr.grad))
            if frozen:
                assert all(p.grad is None for p in layer.parameters()), runner
            elif "placement" not in name and "redundant" not in name:
                exg = {k: v.clone().requires_grad_(True) for k, v in exr.items()}
                sharded = layer.dispatcher.shards_experts
                total = sum((ref_moe_cfg(xx.to(dtype).double(), ii, ww.float().double(), exg, kw)
                             * dd.to(dtype).double()).sum()
                            for r, (xx, ii, ww, dd) in enumerate(data) if sharded or r == rank)
                total.backward()
                L = layer.w13.shape[0]
                lo = rank * L if sharded else 0
                for k in exg:
                    errors[f"{runner} d{k}"] = rel(getattr(layer, k).grad, exg[k].grad[lo:lo + L])
    return errors


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_config_fields_and_placements_at_four_ranks(dispatcher):
    """Every config field of MoeConfig, scattered and redundant placements, through every runner at R = 4
    (standard holds every expert on every rank: no placements there)."""
    names = [n for n in VARIANTS if not (dispatcher == "standard" and ("placement" in n or "redundant" in n))]
    cases = [(dispatcher, name, ["torch", "triton", "masked"], torch.float32, "train") for name in names]
    for per in run_ranks(_in_one_job, 4, _variant_rank, cases, timeout=900):
        for name, errors in zip(names, per):
            assert max(errors.values()) <= 1e-5, (name, errors)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_inference_and_frozen_experts_at_four_ranks(dispatcher):
    """The inference paths (no gradient anywhere) of every runner in fp32, bf16 and fp16, x [1, T, H], and a
    training step whose experts are frozen."""
    runs = [("inference", dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    runs += [(mode, torch.float32) for mode in ("no_grad", "batched", "frozen_experts", "router_only")]
    cases = [(dispatcher, "gpt_oss_swiglu_biases", RUNNERS, dtype, mode) for mode, dtype in runs]
    for per in run_ranks(_in_one_job, 4, _variant_rank, cases, timeout=900):
        for (mode, dtype), errors in zip(runs, per):
            assert max(errors.values()) <= TOL[dtype], (mode, dtype, errors)


DISPATCHER_OPTIONS = [
    ("deepep_normal", {"alignment": 4}),
    ("deepep_normal", {"num_worst_tokens": 64}),
    ("deepep_normal", {"num_worst_tokens": 64, "num_max_dispatch_tokens_per_rank": 8}),
    ("deepep_normal", {"hierarchical": "on", "ranks_per_node": 2}),
    ("mori", {"static": True}),
    ("mori", {"max_input_tokens": 2}),
    ("mori", {"prealloc_max_recv_tokens": 40}),
    ("mori", {"hierarchical": "on", "ranks_per_node": 2}),
]


@pytest.mark.parametrize("dispatcher,options", DISPATCHER_OPTIONS, ids=lambda v: str(v).replace(" ", ""))
def test_dispatcher_options_at_four_ranks(dispatcher, options):
    """Static plans, alignment, chunked sends, small runner rows and the node-aware exchange under every runner."""
    runs = [("train", torch.float32), ("inference", torch.float32), ("inference", torch.bfloat16)]
    cases = [(dispatcher, "gpt_oss_swiglu_biases", ["torch", "triton", "masked"], dtype, mode, options)
             for mode, dtype in runs]
    for per in run_ranks(_in_one_job, 4, _variant_rank, cases, timeout=900):
        for (mode, dtype), errors in zip(runs, per):
            assert max(errors.values()) <= TOL[dtype], (mode, dtype, errors)


# ---------------------------------------------------------------- the layer's own counts and masks

def _load_and_mask_rank(rank, R, dispatcher, expert_to_rank):
    import torch.distributed as dist
    E, K, H, I = 8, 3, 8, 4
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="masked", expert_to_rank=expert_to_rank,
                     dispatcher_options=OPTIONS.get(dispatcher))
    g = torch.Generator().manual_seed(31)
    every = []
    for T in [6, 0, 9, 4][:R]:
        ids = torch.randint(-1, E, (T, K), generator=g)
        ids[::3, 2] = ids[::3, 1]  # repeats count twice
        every.append((torch.randn(T, H, generator=g), ids, torch.rand(T, K, generator=g)))
    want = torch.zeros(E, dtype=torch.int64)
    for _, ids, _ in every:
        want += torch.bincount(ids[ids >= 0].flatten(), minlength=E)
    x, ids, w = every[rank]
    for _ in range(2):  # two steps, the second with a backward (recomputes nothing into the counts)
        layer(x.clone().requires_grad_(True), ids, w).sum().backward()
    load = layer.expert_load(reset=True).clone()
    dist.all_reduce(load)
    owner = list(expert_to_rank) if expert_to_rank else [e // (E // R) for e in range(E)]
    placement = layer.dispatcher.placement
    return {"load": (load.tolist(), (2 * want).tolist()),
            "reset": (layer.expert_load().tolist(), [0] * E),
            "global_mask": (placement.global_mask().tolist(), [o == rank for o in owner]),
            "local_experts": (sorted(placement.local_expert_ids().tolist()),
                              [e for e in range(E) if owner[e] == rank])}


@pytest.mark.parametrize("expert_to_rank", [None, [3, 1, 0, 2, 2, 0, 1, 3]], ids=["contiguous", "scattered"])
@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_expert_load_and_masks_at_four_ranks(dispatcher, expert_to_rank):
    """expert_load() summed over ranks is the true (token, expert) pair count (repeats twice, -1 never); the
    placement's global mask marks exactly this rank's experts."""
    for rank, got in enumerate(run_ranks(_load_and_mask_rank, 4, dispatcher, expert_to_rank, timeout=300)):
        for key, (have, want) in got.items():
            assert have == want, (rank, key, have, want)


# ---------------------------------------------------------------- buffers set below what the step needs

CAPACITY = [  # (dispatcher, options too small for 4 ranks x 8 tokens all sent to rank 0, words every rank names)
    ("mori", {"prealloc_max_recv_tokens": 20}, ["prealloc_max_recv_tokens", "20", "32"]),
    ("mori", {"static": True, "max_input_tokens": 20}, ["max_input_tokens", "20", "32"]),
    ("deepep_normal", {"num_worst_tokens": 20}, ["num_worst_tokens", "20", "32"]),
    ("deepep_normal", {"num_worst_tokens": 64, "num_max_dispatch_tokens_per_rank": 5},
     ["num_max_dispatch_tokens_per_rank", "5", "8"]),
]


def _capacity_rank(rank, R, dispatcher, options):
    E, K, H, I = 8, 2, 8, 4
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="triton",
                     dispatcher_options={**OPTIONS.get(dispatcher, {}), **options})
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(8, H, generator=g)
    ids = torch.stack([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)], 1)  # rank 0's experts
    start = time.monotonic()
    try:
        layer(x, ids, torch.rand(8, K, generator=g))
        message = None
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - start
    ids = torch.randint(-1, E, (3, K), generator=g)  # a step that fits
    w = torch.rand(3, K, generator=g)
    y = layer(x[:3], ids, w)
    experts = layer.gather_experts()
    return message, seconds, rel(y, ref_moe(x[:3].double(), ids, w.double(), experts.w13.double(),
                                            experts.w2.double()))


@pytest.mark.parametrize("dispatcher,options,words", CAPACITY, ids=lambda v: str(v).replace(" ", ""))
def test_buffers_below_the_step_fail_every_rank_naming_the_setting(dispatcher, options, words):
    """Never a drop: a receive buffer too small fails every rank at once, naming the setting, its value and the
    least value that fits; the next step that fits runs."""
    for rank, (message, seconds, good) in enumerate(run_ranks(_capacity_rank, 4, dispatcher, options, timeout=300,
                                                              group_timeout=30)):
        assert message is not None and seconds < 10, (rank, message, seconds)
        for word in words:
            assert word in message, (rank, word, message)
        assert good <= 1e-5, (rank, good)


# ---------------------------------------------------------------- second-order gradients, autocast, [B, S, H]

def _second_order_rank(rank, R, dispatcher, runner, dtype):
    """A gradient penalty: loss = |d<y, dy>/dx|^2 on every rank, backward into the experts (create_graph)."""
    E, K, H, I = 8, 2, 8, 4
    sharded = ep.dispatchers.get(dispatcher).shards_experts
    W13, W2, ranks = problem(R, E, K, H, I, [4, 0, 5, 3][:R] if R > 1 else [4], "minus_one", seed=41)
    # the reference takes the values the layer is given (rounded to dtype)
    W13, W2 = W13.to(dtype).double(), W2.to(dtype).double()
    ranks = [tuple(t.to(dtype).double() if t.is_floating_point() else t for t in rk) for rk in ranks]
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dtype=dtype,
                     dispatcher_options=OPTIONS.get(dispatcher))
    layer.load_experts(W13.to(dtype), W2.to(dtype))
    x64, ids, w64, dy = ranks[rank]
    x = x64.to(dtype, copy=True).requires_grad_(True)
    w = w64.to(dtype, copy=True).requires_grad_(True)
    y = layer(x, ids, w)
    gx, = torch.autograd.grad((y * dy.to(dtype)).sum(), x, create_graph=True)
    gx.square().sum().backward()
    Wa, Wb = W13.clone().requires_grad_(True), W2.clone().requires_grad_(True)
    total = 0
    for r, (xr, ir, wr, dyr) in enumerate(ranks):
        if not sharded and r != rank:
            continue
        xr = xr.clone().requires_grad_(True)
        wr = wr.clone().requires_grad_(True)
        gr, = torch.autograd.grad((ref_moe(xr, ir, wr, Wa, Wb) * dyr).sum(), xr, create_graph=True)
        total = total + gr.square().sum()
        if r == rank:
            mine = (gr, wr)
    total.backward()
    gr, wr = mine
    L = layer.w13.shape[0]
    lo = rank * L if sharded else 0
    return {"gx": rel(gx, gr), "dw": rel(w.grad, wr.grad), "dW13": rel(layer.w13.grad, Wa.grad[lo:lo + L]),
            "dW2": rel(layer.w2.grad, Wb.grad[lo:lo + L])}


@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_double_backward_at_four_ranks(dispatcher, runner):
    """api.md: double backward (a gradient penalty) runs through the exchange and every runner (the kernel
    runners in fp32: they take no float64)."""
    dtype = torch.float64 if runner == "torch" else torch.float32
    for errors in run_ranks(_second_order_rank, 4, dispatcher, runner, dtype, timeout=600):
        assert max(errors.values()) <= TOL[dtype], errors


def _autocast_batched_async_rank(rank, R, dispatcher, runner):
    E, K, H, I = 8, 2, 16, 8
    cfg = ep.TopKConfig(top_k=K, renormalize=True)
    tokens = [(2, 3), (1, 0), (3, 2), (2, 2)][rank]  # [B, S]; rank 1 has none
    g = torch.Generator().manual_seed(53)
    W13 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    W2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(*tokens, H, generator=g)
    logits = torch.randn(*tokens, E, generator=g)
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, topk_config=cfg,
                     dispatcher_options=OPTIONS.get(dispatcher))
    layer.load_experts(W13, W2)
    ids, w = ref_route(logits.view(-1, E).double(), cfg)
    want = ref_moe(x.view(-1, H).double(), ids, w, W13.double(), W2.double()).view(x.shape)
    errors = {}
    # x [B, S, H] with router logits [B, S, E]: y in x's shape
    y = layer(x, router_logits=logits)
    assert y.shape == x.shape, y.shape
    errors["batched"] = (rel(y, want), 1e-5)
    # a TopKOutput in place of ids and weights, flat
    y = layer(x.view(-1, H), ep.select_experts(logits.view(-1, E), cfg))
    errors["topk_output"] = (rel(y.view(x.shape), want), 1e-5)
    # under autocast a bf16 x is cast to the layer's fp32 and y comes back in it (forward's docstring)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16(), router_logits=logits)
    assert y.dtype == torch.float32, y.dtype
    errors["autocast"] = (rel(y, want), 2e-2)
    # the dispatcher's verbs with async_op=True: (output, work), wait, run, combine
    d = layer.dispatcher
    out, work = d.dispatch(x.view(-1, H), ep.TopKOutput(ids.int(), w.float()), async_op=True)
    work.wait()
    rows = layer.runner.run(out, layer.weights)
    y, work = d.combine(rows, async_op=True)
    work.wait()
    errors["async"] = (rel(y.view(x.shape), want), 1e-5)
    return errors


@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_batched_autocast_and_async_at_four_ranks(dispatcher, runner):
    """x [B, S, H] with router logits [B, S, E] (B*S = 0 on one rank), a TopKOutput, torch.autocast, and
    dispatch / combine with async_op=True."""
    for errors in run_ranks(_autocast_batched_async_rank, 4, dispatcher, runner, timeout=600):
        assert all(err <= tol for err, tol in errors.values()), errors


# ---------------------------------------------------------------- the dispatch formats' tables (formats.md)

def _format_rank(rank, R, dispatcher, dtype, wdtype):
    E, K, H = 8, 3, 4
    L = E // R
    d = ep.dispatchers.create(dispatcher, ep.MoeConfig(num_experts=E, top_k=K, hidden_size=H, intermediate_size=4),
                              **OPTIONS.get(dispatcher, {}))
    g = torch.Generator().manual_seed(61)
    every = []
    for src, T in enumerate([5, 0, 7, 3][:R]):
        ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]
        ids[torch.rand(T, K, generator=g) < 0.3] = -1
        x = torch.randn(T, H, generator=g, dtype=torch.float64)
        x[:, 0], x[:, 1] = src, torch.arange(T)  # each row says where it came from
        every.append((x.to(dtype), ids, (torch.rand(T, K, generator=g) + 0.5).to(wdtype)))
    x, ids, w = every[rank]
    out = d.dispatch(x, ep.TopKOutput(ids, w))
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    problems = []

    def expect(what, ok):
        if not ok:
            problems.append(what)
    # the tokens this rank receives, in (source rank, token) order, and their ids
    arriving = [(s, t) for s, (_, ii, _) in enumerate(every) for t in range(ii.shape[0])
                if (ii[t] >= 0).logical_and(ii[t] // L == rank).any()]
    expect("x_dtype", out.x_dtype == dtype)
    if dispatcher == "deepep_normal":
        rows = [(int(a), int(b)) for a, b in out.recv_x[:, :2].double().tolist()]
        expect(f"rows {rows} != {arriving}", rows == arriving)
        expect("recv_topk_ids int32", out.recv_topk_ids.dtype == torch.int32)
        expect(f"recv_topk_weights {out.recv_topk_weights.dtype}", out.recv_topk_weights.dtype == wide)
        for n, (s, t) in enumerate(arriving):
            gi, gw = every[s][1][t], every[s][2][t]
            local = torch.where((gi >= 0) & (gi // L == rank), gi - rank * L, -1)
            expect(f"ids of {s, t}", torch.equal(out.recv_topk_ids[n].long(), local))
            want_w = torch.where(local >= 0, gw.to(wide), 0)
            expect(f"weights of {s, t}", torch.equal(out.recv_topk_weights[n], want_w))
        expect("counts tensor int32", out.num_recv_tokens_per_expert_tensor.dtype == torch.int32)
    elif dispatcher == "mori":
        n = out.num_recv_tokens
        expect("num_recv_tokens [1] int32", tuple(n.shape) == (1,) and n.dtype == torch.int32)
        n = int(n[0])
        rows = [(int(a), int(b)) for a, b in out.recv_x[:n, :2].double().tolist()]
        expect(f"rows {rows} != {arriving}", rows == arriving)
        expect("recv_topk_ids int32", out.recv_topk_ids.dtype == torch.int32)
        expect(f"recv_topk_weights {out.recv_topk_weights.dtype}", out.recv_topk_weights.dtype == wide)
        for m, (s, t) in enumerate(arriving):  # global ids, all K of the token
            expect(f"ids of {s, t}", torch.equal(out.recv_topk_ids[m].long(), every[s][1][t]))
            expect(f"weights of {s, t}", torch.equal(out.recv_topk_weights[m], every[s][2][t].to(wide)))
        expect("padding ids -1", bool((out.recv_topk_ids[n:] == -1).all()))
        expect("padding weights 0", bool((out.recv_topk_weights[n:] == 0).all()))
        expect("N_buf", out.recv_x.shape[0] == CAP * R)
    else:  # deepep_ll
        expect("recv_x shape", tuple(out.recv_x.shape) == (L, CAP * R, H))
        expect("masked_m int32", out.masked_m.dtype == torch.int32)
        for ll in range(L):
            e = rank * L + ll
            want = [(s, t) for s, (_, ii, _) in enumerate(every) for t in range(ii.shape[0]) if (ii[t] == e).any()]
            m = int(out.masked_m[ll])
            rows = [(int(a), int(b)) for a, b in out.recv_x[ll, :m, :2].double().tolist()]
            expect(f"expert {e} rows {rows} != {want}", rows == want)
    return problems


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                          (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
def test_dispatch_outputs_follow_the_format_tables_at_four_ranks(dispatcher, dtype, wdtype):
    """formats.md's tables: dtypes, local / global ids, weights 0 where the id is -1, padding rows, rows in
    (source rank, token) order, one row per token per rank."""
    for rank, problems in enumerate(run_ranks(_format_rank, 4, dispatcher, dtype, wdtype, timeout=300)):
        assert not problems, (rank, problems)


def _mixed_inputs_rank(rank, R, dispatcher):
    """reliability.md, "fine as they are": router_logits on some ranks and ids / weights on others."""
    E, K, H, I = 8, 2, 16, 8
    cfg = ep.TopKConfig(top_k=K, scoring="sigmoid", renormalize=True)
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="triton", topk_config=cfg,
                     dispatcher_options=OPTIONS.get(dispatcher))
    experts = layer.gather_experts()
    g = torch.Generator().manual_seed(70 + rank)
    x = torch.randn(4 + rank, H, generator=g)
    logits = torch.randn(4 + rank, E, generator=g)
    ids, w = ref_route(logits.double(), cfg)
    want = ref_moe(x.double(), ids, w, experts.w13.double(), experts.w2.double())
    y = layer(x, router_logits=logits) if rank % 2 == 0 else layer(x, ids.to(torch.int16), w)
    return rel(y, want)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_router_logits_on_some_ranks_and_ids_on_others(dispatcher):
    assert max(run_ranks(_mixed_inputs_rank, 4, dispatcher, timeout=300)) <= 1e-5


def _stack_rank(rank, R, first, second, runner):
    """Two layers in one model (y = B(x + A(x)), B routed on A's output through TopKConfig), so each backward
    runs two layers' reverse exchanges, in the order autograd picks, on ranks whose graphs differ (no tokens,
    a router that needs a gradient on some ranks only)."""
    E, K, H, I = 8, 2, 16, 8
    cfg = ep.TopKConfig(top_k=K, renormalize=True)
    torch.manual_seed(0)  # the same experts on every rank's copy of the model
    a = ep.EPMoE(E, K, H, I, dispatcher=first, runner=runner, dispatcher_options=OPTIONS.get(first))
    b = ep.EPMoE(E, K, H, I, dispatcher=second, runner=runner, topk_config=cfg, dispatcher_options=OPTIONS.get(second))
    ea, eb = a.gather_experts(), b.gather_experts()
    sharded = (ep.dispatchers.get(first).shards_experts, ep.dispatchers.get(second).shards_experts)
    tokens = [3, 0, 5, 4]
    data = []
    for r, T in enumerate(tokens):
        g = torch.Generator().manual_seed(80 + r)
        ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]
        data.append((torch.randn(T, H, generator=g), ids, torch.rand(T, K, generator=g),
                     torch.randn(H, E, generator=g) / H ** 0.5, torch.randn(T, H, generator=g)))  # gate: a router
    x, ids, w, gate, dy = data[rank]
    x.requires_grad_(rank != 3)
    gate.requires_grad_(rank % 2 == 0)
    h = x + a(x, ids, w)
    y = b(h, router_logits=h @ gate)
    y.backward(dy)
    W = {k: v.double().requires_grad_(True) for k, v in
         (("a13", ea.w13), ("a2", ea.w2), ("b13", eb.w13), ("b2", eb.w2))}
    grads = {}
    for which in (0, 1):  # experts of A (which=0) and of B see every rank's tokens only where they are sharded
        total = 0
        for r, (xr, ir, wr, gr, dyr) in enumerate(data):
            if not sharded[which] and r != rank:
                continue
            xr, gr = xr.detach().double().requires_grad_(True), gr.detach().double().requires_grad_(True)
            hr = xr + ref_moe(xr, ir, wr.double(), W["a13"], W["a2"])
            i2, w2 = ref_route(hr @ gr, cfg)
            yr = ref_moe(hr, i2, w2, W["b13"], W["b2"])
            total = total + (yr * dyr.double()).sum()
            if r == rank and which == 0:
                mine = (yr, xr, gr)
        keys = ("a13", "a2") if which == 0 else ("b13", "b2")
        for k, gk in zip(keys, torch.autograd.grad(total, [W[k] for k in keys], retain_graph=True)):
            grads[k] = gk
    yr, xr, gr = mine
    (yr * data[rank][4].double()).sum().backward()
    errors = {"y": rel(y, yr)}
    if x.requires_grad:
        errors["dx"] = rel(x.grad, xr.grad)
    if gate.requires_grad:
        errors["dgate"] = rel(gate.grad, gr.grad)
    for k, layer, s in (("a13", a, sharded[0]), ("a2", a, sharded[0]), ("b13", b, sharded[1]), ("b2", b, sharded[1])):
        L = layer.w13.shape[0]
        lo = rank * L if s else 0
        errors[k] = rel(getattr(layer, "w13" if k.endswith("13") else "w2").grad, grads[k][lo:lo + L])
    return errors


@pytest.mark.parametrize("runner", ["torch", "triton"])
@pytest.mark.parametrize("first,second", [("deepep_normal", "mori"), ("deepep_ll", "deepep_normal"),
                                          ("mori", "deepep_ll"), ("standard", "deepep_normal")])
def test_two_layers_in_one_model_at_four_ranks(first, second, runner):
    for errors in run_ranks(_stack_rank, 4, first, second, runner, timeout=600):
        assert max(errors.values()) <= 1e-5, errors
