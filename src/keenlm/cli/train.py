"""``keenlm train``: train a model from a preset, a config file and ``--SECTION.FIELD`` options."""
from __future__ import annotations

import os
import sys

import keenlm
from keenlm.cli.options import add_config_options, config_from_args


def add_parser(sub, fmt):
    t = sub.add_parser("train", help="train a model (writes a run folder)", formatter_class=fmt,
                       description="Train a model. Precedence: defaults < --preset < --config < "
                       "--SECTION.FIELD options.")
    t.add_argument("--preset", help="size preset: tiny | demo | small | base | large, or a YAML file")
    t.add_argument("--config", help="YAML or JSON file of config sections")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (more than 1: torchrun, train.parallel ddp "
                        "unless set; each process takes cores / N threads)")
    add_config_options(t)
    return t


def run(args) -> int:
    if args.nproc > 1:  # the same command again, under torchrun
        from keenlm.train.distributed import launch

        return launch(args.nproc, strip_option(sys.argv[1:], "--nproc"))
    res = keenlm.train(config_from_args(args))
    ev = res.final_eval
    if os.environ.get("RANK", "0") == "0":
        print(f"{'stopped' if res.interrupted else 'finished'} at step {res.step}: val loss "
              f"{ev['loss']:.4f}, {ev['bits_per_byte']:.3f} bits/byte; run folder {res.run_dir}")
    return 0


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out
