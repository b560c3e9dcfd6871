"""``keenlm train``: train a model from a preset, a config file and ``--SECTION.FIELD`` options."""
from __future__ import annotations

import keenlm
from keenlm.cli.options import add_config_options, config_from_args


def add_parser(sub, fmt):
    t = sub.add_parser("train", help="train a model (writes a run folder)", formatter_class=fmt,
                       description="Train a model. Precedence: defaults < --preset < --config < "
                       "--SECTION.FIELD options.")
    t.add_argument("--preset", help="size preset: tiny | demo | small | base | large, or a YAML file")
    t.add_argument("--config", help="YAML or JSON file of config sections")
    add_config_options(t)
    return t


def run(args) -> int:
    res = keenlm.train(config_from_args(args))
    ev = res.final_eval
    print(f"{'stopped' if res.interrupted else 'finished'} at step {res.step}: val loss "
          f"{ev['loss']:.4f}, {ev['bits_per_byte']:.3f} bits/byte; run folder {res.run_dir}")
    return 0
