"""MABN (``MovingAverageBatchNorm2d``) and ``CenConv2d`` against their definitions.

The identities of ``docs/mabn.md``, each a test: in warm-up and with m = 1 the layer is "BN
without centring" with γ scaled by r (exactly BN without centring while r = 1, before
``r_clamp_steps``) and its custom backward is the gradient of that function with r held constant
(finite differences and autograd of :func:`tests.reference.uncentred_bn`); with m > 1 its
backward is the documented formula (:class:`tests.reference.RefMABN`, written from the paper and
the official code); a state_dict round trip keeps both rings and continues identically; eval is
batch-independent; r is exactly 1 before ``r_clamp_steps`` and clamped after. Then the layer's
own behaviour: the schedules, the running-variance rule, empty and non-finite batches, official
checkpoints, activation checkpointing, the converters, and bad arguments. Everything runs in
float64 on tiny inputs.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import normkit as nk
from tests.reference import RefMABN, uncentred_bn

F64 = torch.float64
C = 3
SHAPE = (4, C, 2, 3)


def _x(seed: int, shape: tuple[int, ...] = SHAPE) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * 2.0 + 0.5


def _cotangent(seed: int, shape: tuple[int, ...] = SHAPE) -> Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(shape, generator=g, dtype=F64)


def _mabn(**kwargs: Any) -> nk.MovingAverageBatchNorm2d:
    """A float64 layer with a non-trivial affine."""
    layer = nk.MovingAverageBatchNorm2d(C, dtype=F64, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, -0.8], dtype=F64))
        layer.bias.copy_(torch.tensor([0.1, -0.3, 0.7], dtype=F64))
    return layer


def _step(layer: nn.Module, seed: int, shape: tuple[int, ...] = SHAPE) -> dict[str, Tensor]:
    """One forward and backward; output, input gradient and parameter gradients (reset)."""
    x = _x(seed, shape).requires_grad_()
    y = layer(x)
    y.backward(_cotangent(seed, shape))
    out = {"y": y.detach(), "dx": x.grad}
    for name, p in layer.named_parameters():
        out["d" + name] = p.grad.clone() if p.grad is not None else None
        p.grad = None
    return out


def _state(layer: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _ref_step(ref: RefMABN, layer: nk.MovingAverageBatchNorm2d, seed: int) -> dict[str, Tensor]:
    x = _x(seed)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    y = ref.forward(x, w, b, training=True)
    dx, dw, db = ref.backward(_cotangent(seed))
    return {"y": y, "dx": dx, "dweight": dw, "dbias": db}


def _assert_matches_reference(layer: nk.MovingAverageBatchNorm2d, ref: RefMABN) -> None:
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.buffer_x2, ref.buffer_x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.buffer_gz, ref.buffer_gz, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == ref.iters


# --- identities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"buffer_size": 1}, id="m1-warmup"),
        pytest.param({"buffer_size": 4}, id="m4-warmup"),
        # m = 1 after warm-up: the average of a ring of one is the batch's own statistic.
        pytest.param({"buffer_size": 1, "warmup_iters": 0, "r_clamp_steps": 10}, id="m1-after"),
        # Once r is no longer held at 1, γ is scaled by r (a constant for the backward): not
        # BN without centring itself, in warm-up or with m = 1.
        pytest.param({"buffer_size": 4, "r_clamp_steps": 1}, id="m4-warmup-r"),
        pytest.param({"buffer_size": 1, "warmup_iters": 0, "r_clamp_steps": 1}, id="m1-after-r"),
    ],
)
def test_warmup_or_one_value_is_bn_without_centring_forward_and_backward(
    options: dict[str, Any],
) -> None:
    layer = _mabn(**options)
    for seed in range(3):  # three steps: the rings fill, the answer stays BN without centring
        clamped = int(layer.num_batches_tracked) + 1 > layer.r_clamp_steps
        ratio = ((_x(seed) ** 2).mean(dim=(0, 2, 3)) + layer.eps) / (layer.running_var + layer.eps)
        r = ratio.sqrt().clamp(layer.r_min, layer.r_max) if clamped else torch.ones(C, dtype=F64)
        assert (r != 1).all() == clamped
        got = _step(layer, seed)
        x = _x(seed).requires_grad_()
        w = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_()
        want = uncentred_bn(x, w * r, b, layer.eps)
        want.backward(_cotangent(seed))
        torch.testing.assert_close(got["y"], want.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["dx"], x.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["dweight"], w.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["dbias"], b.grad, rtol=1e-12, atol=1e-12)


def _from_state(layer: nn.Module) -> Callable[..., Tensor]:
    """The training call as a function of (x, weight, bias), each call from the same state."""
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def fn(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        state = {k: v.clone() for k, v in buffers.items()}
        out: Tensor = functional_call(layer, {"weight": weight, "bias": bias, **state}, (x,))
        return out

    return fn


@pytest.mark.parametrize("options", [{"buffer_size": 1}, {"buffer_size": 3}], ids=["m1", "m3"])
def test_custom_backward_in_warmup_passes_gradcheck(options: dict[str, Any]) -> None:
    layer = _mabn(**options)
    _step(layer, 0)  # a step into warm-up, with state in the rings
    inputs = (
        _x(1, (2, C, 2, 2)).requires_grad_(),
        layer.weight.detach().clone().requires_grad_(),
        layer.bias.detach().clone().requires_grad_(),
    )
    assert gradcheck(_from_state(layer), inputs)


@pytest.mark.parametrize("momentum", [0.02, 0.3, None])
def test_after_warmup_forward_backward_and_state_equal_the_reference(
    momentum: float | None,
) -> None:
    options = {"buffer_size": 3, "warmup_iters": 5, "r_clamp_steps": 4, "momentum": momentum}
    layer = _mabn(**options)
    ref = RefMABN(
        C,
        buffer_size=3,
        warmup_iters=5,
        r_clamp_steps=4,
        momentum=momentum,
        r_min=layer.r_min,
        r_max=layer.r_max,
        eps=layer.eps,
    )
    # Steps 1-4 in warm-up with r = 1, step 5 with r clamped, then moving averages (t >= 5 > m).
    for seed in range(8):
        got = _step(layer, seed)
        want = _ref_step(ref, layer, seed)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=key)
        _assert_matches_reference(layer, ref)


def test_custom_backward_after_warmup_is_not_the_gradient_of_the_forward() -> None:
    # The moving averages are held constant and gz comes from past batches: by design, the
    # backward differs from autograd of the batch's own "BN without centring".
    layer = _mabn(buffer_size=2, warmup_iters=0, r_clamp_steps=100)
    for seed in range(3):
        got = _step(layer, seed)
    x = _x(2).requires_grad_()
    uncentred_bn(x, layer.weight.detach(), layer.bias.detach()).backward(_cotangent(2))
    assert not torch.allclose(got["dx"], x.grad, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_keeps_both_rings_and_continues_identically() -> None:
    layer = _mabn(buffer_size=3, warmup_iters=2, r_clamp_steps=2, momentum=0.2)
    for seed in range(4):
        _step(layer, seed)
    state = layer.state_dict()
    assert {"running_var", "num_batches_tracked", "buffer_x2", "buffer_gz"} <= state.keys()
    assert "running_mean" not in state
    assert state["buffer_x2"].abs().sum() > 0 and state["buffer_gz"].abs().sum() > 0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = nk.MovingAverageBatchNorm2d(
        C, momentum=0.2, buffer_size=3, warmup_iters=2, r_clamp_steps=2, dtype=F64
    )
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    _assert_state_equal(fresh, layer)
    for seed in range(4, 7):
        a, b = _step(layer, seed), _step(fresh, seed)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        _assert_state_equal(fresh, layer)


def test_eval_is_batch_independent_and_uses_running_var() -> None:
    layer = _mabn()
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 4.0], dtype=F64))
    layer.eval()
    state = _state(layer)
    x = _x(0)
    with torch.no_grad():
        y = layer(x)
        for i in range(x.shape[0]):
            torch.testing.assert_close(layer(x[i : i + 1]), y[i : i + 1], rtol=0, atol=0)
    want = RefMABN(C, buffer_size=1, warmup_iters=0, r_clamp_steps=0)
    want.running_var = layer.running_var.clone()
    torch.testing.assert_close(y, want.forward(x, layer.weight, layer.bias, training=False))
    assert all(torch.equal(v, state[k]) for k, v in _state(layer).items())  # eval writes nothing


def _observed_r(layer: nk.MovingAverageBatchNorm2d, x: Tensor) -> Tensor:
    """r of one warm-up training call of an affine-free layer: y = r x / sqrt(mean x² + ε)."""
    with torch.no_grad():
        y = layer(x)
        chi = (x * x).mean(dim=(0, 2, 3))
        return (y * torch.sqrt(chi + layer.eps).reshape(1, -1, 1, 1) / x).mean(dim=(0, 2, 3))


@pytest.mark.parametrize(
    ("running_var", "bound"), [(1e4, "r_min"), (1e-4, "r_max")], ids=["low", "high"]
)
def test_r_is_exactly_one_before_r_clamp_steps_and_clamped_after(
    running_var: float, bound: str
) -> None:
    layer = nk.MovingAverageBatchNorm2d(
        C, affine=False, momentum=0.0, r_clamp_steps=3, r_min=0.25, r_max=4.0, dtype=F64
    )
    with torch.no_grad():
        layer.running_var.fill_(running_var)
    x = _x(0)
    # Unclamped, r = sqrt(mean x² + ε) / sqrt(running_var + ε) is about 0.02 or 200.
    for _ in range(3):  # steps 1, 2, 3: r is 1 whatever the running variance
        torch.testing.assert_close(
            _observed_r(layer, x), torch.ones(C, dtype=F64), rtol=0, atol=1e-14
        )
    for _ in range(2):  # steps 4, 5: clamped
        want = torch.full((C,), getattr(layer, bound), dtype=F64)
        torch.testing.assert_close(_observed_r(layer, x), want, rtol=0, atol=1e-14)


def test_r_inside_its_range_uses_the_running_var_before_the_update() -> None:
    layer = nk.MovingAverageBatchNorm2d(C, affine=False, momentum=0.5, r_clamp_steps=0, dtype=F64)
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([4.0, 9.0, 16.0], dtype=F64))
    old = layer.running_var.clone()
    x = _x(0)
    chi = (x * x).mean(dim=(0, 2, 3))
    want = torch.sqrt(chi + layer.eps) / torch.sqrt(old + layer.eps)
    assert ((want > 0.2) & (want < 5)).all()  # inside the range: the value itself
    torch.testing.assert_close(_observed_r(layer, x), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.running_var, 0.5 * old + 0.5 * chi, rtol=1e-14, atol=0)


# --- schedules and state ------------------------------------------------------------------------


def test_default_r_clamp_steps_is_the_official_max_of_1000_and_warmup() -> None:
    assert nk.MovingAverageBatchNorm2d(C).r_clamp_steps == 1000
    assert nk.MovingAverageBatchNorm2d(C, warmup_iters=1500).r_clamp_steps == 1500
    assert nk.MovingAverageBatchNorm2d(C, r_clamp_steps=7).r_clamp_steps == 7
    layer = nk.MovingAverageBatchNorm2d(C)
    assert (layer.momentum, layer.buffer_size, layer.warmup_iters) == (0.02, 16, 100)
    assert (layer.eps, layer.r_min, layer.r_max) == (1e-5, 0.2, 5.0)


@pytest.mark.parametrize(("m", "warmup"), [(3, 0), (2, 5)], ids=["ring-limits", "warmup-limits"])
def test_moving_averages_start_after_m_steps_and_after_warmup(m: int, warmup: int) -> None:
    layer = nk.MovingAverageBatchNorm2d(
        C, affine=False, buffer_size=m, warmup_iters=warmup, r_clamp_steps=100, dtype=F64
    )
    first_average = max(m + 1, warmup)  # official: warm while t <= m or t < warmup
    for t in range(1, first_average + 2):
        x = _x(t)
        with torch.no_grad():
            y = layer(x)
        chi = (x * x).mean(dim=(0, 2, 3))
        own = x / torch.sqrt(chi + layer.eps).reshape(1, -1, 1, 1)
        row = t % m
        assert torch.equal(layer.buffer_x2[row], chi.to(layer.buffer_x2.dtype)) or torch.allclose(
            layer.buffer_x2[row], chi, rtol=1e-15, atol=0
        ), f"step {t} is not in ring row {row}"
        average = layer.buffer_x2.mean(dim=0)
        smoothed = x / torch.sqrt(average + layer.eps).reshape(1, -1, 1, 1)
        want = own if t < first_average else smoothed
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12, msg=f"step {t}")
    assert not torch.allclose(own, smoothed)  # the two cases differ


def test_running_var_follows_the_pytorch_momentum_convention() -> None:
    official_momentum = 0.98  # the official code's weight of the old value
    layer = nk.MovingAverageBatchNorm2d(C, dtype=F64)
    x = _x(0)
    with torch.no_grad():
        layer(x)
    chi = (x * x).mean(dim=(0, 2, 3))
    official = official_momentum * torch.ones(C, dtype=F64) + (1 - official_momentum) * chi
    torch.testing.assert_close(layer.running_var, official, rtol=1e-14, atol=0)

    cumulative = nk.MovingAverageBatchNorm2d(C, momentum=None, dtype=F64)
    chis = []
    for seed in range(3):
        x = _x(seed)
        chis.append((x * x).mean(dim=(0, 2, 3)))
        with torch.no_grad():
            cumulative(x)
    torch.testing.assert_close(cumulative.running_var, torch.stack(chis).mean(dim=0))


def test_two_forwards_before_their_backwards_write_each_steps_ring_row() -> None:
    # Gradient accumulation: each backward writes the row of its own step.
    options = {"buffer_size": 3, "warmup_iters": 0, "r_clamp_steps": 0, "momentum": 0.2}
    layer = _mabn(**options)
    ref = RefMABN(C, buffer_size=3, warmup_iters=0, r_clamp_steps=0, momentum=0.2)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    for first in (0, 2, 4):
        xs = [_x(first).requires_grad_(), _x(first + 1).requires_grad_()]
        ys = [layer(x) for x in xs]
        wants = [ref.forward(x.detach(), w, b, training=True) for x in xs]
        for i in (0, 1):
            ys[i].backward(_cotangent(first + i))
            dx, _, _ = ref.backward(_cotangent(first + i))
            torch.testing.assert_close(ys[i].detach(), wants[i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(xs[i].grad, dx, rtol=1e-12, atol=1e-12)
        _assert_matches_reference(layer, ref)


def test_empty_training_batch_changes_nothing() -> None:
    layer = _mabn(buffer_size=2)
    _step(layer, 0)
    before = _state(layer)
    x = torch.zeros(0, C, 2, 2, dtype=F64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape
    assert all(torch.equal(v, before[k]) for k, v in _state(layer).items())
    assert layer.weight.grad is not None and layer.weight.grad.count_nonzero() == 0


def test_a_single_value_per_channel_trains() -> None:
    # No centring, so one value per channel is normalized (to ±1), unlike a batch norm.
    layer = nk.MovingAverageBatchNorm2d(C, affine=False, eps=1e-12, dtype=F64)
    x = _x(0, (1, C, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x.sign())


@pytest.mark.parametrize("warm", [True, False], ids=["warmup", "moving-average"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_channel_keeps_its_ring_entries(bad: float, warm: bool) -> None:
    layer = _mabn(buffer_size=2, warmup_iters=100 if warm else 0, r_clamp_steps=0)
    for seed in range(2):
        _step(layer, seed)
    before = _state(layer)
    x = _x(5).requires_grad_()
    with torch.no_grad():
        x[1, 1, 0, 0] = bad
    y = layer(x)
    y.backward(_cotangent(5))
    after = _state(layer)
    row = int(after["num_batches_tracked"]) % 2
    for key in ("buffer_x2", "buffer_gz"):
        assert torch.isfinite(after[key]).all(), key
        assert torch.equal(after[key][row, 1], before[key][row, 1]), key
        assert not torch.equal(after[key][row, [0, 2]], before[key][row, [0, 2]]), key
    assert torch.isfinite(after["running_var"]).all()
    assert not torch.equal(after["running_var"][[0, 2]], before["running_var"][[0, 2]])
    if warm:
        # ψ² is the batch's own, not finite: the running variance keeps its value.
        assert torch.equal(after["running_var"][1], before["running_var"][1])
        assert not torch.isfinite(y[1, 1, 0, 0])
    else:
        # ψ² averages the ring, whose rows are all finite: the channel is normalized as
        # usual and only the bad value itself is not finite.
        assert not torch.equal(after["running_var"][1], before["running_var"][1])
        assert int((~torch.isfinite(y)).sum()) == 1
    assert torch.isfinite(y[:, [0, 2]]).all() and torch.isfinite(x.grad[:, [0, 2]]).all()


def test_half_input_gives_float32_statistics_and_half_output() -> None:
    layer = nk.MovingAverageBatchNorm2d(C, buffer_size=2)
    x = _x(0).to(torch.bfloat16)
    reference = copy.deepcopy(layer)
    y = layer(x.requires_grad_())
    y.float().sum().backward()
    with torch.no_grad():
        reference(x.detach().float())
    assert y.dtype == torch.bfloat16 and x.grad is not None and x.grad.dtype == torch.bfloat16
    for name, b in layer.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float32, name
    torch.testing.assert_close(layer.buffer_x2, reference.buffer_x2)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_double_backward_is_refused() -> None:
    layer = _mabn(buffer_size=1)
    x = _x(0).requires_grad_()
    (dx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


def test_official_checkpoint_layout_loads() -> None:
    official = {
        "weight": torch.tensor([1.0, 2.0, 3.0]),
        "bias": torch.tensor([0.0, 0.5, -1.0]),
        "running_var": torch.tensor([0.5, 1.5, 2.5]).reshape(1, C, 1, 1),
        "iters": torch.tensor([1234]),
        "buffer_x2": torch.rand(4, C),
        "buffer_gz": torch.randn(4, C),
    }
    layer = nk.MovingAverageBatchNorm2d(C, buffer_size=4)
    layer.load_state_dict(dict(official), strict=True)
    assert int(layer.num_batches_tracked) == 1234 and layer.num_batches_tracked.dim() == 0
    assert torch.equal(layer.running_var, official["running_var"].flatten())
    assert torch.equal(layer.buffer_gz, official["buffer_gz"])
    x = _x(0).float()
    with torch.no_grad():
        want = official["weight"].reshape(1, C, 1, 1) * x / torch.sqrt(
            official["running_var"] + 1e-5
        ) + official["bias"].reshape(1, C, 1, 1)
        torch.testing.assert_close(layer.eval()(x), want)


# --- activation checkpointing -------------------------------------------------------------------


def _run_steps(layer: nn.Module, reentrant: bool | None) -> list[dict[str, Tensor]]:
    results = []
    for seed in range(5):
        x = _x(seed).requires_grad_()
        y = layer(x) if reentrant is None else checkpoint(layer, x, use_reentrant=reentrant)
        y.backward(_cotangent(seed))
        results.append({"y": y.detach(), "dx": x.grad, "dweight": layer.weight.grad.clone()})
        layer.weight.grad = None
        layer.bias.grad = None
    return results


@pytest.mark.parametrize(
    ("reentrant", "r_clamp_steps"),
    [(False, 0), (True, 100), (True, 0)],
    ids=["non-reentrant", "reentrant-while-r-is-1", "reentrant"],
)
def test_activation_checkpointing_updates_the_state_once_and_keeps_gradients(
    reentrant: bool, r_clamp_steps: int
) -> None:
    # The recomputed forward runs inside the backward: it replays the step without writing.
    options = {"buffer_size": 2, "warmup_iters": 0, "r_clamp_steps": r_clamp_steps}
    plain, wrapped = _mabn(momentum=0.3, **options), _mabn(momentum=0.3, **options)
    want, got = _run_steps(plain, None), _run_steps(wrapped, reentrant)
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-14, atol=1e-14, msg=f"{step} {key}")
    _assert_state_equal(wrapped, plain)


# --- converters, registry, compile ----------------------------------------------------------------


def test_freeze_norm_uses_running_var_and_unfreeze_restores() -> None:
    layer = _mabn(buffer_size=2)
    _step(layer, 0)
    model = nn.Sequential(nk.CenConv2d(C, C, 1, bias=False, dtype=F64), layer)
    expected = copy.deepcopy(model).eval()
    nk.freeze_norm(model).train()
    assert type(layer).__name__ == "FrozenMovingAverageBatchNorm2d" and not layer.training
    before = _state(layer)
    x = _x(1).requires_grad_()
    out = model(x)
    torch.testing.assert_close(out, expected(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x[:1]), out[:1], rtol=0, atol=0)
    out.square().sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in _state(layer).items())
    assert layer.weight.grad is None and not layer.weight.requires_grad
    nk.unfreeze_norm(model)
    assert type(layer) is nk.MovingAverageBatchNorm2d and layer.training
    assert layer.weight.requires_grad


def test_prepare_for_inference_bakes_cenconv_and_keeps_mabn() -> None:
    model = nn.Sequential(
        nk.CenConv2d(C, C, 3, padding=1, bias=False, dtype=F64), _mabn(buffer_size=2), nn.ReLU()
    )
    for seed in range(2):
        _step(model, seed)
    prepared, report = nk.prepare_for_inference(model)
    assert type(prepared[0]) is nn.Conv2d and report.baked == ["0"]
    assert report.kept == ["1"] and isinstance(prepared[1], nk.MovingAverageBatchNorm2d)
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model.eval()(x), rtol=1e-12, atol=1e-12)


def test_convert_sync_switches_and_revert_sync_restores() -> None:
    model = nn.Sequential(nk.CenConv2d(C, C, 1), nk.MovingAverageBatchNorm2d(C))
    converted = nk.convert_sync(model, process_group=None)
    assert converted[1].sync and "sync=True" in repr(converted[1])
    x = torch.randn(2, C, 2, 2)
    # Without a process group the synchronized layer computes what the local one does.
    local = copy.deepcopy(model)
    local[1].sync = False
    torch.testing.assert_close(converted(x), local(x))
    assert not nk.revert_sync(converted)[1].sync


@pytest.mark.slow
def test_inductor_backward_gets_this_steps_statistics() -> None:
    # Inductor once recomputed ψ², r and the ring row in backward from the buffers the forward
    # had already updated (wrong gradients; see _mabn_step_). Float32, as compiled code runs.
    torch._dynamo.reset()
    options = {"buffer_size": 2, "warmup_iters": 0, "r_clamp_steps": 0, "momentum": 0.3}
    layer = nk.MovingAverageBatchNorm2d(C, **options)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    try:
        for seed in range(3):
            x, dy = _x(seed).float(), _cotangent(seed).float()
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            got, want = compiled(a), eager(b)
            got.backward(dy)
            want.backward(dy)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(a.grad, b.grad)
            for p, q in zip(layer.parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad)
                p.grad = q.grad = None
            for (name, u), v in zip(layer.named_buffers(), eager.buffers(), strict=True):
                torch.testing.assert_close(u, v, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        torch._dynamo.reset()


def test_registry_names_build_the_2d_layer() -> None:
    for name in ("mabn", "MABN", "mabn2d", "mabn-2d"):
        layer = nk.create_norm(name, 8, buffer_size=4)
        assert type(layer) is nk.MovingAverageBatchNorm2d and layer.buffer_size == 4
    assert "mabn" in nk.list_norms()
    model = nk.models.resnet20(norm_layer=nk.get_norm_layer("mabn", buffer_size=2))
    assert sum(isinstance(m, nk.MovingAverageBatchNorm2d) for m in model.modules()) == 19


def test_reset_parameters_restores_the_official_init() -> None:
    layer = _mabn(buffer_size=2, warmup_iters=0)
    for seed in range(3):
        _step(layer, seed)
    layer.reset_parameters()
    fresh = nk.MovingAverageBatchNorm2d(C, buffer_size=2, warmup_iters=0, dtype=F64)
    _assert_state_equal(layer, fresh)
    assert torch.equal(layer.running_var, torch.ones(C, dtype=F64))
    assert layer.buffer_x2.count_nonzero() == 0 and layer.buffer_gz.count_nonzero() == 0


def test_repr_shows_the_options() -> None:
    text = repr(nk.MovingAverageBatchNorm2d(8, buffer_size=4, r_min=0.5))
    assert text.startswith("MovingAverageBatchNorm2d(8, eps=1e-05, momentum=0.02")
    assert "buffer_size=4" in text and "r_min=0.5" in text and "r_clamp_steps=1000" in text


# --- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"track_running_stats": False}, ValueError, "track_running_stats=True"),
        ({"buffer_size": 0}, ValueError, "buffer_size >= 1, got 0"),
        ({"buffer_size": 2.0}, TypeError, "buffer_size to be an int, got 2.0"),
        ({"warmup_iters": -1}, ValueError, "warmup_iters >= 0, got -1"),
        ({"r_clamp_steps": -2}, ValueError, "r_clamp_steps >= 0, got -2"),
        ({"r_clamp_steps": 2**70}, ValueError, "r_clamp_steps <= "),
        ({"r_clamp_steps": True}, TypeError, "r_clamp_steps to be an int, got True"),
        ({"r_min": 0.0}, ValueError, "r_min > 0, got 0.0"),
        ({"r_min": 1.5}, ValueError, "r_min <= 1 <= r_max"),
        ({"r_max": 0.5}, ValueError, "got r_min=0.2, r_max=0.5"),
        ({"r_max": float("inf")}, ValueError, "finite r_max"),
        ({"r_max": "5"}, TypeError, "r_max to be a number"),
        ({"momentum": 1.5}, ValueError, "momentum in [0, 1] or None, got 1.5"),
        ({"eps": 0}, ValueError, "eps > 0, got 0"),
        ({"affine": "yes"}, TypeError, "affine to be a bool"),
        ({"dtype": torch.long}, TypeError, "floating-point torch.dtype"),
    ],
)
def test_bad_constructor_argument_is_refused(
    kwargs: dict[str, Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        nk.MovingAverageBatchNorm2d(C, **kwargs)
    message = str(info.value)
    assert message.startswith("MovingAverageBatchNorm2d: expected"), message
    assert fragment in message, message


@pytest.mark.parametrize(
    ("x", "exc", "fragment"),
    [
        (torch.randn(2, C, 3), ValueError, "expected 4D input"),
        (torch.randn(2, C + 1, 2, 2), ValueError, f"expected {C} channels"),
        (torch.ones(2, C, 2, 2, dtype=torch.long), TypeError, "floating-point input"),
    ],
)
def test_bad_input_is_refused_before_any_buffer_changes(
    x: Tensor, exc: type[Exception], fragment: str
) -> None:
    layer = nk.MovingAverageBatchNorm2d(C, buffer_size=2)
    before = _state(layer)
    with pytest.raises(exc, match=fragment):
        layer(x)
    assert all(torch.equal(v, before[k]) for k, v in _state(layer).items())


def test_cleared_track_running_stats_refuses_training_and_keeps_eval() -> None:
    # The flag cleared on a built layer: no silent updates in training, a named error instead;
    # eval still normalizes with running_var.
    torch.manual_seed(5)
    layer = nk.MovingAverageBatchNorm2d(C, buffer_size=2)
    x = torch.randn(4, C, 3, 3)
    layer(x)
    layer.track_running_stats = False
    before = _state(layer)
    with pytest.raises(ValueError, match=r"MovingAverageBatchNorm2d: expected track_running_stats"):
        layer(x)
    assert all(torch.equal(v, before[k]) for k, v in _state(layer).items())
    layer.eval()
    scale = torch.rsqrt(layer.running_var + layer.eps) * layer.weight
    want = x * scale.reshape(1, C, 1, 1) + layer.bias.reshape(1, C, 1, 1)
    torch.testing.assert_close(layer(x), want.detach())


# --- CenConv2d ----------------------------------------------------------------------------------


CONV_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"stride": 2, "padding": 1, "dilation": 2, "bias": False}, id="strided"),
    pytest.param({"groups": 3, "padding": "same", "padding_mode": "reflect"}, id="grouped"),
]


def _conv(**kwargs: Any) -> nk.CenConv2d:
    torch.manual_seed(0)
    conv = nk.CenConv2d(3, 6, 3, dtype=F64, **kwargs)
    with torch.no_grad():
        conv.weight.add_(0.5)  # filters with a clear mean to remove
    return conv


@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_cenconv_weight_has_zero_mean_per_filter_and_conv_uses_it(kwargs: dict[str, Any]) -> None:
    conv = _conv(**kwargs)
    w = conv.centred_weight()
    assert conv.weight.mean(dim=(1, 2, 3)).abs().min() > 0.1
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=F64), atol=1e-15, rtol=0)
    centred = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(w, centred, rtol=0, atol=1e-15)
    plain = nn.Conv2d(3, 6, 3, dtype=F64, **kwargs)
    plain.load_state_dict(conv.state_dict())
    with torch.no_grad():
        plain.weight.copy_(centred)
    x = _x(0, (2, 3, 7, 6))
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-12, atol=1e-12)
    for training in (True, False):  # the eval cache holds the same weight
        conv.train(training)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), plain(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_cenconv_gradcheck(kwargs: dict[str, Any]) -> None:
    conv = _conv(**kwargs)
    names = [n for n, _ in conv.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in conv.parameters())
    x = _x(1, (1, 3, 5, 5)).requires_grad_()

    def fn(x: Tensor, *flat: Tensor) -> Tensor:
        out: Tensor = functional_call(conv, dict(zip(names, flat, strict=True)), (x,))
        return out

    assert gradcheck(fn, (x, *params))


def test_cenconv_gradient_flows_through_the_mean() -> None:
    # The gradient of the raw weight is that of the centred one with its mean removed.
    conv = _conv(bias=False)
    x = _x(2, (2, 3, 5, 5))
    conv(x).square().sum().backward()
    assert conv.weight.grad is not None
    grad_mean = conv.weight.grad.mean(dim=(1, 2, 3))
    torch.testing.assert_close(grad_mean, torch.zeros(6, dtype=F64), rtol=0, atol=1e-10)


def test_cenconv_initializes_as_nn_conv2d_and_bakes_to_it() -> None:
    torch.manual_seed(3)
    conv = nk.CenConv2d(4, 8, 3, padding=1)
    torch.manual_seed(3)
    plain = nn.Conv2d(4, 8, 3, padding=1)
    assert torch.equal(conv.weight, plain.weight) and torch.equal(conv.bias, plain.bias)
    baked = conv.eval().bake()
    assert type(baked) is nn.Conv2d and not baked.training
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), conv(x))
        conv.weight.add_(1.0)  # an in-place update invalidates the eval cache
        torch.testing.assert_close(conv(x), conv.bake()(x))


def test_cenconv_centres_half_weights_in_float32() -> None:
    conv = nk.CenConv2d(3, 4, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        conv.weight.add_(100.0)
    w32 = conv.weight.float()
    want = (w32 - w32.mean(dim=(1, 2, 3), keepdim=True)).to(torch.bfloat16)
    assert torch.equal(conv.centred_weight(), want)


@pytest.mark.parametrize(
    ("make", "exc", "fragment"),
    [
        (lambda: nk.CenConv2d(4, 6, 3, groups=4), ValueError, "got groups=4"),
        (lambda: nk.CenConv2d(0, 6, 3), ValueError, "in_channels >= 1, got 0"),
        (lambda: nk.CenConv2d(4, 6, 0), ValueError, "kernel_size >= 1, got 0"),
        (lambda: nk.CenConv2d(4, 6, -1), ValueError, "kernel_size >= 1, got -1"),
        (lambda: nk.CenConv2d(4, 6, 3, padding=(1, -1)), ValueError, "padding >= 0, got -1"),
        (lambda: nk.CenConv2d(4, 6, 3, stride=0), ValueError, "stride >= 1, got 0"),
        (lambda: nk.CenConv2d(4, 6, 2.5), TypeError, "kernel_size to be an int or ints"),
        (lambda: nk.CenConv2d(4, 6, 3, bias="no"), TypeError, "bias to be a bool"),
        (lambda: nk.CenConv2d(4, 6, (1, 2, 3)), ValueError, "kernel_size to be an int or 2"),
        (lambda: nk.CenConv2d(4, 6, 3)(torch.randn(1, 5, 4, 4)), ValueError, "expected 4"),
        (lambda: nk.CenConv2d(4, 6, 3)(torch.randn(1, 4, 2, 2)), ValueError, "at least (3, 3)"),
    ],
)
def test_cenconv_refuses_bad_arguments_naming_itself(
    make: Callable[[], Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        make()
    message = str(info.value)
    assert message.startswith("CenConv2d: expected"), message
    assert fragment in message, message


@pytest.mark.parametrize("cls", [nk.CenConv2d, nk.WSConv2d, nk.ScaledWSConv2d, nk.WSConv1d])
@pytest.mark.parametrize(
    ("sizes", "fragment"),
    [
        ({"kernel_size": -1}, "kernel_size >= 1, got -1"),
        ({"kernel_size": 3, "dilation": -2}, "dilation >= 1, got -2"),
        ({"kernel_size": 3, "padding": -1}, "padding >= 0, got -1"),
    ],
)
def test_conv_sizes_out_of_range_are_refused_before_torch_builds_the_weight(
    cls: type[nn.Module], sizes: dict[str, int], fragment: str
) -> None:
    # The check CenConv2d shares with the WS layers (weight_std._check_conv_args): torch's
    # own failure for a negative kernel size is a RuntimeError that names no layer.
    with pytest.raises(ValueError) as info:
        cls(2, 2, **sizes)
    assert str(info.value) == f"{cls.__name__}: expected {fragment}"
