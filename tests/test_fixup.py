"""Fixup building blocks: Bias/Scale, the init rule, fixup_init_ and fixup_param_groups."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit
from normkit import (
    Bias,
    FixupBlock,
    Scale,
    fixup_init_,
    fixup_param_groups,
    fixup_scale,
    he_normal_fan_out_,
)
from normkit.models import cifar_resnet, resnet20

fixup_names = normkit.fixup.__all__


def assert_std(weight: Tensor, expected: float) -> None:
    """The sample std of n i.i.d. normal values has relative standard error 1/sqrt(2(n-1)); allow
    6 of them (a false failure about once in 10^9), and the mean 6 standard errors of 0."""
    n = weight.numel()
    rel = weight.std().item() / expected
    assert abs(rel - 1) < 6 / math.sqrt(2 * (n - 1)), (rel, n)
    assert abs(weight.mean().item()) < 6 * expected / math.sqrt(n)


# --- Bias and Scale ------------------------------------------------------------------------------


def test_bias_is_a_zero_initialized_scalar_named_bias_added_to_the_input() -> None:
    b = Bias()
    assert [name for name, _ in b.named_parameters()] == ["bias"]
    assert b.bias.shape == (1,) and b.bias.item() == 0.0
    with torch.no_grad():
        b.bias.fill_(0.5)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(b(x), x + 0.5)


def test_scale_is_a_one_initialized_scalar_named_weight_multiplying_the_input() -> None:
    s = Scale()
    assert [name for name, _ in s.named_parameters()] == ["weight"]
    assert s.weight.shape == (1,) and s.weight.item() == 1.0
    with torch.no_grad():
        s.weight.fill_(-2.0)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(s(x), -2.0 * x)


def test_scalars_keep_the_input_dtype_and_pass_gradients_to_float32_parameters() -> None:
    b, s = Bias(), Scale()
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    y = s(b(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert b.bias.grad is not None and b.bias.grad.dtype == torch.float32
    assert s.weight.grad is not None and s.weight.grad.dtype == torch.float32


def test_scalars_honour_factory_kwargs_and_reset_parameters() -> None:
    b = Bias(dtype=torch.float64, device="cpu")
    s = Scale(dtype=torch.float64)
    assert b.bias.dtype == s.weight.dtype == torch.float64
    with torch.no_grad():
        b.bias.fill_(3.0)
        s.weight.fill_(3.0)
    b.reset_parameters()
    s.reset_parameters()
    assert b.bias.item() == 0.0 and s.weight.item() == 1.0


# --- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_branches", "m", "expected"),
    [(54, 2, 54**-0.5), (16, 3, 0.5), (1000, 4, 1000 ** (-1 / 6)), (1, 2, 1.0)],
)
def test_fixup_scale_is_L_to_the_minus_one_over_2m_minus_2(
    num_branches: int, m: int, expected: float
) -> None:
    assert fixup_scale(num_branches, m) == pytest.approx(expected, rel=1e-12)


def test_fixup_scale_refuses_m_below_2_and_nonpositive_branch_counts() -> None:
    with pytest.raises(ValueError, match=r"fixup_scale: expected m >= 2, got 1"):
        fixup_scale(10, 1)
    with pytest.raises(ValueError, match=r"fixup_scale: expected num_branches >= 1, got 0"):
        fixup_scale(0, 2)
    with pytest.raises(TypeError, match="num_branches"):
        fixup_scale(10.0, 2)  # type: ignore[arg-type]


def test_he_normal_fan_out_uses_out_channels_times_kernel_area_and_zeroes_the_bias() -> None:
    torch.manual_seed(0)
    # fan_in (8*9) and fan_out (64*9) differ by 8x, so a fan_in init would miss by sqrt(8).
    conv = nn.Conv2d(8, 64, 3, bias=True)
    he_normal_fan_out_(conv, scale=0.25)
    assert_std(conv.weight, 0.25 * math.sqrt(2 / (64 * 9)))
    assert conv.bias is not None and bool((conv.bias == 0).all())
    linear = nn.Linear(512, 32)
    he_normal_fan_out_(linear)
    assert_std(linear.weight, math.sqrt(2 / 32))


def test_he_normal_fan_out_refuses_a_layer_without_a_matrix_weight() -> None:
    with pytest.raises(TypeError, match=r"he_normal_fan_out_: expected a weight layer.*ReLU"):
        he_normal_fan_out_(nn.ReLU())
    with pytest.raises(TypeError, match=r"BatchNorm1d with weight of shape \(4,\)"):
        he_normal_fan_out_(nn.BatchNorm1d(4))


# --- fixup_init_ on a user-defined model ---------------------------------------------------------


class MLPBlock(nn.Module):
    """The residual MLP block of the reference's CPU experiments, with Fixup scalars."""

    def __init__(self, width: int, depth: int = 2) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.biases = nn.ModuleList(Bias() for _ in range(2 * depth))
        self.scale = Scale()

    def fixup_branch_layers(self) -> Sequence[nn.Module]:
        return list(self.fcs)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i, fc in enumerate(self.fcs):
            h = self.biases[2 * i + 1](fc(self.biases[2 * i](h)))
            if i < len(self.fcs) - 1:
                h = F.relu(h)
        return F.relu(x + self.scale(h))


def scramble_(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)


def test_fixup_init_applies_the_rule_to_any_module_with_fixup_branch_layers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[MLPBlock(64, depth=3) for _ in range(25)])
    assert isinstance(net[0], FixupBlock)
    scramble_(net)
    assert fixup_init_(net) is net
    for block in net:
        # L = 25 blocks, m = 3 layers: std sqrt(2/64) * 25 ** -0.25
        for fc in block.fcs[:-1]:
            assert_std(fc.weight, math.sqrt(2 / 64) * 25**-0.25)
            assert bool((fc.bias == 0).all())
        assert bool((block.fcs[-1].weight == 0).all()) and bool((block.fcs[-1].bias == 0).all())
        assert all(b.bias.item() == 0.0 for b in block.biases)
        assert block.scale.weight.item() == 1.0
    x = torch.randn(5, 64).relu()
    torch.testing.assert_close(net(x), x, rtol=0, atol=0)


def test_fixup_init_honours_explicit_branch_count_and_m() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[MLPBlock(128) for _ in range(3)])
    fixup_init_(net, num_branches=10_000, m=3)
    assert_std(net[0].fcs[0].weight, math.sqrt(2 / 128) * 10_000**-0.25)


def test_fixup_init_on_a_reference_resnet_initializes_branches_and_scalars_only() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(56, fixup=True)  # L = 27 basic blocks
    scramble_(model)
    fixup_init_(model)
    for block in model.blocks():
        w = block.conv1.weight
        assert_std(w, math.sqrt(2 / (w.shape[0] * 9)) * 27**-0.5)
        assert bool((block.conv2.weight == 0).all())
        biases = (block.bias1a, block.bias1b, block.bias2a, block.bias2b)
        assert all(b.bias.item() == 0.0 for b in biases)
        assert block.scale.weight.item() == 1.0
    assert model.bias1 is not None and model.bias1.bias.item() == 0.0
    # the stem and the classifier are the caller's: still scrambled
    assert bool((model.conv1.weight >= 0.5).all()) and bool((model.fc.weight >= 0.5).all())


def test_fixup_init_refuses_a_model_without_blocks() -> None:
    with pytest.raises(ValueError, match=r"fixup_init_: expected residual blocks.*Linear"):
        fixup_init_(nn.Linear(3, 3))


# --- fixup_param_groups --------------------------------------------------------------------------


class UserNet(nn.Module):
    """A Fixup body next to parameters whose names a substring rule would catch."""

    def __init__(self) -> None:
        super().__init__()
        self.body = cifar_resnet(14, fixup=True, width=4)
        self.bias = nn.Parameter(torch.zeros(3))
        self.scale = nn.Parameter(torch.ones(1))
        self.head_bias_scale = nn.Linear(10, 2)


def scalar_params(model: nn.Module) -> set[int]:
    return {
        id(p) for mod in model.modules() if isinstance(mod, (Bias, Scale)) for p in mod.parameters()
    }


def by_name(groups: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(g["name"]): g for g in groups}


def test_param_groups_put_exactly_the_fixup_scalars_in_the_reduced_lr_group() -> None:
    net = UserNet()
    groups = by_name(fixup_param_groups(net, lr=0.2, scalar_lr_mult=0.05, weight_decay=1e-4))
    assert list(groups) == ["default", "fixup_scalars"]
    scalars = groups["fixup_scalars"]["params"]
    default = groups["default"]["params"]
    assert isinstance(scalars, list) and isinstance(default, list)
    # 2 blocks per stage, 3 stages, 5 scalars each, plus the stem and head biases
    assert len(scalars) == 6 * 5 + 2
    assert {id(p) for p in scalars} == scalar_params(net)
    for caught_by_name in (net.bias, net.scale, net.head_bias_scale.bias, net.body.fc.bias):
        assert any(p is caught_by_name for p in default)
    assert groups["fixup_scalars"]["lr"] == pytest.approx(0.01)
    assert groups["fixup_scalars"]["weight_decay"] == 0.0
    assert groups["default"]["lr"] == 0.2 and groups["default"]["weight_decay"] == 1e-4


def test_param_groups_hold_every_trainable_parameter_exactly_once() -> None:
    net = UserNet()
    groups = fixup_param_groups(net, lr=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters()}
    torch.optim.SGD(groups, lr=0.1)  # refuses a parameter in two groups


def test_param_groups_count_shared_modules_once_and_leave_out_frozen_parameters() -> None:
    shared_bias, shared_fc = Bias(), nn.Linear(4, 4)
    frozen_bias, frozen_fc = Bias(), nn.Linear(4, 4)
    frozen_bias.requires_grad_(False)
    frozen_fc.weight.requires_grad_(False)
    net = nn.Sequential(shared_bias, shared_fc, shared_bias, shared_fc, frozen_bias, frozen_fc)
    groups = by_name(fixup_param_groups(net, lr=0.1))
    scalars, default = groups["fixup_scalars"]["params"], groups["default"]["params"]
    assert isinstance(scalars, list) and isinstance(default, list)
    assert [id(p) for p in scalars] == [id(shared_bias.bias)]
    assert {id(p) for p in default} == {
        id(shared_fc.weight),
        id(shared_fc.bias),
        id(frozen_fc.bias),
    }
    assert len(default) == 3


def test_param_groups_omit_empty_groups_and_select_subclasses_by_type() -> None:
    class MyBias(Bias):
        pass

    plain = fixup_param_groups(nn.Linear(3, 3), lr=0.1)
    assert [g["name"] for g in plain] == ["default"]
    only_scalars = fixup_param_groups(nn.Sequential(MyBias(), Scale()), lr=0.1)
    assert [g["name"] for g in only_scalars] == ["fixup_scalars"]
    assert len(only_scalars[0]["params"]) == 2
    assert fixup_param_groups(nn.Linear(3, 3).requires_grad_(False), lr=0.1) == []


def test_param_groups_reproduce_the_official_setting_when_asked() -> None:
    groups = by_name(
        fixup_param_groups(
            resnet20(fixup=True), lr=0.1, scalar_weight_decay=5e-4, weight_decay=5e-4
        )
    )
    assert groups["fixup_scalars"]["weight_decay"] == groups["default"]["weight_decay"] == 5e-4
    assert groups["fixup_scalars"]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -0.1}, ValueError, r"expected lr >= 0, got -0.1"),
        ({"lr": 0.1, "scalar_lr_mult": -1}, ValueError, r"expected scalar_lr_mult >= 0"),
        (
            {"lr": 0.1, "weight_decay": float("nan")},
            ValueError,
            r"expected weight_decay >= 0, got nan",
        ),
        ({"lr": True}, TypeError, r"expected lr to be a number, got True"),
        (
            {"lr": 0.1, "scalar_weight_decay": "0"},
            TypeError,
            r"expected scalar_weight_decay to be a number",
        ),
    ],
)
def test_param_groups_refuse_bad_hyperparameters(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"fixup_param_groups: {message}"):
        fixup_param_groups(nn.Linear(2, 2), **kwargs)  # type: ignore[arg-type]


# --- training ------------------------------------------------------------------------------------


def test_sgd_on_a_fixup_resnet20_reduces_the_loss_and_grows_the_zero_initialized_layers() -> None:
    torch.manual_seed(0)
    model = resnet20(fixup=True)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(fixup_param_groups(model, lr=0.1), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(10), abs=1e-6)  # zero logits at init
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0]
    # zero-initialized last convs get a gradient from the first step and leave 0
    assert all(bool(block.conv2.weight.abs().max() > 0) for block in model.blocks())


def test_fixup_names_are_public_from_normkit() -> None:
    for name in fixup_names:
        assert getattr(normkit, name) is getattr(normkit.fixup, name)


def test_gradcheck_scalars_and_fixup_blocks_in_float64() -> None:
    from normkit.models import FixupBasicBlock, FixupBottleneck

    torch.manual_seed(0)
    for module in (normkit.Bias(dtype=torch.float64), normkit.Scale(dtype=torch.float64)):
        with torch.no_grad():
            next(module.parameters()).fill_(0.7)
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(module, (x,))
    blocks = [
        FixupBasicBlock(4, 6, stride=2),
        FixupBottleneck(4, 2, stride=1),
    ]
    for block in blocks:
        block = block.double()
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.3 * torch.randn_like(p))  # leave the zero init, so every path matters
        x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        names = [n for n, _ in block.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in block.parameters()]

        def fn(
            inp: torch.Tensor, *ps: torch.Tensor, block: nn.Module = block, names: list[str] = names
        ) -> torch.Tensor:
            return torch.func.functional_call(block, dict(zip(names, ps)), (inp,))

        assert torch.autograd.gradcheck(fn, (x, *params))


def test_scalars_combine_with_an_input_on_another_device() -> None:
    """The scalars are 0-dim operands, which torch combines with a tensor on any device (here
    the meta device, as shape-only tracing uses)."""
    x = torch.randn(2, 3, device="meta")
    assert Bias()(x).shape == (2, 3) and Scale()(x).shape == (2, 3)
