"""``keenlm study ptq``: one model quantized by several recipes, each evaluated on the same text.

The model (a run, a GGUF file such as SmolLM2, an HF folder) is evaluated in fp32, then
quantized by each recipe ``bits:method:group`` (``keenlm quantize``'s code: round to nearest
or GPTQ, optionally 2-bit quantization-aware fine-tuning) and evaluated on the same held-out
text. Reported: weight bytes, perplexity and its change against fp32, seconds to quantize.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import keenlm
from keenlm.config import DataConfig, QuantConfig
from keenlm.quant.folder import model_bytes
from keenlm.quant.recipe import quantize
from keenlm.studies.common import Log, write_results

DEFAULT_PTQ = ("4:rtn:64", "4:gptq:64", "4:gptq:128", "3:rtn:64", "3:gptq:64", "2:rtn:64",
               "2:gptq:64", "1.58:rtn:0", "1.58:gptq:0")


@dataclass(frozen=True)
class Options:
    """quantize one model by several recipes"""

    model: str = ""  # the model (required): run folder, .gguf file or HF folder
    recipes: tuple[str, ...] = DEFAULT_PTQ  # bits:method:group list (group 0 = per row)
    eval_batches: int = 10  # held-out batches (4 x 512 tokens for an imported model)
    qat_steps: int = 0  # >0: add 2-bit QAT of this many steps


def run(out, opts: Options) -> dict:
    if not opts.model:
        raise ValueError("keenlm study ptq needs --model (a run folder, .gguf or HF folder)")
    return ptq(opts.model, out, recipes=opts.recipes, eval_batches=opts.eval_batches,
               qat_steps=opts.qat_steps)


def summary(res: dict) -> str:
    return ptq_table(res["rows"])


def _evaluate(km, eval_batches: int) -> dict:
    if km.run_dir is None:  # an imported model: the held-out split of the 4 MB of stdlib
        # text whose training split GPTQ calibrates on (keenlm.quant.recipe._calibration)
        km.config = dataclasses.replace(km.config, data=DataConfig(max_bytes=4_000_000))
        return km.evaluate(max_batches=eval_batches, batch_size=4, seq_len=512)
    return km.evaluate(max_batches=eval_batches)


def ptq(model: str, out: str | Path, recipes=DEFAULT_PTQ, eval_batches: int = 10,
        qat_steps: int = 0, log: Log = print) -> dict:
    """Evaluate ``model`` in fp32 and quantized by each recipe "bits:method:group" on the
    same held-out text; ``qat_steps`` > 0 adds 2-bit QAT of that many steps."""
    out = Path(out)
    base = keenlm.load(model)
    params = sum(p.numel() for p in base.net.parameters())
    ev = _evaluate(base, eval_batches)
    rows = [{"recipe": "fp32", "bits": 32, "method": "-", "group": "-", "bytes": params * 4,
             "loss": ev["loss"], "perplexity": ev["perplexity"], "seconds": 0.0}]
    log(f"fp32: perplexity {ev['perplexity']:.4f}")
    del base
    recipes = list(recipes) + ([f"2:qat:0:{qat_steps}"] if qat_steps else [])
    for recipe in recipes:
        bits, method, group, *rest = recipe.split(":")
        q = QuantConfig(bits=bits, method=method, group=int(group),
                        **({"qat_steps": int(rest[0])} if rest else {}))
        t0 = time.perf_counter()
        km = quantize(model, q, log=None, qat_dir=out / "qat-run" if method == "qat" else None)
        seconds = time.perf_counter() - t0
        ev = _evaluate(km, eval_batches)
        b = model_bytes(km)
        rows.append({"recipe": recipe, "bits": bits, "method": method,
                     "group": q.group_size or "row", "bytes": b["total"], "loss": ev["loss"],
                     "perplexity": ev["perplexity"], "seconds": seconds})
        log(f"{recipe}: perplexity {ev['perplexity']:.4f}, {b['total'] / 1e6:.1f} MB, "
            f"{seconds:.0f} s to quantize")
        write_results(out, {"model": str(model), "rows": rows}, ptq_table(rows))
    return {"model": str(model), "rows": rows}


def ptq_table(rows: list[dict]) -> str:
    fp = rows[0]["perplexity"]
    lines = ["| recipe | bits | method | group | weights (MB) | perplexity | vs fp32 | quantize (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['bits']} | {r['method']} | {r['group']} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['perplexity']:.4f} | "
                     f"{100 * (r['perplexity'] / fp - 1):+.2f}% | {r['seconds']:.0f} |")
    return "\n".join(lines)
