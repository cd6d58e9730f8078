import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def small_synthetic():
    """A planted sparse dictionary small enough for quick learning tests: (X, atoms)."""
    from flashsae.data import make_synthetic

    return make_synthetic(rows=20_000, d=32, atoms=64, active=3, noise=0.01, seed=1)


@pytest.fixture
def hand_built_run():
    """save(path, arch, standardize="column", **build_options) -> the model, loaded back from a run
    directory written at `path`: built with random, fitted-looking standardisations (of the target
    too, for transcoders), biases, skip weights and thresholds, so that an export or an import that
    drops any of them shows."""
    import flashsae
    from flashsae import interop, io
    from flashsae.preprocess import Standardizer

    def save(path, arch: str, *, standardize: str = "column", d_in: int, **options):
        torch.manual_seed(0)
        model = flashsae.build(arch, standardizer=Standardizer(d_in, standardize), d_in=d_in, **options)
        with torch.no_grad():
            for std in (model.standardizer, getattr(model, "target_standardizer", None)):
                if std is not None and standardize != "none":
                    std.mean.copy_(torch.randn(std.mean.shape))
                    std.scale.copy_(torch.rand(std.scale.shape) + 0.5)
            model.b_enc.normal_(0, 0.3)
            model.b_dec.normal_(0, 0.3)
            if isinstance(getattr(model, "W_skip", None), torch.Tensor):
                model.W_skip.normal_(0, 0.3)
            if hasattr(model, "log_threshold"):  # jumprelu: thresholds that zero some codes
                model.log_threshold.copy_(torch.rand(model.d_sae).add(0.2).log())
            if isinstance(getattr(model, "threshold", None), torch.Tensor):  # batchtopk
                model.threshold.fill_(0.4)
        config = interop._run_config(model, {"format": "test"})
        config["preprocess"] = {"mode": standardize}
        work = io.prepare_out(path, overwrite=True, resume=False)
        io.save_model(work, model, config)
        io.finalize(work, path)
        return flashsae.load(path)

    return save


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """A function that, once called, makes every Python-level read of a tensor's value fail (`.item()`,
    `bool(t)`, `.tolist()`, ...: a host sync on a GPU), until the test's monkeypatch is undone.
    `.numpy()` of a CPU tensor stays allowed: it is a view, no sync (the CPU kernels sort small key
    sets with NumPy)."""
    import torch

    def forbid(*a, **k):
        raise AssertionError("host sync inside Trainer.step")

    def start():
        numpy = torch.Tensor.numpy
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, forbid)
        monkeypatch.setattr(torch.Tensor, "numpy",
                            lambda t, *a, **k: numpy(t, *a, **k) if t.device.type == "cpu" else forbid())

    return start
