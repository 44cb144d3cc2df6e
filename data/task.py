"""The common shape of every task: splits, prompts as chat messages, answer extraction, scoring.

A task turns raw records into `Example`s:

    task = get_task("gsm8k", prompt="official")
    examples = task.load("validation")          # list[Example]
    ex = examples[0]
    ex.messages   # [{"role": "system", ...}, {"role": "user", ...}] — the prompt
    ex.answer     # the gold answer ("72")
    task.extract("... #### 72")    -> "72"       (None when the output cannot be parsed)
    task.score(ex, "... #### 72")  -> True

A prompt is a function `record -> messages`; every task keeps the official template of
SakanaAI/self-adaptive-llms under the name "official" and may add variants (`task.prompts`).
A message list may end with an *assistant* message: a prefill that the model's completion
continues (the official code prompts do this for ARC and the code tasks). The completion
function then returns only the continuation; the scorers know the prefill.
"""

import gzip
import json
import os
import random
from dataclasses import dataclass, field

from .paths import ENV_VAR, OFFLINE_VAR, DataNotFoundError, data_dir, offline

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    id: str                # stable and unique across splits, e.g. "gsm8k/train/0"
    problem: str           # the bare problem text, independent of the prompt format (used by `cls`)
    messages: list         # the chat prompt: [{"role": ..., "content": ...}, ...]
    answer: object         # the gold answer: a letter, a number, a LaTeX string, a label, or code
    meta: dict = field(default_factory=dict)   # task-specific details (options, tests, ...)


def data_file(relpath, override=None):
    """Absolute path of `relpath` (e.g. "gsm8k/train.jsonl") inside the data directory. A missing
    file's dataset is fetched first (data/download.py), unless offline(); a file that is still
    missing raises DataNotFoundError naming the expected path and how to obtain it."""
    root = data_dir(override)
    path = os.path.join(root, relpath)
    if os.path.isfile(path):
        return path
    source = ("the --data-dir flag" if override else f"${ENV_VAR}" if os.environ.get(ENV_VAR)
              else f"the default (set ${ENV_VAR} or pass --data-dir to change it)")
    dataset = relpath.split("/")[0]
    message = (f"expected the data file {path} but it does not exist.\n"
               f"  The data directory {root} comes from {source}.\n"
               f"  To obtain the file: python -m data.download {dataset} --data-dir {root}  (needs internet),\n"
               f"  or point ${ENV_VAR} at a directory that holds {relpath}.")
    if offline():
        raise DataNotFoundError(message + f"\n  (Not fetched on first use: ${OFFLINE_VAR} is set or --offline was given.)")
    from . import download  # the only module that touches the network, imported when a file is missing
    if dataset not in download.DATASETS:
        raise DataNotFoundError(message)
    try:
        download.fetch(dataset, root)
    except Exception as e:  # any failure of the download or of reading the release: say so, and how to retry
        raise DataNotFoundError(f"{message}\n  Fetching {dataset} on first use failed: {e}") from e
    if not os.path.isfile(path):
        raise DataNotFoundError(f"{message}\n  The release of {dataset} was fetched but has no {relpath}.")
    return path


def read_jsonl(relpath, override=None):
    """The records of a JSON-lines file (optionally gzip-compressed) in the data directory."""
    path = data_file(relpath, override)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def prefill(example):
    """The assistant prefill that the completion continues ("" when the prompt has none)."""
    last = example.messages[-1]
    return last["content"] if last["role"] == "assistant" else ""


def even_odd(rows, split):
    """The official code's split of a training file: even indices train, odd indices validate."""
    return rows[0::2] if split == "train" else rows[1::2]


def split_shots(examples, shots, seed=16):
    """Few-shot split as in the official FewShotTask: shuffle indices with `seed`, the first
    `shots` examples are the shots, the rest is evaluated. Returns (shots, rest)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:shots]], [examples[i] for i in order[shots:]]


class Task:
    """Base class. Subclasses set `name`, `splits`, `prompts`, `default_prompt` and implement
    `records(split)`, `example(record)`, `extract(output, example)` and `is_correct(answer, example)`."""

    name = ""
    splits = SPLITS
    prompts = {}           # name -> function(record) -> messages
    default_prompt = "official"

    def __init__(self, prompt=None, data_dir=None):
        prompt = prompt or self.default_prompt
        if prompt not in self.prompts:
            raise ValueError(f"{self.name}: unknown prompt {prompt!r}; expected one of {sorted(self.prompts)}")
        self.prompt = prompt
        self.data_dir = data_dir

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, prompt={self.prompt!r})"

    def read(self, relpath):
        return read_jsonl(relpath, self.data_dir)

    def load(self, split):
        """The examples of `split`, in a fixed order."""
        if split not in self.splits:
            raise ValueError(f"{self.name}: no split {split!r}; expected one of {list(self.splits)}")
        return [self.example(r) for r in self.records(split)]

    def messages(self, record):
        return self.prompts[self.prompt](record)

    def records(self, split):
        raise NotImplementedError

    def example(self, record):
        raise NotImplementedError

    def extract(self, output, example=None):
        """The answer in a model output, or None when it cannot be parsed."""
        raise NotImplementedError

    def is_correct(self, answer, example):
        return answer == example.answer

    def difficulty(self, example):
        """A number that orders the examples from easy to hard, for a curriculum (reinforce.py
        --max-difficulty); tasks that define one override this."""
        raise NotImplementedError(f"{self.name} defines no difficulty; GSM8K does (its number of calculation steps)")

    def reference_text(self, example):
        """The whole assistant turn of a correct answer in the prompt's format, written from the
        reference answer, or None where the task has none (the default). Subclasses override it."""
        return None

    def reference_completion(self, example):
        """A correct completion of `example`'s prompt: reference_text after the prompt's prefill,
        what the model would have to generate. None where the task has no reference text or it does
        not begin with the prefill (ARC's chain-of-thought prefill, "Let's think step by step", has
        no written reasoning to continue it). Used as the target of next-token prediction
        (reinforce.py --objective nll) and to score the few-shot mixes of cem.py."""
        text = self.reference_text(example)
        pre = prefill(example)
        return text[len(pre):] if text is not None and text.startswith(pre) else None

    def score(self, example, output):
        """True when `output` (the completion for `example`) answers correctly."""
        answer = self.extract(output, example)
        return answer is not None and self.is_correct(answer, example)

    def score_many(self, examples, outputs):
        """Scores a batch; code tasks override this to run the programs in parallel."""
        return [self.score(ex, out) for ex, out in zip(examples, outputs, strict=True)]

    def scoring_settings(self):
        """How this task's scores were checked, recorded in evaluation results (code tasks: the sandbox mode)."""
        return {}
