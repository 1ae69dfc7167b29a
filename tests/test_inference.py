"""prepare_for_inference: baked WS, folded norms, local statistics; equal to the eval model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.models import resnet20

F64 = torch.float64


def _context(model: nn.Module, domain: int | None) -> contextlib.AbstractContextManager[Any]:
    return nk.condition(model, domain) if domain is not None else contextlib.nullcontext()


def _trained(
    norm_layer: Callable[[int], nn.Module], domain: int | None, dtype: torch.dtype
) -> nn.Module:
    torch.manual_seed(0)
    model = nk.weight_standardize_(resnet20(norm_layer=norm_layer)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _step in range(3):
        x = torch.randn(8, 3, 8, 8, dtype=dtype) * 2 + 1
        with _context(model, None if domain is None else torch.arange(8) % 3):
            loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


NORMS: dict[str, tuple[Callable[[int], nn.Module], int | None]] = {
    "bn": (nn.BatchNorm2d, None),
    "sabn": (nk.get_norm_layer("sabn", num_domains=3), 2),
    "sabn-split": (nk.get_norm_layer("sabn-split", num_domains=3), 1),
    "ccbn": (nk.get_norm_layer("ccbn", num_domains=3), 0),
    "bcn": (nk.get_norm_layer("bcn", num_groups=4), None),
    "bcn-micro-per-channel": (
        nk.get_norm_layer("bcn-micro", num_groups=4, group_affine="per_channel"),
        None,
    ),
}


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_prepared_resnet_equals_the_eval_model(name: str, dtype: torch.dtype) -> None:
    norm_layer, domain = NORMS[name]
    model = _trained(norm_layer, domain, dtype)
    x = torch.randn(5, 3, 8, 8, dtype=dtype)
    with torch.no_grad(), _context(model, domain):
        want = model(x)
    prepared, report = nk.prepare_for_inference(model, domain=domain)
    with torch.no_grad():
        got = prepared(x)
    assert report.traced and len(report.baked) == 19 and len(report.folded) == 19
    assert report.kept == []
    assert not any(
        isinstance(m, (nk.WSConv2d, nn.modules.batchnorm._BatchNorm)) for m in prepared.modules()
    )
    # Relative to the output's scale: folding reorders float rounding.
    err = (got - want).abs().max() / want.abs().max()
    assert err < (1e-12 if dtype == F64 else 1e-5), err.item()
    assert not prepared.training and model.training is False
    assert any(isinstance(m, nk.WSConv2d) for m in model.modules())  # the original is untouched


def test_per_sample_conditional_layers_are_kept_without_a_domain() -> None:
    model = _trained(NORMS["sabn"][0], 0, F64)
    prepared, report = nk.prepare_for_inference(model)
    assert len(report.folded) == 0 and len(report.kept) == 19
    x, domain = torch.randn(3, 3, 8, 8, dtype=F64), torch.tensor([0, 2, 1])
    with torch.no_grad(), nk.condition(model, domain), nk.condition(prepared, domain):
        torch.testing.assert_close(prepared(x), model(x))


def test_sequential_linear_batchnorm1d_and_sync_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nk.SyncBatchNorm(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),
    )
    model = nk.convert_sync(model)
    for _ in range(3):
        model(torch.randn(6, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    prepared, report = nk.prepare_for_inference(model)
    assert [pair for pair in report.folded] == [("0", "1"), ("4", "5")]
    assert not any(getattr(m, "sync", False) for m in prepared.modules())
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


def test_shared_or_reused_norms_are_not_folded() -> None:
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    model(torch.randn(4, 4, 3, 3))
    model.eval()
    prepared, report = nk.prepare_for_inference(model)
    assert report.folded == []
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(prepared(x), model(x))


def test_root_ws_layer_is_baked() -> None:
    conv = nk.WSConv2d(3, 4, 3).eval()
    prepared, report = nk.prepare_for_inference(conv)
    assert type(prepared) is nn.Conv2d and report.baked == [""]
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(prepared(x), conv(x))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_prepared_resnet_mixing_ws_bn_sabn_and_bcn_equals_the_eval_model(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    model = resnet20()
    nk.convert_norm(model.layer1, "sabn", num_domains=3)
    nk.convert_norm(model.layer2, "bcn", num_groups=4)
    model = nk.weight_standardize_(model).to(dtype)
    kinds = {type(m) for m in model.modules()}
    assert {nn.BatchNorm2d, nk.SandwichBatchNorm2d, nk.BatchChannelNorm2d, nk.WSConv2d} <= kinds
    for _ in range(3):
        with nk.condition(model, torch.arange(8) % 3):
            model(torch.randn(8, 3, 8, 8, dtype=dtype) * 2 + 1)
    model.eval()
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    with torch.no_grad(), nk.condition(model, 1):
        want = model(x)
    prepared, report = nk.prepare_for_inference(model, domain=1)
    assert len(report.folded) == 19 and report.kept == []
    with torch.no_grad():
        got = prepared(x)
    err = (got - want).abs().max() / want.abs().max()
    assert err < (1e-12 if dtype == F64 else 1e-5), err.item()
