"""Trainable parameters of each fine-tuning approach a reader of Transformer-Squared meets, from config values.

    python params.py                 # the table in RESULTS.md; also `python svf.py --count`
    python params.py --model DIR     # another checkpoint's column in place of the default model's

The paper's Table 4 puts SVF's parameters next to LoRA's (Table 1's claim: "a tenth of the
parameters"). Per targeted matrix W (m, n), with r = min(m, n):

    SVF                         r            one scale per singular value (svf.py)
    LoRA, rank k                k (m + n)    A (k, n) and B (m, k) (lora.py)
    LoRA-XS, rank k             k^2          a (k, k) matrix between W's frozen top-k singular
                                             vectors (Balazy et al. 2024)
    truncated-SVD fine-tune     k (m + n + 1), k = round(f r): W's top-k U, sigma and V all trained
    at rank fraction f                       (the `svd_training` approach blog posts compare SVF with)
    full fine-tune              every weight of the model, for scale

Columns: the default model (its config.json), Llama-3-8B (the paper's main model, svf.py's counts
before this file), Qwen2.5-1.5B (hard-coded from its config.json on the Hugging Face hub:
hidden 1536, intermediate 8960, 28 layers, 12 heads of 128, 2 KV heads, vocabulary 151936, tied
embeddings, q/k/v biases), and the paper's Table 4 figures for Llama-3-8B where it gives one.
"""

import argparse
import json
import os

from model_config import TARGETS

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
QWEN25_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                   model_type="qwen2")

# (row label, method, targets, rank or rank fraction, the paper's Table 4 figure for Llama-3-8B)
ROWS = [("SVF, mlp", "svf", "mlp", None, "0.39M"),
        ("SVF, attn (q,k,v,o)", "svf", "attn", None, "0.16M ?"),
        ("SVF, all (mlp + attn)", "svf", "all", None, "0.58M"),
        ("SVF, attn q,v", "svf", "qv", None, ""),
        ("LoRA r=8, q,v", "lora", "qv", 8, ""),
        ("LoRA r=16, q,v", "lora", "qv", 16, "6.82M"),
        ("LoRA r=8, mlp", "lora", "mlp", 8, ""),
        ("LoRA r=16, mlp", "lora", "mlp", 16, ""),
        ("LoRA-XS r=16, q,v", "lora-xs", "qv", 16, ""),
        ("SVD fine-tune 0.1, mlp", "svd-ft", "mlp", 0.1, ""),
        ("SVD fine-tune 0.1, all", "svd-ft", "all", 0.1, ""),
        ("full fine-tune", "full", None, None, "")]


def matrix_shapes(cfg):
    """{Hugging Face key of a layer's matrix: (m, n)} from config values (W maps n inputs to m outputs)."""
    hidden, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or hidden // heads
    return {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv * hd, hidden),
            "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def per_matrix(method, m, n, k=None):
    """Trainable parameters one matrix W (m, n) costs under `method` (see the module docstring)."""
    r = min(m, n)
    if method == "svf":
        return r
    if method == "lora":
        return k * (m + n)
    if method == "lora-xs":
        return k * k
    if method == "svd-ft":
        kept = round(k * r)
        return kept * (m + n + 1)
    raise ValueError(f"method={method!r}; expected 'svf', 'lora', 'lora-xs' or 'svd-ft'")


def count(cfg, method, targets=None, k=None):
    """Trainable parameters of `method` on the `targets` matrices (model_config.TARGETS) of every layer;
    k: the rank (lora, lora-xs) or the rank fraction (svd-ft). method "full": every weight."""
    layers, shapes = cfg["num_hidden_layers"], matrix_shapes(cfg)
    if method == "full":
        hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
        bias = sum(shapes[f"self_attn.{p}_proj"][0] for p in "qkv") if cfg.get("model_type") == "qwen2" else 0
        per_layer = sum(m * n for m, n in shapes.values()) + bias + 2 * hidden  # + two RMSNorm weights
        embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
        return layers * per_layer + embeddings + hidden  # + the final norm
    return layers * sum(per_matrix(method, *shapes[t], k) for t in TARGETS[targets])


def count_params(cfg, lora_rank=16):
    """The counts of svf.py's old table: SVF per target set and LoRA on q and v."""
    counts = {t: count(cfg, "svf", t) for t in ("mlp", "attn", "all")}
    return dict(counts, **{"attn q,v": count(cfg, "svf", "qv"), "lora": count(cfg, "lora", "qv", lora_rank)})


def table(columns):
    """The rows of ROWS for each config of `columns` {label: cfg}, and the paper's figures, as text."""
    M = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e6:.3f}M"
    labels = list(columns) + ["paper, Table 4 (Llama-3-8B)"]
    width = [max(len(c), 9) for c in labels]
    lines = [f"{'trainable parameters':24} " + " ".join(f"{c:>{w}}" for c, w in zip(labels, width))]
    for label, method, targets, k, paper in ROWS:
        cells = [M(count(cfg, method, targets, k)) for cfg in columns.values()] + [paper]
        lines.append((f"{label:24} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, width))).rstrip())
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    args = ap.parse_args(argv)
    import checkpoints  # imported here: counting never needs a checkpoint, only this column does
    model_dir = args.model or checkpoints.default_model_dir()
    with open(os.path.join(model_dir, "config.json")) as f:
        columns = {os.path.basename(os.path.abspath(model_dir)): json.load(f),
                   "Llama-3-8B": LLAMA3_8B, "Qwen2.5-1.5B": QWEN25_1_5B}
    print(table(columns))
    c = count_params(LLAMA3_8B)
    print(f"\nattn is q, k, v and o here. The paper's 0.16M for attention equals SVF on q and v only\n"
          f"({c['attn q,v'] / 1e6:.2f}M), but then mlp + q,v is {(c['mlp'] + c['attn q,v']) / 1e6:.2f}M, "
          f"not its 0.58M (marked ?).")


if __name__ == "__main__":
    main()
