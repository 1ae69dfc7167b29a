// Autograd plumbing shared by normkit's C++ operators (core.cpp, fixup.cpp): which inputs need a
// gradient, and the create_graph path that differentiates an operator's reference composition.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <array>
#include <cstddef>

namespace normkit_autograd {

// Which of an operator's K differentiable inputs need a gradient (graph edges exist for the
// tensors that were given, in order; an absent optional has none).
template <size_t K>
std::array<bool, K> input_needs(torch::autograd::AutogradContext* ctx,
                                const std::array<at::Tensor, K>& in) {
  std::array<bool, K> needs{};
  size_t edge = 0;
  for (size_t i = 0; i < K; ++i) {
    if (in[i].defined()) needs[i] = ctx->needs_input_grad(edge++);
  }
  return needs;
}

// With grad mode on in backward (create_graph), the gradients of the reference composition
// `reference(inputs)` instead of the kernel's, so that they can be differentiated again. The
// reference sees fresh alias nodes of the saved inputs: the nested gradient must stop at this
// operator's inputs. Taken w.r.t. the inputs themselves it would also follow any path between
// them (the same layer applied twice makes its second input a function of its weight; a Fixup
// block's shortcut is a function of its input) and count that path here and again in the outer
// backward. `out` has one slot per forward argument; the first K are the inputs'.
template <size_t K, typename Reference>
torch::autograd::variable_list reference_grads(const std::array<at::Tensor, K>& saved,
                                               const std::array<bool, K>& needs,
                                               const at::Tensor& gy, size_t num_args,
                                               Reference reference) {
  torch::autograd::variable_list out(num_args);
  std::array<at::Tensor, K> in;
  torch::autograd::variable_list wanted;
  for (size_t i = 0; i < K; ++i) {
    if (saved[i].defined()) in[i] = saved[i].view_as(saved[i]);
    if (needs[i]) wanted.push_back(in[i]);
  }
  if (wanted.empty()) return out;
  auto got = torch::autograd::grad({reference(in)}, wanted, {gy}, /*retain_graph=*/std::nullopt,
                                   /*create_graph=*/true, /*allow_unused=*/true);
  size_t j = 0;
  for (size_t i = 0; i < K; ++i) {
    if (needs[i]) out[i] = got[j++];
  }
  return out;
}

}  // namespace normkit_autograd
