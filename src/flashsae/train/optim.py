"""Optimizers and schedules. Schedules are pure functions of the step: nothing mutates a config."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from flashsae.config import TrainConfig
from flashsae.kernels.selection import native_bf16

TOPK_LR_16K = 8e-4
"""Adam's default rate at 16,384 latents for the models that cap the active latents (TopK, BatchTopK
and their kin). Gao et al. (2024) scale 2e-4 by 1/sqrt(latents) for batches of 131k rows; at this
trainer's 4,096 rows per step 4x that learned more per row on planted dictionaries and on digits
(bench/quality.py; BENCHMARKS.md, "training recipe"). Penalty models keep 2e-4: their L0 follows
the rate (at 4x a gated SAE's L0 rose to 1.6x ReLU+L1's at the same penalty, from 1.1x), and no
ablation covered them."""
PENALTY_LR_16K = 2e-4
SIGNUM_LR_16K = 2.5e-3
"""The schedule-free sign-SGD rate at 16,384 latents, scaled by 1/sqrt(latents) as Adam's and capped
at SIGNUM_LR_CAP: half EleutherAI sparsify's 5e-3, which on standardised rows learned less on 5 of 7
planted kinds, at the larger planted shape and on digits (bench.quality, bench.digits_recipe; BENCHMARKS.md,
"schedule-free sign-SGD")."""
SIGNUM_LR_CAP = 2e-2
SIGNUM_MOMENTUM = 0.95
"""Schedule-free interpolation beta: gradients are taken at y = (1 - beta) z + beta x (sparsify's 0.95)."""


def default_lr(cfg: TrainConfig, d_sae: int, *, k_limited: bool = True) -> float:
    """TOPK_LR_16K (PENALTY_LR_16K unless `k_limited`) / sqrt(d_sae / 16384) for Adam, capped at 1e-2
    (4e-3 for penalty models); 10x for SGD; SIGNUM_LR_16K / sqrt(d_sae / 16384), capped at
    SIGNUM_LR_CAP, for schedule-free sign-SGD."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.optimizer == "signum":
        return min(SIGNUM_LR_16K / math.sqrt(d_sae / 16384), SIGNUM_LR_CAP)
    base, cap = (TOPK_LR_16K, 1e-2) if k_limited else (PENALTY_LR_16K, 4e-3)
    lr = min(base / math.sqrt(d_sae / 16384), cap)
    return lr * 10 if cfg.optimizer == "sgd" else lr


def resolve_dtype(cfg: TrainConfig, model, device: torch.device) -> str:
    """The compute precision a run uses: `cfg.dtype`, or for "auto" bfloat16 when the model takes the
    sparse top-k path (measured there: the same held-out FVU to five digits, 1.5x the rows/s on a
    2-core AVX512-BF16 CPU) and the device multiplies bf16 natively; on such a CUDA GPU every other
    architecture gets "tf32" (float32 with TF32 matrix products: an fp32 step without TF32 ran 5.5x
    slower than under bf16 autocast on an H100); float32 otherwise."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if native_bf16(device):
        if getattr(model, "k_limited", False):
            return "bfloat16"
        if device.type == "cuda":
            return "tf32"  # TF32 arrived with bf16, in compute capability 8.0
    return "float32"


def tf32_matmuls(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a run's float32 matrix products use TF32: under dtype "auto" on a CUDA GPU that has it
    (compute capability 8.0+, as for bf16), for every architecture."""
    return cfg.dtype == "auto" and device.type == "cuda" and native_bf16(device)


@contextlib.contextmanager
def matmul_precision(tf32: bool) -> Iterator[None]:
    """With `tf32`, CUDA's float32 matrix products use TF32 inside the block, and the previous setting
    is restored after: the switch is process-wide, so a run holds it only while it steps."""
    if not tf32:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def make_optimizer(params, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "signum":
        return ScheduleFreeSignum(params, lr=lr, beta=SIGNUM_MOMENTUM)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    # The fused kernel is one pass over each tensor (2.5-5x the default foreach path, measured).
    if device.type in ("cpu", "cuda"):
        return FusedAdam(params, lr=lr, betas=(0.9, 0.999))
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def lr_decay_of(cfg: TrainConfig) -> str:
    """The decay a run uses: `cfg.lr_decay`, or for "auto" none under schedule-free sign-SGD (its
    averaged iterate replaces the decay) and linear otherwise."""
    if cfg.lr_decay != "auto":
        return cfg.lr_decay
    return "none" if cfg.optimizer == "signum" else "linear"


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first lr_warmup, decay to 0 over the last lr_decay_fraction."""
    warm = int(cfg.lr_warmup * total_steps)
    if step < warm:
        return (step + 1) / warm
    decay = lr_decay_of(cfg)
    if decay == "none" or cfg.lr_decay_fraction == 0:
        return 1.0
    decay_start = int((1 - cfg.lr_decay_fraction) * total_steps)
    if step < decay_start:
        return 1.0
    t = (step - decay_start) / max(1, total_steps - decay_start)
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return max(0.0, 1.0 - t)


def k_at(step: int, total_steps: int, k: int, cfg: TrainConfig, d_sae: int) -> int:
    """The k of a top-k model at `step` under k annealing: round(k_anneal * k) (at most d_sae) at the
    first step, falling linearly to k at k_anneal_fraction of the run, k from there on."""
    if cfg.k_anneal == 1 or cfg.k_anneal_fraction == 0:
        return k
    start = min(d_sae, max(k, round(cfg.k_anneal * k)))
    stop = cfg.k_anneal_fraction * total_steps
    if step >= stop:
        return k
    return max(k, round(start + (k - start) * step / stop))


def sparsity_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    warm = int(cfg.sparsity_warmup * total_steps)
    return 1.0 if step >= warm else (step + 1) / warm


class _OneGroup:
    """What the optimizers here share: one parameter group, and torch.optim's state_dict layout."""

    params: list[torch.Tensor]
    param_groups: list[dict]
    state: dict

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def _state_dict(self, per_param) -> dict:
        """torch.optim's layout, with each parameter's state as `per_param(state)`."""
        index = {id(p): i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[id(p)]: per_param(s) for p, s in self.state.items()},
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}


class FusedAdam(_OneGroup):
    """Adam (Kingma & Ba, 2015) as one fused kernel call per step: the update, state and state_dict of
    `torch.optim.Adam(fused=True)` (no weight decay, no amsgrad), bit for bit, without torch.optim's
    `Optimizer` base, whose first use imports torch._dynamo (1.3-1.6 s of a small fit's start-up).

    What the trainer uses: `param_groups[0]["lr"]` (set before each step), `step()`,
    `zero_grad(set_to_none=True)`, `state_dict()` and `load_state_dict()` with torch's layout
    ({"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}).
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0,
                              "amsgrad": False, "maximize": False, "fused": True}]
        self.state: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        by_kind: dict = {}  # the kernel takes tensors of one device and dtype per call
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.get(p)
            if state is None:
                state = self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            lists = by_kind.setdefault((p.device, p.dtype), ([], [], [], [], []))
            for out, value in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                out.append(value)
        for params, grads, exp_avgs, exp_avg_sqs, steps in by_kind.values():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                               beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], maximize=False,
                               grad_scale=None, found_inf=None)

    def state_dict(self) -> dict:
        return self._state_dict(dict)

    def load_state_dict(self, state_dict: dict) -> None:
        group = state_dict["param_groups"][0] if state_dict.get("param_groups") else {}
        self.param_groups[0].update({k: v for k, v in group.items() if k in ("lr", "betas", "eps")})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[p] = {"step": torch.as_tensor(s["step"]).to(p.device, torch.float32).clone(),
                             "exp_avg": s["exp_avg"].to(p.device, p.dtype).clone(),
                             "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype).clone()}


class ScheduleFreeSignum(_OneGroup):
    """Sign-SGD made schedule-free (Defazio et al., 2024, "The Road Less Scheduled"), as EleutherAI
    sparsify trains its SAEs, without torch.optim's `Optimizer` base (see `FusedAdam`).

    Three iterates per parameter: the base sequence z_{t+1} = z_t - lr_t sign(g_t); its running
    average x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1} with c_{t+1} = w_{t+1} / sum_{i<=t+1} w_i and
    w_t = (the largest lr so far)^2, so the small steps of a warm-up weigh little; and the point the
    gradient is taken at, y = (1 - beta) z + beta x. No decay is needed: x is the model to use.

    The parameters hold x outside a step (evaluations, checkpoints, the saved model), and y from
    `begin_step()` (before the forward pass) until `step()` returns; the two swap tensors, nothing
    is copied. `step(project)` calls `project()` with the parameters holding z, then x, then y, so a
    constraint on the weights (unit-norm decoder rows) holds for every iterate, the returned x too.

    The same interface as `FusedAdam`; the state holds "z" and "y" (x while a step runs) per
    parameter and "step", "weight_sum", "lr_max" (host floats, written as tensors).
    """

    def __init__(self, params, *, lr: float, beta: float = 0.95):
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr, "beta": beta}]
        self.state: dict = {}
        self.steps = 0
        self.weight_sum = 0.0
        self.lr_max = 0.0
        self._at_y = False

    @torch.no_grad()
    def begin_step(self) -> None:
        """Point the parameters at y, where the coming forward and backward pass take the gradient."""
        if self._at_y:
            return
        for p in self.params:
            state = self.state.get(p)
            if state is None:  # z = x = y at the start
                state = self.state[p] = {"z": p.detach().clone(), "y": p.detach().clone()}
            _swap(p, state, "y")
        self._at_y = True

    @torch.no_grad()
    def end_step(self) -> None:
        """Point the parameters back at x without stepping (a step abandoned after `begin_step`)."""
        if self._at_y:
            for p in self.params:
                _swap(p, self.state[p], "y")
            self._at_y = False

    @torch.no_grad()
    def step(self, project=None) -> None:
        self.begin_step()  # a caller that did not: the gradient was then taken at x, still a valid step
        group = self.param_groups[0]
        lr, beta = group["lr"], group["beta"]
        live = [p for p in self.params if p.grad is not None]
        if live:
            self.steps += 1
            self.lr_max = max(self.lr_max, lr)
            weight = self.lr_max ** 2
            self.weight_sum += weight
            c = weight / self.weight_sum if self.weight_sum > 0 else 1.0
            zs = [self.state[p]["z"] for p in live]
            xs = [self.state[p]["y"] for p in live]  # x, while the parameters hold y
            torch._foreach_add_(zs, [p.grad.sign() for p in live], alpha=-lr)
            torch._foreach_lerp_(xs, zs, c)
        ys = []
        for p in self.params:  # p holds y: swap z in, project, swap x in, project, rebuild y
            state = self.state[p]
            ys.append(p.data)
            p.data = state["z"]
        if project is not None:
            project()
        for p in self.params:
            state = self.state[p]
            state["z"] = p.data
            p.data = state["y"]
        if project is not None:
            project()
        for p, y in zip(self.params, ys):
            state = self.state[p]
            torch.lerp(state["z"], p.data, beta, out=y)  # (1 - beta) z + beta x
            state["y"] = p.data
            p.data = y
        if project is not None:
            project()
        for p in self.params:
            _swap(p, self.state[p], "y")  # p holds x again
        self._at_y = False

    @torch.no_grad()
    def reset_rows(self, p: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows of `p` that were set anew (dead latents resampled): z and y restart there from x."""
        state = self.state.get(p)
        if state is not None and not self._at_y:
            state["z"][rows] = p[rows]
            state["y"][rows] = p[rows]

    def state_dict(self) -> dict:
        if self._at_y:
            raise RuntimeError("state_dict() inside a step: the parameters hold y, not x")
        scalars = {"step": self.steps, "weight_sum": self.weight_sum, "lr_max": self.lr_max}
        return self._state_dict(lambda s: {"z": s["z"], "y": s["y"], **{
            k: torch.tensor(v, dtype=torch.float64) for k, v in scalars.items()}})

    def load_state_dict(self, state_dict: dict) -> None:
        group = state_dict["param_groups"][0] if state_dict.get("param_groups") else {}
        self.param_groups[0].update({k: v for k, v in group.items() if k in ("lr", "beta")})
        self.state, self._at_y = {}, False
        self.steps, self.weight_sum, self.lr_max = 0, 0.0, 0.0
        for i, s in state_dict["state"].items():
            p = self.params[int(i)]
            if "z" not in s or "y" not in s:
                raise ValueError(f"parameter {i}: no schedule-free state (z, y); was this run trained with "
                                 "another optimizer?")
            self.state[p] = {"z": s["z"].to(p.device, p.dtype).clone(), "y": s["y"].to(p.device, p.dtype).clone()}
            self.steps = int(float(s["step"]))
            self.weight_sum, self.lr_max = float(s["weight_sum"]), float(s["lr_max"])


def _swap(p: torch.Tensor, state: dict, key: str) -> None:
    """Exchange the tensor `p` holds with `state[key]`, without copying values."""
    held = p.data
    p.data = state[key]
    state[key] = held
