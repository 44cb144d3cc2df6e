"""Evaluate a checkpoint, optionally with an expert (SVF or LoRA), on any task and split.

    python evaluate_model.py --task arc_easy --split test
    python evaluate_model.py --task gsm8k --split test --out runs/base-gsm8k.json   # a base row of Table 1
    python evaluate_model.py --task arc_easy --split test --expert experts/arc.safetensors
    python evaluate_model.py --task arc_easy --split test --expert runs/arc_easy-lora-nll-qv.safetensors   # a LoRA
    python evaluate_model.py --task gsm8k --split validation --limit 200 --prompt official
    python evaluate_model.py --task gsm8k --split test --out runs/gsm8k.json --resume
    python evaluate_model.py --task arc_easy --split test --expert E --compare runs/base.json runs/other.json

Prints one progress line per batch and a summary (accuracy with its 95% interval, unparsable rate,
wall time), and with --out writes every prompt, output and extracted answer as JSON, after every
batch; `--resume` continues an interrupted run from that file (or extends a --limit run);
`--compare` prints the paired (item by item) difference with runs saved by --out.

On several GPUs, `torchrun --nproc_per_node N evaluate_model.py ...` (distributed.py): each batch's
items are shared out among the N processes and their records gathered in item order; rank 0 alone
prints and writes --out, whose settings record world_size (a --resume may use another N).

The bridge between the model and the tasks (`Completer`, the shared flags) is chat.py.
"""

import argparse
import os

import checkpoints
import distributed
import svf
from lora import load_adapter_for
from chat import MAX_NEW_TOKENS, Completer, add_model_arguments, choose_prompt, load, resolve_dtype
from data import Result, evaluate, get_task
from data.evaluate import check_same_run, compare_line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--task", required=True, help="arc_easy (arc), arc_challenge, gsm8k, mbpp, humaneval, math, math500, cls")
    ap.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    ap.add_argument("--prompt", default=None,
                    help="prompt variant (default: the one --expert was trained with, else the task's default)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    ap.add_argument("--expert", default=None,
                    help="an expert file to apply: SVF, or LoRA (reinforce.py --method lora); told apart by its header")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: per task, see MAX_NEW_TOKENS")
    ap.add_argument("--out", default=None, help="write per-item records to this JSON file (after every batch)")
    ap.add_argument("--resume", action="store_true", help="skip the items already in --out and add the rest")
    ap.add_argument("--compare", nargs="+", default=[], metavar="FILE",
                    help="results saved by --out (here or adapt.py) to compare with, item by item")
    args = ap.parse_args(argv)
    missing = [p for p in args.compare if not os.path.exists(p)]
    if missing:
        ap.error(f"--compare: no such file(s) {missing} (save a run with --out)")

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
    resolve_dtype(args)  # --dtype auto -> float32 or bfloat16: a resumed run must match what ran
    settings = dict(model=os.path.abspath(path), expert=args.expert and os.path.abspath(args.expert),
                    dtype=args.dtype, max_new_tokens=max_new, temperature=0.0)
    if previous is not None:  # refuse a run made another way now, before loading the model
        try:
            check_same_run(previous, Result(task.name, args.split, task.prompt, settings=settings))
        except ValueError as e:
            raise SystemExit(f"--resume {args.out}: {e}")
    distributed.check_device(args.device)
    model, tok, path = load(args)
    completer = Completer(model, tok, max_new, batch_size=args.batch_size)
    # each process gets two generation batches of every evaluation batch; only rank 0 writes --out
    W = distributed.world_size()
    run = dict(limit=args.limit, batch_size=args.batch_size * 2 * W, previous=previous,
               out=args.out if distributed.is_main() else None, settings=dict(settings, world_size=W),
               progress=distributed.is_main(), map_batch=distributed.map_items if W > 1 else None)
    if args.expert:
        wrapper, _ = load_adapter_for(model, path, args.expert)  # SVF or LoRA, the file's tensors loaded
        with wrapper.applied():
            result = evaluate(task, args.split, completer, **run)
    else:
        result = evaluate(task, args.split, completer, **run)
    print(result.summary())
    for path in args.compare:
        print(compare_line(path, result))
    return result


if __name__ == "__main__":
    distributed.run(main)
