"""An architecture defined in this file alone works everywhere: train, load, estimator, CLI, export.

The registry is the only list of architectures; nothing else in the package may need an edit for a
new one. The toy is registered for this module only and removed at its end.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.base import clone

import flashsae
from flashsae import interop, models
from flashsae.cli import main
from flashsae.errors import ConfigError
from flashsae.models.base import ModelConfig, SparseAutoencoder

TOY = "toy-shrink"


@dataclass(frozen=True, kw_only=True)
class ShrinkConfig(ModelConfig):
    shrink: float = 0.1
    """Amount taken off every pre-activation before the ReLU (soft thresholding)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shrink < 0:
            raise ConfigError(f"shrink must be >= 0, got {self.shrink}")


class ShrinkSAE(SparseAutoencoder):
    """ReLU codes of pre-activations lowered by a fixed shrink (a toy for the tests)."""

    config_cls = ShrinkConfig

    def activate(self, pre_acts):
        return torch.relu(pre_acts - self.cfg.shrink), pre_acts.new_zeros(())


EARLY = flashsae.SparseAutoencoder(n_components=8)  # made before the toy is registered


@pytest.fixture(scope="module", autouse=True)
def toy():
    assert TOY not in models.names()
    with models.registered(TOY, ShrinkSAE):
        yield ShrinkSAE
    assert TOY not in models.names()


@pytest.fixture(scope="module")
def X():
    from flashsae.data import make_synthetic

    X, _ = make_synthetic(rows=3000, d=16, atoms=24, active=2, noise=0.01, seed=5)
    return X


@pytest.fixture(scope="module")
def run(X, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    model, result = flashsae.train(X, arch=TOY, shrink=0.05, latents=32, rows=30_000, batch_size=128, lr=3e-3,
                                   threads=1, out=out, quiet=True)
    return out, model, result


def test_trains_learns_and_loads(run, X):
    out, model, result = run
    assert result.metrics["fvu"] < 0.15, result.metrics  # the mean alone gives 1; 256 rows of training give 0.93
    loaded = flashsae.load(out)
    assert loaded.architecture == TOY and isinstance(loaded, ShrinkSAE) and loaded.cfg.shrink == 0.05
    assert json.loads((out / "config.json").read_text())["model"]["shrink"] == 0.05
    x = torch.from_numpy(np.asarray(X[:200], dtype=np.float32))
    codes = model.encode(x)
    torch.testing.assert_close(loaded.encode(x), codes)
    torch.testing.assert_close(loaded.decode(codes), model.decode(codes))


def test_bad_option_value_is_the_configs_error(X):
    with pytest.raises(ConfigError, match="shrink must be >= 0, got -1"):
        flashsae.train(X, arch=TOY, shrink=-1, latents=32, rows=256, quiet=True)


def test_estimator_takes_the_toys_option(X):
    est = flashsae.SparseAutoencoder(architecture=TOY, shrink=0.02, n_components=32, epochs=3, random_state=0,
                                     device="cpu")
    assert est.get_params()["shrink"] == 0.02 and clone(est).shrink == 0.02
    assert EARLY.get_params()["shrink"] is None and clone(EARLY).get_params() == EARLY.get_params()
    est.fit(X)
    assert isinstance(est.model_, ShrinkSAE) and est.model_.cfg.shrink == 0.02
    assert est.score(X) > -0.5 * X.var()  # reconstructs better than half the variance
    assert est.set_params(shrink=None, architecture="topk", k=2).fit(X).model_.cfg.k == 2  # unset: not passed


def test_cli_help_lists_the_toys_option_in_its_group(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    group = out.split(f"{TOY} options:\n", 1)[1].split("\n\n", 1)[0]
    assert "--shrink X" in group and "Amount taken off every pre-activation" in group
    assert "(default: 0.1)" in " ".join(group.split())
    assert TOY in out.split("--arch {", 1)[1].split("}", 1)[0]


def test_cli_trains_it_and_refuses_its_option_elsewhere(X, tmp_path, capsys):
    np.save(tmp_path / "x.npy", X)
    fast = ["--latents", "16", "--rows", "1024", "--batch-size", "128", "--threads", "1", "--quiet"]
    assert main(["train", str(tmp_path / "x.npy"), "--arch", TOY, "--shrink", "0.2", "--out", str(tmp_path / "r"),
                 *fast]) == 0
    assert flashsae.load(tmp_path / "r").cfg.shrink == 0.2
    assert main(["train", str(tmp_path / "x.npy"), "--shrink", "0.2", "--out", str(tmp_path / "o"), *fast]) == 2
    assert "option --shrink applies to toy-shrink, not to architecture 'topk'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_refuses_clearly(run, tmp_path, capsys):
    out, _, _ = run
    with pytest.raises(ConfigError, match=f"architecture '{TOY}' has no SAELens equivalent; exportable: batchtopk"):
        interop.export_saelens(out, tmp_path / "sl")
    assert main(["export", str(out), "--out", str(tmp_path / "sl")]) == 2
    assert f"architecture '{TOY}' has no SAELens equivalent" in capsys.readouterr().err
    assert not (tmp_path / "sl").exists()


def test_docs_table_and_names_include_it():
    assert TOY in flashsae.names()
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "gen_cli_docs.py"
    spec = importlib.util.spec_from_file_location("gen_cli_docs", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert f"| `{TOY}` | ReLU codes of pre-activations lowered by a fixed shrink" in gen.models_table()
