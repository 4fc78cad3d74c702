"""fp8: the formats (block-scaled e4m3 weights, per-token-per-128-channel activations, fp32/UE8M0
scales), DeepSeek-V3 checkpoint loading, the fused quantization kernel (Triton interpreter on CPU),
the torch / triton / masked runners' w8a8 paths and fp8 dispatch payloads on gloo ranks.

Tolerances. Against the float64 reference run on the dequantized weights and the fp8-rounded
activations (reference.fp8_round_trip: the expert input and the intermediate activation), the fp8
layer is held to the bf16 bound (2e-2): what is left is fp32 accumulation, the bf16 output and the
rare activation element that rounds to the neighbouring fp8 value. Against the unquantized float64
reference: e4m3 keeps 3 mantissa bits, so one rounding moves a normal value by at most u = 2^-4
relative and, uniformly over the mantissa, by u / sqrt(3) ~ 3.6% rms or less. Four independent
roundings (x, w13, the activation, w2) add in quadrature through the two GEMMs, whose sums keep the
relative rms: about 2u / sqrt(3) ~ 7.2%; the tests assert < 0.1 (and > 1e-3, so quantization
really happened).
"""
import math

import pytest
import torch

import ep_runtime as ep
from ep_runtime.quant import QuantConfig, decode_scales, encode_ue8m0, fp8_relative_step
from ep_runtime.reference import fp8_round_trip, moe_reference, rel_err
from ep_runtime.testing import make_problem, run_ranks, tolerance

triton = pytest.importorskip("triton")
from ep_runtime.quant_kernels import quantize_rows  # noqa: E402

BF16 = tolerance(torch.bfloat16)
# See the module doc: 2u / sqrt(3) ~ 0.072 expected, asserted below 0.1.
UNQUANTIZED_BOUND = 0.1
assert 2 * fp8_relative_step() / math.sqrt(3) < UNQUANTIZED_BOUND


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- formats

def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="format='nvfp9'"):
        QuantConfig(format="nvfp9")
    with pytest.raises(ValueError, match="weight_block=\\(128, 100\\)"):
        QuantConfig(weight_block=(128, 100))
    with pytest.raises(ValueError, match="activation_group=64 must equal weight_block\\[1\\]=128"):
        QuantConfig(activation_group=64)
    with pytest.raises(ValueError, match="scale_encoding='e5m2'"):
        QuantConfig(scale_encoding="e5m2")


@pytest.mark.parametrize("encoding", ["fp32", "ue8m0"])
def test_weight_round_trip_is_within_one_e4m3_rounding(encoding):
    q = QuantConfig(scale_encoding=encoding)
    w = torch.randn(3, 300, 200, generator=_seeded(1)) * torch.logspace(-4, 1, 300).view(1, 300, 1)
    w[1, :128, :128] = 0  # an all-zero block
    qw, scale = q.quantize_weight(w)
    assert qw.dtype == torch.float8_e4m3fn and scale.shape == (3, 3, 2) and scale.dtype == torch.float32
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    if encoding == "ue8m0":
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    back = q.dequantize_weight(qw, scale)
    s = scale.repeat_interleave(128, 1)[:, :300].repeat_interleave(128, 2)[:, :, :200]
    # normal range: half a step of 2^(e-3) is at most u = 2^-4 of the value; subnormal: half of 2^-9 * scale
    bound = torch.maximum(w.abs() * fp8_relative_step(), s * 2.0 ** -10)
    assert bool(((back - w).abs() <= bound * (1 + 1e-6)).all())
    assert torch.equal(back[1, :128, :128], torch.zeros(128, 128))
    if encoding == "fp32":  # each block's largest magnitude maps onto e4m3's largest value
        assert float(qw.float().abs().amax()) == 448.0


@pytest.mark.parametrize("encoding", ["fp32", "ue8m0"])
def test_quantize_kernel_equals_torch_bit_for_bit(encoding):
    q = QuantConfig(scale_encoding=encoding)
    x = (torch.randn(9, 300, generator=_seeded(2)) * torch.logspace(-3, 3, 9).view(9, 1)).to(torch.bfloat16)
    x[4, 128:256] = 0
    x[5, 7] = 1e-30  # a subnormal fp8 value after scaling
    got_q, got_s = quantize_rows(x, q, interpreted=True)
    want_q, want_s = q.quantize_activation(x)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    if encoding == "ue8m0":  # exponent bytes, as the dispatch payload carries them
        byte_scale = torch.empty(9, 3, dtype=torch.uint8)
        quantize_rows(x, q, scale=byte_scale, interpreted=True)
        assert torch.equal(byte_scale, encode_ue8m0(want_s)) and torch.equal(decode_scales(byte_scale), want_s)
    # rows flagged off are neither read nor written
    q_out = torch.full((9, 300), 3.0).to(torch.float8_e4m3fn)
    row_ok = torch.arange(9) % 2 == 0
    quantize_rows(x, q, q=q_out, row_ok=row_ok, interpreted=True)
    assert torch.equal(q_out[1].float(), torch.full((300,), 3.0))
    assert torch.equal(q_out[2].view(torch.uint8), want_q[2].view(torch.uint8))


def test_activation_round_trip_matches_float64_reference_rounding():
    q = QuantConfig()
    x = torch.randn(16, 384, generator=_seeded(3), dtype=torch.float64)
    ours = q.dequantize_activation(*q.quantize_activation(x.float())).double()
    assert rel_err(ours, fp8_round_trip(x)) < 1e-3  # the same roundings up to fp32 scale arithmetic
    assert fp8_relative_step() / 8 < rel_err(ours, x) < fp8_relative_step()


# ----------------------------------------------------------------- loading

def _fp8_checkpoint(E, H, I, seed=4):
    q = QuantConfig()
    gen = _seeded(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=gen) * I ** -0.5
    return w13, w2, *q.quantize_weight(w13), *q.quantize_weight(w2)


def _load_rank(rank, world_size):
    E, H, I = 8, 256, 128
    _, _, q13, s13, q2, s2 = _fp8_checkpoint(E, H, I)
    layer = ep.EPMoE(E, 2, H, I, dispatcher="deepep_normal", dtype=torch.bfloat16)
    layer.load_experts(q13, q2, w13_scale_inv=s13, w2_scale_inv=s2)
    mine = layer.placement.local_expert_ids()
    kept = (torch.equal(layer.w13.view(torch.uint8), q13[mine].view(torch.uint8))
            and torch.equal(layer.w2_scale_inv, s2[mine]) and layer.w13.dtype == torch.float8_e4m3fn)
    back = layer.gather_experts()
    returned = (torch.equal(back.w13.view(torch.uint8), q13.view(torch.uint8)) and torch.equal(back.w13_scale_inv, s13)
                and torch.equal(back.w2.view(torch.uint8), q2.view(torch.uint8)) and back.quant == QuantConfig())
    shard = ep.EPMoE(E, 2, H, I, dispatcher="deepep_normal", dtype=torch.bfloat16)
    shard.load_experts(q13[mine], q2[mine], w13_scale_inv=s13[mine], w2_scale_inv=s2[mine])
    return kept, returned, torch.equal(shard.w2.view(torch.uint8), layer.w2.view(torch.uint8))


def test_deepseek_layout_loads_this_ranks_slice_and_gathers_back():
    assert run_ranks(_load_rank, 2) == [(True, True, True)] * 2


def test_quantize_on_load_equals_quantizing_the_slice():
    E, H, I = 4, 256, 128
    w13, w2, q13, s13, q2, s2 = _fp8_checkpoint(E, H, I)
    layer = ep.EPMoE(E, 2, H, I, dtype=torch.bfloat16)
    layer.load_experts(w13, w2, quantize="fp8_block")
    assert layer.quant == QuantConfig() and not layer.w13.requires_grad
    assert torch.equal(layer.w13.view(torch.uint8), q13.view(torch.uint8)) and torch.equal(layer.w2_scale_inv, s2)
    built = ep.EPMoE(E, 2, H, I, dtype=torch.bfloat16, quant_config=QuantConfig())
    built.load_experts(w13, w2)  # a layer built fp8 quantizes float weights with its config
    assert torch.equal(built.w2.view(torch.uint8), q2.view(torch.uint8))


@pytest.mark.parametrize("case,match", [
    ("shape", r"w13_scale_inv has shape \[4, 2, 1\]; expected \[4, 2, 2\]"),
    ("dtype", "w2_scale_inv has dtype torch.bfloat16; expected torch.float32"),
    ("nan", r"w13_scale_inv has nan at \[1, 0, 1\]; allowed: finite values > 0"),
    ("zero", r"w2_scale_inv has 0.0 at \[2, 1, 0\]; allowed: finite values > 0"),
    ("missing", "w2_scale_inv is missing"),
    ("unquantized", "w13_scale_inv was given but w13 has dtype torch.float32"),
    ("quantize", "quantize='int4'"),
])
def test_bad_scales_raise_naming_the_argument(case, match):
    E, H, I = 4, 256, 128
    w13, w2, q13, s13, q2, s2 = _fp8_checkpoint(E, H, I)
    args = dict(w13_scale_inv=s13, w2_scale_inv=s2)
    weights = (q13, q2)
    if case == "shape":
        args["w13_scale_inv"] = s13[:, :, :1]
    elif case == "dtype":
        args["w2_scale_inv"] = s2.bfloat16()
    elif case == "nan":
        args["w13_scale_inv"] = s13.clone().index_put_((torch.tensor(1), torch.tensor(0), torch.tensor(1)),
                                                       torch.tensor(float("nan")))
    elif case == "zero":
        args["w2_scale_inv"] = s2.clone().index_put_((torch.tensor(2), torch.tensor(1), torch.tensor(0)),
                                                     torch.tensor(0.0))
    elif case == "missing":
        del args["w2_scale_inv"]
    elif case == "unquantized":
        weights, args = (w13, w2), dict(w13_scale_inv=s13)
    elif case == "quantize":
        weights, args = (w13, w2), dict(quantize="int4")
    layer = ep.EPMoE(E, 2, H, I, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        layer.load_experts(*weights, **args)


# ----------------------------------------------------------------- runners (one process)

def _fp8_references(problem, rank_xs, ids, weights, config, ue8m0_input=False):
    """(fp8 reference, unquantized reference) in float64 for the tokens of one rank. ue8m0_input: an
    fp8 dispatch rounded x with power-of-two scales (the experts' own rounding uses fp32 scales)."""
    q = QuantConfig()
    w13 = q.dequantize_weight(*q.quantize_weight(problem.w13.float())).double()
    w2 = q.dequantize_weight(*q.quantize_weight(problem.w2.float())).double()
    b13, b2 = (None if b is None else b.to(torch.bfloat16).double() for b in (problem.b13, problem.b2))  # as stored
    exact = moe_reference(rank_xs, ids, weights.double(), problem.w13, problem.w2, config, b13, b2)
    x = fp8_round_trip(rank_xs, ue8m0=ue8m0_input)
    return moe_reference(x, ids, weights.double(), w13, w2, config, b13, b2, fp8_activations=True,
                         fp8_input=False), exact


FIELDS = dict(apply_router_weight_on_input=True, routed_scaling_factor=2.5, activation="gelu", has_bias=True)


@pytest.mark.parametrize("runner,extra,kernel", [
    ("torch", {}, "auto"), ("triton", {}, "auto"), ("torch", FIELDS, "auto"), ("triton", FIELDS, "auto"),
    # the persistent grouped GEMM kernels with TMA weight tiles (block scales, fp8 epilogue), forced
    # through the knob (the pointer-load twin differs only in the weight tile load, tested unscaled)
    ("triton", FIELDS, "tma"), ("triton", {}, "tma_stacked")])
def test_fp8_experts_match_the_fp8_reference(runner, extra, kernel, monkeypatch):
    monkeypatch.setenv("EP_RUNTIME_TRITON_GEMM_KERNEL", kernel)
    E, K, H, I = 8, 2, 256, 128
    layer = ep.EPMoE(E, K, H, I, runner=runner, dtype=torch.bfloat16, **extra)
    problem = make_problem(layer.config, [24], seed=5)
    biases = [None if b is None else b.float() for b in (problem.b13, problem.b2)]
    layer.load_experts(problem.w13.float(), problem.w2.float(), *biases, quantize="fp8_block")
    x = problem.xs[0].to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x, problem.topk_ids[0], problem.topk_weights[0])
    fp8_ref, exact = _fp8_references(problem, x.double(), problem.topk_ids[0], problem.topk_weights[0],
                                     layer.config)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, fp8_ref) < BF16
    assert 1e-3 < rel_err(y, exact) < UNQUANTIZED_BOUND
    bf16 = ep.EPMoE(E, K, H, I, runner="torch", dtype=torch.bfloat16, **extra)
    bf16.load_experts(problem.w13.bfloat16(), problem.w2.bfloat16(), *[None if b is None else b.bfloat16() for b in biases])
    with torch.no_grad():
        assert rel_err(y, bf16(x, problem.topk_ids[0], problem.topk_weights[0])) < UNQUANTIZED_BOUND


def test_fp8_is_inference_only():
    layer = ep.EPMoE(4, 2, 128, 128, dtype=torch.bfloat16, quant_config=QuantConfig())
    x = torch.randn(3, 128, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [1, -1]])
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x, ids, torch.rand(3, 2))
    with torch.no_grad():
        assert layer(x, ids, torch.rand(3, 2)).shape == (3, 128)
        layer.to(torch.bfloat16)  # casts every floating tensor, fp8 included
        with pytest.raises(RuntimeError, match="w13/w2 now have dtype torch.bfloat16"):
            layer(x, ids, torch.rand(3, 2))


# ----------------------------------------------------------------- fp8 dispatch on gloo ranks

def _dispatch_rank(rank, world_size, forced, cases):
    from ep_runtime.dispatchers import exchange_kernels as xk
    E, K, H, I = 8, 2, 256, 128
    results = {}
    for dispatcher, encoding, runner, experts in cases:
        options = {"use_fp8": True, "fp8_scale_encoding": encoding}
        options.update({"deepep_ll": {"num_max_dispatch_tokens_per_rank": 12},
                        "mori": {"max_dispatch_tokens_per_rank": 12}}.get(dispatcher, {}))
        if True:
            layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16,
                             dispatcher_options=options)
            problem = make_problem(layer.config, [12, 9][:world_size], seed=6, ep_size=world_size)
            if experts == "fp8":
                layer.load_experts(problem.w13.float(), problem.w2.float(), quantize="fp8_block")
            else:
                layer.load_experts(problem.w13.bfloat16(), problem.w2.bfloat16())
            x = problem.xs[rank].to(torch.bfloat16)
            ids, weights = problem.topk_ids[rank], problem.topk_weights[rank]
            with torch.no_grad(), (xk.forced() if forced else _nothing()):
                out = layer.dispatcher.dispatch(x, ep.TopKOutput(ids, weights))
                y = layer(x, ids, weights)
            ue8m0 = encoding == "ue8m0"
            fp8_ref, exact = _fp8_references(problem, x.double(), ids, weights, layer.config, ue8m0)
            if experts == "bf16":  # fp8 on the wire only: the reference rounds x alone
                fp8_ref = moe_reference(fp8_round_trip(x.double(), ue8m0=ue8m0), ids, weights.double(),
                                        problem.w13.bfloat16().double(), problem.w2.bfloat16().double(), layer.config)
            G = H // 128
            scale_ok = (out.recv_x.dtype == torch.float8_e4m3fn and out.recv_x_scale.shape[-1] == G
                        and out.recv_x_scale.shape[:-1] == out.recv_x.shape[:-1]
                        and out.recv_x_scale.dtype == (torch.uint8 if encoding == "ue8m0" else torch.float32)
                        and out.x_dtype == torch.bfloat16)
            results[(dispatcher, encoding, runner, experts)] = (rel_err(y, fp8_ref), rel_err(y, exact), scale_ok)
    return results


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# forced: the CUDA kernel path (fused quantization into the wire rows, byte payloads) on CPU tensors
# under the interpreter; else the torch path. Each case: (dispatcher, scale encoding, runner, experts).
@pytest.mark.parametrize("forced,cases", [
    (False, [("deepep_normal", "fp32", "torch", "fp8"), ("deepep_normal", "fp32", "torch", "bf16"),
             ("deepep_ll", "ue8m0", "torch", "fp8"), ("mori", "ue8m0", "torch", "fp8")]),
    (True, [("deepep_normal", "ue8m0", "triton", "fp8"), ("deepep_ll", "fp32", "masked", "fp8"),
            ("deepep_ll", "fp32", "torch", "bf16"), ("mori", "fp32", "triton", "fp8")]),
])
def test_fp8_dispatch_matches_the_reference(forced, cases):
    for results in run_ranks(_dispatch_rank, 2, forced, cases, timeout=240):
        for case, (fp8_err, exact_err, scale_ok) in results.items():
            assert scale_ok, case
            assert fp8_err < BF16, (case, fp8_err)
            assert exact_err < UNQUANTIZED_BOUND, (case, exact_err)


def test_tune_writes_an_fp8_table(tmp_path):
    from ep_runtime.runners import triton_kernels as kernels
    from ep_runtime.runners import triton_tune
    out = tmp_path / "table.json"
    candidate = kernels.BlockConfig(16, kernels.GemmTiles(64, 64, 1, 4, 1), kernels.GemmTiles(64, 64, 1, 4, 1))
    table = triton_tune.tune(2, 2, 128, 128, torch.float8_e4m3fn, [4], out, candidates=[candidate], device="cpu",
                             repeats=1)
    assert kernels.BlockConfig.from_json(table["4"]) == candidate
    assert kernels.shape_key(2, 2, 128, 128, torch.float8_e4m3fn) in out.read_text()


def test_fp8_dispatch_halves_the_wire_row():
    from ep_runtime.dispatchers import fp8_payload
    H = 7168
    width, _, _ = fp8_payload.row_layout(H, QuantConfig())
    assert width / (2 * H) < 0.52
    assert fp8_payload.row_layout(H, QuantConfig(scale_encoding="ue8m0"))[0] / (2 * H) < 0.51


def test_fp8_dispatch_options_are_checked():
    cfg = ep.MoeConfig(8, 2, 128, 64)
    with pytest.raises(ValueError, match="use_fp8='yes'"):
        ep.dispatchers.create("deepep_normal", cfg, use_fp8="yes")
    with pytest.raises(ValueError, match="fp8_scale_encoding='e8m0'"):
        ep.dispatchers.create("mori", cfg, use_fp8=True, fp8_scale_encoding="e8m0")
    cfg = ep.MoeConfig(8, 2, 128, 64, apply_router_weight_on_input=True)
    with pytest.raises(ValueError, match="use_fp8=True on deepep_ll"):
        ep.dispatchers.create("deepep_ll", cfg, use_fp8=True)


# ----------------------------------------------------------------- GPU (marker gpu; the lead's H200 runs)

@pytest.mark.parametrize("encoding", ["fp32", "ue8m0"])
@pytest.mark.parametrize("H", [7168, 300])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
def test_gpu_quantize_kernel_equals_torch(encoding, H):
    q = QuantConfig(scale_encoding=encoding)
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = (torch.randn(513, H, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    got_q, got_s = quantize_rows(x, q)
    want_q, want_s = q.quantize_activation(x)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("runner", ["triton", "masked", "torch"])
@pytest.mark.parametrize("T", [1, 64, 2048])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
def test_gpu_fp8_runner_matches_the_fp8_reference(runner, T):
    layer = ep.EPMoE(16, 4, 512, 256, runner=runner, dtype=torch.bfloat16, device="cuda")
    problem = make_problem(layer.config, [T], seed=8)
    layer.load_experts(problem.w13.float().cuda(), problem.w2.float().cuda(), quantize="fp8_block")
    x = problem.xs[0].to(torch.bfloat16).cuda()
    with torch.inference_mode():
        y = layer(x, problem.topk_ids[0].cuda(), problem.topk_weights[0].cuda())
    fp8_ref, exact = _fp8_references(problem, x.double().cpu(), problem.topk_ids[0], problem.topk_weights[0],
                                     layer.config)
    assert rel_err(y.cpu(), fp8_ref) < BF16
    assert rel_err(y.cpu(), exact) < UNQUANTIZED_BOUND


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
@pytest.mark.parametrize("kernel", ["auto", "tma", "tma_stacked"])
def test_gpu_fp8_deepseek_shard_matches_the_fp8_reference(kernel, monkeypatch):
    """DeepSeek-V3's expert shapes (H=7168, I=2048), 8 local experts, K=8, 512 tokens: the tiles the
    tuned tables and defaults pick for real sizes (BLOCK_K clipped to the 128-channel scale group), with
    the grouped GEMM kernel the table picks and forced to each TMA kernel (Hopper and newer)."""
    if kernel.startswith("tma") and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernels need CUDA capability >= 9")
    monkeypatch.setenv("EP_RUNTIME_TRITON_GEMM_KERNEL", kernel)
    E, K, H, I, T = 8, 8, 7168, 2048, 512
    gen = torch.Generator(device="cuda").manual_seed(9)
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=gen) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=gen) * I ** -0.5
    x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(K, dim=1).indices.to(torch.int32)
    weights = torch.rand(T, K, device="cuda", generator=gen)
    q = QuantConfig()
    q13, s13 = q.quantize_weight(w13)
    q2, s2 = q.quantize_weight(w2)
    with torch.inference_mode():
        y = ep.runners.fused_experts(x, q13, q2, ids, weights, w13_scale_inv=s13, w2_scale_inv=s2)
    cfg = ep.MoeConfig(E, K, H, I)
    ref = moe_reference(x.double(), ids, weights.double(), q.dequantize_weight(q13, s13).double(),
                        q.dequantize_weight(q2, s2).double(), cfg, fp8_activations=True)
    assert rel_err(y, ref) < BF16


def _gpu_dispatch_rank(rank, world_size):
    from ep_runtime.distributed import device_for_rank
    device = device_for_rank()
    E, K, H, I = 16, 4, 512, 256
    out = {}
    for dispatcher, runner, options in [
            ("deepep_normal", "triton", {}), ("mori", "triton", {"max_dispatch_tokens_per_rank": 96}),
            ("deepep_ll", "masked", {"num_max_dispatch_tokens_per_rank": 96}),
            ("deepep_normal", "triton", {"fp8_scale_encoding": "ue8m0"})]:
        layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner=runner, dtype=torch.bfloat16, device=device,
                         dispatcher_options={"use_fp8": True, **options})
        problem = make_problem(layer.config, [96, 41][:world_size], seed=10, ep_size=world_size)
        layer.load_experts(problem.w13.float().to(device), problem.w2.float().to(device), quantize="fp8_block")
        x = problem.xs[rank].to(torch.bfloat16)
        ids, weights = problem.topk_ids[rank], problem.topk_weights[rank]
        with torch.inference_mode():
            y = layer(x.to(device), ids.to(device), weights.to(device))
        fp8_ref, exact = _fp8_references(problem, x.double(), ids, weights, layer.config,
                                         options.get("fp8_scale_encoding") == "ue8m0")
        out[f"{dispatcher}/{runner}/{options}"] = (rel_err(y.cpu(), fp8_ref), rel_err(y.cpu(), exact))
    # deepep_ll + masked with fp8 dispatch captures into a CUDA graph; replays with new inputs equal eager
    layer = ep.EPMoE(E, K, H, I, dispatcher="deepep_ll", runner="masked", dtype=torch.bfloat16, device=device,
                     dispatcher_options={"use_fp8": True, "num_max_dispatch_tokens_per_rank": 64},
                     quant_config=QuantConfig())
    gen = torch.Generator(device=device).manual_seed(11 + rank)
    x = torch.randn(64, H, device=device, generator=gen).to(torch.bfloat16)
    ids = torch.rand(64, E, device=device, generator=gen).topk(K, dim=1).indices.to(torch.int32)
    w = torch.rand(64, K, device=device, generator=gen)
    with torch.inference_mode():
        for _ in range(3):
            layer(x, ids, w)  # warm up: compile every kernel before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = layer(x, ids, w)
        x.copy_(torch.randn(64, H, device=device, generator=gen).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        out["graph"] = (rel_err(y_graph.cpu(), layer(x, ids, w).cpu()), 0.0)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_fp8_dispatch_on_two_ranks():
    for result in run_ranks(_gpu_dispatch_rank, 2, backend="nccl", timeout=240, group_timeout=200):
        assert result.pop("graph")[0] == 0.0
        for key, (fp8_err, exact_err) in result.items():
            assert fp8_err < BF16 and exact_err < UNQUANTIZED_BOUND, (key, fp8_err, exact_err)


def test_hf_fp8_experts_are_replaced_and_kept_fp8():
    """transformers' FP8Experts (DeepSeek-V3's fp8 blocks) under EPExperts: fp8 kept, w8a8 result."""
    transformers = pytest.importorskip("transformers")
    fp8_module = pytest.importorskip("transformers.integrations.finegrained_fp8")
    config = transformers.DeepseekV3Config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=4,
                                           num_experts_per_tok=2, hidden_act="silu")
    experts = fp8_module.FP8Experts(config, block_size=(128, 128))
    w13, w2, q13, s13, q2, s2 = _fp8_checkpoint(4, 256, 128, seed=12)
    with torch.no_grad():
        for name, value in (("gate_up_proj", q13), ("gate_up_proj_scale_inv", s13), ("down_proj", q2),
                            ("down_proj_scale_inv", s2)):
            getattr(experts, name).copy_(value)
    wrapped = ep.hf.EPExperts(experts, top_k=2, dispatcher="standard", runner="torch")
    assert wrapped.layer.quant == QuantConfig() and wrapped.layer.dtype == torch.bfloat16
    assert torch.equal(wrapped.layer.w13.view(torch.uint8), q13.view(torch.uint8))
    x = torch.randn(10, 256, generator=_seeded(13)).to(torch.bfloat16)
    ids = torch.tensor([[0, 1], [2, 4], [3, 0], [1, 2], [4, 4], [0, 3], [2, 1], [3, 2], [1, 0], [0, 2]])
    weights = torch.rand(10, 2, generator=_seeded(14))
    with torch.no_grad():
        y = wrapped(x, ids, weights)
    q = QuantConfig()
    ref = moe_reference(x.double(), torch.where(ids == 4, -1, ids), weights.double(),
                        q.dequantize_weight(q13, s13).double(), q.dequantize_weight(q2, s2).double(),
                        wrapped.layer.config, fp8_activations=True)
    assert rel_err(y, ref) < BF16
