"""Fuzzing settings (Hypothesis): ``make test`` runs each reader's properties on a bounded
number of examples (the ``ci`` profile, derandomized so a failure reproduces); ``make fuzz``
runs ``KEENLM_FUZZ_EXAMPLES`` (10,000 by default there) per property with fresh randomness and
Hypothesis' example database, and prints the examples tried per test (written to
``KEENLM_FUZZ_REPORT`` as JSON when set).

The memory bound, in ``make fuzz``: the process's data segment is limited
(``KEENLM_FUZZ_MEMORY_GB``, 4 by default; RLIMIT_DATA counts every heap and anonymous
mapping), so an allocation sized by an untrusted field fails inside the example that caused it,
as a MemoryError or torch's "can't allocate memory" (not one of the readers' errors: the
property fails and Hypothesis shrinks it), instead of the machine running out of memory."""
import json
import os
import resource

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz import mutate

EXAMPLES = int(os.environ.get("KEENLM_FUZZ_EXAMPLES", "0"))
settings.register_profile("ci", max_examples=60, deadline=5000, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=EXAMPLES or 10_000, deadline=10_000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fuzz" if EXAMPLES else "ci")

MEMORY_GB = float(os.environ.get("KEENLM_FUZZ_MEMORY_GB", "4"))
if EXAMPLES and MEMORY_GB > 0:  # not in make test: the limit would hold for every test after
    _limit = int(MEMORY_GB * (1 << 30))
    _soft, _hard = resource.getrlimit(resource.RLIMIT_DATA)
    if _hard == resource.RLIM_INFINITY or _hard > _limit:
        resource.setrlimit(resource.RLIMIT_DATA, (_limit, _hard))

# examples per test: each property calls mutate.count() first (Hypothesis' own statistics see
# only properties that are the test function itself, not one defined and run inside a test)
@pytest.fixture(autouse=True)
def _examples_belong_to(request):
    mutate.RUNNING[0] = request.node.nodeid
    yield


def pytest_terminal_summary(terminalreporter):
    if not EXAMPLES or not mutate.COUNTS:
        return
    w = terminalreporter
    w.section("examples tried per test (keenlm fuzz)")
    for test, n in sorted(mutate.COUNTS.items()):
        w.line(f"{test}: {n}")
    if os.environ.get("KEENLM_FUZZ_REPORT"):
        with open(os.environ["KEENLM_FUZZ_REPORT"], "w", encoding="utf-8") as f:
            json.dump(dict(mutate.COUNTS), f, indent=1)
