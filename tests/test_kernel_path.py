"""The GPU inference path of the exchange (fused layout/flag kernel, device-built plan, one payload
exchange with int32 metadata views, slot kernels), run end to end on 2 gloo ranks through the Triton
interpreter: outputs equal the float64 reference, and every dispatch field equals the torch path's."""
import pytest
import torch

import ep_runtime as ep
from ep_runtime.dispatchers import exchange_kernels as xk
from ep_runtime.testing import check_layer, make_problem, run_ranks, tolerance

pytestmark = pytest.mark.skipif(xk.triton is None, reason="triton not installed")

CASES = {
    "deepep_normal": ("deepep_normal", {}),
    "deepep_normal_static": ("deepep_normal", {"num_worst_tokens": 24, "num_max_dispatch_tokens_per_rank": 13}),
    "mori": ("mori", {"max_dispatch_tokens_per_rank": 16}),
    "mori_static": ("mori", {"max_dispatch_tokens_per_rank": 16, "static": True, "max_input_tokens": 20}),
    "deepep_ll": ("deepep_ll", {"num_max_dispatch_tokens_per_rank": 16}),
}


def _fields(out) -> dict:
    """Every tensor/list field of a dispatch output (the handle's plan excluded), for comparison."""
    return {k: v for k, v in vars(out).items() if k != "handle" and isinstance(v, (torch.Tensor, list, int))}


def _kernel_path_rank(rank, world_size, case, apply_on_input):
    name, options = CASES[case]
    torch.manual_seed(0)
    layer = ep.EPMoE(8, 3, 32, 16, dispatcher=name, runner="torch", dispatcher_options=options,
                     apply_router_weight_on_input=apply_on_input)
    problem = make_problem(layer.config, [11, 7], seed=5, ep_size=world_size)
    if apply_on_input:  # distinct experts per token (deepep_ll requires it then); keep -1 holes
        problem.topk_ids[rank][:, 1:] = torch.where(problem.topk_ids[rank][:, 1:] == problem.topk_ids[rank][:, :1],
                                                    -1, problem.topk_ids[rank][:, 1:])
    x = problem.xs[rank].float()
    topk = ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])
    with torch.no_grad():
        torch_out = layer.dispatcher.dispatch(x, topk)
        with xk.forced():
            kernel_out = layer.dispatcher.dispatch(x, topk)
            errors = check_layer(layer, problem, rank, backward=False)
    with xk.forced():  # x needs no gradient but the experts do: kernel dispatch, differentiable combine
        mixed = check_layer(layer, problem, rank, backward=False)
    differ = []
    for key, want in _fields(torch_out).items():
        got = getattr(kernel_out, key)
        if key == "recv_x" and hasattr(torch_out, "masked_m"):  # rows past masked_m hold no data
            valid = torch.arange(want.shape[1])[None, :] < torch_out.masked_m[:, None]
            got, want = got[valid], want[valid]
        # (torch.equal ignores dtypes: a field must also have the same dtype on both paths)
        same = torch.equal(got, want) and got.dtype == want.dtype if isinstance(want, torch.Tensor) else got == want
        if not same:
            differ.append(key)
    # the handle's layout and receive counts (views the kernel path makes when first read)
    plans = [getattr(out.handle, "exchange", out.handle) for out in (torch_out, kernel_out)]
    for key in ("num_recv_tokens_per_expert_tensor", "num_recv_tokens", "most_received"):
        got, want = (getattr(plan, key) for plan in plans)
        if not (torch.equal(got, want) and got.dtype == want.dtype):
            differ.append(f"handle.{key}")
    for key, want, got in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"),
                              plans[0].layout, plans[1].layout):
        if not torch.equal(got.long(), want.long()):
            differ.append(f"handle.layout.{key}")
    return {"y": max(errors["y"], mixed["y"]), "differing fields": differ}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("apply_on_input", [False, True])
def test_kernel_path_matches_reference_and_torch_path(case, apply_on_input):
    for result in run_ranks(_kernel_path_rank, 2, case, apply_on_input, timeout=240):
        assert result["y"] <= tolerance(torch.float32), result
        assert result["differing fields"] == [], result


def _kept_scratch_rank(rank, world_size):
    """deepep_ll on the kernel path keeps its scratch (send payload, scatter plan, combine partials) per
    shape and stream (CPU: thread). Calls with new routing, with another shape in between and from
    another thread each give the torch path's rows and combine, and an earlier output is not
    changed by later calls."""
    import threading

    from ep_runtime.runner_core import CombineInput
    from ep_runtime.scratch import SCRATCH
    SCRATCH.clear()
    config = ep.MoeConfig(8, 3, 32, 16)
    small, large = (ep.dispatchers.create("deepep_ll", config, num_max_dispatch_tokens_per_rank=m) for m in (16, 24))
    gen = torch.Generator().manual_seed(rank)

    def problem(T):
        return torch.randn(T, 32, generator=gen), ep.TopKOutput(
            torch.randint(-1, 8, (T, 3), generator=gen, dtype=torch.int32), torch.rand(T, 3, generator=gen))

    def run(d, x, topk):  # (the rows that hold data, the counts, combine of the rows doubled)
        out = d.dispatch(x, topk)
        valid = torch.arange(out.recv_x.shape[1])[None, :] < out.masked_m[:, None]
        return out, (out.recv_x[valid].clone(), out.masked_m.clone(), d.combine(CombineInput(out.recv_x * 2, out)))

    def same(a, b):
        return all(torch.allclose(u.float(), v.float(), rtol=1e-6, atol=1e-6) for u, v in zip(a, b))

    differ, first = [], None
    with torch.no_grad():
        for i, (d, (x, topk)) in enumerate([(small, problem(11)), (large, problem(20)), (small, problem(16)),
                                            (small, problem(5))]):
            want = run(d, x, topk)[1]
            with xk.forced(), torch.inference_mode(i == 0):  # the first call's scratch serves later ones
                out, got = run(d, x, topk)
            if not same(got, want):
                differ.append(f"call {i}")
            if first is None:
                first, first_rows = out, got[0]
        x, topk = problem(9)
        want = run(small, x, topk)[1]
        got = []
        with xk.forced():
            thread = threading.Thread(target=lambda: got.append(run(small, x, topk)[1]))
            thread.start()
            thread.join()
        if not same(got[0], want):
            differ.append("other thread")
    valid = torch.arange(first.recv_x.shape[1])[None, :] < first.masked_m[:, None]
    if not torch.equal(first.recv_x[valid], first_rows):
        differ.append("first output changed")
    kept = sorted(((what if isinstance(what, str) else what[0]).split()[0], shape[0], thread == threading.get_ident())
                  for (user, what, shape, _), _, _, thread in SCRATCH._entries if user == "exchange")
    return differ, kept


def test_kernel_path_scratch_is_kept_per_shape_and_thread():
    for differ, kept in run_ranks(_kept_scratch_rank, 2, timeout=240):
        assert differ == []
        # N = R * M rows (M = 16 and 24); this thread's for both shapes, the other thread's for M = 16
        assert kept == sorted((what, n, mine) for what in ("ll_gather", "ll_plan", "payload")
                              for n, mine in ((32, False), (32, True), (48, True))), kept


def _bad_rank(rank, world_size, case):
    """Rank 1 sends an id out of range: on the kernel path (read at once on CPU ranks) every rank
    fails, and rank 1's error names the value."""
    name, options = CASES[case]
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=name, runner="torch", dispatcher_options=options)
    x = torch.randn(5, 32)
    ids = torch.tensor([[0, 5]] * 5, dtype=torch.int32)
    if rank == 1:
        ids[2, 1] = 8
    with torch.no_grad(), xk.forced():
        try:
            layer(x, ids, torch.rand(5, 2))
        except ValueError as err:
            return str(err)
    return "no error"


@pytest.mark.parametrize("case", ["deepep_normal", "deepep_ll", "mori_static"])
def test_kernel_path_flags_bad_ids_on_every_rank(case):
    messages = run_ranks(_bad_rank, 2, case, timeout=240)
    assert "rank 1 got invalid topk_ids" in messages[0], messages
    assert "topk_ids has id 8 at [2, 1]" in messages[1], messages


def _bad_shape_rank(rank, world_size, case):
    """Rank 1's x has another hidden size: raised there before any collective, but rank 1 still joins the
    count table with a row marking its input as bad, of the kernel path's length (RankExchange.row_layout's),
    so rank 0 fails at once too, naming rank 1; then both ranks run a good forward (the torch
    path: the interpreter is slow)."""
    name, options = CASES[case]
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher=name, runner="torch", dispatcher_options=options)
    ids = torch.tensor([[0, 5]] * 5, dtype=torch.int32)
    with torch.no_grad(), xk.forced():
        try:
            layer(torch.randn(5, 31 if rank == 1 else 32), ids, torch.rand(5, 2))
            message = "no error"
        except ValueError as err:
            message = str(err)
    problem = make_problem(layer.config, [5, 4], seed=2, ep_size=world_size)
    return message, check_layer(layer, problem, rank, backward=False)["y"]


@pytest.mark.parametrize("case", ["deepep_normal", "deepep_ll", "mori_static"])
def test_kernel_path_fails_every_rank_at_once_for_one_rank_with_a_bad_shape(case):
    (message0, error0), (message1, error1) = run_ranks(_bad_shape_rank, 2, case, timeout=240, group_timeout=30)
    assert message0 == (f"{CASES[case][0]} dispatch: rank 1 of 2 was given bad input (its own error names the "
                        f"argument); no token was sent"), message0
    assert message1 == "x has shape [5, 31]; expected [T, 32] (hidden_size=32)", message1
    assert max(error0, error1) <= tolerance(torch.float32)


def test_standard_checks_values_with_one_kernel():
    """standard on the kernel path: the fused flag kernel names a bad id and a NaN weight as the torch
    checks do (at once on CPU tensors), good input runs, and the kernel's per-expert counts are the
    layer's expert load."""
    layer = ep.EPMoE(8, 2, 32, 16, dispatcher="standard", runner="torch")
    x = torch.randn(4, 32)
    ids = torch.tensor([[0, 5], [1, 2], [3, 7], [6, 0]], dtype=torch.int32)
    with torch.no_grad(), xk.forced():
        assert layer(x, ids, torch.rand(4, 2)).shape == (4, 32)
        assert layer.expert_load().tolist() == [2, 1, 1, 1, 0, 1, 1, 1]
        more = torch.tensor([[4, -1]] * 9, dtype=torch.int32)  # more tokens than before: a bigger scratch buffer
        assert layer(torch.randn(9, 32), more, torch.rand(9, 2)).shape == (9, 32)
        assert layer.expert_load().tolist() == [2, 1, 1, 1, 9, 1, 1, 1]
        bad = ids.clone()
        bad[2, 1] = 9
        with pytest.raises(ValueError, match=r"topk_ids has id 9 at \[2, 1\]"):
            layer(x, bad, torch.rand(4, 2))
        w = torch.rand(4, 2)
        w[1, 0] = float("nan")
        with pytest.raises(ValueError, match="topk_weights has a non-finite value"):
            layer(x, ids, w)


PERMUTED = [1, 0, 0, 1, 1, 0, 1, 0]  # experts dealt to ranks out of order (each rank holds 4)


def _permuted_rank(rank, world_size, name):
    options = CASES.get(name, (name, {}))[1]
    layer = ep.EPMoE(8, 3, 32, 16, dispatcher=name, runner="torch", dispatcher_options=options,
                     expert_to_rank=None if name == "standard" else PERMUTED)
    problem = make_problem(layer.config, [11, 7], seed=9, ep_size=world_size)
    errors = check_layer(layer, problem, rank, backward=True)  # the torch path, forward and gradients
    with torch.no_grad(), xk.forced():
        errors["y (kernel path)"] = check_layer(layer, problem, rank, backward=False)["y"]
    return errors


@pytest.mark.parametrize("name", ep.dispatchers.registered())
def test_every_dispatcher_with_a_non_contiguous_placement_matches_reference(name):
    """Experts assigned to ranks by a permutation: the exchange, the counts and the weight shards all
    follow the placement table (torch path with gradients, and the kernel path)."""
    for errors in run_ranks(_permuted_rank, 2, name, timeout=240):
        assert max(errors.values()) <= tolerance(torch.float32), errors


def test_dispatch_names_a_missing_topk_pair():
    """d.dispatch(x, ids) (the weights forgotten) is a TypeError naming topk, not an unpacking error."""
    d = ep.dispatchers.create("standard", ep.MoeConfig(8, 2, 32, 16))
    with pytest.raises(TypeError, match=r"topk must be ep.TopKOutput\(topk_ids, topk_weights\).*Tensor of shape \[4, 2\]"):
        d.dispatch(torch.randn(4, 32), torch.zeros(4, 2, dtype=torch.int32))


def _ranks_that_differ_rank(rank, world_size, case):
    """On the kernel path (forced onto CPU ranks): (1) rank 0 dispatches bf16 x, rank 1 fp16 (rows of
    one size: read as each other's bits they were garbage, with no error); (2) x and topk_weights need
    a gradient on rank 0 only (rank 1 took the inference kernels' one exchange where rank 0 ran two:
    gloo failed or hung). Returns the dtype errors, whether rank 1's combine output needs a gradient,
    and rank 0's gradients' errors against the float64 reference."""
    from ep_runtime.reference import rel_err
    from ep_runtime.runner_core import CombineInput
    name, options = CASES[case]
    E, K, H, T = 8, 2, 16, 5
    d = ep.dispatchers.create(name, ep.MoeConfig(E, K, H, 8), **options)
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(T, H, generator=gen)
    ids = torch.randint(-1, E, (T, K), generator=gen, dtype=torch.int32)
    w = torch.rand(T, K, generator=gen)
    with xk.forced():
        try:
            d.dispatch(x.to((torch.bfloat16, torch.float16)[rank]), ep.TopKOutput(ids, w))
            message = "no error"
        except TypeError as err:
            message = str(err)
        x_in, w_in = (x.clone().requires_grad_(rank == 0), w.clone().requires_grad_(rank == 0))
        out = d.dispatch(x_in, ep.TopKOutput(ids, w_in))
        # each received row times its weights here (0 where the expert is elsewhere): y = x * its valid weights' sum
        ids_here = out.recv_topk_ids  # (mori's are global: this rank holds experts [rank * E/R, (rank + 1) * E/R))
        here = (ids_here >= 0) & ((ids_here // (E // world_size) == rank) if name == "mori" else True)
        y = d.combine(CombineInput(out.recv_x * torch.where(here, out.recv_topk_weights, 0.0).sum(1, keepdim=True), out))
        g = torch.randn(T, H, generator=gen)
        if y.requires_grad:
            (y * g).sum().backward()
    errors = {}
    if rank == 0:
        valid = (ids >= 0).double()
        x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
        (x64 * (w64 * valid).sum(1, keepdim=True) * g.double()).sum().backward()
        errors = {"y": rel_err(y, x64.detach() * (w64.detach() * valid).sum(1, keepdim=True)),
                  "dx": rel_err(x_in.grad, x64.grad), "dweights": rel_err(w_in.grad, w64.grad)}
    return message, y.requires_grad, errors


@pytest.mark.parametrize("case", ["deepep_normal", "mori_static"])
def test_kernel_path_ranks_that_differ_in_dtype_or_gradients(case):
    """x's dtype and whether x / topk_weights need gradients ride in the kernel's count row as in the
    torch-made one: differing dtypes fail every rank naming them, and a rank whose inputs need no
    gradient sends them as needing one where another rank's do (a host plan, and a static plan read at once)."""
    results = run_ranks(_ranks_that_differ_rank, 2, case, timeout=120, group_timeout=30)
    for rank, (message, differentiable, errors) in enumerate(results):
        assert message == ("x has dtype torch.bfloat16 on rank 0, but the ranks differ (torch.bfloat16 on rank 0, "
                           "torch.float16 on rank 1); allowed: one dtype on every rank (rows cross ranks as raw bytes); "
                           "every rank stops here").replace("torch.bfloat16 on rank 0, but",
                                                            f"{(torch.bfloat16, torch.float16)[rank]} on rank {rank}, but"
                                                            ), message
        assert differentiable, rank
        assert max(errors.values(), default=0.0) <= 1e-6, errors


def _ll_one_rank_trains_x_rank(rank, world_size):
    """deepep_ll on the kernel path (forced; its static plan is read at once on CPU ranks, as on CUDA with
    EP_RUNTIME_SYNC_CHECKS=1): x and the experts need a gradient on rank 0, nothing on rank 1 (frozen
    experts). Rank 1's rows are sent as needing one (handle.grads), so what it receives must reach recv_x
    and combine through autograd too: rank 0's x gradient needs rank 1's reverse exchanges. Returns y's and
    x's gradient's errors against the float64 reference."""
    from ep_runtime.reference import moe_reference, rel_err
    layer = ep.EPMoE(8, 2, 16, 8, dispatcher="deepep_ll", runner="torch",
                     dispatcher_options={"num_max_dispatch_tokens_per_rank": 8})
    problem = make_problem(layer.config, [5, 4], seed=3, ep_size=world_size)
    layer.load_experts(problem.w13.float(), problem.w2.float())
    layer.requires_grad_(rank == 0)
    x = problem.xs[rank].float().requires_grad_(rank == 0)
    with xk.forced():
        y = layer(x, problem.topk_ids[rank], problem.topk_weights[rank])
        if y.requires_grad:
            (y * problem.grad_outputs[rank].float()).sum().backward()
    xs = [x_r.float().double().requires_grad_() for x_r in problem.xs]
    refs = [moe_reference(xs[r], problem.topk_ids[r], problem.topk_weights[r].double(), problem.w13.float().double(),
                          problem.w2.float().double(), layer.config) for r in range(world_size)]
    sum((ref * problem.grad_outputs[r].float().double()).sum() for r, ref in enumerate(refs)).backward()
    errors = {"y": rel_err(y.detach(), refs[rank].detach())}
    if rank == 0:
        errors["dx"] = rel_err(x.grad, xs[0].grad) if x.grad is not None else float("inf")
    return errors


def test_kernel_path_deepep_ll_rank_whose_x_needs_no_gradient_runs_the_reverse_exchange():
    for errors in run_ranks(_ll_one_rank_trains_x_rank, 2, timeout=120, group_timeout=20):
        assert max(errors.values()) <= tolerance(torch.float32), errors
