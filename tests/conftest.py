"""Fixtures shared by several test files."""
import shutil
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of four stdlib modules (~150 KB): enough text for short training runs."""
    d = tmp_path_factory.mktemp("small_corpus")
    for name in ("argparse.py", "textwrap.py", "shlex.py", "copy.py"):
        shutil.copy(STDLIB / name, d / name)
    return d
