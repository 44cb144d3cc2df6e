"""Shared by the code tasks (MBPP, HumanEval): reading a program out of a model's output, and
scoring programs by running their tests in the sandbox.

A code task's extracted answer is the program text; it is correct when the task's tests, appended
to it, run to completion in the sandbox (see sandbox.py).
"""

import ast
import re

from .sandbox import Limits, default_mode, run_many
from .task import Task, prefill

CODE_SYSTEM = ("You are an exceptionally intelligent coding assistant that  consistently delivers "   # sic
               "accurate and reliable responses to user instructions.")

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def has_body(code, name):
    """Whether `code` parses and defines function `name` with a body: more than a docstring, `pass`
    or `...` (a HumanEval prefill closed at once defines the function with its docstring only)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            body = [s for s in node.body if not (isinstance(s, ast.Pass) or (isinstance(s, ast.Expr)
                    and isinstance(s.value, ast.Constant) and isinstance(s.value.value, (str, type(...)))))]
            if body:
                return True
    return False


def extract_code(text, must_define=None):
    """The program in a model output; None when nothing is left.

    With `must_define` (the function the tests call): the *last* ```python fenced block that defines
    it with a body, else the last that defines it at all. A model that closes the prefilled fence and
    restates the function in a new one has corrected itself; a later block is its final answer.
    Otherwise: the first block that defines any function, else the first block. An unterminated
    fence runs to the end of the text; without fences, the whole text is the program.
    """
    blocks = _FENCE.findall(text)
    if not blocks:
        code = text if "```" not in text else ""
    else:
        defines = lambda name, block: re.search(rf"^\s*def {name}\s*\(", block, re.MULTILINE)  # noqa: E731
        mine = [b for b in blocks if must_define and defines(re.escape(must_define), b)]
        code = (next((b for b in reversed(mine) if has_body(b, must_define)), None) or (mine[-1] if mine else None)
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
