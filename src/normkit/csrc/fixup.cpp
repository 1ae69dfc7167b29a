// Fixup's basic block (normkit.models.resnet.FixupBasicBlock) as one operator, built with
// core.cpp by normkit.kernels. The block's modules are the specification, and
// tests/test_kernels.py checks this file against them in float64.
//
// fixup_basic(x, shortcut, b1a, w1, b1b, b2a, w2, s, b2b, stride), every scalar a (1,) tensor:
//
//   a   = x + b1a                       (b1a given: the identity shortcut, s(x) = x)
//   a   = x                             (b1a None: the caller added it and passes s(a))
//   h2  = relu(conv1(a) + b1b) + b2a    (3x3, padding 1, stride `stride`)
//   out = relu(conv2(h2) · s + b2b + shortcut)
//
// What the modules spend on the five scalars is passes over the activation and small operator
// calls: an addition for each bias, a gradient sum for each, a node each in the autograd graph.
// Here the scalars ride along with passes that run anyway. Forward: one pass after conv1
// (add b1b, relu, add b2a, keep the relu's mask as bytes) and one after conv2 (scale, add b2b
// and the shortcut, relu). Backward: one pass for the outer relu that also sums ∂b2b, one for
// the inner relu that also sums ∂b2a and ∂b1b, (identity shortcut) one that adds the shortcut's
// gradient and sums ∂b1a, and one over conv2's weight for its gradient and the scale's. The
// convolutions are ATen's.
//
// Sums run over fixed chunks of the flat tensor (so the result does not depend on the thread
// count) in kLanes float lanes flushed to double per chunk.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kTask = 8192;  // values per chunk of a summing pass (fixed: deterministic)
constexpr int64_t kLanes = 16;   // independent float accumulators per sum within a chunk

// Runs body(i0, i1, sums) over fixed chunks [i0, i1) of n values in parallel; each chunk adds
// into its own K double sums, and the chunks' sums are added in chunk order.
template <size_t K, typename Body>
std::array<double, K> chunked(int64_t n, Body body) {
  const int64_t chunks = std::max<int64_t>(1, (n + kTask - 1) / kTask);
  std::vector<std::array<double, K>> part(chunks);
  at::parallel_for(0, chunks, 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::array<double, K> sums{};
      body(c * kTask, std::min(n, (c + 1) * kTask), sums);
      part[c] = sums;
    }
  });
  std::array<double, K> total{};
  for (const auto& p : part) {
    for (size_t k = 0; k < K; ++k) total[k] += p[k];
  }
  return total;
}

// Σ p[0, n) in kLanes lanes of T, added into `sum` (the compiler vectorizes the lanes; one
// running total would be a serial dependency chain).
template <typename T>
void lane_sum(const T* __restrict__ p, int64_t n, double& sum) {
  std::array<T, kLanes> acc{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += p[i + j];
  }
  T rest = 0;
  for (; i < n; ++i) rest += p[i];
  double s = rest;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  sum += s;
}

// The same memory format for tensors the passes read as flat arrays.
Tensor like(const Tensor& t, const Tensor& ref) {
  return t.contiguous(ref.suggest_memory_format());
}

// ---- The passes --------------------------------------------------------------------------------

// The loops take __restrict__ pointers as parameters: captured in a lambda the qualifier is lost,
// and the mask's bytes may alias anything, which kept the compiler from vectorizing.

// After conv1, in place over [0, n): y ← relu(y + b1b) + b2a; mask ← not (y + b1b ≤ 0).
template <typename T>
void inner_forward_range(T* __restrict__ y, uint8_t* __restrict__ mask, int64_t n, T b1b,
                         T b2a) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = y[i] + b1b;
    mask[i] = !(v <= T(0));  // as torch's relu backward: a NaN passes its gradient
    y[i] = std::max(v, T(0)) + b2a;
  }
}

// After conv2, in place over [0, n): y ← relu(y · s + b2b + shortcut).
template <typename T>
void outer_forward_range(T* __restrict__ y, const T* __restrict__ sc, int64_t n, T s, T b2b) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::max((y[i] * s + b2b) + sc[i], T(0));
}

template <typename T>
void relu_backward_range(const T* __restrict__ gout, const T* __restrict__ out,
                         T* __restrict__ g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = out[i] <= T(0) ? T(0) : gout[i];
}

template <typename T>
void scale_range(T* __restrict__ p, int64_t n, T scale) {
  for (int64_t i = 0; i < n; ++i) p[i] *= scale;
}

template <typename T>
void mask_range(T* __restrict__ p, const uint8_t* __restrict__ mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = mask[i] ? p[i] : T(0);
}

template <typename T>
void add_range(T* __restrict__ p, const T* __restrict__ q, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] += q[i];
}

// dw ← G · s over [0, n); returns Σ G · w (conv2's weight gradient and the scale's).
template <typename T>
double weight_grads_range(const T* __restrict__ gw, const T* __restrict__ w, T* __restrict__ dw,
                          int64_t n, T s) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    dw[i] = gw[i] * s;
    total += static_cast<double>(gw[i]) * static_cast<double>(w[i]);
  }
  return total;
}

template <typename T>
void inner_forward(Tensor& y, Tensor& mask, T b1b, T b2a) {
  T* p = y.data_ptr<T>();
  uint8_t* m = mask.data_ptr<uint8_t>();
  at::parallel_for(0, y.numel(), 32768, [&](int64_t i0, int64_t i1) {
    inner_forward_range<T>(p + i0, m + i0, i1 - i0, b1b, b2a);
  });
}

template <typename T>
void outer_forward(Tensor& y, const Tensor& shortcut, T s, T b2b) {
  T* p = y.data_ptr<T>();
  const T* sc = shortcut.data_ptr<T>();
  at::parallel_for(0, y.numel(), 32768, [&](int64_t i0, int64_t i1) {
    outer_forward_range<T>(p + i0, sc + i0, i1 - i0, s, b2b);
  });
}

// g ← 0 where out ≤ 0, else gout; returns Σ g (∂b2b).
template <typename T>
double outer_backward(const Tensor& gout, const Tensor& out, Tensor& g) {
  const T* go = gout.data_ptr<T>();
  const T* o = out.data_ptr<T>();
  T* gp = g.data_ptr<T>();
  return chunked<1>(g.numel(), [&](int64_t i0, int64_t i1, std::array<double, 1>& s) {
    relu_backward_range<T>(go + i0, o + i0, gp + i0, i1 - i0);
    lane_sum<T>(gp + i0, i1 - i0, s[0]);
  })[0];
}

// In place, with gi conv2's input gradient for its unscaled weight: gi ← gi · s, then
// gi ← gi where mask, else 0; returns {Σ gi · s (∂b2a), Σ of the masked values (∂b1b)}.
template <typename T>
std::array<double, 2> inner_backward(Tensor& gi, const Tensor& mask, T scale) {
  T* p = gi.data_ptr<T>();
  const uint8_t* m = mask.data_ptr<uint8_t>();
  return chunked<2>(gi.numel(), [&](int64_t i0, int64_t i1, std::array<double, 2>& s) {
    scale_range<T>(p + i0, i1 - i0, scale);
    lane_sum<T>(p + i0, i1 - i0, s[0]);
    mask_range<T>(p + i0, m + i0, i1 - i0);
    lane_sum<T>(p + i0, i1 - i0, s[1]);
  });
}

// In place: gi ← gi + g (the identity shortcut's gradient); returns Σ gi before (∂b1a).
template <typename T>
double input_backward(Tensor& gi, const Tensor& g) {
  T* p = gi.data_ptr<T>();
  const T* q = g.data_ptr<T>();
  return chunked<1>(gi.numel(), [&](int64_t i0, int64_t i1, std::array<double, 1>& s) {
    lane_sum<T>(p + i0, i1 - i0, s[0]);
    add_range<T>(p + i0, q + i0, i1 - i0);
  })[0];
}

// ---- Checks ------------------------------------------------------------------------------------

void check_args(const Tensor& x, const optional<Tensor>& shortcut, const optional<Tensor>& b1a,
                const Tensor& w1, const Tensor& b1b, const Tensor& b2a, const Tensor& w2,
                const Tensor& s, const Tensor& b2b, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "fixup_basic: expected a 4D input, got ", x.dim(), "D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fixup_basic: expected a float32 or float64 input, got ", x.scalar_type());
  TORCH_CHECK(b1a.has_value() != shortcut.has_value(),
              "fixup_basic: expected exactly one of bias1a (identity shortcut) and shortcut");
  TORCH_CHECK(stride >= 1, "fixup_basic: expected stride >= 1, got ", stride);
  TORCH_CHECK(w1.dim() == 4 && w1.size(1) == x.size(1) && w1.size(2) == 3 && w1.size(3) == 3,
              "fixup_basic: expected conv1's weight of shape (P, ", x.size(1), ", 3, 3), got ",
              w1.sizes());
  const int64_t planes = w1.size(0);
  TORCH_CHECK(w2.dim() == 4 && w2.size(0) == planes && w2.size(1) == planes &&
                  w2.size(2) == 3 && w2.size(3) == 3,
              "fixup_basic: expected conv2's weight of shape (", planes, ", ", planes,
              ", 3, 3), got ", w2.sizes());
  for (const Tensor* t : {&w1, &w2, &b1b, &b2a, &s, &b2b}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "fixup_basic: expected every parameter in the input's dtype and on its device");
  }
  for (const Tensor* t : {&b1b, &b2a, &s, &b2b}) {
    TORCH_CHECK(t->numel() == 1, "fixup_basic: expected one-value scalars");
  }
  if (b1a.has_value()) {
    TORCH_CHECK(b1a->numel() == 1 && b1a->scalar_type() == x.scalar_type() &&
                    b1a->device() == x.device(),
                "fixup_basic: expected bias1a as a one-value scalar in the input's dtype");
    TORCH_CHECK(stride == 1 && planes == x.size(1),
                "fixup_basic: an identity shortcut needs stride 1 and unchanged channels");
  } else {
    TORCH_CHECK(shortcut->scalar_type() == x.scalar_type() && shortcut->device() == x.device(),
                "fixup_basic: expected the shortcut in the input's dtype and on its device");
  }
}

// A one-value tensor's value (a negated view, from torch._neg_view, stores the other sign).
template <typename T>
T value(const Tensor& t) {
  const T v = t.data_ptr<T>()[0];
  return t.is_neg() ? -v : v;
}

// ---- Forward -----------------------------------------------------------------------------------

struct Forward {
  Tensor out, a, h2, mask;
};

Forward fixup_forward(const Tensor& x, const optional<Tensor>& shortcut,
                      const optional<Tensor>& b1a, const Tensor& w1, const Tensor& b1b,
                      const Tensor& b2a, const Tensor& w2, const Tensor& s, const Tensor& b2b,
                      int64_t stride) {
  check_args(x, shortcut, b1a, w1, b1b, b2a, w2, s, b2b, stride);
  Forward f;
  f.a = b1a.has_value() ? at::add(x, b1a->reshape({})) : x;
  f.h2 = at::convolution(f.a, w1, {}, {stride, stride}, {1, 1}, {1, 1}, false, {0, 0}, 1);
  f.mask = at::empty(f.h2.sizes(), f.h2.options().dtype(at::kByte),
                     f.h2.suggest_memory_format());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fixup_basic", [&] {
    inner_forward<scalar_t>(f.h2, f.mask, value<scalar_t>(b1b), value<scalar_t>(b2a));
    // The scale is applied to conv2's output, not folded into its weight: a weight computed
    // afresh each call costs oneDNN's convolution more than the multiply saves.
    f.out = at::convolution(f.h2, w2, {}, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1);
    const Tensor sc = like(shortcut.has_value() ? *shortcut : x, f.out);
    TORCH_CHECK(sc.sizes() == f.out.sizes(), "fixup_basic: expected the shortcut of shape ",
                f.out.sizes(), ", got ", sc.sizes());
    outer_forward<scalar_t>(f.out, sc, value<scalar_t>(s), value<scalar_t>(b2b));
  });
  return f;
}

// The modules' composition in differentiable ATen operators (double backward).
Tensor fixup_reference(const Tensor& x, const Tensor& shortcut, const Tensor& b1a,
                       const Tensor& w1, const Tensor& b1b, const Tensor& b2a, const Tensor& w2,
                       const Tensor& s, const Tensor& b2b, int64_t stride) {
  const Tensor a = b1a.defined() ? x + b1a.reshape({}) : x;
  const Tensor h = at::relu(at::conv2d(a, w1, {}, {stride, stride}, {1, 1}) + b1b.reshape({}));
  const Tensor y = at::conv2d(h + b2a.reshape({}), w2 * s.reshape({}), {}, {1, 1}, {1, 1});
  return at::relu((y + b2b.reshape({})) + (b1a.defined() ? x : shortcut));
}

// ---- Autograd ----------------------------------------------------------------------------------

// Differentiable inputs in the operator's order: x, shortcut, b1a, w1, b1b, b2a, w2, s, b2b.
constexpr size_t kInputs = 9;
constexpr size_t kArgs = 10;  // and the stride

class FixupFunction : public torch::autograd::Function<FixupFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& x, const optional<Tensor>& shortcut,
      const optional<Tensor>& b1a, const Tensor& w1, const Tensor& b1b, const Tensor& b2a,
      const Tensor& w2, const Tensor& s, const Tensor& b2b, int64_t stride) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Forward f = fixup_forward(x, shortcut, b1a, w1, b1b, b2a, w2, s, b2b, stride);
    // What the first-order backward reads is saved for backward (checked for in-place changes);
    // the inputs only the create_graph path reads are kept as plain references, so that, as
    // with the modules (which save none of them), an inference-mode input or a bias changed in
    // place before backward is no error.
    ctx->save_for_backward({w1, w2, s, f.out, f.a, f.h2, f.mask});
    const Tensor none;
    ctx->saved_data["x"] = x;
    ctx->saved_data["shortcut"] = shortcut.value_or(none);
    ctx->saved_data["b1a"] = b1a.value_or(none);
    ctx->saved_data["b1b"] = b1b;
    ctx->saved_data["b2a"] = b2a;
    ctx->saved_data["b2b"] = b2b;
    ctx->saved_data["stride"] = stride;
    return {f.out};
  }

  static Tensor kept(torch::autograd::AutogradContext* ctx, const char* name) {
    const c10::IValue& v = ctx->saved_data[name];
    return v.isTensor() ? v.toTensor() : Tensor();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t stride = ctx->saved_data["stride"].toInt();
    const std::array<Tensor, kInputs> inputs{
        kept(ctx, "x"),   kept(ctx, "shortcut"), kept(ctx, "b1a"), saved[0], kept(ctx, "b1b"),
        kept(ctx, "b2a"), saved[1],              saved[2],         kept(ctx, "b2b")};
    const auto needs = normkit_autograd::input_needs(ctx, inputs);
    const Tensor& gout = grads[0];
    if (!gout.defined()) return torch::autograd::variable_list(kArgs);
    if (at::GradMode::is_enabled()) {  // create_graph: gradients that can be differentiated
      return normkit_autograd::reference_grads(
          inputs, needs, gout, kArgs, [&](const std::array<Tensor, kInputs>& in) {
            return fixup_reference(in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8],
                                   stride);
          });
    }
    torch::autograd::variable_list result(kArgs);
    const Tensor &w1 = saved[0], &w2 = saved[1], &s = saved[2], &out = saved[3], &a = saved[4];
    const Tensor &h2 = saved[5], &mask = saved[6];
    const bool identity = inputs[2].defined();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fixup_basic_backward", [&] {
      const Tensor go = like(gout.to(out.scalar_type()), out);
      Tensor g = at::empty_like(out);
      const double db2b = outer_backward<scalar_t>(go, out, g);
      if (needs[8]) result[8] = at::full({1}, db2b, s.options());
      if (needs[1]) result[1] = g;
      const bool need_w2 = needs[6] || needs[7];
      // With y = conv2(h2, w2) unscaled: ∂w2 = s · G and ∂s = <G, w2> for G the weight
      // gradient at the upstream g; the input gradient s · conv2ᵀ(g) is scaled in the pass.
      auto [gi2, gw2, unused2] = at::convolution_backward(
          g, h2, w2, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
          {true, need_w2, false});
      if (need_w2) {  // one pass over the weight for both (weight-sized: no need to split it)
        const auto format = w2.suggest_memory_format();  // the gradient in the weight's layout
        const Tensor gw = gw2.contiguous(format), w = w2.contiguous(format);
        Tensor dw = at::empty_like(gw);
        const double ds = weight_grads_range<scalar_t>(
            gw.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), gw.numel(),
            value<scalar_t>(s));
        if (needs[6]) result[6] = dw;
        if (needs[7]) result[7] = at::full({1}, ds, s.options());
      }
      gi2 = like(gi2, mask);
      const auto inner = inner_backward<scalar_t>(gi2, mask, value<scalar_t>(s));
      if (needs[5]) result[5] = at::full({1}, inner[0], s.options());
      if (needs[4]) result[4] = at::full({1}, inner[1], s.options());
      const bool need_a = needs[0] || needs[2];
      if (!need_a && !needs[3]) return;
      auto [gi1, gw1, unused1] = at::convolution_backward(
          gi2, a, w1, std::nullopt, {stride, stride}, {1, 1}, {1, 1}, false, {0, 0}, 1,
          {need_a, needs[3], false});
      if (needs[3]) result[3] = gw1;
      if (!need_a) return;
      if (!identity) {
        result[0] = gi1;
        return;
      }
      gi1 = like(gi1, g);
      const double db1a = input_backward<scalar_t>(gi1, g);
      if (needs[2]) result[2] = at::full({1}, db1a, s.options());
      if (needs[0]) result[0] = gi1;
    });
    return result;
  }
};

Tensor fixup_basic(const Tensor& x, const optional<Tensor>& shortcut, const optional<Tensor>& b1a,
                   const Tensor& w1, const Tensor& b1b, const Tensor& b2a, const Tensor& w2,
                   const Tensor& s, const Tensor& b2b, int64_t stride) {
  return fixup_forward(x, shortcut, b1a, w1, b1b, b2a, w2, s, b2b, stride).out;
}

Tensor fixup_basic_autograd(const Tensor& x, const optional<Tensor>& shortcut,
                            const optional<Tensor>& b1a, const Tensor& w1, const Tensor& b1b,
                            const Tensor& b2a, const Tensor& w2, const Tensor& s,
                            const Tensor& b2b, int64_t stride) {
  return FixupFunction::apply(x, shortcut, b1a, w1, b1b, b2a, w2, s, b2b, stride)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normkit_kernels, m) {
  m.def(
      "fixup_basic(Tensor x, Tensor? shortcut, Tensor? bias1a, Tensor w1, Tensor bias1b, "
      "Tensor bias2a, Tensor w2, Tensor scale, Tensor bias2b, int stride) -> Tensor");
}

TORCH_LIBRARY_IMPL(normkit_kernels, CPU, m) { m.impl("fixup_basic", &fixup_basic); }

TORCH_LIBRARY_IMPL(normkit_kernels, Autograd, m) { m.impl("fixup_basic", &fixup_basic_autograd); }
