"""flashsae info: what a run directory holds, trained here or imported (only what is known is shown)."""
from __future__ import annotations

import argparse

HELP = "Show a trained model's architecture, sizes, data statistics and metrics."
EPILOG = """examples:
  flashsae info runs/digits
  flashsae info runs/imported --json
"""

SIZE_FIELDS = ("d_in", "d_sae", "encoder_hidden", "decoder_hidden")
IMPORTED_FROM = {"saelens": "SAELens", "sparsify": "sparsify"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train or flashsae import")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing; the exit status says whether RUN_DIR loads")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flashsae import io
    from flashsae.cli.common import format_metrics, load_run, print_json

    model = load_run(args.run_dir)
    cfg = model.run_config
    metrics_path = Path(args.run_dir) / io.METRICS_FILE
    metrics = io.read_json(metrics_path) if metrics_path.exists() else {}
    n_params = sum(p.numel() for p in model.parameters())
    if args.json:
        print_json({"config": cfg, "metrics": metrics, "parameters": n_params})
        return 0
    if args.quiet:
        return 0
    version = cfg.get("library_version")
    made = "imported by" if (cfg.get("data_stats") or {}).get("imported") else "trained by"
    print(f"{args.run_dir}: {cfg['architecture']} sparse autoencoder"
          + (f", {made} flashsae {version}" if version else ""))
    for label, text in summary_lines(cfg, n_params):
        print(f"  {label:<12} {text}")
    if metrics:
        print("  metrics\n" + format_metrics(metrics).replace("\n  ", "\n    ").replace("  ", "    ", 1))
    return 0


def summary_lines(cfg: dict, n_params: int) -> list[tuple[str, str]]:
    """(label, text) lines of a run's config.json, each saying only what is recorded."""
    m = cfg["model"]
    sizes = [f"d_in {m['d_in']}", f"latents {m['d_sae']}"]
    sizes += [f"{name.replace('_', ' ')} {' '.join(map(str, m[name]))}" for name in ("encoder_hidden", "decoder_hidden")
              if m.get(name)]
    lines = [("sizes", ", ".join(sizes + [f"{n_params:,} parameters"]))]
    options = [_option(k, v) for k, v in m.items() if k not in SIZE_FIELDS and v is not None]
    if options:
        lines.append(("options", ", ".join(options)))
    stats = cfg.get("data_stats") or {}
    imported = stats.get("imported")
    if imported:
        lines.append(("imported", _imported(imported)))
    elif stats:
        lines.append(("data", _data(stats)))
    mode = (cfg.get("preprocess") or {}).get("mode")
    if mode:
        lines.append(("standardise", mode + (" (encodes raw rows, as the source library did)"
                                             if imported and mode == "none" else "")))
    training = None if imported else _training(cfg.get("resolved") or {}, cfg.get("train") or {})
    if training:
        lines.append(("training", training))
    return lines


def _option(name: str, value) -> str:
    """A model option as its flag: `--k 4`, `--normalize-decoder`, `--no-normalize-decoder`."""
    from flashsae.cli.common import FLAG_NAMES

    flag = FLAG_NAMES.get(name, name).replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    if isinstance(value, (list, tuple)):
        return f"--{flag} {' '.join(map(str, value))}"
    return f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}"


def _imported(imported: dict) -> str:
    fmt = imported.get("format")
    text = f"from {IMPORTED_FROM.get(fmt, fmt)}" if fmt else "from another library"
    if imported.get("architecture"):
        text += f" (architecture {imported['architecture']})"
    if imported.get("path"):
        text += f", {imported['path']}"
    where = [f"model {imported['model_name']}" if imported.get("model_name") else None,
             f"hook {imported['hook_name']}" if imported.get("hook_name") else None]
    where = [w for w in where if w]
    return text + (f"; trained on {', '.join(where)}" if where else "")


def _data(stats: dict) -> str:
    text = str(stats.get("source") or "unknown source")
    counts = [f"{stats[key]:,} {label}" for key, label in (("n_train", "train"), ("n_val", "held out"))
              if isinstance(stats.get(key), int)]
    if stats.get("nonfinite_dropped"):
        counts.append(f"{stats['nonfinite_dropped']:,} dropped")
    if isinstance(stats.get("n_rows"), int):
        text += f": {stats['n_rows']:,} rows" + (f" ({', '.join(counts)})" if counts else "")
    return text


def _training(resolved: dict, train: dict) -> str | None:
    parts = []
    if resolved.get("batch_size"):
        parts.append(f"batch {resolved['batch_size']}")
    if resolved.get("total_steps"):
        parts.append(f"{resolved['total_steps']:,} steps")
    if resolved.get("lr"):
        parts.append(f"lr {resolved['lr']:.3g}")
    if not parts:
        return None
    parts += [str(train["optimizer"])] if train.get("optimizer") else []
    parts += [f"seed {train['seed']}"] if train.get("seed") is not None else []
    return ", ".join(parts)
