"""MATH (Hendrycks et al. 2021) and MATH-500: competition mathematics, an adaptation target.

Evaluation only: "test" is the MATH test file (5000 problems; ids "math/{idx}") or the MATH-500
subset of PRM800K (500; ids "math500/test/{subject}/{n}.json"). The MATH training split is not
available here; the official code also evaluates MATH only.

The gold answer is the last `\\boxed{...}` of the reference solution (MATH-500 ships it as
"answer"). Model outputs are read the same way (`last_boxed`; `\\fbox` too; nested braces), or,
without a box, after a final "The answer is: " as in the official code. Answers are compared
after normalisation (`mathnorm.normalize`) and, when both sides are numbers, numerically
(`mathnorm.is_equiv`); no computer algebra system is used.
"""

import re

from .mathnorm import is_equiv
from .task import Task, Example, system, user

OFFICIAL_SYSTEM = ("Solve the question below by reasoning step by step,"   # sic: no space after the comma
                   "and put the final answer within \\boxed{}.")
BOXED_SYSTEM = "Solve the problem step by step, and put the final answer within \\boxed{}."


def _boxed_at(text, start):
    """The content of the \\boxed{...} or \\fbox{...} starting at text[start] (braces balanced), or None."""
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):                      # "\boxed 5$" -> "5"
        return rest[1:].split("$")[0].strip() or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return None                                   # unbalanced: the output was cut off


def boxed_answers(text):
    """The contents of every \\boxed{} / \\fbox{} in `text`, in order (None for one that does not parse)."""
    return [_boxed_at(text, m.start()) for m in re.finditer(r"\\boxed|\\fbox", text)]


def last_boxed(text):
    """The content of the last \\boxed{...} or \\fbox{...} in `text` (braces balanced), or None.
    Also reads the brace-less form "\\boxed 5". Follows hendrycks/math's last_boxed_only_string."""
    boxes = boxed_answers(text)
    return boxes[-1] if boxes else None


def extract_answer(text):
    """The answer of a model output: its last box, when every box in it gives the same answer.

    Strict: an output that boxes two different answers ("\\boxed{5} or \\boxed{6}") is unparsable,
    so listing candidates never scores. Without a box, the official code's "The answer is: " form.
    """
    boxes = boxed_answers(text)
    if boxes:
        last = boxes[-1]
        if last is None or not all(b is None or is_equiv(b, last) for b in boxes):
            return None
        return last.strip() or None
    if "The answer is: " in text:                 # the official code's second format
        ans = text.split("The answer is: ")[-1].split(".\n")[0].strip()
        ans = re.sub(r"\.$", "", ans).strip().strip("$").strip()
        return ans or None
    return None


def official_prompt(rec):
    return [system(OFFICIAL_SYSTEM), user(rec["problem"])]


def boxed_prompt(rec):
    return [system(BOXED_SYSTEM), user(rec["problem"])]


class MathTask(Task):
    name = "math"
    splits = ("test",)
    prompts = {"official": official_prompt, "boxed": boxed_prompt}
    default_prompt = "boxed"   # the official instruction with its missing space; MATH has no validation split

    def records(self, split):
        rows = self.read("math/test.jsonl")
        return [dict(id=f"math/{r['idx']}", problem=r["problem"], answer=self._gold(r), level=r["level"],
                     subject=r["type"], solution=r["solution"]) for r in rows]

    @staticmethod
    def _gold(r):
        answer = last_boxed(r["solution"])
        if answer is None:
            raise ValueError(f"MATH problem {r.get('idx')}: the solution has no \\boxed answer")
        return answer

    def example(self, rec):
        return Example(id=rec["id"], problem=rec["problem"], messages=self.messages(rec), answer=rec["answer"],
                       meta=dict(level=rec["level"], subject=rec["subject"], solution=rec["solution"]))

    def reference_text(self, example):
        return example.meta["solution"]  # the worked solution, with its \boxed{} answer

    def extract(self, output, example=None):
        return extract_answer(output)

    def is_correct(self, answer, example):
        return is_equiv(answer, example.answer)


class Math500Task(MathTask):
    name = "math500"

    def records(self, split):
        rows = self.read("math500/test.jsonl")
        return [dict(id=f"math500/{r['unique_id']}", problem=r["problem"], answer=r["answer"], level=r["level"],
                     subject=r["subject"], solution=r["solution"]) for r in rows]
