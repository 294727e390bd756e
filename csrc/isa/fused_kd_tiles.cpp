// The hot loops of the fused KD CPU kernel (see fused_kd_tiles.h), for one ISA level:
// compiled once per level with E3_ISA_NS = isa_<level> and that level's -m flags.
// Everything here lives in namespace e3::fused_kd::E3_ISA_NS; no torch header is included.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "fused_kd_tiles.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef E3_ISA_NS
#error "compile with -DE3_ISA_NS=isa_<level>"
#endif
#define E3_STR2(x) #x
#define E3_STR(x) E3_STR2(x)

namespace e3 {
namespace fused_kd {
namespace E3_ISA_NS {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kSpan = 64;  // columns per fp32 partial sum in tile_stats

// a * b + c: one fused op where the level has FMA, else two (libm's soft fma is slow).
inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp for the epilogue: plain scalar code that GCC/Clang vectorize under `omp simd`
// (Cephes-style degree-6 polynomial, ~1 ulp). Exactly 0 below -87.3 (FLT_MIN range), so
// -inf inputs give 0; clamped at 88 (inputs here are z - max <= 0 up to rounding).
inline float fexp(float x) {
  constexpr float kLo = -87.33654475f, kHi = 88.0f;
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  constexpr float kShift = 12582912.f;  // 1.5 * 2^23: round-to-nearest trick
  const float n = (xc * 1.44269504088896341f + kShift) - kShift;
  float r = madd(n, -0.693359375f, xc);
  r = madd(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  p = madd(p, r * r, r) + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  const float y = p * s;
  return x < kLo ? 0.f : y;
}

// float -> bf16, round to nearest even (NaN stays NaN), the rounding of c10::BFloat16.
inline bf16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? bf16_t(0x7FC0) : static_cast<bf16_t>(r);
}

template <bool REV, bool CE_SEP>
void tile_stats(const float* s_all, const float* t_all, int64_t rows, int64_t n, float inv_t,
                TileRowStats* out_all) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* __restrict s = s_all + i * n;
    const float* __restrict t = t_all + i * n;
    TileRowStats& out = out_all[i];
    float mxs = kNegInf, mxt = kNegInf;
#pragma omp simd reduction(max : mxs, mxt)
    for (int64_t j = 0; j < n; ++j) {
      mxs = std::max(mxs, s[j]);
      mxt = std::max(mxt, t[j]);
    }
    out.ms = mxs * inv_t;  // inv_t > 0: the max commutes with the scaling
    out.mt = mxt * inv_t;
    const float bs = out.ms == kNegInf ? 0.f : out.ms;
    const float bt = out.mt == kNegInf ? 0.f : out.mt;
    // fp32 partial sums over kSpan columns (a few terms per SIMD lane), added up in double:
    // the error does not grow with the tile width or depend much on the vector width.
    double dsl = 0.0, dtl = 0.0, dta = 0.0, dtk = 0.0, dl1 = 0.0;
    for (int64_t j0 = 0; j0 < n; j0 += kSpan) {
      const int64_t j1 = std::min(n, j0 + kSpan);
      float sl = 0.f, tl = 0.f, ta = 0.f, tk = 0.f;
#pragma omp simd reduction(+ : sl, tl, ta, tk)
      for (int64_t j = j0; j < j1; ++j) {
        const float zs = s[j] * inv_t, zt = t[j] * inv_t;
        const float es = fexp(zs - bs), et = fexp(zt - bt);
        sl += es;
        tl += et;
        ta += et > 0.f ? et * (zt - bt) : 0.f;
        if (REV) {
          tk += es > 0.f ? es * (zs - zt) : 0.f;
        } else {
          tk += et > 0.f ? et * (zt - zs) : 0.f;
        }
      }
      dsl += sl;
      dtl += tl;
      dta += ta;
      dtk += tk;
      if (CE_SEP) {
        const float b1 = mxs == kNegInf ? 0.f : mxs;
        float l1 = 0.f;
#pragma omp simd reduction(+ : l1)
        for (int64_t j = j0; j < j1; ++j) l1 += fexp(s[j] - b1);
        dl1 += l1;
      }
    }
    out.ls = dsl;
    out.lt = dtl;
    out.at = dta;
    out.k = dtk;
    out.m1 = CE_SEP ? mxs : kNegInf;
    out.l1 = dl1;
  }
}

// Backward of one tile row: overwrites s (unscaled student logits) with dz.
template <bool REV, int CE>
inline void row_grad(float* __restrict s, const float* __restrict t, int64_t n, float inv_t,
                     float lse_s, float lse_t, float kl, float c_kl, float c_ce, float lse1) {
  if (REV) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float lps = s[j] * inv_t - lse_s;
      const float lpt = t[j] * inv_t - lse_t;
      const float ps = fexp(lps);
      float d = ps > 0.f ? c_kl * ps * (lps - lpt - kl) : 0.f;
      if (CE == 1) d += c_ce * ps;
      if (CE == 2) d += c_ce * fexp(s[j] - lse1);
      s[j] = d;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float ps = fexp(s[j] * inv_t - lse_s);
      const float pt = fexp(t[j] * inv_t - lse_t);
      float d = c_kl * (ps - pt);
      if (CE == 1) d += c_ce * ps;
      if (CE == 2) d += c_ce * fexp(s[j] - lse1);
      s[j] = d;
    }
  }
}

// Row-only backward when no KL gradient flows (CE only): t is not needed.
template <int CE>
inline void row_grad_ce_only(float* __restrict s, int64_t n, float inv_t, float lse_s, float c_ce,
                             float lse1) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float p = CE == 1 ? fexp(s[j] * inv_t - lse_s) : fexp(s[j] - lse1);
    s[j] = c_ce * p;
  }
}

template <bool REV, int CE>
void tile_grad(float* s_all, const float* t_all, int64_t rows, int64_t n, int64_t v0,
               float inv_t, const RowCoef* coef, bool need_t) {
  for (int64_t i = 0; i < rows; ++i) {
    const RowCoef& c = coef[i];
    float* srow = s_all + i * n;
    if (c.c_kl == 0.f && c.c_ce == 0.f) {
      std::memset(srow, 0, sizeof(float) * n);
      continue;
    }
    if (need_t) {
      row_grad<REV, CE>(srow, t_all + i * n, n, inv_t, c.lse_s, c.lse_t, c.kl, c.c_kl, c.c_ce,
                        c.lse1);
    } else if (CE != 0) {
      row_grad_ce_only<CE == 0 ? 1 : CE>(srow, n, inv_t, c.lse_s, c.c_ce, c.lse1);
    }
    if (CE != 0 && c.label >= v0 && c.label < v0 + n) srow[c.label - v0] -= c.c_ce;
  }
}

// Transpose of 32-bit elements: dst[c * ldd + r] = src element (r, c), where row r starts at byte
// src + r * row_bytes (any alignment). CVT: the elements are fp32 and dst gets them as bf16.
template <bool CVT>
void transpose32(const char* src, int64_t row_bytes, int64_t rows, int64_t cols,
                 std::conditional_t<CVT, bf16_t, uint32_t>* dst, int64_t ldd) {
  auto load = [&](int64_t r, int64_t c) {
    uint32_t u;
    std::memcpy(&u, src + r * row_bytes + c * 4, 4);
    return u;
  };
  auto put = [&](int64_t r, int64_t c, uint32_t u) {
    if constexpr (CVT) {
      float f;
      std::memcpy(&f, &u, 4);
      dst[c * ldd + r] = to_bf16(f);
    } else {
      dst[c * ldd + r] = u;
    }
  };
  int64_t r16 = 0, c16 = 0;
#if defined(__AVX512F__)
  r16 = rows / 16 * 16;
  c16 = cols / 16 * 16;
  for (int64_t r0 = 0; r0 < r16; r0 += 16) {
    for (int64_t c0 = 0; c0 < c16; c0 += 16) {
      __m512i x[16], t[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_loadu_si512(src + (r0 + i) * row_bytes + c0 * 4);
      for (int i = 0; i < 16; i += 2) {  // 2x2 blocks of 32 bits inside each 128-bit lane
        t[i] = _mm512_unpacklo_epi32(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(x[i], x[i + 1]);
      }
      // u[4g + c]: lane L holds column 4L + c of rows 4g .. 4g + 3
      __m512i u[16];
      for (int g = 0; g < 4; ++g) {
        u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
      }
      for (int c = 0; c < 4; ++c) {  // 4x4 transpose of 128-bit lanes
        const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
        const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
        x[c] = _mm512_shuffle_i32x4(x0, y0, _MM_SHUFFLE(2, 0, 2, 0));       // column c
        x[4 + c] = _mm512_shuffle_i32x4(x1, y1, _MM_SHUFFLE(2, 0, 2, 0));   // column 4 + c
        x[8 + c] = _mm512_shuffle_i32x4(x0, y0, _MM_SHUFFLE(3, 1, 3, 1));   // column 8 + c
        x[12 + c] = _mm512_shuffle_i32x4(x1, y1, _MM_SHUFFLE(3, 1, 3, 1));  // column 12 + c
      }
      for (int j = 0; j < 16; ++j) {
        if constexpr (CVT) {  // to_bf16 on 16 lanes
          const __m512i v = x[j];
          const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(v, 16), _mm512_set1_epi32(1));
          const __m512i r = _mm512_srli_epi32(
              _mm512_add_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(0x7FFF)), lsb), 16);
          const __mmask16 nan = _mm512_cmpgt_epu32_mask(
              _mm512_and_si512(v, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
          const __m512i rr = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c0 + j) * ldd + r0),
                              _mm512_cvtepi32_epi16(rr));
        } else {
          _mm512_storeu_si512(dst + (c0 + j) * ldd + r0, x[j]);
        }
      }
    }
  }
#endif
  // Edges (everything below AVX-512), in 16 x 16 blocks for locality.
  for (int64_t rb = 0; rb < rows; rb += 16) {
    for (int64_t cb = 0; cb < cols; cb += 16) {
      if (rb < r16 && cb < c16) continue;
      const int64_t re = std::min(rows, rb + 16), ce = std::min(cols, cb + 16);
      for (int64_t r = rb; r < re; ++r)
        for (int64_t c = cb; c < ce; ++c) put(r, c, load(r, c));
    }
  }
}

void transpose32_u32(const char* src, int64_t row_bytes, int64_t rows, int64_t cols, uint32_t* dst,
                     int64_t ldd) {
  transpose32<false>(src, row_bytes, rows, cols, dst, ldd);
}

void transpose32_bf16(const char* src, int64_t row_bytes, int64_t rows, int64_t cols, bf16_t* dst,
                      int64_t ldd) {
  transpose32<true>(src, row_bytes, rows, cols, dst, ldd);
}

// One VNNI-2 row pair: dst[2 j] = r0[j], dst[2 j + 1] = r1[j] (0 when r1 is null), j < n.
inline void interleave_rows(const bf16_t* __restrict r0, const bf16_t* __restrict r1, int64_t n,
                            bf16_t* __restrict dst) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  if (r1 == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] = r0[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) d[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
  }
}

void pack_rows_k(const bf16_t* x, int64_t D, int64_t r0, int64_t n, bf16_t* dst) {
  for (int64_t p = 0; 2 * p < n; ++p) {
    const bf16_t* a = x + (r0 + 2 * p) * D;
    interleave_rows(a, 2 * p + 1 < n ? a + D : nullptr, D, dst + p * 2 * D);
  }
}

void pack_rows_t(const bf16_t* w, int64_t D, int64_t v0, int64_t n, bf16_t* dst) {
  const int64_t pairs = D / 2;
  transpose32<false>(reinterpret_cast<const char*>(w + v0 * D), D * 2, n, pairs,
                     reinterpret_cast<uint32_t*>(dst), n);
  if (D % 2 == 1) {  // last k pair: (w[.][D - 1], 0)
    uint32_t* d = reinterpret_cast<uint32_t*>(dst) + pairs * n;
    for (int64_t j = 0; j < n; ++j) d[j] = w[(v0 + j) * D + D - 1];
  }
}

void round_to_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, bf16_t* dst,
                   int64_t ldd, bool pad) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * lds;
    bf16_t* d = dst + i * ldd;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) d[j] = to_bf16(s[j]);
    if (pad) d[cols] = 0;
  }
}

// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2 |x|) in (0, 1] (no overflow; e = 0 for
// |x| > 43.7, so tanh = +-1 exactly there), and 1 - tanh^2 = 4 e / (1 + e)^2 without the
// cancellation of 1 - t * t where the cap saturates.
template <bool DERIV>
void softcap_logits(float* __restrict z, int64_t n, float scale, float cap,
                    float* __restrict deriv) {
  const float inv_cap = 1.f / cap, k = scale * inv_cap;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = z[j] * k;
    const float e = fexp(-2.f * std::fabs(x));
    const float inv = 1.f / (1.f + e);
    const float t = (1.f - e) * inv;
    z[j] = cap * (x < 0.f ? -t : t);
    if (DERIV) deriv[j] = scale * (4.f * e * inv * inv);
  }
}

void transform_logits(float* z, int64_t n, float scale, float cap, bool softcap, float* deriv) {
  if (softcap) {
    if (deriv != nullptr) {
      softcap_logits<true>(z, n, scale, cap, deriv);
    } else {
      softcap_logits<false>(z, n, scale, cap, nullptr);
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] *= scale;
}

void scale_grad(float* __restrict dz, int64_t n, const float* __restrict deriv, float scale) {
  if (deriv != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dz[j] *= deriv[j];
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dz[j] *= scale;
}

}  // namespace

const TileKernels& tile_kernels() {
  static const TileKernels k = {
      E3_STR(E3_ISA_NS) + 4,  // "isa_avx2" -> "avx2"
      {{&tile_stats<false, false>, &tile_stats<false, true>},
       {&tile_stats<true, false>, &tile_stats<true, true>}},
      {{&tile_grad<false, 0>, &tile_grad<false, 1>, &tile_grad<false, 2>},
       {&tile_grad<true, 0>, &tile_grad<true, 1>, &tile_grad<true, 2>}},
      &transpose32_u32,
      &transpose32_bf16,
      &pack_rows_k,
      &pack_rows_t,
      &round_to_bf16,
      &transform_logits,
      &scale_grad,
  };
  return k;
}

}  // namespace E3_ISA_NS
}  // namespace fused_kd
}  // namespace e3
