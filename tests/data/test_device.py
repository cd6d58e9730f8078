"""Batches onto the device: same rows, same order, one batch of look-ahead, readers stopped early."""
import numpy as np
import pytest
import torch

from flashsae.data.device import RING, to_device


def _batches(n: int, rows: int = 5, d: int = 3, last_rows: int | None = None):
    rng = np.random.default_rng(0)
    out = [rng.normal(size=(rows, d)).astype(np.float32) for _ in range(n)]
    if last_rows is not None:
        out.append(rng.normal(size=(last_rows, d)).astype(np.float32))
    return out


@pytest.mark.parametrize("pinned", [False, True])  # True runs the pinned-ring logic with plain buffers
@pytest.mark.parametrize("n", [0, 1, RING, 2 * RING + 1])
def test_every_batch_arrives_in_order(pinned, n):
    source = _batches(n, last_rows=2 if n else None)
    got = list(to_device(iter(source), torch.device("cpu"), pinned=pinned))  # all kept: buffers must not be shared
    assert len(got) == len(source)
    for a, b in zip(got, source):
        assert a.dtype == torch.float32 and torch.equal(a, torch.from_numpy(b))


def test_read_only_batches_are_accepted():
    batch = np.ones((4, 2), np.float32)
    batch.flags.writeable = False
    (x,) = to_device([batch], torch.device("cpu"))
    assert torch.equal(x, torch.ones(4, 2))


@pytest.mark.parametrize("pinned", [False, True])
def test_leaving_early_closes_the_reader(pinned):
    closed = []

    def reader():
        try:
            yield from _batches(10)
        finally:
            closed.append(True)

    feed = to_device(reader(), torch.device("cpu"), pinned=pinned)
    for i, _ in enumerate(feed):
        if i == 1:
            break
    feed.close()
    assert closed == [True]


def test_reader_errors_reach_the_consumer():
    def reader():
        yield np.zeros((2, 2), np.float32)
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        list(to_device(reader(), torch.device("cpu"), pinned=True))
