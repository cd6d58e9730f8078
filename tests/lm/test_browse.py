import os
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("transformers")

import flashsae  # noqa: E402
from flashsae.lm.browse import build_site  # noqa: E402
from flashsae.lm.harvest import HarvestConfig, harvest  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_gpt2, corpus):
    base = tmp_path_factory.mktemp("browse")
    harvest(HarvestConfig(model=str(tiny_gpt2), hook="transformer.h.1", text=str(corpus), rows=3000, context=64,
                          shard_rows=1024), base / "acts", progress=False)
    flashsae.train(base / "acts", arch="topk", latents=64, k=4, rows=20_000, batch_size=256, out=base / "run",
                   quiet=True)
    build_site(base / "run", base / "acts", base / "site", latents=12, top=5)
    return base


def test_site_files_and_content(site):
    out = site / "site"
    assert sorted(p.name for p in out.iterdir()) == ["index.html"] + [f"latent-{j:05d}.html" for j in range(12)]
    index = (out / "index.html").read_text()
    assert index.count("<tr data-id=") == 64 and index.count("<a href='latent-") == 12 and "id='search'" in index
    page = (out / "latent-00003.html").read_text()
    assert "<svg" in page and page.count("class='ctx'") <= 5
    assert "Tokens it promotes" in page  # GPT-2 has an LM head
    values = [float(v) for v in re.findall(r"<span class='val'>([-0-9.e+]+)</span>", page)]
    assert values == sorted(values, reverse=True) and len(values) >= 1


def test_histograms_count_every_firing(site, tmp_path):
    from flashsae.data import open_source

    model = flashsae.load(site / "run")
    x = open_source(site / "acts").read(0, 3000)
    codes = model.encode(x).numpy()
    page = (site / "site" / "latent-00005.html").read_text()
    counts = [int(c) for c in re.search(r"data-counts='\[([0-9, ]*)\]'", page).group(1).split(",")]
    assert sum(counts) == int((codes[:, 5] > 0).sum())


def test_token_ids_when_the_tokenizer_is_gone(site, tmp_path):
    acts = tmp_path / "acts"
    shutil.copytree(site / "acts", acts)
    manifest = (acts / "manifest.json").read_text()
    (acts / "manifest.json").write_text(manifest.replace(str(site.parent), str(tmp_path / "nowhere")))
    build_site(site / "run", acts, tmp_path / "site", latents=2, top=3)
    page = (tmp_path / "site" / "latent-00000.html").read_text()
    assert re.search(r"'>#\d+</span>", page) and "Tokens it promotes" not in page


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def dump_dom(url: str, profile) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def test_site_in_headless_chromium(site, tmp_path):
    if chromium() is None:
        if os.environ.get("FLASHSAE_REQUIRE_CHROMIUM"):
            pytest.fail("FLASHSAE_REQUIRE_CHROMIUM is set but no chromium is installed")
        pytest.skip("chromium is not installed")
    index = (site / "site" / "index.html").as_uri()
    dom = dump_dom(index, tmp_path / "profile")
    links = re.findall(r'href="(latent-\d{5}\.html)"', dom)
    assert links, "no link to a latent page"
    page = dump_dom((site / "site" / links[0]).as_uri(), tmp_path / "profile")
    spans = re.findall(r'<span class="tok[^"]*" style="background-color: rgba\(([^)]*)\)"[^>]*>([^<]+)</span>', page)
    lit = [(rgba, text) for rgba, text in spans if float(rgba.split(",")[-1]) > 0]
    assert lit and all(text for _, text in lit)
    # the search box filters rows by latent id (the script reads ?q= on load)
    filtered = dump_dom(index + "?q=3", tmp_path / "profile")
    visible = re.findall(r'<tr data-id="(\d+)"[^>]*?(?:style="")?>', filtered)
    hidden = re.findall(r'<tr data-id="(\d+)"[^>]*style="display: none;"', filtered)
    assert "3" not in hidden and len(hidden) >= 60 and visible


def test_top_row_matches_a_direct_search(site):
    from flashsae.data import open_source

    model = flashsae.load(site / "run")
    codes = model.encode(open_source(site / "acts").read(0, 3000)).numpy()
    page = (site / "site" / "latent-00007.html").read_text()
    top = float(re.search(r"<span class='val'>([-0-9.e+]+)</span>", page).group(1))
    assert top == pytest.approx(float(np.max(codes[:, 7])), rel=1e-3)
