"""Planted dictionaries of several kinds, for the quality benchmark (ground truth known).

Every kind draws rows x = sum_i c_i * atom_i + noise from a dictionary of unit atoms; they differ
in which atoms fire together and how strongly:

- uniform:    exactly `active` atoms per row, uniformly chosen, magnitudes U(0.5, 2).
- powerlaw:   `active` distinct atoms per row, drawn with weights proportional to (i + 1)^-0.5
              (the rarest atom about 45x rarer than the most frequent).
- steep:      as powerlaw with weights (i + 1)^-1 (the rarest atom n_atoms times rarer).
- magnitudes: powerlaw firing; each atom has its own typical magnitude (log-normal, sd 0.5) times
              U(0.5, 1.5) per firing.
- correlated: powerlaw marginals (atom i fires with probability p_i, `active` per row on average,
              so the count varies); firing is correlated through a Gaussian copula with a rank-16
              factor structure (pairwise latent correlations up to about 0.5).
- hierarchy:  atoms in families of 8: a parent and 7 children; a child fires only when its parent
              does (with probability 0.3 then; `active` per row on average), so children are
              rarer and co-occur with the parent.
- coherent:   powerlaw firing over atoms that share a low-rank component (mean |cos| between atoms
              about 0.25 instead of 1/sqrt(d)).
- noisy:      powerlaw with 5x the noise.

Imports only torch. Rows are generated in blocks with one seeded generator, so a (kind, seed)
pair always gives the same data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("uniform", "powerlaw", "steep", "magnitudes", "correlated", "hierarchy", "coherent", "noisy")
ZIPF = 0.5
FAMILY = 8
CHILD_GIVEN_PARENT = 0.3
COPULA_RANK = 16


@dataclass
class Planted:
    """A generator's dictionary and the parameters that draw its rows."""

    kind: str
    atoms: Tensor          # (n_atoms, d) unit rows
    p_fire: Tensor         # (n_atoms,) marginal firing probability
    scale: Tensor          # (n_atoms,) typical magnitude of each atom
    noise: float
    active: int
    loadings: Tensor | None = None  # (n_atoms, COPULA_RANK) for "correlated"

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]


def make(kind: str, *, d: int, n_atoms: int, active: int, noise: float = 0.02, seed: int = 0) -> Planted:
    """The dictionary and firing law of one kind (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=gen)
    if kind == "coherent":
        shared = torch.linalg.qr(torch.randn(d, 8, generator=gen))[0].T  # (8, d) orthonormal
        atoms = atoms / math.sqrt(d) + 0.6 * torch.randn(n_atoms, 8, generator=gen) @ shared / math.sqrt(8)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    rank = torch.arange(n_atoms, dtype=torch.float64)
    p = (rank + 1) ** -(1.0 if kind == "steep" else ZIPF)
    p = p[torch.randperm(n_atoms, generator=gen)]  # rare atoms anywhere in the index order
    loadings = None
    if kind == "hierarchy":
        n_fam = n_atoms // FAMILY
        parent_p = (torch.arange(n_fam, dtype=torch.float64) + 1) ** -ZIPF
        per_family = 1 + (FAMILY - 1) * CHILD_GIVEN_PARENT  # expected atoms per firing parent
        parent_p = parent_p * active / (per_family * parent_p.sum())
        p = torch.zeros(n_atoms, dtype=torch.float64)
        p[::FAMILY][:n_fam] = parent_p
        for c in range(1, FAMILY):
            p[c::FAMILY][:n_fam] = parent_p * CHILD_GIVEN_PARENT
    else:
        p = p * active / p.sum()
    if kind == "correlated":
        loadings = torch.randn(n_atoms, COPULA_RANK, generator=gen)
        loadings *= 0.7 / loadings.norm(dim=1, keepdim=True)  # 49% of each latent's variance shared
    scale = torch.ones(n_atoms)
    if kind == "magnitudes":
        scale = torch.exp(0.5 * torch.randn(n_atoms, generator=gen))
    return Planted(kind, atoms, p.clamp(max=1.0).float(), scale, noise * (5 if kind == "noisy" else 1), active,
                   loadings)


def sample(planted: Planted, n_rows: int, *, seed: int, with_codes: bool = False,
           block: int = 16384) -> tuple[Tensor, Tensor | None]:
    """`n_rows` rows (n_rows, d) float32 and, with `with_codes`, the true codes (n_rows, n_atoms)."""
    gen = torch.Generator().manual_seed(seed)
    d = planted.atoms.shape[1]
    X = torch.empty(n_rows, d)
    codes = torch.zeros(n_rows, planted.n_atoms) if with_codes else None
    for start in range(0, n_rows, block):
        n = min(block, n_rows - start)
        noise = planted.noise * torch.randn(n, d, generator=gen)
        if planted.kind in ("correlated", "hierarchy"):  # the count per row varies: dense codes
            c = _bernoulli_codes(planted, n, gen)
            X[start:start + n] = c @ planted.atoms + noise
            if codes is not None:
                codes[start:start + n] = c
            continue
        idx, mag = _fixed_count_codes(planted, n, gen)
        X[start:start + n] = F.embedding_bag(idx, planted.atoms, per_sample_weights=mag, mode="sum") + noise
        if codes is not None:
            codes[start:start + n].scatter_(1, idx, mag)
    return X, codes


def _magnitudes(pl: Planted, shape, gen: torch.Generator) -> Tensor:
    lo, hi = (0.5, 1.5) if pl.kind == "magnitudes" else (0.5, 2.0)
    return torch.empty(shape).uniform_(lo, hi, generator=gen)


def _fixed_count_codes(pl: Planted, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(n, active) distinct atom indices per row, drawn with weights p_fire (uniform for "uniform";
    rows that drew an atom twice are drawn again), and their magnitudes."""
    weights = torch.ones(pl.n_atoms) if pl.kind == "uniform" else pl.p_fire
    cdf = weights.double().cumsum(0)
    cdf = (cdf / cdf[-1]).float()

    def draw(rows: int) -> Tensor:
        u = torch.rand(rows, pl.active, generator=gen)
        return torch.searchsorted(cdf, u).clamp_(max=pl.n_atoms - 1)

    idx = draw(n)
    while True:
        s, _ = idx.sort(dim=1)
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().squeeze(1)
        if dup.numel() == 0:
            break
        idx[dup] = draw(dup.numel())
    return idx, _magnitudes(pl, (n, pl.active), gen) * pl.scale[idx]


def _bernoulli_codes(pl: Planted, n: int, gen: torch.Generator) -> Tensor:
    """(n, n_atoms) coefficients of the kinds whose atoms fire independently of a fixed count."""
    m = pl.n_atoms
    if pl.kind == "correlated":
        z = torch.randn(n, COPULA_RANK, generator=gen) @ pl.loadings.T
        z += torch.randn(n, m, generator=gen) * (1 - pl.loadings.pow(2).sum(1)).sqrt()
        fire = z < torch.distributions.Normal(0.0, 1.0).icdf(pl.p_fire.clamp(1e-9, 1 - 1e-9))
    else:  # hierarchy: children only with their parent
        u = torch.rand(n, m, generator=gen)
        fire = torch.zeros(n, m, dtype=torch.bool)
        parents = u[:, ::FAMILY] < pl.p_fire[::FAMILY]
        fire[:, ::FAMILY] = parents
        for c in range(1, FAMILY):
            fire[:, c::FAMILY] = parents[:, :fire[:, c::FAMILY].shape[1]] & (u[:, c::FAMILY] < CHILD_GIVEN_PARENT)
    return _magnitudes(pl, (n, m), gen) * pl.scale * fire


# ---- scores against the truth ------------------------------------------------------------
@torch.no_grad()
def decoder_atoms(decode_fn, d_sae: int, block: int = 1024) -> Tensor:
    """(d_sae, d) the data-space direction each latent writes: decode(e_j) - decode(0), for any library."""
    zero = decode_fn(torch.zeros(1, d_sae)).float()
    out = []
    for start in range(0, d_sae, block):
        eye = torch.zeros(min(block, d_sae - start), d_sae)
        eye[:, start:start + eye.shape[0]] = torch.eye(eye.shape[0])
        out.append(decode_fn(eye).float() - zero)
    return torch.cat(out)


@torch.no_grad()
def truth_scores(codes: Tensor, decoder: Tensor, true_codes: Tensor, atoms: Tensor) -> dict:
    """How well a dictionary and its held-out codes recover the planted ones.

    Args:
        codes: (n, d_sae) the model's codes of the held-out rows.
        decoder: (d_sae, d) the data-space directions of its latents (`decoder_atoms`).
        true_codes: (n, n_atoms) the planted coefficients of the same rows.
        atoms: (n_atoms, d) the planted unit atoms.

    Returns:
        recovery: mean over true atoms of the best cosine with any latent's direction;
        recovered_09: share of true atoms with such a cosine above 0.9;
        mcc: mean correlation between each true feature's coefficients and those of the latent
            matched to it one to one (Hungarian matching on |correlation|);
        mcc_dictionary: the same matching on the directions instead, mean |cosine| of the matched
            pairs (how SAELens's synthetic toolkit scores a dictionary);
        precision, recall: of the matched latent's firing against the true feature's, averaged
            over the features that fire in the held-out rows.
    """
    from scipy.optimize import linear_sum_assignment

    dec = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = atoms @ dec.T  # (n_atoms, d_sae)
    best = cos.max(dim=1).values
    atom_rows, atom_cols = linear_sum_assignment(cos.abs().double().numpy(), maximize=True)
    corr = _corr(true_codes, codes)  # (n_atoms, d_sae)
    rows, cols = linear_sum_assignment(corr.abs().double().numpy(), maximize=True)
    matched = corr[rows, cols]
    t = true_codes[:, rows] > 0
    f = codes[:, cols] > 0
    both = (t & f).sum(0).float()
    seen = t.sum(0) > 0
    precision = (both / f.sum(0).clamp_min(1)).float()
    recall = (both / t.sum(0).clamp_min(1)).float()
    return {
        "recovery": best.mean().item(),
        "recovered_09": (best > 0.9).float().mean().item(),
        "mcc": matched.abs().mean().item(),
        "mcc_dictionary": cos[atom_rows, atom_cols].abs().mean().item(),
        "precision": precision[seen].mean().item(),
        "recall": recall[seen].mean().item(),
    }


def _corr(a: Tensor, b: Tensor) -> Tensor:
    """(a.shape[1], b.shape[1]) Pearson correlation of the columns of a and b; 0 for constant columns."""
    a = a.float() - a.float().mean(0)
    b = b.float() - b.float().mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    b = b / b.norm(dim=0).clamp_min(1e-12)
    return a.T @ b
