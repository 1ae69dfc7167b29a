"""IterNorm: the paper's identities, the formula reference, and the layer's own behaviour.

* Whitening: the output covariance of each group approaches the identity as T grows (on
  well-conditioned input), and the Newton iteration approaches the eigendecomposition's
  inverse square root.
* ``group_size=1`` is a batch norm in training (exactly: ``Σ_N = 1`` keeps ``P_k = 1``); in eval
  it applies its own running buffers.
* Eval uses the running mean and whitening matrices, batch independently.
* Everything against the float64 formula reference of ``tests/reference.py``: outputs, input and
  parameter gradients, running buffers, over training and eval steps.
* gradcheck and gradgradcheck in float64; no custom backward exists (autograd runs through the
  iterations).
* Running statistics: cumulative averages, non-finite groups, untracked layers, checkpoints
  (the official layout included), bad arguments.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from normkit.layers.iternorm import iterative_whitening_matrix
from tests.reference import RefIterNorm

F64 = torch.float64


def _mixed(shape: tuple[int, ...], seed: int = 0, spread: float = 0.3) -> Tensor:
    """float64 input whose channels are correlated (mixed by ``I + spread · noise``) and
    off-centre, so that whitening has something to undo."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    mix = torch.eye(c, dtype=F64) + spread * torch.randn(c, c, generator=g, dtype=F64)
    z = torch.randn(shape, generator=g, dtype=F64)
    return torch.einsum("ij,nj...->ni...", mix, z) + 2.0


def _randomized(layer: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _group_covariances(y: Tensor, group_size: int) -> Tensor:
    c = y.shape[1]
    yt = y.transpose(0, 1).reshape(c, -1)
    yc = yt - yt.mean(dim=1, keepdim=True)
    cov = yc @ yc.t() / yt.shape[1]
    return torch.stack(
        [cov[i : i + group_size, i : i + group_size] for i in range(0, c, group_size)]
    )


# --- the identities ---------------------------------------------------------------------------


def test_output_covariance_approaches_the_identity_as_t_grows() -> None:
    x = _mixed((64, 8, 3, 3))
    covs = _group_covariances(x, 4)
    eig = torch.linalg.eigvalsh(covs)
    assert (eig.max(dim=1).values / eig.min(dim=1).values).max() < 20  # well conditioned
    errors = []
    for t in range(1, 11):
        layer = nk.IterNorm2d(8, group_size=4, T=t, eps=1e-10, affine=False, dtype=F64)
        out = _group_covariances(layer(x).detach(), 4) - torch.eye(4, dtype=F64)
        errors.append(out.flatten(1).norm(dim=1).max().item())
    # The Newton iteration converges quadratically, down to the floor that ε and rounding set.
    assert all(b < a for a, b in itertools.pairwise(errors[:8])), errors
    assert errors[0] > 0.5, errors  # T = 1 is far from white: the decrease is not vacuous
    assert errors[-1] < 1e-8, errors


def test_newton_iteration_approaches_the_inverse_square_root() -> None:
    # Two SPD matrices with known spectra (condition numbers 5 and 8), rotated. (Past
    # convergence the iteration amplifies rounding that breaks its commutation with Σ, by about
    # (r + r² − 2) / 2 per step for an eigenvalue ratio r² above 2.4: T is kept where the
    # iteration still converges, as the paper's T = 5 is.)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(2, 4, 4, generator=g, dtype=F64))
    spectra = torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.5, 1.0, 2.0, 4.0]], dtype=F64)
    sigma = q @ torch.diag_embed(spectra) @ q.transpose(1, 2)
    exact = q @ torch.diag_embed(spectra.rsqrt()) @ q.transpose(1, 2)
    errors = [
        (iterative_whitening_matrix(sigma, t) - exact).abs().max().item() for t in (1, 3, 6, 10)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12, errors


@pytest.mark.parametrize(
    ("cls", "shape", "bn"),
    [
        pytest.param(nk.IterNorm2d, (6, 3, 4, 4), nn.BatchNorm2d, id="2d"),
        pytest.param(nk.IterNorm1d, (9, 3), nn.BatchNorm1d, id="1d-flat"),
        pytest.param(nk.IterNorm1d, (5, 3, 4), nn.BatchNorm1d, id="1d"),
    ],
)
def test_group_size_one_is_batch_norm_in_training(
    cls: type[nn.Module], shape: tuple[int, ...], bn: type[nn.Module]
) -> None:
    layer = _randomized(cls(3, group_size=1, dtype=F64))
    torch_bn = bn(3, dtype=F64)
    with torch.no_grad():
        torch_bn.weight.copy_(layer.weight)
        torch_bn.bias.copy_(layer.bias)
    eps = layer.eps
    want_wm = torch.ones(3, dtype=F64)
    for step in range(3):
        x = _mixed(shape, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(step), dtype=F64)
        out, want = layer(xa), torch_bn(xb)
        # Σ_N = 1 keeps P_k = 1 exactly: W = 1 / sqrt(σ² + ε), BN's normalization.
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        out.backward(upstream)
        want.backward(upstream)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, torch_bn.weight.grad, rtol=1e-10, atol=0)
        torch.testing.assert_close(layer.bias.grad, torch_bn.bias.grad, rtol=1e-10, atol=0)
        torch.testing.assert_close(layer.running_mean, torch_bn.running_mean, rtol=1e-12, atol=0)
        # The matrix average is of W itself (biased variance), not of the variance.
        dims = [0, *range(2, x.dim())]
        batch_w = torch.rsqrt(x.var(dim=dims, correction=0) + eps)
        want_wm = 0.9 * want_wm + 0.1 * batch_w
        torch.testing.assert_close(layer.running_wm.reshape(3), want_wm, rtol=1e-12, atol=0)
    assert int(layer.num_batches_tracked) == int(torch_bn.num_batches_tracked) == 3


def test_group_size_one_eval_applies_its_running_buffers() -> None:
    layer = _randomized(nk.IterNorm2d(3, group_size=1, dtype=F64))
    for step in range(3):
        layer(_mixed((6, 3, 2, 2), seed=step))
    layer.eval()
    x = _mixed((4, 3, 2, 2), seed=9)
    view = (1, 3, 1, 1)
    wm, mean = layer.running_wm.reshape(view), layer.running_mean.reshape(view)
    want = layer.weight.reshape(view) * wm * (x - mean) + layer.bias.reshape(view)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    # Not BN's eval rule: the average of 1/sqrt(σ² + ε) is not 1/sqrt of the averaged variance.
    assert not torch.allclose(wm.reshape(3), torch.ones(3, dtype=F64), atol=1e-3)


def test_eval_uses_the_running_mean_and_matrices_batch_independently() -> None:
    layer = _randomized(nk.IterNorm2d(4, group_size=2, dtype=F64))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(4, generator=g, dtype=F64))
        layer.running_wm.copy_(torch.randn(2, 2, 2, generator=g, dtype=F64))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    x = _mixed((5, 4, 3, 3))
    out = layer(x)
    xc = x - layer.running_mean.reshape(1, 4, 1, 1)
    groups = [torch.einsum("ij,nj...->ni...", layer.running_wm[k], xc[:, 2 * k : 2 * k + 2])
              for k in range(2)]  # fmt: skip
    white = torch.cat(groups, dim=1)
    want = layer.weight.reshape(1, 4, 1, 1) * white + layer.bias.reshape(1, 4, 1, 1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for i in range(5):  # each sample alone gets its output in the batch
        torch.testing.assert_close(layer(x[i : i + 1]), out[i : i + 1], rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


# --- the formula reference ----------------------------------------------------------------------

REFERENCE_CASES: dict[str, tuple[type[nn.Module], tuple[int, ...], dict[str, Any]]] = {
    "2d-two-groups": (nk.IterNorm2d, (6, 4, 3, 3), {"group_size": 2}),
    "2d-one-group-T3": (nk.IterNorm2d, (5, 4, 2, 3), {"group_size": 4, "T": 3}),
    "1d-flat-cumulative": (nk.IterNorm1d, (8, 4), {"group_size": 2, "momentum": None}),
    "1d-no-affine": (nk.IterNorm1d, (4, 4, 5), {"group_size": 4, "affine": False}),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_layer_matches_the_formula_reference(case: str) -> None:
    cls, shape, kwargs = REFERENCE_CASES[case]
    layer = _randomized(cls(4, dtype=F64, **kwargs))
    ref = RefIterNorm(
        4,
        layer.group_size,
        T=layer.T,
        eps=layer.eps,
        momentum=layer.momentum,
    )
    ref_params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    weight, bias = ref_params if ref_params else (None, None)
    for step, training in enumerate((True, True, False, True)):
        layer.train(training)
        x = _mixed(shape, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=F64)
        out = layer(xa)
        want = ref(xb, training=training, weight=weight, bias=bias)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, msg=f"step {step}")
        out.backward(upstream)
        want.backward(upstream)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-10)
        for p, q in zip(layer.parameters(), ref_params, strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_wm, ref.running_wm, rtol=1e-10, atol=1e-12)
    assert int(layer.num_batches_tracked) == ref.tracked == 3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("cls", "shape", "group_size"),
    [
        pytest.param(nk.IterNorm2d, (3, 4, 2, 2), 2, id="2d"),
        pytest.param(nk.IterNorm1d, (6, 3), 3, id="1d-flat"),
    ],
)
def test_gradcheck_and_gradgradcheck_in_float64(
    cls: type[nn.Module], shape: tuple[int, ...], group_size: int, training: bool
) -> None:
    layer = _randomized(cls(shape[1], group_size=group_size, T=4, dtype=F64)).train(training)
    if not training:
        with torch.no_grad():
            layer.running_mean.normal_()
            layer.running_wm.normal_()
    buffers = {k: b.clone() for k, b in layer.named_buffers()}
    x = _mixed(shape).requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def fn(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        state = {"weight": weight, "bias": bias, **{k: b.clone() for k, b in buffers.items()}}
        out: Tensor = torch.func.functional_call(layer, state, (x,))
        return out

    assert gradcheck(fn, (x, *params))
    assert gradgradcheck(fn, (x, *params))


# --- running statistics and state ---------------------------------------------------------------


def test_cumulative_average_with_momentum_none() -> None:
    layer = nk.IterNorm2d(4, group_size=2, momentum=None, dtype=F64)
    probe = nk.IterNorm2d(4, group_size=2, momentum=1.0, dtype=F64)  # holds each batch's W
    wms, means = [], []
    for step in range(3):
        x = _mixed((5, 4, 2, 2), seed=step)
        layer(x)
        probe(x)
        wms.append(probe.running_wm.clone())
        means.append(probe.running_mean.clone())
    torch.testing.assert_close(layer.running_wm, torch.stack(wms).mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=0)
    assert int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_group_with_a_non_finite_statistic_keeps_its_running_values(bad: float) -> None:
    layer = nk.IterNorm2d(4, group_size=2)
    layer(torch.randn(4, 4, 3, 3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 4, 3, 3)
    x[1, 3, 0, 0] = bad  # channel 3: the second group
    out = layer(x)
    assert torch.equal(layer.running_mean[2:], before["running_mean"][2:])
    assert torch.equal(layer.running_wm[1], before["running_wm"][1])
    assert not torch.equal(layer.running_mean[:2], before["running_mean"][:2])  # still updated
    assert not torch.equal(layer.running_wm[0], before["running_wm"][0])
    assert int(layer.num_batches_tracked) == 2
    assert torch.isfinite(out[:, :2]).all() and not torch.isfinite(out[:, 2:]).all()


def test_untracked_layer_uses_batch_statistics_in_eval() -> None:
    layer = _randomized(nk.IterNorm2d(4, group_size=2, track_running_stats=False, dtype=F64))
    assert layer.running_mean is None and layer.running_wm is None
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = _mixed((5, 4, 2, 2))
    train_out = layer(x)
    torch.testing.assert_close(layer.eval()(x), train_out, rtol=0, atol=0)


def test_state_dict_round_trip_keeps_every_buffer() -> None:
    layer = _randomized(nk.IterNorm2d(4, group_size=2, momentum=None))
    for step in range(2):
        layer(_mixed((5, 4, 2, 2), seed=step).float())
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_wm", "num_batches_tracked"}
    assert state["running_wm"].shape == (2, 2, 2) and state["running_mean"].shape == (4,)
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "num_batches_tracked")
    fresh = nk.IterNorm2d(4, group_size=2, momentum=None)
    fresh.load_state_dict(state, strict=True)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = _mixed((3, 4, 2, 2), seed=7).float()
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)
    # The cumulative average goes on from the loaded count.
    fresh.train()(x)
    layer.train()(x)
    torch.testing.assert_close(fresh.running_wm, layer.running_wm, rtol=0, atol=0)


def test_official_checkpoint_layout_loads_reshaped() -> None:
    g, d = 2, 2
    g_ = torch.Generator().manual_seed(0)
    official = {
        "weight": torch.randn(1, 4, 1, 1, generator=g_),
        "bias": torch.randn(1, 4, 1, 1, generator=g_),
        "running_mean": torch.randn(g, d, 1, generator=g_),
        "running_wm": torch.randn(g, d, d, generator=g_),
    }
    layer = nk.IterNorm2d(4, group_size=d)
    result = layer.load_state_dict(dict(official), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, official["weight"].reshape(4))
    assert torch.equal(layer.running_mean, official["running_mean"].reshape(4))
    assert torch.equal(layer.running_wm, official["running_wm"])
    assert int(layer.num_batches_tracked) == 0
    # The official forward in eval: W (x − μ) per group, then γ x + β.
    x = torch.randn(3, 4, 2, 2, generator=g_)
    xg = x.transpose(0, 1).reshape(g, d, -1)
    white = official["running_wm"] @ (xg - official["running_mean"])
    want = white.reshape(4, 3, 2, 2).transpose(0, 1) * official["weight"] + official["bias"]
    torch.testing.assert_close(layer.eval()(x), want)


def test_default_group_size_is_the_official_fallback_from_64() -> None:
    for c, d in [(128, 64), (64, 64), (96, 32), (48, 16), (6, 2), (3, 1)]:
        layer = nk.IterNorm2d(c)
        assert (layer.group_size, layer.num_groups) == (d, c // d), c
        assert layer.running_wm.shape == (c // d, d, d)
        assert torch.equal(layer.running_wm, torch.eye(d).expand(c // d, d, d))
    assert "group_size=16, T=5" in repr(nk.IterNorm1d(48))


def test_convert_sync_marks_iternorm_and_revert_sync_unmarks_it() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nk.IterNorm2d(4, group_size=2))
    reference = copy.deepcopy(model)
    nk.convert_sync(model)
    assert model[1].sync and "sync=True" in repr(model[1])
    x = torch.randn(4, 3, 2, 2)
    # Without a process group of several ranks, nothing changes.
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    nk.revert_sync(model)
    assert not model[1].sync


def test_registry_names() -> None:
    assert type(nk.create_norm("iternorm", 8, group_size=4)) is nk.IterNorm2d
    assert type(nk.create_norm("IterNorm-1d", 8, T=3)) is nk.IterNorm1d
    assert type(nk.create_norm("iternorm2d", 8)) is nk.IterNorm2d
    layer = nk.get_norm_layer("iternorm", group_size=2)(4)
    assert layer.num_groups == 2


# --- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"group_size": 3}, ValueError, "divide num_features=4, got group_size=3"),
        ({"group_size": 0}, ValueError, "expected group_size >= 1, got 0"),
        ({"group_size": 2.0}, TypeError, "expected group_size to be an int, got 2.0"),
        ({"group_size": True}, TypeError, "expected group_size to be an int, got True"),
        ({"T": 0}, ValueError, "expected T >= 1, got 0"),
        ({"T": 2.5}, TypeError, "expected T to be an int, got 2.5"),
        ({"eps": 0.0}, ValueError, "expected eps > 0, got 0.0"),
        ({"momentum": 1.5}, ValueError, "expected momentum in [0, 1] or None, got 1.5"),
        ({"affine": "no"}, TypeError, "expected affine to be a bool, got 'no'"),
        ({"dtype": torch.int64}, TypeError, "floating-point torch.dtype or None, got torch.int64"),
    ],
)  # fmt: skip
def test_bad_constructor_arguments_are_refused(
    kwargs: dict[str, Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        nk.IterNorm2d(4, **kwargs)
    assert str(info.value).startswith("IterNorm2d: ") and fragment in str(info.value)


@pytest.mark.parametrize(
    ("x", "exc", "fragment"),
    [
        (torch.randn(1, 4, 1, 1), ValueError, "more than 1 value per channel when training"),
        (torch.randn(2, 3, 2, 2), ValueError, "expected 4 channels (dim 1), got 3"),
        (torch.randn(2, 4, 2), ValueError, "expected 4D input (N, C, ...), got 3D input"),
        (torch.ones(2, 4, 2, 2, dtype=torch.long), TypeError, "floating-point input"),
    ],
)
def test_bad_input_is_refused_before_any_buffer_changes(
    x: Tensor, exc: type[Exception], fragment: str
) -> None:
    layer = nk.IterNorm2d(4, group_size=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(exc, match=r"^IterNorm2d: ") as info:
        layer(x)
    assert fragment in str(info.value)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_eval_without_running_statistics_refuses_one_value_per_channel() -> None:
    # Eval without running statistics whitens with the batch's, as training does: one value
    # per channel has no covariance (the output would be the bias alone).
    layer = nk.IterNorm2d(4, group_size=2, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1))
    assert layer(torch.randn(2, 4, 1, 1)).shape == (2, 4, 1, 1)
