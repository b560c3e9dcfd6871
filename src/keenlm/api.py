"""The Python API, mirroring the CLI: ``keenlm.train(config)``, ``keenlm.load(run_dir)``."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from keenlm import runs
from keenlm.config import GenerateConfig, RunConfig, from_dict


class KeenModel:
    """A trained model with its tokenizer and config: what ``keenlm.load`` returns."""

    def __init__(self, net, tokenizer, config: RunConfig, run_dir: Path | None = None):
        self.net, self.tokenizer, self.config, self.run_dir = net, tokenizer, config, run_dir
        self.quant: dict | None = None  # a packed low-bit model: what its quant.json says

    def generate(self, prompts: str | Sequence[str], *, stream: Optional[Callable[[str], None]] = None,
                 **overrides) -> str | list[str]:
        """Generate text; keyword overrides are GenerateConfig fields (temperature=0, ...)."""
        from keenlm.config import section_from_dict
        from keenlm.infer import generate

        cfg = section_from_dict("generate", GenerateConfig, overrides, self.config.generate)
        return generate(self.net, self.tokenizer, prompts, cfg, stream=stream)

    def evaluate(self, corpus: str | None = None, *, batch_size: int = 8, seq_len: int | None = None,
                 max_batches: int = 50) -> dict:
        """Loss, perplexity and bits per byte on the run's validation split or on a corpus/file."""
        from keenlm.data import TokenData, load_corpus, tokenize_corpus, default_cache_dir
        from keenlm.evaluate import evaluate

        data_cfg = self.config.data if corpus is None else replace(self.config.data, corpus=corpus)
        data: TokenData = tokenize_corpus(load_corpus(data_cfg), self.tokenizer,
                                          default_cache_dir(data_cfg.cache_dir))
        # a single file or folder given explicitly is evaluated whole: train and val parts
        tokens = data.val if corpus is None else _concat(data.train, data.val)
        return evaluate(self.net, tokens, data.token_bytes, batch_size=batch_size,
                        seq_len=seq_len or self.config.train.seq_len, max_batches=max_batches,
                        device=next(self.net.parameters()).device)


def _concat(a, b):
    import numpy as np

    return np.concatenate([np.asarray(a), np.asarray(b)])


QUANT = ("none", "int8", "int4")


def load(path: str | Path, device: str = "cpu", quant: str = "none") -> KeenModel:
    """Load a model: a keenlm run folder (newest checkpoint), a quantized model folder
    (``keenlm quantize``), a GGUF file, or a Hugging Face folder (config.json + safetensors).
    Weights via safetensors/GGUF; no code is executed.

    quant: "int8" or "int4" converts the linear layers to weight-only quantized ones for fast
    CPU generation (keenlm.infer.int8 / int4); the model is then for inference only."""
    km = _load(Path(path), device)
    if quant not in QUANT:
        raise ValueError(f"quant={quant!r}: allowed {' | '.join(QUANT)}")
    if quant == "int8":
        from keenlm.infer.int8 import quantize_int8

        quantize_int8(km.net)
    elif quant == "int4":
        from keenlm.infer.int4 import quantize_int4

        quantize_int4(km.net)
    return km


def _load(path: Path, device: str) -> KeenModel:
    from keenlm.data import load_tokenizer
    from keenlm.model import build_model, load_model_state

    from keenlm.quantize import is_quantized_folder, load_quantized

    if path.is_dir() and is_quantized_folder(path):
        return load_quantized(path, device)
    if path.is_file():
        from keenlm.io.gguf import load_gguf

        cfg_m, state, tok = load_gguf(path)
        return _assemble(RunConfig(model=cfg_m), state, tok, None, device)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a keenlm run folder, a GGUF file or a Hugging Face "
                                "folder (no config.json)")
    if not (path / "checkpoints").exists() and any(path.glob("*.safetensors*")):
        from keenlm.io.hf import load_hf

        cfg_m, state, tok = load_hf(path)
        return _assemble(RunConfig(model=cfg_m), state, tok, None, device)
    cfg = from_dict(json.loads((path / "config.json").read_text()))
    ckpt = runs.latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} has no checkpoint yet (checkpoints/latest missing)")
    net = build_model(cfg.model)
    load_model_state(net, runs.load_model_state(ckpt))
    net.to(torch.device(device)).eval()
    return KeenModel(net, load_tokenizer(path / "tokenizer"), cfg, path)


def _assemble(cfg: RunConfig, state, tokenizer, run_dir, device) -> KeenModel:
    from keenlm.model import build_model, load_model_state

    with torch.device("meta"):  # no throwaway random init of a large model
        net = build_model(cfg.model)
    net = net.to_empty(device="cpu")
    net.tie_weights()
    net.reset_buffers()
    load_model_state(net, state)
    net.to(torch.device(device)).eval()
    return KeenModel(net, tokenizer, cfg, run_dir)
