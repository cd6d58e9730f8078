"""flashsae info: what a run directory holds."""
from __future__ import annotations

import argparse

HELP = "Show a trained model's architecture, sizes, data statistics and metrics."
EPILOG = """example:
  flashsae info runs/digits
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing; the exit status says whether RUN_DIR loads")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flashsae import io
    from flashsae.cli.common import format_metrics, print_json

    model = io.load(args.run_dir)
    cfg = model.run_config
    metrics_path = Path(args.run_dir) / io.METRICS_FILE
    metrics = io.read_json(metrics_path) if metrics_path.exists() else {}
    n_params = sum(p.numel() for p in model.parameters())
    if args.json:
        print_json({"config": cfg, "metrics": metrics, "parameters": n_params})
        return 0
    if args.quiet:
        return 0
    m = cfg["model"]
    hidden = ""
    if m.get("encoder_hidden") or m.get("decoder_hidden"):
        hidden = f", encoder hidden {m['encoder_hidden']}, decoder hidden {m['decoder_hidden']}"
    extras = {k: v for k, v in m.items() if k not in ("d_in", "d_sae", "encoder_hidden", "decoder_hidden")}
    stats = cfg.get("data_stats", {})
    print(f"{args.run_dir}: {cfg['architecture']} sparse autoencoder, flashsae {cfg.get('library_version')}")
    print(f"  sizes        d_in {m['d_in']}, latents {m['d_sae']}{hidden}, {n_params:,} parameters")
    print("  options      " + ", ".join(f"{k}={v}" for k, v in extras.items()))
    print(f"  data         {stats.get('source')}: {stats.get('n_rows')} rows "
          f"({stats.get('n_train')} train, {stats.get('n_val')} held out, {stats.get('nonfinite_dropped')} dropped)")
    print(f"  standardise  {cfg['preprocess']['mode']}")
    r = cfg.get("resolved", {})
    print(f"  training     batch {r.get('batch_size')}, {r.get('total_steps')} steps, lr {r.get('lr'):.3g}, "
          f"{cfg['train']['optimizer']}, seed {cfg['train']['seed']}")
    if metrics:
        print("  metrics\n" + format_metrics(metrics).replace("\n  ", "\n    ").replace("  ", "    ", 1))
    return 0
