"""Rebuild a byte-level BPE tokenizer (GPT-2 family) from a vocabulary and merge list.

GGUF files store the tokenizer as metadata arrays: tokens (already in GPT-2's byte-to-unicode
spelling), merges ("a b" strings), token types (3 = control, e.g. ``<|im_start|>``), BOS/EOS ids
and the name of the pre-tokenizer (``tokenizer.ggml.pre``) that says how text is split into
words before BPE. The result is a Hugging Face ``tokenizers`` object wrapped as keenlm's
``BPETokenizer``, so encoding is the same Rust code transformers runs.

Pre-tokenizers known here (what each vocabulary's merges were learned with):
- GPT-2's regex, via ``ByteLevel(use_regex=True)``: the default;
- ``smollm`` (SmolLM/SmolLM2, StarCoder-style): every digit split alone, then GPT-2's regex;
- ``llama-bpe``/``llama3`` family: the Llama-3 split regex.
An unknown name falls back to GPT-2's regex and says so in one line.
"""
from __future__ import annotations

import sys

from keenlm.data.tokenizer import BPETokenizer, library_errors

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2", None):
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    print(f"keenlm: unknown pre-tokenizer {pre!r}; splitting words with GPT-2's regex",
          file=sys.stderr)
    return byte_level


def tokenizer_from_vocab(tokens: list[str], merges: list[str], *, special: list[str],
                         eos_token: str | None, bos_token: str | None, add_bos: bool, pre: str,
                         chat_template: str | None, source: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the vocabulary has duplicate tokens")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"malformed merge {m!r}")
        pairs.append((a, b))
    # the tokenizers library raises a bare Exception for a merge of unknown tokens
    with library_errors(lambda why: ValueError(f"the BPE vocabulary and merges do not fit "
                                               f"together ({why})")):
        hf = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    hf.normalizer = None
    hf.pre_tokenizer = _pre_tokenizer(pre)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if eos_token is None:
        raise ValueError("no end-of-sequence token")
    return BPETokenizer(hf, eos_token=eos_token, source=source, bos_token=bos_token,
                        add_bos=add_bos, chat_template=chat_template, require_all_bytes=False)
