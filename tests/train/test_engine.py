"""The engine: named streams, resume checks, the estimator on the same run, signals during a sweep."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import flashsae
from flashsae import ConfigError, io
from flashsae.data.batching import RowBatches
from flashsae.data.sources import ArraySource
from flashsae.models import registry
from flashsae.models.topk import TopKSAE
from flashsae.train.spec import RunSpec

QUICK = {"rows": 3200, "batch_size": 64, "device": "cpu", "seed": 0}


class _MapTopK(TopKSAE):
    """A TopK dictionary that reads stream x and reconstructs stream y (a transcoder's shape)."""

    targets = ("y",)


@pytest.fixture
def map_arch(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "test-map", _MapTopK)
    monkeypatch.setattr(_MapTopK, "architecture", "test-map")
    return "test-map"


def _planted_pair(n=6000, d=16, atoms=48, active=3, seed=0):
    """x = D_in c and y = D_out c for sparse non-negative codes c: y is a function of x's atoms."""
    rng = np.random.default_rng(seed)
    d_in = rng.normal(size=(atoms, d))
    d_out = rng.normal(size=(atoms, d))
    d_in /= np.linalg.norm(d_in, axis=1, keepdims=True)
    d_out /= np.linalg.norm(d_out, axis=1, keepdims=True)
    c = np.zeros((n, atoms))
    for i in range(n):
        c[i, rng.choice(atoms, active, replace=False)] = rng.uniform(0.5, 2.0, active)
    return (c @ d_in).astype(np.float32), (c @ d_out).astype(np.float32), d_out


def test_a_batch_source_serves_named_streams_of_the_same_rows():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    batches = RowBatches({"x": ArraySource(x, "x"), "y": ArraySource(-x, "y")}, np.arange(100), 16, seed=3,
                         chunk_rows=32)
    seen = []
    for batch in batches.epoch(0):
        assert set(batch) == {"x", "y"} and batch["x"].shape == (16, 2)
        np.testing.assert_array_equal(batch["y"], -batch["x"])  # row i of every stream is the same data row
        seen.append(batch["x"][:, 0])
    assert len(seen) == batches.batches_per_epoch() == 6
    assert len(np.unique(np.concatenate(seen))) == 96  # no row twice within an epoch


def test_a_model_trained_on_named_streams_reconstructs_its_target(map_arch, tmp_path):
    x, y, d_out = _planted_pair()
    model, result = flashsae.train({"x": x, "y": y}, arch=map_arch, latents=96, k=3, epochs=30, batch_size=128,
                                   out=tmp_path / "map", quiet=True, seed=0, device="cpu")
    # FVU of y (a model that ignores y scores ~1): a linear TopK encoder of x reaches 0.29 here.
    assert result.metrics["fvu"] < 0.4, result.metrics
    config = io.read_json(tmp_path / "map" / io.CONFIG_FILE)
    assert set(config["data_stats"]["streams"]) == {"x", "y"}
    loaded = flashsae.load(tmp_path / "map")
    assert loaded.target_standardizer is not None
    y_hat = loaded.decode(loaded.encode(torch.from_numpy(x[:500])))
    torch.testing.assert_close(y_hat, model.decode(model.encode(torch.from_numpy(x[:500]))))
    err = ((y_hat.numpy() - y[:500]) ** 2).sum() / ((y[:500] - y[:500].mean(0)) ** 2).sum()
    assert abs(err - result.metrics["fvu"]) < 0.1
    # The decoder learned the output atoms (0.98 of them here); atoms of x are unrelated to them.
    atoms = loaded.atoms().numpy()
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    assert np.mean(np.max(d_out @ atoms.T, axis=1) > 0.9) > 0.9


def test_named_streams_must_have_the_same_rows():
    with pytest.raises(flashsae.DataError, match=r"streams x \(100 rows\), y \(90 rows\) must have the same number"):
        flashsae.train({"x": np.zeros((100, 4), np.float32), "y": np.zeros((90, 4), np.float32)}, quiet=True)
    with pytest.raises(flashsae.DataError, match="named streams must include 'x'"):
        flashsae.train({"y": np.zeros((100, 4), np.float32)}, quiet=True)


def test_resume_refuses_options_that_differ_from_the_saved_run(tmp_path):
    out = tmp_path / "run"
    _, result = flashsae.train("digits", out=out, quiet=True, stop_after_steps=5, k=4, **QUICK)
    assert result.interrupted
    with pytest.raises(ConfigError, match=r"cannot resume with options that differ from the saved run: "
                                          r"lr 0\.01 \(saved None\), k 8 \(saved 4\)"):
        flashsae.train("digits", out=out, resume=True, quiet=True, lr=0.01, k=8)
    # The same options, and those that may change, are accepted; the run finishes.
    _, result = flashsae.train("digits", out=out, resume=True, quiet=True, k=4, threads=1, checkpoint_every=7,
                               **QUICK)
    assert result.steps == 50 and (out / io.MODEL_FILE).is_file()


def test_resume_keeps_the_saved_spec():
    saved = {"architecture": "topk", "model": {"d_in": 64, "d_sae": 32, "k": 4}, "train": {"rows": 640},
             "data": {"data": "digits", "standardize": "global"}}
    spec = RunSpec.for_resume(None, saved, {"threads": 1})
    assert (spec.architecture, spec.train.rows, spec.train.threads, spec.data.standardize) == ("topk", 640, 1, "global")
    assert spec.model_options == {"d_sae": 32, "k": 4}


def test_the_estimator_fit_and_the_cli_train_the_same_weights(tmp_path):
    from flashsae.cli import main
    from flashsae.data import load_digits
    from flashsae.sklearn import SparseAutoencoder

    x = load_digits()
    np.save(tmp_path / "digits.npy", x)
    sae = SparseAutoencoder(n_components=64, k=4, epochs=2, batch_size=64, standardize="column", val_fraction=0.1,
                            random_state=3, device="cpu").fit(x)
    rc = main(["train", str(tmp_path / "digits.npy"), "--out", str(tmp_path / "cli"), "--latents", "64", "--k", "4",
               "--epochs", "2", "--batch-size", "64", "--standardize", "column", "--val-fraction", "0.1",
               "--seed", "3", "--device", "cpu", "--eval-every", "0", "--quiet"])  # the estimator evaluates at the end
    assert rc == 0
    cli = flashsae.load(tmp_path / "cli")
    for name, tensor in sae.model_.state_dict().items():
        assert torch.equal(tensor, cli.state_dict()[name]), name


def test_partial_fit_steps_the_engine_run(monkeypatch):
    from flashsae.sklearn import SparseAutoencoder
    from flashsae.train import loop

    calls = []
    real = loop.run_pass
    monkeypatch.setattr(loop, "run_pass",
                        lambda runs, batches, **kw: calls.append(runs[0]) or real(runs, batches, **kw))
    x = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    sae = SparseAutoencoder(n_components=32, k=2, batch_size=64, random_state=0, device="cpu")
    sae.partial_fit(x[:256]).partial_fit(x[256:])
    assert len(calls) == 2 and calls[0] is calls[1]  # one TrainingRun, extended by each call
    assert sae.result_.steps == 8 and sae.result_.rows_seen == 512
    assert calls[0].trainer.optimizer.param_groups[0]["lr"] == calls[0].trainer.base_lr  # constant rate


def _sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flashsae", "sweep", "digits", "--out", str(out), "--k", "2", "4",
            "--latents", "64", "--rows", "128000", "--batch-size", "64", "--device", "cpu", "--quiet", *extra]


def test_sigint_during_a_sweep_exits_130_with_one_line_and_resume_finishes_every_model(tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_sweep_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list(out.glob("*.partial/train_log.csv")) and time.time() < deadline:  # training has begun
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashsae: training interrupted by SIGINT at step "), err
    assert "continue with --resume" in lines[0]
    partial = sorted(p.name for p in out.glob("*.partial"))
    assert partial == ["k-2.partial", "k-4.partial"]
    assert all((out / p / io.CHECKPOINT_DIR / io.CHECKPOINT_STATE).is_file() for p in partial)
    done = subprocess.run(_sweep_cmd(out, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    for name in ("k-2", "k-4"):
        assert (out / name / io.MODEL_FILE).is_file() and not (out / f"{name}.partial").exists()
        assert io.read_json(out / name / io.METRICS_FILE)["steps"] == 128000 // 64
    assert (out / io.SWEEP_TABLE_FILE).is_file()


def test_a_run_says_when_it_stopped_early(capsys):
    _, result = flashsae.train("digits", k=3, latents=32, lr=1e-7, patience=1, eval_every=2, rows=3200,
                               batch_size=64, seed=0, device="cpu", progress=False)
    assert result.steps < 50 and result.metrics["stopped_early_at_step"] == result.steps
    out = capsys.readouterr().out
    assert f"note: stopped early at step {result.steps} of 50: the held-out FVU did not improve in 1 evaluations" in out


def test_a_run_says_when_its_codes_are_not_sparse(capsys):
    from sklearn.datasets import load_wine

    flashsae.train(load_wine().data, arch="relu-l1", l1=0.001, epochs=30, seed=0, device="cpu", progress=False)
    out = capsys.readouterr().out
    assert "note: the codes are not sparse: L0 " in out and "on 13 columns" in out


def test_a_run_says_when_the_curve_had_not_flattened(capsys):
    _, result = flashsae.train("digits", k=4, latents=64, rows=1280, batch_size=64, seed=0, device="cpu",
                               progress=False)
    assert any("the held-out FVU was still falling at the end" in n for n in result.notes)
    assert "note: the held-out FVU was still falling" in capsys.readouterr().out
    _, result = flashsae.train("digits", k=4, latents=64, epochs=200, batch_size=64, lr=1e-3, seed=0, device="cpu",
                               quiet=True)
    assert not any("still falling" in n for n in result.notes), result.history[-3:]


def test_waiting_openmp_threads_sleep_unless_told_otherwise():
    code = "import flashsae, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip() == "ACTIVE"


def test_rows_on_the_device_give_the_same_batches_and_weights_as_the_host_feed():
    x, y, _ = _planted_pair(n=3000)
    opts = dict(latents=64, k=3, rows=6400, batch_size=64, seed=1, device="cpu", quiet=True, threads=1)
    host, _ = flashsae.train(x, rows_on_device="no", **opts)
    device, _ = flashsae.train(x, rows_on_device="yes", **opts)
    for name, tensor in host.state_dict().items():
        assert torch.equal(tensor, device.state_dict()[name]), name


def test_rows_on_device_is_checked():
    with pytest.raises(ConfigError, match="rows_on_device must be auto, yes or no, got 'maybe'"):
        flashsae.train("digits", rows_on_device="maybe", quiet=True)


def test_the_default_budget_grows_with_the_dictionary():
    from flashsae.train.training_run import default_rows

    assert default_rows(45_000, 3072) == 6_144_000          # 137 epochs: a large dictionary gets its rows
    assert default_rows(262_144, 512) == 20 * 262_144        # 20 epochs
    assert default_rows(50_000, 64) == 2_000_000             # at least 2M rows
    assert default_rows(1_617, 512) == 200 * 1_617           # at most 200 epochs


def test_rows_on_the_device_are_standardised_once_and_batch_like_the_host_feed():
    from flashsae.train.prepare import DataPass

    x = np.random.default_rng(4).normal(3.0, 2.0, size=(700, 6)).astype(np.float32)
    batches = {}
    for setting in ("no", "yes"):
        spec = RunSpec.from_options(x, {"batch_size": 64, "seed": 2, "device": "cpu", "rows_on_device": setting})
        dpass = DataPass.open(x, spec)
        source = dpass.batches()
        batches[setting] = [b["x"].clone() for b in source.epoch(1)]
        if setting == "yes":
            std = dpass.standardizers["x"]
            assert torch.equal(source.rows["x"], std(torch.from_numpy(x)))  # the held rows, standardised
    assert len(batches["yes"]) == len(batches["no"]) == len(dpass.train_ids) // 64
    for host, device in zip(batches["no"], batches["yes"]):
        assert torch.equal(host, device)
    assert abs(float(torch.cat(batches["yes"]).mean())) < 0.1
