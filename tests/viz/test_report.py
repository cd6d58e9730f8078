import base64
import json
import os
import re
import shutil
import subprocess

import pytest
from matplotlib import image as mpimg

from flashsae import ArtifactError, io
from flashsae.cli import main
from flashsae.train.sweep import write_artifacts
from flashsae.viz.report import render_report, write_report


def fake_sweep(path):
    path.mkdir()
    rows = [{"name": f"k-{k}", "k": k, "architecture": "topk", "d_sae": 64, "fvu": 0.4 / k, "l0": float(k),
             "dead_fraction": 0.0, "rows_per_s": 1e5, "run_dir": f"k-{k}"} for k in (2, 4, 8)]
    write_artifacts(path, rows)
    return rows


def test_run_report_is_one_self_contained_page(digits_run):
    run_dir, metrics = digits_run
    page = write_report(run_dir).read_text()
    assert (run_dir / io.REPORT_FILE).is_file()
    for key in ("fvu", "l0", "dead_fraction", "mse"):
        assert f"{metrics[key]:.6g}" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # curves, atoms, reconstructions
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "topk sparse autoencoder" in page
    for external in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert external not in page


def test_sweep_report_shows_the_table_and_the_tradeoff(tmp_path):
    rows = fake_sweep(tmp_path / "sweep")
    page = render_report(tmp_path / "sweep")
    assert page.count('src="data:image/png;base64,') == 1
    table = page.split('<table id="sweep">')[1].split("</table>")[0]
    assert table.count("<tr>") == len(rows) + 1
    assert all(f">{r['name']}<" in table for r in rows)


def test_report_rejects_a_directory_that_is_neither(tmp_path):
    with pytest.raises(ArtifactError, match="neither a run directory"):
        render_report(tmp_path)


def test_report_cli(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"] == str(tmp_path / "r.html") and out["bytes"] > 10_000
    assert main(["report", str(tmp_path), "--quiet"]) == 2
    assert "neither a run directory" in capsys.readouterr().err


# Appended to a copy of the page so that the browser writes what it decoded into the DOM.
PROBE = """<script>
addEventListener("load", () => {
  document.body.setAttribute("data-decoded",
    [...document.images].map(i => (i.complete ? i.naturalWidth + "x" + i.naturalHeight : "pending")).join(","));
});
</script>"""


def test_report_renders_in_headless_chromium(digits_run, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("FLASHSAE_REQUIRE_CHROMIUM"):
            pytest.fail("FLASHSAE_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    run_dir, metrics = digits_run
    page = render_report(run_dir)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert f"{metrics['fvu']:.6g}" in dom and f"{metrics['l0']:.6g}" in dom
    decoded = re.search(r'data-decoded="([^"]*)"', dom)
    assert decoded, dom[-2000:]
    expected = []
    for name in (io.CURVES_FILE, io.ATLAS_FILE, io.RECONSTRUCTIONS_FILE):
        h, w = mpimg.imread(run_dir / name).shape[:2]
        expected.append(f"{w}x{h}")
    assert decoded.group(1).split(",") == expected


DOWNSTREAM = {"model": "/models/minilm", "hook": "encoder.layer.2", "text": "/data/heldout.txt", "context": 64,
              "start_context": 312, "kind": "encoder", "contexts": 16, "spliced_positions": 992, "hook_fvu": 0.2512,
              "hook_l0": 31.9, "hidden_cosine": 0.8874, "hidden_mse": 0.0123, "pooled_cosine": 0.9071,
              "hidden_cosine_zero": 0.0213, "hidden_mse_zero": 0.25, "pooled_cosine_zero": 0.05}


def with_evaluation(run_dir, tmp_path, evaluation: dict):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    io.write_json(copy / "evaluation.json", evaluation)
    return copy


@pytest.mark.parametrize("with_data", [True, False])
def test_spliced_metrics_are_a_table(digits_run, tmp_path, with_data):
    run_dir, _ = digits_run
    evaluation = {"data": "heldout.npy", "rows": 100, "fvu": 0.31, "downstream": DOWNSTREAM} if with_data else \
        {"downstream": DOWNSTREAM}
    page = render_report(with_evaluation(run_dir, tmp_path, evaluation))
    assert "{&quot;" not in page  # no raw JSON cell
    assert "<h2>Spliced into /models/minilm at encoder.layer.2</h2>" in page
    assert ("encoder model; contexts of 64 tokens from /data/heldout.txt, starting at context 312") in page
    table = page.split('<table id="downstream">')[1].split("</table>")[0]
    cells = re.findall(r"<tr><td>([a-z_0-9]+)</td><td[^>]*>([^<]*)</td>", table)
    assert cells[:3] == [("hidden_cosine", "0.8874"), ("hidden_mse", "0.0123"), ("pooled_cosine", "0.9071")]
    assert {k for k, _ in cells} == set(DOWNSTREAM) - {"model", "hook", "text", "context", "start_context", "kind"}
    assert ('<table id="evaluation">' in page) == with_data


def test_nested_configuration_is_spelled_out(digits_run, tmp_path):
    run_dir, _ = digits_run
    copy = with_evaluation(run_dir, tmp_path, {"data": "x.npy", "fvu": 0.5})
    cfg = io.read_json(copy / io.CONFIG_FILE)
    cfg["data_stats"]["provenance"] = {"model": "/models/minilm", "hook": "encoder.layer.2", "context": 64}
    io.write_json(copy / io.CONFIG_FILE, cfg)
    page = render_report(copy)
    assert "<tr><td>provenance.hook</td><td>encoder.layer.2</td></tr>" in page
    assert '<tr><td>provenance.context</td><td class="num">64</td></tr>' in page and "{&quot;" not in page
