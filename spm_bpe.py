"""SentencePiece-style BPE as Hugging Face's tokenizer.json writes it (Mistral v0.1-v0.3, Llama 2).

What differs from the byte-level BPE of tokenizer.py:
  * spaces are written "▁" (U+2581) and one "▁" is put before the text: by a `Prepend` normalizer
    (older conversions: every non-empty piece of text gets it) or by a `Metaspace` pre-tokenizer
    (newer ones: with prepend_scheme "first" only text at the very start of the input gets it, and
    never text that already starts with a space);
  * BPE works on unicode characters, not bytes. A character the vocabulary lacks becomes its UTF-8
    bytes as the tokens "<0xE4>", "<0xB8>", ... (`byte_fallback`), or `unk_token` without it;
  * there is no pre-tokenizer: the whole text is one word, merged by the merges list's order.

Why not tiktoken, measured (cases.json and Hugging Face `tokenizers` 0.23.3 as the reference,
mistral-v0.1, an AMD EPYC core shared with other jobs): tiktoken can be made to replay this BPE.
Give single bytes, then the UTF-8 prefixes of the vocabulary's characters, then the characters,
then each merged token in the order of its first merge the lowest ranks, map ranks back to ids
after encoding, and expand a prefix left over (a character outside the vocabulary) into its byte
tokens. That gave Hugging Face's ids for all 24 cases, 22,815 random and README texts and 128,628
texts made of vocabulary tokens and of the 429 strings where two splits of one token overlap. But
it is exact only by measurement: the file ranks the several splits of one token one after the
other, tiktoken gives them one rank (see ranks_from_tokenizer_json in tokenizer.py). And it is no
faster: 1 MB of the README took 0.15 s with tiktoken, 0.18 s with the loop below (which caches
words), 1.5 s with Hugging Face (no pre-tokenizer: the whole text is one word for it).
benchmarks/bench_tokenizer.py --replay repeats the comparison. So this module replays the list
itself with Hugging Face's own algorithm, exact by construction: a heap of candidate pairs ordered
by (merge rank, position), stale entries skipped when popped, and a cache per word.

Words: a merge can never join a character to a following "▁" when no vocabulary token has "▁"
after another character (checked when loading; true of Mistral and Llama 2), so the text is cut
before each such "▁" and every word is merged, and cached, on its own. Otherwise the whole text
is one word (still correct, only slower).
"""

import heapq
import re

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
        self.prefix, split_all = prefix_rule(tj, where)
        self.merges = {}  # (left id, right id) -> (rank, merged id), as Hugging Face's BPE keeps them
        for rank, merge in enumerate(model["merges"]):
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            try:
                self.merges[vocab[left], vocab[right]] = (rank, vocab[left + right])
            except KeyError:
                raise SentencePieceError(f"{where}: merge {merge!r} uses or makes a token that is not "
                                         f"in the vocab") from None
        self.byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)] if model.get("byte_fallback") else None
        self.unk_id = vocab.get(model.get("unk_token"))
        self.fuse_unk = bool(model.get("fuse_unk"))
        # Where words may be cut (see the module docstring).
        inner = any(SPACE in t.lstrip(SPACE) for t in vocab)
        self.words = re.compile(f"{SPACE}[^{SPACE}]*|[^{SPACE}]+" if split_all else
                                None if inner else f"{SPACE}*[^{SPACE}]*")
        self.cache = {}

    def encode(self, text, at_start=True):
        """Text -> ids. at_start: this text begins the input (see prefix_rule for who gets "▁")."""
        if not text:
            return []
        text = text.replace(" ", SPACE)
        if self.prefix == "prepend" or (not text.startswith(SPACE) and
                                        (self.prefix == "always" or self.prefix == "first" and at_start)):
            text = SPACE + text
        if self.words is None:
            return self.merge_word(text)
        ids = []
        for word in self.words.findall(text):
            cached = self.cache.get(word)
            if cached is None:
                cached = self.merge_word(word)
                if len(word) < 64:
                    if len(self.cache) > 200_000:
                        self.cache.clear()
                    self.cache[word] = cached
            ids += cached
        return ids

    def symbols(self, word):
        """The starting symbols: one per character, or its bytes' tokens, or unk."""
        out = []
        for c in word:
            i = self.vocab.get(c)
            if i is not None:
                out.append(i)
            elif self.byte_ids and all(self.byte_ids[b] is not None for b in c.encode()):
                out += [self.byte_ids[b] for b in c.encode()]
            elif self.unk_id is None:
                raise SentencePieceError(f"character {c!r} has no token, no byte fallback and no unk_token")
            elif not (self.fuse_unk and out and out[-1] == self.unk_id):
                out.append(self.unk_id)
        return out

    def merge_word(self, word):
        """Hugging Face's BPE: repeatedly merge the adjacent pair whose merge comes first in the
        list (leftmost on a tie). Symbols live in a linked list; the heap holds candidate merges
        (rank, position of the left symbol, merged id), checked when popped."""
        ids = self.symbols(word)
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            m = self.merges.get((ids[i], ids[i + 1]))
            if m:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j >= n or self.merges.get((ids[i], ids[j]), (None, None))[1] != new:
                continue  # stale: one of the two symbols has been merged since
            ids[i], ids[j] = new, None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if a >= 0 and b < n:
                    m = self.merges.get((ids[a], ids[b]))
                    if m:
                        heapq.heappush(heap, (m[0], a, m[1]))
        return [i for i in ids if i is not None]

    def id_to_bytes(self):
        """{id: the bytes it decodes to}: "▁" becomes a space, "<0x41>" the byte 0x41."""
        out = {i: t.replace(SPACE, " ").encode() for t, i in self.vocab.items()}
        if self.byte_ids:
            out.update({i: bytes([b]) for b, i in enumerate(self.byte_ids) if i is not None})
        return out
