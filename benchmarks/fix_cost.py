"""What issue 38's memory fixes cost in time: the same steps of a task's recipe with them ("after")
and without them ("before"), in alternating fresh processes, on a quiet machine.

    python -m benchmarks.fix_cost --task arc --batch-size 32 --steps 5 --repeats 3

"before" undoes the two fixes that run every step: torch's per-shape oneDNN caches back at their
default 1024 shapes (LRU_CACHE_CAPACITY, ONEDNN_PRIMITIVE_CACHE_CAPACITY in the child's environment,
which products.py then leaves alone) and no malloc_trim after each half of the backward
(objectives.release_freed_memory made a no-op); "no-trim" keeps the caps and drops only the trim,
so each fix's time and the highest step peak it buys show apart. The order of the three alternates
from round to round, so that a slow drift of a shared machine falls on each alike. The SVD cache's
copy of sigma happens once, at load, and is not measured. Each child runs benchmarks.soak's steps
(the real mix of questions); a step's time is its rollout plus its backward, the first step of each
child left out (it fills the caches).
The aim (issue 38): at most 5% more time a step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

BEFORE_ENV = {"LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}


def child(args):
    """One arm in this process: soak's steps, their log rows written to args.rows as JSON."""
    import benchmarks.soak as soak
    import objectives
    if args.arm in ("before", "no-trim"):
        objectives.release_freed_memory = lambda: None  # no trim after each half of the backward
    soak_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("arm", "rows", "repeats")},
                                   fixed=False)
    rows = soak.soak(soak_args)
    with open(args.rows, "w") as f:
        json.dump(rows, f)


def step_times(rows):
    return [r["rollout_s"] + r["backward_s"] for r in rows[1:]]  # the first step fills the caches


def main(argv=None):
    from benchmarks.bench_model import cpu_name
    from chat import add_model_arguments
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap, batch_size=32, batch_help="rollouts a step (default: %(default)s)")
    ap.add_argument("--task", default="arc")
    ap.add_argument("--steps", type=int, default=5, help="steps in each child (the first is left out)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the three children (after, no-trim, before)")
    ap.add_argument("--eval-limit", type=int, default=8, help="validation items at step 0 and the end")
    ap.add_argument("--arm", choices=["after", "no-trim", "before"], help=argparse.SUPPRESS)  # set for a child
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        return child(args)
    print(f"fix_cost: {args.task}, {args.repeats} x (after, no-trim, before), {args.steps} steps of {args.batch_size} "
          f"rollouts each; CPU {cpu_name()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    forward = ["--task", args.task, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--eval-limit", str(args.eval_limit), "--dtype", args.dtype,
               *(["--model", args.model] if args.model else []), *(["--data-dir", args.data_dir] if args.data_dir else [])]
    arms = ["after", "no-trim", "before"]
    times, parts, peaks = ({arm: [] for arm in arms} for _ in range(3))
    ratios = {arm: [] for arm in arms[:-1]}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            median = {}
            for arm in arms if rep % 2 == 0 else arms[::-1]:  # alternate the order: a drift of the machine cancels
                env = {k: v for k, v in os.environ.items() if k not in BEFORE_ENV}  # products.py's caps
                env.update(BEFORE_ENV if arm == "before" else {})
                rows_path = os.path.join(tmp, f"{arm}{rep}.json")
                subprocess.run([sys.executable, "-m", "benchmarks.fix_cost", *forward, "--arm", arm,
                                "--rows", rows_path], env=env, check=True, stdout=subprocess.DEVNULL)
                rows = json.load(open(rows_path))
                t = step_times(rows)
                times[arm] += t
                parts[arm] += [(r["rollout_s"], r["backward_s"]) for r in rows[1:]]
                peaks[arm].append(max(r["step_peak_rss_gib"] for r in rows))  # what the fixes are for
                median[arm] = statistics.median(t)
                print(f"repeat {rep + 1} {arm:7}: step (rollout + backward) s {', '.join(f'{x:.2f}' for x in t)}"
                      f" | highest step peak {peaks[arm][-1]:.2f} GiB", flush=True)
            for arm in ratios:
                ratios[arm].append(median[arm] / median["before"])
    b = statistics.median(times["before"])
    print()
    for arm in arms:  # which part of the step a difference is in, and what it bought
        rollout, backward = (statistics.median(x) for x in zip(*parts[arm]))
        step = statistics.median(times[arm])
        vs = (f" | / before {step / b:.3f} (per repeat {', '.join(f'{r:.3f}' for r in ratios[arm])})"
              if arm in ratios else "")
        print(f"median {arm:7}: step {step:.2f} s, rollout {rollout:.2f} s, backward {backward:.2f} s | "
              f"highest step peak {max(peaks[arm]):.2f} GiB{vs}")
    print("aim (issue 38): after / before at most 1.05")


if __name__ == "__main__":
    main()
