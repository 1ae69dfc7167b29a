"""Revisiting BN: the small scale init, the parameter groups chosen by module type, InputNorm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normkit as nk

F64 = torch.float64


def test_relu_std_constant_is_the_rounded_std_of_relu_of_a_standard_normal() -> None:
    exact = math.sqrt(0.5 - 1 / (2 * math.pi))
    assert abs(nk.RELU_STD - exact) < 5e-3
    torch.manual_seed(0)
    sample = torch.relu(torch.randn(1_000_000, dtype=F64)).std().item()
    assert abs(sample - exact) < 2e-3


@pytest.mark.parametrize("cls", [nk.InputNorm1d, nk.InputNorm2d])
def test_input_norm_init_and_frozen_shift(cls: type[nn.Module]) -> None:
    layer = cls(3, scale=0.1)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert torch.allclose(layer.weight, torch.full((3,), 0.1 * 0.58))
    assert torch.equal(layer.bias, torch.zeros(3))
    assert layer.weight.requires_grad and not layer.bias.requires_grad
    layer.reset_parameters()
    assert torch.allclose(layer.weight, torch.full((3,), 0.058))


def test_input_norm_with_scale_one_over_relu_std_equals_batchnorm() -> None:
    # InputNorm is BN with a particular init: same keys and the same outputs and statistics.
    layer = nk.InputNorm2d(3, scale=1 / nk.RELU_STD, dtype=F64)
    bn = nn.BatchNorm2d(3, dtype=F64)
    assert layer.state_dict().keys() == bn.state_dict().keys()
    x = torch.rand(8, 3, 5, 5, dtype=F64)
    torch.testing.assert_close(layer(x), bn(x))
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    layer.eval()
    bn.eval()
    torch.testing.assert_close(layer(x), bn(x))
    result = nk.InputNorm2d(3).load_state_dict(bn.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_input_norm_running_stats_become_dataset_statistics() -> None:
    torch.manual_seed(0)
    data = torch.rand(4000, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1) + 0.5
    layer = nk.InputNorm2d(3, momentum=None)
    for batch in data.split(100):
        layer(batch)
    torch.testing.assert_close(layer.running_mean, data.mean(dim=(0, 2, 3)), rtol=0, atol=1e-4)
    torch.testing.assert_close(layer.running_var, data.var(dim=(0, 2, 3)), rtol=0, atol=1e-2)


def test_input_norm_refuses_non_positive_scale() -> None:
    with pytest.raises(ValueError, match=r"InputNorm2d: expected scale > 0, got 0"):
        nk.InputNorm2d(3, scale=0)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nk.InputNorm2d(3),
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise: its weight squeezes to 1-D in no case
        nk.SandwichBatchNorm2d(8, 2),
        nn.Conv2d(8, 16, 1),
        nk.BatchChannelNorm2d(16, 4),
        nn.GroupNorm(4, 16),
        nn.Flatten(),
        nn.LayerNorm(16 * 2 * 2),
        nn.Linear(64, 1),  # one output: the official name rule would call it a BN scale
        nn.Linear(1, 3),
    )


def test_init_bn_scale_sets_every_bn_scale_but_input_norm() -> None:
    net = _net()
    changed = nk.init_bn_scale_(net, 0.1)
    assert changed == 3  # BatchNorm2d, SaBN's shared scale, BCN's batch part
    assert torch.allclose(net[0].weight, torch.full((3,), 0.058))
    assert torch.equal(net[2].weight, torch.full((8,), 0.1))
    assert torch.equal(net[5].weight, torch.full((8,), 0.1))
    assert torch.equal(net[7].weight, torch.full((16,), 0.1))
    assert torch.equal(net[7].group_weight, torch.ones(4))
    assert torch.equal(net[8].weight, torch.ones(16))
    assert not torch.equal(net[5].domain_weight, torch.full((2, 8), 0.1))
    with pytest.raises(ValueError, match=r"init_bn_scale_: expected value > 0, got -1"):
        nk.init_bn_scale_(net, -1)


def test_bn_param_groups_put_exactly_the_intended_parameters_in_each_group() -> None:
    net = _net()
    groups = nk.bn_param_groups(net, lr=0.1, weight_decay=1e-4, scale_lr_divisor=100)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "bn_scale"}
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}

    def idset(*ps: torch.Tensor) -> set[int]:
        return {id(p) for p in ps}

    assert ids["bn_scale"] == idset(
        net[0].weight, net[2].weight, net[5].weight, net[5].domain_weight, net[7].weight
    )
    assert ids["decay"] == idset(
        net[1].weight, net[4].weight, net[6].weight, net[11].weight, net[12].weight
    )
    assert ids["no_decay"] == idset(
        net[2].bias,
        net[4].bias,
        net[5].bias,
        net[5].domain_bias,
        net[6].bias,
        net[7].bias,
        net[7].group_weight,
        net[7].group_bias,
        net[8].weight,
        net[8].bias,
        net[10].weight,
        net[10].bias,
        net[11].bias,
        net[12].bias,
    )
    # Every trainable parameter exactly once; InputNorm's frozen shift in none.
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in net.parameters() if p.requires_grad}
    assert id(net[0].bias) not in set(all_ids)
    assert by_name["bn_scale"]["lr"] == pytest.approx(1e-3)
    assert by_name["bn_scale"]["weight_decay"] == 0.0
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["decay"]["weight_decay"] == 1e-4
    assert by_name["decay"]["lr"] == by_name["no_decay"]["lr"] == 0.1
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted as given


def test_bn_param_groups_ignore_parameter_names_and_count_shared_modules_once() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_weight = nn.Parameter(torch.ones(4))  # a name the official rule would catch

    shared = nn.BatchNorm2d(4)
    net = nn.Sequential(shared, Odd(), shared)
    groups = {g["name"]: g for g in nk.bn_param_groups(net, 0.1, 1e-4)}
    assert [id(p) for p in groups["bn_scale"]["params"]] == [id(shared.weight)]
    assert [id(p) for p in groups["decay"]["params"]] == [id(net[1].bn_weight)]


def _group_names(model: nn.Module) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = nk.bn_param_groups(model, lr=0.1, weight_decay=5e-4)
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}


def test_bn_param_groups_decay_spectral_and_weight_norm_weights() -> None:
    # Hook-based and parametrization-based spectral/weight norm keep a conv's or linear
    # layer's weight under other names: it still decays (the paper and official code decay
    # conv and linear weights); only the bias (a parametrized one included) takes none.
    import warnings

    from torch.nn.utils import parametrizations, parametrize

    class Positive(nn.Module):
        def forward(self, b: torch.Tensor) -> torch.Tensor:
            return b.abs()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (the deprecated hook-based API)
        sn = nn.utils.spectral_norm(nn.Conv2d(3, 8, 3))
        wn = nn.utils.weight_norm(nn.Linear(8, 8))
    psn = parametrizations.spectral_norm(nn.Conv2d(8, 8, 3))
    pwn = parametrizations.weight_norm(nn.Conv2d(8, 8, 1))
    pbias = nn.Linear(8, 4)
    parametrize.register_parametrization(pbias, "bias", Positive())
    model = nn.Sequential(sn, nn.BatchNorm2d(8), wn, psn, pwn, pbias)
    assert _group_names(model) == {
        "decay": [
            "0.weight_orig",
            "2.weight_g",
            "2.weight_v",
            "3.parametrizations.weight.original",
            "4.parametrizations.weight.original0",
            "4.parametrizations.weight.original1",
            "5.weight",
        ],
        "no_decay": [
            "0.bias",
            "1.bias",
            "2.bias",
            "3.bias",
            "4.bias",
            "5.parametrizations.bias.original",
        ],
        "bn_scale": ["1.weight"],
    }


def test_bn_param_groups_give_no_decay_to_biases_of_other_modules() -> None:
    # The official rule outside convolutions, linear layers and norms: a parameter that
    # squeezes to 1-D and has no "weight" in its name is a bias (wd 0); the rest decays.
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(1, 4, 1))
            self.gain_weight = nn.Parameter(torch.ones(4))
            self.table = nn.Parameter(torch.ones(3, 4))
            self.temperature = nn.Parameter(torch.ones(()))

    model = nn.Sequential(
        nn.MultiheadAttention(8, 2, add_bias_kv=True), nn.Embedding(5, 8), Custom()
    )
    assert _group_names(model) == {
        "decay": [
            "0.in_proj_weight",
            "0.out_proj.weight",
            "1.weight",
            "2.gain_weight",
            "2.table",
            "2.temperature",
        ],
        "no_decay": ["0.bias_k", "0.bias_v", "0.in_proj_bias", "0.out_proj.bias", "2.shift"],
    }


def test_init_bn_scale_sets_the_domain_scales_of_layers_without_a_shared_affine() -> None:
    # AuxBN and CCBN have no shared affine: their BN scales are the per-domain ones (the
    # official AuxBN is one affine batch norm per branch, each scale set to c_γ), which
    # bn_param_groups also treats as the BN scales. SaBN: the shared scale only.
    import warnings

    model = nn.Sequential(
        nk.AuxBatchNorm2d(8, 2),
        nk.CategoricalConditionalBatchNorm2d(8, 3, split_stats=True),
        nk.SandwichBatchNorm2d(8, 2),
        nn.BatchNorm2d(8, affine=False),  # no scale at all
    )
    sabn_domain = model[2].domain_weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nk.init_bn_scale_(model, 0.1) == 3
    assert torch.equal(model[0].domain_weight, torch.full((2, 8), 0.1))
    assert torch.equal(model[1].domain_weight, torch.full((3, 8), 0.1))
    assert torch.equal(model[2].weight, torch.full((8,), 0.1))
    assert torch.equal(model[2].domain_weight, sabn_domain)
    assert torch.equal(model[0].domain_bias, torch.zeros(2, 8))
    scales = {
        id(p)
        for g in nk.bn_param_groups(model, 0.1, 1e-4)
        if g["name"] == "bn_scale"
        for p in g["params"]
    }
    assert {id(model[0].domain_weight), id(model[1].domain_weight), id(model[2].weight)} <= scales
    with pytest.raises(ValueError, match=r"a torch\.float16 scale can hold"):
        nk.init_bn_scale_(nk.AuxBatchNorm2d(4, 2, dtype=torch.float16), 1e6)


def test_bn_param_groups_omit_empty_groups_and_refuse_bad_divisor() -> None:
    groups = nk.bn_param_groups(nn.Linear(3, 3, bias=False), 0.1, 0.0)
    assert [g["name"] for g in groups] == ["decay"]
    with pytest.raises(ValueError, match="scale_lr_divisor > 0"):
        nk.bn_param_groups(nn.Linear(3, 3), 0.1, 0.0, scale_lr_divisor=0)


def test_bn_output_bound_sqrt_m_minus_one() -> None:
    # A value standardized within m samples satisfies |x̂| <= sqrt(m - 1) (Davis & Frank's
    # motivation); the bound is reached by one outlier.
    m = 16
    x = torch.zeros(m, 1, dtype=F64)
    x[0] = 1000.0
    layer = nk.SandwichBatchNorm1d(1, 1, domain_std=0.0, eps=1e-12, dtype=F64)
    out = layer(x, 0)
    assert out.abs().max().item() <= math.sqrt(m - 1) + 1e-9
    assert out.abs().max().item() == pytest.approx(math.sqrt(m - 1), rel=1e-9)


@pytest.mark.parametrize(
    ("cls", "shape"), [(nk.InputNorm1d, (6, 3)), (nk.InputNorm2d, (6, 3, 4, 4))]
)
def test_input_norm_matches_literal_reference_over_steps(
    cls: type[nn.Module], shape: tuple[int, ...]
) -> None:
    from tests.reference import RefConditionalBN

    layer = cls(3, scale=0.2, dtype=F64)
    ref = RefConditionalBN(3, 1, split=False)
    frozen_bias = torch.zeros(3, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.rand(shape, generator=gen, dtype=F64) * 3 + step
        for training in (True, False):
            layer.train(training)
            want = ref(
                x,
                torch.zeros(shape[0], dtype=torch.long),
                training=training,
                weight=torch.full((3,), 0.2 * 0.58, dtype=F64),
                bias=frozen_bias,
                domain_weight=None,
                domain_bias=None,
            )
            torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, ref.running_mean[0])
        torch.testing.assert_close(layer.running_var, ref.running_var[0])


@pytest.mark.parametrize("training", [True, False])
def test_input_norm_gradcheck(training: bool) -> None:
    layer = nk.InputNorm2d(3, dtype=F64).train(training)
    x = torch.rand(4, 3, 2, 2, dtype=F64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()

    def fn(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": w}, (inp,), strict=False)

    assert torch.autograd.gradcheck(fn, (x, weight))


def test_init_bn_scale_default_is_the_papers_0_1() -> None:
    # Every other test passes the value; the recipe's c_gamma = 0.1 is the default.
    bn = nn.BatchNorm2d(4)
    assert nk.init_bn_scale_(bn) == 1
    assert torch.equal(bn.weight.detach(), torch.full((4,), 0.1))
