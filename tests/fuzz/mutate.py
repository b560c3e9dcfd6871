"""Structure-aware mutations of a valid file: Hypothesis strategies that truncate it, append
to it, flip bytes in it, and overwrite its integer fields (counts, lengths, offsets, type ids,
dimensions) with the values that break readers (0, 1, -1, 2^31, 2^32, 2^63, the file size)."""
from __future__ import annotations

import struct

from hypothesis import strategies as st

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
