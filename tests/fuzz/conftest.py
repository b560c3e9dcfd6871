"""Fuzzing settings (Hypothesis): ``make test`` runs each reader's properties on a bounded
number of examples (the ``ci`` profile, derandomized so a failure reproduces); ``make fuzz``
runs ``KEENLM_FUZZ_EXAMPLES`` (10,000 by default there) per property with fresh randomness and
Hypothesis' example database, and prints the statistics (examples tried per property)."""
import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("KEENLM_FUZZ_EXAMPLES", "0"))
settings.register_profile("ci", max_examples=60, deadline=5000, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=EXAMPLES or 10_000, deadline=10_000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fuzz" if EXAMPLES else "ci")
