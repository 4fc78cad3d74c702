"""Asynchronous exchanges: what dispatch/combine(async_op=True) and return_recv_hook=True run on.

CUDA: the exchange is issued on a communication stream (one per device, shared by every dispatcher), after
the work already queued on the caller's stream (and after `previous_event`), so the caller's stream
is free for other work (the other micro-batch's experts, shared experts) meanwhile. An event recorded
on the communication stream ends it; `ExchangeWork.wait()` makes the caller's current stream wait on
that event (no host sync) and records the outputs on that stream. Inputs are recorded on the
communication stream when the call is made: the caching allocator then never hands their memory to
new work while the exchange may still read it, even if the caller drops them at once. Capturable in a
CUDA graph (the streams fork and join through events); the graph must call wait() before it ends.

CPU (gloo): the exchange runs on one worker thread per process group. Every exchange of a group, the
synchronous ones included once the worker exists, runs there in call order, so every rank issues its
collectives in the same order however its waits are ordered. gloo releases the GIL while it waits on
the wire, so the caller's own compute runs meanwhile. The output handed back at the call is a shell
the exchange thread fills as the exchange's last step (so an exchange ordered after it by previous_event
reads it filled): a dispatch output that raises when read before that, a combine output of the final
shape whose values are written then. Read it after wait() (or once is_completed() is True).

Argument checks run in the caller before anything is issued (they raise on every rank before any
collective); an error of the exchange itself (a count-table check, a peer failure) is raised by wait()
on CPU ranks, and on CUDA where the synchronous call raises it (a host plan reads its table in the call).
"""
from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import fields, is_dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

# group -> its exchange thread, dropped with the group: a process that makes and drops groups (a
# serving loop, an elastic job) would otherwise keep every group it ever used and one thread for each.
# (The thread holds no reference to the group or the executor between exchanges, so both can go.)
_WORKERS: "weakref.WeakKeyDictionary[Any, ThreadPoolExecutor]" = weakref.WeakKeyDictionary()
_WORKERS_LOCK = threading.Lock()
_USED = False  # set by the first asynchronous launch in this process


def used() -> bool:
    """Whether any exchange of this process ran asynchronously: until then a synchronous call takes
    the plain path (nothing to order after, nothing for torch.compile to trace through)."""
    return _USED


def tensors_in(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in a dispatch output, combine input or handle (dataclasses, tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif _depth > 4:
        return
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from tensors_in(getattr(obj, f.name, None), _depth + 1)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_in(item, _depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item, _depth + 1)


class PendingOutput:
    """The output of an async dispatch on CPU ranks until its exchange is done: reading it before work.wait()
    is a mistake the message names (the exchange may still be writing it); the exchange thread turns this
    very object into the dispatcher's output as the exchange's last step."""

    def __getattr__(self, name: str) -> Any:
        failed = self.__dict__.get("_failed")
        if failed is not None:  # (it said "not ready: call work.wait()" also after wait() had raised the failure)
            raise RuntimeError(f"this dispatch output has no value: its exchange failed ({type(failed).__name__}: "
                               f"{failed}) (attribute {name!r})") from failed
        raise RuntimeError(f"this dispatch output is not ready: call work.wait() (or the receive hook) before "
                           f"reading it (attribute {name!r})")

    def _become(self, real: Any) -> None:
        self.__dict__.update(vars(real))  # (first: a read racing this finds every field once the class is real)
        self.__class__ = type(real)


def filled(fn: Callable[[], Any], out: Any, fill: Callable[[Any, Any], Any]) -> Callable[[], Any]:
    """fn(), written into the shell `out` by fill as the exchange's last step. A failed exchange marks the shell
    instead: a dispatch output then raises naming the failure, a combine output holds NaN (a caller that polled
    is_completed(), True for a failed exchange too, read uninitialised memory as its result)."""
    def run() -> Any:
        try:
            fill(out, fn())
        except BaseException as error:
            if isinstance(out, PendingOutput):
                out.__dict__["_failed"] = error
            elif isinstance(out, torch.Tensor) and out.is_floating_point():
                with torch.no_grad():
                    out.fill_(float("nan"))
            raise
        return out
    return run


class ExchangeWork:
    """What dispatch/combine return beside their output when called with async_op=True (the
    torch.distributed convention). wait() orders the caller after the exchange: on CUDA the current
    stream waits on the exchange's event (the host does not block); on CPU ranks the host waits for
    the worker thread (which fills the output as the exchange's last step). Waiting again is a no-op;
    works may be waited in any order. `event` (CUDA): the exchange's end, to pass as another call's previous_event.

    torch.distributed.Work's surface: wait(timeout=None), is_completed(), is_success(), exception(),
    get_future(), result(), synchronize(); DeepEP's EventOverlap.current_stream_wait() too. Not offered:
    source_rank (no point-to-point receive) and boxed/unbox (TorchScript)."""

    def __init__(self, event: Optional["torch.cuda.Event"] = None, device: Optional[torch.device] = None,
                 outputs: tuple = (), future: Optional[Future] = None):
        self.event, self.device = event, device
        self._outputs = outputs
        self._future = future
        self._waited_streams: set = set()
        self._output: Any = None  # the call's output (get_future's value); set by the dispatcher
        self._dispatcher: Any = None  # who made it, and for which operation: what a timeout's error names
        self._operation = "exchange"

    def _made_by(self, dispatcher: Any, operation: str, output: Any) -> "ExchangeWork":
        self._dispatcher, self._operation, self._output = dispatcher, operation, output
        return self

    def wait(self, timeout: Any = None) -> bool:
        """Order the caller after the exchange. CPU ranks: the host waits at most `timeout` (seconds, or a
        datetime.timedelta as torch's Work.wait takes; None: EP_RUNTIME_TIMEOUT_S, or init_distributed's
        timeout_s), counted from this call; past it, ep.PeerFailure names the operation, the peer(s) and the
        timeout, and the group is marked failed (later calls on it raise at once: a rank that never joins
        leaves the exchange pending on the group's thread). The exchange's own error is raised here too.
        CUDA: timeout=None makes the current stream wait (no host wait; a stuck exchange ends with NCCL's
        watchdog); a timeout also waits on the host, at most that long, then aborts the group's communicator
        and raises ep.PeerFailure. Returns True, as torch's Work.wait."""
        limit = None if timeout is None else _seconds(timeout)
        if self.event is not None:
            stream = torch.cuda.current_stream(self.device)
            if stream not in self._waited_streams:
                stream.wait_event(self.event)
                for t in self._outputs:  # read on this stream from now on: freed only once it is done
                    t.record_stream(stream)
                self._waited_streams.add(stream)
            if limit is not None and not self.event.query():
                self._wait_on_device(limit)
        elif self._future is not None:
            from ep_runtime import distributed
            if not self._future.done() and on_worker(getattr(self._dispatcher, "group", None)):
                raise RuntimeError(f"work.wait() of a {self._operation} called on its group's exchange thread (from a "
                                   f"get_future() callback): the {self._operation} is queued behind the callback "
                                   f"running there, so it cannot complete while the callback waits; wait for it "
                                   f"outside the callback, or chain it with get_future().then(...)")
            try:
                self._future.result(timeout=distributed.timeout_s() if limit is None else limit)
            except FutureTimeout:
                raise self._timed_out(limit) from None
            # (the exchange's own error is raised by result(), here, where the caller waits)
        return True

    def _names(self) -> tuple:
        d = self._dispatcher
        return (getattr(d, "name", "exchange"), getattr(d, "group", None), getattr(d, "rank", 0),
                getattr(d, "world_size", 1))

    def _timed_out(self, limit: Optional[float]) -> Exception:
        """The error of a CPU wait that gave up (the group is then recorded as failed)."""
        from ep_runtime import distributed, envs
        name, group, rank, size = self._names()
        knob = envs.PREFIX + "TIMEOUT_S"
        setting = (f"timeout={limit:g} s given to work.wait()" if limit is not None else
                   f"{distributed.timeout_s():g} s, set with {knob} or init_distributed(timeout_s=...), or "
                   f"work.wait(timeout=...)")
        message = (f"{name} {self._operation} on {distributed.rank_name(group, rank, size)}: work.wait() waited in "
                   f"vain for {distributed._peers(rank, size, group)}: the exchange had not completed within the "
                   f"timeout ({setting}); that rank stalled, died, or took a different code path. The exchange "
                   f"stays pending on the group's exchange thread, so the group is marked failed: rebuild the "
                   f"process group (and the layer) to go on")
        distributed.record_failure(group, message)
        return distributed.PeerFailure(message)

    def _wait_on_device(self, limit: float) -> None:
        from ep_runtime import distributed
        name, group, rank, size = self._names()
        distributed.wait_on_device(self.event, issued_at=time.monotonic(), group=group, name=name,
                                   operation=self._operation, rank=rank, world_size=size,
                                   waited_for=f"the {self._operation} awaited by work.wait()", limit_s=limit,
                                   setting="the timeout given to work.wait()")

    def current_stream_wait(self) -> None:
        """DeepEP's EventOverlap.current_stream_wait(): wait() without a timeout."""
        self.wait()

    def synchronize(self) -> None:
        """torch's Work.synchronize(): wait() without a timeout."""
        self.wait()

    def finished(self) -> None:
        """Block until the exchange is done (CPU ranks; from any thread, the exchange thread included)."""
        if self._future is not None:
            self._future.result()

    def is_completed(self) -> bool:
        """Whether the exchange is done, without blocking (torch.distributed's Work.is_completed): on CPU ranks
        its output is then filled; an exchange that failed is completed too, and wait() raises its error."""
        if self.event is not None:
            return self.event.query()
        return self._future is None or self._future.done()

    def exception(self) -> Optional[BaseException]:
        """The exchange's error once it completed with one (CPU ranks), else None; never blocks."""
        if self._future is not None and self._future.done():
            return self._future.exception()
        return None

    def is_success(self) -> bool:
        """Completed without an error (torch's Work.is_success)."""
        return self.is_completed() and self.exception() is None

    def result(self) -> list:
        """The output's tensors, as torch's Work.result() gives a list (after wait()): combine's [y]; a dispatch
        output's tensor fields in their order (recv_x first)."""
        self.wait()
        return _output_tensors(self._output)

    def get_future(self) -> "torch.futures.Future":
        """A torch.futures.Future whose value is result()'s list, set when the exchange is done (on CPU ranks its
        error is set instead). On CUDA it is a CUDA-aware future, as torch's NCCL works give: its wait()/value()
        make the current stream wait for the exchange. Callbacks (then) run on the thread that completes it."""
        if self.event is not None:
            future = torch.futures.Future(devices=[self.device])
            side = torch.cuda.Stream(self.device)  # the value's events are recorded where the exchange has ended
            side.wait_event(self.event)
            with torch.cuda.stream(side):
                future.set_result(_output_tensors(self._output))
            return future
        future = torch.futures.Future()
        if self._future is None:
            future.set_result(_output_tensors(self._output))
            return future

        def done(f: Future) -> None:
            error = f.exception()
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(_output_tensors(self._output))
        self._future.add_done_callback(done)
        return future


def _output_tensors(output: Any) -> list:
    """A call's output as a list of tensors: [y], or a dispatch output's own tensor fields (not its handle's)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if is_dataclass(output) and not isinstance(output, type):
        return [t for f in fields(output) if isinstance(t := getattr(output, f.name, None), torch.Tensor)]
    return []


def _seconds(timeout: Any) -> float:
    """wait()'s timeout as seconds: a number or a datetime.timedelta, in the range of EP_RUNTIME_TIMEOUT_S."""
    from ep_runtime import distributed
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    return distributed.check_timeout(timeout, "timeout")


class ReceiveHook:
    """return_recv_hook=True: the call issued the exchange and returned; calling this completes the
    receive on the caller's side (on CUDA an event wait, capturable; on CPU ranks the wait for the
    worker). `work`: the same as an ExchangeWork (e.g. for its event)."""

    def __init__(self, work: ExchangeWork):
        self.work = work

    def __call__(self) -> None:
        self.work.wait()


def check_previous_event(previous_event: Any) -> None:
    if previous_event is None or isinstance(previous_event, ExchangeWork):
        return
    if torch.cuda.is_available() and isinstance(previous_event, torch.cuda.Event):
        return
    raise TypeError(f"previous_event={previous_event!r}; allowed: None, a torch.cuda.Event or an ExchangeWork")


_COMM_STREAMS: dict = {}


def comm_stream(device: torch.device) -> "torch.cuda.Stream":
    """The device's communication stream, shared by every dispatcher (made on first use): exchanges of
    all layers then run one after the other in call order, as the transports need (NCCL serialises
    them anyway; the NVLink transport's signals count calls on a region every dispatcher shares).
    High priority: its small packing kernels go ahead of queued GEMMs."""
    if device not in _COMM_STREAMS:
        _COMM_STREAMS[device] = torch.cuda.Stream(device, priority=-1)
    return _COMM_STREAMS[device]


def order_caller_after(device: torch.device) -> None:
    """A synchronous call after async ones on this device: the caller's stream first waits for them
    (their buffers and the transport's state are then settled). Not while capturing a CUDA graph:
    a graph joins the communication stream through its own waits."""
    comm = _COMM_STREAMS.get(device)
    if comm is not None and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(device).wait_stream(comm)


def launch_cuda(device: torch.device, fn: Callable[[], Any], inputs: Any, previous_event: Any
                ) -> tuple[Any, ExchangeWork]:
    """fn() on the communication stream, after the caller's stream and previous_event; inputs are
    recorded on that stream (see the module doc)."""
    global _USED
    _USED = True
    caller = torch.cuda.current_stream(device)
    comm = comm_stream(device)
    comm.wait_stream(caller)
    if isinstance(previous_event, ExchangeWork):
        previous_event = previous_event.event
    if previous_event is not None:
        comm.wait_event(previous_event)
    for t in tensors_in(inputs):
        if t.is_cuda:
            t.record_stream(comm)
    with torch.cuda.stream(comm):
        out = fn()
        done = torch.cuda.Event()
        done.record(comm)
    outputs = tuple(t for t in tensors_in(out) if t.is_cuda)
    return out, ExchangeWork(event=done, device=device, outputs=outputs)


def finished_here(device: torch.device, out: Any) -> ExchangeWork:
    """The work of a call that ran on the caller's current stream (nothing to move): an event there, so
    wait() on another stream is still ordered after it."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return ExchangeWork(event=done, device=device, outputs=tuple(t for t in tensors_in(out) if t.is_cuda))


class _NoGroup:
    """The key of async calls without a process group (a single process that never initialised one)."""


_NO_GROUP = _NoGroup()


def _key(group: Any) -> Any:
    """One worker per process group, however it is named (None is the default group)."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group if group is not None else _NO_GROUP


_THREAD_PREFIX = "ep-runtime-exchange"


def worker(group: Any) -> ThreadPoolExecutor:
    """The group's exchange thread (made on first use)."""
    global _USED
    _USED = True
    key = _key(group)
    with _WORKERS_LOCK:
        if key not in _WORKERS:
            _WORKERS[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD_PREFIX)
        return _WORKERS[key]


def release_workers() -> None:
    """End every group's exchange thread once its queued exchanges are done (not waited for here);
    before the process groups are destroyed: each thread holds its group, whose connections would
    otherwise outlive it in a process that goes on (and makes new groups)."""
    with _WORKERS_LOCK:
        workers = list(_WORKERS.values())
        _WORKERS.clear()
    for executor in workers:
        executor.shutdown(wait=False)


def has_worker(group: Any) -> bool:
    return _key(group) in _WORKERS


def on_worker(group: Any) -> bool:
    """Whether this thread is `group`'s exchange thread (a get_future() callback runs there): a call made here
    must not queue behind itself and wait for that (it waited until the timeout, then blamed a peer)."""
    executor = _WORKERS.get(_key(group))
    return executor is not None and threading.current_thread() in getattr(executor, "_threads", ())


def in_caller_modes(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn run elsewhere with the caller's autograd modes (grad and inference mode are per thread)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run():
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn()
    return run


def submit(group: Any, fn: Callable[[], Any]) -> Future:
    return worker(group).submit(in_caller_modes(fn))


def in_call_order(group: Any, fn: Callable[[], Any]) -> Any:
    """fn(), a collective on `group` besides dispatch/combine (a rebalance's all_reduce, a weight move, a
    new dispatcher's settings check), after the group's exchanges issued so far. Where the group has an
    exchange thread (CPU ranks that ran an async exchange) it runs there, in call order: run beside a
    pending exchange, its collectives could pair with the exchange's in another order on each rank (a
    hang until the timeout). Elsewhere, and on that thread itself, it runs here."""
    if not has_worker(group) or threading.current_thread().name.startswith(_THREAD_PREFIX):
        return fn()
    return submit(group, fn).result()
