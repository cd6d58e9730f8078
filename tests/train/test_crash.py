"""Crash safety: SIGKILL at random moments, SIGTERM, a full disk and changed data on resume.

A run killed at any moment and resumed (or restarted, when it died before its first checkpoint)
must end with exactly the weights of an uninterrupted run (CPU, one thread).
"""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashsae import ArtifactError, DataError, io, train
from flashsae.train import checkpoint

ARGS = ["synthetic", "--synthetic-rows", "4000", "--synthetic-d", "16", "--synthetic-atoms", "32",
        "--latents", "64", "--k", "4", "--batch-size", "32", "--rows", "9600", "--threads", "1",
        "--log-every", "5", "--checkpoint-every", "5", "--dead-after-rows", "320", "--quiet"]


def _start(out: Path) -> subprocess.Popen:
    resume = (io.partial_dir(out) / io.CHECKPOINT_DIR / io.CHECKPOINT_STATE).is_file()
    cmd = [sys.executable, "-m", "flashsae", "train", *ARGS, "--out", str(out)] + (["--resume"] if resume else [])
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its weights, its start-up time (until the log appears) and its training time."""
    out = tmp_path_factory.mktemp("ref") / "run"
    since = time.monotonic()
    p = _start(out)
    log = io.partial_dir(out) / io.LOG_FILE
    while p.poll() is None and not log.exists():
        time.sleep(0.005)
    startup = time.monotonic() - since
    _finish(p)
    return load_file(out / io.MODEL_FILE), startup, io.read_json(out / io.METRICS_FILE)["train_seconds"]


def _assert_same_weights(out: Path, ref: dict) -> None:
    got = load_file(out / io.MODEL_FILE)
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def _assert_consistent(out: Path) -> None:
    """Never half-written: a complete run directory, or a partial one whose checkpoint loads."""
    if out.exists():
        for name in (io.MODEL_FILE, io.CONFIG_FILE, io.METRICS_FILE):
            assert (out / name).is_file(), name
    ckpt = io.partial_dir(out) / io.CHECKPOINT_DIR
    if (ckpt / io.CHECKPOINT_STATE).is_file():
        state = io.read_json(ckpt / io.CHECKPOINT_STATE)
        tensors = io.read_tensors(ckpt / state["tensors"])
        assert "model.W_dec" in tensors and "trainer.rows_since_fired" in tensors


def _checkpoint_step(out: Path):
    path = io.partial_dir(out) / io.CHECKPOINT_DIR / io.CHECKPOINT_STATE
    return io.read_json(path)["step"] if path.is_file() else None


def _wait_for_training(p: subprocess.Popen, out: Path, since: float) -> None:
    """Until the process rewrites its log (it is stepping) or exits."""
    log = io.partial_dir(out) / io.LOG_FILE
    while p.poll() is None and not (log.exists() and log.stat().st_mtime > since):
        time.sleep(0.01)


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path, reference):
    """Kill 1 lands during start-up (no checkpoint yet: restart), kills 2 and 3 during training."""
    ref, startup, train_seconds = reference
    rng = random.Random(20261125)
    out = tmp_path / "run"
    kills = []  # checkpoint step left behind by each kill (None: before the first one)
    for attempt in range(3):
        since = time.time()
        p = _start(out)
        if attempt == 0:
            delay = rng.uniform(0.1, 0.8) * startup  # a fraction of start-up, however fast start-up is
        else:
            _wait_for_training(p, out, since)
            delay = rng.uniform(0.0, 0.8) * train_seconds
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
            kills.append(_checkpoint_step(out))
        p.communicate()
        _assert_consistent(out)
        if out.exists():
            break
    if not out.exists():
        _finish(_start(out))
    print("checkpoint steps left by the kills:", kills)
    assert len(kills) == 3 and kills[0] is None
    assert not io.partial_dir(out).exists() and not (out / io.CHECKPOINT_DIR).exists()
    _assert_same_weights(out, ref)


def test_sigterm_writes_a_checkpoint_and_resume_finishes_identically(tmp_path, reference):
    out = tmp_path / "run"
    p = _start(out)
    log = io.partial_dir(out) / io.LOG_FILE
    deadline = time.monotonic() + 120
    while not log.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "training interrupted by SIGTERM at step" in err and "--resume" in err
    assert "Traceback" not in err
    assert (io.partial_dir(out) / io.CHECKPOINT_DIR / io.CHECKPOINT_STATE).is_file()
    _finish(_start(out))
    _assert_same_weights(out, reference[0])


SMALL = dict(synthetic_rows=2000, synthetic_d=8, synthetic_atoms=16, d_sae=32, k=2, batch_size=32, rows=3200,
             threads=1, log_every=5, checkpoint_every=5, quiet=True)


@pytest.mark.parametrize("target", ["tensors", "json"])
def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target):
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    _, result = train("synthetic", out=out, stop_after_steps=10, **SMALL)
    assert result.interrupted
    ckpt = io.partial_dir(out) / io.CHECKPOINT_DIR
    before = io.read_json(ckpt / io.CHECKPOINT_STATE)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "tensors":
        monkeypatch.setattr(io, "save_file", full)
    else:
        real = Path.write_text
        monkeypatch.setattr(Path, "write_text",
                            lambda self, *a, **k: full() if self.parent == ckpt else real(self, *a, **k))
    with pytest.raises(ArtifactError, match=r"no space left on device while writing .*checkpoint"):
        train(out=out, resume=True, quiet=True)
    monkeypatch.undo()
    torch.set_num_threads(threads)
    assert io.read_json(ckpt / io.CHECKPOINT_STATE) == before
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == []
    _, result = train(out=out, resume=True, quiet=True)
    assert not result.interrupted and result.steps == 3200 // 32


def test_resume_refuses_different_data(tmp_path):
    x = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    out = tmp_path / "run"
    opts = dict(d_sae=16, k=2, batch_size=32, rows=3200, threads=1, log_every=5, quiet=True)
    train(path, out=out, stop_after_steps=5, **opts)
    np.save(path, x[::-1].copy())  # same shape, other rows
    with pytest.raises(DataError, match="same shape .* but different rows"):
        train(path, out=out, resume=True, quiet=True)
    np.save(path, x[:500])
    with pytest.raises(DataError, match="has 500 rows x 8 columns but the checkpoint .* 600 rows x 8 columns"):
        train(path, out=out, resume=True, quiet=True)
    np.save(path, x)
    _, result = train(path, out=out, resume=True, quiet=True)
    assert not result.interrupted and result.steps == 3200 // 32


def test_checkpoint_tensor_name_cannot_leave_the_directory(tmp_path):
    ckpt = tmp_path / io.CHECKPOINT_DIR
    ckpt.mkdir()
    io.write_json(ckpt / io.CHECKPOINT_STATE, {"step": 1, "tensors": "../../secret.safetensors"})
    with pytest.raises(ArtifactError, match="bad tensor file name"):
        checkpoint.load(tmp_path, None, None)
