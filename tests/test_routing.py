"""select_experts against a plain-Python float64 reference."""
import math
import re

import pytest
import torch

import ep_runtime as ep
from ep_runtime import TopKConfig, routing_kernels, select_experts
from ep_runtime.testing import run_ranks


def reference_routing(logits, cfg, bias=None):
    T, E = logits.shape
    out_ids, out_w = [], []
    for t in range(T):
        row = [float(v) for v in logits[t].double()]
        if cfg.scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        eligible = set(range(E))
        if cfg.num_expert_group:
            size = E // cfg.num_expert_group
            groups = []
            for g in range(cfg.num_expert_group):
                members = sorted(choice[g * size:(g + 1) * size], reverse=True)
                top2 = cfg.group_score == "top2_sum" or (cfg.group_score is None and bias is not None)
                groups.append((sum(members[:2]) if top2 else members[0], g))
            best = [g for _, g in sorted(groups, key=lambda sg: (-sg[0], sg[1]))[:cfg.topk_group]]  # ties: lower g
            eligible = {e for e in range(E) if e // size in best}
        ranked = sorted(eligible, key=lambda e: (-choice[e], e))[:cfg.top_k]  # best first, ties to the lower id
        weights = [scores[e] for e in ranked]
        if cfg.renormalize:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        out_ids.append(ranked)
        out_w.append([w * cfg.routed_scaling_factor for w in weights])
    return out_ids, out_w


@pytest.fixture(params=["torch", "kernel"])
def routing_path(request, monkeypatch):
    """select_experts on its torch ops, or on the routing kernel (routing_kernels: CUDA's path; here on CPU
    tensors under Triton's interpreter)."""
    if request.param == "kernel":
        if routing_kernels.triton is None:
            pytest.skip("triton is not installed")
        monkeypatch.setattr(routing_kernels, "usable", lambda logits: True)
    return request.param


def check(logits, cfg, bias=None):
    out = select_experts(logits, cfg, bias)
    assert out.topk_ids.dtype == torch.int32 and out.topk_weights.dtype == torch.float32
    ref_ids, ref_w = reference_routing(logits, cfg, bias)
    for t in range(logits.shape[0]):
        got = dict(zip(out.topk_ids[t].tolist(), out.topk_weights[t].tolist()))
        assert set(got) == set(ref_ids[t]), t
        for e, w in zip(ref_ids[t], ref_w[t]):
            assert got[e] == pytest.approx(w, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk(renormalize, routing_path):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(33, 16, generator=gen)
    check(logits, TopKConfig(top_k=4, scoring="softmax", renormalize=renormalize))


def test_sigmoid_grouped_with_bias_deepseek_v3(routing_path):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 32, generator=gen)
    bias = torch.randn(32, generator=gen) * 0.3
    cfg = TopKConfig(top_k=6, scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=3,
                     routed_scaling_factor=2.5)
    check(logits, cfg, bias)


@pytest.mark.parametrize("group_score,with_bias", [("top2_sum", False), ("max", True)])
def test_explicit_group_score(group_score, with_bias, routing_path):
    # DeepSeek-V3 scores groups by their top two even when its correction bias is zero (None here).
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 32, generator=gen)
    bias = torch.randn(32, generator=gen) * 0.3 if with_bias else None
    cfg = TopKConfig(top_k=4, scoring="sigmoid", renormalize=True, num_expert_group=8, topk_group=2,
                     group_score=group_score)
    check(logits, cfg, bias)
    inferred = select_experts(logits, TopKConfig(top_k=4, scoring="sigmoid", renormalize=True, num_expert_group=8,
                                                 topk_group=2), bias)
    assert not torch.equal(select_experts(logits, cfg, bias).topk_ids.sort(1).values,
                           inferred.topk_ids.sort(1).values)  # the setting changes the choice here


def test_softmax_grouped_without_bias(routing_path):
    gen = torch.Generator().manual_seed(2)
    check(torch.randn(20, 24, generator=gen), TopKConfig(top_k=3, num_expert_group=6, topk_group=2))


def test_bias_changes_choice_not_weights(routing_path):
    logits = torch.zeros(1, 4)
    logits[0, 0] = 1.0
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    out = select_experts(logits, TopKConfig(top_k=1, scoring="sigmoid"), bias)
    assert out.topk_ids.tolist() == [[3]]
    assert out.topk_weights.item() == pytest.approx(0.5)


def _non_finite_bias_rank(rank, world_size, bad):
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", runner="torch",
                     topk_config=TopKConfig(top_k=2, scoring="sigmoid", num_expert_group=4, topk_group=2))
    bias = torch.zeros(8)
    bias[5] = bad
    with pytest.raises(ValueError) as err:
        layer(torch.randn(3, 16), router_logits=torch.randn(3, 8), correction_bias=bias)
    return str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_correction_bias_fails_every_rank_naming_it(bad):
    """A NaN (or inf) in correction_bias was picked first by topk for every token, with a finite weight:
    every token silently went to expert 5. Now every rank raises naming the bias entry, before any exchange."""
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(8)
    bias[5] = bad
    with pytest.raises(ValueError, match=rf"correction_bias has a non-finite value {bad} at \[5\]"):
        select_experts(logits, TopKConfig(top_k=2, scoring="sigmoid"), bias)
    assert run_ranks(_non_finite_bias_rank, 2, bad) == [f"correction_bias has a non-finite value {bad} at [5]"] * 2


@pytest.mark.parametrize("cfg,match", [
    (TopKConfig(top_k=9), "top_k=9 exceeds num_experts=8; allowed 1..8"),
    (TopKConfig(top_k=5, num_expert_group=4, topk_group=2), "top_k=5 exceeds the 4 experts .*; allowed 1..4"),
    (TopKConfig(top_k=2, num_expert_group=3, topk_group=1), "not divisible by num_expert_group=3; allowed: a divisor of 8"),
])
def test_bad_routing_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        select_experts(torch.randn(2, 8), cfg)
    with pytest.raises(ValueError, match=match if cfg.top_k <= 8 else "top_k=9"):  # and when a layer is built
        ep.EPMoE(8, cfg.top_k, 16, 8, topk_config=cfg)


@pytest.mark.parametrize("kwargs,match", [
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor=nan must be a finite number"),
    (dict(routed_scaling_factor=0), r"routed_scaling_factor=0.0; allowed: a finite number > 0"),
    (dict(routed_scaling_factor=-2.5), r"routed_scaling_factor=-2.5; allowed: a finite number > 0"),
    (dict(group_score="sum"), "group_score='sum'; allowed: None"),
    (dict(num_expert_group=2, topk_group=0), "topk_group=0 must be in"),
    (dict(top_k=2.0), "top_k=2.0 must be an int >= 1"),
    (dict(num_expert_group=4), "num_expert_group=4 and topk_group=None: give both"),
])
def test_bad_topk_config_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKConfig(**{"top_k": 2, **kwargs})


@pytest.mark.parametrize("logits,error,match", [
    (torch.randint(0, 4, (2, 8)), TypeError, r"router_logits has dtype torch.int64; expected a floating dtype"),
    (torch.ones(2, 8, dtype=torch.bool), TypeError, r"router_logits has dtype torch.bool; expected a floating dtype"),
    (torch.randn(2, 8, dtype=torch.complex64), TypeError, r"router_logits has dtype torch.complex64; expected a floating"),
    ([[0.0] * 8] * 2, TypeError, r"router_logits must be a torch.Tensor; got list"),
])
def test_router_logits_of_a_wrong_type_are_refused(logits, error, match):
    """Integer, bool or complex logits were routed as if they were scores (complex ones with a warning
    that the imaginary part was dropped); a list failed with an AttributeError."""
    with pytest.raises(error, match=match):
        select_experts(logits, TopKConfig(top_k=2))


def test_router_logits_with_leading_dims_name_the_flatten():
    """[B, S, E] logits, as a layer's router_logits= takes them, said only "expected [T, E]"."""
    with pytest.raises(ValueError, match=r"router_logits has shape \[2, 3, 8\]; expected \[T, E\] \(flatten the "
                                         r"leading dims: router_logits.flatten\(0, -2\)"):
        select_experts(torch.randn(2, 3, 8), TopKConfig(top_k=2))


@pytest.mark.parametrize("bias,error,match", [
    (torch.zeros(8, dtype=torch.int64), TypeError, r"correction_bias has dtype torch.int64; expected a floating dtype"),
    (torch.ones(8, dtype=torch.bool), TypeError, r"correction_bias has dtype torch.bool; expected a floating dtype"),
    (torch.zeros(8, device="meta"), ValueError, r"correction_bias is on meta; expected cpu \(the device of router_logits\)"),
    ([0.0] * 8, TypeError, r"correction_bias must be a torch.Tensor; got list"),
])
def test_bad_correction_bias_is_refused(bias, error, match):
    with pytest.raises(error, match=match):
        select_experts(torch.randn(2, 8), TopKConfig(top_k=2, scoring="sigmoid"), bias)


def test_layer_names_router_logits_on_another_device():
    """router_logits on another device than x: the error named topk_ids, which the caller never passed."""
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="torch")
    with pytest.raises(ValueError, match=r"router_logits is on meta; expected cpu \(the device of x\)"):
        layer(torch.randn(3, 16), router_logits=torch.randn(3, 8, device="meta"))


def test_correction_bias_without_router_logits_is_refused():
    """correction_bias with topk_ids / topk_weights was silently ignored (the ids are already chosen)."""
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="torch")
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"correction_bias is given with topk_ids / topk_weights"):
        layer(torch.randn(3, 16), ids, torch.ones(3, 2), correction_bias=torch.zeros(8))


@pytest.mark.parametrize("value", ["yes", None, 1])
def test_renormalize_must_be_a_bool(value):
    """renormalize="yes" renormalised and None did not, without a word."""
    with pytest.raises(TypeError, match=rf"renormalize={value!r}; allowed: True or False"):
        TopKConfig(top_k=2, renormalize=value)


def _non_finite_logits_rank(rank, world_size, dispatcher, scoring, bad):
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch",
                     topk_config=TopKConfig(top_k=2, scoring=scoring, renormalize=True))
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(rank))
    if rank == world_size - 1:  # one rank's router goes wrong
        if bad == "all -inf":
            logits[1] = float("-inf")
        else:
            logits[1, 3] = float(bad)
    with pytest.raises(ValueError) as err:
        layer(torch.randn(3, 16), router_logits=logits)
    return str(err.value)


@pytest.mark.parametrize("dispatcher,world_size", [("standard", 1), ("deepep_normal", 2)])
@pytest.mark.parametrize("scoring,bad,match", [
    ("softmax", "nan", r"router_logits has nan at \[1, 3\]"),
    ("sigmoid", "nan", r"router_logits has nan at \[1, 3\]"),
    ("softmax", "inf", r"router_logits has inf at \[1, 3\]"),
    ("softmax", "all -inf", r"router_logits has -inf in every entry of row 1"),
])
def test_non_finite_router_logits_are_named(dispatcher, world_size, scoring, bad, match):
    """A NaN logit (or, under softmax, +inf or a row of -inf) gives NaN routing weights; the error named
    topk_weights, which the caller never passed. Now the rank with the bad row names router_logits and
    every other rank stops too."""
    errors = run_ranks(_non_finite_logits_rank, world_size, dispatcher, scoring, bad)
    assert re.match(match + r", which gives non-finite routing weights; allowed: ", errors[-1]), errors[-1]
    assert all(f"rank {world_size - 1} got invalid" in e for e in errors[:-1]), errors


@pytest.mark.parametrize("scoring,groups", [("softmax", None), ("sigmoid", None), ("sigmoid", (4, 2))])
def test_masked_experts_route_around_them(scoring, groups, routing_path):
    """-inf logits mark experts a token may not take: they get weight 0 and are never picked ahead of a
    finite one, even a finite logit whose score underflows to 0 in fp32 as the masked one's does (they were
    tied, and topk took the masked expert first); under sigmoid a row of -inf is no error (every weight 0,
    renormalised or not)."""
    gen = torch.Generator().manual_seed(0)
    cfg = TopKConfig(top_k=3, scoring=scoring, renormalize=True, num_expert_group=groups and groups[0],
                     topk_group=groups and groups[1])
    logits = torch.randn(6, 8, generator=gen)
    logits[:, :5] = float("-inf")
    out = select_experts(logits, cfg)
    assert sorted(out.topk_ids[0].tolist()) == [5, 6, 7] and torch.isfinite(out.topk_weights).all()
    # experts 5..7 finite but far below expert 7's 0 (scores exactly 0 in fp32), the rest -inf
    logits = torch.full((6, 8), float("-inf"))
    logits[:, 5:] = torch.tensor([-1000.0, -2000.0, 0.0]) - 1000.0 * torch.rand(6, 1, generator=gen).round()
    out = select_experts(logits, cfg)
    assert (out.topk_ids.sort(1).values == torch.tensor([5, 6, 7], dtype=torch.int32)).all(), out.topk_ids
    out = select_experts(torch.full((2, 8), float("-inf")), TopKConfig(top_k=2, scoring="sigmoid", renormalize=True))
    assert out.topk_weights.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_routed_scaling_factor_in_both_places_is_refused():
    """EPMoE(routed_scaling_factor=2.5, topk_config=TopKConfig(..., routed_scaling_factor=2.5)) scaled
    the output by 6.25 where DeepSeek-V3 scales it by 2.5; either place alone scales it once."""
    with pytest.raises(ValueError, match=r"routed_scaling_factor=2.5 and topk_config.routed_scaling_factor=2.5 "
                                         r"would both scale the output \(by 6.25\)"):
        ep.EPMoE(8, 2, 16, 8, routed_scaling_factor=2.5, topk_config=TopKConfig(top_k=2, routed_scaling_factor=2.5))
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(5, 16, generator=gen, dtype=torch.float64), torch.randn(5, 8, generator=gen)
    outputs = []
    for layer_factor, routing_factor in ((2.5, 1.0), (1.0, 2.5), (1.0, 1.0)):
        torch.manual_seed(0)
        layer = ep.EPMoE(8, 2, 16, 8, runner="torch", dtype=torch.float64, routed_scaling_factor=layer_factor,
                         topk_config=TopKConfig(top_k=2, routed_scaling_factor=routing_factor))
        outputs.append(layer(x, router_logits=logits))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=0)  # (float32 logits: fp32 weights)
    torch.testing.assert_close(outputs[0], 2.5 * outputs[2], rtol=1e-6, atol=0)


def test_a_config_that_is_not_a_topk_config_is_refused():
    """A dict or an int where a TopKConfig goes failed with an AttributeError naming neither argument."""
    with pytest.raises(TypeError, match=r"config=\{'top_k': 2\}; expected an ep.TopKConfig"):
        select_experts(torch.randn(2, 8), {"top_k": 2})
    with pytest.raises(TypeError, match=r"topk_config=\{'top_k': 2\}; expected None or an ep.TopKConfig"):
        ep.EPMoE(8, 2, 16, 8, topk_config={"top_k": 2})


def test_group_score_without_groups_is_refused():
    """group_score='top2_sum' without num_expert_group was ignored: the experts were picked ungrouped."""
    with pytest.raises(ValueError, match=r"group_score='top2_sum' scores expert groups; give num_expert_group and "
                                         r"topk_group too"):
        TopKConfig(top_k=2, group_score="top2_sum")


def test_float64_logits_beyond_float32_are_scored_in_float64_and_nan_is_named():
    """A float64 logit of 1e39 was inf once routing scored it in float32 (softmax then gave NaN weights, an
    error). Float64 logits are scored in float64 now: it is an ordinary logit (weight 1 for its expert), a row of
    -1e39 is uniform, and a NaN logit is still named with its place."""
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="standard", runner="torch", dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, dtype=torch.float64, generator=gen)
    logits[2, 6] = 1e39
    logits[1] = -1e39
    out = select_experts(logits, layer.topk_config)
    assert out.topk_weights.dtype == torch.float64
    assert out.topk_ids[2, 0] == 6 and out.topk_weights[2].tolist() == [1.0, 0.0]
    assert out.topk_weights[1].tolist() == [1 / 8, 1 / 8]
    assert torch.isfinite(layer(torch.randn(3, 16, generator=gen, dtype=torch.float64), router_logits=logits)).all()
    logits[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"router_logits has nan at \[0, 3\], which gives non-finite routing weights"):
        layer(torch.randn(3, 16, dtype=torch.float64), router_logits=logits)


# (scoring, renormalize, num_expert_group, topk_group, routed_scaling_factor, correction bias)
FLOAT64_ROUTINGS = {
    "softmax": ("softmax", False, None, None, 1.0, False),
    "softmax_renormalized": ("softmax", True, None, None, 1.0, False),
    "sigmoid_grouped_bias_scaled": ("sigmoid", True, 4, 2, 2.5, True),
    "softmax_grouped": ("softmax", True, 4, 3, 1.0, False),
}


def _float64_routing(case):
    scoring, renormalize, groups, topk_group, factor, with_bias = FLOAT64_ROUTINGS[case]
    cfg = TopKConfig(top_k=3, scoring=scoring, renormalize=renormalize, num_expert_group=groups,
                     topk_group=topk_group, routed_scaling_factor=factor)
    gen = torch.Generator().manual_seed(len(case))
    logits = torch.randn(9, 16, generator=gen, dtype=torch.float64) * 3
    bias = torch.randn(16, generator=gen, dtype=torch.float64) * 0.3 if with_bias else None
    return cfg, logits, bias


def _gated_mlp_reference(x, w13, w2, ids, weights):
    """y_t = sum_k w_tk * w2[e] @ (silu(gate_e x_t) * (up_e x_t)), e = ids[t][k], in float64 (Python loops)."""
    inter = w2.shape[2]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            y[t] += w * (w2[e] @ (gate * torch.sigmoid(gate) * up))
    return y


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_normal"])
@pytest.mark.parametrize("case", list(FLOAT64_ROUTINGS))
def test_float64_layer_routes_in_float64(case, dispatcher, routing_path):
    """A float64 layer called with float64 router_logits: its routing weights (scored in float32 before, 1e-7
    off) and its output equal a float64 reference to 1e-12; where the fp32 routing kernel could serve, float64
    logits still take the torch path."""
    cfg, logits, bias = _float64_routing(case)
    out = select_experts(logits, cfg, bias)
    assert out.topk_weights.dtype == torch.float64
    ref_ids, ref_w = reference_routing(logits, cfg, bias)
    for t in range(logits.shape[0]):
        got = dict(zip(out.topk_ids[t].tolist(), out.topk_weights[t].tolist()))
        assert set(got) == set(ref_ids[t]), t
        for e, w in zip(ref_ids[t], ref_w[t]):
            assert got[e] == pytest.approx(w, rel=1e-13, abs=0), (t, e)
    gen = torch.Generator().manual_seed(7)
    E, H, I = 16, 12, 6
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64), torch.randn(E, H, I, generator=gen,
                                                                                         dtype=torch.float64)
    x = torch.randn(logits.shape[0], H, generator=gen, dtype=torch.float64)
    layer = ep.EPMoE(E, 3, H, I, dispatcher=dispatcher, runner="torch", dtype=torch.float64, topk_config=cfg)
    layer.load_experts(w13, w2)
    y = layer(x, router_logits=logits, correction_bias=bias)
    expected = _gated_mlp_reference(x, w13, w2, ref_ids, ref_w)
    assert y.dtype == torch.float64
    assert ((y - expected).norm() / expected.norm()).item() < 1e-12


@pytest.mark.parametrize("case", list(FLOAT64_ROUTINGS))
def test_float64_routing_weights_pass_gradcheck(case):
    """The routing weights' gradient with respect to float64 logits, alone and through a float64 layer (the
    experts picked stay put under gradcheck's 1e-6 steps: the logits are far apart)."""
    cfg, logits, bias = _float64_routing(case)
    logits = logits[:4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: select_experts(z, cfg, bias).topk_weights, (logits,))
    gen = torch.Generator().manual_seed(3)
    layer = ep.EPMoE(16, 3, 8, 4, dispatcher="standard", runner="torch", dtype=torch.float64, topk_config=cfg)
    x = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: layer(x, router_logits=z, correction_bias=bias), (logits,))


@pytest.mark.parametrize("E,groups,K", [(256, (8, 4), 8), (160, (8, 3), 6), (60, None, 4), (7, None, 7)])
def test_routing_kernel_at_model_sizes(E, groups, K, routing_path):
    """DeepSeek-V3's 256 experts in 8 groups (4 kept, top-8, sigmoid, bias, renormalized, scaled); 160 experts
    in groups of 20 and 60 experts (E not a power of two: the kernel pads its rows); K = E (every expert
    picked); 12 tokens over several programs; fp16 and strided logits, a strided bias."""
    gen = torch.Generator().manual_seed(E)
    logits = torch.randn(12, 2 * E, generator=gen)[:, ::2]
    bias = (torch.randn(2 * E, generator=gen) * 0.1)[::2] if groups else None
    cfg = TopKConfig(top_k=K, scoring="sigmoid" if groups else "softmax", renormalize=True,
                     num_expert_group=groups and groups[0], topk_group=groups and groups[1],
                     routed_scaling_factor=2.5 if groups else 1.0)
    check(logits, cfg, bias)
    check(logits.half(), cfg, bias)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_routing_kernel_keeps_non_finite_logits_visible(scoring, monkeypatch):
    """The kernel's picks for a row with a NaN (or, under softmax, +inf) logit: K distinct ids in range, and
    non-finite weights exactly where the torch path's are (the dispatcher's weight check then names the
    logit); other rows equal the torch path's; the layer's error names the logit."""
    if routing_kernels.triton is None:
        pytest.skip("triton is not installed")
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 16, generator=gen)
    logits[1, 3], logits[2, 7], logits[4] = float("nan"), float("inf"), float("-inf")
    cfg = TopKConfig(top_k=4, scoring=scoring, renormalize=True)
    want = select_experts(logits, cfg)
    monkeypatch.setattr(routing_kernels, "usable", lambda logits: True)
    got = select_experts(logits, cfg)
    assert got.topk_ids.dtype == torch.int32 and ((got.topk_ids >= 0) & (got.topk_ids < 16)).all()
    assert all(len(set(row)) == 4 for row in got.topk_ids.tolist())
    assert torch.equal(torch.isfinite(got.topk_weights), torch.isfinite(want.topk_weights))
    finite = torch.isfinite(want.topk_weights).all(1)
    finite[4] = False  # a row of -inf (finite under sigmoid: every weight 0) ties every expert: any 4 will do
    assert scoring == "softmax" or got.topk_weights[4].tolist() == [0.0] * 4
    assert torch.equal(got.topk_ids[finite].sort(1).values, want.topk_ids[finite].sort(1).values)
    torch.testing.assert_close(got.topk_weights[finite], want.topk_weights[finite], rtol=1e-5, atol=1e-7)
    layer = ep.EPMoE(16, 4, 8, 8, dispatcher="standard", runner="torch", topk_config=cfg)
    with pytest.raises(ValueError, match=r"router_logits has nan at \[1, 3\]"):
        layer(torch.randn(6, 8, generator=gen), router_logits=logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
@pytest.mark.parametrize("T", [1, 3000])
def test_gpu_routing_kernel_matches_the_torch_path(T, monkeypatch):
    """On CUDA select_experts takes the routing kernel: the picks equal the torch path's wherever the choice
    at the K-th / (K+1)-th boundary is not a near-tie (both differ in exp's last bits), the weights within
    fp32 rounding; a CUDA graph replay equals the eager call; logits that need a gradient take the torch path
    (the weights then carry one)."""
    gen = torch.Generator(device="cuda").manual_seed(T)
    for E, cfg, with_bias in ((256, TopKConfig(8, "sigmoid", True, 8, 4, routed_scaling_factor=2.5), True),
                              (128, TopKConfig(8, "softmax", True), False), (8, TopKConfig(2, "softmax"), False)):
        logits = torch.randn(T, E, device="cuda", generator=gen)
        bias = torch.randn(E, device="cuda", generator=gen) * 0.1 if with_bias else None
        got = select_experts(logits, cfg, bias)
        with monkeypatch.context() as m:
            m.setattr(routing_kernels, "usable", lambda logits: False)
            want = select_experts(logits, cfg, bias)
        choice = (logits.sigmoid() + bias) if with_bias else logits  # (softmax ranks as its logits do)
        clear = torch.ones(T, dtype=torch.bool, device="cuda")  # rows without a near-tie at a boundary
        if cfg.num_expert_group is not None:
            G, kept = cfg.num_expert_group, cfg.topk_group
            group_scores = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
            ranked = group_scores.sort(1, descending=True).values
            clear &= ranked[:, kept - 1] - ranked[:, kept] > 1e-5
            eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(kept).indices, True)
            choice = choice.masked_fill(~eligible.repeat_interleave(E // G, dim=1), float("-inf"))
        top = choice.topk(cfg.top_k + 1, dim=1).values
        clear &= top[:, -2] - top[:, -1] > 1e-5
        same = (got.topk_ids.sort(1).values == want.topk_ids.sort(1).values).all(1)
        assert bool(same[clear].all()) and int(clear.sum()) >= 0.9 * T, (E, int(clear.sum()))
        order = got.topk_ids.long().argsort(1), want.topk_ids.long().argsort(1)
        torch.testing.assert_close(got.topk_weights.gather(1, order[0])[same], want.topk_weights.gather(1, order[1])[same],
                                   rtol=1e-5, atol=1e-7)
        graph, out = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(graph):
            out = select_experts(logits, cfg, bias)
        graph.replay()
        assert torch.equal(out.topk_ids, got.topk_ids) and torch.equal(out.topk_weights, got.topk_weights)
        trained = select_experts(logits.clone().requires_grad_(), cfg, bias)
        assert trained.topk_weights.grad_fn is not None


def test_routing_kernel_breaks_exact_ties_to_the_lower_id(monkeypatch):
    """Exact ties (common in bf16 logits) go to the lower expert id in the kernel, picks in order of choice;
    torch.topk leaves their order unspecified."""
    if routing_kernels.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(routing_kernels, "usable", lambda logits: True)
    logits = torch.tensor([[1.0, 0, 1, 0, 2, 0, 1, 0]], dtype=torch.bfloat16)
    assert select_experts(logits, TopKConfig(top_k=3)).topk_ids.tolist() == [[4, 0, 2]]
    grouped = TopKConfig(top_k=2, num_expert_group=4, topk_group=2)  # groups {0,1} {2,3} {4,5} {6,7}: 2 and 0 kept
    assert select_experts(logits, grouped).topk_ids.tolist() == [[4, 0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_ties_go_to_the_lower_id_on_both_paths(dtype, routing_path):
    """Exact ties (bf16 logits, a zero-initialised router as Qwen2-MoE's and OLMoE's) went to the lower id in the
    kernel but anywhere on the torch path (torch.topk leaves them unspecified: [0, 0, 0, 0] took ids 6, 5, 4 of 8),
    so training (torch path) and inference (kernel) routed the same logits to different experts. Both now give
    the reference's ids in its order: best first, a tie (of experts or of groups) to the lower id; a NaN row (all
    tied as NaN) too."""
    gen = torch.Generator().manual_seed(13)
    values = torch.tensor([0.0, 1.0, 3.0])  # sigmoid pair sums all distinct: a group tie is a tie in float64 too
    logits = values[torch.randint(0, 3, (24, 16), generator=gen)].to(dtype)
    logits[0] = 0.0
    bias = torch.zeros(16)
    for cfg, b in ((TopKConfig(top_k=4, renormalize=True), None), (TopKConfig(top_k=5), None),
                   (TopKConfig(top_k=3, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                               routed_scaling_factor=2.5, group_score="top2_sum"), bias),
                   (TopKConfig(top_k=3, num_expert_group=8, topk_group=3), None)):
        out = select_experts(logits, cfg, b)
        ref_ids, ref_w = reference_routing(logits, cfg, b)
        assert out.topk_ids.tolist() == ref_ids, cfg
        torch.testing.assert_close(out.topk_weights, torch.tensor(ref_w, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    nan_row = torch.zeros(1, 16, dtype=dtype)
    nan_row[0, 9] = float("nan")
    assert select_experts(nan_row, TopKConfig(top_k=3)).topk_ids.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_router_gradient_equals_a_float64_reference(dtype, tol):
    """Training a router: d(loss)/d(router_logits) through topk_weights equals the float64 gradient of the plain
    formula (scores of the picked ids, renormalised, scaled) within the logits' precision; a -inf logit (a masked
    expert) gets gradient 0, not NaN."""
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(24, 16, generator=gen).to(dtype)
    logits[2, 5] = float("-inf")
    bias = torch.randn(16, generator=gen) * 0.2
    for cfg, b in ((TopKConfig(top_k=4, renormalize=True), None), (TopKConfig(top_k=3), None),
                   (TopKConfig(top_k=4, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                               routed_scaling_factor=2.5, group_score="top2_sum"), bias),
                   (TopKConfig(top_k=1, scoring="sigmoid"), None)):
        leaf = logits.clone().requires_grad_()
        out = select_experts(leaf, cfg, b)
        upstream = torch.randn(out.topk_weights.shape, generator=gen)
        (out.topk_weights * upstream).sum().backward()
        ref_leaf = logits.double().requires_grad_()
        scores = ref_leaf.softmax(-1) if cfg.scoring == "softmax" else ref_leaf.sigmoid()
        ids = torch.tensor(reference_routing(logits, cfg, b)[0])
        assert torch.equal(out.topk_ids.long().sort(1).values, ids.sort(1).values), cfg
        weights = scores.gather(1, out.topk_ids.long())
        if cfg.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        (weights * cfg.routed_scaling_factor * upstream.double()).sum().backward()
        assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all() and leaf.grad[2, 5] == 0
        assert (leaf.grad.double() - ref_leaf.grad).norm() <= tol * ref_leaf.grad.norm(), cfg


def test_router_logits_with_no_expert_are_named():
    """[T, 0] logits: no expert to pick from (the top_k check said "allowed 1..0")."""
    with pytest.raises(ValueError, match=r"router_logits has shape \[3, 0\]: no expert to pick from; expected \[T, E\] "
                                         r"with E >= 1"):
        ep.select_experts(torch.randn(3, 0), ep.TopKConfig(top_k=2))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_router_logits_and_bias_are_routed(dtype, routing_path):
    """float8 logits or a float8 correction bias (floating dtypes, which select_experts takes) failed on the torch
    path with torch's NotImplementedError ("isneginf_cpu" / "isfinite" not implemented for float8). Widened to
    float32 (exact), they route as their float32 values do, -inf masking included; a NaN logit is named."""
    gen = torch.Generator().manual_seed(11)
    # each row a permutation of -2, -1.75, .., 1.75 (exact in both float8 formats): no tie for the picks to break
    logits = torch.stack([torch.randperm(16, generator=gen) * 0.25 - 2 for _ in range(9)]).to(dtype)
    bias = (torch.randn(16, generator=gen) * 0.3).to(dtype)
    if dtype == torch.float8_e5m2:  # (e4m3fn has no inf)
        logits[:, 5] = float("-inf")
    cfg = TopKConfig(top_k=3, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                     routed_scaling_factor=2.5)
    check(logits, cfg, bias)  # (the reference reads the float8 values widened: the same numbers)
    check(logits, TopKConfig(top_k=3, scoring="softmax", renormalize=True))
    bias[2] = float("nan")
    with pytest.raises(ValueError, match=r"correction_bias has a non-finite value nan at \[2\]"):
        select_experts(logits, cfg, bias)
    if routing_path == "kernel":  # (Triton's interpreter reads a float8 NaN as a large finite value)
        return
    logits[4, 7] = float("nan")
    layer = ep.EPMoE(16, 3, 8, 8, dispatcher="standard", runner="torch", topk_config=cfg)
    with pytest.raises(ValueError, match=r"router_logits has nan at \[4, 7\]"):
        layer(torch.randn(9, 8, generator=gen), router_logits=logits)


@pytest.mark.parametrize("value", [-1e39, 1e39])
def test_float64_bias_beyond_float32_is_refused(value, routing_path):
    """A float64 correction bias entry past float32's range passed the finiteness check, then was inf in the float32
    choice: with -1e39 on expert 1 (group 0 kept alone) the torch path picked expert 6, from a group left out, and
    the kernel picked expert 1; +1e39 picked its expert for every token. Now it is refused, naming the entry;
    float64 logits score in float64, where it is an ordinary bias."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(5, 8, generator=gen)
    bias = torch.randn(8, generator=gen, dtype=torch.float64) * 0.3
    bias[1] = value
    cfg = TopKConfig(top_k=2, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=1, group_score="max")
    with pytest.raises(ValueError, match=rf"correction_bias has {re.escape(str(value))} at \[1\], beyond float32's "
                                         rf"range \(router_logits of dtype torch.float32 are scored in float32\); "
                                         rf"allowed: \|bias\| <= 3.40282e\+38"):
        select_experts(logits, cfg, bias)
    with pytest.raises(ValueError, match=r"correction_bias has .* at \[1\], beyond float32's range"):
        select_experts(logits.bfloat16(), cfg, bias)
    bias[1] = 3e38  # (within float32: finite, routed)
    check(logits, cfg, bias)
    bias[1] = value
    ids = select_experts(logits.double(), cfg, bias).topk_ids  # float64 logits: the bias is in range
    assert ((ids // 2 == ids[:, :1] // 2).all() and (value < 0) != (ids == 1).any(1).all())
