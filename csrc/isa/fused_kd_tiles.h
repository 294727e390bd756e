// The hot loops of the fused KD CPU kernel, compiled once per ISA level (csrc/isa/*.cpp with
// E3_ISA_NS = isa_baseline / isa_avx2 / isa_avx512) and chosen at run time (cpu_isa.h).
//
// This header holds only plain data and declarations: no inline function is shared between
// TUs built with different -m flags (a shared inline function would be merged by the linker
// into one copy, possibly the AVX-512 one, and reached from code that runs on any CPU).
// The ISA TUs include no torch header for the same reason.
#pragma once
#include <cstdint>

namespace e3 {
namespace fused_kd {

using bf16_t = uint16_t;  // raw bfloat16 bits

// Statistics of one tile row relative to the tile maxima (see fused_kd.cpp for the maths).
struct TileRowStats {
  float ms, mt, m1;   // tile maxima: scaled student, scaled teacher, unscaled student (CE)
  double ls, lt, at;  // sum e^{z_s-m_s}, sum e^{z_t-m_t}, sum e^{z_t-m_t} (z_t-m_t)
  double k;           // forward: sum e^{z_t-m_t}(z_t-z_s); reverse: sum e^{z_s-m_s}(z_s-z_t)
  double l1;          // sum e^{z1-m1} of the unscaled student logits (CE with T != 1)
};

// Backward coefficients of one token row.
struct RowCoef {
  float c_kl, c_ce, lse_s, lse_t, kl, lse1;
  int64_t label;  // -1 when no CE term for this row
};

// One ISA level's implementation of the tile loops. Index conventions:
//   rev: 0 forward KL, 1 reverse KL;  ce_sep: CE with T != 1 (separate unscaled softmax);
//   ce: 0 none, 1 shared with the student softmax (T == 1), 2 separate.
struct TileKernels {
  const char* isa;
  // out[i] = statistics of rows s[i*n ..], t[i*n ..], i < rows (unscaled logits; scaled by inv_t).
  void (*tile_stats[2][2])(const float* s, const float* t, int64_t rows, int64_t n, float inv_t,
                           TileRowStats* out);
  // s (unscaled student logits [rows, n], vocab offset v0) <- dz = d loss / d(hs ws^T);
  // rows with c_kl == c_ce == 0 become 0. need_t = false: CE only (t unused).
  void (*tile_grad[2][3])(float* s, const float* t, int64_t rows, int64_t n, int64_t v0,
                          float inv_t, const RowCoef* coef, bool need_t);
  // dst[c * ldd + r] = element (r, c) of 32-bit rows (row r at byte src + r * row_bytes).
  void (*transpose32)(const char* src, int64_t row_bytes, int64_t rows, int64_t cols,
                      uint32_t* dst, int64_t ldd);
  // The same with fp32 elements rounded to bf16.
  void (*transpose32_to_bf16)(const char* src, int64_t row_bytes, int64_t rows, int64_t cols,
                              bf16_t* dst, int64_t ldd);
  // Rows [r0, r0 + n) of a row-major bf16 [*, D] as a VNNI-2 B operand [K = n, N = D].
  void (*pack_rows_k)(const bf16_t* x, int64_t D, int64_t r0, int64_t n, bf16_t* dst);
  // Rows [v0, v0 + n) of a bf16 head [*, D] as the VNNI-2 B operand of h w^T: [K = D + D % 2, N = n].
  void (*pack_rows_t)(const bf16_t* w, int64_t D, int64_t v0, int64_t n, bf16_t* dst);
  // dst[i * ldd + j] = bf16(src[i * lds + j]) for j < cols; dst[i * ldd + cols] = 0 when pad.
  void (*round_to_bf16)(const float* src, int64_t lds, int64_t rows, int64_t cols, bf16_t* dst,
                        int64_t ldd, bool pad);
  // Logit transform of n contiguous raw logits r, in place: z = cap tanh(scale r / cap) when
  // softcap, else scale r. deriv (softcap only; may be null) gets dz/dr = scale (1 - tanh^2).
  void (*transform_logits)(float* z, int64_t n, float scale, float cap, bool softcap,
                           float* deriv);
  // dz[j] *= deriv[j] (deriv non-null), else dz[j] *= scale, j < n.
  void (*scale_grad)(float* dz, int64_t n, const float* deriv, float scale);
};

namespace isa_baseline { const TileKernels& tile_kernels(); }
namespace isa_avx2 { const TileKernels& tile_kernels(); }
namespace isa_avx512 { const TileKernels& tile_kernels(); }

}  // namespace fused_kd
}  // namespace e3
