"""AI2 Reasoning Challenge (ARC): grade-school science multiple-choice questions.

Splits (as in the official code, SakanaAI/self-adaptive-llms tasks/arc.py):
- `arc_easy` (alias `arc`), the *reasoning* expert's task: the ARC-Easy training file split by index,
  even indices -> "train" (1124), odd indices -> "validation" (1124), less the 3 test questions the
  file repeats (2 even, 1 odd; the official code keeps them); "test" is ARC-Easy test (2376).
  The released ARC-Easy validation file (570) is not used, as in the official code.
- `arc_challenge`, an adaptation target: "test" (1172) is evaluated; "train" (1119) and
  "validation" (299) are the released files, available for few-shot shots.

The options are shown with letters A, B, C, ... in the dataset's order (`official`, `letter`,
`restate`), or as a list without letters (`text`, `first`). About 4% of the questions use labels
"1"-"4" instead; their gold label is converted to the letter at the same position (the official
code shows letters but compares with the numeric key, so it can never score those).

The answer is a letter. Extraction (`extract_choice`) is strict: the output must name exactly one
option, by its letter (where the prompt showed letters) or by copying its text, or it is
unparsable (None), which scores as wrong. An output that lists several options is wrong wherever
it lists them; only the chain of thought of the `official` prompt, before its first answer
statement, may name other options. The official code guesses a letter for unparsable outputs
(seeded); we do not. `example.meta["options"]` holds the option texts for likelihood scoring.
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
    with the question alone, 47% (benchmarks/probe_arc.py, RESULTS.md)."""
    lines = ["Options:"] + [f"- {text}" for text in rec["options"]] + ["", f"Question: {rec['question']}"]
    return [system(TEXT_SYSTEM), user("\n".join(lines))]


def restate_prompt(rec):
    return [system(RESTATE_SYSTEM), user(problem_text(rec))]


# --- extraction ---------------------------------------------------------------------------------

# An answer statement: "the answer is", "Answer:", "option =", or a \boxed{}.
_STATEMENT = re.compile(r"(?:answer|option|choice)\s*(?:is|:|=)|\\boxed\{", re.IGNORECASE)
_LETTER = re.compile(r"(?<![A-Za-z0-9])\(?([A-E])\)?(?![A-Za-z0-9])")


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


def named_options(text, options, letters=True):
    """The set of indices of the options that `text` names: by their text (whole words, longest
    option first, each occurrence blanked out so that "tall tree" does not also name "tree"), and,
    when the prompt showed letters, by a capital A-E standing alone ("B", "(B)", "B.").

    Without letters on show (the `text` and `first` prompts) a capital A-E is only a word: the
    article in "A compass" names no option, and a one-letter option ("C" for carbon) is matched as
    text. With letters on show a one-letter option is read as a letter only. Matching ignores case
    unless two options differ only in case (genetics: "Rr" and "rr"); one-letter options never fold.
    """
    span = " " + _squash(text) + " "
    fold = len({o.lower() for o in options}) == len(options)
    named = set()
    for i in sorted(range(len(options)), key=lambda i: -len(options[i])):
        opt = _squash(options[i])
        if not opt or (letters and re.fullmatch(r"[A-E]", opt)):
            continue
        blanked = _blank_out(span, opt, fold and len(opt) > 1)
        if blanked is not None:
            named.add(i)
            span = blanked
    if letters:
        valid = LETTERS[:len(options)]
        named |= {LETTERS.index(m) for m in _LETTER.findall(span) if m in valid}
    return named


def extract_choice(text, options, letters=True, reasoning=False):
    """Index of the option that `text` answers, or None: it names no option, or more than one.

    Strict, because a reward is a scorer and RL finds its loopholes: an output that names two
    different options is unparsable wherever it names them. (An earlier rule read the first line
    only, and REINFORCE learned to list every option, one per line, best guess first: RESULTS.md.)
    `reasoning`: the prompt asks for a chain of thought before the answer (`official`), so the
    text before the first answer statement ("the answer is", "Answer:", \\boxed{}) may weigh
    options; from the first statement to the end the same rule holds. Without a statement the
    whole output is the answer. `letters`: the prompt showed lettered options (see named_options).
    """
    if reasoning:
        first = _STATEMENT.search(text)
        text = text[first.start():] if first else text
    named = named_options(text, options, letters)
    return next(iter(named)) if len(named) == 1 else None


LETTERED = ("official", "letter", "restate")   # prompts that show the options as "A. ...", "B. ..."
REASONING = ("official",)                     # prompts that ask for a chain of thought first


def same_question(record):
    """What makes two ARC records the same question: its text and its set of options (whitespace aside)."""
    squash = lambda t: " ".join(t.split())  # noqa: E731
    return squash(record["question"]), frozenset(map(squash, record["choices"]["text"]))


class ArcTask(Task):
    name = "arc_easy"
    subset = "ARC-Easy"
    prompts = {"official": official_prompt, "letter": letter_prompt, "restate": restate_prompt,
               "text": text_prompt, "first": first_prompt}
    default_prompt = "first"    # best validation accuracy under the strict scorer: 26.5% against 11.5% for letter (RESULTS.md)

    def records(self, split):
        if self.subset == "ARC-Easy" and split in ("train", "validation"):
            rows = even_odd(self.read(f"{self.name}/ARC-Easy-train.jsonl"), split)
            # The train file repeats 3 test questions verbatim (the same question and options, in
            # another order for one): 2 in the training half, 1 in validation. Dropped after the
            # even/odd split, so every other question keeps its side (data/cls.py drops them too).
            test = {same_question(r) for r in self.read(f"{self.name}/ARC-Easy-test.jsonl")}
            rows = [r for r in rows if same_question(r) not in test]
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

    def reference_text(self, example):
        """The answer as each prompt asks for it: "B" (letter), "B. water" (restate), "water" (text,
        first). None for `official`, whose answer is a chain of thought that no reference writes."""
        option = example.meta["options"][example.meta["answer_index"]]
        return {"letter": example.answer, "restate": f"{example.answer}. {option}", "text": option,
                "first": option}.get(self.prompt)

    def extract(self, output, example=None):
        if example is None:
            raise ValueError("ARC extraction needs the example (to match the option texts)")
        i = extract_choice(output, example.meta["options"], letters=self.prompt in LETTERED,
                           reasoning=self.prompt in REASONING)
        return None if i is None else LETTERS[i]


class ArcChallengeTask(ArcTask):
    name = "arc_challenge"
    subset = "ARC-Challenge"
