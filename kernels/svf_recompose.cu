// Fused SVF recomposition, Transformer-Squared section 3.1: W' = U diag(s) Vh.
//
// svf.py builds this file and its binding, svf_recompose.cpp, on first use with
// torch.utils.cpp_extension.load and calls them through its autograd Function `Recompose`
// (impl="cuda"); the pure-PyTorch reference beside it computes the same thing, and
// tests/test_svf.py checks the two against each other.
//
//   forward   W[i,j]    = sum_k U[i,k] * s[k] * Vh[k,j]            U (m, r), s (r,), Vh (r, n)
//   backward  grad_s[k] = sum_i U[i,k] * (sum_j G[i,j] * Vh[k,j])  G = dL/dW (m, n)
//                       = diag(U^T G Vh^T)[k]
//
// Both are one tiled shared-memory matrix product with something extra fused in:
//   forward:  s[k] is multiplied into the tile of U while it is loaded into shared memory, so the
//             scaled matrix U diag(s) never exists in global memory;
//   backward: the (m, r) product T = G Vh^T is never stored either: each block multiplies its tile
//             of T by the matching tile of U and sums over its rows, writing r partial sums per
//             block row; the host adds those (a deterministic sum, unlike atomicAdd).
// Inputs are float32 or bfloat16; products are accumulated in float32. Edges of any shape are
// handled by loading zeros outside the matrix and by not storing outside the output.
//
// This file holds the kernels and their launchers only, with no torch header beyond c10's
// BFloat16, so that nvcc compiles it in seconds; svf_recompose.cpp checks the tensors, picks the
// dtype and binds the two functions for Python.

// The same file also compiles with g++ and ROCm's HIP-CPU runtime, which runs each GPU thread as a
// fiber on the CPU (tests/test_kernel_hipcpu.py defines SVF_HIP_CPU and checks the kernels against
// float64 without a GPU). The only differences are here: the runtime header, the stream type, and
// the launch, whose <<<grid, block, shared bytes, stream>>> syntax is nvcc's alone.
#if defined(SVF_HIP_CPU)
#include <hip/hip_runtime.h>
using cudaStream_t = hipStream_t;
#define LAUNCH(kernel, grid, block, shmem, stream, ...) \
  hipLaunchKernelGGL(kernel, grid, block, shmem, stream, __VA_ARGS__)
#else
#include <cuda_runtime.h>
#define LAUNCH(kernel, grid, block, shmem, stream, ...) kernel<<<grid, block, shmem, stream>>>(__VA_ARGS__)
#endif
#include <c10/util/BFloat16.h>

namespace {

constexpr int BM = 64;                              // rows of the output tile of one block
constexpr int BN = 64;                              // columns of the output tile of one block
constexpr int BK = 16;                              // depth of one shared-memory slice
constexpr int TM = 4;                               // each thread computes TM x TN outputs
constexpr int TN = 4;
constexpr int THREADS = (BM / TM) * (BN / TN);      // 256 threads in a 16 x 16 grid
// Shared tiles are stored depth-major (tile[k][row]) so that the inner loop reads TM consecutive
// rows; the +1 column of padding keeps the transposing stores free of bank conflicts.
constexpr int PAD = 1;

template <typename scalar_t>
__device__ __forceinline__ float load(const scalar_t* p, int64_t i) { return static_cast<float>(p[i]); }

// One BK-deep step of the register-tiled product: acc[u][v] += A[k][row u] * B[k][col v].
__device__ __forceinline__ void tile_product(const float (&As)[BK][BM + PAD], const float (&Bs)[BK][BN + PAD],
                                             int ty, int tx, float (&acc)[TM][TN]) {
#pragma unroll
  for (int k = 0; k < BK; ++k) {
    float a[TM], b[TN];
#pragma unroll
    for (int u = 0; u < TM; ++u) a[u] = As[k][ty * TM + u];
#pragma unroll
    for (int v = 0; v < TN; ++v) b[v] = Bs[k][tx * TN + v];
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
      for (int v = 0; v < TN; ++v) acc[u][v] += a[u] * b[v];
  }
}

// W (m, n) = U (m, r) diag(s) Vh (r, n). Block (bx, by) computes W[by*BM : +BM, bx*BN : +BN].
template <typename scalar_t>
__global__ void recompose_kernel(const scalar_t* __restrict__ U, const scalar_t* __restrict__ s,
                                 const scalar_t* __restrict__ Vh, scalar_t* __restrict__ W,
                                 int m, int n, int r) {
  __shared__ float As[BK][BM + PAD];  // As[k][i] = U[row0 + i, k0 + k] * s[k0 + k]
  __shared__ float Bs[BK][BN + PAD];  // Bs[k][j] = Vh[k0 + k, col0 + j]
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  const int ty = threadIdx.x / (BN / TN), tx = threadIdx.x % (BN / TN);
  float acc[TM][TN] = {};

  for (int k0 = 0; k0 < r; k0 += BK) {
    // Neighbouring threads read neighbouring addresses: along k in U's rows, along j in Vh's rows.
    for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
      const int i = e / BK, k = e % BK, gi = row0 + i, gk = k0 + k;
      As[k][i] = (gi < m && gk < r) ? load(U, (int64_t)gi * r + gk) * load(s, gk) : 0.f;
    }
    for (int e = threadIdx.x; e < BK * BN; e += THREADS) {
      const int k = e / BN, j = e % BN, gk = k0 + k, gj = col0 + j;
      Bs[k][j] = (gk < r && gj < n) ? load(Vh, (int64_t)gk * n + gj) : 0.f;
    }
    __syncthreads();
    tile_product(As, Bs, ty, tx, acc);
    __syncthreads();  // the next iteration overwrites the tiles
  }

#pragma unroll
  for (int u = 0; u < TM; ++u) {
    const int gi = row0 + ty * TM + u;
#pragma unroll
    for (int v = 0; v < TN; ++v) {
      const int gj = col0 + tx * TN + v;
      if (gi < m && gj < n) W[(int64_t)gi * n + gj] = static_cast<scalar_t>(acc[u][v]);
    }
  }
}

// partial[by, k] = sum over the rows i of block row `by` of U[i,k] * (G Vh^T)[i,k].
// Block (bx, by) computes the tile T = (G Vh^T)[by*BM : +BM, bx*BN : +BN] in registers.
template <typename scalar_t>
__global__ void grad_s_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ U,
                              const scalar_t* __restrict__ Vh, float* __restrict__ partial,
                              int m, int n, int r) {
  __shared__ float As[BK][BM + PAD];           // As[j][i] = G[row0 + i, j0 + j]
  __shared__ float Bs[BK][BN + PAD];           // Bs[j][k] = Vh[kcol0 + k, j0 + j]
  __shared__ float colsum[BM / TM][BN];        // per thread row: sums over its TM rows
  const int row0 = blockIdx.y * BM, kcol0 = blockIdx.x * BN;
  const int ty = threadIdx.x / (BN / TN), tx = threadIdx.x % (BN / TN);
  float acc[TM][TN] = {};

  for (int j0 = 0; j0 < n; j0 += BK) {
    // G and Vh are both row-major along j, so neighbouring threads take neighbouring j.
    for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
      const int i = e / BK, j = e % BK, gi = row0 + i, gj = j0 + j;
      As[j][i] = (gi < m && gj < n) ? load(G, (int64_t)gi * n + gj) : 0.f;
    }
    for (int e = threadIdx.x; e < BN * BK; e += THREADS) {
      const int k = e / BK, j = e % BK, gk = kcol0 + k, gj = j0 + j;
      Bs[j][k] = (gk < r && gj < n) ? load(Vh, (int64_t)gk * n + gj) : 0.f;
    }
    __syncthreads();
    tile_product(As, Bs, ty, tx, acc);
    __syncthreads();
  }

  // Epilogue: multiply the tile of T by the tile of U and sum over rows, first within a thread...
#pragma unroll
  for (int v = 0; v < TN; ++v) {
    const int gk = kcol0 + tx * TN + v;
    float sum = 0.f;
#pragma unroll
    for (int u = 0; u < TM; ++u) {
      const int gi = row0 + ty * TM + u;
      if (gi < m && gk < r) sum += acc[u][v] * load(U, (int64_t)gi * r + gk);
    }
    colsum[ty][tx * TN + v] = sum;
  }
  __syncthreads();
  // ...then across the BM / TM thread rows: one thread per column of the tile.
  if (threadIdx.x < BN && kcol0 + threadIdx.x < r) {
    float sum = 0.f;
    for (int y = 0; y < BM / TM; ++y) sum += colsum[y][threadIdx.x];
    partial[(int64_t)blockIdx.y * r + kcol0 + threadIdx.x] = sum;
  }
}

}  // namespace

// W (m, n) = U (m, r) diag(s) Vh (r, n); all pointers on the device, row-major, contiguous.
template <typename scalar_t>
void launch_recompose(const scalar_t* U, const scalar_t* s, const scalar_t* Vh, scalar_t* W,
                      int m, int n, int r, cudaStream_t stream) {
  if (m == 0 || n == 0) return;  // a grid may not have a zero dimension
  const dim3 grid((n + BN - 1) / BN, (m + BM - 1) / BM);
  LAUNCH(recompose_kernel<scalar_t>, grid, THREADS, 0, stream, U, s, Vh, W, m, n, r);
}

// partial (grad_s_partial_rows(m), r) float32: one row of partial sums of grad_s per block row.
int grad_s_partial_rows(int m) { return (m + BM - 1) / BM; }

template <typename scalar_t>
void launch_grad_s(const scalar_t* G, const scalar_t* U, const scalar_t* Vh, float* partial,
                   int m, int n, int r, cudaStream_t stream) {
  if (m == 0 || r == 0) return;
  const dim3 grid((r + BN - 1) / BN, (m + BM - 1) / BM);
  LAUNCH(grad_s_kernel<scalar_t>, grid, THREADS, 0, stream, G, U, Vh, partial, m, n, r);
}

template void launch_recompose<float>(const float*, const float*, const float*, float*, int, int, int, cudaStream_t);
template void launch_recompose<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*,
                                              c10::BFloat16*, int, int, int, cudaStream_t);
template void launch_grad_s<float>(const float*, const float*, const float*, float*, int, int, int, cudaStream_t);
template void launch_grad_s<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*,
                                           float*, int, int, int, cudaStream_t);
