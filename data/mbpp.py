"""MBPP (Mostly Basic Python Problems, Austin et al. 2021): the *code* expert's task.

Splits by task_id, as the dataset's authors specify (google-research/mbpp README):
"train" 601-974 (374), "validation" 511-600 (90), "test" 11-510 (500); ids 1-10 are the few-shot
prompt problems and belong to no split. Ids are "mbpp/{task_id}".

Deviation from the official code: SakanaAI/self-adaptive-llms trains and tests on MBPP+ from
evalplus (the hand-checked subset with extra tests): problems 0-299 of it, shuffled with seed 16,
give 200 train and 100 validation problems, and the rest is its test set. We use the original
MBPP file and its documented task_id ranges instead, with the original three tests per problem.

The program is read from the output as for HumanEval (`codegen.extract_code`), with the function
the tests call (`entry_point`) as the one it must define.

A solution is correct when the program, `test_setup_code` and the three `test_list` asserts run
to completion in the sandbox (the `challenge_test_list` is not used, as usual).
"""

import builtins
import re

from .codegen import CODE_SYSTEM, CodeTask
from .task import Example, assistant, system, user

RANGES = {"train": (601, 974), "validation": (511, 600), "test": (11, 510)}

TESTS_SYSTEM = ("You are an expert Python programmer. Write a Python function for the task. "
                "Reply with the code only, in a ```python code block.")


def entry_point(tests):
    """The function the tests call: the first name called in them that is not a builtin
    ("assert int(lobb_num(5, 3)) == 35" -> "lobb_num"), else the first name called."""
    called = [n for n in re.findall(r"([A-Za-z_]\w*)\s*\(", "\n".join(tests)) if n != "assert"]
    return next((n for n in called if not hasattr(builtins, n) and n not in ("math", "isclose")),
                called[0] if called else None)          # mbpp/126 names its function "sum"


def problem_text(rec):
    return f"{rec['text']}\nYour code should pass these tests:\n\n" + "\n".join(rec["test_list"])


def official_prompt(rec):
    # The official instruction (evalplus MBPP+ style): the task, one assertion, and the answer
    # prefilled with an opening ```python fence.
    text = rec["text"].strip()
    text += "" if text.endswith(".") else "."
    assertion = rec["test_list"][0]
    instruction = f"{text} Your code should satisfy the following assertion:\n```python\n{assertion}\n```"
    return [system(CODE_SYSTEM), user(instruction), assistant("```python")]


def tests_prompt(rec):
    # The prompt of the MBPP paper (Austin et al.), with all three tests, as a chat turn.
    return [system(TESTS_SYSTEM), user(problem_text(rec))]


class MbppTask(CodeTask):
    name = "mbpp"
    prompts = {"official": official_prompt, "tests": tests_prompt}
    default_prompt = "tests"   # validation: 11.1% against 6.7% for official (RESULTS.md)

    def records(self, split):
        lo, hi = RANGES[split]
        rows = [r for r in self.read("mbpp/mbpp.jsonl") if lo <= r["task_id"] <= hi]
        return sorted(rows, key=lambda r: r["task_id"])

    def example(self, rec):
        return Example(id=f"mbpp/{rec['task_id']}", problem=problem_text(rec), messages=self.messages(rec),
                       answer=rec["code"], meta=dict(tests=rec["test_list"], setup=rec["test_setup_code"],
                                                     entry_point=entry_point(rec["test_list"])))

    def reference_text(self, example):
        return f"```python\n{example.answer}\n```"  # the reference program in the fence the prompts ask for

    def program(self, example, code):
        # The setup code comes after the solution: in the two problems that have one (367, 927)
        # it builds test inputs from a class the solution defines.
        return "\n".join([code, example.meta["setup"], "", *example.meta["tests"], ""])
