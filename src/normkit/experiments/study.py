"""The contract between a study and the runner that executes, checkpoints and reports it.

A study module in ``normkit.experiments.studies`` exposes ``STUDY``, an instance of a
:class:`Study` subclass. The runner (``normkit.experiments.runner``) asks it for its
configuration and its runs, executes each run it has no checkpoint for, saves every finished run
atomically, then aggregates the metrics, tests the claims with one-sided paired t-tests over the
seeds, and writes ``results.json``, ``report.md`` and the study's figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normkit.experiments.stats import check_alpha

Metrics = dict[str, Any]
"""What one run returns: scalar metrics (floats) and, optionally, curves (lists of floats)."""

Progress = Callable[[float], None]
"""Called by a run with its completed fraction in [0, 1], for the progress bar."""


@dataclass(frozen=True)
class Run:
    """One unit of work: a method, at one setting, with one seed. Seeds pair runs across
    methods: every method sees the same data order and initialization seed for a given seed."""

    method: str
    setting: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}__{self.setting}__seed{self.seed}"


@dataclass(frozen=True)
class Claim:
    """A paper's claim as a paired comparison: ``better`` beats ``worse`` on ``metric``.

    ``settings`` lists the settings the comparison is made at (one test each); empty means every
    setting of the study. The verdict per test: "held" if the one-sided paired t-test in the
    claimed direction gives p <= alpha; "did not hold" if the test in the opposite direction does;
    "inconclusive at this size" otherwise (also with fewer than 2 paired seeds). ``alpha`` must be
    in (0, 0.5): from 0.5 up both directions could be significant at once. A non-finite value
    counts as the worst outcome of its side, and a claim is never held while its ``better`` side
    has one (see :func:`normkit.experiments.stats.paired_test`).

    ``metric`` names a scalar metric of the runs. A claim on a metric that the runs report as a
    list (a curve) stops the study with an error as soon as a run reports it; a claim on a metric
    that no run of its sides reports is "not tested". ``diverged_metric`` names a metric that
    flags a diverged run (a true value): such a run counts as non-finite in the claim, whatever
    value of ``metric`` it reports for display.

    Two optional refinements (both default to the plain claim above):

    - ``better_setting`` and ``worse_setting`` (given together, with ``settings`` left empty)
      compare ``better`` at one setting with ``worse`` at another, paired by seed: one test,
      e.g. "method A at batch 1 against method B at batch 32".
    - ``margin`` (>= 0, in the metric's units) turns the claim into a non-inferiority claim:
      ``better`` is no worse than ``worse`` by more than ``margin``. The test is the same paired
      t-test on the differences shifted by ``margin`` (H1: mean(better - worse) > -margin for a
      higher-is-better metric).
    """

    text: str
    better: str
    worse: str
    metric: str
    higher_is_better: bool = True
    settings: tuple[str, ...] = ()
    alpha: float = 0.05
    better_setting: str | None = None
    worse_setting: str | None = None
    margin: float = 0.0
    diverged_metric: str | None = None

    def __post_init__(self) -> None:
        if (self.better_setting is None) != (self.worse_setting is None):
            raise ValueError(
                f"Claim {self.text!r}: better_setting and worse_setting go together, got "
                f"{self.better_setting!r} and {self.worse_setting!r}"
            )
        if self.better_setting is not None and self.settings:
            raise ValueError(
                f"Claim {self.text!r}: settings must be empty when better_setting/worse_setting "
                "are given"
            )
        if self.margin < 0:
            raise ValueError(f"Claim {self.text!r}: expected margin >= 0, got {self.margin}")
        try:
            check_alpha(self.alpha)
        except ValueError as exc:
            raise ValueError(f"Claim {self.text!r}: {exc}") from None
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"Claim {self.text!r}: expected a metric name, got {self.metric!r}")


class ConfigError(ValueError):
    """A bad size option or override, raised by :meth:`Study.config`; the CLI prints its message
    as a one-line error (any ``ValueError`` or ``TypeError`` from ``config`` is treated alike)."""


@dataclass
class Study:
    """Base class of the studies. Subclasses override the methods below."""

    name: str
    title: str
    paper: str
    claims: Sequence[Claim] = field(default_factory=tuple)

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The study's sizes (epochs, batch sizes, depths, ...), JSON-serializable.

        ``overrides`` holds the user's size options by config key (``--batch-sizes 1,2`` arrives
        as ``{"batch_sizes": [1, 2]}``, parsed after the type of the key's value in
        ``config(quick, {})``); the runner refuses keys that ``config(quick, {})`` does not have.
        Raise :class:`ConfigError` (or ``ValueError``) for a bad value. An optional ``"seeds"``
        key (int) sets the default number of seeds when ``--seeds`` is not given. The runner adds
        ``"device"`` and ``"quick"`` itself.
        """
        raise NotImplementedError

    def claims_for(self, config: Mapping[str, Any]) -> Sequence[Claim]:
        """The claims to test for this config; by default :attr:`claims`.

        Override when a claim's settings depend on the sizes (e.g. "at the smallest batch").
        A claim whose runs are not in the study (a setting left out by the options) is reported
        as not tested rather than failing.
        """
        return tuple(self.claims)

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        """Every run of the study, methods x settings x seeds."""
        raise NotImplementedError

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Execute one run on the CPU (or ``config["device"]``) and return its metrics.

        Must be deterministic for a given run and config on a given machine.
        """
        raise NotImplementedError

    def extra_claims(self, results: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Claim tests other than the paired t-test of :class:`Claim` (default: none).

        Called once the aggregates and the t-test claims are in ``results``; each returned
        entry has the keys of a t-test entry of ``results["claims"]`` plus ``"test"`` (the
        test's name) and ``"note"`` (what it tests), and is appended to the claims.
        """
        return []

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Write the study's PNG figures into ``out_dir``; return their paths.

        ``results`` is the content of ``results.json`` (see ``normkit.experiments.runner``);
        the most useful parts::

            results["config"]                       # the config, "device" and "quick" included
            results["methods"], results["settings"]  # in the order of runs()
            results["seeds"]                         # [0, 1, ...]
            results["aggregates"][method][setting][metric]
                # scalar metrics: {"mean", "std", "n", "values"} (std over seeds, ddof=1; 0 for
                # one seed; "values" in seed order, None where a value was not finite)
            results["curves"][method][setting][metric]
                # list metrics: {"mean": [...], "std": [...], "n"}
            results["runs"][run.key]                 # {"run": {"method", "setting", "seed"},
                                                     #  "metrics": what run() returned}

        ``normkit.experiments.report`` has helpers for titled, legended plots with error bars.
        """
        return []


def option_flag(key: str) -> str:
    """The command-line flag of a config key: ``batch_size`` is ``--batch-size``."""
    return "--" + key.replace("_", "-")


def merge_config(
    study: str,
    defaults: Mapping[str, Any],
    quick_values: Mapping[str, Any],
    quick: bool,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """A study's config: ``defaults``, then ``quick_values`` if ``quick``, then every override
    that is not None (lists copied). An override of a key ``defaults`` lacks raises
    :class:`ConfigError` naming the study, the option and the known ones; checking the values is
    the study's."""
    cfg = dict(defaults)
    if quick:
        cfg.update(quick_values)
    for key, value in overrides.items():
        if key not in defaults:
            known = ", ".join(map(option_flag, defaults))
            raise ConfigError(f"study {study}: {option_flag(key)}: unknown option; known: {known}")
        if value is not None:
            cfg[key] = list(value) if isinstance(value, (list, tuple)) else value
    return cfg


def check_ints(study: str, cfg: Mapping[str, Any], keys: Sequence[str], minimum: int = 1) -> None:
    """Raise :class:`ConfigError` unless each ``cfg[key]`` is an int (no bool) >= ``minimum``."""
    for key in keys:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"study {study}: {option_flag(key)}: expected {what}, got {v!r}")


def check_numbers(
    study: str,
    cfg: dict[str, Any],
    keys: Sequence[str],
    *,
    minimum: float | None = 0.0,
    strict: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless every ``cfg[key]`` is a finite number, at least
    ``minimum`` (above it with ``strict``; unbounded with None); store each as a float."""
    for key in keys:
        v = cfg[key]
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        if not bad and minimum is not None:
            bad = v <= minimum if strict else v < minimum
        if bad:
            what = "a number"
            if minimum is not None:
                what += f" {'>' if strict else '>='} {minimum:g}"
            raise ConfigError(f"study {study}: {option_flag(key)}: expected {what}, got {v!r}")
        cfg[key] = float(v)


def check_methods(study: str, cfg: dict[str, Any], known: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless ``cfg["methods"]`` is a non-empty subset of ``known``;
    put them in ``known``'s order."""
    methods = cfg["methods"]
    unknown = [m for m in methods if m not in known]
    if not methods or unknown:
        raise ConfigError(
            f"study {study}: --methods: expected some of {', '.join(known)}, got "
            f"{', '.join(map(str, methods)) or 'none'}"
        )
    cfg["methods"] = [m for m in known if m in methods]


def runs_by_method(
    results: Mapping[str, Any], order: Sequence[str]
) -> dict[str, list[tuple[int, Mapping[str, Any]]]]:
    """``(seed, metrics)`` of each finished run in ``results["runs"]``, grouped by method (in
    ``order``, then any other method by name) and sorted by seed."""
    groups: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    for entry in results.get("runs", {}).values():
        metrics = entry.get("metrics")
        if not metrics:
            continue
        run = entry["run"]
        groups.setdefault(run["method"], []).append((int(run["seed"]), metrics))
    names = [m for m in order if m in groups] + sorted(set(groups) - set(order))
    return {m: sorted(groups[m], key=lambda t: t[0]) for m in names}


def metrics_by_method(
    results: Mapping[str, Any], order: Sequence[str]
) -> dict[str, list[Mapping[str, Any]]]:
    """:func:`runs_by_method` without the seeds."""
    return {m: [met for _, met in runs] for m, runs in runs_by_method(results, order).items()}
