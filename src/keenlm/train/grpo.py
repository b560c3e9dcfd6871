"""Reinforcement learning from verifiable rewards: GRPO and rejection-sampling fine-tuning.

Each RL step:
  1. draw ``prompts`` training problems of the task (a pure function of the seed and the step);
  2. sample ``group`` completions of each, all rows in one batched, KV-cached generate call
     (``keenlm.infer.generate_tokens``), at ``temperature``, ending at ``</answer>``, each
     prompt's rows from a generator of its own seed (so ranks that split the prompts, under
     ``rl.run.parallel``, draw what one process draws);
  3. score them with the task's exact reward (0 / 0.1 / 1.0, keenlm.data.tasks);
  4. turn rewards into per-row advantages and per-token weights (the algorithm and its loss
     variant), then take ``epochs`` x ``minibatches`` optimizer steps on that batch.

The objective (GRPO and its loss variants, RFT; advantages and token weights) is in
keenlm.train.rl_objective, with the papers it follows.

The work is shared where rows share a prompt: each prompt is prefilled once for its G samples
(``generate_tokens(repeat=G)``), and in training its forward and backward run once for its G
completions (``keenlm.train.logprobs.shared_prefix_logprobs``; the per-row
``reference_logprobs`` beside it gives the same values and gradients, as the tests check).

Log-probabilities are those of the sampling distribution (logits / temperature). Logged per
step (``metrics.jsonl``, kind "rl"): reward mean and std, success rate of the samples, the
fraction of groups with zero reward variance, completion length, KL to the starting policy,
clip fraction, tokens/s of generation and of training; every ``eval_every`` steps (kind "eval")
greedy pass@1 on a fixed held-out sample. ``rl_curves.svg`` plots reward and pass@1.

Legend: P prompts, G group size, R = P*G rows, T tokens per row (prompt + completion).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from keenlm import runs
from keenlm.config import GenerateConfig, OptimConfig, RLConfig, rl_config, save_json
from keenlm.data.tasks import Task, get_task
from keenlm.infer.task_eval import evaluate_policy
from keenlm.infer.generate import generate_tokens, stop_check
from keenlm.io.loaders import load_any
from keenlm.ledger import flops_per_token, generation_flops
from keenlm.model import model_state
from keenlm.model.lora import add_adapters
from keenlm.plot import line_chart
from keenlm.train.logprobs import completion_mask, shared_prefix_logprobs
from keenlm.train import distributed
from keenlm.train.loop import LoopShell, pick_device
from keenlm.train.optim import FiniteGuard, build_optimizer, grad_norm, init_base_lr, set_lr
from keenlm.train.rl_batch import Curriculum, Drawn, FormatReward, draw_batch
from keenlm.train.rl_objective import ALGORITHMS, LOSSES
from keenlm.train.rl_watch import Watch

# ------------------------------------------------------------------------------ sampling


def sample_group(model, tokenizer, prompts: list[str], group: int, *, temperature: float,
                 max_new_tokens: int, seed: int, stop: Optional[str] = "</answer>",
                 stop_at_eos: bool = True, seeds: Optional[list[int]] = None):
    """``group`` completions of each prompt in one batched, KV-cached generate call (each
    prompt prefilled once): (prompt ids, completion ids per row, completion texts). Row r
    continues prompt r // group. The same seed gives the same samples. With ``stop=None`` and
    ``stop_at_eos=False`` every completion has ``max_new_tokens`` tokens."""
    prompt_ids = [tokenizer.encode_prompt(p) for p in prompts]
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    outs = generate_tokens(model, prompt_ids, cfg, eos_id=tokenizer.eos_id if stop_at_eos else None,
                           should_stop=stop_check(tokenizer, (stop,) if stop else ()), repeat=group,
                           seeds=seeds)
    return prompt_ids, outs, [tokenizer.decode(o) for o in outs]


# ------------------------------------------------------------------------------ the loop


@dataclasses.dataclass
class RLResult:
    run_dir: Path
    step: int
    start_eval: dict
    final_eval: dict
    interrupted: bool
    best: dict = dataclasses.field(default_factory=dict)  # the best by validation (Watch.best)
    warnings: list = dataclasses.field(default_factory=list)  # what the run warned about


class RLTrainer(LoopShell):
    """GRPO or RFT on a task, starting from a loaded policy (``keenlm.load``)."""

    record_kind = "rl"
    eval_at_start = True
    log_every = 1

    def __init__(self, policy, cfg: RLConfig, task: Task | None = None,
                 reward: Callable[[list[str], list[str]], list[float]] | None = None,
                 stop: Optional[str] = "</answer>", stop_at_eos: bool = True):
        """policy: a KeenModel. task: default from cfg; reward: default the task's. stop and
        stop_at_eos end completions (None and False: always max_new_tokens, for benchmarks)."""
        run, opt = cfg.run, cfg.optim
        super().__init__(run.out_dir)
        if run.threads:
            torch.set_num_threads(run.threads)
        if cfg.lora.rank:  # adapters on the policy; the base stays frozen (keenlm.model.lora)
            adapt(policy, cfg.lora)
        if policy.config.model.lora.base != "q4" and any(b.dtype == torch.uint8
                                                         for b in policy.net.buffers()):
            raise ValueError("RL on a packed low-bit policy: load it in full precision and train "
                             "adapters over a 4-bit base (QLoRA: --lora-rank R --lora-base q4)")
        trainable = [p for p in policy.net.parameters() if p.requires_grad]
        if not trainable or any(p.dtype != torch.float32 for p in trainable):
            raise ValueError("RL needs a model with full-precision weights to train: a quantized "
                             "policy trains through LoRA adapters (--lora-rank)")
        self.cfg, self.km = cfg, policy
        self.device = pick_device(run.device)
        # across processes: each rank samples and trains on its share of the step's prompts,
        # gradients are summed over the ranks (keenlm.train.distributed)
        self.dist = distributed.setup(run.parallel, self.device)
        self.is_main = self.dist.main
        if self.dist.active:
            self.stop_signals = (signal.SIGINT, signal.SIGTERM)
            if cfg.prompts % self.dist.world:
                raise ValueError(f"rl.prompts={cfg.prompts} must split evenly over "
                                 f"{self.dist.world} ranks")
            if cfg.oversample:
                raise ValueError("rl.oversample with rl.run.parallel: dynamic sampling runs in "
                                 "one process; use 0")
            if cfg.minibatches != 1:
                raise ValueError("rl.minibatches > 1 with rl.run.parallel: minibatches are drawn "
                                 "from the whole batch; use 1")
            if policy.config.model.ffn == "moe":
                raise ValueError("an MoE policy with rl.run.parallel: not supported yet")
        self.model = policy.net.to(self.device)
        self.tokenizer = policy.tokenizer
        self.task = task or get_task(cfg.task, cfg.difficulty, cfg.scratchpad,
                                     template=cfg.template, tokenizer=self.tokenizer,
                                     shots=cfg.shots, examples=cfg.examples)
        self.reward = reward or self.task.reward
        self.stop, self.stop_at_eos = stop, stop_at_eos
        self.logprobs = shared_prefix_logprobs  # reference_logprobs gives the same numbers
        self.targets, self.objective = ALGORITHMS[cfg.algo]
        self.variant = LOSSES[cfg.loss]
        hi = opt.clip_high if opt.clip_high > 0 else (self.variant.clip_high or opt.clip)
        self.clip = (opt.clip, hi)
        self.reference = None
        if opt.kl_coef > 0 or opt.log_kl:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = build_optimizer(self.model, OptimConfig(name="adamw", lr=opt.lr, beta1=0.9,
                                                           beta2=0.99,
                                                           weight_decay=opt.weight_decay),
                                   self.device.type)
        init_base_lr(self.opt)
        self.guard = FiniteGuard(opt.max_nonfinite, "; lower rl.lr")
        self.updates = 0
        self._last: dict = {}  # the latest step's record, for the progress notes
        # the best policy is chosen on a validation split that training never draws from
        self.watch = Watch()
        self.format = FormatReward(cfg.format_reward_until)
        val_n = run.eval_n if run.keep_best else 0
        self.val_problems = self.task.problems("val", val_n) if val_n else []
        self.train_problems = self.task.problems("train", 5000, val_size=val_n)
        self.curriculum = (Curriculum(self.train_problems) if cfg.curriculum == "learnability"
                           else None)
        self.warnings: list[str] = []
        self.planned_steps = cfg.steps
        self.eval_every, self.save_every = run.eval_every, run.save_every
        self.time_budget_s, self.progress = run.time_budget_s, run.progress and self.is_main
        if run.resume:
            self.resume(label="RL step")
        if self.is_main:
            self._write_run_files()
        self.dist.barrier()

    # --------------------------------------------------------------------------- run files

    def _write_run_files(self):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.step == 0:  # a fresh run: no curves of an earlier one in the same folder
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        save_json(self.km.config, self.run_dir / "config.json")
        runs.atomic_write_text(self.run_dir / "rl.json", json.dumps(dataclasses.asdict(self.cfg), indent=2))
        runs.atomic_write_text(self.run_dir / "env.json", json.dumps(runs.environment(), indent=2))
        self.tokenizer.save(self.run_dir / "tokenizer")

    def extra_state(self) -> dict:
        return {"updates": self.updates, "nonfinite": self.guard.state(),
                "watch": self.watch.state(), "format_dropped_at": self.format.dropped_at,
                "curriculum": self.curriculum.state() if self.curriculum else None}

    def save(self):
        """Every rank holds the same weights: rank 0 writes them, the others wait."""
        if self.is_main:
            super().save()
        self.dist.barrier()

    def agree(self, flag: bool) -> bool:
        return bool(self.dist.decide(flag))

    def load_extra_state(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.guard.load(state.get("nonfinite"))
        self.watch.load(state.get("watch"))
        self.format.dropped_at = int(state.get("format_dropped_at", 0))
        if self.curriculum:
            self.curriculum.load(state.get("curriculum"))

    # --------------------------------------------------------------------------- one step

    def prompts_for(self, step: int) -> list[str]:
        """The step's prompts (with rl.oversample: the candidates of every round)."""
        rng = random.Random(f"{self.cfg.seed}|{step}")
        k = self.cfg.prompts * (1 + self.cfg.oversample)
        drawn = (self.curriculum.draw(rng, k) if self.curriculum
                 else rng.sample(self.train_problems, k))
        return [p.prompt for p in drawn]

    def _draw(self, chunk: list[str], offset: int) -> Drawn:
        """Sample and score the groups of ``chunk`` (``offset``: its place among the step's
        prompts: a seed per prompt, so its samples are the same whichever rank draws them)."""
        cfg, g = self.cfg, self.cfg.group
        seeds = [(cfg.seed * 1_000_003 + self.step) * 1_009 + offset + i
                 for i in range(len(chunk))]
        prompt_ids, comps, texts = sample_group(self.model, self.tokenizer, chunk, g,
                                                temperature=cfg.temperature,
                                                max_new_tokens=cfg.max_new_tokens,
                                                seed=cfg.seed * 1_000_003 + self.step,
                                                stop=self.stop, stop_at_eos=self.stop_at_eos,
                                                seeds=seeds)
        # sampling FLOPs: each prompt prefilled once for its group (keenlm.ledger)
        flops = sum(generation_flops(self.model, len(prompt_ids[i]),
                                     [len(c) for c in comps[i * g:(i + 1) * g]])
                    for i in range(len(chunk)))
        raw = self.reward([p for p in chunk for _ in range(g)], texts)
        return Drawn(list(chunk), prompt_ids, comps, texts, self.format.apply(raw), raw, flops)

    def rl_step(self) -> dict:
        cfg = self.cfg
        prompts = self.prompts_for(self.step)
        n = cfg.prompts // self.dist.world  # this rank's prompts: [first, first + n)
        first = self.dist.rank * n
        t0 = time.perf_counter()
        if cfg.oversample:  # dynamic sampling (one process: keenlm.train.rl_batch)
            batch, drew = draw_batch(self._draw, prompts, n, cfg.group, cfg.oversample)
        else:
            batch = self._draw(prompts[first:first + n], first)
            drew = {"drawn": n, "rounds": 0, "all": batch}
        t_gen = time.perf_counter() - t0
        mine, prompt_ids, comps, texts = batch.prompts, batch.prompt_ids, batch.comps, batch.texts
        gen_flops, mine_rewards = drew["all"].gen_flops, batch.rewards
        # advantages and token weights are the whole batch's: every rank's rewards and completions
        all_rewards, all_comps = mine_rewards, comps
        if self.dist.active:
            parts = [None] * self.dist.world
            torch.distributed.all_gather_object(parts, (mine_rewards, comps, drew["all"].raw))
            all_rewards = [r for part in parts for r in part[0]]
            all_comps = [c for part in parts for c in part[1]]
            raw = [r for part in parts for r in part[2]]
        else:
            raw = drew["all"].raw  # every group drawn, the informative or not
        if self.curriculum:  # every group drawn (in order), with the task's own rewards
            self.curriculum.observe(prompts if self.dist.active else drew["all"].prompts, raw,
                                    cfg.group)
        if self.format.observe(self.step + 1, raw) and self.is_main:
            runs.append_jsonl(self.run_dir / "metrics.jsonl",
                              {"kind": "event", "step": self.step + 1, "event": "format_dropped",
                               "text": "the format is learned: a well-formed wrong answer now "
                                       "earns 0"})
        sampled = torch.tensor(raw, dtype=torch.float32).view(-1, cfg.group)
        rewards = torch.tensor(all_rewards, dtype=torch.float32)
        grouped = rewards.view(cfg.prompts, cfg.group)
        mask = completion_mask(all_comps)
        adv, weights = self.targets(grouped, mask, self.variant, cfg.max_new_tokens, all_comps)
        rows_mine = slice(first * cfg.group, (first + n) * cfg.group)
        adv, weights = adv[rows_mine], weights[rows_mine]
        comps = all_comps[rows_mine]
        t1 = time.perf_counter()
        rows = torch.arange(len(mine)).repeat_interleave(cfg.group)
        stats = self._update(prompt_ids, rows, comps, adv, weights)
        t_train = time.perf_counter() - t1
        self.step += 1
        gen_tokens, gen_rows = sum(len(c) for c in drew["all"].comps), len(drew["all"].comps)
        train_tokens, forward_tokens = stats.pop("train_tokens"), stats.pop("forward_tokens")
        seq = (sum(len(p) for p in prompt_ids) / max(1, len(prompt_ids))
               + sum(len(c) for c in comps) / len(comps))
        per = flops_per_token(self.model, max(1, round(seq)))
        flops = gen_flops + train_tokens * per["train"] + forward_tokens * per["forward"]
        if self.dist.active:  # the job's figures
            gen_tokens, gen_rows, train_tokens, flops = self.dist.sum(
                [gen_tokens, gen_rows, train_tokens, flops])
            gen_tokens, train_tokens = int(gen_tokens), int(train_tokens)
        # success and coverage: of every group drawn (what the policy does, not the kept batch)
        return {"step": self.step, "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "success": float((sampled == 1.0).float().mean()),
                "zero_std_groups": float((grouped.std(dim=1) == 0).float().mean()),
                "coverage": float((sampled == 1.0).any(dim=1).float().mean()),
                **({"groups_drawn": drew["drawn"]} if cfg.oversample else {}),
                **({"bin_success": self.curriculum.state()} if self.curriculum else {}),
                "completion_len": gen_tokens / gen_rows, **stats,
                "gen_tokens_per_s": gen_tokens / t_gen, "gen_s": t_gen, "train_s": t_train,
                "train_tokens_per_s": train_tokens / t_train if t_train > 0 else 0.0,
                "flops": float(flops), "elapsed_s": time.perf_counter() - self.started,
                **({"skipped_updates": self.guard.skipped} if self.guard.skipped else {})}

    def train_step(self) -> dict:
        self._last = self.rl_step()
        for kind, text in self.watch.after_step(self._last["success"], self._last["coverage"]):
            self._warn(kind, text)
        return self._last

    def _warn(self, kind: str, text: str) -> None:
        """Say it (stderr) and log it (metrics.jsonl, kind "warning"); rank 0 only."""
        self.warnings.append(text)
        if self.is_main:
            print(f"warning: {text}", file=sys.stderr, flush=True)
            runs.append_jsonl(self.run_dir / "metrics.jsonl",
                              {"kind": "warning", "step": self.step, "warning": kind, "text": text})

    def _save_best(self) -> None:
        """The policy as it is now, as a run folder of its own: OUT/best (one atomic swap)."""
        if not self.is_main:
            return
        with runs.atomic_folder(self.run_dir / "best", replace=True) as tmp:
            save_json(self.km.config, tmp / "config.json")
            self.tokenizer.save(tmp / "tokenizer")
            runs.save_checkpoint(tmp, self.step, model_state(self.model), {"step": self.step},
                                 keep=1)
            runs.atomic_write_text(tmp / "best.json", json.dumps(self.watch.best, indent=2))

    def _update(self, prompt_ids, rows, comps, adv, weights) -> dict:
        """epochs x minibatches optimizer steps on the rows that carry a gradient.

        prompt_ids: the P prompts; rows (R,): the prompt of each completion; comps: R
        completions; adv (R,), weights (R, W) from the algorithm."""
        cfg, kl_coef = self.cfg, self.cfg.optim.kl_coef
        live = ((weights.sum(dim=1) > 0) & ((adv != 0) | (kl_coef > 0))).nonzero().flatten()
        n_live = int(self.dist.sum([len(live)])[0])
        if n_live == 0:
            return {"loss": 0.0, "clip_frac": 0.0, "kl": None, "rows_trained": 0, "train_tokens": 0,
                    "forward_tokens": 0}
        if len(live) == 0:  # other ranks train: take part in their gradient sums with nothing
            for _ in range(cfg.epochs):
                self._optimizer_step(None)
            loss_sum = self.dist.sum([0.0])[0]
            return {"loss": loss_sum / cfg.epochs, "clip_frac": 0.0, "kl": None,
                    "rows_trained": n_live, "train_tokens": 0, "forward_tokens": 0}
        dev = self.device
        rows, comps = rows[live], [comps[i] for i in live.tolist()]
        W = max(len(c) for c in comps)
        adv, weights = adv[live].to(dev), weights[live, :W].to(dev)
        temp, logprobs = cfg.temperature, self.logprobs

        def run(model, part):
            return logprobs(model, prompt_ids, rows[part], [comps[i] for i in part.tolist()],
                            temp, width=W)

        everything = torch.arange(len(live))
        with torch.no_grad():
            many = cfg.epochs * cfg.minibatches > 1
            old = run(self.model, everything) if many else None
            ref = run(self.reference, everything) if self.reference is not None else None
        self.model.train()
        order = everything
        losses, clip_fracs, kls, tokens = [], [], [], 0
        for epoch in range(cfg.epochs):
            if cfg.minibatches > 1:
                g = torch.Generator().manual_seed(cfg.seed * 7919 + self.step * 31 + epoch)
                order = torch.randperm(len(live), generator=g)
            for part in order.chunk(cfg.minibatches):
                logp = run(self.model, part)
                p = part.to(dev)
                loss, st = self.objective(logp, logp.detach() if old is None else old[p], adv[p],
                                          weights[p] * cfg.minibatches, *self.clip,
                                          None if ref is None else ref[p], kl_coef)
                self._optimizer_step(loss)
                losses.append(loss.item())
                clip_fracs.append(st["clip_frac"])
                if "kl" in st:
                    kls.append(st["kl"])
                tokens += sum(len(comps[i]) for i in part.tolist()) + \
                    sum(len(prompt_ids[i]) for i in rows[part].unique().tolist())
        loss_sum = self.dist.sum([sum(losses)])[0]  # the batch's loss: every rank's part
        # tokens through the no-grad passes (old policy, reference), for the FLOP count
        once = sum(len(c) for c in comps) + sum(len(prompt_ids[i]) for i in rows.unique().tolist())
        return {"loss": loss_sum / len(losses), "clip_frac": sum(clip_fracs) / len(clip_fracs),
                "kl": sum(kls) / len(kls) if kls else None, "rows_trained": n_live,
                "train_tokens": tokens, "forward_tokens": once * ((old is not None) + (ref is not None))}

    def _optimizer_step(self, loss):
        opt = self.cfg.optim
        warm = min(1.0, (self.updates + 1) / opt.warmup_steps) if opt.warmup_steps else 1.0
        set_lr(self.opt, warm)
        aux = self.model.aux_losses()  # auxiliary losses of the model's parts in this forward
        if loss is not None:
            (loss + sum(aux.values()) if aux else loss).backward()
        if self.dist.active:  # the batch's loss is the sum of the ranks' parts: so is its gradient
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
        norm = grad_norm(self.model.parameters(), opt.grad_clip)
        value = float(loss.detach()) if loss is not None else 0.0
        if self.guard.allow(value, norm, self.step + 1):  # a non-finite update is skipped, counted
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.end_step()  # per-step updates of the model's parts
        self.updates += 1

    # --------------------------------------------------------------------------- loop

    def evaluate(self) -> dict:
        ev = evaluate_policy(self.model, self.tokenizer, self.task, self.cfg.run.eval_n,
                             max_new_tokens=self.cfg.max_new_tokens)
        out = {"pass@1": ev["success"], "format": ev["format"], "reward": ev["reward"]}
        if self.val_problems:
            val = evaluate_policy(self.model, self.tokenizer, self.task,
                                  problems=self.val_problems,
                                  max_new_tokens=self.cfg.max_new_tokens)
            out["val_pass@1"] = val["success"]
            if self.watch.evaluated(self.step, val["success"], ev["success"]):
                self._save_best()
        return out

    def eval_fields(self, at_start: bool = False) -> dict:
        return {"elapsed_s": 0.0 if at_start else time.perf_counter() - self.started}

    def step_info(self, rec: dict) -> str:
        return (f"reward {rec['reward_mean']:.3f}  success {rec['success']:.3f}  "
                f"{rec['gen_tokens_per_s']:,.0f} sampled tok/s")

    def eval_note(self, ev: dict) -> str:
        reward = f"reward {self._last['reward_mean']:.3f}, " if self._last else ""
        return f"step {self.step}: {reward}held-out pass@1 {ev['pass@1']:.3f}"

    def fit(self) -> RLResult:
        start_eval, final, interrupted = self.run_loop()
        for kind, text in self.watch.at_end(start_eval, final):
            self._warn(kind, text)
        write_curves(self.run_dir)
        return RLResult(self.run_dir, self.step, start_eval, final, interrupted,
                        self.watch.best, self.warnings)


def adapt(policy, lora) -> None:
    """Give a loaded policy LoRA adapters (in place; its config records them, so the run
    folder rebuilds them)."""
    if policy.config.model.lora.rank:
        raise ValueError("the policy already has LoRA adapters: train them on without "
                         "--lora-rank, or merge them first (keenlm convert --merge-lora)")
    add_adapters(policy.net, lora)
    policy.config = dataclasses.replace(
        policy.config, model=dataclasses.replace(policy.config.model, lora=lora))


def rl(policy, cfg: RLConfig | dict) -> RLResult:
    """Run GRPO or RFT from ``policy`` (a path or a loaded KeenModel); ``cfg`` an RLConfig or a
    flat or nested dict of its fields."""
    cfg = rl_config(cfg)
    if isinstance(policy, (str, Path)):
        policy = load_any(Path(policy))
    return RLTrainer(policy, cfg).fit()


# ------------------------------------------------------------------------------ curves


def write_curves(run_dir) -> Path:
    """``rl_curves.svg``: sampled reward (mean per step) and held-out greedy pass@1 against
    the RL step, from the run's metrics."""
    recs = runs.read_jsonl(Path(run_dir) / "metrics.jsonl")
    reward = [(r["step"], r["reward_mean"]) for r in recs if r.get("kind") == "rl"]
    success = [(r["step"], r["success"]) for r in recs if r.get("kind") == "rl"]
    passed = [(r["step"], r["pass@1"]) for r in recs if r.get("kind") == "eval" and "pass@1" in r]
    path = Path(run_dir) / "rl_curves.svg"
    line_chart({"sampled reward (mean)": reward, "sampled success": success,
                "held-out pass@1 (greedy)": passed}, path, x_label="RL step", y_label="rate / reward",
               y_range=(0.0, 1.0))
    return path


__all__ = ["RLTrainer", "RLResult", "rl", "sample_group", "write_curves"]
