"""runner='masked' (Triton under TRITON_INTERPRET=1, fp16/fp32): == float64 reference on the rows below
masked_m for every config field, padding rows (NaN) never read, and EPMoE(deepep_ll, masked) == reference
with gradients, on 1 and 2 gloo ranks. Token-row formats reach it through the runner core's conversion
(tests/test_matrix.py runs it under every dispatcher)."""
import dataclasses
import inspect

import pytest
import torch

import ep_runtime as ep
from ep_runtime.config import ExpertWeights, MoeConfig
from ep_runtime.quant import QuantConfig
from ep_runtime.reference import expert_reference, moe_reference, rel_err
from ep_runtime.runners.masked_runner import MaskedRunner, MaskedTiles, k_splits, row_splits
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

L, ROWS, H, I = 3, 20, 40, 24  # H, I and ROWS not multiples of the interpreter tiles: edge masks are exercised
MASKED_M = [20, 0, 7]

CONFIGS = {
    "silu": {},
    "gelu": dict(activation="gelu"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "not_gated": dict(is_gated=False),
    "not_gated_gelu_tanh": dict(is_gated=False, activation="gelu_tanh"),
    "bias": dict(has_bias=True),
    "bias_not_gated": dict(has_bias=True, is_gated=False, activation="gelu"),
    "gpt_oss": dict(gemm1_alpha=1.702, gemm1_clamp_limit=0.5, has_bias=True),
    "alpha_only": dict(gemm1_alpha=1.702),
    "clamped_swiglu": dict(gemm1_clamp_limit=0.5),
    "routed_scaling_factor": dict(routed_scaling_factor=2.5),
    "apply_router_weight_on_input": dict(apply_router_weight_on_input=True),  # folded in by the dispatcher
}


def _problem(fields, dtype, seed=0):
    config = MoeConfig(L * 2, 2, H, I, **fields)
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, std=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    weights = ExpertWeights(randn(L, config.w13_rows, H, std=H ** -0.5), randn(L, H, I, std=I ** -0.5),
                            randn(L, config.w13_rows, std=0.5) if config.has_bias else None,
                            randn(L, H, std=0.5) if config.has_bias else None)
    recv_x = randn(L, ROWS, H)
    masked_m = torch.tensor(MASKED_M, dtype=torch.int32)
    for e, m in enumerate(MASKED_M):
        recv_x[e, m:] = float("nan")  # padding: must never be read
    return config, weights, recv_x, masked_m


def _reference(config, weights, recv_x):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return [config.routed_scaling_factor * expert_reference(
        recv_x[e, :m].double(), weights.w13[e].double(), weights.w2[e].double(), config,
        f64(weights.b13[e] if weights.b13 is not None else None), f64(weights.b2[e] if weights.b2 is not None else None))
        for e, m in enumerate(MASKED_M)]


# bfloat16: on CPU the interpreter's bf16 dot is wrong (PLATFORM.md); the kernel upcasts there, as the
# triton runner's does (without it y was off by ~4e10 relative: every bf16 masked run on CPU was garbage).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_valid_rows_match_float64_reference(name, dtype):
    config, weights, recv_x, masked_m = _problem(CONFIGS[name], dtype)
    out = MaskedRunner(config).run_masked(recv_x, masked_m, weights)
    assert out.shape == recv_x.shape and out.dtype == dtype
    for e, (m, ref) in enumerate(zip(MASKED_M, _reference(config, weights, recv_x))):
        assert torch.isfinite(out[e, :m]).all()
        assert rel_err(out[e, :m], ref) <= tolerance(dtype), (e, rel_err(out[e, :m], ref))


def test_padding_rows_are_never_read():
    config, weights, poisoned, masked_m = _problem(CONFIGS["bias"], torch.float32)
    clean = torch.nan_to_num(poisoned, nan=0.0)
    runner = MaskedRunner(config)
    a, b = runner.run_masked(poisoned, masked_m, weights), runner.run_masked(clean, masked_m, weights)
    for e, m in enumerate(MASKED_M):
        assert torch.equal(a[e, :m], b[e, :m])


@pytest.mark.parametrize("row_splits", [1, 2, 8])
def test_other_tiles_and_row_splits(row_splits):
    # BLOCK_M 16 < masked_m 20: two row blocks per expert, the second partly valid; split over programs.
    config, weights, recv_x, masked_m = _problem(CONFIGS["gelu"], torch.float32, seed=3)
    tiles = MaskedTiles(16, 16, 64, 16, 4, 1, row_splits)
    out = MaskedRunner(config, tiles=tiles).run_masked(recv_x, masked_m, weights)
    for e, (m, ref) in enumerate(zip(MASKED_M, _reference(config, weights, recv_x))):
        assert rel_err(out[e, :m], ref) <= 1e-5


def test_row_splits_follow_the_rows_an_expert_expects():
    """deepep_ll's buffer holds M*R rows per expert; a full, uniform step fills rows * top_k / num_experts of them."""
    mixtral, deepseek = MoeConfig(8, 2, 64, 32), MoeConfig(256, 8, 64, 32)
    assert row_splits(128 * 8, mixtral, 64) == 4  # one local expert of 8 ranks: 256 rows expected
    assert row_splits(128 * 4, mixtral, 64) == 2
    assert row_splits(128 * 8, deepseek, 64) == 1  # 32 local experts of 8 ranks: 32 rows expected
    assert row_splits(128 * 64, deepseek, 64) == 4
    assert row_splits(1 << 20, mixtral, 64) == 4  # at most MAX_ROW_SPLITS
    assert row_splits(0, mixtral, 64) == 1


def test_automatic_row_splits_compute_the_bits_of_one_program_per_expert():
    """ROW_SPLITS None picks 4 here (64 rows * top_k 2 / 2 experts, 16-row blocks): each row block is still one
    program's, with the same K loop, so the output is bit-identical to ROW_SPLITS=1."""
    config = MoeConfig(2, 2, H, I)
    gen = torch.Generator().manual_seed(7)
    weights = ExpertWeights(torch.randn(2, config.w13_rows, H, generator=gen) * H ** -0.5,
                            torch.randn(2, H, I, generator=gen) * I ** -0.5)
    recv_x = torch.randn(2, 64, H, generator=gen)
    masked_m = torch.tensor([64, 37], dtype=torch.int32)
    recv_x[1, 37:] = float("nan")
    assert row_splits(64, config, 16) == 4
    auto = MaskedRunner(config).run_masked(recv_x, masked_m, weights)
    one = MaskedRunner(config, tiles=MaskedTiles(16, 32, 32, 32, 4, 1, 1)).run_masked(recv_x, masked_m, weights)
    for e, m in enumerate(masked_m.tolist()):
        assert torch.equal(auto[e, :m], one[e, :m])
        ref = expert_reference(recv_x[e, :m].double(), weights.w13[e].double(), weights.w2[e].double(), config)
        assert rel_err(auto[e, :m], ref) <= 1e-5


@pytest.mark.parametrize("splits", [2, 3, 5, 8])
def test_k_splits_match_the_reference_and_leave_their_counts_at_zero(splits):
    """gemm2 split over K (K = I = 100: 7 steps of 16; 3 splits take 3, 3 and 1 steps, 5 take 2, 2, 2, 1 and none,
    8 are clamped to 7 of one step): an expert of at most 16 rows (one block) is split, the one of 20 rows keeps
    its row blocks whole (the bits of an unsplit launch), an empty one is skipped. Three calls on fresh data, the
    second with one more expert holding rows (the split experts' slots move): valid rows within fp32 rounding of
    the float64 reference with bias and routed_scaling_factor (the epilogue after the partials' sum), the kept
    counts all zero after each, and the third call repeats the first's bits."""
    from ep_runtime.runners import masked_runner
    from ep_runtime.scratch import SCRATCH
    config = MoeConfig(6, 2, 40, 100, has_bias=True, routed_scaling_factor=2.5)
    gen = torch.Generator().manual_seed(11)
    weights = ExpertWeights(torch.randn(3, config.w13_rows, 40, generator=gen) * 40 ** -0.5,
                            torch.randn(3, 40, 100, generator=gen) * 0.1, torch.randn(3, config.w13_rows, generator=gen),
                            torch.randn(3, 40, generator=gen))
    tiles = MaskedTiles(16, 16, 32, 16, 4, 1, 1, splits)
    outputs = []
    for counts in ([20, 0, 7], [20, 3, 16], [20, 0, 7]):
        recv_x = torch.randn(3, 20, 40, generator=torch.Generator().manual_seed(sum(counts)))
        masked_m = torch.tensor(counts, dtype=torch.int32)
        for e, m in enumerate(counts):
            recv_x[e, m:] = float("nan")
        out = masked_runner.masked_forward(recv_x, masked_m, weights, config, tiles)
        for e, m in enumerate(counts):
            ref = config.routed_scaling_factor * expert_reference(
                recv_x[e, :m].double(), weights.w13[e].double(), weights.w2[e].double(), config,
                weights.b13[e].double(), weights.b2[e].double())
            assert rel_err(out[e, :m], ref) <= 1e-5, (counts, e, rel_err(out[e, :m], ref))
        plan = next(p for p in masked_runner._PLANS.values() if p.tiles == tiles)
        assert plan.split_key is not None  # the split was taken, not clamped away
        assert torch.equal(SCRATCH.get(plan.split_key, recv_x.device, lambda: None)[1], torch.zeros(6, dtype=torch.int32))
        outputs.append((recv_x, masked_m, out))
    (recv_x, masked_m, first), third = outputs[0], outputs[2][2]
    assert torch.equal(first[0], third[0]) and torch.equal(first[2, :7], third[2, :7])
    whole = masked_runner.masked_forward(recv_x, masked_m, weights, config, dataclasses.replace(tiles, K_SPLITS=1))
    assert torch.equal(first[0], whole[0])  # the expert of two row blocks, inside a launch that splits another
    declined = masked_runner._Plan(recv_x, weights, config, tiles, None)
    declined.split_below = 0  # the experts holding rows have more column blocks than SMs: nothing is split
    declined = declined.run(recv_x, masked_m, weights)
    assert torch.equal(declined[2, :7], whole[2, :7]) and torch.equal(declined[0], whole[0])
    if splits == 3:  # (partials of 3, 3 and 1 steps summed: another association than one running sum; 8 splits
        # add one-step partials in order, the running sum's own bits)
        assert not torch.equal(first[2, :7], whole[2, :7])  # so the split did run above


def test_k_splits_fill_the_sms_a_decode_step_leaves_idle():
    """gemm2's K split on 132 SMs: the row splits' programs where there are several, else min(L, top_k) experts'
    column blocks split until two programs per SM where they fill under half the SMs."""
    mixtral, deepseek, gpt_oss = MoeConfig(8, 2, 4096, 14336), MoeConfig(256, 8, 7168, 2048), MoeConfig(128, 4, 2880, 2880)
    assert k_splits(8, mixtral, 128, 132, 1) == 4  # 2 experts x 32 blocks = 64 programs -> 256
    assert k_splits(1, mixtral, 128, 132, 4) == 4  # one local expert (EP 8): its 4 row splits
    assert k_splits(1, mixtral, 128, 132, 1) == 8  # 32 -> 256
    assert k_splits(32, deepseek, 128, 132, 1) == 1  # 8 experts x 56 blocks = 448 programs already
    assert k_splits(1, deepseek, 128, 132, 1) == 4  # 56 -> 224
    assert k_splits(16, gpt_oss, 128, 132, 1) == 1  # 4 x 23 = 92 programs: over half the SMs
    with pytest.raises(ValueError, match=r"MaskedTiles.K_SPLITS=0; allowed: None \(chosen per shape\) or an int >= 1"):
        MaskedTiles(K_SPLITS=0)


def test_all_zero_masked_m_reads_nothing():
    config, weights, recv_x, _ = _problem(CONFIGS["silu"], torch.float32)
    recv_x.fill_(float("nan"))
    out = MaskedRunner(config).run_masked(recv_x, torch.zeros(L, dtype=torch.int32), weights)
    assert out.shape == recv_x.shape
    # Through the layer: every slot -1 -> masked_m all zero -> y exactly 0, no NaN.
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_ll", runner="masked",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 8})
    y = layer(torch.randn(5, 16), torch.full((5, 2), -1, dtype=torch.int32), torch.rand(5, 2))
    assert torch.equal(y, torch.zeros(5, 16))


def test_masked_m_given_as_a_strided_view_is_read_by_value():
    """masked_m [L] int32 as a view with a stride (a column of a per-expert table): every kernel that reads it
    (the GEMMs, and the fp8 path's quantization of each expert's first masked_m rows) reads masked_m[l], not the
    l-th int32 after its first element (expert 2 read the table's next row: 0 rows computed, y garbage)."""
    config, weights, recv_x, masked_m = _problem(CONFIGS["silu"], torch.float16, seed=4)
    column = torch.stack([masked_m, torch.full_like(masked_m, ROWS)], 1)[:, 0]  # [L] with stride 2
    assert not column.is_contiguous() and torch.equal(column, masked_m)
    out = MaskedRunner(config).run_masked(recv_x, column, weights)
    for e, (m, ref) in enumerate(zip(MASKED_M, _reference(config, weights, recv_x))):
        assert rel_err(out[e, :m], ref) <= tolerance(torch.float16), e
    quant = QuantConfig()  # fp8 experts: float rows quantized by row_counts=masked_m, then two block-scaled GEMMs
    (w13, s13), (w2, s2) = quant.quantize_weight(weights.w13.float()), quant.quantize_weight(weights.w2.float())
    fp8 = ExpertWeights(w13, w2, w13_scale_inv=s13, w2_scale_inv=s2, quant=quant)
    want, got = (MaskedRunner(config).run_masked(recv_x, m, fp8) for m in (masked_m, column))
    for e, m in enumerate(MASKED_M):
        assert torch.equal(got[e, :m], want[e, :m]), e


def test_backward_matches_reference_single_process():
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="deepep_ll", runner="masked", has_bias=True,
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 16})
    errors = check_layer(layer, make_problem(layer.config, [13], seed=5), 0)
    assert max(errors.values()) <= tolerance(torch.float32), errors


def _masked_rank(rank, world_size, extra):
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="deepep_ll", runner="masked",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 16}, **extra)
    problem = make_problem(layer.config, [16, 9][:world_size], seed=41, ep_size=world_size)
    errors = check_layer(layer, problem, rank)
    # Poison the dispatch output's padding rows: the layer's runner must give the same combine.
    topk = ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])
    with torch.no_grad():
        out = layer.dispatcher.dispatch(problem.xs[rank].float(), topk)
        clean = layer.dispatcher.combine(layer.runner.run(out, layer.weights))
        for e, m in enumerate(out.masked_m.tolist()):
            out.recv_x[e, m:] = float("nan")
        dirty = layer.dispatcher.combine(layer.runner.run(out, layer.weights))
    return errors, bool(torch.equal(clean, dirty))


@pytest.mark.parametrize("extra", [{}, dict(apply_router_weight_on_input=True, routed_scaling_factor=2.5),
                                   dict(is_gated=False, activation="gelu", has_bias=True)])
def test_layer_on_two_ranks_matches_reference(extra):
    for errors, poison_free in run_ranks(_masked_rank, 2, extra):
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert poison_free


@pytest.mark.parametrize("fields", [{}, dict(apply_router_weight_on_input=True, routed_scaling_factor=2.5)])
def test_token_rows_through_the_conversion_match_the_reference(fields):
    """run() on token rows (RunnerInput): the core groups the pairs expert-major, the kernels compute them,
    the rows come back weighted and summed per token; == the float64 reference, with -1 and repeated ids
    (the torch runner reads the same RunnerInput grouping, so it would share a grouping bug)."""
    config = MoeConfig(L, 3, H, I, **fields)
    gen = torch.Generator().manual_seed(9)
    weights = ExpertWeights(torch.randn(L, config.w13_rows, H, generator=gen) / H ** 0.5,
                            torch.randn(L, H, I, generator=gen) / I ** 0.5)
    local_ids = torch.randint(-1, L, (17, 3), generator=gen)
    local_ids[4] = torch.tensor([2, 2, -1])
    x, w = torch.randn(17, H, generator=gen), torch.rand(17, 3, generator=gen)
    inp = ep.RunnerInput.from_local_ids(x, local_ids, w, ep.ExpertPlacement(L))
    y = MaskedRunner(config).run(inp, weights)
    # one rank holding all L experts: local ids are the global ones
    assert rel_err(y, moe_reference(x, local_ids, w.double(), weights.w13, weights.w2, config)) <= tolerance(torch.float32)


def test_rejects_what_it_cannot_compute():
    config = MoeConfig(8, 2, 16, 8)
    with pytest.raises(ValueError, match="does not support GEMM hooks"):
        MaskedRunner(config, hooks=ep.runners.GemmHooks(after_gemm1=lambda i, o, e: None))
    config, weights, recv_x, masked_m = _problem({}, torch.float32)
    with pytest.raises(ValueError, match=r"masked_m has shape \[2\]"):
        MaskedRunner(config).run_masked(recv_x, masked_m[:2], weights)
    with pytest.raises(TypeError, match="w13 has dtype torch.float16; allowed: torch.float32"):
        MaskedRunner(config).run_masked(recv_x, masked_m, ExpertWeights(weights.w13.half(), weights.w2))
    with pytest.raises(ValueError, match=rf"w2 has shape \[{L}, {H}, {I + 1}\]; expected \[{L}, {H}, {I}\]"):
        MaskedRunner(config).run_masked(recv_x, masked_m, ExpertWeights(weights.w13, torch.zeros(L, H, I + 1)))


def test_tokens_of_a_dtype_it_cannot_compute_are_named_before_their_weights():
    """float64 rows with fp32 weights were told "w13 has dtype torch.float32; allowed: torch.float64", a dtype
    runner='masked' refuses next; the rows' dtype is named first, with the dtypes it computes in."""
    config, weights, recv_x, masked_m = _problem({}, torch.float32)
    with pytest.raises(ValueError, match=r"x dtype=torch.float64; runner='masked' computes in torch.float32, "
                                         r"torch.bfloat16, torch.float16"):
        MaskedRunner(config).run_masked(recv_x.double(), masked_m, weights)


@pytest.mark.parametrize("tiles,error,match", [
    (lambda: MaskedTiles(16, 24, 32, 32, 4, 1, 1), ValueError, r"MaskedTiles.BLOCK_N1=24; allowed: a power of two >= 16"),
    (lambda: MaskedTiles(0, 32, 32, 32, 4, 1, 1), ValueError, r"MaskedTiles.BLOCK_M=0; allowed: a power of two >= 16"),
    (lambda: (16, 32, 32, 32, 4, 1, 1), TypeError, r"tiles is a tuple; allowed: None or a MaskedTiles"),
    (lambda: MaskedTiles(16, 32, 32, 32, 4, 1, 0), ValueError,
     r"MaskedTiles.ROW_SPLITS=0; allowed: None \(chosen per shape\) or an int >= 1"),
])
def test_tiles_that_the_kernel_cannot_take_are_named(tiles, error, match):
    """Hand-made tiles failed inside Triton naming nothing: BLOCK_N1=24 with an InterpreterError "arange's range
    must be a power of 2", BLOCK_M=0 with a ZeroDivisionError, a tuple with an AttributeError."""
    config, weights, recv_x, masked_m = _problem({}, torch.float32)
    with pytest.raises(error, match=match):
        MaskedRunner(config, tiles=tiles()).run_masked(recv_x, masked_m, weights)


@pytest.mark.parametrize("dispatcher", ["deepep_ll", "standard"])
def test_bf16_layer_matches_reference(dispatcher):
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="masked", dtype=torch.bfloat16,
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 16} if dispatcher == "deepep_ll" else None)
    errors = check_layer(layer, make_problem(layer.config, [11], seed=4), 0)
    assert max(errors.values()) <= tolerance(torch.bfloat16), errors


def test_kernels_compile_per_layer_shape_not_per_buffer_rows(monkeypatch):
    """Token rows reach the kernels as an expert-major buffer whose rows per expert are the busiest expert's pair
    count, another at nearly every call: the constexprs the GEMMs are launched with (a GPU compiles a variant per
    value) must not follow it (the buffer's rows and expert strides are runtime arguments), else every call of a
    token-major format compiled anew."""
    from ep_runtime.runners import masked_runner
    monkeypatch.setattr(masked_runner, "_PLANS", {})
    kernel, launches = masked_runner._masked_gemm_kernel, []
    fn = kernel.fn if hasattr(kernel, "fn") else kernel.kernel.fn
    params = list(inspect.signature(fn).parameters)
    constexpr = {p for p in params if "constexpr" in str(fn.__annotations__.get(p, ""))}

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = {**dict(zip(params, args)), **kwargs}
                launches.append({k: v for k, v in named.items() if k in constexpr})
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(masked_runner, "_masked_gemm_kernel", Spy())
    config = MoeConfig(L, 3, H, I, has_bias=True)
    gen = torch.Generator().manual_seed(2)
    weights = ExpertWeights(torch.randn(L, config.w13_rows, H, generator=gen) / H ** 0.5,
                            torch.randn(L, H, I, generator=gen) / I ** 0.5, torch.randn(L, config.w13_rows, generator=gen),
                            torch.randn(L, H, generator=gen))
    runner, capacities = MaskedRunner(config), set()
    for T in (1, 4, 17, 40):
        local_ids = torch.randint(-1, L, (T, 3), generator=gen)
        x, w = torch.randn(T, H, generator=gen), torch.rand(T, 3, generator=gen)
        capacities.add(int(torch.bincount(local_ids[local_ids >= 0], minlength=L).max()))
        inp = ep.RunnerInput.from_local_ids(x, local_ids, w, ep.ExpertPlacement(L))
        y = runner.run(inp, weights)
        ref = moe_reference(x, local_ids, w.double(), weights.w13, weights.w2, config, weights.b13, weights.b2)
        assert rel_err(y, ref) <= tolerance(torch.float32)
    assert len(capacities) > 2
    first, second = launches[0::2], launches[1::2]
    assert all(c == first[0] for c in first) and all(c == second[0] for c in second), launches


def test_a_kept_plan_serves_only_its_layout():
    """masked_forward keeps a plan per shape: a later call whose rows or weights have the same shapes but other
    strides takes its own and gives the same bits."""
    config, weights, recv_x, masked_m = _problem(CONFIGS["bias"], torch.float32)
    out = MaskedRunner(config).run_masked(recv_x, masked_m, weights)
    b13_strided = torch.stack([weights.b13, weights.b13], dim=2)[:, :, 0]
    w2_columns = weights.w2.transpose(1, 2).contiguous().transpose(1, 2)
    x_strided = torch.cat([recv_x, recv_x], dim=2)[:, :, H:]
    for x, other in ((recv_x, ExpertWeights(weights.w13, weights.w2, b13_strided, weights.b2)),
                     (recv_x, ExpertWeights(weights.w13, w2_columns, weights.b13, weights.b2)), (x_strided, weights)):
        got = MaskedRunner(config).run_masked(x, masked_m, other)
        for e, m in enumerate(MASKED_M):
            assert torch.equal(got[e, :m], out[e, :m]), e


def _experts(L, config, gen, fp8):
    """(w13, w2) fp32 on gen's device and the ExpertWeights the runner gets: bf16, or fp8 with block scales."""
    H, I = config.hidden_size, config.intermediate_size
    w13 = torch.randn(L, config.w13_rows, H, generator=gen, device=gen.device) * H ** -0.5
    w2 = torch.randn(L, H, I, generator=gen, device=gen.device) * I ** -0.5
    if not fp8:
        return w13, w2, ExpertWeights(w13.bfloat16(), w2.bfloat16())
    quant = QuantConfig()
    (q13, s13), (q2, s2) = quant.quantize_weight(w13), quant.quantize_weight(w2)
    return w13, w2, ExpertWeights(q13, q2, None, None, s13, s2, quant)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_automatic_row_splits_give_the_bits_of_one_split(fp8):
    """Two local Mixtral-like experts (E=8, K=2) in a 512-row buffer: row_splits picks 2 (128 rows expected), the
    experts hold 300 and 17 rows (several row blocks, one partial); every valid row equals ROW_SPLITS=1's bit for
    bit, bf16 and fp8; against the unquantized float64 reference within bf16's bound, or for fp8 tests/test_fp8.py's
    bound from e4m3's step (weights and rows each rounded: ~0.072 expected, 0.1 asserted)."""
    from ep_runtime.runners.masked_runner import FP8_TILES, masked_forward
    config = MoeConfig(8, 2, 256, 128)
    gen = torch.Generator(device="cuda").manual_seed(9)
    w13, w2, weights = _experts(2, config, gen, fp8)
    recv_x = torch.randn(2, 512, 256, generator=gen, device="cuda").bfloat16()
    masked_m = torch.tensor([300, 17], dtype=torch.int32, device="cuda")
    assert row_splits(512, config, 64) == 2
    whole_k = dataclasses.replace(FP8_TILES if fp8 else MaskedTiles(), K_SPLITS=1)  # (K splits: the next test)
    one = dataclasses.replace(whole_k, ROW_SPLITS=1)
    auto = masked_forward(recv_x, masked_m, weights, config, tiles=whole_k)
    single = masked_forward(recv_x, masked_m, weights, config, tiles=one)
    for e, m in enumerate(masked_m.tolist()):
        assert torch.equal(auto[e, :m], single[e, :m])
        ref = expert_reference(recv_x[e, :m].double(), w13[e].double(), w2[e].double(), config)
        assert rel_err(auto[e, :m].cpu(), ref.cpu()) < (0.1 if fp8 else tolerance(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_k_splits_equal_one_program_per_column_block(fp8):
    """Mixtral-like decode (E=8, K=2, 8 local experts, H=512, I=1024): gemm2's automatic K split (8 programs of a
    column block meet through a count in global memory) against K_SPLITS=1 on 20 fresh inputs, eager and in a
    CUDA-graph replay, the experts' rows alternating between two sets (0-100 rows: one expert crosses the 64-row
    block, and the split experts' slots move). Each expert's valid rows within 2^-8 of the unsplit result (the
    same products summed in another fp32 order, then rounded to bf16: at most one bf16 step apart per element; a
    race that left one of the 8 partials out would be off by ~1/3), the unsplit result within bf16's or e4m3's
    bound of the float64 reference as in the row-split test; the kept partials, poisoned with NaN before the
    eager calls, were written (the split ran) and every kept count is back at 0."""
    from ep_runtime.runners import masked_runner
    from ep_runtime.scratch import SCRATCH
    config = MoeConfig(8, 2, 512, 1024)
    gen = torch.Generator(device="cuda").manual_seed(12)
    w13, w2, weights = _experts(8, config, gen, fp8)
    whole = dataclasses.replace(masked_runner.FP8_TILES if fp8 else MaskedTiles(), K_SPLITS=1)
    sets = [torch.tensor(m, dtype=torch.int32, device="cuda") for m in ([0, 1, 5, 64, 100, 0, 0, 3],
                                                                        [7, 0, 65, 2, 0, 0, 30, 0])]
    recv_x = torch.randn(8, 128, 512, generator=gen, device="cuda").bfloat16()
    static, static_m = recv_x.clone(), sets[0].clone()
    masked_runner._PLANS.clear()  # (plans are remade on demand: the next one made is this call's)
    masked_runner.masked_forward(static, static_m, weights, config)  # the plan (and its kept counts) before capture
    (plan,) = masked_runner._PLANS.values()
    assert plan.split_key is not None
    partial, counts = SCRATCH.get(plan.split_key, recv_x.device, lambda: None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = masked_runner.masked_forward(static, static_m, weights, config)
    for trial in range(20):
        masked_m = sets[trial % 2]
        recv_x.normal_(generator=gen)
        static.copy_(recv_x)
        static_m.copy_(masked_m)
        graph.replay()
        partial.fill_(float("nan"))
        eager = masked_runner.masked_forward(recv_x, masked_m, weights, config)
        assert torch.isfinite(partial).any() and torch.equal(counts, torch.zeros_like(counts))
        unsplit = masked_runner.masked_forward(recv_x, masked_m, weights, config, tiles=whole)
        for e, m in enumerate(masked_m.tolist()):
            if m == 0:
                continue
            for got in (eager, replayed):
                assert rel_err(got[e, :m].float(), unsplit[e, :m].float()) <= 2 ** -8, (trial, e)
            if trial < 2:
                ref = expert_reference(recv_x[e, :m].double(), w13[e].double(), w2[e].double(), config)
                assert rel_err(unsplit[e, :m].cpu(), ref.cpu()) < (0.1 if fp8 else tolerance(torch.bfloat16))


def _k_split_rank(rank, world_size, dispatcher, fields, tiles):
    from ep_runtime.runners import masked_runner
    from ep_runtime.scratch import SCRATCH
    options = {"num_max_dispatch_tokens_per_rank": 16} if dispatcher == "deepep_ll" else None
    layer = ep.EPMoE(8, 2, 40, 33, dispatcher=dispatcher, runner="masked", dispatcher_options=options,
                     runner_options={"tiles": tiles}, **fields)
    errors = []
    for seed, tokens in ((51, [16, 0]), (52, [5, 13])):  # an empty rank, then other rows per expert (slots move)
        errors.append(check_layer(layer, make_problem(layer.config, tokens, seed=seed, ep_size=world_size), rank))
    split = [p.split_key for p in masked_runner._PLANS.values() if p.tiles.K_SPLITS == tiles.K_SPLITS and p.split_key]
    counts = [SCRATCH.get(key, torch.device("cpu"), lambda: None)[1] for key in split]
    return errors, bool(split), all(not c.any() for c in counts)


@pytest.mark.parametrize("dispatcher,fields,tiles", [
    ("deepep_ll", dict(has_bias=True, routed_scaling_factor=2.5), MaskedTiles(16, 16, 16, 16, 4, 1, 1, 3)),
    ("deepep_normal", dict(apply_router_weight_on_input=True, is_gated=False, activation="gelu", has_bias=True),
     MaskedTiles(16, 16, 16, 16, 4, 1, 2, 4)),
])
def test_layer_with_k_splits_forced_matches_reference_on_two_ranks(dispatcher, fields, tiles):
    """EPMoE(runner="masked") with the caller's tiles asking for gemm2's K split (the interpreter never picks one):
    deepep_ll's own expert-major rows, and a token-row format converted by the runner core, on 2 gloo ranks (one of
    them empty at the first call), odd H and I (33 = 3 K steps of 16: 4 splits leave one program without a step),
    with and without row splits: y and the gradients (recomputed by the torch runner) == the float64 reference,
    the split ran and its kept counts are back at 0."""
    for errors, split_ran, counts_zero in run_ranks(_k_split_rank, 2, dispatcher, fields, tiles):
        for e in errors:
            assert max(e.values()) <= tolerance(torch.float32), e
        assert split_ran and counts_zero


def test_rows_whose_offset_passes_int32_are_read_where_they_are():
    """An expert-major buffer whose rows lie 2**30 + 64 elements apart (a strided view: storage reserved, three rows
    touched): row 2 starts at element 2**31 + 128, past int32. The kernels' row offsets are int64 (an expert's
    M*R rows times H pass 2**31 from M*R = 299594 at H=7168); in int32 row 2's offset wrapped negative, and the
    load read outside the buffer. Every valid row equals the float64 reference."""
    config = MoeConfig(2, 1, 64, 32)
    gen = torch.Generator().manual_seed(3)
    stride = 2 ** 30 + 64
    storage = torch.empty(2 * stride + config.hidden_size, dtype=torch.float16)  # (~4.3 GB reserved, untouched)
    recv_x = storage.as_strided((1, 3, config.hidden_size), (3 * stride, stride, 1))
    recv_x.copy_(torch.randn(1, 3, config.hidden_size, generator=gen).half())
    w13 = (torch.randn(1, config.w13_rows, 64, generator=gen) * 64 ** -0.5).half()
    w2 = (torch.randn(1, 64, 32, generator=gen) * 32 ** -0.5).half()
    out = MaskedRunner(config).run_masked(recv_x, torch.tensor([3], dtype=torch.int32), ExpertWeights(w13, w2))
    ref = expert_reference(recv_x[0].double(), w13[0].double(), w2[0].double(), config)
    assert rel_err(out[0], ref) <= tolerance(torch.float16), rel_err(out[0], ref)
