"""Does a training run's memory grow from step to step? N steps of a task's recipe at a small batch,
printing the resident memory after each step's release, the step's own peak and the run's peak.

    OMP_NUM_THREADS=1 python -m benchmarks.soak --task arc --steps 30 --batch-size 16
    OMP_NUM_THREADS=1 python -m benchmarks.soak --task mbpp --steps 20 --batch-size 16
    OMP_NUM_THREADS=1 python -m benchmarks.soak --task arc --steps 30 --batch-size 16 --fixed

The real mix: reinforce.py's own steps (new questions each step, answers of every length). With
--fixed every step sees the same shapes: step 0's questions again and again, and every answer runs
to the task's max_new_tokens (no stop token), without a baseline so that every step runs its
backward. Memory that grows under --fixed is held from step to step whatever the shapes (a leak);
memory that grows only in the mix follows the shapes (per-shape caches, fragmentation).

The verdict compares the resident memory after the last step with that after step 5, the issue's
aim being within 3% (issue 38). Validation runs at step 0 and after the last step only, on
--eval-limit items. Each step's line is reinforce.py's own (its `rss`, `step peak` and `peak`).
"""

import argparse
import json
import os
import tempfile

import torch

import reinforce
from benchmarks.bench_model import cpu_name  # the CPU's name and flags, printed beside every number
from chat import add_model_arguments, load
from data import get_task
from recipes import recipe, step_batch


def soak(args):
    task = get_task(args.task, data_dir=args.data_dir)
    cfg = recipe(task.name)
    task = get_task(task.name, prompt=cfg.prompt, data_dir=args.data_dir)
    cfg.steps, cfg.batch_size, cfg.eval_every = args.steps, args.batch_size, args.steps + 1
    cfg.eval_limit, cfg.heldout = args.eval_limit, 0
    cfg.rollout_batch = min(cfg.rollout_batch, args.batch_size)
    model, tok, model_dir = load(args)
    if args.fixed:  # the same shapes every step: step 0's questions, answers of max_new_tokens
        cfg.baseline = False
        reinforce.step_batch = lambda task, train_set, step, cfg: step_batch(task, train_set, 0, cfg)
        tok.stop_tokens = set()
    env = {v: os.environ[v] for v in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX", "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                      "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if v in os.environ}
    print(f"soak: {task.name}, {'fixed shapes' if args.fixed else 'the real mix'}, {args.steps} steps of "
          f"{args.batch_size} rollouts, {next(model.parameters()).dtype}; CPU {cpu_name()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {env}", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        reinforce.train(cfg, model, tok, model_dir, task, run_dir, os.path.join(run_dir, "expert.safetensors"))
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    steps = [r for r in rows if r["kind"] == "step"]
    print("\n| step | RSS after (GiB) | step peak (GiB) | run peak (GiB) | new tokens |\n|---|---|---|---|---|")
    for r in steps:
        print(f"| {r['step']} | {r['rss_gib']:.3f} | {r['step_peak_rss_gib']:.3f} | {r['peak_rss_gib']:.3f} "
              f"| {r['new_tokens']} |")
    if len(steps) > 5:
        after5, last = steps[4]["rss_gib"], steps[-1]["rss_gib"]
        growth = (last - after5) / after5
        print(f"\nRSS after step {steps[-1]['step']} vs after step 5: {last:.3f} vs {after5:.3f} GiB, "
              f"{growth:+.1%} ({(last - after5) / (len(steps) - 5) * 1024:+.1f} MiB a step); "
              f"{'within' if abs(growth) <= 0.03 else 'outside'} the 3% aim", flush=True)
    return steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap, batch_size=16, batch_help="rollouts a step (default: %(default)s)")
    ap.add_argument("--task", default="arc")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-limit", type=int, default=16, help="validation items at step 0 and the end")
    ap.add_argument("--fixed", action="store_true", help="the same shapes every step (see above)")
    return soak(ap.parse_args(argv))


if __name__ == "__main__":
    main()
