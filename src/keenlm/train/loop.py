"""The loop shell every trainer shares: a run folder, resume from its newest checkpoint, save,
the metrics log, a wall-clock budget and Ctrl-C. ``Trainer`` (language modelling) and
``RLTrainer`` (GRPO / RFT) subclass it and supply one step, an evaluation and what their
checkpoint holds beside the weights; the order of things in a run lives here once.

Ctrl-C: the first SIGINT finishes the current step, saves a checkpoint and returns; a second
one aborts at once (the previous checkpoint stays valid: writes are atomic, see keenlm.runs).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

import torch

from keenlm import runs
from keenlm.model import load_model_state, model_state
from keenlm.train.progress import Progress


def pick_device(name: str) -> torch.device:
    if name != "auto":
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def sigint_stops(event: threading.Event, signals=(signal.SIGINT,)):
    """First Ctrl-C (or another of ``signals``): stop after this step and save. Second: abort."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class LoopShell:
    """What a subclass provides: ``model``, ``opt``, ``run_dir``, ``train_step() -> dict`` (which
    advances ``self.step``), ``evaluate() -> dict``, ``extra_state() / load_extra_state(state)``
    for the checkpoint, and optionally the hooks ``after_save``, ``after_step``,
    ``eval_fields``, ``step_info`` and ``eval_note``. Settings: ``planned_steps``,
    ``record_kind``, ``log_every``, ``eval_every``, ``save_every``, ``keep``, ``time_budget_s``,
    ``progress``, ``eval_at_start``. ``started`` is the loop's clock (``time.perf_counter()`` when
    ``run_loop`` began)."""

    record_kind = "train"
    eval_at_start = False
    keep = 2
    is_main = True  # the process that writes metrics (rank 0 of a distributed job)
    # signals that stop the loop after the current step, with a checkpoint (torchrun passes
    # Ctrl-C on to its workers as SIGTERM: a distributed trainer adds it)
    stop_signals = (signal.SIGINT,)

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.step = 0
        self.started = time.perf_counter()
        self._stop = threading.Event()

    # ------------------------------------------------------------------ checkpoints

    def resume(self, label: str = "step") -> bool:
        """Load the newest checkpoint of the run folder, if any; True when one was loaded."""
        ckpt = runs.latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        load_model_state(self.model, runs.load_model_state(ckpt))
        state = runs.load_trainer_state(ckpt)
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.load_extra_state(state)
        print(f"resuming {self.run_dir} from {label} {self.step}")
        return True

    def save(self):
        state = {"optimizer": self.opt.state_dict(), "step": self.step, **self.extra_state()}
        runs.save_checkpoint(self.run_dir, self.step, model_state(self.model), state, keep=self.keep)
        self.after_save()

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def after_save(self) -> None:
        pass

    # ------------------------------------------------------------------ hooks

    def after_step(self, first_step: int) -> None:
        """Called after every step (e.g. to fix a schedule's length from a time budget)."""

    def eval_fields(self, at_start: bool = False) -> dict:
        """Fields an evaluation's metrics line carries beside its results (``at_start``: the
        evaluation before the first step)."""
        return {}

    def step_info(self, rec: dict) -> str | None:
        return None

    def agree(self, flag: bool) -> bool:
        """The job's decision on a stop flag (a distributed job takes rank 0's)."""
        return flag

    def eval_note(self, ev: dict) -> str:
        return f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()
                                                 if isinstance(v, float))

    # ------------------------------------------------------------------ the loop

    def run_loop(self) -> tuple[dict | None, dict, bool]:
        """Steps until ``planned_steps``, the budget or Ctrl-C; evaluations and checkpoints on
        their schedule; a final evaluation and checkpoint. Returns (first evaluation or None,
        final evaluation, interrupted)."""
        # one writer per run folder (rank 0 of a distributed job writes it): a second job on
        # it is refused, naming this one
        with runs.hold(self.run_dir, self.record_kind) if self.is_main else contextlib.nullcontext():
            return self._run_loop()

    def _run_loop(self) -> tuple[dict | None, dict, bool]:
        first, self.started = self.step, time.perf_counter()
        metrics = self.run_dir / "metrics.jsonl"

        def log_eval(ev, at_start=False):
            if self.is_main:
                runs.append_jsonl(metrics, {"kind": "eval", "step": self.step,
                                            **self.eval_fields(at_start), **ev})

        start_eval = None
        if self.eval_at_start:
            start_eval = self.evaluate()
            log_eval(start_eval, at_start=True)
        progress = Progress(self.planned_steps, enabled=self.progress, start_step=self.step)
        with sigint_stops(self._stop, self.stop_signals), progress:
            if start_eval is not None:
                progress.note(self.eval_note(start_eval))
            while self.step < self.planned_steps and not self.agree(self._stop.is_set()):
                rec = self.train_step()
                self.after_step(first)
                progress.update(rec, total=self.planned_steps, info=self.step_info(rec))
                if self.is_main and (self.step % self.log_every == 0
                                     or self.step == self.planned_steps):
                    runs.append_jsonl(metrics, {"kind": self.record_kind, **rec})
                if self.eval_every and self.step % self.eval_every == 0 \
                        and self.step < self.planned_steps:
                    ev = self.evaluate()
                    log_eval(ev)
                    progress.note(self.eval_note(ev))
                if self.save_every and self.step % self.save_every == 0:
                    self.save()
                if self.time_budget_s and self.agree(
                        time.perf_counter() - self.started > self.time_budget_s):
                    progress.note(f"time budget of {self.time_budget_s:.0f} s reached")
                    break
        final = self.evaluate()
        log_eval(final)
        self.save()
        return start_eval, final, self._stop.is_set()

    def request_stop(self):
        """Ask the loop to stop after the current step (what Ctrl-C does)."""
        self._stop.set()
