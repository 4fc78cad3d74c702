"""EPMoE(standard, torch) against the float64 reference: outputs and gradients."""
import pytest
import torch

import ep_runtime as ep
from ep_runtime.reference import moe_reference, rel_err
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance


@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("K,E", [(1, 4), (2, 4), (4, 4), (1, 64), (2, 64), (8, 64)])  # K = E included
def test_standard_fp32_matches_reference(T, K, E):
    layer = ep.EPMoE(E, K, 32, 24, dispatcher="standard", runner="torch")
    errors = check_layer(layer, make_problem(layer.config, [T], seed=T * 100 + K + E), 0)
    assert max(errors.values()) <= tolerance(torch.float32), errors


CONFIGS = {
    "gelu": dict(activation="gelu"),
    "gelu_tanh_bias": dict(activation="gelu_tanh", has_bias=True),
    "non_gated_silu": dict(is_gated=False),
    "gpt_oss_swiglu": dict(gemm1_alpha=1.702, gemm1_clamp_limit=0.3, has_bias=True),
    "gpt_oss_no_limit": dict(gemm1_alpha=1.702),
    "clamped_swiglu": dict(gemm1_clamp_limit=0.3),  # DeepSeek-V4: act(min(gate, L)) * clamp(up, -L, L)
    "routed_scaling": dict(routed_scaling_factor=2.5),
    "weight_on_input": dict(apply_router_weight_on_input=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_fields_match_reference(name):
    layer = ep.EPMoE(8, 2, 32, 16, runner="torch", dtype=torch.float64, **CONFIGS[name])
    errors = check_layer(layer, make_problem(layer.config, [25], seed=7), 0)
    assert max(errors.values()) <= tolerance(torch.float64), errors


@pytest.mark.parametrize("alpha", [1.702, None])
def test_gpt_oss_clamp_is_active(alpha):
    # A tight limit must change the result (otherwise the clamp tests above could not fail), with gpt-oss's alpha
    # and without (DeepSeek-V4's clamped SwiGLU).
    kw = dict(gemm1_alpha=alpha, runner="torch", dtype=torch.float64)
    a = ep.EPMoE(4, 1, 16, 8, gemm1_clamp_limit=0.05, **kw)
    b = ep.EPMoE(4, 1, 16, 8, **kw)
    b.load_state_dict(a.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 16, dtype=torch.float64, generator=gen)
    # every expert, random weights (all ids 0 and weights 1 only showed the clamp acting on expert 0)
    ids, w = torch.arange(10, dtype=torch.int32).remainder(4).view(10, 1), torch.rand(10, 1, generator=gen) + 0.1
    ya, yb = a(x, ids, w), b(x, ids, w)
    for e in range(4):
        rows = ids[:, 0] == e
        assert not torch.allclose(ya[rows], yb[rows]), e


def test_router_logits_path_equals_explicit_topk():
    cfg = ep.TopKConfig(top_k=2, renormalize=True)
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch", dtype=torch.float64, topk_config=cfg)
    x = torch.randn(9, 16, dtype=torch.float64)
    logits = torch.randn(9, 8)
    ids, w = ep.select_experts(logits, cfg)
    assert torch.equal(layer(x, router_logits=logits), layer(x, ids, w))
    # select_experts' TopKOutput passed whole (as SGLang's layers take it), in x's [T, H] and [batch, seq, H] forms
    assert torch.equal(layer(x, ep.select_experts(logits, cfg)), layer(x, ids, w))
    assert torch.equal(layer(x.view(3, 3, 16), (ids.view(3, 3, 2), w.view(3, 3, 2))), layer(x, ids, w).view(3, 3, 16))
    # a tuple of another length is named (it read "forward needs topk_ids and topk_weights")
    with pytest.raises(TypeError, match=r"^topk_ids is a tuple of 3 items; allowed: the ids tensor \[T, K\] with "
                                        r"topk_weights \[T, K\] as the next argument, or an ep.TopKOutput"):
        layer(x, (ids, w, w))
    # the refused call leaves the layer computing the float64 reference (this compared layer(x, ids, w) with itself)
    ref = moe_reference(x, ids, w.double(), layer.w13, layer.w2, layer.config)
    assert rel_err(layer(x, router_logits=logits), ref) <= tolerance(torch.float64)


def test_load_experts_keeps_only_the_shard():
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch")
    w13, w2 = torch.randn(8, 16, 16), torch.randn(8, 16, 8)
    layer.load_experts(w13, w2)
    assert layer.w13.shape == (8, 16, 16) and torch.equal(layer.w13, w13)
    with pytest.raises(ValueError, match=r"w13 has shape \[8, 15, 16\]; expected \[8, 16, 16\]"):
        layer.load_experts(torch.randn(8, 15, 16), w2)


@pytest.mark.parametrize("bad,error,match", [
    (dict(ids=[[0, 8]]), ValueError, r"topk_ids has id 8 at \[0, 1\]; allowed -1..7 \(num_experts=8\)"),
    (dict(ids=[[0, -2]]), ValueError, r"topk_ids has id -2 at \[0, 1\]; allowed -1..7"),
    (dict(ids=[[0]]), ValueError, r"topk_ids has shape \[1, 1\]; expected \[1, 2\]"),
    (dict(x_cols=15), ValueError, r"x has shape \[1, 15\]; expected \[T, 16\]"),
    (dict(x_dtype=torch.float64), TypeError, "x has dtype torch.float64; this layer's weights are torch.float32"),
    (dict(ids_dtype=torch.float32), TypeError, "topk_ids has dtype torch.float32; expected a signed integer dtype"),
    (dict(weights=[[0.5, float("nan")]]), ValueError, "topk_weights has a non-finite value nan"),
])
def test_bad_input_names_argument_value_and_range(bad, error, match):
    # the exact type per case (a wrong value or shape: ValueError; a wrong dtype: TypeError), not either of them
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch")
    x = torch.randn(1, bad.get("x_cols", 16), dtype=bad.get("x_dtype", torch.float32))
    ids = torch.tensor(bad.get("ids", [[0, 1]]), dtype=bad.get("ids_dtype", torch.int32))
    w = torch.tensor(bad.get("weights", [[0.5] * ids.shape[1]]))
    with pytest.raises(error, match=match):
        layer(x, ids, w)


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="relu"), "activation='relu'; allowed: silu, gelu, gelu_tanh"),
    (dict(top_k=9), "top_k=9 must be <= num_experts=8"),
    (dict(gemm1_alpha=1.0, activation="gelu"), r"gemm1_alpha \(gpt-oss SwiGLU\) needs is_gated=True and activation="),
    (dict(gemm1_clamp_limit=7.0, is_gated=False), "gemm1_clamp_limit=7.0 clamps gate and up: it needs is_gated=True"),
    (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor=inf must be a finite number"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0; allowed: a finite number > 0"),
    (dict(routed_scaling_factor=-1), r"routed_scaling_factor=-1.0; allowed: a finite number > 0"),
    (dict(gemm1_alpha=float("nan")), "gemm1_alpha=nan must be a finite number"),
    (dict(gemm1_clamp_limit="7"), r"gemm1_clamp_limit='7' must be a number > 0 \(inf: no clamp\)"),
    (dict(gemm1_clamp_limit=True), r"gemm1_clamp_limit=True must be a number > 0"),
    (dict(num_experts=True), "num_experts=True must be an int >= 1"),
    (dict(dispatcher="deepep_ll", dispatcher_options={"num_max_dispatch_tokens_per_rank": True}),
     "num_max_dispatch_tokens_per_rank=True; allowed: an int >= 1"),
    (dict(dispatcher="mori", dispatcher_options={"max_dispatch_tokens_per_rank": 2 ** 64}),
     "max_dispatch_tokens_per_rank=18446744073709551616; allowed: an int >= 1 and <= 2147483647"),
    (dict(dtype=torch.int32), r"dtype=torch.int32; allowed: torch.float32, torch.bfloat16"),
    (dict(dtype="float8"), r"dtype='float8'; allowed"),
    (dict(device="gpu0"), r"device='gpu0' is not a torch device"),
    (dict(device=0.5), r"device=0.5 is not a torch device \(.*\); allowed: a torch.device, its name \('cpu', "),
    (dict(expert_to_rank=[0] * 8), r"expert_to_rank=\[0, 0, 0, 0, 0, 0, 0, 0\]; allowed: None with dispatcher='standard'"),
])
def test_bad_config(kwargs, match):
    args = dict(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ep.EPMoE(**args, runner="torch")
    if "expert_to_rank" in kwargs:  # the registry's create, as the layer
        with pytest.raises(ValueError, match=match):
            ep.dispatchers.create("standard", ep.MoeConfig(8, 2, 16, 8), expert_to_rank=kwargs["expert_to_rank"])


@pytest.mark.parametrize("name", ["is_gated", "has_bias", "apply_router_weight_on_input"])
@pytest.mark.parametrize("value", ["False", None, 0, 2.0])
def test_config_flags_must_be_bools(name, value):
    """MoeConfig took any value for its flags: is_gated="False" (a config file's string) built a gated layer,
    apply_router_weight_on_input="False" scaled the inputs, None left them off, with no error."""
    with pytest.raises(TypeError, match=rf"{name}={value!r}; allowed: True or False"):
        ep.EPMoE(8, 2, 16, 8, runner="torch", **{name: value})


def _standard_on_ranks(rank, world_size):
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="standard", runner="torch")
    problem = make_problem(layer.config, [11 * (r + 1) if r != 1 else 0 for r in range(world_size)], seed=5)
    return check_layer(layer, problem, rank)


@pytest.mark.parametrize("R", [2, 4])
def test_standard_replicated_experts_on_ranks(R):
    for errors in run_ranks(_standard_on_ranks, R):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def test_batched_input_is_flattened_and_restored():
    # A Hugging Face block hands [batch, seq, H]; ids/weights/logits come as [batch, seq, K or E].
    cfg = ep.TopKConfig(top_k=2, renormalize=True)
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch", dtype=torch.float64, topk_config=cfg)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    logits = torch.randn(3, 5, 8)
    y = layer(x, router_logits=logits)
    ids, w = ep.select_experts(logits.reshape(15, 8), cfg)
    assert y.shape == (3, 5, 16) and torch.equal(y.reshape(15, 16), layer(x.reshape(15, 16), ids, w))
    assert torch.equal(layer(x, ids.view(3, 5, 2), w.view(3, 5, 2)), y)
    with pytest.raises(ValueError, match=r"topk_ids has shape \[5, 3, 2\]; expected \[3, 5, 2\] .* or \[15, 2\]"):
        layer(x, ids.view(5, 3, 2), w.view(3, 5, 2))
    # already flat, as a Hugging Face router's logits come (computed on the flattened tokens): taken as they are
    assert torch.equal(layer(x, router_logits=logits.reshape(15, 8)), y)
    assert torch.equal(layer(x, ids, w), y) and torch.equal(layer(x, ids.view(3, 5, 2), w), y)
    # a wrong hidden size is named in the shape given (it named the flattened [15, 15])
    with pytest.raises(ValueError, match=r"^x has shape \[3, 5, 15\]; expected \[\.\.\., 16\] \(hidden_size=16"):
        layer(x[..., :15], ids.view(3, 5, 2), w.view(3, 5, 2))


def test_dtype_by_name_and_non_finite_weights():
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch", dtype="bfloat16")
    assert layer.w13.dtype == torch.bfloat16
    w13, w2 = torch.randn(8, 16, 16), torch.randn(8, 16, 8)
    w2[5, 3, 2] = float("inf")
    with pytest.raises(ValueError, match=r"w2 \(experts 0..7\) has a non-finite value inf at \[5, 3, 2\]"):
        layer.load_experts(w13, w2)


@pytest.mark.parametrize("fp8", [False, True])
def test_every_expert_load_refuses_a_non_finite_weight_in_the_same_words(fp8):
    """load_experts, load_expert and load_state_dict share one rule: an expert weight is finite as the layer
    stores it (a float64 value past float32's range is inf in a float32 layer; fp8 by its NaN pattern).
    Each refuses it naming where it came from, the value and the place, and leaves the layer as it was."""
    gen = torch.Generator().manual_seed(7)
    E, H, I = 4, 32, 16
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64), torch.randn(E, H, I, generator=gen)
    if fp8:
        quant = ep.QuantConfig()
        layer = ep.EPMoE(E, 2, H, I, runner="torch", quant_config=quant)
        (w13, s13), (w2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
        w13.view(torch.uint8)[2, 5, 1] = 0x7F  # float8_e4m3fn's NaN
        scales = dict(w13_scale_inv=s13, w2_scale_inv=s2)
        fault = "has NaN at {}; allowed: finite fp8 values"
    else:
        layer = ep.EPMoE(E, 2, H, I, runner="torch")
        w13[2, 5, 1] = 1e300
        scales = {}
        fault = "has a non-finite value inf at {}"
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    refused = {}
    for how, load in {"load_experts": lambda: layer.load_experts(w13, w2, **scales),
                      "load_expert": lambda: layer.load_expert(2, w13=w13[2], w2=w2[2],
                                                               **{k: v[2] for k, v in scales.items()}),
                      "load_state_dict": lambda: layer.load_state_dict(dict(w13=w13, w2=w2, **scales))}.items():
        with pytest.raises(ValueError) as err:
            load()
        refused[how] = str(err.value)
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items()), how
    assert refused == {"load_experts": "w13 (experts 0..3) " + fault.format([2, 5, 1]),
                       "load_expert": "w13 (expert 2) " + fault.format([5, 1]),
                       "load_state_dict": "state_dict['w13'] " + fault.format([2, 5, 1])}


def test_dtype_follows_torch_default_dtype():
    """dtype left out follows torch.set_default_dtype, as torch's modules do (gpt-fast and torchtitan set
    it before building a model): a float64 default gives a float64 layer that equals the reference."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = ep.EPMoE(8, 2, 32, 16, runner="torch")
    finally:
        torch.set_default_dtype(before)
    assert layer.dtype == torch.float64
    errors = check_layer(layer, make_problem(layer.config, [13], seed=11), 0)
    assert max(errors.values()) <= tolerance(torch.float64), errors
    assert ep.EPMoE(8, 2, 32, 16, runner="torch").dtype == torch.float32  # torch's own default


def test_numpy_scalars_and_loads_that_must_keep_working():
    np = pytest.importorskip("numpy")
    cfg = ep.TopKConfig(top_k=np.int64(2), routed_scaling_factor=np.float32(2.5), num_expert_group=np.int64(2),
                        topk_group=1, renormalize=np.bool_(True))
    assert (cfg.top_k, cfg.routed_scaling_factor, cfg.num_expert_group, cfg.renormalize) == (2, 2.5, 2, True)
    assert type(cfg.renormalize) is bool
    layer = ep.EPMoE(np.int64(8), 2, 16, 8, runner="torch", dtype=None, gemm1_alpha=np.float32(1.5), topk_config=cfg)
    assert layer.w13.dtype == torch.get_default_dtype() and layer.config.num_experts == 8
    bf16 = ep.EPMoE(8, 2, 16, 8, runner="torch", dtype=torch.bfloat16)
    w13, w2 = torch.randn(8, 16, 16), torch.randn(8, 16, 8)
    # (float8 has no isfinite: the load named that, not the missing scales; fp8 values without their scales are
    # refused now, as load_state_dict refuses them: cast as numbers they were off by their scales, silently)
    with pytest.raises(ValueError, match="w13 has dtype torch.float8_e4m3fn but no block scales were given"):
        bf16.load_experts(w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn))
    meta = ep.EPMoE(8, 2, 16, 8, runner="torch", device="meta")
    meta.load_experts(w13.to("meta"), w2.to("meta"))


def test_non_finite_weights_and_logits_needing_a_gradient_are_named_without_a_warning():
    """A NaN in topk_weights or router_logits that need a gradient (a training step) is named as it is
    otherwise: reading the bad value for the message converted a tensor needing a gradient to a float, which
    made torch warn ("Converting a tensor with requires_grad=True to a scalar"), and under warnings as
    errors (`-W error`) that warning replaced the ValueError naming the value."""
    import warnings
    gen = torch.Generator().manual_seed(3)
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch")
    x = torch.randn(4, 16, generator=gen)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32)
    weights = torch.rand(4, 2, generator=gen)
    weights[2, 1] = float("nan")
    logits = torch.randn(4, 8, generator=gen)
    logits[1, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"^topk_weights has a non-finite value nan at \[2, 1\]$"):
            layer(x, ids, weights.requires_grad_())
        with pytest.raises(ValueError, match=r"^router_logits has nan at \[1, 3\], which gives non-finite routing"):
            layer(x, router_logits=logits.requires_grad_())
