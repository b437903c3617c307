// Fused multi-head attention for the CPU: one call does, for every (sample, head), the scores,
// the key mask, the softmax, dropout on the weights and the product with the values (and in the
// backward call their gradients), with the head's q, k, v, scores and gradients in L1 cache.
//
// Built on first use by torch.utils.cpp_extension (seqrank/kernels.py); the Python
// kernels in attention.py are the reference it is tested against and the fallback where it
// cannot be built. Inputs are strided (B, L, H, d) views whose last axis is contiguous (q, k and
// v may be slices of one packed projection); gradients are written through views of the same
// layout, so packed projections get packed gradients without a copy.
//
// Two layouts. Padded (`forward`, `backward`): q (B, Lq, H, d); k, v (B, Lk, H, d); attend (B, Lk)
// bool, at least one true key per sample; rows (B, Lq) bool or empty (false rows get zero weights and a zero output); bits
// (B, H, Lq, Lk) int16 dropout draws or empty (keep where bits >= threshold, kept weights scaled
// by keep_scale); P (B, H, Lq, Lk) the softmax weights, saved by forward for backward. With
// `relu`, q, k and v are the pre-activations: ReLU on load, its gradient on store.
// Ragged (`forward_ragged`, `backward_ragged`): the samples' rows one after another, no padding:
// q (Rq, H, d), k, v (Rk, H, d); q_offsets, k_offsets (B + 1) int64, sample b's queries are rows
// q_offsets[b]..q_offsets[b+1] and its keys k_offsets[b]..k_offsets[b+1], every key attended (a
// sample without keys gets zero outputs); P and bits are flat, sample b's (H, Lq_b, Lk_b) block
// after sample b-1's; out (Rq, H, d). With a multiple of 8 heads and several queries a sample
// (self-attention), float32 runs the head-lanes path (8 heads a vector), and P's order inside a
// sample's block is then lane-major: P is the kernel's own, read only by the matching backward.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// exp for float with relative error ~1e-7 (2^n times a degree-6 polynomial on
// [-ln2/2, ln2/2]), branch-free so that loops over it vectorise; x <= 0 here (scores minus the
// row max), and x below -80 returns exp(-80) ~ 2e-35 instead of an exact 0 (negligible beside
// the max's 1; and a normal float: denormals would cost ~100 cycles per operation).
inline float exp_neg(float x) {
  x = x < -80.0f ? -80.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + magic;
  int32_t n;
  std::memcpy(&n, &t, sizeof n);
  n -= 0x4B400000;  // the integer in t's low mantissa bits
  float fn = t - magic;
  float r = x - fn * 0.693145751953125f - fn * 1.42860682030941723e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t e = (n + 127) << 23;
  float s;
  std::memcpy(&s, &e, sizeof s);
  return p * s;
}

inline double exp_neg(double x) { return std::exp(x); }

struct Strided {  // a (B, L, H, d) or ragged (R, H, d) view with a contiguous last axis
  int64_t b, l, h;  // ragged: b unused (0)
};

inline Strided strides_of(const at::Tensor& t, const char* name, bool ragged = false) {
  const int64_t dims = ragged ? 3 : 4;
  TORCH_CHECK(t.dim() == dims, "fused attention: ", name, " must be ",
              ragged ? "(R, H, d)" : "(B, L, H, d)", ", got ", t.sizes());
  TORCH_CHECK(t.stride(dims - 1) == 1 || t.size(dims - 1) == 1, "fused attention: ", name,
              " needs a contiguous last axis, got strides ", t.strides());
  return ragged ? Strided{0, t.stride(0), t.stride(1)} : Strided{t.stride(0), t.stride(1), t.stride(2)};
}

// where each sample's queries, keys, rows of P and outputs are, in either layout
struct Layout {
  int64_t B = 0, H = 0, d = 0;
  int64_t Lq = 0, Lk = 0;              // padded: every sample's; ragged: the longest
  const int64_t* qoff = nullptr;       // ragged: (B + 1) query row offsets, else null
  const int64_t* koff = nullptr;       // ragged: (B + 1) key row offsets
  std::vector<int64_t> poff;           // ragged: (B + 1) offsets of the samples' P blocks
  const bool* attend = nullptr;        // padded: (B, Lk) or null (every key)
  const bool* rows = nullptr;          // padded: (B, Lq) or null (every row)

  int64_t lq(int64_t b) const { return qoff ? qoff[b + 1] - qoff[b] : Lq; }
  int64_t lk(int64_t b) const { return koff ? koff[b + 1] - koff[b] : Lk; }
  // element offset of sample b's first query (key) row in a view with strides s
  int64_t qat(int64_t b, Strided s) const { return qoff ? qoff[b] * s.l : b * s.b; }
  int64_t kat(int64_t b, Strided s) const { return koff ? koff[b] * s.l : b * s.b; }
  int64_t out_row(int64_t b) const { return qoff ? qoff[b] : b * Lq; }  // in (rows, H, d)
  // offset of row i of head h of sample b in P (and in the dropout draws)
  int64_t prow(int64_t b, int64_t h, int64_t i) const {
    return qoff ? poff[b] + (h * lq(b) + i) * lk(b) : ((b * H + h) * Lq + i) * Lk;
  }
  // sample b's (Lk,) key mask and (Lq,) row mask, or null (every key, every row)
  const bool* attend_of(int64_t b) const { return attend ? attend + b * Lk : nullptr; }
  const bool* rows_of(int64_t b) const { return rows ? rows + b * Lq : nullptr; }
  // (sample, head) pairs per parallel task: ~4096 scores each
  int64_t grain() const {
    const int64_t per = qoff ? std::max<int64_t>(1, poff[B] / std::max<int64_t>(1, B * H)) : Lq * Lk;
    return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, per));
  }
};

Layout padded_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& attend,
                     const at::Tensor& rows) {
  Layout a;
  a.B = q.size(0), a.Lq = q.size(1), a.H = q.size(2), a.d = q.size(3), a.Lk = k.size(1);
  a.attend = attend.defined() && attend.numel() ? attend.data_ptr<bool>() : nullptr;
  a.rows = rows.defined() && rows.numel() ? rows.data_ptr<bool>() : nullptr;
  return a;
}

Layout ragged_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_offsets,
                     const at::Tensor& k_offsets) {
  TORCH_CHECK(q_offsets.scalar_type() == at::kLong && k_offsets.scalar_type() == at::kLong &&
                  q_offsets.is_contiguous() && k_offsets.is_contiguous() && q_offsets.dim() == 1 &&
                  q_offsets.sizes() == k_offsets.sizes() && q_offsets.numel() >= 1,
              "fused attention: q_offsets and k_offsets must be contiguous (B + 1) int64 tensors");
  Layout a;
  a.B = q_offsets.numel() - 1, a.H = q.size(1), a.d = q.size(2);
  a.qoff = q_offsets.data_ptr<int64_t>();
  a.koff = k_offsets.data_ptr<int64_t>();
  TORCH_CHECK(a.qoff[0] == 0 && a.koff[0] == 0 && a.qoff[a.B] == q.size(0) &&
                  a.koff[a.B] == k.size(0),
              "fused attention: offsets must run from 0 to the rows of q (", q.size(0),
              ") and of k (", k.size(0), ")");
  a.poff.assign(a.B + 1, 0);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t lq = a.qoff[b + 1] - a.qoff[b], lk = a.koff[b + 1] - a.koff[b];
    TORCH_CHECK(lq >= 0 && lk >= 0, "fused attention: offsets must not decrease (sample ", b, ")");
    a.Lq = std::max(a.Lq, lq), a.Lk = std::max(a.Lk, lk);
    a.poff[b + 1] = a.poff[b] + a.H * lq * lk;
  }
  return a;
}

// head h of one sample (`base`: its first row) of a strided view into a dense (L, d) buffer
// (ReLU'd with `relu`)
template <typename T>
inline void load(const T* base, Strided s, int64_t h, int64_t L, int64_t d, bool relu, T* out) {
  for (int64_t l = 0; l < L; ++l) {
    const T* src = base + l * s.l + h * s.h;
    T* dst = out + l * d;
    if (relu) {
      for (int64_t c = 0; c < d; ++c) dst[c] = std::max(src[c], T(0));
    } else {
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c];
    }
  }
}

// the same head as a dense (d, L) buffer (transposed: loops over keys run along rows)
template <typename T>
inline void load_t(const T* base, Strided s, int64_t h, int64_t L, int64_t d, bool relu, T* out) {
  for (int64_t l = 0; l < L; ++l) {
    const T* src = base + l * s.l + h * s.h;
    for (int64_t c = 0; c < d; ++c) {
      const T x = src[c];
      out[c * L + l] = relu ? std::max(x, T(0)) : x;  // branch-free: the signs are random
    }
  }
}

// a dense (L, d) gradient into a strided view (`base`, `pre`: the sample's first rows); with
// `relu`, zero where the pre-activation <= 0
template <typename T>
inline void store(const T* grad, const T* pre, Strided sp, T* base, Strided s, int64_t h,
                  int64_t L, int64_t d, bool relu) {
  for (int64_t l = 0; l < L; ++l) {
    const T* src = grad + l * d;
    T* dst = base + l * s.l + h * s.h;
    if (relu) {
      const T* x = pre + l * sp.l + h * sp.h;
      for (int64_t c = 0; c < d; ++c) dst[c] = x[c] > T(0) ? src[c] : T(0);
    } else {
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c];
    }
  }
}

template <typename T>
void forward_impl(const Layout& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  Strided sq, Strided sk, Strided sv, const at::Tensor& bits, int64_t threshold,
                  double keep_scale, double scale, bool relu, at::Tensor& out, at::Tensor& P) {
  const int64_t H = a.H, d = a.d;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int16_t* bp = bits.numel() ? bits.data_ptr<int16_t>() : nullptr;
  T* op = out.data_ptr<T>();  // (rows, H, d) contiguous
  T* pp = P.data_ptr<T>();
  const T sc = static_cast<T>(scale), ks = static_cast<T>(keep_scale);
  const int16_t thr = static_cast<int16_t>(threshold);

  at::parallel_for(0, a.B * H, a.grain(), [&](int64_t begin, int64_t end) {
    const int64_t MQ = a.Lq, MK = a.Lk;
    std::vector<T> buf(MQ * d + 2 * MK * d + 2 * MK + d);
    T* qb = buf.data();          // (Lq, d)
    T* kt = qb + MQ * d;         // (d, Lk)
    T* vb = kt + d * MK;         // (Lk, d)
    T* w = vb + MK * d;          // (Lk,) dropped weights of one row
    T* mask = w + MK;            // (Lk,) 0 at attended keys, -inf elsewhere
    T* acc = mask + MK;          // (d,)
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H, Lq = a.lq(b), Lk = a.lk(b);
      const int64_t p0 = a.prow(b, h, 0);  // row i of P (and of the draws): p0 + i * Lk
      const bool* att = a.attend_of(b);
      const bool* rows = a.rows_of(b);
      load(qp + a.qat(b, sq), sq, h, Lq, d, relu, qb);
      load_t(kp + a.kat(b, sk), sk, h, Lk, d, relu, kt);
      load(vp + a.kat(b, sv), sv, h, Lk, d, relu, vb);
      for (int64_t j = 0; j < Lk; ++j)
        mask[j] = !att || att[j] ? T(0) : -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < Lq; ++i) {
        T* s = pp + p0 + i * Lk;  // this row of P: the scores first
        T* o = op + ((a.out_row(b) + i) * H + h) * d;
        if ((rows && !rows[i]) || Lk == 0) {
          std::fill(s, s + Lk, T(0));
          std::fill(o, o + d, T(0));
          continue;
        }
        for (int64_t j = 0; j < Lk; ++j) s[j] = mask[j];
        for (int64_t c = 0; c < d; ++c) {
          const T x = qb[i * d + c] * sc;
          const T* kr = kt + c * Lk;
          for (int64_t j = 0; j < Lk; ++j) s[j] += x * kr[j];
        }
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < Lk; ++j) mx = s[j] > mx ? s[j] : mx;
        if (mx == -std::numeric_limits<T>::infinity()) {  // no key to attend: a zero row
          std::fill(s, s + Lk, T(0));
          std::fill(o, o + d, T(0));
          continue;
        }
        T sum = 0;
        for (int64_t j = 0; j < Lk; ++j) {
          const T e = exp_neg(s[j] - mx);  // masked: exp(-inf) -> ~1e-38, zeroed below
          s[j] = e;
          sum += e;
        }
        const T inv = T(1) / sum;
        for (int64_t j = 0; j < Lk; ++j) s[j] = mask[j] == T(0) ? s[j] * inv : T(0);
        if (bp) {
          const int16_t* br = bp + p0 + i * Lk;
          for (int64_t j = 0; j < Lk; ++j) w[j] = br[j] >= thr ? s[j] * ks : T(0);
        } else {
          for (int64_t j = 0; j < Lk; ++j) w[j] = s[j];
        }
        for (int64_t c = 0; c < d; ++c) acc[c] = 0;
        for (int64_t j = 0; j < Lk; ++j) {
          const T wj = w[j];
          const T* vr = vb + j * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += wj * vr[c];
        }
        for (int64_t c = 0; c < d; ++c) o[c] = acc[c];
      }
    }
  });
}

template <typename T>
void backward_impl(const Layout& a, const at::Tensor& grad, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, Strided sg, Strided sq, Strided sk,
                   Strided sv, const at::Tensor& P, const at::Tensor& bits, int64_t threshold,
                   double keep_scale, double scale, bool relu, at::Tensor& dq, Strided sdq,
                   at::Tensor& dk, Strided sdk, at::Tensor& dv, Strided sdv) {
  const int64_t H = a.H, d = a.d;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  const T* pp = P.data_ptr<T>();
  const int16_t* bp = bits.numel() ? bits.data_ptr<int16_t>() : nullptr;
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const T sc = static_cast<T>(scale), ks = static_cast<T>(keep_scale);
  const int16_t thr = static_cast<int16_t>(threshold);

  at::parallel_for(0, a.B * H, a.grain(), [&](int64_t begin, int64_t end) {
    const int64_t MQ = a.Lq, MK = a.Lk;
    std::vector<T> buf(2 * MQ * d + 2 * MK * d + d * MK + 2 * MK * d + 2 * MK);
    T* qb = buf.data();       // (Lq, d)
    T* dqb = qb + MQ * d;     // (Lq, d)
    T* kb = dqb + MQ * d;     // (Lk, d)
    T* vt = kb + MK * d;      // (d, Lk)
    T* dkb = vt + d * MK;     // (Lk, d)
    T* dvb = dkb + MK * d;    // (Lk, d), right after dkb
    T* dw = dvb + MK * d;     // (Lk,) gradient of one row of the weights
    T* w = dw + MK;           // (Lk,) dropped weights of the row
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H, Lq = a.lq(b), Lk = a.lk(b);
      const int64_t p0 = a.prow(b, h, 0);  // row i of P (and of the draws): p0 + i * Lk
      load(qp + a.qat(b, sq), sq, h, Lq, d, relu, qb);
      load(kp + a.kat(b, sk), sk, h, Lk, d, relu, kb);
      load_t(vp + a.kat(b, sv), sv, h, Lk, d, relu, vt);
      std::fill(dkb, dkb + Lk * d, T(0));
      std::fill(dvb, dvb + Lk * d, T(0));
      const T* gs = gp + a.qat(b, sg);
      for (int64_t i = 0; i < Lq; ++i) {
        const T* p = pp + p0 + i * Lk;
        const T* g = gs + i * sg.l + h * sg.h;
        T* dqr = dqb + i * d;
        // dw = g v^T (times the dropout's mask and scale)
        for (int64_t j = 0; j < Lk; ++j) dw[j] = 0;
        for (int64_t c = 0; c < d; ++c) {
          const T gc = g[c];
          const T* vr = vt + c * Lk;
          for (int64_t j = 0; j < Lk; ++j) dw[j] += gc * vr[j];
        }
        if (bp) {
          const int16_t* br = bp + p0 + i * Lk;
          for (int64_t j = 0; j < Lk; ++j) {
            const T keep = br[j] >= thr ? ks : T(0);
            dw[j] *= keep;
            w[j] = p[j] * keep;
          }
        } else {
          for (int64_t j = 0; j < Lk; ++j) w[j] = p[j];
        }
        // dv += w^T g
        for (int64_t j = 0; j < Lk; ++j) {
          const T wj = w[j];
          T* r = dvb + j * d;
          for (int64_t c = 0; c < d; ++c) r[c] += wj * g[c];
        }
        // softmax backward, the score scale folded in: ds = p * (dw - <p, dw>) * scale
        T dot = 0;
        for (int64_t j = 0; j < Lk; ++j) dot += p[j] * dw[j];
        for (int64_t j = 0; j < Lk; ++j) dw[j] = p[j] * (dw[j] - dot) * sc;
        // dq = ds k, dk += ds^T q
        for (int64_t c = 0; c < d; ++c) dqr[c] = 0;
        const T* qr = qb + i * d;
        for (int64_t j = 0; j < Lk; ++j) {
          const T s = dw[j];
          const T* kr = kb + j * d;
          T* dkr = dkb + j * d;
          for (int64_t c = 0; c < d; ++c) {
            dqr[c] += s * kr[c];
            dkr[c] += s * qr[c];
          }
        }
      }
      store(dqb, qp + a.qat(b, sq), sq, dqp + a.qat(b, sdq), sdq, h, Lq, d, relu);
      store(dkb, kp + a.kat(b, sk), sk, dkp + a.kat(b, sdk), sdk, h, Lk, d, relu);
      store(dvb, vp + a.kat(b, sv), sv, dvp + a.kat(b, sdv), sdv, h, Lk, d, relu);
    }
  });
}

// ---- float fast path: 8-wide vectors (GCC vector extensions: AVX with -march=native on x86,
// pairs of 128-bit registers elsewhere), head width d a multiple of 8, keys padded to a
// multiple of 8 in the per-head buffers (padding: score -1e30, weight 0).
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 ld(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void st(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline float hsum(v8 x) {
  float s = 0;
  for (int l = 0; l < 8; ++l) s += x[l];
  return s;
}
inline float hmax(v8 x) {
  float m = x[0];
  for (int l = 1; l < 8; ++l) m = x[l] > m ? x[l] : m;
  return m;
}

inline v8 vexp_neg(v8 x) {  // exp_neg, 8 at a time
  const v8 lo = splat(-80.0f), magic = splat(12582912.0f);
  x = x < lo ? lo : x;
  v8 t = x * 1.44269504088896341f + magic;
  v8i n = reinterpret_cast<v8i>(t) - 0x4B400000;
  v8 fn = t - magic;
  v8 r = x - fn * 0.693145751953125f - fn * 1.42860682030941723e-6f;
  v8 p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * reinterpret_cast<v8>((n + 127) << 23);
}

typedef int16_t v8h __attribute__((vector_size(16)));
typedef int16_t v8hu __attribute__((vector_size(16), aligned(2)));

// the dropout factors of keys 8u..8u+7 of one row of draws `br` (Lk of them): keep_scale where
// the draw is >= thr, else 0 (also past the row's end: padded keys have weight 0 anyway)
inline v8 keep_factor(const int16_t* br, int64_t u, int64_t Lk, int16_t thr, float ks) {
  v8h h;
  if (8 * u + 8 <= Lk) {
    h = *reinterpret_cast<const v8hu*>(br + 8 * u);
  } else {  // the row's last, partial vector: never read past its end
    h = v8h{};
    std::memcpy(&h, br + 8 * u, (Lk - 8 * u) * sizeof(int16_t));
    for (int64_t l = Lk - 8 * u; l < 8; ++l) h[l] = std::numeric_limits<int16_t>::min();
  }
  const v8h t = v8h{thr, thr, thr, thr, thr, thr, thr, thr};
  const v8i keep = __builtin_convertvector(h >= t, v8i);  // -1 where kept, else 0
  return reinterpret_cast<v8>(keep & reinterpret_cast<v8i>(splat(ks)));
}

// n floats from src to dst in vectors: a libc memcpy call per row of P measured 13% slower
// backward passes (the call, and a stall on the next loads after it)
inline void copy_row(const float* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) st(dst + j, ld(src + j));
  for (; j < n; ++j) dst[j] = src[j];
}

// head h of one sample (`base`: its first row), (L, d) rows of d/8 vectors, ReLU'd with `relu`
inline void vload(const float* base, Strided s, int64_t h, int64_t L, int64_t nd, bool relu,
                  v8* out) {
  const v8 zero = splat(0.0f);
  for (int64_t l = 0; l < L; ++l) {
    const float* src = base + l * s.l + h * s.h;
    for (int64_t c = 0; c < nd; ++c) {
      v8 x = ld(src + 8 * c);
      out[l * nd + c] = relu ? (x > zero ? x : zero) : x;
    }
  }
}

// the same head transposed, (d, Lp): row c holds feature c of every key, zero-padded
inline void vload_t(const float* base, Strided s, int64_t h, int64_t L, int64_t Lp, int64_t d,
                    bool relu, float* out) {
  const v8 zero = splat(0.0f);
  for (int64_t c = 0; c < d; ++c) std::fill(out + c * Lp + L, out + (c + 1) * Lp, 0.0f);
  for (int64_t l = 0; l < L; ++l) {  // branch-free: the signs of x are random
    const float* src = base + l * s.l + h * s.h;
    for (int64_t c = 0; c < d; c += 8) {
      v8 x = ld(src + c);
      if (relu) x = x > zero ? x : zero;
      for (int lane = 0; lane < 8; ++lane) out[(c + lane) * Lp + l] = x[lane];
    }
  }
}

inline void vstore(const v8* grad, const float* pre, Strided sp, float* base, Strided s,
                   int64_t h, int64_t L, int64_t nd, bool relu) {
  const v8 zero = splat(0.0f);
  for (int64_t l = 0; l < L; ++l) {
    float* dst = base + l * s.l + h * s.h;
    const float* x = pre + l * sp.l + h * sp.h;
    for (int64_t c = 0; c < nd; ++c) {
      v8 g = grad[l * nd + c];
      st(dst + 8 * c, relu ? (ld(x + 8 * c) > zero ? g : zero) : g);
    }
  }
}

// ND = d / 8 vectors per row, a constant: the accumulators of a row stay in registers (through
// pointers into the buffers, each += would be a store and a load on the chain of additions).
// Buffers are sized for the longest sample; each sample pads its own keys to Lp, a multiple of 8.
template <int ND>
void forward_fast(const Layout& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  Strided sq, Strided sk, Strided sv, const at::Tensor& bits, int64_t threshold,
                  double keep_scale, double scale, bool relu, at::Tensor& out, at::Tensor& P) {
  const int64_t H = a.H, d = 8 * ND, nd = ND;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int16_t* bp = bits.numel() ? bits.data_ptr<int16_t>() : nullptr;
  float* op = out.data_ptr<float>();
  float* pp = P.data_ptr<float>();
  const float sc = static_cast<float>(scale), ks = static_cast<float>(keep_scale);
  const int16_t thr = static_cast<int16_t>(threshold);

  at::parallel_for(0, a.B * H, a.grain(), [&](int64_t begin, int64_t end) {
    const int64_t MQ = a.Lq, MK = a.Lk, mk = (MK + 7) / 8;
    std::vector<v8> buf(MQ * nd + d * mk + MK * nd + 4 * mk);
    v8* qb = buf.data();                                // (Lq, d)
    float* kt = reinterpret_cast<float*>(qb + MQ * nd);  // (d, Lp)
    v8* vb = qb + MQ * nd + d * mk;                     // (Lk, d)
    v8* add = vb + MK * nd;                             // (Lp,) 0 at attended keys, else -1e30
    v8* keep = add + mk;                                // (Lp,) 1 at attended keys, else 0
    v8* s = keep + mk;                                  // (Lp,) one row of scores / weights
    float* w = reinterpret_cast<float*>(s + mk);        // (Lp,) the row's dropped weights
    float* addf = reinterpret_cast<float*>(add);
    float* keepf = reinterpret_cast<float*>(keep);
    float* sf = reinterpret_cast<float*>(s);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H, Lq = a.lq(b), Lk = a.lk(b);
      const int64_t p0 = a.prow(b, h, 0);  // row i of P (and of the draws): p0 + i * Lk
      const int64_t Lp = (Lk + 7) / 8 * 8, nk = Lp / 8;
      const bool* att = a.attend_of(b);
      const bool* rows = a.rows_of(b);
      vload(qp + a.qat(b, sq), sq, h, Lq, nd, relu, qb);
      vload_t(kp + a.kat(b, sk), sk, h, Lk, Lp, d, relu, kt);
      vload(vp + a.kat(b, sv), sv, h, Lk, nd, relu, vb);
      bool any = false;
      for (int64_t j = 0; j < Lp; ++j) {
        const bool on = j < Lk && (!att || att[j]);
        any |= on;
        addf[j] = on ? 0.0f : -1e30f;
        keepf[j] = on ? 1.0f : 0.0f;
      }
      for (int64_t i = 0; i < Lq; ++i) {
        float* prow = pp + p0 + i * Lk;
        float* o = op + ((a.out_row(b) + i) * H + h) * d;
        if (!any || (rows && !rows[i])) {  // a zero row
          std::fill(prow, prow + Lk, 0.0f);
          std::fill(o, o + d, 0.0f);
          continue;
        }
        const float* qr = reinterpret_cast<const float*>(qb + i * nd);
        v8 qs[8 * ND];
        for (int c = 0; c < 8 * ND; ++c) qs[c] = splat(qr[c] * sc);
        const v8* ktv = reinterpret_cast<const v8*>(kt);
        for (int64_t u = 0; u < nk; ++u) {  // scores of keys 8u..8u+7: two chains of FMAs
          v8 a0 = add[u], a1 = splat(0.0f);
          for (int c = 0; c < 8 * ND; c += 2) {
            a0 += qs[c] * ktv[c * nk + u];
            a1 += qs[c + 1] * ktv[(c + 1) * nk + u];
          }
          s[u] = a0 + a1;
        }
        v8 mv = s[0];
        for (int64_t u = 1; u < nk; ++u) mv = s[u] > mv ? s[u] : mv;
        const v8 mx = splat(hmax(mv));
        v8 sv8 = splat(0.0f);
        for (int64_t u = 0; u < nk; ++u) {
          s[u] = vexp_neg(s[u] - mx) * keep[u];
          sv8 += s[u];
        }
        const v8 inv = splat(1.0f / hsum(sv8));
        for (int64_t u = 0; u < nk; ++u) s[u] *= inv;
        copy_row(sf, Lk, prow);
        const float* wr = sf;
        if (bp) {
          const int16_t* br = bp + p0 + i * Lk;
          v8* wv = reinterpret_cast<v8*>(w);
          for (int64_t u = 0; u < nk; ++u) wv[u] = s[u] * keep_factor(br, u, Lk, thr, ks);
          wr = w;
        }
        v8 a0[ND], a1[ND];  // even and odd keys: two chains per vector
        for (int c = 0; c < ND; ++c) a0[c] = a1[c] = splat(0.0f);
        int64_t j = 0;
        for (; j + 1 < Lk; j += 2) {
          const v8 w0 = splat(wr[j]), w1 = splat(wr[j + 1]);
          for (int c = 0; c < ND; ++c) {
            a0[c] += w0 * vb[j * ND + c];
            a1[c] += w1 * vb[(j + 1) * ND + c];
          }
        }
        if (j < Lk) {
          const v8 w0 = splat(wr[j]);
          for (int c = 0; c < ND; ++c) a0[c] += w0 * vb[j * ND + c];
        }
        for (int c = 0; c < ND; ++c) st(o + 8 * c, a0[c] + a1[c]);
      }
    }
  });
}

template <int ND>
void backward_fast(const Layout& a, const at::Tensor& grad, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, Strided sg, Strided sq, Strided sk,
                   Strided sv, const at::Tensor& P, const at::Tensor& bits, int64_t threshold,
                   double keep_scale, double scale, bool relu, at::Tensor& dq, Strided sdq,
                   at::Tensor& dk, Strided sdk, at::Tensor& dv, Strided sdv) {
  const int64_t H = a.H, d = 8 * ND, nd = ND;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const float* pp = P.data_ptr<float>();
  const int16_t* bp = bits.numel() ? bits.data_ptr<int16_t>() : nullptr;
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale), ks = static_cast<float>(keep_scale);
  const int16_t thr = static_cast<int16_t>(threshold);

  at::parallel_for(0, a.B * H, a.grain(), [&](int64_t begin, int64_t end) {
    const int64_t MQ = a.Lq, MK = a.Lk, mk = (MK + 7) / 8;
    std::vector<v8> buf(2 * MQ * nd + 3 * MK * nd + d * mk + 3 * mk);
    v8* qb = buf.data();                                // (Lq, d)
    v8* dqb = qb + MQ * nd;                             // (Lq, d)
    v8* kb = dqb + MQ * nd;                             // (Lk, d)
    v8* dkb = kb + MK * nd;                             // (Lk, d)
    v8* dvb = dkb + MK * nd;                            // (Lk, d)
    float* vt = reinterpret_cast<float*>(dvb + MK * nd);  // (d, Lp)
    v8* dw = dvb + MK * nd + d * mk;                    // (Lp,) gradient of a row of weights
    v8* p = dw + mk;                                    // (Lp,) the row's weights, zero-padded
    float* w = reinterpret_cast<float*>(p + mk);        // (Lp,) the row's dropped weights
    float* dwf = reinterpret_cast<float*>(dw);
    float* pf = reinterpret_cast<float*>(p);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H, Lq = a.lq(b), Lk = a.lk(b);
      const int64_t p0 = a.prow(b, h, 0);  // row i of P (and of the draws): p0 + i * Lk
      const int64_t Lp = (Lk + 7) / 8 * 8, nk = Lp / 8;
      vload(qp + a.qat(b, sq), sq, h, Lq, nd, relu, qb);
      vload(kp + a.kat(b, sk), sk, h, Lk, nd, relu, kb);
      vload_t(vp + a.kat(b, sv), sv, h, Lk, Lp, d, relu, vt);
      std::fill(dkb, dkb + Lk * nd, splat(0.0f));
      std::fill(dvb, dvb + Lk * nd, splat(0.0f));
      for (int64_t u = 0; u < nk; ++u) p[u] = splat(0.0f);
      const float* gs0 = gp + a.qat(b, sg);
      for (int64_t i = 0; i < Lq; ++i) {
        copy_row(pp + p0 + i * Lk, Lk, pf);
        const float* g = gs0 + i * sg.l + h * sg.h;
        v8 gv[ND], gs[8 * ND];
        for (int c = 0; c < ND; ++c) gv[c] = ld(g + 8 * c);
        for (int c = 0; c < 8 * ND; ++c) gs[c] = splat(g[c]);
        // dw = g v^T (times the dropout's mask and scale)
        const v8* vtv = reinterpret_cast<const v8*>(vt);
        for (int64_t u = 0; u < nk; ++u) {
          v8 a0 = splat(0.0f), a1 = splat(0.0f);
          for (int c = 0; c < 8 * ND; c += 2) {
            a0 += gs[c] * vtv[c * nk + u];
            a1 += gs[c + 1] * vtv[(c + 1) * nk + u];
          }
          dw[u] = a0 + a1;
        }
        const float* wr = pf;
        if (bp) {
          const int16_t* br = bp + p0 + i * Lk;
          v8* wv = reinterpret_cast<v8*>(w);
          for (int64_t u = 0; u < nk; ++u) {
            const v8 kf = keep_factor(br, u, Lk, thr, ks);
            dw[u] *= kf;
            wv[u] = p[u] * kf;
          }
          wr = w;
        }
        // dv += w^T g
        for (int64_t j = 0; j < Lk; ++j) {
          const v8 wj = splat(wr[j]);
          v8* r = dvb + j * nd;
          for (int64_t c = 0; c < nd; ++c) r[c] += wj * gv[c];
        }
        // softmax backward, the score scale folded in: ds = p * (dw - <p, dw>) * scale
        v8 dv8 = splat(0.0f);
        for (int64_t u = 0; u < nk; ++u) dv8 += p[u] * dw[u];
        const v8 dot = splat(hsum(dv8));
        for (int64_t u = 0; u < nk; ++u) dw[u] = p[u] * (dw[u] - dot) * sc;
        // dq = ds k, dk += ds^T q
        v8 qr[ND], a0[ND], a1[ND];  // dq: even and odd keys, two chains per vector
        for (int c = 0; c < ND; ++c) {
          qr[c] = qb[i * ND + c];
          a0[c] = a1[c] = splat(0.0f);
        }
        int64_t j = 0;
        for (; j + 1 < Lk; j += 2) {
          const v8 s0 = splat(dwf[j]), s1 = splat(dwf[j + 1]);
          for (int c = 0; c < ND; ++c) {
            a0[c] += s0 * kb[j * ND + c];
            a1[c] += s1 * kb[(j + 1) * ND + c];
            dkb[j * ND + c] += s0 * qr[c];
            dkb[(j + 1) * ND + c] += s1 * qr[c];
          }
        }
        if (j < Lk) {
          const v8 s0 = splat(dwf[j]);
          for (int c = 0; c < ND; ++c) {
            a0[c] += s0 * kb[j * ND + c];
            dkb[j * ND + c] += s0 * qr[c];
          }
        }
        for (int c = 0; c < ND; ++c) dqb[i * ND + c] = a0[c] + a1[c];
      }
      vstore(dqb, qp + a.qat(b, sq), sq, dqp + a.qat(b, sdq), sdq, h, Lq, nd, relu);
      vstore(dkb, kp + a.kat(b, sk), sk, dkp + a.kat(b, sdk), sdk, h, Lk, nd, relu);
      vstore(dvb, vp + a.kat(b, sv), sv, dvp + a.kat(b, sdv), sdv, h, Lk, nd, relu);
    }
  });
}

// ---- head lanes: the ragged float path when H is a multiple of 8. The 8 heads of a group ride
// in the 8 lanes of a vector, so every score, weight and output of one (query, key) pair is one
// vector for 8 heads: the softmax needs no horizontal max or sum, no lane is spent on keys padded
// to a multiple of 8, and one task serves 8 heads. Each token's (8 heads x d) block is transposed
// on load (8 x 8 blocks through shuffles) and back on store. P is lane-major here: in sample b's
// block, group g's weights are (Lq, Lk, 8) (the dropout draws keep the (h, i, j) order of the
// other paths, so every path drops the same weights).
// two-source shuffles of 8 floats with constant indices (GCC before 12 lacks clang's builtin)
#if defined(__clang__)
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
typedef int32_t v8m __attribute__((vector_size(32)));
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shuffle(a, b, v8m{i0, i1, i2, i3, i4, i5, i6, i7})
#endif

// r[i][j] -> r[j][i]: three rounds of two-source shuffles
inline void transpose8(v8* r) {
  v8 s[8], t[8];
  for (int i = 0; i < 8; i += 2) {
    s[i] = SHUFFLE8(r[i], r[i + 1], 0, 8, 2, 10, 4, 12, 6, 14);
    s[i + 1] = SHUFFLE8(r[i], r[i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    t[i] = SHUFFLE8(s[i], s[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    t[i + 2] = SHUFFLE8(s[i], s[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    t[i + 1] = SHUFFLE8(s[i + 1], s[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    t[i + 3] = SHUFFLE8(s[i + 1], s[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = SHUFFLE8(t[i], t[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = SHUFFLE8(t[i], t[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// L tokens of one head group (`base`: head 0 of the group in the first token) into lane-major
// (L, d) vectors, out[l * d + c] = feature c of the 8 heads; ReLU'd with `relu`
inline void lanes_load(const float* base, Strided s, int64_t L, int64_t d, bool relu, v8* out) {
  const v8 zero = splat(0.0f);
  for (int64_t l = 0; l < L; ++l) {
    const float* t = base + l * s.l;
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      v8 r[8];
      for (int h = 0; h < 8; ++h) r[h] = ld(t + h * s.h + c0);
      transpose8(r);
      v8* o = out + l * d + c0;
      for (int c = 0; c < 8; ++c) o[c] = relu ? (r[c] > zero ? r[c] : zero) : r[c];
    }
  }
}

// lane-major (L, d) gradients back into a strided view of the same layout as the input;
// with `relu`, zero where the pre-activation (`pre`, strides sp) <= 0
inline void lanes_store(const v8* grad, const float* pre, Strided sp, float* base, Strided s,
                        int64_t L, int64_t d, bool relu) {
  const v8 zero = splat(0.0f);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t c0 = 0; c0 < d; c0 += 8) {
      v8 r[8];
      for (int c = 0; c < 8; ++c) r[c] = grad[l * d + c0 + c];
      transpose8(r);
      for (int h = 0; h < 8; ++h) {
        float* dst = base + l * s.l + h * s.h + c0;
        st(dst, relu ? (ld(pre + l * sp.l + h * sp.h + c0) > zero ? r[h] : zero) : r[h]);
      }
    }
  }
}

// the dropout factors of query i's keys for the 8 heads of a group, lane-major: out[j] = the
// factors of key j (`bg`: the group's (8, Lq, Lk) draws); 8 keys at a time, one row of draws per
// head, then transposed
inline void keep_lanes(const int16_t* bg, int64_t i, int64_t Lq, int64_t Lk, int16_t thr, float ks,
                       v8* out) {
  for (int64_t u = 0; 8 * u < Lk; ++u) {
    v8 r[8];
    for (int h = 0; h < 8; ++h) r[h] = keep_factor(bg + (h * Lq + i) * Lk, u, Lk, thr, ks);
    transpose8(r);
    for (int64_t j = 8 * u; j < std::min<int64_t>(Lk, 8 * u + 8); ++j) out[j] = r[j - 8 * u];
  }
}

// (sample, head group) tasks per parallel chunk: ~32k scores each
inline int64_t lanes_grain(const Layout& a) {
  const int64_t tasks = std::max<int64_t>(1, a.B * (a.H / 8));
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.poff[a.B] / tasks));
}

template <int ND>
void forward_lanes(const Layout& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   Strided sq, Strided sk, Strided sv, const at::Tensor& bits, int64_t threshold,
                   double keep_scale, double scale, bool relu, at::Tensor& out, at::Tensor& P) {
  constexpr int64_t d = 8 * ND;
  const int64_t H = a.H, G = H / 8;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int16_t* bp = bits.numel() ? bits.data_ptr<int16_t>() : nullptr;
  float* op = out.data_ptr<float>();  // (rows, H, d) contiguous
  float* pp = P.data_ptr<float>();
  const float ks = static_cast<float>(keep_scale);
  const v8 sc = splat(static_cast<float>(scale)), zero = splat(0.0f);
  const int16_t thr = static_cast<int16_t>(threshold);
  const Strided so{0, H * d, d};

  at::parallel_for(0, a.B * G, lanes_grain(a), [&](int64_t begin, int64_t end) {
    const int64_t MQ = a.Lq, MK = a.Lk;
    std::vector<v8> buf(MQ * d + 2 * MK * d + 2 * MK);
    v8* qb = buf.data();   // (Lq, d) queries, scaled
    v8* kb = qb + MQ * d;  // (Lk, d)
    v8* vb = kb + MK * d;  // (Lk, d)
    v8* s = vb + MK * d;   // (Lk,) one query's scores, then weights
    v8* kf = s + MK;       // (Lk,) one query's dropout factors
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / G, g0 = (n % G) * 8, Lq = a.lq(b), Lk = a.lk(b);
      float* ob = op + a.qoff[b] * H * d + g0 * d;  // this group's heads of the first query
      if (Lk == 0) {  // no keys: zero outputs (and no weights)
        for (int64_t i = 0; i < Lq; ++i)
          for (int64_t h = 0; h < 8; ++h) std::fill(ob + i * H * d + h * d, ob + i * H * d + (h + 1) * d, 0.0f);
        continue;
      }
      lanes_load(qp + a.qat(b, sq) + g0 * sq.h, sq, Lq, d, relu, qb);
      for (int64_t x = 0; x < Lq * d; ++x) qb[x] *= sc;
      lanes_load(kp + a.kat(b, sk) + g0 * sk.h, sk, Lk, d, relu, kb);
      lanes_load(vp + a.kat(b, sv) + g0 * sv.h, sv, Lk, d, relu, vb);
      float* pg = pp + a.poff[b] + g0 * Lq * Lk;  // (Lq, Lk, 8)
      const int16_t* bg = bp ? bp + a.poff[b] + g0 * Lq * Lk : nullptr;  // (8, Lq, Lk)
      for (int64_t i = 0; i < Lq; ++i) {
        const v8* qr = qb + i * d;
        v8 mx = splat(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < Lk; ++j) {  // scores: two chains of FMAs
          const v8* kr = kb + j * d;
          v8 a0 = zero, a1 = zero;
          for (int c = 0; c < d; c += 2) {
            a0 += qr[c] * kr[c];
            a1 += qr[c + 1] * kr[c + 1];
          }
          s[j] = a0 + a1;
          mx = s[j] > mx ? s[j] : mx;
        }
        v8 sum = zero;
        for (int64_t j = 0; j < Lk; ++j) {
          s[j] = vexp_neg(s[j] - mx);
          sum += s[j];
        }
        const v8 inv = 1.0f / sum;
        float* prow = pg + i * Lk * 8;
        for (int64_t j = 0; j < Lk; ++j) {
          s[j] *= inv;
          st(prow + j * 8, s[j]);
        }
        if (bg) {
          keep_lanes(bg, i, Lq, Lk, thr, ks, kf);
          for (int64_t j = 0; j < Lk; ++j) s[j] *= kf[j];
        }
        v8 acc[d];
        for (int c = 0; c < d; ++c) acc[c] = zero;
        for (int64_t j = 0; j < Lk; ++j) {
          const v8 w = s[j];
          const v8* vr = vb + j * d;
          for (int c = 0; c < d; ++c) acc[c] += w * vr[c];
        }
        lanes_store(acc, nullptr, so, ob + i * H * d, so, 1, d, false);
      }
    }
  });
}

// Two passes per task so that every accumulator stays in registers: per query i, dw = g_i V^T,
// the softmax backward ds_i, dq_i = ds_i K (the weights after dropout w_i and ds_i kept); then
// per key j, dk_j = sum_i ds_ij q_i and dv_j = sum_i w_ij g_i.
template <int ND>
void backward_lanes(const Layout& a, const at::Tensor& grad, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, Strided sg, Strided sq, Strided sk,
                    Strided sv, const at::Tensor& P, const at::Tensor& bits, int64_t threshold,
                    double keep_scale, double scale, bool relu, at::Tensor& dq, Strided sdq,
                    at::Tensor& dk, Strided sdk, at::Tensor& dv, Strided sdv) {
  constexpr int64_t d = 8 * ND;
  const int64_t H = a.H, G = H / 8;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const float* pp = P.data_ptr<float>();
  const int16_t* bp = bits.numel() ? bits.data_ptr<int16_t>() : nullptr;
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float ks = static_cast<float>(keep_scale);
  const v8 sc = splat(static_cast<float>(scale)), zero = splat(0.0f);
  const int16_t thr = static_cast<int16_t>(threshold);

  at::parallel_for(0, a.B * G, lanes_grain(a), [&](int64_t begin, int64_t end) {
    const int64_t MQ = a.Lq, MK = a.Lk;
    std::vector<v8> buf(2 * MQ * d + 3 * MK * d + (bp ? 2 : 1) * MQ * MK + MK);
    v8* qb = buf.data();         // (Lq, d)
    v8* gb = qb + MQ * d;        // (Lq, d) the outputs' gradient
    v8* kb = gb + MQ * d;        // (Lk, d)
    v8* vb = kb + MK * d;        // (Lk, d)
    v8* dkb = vb + MK * d;       // (Lk, d) one key's dk or dv at a time, then stored
    v8* ds = dkb + MK * d;       // (Lq, Lk) the scores' gradient
    v8* wd = bp ? ds + MQ * MK : nullptr;  // (Lq, Lk) the weights after dropout
    v8* kf = ds + (bp ? 2 : 1) * MQ * MK;  // (Lk,) one query's dropout factors
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / G, g0 = (n % G) * 8, Lq = a.lq(b), Lk = a.lk(b);
      const float* qs = qp + a.qat(b, sq) + g0 * sq.h;
      float* dqs = dqp + a.qat(b, sdq) + g0 * sdq.h;
      if (Lk == 0) {  // no keys: the outputs were zeros
        for (int64_t i = 0; i < Lq; ++i)
          for (int64_t h = 0; h < 8; ++h) {
            float* r = dqs + i * sdq.l + h * sdq.h;
            std::fill(r, r + d, 0.0f);
          }
        continue;
      }
      lanes_load(qs, sq, Lq, d, relu, qb);
      lanes_load(gp + a.qat(b, sg) + g0 * sg.h, sg, Lq, d, false, gb);
      lanes_load(kp + a.kat(b, sk) + g0 * sk.h, sk, Lk, d, relu, kb);
      lanes_load(vp + a.kat(b, sv) + g0 * sv.h, sv, Lk, d, relu, vb);
      const float* pg = pp + a.poff[b] + g0 * Lq * Lk;  // (Lq, Lk, 8)
      const int16_t* bg = bp ? bp + a.poff[b] + g0 * Lq * Lk : nullptr;
      for (int64_t i = 0; i < Lq; ++i) {
        v8 gr[d];
        for (int c = 0; c < d; ++c) gr[c] = gb[i * d + c];
        v8* dsr = ds + i * Lk;
        const float* prow = pg + i * Lk * 8;
        if (bg) keep_lanes(bg, i, Lq, Lk, thr, ks, kf);
        v8 dot = zero;
        for (int64_t j = 0; j < Lk; ++j) {  // dw = g v^T, two chains of FMAs
          const v8 p = ld(prow + j * 8);
          const v8* vr = vb + j * d;
          v8 a0 = zero, a1 = zero;
          for (int c = 0; c < d; c += 2) {
            a0 += gr[c] * vr[c];
            a1 += gr[c + 1] * vr[c + 1];
          }
          v8 dw = a0 + a1;
          if (bg) {
            dw *= kf[j];
            wd[i * Lk + j] = p * kf[j];
          }
          dsr[j] = dw;
          dot += p * dw;
        }
        // softmax backward, the score scale folded in: ds = p (dw - <p, dw>) scale; dq = ds K
        v8 acc[d];
        for (int c = 0; c < d; ++c) acc[c] = zero;
        for (int64_t j = 0; j < Lk; ++j) {
          const v8 dsj = ld(prow + j * 8) * (dsr[j] - dot) * sc;
          dsr[j] = dsj;
          const v8* kr = kb + j * d;
          for (int c = 0; c < d; ++c) acc[c] += dsj * kr[c];
        }
        lanes_store(acc, qs + i * sq.l, sq, dqs + i * sdq.l, sdq, 1, d, relu);
      }
      for (int64_t j = 0; j < Lk; ++j) {  // dk_j = sum_i ds_ij q_i, dv_j = sum_i w_ij g_i
        v8 acc[d];
        for (int c = 0; c < d; ++c) acc[c] = zero;
        for (int64_t i = 0; i < Lq; ++i) {
          const v8 x = ds[i * Lk + j];
          const v8* qr = qb + i * d;
          for (int c = 0; c < d; ++c) acc[c] += x * qr[c];
        }
        for (int c = 0; c < d; ++c) dkb[j * d + c] = acc[c];
      }
      lanes_store(dkb, kp + a.kat(b, sk) + g0 * sk.h, sk, dkp + a.kat(b, sdk) + g0 * sdk.h, sdk, Lk,
                  d, relu);
      for (int64_t j = 0; j < Lk; ++j) {
        v8 acc[d];
        for (int c = 0; c < d; ++c) acc[c] = zero;
        for (int64_t i = 0; i < Lq; ++i) {
          const v8 x = wd ? wd[i * Lk + j] : ld(pg + (i * Lk + j) * 8);
          const v8* gr = gb + i * d;
          for (int c = 0; c < d; ++c) acc[c] += x * gr[c];
        }
        for (int c = 0; c < d; ++c) dkb[j * d + c] = acc[c];
      }
      lanes_store(dkb, vp + a.kat(b, sv) + g0 * sv.h, sv, dvp + a.kat(b, sdv) + g0 * sdv.h, sdv, Lk,
                  d, relu);
    }
  });
}

// the head-lanes path: ragged float attention with a multiple of 8 heads
// (self-attention-like: at least two queries a sample on average; with one query, as in a target
// attention, transposing every key and value costs more than the per-head path's horizontal sums)
inline bool lanes(const Layout& a, const at::Tensor& q, bool ragged) {
  return ragged && q.scalar_type() == at::kFloat && a.H % 8 == 0 &&
         (a.d == 8 || a.d == 16 || a.d == 32 || a.d == 64) && q.size(0) >= 2 * a.B;
}

inline bool fast(const at::Tensor& q, int64_t d) {
  return q.scalar_type() == at::kFloat && (d == 8 || d == 16 || d == 32 || d == 64);
}

// calls f.template operator()<ND>() with ND = d / 8 a constant (d in 8, 16, 32, 64)
template <typename F>
inline void with_nd(int64_t d, F&& f) {
  switch (d) {
    case 8: f(std::integral_constant<int, 1>()); break;
    case 16: f(std::integral_constant<int, 2>()); break;
    case 32: f(std::integral_constant<int, 4>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& bits, bool ragged) {
  const int64_t x = ragged ? 1 : 2;  // the heads' axis
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "fused attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 - ragged && k.dim() == q.dim(), "fused attention: q ", q.sizes(),
              " and k ", k.sizes(), " must be ", ragged ? "(R, H, d)" : "(B, L, H, d)");
  TORCH_CHECK(k.sizes() == v.sizes(), "fused attention: k ", k.sizes(), " and v ", v.sizes(),
              " differ");
  TORCH_CHECK((ragged || q.size(0) == k.size(0)) && q.size(x) == k.size(x) &&
                  q.size(x + 1) == k.size(x + 1),
              "fused attention: q ", q.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fused attention: q, k and v must share a dtype");
  TORCH_CHECK(!bits.numel() || (bits.scalar_type() == at::kShort && bits.is_contiguous()),
              "fused attention: bits must be contiguous int16");
}

std::vector<at::Tensor> run_forward(const Layout& a, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, bool ragged, const at::Tensor& bits,
                                    int64_t threshold, double keep_scale, double scale, bool relu,
                                    at::Tensor out, at::Tensor P) {
  const Strided sq = strides_of(q, "q", ragged), sk = strides_of(k, "k", ragged),
                sv = strides_of(v, "v", ragged);
  TORCH_CHECK(!bits.numel() || bits.numel() == P.numel(), "fused attention: bits hold ",
              bits.numel(), " draws for ", P.numel(), " weights");
  if (lanes(a, q, ragged)) {
    with_nd(a.d, [&](auto nd) {
      forward_lanes<decltype(nd)::value>(a, q, k, v, sq, sk, sv, bits, threshold, keep_scale,
                                         scale, relu, out, P);
    });
    return {out, P};
  }
  if (fast(q, a.d)) {
    with_nd(a.d, [&](auto nd) {
      forward_fast<decltype(nd)::value>(a, q, k, v, sq, sk, sv, bits, threshold, keep_scale,
                                        scale, relu, out, P);
    });
    return {out, P};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fused_attention_forward", [&] {
    forward_impl<scalar_t>(a, q, k, v, sq, sk, sv, bits, threshold, keep_scale, scale, relu, out,
                           P);
  });
  return {out, P};
}

void run_backward(const Layout& a, const at::Tensor& grad, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v, bool ragged, const at::Tensor& P,
                  const at::Tensor& bits, int64_t threshold, double keep_scale, double scale,
                  bool relu, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  TORCH_CHECK(P.is_contiguous() && grad.sizes() == q.sizes() && dq.sizes() == q.sizes() &&
                  dk.sizes() == k.sizes() && dv.sizes() == v.sizes() &&
                  grad.scalar_type() == q.scalar_type() && P.scalar_type() == q.scalar_type() &&
                  dq.scalar_type() == q.scalar_type() && dk.scalar_type() == q.scalar_type() &&
                  dv.scalar_type() == q.scalar_type(),
              "fused attention: backward shapes or dtypes do not match the forward's");
  const Strided sq = strides_of(q, "q", ragged), sk = strides_of(k, "k", ragged),
                sv = strides_of(v, "v", ragged), sg = strides_of(grad, "grad", ragged),
                sdq = strides_of(dq, "dq", ragged), sdk = strides_of(dk, "dk", ragged),
                sdv = strides_of(dv, "dv", ragged);
  if (lanes(a, q, ragged)) {
    with_nd(a.d, [&](auto nd) {
      backward_lanes<decltype(nd)::value>(a, grad, q, k, v, sg, sq, sk, sv, P, bits, threshold,
                                          keep_scale, scale, relu, dq, sdq, dk, sdk, dv, sdv);
    });
    return;
  }
  if (fast(q, a.d)) {
    with_nd(a.d, [&](auto nd) {
      backward_fast<decltype(nd)::value>(a, grad, q, k, v, sg, sq, sk, sv, P, bits, threshold,
                                         keep_scale, scale, relu, dq, sdq, dk, sdk, dv, sdv);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fused_attention_backward", [&] {
    backward_impl<scalar_t>(a, grad, q, k, v, sg, sq, sk, sv, P, bits, threshold, keep_scale,
                            scale, relu, dq, sdq, dk, sdk, dv, sdv);
  });
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& attend, const at::Tensor& rows,
                                const at::Tensor& bits, int64_t threshold, double keep_scale,
                                double scale, bool relu) {
  check_inputs(q, k, v, bits, false);
  const int64_t B = q.size(0), Lq = q.size(1), H = q.size(2), d = q.size(3), Lk = k.size(1);
  TORCH_CHECK(attend.scalar_type() == at::kBool && attend.is_contiguous() &&
                  attend.sizes() == at::IntArrayRef({B, Lk}),
              "fused attention: attend must be a contiguous (B, Lk) bool tensor");
  TORCH_CHECK(!rows.numel() || (rows.scalar_type() == at::kBool && rows.is_contiguous() &&
                                rows.sizes() == at::IntArrayRef({B, Lq})),
              "fused attention: rows must be a contiguous (B, Lq) bool tensor");
  const Layout a = padded_layout(q, k, attend, rows);
  return run_forward(a, q, k, v, false, bits, threshold, keep_scale, scale, relu,
                     at::empty({B, Lq, H, d}, q.options()), at::empty({B, H, Lq, Lk}, q.options()));
}

void backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& P, const at::Tensor& bits, int64_t threshold,
              double keep_scale, double scale, bool relu, at::Tensor dq, at::Tensor dk,
              at::Tensor dv) {
  check_inputs(q, k, v, bits, false);
  const Layout a = padded_layout(q, k, at::Tensor(), at::Tensor());
  run_backward(a, grad, q, k, v, false, P, bits, threshold, keep_scale, scale, relu, dq, dk, dv);
}

std::vector<at::Tensor> forward_ragged(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& q_offsets,
                                       const at::Tensor& k_offsets, const at::Tensor& bits,
                                       int64_t threshold, double keep_scale, double scale,
                                       bool relu) {
  check_inputs(q, k, v, bits, true);
  const Layout a = ragged_layout(q, k, q_offsets, k_offsets);
  return run_forward(a, q, k, v, true, bits, threshold, keep_scale, scale, relu,
                     at::empty({q.size(0), a.H, a.d}, q.options()),
                     at::empty({a.poff[a.B]}, q.options()));
}

void backward_ragged(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& q_offsets,
                     const at::Tensor& k_offsets, const at::Tensor& P, const at::Tensor& bits,
                     int64_t threshold, double keep_scale, double scale, bool relu,
                     at::Tensor dq, at::Tensor dk, at::Tensor dv) {
  check_inputs(q, k, v, bits, true);
  const Layout a = ragged_layout(q, k, q_offsets, k_offsets);
  TORCH_CHECK(P.numel() == a.poff[a.B], "fused attention: P holds ", P.numel(), " weights, the ",
              "offsets ", a.poff[a.B]);
  run_backward(a, grad, q, k, v, true, P, bits, threshold, keep_scale, scale, relu, dq, dk, dv);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused attention forward: (out (B, Lq, H, d), P (B, H, Lq, Lk))");
  m.def("backward", &backward, "fused attention backward, into dq, dk, dv (strided views)");
  m.def("forward_ragged", &forward_ragged,
        "fused attention forward over ragged samples: (out (Rq, H, d), P flat)");
  m.def("backward_ragged", &backward_ragged,
        "fused attention backward over ragged samples, into dq, dk, dv (strided views)");
}
