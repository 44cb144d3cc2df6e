"""Evaluate a checkpoint, optionally with an SVF expert, on any task and split.

    python evaluate_model.py --task arc_easy --split test
    python evaluate_model.py --task arc_easy --split test --expert experts/arc.safetensors
    python evaluate_model.py --task gsm8k --split validation --limit 200 --prompt official
    python evaluate_model.py --task gsm8k --split test --out runs/gsm8k.json --resume

Prints one progress line per batch and a summary (accuracy with its 95% interval, unparsable rate,
wall time), and with --out writes every prompt, output and extracted answer as JSON, after every
batch; `--resume` continues an interrupted run from that file (or extends a --limit run).

`Completer` is the bridge between a model and the tasks in data/: it renders chat messages with the
checkpoint's template and generates with model.generate. reinforce.py and adapt.py use it too.
"""

import argparse
import os

import torch

import checkpoints
import svf
from data import Result, add_data_dir_argument, evaluate, get_task
from data.evaluate import check_same_run
from model import generate, load_model
from tokenizer import Tokenizer

# Generation budget per task: enough for the prompt formats in data/ (a letter and the option's
# text for ARC, a worked solution for math, a function for code) and not much more.
MAX_NEW_TOKENS = {"arc_easy": 64, "arc_challenge": 64, "cls": 16, "gsm8k": 320, "math": 512,
                  "math500": 512, "mbpp": 320, "humaneval": 384}


class Completer:
    """complete_fn for data.evaluate: list of chat message lists -> list of completions.

    A message list that ends with an assistant message is a prefill: the completion continues it.
    Prompts are generated in batches of `batch_size`, sorted by length so that little is padding.
    """

    def __init__(self, model, tok, max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=16, seed=0):
        self.model, self.tok = model, tok
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def encode(self, messages):
        if messages[-1]["role"] == "assistant":  # continue the prefill: no end-of-turn after it
            return self.tok.chat(messages[:-1]) + self.tok.encode(messages[-1]["content"])
        return self.tok.chat(messages)

    def generate_ids(self, prompts):
        """prompts: list of token lists -> list of generated token lists (stop token excluded)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            new = generate(self.model, [prompts[i] for i in idx], self.max_new_tokens, self.temperature,
                           self.top_p, self.tok.stop_tokens, self.tok.pad_id, self.generator)
            for i, ids in zip(idx, new):
                out[i] = ids
        return out

    def __call__(self, message_lists):
        return [self.tok.decode(ids) for ids in self.generate_ids([self.encode(m) for m in message_lists])]


def add_model_arguments(ap):
    """The flags every script shares for choosing and running a checkpoint."""
    ap.add_argument("--model", default=None, help="Hugging Face checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    add_data_dir_argument(ap)


def load(args):
    """(model, tokenizer, model_dir) from the shared flags."""
    path = checkpoints.resolve_model(args.model)
    model, _ = load_model(path, dtype=getattr(torch, args.dtype))
    return model, Tokenizer.from_dir(path), path


def choose_prompt(task_name, prompt=None, info=None):
    """The prompt given (--prompt), else the one an expert was trained with (`info`, svf.file_info),
    where the task has a prompt of that name: an expert answers best in the format it learned.
    None means the task's default."""
    if prompt is not None:
        return prompt
    trained = (info or {}).get("prompt")
    return trained if trained in get_task(task_name).prompts else None


def main():
    ap = argparse.ArgumentParser(description="Evaluate a checkpoint (and optionally an SVF expert) on a task.")
    add_model_arguments(ap)
    ap.add_argument("--task", required=True, help="arc_easy (arc), arc_challenge, gsm8k, mbpp, humaneval, math, math500, cls")
    ap.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    ap.add_argument("--prompt", default=None,
                    help="prompt variant (default: the one --expert was trained with, else the task's default)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    ap.add_argument("--expert", default=None, help="an SVF expert file to apply (see reinforce.py)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: per task, see MAX_NEW_TOKENS")
    ap.add_argument("--out", default=None, help="write per-item records to this JSON file (after every batch)")
    ap.add_argument("--resume", action="store_true", help="skip the items already in --out and add the rest")
    args = ap.parse_args()

    if args.expert and not os.path.exists(args.expert):
        raise SystemExit(f"--expert {args.expert}: no such file (train one with reinforce.py)")
    prompt = choose_prompt(args.task, args.prompt, svf.file_info(args.expert) if args.expert else None)
    if prompt is not None and args.prompt is None:
        print(f"prompt {prompt!r}: the one {args.expert} was trained with (choose another with --prompt)")
    task = get_task(args.task, prompt=prompt, data_dir=args.data_dir)
    task.load(args.split)  # fail on missing data before loading the model
    previous = None
    if args.resume:
        if not args.out or not os.path.exists(args.out):
            raise SystemExit(f"--resume continues the run saved in --out; found no file at {args.out!r}")
        previous = Result.load(args.out)
    path = checkpoints.resolve_model(args.model)
    max_new = args.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 256)
    # what a resumed run must share with the saved one (batch size only changes the speed)
    settings = dict(model=os.path.abspath(path), expert=args.expert and os.path.abspath(args.expert),
                    dtype=args.dtype, max_new_tokens=max_new, temperature=0.0)
    if previous is not None:  # refuse a run made another way now, before loading the model
        try:
            check_same_run(previous, Result(task.name, args.split, task.prompt, settings=settings))
        except ValueError as e:
            raise SystemExit(f"--resume {args.out}: {e}")
    model, tok, path = load(args)
    completer = Completer(model, tok, max_new, batch_size=args.batch_size)
    run = dict(limit=args.limit, batch_size=args.batch_size * 2, previous=previous, out=args.out, settings=settings)
    if args.expert:
        wrapper, expert = svf.load_expert_for(model, path, args.expert)
        with wrapper.applied(wrapper.scales(expert.p)):
            result = evaluate(task, args.split, completer, **run)
    else:
        result = evaluate(task, args.split, completer, **run)
    print(result.summary())


if __name__ == "__main__":
    main()
