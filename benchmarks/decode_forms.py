"""Two forms of model.decode that we tried and did not keep: do they make batched decoding faster?

    python -m benchmarks.decode_forms [--runs 3] [--batches 1 16 64] [--dtypes float32 bfloat16]

- `fused`: gpt-fast's layout, one matrix product for q|k|v and one for gate|up, from weights
  concatenated once and kept until a part changes (an expert swapped in). It costs a copy of 60% of
  the weights.
- `W @ x.T`: the product in the transposed form for float32 too, which model.matvec uses for
  bfloat16 only. Single products of the model's shapes ran faster this way in a microbenchmark.

Each variant takes turns with today's decode within each run, on the same 16-token prompt and
32 new tokens, greedy; the script prints tokens per CPU second (medians), the ratio to today's, and
whether the tokens are the same. The variants patch model.py's functions in this process only.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

import model as M
from benchmarks.bench_model import cpu_name, decode_rate
from generate import generate


def fused_linear(module, names):
    """The linears `names` of `module` as one, weights stacked (sum of outputs, in), for model.matvec;
    rebuilt when one of them changes: svf.swap_weights replaces a parameter's tensor, an in-place
    edit bumps its version."""
    parts = [getattr(module, n).weight for n in names]
    key = [(p.data_ptr(), p._version) for p in parts]
    cached = module.__dict__.get("_fused")
    if cached is None or cached[0] != key:
        W = torch.cat([p.data for p in parts])
        linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
        linear.weight = torch.nn.Parameter(W, requires_grad=False)
        cached = module.__dict__["_fused"] = (key, linear)
    return cached[1]


def fused_attention_decode(self, x, cos, sin, mask, cache, layer):
    B, q_dim, kv_dim = x.shape[0], self.nh * self.hd, self.nkv * self.hd
    q, k, v = M.matvec(fused_linear(self, ("q_proj", "k_proj", "v_proj")), x).split([q_dim, kv_dim, kv_dim], -1)
    q = M.apply_rope(q.reshape(B, self.nh, self.hd), cos, sin)  # (B, nh, hd)
    k = M.apply_rope(k.reshape(B, self.nkv, self.hd), cos, sin)  # (B, nkv, hd)
    k, v = cache.update(layer, k[:, :, None], v.reshape(B, self.nkv, self.hd)[:, :, None])
    y = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
    return M.matvec(self.o_proj, y.view(B, q_dim))


def fused_mlp_decode(self, x):
    gate, up = M.matvec(fused_linear(self, ("gate_proj", "up_proj")), x).chunk(2, -1)
    return M.matvec(self.down_proj, F.silu(gate) * up)


def transposed_matvec(linear, x):
    W = linear.weight
    y = torch.mv(W, x[0])[None] if x.shape[0] == 1 else (W @ x.T).T.contiguous()
    return y if linear.bias is None else y + linear.bias


TODAY = dict(attention=M.Attention.decode, mlp=M.MLP.decode, matvec=M.matvec)
VARIANTS = {
    "today": TODAY,
    "fused": dict(TODAY, attention=fused_attention_decode, mlp=fused_mlp_decode),
    "W @ x.T": dict(TODAY, matvec=transposed_matvec),
}


def use(variant):
    M.Attention.decode, M.MLP.decode, M.matvec = variant["attention"], variant["mlp"], variant["matvec"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = p.parse_args()
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; tokens per CPU second")
    for dtype in args.dtypes:
        model, _ = M.load_model(dtype=getattr(torch, dtype))
        prompt = torch.randint(100, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        for batch in args.batches:
            rates, tokens = {name: [] for name in VARIANTS}, {}
            for _ in range(args.runs):
                for name, variant in VARIANTS.items():
                    use(variant)
                    with torch.inference_mode():
                        rate, tokens[name] = decode_rate(lambda n: generate(model, [prompt] * batch, n), batch)
                    rates[name].append(rate)
            use(TODAY)
            base = statistics.median(rates["today"])
            cells = [f"{name} {statistics.median(r):.1f} ({statistics.median(r) / base:.2f}x"
                     f"{', same tokens' if tokens[name] == tokens['today'] else ', OTHER TOKENS'})"
                     for name, r in rates.items()]
            print(f"{dtype}, batch {batch}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
