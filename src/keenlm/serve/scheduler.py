"""Continuous batching: one thread that admits requests into the running batch at every decode
step and retires them as they finish.

The model's keys and values live in one pool allocated at start-up: ``max_batch`` rows (slots)
of ``max_len`` positions each, (L, max_batch, Hk, max_len, D) for keys and again for values, so
memory is bounded and known (``pool_bytes``). A request of ``n`` samples takes ``n`` slots: its
prompt is prefilled once (the PyTorch model, one forward pass) and the prompt's keys and values
are copied into each of its slots. Every loop iteration then

    1. admits queued requests while slots are free (prefill, first token of each sample),
    2. runs one decode step for every running sequence at once, each at its own length in its
       own slot (keenlm.infer.engine's ``step_rows``: the C step, for models it runs; otherwise
       each sequence steps alone through the PyTorch model),
    3. samples each sequence's next token with its own settings and generator, and retires the
       sequences that hit end-of-text, a stop string, ``max_tokens`` or the context, or whose
       client went away; their slots are free at the next admission.

Events reach each request's consumer (the HTTP handlers of keenlm.serve.app) through a
callback the request carries; the scheduler never blocks on a client. A request the model
cannot take (prompt beyond the context) is refused before it is queued, and a failure inside one
request ends that request with an error, not the loop.

Legend: L layers, Hk key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Optional

import torch

from keenlm.config import GenerateConfig
from keenlm.infer.engine import DecodeEngine, unsupported
from keenlm.infer.generate import sample_next
from keenlm.model.attention import KVCache


@dataclasses.dataclass
class Request:
    """One completion request: ``n`` samples of the continuation of ``prompt`` (token ids)."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    # on_event(sample index, token id or None, finish reason or None[, logprobs]); finish
    # reasons: "stop", "length", "cancelled", "error: ...". With ``logprobs`` = k >= 0 each
    # token's event also carries (its log-probability, the k most likely (id, log-probability)),
    # from the model's distribution before temperature and top-k/top-p.
    on_event: Callable[..., None] = lambda i, t, f, lp=None: None
    logprobs: Optional[int] = None
    # with ``echo``: on_prompt(list of (id, log-probability or None, top k)) for the prompt's
    # tokens (the first has none), once, before any other event; ``max_tokens`` may then be 0
    echo: bool = False
    on_prompt: Callable[[list], None] = lambda entries: None
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class _Seq:
    req: Request
    index: int  # which of the request's n samples
    slot: int
    length: int  # positions in the cache
    last: int  # the token to feed next
    out: list[int]
    gen: Optional[torch.Generator]


class QueueFull(Exception):
    """The request queue is at ``max_queue``: the server answers 429."""


class Scheduler:
    """Continuous batching over one model (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_len: int = 0,
                 max_queue: int = 64, threads: int = 0):
        cfg = model.cfg
        if not 1 <= max_batch <= 16:
            raise ValueError(f"max_batch {max_batch}: 1 to 16 (the decode step's rows)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.threads = threads or torch.get_num_threads()
        p = model.norm.weight
        shape = (cfg.n_layer, max_batch, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32, device=p.device)
        self.v = torch.zeros(shape, dtype=torch.float32, device=p.device)
        self.engine = DecodeEngine(model) if unsupported(model) is None else None
        self.pending: "queue.Queue[Request]" = queue.Queue()
        self.running: list[_Seq] = []
        self.free = list(range(max_batch))
        self.stats = {"requests": 0, "tokens_in": 0, "tokens_out": 0}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="keenlm-scheduler", daemon=True)

    @property
    def pool_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def queue_depth(self) -> int:
        return self.pending.qsize()

    def submit(self, req: Request) -> None:
        """Queue a request; ValueError for one the model cannot take, QueueFull when full."""
        if not req.prompt:
            raise ValueError("the prompt has no tokens")
        if req.max_tokens < (0 if req.echo else 1):
            raise ValueError(f"max_tokens {req.max_tokens}: at least 1 (0 only with echo)")
        if req.n > self.max_batch:
            raise ValueError(f"n={req.n} is more than the server's {self.max_batch} slots")
        if len(req.prompt) + 1 > self.max_len:
            raise ValueError(f"the prompt has {len(req.prompt)} tokens; the context is "
                             f"{self.max_len}")
        if max(req.prompt) >= self.model.cfg.vocab_size or min(req.prompt) < 0:
            raise ValueError("a prompt token id is outside the vocabulary")
        if self.pending.qsize() >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are waiting")
        self.stats["requests"] += 1
        self.stats["tokens_in"] += len(req.prompt)
        self.pending.put(req)
        self._wake.set()

    # ---------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit()
            self.running = [s for s in self.running if not self._retire_if_cancelled(s)]
            if not self.running:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._decode()
            except Exception as e:  # noqa: BLE001 - one failing step ends its requests, not the server
                for s in self.running:
                    self._finish(s, f"error: {e}")
                self.running = []

    def _admit(self) -> None:
        while self.pending.qsize() and len(self.free) >= self._peek_n():
            req = self.pending.get_nowait()
            if req.cancelled:
                continue
            try:
                self._prefill(req)
            except Exception as e:  # noqa: BLE001 - a bad request ends alone
                for i in range(req.n):
                    req.on_event(i, None, f"error: {e}")

    def _peek_n(self) -> int:
        with self.pending.mutex:
            return self.pending.queue[0].n if self.pending.queue else 1

    @torch.no_grad()
    def _prefill(self, req: Request) -> None:
        """The prompt once, its keys and values copied into each sample's slot, the first
        token of each sample sampled from the prompt's last logits."""
        n_prompt = len(req.prompt)
        cache = KVCache(self.model.cfg.n_layer, 1, self.model.cfg.kv_heads, n_prompt,
                        self.model.cfg.head_dim, self.k.device, torch.float32)
        out = self.model(torch.tensor([req.prompt], device=self.k.device), cache=cache,
                         last_only=not req.echo).float()
        if req.echo:  # each prompt token's log-probability given the ones before it
            lps = torch.log_softmax(out[0, :-1], dim=-1)
            k = req.logprobs or 0
            entries = [(req.prompt[0], None, [])]
            for j, t in enumerate(req.prompt[1:]):
                top = torch.topk(lps[j], k) if k else None
                entries.append((t, float(lps[j, t]), list(zip(top.indices.tolist(), top.values.tolist()))
                                if top is not None else []))
            req.on_prompt(entries)
        logits = out[:, -1]
        if req.max_tokens == 0:  # the prompt's log-probabilities were all that was asked
            for i in range(req.n):
                req.on_event(i, None, "length")
            return
        for i in range(req.n):
            slot = self.free.pop(0)
            self.k[:, slot, :, :n_prompt] = cache.k[:, 0]
            self.v[:, slot, :, :n_prompt] = cache.v[:, 0]
            gen = None
            if req.temperature > 0:
                gen = torch.Generator(device=self.k.device)
                gen.manual_seed((req.seed if req.seed is not None else
                                 int(torch.randint(0, 2**62, (1,)))) + i)
            seq = _Seq(req, i, slot, n_prompt, -1, [], gen)
            self._take(seq, logits)
            if seq.slot >= 0:
                self.running.append(seq)

    @torch.no_grad()
    def _decode(self) -> None:
        # the step's own pool holds the threads; torch's (sampling, small ops) take one
        # meanwhile, as keenlm.quant.q4.decode_threads arranges for generate: two pools
        # spinning on the same cores starve each other
        if self.engine is None:  # the PyTorch model decodes: it keeps torch's threads
            return self._decode_rows()
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._decode_rows()
        finally:
            torch.set_num_threads(n)

    def _decode_rows(self) -> None:
        seqs = self.running
        tokens = torch.tensor([s.last for s in seqs])
        lengths = torch.tensor([s.length for s in seqs])
        if self.engine is not None:
            mask = torch.ones(len(seqs), self.max_len, dtype=torch.bool)
            logits = self.engine.step_rows(tokens, lengths, lengths,
                                           torch.tensor([s.slot for s in seqs]), self.k, self.v,
                                           mask, self.threads)
        else:  # the PyTorch model, one sequence at a time on a view of its slot
            logits = torch.cat([self._torch_step(s) for s in seqs])
        greedy = logits.argmax(-1).tolist()  # one call for every row that samples greedily
        for s, row, g in zip(seqs, logits, greedy):
            s.length += 1
            self._take(s, row[None].float(), g if s.req.temperature == 0 else None)
        self.running = [s for s in seqs if s.slot >= 0]

    def _torch_step(self, s: _Seq) -> torch.Tensor:
        cache = KVCache.__new__(KVCache)  # a view of the slot's rows, no copy
        cache.k, cache.v = self.k[:, s.slot:s.slot + 1], self.v[:, s.slot:s.slot + 1]
        cache.max_len, cache.length, cache._pending = self.max_len, s.length, 0
        pos = torch.tensor([[s.length]], device=self.k.device)
        return self.model(torch.tensor([[s.last]], device=self.k.device), cache=cache,
                          positions=pos)[:, -1]

    def _take(self, s: _Seq, logits: torch.Tensor, greedy: Optional[int] = None) -> None:
        """Sample the next token of ``s`` (``greedy``: already chosen), report it, and retire
        ``s`` if it is done."""
        r = s.req
        if greedy is not None:
            tok = greedy
        else:
            cfg = GenerateConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                 max_new_tokens=r.max_tokens)
            seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
            tok = int(sample_next(logits, seen, cfg, s.gen)[0])
        eos = self.tokenizer.eos_id
        if eos is not None and tok == eos:
            return self._finish(s, "stop")
        s.out.append(tok)
        s.last = tok
        self.stats["tokens_out"] += 1
        if r.logprobs is None:
            r.on_event(s.index, tok, None)
        else:
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            top = torch.topk(lp, r.logprobs) if r.logprobs else None
            r.on_event(s.index, tok, None, (float(lp[tok]), list(zip(top.indices.tolist(),
                                                                      top.values.tolist()))
                                            if top is not None else []))
        if r.stop and any(x in self.tokenizer.decode(s.out[-64:]) for x in r.stop):
            return self._finish(s, "stop")
        if len(s.out) >= r.max_tokens or s.length + 1 >= self.max_len:
            return self._finish(s, "length")

    def _retire_if_cancelled(self, s: _Seq) -> bool:
        if s.req.cancelled:
            self._finish(s, "cancelled")
            return True
        return False

    def _finish(self, s: _Seq, reason: str) -> None:
        if s.slot >= 0:
            self.free.append(s.slot)
            s.slot = -1
        s.req.on_event(s.index, None, reason)
