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
