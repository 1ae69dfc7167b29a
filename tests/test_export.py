"""Every public layer exports to ONNX in eval mode, runs in onnxruntime and matches PyTorch.

The exporter is ``torch.onnx.export(..., dynamo=True)``, torch's default since 2.9 (the
TorchScript exporter is deprecated). The batch dimension is exported dynamic and the model is run
at the export batch size and at another one. A conditional layer is exported twice: with the
per-sample domain as a graph input (run with other indices than at export, so a domain baked in
as a constant is caught), and with an int domain baked in. The layers come from
``tests/layer_table.py``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

from tests.layer_table import LayerRecord, layer_params

ATOL = RTOL = 1e-5

# torch names one shared dynamic dimension once and warns about each other input that uses it.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def _build_onnx_registry_once() -> Iterator[None]:
    # torch.onnx.export rebuilds its operator registry from onnxscript's torchlib on every call
    # (about 1 s, most of the export of a small layer); the registry is only read, so one is
    # built per module. Should torch move this private hook, exports are slower, not wrong.
    try:
        registration = importlib.import_module("torch.onnx._internal.exporter._registration")
        registry_cls = registration.ONNXRegistry
        build = registry_cls.from_torchlib
    except (ImportError, AttributeError):
        yield
        return
    cached = functools.cache(build)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry_cls, "from_torchlib", staticmethod(cached))
        yield


class BakedDomain(nn.Module):
    """A conditional layer whose domain is an int fixed at export time."""

    def __init__(self, layer: nn.Module, domain: int) -> None:
        super().__init__()
        self.layer = layer
        self.domain = domain

    def forward(self, input: Tensor) -> Tensor:
        out: Tensor = self.layer(input, self.domain)
        return out


def _export_model(rec: LayerRecord, kind: str | None) -> nn.Module:
    """The eval-mode layer, or for an int domain the layer with that int baked in."""
    layer = rec.build().eval()
    if kind == "int":
        domain = rec.domain(kind)
        assert isinstance(domain, int)
        return BakedDomain(layer, domain).eval()
    return layer


def _inputs(
    rec: LayerRecord, kind: str | None, seed: int = 0, batch: int | None = None
) -> tuple[Tensor, ...]:
    """The graph inputs: the tensors, and a per-sample domain (an int one is in the graph)."""
    args = rec.args(kind, seed, batch=batch)
    return tuple(a for a in args if isinstance(a, Tensor))


def _dynamic_shapes(rec: LayerRecord, inputs: tuple[Tensor, ...]) -> tuple[Any, ...] | None:
    """The batch dimension of every batched input, as one shared dynamic dim."""
    if rec.batch < 2:
        return None  # torch.export specializes a size-1 dimension
    batch = Dim("batch")
    return tuple({0: batch} if t.shape[0] == rec.batch else None for t in inputs)


def _run(session: ort.InferenceSession, inputs: tuple[Tensor, ...]) -> Tensor:
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), f"graph inputs {names}, expected {len(inputs)}"
    (out,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
    return torch.from_numpy(out)


@pytest.mark.parametrize(("rec", "kind"), layer_params())
def test_eval_export_runs_in_onnxruntime_and_matches(rec: LayerRecord, kind: str | None) -> None:
    model = _export_model(rec, kind)
    inputs = _inputs(rec, kind)
    program = torch.onnx.export(
        model, inputs, dynamo=True, dynamic_shapes=_dynamic_shapes(rec, inputs), verbose=False
    )
    assert program is not None
    onnx.checker.check_model(program.model_proto, full_check=True)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    # The export inputs, then fresh inputs (other values and, for a per-sample domain, other
    # indices) at another batch size when the batch is dynamic.
    other_batch = rec.batch + 3 if rec.batch > 1 else None
    for seed, batch in ((0, None), (1, other_batch)):
        feed = _inputs(rec, kind, seed, batch)
        if kind == "per_sample":
            feed = (*feed[:-1], feed[-1].roll(seed))
        got = _run(session, feed)
        with torch.no_grad():
            want = model(*feed)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
