"""Run configuration: small frozen dataclasses, validated where they are made.

A run is described by one ``RunConfig`` holding four parts (``model``, ``data``, ``train``,
``generate``). Every field can come from a preset, a YAML/JSON file, or the command line as
``--model.n_layer 4``; they are merged in that order. A bad value fails here, at load time,
with the dotted key, the value and what is allowed -- never deep inside a forward pass.

Derived values (feed-forward width, learning rate, ...) are left at 0 in the config and
filled in by one visible function, ``keenlm.presets.resolve``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}': got {value!r}; allowed: {allowed}")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


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
        _check(self.experts >= 2, p + "experts", self.experts, "an integer >= 2")
        _check(1 <= self.top_k <= self.experts, p + "top_k", self.top_k,
               f"an integer in [1, experts={self.experts}]")
        for name in ("shared", "d_ff"):
            v = getattr(self, name)
            _check(v >= 0, p + name, v, "an integer >= 0")
        _check(self.capacity_factor == 0 or self.capacity_factor > 0, p + "capacity_factor",
               self.capacity_factor, "0 (dropless) or a number > 0")
        _check(self.balance in MOE_BALANCE, p + "balance", self.balance, " | ".join(MOE_BALANCE))
        for name in ("aux_coef", "z_coef", "bias_rate"):
            v = getattr(self, name)
            _check(v >= 0, p + name, v, "a number >= 0")


SPIKE_RESETS = ("subtract", "zero")


@dataclass(frozen=True)
class SpikeConfig:
    """Spiking execution of the feed-forward layers (``model.spike``, keenlm.model.spiking):
    each SwiGLU's input and hidden activation travel as spikes of integrate-and-fire neurons
    over ``steps`` time steps; the projections only accumulate the weights of spiking inputs."""

    steps: int = 0  # time steps T per token; 0: off (an ordinary model)
    beta: float = 1.0  # membrane leak per step: 1.0 = integrate-and-fire (best for rate coding), < 1 leaky
    reset: str = "subtract"  # subtract (keeps the overshoot: rate error <= 1/T) | zero (the NIR / snnTorch neuron)
    round: bool = True  # each step adds 1/(2T) of the threshold: T steps give round(T x), not floor(T x)
    percentile: float = 99.9  # threshold balancing: each channel's scale is this percentile of |activation| on calibration data
    slope: float = 25.0  # surrogate gradient 1 / (1 + slope |v - threshold|)^2 for spiking fine-tuning
    calibrate: int = 8  # converting a dense model (train.init_from): training batches for threshold balancing

    def __post_init__(self):
        p = "model.spike."
        _check(self.steps >= 0, p + "steps", self.steps, "an integer >= 0 (0 = off)")
        _check(0.0 < self.beta <= 1.0, p + "beta", self.beta, "a number in (0, 1]")
        _check(self.reset in SPIKE_RESETS, p + "reset", self.reset, " | ".join(SPIKE_RESETS))
        _check(0.0 < self.percentile <= 100.0, p + "percentile", self.percentile,
               "a number in (0, 100]")
        _check(self.slope > 0, p + "slope", self.slope, "a number > 0")
        _check(self.calibrate >= 1, p + "calibrate", self.calibrate, "an integer >= 1")


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
        _check(self.from_layer >= 0, p + "from_layer", self.from_layer, "an integer >= 0")
        _check(self.kind in MEMORY_KINDS, p + "kind", self.kind, " | ".join(MEMORY_KINDS))
        for name in ("heads", "head_dim"):
            v = getattr(self, name)
            _check(v >= 0, p + name, v, "an integer >= 0 (0 = from the model)")
        _check(self.depth in (1, 2), p + "depth", self.depth, "1 | 2")
        for name in ("expansion", "chunk"):
            v = getattr(self, name)
            _check(v >= 1, p + name, v, "an integer >= 1")
        _check(self.lr_max > 0, p + "lr_max", self.lr_max, "a number > 0")
        _check(self.gate >= 0, p + "gate", self.gate, "a number >= 0 (0 = off)")


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
    linear: str = "dense"  # dense | ternary | int2 | int4 (quantization-aware, model/lowbit.py)
    ffn: str = "dense"  # dense | moe (mixture of experts: see model.moe.*)
    moe: MoEConfig = field(default_factory=MoEConfig)  # used when ffn is moe
    attn_window: int = 0  # sliding-window attention: a query sees the latest this many positions, itself included (0: all)
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # neural long-term memory (model.memory.*)
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # spiking feed-forward layers (model.spike.*)
    lowbit_group: int = 32  # int4: weights per scale group along the input dimension
    lowbit_per_channel: bool = False  # ternary: one absmean scale per output row, not per tensor
    act_bits: int = 0  # 0: full-precision activations; 8: per-token absmax int8 (W1.58A8)

    def __post_init__(self):
        p = "model."
        for name in ("n_layer", "d_model", "n_head", "max_seq_len"):
            v = getattr(self, name)
            _check(v >= 1, p + name, v, "an integer >= 1")
        for name in ("vocab_size", "n_kv_head", "d_ff"):
            v = getattr(self, name)
            _check(v >= 0, p + name, v, "an integer >= 0 (0 = derive)")
        _check(self.d_model % self.n_head == 0, p + "d_model", self.d_model,
               f"a multiple of model.n_head={self.n_head}")
        _check((self.d_model // self.n_head) % 2 == 0, p + "d_model", self.d_model,
               "d_model / n_head must be even (RoPE rotates pairs of dimensions)")
        kv = self.n_kv_head or self.n_head
        _check(self.n_head % kv == 0, p + "n_kv_head", self.n_kv_head,
               f"a divisor of model.n_head={self.n_head}")
        _check(self.rope_theta > 0, p + "rope_theta", self.rope_theta, "a number > 0")
        _check(0 < self.norm_eps < 1, p + "norm_eps", self.norm_eps, "a number in (0, 1)")
        _check(self.init_std > 0, p + "init_std", self.init_std, "a number > 0")
        _check(self.attention in ATTENTION_BACKENDS, p + "attention", self.attention,
               " | ".join(ATTENTION_BACKENDS))
        _check(self.linear in LINEAR_KINDS, p + "linear", self.linear, " | ".join(LINEAR_KINDS))
        _check(self.ffn in FFN_KINDS, p + "ffn", self.ffn, " | ".join(FFN_KINDS))
        _check(self.act_bits in (0, 8), p + "act_bits", self.act_bits, "0 | 8")
        _check(self.attn_window >= 0, p + "attn_window", self.attn_window, "an integer >= 0 (0 = all)")
        _check(self.lowbit_group >= 1, p + "lowbit_group", self.lowbit_group, "an integer >= 1")
        if self.spike.steps:
            _check(self.ffn == "dense", p + "ffn", self.ffn, "dense with model.spike.steps > 0 "
                   "(spiking execution covers the SwiGLU feed-forward layer)")
            _check(self.linear == "dense", p + "linear", self.linear, "dense with "
                   "model.spike.steps > 0 (the spiking layers accumulate full-precision weights)")
        if self.linear == "int4":
            widths = [self.d_model] + ([self.d_ff] if self.d_ff else [])
            _check(all(w % self.lowbit_group == 0 for w in widths), p + "lowbit_group",
                   self.lowbit_group, f"a divisor of d_model={self.d_model} and d_ff={self.d_ff}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes tokens."""

    corpus: str = "stdlib"  # stdlib | a .txt/.py/... file | a folder | a .jsonl file | hf:NAME[:CONFIG]
    tokenizer: str = "bpe"  # byte | bpe | PATH to a folder holding tokenizer.json
    vocab_size: int = 4096  # BPE vocabulary size (ignored for byte)
    tokenizer_train_bytes: int = 8_000_000  # how much training text the BPE trainer reads
    val_fraction: float = 0.02  # share of documents (files) held out, chosen by path hash
    max_bytes: int = 0  # 0: whole corpus; else stop reading after this many bytes
    train_tokens: int = 0  # 0: whole training split; else only its first N tokens (a fixed set of unique data that a longer run repeats, epoch after epoch)
    jsonl_field: str = "text"  # field holding the text in .jsonl / HF datasets
    hf_split: str = "train"  # split of a hf: dataset to read
    cache_dir: str = ""  # "": $KEENLM_CACHE or ~/.cache/keenlm

    def __post_init__(self):
        p = "data."
        _check(bool(self.corpus), p + "corpus", self.corpus, "stdlib, a path, or hf:NAME")
        _check(256 + 1 <= self.vocab_size <= 1_000_000, p + "vocab_size", self.vocab_size,
               "an integer in [257, 1000000]")
        _check(self.tokenizer_train_bytes >= 1000, p + "tokenizer_train_bytes",
               self.tokenizer_train_bytes, "an integer >= 1000")
        _check(0.0 < self.val_fraction < 0.5, p + "val_fraction", self.val_fraction,
               "a number in (0, 0.5)")
        _check(self.max_bytes >= 0, p + "max_bytes", self.max_bytes, "an integer >= 0")
        _check(self.train_tokens >= 0, p + "train_tokens", self.train_tokens,
               "an integer >= 0 (0 = the whole training split)")


SELECT_METHODS = ("none", "loss", "prob", "excess")


@dataclass(frozen=True)
class SelectConfig:
    """Selective backprop (``train.select``, keenlm.train.surprise): train only on the most
    surprising part of each batch."""

    method: str = "none"  # none | loss (highest loss) | prob (Selective-Backprop: kept with probability percentile^beta) | excess (Rho-1: loss minus a reference model's)
    unit: str = "sequence"  # sequence (unchosen rows leave the backward pass: it gets cheaper) | token (a loss mask; every row still runs backward)
    keep: float = 0.5  # share of the batch's sequences (tokens) trained on
    ramp: float = 0.0  # share of the steps over which keep falls from 1.0 to keep (0: keep from the start)
    reference: str = ""  # excess: the reference model's run folder (same tokenizer)

    def __post_init__(self):
        p = "train.select."
        _check(self.method in SELECT_METHODS, p + "method", self.method, " | ".join(SELECT_METHODS))
        _check(self.unit in ("sequence", "token"), p + "unit", self.unit, "sequence | token")
        _check(0 < self.keep <= 1, p + "keep", self.keep, "a number in (0, 1]")
        _check(0 <= self.ramp <= 1, p + "ramp", self.ramp, "a number in [0, 1]")
        _check(self.method != "excess" or bool(self.reference), p + "reference", self.reference,
               "a run folder (method excess scores against a reference model)")


@dataclass(frozen=True)
class TrainConfig:
    """The optimization loop."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | muon
    lr: float = 0.0  # 0: from the size preset (presets.default_lr)
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    warmup_steps: int = 0  # 0: 2% of steps, at least 1
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: final share of steps spent decaying
    weight_decay: float = 0.1  # decoupled, on matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # 0: off
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 where the GPU/CPU multiplies bf16 natively)
    compile: bool = False  # torch.compile the model (first steps slower)
    loss_kernel: str = "fused"  # fused (chunked LM head + cross-entropy) | reference
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # 0: torch default
    seed: int = 1337  # model init and batch order
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 20  # validation batches per evaluation
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl lines
    time_budget_s: float = 0.0  # >0: stop (and save) once this much wall time has passed
    progress: bool = True  # live progress bar (plain lines when not a terminal)
    out_dir: str = "runs/latest"  # run folder
    resume: bool = True  # continue from out_dir's latest checkpoint when it exists
    init_from: str = ""  # start from this model (run folder, .gguf, HF folder): its shape and tokenizer; model.linear etc. still apply
    qat_start: float = 0.0  # low-bit linears: train in full precision until this fraction of the steps, then quantization-aware
    select: SelectConfig = field(default_factory=SelectConfig)  # selective backprop (train.select.*)

    def __post_init__(self):
        p = "train."
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches",
                     "keep_checkpoints", "log_every"):
            v = getattr(self, name)
            _check(v >= 1, p + name, v, "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "save_every", "threads"):
            v = getattr(self, name)
            _check(v >= 0, p + name, v, "an integer >= 0")
        _check(self.optimizer in ("adamw", "muon"), p + "optimizer", self.optimizer, "adamw | muon")
        _check(self.lr >= 0, p + "lr", self.lr, "a number >= 0 (0 = from the size preset)")
        _check(0 <= self.min_lr_ratio <= 1, p + "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(self.schedule in ("cosine", "wsd", "constant"), p + "schedule", self.schedule,
               "cosine | wsd | constant")
        _check(0 < self.decay_fraction <= 1, p + "decay_fraction", self.decay_fraction, "a number in (0, 1]")
        _check(self.weight_decay >= 0, p + "weight_decay", self.weight_decay, "a number >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check(0 <= v < 1, p + name, v, "a number in [0, 1)")
        _check(self.grad_clip >= 0, p + "grad_clip", self.grad_clip, "a number >= 0 (0 = off)")
        _check(self.loss_kernel in ("fused", "reference"), p + "loss_kernel", self.loss_kernel,
               "fused | reference")
        _check(self.dtype in ("fp32", "bf16", "auto"), p + "dtype", self.dtype, "fp32 | bf16 | auto")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               p + "device", self.device, "auto | cpu | cuda | cuda:N | mps")
        _check(self.time_budget_s >= 0, p + "time_budget_s", self.time_budget_s, "a number >= 0")
        _check(bool(self.out_dir), p + "out_dir", self.out_dir, "a folder path")
        _check(0.0 <= self.qat_start < 1.0, p + "qat_start", self.qat_start, "a number in [0, 1)")


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings. temperature 0 means greedy."""

    max_new_tokens: int = 128  # tokens to generate per prompt
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (CTRL-style: divide positive logits, multiply negative)
    stop: tuple[str, ...] = ()  # stop strings, comma-separated on the command line
    seed: int = 0  # sampling seed

    def __post_init__(self):
        p = "generate."
        _check(self.max_new_tokens >= 1, p + "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature >= 0, p + "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        _check(self.top_k >= 0, p + "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(0 < self.top_p <= 1, p + "top_p", self.top_p, "a number in (0, 1]")
        _check(self.repetition_penalty > 0, p + "repetition_penalty", self.repetition_penalty,
               "a number > 0 (1 = off)")
        _check(all(isinstance(s, str) and s for s in self.stop), p + "stop", self.stop,
               "a list of non-empty strings")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    preset: str = ""  # name of the size preset it was made from, for the record


QUANT_BITS = ("1.58", "2", "3", "4")
QUANT_METHODS = ("rtn", "gptq", "qat")
STORE_KINDS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class QuantConfig:
    """``keenlm quantize``: how a model's weights become packed low-bit weights."""

    bits: str = "4"  # 1.58 (ternary) | 2 | 3 | 4 bits per weight of every block projection
    method: str = "gptq"  # rtn (round to nearest) | gptq (calibrated) | qat (quantization-aware fine-tuning)
    group: int = -1  # weights per (scale, offset) pair along the input; 0: one per row; -1: 64 for 2-4 bits, per row for ternary
    embed: str = "int8"  # storage of the token embedding: fp32 | fp16 | int8 (per-row absmax)
    head: str = "int8"  # storage of an untied LM head: fp32 | fp16 | int8
    calib_seqs: int = 64  # gptq: calibration sequences of stdlib text (training split)
    calib_len: int = 256  # gptq: tokens per calibration sequence
    qat_steps: int = 200  # qat: fine-tuning steps
    qat_lr: float = 1e-4  # qat: peak learning rate
    qat_batch: int = 8  # qat: sequences per step
    seed: int = 0  # calibration sample

    def __post_init__(self):
        p = "quant."
        _check(self.bits in QUANT_BITS, p + "bits", self.bits, " | ".join(QUANT_BITS))
        _check(self.method in QUANT_METHODS, p + "method", self.method, " | ".join(QUANT_METHODS))
        _check(self.group >= -1, p + "group", self.group, "-1 (default), 0 (per row) or a group size")
        for name in ("embed", "head"):
            v = getattr(self, name)
            _check(v in STORE_KINDS, p + name, v, " | ".join(STORE_KINDS))
        for name in ("calib_seqs", "calib_len", "qat_steps", "qat_batch"):
            v = getattr(self, name)
            _check(v >= 1, p + name, v, "an integer >= 1")
        _check(self.qat_lr > 0, p + "qat_lr", self.qat_lr, "a number > 0")
        _check(not (self.method == "qat" and self.bits == "3"), p + "bits", self.bits,
               "1.58 | 2 | 4 with method qat (there is no 3-bit quantization-aware linear)")

    @property
    def kind(self) -> str:
        return {"1.58": "ternary", "2": "int2", "3": "int3", "4": "int4"}[self.bits]

    @property
    def group_size(self) -> int:
        if self.group >= 0:
            return self.group
        return 0 if self.bits == "1.58" else 64


RL_TASKS = ("addition", "multiplication", "countdown")
RL_ALGOS = ("grpo", "rft")
RL_LOSSES = ("grpo", "dapo", "dr_grpo")


@dataclass(frozen=True)
class RLConfig:
    """``keenlm rl``: reinforcement learning on a verifiable task (keenlm.train.grpo)."""

    task: str = "addition"  # addition | multiplication | countdown
    difficulty: int = 2  # digits per operand (arithmetic) or numbers on offer (countdown)
    scratchpad: bool = False  # answers worked step by step before the answer tag
    algo: str = "grpo"  # grpo | rft (rejection-sampling fine-tuning: train on the correct samples)
    loss: str = "dr_grpo"  # grpo | dapo | dr_grpo: advantage scaling and token normalization
    group: int = 8  # completions sampled per prompt (G)
    prompts: int = 16  # prompts per step
    steps: int = 200  # RL steps (each: sample, score, epochs x minibatches optimizer steps)
    epochs: int = 1  # passes over each sampled batch (GRPO's mu); >1 makes the ratio differ from 1
    minibatches: int = 1  # optimizer steps per pass
    lr: float = 1e-4  # AdamW learning rate (constant after warm-up)
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    weight_decay: float = 0.0  # decoupled, on matrices only
    grad_clip: float = 1.0  # 0: off
    clip: float = 0.2  # epsilon: the ratio is clipped to [1 - clip, 1 + clip_high]
    clip_high: float = -1.0  # upper clip; -1: the loss variant's own (dapo 0.28, else = clip)
    kl_coef: float = 0.0  # beta: weight of the KL to the frozen starting policy (k3 estimator)
    log_kl: bool = True  # keep the frozen starting policy to log the KL even when kl_coef is 0
    temperature: float = 1.0  # sampling temperature (log-probabilities are taken at it too)
    max_new_tokens: int = 32  # completion length limit
    eval_every: int = 10  # steps between held-out greedy pass@1 (0: start and end only)
    eval_n: int = 100  # held-out problems in that evaluation (a fixed sample)
    seed: int = 0  # prompt order and sampling
    time_budget_s: float = 0.0  # >0: stop (and save) once this much wall time has passed
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    threads: int = 0  # 0: torch default
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    out_dir: str = "runs/rl"  # run folder (a keenlm run: keenlm generate|eval OUT work on it)
    resume: bool = True  # continue from out_dir's latest checkpoint when it exists
    progress: bool = True  # live progress bar (plain lines when not a terminal)

    def __post_init__(self):
        p = "rl."
        _check(self.task in RL_TASKS, p + "task", self.task, " | ".join(RL_TASKS))
        _check(self.algo in RL_ALGOS, p + "algo", self.algo, " | ".join(RL_ALGOS))
        _check(self.loss in RL_LOSSES, p + "loss", self.loss, " | ".join(RL_LOSSES))
        for name in ("difficulty", "prompts", "steps", "epochs", "minibatches", "max_new_tokens",
                     "eval_n"):
            v = getattr(self, name)
            _check(v >= 1, p + name, v, "an integer >= 1")
        _check(self.group >= 2, p + "group", self.group, "an integer >= 2 (advantages compare "
               "completions of one prompt)")
        for name in ("warmup_steps", "eval_every", "save_every", "threads"):
            v = getattr(self, name)
            _check(v >= 0, p + name, v, "an integer >= 0")
        _check(self.prompts * self.group >= self.minibatches, p + "minibatches", self.minibatches,
               "at most prompts x group")
        _check(self.lr > 0, p + "lr", self.lr, "a number > 0")
        for name in ("weight_decay", "grad_clip", "kl_coef", "time_budget_s"):
            v = getattr(self, name)
            _check(v >= 0, p + name, v, "a number >= 0")
        _check(0 < self.clip < 1, p + "clip", self.clip, "a number in (0, 1)")
        _check(self.clip_high == -1 or self.clip_high > 0, p + "clip_high", self.clip_high,
               "a number > 0, or -1 for the loss variant's own")
        _check(self.temperature > 0, p + "temperature", self.temperature,
               "a number > 0 (RL samples; greedy evaluation is separate)")
        _check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
               p + "device", self.device, "auto | cpu | cuda | cuda:N | mps")
        _check(bool(self.out_dir), p + "out_dir", self.out_dir, "a folder path")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "generate": GenerateConfig}


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, with type checks that name the key


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (from JSON/YAML or a command-line string) to ``typ`` or fail naming ``key``."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [s for s in value.split(",") if s] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list of strings")
        return tuple(coerce(key, v, str) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(key, value, "true | false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(key, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
            try:  # "1e6" is a fine way to write a step count
                f = float(value)
                if f.is_integer():
                    return int(f)
            except (ValueError, OverflowError):
                pass
        raise ConfigError(key, value, "an integer")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(key, value, "a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, value, "a string")
    raise TypeError(f"unsupported config type {typ} for {key}")


def section_from_dict(name: str, cls, data: dict, base=None):
    if not isinstance(data, dict):
        raise ConfigError(name, data, "a mapping of keys to values")
    types = _field_types(cls)
    values = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
    for k, v in data.items():
        if k not in types:
            raise ConfigError(f"{name}.{k}", v, "one of " + ", ".join(types))
        if dataclasses.is_dataclass(types[k]):  # a nested part (model.moe)
            values[k] = section_from_dict(f"{name}.{k}", types[k], v, values.get(k) or types[k]())
        else:
            values[k] = coerce(f"{name}.{k}", v, types[k])
    return cls(**values)


def from_dict(data: dict, base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from a nested dict, on top of ``base`` (default: all defaults)."""
    base = base or RunConfig()
    if not isinstance(data, dict):
        raise ConfigError("<root>", data, "a mapping with sections " + ", ".join(SECTIONS))
    parts = {}
    for k in data:
        if k not in SECTIONS and k != "preset":
            raise ConfigError(k, data[k], "top-level sections " + ", ".join(SECTIONS) + ", preset")
    for name, cls in SECTIONS.items():
        parts[name] = section_from_dict(name, cls, data.get(name, {}) or {}, getattr(base, name))
    preset = data.get("preset", base.preset)
    return RunConfig(preset=coerce("preset", preset, str), **parts)


def to_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["generate"]["stop"] = list(d["generate"]["stop"])
    return d


def load_file(path: str | os.PathLike) -> dict:
    """Read a YAML or JSON config file into a nested dict (no code is ever executed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "an existing .yaml, .yml or .json file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("--config", path, f"valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a core dependency
            raise ConfigError("--config", path, "JSON, or install pyyaml for YAML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("--config", path, f"valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", path, "a mapping with sections " + ", ".join(SECTIONS))
    return data


def save_json(cfg: RunConfig, path: str | os.PathLike) -> None:
    from keenlm.runs import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def parse_overrides(pairs: list[tuple[str, str]]) -> dict:
    """``[("model.n_layer", "4")] -> {"model": {"n_layer": "4"}}`` with key checks; a nested
    part is one more level (``model.moe.experts``)."""
    out: dict = {}
    for key, value in pairs:
        parts = key.split(".")
        if len(parts) < 2 or parts[0] not in SECTIONS:
            raise ConfigError(key, value, "SECTION.FIELD with SECTION in " + ", ".join(SECTIONS))
        cls, node = SECTIONS[parts[0]], out.setdefault(parts[0], {})
        for i, name in enumerate(parts[1:], 1):
            types = _field_types(cls) if cls is not None else {}
            last = i == len(parts) - 1
            if name not in types or dataclasses.is_dataclass(types[name]) == last:
                allowed = ", ".join(".".join(parts[:i] + [n]) for n in types) or "no nested keys"
                raise ConfigError(key, value, "one of " + allowed)
            if last:
                node[name] = value
            else:
                cls, node = types[name], node.setdefault(name, {})
    return out


def merge(*dicts: dict) -> dict:
    """Deep-merge nested config dicts; later ones win."""
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = v
    return out
