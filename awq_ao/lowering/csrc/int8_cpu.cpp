// awq_ao's CPU kernel for 8-bit row-wise weights (the quantized output head), AVX2 + FMA.
//
// int8_gemm(x, codes, scale, ag)      y = x @ W.T with W[n, k] = codes[n, k] * scale[n]
//     x [M, K] float32, codes [N, K] int8 (row-major, symmetric, -127..127), scale [N] float32.
//     Activations are quantized per (row, group of ag columns) to int16 with a symmetric scale
//     (as in int4_cpu.cpp: error <= 2^-16 of the group's largest |x|), so the inner loop is an
//     exact integer dot product (vpmaddwd) of the sign-extended codes with the int16
//     activations; per group y += xs * sum(codes * xq) in float32, times scale[n] at the end.
//     Up to four activation rows share one read of a weight row. Rows of W are split over
//     torch's intra-op threads (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "act_quant.h"

#include <cstdint>

namespace {

using awq_ao_cpu::hsum8_ps;
using awq_ao_cpu::quantize_activations;

// out[t] = sum over groups of xs[t, g] * sum_k(w[k] * xq[t, k]) for MT activation rows
template <int MT>
inline void row_dot(const int8_t* w, const int16_t* xq, const float* xs, int64_t K, int64_t ag,
                    float out[MT]) {
  const int64_t G = K / ag;
  __m256 f[MT];
  for (int t = 0; t < MT; ++t) f[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i a[MT];
    for (int t = 0; t < MT; ++t) a[t] = _mm256_setzero_si256();
    for (int64_t k = g * ag; k < (g + 1) * ag; k += 32) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16)));
      for (int t = 0; t < MT; ++t) {
        const int16_t* xr = xq + t * K + k;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16));
        a[t] = _mm256_add_epi32(a[t], _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1)));
      }
    }
    for (int t = 0; t < MT; ++t) f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[t]), _mm256_set1_ps(xs[t * G + g]), f[t]);
  }
  for (int t = 0; t < MT; ++t) out[t] = hsum8_ps(f[t]);
}

template <int MT>
inline void rows_tile(const int8_t* codes, const float* scale, const int16_t* xq, const float* xs,
                      int64_t K, int64_t ag, int64_t N, int64_t m, int64_t n0, int64_t n1, float* y) {
  const int64_t G = K / ag;
  for (int64_t n = n0; n < n1; ++n) {
    float out[MT];
    row_dot<MT>(codes + n * K, xq + m * K, xs + m * G, K, ag, out);
    for (int t = 0; t < MT; ++t) y[(m + t) * N + n] = out[t] * scale[n];
  }
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t ag) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(),
              "awq_ao int8_gemm: codes must be contiguous int8 [N, K]");
  const int64_t N = codes.size(0);
  const int64_t K = codes.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == N && scale.is_contiguous(),
              "awq_ao int8_gemm: scale must be contiguous float32 [N]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() && x.size(1) == K,
              "awq_ao int8_gemm: x must be contiguous float32 [M, K] with K = ", K);
  // ag <= 256 keeps every int32 group sum far from overflow (127 * 32767 * 256 < 2^31)
  TORCH_CHECK(ag % 32 == 0 && ag > 0 && ag <= 256 && K % ag == 0,
              "awq_ao int8_gemm: the activation group must be 32, 64, ..., 256 and divide K = ", K, ", got ", ag);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t G = K / ag;
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor xs = at::empty({M, G}, x.options());
  at::Tensor xsum = at::empty({M, G}, x.options().dtype(at::kInt));
  quantize_activations(x.data_ptr<float>(), M, K, ag, xq.data_ptr<int16_t>(), xs.data_ptr<float>(),
                       xsum.data_ptr<int32_t>());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const int16_t* xqp = xq.data_ptr<int16_t>();
  const float* xsp = xs.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows_tile<4>(cp, sp, xqp, xsp, K, ag, N, m, n0, n1, yp);
    switch (M - m) {
      case 3: rows_tile<3>(cp, sp, xqp, xsp, K, ag, N, m, n0, n1, yp); break;
      case 2: rows_tile<2>(cp, sp, xqp, xsp, K, ag, N, m, n0, n1, yp); break;
      case 1: rows_tile<1>(cp, sp, xqp, xsp, K, ag, N, m, n0, n1, yp); break;
      default: break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(awq_ao_cpu, m) {
  m.def("int8_gemm(Tensor x, Tensor codes, Tensor scale, int ag) -> Tensor");
}

TORCH_LIBRARY_IMPL(awq_ao_cpu, CPU, m) {
  m.impl("int8_gemm", &int8_gemm);
}
