"""convert_norm, freeze_norm and unfreeze_norm on real models.

The converters are tested on a torchvision-style ResNet (normkit's ImageNet ResNet has
torchvision's module names and state-dict keys) whose batch norms were trained for a few steps,
so that every running statistic and affine is away from its init and a part that is not carried
shows up, and on small hand-built models for the corner cases (shared, nested, root, subclasses).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit as nk
from normkit import convert_norm, freeze_norm, unfreeze_norm

D = torch.float64
K = 3  # domains of the conditional targets

# target name -> (keyword arguments, extra keys a BN checkpoint does not hold, same function?)
TARGETS: dict[str, tuple[dict[str, Any], set[str], bool]] = {
    "sabn": ({"num_domains": K, "domain_std": 0.0}, {"domain_weight", "domain_bias"}, True),
    "sabn-split": ({"num_domains": K, "domain_std": 0.0}, {"domain_weight", "domain_bias"}, True),
    "ccbn": ({"num_domains": K}, set(), True),
    "auxbn": ({"num_domains": K}, set(), True),
    "bcn": ({"num_groups": 8}, {"group_weight", "group_bias"}, False),
    "bcn-micro": ({"num_groups": 8}, {"group_weight", "group_bias"}, False),
    "inputnorm": ({}, set(), True),
}
CONDITIONAL = {"sabn", "sabn-split", "ccbn", "auxbn"}


def _resnet(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nk.models.imagenet_resnet("basic", [1, 1, 1, 1], num_classes=10, width=32)
    model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 3, 32, 32, dtype=dtype)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained64() -> nn.Module:
    return _resnet(D)


@pytest.fixture(scope="module")
def trained32() -> nn.Module:
    return _resnet(torch.float32)


@contextmanager
def _domain(model: nn.Module, target: str, domain: int | Tensor) -> Iterator[None]:
    with nk.condition(model, domain) if target in CONDITIONAL else nullcontext():
        yield


def _bns(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.BatchNorm2d}


def _x(dtype: torch.dtype = D, n: int = 4) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)


# --- carrying state: the function and the parts ---------------------------------------------------


@pytest.mark.parametrize("dtype", [D, torch.float32])
@pytest.mark.parametrize("domain", [2, "per_sample"])
def test_sabn_with_identity_domain_affines_keeps_the_eval_output(
    dtype: torch.dtype, domain: Any, trained64: nn.Module, trained32: nn.Module
) -> None:
    original = trained64 if dtype == D else trained32
    x = _x(dtype)
    index = torch.tensor([0, 2, 1, 2]) if domain == "per_sample" else domain
    model = convert_norm(copy.deepcopy(original), "sabn", num_domains=K, domain_std=0.0).model
    with nk.condition(model, index):
        out = model(x)
    tol = 1e-12 if dtype == D else 1e-5
    torch.testing.assert_close(out, original(x), rtol=0, atol=tol)


@pytest.mark.parametrize("target", ["sabn-split", "ccbn", "auxbn", "inputnorm"])
def test_function_preserving_targets_keep_the_eval_output(
    target: str, trained64: nn.Module
) -> None:
    kwargs = TARGETS[target][0]
    model = convert_norm(copy.deepcopy(trained64), target, **kwargs).model
    x = _x()
    with _domain(model, target, torch.tensor([1, 0, 2, 1])):
        out = model(x)
    torch.testing.assert_close(out, trained64(x), rtol=0, atol=1e-12)


def test_ccbn_gets_the_statistics_and_every_domain_gets_the_affine(trained64: nn.Module) -> None:
    model = convert_norm(copy.deepcopy(trained64), "ccbn", num_domains=K).model
    new = dict(model.named_modules())
    for name, bn in _bns(trained64).items():
        layer = new[name]
        assert type(layer) is nk.CategoricalConditionalBatchNorm2d
        assert layer.weight is None and layer.bias is None
        assert torch.equal(layer.running_mean, bn.running_mean)
        assert torch.equal(layer.running_var, bn.running_var)
        assert torch.equal(layer.num_batches_tracked, bn.num_batches_tracked)
        assert torch.equal(layer.domain_weight, bn.weight.detach().expand(K, -1))
        assert torch.equal(layer.domain_bias, bn.bias.detach().expand(K, -1))


@pytest.mark.parametrize("target", ["sabn-split", "auxbn"])
def test_split_statistics_targets_copy_the_statistics_to_every_domain(
    target: str, trained64: nn.Module
) -> None:
    model = convert_norm(copy.deepcopy(trained64), target, num_domains=K).model
    new = dict(model.named_modules())
    for name, bn in _bns(trained64).items():
        layer = new[name]
        assert layer.split_stats
        assert torch.equal(layer.running_mean, bn.running_mean.expand(K, -1))
        assert torch.equal(layer.running_var, bn.running_var.expand(K, -1))
        assert torch.equal(layer.num_batches_tracked, bn.num_batches_tracked.expand(K))


@pytest.mark.parametrize("target", ["bcn", "bcn-micro"])
def test_bcn_batch_part_gets_the_statistics_and_affine(target: str, trained64: nn.Module) -> None:
    report = convert_norm(copy.deepcopy(trained64), target, num_groups=8)
    new = dict(report.model.named_modules())
    for name, bn in _bns(trained64).items():
        layer = new[name]
        assert type(layer) is nk.BatchChannelNorm2d
        assert layer.estimate == (target == "bcn-micro")
        assert layer.num_groups == 8
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(layer, key), getattr(bn, key)), key
        # The channel part is new: it starts as the identity.
        assert torch.equal(layer.group_weight, torch.ones(8, dtype=D))
        assert torch.equal(layer.group_bias, torch.zeros(8, dtype=D))
    assert {c.fresh for c in report} == {("group_weight", "group_bias")}


@pytest.mark.parametrize("target", list(TARGETS))
def test_converted_model_loads_the_original_checkpoint(target: str, trained64: nn.Module) -> None:
    kwargs, extra, _ = TARGETS[target]
    model = convert_norm(copy.deepcopy(trained64), target, **kwargs).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = model.load_state_dict(trained64.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert {k.rsplit(".", 1)[1] for k in result.missing_keys} == extra
    assert len(result.missing_keys) == len(extra) * len(_bns(trained64))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("target", list(TARGETS))
def test_converted_model_trains_one_sgd_step(target: str, trained32: nn.Module) -> None:
    kwargs = TARGETS[target][0]
    model = convert_norm(copy.deepcopy(trained32), target, **kwargs).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with _domain(model, target, torch.tensor([0, 1, 2, 0])):
        loss = nn.functional.cross_entropy(model(_x(torch.float32)), torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "conv1.weight" in changed and "fc.weight" in changed
    norm_param = {
        "sabn": "bn1.domain_weight",
        "sabn-split": "bn1.domain_weight",
        "ccbn": "bn1.domain_weight",
        "auxbn": "bn1.domain_weight",
        "bcn": "bn1.group_weight",
        "bcn-micro": "bn1.group_weight",
        "inputnorm": "bn1.weight",
    }[target]
    assert norm_param in changed


# --- what conversion keeps ------------------------------------------------------------------------


def test_dtype_and_device_are_kept() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm1d(8)).to(D)
    converted = convert_norm(model, "sabn", num_domains=2).model
    for t in [*converted.parameters(), *converted.buffers()]:
        assert t.dtype in (D, torch.long) and t.device.type == "cpu"
    meta = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to("meta")
    assert convert_norm(meta, "bcn", num_groups=2).model[1].weight.device.type == "meta"


def test_statistics_keep_their_own_dtype_next_to_low_precision_parameters() -> None:
    bn = nn.BatchNorm2d(4).to(torch.bfloat16)
    bn.running_mean = bn.running_mean.float()  # float32 statistics, bf16 affine
    bn.running_var = bn.running_var.float()
    new = convert_norm(bn, "sabn", num_domains=2).model
    assert new.weight.dtype == new.domain_weight.dtype == torch.bfloat16
    assert new.running_mean.dtype == new.running_var.dtype == torch.float32


def test_training_flags_are_kept_per_layer(trained64: nn.Module) -> None:
    model = copy.deepcopy(trained64).train()
    model.layer2.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    converted = convert_norm(model, "bcn", num_groups=8).model
    assert {n: m.training for n, m in converted.named_modules()} == flags
    assert any(not f for f in flags.values()) and any(flags.values())


def test_requires_grad_is_kept_wherever_the_parameter_went(trained64: nn.Module) -> None:
    for target, home in [("sabn", "weight"), ("ccbn", "domain_weight"), ("bcn", "weight")]:
        model = copy.deepcopy(trained64)
        model.bn1.weight.requires_grad_(False)
        model.layer1[0].bn2.bias.requires_grad_(False)
        model = convert_norm(model, target, **TARGETS[target][0]).model
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        assert flags.pop(f"bn1.{home}") is False
        assert flags.pop(f"layer1.0.bn2.{home.replace('weight', 'bias')}") is False
        assert all(flags.values()), target


def test_a_shared_module_becomes_one_new_object_at_every_name() -> None:
    shared = nn.BatchNorm2d(4)
    inner = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(4, 4, 1), shared), "b": shared})
    model = nn.Sequential(nn.ModuleList([inner, nn.Sequential(nn.Sequential(shared))]))
    report = convert_norm(model, "sabn", num_domains=2)
    new = model[0][0]["b"]
    assert type(new) is nk.SandwichBatchNorm2d
    assert model[0][0]["a"][1] is new and model[0][1][0][0] is new
    assert len(report) == 1
    assert report.changes[0].names == ("0.0.a.1", "0.0.b", "0.1.0.0")


def test_deeply_nested_batch_norms_are_all_replaced() -> None:
    model: nn.Module = nn.BatchNorm1d(3)
    for _ in range(40):
        model = nn.Sequential(nn.Identity(), model, nn.BatchNorm1d(3))
    report = convert_norm(model, "auxbn", num_domains=2)
    assert len(report) == 41
    assert not any(type(m) is nn.BatchNorm1d for m in model.modules())


def test_a_root_batch_norm_is_replaced_and_returned() -> None:
    bn = nn.BatchNorm2d(4)
    report = convert_norm(bn, "sabn", num_domains=2)
    assert type(report.model) is nk.SandwichBatchNorm2d
    assert report.names == [""]
    assert "(model): BatchNorm2d -> SandwichBatchNorm2d" in str(report)


def test_a_source_without_shift_gets_a_shift_pinned_at_zero() -> None:
    bn = nn.BatchNorm2d(4, bias=False)
    new = convert_norm(bn, "sabn", num_domains=2).model
    assert torch.equal(new.bias, torch.zeros(4)) and not new.bias.requires_grad
    assert new.domain_bias.requires_grad
    ccbn = convert_norm(nn.BatchNorm2d(4, bias=False), "ccbn", num_domains=2).model
    assert not ccbn.domain_bias.requires_grad
    plain = convert_norm(nn.SyncBatchNorm(4, bias=False), "bn").model
    assert type(plain) is nn.BatchNorm2d and plain.bias is None


# --- what conversion refuses and leaves alone -----------------------------------------------------


class MyBN(nn.BatchNorm2d):
    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input).relu()


class BatchNormAct(nn.BatchNorm2d):
    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()


def test_an_unknown_subclass_is_refused_naming_every_module_and_class() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(MyBN(4)), BatchNormAct(4))
    with pytest.raises(TypeError, match=r"'1\.0' \(.*MyBN\).*'2' \(.*BatchNormAct\)"):
        convert_norm(model, "sabn", num_domains=2)
    assert type(model[0]) is nn.BatchNorm2d  # nothing changed


def test_treat_as_bn_converts_the_listed_classes_only() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), MyBN(4), BatchNormAct(4))
    with pytest.raises(TypeError, match="BatchNormAct"):
        convert_norm(model, "sabn", num_domains=2, treat_as_bn=(MyBN,))
    report = convert_norm(model, "sabn", num_domains=2, treat_as_bn=(MyBN, BatchNormAct))
    assert [type(m) for m in model] == [nk.SandwichBatchNorm2d] * 3
    assert [c.source for c in report] == [nn.BatchNorm2d, MyBN, BatchNormAct]
    excluded = nn.Sequential(nn.BatchNorm2d(4), MyBN(4))
    convert_norm(excluded, "sabn", num_domains=2, exclude={"1"})
    assert type(excluded[1]) is MyBN


def test_treat_as_bn_must_list_foreign_module_classes() -> None:
    with pytest.raises(TypeError, match="normkit layers are never converted"):
        convert_norm(nn.BatchNorm2d(2), "bn", treat_as_bn=(nk.SandwichBatchNorm2d,))
    with pytest.raises(TypeError, match=r"nn\.Module classes"):
        convert_norm(nn.BatchNorm2d(2), "sabn", treat_as_bn=("MyBN",))  # type: ignore[arg-type]


def test_a_model_with_nothing_to_convert_raises_unless_not_strict() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2), nn.LayerNorm(2))
    with pytest.raises(ValueError, match=r"Sequential with none \(looked for exact nn\.Batch"):
        convert_norm(model, "sabn", num_domains=2)
    report = convert_norm(model, "sabn", num_domains=2, strict=False)
    assert len(report) == 0 and report.model is model and report.names == []


def test_normkit_layers_are_left_alone_so_conversion_is_idempotent(
    trained64: nn.Module,
) -> None:
    model = copy.deepcopy(trained64)
    convert_norm(model, "sabn", num_domains=K)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"left alone: bn1 \(SandwichBatchNorm2d, a normkit"):
        convert_norm(model, "bcn")
    again = convert_norm(model, "sabn", num_domains=K, strict=False)
    assert len(again) == 0 and len(again.left_alone) == len(_bns(trained64))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_report_names_every_change(trained64: nn.Module) -> None:
    model = copy.deepcopy(trained64)
    report = convert_norm(model, "SaBN", num_domains=K, exclude={"layer4"})
    assert report.target == "sabn"
    assert report.names == [n for n in _bns(trained64) if not n.startswith("layer4")]
    change = report.changes[0]
    assert (change.names, change.source, change.target) == (
        ("bn1",),
        nn.BatchNorm2d,
        nk.SandwichBatchNorm2d,
    )
    assert change.fresh == ("domain_weight", "domain_bias") and change.dropped == ()
    assert [n for n, _ in report.left_alone] == [n for n in _bns(trained64) if "layer4" in n]
    text = str(report)
    assert text.splitlines()[0] == "convert_norm to 'sabn': replaced 9 modules of ImageNetResNet"
    assert "  bn1: BatchNorm2d -> SandwichBatchNorm2d (fresh: domain_weight, domain_bias)" in text
    assert "  layer4.0.bn1: BatchNorm2d, excluded" in text
    assert repr(report).startswith("ConversionReport(model=ImageNetResNet")


def test_an_option_that_removes_a_part_reports_what_it_dropped() -> None:
    report = convert_norm(nn.BatchNorm2d(4), "bcn", num_groups=2, affine=False)
    assert report.changes[0].dropped == ("weight", "bias")


def test_exclude_by_callable_and_unknown_names() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    convert_norm(model, "sabn", num_domains=2, exclude=lambda name, m: name.startswith("1"))
    assert type(model[0]) is nk.SandwichBatchNorm2d and type(model[1][0]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="exclude to name modules"):
        convert_norm(model, "sabn", num_domains=2, exclude={"nope"})


def test_a_layer_that_cannot_be_built_is_named_and_nothing_changes() -> None:
    model = nn.Sequential(nn.BatchNorm2d(8), nn.Sequential(nn.BatchNorm2d(6)))
    with pytest.raises(ValueError, match=r"BatchChannelNorm2d for '1\.0' \(BatchNorm2d\).*divide"):
        convert_norm(model, "bcn", num_groups=4)
    assert [type(m) for m in (model[0], model[1][0])] == [nn.BatchNorm2d] * 2
    with pytest.raises(TypeError, match=r"SandwichBatchNorm2d for '0'.*num_domains"):
        convert_norm(model, "sabn")
    convert_norm(model, "bcn", num_groups=lambda c: math.gcd(c, 4))
    assert (model[0].num_groups, model[1][0].num_groups) == (4, 2)


def test_options_taken_from_each_source_cannot_be_passed() -> None:
    with pytest.raises(TypeError, match=r"got device, dtype in kwargs.*model\.to"):
        convert_norm(nn.BatchNorm2d(2), "sabn", num_domains=2, dtype=D, device="cpu")


def test_hooks_on_a_replaced_module_are_reported_as_lost() -> None:
    model = nn.Sequential(nn.BatchNorm2d(2))
    model[0].register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match=r"'0' \(BatchNorm2d\) has hooks"):
        convert_norm(model, "sabn", num_domains=2)


# --- targets and dimensionality -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "expected", "split"),
    [
        ("sabn-split", nk.SandwichBatchNorm2d, True),
        ("SaBN_Split", nk.SandwichBatchNorm2d, True),
        (" saauxbn ", nk.SandwichBatchNorm2d, True),
        ("CCBN", nk.CategoricalConditionalBatchNorm2d, False),
        (nk.SandwichBatchNorm1d, nk.SandwichBatchNorm2d, False),
        (nk.AuxBatchNorm3d, nk.AuxBatchNorm2d, True),
    ],
)
def test_targets_are_names_in_any_case_or_classes_naming_a_family(
    to: Any, expected: type, split: bool
) -> None:
    new = convert_norm(nn.BatchNorm2d(4), to, num_domains=2).model
    assert type(new) is expected and new.split_stats == split


def test_unknown_targets_are_refused_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown target 'nope'; known targets: auxbn, bcn, "):
        convert_norm(nn.BatchNorm2d(4), "nope")
    with pytest.raises(TypeError, match="one of the classes"):
        convert_norm(nn.BatchNorm2d(4), nn.GroupNorm)


def test_the_dimensionality_comes_from_each_source() -> None:
    model = nn.ModuleList(
        [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4)]
    )
    convert_norm(model, "bcn", num_groups=2)
    assert [type(m) for m in model] == [
        nk.BatchChannelNorm1d,
        nk.BatchChannelNorm2d,
        nk.BatchChannelNorm3d,
        nk.BatchChannelNorm2d,  # SyncBatchNorm: default_dim
    ]
    sync = nn.Sequential(nn.SyncBatchNorm(4))
    assert type(convert_norm(sync, "sabn3d", num_domains=2).model[0]) is nk.SandwichBatchNorm3d
    sync = nn.Sequential(nn.SyncBatchNorm(4))
    assert type(convert_norm(sync, "bn", default_dim=1).model[0]) is nn.BatchNorm1d
    with pytest.raises(ValueError, match=r"'inputnorm' has no 3d layer for '0' \(BatchNorm3d\)"):
        convert_norm(nn.Sequential(nn.BatchNorm3d(4)), "inputnorm")


def test_sync_batch_norm_turns_back_into_a_plain_one_with_its_state() -> None:
    sync = nn.SyncBatchNorm(4, momentum=None, eps=1e-3)
    with torch.no_grad():
        sync.running_mean.normal_()
        sync.weight.normal_()
    bn = convert_norm(sync, "bn").model
    assert type(bn) is nn.BatchNorm2d and (bn.momentum, bn.eps) == (None, 1e-3)
    assert torch.equal(bn.running_mean, sync.running_mean)
    assert torch.equal(bn.weight, sync.weight)


# --- group norms ----------------------------------------------------------------------------------


def _group_norm(channels: int = 8, groups: int = 4) -> nn.GroupNorm:
    gn = nn.GroupNorm(groups, channels, eps=1e-3)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    return gn


def test_group_norms_are_converted_only_when_asked() -> None:
    model = nn.Sequential(nn.BatchNorm2d(8), _group_norm())
    convert_norm(model, "bcn", num_groups=4)
    assert type(model[1]) is nn.GroupNorm
    report = convert_norm(model, "bcn", include_groupnorm=True)
    assert [c.source for c in report] == [nn.GroupNorm]


def test_group_norm_affine_goes_into_bcn_channel_part() -> None:
    gn = _group_norm()
    bcn = convert_norm(gn, "bcn", include_groupnorm=True).model
    assert type(bcn) is nk.BatchChannelNorm2d
    assert (bcn.num_groups, bcn.group_affine, bcn.eps) == (4, "per_channel", 1e-3)
    assert torch.equal(bcn.group_weight, gn.weight) and torch.equal(bcn.group_bias, gn.bias)
    assert torch.equal(bcn.weight, torch.ones(8))  # batch part fresh
    with pytest.raises(ValueError, match=r"per-channel affine .* group_affine='per_group'"):
        convert_norm(_group_norm(), "bcn", include_groupnorm=True, group_affine="per_group")


def test_group_norm_affine_goes_into_the_shared_or_domain_affines() -> None:
    gn = _group_norm()
    sabn = convert_norm(gn, "sabn", include_groupnorm=True, num_domains=2).model
    assert torch.equal(sabn.weight, gn.weight) and torch.equal(sabn.bias, gn.bias)
    report = convert_norm(gn, "ccbn", include_groupnorm=True, num_domains=2)
    assert torch.equal(report.model.domain_weight, gn.weight.detach().expand(2, -1))
    # A group norm has no statistics: they and their batch count start fresh.
    fresh = {"running_mean", "running_var", "num_batches_tracked"}
    assert set(report.changes[0].fresh) == fresh


def test_a_group_norm_subclass_is_refused_when_group_norms_are_converted() -> None:
    class MyGN(nn.GroupNorm):
        pass

    model = nn.Sequential(nn.BatchNorm2d(4), MyGN(2, 4))
    convert_norm(copy.deepcopy(model), "bcn", num_groups=2)  # group norms not asked for
    with pytest.raises(TypeError, match="MyGN"):
        convert_norm(model, "bcn", num_groups=2, include_groupnorm=True)


# --- freeze_norm / unfreeze_norm ------------------------------------------------------------------


def _frozen_layers() -> list[tuple[str, nn.Module, int | None]]:
    """(id, layer with non-trivial statistics and affine, domain)."""
    layers: list[tuple[str, nn.Module, int | None]] = [
        ("bn", nn.BatchNorm2d(4), None),
        ("syncbn", nn.SyncBatchNorm(4), None),
        ("sabn", nk.SandwichBatchNorm2d(4, K), 1),
        ("sabn-split", nk.SandwichBatchNorm2d(4, K, split_stats=True), 2),
        ("ccbn", nk.CategoricalConditionalBatchNorm2d(4, K), 0),
        ("auxbn", nk.AuxBatchNorm2d(4, K), 1),
        ("bcn", nk.BatchChannelNorm2d(4, num_groups=2), None),
        ("bcn-micro", nk.BatchChannelNorm2d(4, num_groups=2, estimate=True), None),
        ("inputnorm", nk.InputNorm2d(4), None),
    ]
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer, _ in layers:
            for t in [*layer.parameters(), *layer.buffers()]:
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t) + 0.5)
    return layers


def _call(layer: nn.Module, x: Tensor, domain: int | None) -> Tensor:
    out: Tensor = layer(x) if domain is None else layer(x, domain)
    return out


FROZEN = _frozen_layers()


@pytest.mark.parametrize(("name", "layer", "domain"), FROZEN, ids=[f[0] for f in FROZEN])
def test_a_frozen_layer_ignores_train_mode_and_the_rest_of_the_batch(
    name: str, layer: nn.Module, domain: int | None
) -> None:
    layer = copy.deepcopy(layer)
    model = nn.Sequential(layer)
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    expected = _call(copy.deepcopy(layer).eval(), x, domain)
    freeze_norm(model)
    model.train()
    assert model.training and not layer.training
    buffers = [b.clone() for b in layer.buffers()]
    out = _call(layer, x, domain)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_call(layer, x[:2], domain), out[:2], rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(buffers, layer.buffers()))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in layer.parameters())
    assert isinstance(layer, _BatchNorm) and type(layer).__name__.startswith("Frozen")


def test_freeze_survives_train_and_direct_assignment(trained64: nn.Module) -> None:
    model = freeze_norm(copy.deepcopy(trained64))
    model.train()
    model.bn1.training = True
    x = _x()
    torch.testing.assert_close(model(x), trained64(x), rtol=0, atol=0)
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    assert all(m.training for m in model.modules() if not isinstance(m, _BatchNorm))


def test_unfreeze_restores_the_original_exactly(trained64: nn.Module) -> None:
    model = copy.deepcopy(trained64).train()
    model.fc.weight.requires_grad_(False)
    model.layer1[0].bn1.bias.requires_grad_(False)
    types = {n: type(m) for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    state = model.state_dict()
    freeze_norm(model)
    assert model.state_dict().keys() == state.keys()
    model.eval()
    model.train()  # the model's last word: train
    unfreeze_norm(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(p is params[n] for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(after[k] is not None and torch.equal(after[k], v) for k, v in state.items())
    original = copy.deepcopy(trained64).train()
    torch.testing.assert_close(model(_x()), original(_x()), rtol=0, atol=0)
    freeze_norm(model)
    model.eval()
    unfreeze_norm(model)
    assert not any(m.training for m in model.modules())


def test_freeze_affine_false_freezes_only_the_statistics() -> None:
    bn = nn.BatchNorm2d(4)
    freeze_norm(nn.Sequential(bn), freeze_affine=False).train()
    bn(torch.randn(4, 4, 2, 2)).sum().backward()
    assert bn.weight.grad is not None and torch.equal(bn.running_mean, torch.zeros(4))


def test_group_norms_are_frozen_only_when_asked() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    freeze_norm(model)
    assert model[1].weight.requires_grad and type(model[1]) is nn.GroupNorm
    freeze_norm(model, include_groupnorm=True)
    assert not model[1].weight.requires_grad and isinstance(model[1], nn.GroupNorm)
    unfreeze_norm(model)
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.GroupNorm]
    assert model[1].weight.requires_grad


def test_freeze_refuses_batch_norms_without_running_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm2d\) with track_running_stats=False"):
        freeze_norm(model)
    assert type(model[0]) is nn.BatchNorm2d  # nothing changed
    freeze_norm(model, exclude={"1"})
    assert type(model[0]).__name__ == "FrozenBatchNorm2d" and type(model[1]) is nn.BatchNorm2d


def test_freeze_is_idempotent_and_handles_shared_and_root_layers() -> None:
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(shared, nn.Sequential(shared))
    freeze_norm(freeze_norm(model))
    assert type(model[0]) is type(model[1][0]) and type(shared).__name__ == "FrozenBatchNorm2d"
    unfreeze_norm(model)
    assert type(shared) is nn.BatchNorm2d and shared.weight.requires_grad
    root = freeze_norm(nn.BatchNorm1d(3))
    assert not root.train().training
    assert type(unfreeze_norm(root)) is nn.BatchNorm1d and root.training


def test_a_frozen_model_deep_copies_and_pickles(trained64: nn.Module) -> None:
    model = freeze_norm(copy.deepcopy(trained64)).train()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(other.bn1) is type(model.bn1) and not other.bn1.training
        torch.testing.assert_close(other(_x()), trained64(_x()), rtol=0, atol=0)
        unfreeze_norm(other)
        assert type(other.bn1) is nn.BatchNorm2d and other.bn1.training
        assert other.bn1.weight.requires_grad


def test_convert_norm_leaves_frozen_layers_alone() -> None:
    model = freeze_norm(nn.Sequential(nn.BatchNorm2d(4)))
    report = convert_norm(model, "sabn", num_domains=2, strict=False)
    assert len(report) == 0 and report.left_alone == (("0", "FrozenBatchNorm2d, a normkit layer"),)


def test_the_converters_refuse_non_modules() -> None:
    with pytest.raises(TypeError, match=r"convert_norm: expected an nn\.Module, got str"):
        convert_norm("model", "bn")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"freeze_norm: expected an nn\.Module, got str"):
        freeze_norm("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"unfreeze_norm: expected an nn\.Module, got str"):
        unfreeze_norm("model")  # type: ignore[arg-type]


def test_a_frozen_layer_compiles_without_graph_breaks() -> None:
    model = freeze_norm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).train()
    x = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


# --- the related methods as targets (issue 8) -----------------------------------------------------

# target -> (class, kwargs, source keys dropped and fresh keys per layer, same eval function?)
RELATED_TARGETS: dict[str, tuple[type[nn.Module], dict[str, Any], set[str], set[str], bool]] = {
    "brn": (nk.BatchRenorm2d, {}, set(), {"num_batches_tracked"}, True),
    "bnet": (nk.BNET2d, {}, set(), set(), True),
    "bgn": (
        nk.BatchGroupNorm2d,
        {"num_groups": 4},
        {"running_mean", "running_var"},
        {"num_batches_tracked"},
        False,
    ),
    "mabn": (
        nk.MovingAverageBatchNorm2d,
        {},
        {"running_mean"},
        {"buffer_x2", "buffer_gz", "num_batches_tracked"},
        False,
    ),
    "iternorm": (
        nk.IterNorm2d,
        {"group_size": 4},
        {"running_var"},
        {"running_wm", "num_batches_tracked"},
        False,
    ),
    "frn": (
        nk.FilterResponseNorm2d,
        {},
        {"running_mean", "running_var", "num_batches_tracked"},
        {"tau"},
        False,
    ),
    "evonorm-b0": (nk.EvoNormB0, {}, {"running_mean"}, {"v"}, False),
    "evonorm-s0": (
        nk.EvoNormS0,
        {"num_groups": 4},
        {"running_mean", "running_var", "num_batches_tracked"},
        {"v"},
        False,
    ),
}


@pytest.mark.parametrize("target", list(RELATED_TARGETS))
def test_related_targets_carry_what_fits_and_report_the_rest(
    target: str, trained64: nn.Module, trained32: nn.Module
) -> None:
    cls, kwargs, dropped, fresh, same_function = RELATED_TARGETS[target]
    report = convert_norm(copy.deepcopy(trained64), target, **kwargs)
    new = dict(report.model.named_modules())
    for name, bn in _bns(trained64).items():
        layer = new[name]
        assert type(layer) is cls
        for key in ("weight", "bias", "running_mean", "running_var"):
            if (
                hasattr(layer, key)
                and key not in dropped
                and isinstance(getattr(layer, key), Tensor)
            ):
                assert torch.equal(getattr(layer, key), getattr(bn, key)), (name, key)
    assert {c.dropped for c in report} == {tuple(k for k in _BN_KEYS if k in dropped)}
    assert {frozenset(c.fresh) for c in report} == {frozenset(fresh)}
    if same_function:
        x = _x()
        torch.testing.assert_close(report.model(x), trained64(x), rtol=0, atol=1e-12)
    # The converted model trains.
    model = convert_norm(copy.deepcopy(trained32), target, **kwargs).model.train()
    loss = nn.functional.cross_entropy(model(_x(torch.float32)), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def test_mabn_target_takes_the_official_momentum_unless_given(trained32: nn.Module) -> None:
    model = convert_norm(copy.deepcopy(trained32), "mabn").model
    assert {m.momentum for m in model.modules() if isinstance(m, nk.MovingAverageBatchNorm2d)} == {
        0.02
    }
    model = convert_norm(copy.deepcopy(trained32), "mabn", momentum=0.1).model
    assert {m.momentum for m in model.modules() if isinstance(m, nk.MovingAverageBatchNorm2d)} == {
        0.1
    }


def test_a_treat_as_bn_class_that_is_no_norm_is_still_refused() -> None:
    # Only statistics may be dropped for a shape that does not fit; a weight never is.
    with pytest.raises(ValueError, match="cannot carry the state"):
        convert_norm(nn.Sequential(nn.Conv2d(3, 4, 1)), "bgn", treat_as_bn=(nn.Conv2d,))


@pytest.mark.parametrize("target", ["bgn", "iternorm", "mabn", "brn"])
def test_the_batch_count_restarts_with_fresh_statistics_or_a_schedule(target: str) -> None:
    # A batch norm's count belongs to the statistics it averaged: carried into fresh statistics
    # it would freeze a cumulative average (momentum=None), skip MABN's warm-up with empty ring
    # buffers, or start BRN's schedule past its warm-up.
    bn = nn.BatchNorm2d(8, momentum=None)
    bn.num_batches_tracked.fill_(10_000)
    kwargs = RELATED_TARGETS[target][1]
    report = convert_norm(bn, target, **kwargs)
    layer = report.model
    assert int(layer.num_batches_tracked) == 0
    assert "num_batches_tracked" in report.changes[0].fresh
    if target == "brn":
        r_max, d_max = layer.clip_limits()
        assert (float(r_max), float(d_max)) == (1.0, 0.0)  # the warm-up: plain BN
    if target == "bgn":
        # The cumulative average now tracks the data from the first step.
        x = 3.0 * torch.randn(16, 8, 4, 4) + 2.0
        for _ in range(5):
            layer.train()(x)
        torch.testing.assert_close(layer.running_mean, torch.full((4,), 2.0), atol=0.3, rtol=0)


def test_the_batch_count_is_kept_where_every_statistic_is_carried() -> None:
    bn = nn.BatchNorm2d(8)
    bn.num_batches_tracked.fill_(7)
    for target, kwargs in (("bnet", {}), ("evonorm-b0", {}), ("sabn", {"num_domains": 2})):
        layer = convert_norm(copy.deepcopy(bn), target, **kwargs).model
        assert int(layer.num_batches_tracked) == 7, target


# --- requires_grad on every target ----------------------------------------------------------------

ALL_TARGETS: dict[str, dict[str, Any]] = {
    **{name: kwargs for name, (kwargs, _, _) in TARGETS.items()},
    **{name: kwargs for name, (_, kwargs, _, _, _) in RELATED_TARGETS.items()},
    "gn": {"num_groups": 4},
    "frozenbn": {},
}


@pytest.mark.parametrize("target", sorted(ALL_TARGETS))
def test_a_frozen_affine_stays_frozen_wherever_it_went_on_every_target(target: str) -> None:
    # Only what nothing was carried into (the report's fresh parts) trains.
    bn = nn.BatchNorm2d(8)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    report = convert_norm(nn.Sequential(bn), target, **ALL_TARGETS[target])
    fresh = set(report.changes[0].fresh)
    flags = {n: p.requires_grad for n, p in report.model[0].named_parameters()}
    assert flags == {n: n in fresh for n in flags}, target


@pytest.mark.parametrize("target", sorted(ALL_TARGETS))
def test_a_missing_shift_stays_a_frozen_zero_on_every_target(target: str) -> None:
    report = convert_norm(
        nn.Sequential(nn.BatchNorm2d(8, bias=False)), target, **ALL_TARGETS[target]
    )
    layer = report.model[0]
    params = dict(layer.named_parameters())
    shift = next((params[k] for k in ("bias", "domain_bias", "conv_bias") if k in params), None)
    if shift is not None:  # else the target keeps it as a buffer (frozenbn)
        assert not shift.requires_grad and not shift.any(), target


def test_bnet_target_maps_the_flags_to_its_convolution() -> None:
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.normal_()
    bn.weight.requires_grad_(False)  # the scale frozen, the shift trains
    new = convert_norm(copy.deepcopy(bn), "bnet").model
    assert not new.conv_weight.requires_grad and new.conv_bias.requires_grad
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(new(x), bn(x))
    bn.weight.requires_grad_(True)
    bn.bias.requires_grad_(False)
    new = convert_norm(copy.deepcopy(bn), "bnet").model
    assert new.conv_weight.requires_grad and not new.conv_bias.requires_grad


# --- sources a target cannot represent ------------------------------------------------------------


def test_frozenbn_target_refuses_sources_without_running_statistics() -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(4),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Sequential(nn.GroupNorm(2, 4)),
    )
    with pytest.raises(
        ValueError,
        match=r"running statistics to convert to 'frozenbn'.*'1' \(BatchNorm2d\), '2\.0' "
        r"\(GroupNorm\) without any",
    ):
        convert_norm(model, "frozenbn", include_groupnorm=True)
    assert [type(m) for m in (model[0], model[1], model[2][0])] == [
        nn.BatchNorm2d,
        nn.BatchNorm2d,
        nn.GroupNorm,
    ]
    report = convert_norm(model, "frozenbn", exclude={"1"})
    assert report.names == ["0"] and type(model[0]) is nk.FrozenBatchNorm2d


def test_affine_free_sources_get_a_fresh_affine_that_the_report_lists() -> None:
    # docs/convert.md: "same function" for ccbn and inputnorm holds for sources with an affine;
    # an affine-free source's affine is fresh (ccbn: the same function with domain_std=0.0).
    bn = nn.BatchNorm2d(6, affine=False).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 6, 5, 5)
    report = convert_norm(copy.deepcopy(bn), "ccbn", num_domains=3, domain_std=0.0)
    assert report.changes[0].fresh == ("domain_weight", "domain_bias")
    torch.testing.assert_close(report.model(x, 2), bn(x))
    report = convert_norm(copy.deepcopy(bn), "inputnorm")
    assert report.changes[0].fresh == ("weight", "bias")


# --- classes as targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "attrs"),
    [
        (nk.BatchGroupNorm2d, {"num_groups": 8}),  # gcd(24, 32), the family's default
        (nk.MovingAverageBatchNorm2d, {"momentum": 0.02}),
        (nk.FilterResponseNorm2d, {"eps": 1e-6}),
        (nk.EvoNormS0, {"num_groups": 8}),
        (nk.BatchChannelNorm2d, {"estimate": False}),  # bcn, not its variant bcn-micro
        (nk.CategoricalConditionalBatchNorm3d, {"split_stats": False}),
    ],
)
def test_a_class_of_a_family_with_defaults_names_that_family(
    to: type[nn.Module], attrs: dict[str, Any]
) -> None:
    kwargs = {"num_domains": 2} if to is nk.CategoricalConditionalBatchNorm3d else {}
    if to is nk.BatchChannelNorm2d:
        kwargs = {"num_groups": 4}
    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24))
    report = convert_norm(model, to, **kwargs)
    layer = model[1]
    expected = (
        nk.CategoricalConditionalBatchNorm2d if to is nk.CategoricalConditionalBatchNorm3d else to
    )
    assert type(layer) is expected
    for attr, value in attrs.items():
        assert getattr(layer, attr) == value, attr
    assert (
        report.target
        == {
            nk.BatchGroupNorm2d: "bgn",
            nk.MovingAverageBatchNorm2d: "mabn",
            nk.FilterResponseNorm2d: "frn",
            nk.EvoNormS0: "evonorm-s0",
            nk.BatchChannelNorm2d: "bcn",
            nk.CategoricalConditionalBatchNorm3d: "ccbn",
        }[to]
    )


# --- freeze_norm: atomicity, the other batch-statistics layers, exclude --------------------------


def test_freeze_refuses_an_uninitialized_lazy_norm_before_changing_anything() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d()
    )
    with pytest.raises(
        ValueError, match=r"freeze_norm: expected initialized norms, got '3' \(Lazy"
    ):
        freeze_norm(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight.requires_grad
    assert not hasattr(model[1], "_normkit_frozen_requires_grad")
    freeze_norm(model, exclude={"3"})
    assert type(model[1]).__name__ == "FrozenBatchNorm2d"
    model(torch.randn(2, 3, 2, 2))  # initializes the lazy layers
    freeze_norm(model)
    assert type(model[3]).__name__ == "FrozenBatchNorm2d" and not model[3].weight.requires_grad


def _batch_statistics_layers() -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [
        ("iternorm", nk.IterNorm2d(8, group_size=4)),
        ("evonorm-b0", nk.EvoNormB0(8)),
    ]
    # Statistics away from their init (a generator of its own: the global one is left alone).
    x = torch.randn(16, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1
    for _, layer in layers:
        layer.train()(x)
    return layers


BATCH_STATISTICS = _batch_statistics_layers()


@pytest.mark.parametrize(("name", "layer"), BATCH_STATISTICS, ids=[n for n, _ in BATCH_STATISTICS])
def test_freeze_freezes_batch_statistics_layers_that_are_not_batch_norms(
    name: str, layer: nn.Module
) -> None:
    layer = copy.deepcopy(layer)
    cls = type(layer)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), layer)
    x = torch.randn(6, 3, 4, 4)
    expected = copy.deepcopy(model).eval()(x)
    freeze_norm(model).train()
    assert isinstance(layer, cls) and type(layer).__name__ == f"Frozen{cls.__name__}"
    assert not layer.training and all(not p.requires_grad for p in layer.parameters())
    state = copy.deepcopy(layer.state_dict())
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x[:2]), out[:2], rtol=0, atol=1e-6)  # batch independent
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    torch.testing.assert_close(copy.deepcopy(model)(x), out, rtol=0, atol=0)
    unfreeze_norm(model)
    assert type(layer) is cls and layer.training
    assert all(p.requires_grad for p in layer.parameters())


def test_freeze_refuses_batch_statistics_layers_without_running_statistics() -> None:
    model = nn.Sequential(nk.IterNorm2d(8, group_size=4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'0' \(IterNorm2d\) with track_running_stats=False"):
        freeze_norm(model)
    assert type(model[0]) is nk.IterNorm2d


def test_excluding_the_root_name_excludes_everything() -> None:
    def model() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4)))

    m = model()
    with pytest.raises(ValueError, match=r"left alone: 1\.0 \(BatchNorm2d, excluded\)"):
        convert_norm(m, "sabn", num_domains=2, exclude={""})
    report = convert_norm(m, "sabn", num_domains=2, exclude={""}, strict=False)
    assert len(report) == 0 and type(m[1][0]) is nn.BatchNorm2d
    freeze_norm(m, exclude={""})
    assert type(m[1][0]) is nn.BatchNorm2d and m[1][0].weight.requires_grad
    # The same rule for weight_standardize_, which shares it.
    nk.weight_standardize_(m, exclude={""})
    assert type(m[0]) is nn.Conv2d
    # The root itself, when it is the norm, is excluded as before.
    root = nn.BatchNorm2d(4)
    assert len(convert_norm(root, "sabn", num_domains=2, exclude={""}, strict=False)) == 0
