"""Data: corpus -> tokenizer -> cached token arrays -> batches.

    corpus.py     where text comes from, and its deterministic train/val split
    tokenizer.py  byte-level tokenizers (raw bytes, or BPE trained with HF tokenizers)
    cache.py      tokenize once into memory-mapped .bin files, reuse on every later run
    loader.py     training batches as a pure function of (seed, step); evaluation windows

``prepare_data(cfg)`` runs the first three steps; a warm call only stats the corpus files and
opens the memmaps.
"""
from __future__ import annotations

import dataclasses

from keenlm.config import DataConfig
from keenlm.data.cache import TokenData, tokenize_corpus
from keenlm.runs import default_cache_dir
from keenlm.data.corpus import Corpus, load_corpus
from keenlm.data.loader import eval_batches, get_batch
from keenlm.data.tokenizer import (BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer,
                                   load_tokenizer, train_bpe)

__all__ = [
    "Tokenizer", "ByteTokenizer", "BPETokenizer", "train_bpe", "load_tokenizer", "build_tokenizer",
    "Corpus", "load_corpus", "TokenData", "tokenize_corpus", "default_cache_dir", "get_batch",
    "eval_batches", "prepare_data", "limit_train",
]


def prepare_data(cfg: DataConfig, log=None) -> tuple[Tokenizer, TokenData]:
    """Load the corpus, build (or load the cached) tokenizer, tokenize (or open the cache)."""
    corpus = load_corpus(cfg)
    tokenizer = build_tokenizer(cfg, corpus)
    data = tokenize_corpus(corpus, tokenizer, default_cache_dir(cfg.cache_dir), log=log)
    return tokenizer, data


def limit_train(data: TokenData, n_tokens: int) -> TokenData:
    """Keep only the first ``n_tokens`` of the training split (0: keep all): a fixed set of
    unique data, which a run longer than ``n_tokens`` repeats (``data.train_tokens``)."""
    if not n_tokens:
        return data
    if n_tokens > len(data.train):
        raise ValueError(f"data.train_tokens={n_tokens:,} is more than the training split's "
                         f"{len(data.train):,} tokens; use 0 (all) or a smaller number")
    return dataclasses.replace(data, train=data.train[:n_tokens])
