"""Training: the engine behind `flashsae.train(...)`, `flashsae.train_many(...)`, the CLI and the estimator.

    spec.py          RunSpec: flat options -> typed configs (the only place)
    prepare.py       DataPass: open, fingerprint, scan, split, standardise once per pass; threads, b_dec
    training_run.py  TrainingRun: one model's trainer, logs, evaluations, checkpoints, result
    loop.py          run_pass: the only training loop, for one run or many
    artifacts.py     config.json's schema and the files a finished run writes
    api.py           train() and train_many()
    trainer.py       the optimizer step; optim.py schedules; checkpoint.py; loggers.py; sweep.py grids

The package itself is callable, so that `import flashsae.train` and `flashsae.train(...)` both work:
calling it calls `train()`.
"""
import inspect
import sys
import types

from flashsae.train.api import train, train_many
from flashsae.train.training_run import TrainResult

__all__ = ["TrainResult", "train", "train_many"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(train)
