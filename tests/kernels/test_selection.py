"""FLASHSAE_KERNELS: one parse, loud on a bad value, and the path that runs recorded in config.json."""
import pytest
import torch

import flashsae
from flashsae import ConfigError, io, kernels
from flashsae.kernels import cpu_topk, selection


@pytest.mark.parametrize("value", ["trition", "fast", "cuda"])
def test_an_unknown_value_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("FLASHSAE_KERNELS", value)
    with pytest.raises(ConfigError, match=rf"FLASHSAE_KERNELS='{value}' is not one of auto, reference, triton"):
        selection.setting()
    with pytest.raises(ConfigError, match="is not one of"):
        kernels.sparse_decode(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64), torch.ones(3, 4))
    with pytest.raises(ConfigError, match="is not one of"):
        flashsae.train("digits", rows=640, batch_size=64, quiet=True)


def test_triton_without_triton_is_a_config_error(monkeypatch):
    monkeypatch.setattr(selection, "triton_importable", lambda: False)
    monkeypatch.setenv("FLASHSAE_KERNELS", " Triton ")
    with pytest.raises(ConfigError, match="FLASHSAE_KERNELS=triton but triton is not installed"):
        selection.setting()


@pytest.mark.parametrize("value", ["", "auto", " AUTO ", "reference"])
def test_valid_values(monkeypatch, value):
    monkeypatch.setenv("FLASHSAE_KERNELS", value)
    described = kernels.describe(torch.device("cpu"))
    assert described["kernels"] == "reference" and described["kernels_setting"] == (value.strip().lower() or "auto")
    # The compiled CPU top-k reads the same setting: reference means torch.topk.
    expected = "torch.topk" if value == "reference" or cpu_topk._library() is None else "compiled"
    assert described["cpu_topk"] == expected
    assert cpu_topk.available() == (expected == "compiled")


def test_the_kernel_path_that_ran_is_in_config_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHSAE_KERNELS", "reference")
    flashsae.train("digits", rows=640, batch_size=64, quiet=True, out=tmp_path / "run")
    resolved = io.read_json(tmp_path / "run" / io.CONFIG_FILE)["resolved"]
    assert (resolved["kernels"], resolved["kernels_setting"], resolved["cpu_topk"]) == ("reference", "reference",
                                                                                         "torch.topk")
    assert resolved["dtype"] in ("float32", "bfloat16")
