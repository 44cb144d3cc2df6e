"""The shipped ARC recipe's REINFORCE step, old code against new, and the MBPP recipe's peak memory.

    python -m benchmarks.bench_step [--old main] [--steps 5] [--dtypes float32 bfloat16]
    python -m benchmarks.bench_step --memory [--old main] [--micro-batch 8]

A step is what reinforce.py's train() does before the optimizer's step, for the recipe of
experts/arc.safetensors (reinforce.RECIPES): recompose W', generate the rollouts of its batch of ARC-Easy training
questions (prompt `first`, options shuffled, 32 new tokens, greedy, `mlp` targets), score them, and
the policy-gradient backward (micro-batches of 8, baseline) through W' to p. The old code is the
repository's modules at git revision --old, extracted into a temporary directory and imported beside
the working tree's; the two take turns on the same batches (train()'s batches of steps 0, 1, ...),
from the same initial expert, and the medians are printed. With --dtypes bfloat16 the new code also
runs the step on a bfloat16 model.

--memory runs one micro-batch of the MBPP recipe's backward in a fresh process per code version
(peaks do not mix) and prints its peak RSS: 8 real MBPP training prompts (prompt `tests`), each
with a synthetic completion of 320 random tokens, the recipe's budget (the worst case, every answer
running to the end).
"""

import argparse
import contextlib
import importlib
import inspect
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

from benchmarks.bench_model import cpu_name, peak_rss_gib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_world(root):
    """The project's modules (the .py files at the top of `root`) as they are in directory `root`,
    imported apart from sys.modules' own: {name: module} of those reinforce.py needs, with theirs."""
    names = {f[:-3] for d in (root, ROOT) for f in os.listdir(d) if f.endswith(".py")}
    kept = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, root)
    try:
        for n in ("checkpoints", "model", "tokenizer", "chat", "reinforce"):
            importlib.import_module(n)
        return {n: sys.modules[n] for n in names if n in sys.modules}
    finally:
        sys.path.remove(root)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(kept)


@contextlib.contextmanager
def old_tree(rev):
    """A temporary directory holding the repository's files at git revision `rev`."""
    with tempfile.TemporaryDirectory() as d:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=True).stdout
        path = os.path.join(d, "tree.tar")
        with open(path, "wb") as f:
            f.write(archive)
        with tarfile.open(path) as t:
            t.extractall(d, filter="data")
        yield d


class Contender:
    """One code version (its modules, `w`) and dtype, with its own model, expert and completer."""

    def __init__(self, name, w, dtype):
        from data import get_task
        self.name, self.w = name, w
        self.cfg = w["reinforce"].recipe("arc")  # the shipped ARC expert's recipe
        path = w["checkpoints"].default_model_dir()
        self.model, _ = w["model"].load_model(path, dtype=dtype)
        self.tok = w["tokenizer"].Tokenizer.from_dir(path)
        self.task = get_task("arc", prompt=self.cfg.prompt)
        self.wrapper = w["reinforce"].make_wrapper(self.cfg, self.model, path)
        self.completer = w["chat"].Completer(self.model, self.tok, self.cfg.max_new_tokens, 0.0,
                                             batch_size=self.cfg.batch_size)

    def step(self, batch):
        """train()'s step before the optimizer's: returns its log row, with the whole step's time."""
        self.wrapper.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        step = self.w["reinforce"].rollouts_and_gradient
        if "prompts" in inspect.signature(step).parameters:  # an older tree's signature
            prompts = [self.completer.encode(ex.messages) for ex in batch]
            row = step(self.wrapper, self.model, self.tok, self.completer, self.task, batch, prompts, self.cfg)
        else:
            row = step(self.wrapper, self.model, self.tok, self.completer, self.task, batch, self.cfg)
        return dict(row, step_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)


def bench_steps(args):
    from data import get_task
    task = get_task("arc", prompt="first")
    train = task.load("train")
    reinforce = import_world(ROOT)["reinforce"]
    with old_tree(args.old) as old_root:
        contenders = [Contender(f"old ({args.old}), float32", import_world(old_root), torch.float32)]
        new = import_world(ROOT)
        contenders += [Contender(f"new, {d}", new, getattr(torch, d)) for d in args.dtypes]
        rows = {c.name: [] for c in contenders}
        cfg = contenders[-1].cfg
        for step in range(args.steps):
            rng = random.Random(cfg.seed * 100003 + step)  # as train() draws the batches and option orders
            questions = reinforce.batch_indices(len(train), step, cfg.batch_size, cfg.seed)
            batch = [task.shuffled(train[i], rng) for i in questions]
            for c in contenders:
                row = c.step(batch)
                rows[c.name].append(row)
                print(f"step {step} {c.name:24s} CPU {row['cpu_s']:6.1f}s, wall {row['step_s']:6.1f}s (rollout {row['rollout_s']:.1f}, backward "
                      f"{row['backward_s']:.1f}, recompose {row['recompose_s']:.1f}) reward {row['reward']:+.3f} "
                      f"new tokens {row['new_tokens']}", flush=True)
    print(f"\nCPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of "
          f"{args.steps} steps, seconds: CPU time of this process (process_time; the core may be shared with other "
          f"jobs, which stretch the wall-clock times), wall-clock, and the wall-clock time of each part; "
          f"the ratios are medians of each step's new / old")
    print("| code | step, CPU | step / old, CPU | step, wall | step / old, wall | rollouts | backward | recomposition |")
    print("|---|---|---|---|---|---|---|---|")
    median = lambda rs, k: statistics.median(r[k] for r in rs)
    old = rows[contenders[0].name]
    ratio = lambda rs, k: statistics.median(r[k] / o[k] for r, o in zip(rs, old))  # of each step's pair
    for name, rs in rows.items():
        print(f"| {name} | {median(rs, 'cpu_s'):.1f} | {ratio(rs, 'cpu_s'):.2f} | "
              f"{median(rs, 'step_s'):.1f} | {ratio(rs, 'step_s'):.2f} | "
              f"{median(rs, 'rollout_s'):.1f} | {median(rs, 'backward_s'):.1f} | {median(rs, 'recompose_s'):.1f} |")
    same = all(r["new_tokens"] == o["new_tokens"] and r["reward"] == o["reward"]
               for r, o in zip(rows[contenders[1].name], rows[contenders[0].name]))
    print(f"float32 rollouts of old and new: {'the same' if same else 'DIFFERENT'} rewards and lengths at every step")


def memory_child(root, micro_batch):
    """One backward of the MBPP recipe in this process; prints the peak RSS."""
    from data import get_task
    w = import_world(root)
    path = w["checkpoints"].default_model_dir()
    model, config = w["model"].load_model(path)
    tok = w["tokenizer"].Tokenizer.from_dir(path)
    reinforce = w["reinforce"]
    cfg = reinforce.recipe("mbpp")
    cfg.baseline, cfg.batch_size, cfg.micro_batch = True, micro_batch, micro_batch  # as RESULTS.md's MBPP run
    wrapper = reinforce.make_wrapper(cfg, model, path)
    task = get_task("mbpp")
    train = task.load("train")
    completer = w["chat"].Completer(model, tok, 320)
    prompts = [completer.encode(train[i].messages) for i in reinforce.batch_indices(len(train), 0, micro_batch, 0)]
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(100, config.vocab_size, (320,), generator=g).tolist() for _ in prompts]
    rewards = [1.0 if i % 2 else -1.0 for i in range(len(prompts))]  # with the baseline every advantage is +-1
    before = peak_rss_gib()
    t0, c0 = time.perf_counter(), time.process_time()
    reinforce.policy_gradient_step(wrapper, model, prompts, completions, rewards, cfg, tok.pad_id)
    print(f"RESULT peak_rss_gib={peak_rss_gib():.2f} before_gib={before:.2f} cpu_seconds={time.process_time() - c0:.1f} "
          f"wall_seconds={time.perf_counter() - t0:.1f} tokens={sum(map(len, prompts)) + 320 * len(prompts)}")


def bench_memory(args):
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; MBPP backward, micro-batch {args.micro_batch}, "
          f"completions of 320 synthetic tokens")
    with old_tree(args.old) as old_root:
        for name, root in ((f"old ({args.old})", old_root), ("new", ROOT)):
            out = subprocess.run([sys.executable, "-m", "benchmarks.bench_step", "--memory-child", root,
                                  "--micro-batch", str(args.micro_batch)], cwd=ROOT, capture_output=True, text=True)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), out.stderr[-2000:])
            print(f"{name:14s} {line}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="main", help="git revision of the old code (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5, help="batches, each run by every contender")
    ap.add_argument("--dtypes", nargs="+", default=["float32"], help="dtypes of the new code's runs")
    ap.add_argument("--memory", action="store_true", help="peak RSS of the MBPP recipe's backward instead")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.micro_batch)
    elif args.memory:
        bench_memory(args)
    else:
        bench_steps(args)


if __name__ == "__main__":
    main()
