import threading
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")

import flashsae  # noqa: E402
from flashsae.data.sources import ArraySource  # noqa: E402
from flashsae.errors import ConfigError  # noqa: E402
from flashsae.lm.stream import ActivationStream, StreamBatches, StreamConfig, _Feed  # noqa: E402


def producer_threads():
    return [t for t in threading.enumerate() if t.name == "flashsae-activations" and t.is_alive()]


def test_train_on_the_fly(tmp_path, tiny_gpt2, corpus):
    model, result = flashsae.train(model=str(tiny_gpt2), hook="transformer.h.1", text=str(corpus), rows=12_000,
                                   context=64, stat_rows=2048, shuffle_rows=1024, batch_size=256, latents=128,
                                   k=8, out=tmp_path / "run", quiet=True)
    assert not producer_threads()
    assert result.rows_seen == 12_000 - 12_000 % 256
    assert result.metrics["fvu"] < 0.8 and result.metrics["evaluated_on"] == "held-out"
    cfg = flashsae.load(tmp_path / "run").run_config
    assert cfg["data"]["data"] == f"{tiny_gpt2}:transformer.h.1"
    assert cfg["data_stats"]["n_rows"] == 2048  # the first buffer
    assert cfg["data_stats"]["activations"]["hook"] == "transformer.h.1"
    assert cfg["data_stats"]["activations"]["stat_rows"] == 2048


def test_stream_batches_shuffle_first_buffer_then_fresh_rows():
    """Rows carry their own id; a stand-in stream feeds ids 1000, 1001, ... after the first buffer 0..499."""
    first = np.repeat(np.arange(500, dtype=np.float32)[:, None], 4, axis=1)
    fresh = (np.repeat(np.arange(1000 + 37 * i, 1000 + 37 * (i + 1), dtype=np.float32)[:, None], 4, axis=1)
             for i in range(1000))
    closed = []
    stream = SimpleNamespace(cfg=SimpleNamespace(shuffle_rows=200), source=ArraySource(first, "first"),
                             feed=_Feed(fresh), close=lambda: closed.append(True))
    batches = StreamBatches(stream, np.arange(100, 500), 50, seed=0)
    it = batches.epoch(0)
    ids = np.concatenate([next(it)[:, 0] for _ in range(20)]).astype(int)  # 1000 rows
    it.close()
    assert closed and batches.batches_per_epoch() > 10**9
    assert len(set(ids)) == 1000  # no row twice
    assert not set(ids) & set(range(100))  # held-out rows never train
    assert len(set(ids) & set(range(100, 500))) > 350 and ids.max() >= 1000  # first buffer, then fresh rows
    assert not np.all(np.diff(ids[:200]) > 0)  # shuffled


def test_stream_stops_its_thread(tiny_gpt2, corpus):
    stream = ActivationStream(StreamConfig(model=str(tiny_gpt2), hook="transformer.h.0", text=str(corpus),
                                           context=32, stat_rows=300, shuffle_rows=200))
    assert stream.source.n_rows == 300 and producer_threads()
    it = stream.batches(np.arange(300), 50, seed=0).epoch(0)
    assert next(it).shape == (50, 64)
    it.close()
    assert not producer_threads()


def test_on_the_fly_errors(tmp_path, tiny_gpt2, corpus):
    with pytest.raises(ConfigError, match="either DATA or --model"):
        flashsae.train("digits", model=str(tiny_gpt2), hook="transformer.h.0", text=str(corpus))
    with pytest.raises(ConfigError, match="missing --hook"):
        flashsae.train(model=str(tiny_gpt2), text=str(corpus))
    with pytest.raises(ConfigError, match="no module named"):
        flashsae.train(model=str(tiny_gpt2), hook="nope", text=str(corpus), quiet=True)
