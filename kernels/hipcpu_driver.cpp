// Runs the launchers of svf_recompose.cu on the CPU, under ROCm's HIP-CPU runtime, for
// tests/test_kernel_hipcpu.py. One request on stdin, one answer on stdout, all binary:
//
//   request  int32 op (0: launch_recompose, 1: launch_grad_s), int32 dtype (0: float32, 1: bfloat16),
//            int32 m, n, r, then the inputs in the launcher's order, row-major, in that dtype:
//              op 0: U (m*r), s (r), Vh (r*n)        op 1: G (m*n), U (m*r), Vh (r*n)
//   answer   int32 rows, cols, GUARD_BYTES, GUARD_FILL, then GUARD_BYTES bytes of GUARD_FILL, the
//            output (rows*cols), and GUARD_BYTES bytes of GUARD_FILL again:
//              op 0: W (m, n) in dtype               op 1: partial (grad_s_partial_rows(m), r) float32
//
// Outputs start as NaN and sit between guard bytes, so that the test sees an element the kernel
// never wrote (a NaN) and a write out of bounds (a changed guard byte). The host memory is passed
// to the launchers as it is: under HIP-CPU "device" pointers are host pointers.

#include <hip/hip_runtime.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

// The launchers of svf_recompose.cu, declared as svf_recompose.cpp declares them
// (cudaStream_t is hipStream_t there when it is compiled for HIP-CPU).
template <typename scalar_t>
void launch_recompose(const scalar_t* U, const scalar_t* s, const scalar_t* Vh, scalar_t* W,
                      int m, int n, int r, hipStream_t stream);
template <typename scalar_t>
void launch_grad_s(const scalar_t* G, const scalar_t* U, const scalar_t* Vh, float* partial,
                   int m, int n, int r, hipStream_t stream);
int grad_s_partial_rows(int m);

constexpr std::size_t GUARD_BYTES = 1 << 16;  // more than one row of W at the sizes tested
constexpr unsigned char GUARD_FILL = 0xA5;

static void fail(const char* what) {
  std::fprintf(stderr, "hipcpu_driver: %s\n", what);
  std::exit(2);
}

template <typename T>
static std::vector<T> read_array(std::size_t count) {
  std::vector<T> v(count);
  if (count && std::fread(v.data(), sizeof(T), count, stdin) != count) fail("stdin ended before the inputs did");
  return v;
}

// count elements of T, NaN-filled, between two guards; data() points at the first element.
template <typename T>
struct Guarded {
  std::vector<unsigned char> bytes;
  std::size_t count;
  explicit Guarded(std::size_t n) : bytes(2 * GUARD_BYTES + n * sizeof(T), GUARD_FILL), count(n) {
    for (std::size_t i = 0; i < n; ++i) data()[i] = T(std::numeric_limits<float>::quiet_NaN());
  }
  T* data() { return reinterpret_cast<T*>(bytes.data() + GUARD_BYTES); }
  void write(std::int32_t rows, std::int32_t cols) const {
    const std::int32_t header[4] = {rows, cols, static_cast<std::int32_t>(GUARD_BYTES), GUARD_FILL};
    std::fwrite(header, sizeof header, 1, stdout);
    std::fwrite(bytes.data(), 1, bytes.size(), stdout);
  }
};

static void check(hipError_t e, const char* where) {
  if (e != hipSuccess) {
    std::fprintf(stderr, "hipcpu_driver: %s: %s\n", where, hipGetErrorString(e));
    std::exit(3);
  }
}

template <typename T>
static void run(int op, int m, int n, int r) {
  const std::size_t M = m, N = n, R = r;
  if (op == 0) {
    auto U = read_array<T>(M * R), s = read_array<T>(R), Vh = read_array<T>(R * N);
    Guarded<T> W(M * N);
    launch_recompose<T>(U.data(), s.data(), Vh.data(), W.data(), m, n, r, nullptr);
    check(hipGetLastError(), "launch_recompose");
    check(hipDeviceSynchronize(), "launch_recompose");
    W.write(m, n);
  } else {
    auto G = read_array<T>(M * N), U = read_array<T>(M * R), Vh = read_array<T>(R * N);
    const std::int32_t rows = grad_s_partial_rows(m);
    Guarded<float> partial(static_cast<std::size_t>(rows) * R);
    launch_grad_s<T>(G.data(), U.data(), Vh.data(), partial.data(), m, n, r, nullptr);
    check(hipGetLastError(), "launch_grad_s");
    check(hipDeviceSynchronize(), "launch_grad_s");
    partial.write(rows, r);
  }
}

int main() {
  std::int32_t h[5];
  if (std::fread(h, sizeof h, 1, stdin) != 1) fail("expected a 20-byte header on stdin: op, dtype, m, n, r");
  const int op = h[0], dtype = h[1], m = h[2], n = h[3], r = h[4];
  if ((op != 0 && op != 1) || (dtype != 0 && dtype != 1) || m < 0 || n < 0 || r < 0)
    fail("bad header: expected op 0 or 1, dtype 0 or 1 and sizes >= 0");
  if (dtype == 0) run<float>(op, m, n, r);
  else run<c10::BFloat16>(op, m, n, r);
  return std::fflush(stdout) == 0 ? 0 : 4;
}
