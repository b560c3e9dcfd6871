"""keenlm serve: a live server on 127.0.0.1 (uvicorn in a thread) driven by the official openai
client and by raw HTTP for the bad inputs; continuous batching against requests run alone."""
import asyncio
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'keenlm[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from keenlm.config import ModelConfig  # noqa: E402
from keenlm.data import ByteTokenizer  # noqa: E402
from keenlm.model import build_model  # noqa: E402
from keenlm.quant.q4 import quantize_q4_model  # noqa: E402
from keenlm.serve.app import create_app  # noqa: E402
from keenlm.serve.scheduler import Request, Scheduler  # noqa: E402
from serve_helpers import greedy  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny():
    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=257, n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                                  d_ff=256, max_seq_len=256)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tok = ByteTokenizer()
    tok.chat_template = TEMPLATE
    tok.eos_id = None  # a random model may emit end-of-text any time: lengths are max_tokens
    return quantize_q4_model(net), tok


class Live:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live():
    net, tok = tiny()
    sched = Scheduler(net, tok, max_batch=8, max_len=256, max_queue=32).start()
    server = Live(create_app(sched, "tiny"))
    yield server, sched
    server.close()
    sched.stop()


def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0)


def test_completions_with_the_openai_client_stream_and_not(live):
    c = client(live)
    out = c.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=12,
                               temperature=0, n=2)
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text  # greedy
    assert out.usage.prompt_tokens == len("def add(a, b):") and out.usage.completion_tokens > 0
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=12, temperature=0, stream=True)]
    assert "".join(pieces) == out.choices[0].text
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_echo_and_logprobs_score_the_prompt_as_the_model_does(live):
    # against the reference: log_softmax of the PyTorch model's logits over the same prompt (as
    # lm-evaluation-harness' local-completions asks for loglikelihood: max_tokens 0, echo)
    c, sched = client(live), live[1]
    text = "def add(a, b):"
    out = c.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1,
                               temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text and lp.token_logprobs[0] is None
    ids = list(text.encode())
    with torch.no_grad():
        want = torch.log_softmax(sched.model(torch.tensor([ids]))[0].float(), -1)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - float(want[j - 1, ids[j]])) < 1e-4
        assert max(lp.top_logprobs[j].values()) >= lp.token_logprobs[j] - 1e-6
    gen = c.completions.create(model="tiny", prompt=text, max_tokens=4, logprobs=2, temperature=0)
    glp = gen.choices[0].logprobs
    assert len(glp.token_logprobs) == len(glp.tokens) == 4
    for lp_, top in zip(glp.token_logprobs, glp.top_logprobs):  # greedy: the most likely token
        assert abs(lp_ - max(top.values())) < 1e-5 and len(top) <= 2


def test_chat_logprobs_in_openai_shape(live):
    c = client(live)
    out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-5
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def test_chat_and_seeded_sampling_are_reproducible(live):
    c = client(live)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
               temperature=0.9, seed=7)
    a, b = c.chat.completions.create(**ask), c.chat.completions.create(**ask)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(**ask, stream=True))
    assert text == a.choices[0].message.content


def test_continuous_batching_admits_mid_generation_and_changes_no_token(live):
    _, sched = live
    assert sched.engine is not None  # the C decode step, rows at different lengths
    long_ids, short_ids = list(b"def long_function(x):"), list(b"import os")

    def run(prompt, n_tokens, log, at_token=None):
        """Submit; ``at_token`` = (k, fn): fn() runs in the scheduler's callback once k tokens
        are out (so the next request arrives mid-generation whatever the test thread's luck)."""
        done = threading.Event()
        out = []

        def on(i, t, f, lp=None):
            if t is not None:
                out.append(t)
                if at_token is not None and len(out) == at_token[0]:
                    at_token[1]()
            if f is not None:
                log.append(tuple(prompt))
                done.set()
        sched.submit(Request(prompt=prompt, max_tokens=n_tokens, temperature=0, on_event=on))
        return out, done

    log = []
    alone_long, d = run(long_ids, 60, log)
    d.wait(30)
    alone_short, d = run(short_ids, 4, log)
    d.wait(30)
    log.clear()
    short = {}
    both_long, d_long = run(long_ids, 60, log, at_token=(  # 5 tokens into the long one ...
        5, lambda: short.update(zip(("out", "done"), run(short_ids, 4, log)))))  # ... the short
    assert d_long.wait(30) and short["done"].wait(30)
    assert len(both_long) == 60 and len(short["out"]) == 4
    assert log == [tuple(short_ids), tuple(long_ids)]  # admitted mid-generation, finished first
    assert both_long == alone_long and short["out"] == alone_short  # greedy, token for token


def test_chunked_prefill_interleaves_with_decoding_and_changes_no_token():
    net, tok = tiny()
    # alone: each request on a scheduler of its own (nothing reused, nothing else running)
    ref = Scheduler(net, tok, max_batch=4, max_len=256, prefill_chunk=8).start()
    sched = Scheduler(net, tok, max_batch=4, max_len=256, prefill_chunk=8).start()
    try:
        running_ids, long_ids = list(b"x = 1"), list(b"def a_long_prompt(with_many, arguments):\n    pass\n")
        alone_running, d = greedy(ref, running_ids, 40)
        assert d.wait(30)
        alone_long, d = greedy(ref, long_ids, 6)
        assert d.wait(30)
        events, late = [], {}

        def arrive(k):
            events.append(("running", k))
            if k == 3:  # the long prompt arrives while the first request decodes
                late["out"], late["done"] = greedy(sched, long_ids, 6,
                                                   lambda j: events.append(("long", j)))
        both_running, d = greedy(sched, running_ids, 40, arrive)
        assert d.wait(30) and late["done"].wait(30)
        first_long = events.index(("long", 1))
        # its 7 chunks of 8 positions went in between decode steps of the running request
        assert sum(1 for e in events[:first_long] if e[0] == "running") >= 3 + 6
        assert both_running == alone_running and late["out"] == alone_long  # token for token
        assert sched.stats["tokens_reused"] == 0
    finally:
        ref.stop()
        sched.stop()


def test_a_repeated_prompt_prefix_is_reused_and_changes_no_token():
    net, tok = tiny()
    system = list(b"<system>You answer in one word, always.\n")
    a, b = system + list(b"<user>first?"), system + list(b"<user>second?")
    fresh = Scheduler(net, tok, max_batch=2, max_len=256, prefill_chunk=8).start()
    sched = Scheduler(net, tok, max_batch=2, max_len=256, prefill_chunk=8).start()
    try:
        want, d = greedy(fresh, b, 8)
        assert d.wait(30) and fresh.stats["tokens_reused"] == 0
        _, d = greedy(sched, a, 8)
        assert d.wait(30) and sched.stats["tokens_reused"] == 0
        got, d = greedy(sched, b, 8)
        assert d.wait(30)
        common = len(system) + len(b"<user>")
        assert sched.stats["tokens_reused"] == common // 8 * 8 > 0  # whole chunks of the prefix
        assert got == want  # the reused keys and values are the ones a fresh prefill computes
    finally:
        fresh.stop()
        sched.stop()


def test_bad_inputs_get_openai_errors_and_a_good_request_still_completes(live):
    url = live[0].url

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=30) as h:
            good = h.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 8,
                                                   "temperature": 0})
            bad = [
                h.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": "many"}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "unknown_field": 1}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 300}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10000}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 99}),
                h.post("/v1/completions", json={"model": "other", "prompt": "x"}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "suffix": "y"}),
                h.post("/v1/chat/completions", json={"model": "tiny", "messages": []}),
                h.post("/v1/completions", json={"model": "tiny", "prompt": [999]}),
                h.get("/v1/nothing"),
            ]
            return await good, await asyncio.gather(*bad)

    good, bad = asyncio.run(go())
    assert good.status_code == 200 and good.json()["choices"][0]["text"]
    want = [400, 400, 400, 400, 400, 400, 400, 404, 400, 400, 400, 404]
    assert [r.status_code for r in bad] == want
    for r in bad:
        err = r.json()["error"]
        assert err["message"] and err["type"]  # OpenAI's error object


def test_a_full_queue_is_429_and_a_key_guards_every_route_but_health():
    net, tok = tiny()
    sched = Scheduler(net, tok, max_batch=2, max_len=64, max_queue=0)  # not started: never drains
    server = Live(create_app(sched, "tiny", api_key="s3cret"))
    try:
        h = httpx.Client(base_url=server.url, timeout=10)
        assert h.get("/health").status_code == 200
        assert h.get("/v1/models").status_code == 401
        assert h.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert h.get("/v1/models", headers=key).status_code == 200
        r = h.post("/v1/completions", headers=key, json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        server.close()


def test_a_client_that_goes_away_mid_stream_frees_its_slot(live):
    url, sched = live[0].url, live[1]
    with httpx.Client(base_url=url, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "loop",
                                                       "max_tokens": 200, "stream": True}) as r:
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data:")
                if lines >= 3:
                    break  # leave mid-stream
    deadline = time.time() + 10
    while len(sched.free) < sched.max_batch:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.05)


def test_metrics_health_and_tokenize(live):
    url = live[0].url
    h = httpx.Client(base_url=url, timeout=10)
    assert h.get("/health").json() == {"status": "ok"}
    ids = h.post("/tokenize", json={"prompt": "héllo"}).json()["tokens"]
    assert h.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "héllo"
    h.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 3})
    text = h.get("/metrics").text
    for name in ("keenlm_requests_total", "keenlm_generated_tokens_total", "keenlm_queue_depth",
                 "keenlm_kv_pool_slots_used", "keenlm_time_to_first_token_seconds_bucket"):
        assert name in text


def test_a_strategy_runs_inside_the_server_on_its_n_samples(live):
    # majority vote and best-of-N (the addition task's verifier) sample through the scheduler:
    # n candidates, the chosen one among them, best-of-N's the best scored, compute reported
    c = client(live)
    out = c.completions.create(model="tiny", prompt="12+30=", max_tokens=8, temperature=0.8,
                               n=4, seed=3, extra_body={"strategy": "majority"})
    info = out.model_extra["keenlm"]
    assert len(out.choices) == 1 and len(info["candidates"]) == 4
    assert out.choices[0].text in [cand["text"] for cand in info["candidates"]]
    assert info["compute"]["policy_tokens"] > 0 and info["compute"]["policy_flops"] > 0
    assert out.usage.completion_tokens == info["compute"]["policy_tokens"]
    from keenlm.data.tasks import get_task

    problem = get_task("addition").problems("test", 1)[0].prompt
    best = c.completions.create(model="tiny", prompt=problem, max_tokens=8, temperature=0.8,
                                n=4, seed=3, extra_body={"strategy": "best_of_n", "task": "addition"})
    cands = best.model_extra["keenlm"]["candidates"]
    assert best.model_extra["keenlm"]["score"] == max(cand["score"] for cand in cands)
    bad = httpx.post(live[0].url + "/v1/completions", json={
        "model": "tiny", "prompt": "x", "strategy": "psychic"})
    assert bad.status_code == 400 and "strategy" in bad.json()["error"]["message"]


def test_a_reward_model_loaded_at_start_up_scores_best_of_n(live):
    from keenlm.infer.reward import RewardModel, RewardScorer
    from keenlm.serve.strategies import SharedScorer

    net, tok = tiny()
    torch.manual_seed(1)
    rm = RewardModel(build_model(ModelConfig(vocab_size=257, n_layer=1, d_model=64, n_head=2,
                                             d_ff=128, max_seq_len=256))).eval()
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a random but not constant score
    sched = Scheduler(net, tok, max_batch=4, max_len=256).start()
    server = Live(create_app(sched, "tiny", reward=SharedScorer(RewardScorer(rm, tok, "orm"))))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        out = c.completions.create(model="tiny", prompt="Q: 2+2?", max_tokens=8, temperature=0.9,
                                   n=4, seed=5, extra_body={"strategy": "best_of_n"})
        info = out.model_extra["keenlm"]
        assert info["scorer"] == "reward_model"
        scores = [cand["score"] for cand in info["candidates"]]
        assert len(set(scores)) > 1 and info["score"] == max(scores)
        assert out.choices[0].text == info["candidates"][scores.index(max(scores))]["text"]
        # each candidate scored twice (the choice, the listing): prompt + text tokens each time
        tokens = sum(len(tok.encode_prompt("Q: 2+2?" + cand["text"])) for cand in info["candidates"])
        assert info["compute"]["scorer_tokens"] == 2 * tokens and info["compute"]["scorer_flops"] > 0
    finally:
        server.close()
        sched.stop()
    # without a reward model the server says what is missing
    bad = httpx.post(live[0].url + "/v1/completions", json={
        "model": "tiny", "prompt": "x", "strategy": "best_of_n", "scorer": "reward_model"})
    assert bad.status_code == 400 and "--reward-model" in bad.json()["error"]["message"]


def test_sigterm_lets_open_requests_end_and_exits_0(tmp_path):
    # the real command in its own process: a request in flight when SIGTERM arrives is answered
    # (uvicorn's graceful shutdown waits for it; the scheduler keeps decoding meanwhile), and the
    # server exits 0 within its deadline
    import os
    import signal
    import socket
    import subprocess
    import sys

    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from keenlm.io.gguf_export import export_gguf

    torch.manual_seed(0)
    net = build_model(ModelConfig(vocab_size=257, n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                                  d_ff=256, max_seq_len=512)).eval()
    path = export_gguf(net, ByteTokenizer(), tmp_path / "tiny.gguf", "f32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "keenlm.cli", "serve", str(path), "--port",
                             str(port), "--name", "tiny", "--max-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.2)
        result = {}

        def ask():
            result["r"] = httpx.post(url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "a", "max_tokens": 480, "temperature": 0.9, "seed": 1})
        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.3)  # the request is being decoded
        os.kill(proc.pid, signal.SIGTERM)
        t.join(60)
        assert proc.wait(45) == 0
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"]
    finally:
        if proc.poll() is None:
            proc.kill()
