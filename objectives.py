"""The two objectives an expert is trained with, side by side: Transformer-Squared eq. 1 and Table 4.

- `rl` (rollouts_and_gradient: rollouts, rewards_of, policy_gradient_step): REINFORCE on the task's
  reward, the paper's eq. 1 (reinforce.py's docstring has J and the simplifications). For B
  rollouts y_hat with rewards r_i = +1 or -1:

      loss = -(1/B) sum_i r_i * sum_t log pi_{W'}(y_hat_i,t | x_i, y_hat_i,<t)  +  lambda * (1/B) sum_i KL_i

  where KL_i = sum_t KL(pi_{W'}(. | x_i, y_hat_i,<t) || pi_W(. | ...)) is the KL between the two
  models' distributions of whole answers (chain rule), estimated at the answer generated: a sum
  over its tokens, as the policy term is. (A mean over all tokens would weigh lambda 1/L as much,
  L the mean answer length.) With --baseline, r_i less the mean reward of its half of the batch (each
  half its own, advantages), or of its question's K samples.
- `nll` (nll_step): next-token prediction of the reference answer, the objective of the paper's LoRA
  baseline (Table 1) and of Table 4's "SVF + next-token prediction" row:

      loss = -(1 / N) sum_i sum_t log pi_{W'}(y*_i,t | x_i, y*_i,<t),   N = sum_i |y*_i|

  y*_i is the reference completion of question i in the prompt's answer format
  (task.reference_completion, data/), then the end-of-turn token, so that the model also learns
  to stop where the answer ends. The mean is per token over every reference token of the batch, as
  supervised fine-tuning usually takes it (Hugging Face's causal-LM loss), so a long answer weighs
  more than a short one. No rollouts: the batch is the same training questions RL would see.

Both accumulate the gradient into the wrapper's parameters (SVF's p, lora.py's A and B) in the same
way (backward_through_weights), with `python reinforce.py --objective rl|nll --method svf|lora`.
"""

import time

import torch

import distributed
from chat import completion_ids, release_freed_memory
from logprobs import token_logprobs


def backward_through_weights(wrapper, model, runs, weights=None, reduce=None, aside=False):
    """Calls each run(forward) of `runs`, which runs micro-batches' forward and backward passes with
    `forward(ids, mask, **kw)`, and carries their gradient to the wrapper's parameters.
    Returns (the runs' results, the cosine between the first two runs' gradients of the parameters
    or None, t_backward, t_recomp).

    The adapted weights W' (`weights`, from wrapper.weights(), when the caller has them: reinforce.py
    makes them once per step, for the rollouts and this) keep their graph to the parameters and
    are cut off as leaves: each micro-batch's backward stops at W' and adds into W'.grad, and a
    backward per run carries its sum through the recomposition (SVF) or W + (alpha/r) B A (LoRA) to
    the parameters. This bounds memory by the micro-batch and forms W' only once per step.

    Two runs (the two halves of a batch) give two independent estimates of the same gradient: their
    cosine says whether a step is signal (near 1) or noise (near 0). It costs one more backward
    through the recomposition; the gradient is their sum, as from one run. `reduce` (torchrun:
    distributed.sum_over_ranks) sums each run's gradient over the processes before that.

    `aside`: a run may call forward.backward_aside(term) for a term the cosine should not see
    (policy_gradient_step's KL term, whose gradient both halves share and which made the cosine read
    +0.57 on random rewards at kl 30): its backward (graph retained) goes into a W' gradient of its
    own, carried to the parameters on its own and added to the gradient, but left out of the cosine. Every process must
    pass the same `aside` (its gradients are summed over them whether a run set any aside or not).
    """
    t0 = time.perf_counter()
    weights = wrapper.weights() if weights is None else weights  # {name: W'} with a graph back to the parameters
    leaves = {k: w.detach().requires_grad_() for k, w in weights.items()}
    params = list(wrapper.parameters())
    t_recomp = time.perf_counter() - t0

    def forward(ids, mask, **kwargs):
        return torch.func.functional_call(model, leaves, (ids, mask), kwargs)

    set_aside = {}  # {name: W'.grad} of the current run's terms kept out of the cosine

    def backward_aside(term):
        kept = {k: leaf.grad for k, leaf in leaves.items()}  # the run's other terms so far
        for leaf in leaves.values():
            leaf.grad = None
        term.backward(retain_graph=True)  # the caller's own backward of the rest follows
        for k, leaf in leaves.items():
            if leaf.grad is not None:
                set_aside[k] = leaf.grad if k not in set_aside else set_aside[k].add_(leaf.grad)
            leaf.grad = kept[k]
    forward.backward_aside = backward_aside

    def to_params(w_grads, retain):  # {name: W'.grad} -> the parameters' gradients, through W' = f(p)
        names = list(w_grads)  # a run of no rows adds nothing
        g = torch.autograd.grad([weights[k] for k in names], params, [w_grads[k] for k in names],
                                retain_graph=retain, allow_unused=True) if names else [None] * len(params)
        return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]

    results, grads, asides, t_backward = [], [], [], 0.0
    for i, run in enumerate(runs):
        t0 = time.perf_counter()
        results.append(run(forward))
        t_backward += time.perf_counter() - t0
        t0 = time.perf_counter()
        last = i == len(runs) - 1
        grads.append(to_params({k: leaves[k].grad for k in weights if leaves[k].grad is not None}, not last or aside))
        if aside:
            asides.append(to_params(dict(set_aside), not last))
        if reduce is not None:  # every process calls it for every run, rows or none: it is a collective
            reduce(grads[-1] + (asides[-1] if aside else []))  # in place
        for leaf in leaves.values():
            leaf.grad = None
        set_aside.clear()
        t_recomp += time.perf_counter() - t0
    for p, *parts in zip(params, *grads, *asides):
        p.grad = sum(parts) if p.grad is None else p.grad + sum(parts)
    return results, gradient_cosine(*grads[:2]) if len(grads) > 1 else None, t_backward, t_recomp


def gradient_cosine(a, b):
    """Cosine between two gradients given as lists of tensors (all parameters as one vector); None
    where either is zero (a half of a batch whose rollouts all had advantage 0)."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    na = sum(x.double().pow(2).sum() for x in a).sqrt()
    nb = sum(y.double().pow(2).sum() for y in b).sqrt()
    return (dot / (na * nb)).item() if na > 0 and nb > 0 else None


def halves(n, group=1):
    """The two halves of a batch of n rows in groups of `group` consecutive rows (a question's K
    samples), split between groups: (range, range), or one range where there is one group only."""
    mid = (n // group) // 2 * group
    return (range(0, mid), range(mid, n)) if mid > 0 else (range(0, n),)


# A micro-batch holds the activations of its forward pass until its backward: about 1.13 MB per
# token for SmolLM2-135M in float32 (benchmarks/memory_plan.py), so at most MICRO_BATCH_TOKENS padded
# tokens go in one (about 0.6 GB), up to `micro_batch` sequences: fewer when they are long. This is
# what bounds a step's memory whatever the number of rollouts: at 1024 tokens the peak RSS of 64 ARC
# rollouts in float32 was 4.46 GiB, at 512 3.88 (RESULTS.md, "The official batch"). A single sequence longer than
# CHECKPOINT_TOKENS recomputes its layers' activations in the backward pass instead of holding them
# (Transformer.forward's checkpoint): about a third more compute there, 69 KB a token held.
MICRO_BATCH_TOKENS = 512
CHECKPOINT_TOKENS = 2048


def micro_batches(prompts, completions, size, max_tokens=None):
    """(slice, checkpoint) of each micro-batch, in the order given: up to `size` sequences while
    they pad to at most `max_tokens` tokens (always at least one). The callers give their rows in
    order of length, so that each micro-batch pads to little. max_tokens: MICRO_BATCH_TOKENS by default."""
    max_tokens = max_tokens or MICRO_BATCH_TOKENS
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    s = 0
    while s < len(lengths):
        e, longest = s + 1, lengths[s]
        while e < len(lengths) and e - s < size and (e - s + 1) * max(longest, lengths[e]) <= max_tokens:
            longest = max(longest, lengths[e])
            e += 1
        yield slice(s, e), (e - s) * longest > CHECKPOINT_TOKENS
        s = e


def check_finite(loss):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()}; stopping before a broken expert is written")


# ----------------------------------------------------------------------------- rl: REINFORCE, eq. 1

def advantages(rewards, baseline=False, samples=1, device="cpu"):
    """The weight of each rollout in the loss: its reward, less the mean reward of its own question's
    `samples` rollouts (consecutive in the batch) when samples > 1, or of its half of the batch.

    Why a half and not the whole batch: the two halves' gradients are then independent estimates
    of the same gradient, and their cosine (policy_gradient_step) says whether a step is signal.
    Under one batch mean the halves' advantages sum to opposite numbers, which ties them: whatever
    direction every rollout's log pi shares enters them with opposite signs. (On the first batch of
    the ARC recipe at 256 rollouts: cosine -0.27 under the batch mean, -0.22 under each half's, so
    that tie was not what made it negative; RESULTS.md.) A mean over 128 rollouts is as good a
    baseline as one over 256."""
    r = torch.tensor(rewards, dtype=torch.float32, device=device)
    if not baseline:
        return r
    if samples > 1:
        groups = r.view(-1, samples)  # (questions, K)
        return (groups - groups.mean(1, keepdim=True)).flatten()
    return torch.cat([r[h.start:h.stop] - r[h.start:h.stop].mean() for h in halves(len(r))])


def policy_gradient_step(wrapper, model, prompts, completions, rewards, cfg, pad_id, skip_zero=True, weights=None,
                         rows=None, reduce=None):
    """Accumulates the gradient of the loss into the expert's parameters; returns a dict: loss, kl,
    grad_cos (the cosine between the gradients of the batch's two halves, split between questions),
    backward_s, recompose_s.

    loss = -(1/B) sum_i A_i sum_t log pi(y_i,t)  +  lambda (1/B) sum_i sum_t KL_i,t, with A the
    advantages: the paper's eq. 1 for a batch of B answers, KL per whole answer (summed over its
    tokens) and averaged over the batch. The returned kl is per generated token, for the log.
    grad_cos is of the policy-gradient term alone: the KL term pulls both halves towards the base
    model alike, so it would read as agreement where the rewards are noise. Keeping it apart costs
    a second backward through each micro-batch (the KL's, retain_graph) where lambda > 0.

    With lambda = 0 a rollout whose advantage is 0 adds nothing to the gradient, so it is left out
    of the forward and backward passes (`skip_zero`); under a group baseline every question whose K
    answers all scored alike is such a rollout. B stays the batch size, so the gradient is the same.
    `weights`: the rollouts' W' (backward_through_weights).

    Data parallel (torchrun, reinforce.py): `rewards` are the whole batch's, `rows` the places in
    it of this process's rollouts (`prompts`, `completions`), and `reduce` sums over the processes;
    the baselines, the halves and B are the whole batch's, so p moves as in one process.
    """
    B = len(rewards)
    rows = list(range(B)) if rows is None else list(rows)
    advantage = advantages(rewards, cfg.baseline, cfg.samples, device=model.inv_freq.device)
    nonzero = (advantage != 0).tolist()  # one read from the device, not one per rollout
    advantage = advantage[rows]
    local = {r: j for j, r in enumerate(rows)}  # place in the batch -> place in this process's lists
    parts = [[local[i] for i in half if i in local and (cfg.kl > 0 or not skip_zero or nonzero[i])]
             for half in halves(B, cfg.samples)]
    if not (cfg.kl > 0 or not skip_zero or any(nonzero)):  # the whole batch's, so every process agrees
        # Every rollout scored the same under a baseline: the gradient is exactly zero, so skip the
        # forward and backward passes. Adam still takes its step (momentum carries on), as it would.
        for p in wrapper.parameters():
            p.grad = torch.zeros_like(p)
        return dict(loss=0.0, kl=0.0, grad_cos=None, backward_s=0.0, recompose_s=0.0)
    # Sampled rollouts come from softmax(logits / T): score them under that distribution (on-policy).
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0

    def part(rows):
        rows = sorted(rows, key=lambda i: len(prompts[i]) + len(completions[i]))  # micro-batches of similar lengths
        ps, cs, adv = [prompts[i] for i in rows], [completions[i] for i in rows], advantage[rows]

        def run(forward):
            total_loss, kl_sum, kl_count = 0.0, 0.0, 0
            for sl, checkpoint in micro_batches(ps, cs, cfg.micro_batch):
                logp, mask, *kl = token_logprobs(model, ps[sl], cs[sl], pad_id, forward,  # kl: [(b, L)]
                                                 temperature=temperature, kl=cfg.kl > 0, checkpoint=checkpoint)
                loss = -(logp.sum(1) * adv[sl]).sum() / B
                if kl:  # KL(pi_W' || pi_W) at each generated token, over the whole vocabulary
                    kl = kl[0].sum()
                    kl_sum, kl_count = kl_sum + kl.item(), kl_count + mask.sum().item()
                    kl_loss = cfg.kl * kl / B  # eq. 1: KL of whole answers, averaged over the batch
                    check_finite(loss + kl_loss)
                    forward.backward_aside(kl_loss)  # its own backward, kept out of the cosine
                    total_loss += kl_loss.item()
                check_finite(loss)
                loss.backward()
                total_loss += loss.item()
                del logp, mask, kl, loss
            # glibc keeps what the micro-batches freed in its heaps, where the other half, of other
            # lengths, only partly reuses it: return it once a half. Once a micro-batch lowered a
            # whole ARC run's peak by only 0.03 GiB more (2.86 against 2.89) but cost ~11% of the
            # backward (the pages faulted in again each time); RESULTS.md, "What the fixes cost in time"
            release_freed_memory()
            return total_loss, kl_sum, kl_count
        return run

    results, cos, t_backward, t_recomp = backward_through_weights(wrapper, model, [part(r) for r in parts], weights,
                                                                  reduce, aside=cfg.kl > 0)
    sums = torch.tensor([sum(x) for x in zip(*results)], dtype=torch.float64, device="cpu")  # loss, kl_sum, kl_count
    loss, kl_sum, kl_count = (reduce([sums])[0] if reduce else sums).tolist()
    return dict(loss=loss, kl=kl_sum / max(kl_count, 1), grad_cos=cos, backward_s=t_backward, recompose_s=t_recomp)


def rewards_of(task, batch, outputs, wrong_reward=-1.0):
    """(correct, rewards): the task's strict scorer judges right; the reward is +1 for a right answer,
    `wrong_reward` for a wrong one that the task can parse (ARC: exactly one option named), -1 for
    one it cannot (no option, or several: a list never scores). wrong_reward -1 is the paper's +-1.

    Not the paper's (when above -1): at 135M, 40% of ARC answers name no option at all, and +-1 makes
    that cost as much as a wrong guess; a graded reward pays a little for committing to one option,
    and keeps a list at the bottom, where it cannot become a loophole (RESULTS.md, "the scorer loophole")."""
    correct = task.score_many(batch, outputs)
    if wrong_reward == -1.0:
        return correct, [1.0 if c else -1.0 for c in correct]
    parsed = [task.extract(out, ex) is not None for ex, out in zip(batch, outputs)]
    return correct, [1.0 if c else wrong_reward if p else -1.0 for c, p in zip(correct, parsed)]


def rollouts_and_gradient(wrapper, model, tok, completer, task, batch, cfg):
    """One RL step's work before the optimizer: the rollouts of `batch` (each question's K copies in a
    row) with the current expert, their rewards (rewards_of), the policy gradient. Returns the step's log row.

    A question's K samples share one prefill (generate's `samples`). A rollout that stopped keeps its
    stop token, so log pi includes the decision to stop, as the reference answers of nll_step do.
    Under torchrun each process rolls out its share of the questions (distributed.shard), all K
    samples of a question together; the rewards are gathered, so that the baselines are the whole
    batch's, and the gradient is summed over the processes: p moves as in one process."""
    K = cfg.samples
    t0 = time.perf_counter()
    new_weights = wrapper.weights()  # W' with its graph to the parameters: the rollouts use it, then the update
    t_recomp0 = time.perf_counter() - t0
    mine = list(distributed.shard(len(batch) // K))  # this process's questions (all of them in one process)
    rows = [q * K + k for q in mine for k in range(K)]  # their places in the batch
    questions = [completer.encode(batch[q * K].messages) for q in mine]
    with wrapper.applied(weights={k: w.detach() for k, w in new_weights.items()}):
        completions = completer.generate_ids(questions, samples=K, keep_stop=True)
    release_freed_memory()  # the packs of W' that decoding made, freed as applied() ended (chat.py says why)
    t_rollout = time.perf_counter() - t0 - t_recomp0
    prompts = [q for q in questions for _ in range(K)]
    stops = tok.stop_tokens
    outputs = [tok.decode(c[:-1] if c and c[-1] in stops else c) for c in completions]
    examples = [batch[i] for i in rows]
    correct, rewards = rewards_of(task, examples, outputs, cfg.wrong_reward)
    answered = [task.extract(o, ex) is not None for ex, o in zip(examples, outputs)]
    # one tuple per question of this process, gathered into batch order on every process
    per_question = distributed.gather_objects(
        [(correct[j:j + K], rewards[j:j + K], answered[j:j + K], sum(map(len, completions[j:j + K])))
         for j in range(0, len(rows), K)])
    correct, rewards, answered = ([x for q in per_question for x in q[i]] for i in range(3))
    step = policy_gradient_step(wrapper, model, prompts, completions, rewards, cfg, tok.pad_id, weights=new_weights,
                                rows=rows, reduce=distributed.sum_over_ranks if distributed.world_size() > 1 else None)
    row = {"reward": sum(rewards) / len(rewards), "accuracy": sum(correct) / len(correct),
           "answered": sum(answered) / len(answered), "kl": step["kl"], "loss": step["loss"], "grad_cos": step["grad_cos"]}
    if K > 1:  # questions whose K answers did not all score alike: the only ones a group baseline learns from
        row["mixed"] = sum(len(set(rewards[i:i + K])) > 1 for i in range(0, len(rewards), K))
    return {**row, "rollout_s": t_rollout, "backward_s": step["backward_s"],
            "recompose_s": step["recompose_s"] + t_recomp0, "new_tokens": sum(q[3] for q in per_question)}


# ----------------------------------------------------------------------------- nll: next-token prediction

def require_references(task, examples):
    """Raises ValueError, naming the prompts that have them, unless every example has a reference completion."""
    missing = sum(task.reference_completion(ex) is None for ex in examples)
    if missing:
        def has_references(prompt):  # judged by the first training question under that prompt
            other = type(task)(prompt=prompt, data_dir=task.data_dir)
            return other.reference_completion(other.load("train")[0]) is not None
        works = [p for p in task.prompts if p != task.prompt and has_references(p)]
        raise ValueError(f"--objective nll trains on reference answers, and {missing} of {len(examples)} "
                         f"{task.name} training questions have none with --prompt {task.prompt} (a chain of thought "
                         f"prefilled, or a task without references); prompts that have them: {works or 'none'}")


def reference_targets(task, examples, tok):
    """The token lists nll_step predicts: each example's reference completion, as the template renders it
    after the prompt (chat.completion_ids), then the end-of-turn token."""
    end = [tok.eos_id] if tok.eos_id is not None else []
    return [completion_ids(tok, ex.messages, task.reference_completion(ex)) + end for ex in examples]


def nll_step(wrapper, model, prompts, targets, cfg, pad_id, rows=None, reduce=None):
    """Accumulates the gradient of the mean negative log-likelihood per reference token (module
    docstring) into the expert's parameters; returns a dict: loss, grad_cos (between the batch's
    two halves, as policy_gradient_step), backward_s, recompose_s.

    Data parallel: `targets` are the whole batch's (N counts every reference token), `prompts` this
    process's, at places `rows` of the batch; `reduce` sums over the processes."""
    N, n = sum(len(t) for t in targets), len(targets)  # every reference token of the batch, its size
    rows = list(range(n)) if rows is None else list(rows)
    targets = [targets[i] for i in rows]
    local = {r: j for j, r in enumerate(rows)}

    def part(rows):
        rows = sorted(rows, key=lambda i: len(prompts[i]) + len(targets[i]))  # similar lengths
        ps, ts = [prompts[i] for i in rows], [targets[i] for i in rows]

        def run(forward):
            total = 0.0
            for sl, checkpoint in micro_batches(ps, ts, cfg.micro_batch):
                logp, _ = token_logprobs(model, ps[sl], ts[sl], pad_id, forward,
                                         checkpoint=checkpoint)  # (b, L), 0 at padding
                loss = -logp.sum() / N
                check_finite(loss)
                loss.backward()
                total += loss.item()
            return total
        return run

    parts = [[local[i] for i in h if i in local] for h in halves(n, cfg.samples)]
    results, cos, t_backward, t_recomp = backward_through_weights(wrapper, model, [part(p) for p in parts], reduce=reduce)
    loss = torch.tensor([sum(results)], dtype=torch.float64, device="cpu")
    return dict(loss=(reduce([loss])[0] if reduce else loss).item(), grad_cos=cos, backward_s=t_backward,
                recompose_s=t_recomp)
