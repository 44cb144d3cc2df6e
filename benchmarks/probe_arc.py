"""Where does the model's ARC knowledge show? Three readings of the same questions, no generation.

    python -m benchmarks.probe_arc --split validation --limit 200 [--expert experts/arc.safetensors]

- `cloze`: the question alone, no options shown. Each option's text is scored by its summed
  log-likelihood as the answer, and the likeliest one wins. This is how small models' ARC scores
  are usually reported (lm-evaluation-harness's multiple-choice mode).
- `options after`: the same scores under the `text` prompt, which lists the options after the question.
- `options first`: the same under the `first` prompt, which lists them before the question.
- `letter`: the `letter` prompt. We read the probabilities of the tokens "A" to "D" at the answer's
  first position. `raw` takes the likeliest letter, which is what greedy decoding answers.
  `calibrated` first subtracts each letter's mean log-probability over all the items. That removes
  a fixed preference for one letter and keeps the part of the choice that depends on the question.

REINFORCE can only reinforce choices the policy already makes. If `calibrated` sits at chance, then
the letter the model writes carries no knowledge of the answer, whatever `cloze` says it knows.
"""

import argparse
import contextlib

import torch

import svf
from data import get_task, wilson_interval
from data.task import system, user
from chat import Completer, add_model_arguments, load
from logprobs import token_logprobs
from model import left_pad

LETTERS = "ABCD"


def option_scores(model, comp, tok, examples, messages, batch_rows=16):
    """[tensor (n_options,)] per example: the summed log-likelihood of each option's text as the answer."""
    rows = [(i, comp.encode(messages(ex)), tok.encode(opt))
            for i, ex in enumerate(examples) for opt in ex.meta["options"]]
    scores = [[] for _ in examples]
    for s in range(0, len(rows), batch_rows):
        chunk = rows[s:s + batch_rows]
        logp, _ = token_logprobs(model, [p for _, p, _ in chunk], [c for _, _, c in chunk], tok.pad_id)
        for (i, _, _), total in zip(chunk, logp.sum(1).tolist()):
            scores[i].append(total)
    return [torch.tensor(s) for s in scores]


def letter_logprobs(model, comp, tok, examples, batch=16):
    """(N, 4): log-probabilities of "A".."D" as the first answer token under the `letter` prompt."""
    ids = [tok.encode(letter)[0] for letter in LETTERS]
    out = []
    for s in range(0, len(examples), batch):
        x, mask = left_pad([comp.encode(ex.messages) for ex in examples[s:s + batch]], tok.pad_id, model.inv_freq.device)
        out.append(torch.log_softmax(model(x, mask, logits_from=x.shape[1] - 1)[:, -1].float(), -1)[:, ids])
    return torch.cat(out)


def calibrated_choice(letter_lp):
    """Argmax after removing each letter's mean log-probability over the items: (N, 4) -> (N,)."""
    return (letter_lp - letter_lp.mean(0)).argmax(1)


def probe(model, tok, examples):
    """{reading: number right} over `examples` (four-option questions only)."""
    comp = Completer(model, tok)
    gold = torch.tensor([ex.meta["answer_index"] for ex in examples])
    cloze = option_scores(model, comp, tok, examples,
                          lambda ex: [system("Answer the question."), user(ex.meta["question"])])
    shown = {}
    for prompt in ("text", "first"):    # options listed without letters, after or before the question
        task = get_task("arc_easy", prompt=prompt)
        shown[prompt] = option_scores(model, comp, tok, examples, lambda ex, task=task: task.messages(
            dict(question=ex.meta["question"], options=ex.meta["options"])))
    letters = letter_logprobs(model, comp, tok, examples)
    return {"cloze": sum(int(s.argmax() == g) for s, g in zip(cloze, gold)),
            "options after": sum(int(s.argmax() == g) for s, g in zip(shown["text"], gold)),
            "options first": sum(int(s.argmax() == g) for s, g in zip(shown["first"], gold)),
            "letter, raw": int((letters.argmax(1) == gold).sum()),
            "letter, calibrated": int((calibrated_choice(letters) == gold).sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--task", default="arc_easy", choices=["arc_easy", "arc_challenge"])
    ap.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    ap.add_argument("--limit", type=int, default=200, help="first N items (default: %(default)s)")
    ap.add_argument("--expert", nargs="*", default=[], help="SVF expert files to probe besides the base model")
    args = ap.parse_args()
    task = get_task(args.task, prompt="letter", data_dir=args.data_dir)
    examples = [ex for ex in task.load(args.split)[:args.limit] if len(ex.meta["options"]) == 4]
    model, tok, path = load(args)
    print(f"{args.task} {args.split}, {len(examples)} four-option items; 95% Wilson intervals")
    for name in ["base"] + args.expert:
        ctx = contextlib.nullcontext()
        if name != "base":
            wrapper, expert = svf.load_expert_for(model, path, name)
            ctx = wrapper.applied(wrapper.scales(expert.p))
        with torch.no_grad(), ctx:
            right = probe(model, tok, examples)
        for reading, k in right.items():
            lo, hi = wilson_interval(k, len(examples))
            print(f"{name:40s} {reading:20s} {k / len(examples):6.1%} ({lo:.1%}-{hi:.1%})", flush=True)


if __name__ == "__main__":
    main()
