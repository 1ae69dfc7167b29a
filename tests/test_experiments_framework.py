"""The reproduction framework: data, training loop, statistics, runner, report.

A tiny fake study (below) drives the runner end to end in well under a second per run.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from normkit.experiments import data, report, runner, stats, training
from normkit.experiments.study import Claim, Metrics, Progress, Run, Study

pytest.importorskip("scipy")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ttest_rel(a: Sequence[float], b: Sequence[float], alternative: str) -> Any:
    # Imported here: the runner's worker processes import this module for FakeStudy.
    from scipy.stats import ttest_rel

    return ttest_rel(a, b, alternative=alternative)


class Interrupted(RuntimeError):
    pass


@dataclass
class FakeStudy(Study):
    """Two methods at two settings; "A" scores about 5 more than "B". Deterministic per run."""

    name: str = "fake"
    title: str = "A fake study"
    paper: str = "Nobody et al. 2024"
    claims: Sequence[Claim] = (
        Claim("A beats B", better="A", worse="B", metric="score"),
        Claim("B beats A at s1", better="B", worse="A", metric="score", settings=("s1",)),
        Claim(
            "A at s1 is within 7 of B at s2",
            better="A",
            worse="B",
            metric="score",
            better_setting="s1",
            worse_setting="s2",
            margin=7.0,
        ),
        Claim(
            "A beats B at a setting never run",
            better="A",
            worse="B",
            metric="score",
            settings=("s9",),
        ),
    )
    fail_after: int | None = None
    calls: int = field(default=0, compare=False)

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        cfg: dict[str, Any] = {"settings": ["s1", "s2"], "scale": 1.0, "steps": 3 if quick else 6}
        cfg.update(overrides)
        if not isinstance(cfg["steps"], int) or cfg["steps"] < 1:
            raise ValueError(f"--steps: expected a positive integer, got {cfg['steps']!r}")
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        return [Run(m, s, seed) for s in config["settings"] for m in ("A", "B") for seed in seeds]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted(f"simulated interruption after {self.calls} runs")
        self.calls += 1
        code = 100 * run.seed + 10 * ("AB".index(run.method)) + int(run.setting[1:])
        g = torch.Generator().manual_seed(code)
        steps = config["steps"]
        noise = torch.randn(steps, generator=g, dtype=torch.float64)
        base = {"A": 10.0, "B": 5.0}[run.method] * config["scale"]
        curve = (base + 0.1 * noise.cumsum(0)).tolist()
        for i in range(steps):
            progress((i + 1) / steps)
        return {
            "score": base + float(noise[0]),
            "loss": -curve[-1],
            "diverged": run.method == "B" and run.seed == 0,
            "sometimes_nan": float("nan") if run.seed == 1 else 1.0,
            "curve": curve,
            "label": f"{run.method}-{run.seed}",
        }

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        fig, (ax,) = report.new_figure()
        series = {
            m: (
                [results["aggregates"][m][s]["score"]["mean"] for s in results["settings"]],
                [results["aggregates"][m][s]["score"]["std"] for s in results["settings"]],
            )
            for m in results["methods"]
        }
        report.errorbar_lines(ax, [1, 2], series, title="score", xlabel="setting", ylabel="score")
        return [report.save_figure(fig, out_dir / "score.png")]


def _run(study: Study, out: Path, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("seeds", 3)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("stream", io.StringIO())
    return runner.run_study(study, out=out, **kwargs)


def _deterministic_part(results: Mapping[str, Any]) -> dict[str, Any]:
    keep = (
        "config",
        "seeds",
        "methods",
        "settings",
        "metrics",
        "curve_metrics",
        "aggregates",
        "curves",
        "claims",
        "figures",
    )
    part = {k: results[k] for k in keep}
    part["runs"] = {
        k: {"run": v["run"], "metrics": v["metrics"]} for k, v in results["runs"].items()
    }
    return part


# --- end to end ----------------------------------------------------------------------------------


def test_results_json_report_and_figures(tmp_path: Path) -> None:
    results = _run(FakeStudy(), tmp_path)
    study_dir = tmp_path / "fake"
    on_disk = json.loads((study_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))

    assert on_disk["study"] == "fake" and on_disk["paper"] == "Nobody et al. 2024"
    assert on_disk["seeds"] == [0, 1, 2]
    assert on_disk["methods"] == ["A", "B"] and on_disk["settings"] == ["s1", "s2"]
    assert on_disk["config"] == {
        "settings": ["s1", "s2"],
        "scale": 1.0,
        "steps": 6,
        "seeds": 3,
        "device": "cpu",
        "quick": False,
    }
    assert set(on_disk["versions"]) >= {"python", "torch", "normkit", "numpy"}
    assert on_disk["elapsed_s"]["wall"] > 0 and on_disk["elapsed_s"]["reused_runs"] == 0
    assert len(on_disk["runs"]) == 12
    entry = on_disk["runs"]["A__s1__seed2"]
    assert entry["run"] == {"method": "A", "setting": "s1", "seed": 2}
    assert entry["metrics"]["label"] == "A-2"
    assert on_disk["runs"]["A__s1__seed1"]["metrics"]["sometimes_nan"] is None  # NaN -> null

    # Aggregates: scalar metrics (bools as 0/1), mean and std (ddof=1) over seeds.
    assert on_disk["metrics"] == ["score", "loss", "diverged", "sometimes_nan"]
    assert on_disk["curve_metrics"] == ["curve"]
    scores = [on_disk["runs"][f"B__s2__seed{s}"]["metrics"]["score"] for s in range(3)]
    agg = on_disk["aggregates"]["B"]["s2"]["score"]
    assert agg["values"] == scores and agg["n"] == 3
    assert agg["mean"] == pytest.approx(sum(scores) / 3)
    assert agg["std"] == pytest.approx(torch.tensor(scores).std(unbiased=True).item())
    assert on_disk["aggregates"]["B"]["s1"]["diverged"]["mean"] == pytest.approx(1 / 3)
    nan_agg = on_disk["aggregates"]["A"]["s1"]["sometimes_nan"]
    assert nan_agg["n"] == 2 and nan_agg["n_missing"] == 1 and nan_agg["mean"] == 1.0
    assert len(on_disk["curves"]["A"]["s1"]["curve"]["mean"]) == 6

    # Claims: one entry per test, with the verdict of scipy's one-sided paired t-test.
    claims = on_disk["claims"]
    assert [c["text"] for c in claims] == [
        "A beats B",
        "A beats B",
        "B beats A at s1",
        "A at s1 is within 7 of B at s2",
        "A beats B at a setting never run",
    ]
    a = [on_disk["runs"][f"A__s1__seed{s}"]["metrics"]["score"] for s in range(3)]
    b = [on_disk["runs"][f"B__s1__seed{s}"]["metrics"]["score"] for s in range(3)]
    first = claims[0]
    assert first["better"] == {"method": "A", "setting": "s1"}
    assert first["p"] == pytest.approx(ttest_rel(a, b, alternative="greater").pvalue)
    assert first["verdict"] == ("held" if first["p"] <= 0.05 else "inconclusive at this size")
    assert claims[2]["verdict"] == "did not hold"
    assert claims[2]["p_opposite"] == pytest.approx(first["p"])
    b2 = [on_disk["runs"][f"B__s2__seed{s}"]["metrics"]["score"] for s in range(3)]
    shifted = ttest_rel([x + 7.0 for x in a], b2, alternative="greater").pvalue
    assert claims[3]["worse"] == {"method": "B", "setting": "s2"}
    assert claims[3]["p"] == pytest.approx(shifted)
    assert claims[4]["verdict"] == "not tested" and "s9" in claims[4]["note"]

    # Checkpoints, figures, report.
    assert len(list((study_dir / "runs").glob("*.json"))) == 12
    assert on_disk["figures"] == ["score.png"]
    assert (study_dir / "score.png").read_bytes()[:8] == PNG_MAGIC
    md = (study_dir / "report.md").read_text()
    assert md.startswith("# A fake study")
    assert "![score](score.png)" in md
    assert "| method | s1 | s2 |" in md
    assert "did not hold" in md and "not tested" in md
    assert "A beats B" in md and "### score" in md
    overview = (tmp_path / "report.md").read_text()
    assert "[A fake study](fake/report.md)" in overview

    # The terminal summary: a mean ± std table per claimed metric, and every claim's p and verdict.
    text = report.render_terminal(on_disk)
    assert "score, mean ± std over 3 seed(s)" in text
    assert "DID NOT HOLD" in text and "NOT TESTED" in text
    assert " ± " in text


def test_a_study_without_figures_gets_generic_ones(tmp_path: Path) -> None:
    @dataclass
    class Plain(FakeStudy):
        def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
            return []

    results = _run(Plain(), tmp_path, seeds=2)
    assert results["figures"] == ["summary_score.png", "curves_curve.png"]
    for name in results["figures"]:
        assert (tmp_path / "fake" / name).read_bytes()[:8] == PNG_MAGIC


def test_failing_figures_keep_the_results(tmp_path: Path) -> None:
    @dataclass
    class Broken(FakeStudy):
        def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
            raise KeyError("oops")

    stream = io.StringIO()
    _run(Broken(), tmp_path, seeds=2, stream=stream)
    assert "figures failed" in stream.getvalue()
    assert (tmp_path / "fake" / "results.json").exists()
    assert (tmp_path / "fake" / "report.md").exists()


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    straight = _run(FakeStudy(), tmp_path / "a")

    with pytest.raises(Interrupted):
        _run(FakeStudy(fail_after=5), tmp_path / "b")
    runs_dir = tmp_path / "b" / "fake" / "runs"
    assert len(list(runs_dir.glob("*.json"))) == 5
    assert not list(runs_dir.glob(".*"))  # no half-written checkpoint

    study = FakeStudy()
    resumed = _run(study, tmp_path / "b", resume=True)
    assert study.calls == 7  # only the unfinished runs ran
    assert resumed["elapsed_s"]["reused_runs"] == 5
    assert _deterministic_part(resumed) == _deterministic_part(straight)


def test_resume_with_more_seeds_reuses_the_finished_ones(tmp_path: Path) -> None:
    _run(FakeStudy(), tmp_path, seeds=2)
    study = FakeStudy()
    results = _run(study, tmp_path, seeds=3, resume=True)
    assert study.calls == 4 and results["seeds"] == [0, 1, 2]


def test_without_resume_the_same_config_starts_over(tmp_path: Path) -> None:
    _run(FakeStudy(), tmp_path)
    study, stream = FakeStudy(), io.StringIO()
    _run(study, tmp_path, stream=stream)
    assert study.calls == 12
    assert "discarding 12 finished run(s)" in stream.getvalue()


@pytest.mark.parametrize("resume", [False, True])
def test_runs_of_a_different_config_are_refused(tmp_path: Path, resume: bool) -> None:
    _run(FakeStudy(), tmp_path)
    before = sorted(p.name for p in (tmp_path / "fake" / "runs").iterdir())
    with pytest.raises(runner.RunnerError, match=r"different configuration \(differs in: scale"):
        _run(FakeStudy(), tmp_path, overrides={"scale": 2.0}, resume=resume)
    assert sorted(p.name for p in (tmp_path / "fake" / "runs").iterdir()) == before


def test_jobs_do_not_change_the_results(tmp_path: Path) -> None:
    one = _run(FakeStudy(), tmp_path / "one", seeds=2, jobs=1)
    two = _run(FakeStudy(), tmp_path / "two", seeds=2, jobs=2)
    assert two["machine"]["jobs"] == 2
    assert _deterministic_part(two) == _deterministic_part(one)


def test_results_record_the_cpu_that_rounded_them(tmp_path: Path) -> None:
    # Bit-for-bit determinism holds on one CPU only: the results name the CPU and the vector
    # instructions torch used, and the report shows them.
    results = _run(FakeStudy(), tmp_path, seeds=1)
    machine = results["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    line = next(ln for ln in report.render_markdown(results).splitlines() if "Machine:" in ln)
    assert f"{machine['cpu_model']}, {machine['cpu_capability']}, " in line
    # Results saved before these fields existed still render.
    before = {k: v for k, v in machine.items() if k not in ("cpu_model", "cpu_capability")}
    assert "Machine: " in report.render_markdown({**results, "machine": before})


def test_config_errors_are_runner_errors(tmp_path: Path) -> None:
    with pytest.raises(runner.RunnerError, match="fake has no option --depths"):
        _run(FakeStudy(), tmp_path, overrides={"depths": [1]})
    with pytest.raises(runner.RunnerError, match="--steps: expected a positive integer"):
        _run(FakeStudy(), tmp_path, overrides={"steps": 0})
    with pytest.raises(runner.RunnerError, match="--seeds"):
        _run(FakeStudy(), tmp_path, seeds=0)
    (tmp_path / "file").touch()
    with pytest.raises(runner.RunnerError, match="not writable"):
        _run(FakeStudy(), tmp_path / "file" / "sub")


def test_the_progress_bar_draws_only_when_enabled() -> None:
    quiet, loud = io.StringIO(), io.StringIO()
    for stream, enabled in ((quiet, False), (loud, True)):
        bar = runner.ProgressBar("fake", 2, stream, enabled)
        bar.update("A__s1__seed0", 0.5)
        bar.done("A__s1__seed0")
        bar.close()
    assert quiet.getvalue() == ""
    assert "1/2 runs" in loud.getvalue() and loud.getvalue().endswith("\n")


def test_deterministic_restores_torch_settings() -> None:
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    with runner.deterministic(threads=1):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
        torch.manual_seed(123)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)


def test_checkpoint_names_are_safe_and_distinct() -> None:
    names = {runner.checkpoint_name(Run(m, "batch=1", 0)) for m in ("GN+WS", "GN WS", "GN/WS")}
    assert len(names) == 3
    assert all("/" not in n and " " not in n for n in names)


# --- statistics ---------------------------------------------------------------------------------


def test_paired_test_matches_scipy_in_both_directions() -> None:
    a, b = [0.91, 0.93, 0.95, 0.90], [0.89, 0.92, 0.90, 0.91]
    t = stats.paired_test(a, b)
    assert t.n == 4 and t.mean_diff == pytest.approx(0.0175)
    assert t.p == pytest.approx(ttest_rel(a, b, alternative="greater").pvalue)
    assert t.p_opposite == pytest.approx(ttest_rel(a, b, alternative="less").pvalue)
    assert t.verdict == "inconclusive at this size"


def test_paired_test_verdicts() -> None:
    better = [90.0, 91.0, 92.5, 93.0, 94.0]
    worse = [80.0, 82.0, 81.0, 83.0, 80.5]
    assert stats.paired_test(better, worse).verdict == "held"
    assert stats.paired_test(worse, better).verdict == "did not hold"
    # Lower is better: a loss.
    assert stats.paired_test(worse, better, higher_is_better=False).verdict == "held"
    # Non-inferiority: 1 point worse on average, within a 3-point margin but not a 0.5 one.
    close = [b - 1.0 + 0.1 * (i % 2) for i, b in enumerate(better)]
    assert stats.paired_test(close, better, margin=3.0).verdict == "held"
    assert stats.paired_test(close, better, margin=0.5).verdict == "did not hold"
    assert stats.paired_test(close, better, margin=0.5).mean_diff == pytest.approx(-0.96)


def test_paired_test_needs_two_pairs() -> None:
    t = stats.paired_test([99.0], [1.0])
    assert t.verdict == "inconclusive at this size" and t.p is None and "at least 2" in t.note


def test_paired_test_with_zero_variance_differences() -> None:
    up = stats.paired_test([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert (up.verdict, up.p, up.p_opposite, up.t) == ("held", 0.0, 1.0, None)
    down = stats.paired_test([1.0, 2.0], [3.0, 4.0])
    assert (down.verdict, down.p, down.p_opposite) == ("did not hold", 1.0, 0.0)
    same = stats.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.verdict == "inconclusive at this size" and same.p is None
    # Constant differences exactly at the margin: no evidence either way.
    edge = stats.paired_test([1.0, 2.0], [2.0, 3.0], margin=1.0)
    assert edge.verdict == "inconclusive at this size"
    for t in (up, down, same, edge):
        json.dumps(t.as_dict(), allow_nan=False)


NAN = float("nan")


def test_a_non_finite_value_counts_against_its_side() -> None:
    # A loss (lower is better): the claimed-better method diverged on 3 of 5 seeds and was far
    # better on the other two. Dropping those seeds would make the claim hold.
    better = [NAN, None, float("inf"), 1.00, 1.10]
    worse = [2.0, 2.1, 1.9, 2.0, 2.2]
    t = stats.paired_test(better, worse, higher_is_better=False)
    assert t.n == 5 and t.verdict == "did not hold"
    assert t.mean_diff == pytest.approx(1.05)  # over the two seeds with finite values
    # The verdict is the t-test's limit with each non-finite value replaced by a worse and worse
    # finite one (the worst outcome for its side).
    for bad in (1e6, 1e9):
        imputed = [bad if v is None or not math.isfinite(v) else v for v in better]
        assert t.p_opposite == pytest.approx(
            ttest_rel(imputed, worse, alternative="greater").pvalue, rel=1e-3
        )
    assert "3 non-finite value(s) of the better side" in t.note
    # The same seeds with the roles swapped: the non-finite values now support the claim.
    swapped = stats.paired_test(worse, better, higher_is_better=False)
    assert swapped.verdict == "held" and swapped.p == pytest.approx(t.p_opposite)
    # A method that diverged on every seed did not beat one that trained.
    assert stats.paired_test([NAN] * 3, [0.9, 0.8, 0.85]).verdict == "did not hold"


def test_a_claim_never_holds_with_a_non_finite_better_run() -> None:
    # Both diverged on seed 0 (a tie); the better side wins clearly on the other seeds.
    better = [NAN, 10.0, 11.0, 12.0, 13.0, 12.5]
    worse = [NAN, 1.0, 1.5, 2.0, 2.2, 1.0]
    t = stats.paired_test(better, worse)
    assert t.p is not None and t.p <= 0.05  # significant with the tie counted as a zero...
    assert t.verdict == "inconclusive at this size"  # ...but not held
    assert "not held: the better side has 1 non-finite value(s)" in t.note
    finite = stats.paired_test(better[1:], worse[1:])
    assert finite.verdict == "held"


def test_zero_variance_tolerance_is_relative_to_the_data() -> None:
    # A tiny-scale metric with a consistent effect: a plain t-test, as scipy.
    tiny = stats.paired_test([3e-13, 4e-13, 5e-13], [0.0, 0.0, 0.0])
    assert tiny.p == pytest.approx(ttest_rel([3e-13, 4e-13, 5e-13], [0, 0, 0], "greater").pvalue)
    assert tiny.verdict == "held"
    # Equal differences up to rounding (one test digit of 450 on both seeds): certain.
    quantized = stats.paired_test([0.9 + 1 / 450, 0.8 + 1 / 450], [0.9, 0.8])
    assert (quantized.verdict, quantized.p) == ("held", 0.0)
    # Differences that overflow a float are not "all equal" (nor zero): the t-test of the values
    # in units of the largest one.
    huge = stats.paired_test([1.7e308, 1.0, 2.0], [-1.7e308, 0.5, 0.7])
    assert huge.t is not None and huge.p == pytest.approx(
        ttest_rel([2.0, 0.5 / 1.7e308, 1.3 / 1.7e308], [0, 0, 0], "greater").pvalue
    )
    json.dumps(huge.as_dict(), allow_nan=False)


def test_alpha_must_leave_one_direction() -> None:
    for alpha in (0.5, 0.6, 0.0, -0.1, NAN):
        with pytest.raises(ValueError, match=r"alpha in \(0, 0.5\)"):
            Claim("x", "A", "B", "m", alpha=alpha)
        with pytest.raises(ValueError, match=r"alpha in \(0, 0.5\)"):
            stats.paired_test([0.1, 0.1, -0.25], [0.0, 0.0, 0.0], alpha=alpha)
    assert Claim("x", "A", "B", "m", alpha=0.1).alpha == 0.1


def _records(
    study: Study, metrics: Any, seeds: int = 5
) -> tuple[list[Run], dict[str, dict[str, Any]]]:
    runs = study.runs({"settings": ["s1"]}, list(range(seeds)))
    # Through JSON, as the runner reads checkpoints back: NaN becomes null.
    records = {r.key: {"metrics": runner.jsonable(metrics(r))} for r in runs}
    return runs, records


def test_claims_on_diverged_missing_and_partly_missing_metrics() -> None:
    study = FakeStudy(
        claims=(
            Claim("A reaches a lower loss", "A", "B", "loss", higher_is_better=False),
            Claim("typo", "A", "B", "scroe"),
            Claim("on the seeds that report it", "A", "B", "sometimes"),
        )
    )

    def metrics(r: Run) -> dict[str, Any]:
        out: dict[str, Any] = {"score": 1.0, "curve": [1.0, 2.0]}
        if r.method == "A":
            out["loss"] = NAN if r.seed < 3 else 1.0 + 0.1 * r.seed
        else:
            out["loss"] = 2.0 + 0.05 * r.seed
        if r.seed != 0:
            out["sometimes"] = 5.0 + r.seed if r.method == "A" else 1.0 + 0.5 * r.seed
        return out

    runs, records = _records(study, metrics)
    loss, typo, partly = runner.build_results(study, {}, runs, records)["claims"]
    assert loss["n"] == 5 and loss["verdict"] == "did not hold"
    assert typo["verdict"] == "not tested" and "'scroe' is not reported" in typo["note"]
    assert partly["n"] == 4 and partly["verdict"] == "held"
    assert "1 seed(s) left out: metric 'sometimes' not reported" in partly["note"]


def test_a_run_that_reports_itself_diverged_counts_as_non_finite() -> None:
    """A study may show a diverged run at a display value (depth: chance accuracy) and flag it;
    a claim naming the flag as its ``diverged_metric`` treats it as diverged, not as that
    number."""
    study = FakeStudy(claims=(Claim("A beats B", "A", "B", "acc", diverged_metric="diverged"),))

    def metrics(r: Run) -> dict[str, Any]:
        if r.method == "A":
            # Diverged on seed 0 (shown at chance), clearly ahead on the others.
            return {"acc": 0.1, "diverged": 1.0} if r.seed == 0 else {"acc": 0.9, "diverged": 0.0}
        return {"acc": 0.1, "diverged": 1.0}  # B diverges everywhere

    runs, records = _records(study, metrics, seeds=6)
    (claim,) = runner.build_results(study, {}, runs, records)["claims"]
    # Scored at 0.1, seed 0 would be a tie and the claim held; as a diverged run it keeps the
    # claim from holding.
    assert claim["verdict"] == "inconclusive at this size"
    assert "not held: the better side has 1 non-finite value(s)" in claim["note"]
    plain_study = FakeStudy(claims=(Claim("A beats B", "A", "B", "acc"),))
    plain = runner.build_results(plain_study, {}, runs, records)["claims"][0]
    assert plain["verdict"] == "held"  # the same numbers read as numbers: held


def test_a_claim_on_a_curve_stops_the_study_after_one_run(tmp_path: Path) -> None:
    study = FakeStudy(claims=(Claim("A has a better curve", "A", "B", "curve"),))
    with pytest.raises(runner.RunnerError, match=r"'curve'.*a curve \(a list\)"):
        _run(study, tmp_path / "a", seeds=2)
    assert study.calls == 1
    # Resuming from finished runs: refused before any training.
    _run(FakeStudy(), tmp_path / "b", seeds=2)
    study = FakeStudy(claims=(Claim("A has a better curve", "A", "B", "curve"),))
    with pytest.raises(runner.RunnerError, match="a curve"):
        _run(study, tmp_path / "b", seeds=2, resume=True)
    assert study.calls == 0
    # build_results on such runs: the same error, not a TypeError.
    runs, records = _records(study, lambda r: {"curve": [1.0, 2.0]}, seeds=2)
    with pytest.raises(runner.RunnerError, match="a curve"):
        runner.build_results(study, {}, runs, records)


def test_printed_p_shows_its_side_of_alpha() -> None:
    alpha = 0.05
    for p in (0.04996, 0.049999, 0.05, 0.050001, 0.05004, 0.0312, 0.24, 0.9997):
        assert (float(report.format_p(p, alpha)) <= alpha) == (p <= alpha), p
    assert report.format_p(0.0312, alpha) == report.format_p(0.0312)  # no needless digits

    def entry(better: list[float], worse: list[float]) -> dict[str, Any]:
        t = stats.paired_test(better, worse)
        return {
            "text": "claim",
            "metric": "m",
            "better": {"method": "A", "setting": "s"},
            "worse": {"method": "B", "setting": "s"},
            "alpha": alpha,
            **t.as_dict(),
        }

    lost = entry([0.0, 0.0, 0.0, 0.0], [0.1, 0.12, 0.09, 0.11])
    assert lost["verdict"] == "did not hold"
    results = {
        "title": "t",
        "paper": "p",
        "seeds": [0, 1, 2, 3],
        "settings": ["s"],
        "methods": ["A", "B"],
        "metrics": [],
        "aggregates": {},
        "claims": [lost],
    }
    text = report.render_terminal(results)
    p_opp = report.format_p(lost["p_opposite"], alpha)
    assert p_opp != report.format_p(lost["p"], alpha)
    assert f"opposite direction p = {p_opp} ≤ 0.05" in text
    assert p_opp in report.markdown_table(report._CLAIM_HEADERS, report._claim_rows(results))


def test_aggregate() -> None:
    assert stats.aggregate([1.0, 2.0, 3.0]) == {
        "mean": 2.0,
        "std": 1.0,
        "n": 3,
        "n_missing": 0,
        "values": [1.0, 2.0, 3.0],
    }
    assert stats.aggregate([4.0])["std"] == 0.0
    empty = stats.aggregate([None, float("inf")])
    assert empty["mean"] is None and empty["n_missing"] == 2
    # Diverged losses near the float limit: no OverflowError, the spread overflows to None.
    huge = stats.aggregate([1.7e308, -1.7e308])
    assert huge["mean"] == 0.0 and huge["std"] is None
    assert stats.aggregate([1e200, 3e200])["std"] == pytest.approx(math.sqrt(2) * 1e200)
    curves = stats.aggregate_curves([[1.0, 2.0], [3.0]])
    assert curves["mean"] == [2.0, 2.0] and curves["std"] == [pytest.approx(math.sqrt(2)), 0.0]


def test_claim_validation() -> None:
    with pytest.raises(ValueError, match="go together"):
        Claim("x", better="A", worse="B", metric="m", better_setting="s1")
    with pytest.raises(ValueError, match="settings must be empty"):
        Claim("x", "A", "B", "m", settings=("s1",), better_setting="s1", worse_setting="s2")
    with pytest.raises(ValueError, match="margin"):
        Claim("x", "A", "B", "m", margin=-1.0)


def test_format_mean_std() -> None:
    assert report.format_mean_std({"mean": 97.333, "std": 0.42, "n": 5}) == "97.33 ± 0.42"
    assert report.format_mean_std({"mean": 97.333, "std": 4.2, "n": 5}) == "97.3 ± 4.2"
    assert report.format_mean_std({"mean": 0.5, "std": 0.0, "n": 1}) == "0.50"
    assert report.format_mean_std(None) == "—"
    assert report.format_p(3e-7) == "< 0.0001"


# --- data and training --------------------------------------------------------------------------


def test_digits_split() -> None:
    d = data.digits_split()
    assert d.x_train.shape == (1347, 1, 8, 8) and d.x_test.shape == (450, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    # Stratified: every class has its share of the test set, within one image.
    counts = torch.bincount(d.y_test, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 47
    again = data.digits_split()
    assert torch.equal(again.x_test, d.x_test)
    d.x_train.zero_()  # callers may modify what they get
    assert float(data.digits_split().x_train.max()) == 1.0


def test_variants_are_fixed_and_seeded() -> None:
    d = data.digits_split()
    x, y = d.x_train[:200], d.y_train[:200]
    assert torch.equal(data.apply_domain(x, "inverted"), 1 - x)
    rotated = data.apply_domain(x, "rotated")
    assert torch.equal(rotated, torch.rot90(x, 1, dims=(2, 3)) * 3 + 0.5)
    assert list(data.DOMAINS) == ["identity", "inverted", "rotated"]
    with pytest.raises(ValueError, match="unknown domain"):
        data.apply_domain(x, "blurred")

    noisy = data.label_noise(y, 0.25, seed=3)
    changed = noisy != y
    assert int(changed.sum()) == 50 and bool((noisy >= 0).all() and (noisy < 10).all())
    assert torch.equal(noisy, data.label_noise(y, 0.25, seed=3))
    assert not torch.equal(noisy, data.label_noise(y, 0.25, seed=4))

    g = data.gaussian_noise(x, 0.3, seed=1)
    assert torch.equal(g, data.gaussian_noise(x, 0.3, seed=1))
    assert float((g - x).std()) == pytest.approx(0.3, rel=0.1)

    xs, ys = data.subset(d.x_train, d.y_train, 300, seed=0)
    assert xs.shape == (300, 1, 8, 8)
    assert len(ys) == 300 and int(torch.bincount(ys).min()) >= 29
    assert torch.equal(ys, data.subset(d.x_train, d.y_train, 300, seed=0)[1])


def test_training_is_deterministic_and_paired() -> None:
    d = data.digits_split()
    x, y = d.x_train[:64], d.y_train[:64]

    def fit(seed: int) -> tuple[torch.Tensor, training.TrainResult]:
        training.init_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        opt = training.sgd(model.parameters(), 0.1)
        sched = training.cosine_lr(opt, 8)
        fractions: list[float] = []
        res = training.train(
            model,
            x,
            y,
            optimizer=opt,
            scheduler=sched,
            epochs=2,
            batch_size=16,
            seed=seed,
            eval_fn=lambda: training.evaluate(model, x, y),
            progress=fractions.append,
        )
        assert fractions[-1] == 1.0
        return model[1].weight.detach().clone(), res

    w1, r1 = fit(0)
    w2, r2 = fit(0)
    w3, _ = fit(1)
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert r1.steps == 8 and len(r1.curve) == 2 and len(r1.eval_curve) == 2
    assert r1.curve == r2.curve and math.isfinite(r1.first_grad_norm)
    # Same seed, same batches, whatever the model.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(
        torch.equal(a, b)
        for a, b in zip(training.batch_indices(10, 3, g1), training.batch_indices(10, 3, g2))
    )
    assert [len(i) for i in training.batch_indices(10, 3, g1, drop_last=True)] == [3, 3, 3]
