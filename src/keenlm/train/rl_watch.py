"""Watching an RL run for the ways it fails quietly, and keeping its best policy.

GRPO learns from the differences between a prompt's samples. When the policy almost never
samples a correct answer, nearly every group carries only the format reward (or nothing), the
update has no signal about correctness, and the run can drift, lose diversity and leave a policy
worse than it started, while its reward curve looks fine. ``Watch`` follows three signals and
says so, once each, in the progress output and in ``metrics.jsonl`` (kind "warning"):

- **no success signal**: the sampled success rate averaged over the last ``window`` steps
  stays below ``floor`` (5%);
- **coverage falling**: the share of a step's prompts with at least one correct sample among
  its G (the policy's pass@G on training prompts, read from the samples it draws anyway) falls,
  over the last ``window`` steps, below ``drop`` (half) of its level over the first ``window``;
- **worse than the start**: the final held-out pass@1 is below the starting one.

It also keeps the best policy by a validation split (``Task.problems("val")``, disjoint from
the training and test problems): every evaluation scores val pass@1, and a better score than
any before (the start included) writes the weights to ``OUT/best`` (a run folder of its own:
``keenlm eval OUT/best``). Which step it is and its scores are in ``OUT/best/best.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Watch:
    window: int = 10
    floor: float = 0.05
    drop: float = 0.5
    success: list = field(default_factory=list)  # per step
    coverage: list = field(default_factory=list)  # per step
    warned: list = field(default_factory=list)  # the kinds warned about, in order
    best: dict = field(default_factory=dict)  # {"step", "val_pass@1", "pass@1"} of the best

    def state(self) -> dict:
        return {"success": self.success, "coverage": self.coverage, "warned": self.warned,
                "best": self.best}

    def load(self, state: dict | None) -> None:
        for k, v in (state or {}).items():
            setattr(self, k, v)

    def after_step(self, success: float, coverage: float) -> list[tuple[str, str]]:
        """Record a step's sampled success and coverage; the new warnings (kind, text)."""
        self.success.append(success)
        self.coverage.append(coverage)
        w, out = self.window, []
        if len(self.success) < w:
            return out
        recent = sum(self.success[-w:]) / w
        if recent < self.floor and "no_success" not in self.warned:
            out.append(("no_success", f"sampled success has averaged {recent:.3f} over the last "
                        f"{w} steps: almost no group holds a correct answer, so the update "
                        "learns little about correctness (and may erode what the policy "
                        "knew). Try an easier difficulty first, a larger group, or a "
                        "supervised warm-up."))
        first = sum(self.coverage[:w]) / w
        now = sum(self.coverage[-w:]) / w
        if len(self.coverage) >= 2 * w and first > 0 and now < self.drop * first \
                and "coverage" not in self.warned:
            out.append(("coverage", f"coverage (prompts with a correct sample among the group) "
                        f"fell from {first:.3f} over the first {w} steps to {now:.3f} over the "
                        "last: the policy is losing the diversity that RL and search feed on."))
        self.warned += [k for k, _ in out]
        return out

    def evaluated(self, step: int, val: float, test: float) -> bool:
        """Record an evaluation; True when its val pass@1 beats every earlier one."""
        if self.best and val <= self.best["val_pass@1"]:
            return False
        self.best = {"step": step, "val_pass@1": val, "pass@1": test}
        return True

    def at_end(self, start: dict | None, final: dict) -> list[tuple[str, str]]:
        """The final verdict: a warning when held-out pass@1 ended below where it started."""
        if start is None or final["pass@1"] >= start["pass@1"] or "worse" in self.warned:
            return []
        b = self.best
        where = (f" The best policy by validation is step {b['step']} (val pass@1 "
                 f"{b['val_pass@1']:.3f}, held-out {b['pass@1']:.3f}), kept in best/."
                 if b else "")
        self.warned.append("worse")
        return [("worse", f"RL left the policy worse than it started: held-out pass@1 "
                 f"{start['pass@1']:.3f} -> {final['pass@1']:.3f}.{where}")]
