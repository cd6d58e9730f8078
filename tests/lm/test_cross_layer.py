"""A cross-layer transcoder from one harvest of a causal LM's MLP inputs and outputs, spliced back.

The tiny random GPT-2 of the fixtures: its two MLPs read ln_2 and write mlp. The run records the
four harvested modules, so evaluation needs only the corpus.
"""
import pytest

pytest.importorskip("transformers")

import flashsae  # noqa: E402
from flashsae.lm.downstream import evaluate_downstream, provenance  # noqa: E402
from flashsae.lm.harvest import HarvestConfig, harvest_many  # noqa: E402


def test_clt_trains_on_harvested_mlps_and_splices_into_every_output_layer(tmp_path, tiny_gpt2, corpus):
    ins, outs = ["transformer.h.0.ln_2", "transformer.h.1.ln_2"], ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    harvest_many(HarvestConfig(model=str(tiny_gpt2), hook=(*ins, *outs), text=str(corpus), rows=6000, context=64,
                               batch=16), tmp_path / "acts", progress=False)
    run = tmp_path / "clt"
    model, result = flashsae.train([str(tmp_path / "acts" / h) for h in ins], target=[str(tmp_path / "acts" / h)
                                   for h in outs], arch="clt", k=16, latents=256, rows=30_000, batch_size=256,
                                   out=run, quiet=True, seed=0)
    assert model.cfg.layers == 2 and model.d_in == model.d_out == 128
    assert result.metrics["fvu"] < 0.6, result.metrics  # of both MLP outputs; the mean alone gives 1
    loaded = flashsae.load(run)
    prov = provenance(loaded.run_config)
    assert prov["hook"] == ins and prov["target_hook"] == outs
    got = evaluate_downstream(loaded, text=corpus, rows=512, batch=16, run_dir=run)
    assert got["kind"] == "causal-lm" and got["hook"] == ins and got["target_hook"] == outs
    print({k: round(v, 4) for k, v in got.items() if isinstance(v, float)})
    assert got["hook_fvu"] < 0.8, got
    assert got["kl_spliced"] < got["kl_zero"], got  # closer to the clean model than zeroing both MLPs
