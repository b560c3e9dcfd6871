"""GGUF export: a keenlm model, its tokenizer and chat template as one llama.cpp file.

Written with the ``gguf`` package's ``GGUFWriter`` in llama.cpp's "llama" layout, the inverse of
``keenlm.io.gguf``: tensor names ``blk.N.attn_q.weight`` etc., q/k rows permuted to the
interleaved RoPE layout, 1-D norm gains always F32 (as llama.cpp's converter writes them), the
rest as F32, F16 or a block type quantized by ``gguf.quants.quantize``:
- Q8_0: blocks of 32 int8 with one fp16 scale, 8.5 bits per weight;
- Q4_0 / Q4_1: blocks of 32 4-bit codes with an fp16 scale (Q4_0: w = (q - 8) d) or an fp16
  scale and minimum (Q4_1: w = q d + m), 4.5 / 5 bits per weight, for the block projections (the
  embedding and output matrix go in Q8_0, as in llama.cpp's own Q4 files). A keenlm 4-bit model
  with groups of 32 (``keenlm quantize --bits 4 --group 32``: codes, fp16 scale, fp16 offset) is
  written as Q4_1 blocks straight from its codes -- lossless, so llama.cpp computes with the
  weights keenlm computes with; anything else is rounded to the block type;
- for ternary models only (BitNet b1.58, https://arxiv.org/abs/2402.17764), llama.cpp's TQ1_0
  (1.6875 bits per weight: base-3 digits packed five to a byte) or TQ2_0 (2.0625 bits per
  weight: 2 bits each), both blocks of 256 weights with one fp16 scale (llama.cpp PR #8151).
  They hold the same values -- lossless for weights that are exactly scale x {-1, 0, 1}, up to
  the fp16 rounding of the scale -- so TQ1_0 is the smaller file and TQ2_0 the simpler decode.
  The embedding and output matrices are not ternary and stay F16.
A matrix whose rows are not a multiple of the block size is kept F16 and the exporter says so.
A model with LoRA adapters (keenlm.model.lora) is written as two files, as llama.cpp takes
them: its base (a QLoRA model's Q4 blocks as stored) and its adapters in llama.cpp's LoRA GGUF
(``general.type = adapter``, ``adapter.lora.alpha``, ``blk.N.attn_q.weight.lora_a`` (rank, in)
and ``.lora_b`` (out, rank), B's q/k rows permuted as the base's), which llama.cpp adds to the
base at run time (``llama-cli --lora``, llama-cpp-python's ``lora_path``).
The byte-level BPE vocabulary, merges, special tokens, BOS/EOS, pre-tokenizer name and chat
template go into the ``tokenizer.*`` metadata keys.

The file is written beside its destination and renamed into place, so an interrupted export
never leaves a partial file under the final name.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from keenlm import runs
from keenlm.data.tokenizer import bytes_to_unicode
from keenlm.io.gguf import GGUF_TO_KEENLM, GLOBAL_NAMES, permute_qk
from keenlm.quant.int8 import FusedSlice, Int8Embedding, Int8Linear
from keenlm.model.lora import LoRALinear, lora_layers
from keenlm.quant.packing import PackedLinear
from keenlm.quant.q4 import Q4Linear, unpack_q4

QTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "tq1_0", "tq2_0")
TERNARY_QTYPES = ("tq1_0", "tq2_0")  # only for models whose linears are ternary
Q4_TYPES = ("q4_0", "q4_1")  # block projections in 4 bits; embedding and output in Q8_0


def _vocab_and_merges(tokenizer):
    """(tokens in byte-level spelling, token types, merges, pre-tokenizer name)."""
    if tokenizer.kind == "byte":
        b2u = bytes_to_unicode()
        return [b2u[b] for b in range(256)] + [tokenizer.eos_token], [1] * 256 + [3], [], "gpt-2"
    spec = json.loads(tokenizer.hf.to_str())
    vocab = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    types = [3 if i in special else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    pre = "smollm" if "Digits" in json.dumps(spec.get("pre_tokenizer")) else "gpt-2"
    return tokens, types, merges, pre


def _add_metadata(w, net, tokenizer, file_type: int):
    cfg = net.cfg
    w.add_name("keenlm")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    tokens, types, merges, pre = _vocab_and_merges(tokenizer)
    for i in range(len(tokens), cfg.vocab_size):  # llama.cpp wants one token per embedding row
        tokens.append(f"<|keenlm_unused_{i}|>")
        types.append(5)  # UNUSED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.bos_token is not None:
        w.add_bos_token_id(tokenizer.token_to_id(tokenizer.bos_token))
    w.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _encode_tensor(name: str, arr: np.ndarray, qtype: str):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants  # optional extra: keenlm[io]

    if arr.ndim == 1 or qtype == "f32":
        return arr.astype(np.float32), None
    if qtype in TERNARY_QTYPES and not name.startswith("blk."):
        return arr.astype(np.float16), None  # embedding / output are not ternary
    if qtype in Q4_TYPES and not name.startswith("blk."):
        qtype = "q8_0"  # embedding / output: 8 bits, as llama.cpp's own Q4 files hold them
    if qtype != "f16":  # a block type: q8_0, tq1_0, tq2_0
        gtype = GGMLQuantizationType[qtype.upper()]
        block = GGML_QUANT_SIZES[gtype][0]  # weights per block
        if arr.shape[-1] % block == 0:
            return quants.quantize(arr.astype(np.float32), gtype), gtype
        print(f"keenlm: {name} has rows of {arr.shape[-1]} (not a multiple of {block}, "
              f"{gtype.name}'s block); kept as F16", file=sys.stderr)
    return arr.astype(np.float16), None


def effective_weights(net) -> dict[str, np.ndarray]:
    """keenlm name -> the fp32 weights the model computes with: a low-bit layer's quantized
    matrix (not its latent weights), a packed or int8 layer's dequantized one (a projection
    fused for decoding as its rows of the fused matrix), plain tensors as they are."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    for name, m in net.named_modules():
        w = _dequantized(m)
        if isinstance(m, FusedSlice):
            w = _dequantized(m._fused[0])[m.start:m.end]
        if w is not None:
            sd[f"{name}.weight"] = w.detach().float().cpu().numpy()
    return sd


def _dequantized(m):
    if hasattr(m, "quantized_weight"):  # QATLinear
        return m.quantized_weight()
    if callable(getattr(m, "weight", None)):  # PackedLinear
        return m.weight()
    if isinstance(m, (Int8Linear, Int8Embedding)):
        return m.weight_int8.float() * m.scale[:, None]
    if isinstance(m, Q4Linear):
        return m.dequantized()
    return None


def is_ternary(net) -> bool:
    """Every block projection holds ternary weights: a ternary QAT model, or a packed model
    whose layers are scale x {-1, 0, +1} (offset = -scale, codes 0..2)."""
    if net.cfg.linear == "ternary":
        return True
    packed = [m for m in net.modules() if isinstance(m, PackedLinear)]
    return bool(packed) and all(
        m.bits == 2 and torch.equal(m.offset, -m.scale) and int(m.codes().max()) <= 2 for m in packed)


def q4_1_blocks(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Q4_1 bytes of a matrix held as 4-bit codes (rows, n) with one fp16 (scale, offset) per
    32 inputs: per block d, m (fp16) then 16 bytes, code j in the low nibble of byte j and code
    j + 16 in the high one (ggml's block_q4_1). The values are exactly code * d + m."""
    rows, n = codes.shape
    if n % 32 or scale.shape != (rows, n // 32) or offset.shape != scale.shape:
        raise ValueError(f"Q4_1 needs groups of 32: codes {codes.shape}, scale {scale.shape}")
    if codes.max(initial=0) > 15:
        raise ValueError("Q4_1 holds 4-bit codes; these do not fit")
    c = codes.reshape(rows, n // 32, 32).astype(np.uint8)
    qs = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)  # (rows, blocks, 16)
    d = scale.astype(np.float16).reshape(rows, n // 32, 1).view(np.uint8)  # 2 bytes each
    m = offset.astype(np.float16).reshape(rows, n // 32, 1).view(np.uint8)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, -1)


def _packed_groups_of_32(net, weight_name: str):
    """(codes, scale, offset) of a 4-bit packed projection with groups of 32 (a fused one's
    rows of it), else None."""
    module = net.get_submodule(weight_name.rsplit(".", 1)[0])
    rows = slice(None)
    if isinstance(module, FusedSlice):
        module, rows = module._fused[0], slice(module.start, module.end)
    if isinstance(module, Q4Linear):  # Q4_1 blocks already (a QLoRA base)
        return (unpack_q4(module.qs)[rows].numpy(), module.d[rows].float().numpy(),
                module.m[rows].float().numpy())
    if not (isinstance(module, PackedLinear) and module.bits <= 4 and module.group == 32):
        return None
    return (module.codes()[rows].numpy(), module.scale[rows].float().numpy(),
            module.offset[rows].float().numpy())


def _q4_1_exact(net, name: str, key: str, permute: int):
    src = _packed_groups_of_32(net, key)
    if src is None:
        return None
    if permute:  # q/k rows in llama.cpp's interleaved RoPE order: the same rows, moved
        src = tuple(permute_qk(a, permute) for a in src)
    return q4_1_blocks(*src)


def _qk_heads(gguf_name: str, cfg) -> int:
    """The head count whose RoPE rows llama.cpp interleaves in this tensor (q: n_head, k:
    kv_heads), 0 for every other tensor."""
    return cfg.n_head if ".attn_q." in gguf_name else cfg.kv_heads if ".attn_k." in gguf_name else 0


def _tensors(net):
    """(gguf name, fp32 numpy array) in llama.cpp's layout."""
    cfg = net.cfg
    sd = effective_weights(net)
    for g, k in GLOBAL_NAMES.items():
        if g == "output.weight" and cfg.tie_embeddings:
            continue
        yield g, sd[k]
    for i in range(cfg.n_layer):
        for g, k in GGUF_TO_KEENLM.items():
            g, k = g.format(i=i), k.format(i=i)
            heads = _qk_heads(g, cfg)
            yield g, permute_qk(sd[k], heads) if heads else sd[k]


def _exact_q4_1(net) -> dict[str, np.ndarray]:
    """gguf name -> Q4_1 bytes for every block projection held as 4-bit codes in groups of 32."""
    cfg, out = net.cfg, {}
    for i in range(cfg.n_layer):
        for g, k in GGUF_TO_KEENLM.items():
            g, k = g.format(i=i), k.format(i=i)
            if g.endswith("_norm.weight"):
                continue
            blocks = _q4_1_exact(net, g, k, _qk_heads(g, cfg))
            if blocks is not None:
                out[g] = blocks
    return out


def export_gguf(net, tokenizer, path, qtype: str = "f32") -> Path:
    """Write ``net`` + ``tokenizer`` as a GGUF file of weight type f32 | f16 | q8_0, or
    tq1_0 | tq2_0 for ternary models. Low-bit models are written with their quantized weights."""
    from gguf import GGMLQuantizationType, LlamaFileType  # optional extra: keenlm[io]

    if qtype not in QTYPES:
        raise ValueError(f"GGUF export type {qtype!r} is not supported ({' | '.join(QTYPES)})")
    if lora_layers(net):
        raise ValueError("a GGUF file holds one set of weights: write the base and the LoRA "
                         "adapters apart (export_gguf_lora) or merge them first")
    cfg = net.cfg
    if cfg.memory.kind != "none" or cfg.attn_window:
        raise ValueError("model.memory and model.attn_window have no counterpart in GGUF's Llama")
    if cfg.spike.steps:
        raise ValueError("a spiking model (model.spike) has no counterpart in GGUF's Llama; "
                         "export its spiking layers to NIR (keenlm spike --nir)")
    if cfg.ffn != "dense":
        raise ValueError(f"only Llama models with a dense SwiGLU export to GGUF here (ffn={cfg.ffn})")
    if qtype in TERNARY_QTYPES and not is_ternary(net):
        raise ValueError(f"{qtype} holds ternary weights: export a model trained with "
                         f"model.linear=ternary or quantized with --bits 1.58")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
                 "q4_1": LlamaFileType.MOSTLY_Q4_1, "tq1_0": LlamaFileType.MOSTLY_TQ1_0,
                 "tq2_0": LlamaFileType.MOSTLY_TQ2_0}[qtype]
    exact = _exact_q4_1(net) if qtype == "q4_1" else {}

    def fill(w):
        _add_metadata(w, net, tokenizer, int(file_type))
        for name, arr in _tensors(net):
            if name in exact:  # the stored 4-bit codes, not re-rounded
                data, raw_dtype = exact[name], GGMLQuantizationType.Q4_1
            else:
                data, raw_dtype = _encode_tensor(name, arr, qtype)
            w.add_tensor(name, data, raw_dtype=raw_dtype)  # quantized: shape from the bytes
    return _write_gguf(path, fill)


def _write_gguf(path: Path, fill) -> Path:
    """A GGUF file written beside ``path`` by ``fill(writer)`` and renamed into place: an
    interrupted export leaves nothing under the final name."""
    from gguf import GGUFWriter  # optional extra: keenlm[io]

    runs.clear_stale(path)  # left by an export that was killed
    tmp = runs.temp_sibling(path)
    try:
        w = GGUFWriter(tmp, "llama")
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def adapter_path(path) -> Path:
    """Where export_gguf_lora writes the adapters of a base written to ``path``."""
    path = Path(path)
    return path.with_name(path.name[:-5] + ".lora.gguf" if path.name.endswith(".gguf")
                          else path.name + ".lora.gguf")


def without_adapters(net):
    """A copy of ``net`` with every LoRA wrapper replaced by its frozen base."""
    base = copy.deepcopy(net)
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.base_layer)
    base.cfg = dataclasses.replace(net.cfg, lora=type(net.cfg.lora)())
    return base


def _adapter_tensors(net):
    """(gguf name, fp32 array) of every adapter: ``NAME.lora_a`` (rank, in), ``NAME.lora_b``
    (out, rank), q/k rows of B permuted to llama.cpp's RoPE order as the base's are."""
    cfg = net.cfg
    to_gguf = {k.format(i=i)[:-len(".weight")]: g.format(i=i)
               for i in range(cfg.n_layer) for g, k in GGUF_TO_KEENLM.items()}
    for name, m in lora_layers(net).items():
        g = to_gguf[name]
        a = m.lora_A.weight.detach().float().cpu().numpy()
        b = m.lora_B.weight.detach().float().cpu().numpy()
        heads = _qk_heads(g, cfg)
        yield g + ".lora_a", a
        yield g + ".lora_b", permute_qk(b, heads) if heads else b


def export_gguf_lora(net, tokenizer, path, qtype: str = "f32") -> tuple[Path, Path]:
    """A model with LoRA adapters as two llama.cpp files: its base at ``path`` (as
    ``export_gguf`` writes it; a Q4 base as its blocks) and its adapters at
    ``adapter_path(path)`` in llama.cpp's LoRA GGUF (F32). One rank and alpha for all layers
    (keenlm's ``model.lora``); llama.cpp scales the update by alpha / rank, as keenlm does."""
    from gguf import Keys  # optional extra: keenlm[io]

    if not lora_layers(net):
        raise ValueError("the model has no LoRA adapters: export_gguf writes it")
    base = export_gguf(without_adapters(net), tokenizer, path, qtype)

    def fill(w):
        w.add_type("adapter")
        w.add_name("keenlm LoRA")
        w.add_string(Keys.Adapter.TYPE, "lora")
        w.add_float32(Keys.Adapter.LORA_ALPHA, float(net.cfg.lora.scale_alpha))
        for name, arr in _adapter_tensors(net):
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    return base, _write_gguf(adapter_path(path), fill)
