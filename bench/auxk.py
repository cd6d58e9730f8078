"""What AuxK adds to a training step: step time with AuxK off, on with a few dead latents, on with half.

    python -m bench.auxk                                  # d=256, 4096 latents, k=16, batch 4096; and a small shape
    python -m bench.auxk --shapes 256x4096x16x4096 --repeat 5 --steps 8
    python -m bench.auxk --device cuda --shapes 768x32768x32x16384

A shape is d x latents x k x batch. For every shape the three settings are timed side by side in
one process, interleaved (off, few, half, off, few, half, ...) `--repeat` times, and the table gives
the median ms per step of each and its ratio to AuxK off. Before every timed step the chosen
latents are made dead again and the trainer's AuxK switch is refreshed (the refresh a run does at
each log step), both outside the timed region: on random rows every latent fires, so the dead ones
would otherwise revive after one step. k_aux is the model's default, d_in / 2.

`--clock cpu` times the process's CPU time instead of the wall clock: on a machine shared with
other jobs a step that is descheduled then costs nothing extra, so with `--threads 1` it is the
steadier figure (with more threads it also counts OpenMP's spinning). On CUDA the wall clock is
used, after a synchronisation on each side of the step.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def parse_shape(text: str) -> tuple[int, int, int, int]:
    d, n, k, batch = (int(v) for v in text.lower().split("x"))
    return d, n, k, batch


def make(d: int, n: int, k: int, dtype: str, device: torch.device):
    from flashsae import models
    from flashsae.config import TrainConfig
    from flashsae.train.trainer import Trainer

    torch.manual_seed(0)
    with torch.device(device):
        model = models.build("topk", d_in=d, d_sae=n, k=k).to(device)
    return Trainer(model, TrainConfig(lr=1e-4, dtype=dtype), total_steps=10**6, dead_after_rows=2**62)


def make_dead(tr, dead: torch.Tensor | None) -> None:
    """Exactly `dead` dead for the next step (None: none), and the AuxK switch refreshed."""
    tr.rows_since_fired.zero_()
    if dead is not None:
        tr.rows_since_fired[dead] = 2**62
    tr.refresh_aux()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_setting(tr, x, dead, steps: int, device: torch.device, clock=time.perf_counter) -> list[float]:
    out = []
    for _ in range(steps):
        make_dead(tr, dead)
        sync(device)
        t = clock()
        tr.step(x)
        sync(device)
        out.append((clock() - t) * 1e3)
    return out


def run_shape(shape, args, device: torch.device) -> list[dict]:
    d, n, k, batch = shape
    tr = make(d, n, k, args.dtype, device)
    x = torch.randn(batch, d, device=device)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(n, generator=g).to(device)
    settings = [("off", None), (f"{args.few} dead", perm[: args.few]), (f"{n // 2} dead (half)", perm[: n // 2])]
    for _, dead in settings:  # warm-up: thread pools, workspaces, compiled kernels
        time_setting(tr, x, dead, 2, device)
    times: dict[str, list[float]] = {name: [] for name, _ in settings}
    for _ in range(args.repeat):
        for name, dead in settings:
            times[name].append(statistics.median(time_setting(tr, x, dead, args.steps, device, args.clock_fn)))
    base = statistics.median(times["off"])
    rows = []
    for name, _ in settings:
        ms = statistics.median(times[name])
        per_repeat = [t / b for t, b in zip(times[name], times["off"])]
        rows.append(dict(shape=f"{d}x{n}x{k}x{batch}", setting=name, ms=ms, ratio=ms / base,
                         ratio_range=(min(per_repeat), max(per_repeat))))
    return rows, tr


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="256x4096x16x4096,64x512x8x1024",
                    help="comma-separated d x latents x k x batch (default: %(default)s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="TrainConfig.dtype (default: %(default)s)")
    ap.add_argument("--few", type=int, default=5, help="dead latents of the 'few' setting (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting and repeat (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock, or the process's CPU time (default: %(default)s)")
    args = ap.parse_args(argv)
    args.clock_fn = time.process_time if args.clock == "cpu" and args.device == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = "CPU time" if args.clock_fn is time.process_time else "wall clock"
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}, {clock}, median of {args.steps} steps x {args.repeat} rounds")
    print("| shape d x n x k x batch | AuxK | dtype | ms/step (median) | ratio to off | per-round ratios |")
    print("|---|---|---|---:|---:|---|")
    for text in args.shapes.split(","):
        rows, tr = run_shape(parse_shape(text), args, device)
        for r in rows:
            lo, hi = r["ratio_range"]
            print(f"| {r['shape']} | {r['setting']} | {tr.dtype} | {r['ms']:.1f} | {r['ratio']:.2f} "
                  f"| {lo:.2f}-{hi:.2f} |", flush=True)


if __name__ == "__main__":
    main()
