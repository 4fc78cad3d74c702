"""combine() given runner rows that cannot be this dispatch's runner output raises naming
combine_input.hidden_states, on every rank, before any exchange (the low-level API: ep.dispatchers.create
and a runner of the user's own). deepep_ll used to read its [L, M*R, H] rows flat with the wrong row
count (garbage up to 1e33, reads past the end of the tensor), standard returned the wrong number of
tokens, and deepep_normal / mori failed inside all_to_all ("Split sizes doesn't match")."""
import contextlib

import pytest
import torch

import ep_runtime as ep
from ep_runtime.runner_core import CombineInput
from ep_runtime.testing import run_ranks

OPTIONS = {"deepep_ll": {"num_max_dispatch_tokens_per_rank": 8}, "mori": {"max_dispatch_tokens_per_rank": 8}}


def _bad_rows(rows: torch.Tensor, case: str, received: int) -> torch.Tensor:
    if case == "dtype":
        return rows.double()
    if case == "one_row_short":  # (mori's buffer has padding rows: one short of the received ones)
        return rows[:, :-1] if rows.dim() == 3 else rows[:received - 1]
    if case == "one_row_long":
        return torch.cat([rows, rows[:, :1]], 1) if rows.dim() == 3 else torch.cat([rows, rows[:1]])
    return torch.cat([rows, rows[..., :1]], -1)  # hidden_size + 1 columns


def _combine_rank(rank, world_size, name):
    d = ep.dispatchers.create(name, ep.MoeConfig(8, 2, 16, 8), **OPTIONS.get(name, {}))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(rank))
    topk = ep.TopKOutput(torch.tensor([[0, 7], [4, -1], [5, 1], [3, 6], [2, 2]]), torch.rand(5, 2))
    out = d.dispatch(x, topk)
    rows = out.hidden_states if name == "standard" else out.recv_x
    messages = {}
    # standard returned rows of another dtype as they were ([T, H] in x's dtype is every combine's promise;
    # the exchanges already refuse them: test_reliability.py)
    for case in ("one_row_short", "one_row_long", "wide") + (("dtype",) if name == "standard" else ()):
        if case == "one_row_long" and name == "mori":
            continue  # padding rows past the received ones are allowed there (its receive buffer's)
        try:
            received = sum(out.handle.recv_splits) if name in ("deepep_normal", "mori") else rows.shape[0]
            d.combine(CombineInput(_bad_rows(rows.clone(), case, received), out))
            messages[case] = "no error"
        except (ValueError, TypeError) as err:
            messages[case] = str(err)
    if name == "deepep_normal":
        messages["received"] = sum(out.handle.recv_splits)
    y = d.combine(CombineInput(rows.clone(), out))  # the ranks are still in step
    return messages, list(y.shape)


@pytest.mark.parametrize("name", ["standard", "deepep_normal", "deepep_ll", "mori"])
def test_combine_names_rows_that_are_not_the_runner_output(name):
    for messages, shape in run_ranks(_combine_rank, 2, name, timeout=120, group_timeout=20):
        assert shape == [5, 16]
        dtype = messages.pop("dtype", None)
        received = messages.pop("received", None)
        for case, message in messages.items():
            assert message.startswith("combine_input.hidden_states has shape "), (case, message)
        if name == "standard":
            assert dtype == ("combine_input.hidden_states has dtype torch.float64; expected torch.float32, the dtype "
                             "of the dispatched x (combine returns y in it)"), dtype
        if name == "deepep_ll":
            assert "expected [4, 16, 16] (recv_x's [L, M*R, H] layout" in messages["one_row_short"]
        if name == "standard":
            assert "expected [5, 16] (one row per dispatched token)" in messages["one_row_long"]
        if name == "mori":
            assert "(the rows this rank received; rows past them are padding)" in messages["one_row_short"]
        if name == "deepep_normal":  # no padding there: one row long is refused as one row short is
            for case in ("one_row_short", "one_row_long"):
                assert f"expected [{received}, 16] (the rows this rank received in the dispatch that made " \
                       f"combine_input.dispatch_output)" in messages[case], messages[case]
        assert "hidden_size=16" in messages["wide"]


STATIC = {"deepep_normal": {"num_worst_tokens": 12}, "mori": {"max_dispatch_tokens_per_rank": 8, "static": True}}


def _static_short_rank(rank, world_size, name):
    d = ep.dispatchers.create(name, ep.MoeConfig(8, 2, 16, 8), **STATIC[name])
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(rank))
    topk = ep.TopKOutput(torch.tensor([[0, 7], [4, -1], [5, 1], [3, 6], [2, 2]]), torch.rand(5, 2))
    out = d.dispatch(x, topk)
    handed = getattr(out, "num_runner_rows", out.recv_x.shape[0])  # the rows the runner gets (and returns)
    try:
        d.combine(CombineInput(out.recv_x[:int(out.handle.num_recv_tokens) - 1].clone(), out))
        message = "no error"
    except ValueError as err:
        message = str(err)
    y = d.combine(CombineInput(out.recv_x[:handed].clone(), out))  # the ranks are still in step
    return message, handed, list(y.shape)


@pytest.mark.parametrize("name", ["deepep_normal", "mori"])
def test_static_combine_names_rows_short_of_the_runner_rows(name):
    # A static plan has no host receive splits: rows short of what the runner was handed dropped the
    # missing tokens' partials without an error (DeepEP's combine asserts num_worst_tokens rows).
    for message, handed, shape in run_ranks(_static_short_rank, 2, name, timeout=120, group_timeout=20):
        assert shape == [5, 16]
        assert message.startswith("combine_input.hidden_states has shape "), message
        assert f"with N >= {handed} (the rows the runner was handed" in message


def _foreign_input_rank(rank, world_size):
    """Each dispatcher's combine given what is not its own dispatch's runner output: a tensor (the runner's rows
    alone), or a CombineInput over another dispatcher's dispatch output (two layers' calls mixed up)."""
    config = ep.MoeConfig(8, 2, 16, 8)
    made = {name: ep.dispatchers.create(name, config, **OPTIONS.get(name, {})) for name in ep.dispatchers.registered()
            if ep.dispatchers.get(name).__module__.startswith("ep_runtime.")}
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(rank))
    topk = ep.TopKOutput(torch.tensor([[0, 7], [4, -1], [5, 1], [3, 6], [2, 2]]), torch.rand(5, 2))
    outputs = {name: d.dispatch(x, topk) for name, d in made.items()}
    messages = {}
    for name, d in made.items():
        foreign = [(other, out) for other, out in outputs.items() if other != name]
        for what, given in [("tensor", x), ("None", CombineInput(x, None)), ("int", CombineInput(x, 3))] + [
                (other, CombineInput(x, out)) for other, out in foreign]:
            try:
                d.combine(given)
                messages[(name, what)] = None
            except (TypeError, ValueError) as err:
                messages[(name, what)] = f"{type(err).__name__}: {err}"
    return messages


def test_combine_names_an_input_that_is_not_its_own_dispatch_output():
    """combine(a tensor) said "combine_input.hidden_states must be a torch.Tensor; got NoneType"; another
    dispatcher's output failed on an attribute of its handle (AttributeError: 'LLHandle' object has no attribute
    'recv_pos') or, deepep_normal's and mori's, was combined. A dispatch_output that is no dispatch output at all
    (None, an int) raised AttributeError: 'NoneType' object has no attribute 'format'."""
    for messages in run_ranks(_foreign_input_rank, 2):
        for (name, what), message in messages.items():
            if what == "tensor":
                assert message == ("TypeError: combine_input must be an ep.CombineInput (the runner's output for this "
                                   "dispatcher's dispatch: MoeRunner.run(dispatch_output, weights)); got Tensor"), message
            elif what in ("None", "int"):
                assert message == (f"TypeError: combine_input.dispatch_output must be this {name} dispatcher's "
                                   f"dispatch output; got {'NoneType' if what == 'None' else 'int'}"), message
            else:
                assert message == (f"ValueError: combine_input.dispatch_output is a {what!r} dispatch's output; allowed: "
                                   f"this {name} dispatcher's own dispatch output (format {name!r})"), message


def _other_device_rank(rank, world_size, name):
    d = ep.dispatchers.create(name, ep.MoeConfig(8, 2, 16, 8), **OPTIONS.get(name, {}))
    out = d.dispatch(torch.randn(5, 16), ep.TopKOutput(torch.tensor([[0, 7], [4, -1], [5, 1], [3, 6], [2, 2]]),
                                                       torch.rand(5, 2)))
    rows = out.hidden_states if name == "standard" else out.recv_x
    try:
        d.combine(CombineInput(rows.to("meta"), out))
        message = "no error"
    except ValueError as err:
        message = str(err)
    return message, list(d.combine(CombineInput(rows.clone(), out)).shape)  # the ranks are still in step


@pytest.mark.parametrize("name", ["standard", "deepep_normal", "deepep_ll", "mori"])
def test_combine_names_rows_on_another_device(name):
    """Rows on another device than the dispatch's (meta here; a CPU expert output for a CUDA dispatch alike):
    standard, deepep_normal and mori on one rank returned y on that device, deepep_ll failed inside torch
    ("Tensor on device meta is not on the expected device cpu!"), the exchanges failed in their collective."""
    for message, shape in run_ranks(_other_device_rank, 2, name, timeout=120, group_timeout=20):
        assert shape == [5, 16]
        assert message == (f"combine_input.hidden_states is on meta; expected cpu (the device of the {name} dispatch "
                           f"output's rows)"), message


# Static-shape formats: their receive rows past the real ones are padding, and so are the runner's rows there.
PADDED = [("deepep_ll", {"num_max_dispatch_tokens_per_rank": 4}), ("mori", {"max_dispatch_tokens_per_rank": 4}),
          ("mori", {"max_dispatch_tokens_per_rank": 4, "static": True}), ("deepep_normal", {"num_worst_tokens": 8})]


def _padding_rows(out) -> list:
    """The runner rows of `out` that are padding: deepep_ll's past masked_m, the others' past the received rows."""
    if out.format == "deepep_ll":
        return [(l, slice(m, None)) for l, m in enumerate(out.masked_m.tolist())]
    received = int(out.handle.num_recv_tokens[0])
    return [(slice(received, None),)]


def _padding_rows_rank(rank, world_size):
    """Every padded format, on the autograd path, the torch path and the kernel path (exchange kernels forced onto
    these CPU ranks), under torch.use_deterministic_algorithms: torch.empty fills floats with NaN and integers with
    their largest value, as a GPU's uninitialized memory may hold, and the exchange's kept scratch buffers are
    filled so too before each call (their contract: rewritten whole before any read). Two calls of other T, an empty
    rank in the second. Returns [(case, what broke)]."""
    from ep_runtime.dispatchers import exchange_kernels as xk
    from ep_runtime.reference import moe_reference, rel_err
    from ep_runtime.scratch import SCRATCH
    from ep_runtime.testing import make_problem, tolerance

    def poison_kept_buffers():
        for ((user, *_), *_), (buffer, _) in list(SCRATCH._entries.items()):
            if user == "exchange" and isinstance(buffer, torch.Tensor):
                buffer.fill_(float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).max)

    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    modes = ["autograd", "no_grad"] + (["kernels"] if xk.triton is not None else [])
    broken = []
    for name, options in PADDED:
        layer = ep.EPMoE(8, 3, 16, 8, dispatcher=name, runner="torch", dispatcher_options=options)
        for call, tokens in enumerate([[2, 4], [3, 0]]):
            problem = make_problem(layer.config, tokens, seed=call, ep_size=world_size)
            layer.load_experts(problem.w13.float(), problem.w2.float())
            for mode in modes[:2] if call == 0 else modes:  # (the kernel path once: the interpreter is slow)
                case = (name, options.get("static", "num_worst_tokens" in options), call, mode)
                poison_kept_buffers()
                x = problem.xs[rank].float().requires_grad_(mode == "autograd")
                weights = problem.topk_weights[rank].clone().requires_grad_(mode == "autograd")
                grad = torch.enable_grad() if mode == "autograd" else torch.no_grad()
                with grad, (xk.forced() if mode == "kernels" else contextlib.nullcontext()):
                    out = layer.dispatcher.dispatch(x, ep.TopKOutput(problem.topk_ids[rank], weights))
                    if name != "deepep_ll":  # formats.md: padding rows hold id -1 and weight 0
                        (pad,) = _padding_rows(out)
                        if not (bool((out.recv_topk_ids[pad] == -1).all()) and bool((out.recv_topk_weights[pad] == 0).all())):
                            broken.append((case, "padding metadata", out.recv_topk_ids[pad].tolist(),
                                           out.recv_topk_weights[pad].tolist()))
                    rows = layer.runner.run(out, layer.weights)
                    for pad in _padding_rows(out):  # a runner of the user's own may leave them unwritten
                        rows.hidden_states[pad] = float("nan")
                    y = layer.dispatcher.combine(rows)
                x64 = problem.xs[rank].float().double().requires_grad_(True)
                w64 = problem.topk_weights[rank].double().requires_grad_(True)
                want = moe_reference(x64, problem.topk_ids[rank], w64, problem.w13.float().double(),
                                     problem.w2.float().double(), layer.config)
                errors = {"y": rel_err(y.detach(), want.detach())}
                if mode == "autograd":
                    dy = problem.grad_outputs[rank]
                    y.backward(dy.float())
                    if want.requires_grad:
                        want.backward(dy)
                    for key, got, ref in (("dx", x.grad, x64.grad), ("dweights", weights.grad, w64.grad)):
                        errors[key] = rel_err(got, torch.zeros_like(got) if ref is None else ref)
                if not all(e <= tolerance(torch.float32) for e in errors.values()):
                    broken.append((case, errors))
    return broken


def test_combine_never_reads_padding_rows_or_unwritten_memory():
    """The padded formats' combine reads only real rows: the runner rows of padding (past masked_m, past the received
    rows) set to NaN, as a grouped GEMM that skips them leaves them on a GPU, add nothing (0 * NaN is NaN), and every
    buffer the exchange allocates or keeps starts as NaN / the largest integer; the outputs and gradients equal the
    float64 reference, and padding rows hold id -1 and weight 0 (docs/formats.md)."""
    assert run_ranks(_padding_rows_rank, 2, timeout=120) == [[], []]
