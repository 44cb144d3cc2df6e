"""The classification task of Transformer²'s classification expert (paper §3.2, strategy (b)).

Each example is a problem from one of the three expert tasks, labelled with its category:
GSM8K -> "math", MBPP -> "code", ARC-Easy -> "reasoning". The model answers with the category.

Unlike the official code, which built this task from the *test* splits of GSM8K, MBPP (MBPP+) and
ARC-Challenge, we use training data only: "train" draws 300 problems per category from the train
splits of the three tasks, "validation" 90 per category from their validation splits (all of MBPP's
90). No test item is ever used, nor any training problem whose text also appears in a test split
(ARC-Easy has two). The draw is seeded (`SEED`) and the three categories are shuffled
together, so the splits are balanced, stable and disjoint. Ids are "cls/{source example id}".
The text shown is the source problem (`Example.problem`), independent of the source's prompt.
"""

import random
import re

from .arc import ArcTask
from .gsm8k import Gsm8kTask
from .mbpp import MbppTask
from .task import Example, Task, assistant, system, user

SEED = 0
PER_CLASS = {"train": 300, "validation": 90}
SOURCES = {"math": Gsm8kTask, "code": MbppTask, "reasoning": ArcTask}
LABELS = ("code", "math", "reasoning", "other")   # "other" is a valid answer, never a gold label

OFFICIAL_SYSTEM = """
    # Analyze the given question and classify it into one of four categories: 'code', 'math', 'reasoning' or 'other'. Follow these guidelines:

    1. Code: Questions asking for programming solutions, functions, algorithms. Often includes specific programming terms, language syntax, or data structures.
    2. Math: Questions involving mathematical calculations, formulas, statistics. Often includes numbers, equations, or mathematical operations.
    3. Reasoning: Questions requiring logical thinking, application of scientific knowledge, or critical analysis of information. Often presents statements that need evaluation based on general understanding. 
    4. Other: Questions not clearly fit into above categories.

    Instructions:
    - Consider the primary focus, skills, and knowledge required to answer the question.
    - If a question spans multiple categories, choose the most dominant one.
    - Provide your final classification within \\boxed{} notation. Example: \\boxed{reasoning}

    Format your response as follows:
    Classification: \\boxed{category}
    """  # noqa: E501, W291  (verbatim from the official code)

ONEWORD_SYSTEM = ("Is the following question about math, code, or reasoning? "
                  "Reply with one word: math, code, or reasoning.")


def official_prompt(rec):
    return [system(OFFICIAL_SYSTEM), user(rec["problem"])]


def oneword_prompt(rec):
    return [system(ONEWORD_SYSTEM), user(rec["problem"])]


# Three hand-written demonstrations (not drawn from any split), shown as earlier chat turns.
DEMOS = [("Write a function that returns the largest element of a list.", "code"),
         ("A shop sells pens at $3 each. How many dollars do 7 pens cost?", "math"),
         ("Which gas do plants take in from the air? A. oxygen B. carbon dioxide C. helium", "reasoning")]


def fewshot_prompt(rec):
    """Demonstrations as earlier turns: left to itself the default model answers the question (or
    repeats the list of categories) instead of naming one."""
    turns = [system(ONEWORD_SYSTEM)]
    for question, label in DEMOS:
        turns += [user(question), assistant(label)]
    return turns + [user(rec["problem"])]


def extract_label(text):
    """The category in a model output, or None: it names none, an unknown one in a box, or two.

    Strict, as every scorer a policy is trained on: the output must name exactly one category,
    in a \\boxed{} or as a word anywhere ("code\\nmath\\nreasoning" names three and is no answer).
    """
    boxed = [b.strip().lower() for b in re.findall(r"\\boxed\{([^{}]*)\}", text)]
    if any(b not in LABELS for b in boxed):
        return None
    words = re.sub(r"\\boxed\{[^{}]*\}", " ", text).lower()
    named = set(boxed) | set(re.findall(r"\b(" + "|".join(LABELS) + r")\b", words))
    return named.pop() if len(named) == 1 else None


class ClsTask(Task):
    name = "cls"
    splits = ("train", "validation")
    prompts = {"official": official_prompt, "oneword": oneword_prompt, "fewshot": fewshot_prompt}
    default_prompt = "fewshot"   # measured on validation: 42% against 2-3% for oneword and a prefill (RESULTS.md)

    def records(self, split):
        rng = random.Random(SEED)
        rows = []
        for label, source in SOURCES.items():
            task = source(data_dir=self.data_dir)
            # ARC-Easy's train file repeats two of its test questions verbatim: never use those.
            test_problems = {ex.problem for ex in task.load("test")}
            examples = [ex for ex in task.load(split) if ex.problem not in test_problems]
            for ex in rng.sample(examples, PER_CLASS[split]):
                rows.append(dict(id=f"cls/{ex.id}", problem=ex.problem, label=label))
        rng.shuffle(rows)
        return rows

    def example(self, rec):
        return Example(id=rec["id"], problem=rec["problem"], messages=self.messages(rec), answer=rec["label"])

    def extract(self, output, example=None):
        return extract_label(output)
