import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import flashsae
from flashsae.data import ArraySource, BatchIterator, iter_chunks, open_source, split_rows
from flashsae.errors import ConfigError


def id_source(n: int, d: int = 3) -> ArraySource:
    """Rows whose first column is the row index, so batches reveal which rows they hold."""
    x = np.zeros((n, d), np.float32)
    x[:, 0] = np.arange(n)
    x[:, 1:] = np.arange(n)[:, None] * 0.5
    return open_source(x)


class CountingSource:
    """Wraps a Source, counting rows read and optionally failing on the n-th take."""

    def __init__(self, source, fail_on_take: int | None = None):
        self.source, self.fail_on_take = source, fail_on_take
        self.n_rows, self.d_in = source.n_rows, source.d_in
        self.rows_read = self.takes = 0

    def read(self, start, stop):
        self.rows_read += stop - start
        return self.source.read(start, stop)

    def take(self, rows):
        self.takes += 1
        if self.takes == self.fail_on_take:
            raise RuntimeError("disk on fire")
        self.rows_read += len(rows)
        return self.source.take(rows)


def ids_of(batches) -> list[np.ndarray]:
    return [b[:, 0].astype(np.int64) for b in batches]


def live_batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flashsae-batches" and t.is_alive()]


def test_split_rows_partitions_finite_rows():
    bad = np.array([3, 10, 99])
    train, val = split_rows(100, bad, val_fraction=0.1, seed=0)
    assert train.dtype == val.dtype == np.int64
    assert len(val) == 10 and len(train) == 87  # round(0.1 * 97) = 10
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    np.testing.assert_array_equal(np.union1d(train, val), np.setdiff1d(np.arange(100), bad))
    assert not np.intersect1d(train, val).size
    again = split_rows(100, bad, val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(split_rows(100, bad, val_fraction=0.1, seed=1)[1], val)
    assert len(split_rows(100, bad, val_fraction=0.5, seed=0, max_val_rows=7)[1]) == 7
    train0, val0 = split_rows(100, bad, val_fraction=0.0, seed=0)
    assert val0.size == 0 and len(train0) == 97
    with pytest.raises(ConfigError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        split_rows(100, bad, val_fraction=1.0, seed=0)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_row_once_per_epoch_across_blocks(prefetch):
    src = id_source(1000)
    row_ids = np.arange(0, 1000, 2)[3:]  # 497 ids, 4 blocks of <= 128
    it = BatchIterator(src, row_ids, 50, seed=1, chunk_rows=128, drop_last=False, prefetch=prefetch)
    batches = list(it.epoch(0))
    assert len(batches) == it.batches_per_epoch() == 10
    assert [len(b) for b in batches] == [50] * 9 + [47]
    assert all(b.dtype == np.float32 and b.shape[1] == 3 for b in batches)
    np.testing.assert_array_equal(np.sort(np.concatenate(ids_of(batches))), row_ids)
    np.testing.assert_array_equal(batches[0][:, 1], batches[0][:, 0] * 0.5)  # whole rows, not mixed
    dropped = list(BatchIterator(src, row_ids, 50, seed=1, chunk_rows=128, prefetch=prefetch).epoch(0))
    assert len(dropped) == 9 and all(len(b) == 50 for b in dropped)
    assert len(np.unique(np.concatenate(ids_of(dropped)))) == 450


def test_batches_are_a_function_of_seed_and_epoch():
    src = id_source(600)

    def run(seed, epoch, **kw):
        it = BatchIterator(src, np.arange(600), 32, seed=seed, chunk_rows=100, **kw)
        return np.concatenate(ids_of(it.epoch(epoch)))

    first = run(0, 0)
    np.testing.assert_array_equal(first, run(0, 0))
    np.testing.assert_array_equal(first, run(0, 0, prefetch=0))
    assert not np.array_equal(first, run(0, 1))
    assert not np.array_equal(first, run(1, 0))
    assert not np.array_equal(first[:100], np.sort(first[:100]))  # shuffled
    # shuffle=False reads rows in order
    np.testing.assert_array_equal(run(0, 0, shuffle=False), np.arange(576))


def test_single_block_is_a_full_shuffle():
    src = id_source(400)
    batches = list(BatchIterator(src, np.arange(400), 100, seed=0).epoch(0))
    firsts = batches[0][:, 0]
    # a plain full shuffle spreads the first batch over the whole range
    assert firsts.min() < 40 and firsts.max() > 360


@pytest.mark.parametrize("drop_last", [True, False])
def test_start_batch_yields_the_tail_without_reading_skipped_blocks(drop_last):
    src = id_source(1000)
    kw = dict(seed=3, chunk_rows=100, drop_last=drop_last)
    full = ids_of(BatchIterator(src, np.arange(1000), 64, **kw).epoch(2))
    assert len(full) == (15 if drop_last else 16)
    for start in [0, 1, 7, 14, 15, 16, 20]:
        counter = CountingSource(src)
        tail = ids_of(BatchIterator(counter, np.arange(1000), 64, **kw).epoch(2, start_batch=start))
        assert len(tail) == len(full[start:])
        for got, want in zip(tail, full[start:]):
            np.testing.assert_array_equal(got, want)
        if start >= 14:  # resumed in the last blocks: most of the file is never read
            assert counter.rows_read <= 300


def test_closing_early_stops_the_reader_thread():
    src = id_source(5000)
    it = BatchIterator(src, np.arange(5000), 10, seed=0, chunk_rows=1000, prefetch=2)
    gen = it.epoch(0)
    next(gen)
    assert len(live_batch_threads()) == 1
    gen.close()
    assert live_batch_threads() == []
    gen = it.epoch(1)
    for _ in range(3):
        next(gen)
    del gen  # dropped without close: collection closes it
    gc.collect()
    assert live_batch_threads() == []


def test_reader_errors_reach_the_consumer():
    it = BatchIterator(CountingSource(id_source(500), fail_on_take=3), np.arange(500), 10, seed=0, chunk_rows=100)
    with pytest.raises(RuntimeError, match="disk on fire"):
        list(it.epoch(0))
    assert live_batch_threads() == []


def test_iter_chunks():
    src = id_source(250)
    chunks = list(iter_chunks(src, chunk_rows=100))
    assert [len(c) for c in chunks] == [100, 100, 50]
    assert all(c.flags.writeable for c in chunks)  # torch.from_numpy needs no read-only views
    np.testing.assert_array_equal(np.concatenate(chunks)[:, 0], np.arange(250))
    ids = np.array([5, 7, 100, 249])
    got = np.concatenate(list(iter_chunks(src, ids, chunk_rows=3)))
    np.testing.assert_array_equal(got[:, 0], ids)


def test_option_errors():
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        BatchIterator(id_source(10), np.arange(10), 0, seed=0)
    with pytest.raises(ConfigError, match="chunk_rows must be >= 1, got 0"):
        list(iter_chunks(id_source(10), chunk_rows=0))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
def test_epoch_over_a_large_npy_keeps_anonymous_memory_small(tmp_path):
    """A 400 MiB .npy stays memory-mapped: an epoch adds far less than the file to private memory."""
    path = tmp_path / "big.npy"
    rows, d = 409_600, 256  # 400 MiB of float32
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
    for start in range(0, rows, 65536):
        out[start:start + 65536] = np.arange(start, min(start + 65536, rows), dtype=np.float32)[:, None]
    out.flush()
    del out
    script = textwrap.dedent(f"""
        import gc, json, numpy as np
        from flashsae.data import BatchIterator, open_source, split_rows

        def rss_anon_mib():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

        src = open_source({str(path)!r})
        train_ids, _ = split_rows(src.n_rows, np.zeros(0, np.int64), val_fraction=0.01, seed=0)
        it = BatchIterator(src, train_ids, 4096, seed=0, chunk_rows=65536)  # ids with holes: copied blocks
        gc.collect()
        base = peak = rss_anon_mib()
        seen = 0
        for batch in it.epoch(0):
            seen += len(np.unique(batch[:, 0]))
            peak = max(peak, rss_anon_mib())
        print(json.dumps({{"growth": peak - base, "seen": seen, "batches": it.batches_per_epoch(),
                          "memmap": isinstance(src._array, np.memmap)}}))
    """)
    src_dir = str(Path(flashsae.__path__[0]).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src_dir, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
    finally:
        path.unlink()
    assert result["memmap"] and result["batches"] == 99 and result["seen"] == 99 * 4096
    assert result["growth"] < 150, result


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("start", [0, 3, 7])
def test_the_plan_names_the_rows_of_every_batch(drop_last, start):
    x = np.arange(1000, dtype=np.float32).reshape(-1, 1) * np.ones((1, 3), np.float32)
    it = BatchIterator(ArraySource(x, "x"), np.arange(3, 1000, 2), 24, seed=5, chunk_rows=100, drop_last=drop_last,
                       shard=(1, 2))
    for epoch in (0, 1):
        batches = list(it.epoch(epoch, start_batch=start))
        plans = list(it.plan(epoch, start_batch=start))
        assert len(batches) == len(plans) > 0
        for batch, ids in zip(batches, plans):
            np.testing.assert_array_equal(batch[:, 0], ids.astype(np.float32))
