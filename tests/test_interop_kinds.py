"""SAELens export of transcoders: the files, run through SAELens's transcoder forward by hand, give
`model.reconstruct`; and with SAELens itself when it is installed."""
import json

import pytest
import torch
from safetensors.torch import load_file

from flashsae import interop, models
from flashsae.errors import ConfigError

D_IN, D_OUT, D_SAE = 10, 7, 40


def saved_transcoder(save, path, arch: str, *, skip: bool, standardize: str = "column", **options):
    return save(path, arch, standardize=standardize, d_in=D_IN, d_out=D_OUT, d_sae=D_SAE, skip=skip, **options)


def saelens_transcoder_forward(cfg: dict, w: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens's transcoder inference, written from its documented formula:
    pre = x W_enc + b_enc; codes = relu(pre) (times pre > threshold for the jumprelu kinds);
    y = codes W_dec + b_dec (+ x W_skip^T for the skip kinds). x is not centred by b_dec."""
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    pre = x @ w["W_enc"] + w["b_enc"]
    codes = torch.relu(pre)
    if cfg["architecture"].startswith("jumprelu"):
        codes = codes * (pre > w["threshold"])
    y = codes @ w["W_dec"] + w["b_dec"]
    if "skip" in cfg["architecture"]:
        y = y + x @ w["W_skip"].T
    return y


CASES = [("relu-l1-transcoder", False, "transcoder"), ("relu-l1-transcoder", True, "skip_transcoder"),
         ("jumprelu-transcoder", False, "jumprelu_transcoder"),
         ("jumprelu-transcoder", True, "jumprelu_skip_transcoder"),
         ("batchtopk-transcoder", False, "jumprelu_transcoder"),
         ("batchtopk-transcoder", True, "jumprelu_skip_transcoder")]


@pytest.mark.parametrize("arch, skip, saelens_arch", CASES)
@pytest.mark.parametrize("standardize", ["none", "column"])
def test_transcoder_export_reproduces_reconstruct(tmp_path, arch, skip, saelens_arch, standardize, hand_built_run):
    options = {"k": 5} if "topk" in arch else {}
    model = saved_transcoder(hand_built_run, tmp_path / "run", arch, skip=skip, standardize=standardize, **options)
    interop.export_saelens(tmp_path / "run", tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    w = {k: v.double() for k, v in load_file(tmp_path / "sl" / "sae_weights.safetensors").items()}
    assert cfg["architecture"] == saelens_arch and cfg["metadata"]["flashsae_architecture"] == arch
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (D_IN, D_OUT, D_SAE)
    assert w["W_enc"].shape == (D_IN, D_SAE) and w["b_enc"].shape == (D_SAE,)
    assert w["W_dec"].shape == (D_SAE, D_OUT) and w["b_dec"].shape == (D_OUT,)
    assert ("W_skip" in w) == skip and (not skip or w["W_skip"].shape == (D_OUT, D_IN))
    assert ("threshold" in w) == saelens_arch.startswith("jumprelu")
    x = torch.randn(300, D_IN, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.5
    expected = model.reconstruct(x)
    got = saelens_transcoder_forward(cfg, w, x.double()).float()
    assert (model.encode(x) > 0).float().mean() > 0.02  # some latents fire: the comparison has teeth
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_topk_transcoder_export_refuses_in_one_line(tmp_path, hand_built_run):
    saved_transcoder(hand_built_run, tmp_path / "run", "transcoder", skip=False, k=5)
    with pytest.raises(ConfigError) as e:
        interop.export_saelens(tmp_path / "run", tmp_path / "sl")
    msg = str(e.value)
    assert "\n" not in msg and "architecture 'transcoder' has no SAELens equivalent" in msg
    assert "SAELens has no top-k transcoder" in msg and "batchtopk-transcoder" in msg
    assert not (tmp_path / "sl").exists()


def test_crosscoders_and_clts_are_refused_and_transcoders_listed(tmp_path):
    exportable = [n for n in models.names() if models.get(n).saelens_names()]
    assert {"relu-l1-transcoder", "jumprelu-transcoder", "batchtopk-transcoder"} <= set(exportable)
    assert "transcoder" not in exportable
    assert models.get("relu-l1-transcoder").saelens_names() == ("transcoder", "skip_transcoder")


@pytest.mark.parametrize("arch, skip, saelens_arch", CASES[:4])
def test_saelens_loads_the_transcoder_export(tmp_path, arch, skip, saelens_arch, hand_built_run):
    sae_lens = pytest.importorskip("sae_lens")
    model = saved_transcoder(hand_built_run, tmp_path / "run", arch, skip=skip)
    interop.export_saelens(tmp_path / "run", tmp_path / "sl")
    try:
        sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    except (KeyError, ValueError) as e:  # an older SAELens without this transcoder kind
        pytest.skip(f"this SAELens cannot load {saelens_arch}: {e}")
    x = torch.randn(100, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(sae(x), model.reconstruct(x), atol=1e-5, rtol=1e-5)
