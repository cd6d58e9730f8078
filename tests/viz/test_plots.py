import numpy as np
import pytest
from matplotlib import image as mpimg

from flashsae import build, io
from flashsae.data.builtin import load_digits
from flashsae.viz import plots


def read_png(path):
    """Decode a PNG and check it is a real picture: (height, width, channels), not one flat colour."""
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.02
    return img


def test_training_curves_draws_every_panel(tmp_path):
    history = [{"step": s, "rows_seen": 128 * s, "loss": 10 / s, "fvu_standardized": 1 / s, "l0": 8.0,
                "dead_fraction_window": 0.01 * s, "val_fvu_standardized": 1.1 / s if s % 5 == 0 else "",
                "val_l0": 8.0 if s % 5 == 0 else ""} for s in range(1, 41)]
    plots.training_curves(history, tmp_path / "curves.png")
    img = read_png(tmp_path / "curves.png")
    assert img.shape[1] > img.shape[0] > 300  # 2x2 panels, wider than tall


def test_atom_atlas_lays_atoms_on_a_square_grid(tmp_path):
    atoms = np.random.default_rng(0).normal(size=(100, 64))
    plots.atom_atlas(atoms, (8, 8), tmp_path / "atoms.png")
    h, w, _ = read_png(tmp_path / "atoms.png").shape
    assert 0.8 < h / w < 1.3  # 10 x 10 tiles plus a title


@pytest.mark.parametrize("n, top", [(3, 4), (6, 2)])
def test_reconstructions_has_a_row_per_image_and_a_column_per_latent(tmp_path, n, top):
    model = build("topk", d_in=64, d_sae=32, k=4)
    plots.reconstructions(model, load_digits()[:10], (8, 8), tmp_path / "rec.png", n=n, top=top)
    h, w, _ = read_png(tmp_path / "rec.png").shape
    if n < 2 + top:
        assert w > 1.3 * h   # 3 images x (input, reconstruction, 4 latents)
    else:
        assert h > 1.2 * w   # 6 images x (input, reconstruction, 2 latents)


def test_tradeoff_plots_one_point_per_model(tmp_path):
    rows = [{"name": f"k-{k}", "architecture": "topk", "l0": float(k), "fvu": 0.5 / k, "dead_fraction": 0.0}
            for k in (4, 8, 16)]
    rows.append({"name": "l1-0.1", "architecture": "relu-l1", "l0": 11.0, "fvu": 0.04, "dead_fraction": 0.1})
    plots.tradeoff(rows, tmp_path / "tradeoff.png")
    h, w, _ = read_png(tmp_path / "tradeoff.png").shape
    assert w > 2 * h  # plot and table side by side


def test_image_runs_get_atoms_curves_and_reconstructions(digits_run):
    run_dir, _ = digits_run
    for name in (io.CURVES_FILE, io.ATLAS_FILE, io.RECONSTRUCTIONS_FILE):
        read_png(run_dir / name)


def test_row_count_tick_labels_are_short_and_few():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for top in (1_800, 250_000, 2_000_000, 45_000_000):
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([0, top], [1, 0])
        plots.short_tick_labels(ax.xaxis)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        plt.close(fig)
        assert 2 <= len(labels) <= 7 and max(map(len, labels)) <= 5, (top, labels)
    assert [plots.short_number(x) for x in (0, 500, 50_000, 1_500_000, 2e9)] == ["0", "500", "50k", "1.5M", "2G"]


def test_the_atlas_shows_the_most_used_atoms_first(tmp_path, monkeypatch):
    atoms = np.zeros((6, 4), np.float32)
    atoms[np.arange(6), np.arange(6) % 4] = np.arange(1, 7)  # atom j is recognisable by its peak, j + 1
    drawn = []
    real = plots._rgba
    monkeypatch.setattr(plots, "_rgba", lambda img, *a: drawn.append(float(np.abs(img).max())) or real(img, *a))
    plots.atom_atlas(atoms, (2, 2), tmp_path / "a.png", usage=np.array([0, 5, 0, 9, 1, 0]))
    assert drawn == [4.0, 2.0, 5.0]  # latents 3, 1, 4 by use; the dead ones left out
