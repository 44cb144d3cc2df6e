"""GSM8K: grade-school math word problems, the *math* expert's task.

Splits (as in the official code, SakanaAI/self-adaptive-llms tasks/gsm8k.py): the training file
(7473) split by index, even indices -> "train" (3737), odd indices -> "validation" (3736);
"test" is the test file (1319). Ids are "gsm8k/{train|test}/{line index in the file}".

The gold answer is the number after "#### " in the reference solution (commas removed).
Extraction (`extract_number`), strictest statement first:
1. "#### 42"             -> the number after "####";
2. "The answer is 42."   -> the number after "answer is" / "answer:";
3. "\\boxed{42}"          -> the number inside the box;
4. otherwise the last number in the output (the official code's rule).
A statement gives one number (after its last "=", if any: "3 + 5 = 8" gives 8); a statement that
gives several ("72 or 73"), or two statements that disagree, make the output unparsable.
Numbers may carry thousands separators ("1,000"), a dollar sign, a sign, decimals and trailing
units ("$18.00 per hour" -> 18); they are compared as exact decimals ("18.00" == "18").
"""

import re
from decimal import Decimal, InvalidOperation

from .task import Task, Example, even_odd, system, user

OFFICIAL_SYSTEM = ("Below is an instruction that describes a task."
                   " Write a response that appropriately completes the request.\n\n")
COT_SYSTEM = ("Solve the math word problem step by step. End with a line of the form "
              "'#### <number>' that gives the final answer as a number.")

# A number: with well-formed thousands separators, or plain digits; optional sign and decimals.
# The lookbehind keeps the "-" of "3-5" from being read as a sign.
NUMBER = re.compile(r"(?<![\d.])(-?)\$?\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")


def canonical(number_text):
    """'1,000.50' -> '1000.5'; None when it is not a number."""
    try:
        d = Decimal(number_text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "0") else text


ANSWER_CUE = r"answer\s*(?:is|:)"


def _numbers(text):
    return [canonical(sign + digits) for sign, digits in NUMBER.findall(text)]


def _statement_number(statement):
    """The number a statement gives ("18 dollars", "3 + 5 = 8" -> "8"), or None when it gives none or
    several different ones ("72 or 73"): an answer is one number."""
    line = statement.strip().split("\n", 1)[0]
    found = set(_numbers(line.rsplit("=", 1)[-1]))
    return found.pop() if len(found) == 1 else None


def extract_number(text):
    """The final numeric answer in a model output as a canonical string, or None.

    Strict: every statement of the strongest kind present must give the same single number, so an
    output that answers "#### 72" and then "#### 73", or "the answer is 72 or 73", is unparsable.
    """
    if "####" in text:
        statements = text.split("####")[1:]
    elif re.search(ANSWER_CUE, text, re.IGNORECASE):
        statements = re.split(ANSWER_CUE, text, flags=re.IGNORECASE)[1:]
    else:
        statements = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if statements:
        found = {_statement_number(s) for s in statements}
        return found.pop() if len(found) == 1 else None
    found = _numbers(text)
    return found[-1] if found else None    # no statement: the last number, as the official code


def gold_answer(solution):
    """The number after '#### ' in a GSM8K reference solution."""
    if "####" not in solution:
        raise ValueError(f"GSM8K reference solution has no '####' line: {solution[-80:]!r}")
    answer = canonical(solution.rsplit("####", 1)[1])
    if answer is None:
        raise ValueError(f"GSM8K reference answer is not a number: {solution.rsplit('####', 1)[1]!r}")
    return answer


def official_prompt(rec):
    return [system(OFFICIAL_SYSTEM), user(rec["question"])]


def cot_prompt(rec):
    return [system(COT_SYSTEM), user(rec["question"])]


class Gsm8kTask(Task):
    name = "gsm8k"
    prompts = {"official": official_prompt, "cot": cot_prompt}
    default_prompt = "official"   # validation: 1% vs 0% for cot (within noise), and it always parses (RESULTS.md)

    def records(self, split):
        file = "train" if split in ("train", "validation") else "test"
        rows = [dict(r, id=f"gsm8k/{file}/{i}") for i, r in enumerate(self.read(f"gsm8k/{file}.jsonl"))]
        return even_odd(rows, split) if file == "train" else rows

    def example(self, rec):
        return Example(id=rec["id"], problem=rec["question"], messages=self.messages(rec),
                       answer=gold_answer(rec["answer"]), meta=dict(solution=rec["answer"]))

    def reference_text(self, example):
        return example.meta["solution"]  # the worked solution, ending in "#### 72" (the cot prompt asks for it)

    def extract(self, output, example=None):
        return extract_number(output)

    def is_correct(self, answer, example):
        return Decimal(answer) == Decimal(example.answer)

    def difficulty(self, example):
        """The number of calculator notes ("<<48/2=24>>") in the reference solution: one per arithmetic
        step. A curriculum for a model that solves almost nothing (reinforce.py --max-difficulty): of
        the 3737 training problems, 54 have no note, 197 one, 1090 two, 1089 three, the rest four to nine."""
        return example.meta["solution"].count("<<")
