"""Execute a study: checkpoint every run, resume, aggregate, test the claims, write the report.

Layout of the output directory ``OUT`` (``--out``, default ``./normkit-results``)::

    OUT/report.md                     overview of every study found in OUT
    OUT/<study>/config.json           the configuration the runs belong to
    OUT/<study>/runs/<run key>.json   one checkpoint per finished (method, setting, seed) run
    OUT/<study>/results.json          everything (see below)
    OUT/<study>/report.md             tables, verdicts and figures
    OUT/<study>/*.png                 figures

**Checkpoints and resuming.** Each run's metrics are written, when it finishes, to a temporary
file that then replaces its checkpoint (``os.replace``), so a checkpoint is complete or absent.
The results are always built from the checkpoints read back, so a resumed study gives the same
``results.json`` (timings aside) as an uninterrupted one. With ``resume=True`` finished runs of
the same configuration are skipped. Without it the study starts over: finished runs of the same
configuration are discarded (and recomputed, identically). Either way, runs of a *different*
configuration are never overwritten: the runner refuses with a :class:`RunnerError` naming the
keys that differ. The seed count is not part of that comparison, so ``--seeds 10 --resume``
extends a 5-seed study.

**Determinism.** Each run executes with ``torch.use_deterministic_algorithms(True,
warn_only=True)``, cuDNN benchmarking off and a fixed number of intra-op threads (1 by default),
whether in this process or in one of ``jobs`` worker processes; results therefore do not depend
on ``jobs``.

**results.json**::

    study, title, paper, command, created
    config                       the study's config plus "device", "quick" and "seeds" (a count)
    seeds                        [0, 1, ...], paired across methods
    methods, settings            in the order of the study's runs
    metrics, curve_metrics       scalar metric names; list-valued metric names
    versions, machine            python/torch/normkit/numpy/...; platform, CPUs, jobs, threads
    runs                         {run key: {run: {method, setting, seed}, metrics, elapsed_s}},
                                 in the order of the study's runs
    aggregates[method][setting][metric]  {mean, std, n, n_missing, values}
    curves[method][setting][metric]      {mean: [...], std: [...], n}
    claims                       one entry per test: text, metric, better/worse {method,
                                 setting}, higher_is_better, margin, alpha, n, mean_diff,
                                 std_diff, t, p, p_opposite, verdict, note
    figures                      PNG paths relative to OUT/<study>
    elapsed_s                    {wall: this invocation, compute: sum of the runs' wall times,
                                 cpu: sum of their process CPU times, reused_runs}

Non-finite numbers are stored as ``null``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import torch

from normkit.experiments import stats
from normkit.experiments.study import Claim, Run, Study

__all__ = [
    "DEFAULT_OUT",
    "ProgressBar",
    "RunnerError",
    "check_device",
    "check_out_dir",
    "check_study_dir",
    "deterministic",
    "resolve_config",
    "run_study",
    "write_overview",
]

DEFAULT_OUT = Path("normkit-results")
DEFAULT_SEEDS = 5
DEFAULT_QUICK_SEEDS = 2
CHECKPOINT_FORMAT = 1
RESERVED_KEYS = ("device", "quick", "seeds")


class RunnerError(Exception):
    """A problem with the user's options or output directory: shown as a one-line error."""


# --- JSON ------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types; non-finite floats become ``None``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return jsonable(item())
    tolist = getattr(value, "tolist", None)  # numpy arrays
    if callable(tolist):
        return jsonable(tolist())
    raise TypeError(f"cannot store {type(value).__name__} in JSON: {value!r}")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    text = json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_digest(config: Mapping[str, Any]) -> str:
    """A digest of the config without the seed count (runs of any seed count can be reused)."""
    body = {k: v for k, v in config.items() if k != "seeds"}
    canon = json.dumps(jsonable(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def checkpoint_name(run: Run) -> str:
    # Keys hold method names such as "GN+WS" or "BCN+WS (micro)": quote what a file system
    # might mind, injectively ("%" is quoted too).
    return quote(run.key, safe="+-_.=") + ".json"


# --- options -----------------------------------------------------------------------------------


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else :class:`RunnerError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RunnerError(f"--device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunnerError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RunnerError(f"--device {device}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise RunnerError(f"--device {device}: expected cpu, cuda, cuda:N or mps")
    return str(dev)


def check_out_dir(out: Path) -> Path:
    """Create ``out`` if needed and check that files can be written in it."""
    try:
        if out.exists() and not out.is_dir():
            raise RunnerError(f"--out {out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".normkit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunnerError(f"--out {out}: not writable ({reason})") from None
    return out


def _study_message(study: Study, exc: Exception) -> str:
    """``"<study>: <message>"``, once: a message that already starts with the study's name
    (``"study depth: ..."`` or ``"depth: ..."``) is not prefixed again."""
    message = str(exc)
    for prefix in (f"study {study.name}: ", f"{study.name}: "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
            break
    return f"{study.name}: {message}"


def resolve_config(
    study: Study,
    *,
    quick: bool,
    overrides: Mapping[str, Any] | None = None,
    seeds: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """The study's config with the overrides applied, plus ``device``, ``quick`` and ``seeds``.

    An override the study's config does not have, a bad value (``ValueError``/``TypeError`` from
    the study) or a seed count below 1 is a :class:`RunnerError`.
    """
    overrides = dict(overrides or {})
    try:
        base = study.config(quick, {})
    except (ValueError, TypeError) as exc:
        raise RunnerError(_study_message(study, exc)) from None
    unknown = [k for k in overrides if k not in base or k in RESERVED_KEYS]
    if unknown:
        options = ", ".join("--" + k.replace("_", "-") for k in base if k not in RESERVED_KEYS)
        raise RunnerError(
            f"{study.name} has no option {', '.join('--' + k.replace('_', '-') for k in unknown)}"
            f" (its options: {options or 'none'})"
        )
    try:
        config = dict(study.config(quick, overrides))
    except (ValueError, TypeError) as exc:
        raise RunnerError(_study_message(study, exc)) from None
    if seeds is None:
        default = config.get("seeds")
        seeds = default if isinstance(default, int) and not isinstance(default, bool) else None
        seeds = seeds or (DEFAULT_QUICK_SEEDS if quick else DEFAULT_SEEDS)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise RunnerError(f"--seeds: expected a positive number of seeds, got {seeds!r}")
    config["seeds"] = seeds
    config["device"] = device
    config["quick"] = bool(quick)
    clean: dict[str, Any] = jsonable(config)
    return clean


# --- determinism -------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """Deterministic algorithms, no cuDNN autotuning and ``threads`` intra-op threads inside the
    block; the previous settings (and the global RNG state) are restored on exit."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        try:
            yield
        finally:
            torch.set_num_threads(prev[0])
            torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])
            torch.backends.cudnn.benchmark = prev[3]
            torch.backends.cudnn.deterministic = prev[4]


# --- progress ----------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A one-line progress bar over a study's pending runs, on a TTY only.

    ``update(key, fraction)`` reports a running run's completed fraction; ``done(key)`` a
    finished run. Redraws at most every 0.1 s. Disabled, it prints nothing.
    """

    def __init__(self, label: str, total: int, stream: IO[str], enabled: bool) -> None:
        self.label = label
        self.total = max(1, total)
        self.stream = stream
        self.enabled = enabled
        self.finished = 0
        self.active: dict[str, float] = {}
        self._done: set[str] = set()
        self.start = time.monotonic()
        self._last_draw = 0.0

    def update(self, key: str, fraction: float) -> None:
        if key in self._done:  # a worker's last report can arrive after its result
            return
        self.active[key] = min(1.0, max(0.0, float(fraction)))
        self._draw()

    def done(self, key: str) -> None:
        self.active.pop(key, None)
        self._done.add(key)
        self.finished += 1
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        fraction = min(1.0, (self.finished + sum(self.active.values())) / self.total)
        elapsed = now - self.start
        eta = _clock(elapsed * (1 - fraction) / fraction) if fraction > 0.005 else "?"
        width = 24
        filled = round(fraction * width)
        current = ", ".join(sorted(self.active))
        line = (
            f"{self.label} |{'#' * filled}{'-' * (width - filled)}| {self.finished}/{self.total}"
            f" runs {fraction:4.0%} {_clock(elapsed)}<{eta} {current}"
        )
        columns = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + line[: columns - 1].ljust(columns - 1))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


# --- executing runs ----------------------------------------------------------------------------

_QUEUE: Any = None  # a worker process's progress queue


def _execute(
    study: Study,
    run: Run,
    config: Mapping[str, Any],
    path: Path,
    digest: str,
    progress: Any,
) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = study.run(run, config, progress)
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{study.name}.run({run.key}) returned {type(metrics).__name__}, expected a dict of "
            "metrics"
        )
    record = {
        "format": CHECKPOINT_FORMAT,
        "study": study.name,
        "config_digest": digest,
        "key": run.key,
        "run": {"method": run.method, "setting": run.setting, "seed": run.seed},
        "metrics": metrics,
        "elapsed_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
    }
    write_json_atomic(path, record)


def _worker_init(queue: Any, threads: int) -> None:
    import signal

    global _QUEUE
    _QUEUE = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates us
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _worker_run(task: tuple[Study, Run, dict[str, Any], str, str]) -> str:
    study, run, config, path, digest = task
    last = [0.0]

    def progress(fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2:
            last[0] = now
            _QUEUE.put((run.key, fraction))

    with torch.random.fork_rng(devices=[]):
        _execute(study, run, config, Path(path), digest, progress)
    return run.key


def _run_pending(
    study: Study,
    pending: Sequence[Run],
    config: dict[str, Any],
    runs_dir: Path,
    digest: str,
    *,
    jobs: int,
    threads: int,
    bar: ProgressBar,
    finished: Callable[[Run], None] = lambda run: None,
) -> None:
    """Execute ``pending``; ``finished(run)`` is called once each run's checkpoint exists (it
    may raise to stop the study)."""
    if jobs <= 1 or len(pending) <= 1:
        with deterministic(threads):
            for run in pending:
                bar.update(run.key, 0.0)
                _execute(
                    study,
                    run,
                    config,
                    runs_dir / checkpoint_name(run),
                    digest,
                    functools.partial(bar.update, run.key),
                )
                bar.done(run.key)
                finished(run)
        return
    # Spawned (not forked) workers: forking a process whose torch thread pools already ran can
    # deadlock. Each worker imports the study again by unpickling it.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    tasks = [(study, run, config, str(runs_dir / checkpoint_name(run)), digest) for run in pending]
    by_key = {run.key: run for run in pending}
    with ctx.Pool(min(jobs, len(pending)), _worker_init, (queue, threads)) as pool:
        results = pool.imap_unordered(_worker_run, tasks, chunksize=1)
        remaining = len(tasks)
        while remaining:
            try:
                key = results.next(timeout=0.1)
            except mp.TimeoutError:
                key = None
            with contextlib.suppress(Exception):
                while True:
                    k, fraction = queue.get_nowait()
                    bar.update(k, fraction)
            if key is not None:
                bar.done(key)
                remaining -= 1
                finished(by_key[key])


# --- output directory state --------------------------------------------------------------------


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = [k for k in dict.fromkeys([*old, *new]) if k != "seeds"]
    return [k for k in keys if jsonable(old.get(k)) != jsonable(new.get(k))]


def check_study_dir(study_dir: Path, config: Mapping[str, Any]) -> list[Path]:
    """The finished-run checkpoints in ``study_dir``; a :class:`RunnerError` if they belong to
    a different configuration (or to none). Changes nothing."""
    runs_dir = study_dir / "runs"
    existing = sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []
    if not existing:
        return []
    config_path = study_dir / "config.json"
    if not config_path.exists():
        raise RunnerError(
            f"{study_dir} holds {len(existing)} run(s) but no config.json; use another --out "
            "or delete that directory"
        )
    try:
        saved = _read_json(config_path)
    except (OSError, ValueError) as exc:
        raise RunnerError(f"cannot read {config_path}: {exc}") from None
    differences = _config_differences(saved, config)
    if differences:
        raise RunnerError(
            f"{study_dir} holds {len(existing)} run(s) of a different configuration (differs "
            f"in: {', '.join(differences)}); use another --out, or delete that directory to "
            "start over"
        )
    return existing


def _prepare_study_dir(study_dir: Path, config: dict[str, Any], *, resume: bool, note: Any) -> Path:
    runs_dir = study_dir / "runs"
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunnerError(f"cannot write {runs_dir}: {exc.strerror or exc}") from None
    for stale in runs_dir.glob(".*.tmp"):  # left by a run killed while writing
        with contextlib.suppress(OSError):
            stale.unlink()
    existing = check_study_dir(study_dir, config)
    if existing and not resume:
        note(
            f"{study_dir.name}: starting over, discarding {len(existing)} finished run(s) of the "
            "same configuration (pass --resume to reuse them)"
        )
        for path in existing:
            path.unlink()
    write_json_atomic(study_dir / "config.json", config)
    return runs_dir


def _load_checkpoint(path: Path, run: Run, digest: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        record = _read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("config_digest") != digest or record.get("key") != run.key:
        return None
    return record


# --- results -----------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib import metadata

    import normkit

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "normkit": normkit.__version__,
    }
    for dist in ("numpy", "scipy", "scikit-learn", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    """The CPU's model as /proc/cpuinfo names it (with its x86 family and model numbers, which
    tell generations apart where the name does not), or platform's answer elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key:  # the end of the first processor's block
                    break
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _machine(config: Mapping[str, Any], jobs: int, threads: int) -> dict[str, Any]:
    # The CPU and the vector instructions torch's kernels use: runs are bit-for-bit
    # deterministic on one machine, but another CPU rounds differently, and training amplifies
    # that (docs/reproduction.md).
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": _cpu_count(),
        "jobs": jobs,
        "threads_per_run": threads,
    }
    device = str(config.get("device", "cpu"))
    if device.startswith("cuda") and torch.cuda.is_available():
        machine["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return machine


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float))


def _is_curve(v: Any) -> bool:
    return isinstance(v, list) and all(_is_scalar(x) and not isinstance(x, bool) for x in v)


def _claim_pairs(claim: Claim, settings: Sequence[str]) -> list[tuple[str, str]]:
    """The (better setting, worse setting) of each test of ``claim``."""
    if claim.better_setting is not None and claim.worse_setting is not None:
        return [(claim.better_setting, claim.worse_setting)]
    return [(s, s) for s in (claim.settings or tuple(settings))]


def check_claim_metrics(
    study: Study,
    claims: Sequence[Claim],
    settings: Sequence[str],
    run: Run,
    metrics: Mapping[str, Any],
) -> None:
    """A :class:`RunnerError` if ``run`` is a side of one of ``claims`` and reports that claim's
    metric as anything but a number (a curve, a text): a paired t-test needs a scalar. Called on
    every checkpoint as soon as it exists, so a bad claim stops the study after one run rather
    than after all of them."""
    for claim in claims:
        sides = {
            side
            for b_setting, w_setting in _claim_pairs(claim, settings)
            for side in ((claim.better, b_setting), (claim.worse, w_setting))
        }
        if (run.method, run.setting) not in sides or claim.metric not in metrics:
            continue
        value = metrics[claim.metric]
        if not _is_scalar(value):
            kind = "a curve (a list)" if isinstance(value, list) else f"a {type(value).__name__}"
            raise RunnerError(
                f"{study.name}: claim {claim.text!r} tests metric {claim.metric!r}, which run "
                f"{run.key} reports as {kind}; a claim needs a scalar metric"
            )


def _claim_tests(
    study: Study,
    claim: Claim,
    values: Mapping[tuple[str, str, int], Mapping[str, Any]],
    settings: Sequence[str],
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    for (method, setting, seed), metrics in values.items():
        check_claim_metrics(study, [claim], settings, Run(method, setting, seed), metrics)
    tests = []
    for b_setting, w_setting in _claim_pairs(claim, settings):
        entry: dict[str, Any] = {
            "text": claim.text,
            "metric": claim.metric,
            "better": {"method": claim.better, "setting": b_setting},
            "worse": {"method": claim.worse, "setting": w_setting},
            "higher_is_better": claim.higher_is_better,
            "margin": claim.margin,
            "alpha": claim.alpha,
        }
        b_vals, w_vals = [], []
        paired = unreported = 0
        for seed in seeds:
            b = values.get((claim.better, b_setting, seed))
            w = values.get((claim.worse, w_setting, seed))
            if b is None or w is None:
                continue
            paired += 1
            # A metric that a run does not report is not a diverged value (a diverged value is
            # stored as null): the pair is left out, and a claim none of whose pairs report the
            # metric is not tested.
            if claim.metric not in b or claim.metric not in w:
                unreported += 1
                continue
            # A run flagged by the claim's diverged_metric is a diverged value whatever number
            # it shows for display (depth scores such a run at chance): non-finite.
            flag = claim.diverged_metric
            b_vals.append(None if flag and b.get(flag) else b[claim.metric])
            w_vals.append(None if flag and w.get(flag) else w[claim.metric])
        if not b_vals:
            if paired:
                lacking = [
                    f"{m} @ {s}"
                    for m, s in ((claim.better, b_setting), (claim.worse, w_setting))
                    if not any(
                        key[:2] == (m, s) and claim.metric in met for key, met in values.items()
                    )
                ]
                note = (
                    f"metric {claim.metric!r} is not reported by any run of "
                    f"{' or '.join(lacking) or 'both sides with a common seed'}"
                )
            else:
                missing = [
                    f"{m} @ {s}"
                    for m, s in ((claim.better, b_setting), (claim.worse, w_setting))
                    if not any(key[:2] == (m, s) for key in values)
                ]
                note = f"no runs of {' and '.join(missing) or 'both sides with a common seed'}"
            entry.update(
                n=0,
                mean_diff=None,
                std_diff=None,
                t=None,
                p=None,
                p_opposite=None,
                verdict=stats.NOT_TESTED,
                note=note,
            )
        else:
            test = stats.paired_test(
                b_vals,
                w_vals,
                higher_is_better=claim.higher_is_better,
                margin=claim.margin,
                alpha=claim.alpha,
            )
            entry.update(test.as_dict())
            if unreported:
                left_out = f"{unreported} seed(s) left out: metric {claim.metric!r} not reported"
                entry["note"] = "; ".join(x for x in (left_out, entry["note"]) if x)
        tests.append(entry)
    return tests


def build_results(
    study: Study,
    config: Mapping[str, Any],
    runs: Sequence[Run],
    records: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Everything ``results.json`` holds that follows from the checkpoints (no timings)."""
    methods = list(dict.fromkeys(r.method for r in runs))
    settings = list(dict.fromkeys(r.setting for r in runs))
    seeds = sorted({r.seed for r in runs})
    run_entries: dict[str, dict[str, Any]] = {}
    values: dict[tuple[str, str, int], dict[str, Any]] = {}
    scalar_names: dict[str, None] = {}
    curve_names: dict[str, None] = {}
    for run in runs:
        record = records[run.key]
        metrics = record["metrics"]
        values[(run.method, run.setting, run.seed)] = metrics
        for name, v in metrics.items():
            if _is_scalar(v):
                scalar_names.setdefault(name)
            elif _is_curve(v):
                curve_names.setdefault(name)
        run_entries[run.key] = {
            "run": {"method": run.method, "setting": run.setting, "seed": run.seed},
            "metrics": metrics,
            "elapsed_s": record.get("elapsed_s"),
        }
    aggregates: dict[str, dict[str, dict[str, Any]]] = {}
    curves: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        for setting in settings:
            cell = [values[(method, setting, s)] for s in seeds if (method, setting, s) in values]
            if not cell:
                continue
            aggregates.setdefault(method, {})[setting] = {
                name: stats.aggregate(
                    [float(m[name]) if isinstance(m.get(name), bool) else m.get(name) for m in cell]
                )
                for name in scalar_names
                if any(name in m for m in cell)
            }
            curve_cell = {
                name: stats.aggregate_curves([m[name] for m in cell if _is_curve(m.get(name))])
                for name in curve_names
                if any(_is_curve(m.get(name)) for m in cell)
            }
            if curve_cell:
                curves.setdefault(method, {})[setting] = curve_cell
    claims = [
        test
        for claim in study.claims_for(config)
        for test in _claim_tests(study, claim, values, settings, seeds)
    ]
    results = {
        "study": study.name,
        "title": study.title,
        "paper": study.paper,
        "config": dict(config),
        "seeds": seeds,
        "methods": methods,
        "settings": settings,
        "metrics": list(scalar_names),
        "curve_metrics": list(curve_names),
        "runs": run_entries,
        "aggregates": aggregates,
        "curves": curves,
        "claims": claims,
    }
    results["claims"] = claims + list(study.extra_claims(results))
    return results


def _figures(study: Study, results: dict[str, Any], study_dir: Path, note: Any) -> list[str]:
    from normkit.experiments import report

    paths: list[Path] = []
    try:
        paths += list(study.figures(results, study_dir))
    except Exception as exc:  # keep the results and the report of a long study
        note(f"warning: {study.name}: figures failed ({type(exc).__name__}: {exc})")
    if not paths:  # a study without figures of its own gets generic ones
        for metric in report.table_metrics(results):
            paths.append(
                report.summary_figure(results, metric, study_dir / f"summary_{metric}.png")
            )
        for metric in results["curve_metrics"]:
            paths.append(report.curves_figure(results, metric, study_dir / f"curves_{metric}.png"))
    names = []
    for p in paths:
        p = Path(p)
        try:
            names.append(str(p.resolve().relative_to(study_dir.resolve())))
        except ValueError:
            names.append(str(p))
    return list(dict.fromkeys(names))


def write_overview(out: Path) -> Path:
    """``OUT/report.md`` over every ``OUT/<study>/results.json``."""
    from normkit.experiments import report
    from normkit.experiments.studies import STUDY_NAMES

    found = []
    for path in sorted(out.glob("*/results.json")):
        with contextlib.suppress(OSError, ValueError):
            found.append(_read_json(path))
    order = {name: i for i, name in enumerate(STUDY_NAMES)}
    found.sort(key=lambda r: (order.get(r.get("study"), len(order)), r.get("study", "")))
    path = out / "report.md"
    write_text_atomic(path, report.render_overview(found))
    return path


def run_study(
    study: Study,
    *,
    out: Path | str = DEFAULT_OUT,
    quick: bool = False,
    seeds: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    resume: bool = False,
    device: str = "cpu",
    jobs: int = 1,
    threads: int = 1,
    progress: bool | None = None,
    stream: IO[str] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run ``study`` into ``out/<study.name>`` and return the content of its ``results.json``.

    ``progress=None`` shows the bar when ``stream`` (default ``sys.stderr``) is a TTY. Notes
    (one line each) go to ``stream`` too. See the module docstring for checkpoints, resuming and
    the results' layout.
    """
    wall_start = time.perf_counter()
    stream = stream if stream is not None else sys.stderr
    if progress is None:
        progress = bool(getattr(stream, "isatty", lambda: False)())

    def note(line: str) -> None:
        print(line, file=stream, flush=True)

    out = check_out_dir(Path(out))
    device = check_device(device)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise RunnerError(f"--jobs: expected a positive number, got {jobs!r}")
    config = resolve_config(study, quick=quick, overrides=overrides, seeds=seeds, device=device)
    runs = list(study.runs(config, list(range(config["seeds"]))))
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{study.name}.runs() returned duplicate runs")
    if not runs:
        raise RunnerError(f"{study.name}: no runs for this configuration")
    digest = config_digest(config)
    study_dir = out / study.name
    runs_dir = _prepare_study_dir(study_dir, config, resume=resume, note=note)
    pending = [
        r for r in runs if _load_checkpoint(runs_dir / checkpoint_name(r), r, digest) is None
    ]
    reused = len(runs) - len(pending)
    claims = list(study.claims_for(config))
    settings = list(dict.fromkeys(r.setting for r in runs))

    def check_claims(run: Run) -> None:
        record = _load_checkpoint(runs_dir / checkpoint_name(run), run, digest)
        if record is not None and isinstance(record.get("metrics"), Mapping):
            check_claim_metrics(study, claims, settings, run, record["metrics"])

    to_do = set(pending)
    for run in runs:  # the reused checkpoints, before any training
        if run not in to_do:
            check_claims(run)
    jobs = max(1, min(jobs, len(pending)))
    note(
        f"{study.name}: {len(pending)} run(s) to do"
        + (f", {reused} reused" if reused else "")
        + f" ({len(runs)} in all; {jobs} job(s)) -> {study_dir}"
    )
    bar = ProgressBar(study.name, len(pending), stream, progress)
    try:
        _run_pending(
            study,
            pending,
            config,
            runs_dir,
            digest,
            jobs=jobs,
            threads=threads,
            bar=bar,
            finished=check_claims,
        )
    finally:
        bar.close()

    records = {}
    for run in runs:
        record = _load_checkpoint(runs_dir / checkpoint_name(run), run, digest)
        if record is None:
            raise RuntimeError(
                f"{study.name}: the checkpoint of {run.key} is missing after its run"
            )
        records[run.key] = record
    results = build_results(study, config, runs, records)
    results = {
        "study": results.pop("study"),
        "title": results.pop("title"),
        "paper": results.pop("paper"),
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **results,
        "versions": _versions(),
        "machine": _machine(config, jobs, threads),
        "figures": [],
        "elapsed_s": {},
    }
    results = jsonable(results)
    results["figures"] = _figures(study, results, study_dir, note)
    results["elapsed_s"] = {
        "wall": time.perf_counter() - wall_start,
        "compute": math.fsum(float(r.get("elapsed_s") or 0.0) for r in records.values()),
        "cpu": math.fsum(float(r.get("cpu_s") or 0.0) for r in records.values()),
        "reused_runs": reused,
    }
    from normkit.experiments import report

    write_json_atomic(study_dir / "results.json", results)
    write_text_atomic(study_dir / "report.md", report.render_markdown(results))
    write_overview(out)
    return results
