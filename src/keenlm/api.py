"""The Python API, mirroring the CLI: ``keenlm.train(config)``, ``keenlm.load(path)``."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from keenlm.config import GenerateConfig, RunConfig, section_from_dict
from keenlm.data import TokenData, load_corpus, tokenize_corpus
from keenlm.infer import generate
from keenlm.infer.evaluate import evaluate
from keenlm.io import gguf, hf  # noqa: F401  (each registers its format in the loader table)
from keenlm.io.gguf_q4 import load_gguf_q4
from keenlm.io.loaders import Loaded, load_any
from keenlm.quant import folder  # noqa: F401  (registers the quantized-model folder)
from keenlm.quant.int4 import quantize_int4
from keenlm.quant.int8 import quantize_int8
from keenlm.quant.q4 import quantize_q4_model
from keenlm.runs import default_cache_dir
from keenlm.train import train  # noqa: F401  (keenlm.api.train: the same function as keenlm.train)


class KeenModel(Loaded):
    """A model with its tokenizer and config (``net``, ``tokenizer``, ``config``, ``run_dir``,
    ``quant``: what a format reader of keenlm.io.loaders returns), and what a user does with
    it: what ``keenlm.load`` returns."""

    def generate(self, prompts: str | Sequence[str], *, stream: Optional[Callable[[str], None]] = None,
                 **overrides) -> str | list[str]:
        """Generate text; keyword overrides are GenerateConfig fields (temperature=0, ...)."""
        cfg = section_from_dict("generate", GenerateConfig, overrides, self.config.generate)
        return generate(self.net, self.tokenizer, prompts, cfg, stream=stream)

    def evaluate(self, corpus: str | None = None, *, batch_size: int = 8, seq_len: int | None = None,
                 max_batches: int = 50) -> dict:
        """Loss, perplexity and bits per byte on the run's validation split or on a corpus/file."""
        data_cfg = self.config.data if corpus is None else replace(self.config.data, corpus=corpus)
        data: TokenData = tokenize_corpus(load_corpus(data_cfg), self.tokenizer,
                                          default_cache_dir(data_cfg.cache_dir))
        # a single file or folder given explicitly is evaluated whole: train and val parts
        tokens = data.val if corpus is None else np.concatenate([np.asarray(data.train),
                                                                 np.asarray(data.val)])
        return evaluate(self.net, tokens, data.token_bytes, batch_size=batch_size,
                        seq_len=seq_len or self.config.train.seq_len, max_batches=max_batches,
                        device=next(self.net.parameters()).device)


QUANT = {"none": None, "int8": quantize_int8, "int4": quantize_int4, "q4": quantize_q4_model}


def load(path: str | Path, device: str = "cpu", quant: str = "none") -> KeenModel:
    """Load a model: a keenlm run folder (newest checkpoint), a quantized model folder
    (``keenlm quantize``), a GGUF file, or a Hugging Face folder (config.json + safetensors),
    through the loader table of keenlm.io.loaders. Weights via safetensors/GGUF; no code is
    executed.

    quant: "int8" or "int4" converts the linear layers to weight-only quantized ones for fast
    CPU generation (keenlm.quant.int8 / int4); "q4" puts the block projections in Q4 blocks
    (keenlm.quant.q4; a GGUF file's Q4_0/Q4_1 blocks, and its ternary TQ2_0 ones, read as stored
    without an fp32 copy of the model: keenlm.io.gguf_q4) and the embedding and head in Q8_0,
    which generation decodes with the C engine (keenlm.infer.engine). The model is then for
    inference only."""
    if quant not in QUANT:
        raise ValueError(f"quant={quant!r}: allowed {' | '.join(QUANT)}")
    path = Path(path)
    if quant == "q4" and path.is_file():  # a GGUF file: straight into the packed layout
        got = load_gguf_q4(path, device)
        return KeenModel(got.net, got.tokenizer, got.config, got.run_dir, got.quant)
    got = load_any(path, device)
    km = KeenModel(got.net, got.tokenizer, got.config, got.run_dir, got.quant)
    if QUANT[quant] is not None:
        QUANT[quant](km.net)
    return km
