"""Verifiable tasks: deterministic splits, exact rewards, a verifier that never evaluates text."""

import dataclasses
import random
import re

import pytest

from keenlm.data.tasks import (InvalidExpression, countdown_reward, evaluate_expression, format_reward,
                               get_task)


@pytest.mark.parametrize("kind,difficulty,scratchpad", [("addition", 3, False), ("addition", 5, True),
                                                         ("multiplication", 2, True),
                                                         ("countdown", 3, False), ("countdown", 4, False),
                                                         ("countdown", 4, True)])
def test_demonstrations_earn_full_reward_and_splits_are_disjoint(kind, difficulty, scratchpad):
    task = get_task(kind, difficulty, scratchpad)
    train = task.problems("train", 50, test_size=30, val_size=30)
    test, val = task.problems("test", 30), task.problems("val", 30, test_size=30)
    assert task.problems("test", 30) == test  # deterministic
    prompts = [{p.prompt for p in split} for split in (train, val, test)]
    assert not prompts[0] & prompts[2] and not prompts[0] & prompts[1] and not prompts[1] & prompts[2]
    assert task.reward([p.prompt for p in test], [p.demonstration for p in test]) == [1.0] * 30
    wrong = ["<answer>0</answer>" if kind != "countdown" else "<answer>1 + 1 + 1 + 1 + 1</answer>"] * 30
    assert set(task.reward([p.prompt for p in test], wrong)) <= {0.1, 1.0}
    assert task.reward([test[0].prompt], ["no tag here"]) == [0.0]


def test_scratchpad_demonstration_shows_the_work():
    p = get_task("addition", 3, scratchpad=True).problems("test", 1)[0]
    assert "carry" in p.demonstration and p.demonstration.endswith(f"<answer>{p.answer}</answer>")


def test_countdown_scratchpad_steps_are_whole_true_and_end_at_the_target():
    plain = get_task("countdown", 3).problems("test", 40)
    worked = get_task("countdown", 3, scratchpad=True).problems("test", 40)
    assert all("\n" not in p.demonstration for p in plain)
    for p in worked:
        *steps, answer = p.demonstration.split("\n")
        assert len(steps) == 2 and answer == f"<answer>{p.answer}</answer>"
        for line in steps:
            m = re.fullmatch(r"(-?\d+)([-+*/])(-?\d+)=(-?\d+)", line)
            a, op, b, v = int(m[1]), m[2], int(m[3]), int(m[4])  # whole numbers only
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == v
        assert int(steps[-1].split("=")[1]) == p.meta["target"]


def test_countdown_verifier_is_exact_and_safe():
    nums = [3, 5, 7, 2]
    assert evaluate_expression("(3 + 5) * 7 / 2", nums) == 28
    for bad, why in [("3 + 3", "not on offer"), ("9 * 1", "not on offer"), ("7 / (5 - 5)", "not on offer"),
                     ("7 / (3 - 3)", "not on offer"), ("__import__('os')", "not allowed"),
                     ("3 ** 5", "not allowed"), ("-3 + 5", "not allowed"), ("3 +", "not an expression"),
                     ("1" * 300, "too long"), ("3.0 + 5", "not allowed")]:
        with pytest.raises(InvalidExpression, match=why):
            evaluate_expression(bad, nums)
    with pytest.raises(InvalidExpression, match="division by zero"):
        evaluate_expression("7 / (5 - 5)", [7, 5, 5])
    with pytest.raises(InvalidExpression, match="too large"):
        evaluate_expression("999 * 999 * 999 * 999", [999, 999, 999, 999])
    prompt = "Using the numbers [3, 5, 7, 2], make 28. Use + - * / and parentheses."
    assert countdown_reward([prompt] * 4, ["<answer>(3+5)*7/2</answer>", "<answer>3*5</answer>",
                                           "<answer>open('x')</answer>", "28"]) == [1.0, 0.1, 0.1, 0.0]


def test_format_reward_and_bad_arguments():
    assert format_reward(["p", "p"], ["<answer>1</answer>", "1"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="task"):
        get_task("sorting")
    with pytest.raises(ValueError, match="difficulty"):
        get_task("addition", 0)


def test_supervised_warm_up_gives_nonzero_success(tmp_path):
    import keenlm
    from keenlm.config import from_dict
    from keenlm.data.tasks import write_demonstrations
    from keenlm.infer.task_eval import evaluate_policy
    from keenlm.train import Trainer

    task = get_task("addition", 1)
    path = write_demonstrations(task, tmp_path / "add1.jsonl", 2000)
    cfg = {"model": {"n_layer": 2, "d_model": 64, "n_head": 2, "d_ff": 192, "max_seq_len": 128},
           "data": {"corpus": str(path), "tokenizer": "byte", "cache_dir": str(tmp_path / "cache"),
                    "val_fraction": 0.05},
           "train": {"steps": 300, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "eval_every": 0,
                     "out_dir": str(tmp_path / "run"), "progress": False}}
    tr = Trainer(from_dict(cfg))
    before = evaluate_policy(tr.model.eval(), tr.tokenizer, task, n=64)
    km = keenlm.load(tr.fit().run_dir)
    after = evaluate_policy(km.net, km.tokenizer, task, n=64)
    assert before["success"] == 0.0 and after["format"] > 0.5 and after["success"] > 0.0


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("kind,difficulty", [("addition", 2), ("countdown", 2)])
def test_chat_rendering_scores_the_asked_problem_not_the_examples(kind, difficulty):
    from keenlm.config import rl as rl_config_module
    from keenlm.data import ByteTokenizer
    from keenlm.data.tasks import TEMPLATES

    assert rl_config_module.TEMPLATES == TEMPLATES
    tok = ByteTokenizer()
    tok.chat_template = CHATML
    plain = get_task(kind, difficulty)
    chat = get_task(kind, difficulty, template="chat", tokenizer=tok, shots=2)
    test, chat_test = plain.problems("test", 20), chat.problems("test", 20)
    assert [p.answer for p in chat_test] == [p.answer for p in test]  # the same problems
    p = chat_test[0]
    assert p.prompt.count("<|im_start|>user") == 3 and p.prompt.endswith("<|im_start|>assistant\n")
    assert test[0].prompt.strip() in p.prompt.split("<|im_start|>user")[-1]
    # the two worked examples come first; a demonstration's answer scores only its own problem
    assert chat.reward([q.prompt for q in chat_test], [q.demonstration for q in chat_test]) == [1.0] * 20
    examples = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", p.prompt, re.S)
    assert len(examples) == 2 and chat.reward([p.prompt], [examples[0]]) != [1.0]
    train = chat.problems("train", 50)
    shown = set(re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", p.prompt, re.S)[:2])
    assert not {q.prompt for q in train} & {q.prompt for q in chat_test}
    assert not shown & {q.prompt.strip() for q in test}  # examples never come from the test split
    with pytest.raises(ValueError, match="tokenizer"):
        get_task(kind, difficulty, template="chat")
    with pytest.raises(ValueError, match="shots"):
        get_task(kind, difficulty, shots=2)
    with pytest.raises(ValueError, match="no chat template"):
        get_task(kind, difficulty, template="chat", tokenizer=ByteTokenizer())


def test_equation_examples_restate_the_problem_before_the_answer():
    from keenlm.data import ByteTokenizer
    from keenlm.data.tasks import equation_demonstration

    tok = ByteTokenizer()
    tok.chat_template = CHATML
    for kind in ("addition", "countdown"):
        task = get_task(kind, 2, template="chat", tokenizer=tok, shots=2, examples="equation")
        assert task.name.endswith("-chat2e")
        p = task.problems("test", 1)[0]
        shown = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", p.prompt, re.S)
        assert len(shown) == 2 and all(" = " in s.split("\n")[0] for s in shown)
        plain = get_task(kind, 2).problems("test", 1)[0]
        demo = equation_demonstration(plain)
        assert task.reward([p.prompt], [demo]) == [1.0]  # the equation line does not confuse it
    q = get_task("addition", 2).problems("test", 1)[0]
    assert equation_demonstration(q) == (f"{q.meta['a']} + {q.meta['b']} = {q.answer}\n"
                                         f"<answer>{q.answer}</answer>")
    with pytest.raises(ValueError, match="examples"):
        get_task("addition", 2, template="chat", tokenizer=tok, shots=2, examples="essay")


@pytest.mark.parametrize("seed", range(3))
def test_difficulty_bins_count_carries_and_multiplicative_steps(seed):
    from keenlm.data.tasks import (_addition_steps, arithmetic_problem, bin_measure,
                                   countdown_problem, difficulty_bin)
    rng = random.Random(seed)
    for digits in (1, 2, 3, 5):
        p = arithmetic_problem("+", digits, False, rng)
        # the worked steps write each carry: the bin counts the same carries
        steps = _addition_steps(p.meta["a"], p.meta["b"])
        assert difficulty_bin(p) == steps.count("carry 1") and bin_measure(p) == "carries"
        m = arithmetic_problem("*", digits, False, rng)
        assert difficulty_bin(m) == len([d for d in str(m.meta["b"]) if int(d) > 1])
    for n in (2, 3, 4):
        c = countdown_problem(n, rng)
        assert difficulty_bin(c) == c.answer.count("*") + c.answer.count("/") <= n - 1
    with pytest.raises(ValueError, match="no difficulty bin"):
        difficulty_bin(dataclasses.replace(c, meta={}))
