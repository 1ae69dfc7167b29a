"""Every public layer is ready for compiled and functional training code.

* ``torch.compile(fullgraph=True)`` traces each layer whole (a graph break is an error) and the
  compiled layer matches eager over training and eval steps: outputs, input and parameter
  gradients, and buffers, with an SGD step between calls so that a graph holding stale weights
  or statistics would be caught. The eager backend runs for every layer; inductor, which
  functionalizes the buffer updates and generates C++ (or, on CUDA, Triton) kernels, for SaBN,
  BCN and WSConv2d, on every device of `tests/devices.py`.
* channels_last input gives channels_last output and gradients equal to those of contiguous input.
* ``torch.func.functional_call`` runs the layer on replacement parameters and buffers (gradients
  reach the replacements, running statistics update the replacements, the layer is untouched);
  ``torch.func.grad`` of such a call equals the autograd gradient.
* Forward-mode AD (``torch.autograd.forward_ad``, tangents on the inputs and the parameters)
  gives the Jacobian-vector product that reverse mode transposes, ``<g, J t> = <J^T g, t>``,
  and leaves no tangent in a running buffer. (MABN refuses it in training, by name.)
* ``create_graph=True`` leaves first-order gradients unchanged, for the layer applied twice
  (its second input then depends on its own parameters: a custom function's double-backward
  path must not follow that dependency itself).

The layers come from ``tests/layer_table.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.func import functional_call

import normkit as nk
from tests.devices import DEVICES, place
from tests.layer_table import BY_NAME, LAYERS, LayerRecord, layer_params, public_layer_classes

# Train twice (buffers move, and the second step reads what the first wrote), then eval twice
# with an SGD step in between (a compiled eval graph must read the new weights, not constants).
STEPS = (True, True, False, False)
LR = 0.1


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # Layers of one class share their forward's code object, whose compiled entries would pile
    # up across tests towards the recompile limit; each test starts from an empty cache.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _is_float(a: Any) -> bool:
    return isinstance(a, Tensor) and a.is_floating_point()


def _cotangent(out: Tensor) -> Tensor:
    # Not all ones: a uniform upstream gradient is orthogonal to much of a normalization's
    # Jacobian (the input gradient of a batch norm under sum() is exactly 0).
    g = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)


def _forward_backward(layer: nn.Module, args: Sequence[Any]) -> tuple[Tensor, list[Tensor]]:
    """Output and input gradients of one call; parameter gradients accumulate on ``layer``."""
    inputs = [a.detach().clone().requires_grad_() if _is_float(a) else a for a in args]
    out = layer(*inputs)
    out.backward(_cotangent(out))
    grads = [a.grad for a in inputs if _is_float(a)]
    assert all(g is not None for g in grads)
    return out.detach(), grads


def _sgd_step_(layer: nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            if p.grad is not None:
                p.sub_(LR * p.grad)
                p.grad = None


def _assert_close(got: Tensor, want: Tensor, what: str, tol: str = "default") -> None:
    """``tol``: ``"exact"`` (the eager backend runs the very same kernels), ``"scaled"`` (inductor
    fuses and reorders reductions, so float32 rounding differs by a few ulps of the tensor's
    largest entries) or ``"default"`` (``torch.testing`` defaults)."""
    if tol == "exact":
        kw = {"rtol": 0.0, "atol": 0.0}
    elif tol == "scaled":
        kw = {"rtol": 1.3e-6, "atol": 1e-5 * max(1.0, want.abs().max().item())}
    else:
        kw = {}
    torch.testing.assert_close(got, want, **kw, msg=lambda m: f"{what}: {m}")


def _assert_same_state(got: nn.Module, want: nn.Module, where: str, tol: str = "default") -> None:
    for (name, p), q in zip(got.named_parameters(), want.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, f"{where}: {name} has a gradient, eager has none"
        else:
            assert p.grad is not None, f"{where}: {name} has no gradient, eager has one"
            _assert_close(p.grad, q.grad, f"{where}: {name}.grad", tol)
    for (name, b), c in zip(got.named_buffers(), want.buffers(), strict=True):
        _assert_close(b, c, f"{where}: buffer {name}", tol)


def _assert_compiled_matches_eager(
    rec: LayerRecord, kind: str | None, backend: str, tol: str, device: str = "cpu"
) -> None:
    layer = rec.build().to(device)
    eager = copy.deepcopy(layer)
    if tol == "exact" and hasattr(eager, "fast"):
        # Traced code takes the reference path (normkit._fused.fast_paths_apply); the exact
        # comparison is with the same path run eagerly. The inductor test compares with the
        # eager fast path.
        eager.fast = False
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for step, training in enumerate(STEPS):
        where = f"step {step} ({'train' if training else 'eval'})"
        layer.train(training)
        eager.train(training)
        args = place(rec.args(kind, seed=step), device)
        out, grads = _forward_backward(compiled, args)
        want_out, want_grads = _forward_backward(eager, args)
        _assert_close(out, want_out, f"{where}: output", tol)
        for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
            _assert_close(g, w, f"{where}: grad of input {i}", tol)
        _assert_same_state(layer, eager, where, tol)
        _sgd_step_(layer)
        _sgd_step_(eager)
    # At most one graph per mode: nothing in forward (a counter, a cumulative factor, an index)
    # is guarded on by value, which would recompile at every step.
    assert counter.frame_count <= 2, f"compiled {counter.frame_count} times over {len(STEPS)} steps"


def test_every_public_layer_has_a_record() -> None:
    covered = {rec.cls for rec in LAYERS}
    missing = public_layer_classes() - covered
    assert not missing, (
        f"add records to tests/layer_table.py for {sorted(c.__name__ for c in missing)}"
    )


@pytest.mark.parametrize(("rec", "kind"), layer_params(kinds=["per_sample"]))
def test_record_says_whether_train_and_eval_differ(rec: LayerRecord, kind: str | None) -> None:
    layer = rec.build()
    args = rec.args(kind)
    with torch.no_grad():
        eval_out = copy.deepcopy(layer).eval()(*args)
        train_out = copy.deepcopy(layer).train()(*args)
    assert torch.equal(train_out, eval_out) != rec.train_eval_differ


@pytest.mark.parametrize(("rec", "kind"), layer_params())
def test_fullgraph_eager_backend_matches_eager(rec: LayerRecord, kind: str | None) -> None:
    _assert_compiled_matches_eager(rec, kind, "eager", "exact")


INDUCTOR_CASES = [
    pytest.param(BY_NAME["sabn2d"], "per_sample", id="sabn2d-per_sample"),
    pytest.param(BY_NAME["bcn2d"], None, id="bcn2d"),
    # The micro-batch estimates are updated in place and then used: inductor once recomputed
    # them from the mutated buffers in backward (wrong gradients); see _stats.estimate_update_.
    pytest.param(BY_NAME["bcn2d-estimate"], None, id="bcn2d-estimate"),
    pytest.param(BY_NAME["wsconv2d"], None, id="wsconv2d"),
]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rec", "kind"), INDUCTOR_CASES)
def test_fullgraph_inductor_matches_eager(rec: LayerRecord, kind: str | None, device: str) -> None:
    _assert_compiled_matches_eager(rec, kind, "inductor", "scaled", device)


def _channels_last(a: Any) -> Any:
    return a.contiguous(memory_format=torch.channels_last) if _is_float(a) else a


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("rec", "kind"), layer_params([r for r in LAYERS if r.is_4d]))
def test_channels_last_input_keeps_format_and_matches_contiguous(
    rec: LayerRecord, kind: str | None, training: bool
) -> None:
    layer = rec.build().train(training)
    reference = copy.deepcopy(layer)
    args = rec.args(kind)
    out, grads = _forward_backward(layer, [_channels_last(a) for a in args])
    want_out, want_grads = _forward_backward(reference, args)
    assert out.is_contiguous(memory_format=torch.channels_last), f"output strides {out.stride()}"
    torch.testing.assert_close(out, want_out)
    for g, w in zip(grads, want_grads, strict=True):
        assert g.is_contiguous(memory_format=torch.channels_last), f"grad strides {g.stride()}"
        torch.testing.assert_close(g, w)
    _assert_same_state(layer, reference, "channels_last")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("rec", "kind"), layer_params())
def test_functional_call_uses_replacement_parameters_and_buffers(
    rec: LayerRecord, kind: str | None, training: bool
) -> None:
    layer = rec.build(seed=0).train(training)
    # ``donor`` holds the replacement values and computes the expected result the plain way.
    donor = rec.build(seed=1).train(training)
    args = rec.args(kind)
    own_out = None
    if not training:
        with torch.no_grad():
            # A plain call first, so that a layer with an eval cache (WS) holds one.
            own_out = layer(*args)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    params = {
        k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in donor.named_parameters()
    }
    buffers = {k: v.clone() for k, v in donor.named_buffers()}

    if not training:
        # Without grad mode, where an eval cache of the layer's own weights would be used.
        with torch.no_grad():
            got = functional_call(layer, {**params, **buffers}, args)
            torch.testing.assert_close(got, donor(*args))
    out = functional_call(layer, {**params, **buffers}, args)
    want = donor(*args)
    torch.testing.assert_close(out, want)
    cot = _cotangent(out)
    trainable = [k for k, p in params.items() if p.requires_grad]
    if trainable:  # FrozenBatchNorm2d has none, by design (everything is a buffer)
        grads = torch.autograd.grad(out, [params[k] for k in trainable], cot)
        donor_params = dict(donor.named_parameters())
        want_grads = torch.autograd.grad(want, [donor_params[k] for k in trainable], cot)
        for k, g, w in zip(trainable, grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, msg=lambda m, k=k: f"grad of {k}: {m}")
    for k, b in donor.named_buffers():
        torch.testing.assert_close(buffers[k], b, msg=lambda m, k=k: f"buffer {k}: {m}")

    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"functional_call changed the layer's own {k}"
    assert all(p.grad is None for p in layer.parameters())
    if own_out is not None:
        # Nothing of the replacements stays behind (a cache keyed on them, say).
        with torch.no_grad():
            torch.testing.assert_close(layer(*args), own_out)


# A layer without trainable parameters (FrozenBatchNorm2d, all buffers by design) gives
# torch.func.grad nothing to differentiate; test_functional_call_... covers its buffers.
WITH_PARAMETERS = [r for r in LAYERS if any(p.requires_grad for p in r.make().parameters())]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("rec", "kind"), layer_params(WITH_PARAMETERS))
def test_func_grad_of_functional_call_matches_autograd(
    rec: LayerRecord, kind: str | None, training: bool
) -> None:
    layer = rec.build().train(training)
    reference = copy.deepcopy(layer)
    args = rec.args(kind)
    params = {k: v.detach().clone() for k, v in layer.named_parameters() if v.requires_grad}
    # Buffers are arguments of the transformed function, not captured tensors: torch.func
    # forbids in-place updates of captured tensors (torch's own BatchNorm included).
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def loss(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        out = functional_call(layer, {**p, **b}, args)
        return (out * _cotangent(out)).sum()

    grads = torch.func.grad(loss)(params, buffers)
    out = reference(*args)
    (out * _cotangent(out)).sum().backward()
    for k, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[k], p.grad, msg=lambda m, k=k: f"grad of {k}: {m}")
    for k, b in reference.named_buffers():
        torch.testing.assert_close(buffers[k], b, msg=lambda m, k=k: f"buffer {k}: {m}")


def assert_forward_ad_matches_reverse(layer: nn.Module, args: Sequence[Any]) -> None:
    """One forward-mode call of ``layer`` (float64) with random tangents on its float inputs and
    trainable parameters: its output tangent ``J t`` satisfies ``<g, J t> = <J^T g, t>`` against
    reverse mode from the same state, and no running buffer holds a tangent afterwards (one
    that did would leak this batch's derivative into the next forward's statistics)."""
    reverse = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(11)

    def tangent(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    arg_tangents = [tangent(a) if _is_float(a) else None for a in args]
    params = {k: p.detach() for k, p in layer.named_parameters() if p.requires_grad}
    param_tangents = {k: tangent(p) for k, p in params.items()}
    with fwAD.dual_level():
        duals = [a if t is None else fwAD.make_dual(a, t) for a, t in zip(args, arg_tangents)]
        dual_params = {k: fwAD.make_dual(p, param_tangents[k]) for k, p in params.items()}
        primal, jvp = fwAD.unpack_dual(functional_call(layer, dual_params, tuple(duals)))
        carrying = [k for k, b in layer.named_buffers() if fwAD.unpack_dual(b).tangent is not None]
    assert not carrying, f"buffers left holding a tangent: {carrying}"
    assert jvp is not None
    inputs = [a.detach().clone().requires_grad_() if _is_float(a) else a for a in args]
    out = reverse(*inputs)
    torch.testing.assert_close(primal, out.detach(), rtol=1e-12, atol=1e-12)
    g = _cotangent(out)
    leaves = [a for a in inputs if _is_float(a)]
    leaves += [p for p in reverse.parameters() if p.requires_grad]
    tangents = [t for t in arg_tangents if t is not None] + list(param_tangents.values())
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    terms = [(d * t).sum() for d, t in zip(grads, tangents, strict=True) if d is not None]
    want = torch.stack(terms).sum()
    scale = torch.stack(terms).abs().sum().item()
    torch.testing.assert_close((g * jvp).sum(), want, rtol=0.0, atol=1e-11 * max(scale, 1.0))


def _float64_case(rec: LayerRecord, kind: str | None, training: bool) -> tuple[nn.Module, tuple]:
    layer = rec.build().double().train(training)
    args = tuple(a.double() if _is_float(a) else a for a in rec.args(kind))
    return layer, args


FORWARD_AD_CASES = [
    *(
        pytest.param(*p.values, True, id=f"{p.id}-train")
        for p in layer_params()
        if p.values[0].cls is not nk.MovingAverageBatchNorm2d
    ),
    *(pytest.param(*p.values, False, id=f"{p.id}-eval") for p in layer_params()),
]


@pytest.mark.parametrize(("rec", "kind", "training"), FORWARD_AD_CASES)
def test_forward_mode_ad_matches_reverse_mode(
    rec: LayerRecord, kind: str | None, training: bool
) -> None:
    # The fused paths (and the kernels, tests/test_kernels.py) step aside inside a dual level:
    # their custom functions have no jvp rule, the reference path's operators do.
    assert_forward_ad_matches_reverse(*_float64_case(rec, kind, training))


@pytest.mark.parametrize("rec", [r for r in LAYERS if r.cls is nk.MovingAverageBatchNorm2d])
def test_mabn_refuses_forward_mode_ad_in_training_by_name(rec: LayerRecord) -> None:
    layer, (x,) = _float64_case(rec, None, True)
    with fwAD.dual_level():
        layer(x)  # an open level alone is no reason to refuse: nothing carries a tangent
        with pytest.raises(NotImplementedError, match="MovingAverageBatchNorm2d: forward-mode"):
            layer(fwAD.make_dual(x, torch.ones_like(x)))


def first_order_grads_with_and_without_create_graph(
    layer: nn.Module, args: Sequence[Any]
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """The gradients of the input and every trainable parameter of ``layer`` applied twice
    (``layer(layer(x, *rest), *rest)``, from the same state each time), with ``create_graph``
    off and on."""
    x, rest = args[0], args[1:]
    results = []
    for create_graph in (False, True):
        twin = copy.deepcopy(layer)
        xi = x.detach().clone().requires_grad_()
        out = twin(twin(xi, *rest), *rest)
        leaves = [xi, *(p for p in twin.parameters() if p.requires_grad)]
        grads = torch.autograd.grad(
            (out * _cotangent(out)).sum(), leaves, create_graph=create_graph, allow_unused=True
        )
        results.append(list(grads))
    return results[0], results[1]


def assert_create_graph_changes_no_gradient(layer: nn.Module, args: Sequence[Any]) -> None:
    plain, graphed = first_order_grads_with_and_without_create_graph(layer, args)
    for i, (g, h) in enumerate(zip(plain, graphed, strict=True)):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(
                h, g, rtol=1e-10, atol=1e-10, msg=lambda m, i=i: f"leaf {i}: {m}"
            )


def _keeps_shape(rec: LayerRecord) -> bool:
    return rec.double_backward and rec.cls not in (
        nk.WSConv1d,
        nk.WSConv2d,
        nk.WSConv3d,
        nk.WSLinear,
        nk.ScaledWSConv2d,
        nk.CenConv2d,
    )


@pytest.mark.parametrize(("rec", "kind"), layer_params([r for r in LAYERS if _keeps_shape(r)]))
def test_create_graph_changes_no_first_order_gradient(rec: LayerRecord, kind: str | None) -> None:
    layer, args = _float64_case(rec, kind, True)
    assert_create_graph_changes_no_gradient(layer, args)
