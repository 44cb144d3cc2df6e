"""What an ARC expert's answers look like, beside another run's: read before believing a gain.

    python -m benchmarks.arc_outputs runs/test-base.json runs/test-arc.json [--samples 8]

Each file is a Result saved by `evaluate_model.py --out` (or adapt.py) on an ARC task. For each:
accuracy, how many outputs name exactly one option, several (a list: wrong wherever it lists
them) or none, how often the one option named is right, and the commonest first words; then the
paired difference of the last file against the first, and a sample of the items they disagree on,
with both outputs. Nothing is generated: it reads the saved outputs with the task's own scorer.
"""

import argparse
import collections
import random

from data import Result, get_task
from data.arc import LETTERED, named_options
from data.evaluate import exact_sign_test, paired_difference


def kinds(task, result):
    """Per record: how many options its output names (0, 1 or 2 for several), under the task's rule."""
    by_id = {ex.id: ex for ex in task.load(result.split)}
    out = []
    for r in result.records:
        ex = by_id[r.id]
        n = len(named_options(r.output, ex.meta["options"], letters=task.prompt in LETTERED))
        out.append(min(n, 2))
    return out


def summary(task, result):
    k = kinds(task, result)
    one = [r for r, n in zip(result.records, k) if n == 1]
    right = sum(r.correct for r in one)
    first = collections.Counter(" ".join(r.output.split()[:2]) for r in result.records).most_common(3)
    return (f"{result.accuracy:.2%} ({result.correct}/{result.n}); one option named {len(one)}, several "
            f"{k.count(2)}, none {k.count(0)}; right when one is named {right / max(len(one), 1):.1%}; "
            f"commonest openings {first}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="Result files (evaluate_model.py --out) of one ARC task")
    ap.add_argument("--samples", type=int, default=8, help="disagreeing items shown (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    results = [Result.load(p) for p in args.results]
    task = get_task(results[0].task, prompt=results[0].prompt)
    for path, res in zip(args.results, results):
        print(f"{path}: {summary(task, res)}")
    if len(results) < 2:
        return
    a, b = results[0], results[-1]
    diff, lo, hi, n = paired_difference(a, b)
    wins, losses, p = exact_sign_test(a, b)
    print(f"{args.results[-1]} against {args.results[0]}: {diff:+.2%} ({lo:+.2%} to {hi:+.2%}) on {n} items; "
          f"{wins} won, {losses} lost (exact p = {p:.3g})")
    old = {r.id: r for r in a.records}
    differ = [(old[r.id], r) for r in b.records if r.id in old and old[r.id].correct != r.correct]
    for x, y in random.Random(args.seed).sample(differ, min(args.samples, len(differ))):
        question = x.messages[-1]["content"].split("Question:")[-1].strip()
        print(f"\n[{y.id}] answer {y.answer}; {question[:160]}\n  first ({'right' if x.correct else 'wrong'}): "
              f"{x.output.strip()[:160]!r}\n  last  ({'right' if y.correct else 'wrong'}): {y.output.strip()[:160]!r}")


if __name__ == "__main__":
    main()
