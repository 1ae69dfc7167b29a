"""FRN and TLU against the literal reference and the identities of the paper."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from normkit.layers.response import LEARNED_EPS_INIT
from tests.reference import ref_frn

F64 = torch.float64
C = 4
SHAPES = {"4d": (5, C, 3, 4), "dense": (6, C)}
# (tlu, affine, learnable_eps)
CONFIGS = [
    pytest.param(True, True, False, id="tlu-affine"),
    pytest.param(False, True, False, id="plain-affine"),
    pytest.param(True, False, True, id="tlu-learnable-eps"),
    pytest.param(False, True, True, id="plain-affine-learnable-eps"),
    pytest.param(True, True, True, id="tlu-affine-learnable-eps"),
]


def _layer(tlu: bool, affine: bool, learnable_eps: bool, seed: int = 0) -> Any:
    layer = nk.FilterResponseNorm2d(
        C, affine=affine, learnable_eps=learnable_eps, tlu=tlu, dtype=F64
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(1.0 + 0.5 * torch.randn(C, generator=g, dtype=F64))
            layer.bias.copy_(0.5 * torch.randn(C, generator=g, dtype=F64))
        if layer.tau is not None:
            layer.tau.copy_(0.3 * torch.randn(C, generator=g, dtype=F64))
        if layer.learned_eps is not None:
            layer.learned_eps.fill_(0.05)
    return layer


def _x(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5


def _eps(layer: Any) -> Tensor | float:
    if layer.learned_eps is None:
        return float(layer.eps)
    return layer.eps + layer.learned_eps.abs()


def _reference(layer: Any, x: Tensor) -> Tensor:
    return ref_frn(x, eps=_eps(layer), weight=layer.weight, bias=layer.bias, tau=layer.tau)


def _pre_threshold(layer: Any, x: Tensor) -> Tensor:
    """y = γ x̂ + β of the reference, without the TLU (to locate the kink of max)."""
    with torch.no_grad():
        return ref_frn(x, eps=_eps(layer), weight=layer.weight, bias=layer.bias)


def _away_from_kink(layer: Any, x: Tensor) -> None:
    # gradcheck's finite differences (step 1e-6) must not straddle y = τ.
    if layer.tau is not None:
        y = _pre_threshold(layer, x)
        gap = (y - layer.tau.reshape(1, -1, *([1] * (x.dim() - 2)))).abs().min()
        assert gap > 1e-4, f"input too close to the TLU kink ({gap})"


# --- the formula --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("tlu", "affine", "learnable_eps"), CONFIGS)
def test_matches_the_literal_reference_forward_and_gradients(
    tlu: bool, affine: bool, learnable_eps: bool, shape: tuple[int, ...]
) -> None:
    layer = _layer(tlu, affine, learnable_eps)
    ref_layer = copy.deepcopy(layer)
    x = _x(shape).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = layer(x)
    want = _reference(ref_layer, x_ref)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(layer.named_parameters(), ref_layer.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        assert p.grad.count_nonzero() > 0, f"{name} got no gradient"
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_plain_frn_is_x_over_root_mean_square_times_gamma_plus_beta(
    shape: tuple[int, ...],
) -> None:
    layer = _layer(tlu=False, affine=True, learnable_eps=False)
    x = _x(shape)
    dims = list(range(2, x.dim()))
    nu2 = (x * x).mean(dim=dims, keepdim=True) if dims else x * x
    view = (1, C, *([1] * len(dims)))
    want = x / torch.sqrt(nu2 + layer.eps) * layer.weight.reshape(view) + layer.bias.reshape(view)
    # Equal up to the rounding of a different but equivalent order of float64 operations.
    torch.testing.assert_close(layer(x), want, rtol=1e-14, atol=1e-14)


def test_the_learned_eps_enters_as_its_absolute_value_added_to_eps() -> None:
    x = _x(SHAPES["dense"])
    layer = _layer(tlu=False, affine=True, learnable_eps=True)
    plain = nk.FilterResponseNorm2d(C, eps=1e-6 + 0.05, tlu=False, dtype=F64)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        layer.learned_eps.neg_()  # |ε_l| is what counts
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        layer.learned_eps.zero_()
    plain.eps = 1e-6
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-14, atol=1e-14)


def test_learned_eps_starts_at_1e_4_and_learns_on_dense_input() -> None:
    layer = nk.FilterResponseNorm2d(C, learnable_eps=True, tlu=False, dtype=F64)
    assert layer.learned_eps.shape == (1,)
    assert layer.learned_eps.item() == LEARNED_EPS_INIT
    # On (N, C) input x̂ = x / sqrt(x² + ε): ε is what keeps a gradient flowing to x.
    x = _x(SHAPES["dense"]).requires_grad_()
    layer(x).sum().backward()
    assert layer.learned_eps.grad is not None and layer.learned_eps.grad.item() != 0.0
    assert x.grad is not None and bool((x.grad.abs() > 0).all())


# --- TLU ------------------------------------------------------------------------------------------


def test_tlu_is_max_with_tau_and_tau_gets_the_gradient_where_y_is_below_it() -> None:
    tlu = nk.TLU(C, dtype=F64)
    with torch.no_grad():
        tlu.tau.copy_(torch.tensor([-0.5, 0.0, 0.5, 1.0], dtype=F64))
    y = _x((5, C, 3, 3)).requires_grad_()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    tau = tlu.tau.reshape(1, C, 1, 1)
    out = tlu(y)
    assert torch.equal(out, torch.where(y > tau, y, tau.expand_as(y)))
    out.backward(g)
    below = (y < tau).detach()
    assert bool(below.any()) and bool((~below).any())
    torch.testing.assert_close(tlu.tau.grad, (g * below).sum(dim=(0, 2, 3)))
    assert torch.equal(y.grad, g * ~below)


def test_tlu_starts_as_a_relu() -> None:
    x = _x((3, C, 2, 2))
    assert torch.equal(nk.TLU(C, dtype=F64)(x), torch.relu(x))
    assert torch.equal(nk.TLU(C)(x[:, :, 0, 0].float()), torch.relu(x[:, :, 0, 0].float()))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_frn_with_tlu_is_plain_frn_then_the_tlu(shape: tuple[int, ...]) -> None:
    layer = _layer(tlu=True, affine=True, learnable_eps=True)
    plain = nk.FilterResponseNorm2d(C, learnable_eps=True, tlu=False, dtype=F64)
    tlu = nk.TLU(C, dtype=F64)
    state = layer.state_dict()
    tlu.load_state_dict({"tau": state.pop("tau")})
    plain.load_state_dict(state)
    x = _x(shape)
    assert torch.equal(layer(x), tlu(plain(x)))


# --- batch independence ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_sample_output_does_not_depend_on_the_rest_of_the_batch(
    shape: tuple[int, ...], training: bool
) -> None:
    layer = _layer(tlu=True, affine=True, learnable_eps=True).train(training)
    x = _x(shape)
    out = layer(x)
    other = _x(shape, seed=9) * 10 - 3  # a very different batch around sample 0
    other[0] = x[0]
    torch.testing.assert_close(layer(other)[0], out[0], rtol=0, atol=0)
    for i in range(shape[0]):
        torch.testing.assert_close(layer(x[i : i + 1]), out[i : i + 1], rtol=0, atol=0)


def test_train_and_eval_compute_the_same_function() -> None:
    layer = _layer(tlu=True, affine=True, learnable_eps=True)
    x = _x(SHAPES["4d"])
    assert torch.equal(layer.train()(x), layer.eval()(x))
    assert not list(layer.buffers())


# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("tlu", "affine", "learnable_eps"), CONFIGS)
def test_gradcheck_and_gradgradcheck(
    tlu: bool, affine: bool, learnable_eps: bool, shape: tuple[int, ...]
) -> None:
    layer = _layer(tlu, affine, learnable_eps)
    x = _x((2, C, 2, 3) if len(shape) == 4 else (3, C)).requires_grad_()
    _away_from_kink(layer, x)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))
        return out

    assert gradcheck(fn, (x, *params))
    # Second derivatives through a random projection (u^T H v), to keep the suite fast.
    assert gradgradcheck(fn, (x, *params), fast_mode=True)


def test_tlu_gradcheck() -> None:
    tlu = nk.TLU(C, dtype=F64)
    with torch.no_grad():
        tlu.tau.copy_(torch.tensor([-0.5, 0.1, 0.5, 1.2], dtype=F64))
    y = _x((2, C, 2, 2)).requires_grad_()
    assert (y - tlu.tau.reshape(1, C, 1, 1)).abs().min() > 1e-4
    tau = tlu.tau.detach().clone().requires_grad_()

    def fn(y: Tensor, tau: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(tlu, {"tau": tau}, (y,))
        return out

    assert gradcheck(fn, (y, tau))


# --- precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_computes_the_mean_square_in_float32(dtype: torch.dtype) -> None:
    # x² of 300 is 9e4, past float16's largest value (65504): a float16 mean square overflows.
    layer = nk.FilterResponseNorm2d(C, tlu=False)
    x = torch.full((2, C, 3, 3), 300.0)
    x[:, :, 0, 0] = -300.0
    x_low = x.to(dtype)
    out = layer(x_low)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    # The same numbers as the float32 run, to the precision of the final scale-and-shift, which
    # runs in the input's dtype.
    torch.testing.assert_close(out, layer(x_low.float()).to(dtype))


def test_float32_parameters_keep_a_half_precision_output() -> None:
    layer = nk.FilterResponseNorm2d(C, learnable_eps=True)
    x = _x(SHAPES["4d"]).half()
    assert layer(x).dtype == torch.float16
    assert nk.TLU(C)(x).dtype == torch.float16


# --- state, shapes, arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "keys"),
    [
        ({}, {"weight", "bias", "tau"}),
        ({"tlu": False}, {"weight", "bias"}),
        ({"affine": False, "learnable_eps": True}, {"tau", "learned_eps"}),
        ({"affine": False, "tlu": False}, set()),
    ],
)
def test_state_dict_names_and_round_trip(kwargs: dict[str, Any], keys: set[str]) -> None:
    layer = nk.FilterResponseNorm2d(C, dtype=F64, **kwargs)
    assert set(layer.state_dict()) == keys
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.rand(p.shape, dtype=F64))
    fresh = nk.FilterResponseNorm2d(C, dtype=F64, **kwargs)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = _x(SHAPES["4d"])
    assert torch.equal(fresh(x), layer(x))


def test_reset_parameters_restores_the_init() -> None:
    layer = nk.FilterResponseNorm2d(C, learnable_eps=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(C)) and torch.equal(layer.bias, torch.zeros(C))
    assert torch.equal(layer.tau, torch.zeros(C))
    assert layer.learned_eps.item() == pytest.approx(LEARNED_EPS_INIT)
    tlu = nk.TLU(C)
    with torch.no_grad():
        tlu.tau.add_(1.0)
    tlu.reset_parameters()
    assert torch.equal(tlu.tau, torch.zeros(C))


def test_repr_shows_every_option() -> None:
    text = repr(nk.FilterResponseNorm2d(8, eps=1e-5, learnable_eps=True, tlu=False))
    assert text == (
        "FilterResponseNorm2d(8, eps=1e-05, affine=True, learnable_eps=True, tlu=False)"
    )
    assert repr(nk.TLU(8)) == "TLU(8)"


@pytest.mark.parametrize(
    ("make", "exc", "fragment"),
    [
        (lambda: nk.FilterResponseNorm2d(0), ValueError, "num_features >= 1, got 0"),
        (lambda: nk.FilterResponseNorm2d(4, eps=0.0), ValueError, "eps > 0, got 0.0"),
        (lambda: nk.FilterResponseNorm2d(4, eps=-1e-6), ValueError, "eps > 0, got -1e-06"),
        (lambda: nk.FilterResponseNorm2d(4, eps=float("inf")), ValueError, "finite eps"),
        (lambda: nk.FilterResponseNorm2d(4, eps="1e-6"), TypeError, "eps to be a number"),
        (lambda: nk.FilterResponseNorm2d(4, tlu="no"), TypeError, "tlu to be a bool, got 'no'"),
        (
            lambda: nk.FilterResponseNorm2d(4, learnable_eps=None),
            TypeError,
            "learnable_eps to be a bool, got None",
        ),
        (lambda: nk.FilterResponseNorm2d(4, affine=2), TypeError, "affine to be a bool, got 2"),
        (
            lambda: nk.FilterResponseNorm2d(4, dtype=torch.int32),
            TypeError,
            "dtype to be a floating-point",
        ),
        (lambda: nk.TLU(-2), ValueError, "TLU: expected num_features >= 1, got -2"),
        (lambda: nk.TLU(2.0), TypeError, "TLU: expected num_features to be an int, got 2.0"),
    ],
)
def test_bad_constructor_arguments_are_refused(
    make: Any, exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc, match=r"^(FilterResponseNorm2d|TLU): expected") as info:
        make()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("layer", "shape", "fragment"),
    [
        (lambda: nk.FilterResponseNorm2d(C), (2, C, 3), "expected 2D or 4D input"),
        (lambda: nk.FilterResponseNorm2d(C), (2, C, 3, 3, 3), "got 5D input"),
        (lambda: nk.FilterResponseNorm2d(C), (2, C + 1, 3, 3), f"expected {C} channels"),
        (lambda: nk.FilterResponseNorm2d(C), (C,), "got 1D input"),
        (lambda: nk.TLU(C), (2, C, 1, 1, 1, 1), "got 6D input"),
        (lambda: nk.TLU(C), (2, C - 1), f"expected {C} channels"),
    ],
)
def test_bad_input_is_refused_naming_the_layer(
    layer: Any, shape: tuple[int, ...], fragment: str
) -> None:
    module: nn.Module = layer()
    name = type(module).__name__
    with pytest.raises(ValueError, match=f"^{name}: ") as info:
        module(torch.randn(shape))
    assert fragment in str(info.value) and str(shape) in str(info.value)
    with pytest.raises(TypeError, match=f"^{name}: expected a floating-point input"):
        module(torch.ones(2, C, 3, 3, dtype=torch.long))


def test_registry_builds_frn_with_its_tlu() -> None:
    for name in ("frn", "FRN-2d", "frn_2d"):
        layer = nk.create_norm(name, 8)
        assert type(layer) is nk.FilterResponseNorm2d and layer.tlu and layer.eps == 1e-6
    layer = nk.get_norm_layer("frn", learnable_eps=True)(16)
    assert layer.learnable_eps and layer.num_features == 16
