"""The parts of a decoding step, each in the form model.py uses and the plain form it replaced: the
matrix products (products.matvec against F.linear, over the default model's 211 linears),
attention of one query per row (products.attend against F.scaled_dot_product_attention; on all of
the cache's columns, masked, against a slice of the written ones) and drawing the next tokens
(generate.draw against torch.multinomial, generate.nucleus against a full sort).

    python -m benchmarks.decode_parts [--runs 5] [--batches 1 16 64] [--keys 48 400] [--dtypes float32 bfloat16]

Shapes are the default model's (9 query heads, 3 key/value heads of 64, a 49152-word vocabulary);
the keys are the prompt and the tokens so far (48: an ARC rollout, 400: an MBPP one). Times are
CPU milliseconds per call, medians of --runs, the two forms taking turns; run with one thread
(OMP_NUM_THREADS=1, pinned with taskset) on an otherwise idle core.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_model import cpu_name
from generate import draw, nucleus, nucleus_by_sort
from model import load_model
from products import attend, can_pack, matvec


def ms(fn, calls):
    """CPU milliseconds per call of fn, over `calls` calls after one to warm up."""
    fn()
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e3


def race(forms, runs, calls):
    """{name: median ms} of the forms {name: fn}, taking turns in each of `runs` rounds."""
    times = {name: [] for name in forms}
    for _ in range(runs):
        for name, fn in forms.items():
            times[name].append(ms(fn, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def row(label, res):
    (_, ta), (_, tb) = res.items()  # the plain form's time, then ours
    print(f"| {label} | {ta:.3f} | {tb:.3f} | {ta / tb:.1f}x |")


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--keys", nargs="+", type=int, default=[48, 400])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    g = torch.Generator().manual_seed(0)

    # The products of one token through the real model: its weights meet the caches as decoding's do.
    print("\n| the 211 products of one token (ms a token; GB/s of weights read) | F.linear | products.matvec "
          "| F.linear / matvec |\n|---|---|---|---|")
    for dtype in dtypes:
        model, _ = load_model(dtype=dtype)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        gb = sum(m.weight.numel() * m.weight.element_size() for m in linears) / 1e9
        for B in args.batches:
            xs = {n: torch.randn(B, n, generator=g).to(dtype) for n in {m.in_features for m in linears}}
            res = race({"F.linear": lambda: [m(xs[m.in_features]) for m in linears],
                        "matvec": lambda: [matvec(m, xs[m.in_features]) for m in linears]}, args.runs, 3)
            packed = "packed" if can_pack(dtype) else "not packed"
            row(f"{str(dtype)[6:]}, batch {B} ({packed}; {gb / res['F.linear'] * 1e3:.1f} / "
                f"{gb / res['matvec'] * 1e3:.1f} GB/s)", res)
        del model, linears

    print("\n| attention, one query per row (ms a layer) | SDPA | products.attend | SDPA / attend |\n|---|---|---|---|")
    for dtype in dtypes:
        for B in args.batches:
            for S in args.keys:
                q = torch.randn(B, 9, 64, generator=g).to(dtype)
                k, v = (torch.randn(B, 3, S, 64, generator=g).to(dtype) for _ in range(2))
                res = race({"sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True),
                            "attend": lambda: attend(q, k, v)}, args.runs, 50)
                row(f"{str(dtype)[6:]}, batch {B}, {S} keys", res)

    print("\n| attention on a cache of max_len columns, S written (ms a layer) | a slice of S | all, masked | slice / all |"
          "\n|---|---|---|---|")
    for dtype in dtypes:
        for B in args.batches:
            for S, max_len in ((32, 48), (250, 400)):  # halfway through an ARC and an MBPP rollout
                q = torch.randn(B, 9, 64, generator=g).to(dtype)
                K, V = (torch.randn(B, 3, max_len, 64, generator=g).to(dtype) for _ in range(2))
                mask = (torch.arange(max_len) < S).expand(B, 1, 1, max_len)
                res = race({"slice": lambda: attend(q, K[:, :, :S], V[:, :, :S]),
                            "whole": lambda: attend(q, K, V, mask)}, args.runs, 50)
                row(f"{str(dtype)[6:]}, batch {B}, S {S} of {max_len}", res)

    print("\n| drawing the next tokens (ms a step) | plain | ours | plain / ours |\n|---|---|---|---|")
    for B in args.batches:
        probs = torch.softmax(torch.randn(B, 49152, generator=g) * 3 / 0.8, -1)  # peaked, as a model's are
        row(f"batch {B}: torch.multinomial / generate.draw",
            race({"multinomial": lambda: torch.multinomial(probs, 1, generator=g),
                  "draw": lambda: draw(probs, g)}, args.runs, 5))
        row(f"batch {B}: top-p 0.95, full sort / generate.nucleus",
            race({"sort": lambda: nucleus_by_sort(probs, 0.95), "nucleus": lambda: nucleus(probs, 0.95)}, args.runs, 5))


if __name__ == "__main__":
    main()
