"""Two-pass self-adaptive inference: Transformer-Squared section 3.2, Tables 2 and 3.

Pass 1 looks at the question and chooses z'; pass 2 answers with W' = U diag(sigma * z') Vh (svf.py).

    python adapt.py --strategy cls --code-expert base --math-expert base \
        --question "Which gas do plants take in from the air to make food?"
    python adapt.py --strategy prompt --question "Write a Python function that reverses a list."
    python adapt.py --strategy cls --task arc_challenge --split test --limit 100
    python adapt.py --strategy fewshot --task arc_challenge          # the mix cem.py wrote for the task
    python adapt.py --strategy cls --task cls --split validation --classify-only   # routing accuracy

A strategy refuses to start while an expert it routes to is missing. experts/gsm8k.safetensors and
experts/mbpp.safetensors ship, but on the default model both were best at step 0 (RESULTS.md), so
`--code-expert base --math-expert base`, as in the first command, gives nearly the same answers (their
initial z rescales each singular value by about 0.4%) and skips their recomposition.

Strategies (the expert of each category: --code-expert, --math-expert, --reasoning-expert):
- prompt: the base model classifies the question with the classification prompt (data/cls.py) into
  code, math, reasoning or other; pass 2 uses that category's expert. "other", and an answer that
  names no category, mean the base weights.
- cls: the same with the classification expert (reinforce.py --task cls) applied during pass 1.
- fewshot: z' = sum_k alpha_k z_k with the alpha that cem.py found for the task. The search ran once
  per task beforehand (its time is printed); pass 1 is then only the mix.
- base, expert: the reference rows of Table 2 (base weights; one expert for every question). The
  expert may be a LoRA file (reinforce.py --method lora), the paper's baseline; the other
  strategies mix or route between SVF experts and refuse one.

An evaluation classifies the whole split in batches, then groups the questions by the chosen expert
and answers each group with that expert applied once: W' is recomposed once per expert and swapped
in. Switching never reloads the model (svf.SVF.applied swaps tensors and restores the base weights
bit-exactly); what a switch costs, recomposition and swap in + out, is measured and printed, with
the accuracy (95% interval), the routing confusion matrix (true category of the task vs chosen)
and the time of each pass (Table 3).

On several GPUs, `torchrun --nproc_per_node N adapt.py --task T ...` (distributed.py) gives each
process every N-th item; each runs both passes on its share, and the records, choices and routing
are gathered in item order. Rank 0 alone prints and writes --out; the times of each pass are then
summed over the N processes (the cost, whose pass-1/pass-2 ratio is Table 3's), and --out records
world_size.

Nothing leaks: with fewshot, the shots cem.py searched on are removed from the split evaluated;
--exclude-shots FILE removes them for the other strategies too, so all rows share their items and
--compare gives item-by-item (paired) differences. Table 2 and 3, one command per cell:

    T=arc_challenge   # then T=math500, T=humaneval
    P="--prompt first --max-new-tokens 32"   # the prompt experts/arc.safetensors learned; P="" for the others
    python cem.py --task $T $P --experts experts/arc.safetensors experts/gsm8k.safetensors experts/mbpp.safetensors
    X="--task $T $P --exclude-shots experts/fewshot-$T.safetensors"
    python adapt.py --strategy base $X --out runs/t2-$T-base.json
    for e in arc gsm8k mbpp; do python adapt.py --strategy expert --expert experts/$e.safetensors $X \
        --out runs/t2-$T-$e.json --compare runs/t2-$T-base.json; done
    for s in prompt cls fewshot; do python adapt.py --strategy $s $X --out runs/t2-$T-$s.json \
        --compare runs/t2-$T-base.json; done
    python adapt.py --strategy prompt --task cls --split validation --classify-only   # and cls
"""

import argparse
import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields

import torch

import distributed
import svf
from cem import load_experts, mix_from_file, say
from lora import load_adapter_for
from data import get_task
from data.evaluate import compare_line
from data.cls import ClsTask, extract_label
from data.evaluate import Record, Result
from chat import MAX_NEW_TOKENS, Completer, add_model_arguments, choose_prompt, load

CATEGORIES = ("code", "math", "reasoning", "other")
TASK_CATEGORY = {"arc_easy": "reasoning", "arc_challenge": "reasoning", "gsm8k": "math", "math": "math",
                 "math500": "math", "mbpp": "code", "humaneval": "code"}
STRATEGIES = ("prompt", "cls", "fewshot", "base", "expert")
TRAIN = {"code": "mbpp", "math": "gsm8k", "reasoning": "arc", "cls": "cls"}  # the task each expert learns


@dataclass
class AdaptConfig:
    strategy: str = "prompt"
    code_expert: str = "experts/mbpp.safetensors"  # "base": answer this category with the base weights
    math_expert: str = "experts/gsm8k.safetensors"
    reasoning_expert: str = "experts/arc.safetensors"
    cls_expert: str = "experts/cls.safetensors"
    cls_prompt: str = None  # None: the prompt the cls expert was trained with, else the cls task's default
    expert: str = None  # strategy "expert"
    fewshot: str = None  # strategy "fewshot": a file written by cem.py
    batch_size: int = 16

    def routes(self):
        """{choice: expert file, or None for the base weights}: what pass 2 may apply."""
        if self.strategy in ("prompt", "cls"):
            return {c: None if getattr(self, f"{c}_expert") == "base" else getattr(self, f"{c}_expert")
                    for c in CATEGORIES[:3]} | {"other": None}
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        return {self.strategy: {"base": None, "expert": self.expert, "fewshot": self.fewshot}[self.strategy]}

    def files(self):
        """[(flag, path, how to make it)] of every expert file the strategy needs."""
        out = [(f"--{c}-expert", p, f"python reinforce.py --task {TRAIN[c]}, or --{c}-expert base")
               for c, p in self.routes().items() if p and c in TRAIN]
        out += [("--cls-expert", self.cls_expert, "python reinforce.py --task cls")] if self.strategy == "cls" else []
        out += [("--expert", self.expert, "python reinforce.py")] if self.strategy == "expert" else []
        return out + ([("--fewshot", self.fewshot, "python cem.py")] if self.strategy == "fewshot" else [])


class Adapter:
    """Two passes around one model: choose(problems) picks a choice per question (pass 1), answer()
    generates with the weights of each choice (pass 2). `classify` (list of question texts -> list
    of labels) replaces the model's classification, e.g. in tests; it runs with the cls expert applied."""

    def __init__(self, model, tok, model_dir, cfg, classify=None, log=say, **svf_kwargs):
        self.cfg, self.tok, self.log = cfg, tok, log
        self.routes = cfg.routes()
        self.timing = dict(pass1_s=0.0, pass2_s=0.0, recompose_s=0.0, swap_s=0.0, switches=0, mix_s=0.0)
        files = [p for _, p, _ in cfg.files()]
        if cfg.strategy == "expert":  # one file, never mixed: SVF or LoRA (told apart by its header)
            self.wrapper, expert = load_adapter_for(model, model_dir, cfg.expert, log=log, **svf_kwargs)
            loaded = {cfg.expert: expert}
        else:
            self.wrapper, experts = load_experts(model, model_dir, files, log=log, **svf_kwargs) if files else (None, [])
            loaded = dict(zip(files, experts))
        t0 = time.perf_counter()
        # choice -> what self.wrapper.weights() takes: z' {name: (r,)} for SVF, a LoRA file's factors
        # {key: A or B}; None for the base weights
        self.z, self.fewshot_info = {}, None
        for choice, path in self.routes.items():
            if path is None:
                self.z[choice] = None
            elif choice == "fewshot":
                self.z[choice], self.fewshot_info = mix_from_file(self.wrapper, path)
            elif isinstance(self.wrapper, svf.SVF):
                self.z[choice] = self.wrapper.scales(loaded[path].p)
            else:
                self.z[choice] = loaded[path].p
        self.timing["mix_s"] = time.perf_counter() - t0
        if cfg.strategy == "fewshot":  # pass 1 of fewshot: read alpha and the experts, mix them
            self.timing["pass1_s"] = self.timing["mix_s"]
        cls_expert = loaded.get(cfg.cls_expert) if cfg.strategy == "cls" else None
        self.cls_weights = None
        if cls_expert is not None:  # recomposed once, part of pass 1's time
            t0 = time.perf_counter()
            with torch.no_grad():
                self.cls_weights = self.wrapper.weights(self.wrapper.scales(cls_expert.p))
            self.timing["pass1_s"] += time.perf_counter() - t0
            self.timing["recompose_s"] += time.perf_counter() - t0
        self.cls_task = ClsTask(prompt=choose_prompt("cls", cfg.cls_prompt, cls_expert and cls_expert.info))
        self.cls_completer = Completer(model, tok, MAX_NEW_TOKENS["cls"], batch_size=cfg.batch_size)
        self.classify = classify or self.classify_with_model

    def classify_with_model(self, problems):
        """Pass 1 of prompt/cls: the label the model gives each question, "other" when it names none."""
        prompts = [self.cls_completer.encode(self.cls_task.messages({"problem": p})) for p in problems]
        self.said = [self.tok.decode(ids) for ids in self.cls_completer.generate_ids(prompts)]  # kept for display
        return [extract_label(text) or "other" for text in self.said]

    def choose(self, problems):
        """Pass 1: one key of self.routes per question."""
        if self.cfg.strategy not in ("prompt", "cls"):
            return [self.cfg.strategy] * len(problems)
        t0 = time.perf_counter()
        if self.cls_weights is not None:
            with self.wrapper.applied(weights=self.cls_weights):
                labels = self.classify(problems)
        else:
            labels = self.classify(problems)
        self.timing["pass1_s"] += time.perf_counter() - t0
        return [label if label in self.routes else "other" for label in labels]

    def answer(self, prompts, choices, completer, progress=False):
        """Pass 2: generated token lists. The prompts of one choice are answered under one swap of W'."""
        out = [None] * len(prompts)
        for choice, z in self.z.items():
            idx = sorted((i for i, c in enumerate(choices) if c == choice), key=lambda i: len(prompts[i]))
            if not idx:
                continue
            t0 = time.perf_counter()
            weights = None
            if z is not None:
                with torch.no_grad():
                    weights = self.wrapper.weights(z)
                self.timing["recompose_s"] += time.perf_counter() - t0
            t1 = time.perf_counter()
            with self.wrapper.applied(weights=weights) if weights is not None else contextlib.nullcontext():
                t2 = time.perf_counter()
                for s in range(0, len(idx), completer.batch_size):
                    chunk = idx[s:s + completer.batch_size]
                    for i, ids in zip(chunk, completer.generate_ids([prompts[i] for i in chunk])):
                        out[i] = ids
                    if progress:
                        done = s + len(chunk)
                        rate = done / (time.perf_counter() - t0)
                        self.log(f"pass 2 | {choice} | {done}/{len(idx)} | {rate:.2f} items/s")
                t3 = time.perf_counter()
            if weights is not None:  # the base weights need no swap
                self.timing["swap_s"] += (t2 - t1) + (time.perf_counter() - t3)
                self.timing["switches"] += 1
            self.timing["pass2_s"] += time.perf_counter() - t0
        return out


def evaluate(adapter, task, examples, completer, split="custom", category=None, classify_only=False, log=say):
    """(Result or None, confusion Counter {(true, chosen): n}, choices) over `examples`."""
    true = [ex.answer if task.name == "cls" else category or TASK_CATEGORY.get(task.name, "other") for ex in examples]
    choices, bs = [], completer.batch_size
    for s in range(0, len(examples), bs):
        choices += adapter.choose([ex.problem for ex in examples[s:s + bs]])
        if adapter.cfg.strategy in ("prompt", "cls"):
            rate = len(choices) / max(adapter.timing["pass1_s"], 1e-9)
            log(f"pass 1 | {len(choices)}/{len(examples)} | {rate:.2f} items/s")
    confusion = Counter(zip(true, choices))
    if classify_only:
        return None, confusion, choices
    ids = adapter.answer([completer.encode(ex.messages) for ex in examples], choices, completer, progress=True)
    outputs = [adapter.tok.decode(i) for i in ids]
    correct = task.score_many(examples, outputs)
    result = Result(task.name, split, task.prompt, wall_s=adapter.timing["pass1_s"] + adapter.timing["pass2_s"])
    result.records = [Record(ex.id, ex.messages, out, task.extract(out, ex), ex.answer, bool(c))
                      for ex, out, c in zip(examples, outputs, correct)]
    return result, confusion, choices


def gather(adapter, result, confusion, choices):
    """(Result, confusion, choices) of every process's share (torchrun), in item order, the same
    on every process; adapter.timing becomes the sum over the processes, result.wall_s the longest."""
    choices = distributed.gather_objects(choices)
    confusion = sum(distributed.gather_objects([confusion]), Counter())
    timings = distributed.gather_objects([adapter.timing])
    adapter.timing = {k: sum(t[k] for t in timings) for k in adapter.timing}
    if result is not None:
        result.records = distributed.gather_objects(result.records)
        result.wall_s = max(distributed.gather_objects([result.wall_s]))
    return result, confusion, choices


def report(adapter, confusion, n, log=say):
    """Prints the routing confusion matrix and the time of each pass."""
    t = adapter.timing
    if confusion is not None and adapter.cfg.strategy in ("prompt", "cls"):
        log("routing: rows are the true category, columns the chosen one")
        log(f"{'':>10}" + "".join(f"{c:>10}" for c in CATEGORIES))
        for row in sorted({r for r, _ in confusion}, key=CATEGORIES.index):
            log(f"{row:>10}" + "".join(f"{confusion[(row, c)]:>10}" for c in CATEGORIES))
        right = sum(confusion[(c, c)] for c in CATEGORIES)
        log(f"routing accuracy {right / max(n, 1):.4f} ({right}/{n})")
    if adapter.fewshot_info:
        alpha = torch.tensor(adapter.fewshot_info["alpha"], device="cpu")  # (K,) or (K, n_matrices)
        log(f"few-shot alpha {[round(a, 4) for a in (alpha.mean(-1) if alpha.dim() > 1 else alpha).tolist()]} "
            f"for {[e['path'] for e in adapter.fewshot_info['experts']]}; found by cem.py once per task in "
            f"{adapter.fewshot_info.get('wall_s', 0):.0f}s; reading and mixing here {t['mix_s'] * 1e3:.1f} ms")
    ratio = f" = {t['pass1_s'] / t['pass2_s']:.1%} of pass 2" if t["pass2_s"] else ""
    log(f"pass 1 {t['pass1_s']:.2f}s{ratio}; pass 2 {t['pass2_s']:.2f}s ({n} questions)")
    if t["switches"]:
        log(f"switching experts: recompose W' {t['recompose_s']:.3f}s in all; swap in + out "
            f"{t['swap_s'] / t['switches'] * 1e3:.3f} ms each ({t['switches']} swaps); the model is never reloaded")


def shot_ids(path, task_name):
    """The ids of the shots a cem.py run searched on (to leave out of an evaluation)."""
    info = svf.file_info(path)
    if info.get("kind") != "fewshot-mix":
        raise SystemExit(f"{path} is not a few-shot mix written by cem.py")
    if info["task"] != task_name:
        raise SystemExit(f"{path} was searched for task {info['task']}, not {task_name}")
    return set(info["shots"]["ids"])


def main(argv=None):
    d = AdaptConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--strategy", choices=STRATEGIES, default=d.strategy, help="(default: %(default)s)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", help="answer this one question")
    what.add_argument("--task", help="evaluate on a task: arc_challenge, math500, humaneval, cls, ...")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"], help="(default: test)")
    ap.add_argument("--prompt", default=None, help="the task's prompt variant (default: the task's default)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: per task, 256 for --question")
    for c in CATEGORIES[:3]:
        ap.add_argument(f"--{c}-expert", default=getattr(d, f"{c}_expert"), help="(default: %(default)s; 'base': none)")
    ap.add_argument("--cls-expert", default=d.cls_expert, help="pass-1 expert of --strategy cls (default: %(default)s)")
    ap.add_argument("--cls-prompt", default=None, choices=sorted(ClsTask.prompts), help="(default: the cls expert's)")
    ap.add_argument("--expert", default=None, help="the expert of --strategy expert: SVF, or LoRA (reinforce.py --method lora)")
    ap.add_argument("--fewshot", default=None, help="cem.py's mix (default: experts/fewshot-<task>.safetensors)")
    ap.add_argument("--exclude-shots", default=None, help="leave out the shots of this cem.py mix")
    ap.add_argument("--classify-only", action="store_true", help="run pass 1 only: routing accuracy")
    ap.add_argument("--out", default=None, help="write records, choices, the routing and timings to this JSON file")
    ap.add_argument("--compare", default=None,
                    help="a result saved by --out (or evaluate_model.py --out) to compare with, item by item")
    args = ap.parse_args(argv)
    if args.strategy == "expert" and not args.expert:
        ap.error("--strategy expert needs --expert FILE")
    if args.strategy == "fewshot" and not args.fewshot:
        if not args.task:
            ap.error("--strategy fewshot with --question needs --fewshot FILE (written by cem.py)")
        args.fewshot = os.path.join("experts", f"fewshot-{get_task(args.task).name}.safetensors")
    if args.classify_only:  # pass 2 never runs, so its experts need not exist yet
        args.code_expert = args.math_expert = args.reasoning_expert = "base"
    cfg = AdaptConfig(**{f.name: getattr(args, f.name) for f in fields(AdaptConfig)})
    for flag, path, how in cfg.files() + [("--exclude-shots", args.exclude_shots, "python cem.py"),
                                          ("--compare", args.compare, "adapt.py --out")]:
        if path and not os.path.exists(path):
            ap.error(f"{flag} {path}: no such file (make it with {how})")

    if args.question:
        model, tok, model_dir = load(args)
        adapter = Adapter(model, tok, model_dir, cfg)
        choice = adapter.choose([args.question])[0]
        said = f" (the classifier said {adapter.said[0]!r})" if getattr(adapter, "said", None) else ""
        say(f"pass 1: {choice}{said} -> {adapter.routes[choice] or 'base weights'}")
        completer = Completer(model, tok, args.max_new_tokens or 256, batch_size=1)
        ids = adapter.answer([completer.encode([{"role": "user", "content": args.question}])], [choice], completer)[0]
        say(tok.decode(ids))
        return report(adapter, None, 1)

    task = get_task(args.task, prompt=args.prompt, data_dir=args.data_dir)
    if task.name == "cls" and not args.classify_only:
        ap.error("--task cls measures routing: add --classify-only")
    examples = task.load(args.split)  # fail on missing data before loading the model
    if cfg.strategy == "fewshot":  # alpha was fitted to the outputs of one prompt; another would need its own search
        searched = svf.file_info(cfg.fewshot).get("prompt")
        if searched != task.prompt:
            ap.error(f"--fewshot {cfg.fewshot} was searched with --prompt {searched}, and this run uses "
                     f"--prompt {task.prompt}; pass --prompt {searched}, or search again with cem.py --prompt {task.prompt}")
    mixes = sorted({p for p in (args.exclude_shots, cfg.fewshot if cfg.strategy == "fewshot" else None) if p})
    if mixes:
        leave = set().union(*(shot_ids(path, task.name) for path in mixes))
        kept = [ex for ex in examples if ex.id not in leave]
        say(f"left out {len(examples) - len(kept)} items that cem.py used as shots ({', '.join(mixes)})")
        examples = kept
    examples = examples[:args.limit] if args.limit is not None else examples
    distributed.check_device(args.device)
    model, tok, model_dir = load(args)
    adapter = Adapter(model, tok, model_dir, cfg)
    completer = Completer(model, tok, args.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 256),
                          batch_size=args.batch_size)
    mine = [examples[i] for i in distributed.shard(len(examples))]  # all of them in one process
    result, confusion, choices = evaluate(adapter, task, mine, completer, args.split,
                                          classify_only=args.classify_only)
    if distributed.world_size() > 1:
        result, confusion, choices = gather(adapter, result, confusion, choices)
    if result is not None:
        say(f"{args.strategy}: {result.summary()}")
    report(adapter, confusion, len(examples))
    if result is not None and args.compare:
        say(compare_line(args.compare, result))
    if args.out and distributed.is_main():  # the Result's fields (pass 2), the routing, the choice of each item, timings
        saved = dict(task=task.name, split=args.split, prompt=task.prompt, strategy=args.strategy, timing=adapter.timing,
                     settings=dict(world_size=distributed.world_size()),
                     confusion=[dict(true=t, chosen=c, n=n) for (t, c), n in sorted(confusion.items())])
        if result is not None:
            saved.update(accuracy=result.accuracy, ci95=result.ci95(), n=result.n,
                         records=[dict(asdict(r), choice=c) for r, c in zip(result.records, choices)])
        else:
            saved.update(n=len(examples), choices=[dict(id=ex.id, choice=c) for ex, c in zip(examples, choices)])
        with open(args.out + ".tmp", "w") as f:
            json.dump(saved, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)
    return result


if __name__ == "__main__":
    distributed.run(main)
