"""Quality with ground truth: how well each library and each flashsae recipe recovers a planted dictionary.

    python -m bench.quality --preset tiny --kinds powerlaw                        # smoke test, ~1 min
    python -m bench.quality --preset small --kinds powerlaw,hierarchy \\
        --variants default "lr3e-3:lr=3e-3" "b1024:batch_size=1024"
    python -m bench.quality --preset small --kinds all --others sparsify:defaults,saelens:recommended
    python -m bench.quality --preset issue --kinds powerlaw --others sparsify:defaults --equal-time

Each kind of planted data (`bench.synth`) is generated once; every flashsae variant (a named set
of `flashsae.train` options on top of the shape) trains in this process, and every other library
in its own subprocess through `bench.anchors.run_one` (`--python` picks the environment they are
installed in), on the same rows. Scores on held-out rows: FVU in data units, L0, dead share (latents
that never fire there), recovery (mean best cosine of the true atoms with the latents' data-space
directions, and the share above 0.9), MCC and the precision/recall of matched latents (see
`bench.synth.truth_scores`). `--equal-time` also trains flashsae's first variant for as long as the
slowest other library took, at its own rows/s.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import synth
from bench.anchors.common import BenchSpec

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "tiny": dict(d=64, n_atoms=256, active=4, d_sae=512, k=4, rows=2**17, val_rows=4096),
    "small": dict(d=128, n_atoms=1024, active=8, d_sae=2048, k=8, rows=2**19, val_rows=8192),
    "issue": dict(d=256, n_atoms=2048, active=16, d_sae=4096, k=16, rows=2_000_000, val_rows=8192),
}
ANCHORS_PYTHON = "/tmp/anchors-venv/bin/python"
OTHER_LR = 1e-3  # the shared Adam rate under "recommended"
EQUAL_TIME_CAP = 4
"""--equal-time trains at most this many times the rows (a loaded machine's timings can ask for far more)."""


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, options); values are Python literals or bare strings."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return name, options


def run_flashsae(P: dict, X_train: torch.Tensor, X_val: torch.Tensor, truth: dict, options: dict,
                 *, rows: int, seed: int, refine: int = 0) -> dict:
    """Train flashsae with `options` on top of the shape; score it, and with `refine` also the FVU of its
    codes refined by that many projected gradient steps (`flashsae.refine`) as `fvu_refined`."""
    import flashsae
    from flashsae.refine import refined_forward

    opts = dict(arch="topk", d_sae=P["d_sae"], k=P["k"], rows=rows, val_fraction=0.0, seed=seed, quiet=True,
                out=None, eval_every=0)
    opts.update(options)
    model, result = flashsae.train(X_train.numpy(), **opts)
    model.eval()
    scores = score(model.encode, model.decode, X_val, truth, P["d_sae"])
    if refine:
        codes = torch.cat([refined_forward(model, model.standardizer(X_val[i:i + 4096]), refine)[0]
                           .to_dense(model.d_sae) for i in range(0, len(X_val), 4096)])
        x_hat = model.decode(codes).double()
        x = X_val.double()
        scores["fvu_refined"] = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return {**scores, "train_s": result.train_seconds, "rows": result.rows_seen,
            "rows_per_s": result.rows_per_s, "standardize": model.standardizer.mode}


@torch.no_grad()
def score(encode_fn, decode_fn, X_val: torch.Tensor, truth: dict, d_sae: int, block: int = 4096) -> dict:
    """Held-out FVU (data units), L0, dead share and the truth scores of one trained model."""
    codes = torch.cat([encode_fn(X_val[i:i + block]).float() for i in range(0, len(X_val), block)])
    x_hat = torch.cat([decode_fn(codes[i:i + block]).float() for i in range(0, len(codes), block)])
    x = X_val.double()
    fvu = (x - x_hat.double()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    out = {"fvu": fvu.item(), "l0": (codes != 0).sum(1).float().mean().item(),
           "dead_fraction": 1.0 - (codes != 0).any(0).float().mean().item()}
    out.update(synth.truth_scores(codes, synth.decoder_atoms(decode_fn, d_sae), truth["codes"], truth["atoms"]))
    return out


def run_other(library: str, settings: str, P: dict, paths: dict, *, rows: int, seed: int, python: str,
              timeout: float, spec: BenchSpec | None = None) -> dict:
    """One other library on the rows at paths["train"], scored on paths["val"] (and against the planted
    truth at paths["truth"] when it is given), in its own subprocess."""
    spec = spec or BenchSpec(arch="topk", d_in=P["d"], d_sae=P["d_sae"], k=P["k"], batch_size=4096, lr=OTHER_LR,
                             n_train_rows=rows, device="cpu", dtype="float32", seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, "-m", "bench.anchors.run_one", "--library", library, "--settings", settings,
               "--spec", json.dumps(spec.to_json()), "--train", paths["train"], "--val", paths["val"],
               "--out", str(out)] + (["--truth", paths["truth"]] if paths.get("truth") else [])
        try:
            # A triton without a GPU driver makes sparsify fail on the CPU; its eager path needs none.
            env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout:.0f} s"}
        if not out.exists():
            return {"error": (proc.stderr or "no result")[-300:]}
        r = json.loads(out.read_text())
    if r.get("error"):
        return {"error": r["error"], "settings": r.get("settings")}
    keep = ("recovery", "recovered_09", "mcc", "mcc_dictionary", "precision", "recall")
    return {"fvu": r["fvu"], "l0": r["l0"], "dead_fraction": r["dead_fraction"], "train_s": r["train_seconds"],
            "rows": r["extra"].get("rows_trained"), "rows_per_s": r["rows_per_s"], "settings": r["settings"],
            **{k: r["extra"][k] for k in keep if k in r["extra"]}}


def saelens_rows(P: dict, rows: int, *, seed: int, python: str):
    """(X_train, X_val, val codes, unit atoms) drawn by SAELens's SyntheticModel (bench.saelens_synth)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "bench.saelens_synth", "--features", str(P["n_atoms"]), "--d", str(P["d"]),
               "--train-rows", str(rows), "--val-rows", str(P["val_rows"]), "--seed", str(seed), "--out", tmp]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        truth = np.load(f"{tmp}/truth.npz")
        return (torch.from_numpy(np.load(f"{tmp}/train.npy")), torch.from_numpy(np.load(f"{tmp}/val.npy")),
                torch.from_numpy(truth["codes"]), torch.from_numpy(truth["atoms"]))


COLUMNS = ("fvu", "l0", "dead_fraction", "recovery", "recovered_09", "mcc", "precision", "recall", "rows",
           "train_s")


def table(rows: list[dict]) -> str:
    head = ("| kind | run | FVU | FVU refined | L0 | dead % | recovery | >0.9 % | MCC | MCC dict | precision "
            "| recall | rows | train s |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 12]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kind']} | {r['name']} | {r['error'][:80]} |" + " |" * 11)
            continue
        refined = f"{r['fvu_refined']:.4f}" if "fvu_refined" in r else ""
        cells = [f"{r['fvu']:.4f}", refined, f"{r['l0']:.1f}", f"{100 * r['dead_fraction']:.1f}",
                 f"{r['recovery']:.3f}", f"{100 * r['recovered_09']:.1f}", f"{r['mcc']:.3f}",
                 f"{r.get('mcc_dictionary', float('nan')):.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                 f"{r['rows']:,}", f"{r['train_s']:.1f}"]
        lines.append(f"| {r['kind']} | {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--kinds", default="powerlaw",
                   help=f"comma-separated of {','.join(synth.KINDS)} and saelens (SAELens's SyntheticModel, "
                        "generated by --python), or all")
    p.add_argument("--variants", nargs="*", default=["default"],
                   help="flashsae runs, each 'name:option=value,...' (options of flashsae.train)")
    p.add_argument("--others", default="", help="other libraries, 'library:settings,...' (settings: "
                   "recommended = Adam lr 1e-3, defaults = the library's own)")
    p.add_argument("--python", default=ANCHORS_PYTHON if os.path.exists(ANCHORS_PYTHON) else sys.executable,
                   help="interpreter with the other libraries installed")
    p.add_argument("--rows", type=int, help="training rows (default: the preset's)")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="also score flashsae's codes refined by STEPS projected gradient steps (FVU refined)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--equal-time", action="store_true",
                   help="also train flashsae's first variant for the slowest other library's wall time "
                        f"(at most {EQUAL_TIME_CAP}x the rows)")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    P = dict(PRESETS[args.preset])
    rows = args.rows or P["rows"]
    kinds = (*synth.KINDS, "saelens") if args.kinds == "all" else tuple(args.kinds.split(","))
    variants = [parse_variant(v) for v in args.variants]
    others = [tuple(o.split(":")) if ":" in o else (o, "defaults") for o in filter(None, args.others.split(","))]
    torch.set_num_threads(os.cpu_count() or 1)
    results = []
    for kind in kinds:
        if kind == "saelens":
            planted = None
            X_train, X_val, codes, atoms = saelens_rows(P, rows, seed=args.seed, python=args.python)
        else:
            planted = synth.make(kind, d=P["d"], n_atoms=P["n_atoms"], active=P["active"], seed=args.seed)
            X_train, _ = synth.sample(planted, rows, seed=args.seed + 1)
            X_val, codes = synth.sample(planted, P["val_rows"], seed=args.seed + 2, with_codes=True)
            atoms = planted.atoms
        truth = {"codes": codes, "atoms": atoms}
        print(f"{kind}: true L0 {(codes > 0).sum(1).float().mean():.2f} on the held-out rows", flush=True)
        kind_rows = []
        for name, options in variants:
            r = run_flashsae(P, X_train, X_val, truth, dict(options), rows=rows, seed=args.seed, refine=args.refine)
            kind_rows.append({"kind": kind, "name": f"flashsae {name}", "options": options, **r})
            print(table(kind_rows[-1:]).splitlines()[-1], flush=True)
        if others:
            with tempfile.TemporaryDirectory() as tmp:
                paths = {"train": f"{tmp}/train.npy", "val": f"{tmp}/val.npy", "truth": f"{tmp}/truth.npz"}
                np.save(paths["train"], X_train.numpy())
                np.save(paths["val"], X_val.numpy())
                np.savez(paths["truth"], codes=codes.numpy(), atoms=atoms.numpy())
                for library, settings in others:
                    r = run_other(library, settings, P, paths, rows=rows, seed=args.seed, python=args.python,
                                  timeout=args.timeout)
                    kind_rows.append({"kind": kind, "name": f"{library} {settings}", **r})
                    print(table(kind_rows[-1:]).splitlines()[-1], flush=True)
        timed = [r["train_s"] for r in kind_rows[len(variants):] if not r.get("error")]
        if args.equal_time and timed and planted is not None and not kind_rows[0].get("error"):
            name, options = variants[0]
            budget = min(int(kind_rows[0]["rows_per_s"] * max(timed)), EQUAL_TIME_CAP * rows)
            X_more, _ = synth.sample(planted, budget, seed=args.seed + 1)  # the same rows first, then more
            r = run_flashsae(P, X_more, X_val, truth, dict(options), rows=budget, seed=args.seed)
            kind_rows.append({"kind": kind, "name": f"flashsae {name}, equal wall time", "options": options, **r})
            print(table(kind_rows[-1:]).splitlines()[-1], flush=True)
        results += kind_rows
    text = table(results)
    print(text)
    meta = {"command": "python -m bench.quality " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"load average {os.getloadavg()[0]:.1f}",
            "preset": {**P, "rows": rows}, "torch": torch.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if args.append:
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(f"\n## quality, preset {args.preset}, {meta['date']}\n\n- Command: `{meta['command']}`\n"
                    f"- Machine: {meta['machine']}; torch {meta['torch']}\n- Setting: {meta['preset']}\n\n"
                    f"{text}\n")
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    sys.exit(code)
