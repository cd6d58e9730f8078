"""Training: the optimizer step (trainer.py), schedules (optim.py), checkpoints and the fit loop."""
