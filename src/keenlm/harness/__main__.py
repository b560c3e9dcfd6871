"""``python -m keenlm.harness [lm_eval arguments]``: lm-evaluation-harness' own command line with
the ``keenlm`` model registered and keenlm's task folder on the include path, e.g.

    python -m keenlm.harness run --model keenlm --model_args pretrained=runs/x,quant=q4 \\
        --tasks keenlm_nextline,keenlm_addition
"""
import sys

from lm_eval.__main__ import cli_evaluate

import keenlm.harness.model  # noqa: F401  (registers the keenlm model)
from keenlm.harness import TASKS

if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS)]
    cli_evaluate()
