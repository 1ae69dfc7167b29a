"""Property tests (hypothesis): the core methods' identities and invariants on random cases.

Shapes (1d with and without a length, 2d, 3d; batches of 1 and 2 wherever a batch norm accepts
them), channel counts, group counts (divisors of the channel count), domain indices (a Python
int, one domain for the whole batch, per-sample vectors with absent domains), momentum (in
(0, 1], and None for the cumulative average) and eps are drawn at random. Identities are checked
in float64 with tolerances of 1e-10, or exactly where the arithmetic is the same.

Runs are derandomized (the same cases on every run, as CI needs); set
``NORMKIT_PROPERTY_EXAMPLES`` to run more examples per property locally.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import normkit as nk

F64 = torch.float64
TOL: dict[str, float] = {"rtol": 1e-10, "atol": 1e-10}

EXAMPLES = int(os.environ.get("NORMKIT_PROPERTY_EXAMPLES", "150"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SABN = {1: nk.SandwichBatchNorm1d, 2: nk.SandwichBatchNorm2d, 3: nk.SandwichBatchNorm3d}
CCBN = {
    1: nk.CategoricalConditionalBatchNorm1d,
    2: nk.CategoricalConditionalBatchNorm2d,
    3: nk.CategoricalConditionalBatchNorm3d,
}
AUXBN = {1: nk.AuxBatchNorm1d, 2: nk.AuxBatchNorm2d, 3: nk.AuxBatchNorm3d}
BCN = {1: nk.BatchChannelNorm1d, 2: nk.BatchChannelNorm2d, 3: nk.BatchChannelNorm3d}
WS_CONV = {1: nk.WSConv1d, 2: nk.WSConv2d, 3: nk.WSConv3d}

momenta = st.one_of(st.none(), st.floats(min_value=1e-3, max_value=1.0))
epsilons = st.floats(min_value=1e-8, max_value=0.5)
seeds = st.integers(0, 2**32 - 1)


# --- strategies -----------------------------------------------------------------------------------


@st.composite
def bn_shapes(
    draw: st.DrawFn, dims: tuple[int, ...] = (1, 2, 3), max_channels: int = 6
) -> tuple[int, tuple[int, ...]]:
    """``(dim, shape)`` of a training input a batch norm accepts: ``(N, C)`` or ``(N, C, L)``
    for 1d, ``(N, C, H, W)``, ``(N, C, D, H, W)``, with at least 2 values per channel (so a
    batch of 1 appears with spatial sizes, never alone)."""
    dim = draw(st.sampled_from(dims))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, max_channels))
    flat = dim == 1 and draw(st.booleans())
    spatial: tuple[int, ...] = () if flat else tuple(draw(st.integers(1, 4)) for _ in range(dim))
    if n * math.prod(spatial) < 2:
        if flat:
            n = 2
        else:
            spatial = (*spatial[:-1], 2)
    return dim, (n, c, *spatial)


def make_input(seed: int, shape: tuple[int, ...], dtype: torch.dtype = F64) -> Tensor:
    """Non-zero mean, non-unit scale, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.1 + 5.0 * torch.rand((), generator=g, dtype=F64)
    shift = 10.0 * torch.rand((), generator=g, dtype=F64) - 5.0
    return (torch.randn(shape, generator=g, dtype=F64) * scale + shift).to(dtype)


@st.composite
def domains(draw: st.DrawFn, n: int, k: int) -> int | Tensor:
    """A domain argument: an int, one domain as a tensor, or per-sample (absent domains
    included)."""
    kind = draw(st.sampled_from(["int", "single", "per_sample"]))
    if kind == "int":
        return draw(st.integers(0, k - 1))
    if kind == "single":
        return torch.full((n,), draw(st.integers(0, k - 1)), dtype=torch.long)
    values = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.long)


def as_vector(domain: int | Tensor, n: int) -> Tensor:
    if isinstance(domain, int):
        return torch.full((n,), domain, dtype=torch.long)
    return domain


def randomize(layer: nn.Module, seed: int) -> None:
    """Every parameter moved away from its init, so that a forgotten affine shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def values_per_channel(shape: tuple[int, ...]) -> int:
    return shape[0] * math.prod(shape[2:])


def expand(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel ``(C,)`` or per-sample ``(N, C)`` vector shaped to broadcast over ``x``."""
    if v.dim() == 1:
        return v.reshape(1, -1, *([1] * (x.dim() - 2)))
    return v.reshape(*v.shape, *([1] * (x.dim() - 2)))


def divisors(c: int) -> list[int]:
    return [g for g in range(1, c + 1) if c % g == 0]


# --- every layer: finite outputs, preserved shapes, sane buffers ----------------------------------


LAYER_KINDS = (
    "sabn",
    "sabn-split",
    "ccbn",
    "ccbn-split",
    "auxbn",
    "bcn",
    "bcn-estimate",
    "inputnorm",
    "syncbn",
)


def _build_norm(kind: str, dim: int, c: int, k: int, g: int, common: dict[str, Any]) -> nn.Module:
    if kind in ("sabn", "sabn-split"):
        return SABN[dim](c, k, split_stats=kind == "sabn-split", **common)
    if kind in ("ccbn", "ccbn-split"):
        return CCBN[dim](c, k, split_stats=kind == "ccbn-split", **common)
    if kind == "auxbn":
        return AUXBN[dim](c, k, **common)
    if kind in ("bcn", "bcn-estimate"):
        return BCN[dim](c, g, estimate=kind == "bcn-estimate", estimate_rate=0.5, **common)
    if kind == "inputnorm":
        return (nk.InputNorm1d if dim == 1 else nk.InputNorm2d)(c, **common)
    return nk.SyncBatchNorm(c, **common)


@given(
    kind=st.sampled_from(LAYER_KINDS),
    case=bn_shapes(),
    k=st.integers(1, 4),
    momentum=momenta,
    eps=epsilons,
    dtype=st.sampled_from([torch.float32, F64]),
    steps=st.integers(1, 3),
    data=st.data(),
)
@PROPERTY
def test_outputs_are_finite_shapes_and_dtypes_preserved(
    kind: str,
    case: tuple[int, tuple[int, ...]],
    k: int,
    momentum: float | None,
    eps: float,
    dtype: torch.dtype,
    steps: int,
    data: st.DataObject,
) -> None:
    dim, shape = case
    if kind == "inputnorm" and dim == 3:
        dim, shape = 2, (*shape[:3], shape[3] * shape[4])
    c = shape[1]
    g = data.draw(st.sampled_from(divisors(c)), label="num_groups")
    layer = _build_norm(kind, dim, c, k, g, {"momentum": momentum, "eps": eps, "dtype": dtype})
    takes_domain = getattr(type(layer), "takes_domain", False)
    for step in range(steps + 1):
        layer.train(step < steps)
        x = make_input(data.draw(seeds, label="input seed"), shape, dtype)
        args: tuple[Any, ...] = (x,)
        if takes_domain:
            args = (x, data.draw(domains(shape[0], k), label="domain"))
        y = layer(*args)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
        for name, buf in layer.named_buffers():
            assert torch.isfinite(buf.double()).all(), name
            if name == "running_var":
                assert (buf >= 0).all()
    tracked = layer.num_batches_tracked
    assert tracked is not None and int(tracked.max()) <= steps


@given(
    case=bn_shapes(),
    seed=seeds,
    adain_unbiased=st.booleans(),
    one_style=st.booleans(),
    eps=epsilons,
    dtype=st.sampled_from([torch.float32, F64]),
)
@PROPERTY
def test_sandwich_adain_output_finite_and_shape_preserved(
    case: tuple[int, tuple[int, ...]],
    seed: int,
    adain_unbiased: bool,
    one_style: bool,
    eps: float,
    dtype: torch.dtype,
) -> None:
    _, shape = case
    if len(shape) == 2:  # SaAdaIN needs a spatial dimension
        shape = (*shape, 2)
    if adain_unbiased and math.prod(shape[2:]) < 2:
        shape = (*shape[:-1], 2)
    layer = nk.SandwichAdaIN(shape[1], eps=eps, unbiased=adain_unbiased, dtype=dtype)
    randomize(layer, seed)
    style_shape = (1 if one_style else shape[0], *shape[1:])
    y = layer(make_input(seed, shape, dtype), make_input(seed + 1, style_shape, dtype))
    assert y.shape == shape and y.dtype == dtype
    assert torch.isfinite(y).all()


# --- Sandwich BN identities -----------------------------------------------------------------------


@given(
    case=bn_shapes(),
    split=st.booleans(),
    track=st.booleans(),
    as_tensor=st.booleans(),
    momentum=momenta,
    eps=epsilons,
    seed=seeds,
    steps=st.integers(1, 3),
)
@PROPERTY
def test_sabn_one_domain_identity_domain_affine_equals_batchnorm(
    case: tuple[int, tuple[int, ...]],
    split: bool,
    track: bool,
    as_tensor: bool,
    momentum: float | None,
    eps: float,
    seed: int,
    steps: int,
) -> None:
    dim, shape = case
    c = shape[1]
    common: dict[str, Any] = {
        "eps": eps,
        "momentum": momentum,
        "track_running_stats": track,
        "dtype": F64,
    }
    sabn = SABN[dim](c, 1, split_stats=split, domain_std=0.0, **common)
    bn = BATCH_NORM[dim](c, **common)
    assert torch.equal(sabn.domain_weight, torch.ones(1, c, dtype=F64))
    assert torch.equal(sabn.domain_bias, torch.zeros(1, c, dtype=F64))
    randomize(bn, seed)
    with torch.no_grad():
        sabn.weight.copy_(bn.weight)
        sabn.bias.copy_(bn.bias)
    domain: int | Tensor = torch.zeros(shape[0], dtype=torch.long) if as_tensor else 0
    for step in range(steps + 1):
        sabn.train(step < steps)
        bn.train(step < steps)
        x = make_input(seed + step, shape)
        torch.testing.assert_close(sabn(x, domain), bn(x), **TOL)
        if not track:
            assert sabn.running_mean is None and bn.running_mean is None
            continue
        rows = (sabn.running_mean, sabn.running_var, sabn.num_batches_tracked)
        if split:  # one row per domain: (1, C) and (1,)
            rows = tuple(r[0] for r in rows)
        torch.testing.assert_close(rows[0], bn.running_mean, **TOL)
        torch.testing.assert_close(rows[1], bn.running_var, **TOL)
        assert int(rows[2]) == int(bn.num_batches_tracked)


@given(
    case=bn_shapes(),
    k=st.integers(1, 4),
    split=st.booleans(),
    momentum=momenta,
    eps=epsilons,
    seed=seeds,
    data=st.data(),
)
@PROPERTY
def test_sabn_identity_shared_affine_equals_ccbn(
    case: tuple[int, tuple[int, ...]],
    k: int,
    split: bool,
    momentum: float | None,
    eps: float,
    seed: int,
    data: st.DataObject,
) -> None:
    dim, shape = case
    common: dict[str, Any] = {"eps": eps, "momentum": momentum, "split_stats": split, "dtype": F64}
    sabn = SABN[dim](shape[1], k, **common)
    ccbn = CCBN[dim](shape[1], k, **common)
    # The shared affine at its init (1, 0): multiplying by 1 and adding 0 are exact, so the two
    # layers compute bitwise the same outputs and statistics.
    assert torch.equal(sabn.weight, torch.ones(shape[1], dtype=F64))
    assert torch.equal(sabn.bias, torch.zeros(shape[1], dtype=F64))
    randomize(ccbn, seed)
    with torch.no_grad():
        sabn.domain_weight.copy_(ccbn.domain_weight)
        sabn.domain_bias.copy_(ccbn.domain_bias)
    for step, training in enumerate((True, True, False)):
        sabn.train(training)
        ccbn.train(training)
        x = make_input(seed + step, shape)
        domain = data.draw(domains(shape[0], k), label="domain")
        assert torch.equal(sabn(x, domain), ccbn(x, domain))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(sabn, name), getattr(ccbn, name)), name


def _split_layer(kind: str, dim: int, c: int, k: int, common: dict[str, Any]) -> nn.Module:
    if kind == "sabn":
        return SABN[dim](c, k, split_stats=True, **common)
    if kind == "ccbn":
        return CCBN[dim](c, k, split_stats=True, **common)
    return AUXBN[dim](c, k, **common)


@given(
    kind=st.sampled_from(["sabn", "ccbn", "auxbn"]),
    case=bn_shapes(),
    k=st.integers(1, 4),
    present=st.integers(0, 3),
    as_tensor=st.booleans(),
    momentum=momenta,
    eps=epsilons,
    seed=seeds,
    steps=st.integers(1, 3),
)
@PROPERTY
def test_split_stats_with_one_domain_present_equals_batchnorm_on_it(
    kind: str,
    case: tuple[int, tuple[int, ...]],
    k: int,
    present: int,
    as_tensor: bool,
    momentum: float | None,
    eps: float,
    seed: int,
    steps: int,
) -> None:
    dim, shape = case
    c, present = shape[1], present % k
    layer = _split_layer(kind, dim, c, k, {"eps": eps, "momentum": momentum, "dtype": F64})
    randomize(layer, seed)
    bn = BATCH_NORM[dim](c, eps=eps, momentum=momentum, dtype=F64)
    with torch.no_grad():  # BN's affine: the shared one, then the domain's
        w = torch.ones(c, dtype=F64) if layer.weight is None else layer.weight
        b = torch.zeros(c, dtype=F64) if layer.bias is None else layer.bias
        dw = layer.domain_weight[present] if layer.domain_weight is not None else 1.0
        db = layer.domain_bias[present] if layer.domain_bias is not None else 0.0
        bn.weight.copy_(dw * w)
        bn.bias.copy_(dw * b + db)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    domain = torch.full((shape[0],), present) if as_tensor else present
    for step in range(steps + 1):
        layer.train(step < steps)
        bn.train(step < steps)
        x = make_input(seed + step, shape)
        torch.testing.assert_close(layer(x, domain), bn(x), **TOL)
    torch.testing.assert_close(layer.running_mean[present], bn.running_mean, **TOL)
    torch.testing.assert_close(layer.running_var[present], bn.running_var, **TOL)
    tracked = [0] * k
    tracked[present] = steps
    assert layer.num_batches_tracked.tolist() == tracked
    others = [d for d in range(k) if d != present]
    for name in ("running_mean", "running_var"):  # only the present domain's buffers move
        assert torch.equal(getattr(layer, name)[others], before[name][others]), name


@given(
    kind=st.sampled_from(["sabn", "ccbn", "auxbn"]),
    case=bn_shapes(),
    k=st.integers(1, 4),
    momentum=momenta,
    eps=epsilons,
    seed=seeds,
    data=st.data(),
)
@PROPERTY
def test_split_stats_normalize_each_domain_with_its_own_batch_statistics(
    kind: str,
    case: tuple[int, tuple[int, ...]],
    k: int,
    momentum: float | None,
    eps: float,
    seed: int,
    data: st.DataObject,
) -> None:
    """Per-sample domains, absent ones included: each domain's samples are batch-normalized
    with that domain's statistics and running buffers; a domain with a single value per channel
    (no unbiased variance) normalizes to 0 and keeps its buffers, as do absent domains."""
    dim, shape = case
    layer = _split_layer(kind, dim, shape[1], k, {"eps": eps, "momentum": momentum, "dtype": F64})
    randomize(layer, seed)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2.0)
        layer.running_mean.normal_()
        layer.num_batches_tracked.fill_(2)
    x = make_input(seed, shape)
    domain = data.draw(domains(shape[0], k), label="domain")
    per_sample = as_vector(domain, shape[0])
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    tracked = layer.num_batches_tracked.clone()
    y = layer(x, domain)

    spatial = math.prod(shape[2:])
    for d in range(k):
        sel = (per_sample == d).nonzero().flatten()
        count = len(sel) * spatial
        if count > 1:
            tracked[d] += 1
            factor = 1.0 / float(tracked[d]) if momentum is None else momentum
            xhat = TF.batch_norm(x[sel], rm[d], rv[d], training=True, momentum=factor, eps=eps)
        else:  # absent, or one value per channel: buffers kept
            xhat = torch.zeros_like(x[sel])
        h = xhat
        if layer.weight is not None:
            h = expand(layer.weight, h) * h + expand(layer.bias, h)
        if layer.domain_weight is not None:
            h = expand(layer.domain_weight[d], h) * h + expand(layer.domain_bias[d], h)
        torch.testing.assert_close(y[sel], h, **TOL)
    torch.testing.assert_close(layer.running_mean, rm, **TOL)
    torch.testing.assert_close(layer.running_var, rv, **TOL)
    assert torch.equal(layer.num_batches_tracked, tracked)


@given(
    kind=st.sampled_from(["sabn", "sabn-split", "ccbn", "auxbn"]),
    case=bn_shapes(),
    k=st.integers(2, 4),
    training=st.booleans(),
    changed=st.integers(0, 3),
    seed=seeds,
    data=st.data(),
)
@PROPERTY
def test_sample_output_depends_only_on_its_own_domain_row(
    kind: str,
    case: tuple[int, tuple[int, ...]],
    k: int,
    training: bool,
    changed: int,
    seed: int,
    data: st.DataObject,
) -> None:
    dim, shape = case
    changed %= k
    c = shape[1]
    if kind.startswith("sabn"):
        a = SABN[dim](c, k, split_stats=kind == "sabn-split", dtype=F64)
    else:
        a = (CCBN if kind == "ccbn" else AUXBN)[dim](c, k, dtype=F64)
    randomize(a, seed)
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # another scale and a shift at least 0.5 away on one row only
        b.domain_weight[changed] += 0.5 + torch.rand(c, generator=g, dtype=F64)
        b.domain_bias[changed] -= 0.5 + torch.rand(c, generator=g, dtype=F64)
    a.train(training)
    b.train(training)
    x = make_input(seed, shape)
    domain = torch.tensor(
        data.draw(st.lists(st.integers(0, k - 1), min_size=shape[0], max_size=shape[0])),
        dtype=torch.long,
    )
    ya, yb = a(x, domain), b(x, domain)
    for n in range(shape[0]):
        if int(domain[n]) == changed:
            assert not torch.allclose(ya[n], yb[n])
        else:
            assert torch.equal(ya[n], yb[n]), n


@given(
    kind=st.sampled_from(["sabn", "sabn-split", "ccbn", "ccbn-split", "auxbn"]),
    case=bn_shapes(),
    k=st.integers(1, 4),
    index=st.integers(0, 3),
    momentum=momenta,
    seed=seeds,
)
@PROPERTY
def test_int_index_equals_the_filled_index_tensor(
    kind: str,
    case: tuple[int, tuple[int, ...]],
    k: int,
    index: int,
    momentum: float | None,
    seed: int,
) -> None:
    dim, shape = case
    index %= k
    a = _build_norm(kind, dim, shape[1], k, 1, {"momentum": momentum, "dtype": F64})
    randomize(a, seed)
    b = copy.deepcopy(a)
    for step, training in enumerate((True, True, False)):
        a.train(training)
        b.train(training)
        x = make_input(seed + step, shape)
        torch.testing.assert_close(a(x, index), b(x, torch.full((shape[0],), index)), **TOL)
        for name, buf in a.named_buffers():
            torch.testing.assert_close(buf, getattr(b, name), **TOL)


# --- Batch-Channel Normalization ------------------------------------------------------------------


def _group_affine(layer: nn.Module, c: int) -> tuple[Tensor, Tensor]:
    """The channel part's affine, one value per channel (a per-group one repeated)."""
    gw, gb = layer.group_weight, layer.group_bias
    return gw.repeat_interleave(c // gw.shape[0]), gb.repeat_interleave(c // gb.shape[0])


@given(
    case=bn_shapes(max_channels=8),
    group_affine=st.sampled_from(["per_group", "per_channel"]),
    estimate=st.booleans(),
    eps=epsilons,
    seed=seeds,
    data=st.data(),
)
@PROPERTY
def test_bcn_channel_part_equals_group_norm(
    case: tuple[int, tuple[int, ...]],
    group_affine: str,
    estimate: bool,
    eps: float,
    seed: int,
    data: st.DataObject,
) -> None:
    """In eval, BCN is the per-channel affine of its running statistics (or estimates) and batch
    affine, followed by ``F.group_norm``."""
    dim, shape = case
    c = shape[1]
    g = data.draw(st.sampled_from(divisors(c)), label="num_groups")
    layer = BCN[dim](c, g, eps=eps, estimate=estimate, group_affine=group_affine, dtype=F64)
    randomize(layer, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c, generator=gen, dtype=F64))
        layer.running_var.copy_(torch.rand(c, generator=gen, dtype=F64) + 0.1)
    layer.eval()
    x = make_input(seed, shape)
    x1 = (x - expand(layer.running_mean, x)) / torch.sqrt(expand(layer.running_var, x) + eps)
    x1 = expand(layer.weight, x) * x1 + expand(layer.bias, x)
    want = TF.group_norm(x1, g, *_group_affine(layer, c), eps=eps)
    torch.testing.assert_close(layer(x), want, **TOL)


@given(
    case=bn_shapes(max_channels=8),
    group_affine=st.sampled_from(["per_group", "per_channel"]),
    momentum=momenta,
    eps=epsilons,
    seed=seeds,
    steps=st.integers(1, 3),
    data=st.data(),
)
@PROPERTY
def test_large_batch_bcn_equals_batchnorm_then_group_norm(
    case: tuple[int, tuple[int, ...]],
    group_affine: str,
    momentum: float | None,
    eps: float,
    seed: int,
    steps: int,
    data: st.DataObject,
) -> None:
    dim, shape = case
    c = shape[1]
    g = data.draw(st.sampled_from(divisors(c)), label="num_groups")
    layer = BCN[dim](c, g, eps=eps, momentum=momentum, group_affine=group_affine, dtype=F64)
    randomize(layer, seed)
    bn = BATCH_NORM[dim](c, eps=eps, momentum=momentum, dtype=F64)
    with torch.no_grad():
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    for step in range(steps + 1):
        layer.train(step < steps)
        bn.train(step < steps)
        x = make_input(seed + step, shape)
        want = TF.group_norm(bn(x), g, *_group_affine(layer, c), eps=eps)
        torch.testing.assert_close(layer(x), want, **TOL)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, **TOL)
        torch.testing.assert_close(layer.running_var, bn.running_var, **TOL)
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked)


# --- Weight Standardization -----------------------------------------------------------------------


def _sigma_squared(v: Tensor, eps: float, eps_mode: str) -> Tensor:
    """σ² of the layers' documented forms: ``sqrt(v + eps)``, ``sqrt(v) + eps``,
    ``sqrt(max(v, eps))``."""
    if eps_mode == "sqrt":
        return v + eps
    if eps_mode == "std":
        return (v.sqrt() + eps) ** 2
    return v.clamp_min(eps)


@given(
    dim=st.sampled_from([0, 1, 2, 3]),
    in_per_group=st.integers(1, 4),
    out_channels=st.integers(1, 5),
    groups=st.integers(1, 3),
    kernel=st.integers(1, 3),
    preset=st.sampled_from(["paper", "official"]),
    eps=st.one_of(st.none(), epsilons),
    unbiased=st.one_of(st.none(), st.booleans()),
    eps_mode=st.one_of(st.none(), st.sampled_from(["sqrt", "std", "max"])),
    log_scale=st.floats(min_value=-4.0, max_value=1.0),
    constant_filter=st.booleans(),
    seed=seeds,
)
@PROPERTY
def test_ws_filters_have_mean_zero_and_the_documented_variance(
    dim: int,
    in_per_group: int,
    out_channels: int,
    groups: int,
    kernel: int,
    preset: str,
    eps: float | None,
    unbiased: bool | None,
    eps_mode: str | None,
    log_scale: float,
    constant_filter: bool,
    seed: int,
) -> None:
    """Each standardized filter has mean 0 and variance ``v / σ²`` (with the layer's variance
    estimator ``v`` and σ as documented; ``v / (v + eps)`` for the paper preset), over weights
    whose variance ranges from far below eps to far above it; a constant filter becomes 0."""
    options: dict[str, Any] = {"preset": preset, "eps": eps, "unbiased": unbiased}
    options["eps_mode"] = eps_mode
    config = nk.WS_PRESETS[preset]
    unbiased_ = config.unbiased if unbiased is None else unbiased
    if unbiased_ and in_per_group * kernel**dim < 2:
        in_per_group = 2  # an unbiased variance needs a fan-in of 2 (refused otherwise)
    fan_in = in_per_group * kernel**dim
    if dim == 0:
        layer: nn.Module = nk.WSLinear(in_per_group, out_channels, dtype=F64, **options)
    else:
        layer = WS_CONV[dim](
            in_per_group * groups,
            out_channels * groups,
            kernel,
            groups=groups,
            dtype=F64,
            **options,
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = layer.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=F64) * 10.0**log_scale + 3.0)
        if constant_filter:
            w[0].fill_(0.7)
    w_hat = layer.standardized_weight()
    eps_ = config.eps if eps is None else eps
    mode = config.eps_mode if eps_mode is None else eps_mode
    flat, flat_hat = w.detach().reshape(w.shape[0], -1), w_hat.reshape(w.shape[0], -1)
    assert flat.shape[1] == fan_in
    correction = 1 if unbiased_ else 0
    v = flat.var(dim=1, correction=correction)
    torch.testing.assert_close(flat_hat.mean(dim=1), torch.zeros_like(v), rtol=0, atol=1e-10)
    want = v / _sigma_squared(v, eps_, mode)
    torch.testing.assert_close(flat_hat.var(dim=1, correction=correction), want, **TOL)
    if constant_filter:
        assert torch.equal(flat_hat[0], torch.zeros(fan_in, dtype=F64))


@given(
    in_channels=st.integers(1, 4),
    out_channels=st.integers(1, 5),
    kernel=st.integers(1, 3),
    gamma=st.floats(min_value=0.1, max_value=3.0),
    eps=epsilons,
    log_scale=st.floats(min_value=-4.0, max_value=1.0),
    seed=seeds,
)
@PROPERTY
def test_scaled_ws_filters_have_the_documented_variance(
    in_channels: int,
    out_channels: int,
    kernel: int,
    gamma: float,
    eps: float,
    log_scale: float,
    seed: int,
) -> None:
    """``W' = γ g (W − μ) / (sqrt(n) sqrt(v + eps))``: mean 0, biased variance
    ``γ² g² v / (n (v + eps))``."""
    layer = nk.ScaledWSConv2d(in_channels, out_channels, kernel, gamma=gamma, eps=eps, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = layer.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=F64) * 10.0**log_scale - 1.0)
        layer.gain.copy_(torch.rand(layer.gain.shape, generator=g, dtype=F64) + 0.5)
    flat = w.detach().reshape(out_channels, -1)
    flat_hat = layer.standardized_weight().reshape(out_channels, -1)
    n = flat.shape[1]
    v = flat.var(dim=1, correction=0)
    gain = layer.gain.detach().flatten()
    torch.testing.assert_close(flat_hat.mean(dim=1), torch.zeros_like(v), rtol=0, atol=1e-10)
    want = gamma**2 * gain**2 * v / (n * (v + eps))
    torch.testing.assert_close(flat_hat.var(dim=1, correction=0), want, **TOL)
