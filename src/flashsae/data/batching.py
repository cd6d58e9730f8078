"""Train/validation split and shuffled batches that stay friendly to memory-mapped files.

Shuffling reads whole blocks of sorted row ids (near-sequential file access) and shuffles within
a window of one block plus the rows left over from the previous block. The plan (which rows form
which batch) is computed on row ids alone, so it is a pure function of (seed, epoch) and a resume
can skip batches without reading their data. A background thread reads ahead.
`BatchIterator` plans one stream; `RowBatches` serves several named streams of the same rows
(`x`, `y`, ...) as one BatchSource, the protocol the training loop reads: `batches_per_epoch()`
and `epoch(epoch, start_batch)` yielding {stream: batch}; `DeviceBatches` serves the same batches
from rows held on the training device (torch is imported there only).
Imports only `errors`; never imports preprocess, models, trainer or cli.
"""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flashsae.errors import ConfigError


def split_rows(n_rows: int, nonfinite_rows: np.ndarray, *, val_fraction: float, seed: int,
               max_val_rows: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Split the finite rows into sorted int64 (train_ids, val_ids).

    The validation set is a seeded uniform random subset of round(val_fraction * n_finite)
    rows, at most `max_val_rows`; val_fraction 0 gives an empty validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keep = np.ones(n_rows, dtype=bool)
    keep[np.asarray(nonfinite_rows, dtype=np.int64)] = False
    finite = np.flatnonzero(keep).astype(np.int64)
    n_val = min(int(round(val_fraction * len(finite))), max_val_rows)
    if n_val == 0:
        return finite, np.zeros(0, np.int64)
    picks = np.sort(np.random.default_rng(seed).choice(len(finite), size=n_val, replace=False))
    return np.delete(finite, picks), finite[picks]


def iter_chunks(source, row_ids: np.ndarray | None = None, chunk_rows: int = 65536) -> Iterator[np.ndarray]:
    """Yield writable float32 chunks of at most `chunk_rows` rows, in order (all rows, or `row_ids`).

    Chunks own their memory (never read-only views of a memory-mapped file), so
    `torch.from_numpy` accepts them without a warning.
    """
    if chunk_rows < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if row_ids is None:
        for start in range(0, source.n_rows, chunk_rows):
            chunk = source.read(start, min(start + chunk_rows, source.n_rows))
            yield chunk if chunk.flags.writeable else chunk.copy()
    else:
        row_ids = np.asarray(row_ids, dtype=np.int64)
        for start in range(0, len(row_ids), chunk_rows):
            yield source.take(row_ids[start:start + chunk_rows])


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class BatchIterator:
    """Shuffled float32 (batch_size, d_in) batches over `row_ids` of a Source.

    Args:
        source: a `flashsae.data.Source`.
        row_ids: int64 row indices to draw from (usually sorted train ids from `split_rows`).
        batch_size: rows per batch.
        seed: with the epoch number, fixes the whole batch sequence.
        chunk_rows: ids per contiguous block read at once; the shuffle window is one block
            plus leftovers, so larger is better mixed but uses more memory.
        shuffle: False yields rows in `row_ids` order.
        prefetch: batches read ahead by a background thread (0 reads in the caller's thread).
        drop_last: drop the final partial batch of an epoch.
        shard: (rank, world_size) for data-parallel training: every rank plans the same global
            batches and reads only rows [rank * n // world_size, (rank + 1) * n // world_size)
            of each n-row batch.
        keep: None hands out every batch in a new array the caller may hold for as long as it likes.
            An int writes the full batches into a ring of reused buffers instead (no allocation
            and no page faults per batch): each batch stays unchanged while the caller draws `keep`
            more batches, and is overwritten after that. The ring holds `keep + prefetch + 2`
            buffers: the batch in use, the `keep` before it, the `prefetch` waiting in the queue and
            the one the reader thread is writing. The final partial batch always gets its own array.
        stored: hand out rows in the source's `storage` form (uint16 bits for bfloat16 rows, widened
            on the training device) instead of float32.
        allocate: makes the ring's buffers, `allocate(shape, numpy_dtype) -> ndarray` (page-locked
            memory for a CUDA device); default `np.empty`.
        gather_threads: threads that gather each batch's rows side by side (each writes its own
            consecutive part of the batch, so the batch is the same for any count); default
            min(4, cores). Batches under 4 MiB are gathered on the reader thread alone.

    Rows of a source held in memory (`Source.stored_rows`) are gathered straight from it into the
    batch; rows in files are read a block of sorted ids at a time (near-sequential access) into one
    reused window buffer, after the rows carried over, and the batches gathered from the window.
    Either way each row is written once per batch, split over `gather_threads` for a large batch.
    """

    def __init__(self, source, row_ids: np.ndarray, batch_size: int, *, seed: int,
                 chunk_rows: int = 262_144, shuffle: bool = True, prefetch: int = 2,
                 drop_last: bool = True, shard: tuple[int, int] = (0, 1), keep: int | None = None,
                 stored: bool = False, allocate=None, gather_threads: int | None = None):
        for name, value, low in (("batch_size", batch_size, 1), ("chunk_rows", chunk_rows, 1),
                                 ("prefetch", prefetch, 0), ("keep", 0 if keep is None else keep, 0)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ConfigError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.shard = (rank, world)
        self.source = source
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        if self.row_ids.size and (self.row_ids.min() < 0 or self.row_ids.max() >= source.n_rows):
            raise IndexError(f"row ids must lie in [0, {source.n_rows}), got [{self.row_ids.min()}, "
                             f"{self.row_ids.max()}]")
        self.batch_size = batch_size
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.shuffle = shuffle
        self.prefetch = prefetch
        self.drop_last = drop_last
        self.keep = keep
        self.stored = stored and getattr(source, "storage", "float32") != "float32"
        self.allocate = allocate or np.empty
        self.gather_threads = min(4, _cores()) if gather_threads is None else gather_threads
        if self.gather_threads < 1:
            raise ConfigError(f"gather_threads must be >= 1, got {gather_threads}")
        self._blocks = [self.row_ids[i:i + chunk_rows] for i in range(0, len(self.row_ids), chunk_rows)]
        self._window_rows: np.ndarray | None = None
        self._ring: tuple[list, list] | None = None  # (buffers, [batches written]) between epochs

    def batches_per_epoch(self) -> int:
        n, b = len(self.row_ids), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        """Yield the batches of `epoch`, starting at batch index `start_batch` (for resuming).

        Closing the generator early stops the reader thread; its errors are raised here.
        """
        if self.prefetch == 0:
            yield from self._batches(epoch, start_batch)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for batch in self._batches(epoch, start_batch):
                    if not put(batch):
                        return
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                put(_Failure(e))

        thread = threading.Thread(target=work, name="flashsae-batches", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()

    def _windows(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """The shuffle plan of `epoch`, on row ids alone: per block read, (ids carried over from the
        previous window, the block's ids, the permutation of the window [carry; block], the number of
        full batches it gives). Batch i of a window is rows perm[i * bs:(i + 1) * bs] of the window;
        the rest of the permutation is carried over."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._blocks)) if self.shuffle else range(len(self._blocks))
        bs = self.batch_size
        carry_ids = np.zeros(0, np.int64)
        for b in order:
            ids = self._blocks[b]
            n_pool = len(carry_ids) + len(ids)
            perm = rng.permutation(n_pool) if self.shuffle else np.arange(n_pool)
            yield carry_ids, ids, perm, n_pool // bs
            carry_ids = np.concatenate([carry_ids, ids])[perm[n_pool // bs * bs:]]

    def plan(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        """The row ids of this rank's share of each batch `epoch` yields, from `start_batch` on.

        The same batches, in the same order, as `epoch()`: a source that holds every row already
        (rows on the device) gathers them itself.
        """
        emitted, rest = 0, np.zeros(0, np.int64)
        bs = self.batch_size
        lo, hi = self._my_rows(bs)
        for carry_ids, ids, perm, n_full in self._windows(epoch):
            window = np.concatenate([carry_ids, ids])
            for i in range(max(0, start_batch - emitted), n_full):
                yield window[perm[i * bs + lo:i * bs + hi]]
            emitted += n_full
            rest = window[perm[n_full * bs:]]
        if not self.drop_last and len(rest) and emitted >= start_batch:
            lo, hi = self._my_rows(len(rest))
            yield rest[lo:hi]

    def _batches(self, epoch: int, start_batch: int) -> Iterator[np.ndarray]:
        """The batch sequence; the plan uses ids only, data is read only for batches yielded."""
        out = self._outputs()
        try:
            yield from self._read_batches(epoch, start_batch, out)
        finally:
            release = getattr(out, "release", None)
            if release is not None:
                release()

    def _read_batches(self, epoch: int, start_batch: int, out) -> Iterator[np.ndarray]:
        rows = getattr(self.source, "stored_rows", lambda: None)()  # duck-typed sources may lack it
        rows = rows if self.stored else _float32(rows)
        if rows is not None:  # in memory: every batch gathered straight from the rows
            for ids in self.plan(epoch, start_batch):
                yield take_rows(rows, ids, out(len(ids)), self.gather_threads)  # ids checked in __init__
            return
        take = self.source.take_stored if self.stored else self.source.take
        window, self._window_rows = self._window(), None  # a second epoch read at once gets its own
        try:
            yield from self._file_batches(epoch, start_batch, take, window, out)
        finally:
            self._window_rows = window

    def _file_batches(self, epoch: int, start_batch: int, take, window: np.ndarray, out) -> Iterator[np.ndarray]:
        bs = self.batch_size
        carry = None  # data of the rows carried into the next window, None when not read (skipped)
        left = np.zeros(0, np.int64)  # ids of those rows
        emitted = 0  # batch index of the next full batch
        for carry_ids, ids, perm, n_full in self._windows(epoch):
            rest = perm[n_full * bs:]
            left = np.concatenate([carry_ids, ids])[rest]
            if emitted + n_full <= start_batch:  # every batch from this window is skipped
                carry, emitted = None, emitted + n_full
                continue
            if carry is None:
                carry = take(carry_ids)
            n_carry = len(carry_ids)
            rows = window[:n_carry + len(ids)]  # the window [carry; block], in one reused buffer
            rows[:n_carry] = carry
            self._read_into(ids, rows[n_carry:])
            lo, hi = self._my_rows(bs)
            for i in range(max(0, start_batch - emitted), n_full):
                yield take_rows(rows, perm[i * bs + lo:i * bs + hi], out(hi - lo), self.gather_threads)
            carry = np.take(rows, rest, axis=0)  # fewer than batch_size rows, read before the next block
            emitted += n_full
        if not self.drop_last and len(left) and emitted >= start_batch:
            lo, hi = self._my_rows(len(left))
            yield carry[lo:hi] if carry is not None else take(left[lo:hi])

    def _window(self) -> np.ndarray:
        """The reused buffer one window of rows is read into: a block and the rows carried into it
        (fewer than a batch). Kept by the iterator, so no epoch allocates (or faults in) a new one."""
        dtype = np.uint16 if self.stored else np.float32
        shape = (min(self.chunk_rows, len(self.row_ids)) + self.batch_size, self.source.d_in)
        if self._window_rows is None or self._window_rows.shape != shape:
            self._window_rows = np.empty(shape, dtype)
        return self._window_rows

    def _read_into(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Rows `ids` (ascending: one block) of the source written into `out`."""
        into = getattr(self.source, "take_into", None)  # duck-typed sources may lack it
        if into is not None:
            into(ids, out, stored=self.stored)
        else:
            out[...] = (self.source.take_stored if self.stored else self.source.take)(ids)

    def _outputs(self):
        """`out(n)`: the array the next n-row batch is written into (see `keep`).

        The ring is kept by the iterator from one epoch to the next (no epoch allocates, faults in or
        pins its buffers again), and so is its position: the first batch of an epoch does not
        overwrite the buffer of the previous epoch's last batch, whose copy may still be in flight.
        An epoch read while another is being read gets a ring of its own."""
        dtype = np.uint16 if self.stored else np.float32
        shape = (self._my_rows(self.batch_size)[1] - self._my_rows(self.batch_size)[0], self.source.d_in)
        if self.keep is None:
            return lambda n: np.empty((n, shape[1]), dtype)
        size = self.keep + self.prefetch + 2
        ring, self._ring = self._ring, None
        if ring is None or len(ring[0]) != size or ring[0][0].shape != shape or ring[0][0].dtype != dtype:
            ring = ([self.allocate(shape, dtype) for _ in range(size)], [0])
        buffers, count = ring

        def out(n: int) -> np.ndarray:
            if n != shape[0]:
                return np.empty((n, shape[1]), dtype)  # the final partial batch
            count[0] += 1
            return buffers[count[0] % size]

        out.release = lambda: setattr(self, "_ring", ring)
        return out

    def _my_rows(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of an n-row global batch."""
        rank, world = self.shard
        return rank * n // world, (rank + 1) * n // world


GATHER_SPLIT_BYTES = 4 << 20
"""A batch gather of at least this many bytes is split over `gather_threads` threads."""

_pool_lock = threading.Lock()
_pools: dict = {}  # gather pools by size, and the pid they belong to


def take_rows(rows: np.ndarray, ids: np.ndarray, out: np.ndarray, threads: int = 1) -> np.ndarray:
    """`np.take(rows, ids, axis=0, out=out)` with the ids split into `threads` consecutive parts, each
    gathered on its own thread (np.take releases the GIL); `out` is the same whatever `threads` is.
    Ids must lie in range (they are not checked)."""
    n = len(ids)
    parts = min(threads, n * out.itemsize * out.shape[1] // GATHER_SPLIT_BYTES) if n else 1
    if parts <= 1:
        return np.take(rows, ids, axis=0, out=out, mode="clip")  # "raise" would buffer the copy
    with _pool_lock:
        if _pools.get("pid") != os.getpid():  # a forked child has none of its parent's threads
            _pools.clear()
            _pools["pid"] = os.getpid()
        pool = _pools.get(parts - 1)
        if pool is None:
            pool = _pools[parts - 1] = ThreadPoolExecutor(parts - 1, thread_name_prefix="flashsae-gather")
    cuts = [n * i // parts for i in range(parts + 1)]
    jobs = [pool.submit(np.take, rows, ids[a:b], 0, out[a:b], "clip") for a, b in zip(cuts[1:-1], cuts[2:])]
    np.take(rows, ids[:cuts[1]], axis=0, out=out[:cuts[1]], mode="clip")
    for job in jobs:
        job.result()
    return out


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _float32(rows: np.ndarray | None) -> np.ndarray | None:
    return rows if rows is not None and rows.dtype == np.float32 else None


class RowBatches:
    """The BatchSource of Sources held in memory or in files: batches are {stream: (batch, d) array}.

    Every named stream (`x`, and `y` for a model that maps one activation to another) is a Source
    with the same rows; each gets a `BatchIterator` with the same ids and seed, so the plans are
    identical and row i of every stream's batch comes from the same data row.
    """

    def __init__(self, streams: dict, row_ids: np.ndarray, batch_size: int, *, seed: int,
                 shard: tuple[int, int] = (0, 1), **options):
        self.iterators = {name: BatchIterator(src, row_ids, batch_size, seed=seed, shard=shard, **options)
                          for name, src in streams.items()}

    def batches_per_epoch(self) -> int:
        return next(iter(self.iterators.values())).batches_per_epoch()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        epochs = {name: it.epoch(epoch, start_batch) for name, it in self.iterators.items()}
        try:
            for parts in zip(*epochs.values()):
                yield dict(zip(epochs, parts))
        finally:
            for gen in epochs.values():
                gen.close()  # stops each reader thread


class NamedBatches:
    """A BatchSource of plain arrays (one stream) as {name: array} batches."""

    def __init__(self, inner, name: str = "x"):
        self.inner, self.name = inner, name

    def batches_per_epoch(self) -> int:
        return self.inner.batches_per_epoch()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        for batch in self.inner.epoch(epoch, start_batch):
            yield {self.name: batch}


class DeviceBatches:
    """The BatchSource of rows already on the training device: {stream: tensor} batches gathered there.

    `planner` (a BatchIterator over the same row ids) says which rows form each batch, so the
    batches and their order are those the host path reads for the same seed; only the gathering
    moves to the device (one index_select per stream and batch, no host copy).
    """

    def __init__(self, rows: dict, planner: BatchIterator):
        self.rows, self.planner = rows, planner

    def batches_per_epoch(self) -> int:
        return self.planner.batches_per_epoch()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict]:
        import torch

        device = next(iter(self.rows.values())).device
        for ids in self.planner.plan(epoch, start_batch):
            idx = torch.from_numpy(ids).to(device, non_blocking=True)
            yield {name: t.index_select(0, idx) for name, t in self.rows.items()}
