"""A Llama-family transformer written from scratch, loading Hugging Face checkpoint directories.

Covers Llama 2/3 (incl. Llama-3 RoPE scaling), Mistral, Qwen2 (q/k/v biases) and SmolLM2:
RMSNorm, rotary position embeddings in the Hugging Face "split halves" layout, grouped-query
attention (within a sliding window where the config sets one: Mistral v0.1, some Qwen2 layers),
a SwiGLU MLP and optionally tied input/output embeddings.

Module names copy the Hugging Face keys (`model.layers.0.self_attn.q_proj.weight`, ...), so loading a
checkpoint is one loop with shape checks, and so does everything that addresses a weight by name
(svf.py decomposes `mlp.*_proj` and `self_attn.*_proj`).

Talk to the default model (SmolLM2-135M-Instruct, converted on first use by checkpoints.py):

    python model.py --prompt "What is the capital of France?"
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import safetensors_io
from model_config import SUPPORTED, TARGETS, ModelConfig, sliding_window_of  # noqa: F401 (model.ModelConfig etc.)
from products import attend, attends_whole_cache, matvec  # decoding's products, in the forms the CPU runs fastest


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), in float32 as the reference implementation does, then cast back
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(config):
    """Inverse frequencies theta_i = base^(-2i/d), with Llama-3's long-context rescaling if set."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)
    s = config.rope_scaling
    if s:  # Llama 3.1: stretch low frequencies by `factor`, keep high ones, blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq.float()


def rope_tables(inv_freq, n, dtype):
    """cos and signed sin (n, hd) of every position 0..n-1, for apply_rope.

    The split-halves layout rotates each pair (x_i, x_{i+hd/2}) by the angle position * theta_i:
    x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), the halves swapped times the
    signs (-1, +1). The signs go into the sin table once, so apply_rope is three operations.
    """
    freqs = torch.outer(torch.arange(n, device=inv_freq.device, dtype=torch.float32), inv_freq)  # (n, hd/2)
    return (torch.cat((freqs, freqs), -1).cos().to(dtype),
            torch.cat((-freqs.sin(), freqs.sin()), -1).to(dtype))


def apply_rope(x, cos, sin):
    """x (..., hd) rotated: x * cos + (x2, x1) * (-sin, sin), the halves swapped by a roll."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv_bias = c.attention_bias or c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd): all keys so far
        # grouped-query attention: each group of nh/nkv query heads shares one key/value head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.nh != self.nkv)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def decode(self, x, cos, sin, mask, cache, layer):
        """forward for one new token per row: x (B, C), cos and sin (B, 1, hd)."""
        B = x.shape[0]
        q = apply_rope(matvec(self.q_proj, x).view(B, self.nh, self.hd), cos, sin)  # (B, nh, hd)
        k = apply_rope(matvec(self.k_proj, x).view(B, self.nkv, self.hd), cos, sin)  # (B, nkv, hd)
        v = matvec(self.v_proj, x).view(B, self.nkv, self.hd)  # (B, nkv, hd)
        # the columns the mask covers (Transformer.decode chooses them): (B, nkv, n, hd)
        k, v = cache.update(layer, k[:, :, None], v[:, :, None], columns=mask.shape[-1])
        y = attend(q, k, v, mask)  # (B, nh, hd)
        return matvec(self.o_proj, y.view(B, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode(self, x):  # x (B, C)
        return matvec(self.down_proj, F.silu(matvec(self.gate_proj, x)) * matvec(self.up_proj, x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp.decode(self.post_attention_layernorm(x))


def checkpointed(layer, *args):
    """layer(*args) without holding its activations: the backward pass recomputes them
    (torch.utils.checkpoint). The layer's weights go in as arguments, so that the recomputation uses
    the tensors this forward used, also under torch.func.functional_call, whose substitution of
    weights (an expert's W') is over by the time the backward pass runs."""
    weights = dict(layer.named_parameters())
    return torch.utils.checkpoint.checkpoint(lambda w, *a: torch.func.functional_call(layer, w, a),
                                             weights, *args, use_reentrant=False)


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation and written in place.

    Column c of every row is position c of the left-padded batch; key_mask (B, max_len) marks the
    columns that hold real tokens (not padding, not yet written).
    """

    def __init__(self, config, batch_size, max_len, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # columns filled so far (padding included)

    def update(self, layer, k, v, columns=None):
        """Writes the keys and values (B, nkv, T, hd) of T new columns; returns the first `columns`
        columns (B, nkv, columns, hd), by default all written so far; more include unwritten ones,
        which key_mask marks False."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        n = columns or end
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def put(self, rows, start, part):
        """Copies the filled columns of `part`, a cache of len(rows) rows, into rows `rows` (a LongTensor)
        from column `start` on."""
        end = start + part.length
        for k, v, pk, pv in zip(self.k, self.v, part.k, part.v):
            k[rows, :, start:end], v[rows, :, start:end] = pk[:, :, :part.length], pv[:, :, :part.length]
        self.key_mask[rows, start:end] = part.key_mask[:, :part.length]

    def keep(self, rows):
        """Keeps only the batch rows `rows` (a LongTensor), e.g. the sequences still generating."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.key_mask = self.key_mask.index_select(0, rows)


# ----------------------------------------------------------------------------- the model

class LlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._rope = None  # (cos, sin) tables, made by rope() on first use; not weights, so no SVF swap touches them

    def rope(self, positions, n):
        """cos, sin (*positions.shape, hd) at integer positions < n, looked up in tables computed once
        (again only when a longer sequence, another dtype or device comes)."""
        dtype = self.model.embed_tokens.weight.dtype
        cos = self._rope[0] if self._rope else None
        if cos is None or len(cos) < n or cos.dtype != dtype or cos.device != self.inv_freq.device:
            self._rope = rope_tables(self.inv_freq, max(n, 2 * len(cos) if cos is not None else 256), dtype)
        return self._rope[0][positions], self._rope[1][positions]

    def forward(self, input_ids, attention_mask=None, cache=None, logits_from=0, head=True, checkpoint=False):
        """input_ids (B, T) -> logits (B, T, vocab). attention_mask (B, T): 1 real token, 0 padding.

        With a cache, the T new tokens are appended after cache.length earlier positions.
        Padding is allowed on the left only, as generate() makes it. logits_from: logits of positions
        logits_from: only, (B, T - logits_from, vocab). Generation needs the last one (-1), training
        the completion's; the output head is a fifth of the work at this model size. head=False
        returns the final hidden states (B, T - logits_from, C) instead, for logprobs.py.
        checkpoint=True (training, no cache) holds no layer's activations for the backward pass but
        recomputes them there: a third more compute for a twentieth of the memory (`checkpointed`).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        real = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
            else attention_mask.bool()
        if cache is not None:
            cache.key_mask[:, past:past + T] = real
            key_mask = cache.key_mask[:, :past + T]  # (B, S)
        else:
            key_mask = real
        # Position of each token = number of real tokens before it, so left padding shifts nothing.
        positions = (key_mask.long().cumsum(1)[:, past:] - 1).clamp(min=0)  # (B, T)
        cos, sin = self.rope(positions[:, None], past + T)  # (B, 1, T, hd), broadcast over heads

        masks = self.attention_masks(key_mask, past, T)

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.model.layers):
            mask = masks[self.config.window(i)]
            x = checkpointed(layer, x, cos, sin, mask, None, i) if checkpoint else layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x[:, logits_from:])
        return self.lm_head(x) if head else x  # (B, T, vocab) or (B, T, C)

    def attention_masks(self, key_mask, past, T):
        """{window: mask} for the T queries at columns past..past+T-1 over the keys key_mask (B, S)
        marks real: the mask (B, 1, T, S), True where a query may see a key, of the layers with that
        sliding window (None: the whole context). A mask of None is plain causal attention, SDPA's
        fast path, where nothing needs masking.

        A query at column i sees the keys j <= i, and in a sliding window W only those with
        i - j < W: itself and the W - 1 before it, as Hugging Face's Mistral and Qwen2 mask
        (sliding_window_overlay in transformers' masking_utils.py: kv_idx > q_idx - W). Columns
        measure distance in tokens because padding is on the left only: a row's real tokens are
        contiguous, as the ones of a cache are.
        """
        S = past + T
        masks = {}
        for window in self.config.windows():
            needed = not bool(key_mask.all()) or (past > 0 and T > 1) or (window is not None and S > window)
            if not needed:
                masks[window] = None
                continue
            cols = torch.arange(S, device=key_mask.device)
            behind = cols[past:, None] - cols[None, :]  # (T, S): how far key j lies behind query i
            seen = (behind >= 0) if window is None else (behind >= 0) & (behind < window)
            # every query also sees itself, so that rows of pure padding never softmax over nothing
            masks[window] = ((seen[None] & key_mask[:, None, :]) | (behind == 0)[None])[:, None]  # (B, 1, T, S)
        return masks

    def decode(self, tokens, cache):
        """Logits (B, vocab) of the token after `tokens` (B,): one new token per row of the cache.

        forward's fast twin for generation, the same network on one token per row: no time axis,
        no causal mask (the new token attends to every real key), one position per row, and the
        products as products.py's `matvec` and `attend`: fewer operations per layer than forward's,
        and faster kernels. In bfloat16 with native kernels, attention reads all the cache's
        preallocated columns, the unwritten ones masked as the padding is, as gpt-fast's static cache
        does (products.attends_whole_cache; RESULTS.md, "Speed").
        tests/test_model.py checks that generation gives the same tokens either way.
        """
        S = cache.length + 1
        cache.key_mask[:, cache.length] = True
        positions = cache.key_mask[:, :S].sum(1) - 1  # (B,): real tokens before the new one
        cos, sin = self.rope(positions[:, None], S)  # (B, 1, hd)
        # all max_len columns, masked, where a strided slice of them would cost a copy (native bfloat16
        # on a CPU); else the S written ones
        n = cache.key_mask.shape[1] if attends_whole_cache(cache.k[0]) else S
        mask = cache.key_mask[:, None, None, :n]  # (B, 1, 1, n): True at the columns of real tokens
        # in a sliding window W, the new token (column S - 1) sees the columns from S - W on
        masks = {w: mask if w is None or S <= w else mask & (torch.arange(n, device=mask.device) >= S - w)
                 for w in self.config.windows()}
        x = self.model.embed_tokens(tokens)  # (B, C)
        for i, layer in enumerate(self.model.layers):
            x = layer.decode(x, cos, sin, masks[self.config.window(i)], cache, i)
        cache.length = S
        return matvec(self.lm_head, self.model.norm(x))  # (B, vocab)


# ----------------------------------------------------------------------------- loading

def load_state_dict(path):
    """Reads model.safetensors or a sharded model.safetensors.index.json from a checkpoint dir."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with safetensors_io.open_regular(index, ValueError, "safetensors index (JSON)") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: expected model.safetensors or model.safetensors.index.json; "
                                f"found {sorted(os.listdir(path))}")
    state = {}
    for name in files:
        state.update(safetensors_io.load(os.path.join(path, name))[0])
    return state


def load_model(path=None, dtype=torch.float32, device="cpu"):
    """Builds the model of a Hugging Face checkpoint directory. None: the default checkpoint.

    Returns (model, config). Weights are memory-mapped and, when the file's dtype already matches,
    used in place (`assign=True`), so the model costs one copy of memory.
    """
    import checkpoints  # the default checkpoint lives there; imported late to keep model.py standalone
    path = checkpoints.resolve_model(path)
    # open_regular: a FIFO or a device named config.json is refused before open() could wait on it
    with safetensors_io.open_regular(os.path.join(path, "config.json"), ValueError, "model config (JSON)") as f:
        config = ModelConfig.from_hf(json.load(f), source=os.path.join(path, "config.json"))
    with torch.device("meta"):
        model = Transformer(config)
    state = load_state_dict(path)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k])}"
                 for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or misshaped:
        raise ValueError(f"{path}: checkpoint does not match its config.json\n"
                         f"  missing: {missing[:10]}{' ...' if len(missing) > 10 else ''}\n"
                         f"  unexpected: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}\n"
                         f"  mis-shaped: {misshaped[:10]}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    model._rope = None
    return model.eval(), config


# ----------------------------------------------------------------------------- batches

def left_pad(sequences, pad_id, device):
    """list of token lists -> (ids (B, T), mask (B, T)) on `device`, padded on the left.

    Built as Python lists and copied once: one transfer to a GPU, not one per row."""
    T = max(len(s) for s in sequences)
    ids = [[pad_id] * (T - len(s)) + list(s) for s in sequences]
    mask = [[False] * (T - len(s)) + [True] * len(s) for s in sequences]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.bool, device=device))


if __name__ == "__main__":
    # `python model.py --prompt ...`: chat.py's command line, run as a script (runpy), not imported,
    # so that this file depends on nothing above it (chat.py -> generate.py -> model.py)
    import runpy
    runpy.run_module("chat", run_name="__main__")
