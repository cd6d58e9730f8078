"""Latent browser: a static site of what each latent of a language-model SAE responds to.

`build_site` reads a run directory and the activation directory written by `flashsae harvest`
(activations, token ids, contexts) and writes index.html plus one latent-XXXXX.html per latent
(see `viz.site` for the pages). It reads the activations twice: once for firing statistics and
top-activating rows, once for activation histograms; then it encodes the rows around each top
example to shade its context. Tokens are decoded with the tokenizer named in the manifest when it
loads offline (a context as the tokenizer decodes running text, one piece per token: `token_texts`),
else shown as ids; the tokens a latent promotes come from its decoder row through
the model's output embedding when the model has an LM head.
Imports io, data and lm.site; transformers only through lm.activations.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flashsae import io
from flashsae.data import open_source
from flashsae.errors import ConfigError, DataError
from flashsae.lm import activations as A
from flashsae.lm import site

_CODE_VALUES = 1 << 22  # dense codes per chunk (16 MB of float32), whatever d_sae is


@dataclass
class LatentPage:
    """Everything one latent page shows."""

    latent: int
    frequency: float                # fraction of rows where it fires
    mean_activation: float          # mean over the rows where it fires
    max_activation: float
    histogram: tuple[np.ndarray, np.ndarray] | None  # (counts, bin edges) of nonzero activations
    examples: list[dict] = field(default_factory=list)  # {"value", "tokens": [(text, act)], "center"}
    promoted: list[tuple[str, float]] = field(default_factory=list)
    top_token: str = ""


def build_site(run_dir, acts_dir, out, *, latents: int | None = None, top: int = 20, window: int = 10,
               rows: int | None = None, bins: int = 30, promoted: bool = True, device: str = "cpu",
               progress: bool = False) -> Path:
    """Write the latent browser for the run in `run_dir` over the harvest in `acts_dir` to `out`.

    The index lists every latent; pages are written for the first `latents`.

    Args:
        latents: latents with a page: ids 0 .. latents-1 (default: all, at most 1000).
        top: top-activating examples per latent.
        window: tokens shown either side of each example's token.
        rows: read only the first `rows` activation rows (default: all).
        promoted: load the model for the tokens each latent promotes (False loads the tokenizer only).

    Returns:
        `out`, holding index.html and latent-XXXXX.html files.

    Raises:
        DataError: the activations do not fit the model or lack token ids.
    """
    if top < 1 or window < 0 or (latents is not None and latents < 1):
        raise ConfigError("top and latents must be >= 1 and window >= 0")
    sae = io.load(run_dir, device=device)
    manifest = A.read_manifest(acts_dir)
    source = open_source(acts_dir)
    if source.d_in != sae.d_in:
        raise DataError(f"{acts_dir} has {source.d_in} columns but the model in {run_dir} expects {sae.d_in}")
    n_rows = source.n_rows if rows is None else min(rows, source.n_rows)
    pages = np.arange(min(sae.d_sae, latents if latents is not None else 1000))
    tokens = _TokenIndex(Path(acts_dir), manifest)
    chunk = max(64, min(8192, _CODE_VALUES // sae.d_sae))

    stats = _first_pass(sae, source, n_rows, chunk, top, progress)
    hist = _histograms(sae, source, n_rows, chunk, pages, stats.top_values[pages, 0], bins, progress)
    tokenizer, lm = _load_model(manifest, with_model=promoted)
    decode = _Decoder(tokenizer)
    examples = _examples(sae, source, tokens, pages, stats, window, chunk, decode)
    promoted_tokens = _promoted(sae, lm, decode, pages)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fired = np.maximum(stats.fire_count, 1)
    entries = []
    for j in range(sae.d_sae):
        best = stats.top_rows[j, 0]
        entries.append(LatentPage(latent=j, frequency=float(stats.fire_count[j] / n_rows),
                                  mean_activation=float(stats.act_sum[j] / fired[j]),
                                  max_activation=float(stats.top_values[j, 0]), histogram=None,
                                  top_token=decode(int(tokens.rows[best, 0])) if best >= 0 else ""))
    for i, j in enumerate(pages):
        page = entries[j]
        page.histogram, page.examples, page.promoted = hist[i], examples[j], promoted_tokens.get(j, [])
        _write(out / site.page_name(j), site.latent_page(page, run=str(run_dir), n_rows=n_rows))
    _write(out / "index.html", site.index_page(entries, set(int(j) for j in pages), run=str(run_dir),
                                               acts=str(acts_dir), n_rows=n_rows,
                                               dead=int((stats.fire_count == 0).sum())))
    return out


@dataclass
class _Stats:
    fire_count: np.ndarray   # (d_sae,) int64
    act_sum: np.ndarray      # (d_sae,) float64
    top_values: np.ndarray   # (d_sae, top) float32, descending; 0 where fewer firings
    top_rows: np.ndarray     # (d_sae, top) int64, -1 where empty


def _chunks(sae, source, n_rows: int, chunk: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    device = sae.W_dec.device
    for start in tqdm(range(0, n_rows, chunk), desc=desc, unit="chunk", disable=not progress):
        stop = min(start + chunk, n_rows)
        x = torch.from_numpy(np.array(source.read(start, stop), dtype=np.float32)).to(device)
        yield start, sae.encode(x)  # (rows, d_sae) dense codes


def _first_pass(sae, source, n_rows: int, chunk: int, top: int, progress: bool) -> _Stats:
    d = sae.d_sae
    device = sae.W_dec.device
    fire = torch.zeros(d, dtype=torch.int64, device=device)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    best_v = torch.zeros(top, d, device=device)
    best_r = torch.full((top, d), -1, dtype=torch.int64, device=device)
    for start, codes in _chunks(sae, source, n_rows, chunk, "latent statistics", progress):
        fire += (codes > 0).sum(0)
        total += codes.double().sum(0)
        v, r = codes.topk(min(top, codes.shape[0]), dim=0)
        cand_v = torch.cat([best_v, v])
        cand_r = torch.cat([best_r, r + start])
        keep = cand_v.topk(top, dim=0).indices
        best_v, best_r = cand_v.gather(0, keep), cand_r.gather(0, keep)
    best_r = torch.where(best_v > 0, best_r, torch.full_like(best_r, -1))
    return _Stats(fire.cpu().numpy(), total.cpu().numpy(), best_v.T.cpu().numpy(), best_r.T.cpu().numpy())


def _histograms(sae, source, n_rows, chunk, pages, highs, bins, progress):
    hi = torch.as_tensor(np.maximum(highs, 1e-12), dtype=torch.float32, device=sae.W_dec.device)
    counts = torch.zeros(len(pages), bins, dtype=torch.int64, device=hi.device)
    cols = torch.as_tensor(pages, device=hi.device)
    for _, codes in _chunks(sae, source, n_rows, chunk, "histograms", progress):
        c = codes[:, cols]  # (rows, pages)
        b = (c / hi * bins).long().clamp_(0, bins - 1)
        b = torch.where(c > 0, b, torch.full_like(b, bins))  # zeros go to a discarded extra bin
        offsets = torch.arange(len(pages), device=hi.device) * (bins + 1)
        full = torch.bincount((b + offsets).reshape(-1), minlength=len(pages) * (bins + 1))
        counts += full.view(len(pages), bins + 1)[:, :bins]
    edges = [np.linspace(0.0, float(h), bins + 1) for h in highs]
    return [(counts[i].cpu().numpy(), edges[i]) for i in range(len(pages))]


class _TokenIndex:
    """Token id, context and position of every activation row, and the contexts' token ids."""

    def __init__(self, acts_dir: Path, manifest: dict):
        parts, self.contexts = [], {}
        for shard in manifest["shards"]:
            if "tokens" not in shard:
                raise DataError(f"{acts_dir} has no token ids for {shard.get('file')}; harvest it again")
            parts.append(np.load(acts_dir / shard["tokens"], mmap_mode="r", allow_pickle=False))
            ctx = np.load(acts_dir / shard["contexts"], mmap_mode="r", allow_pickle=False)
            for i in range(len(ctx)):
                self.contexts.setdefault(shard["first_context"] + i, (ctx, i))
        self.rows = np.concatenate(parts) if parts else np.zeros((0, 3), np.int32)  # (rows, 3)

    def context(self, c: int) -> np.ndarray:
        arr, i = self.contexts[c]
        return np.asarray(arr[i])

    def rows_of_context(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, positions) of the rows harvested from context c."""
        lo, hi = np.searchsorted(self.rows[:, 1], [c, c + 1])
        return np.arange(lo, hi), self.rows[lo:hi, 2]


def _examples(sae, source, tokens: _TokenIndex, pages, stats: _Stats, window: int, chunk: int, decode):
    wanted = {}  # row -> (context, position)
    for j in pages:
        for r in stats.top_rows[j]:
            if r >= 0:
                wanted[int(r)] = tuple(int(v) for v in tokens.rows[r, 1:3])
    contexts = sorted({c for c, _ in wanted.values()})
    ctx_rows = {c: tokens.rows_of_context(c) for c in contexts}
    all_rows = np.concatenate([ctx_rows[c][0] for c in contexts]) if contexts else np.zeros(0, np.int64)
    cols = torch.as_tensor(pages, device=sae.W_dec.device)
    values = np.zeros((len(all_rows), len(pages)), np.float32)
    for start in range(0, len(all_rows), chunk):
        x = torch.from_numpy(source.take(all_rows[start:start + chunk])).to(sae.W_dec.device)
        values[start:start + len(x)] = sae.encode(x)[:, cols].cpu().numpy()
    where = {int(r): i for i, r in enumerate(all_rows)}
    page_col = {int(j): i for i, j in enumerate(pages)}
    out: dict[int, list[dict]] = {}
    for j in pages:
        j = int(j)
        items = []
        for r, v in zip(stats.top_rows[j], stats.top_values[j]):
            if r < 0:
                continue
            c, pos = wanted[int(r)]
            ids = tokens.context(c)
            lo, hi = max(0, pos - window), min(len(ids), pos + window + 1)
            acts = np.zeros(hi - lo, np.float32)
            row_ids, positions = ctx_rows[c]
            inside = (positions >= lo) & (positions < hi)
            for rr, p in zip(row_ids[inside], positions[inside]):
                acts[p - lo] = values[where[int(rr)], page_col[j]]
            pieces = decode.span(ids, lo, hi)
            items.append({"value": float(v), "center": pos - lo, "token": decode(int(ids[pos])),
                          "tokens": list(zip(pieces, acts.tolist()))})
        out[j] = items
    return out


_ANCHOR_TOKENS = 4  # decoded before a window so that it starts as in running text (no "##", whole characters)


def token_texts(tokenizer, ids, start: int = 0) -> list[str]:
    """The text each of ids[start:] adds when the tokenizer decodes `ids` in order; ids[:start] is context.

    Joined, the pieces are the decoded text after the context, so sub-words join as the tokenizer
    joins them (WordPiece "##", byte-level BPE, SentencePiece "▁") and a piece starts with a space
    only where the decoded text has one. A token that changes text decoded before it (it completes a
    character whose bytes began in an earlier token) takes that text over from the earlier pieces.
    """
    ids = [int(t) for t in ids]

    def decode(n: int) -> str:
        return tokenizer.decode(ids[:n], skip_special_tokens=False)

    pieces: list[str] = []
    done = decode(start)
    for i in range(start + 1, len(ids) + 1):
        text = decode(i)
        common = len(os.path.commonprefix([done, text]))
        excess = len(done) - common
        for j in range(len(pieces) - 1, -1, -1):  # give back what the new token rewrote
            if excess <= 0:
                break
            cut = min(excess, len(pieces[j]))
            pieces[j], excess = pieces[j][:len(pieces[j]) - cut], excess - cut
        pieces.append(text[common:])
        done = text
    return pieces


class _Decoder:
    """Token ids as text: one token alone (`decoder(id)`), or a window of a context (`span`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, t: int) -> str:
        if self.tokenizer is None:
            return f"#{t}"
        if t not in self.cache:
            self.cache[t] = self.tokenizer.decode([t], clean_up_tokenization_spaces=False)
        return self.cache[t]

    def span(self, ids: np.ndarray, lo: int, hi: int) -> list[str]:
        """The text of ids[lo:hi], one piece per token, decoded as in running text."""
        if self.tokenizer is None:
            return [("" if i == lo else " ") + f"#{int(ids[i])}" for i in range(lo, hi)]
        anchor = max(0, lo - _ANCHOR_TOKENS)
        return token_texts(self.tokenizer, ids[anchor:hi], lo - anchor)


def _load_model(manifest: dict, *, with_model: bool):
    """(tokenizer or None, model or None) named in the manifest, loaded offline; None on any failure."""
    name = manifest.get("model_path")
    if not name or not os.path.isdir(name):
        name = manifest.get("model")
    if with_model:
        try:
            lm, tokenizer = A.load_lm(name)
            return tokenizer, lm
        except (DataError, ConfigError):
            pass
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(name, local_files_only=True), None
    except Exception:  # noqa: BLE001 - any failure (missing package, files, network) means: show token ids
        return None, None


@torch.no_grad()
def _promoted(sae, lm, decode, pages, n: int = 10) -> dict[int, list[tuple[str, float]]]:
    """Tokens each latent's decoder row promotes most through the output embedding (final norm ignored)."""
    emb = lm.get_output_embeddings() if lm is not None and hasattr(lm, "get_output_embeddings") else None
    if emb is None or emb.weight.shape[1] != sae.d_in:
        return {}
    W_U = emb.weight.detach().float().cpu()  # (vocab, d_in)
    atoms = sae.atoms().float().cpu()[torch.as_tensor(pages)]  # (pages, d_in)
    logits = atoms @ W_U.T
    v, idx = logits.topk(min(n, logits.shape[1]), dim=1)
    return {int(j): [(decode(int(t)), float(s)) for t, s in zip(idx[i], v[i])] for i, j in enumerate(pages)}


def _write(path: Path, text: str) -> None:
    io.atomic_write_text(path, text)
