"""flashsae train: fit a sparse autoencoder and write a run directory."""
from __future__ import annotations

import argparse

HELP = "Train a sparse autoencoder on a file, a shard directory or a built-in data set."
EPILOG = """examples:
  flashsae train --out runs/digits                       # TopK SAE on the bundled digits
  flashsae train data.npy --arch relu-l1 --l1 0.1 --latents 4096 --out runs/l1
  flashsae train table.csv --arch topk --k 16 --encoder-hidden 128 --decoder-hidden 128 --out runs/deep
  flashsae train synthetic --synthetic-rows 200000 --latents 1024 --k 4 --out runs/syn
  flashsae train data.npy --out runs/big --checkpoint-every 1000   # later: add --resume
  flashsae train acts/ --latents 4096 --k 32 --out runs/layer6     # a directory from flashsae harvest
  flashsae train --model gpt2 --hook transformer.h.6 --text corpus.jsonl --rows 10000000 --out runs/fly
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="*", default=None,
                   help="file, shard directory, or built-in name: digits (default) or synthetic; several "
                        "paths are read side by side as layers (crosscoders, cross-layer transcoders)")
    p.add_argument("--target", nargs="+", default=argparse.SUPPRESS, metavar="PATH",
                   help="what a transcoder reconstructs: a file or shard directory with the same rows as "
                        "DATA (one per layer for a cross-layer transcoder)")
    p.add_argument("--out", required=True, help="run directory to write (built in OUT.partial, then renamed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT.partial")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                   help="stop after N steps as if interrupted, leaving a checkpoint for --resume")
    p.add_argument("--dist-timeout", type=float, default=60.0, metavar="S",
                   help="under torchrun: seconds a rank waits for the others before failing (default: 60)")
    add_log_flags(p)
    add_option_flags(p)
    add_stream_flags(p)


def add_stream_flags(p: argparse.ArgumentParser) -> None:
    """--model/--hook/--text: capture a transformers model's activations on the fly instead of reading DATA."""
    from flashsae.cli.common import add_dataclass_flags
    from flashsae.lm.stream import StreamConfig

    add_dataclass_flags(p.add_argument_group("activations on the fly (instead of DATA)"), StreamConfig)


def add_log_flags(p) -> None:
    """Extra log sinks: run options that do not change what is trained."""
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to OUT/tensorboard")
    p.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases (needs wandb; WANDB_MODE=offline works without network)")


def add_option_flags(p: argparse.ArgumentParser, wrap=lambda group: group) -> None:
    """Model, data and training flags generated from the config dataclasses (model flags from the registry).

    `wrap(group)` may return a stand-in whose `add_argument` adjusts each flag (flashsae sweep lets
    every option take several values).
    """
    from flashsae.cli.common import add_dataclass_flags, add_model_flags
    from flashsae.config import DataConfig, TrainConfig

    add_model_flags(p, wrap)
    add_dataclass_flags(wrap(p.add_argument_group("data")), DataConfig, skip={"data", "target"})
    add_dataclass_flags(wrap(p.add_argument_group("training")), TrainConfig)


def run(args: argparse.Namespace) -> int:
    from flashsae import distributed
    from flashsae.cli.common import format_metrics, print_json
    from flashsae.train.api import train

    skip = {"data", "out", "overwrite", "resume", "quiet", "json", "tensorboard", "wandb", "dist_timeout", "command",
            "subcommand", "stop_after_steps"}
    options = {k: v for k, v in vars(args).items() if k not in skip}
    data = args.data[0] if len(args.data or []) == 1 else (args.data or None)
    _, result = train(data, out=args.out, overwrite=args.overwrite, resume=args.resume,
                      quiet=args.quiet or args.json, tensorboard=args.tensorboard, wandb=args.wandb,
                      dist_timeout=args.dist_timeout, stop_after_steps=args.stop_after_steps, **options)
    if not distributed.is_main():
        return 0
    if result.interrupted:
        print(f"stopped at step {result.steps}; continue with: flashsae train ... --out {args.out} --resume")
        return 0
    if args.json:
        print_json({"run_dir": str(result.run_dir), "metrics": result.metrics})
    elif not args.quiet:
        print(format_metrics(result.metrics))
    return 0
