"""Tests for keenlm.data: tokenizers, corpora, the token cache and batching.

Kinds of test: round-trip invariances on seeded random text and bytes; determinism (corpus
split, batches as a pure function of (seed, step)); cache behaviour (reuse, rebuild after
damage); errors that name the offending key, file and line.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from keenlm.config import ConfigError, DataConfig
from keenlm.data import (BPETokenizer, ByteTokenizer, TokenData, build_tokenizer, default_cache_dir,
                         eval_batches, get_batch, load_corpus, load_tokenizer, prepare_data,
                         tokenize_corpus, train_bpe)
from keenlm.runs import atomic_folder

# Code point ranges the random strings draw from: ASCII (controls and NUL included), Latin-1,
# other BMP text, combining marks, CJK, emoji and the astral planes; surrogates excluded.
RANGES = [(0x00, 0x7F), (0x80, 0x7FF), (0x300, 0x36F), (0x800, 0xD7FF), (0xE000, 0xFFFF),
          (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
SPACES = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\x00", "\u3000", "\xa0", "\u200b", "\x0b\x0c"]
SAMPLE = ("def f(x):\n    return x + 1\n\n\nclass A:\n\tpass  # tab\n"
          "Hello, world! Ça va? 你好，世界。 😀👍🏽 e\u0301 \x00\x01 'll 's\r\n") * 20


def random_text(rng: random.Random, max_parts: int = 40) -> str:
    parts = []
    for _ in range(rng.randint(0, max_parts)):
        if rng.random() < 0.3:
            parts.append(rng.choice(SPACES) * rng.randint(1, 4))
        elif rng.random() < 0.3:
            parts.append(rng.choice(["def", " the", "return", "<|endoftext|>", "x", "'s"]))
        else:
            lo, hi = rng.choice(RANGES)
            parts.append(chr(rng.randint(lo, hi)))
    return "".join(parts)


def random_bytes(rng: random.Random) -> bytes:
    special = [b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xff\xfe", b"\xf0\x9f\x98", b"\xe4\xbd"]
    parts = []
    for _ in range(rng.randint(0, 20)):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.choice(special))
        elif r < 0.6:
            parts.append(random_text(rng, 3).encode("utf-8"))
        else:
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 6))))
    return b"".join(parts)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    rng = random.Random(1)
    texts = [SAMPLE] + [random_text(rng) for _ in range(200)]
    return train_bpe(texts, vocab_size=400)


@pytest.fixture(params=["byte", "bpe"])
def tok(request, bpe):
    return ByteTokenizer() if request.param == "byte" else bpe


def write_files(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8", newline="")
    return root


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_bpe_trained_to_requested_size(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    assert len(bpe.encode(SAMPLE)) < len(SAMPLE.encode()) / 2  # it did learn merges


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(300):
        s = random_text(rng)
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.encode_bytes(s.encode("utf-8")) == ids
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_round_trip_random_bytes(tok):
    rng = random.Random(2)
    for _ in range(300):
        b = random_bytes(rng)
        ids = tok.encode_bytes(b)
        assert tok.decode_bytes(ids) == b
        assert tok.decode(ids) == b.decode("utf-8", errors="replace")


def test_bpe_agrees_with_hf_decoder(bpe):
    rng = random.Random(3)
    for _ in range(100):
        s = random_text(rng)
        assert bpe.hf.decode(bpe.encode(s), skip_special_tokens=False) == s


def test_encode_batch_matches_encode(tok):
    texts = [SAMPLE[:100], "", " ", "😀\n\n", SAMPLE]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_eos_text_inside_a_document_is_not_the_separator(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_token_byte_lengths_count_bytes_exactly(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (tok.vocab_size,)
    assert lengths[tok.eos_id] == 0
    rng = random.Random(4)
    for _ in range(50):
        s = random_text(rng)
        assert int(lengths[tok.encode(s)].sum()) == len(s.encode("utf-8"))


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok) and again.eos_id == tok.eos_id
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    # The file is plain Hugging Face JSON, and its ids are ours.
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(SAMPLE[:200], add_special_tokens=False).ids == tok.encode(SAMPLE[:200])
    assert hf.token_to_id("<|endoftext|>") == tok.eos_id


def test_fingerprint_stable_across_processes(bpe, tmp_path):
    bpe.save(tmp_path)
    code = ("import sys; from keenlm.data import load_tokenizer; "
            "print(load_tokenizer(sys.argv[1]).fingerprint())")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == bpe.fingerprint()
    assert ByteTokenizer().fingerprint() == ByteTokenizer().fingerprint() != bpe.fingerprint()


def test_corrupt_or_missing_tokenizer_file_is_named(bpe, tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', "utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "keenlm_tokenizer.json").write_text("not json", "utf-8")
    with pytest.raises(ValueError, match="keenlm_tokenizer.json"):
        load_tokenizer(tmp_path)


def test_plain_hf_tokenizer_json_loads_as_bpe(bpe, tmp_path):
    bpe.save(tmp_path)
    (tmp_path / "keenlm_tokenizer.json").unlink()  # e.g. a tokenizer.json from elsewhere
    assert load_tokenizer(tmp_path).fingerprint() == bpe.fingerprint()


def test_lossy_hf_tokenizer_is_refused(bpe):
    from tokenizers import Tokenizer as HFTokenizer, normalizers

    hf = HFTokenizer.from_str(bpe.hf.to_str())
    hf.normalizer = normalizers.NFKC()
    with pytest.raises(ValueError, match="normalizer"):
        BPETokenizer(hf)


def test_small_corpus_gives_smaller_vocab():
    tok = train_bpe(["ab" * 10], vocab_size=1000)
    assert 257 < tok.vocab_size < 1000 and tok.decode(tok.encode("abab")) == "abab"


# ---------------------------------------------------------------------------------------------
# Corpora


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
    cfg = DataConfig(corpus="stdlib", max_bytes=200_000)
    a, b = load_corpus(cfg), load_corpus(cfg)
    train, val = a.keys("train"), a.keys("val")
    assert len(train) + len(val) > 500
    assert train == b.keys("train") and val == b.keys("val")
    assert not set(train) & set(val) and len(val) >= 1
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.05  # about val_fraction = 0.02
    assert all(k.endswith(".py") and "site-packages" not in k for k in train)
    assert a.fingerprint() == b.fingerprint()
    docs = list(a.documents("train"))
    assert 1 <= sum(len(d.encode()) for d in docs) <= 200_000 * 0.98
    assert docs == list(b.documents("train"))


def test_folder_corpus_and_fingerprint(tmp_path):
    files = {f"d{i}/f{i}.py": f"x = {i}\n" for i in range(20)}
    files.update({"notes.md": "# hi\n", "image.png": "not text", ".git/config.txt": "hidden"})
    root = write_files(tmp_path / "c", files)
    cfg = DataConfig(corpus=str(root), val_fraction=0.2)
    corpus = load_corpus(cfg)
    keys = corpus.keys("train") + corpus.keys("val")
    assert sorted(keys) == sorted(k for k in files if k.endswith((".py", ".md")))
    texts = set(corpus.documents("train")) | set(corpus.documents("val"))
    assert texts == {files[k] for k in keys}
    fp = corpus.fingerprint()
    assert load_corpus(DataConfig(corpus=str(root), val_fraction=0.3)).fingerprint() != fp
    (root / "notes.md").write_text("# changed, longer\n", encoding="utf-8")
    assert load_corpus(cfg).fingerprint() != fp


def test_invalid_utf8_files_are_skipped_and_counted(tmp_path):
    root = write_files(tmp_path / "c", {f"{i}.txt": f"doc {i}\n" for i in range(10)})
    (root / "bad.txt").write_bytes(b"caf\xe9\n")
    corpus = load_corpus(DataConfig(corpus=str(root), val_fraction=0.1))
    docs = list(corpus.documents("train")) + list(corpus.documents("val"))
    assert len(docs) == 10 and corpus.skipped == {"bad.txt"}


def test_single_file_is_cut_into_train_and_val(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(DataConfig(corpus=str(path), val_fraction=0.1))
    (train,), (val,) = list(corpus.documents("train")), list(corpus.documents("val"))
    assert train + val == text and train.endswith("\n")
    assert 0.05 < len(val) / len(text) < 0.15


def test_jsonl_documents_and_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(30)) + "\n")
    corpus = load_corpus(DataConfig(corpus=str(good), val_fraction=0.2))
    assert corpus.keys("val") and all(k.startswith("good.jsonl:") for k in corpus.keys("val"))
    docs = list(corpus.documents("train")) + list(corpus.documents("val"))
    assert sorted(docs) == sorted(f"doc {i}" for i in range(30))

    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(30)]
    lines[6] = '{"text": "unterminated'
    bad.write_text("\n".join(lines) + "\n")
    corpus = load_corpus(DataConfig(corpus=str(bad), val_fraction=0.2))
    split = "train" if "bad.jsonl:7" in corpus.keys("train") else "val"
    with pytest.raises(ConfigError, match=r"bad\.jsonl:7"):
        list(corpus.documents(split))

    lines[6] = json.dumps({"body": "no text field"})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:7"):
        for split in ("train", "val"):
            list(load_corpus(DataConfig(corpus=str(bad), val_fraction=0.2)).documents(split))


def test_missing_corpus_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus=str(tmp_path / "nope")))
    assert e.value.key == "data.corpus" and "nope" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="at least one document"):
        load_corpus(DataConfig(corpus=str(tmp_path / "empty")))


def test_hf_corpus_without_datasets_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_corpus(DataConfig(corpus="hf:roneneldan/TinyStories"))


class FakeDataset:
    """The corner of ``datasets.Dataset`` that load_corpus uses."""

    _fingerprint = "fake"

    def __init__(self, rows):
        self.rows, self.column_names = rows, ["text", "id"]

    def __len__(self):
        return len(self.rows)

    def select(self, indices):
        return FakeDataset([self.rows[i] for i in indices])

    def iter(self, batch_size):
        for i in range(0, len(self.rows), batch_size):
            yield {"text": [r["text"] for r in self.rows[i:i + batch_size]]}


def test_hf_corpus_with_a_fake_datasets(monkeypatch):
    import types

    rows = [{"text": f"story {i}", "id": i} for i in range(2500)]
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_corpus(DataConfig(corpus="hf:org/stories:small", hf_split="validation"))
    assert calls == [("org/stories", "small", "validation")]
    val = list(corpus.documents("val"))
    assert val == [f"story {k}" for k in corpus.keys("val")] and 20 < len(val) < 80
    assert len(list(corpus.documents("train"))) + len(val) == 2500
    with pytest.raises(ConfigError, match="data.jsonl_field"):
        load_corpus(DataConfig(corpus="hf:org/stories", jsonl_field="body"))


# ---------------------------------------------------------------------------------------------
# Cache


def small_corpus(tmp_path: Path, n: int = 40) -> Path:
    rng = random.Random(5)
    return write_files(tmp_path / "corpus", {f"f{i:03d}.txt": random_text(rng, 200) + SAMPLE[:300]
                                             for i in range(n)})


def test_default_cache_dir(monkeypatch, tmp_path):
    assert default_cache_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("KEENLM_CACHE", str(tmp_path / "env"))
    assert default_cache_dir("") == tmp_path / "env"
    monkeypatch.delenv("KEENLM_CACHE")
    assert default_cache_dir("") == Path.home() / ".cache" / "keenlm"


def test_tokenize_cache_reuses_and_rebuilds(tmp_path, bpe):
    corpus = load_corpus(DataConfig(corpus=str(small_corpus(tmp_path)), val_fraction=0.2))
    cache = tmp_path / "cache"
    data = tokenize_corpus(corpus, bpe, cache)
    assert isinstance(data, TokenData) and data.train.dtype == np.uint16
    # Documents joined by eos, exactly the tokens of the texts.
    docs = list(corpus.documents("val"))
    expected = [i for d in docs for i in bpe.encode(d) + [bpe.eos_id]]
    assert data.val.tolist() == expected
    assert data.meta["bytes"]["val"] == sum(len(d.encode()) for d in docs)
    assert int(data.token_bytes[data.train].sum()) == data.meta["bytes"]["train"]

    bin_path = data.folder / "train.bin"
    mtime = bin_path.stat().st_mtime_ns
    again = tokenize_corpus(corpus, bpe, cache)  # reused: not written again
    assert bin_path.stat().st_mtime_ns == mtime and again.folder == data.folder
    assert np.array_equal(again.train, data.train)

    n = len(data.train)
    del data, again  # release the memmaps before damaging the file
    with open(bin_path, "r+b") as f:
        f.truncate(n)  # half of the uint16 payload
    rebuilt = tokenize_corpus(corpus, bpe, cache)
    assert len(rebuilt.train) == n and bin_path.stat().st_size == 2 * n
    assert not [p for p in (cache / "tokens").iterdir() if p.name.startswith(".")]
    # bytes changed on disk, the size kept: the CRC catches it, and the cache is rebuilt
    good = np.array(rebuilt.train)
    del rebuilt
    with open(bin_path, "r+b") as f:
        f.seek(10)
        f.write(bytes([(f.read(1)[0] + 1) % 256]))
    logs = []
    fixed = tokenize_corpus(corpus, bpe, cache, log=logs.append)
    assert logs and logs[0].startswith("tokenizing") and np.array_equal(fixed.train, good)


def test_atomic_folder_loser_keeps_winner(tmp_path):
    final = tmp_path / "x"
    with atomic_folder(final) as tmp:
        (tmp / "a").write_text("winner")
    with atomic_folder(final, is_valid=lambda p: (p / "a").exists()) as tmp:
        (tmp / "a").write_text("loser")
    assert (final / "a").read_text() == "winner"
    with atomic_folder(final, is_valid=lambda p: False) as tmp:  # an invalid copy is replaced
        (tmp / "a").write_text("fresh")
    assert (final / "a").read_text() == "fresh"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_build_tokenizer_caches_training(tmp_path, monkeypatch):
    root = small_corpus(tmp_path)
    cfg = DataConfig(corpus=str(root), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    first = build_tokenizer(cfg, corpus)
    assert first.kind == "bpe" and first.vocab_size == 300

    def no_training(*a, **k):
        raise AssertionError("retrained although a cached tokenizer exists")

    monkeypatch.setattr("keenlm.data.tokenizer.train_bpe", no_training)
    assert build_tokenizer(cfg, corpus).fingerprint() == first.fingerprint()
    assert build_tokenizer(DataConfig(corpus=str(root), tokenizer="byte"), corpus).kind == "byte"
    first.save(tmp_path / "mine")
    from_path = build_tokenizer(DataConfig(corpus=str(root), tokenizer=str(tmp_path / "mine")),
                                corpus)
    assert from_path.fingerprint() == first.fingerprint()
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "nowhere")), corpus)


def test_prepare_data_byte(tmp_path):
    cfg = DataConfig(corpus=str(small_corpus(tmp_path)), tokenizer="byte", val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"))
    tok, data = prepare_data(cfg)
    assert tok.kind == "byte" and data.meta["eos_id"] == 256
    assert data.meta["tokens"]["train"] == data.meta["bytes"]["train"] + \
        data.meta["documents"]["train"]


# ---------------------------------------------------------------------------------------------
# Batches


def test_get_batch_is_pure_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 8, 16, seed=7, step=3)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens: y is x shifted by one
    x2, y2 = get_batch(tokens, 8, 16, seed=7, step=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, get_batch(tokens, 8, 16, seed=7, step=4)[0])
    assert not torch.equal(x, get_batch(tokens, 8, 16, seed=8, step=3)[0])
    starts = torch.cat([get_batch(tokens, 64, 16, 0, s)[0][:, 0] for s in range(20)])
    assert starts.min() >= 0 and starts.max() <= 1000 - 17
    assert get_batch(np.arange(17), 4, 16, 0, 0)[1][0, -1] == 16  # the one possible window
    with pytest.raises(ValueError, match="seq_len"):
        get_batch(np.arange(16), 4, 16, 0, 0)


def test_eval_batches_cover_windows_in_order():
    tokens = np.arange(105, dtype=np.uint16)  # (105 - 1) // 10 = 10 windows
    batches = list(eval_batches(tokens, 4, 10, max_batches=100))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x.flatten(), torch.arange(100))
    assert torch.equal(y.flatten(), torch.arange(1, 101))
    assert len(list(eval_batches(tokens, 4, 10, max_batches=2))) == 2
    with pytest.raises(ValueError, match="fewer than seq_len"):
        list(eval_batches(tokens, 4, 200, 1))
