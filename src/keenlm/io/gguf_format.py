"""A fast, strict reader for the GGUF container (metadata + tensor table + memory-mapped data).

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, dims u64[n_dims], type u32, offset u64)
    padding to general.alignment (default 32) | tensor data

string = u64 length + UTF-8 bytes; arrays = item type u32 + count u64 + items.

Why not ``gguf.GGUFReader``: it builds numpy views for every field part, which takes ~2 s for
SmolLM2's 98K vocabulary strings and merges; walking the bytes with ``struct`` takes ~0.1 s.
Every read is bounds-checked, so a truncated or corrupted file fails with a message saying
where, never with a half-read table. Tensor data are zero-copy ``np.memmap`` slices.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_COUNT = 1 << 32  # no real file has more items than this in one array or table


class FormatError(ValueError):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first), i.e. ggml dims reversed
    type_id: int
    offset: int  # absolute offset in the file
    n_bytes: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"header ends early: needed {n} bytes at offset {self.pos:,}, "
                              f"the file has {len(self.buf):,}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > len(self.buf):
            raise FormatError(f"string length {n:,} at offset {self.pos:,} is larger than the file")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"string at offset {self.pos:,} is not UTF-8") from None

    def strings(self, count: int) -> list[str]:
        """``string()`` ``count`` times in one tight loop (a vocabulary holds ~50k-150k)."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise FormatError(f"header ends early: a string length at offset {pos:,}, "
                                      f"the file has {end:,} bytes")
                (n,) = length(buf, pos)
                if n > end - pos - 8:
                    raise FormatError(f"string length {n:,} at offset {pos + 8:,} is larger "
                                      "than the file")
                out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                pos += 8 + n
        except UnicodeDecodeError:
            raise FormatError(f"string at offset {pos + 8:,} is not UTF-8") from None
        self.pos = pos
        return out

    def value(self, vtype: int):
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if count > MAX_COUNT:
                raise FormatError(f"array of {count:,} items at offset {self.pos:,}")
            if itype in SCALARS and itype != 7:  # numbers: one numpy read
                dt = np.dtype(SCALARS[itype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            if itype == STRING:
                return self.strings(count)
            return [self.value(itype) for _ in range(count)]
        raise FormatError(f"unknown value type {vtype} at offset {self.pos:,}")


def read(path) -> tuple[dict, list[TensorInfo], np.memmap]:
    """(metadata, tensor table, file memmap) of a GGUF file; FormatError on anything malformed."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # optional extra: keenlm[io]

    size = os.path.getsize(path)
    if size < 24:  # magic, version, two counts (an empty file cannot even be mapped)
        raise FormatError(f"truncated: {size} bytes, fewer than a GGUF header's 24")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    if bytes(cur.take(4)) != b"GGUF":
        raise FormatError("not a GGUF file (the first 4 bytes are not 'GGUF')")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise FormatError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
        raise FormatError(f"corrupt header: {n_tensors:,} tensors, {n_kv:,} metadata entries")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 8:
            raise FormatError(f"corrupt tensor table: {name} has {n_dims} dimensions")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        except ValueError:
            raise FormatError(f"tensor {name} has unknown type id {type_id}") from None
        n = math.prod(dims)  # Python integers: no overflow to a small or negative size
        if dims and dims[0] % block:
            raise FormatError(f"tensor {name}: row of {dims[0]} is not a multiple of its block "
                              f"size {block}")
        infos.append(TensorInfo(name, tuple(reversed(dims)), type_id, offset, n // block * size))
    align = meta.get("general.alignment", 32)
    if type(align) is not int or not 1 <= align <= 1 << 20 or align & (align - 1):
        raise FormatError(f"general.alignment {align!r} is not a power of two up to 1 MiB")
    start = (cur.pos + align - 1) // align * align
    for t in infos:
        t.offset += start
        if t.offset + t.n_bytes > len(data):
            raise FormatError(f"truncated: tensor {t.name} needs bytes up to "
                              f"{t.offset + t.n_bytes:,} but the file has {len(data):,}")
    return meta, infos, data


def release(data: np.memmap, start: int = 0, length: int | None = None) -> None:
    """Drop the pages of a range already read from this process's resident memory (they stay
    in the OS page cache and come back from the file if read again): a loader that copies a
    file's tensors into another layout then holds them once, not twice. A no-op where the
    platform has no madvise."""
    mm = getattr(data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    end = len(data) if length is None else min(len(data), start + length)
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        mm.madvise(mmap.MADV_DONTNEED, first, end - first)


def tensor_bytes(data: np.memmap, t: TensorInfo) -> np.ndarray:
    """The raw bytes of a tensor shaped as gguf.quants expects: (*rows, bytes per row)."""
    raw = data[t.offset:t.offset + t.n_bytes]
    rows = t.shape[:-1]
    return raw.reshape(*rows, -1) if rows else raw
