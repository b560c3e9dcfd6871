"""Verifiable tasks: generators with difficulty levels, deterministic splits, exact rewards.

Each task makes problems (a prompt, a gold answer, a worked demonstration for supervised
warm-up) and scores completions with a plain callable ``reward(prompts, completions) ->
list[float]``. Rewards read everything they need from the prompt text itself, so any list of
prompts and completions (from a sampler, a file, a test) can be scored without hidden state.

Answers go inside ``<answer>...</answer>``. The reward is TinyZero's (Pan et al. 2025): 0 when
no answer tag is found, 0.1 when the tag is there but the answer is wrong, 1.0 when it is
right. ``format_reward`` alone gives 1 for a well-formed answer tag.

- ``addition`` / ``multiplication``: two operands of ``digits`` digits each (the difficulty);
  with ``scratchpad`` the demonstration works column by column (addition) or by partial
  products (multiplication) before the answer.
- ``countdown``: reach a target from ``n`` given numbers with + - * / and parentheses, each
  number used at most once. The generator builds the target from a random expression over
  the numbers, so a solution exists; with ``scratchpad`` the demonstration writes each
  intermediate result on its own line ("3+7=10") before the answer. The verifier parses the
  expression with ``ast`` and walks the tree, accepting only integer literals, the four
  operators and parentheses; it computes with exact fractions and rejects division by zero,
  numbers not on offer (or used twice), values beyond 10^9 and expressions over 200
  characters. Nothing is ever ``eval``-ed.

For a pretrained chat model, ``chat_task`` renders the same prompts through the model's chat
template, after a few worked examples as earlier turns (``template: chat``, ``shots``).

Splits are deterministic: problem i of a split comes from a generator seeded by (task,
difficulty, split, i), and the train split skips every prompt the test split holds.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from keenlm.runs import atomic_write_text

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
LIMIT = 10**9
MAX_EXPR = 200


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    demonstration: str  # a worked completion, for supervised warm-up
    meta: dict = field(default_factory=dict)


def extract_answer(completion: str) -> str | None:
    """The text inside the first <answer>...</answer>, stripped; None without one."""
    m = ANSWER.search(completion)
    return m.group(1).strip() if m else None


def format_reward(prompts, completions) -> list[float]:
    return [1.0 if extract_answer(c) is not None else 0.0 for c in completions]


def _tiered(ok: bool | None) -> float:
    return 0.0 if ok is None else (1.0 if ok else 0.1)


# ------------------------------------------------------------------------------ arithmetic

ARITH = re.compile(r"What is (\d+) ([+*]) (\d+)\?")


def _number(n_digits: int, rng: random.Random) -> int:
    return rng.randint(10 ** (n_digits - 1) if n_digits > 1 else 0, 10**n_digits - 1)


def _addition_steps(a: int, b: int) -> str:
    da, db = str(a)[::-1], str(b)[::-1]
    carry, lines = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"write {carry}")
    return "\n".join(lines)


def _multiplication_steps(a: int, b: int) -> str:
    parts = [(int(d) * 10**i, a * int(d) * 10**i) for i, d in enumerate(str(b)[::-1])]
    lines = [f"{a}*{p}={v}" for p, v in parts]
    lines.append(" + ".join(str(v) for _, v in parts) + f" = {a * b}")
    return "\n".join(lines)


def arithmetic_problem(op: str, digits: int, scratchpad: bool, rng: random.Random) -> Problem:
    a, b = _number(digits, rng), _number(digits, rng)
    result = a + b if op == "+" else a * b
    prompt = f"What is {a} {op} {b}? Answer inside <answer></answer>.\n"
    steps = (_addition_steps(a, b) if op == "+" else _multiplication_steps(a, b)) if scratchpad else ""
    demo = (steps + "\n" if steps else "") + f"<answer>{result}</answer>"
    return Problem(prompt, str(result), demo, {"a": a, "b": b, "op": op})


def last_match(pattern: re.Pattern, prompt: str) -> re.Match | None:
    """The problem a prompt asks last: a prompt rendered for a chat model may show worked
    examples (earlier turns) before the question it asks."""
    m = None
    for m in pattern.finditer(prompt):
        pass
    return m


def _rewards(prompts, completions, pattern: re.Pattern, name: str, is_right) -> list[float]:
    """Tiered rewards: each prompt parsed by ``pattern``, each answer judged by
    ``is_right(match, answer)``."""
    out = []
    for p, c in zip(prompts, completions):
        m = last_match(pattern, p)
        if m is None:
            raise ValueError(f"not a {name} prompt: {p[:60]!r}")
        ans = extract_answer(c)
        out.append(_tiered(None if ans is None else is_right(m, ans)))
    return out


def _arithmetic_right(m: re.Match, ans: str) -> bool:
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return ans.replace(",", "").strip() == str(a + b if op == "+" else a * b)


def arithmetic_reward(prompts, completions) -> list[float]:
    return _rewards(prompts, completions, ARITH, "arithmetic", _arithmetic_right)


# ------------------------------------------------------------------------------ countdown

COUNTDOWN = re.compile(r"Using the numbers \[([\d, ]+)\], make (-?\d+)\.")
OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y,
       ast.Mult: lambda x, y: x * y, ast.Div: lambda x, y: x / y}


STEP_OPS = {"+": OPS[ast.Add], "-": OPS[ast.Sub], "*": OPS[ast.Mult], "/": OPS[ast.Div]}


class InvalidExpression(ValueError):
    pass


def evaluate_expression(text: str, numbers: list[int]) -> Fraction:
    """The exact value of an arithmetic expression over ``numbers`` (each at most once);
    InvalidExpression for anything else. Walks the syntax tree; never evaluates text."""
    if len(text) > MAX_EXPR:
        raise InvalidExpression("expression too long")
    try:
        with warnings.catch_warnings():  # "2x" warns before it fails: the error says it all
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise InvalidExpression(f"not an expression: {e.msg}") from None
    pool = list(numbers)

    def walk(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if node.value not in pool:
                raise InvalidExpression(f"{node.value} is not on offer (or used twice)")
            pool.remove(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise InvalidExpression("division by zero")
            value = OPS[type(node.op)](left, right)
            if abs(value) > LIMIT or value.denominator > LIMIT:
                raise InvalidExpression("value too large")
            return value
        raise InvalidExpression(f"{type(node).__name__} is not allowed")

    return walk(tree.body)


def countdown_problem(n: int, rng: random.Random, max_number: int = 25,
                      scratchpad: bool = False) -> Problem:
    """A Countdown problem whose target is the value of a random expression over its numbers.
    With ``scratchpad`` the demonstration writes each intermediate result on its own line
    ("3+7=10", "10*5=50") before the answer, and only problems whose intermediate results are
    whole numbers are drawn."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(n)]
        order = rng.sample(numbers, len(numbers))
        expr, value, steps, whole = str(order[0]), Fraction(order[0]), [], True
        for x in order[1:]:
            op = rng.choice("+-*/")
            left_first = rng.random() < 0.5
            expr = f"({expr}) {op} {x}" if left_first else f"{x} {op} ({expr})"
            if not whole:  # keep drawing: the same random stream with or without scratchpad
                continue
            a, b = (value, Fraction(x)) if left_first else (Fraction(x), value)
            if op == "/" and b == 0:
                whole = False
                continue
            value = STEP_OPS[op](a, b)
            whole = value.denominator == 1
            steps.append(f"{a}{op}{b}={value}")
        if scratchpad and not whole:
            continue
        try:
            value = evaluate_expression(expr, numbers)
        except InvalidExpression:
            continue
        if value.denominator == 1 and 0 < value <= 1000:
            target = int(value)
            break
    prompt = (f"Using the numbers [{', '.join(map(str, numbers))}], make {target}. Use + - * / "
              f"and parentheses, each number at most once. Answer inside <answer></answer>.\n")
    demo = ("\n".join(steps) + "\n" if scratchpad else "") + f"<answer>{expr}</answer>"
    return Problem(prompt, expr, demo, {"numbers": numbers, "target": target})


def _countdown_right(m: re.Match, ans: str) -> bool:
    try:
        return evaluate_expression(ans, [int(x) for x in m.group(1).split(",")]) == int(m.group(2))
    except InvalidExpression:
        return False


def _number_key(prompt: str, ans: str):
    return ans.replace(",", "").strip()


def _countdown_key(prompt: str, ans: str):
    """Expressions vote by their value: two correct expressions agree."""
    m = last_match(COUNTDOWN, prompt)
    try:
        return evaluate_expression(ans, [int(x) for x in m.group(1).split(",")])
    except InvalidExpression:
        return None


def countdown_reward(prompts, completions) -> list[float]:
    return _rewards(prompts, completions, COUNTDOWN, "countdown", _countdown_right)


# ------------------------------------------------------------------------------ registry


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], Problem]
    reward: Callable[[list[str], list[str]], list[float]]
    answer_key: Callable[[str, str], object]  # (prompt, answer) -> what majority votes compare
    stream: str = ""  # names the random streams problems are drawn from ("": the name)

    def problems(self, split: str, n: int, test_size: int = 200,
                 val_size: int = 0) -> list[Problem]:
        """``n`` problems of a split: test (reported), val (what a run chooses its best
        checkpoint on; never a test prompt) and train (never a test prompt, nor one of the first
        ``val_size`` val prompts: a run that validates on those draws its training problems
        with that ``val_size``)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: {' | '.join(SPLITS)}")
        held = set()
        if split in ("train", "val"):
            held = {p.prompt for p in self._draw("test", test_size)}
        if split == "train" and val_size:
            held |= {p.prompt for p in self._draw("val", val_size, frozenset(held))}
        return self._draw(split, n, held)

    def _draw(self, split: str, n: int, skip=frozenset()) -> list[Problem]:
        out, i = [], 0
        while len(out) < n:
            p = self.make(random.Random(f"{self.stream or self.name}|{split}|{i}"))
            i += 1
            if p.prompt not in skip:
                out.append(p)
            if i > 100 * n + 1000:
                raise ValueError(f"task {self.name}: cannot draw {n} distinct {split} problems")
        return out


def get_task(kind: str, difficulty: int = 2, scratchpad: bool = False, *,
             template: str = "plain", tokenizer=None, shots: int = 0,
             examples: str = "demonstration") -> Task:
    """addition | multiplication (difficulty = digits per operand) | countdown (= numbers);
    ``template`` "chat" renders its prompts for a chat model (``chat_task``)."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: {' | '.join(TEMPLATES)}")
    if template == "plain":
        if shots:
            raise ValueError("shots > 0 needs template chat (the examples are earlier turns)")
        return _plain_task(kind, difficulty, scratchpad)
    if tokenizer is None:
        raise ValueError("template chat needs the model's tokenizer")
    return chat_task(_plain_task(kind, difficulty, scratchpad), tokenizer, shots, examples)


def _plain_task(kind: str, difficulty: int, scratchpad: bool) -> Task:
    if difficulty < 1:
        raise ValueError(f"difficulty {difficulty}: an integer >= 1")
    if kind in ("addition", "multiplication"):
        op = "+" if kind == "addition" else "*"
        return Task(f"{kind}{difficulty}{'s' if scratchpad else ''}",
                    lambda rng: arithmetic_problem(op, difficulty, scratchpad, rng), arithmetic_reward,
                    _number_key)
    if kind == "countdown":
        if difficulty < 2:
            raise ValueError("countdown needs at least 2 numbers")
        return Task(f"countdown{difficulty}{'s' if scratchpad else ''}",
                    lambda rng: countdown_problem(difficulty, rng, scratchpad=scratchpad),
                    countdown_reward, _countdown_key)
    raise ValueError(f"task {kind!r}: addition | multiplication | countdown")


TEMPLATES = ("plain", "chat")
EXAMPLES = ("demonstration", "equation")


def equation_demonstration(p: Problem) -> str:
    """The problem restated as an equation with its result, then the tagged answer -- the one
    worked line a chat model writes unprompted ("24 + 86 = 110"): arithmetic "a op b = c",
    Countdown "expression = target"."""
    if "op" in p.meta:
        return f"{p.meta['a']} {p.meta['op']} {p.meta['b']} = {p.answer}\n<answer>{p.answer}</answer>"
    return f"{p.answer} = {p.meta['target']}\n<answer>{p.answer}</answer>"


def chat_task(task: Task, tokenizer, shots: int = 0, examples: str = "demonstration") -> Task:
    """The task as a chat model is asked it: each prompt rendered through the tokenizer's chat
    template as the user's turn, after ``shots`` worked examples (user: a problem, assistant:
    its demonstration, or with ``examples`` "equation" the problem restated as an equation
    before the answer) as earlier turns -- the few-shot prompting that teaches a pretrained
    model the answer format. The examples are the same for every prompt, drawn from a stream
    of their own that skips the test split. Rewards and answer keys read the last problem in
    a prompt, so they score rendered prompts unchanged; demonstrations stay completions."""
    if shots < 0:
        raise ValueError(f"shots {shots}: an integer >= 0")
    if examples not in EXAMPLES:
        raise ValueError(f"examples {examples!r}: {' | '.join(EXAMPLES)}")
    show = equation_demonstration if examples == "equation" else (lambda p: p.demonstration)
    held = {p.prompt for p in task._draw("test", 200)}
    worked = task._draw("shots", shots, held) if shots else []
    turns = []
    for ex in worked:
        turns += [{"role": "user", "content": ex.prompt.strip()},
                  {"role": "assistant", "content": show(ex)}]

    def render(prompt: str) -> str:
        return tokenizer.apply_chat_template(turns + [{"role": "user", "content": prompt.strip()}])

    render(worked[0].prompt if worked else "1")  # no chat template: fail here, not mid-run

    def make(rng: random.Random) -> Problem:
        p = task.make(rng)
        return dataclasses.replace(p, prompt=render(p.prompt))

    style = "e" if examples == "equation" else ""
    return Task(f"{task.name}-chat{shots}{style}", make, task.reward, task.answer_key,
                stream=task.stream or task.name)  # the plain task's problems, asked another way


# ------------------------------------------------------------------------------ difficulty


BINS = {"+": "carries", "*": "digits of the second operand above 1",
        "countdown": "* and / in the generating expression"}


def difficulty_bin(p: Problem) -> int:
    """A problem's difficulty, known before it is answered (the model plays no part): the carries
    of an addition; the digits of a multiplication's second operand above 1 (the partial
    products that need a real multiplication); the multiplicative steps of the expression a
    Countdown target was made from. 0 is the easiest; ``BINS`` names each measure."""
    m = p.meta
    if m.get("op") == "+":
        a, b, carry, n = m["a"], m["b"], 0, 0
        while a or b:
            carry = (a % 10 + b % 10 + carry) // 10
            n += carry
            a, b = a // 10, b // 10
        return n
    if m.get("op") == "*":
        return sum(d not in "01" for d in str(m["b"]))
    if "numbers" in m:
        return sum(c in "*/" for c in p.answer)
    raise ValueError(f"no difficulty bin for the problem {p.prompt[:60]!r}")


def bin_measure(p: Problem) -> str:
    """What ``difficulty_bin`` counts for this problem's task."""
    return BINS["countdown"] if "numbers" in p.meta else BINS[p.meta["op"]]


# ------------------------------------------------------------------------------ warm-up and evaluation


def write_demonstrations(task: Task, path, n: int, val_size: int = 0) -> Path:
    """A .jsonl corpus of ``n`` training problems with their worked completions (one
    document per line, field "text"): train on it with ``--data.corpus PATH`` for the
    supervised warm-up that gives RL a policy with non-zero success. ``val_size``: none of
    the first that many validation problems is among them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": p.prompt + p.demonstration})
             for p in task.problems("train", n, val_size=val_size)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Codex):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a
    correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(keys: list, weights: list[float] | None = None) -> int | None:
    """Index of the first answer whose key collects the most votes (each answer's weight, 1
    by default; None keys do not vote); None when nothing votes. Ties go to the key seen first."""
    counts: dict = {}
    for k, w in zip(keys, weights or [1.0] * len(keys)):
        if k is not None:
            counts[k] = counts.get(k, 0.0) + w
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)
