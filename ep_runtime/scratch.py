"""Scratch buffers kept across calls, one cache for the runners and the exchanges (see ScratchCache)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import fields, is_dataclass
from typing import Any, Callable

import torch

from ep_runtime import envs


class ScratchCache:
    """Buffers a call writes and reads but never returns (a runner's pair alignment and intermediate
    rows, an exchange's send payload and partial sums), kept per shape for the next call: each CUDA
    allocation costs microseconds of host time, as much as a decode step's kernel launches. Sharing is safe because the key holds the device, its current
    stream and the thread (calls on one stream run in order; two streams or threads never share a
    buffer), and nothing is reused or kept while a CUDA graph is captured (the graph allocates its own
    buffers from its pool; a cached one could be freed under a graph that still writes it). Least recently used
    entries beyond EP_RUNTIME_SCRATCH_MB are dropped; an entry larger than it is not kept. Under
    torch.compile every call makes its own (traced code keeps no state across calls)."""

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()  # key -> (buffers, bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, device: torch.device, make: Callable[[], Any]) -> Any:
        """The buffers make() built for (key, device, its stream, this thread) on an earlier call, else
        make()'s. make() runs outside inference mode: a kept buffer serves later calls, training ones too."""
        if torch.compiler.is_compiling():
            return make()
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return make()
            # (every device's default stream is 0: the device is part of the key)
            key = (key, device, torch._C._cuda_getCurrentRawStream(device.index), threading.get_ident())
        else:
            key = (key, device, None, threading.get_ident())
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
        with torch.inference_mode(False):
            buffers = make()
        self._keep(key, buffers)
        return buffers

    def _keep(self, key: tuple, buffers: Any) -> None:
        budget = envs.get("SCRATCH_MB") << 20
        size = _storage_bytes(buffers)
        with self._lock:
            if size <= budget and key not in self._entries:
                self._entries[key] = (buffers, size)
                self._bytes += size
            while self._bytes > budget:  # also when the budget was lowered since the others were kept
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _storage_bytes(buffers: Any) -> int:
    """Bytes of the distinct storages the tensors in `buffers` (tensors, tuples, dataclasses) view."""
    storages: dict = {}
    pending = [buffers]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif is_dataclass(item):
            pending.extend(getattr(item, f.name) for f in fields(item))
    return sum(storages.values())



SCRATCH = ScratchCache()  # shared by every runner and exchange: keys name the user and the shape
