"""Scaling laws: sweeps of model size x training tokens, fits, predictions and plans."""
