"""Shared by the code tasks (MBPP, HumanEval): reading a program out of a model's output, and
scoring programs by running their tests in the sandbox.

A code task's extracted answer is the program text; it is correct when the task's tests, appended
to it, run to completion in the sandbox (see sandbox.py).
"""

import re

from .sandbox import Limits, default_mode, run_many
from .task import Task, prefill

CODE_SYSTEM = ("You are an exceptionally intelligent coding assistant that  consistently delivers "   # sic
               "accurate and reliable responses to user instructions.")

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text, must_define=None):
    """The program in a model output: the first ```python fenced block that defines the function
    `must_define`, else the first that defines any function, else the first block; an unterminated
    fence runs to the end of the text; without fences, the whole text. None when nothing is left."""
    blocks = _FENCE.findall(text)
    if not blocks:
        code = text if "```" not in text else ""
    else:
        defines = lambda name, block: re.search(rf"^\s*def {name}\s*\(", block, re.MULTILINE)  # noqa: E731
        code = (next((b for b in blocks if must_define and defines(re.escape(must_define), b)), None)
                or next((b for b in blocks if defines(r"\w+", b)), blocks[0]))
    return code if code.strip() else None


class CodeTask(Task):
    """A task whose answers are programs. Subclasses implement `program(example, code)`:
    the complete test program for a candidate solution."""

    limits = Limits()

    def extract(self, output, example=None):
        # The official prompts prefill the answer with "```python" (and, for HumanEval, the
        # function header): the program starts in the prefill.
        text = (prefill(example) if example is not None else "") + output
        return extract_code(text, example.meta.get("entry_point") if example is not None else None)

    def is_correct(self, answer, example):
        return self.score_many([example], [None], answers=[answer])[0]

    def score(self, example, output):
        return self.score_many([example], [output])[0]

    def score_many(self, examples, outputs, answers=None):
        """Runs the tests of all the candidate programs in parallel; True where they pass."""
        if answers is None:
            answers = [self.extract(out, ex) for ex, out in zip(examples, outputs, strict=True)]
        todo = [i for i, code in enumerate(answers) if code is not None]
        results = run_many([self.program(examples[i], answers[i]) for i in todo], self.limits)
        passed = [False] * len(examples)
        for i, result in zip(todo, results):
            passed[i] = result.passed
        return passed

    def scoring_settings(self):
        return {"sandbox": default_mode()}

    def program(self, example, code):
        raise NotImplementedError
