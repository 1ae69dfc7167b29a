"""normkit's compiled CPU kernels (:mod:`normkit.kernels`) equal the PyTorch path.

The kernels are built here (the test environment has a C++ compiler and ninja; the first build
takes about 20 s and is cached). Every batch-norm-core configuration of the layer table runs
with the kernels on against its reference path (``fast = False``) in float64 to 1e-10: output,
input and parameter gradients, and every buffer after the update; double backward, gradcheck,
the running-statistics rules (cumulative momentum, non-finite batches, rows with one value) and
the routing (which inputs the kernel takes) are checked separately.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from normkit import _fused, kernels
from normkit.layers import core
from normkit.layers.batch_channel import _BatchChannelNorm
from normkit.layers.core import _BatchNormCore
from normkit.layers.renorm import _BatchRenorm
from normkit.models import resnet
from tests.counting import count_calls
from tests.layer_table import LAYERS, layer_params
from tests.test_compile import (
    _float64_case,
    assert_create_graph_changes_no_gradient,
    assert_forward_ad_matches_reverse,
)
from tests.test_fast_paths import EXTRA, WS_CASES, WS_MODES, _compare, _ws_pair, _ws_run

F64 = torch.float64
RECORDS = [r for r in [*LAYERS, *EXTRA] if issubclass(r.cls, (_BatchNormCore, _BatchChannelNorm))]


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The kernels on for one test (off again afterwards); the list counts the layers' calls of
    the kernels (the core's usual call and BCN's only where they ran)."""
    kernels.enable()
    calls = count_calls(monkeypatch, core, "core_kernel")
    count_calls(monkeypatch, _BatchNormCore, "_kernel_call", calls, when=lambda y: y is not None)
    count_calls(monkeypatch, _fused, "weight_standardize_kernel", calls)
    count_calls(
        monkeypatch, _BatchChannelNorm, "_kernel_forward", calls, when=lambda y: y is not None
    )
    count_calls(monkeypatch, resnet, "_fixup_block_kernel", calls, when=lambda y: y is not None)
    try:
        yield calls
    finally:
        kernels.disable()


@pytest.mark.parametrize(("record", "kind"), layer_params(RECORDS))
def test_kernel_equals_reference(record: Any, kind: str | None, kernel_calls: list[str]) -> None:
    _compare(record, kind)
    # Every configuration with a rank-3 to rank-5 input reaches the kernel, except batch
    # renormalization, whose r and d are functions of the batch statistics (its own path).
    renorm = issubclass(record.cls, _BatchRenorm)
    assert bool(kernel_calls) == (len(record.shapes[0]) > 2 and not renorm)


@pytest.mark.parametrize(("record", "kind"), layer_params([r for r in RECORDS if r.is_4d]))
def test_kernel_equals_reference_channels_last(
    record: Any, kind: str | None, kernel_calls: list[str]
) -> None:
    _compare(record, kind, channels_last=True)  # also checks the output keeps the layout
    assert bool(kernel_calls) == (not issubclass(record.cls, _BatchRenorm))


def test_channels_last_with_a_contiguous_output_gradient(kernel_calls: list[str]) -> None:
    """The upstream gradient of a channels_last output may arrive in another layout."""
    layer = nk.BatchChannelNorm2d(4, 2).to(F64)
    ref = copy.deepcopy(layer)
    ref.fast = False
    x = torch.randn(3, 4, 5, 5, dtype=F64).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(3, 4, 5, 5, dtype=F64)  # contiguous
    grads = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_()
        module(xi).backward(upstream)
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    assert kernel_calls


def _tables(c: int, k: int, shared: bool, domain: bool) -> list[Tensor | None]:
    g = torch.Generator().manual_seed(3)

    def param(*shape: int, centre: float) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=F64) * 0.5 + centre).requires_grad_()

    w = param(c, centre=1.0) if shared else None
    b = param(c, centre=0.0) if shared else None
    dw = param(k, c, centre=1.0) if domain else None
    db = param(k, c, centre=0.0) if domain else None
    return [w, b, dw, db]


@pytest.mark.parametrize("groups", [0, 3])
@pytest.mark.parametrize("parts", ["shared", "domain", "both", "none"])
def test_kernel_function_gradcheck_and_gradgradcheck(
    groups: int, parts: str, kernel_calls: list[str]
) -> None:
    shared, domain = parts in ("shared", "both"), parts in ("domain", "both")
    x = (torch.randn(5, 3, 2, 3, dtype=F64) * 2 + 3).requires_grad_()
    params = _tables(3, 3, shared, domain)
    index = torch.tensor([0, 2, 2, 0, 2])  # domain 1 absent: an empty group

    def fn(x: Tensor, *p: Tensor | None) -> Tensor:
        return _fused.core_kernel(x, *p, index, groups, 1e-5)[0]

    inputs = (x, *params)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("groups", [0, 3])
def test_kernel_function_equals_the_written_out_formula(groups: int) -> None:
    """Against the formula in float64, independently of the layers: the statistics of each
    group (or of the whole batch), the shared then the per-domain affine; and the returned
    statistics and counts."""
    kernels.enable()
    try:
        x = torch.randn(6, 4, 3, 5, dtype=F64) * 3 + 5
        w, b, dw, db = (p.detach() for p in _tables(4, 3, True, True))  # type: ignore[union-attr]
        index = torch.tensor([0, 2, 2, 0, 0, 2])
        y, mean, var, count = _fused.core_kernel(x, w, b, dw, db, index, groups, 1e-5)
    finally:
        kernels.disable()
    if groups:
        stats = [x[index == k] for k in range(3)]
        want_mean = torch.stack([s.mean((0, 2, 3)) if len(s) else x.new_zeros(4) for s in stats])
        want_var = torch.stack(
            [s.var((0, 2, 3), correction=0) if len(s) else x.new_zeros(4) for s in stats]
        )
        want_count = torch.tensor([3.0, 0.0, 3.0], dtype=F64)
        mu, v = want_mean[index], want_var[index]
    else:
        want_var, want_mean = torch.var_mean(x, (0, 2, 3), correction=0)
        want_mean, want_var = want_mean[None], want_var[None]
        want_count = torch.tensor([6.0], dtype=F64)
        mu, v = want_mean.expand(6, 4), want_var.expand(6, 4)
    xhat = (x - mu[..., None, None]) / torch.sqrt(v[..., None, None] + 1e-5)
    z = xhat * w[:, None, None] + b[:, None, None]
    want = z * dw[index][..., None, None] + db[index][..., None, None]
    for got, ref in ((y, want), (mean, want_mean), (var, want_var), (count, want_count)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_float32_kernel_is_close_to_float64(kernel_calls: list[str]) -> None:
    """Float32 statistics from per-plane shifted sums merged in double: close to the float64
    result even for a mean far from zero."""
    layer = nk.SandwichBatchNorm2d(8, 3).train()
    x = torch.randn(4, 8, 16, 16) * 0.1 + 1000.0
    domain = torch.tensor([0, 1, 2, 1])
    y = layer(x, domain)
    want = copy.deepcopy(layer).to(F64).train()
    want.running_mean.zero_()
    want.running_var.fill_(1.0)
    want.num_batches_tracked.zero_()
    ref = want(x.to(F64), domain)
    torch.testing.assert_close(y.to(F64), ref, rtol=0, atol=2e-3)
    torch.testing.assert_close(layer.running_var.to(F64), want.running_var, rtol=1e-4, atol=0)
    assert kernel_calls


def test_running_statistics_skip_non_finite_channels(kernel_calls: list[str]) -> None:
    layer = nk.SandwichBatchNorm2d(3, 2, split_stats=True).to(F64).train()
    ref = copy.deepcopy(layer)
    ref.fast = False
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    x[1, 0, 0, 0] = float("nan")  # domain 1, channel 0
    domain = torch.tensor([0, 1, 1, 0])
    layer(x, domain)
    ref(x, domain)
    assert torch.equal(layer.running_mean[1, 0], torch.zeros((), dtype=F64))
    for name, buffer in layer.named_buffers():
        torch.testing.assert_close(buffer, dict(ref.named_buffers())[name], equal_nan=True)
    assert kernel_calls


def test_a_domain_with_one_value_keeps_its_buffers(kernel_calls: list[str]) -> None:
    layer = nk.AuxBatchNorm1d(3, 3).to(F64).train()
    x = torch.randn(3, 3, 1, dtype=F64)  # one value per channel and sample
    domain = torch.tensor([0, 0, 2])  # domain 2: one value; domain 1: none
    layer(x, domain)
    assert layer.num_batches_tracked.tolist() == [1, 0, 0]
    assert torch.equal(layer.running_var[2], torch.ones(3, dtype=F64))
    assert kernel_calls


def test_off_by_default_and_switchable() -> None:
    assert not kernels.is_enabled()
    x = torch.randn(2, 3, 4, 4)
    assert not kernels.applies(x)
    kernels.enable()
    try:
        assert kernels.is_enabled() and kernels.applies(x)
        assert not kernels.applies(x.to(torch.bfloat16))
        assert kernels.applies(x.contiguous(memory_format=torch.channels_last))
        assert not kernels.applies(x.transpose(2, 3))  # neither layout
        assert not kernels.applies(x[:, :, 0, 0])  # (N, C)
        assert not kernels.applies(x.to("meta"))
    finally:
        kernels.disable()
    assert not kernels.applies(x)


def test_eval_and_compile_tracing_keep_the_pytorch_path(kernel_calls: list[str]) -> None:
    layer = nk.SandwichBatchNorm2d(3, 2)
    x, domain = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 0])
    layer.eval()(x, domain)
    assert not kernel_calls
    layer.train()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    compiled(x, domain)
    assert not kernel_calls


def test_bcn_keeps_the_pytorch_path_under_compile_and_vmap(kernel_calls: list[str]) -> None:
    """The kernels have no fake-tensor or batching rule: traced and vmapped BCN forwards take
    the reference path (they failed inside the kernel call before)."""
    layer = nk.BatchChannelNorm2d(4, 2).train()
    x = torch.randn(3, 4, 5, 5)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert compiled(x).shape == x.shape
    # (untracked: a vmapped training forward cannot update unbatched buffers in place)
    untracked = nk.BatchChannelNorm2d(4, 2, track_running_stats=False).train()
    assert torch.func.vmap(untracked)(torch.randn(2, 3, 4, 5, 5)).shape == (2, 3, 4, 5, 5)
    assert not kernel_calls


KERNEL_LAYERS = [r for r in LAYERS if r in RECORDS or issubclass(r.cls, nk.WSConv2d)]


@pytest.mark.parametrize(("record", "kind"), layer_params(KERNEL_LAYERS, kinds=["per_sample"]))
def test_forward_mode_ad_takes_the_pytorch_path(
    record: Any, kind: str | None, kernel_calls: list[str]
) -> None:
    """The C++ autograd functions have no jvp; inside a forward-AD dual level the layers take
    the reference path (they raised "jvp is not implemented" before), and the tangents match
    reverse mode, which still runs the kernels."""
    layer, args = _float64_case(record, kind, True)
    assert_forward_ad_matches_reverse(layer, args)
    assert kernel_calls or len(record.shapes[0]) == 2 or issubclass(record.cls, _BatchRenorm)
    # (the kernel calls counted are reverse mode's: the dual-level forward made none)
    with torch.autograd.forward_ad.dual_level():
        before = len(kernel_calls)
        layer(*(torch.autograd.forward_ad.make_dual(a, a) if a is args[0] else a for a in args))
        assert len(kernel_calls) == before


def test_a_failed_build_raises_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def failing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    monkeypatch.setattr(cpp_extension, "load", failing)
    with pytest.raises(kernels.KernelBuildError, match="no compiler"):
        kernels.enable()
    assert not kernels.is_enabled()
    assert not kernels.is_available()


def test_a_failed_build_can_be_retried_in_the_same_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch records a build as done before running it; a failed one must not stay recorded,
    or the next attempt skips the build and fails to load a library that was never made."""
    from torch.utils import cpp_extension

    versioner = cpp_extension.JIT_EXTENSION_VERSIONER

    def failing(*args: Any, name: str, **kwargs: Any) -> None:
        versioner.entries[name] = "recorded"  # what torch does before it builds
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    monkeypatch.setattr(cpp_extension, "load", failing)
    name = kernels._build_name()
    with pytest.raises(kernels.KernelBuildError, match="no compiler"):
        kernels.build()
    assert name not in versioner.entries


def test_a_stale_torch_lock_is_cleared_and_a_live_build_waited_for(tmp_path: Path) -> None:
    import subprocess

    # A build killed by a signal leaves torch's lock file: without the clearing, the next
    # build would wait for it forever.
    (tmp_path / "lock").write_text("")
    with kernels._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    # A live build (another process holding the lock) is waited for, not cut short.
    holder = (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a+b'); fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(0.5)\n"
        "open(sys.argv[2], 'w').write('released')\n"
    )
    marker = tmp_path / "released"
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "normkit.lock"), str(marker)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with kernels._build_lock(tmp_path):
            assert marker.read_text() == "released"
    finally:
        proc.wait(timeout=30)


def test_the_build_name_tells_cpus_and_installations_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    graviton2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 sve\n"
    x86 = "processor\t: 0\nmodel name\t: x\nflags\t\t: fpu sse avx2\nbugs\t: none\n"
    assert kernels._cpu_signature(graviton2) != kernels._cpu_signature(graviton3)
    assert kernels._cpu_signature(x86) == "flags\t\t: fpu sse avx2"
    name = kernels._build_name()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-another-venv")
    assert kernels._build_name() != name


@pytest.mark.parametrize(
    ("value", "wanted"),
    [
        *[("", False), ("0", False), ("false", False), ("No", False), ("off", False)],
        *[("1", True), ("true", True), ("YES", True), (" on ", True)],
    ],
)
def test_the_environment_variable_reads_yes_and_no_words(value: str, wanted: bool) -> None:
    assert kernels._from_environment(value) is wanted


def test_an_unknown_environment_value_is_an_error_at_import() -> None:
    import subprocess

    for value, expected in (("false", "False"), ("maybe", "NORMKIT_KERNELS")):
        env = {**os.environ, "NORMKIT_KERNELS": value}
        code = "import normkit.kernels as k; print(k.is_enabled())"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert expected in (out.stdout if value == "false" else out.stderr), out
        assert (out.returncode == 0) == (value == "false")


@pytest.mark.parametrize("split", [False, True])
def test_float64_input_to_a_float32_layer(split: bool, kernel_calls: list[str]) -> None:
    """Float32 parameters and buffers with a float64 input: the parameters are cast for the
    kernel and the statistics (float64) reach the float32 buffers through the PyTorch update."""
    layer = nk.SandwichBatchNorm2d(3, 2, split_stats=split).train()
    ref = copy.deepcopy(layer)
    ref.fast = False
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    domain = torch.tensor([0, 1, 1, 0])
    got, want = layer(x, domain), ref(x, domain)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, buffer in layer.named_buffers():
        torch.testing.assert_close(buffer, dict(ref.named_buffers())[name])
    assert kernel_calls


@pytest.mark.parametrize("estimate", [False, True])
@pytest.mark.parametrize("group_affine", ["per_group", "per_channel", None])
def test_bcn_kernel_gradcheck_and_gradgradcheck(
    estimate: bool, group_affine: str | None, kernel_calls: list[str]
) -> None:
    """BCN's kernel, first and second derivatives by finite differences (fresh copies of the
    buffers for every evaluation: the estimates change with each training forward). The
    estimates are constants of the step by design (gradients do not flow into the update):
    rate 0 makes them constant for the finite differences too."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 4, 2, 3, generator=g, dtype=F64) * 2 + 1).requires_grad_()
    w = (torch.rand(4, generator=g, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=F64).requires_grad_()
    size = 4 if group_affine == "per_channel" else 2
    gw = (torch.rand(size, generator=g, dtype=F64) + 0.5).requires_grad_()
    gb = torch.randn(size, generator=g, dtype=F64).requires_grad_()
    running = (torch.randn(4, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64) + 1)

    def fn(x: Tensor, w: Tensor, b: Tensor, *group: Tensor) -> Tensor:
        rm, rv = running[0].clone(), running[1].clone()
        count = torch.zeros((), dtype=torch.long)
        gw, gb = group if group else (None, None)
        out: Tensor = torch.ops.normkit_kernels.bcn_forward(
            x, w, b, gw, gb, rm, rv, count, 2, group_affine == "per_channel", estimate,
            1e-5, 0.0 if estimate else 0.3, 0.1,
        )  # fmt: skip
        return out

    inputs = (x, w, b) + ((gw, gb) if group_affine else ())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layer_name", ["sabn-split", "bcn-estimate"])
def test_blocks_and_chunks_of_a_larger_input(
    channels_last: bool, layer_name: str, kernel_calls: list[str]
) -> None:
    """130 channels (blocks of 64 and a remainder in channels_last) and 4,550 positions (more
    than one chunk of the sums before a flush to double)."""
    if layer_name == "sabn-split":
        layer: torch.nn.Module = nk.SandwichBatchNorm2d(130, 3, split_stats=True)
        args: tuple[Any, ...] = (torch.tensor([2, 0]),)
    else:
        layer = nk.BatchChannelNorm2d(130, 26, estimate=True)
        args = ()
    layer = layer.to(F64).train()
    ref = copy.deepcopy(layer)
    ref.fast = False
    x = torch.randn(2, 130, 70, 65, dtype=F64) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, dtype=F64)
    results = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_()
        y = module(xi, *args)
        y.backward(upstream)
        results.append((y, xi.grad, *(p.grad for p in module.parameters())))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for (name, got), want in zip(layer.named_buffers(), ref.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    assert kernel_calls


def test_strided_indices_and_parameters_are_read_correctly(kernel_calls: list[str]) -> None:
    """An index sliced from a larger one and a parameter that is a strided view reach the kernel
    as contiguous copies (the kernel reads raw memory)."""
    layer = nk.SandwichBatchNorm2d(3, 3, split_stats=True).to(F64)
    wide = torch.randn(3, 2, dtype=F64)
    layer.weight = torch.nn.Parameter(wide[:, 0])  # stride 2
    ref = copy.deepcopy(layer)
    ref.fast = False
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    domain = torch.tensor([0, 9, 2, 9, 1, 9, 1, 9])[::2]  # [0, 2, 1, 1], stride 2
    assert not layer.weight.is_contiguous() and not domain.is_contiguous()
    upstream = torch.randn(4, 3, 2, 2, dtype=F64)
    results = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_()
        y = module(xi, domain)
        y.backward(upstream)
        results.append((y, xi.grad, *(p.grad for p in module.parameters())))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert kernel_calls


def test_the_environment_variable_enables_them_at_import() -> None:
    import subprocess
    import sys

    code = "import normkit, normkit.kernels as k; print(k.is_enabled())"
    env = {**os.environ, "NORMKIT_KERNELS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_the_usual_call_is_one_kernel_call_and_the_rest_the_full_path(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[str]
) -> None:
    """Parameters, buffers and a CPU LongTensor index in the input's dtype take the layer's
    short route (``core_train``); an int32 index or a float64 input to a float32 layer goes
    through the full path (its checks and casts), into the kernel too."""
    full = count_calls(monkeypatch, core, "core_kernel")
    layer = nk.SandwichBatchNorm2d(3, 2, split_stats=True).train()
    x = torch.randn(4, 3, 2, 2)
    domain = torch.tensor([0, 1, 1, 0])
    layer(x, domain)
    layer(x, 1)
    assert kernel_calls.count("_kernel_call") == 2 and not full
    reference = layer(x, domain.int())
    assert len(full) == 1
    layer(x.double(), domain)
    assert len(full) == 2 and kernel_calls.count("_kernel_call") == 2
    assert reference.dtype == torch.float32


@pytest.mark.parametrize("bad", [[0, 2, 1, 0], [0, -1, 1, 0]])
@pytest.mark.parametrize("split", [False, True])
def test_an_index_out_of_range_gets_the_named_error_and_changes_nothing(
    bad: list[int], split: bool, kernel_calls: list[str]
) -> None:
    """The kernel checks the index values before any buffer changes; the layer names the
    error as its full path does."""
    layer = nk.SandwichBatchNorm2d(3, 2, split_stats=split).train()
    before = copy.deepcopy(layer.state_dict())
    message = r"SandwichBatchNorm2d: expected domain indices in \[0, 2\)"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, 3, 2, 2), torch.tensor(bad))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match="expected a domain index in"):
        layer(torch.randn(4, 3, 2, 2), 2)


class _Double(torch.nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2 * w


def _doubled(layer: torch.nn.Module, name: str) -> torch.nn.Module:
    """A plain copy of ``layer`` with the parameter ``name`` doubled; ``layer`` itself gets the
    doubling as a parametrization (so both compute the same function)."""
    from torch.nn.utils import parametrize

    plain = copy.deepcopy(layer)
    with torch.no_grad():
        getattr(plain, name).mul_(2)
    parametrize.register_parametrization(layer, name, _Double())
    return plain


def test_a_parametrized_weight_takes_the_full_path(kernel_calls: list[str]) -> None:
    """A parametrized affine is not in the module's parameter dictionary: the short route
    steps aside and the full path computes with the parametrized value."""
    layer = nk.SandwichBatchNorm2d(3, 2).to(F64).train()
    plain = _doubled(layer, "weight")
    x, domain = torch.randn(4, 3, 2, 2, dtype=F64), torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(layer(x, domain), plain(x, domain), rtol=1e-10, atol=1e-10)
    assert "_kernel_call" in kernel_calls  # plain
    assert kernel_calls.count("core_kernel") == 1  # parametrized: the full path's kernel call


def test_a_misshapen_affine_is_refused_not_read_out_of_bounds(kernel_calls: list[str]) -> None:
    layer = nk.SandwichBatchNorm2d(3, 2).train()
    layer.weight = torch.nn.Parameter(torch.ones(2))
    before = layer.running_mean.clone()
    with pytest.raises(RuntimeError, match="shared affine of C values"):
        layer(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 0]))
    assert torch.equal(layer.running_mean, before)
    layer.domain_weight = torch.nn.Parameter(torch.ones(2, 2))
    layer.weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match=r"per-domain affines of shape \(K, C\)"):
        layer(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 0]))


def test_bcn_refuses_misshapen_affines_and_leaves_parametrized_ones_to_the_full_path(
    kernel_calls: list[str],
) -> None:
    layer = nk.BatchChannelNorm2d(4, 2).train()
    layer.group_weight = torch.nn.Parameter(torch.ones(4))  # per group: 2 values
    layer.group_bias = torch.nn.Parameter(torch.zeros(4))
    before = layer.running_mean.clone()
    with pytest.raises(RuntimeError, match="group affine of G"):
        layer(torch.randn(3, 4, 2, 2))
    assert torch.equal(layer.running_mean, before)

    layer = nk.BatchChannelNorm2d(4, 2).to(F64).train()
    plain = _doubled(layer, "group_weight")
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-10, atol=1e-10)
    assert kernel_calls.count("_kernel_forward") == 2  # the parametrized one via the full path


# --- weight standardization ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", WS_MODES, ids=lambda m: f"{m['eps_mode']}-{m['unbiased']}")
@pytest.mark.parametrize(("name", "make", "shape"), WS_CASES, ids=[c[0] for c in WS_CASES])
def test_ws_kernel_equals_reference(
    name: str, make: Any, shape: tuple[int, ...], mode: dict[str, Any], kernel_calls: list[str]
) -> None:
    """Every WS layer and eps mode, with the kernels on, against the reference formula in
    float64: output and the gradients of the input and every parameter."""
    layer, ref, x, up = _ws_pair(make, shape, mode)
    got, want = _ws_run(layer, x, up), _ws_run(ref, x, up)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10, msg=key)
    assert "weight_standardize_kernel" in kernel_calls


@pytest.mark.parametrize("mode", WS_MODES, ids=lambda m: f"{m['eps_mode']}-{m['unbiased']}")
@pytest.mark.parametrize("channels_last", [False, True])
def test_ws_kernel_gradcheck_and_gradgradcheck(
    mode: dict[str, Any], channels_last: bool, kernel_calls: list[str]
) -> None:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(4, 3, 2, 2, generator=g, dtype=F64) * 0.7 + 0.2
    if channels_last:  # a filter's values are still contiguous, in another order
        w = w.contiguous(memory_format=torch.channels_last)
    w.requires_grad_(True)
    eps = mode.get("eps", 1e-5)

    def f(w: Tensor) -> Tensor:
        return _fused.weight_standardize_kernel(
            w, eps, unbiased=mode["unbiased"], eps_mode=mode["eps_mode"]
        )

    want = nk.functional.weight_standardize(
        w, eps, unbiased=mode["unbiased"], eps_mode=mode["eps_mode"]
    )
    got = f(w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert gradcheck(f, (w,))
    assert gradgradcheck(f, (w,))


def test_ws_kernel_in_every_eager_call_and_the_eval_cache(kernel_calls: list[str]) -> None:
    """With the kernels on, training, no-grad and eval computations of a float32 weight all
    take the kernel (so the eval cache equals the training weight bit for bit); a half weight,
    ``fast = False`` and compiled code do not."""
    layer = nk.WSConv2d(3, 4, 3)
    x = torch.randn(1, 3, 5, 5)
    layer.fast = False
    layer(x)
    torch.compile(layer, backend="eager", fullgraph=True)(x)
    layer.fast = True
    layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert "weight_standardize_kernel" not in kernel_calls
    layer.float()
    with torch.no_grad():
        layer(x)
    train_weight = layer.standardized_weight()
    with torch.no_grad():
        cached = layer.eval().standardized_weight()
    assert torch.equal(cached, train_weight)
    assert kernel_calls.count("weight_standardize_kernel") == 3


# --- unusual layer states: the kernels on behave as the kernels off -----------------------------


def _strided(t: Tensor) -> Tensor:
    """The same values in a strided view (every second element of a larger tensor)."""
    wide = torch.zeros(t.numel() * 2, dtype=t.dtype)
    wide[::2] = t.flatten()
    return wide[::2].view(t.shape)


def _no_bias(layer: torch.nn.Module) -> None:
    layer.bias = None  # an affine pair with one half


def _no_counter(layer: torch.nn.Module) -> None:
    layer.num_batches_tracked = None


def _strided_buffers(layer: torch.nn.Module) -> None:
    for name in ("running_mean", "running_var"):
        layer._buffers[name] = _strided(layer._buffers[name])


def _parametrized_buffer(layer: torch.nn.Module) -> None:
    from torch.nn.utils import parametrize

    class Same(torch.nn.Module):
        def forward(self, t: Tensor) -> Tensor:
            return t

    parametrize.register_parametrization(layer, "running_var", Same())


STATES = {
    "no-bias": _no_bias,
    "no-counter": _no_counter,
    "strided-buffers": _strided_buffers,
    "parametrized-buffer": _parametrized_buffer,
}


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("layer_name", ["sabn", "bcn"])
def test_unusual_layer_states_behave_as_with_the_kernels_off(
    state: str, layer_name: str, kernel_calls: list[str]
) -> None:
    """A lone half of an affine pair, a missing step counter, strided or parametrized running
    buffers: the same outputs, gradients, buffers and errors with the kernels on and off (the
    kernel route steps aside; it used to raise, crash or read past a buffer)."""
    args: tuple[Any, ...]
    if layer_name == "sabn":
        layer: torch.nn.Module = nk.SandwichBatchNorm2d(4, 2).to(F64).train()
        args = (torch.tensor([0, 1, 1]),)
    else:
        layer = nk.BatchChannelNorm2d(4, 2).to(F64).train()
        args = ()
    STATES[state](layer)
    off = copy.deepcopy(layer)
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    results: list[Any] = []
    for module, enabled in ((layer, True), (off, False)):
        (kernels.enable if enabled else kernels.disable)()
        xi = x.clone().requires_grad_()
        try:
            y = module(xi, *args)
        except Exception as exc:  # the error must be the same with the kernels on
            results.append(type(exc))
            continue
        # (a lone weight is unused on the PyTorch path: its gradient is None there)
        grads = torch.autograd.grad(y.sum(), [xi, *module.parameters()], allow_unused=True)
        results.append((y, *grads, *module.buffers()))
    on, got_off = results
    if isinstance(on, type) or isinstance(got_off, type):
        assert on == got_off
        return
    for a, b in zip(on, got_off, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_kernels_mark_the_buffers_they_change(kernel_calls: list[str]) -> None:
    """Running buffers updated in place by a kernel get a new version, as torch's in-place
    operators give them."""
    for layer, args in (
        (nk.SandwichBatchNorm2d(3, 2).train(), (torch.tensor([0, 1]),)),
        (nk.BatchChannelNorm2d(4, 2).train(), ()),
    ):
        before = [b._version for b in layer.buffers()]
        layer(torch.randn(2, layer.num_features, 3, 3), *args)
        assert all(b._version > v for b, v in zip(layer.buffers(), before, strict=True))
    assert kernel_calls


def test_ws_kernel_keeps_float64_precision_far_from_zero(kernel_calls: list[str]) -> None:
    """Filters with a mean 1e7 times their spread: the kernel's centring keeps the float64
    result within rounding of the PyTorch formula (the mean rounded to a double lost 1e-10)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=F64) + 1e7
    got = _fused.weight_standardize_kernel(w, 1e-5)
    want = nk.functional.weight_standardize(w, 1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_ws_kernel_double_backward_of_a_constant_filter_matches(kernel_calls: list[str]) -> None:
    w = torch.randn(4, 3, 3, 3, dtype=F64)
    w[1] = 0.3
    w.requires_grad_(True)
    up = torch.randn(w.shape, dtype=F64)
    results = []
    for f in (_fused.weight_standardize_kernel, nk.functional.weight_standardize):
        (g1,) = torch.autograd.grad(f(w, 1e-5), w, up, create_graph=True)
        (g2,) = torch.autograd.grad(g1.square().sum(), w)
        results.append((g1, g2))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)


# ---- The Fixup basic block (fixup_basic) ----------------------------------------------------

# (in, planes, stride, shortcut): identity; zero-pad and 1x1-conv downsampling; a 1x1 conv
# that only widens.
FIXUP_BLOCKS = [(4, 4, 1, "conv"), (4, 6, 2, "zero_pad"), (4, 6, 2, "conv"), (4, 6, 1, "conv")]


def _fixup_block(cin: int, planes: int, stride: int, shortcut: str, dtype: torch.dtype = F64):
    """A Fixup basic block with every parameter away from its init (scalars included: zero
    biases and a unit scale would hide a scalar the kernel forgets)."""
    torch.manual_seed(0)
    block = resnet.FixupBasicBlock(cin, planes, stride, shortcut=shortcut).to(dtype)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn_like(p) + (0.4 if p.numel() == 1 else 0.0))
    return block


def _fixup_run(block: torch.nn.Module, x: Tensor, on: bool) -> tuple[Tensor, list[Tensor]]:
    """Output and the gradients of the input and every parameter, kernels on or off."""
    (kernels.enable if on else kernels.disable)()
    xi = x.detach().clone().requires_grad_()
    out = block(xi)
    g = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, [xi, *block.parameters()], g)
    return out, list(grads)


def _assert_fixup_kernel_matches(block: torch.nn.Module, x: Tensor, **tol: float) -> None:
    out, grads = _fixup_run(block, x, True)
    want_out, want_grads = _fixup_run(block, x, False)
    kernels.enable()  # (the fixture turns them off again)
    torch.testing.assert_close(out, want_out, **tol)
    assert out.is_contiguous(memory_format=torch.channels_last) == want_out.is_contiguous(
        memory_format=torch.channels_last
    )
    names = ["input", *(n for n, _ in block.named_parameters())]
    for name, got, want in zip(names, grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("cin", "planes", "stride", "shortcut"), FIXUP_BLOCKS)
def test_fixup_block_kernel_equals_the_modules(
    cin: int,
    planes: int,
    stride: int,
    shortcut: str,
    channels_last: bool,
    kernel_calls: list[str],
) -> None:
    block = _fixup_block(cin, planes, stride, shortcut)
    x = torch.randn(3, cin, 7, 6, dtype=F64)
    if channels_last:  # the model converted too, as torch's guide does it
        x = x.contiguous(memory_format=torch.channels_last)
        block = block.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    _assert_fixup_kernel_matches(block, x, rtol=1e-10, atol=1e-10)
    assert kernel_calls == ["_fixup_block_kernel"]
    # The weights' gradients come in the weights' layout.
    _, grads = _fixup_run(block, x, True)
    kernels.enable()
    for p, g in zip(block.parameters(), grads[1:], strict=True):
        assert g.stride() == p.stride()


def test_fixup_block_kernel_in_float32_is_as_accurate_as_the_modules(
    kernel_calls: list[str],
) -> None:
    """float32, on more values than one parallel task and one summing chunk (8,192): against
    the float64 result, the kernel's error is within a small factor of the modules' own
    float32 error (the two round differently: the scale is applied after conv2 rather than
    folded into its weight, so a pre-activation within rounding of 0 may switch a ReLU)."""
    block = _fixup_block(8, 8, 1, "conv")
    x = torch.randn(4, 8, 40, 40, dtype=F64)
    want_out, want_grads = _fixup_run(block, x, False)
    block.float()
    results = [_fixup_run(block, x.float(), on) for on in (True, False)]
    kernels.enable()
    (out, grads), (mod_out, mod_grads) = results
    names = ["output", "input", *(n for n, _ in block.named_parameters())]
    for name, got, mod, want in zip(
        names, [out, *grads], [mod_out, *mod_grads], [want_out, *want_grads], strict=True
    ):
        scale = want.abs().max().item()
        err, mod_err = (
            (got.double() - want).abs().max().item(),
            (mod.double() - want).abs().max().item(),
        )
        assert err <= 4 * mod_err + 1e-6 * scale, (
            f"{name}: {err:.2e} against the modules' {mod_err:.2e}"
        )
    assert kernel_calls == ["_fixup_block_kernel"]


def test_fixup_block_kernel_passes_nan_as_the_modules_do(kernel_calls: list[str]) -> None:
    block = _fixup_block(4, 4, 1, "conv")
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    x[0, 1, 2, 3] = float("nan")
    out, grads = _fixup_run(block, x, True)
    want_out, want_grads = _fixup_run(block, x, False)
    torch.testing.assert_close(out, want_out, equal_nan=True)
    torch.testing.assert_close(grads[0], want_grads[0], equal_nan=True)
    assert kernel_calls == ["_fixup_block_kernel"]


@pytest.mark.parametrize("identity", [True, False], ids=["identity", "shortcut"])
def test_fixup_kernel_gradcheck_and_gradgradcheck(identity: bool) -> None:
    kernels.build()
    op = kernels.op("fixup_basic")
    block = _fixup_block(3, 3 if identity else 5, 1 if identity else 2, "zero_pad")
    x = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True)
    w1, w2 = block.conv1.weight, block.conv2.weight
    b1b, b2a, s, b2b = block.bias1b.bias, block.bias2a.bias, block.scale.weight, block.bias2b.bias
    if identity:

        def f(*a: Tensor) -> Tensor:
            return op(a[0], None, a[1], a[2], a[3], a[4], a[5], a[6], a[7], 1)

        args: tuple[Tensor, ...] = (x, block.bias1a.bias, w1, b1b, b2a, w2, s, b2b)
    else:
        shortcut = torch.randn(2, 5, 2, 2, dtype=F64, requires_grad=True)

        def f(*a: Tensor) -> Tensor:
            return op(a[0], a[1], None, a[2], a[3], a[4], a[5], a[6], a[7], 2)

        args = (x, shortcut, w1, b1b, b2a, w2, s, b2b)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


def test_fixup_resnet20_with_the_kernel_equals_without(kernel_calls: list[str]) -> None:
    torch.manual_seed(0)
    model = nk.models.resnet20(fixup=True).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    _assert_fixup_kernel_matches(model, x, rtol=1e-10, atol=1e-10)
    assert len(kernel_calls) == 9  # every block, the two downsampling ones included
    want = _fixup_run(model, x, False)[0].detach()
    kernel_calls.clear()
    kernels.enable()
    with torch.no_grad():  # no graph: the operator's plain CPU entry
        torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    assert len(kernel_calls) == 9


def _hook(module: torch.nn.Module) -> None:
    module.register_forward_hook(lambda *args: None)


# Each spoils one condition of the kernel; the block then runs its modules.
FIXUP_SPOILERS: dict[str, Any] = {
    "hooked conv1": lambda b, x: (_hook(b.conv1), x)[1],
    "hooked bias2a": lambda b, x: (_hook(b.bias2a), x)[1],
    "ws conv2": lambda b, x: (
        setattr(b, "conv2", nk.WSConv2d(4, 4, 3, padding=1, bias=False).to(F64)),
        x,
    )[1],
    "conv1 with a bias": lambda b, x: (
        setattr(b.conv1, "bias", torch.nn.Parameter(torch.ones(4, dtype=F64))),
        x,
    )[1],
    "bfloat16": lambda b, x: (b.bfloat16(), x.bfloat16())[1],
    "parametrized scale": lambda b, x: (
        torch.nn.utils.parametrize.register_parametrization(b.scale, "weight", torch.nn.Identity()),
        x,
    )[1],
}


@pytest.mark.parametrize("spoiler", list(FIXUP_SPOILERS))
def test_fixup_blocks_the_kernel_does_not_take_run_their_modules(
    spoiler: str, kernel_calls: list[str]
) -> None:
    block = _fixup_block(4, 4, 1, "conv")
    x = FIXUP_SPOILERS[spoiler](block, torch.randn(2, 4, 5, 5, dtype=F64))
    out, grads = _fixup_run(block, x, True)
    want_out, want_grads = _fixup_run(block, x, False)
    assert "_fixup_block_kernel" not in kernel_calls  # (a WS conv2 runs the WS kernel)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fixup_kernel_refuses_bad_arguments_by_name() -> None:
    kernels.build()
    op = kernels.op("fixup_basic")
    block = _fixup_block(4, 4, 1, "conv")
    ps = (block.conv1.weight, block.bias1b.bias, block.bias2a.bias, block.conv2.weight)
    last = (block.scale.weight, block.bias2b.bias)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="exactly one of bias1a"):
        op(x, x, block.bias1a.bias, *ps, *last, 1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="conv1's weight"):
        op(x[:, :3], None, block.bias1a.bias, *ps, *last, 1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="input's dtype"):
        op(x.float(), None, block.bias1a.bias.float(), *ps, *last, 1)


def test_fixup_block_under_forward_mode_ad_runs_its_modules(kernel_calls: list[str]) -> None:
    block = _fixup_block(4, 4, 1, "conv")
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    with torch.autograd.forward_ad.dual_level():
        block(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
    assert not kernel_calls
    assert_forward_ad_matches_reverse(block, (x,))  # (its reverse half runs the kernel)


@pytest.mark.parametrize(("cin", "planes", "stride", "shortcut"), FIXUP_BLOCKS)
def test_fixup_kernel_create_graph_changes_no_gradient(
    cin: int, planes: int, stride: int, shortcut: str, kernel_calls: list[str]
) -> None:
    """With create_graph the operator's backward differentiates the block's composition; it
    must stop at the operator's inputs (a downsampling block's shortcut is a function of its
    input: following it there as well counted that path twice)."""
    block = _fixup_block(cin, planes, stride, shortcut)
    x = torch.randn(2, cin, 5, 6, dtype=F64)
    grads = []
    for on, create_graph in ((True, False), (True, True), (False, False)):
        (kernels.enable if on else kernels.disable)()
        xi = x.clone().requires_grad_()
        out = block(xi)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape)).sum()
        grads.append(
            torch.autograd.grad(loss, [xi, *block.parameters()], create_graph=create_graph)
        )
    kernels.enable()
    plain, graphed, modules = grads
    for g, h, m in zip(plain, graphed, modules, strict=True):
        torch.testing.assert_close(g, m, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, m, rtol=1e-10, atol=1e-10)
    assert len(kernel_calls) == 2


@pytest.mark.parametrize("tie", ["conv weights", "scalars"])
def test_fixup_kernel_with_tied_parameters(tie: str, kernel_calls: list[str]) -> None:
    """One tensor passed as two of the operator's inputs gets both gradients, once each."""
    block = _fixup_block(4, 4, 1, "conv")
    if tie == "conv weights":
        block.conv2.weight = block.conv1.weight
    else:
        block.bias2a.bias = block.bias1b.bias
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    _assert_fixup_kernel_matches(block, x, rtol=1e-10, atol=1e-10)
    kernel_calls.clear()
    kernels.enable()
    x.requires_grad_()
    out = block(x)
    graphed = torch.autograd.grad(out.square().sum(), [x, *block.parameters()], create_graph=True)
    kernels.disable()
    out = block(x)
    plain = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    for g, h in zip(graphed, plain, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10)
    assert kernel_calls == ["_fixup_block_kernel"]


def test_fixup_backward_hooks_still_fire(kernel_calls: list[str]) -> None:
    block = _fixup_block(4, 4, 1, "conv")
    fired: list[str] = []
    block.bias2a.register_full_backward_hook(lambda *args: fired.append("bias2a"))
    _fixup_run(block, torch.randn(2, 4, 5, 5, dtype=F64), True)
    assert fired == ["bias2a"]
    assert not kernel_calls


class _Pooled(torch.nn.Module):
    """A shortcut the modules broadcast in their final addition: (N, C, 1, 1)."""

    calls = 0

    def forward(self, a: Tensor) -> Tensor:
        _Pooled.calls += 1
        return a[:, :, ::2, ::2].mean((2, 3), keepdim=True)


def test_fixup_custom_downsample_output_is_added_as_the_modules_do(
    kernel_calls: list[str],
) -> None:
    block = _fixup_block(4, 4, 2, "conv")
    block.downsample = _Pooled()
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    _Pooled.calls = 0
    _assert_fixup_kernel_matches(block, x, rtol=1e-10, atol=1e-10)
    # Once per forward (kernels on, then off), never twice: with the kernels on, the route
    # finishes with the modules once it sees a shortcut the operator does not take.
    assert _Pooled.calls == 2


def test_fixup_kernel_saves_only_what_its_backward_reads(kernel_calls: list[str]) -> None:
    """As with the modules: a bias changed in place between forward and backward is no error,
    and neither is an inference-mode input."""
    block = _fixup_block(4, 4, 1, "conv")
    x = torch.randn(2, 4, 5, 5, dtype=F64, requires_grad=True)
    out = block(x)
    with torch.no_grad():
        block.bias2a.bias.add_(1.0)
        block.bias1a.bias.add_(1.0)
    out.sum().backward()
    with torch.inference_mode():
        frozen = torch.randn(2, 4, 5, 5, dtype=F64)
    block(frozen).sum().backward()
    assert kernel_calls == ["_fixup_block_kernel", "_fixup_block_kernel"]


def test_fixup_kernel_reads_a_negated_view_with_its_sign() -> None:
    kernels.build()
    op = kernels.op("fixup_basic")
    block = _fixup_block(4, 4, 1, "conv")
    p = [block.bias1a.bias, block.conv1.weight, block.bias1b.bias, block.bias2a.bias]
    q = [block.conv2.weight, block.scale.weight, block.bias2b.bias]
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    with torch.no_grad():
        negated = torch._neg_view(-block.bias2b.bias)
        want = op(x, None, *p, *q, 1)
        got = op(x, None, *p, *q[:2], negated, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("record", "kind"), layer_params(RECORDS, kinds=["per_sample"]))
def test_kernel_create_graph_changes_no_first_order_gradient(
    record: Any, kind: str | None, kernel_calls: list[str]
) -> None:
    """The layer applied twice (its second input then depends on its own parameters): the
    operators' create_graph path must stop at their inputs (it counted that path twice)."""
    layer, args = _float64_case(record, kind, True)
    assert_create_graph_changes_no_gradient(layer, args)
    assert kernel_calls or len(record.shapes[0]) == 2 or issubclass(record.cls, _BatchRenorm)
