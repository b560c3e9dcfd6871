"""Inference: generation (generate.py; the C decode engine for 4-bit and ternary models,
engine.py + csrc/step.c), evaluation (evaluate.py, task_eval.py), test-time search (search.py,
reward.py, sweep.py)."""
from keenlm.infer.generate import generate, generate_tokens, sample_next

__all__ = ["generate", "generate_tokens", "sample_next"]
