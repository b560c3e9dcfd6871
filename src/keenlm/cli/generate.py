"""``keenlm generate RUN``: text from a model, streamed as it is written."""
from __future__ import annotations

import sys

import keenlm
from keenlm.cli.options import add_config_options, add_device_options, add_model_source, model_path


def add_parser(sub, fmt):
    g = sub.add_parser("generate", help="generate text from a run", formatter_class=fmt)
    add_model_source(g)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--no-stream", action="store_true", help="print each result at the end")
    add_device_options(g)
    add_config_options(g, ("generate",))
    return g


def run(args) -> int:
    km = keenlm.load(model_path(args), device=args.device, quant=args.quant)
    overrides = {k[len("cfg:generate."):]: v for k, v in vars(args).items()
                 if k.startswith("cfg:generate.") and v is not None}
    prompts = args.prompt or [""]
    for i, prompt in enumerate(prompts):
        if not prompt:
            prompt = "\n"  # an empty prompt has no token to start from
        if args.no_stream:
            print(km.generate(prompt, **overrides))
        else:
            sys.stdout.write(prompt)
            km.generate(prompt, stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()), **overrides)
            sys.stdout.write("\n")
        if i + 1 < len(prompts):
            print("-" * 40)
    return 0
