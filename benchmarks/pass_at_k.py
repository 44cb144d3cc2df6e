"""How much learning signal do sampled rollouts carry? pass@k of the base model (or an expert) on a split.

    python -m benchmarks.pass_at_k --task mbpp --split train --questions 32 --samples 8 --temperature 0.8
    python -m benchmarks.pass_at_k --task gsm8k --split train --questions 32 --samples 8 --max-difficulty 2

REINFORCE with a per-question ("group") baseline learns only from questions whose K samples score
differently: a group that is all right or all wrong has advantage 0 everywhere and adds nothing to
the gradient (reinforce.py leaves it out). So a recipe's K, temperature and token budget are chosen
by two numbers measured here on the *training* split: the share of groups with mixed outcomes, and
pass@k, the chance that at least one of k samples is right (the unbiased estimator of Chen et al.
2021, from K >= k samples per question). Greedy accuracy on the same questions is printed beside them.

Each question's K samples are drawn in one batch, so rows of a question are consecutive as in
training; the questions are a seeded random draw from the split (after --max-difficulty, where the
task defines a difficulty: GSM8K's number of calculator steps, data/gsm8k.py).
"""

import argparse
import json
import math
import random
import subprocess
import time

import torch

from chat import MAX_NEW_TOKENS, Completer, add_model_arguments, load
from data import get_task, wilson_interval


def pass_at_k(n, c, k):
    """Chance that at least one of k samples drawn without replacement from n, c of them right, is right."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in out]
    return f"{model} ({', '.join(flags) or 'no native bfloat16'})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--task", required=True)
    ap.add_argument("--prompt", default=None, help="the task's prompt variant (default: the task's default)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8, help="K samples per question")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: per task (chat.MAX_NEW_TOKENS)")
    ap.add_argument("--max-difficulty", type=int, default=None, help="keep questions of at most this difficulty")
    ap.add_argument("--expert", default=None, help="an SVF expert file to apply")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write every sample and its score to this JSON file")
    args = ap.parse_args(argv)

    task = get_task(args.task, prompt=args.prompt, data_dir=args.data_dir)
    examples = task.load(args.split)
    if args.max_difficulty is not None:
        examples = [ex for ex in examples if task.difficulty(ex) <= args.max_difficulty]
    examples = random.Random(args.seed).sample(examples, min(args.questions, len(examples)))
    model, tok, model_dir = load(args)
    max_new = args.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 256)
    K = args.samples
    sampler = Completer(model, tok, max_new, args.temperature, args.top_p, batch_size=max(K, args.batch_size // K * K),
                        seed=args.seed)
    greedy = Completer(model, tok, max_new, 0.0, batch_size=args.batch_size)
    context = torch.no_grad()
    if args.expert:
        import svf
        wrapper, expert = svf.load_expert_for(model, model_dir, args.expert)
        context = wrapper.applied(wrapper.scales(expert.p))
    t0 = time.perf_counter()
    with context:
        prompts = [sampler.encode(ex.messages) for ex in examples]
        sampled = [tok.decode(ids) for ids in sampler.generate_ids([p for p in prompts for _ in range(K)])]
        t_sampled = time.perf_counter() - t0
        right = task.score_many([ex for ex in examples for _ in range(K)], sampled)
        first = [tok.decode(ids) for ids in greedy.generate_ids(prompts)]
        greedy_right = task.score_many(examples, first)
    counts = [sum(right[i * K:(i + 1) * K]) for i in range(len(examples))]
    n = len(examples)
    mixed = sum(0 < c < K for c in counts)
    lo, hi = wilson_interval(sum(right), n * K)
    print(f"{task.name}/{args.split} prompt={task.prompt}, {n} questions x {K} samples at T={args.temperature}, "
          f"top-p {args.top_p}, {max_new} new tokens{'' if args.expert is None else ', expert ' + args.expert}"
          f"{'' if args.max_difficulty is None else f', difficulty <= {args.max_difficulty}'}")
    print(f"  samples right        {sum(right)}/{n * K} = {sum(right) / (n * K):.1%} (95% CI {lo:.1%}-{hi:.1%})")
    for k in sorted({1, 2, 4, K}):
        if k <= K:
            print(f"  pass@{k:<3d}             {sum(pass_at_k(K, c, k) for c in counts) / n:.1%}")
    print(f"  mixed groups         {mixed}/{n} (the questions that give a gradient under a group baseline)")
    print(f"  right per question   {sorted(counts, reverse=True)}")
    print(f"  greedy               {sum(greedy_right)}/{n}")
    print(f"  time                 {t_sampled:.0f}s for {n * K} samples, "
          f"{sum(len(tok.encode(s)) for s in sampled) / (n * K):.0f} tokens each on average; {cpu_name()}, "
          f"{torch.get_num_threads()} threads")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(vars(args), counts=counts, greedy=greedy_right,
                           samples=[dict(id=ex.id, output=out, right=r) for ex, out, r in
                                    zip([ex for ex in examples for _ in range(K)], sampled, right)]), f, indent=1)


if __name__ == "__main__":
    main()
