"""Markdown, terminal tables and matplotlib figures for the studies' results.

Figures are drawn on the Agg canvas directly (``matplotlib.figure.Figure``), never through
``pyplot``, so nothing here changes the backend or the figures of a user's own session.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "curves_figure",
    "errorbar_lines",
    "format_mean_std",
    "format_p",
    "markdown_table",
    "new_figure",
    "render_markdown",
    "render_overview",
    "render_terminal",
    "save_figure",
    "summary_figure",
    "text_table",
]

DASH = "—"


# --- numbers -------------------------------------------------------------------------------


def _decimals_for(std: float) -> int:
    """Decimals that show ``std`` to two significant digits (0 to 4)."""
    if std <= 0 or not math.isfinite(std):
        return 2
    return max(0, min(4, 1 - math.floor(math.log10(std))))


def format_number(x: float | None, decimals: int | None = None) -> str:
    """Fixed-point with ``decimals`` (default: 2, or 1 from 100), scientific when huge, or when
    tiny and no ``decimals`` are given."""
    if x is None or not math.isfinite(x):
        return DASH
    if x != 0 and (abs(x) >= 1e5 or (decimals is None and abs(x) < 1e-3)):
        return f"{x:.2e}"
    if decimals is None:
        decimals = 2 if abs(x) < 100 else 1
    return f"{x:.{decimals}f}"


def format_mean_std(stat: Mapping[str, Any] | None, decimals: int | None = None) -> str:
    """``"97.33 ± 0.42"`` from an aggregate ``{"mean", "std", "n", "n_missing"}``; by default
    with the decimals that show the std to two significant digits."""
    if not stat or stat.get("mean") is None:
        return DASH
    mean, std = stat["mean"], stat.get("std")
    big = abs(mean) >= 1e5 or (mean != 0 and abs(mean) < 1e-3)
    if big:
        decimals = None
    elif decimals is None:
        decimals = _decimals_for(std or 0.0)
    out = format_number(mean, decimals)
    if std is not None and stat.get("n", 0) >= 2:
        out += f" ± {format_number(std, decimals)}"
    if stat.get("n_missing"):
        out += f" ({stat['n_missing']} non-finite)"
    return out


def _p_clause(p: float | None, alpha: float | None = None) -> str:
    """``"= 0.0312 ≤ 0.05"``, ``"< 0.0001 ≤ 0.05"``, ``"= 0.24 > 0.05"``: p and its side of
    ``alpha`` (the side is left out without an alpha or a p)."""
    text = format_p(p, alpha)
    clause = text if text.startswith("<") else f"= {text}"
    if p is not None and alpha is not None:
        clause += f" {'≤' if p <= alpha else '>'} {alpha:g}"
    return clause


def format_p(p: float | None, alpha: float | None = None) -> str:
    """p to 4 decimals (``"< 0.0001"`` below that); with ``alpha``, with as many more decimals
    (up to 12) as it takes for the printed value to fall on the same side of ``alpha`` as p (a
    verdict is decided at p ≤ alpha: 0.04996 prints as 0.04996, not 0.0500)."""
    if p is None:
        return DASH
    if p < 1e-4 and (alpha is None or alpha > 1e-4):
        return "< 0.0001"
    decimals = 4
    if alpha is not None:
        while decimals < 12:
            shown = float(f"{p:.{decimals}f}")
            if (shown <= alpha) == (p <= alpha) and (shown != alpha or p == alpha):
                break
            decimals += 1
    return f"{p:.{decimals}f}"


def _claim_p(claim: Mapping[str, Any]) -> str:
    """The p cell of a claim's row: the claimed direction's p, and the opposite direction's p
    when that one decided the verdict ("did not hold")."""
    alpha = claim.get("alpha")
    text = format_p(claim.get("p"), alpha)
    if claim.get("verdict") == "did not hold" and claim.get("p_opposite") is not None:
        text += f" (opposite direction: {format_p(claim['p_opposite'], alpha)})"
    return text


# --- tables --------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain, aligned table for the terminal (first column left, the others right)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _metric_rows(results: Mapping[str, Any], metric: str) -> list[list[str]]:
    aggregates = results["aggregates"]
    cells = {
        (method, setting): aggregates.get(method, {}).get(setting, {}).get(metric)
        for method in results["methods"]
        for setting in results["settings"]
    }
    # One number of decimals per table, from its typical std, so that columns line up.
    stds = sorted(c["std"] for c in cells.values() if c and c.get("std"))
    decimals = _decimals_for(stds[len(stds) // 2]) if stds else None
    return [
        [method]
        + [format_mean_std(cells[(method, setting)], decimals) for setting in results["settings"]]
        for method in results["methods"]
    ]


def _side(claim: Mapping[str, Any], which: str) -> str:
    side = claim[which]
    return f"{side['method']} @ {side['setting']}"


def _format_diff(claim: Mapping[str, Any]) -> str:
    """The mean paired difference, to two significant digits of its std."""
    std = claim.get("std_diff")
    return format_number(claim.get("mean_diff"), _decimals_for(std) if std else None)


def _comparison(claim: Mapping[str, Any]) -> str:
    text = f"{_side(claim, 'better')} vs {_side(claim, 'worse')}"
    if claim.get("margin"):
        text += f" (margin {claim['margin']:g})"
    if not claim.get("higher_is_better", True):
        text += " (lower is better)"
    return text


def _claim_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for c in results["claims"]:
        diff = _format_diff(c)
        rows.append(
            [
                c["text"],
                _comparison(c),
                str(c.get("n", 0)),
                diff,
                _claim_p(c),
                c["verdict"],
            ]
        )
    return rows


_CLAIM_HEADERS = ["claim", "comparison", "seeds", "mean diff", "p (one-sided)", "verdict"]


def table_metrics(results: Mapping[str, Any]) -> list[str]:
    """The metrics the claims are about (in order), or every scalar metric without claims."""
    named = list(dict.fromkeys(c["metric"] for c in results["claims"]))
    return [m for m in named if m in results["metrics"]] or list(results["metrics"])


def render_terminal(results: Mapping[str, Any]) -> str:
    """The end-of-run summary: mean ± std per method and setting, then each claim's test."""
    parts = [f"{results['title']} ({results['paper']})"]
    seeds = len(results["seeds"])
    for metric in table_metrics(results):
        parts.append(f"\n{metric}, mean ± std over {seeds} seed(s):")
        parts.append(text_table(["method", *results["settings"]], _metric_rows(results, metric)))
    for c in results["claims"]:
        alpha = c.get("alpha")
        p_text = f"one-sided {c.get('test', 'paired t-test')} p {_p_clause(c.get('p'), alpha)}"
        if c["verdict"] == "did not hold" and c.get("p_opposite") is not None:
            p_text += f"; opposite direction p {_p_clause(c['p_opposite'], alpha)}"
        parts.append(
            f"\nclaim: {c['text']}\n  {_comparison(c)} on {c['metric']}"
            f": mean diff {_format_diff(c)}, n={c.get('n', 0)}, {p_text} "
            f"-> {c['verdict'].upper()}" + (f" ({c['note']})" if c.get("note") else "")
        )
    return "\n".join(parts)


def _cpu_text(machine: Mapping[str, Any]) -> str:
    """``"<model>, <capability>, "`` where recorded (results from before they were)."""
    parts = [str(machine[k]) for k in ("cpu_model", "cpu_capability") if machine.get(k)]
    return "".join(f"{part}, " for part in parts)


def render_markdown(results: Mapping[str, Any]) -> str:
    """``report.md`` of one study."""
    cfg = results["config"]
    out = [f"# {results['title']}", "", f"Paper: {results['paper']}", ""]
    if results.get("command"):
        out += ["Command:", "", "```", results["command"], "```", ""]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    machine = results.get("machine", {})
    elapsed = results.get("elapsed_s", {})
    out += [
        f"Seeds: {len(results['seeds'])} (paired across methods: {results['seeds']}). "
        f"Device: {cfg.get('device', 'cpu')}. Versions: {versions}.",
        "",
        f"Machine: {machine.get('platform', '?')}, {_cpu_text(machine)}"
        f"{machine.get('cpu_count', '?')} CPU(s), "
        f"{machine.get('jobs', 1)} job(s) of {machine.get('threads_per_run', '?')} thread(s). "
        f"Compute time of the runs: {format_number(elapsed.get('compute'), 1)} s; "
        f"wall time of this invocation: {format_number(elapsed.get('wall'), 1)} s "
        f"({elapsed.get('reused_runs', 0)} run(s) reused from checkpoints).",
        "",
        "## Claims",
        "",
    ]
    if results["claims"]:
        out += [
            "Each claim is a one-sided paired t-test over seeds unless its note names another "
            "test (`scipy.stats.ttest_rel`, alternative in the claimed direction; held at "
            "p ≤ alpha, did not hold when the opposite direction is significant (its p is shown "
            "beside), inconclusive otherwise). p is printed with the decimals that show its side "
            "of alpha. A non-finite value counts as the worst outcome of its method, and a claim "
            "is never held while its better side has one.",
            "",
            markdown_table(
                [*_CLAIM_HEADERS, "note"],
                [
                    [*row, c.get("note", "")]
                    for row, c in zip(_claim_rows(results), results["claims"])
                ],
            ),
            "",
        ]
    else:
        out += ["This study states no claim.", ""]
    out += ["## Results", ""]
    for metric in results["metrics"]:
        out += [
            f"### {metric}",
            "",
            "Mean ± std over seeds (std with ddof=1).",
            "",
            markdown_table(["method", *results["settings"]], _metric_rows(results, metric)),
            "",
        ]
    if results.get("figures"):
        out += ["## Figures", ""]
        for fig in results["figures"]:
            out += [f"![{Path(fig).stem.replace('_', ' ')}]({fig})", ""]
    out += ["## Configuration", ""]
    out += [
        markdown_table(
            ["key", "value"],
            [[k, f"`{json.dumps(v, separators=(', ', ': '))}`"] for k, v in sorted(cfg.items())],
        ),
        "",
    ]
    out += ["## Per-run metrics", "", "<details><summary>every run</summary>", ""]
    metrics = results["metrics"]
    rows = [
        [r["run"]["method"], r["run"]["setting"], str(r["run"]["seed"])]
        + [format_number(_scalar(r["metrics"].get(m)), 4) for m in metrics]
        for r in results["runs"].values()
    ]
    out += [markdown_table(["method", "setting", "seed", *metrics], rows), "", "</details>", ""]
    return "\n".join(out)


def _scalar(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def render_overview(all_results: Sequence[Mapping[str, Any]]) -> str:
    """``OUT/report.md``: one section per study found in the output directory."""
    out = ["# normkit reproduction report", ""]
    for results in all_results:
        name = results["study"]
        out += [
            f"## [{results['title']}]({name}/report.md)",
            "",
            f"{results['paper']}; {len(results['seeds'])} seed(s)"
            + (", quick sizes" if results["config"].get("quick") else "")
            + ".",
            "",
        ]
        if results["claims"]:
            out += [markdown_table(_CLAIM_HEADERS, _claim_rows(results)), ""]
    return "\n".join(out)


# --- figures -------------------------------------------------------------------------------


def new_figure(
    ncols: int = 1, *, width: float = 5.5, height: float = 4.0
) -> tuple[Figure, list[Axes]]:
    """A figure on the Agg canvas with ``ncols`` side-by-side axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def errorbar_lines(
    ax: Axes,
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
) -> None:
    """One line per label with error bars: ``series[label] = (means, stds)`` at ``x``."""
    for i, (label, (means, stds)) in enumerate(series.items()):
        pts = [(xi, m, s or 0.0) for xi, m, s in zip(x, means, stds) if m is not None]
        if not pts:
            continue
        xs, ms, ss = zip(*pts)
        ax.errorbar(xs, ms, yerr=ss, label=label, marker="o", capsize=3, color=f"C{i}")
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(x), [str(v) for v in x])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def summary_figure(results: Mapping[str, Any], metric: str, path: Path) -> Path:
    """Grouped bars: one group per setting, one bar per method, error bars = std over seeds."""
    methods, settings = results["methods"], results["settings"]
    fig, (ax,) = new_figure(width=max(5.5, 1.2 * len(settings) + 3))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        cells = [
            results["aggregates"].get(method, {}).get(s, {}).get(metric) or {} for s in settings
        ]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(settings))]
        means = [float(c["mean"]) if c.get("mean") is not None else math.nan for c in cells]
        stds = [float(c.get("std") or 0.0) for c in cells]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=method, color=f"C{i}")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_title(f"{metric}: mean ± std over {len(results['seeds'])} seed(s)")
    ax.set_xlabel("setting")
    ax.set_ylabel(metric)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def curves_figure(
    results: Mapping[str, Any],
    metric: str,
    path: Path,
    *,
    xlabel: str = "logged point",
    ylabel: str | None = None,
    title: str | None = None,
) -> Path:
    """One panel per setting (up to 4), one line per method (mean, shaded ± std): a learning
    curve of the list-valued ``metric``, its points numbered from 1."""
    settings = [
        s
        for s in results["settings"]
        if any(metric in results["curves"].get(m, {}).get(s, {}) for m in results["methods"])
    ]
    from matplotlib.ticker import MaxNLocator

    ncols = max(1, min(len(settings), 4))
    settings = settings[:ncols]
    fig, axes = new_figure(ncols, width=4.5)
    for ax, setting in zip(axes, settings):
        for i, method in enumerate(results["methods"]):
            curve = results["curves"].get(method, {}).get(setting, {}).get(metric)
            if not curve:
                continue
            pts = [
                (k + 1, m, s or 0.0)
                for k, (m, s) in enumerate(zip(curve["mean"], curve["std"]))
                if m is not None
            ]
            if not pts:
                continue
            xs, ms, ss = zip(*pts)
            ax.plot(xs, ms, marker=".", label=method, color=f"C{i}")
            ax.fill_between(
                xs,
                [m - s for m, s in zip(ms, ss)],
                [m + s for m, s in zip(ms, ss)],
                alpha=0.2,
                color=f"C{i}",
            )
        ax.set_title(f"{setting}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel or metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or f"{metric}: mean ± std over {len(results['seeds'])} seed(s)")
    return save_figure(fig, path)
