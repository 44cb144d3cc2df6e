"""A checkpoint directory's tokenizer on tiktoken, and its chat template.

Two sources, tried in this order:
  * `tokenizer.json` (Hugging Face): the BPE `vocab` and `merges` and the `added_tokens` (control
    tokens such as <|im_end|>). Either byte-level BPE (SmolLM2, Qwen2, Llama 3), whose tokens are
    bytes written with GPT-2's byte-to-unicode table, with a pre-tokenizer that we translate into
    one tiktoken split pattern and no normalizer or NFC (Qwen2); or SentencePiece-style BPE
    (Mistral, Llama 2: "▁" for spaces, byte fallback), which spm_bpe.py replays;
  * `tokenizer.model` (Meta's Llama 3): lines of `base64(token bytes) rank`, with the Llama 3
    split pattern and the 256 special tokens that follow the ranks.
A file we cannot read exactly is refused with a TokenizerError naming it.

Why tiktoken can replay a Hugging Face byte-level BPE: tiktoken merges, at each step, the adjacent
pair whose concatenation has the lowest rank, and we make a token's rank its id. That is the merge
Hugging Face would apply when ids grow in the order of the merges list, several merges of one
token (Llama 3 has them) standing together; ranks_from_tokenizer_json says exactly what is checked
when loading and why. ../shared/tokenizers/cases.json holds Hugging Face's ids for Llama 3, 3.1,
Qwen3 and Mistral (tests/test_tokenizer_families.py); tests/test_tokenizer.py pins SmolLM2's.

Four choices worth knowing:
  * Text is always encoded as plain text: "<|im_end|>" typed by a user becomes the tokens of
    those characters, never the control token. Control tokens only come from `chat`.
  * Bytes without a token. SmolLM2's vocabulary lacks 21 single bytes (0x04, 0x06, 0x13, 0x14,
    0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF), and tiktoken aborts with a PanicException
    when a piece needs one. Inside tiktoken we give each such byte a placeholder rank past the
    vocabulary; no merge can involve it, so it comes out as a token of its own, which we then
    replace by the BPE model's `unk_token` or, when it has none (SmolLM2), drop. That is what the
    Hugging Face tokenizer does with a character its BPE cannot spell, so no input can crash and
    ids stay those of the reference, with one rare exception: Hugging Face drops the byte before
    merging, so in a piece like ">\\x04'" its neighbours may still merge (">'"), while here they
    stay apart (">", "'"); both decode to the same text. Of these bytes only six ASCII control
    characters and the lead bytes of the unassigned planes U+40000-U+BFFFF occur in a str.
  * `decode` never fails: unknown ids are skipped (as Hugging Face does) and bytes that are not
    valid UTF-8, e.g. half a character, become U+FFFD.
  * SentencePiece-style text gets a "▁" (a space) in front, and the text after a control token in
    a rendered chat may or may not: `encode(text, at_start=False)` is how such a piece is encoded.
    `decode` drops the one leading space, as Hugging Face's decoder does.
"""

import base64
import functools
import json
import os
import re
import unicodedata
import warnings

import tiktoken

from safetensors_io import open_regular  # refuses a FIFO or device before open() could hang on it

from chat_template import ChatTemplate, ChatTemplateError, fold_system  # noqa: F401 (re-exported)
from spm_bpe import SentencePieceBPE, SentencePieceError

# GPT-2's pre-tokenizer (Hugging Face ByteLevel with use_regex=true).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)] (SmolLM2, StarCoder) as one
# pattern. Digits cuts the text into single digits and the stretches between them; ByteLevel then
# splits each stretch with GPT2_PATTERN. So, compared with GPT2_PATTERN:
#   ` ?\p{N}+` becomes `\p{N}`: a digit is a piece of its own, never with a space before it;
#   `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`: the end of a stretch comes before a digit, so trailing
#   whitespace stays whole there ("a  1" -> "a", "  ", "1", not "a", " ", " ", "1").
# No other alternative can run into a digit, so matches never cross the cut. (Digits uses Rust's
# char::is_numeric, the same categories as \p{N}; only Unicode-version differences could differ.)
DIGITS_GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                       r"""|\s+(?![^\s\p{N}])|\s+""")

# Meta's Llama 3 pattern (meta-llama/llama3, tokenizer.py).
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                   "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|reserved_special_token_4|>", "<|eot_id|>"]
                  + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)])

STOP_TEXTS = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]


class TokenizerError(ValueError):
    pass


def bytes_to_unicode():
    """GPT-2's table: every byte gets a printable character, so BPE tokens can be JSON strings.
    Printable Latin-1 bytes stand for themselves; the other 68 map to U+0100 onwards in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def split_pattern(pre_tokenizer, where="tokenizer.json"):
    """The tiktoken pattern equivalent to a tokenizer.json `pre_tokenizer`."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer else []
    if pre_tokenizer and pre_tokenizer.get("type") != "Sequence":
        steps = [pre_tokenizer]

    def kind(s):
        if s.get("type") == "ByteLevel" and not s.get("add_prefix_space", False):
            return "ByteLevel+regex" if s.get("use_regex", True) else "ByteLevel"
        if s.get("type") == "Digits" and s.get("individual_digits"):
            return "Digits"
        if s.get("type") == "Split" and "Regex" in s.get("pattern", {}) and \
                s.get("behavior") == "Isolated" and not s.get("invert"):
            return "Split"
        return json.dumps(s)

    kinds = [kind(s) for s in steps]
    if kinds == ["ByteLevel+regex"]:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel+regex"]:
        return DIGITS_GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"]:  # Qwen2, Llama 3 in Hugging Face format
        return steps[0]["pattern"]["Regex"]
    raise TokenizerError(
        f"{where}: unsupported pre_tokenizer {kinds}; expected ByteLevel(use_regex=true), "
        f"Sequence[Digits(individual_digits=true), ByteLevel] or Sequence[Split(Regex), ByteLevel]")


def ranks_from_tokenizer_json(tj, special, where="tokenizer.json"):
    """{token bytes: rank} from a byte-level BPE model, rank = id; checks tiktoken can replay it.

    Hugging Face merges, at each step, the adjacent pair whose merge comes first in `merges`
    (leftmost on a tie); tiktoken the pair whose concatenation has the lowest rank, here its id.
    So tiktoken ranks every merge that makes one token alike, and Meta's Llama 3 file lists several
    (every split of a token into two tokens: "Ġ ĠĠĠ", "ĠĠ ĠĠ", "ĠĠĠ Ġ" all make "ĠĠĠĠ"). Pairs
    that make different tokens are then ordered as the list orders them when
      * the merges that make one token are consecutive in the list (one group per token), and
      * the groups come in increasing id order (then rank = id is the list's order).
    So a later duplicate merge, one that makes a token an earlier merge already made, is harmless
    only if no merge of another token comes between them. Otherwise that merge comes before the
    duplicate for Hugging Face and after it for tiktoken, and where their pairs meet the ids
    differ: with merges "b c", "a b", "ab c", "bc d", "a bc", Hugging Face turns "abcd" into
    a, bc, d and then, "bc d" being listed before "a bc", into a, bcd; tiktoken ranks "a bc" with
    "ab c" and gives abc, d. Such a file is refused.
    Left to measurement, not checked: inside one group Hugging Face tries the splits in list
    order, tiktoken the leftmost pair first, which can differ only where two splits of one token
    overlap ([a, b, c] with a+b = b+c); tiktoken merges any pair whose concatenation is a token,
    listed or not; and it returns a piece that is itself a token as it is, which Hugging Face does
    only with `ignore_merges` (Llama 3) and otherwise reaches by merging. Lists made by training
    (SmolLM2, Qwen2) or from tiktoken ranks (Llama 3) never showed a difference: not in the
    reference cases, nor in 25,216 texts (runs of one character up to 129 long, random mixes, the
    README's paragraphs) encoded with Llama 3's file here and by Hugging Face `tokenizers` 0.23.3."""
    model = tj["model"]
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for token, i in model["vocab"].items():
        if token in special:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            raise TokenizerError(f"{where}: vocab token {token!r} (id {i}) is not written in GPT-2's "
                                 f"byte-to-unicode alphabet; is this a byte-level BPE?") from None
    made, previous = None, -1  # the token the current group makes, the id of the group before
    done = set()
    for n, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = left + right
        if token == made:
            continue  # another split of the same token, in its group: harmless
        i = model["vocab"].get(token)
        if i is None or i <= previous or token in done:
            why = ("makes no vocab token" if i is None else
                   f"makes {token!r} again after merges of other tokens" if token in done else
                   f"makes id {i} after a group of id {previous}")
            raise TokenizerError(
                f"{where}: merge {n} {merge!r} {why}: tiktoken can replay Hugging Face's BPE only when "
                f"the merges that make one token are consecutive and their tokens' ids grow in the "
                f"order of the merges")
        done.add(token)
        made, previous = token, i
    return ranks


def read_json(path):
    try:
        with open_regular(path, TokenizerError, "tokenizer file (JSON)") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e}); is the download complete?") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def is_sentencepiece(tj):
    """SentencePiece-style BPE (spm_bpe.py): byte fallback, or "▁" put in by the normalizer or a
    Metaspace pre-tokenizer; byte-level BPE has none of them."""
    steps = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    return bool(tj["model"].get("byte_fallback")) or '"Metaspace"' in steps or '"Prepend"' in steps


def byte_level_normalizer(tj, where):
    """True for an NFC normalizer (Qwen2), False for none; anything else is refused."""
    norm = tj.get("normalizer")
    if norm is None or norm.get("type") == "NFC":
        return norm is not None
    raise TokenizerError(f"{where}: unsupported normalizer {json.dumps(norm)[:200]} for a byte-level "
                         f"BPE; expected none or NFC")


def load_tiktoken_ranks(path):
    """Meta's tokenizer.model: one `base64(token bytes) rank` per line."""
    ranks = {}
    with open_regular(path, TokenizerError, "tokenizer.model (base64 rank lines)") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise TokenizerError(f"{path}:{n}: expected 'base64 rank', found {line[:80]!r}") from None
    return ranks


def token_text(value):
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def default_system_prompt(template):
    """The system message a ChatML Jinja template inserts when the conversation has none,
    e.g. SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face"."""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    m = re.search(r"<\|im_start\|>system\n([^'\"{}]*?)<\|im_end\|>", template or "")
    return m.group(1) if m else None


class Tokenizer:
    def __init__(self, mergeable_ranks, special_tokens, pat_str, config=None, unk_id=None, name="bpe",
                 config_path=None, nfc=False, spm=None):
        """Byte-level BPE: mergeable_ranks {bytes: id} and pat_str for tiktoken (nfc: the file's NFC
        normalizer). SentencePiece-style: spm, a spm_bpe.SentencePieceBPE (ranks and pattern None)."""
        config = config or {}
        self.special_tokens = dict(special_tokens)  # text -> id
        self.spm, self.nfc, self.placeholders, self.enc = spm, nfc, {}, None
        if spm is not None:
            self.vocab_size = max([*spm.vocab.values(), *special_tokens.values()]) + 1
            self.id_to_bytes, self.unk_id = spm.id_to_bytes(), spm.unk_id
        else:
            self.vocab_size = max([*mergeable_ranks.values(), *special_tokens.values()]) + 1
            # Placeholder ranks for the single bytes the vocabulary lacks (see the module docstring).
            ranks = dict(mergeable_ranks)
            missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
            for k, b in enumerate(missing):  # placeholder rank -> the id it stands for (None: dropped)
                ranks[b] = self.vocab_size + k
                self.placeholders[self.vocab_size + k] = unk_id
            self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks,
                                         special_tokens=self.special_tokens)
            self.id_to_bytes, self.unk_id = {i: t for t, i in mergeable_ranks.items()}, unk_id
        self.id_to_bytes.update({i: t.encode() for t, i in self.special_tokens.items()})
        self.special_text = {i: t for t, i in self.special_tokens.items()}

        def special_id(key):
            return self.special_tokens.get(token_text(config.get(key)))

        self.bos_id, self.eos_id = special_id("bos_token"), special_id("eos_token")
        self.pad_id = special_id("pad_token")
        if self.pad_id is None:
            self.pad_id = self.eos_id  # only ever attended with mask 0, any id would do
        if "<|im_start|>" in self.special_tokens:
            self.family = "chatml"
        elif "<|start_header_id|>" in self.special_tokens:
            self.family = "llama3"
        else:
            self.family = None
        self.stop_tokens = {self.special_tokens[t] for t in STOP_TEXTS if t in self.special_tokens}
        if self.eos_id is not None:
            self.stop_tokens.add(self.eos_id)
        # chat template: the checkpoint's own, compiled once (chat() runs for every prompt)
        self.config_path = config_path  # None for a tokenizer built in code
        self.template = None
        if config.get("chat_template") is not None:
            self.template = ChatTemplate(
                config["chat_template"], self.special_tokens, config_path or "tokenizer_config.json",
                variables={k: token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")})

    @classmethod
    def from_dir(cls, path):
        config_path = os.path.join(path, "tokenizer_config.json")
        config = read_json(config_path) if os.path.exists(config_path) else {}
        json_path = os.path.join(path, "tokenizer.json")
        if os.path.exists(json_path):
            tj = read_json(json_path)
            model = tj.get("model")
            if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or \
                    not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
                found = model.get("type") if isinstance(model, dict) else type(model).__name__
                raise TokenizerError(f"{json_path}: expected a BPE model (\"model\": {{\"type\": \"BPE\", "
                                     f"\"vocab\": {{...}}, \"merges\": [...]}}), found {found!r}; "
                                     f"WordPiece and Unigram tokenizers are not supported")
            special = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
            name = os.path.basename(os.path.abspath(path))
            if is_sentencepiece(tj):
                try:
                    spm = SentencePieceBPE(tj, json_path)
                except SentencePieceError as e:
                    raise TokenizerError(str(e)) from None
                return cls(None, special, None, config, name=name, config_path=config_path, spm=spm)
            unk = model.get("unk_token")
            return cls(ranks_from_tokenizer_json(tj, special, json_path), special,
                       split_pattern(tj.get("pre_tokenizer"), json_path), config,
                       unk_id=model["vocab"].get(unk) if unk else None, name=name,
                       config_path=config_path, nfc=byte_level_normalizer(tj, json_path))
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            ranks = load_tiktoken_ranks(os.path.join(path, "tokenizer.model"))
            added = config.get("added_tokens_decoder")
            if added:  # Llama 3.1+ renamed some reserved tokens; the config has the truth
                special = {v["content"]: int(k) for k, v in added.items()}
            else:
                special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)}
            config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", **config}
            return cls(ranks, special, LLAMA3_PATTERN, config, name="llama3", config_path=config_path)
        found = sorted(os.listdir(path)) if os.path.isdir(path) else "no such directory"
        raise TokenizerError(f"{path}: expected tokenizer.json or tokenizer.model, found {found}")

    def encode(self, text, at_start=True):
        """Plain text -> ids, as Hugging Face's encode(text, add_special_tokens=False). Control-token
        text such as "<|im_end|>" stays plain text.

        at_start: whether the text begins the input. Only SentencePiece-style tokenizers care: with a
        Metaspace pre-tokenizer (prepend_scheme "first") only text at the start gets the "▁" that
        stands for a leading space; the text after a control token in a rendered chat does not. The
        older Prepend normalizer gives every piece its "▁". See spm_bpe.prefix_rule."""
        if self.spm is not None:
            return self.spm.encode(text, at_start)
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ids = self.enc.encode_ordinary(text)
        if self.placeholders and max(ids, default=0) >= self.vocab_size:
            ids = [self.placeholders.get(i, i) for i in ids]
            ids = [i for i in ids if i is not None]
        return ids

    def decode(self, ids):
        """Ids -> text. Control tokens decode to their text; never raises on any list of ints."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if self.spm is not None:
            return self.spm.decode([int(i) for i in ids], self.special_text)
        data = b"".join(self.id_to_bytes.get(int(i), b"") for i in ids)
        return data.decode("utf-8", errors="replace")

    def chat(self, messages, add_generation_prompt=True, fold_system_message=False,
             continue_final_message=False, **variables):
        """[{"role", "content"}, ...] -> ids, as the checkpoint's chat template renders them.

        Control tokens come only from the template: "<|im_end|>" typed in a message stays text
        (chat_template.py says how). The text between two control tokens is encoded as one piece,
        as Hugging Face does when it tokenizes the rendered template. `variables` go to the template
        as transformers passes them (e.g. Llama 3.1's date_string, Qwen3's enable_thinking).

        A template that refuses the messages raises ChatTemplateError with the template's words:
        Mistral's v0.1 instruct template takes no system message ("Conversation roles must
        alternate ..."), which is what Hugging Face does too, so by default we refuse as well
        rather than change the prompt behind the user's back; `fold_system_message=True` puts the
        system text in front of the first user message, as mistral-common does, and "auto" does so
        only for a template that refuses a system message (for callers such as our tasks, whose
        prompts start with one).

        `continue_final_message=True`: the last message is a prefill of the assistant's answer
        that the model continues: no end of turn after it, and its text encoded with what the
        template writes before it, as one piece (as transformers does; for SentencePiece-style
        tokenizers this differs from encoding it apart)."""
        if fold_system_message == "auto":
            fold_system_message = not self.takes_system_message
        if fold_system_message:
            messages = fold_system(messages)
        if self.template is None:
            if continue_final_message:
                return self.chat_by_hand(messages[:-1]) + self.encode(messages[-1]["content"])
            return self.chat_by_hand(messages, add_generation_prompt)
        ids, offset = [], 0
        for text, control in self.template.segments(messages, add_generation_prompt,
                                                    continue_final_message, **variables):
            if control:
                ids.append(self.special_tokens[text])
            else:  # SentencePiece-style tokenizers put "▁" before the text at offset 0 only
                ids += self.encode(text, at_start=offset == 0)
            offset += len(text)
        return ids

    @functools.cached_property
    def takes_system_message(self):
        """Whether the chat template accepts a conversation that starts with a system message."""
        try:
            if self.template is not None:
                self.template.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
            return True
        except ChatTemplateError:
            return False

    @property
    def default_system(self):
        """The system message the template writes when the conversation has none, e.g.
        SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face"."""
        if self.template is None:
            return None
        try:
            text = self.template.render([{"role": "user", "content": ""}], add_generation_prompt=False)
        except ChatTemplateError:
            return None
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
        return m.group(1) if m else None

    def chat_by_hand(self, messages, add_generation_prompt=True):
        """Checkpoints without a chat_template (e.g. Meta's own tokenizer.model): ChatML or Llama 3,
        chosen by the control tokens the tokenizer has, said once per checkpoint."""
        s = self.special_tokens
        ids = []
        where = self.config_path or "this tokenizer's configuration"
        if self.family is not None and not getattr(self, "said_no_template", False):
            warnings.warn(f"{where} has no chat_template; using the built-in {self.family} "
                          f"template of tokenizer.py", stacklevel=3)
            self.said_no_template = True
        if self.family == "chatml":
            for m in messages:
                ids += [s["<|im_start|>"], *self.encode(f"{m['role']}\n{m['content']}"),
                        s["<|im_end|>"], *self.encode("\n")]
            if add_generation_prompt:
                ids += [s["<|im_start|>"], *self.encode("assistant\n")]
        elif self.family == "llama3":
            ids.append(self.bos_id)  # the template starts with bos_token
            for m in messages:
                ids += [s["<|start_header_id|>"], *self.encode(m["role"]), s["<|end_header_id|>"],
                        *self.encode("\n\n" + m["content"].strip()), s["<|eot_id|>"]]
            if add_generation_prompt:
                ids += [s["<|start_header_id|>"], *self.encode("assistant"), s["<|end_header_id|>"],
                        *self.encode("\n\n")]
        else:
            raise TokenizerError(f"{where} has no chat_template, and this tokenizer has "
                                 f"neither ChatML (<|im_start|>) nor Llama 3 (<|start_header_id|>) "
                                 f"control tokens for a built-in one")
        return ids
