"""``keenlm demo`` (run by ``make demo``): the main job on the embedded default corpus.

Trains the ``demo`` preset on the Python standard library's own source code with live
progress, evaluates it (validation loss, perplexity, bits per byte), prints code it writes
from a few prompts, and leaves a complete run folder. On a 2-core CPU it finishes in under five
minutes; the training time budget fixes the length of the schedule after the first steps.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import keenlm
from keenlm.cli.info import run_info
from keenlm.config import from_dict
from keenlm.presets import preset_dict
from keenlm.runs import atomic_write_text

PROMPTS = ("def ", "import os\n\n\nclass ", "    for i in range(", '"""')


def add_parser(sub, fmt):
    d = sub.add_parser("demo", help="train a small model on the Python stdlib, evaluate, sample",
                       formatter_class=fmt)
    d.add_argument("--out", default="runs/demo", help="run folder")
    d.add_argument("--budget", type=float, default=210.0, help="training time budget in seconds")
    return d


def run(args) -> int:
    run_demo(out_dir=args.out, time_budget_s=args.budget)
    return 0


def run_demo(out_dir: str = "runs/demo", time_budget_s: float = 210.0) -> dict:
    t0 = time.perf_counter()
    out = Path(out_dir)
    if (out / "config.json").exists():  # a previous demo: start fresh, never resume it
        shutil.rmtree(out)
    cfg = from_dict({**preset_dict("demo"), "preset": "demo"})
    cfg = from_dict({"train": {"out_dir": str(out), "time_budget_s": time_budget_s,
                               "checkpoint": {"resume": False}}}, base=cfg)
    print(f"keenlm demo: training the 'demo' preset on the Python standard library "
          f"({time_budget_s:.0f} s budget), run folder {out}")
    result = keenlm.train(cfg)
    ev = result.final_eval
    print(f"\nvalidation: loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f}, "
          f"{ev['bits_per_byte']:.3f} bits per byte ({ev['tokens']:,} tokens)")
    km = keenlm.load(out)
    samples = []
    for prompt in PROMPTS:
        text = km.generate(prompt, max_new_tokens=80, temperature=0.7, top_k=40, seed=1)
        samples.append(f"--- prompt {prompt!r}\n{prompt}{text}\n")
        print(samples[-1])
    atomic_write_text(out / "samples.txt", "\n".join(samples))
    wall = time.perf_counter() - t0
    print(run_info(out))
    print(f"\ndemo finished in {wall:.0f} s: {ev['bits_per_byte']:.3f} bits/byte on held-out "
          f"stdlib files (target < 2.0)")
    return {"wall_s": wall, **ev}
