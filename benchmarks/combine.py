"""Combine several ``normkit bench --json`` runs into the markdown tables of docs/benchmarks.md.

    python benchmarks/combine.py run1.json run2.json run3.json > tables.md

On a shared VM the same row moves between runs by more than its interquartile range within a
run, so the docs report, per row, the median over runs of each run's median ratio, the range of
those medians, and whether each target is met by that median. Rows are matched on (layer,
device, shape, dtype, format, mode, pass); a row missing from a run is left out of its median.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Key = tuple[str, str, str, str, str, str, str]


def _key(row: dict[str, Any]) -> Key:
    shape = "x".join(str(s) for s in row["shape"])
    return (
        row["layer"],
        row["device"],
        shape,
        row["dtype"],
        row["format"],
        row["mode"],
        row["pass"],
    )


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def combine(runs: Sequence[dict[str, Any]]) -> str:
    """Markdown: the target checks, then every row, each a median over ``runs``."""
    order: list[Key] = []
    rows: dict[Key, list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["rows"]:
            key = _key(row)
            if key not in rows:
                order.append(key)
                rows[key] = []
            rows[key].append(row)
    out = [
        f"{len(runs)} runs; per row: the median over runs of each run's median ratio, and the "
        "range of those medians.",
        "",
        "| target | layer | shape | format | pass | ratio (median of runs) | range over runs "
        "| met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    met = total = 0
    for key in order:
        group = rows[key]
        # Every target any run judged this row by (a run whose row failed has none): keyed by
        # metric and limit, each with the values of the runs that have it.
        checks: dict[tuple[str, float], list[float | None]] = {}
        for r in group:
            for t in r["targets"]:
                checks.setdefault((t["metric"], t["limit"]), []).append(t["value"])
        for (metric, limit), values in checks.items():
            value = _median(values)
            ok = value is not None and value <= limit
            total += 1
            met += ok
            present = [v for v in values if v is not None]
            spread = f"{min(present):.2f}–{max(present):.2f}" if present else "—"
            name = "memory ≤" if metric != "time" else "≤"
            out.append(
                f"| {name} {limit:.2f} | {key[0]} | {key[2]} | {key[4]} | {key[6]} | "
                f"{_fmt(value)} | {spread} | {'yes' if ok else '**no**'} |"
            )
    out += ["", f"Targets met: {met} of {total} checks (by the median over runs).", ""]
    out += [
        "| layer | shape | dtype | format | mode | pass | base ms | cand ms | ratio | range "
        "| mem× |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- | --- | ---: |",
    ]
    for key in order:
        group = rows[key]
        ratios = [r["ratio"] for r in group if r["ratio"] is not None]
        mem = _median([(r["memory"] or {}).get("ratio") for r in group])
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "—"
        out.append(
            f"| {key[0]} | {key[2]} | {key[3]} | {key[4]} | {key[5]} | {key[6]} | "
            f"{_fmt(_median([r['baseline_ms'] for r in group]), 3)} | "
            f"{_fmt(_median([r['candidate_ms'] for r in group]), 3)} | "
            f"{_fmt(_median(ratios))} | {spread} | {_fmt(mem)} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: combine.py RUN.json [RUN.json ...]", file=sys.stderr)
        return 2
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for path, run in zip(paths, runs):
        if run.get("complete") is False:
            # A run stopped early: its rows are real, but the others are missing from it.
            print(f"combine.py: {path} is an incomplete run", file=sys.stderr)
    sys.stdout.write(combine(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
