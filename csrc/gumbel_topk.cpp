// Gumbel-TopK CPU kernels (issue 3): forward / backward with a straight-through gradient.
//
// Semantics: e3kernels.reference.gumbel_topk_ref (read its docstring for the maths).
//   g[r, c] = -log(-log u), u = (2 (x >> 9) + 1) 2^-24,
//   x = Philox4x32-10(ctr = (c >> 2, r, off_lo, off_hi), key = (seed_lo, seed_hi))[c & 3]
//   z = alpha + g (fp32; fp64 for fp64 logits), y = z / tau, m = top-k of z (ties -> lower c)
//   relaxation 0 "softmax": a^0 = y, p^j = softmax(a^{j-1}),
//                           a^j = a^{j-1} + log(max(1 - p^j, 2^-126)) / tau, s = sum_{j<=k} p^j
//                           (s = 1 if k = L)
//   relaxation 1 "sigmoid": s = sigmoid(y - (y[ik] + y[ik1]) / 2), ik / ik1 the k-th / (k+1)-th
// The noise is bit-identical to the torch reference and the Triton kernels: it uses IEEE
// +, -, * in a fixed order (a Cephes log polynomial) compiled without FMA contraction.
// OpenMP over rows; each row is handled by one thread with small per-thread scratch.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "registry.h"

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr double kEps = 1.1754943508222875e-38;          // 2^-126, successive-softmax clamp

// Philox4x32-10 of counters (j, row, off_lo, off_hi), j = 0..n4-1, into out[4 j + lane].
// 16 counters at a time in SIMD lanes.
void philox_row(uint32_t* out, int64_t n4, uint32_t row, uint32_t key0, uint32_t key1,
                uint32_t off_lo, uint32_t off_hi) {
  constexpr int W = 16;
  for (int64_t j0 = 0; j0 < n4; j0 += W) {
    uint32_t o0[W], o1[W], o2[W], o3[W];
#pragma omp simd
    for (int jj = 0; jj < W; ++jj) {
      uint32_t c0 = static_cast<uint32_t>(j0 + jj), c1 = row, c2 = off_lo, c3 = off_hi;
      uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
      for (int r = 0; r < 10; ++r) {
        const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
        const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
        c1 = static_cast<uint32_t>(p1);
        c3 = static_cast<uint32_t>(p0);
        c0 = n0;
        c2 = n2;
        k0 += kW0;
        k1 += kW1;
      }
      o0[jj] = c0;
      o1[jj] = c1;
      o2[jj] = c2;
      o3[jj] = c3;
    }
    const int64_t nb = std::min<int64_t>(W, n4 - j0);
    for (int64_t jj = 0; jj < nb; ++jj) {
      uint32_t* o = out + 4 * (j0 + jj);
      o[0] = o0[jj];
      o[1] = o1[jj];
      o[2] = o2[jj];
      o[3] = o3[jj];
    }
  }
}

// bit casts as macros: functions compiled with other optimize options would not be inlined
#define f2i(x) __builtin_bit_cast(int32_t, static_cast<float>(x))
#define i2f(i) __builtin_bit_cast(float, static_cast<int32_t>(i))

// ---- bit-exact region: no FMA contraction (GNU C++ defaults to -ffp-contract=fast) -------
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// == reference.e3_logf_ref op for op: log of a positive normal float.
inline float e3_logf_exact(float x) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int32_t bits = f2i(x);
  int32_t e = (bits >> 23) - 126;
  const float m = i2f((bits & 0x007FFFFF) | 0x3F000000);
  const bool small = m < 0.7071067690849304f;
  e = small ? e - 1 : e;
  const float f = small ? (m + m) - 1.0f : m - 1.0f;
  const float z = f * f;
  float p = f * 0.07037683576345444f;
  p = p + -0.11514610052108765f;
  p = p * f;
  p = p + 0.11676998436450958f;
  p = p * f;
  p = p + -0.12420140951871872f;
  p = p * f;
  p = p + 0.14249323308467865f;
  p = p * f;
  p = p + -0.16668057441711426f;
  p = p * f;
  p = p + 0.2000071406364441f;
  p = p * f;
  p = p + -0.24999994039535522f;
  p = p * f;
  p = p + 0.3333333134651184f;
  const float pf = p * f;
  float y = pf * z;
  const float fe = static_cast<float>(e);
  const float t1 = fe * -0.00021219444170128554f;
  y = y + t1;
  const float t2 = z * -0.5f;
  y = y + t2;
  const float r = f + y;
  const float t3 = fe * 0.693359375f;
  return r + t3;
}

inline float gumbel_from_bits_exact(uint32_t x) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const float u = static_cast<float>(static_cast<int32_t>((x >> 9) * 2u + 1u)) * 5.9604644775390625e-08f;
  return -e3_logf_exact(-e3_logf_exact(u));
}

__attribute__((noinline)) void gumbel_from_bits_row(const uint32_t* bits, float* g, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = gumbel_from_bits_exact(bits[i]);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
// ---- end of the bit-exact region ---------------------------------------------------------

struct NoiseKey {
  uint32_t k0, k1, off_lo, off_hi;
  NoiseKey(uint64_t seed, uint64_t offset)
      : k0(static_cast<uint32_t>(seed)), k1(static_cast<uint32_t>(seed >> 32)),
        off_lo(static_cast<uint32_t>(offset)), off_hi(static_cast<uint32_t>(offset >> 32)) {}
};

// g[0..L) for one row; bits is scratch of 4 * ceil(L / 4).
inline void noise_row(const NoiseKey& key, int64_t row, int64_t L, uint32_t* bits, float* g) {
  philox_row(bits, (L + 3) / 4, static_cast<uint32_t>(row), key.k0, key.k1, key.off_lo,
             key.off_hi);
  gumbel_from_bits_row(bits, g, L);
}

// Order-preserving uint32 key of a float (-0 keyed as +0, so that they tie like floats).
inline uint32_t order_key(float z) {
  const uint32_t u = static_cast<uint32_t>(f2i(z == 0.0f ? 0.0f : z));
  return (u >> 31) ? ~u : (u | 0x80000000u);
}

// Top-k of z (ties -> lower index). Sets sel[i] in {0, 1} and the pivots ik (k-th largest,
// -1 if k == 0) and ik1 ((k+1)-th largest, -1 if k == L).
// fp32: radix select on the keys (32 counting passes, SIMD), like the Triton kernel.
inline void select_topk(const float* z, int64_t L, int64_t k, int32_t* scratch, uint8_t* sel,
                        int32_t& ik, int32_t& ik1) {
  uint32_t* key = reinterpret_cast<uint32_t*>(scratch);
  ik = -1;
  ik1 = -1;
  if (k == 0 || k == L) {
    std::fill(sel, sel + L, k == 0 ? 0 : 1);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) key[i] = order_key(z[i]);
  uint32_t thr = 0;  // -> the largest t with #(key >= t) >= k: the k-th largest key
  bool exact = false;
  for (int b = 31; b >= 0 && !exact; --b) {
    const uint32_t cand = thr | (1u << b);
    int cnt = 0;
#pragma omp simd reduction(+ : cnt)
    for (int64_t i = 0; i < L; ++i) cnt += key[i] >= cand ? 1 : 0;
    if (cnt >= k) {
      thr = cand;
      exact = cnt == k;  // {key >= thr} is already the top k: stop early
    }
  }
  if (exact) {
    uint32_t lo = 0xFFFFFFFFu, hi = 0;
    for (int64_t i = 0; i < L; ++i) {
      const uint8_t s = key[i] >= thr;
      sel[i] = s;
      if (s && key[i] <= lo) {  // the last of the smallest selected keys
        lo = key[i];
        ik = static_cast<int32_t>(i);
      }
      if (!s && (ik1 < 0 || key[i] > hi)) {  // the first of the largest unselected keys
        hi = key[i];
        ik1 = static_cast<int32_t>(i);
      }
    }
    return;
  }
  int n_gt = 0;
#pragma omp simd reduction(+ : n_gt)
  for (int64_t i = 0; i < L; ++i) n_gt += key[i] > thr ? 1 : 0;
  int64_t need = k - n_gt;  // >= 1: ties at the threshold, taken in index order
  for (int64_t i = 0; i < L; ++i) {
    uint8_t s = key[i] > thr;
    if (key[i] == thr && need > 0) {
      s = 1;
      --need;
      ik = static_cast<int32_t>(i);
    }
    sel[i] = s;
  }
  uint32_t best = 0;
  for (int64_t i = 0; i < L; ++i)
    if (!sel[i] && (ik1 < 0 || key[i] > best)) {
      ik1 = static_cast<int32_t>(i);
      best = key[i];
    }
}

// fp64 (tests, gradcheck): nth_element with the same order. order: scratch [L].
inline void select_topk(const double* z, int64_t L, int64_t k, int32_t* order, uint8_t* sel,
                        int32_t& ik, int32_t& ik1) {
  std::fill(sel, sel + L, 0);
  ik = -1;
  ik1 = -1;
  if (k == 0) return;
  if (k == L) {
    std::fill(sel, sel + L, 1);
    return;
  }
  using T = double;
  std::iota(order, order + L, 0);
  auto before = [z](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
  std::nth_element(order, order + k, order + L, before);
  ik1 = order[k];
  ik = *std::max_element(order, order + k, before);  // the one ranked last among the top k
  for (int64_t j = 0; j < k; ++j) sel[order[j]] = 1;
}

// ---- relaxation maths: vectorizable, so compiled without -ftrapping-math (GCC will not
// if-convert guarded float ops otherwise). Entry points are noinline. ----------------------
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
// templates are instantiated after pop_options: they carry the option as an attribute
#define E3_RELAX __attribute__((optimize("no-trapping-math")))
#else
#define E3_RELAX
#endif

// Fast vectorizable exp / log for the relaxation (accuracy ~1-2 ulp; not part of the exact
// contract). double uses libm.
inline float fast_exp(float x) {
  const float xl = x > -87.0f ? x : -87.0f;
  const float xc = xl < 88.0f ? xl : 88.0f;
  // round to nearest by the 1.5 * 2^23 trick (std::floor does not vectorize without
  // -fno-trapping-math)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const float scale = i2f((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

inline float fast_log(float x) {  // positive normal x
  const int32_t bits = f2i(x);
  int32_t e = (bits >> 23) - 126;
  const float m = i2f((bits & 0x007FFFFF) | 0x3F000000);
  const bool small = m < 0.7071067690849304f;
  e = small ? e - 1 : e;
  const float f = small ? (m + m) - 1.0f : m - 1.0f;
  const float z = f * f;
  float p = 0.07037683576345444f;
  p = p * f - 0.11514610052108765f;
  p = p * f + 0.11676998436450958f;
  p = p * f - 0.12420140951871872f;
  p = p * f + 0.14249323308467865f;
  p = p * f - 0.16668057441711426f;
  p = p * f + 0.2000071406364441f;
  p = p * f - 0.24999994039535522f;
  p = p * f + 0.3333333134651184f;
  const float fe = static_cast<float>(e);
  float y = p * f * z + fe * -0.00021219444170128554f - 0.5f * z;
  return f + y + fe * 0.693359375f;
}
inline double fast_log(double x) { return std::log(x); }

template <typename T>
E3_RELAX inline T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

// One successive-softmax step on a[0..L): p, q = 1 - p (for a unique row max: sum of the
// other exps / Z, no cancellation), a <- a + log(max(q, eps)) / tau. Returns the index of
// the unique row max, or -1 when the max is tied.
template <typename T>
E3_RELAX __attribute__((noinline)) int64_t ss_step(T* __restrict a, T* __restrict p, T* __restrict q,
                                          int64_t L, T tau) {
  T mx = a[0];
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < L; ++i) mx = a[i] > mx ? a[i] : mx;
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) p[i] = fast_exp(a[i] - mx);
  T den = 0;
#pragma omp simd reduction(+ : den)
  for (int64_t i = 0; i < L; ++i) den += p[i];
  int nmax = 0;
#pragma omp simd reduction(+ : nmax)
  for (int64_t i = 0; i < L; ++i) nmax += a[i] == mx ? 1 : 0;
  int64_t imax = -1;
  T s1 = 0;  // sum of the other exps when the max is unique
  if (nmax == 1) {
    for (int64_t i = 0; i < L; ++i)
      if (a[i] == mx) {
        imax = i;
        break;
      }
#pragma omp simd reduction(+ : s1)
    for (int64_t i = 0; i < L; ++i) s1 += i == imax ? T(0) : p[i];
  }
  const T inv = T(1) / den;
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) {
    p[i] = p[i] * inv;
    q[i] = T(1) - p[i];
  }
  if (imax >= 0) q[imax] = s1 * inv;
  const T inv_tau = T(1) / tau;
  const T log_eps = static_cast<T>(std::log(kEps));
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) {
    const T qi = q[i];
    const bool keep = qi > T(kEps);
    a[i] += (keep ? fast_log(keep ? qi : T(1)) : log_eps) * inv_tau;
  }
  return imax;
}

// Reverse of one step: dy += J_softmax^T (v + J_logq^T (dy / tau)), computed so that the
// 1/q of the unique max cancels analytically:
//   w_i = dy_i / tau [q_i > eps],  r_i = w_i p_i / q_i,  D = sum_{i != m} r_i
//   l != m: dy_l += p_l (D + r_m - w_l / q_l) + p_l (v_l - <p, v>)
//   l == m: dy_m += p_m (D - w_m)            + p_m (v_m - <p, v>)
template <typename T>
E3_RELAX __attribute__((noinline)) void ss_vjp(T* __restrict dy, const T* __restrict p,
                                      const T* __restrict q, const T* __restrict v, int64_t L,
                                      int64_t m, T tau) {
  T d = 0, pv = 0;
  const T inv_tau = T(1) / tau;
#pragma omp simd reduction(+ : d, pv)
  for (int64_t i = 0; i < L; ++i) {
    const bool keep = q[i] > T(kEps);
    const T w = keep ? dy[i] * inv_tau : T(0);
    const T r = keep ? w * p[i] / (keep ? q[i] : T(1)) : T(0);
    d += (i == m) ? T(0) : r;
    pv += p[i] * v[i];
  }
  T rm = 0;
  if (m >= 0 && q[m] > T(kEps)) rm = dy[m] * inv_tau * p[m] / q[m];
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) {
    const bool keep = q[i] > T(kEps);
    const T w = keep ? dy[i] * inv_tau : T(0);
    const T wq = keep ? w / (keep ? q[i] : T(1)) : T(0);
    const T c = (i == m) ? p[i] * (d - w) : p[i] * (d + rm - wq);
    dy[i] += c + p[i] * (v[i] - pv);
  }
}

// Sigmoid relaxation of one row: s = sigmoid(a - t); and its VJP part w = v s (1 - s),
// returning sum(w) / 2 (subtracted at the two pivots by the caller).
template <typename T>
E3_RELAX __attribute__((noinline)) void sigmoid_row(const T* __restrict a, T t, T* __restrict s,
                                           int64_t L) {
#pragma omp simd
  for (int64_t i = 0; i < L; ++i) s[i] = sigmoid(a[i] - t);
}

template <typename T>
E3_RELAX __attribute__((noinline)) T sigmoid_vjp_row(const T* __restrict a, T t, const T* __restrict v,
                                            T* __restrict dy, int64_t L) {
  T half = 0;
#pragma omp simd reduction(+ : half)
  for (int64_t i = 0; i < L; ++i) {
    const T si = sigmoid(a[i] - t);
    dy[i] = v[i] * (si * (T(1) - si));
    half += dy[i];
  }
  return half * T(0.5);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
// ---- end of the relaxation maths -----------------------------------------------------------

template <typename scalar_t, typename T>
void forward_impl(const at::Tensor& logits, const int32_t* kr, T tau, const NoiseKey& key,
                  int64_t relax, bool want_soft, bool want_idx, int64_t k_max, at::Tensor& mask,
                  at::Tensor& soft, at::Tensor& idx, at::Tensor& piv) {
  const int64_t B = logits.size(0), L = logits.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  scalar_t* mo = mask.data_ptr<scalar_t>();
  scalar_t* so = want_soft ? soft.data_ptr<scalar_t>() : nullptr;
  int64_t* io = want_idx ? idx.data_ptr<int64_t>() : nullptr;
  int32_t* po = relax == 1 ? piv.data_ptr<int32_t>() : nullptr;
  bool bad = false;  // a non-finite logit seen
#pragma omp parallel if (B * L >= 4096)
  {
    std::vector<uint32_t> bits(4 * ((L + 3) / 4));
    std::vector<float> g(L);
    std::vector<T> z(L), a(L), p(L), q(L), s(L);
    std::vector<int32_t> order(L);
    std::vector<uint8_t> sel(L);
#pragma omp for schedule(static) reduction(|| : bad)
    for (int64_t r = 0; r < B; ++r) {
      noise_row(key, r, L, bits.data(), g.data());
      const scalar_t* xr = x + r * L;
      int nonfinite = 0;
#pragma omp simd reduction(| : nonfinite)
      for (int64_t i = 0; i < L; ++i) {
        z[i] = static_cast<T>(xr[i]) + static_cast<T>(g[i]);  // finite iff alpha is finite
        nonfinite |= std::fabs(z[i]) <= std::numeric_limits<T>::max() ? 0 : 1;
      }
      bad = bad || nonfinite != 0;
      const int64_t k = kr[r];
      int32_t ik, ik1;
      select_topk(z.data(), L, k, order.data(), sel.data(), ik, ik1);
      scalar_t* mr = mo + r * L;
      for (int64_t i = 0; i < L; ++i) mr[i] = static_cast<scalar_t>(sel[i] ? 1.0f : 0.0f);
      if (po) {
        po[2 * r] = ik;
        po[2 * r + 1] = ik1;
      }
      if (io) {
        int64_t* ir = io + r * k_max;
        int64_t n = 0;
        for (int64_t i = 0; i < L; ++i)
          if (sel[i]) ir[n++] = i;
        for (; n < k_max; ++n) ir[n] = -1;
      }
      if (!so) continue;
      for (int64_t i = 0; i < L; ++i) a[i] = z[i] / tau;
      if (relax == 1) {
        if (k == 0 || k == L) {
          std::fill(s.begin(), s.end(), k == 0 ? T(0) : T(1));
        } else {
          sigmoid_row(a.data(), (a[ik] + a[ik1]) * T(0.5), s.data(), L);
        }
      } else if (k == L) {
        std::fill(s.begin(), s.end(), T(1));
      } else {
        std::fill(s.begin(), s.end(), T(0));
        for (int64_t j = 0; j < k; ++j) {
          ss_step(a.data(), p.data(), q.data(), L, tau);
          for (int64_t i = 0; i < L; ++i) s[i] += p[i];
        }
      }
      scalar_t* sr = so + r * L;
      for (int64_t i = 0; i < L; ++i) sr[i] = static_cast<scalar_t>(s[i]);
    }
  }
  if (bad)  // pybind11 turns std::invalid_argument into ValueError
    throw std::invalid_argument(
        "logits must be finite (no NaN or +-inf), found non-finite values");
}

template <typename scalar_t, typename grad_t, typename T>
void backward_impl(const at::Tensor& logits, const int32_t* kr, const int32_t* pv,
                   const at::Tensor& grad, T tau, const NoiseKey& key, int64_t relax,
                   at::Tensor& dx) {
  const int64_t B = logits.size(0), L = logits.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const grad_t* gm = grad.data_ptr<grad_t>();
  scalar_t* dxo = dx.data_ptr<scalar_t>();
#pragma omp parallel if (B * L >= 4096)
  {
    std::vector<uint32_t> bits(4 * ((L + 3) / 4));
    std::vector<float> g(L);
    std::vector<T> a(L), v(L), dy(L), s(L);
    std::vector<T> P, Q;  // k steps of one row (softmax relaxation)
    std::vector<int64_t> M;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; ++r) {
      const int64_t k = kr[r];
      scalar_t* dr = dxo + r * L;
      if (k == 0 || k == L) {  // s is constant (0 or 1)
        for (int64_t i = 0; i < L; ++i) dr[i] = static_cast<scalar_t>(0.0f);
        continue;
      }
      noise_row(key, r, L, bits.data(), g.data());
      const scalar_t* xr = x + r * L;
      const grad_t* gr = gm + r * L;
      for (int64_t i = 0; i < L; ++i) {
        a[i] = (static_cast<T>(xr[i]) + static_cast<T>(g[i])) / tau;
        v[i] = static_cast<T>(gr[i]);
      }
      if (relax == 1) {
        const int32_t ik = pv[2 * r], ik1 = pv[2 * r + 1];
        const T half = sigmoid_vjp_row(a.data(), (a[ik] + a[ik1]) * T(0.5), v.data(), dy.data(), L);
        dy[ik] -= half;
        dy[ik1] -= half;
      } else {
        P.resize(static_cast<size_t>(k * L));
        Q.resize(static_cast<size_t>(k * L));
        M.resize(static_cast<size_t>(k));
        for (int64_t j = 0; j < k; ++j) M[j] = ss_step(a.data(), &P[j * L], &Q[j * L], L, tau);
        std::fill(dy.begin(), dy.end(), T(0));
        for (int64_t j = k - 1; j >= 0; --j)
          ss_vjp(dy.data(), &P[j * L], &Q[j * L], v.data(), L, M[j], tau);
      }
      for (int64_t i = 0; i < L; ++i) dr[i] = static_cast<scalar_t>(dy[i] / tau);
    }
  }
}

template <typename scalar_t>
using compute_t = typename std::conditional<std::is_same<scalar_t, double>::value, double,
                                            float>::type;

void check_inputs(const at::Tensor& logits, const at::Tensor& k_rows) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
              "logits must be a contiguous CPU [B, L] tensor");
  TORCH_CHECK(k_rows.device().is_cpu() && k_rows.scalar_type() == at::kInt &&
                  k_rows.dim() == 1 && k_rows.size(0) == logits.size(0) &&
                  k_rows.is_contiguous(),
              "k_per_row must be a contiguous CPU int32 [B] tensor");
  const int32_t* kr = k_rows.data_ptr<int32_t>();
  for (int64_t r = 0; r < k_rows.size(0); ++r)
    TORCH_CHECK(kr[r] >= 0 && kr[r] <= logits.size(1), "k must be in [0, L]");
}

std::vector<at::Tensor> gumbel_topk_forward(const at::Tensor& logits, const at::Tensor& k_rows,
                                            double tau, uint64_t seed, uint64_t offset,
                                            int64_t relaxation, bool want_soft,
                                            bool want_indices, int64_t k_max) {
  check_inputs(logits, k_rows);
  TORCH_CHECK(relaxation == 0 || relaxation == 1, "relaxation id must be 0 or 1");
  TORCH_CHECK(tau > 0, "tau must be > 0");
  const int64_t B = logits.size(0), L = logits.size(1);
  auto mask = at::empty({B, L}, logits.options());
  auto soft = want_soft ? at::empty({B, L}, logits.options()) : at::empty({0}, logits.options());
  auto io = logits.options().dtype(at::kLong);
  auto idx = want_indices ? at::empty({B, k_max}, io) : at::empty({0}, io);
  auto piv = at::empty({relaxation == 1 ? B : 0, 2}, logits.options().dtype(at::kInt));
  const NoiseKey key(seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gtk_fwd", [&] {
    using T = compute_t<scalar_t>;
    forward_impl<scalar_t, T>(logits, k_rows.data_ptr<int32_t>(), static_cast<T>(tau), key,
                              relaxation, want_soft, want_indices, k_max, mask, soft, idx, piv);
  });
  return {mask, soft, idx, piv};
}

at::Tensor gumbel_topk_backward(const at::Tensor& logits, const at::Tensor& k_rows,
                                const at::Tensor& pivots, const at::Tensor& grad, double tau,
                                uint64_t seed, uint64_t offset, int64_t relaxation,
                                int64_t k_max) {
  (void)k_max;
  check_inputs(logits, k_rows);
  TORCH_CHECK(relaxation == 0 || relaxation == 1, "relaxation id must be 0 or 1");
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.is_contiguous() && grad.device().is_cpu(),
              "grad must be a contiguous CPU tensor shaped like logits");
  if (relaxation == 1)
    TORCH_CHECK(pivots.scalar_type() == at::kInt && pivots.dim() == 2 &&
                    pivots.size(0) == logits.size(0) && pivots.size(1) == 2 &&
                    pivots.is_contiguous(),
                "pivots must be a contiguous int32 [B, 2] tensor");
  auto dx = at::empty_like(logits);
  const NoiseKey key(seed, offset);
  const int32_t* pv = relaxation == 1 ? pivots.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gtk_bwd", [&] {
    using T = compute_t<scalar_t>;
    using S = scalar_t;
    const T t = static_cast<T>(tau);
    switch (grad.scalar_type()) {
      case at::kFloat: backward_impl<S, float, T>(logits, k_rows.data_ptr<int32_t>(), pv, grad, t, key, relaxation, dx); break;
      case at::kDouble: backward_impl<S, double, T>(logits, k_rows.data_ptr<int32_t>(), pv, grad, t, key, relaxation, dx); break;
      case at::kHalf: backward_impl<S, at::Half, T>(logits, k_rows.data_ptr<int32_t>(), pv, grad, t, key, relaxation, dx); break;
      case at::kBFloat16: backward_impl<S, at::BFloat16, T>(logits, k_rows.data_ptr<int32_t>(), pv, grad, t, key, relaxation, dx); break;
      default: TORCH_CHECK(false, "grad dtype must be a floating type");
    }
  });
  return dx;
}

at::Tensor gumbel_noise(int64_t B, int64_t L, uint64_t seed, uint64_t offset) {
  TORCH_CHECK(B >= 0 && L >= 0, "B and L must be >= 0");
  auto out = at::empty({B, L}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const NoiseKey key(seed, offset);
#pragma omp parallel if (B * L >= 4096)
  {
    std::vector<uint32_t> bits(4 * ((L + 3) / 4));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; ++r) noise_row(key, r, L, bits.data(), o + r * L);
  }
  return out;
}

at::Tensor gumbel_from_bits(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong && x.is_contiguous(),
              "x must be a contiguous CPU int64 tensor of uint32 values");
  auto out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t* xi = x.data_ptr<int64_t>();
  std::vector<uint32_t> bits(static_cast<size_t>(x.numel()));
  for (int64_t i = 0; i < x.numel(); ++i) bits[i] = static_cast<uint32_t>(xi[i]);
  gumbel_from_bits_row(bits.data(), out.data_ptr<float>(), x.numel());
  return out;
}

void register_gumbel_topk(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gumbel_topk_forward", &gumbel_topk_forward, py::arg("logits"), py::arg("k_per_row"),
        py::arg("tau"), py::arg("seed"), py::arg("offset"), py::arg("relaxation"),
        py::arg("want_soft"), py::arg("want_indices"), py::arg("k_max"),
        py::call_guard<py::gil_scoped_release>(),
        "Gumbel-TopK forward on CPU. logits [B, L] contiguous (fp16/bf16/fp32/fp64), "
        "k_per_row int32 [B], relaxation 0 = softmax, 1 = sigmoid. Returns [mask [B, L], "
        "soft [B, L] (empty unless want_soft), indices int64 [B, k_max] (empty unless "
        "want_indices; ascending, -1 padded), pivots int32 [B, 2] (sigmoid only)].");
  m.def("gumbel_topk_backward", &gumbel_topk_backward, py::arg("logits"), py::arg("k_per_row"),
        py::arg("pivots"), py::arg("grad"), py::arg("tau"), py::arg("seed"), py::arg("offset"),
        py::arg("relaxation"), py::arg("k_max"), py::call_guard<py::gil_scoped_release>(),
        "Gumbel-TopK backward on CPU: d logits = J_s(y)^T grad / tau, noise regenerated "
        "from (seed, offset).");
  m.def("gumbel_noise", &gumbel_noise, py::arg("B"), py::arg("L"), py::arg("seed"),
        py::arg("offset"), py::call_guard<py::gil_scoped_release>(),
        "The fp32 Gumbel noise [B, L] of gumbel_topk (Philox4x32-10 counter RNG).");
  m.def("gumbel_from_bits", &gumbel_from_bits, py::arg("x"),
        py::call_guard<py::gil_scoped_release>(),
        "fp32 Gumbel noise from uint32 draws held in an int64 tensor.");
}

}  // namespace

E3_REGISTER(register_gumbel_topk);

namespace {
// Dispatcher entry points (torch.ops.e3kernels.*). seed / offset are the uint64 values
// reinterpreted as int64 (two's complement), the only integer type of a schema.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gtk_forward_op(
    const at::Tensor& logits, const at::Tensor& k_per_row, double tau, int64_t seed,
    int64_t offset, int64_t relaxation, bool want_soft, bool want_indices, int64_t k_max) {
  auto r = gumbel_topk_forward(logits.contiguous(), k_per_row.to(at::kInt).contiguous(), tau,
                               static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                               relaxation, want_soft, want_indices, k_max);
  return {r[0], r[1], r[2], r[3]};
}

at::Tensor gtk_backward_op(const at::Tensor& logits, const at::Tensor& k_per_row,
                           const std::optional<at::Tensor>& pivots, const at::Tensor& grad,
                           double tau, int64_t seed, int64_t offset, int64_t relaxation,
                           int64_t k_max) {
  at::Tensor piv = pivots.has_value() ? pivots->contiguous()
                                      : at::empty({0, 2}, logits.options().dtype(at::kInt));
  return gumbel_topk_backward(logits.contiguous(), k_per_row.to(at::kInt).contiguous(), piv,
                              grad.contiguous(), tau, static_cast<uint64_t>(seed),
                              static_cast<uint64_t>(offset), relaxation, k_max);
}

at::Tensor gtk_noise_op(int64_t B, int64_t L, int64_t seed, int64_t offset) {
  return gumbel_noise(B, L, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

at::Tensor gtk_bits_op(const at::Tensor& x) { return gumbel_from_bits(x.to(at::kLong).contiguous()); }
}  // namespace

#undef f2i
#undef i2f
#undef E3_RELAX

TORCH_LIBRARY_FRAGMENT(e3kernels, m) {
  m.def(
      "gumbel_topk_forward(Tensor logits, Tensor k_per_row, float tau, int seed, int offset, "
      "int relaxation, bool want_soft, bool want_indices, int k_max) "
      "-> (Tensor mask, Tensor soft, Tensor indices, Tensor pivots)");
  m.def(
      "gumbel_topk_backward(Tensor logits, Tensor k_per_row, Tensor? pivots, Tensor grad, "
      "float tau, int seed, int offset, int relaxation, int k_max) -> Tensor grad_logits");
  m.def("gumbel_noise(int B, int L, int seed, int offset) -> Tensor");
  m.def("gumbel_from_bits(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(e3kernels, CPU, m) {
  m.impl("gumbel_topk_forward", &gtk_forward_op);
  m.impl("gumbel_topk_backward", &gtk_backward_op);
  m.impl("gumbel_from_bits", &gtk_bits_op);
}

// gumbel_noise has no tensor argument to dispatch on: a CompositeExplicitAutograd kernel.
TORCH_LIBRARY_IMPL(e3kernels, CompositeExplicitAutograd, m) {
  m.impl("gumbel_noise", &gtk_noise_op);
}
