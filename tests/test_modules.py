"""Generic checks of every public layer, driven by the records of ``tests/layer_table.py``.

One test per property, run over every record (and, for a conditional layer, both kinds of domain
index), on CPU, in float32 and float64 where the dtype matters:

* forward and backward run; outputs are finite and shaped as the input (as the plain torch layer
  for WS convs and linear layers); every trainable parameter gets a finite, non-zero gradient;
* gradients are right: ``gradcheck`` and ``gradgradcheck`` in float64, in training and eval;
* the ``device=`` and ``dtype=`` factory arguments reach every parameter and buffer, as in
  ``torch.nn``;
* ``repr``, pickle, ``copy.deepcopy`` and ``state_dict`` round trips;
* in eval mode, a sample's output does not depend on the rest of its batch;
* an empty batch (N = 0) behaves as it does for ``nn.BatchNorm``;
* float16 and bfloat16 inputs, and ``torch.autocast``: output dtypes as the torch layer's under
  the same call, running statistics kept and accumulated in float32.

What torch does is found by running the torch layer that a normkit layer stands in for (its
"twin", see :func:`_twin`) on the same call, not written down here. Covered elsewhere, and not
repeated: channels_last and "train and eval differ" (``test_compile.py``), non-finite input
(``test_nonfinite.py``).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import normkit as nk
from normkit import kernels
from normkit.layers.batch_channel import _BatchChannelNorm
from normkit.layers.core import _BatchNormCore
from tests.layer_table import LAYERS, LayerRecord, layer_params

CASES = layer_params()
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
TRAINING = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
LOW_PRECISION = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
]
RECORDS = [pytest.param(rec, id=rec.name) for rec in LAYERS]

# BCN's micro-batch mode normalizes, in training, with estimates that the same call has just
# updated from the batch without gradient (by design: "no gradient flows through the
# estimates"). Its training gradient is therefore the derivative with the estimates held
# constant, which a finite-difference check cannot reproduce; see
# test_estimate_training_gradient_holds_the_estimates_constant.
ESTIMATES = frozenset(rec.name for rec in LAYERS if rec.init_kwargs.get("estimate", False))

_BATCH_NORMS: dict[int, Callable[[int], nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


# --------------------------------------------------------------------------------------------
# Helpers


def _is_float(a: Any) -> bool:
    return isinstance(a, Tensor) and a.is_floating_point()


def _cast(args: Sequence[Any], dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(a.to(dtype) if _is_float(a) else a for a in args)


def _build(rec: LayerRecord, dtype: torch.dtype = torch.float32, training: bool = True) -> Any:
    # ``Any``: the tests read attributes (``running_mean``, ``bake``) that only some layers have.
    return rec.build().to(dtype).train(training)


def _cotangent(out: Tensor) -> Tensor:
    # Random, not ones: the input gradient of a batch norm under sum() is exactly 0.
    g = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)


def _forward_backward(layer: nn.Module, args: Sequence[Any]) -> tuple[Tensor, list[Tensor]]:
    """Output and input gradients of one call; parameter gradients accumulate on ``layer``."""
    inputs = [a.detach().clone().requires_grad_() if _is_float(a) else a for a in args]
    out = layer(*inputs)
    out.backward(_cotangent(out))
    grads = [a.grad for a in inputs if _is_float(a)]
    assert all(g is not None for g in grads), "an input got no gradient"
    return out.detach(), grads


def _state(layer: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _assert_same_state(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} != {sorted(want)}"
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{what}: {k} is {got[k].dtype}, not {want[k].dtype}"
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs"


def _first_tensor(args: Sequence[Any]) -> Tensor:
    return next(a for a in args if isinstance(a, Tensor))


@dataclass
class Twin:
    """The torch layer whose behaviour a normkit layer follows, called on the first input.

    ``same_function``: the twin computes exactly the normkit layer's function (a WS layer's
    :meth:`bake`), so outputs can be compared, not just dtypes and shapes.
    """

    module: nn.Module
    same_function: bool

    def __call__(self, args: Sequence[Any]) -> Tensor:
        out: Tensor = self.module(_first_tensor(args))
        return out


def _twin(rec: LayerRecord, layer: Any) -> Twin | None:
    """``nn.BatchNorm{1,2,3}d`` (by input rank) for the normalization layers (SandwichAdaIN
    included), the baked plain ``nn.Conv*d`` / ``nn.Linear`` for the WS layers, and None for
    Fixup's ``Bias`` and ``Scale``: elementwise ops whose documented rule is that the output
    keeps the input's dtype (torch would promote a half input plus a float32 parameter)."""
    if isinstance(layer, (nk.Bias, nk.Scale)):
        return None
    if hasattr(layer, "bake"):
        return Twin(layer.bake(), same_function=True)
    bn = _BATCH_NORMS[len(rec.shapes[0])](rec.shapes[0][1])
    return Twin(bn.train(layer.training), same_function=False)


def _expected_shape(rec: LayerRecord, layer: Any, args: Sequence[Any]) -> torch.Size:
    """The input's shape; a WS conv or linear layer's output is shaped as its baked twin's."""
    if hasattr(layer, "bake"):
        with torch.no_grad():
            return layer.bake()(_first_tensor(args)).shape
    return _first_tensor(args).shape


def _floating_buffers(layer: nn.Module) -> dict[str, Tensor]:
    return {k: b for k, b in layer.named_buffers() if b.is_floating_point()}


# --------------------------------------------------------------------------------------------
# Forward and backward


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_forward_backward_give_finite_outputs_and_gradients(
    rec: LayerRecord, kind: str | None, dtype: torch.dtype, training: bool
) -> None:
    layer = _build(rec, dtype, training)
    args = _cast(rec.args(kind), dtype)
    out, grads = _forward_backward(layer, args)
    assert out.shape == _expected_shape(rec, layer, args)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    for a, g in zip([a for a in args if _is_float(a)], grads, strict=True):
        assert g.shape == a.shape and g.dtype == a.dtype
        assert torch.isfinite(g).all()
    for name, p in layer.named_parameters():
        if not p.requires_grad:
            # InputNorm's shift is frozen at 0 by design.
            assert p.grad is None, f"{name} is frozen but got a gradient"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.dtype == p.dtype
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        # Checked per parameter, not per entry: a domain row absent from the batch (every row
        # but INT_DOMAIN for an int index) legitimately gets zeros.
        assert p.grad.count_nonzero() > 0, f"{name} got an all-zero gradient"
    for name, b in _floating_buffers(layer).items():
        assert b.dtype == dtype and torch.isfinite(b).all(), name


# --------------------------------------------------------------------------------------------
# gradcheck and gradgradcheck


def _as_function(layer: nn.Module, args: Sequence[Any]) -> tuple[Callable[..., Tensor], tuple]:
    """``layer`` as a function of its float inputs and trainable parameters (float64).

    Every evaluation starts from the same buffers (copies): a training call updates them in
    place, and the finite differences must all see one state.
    """
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    own = dict(layer.named_parameters())
    params = tuple(own[n].detach().clone().requires_grad_() for n in names)
    buffers = {n: b.detach().clone() for n, b in layer.named_buffers()}
    slots = [i for i, a in enumerate(args) if _is_float(a)]
    tensors = tuple(args[i].detach().clone().requires_grad_() for i in slots)

    def fn(*flat: Tensor) -> Tensor:
        call = list(args)
        for i, t in zip(slots, flat[: len(slots)], strict=True):
            call[i] = t
        values: dict[str, Tensor] = dict(zip(names, flat[len(slots) :], strict=True))
        values.update({n: b.clone() for n, b in buffers.items()})
        out: Tensor = functional_call(layer, values, tuple(call))
        return out

    return fn, (*tensors, *params)


def _after_estimate_step(layer: nn.Module, args: Sequence[Any]) -> nn.Module:
    """An eval copy of a micro-batch BCN holding the estimates its training call writes."""
    stepped = copy.deepcopy(layer).train()
    with torch.no_grad():
        stepped(*args)
    return stepped.eval()


def _checked_function(
    rec: LayerRecord, kind: str | None, training: bool, eps: float | None = None
) -> tuple[Callable[..., Tensor], tuple]:
    layer = _build(rec, torch.float64, training)
    if eps is not None and isinstance(getattr(layer, "eps", None), float):
        layer.eps = eps  # a non-default eps: a path that ignores the layer's shows
    args = _cast(rec.args(kind), torch.float64)
    if training and rec.name in ESTIMATES:
        # The training gradient of these layers is the eval gradient at the updated estimates
        # (proved by test_estimate_training_gradient_holds_the_estimates_constant); that is the
        # function whose derivatives are checked.
        layer = _after_estimate_step(layer, args)
    return _as_function(layer, args)


# Fast mode checks a random projection of each Jacobian (u^T J v), which a wrong derivative
# misses only by chance; the full Jacobians of all records take minutes on one core.
def _grad_cases(attribute: str) -> list[Any]:
    """(rec, kind, training) cases; training ones only where ``rec.<attribute>`` holds."""
    out = []
    for case in CASES:
        rec, kind = case.values
        for training in TRAINING:
            if training.values[0] and not getattr(rec, attribute):
                continue
            out.append(pytest.param(rec, kind, training.values[0], id=f"{case.id}-{training.id}"))
    return out


@pytest.mark.parametrize(("rec", "kind", "training"), _grad_cases("train_gradcheck"))
def test_gradcheck(rec: LayerRecord, kind: str | None, training: bool) -> None:
    fn, inputs = _checked_function(rec, kind, training)
    assert gradcheck(fn, inputs, fast_mode=True)


# Records with double_backward=False run a custom autograd Function in training whose backward
# is not differentiable (documented on the layer); there they are checked to refuse double
# backward instead. Their eval mode is a plain affine, checked like every other record.
# BCN's estimate update runs without gradient; the all-reduce of synchronized statistics,
# whose backward is not itself differentiable, runs only across several ranks, which these
# single-process tests do not start.
@pytest.mark.parametrize(
    ("rec", "kind", "training"),
    [c for c in _grad_cases("train_gradcheck") if c.values[0].double_backward or not c.values[2]],
)
def test_gradgradcheck(rec: LayerRecord, kind: str | None, training: bool) -> None:
    fn, inputs = _checked_function(rec, kind, training)
    assert gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize(
    ("rec", "kind", "training"),
    [c for c in _grad_cases("train_gradcheck") if c.values[0].double_backward or not c.values[2]],
)
def test_first_order_gradient_is_the_same_with_create_graph(
    rec: LayerRecord, kind: str | None, training: bool
) -> None:
    # A custom backward takes another route under create_graph=True (it differentiates a
    # formula autograd can differentiate again). gradgradcheck only checks that the double
    # backward matches that route, not that the route gives the right first-order gradient:
    # here it must equal the plain backward's (a gradient penalty or MAML step uses it), at a
    # non-default eps so that a route with the default written in is caught too.
    fn, inputs = _checked_function(rec, kind, training, eps=0.25)
    out = fn(*inputs)
    cotangent = _cotangent(out)
    plain = torch.autograd.grad(out, inputs, cotangent)
    out = fn(*inputs)
    graphed = torch.autograd.grad(out, inputs, cotangent, create_graph=True)
    for i, (a, b) in enumerate(zip(plain, graphed, strict=True)):
        torch.testing.assert_close(
            b.detach(), a, rtol=1e-10, atol=1e-10, msg=lambda m, i=i: f"input {i}: {m}"
        )


@pytest.mark.parametrize(
    ("rec", "kind", "training"),
    [c for c in _grad_cases("train_gradcheck") if not c.values[0].double_backward and c.values[2]],
)
def test_layers_without_double_backward_refuse_it(
    rec: LayerRecord, kind: str | None, training: bool
) -> None:
    fn, inputs = _checked_function(rec, kind, training)
    with pytest.raises(RuntimeError):
        gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("rec", [r for r in RECORDS if r.values[0].name in ESTIMATES])
def test_estimate_training_gradient_holds_the_estimates_constant(rec: LayerRecord) -> None:
    layer = _build(rec, torch.float64, training=True)
    args = _cast(rec.args(None), torch.float64)
    stepped = _after_estimate_step(layer, args)
    out, grads = _forward_backward(layer, args)
    want, want_grads = _forward_backward(stepped, args)
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)
    for (name, p), q in zip(layer.named_parameters(), stepped.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
    # The training call wrote exactly the estimates the eval copy normalizes with.
    _assert_same_state(_state(layer), _state(stepped), "estimates")


# --------------------------------------------------------------------------------------------
# Factory arguments


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float64, id="float64"), pytest.param(torch.bfloat16, id="bf16")]
)
@pytest.mark.parametrize("rec", RECORDS)
def test_dtype_factory_argument_reaches_every_parameter_and_buffer(
    rec: LayerRecord, dtype: torch.dtype
) -> None:
    # An explicit dtype= decides the buffers' dtype as it does for torch's batch norm (the
    # float32 rule of DESIGN.md is about the *input* dtype); integer buffers stay integer.
    torch_bn = nn.BatchNorm2d(4, dtype=dtype)
    float_buffer_dtype = torch_bn.running_mean.dtype
    int_buffer_dtype = torch_bn.num_batches_tracked.dtype
    layer = rec.make(dtype=dtype)
    default = dict(rec.make().named_buffers())
    for name, p in layer.named_parameters():
        assert p.dtype == dtype, f"parameter {name} is {p.dtype}"
    for name, b in layer.named_buffers():
        if default[name].is_floating_point():
            assert b.dtype == float_buffer_dtype, f"buffer {name} is {b.dtype}"
        else:
            assert b.dtype == default[name].dtype == int_buffer_dtype, f"buffer {name}"
    if dtype == torch.float64:
        # And the layer computes in it: output and updated buffers keep the dtype.
        args = _cast(rec.args(None if not rec.takes_domain else "per_sample"), dtype)
        with torch.no_grad():
            out = layer(*args)
        assert out.dtype == dtype
        for name, b in layer.named_buffers():
            want = float_buffer_dtype if b.is_floating_point() else int_buffer_dtype
            assert b.dtype == want, f"buffer {name} became {b.dtype} in forward"


@pytest.mark.parametrize("rec", RECORDS)
def test_meta_device_factory_argument_reaches_every_parameter_and_buffer(
    rec: LayerRecord,
) -> None:
    layer = rec.make(device="meta")
    default = rec.make()
    want_dtypes = {k: v.dtype for k, v in default.state_dict().items()}
    state = layer.state_dict()
    assert state.keys() == want_dtypes.keys()
    for name, t in state.items():
        assert t.device.type == "meta", f"{name} is on {t.device}"
        assert t.dtype == want_dtypes[name], f"{name} is {t.dtype}, not {want_dtypes[name]}"
    assert all(
        p.requires_grad == q.requires_grad
        for p, q in zip(layer.parameters(), default.parameters(), strict=True)
    )


# --------------------------------------------------------------------------------------------
# repr, pickle, deepcopy, state_dict


@pytest.mark.parametrize("rec", RECORDS)
def test_repr_names_the_class(rec: LayerRecord) -> None:
    layer = rec.build()
    text = repr(layer)
    assert text.startswith(f"{type(layer).__name__}("), text
    assert str(layer) == text


def _pickle_copy(layer: nn.Module) -> nn.Module:
    copied: nn.Module = pickle.loads(pickle.dumps(layer))
    return copied


COPIERS = [
    pytest.param(_pickle_copy, id="pickle"),
    pytest.param(copy.deepcopy, id="deepcopy"),
]


def _assert_same_calls(
    layer: nn.Module, other: nn.Module, rec: LayerRecord, kind: str | None, dtype: torch.dtype
) -> None:
    """Equal outputs, input and parameter gradients and states over a training step, then an
    eval step, then another training step (the same kernels run, so equality is exact)."""
    for step, training in enumerate((True, False, True)):
        where = f"step {step} ({'train' if training else 'eval'})"
        layer.train(training)
        other.train(training)
        args = _cast(rec.args(kind, seed=step), dtype)
        out, grads = _forward_backward(layer, args)
        got, got_grads = _forward_backward(other, args)
        assert torch.equal(got, out), f"{where}: outputs differ"
        for g, w in zip(got_grads, grads, strict=True):
            assert torch.equal(g, w), f"{where}: input gradients differ"
        for (name, p), q in zip(other.named_parameters(), layer.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), f"{where}: {name}.grad"
            if q.grad is not None:
                assert torch.equal(p.grad, q.grad), f"{where}: {name}.grad differs"
        _assert_same_state(_state(other), _state(layer), where)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_copy_round_trip_keeps_state_and_outputs(
    rec: LayerRecord, kind: str | None, copier: Callable[[nn.Module], nn.Module], dtype: torch.dtype
) -> None:
    layer = _build(rec, dtype, training=False)
    with torch.no_grad():
        layer(*_cast(rec.args(kind), dtype))  # fills the eval caches (WS), which must not travel
    other = copier(layer)
    assert other is not layer and type(other) is type(layer)
    assert repr(other) == repr(layer)
    assert other.training == layer.training
    _assert_same_state(_state(other), _state(layer), "after copy")
    for (name, p), q in zip(other.named_parameters(), layer.parameters(), strict=True):
        assert p.requires_grad == q.requires_grad, name
        assert p.data_ptr() != q.data_ptr(), f"{name} shares storage with the original"
    _assert_same_calls(layer, other, rec, kind, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_state_dict_loads_strictly_into_a_fresh_layer(
    rec: LayerRecord, kind: str | None, dtype: torch.dtype
) -> None:
    layer = _build(rec, dtype)
    fresh = rec.make(dtype=dtype)
    before = _state(fresh)
    # Not vacuous: the built layer differs from a default one.
    assert any(not torch.equal(before[k], v) for k, v in _state(layer).items())
    result = fresh.load_state_dict(layer.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(_state(fresh), _state(layer), "after load")
    _assert_same_calls(layer, fresh, rec, kind, dtype)


# --------------------------------------------------------------------------------------------
# Eval: one sample at a time


def _sample(rec: LayerRecord, args: Sequence[Any], i: int) -> tuple[Any, ...]:
    """The arguments of sample ``i`` alone: batched tensors (the domain tensor included) are
    sliced; an int domain and a style batch of 1 that broadcasts are kept."""
    return tuple(
        a[i : i + 1] if isinstance(a, Tensor) and a.shape[0] == rec.batch else a for a in args
    )


# Every stateless layer of normkit computes each sample alone (SandwichAdaIN's statistics are
# per sample; WS layers, Bias and Scale have none), so all records are checked.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_eval_output_of_a_sample_does_not_depend_on_its_batch(
    rec: LayerRecord, kind: str | None, dtype: torch.dtype
) -> None:
    layer = _build(rec, dtype, training=False)
    args = _cast(rec.args(kind), dtype)
    with torch.no_grad():
        out = layer(*args)
        for i in range(rec.batch):
            alone = layer(*_sample(rec, args, i))
            torch.testing.assert_close(alone, out[i : i + 1], msg=lambda m, i=i: f"sample {i}: {m}")
    assert not layer.training


# --------------------------------------------------------------------------------------------
# Empty batch


def _grads_of(module: nn.Module) -> dict[str, Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_empty_batch_behaves_like_torch(rec: LayerRecord, kind: str | None, training: bool) -> None:
    layer = _build(rec, training=training)
    args = rec.args(kind, batch=0)
    before = _state(layer)

    # What torch does with the same call (found by running it, not assumed).
    twin = _twin(rec, layer)
    if twin is not None:
        twin_before = _state(twin.module)
        x = _first_tensor(args).detach().clone().requires_grad_()
        twin_out = twin([x])
        twin_out.backward(_cotangent(twin_out))
        want_shape = twin_out.shape
        twin_stats_changed = any(
            not torch.equal(b, twin_before[k]) for k, b in _floating_buffers(twin.module).items()
        )
        assert x.grad is not None and x.grad.shape == x.shape
        twin_param_grads_zero = all(
            g is not None and g.count_nonzero() == 0 for g in _grads_of(twin.module).values()
        )
    else:  # an elementwise op: an empty tensor in, an empty tensor of the same shape out
        want_shape = _first_tensor(args).shape
        twin_stats_changed = False
        twin_param_grads_zero = True

    out, grads = _forward_backward(layer, args)
    assert out.shape == want_shape
    for a, g in zip([a for a in args if _is_float(a)], grads, strict=True):
        assert g.shape == a.shape
    after = _state(layer)
    stats_changed = any(
        not torch.equal(after[k], before[k]) for k in before if before[k].is_floating_point()
    )
    assert stats_changed == twin_stats_changed, "running statistics changed unlike torch's"
    # torch's _BatchNorm adds 1 to num_batches_tracked even for an empty batch (its Python
    # forward counts before the kernel sees the batch), which would skew a later cumulative
    # average (momentum=None). normkit counts only batches that update the statistics, as it
    # already does for a domain absent from the batch: the counters stay.
    for k in before:
        if not before[k].is_floating_point():
            assert torch.equal(after[k], before[k]), f"{k} changed on an empty batch"
    # torch's layer gets zero (not missing, not NaN) parameter gradients: nothing to learn.
    assert twin_param_grads_zero
    for name, g in _grads_of(layer).items():
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all() and g.count_nonzero() == 0, f"{name}.grad = {g}"


# --------------------------------------------------------------------------------------------
# Half precision and autocast


def _representable(args: Sequence[Any], dtype: torch.dtype) -> tuple[Any, ...]:
    """float32 inputs whose values ``dtype`` holds exactly, so that a float32 run and a
    ``dtype`` run see the very same numbers and differ only in their arithmetic."""
    return _cast(_cast(args, dtype), torch.float32)


def _assert_statistics_match_float32(layer: nn.Module, reference: nn.Module) -> None:
    """Running buffers stay float32 and equal the float32 run's to float32 rounding.

    Both runs see the same values (see :func:`_representable`), so statistics accumulated in
    float32 agree to a few float32 ulps: torch.testing's float32 tolerances (rtol 1.3e-6,
    atol 1e-5). One rounding of a statistic to bfloat16 (8 significant bits, relative error up
    to 2^-9 = 2e-3) or float16 (2^-12 = 2.4e-4) moves a buffer by far more, even after the
    momentum of 0.1 scales the batch statistic's share.
    """
    want = dict(reference.named_buffers())
    for name, b in layer.named_buffers():
        if not want[name].is_floating_point():
            assert torch.equal(b, want[name]), name
            continue
        assert b.dtype == torch.float32, f"buffer {name} became {b.dtype}"
        torch.testing.assert_close(b, want[name], msg=lambda m, name=name: f"buffer {name}: {m}")


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_half_precision_input(
    rec: LayerRecord, kind: str | None, dtype: torch.dtype, training: bool
) -> None:
    layer = _build(rec, training=training)  # float32 parameters and buffers
    reference = copy.deepcopy(layer)
    args32 = _representable(rec.args(kind), dtype)
    args = _cast(args32, dtype)
    twin = _twin(rec, layer)
    want_dtype = dtype
    if twin is not None:
        try:
            with torch.no_grad():
                want_dtype = twin(args).dtype
        except (RuntimeError, TypeError, ValueError):
            # torch's conv and linear refuse a half input with float32 weights; so must WS.
            with pytest.raises((RuntimeError, TypeError, ValueError)):
                layer(*args)
            return
    with torch.no_grad():
        reference(*args32)
        out = layer(*args)
    assert out.dtype == want_dtype
    assert torch.isfinite(out).all()
    _assert_statistics_match_float32(layer, reference)


@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_bfloat16_autocast(rec: LayerRecord, kind: str | None, training: bool) -> None:
    layer = _build(rec, training=training)
    reference = copy.deepcopy(layer)
    args = _representable(rec.args(kind), torch.bfloat16)  # float32, as autocast code feeds
    twin = _twin(rec, layer)
    with torch.no_grad():
        want = reference(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(*args)
            twin_out = twin(args) if twin is not None else None
    want_dtype = twin_out.dtype if twin_out is not None else args[0].dtype
    assert out.dtype == want_dtype
    assert torch.isfinite(out).all()
    _assert_statistics_match_float32(layer, reference)
    if out.dtype == torch.float32:
        # Where torch keeps float32 under autocast (a batch norm), nothing in the layer may
        # round to bfloat16 either: the output is the float32 run's.
        torch.testing.assert_close(out, want)
    else:
        # A WS conv runs its conv in bfloat16, as its baked twin does: the same function, in
        # the same precision (torch.testing's bfloat16 tolerances).
        assert twin is not None and twin.same_function and twin_out is not None
        torch.testing.assert_close(out, twin_out)


# Layers of the batch-norm core and BCN: track_running_stats set to False on a built layer.
TOGGLE_CASES = layer_params(
    r for r in LAYERS if issubclass(r.cls, (_BatchNormCore, _BatchChannelNorm))
)


@pytest.mark.parametrize("path", ["reference", "fast", "kernels"])
@pytest.mark.parametrize(("rec", "kind"), TOGGLE_CASES)
def test_track_running_stats_turned_off_on_a_built_layer_freezes_the_buffers(
    rec: LayerRecord, kind: str | None, path: str
) -> None:
    """As ``nn.BatchNorm`` (which passes no buffers to the update then): training normalizes
    with batch statistics, as the layer without buffers does, and changes no buffer and no
    count; eval keeps using the (kept) running statistics. BCN's micro-batch mode normalizes
    with its frozen estimates, as in eval."""
    layer = rec.build()
    original = copy.deepcopy(layer)
    layer.track_running_stats = False
    layer.fast = path != "reference"
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    args = rec.args(kind)
    layer.train()
    if path == "kernels":
        kernels.enable()
    try:
        out = layer(*args)
        out.sum().backward()
    finally:
        kernels.disable()
    for name, b in layer.named_buffers():
        assert torch.equal(b, buffers[name]), name
    reference = copy.deepcopy(original)
    reference.fast = False
    if getattr(layer, "estimate", False):
        reference.eval()  # the estimates as they are
    else:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(reference, name, None)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(*args))
        torch.testing.assert_close(layer.eval()(*args), original.eval()(*args))


# The other layers that keep running statistics and take the flag: their training output never
# reads the buffers, so clearing the flag may only stop the update.
OTHER_TRACKING = layer_params(
    r
    for r in LAYERS
    if issubclass(r.cls, (nk.BatchGroupNorm2d, nk.IterNorm1d, nk.IterNorm2d, nk.EvoNormB0))
    and r.init_kwargs.get("track_running_stats", True)
)


@pytest.mark.parametrize(("rec", "kind"), OTHER_TRACKING)
def test_track_running_stats_turned_off_stops_the_other_layers_updates(
    rec: LayerRecord, kind: str | None
) -> None:
    layer = rec.build().train()
    original = copy.deepcopy(layer)
    layer.track_running_stats = False
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    args = rec.args(kind)
    out = layer(*args)
    for name, b in layer.named_buffers():
        assert torch.equal(b, buffers[name]), name
    with torch.no_grad():
        torch.testing.assert_close(out, original(*args))  # batch statistics, as before
