"""Run configuration: frozen dataclasses whose field docstrings double as CLI help.

Model options live with each architecture (flashsae.models); this module holds the data and
training options. Imports only flashsae.errors.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass

from flashsae.errors import ConfigError

STANDARDIZE_MODES = ("auto", "column", "global", "norm", "none")
TABLE_EXTENSIONS = (".csv", ".tsv")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the rows come from and how they are prepared."""

    data: str | tuple[str, ...] = "digits"
    """Input: a .npy/.npz/.csv/.tsv/.safetensors file, a directory of .npy shards, or 'digits' / 'synthetic';
    several paths are read side by side as the layers of one row (crosscoders, cross-layer transcoders)."""

    target: str | tuple[str, ...] | None = None
    """What a transcoder reconstructs (stream y): a file or shard directory with the same rows as the
    input (several paths: one per layer); None for a sparse autoencoder."""

    key: str | None = None
    """Array name inside a .npz or .safetensors file."""

    standardize: str = "auto"
    """Standardisation fitted on the training rows: column (each column to mean 0, variance 1), global
    (column means removed, one scale for all columns), norm (mean row norm to sqrt(d)), none, or auto:
    column for tables (.csv, .tsv), whose columns have their own units; global for everything else
    (activations, arrays, .npy/.npz/.safetensors files, shards, digits), whose columns share one unit."""

    drop_nonfinite: bool = False
    """Skip rows containing NaN or Inf instead of failing."""

    image_shape: tuple[int, int] | None = None
    """Height and width of image rows, for the atom atlas (digits sets 8 8)."""

    val_fraction: float = 0.1
    """Fraction of rows held out for evaluation and early stopping (at most 50,000 rows)."""

    synthetic_rows: int = 200_000
    """synthetic: number of rows."""

    synthetic_d: int = 64
    """synthetic: row width."""

    synthetic_atoms: int = 512
    """synthetic: planted dictionary size."""

    synthetic_active: int = 4
    """synthetic: atoms active per row."""

    synthetic_noise: float = 0.01
    """synthetic: standard deviation of the added Gaussian noise."""

    synthetic_seed: int = 0
    """synthetic: seed of the generator."""

    def __post_init__(self) -> None:
        for name in ("data", "target"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(str(v) for v in value) if len(value) > 1 else str(value[0]))
        if self.standardize not in STANDARDIZE_MODES:
            raise ConfigError(f"standardize must be one of {', '.join(STANDARDIZE_MODES)}, got {self.standardize!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("synthetic_rows", "synthetic_d", "synthetic_atoms", "synthetic_active"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.synthetic_active > self.synthetic_atoms:
            raise ConfigError("synthetic_active must not exceed synthetic_atoms")
        if self.image_shape is not None:
            shape = tuple(int(v) for v in self.image_shape)
            if len(shape) != 2 or min(shape) < 1:
                raise ConfigError(f"image_shape must be two positive integers, got {self.image_shape}")
            object.__setattr__(self, "image_shape", shape)

    def standardize_for(self, source_name: str) -> str:
        """The standardisation a stream read from `source_name` gets (resolves "auto")."""
        if self.standardize != "auto":
            return self.standardize
        return "column" if str(source_name).lower().endswith(TABLE_EXTENSIONS) else "global"

    def synthetic_params(self) -> dict:
        return {"rows": self.synthetic_rows, "d": self.synthetic_d, "atoms": self.synthetic_atoms,
                "active": self.synthetic_active, "noise": self.synthetic_noise, "seed": self.synthetic_seed}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How the model is optimised."""

    batch_size: int | None = None
    """Rows per optimizer step; None picks 2048, or less so that an epoch has at least 8 steps."""

    rows: int | None = None
    """Training rows to process in total (over several epochs); None picks max(20 epochs, 2M rows,
    2000 rows per latent) capped at 200 epochs."""

    epochs: float | None = None
    """Alternative to rows: number of passes over the training rows."""

    lr: float | None = None
    """Learning rate; None picks 8e-4 * sqrt(16384 / d_sae) for Adam on top-k models (capped at 1e-2),
    2e-4 * sqrt(16384 / d_sae) on penalty models (capped at 4e-3), 10x that for SGD, and
    2.5e-3 * sqrt(16384 / d_sae) (capped at 2e-2) for signum."""

    optimizer: str = "adam"
    """adam, sgd (with momentum 0.9) or signum: sign-SGD made schedule-free (Defazio et al., 2024), as
    EleutherAI sparsify trains: each gradient is taken between the sign-SGD iterate and its running
    average, and that average is the model evaluated and saved; no learning-rate decay by default."""

    lr_warmup: float = 0.01
    """Fraction of training spent ramping the learning rate up linearly from 0."""

    lr_decay: str = "auto"
    """Learning-rate decay over the last lr_decay_fraction of training: linear, cosine, none, or auto:
    none for signum (schedule-free averaging replaces it), linear otherwise."""

    lr_decay_fraction: float = 0.2
    """Fraction of training (at the end) over which the learning rate decays to 0."""

    k_anneal: float = 1.0
    """Top-k models: start at this multiple of k (rounded, at most the number of latents) and lower it
    linearly to k over the first k_anneal_fraction of training; 1 keeps k throughout."""

    k_anneal_fraction: float = 0.5
    """Fraction of training (from the start) over which k_anneal lowers k to its final value."""

    sparsity_warmup: float = 0.05
    """Fraction of training over which the sparsity coefficient ramps up linearly from 0."""

    resample_dead: int = 0
    """Times, spread over the first half of training, that dead latents are re-initialised toward the
    worst-reconstructed rows of the batch (Bricken et al., 2023); 0 never (AuxK still revives them)."""

    dead_after_rows: int | None = None
    """A latent that has not fired for this many training rows counts as dead (AuxK); None: min(10M, rows / 10)."""

    seed: int = 0
    """Seed for initialisation and shuffling; CPU runs with the same seed are bit-identical."""

    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""

    dtype: str = "auto"
    """Compute precision of the matrix products: float32, bfloat16 (master weights stay float32), or
    auto: bfloat16 for topk/batchtopk where the hardware multiplies bf16 natively (CPUs with
    AVX512-BF16 or AMX, CUDA GPUs of compute capability 8.0+), else float32; on such a GPU, auto
    also runs the float32 matrix products of every architecture in TF32 while the run steps
    (config.json's resolved dtype says tf32 for the architectures that are not bf16)."""

    threads: int | None = None
    """CPU threads for PyTorch; None picks 1 for small steps (batch*d_in*d_sae < 2^27), else
    PyTorch's default (recorded in config.json). CPU runs are bit-identical for the same threads."""

    eval_every: int | None = None
    """Steps between held-out evaluations (also the early-stopping check); None picks 10 per run, 0 only at the end."""

    patience: int = 0
    """Stop after this many held-out evaluations without improvement; 0 disables early stopping."""

    log_every: int = 50
    """Steps between log lines (the only place the trainer reads values back from the device)."""

    checkpoint_every: int = 0
    """Steps between checkpoints for --resume; 0 writes one only when interrupted."""

    tensor_parallel: int = 1
    """Under torchrun: ranks that share each model's latents (tensor parallel). Each holds a contiguous
    1/T of them with their optimizer moments; the world size divided by T is data parallel. Must divide
    the number of ranks and the number of latents (see docs/distributed.md)."""

    rows_on_device: str = "auto"
    """Put the training rows on the device once and shuffle them there (the same batches as read
    from the host): auto (on CUDA when they fit in a quarter of the free memory, or when the data is
    a CUDA tensor), yes, or no."""

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.rows is not None and self.rows < 1:
            raise ConfigError(f"rows must be >= 1, got {self.rows}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.rows is not None and self.epochs is not None:
            raise ConfigError("give either rows or epochs, not both")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd", "signum"):
            raise ConfigError(f"optimizer must be adam, sgd or signum, got {self.optimizer!r}")
        if self.lr_decay not in ("auto", "linear", "cosine", "none"):
            raise ConfigError(f"lr_decay must be auto, linear, cosine or none, got {self.lr_decay!r}")
        if not (isinstance(self.k_anneal, (int, float)) and not isinstance(self.k_anneal, bool)
                and self.k_anneal >= 1):
            raise ConfigError(f"k_anneal must be a number >= 1 (the multiple of k to start at; 1 = off), "
                              f"got {self.k_anneal!r}")
        for name in ("lr_warmup", "lr_decay_fraction", "sparsity_warmup", "k_anneal_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        for name in ("log_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0 or (name == "log_every" and self.log_every < 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.resample_dead < 0:
            raise ConfigError(f"resample_dead must be >= 0, got {self.resample_dead}")
        if self.tensor_parallel < 1:
            raise ConfigError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.rows_on_device not in ("auto", "yes", "no"):
            raise ConfigError(f"rows_on_device must be auto, yes or no, got {self.rows_on_device!r}")


def to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field, by field name (for --help)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
