"""The machinery under every config class: the error type, value checks, and conversion of
JSON/YAML/command-line values to typed, frozen dataclasses with errors that name the key.

Kept apart from the config classes so that a technique's own config module (keenlm.quant.config,
keenlm.spiking.config) can use it without importing the run config that nests it.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}': got {value!r}; allowed: {allowed}")


def check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)




def field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (from JSON/YAML or a command-line string) to ``typ`` or fail naming ``key``."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [s for s in value.split(",") if s] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list of strings")
        return tuple(coerce(key, v, str) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(key, value, "true | false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(key, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:  # "1e6" is a fine way to write a step count
                f = float(value)
                if f.is_integer():
                    return int(f)
            except (ValueError, OverflowError):
                pass
        raise ConfigError(key, value, "an integer")
    if typ is float:  # finite: an inf or nan learning rate (or "1e400") is never meant
        f = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                f = float(value)
            except (ValueError, OverflowError):  # OverflowError: an int beyond float's range
                pass
        if f is None or not math.isfinite(f):
            raise ConfigError(key, value, "a finite number")
        return f
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, value, "a string")
    raise TypeError(f"unsupported config type {typ} for {key}")


def section_from_dict(name: str, cls, data: dict, base=None):
    if not isinstance(data, dict):
        raise ConfigError(name, data, "a mapping of keys to values")
    types = field_types(cls)
    values = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
    for k, v in data.items():
        if k not in types:
            raise ConfigError(f"{name}.{k}", v, "one of " + ", ".join(types))
        if dataclasses.is_dataclass(types[k]):  # a nested part (model.moe)
            values[k] = section_from_dict(f"{name}.{k}", types[k], v, values.get(k) or types[k]())
        else:
            values[k] = coerce(f"{name}.{k}", v, types[k])
    return cls(**values)


def nest_flat(cls, flat: dict) -> dict:
    """A flat mapping of field names to values -> the nested mapping ``cls`` takes, each name
    placed in whichever part of ``cls`` holds it (field names are unique across parts): the
    command line of ``keenlm rl`` and ``keenlm quantize`` spells ``--lr``, not ``--optim.lr``."""
    out: dict = {}
    homes = {}
    for f, typ in field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            prefix = getattr(typ, "flat_prefix", "")
            homes.update({prefix + g: (f, g) for g in field_types(typ)})
        else:
            homes[f] = None
    for k, v in flat.items():
        home = homes.get(k)
        if home:
            out.setdefault(home[0], {})[home[1]] = v
        else:
            out[k] = v
    return out


def flat_fields(cls, prefix: str = "") -> list[tuple[str, Any, Any, type]]:
    """(name, type, default, owning class) of every leaf field of ``cls``, nested parts opened.
    A part whose class sets ``flat_prefix`` (model.lora's "lora_") prefixes its names, where
    bare ones would read ambiguously on a flat command line (``--lora-rank``, not ``--rank``)."""
    out = []
    for f in fields(cls):
        typ = field_types(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            out += flat_fields(typ, prefix + getattr(typ, "flat_prefix", ""))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((prefix + f.name, typ, default, cls))
    return out
