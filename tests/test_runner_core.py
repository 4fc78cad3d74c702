import re
from dataclasses import dataclass

import pytest
import torch

import ep_runtime as ep
from ep_runtime.reference import expert_reference, moe_reference, rel_err
from ep_runtime.runner_core import (
    CombineInput,
    DispatchOutput,
    ExpertMajorInput,
    MoeRunner,
    RunnerInput,
    format_path,
    reroute_to_sink,
)
from ep_runtime.testing import random_topk_ids


@dataclass
class UnregisteredOutput(DispatchOutput):
    format = "no_such_format"


def test_unregistered_format_lists_registered_formats():
    cfg = ep.MoeConfig(4, 1, 8, 8)
    runner = MoeRunner(ep.runners.create("torch", cfg), cfg, ep.ExpertPlacement(4))
    with pytest.raises(ValueError, match=r"dispatch format 'no_such_format'.*registered formats: .*deepep_ll.*standard"):
        runner.run(UnregisteredOutput(), None)


def test_every_backend_has_a_path_for_every_format():
    formats = {ep.dispatchers.get(d).format for d in ep.dispatchers.registered()}
    every = {(f, r) for f in formats for r in ep.runners.registered()}
    assert every <= set(ep.registered_pairs())
    assert all(ep.supported_formats(r) == sorted(formats) for r in ep.runners.registered())


def test_registering_a_name_twice_raises():
    from ep_runtime import runner_core
    from ep_runtime.runners.torch_runner import TorchRunner
    with pytest.raises(ValueError, match="runner 'torch' is already registered"):
        ep.runners.register(TorchRunner)
    with pytest.raises(ValueError, match="dispatcher 'standard' is already registered"):
        ep.dispatchers.register(ep.dispatchers.get("standard"))
    with pytest.raises(ValueError, match="dispatch format 'mori' is already registered"):
        runner_core.register_format("mori", RunnerInput, lambda out, placement, config: None)
    with pytest.raises(ValueError, match=r"layout conversion RunnerInput -> ExpertMajorInput is already registered"):
        runner_core.register_conversion(RunnerInput, ExpertMajorInput, lambda inp, config: None)
    runner_core.register_fused("no_such_format", "torch", lambda runner, out, weights: None)
    with pytest.raises(ValueError, match=r"fused function for \('no_such_format', 'torch'\) is already registered"):
        runner_core.register_fused("no_such_format", "torch", lambda runner, out, weights: None)


def test_a_fused_function_replaces_the_whole_step():
    """register_fused (SGLang's register_fused_func): MoeRunner calls it instead of conversion + compute."""
    from ep_runtime import runner_core
    cfg = ep.MoeConfig(4, 1, 8, 8)
    calls = []
    runner_core.register_fused("fused_only_format", "torch",
                               lambda runner, out, weights: calls.append(out) or CombineInput(torch.ones(1), out))
    out = type("FusedOnlyOutput", (DispatchOutput,), {"format": "fused_only_format"})()
    combine = MoeRunner(ep.runners.create("torch", cfg), cfg, ep.ExpertPlacement(4)).run(out, None)
    assert calls == [out] and combine.dispatch_output is out


def test_unknown_backend_and_dispatcher_names():
    with pytest.raises(ValueError, match="runner='nope' is unknown; registered: torch, ") as err:
        ep.EPMoE(4, 1, 8, 8, runner="nope")
    assert all(name in str(err.value) for name in ep.runners.registered())
    with pytest.raises(ValueError, match="dispatcher='nope' is unknown; registered: ") as err:
        ep.EPMoE(4, 1, 8, 8, dispatcher="nope")
    assert all(name in str(err.value) for name in ["standard", "deepep_normal", "deepep_ll", "mori"])
    assert "did you mean" not in str(err.value)  # nothing close to 'nope'
    # a misspelt name: the closest registered ones, as the command line suggests them
    with pytest.raises(ValueError, match=r"\(did you mean deepep_ll or deepep_normal\?\)$"):
        ep.EPMoE(4, 1, 8, 8, dispatcher="deepep")
    with pytest.raises(ValueError, match=r"\(did you mean triton\?\)$"):
        ep.EPMoE(4, 1, 8, 8, runner="trition")
    # a name that is no str (a list or dict, e.g. hf.replace_experts(model, dispatcher=["deepep_ll"])): the same
    # error, not Python's bare "unhashable type: 'list'"
    with pytest.raises(ValueError, match=r"dispatcher=\['deepep_ll'\] is unknown; registered: "):
        ep.EPMoE(4, 1, 8, 8, dispatcher=["deepep_ll"])
    with pytest.raises(ValueError, match=r"runner=\{'torch': 1\} is unknown; registered: torch, "):
        ep.EPMoE(4, 1, 8, 8, runner={"torch": 1})



@pytest.mark.parametrize("bad", ["config", "dispatcher_option", "runner_option"])
def test_create_names_a_bad_config_or_option_and_what_is_allowed(bad):
    """The registries' create() and the layer's *_options: a config that is no MoeConfig, or an option
    the class does not take (a typo), is named with what is allowed (was: AttributeError 'NoneType'
    object has no attribute 'num_experts', a runner built on config='x', or a TypeError naming a
    private __init__ without the options there are)."""
    cfg = ep.MoeConfig(8, 2, 16, 8)
    if bad == "config":
        for config in (None, {"num_experts": 8}, "x"):
            with pytest.raises(TypeError, match=rf"config={config!r}; allowed: an ep.MoeConfig"):
                ep.dispatchers.create("deepep_normal", config)
            with pytest.raises(TypeError, match=rf"config={config!r}; allowed: an ep.MoeConfig"):
                ep.runners.create("torch", config)
    elif bad == "dispatcher_option":
        for name, allowed in (("standard", "expert_to_rank"), ("deepep_ll", "num_max_dispatch_tokens_per_rank, "),
                              ("mori", "max_dispatch_tokens_per_rank, prealloc_max_recv_tokens, ")):
            with pytest.raises(TypeError, match=rf"dispatcher {name} has no option 'num_wrst_tokens'; allowed: "
                                                rf".*{allowed}"):
                ep.dispatchers.create(name, cfg, num_wrst_tokens=4)
        with pytest.raises(TypeError, match="dispatcher deepep_normal has no option 'bogus'; allowed: alignment, "):
            ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_normal", dispatcher_options={"bogus": 1})
    else:
        with pytest.raises(TypeError, match="runner torch has no option 'block_config'; allowed: none"):
            ep.EPMoE(8, 2, 16, 8, runner="torch", runner_options={"block_config": None})
        with pytest.raises(TypeError, match="runner torch has no option 'bogus'; allowed: none"):
            ep.runners.create("torch", cfg, bogus=1)


@pytest.mark.parametrize("device", ["gpu0", 0.5, [0]])
def test_create_names_a_bad_device(device):
    """runners.create and dispatchers.create check `device` as EPMoE does: the torch runner and a gloo
    dispatcher took any value without a word, and runner "auto" failed in torch.device naming nothing."""
    cfg = ep.MoeConfig(8, 2, 16, 8)
    match = rf"device={re.escape(repr(device))} is not a torch device \(.*\); allowed: a torch.device"
    for runner in ("torch", "auto"):
        with pytest.raises(ValueError, match=match):
            ep.runners.create(runner, cfg, device=device)
    with pytest.raises(ValueError, match=match):
        ep.dispatchers.create("standard", cfg, device=device)


@pytest.mark.parametrize("runner", ["torch", "auto"])
def test_create_names_a_token_dtype_no_runner_computes_in(runner):
    """runners.create(dtype=...) takes the tokens' dtype as EPMoE's dtype does (a float dtype or its name) and
    refuses another one naming it and what is allowed; the torch runner (no dtype list of its own) took an
    integer, a complex or an fp8 dtype without a word."""
    cfg = ep.MoeConfig(8, 2, 16, 8)
    for dtype in (torch.int32, torch.complex64, torch.float8_e4m3fn, torch.bool, "int8", "nope", 3):
        with pytest.raises(ValueError, match=rf"dtype=\S*{re.escape(str(dtype))}'?; allowed: torch.float32, "
                                             rf"torch.bfloat16, torch.float16, torch.float64 \(or their names\)"):
            ep.runners.create(runner, cfg, dtype=dtype)
    for dtype in (torch.float64, "bfloat16", None):
        assert ep.runners.create(runner, cfg, dtype=dtype).name == "torch"

def test_reroute_to_sink():
    ids = torch.tensor([[-1, 2], [0, -1]])
    out = reroute_to_sink(ids, ep.ExpertPlacement(5).local_to_local_table())
    assert out.dtype == torch.int32 and out.tolist() == [[5, 2], [0, 5]]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_ids_outside_the_experts_go_to_the_sink_never_out_of_bounds(dtype):
    """Ids outside [0, E) that reach the runner before their deferred check fires (-7, E+5, and an
    int64 id past int32) are dropped: RunnerInput through the torch runner equals the float64
    reference with those pairs set to -1; local ids likewise."""
    gen = torch.Generator().manual_seed(4)
    E, K, H, I = 8, 3, 16, 8
    cfg = ep.MoeConfig(E, K, H, I)
    w13 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64) / 4
    w2 = torch.randn(E, H, I, generator=gen, dtype=torch.float64) / 3
    x = torch.randn(12, H, generator=gen, dtype=torch.float64)
    ids = random_topk_ids(gen, 12, E, K, 1, minus_one_fraction=0.2).to(dtype)
    w = torch.rand(12, K, generator=gen)
    bad = ids.clone()
    bad[1, 0], bad[4, 2], bad[7, 1] = -7, E + 5, 2 ** 40 if dtype == torch.int64 else E
    dropped = torch.where((bad < -1) | (bad >= E), -1, bad)
    want = moe_reference(x, dropped, w.double(), w13, w2, cfg)
    runner = ep.runners.create("torch", cfg)
    p = ep.ExpertPlacement(E)
    for inp in (RunnerInput.from_global_ids(x, bad, w, p), RunnerInput.from_local_ids(x, bad, w, p)):
        assert inp.topk_ids.dtype == torch.int32 and inp.topk_ids.tolist() == torch.where(dropped < 0, E, dropped).tolist()
        assert rel_err(runner.run(inp, ep.ExpertWeights(w13, w2)), want) < 1e-12
    # defer=True (the formats' path): the ids stay as they came, with the table beside them, and a backend
    # that does not read the table gets them mapped, with the same result
    for build in (RunnerInput.from_global_ids, RunnerInput.from_local_ids):
        deferred = build(x, bad, w, p, defer=True)
        assert deferred.topk_ids is bad and deferred.id_table is not None
        assert torch.equal(deferred.routed().topk_ids, build(x, bad, w, p).topk_ids)
        assert deferred.routed().id_table is None and deferred.routed().routed().topk_ids is not bad
        assert rel_err(runner.run(deferred, ep.ExpertWeights(w13, w2)), want) < 1e-12
        pairs, eager = deferred.pairs_by_expert("test"), build(x, bad, w, p).pairs_by_expert("test")
        assert all(torch.equal(getattr(pairs, f), getattr(eager, f))
                   for f in ("token", "expert", "weight", "counts", "place"))


def test_sum_per_token_adds_each_tokens_rows_without_atomics():
    """ExpertPairs.sum_per_token (the torch runner's and the expert-major conversion's per-token sum): token n
    gets the sum of its pairs' rows, with -1 slots, a masked expert, the sink and a token listing one expert
    three times among them, equal to float64; it adds them in pair order from zero, bit for bit as the CPU
    index_add it replaces (whose CUDA atomics add them in a varying order), and its gradient is a gather of the
    token's."""
    gen = torch.Generator().manual_seed(6)
    N, K, L, H = 23, 4, 5, 12
    ids = torch.randint(-1, L + 1, (N, K), generator=gen, dtype=torch.int32)  # L: another rank's (the sink)
    ids[0] = torch.tensor([2, 2, -1, 2], dtype=torch.int32)  # one expert three times
    ids[1] = -1  # nothing
    mask = torch.ones(L + 1, dtype=torch.bool)
    mask[3] = mask[L] = False  # a masked expert and the sink
    inp = RunnerInput(torch.zeros(N, H), torch.where(ids < 0, L, ids), torch.rand(N, K, generator=gen), mask)
    pairs = inp.pairs_by_expert("test")
    P = pairs.token.numel()
    assert P == int(((ids >= 0) & (ids != 3) & (ids != L)).sum())
    rows = torch.randn(P, H, generator=gen).requires_grad_(True)
    y = pairs.sum_per_token(rows, N, K)
    ref = torch.zeros(N, H, dtype=torch.float64).index_add_(0, pairs.token, rows.detach().double())
    assert y.dtype == rows.dtype and rel_err(y.detach(), ref) < 1e-6
    assert torch.equal(y.detach(), torch.zeros(N, H).index_add_(0, pairs.token, rows.detach()))
    assert not y[1].any()
    g = torch.randn(N, H, generator=gen)
    y.backward(g)
    assert torch.equal(rows.grad, g[pairs.token])


def _layer(E=8, K=3, H=16, I=8, **kw):
    torch.manual_seed(0)
    return ep.EPMoE(E, K, H, I, runner="torch", dtype=torch.float64, **kw)


@pytest.mark.parametrize("mask", [torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([1, 0, 1, 1, 1], dtype=torch.int32)])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_an_expert_mask_is_read_by_value_and_never_computes_the_sink(runner, mask):
    """RunnerInput.expert_mask: an entry 0 skips its expert (RunnerInput's docstring), whatever the mask's dtype, and
    the sink L is never computed. The triton runner's kernels read it so; the torch runner (and the masked one, whose
    token rows it groups) failed inside torch on a float mask ('bitwise_and_cpu' not implemented for 'Float') and on
    a sink entry 1 (an IndexError: expert L of L experts; a -1 id, which reads the sink entry, in bincount)."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    gen = torch.Generator().manual_seed(12)
    N, K, L, H, I = 6, 2, 4, 16, 8
    cfg = ep.MoeConfig(L, K, H, I)
    weights = ep.ExpertWeights(torch.randn(L, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(L, H, I, generator=gen) / I ** 0.5)
    ids = torch.tensor([[0, 1], [2, L], [3, 3], [-1, L], [1, 0], [2, 3]], dtype=torch.int32)  # L: the sink; -1: none
    x, w = torch.randn(N, H, generator=gen), torch.rand(N, K, generator=gen)
    y = ep.runners.create(runner, cfg).run(RunnerInput(x, ids, w, mask), weights)
    kept = torch.where((ids != 1) & (ids != L), ids, -1)  # expert 1 masked out; the sink adds nothing
    assert rel_err(y, moe_reference(x, kept, w.double(), weights.w13, weights.w2, cfg)) <= 1e-5


@pytest.mark.parametrize("bad,error,match", [
    ("more_ids", ValueError, r"topk_ids has shape \[8, 2\]; expected \[5, K\]"),
    ("narrow_weights", ValueError, r"topk_ids \[5, 2\] and topk_weights \[5, 1\] differ in shape"),
    ("float_ids", TypeError, r"topk_ids has dtype torch.float32; expected a signed integer dtype"),
    ("wide_rows", ValueError, r"hidden_states has shape \[5, 19\]; expected \[N, 16\] \(token rows, hidden_size=16\)"),
])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_token_rows_of_mismatched_shapes_are_named_by_every_backend(runner, bad, error, match):
    """A RunnerInput made by hand with ids or weights of another shape than its rows, float ids, or rows of another
    width than hidden_size: the triton runner's kernels read past x or the weights, or rows of 19 values as 16, and
    returned a wrong y with no error; the torch and masked runners failed inside an index or a matmul."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    gen = torch.Generator().manual_seed(3)
    N, K, L, H, I = 5, 2, 4, 16, 8
    weights = ep.ExpertWeights(torch.randn(L, 2 * I, H, generator=gen), torch.randn(L, H, I, generator=gen))
    x, ids, w = torch.randn(N, H, generator=gen), torch.randint(0, L, (N, K), dtype=torch.int32), torch.rand(N, K)
    mask = torch.tensor([True] * L + [False])
    x, ids, w = {"more_ids": (x, torch.randint(0, L, (N + 3, K), dtype=torch.int32), torch.rand(N + 3, K)),
                 "narrow_weights": (x, ids, w[:, :1]), "float_ids": (x, ids.float(), w),
                 "wide_rows": (torch.randn(N, H + 3), ids, w)}[bad]
    with pytest.raises(error, match=match):
        ep.runners.create(runner, ep.MoeConfig(L, K, H, I)).run(RunnerInput(x, ids, w, mask), weights)


@pytest.mark.parametrize("masked_m", [torch.tensor([4, 2], dtype=torch.int32), torch.tensor([4.0, 2.0, 0.0]),
                                      torch.tensor([[4, 2, 0]], dtype=torch.int32)])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_masked_m_of_another_shape_or_a_float_dtype_is_named_by_every_backend(runner, masked_m):
    """ExpertMajorInput.masked_m [L] int: the masked runner named a wrong one; the torch and triton runners (through
    the conversion to token rows) failed inside a broadcast ('The size of tensor a (2) must match ...') or compared
    float counts as they were."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    L, H, I = 3, 16, 8
    weights = ep.ExpertWeights(torch.randn(L, 2 * I, H), torch.randn(L, H, I))
    with pytest.raises(ValueError, match=rf"masked_m has shape {re.escape(str(list(masked_m.shape)))} and dtype "
                                         rf"{masked_m.dtype}; expected \[3\] \(L local experts\) int32"):
        ep.runners.create(runner, ep.MoeConfig(6, 2, H, I)).run(ExpertMajorInput(torch.randn(L, 5, H), masked_m),
                                                                weights)


@pytest.mark.parametrize("masked_m,bad", [([3, 6, 0], "6 at [1]"), ([-1, 2, 5], "-1 at [0]")])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_masked_m_outside_the_buffer_rows_is_named_not_clamped(runner, masked_m, bad):
    """A count above the M*R rows per expert was clamped to them (the masked kernels' bound, the conversion's
    row < masked_m[l]) and a negative one read as 0: both computed something other than what was asked. A
    count of exactly M*R is every row, and equals the float64 reference."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    L, N, H, I = 3, 5, 16, 8
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(L, N, H, generator=gen)
    w13, w2 = torch.randn(L, 2 * I, H, generator=gen) * H ** -0.5, torch.randn(L, H, I, generator=gen) * I ** -0.5
    config = ep.MoeConfig(6, 2, H, I)
    backend = ep.runners.create(runner, config)
    with pytest.raises(ValueError, match=rf"masked_m has {re.escape(bad)}; allowed 0\.\.{N} \(hidden_states has "
                                         rf"M\*R={N} rows per expert\)"):
        backend.run(ExpertMajorInput(x, torch.tensor(masked_m, dtype=torch.int32)), ep.ExpertWeights(w13, w2))
    y = backend.run(ExpertMajorInput(x, torch.full((L,), N, dtype=torch.int32)), ep.ExpertWeights(w13, w2))
    for e in range(L):
        ref = expert_reference(x[e].double(), w13[e].double(), w2[e].double(), config)
        assert rel_err(y[e], ref) <= 1e-5, e


@pytest.mark.parametrize("bad_id,where", [(5, "[2, 1]"), (-2, "[2, 1]")])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_token_row_ids_outside_the_local_experts_are_named_by_every_backend(runner, bad_id, where):
    """A RunnerInput made by hand takes mapped ids in -1..L (L the sink, -1 no expert). An id above L failed inside
    the torch and masked runners' mask lookup (an IndexError naming neither) and was skipped by the triton kernels;
    one below -1 was skipped by all three: a pair silently dropped. Ids -1..L still compute the reference."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    gen = torch.Generator().manual_seed(13)
    N, K, L, H, I = 4, 2, 4, 16, 8
    cfg = ep.MoeConfig(L, K, H, I)
    weights = ep.ExpertWeights(torch.randn(L, 2 * I, H, generator=gen) / H ** 0.5,
                               torch.randn(L, H, I, generator=gen) / I ** 0.5)
    x, w = torch.randn(N, H, generator=gen), torch.rand(N, K, generator=gen)
    ids = torch.tensor([[0, -1], [L, 3], [2, 1], [1, 1]], dtype=torch.int32)
    mask = torch.tensor([True] * L + [False])
    backend = ep.runners.create(runner, cfg)
    y = backend.run(RunnerInput(x, ids, w, mask), weights)
    kept = torch.where(ids == L, -1, ids)  # the sink adds nothing
    assert rel_err(y, moe_reference(x, kept, w, weights.w13, weights.w2, cfg)) <= 1e-5
    bad = ids.clone()
    bad[2, 1] = bad_id
    with pytest.raises(ValueError, match=rf"topk_ids has id {bad_id} at {re.escape(where)}; allowed -1\.\.{L} "
                                         rf"\(local expert indices, {L}: the sink; -1: no expert\)"):
        backend.run(RunnerInput(x, bad, w, mask), weights)


@pytest.mark.parametrize("layout", ["token_rows", "expert_major"])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_float_rows_with_another_out_dtype_are_named_by_every_backend(runner, layout):
    """out_dtype is the tokens' dtype of fp8 rows; float rows return their own. fp32 rows made by hand with
    out_dtype=bf16 were refused naming w13 (fp32 experts, as the rows, "allowed: torch.bfloat16"), and beside bf16
    experts failed inside a matmul or the Triton interpreter ('Both operands must be same dtype'), naming neither.
    out_dtype equal to the rows' dtype is taken, and equals the float64 reference."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    gen = torch.Generator().manual_seed(14)
    N, K, L, H, I = 5, 2, 3, 16, 8
    cfg = ep.MoeConfig(L, K, H, I)
    w13, w2 = torch.randn(L, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(L, H, I, generator=gen) / I ** 0.5

    def make(out_dtype):
        if layout == "token_rows":
            ids = torch.randint(0, L, (N, K), generator=gen, dtype=torch.int32)
            return RunnerInput(torch.randn(N, H, generator=gen), ids, torch.rand(N, K, generator=gen),
                               torch.tensor([True] * L + [False]), out_dtype=out_dtype)
        return ExpertMajorInput(torch.randn(L, N, H, generator=gen), torch.tensor([N, 2, 0], dtype=torch.int32),
                                out_dtype=out_dtype)

    backend = ep.runners.create(runner, cfg)
    inp = make(torch.float32)
    y = backend.run(inp, ep.ExpertWeights(w13, w2))
    if layout == "token_rows":
        ref = moe_reference(inp.hidden_states, inp.topk_ids, inp.topk_weights, w13, w2, cfg)
        assert rel_err(y, ref) <= 1e-5
    else:
        for e, m in enumerate(inp.masked_m.tolist()):
            assert rel_err(y[e, :m], expert_reference(inp.hidden_states[e, :m].double(), w13[e].double(),
                                                      w2[e].double(), cfg)) <= 1e-5
    for weights in (ep.ExpertWeights(w13, w2), ep.ExpertWeights(w13.bfloat16(), w2.bfloat16())):
        with pytest.raises(ValueError, match=r"out_dtype=torch.bfloat16 but hidden_states has dtype torch.float32; "
                                             r"allowed: None or torch.float32"):
            backend.run(make(torch.bfloat16), weights)


@pytest.mark.parametrize("dtype,E", [(torch.uint8, 8), (torch.int8, 128), (torch.int8, 256), (torch.int16, 300)])
def test_narrow_id_dtypes_are_checked_by_value_not_by_a_wrapped_bound(dtype, E):
    """int8, int16 and uint8 ids are accepted. Their value check compared them with -1 and E in their own dtype,
    where -1 wraps to 255 for uint8 and 128 or 256 to -128 or 0 for int8: every uint8 id, and every int8 id at
    E >= 128, was refused as out of range ("topk_ids has id 0 at [0, 0]; allowed -1..7"). Now valid ids pass (the
    layout counts them) and a bad one is still named, in get_dispatch_layout and a backend's run()."""
    top = min(E, torch.iinfo(dtype).max + 1) - 1  # the largest valid id the dtype holds
    ids = torch.tensor([[0, top], [top // 2, 0 if dtype == torch.uint8 else -1]], dtype=dtype)
    layout = ep.dispatchers.create("deepep_normal", ep.MoeConfig(E, 2, 16, 8)).get_dispatch_layout(ids)
    valid = ids.long()[ids.long() >= 0]
    assert layout.num_tokens_per_expert.tolist() == torch.bincount(valid, minlength=E).tolist()
    if E <= torch.iinfo(dtype).max:
        bad = ids.clone()
        bad[1, 0] = E
        with pytest.raises(ValueError, match=rf"topk_ids has id {E} at \[1, 0\]; allowed -1\.\.{E - 1}"):
            ep.dispatchers.create("deepep_normal", ep.MoeConfig(E, 2, 16, 8)).get_dispatch_layout(bad)
    # a backend's run() on hand-made token rows of narrow ids (-1..L local indices; L = 3, the sink)
    L, H, I = 3, 16, 8
    gen = torch.Generator().manual_seed(15)
    weights = ep.ExpertWeights(torch.randn(L, 2 * I, H, generator=gen) / H ** 0.5,
                               torch.randn(L, H, I, generator=gen) / I ** 0.5)
    x, w = torch.randn(2, H, generator=gen), torch.rand(2, 2, generator=gen)
    local = torch.tensor([[0, L], [2, 1]], dtype=dtype)
    y = ep.runners.create("torch", ep.MoeConfig(L, 2, H, I)).run(
        RunnerInput(x, local, w, torch.tensor([True] * L + [False])), weights)
    kept = torch.where(local.long() == L, -1, local.long())
    assert rel_err(y, moe_reference(x, kept, w, weights.w13, weights.w2, ep.MoeConfig(L, 2, H, I))) <= 1e-5


@pytest.mark.parametrize("bad,error", [
    ("backend", "backend=None (NoneType); allowed: a runner backend (ep.runners.create(name, config))"),
    ("config", "config=None; allowed: an ep.MoeConfig (e.g. layer.config)"),
    ("placement", "placement=8 (int); allowed: an ep.ExpertPlacement (e.g. dispatcher.placement)"),
    ("dispatch_output", "dispatch_output must be a dispatcher's dispatch output (d.dispatch(x, topk)); got Tensor"),
])
def test_moe_runner_names_an_argument_of_the_wrong_type(bad, error):
    """MoeRunner(None, ...) and MoeRunner(backend, config, 8) failed in run() with AttributeError ("'NoneType'
    object has no attribute 'name'", "... 'global_to_local_table'"), config=None was taken silently, and
    run(a tensor, weights) raised AttributeError: 'Tensor' object has no attribute 'format'."""
    cfg = ep.MoeConfig(8, 2, 16, 8)
    backend, placement = ep.runners.create("torch", cfg), ep.ExpertPlacement(8)
    args = {"backend": (None, cfg, placement), "config": (backend, None, placement), "placement": (backend, cfg, 8)}
    with pytest.raises(TypeError, match=re.escape(error)):
        runner = MoeRunner(*args.get(bad, (backend, cfg, placement)))
        weights = ep.ExpertWeights(torch.randn(8, 16, 16), torch.randn(8, 16, 8))
        runner.run(torch.randn(4, 16), weights)


@pytest.mark.parametrize("bad,error", [
    ("tensor", "runner '{runner}': run() takes the runner core's input (RunnerInput or ExpertMajorInput); got Tensor"),
    ("weights_tuple", "weights is a tuple; allowed: an ep.ExpertWeights(w13, w2, b13=None, b2=None)"),
    ("mask_list", "expert_mask is a list; expected a tensor (hidden_states [N, 16], expert_mask [L+1])"),
    ("masked_m_list", "masked_m is a list; expected a tensor (hidden_states [L, M*R, H], masked_m [L] int32)"),
])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_run_names_an_argument_of_the_wrong_type(runner, bad, error):
    """run(x_tensor, ...), weights as a (w13, w2) tuple, and an input holding a list failed with an AttributeError
    ("'Tensor' object has no attribute 'check'", "'tuple' object has no attribute 'quant'", "'list' object has no
    attribute 'dim'") naming neither the argument nor what is allowed; MoeRunner.run's weights check too."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    gen = torch.Generator().manual_seed(16)
    L, N, K, H, I = 3, 4, 2, 16, 8
    cfg = ep.MoeConfig(L, K, H, I)
    weights = ep.ExpertWeights(torch.randn(L, 2 * I, H, generator=gen), torch.randn(L, H, I, generator=gen))
    x, ids, w = torch.randn(N, H, generator=gen), torch.zeros(N, K, dtype=torch.int32), torch.rand(N, K, generator=gen)
    mask = torch.tensor([True] * L + [False])
    args = {"tensor": (x, weights), "weights_tuple": (RunnerInput(x, ids, w, mask), (weights.w13, weights.w2)),
            "mask_list": (RunnerInput(x, ids, w, mask.tolist()), weights),
            "masked_m_list": (ExpertMajorInput(torch.randn(L, N, H, generator=gen), [N, 1, 0]), weights)}[bad]
    backend = ep.runners.create(runner, cfg)
    with pytest.raises(TypeError, match=re.escape(error.format(runner=runner))):
        backend.run(*args)
    if bad == "weights_tuple":
        with pytest.raises(TypeError, match=re.escape(error)):
            backend.check_weights(args[1], L, x.dtype)


def test_all_minus_one_gives_zeros_and_never_reads_rows():
    layer = _layer()
    x = torch.full((5, 16), float("nan"), dtype=torch.float64)  # poison: no row may be computed
    ids = torch.full((5, 3), -1, dtype=torch.int32)
    y = layer(x, ids, torch.rand(5, 3))
    assert torch.equal(y, torch.zeros_like(y))


def test_mixed_minus_one_equals_reference():
    gen = torch.Generator().manual_seed(3)
    layer = _layer()
    x = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    ids = random_topk_ids(gen, 30, 8, 3, 1, minus_one_fraction=0.5)
    assert (ids == -1).any() and (ids >= 0).any()
    w = torch.rand(30, 3, generator=gen)
    y = layer(x, ids, w)
    ref = moe_reference(x, ids, w.double(), layer.w13, layer.w2, layer.config)
    assert rel_err(y, ref) < 1e-12


def test_gemm_hooks_see_grouped_rows_and_can_replace_outputs():
    calls = []

    def add_one(inputs, outputs, expert):
        calls.append((inputs.shape[0], outputs.shape, expert.tolist()))
        assert expert.tolist() == sorted(expert.tolist())  # rows come grouped by expert
        return outputs + 1.0

    layer = _layer(K=2, hooks=ep.runners.GemmHooks(after_gemm2=add_one))
    x = torch.randn(6, 16, dtype=torch.float64)
    ids = torch.tensor([[0, 1], [1, 2], [3, -1], [0, 4], [-1, -1], [7, 6]], dtype=torch.int32)
    w = torch.rand(6, 2)
    y = layer(x, ids, w)
    ref = moe_reference(x, ids, w.double(), layer.w13, layer.w2, layer.config)
    # +1 on every computed expert output, weighted: sum over valid slots of w.
    bump = (w.double() * (ids >= 0)).sum(1, keepdim=True)
    assert rel_err(y, ref + bump) < 1e-12
    assert calls[0][0] == int((ids >= 0).sum())


def _global_weights_rank(rank, world_size, dispatcher, runner):
    """The registries used directly (DESIGN.md's lower level): MoeRunner.run given the global [E, ...]
    weights instead of this rank's shard indexed them with local ids, i.e. computed rank 1's tokens with
    experts 0..3 instead of 4..7 (rel err ~1, no error) for the torch and triton backends."""
    E, K, H, I = 8, 2, 16, 8
    cfg = ep.MoeConfig(E, K, H, I)
    gen = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(E, H, I, generator=gen) / I ** 0.5
    options = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 8}, "mori": {"max_dispatch_tokens_per_rank": 8}}
    disp = ep.dispatchers.create(dispatcher, config=cfg, **options.get(dispatcher, {}))
    runner = MoeRunner(ep.runners.create(runner, cfg), cfg, disp.placement)
    x = torch.randn(5, H, generator=gen)
    ids, w = torch.tensor([[0, 7], [4, -1], [5, 1], [3, 6], [2, 2]]), torch.rand(5, K, generator=gen)
    mine = disp.placement.local_expert_ids()
    y = disp.combine(runner.run(disp.dispatch(x, ep.TopKOutput(ids, w)), ep.ExpertWeights(w13[mine], w2[mine])))
    err = rel_err(y, moe_reference(x, ids, w, w13, w2, cfg))
    try:
        disp.combine(runner.run(disp.dispatch(x, ep.TopKOutput(ids, w)), ep.ExpertWeights(w13, w2)))
        return err, "no error"
    except ValueError as e:
        return err, str(e)


@pytest.mark.parametrize("dispatcher", ["deepep_normal", "deepep_ll", "mori"])
@pytest.mark.parametrize("runner", ["torch", "triton"])
def test_moe_runner_refuses_global_weights_on_a_sharded_rank(dispatcher, runner):
    from ep_runtime.testing import run_ranks
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    for rank, (err, message) in enumerate(run_ranks(_global_weights_rank, 2, dispatcher, runner, timeout=120)):
        assert err <= 1e-5
        first = 4 * rank
        assert message == (f"w13 has shape [8, 16, 16]; expected [4, 16, 16] (MoeRunner.run takes this rank's shard: "
                           f"its 4 local experts, global experts {first}..{first + 3}, as [4, ...] tensors)"), message


@pytest.mark.parametrize("bad", ["w13", "b2"])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_experts_of_another_dtype_than_the_tokens_are_named(runner, bad):
    """fp16 experts on fp32 tokens failed inside the GEMM: torch's 'expected m1 and m2 to have the same
    dtype', Triton's 'Both operands must be same dtype' (a compile error on GPU), naming no argument.
    fp16 biases ran on the torch and triton runners (promoted) while masked refused them with a
    ValueError; fused_experts raised a TypeError worded otherwise. Every entry point now raises the same
    TypeError (validation.check_expert_dtypes) naming the tensor, its dtype and the allowed one."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    cfg = ep.MoeConfig(4, 2, 16, 8, has_bias=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=gen)
    ids, w = torch.tensor([[0, 1], [2, -1], [3, 3]]), torch.rand(3, 2, generator=gen)
    tensors = dict(w13=torch.randn(4, 16, 16, generator=gen), w2=torch.randn(4, 16, 8, generator=gen),
                   b13=torch.randn(4, 16, generator=gen), b2=torch.randn(4, 16, generator=gen))
    tensors[bad] = tensors[bad].half()
    weights = ep.ExpertWeights(**tensors)
    allowed = rf"{bad} has dtype torch.float16; allowed: torch.float32, the dtype of {{}} \(unquantized experts " \
              r"compute in the tokens' dtype\)$"
    tokens = rf"the tokens runner='{runner}' got"
    disp = ep.dispatchers.create("standard", config=cfg)
    moe = MoeRunner(ep.runners.create(runner, cfg), cfg, disp.placement)
    with pytest.raises(TypeError, match=allowed.format(tokens)):  # the layer's path
        moe.run(disp.dispatch(x, ep.TopKOutput(ids, w)), weights)
    inputs = {"torch": RunnerInput.from_local_ids(x, ids, w, ep.ExpertPlacement(4)),
              "masked": ExpertMajorInput(torch.randn(4, 3, 16, generator=gen), torch.tensor([3, 0, 1, 2]))}
    with pytest.raises(TypeError, match=allowed.format(tokens)):  # the backend used directly
        ep.runners.create(runner, cfg).run(inputs.get(runner, inputs["torch"]), weights)
    if runner == "triton":
        with pytest.raises(TypeError, match=allowed.format("x")):  # the functional entry point
            ep.runners.fused_experts(x, **tensors, topk_ids=ids, topk_weights=w)


@pytest.mark.parametrize("layout", ["token_rows", "expert_major"])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_a_backend_used_directly_refuses_weights_that_do_not_fit_its_input(runner, layout):
    """ep.runners.create(...).run(input, weights) with the global [E, ...] weights for an input of L
    local experts: the torch and triton backends computed the local ids with the first L global experts
    (no error); only masked checked, inside its kernel path. run() now checks every backend's weights
    against its input (RunnerBackend.check_weights)."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    E, L, H, I = 8, 4, 16, 8
    cfg = ep.MoeConfig(E, 2, H, I)
    gen = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    if layout == "token_rows":
        inp = RunnerInput.from_local_ids(torch.randn(5, H, generator=gen), random_topk_ids(gen, 5, L, 2, 1),
                                         torch.rand(5, 2, generator=gen), ep.ExpertPlacement(L))
    else:
        inp = ExpertMajorInput(torch.randn(L, 3, H, generator=gen), torch.tensor([3, 0, 1, 2], dtype=torch.int32))
    backend = ep.runners.create(runner, cfg)
    backend.run(inp, ep.ExpertWeights(w13[:L], w2[:L]))  # this input's L experts: fine
    with pytest.raises(ValueError, match=rf"^w13 has shape \[{E}, {2 * I}, {H}\]; expected \[{L}, {2 * I}, {H}\]$"):
        backend.run(inp, ep.ExpertWeights(w13, w2))
    with pytest.raises(ValueError, match=rf"^w2 has shape \[{L}, {H}, {I + 1}\]; expected \[{L}, {H}, {I}\]$"):
        backend.run(inp, ep.ExpertWeights(w13[:L], torch.randn(L, H, I + 1, generator=gen)))
    if layout == "expert_major":  # (the torch and triton backends failed unpacking its shape)
        with pytest.raises(ValueError, match=r"^hidden_states has shape \[12, 16\]; expected \[L, M\*R, H\]"):
            backend.run(ExpertMajorInput(inp.hidden_states.reshape(-1, H), inp.masked_m), ep.ExpertWeights(w13, w2))


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_normal", "deepep_ll", "mori"])
def test_a_backend_given_a_dispatch_output_names_the_runner_core_that_takes_it(dispatcher):
    """ep.runners.create(...) is a backend: run() takes the normalized input. Given a dispatcher's output (as
    layer.runner takes it) it failed with "'StandardDispatchOutput' object has no attribute 'check'"."""
    cfg = ep.MoeConfig(8, 2, 16, 8)
    gen = torch.Generator().manual_seed(5)
    w = ep.ExpertWeights(torch.randn(8, 16, 16, generator=gen), torch.randn(8, 16, 8, generator=gen))
    x = torch.randn(6, 16, generator=gen)
    topk = ep.TopKOutput(random_topk_ids(gen, 6, 8, 2, 1), torch.rand(6, 2, generator=gen) + 0.1)
    d = ep.dispatchers.create(dispatcher, cfg)
    backend = ep.runners.create("torch", cfg)
    out = d.dispatch(x, topk)
    with pytest.raises(TypeError, match=rf"^runner 'torch': run\(\) takes the runner core's input \(RunnerInput or "
                                        rf"ExpertMajorInput\); got a {type(out).__name__}, a dispatcher's output: run it "
                                        rf"with ep.MoeRunner\(backend, config, dispatcher.placement\)"):
        backend.run(out, w)
    y = d.combine(MoeRunner(backend, cfg, d.placement).run(out, w))  # the way the message names
    ref = moe_reference(x.double(), topk.topk_ids, topk.topk_weights.double(), w.w13.double(), w.w2.double(), cfg)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("dispatcher", ["standard", "deepep_ll"])
@pytest.mark.parametrize("runner", ["torch", "triton", "masked"])
def test_a_layer_call_checks_its_weights_once(runner, dispatcher, monkeypatch):
    """The masked runner checked the weights a second time in its kernel path (ExpertWeights.check after
    the runner core's): host time on every call. One check per layer call, on every runner."""
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner=runner,
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 8} if dispatcher == "deepep_ll" else None)
    gen = torch.Generator().manual_seed(4)
    x, ids, w = torch.randn(5, 16, generator=gen), random_topk_ids(gen, 5, 8, 2, 1), torch.rand(5, 2, generator=gen)
    checks = []
    check = ep.ExpertWeights.check
    monkeypatch.setattr(ep.ExpertWeights, "check", lambda self, *a, **k: (checks.append(1), check(self, *a, **k))[1])
    y = layer(x, ids, w)
    assert len(checks) == 1
    assert rel_err(y, moe_reference(x, ids, w.double(), layer.w13, layer.w2, layer.config)) <= 1e-5


def test_the_torch_runner_builds_no_quant_config_for_float_rows(monkeypatch):
    """activation_input built a default QuantConfig on every call (its __post_init__ checks: ~4 us of
    host time per layer call) that only fp8 rows use."""
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 2, 16, 8, runner="torch")
    gen = torch.Generator().manual_seed(5)
    x, ids, w = torch.randn(5, 16, generator=gen), random_topk_ids(gen, 5, 8, 2, 1), torch.rand(5, 2, generator=gen)
    built = []
    post_init = ep.QuantConfig.__post_init__
    monkeypatch.setattr(ep.QuantConfig, "__post_init__", lambda self: (built.append(1), post_init(self))[1])
    y = layer(x, ids, w)
    assert built == []
    assert rel_err(y, moe_reference(x, ids, w.double(), layer.w13, layer.w2, layer.config)) <= 1e-5


def test_build_keeps_options_a_class_takes_through_kwargs():
    """A registered class may take an option through **kwargs itself: build passes it, and names
    only the option its constructor chain really rejected."""
    from ep_runtime.registry import build

    class Base:
        def __init__(self, config, group=None, expert_to_rank=None):
            self.config = config

    class Consumes(Base):
        def __init__(self, config, group=None, **options):
            self.foo = options.pop("foo")
            super().__init__(config, group, **options)

    assert build(Consumes, "dispatcher", "mine", dict(config=1, group=None), {"foo": 2}).foo == 2
    with pytest.raises(TypeError, match=r"^dispatcher mine has no option 'bar'; allowed: expert_to_rank$"):
        build(Consumes, "dispatcher", "mine", dict(config=1, group=None), {"foo": 2, "bar": 3})


def test_untraced_functions_compile_without_filling_one_frame_cache():
    """Functions torch.compile runs as they are (runner_core.untraced: the exchange's plan, dispatch and combine,
    the runners) each break the graph inside their own wrapper frame. Ten of them, each called once with its
    own arity, in one compiled function under error_on_recompile: they shared one code object, whose compiled
    frames (one per function and arity) went past dynamo's recompile limit (8) in a layer's first call
    (RecompileError here; a warning and a fall back to eager without the flag). The results are the eager ones."""
    import torch._dynamo

    from ep_runtime.runner_core import untraced

    def make(i):
        return untraced(lambda x, *more: x * (i + 1) + sum(more))
    wrapped = [make(i) for i in range(10)]

    def body(x):
        for i, fn in enumerate(wrapped):
            x = fn(x, *[1.0] * (i % 3))
        return x
    x = torch.randn(4, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = torch.compile(body, backend="eager")(x)
    assert torch.equal(got, body(x))
    # each exchange dispatcher class has its own dispatch wrapper and combine wrapper (frames: shapes x gradient modes)
    from ep_runtime.dispatchers.base import ExchangeDispatcher
    classes = [c for c in map(ep.dispatchers.get, ep.dispatchers.registered()) if issubclass(c, ExchangeDispatcher)]
    wrappers = [wrapper for c in classes for wrapper in (c._named_dispatch, c._named_combine)]
    assert len(classes) >= 3 and len({id(w.__code__) for w in wrappers}) == 2 * len(classes)  # (dynamo: per object)


def test_untraced_dynamic_rows_follow_the_compile_dynamic_argument():
    """untraced(..., dynamic_rows=...) marks its result's rows dynamic under torch.compile: a compiled function
    called on rows of other counts compiles nothing again; under torch.compile(dynamic=False) (static shapes
    asked: the mark would override it) it marks nothing, and each new count compiles again. Results as eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ep_runtime.runner_core import untraced
    rows = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    count = [0]
    head = untraced(lambda: rows[:count[0]], "head", dynamic_rows=lambda out: (out,))
    frames = {}
    for dynamic in (None, False):
        torch._dynamo.reset()
        compiled = torch.compile(lambda: head() * 2, backend="eager", dynamic=dynamic)
        frames[dynamic] = []
        for count[0] in (5, 6, 7):
            before = counters["frames"]["total"]
            assert torch.equal(compiled(), rows[:count[0]] * 2)
            frames[dynamic].append(counters["frames"]["total"] - before)
    assert frames[None][1:] == [0, 0] and frames[False][1:] == [1, 1], frames


@pytest.mark.parametrize("name,options,padded", [("deepep_normal", {}, False),
                                                 ("deepep_normal", {"num_worst_tokens": 64}, True),
                                                 ("mori", {"max_dispatch_tokens_per_rank": 32}, True)])
def test_token_major_formats_tell_the_runner_what_the_host_knows_of_their_size(name, options, padded):
    """The size hints of RunnerInput (the triton runner's fp8 kernel choice reads them): deepep_normal's host plan
    passes its count table's total as local_pairs (the pairs this rank computes, -1 slots excluded); its static
    mode and mori receive into fixed-size buffers, marked padded_rows (their real count is on the device)."""
    config = ep.MoeConfig(8, 2, 128, 64)
    gen = torch.Generator().manual_seed(5)
    disp = ep.dispatchers.create(name, config=config, **options)
    ids = torch.randint(-1, 8, (20, 2), generator=gen, dtype=torch.int32)
    out = disp.dispatch(torch.randn(20, 128, generator=gen), ep.TopKOutput(ids, torch.rand(20, 2, generator=gen)))
    rows = format_path(name).to_runner_input(out, disp.placement, config)
    assert rows.padded_rows is padded
    assert rows.local_pairs == (None if padded else int((ids >= 0).sum()))
