"""Builds the JSONL files of keenlm's local lm-evaluation-harness tasks (keenlm/harness/tasks/):
``python -m keenlm.harness.build_tasks``. The files are shipped, so every machine evaluates the
same items whatever its Python version; this module says how they were made.

- ``nextline.jsonl``: from the standard library's validation split (the files keenlm's default
  corpus holds out of training; hash split of keenlm.data.corpus), four consecutive source lines
  and four candidate next lines, the real one and three other lines of the same file.
- ``addition.jsonl``: "a + b =" for two-digit a and b after three worked examples; the answer
  is the sum.
- ``stdlib_text.jsonl``: ~1,000-character runs of whole lines from the same held-out files.
"""
from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

from keenlm.config import DataConfig
from keenlm.data.corpus import load_corpus

OUT = Path(__file__).parent / "tasks"
SHOTS = "12 + 30 = 42\n45 + 17 = 62\n81 + 9 = 90\n"


def held_out_files() -> list[tuple[str, list[str]]]:
    """(relative path, non-blank lines) of the stdlib files in keenlm's validation split."""
    corpus = load_corpus(DataConfig(corpus="stdlib"))
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for key in corpus.keys("val"):
        try:
            text = (root / key).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines = [line.rstrip() for line in text.splitlines() if line.strip()]
        if len(lines) >= 40:
            out.append((key, lines))
    return out


def nextline_items(files, n: int, seed: int = 0) -> list[dict]:
    rng, items = random.Random(seed), []
    while len(items) < n:
        key, lines = files[rng.randrange(len(files))]
        i = rng.randrange(4, len(lines))
        true = lines[i]
        others = sorted({x for x in lines if x != true and len(x.strip()) >= 8})
        if len(true.strip()) < 8 or len(others) < 3:
            continue
        choices = rng.sample(others, 3) + [true]
        rng.shuffle(choices)
        items.append({"source": key, "context": "\n".join(lines[i - 4:i]) + "\n",
                      "choices": choices, "label": choices.index(true)})
    return items


def addition_items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        items.append({"prompt": f"{SHOTS}{a} + {b} =", "answer": str(a + b)})
    return items


def text_items(files, n: int, chars: int = 1000, seed: int = 0) -> list[dict]:
    rng, items = random.Random(seed), []
    while len(items) < n:
        key, lines = files[rng.randrange(len(files))]
        i, run = rng.randrange(len(lines)), []
        while i < len(lines) and sum(len(x) + 1 for x in run) < chars:
            run.append(lines[i])
            i += 1
        if sum(len(x) + 1 for x in run) >= chars // 2:
            items.append({"source": key, "text": "\n".join(run) + "\n"})
    return items


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    files = held_out_files()
    write(OUT / "nextline.jsonl", nextline_items(files, 200))
    write(OUT / "addition.jsonl", addition_items(200))
    write(OUT / "stdlib_text.jsonl", text_items(files, 40))
    print(f"wrote {OUT}/*.jsonl from {len(files)} held-out standard-library files")


if __name__ == "__main__":
    main()
