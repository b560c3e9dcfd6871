"""Corpora fuzzed: a JSONL file and a text file keenlm reads, built from any lines (invalid
UTF-8, NUL bytes, lone surrogates' bytes, broken JSON, JSON values of every type, non-string
fields), tokenized into the cache. Property: the corpus tokenizes (documents that are not UTF-8
are skipped and counted), or one ConfigError names the file and line; never another
exception. A one-line 100 MB file is in ``make fuzz`` only (it takes a minute)."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keenlm.config import ConfigError, DataConfig
from keenlm.data import ByteTokenizer, load_corpus, tokenize_corpus
from tests.fuzz.mutate import count

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=30), lambda v: st.lists(v, max_size=3), max_leaves=5)
lines = st.one_of(
    st.dictionaries(st.sampled_from(["text", "other"]), json_values, max_size=2).map(
        lambda d: json.dumps(d).encode()),
    st.text(max_size=60).map(lambda t: json.dumps({"text": t}).encode()),
    st.binary(max_size=60),                                     # raw bytes: invalid UTF-8, NULs
    st.just(b'{"text": "\\ud800"}'), st.just(b'{"text": "a\x00b"}'), st.just(b"\xff\xfe"),
    st.just(b"[1, 2]"), st.just(b"{"),
)


def check(tmp, name, data: bytes):
    path = tmp / name
    path.write_bytes(data)
    cfg = DataConfig(corpus=str(path), cache_dir=str(tmp / "cache"), val_fraction=0.3)
    try:
        corpus = load_corpus(cfg)
        data = tokenize_corpus(corpus, ByteTokenizer(), tmp / "cache")
    except ConfigError as e:
        assert "data." in str(e)
        return
    except ValueError as e:  # a split without documents: named as such
        assert "split has no documents" in str(e), str(e)
        return
    assert len(data.train) > 0 and len(data.val) > 0


@given(st.lists(lines, min_size=1, max_size=12))
def test_jsonl_corpora_tokenize_or_fail_clearly(tmp_path_factory, rows):
    count()
    check(tmp_path_factory.mktemp("c"), "c.jsonl", b"\n".join(rows) + b"\n")


@given(st.binary(max_size=400))
def test_text_corpora_tokenize_or_fail_clearly(tmp_path_factory, data):
    count()
    check(tmp_path_factory.mktemp("c"), "c.txt", data)


@pytest.mark.skipif(not os.environ.get("KEENLM_FUZZ_EXAMPLES"), reason="make fuzz only")
def test_one_100_mb_line(tmp_path):
    check(tmp_path, "big.txt", b"x" * (100 << 20))
    check(tmp_path, "big.jsonl", json.dumps({"text": "y" * (100 << 20)}).encode() + b"\n")


def test_fuzz_finding_a_lone_surrogate_in_jsonl_is_skipped_as_not_utf8(tmp_path):
    # json.loads accepts "\ud800", which no UTF-8 text holds: tokenizing it raised
    # UnicodeEncodeError; it is now a document skipped and counted, like invalid bytes
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "\\ud800"}\n' + "\n".join(json.dumps({"text": f"line {i}"})
                                                        for i in range(20)) + "\n")
    corpus = load_corpus(DataConfig(corpus=str(path), val_fraction=0.3))
    data = tokenize_corpus(corpus, ByteTokenizer(), tmp_path / "cache")
    assert data.meta["skipped_not_utf8"] == 1 and len(corpus.skipped) == 1
