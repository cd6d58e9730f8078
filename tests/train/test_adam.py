"""FusedAdam: the same weights, moments and state_dict as torch.optim.Adam(fused=True), bit for bit."""
import subprocess
import sys

import torch

from flashsae.train.optim import FusedAdam


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_(),
            torch.randn(3, generator=g).requires_grad_()]  # the last one never gets a gradient


def _steps(opt, params, n, start=0):
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(100 + i)
        for p in params[:2]:
            p.grad = torch.randn(p.shape, generator=g)
        opt.param_groups[0]["lr"] = 1e-2 / (1 + i)  # a schedule, set as the trainer does
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_fused_adam_matches_torch_adam_bit_for_bit():
    ours, theirs = _params(), _params()
    opt_ours = FusedAdam(ours, lr=1e-2, betas=(0.9, 0.999))
    opt_theirs = torch.optim.Adam(theirs, lr=1e-2, betas=(0.9, 0.999), fused=True)
    _steps(opt_ours, ours, 6)
    _steps(opt_theirs, theirs, 6)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b) and a.grad is None
    sd_ours, sd_theirs = opt_ours.state_dict(), opt_theirs.state_dict()
    assert sorted(sd_ours["state"]) == sorted(sd_theirs["state"]) == [0, 1]
    for i, state in sd_theirs["state"].items():
        assert sorted(state) == sorted(sd_ours["state"][i]) == ["exp_avg", "exp_avg_sq", "step"]
        for name, value in state.items():
            assert torch.equal(sd_ours["state"][i][name], value), name
    assert float(sd_ours["state"][0]["step"]) == 6.0


def test_a_state_dict_resumes_the_same_steps_either_way():
    whole = _params()
    opt = FusedAdam(whole, lr=1e-2)
    _steps(opt, whole, 8)
    first = _params()
    _steps(torch_opt := torch.optim.Adam(first, lr=1e-2, fused=True), first, 5)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = FusedAdam(resumed, lr=1e-2)
    opt2.load_state_dict(torch_opt.state_dict())  # a checkpoint written by torch's Adam
    _steps(opt2, resumed, 3, start=5)
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)
    back = [p.detach().clone().requires_grad_() for p in resumed]
    torch_back = torch.optim.Adam(back, lr=1e-2, fused=True)
    torch_back.load_state_dict(opt2.state_dict())  # and one torch's Adam reads
    assert torch.equal(torch_back.state_dict()["state"][1]["exp_avg"], opt2.state_dict()["state"][1]["exp_avg"])


def test_a_small_fit_does_not_import_torch_dynamo():
    code = ("import sys, numpy as np, flashsae\n"
            "x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)\n"
            "flashsae.train(x, latents=16, k=2, epochs=1, quiet=True, device='cpu')\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
