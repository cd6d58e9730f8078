"""Run one library on one setting in this process and write its BenchResult as JSON.

bench.compare starts this as a subprocess per library, so peak memory, thread pools and global
torch state (TF32, autocast, seeds) never leak between libraries and a crash stays contained.

    python -m bench.anchors.run_one --library saelens --spec '{"arch": "topk", ...}' \
        --train train.npy --val val.npy --out result.json [--settings recommended|defaults]
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

import numpy as np
import torch

from bench.anchors import common, load
from bench.anchors.common import BenchResult, BenchSpec


def hide_broken_torchvision() -> None:
    """A torchvision wheel built for another torch fails at import and takes `import transformers`
    (which every SAE library imports) down with it; nothing on the benchmark's path needs it, so
    make it look absent."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.anchors.run_one")
    p.add_argument("--library", required=True)
    p.add_argument("--spec", required=True, help="BenchSpec as JSON")
    p.add_argument("--settings", default="recommended", choices=["recommended", "defaults"])
    p.add_argument("--train", required=True, help=".npy with the training rows (float32)")
    p.add_argument("--val", required=True, help=".npy with the held-out rows (float32)")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--truth", help=".npz with the held-out rows' planted codes and atoms (bench.quality)")
    args = p.parse_args(argv)

    hide_broken_torchvision()
    spec = BenchSpec.from_json(json.loads(args.spec))
    common.set_threads()
    torch.manual_seed(spec.seed)
    if args.truth:
        truth = np.load(args.truth)
        common.TRUTH.update(codes=torch.from_numpy(truth["codes"]), atoms=torch.from_numpy(truth["atoms"]))
    try:
        mod = load(args.library)
        if not mod.available():
            result = BenchResult.failed(args.library, args.settings, "unavailable: library does not import")
        else:
            X_train = torch.from_numpy(np.load(args.train))
            X_val = torch.from_numpy(np.load(args.val))
            result = mod.run(spec, X_train, X_val, settings=args.settings)
    except Exception as exc:  # a crashing library gives an error row, never kills the run
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        result = BenchResult.failed(args.library, args.settings, f"{type(exc).__name__}: {exc}"[:500])
        result.extra["traceback_tail"] = tb[-2000:]
    with open(args.out, "w") as f:
        json.dump(result.to_json(), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
