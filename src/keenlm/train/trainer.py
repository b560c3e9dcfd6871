"""The training loop: one loop for every model variant, with hook points for later techniques.

Each optimizer step:
  1. lr <- peak * schedule(step)                              (pure function of the step)
  2. for each of grad_accum micro-batches: batch = get_batch(seed, micro index)
       hooks may replace the batch and give per-token loss weights   (selective backprop)
       loss = weighted mean per-token cross-entropy + model/hook auxiliary losses (MoE balance)
       backward
  3. clip gradients, optimizer step, ledger, log, evaluate, checkpoint

Exact resume: the batch of a micro-step is a pure function of (seed, index), the schedule a
pure function of the step, and the optimizer state, RNG states and step are checkpointed, so a
run stopped and resumed produces the same losses as one that never stopped (CPU, fp32).

Ctrl-C: the first SIGINT finishes the current step, saves a checkpoint and returns; a second
one aborts at once (the previous checkpoint stays valid: writes are atomic, see keenlm.runs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

import torch

from keenlm import runs
from keenlm.config import RunConfig, from_dict, save_json
from keenlm.evaluate import evaluate
from keenlm.ledger import Ledger
from keenlm.model import build_model, load_model_state, model_state
from keenlm.model.loss import LOSSES
from keenlm.presets import resolve
from keenlm.train.optim import build_optimizer, init_base_lr, lr_multiplier, set_lr
from keenlm.train.progress import Progress


class TrainHook(Protocol):
    """Optional methods a technique implements to shape the loss without forking the loop."""

    def begin_step(self, step: int, steps: int) -> None:  # before each optimizer step
        ...

    def select_batch(self, x, y, model):  # -> (x, y, token_weights or None)
        """May drop rows (they then leave the backward pass) or weight tokens; a scoring
        forward pass of its own is reported in ``self.forward_tokens`` for the ledger."""
        ...

    def extra_losses(self, model, x, y, per_token_loss) -> dict:  # -> {name: scalar tensor}
        """per_token_loss (B, T) is detached: for selection and logging, not for gradients."""
        ...


def pick_device(name: str) -> torch.device:
    if name != "auto":
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


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


class Trainer:
    def __init__(self, cfg: RunConfig, hooks: Sequence[TrainHook] = (), init=None):
        """init: a loaded model (keenlm.load) to start from instead of ``train.init_from``."""
        from keenlm.data import limit_train, prepare_data

        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = pick_device(t.device)
        if cfg.model.attention == "flash_triton" and self.device.type != "cuda":
            from keenlm.model.flash_triton import interpreted

            if not interpreted():
                raise ValueError(f"model.attention=flash_triton runs on CUDA GPUs; this run's device "
                                 f"is {self.device} (use flash, sdpa or auto)")
        self.amp = autocast_dtype(t.dtype, self.device)
        self.run_dir = Path(t.out_dir)
        log = print if t.progress else None
        if init is None and t.init_from:
            from keenlm.api import load

            init = load(t.init_from)
        if init is None:
            self.tokenizer, self.data = prepare_data(cfg.data, log=log)
            cfg = resolve(cfg, self.tokenizer.vocab_size)
        else:
            cfg = self._adopt(cfg, init, log)
        self.data = limit_train(self.data, cfg.data.train_tokens)
        self.cfg = self._resolve_against_run(cfg)
        torch.manual_seed(t.seed)
        self.model = (init.net if init is not None else build_model(self.cfg.model)).to(self.device)
        self._quantizing = None
        self.opt = build_optimizer(self.model, self.cfg.train, self.device.type)
        init_base_lr(self.opt)
        hidden = self.model.hidden_states
        self.hidden = torch.compile(hidden) if t.compile else hidden
        self.loss_fn = LOSSES[t.loss_kernel]
        self.hooks = list(hooks)
        from keenlm.train.surprise import build_hook

        select = build_hook(self.cfg, self.tokenizer, self.amp, self.device)  # train.select
        if select is not None:
            self.hooks.insert(0, select)
        self.ledger = Ledger.for_model(self.model, t.seq_len)
        self.step = 0
        self._extra: dict[str, float] = {}  # auxiliary losses of the step, for its metrics line
        self.planned_steps = self.cfg.train.steps
        self._stop = threading.Event()
        self._maybe_resume()
        self._write_run_files()

    # --------------------------------------------------------------------------- set-up

    def _adopt(self, cfg: RunConfig, init, log) -> RunConfig:
        """Start from a loaded model: its shape and tokenizer; this config's linear kind
        (quantization-aware fine-tuning: every block projection becomes a QATLinear); for
        ``model.ffn: moe`` from a dense model, sparse upcycling (keenlm.model.moe.upcycle); for
        ``model.spike.steps`` > 0, spiking execution (keenlm.model.spiking: a dense model is
        converted, thresholds balanced on ``model.spike.calibrate`` training batches)."""
        from keenlm.data import default_cache_dir, load_corpus, tokenize_corpus
        from keenlm.model.lowbit import prepare_qat

        self.tokenizer = init.tokenizer
        self.data = tokenize_corpus(load_corpus(cfg.data), self.tokenizer,
                                    default_cache_dir(cfg.data.cache_dir), log=log)
        m = cfg.model
        model = dataclasses.replace(init.config.model, linear=m.linear, lowbit_group=m.lowbit_group,
                                    lowbit_per_channel=m.lowbit_per_channel, act_bits=m.act_bits)
        if any(p.dtype != torch.float32 or not p.requires_grad for p in init.net.parameters()) or \
                any(b.dtype == torch.uint8 for b in init.net.buffers()):
            raise ValueError("train.init_from needs a full-precision model (not a quantized one)")
        if m.ffn == "moe" and init.config.model.ffn == "dense":  # sparse upcycling
            from keenlm.model.moe import upcycle

            upcycle(init.net, m.moe)
            model = dataclasses.replace(model, ffn="moe", moe=init.net.cfg.moe)
            if log:
                log(f"upcycled to {m.moe.experts} experts (top-{m.moe.top_k}) of width "
                    f"{model.d_ff}, copies of each layer's feed-forward")
        if m.spike.steps or init.config.model.spike.steps:
            model = self._adopt_spiking(cfg, init, model, log)
        if m.linear != "dense":
            prepare_qat(init.net, m.linear, group=m.lowbit_group, per_channel=m.lowbit_per_channel,
                        act_bits=m.act_bits)
        init.net.train()
        return resolve(dataclasses.replace(cfg, model=model), self.tokenizer.vocab_size)

    def _adopt_spiking(self, cfg: RunConfig, init, model, log):
        """Spiking fine-tuning: convert a dense model (threshold balancing on training batches),
        or take a spiking one with this config's time steps and neuron (its scales kept)."""
        from keenlm.model.spiking import convert, set_spike, spiking_layers
        from keenlm.spike import calibration_batches

        spike = cfg.model.spike
        if not spike.steps:
            raise ValueError("train.init_from is a spiking model: set model.spike.steps (its own "
                             f"is {init.config.model.spike.steps})")
        if spiking_layers(init.net):
            set_spike(init.net, spike)
        else:
            t = cfg.train
            batches = calibration_batches(self.data.train, spike.calibrate, t.batch_size,
                                          t.seq_len, t.seed + 7919)
            convert(init.net, spike, batches)
            if log:
                log(f"converted to spiking feed-forward layers: T={spike.steps}, thresholds "
                    f"balanced on {spike.calibrate} batches")
        return dataclasses.replace(model, spike=spike)

    def _resolve_against_run(self, cfg: RunConfig) -> RunConfig:
        """Resuming: the run's saved model and data config must match (training knobs may change)."""
        saved = self.run_dir / "config.json"
        if not (cfg.train.resume and saved.exists() and runs.latest_checkpoint(self.run_dir)):
            return cfg
        import json

        old = from_dict(json.loads(saved.read_text()))
        for section in ("model", "data"):
            if getattr(old, section) != getattr(cfg, section):
                raise ValueError(f"{self.run_dir} holds a run with a different {section} config; "
                                 f"use another train.out_dir or train.resume=false")
        return cfg

    def _maybe_resume(self):
        ckpt = runs.latest_checkpoint(self.run_dir) if self.cfg.train.resume else None
        if ckpt is None:
            return
        load_model_state(self.model, runs.load_model_state(ckpt))
        state = runs.load_trainer_state(ckpt)
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        if self.cfg.train.time_budget_s:  # keep the schedule length the budget fixed
            self.planned_steps = int(state.get("planned_steps", self.cfg.train.steps))
        self.ledger = Ledger.from_dict({**self.ledger.to_dict(), **state["ledger"]})
        print(f"resuming {self.run_dir} from step {self.step}")

    def _write_run_files(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_json(self.cfg, self.run_dir / "config.json")
        import json

        runs.atomic_write_text(self.run_dir / "env.json", json.dumps(runs.environment(), indent=2))
        self.tokenizer.save(self.run_dir / "tokenizer")

    # --------------------------------------------------------------------------- one step

    def _micro_step(self, index: int) -> tuple[float, int, int, int]:
        """One micro-batch: (loss, tokens drawn, tokens forwarded, tokens backpropagated)."""
        from keenlm.data import get_batch

        t = self.cfg.train
        x, y = get_batch(self.data.train, t.batch_size, t.seq_len, t.seed, index)
        x, y = x.to(self.device), y.to(self.device)
        drawn, scored = x.numel(), 0
        weights = None
        for hook in self.hooks:
            if hasattr(hook, "select_batch"):
                x, y, weights = hook.select_batch(x, y, self.model)
                scored += getattr(hook, "forward_tokens", 0)  # a scoring pass of its own
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            h = self.hidden(x)
        B, T = y.shape
        loss, per_token = self.loss_fn(h.reshape(B * T, -1), self.model.lm_head.weight,
                                       y.reshape(-1), None if weights is None else weights.reshape(-1))
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

    def _qat_schedule(self):
        """train.qat_start: full precision first, quantization-aware from that fraction on."""
        t = self.cfg.train
        on = self.step >= int(t.qat_start * self.planned_steps)
        if on != self._quantizing:
            from keenlm.model.lowbit import set_quantize

            if set_quantize(self.model, on) and self._quantizing is not None:
                print(f"step {self.step}: quantization-aware training starts")
            self._quantizing = on

    def train_step(self) -> dict:
        t = self.cfg.train
        self._qat_schedule()
        lr_mult = lr_multiplier(self.step, dataclasses.replace(t, steps=self.planned_steps))
        set_lr(self.opt, lr_mult)
        start = time.perf_counter()
        losses, n_tok, n_fwd, n_bwd = [], 0, 0, 0
        self._extra = {}
        for hook in self.hooks:
            if hasattr(hook, "begin_step"):
                hook.begin_step(self.step, self.planned_steps)
        for m in range(t.grad_accum):
            loss, tok, fwd, bwd = self._micro_step(self.step * t.grad_accum + m)
            losses.append(loss)
            n_tok, n_fwd, n_bwd = n_tok + tok, n_fwd + fwd, n_bwd + bwd
        grad_norm = None
        if t.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip).item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        parts = self.model.end_step()  # e.g. MoE routing statistics, bias balancing
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.ledger.add_step(n_tok, n_bwd, seconds, tokens_forward=n_fwd)
        self.step += 1
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {self.step}; lower train.lr "
                                     f"(now {t.lr}) or enable train.grad_clip")
        # "loss": the language-model cross-entropy; auxiliary losses are logged beside it
        return {"step": self.step, "loss": loss, "lr": t.lr * lr_mult, "grad_norm": grad_norm,
                "tokens_per_s": n_tok / seconds, "tokens": self.ledger.tokens_seen,
                "flops": self.ledger.flops_forward + self.ledger.flops_backward,
                **({"backward_share": n_bwd / n_tok} if n_bwd != n_tok else {}),
                **self._extra, **parts}

    # --------------------------------------------------------------------------- loop

    def evaluate(self) -> dict:
        """Validation loss; a spiking model also gets its firing rates, synaptic operations and
        energy per token on those batches (``spiking``, also kept in the ledger)."""
        from keenlm.model.spiking import spike_energy, spiking_layers

        t = self.cfg.train
        layers = spiking_layers(self.model)
        for m in layers:
            m.take_stats()
        ev = evaluate(self.model, self.data.val, self.data.token_bytes, batch_size=t.batch_size,
                      seq_len=t.seq_len, max_batches=t.eval_batches, device=self.device,
                      autocast_dtype=self.amp)
        if layers:
            e = spike_energy(self.model, [m.take_stats() for m in layers], t.seq_len)
            ev["spiking"] = {k: e[k] for k in ("steps", "in_rate", "hidden_rate", "synops_per_token",
                                               "macs_per_token_dense_ffn", "ffn_energy_j",
                                               "ffn_ratio", "model_ratio")}
            self.ledger.extra["spiking"] = ev["spiking"]
        return ev

    def save(self):
        state = {"optimizer": self.opt.state_dict(), "torch_rng": torch.get_rng_state(),
                 "step": self.step, "planned_steps": self.planned_steps,
                 "ledger": {k: v for k, v in self.ledger.to_dict().items()
                            if k in ("tokens_seen", "tokens_forward", "tokens_backward",
                                     "flops_forward", "flops_backward", "wall_time_s")}}
        runs.save_checkpoint(self.run_dir, self.step, model_state(self.model), state,
                             keep=self.cfg.train.keep_checkpoints)
        self.ledger.save(self.run_dir / "ledger.json")

    def _plan_for_budget(self, started: float, first_step: int):
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
            left = t.time_budget_s - (time.perf_counter() - started)
            # keep ~4% of the budget for the periodic evaluations and the final checkpoint
            fit = self.step + int(0.96 * left / per_step)
            self.planned_steps = max(self.step + 1, min(t.steps, fit))

    def fit(self) -> TrainResult:
        t = self.cfg.train
        first, started = self.step, time.perf_counter()
        progress = Progress(self.planned_steps, enabled=t.progress, start_step=self.step)
        metrics_path = self.run_dir / "metrics.jsonl"
        with _sigint_stops(self._stop), progress:
            while self.step < self.planned_steps and not self._stop.is_set():
                rec = self.train_step()
                self._plan_for_budget(started, first)
                progress.update(rec, total=self.planned_steps)
                if self.step % t.log_every == 0 or self.step == self.planned_steps:
                    runs.append_jsonl(metrics_path, {"kind": "train", **rec})
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.planned_steps:
                    ev = self.evaluate()
                    runs.append_jsonl(metrics_path, {"kind": "eval", "step": self.step,
                                                     **self._progress(), **ev})
                    progress.note(f"step {self.step}: val loss {ev['loss']:.4f}, "
                                  f"{ev['bits_per_byte']:.3f} bits/byte")
                if t.save_every and self.step % t.save_every == 0:
                    self.save()
                if t.time_budget_s and time.perf_counter() - started > t.time_budget_s:
                    progress.note(f"time budget of {t.time_budget_s:.0f} s reached")
                    break
        interrupted = self._stop.is_set()
        final = self.evaluate()
        runs.append_jsonl(metrics_path, {"kind": "eval", "step": self.step, **self._progress(),
                                         **final})
        self.save()
        return TrainResult(self.run_dir, self.step, final, self.ledger.to_dict(), interrupted)

    def _progress(self) -> dict:
        """Where the run stands, for an evaluation's metrics line: training seconds (the
        ledger's, evaluations excluded) and FLOPs so far."""
        lg = self.ledger
        return {"train_s": lg.wall_time_s, "flops_forward": lg.flops_forward,
                "flops_backward": lg.flops_backward}

    def request_stop(self):
        """Ask the loop to stop after the current step (what Ctrl-C does)."""
        self._stop.set()


@contextlib.contextmanager
def _sigint_stops(event: threading.Event):
    """First Ctrl-C: stop after this step and save. Second: abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def train(cfg: RunConfig | dict, hooks: Sequence[TrainHook] = ()) -> TrainResult:
    """Train a model from a config (a RunConfig or a nested dict); returns the result."""
    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    return Trainer(cfg, hooks).fit()
