"""The token cache: a corpus tokenized once, then memory-mapped by every later run.

Layout, under the cache folder (``DataConfig.cache_dir``, else ``$KEENLM_CACHE``, else
``~/.cache/keenlm``)::

    tokens/<key>/train.bin   flat token ids, documents joined by eos_id (uint16, or uint32 when
    tokens/<key>/val.bin     the vocabulary exceeds 65536); raw little-endian, no header
    tokens/<key>/meta.json   dtype, token/byte/document counts, corpus name, fingerprints,
                             and a CRC-32 of each .bin's bytes
    tokenizers/<key>/        trained BPE tokenizers (see tokenizer.build_tokenizer)

``<key>`` is ``sha256(format + corpus fingerprint + tokenizer fingerprint)[:16]``, so a different
corpus, corpus setting or tokenizer never reuses stale tokens. A raw ``.bin`` is what
``numpy.memmap`` opens in microseconds and what nanoGPT and llm.c use: the OS pages in only the
windows a batch touches, so corpora larger than RAM work unchanged.

Writes are atomic: everything goes into a temporary folder beside the final one, which is then
``os.rename``-d into place. A reader therefore sees either nothing or a complete folder; a crash
leaves only a ``.tmp-`` folder behind, which the next build of the same key removes
(``runs.clear_stale``). When two processes race, the second rename fails and the
loser simply uses the winner's folder. On open, the file sizes and the contents' CRC-32 are
checked against meta.json (zlib's CRC runs at several GB/s: a 100M-token corpus costs ~0.1 s),
and any mismatch (a truncated copy, a disk that filled up, bytes changed on disk) means
"rebuild", never a half-load or stale tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from keenlm.data.corpus import SPLITS
from keenlm.runs import atomic_folder, default_cache_dir
from keenlm.data.tokenizer import text_batches

if TYPE_CHECKING:
    from keenlm.data.corpus import Corpus
    from keenlm.data.tokenizer import Tokenizer

FORMAT = "keenlm-tokens-v2"  # v2: meta.json carries each split's CRC-32
_CHUNK_CHARS = 4 << 20  # documents handed to encode_batch at once: big enough to use all cores


@dataclass
class TokenData:
    """A tokenized corpus: two read-only memmaps plus what produced them."""

    train: np.memmap
    val: np.memmap
    meta: dict
    token_bytes: np.ndarray  # token id -> UTF-8 bytes it stands for (0 for eos)
    folder: Path = field(default_factory=Path)


def tokenize_corpus(corpus: "Corpus", tokenizer: "Tokenizer",
                    cache_dir: str | os.PathLike | None = None,
                    log: Callable[[str], None] | None = None) -> TokenData:
    """Tokenize both splits of ``corpus`` into the cache, or open the cached copy."""
    cache = default_cache_dir(os.fspath(cache_dir) if cache_dir else "")
    key = hashlib.sha256(f"{FORMAT}|{corpus.fingerprint()}|{tokenizer.fingerprint()}".encode())
    folder = cache / "tokens" / key.hexdigest()[:16]
    data = _open(folder, tokenizer)
    if data is not None:
        return data
    if log:
        log(f"tokenizing {corpus.name} with {tokenizer!r} into {folder}")
    with atomic_folder(folder, is_valid=lambda p: _open(p, tokenizer) is not None) as tmp:
        meta = {"format": FORMAT, "dtype": _dtype(tokenizer.vocab_size).name,
                "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint(),
                "tokenizer_kind": tokenizer.kind, "tokenizer_fingerprint": tokenizer.fingerprint(),
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "tokens": {}, "bytes": {}, "documents": {}, "crc32": {}}
        for split in SPLITS:
            counts = _write_split(corpus.documents(split), tokenizer, tmp / f"{split}.bin")
            if counts["documents"] == 0:
                raise ValueError(f"corpus {corpus.name!r}: the {split} split has no documents "
                                 f"({len(corpus.skipped)} skipped as not valid UTF-8)")
            for k, v in counts.items():
                meta[k][split] = v
        meta["skipped_not_utf8"] = len(corpus.skipped)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    data = _open(folder, tokenizer)
    if data is None:
        raise RuntimeError(f"{folder}: token cache unreadable right after writing it")
    return data


def _crc32(arr: np.ndarray, chunk: int = 1 << 24) -> int:
    """CRC-32 of an array's bytes, read in chunks (a memmap is paged in as it goes)."""
    crc, flat = 0, arr.reshape(-1)
    for i in range(0, flat.size, chunk):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(flat[i:i + chunk])).cast("B"), crc)
    return crc


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _write_split(docs: Iterable[str], tokenizer: "Tokenizer", path: Path) -> dict[str, int]:
    """Stream documents through ``encode_batch`` in chunks, appending eos after each one."""
    dtype, eos = _dtype(tokenizer.vocab_size), tokenizer.eos_id
    token_bytes = tokenizer.token_byte_lengths()
    counts = {"tokens": 0, "bytes": 0, "documents": 0, "crc32": 0}
    with open(path, "wb") as f:
        for chunk in text_batches(docs, _CHUNK_CHARS):
            flat: list[int] = []
            for ids in tokenizer.encode_batch(chunk):
                flat.extend(ids)
                flat.append(eos)
            arr = np.asarray(flat, dtype=dtype)
            arr.tofile(f)
            counts["crc32"] = zlib.crc32(arr.tobytes(), counts["crc32"])
            nbytes = sum(len(d.encode("utf-8")) for d in chunk)
            # The exact bits-per-byte metric relies on this; a lossy tokenizer would break it.
            if int(token_bytes[arr].sum()) != nbytes:
                raise RuntimeError(f"{tokenizer!r} is not lossless: token byte lengths sum to "
                                   f"{int(token_bytes[arr].sum())}, the text has {nbytes} bytes")
            counts["tokens"] += arr.size
            counts["bytes"] += nbytes
            counts["documents"] += len(chunk)
    return counts


def _open(folder: Path, tokenizer: "Tokenizer") -> TokenData | None:
    """Open a cache folder, or None when it is absent, foreign or damaged in any way."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or \
                meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
            return None
        dtype = np.dtype(meta["dtype"])
        if dtype != _dtype(tokenizer.vocab_size):
            return None
        arrays = {}
        for split in SPLITS:
            path, n = folder / f"{split}.bin", int(meta["tokens"][split])
            if n <= 0 or path.stat().st_size != n * dtype.itemsize:
                return None
            arrays[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
            if _crc32(arrays[split]) != int(meta["crc32"][split]):
                return None
    except (OSError, ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        return None
    return TokenData(arrays["train"], arrays["val"], meta, tokenizer.token_byte_lengths(), folder)
