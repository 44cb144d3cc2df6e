"""Train an SVF expert with REINFORCE: Transformer-Squared section 3.1, "End-to-end optimization with RL".

    python reinforce.py --task arc                 # trains experts/arc.safetensors by its recipe (RECIPES)
    python reinforce.py --task cls                 # the classification expert of adapt.py --strategy cls
    python reinforce.py --task arc --recipe official --steps 20     # the official code's settings
    python reinforce.py --task arc --kl 0.1 --run-dir runs/arc-kl0.1   # one setting changed
    python reinforce.py --task arc --resume        # continue an interrupted run

Each task's defaults are the recipe of its shipped expert (RECIPES, with the reasons), so the first
command reproduces the file in experts/; any flag changes one setting, and the run prints them all.

The objective (paper, eq. 1), maximised over the expert's vectors z only:

    J(z) = E[ log pi_{W'}(y_hat | x) * r(y_hat, y) ] - lambda * D_KL(pi_{W'} || pi_W)

Each step: greedy rollouts y_hat from the current expert, reward r = +1 if the task's scorer accepts
the answer and -1 otherwise, then one Adam step on

    loss = -(1/B) sum_i r_i * sum_t log pi_{W'}(y_hat_i,t | x_i, y_hat_i,<t)  +  lambda * (1/B) sum_i KL_i

where KL_i = sum_t KL(pi_{W'}(. | x_i, y_hat_i,<t) || pi_W(. | ...)) is the KL between the two models'
distributions of whole answers (chain rule), estimated at the answer generated: a sum over its
tokens, as the policy term is. (A mean over all tokens would weigh lambda 1/L as much, L the mean
answer length.) The log shows the KL per token.

Simplifications, as in the official code unless said otherwise: no baseline (`--baseline` subtracts
the batch's mean reward, which the official code does not; without it a model that is mostly wrong
gets mostly -1 rewards, and on SmolLM2 ARC the policy drifts into unparsable text after ~20 steps);
greedy decoding for the rollouts (`--temperature` T > 0 samples instead, and log pi is then that of
the distribution sampled from, softmax(logits / T)); the KL term is computed over the whole
vocabulary at the generated tokens, against the base weights; the gradient norm is clipped to 1e-3; validation every
10 steps and the best expert on validation is the one kept. We validate on a fixed subset of the
validation split (`--eval-limit`) to keep a CPU run short; the official code uses all of it.
`--samples K` (not official) draws K sampled rollouts of each of B/K questions; with `--baseline`
each rollout's reward is then compared with the mean of its own question's K rollouts (the "group"
baseline of RLOO and GRPO), so the update says which answer to *this* question was better.
`--shuffle-options` (not official; multiple-choice tasks) shows each training question with its
options in a new random order, so the right letter is uniform and preferring a letter earns nothing.
`--max-difficulty N` (not official) trains on the easier questions only (task.difficulty; GSM8K:
the number of calculation steps of the reference solution) and validates on all of them.

Never loses work: the training state (p, Adam, step, best expert, random state) is written atomically
after every step, so Ctrl-C or a kill costs at most the step in progress; `--resume` continues and,
with the same flags, ends where an uninterrupted run ends.
"""

import argparse
import dataclasses
import json
import os
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch

import svf
from data import evaluate, get_task
from chat import MAX_NEW_TOKENS, Completer, add_model_arguments, load
from model import token_logprobs


@dataclass
class TrainConfig:
    task: str = "arc_easy"
    prompt: str = None  # None: the task's default prompt
    targets: str = "mlp"  # official default; the paper's ablation prefers "all"
    steps: int = 60
    batch_size: int = 16
    micro_batch: int = 8  # sequences per forward/backward; gradients are accumulated
    lr: float = 2e-3
    kl: float = 0.0  # lambda; the paper sweeps 0, 0.1, 0.2, 0.3
    baseline: bool = False
    samples: int = 1  # rollouts per question; > 1 needs temperature > 0 (not official)
    temperature: float = 0.0
    shuffle_options: bool = False  # not official: a random option order for each training rollout
    max_difficulty: int = None  # not official: a curriculum, training questions of task.difficulty <= this
    max_new_tokens: int = 0  # 0: per task (chat.MAX_NEW_TOKENS)
    clip: float = 1e-3
    eval_every: int = 10
    eval_limit: int = 200
    seed: int = 0


# The recipe of each shipped expert: `python reinforce.py --task T` trains experts/T.safetensors again
# (flags override single settings; `--recipe official` starts from the official code's settings
# instead, TrainConfig's defaults with the official prompt). Why each differs from the official code:
RECIPES = {
    # The base model answers ARC-Easy at chance in every lettered format, and 47% of the time by
    # the option likelihood with the question alone (benchmarks/probe_arc.py): options before the
    # question, answered with the option's text, put that knowledge closest to the surface; a
    # baseline keeps a mostly-wrong policy from drifting into unparsable text; shuffled options make
    # a letter or position habit worthless. 40 steps: validation peaked by then (README).
    "arc_easy": dict(prompt="first", max_new_tokens=32, baseline=True, shuffle_options=True, steps=40),
    # The few-shot prompt is the only one with which the base model names a category at all (42%
    # on validation); it then calls most MBPP problems "math", which 20 steps with a baseline fix.
    "cls": dict(prompt="fewshot", baseline=True, steps=30, eval_limit=90),
}
OFFICIAL = dict(prompt="official")


def expert_path(task_name):
    """Where the shipped expert of a task lives: experts/arc.safetensors for ARC-Easy (the name
    adapt.py and cem.py use), experts/<task>.safetensors for the others."""
    return os.path.join("experts", f"{ {'arc_easy': 'arc'}.get(task_name, task_name)}.safetensors")


def recipe(task_name, name="shipped"):
    """The TrainConfig of a task's shipped expert (name "shipped") or of the official code ("official")."""
    if name not in ("shipped", "official"):
        raise ValueError(f"recipe {name!r}; expected 'shipped' or 'official'")
    task_name = get_task(task_name).name
    settings = RECIPES.get(task_name, {}) if name == "shipped" else OFFICIAL
    return TrainConfig(**dict(settings, task=task_name))


def config_from_args(args):
    """The recipe of args.recipe for args.task, with every flag the user gave (not None) on top."""
    base = dataclasses.asdict(recipe(args.task, args.recipe))
    given = {k: v for k, v in vars(args).items() if k in base and v is not None and k != "task"}
    return TrainConfig(**dict(base, **given))


def batch_indices(n, step, batch_size, seed):
    """Indices of step `step`: walk seeded permutations of the training set, one per epoch.

    A pure function of step, so a resumed run draws exactly the batches an uninterrupted one would.
    """
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out += perm[offset:offset + take].tolist()
        pos += take
    return out


def advantages(rewards, baseline=False, samples=1):
    """The weight of each rollout in the loss: its reward, less the mean reward of its own question's
    `samples` rollouts (consecutive in the batch) when samples > 1, or of the whole batch."""
    r = torch.tensor(rewards, dtype=torch.float32)
    if not baseline:
        return r
    groups = r.view(-1, samples) if samples > 1 else r.view(1, -1)  # (questions, K) or (1, B)
    return (groups - groups.mean(1, keepdim=True)).flatten()


def kl_to_base(model, prompts, completions, logits_new, mask, pad_id):
    """(sum over generated tokens of KL(pi_new || pi_base) at each of them, number of such tokens).

    The KL of each token's next-token distributions is summed over the vocabulary; summed over the
    tokens of an answer it is the KL between the two models' distributions of whole answers, as in
    the paper's equation 1 (by the chain rule, estimated at the answer generated)."""
    with torch.no_grad():
        _, _, logits_base = token_logprobs(model, prompts, completions, pad_id, return_logits=True)
    logp_new = torch.log_softmax(logits_new.float(), -1)
    logp_base = torch.log_softmax(logits_base.float(), -1)
    kl = (logp_new.exp() * (logp_new - logp_base)).sum(-1)  # (B, L)
    return (kl * mask).sum(), mask.sum()


def policy_gradient_step(wrapper, model, prompts, completions, rewards, cfg, pad_id, skip_zero=True):
    """Accumulates the gradient of the loss into the expert's p; returns (loss, kl, t_backward, t_recomp).

    loss = -(1/B) sum_i A_i sum_t log pi(y_i,t)  +  lambda (1/B) sum_i sum_t KL_i,t, with A the
    advantages: the paper's eq. 1 for a batch of B answers, KL per whole answer (summed over its
    tokens) and averaged over the batch. The returned kl is per generated token, for the log.

    With lambda = 0 a rollout whose advantage is 0 adds nothing to the gradient, so it is left out
    of the forward and backward passes (`skip_zero`); under a group baseline every question whose K
    answers all scored alike is such a rollout. B stays the batch size, so the gradient is the same.

    The recomposed weights W' are computed once with autograd, then cut off as leaves: each
    micro-batch's backward stops at W' and adds into W'.grad, and one final backward carries the sum
    through the recomposition to p. This bounds memory by the micro-batch and recomposes only once.
    """
    advantage = advantages(rewards, cfg.baseline, cfg.samples)
    B = len(prompts)
    rows = [i for i in range(B) if cfg.kl > 0 or not skip_zero or advantage[i] != 0]
    if not rows:
        # Every rollout scored the same under a baseline: the gradient is exactly zero, so skip the
        # forward and backward passes. Adam still takes its step (momentum carries on), as it would.
        for p in wrapper.parameters():
            p.grad = torch.zeros_like(p)
        return 0.0, 0.0, 0.0, 0.0
    prompts, completions, advantage = [prompts[i] for i in rows], [completions[i] for i in rows], advantage[rows]
    t0 = time.perf_counter()
    weights = wrapper.weights()  # {name: W'} with a graph back to p
    leaves = {k: w.detach().requires_grad_() for k, w in weights.items()}
    t_recomp = time.perf_counter() - t0

    def forward(ids, mask, **kwargs):
        return torch.func.functional_call(model, leaves, (ids, mask), kwargs)

    # Sampled rollouts come from softmax(logits / T): score them under that distribution (on-policy).
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    total_loss, kl_sum, kl_count = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for s in range(0, len(rows), cfg.micro_batch):
        sl = slice(s, s + cfg.micro_batch)
        logp, mask, logits = token_logprobs(model, prompts[sl], completions[sl], pad_id, forward,
                                            return_logits=True, temperature=temperature)
        loss = -(logp.sum(1) * advantage[sl]).sum() / B
        if cfg.kl > 0:
            kl, n = kl_to_base(model, prompts[sl], completions[sl], logits, mask, pad_id)
            kl_sum, kl_count = kl_sum + kl.item(), kl_count + n.item()
            loss = loss + cfg.kl * kl / B  # eq. 1: KL of whole answers, averaged over the batch
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()}; stopping before a broken expert is written")
        loss.backward()
        total_loss += loss.item()
    t_backward = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.autograd.backward(list(weights.values()), [leaves[k].grad for k in weights])
    t_recomp += time.perf_counter() - t0
    return total_loss, kl_sum / max(kl_count, 1), t_backward, t_recomp


# ----------------------------------------------------------------------------- saving and resuming

def raise_interrupt(*_):
    raise KeyboardInterrupt


def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_resumable(saved, cfg, model_dir):
    if saved["model_dir"] != model_dir:
        raise SystemExit(f"--resume: the run used --model {saved['model_dir']}, not {model_dir}")
    diff = {k: (v, getattr(cfg, k)) for k, v in saved["config"].items()
            if k != "steps" and getattr(cfg, k) != v}
    if diff:
        raise SystemExit("--resume: these flags differ from the interrupted run (saved, given): "
                         + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items())
                         + "; pass the same flags, or start a new run with another --run-dir")


def plot(log_path, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(log_path)]
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["reward"] for r in steps], label="mean reward (train batch)", alpha=0.6)
    ax.plot([r["step"] for r in evals], [2 * r["accuracy"] - 1 for r in evals], "o-",
            label="validation reward (2·accuracy − 1)")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- training

def train(cfg, model, tok, model_dir, task, run_dir, out, resume=False):
    """Runs cfg.steps REINFORCE steps of an SVF expert on `task`; returns the best validation result."""
    train_set, val_set = task.load("train"), task.load("validation")[:cfg.eval_limit]
    if cfg.max_difficulty is not None:  # validation stays the whole distribution: it measures the goal
        train_set = [ex for ex in train_set if task.difficulty(ex) <= cfg.max_difficulty]
        print(f"curriculum: {len(train_set)} training questions of difficulty <= {cfg.max_difficulty}")
    torch.manual_seed(cfg.seed)
    wrapper = svf.SVF(model, svf.checkpoint_identity(model_dir), cfg.targets, seed=cfg.seed)
    opt = torch.optim.Adam(wrapper.parameters(), lr=cfg.lr)
    max_new = cfg.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 256)
    completer = Completer(model, tok, max_new, cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed)
    greedy = Completer(model, tok, max_new, 0.0, batch_size=cfg.batch_size)  # validation never samples
    os.makedirs(run_dir, exist_ok=True)
    state_path, log_path = os.path.join(run_dir, "state.pt"), os.path.join(run_dir, "log.jsonl")

    step, best = 0, {"accuracy": -1.0, "step": -1, "p": None}
    if resume:
        if not os.path.exists(state_path):
            raise SystemExit(f"--resume: no training state at {state_path}; start without --resume")
        saved = torch.load(state_path, weights_only=False)
        check_resumable(saved, cfg, model_dir)
        wrapper.load_state(saved["p"])
        opt.load_state_dict(saved["optimizer"])
        completer.generator.set_state(saved["generator"])
        step, best = saved["step"], saved["best"]
        # drop log rows of a step that was in progress when the run stopped
        rows = [line for line in open(log_path) if json.loads(line)["step"] <= step] if os.path.exists(log_path) else []
        with open(log_path, "w") as f:
            f.writelines(rows)
        print(f"resuming {run_dir} at step {step} (best validation accuracy {best['accuracy']:.4f})")
    elif os.path.exists(state_path):
        raise SystemExit(f"{state_path} exists: pass --resume to continue that run, or choose another --run-dir")
    else:
        open(log_path, "w").close()

    def log(row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def validate():
        t0 = time.perf_counter()
        with torch.no_grad(), wrapper.applied():
            res = evaluate(task, val_set, greedy, batch_size=len(val_set), progress=False)
        print(f"eval step {step} | validation accuracy {res.accuracy:.4f} ({res.correct}/{res.n}) "
              f"| unparsable {res.unparsable:.1%} | {time.perf_counter() - t0:.1f}s", flush=True)
        log({"kind": "eval", "step": step, "accuracy": res.accuracy, "unparsable": res.unparsable})
        if res.accuracy > best["accuracy"]:
            best.update(accuracy=res.accuracy, step=step, p=wrapper.state())
            wrapper.save_expert(out, best["p"], task=task.name, prompt=task.prompt, steps=step,
                                val_accuracy=res.accuracy, val_items=res.n, config=dataclasses.asdict(cfg))
            print(f"  new best: wrote {out}")

    def save_state():
        atomic_torch_save({"p": wrapper.state(), "optimizer": opt.state_dict(), "step": step, "best": best,
                           "generator": completer.generator.get_state(), "config": dataclasses.asdict(cfg),
                           "model_dir": model_dir}, state_path)

    # A kill (SIGTERM) unwinds like Ctrl-C; the state of the last finished step is already on disk.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupt)
    t_start = time.perf_counter()
    try:
        if not resume:  # a resumed run validated its step 0 before it stopped
            validate()  # step 0: W' = W up to float error, i.e. the base model's accuracy
            save_state()
        while step < cfg.steps:
            questions = batch_indices(len(train_set), step, cfg.batch_size // cfg.samples, cfg.seed)
            batch = [train_set[i] for i in questions for _ in range(cfg.samples)]  # K copies in a row
            if cfg.shuffle_options:  # seeded by the step, so --resume draws the same orders
                rng = random.Random(cfg.seed * 100003 + step)
                batch = [task.shuffled(ex, rng) for ex in batch]
            prompts = [completer.encode(ex.messages) for ex in batch]
            t0 = time.perf_counter()
            with torch.no_grad():
                new_weights = wrapper.weights()
            t_recomp0 = time.perf_counter() - t0
            with wrapper.applied(weights=new_weights):
                completions = completer.generate_ids(prompts)
            t_rollout = time.perf_counter() - t0 - t_recomp0
            texts = [tok.decode(c) for c in completions]
            correct = task.score_many(batch, texts)
            rewards = [1.0 if c else -1.0 for c in correct]

            opt.zero_grad(set_to_none=True)
            loss, kl, t_backward, t_recomp = policy_gradient_step(wrapper, model, prompts, completions,
                                                                  rewards, cfg, tok.pad_id)
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapper.parameters(), cfg.clip).item()
            opt.step()
            step += 1
            row = {"kind": "step", "step": step, "reward": sum(rewards) / len(rewards),
                   "accuracy": sum(correct) / len(correct), "kl": kl, "loss": loss, "grad_norm": grad_norm,
                   "rollout_s": t_rollout, "backward_s": t_backward, "recompose_s": t_recomp + t_recomp0,
                   "new_tokens": sum(map(len, completions))}
            log(row)
            print(f"step {step:4d}/{cfg.steps} | reward {row['reward']:+.3f} | acc {row['accuracy']:.3f} "
                  f"| kl {kl:.2e} | |g| {grad_norm:.2e} | rollout {t_rollout:.1f}s backward {t_backward:.1f}s "
                  f"recompose {row['recompose_s']:.1f}s", flush=True)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                validate()
            save_state()
    except KeyboardInterrupt:
        print(f"\ninterrupted after step {step}; the state is in {state_path}: continue with --resume")
        sys.exit(130)
    plot(log_path, os.path.join(run_dir, "progress.png"))
    print(f"done: {cfg.steps} steps in {time.perf_counter() - t_start:.0f}s; best validation accuracy "
          f"{best['accuracy']:.4f} at step {best['step']}, expert in {out}; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return best


def main(argv=None):
    d = TrainConfig()
    recipe_default = "(default: the task's recipe, see RECIPES)"
    ap = argparse.ArgumentParser(description="Train an SVF expert with REINFORCE (Transformer² section 3.1).")
    add_model_arguments(ap)
    ap.add_argument("--task", default=d.task, help="arc (arc_easy), gsm8k, mbpp, cls, ... (default: %(default)s)")
    ap.add_argument("--recipe", default="shipped", choices=["shipped", "official"],
                    help="start from the settings of the task's shipped expert, or of the official code (default: shipped)")
    ap.add_argument("--prompt", default=None, help=f"prompt variant {recipe_default}")
    ap.add_argument("--targets", default=None, choices=sorted(svf.TARGETS),
                    help=f"matrices to adapt (official: {d.targets})")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps {recipe_default}")
    ap.add_argument("--micro-batch", type=int, default=None, help=f"sequences per backward (default: {d.micro_batch})")
    ap.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {d.lr}, official)")
    ap.add_argument("--kl", type=float, default=None, help=f"KL coefficient lambda (default: {d.kl}, official)")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="subtract the mean reward of the batch, or of each question's samples (not official)")
    ap.add_argument("--samples", type=int, default=None,
                    help="rollouts per question, with --baseline a per-question baseline (not official)")
    ap.add_argument("--temperature", type=float, default=None, help="0: greedy rollouts (official)")
    ap.add_argument("--shuffle-options", action=argparse.BooleanOptionalAction, default=None,
                    help="multiple choice: show each training question's options in a random order (not official)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="0: per task (chat.MAX_NEW_TOKENS)")
    ap.add_argument("--max-difficulty", type=int, default=None,
                    help="curriculum: train on questions of at most this task.difficulty (GSM8K: calculation steps)")
    ap.add_argument("--clip", type=float, default=None, help=f"gradient-norm clip (default: {d.clip}, official)")
    ap.add_argument("--eval-every", type=int, default=None, help=f"steps between validations (default: {d.eval_every})")
    ap.add_argument("--eval-limit", type=int, default=None, help=f"validation items used {recipe_default}")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=None, help="expert file (default: experts/<task>.safetensors, arc for ARC-Easy)")
    ap.add_argument("--run-dir", default=None, help="training state and logs (default: runs/<task>-<targets>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    if cfg.steps < 1 or cfg.eval_every < 1 or cfg.micro_batch < 1 or cfg.eval_limit < 1:
        ap.error("--steps, --eval-every, --micro-batch and --eval-limit must be at least 1")
    if cfg.kl < 0 or cfg.temperature < 0 or cfg.lr <= 0:
        ap.error("--kl and --temperature must be >= 0 and --lr > 0")
    if cfg.samples < 1 or cfg.batch_size % cfg.samples:
        ap.error(f"--samples must be >= 1 and divide --batch-size ({cfg.batch_size})")
    if cfg.samples > 1 and cfg.temperature == 0:
        ap.error("--samples > 1 needs --temperature > 0: greedy rollouts of one question are identical")
    task = get_task(cfg.task, prompt=cfg.prompt, data_dir=args.data_dir)
    if cfg.shuffle_options and not hasattr(task, "shuffled"):
        ap.error(f"--shuffle-options needs a multiple-choice task (arc_easy, arc_challenge), not {task.name}")
    run_dir = args.run_dir or os.path.join("runs", f"{task.name}-{cfg.targets}")
    print(f"recipe {args.recipe} for {task.name}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    task.load("train")  # fail on missing data before loading the model
    model, tok, model_dir = load(args)
    out = args.out or expert_path(task.name)
    return train(cfg, model, tok, model_dir, task, run_dir, out, args.resume)


if __name__ == "__main__":
    main()
