"""Speed and memory of model.py on the default checkpoint: prefill, decode, forward + backward, and the
bandwidth limit of batch-1 decoding; optionally side by side with Hugging Face transformers.

    python -m benchmarks.bench_model [--model DIR] [--runs 3] [--dtypes float32 bfloat16] [--compare-hf]
                                     [--batches 1 16 64] [--sampled 16]

Every number is the median of --runs runs, and the contenders take turns within each run, so that
a machine whose speed drifts (other jobs, a shared core) favours none of them. Times are CPU time of
this process (time.process_time), so that a core shared with other jobs does not stretch them; run
with one thread (OMP_NUM_THREADS=1, pinned with taskset) for that to hold. Batch-1 decoding reads
every weight once per token, so its ceiling is (weight bytes) / (read bandwidth). We measure that
bandwidth next to each decode run on a float32 buffer as large as the weights, which meets the same
caches the weights do (an L3 of hundreds of MiB may hold a good part of them), read two ways: by
torch.sum (this benchmark's measure before issue 15) and by a matrix-vector product (torch.mv, a
(n/1024, 1024) view times a vector). Either can be the faster on a given run; the limit is the
faster one's rate, the stricter ceiling. Decoding is greedy at --batches and sampled at --sampled
(temperature 0.8 over the whole vocabulary, as the code and math recipes' rollouts are drawn).

--compare-hf needs `transformers`, which is no dependency of this project; install it apart, e.g.
`pip install --target /tmp/hf transformers` and PYTHONPATH=/tmp/hf. It loads the same checkpoint
directory with LlamaForCausalLM (no download) and times its `generate` and forward the same way.
"""

import argparse
import platform
import statistics
import subprocess
import time

import torch

import checkpoints
from chat import peak_rss_gib
from generate import generate
from model import load_model


def seconds(fn):
    """CPU seconds of this process that fn() takes: unlike the wall clock, they do not count the time
    that other jobs on a shared core take, and with one thread they equal it on a free core."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def decode_rate(run, batch, new_tokens=32):
    """Tokens per CPU second of decoding alone, and what run(new_tokens + 1) returned. run(n) generates
    n tokens for each of `batch` rows; the difference of an (n + 1)- and a 1-token generation is n
    decode steps, without the prefill."""
    t0 = time.process_time()
    run(1)
    t1 = time.process_time()
    out = run(new_tokens + 1)
    t2 = time.process_time()
    return batch * new_tokens / ((t2 - t1) - (t1 - t0)), out


def cpu_name():
    """The CPU's model name and whether it has native bfloat16 (AMX, AVX-512-BF16), from lscpu."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx2") if f in info.split()]
    return f"{name} ({', '.join(flags) or 'no avx2'})"


class Ours:
    name = "ours"

    def __init__(self, path, dtype):
        self.model, _ = load_model(path, dtype=dtype)

    def prefill(self, ids):
        self.model(ids, logits_from=-1)

    def generate(self, prompts, n, temperature=0.0):  # no stop tokens: every row makes exactly n tokens
        generate(self.model, prompts, n, temperature, generator=torch.Generator().manual_seed(0))

    def logits(self, ids, last):
        return self.model(ids, logits_from=-last)


class HF:
    name = "HF"

    def __init__(self, path, dtype):
        import transformers
        self.version = transformers.__version__
        self.model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def prefill(self, ids):
        self.model(ids, use_cache=False, logits_to_keep=1)

    def generate(self, prompts, n, temperature=0.0):
        ids = torch.tensor(prompts)  # the benchmark's prompts are all of one length: no padding
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
            dict(do_sample=False)  # top_k=0: the whole vocabulary, as ours samples it
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            pad_token_id=0, **sampling)

    def logits(self, ids, last):
        return self.model(ids, use_cache=False, logits_to_keep=last).logits


def bench(contenders, runs, weight_bytes, batches=(1, 16, 64), sampled=(16,), prompt_len=512, new_tokens=32):
    """{row: {contender: value}} for one dtype; rows of tokens per second, and the bandwidth limit."""
    g = torch.Generator().manual_seed(0)
    vocab = contenders[0].model.config.vocab_size
    prompt = torch.randint(100, vocab, (1, prompt_len), generator=g)
    short = torch.randint(100, vocab, (16,), generator=g).tolist()
    train = torch.randint(100, vocab, (8, 384), generator=g)
    buffer = torch.ones(weight_bytes // 4096 * 1024)  # as many bytes as the weights, to 4 KiB
    matrix, ones = buffer.view(-1, 1024), torch.ones(1024)
    times = {}

    def record(row, who, value):
        times.setdefault(row, {}).setdefault(who, []).append(value)

    def fwd_bwd(c):  # forward + backward of 8 x 384 tokens, log-probabilities of the last 256
        c.model.requires_grad_(True)
        logp = torch.log_softmax(c.logits(train, 256).float(), -1)
        logp.gather(-1, train[:, -256:, None]).sum().backward()
        c.model.zero_grad(set_to_none=True)
        c.model.requires_grad_(False)

    for c in contenders:  # warm-up
        with torch.inference_mode():
            c.generate([short], 2)
    for _ in range(runs):
        for c in contenders:
            with torch.inference_mode():
                record("prefill, 512 tokens", c.name, prompt_len / seconds(lambda: c.prefill(prompt)))
                for batch in batches:
                    rate, _ = decode_rate(lambda n: c.generate([short] * batch, n), batch, new_tokens)
                    record(f"decode, batch {batch}, {new_tokens} tokens", c.name, rate)
                    if batch == 1:
                        # tokens/s at which the weights could stream: reads per second of as many bytes
                        record("bandwidth limit", "mv", 1 / seconds(lambda: torch.mv(matrix, ones)))
                        record("bandwidth limit", "sum", 1 / seconds(buffer.sum))
                for batch in sampled:  # the code and math recipes' rollouts: temperature 0.8, no top-p
                    rate, _ = decode_rate(lambda n: c.generate([short] * batch, n, 0.8), batch, new_tokens)
                    record(f"decode, batch {batch}, {new_tokens} tokens, sampled at T 0.8", c.name, rate)
            row = "forward + backward, (8, 384), logits of the last 256"
            record(row, c.name, 8 * 384 / seconds(lambda: fwd_bwd(c)))
    return {row: {who: statistics.median(v) for who, v in by.items()} for row, by in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64], help="decode batch sizes, greedy")
    ap.add_argument("--sampled", nargs="*", type=int, default=[16], help="decode batch sizes, sampled")
    ap.add_argument("--compare-hf", action="store_true", help="time Hugging Face transformers alongside")
    args = ap.parse_args()
    path = checkpoints.resolve_model(args.model)

    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        contenders = [Ours(path, dtype)] + ([HF(path, dtype)] if args.compare_hf else [])
        # each decoded token reads every weight once; the tied embedding is read as the output head
        weight_bytes = sum(p.numel() * p.element_size() for p in contenders[0].model.parameters())
        res = bench(contenders, args.runs, weight_bytes, args.batches, args.sampled)
        names = [c.name for c in contenders]
        hf = f", transformers {contenders[1].version}" if args.compare_hf else ""
        print(f"\n{name}: weights {weight_bytes / 2**20:.0f} MiB{hf}; tokens per CPU second, medians of {args.runs}")
        print(f"| | {' | '.join(names)} |" + (" ours / HF |" if args.compare_hf else ""))
        print("|---|" + "---|" * (len(names) + args.compare_hf))
        limits = res.pop("bandwidth limit")
        limit = max(limits.values())
        for row, by in res.items():
            cells = [f"{by[n]:.1f}" for n in names]
            if row.startswith("decode, batch 1,"):
                cells = [f"{by[n]:.1f} ({by[n] / limit:.0%} of limit)" for n in names]
            ratio = f" {by['ours'] / by['HF']:.2f}x |" if args.compare_hf else ""
            print(f"| {row} | {' | '.join(cells)} |{ratio}")
        reads = ", ".join(f"torch.{k} {v * weight_bytes / 1e9:.1f} GB/s" for k, v in limits.items())
        print(f"| bandwidth limit, batch 1 | {limit:.1f} tok/s (the faster read of the weights' bytes: {reads}) |")
        del contenders
    print(f"\npeak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
