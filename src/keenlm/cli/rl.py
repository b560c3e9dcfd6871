"""``keenlm rl POLICY``: reinforcement learning on a verifiable task, GRPO or rejection-sampling
fine-tuning (keenlm.train.grpo); every RLConfig field is a flat option (``--lr``, ``--out-dir``)."""
from __future__ import annotations

import os
import sys

import keenlm
from keenlm.cli.options import add_dataclass_options, given
from keenlm.config import RLConfig, rl_config
from keenlm.train import grpo


def add_parser(sub, fmt):
    r = sub.add_parser("rl", help="reinforcement learning on a verifiable task: GRPO or "
                       "rejection-sampling fine-tuning", formatter_class=fmt,
                       description="Sample --group completions per prompt, reward them exactly, "
                       "reinforce the best (keenlm.train.grpo). Writes a run folder.")
    r.add_argument("model", help="the starting policy: run folder, .gguf file or HF folder")
    r.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (more than 1: torchrun; the step's prompts are "
                        "split over them)")
    add_dataclass_options(r, RLConfig)
    return r


def run(args) -> int:
    if args.nproc > 1:  # the same command again, under torchrun
        from keenlm.cli.train import strip_option
        from keenlm.train.distributed import launch

        return launch(args.nproc, strip_option(sys.argv[1:], "--nproc"))
    res = grpo.rl(keenlm.load(args.model), rl_config(given(args, RLConfig)))
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"{'stopped' if res.interrupted else 'finished'} at RL step {res.step}: held-out greedy "
          f"pass@1 {res.start_eval['pass@1']:.3f} -> {res.final_eval['pass@1']:.3f}; run folder "
          f"{res.run_dir} (metrics.jsonl, rl_curves.svg)")
    if res.best:
        b = res.best
        print(f"best by validation: step {b['step']} (val pass@1 {b['val_pass@1']:.3f}, "
              f"held-out {b['pass@1']:.3f}) in {res.run_dir / 'best'}")
    return 0
