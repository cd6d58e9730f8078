"""FLASHSAE_KERNELS: one parse, loud on a bad value, and the path that runs recorded in config.json."""
import platform

import pytest
import torch

import flashsae
from flashsae import ConfigError, io, kernels
from flashsae.kernels import cpu_topk, selection

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # describe() needs no GPU to answer for CUDA


@pytest.fixture(autouse=True)
def _fresh_parse(monkeypatch):
    """The parse caches whether triton imports; start and end each test from a clean cache."""
    selection.triton_importable.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # test_triton.py sets it for the whole session
    yield
    monkeypatch.undo()
    selection.triton_importable.cache_clear()


def _tiny_decode():
    return kernels.sparse_decode(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64), torch.ones(3, 4))


@pytest.mark.parametrize("value", ["trition", "fast", "cuda", "reference,triton"])
def test_an_unknown_value_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("FLASHSAE_KERNELS", value)
    with pytest.raises(ConfigError, match=rf"FLASHSAE_KERNELS='{value}' is not one of auto, reference, triton"):
        selection.setting()
    for reader in (lambda: kernels.describe(CPU), lambda: kernels.describe(CUDA), _tiny_decode,
                   cpu_topk.available, cpu_topk.build, lambda: cpu_topk.topk(torch.randn(4, 512), 8)):
        with pytest.raises(ConfigError, match="is not one of"):
            reader()
    with pytest.raises(ConfigError, match="is not one of"):
        flashsae.train("digits", rows=640, batch_size=64, quiet=True)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_triton_without_triton_is_a_config_error(monkeypatch, device):
    monkeypatch.setattr(selection, "triton_importable", lambda: False)
    monkeypatch.setenv("FLASHSAE_KERNELS", " Triton ")
    message = "FLASHSAE_KERNELS=triton but triton is not installed; pip install triton"
    with pytest.raises(ConfigError, match=message):
        selection.setting()
    with pytest.raises(ConfigError, match=message):
        kernels.describe(device)
    with pytest.raises(ConfigError, match=message):
        _tiny_decode()


@pytest.mark.parametrize("value", ["", "auto", " AUTO ", "reference", "Reference\n"])
def test_valid_values_on_the_cpu(monkeypatch, value):
    monkeypatch.setenv("FLASHSAE_KERNELS", value)
    described = kernels.describe(CPU)
    setting = value.strip().lower() or "auto"
    assert described["kernels"] == "reference" and described["kernels_setting"] == setting
    # The compiled CPU top-k reads the same setting: reference means torch.topk.
    compiled = cpu_topk._library()
    expected = "torch.topk" if setting == "reference" or compiled is None else f"compiled ({compiled.build})"
    assert described["cpu_topk"] == expected
    assert cpu_topk.available() == expected.startswith("compiled")
    assert kernels.describe("cpu") == described  # a device name works too


def test_unset_is_auto(monkeypatch):
    monkeypatch.delenv("FLASHSAE_KERNELS", raising=False)
    assert selection.setting() == "auto"
    assert kernels.describe(CPU)["kernels_setting"] == "auto"


@pytest.mark.parametrize("importable", [True, False])
def test_auto_picks_triton_on_cuda_when_it_imports(monkeypatch, importable):
    monkeypatch.setattr(selection, "triton_importable", lambda: importable)
    monkeypatch.setenv("FLASHSAE_KERNELS", "auto")
    expected = "triton" if importable else "reference"
    assert kernels.describe(CUDA) == {"kernels": expected, "kernels_setting": "auto", "cpu_topk": None}
    assert kernels.describe("cuda:1")["kernels"] == expected
    assert kernels.describe(CPU)["kernels"] == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is used only when triton is asked for
    assert kernels.describe(CPU)["kernels"] == "reference"


def test_reference_runs_the_reference_everywhere(monkeypatch):
    monkeypatch.setattr(selection, "triton_importable", lambda: True)
    monkeypatch.setenv("FLASHSAE_KERNELS", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.describe(CUDA) == {"kernels": "reference", "kernels_setting": "reference", "cpu_topk": None}
    assert kernels.describe(CPU)["kernels"] == "reference"


def test_triton_runs_where_it_can(monkeypatch):
    monkeypatch.setattr(selection, "triton_importable", lambda: True)
    monkeypatch.setenv("FLASHSAE_KERNELS", "triton")
    assert kernels.describe(CUDA)["kernels"] == "triton"
    assert kernels.describe(CPU)["kernels"] == "reference"  # no interpreter: Triton cannot run CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.describe(CPU)["kernels"] == "triton"


def test_cpu_topk_honours_reference_through_the_shared_parse(monkeypatch):
    def must_not_run(*args):
        raise AssertionError("the compiled top-k ran under FLASHSAE_KERNELS=reference")

    monkeypatch.setattr(cpu_topk, "_library", lambda: cpu_topk._Compiled(must_not_run, "portable"))
    monkeypatch.setenv("FLASHSAE_KERNELS", " REFERENCE ")
    assert cpu_topk.build() is None and not cpu_topk.available()
    x = torch.randn(6, 1024)
    values, _ = cpu_topk.topk(x, 16)
    torch.testing.assert_close(values.sort(-1).values, x.topk(16, dim=-1).values.sort(-1).values)
    assert kernels.describe(CPU)["cpu_topk"] == "torch.topk"
    monkeypatch.setenv("FLASHSAE_KERNELS", "auto")  # the same stub is used as soon as the setting allows it
    assert cpu_topk.build() == "portable" and kernels.describe(CPU)["cpu_topk"] == "compiled (portable)"
    with pytest.raises(AssertionError, match="ran under"):
        cpu_topk.topk(x, 16)


@pytest.mark.skipif(cpu_topk._library() is None, reason="needs the compiler")
def test_the_build_reported_is_the_one_compiled():
    flags = ""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            pytest.skip("no /proc/cpuinfo to tell whether the CPU has AVX-512")
    assert cpu_topk.build() == ("avx512" if " avx512f" in flags else "portable")


def test_the_kernel_path_that_ran_is_in_config_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHSAE_KERNELS", "reference")
    flashsae.train("digits", rows=640, batch_size=64, quiet=True, out=tmp_path / "run")
    resolved = io.read_json(tmp_path / "run" / io.CONFIG_FILE)["resolved"]
    assert (resolved["kernels"], resolved["kernels_setting"], resolved["cpu_topk"]) == ("reference", "reference",
                                                                                         "torch.topk")
    assert resolved["dtype"] in ("float32", "bfloat16")
