import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from flashsae.data import open_source  # noqa: E402
from flashsae.errors import ConfigError, DataError  # noqa: E402
from flashsae.lm import activations as A  # noqa: E402
from flashsae.lm import harvest as H  # noqa: E402


def cfg(model, corpus, **kw):
    base = dict(model=str(model), hook="transformer.h.0", text=str(corpus), rows=3000, context=64,
                batch=8, shard_rows=1000)
    return H.HarvestConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def gpt2_acts(tmp_path_factory, tiny_gpt2, corpus):
    out = tmp_path_factory.mktemp("acts") / "gpt2"
    return out, H.harvest(cfg(tiny_gpt2, corpus), out, progress=False)


def test_layout_and_manifest(gpt2_acts):
    out, m = gpt2_acts
    assert m["format"] == A.MANIFEST_FORMAT and m["complete"] and m["rows"] == 3000 and m["d_in"] == 64
    assert (m["model"], m["hook"], m["context"], m["dtype"]) == (m["model"], "transformer.h.0", 64, "float32")
    assert sum(s["rows"] for s in m["shards"]) == 3000
    assert all(s["rows"] <= 1000 for s in m["shards"]) and len(m["shards"]) >= 3
    assert sorted(p.name for p in out.iterdir()) == [*(s["file"] for s in m["shards"]), "manifest.json", "tokens"]
    for s in m["shards"]:
        toks = np.load(out / s["tokens"])
        ctxs = np.load(out / s["contexts"])
        assert toks.dtype == np.int32 and toks.shape == (s["rows"], 3) and ctxs.shape == (s["n_contexts"], 64)
        assert np.all(np.diff(toks[:, 1]) >= 0)  # rows in context order
        # each row's token id is the token at its (context, position)
        np.testing.assert_array_equal(ctxs[toks[:, 1] - s["first_context"], toks[:, 2]], toks[:, 0])
    # the shard source sees activations only, not the token files
    src = open_source(out)
    assert (src.n_rows, src.d_in) == (3000, 64)


def test_rows_are_the_hooked_module_output_without_special_tokens(gpt2_acts, tiny_gpt2):
    out, m = gpt2_acts
    model, tokenizer = A.load_lm(str(tiny_gpt2))
    shard = m["shards"][0]
    toks = np.load(out / shard["tokens"])
    ctxs = np.load(out / shard["contexts"])
    assert not np.isin(toks[:, 0], tokenizer.all_special_ids).any()
    with torch.no_grad():
        hidden = model(torch.from_numpy(ctxs[:4]).long(), output_hidden_states=True).hidden_states[1]
    acts = open_source(out).read(0, shard["rows"])
    first4 = toks[:, 1] < shard["first_context"] + 4
    want = hidden[toks[first4, 1] - shard["first_context"], toks[first4, 2]].numpy()
    np.testing.assert_allclose(acts[first4], want, atol=1e-5)


@pytest.mark.parametrize("after_shards", [0, 2])
def test_resume_after_interruption_gives_the_same_rows(tmp_path, monkeypatch, gpt2_acts, tiny_gpt2, corpus,
                                                       after_shards):
    full, _ = gpt2_acts
    out = tmp_path / "acts"
    real_flush = H._ShardWriter._flush
    calls = {"n": 0}

    def flaky(self, limit):
        if calls["n"] == after_shards:
            raise KeyboardInterrupt
        calls["n"] += 1
        real_flush(self, limit)

    monkeypatch.setattr(H._ShardWriter, "_flush", flaky)
    with pytest.raises(KeyboardInterrupt):
        H.harvest(cfg(tiny_gpt2, corpus), out, progress=False)
    partial = A.read_manifest(out)
    assert len(partial["shards"]) == after_shards and not partial["complete"]
    monkeypatch.setattr(H._ShardWriter, "_flush", real_flush)
    m = H.harvest(cfg(tiny_gpt2, corpus), out, progress=False)
    assert m["complete"] and m["rows"] == 3000
    np.testing.assert_allclose(open_source(out).read(0, 3000), open_source(full).read(0, 3000), atol=1e-5)
    if after_shards:
        return
    # running it again finds nothing to do; a larger --rows continues
    assert H.harvest(cfg(tiny_gpt2, corpus), out, progress=False)["rows"] == 3000
    assert H.harvest(cfg(tiny_gpt2, corpus, rows=3500), out, progress=False)["rows"] == 3500


def test_different_settings_are_refused(gpt2_acts, tiny_gpt2, corpus):
    out, _ = gpt2_acts
    with pytest.raises(ConfigError, match="different settings .hook"):
        H.harvest(cfg(tiny_gpt2, corpus, hook="transformer.h.1"), out, progress=False)


def test_max_norm_filter_and_bfloat16_safetensors(tmp_path, tiny_gpt2, corpus):
    m = H.harvest(cfg(tiny_gpt2, corpus, rows=1500, format="safetensors", dtype="bfloat16", max_norm_factor=1.2),
                  tmp_path / "a", progress=False)
    assert m["shards"][0]["file"].endswith(".safetensors") and m["median_norm"] > 0
    x = open_source(tmp_path / "a").read(0, 1500)
    assert np.linalg.norm(x, axis=1).max() <= 1.2 * m["median_norm"] * 1.01  # bf16 rounding


@pytest.mark.parametrize("keep", [False, True])
def test_bert_special_tokens(tmp_path, tiny_bert, corpus, keep):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    m = H.harvest(cfg(tiny_bert, corpus, hook="encoder.layer.0", rows=500, context=32, shard_rows=500,
                      keep_special=keep), tmp_path / "b", progress=False)
    toks = np.load(tmp_path / "b" / m["shards"][0]["tokens"])
    assert m["d_in"] == 32 and m["keep_special"] is keep
    has_special = np.isin(toks[:, 0], [tok.cls_token_id, tok.sep_token_id])
    assert has_special.any() == keep
    if keep:
        assert toks[0, 2] == 0 and toks[0, 0] == tok.cls_token_id  # [CLS] at position 0
    else:
        assert set(np.unique(toks[:, 2])) == set(range(1, 31))  # every position but [CLS] and [SEP]


def test_user_errors(tmp_path, tiny_gpt2, corpus):
    with pytest.raises(ConfigError, match="did you mean transformer.h.0"):
        H.harvest(cfg(tiny_gpt2, corpus, hook="transformer.h0"), tmp_path / "x", progress=False)
    with pytest.raises(DataError, match="offline"):
        H.harvest(cfg(tmp_path / "no-such-model", corpus), tmp_path / "y", progress=False)
    with pytest.raises(ConfigError, match="bfloat16"):
        cfg(tiny_gpt2, corpus, dtype="bfloat16")
    with pytest.raises(ConfigError, match="whole contexts"):
        cfg(tiny_gpt2, corpus, shard_rows=10)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an activation directory"):
        H.harvest(cfg(tiny_gpt2, corpus), tmp_path / "busy", progress=False)


def test_manifest_shards_decide_what_open_source_reads(tmp_path):
    np.save(tmp_path / "acts-00000.npy", np.ones((3, 2), np.float32))
    np.save(tmp_path / "acts-00001.npy", np.zeros((4, 2), np.float32))  # an orphan of an interrupted write
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"file": "acts-00000.npy", "rows": 3}]}))
    assert open_source(tmp_path).n_rows == 3
    (tmp_path / "manifest.json").write_text(json.dumps({"aux_files": ["acts-00001.npy"]}))
    np.save(tmp_path / "tokens-00000.npy", np.zeros((9, 3), np.int32))
    assert open_source(tmp_path).n_rows == 3


def test_model_names_resolve_from_the_local_cache_only(tmp_path, tiny_gpt2):
    """A name (not a directory) loads from the Hugging Face cache layout, offline; a missing one fails clearly."""
    import os
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--local--tiny-gpt2" / "snapshots" / "abc"
    shutil.copytree(tiny_gpt2, snapshot)
    (tmp_path / "hub" / "models--local--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--local--tiny-gpt2" / "refs" / "main").write_text("abc")
    code = ("from flashsae.lm.activations import load_lm\n"
            "from flashsae.errors import DataError\n"
            "m, t = load_lm('local/tiny-gpt2'); print(type(m).__name__)\n"
            "try:\n    load_lm('local/missing')\nexcept DataError as e:\n    print('DataError', e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "GPT2LMHeadModel" in out.stdout and "DataError cannot load model 'local/missing' offline" in out.stdout


def test_overwrite_keeps_the_old_harvest_until_the_new_one_starts(tmp_path, gpt2_acts, tiny_gpt2, corpus):
    import shutil

    full, m = gpt2_acts
    out = tmp_path / "acts"
    shutil.copytree(full, out)
    with pytest.raises(ConfigError, match="no module named 'transformer.h9'"):
        H.harvest(cfg(tiny_gpt2, corpus, hook="transformer.h9"), out, overwrite=True, progress=False)
    assert A.read_manifest(out) == m
    again = H.harvest(cfg(tiny_gpt2, corpus, hook="transformer.h.1", rows=500), out, overwrite=True, progress=False)
    assert again["hook"] == "transformer.h.1" and again["rows"] == 500 and open_source(out).n_rows == 500


TWO_HOOKS = ("transformer.h.0", "transformer.h.1")


def test_several_hooks_in_one_forward_pass(tmp_path, monkeypatch, tiny_gpt2, corpus):
    passes = []
    real_capture = A.capture
    monkeypatch.setattr(A, "capture", lambda model, modules, ids: passes.append(len(modules)) or
                        real_capture(model, modules, ids))
    out = tmp_path / "acts"
    ms = H.harvest_many(cfg(tiny_gpt2, corpus, hook=TWO_HOOKS, max_norm_factor=1.5), out, progress=False)
    last_context = max(m["next_context"] for m in ms.values()) - 1
    assert set(passes) == {2} and len(passes) == last_context // 8 + 1  # one pass per batch of 8 contexts
    assert sorted(p.name for p in out.iterdir()) == list(TWO_HOOKS)
    for hook in TWO_HOOKS:
        alone = H.harvest(cfg(tiny_gpt2, corpus, hook=hook, max_norm_factor=1.5), tmp_path / hook, progress=False)
        m = A.read_manifest(out / hook)
        assert m == ms[hook] and m["hook"] == hook and m["complete"] and m["rows"] == 3000
        assert m["shards"] == alone["shards"] and m["median_norm"] == alone["median_norm"]
        np.testing.assert_array_equal(open_source(out / hook).read(0, 3000), open_source(tmp_path / hook).read(0, 3000))
    with pytest.raises(ConfigError, match="harvest_many writes one directory per hook"):
        H.harvest(cfg(tiny_gpt2, corpus, hook=TWO_HOOKS), out, progress=False)


def test_several_hooks_resume_each_directory_on_its_own(tmp_path, monkeypatch, tiny_gpt2, corpus):
    straight = H.harvest_many(cfg(tiny_gpt2, corpus, hook=(*TWO_HOOKS, "transformer.ln_f"), max_norm_factor=1.5),
                              tmp_path / "straight", progress=False)
    out = tmp_path / "acts"
    real_flush = H._ShardWriter._flush
    calls = {"n": 0}

    def flaky(self, limit):
        if calls["n"] == 3:  # transformer.h.0 has written two shards, transformer.h.1 one
            raise KeyboardInterrupt
        calls["n"] += 1
        real_flush(self, limit)

    monkeypatch.setattr(H._ShardWriter, "_flush", flaky)
    with pytest.raises(KeyboardInterrupt):
        H.harvest_many(cfg(tiny_gpt2, corpus, hook=TWO_HOOKS, max_norm_factor=1.5), out, progress=False)
    assert [len(A.read_manifest(out / h)["shards"]) for h in TWO_HOOKS] == [2, 1]
    monkeypatch.setattr(H._ShardWriter, "_flush", real_flush)
    # resume the two, and add a third hook that starts from the first context
    ms = H.harvest_many(cfg(tiny_gpt2, corpus, hook=(*TWO_HOOKS, "transformer.ln_f"), max_norm_factor=1.5), out,
                        progress=False)
    for hook, m in ms.items():
        assert m["shards"] == straight[hook]["shards"], hook
        np.testing.assert_array_equal(open_source(out / hook).read(0, 3000),
                                      open_source(tmp_path / "straight" / hook).read(0, 3000))


def test_several_hooks_user_errors(tmp_path, tiny_gpt2, corpus):
    with pytest.raises(ConfigError, match="hook 'transformer.h.0' is given twice"):
        cfg(tiny_gpt2, corpus, hook=("transformer.h.0", "transformer.h.0"))
    with pytest.raises(ConfigError, match="hook '../x' cannot name the directory OUT/<hook>/"):
        cfg(tiny_gpt2, corpus, hook=("transformer.h.0", "../x"))
    with pytest.raises(ConfigError, match="give at least one hook"):
        cfg(tiny_gpt2, corpus, hook=())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds 'notes.txt', which is not a harvest directory"):
        H.harvest_many(cfg(tiny_gpt2, corpus, hook=TWO_HOOKS), tmp_path / "busy", progress=False)
    with pytest.raises(ConfigError, match="no module named 'transformer.h.7'"):
        H.harvest_many(cfg(tiny_gpt2, corpus, hook=("transformer.h.0", "transformer.h.7")), tmp_path / "new",
                       progress=False)
    assert not (tmp_path / "new").exists()


def test_model_and_corpus_may_be_paths(tmp_path, tiny_gpt2, corpus):
    m = H.harvest(H.HarvestConfig(model=tiny_gpt2, hook="transformer.h.0", text=corpus, rows=100, context=32),
                  tmp_path / "acts", progress=False)
    assert (m["model"], m["text"], m["rows"]) == (str(tiny_gpt2), str(corpus), 100)
    assert H.harvest(H.HarvestConfig(model=str(tiny_gpt2), hook="transformer.h.0", text=str(corpus), rows=100,
                                     context=32), tmp_path / "acts", progress=False)["rows"] == 100  # resumes
