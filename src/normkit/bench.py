"""Speed and memory of normkit's layers against their torch baselines (``normkit bench``).

Each *case* pairs a candidate with its baseline: a normkit norm against ``nn.BatchNorm2d``, a WS
conv against ``nn.Conv2d`` (3x3, ``C -> C``, padding 1, no bias), the Fixup ResNet-20 training
step against the BN ResNet-20 one. A row is one case on one input shape, dtype, memory format,
mode (eager or ``torch.compile``, both sides compiled), device and pass:

* ``fwd``: a training forward (``train()`` mode, autograd graph built, the input requiring
  grad), or for eval cases an ``eval()`` forward under ``torch.no_grad()``;
* ``fwd+bwd``: the training forward then ``torch.autograd.grad`` of a fixed upstream gradient
  with respect to the input and every parameter;
* ``step``: a model's training step (forward, cross-entropy, backward, SGD step).

Conditional layers (SaBN, CCBN, AuxBN) get a per-sample ``LongTensor`` of
:data:`NUM_DOMAINS` domains. Both sides are cast to the dtype with ``.to(dtype)`` (parameters
and buffers included) and, for ``channels_last``, to that memory format with the input.

**Timing.** After a warm-up (excluded), the number of calls per timed batch is chosen so that a
batch lasts about ``min_time``. Then, for each repeat, the baseline and the candidate are each
timed on one batch with :func:`time.perf_counter` (after ``torch.cuda.synchronize`` on CUDA),
the order alternating between repeats so that drifts of the machine hit both sides alike. A row
reports the median time per call of each side, the median of the per-repeat ratios
``candidate / baseline`` and their interquartile range. Ratios are only meaningful within one
process and one machine; the absolute times are for orientation.

**Memory.** torch has no allocator statistics on CPU, so the portable measure (``mem×``) is what
the training forward keeps alive for backward: the bytes of the unique storages of every tensor
that autograd saves (counted through :func:`torch.autograd.graph.saved_tensors_hooks`) plus the
output's, candidate over baseline. On CUDA, ``peak×`` is also given: the rise of
``torch.cuda.max_memory_allocated`` over what was allocated before the pass.

**Targets.** :data:`TARGETS` holds the ratios the layers are meant to reach; a row that a target
applies to shows it and whether the measured median meets it.

Use :func:`run` with a :class:`BenchConfig`, then :func:`format_table` and :func:`to_json`; or
``normkit bench`` / ``python benchmarks/run.py`` from a shell.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.layers.batch_channel import BatchChannelNorm2d
from normkit.layers.batch_group import BatchGroupNorm2d
from normkit.layers.bnet import BNET2d
from normkit.layers.core import SyncBatchNorm
from normkit.layers.evonorm import EvoNormB0, EvoNormS0
from normkit.layers.frozen import FrozenBatchNorm2d
from normkit.layers.group_norm import GroupNorm
from normkit.layers.iternorm import IterNorm2d
from normkit.layers.mabn import CenConv2d, MovingAverageBatchNorm2d
from normkit.layers.renorm import BatchRenorm2d
from normkit.layers.response import FilterResponseNorm2d
from normkit.layers.revisited import InputNorm2d
from normkit.layers.sandwich import (
    AuxBatchNorm2d,
    CategoricalConditionalBatchNorm2d,
    SandwichBatchNorm2d,
)
from normkit.layers.weight_std import ScaledWSConv2d, WSConv2d
from normkit.models.resnet import resnet20

__all__ = [
    "CASES",
    "DEFAULT_CASES",
    "DEFAULT_SHAPES",
    "NUM_DOMAINS",
    "QUICK_SHAPES",
    "SCHEMA",
    "TARGETS",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "Case",
    "MemoryRatio",
    "Row",
    "Summary",
    "Target",
    "TargetCheck",
    "Timing",
    "add_arguments",
    "config_from_args",
    "format_table",
    "machine_info",
    "main",
    "quantile",
    "run",
    "run_from_args",
    "saved_tensor_bytes",
    "summarize",
    "time_pair",
    "to_json",
    "write_json",
]

SCHEMA = "normkit-bench/1"
"""The ``schema`` field of the JSON output; bumped when its layout changes."""

NUM_DOMAINS = 4
"""Domains of the conditional layers; each sample gets a random one."""

Shape = tuple[int, int, int, int]
Pass = Literal["fwd", "fwd+bwd", "step"]

DEFAULT_SHAPES: tuple[Shape, ...] = (
    (32, 64, 32, 32),
    (8, 256, 16, 16),
    (2, 512, 8, 8),
    (1, 64, 32, 32),
)
"""ResNet-typical and micro-batch ``(N, C, H, W)`` inputs."""

QUICK_SHAPES: tuple[Shape, ...] = ((32, 64, 8, 8), (1, 64, 8, 8))
"""``--quick``: one batch-32 and one batch-1 shape, small enough to run in seconds."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
FORMATS: dict[str, torch.memory_format] = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
}
MODES = ("eager", "compile")

LARGE_BATCH = 8
"""Batches from this size up count as large (the large-batch BCN target)."""
MICRO_BATCH = 2
"""Batches up to this size count as micro-batches (the micro-batch BCN target)."""

MEMORY_NOTE = (
    "mem×: bytes autograd saves for backward plus the output (unique storages), "
    "candidate / baseline"
)
PEAK_NOTE = "peak×: rise of torch.cuda.max_memory_allocated during the pass, candidate / baseline"


# --- cases and targets -------------------------------------------------------------------------

Pair = tuple[nn.Module, nn.Module]


@dataclass(frozen=True)
class Case:
    """A candidate and its baseline.

    ``build(channels)`` returns fresh ``(baseline, candidate)`` modules on the CPU in float32.
    ``kind`` is ``"norm"`` or ``"conv"`` (input ``(N, C, H, W)``, output of the same shape) or
    ``"model"`` (a CIFAR network: input ``(N, 3, H, W)``, 10 logits).
    """

    key: str
    candidate: str
    baseline: str
    kind: Literal["norm", "conv", "model"]
    build: Callable[[int], Pair]
    passes: tuple[Pass, ...] = ("fwd", "fwd+bwd")
    train: bool = True
    takes_domain: bool = False


def _bcn_groups(channels: int) -> int:
    # 32 groups (the paper's default) where the channels allow, else the largest power of two
    # dividing them.
    return math.gcd(channels, 32)


def _conv_pair(candidate: Callable[..., nn.Module]) -> Callable[[int], Pair]:
    def build(c: int) -> Pair:
        return nn.Conv2d(c, c, 3, padding=1, bias=False), candidate(c, c, 3, padding=1, bias=False)

    return build


def _resnet_pair(c: int) -> Pair:
    # zero_init_residual: the BN baseline of the official Fixup code (irrelevant to speed).
    return resnet20(zero_init_residual=True), resnet20(fixup=True)


CASES: dict[str, Case] = {
    case.key: case
    for case in (
        Case(
            "sabn",
            "SandwichBatchNorm2d (shared statistics)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), SandwichBatchNorm2d(c, NUM_DOMAINS)),
            takes_domain=True,
        ),
        Case(
            "sabn-split",
            "SandwichBatchNorm2d (split_stats=True)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), SandwichBatchNorm2d(c, NUM_DOMAINS, split_stats=True)),
            takes_domain=True,
        ),
        Case(
            "ccbn",
            "CategoricalConditionalBatchNorm2d",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), CategoricalConditionalBatchNorm2d(c, NUM_DOMAINS)),
            takes_domain=True,
        ),
        Case(
            "auxbn",
            "AuxBatchNorm2d",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), AuxBatchNorm2d(c, NUM_DOMAINS)),
            takes_domain=True,
        ),
        Case(
            "bcn",
            "BatchChannelNorm2d (batch statistics, large-batch mode; 32 groups)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), BatchChannelNorm2d(c, _bcn_groups(c))),
        ),
        Case(
            "bcn-est",
            "BatchChannelNorm2d (estimate=True, micro-batch mode; 32 groups)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), BatchChannelNorm2d(c, _bcn_groups(c), estimate=True)),
        ),
        Case(
            "inputnorm",
            "InputNorm2d",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), InputNorm2d(c)),
        ),
        Case(
            "syncbn",
            "SyncBatchNorm (no process group: local statistics)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), SyncBatchNorm(c)),
        ),
        Case("wsconv", "WSConv2d 3x3 (train)", "nn.Conv2d 3x3", "conv", _conv_pair(WSConv2d)),
        Case(
            "wsconv-eval",
            "WSConv2d 3x3 (eval, no_grad)",
            "nn.Conv2d 3x3",
            "conv",
            _conv_pair(WSConv2d),
            passes=("fwd",),
            train=False,
        ),
        Case(
            "scaledws",
            "ScaledWSConv2d 3x3 (train)",
            "nn.Conv2d 3x3",
            "conv",
            _conv_pair(ScaledWSConv2d),
        ),
        # The related methods (issue 8). No targets: their ratios are reported, not promised.
        Case(
            "brn",
            "BatchRenorm2d (r and d active: no warm-up)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (
                nn.BatchNorm2d(c),
                BatchRenorm2d(c, warmup_steps=0, r_max_steps=0, d_max_steps=0),
            ),
        ),
        Case(
            "mabn",
            "MovingAverageBatchNorm2d (buffer of 16 steps)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), MovingAverageBatchNorm2d(c)),
        ),
        Case(
            "bgn",
            "BatchGroupNorm2d (32 groups)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), BatchGroupNorm2d(c, num_groups=_bcn_groups(c))),
        ),
        Case(
            "iternorm",
            "IterNorm2d (groups of 64 channels, T = 5)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), IterNorm2d(c)),
        ),
        Case(
            "bnet",
            "BNET2d (3x3 depthwise affine)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), BNET2d(c)),
        ),
        Case(
            "frn",
            "FilterResponseNorm2d with TLU",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), FilterResponseNorm2d(c)),
        ),
        Case(
            "evonorm-b0",
            "EvoNormB0",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), EvoNormB0(c)),
        ),
        Case(
            "evonorm-s0",
            "EvoNormS0 (32 groups)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), EvoNormS0(c, num_groups=_bcn_groups(c))),
        ),
        Case(
            "groupnorm",
            "normkit.GroupNorm (32 groups)",
            "nn.BatchNorm2d",
            "norm",
            lambda c: (nn.BatchNorm2d(c), GroupNorm(c, _bcn_groups(c))),
        ),
        Case(
            "frozenbn",
            "FrozenBatchNorm2d (no_grad)",
            "nn.BatchNorm2d (eval, no_grad)",
            "norm",
            lambda c: (nn.BatchNorm2d(c), FrozenBatchNorm2d(c)),
            passes=("fwd",),
            train=False,
        ),
        Case("cenconv", "CenConv2d 3x3 (train)", "nn.Conv2d 3x3", "conv", _conv_pair(CenConv2d)),
        Case(
            "resnet20-fixup",
            "Fixup ResNet-20 (fixup=True)",
            "BN ResNet-20",
            "model",
            _resnet_pair,
            passes=("step",),
        ),
    )
}
"""Every case, by the name ``--layers`` takes."""

DEFAULT_CASES: tuple[str, ...] = tuple(CASES)
"""The cases run when ``--layers`` is not given: all of them."""


@dataclass(frozen=True)
class Target:
    """The most a ratio may be, on the rows of ``case`` with the given pass, dtype and batch."""

    case: str
    metric: Literal["time", "memory"]
    limit: float
    note: str
    passes: tuple[Pass, ...] = ("fwd+bwd",)
    dtype: str = "float32"
    min_batch: int | None = None
    max_batch: int | None = None

    def applies(self, row: Row) -> bool:
        batch = row.shape[0]
        return (
            row.case == self.case
            and row.pass_ in self.passes
            and row.dtype == self.dtype
            and (self.min_batch is None or batch >= self.min_batch)
            and (self.max_batch is None or batch <= self.max_batch)
        )

    def describe(self) -> str:
        batch = ""
        if self.min_batch is not None:
            batch = f", batch >= {self.min_batch}"
        if self.max_batch is not None:
            batch = f", batch <= {self.max_batch}"
        passes = "/".join(self.passes)
        return (
            f"{self.case} {passes} {self.dtype}{batch}: {self.metric} ratio <= {self.limit:.2f} "
            f"({self.note})"
        )


TARGETS: tuple[Target, ...] = (
    Target("sabn", "time", 1.10, "SaBN, shared statistics"),
    Target("ccbn", "time", 1.10, "CCBN"),
    Target("auxbn", "time", 1.10, "AuxBN"),
    Target("bcn", "time", 1.40, "BCN, large batch", min_batch=LARGE_BATCH),
    Target("bcn-est", "time", 1.20, "micro-batch BCN, estimate=True", max_batch=MICRO_BATCH),
    Target("wsconv", "time", 1.05, "WSConv2d vs nn.Conv2d, batch 32", min_batch=32),
    Target(
        "wsconv-eval",
        "time",
        1.01,
        "WSConv2d vs nn.Conv2d, eval, batch 1",
        passes=("fwd",),
        max_batch=1,
    ),
    Target("resnet20-fixup", "time", 0.85, "Fixup vs BN ResNet-20 step", passes=("step",)),
    Target("sabn", "memory", 1.10, "SaBN memory"),
    Target("bcn", "memory", 1.10, "BCN memory"),
)
"""The ratios the layers should reach (float32 training unless said otherwise). A memory target
is checked against ``peak×`` where measured (CUDA), else against ``mem×``."""


# --- timing --------------------------------------------------------------------------------------


def _no_sync() -> None:
    pass


@dataclass(frozen=True)
class Timing:
    """Seconds per call of each side, one value per repeat, and the calls per timed batch."""

    baseline: tuple[float, ...]
    candidate: tuple[float, ...]
    iters: int

    @property
    def ratios(self) -> tuple[float, ...]:
        """``candidate / baseline`` of each repeat."""
        return tuple(c / b for b, c in zip(self.baseline, self.candidate))


def time_pair(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    repeats: int,
    iters: int,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] = _no_sync,
) -> Timing:
    """Time ``iters`` calls of each side per repeat, interleaved.

    Even repeats run the baseline first, odd ones the candidate first. ``sync`` is called before
    reading the clock (``torch.cuda.synchronize`` on CUDA).
    """
    if repeats < 1 or iters < 1:
        raise ValueError(f"time_pair: expected repeats and iters >= 1, got {repeats}, {iters}")
    times: tuple[list[float], list[float]] = ([], [])
    sides = ((0, baseline), (1, candidate))
    for repeat in range(repeats):
        for side, fn in sides if repeat % 2 == 0 else sides[::-1]:
            sync()
            start = clock()
            for _ in range(iters):
                fn()
            sync()
            times[side].append((clock() - start) / iters)
    return Timing(tuple(times[0]), tuple(times[1]), iters)


def _calibrate(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    warmup: int,
    min_time: float,
    sync: Callable[[], None],
) -> int:
    """Run the warm-up, then return the calls per batch for a batch of about ``min_time``."""
    for _ in range(warmup):
        baseline()
        candidate()
    once = time_pair(baseline, candidate, repeats=1, iters=1, sync=sync)
    slowest = max(once.baseline[0], once.candidate[0], 1e-7)
    return max(1, min(10_000, math.ceil(min_time / slowest)))


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile: expected at least one value")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Medians of a :class:`Timing`: ms per call of each side, ratio and its quartiles."""

    baseline_ms: float
    candidate_ms: float
    ratio: float
    ratio_q25: float
    ratio_q75: float


def summarize(timing: Timing) -> Summary:
    """Median times (ms per call), median ratio and the quartiles of the per-repeat ratios."""
    ratios = timing.ratios
    return Summary(
        baseline_ms=quantile(timing.baseline, 0.5) * 1e3,
        candidate_ms=quantile(timing.candidate, 0.5) * 1e3,
        ratio=quantile(ratios, 0.5),
        ratio_q25=quantile(ratios, 0.25),
        ratio_q75=quantile(ratios, 0.75),
    )


# --- memory --------------------------------------------------------------------------------------


def _storage_key(t: Tensor) -> tuple[str, int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # no storage (sparse, nested, ...)
        return None
    return (str(t.device), storage.data_ptr(), storage.nbytes())


def saved_tensor_bytes(forward: Callable[[], object], state: Iterable[Tensor] = ()) -> int:
    """Bytes of the unique storages that ``forward()`` saves for backward, plus its outputs'.

    Counted with :func:`torch.autograd.graph.saved_tensors_hooks`: a tensor saved twice, or a
    view of a saved tensor, counts once; so does an output that is also saved. The input counts
    when it is saved (saving it is what keeps it alive in a network). The storages of ``state``
    (the module's parameters and buffers) do not count: they are alive whatever the layer saves,
    and counting them would charge a baseline that saves its weight while a layer that saves a
    derived weight (a standardized one) instead looked free. Tensors an autograd function keeps
    outside ``save_for_backward`` (attributes of ``ctx``, a C++ node's ``saved_data``) are not
    seen by the hooks and not counted.
    """
    storages: set[tuple[str, int, int]] = set()
    skip = {key for key in map(_storage_key, state) if key is not None}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key not in skip:
            storages.add(key)
        return t

    def unpack(t: Tensor) -> Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = forward()
    for t in _tensors(out):
        key = _storage_key(t)
        if key is not None and key not in skip:
            storages.add(key)
    return sum(key[2] for key in storages)


def _tensors(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRatio:
    """A memory measure of each side, in bytes."""

    baseline_bytes: int
    candidate_bytes: int

    @property
    def ratio(self) -> float:
        return self.candidate_bytes / self.baseline_bytes if self.baseline_bytes else math.nan


@dataclass(frozen=True)
class TargetCheck:
    """A target applied to a row: the measured ratio and whether it is within the limit."""

    metric: Literal["time", "memory"]
    limit: float
    value: float
    met: bool


@dataclass
class Row:
    """One measured (or failed) row; ``error`` is set, and the numbers are ``None``, on failure."""

    case: str
    device: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    mode: str
    pass_: str
    summary: Summary | None = None
    timing: Timing | None = None
    memory: MemoryRatio | None = None
    peak: MemoryRatio | None = None
    targets: list[TargetCheck] = field(default_factory=list)
    error: str | None = None


def _check_targets(row: Row, targets: Sequence[Target]) -> list[TargetCheck]:
    checks = []
    for target in targets:
        if not target.applies(row):
            continue
        if target.metric == "time":
            value = row.summary.ratio if row.summary is not None else None
        else:
            measured = row.peak or row.memory
            value = measured.ratio if measured is not None else None
        if value is None or not math.isfinite(value):
            continue
        checks.append(TargetCheck(target.metric, target.limit, value, value <= target.limit))
    return checks


# --- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What to run; :func:`config_from_args` builds one from the command line."""

    cases: tuple[str, ...] = DEFAULT_CASES
    shapes: tuple[Shape, ...] = DEFAULT_SHAPES
    dtypes: tuple[str, ...] = ("float32",)
    formats: tuple[str, ...] = ("contiguous", "channels_last")
    modes: tuple[str, ...] = ("eager",)
    devices: tuple[str, ...] = ("cpu",)
    repeats: int = 9
    warmup: int = 2
    min_time: float = 0.01
    threads: int | None = None
    compile_backend: str = "inductor"
    quick: bool = False
    #: Route the layers through normkit's compiled CPU kernels (:mod:`normkit.kernels`).
    kernels: bool = False
    #: Keep freed memory in glibc's heap for the run (:func:`steady_malloc`).
    steady_malloc: bool = True


@dataclass
class BenchResult:
    """The rows of one :func:`run`, with its configuration, machine and duration (seconds).

    ``complete`` is False for the partial results that :func:`run` hands to ``checkpoint``
    before its last group of rows is done.
    """

    config: BenchConfig
    machine: dict[str, Any]
    rows: list[Row]
    seconds: float
    complete: bool = True


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(devices: Sequence[str] = ("cpu",)) -> dict[str, Any]:
    """Versions, CPU model, thread count and the name of each device used."""
    from normkit import __version__, kernels

    names = {}
    for device in devices:
        if device.startswith("cuda"):
            names[device] = torch.cuda.get_device_name(torch.device(device))
        else:
            names[device] = _cpu_model()
    return {
        "normkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "devices": names,
        "kernels": kernels.is_enabled(),
    }


class _Pair:
    """The two sides of one case on one input, ready to call for each pass."""

    def __init__(
        self, case: Case, shape: Shape, dtype: torch.dtype, fmt: torch.memory_format, device: str
    ) -> None:
        self.case = case
        n, c, h, w = shape
        if case.kind == "model":
            c = 3
        self.shape: tuple[int, ...] = (n, c, h, w)
        modules = case.build(c)
        # The stubs of Module.to lack memory_format, which it takes (conv weights go NHWC).
        self.modules = [
            m.to(device=device, dtype=dtype, memory_format=fmt).train(case.train)  # type: ignore[call-overload]
            for m in modules
        ]
        self.callables: list[Callable[..., Any]] = list(self.modules)
        x = torch.randn(self.shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        self.x = x.requires_grad_(case.train and case.kind != "model")
        self.domain = torch.randint(0, NUM_DOMAINS, (n,), device=device)
        self.labels = torch.randint(0, 10, (n,), device=device)
        # Only the "step" pass of a model case steps an optimizer (FrozenBatchNorm2d has no
        # parameter to give one).
        self.optimizers = [
            torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) if case.kind == "model" else None
            for m in self.modules
        ]
        # Norms and 3x3 padded C -> C convs keep the input's shape (and memory format).
        self.grad_out = torch.randn_like(x)

    def compile(self, backend: str) -> None:
        self.callables = [torch.compile(m, backend=backend) for m in self.modules]

    def state(self, side: int) -> list[Tensor]:
        """The parameters and buffers of one side's module."""
        module = self.modules[side]
        return [*module.parameters(), *module.buffers()]

    def forward(self, side: int) -> Tensor:
        module = self.callables[side]
        if side == 1 and self.case.takes_domain:
            return module(self.x, self.domain)
        return module(self.x)

    def fn(self, side: int, pass_: Pass) -> Callable[[], object]:
        if pass_ == "fwd":
            if self.case.train:
                return lambda: self.forward(side)

            def inference() -> Tensor:
                with torch.no_grad():
                    return self.forward(side)

            return inference
        if pass_ == "step":
            model, opt = self.callables[side], self.optimizers[side]
            assert opt is not None

            def step() -> Tensor:
                loss = F.cross_entropy(model(self.x).float(), self.labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            return step
        inputs = [self.x, *(p for p in self.modules[side].parameters() if p.requires_grad)]

        def forward_backward() -> tuple[Tensor, ...]:
            return torch.autograd.grad(self.forward(side), inputs, self.grad_out)

        return forward_backward


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return message[:300]


def _rows_for(
    case: Case, shape: Shape, dtype: str, fmt: str, mode: str, device: str, config: BenchConfig
) -> list[Row]:
    rows = [
        Row(case.key, device, _input_shape(case, shape), dtype, fmt, mode, pass_)
        for pass_ in case.passes
    ]
    sync: Callable[[], None] = _no_sync
    if device.startswith("cuda"):
        dev = torch.device(device)

        def sync() -> None:
            torch.cuda.synchronize(dev)

    try:
        # Same inputs and init on every run, without touching the caller's random state.
        cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            pair = _Pair(case, shape, DTYPES[dtype], FORMATS[fmt], device)
        if mode == "compile":
            # A fresh cache per row: no recompile limit reached, no dims made dynamic by the
            # shapes of earlier rows.
            torch._dynamo.reset()
            pair.compile(config.compile_backend)
    except Exception as exc:
        for row in rows:
            row.error = _error_text(exc)
        return rows
    for row in rows:
        pass_ = row.pass_
        assert pass_ in ("fwd", "fwd+bwd", "step")
        try:
            base, cand = pair.fn(0, pass_), pair.fn(1, pass_)  # type: ignore[arg-type]
            iters = _calibrate(
                base, cand, warmup=config.warmup, min_time=config.min_time, sync=sync
            )
            row.timing = time_pair(base, cand, repeats=config.repeats, iters=iters, sync=sync)
            row.summary = summarize(row.timing)
            if case.train:
                row.memory = MemoryRatio(
                    saved_tensor_bytes(lambda: pair.forward(0), pair.state(0)),
                    saved_tensor_bytes(lambda: pair.forward(1), pair.state(1)),
                )
            if device.startswith("cuda"):
                dev = torch.device(device)
                row.peak = MemoryRatio(_cuda_peak_bytes(base, dev), _cuda_peak_bytes(cand, dev))
        except Exception as exc:
            row.error = _error_text(exc)
            row.summary = row.timing = row.memory = row.peak = None
        row.targets = _check_targets(row, TARGETS)
    return rows


def _input_shape(case: Case, shape: Shape) -> tuple[int, ...]:
    n, c, h, w = shape
    return (n, 3, h, w) if case.kind == "model" else (n, c, h, w)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def steady_malloc() -> bool:
    """Stop glibc's malloc from returning freed activations to the OS during the run.

    By default glibc serves large blocks with fresh ``mmap`` pages, or trims its heap after
    frees; either way each new activation-sized tensor is faulted in page by page. On the
    development VM that was 500–1,000 page faults per training step at 8x256x16x16 (a few µs
    each), more than the normalization itself, and how many depended on the allocator's
    history, not on the layer: ratios moved by ±30% between runs. With a fixed mmap threshold
    of 32 MiB (glibc's maximum) and no trimming, freed blocks are reused, as a caching
    allocator (jemalloc, tcmalloc, CUDA's) would reuse them. It applies to both sides of every
    row alike and to the rest of the process; returns False where it does not apply (no glibc).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )


@contextlib.contextmanager
def _kernels(on: bool) -> Iterator[None]:
    """normkit's compiled kernels on (or off) for the run, as they were afterwards."""
    from normkit import kernels

    previous = kernels.is_enabled()
    if on:
        kernels.enable()
    else:
        kernels.disable()
    try:
        yield
    finally:
        (kernels.enable if previous else kernels.disable)()


def run(
    config: BenchConfig,
    progress: Callable[[int, int, str], None] | None = None,
    checkpoint: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Run every row of ``config``; ``progress(done, total, label)`` is called before each
    group of rows (one case, shape, dtype, format, mode and device), and ``checkpoint`` after
    each group but the last, with the rows so far (``complete=False``)."""
    start = time.perf_counter()
    groups = [
        (device, key, shape, dtype, fmt, mode)
        for device in config.devices
        for key in config.cases
        for shape in config.shapes
        for dtype in config.dtypes
        for fmt in config.formats
        for mode in config.modes
    ]
    rows: list[Row] = []
    steady = steady_malloc() if config.steady_malloc else False
    with _threads(config.threads), _kernels(config.kernels):
        machine = machine_info(config.devices)
        machine["steady_malloc"] = steady
        for done, (device, key, shape, dtype, fmt, mode) in enumerate(groups):
            case = CASES[key]
            if progress is not None:
                label = f"{key} {_shape_text(_input_shape(case, shape))} {dtype} {fmt} {mode}"
                progress(done, len(groups), f"{label} {device}")
            rows.extend(_rows_for(case, shape, dtype, fmt, mode, device, config))
            if checkpoint is not None and done + 1 < len(groups):
                seconds = time.perf_counter() - start
                checkpoint(BenchResult(config, machine, list(rows), seconds, complete=False))
    if progress is not None:
        progress(len(groups), len(groups), "done")
    return BenchResult(config, machine, rows, time.perf_counter() - start)


# --- output --------------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _ratio_text(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def format_table(result: BenchResult) -> str:
    """A fixed-width table of every row, then what the columns mean and the targets."""
    machine = result.machine
    config = result.config
    show_peak = any(row.peak is not None for row in result.rows)
    header = [
        "layer",
        "device",
        "shape",
        "dtype",
        "format",
        "mode",
        "pass",
        "base ms",
        "cand ms",
        "ratio [IQR]",
        "mem×",
        *(["peak×"] if show_peak else []),
        "target",
        "met",
    ]
    right = {"base ms", "cand ms", "mem×", "peak×"}
    lines: list[list[str]] = []
    errors: list[tuple[int, str]] = []
    for row in result.rows:
        cells = [row.case, row.device, _shape_text(row.shape), row.dtype, row.format, row.mode]
        cells.append(row.pass_)
        if row.summary is not None:
            s = row.summary
            cells += [
                f"{s.baseline_ms:.3f}",
                f"{s.candidate_ms:.3f}",
                f"{s.ratio:.2f} [{s.ratio_q25:.2f}-{s.ratio_q75:.2f}]",
            ]
        else:
            cells += ["-", "-", "error"]
        cells.append(_ratio_text(row.memory.ratio if row.memory else None))
        if show_peak:
            cells.append(_ratio_text(row.peak.ratio if row.peak else None))
        cells.append(
            " ".join(
                f"{'mem' if t.metric == 'memory' else 't'}<={t.limit:.2f}" for t in row.targets
            )
            or "-"
        )
        cells.append(" ".join("yes" if t.met else "NO" for t in row.targets) or "-")
        lines.append(cells)
        if row.error is not None:
            errors.append((len(lines) - 1, row.error))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def render(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if name in right else cell.ljust(width)
            for cell, width, name in zip(cells, widths, header)
        ]
        return "  ".join(parts).rstrip()

    devices = ", ".join(f"{k}: {v}" for k, v in machine["devices"].items())
    out = [
        f"normkit {machine['normkit']} bench: torch {machine['torch']}, {devices}, "
        f"torch threads: {machine['threads']}, {config.repeats} repeats, "
        f"normkit kernels: {'on' if config.kernels else 'off'}, "
        f"steady malloc: {'on' if machine.get('steady_malloc') else 'off'}, "
        f"{result.seconds:.0f} s",
        "",
        render(header),
        render(["-" * w for w in widths]),
    ]
    error_at = dict(errors)
    for index, cells in enumerate(lines):
        out.append(render(cells))
        if index in error_at:
            out.append(f"    error: {error_at[index]}")
    checks = [t for row in result.rows for t in row.targets]
    used = {row.case for row in result.rows}
    out += [
        "",
        f"ratio: candidate / baseline time per call, median of {config.repeats} interleaved "
        "repeats [interquartile range]; base/cand ms: median time per call (warm-up excluded)",
        MEMORY_NOTE,
        *([PEAK_NOTE] if show_peak else []),
        f"conditional layers (sabn, sabn-split, ccbn, auxbn) get a per-sample LongTensor of "
        f"{NUM_DOMAINS} domains; fwd in train mode builds the autograd graph; fwd+bwd adds "
        "autograd.grad w.r.t. input and parameters; step is forward, loss, backward, SGD step",
        "",
        "cases:",
        *(
            f"  {key}: {CASES[key].candidate} vs {CASES[key].baseline}"
            for key in config.cases
            if key in used
        ),
        "targets (memory targets use peak× where measured, else mem×):",
        *(f"  {t.describe()}" for t in TARGETS if t.case in used),
        f"targets met: {sum(t.met for t in checks)} of {len(checks)} checks",
    ]
    return "\n".join(out)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _memory_json(memory: MemoryRatio | None) -> dict[str, Any] | None:
    if memory is None:
        return None
    return {
        "baseline_bytes": memory.baseline_bytes,
        "candidate_bytes": memory.candidate_bytes,
        "ratio": _finite(memory.ratio),
    }


def to_json(result: BenchResult) -> dict[str, Any]:
    """The result as JSON-ready data (schema :data:`SCHEMA`)."""
    config = result.config
    rows = []
    for row in result.rows:
        case = CASES[row.case]
        s, timing = row.summary, row.timing
        rows.append(
            {
                "layer": row.case,
                "candidate": case.candidate,
                "baseline": case.baseline,
                "device": row.device,
                "shape": list(row.shape),
                "dtype": row.dtype,
                "format": row.format,
                "mode": row.mode,
                "pass": row.pass_,
                "baseline_ms": _finite(s.baseline_ms) if s else None,
                "candidate_ms": _finite(s.candidate_ms) if s else None,
                "ratio": _finite(s.ratio) if s else None,
                "ratio_q25": _finite(s.ratio_q25) if s else None,
                "ratio_q75": _finite(s.ratio_q75) if s else None,
                "ratios": [_finite(r) for r in timing.ratios] if timing else None,
                "iters": timing.iters if timing else None,
                "repeats": len(timing.ratios) if timing else None,
                "memory": _memory_json(row.memory),
                "peak": _memory_json(row.peak),
                "targets": [
                    {"metric": t.metric, "limit": t.limit, "value": t.value, "met": t.met}
                    for t in row.targets
                ],
                "error": row.error,
            }
        )
    return {
        "schema": SCHEMA,
        "machine": result.machine,
        "config": {
            "layers": list(config.cases),
            "shapes": [list(s) for s in config.shapes],
            "dtypes": list(config.dtypes),
            "formats": list(config.formats),
            "modes": list(config.modes),
            "devices": list(config.devices),
            "repeats": config.repeats,
            "warmup": config.warmup,
            "min_time_s": config.min_time,
            "compile_backend": config.compile_backend,
            "quick": config.quick,
            "kernels": config.kernels,
            "steady_malloc": config.steady_malloc,
            "num_domains": NUM_DOMAINS,
        },
        "notes": {"memory": MEMORY_NOTE, "peak": PEAK_NOTE},
        "targets": [
            {
                "layer": t.case,
                "metric": t.metric,
                "limit": t.limit,
                "passes": list(t.passes),
                "dtype": t.dtype,
                "min_batch": t.min_batch,
                "max_batch": t.max_batch,
                "note": t.note,
            }
            for t in TARGETS
        ],
        "seconds": result.seconds,
        "complete": result.complete,
        "rows": rows,
    }


# --- command line --------------------------------------------------------------------------------


def _names(kind: str, known: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        if not names:
            raise argparse.ArgumentTypeError(f"expected one or more {kind}, got {text!r}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(unknown)} (expected {', '.join(known)})"
            )
        return names

    return parse


def _shapes(text: str) -> tuple[Shape, ...]:
    shapes = []
    for part in (t.strip() for t in text.split(",")):
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in part.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            raise argparse.ArgumentTypeError(
                f"expected shapes NxCxHxW of positive integers, comma-separated, got {part!r}"
            )
        shapes.append((dims[0], dims[1], dims[2], dims[3]))
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected one or more shapes NxCxHxW, got {text!r}")
    return tuple(dict.fromkeys(shapes))


def _devices(text: str) -> tuple[str, ...]:
    if text == "auto":
        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    devices = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    for device in devices:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise argparse.ArgumentTypeError(
                f"unknown device {device!r} (expected cpu or cuda)"
            ) from None
        if parsed.type not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"expected cpu or cuda devices, got {device!r}")
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{device}: CUDA is not available")
    if not devices:
        raise argparse.ArgumentTypeError(f"expected one or more devices, got {text!r}")
    return devices


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``normkit bench`` (and of ``benchmarks/run.py``)."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"seconds, not minutes: shapes {','.join(map(_shape_text, QUICK_SHAPES))}, "
        "float32, contiguous, 3 repeats, 1 warm-up call, 2 ms batches (explicit options "
        "still win)",
    )
    parser.add_argument(
        "--layers",
        type=_names("layers", tuple(CASES)),
        help=f"comma-separated cases (default: all: {','.join(DEFAULT_CASES)})",
    )
    parser.add_argument(
        "--shapes",
        type=_shapes,
        help="comma-separated NxCxHxW inputs (default: "
        f"{','.join(map(_shape_text, DEFAULT_SHAPES))}); models take Nx3xHxW",
    )
    parser.add_argument(
        "--dtypes",
        type=_names("dtypes", tuple(DTYPES)),
        help="comma-separated: float32, bfloat16, float16 (default: float32; bfloat16 convs "
        "are slow on CPUs without native bfloat16 support)",
    )
    parser.add_argument(
        "--formats",
        type=_names("formats", tuple(FORMATS)),
        help="comma-separated: contiguous, channels_last (default: both)",
    )
    parser.add_argument(
        "--modes",
        type=_names("modes", MODES),
        help="comma-separated: eager, compile (torch.compile of both sides; default: eager)",
    )
    parser.add_argument(
        "--device",
        type=_devices,
        default="auto",
        help="comma-separated: cpu, cuda (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--repeats", type=_positive(int), help="interleaved repeats per row (default: 9)"
    )
    parser.add_argument(
        "--warmup", type=_positive(int), help="untimed calls of each side first (default: 2)"
    )
    parser.add_argument(
        "--min-time",
        type=_positive(float),
        help="milliseconds per timed batch of calls (default: 10)",
    )
    parser.add_argument(
        "--threads",
        type=_positive(int),
        help=f"torch CPU threads (default: torch's, {torch.get_num_threads()} here)",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (default: inductor)"
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="run normkit's layers through its compiled CPU kernels (normkit.kernels; "
        "compiled on first use, about 40 s; needs a C++ compiler and ninja)",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as configured (default: keep freed memory in the heap for "
        "the run, see normkit.bench.steady_malloc; page faults otherwise dominate small rows)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the JSON here (rewritten after every group of rows: a run stopped early "
        "keeps what it measured, marked incomplete)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A :class:`BenchConfig` from parsed options (``--quick`` sets defaults, options win)."""
    quick = bool(args.quick)
    devices = args.device if isinstance(args.device, tuple) else _devices(args.device)
    return BenchConfig(
        cases=args.layers or DEFAULT_CASES,
        shapes=args.shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES),
        dtypes=args.dtypes or ("float32",),
        formats=args.formats or (("contiguous",) if quick else ("contiguous", "channels_last")),
        modes=args.modes or ("eager",),
        devices=devices,
        repeats=args.repeats or (3 if quick else 9),
        warmup=args.warmup or (1 if quick else 2),
        min_time=(args.min_time or (2.0 if quick else 10.0)) / 1e3,
        threads=args.threads,
        compile_backend=args.compile_backend,
        quick=quick,
        kernels=bool(getattr(args, "kernels", False)),
        steady_malloc=not getattr(args, "system_malloc", False),
    )


def _progress_printer(enabled: bool) -> Callable[[int, int, str], None] | None:
    if not enabled:
        return None

    def show(done: int, total: int, label: str) -> None:
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r\033[K[{done}/{total}] {label}{end}")
        sys.stderr.flush()

    return show


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``normkit bench`` with parsed options: print the table, write ``--json``."""
    config = config_from_args(args)
    path = None if args.json is None else _check_json_path(Path(args.json))
    if config.kernels:
        from normkit import kernels

        try:
            kernels.build()  # before the run, so that a failure costs no minutes
        except kernels.KernelBuildError as exc:
            raise BenchError(f"--kernels: {exc}") from None
    progress = _progress_printer(not args.no_progress and sys.stderr.isatty())

    def write(partial: BenchResult) -> None:
        # Rewritten after every group: a run stopped early (a time limit, Ctrl-C) keeps the
        # rows it measured, marked "complete": false.
        if path is not None:
            write_json(partial, path)

    result = run(config, progress, write)
    print(format_table(result), flush=True)
    if path is not None:
        write_json(result, path)
        print(f"\njson: {path}")
    return 0


def write_json(result: BenchResult, path: Path) -> None:
    """Write :func:`to_json` of ``result`` to ``path`` whole or not at all (a reader never sees
    half a file, even if the run is killed while writing)."""
    text = json.dumps(to_json(result), indent=1, allow_nan=False) + "\n"
    scratch = path.with_name(f".{path.name}.partial")
    scratch.write_text(text)
    os.replace(scratch, path)


class BenchError(ValueError):
    """A bad option found before the benchmark starts (the command shows it as one line)."""


def _check_json_path(path: Path) -> Path:
    # Checked before the run: a typo must not cost the minutes of a benchmark.
    if path.is_dir():
        raise BenchError(f"--json: {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"--json: cannot create {path.parent} ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BenchError(f"--json: cannot write {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/run.py``: the same options as ``normkit bench``."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Time and memory of normkit's layers against their torch baselines.",
        allow_abbrev=False,
    )
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    except BenchError as exc:
        parser.error(str(exc))
