"""Trainer.step: the AuxK loss against a plain-PyTorch AuxK, no host sync with AuxK on, TF32 scoping."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashsae import kernels, models
from flashsae.config import TrainConfig
from flashsae.errors import ConfigError
from flashsae.kernels import auxk
from flashsae.train import optim
from flashsae.train.trainer import Trainer

DEAD_AFTER = 10**9


def plain_auxk(model, x, dead, k_aux, rows=None):
    """Gao et al. (2024, App. B.1) in dense PyTorch: the k_aux largest dead pre-activations (ReLU) of
    each row reconstruct the residual, normalised by the residual's variance over the batch; with
    `rows`, the error is the mean over the batch's first `rows` rows only."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))
    x = x.double()
    pre = (x - b_dec) @ W_enc.T + b_enc
    top, idx = pre.topk(model.cfg.k, dim=-1)
    x_hat = torch.zeros_like(pre).scatter(1, idx, top.relu()) @ W_dec + b_dec
    resid = x - x_hat
    mask = torch.zeros(model.d_sae, dtype=torch.bool)
    mask[dead] = True
    atop, aidx = pre.masked_fill(~mask, float("-inf")).topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(1, aidx, atop.relu()) @ W_dec
    var = (resid - resid.mean(0)).pow(2).sum(-1).mean()
    return model.cfg.auxk_coef * (e_hat - resid)[:rows].pow(2).sum(-1).mean() / var


def trainer_with_dead(model, dead, **cfg):
    tr = Trainer(model, TrainConfig(lr=1e-3, dtype="float32", **cfg), total_steps=10, dead_after_rows=DEAD_AFTER)
    tr.rows_since_fired[dead] = DEAD_AFTER
    tr.refresh_aux()
    return tr


def hand_set_model(k_aux):
    """6 latents on 3 inputs with distinct, known pre-activations: latent j scores (j + 1) * x[0] + b_j."""
    m = models.build("topk", d_in=3, d_sae=6, k=1, k_aux=k_aux, auxk_coef=0.5, normalize_decoder=False,
                     auxk_budget=0)  # AuxK on every row
    with torch.no_grad():
        m.W_enc.zero_()
        m.W_enc[:, 0] = torch.arange(1.0, 7.0)
        m.b_enc.copy_(torch.tensor([0.0, -0.5, 0.25, -3.0, 0.1, -0.2]))
        m.W_dec.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]]) / 2)
        m.b_dec.copy_(torch.tensor([0.1, -0.1, 0.0]))
    return m


@pytest.mark.parametrize("dead,k_aux", [
    ([0, 2, 3], 2),       # k_aux < dead: the AuxK selection picks among the dead
    ([1, 2, 4, 5], 4),    # k_aux = dead: every dead latent is taken
    ([2, 4], 5),          # k_aux > dead: capped at the 2 dead latents; the loss is the same
    ([3], 3),             # one dead latent whose pre-activation is mostly negative (ReLU zeros skipped)
])
def test_auxk_loss_matches_plain_pytorch_on_hand_set_weights(dead, k_aux):
    x = torch.tensor([[1.0, 0.5, -0.5], [0.3, -1.0, 2.0], [-0.7, 0.2, 0.1], [2.0, 1.0, 1.0], [0.05, 0.0, -2.0]])
    m = hand_set_model(k_aux)
    want = plain_auxk(m, x, dead, k_aux)
    tr = trainer_with_dead(m, dead)
    assert tr.n_dead == len(dead)
    got = tr.step(x).aux
    assert float(want) > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_dead,k_aux", [(40, 8), (8, 8), (3, 8), (1, 2)])
def test_auxk_loss_matches_plain_pytorch_on_random_weights(n_dead, k_aux):
    torch.manual_seed(n_dead)
    m = models.build("topk", d_in=16, d_sae=64, k=4, k_aux=k_aux, auxk_budget=0)
    x = torch.randn(50, 16)
    dead = torch.randperm(64)[:n_dead]
    want = plain_auxk(m, x, dead, k_aux)
    got = trainer_with_dead(m, dead).step(x).aux
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])  # the sparse kernels; the dense selection
@pytest.mark.parametrize("budget,n_dead,rows", [
    (1.0, 40, 25),   # k_aux = 8 slots against k = 4: pairs for half the 50 rows
    (0.5, 40, 13),   # a quarter, rounded up
    (1.0, 3, None),  # 3 dead latents, 3 slots: within the budget, every row
    (0.0, 40, None), # no limit
])
def test_the_auxk_budget_runs_auxk_on_the_batchs_first_rows(arch, budget, n_dead, rows):
    torch.manual_seed(n_dead)
    m = models.build(arch, d_in=16, d_sae=64, k=4, k_aux=8, auxk_budget=budget)
    x = torch.randn(50, 16)
    dead = torch.randperm(64)[:n_dead]
    tr = trainer_with_dead(m, dead)
    assert tr._aux_rows(50) == rows
    if arch == "topk":  # the batch-level selection keeps other latents than a per-row top-k
        want = plain_auxk(m, x, dead, 8, rows)
        torch.testing.assert_close(tr.step(x).aux.double(), want, rtol=1e-5, atol=1e-7)
    out = m(x, aux_mask=auxk.stalest(tr.rows_since_fired, tr.dead_mask(), tr.n_dead, rows))
    assert out.aux.shape == (rows or 50, 16)


def test_auxk_rows_within_the_budget():
    assert auxk.rows_within(4096, 16, 128, 1.0) == 512
    assert auxk.rows_within(4096, 16, 16, 1.0) is None
    assert auxk.rows_within(4096, 16, 128, 0.0) is None
    assert auxk.rows_within(10, 1, 2**20, 1.0) == 1  # never no row at all


def test_a_negative_auxk_budget_is_refused():
    with pytest.raises(ConfigError, match="auxk_budget must be >= 0, got -1"):
        models.build("topk", d_in=16, d_sae=64, k=4, auxk_budget=-1)


def test_auxk_slots_are_capped_at_the_dead_latents():
    torch.manual_seed(0)
    m = models.build("topk", d_in=16, d_sae=64, k=4, k_aux=8)
    tr = trainer_with_dead(m, torch.tensor([5, 9, 33]))
    dead = auxk.stalest(tr.rows_since_fired, tr.dead_mask(), tr.n_dead)
    assert sorted(dead.candidates.tolist()) == [5, 9, 33]
    values, idx, aux_values, aux_idx = kernels.topk_encode(torch.randn(7, 16), m.W_enc, m.b_enc, 4, aux_mask=dead,
                                                           k_aux=8, b_dec=m.b_dec)
    assert aux_idx.shape == (7, 3)  # not 8: three dead latents fill three slots
    assert sorted(aux_idx[0].tolist()) == [5, 9, 33]


def test_a_candidate_that_fired_since_the_refresh_is_not_selected():
    torch.manual_seed(1)
    m = models.build("topk", d_in=16, d_sae=64, k=4, k_aux=2)
    tr = trainer_with_dead(m, torch.tensor([5, 9, 33]))
    tr.rows_since_fired[9] = 0  # fired: alive again before the next refresh
    dead = auxk.stalest(tr.rows_since_fired, tr.dead_mask(), tr.n_dead)
    _, _, aux_values, aux_idx = kernels.topk_encode(torch.randn(30, 16), m.W_enc, m.b_enc, 4, aux_mask=dead, k_aux=2)
    assert not bool((aux_idx[aux_values > 0] == 9).any())


AUXK_ARCHS = sorted(models.options()["k_aux"])  # every architecture with an AuxK loss


class _NoScalarReads(TorchDispatchMode):
    """Fails when any op reads a tensor's value back to the host (aten._local_scalar_dense), also when
    C++ code, not Python, does it (an int(tensor) inside a torch function). Data-dependent sizes
    (nonzero) are allowed: the CPU reference kernels use them on purpose, the GPU kernels do not."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            raise AssertionError("host sync inside Trainer.step: a scalar read back")
        return func(*args, **(kwargs or {}))


def _aux_model(arch):
    kw = {"k": 3}
    if "layers" in models.options() and arch in models.options()["layers"]:
        kw["layers"] = 2  # 12 columns as 2 layers of 6
    return models.build(arch, d_in=12, d_sae=80, **kw)


@pytest.mark.parametrize("arch", AUXK_ARCHS)
@pytest.mark.parametrize("n_dead", [3, 60])  # few (k_aux capped, gathered columns) and many (whole rows)
def test_an_auxk_step_makes_no_host_sync(arch, n_dead, monkeypatch, forbid_host_reads):
    """With AuxK on, the step still never reads a value back to Python; only refresh_aux does.

    Checked twice: Python-level reads (`.item()`, `bool(t)`, ...) and, below Python, any scalar read
    back by an aten op."""
    torch.manual_seed(0)
    m = _aux_model(arch)
    tr = trainer_with_dead(m, torch.randperm(80)[:n_dead])
    assert tr.use_aux

    x = {name: torch.randn(32, 12) for name in {*m.inputs, *m.targets}}  # a transcoder reads x, writes y
    tr.step(x)  # first step: lazy set-up may read values once
    forbid_host_reads()
    with _NoScalarReads():
        metrics = [tr.step(x) for _ in range(2)]
    monkeypatch.undo()
    assert all(float(s.aux) > 0 for s in metrics)


def test_the_dead_count_survives_a_checkpoint():
    m = models.build("topk", d_in=8, d_sae=32, k=2)
    tr = trainer_with_dead(m, torch.tensor([1, 2, 3]))
    state = {k: v.clone() for k, v in tr.state_tensors().items()}
    tr.rows_since_fired.zero_()  # a count from the tensors, not from the counters
    fresh = Trainer(m, TrainConfig(dtype="float32"), total_steps=10, dead_after_rows=DEAD_AFTER)
    fresh.load_state_tensors(state, 0)
    assert fresh.n_dead == 3 and fresh.use_aux
    old = {"trainer.rows_since_fired": state["trainer.rows_since_fired"], "trainer.use_aux": torch.tensor(True)}
    fresh.load_state_tensors(old, 0)  # a checkpoint written before the count existed: counted on load
    assert fresh.n_dead == 3


# ---- precision ---------------------------------------------------------------------------------

@pytest.fixture
def ampere(monkeypatch):
    """A CUDA device of compute capability 8.0, as far as the precision choice can tell."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))


@pytest.mark.parametrize("arch", models.names())
def test_auto_on_cuda_uses_tf32_for_every_fp32_architecture(arch, ampere):
    cls = models.get(arch)
    cuda = torch.device("cuda")
    resolved = optim.resolve_dtype(TrainConfig(), cls, cuda)
    assert resolved == ("bfloat16" if cls.k_limited else "tf32")
    assert optim.tf32_matmuls(TrainConfig(), cuda)
    assert not optim.tf32_matmuls(TrainConfig(dtype="float32"), cuda)  # asked for: true float32
    assert not optim.tf32_matmuls(TrainConfig(), torch.device("cpu"))
    assert optim.resolve_dtype(TrainConfig(dtype="float32"), cls, cuda) == "float32"


def test_tf32_is_on_inside_the_step_only(monkeypatch):
    monkeypatch.setattr(optim, "tf32_matmuls", lambda cfg, device: True)
    m = models.build("relu-l1", d_in=6, d_sae=10)
    seen = []
    m.register_forward_hook(lambda *a: seen.append(torch.backends.cuda.matmul.allow_tf32))
    tr = Trainer(m, TrainConfig(), total_steps=10, dead_after_rows=DEAD_AFTER)
    before = torch.backends.cuda.matmul.allow_tf32
    tr.step(torch.randn(4, 6))
    assert seen == [True]
    assert torch.backends.cuda.matmul.allow_tf32 == before
    monkeypatch.setattr(optim, "tf32_matmuls", lambda cfg, device: False)
    Trainer(m, TrainConfig(), total_steps=10, dead_after_rows=DEAD_AFTER).step(torch.randn(4, 6))
    assert seen == [True, before]


def test_resample_steps_spread_over_the_first_half():
    from flashsae.train.trainer import resample_steps

    assert resample_steps(0, 100) == frozenset()
    assert resample_steps(1, 100) == {10}
    assert resample_steps(3, 100) == {10, 30, 50}


def test_resampling_points_dead_latents_at_the_worst_reconstructed_row():
    m = hand_set_model(k_aux=2)
    tr = Trainer(m, TrainConfig(lr=1e-3, dtype="float32", resample_dead=1), total_steps=10, dead_after_rows=DEAD_AFTER)
    x = torch.tensor([[1.0, 0.5, -0.2], [0.3, 0.1, 0.0]])
    tr.step(x)  # Adam moments for every latent
    enc_live = m.W_enc[[0, 1, 2, 4, 5]].norm(dim=-1).mean()
    tr.rows_since_fired[[3]] = DEAD_AFTER
    diff = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, -4.0]])  # x_hat - x: only row 1 is off
    tr._resample(diff)
    assert torch.allclose(m.W_dec[3], torch.tensor([-0.6, 0.0, 0.8]))
    assert torch.allclose(m.W_enc[3], torch.tensor([-0.6, 0.0, 0.8]) * 0.2 * enc_live)
    assert m.b_enc[3] == 0 and tr.rows_since_fired[3] == 0
    state = tr.optimizer.state[m.W_dec]
    assert state["exp_avg"][3].abs().sum() == 0 and state["exp_avg_sq"][3].abs().sum() == 0
    assert state["exp_avg_sq"][5].abs().sum() > 0  # the latent both rows chose keeps its moments


def test_resample_dead_bad_values():
    from flashsae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^resample_dead must be >= 0, got -1$"):
        TrainConfig(resample_dead=-1)
    deep = models.build("topk", d_in=4, d_sae=8, k=2, encoder_hidden=(4,))
    with pytest.raises(ConfigError, match="resample_dead needs a one-layer sparse autoencoder trained in one process"):
        Trainer(deep, TrainConfig(resample_dead=2), total_steps=10, dead_after_rows=DEAD_AFTER)
