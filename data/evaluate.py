"""Evaluating a completion function on a task split, and the confidence intervals to read it with.

    def complete_fn(message_lists):          # list of chat prompts -> list of completions
        return [my_model.chat(m) for m in message_lists]

    result = evaluate(get_task("arc_easy"), "validation", complete_fn, limit=200)
    print(result.summary())                  # accuracy with its 95% interval, unparsable rate, time
    result.save("runs/arc_easy-validation.json")

`evaluate` knows nothing about models: `complete_fn` gets a batch of message lists and returns one
string per list. When a message list ends with an assistant message (a prefill), the completion
must continue it and return only the continuation.

A long run need not be lost: `evaluate(..., out=path)` saves the records after every batch (atomically),
and `evaluate(..., previous=Result.load(path))` skips the items already done and keeps their records.

Base-vs-expert comparisons run both on the same items; `paired_difference(a, b)` gives the
accuracy difference with a 95% interval for such paired runs, which is much tighter than two
separate intervals; `exact_sign_test(a, b)` counts the items won and lost and gives McNemar's exact
p-value, the check to trust when only a handful of items differ. `compare_line(path, result)` prints
both against the records of a run saved by `evaluate_model.py --out` or `adapt.py --out` (their
`--compare` flags).
"""

import json
import math
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

Z95 = 1.959963984540054


@dataclass
class Record:
    id: str
    messages: list
    output: str
    extracted: object       # the parsed answer; None when the output could not be parsed
    answer: object          # the gold answer
    correct: bool


@dataclass
class Result:
    task: str
    split: str
    prompt: str
    records: list = field(default_factory=list)
    wall_s: float = 0.0
    settings: dict = field(default_factory=dict)  # how the outputs were made: model, expert, decoding

    @property
    def n(self):
        return len(self.records)

    @property
    def correct(self):
        return sum(r.correct for r in self.records)

    @property
    def accuracy(self):
        return self.correct / self.n if self.n else 0.0

    @property
    def unparsable(self):
        return sum(r.extracted is None for r in self.records) / self.n if self.n else 0.0

    def ci95(self):
        return wilson_interval(self.correct, self.n)

    def summary(self):
        lo, hi = self.ci95()
        return (f"{self.task}/{self.split} prompt={self.prompt}: accuracy {self.accuracy:.4f} "
                f"({self.correct}/{self.n}, 95% CI {lo:.4f}-{hi:.4f}), unparsable {self.unparsable:.1%}, "
                f"{self.wall_s:.1f}s")

    def save(self, path):
        """Writes the result as JSON, atomically: a crash mid-write leaves the old file intact."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(task=self.task, split=self.split, prompt=self.prompt, accuracy=self.accuracy,
                           n=self.n, unparsable=self.unparsable, wall_s=self.wall_s, settings=self.settings,
                           records=[asdict(r) for r in self.records]), f, indent=1, default=str)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        """A Result written by `save`. Extracted and gold answers come back as JSON gives them."""
        d = read_result_json(path)
        return cls(d["task"], d["split"], d["prompt"], [Record(**r) for r in d["records"]], d["wall_s"],
                   d.get("settings", {}))


def evaluate(task, split, complete_fn, limit=None, batch_size=32, progress=True, previous=None, out=None,
             settings=None, map_batch=None):
    """Runs `complete_fn` on the examples of `split` (or on a list of Examples passed as `split`),
    the first `limit` of them if given, and scores the outputs. Returns a Result.

    previous: a Result of an interrupted run of the same task, split, prompt and settings; its items
    are not run again and its records and wall time carry over. out: save the Result there after
    every batch. settings: recorded in the Result (and compared with previous.settings), with the
    task's scoring_settings() added (recorded, not compared: see RECORDED_ONLY).
    map_batch(run, batch) -> run's records of the whole batch, in order: how a batch is run, by
    default run(batch) here; distributed.map_items runs each process's share and gathers them."""
    examples = task.load(split) if isinstance(split, str) else list(split)
    examples = examples[:limit] if limit is not None else examples
    settings = {**(settings or {}), **task.scoring_settings()}
    result = Result(task.name, split if isinstance(split, str) else "custom", task.prompt, settings=settings)
    if previous is not None:
        check_same_run(previous, result)
        ids = {ex.id for ex in examples}
        result.records = [r for r in previous.records if r.id in ids]
        result.wall_s = previous.wall_s
        done = {r.id for r in result.records}
        examples = [ex for ex in examples if ex.id not in done]
        if progress:
            print(f"resuming: {len(done)} items already done, {len(examples)} to go", flush=True)
    total, wall_before = result.n + len(examples), result.wall_s
    start = time.perf_counter()

    def run(batch):  # completions, answers and verdicts of a batch of examples, as Records
        outputs = complete_fn([ex.messages for ex in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"complete_fn returned {len(outputs)} outputs for {len(batch)} prompts")
        extracted = [task.extract(text, ex) for ex, text in zip(batch, outputs)]
        correct = task.score_many(batch, outputs)
        return [Record(ex.id, ex.messages, text, x, ex.answer, bool(c))
                for ex, text, x, c in zip(batch, outputs, extracted, correct)]

    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        result.records += map_batch(run, batch) if map_batch else run(batch)
        result.wall_s = wall_before + time.perf_counter() - start
        if out:
            result.save(out)
        if progress:
            print(f"{task.name}/{result.split} {result.n}/{total} | accuracy {result.accuracy:.4f} "
                  f"| {(i + len(batch)) / (time.perf_counter() - start):.2f} items/s", flush=True)
    return result


# Settings that are recorded but need not match to resume. The sandbox mode changes what a hostile
# program can do to the machine, not which honest programs pass (the canonical solutions pass in both
# modes); refusing to resume a run on a machine without namespaces, or a file saved before the mode
# was recorded, would protect nothing. A resumed result records the mode of the run that finished it.
# The number of processes that shared the items out (evaluate_model.py under torchrun) is recorded
# too, so that a reader can tell a sharded run from N copies; it need not match, since an item's output
# does not depend on which process made it (a padded batch gives each row its output alone: test_model).
RECORDED_ONLY = ("sandbox", "world_size")


def check_same_run(previous, result):
    """Refuses to continue `previous` into `result` when they were not made the same way."""
    compared = lambda settings: {k: v for k, v in settings.items() if k not in RECORDED_ONLY}  # noqa: E731
    for key in ("task", "split", "prompt", "settings"):
        old, new = getattr(previous, key), getattr(result, key)
        if key == "settings":
            old, new = compared(old), compared(new)
        if old != new:
            raise ValueError(f"cannot resume: the saved result has {key} {old!r}, this run has {new!r}")


def wilson_interval(k, n, z=Z95):
    """Wilson score interval for k successes in n trials (good also near 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def item_differences(a, b):
    """Per item both Results share (matched by id): +1 where only b is right, -1 where only a is, else 0."""
    right_a = {r.id: r.correct for r in a.records}
    return [int(r.correct) - int(right_a[r.id]) for r in b.records if r.id in right_a]


def paired_difference(a, b, z=Z95):
    """Accuracy of b minus accuracy of a over the items both Results share (matched by id), with a
    normal-approximation 95% interval of the mean per-item difference. Returns (diff, lo, hi, n)."""
    diffs = item_differences(a, b)
    n = len(diffs)
    if n == 0:
        raise ValueError("the two results share no items")
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half, n


def exact_sign_test(a, b):
    """McNemar's exact test of two paired runs: the items only b gets right (wins), only a gets right
    (losses), and the two-sided p-value of so uneven a split if either were as likely. Returns
    (wins, losses, p). With few discordant items the normal interval of paired_difference is too
    narrow: 4 wins and 0 losses of 500 give +0.80 (+0.02 to +1.58), which excludes 0, yet p = 0.125."""
    diffs = item_differences(a, b)
    wins, losses = diffs.count(1), diffs.count(-1)
    n = wins + losses
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n) if n else 1.0
    return wins, losses, p


def read_result_json(path):
    """A result file (Result.save, adapt.py --out); a FIFO or a device is refused before open() could wait on it."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file; expected a result JSON written by evaluate_model.py "
                         f"or adapt.py --out")
    with open(path) as f:
        return json.load(f)


def compare_line(path, b, z=Z95):
    """The line `--compare PATH` prints: b against the records saved at `path` (evaluate_model.py or
    adapt.py --out), paired by id, with the normal interval and the exact test."""
    a = SimpleNamespace(records=[SimpleNamespace(**r) for r in read_result_json(path)["records"]])
    diff, lo, hi, n = paired_difference(a, b, z)
    wins, losses, p = exact_sign_test(a, b)
    return (f"vs {path}: {diff:+.4f} (95% CI {lo:+.4f} to {hi:+.4f}) on {n} shared items; "
            f"{wins} won, {losses} lost (exact p = {p:.3g})")
