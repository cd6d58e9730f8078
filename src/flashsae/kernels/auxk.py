"""The latents an AuxK selection may pick, and that selection (Gao et al., 2024, App. B.1).

AuxK reconstructs the residual from the top-k_aux pre-activations among the dead latents. Masking
the live ones to -inf and running top-k over every latent costs a full selection per row, and when
fewer latents are dead than k_aux the surplus slots are -inf ties that all land on the same few
latents. Here the selection looks only at `candidates`, a short list of latent ids the trainer
knows to hold every dead latent (it counts them at its periodic refresh, the one host read it
makes anyway), and k_aux is capped at that count.

With many latents dead, k_aux slots per row are several times the top-k's k and AuxK becomes most
of the step's sparse work. `DeadLatents.rows` then limits AuxK to the batch's first rows (a
uniform sample of a shuffled batch): the auxiliary loss is averaged over those rows, an unbiased
estimate of its value over the batch at a fraction of the cost (`rows_within`). Imports torch only.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class DeadLatents(NamedTuple):
    mask: Tensor        # (d_sae,) bool: dead now
    candidates: Tensor  # (n_candidates,) int64 distinct latent ids holding every dead latent, as long as no
    #                     more are dead than when the list was made (one that fired since is skipped by `mask`)
    rows: int | None = None  # AuxK runs on the batch's first `rows` rows; None: on all of them

    @classmethod
    def of(cls, aux_mask: Tensor | DeadLatents) -> DeadLatents:
        """`aux_mask` itself, or a bare (d_sae,) mask with every latent a candidate (no cap on k_aux)."""
        if isinstance(aux_mask, DeadLatents):
            return aux_mask
        return cls(aux_mask, torch.arange(aux_mask.shape[0], device=aux_mask.device))

    def k_aux(self, k_aux: int) -> int:
        """AuxK slots per row: at most one per candidate (the surplus could only pick -inf)."""
        return min(k_aux, self.candidates.shape[0])

    def n_rows(self, batch: int) -> int:
        """Rows of a `batch`-row batch that AuxK runs on: its first ones."""
        return batch if self.rows is None else min(self.rows, batch)


def stalest(rows_since_fired: Tensor, dead_mask: Tensor, n_candidates: int, rows: int | None = None) -> DeadLatents:
    """The `n_candidates` latents that have gone longest without firing: every dead latent as long as
    at most `n_candidates` are dead (the dead ones are exactly the stalest). No host read. `rows`:
    see `DeadLatents.rows`."""
    d_sae = rows_since_fired.shape[0]
    if n_candidates >= d_sae:
        candidates = torch.arange(d_sae, device=rows_since_fired.device)
    else:
        candidates = rows_since_fired.topk(n_candidates, sorted=False).indices
    return DeadLatents(dead_mask, candidates, rows)


def rows_within(batch: int, k: int, k_aux: int, budget: float) -> int | None:
    """The rows AuxK may run on so that its (row, latent) pairs, rows x k_aux, stay within `budget`
    times the top-k's, batch x k; None (every row) when they fit, or when `budget` is 0 (no limit).

    A dead latent then enters the AuxK loss through fewer rows per step, each weighted more (the
    loss is a mean over the rows used), so its expected gradient is unchanged and only noisier.
    """
    if budget <= 0 or k_aux * batch <= budget * k * batch:
        return None
    return max(1, min(batch, math.ceil(budget * k * batch / k_aux)))


GATHER_FRACTION = 32
"""Select among gathered candidate columns when there are at most d_sae / GATHER_FRACTION of them;
otherwise among whole rows with the live latents pushed to -inf. On the 2-core CPU a column gather
cost ~40x more per entry than adding a (d_sae,) row of 0 / -inf in place, and masked_fill_ 3-4x more
than that add (`python -m bench.micro_cpu`): gathering pays only for short lists, where it also
shrinks the selection."""


def select(pre: Tensor, dead: DeadLatents, k_aux: int, topk: Callable[[Tensor, int], tuple[Tensor, Tensor]], *,
           in_place: bool = False) -> tuple[Tensor, Tensor]:
    """The k_aux largest pre-activations of dead latents per row: (values, latent ids), each (rows, k_aux).

    `pre` holds the rows AuxK runs on (the caller slices off the rest, `DeadLatents.n_rows`). `k_aux`
    must not exceed the candidates' count. Values are those of `pre` (not clipped at 0); a slot left
    without a dead latent (more candidates fired since the list was made than k_aux leaves over)
    holds -inf. When k_aux takes every candidate the ids are `candidates` in every row, returned as a
    stride-0 view (see `same_ids`). `topk(scores, k)` is the row-wise selection to use; `in_place`
    lets the function overwrite `pre`. Differentiable in `pre` unless `in_place`.
    """
    rows, d_sae = pre.shape
    candidates = dead.candidates
    # 0 for dead latents, -inf for live ones: added, not masked (see GATHER_FRACTION)
    penalty = torch.zeros(d_sae, dtype=pre.dtype, device=pre.device).masked_fill_(~dead.mask, float("-inf"))
    if k_aux == candidates.shape[0]:  # every candidate is taken: nothing to select, the same ids in every row
        return pre.index_select(1, candidates) + penalty[candidates], candidates.expand(rows, -1)
    if candidates.shape[0] * GATHER_FRACTION > d_sae:
        return topk(pre.add_(penalty) if in_place else pre + penalty, k_aux)
    scores = pre.gather(1, candidates.expand(rows, -1)) + penalty[candidates]
    values, pos = topk(scores, k_aux)
    return values, candidates[pos]


def same_ids(indices: Tensor) -> bool:
    """Whether a (rows, slots) index matrix is `select`'s every-candidate result: one row of ids seen
    by every row (a stride-0 view). Such codes are a dense block over those latents, decoded and
    differentiated by matrix products (`block_grads`, `reference.block_decode`) instead of by pairs."""
    return indices.dim() == 2 and indices.shape[0] > 0 and indices.shape[1] > 0 and indices.stride(0) == 0


def block_grads(g: Tensor, ids: Tensor, x_c: Tensor, W_enc: Tensor, *,
                need_x: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """The encoder gradients of codes holding latents `ids` in every row (`same_ids`), from g, their
    (rows, len(ids)) gradient, zero where ReLU clipped: (dx_c of those rows (rows, d_in), or None unless
    `need_x`; dW_enc of the rows `ids` (len(ids), d_in); db_enc of `ids`), in float32 or wider, each one
    matrix product."""
    acc = torch.promote_types(g.dtype, torch.float32)
    with torch.autocast(g.device.type, enabled=False):
        g = g.to(acc)
        dx = g @ W_enc.index_select(0, ids).to(acc) if need_x else None
        return dx, g.t() @ x_c[:g.shape[0]].to(acc), g.sum(0)
