"""Run under torchrun by tests/test_distributed.py: trains each config of a JSON list in turn, in
one process group, so one launch covers several cases. An entry with "rl" runs keenlm.train.grpo
on the policy it names, with a toy reward (the completion's first byte is even)."""
import json
import sys

import torch

import keenlm
from keenlm.config import rl_config
from keenlm.train.grpo import RLTrainer


def even_first_byte(prompts, completions):
    return [1.0 if c and c[0].encode()[0] % 2 == 0 else 0.0 for c in completions]


torch.set_num_threads(1)
for cfg in json.loads(open(sys.argv[1]).read()):
    if "rl" in cfg:
        RLTrainer(keenlm.load(cfg["policy"]), rl_config(cfg["rl"]), reward=even_first_byte).fit()
    else:
        keenlm.train(cfg)
