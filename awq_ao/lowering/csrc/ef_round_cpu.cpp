// awq_ao's CPU kernel for the column sweep of error-feedback (GPTQ-style) rounding, AVX2.
//
// ef_round_block(wt, u, st, zt, out, err, b0, b1, max_int)
//     One block of columns [b0, b1) of awq_ao.passes.rounding.error_feedback_codes_batched,
//     for B weights at once, stored column-major as rows of a tile:
//       wt  [B, K, R] float32  the weights (column c of item b is wt[b, c, :]); the block's
//                              later columns are updated in place
//       u   [B, K, K] float32  upper Cholesky factor of each item's damped inverse Gram
//       st, zt [B, K, R]       each weight's group scale and zero (float32)
//       out [B, K, R] uint8    the codes of columns [b0, b1) are written
//       err [B, b1 - b0, R]    the scaled rounding errors of the block's columns are written
//     For each column c in order: q = clamp(round(w / s) + z, 0, max_int) (round half to
//     even), e = (w - (q - z) * s) / u[c, c], and every later column j of the block gets
//     w_j -= u[c, j] * e. The caller applies the block's errors to the columns after b1 (one
//     matrix product). Every operation is the one the torch loop does, in the same order and
//     float32 rounding (no fused multiply-add: fp-contract is off for this file), so the codes
//     are bit-identical to it. Items and tiles of 64 rows run on torch's intra-op threads.

#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kTile = 64;  // rows per task: a block's 128 columns x 64 rows stay in L2

inline float round_code(float w, float s, float z, float mx) {
  const float q = std::nearbyint(w / s) + z;  // default rounding mode: half to even, like torch.round
  return std::min(std::max(q, 0.0f), mx);
}

void ef_round_block(const at::Tensor& wt, const at::Tensor& u, const at::Tensor& st, const at::Tensor& zt,
                    const at::Tensor& out, const at::Tensor& err, int64_t b0, int64_t b1, double max_int) {
  TORCH_CHECK(wt.dim() == 3 && wt.scalar_type() == at::kFloat && wt.is_contiguous(),
              "awq_ao ef_round_block: wt must be contiguous float32 [B, K, R]");
  const int64_t B = wt.size(0), K = wt.size(1), R = wt.size(2);
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.dim() == 3 && u.size(0) == B &&
                  u.size(1) == K && u.size(2) == K,
              "awq_ao ef_round_block: u must be contiguous float32 [B, K, K]");
  for (const at::Tensor* t : {&st, &zt}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == wt.sizes(),
                "awq_ao ef_round_block: scales and zeros must be contiguous float32 like wt");
  }
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous() && out.sizes() == wt.sizes(),
              "awq_ao ef_round_block: out must be contiguous uint8 like wt");
  TORCH_CHECK(0 <= b0 && b0 < b1 && b1 <= K, "awq_ao ef_round_block: bad column block");
  const int64_t blk = b1 - b0;
  TORCH_CHECK(err.scalar_type() == at::kFloat && err.is_contiguous() && err.dim() == 3 && err.size(0) == B &&
                  err.size(1) == blk && err.size(2) == R,
              "awq_ao ef_round_block: err must be contiguous float32 [B, b1 - b0, R]");
  if (B == 0 || R == 0) return;
  float* W = wt.data_ptr<float>();
  const float* U = u.data_ptr<float>();
  const float* S = st.data_ptr<float>();
  const float* Z = zt.data_ptr<float>();
  uint8_t* O = out.data_ptr<uint8_t>();
  float* E = err.data_ptr<float>();
  const float mx = static_cast<float>(max_int);
  const int64_t nt = (R + kTile - 1) / kTile;
  at::parallel_for(0, B * nt, 1, [&](int64_t t0, int64_t t1) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 mxv = _mm256_set1_ps(mx);
    alignas(32) int32_t codes[8];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nt;
      const int64_t r0 = (t % nt) * kTile;
      const int64_t r1 = std::min(R, r0 + kTile);
      float* Wb = W + b * K * R;
      const float* Ub = U + b * K * K;
      const float* Sb = S + b * K * R;
      const float* Zb = Z + b * K * R;
      uint8_t* Ob = O + b * K * R;
      float* Eb = E + b * blk * R;
      for (int64_t c = b0; c < b1; ++c) {
        const float d = Ub[c * K + c];
        const __m256 dv = _mm256_set1_ps(d);
        float* wc = Wb + c * R;
        const float* sc = Sb + c * R;
        const float* zc = Zb + c * R;
        float* ec = Eb + (c - b0) * R;
        uint8_t* oc = Ob + c * R;
        int64_t r = r0;
        for (; r + 8 <= r1; r += 8) {
          const __m256 w = _mm256_loadu_ps(wc + r);
          const __m256 s = _mm256_loadu_ps(sc + r);
          const __m256 z = _mm256_loadu_ps(zc + r);
          __m256 q = _mm256_round_ps(_mm256_div_ps(w, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, z), zero), mxv);
          _mm256_store_si256(reinterpret_cast<__m256i*>(codes), _mm256_cvtps_epi32(q));
          for (int k = 0; k < 8; ++k) oc[r + k] = static_cast<uint8_t>(codes[k]);
          const __m256 e = _mm256_div_ps(_mm256_sub_ps(w, _mm256_mul_ps(_mm256_sub_ps(q, z), s)), dv);
          _mm256_storeu_ps(ec + r, e);
        }
        for (; r < r1; ++r) {
          const float q = round_code(wc[r], sc[r], zc[r], mx);
          oc[r] = static_cast<uint8_t>(q);
          ec[r] = (wc[r] - (q - zc[r]) * sc[r]) / d;
        }
        for (int64_t j = c + 1; j < b1; ++j) {
          const float uj = Ub[c * K + j];
          const __m256 uv = _mm256_set1_ps(uj);
          float* wj = Wb + j * R;
          int64_t i = r0;
          for (; i + 8 <= r1; i += 8) {
            _mm256_storeu_ps(wj + i, _mm256_sub_ps(_mm256_loadu_ps(wj + i),
                                                   _mm256_mul_ps(uv, _mm256_loadu_ps(ec + i))));
          }
          for (; i < r1; ++i) wj[i] = wj[i] - uj * ec[i];
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(awq_ao_cpu, m) {
  m.def("ef_round_block(Tensor(a!) wt, Tensor u, Tensor st, Tensor zt, Tensor(b!) out, Tensor(c!) err, int b0, "
        "int b1, float max_int) -> ()");
}

TORCH_LIBRARY_IMPL(awq_ao_cpu, CPU, m) {
  m.impl("ef_round_block", &ef_round_block);
}
