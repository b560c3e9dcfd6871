"""GGUF import: llama.cpp's model files as keenlm models (weights, config, tokenizer, chat template).

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one file: a header of
key-value metadata (architecture, hyperparameters, tokenizer vocabulary and merges, chat
template), a table of tensors (name, shape in ggml order, type, offset), then the tensor data.
It is parsed by ``keenlm.io.gguf_format`` (a strict struct-based reader, ~20x faster than
``gguf.GGUFReader`` on a 49K-token vocabulary) and dequantized with ``gguf.quants.dequantize``
(vectorized numpy; ~1 s for SmolLM2-135M's 272 tensors here).

Two details of the llama.cpp convention matter for exact parity:
- shapes are stored fastest-dimension first; the reader's numpy arrays are already (out, in);
- q and k projection rows are permuted from Hugging Face's "rotate half" RoPE layout to the
  interleaved-pairs layout (convert_hf_to_gguf.py ``permute``); ``unpermute_qk`` undoes it, so
  keenlm's rotate-half RoPE applies unchanged.

Everything is checked before a model is built: magic and version (by the reader), that every
tensor's data lies inside the file (a truncated download), the architecture, the tensor types,
every expected tensor's presence and shape. A failure raises ``GGUFError`` naming the file and
the problem; no half-loaded model is ever returned.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from keenlm.config import ModelConfig, RunConfig
from keenlm.config.model import MAX_CONTEXT
from keenlm.io import gguf_format
from keenlm.io.hf_tokenizer import tokenizer_from_vocab
from keenlm.io.loaders import Loaded, assemble, register

SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "TQ1_0",
                   "TQ2_0")


class GGUFError(ValueError):
    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


class GGUFFile:
    """Metadata, tensor table and memory-mapped data of one file (keenlm.io.gguf_format)."""

    def __init__(self, meta: dict, tensors: list, data):
        self.meta, self.tensors, self.data = meta, tensors, data

    def type_name(self, t) -> str:
        from gguf import GGMLQuantizationType  # optional extra: keenlm[io]

        return GGMLQuantizationType(t.type_id).name


def _field(reader, key: str, default=None):
    return reader.meta.get(key, default)


def open_reader(path) -> GGUFFile:
    """The parsed file, or GGUFError for anything that is not a readable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(path, "no such file")
    try:
        meta, tensors, data = gguf_format.read(path)
    except gguf_format.FormatError as e:
        problem = str(e)
        if not problem.startswith(("not a GGUF", "truncated")):
            problem = f"corrupt GGUF header or tensor table: {problem}"
        raise GGUFError(path, problem) from None
    return GGUFFile(meta, tensors, data)




def model_config(reader, path) -> ModelConfig:
    """The model config from the metadata, every number checked (type and range) before it
    sizes anything: a corrupt count never becomes a huge allocation or a long loop."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(path, f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def number(key, default=None, kind=int, lo=1, hi=1 << 24):
        v = _field(reader, f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(path, f"metadata key {arch}.{key} is missing")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                (kind is int and v != int(v)) or not lo <= v <= hi:
            raise GGUFError(path, f"metadata key {arch}.{key} = {v!r}: expected "
                                  f"{'an integer' if kind is int else 'a number'} in [{lo}, {hi}]")
        return kind(v)

    names = {t.name for t in reader.tensors}
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)  # (V, C)
    if emb is None:
        raise GGUFError(path, "tensor token_embd.weight is missing")
    d_model, n_head = number("embedding_length"), number("attention.head_count")
    n_layer = number("block_count")
    if n_layer * len(GGUF_TO_KEENLM) > len(reader.tensors):  # 9 tensors per block
        raise GGUFError(path, f"metadata says {n_layer} blocks; the file has "
                              f"{len(reader.tensors)} tensors")
    rope_dims = number("rope.dimension_count", d_model // n_head)
    if rope_dims != d_model // n_head:
        raise GGUFError(path, f"partial rotary embedding ({rope_dims} of {d_model // n_head} dims) "
                              "is not supported")
    try:
        return ModelConfig(
            vocab_size=int(emb.shape[0]), n_layer=n_layer, d_model=d_model,
            n_head=n_head, n_kv_head=number("attention.head_count_kv", n_head),
            d_ff=number("feed_forward_length"),
            max_seq_len=number("context_length", 2048, hi=MAX_CONTEXT),
            rope_theta=number("rope.freq_base", 10000.0, float, 1e-3, 1e12),
            norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5, float, 1e-12, 1.0),
            tie_embeddings="output.weight" not in names, attention="sdpa")
    except ValueError as e:
        raise GGUFError(path, f"hyperparameters out of range: {e}") from None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (rotate-half -> interleaved pairs), for export."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TO_KEENLM = {  # per-block names; {i} is the block index
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                "output.weight": "lm_head.weight"}


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> keenlm parameter name, for every tensor the model needs."""
    out = {g: k for g, k in GLOBAL_NAMES.items() if g != "output.weight" or not cfg.tie_embeddings}
    for i in range(cfg.n_layer):
        out.update({g.format(i=i): k.format(i=i) for g, k in GGUF_TO_KEENLM.items()})
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """keenlm parameter name -> shape, without building a model."""
    C, F, D = cfg.d_model, cfg.d_ff, cfg.head_dim
    block = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
             "self_attn.q_proj.weight": (cfg.n_head * D, C),
             "self_attn.k_proj.weight": (cfg.kv_heads * D, C),
             "self_attn.v_proj.weight": (cfg.kv_heads * D, C),
             "self_attn.o_proj.weight": (C, cfg.n_head * D),
             "mlp.gate_proj.weight": (F, C), "mlp.up_proj.weight": (F, C), "mlp.down_proj.weight": (C, F)}
    out = {"embed_tokens.weight": (cfg.vocab_size, C), "norm.weight": (C,),
           "lm_head.weight": (cfg.vocab_size, C)}
    for i in range(cfg.n_layer):
        out.update({f"layers.{i}.{k}": v for k, v in block.items()})
    return out


def read_state(reader, cfg: ModelConfig, path) -> dict[str, torch.Tensor]:
    """Every weight, dequantized to fp32 and renamed; checked against the config's shapes."""
    from gguf import GGMLQuantizationType  # optional extra: keenlm[io]

    expected = expected_shapes(cfg)
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for gname, kname in name_map(cfg).items():
        t = tensors.get(gname)
        if t is None:
            raise GGUFError(path, f"tensor {gname} is missing")
        tname = reader.type_name(t)
        if tname not in SUPPORTED_TYPES:
            raise GGUFError(path, f"tensor {gname} has type {tname}, not supported "
                                  f"(supported: {', '.join(SUPPORTED_TYPES)})")
        if tuple(t.shape) != expected[kname]:
            raise GGUFError(path, f"tensor {gname} has shape {tuple(t.shape)}, the config "
                                  f"implies {expected[kname]}")
        w = dequantize(gguf_format.tensor_bytes(reader.data, t), GGMLQuantizationType(t.type_id),
                       path, gname)
        if ".attn_q." in gname:
            w = unpermute_qk(w, cfg.n_head)
        elif ".attn_k." in gname:
            w = unpermute_qk(w, cfg.kv_heads)
        state[kname] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # own copy
    return state


def dequantize(raw: np.ndarray, qtype, path, name) -> np.ndarray:
    from gguf import quants  # optional extra: keenlm[io]

    try:
        return quants.dequantize(raw, qtype).astype(np.float32, copy=False)
    except Exception as e:
        raise GGUFError(path, f"tensor {name} cannot be decoded ({e})") from None


def read_tokenizer(reader, path):
    """The embedded byte-level BPE tokenizer and chat template, as a keenlm BPETokenizer."""
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise GGUFError(path, "no tokenizer in the file (tokenizer.ggml.model is missing)")
    if model != "gpt2":
        raise GGUFError(path, f"tokenizer model {model!r} is not supported (only byte-level BPE, "
                              "'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []  # a byte vocabulary has none
    if not tokens:
        raise GGUFError(path, "the tokenizer vocabulary (tokenizer.ggml.tokens) is missing")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    try:
        return tokenizer_from_vocab(
            tokens, merges, special=[t for t, k in zip(tokens, types) if k == 3],
            eos_token=tokens[int(eos)] if eos is not None else None,
            bos_token=tokens[int(bos)] if bos is not None else None,
            add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            pre=_field(reader, "tokenizer.ggml.pre", "default"),
            chat_template=_field(reader, "tokenizer.chat_template"), source=str(path))
    except (ValueError, IndexError) as e:
        raise GGUFError(path, f"tokenizer cannot be rebuilt ({e})") from None


def read_header(path):
    """(reader, model config, tokenizer) of a GGUF file: everything but the weights, checked."""
    reader = open_reader(path)
    cfg = model_config(reader, path)
    tokenizer = read_tokenizer(reader, path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GGUFError(path, f"tokenizer has {tokenizer.vocab_size} tokens but the embedding "
                              f"only {cfg.vocab_size}")
    return reader, cfg, tokenizer


def load_gguf(path):
    """(model config, fp32 state dict, tokenizer) from a GGUF file, all validated first."""
    reader, cfg, tokenizer = read_header(path)
    return cfg, read_state(reader, cfg, path), tokenizer


def _load(path: Path, device: str) -> Loaded:
    cfg_m, state, tok = load_gguf(path)
    return assemble(RunConfig(model=cfg_m), state, tok, device)


register("GGUF file", lambda p: p.is_file(), _load)
