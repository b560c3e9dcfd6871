"""Serving under load: `keenlm serve` against llama-cpp-python's OpenAI server on SmolLM2-135M.

What is compared: each server in its own process on 127.0.0.1, the same GGUF (Q4_1), 2 threads,
the same requests: a bounded load generator (httpx, asyncio) sends N completion requests of mixed
prompt lengths (stdlib text, 16-256 tokens) and output lengths (16-128 tokens, greedy, streamed)
at concurrency 1, 4, 8 and 16, and measures the aggregate output tokens/s, time to first token
and inter-token latency (p50, p99) from the streamed chunks, and errors. keenlm serves with
``--max-batch 16`` (continuous batching on the C decode step); llama_cpp.server with its defaults
(one sequence at a time). Every run is capped in requests and seconds and stops by itself.

Then the prefill cost of a 256-token prompt by chunk size (the whole prompt in one pass as the
baseline), and majority vote through keenlm's server: N=8 against N=1 wall time for the same prompts, and
its accuracy beside greedy on held-out one-digit additions (40 problems; 10 with --quick).

Usage: python benchmarks/serve.py [--quick]      (--quick: 16 requests, concurrency 1 and 8)
Ends with one line per target of the issue: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import bench_line  # noqa: E402
from decode import gguf_path  # noqa: E402

CAP_S = 600  # no run of one server at one concurrency lasts longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, path: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if kind == "keenlm":
        cmd = [sys.executable, "-m", "keenlm.cli", "serve", str(path), "--port", str(port),
               "--name", "smol", "--max-batch", "16", "--max-len", "512", "--max-queue", "256"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
               "--model_alias", "smol", "--n_threads", "2", "--n_ctx", "2048",
               "--interrupt_requests", "False"]  # queue concurrent requests, do not cut them off
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"keenlm-bench-serve-{kind}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)  # a pipe would fill and block
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            sys.exit(f"{kind} server failed; its log: {log.name}")
    proc.kill()
    sys.exit(f"{kind} server did not start in 120 s")


def workload(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n (prompt text, max_tokens) pairs: prompts cut from argparse.py at 64-1024 characters
    (~16-256 tokens), outputs of 16-128 tokens."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([64, 256, 512, 1024])
        start_at = rng.randrange(0, len(text) - length)
        out.append((text[start_at:start_at + length], rng.choice([16, 32, 64, 128])))
    return out


async def one(client, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; (output chunks' arrival times, tokens, error)."""
    t0 = time.perf_counter()
    stamps, err = [], None
    try:
        async with client.stream("POST", "/v1/completions", json={
                "model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True}) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "stamps": [], "t0": t0}
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - counted as an error of the run
        err = repr(e)
    return {"error": err, "stamps": stamps, "t0": t0}


async def load(port: int, jobs, concurrency: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                 timeout=httpx.Timeout(120.0)) as client:
        async def run(job):
            async with sem:
                return await one(client, *job)

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(run(j) for j in jobs)), CAP_S)
        wall = time.perf_counter() - t0
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    chunks = sum(len(r["stamps"]) for r in results)

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))

    return {"tok_s": chunks / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "wall": wall,
            "errors": sum(r["error"] is not None for r in results)}


SHOTS = "".join(f"{a} + {b} = <answer>{a + b}</answer>\n" for a, b in ((12, 30), (45, 17), (81, 9)))


def strategy_run(port: int, n_problems: int) -> dict:
    """Majority vote through the server on held-out one-digit additions (keenlm's ``addition``
    task, difficulty 1, its test split, written "a + b =" after three worked examples with answer
    tags, the format SmolLM2 follows best of those tried): for each problem the wall time of N=8
    and of N=1 (same prompt, temperature 0.7, seed), and the accuracy of majority-of-8 beside
    greedy. Votes compare the answers' text (the task's verifier reads its own prompt format)."""
    import httpx

    from keenlm.data.tasks import extract_answer, get_task

    problems = get_task("addition", difficulty=1).problems("test", n_problems)
    times = {1: [], 8: []}
    right = {"greedy": 0, "majority of 8": 0}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as h:
        for i, p in enumerate(problems):
            prompt = SHOTS + f"{p.meta['a']} + {p.meta['b']} ="
            g = h.post("/v1/completions", json={"model": "smol", "prompt": prompt, "max_tokens": 24,
                                                "temperature": 0, "stop": ["</answer>"]}).json()
            right["greedy"] += extract_answer(g["choices"][0]["text"] + "</answer>") == p.answer
            for n in (1, 8):
                t = time.perf_counter()
                r = h.post("/v1/completions", json={
                    "model": "smol", "prompt": prompt, "max_tokens": 24, "temperature": 0.7,
                    "n": n, "seed": i, "strategy": "majority"}).json()
                times[n].append(time.perf_counter() - t)
                if n == 8:
                    right["majority of 8"] += r["keenlm"]["answer"] == p.answer
    return {"ratio": sum(times[8]) / sum(times[1]), "t1": sum(times[1]), "t8": sum(times[8]),
            "acc": {k: v / len(problems) for k, v in right.items()}, "n": len(problems)}


def chunk_costs(path: Path, chunks=(256, 128, 64, 32, 16), n: int = 256) -> dict[int, float]:
    """Seconds to prefill an n-token prompt of SmolLM2 (q4) in chunks of each size, the way the
    scheduler does (each chunk one forward pass into the KV cache); best of 3. The baseline is
    the whole prompt in one pass (chunk n): why keenlm serve's --prefill-chunk is 128."""
    import torch

    from keenlm.api import load
    from keenlm.model.attention import KVCache

    net = load(path, quant="q4").net
    cfg = net.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))

    def run(chunk):
        cache = KVCache(cfg.n_layer, 1, cfg.kv_heads, n, cfg.head_dim, "cpu", torch.float32)
        t = time.perf_counter()
        with torch.no_grad():
            for a in range(0, n, chunk):
                net(ids[:, a:a + chunk], cache=cache, last_only=True)
        return time.perf_counter() - t

    out = {}
    for c in chunks:
        run(c)
        out[c] = min(run(c) for _ in range(3))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests, concurrency 1 and 8")
    args = ap.parse_args()
    path = gguf_path()
    n, levels = (16, (1, 8)) if args.quick else (64, (1, 4, 8, 16))
    jobs = workload(n)
    kinds = ["keenlm"] + (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])
    print(f"serve: SmolLM2-135M-Instruct Q4_1 GGUF, machine {platform.machine()} "
          f"{os.cpu_count()} cores, {n} streamed greedy completions (prompts ~16-256 tokens, "
          f"outputs 16-128), concurrency {levels}, {time.strftime('%Y-%m-%d')}")
    if len(kinds) == 1:
        print("  (llama-cpp-python is not installed: no llama.cpp column; it is in the bench extra)")
    res: dict = {}
    for kind in kinds:
        port = free_port()
        proc = start(kind, path, port)
        try:
            asyncio.run(load(port, jobs[:4], 2))  # warm-up
            for c in levels:
                r = res[(kind, c)] = asyncio.run(load(port, jobs, c))
                print(f"  {kind:9s} concurrency {c:2d}: {r['tok_s']:6.1f} output tok/s  TTFT p50 "
                      f"{r['ttft_p50'] * 1e3:6.0f} ms p99 {r['ttft_p99'] * 1e3:6.0f} ms  ITL p50 "
                      f"{r['itl_p50'] * 1e3:5.1f} ms p99 {r['itl_p99'] * 1e3:6.1f} ms  errors "
                      f"{r['errors']}  ({r['wall']:.1f} s)")
            if kind == "keenlm":
                st = res["strategy"] = strategy_run(port, 10 if args.quick else 40)
                print(f"  keenlm    majority vote, {st['n']} held-out one-digit additions: N=8 "
                      f"{st['t8']:.1f} s, N=1 {st['t1']:.1f} s ({st['ratio']:.2f}x); accuracy "
                      + ", ".join(f"{k} {v:.3f}" for k, v in st["acc"].items()))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    costs = chunk_costs(path)
    whole = costs[max(costs)]
    print("  keenlm    prefill of 256 tokens by chunk size: " + ", ".join(
        f"{c}: {t * 1e3:.0f} ms ({t / whole:.2f}x)" for c, t in costs.items()))
    k1, k8 = res[("keenlm", 1)], res[("keenlm", 8)]
    print()
    print(bench_line("serve_keenlm_c8_vs_c1", k8["tok_s"] / k1["tok_s"], ">=", 4.0))
    print(bench_line("serve_majority8_vs_1_wall_time", res["strategy"]["ratio"], "<=", 2.5))
    if ("llama.cpp", 8) in res:
        l8 = res[("llama.cpp", 8)]
        print(bench_line("serve_keenlm_vs_llama_cpp_server_c8", k8["tok_s"] / l8["tok_s"], ">=", 1.0))
        print(bench_line("serve_ttft_p50_c8_vs_llama_cpp_server", k8["ttft_p50"] / l8["ttft_p50"],
                         "<=", 1.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
