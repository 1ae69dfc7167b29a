"""The ``nas`` study (Sandwich BN in a DARTS supernet on digits), in tiny configurations."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import normkit as nk
from normkit.experiments import runner, stats
from normkit.experiments.studies import nas
from normkit.experiments.studies.nas import EDGES, METHODS, OPS, STUDY
from normkit.experiments.study import ConfigError, Run, Study

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

TINY: dict[str, Any] = {
    "warmup_epochs": 1,
    "search_epochs": 1,
    "search_size": 128,
    "batch_size": 32,
    "retrain_epochs": 1,
    "train_size": 128,
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_study_exposes_the_contract() -> None:
    assert isinstance(STUDY, Study)
    assert STUDY.name == "nas"
    assert {(c.better, c.worse, c.metric) for c in STUDY.claims} == {
        ("sabn", "bn", "derived_acc"),
        ("sabn", "ccbn", "derived_acc"),
    }
    assert nas.SPREAD_CLAIMS == (("sabn", "bn"), ("sabn", "ccbn"))


def test_config_quick_is_smaller_json_and_validated() -> None:
    quick, full = STUDY.config(True, {}), STUDY.config(False, {})
    assert set(quick) == set(full)
    assert quick["search_epochs"] < full["search_epochs"]
    assert full["seeds"] >= 5 and full["methods"] == list(METHODS)
    json.dumps(full, allow_nan=False)
    cfg = STUDY.config(False, {"methods": ["sabn", "bn"], "search_epochs": None})
    assert cfg["methods"] == ["bn", "sabn"]
    assert cfg["search_epochs"] == full["search_epochs"]
    for bad, match in [
        ({"epochs": 1}, "--epochs: unknown option"),
        ({"search_epochs": 0}, "--search-epochs"),
        ({"warmup_epochs": -1}, "--warmup-epochs"),
        ({"arch_lr": 0.0}, "--arch-lr"),
        ({"methods": ["gn"]}, "--methods"),
        ({"search_size": 40}, "--search-size"),
        ({"train_size": 5000}, "--train-size"),
    ]:
        with pytest.raises(ConfigError, match=match):
            STUDY.config(False, bad)


def test_norm_index_is_the_mixed_radix_combination_feeding_the_source_node() -> None:
    assert EDGES == ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
    assert [nas.num_indices(j) for j in range(3)] == [1, 4, 16]
    sampled = [2, 3, 1, 0, 0, 0]  # ops of edges 1<-0, 2<-0, 2<-1, 3<-*
    assert nas.norm_index(sampled, 0) == 0
    assert nas.norm_index(sampled, 1) == 2  # op(1 <- 0)
    assert nas.norm_index(sampled, 2) == 3 + 4 * 1  # op(2 <- 0) + 4 * op(2 <- 1)
    # Every combination feeding node 2 gets its own index in range.
    seen = {nas.norm_index([0, a, b, 0, 0, 0], 2) for a in range(4) for b in range(4)}
    assert seen == set(range(16))


def test_each_op_norm_gets_the_index_of_its_source_node() -> None:
    net = nas.SuperNet(4, nas._norm_factory("ccbn", 0))
    received: dict[int, list[int]] = {}

    def record(row: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            received.setdefault(row, []).append(int(args[1]))

        return hook

    for row, edge in enumerate(net.cell1.edges):
        for op in edge.ops:
            if hasattr(op, "norm"):
                assert isinstance(op.norm, nk.CategoricalConditionalBatchNorm2d)
                assert op.norm.num_domains == nas.num_indices(EDGES[row][1])
                op.norm.register_forward_pre_hook(record(row))
    sampled = [[1, 2, 3, 0, 1, 2], [0] * 6]
    net(torch.randn(4, 1, 8, 8), sampled)
    for row, (_, source) in enumerate(EDGES):
        expected = nas.norm_index(sampled[0], source)
        assert received[row] == [expected, expected]  # conv3x3 and conv1x1


@pytest.mark.parametrize("op_index", range(len(OPS)))
def test_mixed_edge_equals_its_single_op_for_one_hot_weights(op_index: int) -> None:
    torch.manual_seed(0)
    edge = nas.MixedEdge(4, nas._norm_factory("sabn", 0), nas.num_indices(1))
    x = torch.randn(6, 4, 8, 8)
    weights = torch.zeros(len(OPS))
    weights[op_index] = 1.0
    out = edge(x, weights, 3)
    expected = nas._apply(edge.ops[op_index], x, 3)
    torch.testing.assert_close(out, expected)
    if OPS[op_index] == "skip":
        torch.testing.assert_close(out, x)


def test_derived_architecture_is_the_argmax_of_every_edge() -> None:
    alpha = torch.randn(len(EDGES), len(OPS))
    alpha[2] = torch.tensor([0.0, 0.0, 5.0, 0.0])
    genotype = nas.derive(alpha)
    assert genotype == alpha.argmax(dim=1).tolist() and genotype[2] == 2
    net = nas.DerivedNet(4, genotype)
    assert [type(e).__name__ for e in net.cell1.edges] == [
        {"conv3x3": "_ConvNorm", "conv1x1": "_ConvNorm", "avgpool": "_Pool", "skip": "_Skip"}[
            OPS[i]
        ]
        for i in genotype
    ]
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert nas.genotype_str([0, 1, 2, 3, 0, 1]).startswith("1<-0:conv3x3|2<-0:conv1x1")


def test_seeds_pair_methods_on_the_same_conv_init_and_alpha() -> None:
    nets = []
    for method in METHODS:
        torch.manual_seed(5)
        nets.append(nas.SuperNet(4, nas._norm_factory(method, 5)))
    for other in nets[1:]:
        torch.testing.assert_close(other.alpha, nets[0].alpha)
        torch.testing.assert_close(other.stem.weight, nets[0].stem.weight)
        torch.testing.assert_close(
            other.cell2.edges[5].ops[0].conv.weight, nets[0].cell2.edges[5].ops[0].conv.weight
        )
        torch.testing.assert_close(other.head.weight, nets[0].head.weight)


def test_pitman_morgan_against_a_hand_computation() -> None:
    from scipy import stats as sps

    better = [0.90, 0.91, 0.92, 0.90, 0.91]
    worse = [0.80, 0.95, 0.70, 0.93, 0.85]
    u = [w + b for b, w in zip(better, worse)]
    v = [w - b for b, w in zip(better, worse)]
    r = float(torch.corrcoef(torch.tensor([u, v], dtype=torch.float64))[0, 1])
    t = r * math.sqrt(3 / (1 - r * r))
    test = nas.pitman_morgan(better, worse)
    assert test["r"] == pytest.approx(r)
    assert test["t"] == pytest.approx(t)
    assert test["p"] == pytest.approx(sps.t.sf(t, 3))
    assert test["p"] + test["p_opposite"] == pytest.approx(1.0)
    assert test["verdict"] == stats.HELD  # the worse side is far more spread out
    assert nas.pitman_morgan(worse, better)["verdict"] == stats.NOT_HELD
    short = nas.pitman_morgan([0.9, 0.8], [0.7, 0.95])
    assert short["verdict"] == stats.INCONCLUSIVE and "at least 3" in short["note"]
    shifted = nas.pitman_morgan(better, [b - 0.1 for b in better])  # same spread
    assert shifted["verdict"] == stats.INCONCLUSIVE and shifted["p"] is None


def test_a_diverged_run_of_the_steadier_side_keeps_the_spread_claim_from_holding() -> None:
    better = [0.90, 0.91, 0.92, 0.90, 0.91, 0.90]
    worse = [0.80, 0.95, 0.70, 0.93, 0.85, 0.75]
    assert nas.pitman_morgan(better, worse)["verdict"] == stats.HELD
    diverged = nas.pitman_morgan([*better[:-1], float("nan")], worse)
    assert diverged["verdict"] == stats.INCONCLUSIVE and diverged["n"] == 5
    assert "non-finite" in diverged["note"] and "not held" in diverged["note"]
    # A diverged run of the worse side is only left out.
    other = nas.pitman_morgan(better, [*worse[:-1], None])
    assert other["verdict"] == stats.HELD and "left out" in other["note"]


def test_a_run_is_deterministic_and_returns_json_metrics() -> None:
    cfg = STUDY.config(True, TINY)
    fractions: list[float] = []
    a = STUDY.run(Run("sabn", nas.SETTING, 1), cfg, fractions.append)
    b = STUDY.run(Run("sabn", nas.SETTING, 1), cfg, lambda f: None)
    assert a == b
    json.dumps(a, allow_nan=False)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert 0.0 <= a["derived_acc"] <= 1.0
    assert 0.0 < a["arch_entropy"] <= math.log(len(OPS)) + 1e-6
    assert len(a["genotype"].split("|")) == len(EDGES)
    assert a["n_conv_ops"] + a["n_skip_ops"] <= len(EDGES)
    assert len(a["curve_search_loss"]) == len(a["curve_arch_entropy"]) == 2


def test_study_end_to_end_through_the_runner(tmp_path: Path) -> None:
    stream = io.StringIO()
    kwargs: dict[str, Any] = {
        "out": tmp_path,
        "quick": True,
        "seeds": 3,
        "overrides": {**TINY, "methods": ["bn", "sabn"]},
        "progress": False,
        "stream": stream,
    }
    results = runner.run_study(STUDY, **kwargs)
    study_dir = tmp_path / "nas"
    saved = json.loads((study_dir / "results.json").read_text())
    assert saved["methods"] == ["bn", "sabn"] and saved["seeds"] == [0, 1, 2]
    assert "derived_acc" in saved["metrics"]
    assert saved["aggregates"]["sabn"]["darts"]["derived_acc"]["n"] == 3
    tests = {(c["text"], c.get("test", "t")) for c in saved["claims"]}
    assert len(saved["claims"]) == 3  # vs BN (t-test), vs BN (spread); no CCBN runs
    assert any(t == "pitman-morgan" for _, t in tests)
    spread = next(c for c in saved["claims"] if c.get("test") == "pitman-morgan")
    assert spread["n"] == 3 and spread["verdict"] in (
        stats.HELD,
        stats.NOT_HELD,
        stats.INCONCLUSIVE,
    )
    ccbn = next(c for c in saved["claims"] if c["worse"]["method"] == "ccbn")
    assert ccbn["verdict"] == stats.NOT_TESTED
    assert results["claims"] == saved["claims"]
    figures = {"nas_derived_acc.png", "nas_spread.png", "nas_ops.png", "nas_search.png"}
    assert set(saved["figures"]) == figures
    for name in figures:
        assert (study_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (study_dir / "report.md").read_text()
    assert "Pitman–Morgan" in report and "derived_acc" in report
    assert "more consistent" in report
    assert len(list((study_dir / "runs").glob("*.json"))) == 6

    # A direct run reproduces the checkpoint; --resume reuses every run.
    key = "sabn__darts__seed2"
    cfg = STUDY.config(True, {**TINY, "methods": ["bn", "sabn"]})
    assert (
        STUDY.run(Run("sabn", nas.SETTING, 2), cfg, lambda f: None)
        == (saved["runs"][key]["metrics"])
    )
    again = runner.run_study(STUDY, resume=True, **kwargs)
    assert again["elapsed_s"]["reused_runs"] == 6
    assert again["aggregates"] == saved["aggregates"]
    assert len(again["claims"]) == 3


def test_figures_skip_unfinished_and_empty_runs(tmp_path: Path) -> None:
    assert STUDY.figures({"runs": {}}, tmp_path) == []
    metrics = {
        "derived_acc": 0.9,
        "genotype": nas.genotype_str([0] * 6),
        "curve_search_loss": [1.0, None],
        "curve_arch_entropy": [1.3, 1.2],
    }
    runs = {
        f"k{s}": {"run": {"method": "bn", "setting": "darts", "seed": s}, "metrics": m}
        for s, m in enumerate([metrics, {**metrics, "derived_acc": None}, None])
    }
    paths = STUDY.figures({"runs": runs}, tmp_path)
    assert paths and all(p.exists() for p in paths)
