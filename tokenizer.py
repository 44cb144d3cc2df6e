"""A byte-level BPE tokenizer on tiktoken, built from a checkpoint directory, and its chat template.

Two sources, tried in this order:
  * `tokenizer.json` (Hugging Face): the BPE `vocab` and `merges`, whose tokens are bytes written
    with GPT-2's byte-to-unicode table, the pre-tokenizer (which we translate into one tiktoken
    split pattern) and the `added_tokens` (control tokens such as <|im_end|>);
  * `tokenizer.model` (Meta's Llama 3): lines of `base64(token bytes) rank`, with the Llama 3
    split pattern and the 256 special tokens that follow the ranks.

Why tiktoken can replay a Hugging Face BPE: tiktoken merges, at each step, the adjacent pair whose
concatenation has the lowest rank. If the rank of a token is its id and ids grow in the order of
the merges list (true of SmolLM2, Qwen2 and Llama 3; checked when loading), that is the merge
Hugging Face would apply. tests/test_tokenizer.py pins ids that the Hugging Face tokenizer gives.

Three choices worth knowing:
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
"""

import base64
import json
import os
import re

import tiktoken

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


def split_pattern(pre_tokenizer):
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
        f"unsupported pre_tokenizer {kinds}; expected ByteLevel(use_regex=true), "
        f"Sequence[Digits(individual_digits=true), ByteLevel] or Sequence[Split(Regex), ByteLevel]")


def ranks_from_tokenizer_json(tj, special):
    """{token bytes: rank} from a byte-level BPE model, where rank = id; checks ids follow merges."""
    model = tj["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(f"expected a byte-level BPE model, found type {model.get('type')!r}"
                             f"{' with byte_fallback (SentencePiece style)' if model.get('byte_fallback') else ''}")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for token, i in model["vocab"].items():
        if token in special:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            raise TokenizerError(f"vocab token {token!r} (id {i}) is not written in GPT-2's "
                                 f"byte-to-unicode alphabet; is this a byte-level BPE?") from None
    previous = -1
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        i = model["vocab"].get(left + right)
        if i is None or i <= previous:
            raise TokenizerError(f"merge {merge!r} gives id {i} after id {previous}: tiktoken needs ids "
                                 f"that grow in the order of the merges")
        previous = i
    return ranks


def load_tiktoken_ranks(path):
    """Meta's tokenizer.model: one `base64(token bytes) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
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
    def __init__(self, mergeable_ranks, special_tokens, pat_str, config=None, unk_id=None, name="bpe"):
        config = config or {}
        self.special_tokens = dict(special_tokens)  # text -> id
        self.vocab_size = max([*mergeable_ranks.values(), *special_tokens.values()]) + 1
        # Placeholder ranks for the single bytes the vocabulary lacks (see the module docstring).
        ranks = dict(mergeable_ranks)
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        self.placeholders = {}  # placeholder rank -> the id it stands for (None: dropped)
        for k, b in enumerate(missing):
            ranks[b] = self.vocab_size + k
            self.placeholders[self.vocab_size + k] = unk_id
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.id_to_bytes = {i: t for t, i in mergeable_ranks.items()}
        self.id_to_bytes.update({i: t.encode() for t, i in self.special_tokens.items()})

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
        self.default_system = default_system_prompt(config.get("chat_template"))
        self.stop_tokens = {self.special_tokens[t] for t in STOP_TEXTS if t in self.special_tokens}
        if self.eos_id is not None:
            self.stop_tokens.add(self.eos_id)

    @classmethod
    def from_dir(cls, path):
        config_path = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
                tj = json.load(f)
            special = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
            unk = tj["model"].get("unk_token")
            return cls(ranks_from_tokenizer_json(tj, special), special,
                       split_pattern(tj.get("pre_tokenizer")), config,
                       unk_id=tj["model"]["vocab"].get(unk) if unk else None,
                       name=os.path.basename(os.path.abspath(path)))
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            ranks = load_tiktoken_ranks(os.path.join(path, "tokenizer.model"))
            added = config.get("added_tokens_decoder")
            if added:  # Llama 3.1+ renamed some reserved tokens; the config has the truth
                special = {v["content"]: int(k) for k, v in added.items()}
            else:
                special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)}
            config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", **config}
            return cls(ranks, special, LLAMA3_PATTERN, config, name="llama3")
        found = sorted(os.listdir(path)) if os.path.isdir(path) else "no such directory"
        raise TokenizerError(f"{path}: expected tokenizer.json or tokenizer.model, found {found}")

    def encode(self, text):
        """Plain text -> ids. Control-token text such as "<|im_end|>" stays plain text."""
        ids = self.enc.encode_ordinary(text)
        if self.placeholders and max(ids, default=0) >= self.vocab_size:
            ids = [self.placeholders.get(i, i) for i in ids]
            ids = [i for i in ids if i is not None]
        return ids

    def decode(self, ids):
        """Ids -> text. Control tokens decode to their text; never raises on any list of ints."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        data = b"".join(self.id_to_bytes.get(int(i), b"") for i in ids)
        return data.decode("utf-8", errors="replace")

    def chat(self, messages, add_generation_prompt=True):
        """[{"role", "content"}, ...] -> ids, as the checkpoint's chat template renders them.

        The text between two control tokens is encoded as one piece, as Hugging Face does when
        it tokenizes the rendered template."""
        s = self.special_tokens
        ids = []
        if self.family == "chatml":
            # {% if loop.first and messages[0]['role'] != 'system' %} <default system message>
            if messages and messages[0]["role"] != "system" and self.default_system is not None:
                messages = [{"role": "system", "content": self.default_system}, *messages]
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
            raise TokenizerError("no chat template for this tokenizer: expected ChatML "
                                 "(<|im_start|>) or Llama 3 (<|start_header_id|>) control tokens")
        return ids
