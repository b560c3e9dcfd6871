"""A GGUF file straight into keenlm's 4-bit decode layout, without an fp32 copy of the model.

``load_gguf_q4(path)`` reads the same file as keenlm.io.gguf (same checks: architecture, names,
shapes, tokenizer) but keeps the block projections in their low-bit form: a Q4_0 or Q4_1 tensor's
blocks of 32 (scale, offset, 16 bytes of codes in ggml's nibble order) become a
keenlm.quant.q4.Q4Linear with no re-rounding (q/k rows un-permuted as whole rows), a ternary
TQ2_0 tensor's blocks of 256 a keenlm.quant.tq2.T2Linear; q/k/v and gate/up are joined into one
layer each. Projections stored otherwise (F32, F16, Q8_0, K-quants)
are dequantized one tensor at a time and rounded to Q4 blocks. The token embedding and the LM
head keep Q8_0 blocks (as stored when the file has them, else rounded in chunks), and a tied
head reads the embedding's own blocks.
Peak memory is then about the packed model plus one tensor in fp32.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from keenlm.config import RunConfig
from keenlm.io import gguf_format
from keenlm.io.gguf import (SUPPORTED_TYPES, GGUFError, dequantize, expected_shapes, name_map,
                            read_header, unpermute_qk)
from keenlm.io.loaders import Loaded
from keenlm.model import build_model
from keenlm.quant.int8 import FusedSlice
from keenlm.quant.q4 import Q4Linear, Q8Embedding, Q8Linear, quantize_q4, quantize_q8
from keenlm.quant.tq2 import T2Linear, dequantize_t2

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
TQ2_BYTES = 66  # a TQ2_0 block: 64 bytes of 2-bit codes, then an fp16 scale, per 256 weights
EMBED_CHUNK = 4096  # embedding rows dequantized at a time when the file does not hold Q8_0


def q8_blocks(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (N, K), d (N, K/32)) of a Q8_0 tensor's raw rows (N, bytes): blocks of 34
    bytes, an fp16 scale then 32 int8 codes."""
    b = raw.reshape(raw.shape[0], -1, 34)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].copy()
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(raw.shape[0], -1)
    return torch.from_numpy(q), torch.from_numpy(d)


def tq2_blocks(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K/4), d (N, K/256)) of a TQ2_0 tensor's raw rows (N, bytes)."""
    b = raw.reshape(raw.shape[0], -1, TQ2_BYTES)
    qs = np.ascontiguousarray(b[..., :64]).reshape(raw.shape[0], -1)
    d = np.ascontiguousarray(b[..., 64:66]).view(np.float16)[..., 0].copy()
    return torch.from_numpy(qs), torch.from_numpy(d)


def q4_blocks(raw: np.ndarray, tname: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (N, K/2), d (N, K/32), m (N, K/32)) of a Q4_0 / Q4_1 tensor's raw rows (N, bytes)."""
    size = BLOCK_BYTES[tname]
    b = raw.reshape(raw.shape[0], -1, size)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].copy()
    if tname == "Q4_1":
        m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].copy()
    else:  # Q4_0: w = d (q - 8); -8 d is exact in fp16 for any scale a file can hold
        m = (-8.0 * d.astype(np.float32)).astype(np.float16)
    qs = np.ascontiguousarray(b[..., size - 16:]).reshape(raw.shape[0], -1)
    return torch.from_numpy(qs), torch.from_numpy(d), torch.from_numpy(m)


def _releasing(read):
    """A reader method after which its tensor's file pages leave this process's memory."""
    @functools.wraps(read)
    def wrapper(self, kname):
        try:
            return read(self, kname)
        finally:
            self.done(kname)
    return wrapper


class _Reader:
    """One GGUF file's tensors by keenlm name, checked, in raw or fp32 form."""

    def __init__(self, reader, cfg, path):
        self.reader, self.cfg, self.path = reader, cfg, path
        self.by_name = {t.name: t for t in reader.tensors}
        self.gguf_of = {k: g for g, k in name_map(cfg).items()}
        self.expected = expected_shapes(cfg)

    def info(self, kname):
        gname = self.gguf_of[kname]
        t = self.by_name.get(gname)
        if t is None:
            raise GGUFError(self.path, f"tensor {gname} is missing")
        tname = self.reader.type_name(t)
        if tname not in SUPPORTED_TYPES:
            raise GGUFError(self.path, f"tensor {gname} has type {tname}, not supported")
        if tuple(t.shape) != self.expected[kname]:
            raise GGUFError(self.path, f"tensor {gname} has shape {tuple(t.shape)}, the config "
                                       f"implies {self.expected[kname]}")
        return gname, t, tname

    def _heads(self, kname):
        if kname.endswith("q_proj.weight"):
            return self.cfg.n_head
        return self.cfg.kv_heads if kname.endswith("k_proj.weight") else 0

    def done(self, kname) -> None:
        """The tensor has been copied out: its file pages leave this process's memory."""
        t = self.by_name[self.gguf_of[kname]]
        gguf_format.release(self.reader.data, t.offset, t.n_bytes)

    def blocks(self, gname, t, tname, weights: int, size: int) -> np.ndarray:
        """The tensor's raw rows, checked to hold whole blocks of ``weights`` in ``size`` bytes."""
        raw = gguf_format.tensor_bytes(self.reader.data, t)
        if raw.shape[-1] * weights != size * t.shape[-1]:
            raise GGUFError(self.path, f"tensor {gname}: {raw.shape[-1]} bytes per row do not "
                                       f"hold {t.shape[-1]} {tname} weights")
        return raw

    @_releasing
    def q4(self, kname):
        """A projection as Q4 blocks, ("q4", codes, d, m), or as ternary TQ2_0 blocks,
        ("t2", codes, d): taken as stored when the file has them, else rounded to Q4."""
        gname, t, tname = self.info(kname)
        heads = self._heads(kname)
        rows = (lambda raw: unpermute_qk(raw, heads)) if heads else (lambda raw: raw)
        if tname == "TQ2_0":
            return ("t2", *tq2_blocks(rows(self.blocks(gname, t, tname, 256, TQ2_BYTES))))
        if tname in BLOCK_BYTES:
            return ("q4", *q4_blocks(rows(self.blocks(gname, t, tname, 32, BLOCK_BYTES[tname])),
                                     tname))
        return ("q4", *quantize_q4(self.fp32(kname)))

    def fp32(self, kname, rows: slice | None = None) -> torch.Tensor:
        from gguf import GGMLQuantizationType  # optional extra: keenlm[io], as in keenlm.io.gguf

        gname, t, tname = self.info(kname)
        raw = gguf_format.tensor_bytes(self.reader.data, t)
        raw = raw if rows is None else raw[rows]
        w = dequantize(raw, GGMLQuantizationType(t.type_id), self.path, gname)
        heads = self._heads(kname)
        w = unpermute_qk(w, heads) if heads else w
        return torch.from_numpy(np.array(w, dtype=np.float32, order="C"))

    @_releasing
    def q8(self, kname):
        """A large matrix (embedding, head) as Q8_0 blocks: as stored when the file has them,
        else rounded EMBED_CHUNK rows at a time."""
        gname, t, tname = self.info(kname)
        if tname == "Q8_0":
            return q8_blocks(self.blocks(gname, t, tname, 32, 34))
        q = torch.empty(tuple(t.shape), dtype=torch.int8)
        d = torch.empty(t.shape[0], t.shape[1] // 32, dtype=torch.float16)
        for i in range(0, t.shape[0], EMBED_CHUNK):
            q[i:i + EMBED_CHUNK], d[i:i + EMBED_CHUNK] = quantize_q8(
                self.fp32(kname, slice(i, i + EMBED_CHUNK)))
        return q, d


def _layer(parts):
    """One layer of the rows of ``parts``: ternary when all are TQ2_0 blocks, else Q4 (ternary
    parts rounded to Q4: the kernel takes one format per call)."""
    if all(p[0] == "t2" for p in parts):
        return T2Linear(*(torch.cat(x) for x in zip(*(p[1:] for p in parts))))
    q4 = [p[1:] if p[0] == "q4" else quantize_q4(dequantize_t2(*p[1:])) for p in parts]
    return Q4Linear(*(torch.cat(x) for x in zip(*q4)))


def _set_fused(parent, names, attr, parts):
    fused = _layer(parts)
    setattr(parent, attr, fused)
    start = 0
    for n, p in zip(names, parts):
        setattr(parent, n, FusedSlice(fused, start, start + p[1].shape[0]))
        start += p[1].shape[0]


def load_gguf_q4(path, device: str = "cpu") -> Loaded:
    """A GGUF file as a model whose projections run on the Q4 kernel (see the module docstring)."""
    path = Path(path)
    reader, cfg, tokenizer = read_header(path)
    r = _Reader(reader, cfg, path)
    with torch.device("meta"):
        net = build_model(cfg)
    for i, layer in enumerate(net.layers):
        p = f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        _set_fused(attn, ["q_proj", "k_proj", "v_proj"], "qkv_proj",
                   [r.q4(p + f"self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj")])
        attn.o_proj = _layer([r.q4(p + "self_attn.o_proj.weight")])
        _set_fused(mlp, ["gate_proj", "up_proj"], "gate_up_proj",
                   [r.q4(p + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj")])
        mlp.down_proj = _layer([r.q4(p + "mlp.down_proj.weight")])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, norm).weight = torch.nn.Parameter(r.fp32(p + f"{norm}.weight"),
                                                             requires_grad=False)
    net.norm.weight = torch.nn.Parameter(r.fp32("norm.weight"), requires_grad=False)
    q8, d = r.q8("embed_tokens.weight")
    net.embed_tokens = Q8Embedding(q8, d)
    net.lm_head = Q8Linear(q8, d) if cfg.tie_embeddings else Q8Linear(*r.q8("lm_head.weight"))
    net.rope_cos = torch.empty(0)
    net.rope_sin = torch.empty(0)
    net.reset_buffers()
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:  # every tensor the model reads must have come from the file
        raise GGUFError(path, f"not filled from the file: {left[:5]}")
    gguf_format.release(reader.data)  # everything was copied out (metadata included)
    net.to(torch.device(device)).eval()
    return Loaded(net, tokenizer, RunConfig(model=cfg))
