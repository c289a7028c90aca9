"""Inference: probabilities from a run's fold checkpoints (TTA), submissions."""
