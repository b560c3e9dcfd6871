"""LoRA adapters in Hugging Face ``peft``'s format: an adapter folder beside an exported model.

A peft LoRA adapter folder holds two files:

- ``adapter_config.json``: ``peft_type`` "LORA", ``r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules`` and the rest of peft's LoraConfig at their defaults;
- ``adapter_model.safetensors``: for each adapted layer of a ``LlamaForCausalLM``,
  ``base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight`` (r, in) and
  ``...lora_B.weight`` (out, r).

keenlm's adapters (keenlm.model.lora) use the same names and the same scale alpha / r, so
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf), adapter)`` gives
the logits keenlm gives (tests/test_lora.py checks 1e-4). ``load_adapter`` reads such a
folder onto a keenlm model, checking every name and shape before anything is changed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors import torch as st

from keenlm.config import LoRAConfig
from keenlm.model.lora import add_adapters, lora_layers
from keenlm.runs import atomic_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model."


def adapter_config(lora: LoRAConfig, base: str = "") -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": lora.rank, "lora_alpha": lora.scale_alpha, "lora_dropout": lora.dropout,
            "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "use_rslora": False, "use_dora": False, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def adapter_state(net) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_layers(net).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    return out


def save_adapter(net, out_dir, *, base: str = "", overwrite: bool = False) -> Path:
    """Write ``net``'s adapters as a peft LoRA folder (whole, or not at all)."""
    lora = net.cfg.lora
    if not lora.rank or not lora_layers(net):
        raise ValueError("this model has no LoRA adapters to save")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: already exists and is not empty")
    with atomic_folder(out, replace=True) as tmp:
        st.save_file(adapter_state(net), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, base), indent=2) + "\n",
                                          encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    return out


class AdapterError(ValueError):
    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


def read_adapter_config(folder: Path) -> LoRAConfig:
    path = folder / ADAPTER_CONFIG
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(path, "missing (not a peft adapter folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(path, f"not valid JSON ({e})") from None
    if not isinstance(c, dict) or c.get("peft_type") != "LORA":
        raise AdapterError(path, "peft_type is not LORA")
    for key, default in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False),
                         ("bias", "none"), ("modules_to_save", None), ("layers_to_transform", None)):
        if c.get(key, default) not in (default, [], {}):
            raise AdapterError(path, f"{key}={c[key]!r} is not supported (keenlm reads plain LoRA)")
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        raise AdapterError(path, "per-layer ranks (rank_pattern/alpha_pattern) are not supported")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(path, f"target_modules {targets!r}: a list of module names is needed")
    try:
        return LoRAConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                          dropout=float(c.get("lora_dropout", 0.0)), targets=tuple(targets or ()))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(path, f"bad LoRA settings ({e})") from None


def load_adapter(net, folder) -> LoRAConfig:
    """Apply a peft LoRA folder to ``net`` (a keenlm model without adapters), in place."""
    folder = Path(folder)
    lora = read_adapter_config(folder)
    path = folder / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise AdapterError(path, f"cannot read ({e})") from None
    probe = {k: v for k, v in net.named_modules()}
    expected = {}
    for name, m in probe.items():
        if name.rsplit(".", 1)[-1] in lora.targets and hasattr(m, "in_features"):
            expected[f"{PREFIX}{name}.lora_A.weight"] = (lora.rank, m.in_features)
            expected[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, lora.rank)
    state = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
             for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(path, f"does not match the model: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise AdapterError(path, f"{k} has shape {tuple(state[k].shape)}, the model needs {shape}")
        if not torch.isfinite(state[k]).all():
            raise AdapterError(path, f"{k} holds non-finite numbers")
    add_adapters(net, lora)
    with torch.no_grad():
        for name, layer in lora_layers(net).items():
            layer.lora_A.weight.copy_(state[f"{PREFIX}{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(state[f"{PREFIX}{name}.lora_B.weight"])
    return lora
