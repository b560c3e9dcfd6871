"""SmolLM2-135M decoding on a CUDA GPU: keenlm's generate against transformers' generate.

What is compared, on one GPU, bf16 weights, greedy decoding of 128 new tokens after 128-token
prompts from argparse.py, at batch 1 and batch 64: aggregate decode tokens/s (each contender's
own prefill of the same prompts, timed apart, taken off), for
  - keenlm: ``keenlm.load(GGUF)`` moved to the GPU, ``keenlm.infer.generate_tokens`` (a
    preallocated KV cache; the step is PyTorch eager: no CUDA graph yet),
  - transformers: ``from_pretrained(gguf_file=...)``, ``generate`` (its default dynamic cache).
Prints both and the ratio; there is no target for the GPU yet, so no BENCH line.

Usage: python benchmarks/decode_gpu.py [--quick]   (needs a CUDA GPU; says so and stops without)
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import gguf_path  # noqa: E402


def rate(generate, prefill, rows: int, new: int) -> float:
    """Aggregate decode tokens/s: (generation - its prefill) over rows x new tokens."""
    generate()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prefill()
    torch.cuda.synchronize()
    pre = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate()
    torch.cuda.synchronize()
    return rows * new / max(time.perf_counter() - t0 - pre, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens instead of 128")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_gpu.py needs a CUDA GPU; none is visible here")
        return 0
    import keenlm
    from keenlm.config import GenerateConfig
    from keenlm.infer import generate_tokens
    from transformers import AutoModelForCausalLM

    new = 32 if args.quick else 128
    path = gguf_path()
    km = keenlm.load(path)
    net = km.net.to("cuda", torch.bfloat16).eval()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.bfloat16).to("cuda").eval()
    ids = km.tokenizer.encode((Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text())
    print(f"decode_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
          f"128-token prompts, {new} greedy tokens, {time.strftime('%Y-%m-%d')}")
    cfg = GenerateConfig(max_new_tokens=new, temperature=0)
    for rows in (1, 64):
        prompts = [ids[128 * i:128 * (i + 1)] for i in range(rows)]
        x = torch.tensor(prompts, device="cuda")
        with torch.no_grad():
            ours = rate(lambda: generate_tokens(net, prompts, cfg),
                        lambda: net(x, cache=net.new_cache(rows, 128 + new), last_only=True),
                        rows, new)
            theirs = rate(lambda: hf.generate(x, max_new_tokens=new, min_new_tokens=new,
                                              do_sample=False, pad_token_id=2),
                          lambda: hf(x, logits_to_keep=1), rows, new)
        print(f"  batch {rows:2d}: keenlm {ours:8.1f} tok/s  transformers {theirs:8.1f} tok/s  "
              f"({ours / theirs:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
