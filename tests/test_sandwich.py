"""Sandwich BN, CCBN, AuxBN and SaAdaIN against literal references and the paper's identities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit as nk
from normkit import kernels
from tests.reference import RefConditionalBN, bcast

F64 = torch.float64

SHAPES = {1: (6, 4, 3), 2: (6, 4, 3, 3), 3: (6, 4, 2, 3, 2)}
CLASSES = {
    "sabn": {1: nk.SandwichBatchNorm1d, 2: nk.SandwichBatchNorm2d, 3: nk.SandwichBatchNorm3d},
    "ccbn": {
        1: nk.CategoricalConditionalBatchNorm1d,
        2: nk.CategoricalConditionalBatchNorm2d,
        3: nk.CategoricalConditionalBatchNorm3d,
    },
    "auxbn": {1: nk.AuxBatchNorm1d, 2: nk.AuxBatchNorm2d, 3: nk.AuxBatchNorm3d},
}


def _randomize(layer: nn.Module, seed: int = 0) -> None:
    """Move every parameter away from its init so that each affine matters in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _build(kind: str, dim: int, k: int, split: bool, momentum: float | None) -> nn.Module:
    cls = CLASSES[kind][dim]
    if kind == "auxbn":
        return cls(4, k, momentum=momentum, dtype=F64)
    return cls(4, k, momentum=momentum, split_stats=split, dtype=F64)


CASES = [
    ("sabn", False),
    ("sabn", True),
    ("ccbn", False),
    ("ccbn", True),
    ("auxbn", True),
]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(("kind", "split"), CASES)
@pytest.mark.parametrize("index_kind", ["per_sample", "int"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_literal_reference_over_steps(
    dim: int, kind: str, split: bool, index_kind: str, momentum: float | None
) -> None:
    k = 3
    layer = _build(kind, dim, k, split, momentum)
    _randomize(layer)
    ref = RefConditionalBN(4, k, split=split, momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    params = {
        "weight": getattr(layer, "weight", None),
        "bias": getattr(layer, "bias", None),
        "domain_weight": layer.domain_weight,
        "domain_bias": layer.domain_bias,
    }
    for step in range(4):
        x = torch.randn(SHAPES[dim], generator=gen, dtype=F64) * 2 + step
        if index_kind == "int":
            domain_arg: int | torch.Tensor = step % k
            domain = torch.full((x.shape[0],), step % k)
        else:
            domain = torch.tensor([0, 1, 2, 0, 1, 0][: x.shape[0]]).roll(step)
            domain_arg = domain
        for training in (True, False):
            layer.train(training)
            got = layer(x, domain_arg)
            want = ref(x, domain, training=training, **params)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        rm = layer.running_mean if split else layer.running_mean.unsqueeze(0)
        rv = layer.running_var if split else layer.running_var.unsqueeze(0)
        torch.testing.assert_close(rm, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, ref.running_var, rtol=1e-12, atol=1e-12)


def test_sabn_one_domain_identity_affine_equals_batchnorm2d() -> None:
    torch.manual_seed(0)
    sabn = nk.SandwichBatchNorm2d(5, 1, domain_std=0.0, dtype=F64)
    bn = nn.BatchNorm2d(5, dtype=F64)
    with torch.no_grad():
        for layer in (sabn, bn):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 5))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    for step in range(3):
        x = torch.randn(4, 5, 3, 3, dtype=F64) + step
        torch.testing.assert_close(sabn(x, 0), bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sabn.running_mean, bn.running_mean)
    torch.testing.assert_close(sabn.running_var, bn.running_var)
    assert int(sabn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    sabn.eval()
    bn.eval()
    x = torch.randn(4, 5, 3, 3, dtype=F64)
    torch.testing.assert_close(sabn(x, 0), bn(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split", [False, True])
def test_sabn_identity_shared_affine_equals_ccbn(split: bool) -> None:
    sabn = nk.SandwichBatchNorm2d(4, 3, split_stats=split, dtype=F64)
    ccbn = nk.CategoricalConditionalBatchNorm2d(4, 3, split_stats=split, dtype=F64)
    _randomize(ccbn, seed=3)
    with torch.no_grad():
        sabn.domain_weight.copy_(ccbn.domain_weight)
        sabn.domain_bias.copy_(ccbn.domain_bias)
    x = torch.randn(6, 4, 3, 3, dtype=F64)
    domain = torch.tensor([2, 0, 1, 1, 0, 2])
    for training in (True, False):
        sabn.train(training)
        ccbn.train(training)
        torch.testing.assert_close(sabn(x, domain), ccbn(x, domain), rtol=1e-12, atol=1e-12)


def test_split_stats_with_one_domain_equals_batchnorm_on_that_domain() -> None:
    sabn = nk.SandwichBatchNorm2d(4, 3, split_stats=True, domain_std=0.0, dtype=F64)
    bn = nn.BatchNorm2d(4, dtype=F64)
    for step in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=F64) * 3 + step
        torch.testing.assert_close(sabn(x, torch.full((5,), 1)), bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sabn.running_mean[1], bn.running_mean)
    torch.testing.assert_close(sabn.running_var[1], bn.running_var)
    # Only the running statistics of the domain present change.
    for k in (0, 2):
        assert torch.equal(sabn.running_mean[k], torch.zeros(4, dtype=F64))
        assert torch.equal(sabn.running_var[k], torch.ones(4, dtype=F64))
    assert sabn.num_batches_tracked.tolist() == [0, 3, 0]


@pytest.mark.parametrize(("kind", "split"), CASES)
def test_int_index_equals_filled_long_tensor(kind: str, split: bool) -> None:
    a = _build(kind, 2, 3, split, 0.1)
    _randomize(a)
    b = _build(kind, 2, 3, split, 0.1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 4, 3, 3, dtype=F64)
    torch.testing.assert_close(a(x, 2), b(x, torch.full((4,), 2)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kind", "split"), CASES)
def test_absent_domain_rows_get_zero_gradient(kind: str, split: bool) -> None:
    layer = _build(kind, 2, 4, split, 0.1)
    _randomize(layer)
    x = torch.randn(6, 4, 3, 3, dtype=F64)
    layer(x, torch.tensor([0, 2, 2, 0, 2, 0])).square().sum().backward()
    grad = layer.domain_weight.grad
    assert grad is not None
    assert torch.count_nonzero(grad[[1, 3]]) == 0
    assert torch.count_nonzero(grad[[0, 2]]) > 0


def test_output_of_a_sample_depends_only_on_its_own_domain_row() -> None:
    layer = nk.SandwichBatchNorm2d(4, 3, dtype=F64).eval()
    _randomize(layer)
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    domain = torch.tensor([0, 1, 2])
    before = layer(x, domain)
    with torch.no_grad():
        layer.domain_weight[1].mul_(3.0)
    after = layer(x, domain)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])
    assert not torch.allclose(after[1], before[1])


def test_init_distributions_and_shared_init_option() -> None:
    torch.manual_seed(0)
    layer = nk.SandwichBatchNorm2d(256, 40)
    assert torch.equal(layer.weight, torch.ones(256))
    assert torch.equal(layer.bias, torch.zeros(256))
    assert torch.equal(layer.domain_bias, torch.zeros(40, 256))
    dw = layer.domain_weight.detach()
    assert abs(dw.mean().item() - 1.0) < 0.002
    assert abs(dw.std().item() - 0.02) < 0.002
    gan = nk.SandwichBatchNorm2d(256, 4, shared_std=0.02, domain_std=0.05)
    assert abs(gan.weight.detach().std().item() - 0.02) < 0.005
    assert abs(gan.domain_weight.detach().std().item() - 0.05) < 0.006
    exact = nk.SandwichBatchNorm2d(8, 2, domain_std=0.0)
    assert torch.equal(exact.domain_weight, torch.ones(2, 8))
    aux = nk.AuxBatchNorm2d(8, 2)
    assert torch.equal(aux.domain_weight, torch.ones(2, 8))


def test_parameter_and_buffer_names_and_shapes() -> None:
    sabn = nk.SandwichBatchNorm2d(8, 3)
    assert {n: tuple(p.shape) for n, p in sabn.named_parameters()} == {
        "weight": (8,),
        "bias": (8,),
        "domain_weight": (3, 8),
        "domain_bias": (3, 8),
    }
    assert {n: tuple(b.shape) for n, b in sabn.named_buffers()} == {
        "running_mean": (8,),
        "running_var": (8,),
        "num_batches_tracked": (),
    }
    split = nk.SandwichBatchNorm2d(8, 3, split_stats=True)
    assert {n: tuple(b.shape) for n, b in split.named_buffers()} == {
        "running_mean": (3, 8),
        "running_var": (3, 8),
        "num_batches_tracked": (3,),
    }
    ccbn = nk.CategoricalConditionalBatchNorm2d(8, 3)
    assert {n for n, _ in ccbn.named_parameters()} == {"domain_weight", "domain_bias"}
    assert {n for n, _ in ccbn.named_buffers()} == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }


def test_batchnorm_state_dict_loads_into_shared_parts() -> None:
    bn = nn.BatchNorm2d(6)
    bn(torch.randn(8, 6, 4, 4) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    sabn = nk.SandwichBatchNorm2d(6, 3)
    result = sabn.load_state_dict(bn.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["domain_bias", "domain_weight"]
    assert result.unexpected_keys == []
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sabn, name), getattr(bn, name))

    # CCBN has no shared affine: BN's affine becomes every domain's affine, so the loaded layer
    # computes the BN's function whatever the domain.
    ccbn = nk.CategoricalConditionalBatchNorm2d(6, 3)
    result = ccbn.load_state_dict(bn.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(4, 6, 4, 4)
    bn.eval()
    ccbn.eval()
    torch.testing.assert_close(ccbn(x, torch.tensor([0, 1, 2, 1])), bn(x))


def test_split_and_aux_load_batchnorm_statistics_into_every_domain() -> None:
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    aux = nk.AuxBatchNorm2d(6, 2).eval()
    result = aux.load_state_dict(bn.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(3, 6, 2, 2)
    torch.testing.assert_close(aux(x, 1), bn(x))
    torch.testing.assert_close(aux(x, torch.tensor([0, 1, 0])), bn(x))
    # A checkpoint of the split layer itself round-trips unchanged.
    fresh = nk.AuxBatchNorm2d(6, 2)
    fresh.load_state_dict(aux.state_dict())
    assert torch.equal(fresh.running_mean, aux.running_mean)


@pytest.mark.parametrize(("kind", "split"), CASES)
@pytest.mark.parametrize("index_kind", ["per_sample", "int"])
def test_gradcheck(kind: str, split: bool, index_kind: str) -> None:
    layer = _build(kind, 2, 3, split, 0.1)
    _randomize(layer)
    x = torch.randn(6, 4, 2, 2, dtype=F64, requires_grad=True)
    domain: int | torch.Tensor = 1 if index_kind == "int" else torch.tensor([0, 1, 2, 0, 1, 2])
    params = [p for p in layer.parameters()]

    def fn(inp: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (inp, domain)
        )

    layer.train()
    assert torch.autograd.gradcheck(fn, (x, *params))
    layer.eval()
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_split_stats_gradgradcheck() -> None:
    layer = nk.SandwichBatchNorm2d(3, 2, split_stats=True, dtype=F64)
    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    domain = torch.tensor([0, 1, 1, 0])
    assert torch.autograd.gradgradcheck(lambda t: layer(t, domain), (x,))


def _ref_adain(
    c: torch.Tensor, s: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> torch.Tensor:
    dims = list(range(2, c.dim()))
    cm = c.mean(dim=dims, keepdim=True)
    cv = c.var(dim=dims, keepdim=True, unbiased=True)
    sm = s.mean(dim=dims, keepdim=True)
    sstd = torch.sqrt(s.var(dim=dims, keepdim=True, unbiased=True) + eps)
    h = (c - cm) / torch.sqrt(cv + eps)
    if w is not None and b is not None:
        h = bcast(w, c) * h + bcast(b, c)
    return sstd * h + sm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("style_batch", [1, 3])
def test_sandwich_adain_matches_reference(affine: bool, style_batch: int) -> None:
    layer = nk.SandwichAdaIN(4, affine=affine, dtype=F64)
    if affine:
        assert torch.equal(layer.weight, torch.ones(4, dtype=F64))
        assert torch.equal(layer.bias, torch.zeros(4, dtype=F64))
        _randomize(layer)
    content = torch.randn(3, 4, 5, 5, dtype=F64)
    style = torch.randn(style_batch, 4, 6, 6, dtype=F64) * 3 + 2
    want = _ref_adain(content, style, layer.weight, layer.bias, 1e-5)
    torch.testing.assert_close(layer(content, style), want, rtol=1e-12, atol=1e-12)


def test_sandwich_adain_gradcheck() -> None:
    layer = nk.SandwichAdaIN(3, dtype=F64)
    _randomize(layer)
    c = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    s = torch.randn(2, 3, 3, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (c, s))


def test_half_precision_input_keeps_float32_buffers_and_close_statistics() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    domain = torch.randint(0, 2, (8,))
    for split in (False, True):
        ref = nk.SandwichBatchNorm2d(4, 2, split_stats=split)
        low = nk.SandwichBatchNorm2d(4, 2, split_stats=split)
        low.load_state_dict(ref.state_dict())
        ref(x, domain)
        for dtype in (torch.bfloat16, torch.float16):
            low.load_state_dict(ref.state_dict())
            low.running_mean.zero_()
            low.running_var.fill_(1)
            low.num_batches_tracked.zero_()
            y = low(x.to(dtype), domain)
            assert y.dtype == dtype
            assert low.running_mean.dtype == torch.float32
            torch.testing.assert_close(low.running_mean, ref.running_mean, rtol=0, atol=2e-2)
            torch.testing.assert_close(low.running_var, ref.running_var, rtol=2e-2, atol=2e-2)


def test_split_stats_domain_with_one_value_per_channel_leaves_its_buffers_alone() -> None:
    # No unbiased variance exists for one value; the domain's running variance must not be
    # pulled towards 0 (nn.BatchNorm refuses such a batch outright).
    layer = nk.SandwichBatchNorm1d(2, 2, split_stats=True, momentum=0.5)
    x, domain = torch.randn(3, 2) * 3, torch.tensor([0, 0, 1])
    for _ in range(5):
        layer(x, domain)
    assert torch.equal(layer.running_var[1], torch.ones(2))
    assert torch.equal(layer.running_mean[1], torch.zeros(2))
    assert layer.num_batches_tracked.tolist() == [5, 0]


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernels"])
def test_split_stats_domain_with_one_value_per_channel_gives_its_shift(kernel: bool) -> None:
    # The documented behaviour (docs/sandwich.md): no error (the count would need a device sync
    # on an accelerator), the domain's shift as output, no gradient to its input.
    layer = nk.SandwichBatchNorm1d(2, 2, split_stats=True).double()
    _randomize(layer)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 2, dtype=torch.float64, generator=g) * 3).requires_grad_()
    domain = torch.tensor([0, 0, 1])
    if kernel:
        kernels.enable()
    try:
        y = layer(x, domain)
    finally:
        kernels.disable()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    shift = layer.domain_weight[1] * layer.bias + layer.domain_bias[1]
    torch.testing.assert_close(y[2], shift.detach())
    # (0 up to rounding: the domain's mean comes from merged moments)
    torch.testing.assert_close(x.grad[2], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-9)
    assert x.grad[:2].abs().sum() > 0


def test_vmap_over_batched_per_sample_domains_in_eval() -> None:
    layer = nk.SandwichBatchNorm2d(4, 3).eval()
    _randomize(layer)
    x, domain = torch.randn(2, 6, 4, 3, 3), torch.randint(0, 3, (2, 6))
    out = torch.func.vmap(layer)(x, domain)
    torch.testing.assert_close(out[1], layer(x[1], domain[1]))
