"""Checks read on the host a fixed number of calls late instead of now, so a call on CUDA costs no sync.

The values a check needs (a count table, value flags) are computed on the device, copied to pinned
host memory without a sync (a non_blocking copy and an event) and checked CHECK_LAG deferring calls
later on the same owner, before that call's work, or when the owner flushes (its dispatcher's
`raise_deferred()`). The point depends on the call count only, never on timing, so ranks making
the same calls check at the same call. At most CHECK_LAG copies are pending, so CHECK_LAG landing
buffers, used in turn, never overwrite one still to be checked. Shared by rank_exchange's static
plans, the standard dispatcher and deepep_normal's check of topk_ids given with a reused handle.
"""
from __future__ import annotations

import sys
import warnings
import weakref
from collections import deque
from typing import Any, Callable, NamedTuple, Optional

import torch

# Late enough that the copy has normally landed when it is read (no wait), early enough that a bad
# call is reported while the caller can still tell which one it was.
CHECK_LAG = 2


class _Pending(NamedTuple):
    call: int  # this owner's deferred calls so far, this one included
    ready: Optional["torch.cuda.Event"]  # recorded after the copy (None: host values, copied at once)
    values: torch.Tensor  # the landing buffer (pinned for device values)
    context: Any  # what the check needs besides the values (that call's ids and weights, ...)


def _wait_for_own_work(ready: "torch.cuda.Event", context: Any) -> None:
    """Wait for this rank's own queued work (no peer involved); two calls on, normally already done."""
    if not ready.query():
        ready.synchronize()


def land(values: torch.Tensor, slot: Optional[tuple]) -> tuple:
    """Queue the copy of `values` to host memory (pinned for device values; no sync) into slot's
    buffer when its shape and dtype fit (else a new one), and record an event after it on CUDA.
    slot: an earlier return value or None. Returns (buffer, event or None): read the buffer once the
    event has completed."""
    buffer, ready = slot or (None, None)
    if buffer is None or buffer.shape != values.shape or buffer.dtype != values.dtype:
        # kept for later calls: made outside inference mode (an inference tensor, made by a first call under
        # torch.inference_mode, takes no copy_ outside it: a later no_grad or training call raised)
        with torch.inference_mode(False):
            buffer = torch.empty(values.shape, dtype=values.dtype, pin_memory=values.is_cuda)
        ready = torch.cuda.Event() if values.is_cuda else None
    buffer.copy_(values, non_blocking=values.is_cuda)
    if ready is not None:  # (the stream by index: Event.record() alone asks current_stream() for the current
        ready.record(torch.cuda.current_stream(values.device.index))  # device, ~15 Python calls)
    return buffer, ready


class DeferredChecks:
    """check(values as a list, context) raises ValueError naming the bad value, or LookupError (an
    IndexError included) when the caller's tensors have changed since and the value cannot be found:
    `overwritten` then says what was wrong. `what` names the checked call in the error, e.g. "the
    count table of the static-plan call". wait(event, context) waits for one copy (default: this
    rank's own work)."""

    def __init__(self, check: Callable[[list, Any], None], what: str, overwritten: str,
                 wait: Callable[[Any, Any], None] = _wait_for_own_work):
        # the owner's bound methods held weakly: no cycle through the owner (its dispatcher or exchange
        # then goes, buffers and pending tensors with it, as soon as the last reference does, not at
        # the cyclic collector's next run, which a serving loop may have turned off)
        self._check, self._wait = _weakly(check), _weakly(wait)
        self._what, self._overwritten = what, overwritten
        self._pending: deque = deque()
        self._landing: list = [None] * CHECK_LAG  # (buffer, event) per slot, reused in turn
        self._calls = 0

    def __len__(self) -> int:
        return len(self._pending)

    def make_room(self) -> None:
        """Before a deferring call's work: check the calls CHECK_LAG back (raises their error)."""
        while len(self._pending) >= CHECK_LAG:
            self._check_oldest()

    def defer(self, values: torch.Tensor, context: Any) -> None:
        """Start the copy of `values` to the host (no sync on CUDA); call make_room() first."""
        self._calls += 1
        slot = self._calls % CHECK_LAG
        self._landing[slot] = buffer, ready = land(values, self._landing[slot])
        self._pending.append(_Pending(self._calls, ready, buffer, context))

    def flush(self) -> None:
        """Check every pending call now (waits for their copies); the first bad one raises."""
        while self._pending:
            self._check_oldest()

    def drop(self, owner: str) -> None:
        """The owner (`owner` names it) is going with calls still pending, no raise_deferred() after its last ones:
        check those whose copies have landed (no wait: a finalizer must not block) and warn with the first error,
        since nothing can raise from a finalizer (else the bad values of its last calls go unreported). Not at
        interpreter shutdown (CUDA and torch may be torn down already)."""
        if sys.is_finalizing():
            return
        try:
            while self._pending:
                ready = self._pending[0].ready
                if (ready is not None and not ready.query()) or self._check() is None:
                    return  # (not landed yet, or the owner's methods already gone: a cyclic collection)
                self._check_oldest()
        except Exception as err:  # (anything: a finalizer's exception is printed and lost)
            warnings.warn(f"{owner} was dropped with a deferred check pending, which fails: {err} (call its "
                          f"raise_deferred() after the last call to get this error raised)", RuntimeWarning,
                          stacklevel=2)

    def _check_oldest(self) -> None:
        """Check the oldest pending call. Whatever it raises, nothing stays pending (the calls after it ran on
        top of its invalid output, and a later call must not check them, nor wait for their copies, again).
        A ValueError (LookupError: `overwritten`) or an exact TypeError or RuntimeError (the count table's
        dtype and bad-input checks) gets a note naming the call that queued it; anything else (a peer that
        never answered: ep.PeerFailure) is raised as it is."""
        pending = self._pending.popleft()
        try:
            if pending.ready is not None:
                self._wait()(pending.ready, pending.context)
            check = self._check()
        except Exception:
            self._pending.clear()
            raise
        try:
            check(pending.values.tolist(), pending.context)
        except Exception as err:
            self._pending.clear()
            back = self._calls - pending.call + 1
            when = "the last call" if back == 1 else f"the call {back} calls back"
            note = (f"[found by the deferred check of {self._what}: {when}, whose output is not valid; "
                    f"EP_RUNTIME_SYNC_CHECKS=1 raises at the call itself]")
            if isinstance(err, (ValueError, LookupError)):
                detail = str(err) if isinstance(err, ValueError) else self._overwritten
                raise ValueError(f"{detail} {note}") from None
            if type(err) in (TypeError, RuntimeError):
                raise type(err)(f"{err} {note}") from None
            raise


def _weakly(fn: Callable) -> Callable[[], Callable]:
    """A callable giving fn back: a weak reference for a bound method (its object may go; nothing calls
    it then, since only that object's calls reach the checks), else fn itself."""
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        return weakref.WeakMethod(fn)
    return lambda: fn
