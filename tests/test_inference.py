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


def _eval_trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` after one training call (running statistics away from 0 and 1), with its
    batch norms' affines moved from their init, in eval mode and float64."""
    torch.manual_seed(0)
    model = model.to(F64).train()
    with torch.no_grad():
        model(x * 3 + 1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.uniform_(m.weight, 0.5, 2.0)
                nn.init.uniform_(m.bias, -1.0, 1.0)
    return model.eval()


def _assert_prepared_equals_eval(
    model: nn.Module, x: torch.Tensor, **kwargs: Any
) -> nk.InferenceReport:
    prepared, report = nk.prepare_for_inference(model, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-12, atol=1e-12)
    return report


class _Extractor(nn.Module):
    """Iterates its Sequential and reads the conv's own output; data-dependent control flow
    keeps torch.fx from tracing it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for layer in self.body:
            x = layer(x)
            feats.append(x)
        if x.mean() > 1e9:
            return x
        return feats[0] + feats[2]


class _Untraceable(nn.Module):
    """Runs its Sequential whole; untraceable for the same reason."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.body(x)
        return y if y.mean() < 1e9 else -y


def test_an_untraced_model_is_folded_only_when_asked() -> None:
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    # Folding the Sequential's neighbours would change feats[0]: by default nothing is folded.
    extractor = _eval_trained(_Extractor(), x)
    report = _assert_prepared_equals_eval(extractor, x)
    assert not report.traced and report.folded == [] and report.kept == ["body.1"]
    assert "did not trace with torch.fx: nothing folded" in str(report)
    # Asked for, the neighbours fold, and for a Sequential that runs whole that is right.
    untraceable = _eval_trained(_Untraceable(), x)
    report = _assert_prepared_equals_eval(untraceable, x, sequential_fallback=True)
    assert not report.traced and report.folded == [("body.0", "body.1")]


class _TiedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(self.conv(x))
        # The same filters on a flipped view, with no norm: folding would rewrite them.
        return a + nn.functional.conv2d(x.flip(-1), self.conv.weight, padding=1)


class _ReadsStatistics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.conv(x))
        return out + self.bn.running_mean.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("cls", [_TiedBranch, _ReadsStatistics])
def test_a_pair_whose_parameters_or_buffers_are_read_elsewhere_is_not_folded(
    cls: type[nn.Module],
) -> None:
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    report = _assert_prepared_equals_eval(_eval_trained(cls(), x), x)
    assert report.traced and report.folded == [] and report.kept == ["bn"]


def test_hooked_modules_are_not_folded() -> None:
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    with pytest.warns(FutureWarning):  # torch deprecates the old weight_norm; it still runs
        conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    model = _eval_trained(nn.Sequential(conv, nn.BatchNorm2d(4)), x)
    report = _assert_prepared_equals_eval(model, x)
    assert report.folded == [] and report.kept == ["1"]

    seen: list[torch.Tensor] = []
    model = _eval_trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    model[1].register_forward_hook(lambda m, args, out: seen.append(out))
    report = _assert_prepared_equals_eval(model, x)
    assert report.folded == [] and len(seen) == 2  # the hook ran on the prepared model too


def test_a_norm_folded_into_a_linear_layer_refuses_more_than_two_dimensions() -> None:
    model = _eval_trained(
        nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)), torch.randn(16, 5, dtype=F64)
    )
    x2 = torch.randn(4, 5, dtype=F64)
    report = _assert_prepared_equals_eval(model, x2)
    assert report.folded == [("0", "1")]
    # On (N, C, L) the norm's channels are dim 1, not the linear layer's 8 output features.
    three_d = _eval_trained(
        nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8)), torch.randn(16, 8, 5, dtype=F64)
    )
    x3 = torch.randn(4, 8, 5, dtype=F64)
    prepared, _ = nk.prepare_for_inference(three_d)
    with pytest.raises(ValueError, match="fold_linear=False"):
        prepared(x3)
    report = _assert_prepared_equals_eval(three_d, x3, fold_linear=False)
    assert report.folded == [] and report.kept == ["1"]


def test_folding_keeps_each_parameters_requires_grad() -> None:
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    model = _eval_trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    model[0].weight.requires_grad_(False)  # a frozen conv with a trainable bias
    prepared, report = nk.prepare_for_inference(model)
    assert report.folded == [("0", "1")]
    assert prepared[0].weight.requires_grad is False and prepared[0].bias.requires_grad is True


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
