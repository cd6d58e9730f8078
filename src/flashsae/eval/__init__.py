"""Evaluation: pure metric functions (metrics.py) and streaming held-out evaluation (evaluate.py)."""
