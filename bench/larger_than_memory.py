"""Train from a .npy file larger than memory with bounded RSS, and compare with the same run from RAM.

    python bench/larger_than_memory.py                    # dry run: a 0.25 GiB file
    python bench/larger_than_memory.py --gib 36           # 1.5x the RAM of a 24 GiB machine
    python bench/larger_than_memory.py --gib 2 --d 256 --latents 512 --encode

Writes DIR/rows.npy (float32 rows drawn from a planted sparse dictionary, generated in 64 MiB
pieces; reused when its size already matches), then runs each measurement in a fresh process
that samples its own memory with psutil every 20 ms:

  file    train on the memory-mapped file: a scan of every row, then --train-rows rows drawn from
          the whole file in shuffled blocks, then evaluation
  ram     the same on the first --ram-rows rows, loaded into memory first (same --train-rows)
  encode  (--encode) `flashsae.codes.encode_to_npz` of every row of the file

and prints a table. RSS counts the file pages a memory map has touched, which the kernel drops
under memory pressure; "anon RSS" (RSS minus file-backed pages) is the memory the process really
holds, and is what must stay bounded. Throughput is training rows per second of the step loop
(scan and evaluation excluded), so file and RAM runs compare like for like.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

GIB = 2**30


def make_file(path: Path, gib: float, d: int, atoms: int, active: int, seed: int = 0) -> int:
    """Create (or reuse) a float32 .npy of about `gib` GiB with rows of width d; return its row count."""
    n_rows = max(1, int(gib * GIB) // (4 * d))
    if path.exists():
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        if mm.shape == (n_rows, d) and mm.dtype == np.float32:
            return n_rows
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, d))
    offset = out.offset
    del out
    # Sequential writes of a pool of 16 distinct 64 MiB blocks (the data repeat every ~1 GiB): generating
    # tens of GiB of fresh random rows through a memory map ran at ~13 MB/s on the shared 2-core VM,
    # and neither the memory bound nor the read throughput depends on the rows being all distinct.
    step = max(1, (64 * 2**20) // (4 * d))
    pool = []
    for _ in range(16):
        idx = rng.integers(0, atoms, size=(step, active))
        coef = rng.uniform(0.5, 2.0, size=(step, active, 1)).astype(np.float32)
        pool.append(((coef * dictionary[idx]).sum(1)
                     + 0.01 * rng.standard_normal((step, d), dtype=np.float32)).astype(np.float32))
    with open(tmp, "r+b") as f:
        f.seek(offset)
        for i, start in enumerate(range(0, n_rows, step)):
            n = min(step, n_rows - start)
            f.write(pool[i % len(pool)][:n].tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n_rows


class MemorySampler:
    """Peak RSS and peak anonymous RSS of this process, sampled in a background thread."""

    def __init__(self, every_s: float = 0.02):
        import psutil

        self._proc = psutil.Process()
        self.every_s = every_s
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        info = self._proc.memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0)  # Linux: shared = file-backed + shmem

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, anon = self.sample()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(args) -> dict:
    """One measurement in this (fresh) process; returns a result row."""
    import torch

    from flashsae import train

    torch.set_num_threads(args.threads)
    path = Path(args.dir) / "rows.npy"
    opts = dict(architecture="topk", d_sae=args.latents, k=args.k, batch_size=args.batch_size, rows=args.train_rows,
                threads=args.threads, val_fraction=args.val_fraction, quiet=True)
    mm = np.load(path, mmap_mode="r", allow_pickle=False)
    data = path
    if args.mode == "ram":
        data = np.array(mm[:args.ram_rows])  # in memory before measuring
    sampler = MemorySampler()
    base_rss, base_anon = sampler.sample()
    t0 = time.perf_counter()
    with sampler:
        if args.mode == "encode":
            from flashsae.codes import encode_to_npz
            from flashsae.data import open_source
            from flashsae.models import build

            model = build("topk", d_in=mm.shape[1], d_sae=args.latents, k=args.k)
            info = encode_to_npz(model, open_source(path), path=Path(args.dir) / "codes.npz")
            rows, rows_per_s = info.shape[0], info.shape[0] / (time.perf_counter() - t0)
        else:
            _, result = train(data, **opts)
            rows, rows_per_s = result.rows_seen, result.rows_per_s
    wall = time.perf_counter() - t0
    n = mm.shape[0] if args.mode != "ram" else args.ram_rows
    return {"mode": args.mode, "rows": int(n), "data_gib": n * mm.shape[1] * 4 / GIB, "rows_trained": int(rows),
            "rows_per_s": rows_per_s, "wall_s": wall, "base_rss_gib": base_rss / GIB,
            "peak_rss_gib": sampler.peak_rss / GIB, "peak_anon_gib": sampler.peak_anon / GIB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=0.25, help="size of the file to train from (default: 0.25)")
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "flashsae-larger-than-memory"),
                   help="where rows.npy (and codes.npz) are written")
    p.add_argument("--d", type=int, default=128, help="row width")
    p.add_argument("--latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--train-rows", type=int, default=None,
                   help="rows trained on in both runs (default: --ram-rows, one pass over the RAM subset)")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--ram-rows", type=int, default=None, help="rows of the in-memory run (default: 1/8 of the file)")
    p.add_argument("--encode", action="store_true", help="also measure streaming encode of the whole file")
    p.add_argument("--repeat", type=int, default=1, help="alternate the RAM and file runs this many times "
                   "(the ratio uses the medians; helps on a shared machine)")
    p.add_argument("--json", default=None, help="also write the result rows to this JSON file")
    p.add_argument("--mode", choices=("file", "ram", "encode"), help=argparse.SUPPRESS)  # worker process
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(worker(args)))
        return 0
    import psutil

    Path(args.dir).mkdir(parents=True, exist_ok=True)
    path = Path(args.dir) / "rows.npy"
    t0 = time.perf_counter()
    n_rows = make_file(path, args.gib, args.d, atoms=4 * args.d, active=8)
    print(f"{path}: {n_rows:,} x {args.d} float32 = {path.stat().st_size / GIB:.2f} GiB "
          f"(ready in {time.perf_counter() - t0:.0f} s); machine RAM {psutil.virtual_memory().total / GIB:.1f} GiB, "
          f"{os.cpu_count()} CPUs", flush=True)
    ram_rows = args.ram_rows or max(args.batch_size * 8, n_rows // 8)
    rows = []
    for mode in ("ram", "file") * args.repeat + (("encode",) if args.encode else ()):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode,
               "--ram-rows", str(ram_rows), "--train-rows", str(args.train_rows or ram_rows)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {mode}: done in {rows[-1]['wall_s']:.0f} s", flush=True)
    print(format_table(rows))
    speed = {m: float(np.median([r["rows_per_s"] for r in rows if r["mode"] == m])) for m in ("ram", "file")}
    file_row = next(r for r in rows if r["mode"] == "file")
    peak_gib = max(r["peak_anon_gib"] for r in rows if r["mode"] == "file")
    print(f"throughput file / RAM (medians): {speed['file'] / speed['ram']:.2f}; peak anon RSS "
          f"{peak_gib:.2f} GiB for a {file_row['data_gib']:.2f} GiB file")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def format_table(rows: list[dict]) -> str:
    head = f"{'mode':<7} {'rows':>12} {'data GiB':>9} {'rows/s':>11} {'wall s':>7} {'base RSS':>9} " \
           f"{'peak RSS':>9} {'peak anon':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<7} {r['rows']:>12,} {r['data_gib']:>9.2f} {r['rows_per_s']:>11,.0f} "
                     f"{r['wall_s']:>7.0f} {r['base_rss_gib']:>9.2f} {r['peak_rss_gib']:>9.2f} "
                     f"{r['peak_anon_gib']:>10.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
