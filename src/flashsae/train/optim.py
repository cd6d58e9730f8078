"""Optimizers and schedules. Schedules are pure functions of the step: nothing mutates a config."""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch

from flashsae.config import TrainConfig

TOPK_LR_16K = 8e-4
"""Adam's default rate at 16,384 latents for the models that cap the active latents (TopK, BatchTopK
and their kin). Gao et al. (2024) scale 2e-4 by 1/sqrt(latents) for batches of 131k rows; at this
trainer's 4,096 rows per step 4x that learned more per row on planted dictionaries and on digits
(bench/quality.py; BENCHMARKS.md, "training recipe"). Penalty models keep 2e-4: their L0 follows
the rate (at 4x a gated SAE's L0 rose to 1.6x ReLU+L1's at the same penalty, from 1.1x), and no
ablation covered them."""
PENALTY_LR_16K = 2e-4


def default_lr(cfg: TrainConfig, d_sae: int, *, k_limited: bool = True) -> float:
    """TOPK_LR_16K (PENALTY_LR_16K unless `k_limited`) / sqrt(d_sae / 16384) for Adam, capped at 1e-2
    (4e-3 for penalty models); 10x for SGD."""
    if cfg.lr is not None:
        return cfg.lr
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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 matrix units: AVX512-BF16 / AMX on a CPU, compute capability 8.0+ on CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def make_optimizer(params, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    # The fused kernel is one pass over each tensor (2.5-5x the default foreach path, measured).
    if device.type in ("cpu", "cuda"):
        return FusedAdam(params, lr=lr, betas=(0.9, 0.999))
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first lr_warmup, decay to 0 over the last lr_decay_fraction."""
    warm = int(cfg.lr_warmup * total_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_decay == "none" or cfg.lr_decay_fraction == 0:
        return 1.0
    decay_start = int((1 - cfg.lr_decay_fraction) * total_steps)
    if step < decay_start:
        return 1.0
    t = (step - decay_start) / max(1, total_steps - decay_start)
    if cfg.lr_decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return max(0.0, 1.0 - t)


def sparsity_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    warm = int(cfg.sparsity_warmup * total_steps)
    return 1.0 if step >= warm else (step + 1) / warm


class FusedAdam:
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        group = state_dict["param_groups"][0] if state_dict.get("param_groups") else {}
        self.param_groups[0].update({k: v for k, v in group.items() if k in ("lr", "betas", "eps")})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[p] = {"step": torch.as_tensor(s["step"]).to(p.device, torch.float32).clone(),
                             "exp_avg": s["exp_avg"].to(p.device, p.dtype).clone(),
                             "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype).clone()}
