"""Latent sharding: per-rank memory against T under a memory cap, and collective bytes per step.

    python -m bench.tensor_parallel                          # T = 1, 2, 4; d=256, 65,536 latents, cap 400 MiB
    python -m bench.tensor_parallel --d-in 512 --latents 131072 --cap-mib 900 --json /tmp/tp.json

For each T it launches T ranks with torchrun (world = T: one tensor-parallel group), each running
`--worker`: join the group, then cap its own memory growth at `--cap-mib` over its resident size
then (a watchdog thread reads the RSS every 2 ms and stops the rank past the cap, and the kernel's
peak RSS decides at the end; an address-space limit does not work here, since gloo and glibc
reserve far more address space than they touch), then train a TopK SAE on CPU with gloo for `--steps`
steps of `--batch` rows (AuxK off, no evaluation). Each rank reports the bytes of the model state it
holds (parameters and Adam moments, summed over its tensors), the growth of its peak RSS over the
cap's start, and the bytes it handed to each collective of its tensor-parallel group
(`LatentGroup.sent`). The table compares those bytes with docs/distributed.md's formula:

    all_reduce per step = 4 * d * (batch + 1)    (decoder output, b_dec's gradient; fp32)
    all_gather per step = 12 * batch * k          (k candidates per row: fp32 value + int64 id)
    plus 16 bytes at each log step (L0 and dead fraction, the dead count)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

MIB = 2**20


def _vm_bytes(field: str = "VmSize") -> int:
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def worker(args) -> None:
    import torch

    from flashsae import distributed
    from flashsae.train.loop import run_pass
    from flashsae.train.prepare import DataPass
    from flashsae.train.spec import RunSpec
    from flashsae.train.training_run import TrainingRun

    comm = distributed.split(distributed.from_env(120.0), args.tensor_parallel)
    rss0 = _vm_bytes("VmRSS")
    report = {"rank": int(os.environ.get("RANK", 0)), "T": args.tensor_parallel}

    stopping = threading.Lock()

    def over_cap(growth: int) -> None:
        stopping.acquire()  # one report, from whichever thread gets here first; the other waits for the exit
        report.update(fits=False, error=f"resident memory grew by {growth / MIB:.0f} MiB, over the cap")
        os.write(1, (json.dumps(report) + "\n").encode())
        os._exit(3)  # the other ranks see this one's socket close and stop

    def watchdog() -> None:
        while True:
            if _vm_bytes("VmRSS") - rss0 > args.cap_mib * MIB:
                over_cap(_vm_bytes("VmRSS") - rss0)
            time.sleep(0.002)

    threading.Thread(target=watchdog, daemon=True).start()
    options = dict(architecture="topk", d_sae=args.latents, k=args.k, batch_size=args.batch, threads=1,
                   rows=args.batch * args.steps * 4, log_every=args.log_every, eval_every=0, dtype="float32",
                   tensor_parallel=args.tensor_parallel, auxk_coef=0.0, synthetic_rows=4 * args.batch,
                   synthetic_d=args.d_in, synthetic_atoms=256)
    spec = RunSpec.from_options("synthetic", options)
    dpass = DataPass.open("synthetic", spec, comm=comm)
    run = TrainingRun(spec, dpass, threads=1)
    run_pass([run], dpass.batches(), comm=comm, stop_after_steps=args.steps)
    peak = _vm_bytes("VmHWM") - rss0
    if peak > args.cap_mib * MIB:
        over_cap(peak)
    state = list(run.model.parameters()) + [v for s in run.trainer.optimizer.state.values() for v in s.values()
                                            if torch.is_tensor(v) and v.ndim]
    report.update(fits=True, state_bytes=sum(t.numel() * t.element_size() for t in state),
                  peak_rss_growth=peak,
                  sent=dict(comm.tensor.sent), steps=args.steps, log_steps=args.steps // args.log_every)
    os.write(1, (json.dumps(report) + "\n").encode())


def expected(d: int, batch: int, k: int, steps: int, log_steps: int) -> dict:
    """Bytes each rank hands to the group's collectives in `steps` steps (docs/distributed.md)."""
    return {"all_reduce": steps * 4 * d * (batch + 1) + log_steps * 16, "all_gather": steps * 12 * batch * k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--latents", type=int, default=65536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--cap-mib", type=int, default=400, help="resident-memory growth each rank may make (MiB)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tensor-parallel", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    rows = []
    for t in args.ranks:
        flags = [f"--{k}={v}" for k, v in (("d-in", args.d_in), ("latents", args.latents), ("k", args.k),
                                          ("batch", args.batch), ("steps", args.steps),
                                          ("log-every", args.log_every), ("cap-mib", args.cap_mib))]
        cmd = [str(torchrun), "--nproc_per_node", str(t), "-m", "bench.tensor_parallel", "--worker",
               "--tensor-parallel", str(t), *flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode and "fits" not in proc.stdout:
            sys.exit(proc.stderr[-3000:])
        reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        rows.append({"T": t, "rc": proc.returncode, "ranks": reports})
    print(f"TopK d={args.d_in}, {args.latents} latents, k={args.k}, batch {args.batch}, {args.steps} steps, "
          f"cap {args.cap_mib} MiB of resident growth per rank")
    print("| T | fits | state MiB per rank | x T | peak RSS growth MiB | all_reduce B/step | "
          "formula | all_gather B/step | formula |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        r = row["ranks"][0] if row["ranks"] else {"fits": False}
        if not all(x.get("fits") for x in row["ranks"]) or len(row["ranks"]) < row["T"]:
            err = next((x.get("error") for x in row["ranks"] if x.get("error")), f"exit {row['rc']}")
            print(f"| {row['T']} | no: {err} | | | | | | | |")
            continue
        exp = expected(args.d_in, args.batch, args.k, r["steps"], r["log_steps"])
        per = {k: r["sent"].get(k, 0) / r["steps"] for k in ("all_reduce", "all_gather")}
        form = {k: exp[k] / r["steps"] for k in exp}
        print(f"| {row['T']} | yes | {r['state_bytes'] / MIB:.1f} | {r['state_bytes'] * row['T'] / MIB:.1f} | "
              f"{max(x['peak_rss_growth'] for x in row['ranks']) / MIB:.0f} | {per['all_reduce']:,.0f} | "
              f"{form['all_reduce']:,.0f} | {per['all_gather']:,.0f} | {form['all_gather']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
