"""Train the same SAE setting with flashsae and the other libraries; compare speed and quality.

    python -m bench.compare --device cpu --preset tiny --rows 8192 --no-append
    python -m bench.compare --device cpu --preset cpu-small --with-defaults
    python -m bench.compare --device cuda --preset gpu --json gpu.json
    python -m bench.compare --device cpu --preset cpu-small --arch relu-l1 --l1 2.0

The data are generated once, written to a temporary .npy pair and every library is run in its
own subprocess (`python -m bench.anchors.run_one`) with the same interpreter. The table gives
rows/s, held-out FVU, L0, dead %, peak memory and each library's rows/s relative to flashsae's;
it is printed, optionally written as JSON, and appended to BENCHMARKS.md unless --no-append.
"""
from __future__ import annotations

import argparse
import json
import math
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

from bench import data as bench_data
from bench.anchors import LIBRARIES
from bench.anchors.common import BenchResult, BenchSpec, package_version

REPO = Path(__file__).resolve().parents[1]
ALL_SAE_LIBS = ["flashsae", "saelens", "sparsify", "dictionary_learning"]
DISTS = {
    "flashsae": "flashsae",
    "saelens": "sae-lens",
    "sparsify": "eai-sparsify",
    "dictionary_learning": "dictionary-learning",
    "sklearn": "scikit-learn",
}

# One comparison setting per preset. lr is what every library gets under "recommended" (Adam):
# tiny uses 4e-3 so that its few steps move every library; cpu-small and digits use 1e-3; the
# GPU presets scale it down for their larger dictionaries (untested guesses: override with --lr).
PRESETS: dict[str, dict] = {
    "tiny": dict(
        d_in=64, d_sae=512, k=8, batch_size=1024, lr=4e-3, rows=16384, val_rows=4096,
        data="planted", n_atoms=512, dtype="float32", l1=2.0,
        libraries=ALL_SAE_LIBS + ["sklearn"], options=dict(sklearn_alpha=1.0),
    ),
    "cpu-small": dict(
        d_in=256, d_sae=4096, k=16, batch_size=4096, lr=1e-3, rows=2**18, val_rows=16384,
        data="planted", n_atoms=4096, dtype="float32", l1=2.0,
        libraries=ALL_SAE_LIBS + ["sklearn"],
        # sklearn needs ~14 s per 4096-row batch at 4096 atoms and ~8 ms per row to encode (OMP).
        # flashsae's recommended CPU precision is bf16 matrix products (fp32 master weights) where the
        # CPU has AVX512-BF16/AMX; the others have no CPU bf16 path worth using and run fp32.
        options=dict(sklearn_alpha=1.0, sklearn_max_rows=16384, sklearn_eval_rows=4096, flashsae_dtype="bfloat16"),
    ),
    "gpu": dict(
        d_in=768, d_sae=32768, k=32, batch_size=16384, lr=5e-4, rows=2**21, val_rows=16384,
        data="planted", n_atoms=32768, dtype="bfloat16", l1=2.0, libraries=ALL_SAE_LIBS, options={},
    ),
    "gpu-large": dict(
        d_in=4096, d_sae=131072, k=64, batch_size=65536, lr=2.5e-4, rows=2**19, val_rows=16384,
        data="planted", n_atoms=131072, dtype="bfloat16", l1=2.0, libraries=ALL_SAE_LIBS, options={},
    ),
    "digits": dict(
        d_in=64, d_sae=256, k=8, batch_size=256, lr=1e-3, rows=2**17, val_rows=None,
        data="digits", dtype="float32", l1=10.0, libraries=["flashsae", "sklearn"],
        # alpha 0.75 gives lasso training codes with L0 near 8 on digits; OMP encodes at exactly k.
        options=dict(sklearn_alpha=0.75, sklearn_max_rows=2**15),
    ),
}
PLANTED_NOISE = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(PRESETS),
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--libraries", help=f"comma-separated subset of {','.join(LIBRARIES)} (default: the preset's)")
    p.add_argument("--rows", type=int, help="training rows (default: the preset's)")
    p.add_argument("--arch", choices=["topk", "relu-l1"], default="topk")
    p.add_argument("--l1", type=float, help="L1 coefficient for --arch relu-l1 (default: the preset's)")
    p.add_argument("--lr", type=float, help="learning rate under 'recommended' (default: the preset's)")
    p.add_argument("--flashsae-dtype", choices=["float32", "bfloat16"],
                   help="flashsae's compute precision under 'recommended' (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-defaults", action="store_true", help="also run each library with its own defaults")
    p.add_argument("--json", metavar="OUT", help="write all results and metadata as JSON")
    p.add_argument("--no-append", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per library run")
    return p.parse_args(argv)


def make_spec(args: argparse.Namespace, preset: dict) -> BenchSpec:
    return BenchSpec(
        arch=args.arch,
        d_in=preset["d_in"],
        d_sae=preset["d_sae"],
        k=preset["k"],
        batch_size=preset["batch_size"],
        lr=args.lr if args.lr is not None else preset["lr"],
        n_train_rows=args.rows if args.rows is not None else preset["rows"],
        l1=args.l1 if args.l1 is not None else preset["l1"],
        device=args.device,
        dtype=preset["dtype"],
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        options={**preset["options"], **({"flashsae_dtype": args.flashsae_dtype} if args.flashsae_dtype else {})},
    )


def make_data(preset: dict, n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(X_train, X_val, description). Digits: a seeded 80/20 split, trained for many epochs."""
    if preset["data"] == "digits":
        X = bench_data.digits()
        perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
        n_val = X.shape[0] // 5
        X_val, X_train = X[perm[:n_val]], X[perm[n_val:]]
        return X_train, X_val, f"sklearn digits, {X_train.shape[0]} train / {n_val} val rows (train cycled)"
    n_val = preset["val_rows"]
    X, _ = bench_data.planted(
        n_train + n_val, preset["d_in"], preset["n_atoms"], preset["k"], PLANTED_NOISE, seed
    )
    desc = (
        f"planted: {preset['n_atoms']} unit gaussian atoms, {preset['k']} active per row, "
        f"coef U(0.5, 2), noise sd {PLANTED_NOISE}; {n_train} train / {n_val} val rows"
    )
    return X[:n_train].contiguous(), X[n_train:].contiguous(), desc


def run_library(name: str, spec: BenchSpec, settings: str, paths: dict, timeout: float) -> BenchResult:
    out = Path(paths["dir"]) / f"{name}-{settings}.json"
    cmd = [
        sys.executable, "-m", "bench.anchors.run_one", "--library", name, "--settings", settings,
        "--spec", json.dumps(spec.to_json()), "--train", paths["train"], "--val", paths["val"], "--out", str(out),
    ]
    env = dict(os.environ, TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return BenchResult.failed(name, settings, f"timed out after {timeout:.0f} s")
    if out.exists():
        with open(out) as f:
            return BenchResult(**json.load(f))
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return BenchResult.failed(name, settings, f"exit code {proc.returncode}: {' | '.join(tail)}"[:500])


def machine_info(device: str) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _nan_to_none(obj):
    """Strict JSON: failed rows carry None where their numbers would be."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _fmt(x: float, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: list[BenchResult], spec: BenchSpec) -> str:
    base = {
        r.settings.split()[0]: r.rows_per_s
        for r in results
        if r.library == "flashsae" and r.error is None
    }
    lines = [
        "| library | settings | rows/s | × flashsae | train s | FVU | L0 | dead % | peak MB | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ref = base.get(r.settings.split()[0])
        ratio = r.rows_per_s / ref if ref and r.error is None else float("nan")
        notes = [r.error] if r.error else []
        if r.extra.get("rows_trained", spec.rows_trained) != spec.rows_trained:
            notes.append(f"trained {r.extra['rows_trained']:,} rows")
        if r.extra.get("eval_rows"):
            notes.append(f"scored on the first {r.extra['eval_rows']:,} val rows")
        note = "; ".join(notes)
        lines.append(
            f"| {r.library} | {r.settings} | {_fmt(r.rows_per_s, ',.0f')} | {_fmt(ratio, '.2f')} | "
            f"{_fmt(r.train_seconds, '.2f')} | {_fmt(r.fvu, '.4f')} | {_fmt(r.l0, '.1f')} | "
            f"{_fmt(100 * r.dead_fraction, '.1f')} | {_fmt(r.peak_mem_mb, ',.0f')} | {note} |"
        )
    return "\n".join(lines)


def markdown_section(meta: dict, spec: BenchSpec, data_desc: str, results: list[BenchResult]) -> str:
    m = meta["machine"]
    hw = f"{m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if "gpu" in m else "")
    sw = ", ".join([f"Python {m['python']}", f"torch {m['torch']}"] + [f"{k} {v}" for k, v in meta["versions"].items()])
    setting = (
        f"{spec.arch}, d_in={spec.d_in}, d_sae={spec.d_sae}, k={spec.k}, batch={spec.batch_size}, "
        f"lr={spec.lr:g}, warmup={spec.warmup_steps}, rows={spec.n_train_rows} ({spec.n_steps} steps), "
        f"dtype={spec.dtype}, device={spec.device}, seed={spec.seed}"
        + (f", l1={spec.l1:g}" if spec.arch == "relu-l1" else "")
    )
    return "\n".join(
        [
            f"## {meta['preset']} on {spec.device}, {meta['date_utc']}",
            "",
            f"- Machine: {hw}",
            f"- Software: {sw}",
            f"- Command: `{meta['command']}`",
            f"- Setting: {setting}",
            f"- Data: {data_desc}",
            "",
            table(results, spec),
            "",
            "rows/s counts training only (after an untimed 2-step warm-up, except sklearn); FVU, L0 and "
            "dead % are measured on held-out rows; × flashsae is the library's rows/s divided by "
            "flashsae's under the same settings. See bench/README.md for what may be unfair.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.compare: error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    names = args.libraries.split(",") if args.libraries else preset["libraries"]
    unknown = [n for n in names if n not in LIBRARIES]
    if unknown:
        print(f"bench.compare: error: unknown libraries {unknown}; choose from {list(LIBRARIES)}", file=sys.stderr)
        return 2

    try:
        spec = make_spec(args, preset)
    except ValueError as exc:
        print(f"bench.compare: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    X_train, X_val, data_desc = make_data(preset, spec.n_train_rows, args.seed)
    assert X_train.shape[1] == spec.d_in, (X_train.shape, spec.d_in)
    print(f"data: {data_desc} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    results: list[BenchResult] = []
    with tempfile.TemporaryDirectory(prefix="flashsae-bench-") as tmp:
        paths = {"dir": tmp, "train": f"{tmp}/train.npy", "val": f"{tmp}/val.npy"}
        np.save(paths["train"], X_train.numpy())
        np.save(paths["val"], X_val.numpy())
        del X_train, X_val
        settings_list = ["recommended"] + (["defaults"] if args.with_defaults else [])
        for name in names:
            for settings in settings_list:
                print(f"[{name} / {settings}] running ...", file=sys.stderr, flush=True)
                r = run_library(name, spec, settings, paths, args.timeout)
                status = r.error or f"{r.rows_per_s:,.0f} rows/s, FVU {r.fvu:.4f}, L0 {r.l0:.1f}"
                print(f"[{name} / {settings}] {status}", file=sys.stderr, flush=True)
                results.append(r)

    meta = {
        "preset": args.preset,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m bench.compare", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(args.device),
        "versions": {DISTS[n]: package_version(DISTS[n]) for n in names},
        "data": data_desc,
    }
    print()
    print(table(results, spec))
    if args.json:
        with open(args.json, "w") as f:
            doc = {"meta": meta, "spec": spec.to_json(), "results": [r.to_json() for r in results]}
            json.dump(_nan_to_none(doc), f, indent=1)
    if not args.no_append:
        path = REPO / "BENCHMARKS.md"
        head = "" if path.exists() else "# Benchmarks\n\nAppended by `python -m bench.compare`; newest last.\n\n"
        with open(path, "a") as f:
            f.write(head + markdown_section(meta, spec, data_desc, results) + "\n")
        print(f"\nappended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
