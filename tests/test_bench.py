"""``normkit bench``: the output format on a tiny shape (never a time), the memory count, the
interleaving and median logic on a fake clock, target matching, and option errors."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import normkit as nk
from normkit import bench, cli

TINY = "2x8x4x4"
FAST = ["--repeats", "2", "--warmup", "1", "--min-time", "0.05", "--device", "cpu"]

ROW_TYPES: dict[str, Any] = {
    "layer": str,
    "candidate": str,
    "baseline": str,
    "device": str,
    "shape": list,
    "dtype": str,
    "format": str,
    "mode": str,
    "pass": str,
    "baseline_ms": float,
    "candidate_ms": float,
    "ratio": float,
    "ratio_q25": float,
    "ratio_q75": float,
    "ratios": list,
    "iters": int,
    "repeats": int,
    "targets": list,
}


def _table_rows(table: str) -> list[list[str]]:
    """The cells of each row of the table (between the dashed rule and the first blank line)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        if not line.startswith(" "):  # an error line is indented under its row
            rows.append(line.split())
    return rows


def test_cli_bench_smoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "out" / "bench.json"
    argv = ["bench", "--layers", ",".join(bench.CASES), "--shapes", TINY]
    argv += ["--dtypes", "float32,bfloat16", "--formats", "contiguous,channels_last"]
    assert cli.main([*argv, *FAST, "--json", str(path)]) == 0
    table = capsys.readouterr().out

    header = table.splitlines()[2].split()
    assert header[:8] == ["layer", "device", "shape", "dtype", "format", "mode", "pass", "base"]
    assert header[-2:] == ["target", "met"] and "mem×" in header
    assert bench.MEMORY_NOTE in table

    expected = {
        (key, "cpu", "2x3x4x4" if case.kind == "model" else TINY, dtype, fmt, "eager", pass_)
        for key, case in bench.CASES.items()
        for dtype in ("float32", "bfloat16")
        for fmt in ("contiguous", "channels_last")
        for pass_ in case.passes
    }
    rows = _table_rows(table)
    assert len(rows) == len(expected)
    assert {tuple(cells[:7]) for cells in rows} == expected
    for cells in rows:
        assert "error" not in cells, cells

    data = json.loads(path.read_text())
    assert data["schema"] == bench.SCHEMA
    machine = data["machine"]
    assert isinstance(machine["torch"], str) and isinstance(machine["cpu"], str)
    assert isinstance(machine["threads"], int) and machine["threads"] >= 1
    assert machine["devices"]["cpu"] == machine["cpu"]
    assert data["config"]["shapes"] == [[2, 8, 4, 4]]
    assert data["config"]["num_domains"] == bench.NUM_DOMAINS
    assert {t["layer"] for t in data["targets"]} <= set(bench.CASES)
    assert len(data["rows"]) == len(expected)
    seen = set()
    for row in data["rows"]:
        assert row["error"] is None, row
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (key, row)
        for key in ("baseline_ms", "candidate_ms", "ratio", "ratio_q25", "ratio_q75"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["ratio_q25"] <= row["ratio"] <= row["ratio_q75"]
        assert row["repeats"] == 2 == len(row["ratios"])
        assert all(r > 0 and math.isfinite(r) for r in row["ratios"])
        case = bench.CASES[row["layer"]]
        if case.train:
            memory = row["memory"]
            assert memory["baseline_bytes"] > 0 and memory["candidate_bytes"] > 0
            assert math.isfinite(memory["ratio"]) and memory["ratio"] > 0
        else:
            assert row["memory"] is None
        assert row["peak"] is None  # CPU only
        for check in row["targets"]:
            assert check["metric"] in ("time", "memory")
            assert isinstance(check["met"], bool)
            assert check["met"] == (check["value"] <= check["limit"])
        shape = row["shape"]
        assert all(isinstance(d, int) for d in shape)
        seen.add((row["layer"], row["device"], "x".join(map(str, shape)), row["dtype"]))
    assert len(seen) == len({e[:4] for e in expected})
    # A float32 batch-2 SaBN fwd+bwd row has both of its targets, whatever their outcome.
    sabn = next(
        r
        for r in data["rows"]
        if r["layer"] == "sabn" and r["dtype"] == "float32" and r["pass"] == "fwd+bwd"
    )
    assert sorted(t["metric"] for t in sabn["targets"]) == ["memory", "time"]


def test_json_holds_the_rows_so_far_when_the_run_is_stopped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--json`` is rewritten after every group of rows, so a run stopped early (a time limit,
    Ctrl-C) leaves the rows it measured, marked incomplete; a finished run is marked complete."""
    path = tmp_path / "bench.json"
    argv = ["bench", "--layers", "sabn,wsconv,frn", "--shapes", TINY, "--formats", "contiguous"]
    assert cli.main([*argv, *FAST, "--json", str(path)]) == 0
    capsys.readouterr()
    finished = json.loads(path.read_text())
    assert finished["complete"] is True
    layers = [r["layer"] for r in finished["rows"]]
    assert list(dict.fromkeys(layers)) == ["sabn", "wsconv", "frn"]

    rows_for = bench._rows_for
    groups = []

    def stop_at_the_third(*args: Any) -> list[bench.Row]:
        groups.append(args[0].key)
        if len(groups) == 3:
            raise KeyboardInterrupt
        return rows_for(*args)

    monkeypatch.setattr(bench, "_rows_for", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv, *FAST, "--json", str(path)])
    partial = json.loads(path.read_text())
    assert partial["complete"] is False
    done = [layer for layer in layers if layer != "frn"]
    assert [r["layer"] for r in partial["rows"]] == done
    assert all(r["error"] is None and r["ratio"] > 0 for r in partial["rows"])
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no scratch file left


def test_kernels_option_runs_the_layers_through_the_kernels(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--kernels`` builds the kernels before the run, routes the layers through them for the
    run only, and says so in the table and the JSON; the steady-malloc setting is reported."""
    from normkit import kernels
    from normkit.layers import core
    from tests.counting import count_calls

    calls = count_calls(
        monkeypatch, core._BatchNormCore, "_kernel_call", when=lambda y: y is not None
    )
    path = tmp_path / "k.json"
    argv = ["bench", "--kernels", "--layers", "sabn,bcn", "--shapes", TINY, *FAST]
    assert cli.main([*argv, "--formats", "contiguous", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "normkit kernels: on" in table.splitlines()[0]
    assert calls  # the SaBN rows ran the kernel
    assert not kernels.is_enabled()  # off again after the run
    data = json.loads(path.read_text())
    assert data["config"]["kernels"] is True and data["machine"]["kernels"] is True
    assert data["config"]["steady_malloc"] is True
    assert isinstance(data["machine"]["steady_malloc"], bool)
    assert all(row["error"] is None for row in data["rows"])

    assert cli.main(["bench", "--system-malloc", "--layers", "sabn", "--shapes", TINY, *FAST,
                     "--formats", "contiguous", "--json", str(path)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "normkit kernels: off, steady malloc: off" in table.splitlines()[0]
    assert json.loads(path.read_text())["config"]["steady_malloc"] is False


def test_script_runs_the_same_benchmark(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    argv = [str(script), "--layers", "ccbn", "--shapes", TINY, "--formats", "contiguous"]
    monkeypatch.setattr(sys, "argv", [*argv, "--dtypes", "float32", *FAST])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    assert exc.value.code == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [cells[0] for cells in rows] == ["ccbn", "ccbn"]
    assert [cells[6] for cells in rows] == ["fwd", "fwd+bwd"]


def test_compile_failure_is_recorded_in_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(module: torch.nn.Module, **kwargs: Any) -> Any:
        def call(*args: Any) -> Any:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    config = bench.BenchConfig(
        cases=("bcn",), shapes=((2, 8, 4, 4),), formats=("contiguous",), modes=("compile",)
    )
    rng = torch.get_rng_state()
    result = bench.run(config)
    assert torch.equal(torch.get_rng_state(), rng)  # inputs come from a forked generator
    assert [row.pass_ for row in result.rows] == ["fwd", "fwd+bwd"]
    for row in result.rows:
        assert row.error == "RuntimeError: InvalidCxxCompiler: no working C++ compiler found"
        assert row.summary is None and row.memory is None
    table = bench.format_table(result)
    assert "error: RuntimeError: InvalidCxxCompiler" in table
    data = bench.to_json(result)
    assert [row["ratio"] for row in data["rows"]] == [None, None]
    json.dumps(data, allow_nan=False)


class _SaveBig(torch.autograd.Function):
    """Saves a 1000-element float32 tensor (4000 bytes) twice and returns a 1-element output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        big = torch.ones(1000)
        ctx.save_for_backward(big, big[:10])
        return x.sum().reshape(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.expand(3)


def test_saved_tensor_bytes_counts_unique_saved_storages_and_the_output() -> None:
    x = torch.randn(3, requires_grad=True)
    assert bench.saved_tensor_bytes(lambda: _SaveBig.apply(x)) == 4000 + 4
    # sin saves its input: 12 bytes, plus a 12-byte output.
    assert bench.saved_tensor_bytes(lambda: torch.sin(x)) == 24
    with torch.no_grad():
        assert bench.saved_tensor_bytes(lambda: torch.sin(x)) == 12


def test_saved_tensor_bytes_leaves_out_the_modules_state() -> None:
    """A conv saves its weight (a parameter, alive anyway: not counted); a WS conv saves the
    standardized weight it derives (an extra tensor: counted). The bench passes each side's
    parameters and buffers."""
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
    ws = nk.WSConv2d(4, 4, 3, padding=1, bias=False)
    state = [*conv.parameters()]
    weight_bytes = conv.weight.numel() * 4
    input_and_output = 2 * x.numel() * 4
    assert bench.saved_tensor_bytes(lambda: conv(x)) == input_and_output + weight_bytes
    assert bench.saved_tensor_bytes(lambda: conv(x), state) == input_and_output
    ws_bytes = bench.saved_tensor_bytes(lambda: ws(x), [*ws.parameters()])
    assert ws_bytes >= input_and_output + weight_bytes  # the standardized weight counts


def test_time_pair_interleaves_and_takes_per_call_times() -> None:
    now = [0.0]
    calls: list[str] = []
    costs = {"b": [1.0, 1.0, 4.0, 1.0], "c": [2.0, 3.0, 4.0, 2.0]}  # seconds per call, by repeat

    def side(name: str) -> Any:
        def fn() -> None:
            repeat = sum(1 for c in calls if c == name) // 2
            calls.append(name)
            now[0] += costs[name][repeat]

        return fn

    timing = bench.time_pair(
        side("b"), side("c"), repeats=4, iters=2, clock=lambda: now[0], sync=lambda: None
    )
    assert "".join(calls) == "bbcc" + "ccbb" + "bbcc" + "ccbb"
    assert timing.baseline == (1.0, 1.0, 4.0, 1.0)
    assert timing.candidate == (2.0, 3.0, 4.0, 2.0)
    assert timing.ratios == (2.0, 3.0, 1.0, 2.0)
    summary = bench.summarize(timing)
    assert summary.baseline_ms == pytest.approx(1000.0)
    assert summary.candidate_ms == pytest.approx(2500.0)
    assert summary.ratio == pytest.approx(2.0)
    assert (summary.ratio_q25, summary.ratio_q75) == pytest.approx((1.75, 2.25))


def test_quantile_matches_linear_interpolation() -> None:
    assert bench.quantile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0
    assert bench.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.25) == 2.0
    assert bench.quantile([1.0, 2.0], 0.75) == 1.75
    assert bench.quantile([7.0], 0.25) == 7.0


@pytest.mark.parametrize(
    ("case", "shape", "pass_", "dtype", "expected"),
    [
        ("wsconv", (32, 64, 32, 32), "fwd+bwd", "float32", {("time", 1.05)}),
        ("wsconv", (8, 64, 32, 32), "fwd+bwd", "float32", set()),
        ("wsconv-eval", (1, 64, 32, 32), "fwd", "float32", {("time", 1.01)}),
        ("bcn", (8, 256, 16, 16), "fwd+bwd", "float32", {("time", 1.40), ("memory", 1.10)}),
        ("bcn", (1, 64, 32, 32), "fwd+bwd", "float32", {("memory", 1.10)}),
        ("bcn-est", (2, 512, 8, 8), "fwd+bwd", "float32", {("time", 1.20)}),
        ("sabn", (32, 64, 32, 32), "fwd+bwd", "bfloat16", set()),
        ("sabn", (32, 64, 32, 32), "fwd", "float32", set()),
        ("resnet20-fixup", (32, 3, 32, 32), "step", "float32", {("time", 0.85)}),
    ],
)
def test_targets_apply_to_their_rows(
    case: str, shape: tuple[int, ...], pass_: str, dtype: str, expected: set[tuple[str, float]]
) -> None:
    row = bench.Row(case, "cpu", shape, dtype, "contiguous", "eager", pass_)
    assert {(t.metric, t.limit) for t in bench.TARGETS if t.applies(row)} == expected


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--layers", "sabn,nope", "unknown layers nope"),
        ("--shapes", "2x8x4", "expected shapes NxCxHxW"),
        ("--dtypes", "int8", "unknown dtypes int8"),
        ("--modes", "jit", "unknown modes jit"),
        ("--repeats", "0", "expected a positive number"),
        ("--device", "tpu", "expected cpu or cuda"),
    ],
)
def test_bad_options_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("normkit: error: bench: ") and err.count("\n") == 1, err
    assert message in err


def test_unwritable_json_path_fails_before_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--quick", "--json", str(tmp_path)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"normkit: error: bench: --json: {tmp_path} is a directory\n"
    assert captured.out == ""


def _fake_row(layer: str, ratio: float, memory: float) -> dict[str, Any]:
    return {
        "layer": layer,
        "device": "cpu",
        "shape": [2, 8, 4, 4],
        "dtype": "float32",
        "format": "contiguous",
        "mode": "eager",
        "pass": "fwd+bwd",
        "baseline_ms": 1.0,
        "candidate_ms": ratio,
        "ratio": ratio,
        "memory": {"ratio": memory},
        "targets": [
            {"metric": "time", "limit": 1.1, "value": ratio, "met": ratio <= 1.1},
            {"metric": "memory", "limit": 1.1, "value": memory, "met": memory <= 1.1},
        ],
    }


def test_combine_reports_the_median_over_runs_and_judges_targets_by_it() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "combine.py"
    combine = runpy.run_path(str(script))["combine"]
    runs = [{"rows": [_fake_row("sabn", r, 1.0)]} for r in (0.9, 1.3, 1.0)]
    text = combine(runs)
    lines = text.splitlines()
    time_line = next(line for line in lines if line.startswith("| ≤ 1.10 | sabn"))
    # The median run (1.00) decides, not the best (0.90) or the worst (1.30).
    assert "| 1.00 | 0.90–1.30 | yes |" in time_line
    assert "Targets met: 2 of 2 checks" in text
    runs = [{"rows": [_fake_row("sabn", r, 1.0)]} for r in (0.9, 1.3, 1.2)]
    assert "Targets met: 1 of 2 checks" in combine(runs)
    row_line = next(line for line in lines if line.startswith("| sabn | 2x8x4x4"))
    assert row_line.split("|")[9].strip() == "1.00"  # the ratio column
    # A run whose row failed has no target checks: the other runs still judge the row.
    failed = {**_fake_row("sabn", 1.0, 1.0), "ratio": None, "memory": None, "targets": []}
    runs = [{"rows": [failed]}] + [{"rows": [_fake_row("sabn", r, 1.0)]} for r in (1.0, 1.2)]
    text = combine(runs)
    assert "Targets met: 2 of 2 checks" in text  # (the old reading dropped both: 0 of 0)
    time_line = next(line for line in text.splitlines() if line.startswith("| ≤ 1.10 | sabn"))
    assert "| 1.10 | 1.00–1.20 | yes |" in time_line
