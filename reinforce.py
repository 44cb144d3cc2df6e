"""Train an SVF expert with REINFORCE: Transformer-Squared section 3.1, "End-to-end optimization with RL";
or the paper's baselines (Table 1 and Table 4): a LoRA, and training with next-token prediction.

    python reinforce.py --task arc                 # trains experts/arc.safetensors by its recipe (RECIPES)
    python reinforce.py --task arc --recipe try    # a first try, ~15 min on a laptop: runs/arc_easy-try.safetensors
    python reinforce.py --task cls                 # the classification expert of adapt.py --strategy cls
    python reinforce.py --task arc --recipe official --steps 20     # the official code's settings
    python reinforce.py --task arc --kl 0.1 --run-dir runs/arc-kl0.1   # one setting changed
    python reinforce.py --task arc --resume        # continue an interrupted run
    python reinforce.py --task arc --method lora --objective nll   # the paper's LoRA baseline
    torchrun --nproc_per_node 2 reinforce.py --task arc            # a step's questions over 2 processes

Each task's defaults are the recipe of its shipped expert (recipes.RECIPES, with the reasons), so the first
command reproduces the file in experts/; any flag changes one setting, and the run prints them all.
A run that is not a shipped expert's recipe (`--steps 5`, `--recipe try`) writes its expert next to
its run directory instead (runs/arc_easy-mlp.safetensors), unless `--out` says otherwise: it never
replaces a file in experts/.

The objective (paper, eq. 1), maximised over the expert's vectors z only (objectives.py writes out
the loss of a batch, with the KL of whole answers; the log shows the KL per token):

    J(z) = E[ log pi_{W'}(y_hat | x) * r(y_hat, y) ] - lambda * D_KL(pi_{W'} || pi_W)

Each step: `--batch-size` B rollouts y_hat from the current expert (the official code's B is 256,
one greedy answer to each of 256 questions), reward r = +1 if the task's strict scorer accepts the
answer and -1 otherwise, then one Adam step. The rollouts decode `--rollout-batch` at a time and the
backward runs in micro-batches (objectives.py), so memory does not grow with B. Each step prints the
cosine between the gradients of its two halves: near 0, the step is noise; clearly above, signal.
`--method lora` trains LoRA's A and B (lora.py; rank 16 on q and v by default) in place of SVF's z;
`--objective nll` takes one Adam step on the negative log-likelihood of the reference answers
(objectives.py) in place of the rollouts and rewards. The batches, validation, best-on-validation
rule, resume, logs and expert file are the same for every method and objective: one loop.

Simplifications, as in the official code unless said otherwise: no baseline (`--baseline` subtracts
the mean reward of each half of the batch, which the official code does not; without it a model that
is mostly wrong gets mostly -1 rewards, and on SmolLM2 ARC the policy drifts into unparsable text
after ~20 steps); greedy decoding for the rollouts (`--temperature` T > 0 samples instead, and log
pi is then that of the distribution sampled from, softmax(logits / T)); the KL term is computed over
the whole vocabulary at the generated tokens, against the base weights; the gradient norm is clipped
to 1e-3; the best expert on validation is the one kept. Not official:
- `--eval-limit N --heldout M`: the first N validation items choose the step kept, each read paired
  with step 0's; the next M are read only at the end, for step 0 and the step kept, so that one
  difference is free of the choice (the official code validates on all of them and reports the best).
- `--wrong-reward w` (-1 < w <= 0): a wrong answer the task can parse (one ARC option) earns w, an
  unparsable one -1 (objectives.rewards_of): a graded reward that pays for answering.
- `--samples K` draws K sampled rollouts of each of B/K questions, from one prefill per question;
  with `--baseline` each rollout's reward is compared with the mean of its own question's K (the
  "group" baseline of RLOO and GRPO), so the update says which answer to *this* question was better.
- `--shuffle-options` (multiple-choice tasks) shows each training question with its options in a new
  random order (the same for its K samples), so preferring a letter or a position earns nothing.
- `--max-difficulty N` trains on the easier questions only (task.difficulty; GSM8K: the number of
  calculation steps of the reference solution) and validates on all of them.
- `--init FILE` starts from an expert (e.g. one of `--objective nll`) instead of the official initial p.

Never loses work: the training state (p, Adam, step, best expert, random state) is written atomically
after every step, so Ctrl-C or a kill costs at most the step in progress; `--resume` continues and,
with the same flags, ends where an uninterrupted run ends (also under torchrun with another number of
processes, for greedy rollouts; sampled ones then draw other, equally likely samples).
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from types import SimpleNamespace

import torch

import distributed
import lora
import run_state
from progress import pace, plot  # what a run shows as it goes: the pace after step 1, progress.png
import svf
from data import evaluate, get_task
from data.evaluate import paired_difference
from chat import (MAX_NEW_TOKENS, Completer, add_model_arguments, load, peak_rss_gib, peak_rss_since_reset_gib,
                  release_freed_memory, reset_peak_rss, rss_gib)
# what a run is and the shipped recipes (recipes.py), importable from here as before they moved
from recipes import (DEFAULT_TARGETS, OFFICIAL, RECIPE_NAMES, RECIPES, TrainConfig, batch_indices,  # noqa: F401
                     default_names, expert_path, recipe, step_batch)
# the two objectives and the RL step (these names stay importable from here, as before they moved)
from objectives import (advantages, nll_step, policy_gradient_step, reference_targets,  # noqa: F401
                        require_references, rewards_of, rollouts_and_gradient)


def config_from_args(args):
    """The recipe of args.recipe for args.task, with every flag the user gave (not None) on top."""
    base = dataclasses.asdict(recipe(args.task, args.recipe))
    given = {k: v for k, v in vars(args).items() if k in base and v is not None and k != "task"}
    if given.get("method", base["method"]) != base["method"]:  # a recipe's targets are its method's
        base.update(targets=None, lora_alpha=None)
    return TrainConfig(**dict(base, **given))


def make_wrapper(cfg, model, model_dir):
    """The trainable adaptation of cfg.method around the model: svf.SVF or lora.LoRA."""
    identity = svf.checkpoint_identity(model_dir)
    if cfg.method == "lora":
        return lora.LoRA(model, identity, cfg.targets, cfg.rank, cfg.lora_alpha, seed=cfg.seed)
    return svf.SVF(model, identity, cfg.targets, seed=cfg.seed)


# ----------------------------------------------------------------------------- saving and resuming

def raise_interrupt(*_):
    raise KeyboardInterrupt


RESUMABLE_CHANGES = ("steps", "rollout_batch")  # settings a resumed run may change: how long, how fast


def check_resumable(saved, cfg, model_dir):
    if saved["model_dir"] != model_dir:
        raise SystemExit(f"--resume: the run used --model {saved['model_dir']}, not {model_dir}")
    diff = {k: (v, getattr(cfg, k)) for k, v in saved["config"].items()
            if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v}
    if diff:
        raise SystemExit("--resume: these flags differ from the interrupted run (saved, given): "
                         + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items())
                         + "; pass the same flags, or start a new run with another --run-dir")


# ----------------------------------------------------------------------------- training

def train(cfg, model, tok, model_dir, task, run_dir, out, resume=False):
    """Runs cfg.steps steps of cfg.objective on an expert of cfg.method for `task`; returns the best
    validation result. One loop for every method and objective: only the step's loss differs.

    Validation: the first cfg.eval_limit validation items choose the step kept (each read paired
    with step 0's on the same items); the next cfg.heldout items are read only at the end, for
    step 0 and the step kept: no choice is made on them, so their difference is an honest one."""
    train_set, validation = task.load("train"), task.load("validation")
    val_set, heldout_set = validation[:cfg.eval_limit], validation[cfg.eval_limit:cfg.eval_limit + cfg.heldout]
    if cfg.heldout and len(heldout_set) < cfg.heldout:
        raise SystemExit(f"--heldout {cfg.heldout}: {task.name} has {len(validation)} validation items, "
                         f"{cfg.eval_limit} of them for --eval-limit, so at most {len(heldout_set)} are left")
    if cfg.max_difficulty is not None:  # validation stays the whole distribution: it measures the goal
        train_set = [ex for ex in train_set if task.difficulty(ex) <= cfg.max_difficulty]
        print(f"curriculum: {len(train_set)} training questions of difficulty <= {cfg.max_difficulty}")
    if cfg.objective == "nll":
        require_references(task, train_set)
    torch.manual_seed(cfg.seed)
    wrapper = make_wrapper(cfg, model, model_dir)
    if cfg.init:  # start from another run's expert (e.g. next-token prediction's: the format, then RL)
        wrapper.load_state(wrapper.load_expert(cfg.init).p)
        print(f"starting from {cfg.init}")
    n_params = sum(p.numel() for p in wrapper.parameters())
    print(f"{cfg.method} on {cfg.targets}, objective {cfg.objective}: {n_params:,} trainable parameters")
    opt = torch.optim.Adam(wrapper.parameters(), lr=cfg.lr)
    max_new = cfg.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 256)
    completer = Completer(model, tok, max_new, cfg.temperature, batch_size=cfg.rollout_batch, seed=cfg.seed)
    greedy = Completer(model, tok, max_new, 0.0, batch_size=cfg.rollout_batch)  # validation never samples
    main_rank = distributed.is_main()  # under torchrun only rank 0 writes files (every rank prints to its stdout,
    os.makedirs(run_dir, exist_ok=True)  # which distributed.setup sends to /dev/null on the others)
    state_path, log_path = os.path.join(run_dir, "state.pt"), os.path.join(run_dir, "log.jsonl")

    step, best, step0 = 0, {"accuracy": -1.0, "step": -1, "p": None}, {"p": wrapper.state(), "correct": None}
    if resume:
        if not os.path.exists(state_path):
            raise SystemExit(f"--resume: no training state at {state_path}; start without --resume")
        saved = run_state.load_state(state_path, "reinforce")  # no pickled code runs; a GPU run's state loads anywhere
        check_resumable(saved, cfg, model_dir)
        run_state.load_vectors(wrapper, saved, state_path)  # p (and the best, step 0's) against this expert, named
        opt.load_state_dict(saved["optimizer"])  # Adam moves its moments to p's device
        sampled_on = saved.get("generator_device", "cpu")
        if sampled_on != completer.generator.device.type:  # the two generators' states do not convert
            raise SystemExit(f"--resume: {run_dir} sampled its rollouts on {sampled_on}, this run is on "
                             f"{completer.generator.device.type}; resume it with --device {sampled_on}")
        completer.generator.set_state(saved["generator"])
        step, best, step0 = saved["step"], saved["best"], saved.get("step0", step0)
        # drop log rows of a step that was in progress when the run stopped
        rows = run_state.log_until(log_path, step, state_path)  # refuses a step past the log's last
        if main_rank:
            with open(log_path, "w") as f:
                f.writelines(rows)
        print(f"resuming {run_dir} at step {step} (best validation accuracy {best['accuracy']:.4f})")
    elif os.path.exists(state_path):
        raise SystemExit(f"{state_path} exists: pass --resume to continue that run, or choose another --run-dir")
    elif main_rank:
        open(log_path, "w").close()
    distributed.barrier()  # no rank checks for state.pt after rank 0 has begun writing it

    def log(row):
        if main_rank:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def read(examples):  # under torchrun each process reads its share of the items, and all get every record
        with torch.no_grad(), wrapper.applied():
            return evaluate(task, examples, greedy, batch_size=len(examples), progress=False,
                            map_batch=distributed.map_items if distributed.world_size() > 1 else None)

    def save_expert(p, **info):
        if main_rank:
            wrapper.save_expert(out, p, **info)

    def expert_info(**extra):
        return dict(task=task.name, prompt=task.prompt, steps=best["step"], val_accuracy=best["accuracy"],
                    val_items=len(val_set), trainable_params=n_params, config=dataclasses.asdict(cfg),
                    dtype=str(next(model.parameters()).dtype).removeprefix("torch."), **extra)  # --dtype: not in cfg

    timing = {"validation_s": None, "steps_done": 0}  # this process's measures, for the pace said after step 1

    def validate():
        t0 = time.perf_counter()
        reset_peak_rss()  # validation's own peak: 64 long answers decoded at once can top a step's (MBPP)
        res = read(val_set)
        correct = [r.correct for r in res.records]
        if step0["correct"] is None:
            step0["correct"] = correct
        diff, lo, hi = paired(step0["correct"], correct)
        print(f"eval step {step} | validation accuracy {res.accuracy:.4f} ({res.correct}/{res.n}) "
              f"| vs step 0 {diff:+.4f} ({lo:+.4f} to {hi:+.4f}) | unparsable {res.unparsable:.1%} "
              f"| {time.perf_counter() - t0:.1f}s | peak {peak_rss_since_reset_gib():.2f} GiB", flush=True)
        timing["validation_s"] = time.perf_counter() - t0
        log({"kind": "eval", "step": step, "accuracy": res.accuracy, "unparsable": res.unparsable,
             "vs_step0": [diff, lo, hi], "validation_peak_rss_gib": peak_rss_since_reset_gib()})
        distributed.check_same(distributed.digest(wrapper.state()), f"p at step {step}")
        if res.accuracy > best["accuracy"]:
            best.update(accuracy=res.accuracy, step=step, p=wrapper.state())
            save_expert(best["p"], **expert_info())
            print(f"  new best: wrote {out}")

    def read_heldout():
        """Step 0 and the step kept on the held-out items, paired; written into the expert's info."""
        t0, now = time.perf_counter(), wrapper.state()
        results = []
        for p in (step0["p"], best["p"]):
            wrapper.load_state(p)
            results.append([r.correct for r in read(heldout_set).records])
        wrapper.load_state(now)
        a, b = (sum(r) / len(r) for r in results)
        diff, lo, hi = paired(*results)
        print(f"held out ({len(heldout_set)} validation items no choice was made on): step 0 {a:.4f}, "
              f"step {best['step']} {b:.4f}, paired {diff:+.4f} ({lo:+.4f} to {hi:+.4f}) | "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        log({"kind": "heldout", "step": step, "best_step": best["step"], "step0_accuracy": a, "accuracy": b,
             "paired": [diff, lo, hi], "items": len(heldout_set)})
        save_expert(best["p"], **expert_info(heldout_items=len(heldout_set), heldout_accuracy=b,
                                                          heldout_step0_accuracy=a, heldout_paired=[diff, lo, hi]))

    def save_state():
        if main_rank:
            run_state.save_state({"p": wrapper.state(), "optimizer": opt.state_dict(), "step": step, "best": best,
                                  "step0": step0, "generator": completer.generator.get_state(),
                                  "generator_device": completer.generator.device.type,
                                  "config": dataclasses.asdict(cfg), "model_dir": model_dir}, state_path, "reinforce")

    # A kill (SIGTERM) unwinds like Ctrl-C; the state of the last finished step is already on disk.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupt)
    t_start = time.perf_counter()
    try:
        if not resume:  # a resumed run validated its step 0 before it stopped
            validate()  # step 0: W' = W up to float error (or --init's expert)
            save_state()
        while step < cfg.steps:
            t_step = time.perf_counter()
            reset_peak_rss()  # the step's own peak, apart from the run's (chat.py says why)
            batch = step_batch(task, train_set, step, cfg)  # the whole batch, alike on every process
            opt.zero_grad(set_to_none=True)
            if distributed.world_size() > 1:  # each process its own stream, a pure function of the step
                completer.generator.manual_seed(cfg.seed * 1000003 + step * 1009 + distributed.rank())
            if cfg.objective == "nll":  # the reference answers are the targets: no rollouts
                rows = [i for q in distributed.shard(len(batch) // cfg.samples)
                        for i in range(q * cfg.samples, (q + 1) * cfg.samples)]
                prompts = [completer.encode(batch[i].messages) for i in rows]
                targets = reference_targets(task, batch, tok)
                row = nll_step(wrapper, model, prompts, targets, cfg, tok.pad_id, rows=rows,
                               reduce=distributed.sum_over_ranks if distributed.world_size() > 1 else None)
                row["tokens"] = sum(map(len, targets))
                shown = f"nll {row['loss']:.4f} | tokens {row['tokens']}"
            else:
                row = rollouts_and_gradient(wrapper, model, tok, completer, task, batch, cfg)
                shown = (f"reward {row['reward']:+.3f} | acc {row['accuracy']:.3f} | answered {row['answered']:.3f}"
                         + (f" | mixed {row['mixed']}/{len(batch) // cfg.samples}" if "mixed" in row else "")
                         + f" | kl {row['kl']:.2e}")
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapper.parameters(), cfg.clip).item()
            opt.step()
            release_freed_memory()  # the backward's activations: the next rollouts start from the live set
            step += 1
            # memory: resident now (after the release: what the next step starts from, flat unless
            # something grows), this step's peak, the run's peak so far (RESULTS.md, issue 38)
            peak_gib, mem = peak_rss_gib(), {"rss_gib": rss_gib(), "step_peak_rss_gib": peak_rss_since_reset_gib()}
            row = {"kind": "step", "step": step, **row, "grad_norm": grad_norm, **mem, "peak_rss_gib": peak_gib}
            log(row)
            cos = "n/a" if row["grad_cos"] is None else f"{row['grad_cos']:+.3f}"
            times = " ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in row.items() if k.endswith("_s"))
            print(f"step {step:4d}/{cfg.steps} | {shown} | |g| {grad_norm:.2e} | cos(halves) {cos} | {times}"
                  + (f" | rss {mem['rss_gib']:.2f} GiB, step peak {mem['step_peak_rss_gib']:.2f}" if mem["rss_gib"] else "")
                  + f" | peak {peak_gib:.2f} GiB", flush=True)
            timing["steps_done"] += 1
            if timing["steps_done"] == 1 and step < cfg.steps:  # how long the rest takes at this step's pace
                print(pace(step, cfg, time.perf_counter() - t_step, timing["validation_s"],
                           len(heldout_set) / max(len(val_set), 1)), flush=True)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                validate()
            save_state()
        if heldout_set:
            read_heldout()
    except KeyboardInterrupt:
        print(f"\ninterrupted after step {step}; the state is in {state_path}: continue with --resume")
        sys.exit(130)
    if main_rank:
        plot(log_path, os.path.join(run_dir, "progress.png"))
    print(f"done: {cfg.steps} steps in {time.perf_counter() - t_start:.0f}s; best validation accuracy "
          f"{best['accuracy']:.4f} at step {best['step']}, expert in {out}; {n_params:,} trainable parameters; peak RSS "
          f"{peak_rss_gib():.2f} GiB")
    return best


def paired(a, b):
    """b's accuracy minus a's over the same items (lists of bools), with its 95% interval: (diff, lo, hi)."""
    records = lambda c: SimpleNamespace(records=[SimpleNamespace(id=i, correct=x) for i, x in enumerate(c)])  # noqa: E731
    diff, lo, hi, _ = paired_difference(records(a), records(b))
    return diff, lo, hi


def main(argv=None):
    d = TrainConfig()
    recipe_default = "(default: the task's recipe, see RECIPES)"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap, batch_size=None, batch_help=f"rollouts per step, questions x --samples {recipe_default}; "
                        "the official code's: 256")
    ap.add_argument("--task", default=d.task, help="arc (arc_easy), gsm8k, mbpp, cls, ... (default: %(default)s)")
    ap.add_argument("--recipe", default="shipped", choices=RECIPE_NAMES,
                    help="start from the settings of the task's shipped expert, of the official code, or of the "
                         "task's first try (recipes.TRIES: a quarter of an hour on a laptop) (default: shipped)")
    ap.add_argument("--prompt", default=None, help=f"prompt variant {recipe_default}")
    ap.add_argument("--method", default=None, choices=sorted(DEFAULT_TARGETS),
                    help="svf (default), or lora (lora.py): the paper's baseline")
    ap.add_argument("--objective", default=None, choices=["rl", "nll"],
                    help="rl: REINFORCE (default); nll: next-token prediction of the reference answers")
    ap.add_argument("--targets", default=None, choices=sorted(svf.TARGETS),
                    help=f"matrices to adapt (default: {DEFAULT_TARGETS['svf']} for svf, as the official code; "
                         f"{DEFAULT_TARGETS['lora']} for lora, as the paper's baseline)")
    ap.add_argument("--rank", type=int, default=None, help=f"lora: the rank r (default: {d.rank}, the paper's)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="lora: alpha, W' = W + (alpha/r) B A (default: r)")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps {recipe_default}")
    ap.add_argument("--micro-batch", type=int, default=None, help=f"sequences per backward (default: {d.micro_batch})")
    ap.add_argument("--rollout-batch", type=int, default=None,
                    help=f"rollouts decoded together, and validation items (default: {d.rollout_batch})")
    ap.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default: {d.lr}, official)")
    ap.add_argument("--kl", type=float, default=None, help=f"KL coefficient lambda (default: {d.kl}, official)")
    ap.add_argument("--wrong-reward", type=float, default=None,
                    help="reward of a wrong answer the task can parse (one ARC option); -1 (default) is the "
                         "paper's +1/-1, between -1 and 0 a graded reward that pays for answering (not official)")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="subtract from each reward the mean of its half of the batch (each half its own, so the "
                         "halves' gradients stay independent), or of its question's samples (not official)")
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
    ap.add_argument("--heldout", type=int, default=None,
                    help="validation items after --eval-limit's, read only at the end for step 0 and the step kept")
    ap.add_argument("--init", default=None, help="an expert file of this method and targets to start from "
                    "(e.g. a run of --objective nll), instead of the official initial p")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=None, help="expert file (default: experts/<task>.safetensors, arc for ARC-Easy; "
                    "<run dir>.safetensors where the settings are not the recipe of an expert in experts/)")
    ap.add_argument("--run-dir", default=None, help="training state and logs (default: runs/<task>-<targets>, "
                    "runs/<task>-<method>-<objective>-<targets> for other methods or objectives)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:  # --recipe try for a task without one
        ap.error(str(e))
    if min(cfg.steps, cfg.eval_every, cfg.micro_batch, cfg.eval_limit, cfg.rollout_batch) < 1 or cfg.heldout < 0:
        ap.error("--steps, --eval-every, --micro-batch, --rollout-batch and --eval-limit must be at least 1, "
                 "--heldout at least 0")
    if not -1.0 <= cfg.wrong_reward <= 0.0:
        ap.error(f"--wrong-reward must be between -1 (the paper's) and 0; found {cfg.wrong_reward}")
    if cfg.init is not None and not os.path.isfile(cfg.init):
        ap.error(f"--init {cfg.init}: no such expert file")
    if cfg.kl < 0 or cfg.temperature < 0 or cfg.lr <= 0:
        ap.error("--kl and --temperature must be >= 0 and --lr > 0")
    if cfg.samples < 1 or cfg.batch_size % cfg.samples:
        ap.error(f"--samples must be >= 1 and divide --batch-size ({cfg.batch_size})")
    if cfg.samples > 1 and cfg.temperature == 0:
        ap.error("--samples > 1 needs --temperature > 0: greedy rollouts of one question are identical")
    if cfg.method != "lora" and (args.rank is not None or args.lora_alpha is not None):
        ap.error("--rank and --lora-alpha set LoRA's factors: add --method lora")
    if cfg.rank < 1 or (cfg.lora_alpha is not None and cfg.lora_alpha <= 0):
        ap.error("--rank must be at least 1 and --lora-alpha above 0")
    if cfg.objective == "nll" and (cfg.kl > 0 or cfg.samples > 1):
        ap.error(f"--kl and --samples shape the RL objective; --objective nll has no rollouts to apply them to "
                 f"(found kl={cfg.kl}, samples={cfg.samples}, the {cfg.task} recipe's unless given: add --kl 0 --samples 1)")
    task = get_task(cfg.task, prompt=cfg.prompt, data_dir=args.data_dir)
    if cfg.shuffle_options and not hasattr(task, "shuffled"):
        ap.error(f"--shuffle-options needs a multiple-choice task (arc_easy, arc_challenge), not {task.name}")
    default_run_dir, default_out = default_names(cfg, task.name)
    if args.recipe == "try":  # a try shares no run directory with the recipe it samples, and never writes experts/
        default_run_dir = os.path.join("runs", f"{task.name}-try")
        default_out = os.path.normpath(args.run_dir or default_run_dir) + ".safetensors"
    print(f"recipe {args.recipe} for {task.name}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    if args.recipe != "try" and args.out is None and os.path.exists(default_out) and cfg != recipe(task.name):
        default_out = os.path.normpath(args.run_dir or default_run_dir) + ".safetensors"  # only the recipe replaces one
        print(f"these settings are not the recipe of {expert_path(task.name)}, which stays: "
              f"the expert goes to {default_out} (--out to choose)")
    train_set = task.load("train")  # fail on missing data before loading the model
    if cfg.objective == "nll":
        try:
            require_references(task, train_set)
        except ValueError as e:
            ap.error(str(e))
        if cfg.baseline or cfg.temperature > 0:
            print("objective nll: --baseline and --temperature shape RL's rollouts and are not used")
    distributed.check_device(args.device)
    model, tok, model_dir = load(args)
    return train(cfg, model, tok, model_dir, task, args.run_dir or default_run_dir, args.out or default_out, args.resume)


if __name__ == "__main__":
    distributed.run(main)  # torchrun --nproc_per_node N reinforce.py ...: one process per rank (distributed.py)
