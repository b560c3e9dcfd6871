"""The model's config (``model.*``) and the parts nested in it: mixture of experts, neural
memory, spiking execution (keenlm.spiking.config) and low-bit linears (keenlm.quant.config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from keenlm.config.base import check
from keenlm.quant.config import LowBitConfig
from keenlm.spiking.config import SpikeConfig

# Names of registered variants, checked at load. The registries themselves live beside the
# code that implements them; tests assert the two lists agree.
ATTENTION_BACKENDS = ("naive", "sdpa", "flash", "flash_triton", "auto")
LINEAR_KINDS = ("dense", "ternary", "int2", "int4")
FFN_KINDS = ("dense", "moe")
MOE_BALANCE = ("aux", "bias", "none")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts (``model.ffn: moe``, keenlm.model.moe): each token goes to the
    ``top_k`` of ``experts`` SwiGLU experts its router scores highest."""

    experts: int = 8  # routed experts E
    top_k: int = 2  # experts per token k
    shared: int = 0  # shared experts every token also passes through (DeepSeekMoE)
    d_ff: int = 0  # SwiGLU width of each expert; 0: model.d_ff / top_k (active width = the dense model's)
    capacity_factor: float = 0.0  # 0: dropless; else, in training, an expert takes at most ceil(cf * k * tokens / E) assignments, the rest are dropped (the residual carries those tokens)
    balance: str = "aux"  # aux (Switch load-balancing loss) | bias (auxiliary-loss-free, DeepSeek-V3) | none
    aux_coef: float = 0.01  # alpha of the Switch loss E * sum_e f_e P_e
    z_coef: float = 0.001  # router z-loss mean(logsumexp(logits)^2) (ST-MoE); 0: off
    bias_rate: float = 0.003  # bias balancing: step of each expert's selection bias per optimizer step (DeepSeek-V3: 0.001 over millions of steps; 0.003 balanced a 488-step run by its first quarter, keenlm study moe)

    def __post_init__(self):
        p = "model.moe."
        check(self.experts >= 2, p + "experts", self.experts, "an integer >= 2")
        check(1 <= self.top_k <= self.experts, p + "top_k", self.top_k,
              f"an integer in [1, experts={self.experts}]")
        for name in ("shared", "d_ff"):
            v = getattr(self, name)
            check(v >= 0, p + name, v, "an integer >= 0")
        check(self.capacity_factor == 0 or self.capacity_factor > 0, p + "capacity_factor",
              self.capacity_factor, "0 (dropless) or a number > 0")
        check(self.balance in MOE_BALANCE, p + "balance", self.balance, " | ".join(MOE_BALANCE))
        for name in ("aux_coef", "z_coef", "bias_rate"):
            v = getattr(self, name)
            check(v >= 0, p + name, v, "a number >= 0")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_BASES = ("model", "q4")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (``model.lora``, keenlm.model.lora): the named linear layers get a
    trainable update s * B A of rank ``rank`` and everything else is frozen. Part of the model
    (a run folder rebuilds its adapters); ``keenlm rl`` spells the fields ``--lora-rank`` etc."""

    flat_prefix = "lora_"  # flat command lines (keenlm rl): --lora-rank, --lora-alpha, ...

    rank: int = 0  # adapter rank r; 0: no adapters (full fine-tuning)
    alpha: float = 0.0  # the update is scaled by alpha / rank; 0: 2 x rank
    dropout: float = 0.0  # dropout on the adapters' input in training
    targets: tuple[str, ...] = LORA_TARGETS  # module names that get adapters (Hugging Face Llama names)
    # "q4": QLoRA, the base held in Q4_1 blocks of 32 (a Q4_1 GGUF's own 4-bit weights, read
    # losslessly), so the adapters train against the weights that will be served
    base: str = "model"  # the frozen base: model (its own linear layers) | q4 (QLoRA)

    def __post_init__(self):
        p = "model.lora."
        check(self.rank >= 0, p + "rank", self.rank, "an integer >= 0 (0 = off)")
        check(self.alpha >= 0, p + "alpha", self.alpha, "a number >= 0 (0 = 2 x rank)")
        check(0 <= self.dropout < 1, p + "dropout", self.dropout, "a number in [0, 1)")
        check(bool(self.targets) and all(t in LORA_TARGETS for t in self.targets), p + "targets",
              self.targets, "a comma list of " + ", ".join(LORA_TARGETS))
        check(self.base in LORA_BASES, p + "base", self.base, " | ".join(LORA_BASES))

    @property
    def scale_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank


MEMORY_KINDS = ("none", "mal", "mag")


@dataclass(frozen=True)
class MemoryConfig:
    """Neural long-term memory (``model.memory``, keenlm.model.memory): an MLP per head whose
    weights are written by gradient steps on an associative loss as the model reads."""

    kind: str = "none"  # none | mal (memory as a layer before attention) | mag (memory as a gated branch beside attention)
    heads: int = 0  # memory heads; 0: model.n_head
    head_dim: int = 0  # key/value width per head; 0: the model's head dim
    depth: int = 1  # 1: linear memory W k (stable: unit keys bound its step); 2: W2 silu(W1 k) (diverged on 256-token sequences here; see model/memory.py)
    expansion: int = 2  # hidden width of a depth-2 memory, in head dims
    chunk: int = 16  # tokens whose gradients are taken at one memory state (the parallel update)
    lr_max: float = 1.0  # the inner learning rate theta_t = lr_max * sigmoid(a linear function of x_t)
    gate: float = 0.0  # surprise gate: a token whose associative loss is below gate x its chunk's mean does not write (0: off)
    from_layer: int = 0  # layers from this index on get a memory (1: after one attention layer has mixed neighbours)

    def __post_init__(self):
        p = "model.memory."
        check(self.from_layer >= 0, p + "from_layer", self.from_layer, "an integer >= 0")
        check(self.kind in MEMORY_KINDS, p + "kind", self.kind, " | ".join(MEMORY_KINDS))
        for name in ("heads", "head_dim"):
            v = getattr(self, name)
            check(v >= 0, p + name, v, "an integer >= 0 (0 = from the model)")
        check(self.depth in (1, 2), p + "depth", self.depth, "1 | 2")
        for name in ("expansion", "chunk"):
            v = getattr(self, name)
            check(v >= 1, p + name, v, "an integer >= 1")
        check(self.lr_max > 0, p + "lr_max", self.lr_max, "a number > 0")
        check(self.gate >= 0, p + "gate", self.gate, "a number >= 0 (0 = off)")


MAX_CONTEXT = 1 << 20  # longest max_seq_len: a 1M-position rotary table at head dim 128 is 512 MB


@dataclass(frozen=True)
class ModelConfig:
    """Shape and parts of the Llama-family decoder. Zeros mean "derive" (see presets.resolve)."""

    vocab_size: int = 0  # 0: taken from the tokenizer
    n_layer: int = 4  # transformer blocks
    d_model: int = 256  # residual stream width
    n_head: int = 4  # query heads; head dim = d_model / n_head
    n_kv_head: int = 0  # 0: same as n_head (plain multi-head attention)
    d_ff: int = 0  # 0: SwiGLU width 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int = 512  # longest context (rotary table size, KV cache limit)
    rope_theta: float = 10000.0  # RoPE base; larger = longer wavelengths
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    init_std: float = 0.02  # normal init std; residual outputs get std/sqrt(2 n_layer)
    attention: str = "sdpa"  # naive | sdpa | flash (FlashAttention-2 in PyTorch) | flash_triton (CUDA) | auto
    linear: str = "dense"  # dense | ternary | int2 | int4 (quantization-aware, keenlm.quant.qat)
    ffn: str = "dense"  # dense | moe (mixture of experts: see model.moe.*)
    moe: MoEConfig = field(default_factory=MoEConfig)  # used when ffn is moe
    attn_window: int = 0  # sliding-window attention: a query sees the latest this many positions, itself included (0: all)
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # neural long-term memory (model.memory.*)
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # spiking feed-forward layers (model.spike.*)
    lowbit: LowBitConfig = field(default_factory=LowBitConfig)  # low-bit linears (model.lowbit.*)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # low-rank adapters (model.lora.*)

    def __post_init__(self):
        p = "model."
        for name in ("n_layer", "d_model", "n_head"):
            v = getattr(self, name)
            check(v >= 1, p + name, v, "an integer >= 1")
        # the rotary tables are sized by it before any weight is read
        check(1 <= self.max_seq_len <= MAX_CONTEXT, p + "max_seq_len", self.max_seq_len,
              f"an integer in [1, {MAX_CONTEXT}]")
        for name in ("vocab_size", "n_kv_head", "d_ff"):
            v = getattr(self, name)
            check(v >= 0, p + name, v, "an integer >= 0 (0 = derive)")
        check(self.d_model % self.n_head == 0, p + "d_model", self.d_model,
              f"a multiple of model.n_head={self.n_head}")
        check((self.d_model // self.n_head) % 2 == 0, p + "d_model", self.d_model,
              "d_model / n_head must be even (RoPE rotates pairs of dimensions)")
        kv = self.n_kv_head or self.n_head
        check(self.n_head % kv == 0, p + "n_kv_head", self.n_kv_head,
              f"a divisor of model.n_head={self.n_head}")
        check(self.rope_theta > 0, p + "rope_theta", self.rope_theta, "a number > 0")
        check(0 < self.norm_eps < 1, p + "norm_eps", self.norm_eps, "a number in (0, 1)")
        check(self.init_std > 0, p + "init_std", self.init_std, "a number > 0")
        check(self.attention in ATTENTION_BACKENDS, p + "attention", self.attention,
              " | ".join(ATTENTION_BACKENDS))
        check(self.linear in LINEAR_KINDS, p + "linear", self.linear, " | ".join(LINEAR_KINDS))
        check(self.ffn in FFN_KINDS, p + "ffn", self.ffn, " | ".join(FFN_KINDS))
        check(self.attn_window >= 0, p + "attn_window", self.attn_window, "an integer >= 0 (0 = all)")
        if self.spike.steps:
            check(self.ffn == "dense", p + "ffn", self.ffn, "dense with model.spike.steps > 0 "
                  "(spiking execution covers the SwiGLU feed-forward layer)")
            check(self.linear == "dense", p + "linear", self.linear, "dense with "
                  "model.spike.steps > 0 (the spiking layers accumulate full-precision weights)")
        if self.linear == "int4":
            widths = [self.d_model] + ([self.d_ff] if self.d_ff else [])
            check(all(w % self.lowbit.group == 0 for w in widths), p + "lowbit.group",
                  self.lowbit.group, f"a divisor of d_model={self.d_model} and d_ff={self.d_ff}")

    @property
    def ffn_kind(self) -> str:
        """The FFN registry entry a block is built with: ``spiking`` when model.spike.steps > 0
        (spiking execution of the dense SwiGLU, keenlm.spiking), else ``ffn``."""
        return "spiking" if self.spike.steps else self.ffn

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head


