"""Export to SAELens and import SAELens / sparsify directories; compared with the real packages when installed."""
import json

import pytest
import torch
from safetensors.torch import save_file

import flashsae
from flashsae import interop, models
from flashsae.errors import ArtifactError, ConfigError

D_IN, D_SAE = 12, 48
EXPORTABLE = [name for name in models.names() if models.get(name).saelens_architecture is not None]


def small_options(arch: str) -> dict:
    return {"k": 5} if arch in models.options().get("k", {}) else {}


@pytest.fixture
def saved_run(hand_built_run):
    """save(path, arch, **options): a hand-built model of this file's sizes, saved as a run and loaded back."""
    return lambda path, arch, **options: hand_built_run(path, arch, d_in=D_IN, d_sae=D_SAE, **options)


def rows(n=200):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1)) * 1.5


def test_every_saelens_architecture_exported_has_one_importer():
    exported = {models.get(name).saelens_architecture for name in EXPORTABLE}
    importers = [models.get(name).saelens_architecture for name in models.names() if models.get(name).saelens_imports]
    assert sorted(importers) == sorted(set(importers)) and exported == set(importers)
    assert exported == {"standard", "topk", "jumprelu", "gated"}  # SAELens inference architectures


@pytest.mark.parametrize("arch", EXPORTABLE)
@pytest.mark.parametrize("standardize", ["none", "column"])
def test_export_import_round_trip(tmp_path, arch, standardize, saved_run):
    model = saved_run(tmp_path / "run", arch, standardize=standardize, **small_options(arch))
    interop.export_saelens(tmp_path / "run", tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == type(model).saelens_architecture
    assert cfg["metadata"]["flashsae_architecture"] == arch
    from safetensors.torch import load_file

    w = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    assert w["W_enc"].shape == (D_IN, D_SAE) and w["W_dec"].shape == (D_SAE, D_IN)
    assert ("threshold" in w) == (cfg["architecture"] == "jumprelu")
    interop.import_dir(tmp_path / "sl", tmp_path / "back")
    back = flashsae.load(tmp_path / "back")
    assert back.standardizer.mode == "none"
    x = rows()
    codes, back_codes = model.encode(x), back.encode(x)
    if standardize == "none" and arch not in ("batchtopk",):
        assert torch.equal(codes, back_codes)  # nothing to fold: identical weights, identical codes
    else:
        torch.testing.assert_close(back_codes, codes, atol=1e-5, rtol=1e-5)
    assert ((codes > 0) == (back_codes > 0)).float().mean() > 0.999
    torch.testing.assert_close(back.decode(back_codes), model.decode(codes), atol=1e-4, rtol=1e-4)


def test_imported_run_works_with_the_rest_of_flashsae(tmp_path, capsys, saved_run):
    saved_run(tmp_path / "run", "topk", k=5)
    interop.export_saelens(tmp_path / "run", tmp_path / "sl")
    from flashsae.cli import main

    assert main(["import", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 0
    assert main(["info", str(tmp_path / "back")]) == 0
    assert "topk" in capsys.readouterr().out
    cfg = flashsae.load(tmp_path / "back").run_config
    assert cfg["data_stats"]["imported"]["format"] == "saelens"


def sparsify_dir(path, *, activation="topk", **extra):
    torch.manual_seed(2)
    W = torch.randn(D_SAE, D_IN)
    tensors = {"encoder.weight": W, "encoder.bias": torch.randn(D_SAE) * 0.1,
               "W_dec": W / W.norm(dim=1, keepdim=True), "b_dec": torch.randn(D_IN) * 0.1}
    path.mkdir()
    save_file(tensors, path / "sae.safetensors")
    cfg = {"activation": activation, "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE,
           "k": 6, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **extra}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def test_sparsify_import_matches_its_encoder(tmp_path):
    t = sparsify_dir(tmp_path / "sp")
    interop.import_dir(tmp_path / "sp", tmp_path / "run")
    model = flashsae.load(tmp_path / "run")
    assert model.architecture == "topk" and model.cfg.k == 6 and model.cfg.normalize_decoder
    x = rows()
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])  # sparsify: relu, then top-k
    top, idx = pre.topk(6, dim=1)
    want = torch.zeros_like(pre).scatter_(1, idx, top)
    torch.testing.assert_close(model.encode(x), want)
    torch.testing.assert_close(model.decode(want), want @ t["W_dec"] + t["b_dec"])


def test_import_errors(tmp_path, saved_run):
    sparsify_dir(tmp_path / "gm", activation="groupmax")
    with pytest.raises(ArtifactError, match="groupmax"):
        interop.import_dir(tmp_path / "gm", tmp_path / "r1")
    sparsify_dir(tmp_path / "tc", transcode=True)
    with pytest.raises(ArtifactError, match="transcoders"):
        interop.import_dir(tmp_path / "tc", tmp_path / "r2")
    (tmp_path / "many" / "layers.3").mkdir(parents=True)
    (tmp_path / "many" / "layers.3" / "sae.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactError, match="pick one: layers.3"):
        interop.import_dir(tmp_path / "many", tmp_path / "r3")
    saved_run(tmp_path / "kl", "kl")
    with pytest.raises(ConfigError, match="architecture 'kl' has no SAELens equivalent; exportable: batchtopk"):
        interop.export_saelens(tmp_path / "kl", tmp_path / "kl-out")
    saved_run(tmp_path / "gated", "topk", k=4)
    interop.export_saelens(tmp_path / "gated", tmp_path / "gated-sl")
    cfg = json.loads((tmp_path / "gated-sl" / "cfg.json").read_text())
    (tmp_path / "gated-sl" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "temporal"}))
    with pytest.raises(ArtifactError, match=r"SAELens architecture 'temporal' has no flashsae equivalent "
                                            r"\(supported: gated, jumprelu, standard, topk\)"):
        interop.import_dir(tmp_path / "gated-sl", tmp_path / "r4")
    (tmp_path / "gated-sl" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ArtifactError, match=r"sae_weights.safetensors is missing tensors b_gate, r_mag, b_mag"):
        interop.import_dir(tmp_path / "gated-sl", tmp_path / "r4")
    (tmp_path / "gated-sl" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "standard",
                                                                "activation_fn": "tanh"}))
    with pytest.raises(ArtifactError, match="cfg.json: activation 'tanh' is not supported for standard SAEs"):
        interop.import_dir(tmp_path / "gated-sl", tmp_path / "r5")
    saved_run(tmp_path / "deep", "topk", k=4, encoder_hidden=(8,))
    with pytest.raises(ConfigError, match="hidden layers"):
        interop.export_saelens(tmp_path / "deep", tmp_path / "deep-out")


def test_saelens_variants_fold_exactly(tmp_path):
    """apply_b_dec_to_input=False and rescale_acts_by_decoder_norm=True become plain flashsae weights."""
    torch.manual_seed(3)
    W_enc, W_dec = torch.randn(D_IN, D_SAE), torch.randn(D_SAE, D_IN) * 2
    b_enc, b_dec = torch.randn(D_SAE) * 0.1, torch.randn(D_IN)
    (tmp_path / "sl").mkdir()
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              tmp_path / "sl" / "sae_weights.safetensors")
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "topk", "k": 4, "apply_b_dec_to_input": False,
           "rescale_acts_by_decoder_norm": True, "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0"}}
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    model = interop.load_saelens(tmp_path / "sl")
    x = rows()
    pre = (x @ W_enc + b_enc) * W_dec.norm(dim=1)  # SAELens TopKSAE.encode with these flags
    top, idx = pre.topk(4, dim=1)
    acts = torch.zeros_like(pre).scatter_(1, idx, top.relu())
    recon = acts @ (W_dec / W_dec.norm(dim=1, keepdim=True)) + b_dec
    torch.testing.assert_close(model.encode(x), acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(model.encode(x)), recon, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_real_saelens_loads_the_export(tmp_path, arch, saved_run):
    sae_lens = pytest.importorskip("sae_lens")
    model = saved_run(tmp_path / "run", arch, **small_options(arch))
    interop.export_saelens(tmp_path / "run", tmp_path / "sl")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    x = rows()
    torch.testing.assert_close(sae.encode(x), model.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), model.decode(model.encode(x)), atol=1e-4, rtol=1e-4)
    # and back: SAELens's own save, imported
    sae.save_model(str(tmp_path / "resaved"))
    back = interop.load_saelens(tmp_path / "resaved")
    torch.testing.assert_close(back.encode(x), model.encode(x), atol=1e-5, rtol=1e-5)


def test_real_sparsify_directory(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(4)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=5))
    with torch.no_grad():
        coder.encoder.bias.normal_()
        coder.b_dec.normal_()
    coder.save_to_disk(tmp_path / "sp")
    model = interop.load_sparsify(tmp_path / "sp")
    x = rows()
    out = coder.encode(x)
    dense = torch.zeros(len(x), D_SAE).scatter_(1, out.top_indices, out.top_acts)
    torch.testing.assert_close(model.encode(x), dense, atol=1e-5, rtol=1e-5)
