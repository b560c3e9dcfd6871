"""The ``keenlm`` command line. Thin: it parses, builds configs and calls the library.

One module per command, each with ``add_parser(sub, fmt)`` (its options) and ``run(args) ->
int`` (the work, done by importable library functions); ``COMMANDS`` maps each command name to
its module. The options generated from the config dataclasses (``--SECTION.FIELD`` and the flat
``--field-name`` kind) live in keenlm.cli.options.

Every command module is imported here, not looked up lazily: building the parser needs each
one's options anyway, and their imports cost little beside ``import keenlm`` itself (torch):
of ``keenlm --help``'s ~1.9 s on a 2-core CPU, the command modules take under 0.1 s.
"""
from __future__ import annotations

import argparse
import os
import sys

from keenlm.cli import (chat, convert, demo, evaluate, generate, info, quantize, report, reward, rl,
                        scale, serve, solve, spike, study, train)
from keenlm.cli.options import config_from_args  # noqa: F401  (part of this package's API)
from keenlm.config import ConfigError
from keenlm.runs import CheckpointWriteError, FolderBusy

COMMANDS = {
    "train": train,
    "generate": generate,
    "eval": evaluate,
    "train-reward": reward,
    "solve": solve,
    "rl": rl,
    "info": info,
    "spike": spike,
    "convert": convert,
    "quantize": quantize,
    "study": study,
    "chat": chat,
    "serve": serve,
    "scale": scale,
    "report": report,
    "demo": demo,
}

# a failure the user can fix: one line naming it, exit status 2 (KEENLM_DEBUG=1: the traceback)
# one-line errors: bad input, a folder another job holds, a run stopped by non-finite steps
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, ValueError, FolderBusy,
               FloatingPointError, CheckpointWriteError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keenlm", description="Train, evaluate and run small "
                                "language models on the compute one person has.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub, argparse.ArgumentDefaultsHelpFormatter)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except USER_ERRORS as e:
        if os.environ.get("KEENLM_DEBUG"):
            raise
        print(f"keenlm {args.command}: error: {e}", file=sys.stderr)
        return 2
