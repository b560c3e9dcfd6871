"""Live progress for the training loop: a rich bar on a terminal, plain log lines elsewhere."""
from __future__ import annotations

import sys
import time


class Progress:
    """Shows step, loss, tokens/s and ETA. Off a terminal (CI, pipes) prints a line now and then."""

    def __init__(self, total: int, enabled: bool = True, start_step: int = 0, every_s: float = 10.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.start_step = start_step
        self._bar = None
        self._t0 = self._last_print = time.perf_counter()  # first line after every_s, not step 1
        self._live = enabled and sys.stdout.isatty()

    def __enter__(self):
        if self._live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start_step,
                                            info="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, rec: dict, total: int | None = None, info: str | None = None):
        """rec: the step's record; info: what to show (default: its loss and tokens/s)."""
        if total is not None:
            self.total = total
        info = info or f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=rec["step"], total=self.total, info=info)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last_print >= self.every_s or rec["step"] == self.total):
            self._last_print = now
            done = rec["step"] - self.start_step
            eta = (now - self._t0) / max(done, 1) * (self.total - rec["step"])
            print(f"step {rec['step']}/{self.total}  {info}  ETA {eta:.0f}s", flush=True)

    def note(self, text: str):
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, flush=True)
