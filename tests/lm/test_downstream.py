import pytest
import torch

pytest.importorskip("transformers")

import flashsae  # noqa: E402
from flashsae.errors import ConfigError, DataError  # noqa: E402
from flashsae.lm import activations as A  # noqa: E402
from flashsae.lm import downstream as D  # noqa: E402
from flashsae.preprocess import Standardizer  # noqa: E402


def identity_sae(d: int, *, standardize: bool = False):
    """relu(x) - relu(-x) = x: a relu-l1 SAE that reconstructs every row exactly."""
    std = Standardizer(d, "column" if standardize else "none")
    if standardize:
        std.mean.copy_(torch.randn(d))
        std.scale.copy_(torch.rand(d) + 0.5)
    sae = flashsae.build("relu-l1", standardizer=std, d_in=d, d_sae=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def zero_sae(d: int):
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return A.load_lm(str(tiny_gpt2))


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return A.load_lm(str(tiny_bert))


def run(sae, lm, corpus, hook, **kw):
    model, tok = lm
    return D.downstream_metrics(sae, model, tok, hook, corpus, **{"rows": 256, "context": 32, **kw})


@pytest.mark.parametrize("standardize", [False, True])
def test_exact_reconstruction_recovers_all_the_loss(gpt2, corpus, standardize):
    m = run(identity_sae(64, standardize=standardize), gpt2, corpus, "transformer.h.0")
    assert m["kind"] == "causal-lm" and m["contexts"] == 8 and m["spliced_positions"] == 256
    assert m["hook_fvu"] < 1e-9
    assert m["loss_spliced"] == pytest.approx(m["loss_clean"], abs=1e-5)
    assert m["kl_spliced"] < 1e-8 < m["kl_zero"]
    assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_zero_reconstruction_recovers_nothing(gpt2, corpus):
    m = run(zero_sae(64), gpt2, corpus, "transformer.h.1")
    assert m["loss_spliced"] == pytest.approx(m["loss_zero"], abs=1e-9)
    assert m["kl_spliced"] == pytest.approx(m["kl_zero"])
    assert m["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["hook_fvu"] > 0.9


def test_encoder_metrics(bert, corpus):
    exact = run(identity_sae(32), bert, corpus, "encoder.layer.0")
    assert exact["kind"] == "encoder"
    assert exact["hidden_cosine"] == pytest.approx(1.0, abs=1e-5) and exact["hidden_mse"] < 1e-10
    assert exact["pooled_cosine"] == pytest.approx(1.0, abs=1e-5)
    zero = run(zero_sae(32), bert, corpus, "encoder.layer.0")
    assert zero["hidden_cosine"] == pytest.approx(zero["hidden_cosine_zero"])
    assert zero["hidden_cosine_zero"] < 0.9 and zero["hidden_mse_zero"] > 0


def test_special_positions_keep_clean_activations(bert, corpus):
    model, tok = bert
    seen = {}
    state = {"fn": lambda h: seen.setdefault("rows", h.shape[0]) and torch.zeros_like(h)}
    ids = torch.tensor([[tok.cls_token_id, 2000, 2001, 2002, tok.sep_token_id]])
    state["mask"] = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    module = A.find_module(model, "encoder.layer.0")
    hooks = dict(module._forward_hooks)
    with D.splice(module, state):
        model(input_ids=ids)
    assert seen["rows"] == 3
    assert dict(module._forward_hooks) == hooks  # the splice hook is gone afterwards


def test_provenance_defaults_and_errors(tmp_path, gpt2, corpus):
    sae = identity_sae(64)
    with pytest.raises(ConfigError, match="--model and --hook are needed"):
        D.evaluate_downstream(sae, text=corpus)
    model, tok = gpt2
    with pytest.raises(DataError, match="module 'transformer.h.0' outputs width 64 but the model expects 8"):
        D.downstream_metrics(identity_sae(8), model, tok, "transformer.h.0", corpus, rows=32, context=32)
    with pytest.raises(DataError, match="no contexts after the first 100000"):
        D.downstream_metrics(sae, model, tok, "transformer.h.0", corpus, rows=32, context=32, start_context=100_000)
    assert D.is_causal_lm(model) and not D.is_causal_lm(torch.nn.Linear(2, 2))


def test_provenance_order_and_the_harvest_above_the_run(tmp_path, monkeypatch):
    import json

    acts = tmp_path / "acts"
    acts.mkdir()
    recorded = {"model": "/models/m", "hook": "h.1", "context": 16, "keep_special": False, "text": "/c.txt",
                "next_context": 5}
    (acts / A.MANIFEST_FILE).write_text(json.dumps({"format": A.MANIFEST_FORMAT, "format_version": A.MANIFEST_VERSION,
                                                    "rows": 10, "d_in": 4, "provenance": recorded}))
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    config = {"data": {"data": "acts"}, "data_stats": {"n_rows": 10, "d_in": 4}}
    monkeypatch.chdir(tmp_path / "runs")
    assert D.provenance(config) == {}  # acts/ is not beside the current directory
    assert D.provenance(config, run_dir) == recorded  # ... but above the run
    assert D.provenance({**config, "data_stats": {"n_rows": 11, "d_in": 4}}, run_dir) == {}  # another harvest
    own = {**recorded, "hook": "h.2"}
    assert D.provenance({**config, "data_stats": {"provenance": own}}, run_dir) == own  # the run's record first
