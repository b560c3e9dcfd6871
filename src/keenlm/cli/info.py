"""``keenlm info RUN``: what a run folder holds, in one screen."""
from __future__ import annotations

import json
from pathlib import Path

import keenlm
from keenlm import runs
from keenlm.quant.folder import model_bytes
from keenlm.quant.packing import PackedLinear


def add_parser(sub, fmt):
    i = sub.add_parser("info", help="describe a run: config, parameters, ledger, files",
                       formatter_class=fmt)
    i.add_argument("run", nargs="?", help="run folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--plan", metavar="PRESET", help="instead: memory per GPU and communication per "
                   "step of training PRESET (or a YAML file) under DDP and FSDP2")
    i.add_argument("--gpus", default="8,16,32,64", help="--plan: world sizes")
    i.add_argument("--micro-batch", type=int, default=8, help="--plan: sequences per GPU per micro-step")
    i.add_argument("--vocab", type=int, default=32000, help="--plan: vocabulary size")
    return i


def run(args) -> int:
    if args.plan:
        print(plan_table(args.plan, [int(g) for g in args.gpus.split(",")], args.micro_batch,
                         args.vocab, as_json=args.json))
        return 0
    if not args.run:
        raise ValueError("keenlm info: give a run folder, or --plan PRESET")
    print(run_info(Path(args.run), as_json=args.json))
    return 0


def plan_table(preset: str, gpus: list[int], micro_batch: int, vocab: int,
               as_json: bool = False) -> str:
    """What training ``preset`` costs each GPU under DDP and FSDP2 (keenlm.train.distributed.plan)."""
    from keenlm.config import from_dict
    from keenlm.presets import preset_dict, resolve
    from keenlm.train.distributed import plan

    cfg = resolve(from_dict(preset_dict(preset)), vocab)
    seq = cfg.train.seq_len
    rows = [{"gpus": w, "mode": m, **plan(cfg.model, w, m, micro_batch, seq)}
            for w in gpus for m in ("ddp", "fsdp")]
    if as_json:
        return json.dumps(rows, indent=2)
    gb = 2 ** 30
    out = [f"{preset}: {rows[0]['params'] / 1e6:.0f}M parameters, {micro_batch} x {seq} tokens "
           f"per GPU per micro-step, vocabulary {vocab}, bf16 autocast, AdamW",
           "| GPUs | mode | weights+grads+Adam per GPU | activations | total | sent per step |",
           "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['gpus']} | {r['mode']} | {r['state_bytes'] / gb:.2f} GiB | "
                   f"{r['activation_bytes'] / gb:.2f} GiB | {r['total_bytes'] / gb:.2f} GiB | "
                   f"{r['comm_bytes'] / gb:.2f} GiB |")
    return "\n".join(out)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else (
        path.stat().st_size if path.exists() else 0)


def gather(run: Path) -> dict:
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"{run} is not a keenlm run folder (no config.json)")
    cfg = json.loads((run / "config.json").read_text())
    ledger = json.loads((run / "ledger.json").read_text()) if (run / "ledger.json").exists() else {}
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    evals = [r for r in runs.read_jsonl(run / "metrics.jsonl") if r.get("kind") == "eval"]
    ckpt = runs.latest_checkpoint(run)
    files = {}
    if ckpt is not None:
        files = {f.name: f.stat().st_size for f in sorted(ckpt.iterdir())}
    return {"run": str(run), "model": cfg["model"], "train": cfg["train"], "data": cfg["data"],
            "params": ledger.get("params", {}), "ledger": {k: v for k, v in ledger.items()
                                                           if k != "params"},
            "last_eval": evals[-1] if evals else None, "checkpoint": str(ckpt) if ckpt else None,
            "checkpoint_files": files, "run_bytes": _size(run), "git": env.get("git"),
            "versions": env.get("versions")}


def quantized_info(path: Path, as_json: bool = False) -> str:
    """A quantized model folder: its format, and its bytes against the same model in fp32."""
    km = keenlm.load(path)
    b = model_bytes(km)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    q, m = km.quant, km.config.model
    paths = {}
    for mod in km.net.modules():
        if isinstance(mod, PackedLinear):
            paths[mod.path] = paths.get(mod.path, 0) + 1
    if as_json:
        return json.dumps({"model": str(path), "quant": {k: v for k, v in q.items() if k != "layers"},
                           "bytes": b, "files": files, "kernels": paths}, indent=2)
    lines = [
        f"model        {path}: {m.n_layer} layers, d_model "
        f"{m.d_model}, vocab {m.vocab_size}",
        f"quantized    {q['bits']} bits by {q['method']}, group {q['group'] or 'per row'}; "
        f"embedding {q['embed']}, LM head {'tied' if q['tied'] else q['head']}",
        f"weights      {b['total'] / 1e6:.2f} MB: packed {b['packed'] / 1e6:.2f}, embedding "
        f"{b['embedding'] / 1e6:.2f}, head {b['head'] / 1e6:.2f}, other {b['other'] / 1e6:.2f}",
        f"vs fp32      {b['fp32_total'] / 1e6:.2f} MB in fp32: {b['ratio']:.1f}x smaller",
        "kernels      " + ", ".join(f"{n} layers {k}" for k, n in sorted(paths.items())),
    ]
    lines += [f"file         {name}: {size / 1e6:.2f} MB" for name, size in files.items()]
    return "\n".join(lines)


def run_info(run: Path, as_json: bool = False) -> str:
    if (run / "quant.json").exists():
        return quantized_info(run, as_json)
    info = gather(run)
    if as_json:
        return json.dumps(info, indent=2)
    m, p, lg, ev = info["model"], info["params"], info["ledger"], info["last_eval"]
    lines = [
        f"run          {info['run']}  (git {info['git']})",
        f"model        {m['n_layer']} layers, d_model {m['d_model']}, heads {m['n_head']}/"
        f"{m['n_kv_head'] or m['n_head']} kv, d_ff {m['d_ff']}, vocab {m['vocab_size']}, "
        f"ctx {m['max_seq_len']}, attention {m['attention']}, linear {m['linear']}, ffn {m['ffn']}",
    ]
    sp = m.get("spike") or {}
    if sp.get("steps"):
        lines.append(f"spiking      feed-forward layers over T={sp['steps']} steps, beta "
                     f"{sp.get('beta', 1.0):g}, reset {sp.get('reset', 'subtract')}")
    if p:
        lines.append(f"parameters   {p['total']:,} total, {p['non_embedding']:,} non-embedding, "
                     f"{p['embedding']:,} embedding, {p['active']:,} active per token")
    if lg:
        fpt = lg.get("flops_per_token", {})
        lines += [f"compute      {lg.get('tokens_seen', 0):,} tokens, {lg.get('flops_total', 0):.3e} "
                  f"FLOPs ({fpt.get('train', 0):.3e}/token), {lg.get('wall_time_s', 0):.0f} s, "
                  f"{lg.get('achieved_flops_per_s', 0) / 1e9:.1f} GFLOP/s"]
    if ev:
        lines.append(f"last eval    step {ev['step']}: loss {ev['loss']:.4f}, perplexity "
                     f"{ev['perplexity']:.3f}, {ev['bits_per_byte']:.4f} bits/byte")
    for name, size in info["checkpoint_files"].items():
        lines.append(f"file         {name}: {size / 1e6:.2f} MB")
    lines.append(f"folder size  {info['run_bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)
