"""Faster after smarter: a fine-tuned model at 4 bits, exported to GGUF, and run by keenlm's C
decode engine and by llama.cpp, on a verifiable task.

For MODEL (an RL run folder of SmolLM2, or the GGUF itself for the base model):
  1. fp32 in keenlm: greedy answers to N held-out problems (pass@1), batch-1 decode tokens/s
     (a QLoRA run: its adapters merged into the dequantized base);
  2. 4 bits: a full fine-tune by GPTQ, groups of 32 (``keenlm quantize --bits 4 --method gptq
     --group 32``), written as a Q4_1 GGUF straight from its codes (lossless); a QLoRA run
     (``--lora-base q4``) as its Q4_1 base plus its adapters (``keenlm.load(RUN, quant="q4")``),
     written as the base GGUF plus llama.cpp's LoRA GGUF;
  3. the 4-bit model on keenlm's decode engine: pass@1 and decode tokens/s;
  4. the same files in llama.cpp (llama-cpp-python, the `bench` extra): its greedy answers to the
     same prompt ids, and how many equal keenlm's 4-bit answers.

Usage: python benchmarks/smarter_faster.py [MODEL] --task addition --difficulty 2 --template chat
       --shots 2 --examples equation [--n 200] [--quick]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import bench_line  # noqa: E402
from decode import gguf_path, keenlm_decode_rate, llama_cpp_decode_rate, prompt_ids  # noqa: E402


def answers_keenlm(km, task, problems, max_new_tokens: int) -> list[str]:
    from keenlm.infer.task_eval import complete

    return complete(km.net, km.tokenizer, [p.prompt for p in problems],
                    max_new_tokens=max_new_tokens, batch=16)


def answers_llama_cpp(path, tokenizer, problems, max_new_tokens: int, lora=None) -> list[str]:
    """Greedy completions by llama.cpp from keenlm's prompt ids (keenlm.studies.real)."""
    from keenlm.studies.real import answers_llama_cpp as run

    return run(path, tokenizer, [p.prompt for p in problems], max_new_tokens, lora=lora)


def main() -> int:
    import torch

    import keenlm
    from keenlm.config import QuantConfig
    from keenlm.data.tasks import extract_answer, get_task
    from keenlm.io.gguf_export import export_gguf, export_gguf_lora
    from keenlm.model.lora import lora_layers, merge_lora
    from keenlm.quant.recipe import quantize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="",
                    help="an RL run of SmolLM2, or any model keenlm loads (default: the SmolLM2 GGUF)")
    ap.add_argument("--task", default="addition")
    ap.add_argument("--difficulty", type=int, default=2)
    ap.add_argument("--template", default="chat")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--examples", default="equation")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="", help="folder for the 4-bit GGUF (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="40 problems, 32 decode tokens")
    args = ap.parse_args()
    n, decode_tokens = (40, 32) if args.quick else (args.n, 128)
    torch.set_num_threads(2)
    out = Path(args.out or tempfile.mkdtemp(prefix="keenlm-faster-"))
    out.mkdir(parents=True, exist_ok=True)

    args.model = args.model or str(gguf_path())
    fp32 = keenlm.load(args.model)
    task = get_task(args.task, args.difficulty, template=args.template, tokenizer=fp32.tokenizer,
                    shots=args.shots, examples=args.examples)
    problems = task.problems("test", n)
    prompts = [p.prompt for p in problems]
    ids = prompt_ids(fp32.tokenizer.encode)[:256]

    def score(comps):
        return sum(r == 1.0 for r in task.reward(prompts, comps)) / n

    lora = bool(lora_layers(fp32.net))
    t0 = time.perf_counter()
    if lora:  # QLoRA: the adapters beside the 4-bit base, served and exported as they are
        files = list(export_gguf_lora(fp32.net, fp32.tokenizer, out / "model-q4_1.gguf", "q4_1"))
        q4 = keenlm.load(args.model, quant="q4")
        merge_lora(fp32.net)  # its fp32 form: the same weights, folded
    q_s = time.perf_counter() - t0
    a32 = answers_keenlm(fp32, task, problems, args.max_new_tokens)
    rate32 = keenlm_decode_rate(fp32.net, [ids], decode_tokens)
    if not lora:
        t0 = time.perf_counter()
        q = quantize(fp32, QuantConfig(bits="4", method="gptq", group=32), log=None)
        files = [export_gguf(q.net, q.tokenizer, out / "model-q4_1.gguf", "q4_1")]
        q_s = time.perf_counter() - t0
        del q
        q4 = keenlm.load(files[0], quant="q4")
    del fp32
    a4 = answers_keenlm(q4, task, problems, args.max_new_tokens)
    rate4 = keenlm_decode_rate(q4.net, [ids], decode_tokens)
    res = {"model": args.model, "task": task.name, "n": n, "qlora": lora, "pass@1 fp32": score(a32),
           "pass@1 q4": score(a4), "decode tok/s fp32": rate32, "decode tok/s q4": rate4,
           "quantize+export s": q_s, "gguf": [str(f) for f in files],
           "gguf MB": sum(f.stat().st_size for f in files) / 1e6}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (the bench extra): the llama.cpp comparison is skipped")
    else:
        al = answers_llama_cpp(files[0], q4.tokenizer, problems, args.max_new_tokens,
                               lora=files[1] if lora else None)
        same = sum(extract_answer(x) == extract_answer(y) for x, y in zip(a4, al)) / n
        res.update({"pass@1 llama.cpp": score(al), "same answers llama.cpp vs keenlm q4": same})
        if not lora:
            res["llama.cpp decode tok/s"] = llama_cpp_decode_rate(files[0], ids, decode_tokens, 2)
    print(json.dumps(res, indent=2))
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(bench_line("q4_pass1_drop_points", 100 * (res["pass@1 fp32"] - res["pass@1 q4"]), "<=", 2))
    print(bench_line("q4_decode_speedup", rate4 / rate32, ">=", 2))
    if "same answers llama.cpp vs keenlm q4" in res:
        print(bench_line("llama_cpp_same_answers", res["same answers llama.cpp vs keenlm q4"], ">=", 0.95))
    return 0


if __name__ == "__main__":
    sys.exit(main())
