"""What a training step holds at its peak, measured part by part on the CPU, against the step's peak.

    OMP_NUM_THREADS=1 python -m benchmarks.memory_budget --task arc --rollouts 16

Each part is the growth of the resident memory (chat.rss_gib, after chat.release_freed_memory) as
it is made, or, for what lives only inside a phase, that phase's own peak (chat.reset_peak_rss)
above what was resident before it: the libraries, the weights, the SVF factors, W', the rollouts'
decoding (KV cache and the rest), and one micro-batch's forward and backward (activations, a logits
chunk, W'.grad). The same step then runs whole (objectives.rollouts_and_gradient), and its peak is
set against the parts that are alive together at that peak. benchmarks/memory_plan.py is the plan
on paper for GPUs; this is the measurement on one CPU.
"""

import argparse

import torch

from chat import (Completer, MAX_NEW_TOKENS, add_model_arguments, load, peak_rss_since_reset_gib,
                  release_freed_memory, reset_peak_rss, rss_gib)

MiB = 2**20


def now():
    release_freed_memory()
    return rss_gib() * 1024  # MiB


def phase_peak(fn):
    """(fn's result, its peak above the resident memory before it, what it left resident), MiB."""
    before = now()
    reset_peak_rss()
    out = fn()
    return out, peak_rss_since_reset_gib() * 1024 - before, now() - before


def main(argv=None):
    import objectives
    import reinforce
    import svf
    from data import get_task
    from logprobs import token_logprobs
    from recipes import recipe, step_batch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap, batch_size=16, batch_help="unused")
    ap.add_argument("--task", default="arc")
    ap.add_argument("--rollouts", type=int, default=16)
    args = ap.parse_args(argv)
    rows = []
    base = now()
    rows.append(("torch, libraries, Python", base, None))
    model, tok, model_dir = load(args)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / MiB
    rows.append(("weights", now() - base, params))
    base = now()
    wrapper = svf.SVF(model, svf.checkpoint_identity(model_dir), "mlp", log=lambda *a: None)
    factors = sum(t.numel() * t.element_size() for f in wrapper.factors for t in (f.U, f.sigma, f.Vh)) / MiB
    rows.append(("SVF factors (U, sigma, Vh of the MLP)", now() - base, factors))
    base = now()
    weights = wrapper.weights()
    w_bytes = sum(w.numel() * w.element_size() for w in weights.values()) / MiB
    rows.append(("W' (recomposed MLP, with its graph to p)", now() - base, w_bytes))

    task = get_task(args.task, data_dir=args.data_dir)
    cfg = recipe(task.name)
    task = get_task(task.name, prompt=cfg.prompt, data_dir=args.data_dir)
    cfg.batch_size = cfg.rollout_batch = args.rollouts
    batch = step_batch(task, task.load("train"), 0, cfg)
    max_new = cfg.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 256)
    completer = Completer(model, tok, max_new, cfg.temperature, batch_size=args.rollouts, seed=0)
    prompts = [completer.encode(ex.messages) for ex in batch[::cfg.samples]]
    with wrapper.applied(weights={k: w.detach() for k, w in weights.items()}):
        completions, decode_peak, _ = phase_peak(lambda: completer.generate_ids(prompts, samples=cfg.samples,
                                                                                 keep_stop=True))
    c = model.config
    longest = max(map(len, prompts)) + max_new
    kv = 2 * c.num_hidden_layers * args.rollouts * c.num_key_value_heads * longest * c.head_dim * 2 / MiB
    rows.append((f"decoding {args.rollouts} rollouts: its peak above the resident (KV cache {kv:.0f} MiB "
                 f"at most, packed W', logits)", decode_peak, kv))

    # one micro-batch, the longest of the step's rollouts, forward and backward into W'
    prompts = [p for p in prompts for _ in range(cfg.samples)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]) - len(completions[i]))
    ps, cs = [prompts[i] for i in order], [completions[i] for i in order]
    sl, checkpoint = next(objectives.micro_batches(ps, cs, cfg.micro_batch))
    leaves = {k: w.detach().requires_grad_() for k, w in weights.items()}

    def micro_batch():
        forward = lambda ids, mask, **kw: torch.func.functional_call(model, leaves, (ids, mask), kw)  # noqa: E731
        logp, mask = token_logprobs(model, ps[sl], cs[sl], tok.pad_id, forward, checkpoint=checkpoint)
        (-logp.sum()).backward()
    tokens = sum(len(p) + len(q) for p, q in zip(ps[sl], cs[sl]))
    _, mb_peak, kept = phase_peak(micro_batch)
    rows.append((f"one micro-batch of {sl.stop} sequences, {tokens} tokens: forward and backward's peak "
                 "(activations, a logits chunk, W'.grad)", mb_peak, None))
    rows.append(("  of which W'.grad, left after it", kept, w_bytes))
    for leaf in leaves.values():
        leaf.grad = None
    del leaves, weights  # the step makes its own W'

    # the step's backward alone: both halves' micro-batches into W'.grad, then through the
    # recomposition to p (objectives.policy_gradient_step), with the step's own W'
    new_weights = wrapper.weights()
    rewards = [1.0 if i % 3 else -1.0 for i in range(len(prompts))]  # no baseline: every rollout counts
    cfg.baseline = False
    _, bw_peak, _ = phase_peak(lambda: objectives.policy_gradient_step(wrapper, model, prompts, completions, rewards,
                                                                      cfg, tok.pad_id, weights=new_weights))
    rows.append(("the step's backward, both halves, all micro-batches, and to p", bw_peak, None))
    for p in wrapper.parameters():
        p.grad = None
    del new_weights

    # the whole step, as reinforce.py runs it
    resident = now()
    reset_peak_rss()
    reinforce.rollouts_and_gradient(wrapper, model, tok, completer, task, batch, cfg)
    step_peak = peak_rss_since_reset_gib() * 1024
    print(f"| part | measured (MiB) | its tensors' bytes (MiB) |\n|---|---|---|")
    for name, measured, computed in rows:
        print(f"| {name} | {measured:.0f} | {'' if computed is None else f'{computed:.0f}'} |")
    fixed = sum(m for _, m, _ in rows[:4])
    alive = fixed + max(decode_peak, bw_peak)
    print(f"\nresident before the step {resident:.0f} MiB; the step's peak {step_peak:.0f} MiB; "
          f"the parts alive at the peak (libraries, weights, factors, W', the larger of decoding's "
          f"peak and the backward's) {alive:.0f} MiB, {alive / step_peak:.0%} of it")


if __name__ == "__main__":
    main()
