// awq_ao's CPU kernels for 4-bit weights in the cpu_tinygemm layout (AVX2 + FMA).
//
// The layout is ATen's `_convert_weight_to_int4pack_for_cpu` output for its interleaved
// variants (b32i on AVX2 builds, b64i on AVX512 builds): full blocks of B rows stored as
// [K_pad, B/2] bytes, byte (k, j) = row j (low nibble) | row j + B/2 (high nibble); a tail
// block of N % B rows stored as [K_pad, tail/2] bytes, byte (k, j) = row 2j | row 2j+1 << 4.
// Metadata: bfloat16 scales_and_zeros [G, N, 2] (scale, offset), w = (q - 8) * scale + offset.
//
// int4_gemm(x, packed, sz, tg, block)      y = x @ W.T, float32 in and out, small M (decode)
//     Activations are quantized per (row, tinygemm group) to int16 with a symmetric scale
//     (error <= 2^-16 of the group's largest |x|; bfloat16 rounds each element to 2^-8 of
//     itself, so int16 is finer except for elements 256x below their group's maximum), so
//     the inner loop is an exact integer dot product (vpmaddwd) of the 4-bit
//     codes with the int16 activations; per group:
//         y += xs * (scale * sum(q * xq) + (offset - 8 * scale) * sum(xq)).
//     Each code is unpacked once per pair of activation rows, never converted to float.
//
// int4_dequant_t(packed, sz, tg, block, b0, b1, out)   writes the transposed float32 weight
//     of full row blocks [b0, b1) into out [K_pad, (b1 - b0) * block] ((q - 8) * scale +
//     offset, the same rounding as awq_ao's eager dequantization), for prefill's float32
//     matmul; out is the caller's buffer, reused from block to block.
//
// Both run on torch's intra-op thread pool (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "act_quant.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using awq_ao_cpu::hsum8_epi32;
using awq_ao_cpu::quantize_activations;

constexpr int kMaxTile = 2;  // activation rows per pass over a group's codes

// Rows of the block held by accumulator lane halves: accumulator i holds rows lo[i]..lo[i]+3
// in its low 128 bits and hi[i]..hi[i]+3 in its high 128 bits (relative to the pass's first row).
template <int B>
struct LaneRows;
template <>
struct LaneRows<32> {
  static constexpr int lo[4] = {0, 4, 16, 20};
  static constexpr int hi[4] = {8, 12, 24, 28};
};
template <>
struct LaneRows<64> {
  static constexpr int lo[4] = {0, 4, 8, 12};
  static constexpr int hi[4] = {16, 20, 24, 28};
};

// The four int16 code registers of one k pair (k, k+1) for the 32 rows of one pass.
template <int B>
inline void unpack_pair(const uint8_t* wp, int pass, __m256i w[4]);

template <>
inline void unpack_pair<32>(const uint8_t* wp, int /*pass*/, __m256i w[4]) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i sh_a = _mm256_setr_epi8(0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1,
                                        0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1);
  const __m256i sh_b = _mm256_setr_epi8(4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1,
                                        4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1);
  // lanes: [k rows 0-7 | k+1 rows 0-7], [k rows 8-15 | k+1 rows 8-15] (bytes)
  __m256i v = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp)), 0xD8);
  __m256i lo = _mm256_and_si256(v, mask);
  __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  w[0] = _mm256_shuffle_epi8(lo, sh_a);  // rows 0-3 | 8-11, (k, k+1) int16 pairs
  w[1] = _mm256_shuffle_epi8(lo, sh_b);  // rows 4-7 | 12-15
  w[2] = _mm256_shuffle_epi8(hi, sh_a);  // rows 16-19 | 24-27
  w[3] = _mm256_shuffle_epi8(hi, sh_b);  // rows 20-23 | 28-31
}

template <>
inline void unpack_pair<64>(const uint8_t* wp, int pass, __m256i w[4]) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
  if (pass) {
    v0 = _mm256_srli_epi16(v0, 4);
    v1 = _mm256_srli_epi16(v1, 4);
  }
  v0 = _mm256_and_si256(v0, mask);  // rows 0-31 of the pass at k
  v1 = _mm256_and_si256(v1, mask);  // at k + 1
  __m256i t0 = _mm256_unpacklo_epi8(v0, v1);  // rows 0-7 | 16-23, (k, k+1) byte pairs
  __m256i t1 = _mm256_unpackhi_epi8(v0, v1);  // rows 8-15 | 24-31
  w[0] = _mm256_unpacklo_epi8(t0, zero);      // rows 0-3 | 16-19 int16 pairs
  w[1] = _mm256_unpackhi_epi8(t0, zero);      // rows 4-7 | 20-23
  w[2] = _mm256_unpacklo_epi8(t1, zero);      // rows 8-11 | 24-27
  w[3] = _mm256_unpackhi_epi8(t1, zero);      // rows 12-15 | 28-31
}

// sum over a group's k pairs of codes * xq for MT activation rows, one pass (32 rows)
template <int B, int MT>
inline void dot_group(const uint8_t* wp, int64_t pairs, int pass, const int16_t* xq,
                      int64_t x_stride, __m256i acc[MT][4]) {
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_setzero_si256();
  for (int64_t p = 0; p < pairs; ++p) {
    __m256i w[4];
    unpack_pair<B>(wp + p * B, pass, w);  // a k pair is B bytes
    for (int t = 0; t < MT; ++t) {
      int32_t pair;  // (x[k], x[k+1]) as one 32-bit word
      std::memcpy(&pair, xq + t * x_stride + 2 * p, sizeof(pair));
      const __m256i xp = _mm256_set1_epi32(pair);
      for (int i = 0; i < 4; ++i) acc[t][i] = _mm256_add_epi32(acc[t][i], _mm256_madd_epi16(w[i], xp));
    }
  }
}

// bfloat16 (scale, offset) pairs of 4 + 4 rows as float32 scale and offset - 8 * scale
inline void load_qparams(const uint32_t* words, int lo, int hi, __m256& s, __m256& o8) {
  __m256i v = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + hi)),
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(words + lo)));
  s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  __m256 o = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  o8 = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, o);
}

template <int B>
void gemm_blocks(const int16_t* xq, const float* xs, const int32_t* xsum, int64_t M, int64_t Kp,
                 int64_t tg, const uint8_t* packed, const uint32_t* sz_words, int64_t N, float* y,
                 int64_t b_begin, int64_t b_end) {
  using R = LaneRows<B>;
  const int64_t G = Kp / tg;
  const int64_t pairs = tg / 2;
  std::vector<float> yacc(static_cast<size_t>(M) * 32);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const uint8_t* block = packed + b * B * (Kp / 2);
    for (int pass = 0; pass < B / 32; ++pass) {
      const int64_t n0 = b * B + pass * 32;  // first row of this pass
      std::fill(yacc.begin(), yacc.end(), 0.0f);
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* wp = block + g * tg * (B / 2);
        const uint32_t* words = sz_words + g * N + n0;
        __m256 s[4], o8[4];
        for (int i = 0; i < 4; ++i) load_qparams(words, R::lo[i], R::hi[i], s[i], o8[i]);
        int64_t m = 0;
        auto epilogue = [&](int64_t mm, const __m256i a[4]) {
          const int64_t mg = mm * G + g;
          const __m256 sx = _mm256_set1_ps(xs[mg]);
          const __m256 sumx = _mm256_set1_ps(static_cast<float>(xsum[mg]));
          float* ya = yacc.data() + mm * 32;
          for (int i = 0; i < 4; ++i) {
            __m256 t = _mm256_fmadd_ps(s[i], _mm256_cvtepi32_ps(a[i]), _mm256_mul_ps(o8[i], sumx));
            __m256 cur = _mm256_loadu_ps(ya + 8 * i);
            _mm256_storeu_ps(ya + 8 * i, _mm256_fmadd_ps(t, sx, cur));
          }
        };
        for (; m + kMaxTile <= M; m += kMaxTile) {
          __m256i acc[kMaxTile][4];
          dot_group<B, kMaxTile>(wp, pairs, pass, xq + m * Kp + g * tg, Kp, acc);
          for (int t = 0; t < kMaxTile; ++t) epilogue(m + t, acc[t]);
        }
        for (; m < M; ++m) {
          __m256i acc[1][4];
          dot_group<B, 1>(wp, pairs, pass, xq + m * Kp + g * tg, Kp, acc);
          epilogue(m, acc[0]);
        }
      }
      // accumulator lane order -> row order
      for (int64_t m = 0; m < M; ++m) {
        const float* ya = yacc.data() + m * 32;
        float* yr = y + m * N + n0;
        for (int i = 0; i < 4; ++i) {
          std::memcpy(yr + R::lo[i], ya + 8 * i, 4 * sizeof(float));
          std::memcpy(yr + R::hi[i], ya + 8 * i + 4, 4 * sizeof(float));
        }
      }
    }
  }
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Tail block (rows n_full .. N-1, "pairs" order), scalar: the same arithmetic as the blocks.
void gemm_tail(const int16_t* xq, const float* xs, const int32_t* xsum, int64_t M, int64_t Kp,
               int64_t tg, const uint8_t* packed, const uint16_t* sz, int64_t N, int64_t n_full,
               float* y) {
  const int64_t tail = N - n_full;
  const int64_t G = Kp / tg;
  const uint8_t* base = packed + n_full * (Kp / 2);
  for (int64_t r = 0; r < tail; ++r) {
    const int64_t j = r / 2;
    const int shift = (r % 2) * 4;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * tg; k < (g + 1) * tg; ++k) {
          const int32_t q = (base[k * (tail / 2) + j] >> shift) & 15;
          dot += q * xq[m * Kp + k];
        }
        const float s = bf16_to_float(sz[(g * N + n_full + r) * 2]);
        const float o = bf16_to_float(sz[(g * N + n_full + r) * 2 + 1]);
        const int64_t mg = m * G + g;
        acc += xs[mg] * (s * static_cast<float>(dot) + (o - 8.0f * s) * static_cast<float>(xsum[mg]));
      }
      y[m * N + n_full + r] = acc;
    }
  }
}

void check_common(const at::Tensor& packed, const at::Tensor& sz, int64_t tg, int64_t block) {
  TORCH_CHECK(block == 32 || block == 64, "awq_ao int4 CPU kernel: block must be 32 or 64, got ", block);
  // tg <= 256 (tinygemm's largest group) also keeps every int32 group sum far from overflow
  TORCH_CHECK(tg % 32 == 0 && tg > 0 && tg <= 256,
              "awq_ao int4 CPU kernel: group size must be 32, 64, ..., 256, got ", tg);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "awq_ao int4 CPU kernel: packed must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.dim() == 3 && sz.size(2) == 2 && sz.is_contiguous(),
              "awq_ao int4 CPU kernel: scales_and_zeros must be contiguous bfloat16 [G, N, 2]");
  const int64_t N = packed.size(0);
  const int64_t Kp = packed.size(1) * 2;
  TORCH_CHECK(Kp % tg == 0 && sz.size(0) == Kp / tg && sz.size(1) == N,
              "awq_ao int4 CPU kernel: scales_and_zeros shape does not match the packed weight");
  TORCH_CHECK(N % 16 == 0, "awq_ao int4 CPU kernel: N must be a multiple of 16");
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t tg,
                     int64_t block) {
  check_common(packed, sz, tg, block);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "awq_ao int4_gemm: x must be contiguous float32 [M, K_pad]");
  const int64_t M = x.size(0);
  const int64_t N = packed.size(0);
  const int64_t Kp = packed.size(1) * 2;
  TORCH_CHECK(x.size(1) == Kp, "awq_ao int4_gemm: x has ", x.size(1), " columns, the weight ", Kp);
  const int64_t G = Kp / tg;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xq = at::empty({M, Kp}, x.options().dtype(at::kShort));
  at::Tensor xs = at::empty({M, G}, x.options());
  at::Tensor xsum = at::empty({M, G}, x.options().dtype(at::kInt));
  quantize_activations(x.data_ptr<float>(), M, Kp, tg, xq.data_ptr<int16_t>(), xs.data_ptr<float>(),
                       xsum.data_ptr<int32_t>());
  const int64_t nb = N / block;
  const int16_t* xqp = xq.data_ptr<int16_t>();
  const float* xsp = xs.data_ptr<float>();
  const int32_t* xsump = xsum.data_ptr<int32_t>();
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  if (nb > 0) {
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      if (block == 32)
        gemm_blocks<32>(xqp, xsp, xsump, M, Kp, tg, pk, words, N, yp, b0, b1);
      else
        gemm_blocks<64>(xqp, xsp, xsump, M, Kp, tg, pk, words, N, yp, b0, b1);
    });
  }
  if (nb * block < N) {
    gemm_tail(xqp, xsp, xsump, M, Kp, tg, pk, reinterpret_cast<const uint16_t*>(words), N, nb * block, yp);
  }
  return y;
}

void int4_dequant_t(const at::Tensor& packed, const at::Tensor& sz, int64_t tg, int64_t block,
                    int64_t b0, int64_t b1, const at::Tensor& out) {
  check_common(packed, sz, tg, block);
  const int64_t N = packed.size(0);
  const int64_t Kp = packed.size(1) * 2;
  TORCH_CHECK(0 <= b0 && b0 <= b1 && b1 * block <= N, "awq_ao int4_dequant_t: bad block range");
  const int64_t R = (b1 - b0) * block;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == Kp && out.size(1) == R &&
                  out.is_contiguous(),
              "awq_ao int4_dequant_t: out must be contiguous float32 [K_pad, (b1 - b0) * block]");
  if (R == 0) return;
  const uint8_t* pk = packed.data_ptr<uint8_t>();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(sz.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const int64_t G = Kp / tg;
  const int64_t half = block / 2;
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m256 eight = _mm256_set1_ps(8.0f);
    const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* blk = pk + b * block * (Kp / 2);
        for (int64_t c = 0; c < block / 8; ++c) {  // 8 rows at a time
          const int shift = (c * 8 >= half) ? 4 : 0;
          const int64_t j0 = (c * 8) % half;  // byte column within the k row
          const int64_t row0 = c * 8;         // row within the block
          __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + g * N + b * block + row0));
          const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
          const __m256 o = _mm256_castsi256_ps(_mm256_and_si256(wv, hi_mask));
          float* dst = op + (b - b0) * block + row0;
          for (int64_t k = g * tg; k < (g + 1) * tg; ++k) {
            __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + k * half + j0));
            if (shift) bytes = _mm_srli_epi16(bytes, 4);
            bytes = _mm_and_si128(bytes, mask);
            __m256 q = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), eight);
            _mm256_storeu_ps(dst + k * R, _mm256_fmadd_ps(q, s, o));
          }
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(awq_ao_cpu, m) {
  m.def("int4_gemm(Tensor x, Tensor packed, Tensor scales_and_zeros, int tg, int block) -> Tensor");
  m.def("int4_dequant_t(Tensor packed, Tensor scales_and_zeros, int tg, int block, int b0, int b1, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(awq_ao_cpu, CPU, m) {
  m.impl("int4_gemm", &int4_gemm);
  m.impl("int4_dequant_t", &int4_dequant_t);
}
