"""Run directories: save -> load -> identical codes, resume equality, refusal of damaged artifacts."""
import json
import os

import numpy as np
import pytest
import torch

import flashsae
from flashsae import io
from flashsae.errors import ArtifactError, ConfigError

FAST = dict(latents=32, k=3, rows=4096, batch_size=128, quiet=True, threads=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_synthetic):
    X, _ = small_synthetic
    out = tmp_path_factory.mktemp("runs") / "r"
    flashsae.train(X[:2000], out=out, **FAST)
    return out


def test_run_directory_contents(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.json", "train_log.csv", "curves.png"} <= names
    assert not any(n.endswith(".partial") or ".tmp" in n for n in names)
    assert not run_dir.with_name("r.partial").exists()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["format_version"] == io.FORMAT_VERSION and cfg["architecture"] == "topk"
    assert cfg["model"]["d_sae"] == 32 and cfg["train"]["rows"] == 4096
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["fvu"] < 1.5 and metrics["l0"] <= 3


def test_save_load_encode_identical(run_dir, small_synthetic):
    X, _ = small_synthetic
    m1 = flashsae.load(run_dir)
    m2 = flashsae.load(run_dir)
    x = torch.from_numpy(X[2000:2100])
    c1, c2 = m1.encode(x), m2.encode(x)
    assert torch.equal(c1, c2)
    assert (c1 != 0).sum(-1).max() <= 3
    assert m1.decode(c1).shape == x.shape
    # the standardisation travels with the model: encode takes raw rows
    assert torch.allclose(m1.standardizer.mean, torch.from_numpy(X[:2000].mean(0)), atol=0.2)


def test_model_returned_by_train_matches_saved(tmp_path, small_synthetic):
    X, _ = small_synthetic
    model, result = flashsae.train(X[:2000], out=tmp_path / "a", **FAST)
    loaded = flashsae.load(result.run_dir)
    x = torch.from_numpy(X[:50])
    assert torch.equal(model.encode(x), loaded.encode(x))


def test_resume_equals_uninterrupted_run(tmp_path, small_synthetic):
    X, _ = small_synthetic
    opts = dict(FAST, rows=6400, checkpoint_every=7)
    flashsae.train(X[:3000], out=tmp_path / "full", **opts)
    _, partial = flashsae.train(X[:3000], out=tmp_path / "cut", stop_after_steps=23, **opts)
    assert partial.interrupted and partial.steps == 23
    assert (tmp_path / "cut.partial" / "checkpoint" / "state.json").exists()
    assert not (tmp_path / "cut").exists()
    _, resumed = flashsae.train(X[:3000], out=tmp_path / "cut", resume=True, quiet=True)
    assert resumed.steps == 50 and not resumed.interrupted
    a = io.read_tensors(tmp_path / "full" / "model.safetensors")
    b = io.read_tensors(tmp_path / "cut" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_existing_output_needs_overwrite(run_dir, small_synthetic):
    X, _ = small_synthetic
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        flashsae.train(X[:2000], out=run_dir, **FAST)


def test_resume_without_checkpoint(tmp_path, small_synthetic):
    X, _ = small_synthetic
    with pytest.raises(ConfigError, match="nothing to resume"):
        flashsae.train(X[:2000], out=tmp_path / "none", resume=True, **FAST)


def _copy(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def test_missing_model_file(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"model.safetensors is missing"):
        flashsae.load(d)


def test_corrupt_model_file(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match=r"model.safetensors is corrupt"):
        flashsae.load(d)


def test_corrupt_config(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"config.json is corrupt"):
        flashsae.load(d)


def test_unknown_format_version(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["format_version"] = 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="format_version 99; this flashsae reads version 1"):
        flashsae.load(d)


def test_weights_that_do_not_match_config(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["d_sae"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="W_dec has shape"):
        flashsae.load(d)


def test_missing_run_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        flashsae.load(tmp_path / "nope")


def test_encode_rejects_wrong_width(run_dir):
    from flashsae.errors import DataError

    m = flashsae.load(run_dir)
    with pytest.raises(DataError, match=r"model expects \(rows, 32\) columns"):
        m.encode(np.zeros((3, 7), np.float32))


def test_atomic_path_replaces_only_a_complete_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="writer failed"):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old\n" and list(tmp_path.iterdir()) == [target]  # no temporary file left
    with io.atomic_path(target, suffix=".npy") as tmp:
        assert tmp.name.startswith(".table.csv.tmp-") and tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(target), np.arange(3))


def test_files_get_the_usual_permissions(tmp_path):
    model = flashsae.build("topk", d_in=4, d_sae=8, k=2)
    io.save_model(tmp_path, model, {"architecture": "topk"})
    mask = os.umask(0)
    os.umask(mask)
    for name in (io.MODEL_FILE, io.CONFIG_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
