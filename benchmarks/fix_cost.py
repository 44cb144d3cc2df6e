"""What issue 38's memory fixes cost in time: the same steps of a task's recipe with them ("after")
and without them ("before"), in alternating fresh processes, on a quiet machine.

    python -m benchmarks.fix_cost --task arc --batch-size 32 --steps 5 --repeats 3

"before" undoes the two fixes that run every step: torch's per-shape oneDNN caches back at their
default 1024 shapes (LRU_CACHE_CAPACITY, ONEDNN_PRIMITIVE_CACHE_CAPACITY in the child's environment,
which products.py then leaves alone) and no malloc_trim after each micro-batch of the backward
(objectives.release_freed_memory made a no-op). The SVD cache's copy of sigma happens once, at load,
and is not measured. Each child runs benchmarks.soak's steps (the real mix of questions); a step's
time is its rollout plus its backward, the first step of each child left out (it fills the caches).
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
    if args.arm == "before":
        objectives.release_freed_memory = lambda: None  # no trim after each micro-batch
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
    ap.add_argument("--repeats", type=int, default=3, help="pairs of children, after then before")
    ap.add_argument("--eval-limit", type=int, default=8, help="validation items at step 0 and the end")
    ap.add_argument("--arm", choices=["after", "before"], help=argparse.SUPPRESS)  # set for a child
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        return child(args)
    print(f"fix_cost: {args.task}, {args.repeats} x (after, before), {args.steps} steps of {args.batch_size} "
          f"rollouts each; CPU {cpu_name()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    forward = ["--task", args.task, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--eval-limit", str(args.eval_limit), "--dtype", args.dtype,
               *(["--model", args.model] if args.model else []), *(["--data-dir", args.data_dir] if args.data_dir else [])]
    times, ratios = {"after": [], "before": []}, []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            median = {}
            for arm in ("after", "before"):
                env = {k: v for k, v in os.environ.items() if k not in BEFORE_ENV}  # after: products.py's caps
                env.update(BEFORE_ENV if arm == "before" else {})
                rows_path = os.path.join(tmp, f"{arm}{rep}.json")
                subprocess.run([sys.executable, "-m", "benchmarks.fix_cost", *forward, "--arm", arm,
                                "--rows", rows_path], env=env, check=True, stdout=subprocess.DEVNULL)
                t = step_times(json.load(open(rows_path)))
                times[arm] += t
                median[arm] = statistics.median(t)
                print(f"repeat {rep + 1} {arm:6}: step (rollout + backward) s {', '.join(f'{x:.2f}' for x in t)}",
                      flush=True)
            ratios.append(median["after"] / median["before"])
    a, b = statistics.median(times["after"]), statistics.median(times["before"])
    print(f"\nmedian step: after {a:.2f} s, before {b:.2f} s: after / before {a / b:.3f}; "
          f"per repeat {', '.join(f'{r:.3f}' for r in ratios)} (aim: at most 1.05)")


if __name__ == "__main__":
    main()
