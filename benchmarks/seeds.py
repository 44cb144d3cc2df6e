"""One recipe run at several seeds, read from the runs' logs: what a single run can and cannot show.

    python -m benchmarks.seeds runs/try-g0 runs/try-g1 ...                  # one recipe
    python -m benchmarks.seeds runs/try-g0 ... --against runs/c2 runs/c2s1 ...  # two, paired by seed
    python -m benchmarks.seeds runs/test-g0.json ... --against runs/test-p0.json ...  # held out (Results)

A run's own interval (reinforce.py's "vs step 0") is over its 600 validation items: it says whether
*this* run moved validation. Whether the recipe does is a question over seeds (other batches, option
orders and initial z): here each run gives one number, its last validation minus its step 0, and the
seeds' mean gets a Student t interval over the runs. With --against, the i-th run of each list must
share a seed, hence the same step 0; their difference is then paired by seed. Result files
(evaluate_model.py --out, each seed's expert on the same held-out items) are compared item by item
within a seed, and the seeds' paired differences get the t interval over seeds.
"""

import argparse
import json
import os
import statistics

# Student t's 97.5% quantile by degrees of freedom (two-sided 95%); a large df is the normal's 1.96.
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
        11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 20: 2.09, 30: 2.04}


def t975(df):
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]  # between tabled dfs, the smaller one's: a wider interval


def mean_interval(xs):
    """The mean of xs with its 95% t interval (a list of at least two numbers)."""
    m = statistics.mean(xs)
    half = t975(len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5
    return m, m - half, m + half


def read_run(run_dir):
    """A run's step 0 and last validation, in points: {"step" (the last's), "step0", "last", "diff" with
    its paired interval "low" to "high", "unparsable" (at step 0, at the last)}."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{run_dir}: no log.jsonl (expected a run directory of reinforce.py)")
    with open(path) as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "eval"]
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise SystemExit(f"{path}: expected a validation at step 0 and a later one, found steps "
                         f"{[r['step'] for r in evals]}")
    first, last = evals[0], evals[-1]
    diff, low, high = (100 * x for x in last["vs_step0"])
    return dict(step=last["step"], step0=100 * first["accuracy"], last=100 * last["accuracy"], diff=diff,
                low=low, high=high, unparsable=(100 * first["unparsable"], 100 * last["unparsable"]))


def summary(name, runs):
    """Prints each run and the mean over seeds; returns the runs' differences."""
    print(f"{name}:")
    for d, r in runs.items():
        above = "above 0" if r["low"] > 0 else "includes 0"
        print(f"  {d}: step 0 {r['step0']:.2f}% -> step {r['step']} {r['last']:.2f}%, {r['diff']:+.2f} "
              f"({r['low']:+.2f} to {r['high']:+.2f}, {above}); unparsable {r['unparsable'][0]:.1f}% -> "
              f"{r['unparsable'][1]:.1f}%")
    diffs = [r["diff"] for r in runs.values()]
    outside = sum(r["low"] > 0 for r in runs.values())
    m, lo, hi = mean_interval(diffs)
    print(f"  over {len(diffs)} seeds: mean {m:+.2f} points (95% t interval {lo:+.2f} to {hi:+.2f}); "
          f"{outside} of {len(diffs)} runs' own intervals above 0")
    return diffs


def held_out(files, against):
    """Result files of two recipes' experts, the i-th of each from the same seed: each seed's paired
    difference on their shared items, then the mean over seeds with its t interval."""
    from data import Result
    from data.evaluate import paired_difference
    diffs = []
    for fa, fb in zip(files, against):
        a, b = Result.load(fa), Result.load(fb)
        d, lo, hi, n = paired_difference(b, a)  # a's accuracy minus b's, on the items both have
        d, lo, hi = 100 * d, 100 * lo, 100 * hi
        diffs.append(d)
        print(f"  {fa} {100 * a.accuracy:.2f}% against {fb} {100 * b.accuracy:.2f}%: {d:+.2f} ({lo:+.2f} to "
              f"{hi:+.2f}) on {n} items; unparsable {100 * a.unparsable:.1f}% / {100 * b.unparsable:.1f}%")
    m, lo, hi = mean_interval(diffs)
    print(f"paired by seed, over {len(diffs)} seeds: {m:+.2f} points (95% t interval {lo:+.2f} to {hi:+.2f}), "
          f"{sum(d > 0 for d in diffs)} of {len(diffs)} seeds higher")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories of one recipe, one per seed, or Result files "
                                            "(evaluate_model.py --out) of its experts")
    ap.add_argument("--against", nargs="+", default=None,
                    help="run directories of another recipe at the same seeds, in the same order")
    args = ap.parse_args()
    if len(args.runs) < 2:
        ap.error("give at least two runs: one run has no spread over seeds")
    if args.against is not None and len(args.against) != len(args.runs):
        ap.error(f"--against needs one run per seed of the first list: {len(args.runs)} runs, "
                 f"{len(args.against)} against")
    if all(f.endswith(".json") for f in args.runs + (args.against or [])):
        if args.against is None:
            ap.error("Result files are compared with --against (another recipe's, seed by seed)")
        return held_out(args.runs, args.against)
    runs = {d: read_run(d) for d in args.runs}
    a = summary("runs", runs)
    if args.against is None:
        return
    other = {d: read_run(d) for d in args.against}
    b = summary("against", other)
    for (d, r), mine in zip(other.items(), runs.values()):
        if abs(r["step0"] - mine["step0"]) > 1e-9:
            raise SystemExit(f"{d}: step 0 reads {r['step0']:.2f}%, its pair {mine['step0']:.2f}%: not the same seed")
    m, lo, hi = mean_interval([x - y for x, y in zip(a, b)])
    print(f"runs - against, paired by seed: {m:+.2f} points (95% t interval {lo:+.2f} to {hi:+.2f}), "
          f"{sum(x > y for x, y in zip(a, b))} of {len(a)} seeds higher")


if __name__ == "__main__":
    main()
