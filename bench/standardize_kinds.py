"""Which standardisation suits which kind of data: held-out FVU in data units, per mode and source.

    python -m bench.standardize_kinds

Sources: two tables written as .csv (scikit-learn's breast cancer, 30 columns in many units, and
wine, 13), digits (pixels, one unit) and a planted array (bench.synth powerlaw, one unit). Each is
trained with TopK under every mode and `auto` (what the default picks for that source). Reported:
FVU over all entries in data units (dominated by the columns with the largest variance) and the
mean over columns of each column's own FVU (every column weighted alike, what a table's user
usually wants), both on the run's held-out rows.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

MODES = ("auto", "column", "global", "norm")


def sources(tmp: Path) -> dict[str, tuple[str, dict]]:
    from sklearn.datasets import load_breast_cancer, load_wine

    from bench import synth

    out = {}
    for name, loader in (("breast_cancer.csv", load_breast_cancer), ("wine.csv", load_wine)):
        np.savetxt(tmp / name, loader().data, delimiter=",")
        out[name] = (str(tmp / name), dict(latents=64, k=4, epochs=200))
    out["digits"] = ("digits", dict(latents=512, k=8, epochs=20))
    planted = synth.make("powerlaw", d=64, n_atoms=256, active=4, seed=0)
    x, _ = synth.sample(planted, 60_000, seed=1)
    np.save(tmp / "planted.npy", x.numpy())
    out["planted.npy"] = (str(tmp / "planted.npy"), dict(latents=512, k=4, rows=600_000))
    return out


def held_out_scores(model, path: str) -> tuple[float, float]:
    from flashsae.data import open_source, split_rows

    source = open_source(path)
    x = torch.from_numpy(np.asarray(source.take(np.arange(source.n_rows)), dtype=np.float32))
    _, val = split_rows(len(x), np.zeros(0, np.int64), val_fraction=0.1, seed=0)
    x = x[val].double()
    x_hat = model.reconstruct(x.float()).double()
    err = (x - x_hat).pow(2).sum(0)
    var = (x - x.mean(0)).pow(2).sum(0)
    live = var > 0
    return (err.sum() / var.sum()).item(), (err[live] / var[live]).mean().item()


def main(argv: list[str] | None = None) -> int:
    import flashsae

    p = argparse.ArgumentParser(prog="python -m bench.standardize_kinds", description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    torch.set_num_threads(1)
    print("| source | mode | ran as | FVU (data units) | mean per-column FVU |")
    print("|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, options) in sources(Path(tmp)).items():
            for mode in MODES:
                model, _ = flashsae.train(path, standardize=mode, quiet=True, seed=0, threads=1, **options)
                fvu, per_column = held_out_scores(model, path)
                print(f"| {name} | {mode} | {model.standardizer.mode} | {fvu:.4f} | {per_column:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
