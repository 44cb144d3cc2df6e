"""AI2 Reasoning Challenge (ARC): grade-school science multiple-choice questions.

Splits (as in the official code, SakanaAI/self-adaptive-llms tasks/arc.py):
- `arc_easy` (alias `arc`), the *reasoning* expert's task: the ARC-Easy training file split by index,
  even indices -> "train" (1126), odd indices -> "validation" (1125); "test" is ARC-Easy test (2376).
  The released ARC-Easy validation file (570) is not used, as in the official code.
- `arc_challenge`, an adaptation target: "test" (1172) is evaluated; "train" (1119) and
  "validation" (299) are the released files, available for few-shot shots.

Options are always shown with letters A, B, C, ... in the dataset's order. About 4% of the questions
use labels "1"-"4" instead; their gold label is converted to the letter at the same position (the
official code shows letters but compares with the numeric key, so it can never score those).

The answer is a letter. Extraction (`extract_choice`) reads the last answer statement ("the answer
is (B)", "Answer: B", `\\boxed{B}`), or else the first line of the output, and accepts either the
letter or the option's text copied out; a statement that names two different options is unparsable
(None), which scores as wrong. The official code guesses a letter instead (seeded); we do not.
`example.meta["options"]` holds the option texts for likelihood scoring.
"""

import re

from .task import Task, Example, assistant, even_odd, system, user

LETTERS = "ABCDE"

OFFICIAL_SYSTEM = ("The following are multiple choice questions (with answers). Think step by step and then "
                   'finish your answer with "the answer is (X)" where X is the correct letter choice.')
LETTER_SYSTEM = "Answer the multiple-choice question with the letter of the correct option only."
RESTATE_SYSTEM = ("Answer the multiple-choice question. Reply with the letter of the correct option "
                  "followed by the option's text copied exactly, for example: B. water")


def problem_text(rec):
    """The question followed by its lettered options (the official layout)."""
    lines = [rec["question"], "Options:"]
    lines += [f"{LETTERS[i]}. {text}" for i, text in enumerate(rec["options"])]
    return "\n".join(lines)


def official_prompt(rec):
    # The official Llama-3 template appends "Let's think step by step" after the assistant header:
    # an assistant prefill that the model continues.
    return [system(OFFICIAL_SYSTEM), user(problem_text(rec)), assistant("Let's think step by step")]


def letter_prompt(rec):
    return [system(LETTER_SYSTEM), user(problem_text(rec))]


TEXT_SYSTEM = "Answer the multiple-choice question by copying the text of the correct option exactly."


def text_prompt(rec):
    """Options without letters: the answer is the option's text, so no letter habit can stand in."""
    lines = [rec["question"], "Options:"] + [f"- {text}" for text in rec["options"]]
    return [system(TEXT_SYSTEM), user("\n".join(lines))]


def first_prompt(rec):
    """Options before the question, answered with the option's text. For SmolLM2-135M the likeliest
    option is right 33% of the time this way and 27% (chance) with the options after the question;
    with the question alone, 47% (benchmarks/probe_arc.py, README)."""
    lines = ["Options:"] + [f"- {text}" for text in rec["options"]] + ["", f"Question: {rec['question']}"]
    return [system(TEXT_SYSTEM), user("\n".join(lines))]


def restate_prompt(rec):
    return [system(RESTATE_SYSTEM), user(problem_text(rec))]


# --- extraction ---------------------------------------------------------------------------------

_CUE = re.compile(r"(?:answer|option|choice)\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def answer_span(text):
    """The part of an output that states the answer: the inside of the last \\boxed{}, else the
    first line after the last "answer is"/"answer:" cue, else the output's first non-empty line."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    cues = list(_CUE.finditer(text))
    rest = text[cues[-1].end():] if cues else text
    lines = [line.strip() for line in rest.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _squash(s):
    """Collapses whitespace and drops trailing punctuation: "  B.  food. " -> "B. food"."""
    return re.sub(r"[.;:!?]+$", "", " ".join(s.split()))


def _blank_out(span, opt, fold):
    """`span` with every whole-word occurrence of `opt` replaced by spaces, or None if there is none.
    (String search rather than one regex per option: this runs for every option of every output.)"""
    hay, needle = (span.lower(), opt.lower()) if fold else (span, opt)
    if len(hay) != len(span) or len(needle) != len(opt):     # rare letters whose lower case is longer
        hay, needle = span, opt
    found, start = False, hay.find(needle)
    while start >= 0:
        end = start + len(needle)
        if not hay[start - 1].isalnum() and not hay[end].isalnum():      # span is padded with spaces
            span = span[:start] + " " * len(needle) + span[end:]
            found = True
        start = hay.find(needle, end)
    return span if found else None


def extract_choice(text, options):
    """Index of the option that `text` answers, or None (no option, or two different options).

    Letters decide when present; otherwise the option whose text is quoted. Option texts are
    matched longest-first and blanked out before looking for letters, so the article in
    "A bacterial population ..." is not read as the letter A. Matching ignores case unless two
    options differ only in case (genetics: "Rr" and "rr"); options that are themselves a single
    letter A-E (chemical symbols like "C") are read as letters only.
    """
    span = " " + _squash(answer_span(text)) + " "
    fold = len({o.lower() for o in options}) == len(options)
    quoted = set()
    for i in sorted(range(len(options)), key=lambda i: -len(options[i])):
        opt = _squash(options[i])
        if not opt or re.fullmatch(r"[A-E]", opt):
            continue
        blanked = _blank_out(span, opt, fold)
        if blanked is not None:
            quoted.add(i)
            span = blanked
    valid = LETTERS[:len(options)]
    letters = {LETTERS.index(m) for m in re.findall(r"(?<![A-Za-z0-9])\(?([A-E])\)?(?![A-Za-z0-9])", span)
               if m in valid}
    chosen = letters or quoted
    return next(iter(chosen)) if len(chosen) == 1 else None


class ArcTask(Task):
    name = "arc_easy"
    subset = "ARC-Easy"
    prompts = {"official": official_prompt, "letter": letter_prompt, "restate": restate_prompt,
               "text": text_prompt, "first": first_prompt}
    default_prompt = "letter"   # best measured validation accuracy of generated answers (README)

    def records(self, split):
        if self.subset == "ARC-Easy" and split in ("train", "validation"):
            rows = even_odd(self.read(f"{self.name}/ARC-Easy-train.jsonl"), split)
        else:
            rows = self.read(f"{self.name}/{self.subset}-{split}.jsonl")
        return [self._normalize(r) for r in rows]

    @staticmethod
    def _normalize(r):
        labels = r["choices"]["label"]
        if r["answerKey"] not in labels:
            raise ValueError(f"ARC record {r['id']}: expected answerKey to be one of the labels {labels}, "
                             f"found {r['answerKey']!r}")
        return dict(id=r["id"], question=r["question"], options=list(r["choices"]["text"]),
                    labels=list(labels), answer_index=labels.index(r["answerKey"]))

    def example(self, rec):
        return Example(id=f"{self.name}/{rec['id']}", problem=problem_text(rec), messages=self.messages(rec),
                       answer=LETTERS[rec["answer_index"]],
                       meta=dict(question=rec["question"], options=rec["options"],
                                 answer_index=rec["answer_index"], labels=rec["labels"]))

    def shuffled(self, example, rng):
        """The same question with its options in another order, drawn from `rng` (a random.Random).

        Training on shuffled options (reinforce.py --shuffle-options) makes every letter equally
        likely to be the right one, so a habit of preferring one letter earns no reward on average.
        """
        m = example.meta
        order = list(range(len(m["options"])))
        rng.shuffle(order)
        return self.example(dict(id=example.id.split("/", 1)[1], question=m["question"],
                                 options=[m["options"][i] for i in order], labels=[m["labels"][i] for i in order],
                                 answer_index=order.index(m["answer_index"])))

    def extract(self, output, example=None):
        if example is None:
            raise ValueError("ARC extraction needs the example (to match the option texts)")
        i = extract_choice(output, example.meta["options"])
        return None if i is None else LETTERS[i]


class ArcChallengeTask(ArcTask):
    name = "arc_challenge"
    subset = "ARC-Challenge"
