import html
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("transformers")

import flashsae  # noqa: E402
from flashsae.lm.browse import build_site, token_texts  # noqa: E402
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


# ---- contexts read as the tokenizer decodes them --------------------------------------------------

SAMPLE = "This must not be called if WIFSTOPPED(status) is true; it isn't. Caf\u00e9 na\u00efve \u6771\u4eac"


def sentencepiece_tokenizer(corpus):
    """A tiny Unigram tokenizer with SentencePiece's \u2581 word starts, trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator([corpus.read_text()[:200_000], SAMPLE], trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>"], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module", params=["wordpiece", "byte-level-bpe", "sentencepiece"])
def tokenizer(request, minilm, tiny_gpt2, corpus):
    from transformers import AutoTokenizer

    if request.param == "wordpiece":
        return request.param, AutoTokenizer.from_pretrained(minilm)  # all-MiniLM-L6-v2's own
    if request.param == "byte-level-bpe":
        return request.param, AutoTokenizer.from_pretrained(tiny_gpt2)  # GPT-2's scheme, trained on the corpus
    return request.param, sentencepiece_tokenizer(corpus)


def test_token_texts_join_as_the_tokenizer_decodes(tokenizer):
    kind, tok = tokenizer
    ids = tok(SAMPLE)["input_ids"]
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids)
    marker = {"wordpiece": "##", "byte-level-bpe": "\u0120", "sentencepiece": "\u2581"}[kind]
    assert all(marker not in p for p in pieces)
    words = tok.decode(ids, skip_special_tokens=True).split()
    assert "must" in words and "not" in words  # spaces only where the decoded text has them
    for start in range(1, len(ids)):  # a window that starts anywhere, even inside a word
        window = token_texts(tok, ids, start)
        assert len(window) == len(ids) - start and all(marker not in p for p in window)
        assert "".join(pieces[:start]) + "".join(window) == tok.decode(ids) or kind == "byte-level-bpe"


def test_wordpiece_continuations_join_their_word(minilm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    ids = tok("called if WIFSTOPPED", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["called", "if", "wi", "##fs", "##top", "##ped"]
    assert token_texts(tok, ids) == ["called", " if", " wi", "fs", "top", "ped"]
    assert token_texts(tok, ids, 3) == ["fs", "top", "ped"]  # no "##" where a window starts mid-word


@pytest.fixture(scope="module")
def minilm_site(tmp_path_factory, minilm, corpus):
    base = tmp_path_factory.mktemp("browse-minilm")
    harvest(HarvestConfig(model=str(minilm), hook="encoder.layer.2", text=str(corpus), rows=3000, context=32,
                          batch=16), base / "acts", progress=False)
    flashsae.train(base / "acts", arch="topk", latents=64, k=4, rows=12_000, batch_size=256, out=base / "run",
                   quiet=True)
    build_site(base / "run", base / "acts", base / "site", latents=8, top=5)
    return base


def context_texts(page: str) -> list[str]:
    """The text of each top-activating context of a latent page, as a browser shows it."""
    divs = re.findall(r"<div class=.ctx.>(.*?)</div>", page, flags=re.S)
    return [html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"<span class=.val.>.*?</span>", "", d))) for d in divs]


def test_minilm_contexts_read_as_words(minilm_site, minilm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    texts = [t for j in range(8) for t in context_texts((minilm_site / "site" / f"latent-{j:05d}.html").read_text())]
    assert len(texts) >= 20
    assert not any("##" in t for t in texts)
    joined = {w for t in texts for w in re.findall(r"(?<![\w#])[a-z]{4,}(?![\w#])", t)}
    assert len(joined) > 20
    assert any(len(tok.tokenize(w)) > 1 for w in joined)  # whole words built from several pieces
    page = (minilm_site / "site" / "latent-00000.html").read_text()
    assert "</span> <span class='tok" in page and "title='0'> " not in page  # spaces go outside the shaded spans


# ---- in a browser ----------------------------------------------------------------------------------

def need_chromium():
    if chromium() is None:
        if os.environ.get("FLASHSAE_REQUIRE_CHROMIUM"):
            pytest.fail("FLASHSAE_REQUIRE_CHROMIUM is set but no chromium is installed")
        pytest.skip("chromium is not installed")


def screenshot(url: str, png, profile, size=(1200, 900)) -> np.ndarray:
    """The page as headless Chromium draws it: (H, W, channels) floats in [0, 1]."""
    from matplotlib import image as mpimg

    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", url]
    subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return mpimg.imread(png)


def ink(picture: np.ndarray) -> float:
    """Fraction of dark pixels: text on the white page."""
    return float((picture[..., :3].mean(-1) < 0.5).mean())


# Appended to a copy of the index: click headers as a person would and record the row order after each.
SORT_PROBE = """<script>
var th = document.querySelectorAll('#latents th');
function order() { return [...document.querySelectorAll('#latents tbody tr')].map(tr => tr.dataset.id).join(','); }
th[1].click(); document.body.dataset.freqDown = order() + ';' + th[1].getAttribute('aria-sort');
th[1].click(); document.body.dataset.freqUp = order() + ';' + th[1].getAttribute('aria-sort');
th[4].click(); document.body.dataset.tokenUp = order() + ';' + th[4].getAttribute('aria-sort');
th[0].click(); document.body.dataset.idDown = order() + ';' + th[0].getAttribute('aria-sort');
</script>"""


def test_index_columns_sort_on_click(site, tmp_path):
    need_chromium()
    index = (site / "site" / "index.html").read_text()
    rows = re.findall(r"<tr data-id='(\d+)'[^>]*><td data-v='\d+'>.*?</td><td data-v='([^']+)'>.*?"
                      r"<td class='tok'>(.*?)</td></tr>", index)
    assert len(rows) == 64
    probe = site / "site" / "sort-probe.html"
    probe.write_text(index.replace("</body>", SORT_PROBE + "</body>"))
    try:
        dom = dump_dom(probe.as_uri(), tmp_path / "profile")
    finally:
        probe.unlink()
    got = {k: v.split(";") for k, v in re.findall(r'data-(freq-down|freq-up|token-up|id-down)="([^"]*)"', dom)}
    ids = [r[0] for r in rows]
    freq = {r[0]: float(r[1]) for r in rows}
    down = sorted(ids, key=lambda i: -freq[i])
    assert got["freq-down"] == [",".join(down), "descending"]
    assert got["freq-up"] == [",".join(sorted(down, key=lambda i: freq[i])), "ascending"]
    token = {r[0]: html.unescape(r[2]).lower() for r in rows}
    by_token = got["token-up"][0].split(",")
    assert [token[i] for i in by_token] == sorted(token[i] for i in by_token) and got["token-up"][1] == "ascending"
    assert got["id-down"] == [",".join(sorted(ids, key=int, reverse=True)), "descending"]


def test_minilm_browser_shows_readable_words(minilm_site, minilm, tmp_path):
    from transformers import AutoTokenizer

    need_chromium()
    tok = AutoTokenizer.from_pretrained(minilm)
    site = minilm_site / "site"
    divs = []
    for j in range(8):
        dom = dump_dom((site / f"latent-{j:05d}.html").as_uri(), tmp_path / "profile")
        divs += re.findall(r'<div class="ctx">(.*?)</div>', dom, flags=re.S)
    texts = [html.unescape(re.sub(r"<[^>]+>", "", re.sub(r'<span class="val">.*?</span>', "", d))) for d in divs]
    assert len(texts) >= 20 and not any("##" in t for t in texts)
    words = {w for t in texts for w in re.findall(r"(?<![\w#])[a-z]{4,}(?![\w#])", t)}
    pieced = sorted(w for w in words if len(tok.tokenize(w)) > 1)
    assert len(words) > 20 and pieced, words  # whole words, also those the tokenizer cut into pieces
    assert all(len(re.findall(r'<span class="tok', d)) == 21 or "[CLS]" in d or "[SEP]" in d for d in divs)
    for page, name in ((site / "latent-00001.html", "latent"), (site / "index.html", "index")):
        picture = screenshot(page.as_uri(), tmp_path / f"{name}.png", tmp_path / "profile")
        assert picture.shape[:2] == (900, 1200)
        assert 0.002 < ink(picture) < 0.5, name  # text drawn on a light page, not blank and not black


def test_minilm_report_shows_the_spliced_metrics(minilm_site, corpus, tmp_path):
    from flashsae.cli import main
    from flashsae.viz.report import write_report

    need_chromium()
    run = tmp_path / "run"
    shutil.copytree(minilm_site / "run", run)
    assert main(["evaluate", str(run), "--text", str(corpus), "--rows", "128", "--device", "cpu", "--quiet"]) == 0
    page = write_report(run)
    dom = dump_dom(page.as_uri(), tmp_path / "profile")
    assert "<h2>Spliced into " in dom and "at encoder.layer.2</h2>" in dom
    table = dom.split('<table id="downstream">')[1].split("</table>")[0]
    cells = dict(re.findall(r"<tr><td>([a-z_0-9]+)</td><td[^>]*>([^<]*)</td>", table))
    assert {"hidden_cosine", "pooled_cosine", "hook_fvu", "hidden_cosine_zero"} <= set(cells)
    assert 0 < float(cells["hidden_cosine"]) <= 1 and "{" not in table
    picture = screenshot(page.as_uri(), tmp_path / "report.png", tmp_path / "profile", size=(1200, 2400))
    assert 0.002 < ink(picture) < 0.5
