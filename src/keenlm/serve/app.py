"""The OpenAI-compatible HTTP API over keenlm.serve.scheduler: FastAPI for routing and request
validation, uvicorn as the server (keenlm.serve.run), sse-starlette for streamed responses,
prometheus-client for ``/metrics``. No HTTP is parsed by hand.

    GET  /                          the playground page (static/playground.html)
    GET  /health                    liveness (no key needed)
    GET  /v1/models                 the one model served
    POST /v1/completions            prompt (text or token ids) -> n continuations; stream
    POST /v1/chat/completions       messages through the model's chat template; stream
    POST /tokenize, /detokenize     text <-> token ids
    GET  /metrics                   Prometheus: requests, tokens, queue, batch, KV pool, TTFT, ITL

Request fields follow OpenAI's API (``max_tokens``, ``temperature``, ``top_p``, ``n``,
``stream``, ``stop``, ``seed``, ``user``) plus ``top_k``; a field OpenAI does not define is
refused, as OpenAI refuses it. Every error is OpenAI's error object with a 4xx status: bad JSON
or types and out-of-range values 400, a missing or wrong key 401, an unknown model or route 404,
a full queue 429 with ``Retry-After``. Fields this server does not implement yet (``suffix``,
penalties, logprobs or echo with ``stream`` or a strategy) are refused with a 400 that says so,
never silently ignored. Chat takes ``logprobs`` and ``top_logprobs`` (0-20) in OpenAI's chat
shape.

``strategy`` (with ``task`` and ``scorer``), extension fields: the request runs a test-time strategy of
keenlm.infer.search (majority, weighted_majority, best_of_n, beam, dvts, budget_forcing) with
``n`` as its sample budget, sampling through the same scheduler (keenlm.serve.strategies); the
answer is the chosen completion and a ``keenlm`` field lists the candidates, their answers,
votes and scores, and the compute spent.

Completions take ``logprobs`` (0-5) and ``echo``: the log-probability of each generated token
(and of each prompt token with ``echo``; ``max_tokens`` 0 then scores the prompt alone, what
lm-evaluation-harness' ``local-completions`` asks for loglikelihood tasks), from the model's
distribution before temperature, top-k and top-p, with the ``logprobs`` most likely tokens.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from keenlm.infer.search import Budget
from keenlm.serve.scheduler import QueueFull, Request, Scheduler
from keenlm.serve.schema import (MAX_N, APIError, ChatRequest, CompletionRequest,
                                 DetokenizeRequest, Sampling, TokenizeRequest, error_body)
from keenlm.serve.strategies import SharedScorer, run_strategy

PAGE = Path(__file__).parent / "static" / "playground.html"  # GET /: chat and strategies


class Metrics:
    def __init__(self, sched: Scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("keenlm_requests", "requests accepted", registry=r)
        self.tokens_in = Counter("keenlm_prompt_tokens", "prompt tokens", registry=r)
        self.tokens_out = Counter("keenlm_generated_tokens", "generated tokens", registry=r)
        self.errors = Counter("keenlm_request_errors", "requests answered with an error", registry=r)
        self.ttft = Histogram("keenlm_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("keenlm_inter_token_latency_seconds", "time between tokens", registry=r,
                             buckets=(.002, .005, .01, .02, .05, .1, .25, .5, 1))
        Gauge("keenlm_queue_depth", "requests waiting", registry=r).set_function(sched.queue_depth)
        Gauge("keenlm_running_sequences", "sequences in the batch",
              registry=r).set_function(lambda: len(sched.running))
        Gauge("keenlm_kv_pool_slots_used", "KV-cache slots in use",
              registry=r).set_function(lambda: sched.max_batch - len(sched.free))
        Gauge("keenlm_kv_pool_slots", "KV-cache slots", registry=r).set(sched.max_batch)
        Gauge("keenlm_kv_pool_bytes", "KV-cache pool size", registry=r).set(sched.pool_bytes)
        Gauge("keenlm_prompt_tokens_reused", "prompt positions taken from a slot's earlier "
              "prompt instead of prefilled", registry=r).set_function(
            lambda: sched.stats["tokens_reused"])


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
    return stops


def _cut(text: str, stops) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def create_app(sched: Scheduler, model_name: str, api_key: Optional[str] = None,
               reward: Optional[SharedScorer] = None) -> FastAPI:
    """The FastAPI application serving ``sched``'s model under ``model_name``; ``reward``: the
    reward model that strategies may score with."""
    app = FastAPI(title="keenlm", docs_url=None, redoc_url=None)
    metrics = Metrics(sched)
    tok = sched.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        metrics.errors.inc()
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        metrics.errors.inc()
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = f"{loc}: {first.get('msg')}" if loc else str(first.get("msg", "invalid request"))
        return JSONResponse(error_body(msg, "invalid_request_error", loc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    def authorized(request: HTTPRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    guard = [Depends(authorized)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        # the page holds no secret: with --api-key it asks for the key and sends it itself
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=guard)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "keenlm"}]}

    @app.get("/metrics", dependencies=guard)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", dependencies=guard)
    async def tokenize(body: TokenizeRequest):
        return {"tokens": tok.encode_prompt(body.prompt)}

    @app.get("/tokenizer_info", dependencies=guard)
    async def tokenizer_info():
        """vLLM's route: what a client needs to tokenize as the server does (lm-evaluation-
        harness' remote tokenizer reads it)."""
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else None
        return {"eos_token": eos, "bos_token": getattr(tok, "bos_token", None) or None,
                "pad_token": None,
                "chat_template": getattr(tok, "chat_template", None),
                "vocab_size": sched.model.cfg.vocab_size, "model_max_length": sched.max_len}

    @app.post("/detokenize", dependencies=guard)
    async def detokenize(body: DetokenizeRequest):
        if any(t < 0 or t >= sched.model.cfg.vocab_size for t in body.tokens):
            raise APIError(400, "a token id is outside the vocabulary", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    def check(body: Sampling) -> None:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} is not served here (this server: "
                                f"{model_name!r})", kind="not_found_error", param="model",
                           code="model_not_found")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server yet", param=name)

    def start(body: Sampling, prompt: list[int], max_tokens: int, logprobs=None, echo=False):
        """Submit; returns (request, asyncio queue of (choice, token, finish, logprob) events;
        with echo, a ("prompt", entries) event first)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731
        req = Request(prompt=prompt, max_tokens=max_tokens, temperature=body.temperature,
                      top_p=body.top_p, top_k=body.top_k, n=body.n, seed=body.seed,
                      stop=_stops(body.stop), logprobs=logprobs, echo=echo,
                      on_event=lambda i, t, f, lp=None: put((i, t, f, lp)),
                      on_prompt=lambda entries: put(("prompt", entries, None, None)))
        if max_tokens + len(prompt) > sched.max_len:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) "
                                f"exceed the context ({sched.max_len})", param="max_tokens")
        try:
            sched.submit(req)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        metrics.requests.inc()
        metrics.tokens_in.inc(len(prompt))
        return req, events

    async def collect(req, events):
        """(token ids, finish reasons, logprob entries, prompt entries) of every choice."""
        outs, reasons, done = [[] for _ in range(req.n)], [None] * req.n, 0
        lps, prompt_entries = [[] for _ in range(req.n)], []
        first, last = None, None
        try:
            while done < req.n:
                i, t, f, lp = await events.get()
                if i == "prompt":
                    prompt_entries = t
                    continue
                if lp is not None:
                    lps[i].append((t, lp[0], lp[1]))
                if t is not None:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        metrics.ttft.observe(now - req.submitted)
                    elif last is not None:
                        metrics.itl.observe(now - last)
                    last = now
                    outs[i].append(t)
                    metrics.tokens_out.inc()
                if f is not None:
                    reasons[i], done = f, done + 1
        finally:
            req.cancelled = done < req.n  # the client went away: free the slots
        return outs, reasons, lps, prompt_entries

    def chat_logprobs(entries) -> dict:
        """OpenAI's chat ``logprobs``: per token its text, bytes, log-probability and the
        most likely alternatives."""
        def item(t, lp):
            piece = tok.decode([t])
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
        return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                            for t, lp, top in entries]}

    def logprob_object(entries, k: int) -> dict:
        """OpenAI's completions ``logprobs``: tokens, their log-probabilities, the top k of each
        and each token's character offset in the text."""
        obj = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for t, lp, top in entries:
            piece = tok.decode([t])
            obj["tokens"].append(piece)
            obj["token_logprobs"].append(lp)
            tops: dict = {}
            for i, v in top[:k]:  # most likely first; tokens that print alike keep the first
                tops.setdefault(tok.decode([i]), v)
            obj["top_logprobs"].append(None if lp is None else tops)
            obj["text_offset"].append(offset)
            offset += len(piece)
        return obj

    def finish_reason(reason: str) -> str:
        if reason.startswith("error"):
            raise APIError(500, f"generation failed: {reason[7:]}", kind="server_error")
        return "length" if reason == "length" else "stop"

    async def strategy(body: Sampling, prompt_text: str, max_tokens: int) -> dict:
        """Run the request's strategy in a worker thread (it waits on the scheduler)."""
        if body.stream:
            raise APIError(400, "strategy does not stream yet", param="stream")
        try:
            budget = Budget(n=body.n, max_new_tokens=max_tokens, temperature=body.temperature,
                            seed=body.seed or 0)
            return await asyncio.to_thread(run_strategy, sched, body.strategy, prompt_text,
                                           budget, body.task, body.scorer, reward)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except (ValueError, KeyError) as e:
            raise APIError(400, f"strategy: {e}", param="strategy") from None

    def strategy_usage(out: dict) -> dict:
        c = out["compute"]
        return {"prompt_tokens": c["policy_prefill_tokens"], "completion_tokens": c["policy_tokens"],
                "total_tokens": c["policy_prefill_tokens"] + c["policy_tokens"]}

    def usage(n_prompt: int, outs) -> dict:
        n_out = sum(len(o) for o in outs)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out}

    def prompts_of(body: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt of the request."""
        p = body.prompt
        many = isinstance(p, list) and p and not isinstance(p[0], int)
        items = p if many else [p]
        if not items:
            raise APIError(400, "the prompt is empty", param="prompt")
        out = []
        for item in items:
            ids = item if isinstance(item, list) else tok.encode_prompt(item)
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            if min(ids) < 0 or max(ids) >= sched.model.cfg.vocab_size:
                raise APIError(400, "a prompt token id is outside the vocabulary", param="prompt")
            out.append((item if isinstance(item, str) else tok.decode(ids), ids))
        return out

    def completion_choices(text: str, req, outs, reasons, lps, prompt_entries, body, first: int):
        head = text if body.echo else ""
        choices = []
        for i, (o, r) in enumerate(zip(outs, reasons)):
            lp = None
            if body.logprobs is not None:
                lp = logprob_object((prompt_entries if body.echo else []) + lps[i], body.logprobs)
            choices.append({"index": first + i, "text": head + _cut(tok.decode(o), req.stop),
                            "logprobs": lp, "finish_reason": finish_reason(r)})
        return choices

    @app.post("/v1/completions", dependencies=guard)
    async def completions(body: CompletionRequest):
        check(body)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported by this server yet", param="suffix")
        if body.stream and (body.echo or body.logprobs is not None):
            raise APIError(400, "logprobs and echo are not supported with stream yet",
                           param="stream")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 needs echo (to score the prompt)", param="max_tokens")
        prompts = prompts_of(body)
        if len(prompts) > 1 and (body.stream or body.strategy is not None):
            raise APIError(400, "several prompts in one request are not supported with stream "
                                "or strategy yet", param="prompt")
        if len(prompts) * body.n > MAX_N * 4:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n}: at most {MAX_N * 4} "
                                "completions per request", param="prompt")
        if body.strategy is not None:
            out = await strategy(body, prompts[0][0], body.max_tokens or 64)
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                    "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": out["completion"], "logprobs": None,
                                 "finish_reason": "stop"}],
                    "usage": strategy_usage(out), "keenlm": out}
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        started = []
        try:  # every prompt is queued before any is awaited: they decode in the same batches
            for _, ids in prompts:
                started.append(start(body, ids, max_tokens, body.logprobs, body.echo))
        except APIError:
            for req, _ in started:
                req.cancelled = True
            raise
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            req, events = started[0]
            return EventSourceResponse(stream(req, events, cid, created, chat=False),
                                       ping=15, sep="\n")
        results = await asyncio.gather(*(collect(req, events) for req, events in started))
        choices, n_in, outs_all = [], 0, []
        for k, ((text, ids), (req, _), (outs, reasons, lps, entries)) in enumerate(
                zip(prompts, started, results)):
            choices += completion_choices(text, req, outs, reasons, lps, entries, body, k * body.n)
            n_in += len(ids)
            outs_all += outs
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(n_in, outs_all)}

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat(body: ChatRequest):
        check(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.logprobs and (body.stream or body.strategy is not None):
            raise APIError(400, "logprobs are not supported with stream or strategy yet",
                           param="logprobs")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           param="messages")
        text = tok.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages],
                                       add_generation_prompt=True)
        prompt = tok.encode_prompt(text)
        if body.strategy is not None:
            out = await strategy(body, text, body.max_completion_tokens or body.max_tokens or 64)
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                    "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": out["completion"]},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": strategy_usage(out), "keenlm": out}
        req, events = start(body, prompt, body.max_completion_tokens or body.max_tokens or
                            max(1, sched.max_len - len(prompt) - 1),
                            logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return EventSourceResponse(stream(req, events, cid, created, chat=True),
                                       ping=15, sep="\n")
        outs, reasons, lps, _ = await collect(req, events)
        choices = [{"index": i, "message": {"role": "assistant",
                                            "content": _cut(tok.decode(o), req.stop)},
                    "logprobs": chat_logprobs(lps[i]) if body.logprobs else None,
                    "finish_reason": finish_reason(r)}
                   for i, (o, r) in enumerate(zip(outs, reasons))]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(len(prompt), outs)}

    async def stream(req, events, cid, created, chat: bool):
        """Server-sent events: one chunk per new piece of text of a choice, then [DONE]. Text
        that could begin a stop string, or an unfinished UTF-8 character, is held back."""
        outs, sent, done = [[] for _ in range(req.n)], [0] * req.n, 0
        hold = max((len(s) for s in req.stop), default=1) - 1
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i, text, reason=None) -> str:
            if chat:
                delta = {"content": text} if text else {}
                if sent[i] == 0 and text is not None:
                    delta["role"] = "assistant"
                choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
            return json.dumps({"id": cid, "object": kind, "created": created, "model": model_name,
                               "choices": [choice]})

        try:
            first = None
            while done < req.n:
                i, t, f, _ = await events.get()
                if t is not None:
                    if first is None:
                        first = time.perf_counter()
                        metrics.ttft.observe(first - req.submitted)
                    metrics.tokens_out.inc()
                    outs[i].append(t)
                    text = _cut(tok.decode(outs[i]), req.stop).rstrip("\ufffd")
                    ready = len(text) - hold if req.stop else len(text)
                    if ready > sent[i]:
                        yield {"data": chunk(i, text[sent[i]:ready])}
                        sent[i] = ready
                if f is not None:
                    done += 1
                    text = _cut(tok.decode(outs[i]), req.stop)
                    tail = text[sent[i]:]
                    sent[i] = len(text)
                    yield {"data": chunk(i, tail, "error" if f.startswith("error") else
                                         ("length" if f == "length" else "stop"))}
            yield {"data": "[DONE]"}
        finally:
            req.cancelled = done < req.n  # the client went away mid-stream: free its slots

    return app

