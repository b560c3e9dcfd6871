"""What every study shares.

A study writes ``results.json``, ``results.md`` (a table) and charts (SVG, and PNG where
matplotlib is installed) into its output folder (``write_results``). Each run inside it that
finishes is recorded with the config it was made from (``record``); running the study again
keeps a finished run (``finished``) and continues a stopped one from its checkpoint, so an
interrupted study resumes where it stopped. A folder made with other settings is an error
rather than a silent mix.

``Study`` is one entry of the table ``keenlm.studies.STUDIES``: its options (a small frozen
dataclass, from which ``keenlm study NAME --help`` is generated), the function that runs it
and the few lines it prints at the end.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import keenlm
from keenlm.config import upgrade
from keenlm.runs import atomic_write_text

Log = Callable[[str], None]


@dataclass(frozen=True)
class Study:
    options: type  # a frozen dataclass of the study's settings: one option --field-name each
    run: Callable[[Any, Any], dict]  # run(out, options) -> the results written to results.json
    summary: Callable[[dict], str]  # those results in a few lines, for the terminal


def finished(folder: Path, config: dict, normalize: Callable[[dict], Any] = upgrade) -> dict | None:
    """A study's finished run (its ``study.json``), or None; one made with another config is
    an error, so a study folder is never silently mixed. Configs are compared after
    ``normalize`` (by default: run configs in today's spelling, whichever one was written)."""
    path = folder / "study.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if normalize(rec.get("config")) != normalize(config):
        raise ValueError(f"{folder} was run with other settings; use another output folder")
    return rec


def record(folder: Path, rec: dict) -> None:
    """Mark a study's run finished: ``study.json`` (with its ``config``), written atomically."""
    atomic_write_text(folder / "study.json", json.dumps(rec, indent=2) + "\n")


def train_run(cfg: dict, name: str):
    """Train one run of a study: (TrainResult, seconds). A run stopped halfway is an error
    (running the study again continues it from its checkpoint)."""
    t0 = time.perf_counter()
    res = keenlm.train(cfg)
    if res.interrupted:
        raise KeyboardInterrupt(f"the {name} run was stopped; run again to continue")
    return res, time.perf_counter() - t0


def write_results(out: Path, results: dict, table: str) -> None:
    """``results.json`` and ``results.md`` (a Markdown table and notes) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", table + "\n")


def parse_size(text: str) -> tuple[int, int]:
    """"128x4" -> (d_model 128, 4 layers)."""
    try:
        d, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r}: write d_model x layers, e.g. 128x4") from None
    if d % 64 or n < 1:
        raise ValueError(f"size {text!r}: d_model must be a multiple of 64 (heads of 64), layers >= 1")
    return d, n
