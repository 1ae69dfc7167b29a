"""EvoNorm-B0 and EvoNorm-S0 against the literal references and the paper's identities."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from tests.reference import RefEvoNormB0, ref_evonorm_s0

F64 = torch.float64
C = 4
SHAPE = (5, C, 3, 3)


def _randomize(layer: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _x(shape: tuple[int, ...] = SHAPE, seed: int = 1, scale: float = 2.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale + 0.5


def _cotangent(shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=F64)


def _params(layer: Any) -> dict[str, Tensor | None]:
    return {"v": layer.v, "weight": layer.weight, "bias": layer.bias}


def _assert_same_step(layer: nn.Module, call_ref: Any, x: Tensor) -> None:
    """One forward and backward of ``layer`` and of the reference (a function of the input and
    of a copy of the parameters): equal outputs, input and parameter gradients."""
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    out = layer(xa)
    want = call_ref(xb, ref_params)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = _cotangent(x.shape)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    for name, p in layer.named_parameters():
        assert p.grad is not None and ref_params[name].grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-10, atol=1e-12, msg=name)
        p.grad = None


def _b0_distance_to_kink(layer: Any, x: Tensor) -> Tensor:
    """Smallest |left − right| of B0's max over the input (in the layer's current mode)."""
    with torch.no_grad():
        if layer.training or layer.running_var is None:
            var = x.var(dim=(0, 2, 3), unbiased=False)
        else:
            var = layer.running_var
        left = torch.sqrt(var + layer.eps).reshape(1, -1, 1, 1)
        inst = torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + layer.eps)
        right = layer.v.reshape(1, -1, 1, 1) * x + inst
        return (left - right).abs().min()


# --- EvoNorm-B0: the formula and the running variance ---------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_b0_matches_the_literal_reference_over_train_and_eval_steps(
    momentum: float | None, affine: bool
) -> None:
    layer = nk.EvoNormB0(C, momentum=momentum, affine=affine, dtype=F64)
    _randomize(layer)
    ref = RefEvoNormB0(C, momentum=momentum)
    for step in range(3):
        x = _x(seed=step, scale=1.0 + step) + step
        for training in (True, False):
            layer.train(training)

            def call(xr: Tensor, p: dict[str, Tensor], training: bool = training) -> Tensor:
                return ref(xr, training=training, v=p["v"], weight=p.get("weight"),
                           bias=p.get("bias"))  # fmt: skip

            _assert_same_step(layer, call, x)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 3


def test_b0_running_variance_is_the_unbiased_batch_variance_averaged_with_momentum() -> None:
    layer = nk.EvoNormB0(C, momentum=0.25, dtype=F64)
    x = _x()
    layer(x)
    unbiased = x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(layer.running_var, 0.75 * torch.ones(C, dtype=F64) + 0.25 * unbiased)
    assert int(layer.num_batches_tracked) == 1
    assert layer.running_var.dtype == F64
    float32 = nk.EvoNormB0(C)
    float32(x.half())
    assert float32.running_var.dtype == torch.float32


def test_b0_in_eval_uses_the_running_variance_and_not_the_batch() -> None:
    layer = nk.EvoNormB0(C, dtype=F64)
    _randomize(layer)
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 4.0, 9.0], dtype=F64))
    layer.eval()
    x = _x()
    out = layer(x)
    # The training formula with the batch variance replaced by running_var.
    ref = RefEvoNormB0(C)
    ref.running_var = layer.running_var.clone()
    want = ref(x, training=False, **_params(layer))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # Not the batch's: a sample's output is the same in any batch, and the buffers stay.
    before = copy.deepcopy(layer.state_dict())
    for i in range(SHAPE[0]):
        torch.testing.assert_close(layer(x[i : i + 1]), out[i : i + 1], rtol=0, atol=0)
    other = _x(seed=5, scale=20.0)
    other[0] = x[0]
    torch.testing.assert_close(layer(other)[0], out[0], rtol=0, atol=0)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    # And the running variance matters: another one gives another output.
    with torch.no_grad():
        layer.running_var.mul_(3.0)
    assert not torch.allclose(layer(x), out)
    # In training the same input normalizes with its own batch variance instead.
    assert not torch.allclose(layer.train()(x), out)


def test_b0_without_running_statistics_uses_the_batch_in_eval_too() -> None:
    layer = nk.EvoNormB0(C, track_running_stats=False, dtype=F64)
    _randomize(layer)
    assert layer.running_var is None and layer.num_batches_tracked is None
    assert set(layer.state_dict()) == {"weight", "bias", "v"}
    x = _x()
    ref = RefEvoNormB0(C)
    want = ref(x, training=True, **_params(layer))
    torch.testing.assert_close(layer.eval()(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.train()(x), want, rtol=1e-12, atol=1e-12)


def test_b0_refuses_one_value_per_channel_in_training_and_accepts_it_in_eval() -> None:
    layer = nk.EvoNormB0(C)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"^EvoNormB0: expected more than 1 value per channel"):
        layer(torch.randn(1, C, 1, 1))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    out = layer.eval()(torch.randn(1, C, 1, 1))
    assert bool(torch.isfinite(out).all())
    layer.train()(torch.randn(1, C, 2, 1))  # two values per channel: a batch of one is fine


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_b0_non_finite_channel_keeps_its_running_variance(bad: float) -> None:
    layer = nk.EvoNormB0(C)
    layer(torch.randn(4, C, 3, 3))
    before = layer.running_var.clone()
    x = torch.randn(4, C, 3, 3)
    x[1, 2, 0, 0] = bad
    out = layer(x)
    assert torch.equal(layer.running_var[2], before[2])
    others = [0, 1, 3]
    assert not torch.equal(layer.running_var[others], before[others])
    assert bool(torch.isfinite(layer.running_var).all())
    assert bool(torch.isfinite(out[:, others]).all())


def test_b0_half_precision_variances_are_float32() -> None:
    # 300² overflows float16: float16 variances would be inf and the output 0 or NaN.
    layer = nk.EvoNormB0(C)
    x = torch.randn(2, C, 3, 3, generator=torch.Generator().manual_seed(0)) * 300
    out = layer(x.half())
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    reference = nk.EvoNormB0(C)
    want = reference(x.half().float())
    torch.testing.assert_close(out, want.half())
    torch.testing.assert_close(layer.running_var, reference.running_var)


# --- EvoNorm-B0: checkpoints, sync, gradients -----------------------------------------------------


def test_b0_state_dict_round_trip_of_every_buffer() -> None:
    layer = nk.EvoNormB0(C, dtype=F64)
    _randomize(layer)
    for seed in range(3):
        layer(_x(seed=seed))
    state = layer.state_dict()
    assert list(state) == ["weight", "bias", "v", "running_var", "num_batches_tracked"]
    fresh = nk.EvoNormB0(C, dtype=F64)
    fresh.load_state_dict(state, strict=True)
    assert int(fresh.num_batches_tracked) == 3
    assert torch.equal(fresh.running_var, layer.running_var)
    x = _x(seed=9)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))


def test_b0_loads_a_timm_checkpoint_without_the_batch_count() -> None:
    # timm's EvoNorm2dB0 saves weight, bias, v and running_var, as nn.Module version 1.
    source = nk.EvoNormB0(C, eps=1e-3, dtype=F64)
    _randomize(source)
    source(_x())
    timm_state: Any = OrderedDict(
        (k, v) for k, v in source.state_dict().items() if k != "num_batches_tracked"
    )
    timm_state._metadata = OrderedDict({"": {"version": 1}})
    fresh = nk.EvoNormB0(C, eps=1e-3, dtype=F64)
    fresh.load_state_dict(timm_state, strict=True)
    assert int(fresh.num_batches_tracked) == 0  # its own count
    x = _x(seed=3)
    assert torch.equal(fresh.eval()(x), source.eval()(x))
    # A current checkpoint that lost the count is damaged, not migrated.
    timm_state._metadata[""]["version"] = 2
    with pytest.raises(RuntimeError, match=r"Missing key.*num_batches_tracked"):
        nk.EvoNormB0(C, dtype=F64).load_state_dict(timm_state, strict=True)
    # Nested, as in a model.
    model = nn.Sequential(nn.Identity(), nk.EvoNormB0(C, dtype=F64))
    nested: Any = OrderedDict((f"1.{k}", v) for k, v in timm_state.items())
    nested._metadata = OrderedDict({"1": {"version": 1}})
    model.load_state_dict(nested, strict=True)


def test_b0_convert_sync_switches_it_and_changes_nothing_on_one_process() -> None:
    model = nn.Sequential(nn.Conv2d(3, C, 1), nk.EvoNormB0(C))
    reference = copy.deepcopy(model)
    converted = nk.convert_sync(model)
    assert converted is model and model[1].sync and "sync=True" in repr(model[1])
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(x), reference(x), rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=0, atol=0)
    nk.revert_sync(model)
    assert not model[1].sync and model[1].process_group is None


def test_freeze_norm_freezes_b0_to_its_eval_mode() -> None:
    # B0 is not a _BatchNorm, but it has batch statistics (its running variance): freeze_norm
    # freezes it to its eval mode, as it does a batch norm (convert_norm leaves it alone).
    model = nn.Sequential(nn.Conv2d(C, C, 1), nk.EvoNormB0(C)).to(F64)
    nk.freeze_norm(model)
    assert isinstance(model[1], nk.EvoNormB0) and type(model[1]) is not nk.EvoNormB0
    before = model[1].running_var.clone()
    model.train()
    x = _x((3, C, 2, 2))
    out = model(x)
    assert torch.equal(model[1].running_var, before)
    torch.testing.assert_close(model(x[:1]), out[:1])  # no batch statistics


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_b0_gradcheck_and_gradgradcheck(training: bool, affine: bool) -> None:
    layer = nk.EvoNormB0(C, affine=affine, dtype=F64)
    _randomize(layer)
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 4.0, 9.0], dtype=F64))
    layer.train(training)
    x = _x((3, C, 2, 2)).requires_grad_()
    assert _b0_distance_to_kink(layer, x) > 1e-4
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    buffers = {n: b.clone() for n, b in layer.named_buffers()}

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        values = {**dict(zip(names, ps, strict=True)), **{n: b.clone() for n, b in buffers.items()}}
        out: Tensor = torch.func.functional_call(layer, values, (x,))
        return out

    assert gradcheck(fn, (x, *params))
    # Second derivatives through a random projection (u^T H v), to keep the suite fast.
    assert gradgradcheck(fn, (x, *params), fast_mode=True)


def test_b0_takes_both_branches_of_the_max() -> None:
    # With v = 1 the per-sample branch v·x + s_inst wins where x is large and positive, the batch
    # standard deviation elsewhere: y is x / s_batch on one side and nearly 1 on the other.
    layer = nk.EvoNormB0(C, affine=False, dtype=F64)
    x = _x((4, C, 4, 4))
    out = layer(x)
    batch_std = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + layer.eps).reshape(1, C, 1, 1)
    inst = torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + layer.eps)
    batch_side = batch_std >= x + inst
    assert bool(batch_side.any()) and bool((~batch_side).any())
    torch.testing.assert_close(out[batch_side], (x / batch_std)[batch_side])
    torch.testing.assert_close(out[~batch_side], (x / (x + inst))[~batch_side])


# --- EvoNorm-S0 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, C])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_s0_matches_the_literal_reference(groups: int, affine: bool) -> None:
    layer = nk.EvoNormS0(C, num_groups=groups, affine=affine, dtype=F64)
    _randomize(layer)

    def call(xr: Tensor, p: dict[str, Tensor]) -> Tensor:
        return ref_evonorm_s0(xr, groups, eps=layer.eps, v=p["v"], weight=p.get("weight"),
                              bias=p.get("bias"))  # fmt: skip

    for training in (True, False):
        layer.train(training)
        _assert_same_step(layer, call, _x())


def test_s0_with_v_zero_is_half_of_x_over_the_group_norm_std() -> None:
    # v = 0: sigmoid(0) = 1/2, so 2·S0(x) = x / σ_g, and x / σ_g − GN(x) = μ_g / σ_g, one value
    # per (sample, group); μ_g and σ_g from torch's own group norm statistics.
    groups, eps = 2, 1e-5
    layer = nk.EvoNormS0(C, eps=eps, num_groups=groups, affine=False, dtype=F64)
    with torch.no_grad():
        layer.v.zero_()
    x = _x()
    diff = 2 * layer(x) - TF.group_norm(x, groups, eps=eps)
    xg = x.reshape(SHAPE[0], groups, -1)
    want = xg.mean(dim=2) / torch.sqrt(xg.var(dim=2, unbiased=False) + eps)
    torch.testing.assert_close(diff.reshape(SHAPE[0], groups, -1), want.unsqueeze(2).expand_as(xg))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_s0_is_batch_independent_and_train_equals_eval(training: bool) -> None:
    layer = nk.EvoNormS0(C, num_groups=2, dtype=F64)
    _randomize(layer)
    layer.train(training)
    x = _x()
    out = layer(x)
    for i in range(SHAPE[0]):
        torch.testing.assert_close(layer(x[i : i + 1]), out[i : i + 1], rtol=0, atol=0)
    other = _x(seed=4, scale=30.0)
    other[2] = x[2]
    torch.testing.assert_close(layer(other)[2], out[2], rtol=0, atol=0)
    assert torch.equal(layer.train(not training)(x), out)
    assert not list(layer.buffers())


@pytest.mark.parametrize("groups", [1, 2, C])
def test_s0_gradcheck_and_gradgradcheck(groups: int) -> None:
    layer = nk.EvoNormS0(C, num_groups=groups, dtype=F64)
    _randomize(layer)
    x = _x((2, C, 2, 2)).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))
        return out

    assert gradcheck(fn, (x, *params))
    # Second derivatives through a random projection (u^T H v), to keep the suite fast.
    assert gradgradcheck(fn, (x, *params), fast_mode=True)


def test_s0_half_precision_variances_are_float32() -> None:
    layer = nk.EvoNormS0(C, num_groups=2)
    x = torch.randn(2, C, 3, 3, generator=torch.Generator().manual_seed(0)) * 300
    out = layer(x.half())
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, layer(x.half().float()).half())


def test_s0_state_dict_names_and_round_trip() -> None:
    layer = nk.EvoNormS0(C, num_groups=2, dtype=F64)
    _randomize(layer)
    assert list(layer.state_dict()) == ["weight", "bias", "v"]
    assert list(nk.EvoNormS0(C, affine=False, num_groups=2).state_dict()) == ["v"]
    fresh = nk.EvoNormS0(C, num_groups=2, dtype=F64)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = _x()
    assert torch.equal(fresh(x), layer(x))


# --- both: init, arguments, registry --------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: nk.EvoNormB0(C), lambda: nk.EvoNormS0(C, num_groups=2)], ids=["b0", "s0"]
)
def test_init_is_v_one_gamma_one_beta_zero_and_reset_restores_it(make: Any) -> None:
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5)
    for b in layer.buffers():
        b.add_(1)
    layer.reset_parameters()
    assert torch.equal(layer.v, torch.ones(C)) and torch.equal(layer.weight, torch.ones(C))
    assert torch.equal(layer.bias, torch.zeros(C))
    if isinstance(layer, nk.EvoNormB0):
        assert torch.equal(layer.running_var, torch.ones(C))
        assert int(layer.num_batches_tracked) == 0


def test_defaults_and_repr() -> None:
    b0, s0 = nk.EvoNormB0(64), nk.EvoNormS0(64)
    assert (b0.eps, b0.momentum, s0.eps, s0.num_groups) == (1e-5, 0.1, 1e-5, 32)
    assert repr(b0) == (
        "EvoNormB0(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    )
    assert repr(s0) == "EvoNormS0(64, num_groups=32, eps=1e-05, affine=True)"


@pytest.mark.parametrize(
    ("make", "exc", "fragment"),
    [
        (lambda: nk.EvoNormB0(0), ValueError, "EvoNormB0: expected num_features >= 1, got 0"),
        (lambda: nk.EvoNormB0(4, eps=0), ValueError, "EvoNormB0: expected eps > 0, got 0"),
        (lambda: nk.EvoNormB0(4, momentum=1.5), ValueError, "momentum in [0, 1] or None"),
        (lambda: nk.EvoNormB0(4, momentum="0.1"), TypeError, "momentum to be a float or None"),
        (
            lambda: nk.EvoNormB0(4, track_running_stats="yes"),
            TypeError,
            "EvoNormB0: expected track_running_stats to be a bool, got 'yes'",
        ),
        (lambda: nk.EvoNormB0(4, affine=None), TypeError, "affine to be a bool, got None"),
        (lambda: nk.EvoNormB0(4, dtype=torch.long), TypeError, "floating-point torch.dtype"),
        (
            lambda: nk.EvoNormS0(6, num_groups=4),
            ValueError,
            "EvoNormS0: expected num_groups to divide num_features=6, got num_groups=4",
        ),
        (lambda: nk.EvoNormS0(64, num_groups=0), ValueError, "num_groups >= 1, got 0"),
        (lambda: nk.EvoNormS0(64, num_groups=2.0), TypeError, "num_groups to be an int"),
        (lambda: nk.EvoNormS0(64, eps=float("nan")), ValueError, "EvoNormS0: expected eps > 0"),
        (lambda: nk.EvoNormS0(16), ValueError, "divide num_features=16, got num_groups=32"),
    ],
)
def test_bad_constructor_arguments_are_refused(
    make: Any, exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        make()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "make", [lambda: nk.EvoNormB0(C), lambda: nk.EvoNormS0(C, num_groups=2)], ids=["b0", "s0"]
)
@pytest.mark.parametrize(
    ("x", "exc", "fragment"),
    [
        (torch.randn(4, C, 3), ValueError, "expected 4D input (N, C, ...), got 3D input"),
        (torch.randn(4, C), ValueError, "got 2D input of shape (4, 4)"),
        (torch.randn(4, C + 2, 3, 3), ValueError, f"expected {C} channels (dim 1), got {C + 2}"),
        (torch.ones(4, C, 3, 3, dtype=torch.int64), TypeError, "floating-point input"),
    ],
)
def test_bad_input_is_refused_before_any_buffer_changes(
    make: Any, x: Tensor, exc: type[Exception], fragment: str
) -> None:
    layer = make()
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(exc, match=f"^{type(layer).__name__}: ") as info:
        layer(x)
    assert fragment in str(info.value)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


def test_registry_names() -> None:
    assert type(nk.create_norm("evonorm-b0", 8)) is nk.EvoNormB0
    assert type(nk.create_norm("EvoNormB0", 8)) is nk.EvoNormB0
    assert type(nk.create_norm("evonorm_b0_2d", 8)) is nk.EvoNormB0
    s0 = nk.create_norm("evonorm-s0", 64)
    assert type(s0) is nk.EvoNormS0 and s0.num_groups == 32
    assert nk.get_norm_layer("evonorms0", num_groups=4)(8).num_groups == 4
