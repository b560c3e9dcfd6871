"""The loader table: every model format keenlm reads, tried in order by ``keenlm.load``.

A format is a pair of plain functions, ``probe(path) -> bool`` and ``load(path, device) ->
Loaded``, registered by the module that implements it (keenlm.io.gguf, keenlm.io.hf,
keenlm.quant.folder) when it is imported; the keenlm run folder is registered here. Adding a
format is one ``register`` call beside its reader; nothing that loads models changes.

Every reader takes weights from safetensors or GGUF and configs from JSON: loading never
executes code from a file, and a truncated or inconsistent file is an error, never a
half-built model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from keenlm import runs
from keenlm.config import ModelConfig, RunConfig, from_dict
from keenlm.data import load_tokenizer
from keenlm.model import build_model, check_state_shapes, load_model_state


@dataclass(eq=False)
class Loaded:
    """What a format reader returns; ``keenlm.load`` gives it the user's methods (KeenModel)."""

    net: nn.Module
    tokenizer: Any
    config: RunConfig
    run_dir: Path | None = None
    quant: dict | None = None  # a packed low-bit model: what its quant.json says


@dataclass(frozen=True)
class Format:
    name: str
    probe: Callable[[Path], bool]
    load: Callable[[Path, str], Loaded]


LOADERS: list[Format] = []


def register(name: str, probe: Callable[[Path], bool], load: Callable[[Path, str], Loaded],
             first: bool = False) -> None:
    """Add a format (``first``: tried before the others, for folders another probe would also
    accept); registering a name again replaces it."""
    LOADERS[:] = [f for f in LOADERS if f.name != name]
    fmt = Format(name, probe, load)
    LOADERS.insert(0, fmt) if first else LOADERS.append(fmt)


def load_any(path: Path, device: str = "cpu") -> Loaded:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (a run folder, a quantized folder, a "
                                ".gguf file or a Hugging Face folder)")
    for fmt in LOADERS:
        if fmt.probe(path):
            return fmt.load(path, device)
    why = "" if not path.is_dir() or (path / "config.json").exists() else " (no config.json)"
    raise FileNotFoundError(f"{path} is not a keenlm run folder nor another format keenlm reads "
                            f"({', '.join(f.name for f in LOADERS)}){why}")


def assemble(cfg: RunConfig, state: dict, tokenizer, device: str) -> Loaded:
    """A model built on "meta" (no throwaway random init of a large model), then filled from
    ``state`` strictly: for readers that produce a whole state dict (GGUF, HF)."""
    with torch.device("meta"):
        net = build_model(cfg.model)
    net = net.to_empty(device="cpu")
    net.tie_weights()
    net.reset_buffers()
    load_model_state(net, state)
    net.to(torch.device(device)).eval()
    return Loaded(net, tokenizer, cfg)


def is_run_folder(path: Path) -> bool:
    """A folder with a config.json and no model weights beside it: a run, trained or not yet."""
    return (path.is_dir() and (path / "config.json").exists()
            and ((path / "checkpoints").exists() or not any(path.glob("*.safetensors*"))))


def build_fitting(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str) -> nn.Module:
    """A model of ``cfg`` that the tensors ``shapes`` (name -> shape, as a file holds them)
    fill exactly, checked before anything is allocated: the block and expert counts against
    the names, then every shape on a "meta" model. A config from a damaged or hostile file
    therefore never sizes an allocation, or a loop over blocks, that the weights do not back.
    Returned on the CPU, uninitialized, for the caller to fill."""
    blocks = {n.split(".")[1] for n in shapes if n.startswith("layers.")}
    if cfg.n_layer != len(blocks):
        raise ValueError(f"{where}: model.n_layer is {cfg.n_layer}; the weights hold "
                         f"{len(blocks)} blocks")
    if cfg.ffn == "moe":
        experts = {n.split(".experts.")[1].split(".")[0] for n in shapes if ".mlp.experts." in n}
        if cfg.moe.experts != len(experts):
            raise ValueError(f"{where}: model.moe.experts is {cfg.moe.experts}; the weights hold "
                             f"{len(experts)}")
    try:  # on meta nothing is allocated; a size past int64 is torch's TypeError or RuntimeError
        with torch.device("meta"):
            net = build_model(cfg)
        check_state_shapes(net, shapes)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{where}: {(str(e).splitlines() or [''])[0]}") from None
    net = net.to_empty(device="cpu")
    net.tie_weights()
    net.reset_buffers()
    return net


def load_run(path: Path, device: str = "cpu") -> Loaded:
    """A keenlm run folder: its config.json and newest complete checkpoint."""
    try:  # every problem of the config names the file (a ConfigError names the key too)
        cfg = from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    ckpt = runs.latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} has no checkpoint yet (checkpoints/latest missing)")
    weights = ckpt / ("dcp" if runs.is_dcp(ckpt) else "model.safetensors")
    net = build_fitting(cfg.model, runs.checkpoint_shapes(ckpt),
                        f"{weights} against {path / 'config.json'}")
    if runs.is_dcp(ckpt):  # a distributed run's shards, gathered into this one model
        runs.read_dcp(ckpt, runs.distinct_tensors({f"model/{k}": v
                                                   for k, v in net.state_dict().items()}))
    else:
        try:
            load_model_state(net, runs.load_model_state(ckpt))
        except ValueError as e:  # the tensors do not fit the config: name the file
            f = ckpt / "model.safetensors"
            raise ValueError(e if str(f) in str(e) else f"{f}: {e}") from None
    net.to(torch.device(device)).eval()
    return Loaded(net, load_tokenizer(path / "tokenizer"), cfg, path)


register("keenlm run folder", is_run_folder, load_run)
