// Dense Adam from a row-sparse gradient: one pass over an embedding table that updates every
// row exactly as torch.optim.Adam would with the dense gradient (zero in the rows the batch did
// not look up), without the dense gradient ever existing. A dense gradient costs a zero fill of
// the whole table and one more read of it per step; here the untouched rows read a zero.
//
// Built on first use by torch.utils.cpp_extension (seqrank/kernels.py); seqrank/optim.py holds
// the torch fallback it is tested against.
//
// param, exp_avg, exp_avg_sq: (N, D) contiguous, one dtype; rows: (R,) int64 in [0, N), in any
// order and with repeats (an uncoalesced sparse gradient's indices, as nn.Embedding's backward
// gives them: no sort, no coalesce); values: (R, D) contiguous, one gradient row per index. A
// repeated row's gradients are summed in the order they come, as coalescing would sum them.
// step: the step number after this update (1 on the first). The formula is torch's Adam:
//   g = -g if maximize;  p -= lr * wd * p (decoupled) or g += wd * p (L2)
//   m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
//   p -= (lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <climits>
#include <type_traits>
#include <vector>

namespace {

// one row of D values; gradient g (nullptr: zero). The flags are template constants so that the
// loop has no branch and vectorises (sqrt needs -fno-math-errno, see kernels.py).
template <typename T, bool HasGrad, bool Maximize, int WeightDecay>
void adam_row(T* __restrict__ p, T* __restrict__ m, T* __restrict__ v, const T* __restrict__ g,
              int64_t D, T lr_wd, T wd, T beta1, T beta2, T step_size, T inv_bc2_sqrt, T eps) {
  const T one_minus_beta1 = T(1) - beta1, one_minus_beta2 = T(1) - beta2;
  const bool near = one_minus_beta1 < T(0.5);  // lerp as torch computes it: from the nearer end
  for (int64_t j = 0; j < D; ++j) {
    T grad = HasGrad ? g[j] : T(0);
    if (Maximize) grad = -grad;
    T param = p[j];
    if (WeightDecay == 1) grad += wd * param;  // L2
    if (WeightDecay == 2) param -= lr_wd * param;  // decoupled (AdamW)
    const T mj = near ? m[j] + one_minus_beta1 * (grad - m[j]) : grad - (grad - m[j]) * beta1;
    const T vj = beta2 * v[j] + one_minus_beta2 * grad * grad;
    m[j] = mj;
    v[j] = vj;
    p[j] = param - step_size * mj / (std::sqrt(vj) * inv_bc2_sqrt + eps);
  }
}

template <typename T, bool Maximize, int WeightDecay>
void adam_table(T* p, T* m, T* v, const T* g, const int32_t* slot, int64_t N, int64_t D,
                T lr_wd, T wd, T beta1, T beta2, T step_size, T inv_bc2_sqrt, T eps) {
  // rows in chunks; a run of rows without a gradient (slot < 0) is one call over run * D values
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
                     int64_t i = begin;
                     while (i < end) {
                       int64_t stop = i;
                       while (stop < end && slot[stop] < 0) ++stop;
                       if (stop > i) {
                         adam_row<T, false, Maximize, WeightDecay>(
                             p + i * D, m + i * D, v + i * D, nullptr, (stop - i) * D, lr_wd, wd,
                             beta1, beta2, step_size, inv_bc2_sqrt, eps);
                         i = stop;
                       }
                       if (i < end) {
                         adam_row<T, true, Maximize, WeightDecay>(
                             p + i * D, m + i * D, v + i * D, g + slot[i] * D, D, lr_wd, wd,
                             beta1, beta2, step_size, inv_bc2_sqrt, eps);
                         ++i;
                       }
                     }
                   });
}

template <typename T>
void sparse_dense_adam_impl(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                            const at::Tensor& rows, const at::Tensor& values, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled, bool maximize, double step) {
  const int64_t N = param.size(0), D = param.numel() / std::max<int64_t>(N, 1);
  const int64_t R = rows.numel();
  T* p = param.data_ptr<T>();
  T* m = exp_avg.data_ptr<T>();
  T* v = exp_avg_sq.data_ptr<T>();
  const T* in = values.data_ptr<T>();
  const int64_t* r = rows.data_ptr<int64_t>();
  // slot[i]: row i's place in `sum` (-1: no gradient); sum: each touched row's summed gradient
  std::vector<int32_t> slot(static_cast<size_t>(N), -1);
  std::vector<T> sum;
  sum.reserve(static_cast<size_t>(R * D));
  int32_t touched = 0;
  for (int64_t k = 0; k < R; ++k) {
    const T* row = in + k * D;
    if (slot[r[k]] < 0) {
      slot[r[k]] = touched++;
      sum.insert(sum.end(), row, row + D);
    } else {
      T* acc = sum.data() + static_cast<int64_t>(slot[r[k]]) * D;
      for (int64_t j = 0; j < D; ++j) acc[j] += row[j];
    }
  }
  const T* g = sum.data();
  const T step_size = static_cast<T>(lr / (1.0 - std::pow(beta1, step)));
  const T inv_bc2_sqrt = static_cast<T>(1.0 / std::sqrt(1.0 - std::pow(beta2, step)));
  const int wd_mode = weight_decay == 0.0 ? 0 : (decoupled ? 2 : 1);
  auto run = [&](auto maximize_c, auto wd_c) {
    adam_table<T, decltype(maximize_c)::value, decltype(wd_c)::value>(
        p, m, v, g, slot.data(), N, D, T(lr * weight_decay), T(weight_decay), T(beta1), T(beta2),
        step_size, inv_bc2_sqrt, T(eps));
  };
  auto with_wd = [&](auto maximize_c) {
    if (wd_mode == 0) run(maximize_c, std::integral_constant<int, 0>{});
    if (wd_mode == 1) run(maximize_c, std::integral_constant<int, 1>{});
    if (wd_mode == 2) run(maximize_c, std::integral_constant<int, 2>{});
  };
  if (maximize) {
    with_wd(std::true_type{});
  } else {
    with_wd(std::false_type{});
  }
}

}  // namespace

void sparse_dense_adam(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                       const at::Tensor& rows, const at::Tensor& values, double lr, double beta1,
                       double beta2, double eps, double weight_decay, bool decoupled,
                       bool maximize, double step) {
  TORCH_CHECK(param.device().is_cpu(), "sparse_dense_adam: CPU tensors only");
  TORCH_CHECK(param.dim() >= 1 && param.is_contiguous() && exp_avg.is_contiguous() &&
                  exp_avg_sq.is_contiguous() && values.is_contiguous() && rows.is_contiguous(),
              "sparse_dense_adam: param, moments, rows and values must be contiguous");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes(),
              "sparse_dense_adam: moments ", exp_avg.sizes(), " do not match param ",
              param.sizes());
  TORCH_CHECK(exp_avg.scalar_type() == param.scalar_type() &&
                  exp_avg_sq.scalar_type() == param.scalar_type() &&
                  values.scalar_type() == param.scalar_type(),
              "sparse_dense_adam: param, moments and values must share a dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1,
              "sparse_dense_adam: rows must be a 1-d int64 tensor");
  const int64_t D = param.numel() / std::max<int64_t>(param.size(0), 1);
  TORCH_CHECK(values.dim() >= 1 && values.size(0) == rows.numel() &&
                  values.numel() == rows.numel() * D,
              "sparse_dense_adam: values ", values.sizes(), " do not hold one row of ",
              param.sizes(), " per index");
  const int64_t* r = rows.data_ptr<int64_t>();
  TORCH_CHECK(param.size(0) <= INT32_MAX && rows.numel() <= INT32_MAX,
              "sparse_dense_adam: tables and gradients of up to 2^31 - 1 rows");
  for (int64_t k = 0; k < rows.numel(); ++k) {  // checked before anything is written
    TORCH_CHECK(r[k] >= 0 && r[k] < param.size(0), "sparse_dense_adam: rows must be in [0, ",
                param.size(0), "); row ", k, " is ", r[k]);
  }
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sparse_dense_adam", [&] {
    sparse_dense_adam_impl<scalar_t>(param, exp_avg, exp_avg_sq, rows, values, lr, beta1, beta2,
                                     eps, weight_decay, decoupled, maximize, step);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_dense_adam", &sparse_dense_adam,
        "dense Adam over a table from its row-sparse gradient (rows in any order, repeats summed), in place");
}
