"""The host feed: batches written into reused buffers are the rows a plain gather picks, in the same
order; a buffer is refilled only after the consumer has drawn `keep` more batches; in-memory rows
are viewed, not copied; bf16 rows travel as bf16 and are widened where they arrive."""
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flashsae.data import BatchIterator, open_source
from flashsae.data.device import RING, to_device
from flashsae.data.sources import ArraySource


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(size=(1000, 5)).astype(np.float32)


def _sources(x, tmp_path):
    np.save(tmp_path / "rows.npy", x)
    return {"memory": open_source(x), "file": open_source(tmp_path / "rows.npy")}


@pytest.mark.parametrize("keep", [None, 0, 1, 3])
@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("drop_last,shard", [(True, (0, 1)), (False, (0, 1)), (True, (1, 2))])
def test_the_feed_gives_the_rows_a_plain_gather_picks(x, tmp_path, keep, prefetch, drop_last, shard):
    for kind, src in _sources(x, tmp_path).items():
        it = BatchIterator(src, np.arange(1000), 64, seed=5, chunk_rows=300, prefetch=prefetch,
                           drop_last=drop_last, shard=shard, keep=keep)
        got = [b.copy() for b in it.epoch(1)]  # copied on arrival: the buffers are reused
        want = [x[ids] for ids in it.plan(1)]
        assert len(got) == len(want) == (15 if drop_last else 16), kind
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
            assert g.dtype == np.float32 and g.shape == w.shape


def test_a_batch_is_intact_while_keep_more_are_drawn_and_then_its_buffer_is_reused(x):
    keep, prefetch = 2, 2
    it = BatchIterator(open_source(x), np.arange(1000), 50, seed=0, prefetch=prefetch, keep=keep)
    plan = list(it.plan(0))
    held = []
    for i, batch in enumerate(it.epoch(0)):
        time.sleep(0.01)  # let the reader thread run as far ahead as the queue lets it
        held.append(batch)
        for j in range(max(0, i - keep), i + 1):
            np.testing.assert_array_equal(held[j], x[plan[j]])
    ring = keep + prefetch + 2
    assert np.shares_memory(held[0], held[ring]) and not np.shares_memory(held[0], held[ring - 1])
    assert len({id(b) for b in held}) == ring  # 20 batches, 6 buffers: nothing allocated per batch


def test_in_memory_rows_are_viewed_and_file_rows_are_not(x, tmp_path):
    srcs = _sources(x, tmp_path)
    rows = srcs["memory"].stored_rows()
    assert np.shares_memory(rows, x) and not rows.flags.writeable
    assert srcs["file"].stored_rows() is None
    assert open_source(np.memmap(tmp_path / "rows.npy", np.float32, "r", 128, (1000, 5))).stored_rows() is None
    assert open_source(x.astype(np.float64)).stored_rows().dtype == np.float32  # converted once when opened


def _bf16_rows(x, tmp_path):
    bf = torch.from_numpy(x).bfloat16()
    save_file({"activations": bf}, str(tmp_path / "rows.safetensors"))
    (tmp_path / "shards").mkdir()
    for i, part in enumerate(bf.split(400)):
        save_file({"activations": part.contiguous()}, str(tmp_path / "shards" / f"{i:03d}.safetensors"))
    return bf.float().numpy()


@pytest.mark.parametrize("where", ["rows.safetensors", "shards"])
def test_bf16_rows_travel_as_bf16_and_are_widened_on_arrival(x, tmp_path, where):
    widened = _bf16_rows(x, tmp_path)
    src = open_source(tmp_path / where)
    assert src.storage == "bfloat16"
    it = BatchIterator(src, np.arange(1000), 64, seed=2, chunk_rows=300, keep=1, stored=True)
    raw = [b.copy() for b in it.epoch(0)]
    assert all(b.dtype == np.uint16 for b in raw)
    arrived = list(to_device(it.epoch(0), torch.device("cpu")))  # widened into RING reused buffers
    assert len({t.data_ptr() for t in arrived}) == RING
    got = [t.clone() for t in to_device(it.epoch(0), torch.device("cpu"))]  # copied on arrival
    want = [widened[ids] for ids in it.plan(0)]
    for r, g, w in zip(raw, got, want, strict=True):
        assert g.dtype == torch.float32
        np.testing.assert_array_equal(g.numpy(), w)
        np.testing.assert_array_equal((r.astype(np.uint32) << 16).view(np.float32), w)
    floats = [b.copy() for b in BatchIterator(src, np.arange(1000), 64, seed=2, chunk_rows=300).epoch(0)]
    for f, w in zip(floats, want, strict=True):  # without stored=True: float32, as before
        np.testing.assert_array_equal(f, w)


def test_in_memory_bf16_bits_are_gathered_as_they_are(x):
    bits = (torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16))
    src = ArraySource(bits, "bits", bfloat16=True)
    assert np.shares_memory(src.stored_rows(), bits)
    it = BatchIterator(src, np.arange(1000), 100, seed=0, stored=True)
    for batch, ids in zip(it.epoch(0), it.plan(0), strict=True):
        np.testing.assert_array_equal(batch, bits[ids])


def test_row_ids_outside_the_source_are_refused(x):
    with pytest.raises(IndexError, match=r"row ids must lie in \[0, 1000\), got \[0, 1000\]"):
        BatchIterator(open_source(x), np.arange(1001), 10, seed=0)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_a_gather_split_over_threads_gives_the_same_batch(threads, monkeypatch):
    from flashsae.data import batching

    monkeypatch.setattr(batching, "GATHER_SPLIT_BYTES", 1)  # split even these small batches
    rows = np.random.default_rng(3).normal(size=(500, 7)).astype(np.float32)
    ids = np.random.default_rng(4).permutation(500)[:301]
    out = np.full((301, 7), np.nan, np.float32)
    assert batching.take_rows(rows, ids, out, threads) is out
    np.testing.assert_array_equal(out, rows[ids])


def test_the_batches_do_not_depend_on_the_gather_threads_or_the_ring_kept_between_epochs(x, tmp_path, monkeypatch):
    from flashsae.data import batching

    monkeypatch.setattr(batching, "GATHER_SPLIT_BYTES", 1)
    for kind, src in _sources(x, tmp_path).items():
        one = BatchIterator(src, np.arange(1000), 64, seed=7, chunk_rows=300, keep=1, gather_threads=1)
        three = BatchIterator(src, np.arange(1000), 64, seed=7, chunk_rows=300, keep=1, gather_threads=3)
        for epoch in (0, 1, 2):  # the ring and the window buffer are reused from epoch to epoch
            a = [b.copy() for b in one.epoch(epoch)]
            b = [b.copy() for b in three.epoch(epoch)]
            want = [x[ids] for ids in one.plan(epoch)]
            assert len(a) == len(b) == len(want) == 15, kind
            for u, v, w in zip(a, b, want):
                np.testing.assert_array_equal(u, w)
                np.testing.assert_array_equal(v, w)
        assert one._ring is not None  # handed back for the next epoch


def test_an_epoch_starts_in_the_ring_after_the_previous_epochs_last_batch(x):
    it = BatchIterator(open_source(x), np.arange(1000), 100, seed=0, prefetch=0, keep=1)
    first = list(it.epoch(0))  # 10 batches, a ring of 3 buffers
    second = next(iter(it.epoch(1)))
    assert not np.shares_memory(second, first[-1])  # its copy to the device may still be in flight
    assert np.shares_memory(second, first[-3])


@pytest.mark.parametrize("where", ["rows.safetensors", "shards", "f64.npy", "memory"])
def test_take_into_writes_what_take_reads(x, tmp_path, where):
    _bf16_rows(x, tmp_path)
    np.save(tmp_path / "f64.npy", x.astype(np.float64))
    src = open_source(x) if where == "memory" else open_source(tmp_path / where)
    rng = np.random.default_rng(0)
    for ids in (np.arange(250, 650), np.sort(rng.choice(1000, 300, replace=False)), rng.permutation(1000)[:77],
                np.zeros(0, np.int64)):
        for stored in (False, True):
            want = src.take_stored(ids) if stored else src.take(ids)
            out = np.empty_like(want)
            assert src.take_into(ids, out, stored=stored) is out
            np.testing.assert_array_equal(out, want)


def test_a_forked_child_gathers_on_threads_of_its_own(monkeypatch):
    import os

    from flashsae.data import batching

    monkeypatch.setattr(batching, "GATHER_SPLIT_BYTES", 1)
    rows = np.arange(60, dtype=np.float32).reshape(20, 3)
    ids = np.arange(20)[::-1].copy()
    batching.take_rows(rows, ids, np.empty((20, 3), np.float32), 2)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool threads did not survive the fork
        out = batching.take_rows(rows, ids, np.empty((20, 3), np.float32), 2)
        os._exit(0 if np.array_equal(out, rows[ids]) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
