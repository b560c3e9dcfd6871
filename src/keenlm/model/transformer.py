"""The keenlm decoder: one Llama-family model whose parts come from registries.

    tokens -> embed -> [x + attn(norm(x)); x + ffn(norm(x))] * n_layer -> norm -> lm_head

Llama (Touvron et al. 2023, https://arxiv.org/abs/2302.13971): pre-norm RMSNorm, rotary
positions, SwiGLU, no biases; grouped-query attention; tied or untied embeddings. Parameter
names follow Hugging Face's ``LlamaForCausalLM`` (minus its ``model.`` prefix), so checkpoints
map one to one.

The attention backend, the linear-layer factory and the feed-forward factory are looked up once
here, from ``ATTENTION``, ``LINEAR`` and ``FFN``; the forward pass has no string dispatch.
Registries are plain dicts of same-signature constructors, resolved once at build time:

    LINEAR[kind](in_features, out_features, cfg) -> nn.Module   (no bias, as in Llama)
    FFN[kind](cfg, linear) -> nn.Module                        (maps (B, T, C) -> (B, T, C))

A technique adds an entry (low-bit linears: keenlm.quant.qat; mixture of experts:
keenlm.model.moe; spiking execution: keenlm.spiking.ffn); the model never changes. Parts that
need an initialization of their own define ``reset_own_parameters``, called after the generic
one.

Legend: B batch, T positions in this call, S positions visible (cache + new), C width, V vocab.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from keenlm.config import ModelConfig
from keenlm.model.attention import ATTENTION, Attention, KVCache
from keenlm.model.layers import RMSNorm, SwiGLU, dense_linear, rope_tables
from keenlm.model.lora import apply_lora
from keenlm.model.memory import NeuralMemory
from keenlm.model.moe import MoE
from keenlm.quant.qat import qat_linear_factory
from keenlm.spiking.ffn import SpikingFFN

LINEAR: dict[str, Callable[..., nn.Module]] = {
    "dense": dense_linear,
    "ternary": qat_linear_factory("ternary"),  # BitNet b1.58 absmean, quantization-aware
    "int2": qat_linear_factory("int2"),
    "int4": qat_linear_factory("int4"),
}

FFN: dict[str, Callable] = {
    "dense": SwiGLU,
    "moe": MoE,  # mixture of experts (keenlm.model.moe)
    "spiking": SpikingFFN,  # spiking execution of the SwiGLU (keenlm.spiking), model.spike.steps > 0
}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, linear, backend, ffn, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, linear, backend, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = ffn(cfg, linear)
        kind = cfg.memory.kind if layer_idx >= cfg.memory.from_layer else "none"
        self.mix = {"none": self._attention, "mal": self._memory_layer,
                    "mag": self._memory_gated}[kind]  # resolved once, here
        if kind != "none":  # Titans-style neural memory (model/memory.py)
            self.memory = NeuralMemory(cfg)
            if kind == "mal":
                self.memory_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
            else:  # mag: a per-channel sigmoid gate between the attention and memory branches
                self.memory_gate = nn.Linear(cfg.d_model, cfg.d_model, bias=True)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = self.mix(x, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _attention(self, x, cos, sin, mask, cache):
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)

    @staticmethod
    def _no_cache(cache):
        if cache is not None:
            raise ValueError("generation with a KV cache does not carry model.memory's state "
                             "yet; score such models with full forward passes")

    def _memory_layer(self, x, cos, sin, mask, cache):
        """MAL: the memory reads and writes first, then attention."""
        self._no_cache(cache)
        x = x + self.memory(self.memory_layernorm(x))
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)

    def _memory_gated(self, x, cos, sin, mask, cache):
        """MAG: memory as a branch beside attention on the same input, mixed by a gate."""
        self._no_cache(cache)
        h = self.input_layernorm(x)
        g = torch.sigmoid(self.memory_gate(h))
        return x + g * self.self_attn(h, cos, sin, mask, cache) + (1 - g) * self.memory(h)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.d_ff <= 0:
            raise ValueError("model config is not resolved: vocab_size and d_ff must be set "
                             "(use keenlm.presets.resolve)")
        self.cfg = cfg
        linear = functools.partial(LINEAR[cfg.linear], cfg=cfg)
        backend, ffn = ATTENTION[cfg.attention], FFN[cfg.ffn]
        if cfg.spike.steps:  # spiking execution of the dense feed-forward (keenlm.spiking.ffn)
            ffn = SpikingFFN
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, linear, backend, ffn, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.reset_parameters()
        if cfg.lora.rank:  # low-rank adapters around the named linears, the rest frozen
            apply_lora(self, cfg.lora.rank, cfg.lora.scale_alpha, cfg.lora.dropout,
                       cfg.lora.targets, cfg.lora.base)

    @staticmethod
    def linear_factory(cfg: ModelConfig):
        """(in_features, out_features) -> the linear layer ``cfg.linear`` names."""
        return functools.partial(LINEAR[cfg.linear], cfg=cfg)

    def reset_buffers(self):
        """Recompute the rotary tables (derived state, never saved): after construction and
        after ``to_empty``, which leaves buffers uninitialized."""
        device = self.norm.weight.device
        cfg = self.cfg
        if device.type == "meta":  # placeholders: the loader calls this again on a real device
            self.rope_cos = torch.empty(cfg.max_seq_len, cfg.head_dim // 2, device=device)
            self.rope_sin = torch.empty(cfg.max_seq_len, cfg.head_dim // 2, device=device)
            return
        cos, sin = rope_tables(cfg.head_dim, torch.arange(cfg.max_seq_len, device=device),
                               cfg.rope_theta)
        self.rope_cos, self.rope_sin = cos, sin

    def tie_weights(self):
        """Share the embedding with the LM head (again: ``to_empty`` from meta unties them)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self):
        """Normal(0, init_std) weights; residual outputs scaled by 1/sqrt(2 n_layer) (GPT-2).
        A part with an initialization of its own (``reset_own_parameters`` for the parameters
        ``own_parameters`` names: a memory's starting state, low-bit step sizes) applies it
        where its first parameter comes in the model's order, so a seed draws the same
        numbers whichever parts initialize themselves."""
        std = self.cfg.init_std
        if self.embed_tokens.weight.is_meta:  # built on "meta" to be filled from a file
            return
        owner = {id(p): m for m in self.modules() if hasattr(m, "reset_own_parameters")
                 for p in m.own_parameters()}
        done = set()
        for name, p in self.named_parameters():
            m = owner.get(id(p))
            if m is not None:  # at its first parameter, so random draws keep the model's order
                if id(m) not in done:
                    m.reset_own_parameters()
                    done.add(id(m))
            elif name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / (2 * self.cfg.n_layer) ** 0.5)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():  # parts with no parameter of their own
            if hasattr(m, "reset_own_parameters") and id(m) not in done:
                m.reset_own_parameters()

    # ------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, *, cache: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                last_only: bool = False, hidden: bool = False) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V), or (B, 1, V) with ``last_only``.

        cache:     a KVCache to read and extend (generation).
        positions: (B, T) rotary positions per row (left-padded batches); default start..start+T.
        key_mask:  (B, S) bool, False for padding keys; S = cache length + T.
        hidden:    the final hidden states instead (what a fused loss reads); through
                   ``forward``, so hooks on the model (FSDP's) run around it.
        """
        x = self.hidden_states(idx, cache=cache, positions=positions, key_mask=key_mask)
        if hidden:
            return x
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def hidden_states(self, idx: torch.Tensor, *, cache: Optional[KVCache] = None,
                      positions: Optional[torch.Tensor] = None,
                      key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final normalized hidden states (B, T, C): what the LM head (or a fused loss) reads."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds model.max_seq_len "
                             f"{self.cfg.max_seq_len}")
        if positions is None:  # tables broadcast as (T, 1, D/2) against (B, T, H, D/2)
            cos, sin = self.rope_cos[start:start + T, None], self.rope_sin[start:start + T, None]
        else:
            assert positions.shape == (B, T), f"positions {tuple(positions.shape)} != {(B, T)}"
            cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]
        mask = self.build_mask(B, T, start, key_mask, idx.device, self.cfg.attn_window)
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance()
        return self.norm(x)

    @staticmethod
    def build_mask(B, T, start, key_mask, device, window: int = 0):
        """None for the plain causal square; else (B, 1, T, S) bool, True = may attend.
        ``window`` > 0: a query at position i sees keys i - window + 1 .. i only."""
        if start == 0 and key_mask is None and not window:
            return None
        S = start + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)
        if window:
            causal &= ~torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start - window)
        if key_mask is None:
            return causal.expand(B, 1, T, S)
        assert key_mask.shape == (B, S), f"key_mask {tuple(key_mask.shape)} != {(B, S)}"
        return causal[None, None] & key_mask[:, None, None, :].bool()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        """Cross-entropy in fp32. reduction 'none' gives (B, T) per-token losses for hooks."""
        V = logits.shape[-1]
        losses = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1),
                                 reduction=reduction)
        return losses.view(targets.shape) if reduction == "none" else losses

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses left by parts during the last forward (e.g. MoE load balance)."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.named_modules():
            pop = getattr(m, "pop_aux_losses", None)
            if pop is not None:
                for k, v in pop().items():
                    out[f"{name}.{k}" if name else k] = v
        return out

    def drop_unused_grads(self) -> None:
        """Gradients of parameters this step did not use, set to None (parts that report them:
        MoE experts no token chose), so the optimizer leaves them alone as it does in one
        process where they never get one."""
        for m in self.modules():
            if m is not self and hasattr(m, "unused_params"):
                for p in m.unused_params():
                    p.grad = None

    def end_step(self) -> dict:
        """Once per optimizer step: parts that keep per-step state (MoE routing statistics,
        bias balancing) report it and update; {} when there are none."""
        by_kind: dict[type, list[dict]] = {}
        for m in self.modules():
            if m is not self and hasattr(m, "end_step"):
                s = m.end_step()
                if s is not None:
                    by_kind.setdefault(type(m), []).append(s)
        out: dict = {}
        for kind, stats in by_kind.items():  # each kind of part summarizes its own layers
            out.update(kind.summarize(stats))
        return out

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.norm.weight  # a full-precision parameter in every variant (quantized ones too)
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return KVCache(self.cfg.n_layer, batch, self.cfg.kv_heads, max_len or self.cfg.max_seq_len,
                       self.cfg.head_dim, p.device, dtype)


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict ready for safetensors: contiguous CPU tensors, tied LM head omitted."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def check_state_shapes(model: Transformer, shapes: dict[str, tuple[int, ...]]) -> None:
    """The tensors a file holds (name -> shape) against the model, strictly: a missing,
    unexpected or mis-shaped tensor is an error naming it. Shapes only, so it works on a model
    built on "meta": a loader checks a file's tensors against its config before allocating."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, shape in shapes.items():
        if tuple(shape) != expected[k]:
            raise ValueError(f"checkpoint tensor {k} has shape {tuple(shape)}, "
                             f"model expects {expected[k]}")


def load_model_state(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """Load weights strictly (see check_state_shapes)."""
    check_state_shapes(model, {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state, strict=False)
