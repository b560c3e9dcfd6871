"""What the fuzz tests share.

Structure-aware mutations of a valid file: Hypothesis strategies that truncate it, append to it,
flip bytes in it, and overwrite its integer fields (counts, lengths, offsets, type ids,
dimensions) with the values that break readers (0, 1, -1, 2^31, 2^32, 2^63, the file size).
For JSON files: any field replaced by any JSON value (``values``, ``replaced``, ``json_paths``),
then characters edited (``edited_json``). For folders: ``fresh_copy`` and the property every
model folder is held to (``loads_or_fails_clearly``). ``count()``, first in every property:
the examples each test tried, which ``make fuzz`` prints."""
from __future__ import annotations

import collections
import json
import shutil
import struct

import torch
from hypothesis import given
from hypothesis import strategies as st

COUNTS: collections.Counter = collections.Counter()  # pytest node id -> examples run
RUNNING = [""]  # the test running now (set by conftest.py)


def count() -> None:
    """One more example of the running test (the first line of every property)."""
    COUNTS[RUNNING[0]] += 1


SAFETENSORS_FIELDS = [(0, 8), (0, 4), (4, 4)]  # a safetensors file's header length (u64), its halves

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from([0, -1, 1e308, "nan", "1e400", "auto", "", " "]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
edits = st.lists(st.tuples(st.integers(0, 10**7), st.characters()), max_size=3)


def json_paths(d: dict, prefix=(), depth: int = 8):
    """Every key path of a nested dict (at most ``depth`` deep, skipping large tables)."""
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict) and len(prefix) < depth and len(v) < 50:
            yield from json_paths(v, prefix + (k,), depth)


def replaced(d: dict, path, value) -> dict:
    """A copy of ``d`` with the value at ``path`` replaced (unchanged when an earlier change
    replaced a section on the way)."""
    out = json.loads(json.dumps(d))
    node = out
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node[path[-1]] = value
    return out


def edited_json(valid: dict, changes, char_edits) -> str:
    """``valid`` with the (path, value) ``changes``, as JSON text with characters edited."""
    data = valid
    for path, value in changes:
        data = replaced(data, path, value)
    text = list(json.dumps(data, indent=1))
    for at, ch in char_edits:
        text[at % len(text)] = ch
    return "".join(text)


def fresh_copy(src, dst):
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def loads_or_fails_clearly(path) -> None:
    """The property of a model folder: ``keenlm.load`` gives a model that runs (one token's
    logits), or raises ValueError / FileNotFoundError naming the folder or a file in it."""
    import keenlm

    try:
        km = keenlm.load(path)
    except (ValueError, FileNotFoundError) as e:
        assert str(path) in str(e), str(e)
        return
    with torch.no_grad():
        out = km.net(torch.zeros(1, 1, dtype=torch.long))
    assert out.shape[-1] == km.net.cfg.vocab_size

EDGE = [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
        2**62, 2**63 - 1, 2**64 - 1]


def _put(data: bytes, at: int, value: int, width: int) -> bytes:
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
    return data[:at] + struct.pack(fmt, value % (1 << (8 * width))) + data[at + width:]


def mutations(data: bytes, fields: list[tuple[int, int]], header_len: int | None = None):
    """A strategy of mutated copies of ``data``. ``fields``: (offset, width) of the integer
    fields worth overwriting (a reader's structure); ``header_len``: where byte flips land
    mostly (the part a reader parses)."""
    n = len(data)
    head = max(1, min(n, header_len or n))
    values = st.sampled_from(EDGE + [n, n - 1, n + 1]) | st.integers(0, 2**64 - 1)
    field = st.sampled_from(fields) if fields else st.nothing()
    truncate = st.integers(0, n - 1).map(lambda k: data[:k])
    append = st.binary(min_size=1, max_size=64).map(lambda b: data + b)
    flips = st.lists(st.tuples(st.integers(0, head - 1), st.integers(0, 255)), min_size=1,
                     max_size=6).map(lambda fl: _flip(data, fl))
    overwrite = st.lists(st.tuples(field, values), min_size=1, max_size=3).map(
        lambda ch: _overwrite(data, ch))
    return st.one_of(overwrite, flips, truncate, append)


def _flip(data: bytes, flips) -> bytes:
    b = bytearray(data)
    for at, v in flips:
        b[at] = v
    return bytes(b)


def _overwrite(data: bytes, changes) -> bytes:
    for (at, width), value in changes:
        data = _put(data, at, value, width)
    return data


def fuzz_json_file(src, name: str, work) -> None:
    """The property for a JSON file of a model folder: in a copy of ``src`` (at ``work``), the
    file ``name`` with any field replaced by any JSON value and characters edited; the folder
    loads and behaves or fails clearly."""
    valid = json.loads((src / name).read_text())
    keys = list(json_paths(valid, depth=3)) or [("x",)]

    @given(st.lists(st.tuples(st.sampled_from(keys), values), max_size=2), edits)
    def prop(changes, char_edits):
        count()
        fresh_copy(src, work)
        (work / name).write_text(edited_json(valid, changes, char_edits), encoding="utf-8",
                                 errors="surrogatepass")
        loads_or_fails_clearly(work)
    prop()


def fuzz_weights(src, name: str, work) -> None:
    """The property for a folder's safetensors file ``name``: its header fields, bytes and
    length mutated (``mutations``) in a copy of ``src``; the folder loads or fails clearly."""
    data = (src / name).read_bytes()
    header = 8 + struct.unpack_from("<Q", data)[0]

    @given(mutations(data, SAFETENSORS_FIELDS, header))
    def prop(mutated):
        count()
        fresh_copy(src, work)
        (work / name).write_bytes(mutated)
        loads_or_fails_clearly(work)
    prop()

