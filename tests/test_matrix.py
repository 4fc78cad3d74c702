"""The correctness contract over the whole registry: every (dispatcher, runner) pair the package
registers, each backend natively or through the runner core's layout conversion (triton and masked run
through the interpreter here), equals the float64 reference on 2 gloo ranks, forward and gradients.
A new dispatcher or runner module in the package is covered as soon as it registers. (Classes that
tests register, as tests/test_extension.py does, exist only in that test's processes: left out here.)"""
from contextlib import nullcontext

import pytest
import torch

import ep_runtime as ep
from ep_runtime.runner_core import registered_pairs
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 16}, "mori": {"max_dispatch_tokens_per_rank": 16}}
DISPATCHERS = [d for d in ep.dispatchers.registered() if ep.dispatchers.get(d).__module__.startswith("ep_runtime.")]
RUNNERS = [r for r in ep.runners.registered() if ep.runners.get(r).__module__.startswith("ep_runtime.")]
PAIRS = [(dispatcher, runner) for dispatcher in DISPATCHERS for runner in RUNNERS]


def _pair_rank(rank, world_size, dispatcher, runner):
    # Both ranks send tokens (uneven counts): with rank 1 empty its y and dx checks compared empty tensors (always 0
    # error), and under standard its expert gradients were zeros against zeros; no pair was checked with a second
    # sender. (Ranks without tokens: test_empty_rank_whose_inputs_need_no_gradient and each dispatcher's own tests.)
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner=runner, dispatcher_options=OPTIONS.get(dispatcher))
    return check_layer(layer, make_problem(layer.config, [11, 6][:world_size], seed=4, ep_size=world_size), rank)


@pytest.mark.parametrize("dispatcher,runner", PAIRS)
def test_every_registered_pair_matches_reference(dispatcher, runner):
    if runner not in ep.runners.available():
        pytest.skip(f"runner {runner} cannot run here")
    for errors in run_ranks(_pair_rank, 2, dispatcher, runner):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def test_every_pair_has_a_path():
    assert {"standard", "deepep_normal", "deepep_ll", "mori"} <= set(DISPATCHERS)
    assert {"torch", "triton", "masked"} <= set(RUNNERS)
    formats = {ep.dispatchers.get(d).format for d in DISPATCHERS}
    assert {(f, r) for f in formats for r in RUNNERS} <= set(registered_pairs())


def _awkward_rank(rank, world_size, dispatcher):
    """Awkward but valid input: int64 ids, non-contiguous x, router weights that need gradients,
    bf16, inference mode, and a step where no rank has any token."""
    torch.manual_seed(0)
    E, K, H, I = 8, 3, 32, 16
    layer = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher))
    gen = torch.Generator().manual_seed(100 + rank)
    T = 9 + rank
    wide = torch.randn(T, 2 * H, generator=gen, dtype=torch.float64)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64).requires_grad_(True)
    ids = logits.detach().topk(K, dim=1).indices  # int64
    ids[0, 1] = -1
    full = layer.w13.detach().new_zeros(E, 2 * I, H)
    w2 = layer.w2.detach().new_zeros(E, H, I)
    g = torch.Generator().manual_seed(7)
    full.copy_(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5)
    w2.copy_(torch.randn(E, H, I, generator=g) / I ** 0.5)
    layer.load_experts(full, w2)
    x = wide[:, ::2].float().requires_grad_(True)  # non-contiguous
    weights = torch.softmax(logits, -1).gather(1, ids.clamp(min=0))
    y = layer(x, ids, weights.float())
    y.sum().backward()
    # Reference in float64 over this rank's tokens only: with y.sum() as the loss, the gradients of
    # x and of the router logits depend on this rank's tokens alone (experts are shared weights).
    logits64 = logits.detach().clone().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w64 = torch.softmax(logits64, -1).gather(1, ids.clamp(min=0))
    from ep_runtime.reference import moe_reference, rel_err
    ref = moe_reference(x64, ids, w64, full.double(), w2.double(), layer.config)
    ref.sum().backward()
    errors = {"y": rel_err(y.detach(), ref.detach()), "dx": rel_err(x.grad, x64.grad),
              "dlogits": rel_err(logits.grad, logits64.grad)}
    # bf16 layer and inference mode on the same tokens.
    layer16 = ep.EPMoE(E, K, H, I, dispatcher=dispatcher, runner="torch", dtype=torch.bfloat16,
                       dispatcher_options=OPTIONS.get(dispatcher))
    layer16.load_experts(full.bfloat16(), w2.bfloat16())
    with torch.inference_mode():
        y16 = layer16(x.detach().bfloat16(), ids, weights.detach())
    errors["bf16"] = rel_err(y16, ref.detach())
    # No tokens anywhere.
    empty = layer(torch.zeros(0, H), torch.zeros(0, K, dtype=torch.int32), torch.zeros(0, K))
    return errors, tuple(empty.shape)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_awkward_valid_input(dispatcher):
    for errors, empty_shape in run_ranks(_awkward_rank, 2, dispatcher):
        assert empty_shape == (0, 32)
        bf16 = errors.pop("bf16")
        assert max(errors.values()) <= tolerance(torch.float32), errors
        assert bf16 <= tolerance(torch.bfloat16), bf16


def test_auto_runner_has_a_path_for_every_dispatcher():
    # "auto" on CUDA picks the fastest backend registered for the format; on CPU always torch.
    for fmt in DISPATCHERS:
        assert ep.runners.resolve("auto", "cpu", fmt) == "torch"
        picked = ep.runners.resolve("auto", "cuda", fmt)
        assert (fmt, picked) in registered_pairs()
    if {"masked", "triton"} <= set(ep.runners.available()):
        assert ep.runners.resolve("auto", "cuda", "deepep_ll") == "masked"
        assert ep.runners.resolve("auto", "cuda", "deepep_normal") == "triton"


def test_auto_runner_skips_a_backend_that_refuses_the_hooks_or_the_fp8_experts():
    """runner="auto" with GEMM hooks on CUDA picked masked for deepep_ll, which refuses hooks when built, and
    triton for fp8 experts with hooks, which refuses them once the layer is fp8: a layer the caller never named
    a runner for could not be built or loaded. "auto" now skips a refusing backend (torch computes them all);
    a named one still raises the refusal."""
    if not {"masked", "triton"} <= set(ep.runners.available()):
        pytest.skip("needs the Triton runners (CUDA or TRITON_INTERPRET=1)")
    hooks = ep.runners.GemmHooks(after_gemm1=lambda inputs, outputs, expert: None)
    fp8 = ep.QuantConfig()
    resolve = ep.runners.resolve
    assert resolve("auto", "cuda", "deepep_ll", torch.bfloat16, hooks) == "triton"  # (its rows converted)
    assert resolve("auto", "cuda", "deepep_ll", torch.bfloat16, hooks, fp8) == "torch"
    assert resolve("auto", "cuda", "deepep_ll", torch.float64, hooks) == "torch"
    assert resolve("auto", "cuda", "deepep_normal", torch.bfloat16, hooks) == "triton"
    assert resolve("auto", "cuda", "deepep_normal", torch.bfloat16, hooks, fp8) == "torch"
    assert resolve("auto", "cuda", "deepep_ll", torch.bfloat16, None, fp8) == "masked"
    assert resolve("auto", "cuda", "standard", torch.bfloat16, None, fp8) == "triton"
    config = ep.EPMoE(8, 2, 128, 128, runner="torch").config
    for name, quant, refusal in [("masked", None, "runner='masked' does not support GEMM hooks"),
                                 ("triton", fp8, "runner='triton' with quantized \\(fp8\\) experts takes no GEMM hooks")]:
        with pytest.raises(ValueError, match=refusal):
            ep.runners.create(name, config, hooks, device="cuda", format="deepep_ll", quant=quant)
        assert ep.runners.create("auto", config, hooks, device="cuda", format="deepep_ll", quant=quant).name == (
            "torch" if quant else "triton")


@pytest.mark.parametrize("device", ["cpu", "cuda", None])
def test_auto_runner_names_an_unknown_format_on_every_device(device):
    """A format no module registered is an error naming it and the registered ones, whatever the device (on CPU
    "auto" took torch without looking at the format), and so is create("auto", ...) with it."""
    with pytest.raises(ValueError, match=r"dispatch format 'nope'.*registered formats: .*deepep_ll"):
        ep.runners.resolve("auto", device, "nope")
    config = ep.EPMoE(8, 2, 32, 16, dispatcher="standard", runner="torch").config
    with pytest.raises(ValueError, match=r"dispatch format 'nope'"):
        ep.runners.create("auto", config, device=device, format="nope")
    for name in ("torch", "masked"):  # a named backend too (it took any format without a word)
        with pytest.raises(ValueError, match=r"dispatch format 'nope'"):
            ep.runners.create(name, config, device=device, format="nope")


def _compiled_rank(rank, world_size):
    """Each dispatcher under torch.compile (aot_eager: dynamo and autograd tracing, no C++ toolchain needed) around the
    layer: the host-side plan and collectives graph-break, the rest is traced; results and
    gradients equal the eager layer's; the first call compiles each frame once (error_on_recompile: the exchanges'
    dispatch and combine shared one untraced wrapper, compiled again for combine's arguments); steps with other
    routings compile nothing again."""
    return {name: _compiled_errors(rank, world_size, name) for name in DISPATCHERS}


# Each token's two experts (E=8 on 2 ranks: 0-3 on rank 0, 4-7 on rank 1) per routing; token t takes letter t.
# Rank 0's received rows N and pairs P: 16, 16 (every token one pair on each rank); 16, 22 (P only changes: the
# exchanges' received rows stayed static in every frame, and the next step compiled 7 frames again); 10, 10; 14, 16.
# Rank 1's: 16, 16; 10, 10; 16, 22; 14, 16. (No 0 or 1: dynamo specializes those sizes.)
ROUTINGS = ["aaaaaaaaaaa", "bbbaaaaaaaa", "cccaaaaaaaa", "bbccaaaaaaa"]
EXPERTS = {"a": (0, 4), "b": (0, 1), "c": (4, 5)}


def _routing_logits(routing: str, num_tokens: int, seed: int) -> torch.Tensor:
    """[T, 8] router logits whose top 2 are each token's experts in `routing`, in a random order of weights."""
    logits = torch.randn(num_tokens, 8, generator=torch.Generator().manual_seed(seed)) * 0.1
    for t, letter in enumerate(routing[:num_tokens]):
        logits[t, list(EXPERTS[letter])] += 10
    return logits


def _compiled_errors(rank, world_size, dispatcher):
    from ep_runtime.reference import rel_err
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [11, 5][:world_size], seed=9, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    x = problem.xs[rank].float()
    logits = _routing_logits(ROUTINGS[0], x.shape[0], rank)
    from torch._dynamo.utils import counters
    results = []
    torch._dynamo.reset()  # (the previous dispatcher's layer compiled the frames they share: another layer recompiles)
    compiled = torch.compile(layer, backend="aot_eager")

    def step(module, logits):
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        y = module(xr, router_logits=logits)
        (y * problem.grad_outputs[rank].float()).sum().backward()
        return y.detach(), xr.grad, layer.w13.grad.clone(), layer.w2.grad.clone()
    for module in (layer, compiled):
        with torch._dynamo.config.patch(error_on_recompile=True):  # the first call compiles each frame once
            results.append(step(module, logits))
    # other routings (the torch runner's per-expert loop once made dynamo guard on every expert's count)
    frames = []
    for i, routing in enumerate(ROUTINGS[1:], 1):
        before = counters["frames"]["total"]
        step(compiled, _routing_logits(routing, x.shape[0], 100 * i + rank))
        frames.append(counters["frames"]["total"] - before)
    return [rel_err(a, b) for a, b in zip(*results)] + [frames]


def test_torch_compile_matches_eager():
    for errors in run_ranks(_compiled_rank, 2):  # one spawn for all dispatchers: compiling is slow to start
        assert set(errors) == set(DISPATCHERS)
        assert all(max(e[:-1]) <= tolerance(torch.float32) for e in errors.values()), errors
        # frames compiled by later routings: none (the received rows and the pairs enter the traced code marked
        # dynamic; dynamo made each dynamic only once it changed, and compiled again at each routing that first
        # changed one of them)
        assert all(e[-1] == [0, 0, 0] for e in errors.values()), errors


def frames_compiled_per_call(compiled, *args, calls: int = 3) -> list[int]:
    """Frames dynamo compiles in each of `calls` calls of `compiled` on the same arguments."""
    from torch._dynamo.utils import counters
    per_call = []
    for _ in range(calls):
        before = counters["frames"]["total"]
        compiled(*args)
        per_call.append(counters["frames"]["total"] - before)
    return per_call


def _compiled_dispatch_frames(rank, world_size, dispatchers):
    """(frames compiled per call of each dispatcher's compiled dispatch, the files of every frame dynamo compiled).
    A name ending in "+kernels": that dispatcher's CUDA code path (exchange kernels forced onto CPU tensors,
    inference, fp16)."""
    from torch._dynamo.convert_frame import input_codes

    from ep_runtime.dispatchers import exchange_kernels
    frames = {}
    for name in dispatchers:
        dispatcher, kernels = name.removesuffix("+kernels"), name.endswith("+kernels")
        dtype = torch.float16 if kernels else torch.float32
        torch.manual_seed(0)
        layer = ep.EPMoE(4, 2, 16, 8, dispatcher=dispatcher, runner="torch", dtype=dtype,
                         dispatcher_options=OPTIONS.get(dispatcher))
        x, logits = torch.randn(5, 16, dtype=dtype), torch.randn(5, 4)
        topk = layer.route(x, None, None, logits, None)
        with exchange_kernels.forced() if kernels else nullcontext(), torch.inference_mode(kernels):
            frames[name] = frames_compiled_per_call(torch.compile(layer.dispatcher.dispatch, backend="eager"), x, topk)
    frames["torch runner"] = _compiled_torch_experts_frames()
    return frames, sorted({code().co_filename.rsplit("/", 1)[-1] for code in input_codes.seen if code() is not None})


def _compiled_torch_experts_frames():
    """Frames compiled per forward and backward of the torch runner's compiled experts and combine (with biases),
    under error_on_recompile."""
    torch.manual_seed(0)
    layer = ep.EPMoE(4, 2, 16, 8, runner="torch", has_bias=True)
    x = torch.randn(5, 16, requires_grad=True)
    dispatch_output = layer.dispatcher.dispatch(x, layer.route(x, None, None, torch.randn(5, 4), None))
    compiled = torch.compile(layer.experts_and_combine, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        return frames_compiled_per_call(lambda out: compiled(out).sum().backward(), dispatch_output)


def test_torch_compile_of_a_dispatch_compiles_nothing_after_its_first_call():
    """A compiled dispatch called again on the same input reuses what its first call compiled (no recompile
    that a user's error_on_recompile or recompile_limit would catch): its input checks read no cache that
    the first call fills, nor does an exchange's plan (its placement tables and node layout, filled at the
    first plan). The exchange itself runs as it is (one graph break): dynamo compiles none of its functions
    (traced, each collective and host read in it broke the graph, and each break made frames; on the CUDA code
    path dynamo also traced into the exchange kernels' launches, which Triton's CPU interpreter failed on).
    In a fresh process (one rank): an earlier test's eager calls fill such caches.
    Likewise the torch runner's experts, whose first call compiles each frame once (error_on_recompile): its
    per-expert loop (untraced) broke the graph inside one helper shared by both GEMMs, which dynamo then
    compiled as a frame of its own for w13's shapes and again for w2's."""
    ((compiled, traced),) = run_ranks(_compiled_dispatch_frames, 1,
                                      ["standard", "deepep_normal", "mori", "deepep_normal+kernels"])
    assert all(frames[0] > 0 and frames[1:] == [0, 0] for frames in compiled.values()), compiled
    assert "rank_exchange.py" not in traced, traced


def _repeated_expert_rank(rank, world_size, dispatcher):
    """Tokens that list one expert twice (ids [e, e, ...]) count it twice, forward and backward."""
    layer = ep.EPMoE(8, 3, 32, 16, dispatcher=dispatcher, runner="torch", dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [9, 6][:world_size], seed=12, ep_size=world_size)
    for ids in problem.topk_ids:
        ids[::2, 1] = ids[::2, 0]  # -1 twice, too, where slot 0 is a hole
        ids[1, :] = ids[1, 0]
    return check_layer(layer, problem, rank)


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_repeated_expert_in_a_token_counts_twice(dispatcher):
    for errors in run_ranks(_repeated_expert_rank, 2, dispatcher):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def test_deepep_ll_weight_on_input_rejects_a_repeated_expert():
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_ll", runner="torch", apply_router_weight_on_input=True,
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 4})
    with pytest.raises(ValueError, match=r"topk_ids row 1 lists an expert twice: \[3, 3\]; deepep_ll with "
                                         r"apply_router_weight_on_input needs distinct experts per token"):
        layer(torch.randn(2, 16), torch.tensor([[0, 1], [3, 3]]), torch.rand(2, 2))


def _empty_rank_rank(rank, world_size, dispatcher):
    """Rank 1 has no tokens and gives an empty x and topk_weights made there, needing no gradient; the other
    ranks' need gradients. The backward's reverse exchanges are collective: every rank must take part, and
    every gradient equals the float64 reference's (rank 1 then still returns its experts' gradients)."""
    from ep_runtime.reference import moe_reference, rel_err
    layer = ep.EPMoE(6, 2, 16, 8, dispatcher=dispatcher, runner="torch", dtype=torch.float64,
                     dispatcher_options=OPTIONS.get(dispatcher))
    problem = make_problem(layer.config, [7, 0, 5][:world_size], seed=21, ep_size=world_size)
    layer.load_experts(problem.w13, problem.w2)
    needs = rank != 1
    x = problem.xs[rank].clone().requires_grad_(needs)
    weights = problem.topk_weights[rank].double().requires_grad_(needs)  # fp32 values: exact in the layer
    (layer(x, problem.topk_ids[rank], weights) * problem.grad_outputs[rank]).sum().backward()
    leaf = lambda t: t.double().clone().requires_grad_(True)  # noqa: E731
    w13, w2 = leaf(problem.w13), leaf(problem.w2)
    xs, ws = [leaf(t) for t in problem.xs], [leaf(t) for t in problem.topk_weights]
    sum((moe_reference(xs[r], problem.topk_ids[r], ws[r], w13, w2, layer.config) * problem.grad_outputs[r]).sum()
        for r in range(world_size)).backward()
    mine = layer.placement.local_expert_ids()
    errors = {"dw13": rel_err(layer.w13.grad, w13.grad[mine]), "dw2": rel_err(layer.w2.grad, w2.grad[mine])}
    if needs:
        errors.update(dx=rel_err(x.grad, xs[rank].grad), dweights=rel_err(weights.grad, ws[rank].grad))
    return errors


@pytest.mark.parametrize("dispatcher", [d for d in DISPATCHERS if ep.dispatchers.get(d).shards_experts])
def test_empty_rank_whose_inputs_need_no_gradient(dispatcher):
    for errors in run_ranks(_empty_rank_rank, 3, dispatcher, timeout=90, group_timeout=30):
        assert max(errors.values()) <= tolerance(torch.float64), errors


def _weight_on_input_fp16_rank(rank, world_size):
    """apply_router_weight_on_input in fp16 with router weights of ~1e-7 (subnormal in fp16) on tokens of ~1e4:
    the scaled inputs (~1e-3) are normal fp16 numbers, so a path that scales in fp32 and rounds once lands
    within rounding of the float64 reference. The torch runner rounded the weight to fp16 first: up to 30%
    off (the Triton runners scale in fp32 too; the interpreter is too slow to run them here)."""
    from ep_runtime.reference import moe_reference, rel_err
    errors = {}
    for dispatcher in ("deepep_normal", "mori", "deepep_ll"):  # deepep_ll scales in its dispatch, the others in the runner
        # (not gated: gelu keeps the ~1e-3 activations normal in fp16; a gated product would be ~1e-6)
        layer = ep.EPMoE(8, 2, 16, 8, dispatcher=dispatcher, runner="torch", dtype=torch.float16, activation="gelu",
                         is_gated=False, apply_router_weight_on_input=True, dispatcher_options=OPTIONS.get(dispatcher))
        problem = make_problem(layer.config, [6, 5], seed=3, ep_size=world_size)
        ids = problem.topk_ids[rank]
        ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], -1, ids[:, 1])  # distinct (deepep_ll folds the weight)
        x, weights = (problem.xs[rank] * 1e4).half(), problem.topk_weights[rank] * 1e-7
        w13, w2 = problem.w13.half(), problem.w2.half()
        layer.load_experts(w13, w2)
        ref = moe_reference(x.double(), ids, weights.double(), w13.double(), w2.double(), layer.config)
        errors[dispatcher] = rel_err(layer(x, ids, weights), ref)
    return errors


def test_weight_on_input_is_applied_in_fp32_for_subnormal_fp16_weights():
    for errors in run_ranks(_weight_on_input_fp16_rank, 2, timeout=120):
        # fp16 rounding of the inputs, activations and output alone gives ~5e-4 here
        assert max(errors.values()) <= 2e-3, errors


def _float64_weights_rank(rank, world_size):
    """A float64 layer given float64 topk_weights (a float64 model's router makes them; torch.autograd.gradcheck
    perturbs them): its output and the gradients of x and topk_weights equal the float64 reference within float64
    rounding, with every dispatcher, rank 1's weights float32 (each rank's own dtype is fine; they travel in x's).
    Every path rounded the weights to float32 first: 1e-8 off, and gradcheck's perturbations of 1e-6 lost."""
    from ep_runtime.reference import moe_reference, rel_err
    errors = {}
    for dispatcher in DISPATCHERS:
        layer = ep.EPMoE(8, 3, 16, 8, dispatcher=dispatcher, runner="torch", dtype=torch.float64,
                         apply_router_weight_on_input=dispatcher == "mori", dispatcher_options=OPTIONS.get(dispatcher))
        problem = make_problem(layer.config, [6, 4], seed=5, ep_size=world_size)
        layer.load_experts(problem.w13, problem.w2)
        gen = torch.Generator().manual_seed(rank)
        weights = torch.rand(problem.topk_ids[rank].shape, generator=gen, dtype=torch.float64) + 0.1  # not fp32 values
        weights = weights if rank == 0 else weights.float()
        x, w = problem.xs[rank].clone().requires_grad_(True), weights.clone().requires_grad_(True)
        (layer(x, problem.topk_ids[rank], w) * problem.grad_outputs[rank]).sum().backward()
        x64, w64 = problem.xs[rank].clone().requires_grad_(True), weights.double().requires_grad_(True)
        ref = moe_reference(x64, problem.topk_ids[rank], w64, problem.w13, problem.w2, layer.config)
        (ref * problem.grad_outputs[rank]).sum().backward()
        # (rank 1's weights' gradient comes back in their float32, rounded once)
        errors[dispatcher] = (rel_err(layer(x, problem.topk_ids[rank], w).detach(), ref.detach()),
                              rel_err(x.grad, x64.grad), rel_err(w.grad, w64.grad) <= tolerance(w.dtype),
                              w.grad.dtype == weights.dtype)
    return errors


def test_float64_layer_keeps_float64_topk_weights():
    for errors in run_ranks(_float64_weights_rank, 2):
        for dispatcher, (y, dx, dweights_ok, same_dtype) in errors.items():
            assert max(y, dx) <= tolerance(torch.float64) and dweights_ok and same_dtype, (dispatcher, errors[dispatcher])


def _observed_exceptions(calls) -> list[str]:
    """Run each of calls (a function taking no argument, raising); the errors dynamo saw leave a traced frame
    (it skips such a frame's code for good), after a fresh start; dynamo is reset after too."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    seen = set(counters["unimplemented"])
    try:
        for call in calls:
            call()
        return [k.split("\n")[0] for k in set(counters["unimplemented"]) - seen if "Observed exception" in k]
    finally:
        torch._dynamo.reset()


def _raises_as_eager(eager, compiled, *args, **kwargs):
    """The same error type and message from the eager and the compiled call."""
    errors = []
    for fn in (eager, compiled):
        with pytest.raises((ValueError, TypeError)) as caught:
            fn(*args, **kwargs)
        errors.append(f"{caught.type.__name__}: {caught.value}")
    assert errors[0] == errors[1], errors


def test_torch_compile_of_a_layer_given_bad_input_raises_as_eager_and_skips_no_frame():
    """A compiled layer given bad input that a traced check finds (x's hidden size, in forward) raises the eager
    layer's error, from outside the traced code. Raised inside it, the error left the frame dynamo traced
    ("Observed exception"), and dynamo then skipped that code for good, in every layer of the process:
    EPMoE.forward ran eagerly from then on, each callee a frame of its own (no error; a good step ran one graph
    more and compiled frames again). In this process, one rank, no good step: a compiled layer's first good step
    takes seconds here (test_torch_compile_matches_eager)."""
    layer = ep.EPMoE(4, 2, 8, 4, dispatcher="standard", runner="torch")
    ids, weights = torch.tensor([[0, 3], [1, -1], [2, 1]]), torch.rand(3, 2)
    compiled = torch.compile(layer, backend="eager")
    assert _observed_exceptions([lambda: _raises_as_eager(layer, compiled, torch.randn(3, 9), ids, weights)]) == []


def test_torch_compile_of_a_dispatch_given_bad_input_raises_as_eager_and_skips_no_frame():
    """The same for a compiled dispatch: float topk_ids (Dispatcher.dispatch's checks) and deepep_normal's
    dispatch(x, None, handle=None); raised inside the traced code, dynamo skipped Dispatcher.dispatch and
    DeepEPNormalDispatcher.dispatch for good."""
    layer = ep.EPMoE(4, 2, 8, 4, dispatcher="deepep_normal", runner="torch")
    x, ids, weights = torch.randn(3, 8), torch.tensor([[0, 3], [1, -1], [2, 1]]).float(), torch.rand(3, 2)
    compiled = torch.compile(layer.dispatcher.dispatch, backend="eager")
    eager = layer.dispatcher.dispatch
    assert _observed_exceptions([lambda: _raises_as_eager(eager, compiled, x, (ids, weights)),
                                 lambda: _raises_as_eager(eager, compiled, x, None, handle=None)]) == []
