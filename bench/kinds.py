"""Matryoshka, Gated and transcoders: flashsae against the other libraries on the same data.

    python -m bench.kinds                                  # flashsae, and the others where they import
    python -m bench.kinds --others-python /path/to/venv/bin/python --rows 32768
    FLASHSAE_OTHERS_PYTHON=/path/to/venv/bin/python python -m bench.kinds --kinds transcoder

Kinds and libraries:
  matryoshka  flashsae `matryoshka` | SAELens MatryoshkaBatchTopKTrainingSAE | dictionary_learning
              MatryoshkaBatchTopKTrainer; the same nested widths and k for all.
  gated       flashsae `gated` | SAELens GatedTrainingSAE | dictionary_learning GatedSAETrainer;
              one L1 coefficient, which each library scales its own way (compare FVU at the L0 shown).
  transcoder  flashsae `transcoder` (TopK) | sparsify SparseCoder with transcode=True.

The data are generated once in this process: planted sparse rows x (bench.data.planted) and, for
the transcoders, y = W2 relu(W1 x + b1), a fixed random MLP (sparsify's transcoders need
d_out = d_in). Each library runs in its own subprocess (the other libraries usually live in their
own virtual environment: --others-python), after an untimed 2-step warm-up run. rows/s is training
rows over the library's training wall time; FVU (of x, or of y for transcoders), L0 and dead
fraction are measured on held-out rows. A library that does not import is reported as missing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = {"matryoshka": ["flashsae", "saelens", "dictionary_learning"],
         "gated": ["flashsae", "saelens", "dictionary_learning"],
         "transcoder": ["flashsae", "sparsify"]}
DISTS = {"flashsae": "flashsae", "saelens": "sae-lens", "dictionary_learning": "dictionary-learning",
         "sparsify": "eai-sparsify"}


# ---- shared helpers (run in every worker) ----------------------------------------------------
def _version(lib: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTS[lib])
    except PackageNotFoundError:
        return "not installed"


def _batches(X: torch.Tensor, batch_size: int, n_steps: int, Y: torch.Tensor | None = None):
    """n_steps batches in storage order, cycling (the planted rows are i.i.d.)."""
    n = X.shape[0] // batch_size
    for step in range(n_steps):
        i = (step % n) * batch_size
        yield X[i:i + batch_size] if Y is None else (X[i:i + batch_size], Y[i:i + batch_size])


@torch.no_grad()
def _heldout(encode, decode, X: torch.Tensor, Y: torch.Tensor, batch: int = 4096) -> dict:
    """FVU of the reconstruction of Y (Y = X for an SAE), L0 and dead fraction on held-out rows."""
    torch.set_float32_matmul_precision("highest")
    mean = Y.double().mean(0)
    sse = sst = 0.0
    nnz = 0
    fired = torch.zeros(0, dtype=torch.bool)
    for i in range(0, X.shape[0], batch):
        x, y = X[i:i + batch], Y[i:i + batch].double()
        codes = encode(x).float()
        sse += (y - decode(codes).double()).pow(2).sum().item()
        sst += (y - mean).pow(2).sum().item()
        nz = codes != 0
        nnz += int(nz.sum())
        fired = nz.any(0) if fired.numel() == 0 else fired | nz.any(0)
    return {"fvu": sse / sst, "l0": nnz / X.shape[0], "dead_fraction": 1.0 - fired.float().mean().item()}


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


# ---- flashsae ----------------------------------------------------------------------------------
def _flashsae(kind: str, cfg: dict, X, Y, X_val, Y_val) -> dict:
    import flashsae

    def train(n_rows: int):
        kwargs = dict(latents=cfg["d_sae"], batch_size=cfg["batch_size"], n_rows=n_rows, lr=cfg["lr"],
                      val_fraction=0.0, seed=cfg["seed"], quiet=True, out=None,
                      log_every=10**9, eval_every=10**9)
        if kind == "matryoshka":
            return flashsae.train(X.numpy(), arch="matryoshka", k=cfg["k"], prefixes=tuple(cfg["widths"]), **kwargs)
        if kind == "gated":
            return flashsae.train(X.numpy(), arch="gated", l1=cfg["l1"], **kwargs)
        return flashsae.train({"x": X.numpy(), "y": Y.numpy()}, arch="transcoder", k=cfg["k"], **kwargs)

    train(2 * cfg["batch_size"])  # untimed warm-up
    model, result = train(cfg["rows"])
    model.eval()
    decode = model.decode
    metrics = _heldout(model.encode, decode, X_val, Y_val if kind == "transcoder" else X_val)
    return {"seconds": float(result.train_seconds), "rows": int(getattr(result, "rows_seen", cfg["rows"])),
            "settings": f"adam lr={cfg['lr']:g}, fp32, flashsae defaults otherwise", **metrics}


# ---- SAELens -----------------------------------------------------------------------------------
def _saelens(kind: str, cfg: dict, X, Y, X_val, Y_val) -> dict:
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if kind not in ("matryoshka", "gated"):
        raise NotImplementedError("SAELens trains no transcoders")

    def fit(n_steps: int):
        torch.manual_seed(cfg["seed"])
        if kind == "matryoshka":
            sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=cfg["k"], matryoshka_widths=list(cfg["widths"])))
        else:
            sae = sae_lens.GatedTrainingSAE(sae_lens.GatedTrainingSAEConfig(
                d_in=cfg["d_in"], d_sae=cfg["d_sae"], l1_coefficient=cfg["l1"], l1_warm_up_steps=0))
        tcfg = SAETrainerConfig(total_training_samples=n_steps * cfg["batch_size"],
                                train_batch_size_samples=cfg["batch_size"], lr=cfg["lr"], lr_end=cfg["lr"],
                                lr_scheduler_name="constant", lr_warm_up_steps=0, device="cpu", autocast=False,
                                logger=LoggingConfig(log_to_wandb=False))
        trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=_batches(X, cfg["batch_size"], n_steps))
        with _quiet():
            t0 = time.perf_counter()
            sae = trainer.fit()
        return sae, time.perf_counter() - t0

    fit(2)
    n_steps = cfg["rows"] // cfg["batch_size"]
    sae, seconds = fit(n_steps)
    sae.eval()
    note = "inference: sae.encode"
    if kind == "matryoshka":
        # sae.encode is batch top-k over each 4096-row eval batch, the training rule. SAELens saves the
        # model as JumpReLU at its learned global threshold instead; that one's L0 is noted.
        rescale = bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
        norms, threshold = sae.W_dec.norm(dim=-1), float(sae.topk_threshold)

        @torch.no_grad()
        def jumprelu(x):
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            acts = torch.relu(pre * norms if rescale else pre)
            return acts * (acts > threshold)

        saved = _heldout(jumprelu, lambda c: (c / norms if rescale else c) @ sae.W_dec + sae.b_dec, X_val, X_val)
        note = (f"inference: batch top-k per 4096-row eval batch; as saved (threshold {threshold:.3g}) "
                f"L0 {saved['l0']:.0f}, FVU {saved['fvu']:.3f}")
    encode = sae.encode
    metrics = _heldout(encode, sae.decode, X_val, X_val)
    return {"seconds": seconds, "rows": n_steps * cfg["batch_size"],
            "settings": f"SAETrainer, adam lr={cfg['lr']:g} constant, fp32; {note}", **metrics}


# ---- dictionary_learning -------------------------------------------------------------------------
def _dictionary_learning(kind: str, cfg: dict, X, Y, X_val, Y_val) -> dict:
    from dictionary_learning.training import trainSAE

    if kind == "matryoshka":
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer as cls
    elif kind == "gated":
        from dictionary_learning.trainers.gdm import GatedSAETrainer as cls
    else:
        raise NotImplementedError("dictionary_learning trains no transcoders")

    def fit(n_steps: int):
        kwargs = dict(steps=n_steps, activation_dim=cfg["d_in"], dict_size=cfg["d_sae"], layer=0, lm_name="bench",
                      lr=cfg["lr"], warmup_steps=0, seed=cfg["seed"], device="cpu")
        if kind == "matryoshka":
            w = [0, *cfg["widths"]]
            # its inference threshold starts tracking after threshold_start_step (default 1000 steps)
            kwargs.update(k=cfg["k"], group_fractions=[(b - a) / cfg["d_sae"] for a, b in zip(w[:-1], w[1:])],
                          threshold_start_step=min(10, n_steps - 1))
        else:
            kwargs.update(l1_penalty=cfg["l1"], sparsity_warmup_steps=None)
        built = []

        def factory(**kw):
            built.append(cls(**kw))
            return built[-1]

        with _quiet():
            t0 = time.perf_counter()
            trainSAE(data=_batches(X, cfg["batch_size"], n_steps), trainer_configs=[{"trainer": factory, **kwargs}],
                     steps=n_steps, use_wandb=False, save_dir=None, device="cpu", autocast_dtype=torch.float32)
        return built[0], time.perf_counter() - t0

    fit(2)
    n_steps = cfg["rows"] // cfg["batch_size"]
    trainer, seconds = fit(n_steps)
    ae = trainer.ae.eval()
    note = ""
    encode = ae.encode
    if kind == "matryoshka":  # batch top-k as for SAELens; its saved threshold's L0 is noted
        saved = _heldout(ae.encode, ae.decode, X_val, X_val)
        encode = lambda x: ae.encode(x, use_threshold=False)  # noqa: E731
        note = (f"; inference: batch top-k per 4096-row eval batch; as saved (threshold {float(ae.threshold):.3g}) "
                f"L0 {saved['l0']:.0f}, FVU {saved['fvu']:.3f}")
    metrics = _heldout(encode, ae.decode, X_val, X_val)
    return {"seconds": seconds, "rows": n_steps * cfg["batch_size"],
            "settings": f"trainSAE, adam lr={cfg['lr']:g}, no warm-up, fp32{note}", **metrics}


# ---- sparsify ------------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    """The module the transcoders replace: y = W2 relu(W1 x + b1)."""

    def __init__(self, W1, b1, W2):
        super().__init__()
        self.W1, self.b1, self.W2 = W1, b1, W2

    def forward(self, x):
        return torch.relu(x @ self.W1.T + self.b1) @ self.W2.T


class _StandIn(torch.nn.Module):
    """What sparsify's Trainer hooks: ids (row indices) -> rows x -> mlp(x); it trains on mlp's
    input and output, the same (x, y) rows the others get."""

    def __init__(self, X, mlp):
        super().__init__()
        self.X, self.mlp = X, mlp

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return self.X.device

    @property
    def dummy_inputs(self):
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids, **_):
        return self.mlp(self.X[input_ids])


def _sparsify(kind: str, cfg: dict, X, Y, X_val, Y_val, mlp) -> dict:
    if not torch.cuda.is_available():  # its Triton decoder fails on a CPU-only machine with triton installed
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    with _quiet():
        from sparsify import SaeConfig, TrainConfig, Trainer
    if kind != "transcoder":
        raise NotImplementedError("only transcoders are compared with sparsify here")
    model = _StandIn(X, mlp)

    class Ids(torch.utils.data.Dataset):
        def __init__(self, n_steps):
            self.n_steps = n_steps

        def __len__(self):
            return self.n_steps

        def __getitem__(self, i):
            n = X.shape[0] // cfg["batch_size"]
            start = (i % n) * cfg["batch_size"]
            return {"input_ids": torch.arange(start, start + cfg["batch_size"])}

    def fit(n_steps: int, save_dir: str):
        tcfg = TrainConfig(SaeConfig(activation="topk", num_latents=cfg["d_sae"], k=cfg["k"], transcode=True),
                           batch_size=1, loss_fn="fvu", optimizer="adam", lr=cfg["lr"], lr_warmup_steps=0,
                           hookpoints=["mlp"], init_seeds=[cfg["seed"]], save_every=10**12, save_dir=save_dir,
                           log_to_wandb=False)
        with _quiet():
            trainer = Trainer(tcfg, Ids(n_steps), model)
            t0 = time.perf_counter()
            trainer.fit()
        return trainer, time.perf_counter() - t0

    n_steps = cfg["rows"] // cfg["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        fit(2, tmp + "/warm")
        trainer, seconds = fit(n_steps, tmp + "/run")
    sae = next(iter(trainer.saes.values()))

    def encode(x):
        acts, idx, _ = sae.encode(x)
        return torch.zeros(x.shape[0], sae.num_latents).scatter_(1, idx, acts.float())

    def decode(codes):
        vals, idx = codes.topk(cfg["k"], dim=1, sorted=False)
        return sae.decode(vals, idx)

    metrics = _heldout(encode, decode, X_val, Y_val)
    return {"seconds": seconds, "rows": n_steps * cfg["batch_size"],
            "settings": f"Trainer.fit, adam lr={cfg['lr']:g} linear decay, fvu loss, fp32", **metrics}


IMPORTS = {"flashsae": "flashsae", "saelens": "sae_lens", "dictionary_learning": "dictionary_learning",
           "sparsify": "sparsify"}


def worker(lib: str, kind: str, data: str, cfg: dict) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    if lib == "sparsify" and not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # before the import below
    try:
        with _quiet():
            __import__(IMPORTS[lib])
    except Exception as e:  # noqa: BLE001 - any import failure means the library is missing here
        return {"missing": f"{type(e).__name__}: {e}"[:200]}
    d = np.load(data)
    X, X_val = torch.from_numpy(d["X"]), torch.from_numpy(d["X_val"])
    mlp = _MLP(*(torch.from_numpy(d[n]) for n in ("W1", "b1", "W2")))
    with torch.no_grad():
        Y, Y_val = mlp(X), mlp(X_val)
    runs = {"flashsae": _flashsae, "saelens": _saelens, "dictionary_learning": _dictionary_learning}
    if lib == "sparsify":
        out = _sparsify(kind, cfg, X, Y, X_val, Y_val, mlp)
    else:
        out = runs[lib](kind, cfg, X, Y, X_val, Y_val)
    out["rows_per_s"] = out["rows"] / out["seconds"]
    out["version"] = _version(lib)
    return out


# ---- the parent: data, subprocesses, table -------------------------------------------------------
def make_data(path: str, cfg: dict) -> None:
    from bench.data import planted

    d = cfg["d_in"]
    X, _ = planted(cfg["rows"] + cfg["val_rows"], d, cfg["n_atoms"], cfg["active"], 0.05, cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    W1 = torch.randn(4 * d, d, generator=gen) / d ** 0.5
    b1 = 0.1 * torch.randn(4 * d, generator=gen)
    W2 = torch.randn(d, 4 * d, generator=gen) / (2 * d) ** 0.5
    np.savez(path, X=X[:cfg["rows"]].numpy(), X_val=X[cfg["rows"]:].numpy(), W1=W1.numpy(), b1=b1.numpy(),
             W2=W2.numpy())


def table(results: list[dict]) -> str:
    lines = ["| kind | library | version | rows/s | x flashsae | held-out FVU | L0 | dead % | settings |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    base = {r["kind"]: r for r in results if r["library"] == "flashsae" and "rows_per_s" in r}
    for r in results:
        if "rows_per_s" not in r:
            why, text = ("missing", r["missing"]) if "missing" in r else ("failed", r.get("error", ""))
            lines.append(f"| {r['kind']} | {r['library']} | - | {why} | | | | | {text} |")
            continue
        ref = base.get(r["kind"])
        ratio = f"{r['rows_per_s'] / ref['rows_per_s']:.2f}" if ref else "-"
        lines.append(f"| {r['kind']} | {r['library']} | {r['version']} | {r['rows_per_s']:,.0f} | {ratio} | "
                     f"{r['fvu']:.4f} | {r['l0']:.1f} | {100 * r['dead_fraction']:.1f} | {r['settings']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kinds", description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    p.add_argument("--rows", type=int, default=32768, help="training rows (every library trains rows/batch steps)")
    p.add_argument("--val-rows", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--latents", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--l1", type=float, default=1.0, help="gated's L1 coefficient (each library's own scaling)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--others-python", default=os.environ.get("FLASHSAE_OTHERS_PYTHON", sys.executable),
                   help="interpreter with SAELens / dictionary_learning / sparsify installed "
                        "(default: $FLASHSAE_OTHERS_PYTHON, else this one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", nargs=4, metavar=("LIB", "KIND", "DATA", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        lib, kind, data, out = args.worker
        try:
            res = worker(lib, kind, data, json.loads(args.cfg))
        except Exception as e:  # noqa: BLE001 - a failing library gives an error row
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"[:300]}
        Path(out).write_text(json.dumps(res))
        return 0

    d_sae = args.latents
    cfg = dict(d_in=args.d_in, d_sae=d_sae, k=args.k, l1=args.l1, batch_size=args.batch_size, lr=args.lr,
               rows=args.rows, val_rows=args.val_rows, seed=args.seed, n_atoms=d_sae, active=args.k,
               widths=[w for w in (d_sae // 16, d_sae // 4, d_sae) if w >= args.k])
    kinds = [k for k in args.kinds.split(",") if k]
    results = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data.npz"
        make_data(data, cfg)
        for kind in kinds:
            for lib in KINDS[kind]:
                python = sys.executable if lib == "flashsae" else args.others_python
                out = f"{tmp}/{kind}-{lib}.json"
                cmd = [python, "-m", "bench.kinds", "--worker", lib, kind, data, out, "--cfg", json.dumps(cfg)]
                env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}
                try:
                    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                except OSError as e:  # no such interpreter
                    res = {"missing": f"cannot run {python}: {e.strerror}"}
                else:
                    try:
                        res = json.loads(Path(out).read_text())
                    except FileNotFoundError:
                        res = {"error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
                res.update(kind=kind, library=lib)
                results.append(res)
                shown = {k: v for k, v in res.items() if k in ("rows_per_s", "fvu", "l0", "missing", "error")}
                print(f"{kind:<11} {lib:<20} {shown}", file=sys.stderr, flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
              f"d_in {cfg['d_in']}, latents {d_sae}, k {cfg['k']}, batch {cfg['batch_size']}, {cfg['rows']} rows, "
              f"{cfg['val_rows']} held-out; {time.time() - t_start:.0f} s"
              + (f"; load average {load[0]:.1f}" if load else ""))
    missing = sorted({r["library"] for r in results if "missing" in r})
    print(header)
    print(table(results))
    if missing:
        print(f"missing (not importable by {args.others_python}): {', '.join(missing)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg, "header": header, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
