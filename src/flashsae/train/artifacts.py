"""What a training run writes: the finished model's directory and the CSV log.

`write_run` writes a finished model's directory (config.json itself is `io.run_config`, the one
schema shared with `flashsae import`); `write_log` the CSV log that training rewrites at every
log step. Imports io; viz lazily.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flashsae import io

LOG_COLUMNS = ("step", "rows_seen", "loss", "mse", "fvu_standardized", "l0", "aux_loss", "dead_fraction_window",
               "lr", "val_fvu_standardized", "val_l0", "elapsed_s")
"""train_log.csv's columns. The FVU of a log row is of the standardised rows the model trains on
(metrics.json's `fvu_standardized`), on the training batches since the last row or (`val_`) on the
held-out rows; `dead_fraction_window` counts latents that did not fire in the last
`dead_after_rows` training rows (what AuxK revives), unlike metrics.json's `dead_fraction`
(latents that never fired on the evaluated rows)."""


def write_log(path: Path, history: list[dict]) -> None:
    """train_log.csv from the log rows so far (rewritten whole: a resume drops rows after its checkpoint)."""
    lines = [",".join(LOG_COLUMNS)]
    for row in history:
        lines.append(",".join(_fmt(row.get(c, "")) for c in LOG_COLUMNS))
    with io.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_run(work: Path, out, model, config: dict, metrics: dict, history: list[dict], source,
              sample_ids: np.ndarray | None = None) -> Path:
    """Write a trained model's files into `work` (model, metrics, log, pictures), then move it to `out`."""
    io.save_model(work, model, config)
    io.write_json(work / io.METRICS_FILE, metrics)
    write_log(work / io.LOG_FILE, history)
    from flashsae.viz import plots

    plots.training_curves(history, work / io.CURVES_FILE)
    if source.image_shape is not None:
        plots.atom_atlas(model.atoms().cpu().numpy(), tuple(source.image_shape), work / io.ATLAS_FILE,
                         usage=_usage(model, source, sample_ids))
        if sample_ids is not None and len(sample_ids):
            plots.reconstructions(model, source.take(np.asarray(sample_ids[:6])), tuple(source.image_shape),
                                  work / io.RECONSTRUCTIONS_FILE)
    return io.finalize(work, out)


@torch.no_grad()
def _usage(model, source, row_ids, n_rows: int = 4096) -> np.ndarray:
    """How many of (up to `n_rows` of) `row_ids` each latent fires on."""
    ids = np.asarray(row_ids[:n_rows]) if row_ids is not None else np.arange(min(n_rows, source.n_rows))
    codes = model.encode(torch.from_numpy(source.take(ids)).to(model.W_dec.device))
    return (codes > 0).sum(0).cpu().numpy()


def print_summary(result) -> None:
    """What a finished run prints: one line of held-out FVU (data units), L0, dead share, speed and
    where it was written, then a `note:` line for each thing the user should know."""
    metrics = result.metrics
    parts = [f"FVU {metrics['fvu']:.4f} (standardised {metrics['fvu_standardized']:.4f})", f"L0 {metrics['l0']:.2f}",
             f"dead {100 * metrics['dead_fraction']:.1f}% (never fired on these rows)"]
    if "recovery" in metrics:
        parts.append(f"recovery {metrics['recovery']:.3f}")
    parts.append(f"{metrics['rows_per_s']:,.0f} rows/s")
    run_dir = result.run_dir
    print(f"{metrics['evaluated_on']}: " + ", ".join(parts) + (f" -> {run_dir}" if run_dir else ""))
    for note in result.notes:
        print(f"note: {note}")
