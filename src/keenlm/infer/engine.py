"""The decode engine: a whole decode step of a 4-bit (or ternary) model in C, for 1 to 16 rows.

A PyTorch decode step of SmolLM2-135M dispatches a few hundred small operations per token;
at batch 1 on a CPU that overhead, not reading the weights, set the speed (keenlm's int4 path
spent ~45% of a step in small torch ops). This engine runs the step of a model whose
projections are Q4 blocks (keenlm.quant.q4: ``keenlm.load(..., quant="q4")``, a GGUF read
as stored or a model converted by ``quantize_q4_model``) as one C function
(keenlm/infer/csrc/step.c):

    x = embed(tokens)                                    Q8_0 rows
    per layer: h = rmsnorm(x); qkv = Wqkv h              Q4 x int8 kernel (keenlm.quant.q4)
               rope(q, k); cache[t] = k, v               the model's KVCache, written in place
               a = softmax(q K^T / sqrt(D)) V            grouped-query, key mask per row
               x += Wo a; h = rmsnorm(x)
               x += Wdown (silu(Wgate h) * Wup h)
    logits = Whead rmsnorm(x)                            Q8_0 head

on the threads of keenlm's kernel pool, which meet at a spinning barrier between dependent
parts (llama.cpp's scheme). Prefill stays in PyTorch (a GEMM pays there); ``generate_tokens``
switches to the engine for the decode steps when the model allows it.

The reference is the PyTorch model with the same Q4 layers: the tests hold the step's logits
to it on random models (every kernel path, padded rows, grouped-query heads) and the greedy
tokens of SmolLM2 to it. The step rounds the activations to int8 blocks exactly as the Q4
layers do; softmax and SiLU use a polynomial exp (~1 ulp), so logits agree to float rounding,
not bit for bit. ``ENABLED = False`` forces the PyTorch step.

LoRA adapters over Q4 bases (a QLoRA model, keenlm.model.lora, loaded with quant="q4") run in
the step too: the bases of q/k/v and of gate/up are joined into one Q4 matrix each (their rows
concatenated: the same blocks), and each group adds B (A x) from fp32 adapters (step.c).

Models it refuses (a one-line reason from ``unsupported``; generation then uses PyTorch):
anything but dense SwiGLU blocks with Q4 projections (or ternary ones in TQ2_0 blocks,
keenlm.quant.tq2: each projection in its own format; adapters only over Q4), a Q8_0 embedding
and head, full causal attention (no window, no memory layer, no spiking), on the CPU.

Legend: B rows, L layers, Hk key/value heads, S cache length, D head dim, V vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch

from keenlm.model.attention import KVCache
from keenlm.model.lora import LoRALinear
from keenlm.quant.q4 import PATHS, Q4Linear, Q8Embedding, Q8Linear
from keenlm.quant.tq2 import T2Linear

try:  # built by pip at install beside keenlm.quant._qdot (setup.py); optional without a compiler
    from keenlm.infer import _step
except ImportError:  # pragma: no cover - the install builds it wherever gcc or clang exists
    _step = None

ENABLED = True  # False: generation decodes with the PyTorch model (comparisons, tests)
MAX_ROWS = 16
_said = set()


# a block's four projection groups: (submodule, fused slot, the projections it joins)
GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
          ("self_attn", "o_proj", ("o_proj",)),
          ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
          ("mlp", "down_proj", ("down_proj",)))


def groups(layer) -> list[tuple[list, list]]:
    """Per projection group of a block: (its base modules: one fused module, or one per
    projection; the LoRALinear of each projection, or None)."""
    out = []
    for sub, slot, parts in GROUPS:
        mod = getattr(layer, sub)
        fused = getattr(mod, slot, None)
        if len(parts) > 1 and fused is not None:
            out.append(([fused], [None] * len(parts)))
            continue
        mods = [getattr(mod, p) for p in parts]
        out.append(([m.base_layer if isinstance(m, LoRALinear) else m for m in mods],
                    [m if isinstance(m, LoRALinear) else None for m in mods]))
    return out


def unsupported(net) -> Optional[str]:
    """Why the engine cannot run ``net``'s decode step, or None when it can."""
    if _step is None:
        return "the C decode step is not built here (no C compiler at install)"
    cfg = getattr(net, "cfg", None)
    if cfg is None or not hasattr(net, "layers"):
        return "not a keenlm Transformer"
    if cfg.attn_window or cfg.memory.kind != "none" or cfg.spike.steps or cfg.ffn != "dense":
        return "attention window, memory layers, spiking and MoE blocks decode in PyTorch"
    if not isinstance(net.embed_tokens, Q8Embedding) or not isinstance(net.lm_head, Q8Linear):
        return "the embedding and LM head are not Q8_0 blocks (keenlm.quant.q4)"
    for i, layer in enumerate(net.layers):
        for bases, adapters in groups(layer):
            if not all(isinstance(b, (Q4Linear, T2Linear)) for b in bases) or (
                    len(bases) > 1 or any(adapters)) and not all(isinstance(b, Q4Linear)
                                                                 for b in bases):
                return (f"layer {i}'s projections are not all Q4 or TQ2_0 blocks (keenlm.quant; "
                        "LoRA adapters only over Q4 blocks)")
            if any(a is not None and a.rank != cfg.lora.rank for a in adapters):
                return f"layer {i}'s LoRA adapters differ in rank from model.lora.rank"
    if net.norm.weight.device.type != "cpu":
        return "the engine runs on the CPU"
    return None


class DecodeEngine:
    """The C decode step of one Q4 model (see the module docstring). Holds the model's tensors
    (the C side keeps only their addresses)."""

    def __init__(self, net, path: str = "auto"):
        reason = unsupported(net)
        if reason:
            raise ValueError(f"the decode engine cannot run this model: {reason}")
        cfg = net.cfg
        self.cfg, self.path = cfg, PATHS[path]
        keep: list[torch.Tensor] = []

        def add(t: torch.Tensor, dtype, shape) -> None:
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"decode engine: a tensor {t.dtype} {tuple(t.shape)} where "
                                 f"{dtype} {tuple(shape)} was expected")
            keep.append(t.contiguous())

        C, H, Hk, D, F = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.d_ff
        kinds = []  # each projection's format: 0 Q4, 2 TQ2_0 (keenlm/quant/csrc/qdot.h)
        r = cfg.lora.rank if any(isinstance(x, LoRALinear) for x in net.modules()) else 0
        lora: list[torch.Tensor] = []  # per layer: A and scaled B of each group (step.c)
        for layer in net.layers:
            shapes = (((H + 2 * Hk) * D, C), (C, H * D), (2 * F, C), (C, F))
            for (bases, adapters), (n, k) in zip(groups(layer), shapes):
                if r:
                    lora += self.adapters(adapters, bases, r, k)
                lin = bases[0]
                if len(bases) > 1:  # joined rows of Q4 blocks: the same blocks, one matrix
                    lin = Q4Linear(torch.cat([b.qs for b in bases]), torch.cat([b.d for b in bases]),
                                   torch.cat([b.m for b in bases]))
                if isinstance(lin, T2Linear):
                    add(lin.qs, torch.uint8, (n, k // 4))
                    add(lin.d, torch.float16, (n, k // 256))
                    keep.append(torch.empty(0))  # no offsets: a null pointer
                    kinds.append(2)
                    continue
                add(lin.qs, torch.uint8, (n, k // 2))
                add(lin.d, torch.float16, (n, k // 32))
                add(lin.m, torch.float16, (n, k // 32))
                kinds.append(0)
            add(layer.input_layernorm.weight.detach(), torch.float32, (C,))
            add(layer.post_attention_layernorm.weight.detach(), torch.float32, (C,))
        V = cfg.vocab_size
        add(net.embed_tokens.q8, torch.int8, (V, C))
        add(net.embed_tokens.d, torch.float16, (V, C // 32))
        add(net.lm_head.q8, torch.int8, (V, C))
        add(net.lm_head.d, torch.float16, (V, C // 32))
        add(net.norm.weight.detach(), torch.float32, (C,))
        add(net.rope_cos, torch.float32, (cfg.max_seq_len, D // 2))
        add(net.rope_sin, torch.float32, (cfg.max_seq_len, D // 2))
        keep += lora
        self._keep = keep
        self._ptrs = torch.tensor([t.data_ptr() if t.numel() else 0 for t in keep],
                                  dtype=torch.int64)
        self._kinds = torch.tensor(kinds, dtype=torch.int32)
        self._model = _step.new_model(self._ptrs.data_ptr(), len(keep), self._kinds.data_ptr(),
                                      cfg.n_layer, C, H, Hk, D, F, V, cfg.max_seq_len,
                                      float(cfg.norm_eps), r)

    @staticmethod
    def adapters(adapters, bases, r: int, k: int) -> list[torch.Tensor]:
        """A (rank x projections, k) and B scaled by alpha / rank (rows, rank) of one group,
        fp32; a projection without adapters contributes zeros."""
        if not any(adapters):  # (a fused base never has adapters)
            return [torch.zeros(r * len(adapters), k), torch.zeros(sum(b.out_features for b in bases), r)]
        A, B = [], []
        for a, b in zip(adapters, bases):
            if a is None:
                A.append(torch.zeros(r, k))
                B.append(torch.zeros(b.out_features, r))
            else:
                A.append(a.lora_A.weight.detach().float())
                B.append(a.lora_B.weight.detach().float() * a.scaling)
        return [torch.cat(A).contiguous(), torch.cat(B).contiguous()]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             key_mask: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """Logits (B, V) of the next token after ``tokens`` (B,) at rotary ``positions`` (B,);
        writes their keys and values at ``cache.length`` and advances it. ``key_mask`` (B, W)
        bool, W > cache.length: the cache positions each row may attend to (its own is one)."""
        B = tokens.shape[0]
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.length + 1} positions > max_len {cache.max_len}")
        lengths = torch.full((B,), cache.length, dtype=torch.int64)
        logits = self.step_rows(tokens, positions, lengths, torch.arange(B), cache.k, cache.v,
                                key_mask, threads)
        cache.extend(1)
        return logits

    def step_rows(self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                  slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """The step for rows at different lengths (continuous batching): row b writes cache row
        ``slots[b]`` of ``k``, ``v`` (L, R, Hk, S, D) at position ``lengths[b]`` and attends to
        its positions up to there that ``key_mask[b]`` allows. Returns logits (B, V)."""
        cfg, B = self.cfg, tokens.shape[0]
        L, Hk, D = cfg.n_layer, cfg.kv_heads, cfg.head_dim
        for t in (k, v):
            if (t.dtype != torch.float32 or t.dim() != 5 or tuple(t.shape[::2]) != (L, Hk, D)
                    or t.shape != k.shape or not t.is_contiguous()):
                raise ValueError(f"decode engine: cache {t.dtype} {tuple(t.shape)}, expected "
                                 f"float32 ({L}, rows, {Hk}, positions, {D}), contiguous")
        if not 1 <= B <= MAX_ROWS:
            raise ValueError(f"decode engine: {B} rows (1..{MAX_ROWS})")
        for name, t in (("positions", positions), ("lengths", lengths), ("slots", slots)):
            if t.shape != (B,):
                raise ValueError(f"decode engine: {name} {tuple(t.shape)}, expected ({B},)")
        if key_mask.dtype != torch.bool or key_mask.dim() != 2 or key_mask.shape[0] != B:
            raise ValueError(f"decode engine: key mask {key_mask.dtype} "
                             f"{tuple(key_mask.shape)}, expected bool ({B}, width)")
        if int(lengths.max()) >= k.shape[3]:
            raise ValueError(f"KV cache full: {int(lengths.max()) + 1} positions > max_len "
                             f"{k.shape[3]}")
        ints = [t.to(torch.int64).contiguous() for t in (tokens, positions, lengths, slots)]
        mask = key_mask.contiguous().view(torch.uint8)
        logits = torch.empty(B, cfg.vocab_size, dtype=torch.float32)
        _step.step(self._model, *(t.data_ptr() for t in ints), mask.data_ptr(), mask.shape[1], B,
                   k.data_ptr(), v.data_ptr(), k.shape[1], k.shape[3], logits.data_ptr(),
                   threads, self.path)
        return logits


def decode_engine(net, rows: int) -> Optional[DecodeEngine]:
    """The engine for ``net`` decoding ``rows`` rows, or None (PyTorch decodes): switched off,
    more rows than the step takes, or a model it does not run -- said once when the model has
    Q4 layers, since a user who asked for q4 expects the engine."""
    if not ENABLED or rows > MAX_ROWS:
        return None
    reason = unsupported(net)
    if reason is None:
        return DecodeEngine(net)
    if reason not in _said and any(isinstance(m, Q4Linear) for m in net.modules()):
        _said.add(reason)
        print(f"keenlm: decoding in PyTorch, not the C engine: {reason}")
    return None
