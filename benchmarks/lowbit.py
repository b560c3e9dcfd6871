"""Packed low-bit matvec: keenlm's lookup-table kernel vs fp32 F.linear (issue: low-bit weights).

What is compared: y = x W^T for one input row (batch-1 decode) with W stored as 2-bit packed
codes (ternary and 2-bit, four weights per byte, one scale per row) through
``keenlm.quant.kernels.lut_matmul``, against ``torch.nn.functional.linear`` with the same
W in fp32, at shapes in x out = 576x1536, 1536x576 and 2048x8192, with 1 and 2 threads; both
in the same run, best of several repetitions.

(b) Batch-1 greedy decode, tokens/s, of a whole model: a Llama-shaped model (d_model 768,
12 layers, vocab 4096: 88M parameters) in fp32 against the same model quantized to ternary
(``keenlm quantize --bits 1.58 --method rtn``: one scale per row, the LUT kernel; int8 embedding
shared with the head), saved and loaded back as a user would run it. Speed does not depend on
the weights' values, so the model is a random initialization (``--quick``: 6 layers).

(c) Bytes of that ternary model's safetensors file against the fp32 model's.

Usage: python benchmarks/lowbit.py [--quick]
Ends with one line per target: BENCH <name> <value> target <op><target> PASS|MISS
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line, best_of  # noqa: E402
from keenlm.quant import kernels as packed_kernels  # noqa: E402
from keenlm.quant.packing import pack  # noqa: E402

OFFSET = {"ternary": -1.0, "int2": -1.5}  # w = (code + OFFSET) * scale: levels -1..1 / -1.5..1.5

SHAPES = [(576, 1536), (1536, 576), (2048, 8192)]  # (in_features, out_features)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not packed_kernels.available():
        sys.exit("lowbit.py needs numba: pip install 'keenlm[lowbit]'")
    import numba

    reps = 10 if args.quick else 30
    print(f"lowbit: machine {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"numba {numba.__version__}, batch-1 matvec, best of {reps}, {time.strftime('%Y-%m-%d')}")
    lines = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
        for n_in, n_out in SHAPES:
            g = torch.Generator().manual_seed(n_in)
            x = torch.randn(1, n_in, generator=g)
            w = torch.randn(n_out, n_in, generator=g)
            base = best_of(lambda: F.linear(x, w), reps, warmup=2)
            for kind in ("ternary", "int2"):
                codes = torch.randint(0, 3 if kind == "ternary" else 4, (n_out, n_in),
                                      generator=g, dtype=torch.uint8)
                words = packed_kernels.kernel_layout(pack(codes, 2))
                scale = torch.rand(n_out, generator=g)
                offset = OFFSET[kind] * scale
                t = best_of(lambda: packed_kernels.lut_matmul(x, words, scale, offset), reps, warmup=2)
                ratio = base / t
                print(f"  {threads}t {n_in}x{n_out} {kind:7s} fp32 {base * 1e6:8.1f} us  packed "
                      f"{t * 1e6:8.1f} us  speed-up {ratio:5.2f}x")
                if (n_in, n_out) == (2048, 8192):
                    lines.append(bench_line(f"lowbit_matvec_{kind}_2048x8192_{threads}t",
                                            ratio, ">=", 3.0))
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    lines += decode_and_bytes(args.quick)
    print()
    print("\n".join(lines))
    return 0


def decode_and_bytes(quick: bool) -> list[str]:
    import tempfile

    from safetensors.torch import save_file

    import keenlm
    from keenlm.api import KeenModel
    from keenlm.config import GenerateConfig, ModelConfig, QuantConfig, RunConfig
    from keenlm.data import ByteTokenizer
    from keenlm.infer import generate_tokens
    from keenlm.model import build_model, model_state
    from keenlm.quant.recipe import quantize, save_quantized

    m = ModelConfig(vocab_size=4096, n_layer=6 if quick else 12, d_model=768, n_head=12, d_ff=2048,
                    max_seq_len=512)
    torch.manual_seed(0)
    net = build_model(m).eval()
    params = sum(p.numel() for p in net.parameters())
    tmp = Path(tempfile.mkdtemp(prefix="keenlm-bench-"))
    save_file(model_state(net), str(tmp / "fp32.safetensors"))
    fp32_bytes = (tmp / "fp32.safetensors").stat().st_size
    km = KeenModel(net, ByteTokenizer(), RunConfig(model=m))
    dense = build_model(m).eval()
    dense.load_state_dict(net.state_dict())
    quantize(km, QuantConfig(bits="1.58", method="rtn"), log=None)
    save_quantized(km, tmp / "ternary")
    packed = keenlm.load(tmp / "ternary").net
    packed_bytes = (tmp / "ternary" / "model.safetensors").stat().st_size
    new = 32 if quick else 64
    prompt = torch.randint(0, m.vocab_size, (32,)).tolist()
    cfg = GenerateConfig(max_new_tokens=new, temperature=0)
    rates = {}
    with torch.no_grad():
        for name, model in (("fp32", dense), ("ternary", packed)):
            prefill = best_of(lambda: model(torch.tensor([prompt])), 3)
            total = best_of(lambda: generate_tokens(model, [prompt], cfg), 2 if quick else 3)
            rates[name] = new / (total - prefill)
    ratio = rates["ternary"] / rates["fp32"]
    print(f"\n(b) batch-1 decode, {params / 1e6:.1f}M-parameter model (d_model 768, {m.n_layer} layers), "
          f"2 threads, {new} new tokens after a 32-token prompt")
    print(f"  fp32     {rates['fp32']:7.1f} tok/s")
    print(f"  ternary  {rates['ternary']:7.1f} tok/s   speed-up {ratio:.2f}x")
    print(f"(c) model file: fp32 {fp32_bytes / 1e6:.1f} MB, ternary packed {packed_bytes / 1e6:.2f} MB "
          f"({fp32_bytes / packed_bytes:.1f}x smaller; {packed_bytes / fp32_bytes:.4f} of fp32)")
    return [bench_line("lowbit_decode_ternary_vs_fp32", ratio, ">=", 2.0),
            bench_line("lowbit_bytes_ternary_over_fp32", packed_bytes / fp32_bytes, "<=", 0.1)]


if __name__ == "__main__":
    raise SystemExit(main())
