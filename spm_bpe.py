"""SentencePiece-style BPE as Hugging Face's tokenizer.json writes it (Mistral v0.1-v0.3, Llama 2),
replayed by tiktoken.

What differs from the byte-level BPE of tokenizer.py:
  * spaces are written "▁" (U+2581) and one "▁" is put before the text: by a `Prepend` normalizer
    (older conversions: every non-empty piece of text gets it) or by a `Metaspace` pre-tokenizer
    (newer ones: with prepend_scheme "first" only text at the very start of the input gets it, and
    never text that already starts with a space);
  * BPE works on unicode characters, not bytes: a character that is one token is one symbol from
    the start. A character the vocabulary lacks becomes its UTF-8 bytes as the tokens "<0xE4>",
    "<0xB8>", ... (`byte_fallback`), or `unk_token` without it (one for a run with `fuse_unk`);
  * a pair is merged by the position of that exact merge in `merges`, and there is no
    pre-tokenizer: the whole text is one word. `reference_encode` below is that definition, plainly.

How tiktoken replays it. tiktoken merges bytes, the adjacent pair whose concatenation has the
lowest rank first. So the ranks are: the 256 single bytes, then the UTF-8 prefixes of the
vocabulary's characters, then those characters (so each character is whole before any merge
touches it), then each merged token in the order of the first merge that makes it. The ranks map
back to ids after encoding; a byte or prefix left over is a character outside the vocabulary and
becomes its byte tokens (or unk). Words: when no vocabulary token has "▁" after another
character (checked here; true of Mistral and Llama 2), no merge can cross into a following "▁",
so tiktoken's pattern cuts the text there, and tiktoken returns a piece that is itself a token as
it is (Hugging Face merges it, always ending at that token in the measurement below).

Exact? tiktoken ranks every merge that makes one token alike; the file lists them one after the
other (checked here), sorted by the parts' ids. That is the same order for pairs making different
tokens; inside one token's merges the two could differ only where two of them overlap ([a, b, c]
with a+b = b+c, 140 tokens of Mistral's, e.g. "----" = "-"+"---" = "---"+"-") and the file lists
the right one first. Measured (Hugging Face `tokenizers` 0.23.3 and reference_encode as references,
mistral-v0.1 and -metaspace): the same ids for all 24 cases of cases.json, 1 MB of GSM8K, 152,128
texts against Hugging Face (every vocabulary token, runs of one character up to 129 long, random
mixes, the README's paragraphs; decoding them gave Hugging Face's text too) and 4.4 million random
strings made of those 140 tokens' characters and splits against reference_encode. So tiktoken is
used, at 2.4 million tokens/s on 1 MB of GSM8K (one AMD EPYC core, shared with other jobs) where
Hugging Face manages 0.22 million (the whole text is one word for it) and reference_encode, which
rescans the whole text after every merge, about 120; benchmarks/bench_tokenizer.py --reference
prints these numbers.
"""

import re

import tiktoken

SPACE = "\u2581"  # "▁"


class SentencePieceError(ValueError):
    pass


def prefix_rule(tj, where):
    """How a tokenizer.json puts "▁" before text: ("prepend" | "first" | "always" | "never", split).

    prepend: the Prepend normalizer (every non-empty piece, even one starting with a space);
    first/always/never: Metaspace's prepend_scheme (never when the text already starts with "▁");
    split: Metaspace(split=true) also cuts the text before every "▁"."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    steps = norm.get("normalizers", [norm]) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [s.get("type") for s in steps]
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if kinds == ["Prepend", "Replace"] and steps[0].get("prepend") == SPACE and \
            {k: steps[1].get(k) for k in spaces} == spaces and pre is None:
        return "prepend", False
    if steps == [] and pre and pre.get("type") == "Metaspace" and pre.get("replacement", SPACE) == SPACE:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if scheme in ("first", "always", "never"):
            return scheme, bool(pre.get("split", True))
    raise SentencePieceError(
        f"{where}: unsupported normalizer {norm} with pre_tokenizer {pre}; expected "
        f"Sequence[Prepend('▁'), Replace(' ', '▁')] without a pre-tokenizer, or no normalizer and a "
        f"Metaspace('▁') pre-tokenizer")


class SentencePieceBPE:
    def __init__(self, tj, where="tokenizer.json"):
        model = tj["model"]
        self.vocab = vocab = model["vocab"]
        self.prefix, self.split_all = prefix_rule(tj, where)
        self.byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)] if model.get("byte_fallback") else None
        if self.byte_ids and None in self.byte_ids:
            raise SentencePieceError(f"{where}: byte_fallback is on but the vocab lacks the byte token "
                                     f"<0x{self.byte_ids.index(None):02X}>")
        self.unk_id = vocab.get(model.get("unk_token"))
        self.fuse_unk = bool(model.get("fuse_unk"))
        self.merges = {}  # (left id, right id) -> (rank, merged id), for reference_encode

        # tiktoken's ranks (see the module docstring) and, for each rank, its id (None: not a token)
        ranks, self.rank_id = {}, []

        def add(data, i):
            if data in ranks:  # an ASCII character: its own id, not the byte token's
                self.rank_id[ranks[data]] = i
            else:
                ranks[data] = len(self.rank_id)
                self.rank_id.append(i)
        for b in range(256):
            add(bytes([b]), self.byte_ids[b] if self.byte_ids else None)
        chars = [t for t in vocab if len(t) == 1]
        for c in chars:
            for k in range(2, len(c.encode())):
                add(c.encode()[:k], None)
        for c in chars:
            add(c.encode(), vocab[c])
        made = None
        for rank, merge in enumerate(model["merges"]):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            if left not in vocab or right not in vocab or left + right not in vocab:
                raise SentencePieceError(f"{where}: merge {rank} {merge!r} uses or makes a token that is "
                                         f"not in the vocab")
            self.merges[vocab[left], vocab[right]] = (rank, vocab[left + right])
            token = (left + right).encode()
            if token != made and token in ranks:
                raise SentencePieceError(
                    f"{where}: merge {rank} {merge!r} makes {left + right!r} again after merges of other "
                    f"tokens; tiktoken can replay this BPE only when the merges that make one token are "
                    f"consecutive (tokenizer.py's ranks_from_tokenizer_json says why)")
            add(token, vocab[left + right])
            made = token
        inner = any(SPACE in t.lstrip(SPACE) for t in vocab)
        pattern = (f"{SPACE}[^{SPACE}]*|[^{SPACE}]+" if self.split_all else r"[\s\S]+" if inner else
                   f"{SPACE}*[^{SPACE}]+|{SPACE}+")
        self.enc = tiktoken.Encoding("spm", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    def normalize(self, text, at_start=True):
        """Spaces -> "▁", and the "▁" that prefix_rule puts in front."""
        if not text:
            return ""
        text = text.replace(" ", SPACE)
        if self.prefix == "prepend" or (not text.startswith(SPACE) and
                                        (self.prefix == "always" or self.prefix == "first" and at_start)):
            text = SPACE + text
        return text

    def encode(self, text, at_start=True):
        """Text -> ids. at_start: this text begins the input (see prefix_rule for who gets "▁")."""
        ids, unknown = [], b""  # unknown: bytes of characters outside the vocabulary, in a row
        for r in self.enc.encode_ordinary(self.normalize(text, at_start)):
            i = self.rank_id[r]
            if i is None:
                unknown += self.enc.decode_single_token_bytes(r)
                continue
            if unknown:
                ids += self.fallback(unknown)
                unknown = b""
            ids.append(i)
        return ids + self.fallback(unknown) if unknown else ids

    def fallback(self, data):
        """Ids for the UTF-8 bytes of characters the vocabulary lacks: their byte tokens, or unk."""
        if self.byte_ids:
            return [self.byte_ids[b] for b in data]
        if self.unk_id is None:
            raise SentencePieceError(f"{data.decode(errors='replace')!r} has no token, and the model has "
                                     f"neither byte_fallback nor an unk_token")
        return [self.unk_id] * (1 if self.fuse_unk else len(data.decode(errors="replace")))

    def reference_encode(self, text, at_start=True):
        """The definition, plainly and slowly (tests and the benchmark compare encode with it): one
        symbol per character (or its fallback), then merge the adjacent pair whose merge comes first
        in the list, leftmost on a tie, until no pair is a merge. (Metaspace with split=true merges
        each "▁word" on its own.)"""
        text = self.normalize(text, at_start)
        if self.split_all:
            return [i for word in re.findall(f"{SPACE}[^{SPACE}]*|[^{SPACE}]+", text)
                    for i in self.reference_merge(word)]
        return self.reference_merge(text)

    def reference_merge(self, word):
        syms = []
        for c in word:
            fallback = [] if c in self.vocab else self.fallback(c.encode())
            if not (self.fuse_unk and fallback == [self.unk_id] and syms and syms[-1] == self.unk_id):
                syms += fallback or [self.vocab[c]]
        while True:
            found = [(self.merges[p][0], k) for k, p in enumerate(zip(syms, syms[1:])) if p in self.merges]
            if not found:
                return syms
            k = min(found)[1]
            syms[k:k + 2] = [self.merges[syms[k], syms[k + 1]][1]]

    def decode(self, ids, specials):
        """Ids -> text as Hugging Face's decoder does it ("▁" -> " ", ByteFallback, Fuse, Strip): a
        run of byte tokens becomes its UTF-8 text, or one U+FFFD per byte where it is not valid
        UTF-8; then the one leading space that the prefix "▁" stands for goes. specials: {id: text}
        of the control tokens; unknown ids are skipped."""
        if not hasattr(self, "text_of"):
            self.byte_of = {i: b for b, i in enumerate(self.byte_ids or []) if i is not None}
            self.text_of = {i: t.replace(SPACE, " ") for t, i in self.vocab.items() if i not in self.byte_of}
        out, run = [], bytearray()
        for i in [*ids, None]:
            if i in self.byte_of:
                run.append(self.byte_of[i])
                continue
            if run:
                try:
                    out.append(run.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run = bytearray()
            out.append(specials.get(i) or self.text_of.get(i, ""))
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text

    def id_to_bytes(self):
        """{id: the bytes it decodes to}: "▁" becomes a space, "<0x41>" the byte 0x41."""
        out = {i: t.replace(SPACE, " ").encode() for t, i in self.vocab.items()}
        if self.byte_ids:
            out.update({i: bytes([b]) for b, i in enumerate(self.byte_ids) if i is not None})
        return out
