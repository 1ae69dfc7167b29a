"""Every layer, and whole models, on every device under test against float64 runs on the CPU.

The devices are those of ``tests/devices.py``: the CPU, and CUDA where it is available (or those
named in ``$NORMKIT_TEST_DEVICES``). CI has no GPU, so there these tests check float32 on the CPU
against float64 on the CPU; on a GPU machine the same tests check CUDA (run them there with
``benchmarks/device_check.sh``). For each layer-table configuration, in training and in eval, and
for 4D inputs in both memory formats:

* float32 on the device (TF32 off) matches the float64 CPU run: output, the gradient of every
  input and parameter, and every buffer after the call;
* on an accelerator, float64 on the device matches the float64 CPU run to 1e-10: the same
  function, not just a close one;
* the output keeps the input's memory format, as ``nn.BatchNorm2d`` does.

For models (ResNet-20 with batch norm, Fixup, SaBN, micro-batch BCN, MABN): one training step's
loss and gradients, the buffers after it, then the eval output, against float64 on the CPU. And
under ``torch.autocast`` on the device in bfloat16, a training call keeps the running statistics
in float32 and gives what the float32 call gives within bfloat16's rounding.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit as nk
from normkit.models import resnet20
from tests.devices import ACCELERATORS, DEVICES, place
from tests.layer_table import LayerRecord, layer_params

CASES = layer_params()
TRAINING = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
F32, F64 = torch.float32, torch.float64

# float32 on every device; float64 too on an accelerator (on the CPU it would be the reference).
PRECISIONS = [pytest.param(d, F32, id=f"{d}-float32") for d in DEVICES] + [
    pytest.param(d, F64, id=f"{d}-float64") for d in ACCELERATORS
]
FORMATS = [
    pytest.param(torch.contiguous_format, id="contiguous"),
    pytest.param(torch.channels_last, id="channels_last"),
]

# How far a run may be from the float64 reference, relative to the largest entry of the tensor
# compared (normalized outputs and their gradients are O(1) to O(10) here). float32: a handful of
# reductions over at most a few hundred values, each off by a few ulps (2^-23 = 1.2e-7), through
# a rsqrt that at most doubles a relative error; whitening layers (IterNorm's Newton steps) and
# 20-layer models compound more. float64: the 1e-10 of the fast-path equivalence tests.
LAYER_TOL = {F32: 1e-4, F64: 1e-10}
MODEL_TOL = {F32: 1e-3, F64: 1e-10}


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    # TF32 convolutions and matmuls (the CUDA default for cuDNN convolutions on Ampere and
    # later) round inputs to 10 bits: these tests check the layers' arithmetic, not TF32's.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _is_float(a: Any) -> bool:
    return isinstance(a, Tensor) and a.is_floating_point()


def _cotangent(shape: torch.Size) -> Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(shape, generator=g, dtype=F64)


def _assert_close(got: Tensor, want: Tensor, tol: float, what: str) -> None:
    """``got`` (any device and dtype) within ``tol`` of ``want`` (float64 CPU), relative to the
    largest entry of ``want``."""
    got = got.detach().to("cpu", F64)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _assert_same_state(got: nn.Module, want: nn.Module, tol: float, where: str) -> None:
    for (name, p), q in zip(got.named_parameters(), want.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), f"{where}: {name}.grad presence differs"
        if q.grad is not None:
            assert p.grad is not None
            _assert_close(p.grad, q.grad, tol, f"{where}: {name}.grad")
    for (name, b), c in zip(got.named_buffers(), want.buffers(), strict=True):
        if c.is_floating_point():
            _assert_close(b, c, tol, f"{where}: buffer {name}")
        else:
            assert torch.equal(b.cpu(), c), f"{where}: buffer {name} is {b}, expected {c}"


def _forward_backward(layer: nn.Module, args: Sequence[Any]) -> tuple[Tensor, list[Tensor]]:
    inputs = [a.detach().clone().requires_grad_() if _is_float(a) else a for a in args]
    out = layer(*inputs)
    out.backward(_cotangent(out.shape).to(device=out.device, dtype=out.dtype))
    grads = [a.grad for a in inputs if _is_float(a)]
    assert all(g is not None for g in grads), "an input got no gradient"
    return out, grads  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize("training", TRAINING)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_layer_matches_float64_on_cpu(
    rec: LayerRecord,
    kind: str | None,
    training: bool,
    device: str,
    dtype: torch.dtype,
    fmt: torch.memory_format,
) -> None:
    if fmt == torch.channels_last and not rec.is_4d:
        # No channels_last for 2D, 3D or 5D inputs: nothing different to run.
        fmt = torch.contiguous_format
    reference = rec.build().to(F64).train(training)
    layer = rec.build().to(device=device, dtype=dtype).train(training)
    args = rec.args(kind)
    want, want_grads = _forward_backward(reference, place(args, "cpu", F64, fmt))
    out, grads = _forward_backward(layer, place(args, device, dtype, fmt))
    assert out.device.type == torch.device(device).type
    assert out.dtype == dtype
    if fmt == torch.channels_last and out.dim() == 4:
        assert out.is_contiguous(memory_format=torch.channels_last), f"strides {out.stride()}"
    tol = LAYER_TOL[dtype]
    _assert_close(out, want, tol, "output")
    for i, (g, w) in enumerate(zip(grads, want_grads, strict=True)):
        _assert_close(g, w, tol, f"gradient of input {i}")
    _assert_same_state(layer, reference, tol, "after the call")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rec", "kind"), CASES)
def test_bfloat16_autocast_on_device_keeps_float32_statistics(
    rec: LayerRecord, kind: str | None, device: str
) -> None:
    layer = rec.build().to(device).train()
    reference = copy.deepcopy(layer)
    # Inputs that bfloat16 holds exactly: both runs see the very same numbers.
    args = place(rec.args(kind), device, torch.bfloat16, torch.contiguous_format)
    args = place(args, device, F32, torch.contiguous_format)
    with torch.no_grad():
        want = reference(*args)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = layer(*args)
    assert torch.isfinite(out).all()
    # bfloat16 keeps 8 significant bits: one rounding is off by up to 2^-9 relative; a conv
    # in bfloat16 sums rounded products. 2e-2 of the largest entry bounds both.
    _assert_close(out.float(), want.detach().to("cpu", F64), 2e-2, "output under autocast")
    for (name, b), c in zip(layer.named_buffers(), reference.buffers(), strict=True):
        assert b.dtype == c.dtype, f"buffer {name} became {b.dtype}"
        if b.is_floating_point():
            # The statistics are accumulated in float32 from the float32 input: float32's
            # rounding, not bfloat16's.
            torch.testing.assert_close(b, c, msg=lambda m, name=name: f"buffer {name}: {m}")


# --------------------------------------------------------------------------------------------
# Models

NUM_DOMAINS = 3


def _convert(to: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = resnet20(num_classes=10)
        nk.convert_norm(model, to, **kwargs)
        return model

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bn": resnet20,
    "fixup": lambda: resnet20(fixup=True),
    "sabn": _convert("sabn", num_domains=NUM_DOMAINS),
    "bcn-micro": _convert("bcn-micro", num_groups=4),
    "mabn": _convert("mabn"),
}


def _perturbed(name: str) -> nn.Module:
    """The model with every parameter and floating buffer moved from its init (Fixup's zero
    convs and unit scales, BN's ones and zeros), so that every path carries a gradient."""
    torch.manual_seed(0)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for bname, b in model.named_buffers():
            if b.is_floating_point() and bname.endswith("var"):
                b.copy_(torch.empty(b.shape, dtype=b.dtype).uniform_(0.5, 2.0, generator=g))
    return model


def _step(model: nn.Module, x: Tensor, y: Tensor, domain: Tensor) -> Tensor:
    model.train()
    with _conditioned(model, domain):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def _eval(model: nn.Module, x: Tensor, domain: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad(), _conditioned(model, domain):
        out: Tensor = model(x)
    return out


def _conditioned(model: nn.Module, domain: Tensor) -> contextlib.AbstractContextManager[Any]:
    """The domain index passed to the model's conditional layers, if it has any."""
    if nk.conditional_layers(model):
        return nk.condition(model, domain)
    return contextlib.nullcontext()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_step_matches_float64_on_cpu(
    name: str, device: str, dtype: torch.dtype, fmt: torch.memory_format
) -> None:
    g = torch.Generator().manual_seed(2)
    x = 2.0 * torch.randn(4, 3, 8, 8, generator=g) + 0.5
    y = torch.randint(0, 10, (4,), generator=g)
    domain = torch.tensor([0, 2, 1, 2])
    reference = _perturbed(name).to(F64)
    model = _perturbed(name).to(device=device, dtype=dtype, memory_format=fmt)  # type: ignore[call-overload]
    tol = MODEL_TOL[dtype]

    want = _step(reference, x.to(F64), y, domain)
    got = _step(model, place([x], device, dtype, fmt)[0], y.to(device), domain.to(device))
    _assert_close(got, want, tol, "loss")
    _assert_same_state(model, reference, tol, "after a training step")

    want_out = _eval(reference, x.to(F64), domain)
    out = _eval(model, place([x], device, dtype, fmt)[0], domain.to(device))
    _assert_close(out, want_out, tol, "eval output")
