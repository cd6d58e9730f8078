"""Many SAEs on one data pass (`train_many`, what `flashsae sweep` runs) against one `train()` per model.

    python -m bench.sweep_one_pass                                  # 8 TopK SAEs, d=64, 2M rows each
    python -m bench.sweep_one_pass --rows 262144 --threads 1        # smaller, one thread
    python -m bench.sweep_one_pass --rows 262144 --profile          # where a separate run spends its time
    python -m bench.sweep_one_pass --rows 262144 --workers 1        # one model stepped at a time
    python -m bench.sweep_one_pass --processes                      # 8 x `flashsae train` vs `flashsae sweep`

The models are TopK with k in --k times latents in --latents on planted synthetic rows (d=--d)
written once to a .npy file that both sides read. Both sides write full run directories (model,
config, metrics, log, curves.png) unless --no-files. Imports, matplotlib and the OpenMP pool are
warmed by a tiny run first, so neither side pays them. Reported per side: wall time end to end,
the training loops alone (the sum of the models' train_seconds: steps, batch reading and
standardisation; no evaluation, plots or writes), the rest (fixed costs), and whether the models
came out bit-identical. With --processes the two sides are instead what a user types: one
`flashsae train` command per model, one after another, against one `flashsae sweep` command (each
process pays its own start-up: Python, torch and flashsae imports).
"""
from __future__ import annotations

import argparse
import cProfile
import io as _io
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _configs(args) -> list[dict]:
    common = {"rows": args.rows, "batch_size": args.batch_size, "device": "cpu", "seed": 0}
    if args.threads is not None:
        common["threads"] = args.threads
    return [{"k": k, "d_sae": n, **common} for k in args.k for n in args.latents]


def _name(cfg: dict) -> str:
    return f"k-{cfg['k']}_latents-{cfg['d_sae']}"


def _separate(data: str, configs: list[dict], out: Path | None) -> tuple[float, list]:
    from flashsae.train.api import train

    t = time.perf_counter()
    trained = [train(data, out=None if out is None else out / _name(c), quiet=True, **c) for c in configs]
    return time.perf_counter() - t, trained


def _one_pass(data: str, configs: list[dict], out: Path | None, workers: int | None = None) -> tuple[float, list]:
    from flashsae.train.api import train_many

    t = time.perf_counter()
    trained = train_many(data, configs, outs=None if out is None else [out / _name(c) for c in configs], quiet=True,
                         workers=workers)
    return time.perf_counter() - t, trained


def _cli(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flashsae", *args, "--quiet"], check=True)
    return time.perf_counter() - t


def _processes(data: str, args, tmp: Path) -> None:
    """One `flashsae train` process per model against one `flashsae sweep` process, alternated."""
    common = ["--rows", str(args.rows), "--batch-size", str(args.batch_size), "--device", "cpu", "--seed", "0"]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    sep, one = [], []
    for i in range(args.repeat):
        for side in (("sep", "one") if i % 2 == 0 else ("one", "sep")):
            if side == "sep":
                sep.append(sum(_cli(["train", data, "--k", str(k), "--latents", str(n), *common,
                                     "--out", str(tmp / f"cli-sep-{i}" / f"k{k}-n{n}")])
                               for k in args.k for n in args.latents))
            else:
                one.append(_cli(["sweep", data, "--k", *map(str, args.k), "--latents", *map(str, args.latents),
                                 *common, "--out", str(tmp / f"cli-one-{i}")]))
    n = len(args.k) * len(args.latents)
    print(f"{n} TopK SAEs (k {args.k} x latents {args.latents}), d={args.d}, {args.rows:,} rows each, "
          f"batch {args.batch_size}, threads={args.threads or 'auto'}, fastest of {args.repeat}")
    print(f"| | {n} x `flashsae train` | `flashsae sweep` | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| end to end (processes) | {min(sep):.1f} s | {min(one):.1f} s | {min(sep) / min(one):.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"separate_processes_s": sep, "sweep_process_s": one}, indent=2))


def _identical(a: list, b: list) -> bool:
    return all(all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
               for (ma, _), (mb, _) in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=64, help="row width")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--latents", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--rows", type=int, default=2_000_000, help="training rows per model")
    ap.add_argument("--data-rows", type=int, default=200_000, help="rows in the synthetic data set")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: flashsae's choice)")
    ap.add_argument("--no-files", action="store_true", help="keep the models in memory (no run directories)")
    ap.add_argument("--workers", type=int, default=None,
                    help="train_many(workers=...): models stepped at once (default: flashsae's choice)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each side this many times, alternating which goes first; report the fastest")
    ap.add_argument("--profile", action="store_true", help="profile one separate run and print its top costs")
    ap.add_argument("--processes", action="store_true",
                    help="time CLI processes: one `flashsae train` per model against one `flashsae sweep`")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    from flashsae.data import make_synthetic

    configs = _configs(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x, _ = make_synthetic(rows=args.data_rows, d=args.d, atoms=512, active=4, noise=0.01, seed=0)
        data = str(tmp / "rows.npy")
        np.save(data, np.asarray(x, np.float32))
        if args.processes:
            _cli(["train", data, "--k", "4", "--rows", str(2 * args.batch_size), "--out", str(tmp / "warm")])
            _processes(data, args, tmp)
            return
        # Warm imports, matplotlib and the thread pool on a tiny run of each kind.
        warm = [{**c, "rows": 2 * args.batch_size} for c in configs[:2]]
        _separate(data, warm, None if args.no_files else tmp / "warm-sep")
        _one_pass(data, warm, None if args.no_files else tmp / "warm-one")

        timings: dict[str, list] = {"sep": [], "one": []}
        for i in range(args.repeat):
            for side in (("sep", "one") if i % 2 == 0 else ("one", "sep")):
                out = None if args.no_files else tmp / f"{side}-{i}"
                wall, trained = _separate(data, configs, out) if side == "sep" else \
                    _one_pass(data, configs, out, args.workers)
                timings[side].append((wall, sum(r.train_seconds for _, r in trained), trained))
        (wall_sep, loop_sep, sep), (wall_one, loop_one, one) = (min(timings[s], key=lambda t: t[0])
                                                                for s in ("sep", "one"))
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            _separate(data, configs[-1:], None if args.no_files else tmp / "profiled")
            prof.disable()

    steps = sep[0][1].steps
    print(f"{len(configs)} TopK SAEs (k {args.k} x latents {args.latents}), d={args.d}, {args.rows:,} rows each "
          f"= {steps} steps of {args.batch_size}, threads={args.threads or 'auto'} (last: {torch.get_num_threads()}), "
          f"workers={args.workers or 'auto'}, files={'no' if args.no_files else 'yes'}, fastest of {args.repeat}")
    print(f"| | {len(configs)} x train() | train_many (one pass) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| end to end | {wall_sep:.1f} s | {wall_one:.1f} s | {wall_sep / wall_one:.2f}x |")
    print(f"| training loops | {loop_sep:.1f} s | {loop_one:.1f} s | {loop_sep / loop_one:.2f}x |")
    print(f"| rest (scan, init, eval, plots, writes) | {wall_sep - loop_sep:.1f} s | {wall_one - loop_one:.1f} s | "
          f"{(wall_sep - loop_sep) / max(wall_one - loop_one, 1e-9):.2f}x |")
    print(f"models bit-identical: {'yes' if _identical(sep, one) else 'no'}")
    print("per model, separate: " + ", ".join(f"{_name(c)} {r.train_seconds:.1f}/{r.metrics['fvu']:.3f}"
                                               for c, (_, r) in zip(configs, sep)) + "  (loop s / FVU)")
    if args.profile:
        s = _io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
        print(s.getvalue())
    if args.json:
        Path(args.json).write_text(json.dumps({
            "configs": configs, "threads": args.threads, "workers": args.workers, "steps": steps,
            "separate": {"wall_s": wall_sep, "loop_s": loop_sep}, "one_pass": {"wall_s": wall_one, "loop_s": loop_one},
            "identical": _identical(sep, one)}, indent=2))


if __name__ == "__main__":
    main()
