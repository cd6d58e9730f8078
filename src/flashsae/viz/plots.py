"""Static plots written as PNG files (atomically). matplotlib is imported inside each function.

Plots read models and numbers; they never change them. Imports nothing from flashsae at module level.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, *, trim: bool = True) -> None:
    """Write a PNG atomically; trim=False skips the extra layout pass of bbox_inches="tight"."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight" if trim else None)
    tmp.replace(path)


def training_curves(history: list[dict], path: Path) -> None:
    """Loss, FVU (standardised), L0 and the dead fraction of the training window against rows seen (2x2)."""
    plt = _pyplot()
    rows = np.array([h["rows_seen"] for h in history], dtype=float)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    # Fixed margins: tight_layout measured every tick label and took 40% of the drawing time.
    fig.subplots_adjust(left=0.08, right=0.985, bottom=0.08, top=0.95, wspace=0.22, hspace=0.38)
    panels = [("loss", "training loss", True), ("fvu_standardized", "FVU of the standardised rows", True),
              ("l0", "L0 (active latents per row)", False),
              ("dead_fraction_window", "dead fraction (no firing in the last dead_after_rows rows)", False)]
    for ax, (key, title, log) in zip(axes.flat, panels):
        ys = np.array([h.get(key, np.nan) for h in history], dtype=float)
        ax.plot(rows, ys, label="train")
        if key in ("fvu_standardized", "l0"):
            val = [(r, h.get(f"val_{key}")) for r, h in zip(rows, history) if h.get(f"val_{key}") not in ("", None)]
            if val:
                vr, vy = zip(*val)
                ax.plot(vr, vy, "o-", ms=3, label="held-out")
                ax.legend(fontsize=8)
        if log and len(ys) and np.nanmin(ys) > 0:
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rows seen", fontsize=8)
        short_tick_labels(ax.xaxis)
        ax.grid(alpha=0.3)
    _save(fig, path, trim=False)
    plt.close(fig)


def _rgba(img: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """An image mapped through a colormap: (h, w) -> (h, w, 4) floats in [0, 1]."""
    import matplotlib

    if vmax <= vmin:
        vmax = vmin + 1.0
    return matplotlib.colormaps[cmap]((np.asarray(img, dtype=np.float64) - vmin) / (vmax - vmin))


class _Mosaic:
    """Tiles of equal shape laid out on one canvas and drawn with a single imshow.

    One image instead of one matplotlib Axes per tile keeps atlases of hundreds of atoms fast.
    Tile (r, c) has its top-left pixel at `origin(r, c)`; gaps leave room for labels.
    """

    def __init__(self, n_rows: int, n_cols: int, tile_shape: tuple[int, int], *, gap_x: int, gap_y: int,
                 top: int = 0):
        self.h, self.w = tile_shape
        self.gap_x, self.gap_y, self.top = gap_x, gap_y, top
        height = top + n_rows * self.h + (n_rows - 1) * gap_y
        width = n_cols * self.w + (n_cols - 1) * gap_x
        self.canvas = np.ones((max(height, 1), max(width, 1), 4))

    def origin(self, r: int, c: int) -> tuple[int, int]:
        return self.top + r * (self.h + self.gap_y), c * (self.w + self.gap_x)

    def put(self, r: int, c: int, rgba: np.ndarray) -> None:
        y, x = self.origin(r, c)
        self.canvas[y:y + self.h, x:x + self.w] = rgba

    def draw(self, ax) -> None:
        ax.imshow(self.canvas, interpolation="nearest")
        ax.set_axis_off()


def short_tick_labels(axis) -> None:
    """Tick labels like 50k, 1.5M: at most five, so long row counts never run into each other."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(lambda x, pos=None: short_number(x)))


def short_number(x: float) -> str:
    """50000 -> 50k, 1500000 -> 1.5M."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def _plain_log_labels(axis) -> None:
    """Label a log axis 30, 40, 50 rather than 3x10^1 (minor ticks labelled only on short ranges)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):  # LogFormatter picks which ticks get a label; "%g" writes it
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def atom_atlas(atoms: np.ndarray, image_shape: tuple[int, int], path: Path, max_atoms: int = 256,
               usage: np.ndarray | None = None) -> None:
    """Grid of decoder atoms shown as images (each scaled symmetrically around zero: red +, blue -).

    `usage` (one count per latent, e.g. how many rows it fired on): show the most used atoms first,
    so that a dictionary with dead latents shows the atoms that matter, not the first by index.
    """
    plt = _pyplot()
    atoms = np.asarray(atoms)
    if usage is not None:
        order = np.argsort(-np.asarray(usage), kind="stable")
        atoms = atoms[order[(np.asarray(usage)[order] > 0) | (np.arange(len(order)) < 1)]]
    atoms = atoms[:max_atoms]
    n = len(atoms)
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = max(1, int(math.ceil(n / cols)))
    h, w = image_shape
    gap = max(1, round(0.15 * max(h, w)))
    mosaic = _Mosaic(rows, cols, (h, w), gap_x=gap, gap_y=gap)
    for i, atom in enumerate(atoms):
        lim = float(np.abs(atom).max()) or 1.0
        mosaic.put(i // cols, i % cols, _rgba(atom.reshape(h, w), "RdBu_r", -lim, lim))
    scale = 0.55 / max(h, w)  # inches per pixel: each tile about half an inch across
    fig, ax = plt.subplots(figsize=(max(2.5, mosaic.canvas.shape[1] * scale), max(2.0, mosaic.canvas.shape[0] * scale)))
    mosaic.draw(ax)
    which = "most used" if usage is not None else "first"
    ax.set_title(f"decoder atoms ({which} {n})", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def reconstructions(model, x_rows, image_shape: tuple[int, int], path: Path, n: int = 6, top: int = 5) -> None:
    """How the model builds a few images: original, reconstruction, then the latents that contributed most.

    Each row of the figure is one input image. Column 1 is the image, column 2 the model's
    reconstruction (both on the image's own grey scale), then the `top` latents with the largest
    contribution ‖code_j · atom_j‖, each drawn as its atom scaled by its code value (red positive,
    blue negative, one symmetric scale per row). For one-layer models the reconstruction is the
    sum of all such contributions plus a constant offset (b_dec in data units).

    Args:
        model: a trained SparseAutoencoder.
        x_rows: (rows, d_in) raw input rows (the data's own units); the first `n` are drawn.
        image_shape: (height, width) with height * width == d_in.
        path: PNG file to write.
        n: number of images.
        top: latents shown per image.
    """
    import torch

    plt = _pyplot()
    x = np.array(np.asarray(x_rows)[:n], dtype=np.float32)  # a writable copy for torch.from_numpy
    n = len(x)
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(x).to(model.W_dec.device))     # (n, d_sae)
        x_hat = model.decode(codes).cpu().numpy()                            # (n, d_in)
        atoms = model.atoms()                                                # (d_sae, d_in)
        strength = codes.abs() * atoms.norm(dim=-1)                          # (n, d_sae)
        order = strength.argsort(dim=-1, descending=True)[:, :top].cpu().numpy()
        codes = codes.cpu().numpy()
        atoms = atoms.cpu().numpy()
    h, w = image_shape
    cols = 2 + top
    gap_x, gap_y = max(1, round(0.2 * w)), max(2, round(0.45 * h))
    mosaic = _Mosaic(max(n, 1), cols, (h, w), gap_x=gap_x, gap_y=gap_y, top=gap_y)
    labels = []
    for i in range(n):
        lo, hi = float(min(x[i].min(), x_hat[i].min())), float(max(x[i].max(), x_hat[i].max()))
        mosaic.put(i, 0, _rgba(x[i].reshape(h, w), "gray_r", lo, hi))
        mosaic.put(i, 1, _rgba(x_hat[i].reshape(h, w), "gray_r", lo, hi))
        picks = [int(j) for j in order[i] if codes[i, j] != 0]
        parts = [codes[i, j] * atoms[j] for j in picks]
        lim = max((float(np.abs(p).max()) for p in parts), default=0.0) or 1.0
        for c, (j, part) in enumerate(zip(picks, parts)):
            mosaic.put(i, 2 + c, _rgba(part.reshape(h, w), "RdBu_r", -lim, lim))
            labels.append((i, 2 + c, f"#{j} ×{codes[i, j]:.2g}"))
    scale = 0.9 / max(h, w)  # inches per pixel: each tile about 0.9 inch across
    fig, ax = plt.subplots(figsize=(mosaic.canvas.shape[1] * scale, mosaic.canvas.shape[0] * scale))
    mosaic.draw(ax)
    for c, title in enumerate(["input", "reconstruction"] + [f"latent {t + 1}" for t in range(top)]):
        y, x0 = mosaic.origin(0, c)
        ax.text(x0 + w / 2 - 0.5, y - gap_y * 0.55, title, ha="center", va="bottom", fontsize=7, weight="bold")
    for i, c, text in labels:
        y, x0 = mosaic.origin(i, c)
        ax.text(x0 + w / 2 - 0.5, y - 0.7, text, ha="center", va="bottom", fontsize=6)
    ax.set_title("reconstructions: input, reconstruction, top latents (atom × code value)", fontsize=8)
    _save(fig, path)
    plt.close(fig)


def tradeoff(rows: list[dict], path: Path) -> None:
    """Sparsity–fidelity trade-off of a sweep: FVU against L0, one annotated point per model, table beside.

    Args:
        rows: one dict per model with at least `name`, `l0`, `fvu`; `architecture` groups the
            points into lines, `dead_fraction` goes into the table.
        path: PNG file to write.
    """
    plt = _pyplot()
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.28 * len(rows) + 1.5)),
                                  gridspec_kw={"width_ratios": [3, 2]})
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get("architecture", "")), []).append(r)
    for arch, members in groups.items():
        members = sorted(members, key=lambda r: float(r["l0"]))
        ax.plot([float(r["l0"]) for r in members], [float(r["fvu"]) for r in members], "o-", ms=5,
                label=arch or None)
        for r in members:
            ax.annotate(str(r["name"]), (float(r["l0"]), float(r["fvu"])), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    l0s = np.array([float(r["l0"]) for r in rows])
    fvus = np.array([float(r["fvu"]) for r in rows])
    if len(rows) and (l0s > 0).all() and l0s.max() > 2 * l0s.min():
        ax.set_xscale("log")
    if len(rows) and (fvus > 0).all() and fvus.max() > 3 * fvus.min():
        ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    if ax.get_xscale() == "log" and len(set(np.round(l0s, 2))) <= 12:
        ax.set_xticks(sorted(set(np.round(l0s, 2))))  # label the L0 values the models reached
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on log axes, not 4x10^0
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    ax.margins(0.08)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("L0 (active latents per row)")
    ax.set_ylabel("FVU (held-out)")
    ax.set_title("sparsity vs reconstruction", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    tab.axis("off")
    if rows:
        cells = [[str(r["name"]), f"{float(r['l0']):.2f}", f"{float(r['fvu']):.4f}",
                  f"{100 * float(r.get('dead_fraction', 0) or 0):.1f}%"] for r in rows]
        table = tab.table(cellText=cells, colLabels=["model", "L0", "FVU", "dead"], loc="upper center",
                          cellLoc="right", colLoc="right")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1.0, 1.2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
