"""tokenizer.py: the default (SmolLM2) tokenizer against reference ids, round trips on any text, the
chat template, and tiny tokenizer.json / tokenizer.model files written here."""

import base64
import hashlib
import json
import random
import re
import unicodedata

import pytest
import torch

import checkpoints
from tokenizer import DIGITS_GPT2_PATTERN, GPT2_PATTERN, Tokenizer, TokenizerError, bytes_to_unicode
from tokenizer import default_system_prompt

# The single bytes SmolLM2's vocabulary has no token for (tokenizer.py's docstring lists them too).
MISSING = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}


@pytest.fixture(scope="session")
def smol():
    return Tokenizer.from_dir(checkpoints.default_model_dir())


# -------------------------------------------------------------- reference ids of the real tokenizer

# Cross-checked: the Hugging Face `tokenizers` library (0.23.3, in a throwaway environment, not a
# project dependency) loading the tokenizer.json that checkpoints.py writes gives these ids, and
# that tokenizer reproduces llama.cpp's fingerprint of the original SmolLM tokenizer below.
PINNED = {
    "What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
    "The quick brown fox jumps over the lazy dog.": [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
    "In 2024, 3.14159 × 12 = 37.69908": [788, 216, 34, 32, 34, 36, 28, 216, 35, 30, 33, 36, 33, 37, 41, 15493,
                                         216, 33, 34, 446, 216, 35, 39, 30, 38, 41, 41, 32, 40],
    "東京は日本の首都です。🚀": [30679, 126, 16736, 122, 7365, 124, 23274, 115, 40993, 26453, 180, 116, 240, 180,
                        38466, 7365, 117, 39958, 19076, 10813, 244, 218],
    "def f(x):\n    return x ** 2\n": [1604, 275, 24, 104, 727, 472, 1003, 1792, 1903, 216, 34, 198],
    "Ünïcödé   spaces\ttabs\n\nnewlines": [142, 246, 94, 25972, 83, 7466, 84, 2756, 256, 5600, 197, 100, 7366,
                                        198, 198, 2241, 5110],
    "a  1": [81, 256, 33],  # trailing spaces before a digit stay one piece (Digits cuts first)
}


@pytest.mark.parametrize("text", PINNED)
def test_pinned_ids(smol, text):
    assert smol.encode(text) == PINNED[text]


def test_llama_cpp_fingerprint_of_the_smollm_tokenizer(smol):
    """llama.cpp's convert_hf_to_gguf.py identifies a pre-tokenizer by the sha256 of str(ids) of this
    text under the original Hugging Face tokenizer; SmolLM's is 855059429035d75a...('smollm')."""
    chktxt = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
              'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
              'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
              '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
              '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
    digest = hashlib.sha256(str(smol.encode(chktxt)).encode()).hexdigest()
    assert digest == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


def test_digits_pattern_equals_digits_then_bytelevel():
    """DIGITS_GPT2_PATTERN in one pass == Hugging Face's Digits(individual) then the GPT-2 regex on
    each stretch between digits, on random strings rich in digits and whitespace."""
    regex = pytest.importorskip("regex")  # tiktoken's own dependency

    def reference(s):
        pieces, stretch = [], ""
        for c in s:
            if unicodedata.category(c).startswith("N"):
                pieces += regex.findall(GPT2_PATTERN, stretch) + [c]
                stretch = ""
            else:
                stretch += c
        return pieces + regex.findall(GPT2_PATTERN, stretch)

    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\t", "\u00a0", "1", "٣", "²", "Ⅻ", "a", "B", "é", ".", "'", "'s", "!?", "中"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert regex.findall(DIGITS_GPT2_PATTERN, s) == reference(s), repr(s)


# ------------------------------------------------------------------------ round trips, any input

def random_text(rng, n):
    """Code points from all of Unicode except surrogates and characters whose UTF-8 needs a byte
    missing from the vocabulary (six control characters, planes 4-11)."""
    out = []
    while len(out) < n:
        c = chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xFFFF),
                            rng.randint(0x10000, 0x3FFFF), rng.randint(0xC0000, 0x10FFFF)]))
        if not 0xD800 <= ord(c) <= 0xDFFF and not MISSING & set(c.encode()):
            out.append(c)
    return "".join(out)


def test_round_trip_random_unicode(smol):
    rng = random.Random(1234)
    samples = [random_text(rng, rng.randint(0, 40)) for _ in range(300)]
    samples += ["Hello 👋🏽 world 🇫🇷 😶\u200d🌫️", "中文、日本語、한국어", "\x00\x01\x7f\r\n\x1b[0m",
                "  leading and trailing  ", "é" * 50 + "\n" * 5 + " " * 7, "x\u0301\u0302", ""]
    for s in samples:
        assert smol.decode(smol.encode(s)) == s, repr(s)


def test_every_single_byte(smol):
    single = {t[0] for t in smol.id_to_bytes.values() if len(t) == 1}
    assert single == set(range(256)) - MISSING
    for b in range(256):
        c = chr(b)  # U+0000..U+00FF: one byte below 0x80, two above
        if MISSING & set(c.encode()):
            continue
        assert smol.decode(smol.encode(c)) == c, hex(b)
    ids = [i for i, t in smol.id_to_bytes.items() if len(t) == 1]
    by_byte = {smol.id_to_bytes[i][0]: i for i in ids}
    text = "é€😀"
    assert smol.decode([by_byte[b] for b in text.encode()]) == text  # bytes reassemble characters


def test_missing_bytes_never_crash_and_are_dropped_like_hugging_face(smol):
    """tiktoken would raise PanicException (a BaseException) on these; the reference tokenizer,
    whose BPE has no unk_token, drops a character it cannot spell."""
    assert smol.encode("\x04") == []
    assert smol.encode("a\x04b") == smol.encode("a") + smol.encode("b")
    assert smol.decode(smol.encode("x\x1dy\x06z")) == "xyz"
    for b in range(0x80):
        smol.encode(f"<{chr(b)}>{chr(b) * 3} {chr(b)}1")
    s = "\U00050000"  # UTF-8 F1 90 80 80: the lead byte is missing, the rest decode as U+FFFD
    assert smol.decode(smol.encode(s)) == "\ufffd" * 3


def test_control_token_text_stays_plain_text(smol):
    for s in ["<|im_end|>", "hi<|im_start|>system\nx<|im_end|>", "<|endoftext|><repo_name>"]:
        ids = smol.encode(s)
        assert not set(ids) & set(smol.special_tokens.values())
        assert smol.decode(ids) == s


def test_special_tokens(smol):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.vocab_size) == (1, 2, 2, 49152)
    assert smol.special_tokens["<|endoftext|>"] == 0 and smol.special_tokens["<|im_end|>"] == 2
    assert len(smol.special_tokens) == 17
    assert smol.stop_tokens == {0, 2}
    assert smol.decode([1, 4093, 2]) == "<|im_start|>" + smol.decode([4093]) + "<|im_end|>"


def test_decode_never_fails(smol):
    assert smol.decode([-1, 10**12, 49152]) == ""  # ids without a token are skipped
    assert smol.decode(torch.tensor([1780, 314])) == "What is"
    half = [i for i, t in smol.id_to_bytes.items() if t == b"\xe2"]  # first byte of a 3-byte char
    assert smol.decode(half + smol.encode("ok")) == "\ufffdok"


# ---------------------------------------------------------------------------------- chat template

# What SmolLM2's Jinja template (tokenizer.chat_template in the GGUF) renders for this conversation,
# checked with jinja2 when these tests were written.
CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
RENDERED = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
            "<|im_start|>assistant\n")


def encode_rendered(tok, text):
    """How Hugging Face tokenizes a rendered template: control tokens are cut out first, and each
    stretch of text between them is encoded on its own."""
    pattern = "(" + "|".join(map(re.escape, tok.special_tokens)) + ")"
    ids = []
    for part in re.split(pattern, text):
        ids += [tok.special_tokens[part]] if part in tok.special_tokens else tok.encode(part)
    return ids


def test_chat_matches_the_jinja_rendering(smol):
    ids = smol.chat(CONVERSATION)
    assert smol.decode(ids) == RENDERED
    assert ids == encode_rendered(smol, RENDERED)
    assert smol.decode(smol.chat(CONVERSATION, add_generation_prompt=False)) == RENDERED[:-len("<|im_start|>assistant\n")]


def test_chat_against_jinja2_if_installed(smol):
    jinja2 = pytest.importorskip("jinja2")
    config = json.load(open(f"{checkpoints.default_model_dir()}/tokenizer_config.json"))
    template = jinja2.Environment().from_string(config["chat_template"])
    conversations = [CONVERSATION, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "<|im_end|> 12  \n"}], []]
    for messages in conversations:
        for gen in (True, False):
            text = template.render(messages=messages, add_generation_prompt=gen)
            assert smol.decode(smol.chat(messages, gen)) == text
            if "<|im_end|> 12" not in text:  # there Jinja + HF would turn user text into a control token
                assert smol.chat(messages, gen) == encode_rendered(smol, text)


def test_default_system_prompt_from_other_chatml_templates():
    qwen2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
             "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
             "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert default_system_prompt(qwen2) == "You are a helpful assistant."
    assert default_system_prompt([{"name": "default", "template": qwen2}]) == "You are a helpful assistant."
    assert default_system_prompt("{{ '<|im_start|>' + message['role'] }}") is None


# ------------------------------------------------------------------------- tiny files written here

def test_gpt2_byte_table():
    table = bytes_to_unicode()
    assert (table[ord("A")], table[32], table[10], table[0], table[0xAD]) == ("A", "Ġ", "Ċ", "Ā", "Ń")
    assert len(set(table.values())) == 256


def write_tokenizer_json(path, merges, drop_bytes=(), unk=None, pre=None, config=None):
    """256 byte tokens (ids = byte values), the merges' results, then three control tokens."""
    u = bytes_to_unicode()
    vocab = {u[b]: b for b in range(256) if b not in drop_bytes}
    vocab.update({m.replace(" ", ""): 256 + k for k, m in enumerate(merges)})
    added = [{"id": 256 + len(merges) + i, "content": t, "special": True}
             for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])]
    tj = {"added_tokens": added,
          "pre_tokenizer": pre or {"type": "Sequence", "pretokenizers": [
              {"type": "Digits", "individual_digits": True},
              {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
          "model": {"type": "BPE", "unk_token": unk, "vocab": vocab, "merges": merges}}
    path.mkdir(exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tj))
    (path / "tokenizer_config.json").write_text(json.dumps(config or {"eos_token": "<|im_end|>"}))
    return str(path)


MERGES = ["h e", "Ġ t", "Ġt he", "1 2", "l l", "he ll"]  # ids 256..261; control tokens 262..264


def test_tiny_tokenizer_json(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer_json(tmp_path / "tiny", MERGES))
    assert tok.encode(" the") == [258]
    assert tok.encode("the") == [ord("t"), 256]
    assert tok.encode("hello the") == [261, ord("o"), 258]
    assert tok.encode("12") == [ord("1"), ord("2")]  # Digits isolates each digit: "1 2" never applies
    assert tok.encode("<|im_end|>") == list(b"<|im_end|>")
    assert (tok.vocab_size, tok.eos_id, tok.stop_tokens) == (265, 264, {262, 264})
    assert tok.chat([{"role": "user", "content": "hi"}]) == \
        [263, *tok.encode("user\nhi"), 264, ord("\n"), 263, *tok.encode("assistant\n")]


def test_tiny_tokenizer_missing_byte_uses_unk_when_the_model_has_one(tmp_path):
    dropped = Tokenizer.from_dir(write_tokenizer_json(tmp_path / "a", ["h e"], drop_bytes=[4]))
    assert dropped.encode("he\x04he") == [256, 256]
    unk = Tokenizer.from_dir(write_tokenizer_json(tmp_path / "b", ["h e"], drop_bytes=[4], unk="!"))
    assert unk.encode("he\x04he") == [256, ord("!"), 256]


def test_tiny_tokenizer_rejects_what_tiktoken_cannot_replay(tmp_path):
    with pytest.raises(TokenizerError, match="merge 1 'Ġ t' makes id 256 after a group of id 257"):
        Tokenizer.from_dir(swapped_merges(tmp_path / "a"))
    with pytest.raises(TokenizerError, match="unsupported pre_tokenizer"):
        Tokenizer.from_dir(write_tokenizer_json(tmp_path / "b", MERGES, pre={"type": "Whitespace"}))
    with pytest.raises(TokenizerError, match="expected tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(str(tmp_path))


def swapped_merges(path):
    """A tokenizer.json whose merge list is not in id order: "h e" -> 257 listed before "Ġ t" -> 256."""
    write_tokenizer_json(path, ["Ġ t", "h e"])
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["model"]["merges"] = ["h e", "Ġ t"]
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return str(path)


def write_merges(path, merges):
    """Like write_tokenizer_json, but a token made by several merges gets one id, at its first."""
    write_tokenizer_json(path, [])
    tj = json.loads((path / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for k, a in enumerate(tj["added_tokens"]):
        a["id"] = len(vocab) + k
    tj["model"]["merges"] = merges
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return str(path)


def test_duplicate_merges_of_one_token(tmp_path):
    """Several merges may make one token (Llama 3 lists every split). tiktoken ranks them all with
    the token's id, which is the list's order only while they stay together. Here "a bc" makes
    "abc" again after "bc d": Hugging Face turns "abcd" into a, bc, d, then prefers "bc d" (listed
    first) and gives a, bcd; tiktoken would rank "a bc" with "ab c", before "bc d", and give abc, d.
    So that file is refused; the same merges with the duplicate next to "ab c" load and agree."""
    with pytest.raises(TokenizerError, match=r"bad/tokenizer.json: merge 4 'a bc' makes 'abc' again after "
                                             r"merges of other tokens"):
        Tokenizer.from_dir(write_merges(tmp_path / "bad", ["b c", "a b", "ab c", "bc d", "a bc"]))
    tok = Tokenizer.from_dir(write_merges(tmp_path / "ok", ["b c", "a b", "ab c", "a bc", "bc d"]))
    ids = {tok.decode([i]): i for i in range(256, 260)}
    assert list(ids) == ["bc", "ab", "abc", "bcd"]
    assert tok.encode("abcd") == [ids["abc"], ord("d")]  # Hugging Face: a,bc,d -> "a bc" (rank 3) first
    assert tok.encode("bcd") == [ids["bcd"]] and tok.encode("abc") == [ids["abc"]]


def test_tiny_llama3_tokenizer_model(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"he", b" t", b" the"]
    (tmp_path / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    tok = Tokenizer.from_dir(str(tmp_path))
    s = tok.special_tokens
    assert (s["<|begin_of_text|>"], s["<|eot_id|>"], len(s), tok.vocab_size) == (259, 268, 256, 515)
    assert tok.encode(" the 1234") == [258, 32, ord("1"), ord("2"), ord("3"), ord("4")]
    ids = tok.chat([{"role": "user", "content": " Hi \n"}])
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ids[:2] == [259, s["<|start_header_id|>"]] and tok.stop_tokens == {268, s["<|end_of_text|>"]}
