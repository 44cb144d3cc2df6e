"""HumanEval (Chen et al. 2021): 164 Python functions to complete, an adaptation target.

Evaluation only: "test" holds all 164 problems, in file order; ids are the dataset's task_ids
("HumanEval/0"). The official code evaluates HumanEval as the transfer task of its MBPP expert.

Scoring, as in openai/human-eval: the program is the prompt (imports, helper functions, the
signature and docstring) followed by the completion, then the problem's `test` code and
`check(entry_point)`, run in the sandbox. A completion may also restate the whole function (a
model answering in a ```python block usually does): then the program is the prompt up to the
signature (keeping imports and helper functions) followed by the model's code.
"""

import re

from .codegen import CODE_SYSTEM, CodeTask
from .task import Example, assistant, system, user

COMPLETE_SYSTEM = ("You are an expert Python programmer. Complete the function. "
                   "Reply with the complete function in a ```python code block.")


def official_prompt(rec):
    # The official (evalplus-style) instruction; the answer is prefilled with the prompt's code,
    # so the model continues with the function body.
    code = rec["prompt"].strip()
    return [system(CODE_SYSTEM),
            user(f"Write a solution to the following problem:\n```python\n{code}\n```"),
            assistant(f"```python\n{code}")]


def complete_prompt(rec):
    return [system(COMPLETE_SYSTEM), user(f"```python\n{rec['prompt'].strip()}\n```")]


def signature_start(prompt, entry_point):
    """Index in `prompt` of the line `def entry_point(`: what precedes it is kept."""
    m = re.search(rf"^def {re.escape(entry_point)}\s*\(", prompt, re.MULTILINE)
    if m is None:
        raise ValueError(f"HumanEval prompt does not define {entry_point!r}")
    return m.start()


class HumanEvalTask(CodeTask):
    name = "humaneval"
    splits = ("test",)
    prompts = {"official": official_prompt, "complete": complete_prompt}
    default_prompt = "official"   # provisional; the default is chosen by measured accuracy

    def records(self, split):
        return self.read("humaneval/HumanEval.jsonl.gz")

    def example(self, rec):
        return Example(id=rec["task_id"], problem=rec["prompt"], messages=self.messages(rec),
                       answer=rec["canonical_solution"],
                       meta=dict(prompt=rec["prompt"], test=rec["test"], entry_point=rec["entry_point"]))

    def reference_text(self, example):
        # The prompt's code as the official prefill shows it (stripped), then the reference body. The
        # `complete` prompt has no prefill, so this is also its whole answer.
        return f"```python\n{example.meta['prompt'].strip()}\n{example.answer}```"

    def program(self, example, code):
        prompt, entry = example.meta["prompt"], example.meta["entry_point"]
        if re.search(rf"^def {re.escape(entry)}\s*\(", code, re.MULTILINE):
            solution = prompt[:signature_start(prompt, entry)] + code          # the whole function
        else:
            solution = prompt + code                                           # the body only
        return f"{solution}\n\n{example.meta['test']}\n\ncheck({entry})\n"
