"""Command-line options generated from dataclasses, and the few hand-written ones that several
commands share.

Every run-config field is an option ``--SECTION.FIELD`` (``add_config_options``), generated
from the dataclasses in keenlm.config with its default and the comment written beside it in
the source as help. Precedence: defaults < --preset < --config file < --SECTION.FIELD options
(``config_from_args``). The spellings of an earlier release (``--train.lr``) are accepted but
not shown; using one prints a line naming today's spelling.

A small flat dataclass (``keenlm rl``'s RLConfig, ``keenlm quantize``'s QuantConfig, each
study's options) gives plain options ``--field-name`` instead (``add_dataclass_options``).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import textwrap
import typing

from keenlm.config import (RENAMED, RL_TASKS, SECTIONS, ConfigError, coerce, flat_fields,
                           from_dict, load_file, merge, parse_overrides)
from keenlm.data.tasks import get_task
from keenlm.presets import preset_dict


def _field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the dataclass source, used as --help text."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        code, _, comment = line.partition("  # ")
        code = code.strip()
        if ":" in code and "=" in code and not code.startswith(("def ", "#")):
            out[code.split(":")[0].strip()] = comment.strip()
    return out


def _metavar(typ) -> str:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", "value")
    return "A,B,..." if name.startswith("tuple") else name.upper()


def _shown(default):
    """A default as it is typed on the command line: a list comma-separated."""
    return ",".join(map(str, default)) if isinstance(default, tuple) else default


def _help(hint: str, default) -> str:
    return f"{hint + '; ' if hint else ''}default: {_shown(default)!r}".replace("%", "%%")


# ------------------------------------------------------------------------ run-config options


def add_config_options(parser: argparse.ArgumentParser, sections=tuple(SECTIONS)) -> None:
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options ({cls.__name__})")
        _add_fields(group, section, cls)
    _add_renamed_options(parser, sections)


def _add_fields(group, prefix: str, cls) -> None:
    """``--prefix.field`` for every field; a nested part (model.moe) adds ``--prefix.part.field``."""
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            _add_fields(group, f"{prefix}.{f.name}", type(default))
            continue
        group.add_argument(f"--{prefix}.{f.name}", dest=f"cfg:{prefix}.{f.name}",
                           metavar=_metavar(f.type), default=argparse.SUPPRESS,
                           help=_help(comments.get(f.name, ""), default))


def _add_renamed_options(parser, sections) -> None:
    """The spellings of an earlier release (``--train.lr``): accepted, not shown in --help;
    using one prints a line naming today's spelling (config.parse_overrides)."""
    for section, key in RENAMED:
        if section in sections:
            parser.add_argument(f"--{section}.{key}", dest=f"cfg:{section}.{key}",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def config_from_args(args, base: dict | None = None):
    layers = [base or {}]
    if getattr(args, "preset", None):
        layers.append(preset_dict(args.preset))
        layers.append({"preset": args.preset})
    if getattr(args, "config", None):
        layers.append(load_file(args.config))
    pairs = [(k[4:], v) for k, v in vars(args).items() if k.startswith("cfg:") and v is not None]
    layers.append(parse_overrides(pairs, notice=lambda s: print(f"keenlm: {s}", file=sys.stderr)))
    return from_dict(merge(*layers))


# ------------------------------------------------------------------- flat dataclass options


def add_dataclass_options(parser, cls, flags: bool = False) -> None:
    """Plain options ``--field-name`` for every leaf field of a small dataclass, nested parts
    opened (dest = the field name; names are unique across parts). A ``Literal`` type gives
    the choices; with ``flags``, a bool that is off by default is a flag without a value."""
    comments = {}
    for name, typ, default, owner in flat_fields(cls):
        if owner not in comments:
            comments[owner] = _field_comments(owner)
        kw = {"metavar": _metavar(typ)}
        if typing.get_origin(typ) is typing.Literal:
            kw = {"choices": typing.get_args(typ)}
        elif flags and typ is bool and default is False:
            kw = {"action": "store_true"}
        own_name = name.removeprefix(getattr(owner, "flat_prefix", ""))
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                            help=_help(comments[owner].get(own_name, ""), default), **kw)


def given(args, cls) -> dict:
    """The fields of ``cls`` set on the command line, as typed (the others keep their defaults)."""
    names = {name for name, *_ in flat_fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def options_from_args(cls, args):
    """A flat options dataclass (a study's) from the command line: each value given converted
    to its field's type, a tuple written comma-separated; a bad value names its option."""
    types = typing.get_type_hints(cls)
    return cls(**{name: _convert(f"--{name.replace('_', '-')}", value, types[name])
                  for name, value in given(args, cls).items()})


_ITEMS = {int: "integers, e.g. 4,8,16", float: "numbers, e.g. 0.25,0.5", str: "names, e.g. a,b"}


def _convert(option: str, value, typ):
    if typing.get_origin(typ) is typing.Literal:
        return value  # argparse checked the choices
    if typing.get_origin(typ) is not tuple:
        try:
            return coerce(option, value, typ)
        except ConfigError as e:
            raise ValueError(f"{option} {value!r}: give {e.allowed}") from None
    item = typing.get_args(typ)[0]
    parts = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    try:
        return tuple(coerce(option, v, item) for v in parts)
    except ConfigError:
        raise ValueError(f"{option} {value!r}: give comma-separated {_ITEMS[item]}") from None


# ------------------------------------------------------------- options several commands share


QUANT_HELP = ("weight-only quantized CPU inference (q4: keenlm's decode engine, a GGUF's Q4_0/Q4_1 "
              "and ternary TQ2_0 blocks read as stored, ~9x transformers' decode on SmolLM2; "
              "int8 / int4: PyTorch's weight-only kernels, ~3x)")


def add_model_source(parser) -> None:
    """The model to load, as RUN or ``--model`` (``model_path`` reads it)."""
    parser.add_argument("run", nargs="?", help="run folder, .gguf file or Hugging Face folder")
    parser.add_argument("--model", help="the same as RUN, for scripts that name it")


def model_path(args) -> str:
    path = args.model or args.run
    if not path:
        raise ValueError("name a model: a run folder, a .gguf file or a Hugging Face folder")
    return path


def add_device_options(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    parser.add_argument("--quant", default="none", choices=("none", "int8", "int4", "q4"),
                        help=QUANT_HELP)


def add_task_options(parser) -> None:
    """A verifiable task and how answers are sampled (``task_of`` builds it)."""
    parser.add_argument("--task", required=True, choices=RL_TASKS, help="a verifiable task")
    parser.add_argument("--difficulty", type=int, default=2, help="digits / numbers on offer")
    parser.add_argument("--scratchpad", action="store_true",
                        help="answers worked step by step, one line per step")
    parser.add_argument("--template", default="plain", choices=("plain", "chat"),
                        help="chat: prompts rendered by the model's chat template (pretrained "
                             "chat models such as SmolLM2-Instruct)")
    parser.add_argument("--shots", type=int, default=0,
                        help="with --template chat: worked examples shown as earlier turns")
    parser.add_argument("--examples", default="demonstration", choices=("demonstration", "equation"),
                        help="what the examples show before the answer: the task's demonstration, "
                             "or the problem restated as an equation with its result")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens per sample (per step in search)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def task_of(args, tokenizer=None):
    """The task the options name; ``tokenizer`` renders chat prompts (--template chat)."""
    return get_task(args.task, args.difficulty, args.scratchpad, template=args.template,
                    tokenizer=tokenizer, shots=args.shots, examples=args.examples)


def int_list(text: str, option: str) -> list[int]:
    """"4,8,16" -> [4, 8, 16], or an error that names the option."""
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: give comma-separated integers, e.g. 4,8,16") from None
