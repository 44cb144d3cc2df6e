"""Memory per GPU of SVF training with REINFORCE, on paper: which models fit data parallel, which need FSDP.

    python -m benchmarks.memory_plan                       # the table of docs/several-gpus.md ("Scaling on paper")
    python -m benchmarks.memory_plan --tokens 2048 --gen-batch 16 --micro-batch 4

The official batch: 256 rollouts a step, one sample per prompt, greedy, weights and factors in
bfloat16 (p, Adam and the loss in float32: megabytes). Data parallel keeps a whole copy of everything
on every rank, so the memory of a rank does not depend on the number of ranks, only on how many
rollouts it generates at once (--gen-batch, at most 256 / ranks) and how many sequences its backward
holds at once (--micro-batch). What a rank holds:

- weights: every parameter of the checkpoint.
- SVF factors of the MLP (the official targets): for each W (m, n), r = min(m, n): U (m, r), Vh (r, n)
  in the weights' dtype and sigma (r,) in float32, svf.factor_bytes. For SwiGLU's gate and up (I, H)
  and down (H, I), r = H, so the factors are (1 + H / I) times the weights they replace.
- W' and W'.grad: the recomposed MLP matrices that replace W during the step (svf.swap_weights keeps
  W to restore), and their gradient, which objectives.backward_through_weights accumulates over the
  micro-batches before one backward through the recomposition to p.
- KV cache of the rollouts being generated: 2 (K and V) x kv heads x head_dim values per token and
  layer (generate.py preallocates prompt + answer for each row).
- activations of the backward, per token and layer, as autograd saves them in model.py with W' of the
  MLP requiring grad and attention frozen: both RMSNorm inputs and their 1/rms (float32: RMSNorm
  upcasts), the MLP input, q and the attention output, k and v, the attention's logsumexp (float32,
  one per head), SwiGLU's gate, up, silu(gate) and their product (4 I), and in a padded micro-batch
  the attention mask's row (S values, S its length). With activation
  checkpointing (Transformer.forward(checkpoint=True)) a layer keeps its input only (H values) and
  one layer's activations are recomputed at a time.
"""

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass
class Dims:
    name: str
    vocab: int
    H: int          # hidden_size
    I: int          # intermediate_size
    layers: int
    heads: int
    kv_heads: int
    tied: bool      # tie_word_embeddings

    @property
    def head_dim(self):
        return self.H // self.heads

    def params(self):
        """Every parameter of the checkpoint: embeddings (and head), per layer q, k, v, o, the MLP, two norms."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = self.H * q + 2 * self.H * kv + q * self.H + 3 * self.H * self.I + 2 * self.H
        return self.vocab * self.H * (1 if self.tied else 2) + self.layers * layer + self.H

    def mlp_shapes(self):
        """(m, n) of every MLP matrix: gate and up (I, H), down (H, I), per layer."""
        return [(self.I, self.H), (self.I, self.H), (self.H, self.I)] * self.layers


# The Hugging Face config.json values of each checkpoint
MODELS = {
    "SmolLM2-135M": Dims("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, True),
    "Llama-3-8B": Dims("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, False),
    "Llama-3-70B": Dims("Llama-3-70B", 128256, 8192, 28672, 80, 64, 8, False),
}


def factor_bytes(d, size):
    """U (m, r) and Vh (r, n) in `size`-byte values, sigma (r,) in float32, r = min(m, n): svf.factor_bytes."""
    return sum(min(m, n) * ((m + n) * size + 4) for m, n in d.mlp_shapes())


def mlp_bytes(d, size):
    return sum(m * n for m, n in d.mlp_shapes()) * size


def kv_bytes_per_token(d, size):
    return 2 * d.kv_heads * d.head_dim * size * d.layers


def activation_bytes_per_token_layer(d, size, seq=0):
    """What autograd saves per token in one decoder layer (module docstring), values of `size` bytes;
    seq: the length of a padded micro-batch, whose attention mask (B, 1, T, S) each layer keeps too."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    fp32 = 2 * d.H * 4 + 2 * 4 + d.heads * 4      # RMSNorm inputs upcast, their 1/rms, attention logsumexp
    return fp32 + (d.H + 2 * q + 2 * kv + 4 * d.I + seq) * size  # MLP input, q and attention output, k, v, SwiGLU


def checkpointed_bytes_per_token(d, size):
    """With activation checkpointing: each layer's input is held."""
    return d.layers * d.H * size


def plan(d, size=2, tokens=1024, gen_batch=32, micro_batch=8, checkpoint=True):
    """Bytes a data-parallel rank holds: {part: bytes}, and the two phases' peaks."""
    layer = activation_bytes_per_token_layer(d, size, tokens)
    act_token = checkpointed_bytes_per_token(d, size) if checkpoint else d.layers * layer
    recompute = layer if checkpoint else 0  # one layer's activations at a time
    parts = dict(weights=d.params() * size, factors=factor_bytes(d, size), w_prime=mlp_bytes(d, size),
                 w_prime_grad=mlp_bytes(d, size), kv=gen_batch * tokens * kv_bytes_per_token(d, size),
                 activations=micro_batch * tokens * (act_token + recompute))
    fixed = parts["weights"] + parts["factors"] + parts["w_prime"]
    parts["rollout_peak"] = fixed + parts["kv"]
    parts["backward_peak"] = fixed + parts["w_prime_grad"] + parts["activations"]
    parts["peak"] = max(parts["rollout_peak"], parts["backward_peak"])
    return parts


def fsdp_plan(d, ranks, size=2, tokens=1024, gen_batch=32, micro_batch=8):
    """Bytes per GPU with FSDP2 (torch.distributed.fsdp.fully_shard on each decoder layer, then the
    model), the SVF factors registered on the layer whose MLP they replace, so sharded and gathered
    with it; the base MLP weights are not loaded (W' replaces them), and W' is formed per layer from
    the gathered factors, and freed with them. Checkpointed activations."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    attention = (2 * d.H * q + 2 * d.H * kv) * size  # one layer's q, k, v, o
    factors, w_prime = factor_bytes(d, size) / d.layers, mlp_bytes(d, size) / d.layers  # one layer's
    sharded = ((d.params() * size - mlp_bytes(d, size)) + factor_bytes(d, size)) / ranks
    gathered = 2 * (attention + factors) + 2 * w_prime + d.vocab * d.H * size  # this layer + the next
    # (prefetched), W' and its grad, the embeddings or head
    kv_cache = gen_batch * tokens * kv_bytes_per_token(d, size)
    activations = micro_batch * tokens * (checkpointed_bytes_per_token(d, size) +
                                          activation_bytes_per_token_layer(d, size, tokens))
    return dict(sharded=sharded, gathered=gathered, kv=kv_cache, activations=activations,
                peak=sharded + gathered + max(kv_cache, activations))


def table(size=2, tokens=1024, gen_batch=32, micro_batch=8, gpu_gb=80):
    """Markdown: data parallel, every rank a whole copy; then FSDP2 for the models that do not fit."""
    rows = ["| model | weights | SVF factors (x the MLP's W) | W' + W'.grad | KV cache per token | "
            "activations per token, all layers (checkpointed) | peak per rank: rollouts / backward "
            f"(without checkpointing) | one {gpu_gb:.0f} GB GPU per rank |", "|" + "---|" * 8]
    too_big = []
    for d in MODELS.values():
        a, b = plan(d, size, tokens, gen_batch, micro_batch, False), plan(d, size, tokens, gen_batch, micro_batch, True)
        layer = activation_bytes_per_token_layer(d, size, tokens)
        fits = b["peak"] <= gpu_gb * GB
        too_big += [] if fits else [d]
        rows.append(
            f"| {d.name} | {a['weights'] / GB:.1f} GB | {a['factors'] / GB:.1f} GB "
            f"({a['factors'] / mlp_bytes(d, size):.2f}x) | {(a['w_prime'] + a['w_prime_grad']) / GB:.1f} GB | "
            f"{kv_bytes_per_token(d, size) / 1e3:.0f} KB | {d.layers * layer / 1e6:.2f} MB "
            f"({(checkpointed_bytes_per_token(d, size) + layer) / 1e6:.2f} MB) | "
            f"{b['rollout_peak'] / GB:.0f} / {b['backward_peak'] / GB:.0f} GB ({a['backward_peak'] / GB:.0f} GB) | "
            f"{'fits: data parallel' if fits else 'no: shard with FSDP2'} |")
    for d in too_big:
        rows += ["", f"| {d.name}, FSDP2 | factors + weights other than the MLP's, sharded | gathered: two layers, "
                 "W' and W'.grad of one, the embeddings | KV cache | activations (checkpointed) | peak per GPU |",
                 "|" + "---|" * 6]
        for ranks in (8, 16):
            f = fsdp_plan(d, ranks, size, tokens, min(gen_batch, 256 // ranks), micro_batch)
            rows.append(f"| {ranks} GPUs | {f['sharded'] / GB:.1f} GB | {f['gathered'] / GB:.1f} GB | "
                        f"{f['kv'] / GB:.1f} GB | {f['activations'] / GB:.1f} GB | {f['peak'] / GB:.0f} GB |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype-bytes", type=int, default=2, help="bytes per weight and activation (2: bfloat16)")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt + answer of a rollout (default: %(default)s)")
    ap.add_argument("--gen-batch", type=int, default=32, help="rollouts a rank generates at once: 256 / 8 ranks")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences a rank's backward holds at once")
    ap.add_argument("--gpu-gb", type=float, default=80)
    args = ap.parse_args(argv)
    print(f"{args.tokens} tokens a rollout, {args.gen_batch} rollouts generated at once, backward micro-batches "
          f"of {args.micro_batch} sequences, {args.dtype_bytes}-byte weights; GB = 1e9 bytes")
    print(table(args.dtype_bytes, args.tokens, args.gen_batch, args.micro_batch, args.gpu_gb))


if __name__ == "__main__":
    main()
