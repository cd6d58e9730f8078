"""Where a training step's time goes at the `gpu` preset of bench.compare, and whether the host keeps up.

    python -m bench.gpu_probe --device cuda --json probe.json     # d=768, 32768 latents, k=32, 16384 rows, bf16
    python -m bench.gpu_probe --device cpu --smoke               # tiny shapes: checks the script itself

For the step alone (batches already on the device) with AuxK off, on with a few dead latents and on
with half of them dead: milliseconds per step, synchronised around each step and pipelined (steps
queued back to back, one synchronisation at the end), interleaved over --rounds; the host reads
inside one step, counted by a patch of the Python-level reads (Tensor.item, tolist, bool, float,
int, numpy) and on CUDA by `torch.cuda.set_sync_debug_mode("warn")`; the first step's time
(Triton compilation). Then the host data path train() uses: BatchIterator over an in-memory array
alone, and with the pinned copy to the device (`data.device.to_device`), in rows/s against the
step's. Every part respects a deadline (--deadline seconds from the start, or PROBE_DEADLINE, a
time.time() value): a part that would start after it is skipped and says so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
SMOKE = dict(d_in=32, d_sae=256, k=4, batch_size=256, dtype="float32")


def say(*parts) -> None:
    print(*parts, flush=True)


class Deadline:
    def __init__(self, at: float):
        self.at = at

    def left(self) -> float:
        return self.at - time.time()


def shape(smoke: bool) -> dict:
    if smoke:
        return dict(SMOKE)
    from bench.compare import PRESETS

    p = PRESETS["gpu"]
    return {key: p[key] for key in ("d_in", "d_sae", "k", "batch_size", "dtype")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(s: dict, device: torch.device):
    from flashsae import models
    from flashsae.config import TrainConfig
    from flashsae.train.trainer import Trainer

    torch.manual_seed(0)
    with torch.device(device):  # the weights are made on the device (no large CPU randn)
        model = models.build("topk", d_in=s["d_in"], d_sae=s["d_sae"], k=s["k"]).to(device)
    return Trainer(model, TrainConfig(lr=5e-4, dtype=s["dtype"]), total_steps=10**6, dead_after_rows=2**62)


def make_dead(tr, dead, *, refresh: bool = True) -> None:
    """Exactly `dead` dead (None: none): on random rows every latent fires, so they are made dead
    again before each step (device writes, no host read). `refresh`: also count them for AuxK, the
    host read a run makes at each log step, outside the step."""
    tr.rows_since_fired.zero_()
    if dead is not None:
        tr.rows_since_fired[dead] = 2**62
    if refresh:
        tr.refresh_aux()


@contextlib.contextmanager
def counted_reads(counts: dict):
    """Count the Python-level reads of tensor values (each one a host sync on CUDA). `.numpy()` of a CPU
    tensor is not counted: a view, no sync (the CPU kernels sort small key sets with NumPy)."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(self, *a, **k):
            if not (name == "numpy" and self.device.type == "cpu"):
                counts[name] = counts.get(name, 0) + 1
            return originals[name](self, *a, **k)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def host_syncs(tr, x, dead, device: torch.device) -> dict:
    """Host reads inside one step: Python-level reads, and on CUDA the synchronising calls that
    torch's sync debug mode reports."""
    make_dead(tr, dead)
    sync(device)
    reads: dict = {}
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counted_reads(reads):
                tr.step(x)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    messages = sorted({str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()})
    return {"python_reads": sum(reads.values()), "reads_by_kind": reads, "cuda_syncs": len(messages),
            "cuda_sync_messages": messages}


def time_steps(tr, x, dead, steps: int, device: torch.device) -> tuple[float, float]:
    """(median ms of a step synchronised on both sides, ms per step of `steps` queued back to back)."""
    each = []
    for _ in range(steps):
        make_dead(tr, dead)
        sync(device)
        t = time.perf_counter()
        tr.step(x)
        sync(device)
        each.append((time.perf_counter() - t) * 1e3)
    make_dead(tr, dead)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        make_dead(tr, dead, refresh=False)
        tr.step(x)
    sync(device)
    return statistics.median(each), (time.perf_counter() - t) * 1e3 / steps


def feed_rate(s: dict, n_rows: int, device: torch.device, deadline: Deadline) -> dict:
    """Rows/s of train()'s host data path: BatchIterator alone, then with the copy to the device."""
    from flashsae.data.batching import BatchIterator
    from flashsae.data.device import to_device
    from flashsae.data.sources import ArraySource

    X = np.random.default_rng(0).standard_normal((n_rows, s["d_in"]), dtype=np.float32)
    it = BatchIterator(ArraySource(X, "probe rows"), np.arange(n_rows), s["batch_size"], seed=0)
    out = {}
    t = time.perf_counter()
    n = sum(1 for _ in it.epoch(0))
    out["loader_rows_per_s"] = n * s["batch_size"] / (time.perf_counter() - t)
    if deadline.left() > 10:
        t = time.perf_counter()
        n = sum(1 for _ in to_device(it.epoch(1), device))
        sync(device)
        out["feed_rows_per_s"] = n * s["batch_size"] / (time.perf_counter() - t)
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    deadline = Deadline(float(os.environ.get("PROBE_DEADLINE", "inf")) if args.deadline is None
                        else time.time() + args.deadline)
    s = shape(args.smoke)
    result: dict = {"device": str(device), "shape": s, "torch": torch.__version__}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    from flashsae import kernels

    result["kernels"] = kernels.describe(device)
    say(f"== gpu_probe on {result.get('gpu', device)}: {s}; kernels {result['kernels']['kernels']}")
    tr = make_trainer(s, device)
    result["resolved_dtype"] = tr.dtype
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["batch_size"], s["d_in"], device=device, generator=g)
    perm = torch.randperm(s["d_sae"], device=device, generator=g)
    settings = {"off": None, f"{args.few} dead": perm[: args.few], f"{s['d_sae'] // 2} dead": perm[: s["d_sae"] // 2]}
    t = time.perf_counter()
    tr.step(x)  # compiles the Triton kernels for these shapes
    sync(device)
    result["first_step_s"] = time.perf_counter() - t
    for dead in settings.values():  # and the AuxK specialisations
        make_dead(tr, dead)
        tr.step(x)
    sync(device)
    steps = 2 if args.smoke else args.steps
    timed: dict = {name: {"synced_ms": [], "pipelined_ms": []} for name in settings}
    for r in range(args.rounds):
        if deadline.left() < 15:
            say(f"timing: deadline, stopped after {r} rounds")
            break
        for name, dead in settings.items():
            synced, pipelined = time_steps(tr, x, dead, steps, device)
            timed[name]["synced_ms"].append(synced)
            timed[name]["pipelined_ms"].append(pipelined)
    result["steps"] = {}
    for name, dead in settings.items():
        row = {key: statistics.median(v) for key, v in timed[name].items() if v}
        if deadline.left() > 5:
            row.update(host_syncs(tr, x, dead, device))
        result["steps"][name] = row
    base = result["steps"]["off"].get("pipelined_ms")
    for name, row in result["steps"].items():
        if base and "pipelined_ms" in row:
            row["ratio_to_off"] = row["pipelined_ms"] / base
            row["rows_per_s"] = s["batch_size"] / row["pipelined_ms"] * 1e3
        say(f"step, AuxK {name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items() if k != "cuda_sync_messages"))
        for m in row.get("cuda_sync_messages", []):
            say("   sync: " + m)
    if deadline.left() > 20:
        rows = 8 * s["batch_size"] if args.smoke else args.feed_rows
        result["feed"] = feed_rate(s, rows, device, deadline)
        say("host data path: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["feed"].items()))
    else:
        say("host data path: skipped (deadline)")
    return result


def markdown(result: dict) -> str:
    lines = [f"step probe on {result.get('gpu', result['device'])}, shape {result['shape']}, "
             f"dtype {result['resolved_dtype']}, first step {result['first_step_s']:.1f} s",
             "", "| AuxK | ms/step synced | ms/step pipelined | x off | rows/s | Python reads | CUDA syncs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["steps"].items():
        def f(key, fmt="{:.2f}"):
            return fmt.format(row[key]) if key in row else "—"
        lines.append(f"| {name} | {f('synced_ms')} | {f('pipelined_ms')} | {f('ratio_to_off')} | "
                     f"{f('rows_per_s', '{:,.0f}')} | {f('python_reads', '{}')} | {f('cuda_syncs', '{}')} |")
    feed = result.get("feed", {})
    if feed:
        lines += ["", "host data path: " + ", ".join(f"{k} {v:,.0f}" for k, v in feed.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, two steps: a check of this script")
    ap.add_argument("--few", type=int, default=5, help="dead latents of the 'few' setting (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="steps per setting and round (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--feed-rows", type=int, default=2**19, help="rows of the data-path test (default: %(default)s)")
    ap.add_argument("--deadline", type=float, help="seconds from now (default: $PROBE_DEADLINE or none)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the summary table here")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        say("gpu_probe: no CUDA device")
        return 3
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    table = markdown(result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    say(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
