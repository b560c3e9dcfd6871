"""Corpora: where training text comes from, split into train and validation documents.

A corpus is an ordered list of *documents*, each with a stable *key* (a relative file path,
``path:line`` for a JSON-lines record, the row index for a Hugging Face dataset). Listing is
cheap -- files are only ``stat``-ed -- and text is read lazily by ``Corpus.documents(split)``,
so a warm run whose tokens are already cached never reads the corpus at all.

The train/validation split is a pure function of the key: a document is held out when
``int(sha256(key)[:8], 16) / 2**32 < val_fraction``. Adding or removing files therefore never
moves the *other* files between splits (unlike shuffling with a seed), and the split needs no
state on disk. With two or more documents each split is guaranteed at least one. A corpus of a
single text file (the classic ``input.txt``) is instead cut at a line break: the first
``1 - val_fraction`` of it trains, the rest validates, as in nanoGPT's Shakespeare example.

Sources (``DataConfig.corpus``): ``stdlib`` (this Python's standard library, ~30 MB of ``.py``),
a text file, a ``.jsonl`` file (field ``jsonl_field`` of each line), a folder of text files, or
``hf:NAME[:CONFIG]`` for a Hugging Face dataset (needs ``pip install datasets``).
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from keenlm.config import ConfigError, DataConfig

TEXT_EXTENSIONS = frozenset(
    ".txt .md .py .rst .json .jsonl .c .h .js .ts .java .go .rs .html .css .yaml .yml .toml "
    ".cfg .ini .sh".split())
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
SPLITS = ("train", "val")
_VERSION = "keenlm-corpus-v1"  # bump when the listing or split rule changes (invalidates caches)

# A document's locator: ("file", path) | ("jsonl", path, line_no) | ("part", path, "head"|"tail")
# | ("hf", row_index). Readers turn a list of (key, locator) into (key, text or None) pairs.
Doc = tuple[str, tuple]
Reader = Callable[[list[Doc]], Iterator[tuple[str, "str | None"]]]


def hash_fraction(key: str) -> float:
    """Where ``key`` falls in [0, 1): the first 32 bits of its sha256."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


class Corpus:
    """An ordered, split list of documents read on demand."""

    def __init__(self, name: str, docs: list[Doc], read: Reader, identity: str, cfg: DataConfig,
                 splits: dict[str, list[Doc]] | None = None):
        self.name = name
        self._read, self._identity = read, identity
        self.val_fraction, self.max_bytes = cfg.val_fraction, cfg.max_bytes
        self._splits = splits or split_by_key(docs, cfg.val_fraction)
        self.skipped: set[str] = set()  # keys of documents that were not valid UTF-8
        self._fingerprint = ""

    def fingerprint(self) -> str:
        if not self._fingerprint:
            h = hashlib.sha256(f"{_VERSION}\n{self._identity}\n".encode())
            h.update(f"max_bytes={self.max_bytes}\nval_fraction={self.val_fraction!r}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def keys(self, split: str) -> list[str]:
        """Keys of every document in ``split`` (before the ``max_bytes`` limit)."""
        return [k for k, _ in self._docs(split)]

    def documents(self, split: str) -> Iterator[str]:
        """The texts of ``split`` in a fixed order, stopping at this split's share of max_bytes."""
        budget = self._budget(split)
        used = 0
        for key, text in self._read(self._docs(split)):
            if text is None:
                self.skipped.add(key)
                continue
            if not text:
                continue
            n = len(text.encode("utf-8"))
            if used and budget and used + n > budget:
                return  # always at least one document, then stop at the first that overflows
            used += n
            yield text

    def _docs(self, split: str) -> list[Doc]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._splits[split]

    def _budget(self, split: str) -> int:
        if not self.max_bytes:
            return 0
        share = self.val_fraction if split == "val" else 1.0 - self.val_fraction
        return max(1, int(self.max_bytes * share))

    def __repr__(self) -> str:
        n = {s: len(self._splits[s]) for s in SPLITS}
        return f"Corpus({self.name!r}, train={n['train']} docs, val={n['val']} docs)"


def split_by_key(docs: list[Doc], val_fraction: float) -> dict[str, list[Doc]]:
    """Hash split (see module docstring); keeps the documents' order within each split."""
    is_val = [hash_fraction(key) < val_fraction for key, _ in docs]
    if len(docs) >= 2:
        by_key = sorted(range(len(docs)), key=lambda i: docs[i][0])
        if not any(is_val):
            is_val[by_key[-1]] = True
        if all(is_val):
            is_val[by_key[0]] = False
    return {"train": [d for d, v in zip(docs, is_val) if not v],
            "val": [d for d, v in zip(docs, is_val) if v]}


# ---------------------------------------------------------------------------------------------
# Building corpora


def load_corpus(cfg: DataConfig) -> Corpus:
    """Resolve ``cfg.corpus`` (stdlib | file | folder | hf:NAME[:CONFIG]) to a ``Corpus``."""
    spec = cfg.corpus
    if spec.startswith("hf:"):
        return _hf_corpus(cfg)
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _list_files(root, lambda name: name.endswith(".py"), STDLIB_SKIP_DIRS)
        return _file_corpus("stdlib", root, files, cfg)
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_corpus(path.name, path.parent, [path], cfg)
    if path.is_dir():
        files = _list_files(path, lambda name: Path(name).suffix.lower() in TEXT_EXTENSIONS,
                            frozenset())
        return _file_corpus(path.name, path, files, cfg)
    raise ConfigError("data.corpus", spec,
                      "stdlib, an existing file or folder, or hf:NAME[:CONFIG]")


def _list_files(root: Path, want: Callable[[str], bool], skip_dirs: frozenset) -> list[Path]:
    """Files under ``root`` that ``want`` accepts, skipping hidden folders, sorted by path."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith(".")]
        out.extend(Path(folder, n) for n in names if want(n) and not n.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _file_corpus(name: str, root: Path, files: list[Path], cfg: DataConfig) -> Corpus:
    """Documents from files: one per text file, one per non-blank line of a .jsonl file."""
    stats, docs = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        stats.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
        if path.suffix.lower() == ".jsonl":
            docs.extend((f"{rel}:{n}", ("jsonl", path, n)) for n in _nonblank_lines(path))
        else:
            docs.append((rel, ("file", path)))
    if not docs:
        raise ConfigError("data.corpus", cfg.corpus, "a corpus with at least one document (found "
                          "no non-empty files with extensions " + " ".join(sorted(TEXT_EXTENSIONS))
                          + ")")
    identity = f"files\n{root.resolve()}\njsonl_field={cfg.jsonl_field}\n" + "\n".join(stats)
    splits = None
    if len(docs) == 1:
        if docs[0][1][0] == "jsonl":
            raise ConfigError("data.corpus", cfg.corpus,
                              "at least 2 documents, to hold one out for validation")
        path, rel = docs[0][1][1], docs[0][0]
        splits = {"train": [(rel + "#head", ("part", path, "head"))],
                  "val": [(rel + "#tail", ("part", path, "tail"))]}
    read = lambda ds: _read_files(ds, cfg.jsonl_field, cfg.val_fraction)  # noqa: E731
    return Corpus(name, docs, read, identity, cfg, splits=splits)


def _nonblank_lines(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines (a trailing newline is not an empty record)."""
    with open(path, "rb") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _read_files(docs: list[Doc], field: str, val_fraction: float) -> Iterator[tuple[str, str | None]]:
    i = 0
    while i < len(docs):
        key, loc = docs[i]
        if loc[0] == "jsonl":  # consecutive lines of one file: read it once
            j = i
            while j < len(docs) and docs[j][1][0] == "jsonl" and docs[j][1][1] == loc[1]:
                j += 1
            yield from _read_jsonl(loc[1], {d[1][2]: d[0] for d in docs[i:j]}, field)
            i = j
            continue
        text = _read_text(loc[1])
        if text is not None and loc[0] == "part":
            text = _cut(text, val_fraction)[0 if loc[2] == "head" else 1]
        yield key, text
        i += 1


def _read_text(path: Path) -> str | None:
    """The file's exact text (no newline translation), or None if it is not valid UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _cut(text: str, val_fraction: float) -> tuple[str, str]:
    """Split one text at the line break nearest to (1 - val_fraction) of its length."""
    if len(text) < 2:
        raise ConfigError("data.corpus", text, "a single-file corpus of at least 2 characters")
    at = min(max(1, int(len(text) * (1.0 - val_fraction))), len(text) - 1)
    nl = text.rfind("\n", 1, at)
    if nl > 0 and nl + 1 < len(text) and at - nl < max(1, len(text) // 100):
        at = nl + 1  # a nearby line break, so neither half starts mid-line
    return text[:at], text[at:]


def _read_jsonl(path: Path, wanted: dict[int, str], field: str) -> Iterator[tuple[str, str | None]]:
    """Field ``field`` of the wanted lines (line number -> key) of a JSON-lines file."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n not in wanted:
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError("data.corpus", where, f"one JSON object per line ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ConfigError("data.jsonl_field", field,
                                  f"a string field present in every record; missing at {where}")
            text = record[field]
            try:  # JSON can spell a lone surrogate ("\ud800"): no UTF-8 text, skipped as such
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = None
            yield wanted[n], text


def _hf_corpus(cfg: DataConfig) -> Corpus:
    """A Hugging Face dataset split; documents are rows, keyed by their index."""
    name, _, config = cfg.corpus[len("hf:"):].partition(":")
    try:
        import datasets  # optional extra (keenlm[datasets]), heavy to import
    except ImportError:
        raise ConfigError("data.corpus", cfg.corpus,
                          "hf: corpora with the datasets package: pip install datasets") from None
    ds = datasets.load_dataset(name, config or None, split=cfg.hf_split)
    if cfg.jsonl_field not in ds.column_names:
        raise ConfigError("data.jsonl_field", cfg.jsonl_field,
                          f"a column of {name}: " + ", ".join(ds.column_names))
    docs = [(str(i), ("hf", i)) for i in range(len(ds))]
    if len(docs) < 2:
        raise ConfigError("data.corpus", cfg.corpus, "a dataset with at least 2 rows")
    identity = (f"hf\n{name}\n{config}\nsplit={cfg.hf_split}\nfield={cfg.jsonl_field}\n"
                f"{getattr(ds, '_fingerprint', '')}")

    def read(part: list[Doc]) -> Iterator[tuple[str, str | None]]:
        rows = ds.select([loc[1] for _, loc in part])
        keys = iter(k for k, _ in part)
        for batch in rows.iter(batch_size=1000):
            for text in batch[cfg.jsonl_field]:
                yield next(keys), text if isinstance(text, str) else ""

    return Corpus(f"hf:{name}", docs, read, identity, cfg)
