"""Host batches onto the training device, one batch ahead of the step that uses it.

`to_device(batches, device)` turns an iterator of numpy batches into float32 device tensors. A
batch is float32, or uint16 holding bfloat16 bits (rows stored in bf16, `Source.storage`): those
travel as bf16, half the bytes, and are widened on the device. On a CUDA device each batch is sent
on a side stream with a non-blocking copy while the GPU still works on the previous step; the
training stream waits for the copy with an event, not a host synchronisation. (Pinned
host-to-device copies ran at 54 GB/s on an H100 host against 7.5-12.5 GB/s from pageable memory.)
A batch already in page-locked memory (the feed wrote it there: `BatchIterator(allocate=pinned)`)
is sent from where it is; any other is first staged in one of a few pinned buffers of our own. On
the CPU a float32 batch is wrapped without a copy and bf16 bits are widened into one of RING reused
float32 buffers (no allocation per batch).

Lifetime: the host array of batch i must stay unchanged until batch i + 1 has been drawn from
`batches` (the copy of i is still in flight then); before drawing batch i + 2 the host waits for
the copy of i. So a feed that reuses its buffers gives each batch `keep=1` (`BatchIterator`).

The reading itself (file access, shuffling, gathering) runs on `BatchIterator`'s background thread.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

RING = 3
"""Pinned buffers in rotation: one being filled, one in flight, one in use by the step."""


def to_device(batches: Iterable, device: torch.device, *, pinned: bool | None = None) -> Iterator:
    """Yield each batch as float32 tensors on `device`, in order.

    A batch is one numpy array, or a dict of named arrays ({"x": ..., "y": ...}), which comes back
    as a dict of tensors. `pinned`: send through page-locked memory on a side stream (default:
    when `device` is CUDA).
    """
    device = torch.device(device)
    if pinned is None:
        pinned = device.type == "cuda"
    it = iter(batches)
    try:
        if not pinned:
            if device.type == "cpu":  # wrapped as they are; bf16 rows widened into reused buffers
                rings: dict = {}
                for batch in it:
                    yield _map_named(batch, lambda name, a: _widen_cpu(a, rings, name))
                return
            for batch in it:
                yield _map(batch, lambda a: widen(host_tensor(a).to(device)))
            return
        feeders: dict = {}  # one ring of buffers per stream name (None: plain array batches)

        def feeder(name) -> _PinnedFeeder:
            if name not in feeders:
                feeders[name] = _PinnedFeeder(device)
            return feeders[name]

        def send(batch):
            if isinstance(batch, dict):
                return {k: feeder(k).send(v) for k, v in batch.items()}
            return feeder(None).send(batch)

        def receive(pending):
            if isinstance(pending, dict):
                return {k: feeders[k].receive(v) for k, v in pending.items()}
            return feeders[None].receive(pending)

        def finish(pending):
            for _, event in (pending.values() if isinstance(pending, dict) else [pending]):
                if event is not None:
                    event.synchronize()  # the feed may now refill the host buffer this copy read

        first = next(it, None)
        if first is None:
            return
        pending = send(first)  # the next batch's copy is started before this one is handed out
        for batch in it:
            following = send(batch)
            yield receive(pending)
            finish(pending)
            pending = following
        yield receive(pending)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # stop the reader thread of a generator left early


def host_tensor(batch: np.ndarray) -> Tensor:
    """A numpy batch as a CPU tensor sharing its memory: float32, or bfloat16 for uint16 bits."""
    if not batch.flags.writeable:
        batch = batch.copy()  # torch.from_numpy warns on read-only arrays
    t = torch.from_numpy(batch)
    return t.view(torch.bfloat16) if batch.dtype == np.uint16 else t


def widen(t: Tensor) -> Tensor:
    """float32 on the tensor's own device (bf16 rows are widened where they arrive)."""
    return t if t.dtype == torch.float32 else t.float()


def pinned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised page-locked numpy array (`BatchIterator(allocate=...)` on a CUDA host)."""
    itemsize = np.dtype(dtype).itemsize
    torch_dtype = {4: torch.float32, 2: torch.int16}[itemsize]
    return torch.empty(shape, dtype=torch_dtype, pin_memory=True).numpy().view(dtype)


def _widen_cpu(a: np.ndarray, rings: dict, name) -> Tensor:
    """A CPU batch as a float32 tensor: the array itself, or bf16 bits widened into the next of RING
    reused float32 buffers of stream `name` (valid while the next batch is drawn, as the feed's own
    buffers). Widened on the calling thread alone: on the loaded 2-core VM torch's conversion of a
    16,384 x 768 batch took 1.9 ms on one thread, 12 ms on two (and numpy's two passes 3.3 ms)."""
    if a.dtype != np.uint16:
        return host_tensor(a)
    ring = rings.setdefault(name, [[None] * RING, 0])
    buffers, i = ring
    ring[1] = (i + 1) % RING
    buf = buffers[i]
    if buf is None or buf.shape != a.shape:
        buf = buffers[i] = torch.empty(a.shape, dtype=torch.float32)
    with one_thread():
        return buf.copy_(host_tensor(a))


@contextmanager
def one_thread():
    """Run the enclosed torch ops on one CPU thread. `torch.set_num_threads` sets the calling thread's
    OpenMP count (and the default of threads that start meanwhile); it is restored on exit."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _map_named(batch, fn):
    return {k: fn(k, v) for k, v in batch.items()} if isinstance(batch, dict) else fn(None, batch)


def _map(batch, fn):
    return _map_named(batch, lambda _, a: fn(a))


class _PinnedFeeder:
    """One copy stream, and a ring of pinned host buffers for batches not already pinned (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[Tensor | None] = [None] * RING
        self.done: list = [None] * RING  # event recorded after the copy that read each slot
        self.next_slot = 0

    def send(self, batch: np.ndarray) -> tuple[Tensor, object]:
        """Start the copy of `batch` to the device; returns (device tensor, event)."""
        src, slot = host_tensor(batch), None
        if not (self.cuda and src.is_pinned()):
            src, slot = self._stage(src)
        if not self.cuda:  # the same path without CUDA (tests): a plain copy
            return src.to(self.device, copy=True), None
        with torch.cuda.stream(self.stream):
            out = src.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        if slot is not None:
            self.done[slot] = event
        return out, event

    def _stage(self, src: Tensor) -> tuple[Tensor, int]:
        """Copy `src` into the next pinned buffer, once the copy that last read that buffer is done."""
        i = self.next_slot
        self.next_slot = (i + 1) % RING
        if self.done[i] is not None:
            self.done[i].synchronize()
            self.done[i] = None
        buf = self.slots[i]
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = self.slots[i] = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.cuda)
        buf.copy_(src)
        return buf, i

    def receive(self, pending: tuple[Tensor, object]) -> Tensor:
        """Make the current stream wait for the copy, then hand the tensor to it, widened to float32."""
        out, event = pending
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            out.record_stream(current)  # the allocator must not reuse it before the step is done
        return widen(out)
