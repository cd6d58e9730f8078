"""Training options end to end: optimizers, schedules, early stopping, standardisation modes."""
import pytest
import torch

import flashsae
from flashsae.config import TrainConfig
from flashsae.errors import ConfigError
from flashsae.train.optim import lr_factor, sparsity_factor

FAST = dict(latents=64, k=3, rows=20_000, batch_size=128, quiet=True)


def test_lr_schedule_warms_up_holds_and_decays():
    cfg = TrainConfig(lr_warmup=0.1, lr_decay="linear", lr_decay_fraction=0.2)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[50] == 1.0 and f[79] == 1.0
    assert f[90] == pytest.approx(0.5) and f[99] < 0.06
    cos = TrainConfig(lr_warmup=0.0, lr_decay="cosine", lr_decay_fraction=1.0)
    assert lr_factor(50, 100, cos) == pytest.approx(0.5)
    assert lr_factor(60, 100, TrainConfig(lr_decay="none", lr_warmup=0.0)) == 1.0
    assert sparsity_factor(0, 100, TrainConfig(sparsity_warmup=0.5)) == pytest.approx(0.02)
    assert sparsity_factor(60, 100, TrainConfig(sparsity_warmup=0.5)) == 1.0


def test_sgd_learns(small_synthetic):
    X, _ = small_synthetic
    _, result = flashsae.train(X, optimizer="sgd", **FAST)
    assert result.metrics["fvu"] < 0.6


def test_early_stopping_ends_before_the_budget(small_synthetic):
    X, _ = small_synthetic
    _, full = flashsae.train(X, **FAST, lr=1e-7, eval_every=5)
    _, stopped = flashsae.train(X, **FAST, lr=1e-7, eval_every=5, patience=2)
    assert full.steps == 20_000 // 128
    assert stopped.steps < full.steps / 2  # a learning rate this small never improves the held-out FVU


@pytest.mark.parametrize("mode", ["column", "global", "norm", "none"])
def test_standardisation_modes_are_saved_and_applied(mode, small_synthetic, tmp_path):
    import torch

    X, _ = small_synthetic
    model, result = flashsae.train(X * 5 + 3, standardize=mode, out=tmp_path / mode, **FAST)
    loaded = flashsae.load(tmp_path / mode)
    assert loaded.run_config["preprocess"]["mode"] == mode
    x = torch.from_numpy(X[:100] * 5 + 3)
    assert torch.allclose(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))
    assert result.metrics["fvu"] < 0.6


def test_auto_standardisation_is_per_column_for_tables_and_one_scale_otherwise(tmp_path):
    import numpy as np

    from flashsae.config import DataConfig
    from flashsae.train.optim import default_lr

    rng = np.random.default_rng(0)
    X = (rng.standard_normal((400, 6)) * [1, 1, 1, 1, 10, 100]).astype(np.float32)
    np.savetxt(tmp_path / "t.csv", X, delimiter=",")
    np.save(tmp_path / "a.npy", X)
    small = dict(latents=16, k=2, rows=800, quiet=True)
    modes = {}
    for name, data in (("csv", tmp_path / "t.csv"), ("npy", tmp_path / "a.npy"), ("array", X)):
        model, _ = flashsae.train(data, out=tmp_path / name, **small)
        modes[name] = flashsae.load(tmp_path / name).run_config["preprocess"]["mode"]
        assert model.standardizer.mode == modes[name]
    assert modes == {"csv": "column", "npy": "global", "array": "global"}
    assert DataConfig().standardize_for("acts/layer3") == "global"
    assert DataConfig(standardize="norm").standardize_for("t.TSV") == "norm"
    assert DataConfig().standardize_for("T.TSV") == "column"
    assert default_lr(TrainConfig(), 16384) == pytest.approx(8e-4)
    assert default_lr(TrainConfig(), 4096) == pytest.approx(1.6e-3)
    assert default_lr(TrainConfig(), 64) == pytest.approx(1e-2)  # the cap
    assert default_lr(TrainConfig(), 4096, k_limited=False) == pytest.approx(4e-4)  # penalty models


def test_image_shape_gives_an_atom_atlas(small_synthetic, tmp_path):
    X, _ = small_synthetic  # 32 columns as 4 x 8 images
    flashsae.train(X, image_shape=(4, 8), out=tmp_path / "img", **FAST)
    assert (tmp_path / "img" / "atoms.png").stat().st_size > 1000
    with pytest.raises(ConfigError, match="image_shape"):
        flashsae.train(X, image_shape=(5, 5), **FAST)


@pytest.mark.parametrize("bad,match", [(dict(optimizer="lbfgs"), "optimizer must be adam, sgd or signum"),
                                       (dict(lr_decay="step"), "lr_decay must be"),
                                       (dict(standardize="minmax"), "standardize must be one of"),
                                       (dict(val_fraction=1.5), "val_fraction must be in"),
                                       (dict(rows=10, epochs=1), "either rows or epochs"),
                                       (dict(dtype="float16"), "dtype must be auto, float32 or bfloat16"),
                                       (dict(bogus=1), "unknown option 'bogus'")])
def test_bad_options(bad, match, small_synthetic):
    X, _ = small_synthetic
    with pytest.raises(ConfigError, match=match):
        flashsae.train(X, **{**FAST, **bad})


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_dtype_is_bf16_only_for_topk_on_bf16_hardware(monkeypatch, has_bf16):
    from flashsae import models
    from flashsae.kernels import selection
    from flashsae.train import optim

    monkeypatch.setattr(selection, "_cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    topk = models.build("topk", d_in=8, d_sae=32, k=2)
    relu = models.build("relu-l1", d_in=8, d_sae=32)
    assert optim.resolve_dtype(TrainConfig(), topk, cpu) == ("bfloat16" if has_bf16 else "float32")
    assert optim.resolve_dtype(TrainConfig(), models.build("batchtopk", d_in=8, d_sae=32, k=2), cpu) == \
        ("bfloat16" if has_bf16 else "float32")
    assert optim.resolve_dtype(TrainConfig(), relu, cpu) == "float32"  # dense models: measured in fp32 only
    assert optim.resolve_dtype(TrainConfig(dtype="float32"), topk, cpu) == "float32"
    assert optim.resolve_dtype(TrainConfig(dtype="bfloat16"), relu, cpu) == "bfloat16"


def test_the_resolved_dtype_is_recorded(tmp_path):
    from flashsae import io
    from flashsae.kernels.selection import native_bf16
    from flashsae.train.api import train

    _, result = train("digits", out=tmp_path / "run", rows=2048, k=4, quiet=True)
    cfg = io.read_json(result.run_dir / io.CONFIG_FILE)
    assert cfg["train"]["dtype"] == "auto"
    assert cfg["resolved"]["dtype"] == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")


@pytest.mark.parametrize("d_in, n_train, latents", [
    (64, 1617, 128),      # digits: 1,617 rows / 8 -> 128
    (13, 160, 16),        # wine: the power of two up to 20
    (13, 40, 13),         # never below the width
    (384, 45_000, 3072),  # enough rows: 8 x the width
    (64, None, 512),      # rows unknown: 8 x the width
])
def test_default_latents_follow_the_rows(d_in, n_train, latents):
    from flashsae.train.spec import default_latents

    assert default_latents(d_in, n_train) == latents
