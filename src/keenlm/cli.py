"""The ``keenlm`` command line. Thin: it parses, builds configs, and calls the library.

Every config field is an option ``--SECTION.FIELD``, generated from the dataclasses in
keenlm.config, with its default and the comment written beside it in the source as help.
Precedence: defaults < --preset < --config file < --SECTION.FIELD options.
"""
from __future__ import annotations

import argparse
import os
import dataclasses
import inspect
import json
import sys
import textwrap
from pathlib import Path

from keenlm.config import SECTIONS, ConfigError, SpikeConfig, from_dict, load_file, merge, parse_overrides


def _field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the dataclass source, used as --help text."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        code, _, comment = line.partition("  # ")
        code = code.strip()
        if ":" in code and "=" in code and not code.startswith(("def ", "#")):
            out[code.split(":")[0].strip()] = comment.strip()
    return out


QUANT_HELP = "weight-only quantized CPU inference (int4: ~3x faster decode on SmolLM2)"


def _metavar(typ) -> str:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", "value")
    return "A,B,..." if name.startswith("tuple") else name.upper()


def add_config_options(parser: argparse.ArgumentParser, sections=tuple(SECTIONS)) -> None:
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options ({cls.__name__})")
        _add_fields(group, section, cls)


def _add_fields(group, prefix: str, cls) -> None:
    """``--prefix.field`` for every field; a nested part (model.moe) adds ``--prefix.part.field``."""
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            _add_fields(group, f"{prefix}.{f.name}", type(default))
            continue
        shown = ",".join(default) if isinstance(default, tuple) else default
        hint = comments.get(f.name, "")
        group.add_argument(f"--{prefix}.{f.name}", dest=f"cfg:{prefix}.{f.name}",
                           metavar=_metavar(f.type),
                           default=argparse.SUPPRESS,
                           help=f"{hint + '; ' if hint else ''}default: {shown!r}"
                           .replace("%", "%%"))


def _add_dataclass_options(parser, cls) -> None:
    """Plain options ``--field-name`` for a small dataclass (dest = the field name)."""
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                            default=argparse.SUPPRESS,
                            metavar=_metavar(f.type),
                            help=f"{comments.get(f.name, '')}; default: {f.default!r}".replace("%", "%%"))


def config_from_args(args, base: dict | None = None):
    layers = [base or {}]
    if getattr(args, "preset", None):
        from keenlm.presets import preset_dict

        layers.append(preset_dict(args.preset))
        layers.append({"preset": args.preset})
    if getattr(args, "config", None):
        layers.append(load_file(args.config))
    pairs = [(k[4:], v) for k, v in vars(args).items() if k.startswith("cfg:") and v is not None]
    layers.append(parse_overrides(pairs))
    return from_dict(merge(*layers))


# ------------------------------------------------------------------------------------ commands


def cmd_train(args) -> int:
    from keenlm.train import train

    cfg = config_from_args(args)
    res = train(cfg)
    ev = res.final_eval
    print(f"{'stopped' if res.interrupted else 'finished'} at step {res.step}: val loss "
          f"{ev['loss']:.4f}, {ev['bits_per_byte']:.3f} bits/byte; run folder {res.run_dir}")
    return 0


def _model_path(args) -> str:
    path = args.model or args.run
    if not path:
        raise ValueError("name a model: a run folder, a .gguf file or a Hugging Face folder")
    return path


def cmd_generate(args) -> int:
    import keenlm

    km = keenlm.load(_model_path(args), device=args.device, quant=args.quant)
    overrides = {k[len("cfg:generate."):]: v for k, v in vars(args).items()
                 if k.startswith("cfg:generate.") and v is not None}
    prompts = args.prompt or [""]
    for i, prompt in enumerate(prompts):
        if not prompt:
            prompt = "\n"  # an empty prompt has no token to start from
        if args.no_stream:
            print(km.generate(prompt, **overrides))
        else:
            sys.stdout.write(prompt)
            km.generate(prompt, stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()), **overrides)
            sys.stdout.write("\n")
        if i + 1 < len(prompts):
            print("-" * 40)
    return 0


def cmd_eval(args) -> int:
    import keenlm

    km = keenlm.load(_model_path(args), device=args.device, quant=args.quant)
    if args.task:
        return _eval_task(km, args)
    res = km.evaluate(args.corpus, batch_size=args.batch_size, seq_len=args.seq_len,
                      max_batches=args.batches)
    print(json.dumps(res, indent=2) if args.json else
          f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  "
          f"bits/byte {res['bits_per_byte']:.4f}  ({res['tokens']} tokens, {res['bytes']} bytes)")
    return 0


def _eval_task(km, args) -> int:
    from keenlm.data.tasks import evaluate_task, get_task

    if args.samples < 0 or args.n < 1:
        raise ValueError("--n must be >= 1 and --samples >= 0")
    ks = tuple(int(k) for k in args.k.split(",") if k)
    if any(k < 1 for k in ks):
        raise ValueError(f"--k {args.k!r}: a list of integers >= 1")
    task = get_task(args.task, args.difficulty, args.scratchpad)
    res = evaluate_task(km.net, km.tokenizer, task, n=args.n, samples=args.samples, ks=ks,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    g = res["pass@1 greedy"]
    print(f"{task.name}, {args.n} held-out problems: greedy pass@1 {g['success']:.3f} "
          f"(format {g['format']:.3f}, mean reward {g['reward']:.3f})")
    for k in ks:
        if f"pass@{k}" in res:
            print(f"  {args.samples} samples at temperature {args.temperature}: pass@{k} "
                  f"{res[f'pass@{k}']:.3f}  maj@{k} {res[f'maj@{k}']:.3f}")
    return 0


def cmd_rl(args) -> int:
    from keenlm.config import RLConfig, section_from_dict
    from keenlm.train.grpo import rl

    fields = {f.name for f in dataclasses.fields(RLConfig)}
    cfg = section_from_dict("rl", RLConfig, {k: v for k, v in vars(args).items()
                                             if k in fields and v is not None}, RLConfig())
    res = rl(args.model, cfg)
    print(f"{'stopped' if res.interrupted else 'finished'} at RL step {res.step}: held-out greedy "
          f"pass@1 {res.start_eval['pass@1']:.3f} -> {res.final_eval['pass@1']:.3f}; run folder "
          f"{res.run_dir} (metrics.jsonl, rl_curves.svg)")
    return 0


def _task_of(args):
    from keenlm.data.tasks import get_task

    return get_task(args.task, args.difficulty, args.scratchpad)


def cmd_train_reward(args) -> int:
    from keenlm.infer.reward import train_reward

    info = train_reward(args.policy, args.kind, _task_of(args), args.out, problems=args.problems,
                        samples=args.samples, rollouts=args.rollouts, steps=args.steps, lr=args.lr,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"wrote {args.out}: {info['kind']} on {info['examples']} rollouts ({info['labels']} labels, "
          f"{100 * info['positive_share']:.1f}% positive); labelling {info['label_seconds']:.0f} s, "
          f"training {info['train_seconds']:.0f} s")
    return 0


def cmd_solve(args) -> int:
    import keenlm
    from keenlm.infer.reward import load_reward_model
    from keenlm.infer.search import Budget, Policy, verifier
    from keenlm.infer.sweep import curves, sweep

    if args.problems < 1:
        raise ValueError(f"--problems {args.problems}: an integer >= 1")
    task = _task_of(args)
    km = keenlm.load(args.model, device=args.device)
    scorer = None
    if args.scorer == "verifier":
        scorer = verifier(task)
    elif args.scorer:
        scorer = load_reward_model(args.scorer, device=args.device)
    base = Budget(expand=args.expand, max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, step=args.step.replace("\\n", "\n").replace("\\t", "\t"),
                  seed=args.seed)
    strategies = [s for s in args.strategy.split(",") if s]
    ns = [int(n) for n in args.n.split(",") if n]
    res = sweep(Policy(km.net, km.tokenizer), scorer, task, strategies, ns, n_problems=args.problems,
                base=base, log=print if len(strategies) * len(ns) > 1 else None)
    table = ["| strategy | N | accuracy | policy tokens / problem | FLOPs / problem |",
             "|---|---|---|---|---|"]
    for name, points in curves(res).items():
        for pt in points:
            table.append(f"| {name} | {pt['n']} | {pt['accuracy']:.3f} | {pt['policy_tokens']:.0f} | "
                         f"{pt['flops']:.3g} |")
    print("\n".join(table))
    if args.out:
        from keenlm.plot import line_chart
        from keenlm.runs import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(res) + "\n")
        atomic_write_text(out / "results.md", f"{task.name}, {args.problems} held-out problems, "
                          f"scorer {args.scorer or 'none'}\n\n" + "\n".join(table) + "\n")
        line_chart({k: [(p["flops"], p["accuracy"]) for p in v] for k, v in curves(res).items()},
                   out / "accuracy_vs_flops.svg", x_label="FLOPs per problem (log scale)",
                   y_label="held-out accuracy", y_range=(0.0, 1.0), log_x=True)
        print(f"results in {out}")
    return 0


def cmd_info(args) -> int:
    from keenlm.info import run_info

    print(run_info(Path(args.run), as_json=args.json))
    return 0


def cmd_convert(args) -> int:
    import keenlm

    km = keenlm.load(args.src)
    if args.to == "hf":
        from keenlm.io.hf import export_hf

        out = export_hf(km.net, km.tokenizer, args.dst, overwrite=args.overwrite)
    else:
        from keenlm.io.gguf_export import export_gguf

        out = export_gguf(km.net, km.tokenizer, args.dst, args.type)
    print(f"wrote {out}")
    return 0


def cmd_quantize(args) -> int:
    from keenlm.config import QuantConfig, section_from_dict
    from keenlm.quantize import model_bytes, quantize, save_quantized

    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    q = section_from_dict("quant", QuantConfig, {k: v for k, v in vars(args).items()
                                                 if k in fields and v is not None}, QuantConfig())
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists (--overwrite replaces it)")
    km = quantize(args.model, q, qat_dir=out.parent / f"{out.name}.qat-run")
    save_quantized(km, out, overwrite=args.overwrite)
    b = model_bytes(km)
    print(f"wrote {out}: {b['total'] / 1e6:.2f} MB of weights ({b['fp32_total'] / 1e6:.2f} MB in "
          f"fp32, {b['ratio']:.1f}x smaller)")
    return 0


def _int_list(text: str, option: str) -> list[int]:
    """"4,8,16" -> [4, 8, 16], or an error that names the option."""
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: give comma-separated integers, e.g. 4,8,16") from None


def cmd_spike(args) -> int:
    import keenlm
    from keenlm.spike import save_spiking, spike_eval

    steps = _int_list(args.steps, "--steps")
    if (args.out or args.nir) and len(steps) != 1:
        raise ValueError("--out and --nir save one spiking model: give a single --steps value")
    km = keenlm.load(_model_path(args))
    own = km.config.model.spike  # a spiking model keeps its neuron unless told otherwise
    spike = SpikeConfig(steps=steps[0], beta=own.beta if args.beta is None else args.beta,
                        reset=args.reset or own.reset, round=own.round and not args.no_round,
                        percentile=args.percentile, calibrate=args.calibrate)
    res = spike_eval(km, steps, spike, calibrate=args.calibrate, batches=args.batches,
                     batch_size=args.batch_size, seq_len=args.seq_len,
                     log=(lambda s: None) if args.json else print)
    net = res["models"][steps[0]]
    if args.out:
        print(f"wrote {save_spiking(km, net, args.out, overwrite=args.overwrite)}")
    if args.nir:
        from keenlm.model.spiking_nir import export_nir

        print(f"wrote {export_nir(net, args.nir)}")
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "models"}, indent=2))
    return 0


def cmd_study(args) -> int:
    from keenlm import study

    floats = lambda s: tuple(float(v) for v in s.split(",") if v)  # noqa: E731
    if args.study == "frontier":
        study.frontier(args.out, sizes=tuple(args.sizes.split(",")),
                       kinds=tuple(args.kinds.split(",")), steps=args.steps,
                       qat_starts=floats(args.qat_starts))
    elif args.study == "tts":
        res = study.tts(args.out, task=args.task, difficulty=args.difficulty,
                        scratchpad=args.scratchpad, small=args.small, large=args.large,
                        sft_steps=args.sft_steps or 3000,
                        ns=tuple(int(n) for n in args.ns.split(",")), eval_n=args.eval_n,
                        sweep_large=args.sweep_large)
        print(f"small {args.small} best {res['best']['strategy']} N={res['best']['n']}: "
              f"{res['best']['accuracy']:.3f}; large {args.large} greedy "
              f"{res['large']['greedy']['accuracy']:.3f}")
    elif args.study == "epochs":
        from keenlm.study_law2 import epochs

        res = epochs(args.out, depth=args.depth or 3,
                     unique_tokens=int(float(args.unique_tokens)), max_epochs=args.epochs)
        print(f"lowest validation loss on repeated data after {res['best_epochs']:.1f} epochs")
    elif args.study == "moe":
        from keenlm.study_moe import moe

        res = moe(args.out, depth=args.depth or 4, tokens=int(float(args.tokens)),
                  experts=args.experts, top_k=args.top_k,
                  bias_rates=tuple(float(r) for r in args.bias_rates.split(",")),
                  seeds=args.seeds, pair_only=args.pair_only)
        print(f"MoE minus dense validation loss {-res['loss_gain']:+.4f}; seconds per step "
              f"{res['step_ratio']:.2f}x the dense model's")
    elif args.study == "spike":
        from keenlm.study_spike import spike

        res = spike(args.out, depth=args.depth or 4, tokens=int(float(args.tokens)),
                    steps=tuple(_int_list(args.spike_steps, "--spike-steps")),
                    finetune_steps=args.finetune_steps)
        b = res["best"]
        print(f"best spiking model: {b['neuron']} at T={b['steps']}, {b['gap']:+.1%} validation "
              f"loss against dense")
    elif args.study == "select":
        from keenlm.study_select import select

        res = select(args.out, depth=args.depth or 3, tokens=int(float(args.tokens)))
        for r in res["rows"]:
            print(f"{r['name']}: val loss {r['val_loss']:.4f}, time to target "
                  + (f"{r['time_to_target']:.0f} s ({r['speedup_time']:.2f}x)"
                     if r["time_to_target"] else "not reached"))
    elif args.study == "memory":
        from keenlm.study_memory import memory

        res = memory(args.out, lengths=tuple(int(v) for v in args.lengths.split(",")),
                     window=args.window, steps=args.mem_steps, gate=args.gate)
        for r in res["rows"]:
            print(f"{r['name']}: " + ", ".join(f"{L}: {a:.3f}" for L, a in r["accuracy"].items()))
    elif args.study == "group":
        from keenlm.study_law2 import group

        res = group(args.out, groups=tuple(int(g) for g in args.groups.split(",")),
                    steps=args.rl_steps, task=args.task, difficulty=args.difficulty, size=args.size,
                    sft_steps=args.sft_steps or 1500, start_at=args.start_at, eval_n=args.eval_n,
                    lr=args.lr)
        for r in res["rows"]:
            print(f"G={r['group']}: held-out greedy pass@1 {r['final']['pass@1']:.3f} "
                  f"({r['samples']:,} samples, {r['seconds']:.0f} s)")
    elif args.study == "rl":
        res = study.rl(args.out, task=args.task, difficulty=args.difficulty, size=args.size,
                       sft_steps=args.sft_steps or 1500, start_at=args.start_at, budget_s=args.budget,
                       algos=tuple(args.algos.split(",")), eval_n=args.eval_n,
                       rl_options={"lr": args.lr})
        for r in res["runs"]:
            print(f"{r['algo']}: held-out greedy pass@1 {r['start']:.3f} -> "
                  f"{r['final']['pass@1']:.3f} in {r['seconds']:.0f} s")
    else:
        if not args.model:
            raise ValueError("keenlm study ptq needs --model (a run folder, .gguf or HF folder)")
        study.ptq(args.model, args.out, recipes=tuple(args.recipes.split(",")),
                  eval_batches=args.eval_batches, qat_steps=args.qat_steps)
    print(f"results in {args.out}/results.md")
    return 0


def cmd_report(args) -> int:
    from keenlm.report import build_report

    page = build_report(args.folders, args.out)
    print(f"wrote {page} (charts as SVG and PNG in {page.stem}_files/)")
    return 0


def cmd_chat(args) -> int:
    from keenlm.chat import chat_loop

    chat_loop(args.model, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, device=args.device, quant=args.quant)
    return 0


def cmd_demo(args) -> int:
    from keenlm.demo import run_demo

    run_demo(out_dir=args.out, time_budget_s=args.budget)
    return 0


def _add_io_commands(sub, fmt) -> None:
    from keenlm.config import QuantConfig
    from keenlm.io.gguf_export import QTYPES
    from keenlm.study import DEFAULT_PTQ  # no gguf package needed to build the parser

    c = sub.add_parser("convert", help="convert a run, GGUF or HF model to HF or GGUF",
                       formatter_class=fmt)
    c.add_argument("src", help="run folder, .gguf file or Hugging Face folder")
    c.add_argument("dst", help="output folder (hf) or .gguf file")
    c.add_argument("--to", choices=("hf", "gguf"), required=True, help="output format")
    c.add_argument("--type", default="f32", choices=QTYPES,
                   help="GGUF weight type: q8_0 8.5 bits per weight; for ternary models only, "
                        "tq1_0 1.69 or tq2_0 2.06")
    c.add_argument("--overwrite", action="store_true", help="replace an existing HF folder")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="packed low-bit model: 1.58/2/3/4 bits by rtn, gptq or qat",
                       formatter_class=fmt)
    q.add_argument("model", help="run folder, .gguf file or Hugging Face folder")
    q.add_argument("out", help="output folder (a quantized model: keenlm generate|eval|info OUT)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_dataclass_options(q, QuantConfig)
    q.set_defaults(func=cmd_quantize)

    st = sub.add_parser("study", help="studies: low-bit frontier, PTQ, RL, test-time compute, "
                                      "epochs, group size, mixture of experts, selective backprop, "
                                      "neural memory, spiking execution",
                        formatter_class=fmt)
    st.add_argument("study", choices=("frontier", "ptq", "rl", "tts", "epochs", "group", "moe",
                                           "select", "memory", "spike"),
                    help="frontier: train fp32/int4/int2/ternary models at several sizes on equal "
                         "tokens; ptq: quantize one model by several recipes; rl: supervised "
                         "warm-up on a task, then GRPO and rejection-sampling fine-tuning; tts: "
                         "a small policy with test-time search vs a larger one answering greedily; "
                         "epochs: loss vs passes over fixed unique data, against fresh data; "
                         "group: GRPO accuracy vs samples per prompt (group size); moe: mixture "
                         "of experts vs dense models of equal active and of equal total parameters; "
                         "select: selective backprop (loss, probability, Rho-1 excess) vs full "
                         "backprop, time to a target loss; memory: long-context recall with and "
                         "without the neural memory; spike: a model converted to spiking "
                         "feed-forward layers and fine-tuned, at several time steps, with firing "
                         "rates and energy per token")
    st.add_argument("out", help="output folder (results.json, results.md, frontier.svg, runs/)")
    st.add_argument("--sizes", default="64x2,128x2,128x4", help="frontier: d_model x layers list")
    st.add_argument("--kinds", default="dense,int4,int2,ternary", help="frontier: linear kinds")
    st.add_argument("--steps", type=int, default=500, help="frontier: steps (16 x 256 tokens each)")
    st.add_argument("--qat-starts", default="", help="frontier: extra ternary runs at the middle "
                    "size that start QAT at these fractions, e.g. 0.25,0.5,0.75")
    st.add_argument("--model", help="ptq: run folder, .gguf file or HF folder")
    st.add_argument("--recipes", default=",".join(DEFAULT_PTQ),
                    help="ptq: bits:method:group list (group 0 = per row)")
    st.add_argument("--eval-batches", type=int, default=10, help="ptq: held-out batches (4 x 512)")
    st.add_argument("--qat-steps", type=int, default=0, help="ptq: add 2-bit QAT of this many steps")
    st.add_argument("--task", default="countdown", choices=("addition", "multiplication", "countdown"),
                    help="rl, group, tts: the verifiable task")
    st.add_argument("--difficulty", type=int, default=2, help="rl, group, tts: digits / numbers on offer")
    st.add_argument("--size", default="128x4", help="rl, group: policy d_model x layers")
    st.add_argument("--sft-steps", type=int, default=0,
                    help="rl, group, tts: supervised warm-up steps (0: 1500 for rl and group, 3000 for tts)")
    st.add_argument("--start-at", type=float, default=0.2,
                    help="rl, group: start RL from the first warm-up checkpoint (every 100 steps) whose "
                         "validation pass@1 reaches this")
    st.add_argument("--budget", type=float, default=880.0,
                    help="rl: wall-clock seconds of each RL run (sampling, updates, evaluations)")
    st.add_argument("--algos", default="grpo,rft", help="rl: algorithms, each from the same policy")
    st.add_argument("--eval-n", type=int, default=200, help="rl, group: held-out problems")
    st.add_argument("--lr", type=float, default=2e-4, help="rl, group: learning rate of the RL runs")
    st.add_argument("--scratchpad", action="store_true",
                    help="tts: answers worked step by step (arithmetic, countdown)")
    st.add_argument("--small", default="64x4", help="tts: the small policy, d_model x layers "
                    "(64x4: 230k parameters, 30%% greedy on 2-number Countdown after 3000 steps)")
    st.add_argument("--large", default="256x3", help="tts: the large policy (256x3: 2.48M, 10.8x)")
    st.add_argument("--ns", default="1,4,16,64", help="tts: budgets N of every strategy")
    st.add_argument("--depth", type=int, default=0,
                    help="epochs, moe, select, spike: depth of the size dial (0: 4 for moe and "
                         "spike, else 3)")
    st.add_argument("--tokens", default="4e6",
                    help="moe: training tokens of each model; select: of the full-backprop run; "
                         "spike: of the dense model")
    st.add_argument("--experts", type=int, default=8, help="moe: routed experts")
    st.add_argument("--top-k", type=int, default=2, help="moe: experts per token")
    st.add_argument("--bias-rates", default="0.001,0.003,0.01",
                    help="moe: comma-separated rates of the bias-balanced runs (one run each)")
    st.add_argument("--pair-only", action="store_true",
                    help="moe: only the dense / MoE (aux) pair and its seeds (e.g. at more tokens)")
    st.add_argument("--seeds", type=int, default=1,
                    help="moe: seeds of the dense and MoE (aux) pair (more: the run-to-run spread)")
    st.add_argument("--spike-steps", default="4,8,16", help="spike: time steps T per token")
    st.add_argument("--finetune-steps", type=int, default=150,
                    help="spike: surrogate-gradient fine-tuning steps of each spiking model")
    st.add_argument("--unique-tokens", default="250e3", help="epochs: the fixed unique data")
    st.add_argument("--epochs", type=int, default=16, help="epochs: passes over it")
    st.add_argument("--lengths", default="64,128,256", help="memory: context lengths")
    st.add_argument("--window", type=int, default=16, help="memory: attention window")
    st.add_argument("--mem-steps", type=int, default=1500, help="memory: training steps")
    st.add_argument("--gate", type=float, default=0.5,
                    help="memory: a gated MAL run skips writes below this x the chunk's mean "
                         "surprise (0: no gated run)")
    st.add_argument("--groups", default="2,4,8,16", help="group: GRPO group sizes")
    st.add_argument("--rl-steps", type=int, default=150, help="group: GRPO steps of each run")
    st.add_argument("--sweep-large", action="store_true",
                    help="tts: reward models and the strategy sweep for the large policy too")
    st.set_defaults(func=cmd_study)

    ch = sub.add_parser("chat", help="multi-turn chat with a model that has a chat template",
                        formatter_class=fmt)
    ch.add_argument("model", help="run folder, .gguf file or Hugging Face folder")
    ch.add_argument("--system", default=None, help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ch.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    ch.add_argument("--quant", default="none", choices=("none", "int8", "int4"),
                    help=QUANT_HELP)
    ch.set_defaults(func=cmd_chat)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="keenlm", description="Train, evaluate and run small "
                                "language models on the compute one person has.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (writes a run folder)", formatter_class=fmt,
                       description="Train a model. Precedence: defaults < --preset < --config < "
                       "--SECTION.FIELD options.")
    t.add_argument("--preset", help="size preset: tiny | demo | small | base | large, or a YAML file")
    t.add_argument("--config", help="YAML or JSON file of config sections")
    add_config_options(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text from a run", formatter_class=fmt)
    g.add_argument("run", nargs="?", help="run folder, .gguf file or Hugging Face folder")
    g.add_argument("--model", help="the same as RUN, for scripts that name it")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--no-stream", action="store_true", help="print each result at the end")
    g.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    g.add_argument("--quant", default="none", choices=("none", "int8", "int4"),
                   help=QUANT_HELP)
    add_config_options(g, ("generate",))
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="validation loss, bits per byte, perplexity", formatter_class=fmt)
    e.add_argument("run", nargs="?", help="run folder, .gguf file or Hugging Face folder")
    e.add_argument("--model", help="the same as RUN, for scripts that name it")
    e.add_argument("--corpus", default=None,
                   help="stdlib, a file, a folder or a .jsonl (whole); default: the run's val split")
    e.add_argument("--batches", type=int, default=50, help="at most this many batches")
    e.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's)")
    e.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    e.add_argument("--quant", default="none", choices=("none", "int8", "int4"),
                   help=QUANT_HELP)
    e.add_argument("--json", action="store_true", help="print JSON")
    tk = e.add_argument_group("task evaluation (instead of the loss): pass@1 greedy, pass@k, maj@k")
    tk.add_argument("--task", choices=("addition", "multiplication", "countdown"),
                    help="a verifiable task: score answers on its held-out split")
    tk.add_argument("--difficulty", type=int, default=2, help="digits per operand / numbers on offer")
    tk.add_argument("--scratchpad", action="store_true",
                    help="answers worked step by step (arithmetic, countdown)")
    tk.add_argument("--n", type=int, default=100, help="held-out problems")
    tk.add_argument("--samples", type=int, default=0,
                    help="sampled answers per problem for pass@k and maj@k (0: greedy only)")
    tk.add_argument("--k", default="1,4,8", help="k values for pass@k and maj@k")
    tk.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    tk.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    e.set_defaults(func=cmd_eval)

    def task_options(parser):
        parser.add_argument("--task", required=True, choices=("addition", "multiplication", "countdown"),
                            help="a verifiable task")
        parser.add_argument("--difficulty", type=int, default=2, help="digits / numbers on offer")
        parser.add_argument("--scratchpad", action="store_true",
                            help="answers worked step by step, one line per step")
        parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sample (per step in search)")
        parser.add_argument("--seed", type=int, default=0, help="sampling seed")

    tr = sub.add_parser("train-reward", help="train an outcome or process reward model on a "
                        "policy's own rollouts", formatter_class=fmt)
    tr.add_argument("policy", help="the policy: run folder, .gguf file or HF folder")
    tr.add_argument("--kind", required=True, choices=("orm", "prm"),
                    help="orm: one label per answer; prm: Monte-Carlo labels per step")
    tr.add_argument("--out", required=True, help="output folder (a reward model)")
    task_options(tr)
    tr.add_argument("--problems", type=int, default=200, help="training problems")
    tr.add_argument("--samples", type=int, default=4, help="rollouts per problem")
    tr.add_argument("--rollouts", type=int, default=4, help="prm: Monte-Carlo continuations per step")
    tr.add_argument("--steps", type=int, default=300, help="training steps (16 examples each)")
    tr.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    tr.set_defaults(func=cmd_train_reward)

    so = sub.add_parser("solve", help="answer held-out problems with a test-time strategy; a list "
                        "of strategies and N sweeps them and writes accuracy-vs-FLOPs curves",
                        formatter_class=fmt)
    so.add_argument("model", help="the policy: run folder, .gguf file or HF folder")
    task_options(so)
    so.add_argument("--strategy", default="majority",
                    help="comma list of majority, weighted_majority, best_of_n, beam, dvts, budget_forcing")
    so.add_argument("--n", default="8", help="comma list of budgets N (samples; beam width x expand)")
    so.add_argument("--scorer", default="", help="verifier (the exact reward, an oracle) or a "
                    "reward model folder (keenlm train-reward)")
    so.add_argument("--problems", type=int, default=50, help="held-out problems")
    so.add_argument("--expand", type=int, default=4, help="beam search, dvts: next steps per partial solution")
    so.add_argument("--max-steps", type=int, default=16, help="beam search, dvts: reasoning steps")
    so.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    so.add_argument("--step", default="\\n", help="step delimiter (escapes such as \\n allowed)")
    so.add_argument("--device", default="cpu", help="cpu | cuda | mps")
    so.add_argument("--out", default="", help="folder for results.json, results.md, accuracy_vs_flops.svg")
    so.set_defaults(func=cmd_solve)

    r = sub.add_parser("rl", help="reinforcement learning on a verifiable task: GRPO or "
                       "rejection-sampling fine-tuning", formatter_class=fmt,
                       description="Sample --group completions per prompt, reward them exactly, "
                       "reinforce the best (keenlm.train.grpo). Writes a run folder.")
    r.add_argument("model", help="the starting policy: run folder, .gguf file or HF folder")
    from keenlm.config import RLConfig
    _add_dataclass_options(r, RLConfig)
    r.set_defaults(func=cmd_rl)

    i = sub.add_parser("info", help="describe a run: config, parameters, ledger, files",
                       formatter_class=fmt)
    i.add_argument("run", help="run folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    sp = sub.add_parser("spike", help="run a model as a spiking network: loss, firing rates, "
                        "synaptic operations and energy per token against the dense model",
                        formatter_class=fmt)
    sp.add_argument("run", nargs="?", help="run folder, .gguf file or Hugging Face folder")
    sp.add_argument("--model", help="the same as RUN, for scripts that name it")
    sp.add_argument("--steps", default="4,8,16", help="time steps T per token, comma-separated")
    sp.add_argument("--calibrate", type=int, default=8,
                    help="training batches for threshold balancing")
    sp.add_argument("--beta", type=float, default=None,
                    help="membrane leak per step (1: integrate-and-fire; default: 1, or a "
                         "spiking model's own)")
    sp.add_argument("--reset", default=None, choices=("subtract", "zero"),
                    help="after a spike: subtract the threshold, or reset to zero (NIR's neuron); "
                         "default: subtract, or a spiking model's own")
    sp.add_argument("--no-round", action="store_true",
                    help="no 1/(2T) bias: T steps give floor(T x) spikes instead of round(T x)")
    sp.add_argument("--percentile", type=float, default=99.9,
                    help="threshold balancing: percentile of |activation| per channel")
    sp.add_argument("--batches", type=int, default=20, help="validation batches")
    sp.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    sp.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's)")
    sp.add_argument("--out", help="save the spiking model as a run folder (one --steps value)")
    sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sp.add_argument("--nir", help="export the spiking layers to this NIR file (needs --reset zero)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_spike)

    _add_io_commands(sub, fmt)
    from keenlm.scaling.cli import add_parser as add_scale_parser

    add_scale_parser(sub, fmt)
    rp = sub.add_parser("report", help="one self-contained HTML page of runs, sweeps and studies",
                        formatter_class=fmt)
    rp.add_argument("folders", nargs="+", help="run, scaling sweep or study folders")
    rp.add_argument("--out", default="report.html", help="the page (charts go next to it)")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="train a small model on the Python stdlib, evaluate, sample",
                       formatter_class=fmt)
    d.add_argument("--out", default="runs/demo", help="run folder")
    d.add_argument("--budget", type=float, default=210.0, help="training time budget in seconds")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get("KEENLM_DEBUG"):
            raise
        print(f"keenlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
