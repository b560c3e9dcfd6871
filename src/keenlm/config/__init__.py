"""Run configuration: small frozen dataclasses, validated where they are made.

A run is described by one ``RunConfig`` holding four parts (``model``, ``data``, ``train``,
``generate``). Every field can come from a preset, a YAML/JSON file, or the command line as
``--model.n_layer 4``; they are merged in that order. A bad value fails here, at load time,
with the dotted key, the value and what is allowed -- never deep inside a forward pass.

    base.py    ConfigError, value checks, typed conversion of JSON/YAML/command-line values
    model.py   model.* (and its parts: moe, memory; spike and lowbit from their techniques)
    train.py   data.*, train.* (optim, schedule, checkpoint, eval, runtime, select), generate.*
    rl.py      keenlm rl's config

Derived values (feed-forward width, learning rate, ...) are left at 0 in the config and
filled in by one visible function, ``keenlm.presets.resolve``.

Spellings of an earlier release (``train.lr``, ``model.lowbit_group``, ...) still load: files
and dicts are upgraded by ``upgrade``; on the command line they also print a one-line notice
naming the new spelling (keenlm.cli.options).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from keenlm.config.base import (ConfigError, check, coerce, field_types, flat_fields, nest_flat,
                                section_from_dict)
from keenlm.config.model import (ATTENTION_BACKENDS, FFN_KINDS, LINEAR_KINDS, MEMORY_KINDS,
                                 MOE_BALANCE, LoRAConfig, MemoryConfig, ModelConfig,
                                 MoEConfig)
from keenlm.config.rl import RL_ALGOS, RL_LOSSES, RL_TASKS, RLConfig, RLOptimConfig, RLRunConfig
from keenlm.config.train import (SELECT_METHODS, CheckpointConfig, DataConfig, EvalConfig,
                                 GenerateConfig, OptimConfig, RuntimeConfig, ScheduleConfig,
                                 SelectConfig, TrainConfig)
from keenlm.quant.config import QUANT_BITS, QUANT_METHODS, STORE_KINDS, LowBitConfig, QuantConfig
from keenlm.runs import atomic_write_text
from keenlm.spiking.config import SPIKE_RESETS, SpikeConfig

__all__ = [
    "ATTENTION_BACKENDS", "FFN_KINDS", "LINEAR_KINDS", "MEMORY_KINDS", "MOE_BALANCE", "QUANT_BITS",
    "QUANT_METHODS", "RL_ALGOS", "RL_LOSSES", "RL_TASKS", "SECTIONS", "SELECT_METHODS",
    "SPIKE_RESETS", "STORE_KINDS", "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig",
    "GenerateConfig", "LoRAConfig", "LowBitConfig", "MemoryConfig", "MoEConfig", "ModelConfig", "OptimConfig",
    "QuantConfig", "RLConfig", "RLOptimConfig", "RLRunConfig", "RunConfig", "RuntimeConfig",
    "ScheduleConfig", "SelectConfig", "SpikeConfig", "TrainConfig", "check", "coerce",
    "field_types", "flat_fields", "from_dict", "load_file", "merge", "nest_flat",
    "parse_overrides", "rl_config", "save_json", "section_from_dict", "to_dict", "upgrade",
]


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    preset: str = ""  # name of the size preset it was made from, for the record


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "generate": GenerateConfig}

# Earlier spellings -> where the value lives now (section, old key) -> path under the section.
RENAMED: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "lowbit_group"): ("lowbit", "group"),
    ("model", "lowbit_per_channel"): ("lowbit", "per_channel"),
    ("model", "act_bits"): ("lowbit", "act_bits"),
    ("train", "optimizer"): ("optim", "name"),
    ("train", "lr"): ("optim", "lr"),
    ("train", "weight_decay"): ("optim", "weight_decay"),
    ("train", "beta1"): ("optim", "beta1"),
    ("train", "beta2"): ("optim", "beta2"),
    ("train", "grad_clip"): ("optim", "grad_clip"),
    ("train", "schedule"): ("schedule", "kind"),  # only when its value is a string
    ("train", "warmup_steps"): ("schedule", "warmup_steps"),
    ("train", "min_lr_ratio"): ("schedule", "min_lr_ratio"),
    ("train", "decay_fraction"): ("schedule", "decay_fraction"),
    ("train", "qat_start"): ("schedule", "qat_start"),
    ("train", "save_every"): ("checkpoint", "every"),
    ("train", "keep_checkpoints"): ("checkpoint", "keep"),
    ("train", "resume"): ("checkpoint", "resume"),
    ("train", "eval_every"): ("eval", "every"),
    ("train", "eval_batches"): ("eval", "batches"),
    ("train", "log_every"): ("eval", "log_every"),
    ("train", "device"): ("runtime", "device"),
    ("train", "dtype"): ("runtime", "dtype"),
    ("train", "compile"): ("runtime", "compile"),
    ("train", "loss_kernel"): ("runtime", "loss_kernel"),
    ("train", "threads"): ("runtime", "threads"),
}


def new_spelling(section: str, key: str) -> str | None:
    """``train.lr`` -> ``train.optim.lr``; None for a key that was not renamed."""
    path = RENAMED.get((section, key))
    return ".".join((section,) + path) if path else None


def upgrade(data: dict) -> dict:
    """A nested config dict in any earlier spelling -> today's (a new dict; unknown keys are
    left for from_dict to reject). Where one value is given in both spellings, the one written
    later in the dict wins, as a later ``dict.update`` would have in the earlier release."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for section in ("model", "train"):
        part = out.get(section)
        if not isinstance(part, dict):
            continue
        new: dict = {}
        for key, value in part.items():
            path = RENAMED.get((section, key))
            if path is None or (key == "schedule" and isinstance(value, dict)):
                if isinstance(value, dict) and isinstance(new.get(key), dict):
                    new[key] = {**new[key], **value}
                else:
                    new[key] = value
                continue
            if not isinstance(new.get(path[0]), (dict, type(None))):
                new[key] = value  # its new home holds something else: from_dict names both
                continue
            new[path[0]] = {**(new.get(path[0]) or {}), path[1]: value}
        out[section] = new
    return out


def rl_config(data: dict | RLConfig | None = None, base: RLConfig | None = None) -> RLConfig:
    """An RLConfig from a flat (``{"lr": ...}``, the command line's spelling) or nested dict."""
    if isinstance(data, RLConfig):
        return data
    flat = {k: v for k, v in (data or {}).items() if not isinstance(v, dict)}
    known = [name for name, *_ in flat_fields(RLConfig)]
    for k, v in flat.items():
        if k not in known:
            raise ConfigError(f"rl.{k}", v, "one of " + ", ".join(known))
    nested = merge(nest_flat(RLConfig, flat), {k: v for k, v in (data or {}).items()
                                              if isinstance(v, dict)})
    return section_from_dict("rl", RLConfig, nested, base or RLConfig())


def from_dict(data: dict, base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from a nested dict, on top of ``base`` (default: all defaults)."""
    base = base or RunConfig()
    data = upgrade(data)
    if not isinstance(data, dict):
        raise ConfigError("<root>", data, "a mapping with sections " + ", ".join(SECTIONS))
    parts = {}
    for k in data:
        if k not in SECTIONS and k != "preset":
            raise ConfigError(k, data[k], "top-level sections " + ", ".join(SECTIONS) + ", preset")
    for name, cls in SECTIONS.items():
        parts[name] = section_from_dict(name, cls, data.get(name, {}) or {}, getattr(base, name))
    preset = data.get("preset", base.preset)
    return RunConfig(preset=coerce("preset", preset, str), **parts)


def to_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["generate"]["stop"] = list(d["generate"]["stop"])
    return d


def load_file(path: str | os.PathLike) -> dict:
    """Read a YAML or JSON config file into a nested dict (no code is ever executed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "an existing .yaml, .yml or .json file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError("--config", path, f"a UTF-8 text file ({e})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("--config", path, f"valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a core dependency
            raise ConfigError("--config", path, "JSON, or install pyyaml for YAML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("--config", path, f"valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", path, "a mapping with sections " + ", ".join(SECTIONS))
    return data


def save_json(cfg: RunConfig, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def parse_overrides(pairs: list[tuple[str, str]], notice=None) -> dict:
    """``[("model.n_layer", "4")] -> {"model": {"n_layer": "4"}}`` with key checks; a nested
    part is one more level (``model.moe.experts``). An earlier spelling (``train.lr``) is taken
    as today's, and ``notice`` (if given) is called with a one-line message naming it."""
    out: dict = {}
    for key, value in pairs:
        parts = key.split(".")
        if len(parts) == 2 and new_spelling(*parts):
            new = new_spelling(*parts)
            if notice is not None:
                notice(f"--{key} is now --{new}")
            parts = new.split(".")
            key = new
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise ConfigError(key, value, "SECTION.FIELD with SECTION in " + ", ".join(SECTIONS))
        cls, node = SECTIONS[parts[0]], out.setdefault(parts[0], {})
        for i, name in enumerate(parts[1:], 1):
            types = field_types(cls) if cls is not None else {}
            last = i == len(parts) - 1
            if name not in types or dataclasses.is_dataclass(types[name]) == last:
                allowed = ", ".join(".".join(parts[:i] + [n]) for n in types) or "no nested keys"
                raise ConfigError(key, value, "one of " + allowed)
            if last:
                node[name] = value
            else:
                cls, node = types[name], node.setdefault(name, {})
    return out


def merge(*dicts: dict) -> dict:
    """Deep-merge nested config dicts; later ones win. Run-config dicts in an earlier spelling
    are upgraded first, so that one value never hides under two names."""
    out: dict = {}
    for d in map(upgrade, dicts):
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = v
    return out
