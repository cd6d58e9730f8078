"""Learning tests: thresholds that a model which learns nothing (or a broken trainer) fails."""
import pytest

import flashsae
from flashsae import models

# Per architecture: options and the held-out FVU it must beat on the small planted dictionary
# (predicting the mean gives FVU 1; an untrained model gives > 1).
ARCH_CASES = {
    "topk": (dict(k=3), 0.25),
    "batchtopk": (dict(k=3), 0.3),
    "relu-l1": (dict(l1=0.05), 0.2),
    "kl": (dict(beta=0.5), 0.3),
    "contractive": (dict(contractive=0.05), 0.2),
    "jumprelu": (dict(l0=0.05), 0.2),
}
FAST = dict(latents=128, rows=60_000, batch_size=256, lr=3e-3, quiet=True)


def test_every_architecture_has_a_case():
    assert set(ARCH_CASES) == set(models.names())


@pytest.mark.parametrize("arch", sorted(ARCH_CASES))
def test_architecture_learns_planted_dictionary(arch, small_synthetic):
    X, _ = small_synthetic
    opts, threshold = ARCH_CASES[arch]
    _, result = flashsae.train(X, arch=arch, **FAST, **opts)
    assert result.metrics["fvu"] < threshold, result.metrics
    assert result.metrics["evaluated_on"] == "held-out"


@pytest.mark.parametrize("arch", ["topk", "relu-l1"])
def test_deep_variant_learns(arch, small_synthetic):
    X, _ = small_synthetic
    opts, threshold = ARCH_CASES[arch]
    _, result = flashsae.train(X, arch=arch, encoder_hidden=(64,), decoder_hidden=(64,), **FAST, **opts)
    assert result.metrics["fvu"] < threshold + 0.1, result.metrics


def test_plain_autoencoder_when_lambda_is_zero(small_synthetic):
    """l1 = 0 is an ordinary (overcomplete) autoencoder: near-perfect reconstruction, dense codes."""
    X, _ = small_synthetic
    _, result = flashsae.train(X, arch="relu-l1", l1=0.0, **FAST)
    assert result.metrics["fvu"] < 0.02
    assert result.metrics["l0"] > 20


@pytest.mark.parametrize("arch,coef", [("relu-l1", "l1"), ("kl", "beta")])
def test_larger_penalty_gives_lower_l0(arch, coef, small_synthetic):
    X, _ = small_synthetic
    values = {"relu-l1": (0.01, 0.1, 1.0), "kl": (0.05, 0.5, 5.0)}[arch]
    l0s = []
    for v in values:
        _, result = flashsae.train(X, arch=arch, **{coef: v}, **FAST)
        l0s.append(result.metrics["l0"])
    assert l0s[0] > l0s[1] > l0s[2], l0s


def test_topk_recovers_planted_dictionary():
    """d=64, 512 planted atoms, 4 active per row: a 1024-latent TopK SAE finds the atoms."""
    _, result = flashsae.train("synthetic", synthetic_rows=200_000, synthetic_d=64, synthetic_atoms=512,
                               synthetic_active=4, arch="topk", latents=1024, k=4, rows=1_200_000,
                               batch_size=512, lr=3e-3, quiet=True)
    m = result.metrics
    assert m["recovery"] >= 0.9, m
    assert m["fvu"] <= 0.1, m


def test_default_digits_run():
    """The README's main job: TopK on the bundled digits, held-out FVU <= 0.3 with L0 <= 10."""
    _, result = flashsae.train(quiet=True)
    m = result.metrics
    assert m["fvu"] <= 0.3 and m["l0"] <= 10, m
    assert m["evaluated_on"] == "held-out" and m["rows"] == 180


def test_seeded_cpu_runs_are_identical(small_synthetic):
    X, _ = small_synthetic
    a, _ = flashsae.train(X[:4000], latents=32, k=3, rows=8192, batch_size=128, quiet=True, seed=5)
    b, _ = flashsae.train(X[:4000], latents=32, k=3, rows=8192, batch_size=128, quiet=True, seed=5)
    c, _ = flashsae.train(X[:4000], latents=32, k=3, rows=8192, batch_size=128, quiet=True, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all((sa[n] == sb[n]).all() for n in sa)
    assert not (sa["W_dec"] == sc["W_dec"]).all()
