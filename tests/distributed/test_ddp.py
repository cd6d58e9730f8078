"""Data parallel on CPU with gloo: two ranks must train the same model as one process on the same
global batches, and a rank that dies must make the others fail fast with a clear message."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flashsae import distributed
from flashsae.data import ArraySource, BatchIterator

TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = ["synthetic", "--synthetic-rows", "3000", "--synthetic-d", "16", "--synthetic-atoms", "32",
          "--latents", "64", "--batch-size", "64", "--rows", "2560", "--threads", "1", "--log-every", "5",
          "--quiet"]
MODELS = {"topk": ["--arch", "topk", "--k", "4", "--dead-after-rows", "640"],
          "relu-l1": ["--arch", "relu-l1", "--l1", "0.05"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", **extra)
    return env


def test_local_comm_is_a_no_op():
    t = torch.arange(4.0)
    comm = distributed.LOCAL
    assert comm.is_main() and comm.world_size == 1
    assert comm.all_reduce_mean_(t) is t and torch.equal(t, torch.arange(4.0))
    assert torch.equal(comm.any_(t > 1), t > 1)
    assert comm.agree_stop(True, sync_point=False) and not comm.agree_stop(False, sync_point=True)
    assert distributed.is_main() and distributed.world_size() == 1
    distributed.barrier()


def test_shards_partition_every_global_batch():
    x = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    src = ArraySource(x, "array")
    ids = np.arange(1000, dtype=np.int64)
    whole = list(BatchIterator(src, ids, 96, seed=3, chunk_rows=128, prefetch=0).epoch(1))
    parts = [list(BatchIterator(src, ids, 96, seed=3, chunk_rows=128, prefetch=0, shard=(r, 3)).epoch(1))
             for r in range(3)]
    for b, (p0, p1, p2) in enumerate(zip(*parts)):
        np.testing.assert_array_equal(np.concatenate([p0, p1, p2]), whole[b])
        assert len(p0) == len(p1) == len(p2) == 32


DRIVER = textwrap.dedent("""
    import sys
    from flashsae.cli import main
    for argv in sys.argv[1:]:
        rc = main(argv.split())
        if rc:
            raise SystemExit(rc)
""")


def test_two_gloo_ranks_match_one_process(tmp_path):
    """torchrun, 2 ranks x 32 rows == 1 process x 64 rows, for a top-k and a ReLU+L1 model."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    argvs = [" ".join(["train", *COMMON, *MODELS[name], "--out", str(tmp_path / f"ddp-{name}")]) for name in MODELS]
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master-port", str(_free_port()), str(driver), *argvs]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from flashsae.cli import main

    threads = torch.get_num_threads()
    try:
        for name in MODELS:
            assert main(["train", *COMMON, *MODELS[name], "--out", str(tmp_path / f"one-{name}")]) == 0
    finally:
        torch.set_num_threads(threads)
    for name in MODELS:
        ddp = load_file(tmp_path / f"ddp-{name}" / "model.safetensors")
        one = load_file(tmp_path / f"one-{name}" / "model.safetensors")
        assert ddp.keys() == one.keys()
        for key in one:
            diff = (ddp[key] - one[key]).abs().max().item()
            assert diff < 1e-4, (name, key, diff)
        assert not (tmp_path / f"ddp-{name}.partial").exists()


def test_dead_rank_makes_the_other_exit_with_a_clear_message(tmp_path):
    """SIGKILL rank 1 mid-training: rank 0 must exit 2 with 'lost contact', well within the timeout."""
    port = _free_port()
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "flashsae", "train", *COMMON, "--rows", "10000000", "--out", str(out),
            "--dist-timeout", "20"]
    procs = [subprocess.Popen(argv, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        log = out.with_name("run.partial") / "train_log.csv"
        deadline = time.monotonic() + 120
        while not log.exists():  # rank 0 writes the log: both ranks are stepping
            assert time.monotonic() < deadline, "training did not start"
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - killed_at < 25
        assert procs[0].returncode == 2, err[-2000:]
        assert "flashsae: error: rank 0 lost contact with the process group" in err
        assert "Traceback" not in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


@pytest.mark.parametrize("batch_size", [63])
def test_batch_must_split_evenly(tmp_path, batch_size):
    """Checked on one process through a fake 2-rank comm: no rank may get a bigger share."""

    class TwoRanks(distributed.Comm):
        world_size = 2

    from flashsae import ConfigError, train

    with pytest.raises(ConfigError, match="not a multiple of the 2 ranks"):
        train("synthetic", synthetic_rows=500, batch_size=batch_size, quiet=True, comm=TwoRanks())


class _FakeRank(distributed.Comm):
    """Rank `rank` of 2 whose collectives do nothing: each rank's share of a sweep, run in turn."""

    world_size = 2

    def __init__(self, rank: int):
        self.rank = rank


def test_sweep_points_are_shared_between_ranks(tmp_path):
    from flashsae import io
    from flashsae.train.sweep import expand_grid, read_table, run_grid

    grid = expand_grid({"k": [2, 3, 4]}, {"d_sae": 16, "rows": 640, "batch_size": 64, "threads": 1})
    out = tmp_path / "sweep"
    assert run_grid("digits", grid, out, quiet=True, comm=_FakeRank(1)).rows == []
    assert sorted(p.name for p in out.iterdir()) == ["k-3"]  # rank 1 of 2: point 1 only, no table
    result = run_grid("digits", grid, out, quiet=True, overwrite=True, comm=_FakeRank(0))
    assert [r["name"] for r in result.rows] == ["k-2", "k-3", "k-4"]
    assert [r["name"] for r in read_table(out / io.SWEEP_TABLE_FILE)] == ["k-2", "k-3", "k-4"]
    k3 = io.read_json(out / "k-3" / io.METRICS_FILE)
    assert result.rows[1]["l0"] == k3["l0"]
