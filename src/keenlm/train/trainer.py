"""The training loop: one loop for every model variant; techniques plug in, it names none.

Each optimizer step:
  1. lr <- peak * schedule(step)                              (pure function of the step)
     every converter's on_step (e.g. when quantization-aware training starts)
  2. for each of grad_accum micro-batches: batch = get_batch(seed, micro index)
       hooks may replace the batch and give per-token loss weights
       loss = weighted mean per-token cross-entropy + model/hook auxiliary losses
       backward
  3. clip gradients, optimizer step, the model's end_step, ledger, log, evaluate, checkpoint

Techniques reach it through keenlm.train.converters: converters change the model (starting
from ``init``, on each step, at each evaluation), hooks shape the loss. The loop shell (run
folder, resume, save, budget, Ctrl-C) is keenlm.train.loop's, shared with the RL trainer.

Exact resume: the batch of a micro-step is a pure function of (seed, index), the schedule a
pure function of the step, and the optimizer state, RNG states and step are checkpointed, so a
run stopped and resumed produces the same losses as one that never stopped (CPU, fp32).
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Protocol, Sequence

import torch

from keenlm import runs
from keenlm.config import RunConfig, from_dict, save_json
from keenlm.data import get_batch, limit_train, load_corpus, prepare_data, tokenize_corpus
from keenlm.infer.evaluate import evaluate
from keenlm.io.loaders import load_any
from keenlm.ledger import Ledger
from keenlm.model import build_model
from keenlm.model.attention import check_backend
from keenlm.model.loss import LOSSES
from keenlm.presets import resolve
from keenlm.runs import default_cache_dir
from keenlm.train import distributed
from keenlm.train.converters import converters_for, hooks_for
from keenlm.train.loop import LoopShell, pick_device
from keenlm.train.optim import (FiniteGuard, build_optimizer, grad_norm, init_base_lr,
                                lr_multiplier, set_lr)


class TrainHook(Protocol):
    """Optional methods a technique implements to shape the loss without forking the loop."""

    def begin_step(self, step: int, steps: int) -> None:  # before each optimizer step
        ...

    def choose_batch(self, x, y, model):  # -> (x, y, token_weights or None)
        """May drop rows (they then leave the backward pass) or weight tokens; a scoring
        forward pass of its own is reported in ``self.forward_tokens`` for the ledger."""
        ...

    def extra_losses(self, model, x, y, per_token_loss) -> dict:  # -> {name: scalar tensor}
        """per_token_loss (B, T) is detached: for choosing rows and for logging, not for gradients."""
        ...


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 matmuls
    run ~2.5x faster than fp32 (measured on a 2-core AMD EPYC); elsewhere they are emulated
    and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(name: str, device: torch.device):
    """None for fp32. 'auto' uses bf16 autocast where the hardware multiplies bf16 natively:
    CUDA GPUs that support it, and CPUs with AVX512-BF16/AMX."""
    if name == "bf16":
        return torch.bfloat16
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
    return None


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_eval: dict
    ledger: dict
    interrupted: bool


class Trainer(LoopShell):
    def __init__(self, cfg: RunConfig, hooks: Sequence[TrainHook] = (), init=None):
        """init: a loaded model (keenlm.load) to start from; ``train.init_from`` names it, and
        ``keenlm.train(cfg)`` loads it before building the trainer."""
        t = cfg.train
        super().__init__(t.out_dir)
        if init is None and t.init_from:
            raise ValueError(f"train.init_from={t.init_from!r}: pass the loaded model as init= "
                             "(keenlm.load), or train with keenlm.train(cfg), which loads it")
        if t.runtime.threads:
            torch.set_num_threads(t.runtime.threads)
        self.device = pick_device(t.runtime.device)
        self.dist = distributed.setup(t.parallel, self.device, t.runtime.dist_timeout_s)
        distributed.check(self.dist, cfg)
        self.is_main = self.dist.main  # only rank 0 writes the run files, metrics and progress
        if self.dist.active:  # torchrun hands Ctrl-C to its workers as SIGTERM
            self.stop_signals = (signal.SIGINT, signal.SIGTERM)
        check_backend(cfg.model.attention, self.device)
        self.amp = autocast_dtype(t.runtime.dtype, self.device)
        log = print if t.progress and self.is_main else None
        self.converters = converters_for(cfg, None if init is None else init.config)
        with self.dist.rank0_first():  # one rank builds the tokenizer and token cache
            if init is None:
                self.tokenizer, self.data = prepare_data(cfg.data, log=log)
                cfg = resolve(cfg, self.tokenizer.vocab_size)
            else:
                cfg = self._adopt(cfg, init, log)
        self.data = limit_train(self.data, cfg.data.train_tokens)
        self.cfg = self._resolve_against_run(cfg)
        torch.manual_seed(t.seed)
        self.model = (init.net if init is not None else build_model(self.cfg.model)).to(self.device)
        self.loss_fn = LOSSES[t.runtime.loss_kernel]
        # the step's forward pass (hidden states, then the head's loss) as one module, under
        # DDP or FSDP2 when distributed; FSDP2 shards the parameters in place, so the optimizer
        # comes after
        self.step_module = distributed.wrap(self.dist, distributed.LossModule(
            self.model, self.loss_fn, self.amp, compile=t.runtime.compile))
        self.opt = build_optimizer(self.model, self.cfg.train.optim, self.device.type)
        self.guard = FiniteGuard(self.cfg.train.optim.max_nonfinite,
                                 "; lower train.optim.lr or enable train.optim.grad_clip")
        init_base_lr(self.opt)
        self.hooks = hooks_for(self.cfg, self.tokenizer, self.amp, self.device, hooks)
        self.ledger = Ledger.for_model(self.model, t.seq_len)
        self._extra: dict[str, float] = {}  # auxiliary losses of the step, for its metrics line
        t = self.cfg.train
        self.planned_steps = t.steps
        self.log_every, self.eval_every = t.eval.log_every, t.eval.every
        self.save_every, self.keep = t.checkpoint.every, t.checkpoint.keep
        self.time_budget_s, self.progress = t.time_budget_s, t.progress and self.is_main
        if t.checkpoint.resume:
            self.resume()
        if self.is_main:
            self._write_run_files()

    # --------------------------------------------------------------------------- set-up

    def _adopt(self, cfg: RunConfig, init, log) -> RunConfig:
        """Start from a loaded model: its shape and tokenizer, then every converter's ``adopt``
        in order (keenlm.train.converters)."""
        self.tokenizer = init.tokenizer
        self.data = tokenize_corpus(load_corpus(cfg.data), self.tokenizer,
                                    default_cache_dir(cfg.data.cache_dir), log=log)
        if any(p.dtype != torch.float32 or not p.requires_grad for p in init.net.parameters()) or \
                any(b.dtype == torch.uint8 for b in init.net.buffers()):
            raise ValueError("train.init_from needs a full-precision model (not a quantized one)")
        model = init.config.model
        for conv in self.converters:
            model = conv.adopt(model, init.net, self.data, log)
        init.net.train()
        return resolve(dataclasses.replace(cfg, model=model), self.tokenizer.vocab_size)

    def _resolve_against_run(self, cfg: RunConfig) -> RunConfig:
        """Resuming: the run's saved model and data config must match (training knobs may change)."""
        saved = self.run_dir / "config.json"
        if not (cfg.train.checkpoint.resume and saved.exists()
                and runs.latest_checkpoint(self.run_dir)):
            return cfg
        old = from_dict(json.loads(saved.read_text()))
        for section in ("model", "data"):
            if getattr(old, section) != getattr(cfg, section):
                raise ValueError(f"{self.run_dir} holds a run with a different {section} config; "
                                 f"use another train.out_dir or train.checkpoint.resume=false")
        return cfg

    def extra_state(self) -> dict:
        return {"torch_rng": torch.get_rng_state(), "planned_steps": self.planned_steps,
                "nonfinite": self.guard.state(),
                "ledger": {k: v for k, v in self.ledger.to_dict().items()
                           if k in ("tokens_seen", "tokens_forward", "tokens_backward",
                                    "flops_forward", "flops_backward", "wall_time_s")}}

    def load_extra_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch_rng"])
        self.guard.load(state.get("nonfinite"))
        if self.cfg.train.time_budget_s:  # keep the schedule length the budget fixed
            self.planned_steps = int(state.get("planned_steps", self.cfg.train.steps))
        self.ledger = Ledger.from_dict({**self.ledger.to_dict(), **state["ledger"]})

    def after_save(self) -> None:
        if self.is_main:
            self.ledger.save(self.run_dir / "ledger.json")

    # --------------------------------------------------------------------------- across ranks

    def save(self):
        if not self.dist.active:
            return super().save()
        state = {"step": self.step, **self.extra_state()}
        distributed.save(self.dist, self.run_dir, self.step, self.model, self.opt, state, self.keep)
        self.after_save()

    def resume(self, label: str = "step") -> bool:
        ckpt = runs.latest_checkpoint(self.run_dir)
        if ckpt is None or not (self.dist.active or runs.is_dcp(ckpt)):
            return super().resume(label)
        if runs.is_dcp(ckpt):
            state = distributed.load(ckpt, self.model, self.opt)
        else:  # a one-process checkpoint spread over the ranks
            state = distributed.load_full(ckpt, self.model, self.opt, self._plain_copy)
        self.step = int(state["step"])
        self.load_extra_state(state)
        if self.is_main:
            print(f"resuming {self.run_dir} from {label} {self.step}")
        return True

    def _plain_copy(self):
        """A model and optimizer like this run's, in this process only (to read a one-process
        checkpoint before spreading it over the ranks)."""
        model = build_model(self.cfg.model).to(self.device)
        return model, build_optimizer(model, self.cfg.train.optim, self.device.type)

    def agree(self, flag: bool) -> bool:
        return bool(self.dist.decide(flag))

    def _write_run_files(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_json(self.cfg, self.run_dir / "config.json")
        runs.atomic_write_text(self.run_dir / "env.json", json.dumps(runs.environment(), indent=2))
        self.tokenizer.save(self.run_dir / "tokenizer")

    # --------------------------------------------------------------------------- one step

    def _micro_step(self, index: int, last: bool = True) -> tuple[float, int, int, int]:
        """One micro-batch (this rank's rows of it): (loss, tokens drawn, tokens forwarded,
        tokens backpropagated). ``last``: the step's last micro-batch (DDP syncs gradients)."""
        t = self.cfg.train
        x, y = get_batch(self.data.train, t.batch_size, t.seq_len, t.seed, index)
        x, y = self.dist.shard(x.to(self.device), y.to(self.device))
        drawn, scored = x.numel(), 0
        weights = None
        for hook in self.hooks:
            if hasattr(hook, "choose_batch"):
                x, y, weights = hook.choose_batch(x, y, self.model)
                scored += getattr(hook, "forward_tokens", 0)  # a scoring pass of its own
        B, T = y.shape
        with distributed.no_sync(self.dist, self.step_module, last):
            loss, per_token = self.step_module(x, y, weights)
            extra = {}
            for hook in self.hooks:
                if hasattr(hook, "extra_losses"):
                    extra.update(hook.extra_losses(self.model, x, y, per_token.view(B, T)))
            for name, aux in self.model.aux_losses().items():  # per layer: summed by kind
                kind = name.rsplit(".", 1)[-1]
                extra[kind] = extra.get(kind, 0.0) + aux
            total = loss + sum(extra.values()) if extra else loss
            (total / t.grad_accum).backward()
        for k, v in extra.items():
            v = float(v.detach()) if torch.is_tensor(v) else float(v)
            self._extra[k] = self._extra.get(k, 0.0) + v / t.grad_accum
        # every row left in the batch runs backward, whatever its token weights
        return loss.item(), drawn, scored + x.numel(), y.numel()

    def train_step(self) -> dict:
        t = self.cfg.train
        for conv in self.converters:
            conv.on_step(self.model, self.step, self.planned_steps)
        lr_mult = lr_multiplier(self.step, t.schedule, self.planned_steps)
        set_lr(self.opt, lr_mult)
        start = time.perf_counter()
        losses, n_tok, n_fwd, n_bwd = [], 0, 0, 0
        self._extra = {}
        for hook in self.hooks:
            if hasattr(hook, "begin_step"):
                hook.begin_step(self.step, self.planned_steps)
        for m in range(t.grad_accum):
            loss, tok, fwd, bwd = self._micro_step(self.step * t.grad_accum + m,
                                                   last=m == t.grad_accum - 1)
            losses.append(loss)
            n_tok, n_fwd, n_bwd = n_tok + tok, n_fwd + fwd, n_bwd + bwd
        if self.dist.active:  # the job's figures: every rank's rows
            mean, n_tok, n_fwd, n_bwd = self.dist.sum([sum(losses) / len(losses), n_tok, n_fwd,
                                                       n_bwd])
            losses, n_tok, n_fwd, n_bwd = [mean / self.dist.world], int(n_tok), int(n_fwd), int(n_bwd)
        if self.dist.active:  # unused experts got zero gradients to keep the ranks in step
            self.model.drop_unused_grads()
        loss = sum(losses) / len(losses)
        norm = grad_norm(self.model.parameters(), t.optim.grad_clip)
        if self.guard.allow(loss, norm, self.step + 1):  # a non-finite step is skipped, counted
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        parts = self.model.end_step()  # per-step statistics and updates of the model's parts
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.ledger.add_step(n_tok, n_bwd, seconds, tokens_forward=n_fwd)
        self.step += 1
        # "loss": the language-model cross-entropy; auxiliary losses are logged beside it
        return {"step": self.step, "loss": loss, "lr": t.optim.lr * lr_mult, "grad_norm": norm,
                **({"skipped_steps": self.guard.skipped} if self.guard.skipped else {}),
                "tokens_per_s": n_tok / seconds, "tokens": self.ledger.tokens_seen,
                "flops": self.ledger.flops_forward + self.ledger.flops_backward,
                **({"backward_share": n_bwd / n_tok} if n_bwd != n_tok else {}),
                **self._extra, **parts}

    # --------------------------------------------------------------------------- loop

    def evaluate(self) -> dict:
        """Validation loss, plus what each converter reports of the model on those batches
        (kept in the ledger under its key)."""
        t = self.cfg.train
        for conv in self.converters:
            conv.begin_eval(self.model)
        ev = evaluate(self.model, self.data.val, self.data.token_bytes, batch_size=t.batch_size,
                      seq_len=t.seq_len, max_batches=t.eval.batches, device=self.device,
                      autocast_dtype=self.amp)
        for conv in self.converters:
            extra = conv.end_eval(self.model, t.seq_len)
            ev.update(extra)
            self.ledger.extra.update(extra)
        return ev

    def after_step(self, first_step: int):
        """With a time budget, fix the schedule's length once from the measured step time
        (steps 3..13 of this session: the first ones pay for allocator and kernel warm-up)."""
        t = self.cfg.train
        done = self.step - first_step
        if t.time_budget_s <= 0 or self.planned_steps != t.steps:
            return
        if done == 3:
            self._mark = time.perf_counter()
        elif done == 13:
            per_step = (time.perf_counter() - self._mark) / 10
            left = t.time_budget_s - (time.perf_counter() - self.started)
            # keep ~4% of the budget for the periodic evaluations and the final checkpoint
            fit = self.step + int(0.96 * left / per_step)
            self.planned_steps = self.dist.decide(max(self.step + 1, min(t.steps, fit)))

    def eval_fields(self, at_start: bool = False) -> dict:
        """Where the run stands, for an evaluation's metrics line: training seconds (the
        ledger's, evaluations excluded) and FLOPs so far."""
        lg = self.ledger
        return {"train_s": lg.wall_time_s, "flops_forward": lg.flops_forward,
                "flops_backward": lg.flops_backward}

    def eval_note(self, ev: dict) -> str:
        return f"step {self.step}: val loss {ev['loss']:.4f}, {ev['bits_per_byte']:.3f} bits/byte"

    def fit(self) -> TrainResult:
        _, final, interrupted = self.run_loop()
        return TrainResult(self.run_dir, self.step, final, self.ledger.to_dict(), interrupted)


def train(cfg: RunConfig | dict, hooks: Sequence[TrainHook] = (), init=None) -> TrainResult:
    """Train a model from a config (a RunConfig or a nested dict); ``train.init_from`` (or
    ``init``, a model already loaded) is the starting point, loaded here before the trainer is
    built. What ``keenlm.train(config)`` calls."""
    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    if init is None and cfg.train.init_from:
        init = load_any(Path(cfg.train.init_from))
    return Trainer(cfg, hooks, init=init).fit()
