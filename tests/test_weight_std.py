"""Weight Standardization layers: presets against transcribed formulas, cache, bake, converter."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn import functional as F
from torch.nn.utils import prune

import normkit
from normkit import (
    WS_PRESETS,
    CenConv2d,
    ScaledWSConv2d,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    WSLinear,
    kernels,
    weight_standardize_,
)

D = torch.float64


# --- independent transcriptions of the reference formulas --------------------------------------


def ref_paper(w: Tensor, eps: float = 1e-5) -> Tensor:
    """Paper: sigma = sqrt(biased var + eps)."""
    flat = w.reshape(w.shape[0], -1)
    n = flat.shape[1]
    mu = flat.sum(dim=1, keepdim=True) / n
    var = ((flat - mu) ** 2).sum(dim=1, keepdim=True) / n
    return ((flat - mu) / torch.sqrt(var + eps)).reshape(w.shape)


def ref_official(w: Tensor, eps: float = 1e-5) -> Tensor:
    """The authors' PyTorch code: sigma = unbiased std + eps."""
    flat = w.reshape(w.shape[0], -1)
    n = flat.shape[1]
    mu = flat.sum(dim=1, keepdim=True) / n
    std = torch.sqrt(((flat - mu) ** 2).sum(dim=1, keepdim=True) / (n - 1))
    return ((flat - mu) / (std + eps)).reshape(w.shape)


REFS: dict[str, Callable[..., Tensor]] = {"paper": ref_paper, "official": ref_official}

CONVS: dict[type[nn.Module], tuple[Callable[..., Tensor], int]] = {
    WSConv1d: (F.conv1d, 1),
    WSConv2d: (F.conv2d, 2),
    WSConv3d: (F.conv3d, 3),
}


def conv_reference(m: Any, x: Tensor, w: Tensor) -> Tensor:
    fn, _ = CONVS[type(m)]
    return fn(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)


def make_conv(cls: type, dims: int, groups: int, bias: bool, **kw: Any) -> Any:
    return cls(4, 6, 3, stride=1, padding=1, groups=groups, bias=bias, dtype=D, **kw)


# --- presets match their formulas ---------------------------------------------------------------


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("cls", [WSConv1d, WSConv2d, WSConv3d])
def test_conv_preset_matches_transcribed_formula(
    cls: type, groups: int, bias: bool, preset: str
) -> None:
    torch.manual_seed(0)
    dims = CONVS[cls][1]
    m = make_conv(cls, dims, groups, bias, preset=preset)
    # Shift and scale the raw weight so the standardization has something to undo.
    with torch.no_grad():
        m.weight.mul_(3.0).add_(0.5)
    x = torch.randn(2, 4, *([5] * dims), dtype=D)
    expected = conv_reference(m, x, REFS[preset](m.weight))
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.standardized_weight(), REFS[preset](m.weight))


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_preset_matches_transcribed_formula(bias: bool, preset: str) -> None:
    torch.manual_seed(1)
    m = WSLinear(7, 5, bias=bias, dtype=D, preset=preset)
    x = torch.randn(3, 7, dtype=D)
    expected = F.linear(x, REFS[preset](m.weight), m.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


def test_presets_differ_measurably_on_small_fan_in() -> None:
    # Guards against a preset table in which both names map to the same convention.
    torch.manual_seed(2)
    w = torch.randn(3, 2, 2, 1, dtype=D)
    a = WSConv2d(2, 3, (2, 1), dtype=D, preset="paper")
    b = WSConv2d(2, 3, (2, 1), dtype=D, preset="official")
    b.weight = a.weight = nn.Parameter(w)
    assert (a.standardized_weight() - b.standardized_weight()).abs().max() > 1e-2
    assert WS_PRESETS["paper"] != WS_PRESETS["official"]


def test_overrides_replace_preset_values() -> None:
    torch.manual_seed(3)
    m = WSConv2d(3, 4, 3, dtype=D, preset="paper", eps=1e-2, unbiased=True)
    flat = m.weight.reshape(4, -1)
    n = flat.shape[1]
    mu = flat.sum(1, keepdim=True) / n
    var_u = ((flat - mu) ** 2).sum(1, keepdim=True) / (n - 1)
    expected = ((flat - mu) / torch.sqrt(var_u + 1e-2)).reshape(m.weight.shape)
    torch.testing.assert_close(m.standardized_weight(), expected)
    assert (m.eps, m.unbiased, m.eps_mode, m.preset) == (1e-2, True, "sqrt", "paper")

    o = WSConv2d(3, 4, 3, dtype=D, preset="official", eps_mode="sqrt")
    assert (o.eps, o.unbiased, o.eps_mode) == (1e-5, True, "sqrt")


def test_padding_mode_and_groups_go_through_parent_conv() -> None:
    torch.manual_seed(4)
    m = WSConv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect", dtype=D)
    x = torch.randn(2, 4, 7, 7, dtype=D)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    expected = F.conv2d(padded, ref_paper(m.weight), m.bias, 1, 0, 2, 2)
    torch.testing.assert_close(m(x), expected)
    assert m(x).shape == (2, 6, 7, 7)


# --- identities ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_paper_filters_have_mean_zero_and_variance_v_over_v_plus_eps(scale: float) -> None:
    torch.manual_seed(5)
    eps = 1e-5
    m = WSConv2d(8, 16, 3, dtype=D)
    with torch.no_grad():
        m.weight.mul_(scale)
    w = m.weight.detach().reshape(16, -1)
    v = ((w - w.mean(1, keepdim=True)) ** 2).mean(1)
    s = m.standardized_weight().detach().reshape(16, -1)
    torch.testing.assert_close(s.mean(1), torch.zeros(16, dtype=D), atol=1e-12, rtol=0)
    got = ((s - s.mean(1, keepdim=True)) ** 2).mean(1)
    torch.testing.assert_close(got, v / (v + eps), rtol=1e-12, atol=0)
    if scale < 1:
        # At this scale eps dominates, so the exact identity is far from 1.
        assert got.max() < 0.5


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("cls", [WSConv2d, WSLinear])
def test_output_invariant_to_per_filter_affine_of_weight(cls: type, preset: str) -> None:
    torch.manual_seed(6)
    if cls is WSLinear:
        m, x = cls(32, 8, dtype=D, preset=preset), torch.randn(4, 32, dtype=D)
    else:
        m, x = cls(4, 8, 3, dtype=D, preset=preset), torch.randn(2, 4, 6, 6, dtype=D)
    with torch.no_grad():
        m.weight.copy_(torch.randn_like(m.weight))  # variance ~1, so eps effects are ~1e-5
    before = m(x)
    view = (-1,) + (1,) * (m.weight.dim() - 1)
    a = torch.empty(8, dtype=D).uniform_(0.5, 2.0).reshape(view)
    b = torch.randn(8, dtype=D).reshape(view)
    with torch.no_grad():
        m.weight.mul_(a).add_(b)
    after = m(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # Not vacuous: the raw weights changed a lot.
    assert (m.weight - m.weight.mean()).abs().max() > 0.1


# --- checkpoints --------------------------------------------------------------------------------


def test_plain_conv2d_state_dict_loads_strictly_with_identical_keys() -> None:
    plain = nn.Conv2d(3, 5, 3, padding=1)
    ws = WSConv2d(3, 5, 3, padding=1)
    assert list(ws.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    ws.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(ws.weight, plain.weight)
    plain2 = nn.Conv2d(3, 5, 3, padding=1)
    plain2.load_state_dict(ws.state_dict(), strict=True)


def test_parametrized_ws_checkpoint_key_loads_into_weight() -> None:
    class Centre(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return w - w.mean(dim=(1, 2, 3), keepdim=True)

    p = nn.Conv2d(3, 4, 3)
    nn.utils.parametrize.register_parametrization(p, "weight", Centre())
    sd = p.state_dict()
    assert "parametrizations.weight.original" in sd
    ws = WSConv2d(3, 4, 3)
    ws.load_state_dict(sd, strict=True)
    assert torch.equal(ws.weight, p.parametrizations.weight.original)


# --- eval cache ---------------------------------------------------------------------------------


class CountCalls:
    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CountCalls:
    # The standardization itself, which both the reference and the fast path call.
    c = CountCalls(normkit.functional.standardize_parts)
    monkeypatch.setattr(normkit.functional, "standardize_parts", c)
    return c


def test_eval_cache_equals_live_and_is_reused(counter: CountCalls) -> None:
    torch.manual_seed(7)
    m = WSConv2d(3, 4, 3, dtype=D).eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    with torch.no_grad():
        y1 = m(x)
        y2 = m(x)
        w1, w2 = m.standardized_weight(), m.standardized_weight()
    assert counter.calls == 1
    assert w1 is w2
    assert torch.equal(y1, y2)
    torch.testing.assert_close(w1, ref_paper(m.weight.detach()), rtol=1e-13, atol=1e-13)
    m.train()
    assert torch.equal(m(x).detach(), y1)


def test_eval_cache_invalidated_by_optimizer_step(counter: CountCalls) -> None:
    torch.manual_seed(8)
    m = WSConv2d(3, 4, 3, dtype=D).eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    with torch.no_grad():
        stale = m(x)
    m(x).square().sum().backward()  # grad enabled + trainable weight: live path
    opt.step()
    with torch.no_grad():
        fresh = m(x)
    assert not torch.allclose(fresh, stale)
    torch.testing.assert_close(fresh, conv_reference(m, x, ref_paper(m.weight.detach())))


def test_eval_cache_invalidated_by_load_state_dict_and_dtype_change() -> None:
    torch.manual_seed(9)
    m = WSConv2d(3, 4, 3).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        m(x)
        other = nn.Conv2d(3, 4, 3)
        m.load_state_dict(other.state_dict())
        torch.testing.assert_close(m(x), F.conv2d(x, ref_paper(other.weight), other.bias))
        m.to(D)
        y = m(x.to(D))
    assert y.dtype == D
    torch.testing.assert_close(y, F.conv2d(x.to(D), ref_paper(m.weight), m.bias))


def test_eval_cache_invalidated_by_new_parameter_and_eps_change() -> None:
    torch.manual_seed(10)
    m = WSConv2d(3, 4, 3, dtype=D).eval()
    with torch.no_grad():
        m.standardized_weight()
        m.weight = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=D))
        torch.testing.assert_close(m.standardized_weight(), ref_paper(m.weight))
        m.eps = 0.5
        torch.testing.assert_close(m.standardized_weight(), ref_paper(m.weight, 0.5))


@pytest.mark.parametrize(("attr", "value"), [("unbiased", True), ("eps_mode", "std")])
def test_eval_cache_invalidated_by_unbiased_and_eps_mode(attr: str, value: object) -> None:
    # The module docstring promises eps, unbiased and eps_mode are watched (eps: test above).
    torch.manual_seed(24)
    m = WSConv2d(3, 4, 2, dtype=D).eval()  # fan-in 12: n against n - 1 is visible
    with torch.no_grad():
        m.standardized_weight()
        setattr(m, attr, value)
        got = m.standardized_weight()
    want = normkit.functional.weight_standardize(
        m.weight.detach(), m.eps, unbiased=m.unbiased, eps_mode=m.eps_mode
    )
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_eval_cache_tells_apart_a_new_parameter_on_the_same_storage() -> None:
    torch.manual_seed(22)
    m = WSConv2d(4, 4, 1, dtype=D).eval()
    with torch.no_grad():
        m.standardized_weight()
        # Same storage pointer, version counter, shape and dtype; different values.
        m.weight = nn.Parameter(m.weight.detach().transpose(0, 1))
        torch.testing.assert_close(m.standardized_weight(), ref_paper(m.weight))


def test_eval_cache_serves_a_plain_tensor_weight_and_sees_its_updates(counter: CountCalls) -> None:
    # A weight that is no registered Parameter (deleted and set as a plain tensor attribute) is
    # looked up by name on the cache's hit path too: cached, and refreshed after an update.
    torch.manual_seed(23)
    m = WSConv2d(3, 4, 3, dtype=D).eval()
    w = m.weight.detach().clone()
    del m.weight
    m.weight = w
    with torch.no_grad():
        first = m.standardized_weight()
        assert m.standardized_weight() is first
        assert counter.calls == 1
        w.mul_(2.0).add_(0.5)  # bumps the version
        torch.testing.assert_close(m.standardized_weight(), ref_paper(w), rtol=1e-13, atol=1e-13)
    assert counter.calls == 2


def test_training_never_uses_cache_even_after_untracked_edit() -> None:
    torch.manual_seed(11)
    m = WSConv2d(3, 4, 3, dtype=D).eval()
    with torch.no_grad():
        cached = m.standardized_weight()
    # ``.data`` edits do not bump the version counter, so only a cache-free path sees them.
    m.weight.data.mul_(-1.0)
    m.train()
    torch.testing.assert_close(m.standardized_weight(), -cached)
    with torch.no_grad():
        m.eval()
        m.weight.data.mul_(-1.0)
        m.standardized_weight()  # cache the original again
        m.weight.data.add_(torch.randn_like(m.weight))
        assert torch.equal(m.standardized_weight(), cached)  # documented limitation
        m.clear_cache()
        torch.testing.assert_close(m.standardized_weight(), ref_paper(m.weight))
        # Training under no_grad (e.g. a BN-recalibration pass) is still live.
        m.train()
        m.standardized_weight()
        m.weight.data.mul_(-1.0)
        torch.testing.assert_close(m.standardized_weight(), ref_paper(m.weight))


def test_eval_with_grad_enabled_backpropagates_into_weight(counter: CountCalls) -> None:
    torch.manual_seed(12)
    m = WSConv2d(3, 4, 3, dtype=D).eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    with torch.no_grad():
        m(x)  # populate the cache; it must not be used below
    m(x).sum().backward()
    g_eval = m.weight.grad.clone()
    m.weight.grad = None
    m.train()
    m(x).sum().backward()
    torch.testing.assert_close(g_eval, m.weight.grad)
    assert g_eval.abs().max() > 0


def test_frozen_weight_uses_cache_with_grad_enabled_even_if_built_in_inference_mode(
    counter: CountCalls,
) -> None:
    torch.manual_seed(13)
    m = WSConv2d(3, 4, 3, dtype=D).eval().requires_grad_(False)
    with torch.inference_mode():
        m(torch.randn(1, 3, 5, 5, dtype=D))
    x = torch.randn(2, 3, 5, 5, dtype=D, requires_grad=True)
    y = m(x)  # input gradient with a frozen, cached weight
    y.sum().backward()
    assert counter.calls == 1
    expected = torch.autograd.grad(
        F.conv2d(x, ref_paper(m.weight), m.bias).sum(), x, retain_graph=False
    )[0]
    torch.testing.assert_close(x.grad, expected)


def test_cached_layer_pickles_and_deepcopies() -> None:
    m = WSConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        y = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for other in (loaded, twin):
            torch.testing.assert_close(other(x), y)
            other.weight.mul_(2.0).add_(1.0)
            assert not torch.allclose(other(x), y)  # its own weight, not the original's


# --- eval cache: storage identity, inference tensors, swapping ---------------------------------


@pytest.fixture(params=[False, True], ids=["kernels-off", "kernels-on"])
def kernels_on(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Each test twice: with normkit's compiled kernels off and on (the WS kernel computes the
    cached weight when they are on); their previous state is restored."""
    was = kernels.is_enabled()
    (kernels.enable if request.param else kernels.disable)()
    try:
        yield request.param
    finally:
        (kernels.enable if was else kernels.disable)()


def test_eval_cache_holds_the_old_storage_so_data_assignments_are_seen(kernels_on: bool) -> None:
    # ``.data =`` keeps the version counter. Were the cached weight's storage freed, the
    # allocator could give its address to the next weight, and the key (version, pointer,
    # shape) would match a stale entry. The entry holds that storage, so it cannot.
    torch.manual_seed(23)
    m = WSConv2d(4, 6, 3, dtype=D).eval()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    with torch.no_grad():
        m(x)
        cached = StorageWeakRef(m.weight.untyped_storage())
        cached_ptr = m.weight.data_ptr()
        m.weight.data = torch.randn_like(m.weight)
        between = StorageWeakRef(m.weight.untyped_storage())
        m.weight.data = torch.randn_like(m.weight)
        assert not cached.expired()  # held by the entry: its address cannot be reused
        assert between.expired()  # never more than the one cached weight is kept
        assert m.weight.data_ptr() != cached_ptr
        torch.testing.assert_close(m(x), conv_reference(m, x, ref_paper(m.weight)))
        assert cached.expired()  # replaced: the entry holds the current weight's storage
        current = StorageWeakRef(m.weight.untyped_storage())
        m.weight.data = torch.randn_like(m.weight)
        m.clear_cache()
        assert current.expired()


def test_eval_cache_tells_apart_a_new_layout_of_the_same_storage() -> None:
    torch.manual_seed(25)
    m = WSConv2d(4, 4, 1, dtype=D).eval()
    with torch.no_grad():
        m.standardized_weight()
        # Same storage, pointer, version counter, shape and dtype; other strides, other values.
        m.weight.data = m.weight.data.transpose(0, 1)
        torch.testing.assert_close(m.standardized_weight(), ref_paper(m.weight))


def _wide(cls: type) -> Any:
    return cls(4, 6, 3, padding=1)


@pytest.mark.parametrize("cls", [WSConv2d, ScaledWSConv2d, CenConv2d])
def test_layer_built_in_inference_mode_evaluates_like_a_plain_conv(
    cls: type, kernels_on: bool
) -> None:
    # Inference tensors have no version counter, so the cache cannot watch them: such a
    # layer computes its weight at every call, and behaves as a plain conv holding that weight.
    torch.manual_seed(24)
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        m = _wide(cls).eval()
        assert m.weight.is_inference()
        got = [m(x), m(x)]
        plain = m.bake()
        want = plain(x)
    with torch.no_grad():
        got.append(m(x))
        want_no_grad = plain(x)
    assert torch.equal(want, want_no_grad)
    for y in got:
        assert torch.equal(y, want)
    assert m.__dict__["_ws_cache"] is None
    with torch.inference_mode():
        m.weight.mul_(-1.0).add_(0.5)  # in place, which nothing could track
        torch.testing.assert_close(m(x), m.bake()(x))
        assert not torch.allclose(m(x), want)


@pytest.mark.parametrize(
    "parametrize_",
    [
        pytest.param(
            lambda m: nn.utils.parametrize.register_parametrization(m, "weight", _Centre()),
            id="custom",
        ),
        pytest.param(nn.utils.parametrizations.spectral_norm, id="spectral_norm"),
        pytest.param(nn.utils.parametrizations.weight_norm, id="weight_norm"),
        pytest.param(lambda m: prune.random_unstructured(m, "weight", 0.5), id="prune"),
    ],
)
def test_parametrized_ws_layer_loads_its_own_state_dict(
    parametrize_: Callable[[nn.Module], Any],
) -> None:
    torch.manual_seed(26)
    x = torch.randn(2, 4, 5, 5, dtype=D)
    a, b = WSConv2d(4, 6, 3, dtype=D), WSConv2d(4, 6, 3, dtype=D)
    for m in (a, b):
        parametrize_(m)
        m.eval()
    b.load_state_dict(a.state_dict(), strict=True)
    assert b.state_dict().keys() == a.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
        torch.testing.assert_close(b(x), F.conv2d(x, ref_paper(b.weight), b.bias))


class _Centre(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w - w.mean(dim=(1, 2, 3), keepdim=True)


class _Scaled(nn.Module):
    """A parametrization with a right inverse: registering it sets (swaps) the original."""

    def forward(self, w: Tensor) -> Tensor:
        return 2.0 * w

    def right_inverse(self, w: Tensor) -> Tensor:
        return w / 2.0


@pytest.fixture
def swap_on_conversion() -> Iterator[None]:
    """``torch.__future__.set_swap_module_params_on_conversion(True)`` for one test; the
    previous setting is restored."""
    was = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(was)


@pytest.mark.parametrize("cls", [WSConv2d, ScaledWSConv2d, CenConv2d])
def test_an_eval_forward_does_not_block_swapping_the_parameters(
    cls: type, kernels_on: bool, swap_on_conversion: None
) -> None:
    # With swapping on, .to() and load_state_dict swap each Parameter's contents
    # (torch.utils.swap_tensors), which a weak reference to the Parameter forbids.
    torch.manual_seed(27)
    x = torch.randn(2, 4, 5, 5, dtype=D)
    m = _wide(cls).eval()
    weight = m.weight

    def evaluate() -> Tensor:
        with torch.no_grad():
            out: Tensor = m(x.to(m.weight.dtype))
        return out

    def expected() -> Tensor:
        with torch.no_grad():
            out: Tensor = m.bake()(x.to(m.weight.dtype))
        return out

    evaluate()
    old = StorageWeakRef(m.weight.untyped_storage())
    m.to(D)
    assert old.expired()  # the entry was dropped, not left holding the float32 weight
    assert m.weight is weight and m.weight.dtype == D  # swapped, not re-bound
    assert torch.equal(evaluate(), expected())
    m.float()
    evaluate()
    m.double()
    assert m.weight is weight and m.weight.dtype == D
    assert torch.equal(evaluate(), expected())
    for assign in (False, True):
        other = _wide(cls).to(D).eval()
        evaluate()
        m.load_state_dict(other.state_dict(), assign=assign)
        with torch.no_grad():
            assert torch.equal(evaluate(), other(x))
    evaluate()
    new = torch.randn_like(m.weight)
    torch.utils.swap_tensors(m.weight, nn.Parameter(new))
    assert torch.equal(m.weight, new)
    assert torch.equal(evaluate(), expected())
    nn.utils.parametrize.register_parametrization(m, "weight", _Scaled())
    assert torch.equal(evaluate(), expected())
    torch.testing.assert_close(m.weight, new)


# --- bake ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ws", "plain_type", "x_shape"),
    [
        (
            lambda: WSConv1d(4, 6, 3, groups=2, padding_mode="circular", padding=1),
            nn.Conv1d,
            (2, 4, 9),
        ),
        (
            lambda: WSConv2d(4, 6, 3, groups=2, padding_mode="reflect", padding=1),
            nn.Conv2d,
            (2, 4, 7, 7),
        ),
        (lambda: WSConv3d(4, 6, 3, bias=False, stride=2), nn.Conv3d, (2, 4, 5, 5, 5)),
        (lambda: WSLinear(5, 3, preset="official"), nn.Linear, (2, 5)),
        (lambda: ScaledWSConv2d(4, 6, 3, padding="same", gamma=1.7), nn.Conv2d, (2, 4, 7, 7)),
    ],
)
def test_bake_returns_plain_layer_equal_in_eval(
    ws: Callable[[], Any], plain_type: type, x_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(14)
    m = ws().to(D).eval()
    if isinstance(m, ScaledWSConv2d):
        with torch.no_grad():
            m.gain.uniform_(0.5, 2.0)
    baked = m.bake()
    assert type(baked) is plain_type
    assert not baked.training
    assert baked.weight is not m.weight
    assert baked.weight.dtype == D
    assert set(baked.state_dict()) == {"weight", "bias"} & set(m.state_dict())
    x = torch.randn(*x_shape, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), m(x), rtol=1e-12, atol=1e-12)
    assert m.train().bake().training


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: WSConv1d(2, 3, 3, groups=1, padding=1),
        lambda: WSConv2d(2, 4, 2, groups=2),
        lambda: WSConv2d(2, 3, 2, preset="official"),
        lambda: WSConv3d(2, 2, 2),
        lambda: WSLinear(4, 3),
        lambda: ScaledWSConv2d(2, 3, 2, gamma=1.5),
    ],
)
def test_gradcheck_float64(make: Callable[[], Any]) -> None:
    torch.manual_seed(15)
    m = make().to(D)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    if isinstance(m, WSLinear):
        x = torch.randn(2, 4, dtype=D, requires_grad=True)
    else:
        spatial = {WSConv1d: 1, WSConv3d: 3}.get(type(m), 2)
        x = torch.randn(2, 2, *([3] * spatial), dtype=D, requires_grad=True)

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


# --- ScaledWSConv2d -----------------------------------------------------------------------------


def test_scaled_ws_formula_gain_and_gamma() -> None:
    torch.manual_seed(16)
    m = ScaledWSConv2d(4, 6, 3, groups=2, dtype=D)
    assert m.gain.shape == (6, 1, 1, 1)
    assert torch.equal(m.gain, torch.ones(6, 1, 1, 1, dtype=D))
    fan_in = 2 * 3 * 3
    torch.testing.assert_close(m.standardized_weight(), ref_paper(m.weight) / math.sqrt(fan_in))
    m2 = ScaledWSConv2d(4, 6, 3, groups=2, dtype=D, gamma=1.7, eps=1e-3)
    g = torch.rand(6, 1, 1, 1, dtype=D) + 0.5
    with torch.no_grad():
        m2.weight.copy_(m.weight)
        m2.gain.copy_(g)
    expected = 1.7 * g * ref_paper(m.weight, 1e-3) / math.sqrt(fan_in)
    torch.testing.assert_close(m2.standardized_weight(), expected)
    assert set(m2.state_dict()) == {"weight", "bias", "gain"}


def test_scaled_ws_cache_watches_gain_and_gain_learns() -> None:
    torch.manual_seed(17)
    m = ScaledWSConv2d(3, 4, 3, dtype=D).eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    with torch.no_grad():
        y = m(x)
        m.gain.mul_(2.0)
        torch.testing.assert_close(
            m(x) - m.bias.reshape(1, -1, 1, 1), 2 * (y - m.bias.reshape(1, -1, 1, 1))
        )
        # gamma is part of the cached weight too.
        m.gamma = 1.7
        torch.testing.assert_close(
            m(x) - m.bias.reshape(1, -1, 1, 1), 3.4 * (y - m.bias.reshape(1, -1, 1, 1))
        )
        m.gamma = 1.0
        # A new gain Parameter (same shape, possibly the old storage's address once freed).
        m.gain = nn.Parameter(torch.full_like(m.gain, 0.25))
        torch.testing.assert_close(
            m(x) - m.bias.reshape(1, -1, 1, 1), 0.25 * (y - m.bias.reshape(1, -1, 1, 1))
        )
    m.train()
    m(x).square().sum().backward()
    assert m.gain.grad is not None and m.gain.grad.abs().max() > 0


# --- weight_standardize_ ------------------------------------------------------------------------


class MyConv(nn.Conv2d):
    """A conv subclass whose forward the converter must not discard."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(self.shared, nn.ReLU(), nn.Sequential(self.shared, nn.Tanh()))
        self.custom = MyConv(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.custom(self.body(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))


def manual_net(net: Net, x: Tensor, ws_linear: bool) -> Tensor:
    def conv(m: nn.Conv2d, h: Tensor) -> Tensor:
        return F.conv2d(h, ref_paper(m.weight), m.bias, padding=1)

    h = conv(net.stem, x)
    h = torch.tanh(conv(net.shared, torch.relu(conv(net.shared, h))))
    h = F.conv2d(h, net.custom.weight, net.custom.bias) * 2.0  # raw weight: left alone
    fc_w = ref_paper(net.fc.weight) if ws_linear else net.fc.weight
    return F.linear(h.mean(dim=(2, 3)), fc_w, net.fc.bias)


def test_weight_standardize_converts_right_modules_and_keeps_parameters() -> None:
    torch.manual_seed(18)
    net = Net().to(D)
    net.stem.eval()
    net.shared.weight.requires_grad_(False)
    params = {n: p for n, p in net.named_parameters(remove_duplicate=False)}
    x = torch.randn(2, 3, 6, 6, dtype=D)

    out = weight_standardize_(net)
    assert out is net
    assert type(net.stem) is WSConv2d and type(net.shared) is WSConv2d
    assert net.body[0] is net.shared and net.body[2][0] is net.shared  # one shared object
    assert type(net.custom) is MyConv
    assert type(net.fc) is nn.Linear
    assert not net.stem.training and net.shared.training
    assert not net.shared.weight.requires_grad
    for n, p in net.named_parameters(remove_duplicate=False):
        assert p is params[n], n
    torch.testing.assert_close(net(x), manual_net(net, x, ws_linear=False))

    again = weight_standardize_(net, include_linear=True)  # idempotent on convs; adds the Linear
    assert again is net and type(net.fc) is WSLinear and net.fc.weight is params["fc.weight"]
    assert net.body[0] is net.shared
    torch.testing.assert_close(net(x), manual_net(net, x, ws_linear=True))


def test_weight_standardize_keeps_optimizer_references_working() -> None:
    torch.manual_seed(19)
    net = Net().to(D)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    weight_standardize_(net, include_linear=True)
    before = net.stem.weight.detach().clone()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    net(x).square().sum().backward()
    opt.step()
    assert not torch.equal(net.stem.weight, before)


def test_weight_standardize_exclude_and_root_conv() -> None:
    net = Net()
    weight_standardize_(net, exclude={"body"})
    assert type(net.stem) is WSConv2d
    assert type(net.shared) is nn.Conv2d  # excluded under one of its names: left alone

    net2 = Net()
    seen: list[str] = []

    def skip_stem(name: str, module: nn.Module) -> bool:
        seen.append(name)
        return name == "stem"

    weight_standardize_(net2, exclude=skip_stem, preset="official")
    assert type(net2.stem) is nn.Conv2d and type(net2.shared) is WSConv2d
    assert net2.shared.preset == "official" and net2.shared.unbiased
    assert {"shared", "body.0", "body.2.0"} <= set(seen)

    conv = nn.Conv3d(2, 3, 1, dtype=D)
    new = weight_standardize_(conv)
    assert type(new) is WSConv3d and new.weight is conv.weight and new.bias is conv.bias
    assert new.weight.dtype == D

    with pytest.raises(ValueError, match=r"weight_standardize_: expected exclude to name .*'nope'"):
        weight_standardize_(Net(), exclude={"nope"})
    with pytest.raises(TypeError, match="collection of names"):
        weight_standardize_(Net(), exclude="stem")


def test_weight_standardize_skips_hook_reparametrized_conv() -> None:
    conv = nn.utils.spectral_norm(nn.Conv2d(2, 3, 3))
    model = nn.Sequential(conv)
    weight_standardize_(model)
    assert model[0] is conv


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [WSConv1d, WSConv2d, WSConv3d])
def test_unknown_preset_names_layer_and_known_presets(cls: type) -> None:
    with pytest.raises(ValueError, match=rf"{cls.__name__}: .*'paper', 'official'.*'ours'"):
        cls(2, 2, 1, preset="ours")


def test_bad_arguments_are_refused_with_messages() -> None:
    with pytest.raises(ValueError, match="WSLinear: expected preset"):
        WSLinear(2, 2, preset="timm")
    with pytest.raises(ValueError, match=r"WSConv2d: expected eps > 0, got 0"):
        WSConv2d(2, 2, 1, eps=0.0)
    with pytest.raises(ValueError, match=r"WSConv2d: expected eps > 0, got -1"):
        WSConv2d(2, 2, 1, eps=-1e-5)
    with pytest.raises(ValueError, match=r"WSConv2d: expected eps > 0, got nan"):
        WSConv2d(2, 2, 1, eps=float("nan"))
    with pytest.raises(TypeError, match=r"WSConv2d: expected unbiased to be a bool"):
        WSConv2d(2, 2, 1, unbiased=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"WSConv2d: expected eps_mode.*'sqrt'.*got 'inside'"):
        WSConv2d(2, 2, 1, eps_mode="inside")
    with pytest.raises(ValueError, match=r"WSLinear: expected a fan-in of at least 2"):
        WSLinear(1, 3, preset="official")
    with pytest.raises(ValueError, match=r"ScaledWSConv2d: expected eps > 0"):
        ScaledWSConv2d(2, 2, 1, eps=0)
    with pytest.raises(ValueError, match=r"weight_standardize_: expected preset.*got 'x'"):
        weight_standardize_(nn.Conv2d(2, 2, 1), preset="x")
    with pytest.raises(ValueError, match=r"weight_standardize_: expected eps > 0"):
        weight_standardize_(nn.Conv2d(2, 2, 1), eps=0)


def test_functional_weight_standardize_of_empty_weights() -> None:
    # No filters: an empty result with the weight's shape and dtype (and a graph to it).
    w = torch.empty(0, 3, 3, 3, dtype=D, requires_grad=True)
    out = normkit.functional.weight_standardize(w)
    assert out.shape == w.shape and out.dtype == D and out.requires_grad
    # Filters without values have no statistics: a named error, not an IndexError.
    for shape in [(4, 0, 3, 3), (4, 3, 0)]:
        with pytest.raises(ValueError, match=r"weight_standardize: expected filters .* got a"):
            normkit.functional.weight_standardize(torch.empty(shape))
    with pytest.raises(ValueError, match=r"weight_standardize: expected a weight with an output"):
        normkit.functional.weight_standardize(torch.tensor(1.0))


# --- low precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weight_statistics_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(20)
    m = WSConv2d(8, 4, 3, dtype=dtype)
    with torch.no_grad():
        # A large common offset: a half-precision mean/variance would lose the filter's shape.
        m.weight.add_(30.0)
    w32 = m.weight.detach().float()
    expected = ref_paper(w32).to(dtype)
    got = m.standardized_weight()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2 * 2.0**-7)
    y = m(torch.randn(1, 8, 5, 5, dtype=dtype))
    assert y.dtype == dtype


# --- torch.compile ------------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager_in_train_and_eval() -> None:
    torch.manual_seed(21)
    m = WSConv2d(3, 4, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))
    m.eval()
    with torch.no_grad():
        eager = m(x)
        torch.testing.assert_close(compiled(x), eager)
        m.weight.mul_(-1.0)
        torch.testing.assert_close(compiled(x), m(x))  # compiled path reads the live weight
    assert torch.allclose(m(x), -eager + 2 * m.bias.reshape(1, -1, 1, 1), atol=1e-5)


def test_eval_mode_under_vmap_of_functional_call_matches_loop() -> None:
    torch.manual_seed(23)
    m = WSConv2d(3, 4, 3, dtype=D).eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    weights = torch.randn(5, 4, 3, 3, 3, dtype=D)

    def run(w: Tensor) -> Tensor:
        return torch.func.functional_call(m, {"weight": w}, (x,))

    with torch.no_grad():
        batched = torch.func.vmap(run)(weights)
        looped = torch.stack([run(w) for w in weights])
    torch.testing.assert_close(batched, looped)
    torch.testing.assert_close(looped[1], F.conv2d(x, ref_paper(weights[1]), m.bias))


@pytest.mark.parametrize("cls", [normkit.WSConv2d, normkit.ScaledWSConv2d])
def test_empty_inputs_are_checked_before_the_convolution(cls: Any) -> None:
    """torch convolves an empty integer (or wrong-dtype) tensor without complaint, so the input
    checks that otherwise run only after a failure run first for empty inputs (found by the fuzz
    test); a non-empty bad input is refused with the same message after torch's failure."""
    conv = cls(1, 1, 1, bias=False)
    for x, fragment in [
        (torch.zeros(0, 1, 1, 1, dtype=torch.long), "floating-point input"),
        (torch.zeros(0, 1, 1, 1, dtype=torch.float64), "torch.float64"),
        (torch.zeros(2, 1, 1, 1, dtype=torch.long), "floating-point input"),
        (torch.zeros(2, 3, 4, 4), "expected 1 channels"),
    ]:
        with pytest.raises((TypeError, ValueError), match=f"^{cls.__name__}: ") as info:
            conv(x)
        assert fragment in str(info.value)
    assert conv(torch.zeros(0, 1, 3, 3)).shape == (0, 1, 3, 3)
