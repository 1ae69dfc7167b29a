"""normkit's own compiled CPU kernels: optional, built on demand, off by default.

The layers run on pure PyTorch everywhere. On a machine with a C++ compiler (and ninja),
:func:`enable` compiles ``normkit/csrc/core.cpp`` and ``csrc/fixup.cpp`` once with
``torch.utils.cpp_extension`` (about 40 s on 2 cores; later processes load the cached build in
well under a second), registers their operators with the dispatcher as
``torch.ops.normkit_kernels.*``, and turns them on: from then on the eager training forward and
backward of the batch-norm core (Sandwich BN, CCBN, AuxBN, :class:`normkit.SyncBatchNorm`
without a process group, InputNorm, BNET's normalization) and of Batch-Channel Normalization
(both modes) on float32 and float64 CPU inputs of rank 3 to 5, contiguous or channels_last,
each run as one operator call instead of dozens, its autograd node in C++ too; the weight
standardization of the WS layers (every eager computation of a float32/float64 CPU weight);
and Fixup's basic block, both convolutions included (:class:`normkit.models.FixupBasicBlock`
in its standard form). Everything else (other dtypes, GPU tensors, the norms' eval mode,
synchronized statistics, batch renormalization, ``torch.compile``/``torch.export`` tracing)
keeps the PyTorch path.

The kernels compute the same functions as the PyTorch paths (``tests/test_kernels.py`` checks
them to 1e-10 in float64, forward, backward and double backward, for every configuration of
these layers in the layer table, both layouts). Statistics are per-(sample, channel) shifted
sums in float lanes, flushed to and merged in double precision.

Example::

    >>> import normkit.kernels
    >>> normkit.kernels.enable()      # compiles on first use; raises if it cannot
    >>> normkit.kernels.is_enabled()
    True

``NORMKIT_KERNELS=1`` (or ``true``, ``yes``, ``on``) in the environment calls :func:`enable` when
normkit is imported (and fails the import if the build fails, rather than silently running the
slower path); ``0``, ``false``, ``no``, ``off`` or nothing leave them off, and any other value is
an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

import torch
from torch import Tensor

__all__ = [
    "KernelBuildError",
    "build",
    "disable",
    "enable",
    "is_available",
    "is_enabled",
]


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded (no compiler, no ninja, a build error)."""


_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("core.cpp", "fixup.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / "autograd_common.h"]  # (in the build name's hash)
_OPS = ("core_forward", "core_train", "bcn_forward", "ws_standardize", "fixup_basic")
_FLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno"]

_loaded = False
_enabled = False
# The operators, looked up once (``torch.ops`` attribute lookups cost microseconds per call).
_ops: dict[str, Any] = {}


def _cpu_signature(cpuinfo: str) -> str:
    """What of ``/proc/cpuinfo`` decides what ``-march=native`` may use: the first feature line
    (``flags`` on x86, ``Features`` on Arm, where ``platform.processor()`` is empty)."""
    for line in cpuinfo.splitlines():
        key = line.partition(":")[0].strip().lower()
        if key in ("flags", "features"):
            return line.strip()
    return ""


def _build_name() -> str:
    """A build name unique to the sources, the flags, torch, this CPU and this installation.

    ``-march=native`` code must never be loaded on another machine sharing the cache
    directory. And torch's build command names the absolute source paths and the
    environment's include paths: two checkouts or virtual environments sharing one name would
    make ninja rebuild the other's build at every switch, so they get a name each.
    """
    cpu = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu += _cpu_signature(f.read())
    except OSError:
        pass
    sources = [path.read_text(encoding="utf-8") for path in [*_SOURCES, *_HEADERS]]
    where = [str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve()), sys.prefix]
    key = "|".join([*sources, " ".join(_FLAGS), torch.__version__, cpu, *where])
    return "normkit_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for a build, and clear a stale torch lock.

    torch's builder waits, with no time limit, for its lock file (``directory/lock``) to go
    away; a build killed by a signal (a job scheduler's SIGTERM, a time limit) leaves it behind,
    and every later build would then hang. Every normkit build first takes this ``flock``, which
    the operating system releases when its holder dies: once it is ours, no live normkit build
    holds torch's lock file, and one that is there is stale.
    """
    if fcntl is None:  # not a POSIX system: torch's lock alone
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "normkit.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _find_ninja() -> None:
    """Put the ninja of this Python's environment (``pip install ninja``, the ``kernels``
    extra) on ``PATH`` when none is there: a virtual environment's scripts are not on ``PATH``
    unless it is activated, and torch's builder looks for ninja there."""
    if shutil.which("ninja") is not None:
        return
    scripts = Path(sysconfig.get_path("scripts"))
    if (scripts / "ninja").exists():
        os.environ["PATH"] = os.pathsep.join([str(scripts), os.environ.get("PATH", "")])


def _registered() -> bool:
    """Whether this process already holds the operators (a build loaded earlier, by this
    module or by hand)."""
    namespace = torch.ops.normkit_kernels
    return all(hasattr(namespace, name) for name in _OPS)


def build(verbose: bool = False) -> None:
    """Compile (on first use) and load the kernels without routing the layers through them.

    Raises :class:`KernelBuildError` when they cannot be built here."""
    global _loaded
    if _loaded:
        return
    if _registered():
        _remember_ops()
        _loaded = True
        return
    name = _build_name()
    from torch.utils import cpp_extension

    try:
        _find_ninja()
        directory = Path(cpp_extension._get_build_directory(name, verbose))
        with _build_lock(directory):
            cpp_extension.load(
                name=name,
                sources=[str(path) for path in _SOURCES],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                build_directory=str(directory),
                verbose=verbose,
            )
    except Exception as exc:  # compiler, ninja, headers: all mean "not available here"
        # torch records a build as done before it runs: without this, a later attempt in this
        # process (the compiler installed meanwhile, say) would skip the build and fail to load
        # a library that was never made, with a misleading error.
        versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
        getattr(versioner, "entries", {}).pop(name, None)
        raise KernelBuildError(
            f"normkit.kernels: could not build the CPU kernels ({type(exc).__name__}: {exc}); "
            "the layers keep their PyTorch path"
        ) from exc
    _remember_ops()
    _loaded = True


def _remember_ops() -> None:
    namespace = torch.ops.normkit_kernels
    for name in _OPS:
        _ops[name] = getattr(namespace, name).default


def op(name: str) -> Any:
    """The loaded operator ``torch.ops.normkit_kernels.<name>`` (its default overload)."""
    return _ops[name]


def enable(verbose: bool = False) -> None:
    """Compile (on first use) and load the kernels, and route the layers through them.

    Raises :class:`KernelBuildError` when they cannot be built here; nothing changes then.
    """
    global _enabled
    build(verbose)
    _enabled = True


def disable() -> None:
    """Route the layers through the PyTorch path again (the loaded kernels stay loaded)."""
    global _enabled
    _enabled = False


def is_enabled() -> bool:
    """Whether the layers currently use the kernels where they apply."""
    return _enabled


def is_available(verbose: bool = False) -> bool:
    """Whether the kernels can be loaded here (compiling them if needed), without enabling."""
    try:
        build(verbose)
    except KernelBuildError:
        return False
    return True


def _kernel_tensor(t: Tensor) -> bool:
    """Whether the kernels are enabled and ``t`` is of the kind they read: float32 or float64,
    on the CPU (the cheapest tests first, no device object built: this runs on every
    training forward with the kernels on)."""
    if not _enabled or not t.is_cpu:
        return False
    dtype = t.dtype
    return dtype is torch.float32 or dtype is torch.float64


def applies(x: Tensor) -> bool:
    """Whether an enabled kernel takes the training forward of ``x``: a float32 or float64 CPU
    tensor of rank 3 to 5, contiguous or channels_last (the caller has checked the rest)."""
    if not _kernel_tensor(x):
        return False
    rank = x.dim()
    if not 2 < rank < 6:
        return False
    if x.is_contiguous():
        return True
    if rank == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return rank == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def takes_weight(w: Tensor) -> bool:
    """Whether an enabled kernel standardizes the weight ``w`` (a weight-standardized layer's,
    the caller has checked the rest): a non-empty float32 or float64 CPU tensor of rank 2 or
    more, in any layout (it is read contiguous or channels_last)."""
    return w.dim() >= 2 and w.numel() > 0 and _kernel_tensor(w)


def buffers_ok(*buffers: Tensor | None) -> bool:
    """Whether a layer's running buffers suit the kernels' in-place update: all absent (no
    running statistics), or all present and contiguous. A partial set or a strided buffer is
    left to the PyTorch path, which refuses or handles it as it always has."""
    # (loops, not all() over generators: this runs on every forward)
    absent = 0
    for t in buffers:
        if t is None:
            absent += 1
        elif not t.is_contiguous():
            return False
    return absent in (0, len(buffers))


def affines_paired(*params: Tensor | None) -> bool:
    """Whether the affine parameters, in (scale, shift) pairs, come in whole pairs (a layer
    whose ``bias`` was set to None keeps only half of one): the kernels take only whole pairs,
    the PyTorch path ignores a lone half."""
    for i in range(0, len(params) - 1, 2):  # noqa: SIM110 (a loop: every forward runs this)
        if (params[i] is None) != (params[i + 1] is None):
            return False
    return True


def in_dtype_already(dtype: torch.dtype, *tensors: Tensor | None) -> bool:
    """Whether every tensor given (None skipped) is in ``dtype``: then the kernels read them
    as they are."""
    # A loop, not all() over a generator: this runs on every forward, and the generator costs
    # about a microsecond more.
    for t in tensors:  # noqa: SIM110
        if t is not None and t.dtype is not dtype:
            return False
    return True


def in_dtype(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` (None kept) in ``dtype``, cast only where needed: the kernels read every
    tensor in the input's dtype. The usual case, nothing to cast, returns them as given."""
    if in_dtype_already(dtype, *tensors):
        return tensors
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def _from_environment(value: str) -> bool:
    """Whether ``NORMKIT_KERNELS=value`` asks for the kernels (the usual yes/no words)."""
    word = value.strip().lower()
    if word in ("", "0", "false", "no", "off"):
        return False
    if word in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"NORMKIT_KERNELS: expected 1/true/yes/on or 0/false/no/off, got {value!r}")


if _from_environment(os.environ.get("NORMKIT_KERNELS", "")):
    enable()
