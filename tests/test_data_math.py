"""MATH answers: boxed extraction, normalisation, equivalence; gold and perturbed answers on the real data."""

import os
import re

import pytest

from data import get_task
from data.hendrycks_math import extract_answer, last_boxed
from data.mathnorm import is_equiv, normalize, to_number

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("T2_DATA_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"no task data at {DATA}; set T2_DATA_DIR")


@pytest.mark.parametrize("text,boxed", [
    ("so $x = \\boxed{5}$.", "5"),
    ("first \\boxed{1}, finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),         # the last box
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # nested braces
    ("the answer is \\fbox{42}", "42"),
    ("$\\boxed 7$", "7"),
    ("\\boxed{\\frac{1}{2}", None),                                              # cut off: unbalanced
    ("no box here", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def test_extract_answer_formats():
    assert extract_answer("... \\boxed{3}.") == "3"
    assert extract_answer("We get 3.\nThe answer is: $\\frac{1}{2}$.") == "\\frac{1}{2}"   # official format
    assert extract_answer("I think it is 3") is None and extract_answer("\\boxed{ }") is None


EQUIVALENT = [
    ("\\dfrac{9}{7}", "\\frac{9}{7}"), ("\\tfrac{9}{7}", "9/7"), ("0.5", "\\frac{1}{2}"), ("\\frac12", "1/2"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("(3, \\pi/2)", "\\left(3,\\frac{\\pi}{2}\\right)"),
    ("10\\%", "10"), ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("\\text{Monday}", "Monday"),
    ("5\\text{ cm}", "5"), ("12 inches", "12"), ("4\\mbox{ units}", "4"), ("\\$5.00", "5"), ("x = 3", "3"),
    ("10{,}000", "10000"), ("10,000", "10000"), ("3.", "3"), (".5", "0.5"), ("2\\frac{1}{2}", "5/2"),
    ("-2\\frac{1}{2}", "-\\frac{5}{2}"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\sqrt3", "\\sqrt{3}"), ("2\\frac{\\pi}{3}", "\\frac{2\\pi}{3}"), ("1.5\\times10^{3}", "1500"),
    ("2^{10}", "1024"), ("\\text{(C)}", "C"), ("x^2 + 1", "x^2+1"), ("\\left[1, 2\\right)", "[1,2)"),
    ("\\!1{,}000\\!", "1000"), ("3 \\cdot 4", "12"),
]
DIFFERENT = [
    ("\\frac{1}{3}", "0.33"), ("\\pi", "3.14"), ("(1,2)", "[1,2]"), ("(1,2)", "(2,1)"), ("3", "-3"),
    ("2\\frac{1}{2}", "1"), ("99940009", "99940010"), ("1234567890", "1234567891"), ("x^2+1", "x^2+2"),
    ("\\frac{1}{0}", "1"), ("(-8)^{1/3}", "-2"), ("5", "5x"), ("1,2", "1,2,3"), ("\\text{Monday}", "Tuesday"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent(a, b):
    assert is_equiv(a, b) and is_equiv(b, a)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different(a, b):
    assert not is_equiv(a, b) and not is_equiv(b, a)


def test_numbers_are_exact_for_rationals_and_safe():
    assert to_number(normalize("\\frac{1}{3}")) * 3 == 1                # a Fraction, not a float
    assert to_number("x+1") is None and to_number("__import__('os')") is None
    assert to_number("9^{9^{9}}") is None                               # refuses huge powers
    assert not is_equiv(None, "1") and not is_equiv("1", None)


def perturb(answer):
    """A different answer: the first integer in it plus one, else '+1' appended."""
    m = re.search(r"\d+", answer)
    return answer[:m.start()] + str(int(m.group()) + 1) + answer[m.end():] if m else answer + "+1"


@needs_data
@pytest.mark.parametrize("name", ["math", "math500"])
def test_gold_scores_right_and_perturbed_wrong(name):
    task = get_task(name, data_dir=DATA)
    for ex in task.load("test"):
        assert task.score(ex, f"Reasoning...\nSo the answer is $\\boxed{{{ex.answer}}}$."), ex.answer
        assert not task.score(ex, f"\\boxed{{{perturb(ex.answer)}}}"), ex.answer


@needs_data
def test_math500_answers_agree_with_the_full_math_test_set():
    gold = {ex.problem: ex.answer for ex in get_task("math", data_dir=DATA).load("test")}
    subset = get_task("math500", data_dir=DATA).load("test")
    assert all(ex.problem in gold and is_equiv(ex.answer, gold[ex.problem]) for ex in subset)


def test_text_words_keep_the_numbers_after_them():
    """Defect 2 of issue 13: everything after a spaced \\text{ was dropped, so "5 or 6" read as 5,
    and the gold "19 \\text{ and }43" (math/644) as 19."""
    assert not is_equiv("5 \\text{ or } 6", "5")
    assert is_equiv("19, 43", "19 \\text{ and }43") and not is_equiv("19", "19 \\text{ and }43")
    assert is_equiv("12,13", "12\\text{ and }13")                                    # math/3655
    assert is_equiv("7, -2, -5", "7, -2, \\text{ and } -5") and not is_equiv("7, -2", "7, -2, \\text{ and } -5")
    assert is_equiv("575", "575\\text{ students}") and is_equiv("10", "10\\;\\text{edges}")  # units still go
    assert normalize("\\text{Evelyn}") == "Evelyn"
