"""The official batch on a CPU: how fast rollouts decode by batch, what a shared prefill saves a
group, and what a whole REINFORCE step of B rollouts costs (issue 28).

    python -m benchmarks.bench_rollouts --decode [--batches 16 32 64 128] [--questions 128]
    python -m benchmarks.bench_rollouts --groups [--questions 64 --samples 4]
    python -m benchmarks.bench_rollouts --step 256 [--dtype bfloat16] [--samples 1] [--threads 2]
    python -m benchmarks.bench_rollouts --step 256 --ranks 2      # torchrun, 2 processes x 1 thread

--decode: greedy rollouts of the same ARC-Easy training questions (prompt `first`, 32 new tokens, the
base weights) decoded `--batches` rows at a time: wall seconds and generated tokens per second.
--groups: K sampled answers (T 0.8) to each of the questions, from one prefill per question
(generate's `samples`) against the question's K copies prefilled apart: the same distributions, and on
the real model not always the same tokens (a prefill of other rows rounds its products otherwise).
--step B: train()'s step before the optimizer for the ARC recipe at B rollouts (B / K questions,
shuffled options, the batch-mean or group baseline), in a fresh process so that its peak RSS is
its own: rollout / backward / recomposition seconds, the cosine of the halves' gradients, peak RSS;
`--ranks N` runs it under torchrun (reinforce.py's data-parallel step, distributed.py), N processes of
one thread each, and adds the time spent in the all-reduces (the halves' gradients and the sums).
Medians of --runs (the step: one run per step of --steps). Print the CPU with every number.
"""

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.bench_model import cpu_name, peak_rss_gib


def arc_prompts(completer, n, seed=0):
    from data import get_task
    train = get_task("arc_easy", prompt="first").load("train")
    return [completer.encode(ex.messages) for ex in train[seed * n:(seed + 1) * n]]


def load(dtype):
    import checkpoints
    from model import load_model
    from tokenizer import Tokenizer
    path = checkpoints.default_model_dir()
    return load_model(path, dtype=getattr(torch, dtype))[0], Tokenizer.from_dir(path)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_decode(args):
    from chat import Completer
    model, tok = load(args.dtype)
    prompts = arc_prompts(Completer(model, tok), args.questions)
    print(f"| rows decoded together | wall s | new tokens / s | prompt tokens / s (prefill and decode) |\n|---|---|---|---|")
    for b in args.batches:
        completer = Completer(model, tok, 32, batch_size=b)
        times, outs = [], None
        for _ in range(args.runs):
            outs, t = timed(lambda: completer.generate_ids(prompts))
            times.append(t)
        t = statistics.median(times)
        new = sum(map(len, outs))
        print(f"| {b} | {t:.1f} | {new / t:.1f} | {(new + sum(map(len, prompts))) / t:.1f} |", flush=True)


def bench_groups(args):
    from chat import Completer
    model, tok = load(args.dtype)
    K = args.samples
    prompts = arc_prompts(Completer(model, tok), args.questions)
    copies = [p for p in prompts for _ in range(K)]
    rows = {"one prefill per question": [], "K copies prefilled apart": []}
    for _ in range(args.runs):
        shared = Completer(model, tok, 32, 0.8, batch_size=args.batches[0], seed=0)
        a, t = timed(lambda: shared.generate_ids(prompts, samples=K))
        rows["one prefill per question"].append(t)
        apart = Completer(model, tok, 32, 0.8, batch_size=args.batches[0], seed=0)
        b, t = timed(lambda: apart.generate_ids(copies))
        rows["K copies prefilled apart"].append(t)
    same = sum(x == y for x, y in zip(a, b))
    print(f"{args.questions} questions x {K} samples, T 0.8, {args.batches[0]} rows decoded together; "
          f"the same answer both ways for {same} of {len(a)}")
    for name, ts in rows.items():
        print(f"| {name} | {statistics.median(ts):.1f} s |")


def step_child(args):
    """One process (or one rank): args.steps steps of the ARC recipe at B = args.step rollouts; prints
    RESULT lines (rank 0)."""
    import distributed
    import reinforce
    from chat import Completer
    from data import get_task
    reduced = []
    sum_over_ranks = distributed.sum_over_ranks

    def timed_sum(tensors):  # the all-reduces of a step, timed
        t0 = time.perf_counter()
        out = sum_over_ranks(tensors)
        reduced.append(time.perf_counter() - t0)
        return out
    distributed.sum_over_ranks = timed_sum
    model, tok = load(args.dtype)
    import checkpoints
    path = checkpoints.default_model_dir()
    cfg = reinforce.recipe("arc_easy")
    cfg = dataclasses.replace(cfg, batch_size=args.step, samples=args.samples, rollout_batch=args.batches[0],
                              temperature=0.8 if args.samples > 1 else 0.0, micro_batch=args.micro_batch)
    task = get_task("arc_easy", prompt=cfg.prompt)
    train = task.load("train")
    wrapper = reinforce.make_wrapper(cfg, model, path)
    completer = Completer(model, tok, cfg.max_new_tokens, cfg.temperature, batch_size=cfg.rollout_batch, seed=0)
    for step in range(args.steps):
        wrapper.zero_grad(set_to_none=True)
        batch = reinforce.step_batch(task, train, step, cfg)
        distributed.barrier()
        reduced.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        row = reinforce.rollouts_and_gradient(wrapper, model, tok, completer, task, batch, cfg)
        if not distributed.is_main():
            continue
        print(f"RESULT step_s={time.perf_counter() - t0:.1f} cpu_s={time.process_time() - c0:.1f} "
              f"allreduce_s={sum(reduced):.3f} "
              f"rollout_s={row['rollout_s']:.1f} backward_s={row['backward_s']:.1f} recompose_s={row['recompose_s']:.1f} "
              f"reward={row['reward']:+.3f} answered={row['answered']:.3f} grad_cos={row['grad_cos']} "
              f"mixed={row.get('mixed')} new_tokens={row['new_tokens']} peak_rss_gib={peak_rss_gib():.2f}", flush=True)


def bench_step(args):
    launcher = [sys.executable] if args.ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port", "29571"]
    cmd = launcher + ["-m", "benchmarks.bench_rollouts", "--step-child", "--step", str(args.step),
                      "--steps", str(args.steps), "--dtype", args.dtype, "--samples", str(args.samples),
                      "--batches", str(args.batches[0]), "--micro-batch", str(args.micro_batch)]
    threads = args.threads if args.ranks == 1 else 1
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    rows = [dict(kv.split("=") for kv in line.split()[1:]) for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if not rows:
        raise SystemExit(out.stderr[-3000:])
    for r in rows:
        print(" ".join(f"{k} {v}" for k, v in r.items()))
    med = lambda k: statistics.median(float(r[k]) for r in rows)  # noqa: E731
    print(f"| {args.step} rollouts ({args.step // args.samples} x {args.samples}), {args.dtype}, "
          f"{args.ranks} process(es) x {threads} thread(s) | {med('step_s'):.1f} | {med('rollout_s'):.1f} | "
          f"{med('backward_s'):.1f} | {med('recompose_s'):.1f} | {med('allreduce_s'):.2f} | "
          f"{max(float(r['peak_rss_gib']) for r in rows):.2f} GiB (rank 0) |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--groups", action="store_true")
    ap.add_argument("--step", type=int, default=None, help="rollouts per step of the step to time")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 where this CPU runs it natively, else float32 (chat.auto_dtype)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=1, help="--step under torchrun: processes of one thread each")
    ap.add_argument("--threads", type=int, default=1, help="--step in one process: its threads")
    ap.add_argument("--step-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype == "auto":
        from chat import auto_dtype
        args.dtype = auto_dtype("cpu")[0]
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.dtype}", flush=True)
    if args.step_child:
        import distributed
        distributed.run(step_child, args)  # under torchrun: setup, and the rank's safe exit
    elif args.decode:
        bench_decode(args)
    elif args.groups:
        args.samples = max(args.samples, 2) if args.samples == 1 else args.samples
        bench_groups(args)
    elif args.step:
        bench_step(args)
    else:
        ap.error("choose --decode, --groups or --step B")


if __name__ == "__main__":
    main()
