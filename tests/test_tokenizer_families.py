"""The real tokenizer files of Llama 3, Llama 3.1, Qwen3 and Mistral (../shared/tokenizers) against
Hugging Face's own ids (cases.json there), the SentencePiece-style BPE of spm_bpe.py against a plain
reference loop, and clear errors for tokenizer files we cannot read."""

import json
import os
import random

import pytest

from spm_bpe import SPACE, SentencePieceBPE
from tokenizer import Tokenizer, TokenizerError

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "tokenizers"))
FOLDERS = ["llama3", "llama3_1", "qwen3", "mistral-v0.1", "mistral-v0.1-metaspace"]
needs_shared = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "cases.json")),
                                  reason=f"no real tokenizer files: {SHARED}/cases.json is absent")


@pytest.fixture(scope="module")
def cases():
    with open(os.path.join(SHARED, "cases.json"), encoding="utf-8") as f:
        return json.load(f)["tokenizers"]


@pytest.fixture(scope="module")
def tokenizers():
    """Each folder loaded once for the module (Llama 3's tokenizer.json is 9 MB)."""
    loaded = {}

    def get(folder):
        if folder not in loaded:
            loaded[folder] = Tokenizer.from_dir(os.path.join(SHARED, folder))
        return loaded[folder]
    return get


# ------------------------------------------------------------------ the real files, Hugging Face's ids

@needs_shared
@pytest.mark.parametrize("folder", FOLDERS)
def test_encode_equals_hugging_face(folder, cases, tokenizers):
    tok = tokenizers(folder)
    for case in cases[folder]["encode"]:
        assert tok.encode(case["text"]) == case["ids"], repr(case["text"])


@needs_shared
@pytest.mark.parametrize("folder", FOLDERS)
def test_decode_restores_the_text(folder, cases, tokenizers):
    """Byte-level and Prepend: exactly. Metaspace puts no "▁" before text that starts with a space,
    yet its decoder (like Hugging Face's: Strip(start=1)) drops one leading space all the same."""
    tok = tokenizers(folder)
    for case in cases[folder]["encode"]:
        text = case["text"]
        if folder.endswith("metaspace") and text.startswith(" "):
            text = text[1:]
        assert tok.decode(case["ids"]) == text, repr(case["text"])


@needs_shared
@pytest.mark.parametrize("folder", ["mistral-v0.1", "mistral-v0.1-metaspace"])
def test_mistral_special_tokens_and_byte_fallback(folder, tokenizers):
    tok = tokenizers(folder)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 2, 32000)
    assert tok.stop_tokens == {2} and tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    # "ｆ" (U+FF46) has no token: its three UTF-8 bytes come out as <0xEF> <0xBD> <0x86> (id 3 + byte)
    assert tok.encode("ｆ") == [28705, 3 + 0xEF, 3 + 0xBD, 3 + 0x86]
    assert tok.decode(tok.encode("aｆb")) == "aｆb"
    assert tok.decode([1, *tok.encode("Hi"), 2]) == "<s> Hi</s>"  # as Hugging Face decodes it
    # Hugging Face: a run of byte tokens that is not UTF-8 gives one U+FFFD per byte; unknown ids skipped
    assert tok.decode([3 + 0xEF, 3 + 0xBD, 28708, 3 + 0x41, 3 + 0xEF, -1, 10**9]) == "\ufffd\ufffda\ufffd\ufffd"


@needs_shared
@pytest.mark.parametrize("folder", FOLDERS)
def test_typed_control_tokens_stay_text(folder, tokenizers):
    tok = tokenizers(folder)
    for text in [*tok.special_tokens][:20]:
        ids = tok.encode("x" + text)
        assert not set(ids) & set(tok.special_tokens.values()), text
        assert tok.decode(ids) == "x" + text


@needs_shared
def test_nfc_normalizer_only_where_the_file_has_one(tokenizers):
    qwen, llama = tokenizers("qwen3"), tokenizers("llama3")
    assert qwen.encode("cafe\u0301") == qwen.encode("caf\u00e9")  # Qwen's tokenizer.json: NFC
    assert llama.encode("cafe\u0301") != llama.encode("caf\u00e9")  # Llama 3's: no normalizer
    assert llama.decode(llama.encode("cafe\u0301")) == "cafe\u0301"


@needs_shared
def test_at_start_prefix_rules(tokenizers):
    """Hugging Face encodes each stretch of a rendered chat between control tokens on its own. The
    Prepend normalizer gives every stretch "▁"; Metaspace "first" only the one at offset 0."""
    legacy, meta = tokenizers("mistral-v0.1"), tokenizers("mistral-v0.1-metaspace")
    bracket, space_bracket = meta.spm.vocab["["], meta.spm.vocab[SPACE + "["]
    assert legacy.encode("[INST]", at_start=False) == legacy.encode("[INST]")
    assert legacy.encode("[INST]")[0] == space_bracket
    assert meta.encode("[INST]")[0] == space_bracket
    assert meta.encode("[INST]", at_start=False)[0] == bracket
    assert meta.encode("", at_start=True) == legacy.encode("") == []
    llama = tokenizers("llama3")
    assert llama.encode("Hi there", at_start=False) == llama.encode("Hi there")  # byte-level ignores it


@needs_shared
def test_mistral_random_round_trip(tokenizers):
    """Prepend adds one "▁" and the decoder strips one space, so decode(encode(s)) == s for any text,
    characters outside the vocabulary included (byte fallback)."""
    tok = tokenizers("mistral-v0.1")
    rng = random.Random(7)
    for _ in range(300):
        s = "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0x10000, 0x10FFFF)]))
                    for _ in range(rng.randint(0, 30)))
        assert tok.decode(tok.encode(s)) == s, repr(s)


@needs_shared
def test_spm_tiktoken_replay_equals_the_plain_definition(tokenizers):
    """spm_bpe encodes through tiktoken; reference_encode merges the whole text at once by the
    merges list, rescanning for the pair listed first. Both must agree, on texts rich in the runs
    where the two orders could part (two splits of "----" overlap) and in characters without a token."""
    spm = tokenizers("mistral-v0.1").spm
    rng = random.Random(3)
    alphabet = [" ", "  ", "\n", "-", "--", "=", "*", "e", "th", "in", "é", "中文", "ｆ", "🙂", "1", "The", "ing"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        assert spm.encode(s) == spm.reference_encode(s), repr(s)
        assert spm.encode(s, at_start=False) == spm.reference_encode(s, at_start=False), repr(s)


# ------------------------------------------------------------------- tiny SentencePiece-style files

def write_spm(path, normalizer="prepend", merges=("▁ a", "a b", "▁a b"), byte_fallback=True, pre=None, fuse=True):
    """<unk> <s> </s>, 256 byte tokens, "▁", "a", "b", then the merges' results."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t in [SPACE, "a", "b", *(m.replace(" ", "") for m in merges)]:
        vocab.setdefault(t, len(vocab))
    norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE},
                                                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]}
    tj = {"added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])],
          "normalizer": norm if normalizer == "prepend" else normalizer, "pre_tokenizer": pre,
          "model": {"type": "BPE", "unk_token": "<unk>", "byte_fallback": byte_fallback, "fuse_unk": fuse,
                    "vocab": vocab, "merges": list(merges)}}
    path.mkdir(exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tj))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return str(path)


def test_tiny_spm_prefix_schemes_and_fallback(tmp_path):
    legacy = Tokenizer.from_dir(write_spm(tmp_path / "p"))
    v = legacy.spm.vocab
    assert legacy.encode("ab") == [v["▁ab"]] == legacy.encode("ab", at_start=False)
    assert legacy.encode(" ab") == [v["▁"], v["▁ab"]]
    assert legacy.encode("bx") == [v["▁"], v["b"], 3 + ord("x")]  # "x" is not in the vocab: <0x78>
    meta = lambda scheme, **kw: {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme, **kw}
    for scheme, start, later in [("first", [v["▁ab"]], [v["ab"]]), ("always", [v["▁ab"]], [v["▁ab"]]),
                                 ("never", [v["ab"]], [v["ab"]])]:
        tok = Tokenizer.from_dir(write_spm(tmp_path / scheme, normalizer=None, pre=meta(scheme, split=False)))
        assert (tok.encode("ab"), tok.encode("ab", at_start=False)) == (start, later), scheme
        assert tok.encode(" ab") == [v["▁ab"]], scheme  # Metaspace never adds a second "▁"
    split = Tokenizer.from_dir(write_spm(tmp_path / "s", merges=("▁ ▁", "a b"), normalizer=None,
                                         pre=meta("always", split=True)))
    assert split.encode("  ab") == [split.spm.vocab["▁"]] * 2 + [split.spm.vocab["ab"]]  # "▁▁" never merges
    no_fallback = Tokenizer.from_dir(write_spm(tmp_path / "u", byte_fallback=False))
    assert no_fallback.encode("axé中b") == [v["▁a"], 0, v["b"]]  # unknown characters: one fused <unk>
    unfused = Tokenizer.from_dir(write_spm(tmp_path / "v", byte_fallback=False, fuse=False))
    assert unfused.encode("axé中b") == [v["▁a"], 0, 0, 0, v["b"]]
    # a token with "▁" inside ("a▁b"): the text cannot be cut before "▁"
    inner = Tokenizer.from_dir(write_spm(tmp_path / "i", merges=("▁ a", "a ▁", "a▁ b")))
    assert inner.encode("xa b") == [inner.spm.vocab["▁"], 3 + ord("x"), inner.spm.vocab["a▁b"]]
    rng = random.Random(5)
    for tok in [legacy, split, no_fallback, unfused, inner]:
        for _ in range(200):
            s = "".join(rng.choice(["a", "b", " ", "  ", "x", "é", "中"]) for _ in range(rng.randint(0, 12)))
            for at_start in (True, False):
                assert tok.spm.encode(s, at_start) == tok.spm.reference_encode(s, at_start), repr(s)


# ------------------------------------------------------------------------------ clear errors

def test_bad_tokenizer_files_name_the_file(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {')
    with pytest.raises(TokenizerError, match=r"bad/tokenizer.json: not valid JSON"):
        Tokenizer.from_dir(str(bad))
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(TokenizerError, match=r"bad/tokenizer.json: expected a BPE model .* found 'WordPiece'"):
        Tokenizer.from_dir(str(bad))
    (bad / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match=r"bad/tokenizer_config.json: not valid JSON"):
        Tokenizer.from_dir(str(bad))
    nfkc = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Prepend", "prepend": SPACE}]}
    with pytest.raises(TokenizerError, match=r"n/tokenizer.json: unsupported normalizer .*NFKC"):
        Tokenizer.from_dir(write_spm(tmp_path / "n", normalizer=nfkc))
    bytelevel = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "tokenizer.json").write_text(json.dumps({"normalizer": {"type": "Lowercase"}, "pre_tokenizer": bytelevel,
                                                    "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    with pytest.raises(TokenizerError, match=r"bad/tokenizer.json: unsupported normalizer .*Lowercase"):
        Tokenizer.from_dir(str(bad))
    (bad / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "Whitespace"},
                                                    "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    with pytest.raises(TokenizerError, match=r"bad/tokenizer.json: unsupported pre_tokenizer"):
        Tokenizer.from_dir(str(bad))
