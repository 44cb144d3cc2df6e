"""Encoding speed of each tokenizer family on ~1 MB of text, beside Hugging Face `tokenizers`.

    python -m benchmarks.bench_tokenizer [--mb 1] [--rounds 3] [--reference]
    PYTHONPATH=/tmp/hftok python -m benchmarks.bench_tokenizer   # with HF installed apart

The text: GSM8K's training questions and answers (from $T2_DATA_DIR or ../shared/data), else the
README repeated, cut to --mb megabytes of UTF-8. The tokenizers: SmolLM2 (the default model) and
every folder of ../shared/tokenizers. For each, the best of --rounds encodes of the whole text as
one string, in tokens per second. Where `tokenizers` imports (it is never a
project dependency: install it apart, e.g. `pip install --target /tmp/hftok tokenizers`), the same
text through Hugging Face's `Tokenizer.from_file(...).encode(text, add_special_tokens=False)`,
and whether the ids are the same.

--reference checks what spm_bpe.py's docstring reports for the SentencePiece-style tokenizers,
whose tiktoken replay is exact by measurement: their ids against spm_bpe's reference_encode (the
merges list applied plainly) on texts made to stress the replay, and reference_encode's own speed
on the first 20 kB of the text.

Other jobs on the machine slow every tokenizer alike; the CPU and the load average are printed.
"""

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_model import cpu_name  # noqa: E402
from spm_bpe import SPACE  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared")


def bench_text(mb):
    data_dir = os.environ.get("T2_DATA_DIR", os.path.join(SHARED, "data"))
    path = os.path.join(data_dir, "gsm8k", "train.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        text, source = "\n\n".join(f"{r['question']}\n{r['answer']}" for r in rows), path
    else:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text, source = f.read(), "README.md"
    size = int(mb * 1e6)
    while len(text.encode()) < size:
        text += "\n\n" + text
    return text.encode()[:size].decode("utf-8", errors="ignore"), source


def best_of(rounds, fn, before=lambda: None):
    best, out = float("inf"), None
    for _ in range(rounds):
        before()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def stress_texts(spm):
    """Every vocabulary token as text, runs of one character, and random mixes."""
    texts = [t.replace(SPACE, " ") for t in spm.vocab if not t.startswith("<")]
    texts += [c * n for c in " \t\n-=_*#/.!,~0a中é" for n in range(1, 70)]
    rng = random.Random(0)
    alphabet = list(" \t\nabcdeé中-=_.,!0123*#") + ["🙂", "ｆ"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(20000)]
    return texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reference", action="store_true",
                    help="SentencePiece-style: compare with spm_bpe's reference_encode on stress texts")
    args = ap.parse_args()
    try:
        import tokenizers as hf
    except ImportError:
        hf = None
    text, source = bench_text(args.mb)
    print(f"CPU: {cpu_name()}; load average {os.getloadavg()[0]:.2f}; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"text: {len(text.encode()) / 1e6:.2f} MB from {source}; best of {args.rounds}; "
          f"Hugging Face tokenizers: {hf.__version__ if hf else 'not importable, left out'}")
    import checkpoints
    folders = [("SmolLM2", checkpoints.default_model_dir())]
    tok_dir = os.path.join(SHARED, "tokenizers")
    if os.path.isdir(tok_dir):
        folders += [(d, os.path.join(tok_dir, d)) for d in sorted(os.listdir(tok_dir))
                    if os.path.exists(os.path.join(tok_dir, d, "tokenizer.json"))]
    else:
        print(f"({tok_dir} is absent: SmolLM2 only)")
    print(f"{'tokenizer':24} {'tokens':>9} {'ours tok/s':>12} {'HF tok/s':>12}  same ids")
    for name, path in folders:
        tok = Tokenizer.from_dir(path)
        t, ids = best_of(args.rounds, lambda: tok.encode(text))
        ref_rate, same = "", ""
        if hf:
            ref = hf.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            t_ref, enc = best_of(args.rounds, lambda: ref.encode(text, add_special_tokens=False))
            ref_rate, same = f"{len(enc.ids) / t_ref:12,.0f}", "yes" if enc.ids == ids else "NO"
        print(f"{name:24} {len(ids):9,} {len(ids) / t:12,.0f} {ref_rate:>12}  {same}")
        if args.reference and tok.spm is not None:
            part = text.encode()[:20_000].decode(errors="ignore")
            t, rids = best_of(1, lambda: tok.spm.reference_encode(part))
            stress = stress_texts(tok.spm)
            differ = sum(tok.encode(s) != tok.spm.reference_encode(s) for s in stress)
            print(f"{'  reference_encode':24} {len(rids):9,} {len(rids) / t:12,.0f} {'':>12}  "
                  f"{'yes' if rids == tok.encode(part) else 'NO'} (20 kB); {differ} of {len(stress):,} "
                  f"stress texts differ")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
