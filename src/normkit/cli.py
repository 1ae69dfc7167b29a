"""The ``normkit`` command: ``normkit reproduce STUDY``, ``normkit list`` and ``normkit bench``.

``bench`` is :mod:`normkit.bench` (its options are defined there).

``reproduce`` runs a study of ``normkit.experiments.studies`` (or ``all`` of them), shows a
progress bar while it trains (on a terminal) and a table at the end, and writes
``results.json``, ``report.md`` and figures under ``--out`` (default ``./normkit-results``).
Besides the common options, each study takes its own size options, named after the keys of its
configuration (``--batch-sizes 1,2,4,32``, ``--epochs 3``, ``--depths 10,100``; see
``normkit reproduce --help``). A bad option is a one-line error and exit status 2.

Without ``--resume`` a study starts over; with it, finished runs of the same configuration are
reused. Runs of a different configuration in the same ``--out`` are never overwritten.

Imports are lazy: ``normkit list`` and the option checks do not load the studies' dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from normkit.experiments.study import Study

__all__ = ["LAYERS", "PAPERS", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PAPERS: dict[str, str] = {
    "sabn": "Gong, Chen, Chen & Wang, Sandwich Batch Normalization (arXiv 2102.11382, WACV 2022)",
    "ccbn": "de Vries et al. 2017 (arXiv 1707.00683); Miyato & Koyama 2018 (arXiv 1802.05637)",
    "auxbn": "Xie et al. 2020, AdvProp (arXiv 1911.09665), as used by Sandwich BN",
    "ws": "Qiao, Wang, Liu, Shen & Yuille, Micro-Batch Training with BCN and WS (arXiv 1903.10520)",
    "nf": "Brock, De & Smith 2021 (arXiv 2101.08692); Brock et al. 2021, NFNets (arXiv 2102.06171)",
    "revisited": "Davis & Frank, Revisiting Batch Norm Initialization (arXiv 2110.13989)",
    "fixup": "Zhang, Dauphin & Ma, Fixup Initialization (arXiv 1901.09321, ICLR 2019)",
    "bn": "Ioffe & Szegedy 2015, Batch Normalization (arXiv 1502.03167)",
    "gn": "Wu & He, Group Normalization (arXiv 1803.08494, ECCV 2018)",
    "skipinit": "De & Smith 2020, SkipInit (arXiv 2002.10444); Bachlechner et al. 2020, ReZero "
    "(arXiv 2003.04887)",
    "brn": "Ioffe 2017, Batch Renormalization (arXiv 1702.03275, NeurIPS 2017)",
    "bgn": "Zhou et al. 2020, Batch Group Normalization (arXiv 2012.02782)",
    "iternorm": "Huang et al., Iterative Normalization (arXiv 1904.03441, CVPR 2019)",
    "bnet": "Xu et al., BN with Enhanced Linear Transformation (arXiv 2011.14150, TPAMI 2023)",
    "mabn": "Yan et al., Moving Average Batch Normalization (arXiv 2001.06838, ICLR 2020)",
    "frn": "Singh & Krishnan, Filter Response Normalization (arXiv 1911.09737, CVPR 2020)",
    "evonorm": "Liu, Brock, Simonyan & Le, Evolving Normalization-Activation Layers "
    "(arXiv 2004.02967, NeurIPS 2020)",
}
"""The papers behind the layers, by key."""

LAYERS: dict[str, tuple[str, str]] = {
    "SandwichBatchNorm1d": ("sabn", "BN, a shared affine, then a per-domain affine (1d inputs)"),
    "SandwichBatchNorm2d": ("sabn", "BN, a shared affine, then a per-domain affine: mixed domains"),
    "SandwichBatchNorm3d": ("sabn", "BN, a shared affine, then a per-domain affine (3d inputs)"),
    "SandwichAdaIN": (
        "sabn",
        "adaptive instance norm with a shared sandwich affine: style transfer",
    ),
    "CategoricalConditionalBatchNorm1d": ("ccbn", "BN with one affine per class/domain (1d)"),
    "CategoricalConditionalBatchNorm2d": ("ccbn", "BN with one affine per class/domain: cGANs"),
    "CategoricalConditionalBatchNorm3d": ("ccbn", "BN with one affine per class/domain (3d)"),
    "AuxBatchNorm1d": ("auxbn", "one complete BN (statistics and affine) per domain (1d)"),
    "AuxBatchNorm2d": ("auxbn", "one complete BN per domain: clean vs adversarial batches"),
    "AuxBatchNorm3d": ("auxbn", "one complete BN (statistics and affine) per domain (3d)"),
    "WSConv1d": ("ws", "Conv1d with per-filter standardized weights; put GN or BCN after it"),
    "WSConv2d": ("ws", "Conv2d with per-filter standardized weights; put GN or BCN after it"),
    "WSConv3d": ("ws", "Conv3d with per-filter standardized weights; put GN or BCN after it"),
    "WSLinear": ("ws", "Linear with per-row standardized weights (WS's natural linear form)"),
    "BatchChannelNorm1d": ("ws", "batch part then per-sample group part (1d inputs)"),
    "BatchChannelNorm2d": ("ws", "batch part then group part; estimate=True trains at batch 1"),
    "BatchChannelNorm3d": ("ws", "batch part then per-sample group part (3d inputs)"),
    "ScaledWSConv2d": ("nf", "Conv2d with scaled WS and a learnable gain: normalizer-free nets"),
    "InputNorm1d": ("revisited", "BN on raw inputs: online dataset statistics, no mean/std needed"),
    "InputNorm2d": ("revisited", "BN on raw images: online dataset statistics, no mean/std needed"),
    "Bias": ("fixup", "learnable scalar bias of Fixup residual branches"),
    "Scale": ("fixup", "learnable scalar multiplier at the end of a Fixup residual branch"),
    "SyncBatchNorm": ("bn", "BN with statistics over all ranks, on any backend (CPU/gloo too)"),
    "FrozenBatchNorm2d": ("bn", "eval-mode BN with everything in buffers: frozen backbones"),
    "GroupNorm": ("gn", "torch's GroupNorm with the channel count first: a norm_layer"),
    "ResidualGate": ("skipinit", "zero-initialised scalar on a residual branch: x + α·f(x)"),
    "BatchRenorm1d": ("brn", "BN corrected towards its running statistics (1d inputs)"),
    "BatchRenorm2d": ("brn", "BN corrected towards its running statistics: small, non-iid batches"),
    "BatchRenorm3d": ("brn", "BN corrected towards its running statistics (3d inputs)"),
    "BatchGroupNorm2d": ("bgn", "BN whose statistics span groups of channels: small batches"),
    "IterNorm1d": ("iternorm", "group whitening by Newton iterations (1d inputs)"),
    "IterNorm2d": ("iternorm", "group whitening by Newton iterations: decorrelated features"),
    "BNET2d": ("bnet", "BN whose affine is a depthwise k x k conv: detection backbones"),
    "MovingAverageBatchNorm2d": ("mabn", "BN with moving-average statistics: batches of 1-2"),
    "CenConv2d": ("mabn", "Conv2d with per-filter centred weights; put MABN after it"),
    "FilterResponseNorm2d": ("frn", "per-sample mean-square norm with its TLU: batch-free"),
    "TLU": ("frn", "thresholded linear unit max(x, τ), the activation paired with FRN"),
    "EvoNormB0": ("evonorm", "batch-variance norm-activation, running variance in eval"),
    "EvoNormS0": ("evonorm", "batch-free group norm-activation x·σ(vx)/std: small batches"),
}
"""Every public layer of normkit: its paper (a key of :data:`PAPERS`) and what it is for."""


class _Parser(argparse.ArgumentParser):
    """Errors are one line on stderr and exit status 2, never a usage dump or a traceback."""

    studies_help = False

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("normkit").strip()
        _fail(f"{command}: {message}" if command else message)

    def format_help(self) -> str:
        # The studies' own options are found only when help is asked for (imports are lazy).
        text = super().format_help()
        return text + "\n" + _studies_help() if self.studies_help else text


def _fail(message: str) -> NoReturn:
    print(f"normkit: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _studies_help() -> str:
    from normkit.experiments.studies import STUDY_NAMES, StudyUnavailable, load_study

    lines = ["studies and their size options (defaults; --quick changes some):"]
    for name in STUDY_NAMES:
        try:
            study = load_study(name)
            base = study.config(False, {})
        except StudyUnavailable as exc:
            lines.append(f"  {name}: unavailable ({exc})")
            continue
        except Exception as exc:  # a broken study must not break the help of the others
            lines.append(f"  {name}: unavailable ({type(exc).__name__}: {exc})")
            continue
        lines.append(f"  {name}: {study.title}")
        for key, value in base.items():
            if key in ("seeds", "device", "quick"):
                continue
            if isinstance(value, list):
                shown = ",".join(map(str, value))
            elif value is None:
                shown = "(all)" if key.endswith("size") else "(none)"
            elif isinstance(value, dict):
                shown = json.dumps(value)
            else:
                shown = str(value)
            lines.append(f"      --{key.replace('_', '-')} {shown}")
    return "\n".join(lines) + "\n"


def _build_parser() -> _Parser:
    from normkit.experiments.studies import STUDY_NAMES

    parser = _Parser(
        prog="normkit",
        allow_abbrev=False,
        description="normkit: normalization layers for PyTorch, and the reproduction of their "
        "papers' claims on scikit-learn's 8x8 digits.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser(
        "reproduce",
        help="test a paper's claim on the digits (a study, or all)",
        description="Train every method of a study over paired seeds, then report mean ± std and "
        "a one-sided paired t-test of each claim. Study-specific size options are listed below.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    rep.studies_help = True
    rep.add_argument("study", help=f"{', '.join(STUDY_NAMES)}, or all", metavar="STUDY")
    rep.add_argument("--quick", action="store_true", help="small sizes, for a first look")
    rep.add_argument("--seeds", type=_positive_int, help="number of paired seeds")
    rep.add_argument(
        "--out",
        type=Path,
        default=Path("normkit-results"),
        help="output directory (default: ./normkit-results)",
    )
    rep.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished runs in --out (without it a study starts over; runs of a "
        "different configuration are never overwritten: that is an error)",
    )
    rep.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    rep.add_argument(
        "--jobs",
        type=_positive_int,
        help="runs in parallel, one process and one thread each (default: the CPU count, up "
        "to 8, on cpu; 1 on an accelerator); results do not depend on it",
    )
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    # ``normkit reproduce STUDY --version`` prints the version as ``normkit --version`` does.
    rep.add_argument("--version", action="version", version=_version(), help=argparse.SUPPRESS)
    sub.add_parser(
        "list", help="every layer, with its paper and what it is for", allow_abbrev=False
    )
    from normkit import bench

    bench_parser = sub.add_parser(
        "bench",
        help="time and memory of the layers against nn.BatchNorm2d / nn.Conv2d",
        description="Time (forward, forward+backward) and memory of each layer against its "
        "torch baseline, interleaved in one process; prints a table (--json for the data). "
        "Default sizes take minutes; --quick takes seconds.",
        allow_abbrev=False,
    )
    bench.add_arguments(bench_parser)
    return parser


# --- normkit list ------------------------------------------------------------------------------


def layer_names() -> list[str]:
    """The names in ``normkit.__all__`` that are layer classes (``nn.Module`` subclasses)."""
    import inspect

    from torch import nn

    import normkit

    return [
        name
        for name in normkit.__all__
        if inspect.isclass(getattr(normkit, name)) and issubclass(getattr(normkit, name), nn.Module)
    ]


def _list() -> int:
    import inspect

    import normkit

    missing = [n for n in layer_names() if n not in LAYERS]
    rows = [(name, *LAYERS[name]) for name in LAYERS] + [
        (name, "", "(no entry in normkit.cli.LAYERS yet)") for name in missing
    ]
    width = max(len(r[0]) for r in rows)
    by_paper: dict[str, list[tuple[str, str]]] = {}
    for name, paper, purpose in rows:
        by_paper.setdefault(paper, []).append((name, purpose))
    print(f"normkit {normkit.__version__}: layers")
    for paper, entries in by_paper.items():
        print(f"\n{PAPERS.get(paper, 'unattributed')}")
        for name, purpose in entries:
            print(f"  {name.ljust(width)}  {purpose}")
    helpers = [
        n
        for n in normkit.__all__
        if inspect.isfunction(getattr(normkit, n)) and not n.startswith("_")
    ]
    width = max(len(n) for n in helpers)
    print("\nhelpers")
    for name in helpers:
        doc = (inspect.getdoc(getattr(normkit, name)) or "").split("\n")[0]
        print(f"  {name.ljust(width)}  {doc.replace('``', '')}")
    return 0


# --- normkit reproduce -------------------------------------------------------------------------


def _parse_value(option: str, text: str, default: Any) -> Any:
    """``text`` parsed after the type of the config's ``default`` value."""

    def scalar(t: str, like: Any) -> Any:
        if isinstance(like, bool):
            lowered = t.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(like, int):
            return int(t)
        if isinstance(like, float):
            return float(t)
        if isinstance(like, str):
            return t
        try:
            return json.loads(t)
        except ValueError:
            return t

    try:
        if isinstance(default, list):
            like = default[0] if default else None
            return [scalar(t.strip(), like) for t in text.split(",") if t.strip()]
        return scalar(text, default)
    except ValueError as exc:
        like = default[0] if isinstance(default, list) and default else default
        if isinstance(default, list):
            kind = {bool: "true/false values", int: "integers", float: "numbers"}.get(
                type(like), "values"
            )
            what = f"comma-separated {kind}"
        else:
            what = {bool: "true or false", int: "an integer", float: "a number"}.get(
                type(like), "a value"
            )
        raise ValueError(f"{option}: expected {what}, got {text!r}") from exc


_COMMON_FLAGS = {"--quick", "--resume", "--no-progress", "--help", "-h", "--version"}
_COMMON_VALUED = {"--seeds", "--out", "--device", "--jobs"}


def _split_study_options(argv: Sequence[str]) -> tuple[list[str], dict[str, str | None]]:
    """Separate the study-specific options (``--batch-sizes 1,2`` or ``--batch-sizes=1,2``) of
    ``reproduce`` from the rest, wherever they stand; they come back as
    ``{"batch_sizes": "1,2"}``, with ``None`` for an option given without a value (an error once
    the option is known to exist). An option given twice is an error."""
    if "reproduce" not in argv:
        return list(argv), {}
    start = argv.index("reproduce") + 1
    rest: list[str] = list(argv[:start])
    options: dict[str, str | None] = {}
    i = start
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if not token.startswith("--") or name in _COMMON_FLAGS or token == "--":
            rest.append(token)
        elif name in _COMMON_VALUED:
            rest.append(token)
            if "=" not in token and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
        else:
            key = name[2:].replace("-", "_")
            if key in options:
                _fail(f"reproduce: option --{key.replace('_', '-')} is given more than once")
            if "=" in token:
                options[key] = token.split("=", 1)[1]
            elif i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                options[key] = None
            else:
                options[key] = argv[i + 1]
                i += 1
        i += 1
    return rest, options


def _auto_jobs(device: str) -> int:
    import os

    if device != "cpu":
        return 1
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:
        count = os.cpu_count() or 1
    return max(1, min(8, count))


def _reproduce(
    args: argparse.Namespace, options: dict[str, str | None], argv: Sequence[str]
) -> int:
    from normkit.experiments import runner
    from normkit.experiments.studies import STUDY_NAMES, StudyUnavailable, load_study

    if args.study != "all" and args.study not in STUDY_NAMES:
        _fail(f"reproduce: unknown study {args.study!r} (expected {', '.join(STUDY_NAMES)} or all)")
    names = list(STUDY_NAMES) if args.study == "all" else [args.study]
    studies: list[Study] = []
    skipped = []
    for name in names:
        try:
            studies.append(load_study(name))
        except StudyUnavailable as exc:
            if args.study != "all":
                _fail(str(exc))
            skipped.append(str(exc))
    if not studies:
        _fail(f"reproduce: no study is available ({'; '.join(skipped)})")

    configs = []
    try:
        device = runner.check_device(args.device)
        # Every check before the first run: a typo must not surface after an hour of training.
        used: set[str] = set()
        bases = []
        for study in studies:
            base = study.config(args.quick, {})
            known = [k for k in base if k not in runner.RESERVED_KEYS]
            used.update(k for k in options if k in known)
            bases.append((study, base, known))
        unused = [k for k in options if k not in used]
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            if args.study != "all":
                listed = ", ".join("--" + k.replace("_", "-") for k in known)
                _fail(f"{studies[0].name} has no option {flags} (its options: {listed})")
            _fail(f"reproduce: no selected study has the option(s) {flags}")
        for key, text in options.items():
            if text is None:
                _fail(f"reproduce: option --{key.replace('_', '-')} expects a value")
        plans = []
        for study, base, known in bases:
            overrides = {
                key: _parse_value("--" + key.replace("_", "-"), text, base[key])
                for key, text in options.items()
                if key in known and text is not None
            }
            plans.append((study, overrides))
        for study, overrides in plans:
            config = runner.resolve_config(
                study, quick=args.quick, overrides=overrides, seeds=args.seeds, device=device
            )
            configs.append((study, overrides, config))
        out = runner.check_out_dir(args.out)
        for study, _, config in configs:
            runner.check_study_dir(out / study.name, config)
    except runner.RunnerError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(str(exc))

    for line in skipped:
        print(f"normkit: skipping {line}", file=sys.stderr)
    jobs = args.jobs or _auto_jobs(device)
    with _sigterm_as_interrupt():
        return _run_all(configs, args, out, device, jobs, argv)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill`` stops the study as Ctrl-C does: workers terminated, a line on how to resume."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_all(
    configs: Sequence[tuple[Study, dict[str, Any], dict[str, Any]]],
    args: argparse.Namespace,
    out: Path,
    device: str,
    jobs: int,
    argv: Sequence[str],
) -> int:
    from normkit.experiments import report, runner

    command = "normkit " + " ".join(argv)
    progress = False if args.no_progress else None
    for study, overrides, _ in configs:
        try:
            results = runner.run_study(
                study,
                out=out,
                quick=args.quick,
                seeds=args.seeds,
                overrides=overrides,
                resume=args.resume,
                device=device,
                jobs=jobs,
                progress=progress,
                command=command,
            )
        except runner.RunnerError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            print(
                f"\nnormkit: interrupted; finished runs are saved in {out / study.name}/runs; "
                "run the same command with --resume to continue",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        print(report.render_terminal(results))
        print(f"\nreport: {out / study.name / 'report.md'}\n", flush=True)
    if len(configs) > 1:
        print(f"overview of every study: {out / 'report.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``normkit`` command; returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:  # ``normkit list | head``: the reader left; not an error
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _version() -> str:
    from importlib import metadata

    try:
        return f"normkit {metadata.version('normkit')}"
    except metadata.PackageNotFoundError:
        return "normkit (version unknown)"


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    rest, options = _split_study_options(argv)
    args = parser.parse_args(rest)
    if args.version:
        print(_version())
        return 0
    if args.command == "list":
        return _list()
    if args.command == "reproduce":
        return _reproduce(args, options, argv)
    if args.command == "bench":
        from normkit import bench

        try:
            return bench.run_from_args(args)
        except bench.BenchError as exc:
            _fail(f"bench: {exc}")
    parser.print_help()
    return EXIT_USAGE
