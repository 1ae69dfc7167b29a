"""Adaptive gradient clipping (Brock et al. 2021) against its unit-wise formula.

Identities (related-methods §3.4): after clipping, a clipped unit's gradient norm is
λ·max(‖W_i‖, ε); unclipped units are untouched; directions are kept; the final layer is left
alone when it is excluded. Checked on conv, linear, bias and scalar shapes against the literal
reference in float64.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import normkit as nk
from tests.reference import ref_agc

F64 = torch.float64
SHAPES = {
    "conv": (6, 3, 3, 3),
    "linear": (5, 4),
    "bias": (5,),
    "scalar": (),
    "conv1d": (4, 2, 3),
}


def _param(shape: tuple[int, ...], seed: int, grad_scale: float = 1.0) -> nn.Parameter:
    """A weight with unit norms spread over several orders of magnitude, and a gradient that
    clips some units and not others (checked by the tests that need both)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=F64)
    grad = torch.randn(shape, generator=g, dtype=F64) * grad_scale
    if len(shape) >= 1 and shape[0] > 1 and len(shape) > 1:
        rows = torch.logspace(-3, 0, shape[0], dtype=F64).reshape(-1, *([1] * (len(shape) - 1)))
        w, grad = w * rows, grad * rows.flip(0) * 0.05
    p = nn.Parameter(w)
    p.grad = grad
    return p


def _units(t: torch.Tensor) -> torch.Tensor:
    """Per-unit norms, one per output unit (one for a 0-d or 1-d tensor)."""
    if t.dim() <= 1:
        return t.norm().reshape(1)
    return t.reshape(t.shape[0], -1).norm(dim=1)


@pytest.mark.parametrize(("clip", "eps"), [(0.01, 1e-3), (0.1, 1e-3), (0.16, 0.5)])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_matches_the_unit_wise_reference_in_float64(kind: str, clip: float, eps: float) -> None:
    p = _param(SHAPES[kind], seed=len(kind))
    assert p.grad is not None
    want = ref_agc(p.detach(), p.grad, clip, eps)
    before = p.grad.clone()
    count = nk.adaptive_grad_clip_(p, clip, eps)
    torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-15)
    changed = (_units(p.grad - before) != 0).sum()
    assert count.dtype == torch.long and count.dim() == 0 and int(count) == int(changed)


@pytest.mark.parametrize("kind", ["conv", "linear", "conv1d"])
def test_clipped_units_get_norm_lambda_max_w_eps_and_keep_direction(kind: str) -> None:
    clip, eps = 0.05, 1e-3
    p = _param(SHAPES[kind], seed=3)
    assert p.grad is not None
    before = p.grad.clone()
    ratio = _units(before) / _units(p.detach()).clamp_min(eps)
    clipped = ratio > clip
    assert clipped.any() and (~clipped).any()  # both kinds of unit are exercised
    nk.adaptive_grad_clip_([p], clip_factor=clip, eps=eps)
    after = p.grad
    limit = clip * _units(p.detach()).clamp_min(eps)
    torch.testing.assert_close(_units(after)[clipped], limit[clipped], rtol=1e-12, atol=0)
    for i in range(after.shape[0]):
        if clipped[i]:
            # The same direction: a positive multiple of the old gradient.
            c = _units(after[i : i + 1]) / _units(before[i : i + 1])
            torch.testing.assert_close(after[i], before[i] * c, rtol=1e-12, atol=1e-15)
            assert 0 < c.item() < 1
        else:
            assert torch.equal(after[i], before[i])  # untouched, bit for bit


def test_zero_weights_are_measured_against_eps_and_zero_gradients_stay_zero() -> None:
    w = nn.Parameter(torch.zeros(3, 4, dtype=F64))
    w.grad = torch.ones(3, 4, dtype=F64)
    nk.adaptive_grad_clip_(w, clip_factor=0.1, eps=1e-3)
    torch.testing.assert_close(_units(w.grad), torch.full((3,), 1e-4, dtype=F64))
    b = nn.Parameter(torch.zeros(4, dtype=F64))
    b.grad = torch.zeros(4, dtype=F64)
    v = nn.Parameter(torch.ones(2, 3, dtype=F64))
    v.grad = torch.zeros(2, 3, dtype=F64)
    count = nk.adaptive_grad_clip_([b, v], clip_factor=0.01)
    assert int(count) == 0
    assert torch.equal(b.grad, torch.zeros(4, dtype=F64))
    assert torch.equal(v.grad, torch.zeros(2, 3, dtype=F64))


def test_an_excluded_head_is_left_unclipped() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    (model(torch.randn(4, 3, 6, 6)) * 100).square().sum().backward()
    head = model[3]
    head_grads = [p.grad.clone() for p in head.parameters() if p.grad is not None]
    body_before = [p.grad.clone() for p in model[0].parameters() if p.grad is not None]
    in_head = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if id(p) not in in_head]
    count = nk.adaptive_grad_clip_(body, clip_factor=0.01)
    assert int(count) > 0
    for p, g in zip(head.parameters(), head_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert any(not torch.equal(p.grad, g) for p, g in zip(model[0].parameters(), body_before))
    # Without the exclusion, the same (large) head gradient would have been clipped.
    again = [p.grad.clone() for p in head.parameters()]
    nk.adaptive_grad_clip_(head.parameters(), clip_factor=0.01)
    assert any(not torch.equal(p.grad, g) for p, g in zip(head.parameters(), again))


def test_accepts_a_tensor_a_generator_and_skips_parameters_without_gradients() -> None:
    model = nn.Linear(3, 2)
    assert int(nk.adaptive_grad_clip_(model.parameters())) == 0  # no gradients yet
    result = nk.adaptive_grad_clip_([])
    assert result.dtype == torch.long and int(result) == 0
    model(torch.randn(5, 3) * 100).sum().backward()
    model.bias.grad = None
    weight_grad = model.weight.grad.clone()
    count = nk.adaptive_grad_clip_(p for p in model.parameters())
    assert int(count) == 2 and model.bias.grad is None
    assert not torch.equal(model.weight.grad, weight_grad)
    single = _param((4, 3), seed=1, grad_scale=100.0)
    assert int(nk.adaptive_grad_clip_(single, 0.01)) == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_gradients_are_measured_in_float32(dtype: torch.dtype) -> None:
    p64 = _param((6, 3, 3, 3), seed=4)
    p = nn.Parameter(p64.detach().to(dtype))
    assert p64.grad is not None
    p.grad = p64.grad.to(dtype)
    want = ref_agc(p.detach().double(), p.grad.double(), 0.05, 1e-3)
    nk.adaptive_grad_clip_(p, 0.05)
    assert p.grad.dtype == dtype
    # Two roundings to the dtype (the factor, then the product); float16's smallest rows are
    # subnormal (spacing 2^-24). Norms accumulated in float16 would be far off: the squares of
    # those rows underflow to 0.
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6}[dtype]
    atol = 2**-23 if dtype == torch.float16 else 0.0
    torch.testing.assert_close(p.grad.double(), want, rtol=rtol, atol=atol)


def test_a_refused_call_changes_no_gradient() -> None:
    dense = _param((5, 4), seed=2, grad_scale=100.0)
    sparse = nn.Parameter(torch.randn(4, 3))
    sparse.grad = torch.randn(4, 3).to_sparse()
    assert dense.grad is not None
    before = dense.grad.clone()
    with pytest.raises(TypeError, match=r"^adaptive_grad_clip_: expected dense gradients"):
        nk.adaptive_grad_clip_([dense, sparse])
    with pytest.raises(TypeError, match=r"^adaptive_grad_clip_: expected an iterable of tensors"):
        nk.adaptive_grad_clip_([dense, None])
    assert torch.equal(dense.grad, before)


@pytest.mark.parametrize(
    ("args", "exc", "fragment"),
    [
        ((None,), TypeError, "a tensor or an iterable of tensors"),
        ((3.0,), TypeError, "got float"),
        ((["w"],), TypeError, "got str at position 0"),
        (([], 0.0), ValueError, "clip_factor > 0, got 0.0"),
        (([], -1.0), ValueError, "clip_factor > 0, got -1.0"),
        (([], float("inf")), ValueError, "finite clip_factor > 0, got inf"),
        (([], 0.01, 0.0), ValueError, "eps > 0, got 0.0"),
        (([], 0.01, float("nan")), ValueError, "eps > 0, got nan"),
        (([], "0.1"), TypeError, "clip_factor to be a number, got '0.1'"),
        (([], 0.01, True), TypeError, "eps to be a number, got True"),
    ],
)
def test_bad_arguments_are_refused(args: tuple[Any, ...], exc: type, fragment: str) -> None:
    with pytest.raises(exc, match=r"^adaptive_grad_clip_: expected") as info:
        nk.adaptive_grad_clip_(*args)
    assert fragment in str(info.value)
