"""Run under torchrun by tests/test_distributed.py: trains each config of a JSON list in turn
(keenlm.train), in one process group, so one launch covers several cases."""
import json
import sys

import torch

import keenlm

torch.set_num_threads(1)
for cfg in json.loads(open(sys.argv[1]).read()):
    keenlm.train(cfg)
