"""The deferred-check machinery the static plans and the standard dispatcher share (on GPUs it runs
on pinned copies and events, tests/test_gpu.py; host values here take the same bookkeeping): a call's
values are checked CHECK_LAG calls later or at flush, the error names the call, and nothing stays
pending after an error."""
import pytest
import torch

from ep_runtime.dispatchers.deferred import CHECK_LAG, DeferredChecks


def _checks(seen: list) -> DeferredChecks:
    def check(values, context):
        seen.append(context)
        if values[0] < 0:
            raise LookupError("gone")
        if values[0]:
            raise ValueError(f"bad value {values[0]} in call {context}")
    return DeferredChecks(check, "the test flags", "the values were bad and have been overwritten since")


def _call(checks: DeferredChecks, value: int, name: str) -> None:
    checks.make_room()
    flags = torch.tensor([value, 0], dtype=torch.int32)
    checks.defer(flags, name)
    flags.fill_(99)  # the caller reuses its tensor: the check reads the values as they were


def test_a_bad_call_raises_check_lag_calls_later_naming_itself():
    assert CHECK_LAG == 2  # the docs (reliability.md, the SYNC_CHECKS knob) say "two calls later"
    seen = []
    checks = _checks(seen)
    _call(checks, 0, "a")
    _call(checks, 7, "b")
    _call(checks, 0, "c")  # checks a
    assert seen == ["a"] and len(checks) == 2
    with pytest.raises(ValueError, match=r"^bad value 7 in call b \[found by the deferred check of the test flags: "
                                         r"the call 2 calls back, whose output is not valid; EP_RUNTIME_SYNC_CHECKS"):
        _call(checks, 0, "d")
    assert len(checks) == 0  # c is dropped with the error: nothing fires twice
    _call(checks, 0, "e")
    checks.flush()
    assert seen == ["a", "b", "e"]


def test_flush_checks_every_pending_call_and_names_the_last():
    seen = []
    checks = _checks(seen)
    _call(checks, 0, "a")
    _call(checks, 3, "b")
    with pytest.raises(ValueError, match=r"bad value 3 in call b .*: the last call, whose output"):
        checks.flush()
    assert seen == ["a", "b"] and len(checks) == 0
    _call(checks, -1, "c")
    with pytest.raises(ValueError, match=r"^the values were bad and have been overwritten since \[found by"):
        checks.flush()


def _raising_checks(seen: list, errors: dict) -> DeferredChecks:
    """Checks whose call `name` raises errors[name] (the count table's dtype and bad-input checks raise
    TypeError and RuntimeError; anything else stands for a bug or a peer's failure inside a check)."""
    def check(values, context):
        seen.append(context)
        if context in errors:
            raise errors[context]
    return DeferredChecks(check, "the test flags", "overwritten")


@pytest.mark.parametrize("error", [TypeError("x has dtype torch.float16 on rank 1, but the ranks differ"),
                                   RuntimeError("deepep_ll dispatch: rank 1 was given bad input"),
                                   ZeroDivisionError("a check that failed itself")])
def test_any_error_from_a_check_leaves_nothing_pending(error):
    """A check raising something else than ValueError / LookupError left the later calls pending: the next
    call checked them again on top of the bad one's output (or waited for their copies again). TypeError and
    RuntimeError keep their type and get the note naming the call; anything else is raised as it is."""
    seen = []
    checks = _raising_checks(seen, {"b": error})
    _call(checks, 0, "a")
    _call(checks, 0, "b")
    _call(checks, 0, "c")  # checks a
    with pytest.raises(type(error)) as raised:
        _call(checks, 0, "d")  # checks b
    assert len(checks) == 0 and seen == ["a", "b"]  # c goes with the error: never checked, never raised again
    if type(error) is ZeroDivisionError:
        assert raised.value is error
    else:
        assert str(raised.value) == (f"{error} [found by the deferred check of the test flags: the call 2 calls back, "
                                     f"whose output is not valid; EP_RUNTIME_SYNC_CHECKS=1 raises at the call itself]")
    _call(checks, 0, "e")
    _call(checks, 0, "f")
    checks.flush()  # the next calls check their own values only
    assert seen == ["a", "b", "e", "f"]


def _dropped_dispatcher_rank(rank, world_size, name):
    """A dispatcher (and its exchange) goes, with its deferred-check state, as soon as its last reference
    does: nothing in the checks refers back to it (a serving loop may run with the cyclic collector off)."""
    import gc
    import weakref

    import ep_runtime as ep
    from ep_runtime.reference import moe_reference, rel_err
    from ep_runtime.runner_core import MoeRunner
    from ep_runtime.testing import make_problem
    config = ep.MoeConfig(8, 2, 16, 8)
    problem = make_problem(config, [9] * world_size, seed=3, ep_size=world_size)
    gc.collect()
    gc.disable()
    try:
        d = ep.dispatchers.create(name, config)
        runner = MoeRunner(ep.runners.create("torch", config), config, d.placement)
        mine = d.placement.local_expert_ids()
        weights = ep.ExpertWeights(problem.w13[mine].float(), problem.w2[mine].float())
        x = problem.xs[rank].float()
        y = d.combine(runner.run(d.dispatch(x, ep.TopKOutput(problem.topk_ids[rank], problem.topk_weights[rank])),
                                 weights))
        refs = [weakref.ref(d), weakref.ref(d._deferred if hasattr(d, "_deferred") else d.exchange._deferred)]
        del d, runner
        live = sum(ref() is not None for ref in refs)
    finally:
        gc.enable()
    return live, rel_err(y.double(), moe_reference(problem.xs[rank], problem.topk_ids[rank],
                                                   problem.topk_weights[rank].double(), problem.w13, problem.w2,
                                                   config))


@pytest.mark.parametrize("name,world_size", [("standard", 1), ("deepep_normal", 2)])
def test_a_dropped_dispatcher_frees_its_deferred_checks_without_the_cyclic_collector(name, world_size):
    from ep_runtime.testing import run_ranks, tolerance
    for live, err in run_ranks(_dropped_dispatcher_rank, world_size, name, timeout=120):
        assert err <= tolerance(torch.float32), err
        assert live == 0


@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_a_landing_buffer_made_under_inference_mode_serves_later_calls_outside_it(first_in_inference_mode):
    """land() keeps its buffer for the next copy (a host plan's one landing buffer, each deferred slot's): made by
    a first call under torch.inference_mode it was an inference tensor, and the copy of a later call outside
    inference mode (no_grad serving, a training step) raised "Inplace update to inference tensor outside
    InferenceMode". Each copy lands its own values, in either order of modes (CPU values: the same buffer
    bookkeeping as the pinned copies on GPUs)."""
    from ep_runtime.dispatchers.deferred import land
    gen = torch.Generator().manual_seed(0)
    values = [torch.randint(-100, 100, (2, 5), generator=gen, dtype=torch.int32) for _ in range(3)]
    modes = [first_in_inference_mode, not first_in_inference_mode, first_in_inference_mode]
    slot = None
    for v, inference in zip(values, modes):
        with torch.inference_mode(inference):
            slot = land(v, slot)
        assert slot[0].tolist() == v.tolist()
    seen = []  # and through DeferredChecks' landing slots, the modes alternating
    checks = DeferredChecks(lambda vals, ctx: seen.append((vals, ctx)), "the test flags", "overwritten")
    for n, inference in enumerate([True, False, True, False, False]):
        with torch.inference_mode(inference):
            checks.make_room()
            checks.defer(torch.tensor([n, -n], dtype=torch.int32), n)
    checks.flush()
    assert seen == [([n, -n], n) for n in range(5)]
