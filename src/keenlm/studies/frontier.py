"""``keenlm study frontier``: the bits-vs-quality frontier of quantization-aware training.

For each size (d_model x layers; heads of 64, SwiGLU width and learning rate by the preset
rules) and each linear kind (dense fp32, int4, int2, ternary quantization-aware training), a
model is trained on the stdlib corpus with the same tokens; the low-bit ones are converted to
packed weights (int8 embedding). Reported: validation loss of the model *as stored* against
its bytes, in a table and ``frontier.svg``.

Optionally, ternary runs at the middle size that switch from full precision to QAT at given
fractions of training (``train.schedule.qat_start``), to find the fraction that works best.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import keenlm
from keenlm.config import QuantConfig, from_dict
from keenlm.quant.folder import model_bytes
from keenlm.quant.packing import convert_qat
from keenlm.quant.recipe import store_tables
from keenlm.runs import atomic_write_text
from keenlm.studies.common import Log, parse_size, write_results

KIND_LABEL = {"dense": "fp32", "int4": "int4 QAT", "int2": "2-bit QAT", "ternary": "ternary QAT"}


@dataclass(frozen=True)
class Options:
    """train fp32/int4/int2/ternary models at several sizes on equal tokens"""

    sizes: tuple[str, ...] = ("64x2", "128x2", "128x4")  # d_model x layers of each size
    kinds: tuple[str, ...] = ("dense", "int4", "int2", "ternary")  # linear kinds
    steps: int = 500  # training steps of each model (16 x 256 tokens each)
    qat_starts: tuple[float, ...] = ()  # extra ternary runs at the middle size that start QAT at these fractions, e.g. 0.25,0.5,0.75


def run(out, opts: Options) -> dict:
    return frontier(out, sizes=opts.sizes, kinds=opts.kinds, steps=opts.steps,
                    qat_starts=opts.qat_starts)


def summary(res: dict) -> str:
    return frontier_table(res["rows"])


def _frontier_config(size: tuple[int, int], kind: str, steps: int, out_dir: Path,
                     qat_start: float = 0.0, batch: int = 16, seq: int = 256):
    d_model, n_layer = size  # d_ff and lr (0) follow the preset rules (keenlm.presets.resolve)
    return from_dict({
        "model": {"n_layer": n_layer, "d_model": d_model, "n_head": d_model // 64, "linear": kind,
                  "max_seq_len": seq, "lowbit": {"per_channel": True}},
        "data": {"tokenizer": "bpe", "vocab_size": 4096, "max_bytes": 12_000_000},
        "train": {"steps": steps, "batch_size": batch, "seq_len": seq, "out_dir": str(out_dir),
                  "progress": False,
                  "schedule": {"kind": "wsd", "decay_fraction": 0.25, "qat_start": qat_start,
                               "warmup_steps": max(1, steps // 30)},
                  "eval": {"every": 0, "batches": 40}, "checkpoint": {"resume": True},
                  "runtime": {"dtype": "auto"}}})


def _measure_run(run_dir: Path, kind: str) -> dict:
    """Loss and bytes of a trained run as it would be stored: fp32 for dense; packed
    (convert_qat) with an int8 embedding for the low-bit kinds."""
    km = keenlm.load(run_dir)
    params = sum(p.numel() for p in km.net.parameters())
    trained = km.evaluate(max_batches=40)["loss"]
    if kind == "dense":
        return {"loss": trained, "loss_trained": trained, "bytes": params * 4, "params": params}
    convert_qat(km.net)
    store_tables(km.net, QuantConfig(embed="int8"))
    km.quant = {"embed": "int8", "head": "int8"}
    b = model_bytes(km)
    return {"loss": km.evaluate(max_batches=40)["loss"], "loss_trained": trained,
            "bytes": b["total"], "params": params}


def frontier(out: str | Path, sizes=("64x2", "128x2", "128x4"),
             kinds=("dense", "int4", "int2", "ternary"), steps: int = 500, qat_starts=(),
             log: Log = print) -> dict:
    out = Path(out)
    rows = []
    plan = [(s, k, 0.0) for s in sizes for k in kinds]
    mid = list(sizes)[len(sizes) // 2]
    plan += [(mid, "ternary", s) for s in qat_starts if s > 0]
    for size, kind, start in plan:
        name = f"{size}-{kind}" + (f"-from{start:g}" if start else "")
        cfg = _frontier_config(parse_size(size), kind, steps, out / "runs" / name, start)
        t0 = time.perf_counter()
        res = keenlm.train(cfg)
        m = _measure_run(Path(res.run_dir), kind)
        tokens = steps * cfg.train.batch_size * cfg.train.seq_len
        rows.append({"name": name, "size": size, "d_model": cfg.model.d_model,
                     "n_layer": cfg.model.n_layer, "kind": kind,
                     "qat_start": start, "tokens": tokens, "seconds": time.perf_counter() - t0, **m})
        log(f"{name}: loss {m['loss']:.4f} (as trained {m['loss_trained']:.4f}), "
            f"{m['bytes'] / 1e6:.3f} MB, {m['params']:,} params")
        write_results(out, {"rows": rows}, frontier_table(rows))  # partial results survive a stop
    svg_frontier(rows, out / "frontier.svg")
    return {"rows": rows}


def frontier_table(rows: list[dict]) -> str:
    dense = {r["size"]: r["loss"] for r in rows if r["kind"] == "dense"}
    lines = ["| model | d_model x layers | params | tokens | QAT from | bytes (MB) | "
             "val loss (stored) | val loss (as trained) | vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = (f"{100 * (r['loss'] / dense[r['size']] - 1):+.1f}%" if r["size"] in dense else "")
        lines.append(f"| {KIND_LABEL[r['kind']]} | {r['size']} | "
                     f"{r['params']:,} | {r['tokens']:,} | {r['qat_start'] or '-'} | "
                     f"{r['bytes'] / 1e6:.3f} | {r['loss']:.4f} | {r['loss_trained']:.4f} | {rel} |")
    return "\n".join(lines)


def svg_frontier(rows: list[dict], path: Path) -> None:
    """Validation loss against model bytes (log scale), one line per kind: a plain SVG file."""
    pts = [r for r in rows if not r["qat_start"]]
    if not pts:
        return
    W, H, L, B = 640, 420, 70, 50
    xs = [math.log10(r["bytes"]) for r in pts]
    ys = [r["loss"] for r in pts]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0, y1 = min(ys) - 0.05, max(ys) + 0.05
    X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - 20)  # noqa: E731
    Y = lambda v: 20 + (y1 - v) / (y1 - y0) * (H - 20 - B)  # noqa: E731
    colors = {"dense": "#222222", "int4": "#1f77b4", "int2": "#2ca02c", "ternary": "#d62728"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{L}" y1="{H - B}" x2="{W - 20}" y2="{H - B}" stroke="black"/>',
             f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="black"/>',
             f'<text x="{(W + L) / 2}" y="{H - 10}" text-anchor="middle">model bytes (log scale)</text>',
             f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" text-anchor="middle">'
             f'validation loss (nats/token)</text>']
    for e in range(math.floor(x0), math.ceil(x1) + 1):
        for m in (1, 2, 5):
            v = e + math.log10(m)
            if x0 <= v <= x1:
                label = f"{m * 10 ** e / 1e6:g} MB"
                parts.append(f'<line x1="{X(v):.1f}" y1="{H - B}" x2="{X(v):.1f}" y2="{H - B + 5}" '
                             f'stroke="black"/><text x="{X(v):.1f}" y="{H - B + 18}" '
                             f'text-anchor="middle">{label}</text>')
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        parts.append(f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for k, kind in enumerate(colors):
        series = sorted((r for r in pts if r["kind"] == kind), key=lambda r: r["bytes"])
        if not series:
            continue
        line = " ".join(f"{X(math.log10(r['bytes'])):.1f},{Y(r['loss']):.1f}" for r in series)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colors[kind]}" stroke-width="2"/>')
        for r in series:
            parts.append(f'<circle cx="{X(math.log10(r["bytes"])):.1f}" cy="{Y(r["loss"]):.1f}" '
                         f'r="4" fill="{colors[kind]}"><title>{r["name"]}: {r["loss"]:.4f}</title></circle>')
        parts.append(f'<rect x="{W - 150}" y="{28 + 18 * k}" width="12" height="12" fill="{colors[kind]}"/>'
                     f'<text x="{W - 132}" y="{38 + 18 * k}">{KIND_LABEL[kind]}</text>')
    parts.append("</svg>")
    atomic_write_text(path, "\n".join(parts) + "\n")
