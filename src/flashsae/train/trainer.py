"""One optimizer step, with no host synchronisation, and the state a checkpoint needs."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from flashsae.config import TrainConfig
from flashsae.distributed import LOCAL, Comm
from flashsae.errors import ConfigError
from flashsae.kernels import auxk
from flashsae.models.base import SparseAutoencoder, SparseCodes
from flashsae.train import optim
from flashsae.train.optim import default_lr, k_at, lr_factor, make_optimizer, resolve_dtype, sparsity_factor


class StepMetrics(NamedTuple):
    loss: Tensor      # total loss, scalar
    mse: Tensor       # mean over rows of ||x - x_hat||^2 (standardised units)
    var: Tensor       # mean over rows of ||x - mean(x)||^2 of the batch (for FVU)
    l0: Tensor        # mean active latents per row
    aux: Tensor       # AuxK loss (0 when off)


class Trainer:
    """Owns the model's optimizer, schedules and dead-latent counters.

    `step(batch)` takes a standardised batch already on the device and returns device tensors; reading
    them (and deciding whether AuxK is needed) is left to the caller every `log_every` steps.

    AuxK (Gao et al., 2024, App. B.1) runs while latents are dead. `refresh_aux`, the caller's periodic
    host read, counts them; until the next refresh each step selects among that many of the stalest
    latents (all the dead ones, unless more have died since) with at most one AuxK slot each.

    Data parallel: `x` is this rank's share of the global batch and `comm` averages the gradients
    (before the decoder-gradient projection), ORs the dead-latent firing masks and averages
    trained buffers, so every rank takes the same step as one process on the whole batch. With
    the default `LOCAL` comm these calls are no-ops.
    """

    def __init__(self, model: SparseAutoencoder, cfg: TrainConfig, *, total_steps: int, dead_after_rows: int,
                 comm: Comm = LOCAL):
        self.model = model
        self.cfg = cfg
        self.comm = comm
        self._params = [p for p in model.parameters() if p.requires_grad]
        # Buffers the step changes (BatchTopK's threshold); the standardiser is fixed after fitting.
        self._trained_buffers = [b for name, b in model.named_buffers() if not name.startswith("standardizer.")]
        self.total_steps = total_steps
        self.dead_after_rows = dead_after_rows
        device = model.W_dec.device
        # all latents, also when this rank holds a shard
        self.base_lr = default_lr(cfg, model.cfg.d_sae, k_limited=getattr(model, "k_limited", False))
        self.optimizer = make_optimizer(model.parameters(), cfg, self.base_lr, device)
        self.step_idx = 0
        self.rows_since_fired = torch.zeros(model.d_sae, dtype=torch.int64, device=device)
        self.n_dead = 0  # dead latents at the last refresh_aux: the AuxK candidates per step
        self.n_dead_anywhere = 0  # the same over every rank holding latents
        self.auxk_coef = float(getattr(model.cfg, "auxk_coef", 0.0))
        self.dtype = resolve_dtype(cfg, model, device)  # "auto" picks per model and device
        if self.dtype == "bfloat16":
            self._autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        else:
            self._autocast = contextlib.nullcontext
        tf32 = optim.tf32_matmuls(cfg, device)
        self._precision = lambda: optim.matmul_precision(tf32)
        self._resample_at = resample_steps(cfg.resample_dead, total_steps)
        if self._resample_at and (model.is_deep or not model.is_sae or comm.world_size > 1 or comm.tensor.size > 1):
            raise ConfigError("resample_dead needs a one-layer sparse autoencoder trained in one process")
        # k annealing: the architecture's own module (a shard's inner one) gets a config of the step's k
        self._whole = getattr(model, "inner", model)
        self._k_cfgs: dict[int, object] = {}
        if cfg.k_anneal != 1 and not hasattr(self._whole.cfg, "k"):
            raise ConfigError(f"k_anneal applies to models with a k (topk, batchtopk, matryoshka, ...), not to "
                              f"architecture {type(self._whole).architecture!r}")
        self._schedule_free = hasattr(self.optimizer, "begin_step")

    @property
    def use_aux(self) -> bool:
        """Whether the steps until the next `refresh_aux` run AuxK."""
        return self.n_dead > 0

    def dead_mask(self) -> Tensor:
        return self.rows_since_fired >= self.dead_after_rows

    def refresh_aux(self) -> None:
        """Host-side count (one sync) of the dead latents AuxK works on until the next refresh.

        With the latents split over ranks AuxK's selection is merged over them, so while any rank has
        dead latents every rank takes part, with at least one candidate (a live one is never picked).
        """
        n_dead = self.dead_mask().sum() if self.auxk_coef > 0 else self.rows_since_fired.new_zeros(())
        anywhere = int(self.comm.tensor.sum_(n_dead.clone()))
        self.n_dead = max(int(n_dead), min(anywhere, 1))
        self.n_dead_anywhere = anywhere

    def step(self, batch: Mapping[str, Tensor] | Tensor) -> StepMetrics:
        """One update on a standardised batch: {stream: (batch, d)} (or the `x` tensor alone).

        The model reads the streams named by its `inputs` and reconstructs its first `targets` one.
        """
        with self._precision():
            return self._step(batch)

    def _step(self, batch: Mapping[str, Tensor] | Tensor) -> StepMetrics:
        model, opt = self.model, self.optimizer
        if isinstance(batch, Tensor):
            batch = {"x": batch}
        x = batch[model.inputs[0]]
        target = batch[model.targets[0]]
        lr = self.base_lr * lr_factor(self.step_idx, self.total_steps, self.cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        aux_mask = None
        if self.n_dead:
            aux_mask = auxk.stalest(self.rows_since_fired, self.dead_mask(), self.n_dead, self._aux_rows(x.shape[0]))
        if self._schedule_free:
            opt.begin_step()  # the gradient is taken at y; the parameters hold x again after opt.step
        try:
            with self._k_of_step():
                with self._autocast():
                    out = model(x, aux_mask=aux_mask)
                return self._finish_step(x, target, out)
        finally:
            if self._schedule_free:
                opt.end_step()  # no-op after a step; x back if the forward or backward raised

    def _aux_rows(self, batch: int) -> int | None:
        """The rows AuxK runs on this step (None: all), from numbers every rank holds alike."""
        cfg = self._whole.cfg
        budget = getattr(cfg, "auxk_budget", 0.0)
        if not budget:
            return None
        k_aux = min(cfg.effective_k_aux, self.n_dead_anywhere)
        return auxk.rows_within(batch, cfg.k, k_aux, budget)

    def _k_of_step(self):
        """A context in which the model's k is this step's annealed k (a no-op without k_anneal)."""
        if self.cfg.k_anneal == 1:
            return contextlib.nullcontext()
        whole = self._whole
        k = k_at(self.step_idx, self.total_steps, whole.cfg.k, self.cfg, whole.cfg.d_sae)
        if k == whole.cfg.k:
            return contextlib.nullcontext()
        cfg = self._k_cfgs.get(k)
        if cfg is None:
            cfg = self._k_cfgs[k] = dataclasses.replace(whole.cfg, k=k)
        return _swapped_cfg(whole, cfg)

    def _finish_step(self, x: Tensor, target: Tensor, out) -> StepMetrics:
        model, opt = self.model, self.optimizer
        x_hat = out.x_hat.float()
        diff = x_hat - target
        mse = _SumOfSquares.apply(diff) / x.shape[0]  # mean over rows of ||x_hat - target||^2
        loss = mse + sparsity_factor(self.step_idx, self.total_steps, self.cfg) * out.penalty.float()
        for extra in out.extra:
            loss = loss + _SumOfSquares.apply(extra.float() - target) / x.shape[0]
        aux_loss = mse.new_zeros(())
        if out.aux is not None:
            # AuxK: dead latents reconstruct the residual target - x_hat = -diff, normalised by its variance
            # over the global batch (Gao et al., 2024, App. B.1): mean ||r||^2 - ||mean r||^2, from the
            # squared error already summed above, so the only (batch, d_in) passes are the mean and the error.
            # The AuxK rows are the batch's first ones (all, unless the AuxK budget limits them).
            resid_neg = diff.detach()
            resid_mean = self.comm.all_reduce_mean_(resid_neg.mean(0))
            resid_var = (self.comm.all_reduce_mean_(mse.detach().clone()) - resid_mean.dot(resid_mean)).clamp_min(1e-8)
            aux_rows = out.aux.shape[0]
            aux_err = _SumOfSquares.apply(out.aux.float() + resid_neg[:aux_rows]) / aux_rows
            aux_loss = self.auxk_coef * aux_err / resid_var
            loss = loss + aux_loss
        loss.backward()
        self.comm.all_reduce_grads_(self._params)
        model.constrain_decoder_grad()
        if self._schedule_free:
            opt.step(model.constrain_decoder)  # on z, x and y: the weights the model uses stay constrained
        else:
            opt.step()
            model.constrain_decoder()
        opt.zero_grad(set_to_none=True)
        for buf in self._trained_buffers:
            self.comm.all_reduce_mean_(buf)
        self._update_fired(out.codes, x.shape[0])
        if self.step_idx in self._resample_at:
            self._resample(diff.detach())
        self.step_idx += 1
        with torch.no_grad():
            var = (target - target.mean(0)).pow(2).sum(-1).mean()
        return StepMetrics(loss.detach(), mse.detach(), var, _l0(out.codes), aux_loss.detach())

    @torch.no_grad()
    def _resample(self, diff: Tensor) -> None:
        """Point each dead latent at the residual of a batch row drawn with probability proportional to
        its squared error (Bricken et al., 2023): decoder row = that residual's direction, encoder row the
        same at a fifth of the live rows' mean norm, encoder bias 0, Adam moments of those rows cleared."""
        model = self.model
        dead = self.dead_mask().nonzero().squeeze(1)  # one host sync, at a handful of steps per run
        if dead.numel() == 0:
            return
        resid = -diff  # target - x_hat, standardised
        weights = resid.pow(2).sum(-1)
        if not bool(weights.sum() > 0):
            return
        rows = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > weights.numel())
        atoms = resid[rows] / resid[rows].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        live = torch.ones(model.d_sae, dtype=torch.bool, device=dead.device)
        live[dead] = False
        enc_norm = model.W_enc[live].norm(dim=-1).mean() if bool(live.any()) else model.W_enc.new_ones(())
        model.W_dec[dead] = atoms.to(model.W_dec.dtype)
        model.W_enc[dead] = (atoms * 0.2 * enc_norm).to(model.W_enc.dtype)
        model.b_enc[dead] = 0
        for p in (model.W_dec, model.W_enc, model.b_enc):
            if self._schedule_free:  # z and y restart from the new rows
                self.optimizer.reset_rows(p, dead)
                continue
            for moment in self.optimizer.state.get(p, {}).values():
                if moment.ndim and moment.shape[0] == model.d_sae:
                    moment[dead] = 0
        self.rows_since_fired[dead] = 0

    @torch.no_grad()
    def _update_fired(self, codes, n_rows: int) -> None:
        if isinstance(codes, SparseCodes):
            hits = torch.zeros(self.model.d_sae, device=codes.values.device)
            hits.index_add_(0, codes.indices.reshape(-1), (codes.values > 0).reshape(-1).to(hits.dtype))
            fired = hits > 0
        else:
            fired = (codes > 0).any(0)
        fired = self.comm.any_(fired)  # fired anywhere in the global batch
        self.rows_since_fired.add_(n_rows * self.comm.world_size).masked_fill_(fired, 0)

    # ---- checkpoint state ------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        # n_dead too: it changes only at log steps, so a resume between two must not recompute it.
        out = {"trainer.rows_since_fired": self.rows_since_fired, "trainer.n_dead": torch.tensor(self.n_dead),
               "trainer.n_dead_anywhere": torch.tensor(self.n_dead_anywhere)}
        for i, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                out[f"optimizer.{i}.{name}"] = torch.as_tensor(value)
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], step_idx: int) -> None:
        self.rows_since_fired.copy_(tensors["trainer.rows_since_fired"])
        if "trainer.n_dead" in tensors:
            self.n_dead = int(tensors["trainer.n_dead"])
            self.n_dead_anywhere = int(tensors.get("trainer.n_dead_anywhere", self.n_dead))
        elif "trainer.use_aux" in tensors:  # written before AuxK knew its count: count now
            self.n_dead = 0
            if bool(tensors["trainer.use_aux"]):
                self.refresh_aux()
        sd = self.optimizer.state_dict()
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = value
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        self.step_idx = step_idx


@contextlib.contextmanager
def _swapped_cfg(module, cfg):
    """`module.cfg` is `cfg` inside the block (the step's annealed k), the module's own after it."""
    own = module.cfg
    module.cfg = cfg
    try:
        yield
    finally:
        module.cfg = own


def resample_steps(times: int, total_steps: int) -> frozenset[int]:
    """The steps at which dead latents are resampled: `times` evenly spaced over the first half of the
    run, the first after a tenth of it (latents need that long to count as dead)."""
    if times <= 0:
        return frozenset()
    start, stop = total_steps // 10, total_steps // 2
    return frozenset(start + (stop - start) * i // max(1, times - 1) for i in range(times)) if times > 1 \
        else frozenset({start})


class _SumOfSquares(torch.autograd.Function):
    """sum(d * d) in one pass, and 2 d g back: a quarter of the autograd graph of (d ** 2).sum(-1).mean()
    (`python -m bench.micro_cpu`: 0.63 ms against 2.05 ms forward and backward for 4096 x 256 on two cores)."""

    @staticmethod
    def forward(ctx, d: Tensor) -> Tensor:
        ctx.save_for_backward(d)
        flat = d.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (d,) = ctx.saved_tensors
        return d * (2 * g)


@torch.no_grad()
def _l0(codes) -> Tensor:
    if isinstance(codes, SparseCodes):
        return (codes.values > 0).sum(-1).float().mean()
    return (codes != 0).sum(-1).float().mean()
