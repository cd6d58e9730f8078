"""Option names (kept for callers of the earlier module; `flashsae.train.spec` owns them)."""
from flashsae.train.spec import ALIASES, DATA_FIELDS, TRAIN_FIELDS, model_fields

__all__ = ["ALIASES", "DATA_FIELDS", "TRAIN_FIELDS", "model_fields"]
