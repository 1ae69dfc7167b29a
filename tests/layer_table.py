"""One record per public layer configuration: the table that drives the generic layer tests.

Each :class:`LayerRecord` says how to build the layer, what it is fed, whether it takes a domain
index and whether training and eval compute different functions. Generic tests (export, compile,
memory format, ``torch.func``) iterate over :data:`LAYERS` through :func:`layer_params`, which
expands a conditional layer into one case per kind of domain index (a Python ``int`` for the whole
batch, and a per-sample ``LongTensor``).

Records build layers with every parameter and floating buffer moved away from its init
(:meth:`LayerRecord.build`), so that an affine or a running statistic a code path forgets to use
changes the output. To cover a new layer, add a record; ``test_every_public_layer_has_a_record``
fails until every public ``nn.Module`` of normkit has one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normkit as nk

N, C, K = 7, 4, 3
"""Batch size, channels and number of domains of the sample inputs."""

SPATIAL: dict[int, tuple[int, ...]] = {1: (3,), 2: (3, 3), 3: (2, 3, 2)}
"""Spatial sizes of the sample inputs of 1d, 2d and 3d layers."""

INT_DOMAIN = 1
PER_SAMPLE_DOMAIN = (2, 0, 1, 0, 2, 0, 1)
"""Per-sample indices: every domain present, with unequal counts (3, 2, 2); at least two samples
per domain, so that per-domain statistics of ``(N, C)`` inputs have a variance."""

DOMAIN_KINDS = ("int", "per_sample")


@dataclass(frozen=True)
class LayerRecord:
    """How to build, feed and classify one public layer configuration.

    Attributes:
        name: unique id of the configuration (used as the pytest id).
        cls: the public class the record covers.
        init_args, init_kwargs: its constructor arguments (``device=``/``dtype=`` left out).
        shapes: shapes of the tensor inputs, in call order (``(x,)``, or ``(content, style)``).
        num_domains: K for layers called as ``layer(x, domain)``; 0 for the others.
        train_eval_differ: whether eval mode computes a different function than training
            (running statistics, estimates); False for stateless layers.
        train_gradcheck: whether finite differences can check the training gradient. False
            where the training forward holds batch-dependent quantities constant by design
            (BatchRenorm's r and d, MABN's moving averages): the layer's own tests check that
            gradient against autograd of its formula with those quantities detached.
        double_backward: whether the layer supports double backward (False for layers built
            on a custom autograd Function whose backward is not differentiable, as documented).
    """

    name: str
    cls: type[nn.Module]
    init_args: tuple[Any, ...]
    shapes: tuple[tuple[int, ...], ...]
    _: KW_ONLY
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_domains: int = 0
    train_eval_differ: bool = True
    train_gradcheck: bool = True
    double_backward: bool = True

    def make(self, **factory: Any) -> nn.Module:
        """The layer at its default init; ``factory`` is ``device=`` and/or ``dtype=``."""
        return self.cls(*self.init_args, **self.init_kwargs, **factory)

    @property
    def takes_domain(self) -> bool:
        return self.num_domains > 0

    @property
    def is_4d(self) -> bool:
        """Whether every tensor input is 4D (the layers that must keep channels_last)."""
        return all(len(s) == 4 for s in self.shapes)

    def build(self, seed: int = 0) -> nn.Module:
        """The layer with parameters and floating buffers randomized (running variances > 0).

        Integer buffers (``num_batches_tracked``) are set to 2, so that a cumulative average
        (``momentum=None``) has a non-trivial factor. ``requires_grad`` flags are kept.
        """
        torch.manual_seed(seed)
        layer = self.make()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            for name, b in layer.named_buffers():
                if not b.is_floating_point():
                    b.fill_(2)
                elif name.endswith("var"):
                    b.copy_(torch.empty(b.shape, dtype=b.dtype).uniform_(0.5, 2.0, generator=g))
                else:
                    b.copy_(0.5 * torch.randn(b.shape, generator=g, dtype=b.dtype))
        return layer

    @property
    def batch(self) -> int:
        """The batch size of the sample inputs."""
        return self.shapes[0][0]

    def tensors(
        self, seed: int = 0, *, batch: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, ...]:
        """Fresh tensor inputs with non-zero means and non-unit scales.

        ``batch`` replaces the batch size of every input that has the record's batch size (a
        style batch of 1 that broadcasts stays 1).
        """
        g = torch.Generator().manual_seed(1000 + seed)
        shapes = self.shapes
        if batch is not None:
            shapes = tuple((batch, *s[1:]) if s[0] == self.batch else s for s in shapes)
        return tuple((2.0 * torch.randn(s, generator=g) + 0.5).to(dtype) for s in shapes)

    def domain(self, kind: str | None, *, batch: int | None = None) -> int | Tensor | None:
        """The domain argument of ``kind``: ``"int"``, ``"per_sample"`` or None (no domain)."""
        if kind is None:
            return None
        if kind == "int":
            return INT_DOMAIN
        if kind == "per_sample":
            size = self.batch if batch is None else batch
            cycle = PER_SAMPLE_DOMAIN
            # dtype given: an empty list would otherwise make a float tensor (batch=0).
            return torch.tensor([cycle[i % len(cycle)] for i in range(size)], dtype=torch.long)
        raise ValueError(f"unknown domain kind {kind!r}; expected one of {DOMAIN_KINDS}")

    def args(self, kind: str | None, seed: int = 0, *, batch: int | None = None) -> tuple[Any, ...]:
        """The positional arguments of one forward call: the tensors, then the domain if any."""
        tensors = self.tensors(seed, batch=batch)
        if not self.takes_domain:
            return tensors
        return (*tensors, self.domain(kind, batch=batch))


def _x(dim: int, batch: int = N) -> tuple[tuple[int, ...], ...]:
    return ((batch, C, *SPATIAL[dim]),)


def _by_dim(*classes: type[nn.Module]) -> dict[int, type[nn.Module]]:
    return dict(zip((1, 2, 3), classes))


SABN = _by_dim(nk.SandwichBatchNorm1d, nk.SandwichBatchNorm2d, nk.SandwichBatchNorm3d)
CCBN = _by_dim(
    nk.CategoricalConditionalBatchNorm1d,
    nk.CategoricalConditionalBatchNorm2d,
    nk.CategoricalConditionalBatchNorm3d,
)
AUXBN = _by_dim(nk.AuxBatchNorm1d, nk.AuxBatchNorm2d, nk.AuxBatchNorm3d)
BCN = _by_dim(nk.BatchChannelNorm1d, nk.BatchChannelNorm2d, nk.BatchChannelNorm3d)
WSCONV = _by_dim(nk.WSConv1d, nk.WSConv2d, nk.WSConv3d)


def _records() -> list[LayerRecord]:
    R = LayerRecord
    stateless: dict[str, Any] = {"train_eval_differ": False}
    r: list[LayerRecord] = []
    for d in (1, 2, 3):
        r += [
            R(f"sabn{d}d", SABN[d], (C, K), _x(d), num_domains=K),
            R(
                f"sabn{d}d-split",
                SABN[d],
                (C, K),
                _x(d),
                init_kwargs={"split_stats": True},
                num_domains=K,
            ),
            R(f"ccbn{d}d", CCBN[d], (C, K), _x(d), num_domains=K),
            R(f"auxbn{d}d", AUXBN[d], (C, K), _x(d), num_domains=K),
        ]
    r += [
        # (N, C) input of a 1d layer; the cumulative average (a known fullgraph pitfall).
        R(
            "sabn1d-split-flat",
            SABN[1],
            (C, K),
            ((N, C),),
            init_kwargs={"split_stats": True},
            num_domains=K,
        ),
        R(
            "sabn2d-split-cumulative",
            SABN[2],
            (C, K),
            _x(2),
            init_kwargs={"split_stats": True, "momentum": None},
            num_domains=K,
        ),
        R("sandwich-adain", nk.SandwichAdaIN, (C,), (*_x(2), *_x(2)), **stateless),
        R(
            "sandwich-adain-one-style-biased",
            nk.SandwichAdaIN,
            (C,),
            (*_x(2), (1, C, 4, 4)),
            init_kwargs={"unbiased": False},
            **stateless,
        ),
    ]
    for d in (1, 2, 3):
        r += [
            R(f"bcn{d}d", BCN[d], (C, 2), _x(d)),
            R(f"bcn{d}d-estimate", BCN[d], (C, 2), _x(d, batch=2), init_kwargs={"estimate": True}),
        ]
    r += [
        R("bcn1d-flat", BCN[1], (C, 2), ((N, C),)),
        R("bcn2d-per-channel", BCN[2], (C, 2), _x(2), init_kwargs={"group_affine": "per_channel"}),
        R(
            "bcn2d-estimate-per-channel-micro",
            BCN[2],
            (C, 2),
            _x(2, batch=1),
            init_kwargs={"estimate": True, "group_affine": "per_channel"},
        ),
        R("bcn2d-cumulative", BCN[2], (C, 2), _x(2), init_kwargs={"momentum": None}),
        # Without an initialized process group of several ranks, a plain batch norm.
        R("syncbn", nk.SyncBatchNorm, (C,), _x(2)),
        R("syncbn-flat", nk.SyncBatchNorm, (C,), ((N, C),)),
        R("inputnorm1d", nk.InputNorm1d, (C,), _x(1)),
        R("inputnorm1d-flat", nk.InputNorm1d, (C,), ((N, C),)),
        R("inputnorm2d", nk.InputNorm2d, (C,), _x(2)),
    ]
    for d in (1, 2, 3):
        r.append(
            R(f"wsconv{d}d", WSCONV[d], (C, 5, 3), _x(d), init_kwargs={"padding": 1}, **stateless)
        )
    r += [
        R(
            "wsconv2d-official-grouped",
            WSCONV[2],
            (C, 6, 3),
            _x(2),
            init_kwargs={"groups": 2, "preset": "official"},
            **stateless,
        ),
        R("wslinear", nk.WSLinear, (C, 5), ((N, 2, C),), **stateless),
        R(
            "scaled-wsconv2d",
            nk.ScaledWSConv2d,
            (C, 5, 3),
            _x(2),
            init_kwargs={"padding": 1, "gamma": 1.7139588594436646},
            **stateless,
        ),
        R("bias", nk.Bias, (), _x(2), **stateless),
        R("scale", nk.Scale, (), _x(2), **stateless),
    ]
    # Related methods (issue 8), one block per family; each helper edits only its own block.
    # -- renorm / batch-group records --
    brn = _by_dim(nk.BatchRenorm1d, nk.BatchRenorm2d, nk.BatchRenorm3d)
    for d in (1, 2, 3):
        # The default schedule at step 2 (``build``'s count): warm-up, a plain batch norm.
        r.append(R(f"brn{d}d", brn[d], (C,), _x(d)))
    # Limits at their targets from the first step; the sample inputs (std 2, running variances
    # in [0.5, 2]) clip r at 1.5 in most channels and d at 0.25 in some.
    relaxed = {"r_max": 1.5, "d_max": 0.25, "warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0}
    # train_gradcheck=False: r and d depend on the batch but are held constant by backprop (the
    # paper's stop-gradient), which finite differences cannot reproduce; test_renorm.py checks
    # that training gradient against autograd of the formula with r and d detached.
    r += [
        R("brn2d-relaxed", brn[2], (C,), _x(2), init_kwargs=relaxed, train_gradcheck=False),
        R(
            "brn1d-flat-relaxed",
            brn[1],
            (C,),
            ((N, C),),
            init_kwargs=relaxed,
            train_gradcheck=False,
        ),
        R("bgn2d", nk.BatchGroupNorm2d, (C, 2), _x(2)),
        R(
            "bgn2d-one-group-cumulative",
            nk.BatchGroupNorm2d,
            (C, 1),
            _x(2),
            init_kwargs={"momentum": None},
        ),
    ]
    # -- mabn records --
    # The generic build sets the step to 2, so the next training call is step 3. With m = 1 in
    # warm-up (and r exactly 1) MABN is "BN without centring" and its custom backward is that
    # function's gradient: finite differences apply. With m = 2 after warm-up the backward uses
    # the moving averages by design (test_mabn.py checks it against the formula instead), and
    # r is clamped from the first step. The custom backward is not differentiable again.
    mabn: dict[str, Any] = {"double_backward": False}
    r += [
        R("mabn2d-warmup-m1", nk.MovingAverageBatchNorm2d, (C,), _x(2), **mabn,
          init_kwargs={"buffer_size": 1}),
        R("mabn2d-moving-average", nk.MovingAverageBatchNorm2d, (C,), _x(2), **mabn,
          init_kwargs={"buffer_size": 2, "warmup_iters": 0, "r_clamp_steps": 0},
          train_gradcheck=False),
        R("cenconv2d", nk.CenConv2d, (C, 5, 3), _x(2), init_kwargs={"padding": 1}, **stateless),
        R("cenconv2d-grouped-no-bias", nk.CenConv2d, (C, 6, 3), _x(2),
          init_kwargs={"groups": 2, "bias": False}, **stateless),
    ]  # fmt: skip
    # -- iternorm / bnet records --
    # (track_running_stats=False normalizes with batch statistics in eval too, which the
    # generic eval tests rule out: tests/test_iternorm.py and tests/test_bnet.py cover it.)
    r += [
        R("iternorm2d", nk.IterNorm2d, (C,), _x(2), init_kwargs={"group_size": 2}),
        R("iternorm2d-one-group", nk.IterNorm2d, (C,), _x(2)),  # gcd(C, 64) = C: one group
        R("iternorm1d", nk.IterNorm1d, (C,), _x(1), init_kwargs={"group_size": 2, "T": 3}),
        R(
            "iternorm1d-flat-cumulative-no-affine",
            nk.IterNorm1d,
            (C,),
            ((N, C),),
            init_kwargs={"group_size": 2, "momentum": None, "affine": False},
        ),
        R("bnet2d", nk.BNET2d, (C,), _x(2)),
        R(
            "bnet2d-k5-cumulative",
            nk.BNET2d,
            (C,),
            _x(2),
            init_kwargs={"kernel_size": 5, "momentum": None},
        ),
    ]
    # -- frn / evonorm records --
    frn = nk.FilterResponseNorm2d
    r += [
        R("frn2d", frn, (C,), _x(2), **stateless),
        R(
            "frn2d-plain-learnable-eps",
            frn,
            (C,),
            _x(2),
            init_kwargs={"tlu": False, "affine": False, "learnable_eps": True},
            **stateless,
        ),
        # A dense layer's (N, C) output, the case the learned epsilon is for.
        R("frn-dense", frn, (C,), ((N, C),), init_kwargs={"learnable_eps": True}, **stateless),
        R("tlu", nk.TLU, (C,), _x(2), **stateless),
        R("tlu-flat", nk.TLU, (C,), ((N, C),), **stateless),
        R("evonorm-b0", nk.EvoNormB0, (C,), _x(2)),
        R("evonorm-b0-cumulative", nk.EvoNormB0, (C,), _x(2), init_kwargs={"momentum": None}),
        R("evonorm-s0", nk.EvoNormS0, (C,), _x(2), init_kwargs={"num_groups": 2}, **stateless),
        # One channel per group: the per-sample, per-channel variance.
        R(
            "evonorm-s0-instance-no-affine",
            nk.EvoNormS0,
            (C,),
            _x(2),
            init_kwargs={"num_groups": C, "affine": False},
            **stateless,
        ),
    ]
    # -- groupnorm / frozen / residual-gate records --
    r += [
        R("groupnorm", nk.GroupNorm, (C, 2), _x(2), **stateless),
        # affine=False has no state at all, which the generic state-dict tests need: it is
        # covered in tests/test_group_norm.py.
        R("groupnorm3d", nk.GroupNorm, (C, 2), _x(3), **stateless),
        R("groupnorm-flat", nk.GroupNorm, (C, 2), ((N, C),), **stateless),
        R("frozenbn2d", nk.FrozenBatchNorm2d, (C,), _x(2), **stateless),
        R("residual-gate", nk.ResidualGate, (), _x(2), **stateless),
    ]
    return r


LAYERS: tuple[LayerRecord, ...] = tuple(_records())
BY_NAME: dict[str, LayerRecord] = {r.name: r for r in LAYERS}
assert len(BY_NAME) == len(LAYERS), "record names must be unique"


def public_layer_classes() -> set[type[nn.Module]]:
    """Every ``nn.Module`` subclass that normkit exports."""
    out = set()
    for name in nk.__all__:
        obj = getattr(nk, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            out.add(obj)
    return out


def layer_params(
    records: Iterable[LayerRecord] = LAYERS,
    kinds: Iterable[str] = DOMAIN_KINDS,
) -> list[Any]:
    """``pytest.param(record, kind)`` for each record and, for conditional ones, each kind.

    ``kind`` is None for layers that take no domain; ids read ``"sabn2d-split-per_sample"``.
    """
    kinds = tuple(kinds)
    out = []
    for rec in records:
        for kind in kinds if rec.takes_domain else (None,):
            name = rec.name if kind is None else f"{rec.name}-{kind}"
            out.append(pytest.param(rec, kind, id=name))
    return out
