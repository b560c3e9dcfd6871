"""``keenlm rl``'s config: reinforcement learning on a verifiable task (keenlm.train.grpo).

``RLConfig`` holds the algorithm and the sampling; ``rl.optim`` the update; ``rl.run`` the run
folder, evaluation and budget. Field names are unique across the parts, so the command line
keeps flat options (``--lr``, ``--out-dir``) and ``nest_flat`` places them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from keenlm.config.base import check
from keenlm.config.model import LoRAConfig
from keenlm.config.train import DEVICE_HELP, valid_device

RL_TASKS = ("addition", "multiplication", "countdown")
EXAMPLES = ("demonstration", "equation")  # keenlm.data.tasks.EXAMPLES
TEMPLATES = ("plain", "chat")  # keenlm.data.tasks.TEMPLATES (config sits below data; a test keeps them equal)
RL_ALGOS = ("grpo", "rft")
RL_LOSSES = ("grpo", "dapo", "dr_grpo")
RL_CURRICULA = ("none", "learnability")


@dataclass(frozen=True)
class RLOptimConfig:
    """``rl.optim``: the policy update."""

    lr: float = 1e-4  # AdamW learning rate (constant after warm-up)
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    weight_decay: float = 0.0  # decoupled, on matrices only
    grad_clip: float = 1.0  # 0: off
    clip: float = 0.2  # epsilon: the ratio is clipped to [1 - clip, 1 + clip_high]
    clip_high: float = -1.0  # upper clip; -1: the loss variant's own (dapo 0.28, else = clip)
    kl_coef: float = 0.0  # beta: weight of the KL to the frozen starting policy (k3 estimator)
    log_kl: bool = True  # keep the frozen starting policy to log the KL even when kl_coef is 0
    max_nonfinite: int = 5  # non-finite updates in a row (each skipped, never applied) before the run stops

    def __post_init__(self):
        p = "rl."
        check(self.lr > 0, p + "lr", self.lr, "a number > 0")
        check(self.warmup_steps >= 0, p + "warmup_steps", self.warmup_steps, "an integer >= 0")
        for name in ("weight_decay", "grad_clip", "kl_coef", "max_nonfinite"):
            v = getattr(self, name)
            check(v >= 0, p + name, v, "a number >= 0")
        check(0 < self.clip < 1, p + "clip", self.clip, "a number in (0, 1)")
        check(self.clip_high == -1 or self.clip_high > 0, p + "clip_high", self.clip_high,
              "a number > 0, or -1 for the loss variant's own")


@dataclass(frozen=True)
class RLRunConfig:
    """``rl.run``: the run folder, held-out evaluation, budget and device."""

    eval_every: int = 10  # steps between held-out greedy pass@1 (0: start and end only)
    eval_n: int = 100  # held-out problems in that evaluation (a fixed sample)
    keep_best: bool = True  # also score eval_n validation problems (never trained on) at each evaluation and keep the best policy in out_dir/best
    time_budget_s: float = 0.0  # >0: stop (and save) once this much wall time has passed
    save_every: int = 0  # 0: only at the end (and on Ctrl-C)
    threads: int = 0  # 0: torch default
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    out_dir: str = "runs/rl"  # run folder (a keenlm run: keenlm generate|eval OUT work on it)
    resume: bool = True  # continue from out_dir's latest checkpoint when it exists
    progress: bool = True  # live progress bar (plain lines when not a terminal)
    parallel: str = "auto"  # none | ddp | auto (ddp under torchrun with several processes): prompts split over the ranks

    def __post_init__(self):
        p = "rl."
        check(self.parallel in ("none", "ddp", "auto"), p + "parallel", self.parallel,
              "none | ddp | auto")
        check(self.eval_n >= 1, p + "eval_n", self.eval_n, "an integer >= 1")
        for name in ("eval_every", "save_every", "threads"):
            v = getattr(self, name)
            check(v >= 0, p + name, v, "an integer >= 0")
        check(self.time_budget_s >= 0, p + "time_budget_s", self.time_budget_s, "a number >= 0")
        check(valid_device(self.device), p + "device", self.device, DEVICE_HELP)
        check(bool(self.out_dir), p + "out_dir", self.out_dir, "a folder path")


@dataclass(frozen=True)
class RLConfig:
    """``keenlm rl``: reinforcement learning on a verifiable task (keenlm.train.grpo)."""

    task: str = "addition"  # addition | multiplication | countdown
    difficulty: int = 2  # digits per operand (arithmetic) or numbers on offer (countdown)
    scratchpad: bool = False  # answers worked step by step before the answer tag
    template: str = "plain"  # plain | chat: prompts rendered by the model's chat template (a pretrained chat model)
    shots: int = 0  # with template chat: worked examples shown as earlier turns
    examples: str = "demonstration"  # what the examples show: demonstration (the task's own) | equation (the problem restated with its result, then the answer)
    algo: str = "grpo"  # grpo | rft (rejection-sampling fine-tuning: train on the correct samples)
    loss: str = "dr_grpo"  # grpo | dapo | dr_grpo: advantage scaling and token normalization
    group: int = 8  # completions sampled per prompt (G)
    prompts: int = 16  # prompts per step
    steps: int = 200  # RL steps (each: sample, score, epochs x minibatches optimizer steps)
    epochs: int = 1  # passes over each sampled batch (GRPO's mu); >1 makes the ratio differ from 1
    minibatches: int = 1  # optimizer steps per pass
    temperature: float = 1.0  # sampling temperature (log-probabilities are taken at it too)
    max_new_tokens: int = 32  # completion length limit
    seed: int = 0  # prompt order and sampling
    oversample: int = 0  # dynamic sampling (DAPO): up to this many extra rounds of fresh prompts per step, keeping groups whose rewards differ until the step has `prompts` of them; 0: off
    curriculum: str = "none"  # none | learnability: prompts drawn by difficulty bin (carries, multiplicative steps) weighted by p(1-p) of the bin's recent sampled success
    format_reward_until: float = 0.0  # once this share of a step's samples is well formed, a well-formed wrong answer earns 0 instead of 0.1; 0: never
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # low-rank adapters on the policy (--lora-rank > 0; rl.lora)
    optim: RLOptimConfig = field(default_factory=RLOptimConfig)  # the update (rl.optim)
    run: RLRunConfig = field(default_factory=RLRunConfig)  # run folder, evaluation, budget (rl.run)

    def __post_init__(self):
        p = "rl."
        check(self.task in RL_TASKS, p + "task", self.task, " | ".join(RL_TASKS))
        check(self.template in TEMPLATES, p + "template", self.template, " | ".join(TEMPLATES))
        check(self.shots >= 0, p + "shots", self.shots, "an integer >= 0")
        check(self.examples in EXAMPLES, p + "examples", self.examples, " | ".join(EXAMPLES))
        check(self.template == "chat" or self.shots == 0, p + "shots", self.shots,
              "0 with template plain (the worked examples are earlier chat turns)")
        check(self.algo in RL_ALGOS, p + "algo", self.algo, " | ".join(RL_ALGOS))
        check(self.loss in RL_LOSSES, p + "loss", self.loss, " | ".join(RL_LOSSES))
        check(self.oversample >= 0, p + "oversample", self.oversample, "an integer >= 0")
        check(self.curriculum in RL_CURRICULA, p + "curriculum", self.curriculum,
              " | ".join(RL_CURRICULA))
        check(0 <= self.format_reward_until <= 1, p + "format_reward_until",
              self.format_reward_until, "a share in [0, 1] (0: never drop the format reward)")
        for name in ("difficulty", "prompts", "steps", "epochs", "minibatches", "max_new_tokens"):
            v = getattr(self, name)
            check(v >= 1, p + name, v, "an integer >= 1")
        check(self.group >= 2, p + "group", self.group, "an integer >= 2 (advantages compare "
              "completions of one prompt)")
        check(self.prompts * self.group >= self.minibatches, p + "minibatches", self.minibatches,
              "at most prompts x group")
        check(self.temperature > 0, p + "temperature", self.temperature,
              "a number > 0 (RL samples; greedy evaluation is separate)")
