"""Inference: generation (and, later, test-time search)."""
from keenlm.infer.generate import generate, generate_tokens, sample_next

__all__ = ["generate", "generate_tokens", "sample_next"]
