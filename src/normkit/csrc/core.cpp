// normkit's CPU kernel for the batch-norm core (normkit.layers.core): batch statistics of a
// contiguous (N, C, *S) input, over the whole batch or per group of samples, and one folded
// per-(sample, channel) affine, forward and closed-form backward, each in two passes over the
// activation. Built on demand by normkit.kernels; the PyTorch path in normkit._fused is the
// specification, and tests/test_kernels.py checks this file against it in float64.
//
// With x̂ = (x − μ_g) / sqrt(σ²_g + eps) (g the sample's statistics group: 0 for the whole
// batch, or its domain), k the sample's domain, γ, β the optional shared (C,) affine and
// γ_k, β_k the optional per-domain (K, C) affine:
//
//     y = γ_k ⊙ (γ ⊙ x̂ + β) + β_k = a[n, c] · x + b[n, c].
//
// Statistics: per (sample, channel) plane, shifted sums of x − x[n, c, 0] in float lanes
// flushed to double every kChunk values; planes merged per group in double (Chan's formula).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kChunk = 4096;

// Σ (p[i] − f) and Σ (p[i] − f)² over one plane, in double.
template <typename T>
void plane_sums(const T* p, int64_t s, T f, double& sum, double& sq) {
  sum = 0.0;
  sq = 0.0;
  for (int64_t start = 0; start < s; start += kChunk) {
    const int64_t end = std::min(s, start + kChunk);
    T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = start; i < end; ++i) {
      const T d = p[i] - f;
      a += d;
      b += d * d;
    }
    sum += static_cast<double>(a);
    sq += static_cast<double>(b);
  }
}

// Σ g and Σ g · (x − m) over one plane, in double.
template <typename T>
void grad_sums(const T* g, const T* x, int64_t s, T m, double& sa, double& sp) {
  sa = 0.0;
  sp = 0.0;
  for (int64_t start = 0; start < s; start += kChunk) {
    const int64_t end = std::min(s, start + kChunk);
    T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = start; i < end; ++i) {
      a += g[i];
      b += g[i] * (x[i] - m);
    }
    sa += static_cast<double>(a);
    sp += static_cast<double>(b);
  }
}

struct Layout {
  int64_t n, c, s, k, groups;
};

Layout check_args(const Tensor& x, const optional<Tensor>& index, int64_t groups) {
  TORCH_CHECK(x.dim() > 2 && x.is_contiguous(), "normkit core kernel: contiguous (N, C, *S) input");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "normkit core kernel: float32 or float64 input");
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t s = n * c == 0 ? 0 : x.numel() / (n * c);
  if (index.has_value()) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 1 && index->size(0) == n &&
                    index->is_contiguous(),
                "normkit core kernel: index of shape (N,), int64");
  }
  TORCH_CHECK(groups == 0 || index.has_value(), "normkit core kernel: groups need an index");
  return {n, c, s, 0, groups};
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Per-(sample) domain and statistics group.
struct Index {
  const int64_t* idx;
  int64_t domain;
  bool split;
  int64_t k(int64_t n) const { return idx ? idx[n] : domain; }
  int64_t g(int64_t n) const { return split ? idx[n] : 0; }
};

// Per-group counts of the samples, their reciprocals (0 for an empty group) and the
// reciprocals of the value counts: divisions hoisted out of the per-channel loops, where their
// latency (not their number) bounds small inputs.
struct Counts {
  std::vector<int64_t> samples;
  std::vector<double> inv_samples, inv_values;
};

Counts count_groups(const Index& ix, int64_t n, int64_t ng, int64_t s) {
  Counts k{std::vector<int64_t>(ng, 0), std::vector<double>(ng, 0.0),
           std::vector<double>(ng, 0.0)};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = ix.g(i);
    TORCH_CHECK(g >= 0 && g < ng, "normkit core kernel: group index out of range");
    k.samples[g] += 1;
  }
  for (int64_t g = 0; g < ng; ++g) {
    if (k.samples[g] > 0) {
      k.inv_samples[g] = 1.0 / static_cast<double>(k.samples[g]);
      k.inv_values[g] = 1.0 / static_cast<double>(k.samples[g] * s);
    }
  }
  return k;
}

// Channels per parallel task: about 32k values each, as ATen's grain.
int64_t channel_grain(int64_t n, int64_t s) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n * s));
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& dweight, const optional<Tensor>& dbias, const optional<Tensor>& index,
    int64_t domain, int64_t groups, double eps) {
  const Layout l = check_args(x, index, groups);
  const int64_t n = l.n, c = l.c, s = l.s;
  const int64_t ng = groups > 0 ? groups : 1;
  auto opts = x.options();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({ng, c}, opts);
  Tensor var = at::empty({ng, c}, opts);
  Tensor count = at::empty({ng}, opts);
  const Index ix{index.has_value() ? index->data_ptr<int64_t>() : nullptr, domain, groups > 0};
  const Counts cnt = count_groups(ix, n, ng, s);
  T* cp = count.data_ptr<T>();
  for (int64_t g = 0; g < ng; ++g) cp[g] = static_cast<T>(cnt.samples[g]);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T* mp = mean.data_ptr<T>();
  T* vp = var.data_ptr<T>();
  const T* w = ptr_or_null<T>(weight);
  const T* b = ptr_or_null<T>(bias);
  const T* dw = ptr_or_null<T>(dweight);
  const T* db = ptr_or_null<T>(dbias);
  const double inv_s = 1.0 / static_cast<double>(s);
  at::parallel_for(0, c, channel_grain(n, s), [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<double> pm(n), pq(n), gm(ng), gq(ng), mu(ng * width), inv(ng * width);
    // Statistics of every channel of the task.
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int64_t i = 0; i < n; ++i) {
        const T* p = xp + (i * c + ch) * s;
        double sum, sq;
        plane_sums<T>(p, s, p[0], sum, sq);
        pm[i] = static_cast<double>(p[0]) + sum * inv_s;
        pq[i] = std::max(0.0, sq - sum * sum * inv_s);
      }
      std::fill(gm.begin(), gm.end(), 0.0);
      std::fill(gq.begin(), gq.end(), 0.0);
      for (int64_t i = 0; i < n; ++i) gm[ix.g(i)] += pm[i];
      for (int64_t g = 0; g < ng; ++g) gm[g] *= cnt.inv_samples[g];
      for (int64_t i = 0; i < n; ++i) {
        const double d = pm[i] - gm[ix.g(i)];
        gq[ix.g(i)] += pq[i] + static_cast<double>(s) * d * d;
      }
      for (int64_t g = 0; g < ng; ++g) {
        const T m = static_cast<T>(gm[g]), v = static_cast<T>(gq[g] * cnt.inv_values[g]);
        mp[g * c + ch] = m;
        vp[g * c + ch] = v;
        // From the stored (rounded) values, as the PyTorch path computes them.
        mu[g * width + ch - c0] = static_cast<double>(m);
        inv[g * width + ch - c0] = static_cast<double>(v) + eps;
      }
    }
    // Inverse standard deviations, in one loop that pipelines.
    for (int64_t j = 0; j < ng * width; ++j) inv[j] = 1.0 / std::sqrt(inv[j]);
    // The folded affine, one pass per plane.
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t g = ix.g(i), k = ix.k(i), at_g = g * width + ch - c0;
        double a = inv[at_g], sh = -mu[at_g] * inv[at_g];
        if (w) {
          sh = sh * w[ch] + b[ch];
          a *= w[ch];
        }
        if (dw) {
          sh = sh * dw[k * c + ch] + db[k * c + ch];
          a *= dw[k * c + ch];
        }
        const T at = static_cast<T>(a), bt = static_cast<T>(sh);
        const T* p = xp + (i * c + ch) * s;
        T* q = yp + (i * c + ch) * s;
#pragma omp simd
        for (int64_t j = 0; j < s; ++j) q[j] = at * p[j] + bt;
      }
    }
  });
  return {y, mean, var, count};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& gy_in, const Tensor& x, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& dweight, const optional<Tensor>& index,
    int64_t domain, int64_t groups, const Tensor& mean, const Tensor& var, double eps,
    std::array<bool, 5> mask) {
  const Layout l = check_args(x, index, groups);
  const int64_t n = l.n, c = l.c, s = l.s;
  const int64_t ng = groups > 0 ? groups : 1;
  const Tensor gy = gy_in.contiguous();
  const int64_t kd = dweight.has_value() ? dweight->size(0) : 0;
  auto opts = x.options();
  Tensor dx = mask[0] ? at::empty_like(x) : Tensor();
  Tensor gw = mask[1] && weight.has_value() ? at::empty({c}, opts) : Tensor();
  Tensor gb = mask[2] && weight.has_value() ? at::empty({c}, opts) : Tensor();
  Tensor gdw = mask[3] && kd ? at::zeros({kd, c}, opts) : Tensor();
  Tensor gdb = mask[4] && kd ? at::zeros({kd, c}, opts) : Tensor();
  const Index ix{index.has_value() ? index->data_ptr<int64_t>() : nullptr, domain, groups > 0};
  const Counts cnt = count_groups(ix, n, ng, s);
  const T* xp = x.data_ptr<T>();
  const T* gp = gy.data_ptr<T>();
  T* dxp = mask[0] ? dx.data_ptr<T>() : nullptr;
  const T* mp = mean.data_ptr<T>();
  const T* vp = var.data_ptr<T>();
  const T* w = ptr_or_null<T>(weight);
  const T* b = ptr_or_null<T>(bias);
  const T* dw = ptr_or_null<T>(dweight);
  T* gwp = gw.defined() ? gw.data_ptr<T>() : nullptr;
  T* gbp = gb.defined() ? gb.data_ptr<T>() : nullptr;
  T* gdwp = gdw.defined() ? gdw.data_ptr<T>() : nullptr;
  T* gdbp = gdb.defined() ? gdb.data_ptr<T>() : nullptr;
  at::parallel_for(0, c, channel_grain(n, s), [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    std::vector<double> sa(ng), sb(ng), beta(ng), gamma(ng), tot(n), inv(ng * width);
    for (int64_t g = 0; g < ng; ++g) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        inv[g * width + ch - c0] = static_cast<double>(vp[g * c + ch]) + eps;
      }
    }
    for (int64_t j = 0; j < ng * width; ++j) inv[j] = 1.0 / std::sqrt(inv[j]);
    for (int64_t ch = c0; ch < c1; ++ch) {
      std::fill(sa.begin(), sa.end(), 0.0);
      std::fill(sb.begin(), sb.end(), 0.0);
      double sw = 0.0, sbias = 0.0;
      const double wc = w ? static_cast<double>(w[ch]) : 1.0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t g = ix.g(i), k = ix.k(i);
        double a, p;
        grad_sums<T>(gp + (i * c + ch) * s, xp + (i * c + ch) * s, s, mp[g * c + ch], a, p);
        const double bb = p * inv[g * width + ch - c0];  // Σ g · x̂
        const double gk = dw ? static_cast<double>(dw[k * c + ch]) : 1.0;
        if (gdwp) gdwp[k * c + ch] += static_cast<T>(w ? wc * bb + b[ch] * a : bb);
        if (gdbp) gdbp[k * c + ch] += static_cast<T>(a);
        sw += gk * bb;
        sbias += gk * a;
        tot[i] = wc * gk;  // the total scale on x̂
        sa[g] += tot[i] * a;
        sb[g] += tot[i] * bb;
      }
      if (gwp) gwp[ch] = static_cast<T>(sw);
      if (gbp) gbp[ch] = static_cast<T>(sbias);
      if (!dxp) continue;
      // ∂x = inv · tot · g + β · x + γ per plane, β and γ per group.
      for (int64_t g = 0; g < ng; ++g) {
        const double iv = inv[g * width + ch - c0], m = -cnt.inv_values[g];
        beta[g] = iv * iv * sb[g] * m;
        gamma[g] = iv * sa[g] * m - static_cast<double>(mp[g * c + ch]) * beta[g];
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t g = ix.g(i);
        const T al = static_cast<T>(inv[g * width + ch - c0] * tot[i]);
        const T be = static_cast<T>(beta[g]), ga = static_cast<T>(gamma[g]);
        const T* gpp = gp + (i * c + ch) * s;
        const T* xpp = xp + (i * c + ch) * s;
        T* q = dxp + (i * c + ch) * s;
#pragma omp simd
        for (int64_t j = 0; j < s; ++j) q[j] = al * gpp[j] + be * xpp[j] + ga;
      }
    }
  });
  return {dx, gw, gb, gdw, gdb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> core_forward(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& dweight, const optional<Tensor>& dbias, const optional<Tensor>& index,
    int64_t domain, int64_t groups, double eps) {
  if (x.scalar_type() == at::kDouble) {
    return forward_impl<double>(x, weight, bias, dweight, dbias, index, domain, groups, eps);
  }
  return forward_impl<float>(x, weight, bias, dweight, dbias, index, domain, groups, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> core_backward(
    const Tensor& gy, const Tensor& x, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& dweight, const optional<Tensor>& index,
    int64_t domain, int64_t groups, const Tensor& mean, const Tensor& var, double eps,
    std::array<bool, 5> mask) {
  if (x.scalar_type() == at::kDouble) {
    return backward_impl<double>(gy, x, weight, bias, dweight, index, domain, groups, mean, var,
                                 eps, mask);
  }
  return backward_impl<float>(gy, x, weight, bias, dweight, index, domain, groups, mean, var, eps,
                              mask);
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

// Rows of (G, C) batch statistics over count[g] · spatial values each: row g updates buffer row g, or,
// with row >= 0, the single statistics row updates buffer row `row`.
void track_(const optional<Tensor>& running_mean, const Tensor& running_var,
            const Tensor& num_batches_tracked, const Tensor& mean, const Tensor& var,
            const Tensor& count, int64_t spatial, int64_t row, double momentum) {
  const int64_t c = mean.size(-1);
  const int64_t rows = num_batches_tracked.numel();
  const int64_t g = mean.numel() / c;
  TORCH_CHECK(running_var.is_contiguous() && running_var.numel() == rows * c &&
                  mean.is_contiguous() && var.is_contiguous() && count.is_contiguous() &&
                  count.numel() == g && num_batches_tracked.scalar_type() == at::kLong &&
                  running_var.scalar_type() == mean.scalar_type() &&
                  var.scalar_type() == mean.scalar_type() &&
                  count.scalar_type() == mean.scalar_type(),
              "normkit track_: unexpected buffers or statistics");
  TORCH_CHECK(row >= 0 ? (g == 1 && row < rows) : g == rows, "normkit track_: rows");
  if (running_mean.has_value()) {
    TORCH_CHECK(running_mean->is_contiguous() && running_mean->numel() == rows * c &&
                    running_mean->scalar_type() == mean.scalar_type(),
                "normkit track_: running_mean");
  }
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "normkit_track_", [&] {
    scalar_t* rm = running_mean.has_value() ? running_mean->data_ptr<scalar_t>() : nullptr;
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    int64_t* nbt = num_batches_tracked.data_ptr<int64_t>();
    const scalar_t* mp = mean.data_ptr<scalar_t>();
    const scalar_t* vp = var.data_ptr<scalar_t>();
    const scalar_t* cp = count.data_ptr<scalar_t>();
    for (int64_t i = 0; i < g; ++i) {
      const int64_t r = row >= 0 ? row : i;
      track_row<scalar_t>(rm ? rm + r * c : nullptr, rv + r * c, nbt + r, mp + i * c, vp + i * c,
                          static_cast<double>(cp[i]) * static_cast<double>(spatial), momentum, c);
    }
  });
}

// ---- Batch-Channel Normalization (normkit.layers.batch_channel) --------------------------------
//
// x1 = a_c x + b_c (the batch part: a = γ_b / sqrt(σ²_c + eps), b = β_b − μ_c a, with the batch's
// or the estimated μ, σ²), then a group norm of x1 per (sample, group) and the group affine:
// y = scale[n, c] x + shift[n, c]. The group moments of x1 follow from the plane moments m, q of
// x in closed form, so the forward is one reduction pass and one apply pass.

struct BcnShape {
  int64_t n, c, s, groups, per;
};

// Per-(n, c) mean m and biased variance q of every plane, in double then rounded to T.
template <typename T>
void bcn_plane_moments(const T* xp, const BcnShape& d, T* mp, T* qp) {
  const double inv_s = 1.0 / static_cast<double>(d.s);
  at::parallel_for(0, d.n * d.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d.s)),
                   [&](int64_t p0, int64_t p1) {
                     for (int64_t p = p0; p < p1; ++p) {
                       const T* row = xp + p * d.s;
                       double sum, sq;
                       plane_sums<T>(row, d.s, row[0], sum, sq);
                       const double mean_d = sum * inv_s;
                       mp[p] = static_cast<T>(static_cast<double>(row[0]) + mean_d);
                       qp[p] = static_cast<T>(std::max(0.0, sq * inv_s - mean_d * mean_d));
                     }
                   });
}

// The batch part (a, b) per channel and the group part per (n, g): mean gm and inverse std t,
// in double. `scale` and `shift` (N, C) fold everything.
template <typename T>
void bcn_fold(const BcnShape& d, const T* mp, const T* qp, const std::vector<double>& mean,
              const std::vector<double>& var, const T* w, const T* b, const T* gw, const T* gb,
              bool per_channel, double eps, std::vector<double>& a, std::vector<double>& bb,
              std::vector<double>& gm, std::vector<double>& t, std::vector<double>& scale,
              std::vector<double>& shift) {
  const int64_t n = d.n, c = d.c, groups = d.groups, per = d.per;
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
      gm[i * groups + g] = sm;
      t[i * groups + g] = 1.0 / std::sqrt(std::max(0.0, sv * inv_per) + eps);
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        double sc = a[j] * t[i * groups + g], sh = (bb[j] - sm) * t[i * groups + g];
        if (gw) {
          const int64_t k = per_channel ? j : g;
          sc *= static_cast<double>(gw[k]);
          sh = sh * static_cast<double>(gw[k]) + static_cast<double>(gb[k]);
        }
        scale[i * c + j] = sc;
        shift[i * c + j] = sh;
      }
    }
  }
}

BcnShape bcn_shape(const Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() > 2 && x.is_contiguous() && x.numel() > 0,
              "normkit bcn kernel: non-empty contiguous (N, C, *S) input");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "normkit bcn kernel: float32 or float64 input");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(groups > 0 && c % groups == 0, "normkit bcn kernel: groups must divide C");
  return {n, c, x.numel() / (n * c), groups, c / groups};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bcn_forward_impl(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& gweight, const optional<Tensor>& gbias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, int64_t groups, bool per_channel,
    bool estimate, double eps, double rate, double momentum) {
  const BcnShape d = bcn_shape(x, groups);
  const int64_t n = d.n, c = d.c;
  auto opts = x.options();
  Tensor y = at::empty_like(x);
  Tensor m = at::empty({n, c}, opts), q = at::empty({n, c}, opts);
  Tensor mean_t = at::empty({c}, opts), var_t = at::empty({c}, opts);
  const T* xp = x.data_ptr<T>();
  T* mp = m.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  bcn_plane_moments<T>(xp, d, mp, qp);
  // The batch part's statistics: the batch's, or the estimates after this batch's update.
  T* rm = running_mean.has_value() ? running_mean->data_ptr<T>() : nullptr;
  T* rv = running_var.has_value() ? running_var->data_ptr<T>() : nullptr;
  int64_t* nbt = num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>()
                                                 : nullptr;
  TORCH_CHECK(!estimate || (rm && rv && nbt), "normkit bcn kernel: estimates need buffers");
  std::vector<double> mean(c), var(c);
  std::vector<T> bm(c), bv(c);
  const double inv_n = 1.0 / static_cast<double>(n);
  for (int64_t ch = 0; ch < c; ++ch) {
    double sm = 0.0;
    for (int64_t i = 0; i < n; ++i) sm += static_cast<double>(mp[i * c + ch]);
    // The centre: the batch mean, or the previous mean estimate.
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
    *nbt += 1;
    const T r = static_cast<T>(rate);
    auto lerp = [r](T lo, T hi) { return r < T(0.5) ? lo + r * (hi - lo) : hi - (hi - lo) * (T(1) - r); };
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
  for (int64_t ch = 0; ch < c; ++ch) {
    mt[ch] = bm[ch];
    vt[ch] = bv[ch];
    mean[ch] = static_cast<double>(bm[ch]);
    var[ch] = static_cast<double>(bv[ch]);
  }
  std::vector<double> a(c), bb(c), gm(n * groups), t(n * groups), scale(n * c), shift(n * c);
  bcn_fold<T>(d, mp, qp, mean, var, ptr_or_null<T>(weight), ptr_or_null<T>(bias),
              ptr_or_null<T>(gweight), ptr_or_null<T>(gbias), per_channel, eps, a, bb, gm, t,
              scale, shift);
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d.s)),
                   [&](int64_t p0, int64_t p1) {
                     for (int64_t p = p0; p < p1; ++p) {
                       const T sc = static_cast<T>(scale[p]), sh = static_cast<T>(shift[p]);
                       const T* row = xp + p * d.s;
                       T* out = yp + p * d.s;
#pragma omp simd
                       for (int64_t j = 0; j < d.s; ++j) out[j] = sc * row[j] + sh;
                     }
                   });
  return {y, m, q, mean_t, var_t};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bcn_backward_impl(
    const Tensor& gy_in, const Tensor& x, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& gweight, const Tensor& m,
    const Tensor& q, const Tensor& mean_t, const Tensor& var_t, int64_t groups, bool per_channel,
    bool estimate, double eps, std::array<bool, 5> mask) {
  const BcnShape d = bcn_shape(x, groups);
  const int64_t n = d.n, c = d.c, per = d.per, s = d.s;
  const Tensor gy = gy_in.contiguous();
  const T* xp = x.data_ptr<T>();
  const T* gp = gy.data_ptr<T>();
  const T* mp = m.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* w = ptr_or_null<T>(weight);
  const T* gw = ptr_or_null<T>(gweight);
  std::vector<double> mean(c), var(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    mean[ch] = static_cast<double>(mean_t.data_ptr<T>()[ch]);
    var[ch] = static_cast<double>(var_t.data_ptr<T>()[ch]);
  }
  std::vector<double> a(c), bb(c), gm(n * groups), t(n * groups), scale(n * c), shift(n * c);
  // (scale and shift are not needed here: no group affine for the fold)
  bcn_fold<T>(d, mp, qp, mean, var, w, ptr_or_null<T>(bias), nullptr, nullptr, per_channel, eps,
              a, bb, gm, t, scale, shift);
  // Per-plane A = Σ g and P = Σ g (x − m).
  std::vector<double> sa(n * c), sp(n * c);
  at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s)),
                   [&](int64_t p0, int64_t p1) {
                     for (int64_t p = p0; p < p1; ++p) {
                       grad_sums<T>(gp + p * s, xp + p * s, s, mp[p], sa[p], sp[p]);
                     }
                   });
  auto gwv = [&](int64_t j) {
    return gw ? static_cast<double>(gw[per_channel ? j : j / per]) : 1.0;
  };
  auto opts = x.options();
  const int64_t gsize = per_channel ? c : groups;
  Tensor dgw = mask[3] && gw ? at::zeros({gsize}, opts) : Tensor();
  Tensor dgb = mask[4] && gw ? at::zeros({gsize}, opts) : Tensor();
  std::vector<double> dgw_acc(gsize, 0.0), dgb_acc(gsize, 0.0);
  std::vector<double> alpha(n * c), beta1(n * c), gamma1(n * c), t1(c, 0.0), t2(c, 0.0);
  const double k = 1.0 / static_cast<double>(s * per);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const double tg = t[i * groups + g];
      double h1 = 0.0, h2 = 0.0;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        const int64_t p = i * c + j;
        const double e = a[j] * static_cast<double>(mp[p]) + bb[j] - gm[i * groups + g];
        const double xh = tg * (a[j] * sp[p] + e * sa[p]);  // Σ g · x̂1
        dgw_acc[per_channel ? j : g] += xh;
        dgb_acc[per_channel ? j : g] += sa[p];
        h1 += gwv(j) * sa[p];
        h2 += gwv(j) * xh;
      }
      h1 *= k;
      const double t2h2 = h2 * k * tg * tg;
      for (int64_t j = g * per; j < (g + 1) * per; ++j) {
        const int64_t p = i * c + j;
        const double e = a[j] * static_cast<double>(mp[p]) + bb[j] - gm[i * groups + g];
        alpha[p] = tg * gwv(j);
        beta1[p] = -t2h2 * a[j];
        gamma1[p] = -tg * h1 - t2h2 * e;
        // Σ_s dx1 and Σ_s dx1 (x − μ) of the plane.
        const double s1 = alpha[p] * sa[p] + gamma1[p] * static_cast<double>(s);
        const double dev = static_cast<double>(mp[p]) - mean[j];
        const double s2 = alpha[p] * sp[p] + beta1[p] * static_cast<double>(qp[p]) * s + dev * s1;
        t1[j] += s1;
        t2[j] += s2;
      }
    }
  }
  if (dgw.defined()) {
    T* o = dgw.data_ptr<T>();
    for (int64_t j = 0; j < gsize; ++j) o[j] = static_cast<T>(dgw_acc[j]);
  }
  if (dgb.defined()) {
    T* o = dgb.data_ptr<T>();
    for (int64_t j = 0; j < gsize; ++j) o[j] = static_cast<T>(dgb_acc[j]);
  }
  Tensor dw = mask[1] && w ? at::empty({c}, opts) : Tensor();
  Tensor db = mask[2] && w ? at::empty({c}, opts) : Tensor();
  for (int64_t ch = 0; ch < c; ++ch) {
    const double inv = 1.0 / std::sqrt(var[ch] + eps);
    if (dw.defined()) dw.data_ptr<T>()[ch] = static_cast<T>(t2[ch] * inv);
    if (db.defined()) db.data_ptr<T>()[ch] = static_cast<T>(t1[ch]);
  }
  Tensor dx = mask[0] ? at::empty_like(x) : Tensor();
  if (mask[0]) {
    std::vector<double> d2(c, 0.0), dc(c, 0.0);
    if (!estimate) {  // the batch-norm backward, through μ and σ² of the batch
      const double inv_m = 1.0 / static_cast<double>(n * s);
      for (int64_t ch = 0; ch < c; ++ch) {
        d2[ch] = t2[ch] / (var[ch] + eps) * inv_m;
        dc[ch] = t1[ch] * inv_m;
      }
    }
    T* dxp = dx.data_ptr<T>();
    at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s)),
                     [&](int64_t p0, int64_t p1) {
                       for (int64_t p = p0; p < p1; ++p) {
                         const int64_t j = p % c;
                         const double dev = static_cast<double>(mp[p]) - mean[j];
                         const double be = a[j] * (beta1[p] - d2[j]);
                         const double g0 = a[j] * (gamma1[p] - dc[j] - d2[j] * dev);
                         const T al = static_cast<T>(a[j] * alpha[p]), bt = static_cast<T>(be),
                                 ga = static_cast<T>(g0 - be * static_cast<double>(mp[p]));
                         const T* gpp = gp + p * s;
                         const T* xpp = xp + p * s;
                         T* o = dxp + p * s;
#pragma omp simd
                         for (int64_t jj = 0; jj < s; ++jj) o[jj] = al * gpp[jj] + bt * xpp[jj] + ga;
                       }
                     });
  }
  return {dx, dw, db, dgw, dgb};
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
  if (x.scalar_type() == at::kDouble) {
    return bcn_forward_impl<double>(x, weight, bias, gweight, gbias, running_mean, running_var,
                                    num_batches_tracked, groups, per_channel, estimate, eps,
                                    rate, momentum);
  }
  return bcn_forward_impl<float>(x, weight, bias, gweight, gbias, running_mean, running_var,
                                 num_batches_tracked, groups, per_channel, estimate, eps, rate,
                                 momentum);
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
    ctx->mark_non_differentiable(
        {std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out)});
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
            std::get<4>(out)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2], &gw = saved[3], &gb = saved[4];
    const Tensor &m = saved[5], &q = saved[6], &mean = saved[7], &var = saved[8];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool per_channel = ctx->saved_data["per_channel"].toBool();
    const bool estimate = ctx->saved_data["estimate"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    std::array<bool, 5> needs{};
    size_t edge = 0;
    const std::array<const Tensor*, 5> params{&x, &w, &b, &gw, &gb};
    for (size_t i = 0; i < 5; ++i) {
      if (params[i]->defined()) needs[i] = ctx->needs_input_grad(edge++);
    }
    torch::autograd::variable_list out(14);
    const Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    if (at::GradMode::is_enabled()) {
      torch::autograd::variable_list wanted;
      for (size_t i = 0; i < 5; ++i) {
        if (needs[i]) wanted.push_back(*params[i]);
      }
      if (wanted.empty()) return out;
      Tensor y = bcn_reference(x, w, b, gw, gb, mean, var, groups, per_channel, estimate, eps);
      auto got = torch::autograd::grad({y}, wanted, {gy}, std::nullopt, true, true);
      size_t j = 0;
      for (size_t i = 0; i < 5; ++i) {
        if (needs[i]) out[i] = got[j++];
      }
      return out;
    }
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; };
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> g;
    if (x.scalar_type() == at::kDouble) {
      g = bcn_backward_impl<double>(gy, x, opt(w), opt(b), opt(gw), m, q, mean, var, groups,
                                    per_channel, estimate, eps, needs);
    } else {
      g = bcn_backward_impl<float>(gy, x, opt(w), opt(b), opt(gw), m, q, mean, var, groups,
                                   per_channel, estimate, eps, needs);
    }
    out[0] = needs[0] ? std::get<0>(g) : Tensor();
    out[1] = needs[1] ? std::get<1>(g) : Tensor();
    out[2] = needs[2] ? std::get<2>(g) : Tensor();
    out[3] = needs[3] ? std::get<3>(g) : Tensor();
    out[4] = needs[4] ? std::get<4>(g) : Tensor();
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bcn_forward_autograd(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& gweight, const optional<Tensor>& gbias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, int64_t groups, bool per_channel,
    bool estimate, double eps, double rate, double momentum) {
  auto out = BcnFunction::apply(x, weight, bias, gweight, gbias, running_mean, running_var,
                                num_batches_tracked, groups, per_channel, estimate, eps, rate,
                                momentum);
  return {out[0], out[1], out[2], out[3], out[4]};
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

// The autograd node of core_forward: one kernel call each way; with create_graph (grad mode on
// in backward), the gradients of the reference composition instead, so that they can be
// differentiated again.
class CoreFunction : public torch::autograd::Function<CoreFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
      const optional<Tensor>& bias, const optional<Tensor>& dweight,
      const optional<Tensor>& dbias, const optional<Tensor>& index, int64_t domain,
      int64_t groups, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = core_forward(x, weight, bias, dweight, dbias, index, domain, groups, eps);
    const Tensor none;
    ctx->save_for_backward({x, weight.value_or(none), bias.value_or(none),
                            dweight.value_or(none), dbias.value_or(none), index.value_or(none),
                            std::get<1>(out), std::get<2>(out)});
    ctx->saved_data["domain"] = domain;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({std::get<1>(out), std::get<2>(out), std::get<3>(out)});
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2], &dw = saved[3], &db = saved[4];
    const Tensor &index = saved[5], &mean = saved[6], &var = saved[7];
    const int64_t domain = ctx->saved_data["domain"].toInt();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    // Graph edges exist for the tensors that were given, in argument order.
    std::array<bool, 5> needs{};
    size_t edge = 0;
    const std::array<const Tensor*, 5> params{&x, &w, &b, &dw, &db};
    for (size_t i = 0; i < 5; ++i) {
      if (params[i]->defined()) needs[i] = ctx->needs_input_grad(edge++);
    }
    const Tensor& gy = grads[0];
    torch::autograd::variable_list out(9);
    if (!gy.defined()) return out;
    if (at::GradMode::is_enabled()) {
      torch::autograd::variable_list wanted;
      for (size_t i = 0; i < 5; ++i) {
        if (needs[i]) wanted.push_back(*params[i]);
      }
      if (wanted.empty()) return out;
      Tensor y = reference(x, w, b, dw, db, index, domain, groups, eps);
      auto got = torch::autograd::grad({y}, wanted, {gy}, /*retain_graph=*/std::nullopt,
                                       /*create_graph=*/true, /*allow_unused=*/true);
      size_t j = 0;
      for (size_t i = 0; i < 5; ++i) {
        if (needs[i]) out[i] = got[j++];
      }
      return out;
    }
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; };
    auto g = core_backward(gy, x, opt(w), opt(b), opt(dw), opt(index), domain, groups, mean, var,
                           eps, needs);
    out[0] = std::get<0>(g);
    out[1] = std::get<1>(g);
    out[2] = std::get<2>(g);
    out[3] = std::get<3>(g);
    out[4] = std::get<4>(g);
    for (size_t i = 0; i < 5; ++i) {
      if (!needs[i]) out[i] = Tensor();
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> core_forward_autograd(
    const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& dweight, const optional<Tensor>& dbias, const optional<Tensor>& index,
    int64_t domain, int64_t groups, double eps) {
  auto out = CoreFunction::apply(x, weight, bias, dweight, dbias, index, domain, groups, eps);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY(normkit_kernels, m) {
  m.def(
      "core_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? dweight, Tensor? dbias, "
      "Tensor? index, int domain, int groups, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "core_backward(Tensor gy, Tensor x, Tensor? weight, Tensor? bias, Tensor? dweight, "
      "Tensor? index, int domain, int groups, Tensor mean, Tensor var, float eps, bool[5] mask)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bcn_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? group_weight, "
      "Tensor? group_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, int groups, bool per_channel, bool estimate, float eps, "
      "float rate, float momentum) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "track_(Tensor(a!)? running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
      "Tensor mean, Tensor var, Tensor count, int spatial, int row, float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(normkit_kernels, CPU, m) {
  m.impl("core_forward", &core_forward);
  m.impl("core_backward", &core_backward);
  m.impl("track_", &track_);
  m.impl("bcn_forward", &bcn_forward);
}

TORCH_LIBRARY_IMPL(normkit_kernels, Autograd, m) {
  m.impl("core_forward", &core_forward_autograd);
  m.impl("bcn_forward", &bcn_forward_autograd);
}
