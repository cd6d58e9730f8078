"""Schedule-free sign-SGD (optimizer="signum") and k annealing.

The parameters hold the averaged iterate x outside a step (what evaluation, checkpoints and the saved
model see) and the interpolation y only while a step takes its gradient.
"""
import pytest
import torch
from safetensors.torch import load_file

import flashsae
from flashsae import io
from flashsae.config import TrainConfig
from flashsae.errors import ConfigError
from flashsae.train.optim import ScheduleFreeSignum, default_lr, k_at, lr_factor

FAST = dict(latents=64, k=3, rows=20_000, batch_size=128, quiet=True, threads=1)


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    A, b = torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    return A, b


def _run(opt, w, A, b, steps, start=0):
    for t in range(start, start + steps):
        opt.param_groups[0]["lr"] = 0.02 * min(1.0, (t + 1) / 10)
        opt.begin_step()
        ((A @ w - b) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_schedule_free_iterates_follow_the_definition():
    """z steps by -lr sign(g at y), x averages z with weights lr_max^2, y = (1 - beta) z + beta x."""
    A, b = _quadratic()
    w = torch.zeros(8, requires_grad=True)
    opt = ScheduleFreeSignum([w], lr=0.02, beta=0.9)
    z = x = torch.zeros(8)
    weight_sum = lr_max = 0.0
    for t in range(30):
        lr = 0.02 * min(1.0, (t + 1) / 10)
        y = 0.1 * z + 0.9 * x
        g = torch.func.grad(lambda v: ((A @ v - b) ** 2).mean())(y)
        z = z - lr * g.sign()
        lr_max = max(lr_max, lr)
        weight_sum += lr_max ** 2
        x = x + (lr_max ** 2 / weight_sum) * (z - x)
    _run(opt, w, A, b, 30)
    assert torch.allclose(w.detach(), x, atol=1e-6)  # the parameter holds x between steps
    assert torch.allclose(opt.state[w]["z"], z, atol=1e-6)
    assert torch.allclose(opt.state[w]["y"], 0.1 * z + 0.9 * x, atol=1e-6)
    assert not torch.allclose(w.detach(), opt.state[w]["y"], atol=1e-3)


def test_signum_reduces_the_loss_on_a_planted_dictionary(small_synthetic):
    X, _ = small_synthetic
    _, result = flashsae.train(X, optimizer="signum", **FAST)
    # 0.20 here; Adam 0.15 on the same rows; signum at lr 1e-5 (barely moving) 0.70
    assert result.metrics["fvu"] < 0.25
    assert result.history[-1]["lr"] == pytest.approx(default_lr(TrainConfig(optimizer="signum"), 64))


def test_the_saved_and_evaluated_model_is_the_average_x_not_y(small_synthetic, tmp_path, monkeypatch):
    from flashsae.train import trainer as trainer_mod

    X, _ = small_synthetic
    seen = {}
    init = trainer_mod.Trainer.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen["trainer"] = self

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", keep)
    model, result = flashsae.train(X, optimizer="signum", out=tmp_path / "run", **FAST)
    opt = seen["trainer"].optimizer
    saved = load_file(tmp_path / "run" / io.MODEL_FILE)
    params = dict(model.named_parameters())
    for name in ("W_enc", "W_dec", "b_enc"):
        p = params[name]
        assert torch.equal(saved[name], p.detach()), name  # the saved weights are the model's ...
        assert not torch.allclose(saved[name], opt.state[p]["y"], atol=1e-4), name  # ... which are not y
    # x, rebuilt from the state (the encoder has no projection): y = (1 - beta) z + beta x
    beta = opt.param_groups[0]["beta"]
    W_enc = params["W_enc"]
    x = (opt.state[W_enc]["y"] - (1 - beta) * opt.state[W_enc]["z"]) / beta
    assert torch.allclose(x, saved["W_enc"], atol=1e-5)
    assert torch.allclose(saved["W_dec"].norm(dim=-1), torch.ones(64), atol=1e-5)  # unit rows hold for x
    # the final metrics are those of x: evaluating the returned model gives them again
    from flashsae.eval.evaluate import evaluate
    assert result.metrics["fvu"] < 0.25
    again = evaluate(model, flashsae.data.ArraySource(X, "x"), torch.arange(len(X) - 2000, len(X)).numpy())
    assert again["fvu"] < 0.25


def test_resume_with_signum_is_bit_identical(small_synthetic, tmp_path):
    X, _ = small_synthetic
    opts = dict(FAST, optimizer="signum", k_anneal=2, rows=12_800)
    whole, _ = flashsae.train(X, **opts)
    _, partial = flashsae.train(X, out=tmp_path / "cut", stop_after_steps=37, **opts)
    assert partial.interrupted and partial.steps == 37
    resumed, result = flashsae.train(X, out=tmp_path / "cut", resume=True, quiet=True)
    assert result.steps == 100
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_signum_takes_no_decay_by_default_but_keeps_the_warm_up():
    sf = TrainConfig(optimizer="signum", lr_warmup=0.1)
    assert lr_factor(0, 100, sf) == pytest.approx(0.1)
    assert [lr_factor(s, 100, sf) for s in (10, 90, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(99, 100, TrainConfig(optimizer="signum", lr_decay="linear")) < 0.06
    assert lr_factor(99, 100, TrainConfig()) < 0.06  # adam: auto is linear


def test_k_anneal_schedule():
    cfg = TrainConfig(k_anneal=4, k_anneal_fraction=0.5)
    ks = [k_at(s, 100, 8, cfg, 4096) for s in range(100)]
    assert ks[0] == 32 and ks[25] == 20 and ks[49] == 8 + round(24 / 50) and ks[50:] == [8] * 50
    assert all(a >= b for a, b in zip(ks, ks[1:]))  # never rises
    assert k_at(0, 100, 8, cfg, 16) == 16  # at most the number of latents
    assert [k_at(s, 100, 8, TrainConfig(), 4096) for s in (0, 50)] == [8, 8]  # off by default


def test_k_anneal_trains_with_the_larger_k_first(small_synthetic):
    X, _ = small_synthetic
    _, result = flashsae.train(X, k_anneal=3, log_every=10, **FAST)
    l0 = [r["l0"] for r in result.history]
    assert l0[0] > 7 and l0[-1] == pytest.approx(3.0)  # k 9 at the start, 3 at the end
    assert result.metrics["l0"] == pytest.approx(3.0)  # the model keeps its own k
    assert result.metrics["fvu"] < 0.25  # 0.20 here


@pytest.mark.parametrize("bad,match", [
    (dict(optimizer="lion"), r"^optimizer must be adam, sgd or signum, got 'lion'$"),
    (dict(k_anneal=0.5), r"^k_anneal must be a number >= 1 \(the multiple of k to start at; 1 = off\), got 0\.5$"),
    (dict(k_anneal_fraction=2.0), r"^k_anneal_fraction must be in \[0, 1\], got 2\.0$"),
    (dict(lr_decay="step"), r"^lr_decay must be auto, linear, cosine or none, got 'step'$"),
])
def test_bad_options_fail_with_one_line(bad, match, small_synthetic):
    X, _ = small_synthetic
    with pytest.raises(ConfigError, match=match) as info:
        flashsae.train(X, **{**FAST, **bad})
    assert "\n" not in str(info.value)


def test_k_anneal_on_a_model_without_k_says_so(small_synthetic):
    X, _ = small_synthetic
    with pytest.raises(ConfigError, match=r"^k_anneal applies to models with a k .*not to architecture 'relu-l1'$"):
        flashsae.train(X, latents=64, rows=2000, batch_size=128, quiet=True, arch="relu-l1", k_anneal=2)


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "lion"], "--optimizer must be adam, sgd or signum, got 'lion'"),
    (["--k-anneal", "0.5"], "--k-anneal must be a number >= 1 (the multiple of k to start at; 1 = off), got 0.5"),
])
def test_cli_bad_optimizer_or_k_anneal_is_one_line(flags, message, tmp_path, capsys):
    from flashsae.cli import main

    code = main(["train", "synthetic", "--synthetic-rows", "2000", "--out", str(tmp_path / "o"), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err == f"flashsae: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_cli_help_states_the_signum_rate():
    from flashsae.cli import build_parser, subcommand_parser

    text = subcommand_parser(build_parser(), "train").format_help()
    flat = " ".join(text.split())
    assert "signum" in flat and "2.5e-3 * sqrt(16384 / d_sae) (capped at 2e-2) for signum" in flat
    assert "--k-anneal" in flat and "--k-anneal-fraction" in flat


def test_signum_with_latents_sharded_over_two_ranks_matches_one_process(tmp_path):
    """The schedule-free state (z, y) is split with the latents: --tensor-parallel 2 == one process."""
    from tests.distributed.test_tensor import COMMON, MODELS, TOL, _max_diff, _one_process, _torchrun

    argv = ["train", *COMMON, "--rows", "1280", *MODELS["topk"], "--optimizer", "signum", "--k-anneal", "2"]
    _torchrun(tmp_path, 2, [[*argv, "--tensor-parallel", "2", "--out", str(tmp_path / "t2")]])
    _one_process([*argv, "--out", str(tmp_path / "one")])
    assert _max_diff(load_file(tmp_path / "t2" / io.MODEL_FILE), load_file(tmp_path / "one" / io.MODEL_FILE)) < TOL
