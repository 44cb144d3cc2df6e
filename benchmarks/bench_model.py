"""Speed and memory of model.py on the default checkpoint: prefill, decode, and the bandwidth limit.

    python -m benchmarks.bench_model [--model DIR] [--runs 5] [--dtypes float32 bfloat16]

Every number is the median of --runs runs. Batch-1 decoding reads every weight once per token, so its
ceiling is (weight bytes) / (memory read bandwidth); we measure that bandwidth with a large
reduction over a buffer much bigger than the caches and print the ceiling next to the measurement.
"""

import argparse
import resource
import statistics
import time

import torch

from model import generate, load_model


def median_time(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(runs, gib=1.0):
    """Bytes per second that a sum over a `gib`-GiB float32 buffer reads, median of runs."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()  # touch the pages once
    return x.numel() * 4 / median_time(lambda: x.sum(), runs)


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@torch.inference_mode()
def bench(model, runs, prompt_len=512, new_tokens=32):
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(100, vocab, (prompt_len,), generator=g).tolist()
    short = torch.randint(100, vocab, (16,), generator=g).tolist()
    generate(model, [short], 4)  # warm-up
    # prefill as generation does it: the whole prompt through the model, logits of the last position
    prefill = median_time(lambda: model(torch.tensor([prompt]), logits_from=-1), runs)
    out = {"prefill tok/s (512)": prompt_len / prefill}
    for batch in (1, 16):
        prompts = [short] * batch
        # with no stop tokens every row produces exactly max_new_tokens tokens; the difference of a
        # (new_tokens + 1)-token and a 1-token generation is new_tokens decode steps, sampling included
        t_one = median_time(lambda: generate(model, prompts, 1), runs)
        t_all = median_time(lambda: generate(model, prompts, new_tokens + 1), runs)
        out[f"decode tok/s (batch {batch})"] = batch * new_tokens / (t_all - t_one)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()

    bw = read_bandwidth(args.runs)
    print(f"threads {torch.get_num_threads()}, measured read bandwidth {bw / 1e9:.1f} GB/s")
    for name in args.dtypes:
        model, config = load_model(args.model, dtype=getattr(torch, name))
        # each decoded token reads every weight once; the tied embedding is read as the output head
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        res = bench(model, args.runs)
        print(f"{name}: weights {weight_bytes / 2**20:.0f} MiB, "
              f"bandwidth limit at batch 1 {bw / weight_bytes:.1f} tok/s")
        for k, v in res.items():
            print(f"  {k:24s} {v:8.1f}")
        del model
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
