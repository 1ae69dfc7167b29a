"""Batch Renormalization: the paper's identities, the formula, the schedule and the layer's rules.

* r_max = 1, d_max = 0 (and the warm-up of the schedule) is ``nn.BatchNorm`` in training (output,
  gradients, running buffers) and eval;
* r and d get no gradient: the training gradient is autograd of the formula with r and d
  detached, and differs from the gradient with them attached;
* the clip limits are 1 and 0 before the warm-up ends and reach their targets at the configured
  steps; clipping acts when the batch statistics are far from the running ones;
* the layer equals the literal Algorithm 1 of ``tests/reference.py`` over several steps, on the
  fast and the reference path (float64: output, gradients, running buffers).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from normkit.layers.renorm import _BatchRenorm
from tests.reference import RefBatchRenorm, renorm_limit

F64 = torch.float64
C = 4
BRN: dict[int, type[_BatchRenorm]] = {1: nk.BatchRenorm1d, 2: nk.BatchRenorm2d, 3: nk.BatchRenorm3d}
TORCH_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPES = {
    "flat": (1, (6, C)),
    "1d": (1, (5, C, 3)),
    "2d": (2, (4, C, 3, 2)),
    "3d": (3, (3, C, 2, 2, 2)),
}
NO_SCHEDULE = {"warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0}


def _x(shape: tuple[int, ...], seed: int, scale: float = 2.0, shift: float = 0.5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale + shift


def _randomize_affine(*layers: nn.Module) -> None:
    g = torch.Generator().manual_seed(11)
    w = 1.0 + 0.5 * torch.randn(C, generator=g, dtype=F64)
    b = 0.5 * torch.randn(C, generator=g, dtype=F64)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(w)
            layer.bias.copy_(b)


def _step(layer: Any, x: Tensor, seed: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and parameter gradients of one call (random cotangent)."""
    x = x.clone().requires_grad_()
    out = layer(x)
    cot = _x(out.shape, 100 + seed, 1.0, 0.0)
    params = [layer.weight, layer.bias] if isinstance(layer, nn.Module) else []
    grads = torch.autograd.grad(out, [x, *params], cot)
    return out.detach(), grads[0], list(grads[1:])


def _ref_step(
    ref: RefBatchRenorm, x: Tensor, seed: int, w: Tensor, b: Tensor, **kw: Any
) -> tuple[Tensor, Tensor, list[Tensor]]:
    x = x.clone().requires_grad_()
    w, b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    out = ref(x, weight=w, bias=b, **kw)
    cot = _x(out.shape, 100 + seed, 1.0, 0.0)
    grads = torch.autograd.grad(out, [x, w, b], cot)
    return out.detach(), grads[0], list(grads[1:])


def _assert_same(got: tuple[Tensor, Tensor, list[Tensor]], want: Any) -> None:
    """Equal outputs, input gradients and parameter gradients (float64 defaults)."""
    for g, w in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]), strict=True):
        torch.testing.assert_close(g, w)


# --- the identities of the paper ---------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize(
    "limits",
    [{"r_max": 1.0, "d_max": 0.0, **NO_SCHEDULE}, {}],
    ids=["limits-1-0", "warm-up"],
)
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_limits_one_and_zero_equal_torch_batch_norm(
    shape_id: str, limits: dict[str, Any], fast: bool
) -> None:
    dim, shape = SHAPES[shape_id]
    layer = BRN[dim](C, dtype=F64, **limits)
    layer.fast = fast
    bn = TORCH_BN[dim](C, dtype=F64)
    _randomize_affine(layer, bn)
    for step in range(3):
        x = _x(shape, step)
        _assert_same(_step(layer, x, step), _step(bn, x, step))
        torch.testing.assert_close(layer.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.running_var, bn.running_var)
        assert torch.equal(layer.num_batches_tracked, bn.num_batches_tracked)
    layer.eval()
    bn.eval()
    x = _x(shape, 9)
    torch.testing.assert_close(layer(x), bn(x))


def _relaxed(dim: int = 2, **kw: Any) -> _BatchRenorm:
    """r_max = 2, d_max = 0.5 after one warm-up step, r at its target at step 3, d at step 2;
    running statistics far enough from the batches' that r and d clip in some channels."""
    args: dict[str, Any] = {
        "r_max": 2.0,
        "d_max": 0.5,
        "warmup_steps": 1,
        "r_max_steps": 3,
        "d_max_steps": 2,
        "dtype": F64,
    }
    layer = BRN[dim](C, **{**args, **kw})
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 1.5, -0.5, 0.2]))
        layer.running_var.copy_(torch.tensor([1.0, 0.3, 4.0, 9.0]))
    return layer


def _reference_for(layer: _BatchRenorm) -> RefBatchRenorm:
    ref = RefBatchRenorm(
        C,
        r_max=layer.r_max,
        d_max=layer.d_max,
        warmup=layer.warmup_steps,
        r_max_steps=layer.r_max_steps,
        d_max_steps=layer.d_max_steps,
        eps=layer.eps,
        momentum=0.1,
    )
    ref.running_mean = layer.running_mean.clone()
    ref.running_var = layer.running_var.clone()
    return ref


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("shape_id", list(SHAPES))
def test_training_and_eval_match_algorithm_1(shape_id: str, fast: bool) -> None:
    dim, shape = SHAPES[shape_id]
    layer = _relaxed(dim)
    layer.fast = fast
    ref = _reference_for(layer)
    _randomize_affine(layer)
    w, b = layer.weight, layer.bias
    clipped_r = clipped_d = False
    for step in range(5):  # across the warm-up and both ramps
        x = _x(shape, step)
        r_lim, d_lim = ref.limits()
        _assert_same(_step(layer, x, step), _ref_step(ref, x, step, w, b, training=True))
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        torch.testing.assert_close(layer.running_var, ref.running_var)
        assert int(layer.num_batches_tracked) == ref.step
        assert ref.last_r is not None and ref.last_d is not None
        clipped_r |= bool(((ref.last_r - r_lim).abs() < 1e-12).any()) and r_lim > 1
        clipped_d |= bool(((ref.last_d.abs() - d_lim).abs() < 1e-12).any()) and d_lim > 0
    assert clipped_r and clipped_d, "the case must exercise both clips"
    layer.eval()
    x = _x(shape, 7)
    _assert_same(_step(layer, x, 7), _ref_step(ref, x, 7, w, b, training=False))


def test_r_and_d_get_no_gradient() -> None:
    # Wide limits: r and d unclipped, so attached they would carry the batch dependence away
    # (the output would be (x − μ)/σ, the eval function), and the gradients differ.
    layer = nk.BatchRenorm2d(C, r_max=100.0, d_max=100.0, **NO_SCHEDULE, dtype=F64)
    _randomize_affine(layer)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.3, -0.2, 1.0, 0.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
    detached, attached = _reference_for(layer), _reference_for(layer)
    x = _x((5, C, 3, 3), 0)
    got = _step(layer, x, 0)
    want = _ref_step(detached, x, 0, layer.weight, layer.bias, training=True)
    other = _ref_step(attached, x, 0, layer.weight, layer.bias, training=True, stop_gradient=False)
    _assert_same(got, want)
    torch.testing.assert_close(other[0], want[0])  # the same forward
    # Attached, r and d would carry gradient to x (the affine's gradients see only x̂'s value).
    assert (got[1] - other[1]).abs().max() > 1e-3


def test_relaxed_training_gradient_is_the_batch_norm_gradient_with_r_and_d_fixed() -> None:
    """gradcheck of the training function with this step's r and d as constants: the layer's
    gradient is the derivative of a batch norm with the affine (γ r, γ d + β)."""
    layer = _relaxed(2, **NO_SCHEDULE)
    _randomize_affine(layer)
    x = _x((4, C, 2, 2), 3)
    ref = _reference_for(layer)
    ref(x, training=True, weight=layer.weight.detach(), bias=layer.bias.detach())
    assert ref.last_r is not None and ref.last_d is not None
    r, d = ref.last_r, ref.last_d
    out, dx, dparams = _step(copy.deepcopy(layer), x, 0)

    def frozen(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        bn = nn.functional.batch_norm(x, None, None, w * r, w * d + b, True, 0.0, layer.eps)
        return bn

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    xx = x.clone().requires_grad_()
    assert gradcheck(frozen, (xx, w, b))
    cot = _x(out.shape, 100, 1.0, 0.0)
    want = torch.autograd.grad(frozen(xx, w, b), (xx, w, b), cot)
    torch.testing.assert_close(frozen(xx, w, b).detach(), out)
    for g, v in zip((dx, *dparams), want, strict=True):
        torch.testing.assert_close(g, v)


# --- the schedule ------------------------------------------------------------------------------


def _limits_at(layer: _BatchRenorm, step: int) -> tuple[float, float]:
    assert layer.num_batches_tracked is not None
    layer.num_batches_tracked.fill_(step)
    r_lim, d_lim = layer.clip_limits()
    return float(r_lim), float(d_lim)


def test_default_schedule_is_the_papers() -> None:
    layer = nk.BatchRenorm2d(C)
    assert _limits_at(layer, 0) == (1.0, 0.0)
    assert _limits_at(layer, 4999) == (1.0, 0.0)  # 5000 steps of plain batch norm
    r_lim, d_lim = _limits_at(layer, 5000)
    assert 1.0 < r_lim < 1.001 and 0.0 < d_lim < 0.001  # relaxing from there
    assert _limits_at(layer, 24999)[1] < 5.0
    assert _limits_at(layer, 25000)[1] == 5.0  # d_max = 5 at 25k steps
    assert _limits_at(layer, 39999)[0] < 3.0
    assert _limits_at(layer, 40000) == (3.0, 5.0)  # r_max = 3 at 40k steps
    assert _limits_at(layer, 10**7) == (3.0, 5.0)


@pytest.mark.parametrize(
    ("warmup", "r_steps", "d_steps"), [(10, 40, 25), (3, 3, 7), (0, 0, 0), (0, 5, 0)]
)
def test_limits_follow_the_schedule_at_every_step(warmup: int, r_steps: int, d_steps: int) -> None:
    layer = nk.BatchRenorm2d(
        C, r_max=3.0, d_max=5.0, warmup_steps=warmup, r_max_steps=r_steps, d_max_steps=d_steps
    )
    for step in range(max(r_steps, d_steps) + 3):
        r_lim, d_lim = _limits_at(layer, step)
        assert r_lim == pytest.approx(renorm_limit(step, 1.0, 3.0, warmup, r_steps), abs=1e-6)
        assert d_lim == pytest.approx(renorm_limit(step, 0.0, 5.0, warmup, d_steps), abs=1e-6)
        if step < warmup:
            assert (r_lim, d_lim) == (1.0, 0.0)
        if step >= r_steps:
            assert r_lim == 3.0
        if step >= d_steps:
            assert d_lim == 5.0


def test_a_float64_layer_has_float64_limits() -> None:
    layer = nk.BatchRenorm2d(
        C, r_max=1.5, d_max=0.5, warmup_steps=2, r_max_steps=5, d_max_steps=4, dtype=F64
    )
    r_lim, d_lim = _limits_at(layer, 3)
    assert r_lim == 1.0 + 0.5 * (3 - 1) / (5 - 1)
    assert d_lim == 0.5 * (3 - 1) / (4 - 1)  # 1/6 exactly as a double, not float32's


def test_training_steps_advance_the_schedule_and_eval_calls_do_not() -> None:
    layer = nk.BatchRenorm2d(C, warmup_steps=2, r_max_steps=4, d_max_steps=3)
    x = _x((4, C, 2, 2), 0).float()
    seen = []
    for _ in range(5):
        seen.append(tuple(float(v) for v in layer.clip_limits()))
        layer(x)
        layer.eval()(x)  # no step
        layer.train()
    assert int(layer.num_batches_tracked) == 5
    assert seen[0] == seen[1] == (1.0, 0.0)
    assert seen[2][0] > 1.0 and seen[2][1] > 0.0
    assert seen[3][1] == 5.0 and seen[4] == (3.0, 5.0)


def test_clipping_acts_when_batch_statistics_are_far_from_the_running_ones() -> None:
    layer = nk.BatchRenorm2d(C, affine=False, r_max=2.0, d_max=0.5, **NO_SCHEDULE, dtype=F64)
    # Running statistics (0, 1). Channel 0: mean 3, std 10 (r and d clip high); channel 1:
    # mean −3, std 0.1 (clip low); channels 2 and 3: near (0, 1), no clipping.
    x = _x((8, C, 4, 4), 0, 1.0, 0.0)
    x[:, 0] = x[:, 0] * 10 + 3
    x[:, 1] = x[:, 1] * 0.1 - 3
    x[:, 2:] = x[:, 2:] * 1.2 + 0.1
    y = layer(x)
    dims = (0, 2, 3)
    var = x.var(dims, correction=0)
    shrink = torch.sqrt(var / (var + layer.eps))  # the std of (x − μ_B)/σ_B
    torch.testing.assert_close(y.mean(dims)[:2], torch.tensor([0.5, -0.5], dtype=F64))  # d
    torch.testing.assert_close(y.std(dims, correction=0)[:2], torch.tensor([2.0, 0.5]) * shrink[:2])
    # Unclipped with running (0, 1): x̂ = (x − μ)/σ, whatever the batch statistics.
    torch.testing.assert_close(y[:, 2:], x[:, 2:] / (1 + layer.eps) ** 0.5)
    # A batch norm would have normalized every channel to mean 0, std ~1.
    assert (y.mean(dims)[:2].abs() > 0.4).all()


# --- gradients, eval, state, tools ---------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train-warm-up", "eval-relaxed"])
def test_gradcheck_and_gradgradcheck(training: bool) -> None:
    layer = (nk.BatchRenorm2d(C, dtype=F64) if training else _relaxed(2)).train(training)
    _randomize_affine(layer)
    x = _x((3, C, 2, 2), 0).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    state = copy.deepcopy(layer.state_dict())

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        layer.load_state_dict(state)  # every evaluation from the same buffers
        out: Tensor = torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))
        return out

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_eval_is_a_batch_norm_with_the_running_statistics() -> None:
    layer = _relaxed(2).eval()
    _randomize_affine(layer)
    x = _x((3, C, 2, 2), 0)
    rm, rv = layer.running_mean.view(1, C, 1, 1), layer.running_var.view(1, C, 1, 1)
    w, b = layer.weight.view(1, C, 1, 1), layer.bias.view(1, C, 1, 1)
    torch.testing.assert_close(layer(x), (x - rm) / torch.sqrt(rv + layer.eps) * w + b)


def test_state_dict_round_trip_continues_the_schedule() -> None:
    layer = _relaxed(2)
    _randomize_affine(layer)
    for step in range(2):
        layer(_x((4, C, 2, 2), step))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    fresh = nk.BatchRenorm2d(
        C, r_max=2.0, d_max=0.5, warmup_steps=1, r_max_steps=3, d_max_steps=2, dtype=F64
    )
    fresh.load_state_dict(state, strict=True)
    for a, b in zip(fresh.clip_limits(), layer.clip_limits(), strict=True):
        assert torch.equal(a, b)
    x = _x((4, C, 2, 2), 5)
    torch.testing.assert_close(fresh(x), layer(x))
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_batch_norm_checkpoint_loads_and_sets_the_step() -> None:
    bn = nn.BatchNorm2d(C)
    for step in range(3):
        bn(_x((4, C, 2, 2), step).float())
    layer = nk.BatchRenorm2d(C, warmup_steps=2, r_max_steps=10, d_max_steps=10)
    layer.load_state_dict(bn.state_dict(), strict=True)
    assert int(layer.num_batches_tracked) == 3 and float(layer.clip_limits()[0]) > 1.0
    x = _x((4, C, 2, 2), 9).float()
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x))


def test_freeze_norm_freezes_to_eval_and_unfreeze_restores() -> None:
    layer = _relaxed(2)
    _randomize_affine(layer)
    x = _x((4, C, 2, 2), 0)
    want = copy.deepcopy(layer).eval()(x)
    model = nk.freeze_norm(nn.Sequential(layer)).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(layer(x), want)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    assert not layer.weight.requires_grad
    nk.unfreeze_norm(model)
    assert type(layer) is nk.BatchRenorm2d and layer.training and layer.weight.requires_grad
    layer(x)
    assert int(layer.num_batches_tracked) == 1


def test_convert_sync_switches_the_layer_and_revert_undoes_it() -> None:
    model = nn.Sequential(nk.BatchRenorm1d(C), nk.BatchRenorm3d(C))
    assert nk.convert_sync(model) is model and model[0].sync and model[1].sync
    nk.revert_sync(model)
    assert not model[0].sync and not model[1].sync


def test_compiled_layer_crosses_the_schedule_without_recompiling() -> None:
    torch._dynamo.reset()
    layer = _relaxed(2, dtype=torch.float32)
    eager = copy.deepcopy(layer)
    eager.fast = False  # traced code takes the reference path
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for step in range(5):  # warm-up, both ramps, then the targets
        x = _x((4, C, 2, 2), step).float()
        torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(layer.running_var, eager.running_var)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_registry_names() -> None:
    assert type(nk.create_norm("brn", C)) is nk.BatchRenorm2d
    assert type(nk.create_norm("batchrenorm", C)) is nk.BatchRenorm2d
    assert type(nk.create_norm("BRN-1d", C)) is nk.BatchRenorm1d
    assert type(nk.create_norm("batch_renorm_3d", C)) is nk.BatchRenorm3d
    layer = nk.get_norm_layer("brn", warmup_steps=0, r_max_steps=0, d_max_steps=0)(C)
    assert [float(v) for v in layer.clip_limits()] == [3.0, 5.0]


# --- bad arguments -------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"r_max": 0.5}, ValueError, "expected r_max >= 1"),
        ({"r_max": 0}, ValueError, "expected r_max > 0, got 0"),
        ({"r_max": NAN}, ValueError, "got nan"),
        ({"r_max": INF}, ValueError, "finite r_max > 0, got inf"),
        ({"r_max": "3"}, TypeError, "expected r_max to be a number, got '3'"),
        ({"d_max": -1.0}, ValueError, "expected d_max >= 0 and finite, got -1.0"),
        ({"d_max": INF}, ValueError, "got inf"),
        ({"d_max": None}, TypeError, "expected d_max to be a number, got None"),
        ({"warmup_steps": -1}, ValueError, "expected warmup_steps >= 0, got -1"),
        ({"warmup_steps": 1.5}, TypeError, "expected warmup_steps to be an int, got 1.5"),
        ({"r_max_steps": True}, TypeError, "expected r_max_steps to be an int, got True"),
        ({"d_max_steps": -2}, ValueError, "expected d_max_steps >= 0, got -2"),
        (
            {"warmup_steps": 10, "r_max_steps": 5, "d_max_steps": 20},
            ValueError,
            "got r_max_steps=5",
        ),
        (
            {"warmup_steps": 10, "r_max_steps": 20, "d_max_steps": 9},
            ValueError,
            "got d_max_steps=9",
        ),
        ({"track_running_stats": False}, ValueError, "expected track_running_stats=True"),
        ({"track_running_stats": "no"}, TypeError, "track_running_stats to be a bool"),
        ({"momentum": 2.0}, ValueError, "expected momentum in [0, 1] or None, got 2.0"),
        ({"eps": 0.0}, ValueError, "expected eps > 0, got 0.0"),
    ],
)
@pytest.mark.parametrize("cls", [nk.BatchRenorm1d, nk.BatchRenorm2d, nk.BatchRenorm3d])
def test_bad_constructor_arguments_are_refused(
    cls: type[nn.Module], kwargs: dict[str, Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        cls(C, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}: expected"), message
    assert fragment in message, message


def test_a_refused_input_changes_no_buffer() -> None:
    layer = _relaxed(2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad, exc in [
        (torch.randn(4, C + 1, 2, 2, dtype=F64), ValueError),
        (torch.randn(4, C, 2, dtype=F64), ValueError),
        (torch.ones(4, C, 2, 2, dtype=torch.long), TypeError),
        (torch.randn(1, C, 1, 1, dtype=F64), ValueError),  # one value per channel in training
    ]:
        with pytest.raises(exc, match="BatchRenorm2d: expected"):
            layer(bad)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
