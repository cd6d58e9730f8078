"""flashsae evaluate: metrics of a trained model on any data of the right width.

On the data the run was trained on it scores the run's held-out rows unless told otherwise
(`--rows all`): the split is recomputed exactly as training made it, from the run's config.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported on use: `flashsae --help` imports every subcommand module
    import numpy as np

HELP = "Evaluate a trained model on data (MSE, FVU, L0, dead and dense latents) and save the metrics."
EPILOG = """examples:
  flashsae evaluate runs/digits digits             # the training data: its held-out rows
  flashsae evaluate runs/digits digits --rows all  # every row, training rows included
  flashsae evaluate runs/emb heldout.npy --out heldout_metrics.json --json
  flashsae evaluate runs/layer6 --model gpt2 --hook transformer.h.6 --text corpus.jsonl --positions 8192
                                          # spliced into the model: loss recovered, KL (or hidden-state cosine)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("data", nargs="?", default=None,
                   help="file, shard directory or built-in name (optional with --text)")
    p.add_argument("--key", default=None, help="array name inside a .npz or .safetensors file")
    p.add_argument("--drop-nonfinite", action="store_true", help="skip rows containing NaN or Inf")
    p.add_argument("--rows", type=_rows_flag, default=None, metavar="WHICH",
                   help="rows of DATA to score: all or held-out (default: held-out when DATA is the data the run "
                        "was trained on, with the same rows, width and fingerprint; else all)")
    p.add_argument("--out", default=None, help="where to save the metrics (default: RUN_DIR/evaluation.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="refine the values of the latents the encoder chose by STEPS projected gradient steps "
                        "on the reconstruction error (one-layer SAEs; default: 0, the encoder's own codes)")
    add_downstream_flags(p)


def add_downstream_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("downstream: splice the SAE into a transformers model (flashsae.lm.downstream)")
    g.add_argument("--model", default=None, help="model directory or cached name (default: the one the run's "
                   "activations came from, when recorded)")
    g.add_argument("--hook", nargs="+", default=None, metavar="MODULE",
                   help="module name as in model.named_modules(); several for a crosscoder's layers "
                        "(default: as recorded)")
    g.add_argument("--target-hook", nargs="+", default=None, metavar="MODULE",
                   help="for a transcoder: the module(s) whose output it replaces (default: as recorded)")
    g.add_argument("--text", default=None, help="corpus to evaluate on: .txt, .jsonl, .parquet, a folder or a "
                   "saved datasets directory")
    g.add_argument("--positions", type=int, default=None, metavar="N",
                   help="token positions to evaluate (default: 4096; --rows N is the older spelling)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per context (default: as recorded, else 128)")
    g.add_argument("--lm-batch", type=int, default=8, metavar="N", help="contexts per forward pass (default: 8)")
    g.add_argument("--skip-contexts", type=int, default=None, metavar="N",
                   help="skip this many contexts first (default: those the run's harvest used, on the same corpus)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")


ROW_CHOICES = ("all", "held-out")


def _rows_flag(value: str) -> str | int:
    """--rows: all or held-out; a number is the older spelling of --positions."""
    if value in ROW_CHOICES:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all or held-out, got {value!r}") from None


def training_split(cfg: dict, source, row_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(train_ids, val_ids) of `source` as training split it, or None when it is not the run's training data.

    The training data is recognised by its rows, width and fingerprint (config.json's data_stats);
    the split is `split_rows` with the run's val_fraction and seed and the non-finite rows the scan
    found (`row_ids`: the finite rows, None for all), as the data pass made it.
    """
    import numpy as np

    from flashsae.data import split_rows
    from flashsae.train.checkpoint import fingerprint

    stats = cfg.get("data_stats") or {}
    if (stats.get("n_rows"), stats.get("d_in")) != (source.n_rows, source.d_in):
        return None
    if stats.get("fingerprint") is None or stats["fingerprint"] != fingerprint(source):
        return None
    bad = np.zeros(0, np.int64) if row_ids is None else np.setdiff1d(np.arange(source.n_rows), row_ids)
    val_fraction = (cfg.get("data") or {}).get("val_fraction", 0.1)
    return split_rows(source.n_rows, bad, val_fraction=val_fraction, seed=(cfg.get("train") or {}).get("seed", 0))


def choose_rows(cfg: dict, run_dir, source, row_ids: np.ndarray | None, wanted: str | None):
    """The rows to score (ids, or None for every row) and how to name them, as (row_ids, "... rows ...").

    `wanted`: "all", "held-out" or None (held-out on the run's training data, else all).
    """
    from flashsae.errors import ConfigError

    stats = cfg.get("data_stats") or {}
    n = source.n_rows if row_ids is None else len(row_ids)
    split = training_split(cfg, source, row_ids)
    if split is None:
        if wanted == "held-out":
            raise ConfigError(f"--rows held-out: {source.name} ({source.n_rows} rows x {source.d_in} columns) is "
                              f"not the data {run_dir} was trained on ({stats.get('source')}, {stats.get('n_rows')} "
                              f"rows x {stats.get('d_in')} columns), so none of it was held out; use --rows all")
        skipped = source.n_rows - n
        return row_ids, f"all {n} rows" + (f" ({skipped} with NaN or Inf skipped)" if skipped else "")
    val_ids = split[1]
    # the same rows split otherwise in training (a second stream's non-finite rows, say) cannot be recomputed
    same_split = (len(split[0]), len(val_ids)) == (stats.get("n_train"), stats.get("n_val"))
    if wanted == "all" or (wanted is None and not (same_split and len(val_ids))):
        return row_ids, f"all {n} rows of the training data (training rows included)"
    if not same_split:
        raise ConfigError(f"--rows held-out: {source.name} is the data {run_dir} was trained on, but its split "
                          f"({stats.get('n_train')} training, {stats.get('n_val')} held-out rows) cannot be "
                          "recomputed from these rows alone; use --rows all")
    if len(val_ids) == 0:
        raise ConfigError(f"--rows held-out: {run_dir} held out none of {source.name} (val_fraction 0); "
                          "use --rows all")
    return val_ids, f"held-out rows of the training data ({len(val_ids)})"


def run(args: argparse.Namespace) -> int:
    from flashsae import io
    from flashsae.cli.common import format_metrics, print_json
    from flashsae.codes import open_for_model
    from flashsae.errors import ConfigError
    from flashsae.eval.evaluate import evaluate

    model = io.load(args.run_dir)
    show = not (args.quiet or args.json)
    if args.data is None and args.text is None:
        raise ConfigError("give DATA, or --text (with --model/--hook) to evaluate spliced into the model")
    wanted = args.rows if isinstance(args.rows, str) else None
    positions = args.positions or (args.rows if isinstance(args.rows, int) else 4096)
    if wanted is not None and args.data is None:
        raise ConfigError(f"--rows {wanted} chooses the rows of DATA; give DATA (--positions N counts the token "
                          "positions of --text)")
    if isinstance(args.rows, int) and args.text is None:
        raise ConfigError(f"--rows takes all or held-out, got {args.rows} (--positions N counts the token "
                          "positions of --text)")
    metrics = {}
    if args.data is not None:
        source, row_ids = open_for_model(model, args.data, key=args.key, drop_nonfinite=args.drop_nonfinite,
                                         progress=show)
        row_ids, scored = choose_rows(io.read_config(args.run_dir), args.run_dir, source, row_ids, wanted)
        scores = evaluate(model, source, row_ids, progress=show, refine=args.refine)
        metrics = {"data": source.name, "evaluated_on": scored, **scores}
    if args.text is not None:
        from flashsae.lm.downstream import evaluate_downstream

        metrics["downstream"] = evaluate_downstream(
            model, text=args.text, model=args.model, hook=_one_or_list(args.hook),
            target_hook=_one_or_list(args.target_hook),
            rows=positions, context=args.context,
            batch=args.lm_batch, skip_contexts=args.skip_contexts, device=args.device, run_dir=args.run_dir,
            progress=show)
    out = Path(args.out) if args.out else Path(args.run_dir) / "evaluation.json"
    io.write_json(out, metrics)
    if args.json:
        print_json(metrics)
    elif not args.quiet:
        down = metrics.pop("downstream", None)
        if metrics:
            shown = {k: v for k, v in metrics.items() if k not in ("data", "evaluated_on")}
            print(f"{metrics['data']}, {metrics['evaluated_on']}:\n{format_metrics(shown)}")
        if down is not None:
            print(f"spliced into {down['model']} at {down['hook']}:\n{format_metrics(down)}")
        print(f"saved to {out}")
    return 0


def _one_or_list(names: list[str] | None):
    """A flag's module names: one name as a str, several as a list, none as None."""
    return names[0] if names and len(names) == 1 else names
