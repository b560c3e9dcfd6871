"""The quantized-model folder: what ``keenlm quantize`` writes and ``keenlm.load`` reads.

    OUT/config.json          the source model's RunConfig
    OUT/quant.json           format version, bits, method, group, embed/head storage, and per
                             packed layer its bits, group and input width
    OUT/model.safetensors    packed codes (uint8), scales and offsets, int8/fp16 tables, norms
    OUT/tokenizer/

The folder is written whole to a temporary name and renamed into place: an interrupted run
leaves no half-written model. Reading checks every tensor against quant.json and the config
before it is used. The format registers itself in keenlm.io.loaders, so ``keenlm.load(OUT)``
(and every command that loads a model) reads it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from keenlm import runs
from keenlm.config import from_dict, save_json
from keenlm.data import load_tokenizer
from keenlm.io.loaders import Loaded, build_fitting, register
from keenlm.model import build_model, load_model_state
from keenlm.quant.int8 import Int8Embedding, Int8Linear
from keenlm.quant.packing import PackedLinear, fuse_packed

FORMAT = 1


def save_quantized(km, out: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized KeenModel as a folder (see the module docstring), atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (overwrite=True / --overwrite replaces it)")
    state = km.net.state_dict()
    if km.quant["tied"]:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    if km.quant["embed"] == "fp16":
        state["embed_tokens.weight"] = state["embed_tokens.weight"].half()
    if km.quant["head"] == "fp16" and "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"].half()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with runs.atomic_folder(out, replace=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "keenlm-packed"})
        save_json(km.config, tmp / "config.json")
        (tmp / "quant.json").write_text(json.dumps(km.quant, indent=2) + "\n")
        km.tokenizer.save(tmp / "tokenizer")
    return out


def is_quantized_folder(path: Path) -> bool:
    return (path / "quant.json").exists()


def dense_shapes(state: dict, layers: dict) -> dict[str, tuple[int, ...]]:
    """The shape each stored tensor stands for in the full-precision model: a packed layer's
    weight is (rows, in_features), an int8 table's its own; their scales and offsets are parts
    of those, not tensors of their own."""
    shapes = {}
    for k, v in state.items():
        base, _, leaf = k.rpartition(".")
        spec = layers.get(base) if isinstance(layers.get(base), dict) else {}
        if leaf == "weight_int8":
            shapes[f"{base}.weight"] = tuple(v.shape)
        elif leaf == "packed" and isinstance(spec.get("in_features"), int) and v.dim():
            shapes[f"{base}.weight"] = (v.shape[0], spec["in_features"])
        elif leaf in ("scale", "offset", "packed") and (f"{base}.packed" in state
                                                         or f"{base}.weight_int8" in state):
            continue
        else:
            shapes[k] = tuple(v.shape)
    return shapes


def load_quantized(path: Path, device: str = "cpu"):
    """Build a model from a quantized folder: every tensor checked before it is used."""
    try:
        spec = json.loads((path / "quant.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}/quant.json: unreadable ({e})") from None
    try:  # a ConfigError names the key
        cfg = from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}/config.json: {e}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{path}/quant.json: not format {FORMAT} of a keenlm quantized model")
    missing = [k for k in ("layers", "embed", "head", "tied") if k not in spec]
    if missing or not isinstance(spec["layers"], dict):
        raise ValueError(f"{path}/quant.json: missing or malformed {missing or ['layers']}")
    state = runs.load_model_state(path)  # safetensors: a truncated or corrupt file is an error
    for name, L in spec["layers"].items():
        if not isinstance(L, dict):
            raise ValueError(f"{path}/quant.json: layer {name!r} is {L!r}, not a mapping")
        if f"{name}.packed" not in state:
            raise ValueError(f"{path}: quant.json names {name!r}, which model.safetensors "
                             f"does not hold")
    net = build_fitting(dataclasses.replace(cfg.model, linear="dense"),
                        dense_shapes(state, spec["layers"]),
                        f"{path}/model.safetensors against {path}/config.json")

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"{path}/model.safetensors: tensor {name!r} is missing")
        return state[name]

    for name, L in spec["layers"].items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = net.get_submodule(parent_name) if parent_name else net
        except AttributeError:
            parent = None
        old = getattr(parent, attr, None)
        if not isinstance(old, nn.Linear) or old.in_features != L.get("in_features"):
            raise ValueError(f"{path}: quant.json names {name!r}, which the model config does not have")
        try:
            mod = PackedLinear(take(f"{name}.packed"), take(f"{name}.scale"), take(f"{name}.offset"),
                               bits=int(L["bits"]), in_features=int(L["in_features"]),
                               group=int(L["group"]), act_bits=int(L.get("act_bits", 0)))
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise ValueError(f"{path}/quant.json: layer {name!r}: {type(e).__name__} {e}") from None
        if mod.out_features != old.out_features:
            raise ValueError(f"{path}: layer {name!r} has {mod.out_features} rows, the model "
                             f"config {old.out_features}")
        setattr(parent, attr, mod)
    int8 = lambda prefix: dict(weight_int8=take(f"{prefix}.weight_int8"),  # noqa: E731
                               scale=take(f"{prefix}.scale"))
    if spec["embed"] == "int8":
        net.embed_tokens = Int8Embedding(**int8("embed_tokens"))
        if spec["tied"]:
            net.lm_head = Int8Linear(**int8("embed_tokens"))
            state = {**state, "lm_head.weight_int8": state["embed_tokens.weight_int8"],
                     "lm_head.scale": state["embed_tokens.scale"]}
    if not spec["tied"] and spec["head"] == "int8":
        net.lm_head = Int8Linear(**int8("lm_head"))
    try:  # strict: every remaining tensor present, nothing extra
        load_model_state(net, state)
    except ValueError as e:
        raise ValueError(f"{path}/model.safetensors: {e}") from None
    fuse_packed(net)
    net.to(torch.device(device)).eval()
    return Loaded(net, load_tokenizer(path / "tokenizer"), cfg, None, quant=spec)


def model_bytes(km) -> dict:
    """Bytes of the weights as stored, by part, and of the same model in fp32."""
    parts = {"packed": 0, "embedding": 0, "head": 0, "other": 0}
    seen = set()
    for name, t in km.net.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        mod = km.net.get_submodule(name.rpartition(".")[0])
        size = t.numel() * t.element_size()
        if isinstance(mod, PackedLinear):
            parts["packed"] += size
        elif name.startswith("embed_tokens."):
            parts["embedding"] += size // (2 if km.quant.get("embed") == "fp16" else 1)
        elif name.startswith("lm_head."):
            parts["head"] += size // (2 if km.quant.get("head") == "fp16" else 1)
        else:
            parts["other"] += size
    with torch.device("meta"):  # the same model in fp32 (parameters() counts a tied one once)
        dense = build_model(dataclasses.replace(km.config.model, linear="dense"))
    parts["total"] = sum(parts.values())
    parts["fp32_total"] = 4 * sum(p.numel() for p in dense.parameters())
    parts["ratio"] = parts["fp32_total"] / parts["total"]
    return parts


register("quantized folder", is_quantized_folder, load_quantized, first=True)
