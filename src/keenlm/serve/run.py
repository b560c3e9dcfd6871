"""Start a server: load the model (any format ``keenlm.load`` reads), start the scheduler, run
uvicorn. Binds to 127.0.0.1 unless told otherwise. On SIGTERM or Ctrl-C uvicorn stops taking
connections and waits for the open ones; the scheduler then finishes what it holds within
``drain_s`` seconds and cancels the rest."""
from __future__ import annotations

import signal
from pathlib import Path

import uvicorn

from keenlm.api import load
from keenlm.infer.reward import load_reward_model
from keenlm.serve.app import create_app
from keenlm.serve.scheduler import Scheduler
from keenlm.serve.strategies import SharedScorer


def build(model: str, *, quant: str = "q4", device: str = "cpu", max_batch: int = 8,
          max_len: int = 1024, max_queue: int = 64, api_key: str | None = None,
          name: str | None = None, threads: int = 0, prefill_chunk: int = 128,
          reward_model: str | None = None):
    """(FastAPI app, scheduler) for ``model``; the scheduler is started. ``threads``: the decode
    step's threads (0: torch's thread count); ``reward_model``: a reward model folder
    (keenlm train-reward) that strategies may score with."""
    reward = SharedScorer(load_reward_model(reward_model, device=device)) if reward_model else None
    km = load(model, device=device, quant=quant)
    sched = Scheduler(km.net, km.tokenizer, max_batch=max_batch, max_len=max_len,
                      max_queue=max_queue, threads=threads, prefill_chunk=prefill_chunk).start()
    app = create_app(sched, name or Path(model).name, api_key=api_key, reward=reward)
    return app, sched


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, drain_s: float = 30.0,
          **options) -> None:
    app, sched = build(model, **options)
    engine = "the C decode step" if sched.engine is not None else "the PyTorch model"
    print(f"keenlm serve: {model} on http://{host}:{port} ({sched.max_batch} slots of "
          f"{sched.max_len} positions, KV pool {sched.pool_bytes / 2**20:.0f} MB; decoding with "
          f"{engine})")
    # uvicorn catches SIGTERM / SIGINT, drains, then raises the signal again under the handler
    # it found: a handler of ours makes that a clean exit (status 0) instead of death by signal
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=int(drain_s))
    finally:
        signal.signal(signal.SIGTERM, previous)
        sched.stop(drain_s)
