"""keenlm under lm-evaluation-harness: a model class (``keenlm``) and local task files.

- ``keenlm.harness.model.KeenLM``, registered in lm-evaluation-harness as ``keenlm``: any model
  ``keenlm.load`` reads (run folder, quantized folder, GGUF, Hugging Face folder), with
  ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``.
- ``TASKS``: the folder of keenlm's own task files (``--include_path``), built from what is on
  every machine, so nothing downloads: ``keenlm_nextline`` (multiple choice: which line of
  Python standard-library source comes next), ``keenlm_addition`` (generation: two-digit
  addition, three worked examples in the prompt), ``keenlm_stdlib_text`` (rolling
  log-likelihood: perplexity and bits per byte of standard-library source).

The harness is an optional dependency (``pip install 'keenlm[eval]'``).
"""
from pathlib import Path

TASKS = Path(__file__).parent / "tasks"
TASK_NAMES = ("keenlm_nextline", "keenlm_addition", "keenlm_stdlib_text")
