"""Streaming held-out evaluation of a model on a Source."""
from __future__ import annotations

import numpy as np
import torch

from flashsae.data import iter_chunks
from flashsae.eval.metrics import RunningMetrics, dictionary_recovery
from flashsae.preprocess import small_op_threads


@torch.no_grad()
def evaluate(model, source, row_ids: np.ndarray | None = None, *, targets=None, chunk_rows: int = 8192,
             progress: bool = False, refine: int = 0) -> dict[str, float]:
    """Held-out metrics: mse and fvu (data units), fvu_standardized, l0, dead and dense fractions.

    `targets`: the Source of the stream the model reconstructs, for a model that reads x and writes
    another stream (the same rows as `source`); None compares the reconstruction with x itself.
    On a source with planted ground truth (synthetic) also `recovery`: the mean over planted atoms
    of the best cosine similarity with a learned atom. `refine`: projected gradient steps on the
    values of the latents the encoder chose (`flashsae.refine`) before scoring; 0 scores the encoder's codes.

    The sums are taken in the model's standardised space, per chunk in float32, accumulated in float64
    (`RunningMetrics`); the data-unit mse and fvu follow from them with the standardiser's scale.
    """
    from flashsae.refine import check_refinable, refined_forward

    check_refinable(model, refine)
    was_training = model.training
    model.eval()
    device = model.W_dec.device
    out_std = model.out_standardizer
    stats = RunningMetrics(model.d_out, model.d_sae, device, scale=None if out_std.mode == "none" else out_std.scale)
    chunks = iter_chunks(source, row_ids, chunk_rows=chunk_rows)
    if progress:
        from tqdm.auto import tqdm

        total = len(row_ids) if row_ids is not None else source.n_rows
        chunks = tqdm(chunks, total=-(-total // chunk_rows), desc="evaluate", unit="chunk", leave=False)
    wanted = iter_chunks(targets, row_ids, chunk_rows=chunk_rows) if targets is not None else None
    for chunk in chunks:
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
        y = x if wanted is None else torch.from_numpy(np.ascontiguousarray(next(wanted))).to(device)
        x_std = model.standardizer(x)
        if refine:
            codes, x_hat = refined_forward(model, x_std, refine)
        else:
            out = model(x_std)
            codes, x_hat = out.codes, out.x_hat
        y_std = x_std if wanted is None and out_std is model.standardizer else out_std(y)
        with small_op_threads(y_std):
            stats.update(y_std, x_hat, codes)
    out = stats.result()
    gt = getattr(source, "ground_truth", None)
    if gt is not None and gt.shape[1] == model.d_in:
        out["recovery"] = dictionary_recovery(model.atoms().cpu(), torch.from_numpy(np.asarray(gt)))
    model.train(was_training)
    return out
