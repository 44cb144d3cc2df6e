// Python binding of the SVF recomposition kernels in svf_recompose.cu: checks what Python passes
// (device, dtype, shapes, layout), allocates the outputs and launches on the current stream.

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

template <typename scalar_t>
void launch_recompose(const scalar_t* U, const scalar_t* s, const scalar_t* Vh, scalar_t* W,
                      int m, int n, int r, cudaStream_t stream);
template <typename scalar_t>
void launch_grad_s(const scalar_t* G, const scalar_t* U, const scalar_t* Vh, float* partial,
                   int m, int n, int r, cudaStream_t stream);
int grad_s_partial_rows(int m);

// U (m, r) and Vh (r, n): the frozen factors, shared by the forward and the backward.
static void check_factors(const torch::Tensor& U, const torch::Tensor& Vh) {
  TORCH_CHECK(U.is_cuda() && Vh.is_cuda() && U.device() == Vh.device(),
              "svf_recompose: expected U and Vh on one CUDA device, found ", U.device(), " and ", Vh.device());
  TORCH_CHECK(U.scalar_type() == torch::kFloat32 || U.scalar_type() == torch::kBFloat16,
              "svf_recompose: expected float32 or bfloat16, found ", U.scalar_type());
  TORCH_CHECK(Vh.scalar_type() == U.scalar_type(), "svf_recompose: U and Vh must share a dtype, found ",
              U.scalar_type(), " and ", Vh.scalar_type());
  TORCH_CHECK(U.dim() == 2 && Vh.dim() == 2 && U.size(1) == Vh.size(0),
              "svf_recompose: expected U (m, r) and Vh (r, n), found U ", U.sizes(), " and Vh ", Vh.sizes());
  TORCH_CHECK(U.is_contiguous() && Vh.is_contiguous(), "svf_recompose: expected contiguous U and Vh");
}

// A second operand (s or the gradient G) must match the factors in device, dtype, shape and layout.
static void check_operand(const char* name, const torch::Tensor& t, const torch::Tensor& U,
                          at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == U.device() && t.scalar_type() == U.scalar_type() && t.is_contiguous(),
              "svf_recompose: ", name, " must be a contiguous ", U.scalar_type(), " tensor on ", U.device(),
              ", found ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == shape, "svf_recompose: expected ", name, " of shape ", shape, ", found ", t.sizes());
}

torch::Tensor recompose(torch::Tensor U, torch::Tensor s, torch::Tensor Vh) {
  check_factors(U, Vh);
  check_operand("s", s, U, {U.size(1)});
  const c10::cuda::CUDAGuard guard(U.device());
  const int m = U.size(0), r = U.size(1), n = Vh.size(1);
  auto W = torch::empty({m, n}, U.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (U.scalar_type() == torch::kFloat32) {
    launch_recompose<float>(U.data_ptr<float>(), s.data_ptr<float>(), Vh.data_ptr<float>(),
                            W.data_ptr<float>(), m, n, r, stream);
  } else {
    using bf16 = c10::BFloat16;
    launch_recompose<bf16>(U.data_ptr<bf16>(), s.data_ptr<bf16>(), Vh.data_ptr<bf16>(),
                           W.data_ptr<bf16>(), m, n, r, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return W;
}

// Returns grad_s in float32; the caller casts it to the dtype of s.
torch::Tensor grad_s(torch::Tensor G, torch::Tensor U, torch::Tensor Vh) {
  check_factors(U, Vh);
  check_operand("the gradient G", G, U, {U.size(0), Vh.size(1)});
  const c10::cuda::CUDAGuard guard(U.device());
  const int m = U.size(0), r = U.size(1), n = Vh.size(1);
  auto partial = torch::zeros({grad_s_partial_rows(m), r}, U.options().dtype(torch::kFloat32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (U.scalar_type() == torch::kFloat32) {
    launch_grad_s<float>(G.data_ptr<float>(), U.data_ptr<float>(), Vh.data_ptr<float>(),
                         partial.data_ptr<float>(), m, n, r, stream);
  } else {
    using bf16 = c10::BFloat16;
    launch_grad_s<bf16>(G.data_ptr<bf16>(), U.data_ptr<bf16>(), Vh.data_ptr<bf16>(),
                        partial.data_ptr<float>(), m, n, r, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);  // (r,): a fixed-order sum over block rows, deterministic
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("recompose", &recompose, "W = U diag(s) Vh (fused scaling, tiled, float32 accumulation)");
  m.def("grad_s", &grad_s, "grad_s[k] = sum_ij G[i,j] U[i,k] Vh[k,j], without storing G Vh^T");
}
