"""Throughput of the sandbox: all 974 MBPP and 164 HumanEval canonical programs, run by an old
sandbox (by default the one before issue 29, in its two modes) and by this one in each of its modes
(bwrap, namespaces, guard), alternating, in one run.

    python -m benchmarks.bench_sandbox [--rounds 1] [--old-ref ff5fe67] [--workers N] [--data-dir DIR]

Prints, for each round and each path, how many programs passed and the seconds they took (the
programs of one task are run by run_many, `workers` at a time, as the code tasks score them), the
cost per program of each path, and the CPU: lscpu's model name and whether it has amx_bf16 and
avx512_bf16. The old paths are `git show REF:data/sandbox.py` and its child, imported from a
temporary directory; they are left out, saying so, where git or REF is missing. Other jobs on the
machine slow every path alike; the load average is printed before and after.
"""

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time

from data import add_data_dir_argument, get_task
from data import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def canonical_programs(data_dir):
    """{task name: the test programs of its canonical solutions}, as score_many assembles them."""
    mbpp = get_task("mbpp", data_dir=data_dir)
    humaneval = get_task("humaneval", prompt="complete", data_dir=data_dir)
    programs = {}
    for task, examples in [(mbpp, [mbpp.example(r) for r in mbpp.read("mbpp/mbpp.jsonl")]),
                           (humaneval, humaneval.load("test"))]:
        programs[task.name] = [task.program(ex, task.extract(ex.answer, ex)) for ex in examples]
    return programs


def old_sandbox(ref, directory):
    """main's data/sandbox.py (and its child), as a module; None with a reason where it cannot be had."""
    for name in ["sandbox.py", "_sandbox_child.py"]:
        shown = subprocess.run(["git", "show", f"{ref}:data/{name}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode != 0:
            return None, f"git show {ref}:data/{name} failed: {shown.stderr.strip()}"
        with open(os.path.join(directory, name), "w") as f:
            f.write(shown.stdout)
    spec = importlib.util.spec_from_file_location("old_sandbox", os.path.join(directory, "sandbox.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


def cpu():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    model = fields.get("Model name", platform.processor() or "unknown").strip()
    flags = fields.get("Flags", "").split()
    return f"{model}; amx_bf16: {'amx_bf16' in flags}; avx512_bf16: {'avx512_bf16' in flags}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="how many times to run each path (alternating)")
    ap.add_argument("--old-ref", default="ff5fe67", help="the git revision whose data/sandbox.py is the old path "
                    "(default: main before issue 29)")
    ap.add_argument("--workers", type=int, default=None, help="programs at a time (default: one per CPU)")
    add_data_dir_argument(ap)
    args = ap.parse_args()

    programs = canonical_programs(args.data_dir)
    print(f"CPU: {cpu()}; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as directory:
        old, why = old_sandbox(args.old_ref, directory)
        skipped = [f"old: {why}"] if old is None else []
        paths = []
        for mode in ("guard", "namespaces") if old is not None else ():
            if mode == "guard" or old.namespaces_problem() is None:
                paths.append((f"old {mode}", lambda s, mode=mode: old.run_many(s, workers=args.workers, mode=mode)))
        for mode in sandbox.MODES:
            problem = sandbox.mode_problem(mode)
            if problem:
                skipped.append(f"{mode}: {problem}")
            else:
                paths.append((mode, lambda s, mode=mode: sandbox.run_many(s, workers=args.workers, mode=mode)))
        for why in skipped:
            print(f"left out: {why}")
        totals = {name: 0.0 for name, _ in paths}
        for round_ in range(1, args.rounds + 1):
            for name, run_many in paths:
                cells = []
                for task, sources in programs.items():
                    start = time.perf_counter()
                    passed = sum(r.passed for r in run_many(sources))
                    seconds = time.perf_counter() - start
                    totals[name] += seconds
                    cells.append(f"{task} {passed}/{len(sources)} in {seconds:5.1f} s")
                print(f"round {round_}  {name:14s}  " + "  ".join(cells), flush=True)
    n = sum(len(sources) for sources in programs.values())
    for name, seconds in totals.items():
        per_round = seconds / args.rounds
        print(f"{name:14s} {per_round:6.1f} s per round, {1000 * per_round / n:5.1f} ms per program")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
