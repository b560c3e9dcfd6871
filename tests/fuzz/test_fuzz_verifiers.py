"""The task verifiers fuzzed with what a model (or an attacker writing completions) can emit:
arbitrary text, answer tags around junk, deep nesting, huge numbers and exponents, unicode
digits, one-megabyte answers. Property: every reward is a float in [0, 1] (exactly 1 only for
a right answer), computed within the deadline; no exception escapes and nothing is evaluated
as code (the Countdown verifier walks a syntax tree of + - * / over the numbers on offer)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keenlm.data.tasks import extract_answer, get_task
from tests.fuzz.mutate import count

TASKS = [get_task("addition", 2), get_task("multiplication", 2, scratchpad=True),
         get_task("countdown", 3), get_task("countdown", 3, scratchpad=True)]
PROBLEMS = [(t, t.problems("test", 3)) for t in TASKS]

DIGITS = "0123456789٠١٢٣٤٥٦٧٨٩０１２３４５６７８９"  # ASCII, Arabic-Indic, full-width
inner = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=DIGITS + "+-*/() .=e^", max_size=200),
    st.integers(1, 5000).map(lambda n: "(" * n + "1" + ")" * n),           # deep nesting
    st.integers(1, 20000).map(lambda n: "9" * n),                            # huge numbers
    st.integers(1, 400).map(lambda n: "2" + "**9" * n),                      # powers
    st.integers(1, 200).map(lambda n: "1e" + "9" * n),                       # exponents
    st.just("x" * (1 << 20)),                                                # a 1 MB answer
    st.just("__import__('os').system('true')"), st.just("(lambda: 1)()"),
)
completion = st.one_of(st.text(max_size=300), inner.map(lambda s: f"<answer>{s}</answer>"),
                       st.tuples(st.text(max_size=50), inner).map(
                           lambda p: f"{p[0]}\n<answer>{p[1]}</answer>"))


@pytest.mark.parametrize("k", range(len(PROBLEMS)), ids=[t.name for t in TASKS])
def test_verifiers_take_any_completion(k):
    task, problems = PROBLEMS[k]

    @given(st.sampled_from(problems), completion)
    def prop(problem, text):
        count()
        (r,) = task.reward([problem.prompt], [text])
        assert isinstance(r, float) and 0.0 <= r <= 1.0
        if r == 1.0:  # a full reward only for an answer the task accepts
            assert extract_answer(text) is not None
    prop()


def test_right_answers_still_score_one():
    for task, problems in PROBLEMS:
        for p in problems:
            assert task.reward([p.prompt], [p.demonstration]) == [1.0]
