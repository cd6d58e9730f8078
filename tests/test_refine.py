"""Refined inference codes: projected gradient on the encoder's support."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flashsae
from flashsae.cli import main as cli_main
from flashsae.data import ArraySource, make_synthetic
from flashsae.errors import ConfigError
from flashsae.eval.evaluate import evaluate
from flashsae.refine import check_refinable, refine_codes


def test_two_atoms_reach_the_least_squares_values():
    # atoms e1 and (e1 + e2)/sqrt(2); target 1*e1 + 2*atom2 = (1 + sqrt 2, sqrt 2)
    W = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, 1.0]])
    target = torch.tensor([[1 + math.sqrt(2), math.sqrt(2)]])
    start = torch.tensor([[0.5, 0.5]])
    idx = torch.tensor([[0, 1]])
    errors = []
    for steps in (0, 1, 5, 400):
        v = refine_codes(target, start, idx, W, steps)
        errors.append(float((target - v @ W[:2]).pow(2).sum()))
    assert errors == sorted(errors, reverse=True)
    assert torch.allclose(refine_codes(target, start, idx, W, 400), torch.tensor([[1.0, 2.0]]), atol=1e-4)


def test_values_stay_nonnegative_and_off_latents_stay_off():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) / torch.tensor([[1.0], [1.0], [math.sqrt(2)]])
    target = torch.tensor([[-1.0, 3.0]])
    v = refine_codes(target, torch.tensor([[0.2, 0.0, 1.0]]), torch.tensor([[0, 1, 2]]), W, 200)
    assert v[0, 1] == 0  # the encoder switched it off
    assert v[0, 0] == 0  # the least-squares value would be negative: clamped
    assert v[0, 2] == pytest.approx(3 / math.sqrt(2) - 1 / math.sqrt(2), abs=1e-4)  # projection of the target


def test_refined_codes_lower_the_heldout_fvu_of_a_trained_topk():
    x, _ = make_synthetic(6000, 32, 64, 4, 0.01, 0)
    model, _ = flashsae.train(x[:5000], k=4, d_sae=128, rows=60_000, quiet=True, seed=0, threads=1)
    source = ArraySource(x[5000:], "held-out")
    plain, refined = evaluate(model, source), evaluate(model, source, refine=20)
    assert refined["fvu"] < 0.95 * plain["fvu"]
    assert refined["l0"] <= plain["l0"]


def test_bad_refine_steps_and_models():
    x, _ = make_synthetic(600, 8, 16, 2, 0.01, 0)
    model, _ = flashsae.train(x, k=2, d_sae=16, rows=1200, quiet=True, threads=1)
    with pytest.raises(ConfigError, match=r"^refine must be >= 0 steps, got -1$"):
        check_refinable(model, -1)
    deep, _ = flashsae.train(x, k=2, d_sae=16, rows=1200, quiet=True, threads=1, encoder_hidden=(8,))
    with pytest.raises(ConfigError, match="refine needs a one-layer sparse autoencoder"):
        evaluate(deep, ArraySource(x, "x"), refine=3)


def test_cli_refine_flag(tmp_path, capsys):
    x, _ = make_synthetic(2000, 16, 32, 2, 0.01, 0)
    np.save(tmp_path / "x.npy", x)
    run = str(tmp_path / "run")
    assert cli_main(["train", str(tmp_path / "x.npy"), "--out", run, "--k", "2", "--latents", "64",
                     "--rows", "20000", "--quiet"]) == 0
    assert cli_main(["evaluate", run, str(tmp_path / "x.npy"), "--rows", "all", "--refine", "5", "--json"]) == 0
    assert cli_main(["encode", run, str(tmp_path / "x.npy"), "--out", str(tmp_path / "c.npz"), "--refine", "5",
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["evaluate", run, str(tmp_path / "x.npy"), "--refine", "-2"]) == 2
    assert "flashsae: error: --refine must be >= 0 steps, got -2" in capsys.readouterr().err
