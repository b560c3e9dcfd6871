"""Fixtures shared by several test files."""
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before any
# kernel is defined (keenlm.model.flash_triton is imported later, by the tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of four stdlib modules (~150 KB): enough text for short training runs."""
    d = tmp_path_factory.mktemp("small_corpus")
    for name in ("argparse.py", "textwrap.py", "shlex.py", "copy.py"):
        shutil.copy(STDLIB / name, d / name)
    return d
