import json
import os
import signal
import sys
import types

import numpy as np
import pytest

import flashsae
from flashsae import ConfigError, io
from flashsae.cli import main
from flashsae.errors import Interrupted
from flashsae.train import loggers

TRAIN = dict(quiet=True, rows=2048, batch_size=64, latents=32, k=4, log_every=1)


@pytest.fixture(scope="module")
def rows():
    return np.random.default_rng(0).normal(size=(600, 12)).astype(np.float32)


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what a run sends."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], summary={}, finished=False)
        run.log = lambda values, step: run.logged.append((step, values))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def steps_of(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def csv_steps(path):
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


def test_every_sink_gets_every_log_row(tmp_path, rows, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _, result = flashsae.train(rows, out=tmp_path / "run", tensorboard=True, wandb=True, **TRAIN)
    run_dir = result.run_dir
    steps = [r["step"] for r in result.history]

    lines = [json.loads(line) for line in (run_dir / io.JSONL_LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == steps == csv_steps(run_dir / io.LOG_FILE)
    assert lines[-1]["fvu_standardized"] == pytest.approx(result.history[-1]["fvu_standardized"])
    val = [r["val_fvu_standardized"] for r in lines]
    assert None in val and any(v is not None for v in val)

    events = EventAccumulator(str(run_dir / io.TENSORBOARD_DIR))
    events.Reload()
    tags = {"train/fvu_standardized", "train/l0", "val/fvu_standardized", "final/fvu", "final/fvu_standardized"}
    assert tags <= set(events.Tags()["scalars"])
    fvu = events.Scalars("train/fvu_standardized")
    assert [e.step for e in fvu] == steps
    assert fvu[-1].value == pytest.approx(result.history[-1]["fvu_standardized"], rel=1e-5)
    assert events.Scalars("final/fvu")[0].value == pytest.approx(result.metrics["fvu"], rel=1e-5)

    (run,) = fake.runs
    assert run.finished and run.kwargs["config"]["architecture"] == "topk"
    assert [s for s, _ in run.logged] == steps and "train/fvu_standardized" in run.logged[-1][1]
    assert run.summary["fvu"] == result.metrics["fvu"]

    # Not images: no atlas or reconstructions.
    assert (run_dir / io.CURVES_FILE).is_file()
    assert not (run_dir / io.ATLAS_FILE).exists() and not (run_dir / io.RECONSTRUCTIONS_FILE).exists()


def test_resumed_run_logs_each_step_once(tmp_path, rows, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(loggers, "LIVE_CURVES_AFTER_S", 0.0)
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real_init = fake.init

    def init_with_ctrl_c(**kwargs):  # the first W&B run delivers Ctrl-C when step 16 is logged
        run = real_init(**kwargs)
        log = run.log
        run.log = lambda values, step: (log(values, step), step == 16 and os.kill(os.getpid(), signal.SIGINT))
        return run

    fake.init = init_with_ctrl_c
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="interrupted by SIGINT at step 16"):
        flashsae.train(rows, out=out, tensorboard=True, wandb=True, **TRAIN)
    work = io.partial_dir(out)
    assert fake.runs[0].finished
    assert (work / io.CURVES_FILE).is_file()  # redrawn while training: half the run had passed
    assert steps_of(work / io.JSONL_LOG_FILE)[-1] == 16
    fake.init = real_init
    _, result = flashsae.train(rows, out=out, resume=True, tensorboard=True, quiet=True)
    steps = steps_of(out / io.JSONL_LOG_FILE)
    assert steps == [r["step"] for r in result.history] == csv_steps(out / io.LOG_FILE) == list(range(1, 33))
    events = EventAccumulator(str(out / io.TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == steps


def test_live_curves_wait_for_a_tenth_of_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(loggers, "LIVE_CURVES_AFTER_S", 0.0)
    history = []
    curves = loggers.LiveCurves(tmp_path / "curves.png", history, total_steps=100)
    drawn = []
    for step in range(1, 31):
        row = {"step": step, "rows_seen": 10 * step, "loss": 1.0, "fvu_standardized": 0.5, "l0": 4.0,
               "dead_fraction_window": 0.0,
               "val_fvu_standardized": 0.5 if step % 4 == 0 else "", "val_l0": ""}
        history.append(row)
        curves.next_time = 0.0  # time throttle off: test the step spacing alone
        curves.log(row)
        if (tmp_path / "curves.png").exists() and not drawn:
            drawn.append(step)
    assert drawn == [12]  # first held-out row at or past 10% of 100 steps
    assert curves.last_step == 24  # next at the first held-out row >= 10 steps later; 28 is too soon after 24


def test_wandb_missing_is_a_config_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"^wandb is not installed; pip install wandb$"):
        flashsae.train("digits", out=tmp_path / "run", wandb=True, quiet=True)
    assert not (tmp_path / "run").exists() and not io.partial_dir(tmp_path / "run").exists()
    assert main(["train", "digits", "--out", str(tmp_path / "run"), "--wandb", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "flashsae: error: wandb is not installed; pip install wandb"


def test_tensorboard_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="tensorboard logging needs an output directory"):
        flashsae.train("digits", tensorboard=True, quiet=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"^tensorboard is not installed; pip install tensorboard$"):
        flashsae.train("digits", out=tmp_path / "run", tensorboard=True, quiet=True)
