"""Built-in data sets that need no download: scikit-learn's digits and a planted sparse dictionary.

Imports only `errors`.
"""
from __future__ import annotations

import functools

import numpy as np

from flashsae.errors import ConfigError

SYNTHETIC_DEFAULTS = {"rows": 200_000, "d": 64, "atoms": 512, "active": 4, "noise": 0.01, "seed": 0}
COEF_RANGE = (0.5, 2.0)


@functools.cache
def load_digits() -> np.ndarray:
    """The 1797 8x8 handwritten digits bundled with scikit-learn, (1797, 64) float32 in [0, 16], read-only."""
    from sklearn.datasets import load_digits as sk_load_digits

    x = np.ascontiguousarray(sk_load_digits().data, dtype=np.float32)
    x.flags.writeable = False
    return x


def synthetic_params(overrides: dict | None) -> dict:
    """SYNTHETIC_DEFAULTS updated with `overrides`, validated.

    Raises:
        ConfigError: an unknown option or an out-of-range value.
    """
    params = dict(SYNTHETIC_DEFAULTS)
    unknown = sorted(set(overrides or {}) - set(params))
    if unknown:
        raise ConfigError(f"unknown synthetic option(s) {', '.join(unknown)}; choose from: {', '.join(params)}")
    params.update(overrides or {})
    for name in ("rows", "d", "atoms", "active"):
        if int(params[name]) != params[name] or params[name] < 1:
            raise ConfigError(f"synthetic {name} must be a positive integer, got {params[name]!r}")
    if params["active"] > params["atoms"]:
        raise ConfigError(f"synthetic active ({params['active']}) must not exceed atoms ({params['atoms']})")
    if not params["noise"] >= 0:
        raise ConfigError(f"synthetic noise must be >= 0, got {params['noise']!r}")
    return params


def make_synthetic(rows: int, d: int, atoms: int, active: int, noise: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that are sparse combinations of a planted dictionary.

    Atoms are N(0, 1) vectors scaled to unit norm. Each row picks `active` distinct atoms
    uniformly at random with coefficients ~ Uniform(0.5, 2.0), and adds noise * N(0, 1).

    Returns:
        x: (rows, d) float32.
        atoms: (atoms, d) float32, unit-norm rows (the ground truth an SAE should recover).
    """
    x, dictionary, _, _ = sample_synthetic(rows, d, atoms, active, noise, seed)
    return x, dictionary


def sample_synthetic(rows: int, d: int, atoms: int, active: int, noise: float, seed: int):
    """Like `make_synthetic`, also returning which atoms each row uses and with what weights.

    Returns:
        (x (rows, d), atoms (atoms, d), indices (rows, active) int64, coefs (rows, active)), float32.
    """
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    dictionary = dictionary.astype(np.float32)
    indices = _distinct_choices(rng, rows, atoms, active)
    coefs = rng.uniform(*COEF_RANGE, size=(rows, active)).astype(np.float32)
    x = noise * rng.standard_normal((rows, d), dtype=np.float32)
    for j in range(active):  # loop over the few active slots, vectorised over rows
        x += coefs[:, j:j + 1] * dictionary[indices[:, j]]
    return x, dictionary, indices, coefs


def _distinct_choices(rng: np.random.Generator, rows: int, n: int, k: int) -> np.ndarray:
    """(rows, k) int64: per row, a uniformly random k-subset of range(n).

    Robert Floyd's sampling algorithm, vectorised over rows: for t = n-k .. n-1 draw
    j ~ U{0..t}; keep j unless already chosen, then keep t instead.
    """
    out = np.empty((rows, k), dtype=np.int64)
    for i, t in enumerate(range(n - k, n)):
        j = rng.integers(0, t + 1, size=rows)
        taken = (out[:, :i] == j[:, None]).any(axis=1)
        out[:, i] = np.where(taken, t, j)
    return out
