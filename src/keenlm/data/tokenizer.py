"""Tokenizers: text <-> integer ids, losslessly.

Two kinds, one interface (``Tokenizer``):

* ``ByteTokenizer`` -- ids 0..255 are the raw UTF-8 bytes, 256 is ``<|endoftext|>``. No training,
  nothing to download, and it can represent anything. Sequences are long (1 token per byte).
* ``BPETokenizer`` -- byte-level BPE as in GPT-2 (Radford et al. 2019, "Language Models are
  Unsupervised Multitask Learners", section 2.2), trained with Hugging Face ``tokenizers``.
  Text is first turned into bytes, each byte into one of 256 printable stand-in characters
  (``bytes_to_unicode`` below), and BPE merges frequent neighbours into longer tokens. Because
  the initial alphabet holds all 256 byte symbols, every input has an encoding and no ``<unk>``
  exists.

The contract every tokenizer keeps, and the tests check:

* ``decode(encode(s)) == s`` for every valid Python string, whitespace and control chars included;
* ``decode_bytes(encode_bytes(b)) == b`` for every byte string, invalid UTF-8 included;
* ``token_byte_lengths()[i]`` is how many bytes token ``i`` stands for (0 for special tokens), so
  ``sum(lengths[ids]) == len(text.encode())`` and bits-per-byte can be computed exactly;
* ``<|endoftext|>`` written *inside* a document is ordinary text, never the separator: only the
  data pipeline inserts ``eos_id`` (between documents). Otherwise a corpus that mentions the
  string (this file does) would get phantom document breaks.

Decoding never goes through Hugging Face's decoder: each id maps to its exact bytes through a
table, so there is no cleanup of spaces, no stripping and no lossy UTF-8 step until the very end.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from keenlm.config import ConfigError
from keenlm.data import chat_template as templates
from keenlm.runs import atomic_folder, atomic_write_text, default_cache_dir

if TYPE_CHECKING:  # imported for annotations only; corpus.py does not import this module
    from keenlm.config import DataConfig
    from keenlm.data.corpus import Corpus

EOS_TOKEN = "<|endoftext|>"
HF_FILE = "tokenizer.json"
META_FILE = "keenlm_tokenizer.json"


@functools.lru_cache(maxsize=None)
def _byte_symbols() -> tuple[tuple[int, str], ...]:
    return tuple(_bytes_to_unicode().items())


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (a new
    dict each call; the table itself is computed once)."""
    return dict(_byte_symbols())


@functools.lru_cache(maxsize=None)
def _symbols_to_latin1() -> dict[int, int]:
    """A str.translate table taking each byte-level symbol to the Latin-1 character of its
    byte, and every other Latin-1 character to U+0100, so that a token that is not made of
    byte-level symbols fails to encode as Latin-1."""
    table = {c: 0x100 for c in range(256)}
    table.update({ord(u): b for b, u in bytes_to_unicode().items()})
    return table


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) are shifted
    to code points 256+, so every BPE token can be stored as an ordinary JSON string.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


class Tokenizer:
    """What the rest of keenlm relies on (the contract is in the module docstring).

    Subclasses provide encoding and fill ``_table`` (id -> exact bytes); decoding is shared.
    ``decode`` shows a special token as its text (``<|endoftext|>``) so document breaks are
    visible in samples, while ``token_byte_lengths`` counts it as 0 bytes of text.
    """

    vocab_size: int
    eos_id: int
    kind: str  # "byte" | "bpe"
    eos_token: str = EOS_TOKEN
    bos_token: str | None = None  # imported models: prepended to prompts when add_bos
    add_bos: bool = False
    chat_template: str | None = None  # a Jinja2 template, as in Hugging Face / GGUF files
    _table: list[bytes]  # exact bytes of each id (special tokens: their text, for display)
    _special: set[int]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_bytes(self, b: bytes) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt for generation: special tokens written in it (``<|im_start|>``) are parsed as
        such, and the BOS token is prepended when the model expects one."""
        ids = self.encode(text) if self.kind == "byte" else self.encode(text, allow_special=True)
        if self.add_bos and self.bos_token is not None:
            bos = self.token_to_id(self.bos_token)
            if not ids or ids[0] != bos:
                ids = [bos] + ids
        return ids

    def token_to_id(self, token: str) -> int:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the tokenizer's chat template (a sandbox: a template from
        a file can format text but cannot reach Python objects or the file system, nor build
        unbounded strings; keenlm.data.chat_template)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return templates.render(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token,
                                    source=getattr(self, "source", ""))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if hasattr(ids, "tolist"):  # a tensor or array: one conversion instead of one per item
            ids = ids.tolist()
        table = self._table
        return b"".join([table[int(i)] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        # Decoding a window cut from the middle of a character gives U+FFFD, never an exception.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.array([len(b) for b in self._table], dtype=np.int64)
        lengths[sorted(self._special)] = 0  # separators are not part of the text being modelled
        return lengths

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # each file replaced whole: a run folder's tokenizer is written again on every resume,
        # and a kill during that write must not leave the folder unloadable
        atomic_write_text(folder / HF_FILE, self._hf_json())
        meta = {"kind": self.kind, "eos_token": self.eos_token, "vocab_size": self.vocab_size,
                "bos_token": self.bos_token, "add_bos": self.add_bos,
                "chat_template": self.chat_template,
                "require_all_bytes": getattr(self, "require_all_bytes", True)}
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
        # For transformers' AutoTokenizer. Its clean_up_tokenization_spaces would turn " ." into
        # "." when decoding, breaking the round trip, so it is switched off explicitly.
        hf_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "bos_token": self.bos_token or self.eos_token, "unk_token": None,
                  "clean_up_tokenization_spaces": False, "add_prefix_space": False,
                  "add_bos_token": self.add_bos}
        if self.chat_template:
            hf_cfg["chat_template"] = self.chat_template
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(hf_cfg, indent=2) + "\n")

    def fingerprint(self) -> str:
        """sha256 of what determines the ids: kind + canonical JSON of the HF tokenizer."""
        if not getattr(self, "_fp", ""):  # tokenizers are immutable once built
            canon = json.dumps(json.loads(self._hf_json()), sort_keys=True, ensure_ascii=True)
            text = f"{self.kind}\n{self.eos_token}\n{canon}"
            self._fp = hashlib.sha256(text.encode()).hexdigest()
        return self._fp

    def _hf_json(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte; id 256 is the document separator."""

    kind = "byte"

    def __init__(self):
        self.vocab_size = 257
        self.eos_id = 256
        self._table = [bytes([b]) for b in range(256)] + [EOS_TOKEN.encode()]
        self._special = {256}

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, b: bytes) -> list[int]:
        return np.frombuffer(b, dtype=np.uint8).tolist()

    def _hf_json(self) -> str:
        # Written as a merge-free byte-level BPE whose id i is byte i, so Hugging Face tools can
        # read a byte-level keenlm model too.
        from tokenizers import Tokenizer as HFTokenizer, models

        b2u = bytes_to_unicode()
        hf = HFTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
        _byte_level_parts(hf)
        hf.add_special_tokens([EOS_TOKEN])
        return hf.to_str()


class BPETokenizer(Tokenizer):
    """Byte-level BPE backed by a Hugging Face ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, hf, eos_token: str = EOS_TOKEN, source: str = "<memory>", *,
                 bos_token: str | None = None, add_bos: bool = False,
                 chat_template: str | None = None, require_all_bytes: bool = True):
        # Imported vocabularies (SmolLM2's) may lack symbols for bytes that never occur in
        # UTF-8 text; they encode every text, but not every invalid byte string.
        _check_lossless(hf, eos_token, source, require_all_bytes)
        # a template from a file is vetted once here: one that reaches for Python internals is
        # dropped, with the reason said (keenlm.data.chat_template)
        self.bos_token, self.add_bos, self.source = bos_token, add_bos, source
        self.chat_template = templates.vet(chat_template, source, bos_token, eos_token)
        self.require_all_bytes = require_all_bytes
        # Not stored in tokenizer.json, so it is set on every load: "<|endoftext|>" inside a
        # document stays text (see module docstring).
        hf.encode_special_tokens = True
        self.hf, self.eos_token = hf, eos_token
        vocab = hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = hf.token_to_id(eos_token)
        self._table, self._special = _byte_table(hf, vocab, self.vocab_size, source)
        b2u = bytes_to_unicode()
        self._byte_id = [hf.token_to_id(b2u[b]) for b in range(256)]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self.hf.encode(text, add_special_tokens=False).ids
        self.hf.encode_special_tokens = False  # parse <|im_start|> etc. as their own ids
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        finally:
            self.hf.encode_special_tokens = True

    def token_to_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        # encode_batch_fast skips offset tracking (~2x faster); older tokenizers lack it.
        fn = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in fn(texts, add_special_tokens=False)]

    def encode_bytes(self, b: bytes) -> list[int]:
        # Valid UTF-8 runs are encoded as text; each stray byte (which surrogateescape turns into
        # U+DC80..U+DCFF) becomes its single-byte token, which the 256-symbol alphabet guarantees.
        parts = _STRAY.split(b.decode("utf-8", errors="surrogateescape"))
        runs = [p for p in parts[0::2] if p]
        encoded = iter(self.encode_batch(runs)) if runs else iter(())
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2 == 1:
                for c in part:
                    i = self._byte_id[ord(c) - 0xDC00]
                    if i is None:
                        raise ValueError(f"byte 0x{ord(c) - 0xDC00:02x} has no token in this "
                                         "vocabulary")
                    ids.append(i)
            elif part:
                ids.extend(next(encoded))
        return ids

    def _hf_json(self) -> str:
        return self.hf.to_str()


_STRAY = re.compile("([\udc80-\udcff]+)")


def _byte_table(hf, vocab: dict[str, int], size: int, source: str) -> tuple[list[bytes], set[int]]:
    """Each id's exact bytes. Model tokens are byte-level symbols; added tokens are raw text."""
    to_latin1 = _symbols_to_latin1()
    table, special = [b""] * size, set()
    added = hf.get_added_tokens_decoder()
    for tok, i in vocab.items():
        if i in added:
            table[i] = tok.encode("utf-8")
            if added[i].special:
                special.add(i)
            continue
        try:  # one C-level pass per token (a 49k vocabulary loads in ~20 ms, not ~150)
            table[i] = tok.translate(to_latin1).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{source}: token {tok!r} (id {i}) is not made of byte-level "
                             "symbols") from None
    return table, special


def _byte_level_parts(hf) -> None:
    """The lossless byte-level setup: no normalizer, ByteLevel pre-tokenizer and decoder."""
    from tokenizers import decoders, pre_tokenizers

    hf.normalizer = None  # any normalizer (NFC, strip, lowercase) would break decode(encode(s))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.post_processor = None
    hf.decoder = decoders.ByteLevel()


def _check_lossless(hf, eos_token: str, source: str, require_all_bytes: bool = True) -> None:
    """Refuse tokenizers that cannot round-trip arbitrary text (e.g. SentencePiece with NFKC)."""
    from tokenizers import decoders  # a core dependency; its import is heavy, kept local

    problems = []
    if hf.normalizer is not None:
        problems.append(f"it has a normalizer ({type(hf.normalizer).__name__}) that alters text")
    if not isinstance(hf.decoder, decoders.ByteLevel):
        problems.append("its decoder is not ByteLevel")
    vocab = hf.get_vocab(with_added_tokens=True)
    missing = [b for b, u in bytes_to_unicode().items() if u not in vocab]
    if missing and require_all_bytes:
        problems.append(f"{len(missing)} of the 256 byte symbols are not in its vocabulary")
    if eos_token not in vocab:
        problems.append(f"it has no {eos_token!r} token")
    if problems:
        raise ValueError(f"{source}: not a lossless byte-level BPE tokenizer: " + "; ".join(problems))


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train byte-level BPE. ``vocab_size`` counts the 256 byte symbols and ``<|endoftext|>``.

    On little text the trainer runs out of pairs to merge, and the vocabulary comes out smaller
    than asked; ``vocab_size`` of the result is the truth.
    """
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    _byte_level_parts(hf)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(text_batches(texts), trainer=trainer)
    return BPETokenizer(hf)


def text_batches(texts: Iterable[str], size: int = 1 << 20) -> Iterator[list[str]]:
    """Texts grouped into batches of about ``size`` characters, so Rust-side tokenizer work
    (training, encode_batch) comes in large pieces."""
    batch, n = [], 0
    for t in texts:
        batch.append(t)
        n += len(t)
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def library_errors(error: Callable[[str], Exception]) -> Iterator[None]:
    """The tokenizers library's failures on a damaged file, raised as ``error(why)``: its Rust
    side raises a bare Exception for bad JSON and, for some malformed models (a
    ``continuing_subword_prefix`` longer than a merged token), panics with a PanicException,
    which is a BaseException."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - see above
        raise error(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Read what ``Tokenizer.save`` wrote. A foreign byte-level ``tokenizer.json`` loads as BPE."""
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(folder)
    hf_path, meta_path = folder / HF_FILE, folder / META_FILE
    if not hf_path.is_file():
        raise ValueError(f"{hf_path}: tokenizer file not found")
    meta = {"kind": "bpe", "eos_token": EOS_TOKEN}
    if meta_path.exists():
        try:
            meta.update(json.loads(meta_path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: unreadable tokenizer metadata ({e})") from None
    if meta["kind"] == "byte":
        return ByteTokenizer()
    if meta["kind"] != "bpe":
        raise ValueError(f"{meta_path}: unknown tokenizer kind {meta['kind']!r} (byte | bpe)")
    with library_errors(lambda why: ValueError(f"{hf_path}: not a valid Hugging Face tokenizer "
                                               f"file ({why})")):
        hf = HFTokenizer.from_file(str(hf_path))
    return BPETokenizer(hf, eos_token=meta["eos_token"], source=str(hf_path),
                        bos_token=meta.get("bos_token"), add_bos=bool(meta.get("add_bos")),
                        chat_template=meta.get("chat_template"),
                        require_all_bytes=bool(meta.get("require_all_bytes", True)))


def build_tokenizer(cfg: "DataConfig", corpus: "Corpus") -> Tokenizer:
    """``cfg.tokenizer``: "byte", "bpe" (trained on the corpus, cached) or a tokenizer folder."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        if not (Path(cfg.tokenizer) / HF_FILE).is_file():
            raise ConfigError("data.tokenizer", cfg.tokenizer,
                              f"byte | bpe | a folder holding {HF_FILE}")
        return load_tokenizer(cfg.tokenizer)
    key = f"{corpus.fingerprint()}|{cfg.vocab_size}|{cfg.tokenizer_train_bytes}"
    folder = default_cache_dir(cfg.cache_dir) / "tokenizers" / _short_hash(key)
    if (folder / META_FILE).is_file():
        try:
            return load_tokenizer(folder)
        except ValueError:
            pass  # a damaged cache entry is retrained below, and replaced
    tok = train_bpe(_first_bytes(corpus.documents("train"), cfg.tokenizer_train_bytes),
                    cfg.vocab_size)
    with atomic_folder(folder, is_valid=_loads) as tmp:
        tok.save(tmp)
    return load_tokenizer(folder)  # whichever copy won a race between two runs


def _loads(folder: Path) -> bool:
    try:
        load_tokenizer(folder)
        return True
    except ValueError:
        return False


def _first_bytes(docs: Iterable[str], budget: int) -> Iterator[str]:
    """The documents up to ``budget`` UTF-8 bytes, the last one cut to fit."""
    for doc in docs:
        n = len(doc.encode("utf-8"))
        if n >= budget:
            yield doc.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
            return
        budget -= n
        yield doc


def _short_hash(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]
