"""How far a hand-written bfloat16 matrix-vector product takes batch-1 decoding in bfloat16.

    python -m benchmarks.bf16_gemv [--runs 3]

In float32, batch-1 decoding runs near its bandwidth limit; in bfloat16 it runs at about 40% of it
(RESULTS.md, "Speed"). Two things could be the cause: torch.mv's bfloat16 kernel, which reads the
weights slower than float32 products read the same bytes, and the ~1,300 small operations around
the products, which cost more in bfloat16 (casts around RMSNorm and softmax). This script separates
the two. It builds a 30-line AVX-512-BF16 kernel (one `vdpbf16ps` per 32 weights, four rows at a
time, float32 accumulation; torch.utils.cpp_extension, about a minute), checks it against torch.mv,
and then measures, in tokens per CPU second (medians of --runs; one thread):

- the products of one token alone: the model's 211 matrices, each once, in order (cold caches, as in
  decoding), with torch.mv and with the kernel;
- batch-1 decoding of 32 tokens with model.matvec as it is and with the kernel in its place;
- the limit: as many bytes as the bfloat16 weights, read by a float32 torch.mv.

It is a measurement, not a fast path of model.py: it needs a CPU with avx512_bf16 and says so
otherwise.
"""

import argparse
import statistics
import time

import torch

import model as M
from benchmarks.bench_model import cpu_name, decode_rate, seconds
from generate import generate

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y (out,) = W (out, in) @ x (in,): bfloat16 in and out, float32 sums. vdpbf16ps multiplies 32 pairs
// of bfloat16 and adds them into 16 float32 lanes; four rows share each load of x.
torch::Tensor gemv_bf16(torch::Tensor W, torch::Tensor x) {
  TORCH_CHECK(W.dtype() == torch::kBFloat16 && x.dtype() == torch::kBFloat16, "bfloat16 only");
  TORCH_CHECK(W.dim() == 2 && x.dim() == 1 && W.size(1) == x.size(0) && W.size(1) % 32 == 0,
              "W (out, in) and x (in,) with in a multiple of 32");
  W = W.contiguous(); x = x.contiguous();
  const int64_t out = W.size(0), in = W.size(1);
  auto y = torch::empty({out}, W.options());
  const auto* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const auto* xv = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* yv = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, out / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = 4 * begin; o < 4 * end; o += 4) {
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t i = 0; i < in; i += 32) {
        __m512bh xb = (__m512bh)_mm512_loadu_si512(xv + i);
        for (int r = 0; r < 4; ++r)
          a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(w + (o + r) * in + i), xb);
      }
      for (int r = 0; r < 4; ++r) yv[o + r] = _mm512_reduce_add_ps(a[r]);
    }
  });
  for (int64_t o = out / 4 * 4; o < out; ++o)  // the last out % 4 rows
    yv[o] = torch::dot(W[o].to(torch::kFloat), x.to(torch::kFloat)).item<float>();
  return y;
}
"""


def build():
    """Compiles SOURCE (torch.utils.cpp_extension, cached under ~/.cache/torch_extensions)."""
    from torch.utils.cpp_extension import load_inline
    return load_inline("t2_gemv_bf16", SOURCE, functions=["gemv_bf16"],
                       extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    cpu = cpu_name()
    print(f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "avx512_bf16" not in cpu:
        raise SystemExit("this CPU has no avx512_bf16: nothing to measure")
    t0 = time.perf_counter()
    gemv = build().gemv_bf16
    print(f"built the kernel in {time.perf_counter() - t0:.0f} s")

    model, _ = M.load_model(dtype=torch.bfloat16)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {n: torch.randn(n, dtype=torch.bfloat16) for n in {W.shape[1] for W in weights}}
    for W in weights[:3] + weights[-1:]:  # the same sums as torch.mv, to bfloat16's rounding of y
        x, exact = xs[W.shape[1]], W.float() @ xs[W.shape[1]].float()
        ours, theirs = (gemv(W, x).float() - exact).abs().max(), (torch.mv(W, x).float() - exact).abs().max()
        assert ours <= 1.01 * theirs + 1e-3, (ours, theirs)
    n_bytes = sum(W.numel() for W in weights) * 2

    def matvec_gemv(linear, x):
        if x.shape[0] != 1:
            return plain_matvec(linear, x)
        y = gemv(linear.weight, x[0])[None]
        return y if linear.bias is None else y + linear.bias

    plain_matvec = M.matvec
    prompt = torch.randint(100, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    buffer = torch.ones(n_bytes // 4096 * 1024)
    matrix, ones = buffer.view(-1, 1024), torch.ones(1024)
    rows = {}
    for _ in range(args.runs):
        for name, product, matvec in (("torch.mv", torch.mv, plain_matvec), ("kernel", gemv, matvec_gemv)):
            rate = 1 / seconds(lambda: [product(W, xs[W.shape[1]]) for W in weights])
            rows.setdefault(f"products of one token, {name}", []).append(rate)
            M.matvec = matvec
            with torch.inference_mode():
                rate, _ = decode_rate(lambda n: generate(model, [prompt], n), 1)
            M.matvec = plain_matvec
            rows.setdefault(f"decode, batch 1, {name}", []).append(rate)
        rows.setdefault("limit: the weights' bytes at float32 torch.mv's bandwidth", []).append(
            1 / seconds(lambda: torch.mv(matrix, ones)))
    limit = statistics.median(rows["limit: the weights' bytes at float32 torch.mv's bandwidth"])
    print(f"{len(weights)} matrices, {n_bytes / 1e6:.0f} MB in bfloat16; tokens per CPU second, medians of {args.runs}")
    for row, values in rows.items():
        v = statistics.median(values)
        print(f"  {row}: {v:.1f} ({1e3 / v:.1f} ms a token, {n_bytes * v / 1e9:.1f} GB/s, {v / limit:.0%} of the limit)")


if __name__ == "__main__":
    main()
