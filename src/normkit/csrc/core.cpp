// normkit's compiled CPU kernels (built on demand by normkit.kernels; the PyTorch paths in
// normkit._fused and the layers are the specification, and tests/test_kernels.py checks this
// file against them in float64).
//
// * core_forward: the batch-norm core (normkit.layers.core). With x̂ = (x − μ_g) / sqrt(σ²_g +
//   eps) (g the sample's statistics group: 0 for the whole batch, or its domain), k the
//   sample's domain, γ, β the optional shared (C,) affine and γ_k, β_k the optional per-domain
//   (K, C) affine: y = γ_k ⊙ (γ ⊙ x̂ + β) + β_k = a[n, c] · x + b[n, c].
// * bcn_forward: Batch-Channel Normalization (normkit.layers.batch_channel).
// * ws_standardize: weight standardization of a convolution's or linear layer's weight
//   (normkit.layers.weight_std), per output filter.
//
// Each forward also updates the layer's running statistics (or BCN's estimates) by the rules of
// normkit._stats, in the same call; each has an autograd node here (CoreFunction, BcnFunction).
//
// Both layers run in the same three steps each way: per-(sample, channel) sums in one pass over
// the activation, arithmetic on (N, C) arrays, one elementwise pass. The passes exist for two
// layouts: contiguous (N, C, *S), one plane per (n, c), and channels_last (N, *S, C), rows
// of C. Moments are shifted sums of x − x[n, c, first] in T lanes flushed to double every kChunk
// values, so that a mean far from zero costs no precision.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kChunk = 4096;  // values summed in T before a flush to double
constexpr int64_t kWidth = 64;    // channels per task in the channels_last passes
constexpr int64_t kGrain = 32768;  // values per parallel task, as ATen's grain

// ---- The passes over the activation, per layout ---------------------------------------------

struct Shape {
  int64_t n, c, s;
  bool last;  // channels_last: (N, *S, C) in memory
};

Shape shape_of(const Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() > 2 && x.dim() < 6, what, ": an (N, C, *S) input of rank 3 to 5");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, what,
              ": float32 or float64 input");
  const bool plain = x.is_contiguous();
  const bool last = !plain && ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                               (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
  TORCH_CHECK(plain || last, what, ": a contiguous or channels_last input");
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, n * c == 0 ? 0 : x.numel() / (n * c), last};
}

// The same tensor (or a copy) in the layout of x.
Tensor like(const Tensor& t, const Shape& d, const Tensor& x) {
  return d.last ? t.contiguous(x.suggest_memory_format()) : t.contiguous();
}

int64_t plane_grain(int64_t s) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s)); }

// Tasks of the channels_last passes: (sample, block of kWidth channels).
int64_t block_grain(int64_t s) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, s * kWidth));
}

// Two sums per (n, c) over the positions, Σ da and Σ db with term(u, x, k, da, db) for each
// position's values u and x and the (n, c) constant k[n, c]: in T lanes (vectorized along the
// plane, or along the channels for channels_last), flushed to double every kChunk positions.
template <typename T, typename Term>
void pair_sums(const T* u, const T* x, const T* k, const Shape& d, double* sa, double* sb,
               Term term) {
  if (!d.last) {
    at::parallel_for(0, d.n * d.c, plane_grain(d.s), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const T* up = u + p * d.s;
        const T* xp = x + p * d.s;
        const T kp = k[p];
        double a_sum = 0.0, b_sum = 0.0;
        for (int64_t start = 0; start < d.s; start += kChunk) {
          const int64_t end = std::min(d.s, start + kChunk);
          T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
          for (int64_t i = start; i < end; ++i) {
            T da, db;
            term(up[i], xp[i], kp, da, db);
            a += da;
            b += db;
          }
          a_sum += static_cast<double>(a);
          b_sum += static_cast<double>(b);
        }
        sa[p] = a_sum;
        sb[p] = b_sum;
      }
    });
    return;
  }
  const int64_t blocks = (d.c + kWidth - 1) / kWidth;
  at::parallel_for(0, d.n * blocks, block_grain(d.s), [&](int64_t t0, int64_t t1) {
    T a[kWidth], b[kWidth];
    double a_sum[kWidth], b_sum[kWidth];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i = task / blocks, c0 = (task % blocks) * kWidth;
      const int64_t w = std::min(kWidth, d.c - c0);
      const T* ub = u + i * d.s * d.c + c0;
      const T* xb = x + i * d.s * d.c + c0;
      const T* kb = k + i * d.c + c0;
      std::fill(a_sum, a_sum + w, 0.0);
      std::fill(b_sum, b_sum + w, 0.0);
      for (int64_t start = 0; start < d.s; start += kChunk) {
        const int64_t end = std::min(d.s, start + kChunk);
        std::fill(a, a + w, T(0));
        std::fill(b, b + w, T(0));
        for (int64_t r = start; r < end; ++r) {
          const T* ur = ub + r * d.c;
          const T* xr = xb + r * d.c;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            T da, db;
            term(ur[j], xr[j], kb[j], da, db);
            a[j] += da;
            b[j] += db;
          }
        }
        for (int64_t j = 0; j < w; ++j) {
          a_sum[j] += static_cast<double>(a[j]);
          b_sum[j] += static_cast<double>(b[j]);
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        sa[i * d.c + c0 + j] = a_sum[j];
        sb[i * d.c + c0 + j] = b_sum[j];
      }
    }
  });
}

// Per-(n, c) mean m and biased variance q, in double: sums of d = x − f with f the plane's
// first value (a shift of the same plane keeps E[d²] − E[d]² precise for a mean far from 0).
template <typename T>
void moments(const T* x, const Shape& d, double* m, double* q) {
  std::vector<T> first(d.n * d.c);
  for (int64_t i = 0; i < d.n; ++i) {
    for (int64_t ch = 0; ch < d.c; ++ch) {
      first[i * d.c + ch] = d.last ? x[i * d.s * d.c + ch] : x[(i * d.c + ch) * d.s];
    }
  }
  std::vector<double> sum(d.n * d.c), sq(d.n * d.c);
  pair_sums<T>(x, x, first.data(), d, sum.data(), sq.data(),
               [](T, T v, T f, T& da, T& db) {
                 da = v - f;
                 db = da * da;
               });
  const double inv_s = 1.0 / static_cast<double>(d.s);
  for (int64_t p = 0; p < d.n * d.c; ++p) {
    const double mean_d = sum[p] * inv_s;
    m[p] = static_cast<double>(first[p]) + mean_d;
    q[p] = std::max(0.0, sq[p] * inv_s - mean_d * mean_d);
  }
}

// Σ g and Σ g · (x − centre) per (n, c), in double; centre (N, C) in T.
template <typename T>
void grad_sums(const T* g, const T* x, const Shape& d, const T* centre, double* sa, double* sp) {
  pair_sums<T>(g, x, centre, d, sa, sp, [](T gv, T xv, T m, T& da, T& db) {
    da = gv;
    db = gv * (xv - m);
  });
}

// out = α[n, c] · g + β[n, c] · x + γ[n, c]; without g (null) out = β · x + γ.
template <typename T>
void affine_pass(const T* g, const T* x, T* out, const Shape& d, const std::vector<double>& alpha,
                 const std::vector<double>& beta, const std::vector<double>& gamma) {
  const int64_t nc = d.n * d.c;
  std::vector<T> al(g ? nc : 0), be(nc), ga(nc);
  for (int64_t p = 0; p < nc; ++p) {
    if (g) al[p] = static_cast<T>(alpha[p]);
    be[p] = static_cast<T>(beta[p]);
    ga[p] = static_cast<T>(gamma[p]);
  }
  if (!d.last) {
    at::parallel_for(0, nc, plane_grain(d.s), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const T* xp = x + p * d.s;
        T* op = out + p * d.s;
        const T b = be[p], c = ga[p];
        if (g) {
          const T* gp = g + p * d.s;
          const T a = al[p];
#pragma omp simd
          for (int64_t i = 0; i < d.s; ++i) op[i] = a * gp[i] + b * xp[i] + c;
        } else {
#pragma omp simd
          for (int64_t i = 0; i < d.s; ++i) op[i] = b * xp[i] + c;
        }
      }
    });
    return;
  }
  // Rows of C values; one task is a range of rows of one sample or more.
  at::parallel_for(0, d.n * d.s, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, d.c)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       const int64_t i = r / d.s;
                       const T* xr = x + r * d.c;
                       T* orow = out + r * d.c;
                       const T* b = be.data() + i * d.c;
                       const T* c = ga.data() + i * d.c;
                       if (g) {
                         const T* gr = g + r * d.c;
                         const T* a = al.data() + i * d.c;
#pragma omp simd
                         for (int64_t j = 0; j < d.c; ++j) {
                           orow[j] = a[j] * gr[j] + b[j] * xr[j] + c[j];
                         }
                       } else {
#pragma omp simd
                         for (int64_t j = 0; j < d.c; ++j) orow[j] = b[j] * xr[j] + c[j];
                       }
                     }
                   });
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_contiguous(), "normkit kernel: a contiguous parameter");
  return t->data_ptr<T>();
}

// Parameters and indices as the kernels read them: contiguous (a view with strides, such as an
// index sliced from a larger one, is copied; a contiguous tensor is passed as is).
optional<Tensor> dense(const optional<Tensor>& t) {
  return t.has_value() ? optional<Tensor>(t->contiguous()) : t;
}

// running ← lerp(running, batch, f) with the unbiased batch variance, as torch's lerp_ computes
// it, for one row of (R, C) buffers (R = num_batches_tracked.numel()); skipped for rows with at
// most one value and for channels whose statistics are not finite (normkit._stats.track_batch_).
template <typename T>
void track_row(T* rm, T* rv, int64_t* nbt, const T* mean, const T* var, double values,
               double momentum, int64_t c) {
  if (values <= 1.0) return;
  *nbt += 1;
  const T f = static_cast<T>(momentum < 0 ? 1.0 / static_cast<double>(std::max<int64_t>(*nbt, 1))
                                          : momentum);
  const T corr = static_cast<T>(values / (values - 1.0));
  auto lerp = [f](T a, T b) { return f < T(0.5) ? a + f * (b - a) : b - (b - a) * (T(1) - f); };
  for (int64_t ch = 0; ch < c; ++ch) {
    const T v = var[ch] * corr;
    if (!std::isfinite(mean[ch] + v)) continue;
    if (rm) rm[ch] = lerp(rm[ch], mean[ch]);
    rv[ch] = lerp(rv[ch], v);
  }
}

// The buffers an operator is about to change in place, marked changed as torch's in-place
// operators mark theirs (autograd's saved-tensor checks see it; an inference tensor outside
// inference mode is refused here, before anything changes, as torch refuses it).
void bump_versions(std::initializer_list<optional<Tensor>> buffers) {
  for (const auto& t : buffers) {
    if (t.has_value()) t->unsafeGetTensorImpl()->bump_version();
  }
}

// Rows of (G, C) batch statistics over values[g] values each into (R, C) running buffers
// (R = num_batches_tracked.numel()): row g into buffer row g, or, with row >= 0, the single row
// into buffer row `row`. No buffers (running_var absent): nothing to do.
template <typename T>
void track_groups(const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                  const optional<Tensor>& num_batches_tracked, const T* mean, const T* var,
                  const std::vector<double>& values, int64_t c, int64_t row, double momentum) {
  if (!running_var.has_value()) return;
  TORCH_CHECK(num_batches_tracked.has_value() &&
                  num_batches_tracked->scalar_type() == at::kLong &&
                  num_batches_tracked->is_contiguous(),
              "normkit kernel: num_batches_tracked");
  const int64_t rows = num_batches_tracked->numel();
  const int64_t ng = static_cast<int64_t>(values.size());
  TORCH_CHECK(row >= 0 ? (ng == 1 && row < rows) : ng == rows, "normkit kernel: buffer rows");
  for (const auto* buffer : {&running_mean, &running_var}) {
    if (buffer->has_value()) {
      TORCH_CHECK((*buffer)->is_contiguous() && (*buffer)->numel() == rows * c &&
                      (*buffer)->scalar_type() == c10::CppTypeToScalarType<T>::value,
                  "normkit kernel: running buffers of (R, C) values in the input's dtype");
    }
  }
  bump_versions({running_mean, running_var, num_batches_tracked});
  T* rm = running_mean.has_value() ? running_mean->data_ptr<T>() : nullptr;
  T* rv = running_var->data_ptr<T>();
  int64_t* nbt = num_batches_tracked->data_ptr<int64_t>();
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t r = row >= 0 ? row : g;
    track_row<T>(rm ? rm + r * c : nullptr, rv + r * c, nbt + r, mean + g * c, var + g * c,
                 values[g], momentum, c);
  }
}

// ---- The batch-norm core ------------------------------------------------------------------------

// Per-sample domain k and statistics group g.
struct Index {
  const int64_t* idx;
  int64_t domain;
  bool split;
  int64_t k(int64_t n) const { return idx ? idx[n] : domain; }
  int64_t g(int64_t n) const { return split ? idx[n] : 0; }
};

// (the index is a dense (N,) int64 tensor whose values check_core_args has checked)
Index index_of(const optional<Tensor>& index, int64_t domain, int64_t groups) {
  return {index.has_value() ? index->data_ptr<int64_t>() : nullptr, domain, groups > 0};
}

// Samples per statistics group and reciprocals (0 for an empty group) of the sample and value
// counts: divisions hoisted out of the per-channel loops.
struct Counts {
  std::vector<int64_t> samples;
  std::vector<double> inv_samples, inv_values;
};

Counts count_groups(const Index& ix, int64_t n, int64_t ng, int64_t s) {
  Counts k{std::vector<int64_t>(ng, 0), std::vector<double>(ng, 0.0),
           std::vector<double>(ng, 0.0)};
  for (int64_t i = 0; i < n; ++i) k.samples[ix.g(i)] += 1;
  for (int64_t g = 0; g < ng; ++g) {
    if (k.samples[g] > 0) {
      k.inv_samples[g] = 1.0 / static_cast<double>(k.samples[g]);
      k.inv_values[g] = 1.0 / static_cast<double>(k.samples[g] * s);
    }
  }
  return k;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& dweight, const optional<Tensor>& dbias, const optional<Tensor>& index,
    int64_t domain, int64_t groups, double eps, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, int64_t row,
    double momentum) {
  const Shape d = shape_of(x, "normkit core kernel");
  const int64_t n = d.n, c = d.c, s = d.s;
  const int64_t ng = groups > 0 ? groups : 1;
  const Index ix = index_of(index, domain, groups);
  const Counts cnt = count_groups(ix, n, ng, s);
  auto opts = x.options();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({ng, c}, opts), var = at::empty({ng, c}, opts);
  Tensor count = at::empty({ng}, opts);
  T* cp = count.data_ptr<T>();
  for (int64_t g = 0; g < ng; ++g) cp[g] = static_cast<T>(cnt.samples[g]);
  std::vector<double> m(n * c), q(n * c);
  moments<T>(x.data_ptr<T>(), d, m.data(), q.data());
  // Group statistics from the plane moments (Chan's merge), rounded to T as the PyTorch path
  // stores them, and the inverse std from the rounded variance.
  T* mp = mean.data_ptr<T>();
  T* vp = var.data_ptr<T>();
  std::vector<double> gm(ng * c, 0.0), inv(ng * c, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = ix.g(i);
    for (int64_t ch = 0; ch < c; ++ch) gm[g * c + ch] += m[i * c + ch];
  }
  for (int64_t g = 0; g < ng; ++g) {
    for (int64_t ch = 0; ch < c; ++ch) gm[g * c + ch] *= cnt.inv_samples[g];
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = ix.g(i);
    for (int64_t ch = 0; ch < c; ++ch) {
      const double e = m[i * c + ch] - gm[g * c + ch];
      inv[g * c + ch] += (q[i * c + ch] + e * e) * static_cast<double>(s);
    }
  }
  for (int64_t g = 0; g < ng; ++g) {
    const double inv_values = cnt.inv_values[g];
    for (int64_t j = g * c; j < (g + 1) * c; ++j) {
      mp[j] = static_cast<T>(gm[j]);
      vp[j] = static_cast<T>(inv[j] * inv_values);
      gm[j] = static_cast<double>(mp[j]);
      inv[j] = static_cast<double>(vp[j]) + eps;
    }
  }
  for (int64_t j = 0; j < ng * c; ++j) inv[j] = 1.0 / std::sqrt(inv[j]);
  // The running statistics, from the rounded statistics as the PyTorch path updates them.
  std::vector<double> values(ng);
  for (int64_t g = 0; g < ng; ++g) values[g] = static_cast<double>(cnt.samples[g] * s);
  track_groups<T>(running_mean, running_var, num_batches_tracked, mp, vp, values, c, row,
                  momentum);
  // The folded affine.
  const T* w = ptr_or_null<T>(weight);
  const T* b = ptr_or_null<T>(bias);
  const T* dw = ptr_or_null<T>(dweight);
  const T* db = ptr_or_null<T>(dbias);
  std::vector<double> scale(n * c), shift(n * c);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = ix.g(i), k = ix.k(i);
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t at_g = g * c + ch;
      double a = inv[at_g], sh = -gm[at_g] * inv[at_g];
      if (w) {
        sh = sh * w[ch] + b[ch];
        a *= w[ch];
      }
      if (dw) {
        sh = sh * dw[k * c + ch] + db[k * c + ch];
        a *= dw[k * c + ch];
      }
      scale[i * c + ch] = a;
      shift[i * c + ch] = sh;
    }
  }
  affine_pass<T>(nullptr, x.data_ptr<T>(), y.data_ptr<T>(), d, {}, scale, shift);
  return {y, mean, var, count};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& gy_in, const Tensor& x, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& dweight, const optional<Tensor>& index,
    int64_t domain, int64_t groups, const Tensor& mean, const Tensor& var, double eps,
    std::array<bool, 5> mask) {
  const Shape d = shape_of(x, "normkit core kernel");
  const int64_t n = d.n, c = d.c, s = d.s;
  const int64_t ng = groups > 0 ? groups : 1;
  const Index ix = index_of(index, domain, groups);
  const Counts cnt = count_groups(ix, n, ng, s);
  const Tensor gy = like(gy_in, d, x);
  const int64_t kd = dweight.has_value() ? dweight->size(0) : 0;
  auto opts = x.options();
  const T* mp = mean.data_ptr<T>();
  const T* vp = var.data_ptr<T>();
  const T* w = ptr_or_null<T>(weight);
  const T* b = ptr_or_null<T>(bias);
  const T* dw = ptr_or_null<T>(dweight);
  std::vector<T> centre(n * c);
  for (int64_t i = 0; i < n; ++i) {
    std::copy(mp + ix.g(i) * c, mp + (ix.g(i) + 1) * c, centre.begin() + i * c);
  }
  std::vector<double> sa(n * c), sp(n * c), inv(ng * c);
  grad_sums<T>(gy.data_ptr<T>(), x.data_ptr<T>(), d, centre.data(), sa.data(), sp.data());
  for (int64_t j = 0; j < ng * c; ++j) inv[j] = 1.0 / std::sqrt(static_cast<double>(vp[j]) + eps);
  // Per (n, c): B = Σ g · x̂ = P · invstd; the parameter gradients; and the group sums of the
  // total scale on x̂ times A and B.
  std::vector<double> tot(n * c), ga(ng * c, 0.0), gb(ng * c, 0.0), gw(c, 0.0), gbias(c, 0.0);
  std::vector<double> gdw(kd * c, 0.0), gdb(kd * c, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = ix.g(i), k = ix.k(i);
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t p = i * c + ch;
      const double a = sa[p], bb = sp[p] * inv[g * c + ch];
      const double gk = dw ? static_cast<double>(dw[k * c + ch]) : 1.0;
      const double wc = w ? static_cast<double>(w[ch]) : 1.0;
      if (kd) {
        gdw[k * c + ch] += w ? wc * bb + static_cast<double>(b[ch]) * a : bb;
        gdb[k * c + ch] += a;
      }
      gw[ch] += gk * bb;
      gbias[ch] += gk * a;
      tot[p] = wc * gk;
      ga[g * c + ch] += tot[p] * a;
      gb[g * c + ch] += tot[p] * bb;
    }
  }
  auto to_tensor = [&](const std::vector<double>& v, std::vector<int64_t> size) {
    Tensor t = at::empty(size, opts);
    T* o = t.data_ptr<T>();
    for (size_t j = 0; j < v.size(); ++j) o[j] = static_cast<T>(v[j]);
    return t;
  };
  Tensor t_gw = mask[1] && w ? to_tensor(gw, {c}) : Tensor();
  Tensor t_gb = mask[2] && w ? to_tensor(gbias, {c}) : Tensor();
  Tensor t_gdw = mask[3] && kd ? to_tensor(gdw, {kd, c}) : Tensor();
  Tensor t_gdb = mask[4] && kd ? to_tensor(gdb, {kd, c}) : Tensor();
  Tensor dx;
  if (mask[0]) {
    // ∂x = invstd · (tot · g − Σ_G tot A / M − x̂ · Σ_G tot B / M) = α g + β x + γ.
    std::vector<double> alpha(n * c), beta(n * c), gamma(n * c);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t g = ix.g(i);
      const double mneg = -cnt.inv_values[g];
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t p = i * c + ch, at_g = g * c + ch;
        const double iv = inv[at_g];
        alpha[p] = iv * tot[p];
        beta[p] = iv * iv * gb[at_g] * mneg;
        gamma[p] = iv * ga[at_g] * mneg - static_cast<double>(mp[at_g]) * beta[p];
      }
    }
    dx = at::empty_like(x);
    affine_pass<T>(gy.data_ptr<T>(), x.data_ptr<T>(), dx.data_ptr<T>(), d, alpha, beta, gamma);
  }
  return {dx, t_gw, t_gb, t_gdw, t_gdb};
}

// The shapes of the affines and the values of the index, checked before anything is read or any
// buffer changes: the layers call the kernel without Python checks of their own on these
// (normkit.layers.core._BatchNormCore._kernel_call), and turn a failure here into their named
// error.
void check_core_args(const Tensor& x, const optional<Tensor>& weight,
                     const optional<Tensor>& bias, const optional<Tensor>& dweight,
                     const optional<Tensor>& dbias, const optional<Tensor>& index, int64_t domain,
                     int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "normkit core kernel: an (N, C, ...) input");
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.has_value() == bias.has_value() && dweight.has_value() == dbias.has_value(),
              "normkit core kernel: affines in pairs");
  for (const auto* t : {&weight, &bias, &dweight, &dbias}) {
    TORCH_CHECK(!t->has_value() || (*t)->scalar_type() == x.scalar_type(),
                "normkit core kernel: affines in the input's dtype");
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->numel() == c && bias->numel() == c,
                "normkit core kernel: a shared affine of C values");
  }
  int64_t limit = groups > 0 ? groups : std::numeric_limits<int64_t>::max();
  if (dweight.has_value()) {
    TORCH_CHECK(dweight->dim() == 2 && dweight->size(1) == c && dbias->sizes() == dweight->sizes(),
                "normkit core kernel: per-domain affines of shape (K, C)");
    limit = std::min(limit, dweight->size(0));
  }
  if (!index.has_value()) {
    TORCH_CHECK(groups == 0, "normkit core kernel: groups need an index");
    TORCH_CHECK(!dweight.has_value() || (domain >= 0 && domain < limit),
                "normkit core kernel: domain out of range");
    return;
  }
  TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 1 &&
                  index->size(0) == x.size(0) && index->device().is_cpu(),
              "normkit core kernel: an index of shape (N,), int64, on the CPU");
  const int64_t* v = index->data_ptr<int64_t>();  // (dense: core_forward passes dense(index))
  for (int64_t i = 0; i < index->numel(); ++i) {
    TORCH_CHECK(v[i] >= 0 && v[i] < limit, "normkit core kernel: index value out of range");
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> core_forward(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& dweight, const optional<Tensor>& dbias, const optional<Tensor>& index,
    int64_t domain, int64_t groups, double eps, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, int64_t row,
    double momentum) {
  const optional<Tensor> idx = dense(index);
  check_core_args(x, weight, bias, dweight, dbias, idx, domain, groups);
  if (x.scalar_type() == at::kDouble) {
    return forward_impl<double>(x, dense(weight), dense(bias), dense(dweight), dense(dbias), idx,
                                domain, groups, eps, running_mean, running_var,
                                num_batches_tracked, row, momentum);
  }
  return forward_impl<float>(x, dense(weight), dense(bias), dense(dweight), dense(dbias), idx,
                             domain, groups, eps, running_mean, running_var, num_batches_tracked,
                             row, momentum);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> core_backward(
    const Tensor& gy, const Tensor& x, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& dweight, const optional<Tensor>& index,
    int64_t domain, int64_t groups, const Tensor& mean, const Tensor& var, double eps,
    std::array<bool, 5> mask) {
  if (x.scalar_type() == at::kDouble) {
    return backward_impl<double>(gy, x, dense(weight), dense(bias), dense(dweight), dense(index),
                                 domain, groups, mean, var, eps, mask);
  }
  return backward_impl<float>(gy, x, dense(weight), dense(bias), dense(dweight), dense(index),
                              domain, groups, mean, var, eps, mask);
}

// ---- Batch-Channel Normalization (normkit.layers.batch_channel) --------------------------------
//
// x1 = a_c x + b_c (the batch part: a = γ_b / sqrt(σ²_c + eps), b = β_b − μ_c a, with the batch's
// or the estimated μ, σ²), then a group norm of x1 per (sample, group) and the group affine:
// y = scale[n, c] x + shift[n, c]. The group moments of x1 follow from the moments m, q of x in
// closed form, so the forward is one reduction pass and one apply pass.

struct Groups {
  int64_t groups, per;
  bool per_channel;  // a group affine per channel (else per group)
};

Groups groups_of(const Shape& d, int64_t groups, bool per_channel) {
  TORCH_CHECK(d.n * d.c * d.s > 0, "normkit bcn kernel: a non-empty input");
  TORCH_CHECK(groups > 0 && d.c % groups == 0, "normkit bcn kernel: groups must divide C");
  return {groups, d.c / groups, per_channel};
}

// The batch part (a, b) per channel and the group part per (n, g): mean gm and inverse std t,
// in double; with gw (and gb) given, also the folded scale and shift (N, C).
template <typename T>
void bcn_fold(const Shape& d, const Groups& gr, const T* mp, const T* qp,
              const std::vector<double>& mean, const std::vector<double>& var, const T* w,
              const T* b, const T* gw, const T* gb, double eps, std::vector<double>& a,
              std::vector<double>& bb, std::vector<double>& gm, std::vector<double>& t,
              std::vector<double>& scale, std::vector<double>& shift) {
  const int64_t n = d.n, c = d.c, groups = gr.groups, per = gr.per;
  for (int64_t ch = 0; ch < c; ++ch) {
    const double inv = 1.0 / std::sqrt(var[ch] + eps);
    a[ch] = w ? inv * static_cast<double>(w[ch]) : inv;
    bb[ch] = b ? static_cast<double>(b[ch]) - mean[ch] * a[ch] : -mean[ch] * a[ch];
  }
  const double inv_per = 1.0 / static_cast<double>(per);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      double sm = 0.0;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        sm += a[j] * static_cast<double>(mp[i * c + j]) + bb[j];
      }
      sm *= inv_per;
      double sv = 0.0;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        const double e = a[j] * static_cast<double>(mp[i * c + j]) + bb[j] - sm;
        sv += a[j] * a[j] * static_cast<double>(qp[i * c + j]) + e * e;
      }
      const double tg = 1.0 / std::sqrt(std::max(0.0, sv * inv_per) + eps);
      gm[i * groups + g] = sm;
      t[i * groups + g] = tg;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        double sc = a[j] * tg, sh = (bb[j] - sm) * tg;
        if (gw) {
          const int64_t k = gr.per_channel ? j : g;
          sc *= static_cast<double>(gw[k]);
          sh = sh * static_cast<double>(gw[k]) + static_cast<double>(gb[k]);
        }
        scale[i * c + j] = sc;
        shift[i * c + j] = sh;
      }
    }
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bcn_forward_impl(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& gweight, const optional<Tensor>& gbias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, int64_t groups, bool per_channel,
    bool estimate, double eps, double rate, double momentum) {
  const Shape d = shape_of(x, "normkit bcn kernel");
  const Groups gr = groups_of(d, groups, per_channel);
  const int64_t n = d.n, c = d.c;
  auto opts = x.options();
  Tensor y = at::empty_like(x);
  Tensor m = at::empty({n, c}, opts), q = at::empty({n, c}, opts);
  Tensor mean_t = at::empty({c}, opts), var_t = at::empty({c}, opts);
  T* mp = m.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  {
    std::vector<double> md(n * c), qd(n * c);
    moments<T>(x.data_ptr<T>(), d, md.data(), qd.data());
    for (int64_t p = 0; p < n * c; ++p) {
      mp[p] = static_cast<T>(md[p]);
      qp[p] = static_cast<T>(qd[p]);
    }
  }
  // The batch part's statistics: the batch's, or the estimates after this batch's update.
  T* rm = running_mean.has_value() ? running_mean->data_ptr<T>() : nullptr;
  T* rv = running_var.has_value() ? running_var->data_ptr<T>() : nullptr;
  int64_t* nbt = num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>()
                                                 : nullptr;
  TORCH_CHECK(!estimate || (rm && rv && nbt), "normkit bcn kernel: estimates need buffers");
  if (rv) bump_versions({running_mean, running_var, num_batches_tracked});
  std::vector<T> bm(c), bv(c);
  const double inv_n = 1.0 / static_cast<double>(n);
  for (int64_t ch = 0; ch < c; ++ch) {
    double sm = 0.0;
    for (int64_t i = 0; i < n; ++i) sm += static_cast<double>(mp[i * c + ch]);
    // The centre of the variance: the batch mean, or the previous mean estimate.
    const T centre = estimate ? rm[ch] : static_cast<T>(sm * inv_n);
    double sv = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double e = static_cast<double>(mp[i * c + ch]) - static_cast<double>(centre);
      sv += static_cast<double>(qp[i * c + ch]) + e * e;
    }
    bm[ch] = static_cast<T>(sm * inv_n);
    bv[ch] = static_cast<T>(estimate ? sv * inv_n : std::max(0.0, sv * inv_n));
  }
  if (estimate) {
    // As normkit._stats.estimate_update_eager_: lerp by the rate where both are finite.
    *nbt += 1;
    const T r = static_cast<T>(rate);
    auto lerp = [r](T lo, T hi) {
      return r < T(0.5) ? lo + r * (hi - lo) : hi - (hi - lo) * (T(1) - r);
    };
    for (int64_t ch = 0; ch < c; ++ch) {
      if (std::isfinite(bm[ch]) && std::isfinite(bv[ch])) {
        rm[ch] = lerp(rm[ch], bm[ch]);
        rv[ch] = lerp(rv[ch], bv[ch]);
      }
      bm[ch] = rm[ch];
      bv[ch] = rv[ch];
    }
  } else if (rv) {
    track_row<T>(rm, rv, nbt, bm.data(), bv.data(), static_cast<double>(n * d.s), momentum, c);
  }
  T* mt = mean_t.data_ptr<T>();
  T* vt = var_t.data_ptr<T>();
  std::vector<double> mean(c), var(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    mt[ch] = bm[ch];
    vt[ch] = bv[ch];
    mean[ch] = static_cast<double>(bm[ch]);
    var[ch] = static_cast<double>(bv[ch]);
  }
  std::vector<double> a(c), bb(c), gm(n * groups), t(n * groups), scale(n * c), shift(n * c);
  bcn_fold<T>(d, gr, mp, qp, mean, var, ptr_or_null<T>(weight), ptr_or_null<T>(bias),
              ptr_or_null<T>(gweight), ptr_or_null<T>(gbias), eps, a, bb, gm, t, scale, shift);
  affine_pass<T>(nullptr, x.data_ptr<T>(), y.data_ptr<T>(), d, {}, scale, shift);
  return {y, m, q, mean_t, var_t};
}

// The closed form of normkit.layers.batch_channel._BatchChannelNorm._moment_backward (whose
// docstring derives it), per (n, c) in double.
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bcn_backward_impl(
    const Tensor& gy_in, const Tensor& x, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& gweight, const Tensor& m,
    const Tensor& q, const Tensor& mean_t, const Tensor& var_t, int64_t groups, bool per_channel,
    bool estimate, double eps, std::array<bool, 5> mask) {
  const Shape d = shape_of(x, "normkit bcn kernel");
  const Groups gr = groups_of(d, groups, per_channel);
  const int64_t n = d.n, c = d.c, per = gr.per, s = d.s;
  const Tensor gy = like(gy_in, d, x);
  const T* mp = m.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* w = ptr_or_null<T>(weight);
  const T* gw = ptr_or_null<T>(gweight);
  std::vector<double> mean(c), var(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = static_cast<double>(mean_t.data_ptr<T>()[ch]);
    var[ch] = static_cast<double>(var_t.data_ptr<T>()[ch]);
  }
  // (scale and shift are not needed: no group affine for this fold)
  std::vector<double> a(c), bb(c), gm(n * groups), t(n * groups), scale(n * c), shift(n * c);
  bcn_fold<T>(d, gr, mp, qp, mean, var, w, ptr_or_null<T>(bias), nullptr, nullptr, eps, a, bb,
              gm, t, scale, shift);
  std::vector<double> sa(n * c), sp(n * c);  // Σ g and Σ g (x − m) per plane
  grad_sums<T>(gy.data_ptr<T>(), x.data_ptr<T>(), d, mp, sa.data(), sp.data());
  // The group affine's scale of channel j in group g.
  auto gwv = [&](int64_t j, int64_t g) {
    return gw ? static_cast<double>(gw[per_channel ? j : g]) : 1.0;
  };
  const int64_t gsize = per_channel ? c : groups;
  std::vector<double> dgw(gsize, 0.0), dgb(gsize, 0.0);
  std::vector<double> alpha(n * c), beta(n * c), gamma(n * c), t1(c, 0.0), t2(c, 0.0);
  const double k = 1.0 / static_cast<double>(s * per);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const double tg = t[i * groups + g];
      double h1 = 0.0, h2 = 0.0;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        const int64_t p = i * c + j;
        const double e = a[j] * static_cast<double>(mp[p]) + bb[j] - gm[i * groups + g];
        const double xh = tg * (a[j] * sp[p] + e * sa[p]);  // Σ g · x̂1
        dgw[per_channel ? j : g] += xh;
        dgb[per_channel ? j : g] += sa[p];
        h1 += gwv(j, g) * sa[p];
        h2 += gwv(j, g) * xh;
      }
      h1 *= k;
      const double t2h2 = h2 * k * tg * tg;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        const int64_t p = i * c + j;
        const double e = a[j] * static_cast<double>(mp[p]) + bb[j] - gm[i * groups + g];
        alpha[p] = tg * gwv(j, g);  // dx1 = alpha g + beta (x − m) + gamma
        beta[p] = -t2h2 * a[j];
        gamma[p] = -tg * h1 - t2h2 * e;
        // Σ_s dx1 and Σ_s dx1 (x − μ) of the plane.
        const double s1 = alpha[p] * sa[p] + gamma[p] * static_cast<double>(s);
        const double dev = static_cast<double>(mp[p]) - mean[j];
        const double s2 =
            alpha[p] * sp[p] + beta[p] * static_cast<double>(qp[p]) * static_cast<double>(s) +
            dev * s1;
        t1[j] += s1;
        t2[j] += s2;
      }
    }
  }
  auto opts = x.options();
  auto to_tensor = [&](const std::vector<double>& v) {
    Tensor out = at::empty({static_cast<int64_t>(v.size())}, opts);
    T* o = out.data_ptr<T>();
    for (size_t j = 0; j < v.size(); ++j) o[j] = static_cast<T>(v[j]);
    return out;
  };
  Tensor t_dgw = mask[3] && gw ? to_tensor(dgw) : Tensor();
  Tensor t_dgb = mask[4] && gw ? to_tensor(dgb) : Tensor();
  std::vector<double> dwv(c), dbv(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    dwv[ch] = t2[ch] / std::sqrt(var[ch] + eps);
    dbv[ch] = t1[ch];
  }
  Tensor t_dw = mask[1] && w ? to_tensor(dwv) : Tensor();
  Tensor t_db = mask[2] && w ? to_tensor(dbv) : Tensor();
  Tensor dx;
  if (mask[0]) {
    // dx = a dx1 with fixed statistics; with batch statistics, the batch-norm backward through
    // μ and σ² of the batch.
    const double inv_m = estimate ? 0.0 : 1.0 / static_cast<double>(n * s);
    std::vector<double> d2v(c), dcv(c);  // per channel, out of the (n, c) loop
    for (int64_t j = 0; j < c; ++j) {
      d2v[j] = t2[j] / (var[j] + eps) * inv_m;
      dcv[j] = t1[j] * inv_m;
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < c; ++j) {
        const int64_t p = i * c + j;
        const double d2 = d2v[j], dc = dcv[j];
        const double mv = static_cast<double>(mp[p]);
        const double be = a[j] * (beta[p] - d2);
        const double g0 = a[j] * (gamma[p] - dc - d2 * (mv - mean[j]));
        alpha[p] *= a[j];
        beta[p] = be;
        gamma[p] = g0 - be * mv;
      }
    }
    dx = at::empty_like(x);
    affine_pass<T>(gy.data_ptr<T>(), x.data_ptr<T>(), dx.data_ptr<T>(), d, alpha, beta, gamma);
  }
  return {dx, t_dw, t_db, t_dgw, t_dgb};
}

// ---- Autograd plumbing shared by both operators ----------------------------------------------

// The five differentiable inputs of either operator: x, then two pairs of affine parameters.
using Inputs = std::array<Tensor, 5>;
using Needs = std::array<bool, 5>;

using normkit_autograd::input_needs;
using normkit_autograd::reference_grads;

// The kernel's five gradients in the first slots of `num_args`, those not needed left empty.
torch::autograd::variable_list kernel_grads(
    const std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>& g, const Needs& needs,
    size_t num_args) {
  torch::autograd::variable_list out(num_args);
  const std::array<Tensor, 5> all{std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g),
                                  std::get<4>(g)};
  for (size_t i = 0; i < all.size(); ++i) {
    if (needs[i]) out[i] = all[i];
  }
  return out;
}

optional<Tensor> given(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

// The backward of either operator (both take 14 arguments): with grad mode on, the gradients of
// `reference(inputs)`; else `kernel(needs)`'s five gradients.
template <typename Reference, typename Kernel>
torch::autograd::variable_list backward_of(torch::autograd::AutogradContext* ctx,
                                           const Inputs& in, const Tensor& gy,
                                           Reference reference, Kernel kernel) {
  constexpr size_t kArgs = 14;
  const Needs needs = input_needs(ctx, in);
  if (!gy.defined()) return torch::autograd::variable_list(kArgs);
  if (at::GradMode::is_enabled()) return reference_grads(in, needs, gy, kArgs, reference);
  return kernel_grads(kernel(needs), needs, kArgs);
}

// BCN's reference composition in differentiable ATen operators (double backward).
Tensor bcn_reference(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& gw,
                     const Tensor& gb, const Tensor& mean_fixed, const Tensor& var_fixed,
                     int64_t groups, bool per_channel, bool estimate, double eps) {
  const int64_t n = x.size(0), c = x.size(1), per = c / groups;
  std::vector<int64_t> spatial;
  for (int64_t dd = 2; dd < x.dim(); ++dd) spatial.push_back(dd);
  auto [q, m] = at::var_mean(x, spatial, /*correction=*/0, /*keepdim=*/false);
  Tensor mean = mean_fixed, var = var_fixed;
  if (!estimate) {
    mean = m.mean(0);
    var = (q + (m - mean).square()).mean(0).clamp_min(0);
  }
  Tensor a = at::rsqrt(var + eps);
  Tensor bb = -mean * a;
  if (w.defined()) {
    a = a * w;
    bb = bb * w + b;
  }
  Tensor ym = (a * m + bb).reshape({n, groups, per});
  Tensor yq = (a.square() * q).reshape({n, groups, per});
  Tensor gmean = ym.mean(2, true);
  Tensor gvar = (yq + (ym - gmean).square()).mean(2, true).clamp_min(0);
  Tensor tt = at::rsqrt(gvar + eps);
  Tensor scale = (a.reshape({1, groups, per}) * tt).reshape({n, c});
  Tensor shift = ((bb.reshape({1, groups, per}) - gmean) * tt).reshape({n, c});
  if (gw.defined()) {
    Tensor gwc = per_channel ? gw : gw.repeat_interleave(per);
    Tensor gbc = per_channel ? gb : gb.repeat_interleave(per);
    scale = scale * gwc;
    shift = shift * gwc + gbc;
  }
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = n;
  shape[1] = c;
  return x * scale.reshape(shape) + shift.reshape(shape);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bcn_forward(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& gweight, const optional<Tensor>& gbias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, int64_t groups, bool per_channel,
    bool estimate, double eps, double rate, double momentum) {
  const int64_t c = x.dim() > 1 ? x.size(1) : 0;
  for (const auto* buffer : {&running_mean, &running_var}) {
    if (buffer->has_value()) {
      TORCH_CHECK((*buffer)->is_contiguous() && (*buffer)->numel() == c &&
                      (*buffer)->scalar_type() == x.scalar_type(),
                  "normkit bcn kernel: running buffers of C values in the input's dtype");
    }
  }
  TORCH_CHECK(!running_var.has_value() ||
                  (num_batches_tracked.has_value() &&
                   num_batches_tracked->scalar_type() == at::kLong &&
                   num_batches_tracked->numel() == 1),
              "normkit bcn kernel: a num_batches_tracked counter with the running buffers");
  // The affines' sizes (the layer calls the kernel without Python checks of its own on them).
  TORCH_CHECK(weight.has_value() == bias.has_value() && gweight.has_value() == gbias.has_value(),
              "normkit bcn kernel: affines in pairs");
  TORCH_CHECK(!weight.has_value() || (weight->numel() == c && bias->numel() == c),
              "normkit bcn kernel: a batch affine of C values");
  TORCH_CHECK(!gweight.has_value() || (gweight->numel() == (per_channel ? c : groups) &&
                                       gbias->numel() == gweight->numel()),
              "normkit bcn kernel: a group affine of G (per group) or C (per channel) values");
  if (x.scalar_type() == at::kDouble) {
    return bcn_forward_impl<double>(x, dense(weight), dense(bias), dense(gweight), dense(gbias),
                                    running_mean, running_var, num_batches_tracked, groups,
                                    per_channel, estimate, eps, rate, momentum);
  }
  return bcn_forward_impl<float>(x, dense(weight), dense(bias), dense(gweight), dense(gbias),
                                 running_mean, running_var, num_batches_tracked, groups,
                                 per_channel, estimate, eps, rate, momentum);
}

class BcnFunction : public torch::autograd::Function<BcnFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
      const optional<Tensor>& bias, const optional<Tensor>& gweight,
      const optional<Tensor>& gbias, const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
      int64_t groups, bool per_channel, bool estimate, double eps, double rate,
      double momentum) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = bcn_forward(x, weight, bias, gweight, gbias, running_mean, running_var,
                           num_batches_tracked, groups, per_channel, estimate, eps, rate,
                           momentum);
    const Tensor none;
    ctx->save_for_backward({x, weight.value_or(none), bias.value_or(none),
                            gweight.value_or(none), gbias.value_or(none), std::get<1>(out),
                            std::get<2>(out), std::get<3>(out), std::get<4>(out)});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["per_channel"] = per_channel;
    ctx->saved_data["estimate"] = estimate;
    ctx->saved_data["eps"] = eps;
    return {std::get<0>(out)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Inputs in{saved[0], saved[1], saved[2], saved[3], saved[4]};
    const Tensor &x = in[0], &w = in[1], &b = in[2], &gw = in[3], &gb = in[4];
    const Tensor &m = saved[5], &q = saved[6], &mean = saved[7], &var = saved[8];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool per_channel = ctx->saved_data["per_channel"].toBool();
    const bool estimate = ctx->saved_data["estimate"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    return backward_of(
        ctx, in, grads[0],
        [&](const Inputs& a) {
          return bcn_reference(a[0], a[1], a[2], a[3], a[4], mean, var, groups, per_channel,
                               estimate, eps);
        },
        [&](const Needs& needs) {
          const optional<Tensor> wc = dense(given(w)), bc = dense(given(b)), gwc = dense(given(gw));
          const Tensor& gy = grads[0];
          return x.scalar_type() == at::kDouble
                     ? bcn_backward_impl<double>(gy, x, wc, bc, gwc, m, q, mean, var, groups,
                                                 per_channel, estimate, eps, needs)
                     : bcn_backward_impl<float>(gy, x, wc, bc, gwc, m, q, mean, var, groups,
                                                per_channel, estimate, eps, needs);
        });
  }
};

Tensor bcn_forward_autograd(const Tensor& x, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, const optional<Tensor>& gweight,
                            const optional<Tensor>& gbias, const optional<Tensor>& running_mean,
                            const optional<Tensor>& running_var,
                            const optional<Tensor>& num_batches_tracked, int64_t groups,
                            bool per_channel, bool estimate, double eps, double rate,
                            double momentum) {
  return BcnFunction::apply(x, weight, bias, gweight, gbias, running_mean, running_var,
                            num_batches_tracked, groups, per_channel, estimate, eps, rate,
                            momentum)[0];
}

// The operator's CPU kernel (without autograd): the output; the statistics are kept only for
// the autograd node's backward.
Tensor bcn_forward_output(const Tensor& x, const optional<Tensor>& weight,
                          const optional<Tensor>& bias, const optional<Tensor>& gweight,
                          const optional<Tensor>& gbias, const optional<Tensor>& running_mean,
                          const optional<Tensor>& running_var,
                          const optional<Tensor>& num_batches_tracked, int64_t groups,
                          bool per_channel, bool estimate, double eps, double rate,
                          double momentum) {
  return std::get<0>(bcn_forward(x, weight, bias, gweight, gbias, running_mean, running_var,
                                 num_batches_tracked, groups, per_channel, estimate, eps, rate,
                                 momentum));
}

// The reference composition in differentiable ATen operators: batch (or per-group) statistics,
// then both affines. Its autograd graph gives the double backward.
Tensor reference(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& dw,
                 const Tensor& db, const Tensor& index, int64_t domain, int64_t groups,
                 double eps) {
  const int64_t c = x.size(1);
  std::vector<int64_t> bshape(x.dim(), 1);  // (rows, C, 1, ...)
  bshape[1] = c;
  std::vector<int64_t> spatial;
  for (int64_t d = 2; d < x.dim(); ++d) spatial.push_back(d);
  Tensor mean, var;
  if (groups == 0) {
    std::vector<int64_t> dims{0};
    dims.insert(dims.end(), spatial.begin(), spatial.end());
    std::tie(var, mean) = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
    mean = mean.unsqueeze(0);
    var = var.unsqueeze(0);
  } else {
    // Per-group moments merged from per-sample ones.
    std::tie(var, mean) = at::var_mean(x, spatial, /*correction=*/0, /*keepdim=*/false);
    Tensor onehot = at::one_hot(index, groups).to(x.scalar_type());  // (N, K)
    Tensor counts = onehot.sum(0).clamp_min(1).unsqueeze(1);          // (K, 1)
    Tensor gmean = onehot.t().mm(mean) / counts;
    Tensor spread = var + (mean - gmean.index_select(0, index)).square();
    Tensor gvar = onehot.t().mm(spread) / counts;
    mean = gmean.index_select(0, index);
    var = gvar.index_select(0, index);
  }
  Tensor scale = at::rsqrt(var + eps);
  Tensor shift = -mean * scale;
  if (w.defined()) {
    scale = scale * w;
    shift = shift * w + b;
  }
  if (dw.defined()) {
    Tensor gk = index.defined() ? dw.index_select(0, index) : dw.select(0, domain).unsqueeze(0);
    Tensor bk = index.defined() ? db.index_select(0, index) : db.select(0, domain).unsqueeze(0);
    scale = scale * gk;
    shift = shift * gk + bk;
  }
  bshape[0] = scale.size(0);  // scale and shift have the same rows: 1, or N
  return x * scale.reshape(bshape) + shift.reshape(bshape);
}

// The autograd node of core_forward (kStats: y and the statistics) and of core_train (y only,
// the statistics kept for backward alone: the layers' usual call, with fewer outputs to wrap):
// one kernel call each way; with create_graph (grad mode on in backward), the gradients of the
// reference composition instead, so that they can be differentiated again.
template <bool kStats>
class CoreFunction : public torch::autograd::Function<CoreFunction<kStats>> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
      const optional<Tensor>& bias, const optional<Tensor>& dweight,
      const optional<Tensor>& dbias, const optional<Tensor>& index, int64_t domain,
      int64_t groups, double eps, const optional<Tensor>& running_mean,
      const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
      int64_t row, double momentum) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var, count] =
        core_forward(x, weight, bias, dweight, dbias, index, domain, groups, eps, running_mean,
                     running_var, num_batches_tracked, row, momentum);
    const Tensor none;
    ctx->save_for_backward({x, weight.value_or(none), bias.value_or(none),
                            dweight.value_or(none), dbias.value_or(none), index.value_or(none),
                            mean, var});
    ctx->saved_data["domain"] = domain;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    if constexpr (kStats) {
      ctx->mark_non_differentiable({mean, var, count});
      return {y, mean, var, count};
    } else {
      return {y};
    }
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Inputs in{saved[0], saved[1], saved[2], saved[3], saved[4]};
    const Tensor &x = in[0], &w = in[1], &b = in[2], &dw = in[3], &db = in[4];
    const Tensor &index = saved[5], &mean = saved[6], &var = saved[7];
    const int64_t domain = ctx->saved_data["domain"].toInt();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    return backward_of(
        ctx, in, grads[0],
        [&](const Inputs& a) {
          return reference(a[0], a[1], a[2], a[3], a[4], index, domain, groups, eps);
        },
        [&](const Needs& needs) {
          return core_backward(grads[0], x, given(w), given(b), given(dw), given(index), domain,
                               groups, mean, var, eps, needs);
        });
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> core_forward_autograd(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& dweight, const optional<Tensor>& dbias, const optional<Tensor>& index,
    int64_t domain, int64_t groups, double eps, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, int64_t row,
    double momentum) {
  auto out = CoreFunction<true>::apply(x, weight, bias, dweight, dbias, index, domain, groups,
                                       eps, running_mean, running_var, num_batches_tracked, row,
                                       momentum);
  return {out[0], out[1], out[2], out[3]};
}

Tensor core_train(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                  const optional<Tensor>& dweight, const optional<Tensor>& dbias,
                  const optional<Tensor>& index, int64_t domain, int64_t groups, double eps,
                  const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                  const optional<Tensor>& num_batches_tracked, int64_t row, double momentum) {
  return std::get<0>(core_forward(x, weight, bias, dweight, dbias, index, domain, groups, eps,
                                  running_mean, running_var, num_batches_tracked, row, momentum));
}

Tensor core_train_autograd(const Tensor& x, const optional<Tensor>& weight,
                           const optional<Tensor>& bias, const optional<Tensor>& dweight,
                           const optional<Tensor>& dbias, const optional<Tensor>& index,
                           int64_t domain, int64_t groups, double eps,
                           const optional<Tensor>& running_mean,
                           const optional<Tensor>& running_var,
                           const optional<Tensor>& num_batches_tracked, int64_t row,
                           double momentum) {
  return CoreFunction<false>::apply(x, weight, bias, dweight, dbias, index, domain, groups, eps,
                                    running_mean, running_var, num_batches_tracked, row,
                                    momentum)[0];
}


// ---- Weight standardization (normkit._fused.weight_standardize) -------------------------------
//
// Per output filter f (its K = numel / O values, contiguous in memory for a contiguous or
// channels_last weight: dim 0 is outermost in both, and the result does not depend on the order
// within a filter): d = w − mean, v = Σ d² / (K − c) (c = 1 when unbiased), inv = 1 / σ(v) by
// the eps mode (0: sqrt(v + eps), 1: sqrt(v) + eps, 2: sqrt(max(v, eps))) and ŵ = d · inv.
// Sums in double, shifted by the filter's first value. Backward, with A = Σ g, B = Σ g · ŵ:
// ∂w = inv · g + ŵ · B · inv′(v) · 2 / ((K − c) · inv²) − inv · A / K.

at::MemoryFormat weight_format(const Tensor& w) {
  if (w.dim() == 4 && !w.is_contiguous() && w.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (w.dim() == 5 && !w.is_contiguous() && w.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

template <typename T>
void ws_forward_impl(const Tensor& w, const Tensor& out, double* inv, double* dinv, double eps,
                     bool unbiased, int64_t mode) {
  const int64_t o = w.size(0), k = w.numel() / o;
  const double inv_k = 1.0 / static_cast<double>(k);
  const double denom = static_cast<double>(k - (unbiased ? 1 : 0));
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, o, std::max<int64_t>(1, kGrain / k), [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const T* row = wp + f * k;
      T* orow = op + f * k;
      const double first = static_cast<double>(row[0]);
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < k; ++i) sum += static_cast<double>(row[i]) - first;
      // d = (w − first) − mean_shifted: the mean itself (first + mean_shifted) rounded to a
      // double would lose up to ulp(|mean|) in every d of a filter far from zero.
      const double ms = sum * inv_k;
      double sq = 0.0;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < k; ++i) {
        const double d = (static_cast<double>(row[i]) - first) - ms;
        sq += d * d;
      }
      const double v = sq / denom;
      double iv, dv;
      if (mode == 0) {
        iv = 1.0 / std::sqrt(v + eps);
        dv = -0.5 * iv * iv * iv;
      } else if (mode == 1) {
        const double sd = std::sqrt(v);
        iv = 1.0 / (sd + eps);
        dv = -iv * iv / (2.0 * sd);
      } else {
        iv = 1.0 / std::sqrt(std::max(v, eps));
        dv = v >= eps ? -0.5 * iv * iv * iv : 0.0;
      }
      inv[f] = iv;
      dinv[f] = dv;
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) {
        orow[i] = static_cast<T>(((static_cast<double>(row[i]) - first) - ms) * iv);
      }
    }
  });
}

template <typename T>
void ws_backward_impl(const Tensor& g, const Tensor& out, const double* inv, const double* dinv,
                      const Tensor& dw, bool unbiased) {
  const int64_t o = out.size(0), k = out.numel() / o;
  const double inv_k = 1.0 / static_cast<double>(k);
  const double c2 = 2.0 / static_cast<double>(k - (unbiased ? 1 : 0));
  const T* gp = g.data_ptr<T>();
  const T* wh = out.data_ptr<T>();
  T* dp = dw.data_ptr<T>();
  at::parallel_for(0, o, std::max<int64_t>(1, kGrain / k), [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const T* grow = gp + f * k;
      const T* hrow = wh + f * k;
      T* drow = dp + f * k;
      double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < k; ++i) {
        a += static_cast<double>(grow[i]);
        b += static_cast<double>(grow[i]) * static_cast<double>(hrow[i]);
      }
      const double iv = inv[f];
      const double on_hat = b * dinv[f] * c2 / (iv * iv);
      const double constant = iv * a * inv_k;
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) {
        drow[i] = static_cast<T>(iv * static_cast<double>(grow[i]) +
                                 on_hat * static_cast<double>(hrow[i]) - constant);
      }
    }
  });
}

void check_ws_args(const Tensor& w, bool unbiased, int64_t mode) {
  TORCH_CHECK(w.dim() >= 2 && w.size(0) > 0 && w.numel() > 0,
              "normkit ws kernel: a non-empty weight of rank 2 or more");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
              "normkit ws kernel: a float32 or float64 weight");
  TORCH_CHECK(mode >= 0 && mode <= 2, "normkit ws kernel: eps mode 0, 1 or 2");
  TORCH_CHECK(!unbiased || w.numel() / w.size(0) > 1,
              "normkit ws kernel: a fan-in of at least 2 for the unbiased variance");
}

// (ŵ, inv, inv′) with inv and inv′ = d inv / d v per filter, (O,) in double.
std::tuple<Tensor, Tensor, Tensor> ws_forward(const Tensor& weight, double eps, bool unbiased,
                                              int64_t mode) {
  check_ws_args(weight, unbiased, mode);
  const Tensor w = weight.contiguous(weight_format(weight));
  Tensor out = at::empty_like(w);
  auto dopts = w.options().dtype(at::kDouble);
  Tensor inv = at::empty({w.size(0)}, dopts), dinv = at::empty({w.size(0)}, dopts);
  if (w.scalar_type() == at::kDouble) {
    ws_forward_impl<double>(w, out, inv.data_ptr<double>(), dinv.data_ptr<double>(), eps,
                            unbiased, mode);
  } else {
    ws_forward_impl<float>(w, out, inv.data_ptr<double>(), dinv.data_ptr<double>(), eps,
                           unbiased, mode);
  }
  return {out, inv, dinv};
}

Tensor ws_backward(const Tensor& grad, const Tensor& out, const Tensor& inv, const Tensor& dinv,
                   bool unbiased) {
  const Tensor g = grad.to(out.scalar_type()).contiguous(weight_format(out));
  Tensor dw = at::empty_like(out);
  if (out.scalar_type() == at::kDouble) {
    ws_backward_impl<double>(g, out, inv.data_ptr<double>(), dinv.data_ptr<double>(), dw,
                             unbiased);
  } else {
    ws_backward_impl<float>(g, out, inv.data_ptr<double>(), dinv.data_ptr<double>(), dw,
                            unbiased);
  }
  return dw;
}

// The reference composition in differentiable ATen operators (double backward).
Tensor ws_reference(const Tensor& w, double eps, bool unbiased, int64_t mode) {
  std::vector<int64_t> dims;
  std::vector<int64_t> keep(w.dim(), 1);
  keep[0] = w.size(0);
  for (int64_t d = 1; d < w.dim(); ++d) dims.push_back(d);
  const int64_t k = w.numel() / w.size(0);
  const Tensor first = w.detach().reshape({w.size(0), -1}).narrow(1, 0, 1).reshape(keep);
  const Tensor shifted = w - first;
  const Tensor d = shifted - shifted.sum(dims, /*keepdim=*/true) / static_cast<double>(k);
  // The norm squared, as normkit.functional.standardize_parts computes it (the same second
  // derivative, NaN included, for a constant filter).
  const Tensor v = at::linalg_vector_norm(d, 2, dims, /*keepdim=*/true).square() /
                   static_cast<double>(k - unbiased);
  if (mode == 0) return d * at::rsqrt(v + eps);
  if (mode == 1) return d / (at::sqrt(v) + eps);
  return d * at::rsqrt(at::clamp_min(v, eps));
}

class WsFunction : public torch::autograd::Function<WsFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& weight, double eps, bool unbiased,
                                                int64_t mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, inv, dinv] = ws_forward(weight, eps, unbiased, mode);
    ctx->save_for_backward({weight, out, inv, dinv});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["unbiased"] = unbiased;
    ctx->saved_data["mode"] = mode;
    return {out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &weight = saved[0], &out = saved[1], &inv = saved[2], &dinv = saved[3];
    const bool unbiased = ctx->saved_data["unbiased"].toBool();
    torch::autograd::variable_list result(4);
    if (!grads[0].defined()) return result;
    if (at::GradMode::is_enabled()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      const int64_t mode = ctx->saved_data["mode"].toInt();
      result[0] = torch::autograd::grad({ws_reference(weight, eps, unbiased, mode)}, {weight},
                                        {grads[0]}, /*retain_graph=*/std::nullopt,
                                        /*create_graph=*/true, /*allow_unused=*/true)[0];
      return result;
    }
    result[0] = ws_backward(grads[0], out, inv, dinv, unbiased);
    return result;
  }
};

Tensor ws_standardize(const Tensor& weight, double eps, bool unbiased, int64_t mode) {
  return std::get<0>(ws_forward(weight, eps, unbiased, mode));
}

Tensor ws_standardize_autograd(const Tensor& weight, double eps, bool unbiased, int64_t mode) {
  return WsFunction::apply(weight, eps, unbiased, mode)[0];
}

}  // namespace

TORCH_LIBRARY(normkit_kernels, m) {
  m.def(
      "core_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? dweight, Tensor? dbias, "
      "Tensor? index, int domain, int groups, float eps, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, int row, float momentum) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "core_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? dweight, Tensor? dbias, "
      "Tensor? index, int domain, int groups, float eps, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, int row, float momentum) "
      "-> Tensor");
  m.def(
      "bcn_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? group_weight, "
      "Tensor? group_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, int groups, bool per_channel, bool estimate, float eps, "
      "float rate, float momentum) -> Tensor");
  m.def("ws_standardize(Tensor weight, float eps, bool unbiased, int mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(normkit_kernels, CPU, m) {
  m.impl("core_forward", &core_forward);
  m.impl("core_train", &core_train);
  m.impl("bcn_forward", &bcn_forward_output);
  m.impl("ws_standardize", &ws_standardize);
}

TORCH_LIBRARY_IMPL(normkit_kernels, Autograd, m) {
  m.impl("core_forward", &core_forward_autograd);
  m.impl("core_train", &core_train_autograd);
  m.impl("bcn_forward", &bcn_forward_autograd);
  m.impl("ws_standardize", &ws_standardize_autograd);
}
