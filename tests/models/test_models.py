"""Every registered architecture: shapes, exact small cases, penalties, no host sync in the step."""
import dataclasses
from dataclasses import dataclass

import pytest
import torch

from flashsae import models
from flashsae.config import TrainConfig
from flashsae.errors import ConfigError
from flashsae.models import penalties
from flashsae.models.base import SparseCodes
from flashsae.train.trainer import Trainer

ARCHS = models.names()


def build(arch, d_in=12, d_sae=40, **kw):
    if arch in models.options().get("k", {}):
        kw.setdefault("k", 3)
    if arch in models.options().get("layers", {}):  # crosscoders: 12 columns as 2 layers of 6
        kw.setdefault("layers", 2)
    return models.build(arch, d_in=d_in, d_sae=d_sae, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_documents_itself(arch):
    """The docs tables, --help and the estimator's parameters are made from these."""
    cls = models.get(arch)
    assert cls.architecture == arch and (cls.__doc__ or "").strip(), f"{arch}: write a class docstring"
    from flashsae.config import field_docs

    shared = {f.name for f in dataclasses.fields(models.ModelConfig)}
    own = {f.name for f in dataclasses.fields(cls.config_cls)} - shared
    assert own <= set(field_docs(cls.config_cls)), f"{arch}: every config field needs a docstring"


@dataclass(frozen=True, kw_only=True)
class _TinyConfig(models.ModelConfig):
    gain: float = 2.0
    """A made-up option."""


class _Tiny(models.SparseAutoencoder):
    """ReLU codes."""

    config_cls = _TinyConfig

    def activate(self, pre_acts):
        return torch.relu(pre_acts), pre_acts.new_zeros(())


def test_registry_lookup_and_temporary_registration():
    with pytest.raises(ConfigError, match="unknown architecture 'nope'; choose one of"):
        models.get("nope")
    before = models.names()
    with models.registered("tiny-test", _Tiny):
        assert "tiny-test" in models.names() and models.get("tiny-test") is _Tiny
        assert models.options()["gain"] == {"tiny-test": 2.0}
        assert models.options()["normalize_decoder"]["tiny-test"] is True
        with pytest.raises(RuntimeError, match="architecture 'tiny-test' registered twice"):
            models.register("tiny-test")(_Tiny)
    assert models.names() == before and "gain" not in models.options()
    models.register("tiny-test")(_Tiny)
    assert models.unregister("tiny-test") is _Tiny and models.names() == before
    with pytest.raises(ConfigError, match="unknown architecture 'tiny-test'"):
        models.unregister("tiny-test")


@pytest.mark.parametrize("name, cls, match", [
    ("Tiny_Test", _Tiny, "must be lowercase-hyphenated"),
    ("tiny-test", torch.nn.Module, "config_cls must be a dataclass derived from ModelConfig"),
])
def test_register_refuses(name, cls, match):
    with pytest.raises(RuntimeError, match=match):
        models.register(name)(cls)
    assert name not in models.names()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hidden", [(), (16,)])
def test_forward_shapes_and_public_roundtrip(arch, hidden):
    if hidden and not models.get(arch).supports_hidden:
        with pytest.raises(ConfigError, match="has one layer; drop --encoder-hidden/--decoder-hidden"):
            build(arch, encoder_hidden=hidden, decoder_hidden=hidden)
        return
    m = build(arch, encoder_hidden=hidden, decoder_hidden=hidden)
    x = torch.randn(9, 12)
    out = m(x)
    assert out.x_hat.shape == (9, 12)
    codes = out.codes.to_dense(40) if isinstance(out.codes, SparseCodes) else out.codes
    assert codes.shape == (9, 40)
    assert out.penalty.ndim == 0
    m.eval()
    enc = m.encode(x)
    assert enc.shape == (9, 40)
    assert m.decode(enc).shape == (9, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_makes_no_host_sync(arch, monkeypatch, forbid_host_reads):
    """The hot path never reads a value back to Python (no .item(), no bool(tensor), no .tolist())."""
    m = build(arch, encoder_hidden=(16,) if arch == "kl" else ())
    tr = Trainer(m, TrainConfig(), total_steps=10, dead_after_rows=1)
    x = {name: torch.randn(32, 12) for name in {*m.inputs, *m.targets}}  # a transcoder reads x, writes y
    tr.step(x)
    tr.refresh_aux()  # outside the step: decides AuxK for the next steps (one read per log interval)
    forbid_host_reads()
    for _ in range(3):
        metrics = tr.step(x)
    monkeypatch.undo()
    assert all(torch.isfinite(v) for v in metrics)


def test_relu_l1_exact_value_on_hand_set_weights():
    m = models.build("relu-l1", d_in=2, d_sae=2, l1=0.5, normalize_decoder=False)
    with torch.no_grad():
        m.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        m.b_enc.zero_()
        m.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        m.b_dec.zero_()
    out = m(torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(out.codes, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(out.x_hat, torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(out.penalty, torch.tensor(0.5))


def test_topk_keeps_k_largest_and_batchtopk_uses_threshold_at_inference():
    m = models.build("topk", d_in=3, d_sae=4, k=2)
    with torch.no_grad():
        m.W_enc.copy_(torch.eye(4, 3))
        m.b_enc.zero_()
        m.b_dec.zero_()
    out = m(torch.tensor([[3.0, 1.0, 2.0]]))
    dense = out.codes.to_dense(4)
    assert torch.allclose(dense, torch.tensor([[3.0, 0.0, 2.0, 0.0]]))

    b = models.build("batchtopk", d_in=3, d_sae=4, k=1, threshold_momentum=1.0)
    with torch.no_grad():
        b.W_enc.copy_(torch.eye(4, 3))
        b.b_enc.zero_()
        b.b_dec.zero_()
    x = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.2, 0.1]])
    out = b(x)  # training: 2 activations over the batch: 3.0 and 2.0, both from row 0
    assert (out.codes != 0).sum() == 2 and (out.codes[1] == 0).all()
    assert torch.isclose(b.threshold, torch.tensor(2.0))
    b.eval()
    out = b(x)
    assert torch.allclose(out.codes, torch.tensor([[3.0, 0, 0, 0], [0, 0, 0, 0]]))


@pytest.mark.parametrize("hidden", [(), (7, 5)])
def test_contractive_penalty_matches_autograd_jacobian(hidden):
    torch.manual_seed(1)
    m = models.build("contractive", d_in=6, d_sae=11, contractive=1.0, encoder_hidden=hidden)
    x = torch.randn(5, 6)
    out = m(x)
    total = 0.0
    for row in x:
        J = torch.autograd.functional.jacobian(lambda r: torch.relu(m.pre_acts(r[None]))[0], row)
        total += J.pow(2).sum()
    assert torch.allclose(out.penalty, total / len(x), rtol=1e-5)


def test_kl_penalty_is_zero_at_target_and_positive_elsewhere():
    probs = torch.full((10, 4), 0.05)
    assert penalties.kl_sparsity(probs, 0.05).abs() < 1e-6
    assert penalties.kl_sparsity(torch.full((10, 4), 0.3), 0.05) > 0.1


def test_jumprelu_threshold_gradient_reduces_l0():
    m = models.build("jumprelu", d_in=4, d_sae=8, l0=1.0, bandwidth=1.0, init_threshold=0.5)
    with torch.no_grad():
        m.W_enc.copy_(torch.eye(8, 4))
        m.b_enc.fill_(0.4)  # pre-activations near the threshold: inside the kernel's window
        m.b_dec.zero_()
    out = m(torch.zeros(3, 4))
    out.penalty.backward()
    # A larger threshold lowers L0, so gradient descent must push log_threshold up.
    assert (m.log_threshold.grad < 0).all()


@pytest.mark.parametrize("bad,match", [
    (dict(d_sae=0), "d_sae must be >= 1"),
    (dict(k=50), r"k \(50\) must not exceed the number of latents \(40\)"),
    (dict(k=0), "k must be >= 1"),
    (dict(encoder_hidden=(0,)), "hidden layer widths must be >= 1"),
])
def test_bad_model_options(bad, match):
    opts = dict(d_in=12, d_sae=40, k=3)
    opts.update(bad)
    with pytest.raises(ConfigError, match=match):
        models.build("topk", **opts)


def test_unit_norm_decoder_kept_after_steps():
    m = build("relu-l1")
    tr = Trainer(m, TrainConfig(lr=1e-2), total_steps=5, dead_after_rows=10**9)
    for _ in range(5):
        tr.step(torch.randn(16, 12))
    assert torch.allclose(m.W_dec.norm(dim=-1), torch.ones(40), atol=1e-5)
