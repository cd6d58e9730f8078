"""The host feed: rows/s and GB/s of the batches `train()` reads, against plain copies on this machine.

Three things are timed side by side, round after round, over the same in-memory rows:

- copy: consecutive slices of the rows copied into one reused buffer (what memory bandwidth allows);
- gather: shuffled rows gathered into one reused buffer (`np.take(..., out=)`, the floor of a
  shuffled feed that writes every row once);
- feed: the batches of one epoch of `DataPass.batches()`, the BatchSource the training loop reads
  (shuffle, read-ahead thread, the hand-over to the device), with standardisation off so that only
  the feed is timed, nothing done to the batches.

GB/s counts the float32 bytes of the rows delivered (batch x d_in x 4 per batch). With
`--dtype bfloat16` the rows are stored as bf16 (a safetensors file, as `flashsae harvest --dtype
bfloat16` writes) and the feed widens them on the device; copy and gather then move the bf16 bits.

    python -m bench.feed                          # d=768, 16,384-row batches, 2^19 rows
    python -m bench.feed --d 256 --batch 4096
    python -m bench.feed --dtype bfloat16
    python -m bench.feed --gather-threads 2       # each batch gathered on two threads, as off the CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _bf16_file(x: np.ndarray, folder: str) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / "rows.safetensors"
    save_file({"activations": torch.from_numpy(x).to(torch.bfloat16)}, str(path))
    return path


def measure(args) -> dict:
    from flashsae.train.prepare import DataPass
    from flashsae.train.spec import RunSpec

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.d), dtype=np.float32)
    folder = tempfile.mkdtemp(prefix="flashsae-feed-")
    data = x if args.dtype == "float32" else _bf16_file(x, folder)
    stored = x if args.dtype == "float32" else (x.view(np.uint32) >> 16).astype(np.uint16)
    spec = RunSpec.from_options(data, {"batch_size": args.batch, "standardize": "none", "val_fraction": 0.0,
                                       "device": args.device, "seed": 0})
    dpass = DataPass.open(data, spec)
    source = dpass.batches()
    if args.gather_threads is not None:  # the CPU feed gathers on one thread; a GPU host's on several
        for it in source.inner.iterators.values():
            it.gather_threads = args.gather_threads
    n_batches = source.batches_per_epoch()
    bs, d = args.batch, args.d
    buf = np.empty((bs, d), stored.dtype)
    ids = rng.permutation(args.rows)[:n_batches * bs].reshape(n_batches, bs)
    device = torch.device(args.device)

    def copy():
        for i in range(n_batches):
            np.copyto(buf, stored[i * bs:(i + 1) * bs])

    def gather():
        for i in range(n_batches):
            np.take(stored, ids[i], axis=0, out=buf, mode="clip")

    epoch = [0]

    def feed():
        n = 0
        for batch in source.epoch(epoch[0]):
            n += batch["x"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch[0] += 1
        assert n == n_batches * bs

    times: dict[str, list[float]] = {"copy": [], "gather": [], "feed": []}
    for fn in (copy, gather, feed):  # warm-up: first touch of the rows and of every buffer
        fn()
    for _ in range(args.repeat):
        for name, fn in (("copy", copy), ("gather", gather), ("feed", feed)):
            times[name].append(_time(fn))
    dpass.close()
    rows = n_batches * bs
    out = {"d_in": d, "batch": bs, "rows": rows, "dtype": args.dtype, "device": str(device),
           "threads": torch.get_num_threads(), "repeat": args.repeat,
           # older versions had no gather threads
           "gather_threads": getattr(next(iter(source.inner.iterators.values())), "gather_threads", 1)}
    for name, ts in times.items():
        t = statistics.median(ts)
        out[name] = {"rows_per_s": rows / t, "gb_per_s": rows * d * 4 / t / 1e9,
                     "each_s": [round(v, 4) for v in ts]}
    out["feed_vs_copy"] = out["feed"]["rows_per_s"] / out["copy"]["rows_per_s"]
    out["feed_vs_gather"] = out["feed"]["rows_per_s"] / out["gather"]["rows_per_s"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--rows", type=int, default=2**19)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gather-threads", type=int, default=None,
                   help="threads gathering each batch (default: what train() uses on --device)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    out = measure(args)
    print(f"feed d={out['d_in']} batch={out['batch']} rows/epoch={out['rows']} stored {out['dtype']} "
          f"device {out['device']}, {out['threads']} threads, {out['gather_threads']} gather threads, "
          f"median of {out['repeat']}")
    for name in ("copy", "gather", "feed"):
        r = out[name]
        print(f"  {name:6s} {r['rows_per_s'] / 1e6:8.3f} M rows/s  {r['gb_per_s']:7.2f} GB/s  {r['each_s']}")
    print(f"  feed / copy {out['feed_vs_copy']:.2f}   feed / gather {out['feed_vs_gather']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
