"""Continuous batching: one thread that admits requests into the running batch at every decode
step and retires them as they finish.

The model's keys and values live in one pool allocated at start-up: ``max_batch`` rows (slots)
of ``max_len`` positions each, (L, max_batch, Hk, max_len, D) for keys and again for values, so
memory is bounded and known (``pool_bytes``). A request of ``n`` samples takes ``n`` slots: its
prompt is prefilled once, straight into its first slot (the PyTorch model on a view of the
slot), and the prompt's keys and values are copied into its other slots. Every loop iteration

    1. admits the next queued request when its slots are free and no prefill is under way,
    2. prefills one chunk of ``prefill_chunk`` prompt positions of the request being admitted
       (all of its chunks when nothing is decoding); after the last chunk each sample's first
       token is sampled and the samples join the batch,
    3. runs one decode step for every running sequence at once, each at its own length in its
       own slot (keenlm.infer.engine's ``step_rows``: the C step, for models it runs; otherwise
       each sequence steps alone through the PyTorch model),
    4. samples each sequence's next token with its own settings and generator, and retires the
       sequences that hit end-of-text, a stop string, ``max_tokens`` or the context, or whose
       client went away; their slots are free at the next admission.

Chunked prefill: a long prompt no longer stops every running sequence for its whole prefill;
each decode step waits for one chunk at most. Chunks always start at multiples of
``prefill_chunk`` (not where the load happens to cut), so a prompt's keys and values, and the
greedy output, are the same whether it was admitted alone or under load.

Prompt reuse: a slot keeps the keys and values of the prompt it last held (``slot_prompt``).
A new request takes the free slot whose prompt shares the longest prefix with its own and
prefills only from there, rounded down to a chunk boundary so the reused positions are exactly
the ones a fresh prefill would compute. A repeated system prompt, or a conversation's earlier
turns, cost no prefill. Requests that ask for the prompt's log-probabilities (``echo``) are
prefilled whole, in one forward pass, as an evaluation scores a sequence (so their figures do not
depend on the chunk size).

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
class _Prefill:
    """The request being admitted: its slots, and how far its prompt is in ``slots[0]``."""
    req: Request
    slots: list[int]
    done: int  # prompt positions whose keys and values are in slots[0]
    entries: list  # with echo: (id, log-probability, top k) of each prompt token so far
    logits: Optional[torch.Tensor] = None  # the last position's, once the prompt is in


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
                 max_queue: int = 64, threads: int = 0, prefill_chunk: int = 128):
        cfg = model.cfg
        if not 1 <= max_batch <= 16:
            raise ValueError(f"max_batch {max_batch}: 1 to 16 (the decode step's rows)")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk {prefill_chunk}: at least 1 position")
        self.prefill_chunk = prefill_chunk
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
        self.prefilling: Optional[_Prefill] = None
        self.free = list(range(max_batch))
        self.slot_prompt: list[list[int]] = [[] for _ in range(max_batch)]  # reusable positions
        self.stats = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "tokens_reused": 0}
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
            if self.prefilling is not None:
                p = self.prefilling
                try:  # a chunk per decode step; the whole prompt when nothing else waits on it
                    self._prefill(p, whole=not self.running)
                except Exception as e:  # noqa: BLE001 - a bad request ends alone
                    self._abandon(p, f"error: {e}")
            if not self.running:
                if self.prefilling is None:
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
        """Start the prefill of the next queued request whose slots are free."""
        while self.prefilling is None and self.pending.qsize() and len(self.free) >= self._peek_n():
            req = self.pending.get_nowait()
            if req.cancelled:
                continue
            reuse, first = 0, self.free[0]
            if not req.echo:  # the free slot holding the longest prefix of this prompt
                for slot in self.free:
                    n = _common(self.slot_prompt[slot], req.prompt)
                    if n > reuse:
                        reuse, first = n, slot
                # whole chunks only, and at least the last prompt position is computed anew
                reuse = min(reuse, len(req.prompt) - 1) // self.prefill_chunk * self.prefill_chunk
            slots = [first] + [x for x in self.free if x != first][:req.n - 1]
            self.free = [x for x in self.free if x not in slots]
            for x in slots:
                self.slot_prompt[x] = req.prompt[:reuse] if x == first else []
            self.stats["tokens_reused"] += reuse
            self.prefilling = _Prefill(req, slots, reuse,
                                       [(req.prompt[0], None, [])] if req.echo else [])

    def _peek_n(self) -> int:
        with self.pending.mutex:
            return self.pending.queue[0].n if self.pending.queue else 1

    def _slot_cache(self, slot: int, length: int) -> KVCache:
        """A KVCache that reads and writes one slot of the pool in place (a view, no copy)."""
        cache = KVCache.__new__(KVCache)
        cache.k, cache.v = self.k[:, slot:slot + 1], self.v[:, slot:slot + 1]
        cache.max_len, cache.length, cache._pending = self.max_len, length, 0
        return cache

    @torch.no_grad()
    def _prefill(self, p: _Prefill, whole: bool) -> None:
        """The next chunk of ``p``'s prompt (every chunk left if ``whole``) into its first slot;
        once the prompt is in, its other slots get a copy and every sample its first token."""
        req, n_prompt = p.req, len(p.req.prompt)
        if req.cancelled:
            return self._abandon(p, "cancelled")
        while p.done < n_prompt:
            end = min(n_prompt, (p.done // self.prefill_chunk + 1) * self.prefill_chunk)
            if req.echo:  # scored prompts go in whole: the log-probabilities of one forward pass
                end = n_prompt
            ids = torch.tensor([req.prompt[p.done:end]], device=self.k.device)
            out = self.model(ids, cache=self._slot_cache(p.slots[0], p.done),
                             last_only=not req.echo).float()
            if req.echo:  # each prompt token's log-probability given the ones before it
                self._echo(p, out[0], end)
            p.done, p.logits = end, out[:, -1]
            self.slot_prompt[p.slots[0]] = req.prompt[:end]
            if not whole:
                break
        if p.done < n_prompt:
            return
        self.prefilling = None
        if req.echo:
            req.on_prompt(p.entries)
        if req.max_tokens == 0:  # the prompt's log-probabilities were all that was asked
            self.free += p.slots
            for i in range(req.n):
                req.on_event(i, None, "length")
            return
        first = p.slots[0]
        for i, slot in enumerate(p.slots):
            if slot != first:
                self.k[:, slot, :, :n_prompt] = self.k[:, first, :, :n_prompt]
                self.v[:, slot, :, :n_prompt] = self.v[:, first, :, :n_prompt]
                self.slot_prompt[slot] = req.prompt
            gen = None
            if req.temperature > 0:
                gen = torch.Generator(device=self.k.device)
                gen.manual_seed((req.seed if req.seed is not None else
                                 int(torch.randint(0, 2**62, (1,)))) + i)
            seq = _Seq(req, i, slot, n_prompt, -1, [], gen)
            self._take(seq, p.logits)
            if seq.slot >= 0:
                self.running.append(seq)

    def _echo(self, p: _Prefill, logits: torch.Tensor, end: int) -> None:
        prompt, k = p.req.prompt, p.req.logprobs or 0
        lps = torch.log_softmax(logits, dim=-1)
        for j, pos in enumerate(range(p.done, min(end, len(prompt) - 1))):
            t = prompt[pos + 1]
            top = torch.topk(lps[j], k) if k else None
            p.entries.append((t, float(lps[j, t]), list(zip(top.indices.tolist(),
                                                             top.values.tolist()))
                              if top is not None else []))

    def _abandon(self, p: _Prefill, reason: str) -> None:
        """End a request whose prefill failed or whose client went away; free its slots."""
        self.prefilling = None
        for slot in p.slots:
            self.slot_prompt[slot] = []
        self.free += p.slots
        for i in range(p.req.n):
            p.req.on_event(i, None, reason)

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
        return self.model(torch.tensor([[s.last]], device=self.k.device),
                          cache=self._slot_cache(s.slot, s.length))[:, -1]

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
            if reason.startswith("error"):
                self.slot_prompt[s.slot] = []
            self.free.append(s.slot)
            s.slot = -1
        s.req.on_event(s.index, None, reason)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
