"""normkit.condition: the domain index reaches every conditional layer of an unmodified model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.models import resnet20


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nk.SandwichBatchNorm2d(8, 3),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nk.CategoricalConditionalBatchNorm2d(8, 3)),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _explicit(net: nn.Sequential, x: torch.Tensor, domain: int | torch.Tensor) -> torch.Tensor:
    h = net[2](net[1](net[0](x), domain))
    h = net[4](net[3][1](net[3][0](h), domain))
    return net[7](net[6](net[5](h)))


@pytest.mark.parametrize("domain", [1, torch.tensor([0, 2, 1, 2])])
def test_context_equals_explicit_indices(domain: int | torch.Tensor) -> None:
    net = _net().eval()
    with torch.no_grad():
        for m in nk.conditional_layers(net):
            m.domain_weight.normal_(1, 0.5)
    x = torch.randn(4, 3, 6, 6)
    with nk.condition(net, domain):
        out = net(x)
    torch.testing.assert_close(out, _explicit(net, x, domain))


def test_explicit_index_wins_inside_a_context() -> None:
    layer = nk.SandwichBatchNorm2d(4, 3).eval()
    with torch.no_grad():
        layer.domain_bias.copy_(torch.arange(3.0).unsqueeze(1).expand(3, 4))
    x = torch.zeros(2, 4, 2, 2)
    with nk.condition(layer, 0):
        assert torch.equal(layer(x, 2), torch.full_like(x, 2.0))
        assert torch.equal(layer(x), torch.zeros_like(x))


def test_no_index_outside_a_context_raises_a_clear_error() -> None:
    net = _net()
    with pytest.raises(ValueError, match=r"SandwichBatchNorm2d: expected a domain index, got None"):
        net(torch.randn(2, 3, 6, 6))


def test_nested_and_repeated_contexts_restore_the_outer_index() -> None:
    layer = nk.AuxBatchNorm2d(4, 3).eval()
    with torch.no_grad():
        layer.domain_bias.copy_(torch.arange(3.0).unsqueeze(1).expand(3, 4))
    x = torch.zeros(1, 4, 1, 1)
    with nk.condition(layer, 1):
        assert layer(x).flatten()[0] == 1
        with nk.condition(layer, 2):
            assert layer(x).flatten()[0] == 2
            with nk.condition(layer, 0):
                assert layer(x).flatten()[0] == 0
            assert layer(x).flatten()[0] == 2
        assert layer(x).flatten()[0] == 1
        with nk.condition(layer, 2):
            assert layer(x).flatten()[0] == 2
        assert layer(x).flatten()[0] == 1
    assert layer.context_domain is None
    with pytest.raises(ValueError, match="expected a domain index"):
        layer(x)


def test_index_is_cleared_when_forward_raises() -> None:
    net = _net()
    with (
        pytest.raises(ValueError, match=r"shape \(2,\)"),
        nk.condition(net, torch.tensor([0, 1, 2])),
    ):
        net(torch.randn(2, 3, 6, 6))
    assert all(m.context_domain is None for m in nk.conditional_layers(net))
    with pytest.raises(ValueError, match="expected a domain index"):
        net(torch.randn(2, 3, 6, 6))


def test_a_bad_index_is_refused_by_the_layer_at_forward() -> None:
    net = _net()
    with nk.condition(net, torch.tensor([0, 5])), pytest.raises(ValueError, match="got 5"):
        net(torch.randn(2, 3, 6, 6))
    with (
        pytest.raises(TypeError, match="condition: expected an integer domain tensor"),
        nk.condition(net, torch.tensor([0.0, 1.0])),
    ):
        pass
    with pytest.raises(ValueError, match="shape"), nk.condition(net, torch.tensor([[0, 1]])):
        pass


def test_model_without_conditional_layers_is_refused() -> None:
    plain = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with (
        pytest.raises(ValueError, match="condition: expected a model with conditional layers"),
        nk.condition(plain, 0),
    ):
        pass


def test_torchvision_style_resnet_trains_with_sabn_through_the_context() -> None:
    model = resnet20(norm_layer=nk.get_norm_layer("sabn", num_domains=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    domain = torch.tensor([0, 1, 2, 0, 1, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "domain" in n}
    with nk.condition(model, domain):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [
        n for n, p in model.named_parameters() if "domain" in n and not torch.equal(p, before[n])
    ]
    assert len(changed) == 2 * 19


def test_context_works_under_compile() -> None:
    net = _net().eval()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    x = torch.randn(4, 3, 6, 6)
    domain = torch.tensor([0, 1, 2, 1])
    with nk.condition(net, domain):
        got = compiled(x)
    torch.testing.assert_close(got, _explicit(net, x, domain))
