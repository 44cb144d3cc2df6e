"""checkpoints.py: the GGUF reader on small files written here, Q/K unpermute, resolve_model, and the
converted default checkpoint (converted once per machine, then cached)."""

import json
import os
import struct

import numpy as np
import pytest
import torch

import checkpoints
import safetensors_io
from checkpoints import GGUFError, read_gguf


# ----------------------------------------------------------------------------- a tiny GGUF writer

def gguf_string(s):
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(vtype, value):
    """Encodes one metadata value of GGUF type `vtype` (arrays: (element type, list))."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    if vtype == 8:
        return gguf_string(value)
    if vtype == 9:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, v) for v in items)
    return struct.pack("<" + scalar[vtype], value)


def write_gguf(path, metadata, tensors, magic=b"GGUF", version=3, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, dims, ggml_type, raw bytes)]."""
    head = magic + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, vtype, value in metadata:
        head += gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value)
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        data += raw
    for (name, dims, ggml_type, _), offset in zip(tensors, offsets):
        head += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        head += struct.pack("<IQ", ggml_type, offset)
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head + data)
    return str(path)


def f16(x):
    return np.float16(x).tobytes()


# Q8_0, two blocks of 32: scales 0.5 and -2, q = -16..15 and 0..31.
Q8_BLOCKS = f16(0.5) + np.arange(-16, 16, dtype=np.int8).tobytes() + \
    f16(-2.0) + np.arange(32, dtype=np.int8).tobytes()
# Q4_1, one block: d = 0.25, m = -1; byte j holds q_j = j (low nibble) and q_{j+16} = 15 - j (high).
Q4_BLOCK = f16(0.25) + f16(-1.0) + bytes(j | (15 - j) << 4 for j in range(16))

METADATA = [
    ("general.architecture", 8, "llama"),
    ("general.alignment", 4, 64),
    ("test.u8", 0, 255), ("test.i8", 1, -128), ("test.u16", 2, 65535), ("test.i16", 3, -32768),
    ("test.i32", 5, -7), ("test.f32", 6, 0.5), ("test.bool", 7, True), ("test.u64", 10, 2**40),
    ("test.i64", 11, -2**40), ("test.f64", 12, 0.1),
    ("test.strings", 9, (8, ["a", "Ġb", "<|im_end|>"])), ("test.ints", 9, (5, [1, -2, 3])),
    ("test.nested", 9, (9, [(4, [1, 2]), (8, ["x"])])),
]


@pytest.fixture
def tiny_gguf(tmp_path):
    tensors = [("f32", [3, 2], 0, np.arange(6, dtype="<f4").tobytes()),
               ("q8", [32, 2], 8, Q8_BLOCKS),
               ("q4", [32], 3, Q4_BLOCK)]
    return write_gguf(tmp_path / "tiny.gguf", METADATA, tensors, alignment=64)


def test_reads_metadata_of_every_type(tiny_gguf):
    meta, _ = read_gguf(tiny_gguf)
    assert meta["general.architecture"] == "llama" and meta["general.alignment"] == 64
    assert (meta["test.u8"], meta["test.i8"], meta["test.u16"], meta["test.i16"]) == (255, -128, 65535, -32768)
    assert (meta["test.i32"], meta["test.f32"], meta["test.bool"]) == (-7, 0.5, True)
    assert (meta["test.u64"], meta["test.i64"]) == (2**40, -2**40)
    assert meta["test.f64"] == 0.1
    assert meta["test.strings"] == ["a", "Ġb", "<|im_end|>"]
    assert meta["test.ints"] == [1, -2, 3]
    assert meta["test.nested"] == [[1, 2], ["x"]]


def test_dequantizes_f32_q8_0_q4_1_by_hand(tiny_gguf):
    _, t = read_gguf(tiny_gguf)
    # GGUF dims [3, 2] are (columns, rows): torch shape (2, 3)
    np.testing.assert_array_equal(t["f32"], [[0, 1, 2], [3, 4, 5]])
    assert t["q8"].shape == (2, 32) and t["q8"].dtype == np.float32
    assert t["q8"][0, :4].tolist() == [-8.0, -7.5, -7.0, -6.5]        # 0.5 * (-16, -15, -14, -13)
    assert t["q8"][0, -1] == 7.5 and t["q8"][1, :3].tolist() == [0.0, -2.0, -4.0]
    np.testing.assert_array_equal(t["q8"][1], -2.0 * np.arange(32))
    assert t["q4"].shape == (32,)
    assert t["q4"][:3].tolist() == [-1.0, -0.75, -0.5]                # 0.25 * (0, 1, 2) - 1
    assert t["q4"][15] == 2.75 and t["q4"][16] == 2.75                # q = 15 both
    assert t["q4"][17] == 2.5 and t["q4"][31] == -1.0                 # q = 14, q = 0
    np.testing.assert_array_equal(t["q4"], np.r_[np.arange(16), 15 - np.arange(16)] * 0.25 - 1)


def test_rejects_bad_magic(tmp_path):
    path = write_gguf(tmp_path / "bad.gguf", METADATA, [], magic=b"GGML")
    with pytest.raises(GGUFError, match=r"expected magic b'GGUF', found b'GGML'"):
        read_gguf(path)


def test_rejects_unsupported_version(tmp_path):
    path = write_gguf(tmp_path / "v9.gguf", METADATA, [], version=9)
    with pytest.raises(GGUFError, match="unsupported GGUF version 9"):
        read_gguf(path)


def test_rejects_unknown_tensor_type(tmp_path):
    path = write_gguf(tmp_path / "q4k.gguf", METADATA, [("w", [256], 12, b"\0" * 144)])
    with pytest.raises(GGUFError, match=r"'w' has ggml type 12.*supported types: 0 \(F32\)"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0, 3, 10, 60, 200, -1])
def test_rejects_truncated_file(tiny_gguf, keep):
    raw = open(tiny_gguf, "rb").read()
    with open(tiny_gguf, "wb") as f:  # keep: bytes kept; -1: all but the last byte of tensor data
        f.write(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(GGUFError, match="truncated file"):
        read_gguf(tiny_gguf)


# ------------------------------------------------------------------------------- Q/K unpermute

def llama_cpp_permute(w, n_head, n_head_kv):
    """Verbatim logic of convert_hf_to_gguf.py's LlamaModel.permute, the reference."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("rows,n_head,n_head_kv", [(576, 9, 9), (192, 9, 3), (8, 1, None)])
def test_unpermute_inverts_llama_cpp_permute(rows, n_head, n_head_kv):
    w = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    heads = n_head_kv or n_head
    permuted = llama_cpp_permute(w, n_head, n_head_kv)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(checkpoints.unpermute_qk(permuted, heads), w)
    np.testing.assert_array_equal(checkpoints.permute_qk(w, heads), permuted)


def test_unpermuted_weights_make_split_halves_rope_match_interleaved_rope():
    """Attention scores of llama.cpp (interleaved RoPE on GGUF weights) equal those of Hugging Face
    (split-halves RoPE on unpermuted weights): the point of undoing the permutation."""
    g = torch.Generator().manual_seed(0)
    hd, n_pos = 8, 5
    wq_hf, wk_hf, x = (torch.randn(hd, 12, generator=g), torch.randn(hd, 12, generator=g),
                       torch.randn(n_pos, 12, generator=g))
    ang = torch.arange(n_pos)[:, None] * 10000.0 ** (-torch.arange(0, hd, 2) / hd)  # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rope_halves(v):
        a, b = v[:, :hd // 2], v[:, hd // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], 1)

    def rope_pairs(v):
        a, b = v[:, 0::2], v[:, 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], 2).reshape(n_pos, hd)

    wq_gguf = torch.from_numpy(llama_cpp_permute(wq_hf.numpy(), 1, 1))
    wk_gguf = torch.from_numpy(llama_cpp_permute(wk_hf.numpy(), 1, 1))
    s_llama_cpp = rope_pairs(x @ wq_gguf.T) @ rope_pairs(x @ wk_gguf.T).T
    wq, wk = (torch.from_numpy(checkpoints.unpermute_qk(w.numpy(), 1)) for w in (wq_gguf, wk_gguf))
    s_hf = rope_halves(x @ wq.T) @ rope_halves(x @ wk.T).T
    torch.testing.assert_close(s_hf, s_llama_cpp)
    assert not torch.allclose(rope_halves(x @ wq_gguf.T) @ rope_halves(x @ wk_gguf.T).T, s_hf)


def test_gguf_names_map_to_hugging_face_keys():
    assert checkpoints.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert checkpoints.hf_name("blk.29.attn_output.weight") == "model.layers.29.self_attn.o_proj.weight"
    assert checkpoints.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert checkpoints.hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(GGUFError, match="blk.0.ffn_gate_exps"):
        checkpoints.hf_name("blk.0.ffn_gate_exps.weight")


# ----------------------------------------------------------------------------- resolve_model

def test_resolve_model_explains_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a checkpoint directory, found nothing"):
        checkpoints.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="found a file"):
        checkpoints.resolve_model(str(tmp_path / "file.bin"))
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"config.json and model.safetensors.*found \['config.json'\]"):
        checkpoints.resolve_model(str(d))
    (d / "model.safetensors.index.json").write_text("{}")  # a sharded checkpoint is fine
    assert checkpoints.resolve_model(str(d)) == str(d)


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(checkpoints, "download_gguf", lambda downloads: "unused.gguf")

    def interrupted(gguf_path, out_dir, log=print):
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C while model.safetensors is being written

    monkeypatch.setattr(checkpoints, "write_hf_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.default_model_dir()
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        checkpoints.resolve_model(str(tmp_path / checkpoints.MODEL_NAME))


# ----------------------------------------------------------------------- the default checkpoint

@pytest.fixture(scope="session")
def converted_dir():
    return checkpoints.default_model_dir()  # slow once (download + conversion), then cached


def test_default_directory_has_hugging_face_files(converted_dir):
    assert checkpoints.resolve_model(None) == converted_dir
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
        assert os.path.isfile(os.path.join(converted_dir, name)), name
    root = os.path.dirname(converted_dir)
    assert not [d for d in os.listdir(root) if d.startswith(".tmp")], "leftover temporary directory"
    config = json.load(open(os.path.join(converted_dir, "config.json")))
    expected = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                    rms_norm_eps=1e-5, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    assert {k: config[k] for k in expected} == expected
    tokenizer_config = json.load(open(os.path.join(converted_dir, "tokenizer_config.json")))
    assert "You are a helpful AI assistant named SmolLM" in tokenizer_config["chat_template"]
    assert (tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == ("<|im_end|>", "<|im_end|>")


def test_default_weights_have_hugging_face_names_and_shapes(converted_dir):
    header, _, _ = safetensors_io.read_header(os.path.join(converted_dir, "model.safetensors"))
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    assert {v["dtype"] for v in header.values()} == {"F32"}
    assert len(shapes) == 2 + 30 * 9 and "lm_head.weight" not in shapes  # tied embeddings
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.norm.weight"] == (576,)
    layer = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
             "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
             "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536),
             "input_layernorm": (576,), "post_attention_layernorm": (576,)}
    for i in range(30):
        for key, shape in layer.items():
            assert shapes[f"model.layers.{i}.{key}.weight"] == shape


def test_default_tokenizer_json_is_complete(converted_dir):
    tj = json.load(open(os.path.join(converted_dir, "tokenizer.json")))
    assert len(tj["model"]["vocab"]) == 49152 and len(tj["model"]["merges"]) == 48900
    assert [a["content"] for a in tj["added_tokens"][:3]] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(tj["added_tokens"]) == 17
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
