"""One self-contained HTML page for a run directory or a sweep directory.

Everything is inside the file: PNGs as base64 data URIs, CSS inline, no scripts, no external
resources, so the page can be mailed, attached to a ticket or opened offline. Reads only the
files a run or sweep writes (names from flashsae.io); never loads the model.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import os
from pathlib import Path

from flashsae import io
from flashsae.errors import ArtifactError

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .85rem; }
.wide { overflow-x: auto; max-width: 100%; }
.cfg { display: flex; flex-wrap: wrap; gap: 1.5rem; } .cfg table { min-width: 260px; }
footer { margin-top: 3rem; color: #888; font-size: .8rem; }
"""

# (file, heading, caption) of the pictures a run directory may hold, in page order.
_RUN_FIGURES = (
    (io.CURVES_FILE, "Training curves", "Loss, FVU, L0 and dead fraction against rows seen; dots are held-out."),
    (io.ATLAS_FILE, "Decoder atoms", "Each latent's dictionary atom drawn as an image (red positive, blue negative)."),
    (io.RECONSTRUCTIONS_FILE, "Reconstructions",
     "Held-out images, their reconstruction, and the latents that contributed most (atom × code value)."),
)

# Metrics shown first, with what they mean (the rest follow in file order).
_METRIC_NOTES = {
    "fvu": "fraction of variance unexplained (0 is perfect, 1 is no better than the mean)",
    "fvu_standardized": "FVU in the standardised space the model trains in",
    "mse": "mean squared error per entry, data units",
    "l0": "active latents per row",
    "dead_fraction": "latents that never fired on the evaluated rows",
    "dense_fraction": "latents firing on more than 10% of rows",
    "recovery": "mean best cosine similarity of planted atoms with learned atoms",
}

# The metrics of `flashsae evaluate --text` (flashsae.lm.downstream), in page order.
_DOWNSTREAM_NOTES = {
    "loss_recovered": "(zero - spliced) / (zero - clean): 1 is perfect, 0 is no better than ablating",
    "loss_clean": "next-token cross-entropy of the model as it is (nats)",
    "loss_spliced": "next-token cross-entropy with the SAE's reconstruction spliced in",
    "loss_zero": "next-token cross-entropy with the hooked output zero-ablated",
    "kl_spliced": "mean KL(clean || spliced) of the next-token distributions",
    "kl_zero": "mean KL(clean || zero-ablated)",
    "hidden_cosine": "final hidden states, spliced vs clean: mean cosine per token",
    "hidden_mse": "final hidden states, spliced vs clean: mean squared error per token",
    "pooled_cosine": "mean-pooled embedding, spliced vs clean: mean cosine per context",
    "hidden_cosine_zero": "as hidden_cosine, zero-ablated: the floor to compare with",
    "hidden_mse_zero": "as hidden_mse, zero-ablated",
    "pooled_cosine_zero": "as pooled_cosine, zero-ablated",
    "hook_fvu": "FVU of the reconstruction at the hook on these contexts",
    "hook_l0": "active latents per token at the hook",
    "contexts": "contexts evaluated",
    "spliced_positions": "token positions whose activation was replaced",
}
# What says where a downstream evaluation ran; shown above its table, not in it.
_DOWNSTREAM_SETTINGS = ("model", "hook", "text", "context", "start_context", "kind")


def write_report(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of a run or sweep directory to `out` (default: PATH/report.html) and return it."""
    text = render_report(path)
    out = Path(out) if out is not None else Path(path) / io.REPORT_FILE
    io.atomic_write_text(out, text)
    return out


def render_report(path: str | os.PathLike) -> str:
    """The report page of a run directory (config.json) or a sweep directory (sweep.csv), as HTML text.

    Raises:
        ArtifactError: the directory is neither, or a file in it is corrupt.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory")
    if (path / io.SWEEP_TABLE_FILE).is_file():
        return _page(f"flashsae sweep: {path.name}", _sweep_body(path))
    if (path / io.CONFIG_FILE).is_file():
        return _page(f"flashsae run: {path.name}", _run_body(path))
    raise ArtifactError(f"{path} is neither a run directory ({io.CONFIG_FILE}) nor a sweep directory "
                        f"({io.SWEEP_TABLE_FILE})")


def _page(title: str, body: list[str]) -> str:
    from flashsae import __version__

    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{_e(title)}</h1>", *body,
        f"<footer>Written by flashsae {_e(__version__)}. Self-contained: images are embedded.</footer>",
        "</body>", "</html>", ""])


def _run_body(path: Path) -> list[str]:
    cfg = io.read_config(path)
    model, stats = cfg.get("model", {}), cfg.get("data_stats", {})
    body = [f'<p class="sub">{_e(cfg["architecture"])} sparse autoencoder: d_in {_e(model.get("d_in"))}, '
            f'{_e(model.get("d_sae"))} latents; data {_e(stats.get("source", "?"))} '
            f'({_e(stats.get("n_rows", "?"))} rows); flashsae {_e(cfg.get("library_version", "?"))}</p>']
    metrics_path = path / io.METRICS_FILE
    if metrics_path.is_file():
        metrics = io.read_json(metrics_path)
        where = metrics.get("evaluated_on", "")
        body += [f"<h2>Metrics{' (' + _e(where) + ')' if where else ''}</h2>", _metrics_table(metrics, "metrics")]
    evaluation = path / "evaluation.json"
    if evaluation.is_file():
        ev = io.read_json(evaluation)
        down = ev.pop("downstream", None)
        if set(ev) - {"data"}:
            body += [f"<h2>Evaluation on {_e(ev.get('data', 'other data'))}</h2>", _metrics_table(ev, "evaluation")]
        if isinstance(down, dict):
            body += _downstream(down)
    for name, heading, caption in _RUN_FIGURES:
        if (path / name).is_file():
            body += [f"<h2>{_e(heading)}</h2>", _figure(path / name, caption)]
    body.append("<h2>Configuration</h2>")
    body.append('<div class="cfg">')
    for section in ("model", "train", "data", "resolved", "data_stats", "preprocess"):
        if isinstance(cfg.get(section), dict):
            body.append(_kv_table(section, cfg[section]))
    body.append("</div>")
    return body


def _sweep_body(path: Path) -> list[str]:
    try:
        with open(path / io.SWEEP_TABLE_FILE, newline="", encoding="utf-8") as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ArtifactError(f"{path / io.SWEEP_TABLE_FILE} could not be read: {e}") from None
    body = [f'<p class="sub">{len(rows)} models; each is a run directory inside {_e(path.name)}/</p>']
    if (path / io.TRADEOFF_FILE).is_file():
        body += ["<h2>Sparsity vs reconstruction</h2>",
                 _figure(path / io.TRADEOFF_FILE, "Held-out FVU against L0, one point per model.")]
    body.append("<h2>Models</h2>")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    lines = [f'<div class="wide"><table id="sweep"><thead><tr>{head}</tr></thead><tbody>']
    for row in rows:
        lines.append("<tr>" + "".join(_cell(row.get(c, "")) for c in columns) + "</tr>")
    lines.append("</tbody></table></div>")
    body.append("\n".join(lines))
    return body


def _downstream(down: dict) -> list[str]:
    """The spliced evaluation (`flashsae evaluate --text`): where it ran, then its metrics as a table."""
    where = (f"{_e(down.get('kind', '?'))} model; contexts of {_e(down.get('context', '?'))} tokens from "
             f"{_e(down.get('text', '?'))}, starting at context {_e(down.get('start_context', 0))}")
    metrics = {k: v for k, v in down.items() if k not in _DOWNSTREAM_SETTINGS}
    return [f"<h2>Spliced into {_e(down.get('model', 'the model'))} at {_e(down.get('hook', '?'))}</h2>",
            f'<p class="sub">{where}</p>', _metrics_table(metrics, "downstream", _DOWNSTREAM_NOTES)]


def _metrics_table(metrics: dict, table_id: str, notes: dict = _METRIC_NOTES) -> str:
    keys = [k for k in notes if k in metrics] + [k for k in metrics if k not in notes]
    lines = [f'<table id="{table_id}"><thead><tr><th>metric</th><th>value</th><th>meaning</th></tr></thead><tbody>']
    for k in keys:
        lines.append(f"<tr><td>{_e(k)}</td>{_cell(metrics[k])}<td>{_e(notes.get(k, ''))}</td></tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _kv_table(title: str, values: dict) -> str:
    lines = [f'<table><thead><tr><th colspan="2">{_e(title)}</th></tr></thead><tbody>']
    for k, v in _flat(values):
        lines.append(f"<tr><td>{_e(k)}</td>{_cell(v)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _flat(values: dict, prefix: str = ""):
    """(key, value) pairs with nested dicts spelled out as parent.child keys, so no cell holds raw JSON."""
    for k, v in values.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _cell(v) -> str:
    if isinstance(v, bool) or v is None:
        return f"<td>{_e(json.dumps(v))}</td>"
    if isinstance(v, float):
        return f'<td class="num">{v:.6g}</td>'
    if isinstance(v, int):
        return f'<td class="num">{v}</td>'
    if isinstance(v, (list, dict)):
        return f"<td>{_e(json.dumps(v))}</td>"
    return f"<td>{_e(v)}</td>"


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def _figure(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(png.name)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _e(v) -> str:
    return html.escape(str(v), quote=True)
