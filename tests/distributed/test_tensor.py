"""Latent (tensor) parallelism on CPU with gloo: T ranks sharing the latents train the same model as
one process, a sharded checkpoint survives SIGKILL, a dead rank stops the others, bad layouts fail
with one line. Tolerance: 1e-5 on every weight after the same steps (float sums in another order;
measured 2e-7)."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed.test_ddp import DRIVER, TORCHRUN, _env, _free_port

from flashsae import ConfigError, distributed, train
from flashsae.cli import main

COMMON = ["synthetic", "--synthetic-rows", "3000", "--synthetic-d", "16", "--synthetic-atoms", "32",
          "--latents", "64", "--batch-size", "64", "--threads", "1", "--log-every", "5", "--dtype", "float32",
          "--quiet"]
MODELS = {"topk": ["--arch", "topk", "--k", "4", "--dead-after-rows", "128"],  # AuxK on from step 2
          "relu-l1": ["--arch", "relu-l1", "--l1", "0.05"]}
TOL = 1e-5


def _one_process(argv: list[str]) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _torchrun(tmp_path: Path, n: int, argvs: list[list[str]]) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [str(TORCHRUN), "--nproc_per_node", str(n), "--master-port", str(_free_port()), str(driver),
           *(" ".join(a) for a in argvs)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_four_ranks_match_one_process(tmp_path):
    """4 ranks with --tensor-parallel 4 (one group) and 2 (2 x 2: data x tensor) == 1 process."""
    rows = ["--rows", "1280"]
    runs = {f"{name}-t{t}": ["train", *COMMON, *rows, *MODELS[name], "--tensor-parallel", str(t)]
            for name in MODELS for t in (4, 2)}
    _torchrun(tmp_path, 4, [[*argv, "--out", str(tmp_path / key)] for key, argv in runs.items()])
    for name in MODELS:
        _one_process(["train", *COMMON, *rows, *MODELS[name], "--out", str(tmp_path / f"{name}-one")])
        one = load_file(tmp_path / f"{name}-one" / "model.safetensors")
        for t in (4, 2):
            assert _max_diff(load_file(tmp_path / f"{name}-t{t}" / "model.safetensors"), one) < TOL, (name, t)
    log = (tmp_path / "topk-t4" / "train_log.csv").read_text().splitlines()
    header, last = log[0].split(","), log[-1].split(",")
    assert float(last[header.index("l0")]) == 4.0  # L0 summed over the shards
    assert any(float(r.split(",")[header.index("aux_loss")]) > 0 for r in log[1:])  # AuxK merged over shards


def _checkpoint(run: Path) -> dict:
    """The tensors of a sharded checkpoint, latent-indexed ones put back together in shard order."""
    ckpt = run.with_name(run.name + ".partial") / "checkpoint"
    state = (ckpt / "state.json").read_text()
    files = sorted(ckpt.glob("state-*-shard-*.safetensors"))
    assert len(files) == 2 and all(f.name in state for f in files)
    parts = [load_file(f) for f in files]
    return {k: torch.cat([p[k] for p in parts]) if parts[0][k].ndim and parts[0][k].shape[0] == 32 else parts[0][k]
            for k in parts[0] if k.startswith(("model.", "optimizer.")) and not k.endswith(".step")}


def test_sharded_checkpoint_sigkill_resume_and_dead_rank(tmp_path):
    """Two ranks, --tensor-parallel 2: SIGKILL one rank after a checkpoint, the other exits 2 at once with
    one line; resuming gives the checkpoint of the uninterrupted run, and one process resumes it too."""
    opts = [*COMMON, *MODELS["topk"], "--rows", "640000", "--tensor-parallel", "2", "--checkpoint-every", "5"]
    stop = ["--stop-after-steps", "60"]
    _torchrun(tmp_path, 2, [["train", *opts, *stop, "--out", str(tmp_path / "whole")],
                            ["train", *COMMON, *MODELS["relu-l1"], "--rows", "640", "--tensor-parallel", "2",
                             "--out", str(tmp_path / "l1-t2")]])
    _one_process(["train", *COMMON, *MODELS["relu-l1"], "--rows", "640", "--out", str(tmp_path / "l1-one")])
    assert _max_diff(load_file(tmp_path / "l1-t2" / "model.safetensors"),
                     load_file(tmp_path / "l1-one" / "model.safetensors")) < TOL

    out, port = tmp_path / "killed", _free_port()
    argv = [sys.executable, "-m", "flashsae", "train", *opts, "--out", str(out), "--dist-timeout", "20"]
    procs = [subprocess.Popen(argv, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                             MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        state = out.with_name("killed.partial") / "checkpoint" / "state.json"
        deadline = time.monotonic() + 120
        while not state.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.005)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - killed_at < 25
        assert procs[0].returncode == 2, err[-2000:]
        assert "flashsae: error: rank 0 lost contact with the process group" in err and "Traceback" not in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    killed_step = int(state.read_text().split('"step": ')[1].split(",")[0])
    assert 5 <= killed_step < 60
    shutil.copytree(out.with_name("killed.partial"), tmp_path / "alone.partial")
    _torchrun(tmp_path, 2, [["train", *opts, *stop, "--out", str(out), "--resume"]])
    whole = _checkpoint(tmp_path / "whole")
    assert _max_diff(_checkpoint(out), whole) == 0.0  # bit-identical on CPU

    # The same checkpoint resumed by one process (the shards put together): the same model to TOL.
    _one_process(["train", *opts[:-4], "--tensor-parallel", "1", "--checkpoint-every", "5", *stop,
                  "--out", str(tmp_path / "alone"), "--resume"])
    ckpt = tmp_path / "alone.partial" / "checkpoint"
    alone = load_file(next(ckpt.glob("state-60.safetensors")))
    assert _max_diff({k: alone[k] for k in whole}, whole) < TOL


class _Group(distributed.Comm):
    """One process posing as rank 0 of a tensor-parallel pair (checks that run before any collective)."""

    tensor = distributed.LatentGroup(2)


@pytest.mark.parametrize("options, message", [
    ({"d_sae": 63}, "tensor_parallel 2 does not divide the 63 latents"),
    ({"architecture": "kl"}, "architecture 'kl' cannot be sharded across ranks; tensor_parallel works with"),
    ({"encoder_hidden": (32,)}, "tensor_parallel needs a one-layer encoder and decoder"),
])
def test_layouts_that_cannot_be_sharded(options, message):
    with pytest.raises(ConfigError, match=message):
        train("synthetic", synthetic_rows=500, synthetic_d=16, tensor_parallel=2, quiet=True, comm=_Group(), **options)


def test_tensor_parallel_must_divide_the_ranks(tmp_path, capsys):
    argv = ["train", "synthetic", "--synthetic-rows", "500", "--tensor-parallel", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flashsae: error: --tensor-parallel 2 does not divide the 1 ranks; launch a multiple of 2 ranks "
                   "with torchrun (world = data x tensor)"]


def test_local_group_is_a_no_op():
    g = distributed.WHOLE
    t = torch.arange(6.0).reshape(2, 3)
    assert g.range(64) == (0, 64) and g.sum_(t) is t and g.gather(t, 0) is t
    assert g.sum_from_shards(t) is t and g.into_shards(t) is t
    v, i = g.merge_topk(t, t.long(), 2)
    assert v is t and not g.sent
    assert distributed.LatentGroup(4, 2).range(64) == (32, 48)
