"""Static plots written as PNG files (atomically). matplotlib is imported inside each function."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def training_curves(history: list[dict], path: Path) -> None:
    """Loss, FVU, L0 and dead fraction against rows seen (2x2 panels)."""
    plt = _pyplot()
    rows = np.array([h["rows_seen"] for h in history], dtype=float)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    panels = [("loss", "training loss", True), ("fvu", "FVU", True), ("l0", "L0 (active latents per row)", False),
              ("dead_fraction", "dead fraction", False)]
    for ax, (key, title, log) in zip(axes.flat, panels):
        ys = np.array([h.get(key, np.nan) for h in history], dtype=float)
        ax.plot(rows, ys, label="train")
        if key in ("fvu", "l0"):
            val = [(r, h.get(f"val_{key}")) for r, h in zip(rows, history) if h.get(f"val_{key}") not in ("", None)]
            if val:
                vr, vy = zip(*val)
                ax.plot(vr, vy, "o-", ms=3, label="held-out")
                ax.legend(fontsize=8)
        if log and len(ys) and np.nanmin(ys) > 0:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rows seen", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def atom_atlas(atoms: np.ndarray, image_shape: tuple[int, int], path: Path, max_atoms: int = 256) -> None:
    """Grid of decoder atoms shown as images (each scaled symmetrically around zero)."""
    plt = _pyplot()
    atoms = np.asarray(atoms)[:max_atoms]
    n = len(atoms)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6 + 0.5, rows * 0.6 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, atom in zip(axes.flat, atoms):
        lim = float(np.abs(atom).max()) or 1.0
        ax.imshow(atom.reshape(image_shape), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.suptitle(f"decoder atoms (first {n})", fontsize=9)
    _save(fig, path)
    plt.close(fig)
