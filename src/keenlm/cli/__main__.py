"""``python -m keenlm.cli``: the same as the ``keenlm`` command."""
from keenlm.cli import main

raise SystemExit(main())
