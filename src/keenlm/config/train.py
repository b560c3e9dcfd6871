"""The data, training and generation configs (``data.*``, ``train.*``, ``generate.*``).

``train`` holds what every run sets (steps, batch, sequence length, seed, where the run goes)
and nests the rest by concern: ``train.optim`` (optimizer), ``train.schedule`` (learning-rate
schedule, and when quantization-aware training starts), ``train.checkpoint``, ``train.eval``
(evaluation and logging), ``train.runtime`` (device, precision, threads, compile) and
``train.select`` (selective backprop).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from keenlm.config.base import check


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
        check(bool(self.corpus), p + "corpus", self.corpus, "stdlib, a path, or hf:NAME")
        check(256 + 1 <= self.vocab_size <= 1_000_000, p + "vocab_size", self.vocab_size,
              "an integer in [257, 1000000]")
        check(self.tokenizer_train_bytes >= 1000, p + "tokenizer_train_bytes",
              self.tokenizer_train_bytes, "an integer >= 1000")
        check(0.0 < self.val_fraction < 0.5, p + "val_fraction", self.val_fraction,
              "a number in (0, 0.5)")
        check(self.max_bytes >= 0, p + "max_bytes", self.max_bytes, "an integer >= 0")
        check(self.train_tokens >= 0, p + "train_tokens", self.train_tokens,
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
        check(self.method in SELECT_METHODS, p + "method", self.method, " | ".join(SELECT_METHODS))
        check(self.unit in ("sequence", "token"), p + "unit", self.unit, "sequence | token")
        check(0 < self.keep <= 1, p + "keep", self.keep, "a number in (0, 1]")
        check(0 <= self.ramp <= 1, p + "ramp", self.ramp, "a number in [0, 1]")
        check(self.method != "excess" or bool(self.reference), p + "reference", self.reference,
              "a run folder (method excess scores against a reference model)")


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """``train.optim``: the optimizer (keenlm.train.optim)."""

    name: str = "adamw"  # adamw | muon
    lr: float = 0.0  # 0: from the size preset (presets.default_lr)
    weight_decay: float = 0.1  # decoupled, on matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # 0: off
    max_nonfinite: int = 5  # non-finite steps in a row (each skipped, never applied) before the run stops; 0: stop at the first

    def __post_init__(self):
        p = "train.optim."
        check(self.name in OPTIMIZERS, p + "name", self.name, " | ".join(OPTIMIZERS))
        check(self.lr >= 0, p + "lr", self.lr, "a number >= 0 (0 = from the size preset)")
        check(self.weight_decay >= 0, p + "weight_decay", self.weight_decay, "a number >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            check(0 <= v < 1, p + name, v, "a number in [0, 1)")
        check(self.grad_clip >= 0, p + "grad_clip", self.grad_clip, "a number >= 0 (0 = off)")
        check(self.max_nonfinite >= 0, p + "max_nonfinite", self.max_nonfinite, "an integer >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    """``train.schedule``: the learning rate as a pure function of the step."""

    kind: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 0  # 0: 2% of steps, at least 1
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: final share of steps spent decaying
    qat_start: float = 0.0  # low-bit linears: train in full precision until this fraction of the steps, then quantization-aware

    def __post_init__(self):
        p = "train.schedule."
        check(self.kind in SCHEDULES, p + "kind", self.kind, " | ".join(SCHEDULES))
        check(self.warmup_steps >= 0, p + "warmup_steps", self.warmup_steps, "an integer >= 0")
        check(0 <= self.min_lr_ratio <= 1, p + "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        check(0 < self.decay_fraction <= 1, p + "decay_fraction", self.decay_fraction,
              "a number in (0, 1]")
        check(0.0 <= self.qat_start < 1.0, p + "qat_start", self.qat_start, "a number in [0, 1)")


@dataclass(frozen=True)
class CheckpointConfig:
    """``train.checkpoint``: when checkpoints are written and whether a run resumes from one."""

    every: int = 0  # steps between checkpoints; 0: only at the end (and on Ctrl-C)
    keep: int = 2  # newest checkpoints kept on disk
    resume: bool = True  # continue from out_dir's latest checkpoint when it exists

    def __post_init__(self):
        p = "train.checkpoint."
        check(self.every >= 0, p + "every", self.every, "an integer >= 0")
        check(self.keep >= 1, p + "keep", self.keep, "an integer >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """``train.eval``: validation during training, and how often the metrics log is written."""

    every: int = 200  # steps between evaluations; 0: only at the end
    batches: int = 20  # validation batches per evaluation
    log_every: int = 10  # steps between metrics.jsonl lines

    def __post_init__(self):
        p = "train.eval."
        check(self.every >= 0, p + "every", self.every, "an integer >= 0")
        for name in ("batches", "log_every"):
            v = getattr(self, name)
            check(v >= 1, p + name, v, "an integer >= 1")


DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"


def valid_device(name: str) -> bool:
    return name == "auto" or name.split(":")[0] in ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class RuntimeConfig:
    """``train.runtime``: where and how the arithmetic runs."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 where the GPU/CPU multiplies bf16 natively)
    compile: bool = False  # torch.compile the model (first steps slower)
    loss_kernel: str = "fused"  # fused (chunked LM head + cross-entropy) | reference
    threads: int = 0  # 0: torch default
    dist_timeout_s: float = 300.0  # train.parallel: a collective waiting longer ends the job (a hung rank)

    def __post_init__(self):
        p = "train.runtime."
        check(self.dist_timeout_s > 0, p + "dist_timeout_s", self.dist_timeout_s, "seconds > 0")
        check(valid_device(self.device), p + "device", self.device, DEVICE_HELP)
        check(self.dtype in ("fp32", "bf16", "auto"), p + "dtype", self.dtype, "fp32 | bf16 | auto")
        check(self.loss_kernel in ("fused", "reference"), p + "loss_kernel", self.loss_kernel,
              "fused | reference")
        check(self.threads >= 0, p + "threads", self.threads, "an integer >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The optimization loop: what every run sets, and its parts."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch (the global batch: split over the ranks of train.parallel)
    seq_len: int = 256  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 1337  # model init and batch order
    time_budget_s: float = 0.0  # >0: stop (and save) once this much wall time has passed
    progress: bool = True  # live progress bar (plain lines when not a terminal)
    out_dir: str = "runs/latest"  # run folder
    init_from: str = ""  # start from this model (run folder, .gguf, HF folder): its shape and tokenizer; model.linear etc. still apply
    parallel: str = "auto"  # none | ddp | fsdp | auto (ddp under torchrun with several processes, else none); keenlm.train.distributed
    optim: OptimConfig = field(default_factory=OptimConfig)  # train.optim.*
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # train.schedule.*
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # train.checkpoint.*
    eval: EvalConfig = field(default_factory=EvalConfig)  # train.eval.*
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # train.runtime.*
    select: SelectConfig = field(default_factory=SelectConfig)  # selective backprop (train.select.*)

    def __post_init__(self):
        p = "train."
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            v = getattr(self, name)
            check(v >= 1, p + name, v, "an integer >= 1")
        check(self.time_budget_s >= 0, p + "time_budget_s", self.time_budget_s, "a number >= 0")
        check(bool(self.out_dir), p + "out_dir", self.out_dir, "a folder path")
        check(self.parallel in ("none", "ddp", "fsdp", "auto"), p + "parallel", self.parallel,
              "none | ddp | fsdp | auto")


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
        check(self.max_new_tokens >= 1, p + "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.temperature >= 0, p + "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        check(self.top_k >= 0, p + "top_k", self.top_k, "an integer >= 0 (0 = off)")
        check(0 < self.top_p <= 1, p + "top_p", self.top_p, "a number in (0, 1]")
        check(self.repetition_penalty > 0, p + "repetition_penalty", self.repetition_penalty,
              "a number > 0 (1 = off)")
        check(all(isinstance(s, str) and s for s in self.stop), p + "stop", self.stop,
              "a list of non-empty strings")


