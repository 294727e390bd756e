// Fused linear KD loss, C++ CPU path (DESIGN 3.2 / 3.3).
//
// Per token i, with z_s = hs ws[:V]^T / T and z_t = ht wt[:V]^T / T, never stored beyond one
// [chunk_N, block_V] tile per thread:
//   online over vocab tiles (tile-local sums relative to the tile max, merged into running
//   per-row statistics in double):
//     student  m_s, l_s = sum e^{z_s - m_s}
//     teacher  m_t, l_t = sum e^{z_t - m_t}, a_t = sum e^{z_t - m_t} (z_t - m_t)
//     forward  k = sum e^{z_t - m_t} (z_t - z_s)        reverse  k = sum e^{z_s - m_s} (z_s - z_t)
//     CE       m_1, l_1 of the UNscaled student logits (shared with the student when T == 1)
//   lse_s = m_s + log l_s, lse_t = m_t + log l_t, H_t = log l_t - a_t / l_t,
//   forward KL = k / l_t - lse_t + lse_s,  reverse KL = k / l_s - lse_s + lse_t.
// Backward recomputes the tiles, forms dz = d loss / d (hs ws^T) in place of the student tile and
// accumulates grad_hs += dz ws_blk (one fp32 slot per vocab group, summed per chunk) and
// grad_ws[blk] += dz^T hs_chunk (each vocab block belongs to one group: no race, no copies).
//
// Threading: tokens are processed in chunks of kChunkN rows; inside a chunk, the vocab blocks
// (in a few contiguous groups per thread, taken dynamically) are spread over ATen's
// at::parallel_for threads, so N = 1 still uses every thread, and results are deterministic.
// GEMMs: the Fortran sgemm_ of the BLAS inside libtorch (MKL on x86 wheels), called from each
// worker (single-threaded there), else at::mm_out / at::addmm_out on the tiles.
// Low-precision inputs are converted to fp32 per tile (per chunk for the hidden states), except
// a side whose hidden states and head are both bf16 on a CPU with AVX512_BF16: its tile GEMMs
// (logits, backward recompute, grad_hs / grad_ws) run as bf16 x bf16 -> fp32 on oneDNN's
// brgemm micro-kernel (fp32 logits tiles; dz rounded to bf16 as a GEMM input only, fp32 sums).
// Logit transform (Gemma softcap, Cohere / Granite logit scale), per side: each fp32 logits
// tile r becomes y = c tanh(s r / c) (or s r) right after its GEMM, and every statistic above is
// that of y; the backward stores dy/dr of the student tile beside it and multiplies dz by it
// before the gradient GEMMs. With s = 1 and no cap the transform is skipped outside the tile
// loops, so the untransformed path runs unchanged.
// See docs/fused_kd_cpp.md.

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "isa/fused_kd_tiles.h"
#include "registry.h"

extern "C" {
// Exported by libtorch_cpu when torch is built with a BLAS (MKL on the x86 wheels); ATen's own
// CPUBlas calls the same symbol. Weak, so a torch without it still loads this module.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace e3 {
namespace fused_kd {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunkN = 256;  // token rows per chunk (the GEMM M dimension)
constexpr int64_t kBlockV = 256;  // vocab rows per tile (the GEMM N dimension)

// ------------------------------------------------------------------------------------------
// GEMM on fp32, row-major: C[M,N] = op(A)[M,K] op(B)[K,N] + beta C.
// ------------------------------------------------------------------------------------------
bool blas_available() { return sgemm_ != nullptr; }

void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* C, int64_t ldc, bool use_blas) {
  if (M == 0 || N == 0) return;
  if (use_blas) {
    // Row-major C = A B is column-major C^T = B^T A^T: swap the operands, keep the flags.
    const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float one = 1.f;
    sgemm_(&ca, &cb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  float* a_ptr = const_cast<float*>(A);
  float* b_ptr = const_cast<float*>(B);
  at::Tensor a = ta ? at::from_blob(a_ptr, {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(a_ptr, {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(b_ptr, {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(b_ptr, {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == 0.f) {
    at::mm_out(c, a, b);
  } else {
    at::addmm_out(c, c, a, b, beta, 1.0);
  }
}

// ------------------------------------------------------------------------------------------
// bf16 x bf16 -> fp32 GEMM: oneDNN's brgemm micro-kernel as exported by libtorch
// (at::native::cpublas::brgemm, the one FlashAttention uses): C[M,N] (+)= A[M,K] B[K,N], A
// row-major bf16, B bf16 in the VNNI-2 layout (element (k, n) at ((k / 2) * ldb + n) * 2 + k % 2),
// C fp32 row-major, single-threaded (runs inside our workers). torch itself only takes it with
// AMX (it can pack B only there); we pack B ourselves, which the kernel accepts on any
// AVX-512 CPU. We use it where the CPU has AVX512_BF16 (vdpbf16ps): on Zen 4 it runs at ~2x
// MKL's sgemm (MKL's own bf16 GEMM takes no bf16 path on AMD). K is always even here (the
// operands are zero-padded), so no K tail is ever handed to the kernel.
// ------------------------------------------------------------------------------------------
std::atomic<bool> g_bf16_gemm_enabled{true};  // fused_kd_set_bf16_gemm(False) forces fp32

// CPUBLAS_BRGEMM_BF16BF16F32: defined by CPUBlas.h of the torch versions that export it.
inline void brgemm_bf16(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                        bool add_c, const bf16_t* A, const bf16_t* B, float* C) {
  if (M == 0 || N == 0) return;
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_c,
                              reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
#else
  TORCH_CHECK(false, "this torch has no cpublas::brgemm (bf16)");
#endif
}

// Ends a worker's run of brgemm calls (releases the AMX tile state where there is one).
inline void brgemm_done() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm_release(true);
#endif
}

// Why the CPU cannot take the bf16 route (empty: it can). Checked once: x86-64 with AVX512_BF16
// and without AMX, and a brgemm that runs and gives the right numbers on a small ragged probe.
// AMX CPUs are left on the fp32 route: there the kernel runs on AMX tiles, which torch itself
// feeds with B packed in 64-column blocks; our full-block layout is validated on AVX512_BF16 only.
const std::string& bf16_gemm_cpu_reason() {
  static const std::string reason = []() -> std::string {
#if !defined(CPUBLAS_BRGEMM_BF16BF16F32)
    return "this torch has no cpublas::brgemm (bf16)";
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16")) return "the CPU has no AVX512_BF16";
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 22))) {
      return "AMX-BF16 CPU (not validated for this B layout)";
    }
#else
    return "not an x86-64 build";
#endif
    try {
      // A [3 x 4] (k even), B [4 x 5] in VNNI-2, C = A B: small integers, exact in bf16 / fp32.
      constexpr int64_t M = 3, N = 5, K = 4;
      bf16_t a[M * K], b[K * N];
      float c[M * N], want[M * N];
      auto bf = [](float v) { return c10::BFloat16(v).x; };
      for (int64_t i = 0; i < M; ++i)
        for (int64_t k = 0; k < K; ++k) a[i * K + k] = bf(static_cast<float>(i + 2 * k - 3));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n) b[((k / 2) * N + n) * 2 + k % 2] = bf(static_cast<float>(k - n + 1));
      for (int64_t i = 0; i < M; ++i)
        for (int64_t n = 0; n < N; ++n) {
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += static_cast<float>((i + 2 * k - 3) * (k - n + 1));
          want[i * N + n] = acc;
          c[i * N + n] = 1000.f;
        }
      brgemm_bf16(M, N, K, K, N, N, false, a, b, c);
      brgemm_done();
      for (int64_t i = 0; i < M * N; ++i)
        if (c[i] != want[i]) return "cpublas::brgemm (bf16) gave wrong results on this CPU";
    } catch (const std::exception& e) {
      return std::string("cpublas::brgemm (bf16) is not usable: ") + e.what();
    }
    return "";
  }();
  return reason;
}

// Why the bf16 route is off right now (empty: on).
std::string bf16_gemm_off_reason() {
  if (!g_bf16_gemm_enabled.load(std::memory_order_relaxed)) {
    return "disabled by fused_kd_set_bf16_gemm(False)";
  }
  // brgemm refuses to run while oneDNN is disabled; checked before the (cached) probe.
  if (!at::globalContext().userEnabledMkldnn()) return "oneDNN is disabled (torch.backends.mkldnn)";
  if (active_isa() != Isa::kAvx512) {
    return std::string("the CPU ISA level is ") + isa_name(active_isa()) + " (the route needs avx512)";
  }
  return bf16_gemm_cpu_reason();
}

// The tile loops of the ISA level chosen at run time.
const TileKernels& tiles() {
#if defined(E3_MULTI_ISA)
  switch (active_isa()) {
    case Isa::kAvx512: return isa_avx512::tile_kernels();
    case Isa::kAvx2: return isa_avx2::tile_kernels();
    default: break;
  }
#endif
  return isa_baseline::tile_kernels();
}

// Whether a side whose hidden states and head are both bf16 takes the bf16 GEMM route.
// An fp32 head is rounded to bf16 per (chunk, block) tile inside the kernel, which gives the
// values of w.to(bfloat16) without a copy of the whole head.
bool use_bf16_gemm(const at::Tensor& h, const at::Tensor& w) {
  return h.scalar_type() == at::kBFloat16 &&
         (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat) &&
         bf16_gemm_off_reason().empty();
}

// One side's logit transform y = c tanh(s r / c) (softcap c) or s r; identity: s = 1, no cap.
struct Xform {
  double scale = 1.0;
  std::optional<double> softcap;
  bool identity() const { return scale == 1.0 && !softcap.has_value(); }
};

// ------------------------------------------------------------------------------------------
// Per-row online statistics.
// ------------------------------------------------------------------------------------------
struct Stats {
  float ms, mt, m1;   // running maxima: scaled student, scaled teacher, unscaled student (CE)
  double ls, lt, at;  // sum e^{z_s-m_s}, sum e^{z_t-m_t}, sum e^{z_t-m_t} (z_t-m_t)
  double k;           // forward: sum e^{z_t-m_t}(z_t-z_s); reverse: sum e^{z_s-m_s}(z_s-z_t)
  double l1;          // sum e^{z1-m1} of the unscaled student logits (CE with T != 1)
  double lab;         // unscaled student logit at the label (CE)
  void reset() {
    ms = mt = m1 = kNegInf;
    ls = lt = at = k = l1 = lab = 0.0;
  }
  static Stats of(const TileRowStats& t, double lab) {
    return {t.ms, t.mt, t.m1, t.ls, t.lt, t.at, t.k, t.l1, lab};
  }
};

// Scale factors that bring a block with maximum `m_part` to the common maximum `m`.
inline double rescale(float m_part, float m) {
  return m_part == kNegInf ? 0.0 : std::exp(static_cast<double>(m_part) - m);
}

// Merges `s` into `d` (both relative to their own maxima).
inline void merge(Stats& d, const Stats& s, bool reverse, bool ce_sep) {
  {  // student
    const float m = std::max(d.ms, s.ms);
    if (m != kNegInf) {
      const double ad = rescale(d.ms, m), as = rescale(s.ms, m);
      d.ls = ad * d.ls + as * s.ls;
      if (reverse) d.k = ad * d.k + as * s.k;
      d.ms = m;
    }
  }
  {  // teacher
    const float m = std::max(d.mt, s.mt);
    if (m != kNegInf) {
      const double ad = rescale(d.mt, m), as = rescale(s.mt, m);
      const double a_d = ad == 0.0 ? 0.0 : ad * (d.at + (static_cast<double>(d.mt) - m) * d.lt);
      const double a_s = as == 0.0 ? 0.0 : as * (s.at + (static_cast<double>(s.mt) - m) * s.lt);
      d.at = a_d + a_s;
      d.lt = ad * d.lt + as * s.lt;
      if (!reverse) d.k = ad * d.k + as * s.k;
      d.mt = m;
    }
  }
  if (ce_sep) {
    const float m = std::max(d.m1, s.m1);
    if (m != kNegInf) {
      d.l1 = rescale(d.m1, m) * d.l1 + rescale(s.m1, m) * s.l1;
      d.m1 = m;
    }
  }
  d.lab += s.lab;
}

// ------------------------------------------------------------------------------------------
// Operands: [rows, D] matrices in fp32 / bf16 / fp16; fp32 row blocks on demand.
// ------------------------------------------------------------------------------------------
struct Operand {
  at::Tensor t;  // contiguous
  const float* f32 = nullptr;
  const bf16_t* bf16 = nullptr;
  int64_t D = 0;
  explicit Operand(const at::Tensor& x) : t(x.contiguous()), D(x.size(1)) {
    if (t.scalar_type() == at::kFloat) f32 = t.data_ptr<float>();
    if (t.scalar_type() == at::kBFloat16) {
      bf16 = reinterpret_cast<const bf16_t*>(t.data_ptr<at::BFloat16>());
    }
  }
  // fp32 rows [r0, r0 + n): a pointer into the tensor, or a conversion into buf (n * D floats).
  const float* rows(int64_t r0, int64_t n, float* buf) const {
    if (f32 != nullptr) return f32 + r0 * D;
    at::from_blob(buf, {n, D}, at::TensorOptions().dtype(at::kFloat)).copy_(t.narrow(0, r0, n));
    return buf;
  }
  bool needs_buffer() const { return f32 == nullptr; }
};

// dst[i] = float(T(src[i])) for T = bf16 / fp16, i < n (src may be dst): the rounding of .to().
void round_rows(const float* src, int64_t n, at::ScalarType to, float* dst) {
  if (to == at::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::BFloat16(src[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::Half(src[i]));
  }
}

// One side of the logits, z = h w^T (student: hs, ws; teacher: ht, wt), with its GEMM route:
//  - fp32 (sgemm_, or at::mm_out): fp32 rows of h per chunk, of w per (chunk, block), converted
//    from bf16 / fp16 into buffers when needed;
//  - bf16 (both h and w bf16, see use_bf16_gemm): bf16 x bf16 -> fp32 brgemm on the tensors' own
//    bf16 values (A = h rows, zero-padded to an even K when D is odd; B = the head block packed
//    to VNNI-2 per (chunk, block) by each thread). The products of bf16 values are exact in fp32
//    and the sums are fp32, as with sgemm on the converted values: the logits keep fp32 accuracy.
struct Side {
  Operand h, w;
  bool bf16;
  int64_t D, Kp;  // Kp: D rounded up to even (the bf16 route's K)
  // current chunk
  int64_t nc = 0;
  const float* h32 = nullptr;   // fp32 route: [nc, D]
  const bf16_t* hA = nullptr;   // bf16 route: [nc, lda]
  int64_t lda = 0;
  std::vector<float> hbuf32, wbuf32;  // fp32 route conversions: [nc_max, D], T x [kBlockV, D]
  std::vector<bf16_t> hbufA, wpack;   // bf16 route: [nc_max, Kp] (odd D), T x [Kp, kBlockV]
  std::vector<bf16_t> wround;         // bf16 route, fp32 head: T x [kBlockV, D] rounded rows
  const TileKernels& K;               // the tile loops of the ISA level in use

  // fp32 route: the head rounded to the dtype of h per block (a head of another dtype than a
  // bf16 / fp16 h), so that every route computes with the values of w.to(h.dtype).
  at::ScalarType round_to = at::kFloat;

  // logit transform (xf false: identity, never called)
  bool xf = false, cap_on = false;
  float scale = 1.f, cap = 1.f;
  int64_t dstride = 0;
  std::vector<float> dbuf;  // T x [nc_max, kBlockV]: dy/dr of the last tile (backward, softcap)

  void set_transform(const Xform& x, bool keep_deriv, int T, int64_t nc_max) {
    xf = !x.identity();
    cap_on = x.softcap.has_value();
    scale = static_cast<float>(x.scale);
    cap = cap_on ? static_cast<float>(*x.softcap) : 1.f;
    if (xf && cap_on && keep_deriv) {
      dstride = nc_max * kBlockV;
      dbuf.resize(static_cast<size_t>(T * dstride));
    }
  }

  // dy/dr of thread tid's last tile (softcap with keep_deriv), else nullptr (then dy/dr = scale).
  float* deriv(int tid) { return dbuf.empty() ? nullptr : dbuf.data() + tid * dstride; }

  Side(const at::Tensor& h_, const at::Tensor& w_, int T, int64_t nc_max, const TileKernels& k)
      : h(h_), w(w_), bf16(use_bf16_gemm(h_, w_)), D(h.D), Kp(D + D % 2), K(k) {
    if (!bf16 && h_.scalar_type() != at::kFloat && w_.scalar_type() != h_.scalar_type()) {
      round_to = h_.scalar_type();
    }
    if (bf16) {
      if (D % 2 == 1) hbufA.assign(static_cast<size_t>(nc_max * Kp), 0);
      wpack.resize(static_cast<size_t>(T) * Kp * kBlockV);
      if (w.bf16 == nullptr) wround.resize(static_cast<size_t>(T) * kBlockV * D);
    } else {
      if (h.needs_buffer()) hbuf32.resize(static_cast<size_t>(nc_max * D));
      if (w.needs_buffer() || round_to != at::kFloat) {
        wbuf32.resize(static_cast<size_t>(T) * kBlockV * D);
      }
    }
  }

  // Prepares rows [n0, n0 + nc) of h (called outside the parallel region).
  void set_chunk(int64_t n0, int64_t nc_) {
    nc = nc_;
    if (!bf16) {
      h32 = h.rows(n0, nc, hbuf32.data());
      return;
    }
    const bf16_t* src = h.bf16 + n0 * D;
    if (D % 2 == 0) {
      hA = src;
      lda = D;
      return;
    }
    for (int64_t i = 0; i < nc; ++i) {  // pad column D stays 0
      std::memcpy(hbufA.data() + i * Kp, src + i * D, D * sizeof(bf16_t));
    }
    hA = hbufA.data();
    lda = Kp;
  }

  // bf16 route: head rows [v0, v0 + bv) as bf16 rows [r0, r0 + bv) of the returned pointer
  // (the tensor itself, or thread tid's rounding of an fp32 head; rounded here on every call).
  const bf16_t* w_block_bf16(int tid, int64_t v0, int64_t bv, int64_t& r0) {
    if (w.bf16 != nullptr) {
      r0 = v0;
      return w.bf16;
    }
    bf16_t* dst = wround.data() + static_cast<int64_t>(tid) * kBlockV * D;
    K.round_to_bf16(w.f32 + v0 * D, D, bv, D, dst, D, false);
    r0 = 0;
    return dst;
  }

  // The rows w_block_bf16 last gave thread tid (valid until its next call).
  const bf16_t* last_block_bf16(int tid, int64_t v0, int64_t& r0) const {
    if (w.bf16 != nullptr) {
      r0 = v0;
      return w.bf16;
    }
    r0 = 0;
    return wround.data() + static_cast<int64_t>(tid) * kBlockV * D;
  }

  // z[nc, bv] = transform(h_chunk w[v0 : v0 + bv]^T) in fp32 (thread tid). Returns the fp32
  // head rows the fp32 route used (for the gradient GEMMs), nullptr on the bf16 route.
  const float* logits(int tid, int64_t v0, int64_t bv, float* z, bool use_blas) {
    const float* wb = raw_logits(tid, v0, bv, z, use_blas);
    if (xf) K.transform_logits(z, nc * bv, scale, cap, cap_on, deriv(tid));
    return wb;
  }

  const float* raw_logits(int tid, int64_t v0, int64_t bv, float* z, bool use_blas) {
    if (bf16) {
      bf16_t* bp = wpack.data() + static_cast<int64_t>(tid) * Kp * kBlockV;
      int64_t r0 = 0;
      const bf16_t* wb = w_block_bf16(tid, v0, bv, r0);
      K.pack_rows_t(wb, D, r0, bv, bp);
      brgemm_bf16(nc, bv, Kp, lda, bv, bv, false, hA, bp, z);
      return nullptr;
    }
    float* buf = wbuf32.empty() ? nullptr : wbuf32.data() + static_cast<int64_t>(tid) * kBlockV * D;
    const float* wb = w.rows(v0, bv, buf);
    if (round_to != at::kFloat) {
      round_rows(wb, bv * D, round_to, buf);
      wb = buf;
    }
    gemm_rm(false, true, nc, bv, D, h32, D, wb, D, 0.f, z, bv, use_blas);
    return wb;
  }
};

std::string shape_str(const at::Tensor& x) {
  std::ostringstream os;
  os << x.sizes() << " " << x.scalar_type();
  return os.str();
}

bool is_float_kind(const at::Tensor& x) {
  const auto d = x.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// Validates the inputs shared by forward and backward; returns labels as contiguous int64
// (undefined when none).
at::Tensor check_common(const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht,
                        const at::Tensor& wt, const at::Tensor& labels, double inv_temperature,
                        int64_t vocab_size, const char* fn) {
  for (const auto* x : {&hs, &ws, &ht, &wt}) {
    TORCH_CHECK(x->defined(), fn, ": undefined tensor argument");
    TORCH_CHECK(x->device().is_cpu(), fn, ": the C++ kernel runs on CPU tensors, got a tensor on ",
                x->device());
    TORCH_CHECK(x->dim() == 2, fn, ": hs, ws, ht, wt must be 2-D; got hs ", shape_str(hs),
                ", ws ", shape_str(ws), ", ht ", shape_str(ht), ", wt ", shape_str(wt));
    TORCH_CHECK(is_float_kind(*x), fn, ": hs, ws, ht, wt must be float32, bfloat16 or float16; got hs ",
                shape_str(hs), ", ws ", shape_str(ws), ", ht ", shape_str(ht), ", wt ",
                shape_str(wt));
  }
  TORCH_CHECK(hs.size(0) == ht.size(0), fn, ": student and teacher token counts differ: hs ",
              shape_str(hs), " vs ht ", shape_str(ht));
  TORCH_CHECK(hs.size(1) == ws.size(1), fn, ": hidden size mismatch: hs ", shape_str(hs),
              " vs ws ", shape_str(ws), " (ws must be [Vs, Ds])");
  TORCH_CHECK(ht.size(1) == wt.size(1), fn, ": hidden size mismatch: ht ", shape_str(ht),
              " vs wt ", shape_str(wt), " (wt must be [Vt, Dt])");
  TORCH_CHECK(hs.size(1) > 0 && ht.size(1) > 0, fn, ": hidden sizes must be >= 1: hs ",
              shape_str(hs), ", ht ", shape_str(ht));
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= std::min(ws.size(0), wt.size(0)), fn,
              ": vocab_size must be in [1, min(Vs, Vt)] = [1, ", std::min(ws.size(0), wt.size(0)),
              "], got ", vocab_size, " (ws ", shape_str(ws), ", wt ", shape_str(wt), ")");
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0.0, fn,
              ": inv_temperature must be finite and > 0 (temperature > 0), got ", inv_temperature);
  TORCH_CHECK(hs.size(0) <= std::numeric_limits<int>::max() / 2, fn, ": too many tokens");
  at::Tensor lab;
  if (labels.defined() && labels.numel() > 0) {
    TORCH_CHECK(labels.device().is_cpu(), fn, ": labels must be a CPU tensor");
    TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
                fn, ": labels must be an integer tensor, got ", shape_str(labels));
    TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hs.size(0), fn,
                ": labels must be [N] with N = hs.size(0); got labels ", shape_str(labels),
                ", hs ", shape_str(hs));
    lab = labels.to(at::kLong).contiguous();
  }
  return lab;
}

void check_transform(const Xform& x, const char* side, const char* fn) {
  TORCH_CHECK_VALUE(std::isfinite(x.scale) && x.scale > 0.0, fn, ": ", side,
                    "_scale must be finite and > 0 (1.0: no scaling), got ", x.scale);
  TORCH_CHECK_VALUE(!x.softcap.has_value() || (std::isfinite(*x.softcap) && *x.softcap > 0.0), fn,
                    ": ", side, "_softcap must be None (no capping) or finite and > 0, got ",
                    x.softcap.has_value() ? *x.softcap : 0.0);
}

at::Tensor check_row_vector(const at::Tensor& x, int64_t N, const char* name, const char* fn) {
  TORCH_CHECK(x.defined() && x.dim() == 1 && x.size(0) == N, fn, ": ", name,
              " must be [N] with N = ", N, ", got ",
              x.defined() ? shape_str(x) : std::string("undefined"));
  TORCH_CHECK(x.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), fn, ": ", name, " must be floating point, got ",
              shape_str(x));
  return x.to(at::kFloat).contiguous();
}

void check_label_range(const at::Tensor& lab, int64_t ignore_index, int64_t V, const char* fn) {
  const int64_t* p = lab.data_ptr<int64_t>();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  int64_t first_bad = -1;
  for (int64_t i = 0; i < lab.size(0); ++i) {
    if (p[i] == ignore_index) continue;
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
    if (first_bad < 0 && (p[i] < 0 || p[i] >= V)) first_bad = i;
  }
  TORCH_CHECK_VALUE(first_bad < 0, fn, ": labels (", lab.size(0), ",) must be in [0, ", V,
                    ") or equal ignore_index = ", ignore_index, "; got values in [", lo, ", ", hi,
                    "] (labels[", first_bad, "] = ", first_bad < 0 ? 0 : p[first_bad], ")");
}

// Vocab blocks [0, nvb) are split into G contiguous groups that the threads take dynamically
// (an atomic counter), so a thread slowed down by another process does not stall the others.
// Each group owns its statistics / grad_hs slot; slots are merged in group order afterwards, so
// results are run-to-run deterministic for a given thread count.
struct Groups {
  int64_t nvb = 1, G = 1;
  int64_t lo(int64_t g) const { return g * nvb / G; }
  int64_t hi(int64_t g) const { return (g + 1) * nvb / G; }
};

Groups make_groups(int64_t nvb, int T, int64_t slot_bytes) {
  constexpr int64_t kSlotBudget = int64_t(64) << 20;  // bytes of per-group slots, all groups
  const int64_t cap = std::max<int64_t>(T, kSlotBudget / std::max<int64_t>(1, slot_bytes));
  Groups g;
  g.nvb = nvb;
  g.G = std::max<int64_t>(1, std::min({int64_t(4) * T, cap, nvb}));
  return g;
}

// Calls body(tid, g) once for every group g; tid < T indexes per-thread scratch buffers.
template <class F>
void run_groups(const Groups& gr, bool nested, int T, const F& body) {
  if (nested || T == 1) {
    for (int64_t g = 0; g < gr.G; ++g) body(0, g);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, T, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    if (tid < 0 || tid >= T) return;  // never expected; the other threads take every group
    for (int64_t g = next.fetch_add(1); g < gr.G; g = next.fetch_add(1)) body(tid, g);
  });
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <bool REV, bool CE_SEP>
void forward_chunk_tiles(Side& S, Side& Tc, int64_t nc, int64_t V, float inv_t,
                         const int64_t* lab_chunk, bool track_label, const Groups& gr,
                         std::vector<float>& tiles, std::vector<TileRowStats>& row_stats,
                         std::vector<Stats>& slots, int64_t nc_max, bool nested, int T,
                         bool use_blas) {
  const auto tile_stats = S.K.tile_stats[REV][CE_SEP];
  run_groups(gr, nested, T, [&](int tid, int64_t g) {
    float* zs = tiles.data() + static_cast<int64_t>(tid) * 2 * nc_max * kBlockV;
    float* zt = zs + nc_max * kBlockV;
    TileRowStats* rs = row_stats.data() + static_cast<int64_t>(tid) * nc_max;
    Stats* st = slots.data() + g * nc_max;
    for (int64_t vb = gr.lo(g); vb < gr.hi(g); ++vb) {
      const int64_t v0 = vb * kBlockV, bv = std::min(kBlockV, V - v0);
      S.logits(tid, v0, bv, zs, use_blas);
      Tc.logits(tid, v0, bv, zt, use_blas);
      tile_stats(zs, zt, nc, bv, inv_t, rs);
      for (int64_t i = 0; i < nc; ++i) {
        double lab = 0.0;
        if (track_label) {
          const int64_t c = lab_chunk[i] - v0;
          if (c >= 0 && c < bv) lab = zs[i * bv + c];
        }
        merge(st[i], Stats::of(rs[i], lab), REV, CE_SEP);
      }
    }
    if (S.bf16 || Tc.bf16) brgemm_done();
  });
}

std::vector<at::Tensor> fused_kd_forward(const at::Tensor& hs, const at::Tensor& ws,
                                         const at::Tensor& ht, const at::Tensor& wt,
                                         const at::Tensor& labels, double inv_temperature,
                                         bool reverse, int64_t ignore_index, int64_t vocab_size,
                                         bool compute_ce, const Xform& xs, const Xform& xt) {
  const char* fn = "fused_kd_forward";
  at::Tensor lab = check_common(hs, ws, ht, wt, labels, inv_temperature, vocab_size, fn);
  check_transform(xs, "student", fn);
  check_transform(xt, "teacher", fn);
  const int64_t N = hs.size(0), V = vocab_size;
  TORCH_CHECK(!compute_ce || lab.defined() || N == 0, fn, ": compute_ce=True needs labels");
  const bool has_labels = lab.defined();
  if (compute_ce && has_labels) check_label_range(lab, ignore_index, V, fn);

  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor kl = at::empty({N}, fopt), ent = at::empty({N}, fopt);
  at::Tensor lse_s = at::empty({N}, fopt), lse_t = at::empty({N}, fopt);
  at::Tensor ce = compute_ce ? at::empty({N}, fopt) : at::empty({0}, fopt);
  at::Tensor lse1 = compute_ce ? at::empty({N}, fopt) : at::empty({0}, fopt);
  if (N == 0) return {kl, ent, lse_s, lse_t, ce, lse1};

  const float inv_t = static_cast<float>(inv_temperature);
  const bool ce_sep = compute_ce && inv_t != 1.f;
  const bool track_label = compute_ce;
  const bool use_blas = blas_available();
  const bool nested = at::in_parallel_region();
  const int T = nested ? 1 : std::max(1, at::get_num_threads());
  const int64_t nc_max = std::min(N, kChunkN);
  const TileKernels& K = tiles();
  Side S(hs, ws, T, nc_max, K), Tc(ht, wt, T, nc_max, K);
  S.set_transform(xs, false, T, nc_max);
  Tc.set_transform(xt, false, T, nc_max);
  std::vector<float> tiles(static_cast<size_t>(T) * 2 * nc_max * kBlockV);
  std::vector<TileRowStats> row_stats(static_cast<size_t>(T) * nc_max);
  const Groups gr = make_groups((V + kBlockV - 1) / kBlockV, T, 0);
  std::vector<Stats> slots(static_cast<size_t>(gr.G) * nc_max);

  const int64_t* labp = has_labels ? lab.data_ptr<int64_t>() : nullptr;
  float* klp = kl.data_ptr<float>();
  float* entp = ent.data_ptr<float>();
  float* lsp = lse_s.data_ptr<float>();
  float* ltp = lse_t.data_ptr<float>();
  float* cep = compute_ce ? ce.data_ptr<float>() : nullptr;
  float* l1p = compute_ce ? lse1.data_ptr<float>() : nullptr;

  for (int64_t n0 = 0; n0 < N; n0 += kChunkN) {
    const int64_t nc = std::min(kChunkN, N - n0);
    S.set_chunk(n0, nc);
    Tc.set_chunk(n0, nc);
    for (auto& s : slots) s.reset();
    const int64_t* lab_chunk = labp ? labp + n0 : nullptr;
#define E3_FWD_CALL(R, C)                                                                    \
  forward_chunk_tiles<R, C>(S, Tc, nc, V, inv_t, lab_chunk, track_label, gr, tiles, row_stats, \
                            slots, nc_max, nested, T, use_blas)
    if (reverse) {
      if (ce_sep) E3_FWD_CALL(true, true); else E3_FWD_CALL(true, false);
    } else {
      if (ce_sep) E3_FWD_CALL(false, true); else E3_FWD_CALL(false, false);
    }
#undef E3_FWD_CALL
    for (int64_t i = 0; i < nc; ++i) {
      Stats s = slots[i];
      for (int64_t g = 1; g < gr.G; ++g) merge(s, slots[g * nc_max + i], reverse, ce_sep);
      const int64_t r = n0 + i;
      const double log_ls = std::log(s.ls), log_lt = std::log(s.lt);
      const double lse_s_d = s.ms + log_ls, lse_t_d = s.mt + log_lt;
      lsp[r] = static_cast<float>(lse_s_d);
      ltp[r] = static_cast<float>(lse_t_d);
      const bool valid = !labp || labp[r] != ignore_index;
      double h = 0.0, k = 0.0;
      if (valid) {
        if (s.lt > 0.0) h = log_lt - s.at / s.lt;
        if (reverse) {
          if (s.ls > 0.0) k = s.k / s.ls - log_ls + log_lt + (static_cast<double>(s.mt) - s.ms);
        } else {
          if (s.lt > 0.0) k = s.k / s.lt - log_lt + log_ls + (static_cast<double>(s.ms) - s.mt);
        }
      }
      klp[r] = static_cast<float>(k);
      entp[r] = static_cast<float>(h);
      if (compute_ce) {
        // Unscaled lse: its own statistics when T != 1, else identical to the student's.
        const double l1 = ce_sep ? s.m1 + std::log(s.l1) : lse_s_d;
        l1p[r] = static_cast<float>(l1);
        cep[r] = valid ? static_cast<float>(l1 - s.lab) : 0.f;
      }
    }
  }
  return {kl, ent, lse_s, lse_t, ce, lse1};
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
// Gradient GEMMs of a bf16 student (bf16 route): dz is rounded to bf16 once per tile (the
// GEMM inputs), the products are exact in fp32 and every sum stays in fp32 (the grad_hs slots
// and grad_ws are fp32 accumulators; nothing is accumulated in bf16 across vocab blocks).
struct Bf16Grad {
  int64_t Ds = 0, ncp = 0, dz_stride = 0, dzt_stride = 0;
  std::vector<bf16_t> hpack;            // hs chunk as B[K = ncp, N = Ds] (VNNI-2), for grad_ws
  std::vector<bf16_t> dz, dzt, wpack;   // per thread: dz [nc, bvp], dz^T [bv, ncp], ws block B

  void init(const Side& S, int T, int64_t nc_max, bool need_grad_ws) {
    Ds = S.D;
    const int64_t ncp_max = nc_max + nc_max % 2;
    dz_stride = nc_max * kBlockV;
    dzt_stride = kBlockV * ncp_max;
    if (need_grad_ws) hpack.resize(static_cast<size_t>(ncp_max * Ds));
    dz.resize(static_cast<size_t>(T * dz_stride));
    dzt.resize(static_cast<size_t>(T * dzt_stride));
    wpack.resize(static_cast<size_t>(T) * kBlockV * Ds);  // kBlockV is even: bvp <= kBlockV
  }

  void set_chunk(const Side& S, int64_t n0, int64_t nc, bool need_grad_ws) {
    ncp = nc + nc % 2;
    if (need_grad_ws) S.K.pack_rows_k(S.h.bf16, Ds, n0, nc, hpack.data());
  }

  // acc [nc, Ds] (+)= dz ws[v0 : v0 + bv];  gws[v0 : v0 + bv] += dz^T hs_chunk.
  void run(int tid, const Side& S, const float* z, int64_t nc, int64_t v0, int64_t bv,
           bool first, float* acc, float* gws) {
    const int64_t bvp = bv + bv % 2;
    bf16_t* a = dz.data() + tid * dz_stride;
    bf16_t* a_t = dzt.data() + tid * dzt_stride;
    bf16_t* bw = wpack.data() + static_cast<int64_t>(tid) * kBlockV * Ds;
    S.K.round_to_bf16(z, bv, nc, bv, a, bvp, bvp != bv);
    int64_t r0 = 0;
    const bf16_t* wrows = S.last_block_bf16(tid, v0, r0);  // rounded by S.logits this block
    S.K.pack_rows_k(wrows, Ds, r0, bv, bw);
    brgemm_bf16(nc, Ds, bvp, bvp, Ds, Ds, !first, a, bw, acc);
    if (gws != nullptr) {
      S.K.transpose32_to_bf16(reinterpret_cast<const char*>(z), bv * 4, nc, bv, a_t, ncp);
      if (ncp != nc) {
        for (int64_t v = 0; v < bv; ++v) a_t[v * ncp + nc] = 0;
      }
      brgemm_bf16(bv, Ds, ncp, ncp, Ds, Ds, true, a_t, hpack.data(), gws + v0 * Ds);
    }
  }
};

template <bool REV, int CE>
void backward_chunk_tiles(Side& S, Side& Tc, int64_t nc, int64_t V, float inv_t,
                          const RowCoef* coef, bool need_t, float* gws, const Groups& gr,
                          std::vector<float>& tiles, std::vector<float>& acc, Bf16Grad& bg,
                          int64_t nc_max, bool nested, int T, bool use_blas) {
  const int64_t Ds = S.D;
  const auto tile_grad = S.K.tile_grad[REV][CE];
  run_groups(gr, nested, T, [&](int tid, int64_t g) {
    float* zs = tiles.data() + static_cast<int64_t>(tid) * 2 * nc_max * kBlockV;
    float* zt = zs + nc_max * kBlockV;
    float* acc_g = acc.data() + g * nc_max * Ds;
    for (int64_t vb = gr.lo(g); vb < gr.hi(g); ++vb) {
      const int64_t v0 = vb * kBlockV, bv = std::min(kBlockV, V - v0);
      const float* wsb = S.logits(tid, v0, bv, zs, use_blas);
      if (need_t) Tc.logits(tid, v0, bv, zt, use_blas);
      tile_grad(zs, zt, nc, bv, v0, inv_t, coef, need_t);
      if (S.xf) S.K.scale_grad(zs, nc * bv, S.deriv(tid), S.scale);  // d/dy -> d/dr
      // grad_hs slot of this group (+)= dz ws_blk ; grad_ws[blk] += dz^T hs_chunk
      const bool first = vb == gr.lo(g);
      if (S.bf16) {
        bg.run(tid, S, zs, nc, v0, bv, first, acc_g, gws);
        continue;
      }
      gemm_rm(false, false, nc, Ds, bv, zs, bv, wsb, Ds, first ? 0.f : 1.f, acc_g, Ds, use_blas);
      if (gws != nullptr) {
        gemm_rm(true, false, bv, Ds, nc, zs, bv, S.h32, Ds, 1.f, gws + v0 * Ds, Ds, use_blas);
      }
    }
    if (S.bf16 || Tc.bf16) brgemm_done();
  });
}

std::vector<at::Tensor> fused_kd_backward(
    const at::Tensor& grad_kl, const at::Tensor& grad_ce, const at::Tensor& hs,
    const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt, const at::Tensor& labels,
    const at::Tensor& student_lse, const at::Tensor& teacher_lse, const at::Tensor& kl,
    const at::Tensor& student_lse_t1, double inv_temperature, bool reverse, int64_t ignore_index,
    int64_t vocab_size, bool need_grad_ws, const Xform& xs, const Xform& xt) {
  const char* fn = "fused_kd_backward";
  at::Tensor lab = check_common(hs, ws, ht, wt, labels, inv_temperature, vocab_size, fn);
  check_transform(xs, "student", fn);
  check_transform(xt, "teacher", fn);
  const int64_t N = hs.size(0), V = vocab_size;
  const bool has_labels = lab.defined();
  at::Tensor gkl = check_row_vector(grad_kl, N, "grad_kl", fn);
  at::Tensor lss = check_row_vector(student_lse, N, "student_lse", fn);
  at::Tensor lst = check_row_vector(teacher_lse, N, "teacher_lse", fn);
  at::Tensor klv = check_row_vector(kl, N, "kl", fn);
  const bool has_ce = grad_ce.defined() && grad_ce.numel() > 0;
  at::Tensor gce, l1v;
  if (has_ce) {
    gce = check_row_vector(grad_ce, N, "grad_ce", fn);
    l1v = check_row_vector(student_lse_t1, N, "student_lse_t1", fn);
    TORCH_CHECK(has_labels, fn, ": grad_ce given but labels are empty");
    check_label_range(lab, ignore_index, V, fn);
  }

  at::Tensor grad_hs = at::zeros(hs.sizes(), hs.options().dtype(hs.scalar_type()));
  at::Tensor grad_ws = need_grad_ws ? at::zeros({ws.size(0), ws.size(1)}, at::TensorOptions().dtype(at::kFloat))
                                    : at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  if (N == 0) return {grad_hs, grad_ws};

  const float inv_t = static_cast<float>(inv_temperature);
  const bool use_blas = blas_available();
  const bool nested = at::in_parallel_region();
  const int T = nested ? 1 : std::max(1, at::get_num_threads());
  const int64_t nc_max = std::min(N, kChunkN);
  const TileKernels& K = tiles();
  Side S(hs, ws, T, nc_max, K), Tc(ht, wt, T, nc_max, K);
  S.set_transform(xs, true, T, nc_max);
  Tc.set_transform(xt, false, T, nc_max);
  const int64_t Ds = S.D;
  Bf16Grad bg;
  if (S.bf16) bg.init(S, T, nc_max, need_grad_ws);
  std::vector<float> tiles(static_cast<size_t>(T) * 2 * nc_max * kBlockV);
  const Groups gr = make_groups((V + kBlockV - 1) / kBlockV, T, nc_max * Ds * 4);
  std::vector<float> acc(static_cast<size_t>(gr.G) * nc_max * Ds);
  std::vector<RowCoef> coef(nc_max);

  const int64_t* labp = has_labels ? lab.data_ptr<int64_t>() : nullptr;
  const float* gklp = gkl.data_ptr<float>();
  const float* gcep = has_ce ? gce.data_ptr<float>() : nullptr;
  const float* lssp = lss.data_ptr<float>();
  const float* lstp = lst.data_ptr<float>();
  const float* klp = klv.data_ptr<float>();
  const float* l1p = has_ce ? l1v.data_ptr<float>() : nullptr;
  float* gws = need_grad_ws ? grad_ws.data_ptr<float>() : nullptr;
  const auto fopt = at::TensorOptions().dtype(at::kFloat);

  for (int64_t n0 = 0; n0 < N; n0 += kChunkN) {
    const int64_t nc = std::min(kChunkN, N - n0);
    bool any_kl = false, any_ce = false;
    for (int64_t i = 0; i < nc; ++i) {
      const int64_t r = n0 + i;
      const bool valid = !labp || labp[r] != ignore_index;
      RowCoef& c = coef[i];
      c.c_kl = valid ? gklp[r] * inv_t : 0.f;
      c.c_ce = (valid && has_ce) ? gcep[r] : 0.f;
      // lse = -inf only when every logit is -inf: then p = 0 everywhere (use 0, not NaN).
      c.lse_s = std::isinf(lssp[r]) && lssp[r] < 0 ? 0.f : lssp[r];
      c.lse_t = std::isinf(lstp[r]) && lstp[r] < 0 ? 0.f : lstp[r];
      c.kl = klp[r];
      c.lse1 = has_ce ? (std::isinf(l1p[r]) && l1p[r] < 0 ? 0.f : l1p[r]) : 0.f;
      c.label = (has_ce && valid) ? labp[r] : -1;
      any_kl = any_kl || c.c_kl != 0.f;
      any_ce = any_ce || c.c_ce != 0.f;
    }
    if (!any_kl && !any_ce) continue;  // e.g. an all-ignored chunk: its gradient is zero
    S.set_chunk(n0, nc);
    if (any_kl) Tc.set_chunk(n0, nc);
    if (S.bf16) bg.set_chunk(S, n0, nc, need_grad_ws);
    // CE mode: 1 = the unscaled softmax equals the scaled one (T == 1), 2 = separate.
    const int ce_mode = !any_ce ? 0 : (inv_t == 1.f ? 1 : 2);
#define E3_BWD_CALL(R, C)                                                                       \
  backward_chunk_tiles<R, C>(S, Tc, nc, V, inv_t, coef.data(), any_kl, gws, gr, tiles, acc, bg, \
                             nc_max, nested, T, use_blas)
    if (reverse) {
      if (ce_mode == 0) E3_BWD_CALL(true, 0);
      else if (ce_mode == 1) E3_BWD_CALL(true, 1);
      else E3_BWD_CALL(true, 2);
    } else {
      if (ce_mode == 0) E3_BWD_CALL(false, 0);
      else if (ce_mode == 1) E3_BWD_CALL(false, 1);
      else E3_BWD_CALL(false, 2);
    }
#undef E3_BWD_CALL
    // grad_hs[chunk] = sum of the group slots (fixed order).
    at::Tensor slots_t = at::from_blob(acc.data(), {gr.G, nc_max, Ds}, fopt).narrow(1, 0, nc);
    grad_hs.narrow(0, n0, nc).copy_(slots_t.sum(0));
  }
  return {grad_hs, grad_ws};
}

// TORCH_CHECK failures reach Python as RuntimeError with the message only (no C++ backtrace).
std::vector<at::Tensor> forward_entry(const at::Tensor& hs, const at::Tensor& ws,
                                      const at::Tensor& ht, const at::Tensor& wt,
                                      const at::Tensor& labels, double inv_temperature,
                                      bool reverse, int64_t ignore_index, int64_t vocab_size,
                                      bool compute_ce, double student_scale,
                                      std::optional<double> student_softcap, double teacher_scale,
                                      std::optional<double> teacher_softcap) {
  try {
    return fused_kd_forward(hs, ws, ht, wt, labels, inv_temperature, reverse, ignore_index,
                            vocab_size, compute_ce, Xform{student_scale, student_softcap},
                            Xform{teacher_scale, teacher_softcap});
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

std::vector<at::Tensor> backward_entry(
    const at::Tensor& grad_kl, const at::Tensor& grad_ce, const at::Tensor& hs,
    const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt, const at::Tensor& labels,
    const at::Tensor& student_lse, const at::Tensor& teacher_lse, const at::Tensor& kl,
    const at::Tensor& student_lse_t1, double inv_temperature, bool reverse, int64_t ignore_index,
    int64_t vocab_size, bool need_grad_ws, double student_scale,
    std::optional<double> student_softcap, double teacher_scale,
    std::optional<double> teacher_softcap) {
  try {
    return fused_kd_backward(grad_kl, grad_ce, hs, ws, ht, wt, labels, student_lse, teacher_lse,
                             kl, student_lse_t1, inv_temperature, reverse, ignore_index,
                             vocab_size, need_grad_ws, Xform{student_scale, student_softcap},
                             Xform{teacher_scale, teacher_softcap});
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

pybind11::dict kernel_info() {
  pybind11::dict d;
  d["chunk_n"] = kChunkN;
  d["block_v"] = kBlockV;
  d["gemm"] = blas_available() ? "sgemm_ (torch's BLAS)" : "at::mm_out";
  d["isa"] = tiles().isa;
  const std::string why = bf16_gemm_off_reason();
  d["gemm_bf16"] = why.empty() ? std::string("cpublas::brgemm (oneDNN, bf16 x bf16 -> fp32)")
                               : "off: " + why;
  return d;
}

bool set_bf16_gemm(bool enabled) { return g_bf16_gemm_enabled.exchange(enabled); }

}  // namespace

void register_fused_kd(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("fused_kd_forward", &forward_entry,
        "Fused linear KD forward (CPU). Returns [kl, teacher_entropy, student_lse, teacher_lse, "
        "ce, student_lse_t1], all [N] fp32 (ce and student_lse_t1 empty unless compute_ce).",
        py::arg("hs"), py::arg("ws"), py::arg("ht"), py::arg("wt"), py::arg("labels"),
        py::arg("inv_temperature"), py::arg("reverse"), py::arg("ignore_index"),
        py::arg("vocab_size"), py::arg("compute_ce"), py::arg("student_scale") = 1.0,
        py::arg("student_softcap") = py::none(), py::arg("teacher_scale") = 1.0,
        py::arg("teacher_softcap") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("fused_kd_backward", &backward_entry,
        "Fused linear KD backward (CPU). Returns [grad_hs (dtype of hs), grad_ws fp32 [Vs, Ds] "
        "(rows >= vocab_size zero; empty unless need_grad_ws)].",
        py::arg("grad_kl"), py::arg("grad_ce"), py::arg("hs"), py::arg("ws"), py::arg("ht"),
        py::arg("wt"), py::arg("labels"), py::arg("student_lse"), py::arg("teacher_lse"),
        py::arg("kl"), py::arg("student_lse_t1"), py::arg("inv_temperature"), py::arg("reverse"),
        py::arg("ignore_index"), py::arg("vocab_size"), py::arg("need_grad_ws"),
        py::arg("student_scale") = 1.0, py::arg("student_softcap") = py::none(),
        py::arg("teacher_scale") = 1.0, py::arg("teacher_softcap") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_kd_info", &kernel_info, "Tile sizes and GEMM routes of the fused KD CPU kernel.");
  m.def("fused_kd_set_bf16_gemm", &set_bf16_gemm,
        "Enable (default) or disable the bf16 x bf16 -> fp32 GEMM route for sides whose hidden "
        "states and head are both bf16 (disabled: fp32 sgemm on converted values). Returns the "
        "previous setting. Process-wide.",
        py::arg("enabled"));
}

E3_REGISTER(register_fused_kd);

namespace {
// Dispatcher entry points (torch.ops.e3kernels.*): any strides, labels optional; the optional
// outputs are a fixed set (ce / student_lse_t1 are [0] unless compute_ce, grad_ws is [0]
// unless need_grad_ws), see docs/dispatcher_ops.md.
at::Tensor opt_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt,
    const std::optional<at::Tensor>& labels, double inv_temperature, bool reverse,
    int64_t ignore_index, int64_t vocab_size, bool compute_ce, double student_scale,
    std::optional<double> student_softcap, double teacher_scale,
    std::optional<double> teacher_softcap) {
  auto r = fused_kd_forward(hs.contiguous(), ws.contiguous(), ht.contiguous(), wt.contiguous(),
                            opt_or_empty(labels), inv_temperature, reverse, ignore_index,
                            vocab_size, compute_ce, Xform{student_scale, student_softcap},
                            Xform{teacher_scale, teacher_softcap});
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

std::tuple<at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_kl, const std::optional<at::Tensor>& grad_ce, const at::Tensor& hs,
    const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt,
    const std::optional<at::Tensor>& labels, const at::Tensor& student_lse,
    const at::Tensor& teacher_lse, const at::Tensor& kl,
    const std::optional<at::Tensor>& student_lse_t1, double inv_temperature, bool reverse,
    int64_t ignore_index, int64_t vocab_size, bool need_grad_ws, double student_scale,
    std::optional<double> student_softcap, double teacher_scale,
    std::optional<double> teacher_softcap) {
  auto r = fused_kd_backward(grad_kl, opt_or_empty(grad_ce), hs.contiguous(), ws.contiguous(),
                             ht.contiguous(), wt.contiguous(), opt_or_empty(labels), student_lse,
                             teacher_lse, kl, opt_or_empty(student_lse_t1), inv_temperature,
                             reverse, ignore_index, vocab_size, need_grad_ws,
                             Xform{student_scale, student_softcap},
                             Xform{teacher_scale, teacher_softcap});
  return {r[0], r[1]};
}
}  // namespace

}  // namespace fused_kd
}  // namespace e3

TORCH_LIBRARY_FRAGMENT(e3kernels, m) {
  m.def(
      "fused_kd_forward(Tensor hs, Tensor ws, Tensor ht, Tensor wt, Tensor? labels, "
      "float inv_temperature, bool reverse, int ignore_index, int vocab_size, bool compute_ce, "
      "float student_scale=1., float? student_softcap=None, float teacher_scale=1., "
      "float? teacher_softcap=None) "
      "-> (Tensor kl, Tensor teacher_entropy, Tensor student_lse, Tensor teacher_lse, "
      "Tensor ce, Tensor student_lse_t1)");
  m.def(
      "fused_kd_backward(Tensor grad_kl, Tensor? grad_ce, Tensor hs, Tensor ws, Tensor ht, "
      "Tensor wt, Tensor? labels, Tensor student_lse, Tensor teacher_lse, Tensor kl, "
      "Tensor? student_lse_t1, float inv_temperature, bool reverse, int ignore_index, "
      "int vocab_size, bool need_grad_ws, float student_scale=1., float? student_softcap=None, "
      "float teacher_scale=1., float? teacher_softcap=None) -> (Tensor grad_hs, Tensor grad_ws)");
}

TORCH_LIBRARY_IMPL(e3kernels, CPU, m) {
  m.impl("fused_kd_forward", &e3::fused_kd::forward_op);
  m.impl("fused_kd_backward", &e3::fused_kd::backward_op);
}
