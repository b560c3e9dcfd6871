"""``keenlm study NAME OUT [options]``: one subcommand per study (keenlm.studies.STUDIES), its
options generated from the study's own options dataclass, so ``keenlm study moe --help`` lists
only what moe takes, each with its default."""
from __future__ import annotations

from keenlm.cli.options import add_dataclass_options, options_from_args
from keenlm.studies import STUDIES


def add_parser(sub, fmt):
    st = sub.add_parser("study", help="studies: low-bit frontier, PTQ, RL, test-time compute, "
                                      "epochs, group size, mixture of experts, selective backprop, "
                                      "neural memory, spiking execution",
                        formatter_class=fmt, description="Run a study: keenlm study NAME OUT "
                        "[options]; keenlm study NAME --help lists its options.")
    names = st.add_subparsers(dest="study", required=True, metavar="NAME")
    for name, study in STUDIES.items():
        about = " ".join(study.options.__doc__.split())
        p = names.add_parser(name, help=about, description=about[0].upper() + about[1:] + ".",
                             formatter_class=fmt)
        p.add_argument("out", help="output folder (results.json, results.md, charts, runs)")
        add_dataclass_options(p, study.options, flags=True)
    return st


def run(args) -> int:
    study = STUDIES[args.study]
    res = study.run(args.out, options_from_args(study.options, args))
    print(study.summary(res))
    print(f"results in {args.out}/results.md")
    return 0
