"""normkit.condition: the domain index reaches every conditional layer of an unmodified model."""

from __future__ import annotations

import asyncio
import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

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


def _biased_layer() -> nk.SandwichBatchNorm2d:
    """A SaBN whose output is its domain's index everywhere (for a zero input in eval)."""
    layer = nk.SandwichBatchNorm2d(4, 3).eval()
    with torch.no_grad():
        layer.domain_bias.copy_(torch.arange(3.0).unsqueeze(1).expand(3, 4))
    return layer


def _used(layer: nn.Module) -> float:
    """The domain index ``layer`` runs with (see :func:`_biased_layer`)."""
    return float(layer(torch.zeros(2, 4, 1, 1)).detach().flatten()[0])


def test_blocks_that_exit_out_of_order_keep_their_own_index() -> None:
    # As a suspended generator or two interleaved asyncio tasks can do: A opens, B opens, A exits.
    layer = _biased_layer()
    a, b = nk.condition(layer, 1), nk.condition(layer, 2)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert _used(layer) == 2  # B is still open
    b.__exit__(None, None, None)
    assert layer.context_domain is None  # nothing of A comes back
    with pytest.raises(ValueError, match="expected a domain index"):
        _used(layer)


def test_threads_conditioning_one_model_do_not_interfere() -> None:
    # Forced order: A and B (other domains) both open, A exits while B is inside, then B runs.
    layer = _biased_layer()
    both_in, a_out = threading.Barrier(2), threading.Event()
    seen: dict[str, object] = {}

    def a() -> None:
        with nk.condition(layer, 1):
            both_in.wait()
            seen["a"] = _used(layer)
        a_out.set()

    def b() -> None:
        with nk.condition(layer, 2):
            both_in.wait()
            a_out.wait()
            try:
                seen["b"] = _used(layer)
            except ValueError as e:
                seen["b"] = e

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": 1.0, "b": 2.0}
    assert layer.context_domain is None
    with pytest.raises(ValueError, match="expected a domain index"):
        _used(layer)


def test_asyncio_tasks_that_interleave_leave_no_index_behind() -> None:
    layer = _biased_layer()
    seen: list[float] = []

    async def main() -> None:
        a_in, a_out = asyncio.Event(), asyncio.Event()

        async def a() -> None:
            with nk.condition(layer, 1):
                a_in.set()
                await asyncio.sleep(0)
            a_out.set()

        async def b() -> None:
            await a_in.wait()
            with nk.condition(layer, 1):
                await a_out.wait()
                seen.append(_used(layer))

        await asyncio.gather(a(), b())

    asyncio.run(main())
    assert seen == [1.0]
    with pytest.raises(ValueError, match="expected a domain index"):
        _used(layer)


def _copies(net: nn.Module) -> dict[str, nn.Module]:
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    return {
        "deepcopy": copy.deepcopy(net),
        "pickle": pickle.loads(pickle.dumps(net)),
        "torch.save": torch.load(buf, weights_only=False),
        "prepare_for_inference": nk.prepare_for_inference(net)[0],
    }


def test_a_copy_made_inside_a_block_carries_no_index() -> None:
    net = _net().eval()
    x = torch.randn(2, 3, 6, 6)
    with nk.condition(net, 2):
        copies = _copies(net)
        expected = net(x)
        for name, c in copies.items():
            assert all(m.context_domain is None for m in nk.conditional_layers(c)), name
            with pytest.raises(ValueError, match="expected a domain index"):
                c(x)  # the block conditions `net`, not its copy
    for name, c in copies.items():
        with pytest.raises(ValueError, match="expected a domain index"):
            c(x)
        with nk.condition(c, 2):
            torch.testing.assert_close(c(x), expected, msg=name)


def test_an_assigned_context_domain_is_a_default_that_blocks_override() -> None:
    layer = _biased_layer()
    layer.context_domain = 1  # as prepare_for_inference(model, domain=1) does
    assert _used(layer) == 1
    with nk.condition(layer, 2):
        assert layer.context_domain == 2
        assert _used(layer) == 2
    assert _used(layer) == 1
    assert _used(copy.deepcopy(layer)) == 1


def test_a_data_parallel_replica_runs_with_the_index_of_the_block_it_was_made_in() -> None:
    layer = _biased_layer()
    with nk.condition(layer, 2):
        replica = layer._replicate_for_data_parallel()
    replica._parameters = dict(layer._parameters)  # as nn.parallel.replicate gives it
    seen: list[float] = []
    worker = threading.Thread(target=lambda: seen.append(_used(replica)))  # as parallel_apply
    worker.start()
    worker.join()
    assert seen == [2.0]
    assert layer.context_domain is None


class _ForeignNorm(nn.Module):
    """A layer outside normkit that joins by the documented protocol."""

    takes_domain = True
    context_domain = None

    def forward(self, x: torch.Tensor, domain: int | None = None) -> torch.Tensor:
        if domain is None:
            domain = self.context_domain
        if domain is None:
            raise ValueError("_ForeignNorm: expected a domain index")
        return x + domain


def test_a_foreign_layer_following_the_protocol_is_conditioned() -> None:
    layer = _ForeignNorm()
    x = torch.zeros(2)
    with nk.condition(layer, 1):
        assert torch.equal(layer(x), torch.ones(2))
        with nk.condition(layer, 2):
            assert torch.equal(layer(x), torch.full((2,), 2.0))
        assert torch.equal(layer(x), torch.ones(2))
    assert layer.context_domain is None
    with pytest.raises(ValueError, match="expected a domain index"):
        layer(x)


def test_compiled_model_follows_the_index_of_each_call_and_thread() -> None:
    net = _net().eval()
    with torch.no_grad():
        for m in nk.conditional_layers(net):
            m.domain_weight.normal_(1, 0.5)
    counter = CompileCounter()
    compiled = torch.compile(net, fullgraph=True, backend=counter)
    x = torch.randn(4, 3, 6, 6)
    pair, other = torch.tensor([0, 1, 2, 1]), torch.tensor([2, 2, 0, 1])
    domains: list[int | torch.Tensor] = [0, 2, 1, pair, other, 1, 0] * 3
    for domain in domains:
        with nk.condition(net, domain):
            torch.testing.assert_close(compiled(x), _explicit(net, x, domain))
    assert counter.frame_count <= 4  # int specialized, then dynamic; tensors: one graph
    with nk.condition(net, 1):
        with nk.condition(net[3], 2):
            inner = compiled(x)
        torch.testing.assert_close(compiled(x), _explicit(net, x, 1))
    expected = net[7](net[6](net[5](net[4](net[3][1](net[3][0](net[2](net[1](net[0](x), 1))), 2)))))
    torch.testing.assert_close(inner, expected)
    with pytest.raises(Exception, match="expected a domain index, got None"):
        compiled(x)  # (fullgraph: dynamo's error names the layer's)
    both_in = threading.Barrier(2)
    outs: dict[int, torch.Tensor] = {}

    def run(domain: int) -> None:
        with nk.condition(net, domain):
            both_in.wait()
            outs[domain] = compiled(x)
            both_in.wait()

    threads = [threading.Thread(target=run, args=(d,)) for d in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in (0, 2):
        torch.testing.assert_close(outs[d], _explicit(net, x, d))
    with nk.condition(net, 2):
        torch.testing.assert_close(compiled(x), _explicit(net, x, 2))
    assert counter.frame_count <= 6
