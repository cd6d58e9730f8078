"""train_many: models trained together on one data pass equal the models train() gives one by one."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from flashsae import ConfigError, io
from flashsae.train import loop, prepare
from flashsae.train.api import train, train_many
from flashsae.train.sweep import expand_grid, read_table, run_grid

SMALL = {"rows": 3200, "batch_size": 64, "log_every": 7, "device": "cpu"}  # small steps: one thread each
TIMINGS = {"elapsed_s", "train_seconds", "rows_per_s"}


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def _assert_same_model(a, b):
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


def _assert_same_file_tensors(a, b):
    # Compared as tensors: safetensors does not fix the order of the metadata keys in the header.
    ta, tb = io.read_tensors(a), io.read_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _csv_rows(path):
    with open(path, newline="") as f:
        return [_untimed(r) for r in csv.DictReader(f)]


def test_models_trained_together_equal_models_trained_alone(monkeypatch):
    real = loop._workers
    workers = []
    monkeypatch.setattr(loop, "_workers", lambda *a: workers.append(real(*a)) or workers[-1])
    configs = [
        {"k": 2, "d_sae": 32, **SMALL},
        {"k": 4, "d_sae": 48, "lr": 3e-3, **SMALL},
        {"arch": "relu-l1", "d_sae": 32, "l1": 0.1, **SMALL},
        {"arch": "batchtopk", "k": 3, "d_sae": 32, **SMALL, "rows": 1600},      # leaves the pass halfway
        {"k": 3, "d_sae": 32, "lr": 1e-7, "patience": 1, "eval_every": 2, **SMALL},  # stops early
    ]
    together = train_many("digits", configs, quiet=True)
    assert workers == [min(len(os.sched_getaffinity(0)), len(configs))]  # one-thread models side by side
    assert together[3][1].steps == 25 and together[4][1].steps < 50
    for cfg, (model, result) in zip(configs, together):
        alone_model, alone = train("digits", quiet=True, **cfg)
        _assert_same_model(model, alone_model)  # bit for bit: same init, same batches, same steps
        assert result.steps == alone.steps and result.rows_seen == alone.rows_seen
        assert [_untimed(r) for r in result.history] == [_untimed(r) for r in alone.history]
        assert _untimed(result.metrics) == _untimed(alone.metrics)
        assert 0 < result.train_seconds and result.run_dir is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="side by side needs two cores")
def test_mid_sized_models_step_side_by_side_on_one_thread_each(monkeypatch):
    real = loop._workers
    workers = []
    monkeypatch.setattr(loop, "_workers", lambda *a: workers.append(real(*a)) or workers[-1])
    x = np.random.default_rng(0).normal(size=(9000, 64)).astype(np.float32)
    opts = {"rows": 3 * 4096, "batch_size": 4096, "device": "cpu", "eval_every": 0}
    configs = [{"k": 4, "d_sae": 600, **opts}, {"k": 8, "d_sae": 520, **opts}]
    macs = 4096 * 64 * 600
    assert 2**27 < macs < prepare.SIDE_BY_SIDE_MACS  # train() alone would use every thread
    assert prepare.cpu_threads(None, torch.device("cpu"), macs) != 1
    together = train_many(x, configs, quiet=True)
    assert workers == [2]
    for cfg, (model, result) in zip(configs, together):
        _assert_same_model(model, train(x, quiet=True, threads=1, **cfg)[0])
    # workers=1 keeps train()'s own thread choice, and then equals train() alone
    (model, _), _ = train_many(x, configs, quiet=True, workers=1)
    assert workers[-1] == 1
    _assert_same_model(model, train(x, quiet=True, **configs[0])[0])


def test_run_directories_equal_those_train_writes(tmp_path):
    configs = [{"k": 2, "d_sae": 32, **SMALL}, {"arch": "batchtopk", "k": 3, "d_sae": 32, **SMALL, "rows": 1600}]
    together = train_many("digits", configs, outs=[tmp_path / "many" / "a", tmp_path / "many" / "b"], quiet=True,
                          workers=1)  # one model at a time
    for cfg, (_, result), name in zip(configs, together, "ab"):
        alone = train("digits", out=tmp_path / "one" / name, quiet=True, **cfg)[1]
        a, b = result.run_dir, alone.run_dir
        assert a == tmp_path / "many" / name and not (tmp_path / "many" / f"{name}.partial").exists()
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        _assert_same_file_tensors(a / io.MODEL_FILE, b / io.MODEL_FILE)
        assert io.read_json(a / io.CONFIG_FILE) == io.read_json(b / io.CONFIG_FILE)
        assert _untimed(io.read_json(a / io.METRICS_FILE)) == _untimed(io.read_json(b / io.METRICS_FILE))
        assert _csv_rows(a / io.LOG_FILE) == _csv_rows(b / io.LOG_FILE)


def test_configs_that_read_the_data_differently_get_a_pass_each(capsys):
    configs = [{"k": 2, "d_sae": 16, **SMALL}, {"k": 2, "d_sae": 16, **SMALL, "seed": 1},
               {"k": 4, "d_sae": 16, **SMALL}, {"k": 2, "d_sae": 16, **SMALL, "standardize": "none"},
               {"k": 4, "d_sae": 16, **SMALL, "threads": 2}]  # threads switch per model inside a pass
    together = train_many("digits", configs, progress=False)
    assert capsys.readouterr().out.count("[pass ") == 3
    for cfg, (model, _) in zip(configs, together):
        _assert_same_model(model, train("digits", quiet=True, **cfg)[0])
    assert not torch.equal(together[0][0].W_dec, together[1][0].W_dec)  # the seeds differ


def test_arrays_are_read_once_and_the_models_are_independent():
    x = np.random.default_rng(0).normal(size=(800, 12)).astype(np.float32)
    configs = [{"k": 2, "d_sae": 24, **SMALL, "rows": 640}, {"k": 2, "d_sae": 24, **SMALL, "rows": 640}]
    (a, _), (b, _) = train_many(x, configs, quiet=True)
    _assert_same_model(a, b)  # same options, same model
    assert a.W_dec.data_ptr() != b.W_dec.data_ptr() and a.standardizer is not b.standardizer
    _assert_same_model(a, train(x, quiet=True, **configs[0])[0])


def test_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="workers must be >= 1, got 0"):
        train_many("digits", [{"k": 2}], workers=0)
    with pytest.raises(ConfigError, match="at least one config"):
        train_many("digits", [])
    with pytest.raises(ConfigError, match="2 output directories for 1 configs"):
        train_many("digits", [{"k": 2}], outs=[tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ConfigError, match="same output directory"):
        train_many("digits", [{"k": 2}, {"k": 3}], outs=[tmp_path / "a", tmp_path / "a"])
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        train_many("digits", [{"k": 2}, {"bogus": 1}])
    with pytest.raises(ConfigError, match="trains one model at a time"):
        train_many(None, [{"model": "gpt2", "hook": "h.0", "text": "t.txt"}])
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        train_many("digits", [{"k": 2}, {"k": 3}], outs=[tmp_path / "free", tmp_path / "taken"])
    assert not (tmp_path / "free").exists() and not (tmp_path / "free.partial").exists()  # checked first
    with pytest.raises(ConfigError, match=r"k \(40\) must not exceed"):
        train_many("digits", [{"k": 2, "d_sae": 32}, {"k": 40, "d_sae": 32}], outs=[tmp_path / "x", tmp_path / "y"])
    assert not (tmp_path / "x.partial").exists()  # a bad model config fails before anything is written


def test_sweep_in_one_pass_writes_what_separate_runs_write(tmp_path, capsys):
    grid = expand_grid({"k": [2, 4]}, {**SMALL, "rows": 1280, "latents": 16})
    one = run_grid("digits", grid, tmp_path / "one", quiet=True)
    sep = run_grid("digits", grid, tmp_path / "sep", quiet=True, separate=True)
    assert [_untimed(r) for r in read_table(one.out / io.SWEEP_TABLE_FILE)] == \
        [_untimed(r) for r in read_table(sep.out / io.SWEEP_TABLE_FILE)]
    for row in one.rows:
        a, b = one.out / row["run_dir"], sep.out / row["run_dir"]
        _assert_same_file_tensors(a / io.MODEL_FILE, b / io.MODEL_FILE)
        assert json.loads((a / io.CONFIG_FILE).read_text()) == json.loads((b / io.CONFIG_FILE).read_text())
    assert (one.out / io.TRADEOFF_FILE).is_file()


def test_live_curves_follow_the_clock_a_pass_gives_each_model(tmp_path, monkeypatch):
    from flashsae.train import loggers

    monkeypatch.setattr(loggers, "LIVE_CURVES_AFTER_S", 5.0)
    now = [0.0]  # the model's own training time, as train_many hands it over
    history = []
    curves = loggers.LiveCurves(tmp_path / "curves.png", history, total_steps=10, clock=lambda: now[0])
    drawn = []
    for step, t in zip(range(1, 5), (4.9, 5.0, 5.01, 1e6)):
        now[0] = t
        history.append({"step": step, "rows_seen": 10 * step, "loss": 1.0, "fvu_standardized": 0.5,
                        "l0": 4.0, "dead_fraction_window": 0.0, "val_fvu_standardized": 0.5, "val_l0": 4.0})
        curves.log(history[-1])
        drawn.append(curves.last_step)
    assert drawn == [0, 2, 2, 4]  # not before 5 s of its own time, nor right after a redraw


def test_an_interrupted_pass_leaves_checkpoints_that_resume_alone(tmp_path, monkeypatch):
    from flashsae.errors import Interrupted
    from flashsae.train.training_run import TrainingRun

    stops = []
    monkeypatch.setattr(loop, "_install_signal_handlers", lambda stop: stops.append(stop) or {})
    after_step = TrainingRun.after_step

    def signal_at_step_10(self, n_rows):
        out = after_step(self, n_rows)
        if self.state.step == 10:
            stops[0]["signal"] = "SIGTERM"  # as the handler would on `kill`
        return out

    monkeypatch.setattr(TrainingRun, "after_step", signal_at_step_10)
    configs = [{"k": 2, "d_sae": 32, **SMALL}, {"k": 4, "d_sae": 32, **SMALL, "rows": 320}]
    with pytest.raises(Interrupted, match="by SIGTERM at step 10; each unfinished model left a checkpoint"):
        train_many("digits", configs, outs=[tmp_path / "a", tmp_path / "b"], quiet=True)
    assert (tmp_path / "b" / io.MODEL_FILE).is_file()  # done at step 5, before the signal
    assert not (tmp_path / "a").exists() and io.partial_dir(tmp_path / "a").is_dir()
    monkeypatch.undo()
    resumed, result = train("digits", out=tmp_path / "a", resume=True, quiet=True)
    assert result.steps == 50
    _assert_same_model(resumed, train("digits", quiet=True, **configs[0])[0])
