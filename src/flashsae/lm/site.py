"""HTML of the latent browser: an index with a search box and sortable columns, one page per latent.

Pages are self-contained (inline CSS, inline JavaScript on the index, histograms as inline SVG) so
the site works from the file system with no server and no network. Every text that comes from
data or a tokenizer is escaped. Pure string building; imports nothing from flashsae.
"""
from __future__ import annotations

import html
import json

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; }
td.tok, th.tok { text-align: left; font-family: monospace; }
tr:nth-child(even) { background: #f6f6f6; }
.ctx { font-family: monospace; white-space: pre-wrap; margin: 4px 0; padding: 4px; border-bottom: 1px solid #eee; }
.tok { border-radius: 2px; }
.center { outline: 1px solid #333; }
.val { color: #666; display: inline-block; width: 5em; }
input#search { font-size: 1em; padding: 4px; width: 22em; margin-bottom: 1em; }
#latents th { cursor: pointer; user-select: none; }
#latents th[aria-sort=ascending]::after { content: ' \\25B2'; }
#latents th[aria-sort=descending]::after { content: ' \\25BC'; }
"""

_SEARCH_JS = """
var box = document.getElementById('search');
function filter() {
  var q = box.value.trim().toLowerCase();
  document.querySelectorAll('#latents tbody tr').forEach(function (tr) {
    var hit = !q || tr.dataset.id === q || tr.dataset.token.toLowerCase().indexOf(q) >= 0;
    tr.style.display = hit ? '' : 'none';
  });
}
box.addEventListener('input', filter);
box.value = new URLSearchParams(location.search).get('q') || '';  // index.html?q=the opens filtered
filter();
"""

_SORT_JS = """
// Click a column header to sort by it: numbers largest first, text A to Z; click again to reverse.
document.querySelectorAll('#latents th').forEach(function (th, col) {
  th.title = 'sort by ' + th.textContent;
  th.addEventListener('click', function () {
    var num = th.dataset.type === 'num';
    var first = num ? 'descending' : 'ascending';
    var order = th.getAttribute('aria-sort') === first ? (num ? 'ascending' : 'descending') : first;
    document.querySelectorAll('#latents th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', order);
    var body = document.querySelector('#latents tbody');
    var key = function (tr) {
      var td = tr.children[col];
      return num ? parseFloat(td.dataset.v) : td.textContent.toLowerCase();
    };
    var rows = Array.prototype.slice.call(body.rows).map(function (tr, i) { return [key(tr), i, tr]; });
    rows.sort(function (a, b) {  // ties keep their current order
      var c = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
      return (order === 'ascending' ? c : -c) || a[1] - b[1];
    });
    rows.forEach(function (r) { body.appendChild(r[2]); });
  });
});
"""


def page_name(latent: int) -> str:
    return f"latent-{latent:05d}.html"


def _doc(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}{js}</body></html>\n")


def _show(token: str) -> str:
    """A token as visible text: newlines and tabs as symbols, then escaped."""
    return html.escape(token.replace("\n", "\u21b5").replace("\t", "\u21e5"))


def index_page(latents, with_page: set[int], *, run: str, acts: str, n_rows: int, dead: int) -> str:
    """The table of every latent; ids link to the latents in `with_page`."""
    rows = []
    for p in latents:
        name = f"<a href='{page_name(p.latent)}'>{p.latent}</a>" if p.latent in with_page else str(p.latent)
        rows.append(f"<tr data-id='{p.latent}' data-token='{html.escape(p.top_token, quote=True)}'>"
                    f"<td data-v='{p.latent}'>{name}</td><td data-v='{p.frequency!r}'>{p.frequency:.4%}</td>"
                    f"<td data-v='{p.mean_activation!r}'>{p.mean_activation:.3g}</td>"
                    f"<td data-v='{p.max_activation!r}'>{p.max_activation:.3g}</td>"
                    f"<td class='tok'>{_show(p.top_token)}</td></tr>")
    body = (f"<h1>Latents of {html.escape(run)}</h1>"
            f"<p>{len(latents)} latents ({dead} never fire) over {n_rows:,} rows of {html.escape(acts)}; "
            f"{len(with_page)} have pages (linked).</p>"
            "<input id='search' type='search' placeholder='filter by latent id or top token'>"
            "<table id='latents'><thead><tr><th data-type='num'>latent</th>"
            "<th data-type='num'>firing frequency</th><th data-type='num'>mean activation</th>"
            "<th data-type='num'>max activation</th><th class='tok' data-type='text'>top token</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")
    return _doc(f"flashsae latents: {run}", body, _SEARCH_JS + _SORT_JS)


def latent_page(p, *, run: str, n_rows: int) -> str:
    parts = [f"<p><a href='index.html'>all latents</a></p><h1>Latent {p.latent}</h1>",
             f"<p>fires on {p.frequency:.4%} of {n_rows:,} rows; mean activation when firing "
             f"{p.mean_activation:.4g}, max {p.max_activation:.4g}</p>",
             "<h2>Activation histogram (nonzero values)</h2>", histogram_svg(*p.histogram)]
    if p.promoted:
        items = "".join(f"<tr><td class='tok'>{_show(t)}</td><td>{s:.3g}</td></tr>" for t, s in p.promoted)
        parts.append("<h2>Tokens it promotes (decoder row through the output embedding)</h2>"
                     f"<table><tr><th class='tok'>token</th><th>logit</th></tr>{items}</table>")
    parts.append("<h2>Top-activating contexts</h2>")
    if not p.examples:
        parts.append("<p>This latent never fires on these rows.</p>")
    for ex in p.examples:
        parts.append(f"<div class='ctx'><span class='val'>{ex['value']:.3g}</span>"
                     + "".join(_token_span(t, a, ex["value"], i == ex["center"])
                               for i, (t, a) in enumerate(ex["tokens"])) + "</div>")
    return _doc(f"latent {p.latent} - {run}", "".join(parts))


def _token_span(token: str, act: float, peak: float, center: bool) -> str:
    """One token's text as its own shaded span; the spaces it starts with go before the span, unshaded."""
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    cls = "tok center" if center else "tok"
    body = token.lstrip(" ") or token  # a token of spaces only keeps them
    space = token[:len(token) - len(body)]
    return (f"{space}<span class='{cls}' style='background-color: rgba(255, 120, 0, {alpha:.3f})' "
            f"title='{act:.4g}'>{_show(body)}</span>")


def histogram_svg(counts, edges, width: int = 480, height: int = 120) -> str:
    """Bars of `counts` over `edges` as inline SVG, with the value range below."""
    counts = [int(c) for c in counts]
    top = max(counts) if counts and max(counts) > 0 else 1
    bar_w = width / max(len(counts), 1)
    bars = "".join(
        f"<rect x='{i * bar_w:.1f}' y='{height - c / top * height:.1f}' width='{max(bar_w - 1, 1):.1f}' "
        f"height='{c / top * height:.1f}' fill='#e67e22'><title>{edges[i]:.3g}-{edges[i + 1]:.3g}: {c}</title></rect>"
        for i, c in enumerate(counts))
    label = f"<text x='0' y='{height + 14}' font-size='11'>{edges[0]:.3g}</text>" \
            f"<text x='{width}' y='{height + 14}' font-size='11' text-anchor='end'>{edges[-1]:.3g}</text>"
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 18}' "
            f"data-counts='{html.escape(json.dumps(counts))}'>{bars}{label}</svg>")
