"""GGUF files fuzzed, structure-aware: a valid file keenlm writes (a tiny Llama with a BPE
tokenizer and a chat template), mutated in its header counts, string lengths, value and
tensor type ids, array counts, tensor dimensions and offsets, byte flips in the header,
truncation and appended bytes. Property: ``keenlm.load`` either loads a model that runs (finite
logits from one token) or raises GGUFError naming the file, within the deadline; never another
exception, never a half-built model."""
from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given

pytest.importorskip("gguf")

import keenlm  # noqa: E402
from keenlm.config import ModelConfig  # noqa: E402
from keenlm.data import train_bpe  # noqa: E402
from keenlm.io.gguf import GGUFError  # noqa: E402
from keenlm.io.gguf_export import export_gguf  # noqa: E402
from keenlm.model import build_model  # noqa: E402
from tests.fuzz.mutate import count, mutations  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def valid_file(tmp) -> bytes:
    bpe = train_bpe(["<|im_start|>user\ndef add(a, b): return a + b<|im_end|>\n" * 30], 280)
    bpe.chat_template = TEMPLATE
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=bpe.vocab_size, n_layer=1, d_model=32, n_head=2,
                                  d_ff=64, max_seq_len=32))
    return export_gguf(net, bpe, tmp / "valid.gguf", "q8_0").read_bytes()


def fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every integer field of the header and tensor table (array items:
    the first few), and where the tensor data begin."""
    out = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(p):
        out.append((p, 8))
        return p + 8 + struct.unpack_from("<Q", data, p)[0]

    def value(p, t):
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if t == 8:
            return string(p)
        if t == 9:
            out.extend([(p, 4), (p + 4, 8)])
            it, count = struct.unpack_from("<IQ", data, p)
            p += 12
            for i in range(count):
                if i >= 4 and it == 8:  # the rest of a long string array: skipped over
                    p += 8 + struct.unpack_from("<Q", data, p)[0]
                    continue
                p = value(p, it) if it in (8, 9) else p + sizes[it]
            return p
        out.append((p, sizes[t]))
        return p + sizes[t]

    for _ in range(n_kv):
        pos = string(pos)
        out.append((pos, 4))
        t = struct.unpack_from("<I", data, pos)[0]
        pos = value(pos + 4, t)
    for _ in range(n_tensors):
        pos = string(pos)
        out.append((pos, 4))
        n_dims = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        out.extend((pos + 8 * i, 8) for i in range(n_dims))
        pos += 8 * n_dims
        out.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
    return out, pos


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    data = valid_file(tmp_path_factory.mktemp("gguf"))
    return data, *fields(data)


def check(path):
    """The property: loads and runs, or one GGUFError naming the file."""
    try:
        km = keenlm.load(path)
    except GGUFError as e:
        assert str(path) in str(e)
        return
    with torch.no_grad():
        out = km.net(torch.zeros(1, 1, dtype=torch.long))
    assert out.shape[-1] == km.net.cfg.vocab_size


def test_the_valid_file_loads(valid, tmp_path):
    data, fs, header = valid
    assert len(fs) > 100 and 0 < header < len(data)
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    assert keenlm.load(p).tokenizer.chat_template == TEMPLATE


_STRATEGY = {}


def strategy(valid):
    key = id(valid)
    if key not in _STRATEGY:
        data, fs, header = valid
        _STRATEGY[key] = mutations(data, fs, header)
    return _STRATEGY[key]


def test_mutated_gguf_files_load_or_fail_clearly(valid, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"

    @given(strategy(valid))
    def prop(data):
        count()
        path.write_bytes(data)
        check(path)

    prop()


# ------------------------------------------------------------------ what the fuzzing found
# Each failure the fuzzer found, fixed, and kept here as a test of its own.

def _patch_value(data: bytes, key: str, value: bytes) -> bytes:
    """``data`` with the (scalar) value of metadata ``key`` overwritten by ``value``."""
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4  # past the type id
    return data[:at] + value + data[at + len(value):]


def _first_merge(data: bytes, text: bytes) -> bytes:
    k = b"tokenizer.ggml.merges"
    at = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4 + 12 + 8  # first item
    return data[:at] + text + data[at + len(text):]


REGRESSIONS = {
    # an empty file could not even be memory-mapped (numpy's ValueError)
    "empty file": (lambda d: b"", "truncated: 0 bytes"),
    "ten bytes": (lambda d: d[:10], "truncated: 10 bytes"),
    # a huge context length sized the rotary tables: a 27 GB allocation
    "context length 2^32-1": (lambda d: _patch_value(d, "llama.context_length", b"\xff" * 4),
                              "llama.context_length = 4294967295"),
    # a huge block count made the shape table loop for ever
    "block count 2^32-1": (lambda d: _patch_value(d, "llama.block_count", b"\xff" * 4),
                           "llama.block_count = 4294967295"),
    "block count beyond the tensors": (
        lambda d: _patch_value(d, "llama.block_count", struct.pack("<I", 1000)),
        "metadata says 1000 blocks"),
    # a merge of tokens not in the vocabulary: the tokenizers library's bare Exception
    "merge out of vocabulary": (lambda d: _first_merge(d, b"\x01"), "do not fit together"),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzz_findings_stay_fixed(valid, tmp_path, name):
    mutate, message = REGRESSIONS[name]
    path = tmp_path / "m.gguf"
    path.write_bytes(mutate(valid[0]))
    with pytest.raises(GGUFError, match=message):
        keenlm.load(path)


def test_an_alignment_that_is_not_a_power_of_two_is_refused(tmp_path):
    # the reader once took any general.alignment, 0 included (a division by zero); gguf's own
    # writer refuses to write one, so the file is put together by hand
    key = b"general.alignment"
    for align in (0, 3):
        data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                + struct.pack("<II", 4, align))
        (tmp_path / "a.gguf").write_bytes(data)
        with pytest.raises(GGUFError, match=f"general.alignment {align} is not a power of two"):
            keenlm.load(tmp_path / "a.gguf")
