"""``keenlm rl POLICY``: reinforcement learning on a verifiable task, GRPO or rejection-sampling
fine-tuning (keenlm.train.grpo); every RLConfig field is a flat option (``--lr``, ``--out-dir``)."""
from __future__ import annotations

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
    add_dataclass_options(r, RLConfig)
    return r


def run(args) -> int:
    res = grpo.rl(keenlm.load(args.model), rl_config(given(args, RLConfig)))
    print(f"{'stopped' if res.interrupted else 'finished'} at RL step {res.step}: held-out greedy "
          f"pass@1 {res.start_eval['pass@1']:.3f} -> {res.final_eval['pass@1']:.3f}; run folder "
          f"{res.run_dir} (metrics.jsonl, rl_curves.svg)")
    return 0
