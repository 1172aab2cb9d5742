// Helpers shared by awq_ao's CPU kernels (AVX2 + FMA): horizontal reductions and the
// per-(row, group) int16 quantization of float32 activations.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace awq_ao_cpu {

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float hsum8_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x [M, Kp] float32 -> xq [M, Kp] int16, xs [M, G] (scale), xsum [M, G] (sum of xq).
// A group whose largest |x| is not finite gets a NaN scale: its outputs become NaN.
inline void quantize_activations(const float* x, int64_t M, int64_t Kp, int64_t tg, int16_t* xq,
                          float* xs, int32_t* xsum) {
  const int64_t G = Kp / tg;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* p = x + m * Kp + g * tg;
      int16_t* q = xq + m * Kp + g * tg;
      __m256 vmax = _mm256_setzero_ps();
      for (int64_t i = 0; i < tg; i += 8) {
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + i)));
      }
      float amax = hmax8(vmax);
      // max_ps drops NaNs: look again if the group holds any
      for (int64_t i = 0; i < tg && std::isfinite(amax); ++i) {
        if (!std::isfinite(p[i])) amax = p[i];
      }
      const int64_t mg = m * G + g;
      if (!std::isfinite(amax)) {
        xs[mg] = std::numeric_limits<float>::quiet_NaN();
        xsum[mg] = 0;
        std::memset(q, 0, tg * sizeof(int16_t));
        continue;
      }
      // amax == 0, or so small that 32767 / amax overflows (< ~1e-34): the group's true
      // contribution is below float32's resolution of the result, so it counts as zero
      if (!(32767.0f / amax <= std::numeric_limits<float>::max())) {
        xs[mg] = 0.0f;
        xsum[mg] = 0;
        std::memset(q, 0, tg * sizeof(int16_t));
        continue;
      }
      xs[mg] = amax / 32767.0f;
      const __m256 inv = _mm256_set1_ps(32767.0f / amax);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = 0; i < tg; i += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + i), inv));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + i + 8), inv));
        __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), ab);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(ab, ones));
      }
      xsum[mg] = hsum8_epi32(sum);
    }
  }
}

}  // namespace awq_ao_cpu
