"""Smoke test of the benchmark command: ``python -m benchmarks --quick`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.timeout(400)]


def test_quick_benchmark_writes_results_charts_and_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--output-dir",
            str(tmp_path),
            "--top",
            str(tmp_path),
        ],
        cwd=ROOT,
        timeout=380,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert "skipped" in data["instructions"]  # callgrind is for the full run, never the suite
    calls = data["call_cost"]["targets"]
    assert set(calls) >= {"official", "segment", "cdpmp-direct", "cdpmp-shared", "cdpmp-sync"}
    short = {name: row["delivered_ratio"] for name, row in calls.items() if name.startswith("cdpmp")}
    assert all(ratio == 1.0 for ratio in short.values()), short
    rows = [row for row in data["load"]["rows"] if row["client"].startswith("cdpmp")]
    assert all(row["delivered_ratio"] == 1.0 for row in rows), rows
    assert {p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("*.png")} == {
        "cost.png",
        "load.png",
        "scaling.png",
        "network.png",
    }
    network = data["network"]
    assert {r["client"] for r in network["sweep"]} == {"official", "cdpmp-direct", "cdpmp-shared"}
    ours = [r for r in network["sweep"] + network["outage"] if r["client"].startswith("cdpmp")]
    assert all(r["delivered_ratio"] == 1.0 and r["duplicates"] == 0 for r in ours), ours
    engine = data["engine"]["placements"]
    assert set(engine) == {"out", "in"} and all(
        set(rows) >= {"official", "direct", "floor"} for rows in engine.values()
    )
    placed = {name: row["delivered_ratio"] for name, row in engine["out"].items() if name != "floor"}
    assert all(ratio == 1.0 for ratio in placed.values()), placed
    assert "## 4. Behind a real network" in (tmp_path / "BENCHMARKS.md").read_text()
    assert "## 1b. The delivery engine" in (tmp_path / "BENCHMARKS.md").read_text()
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Targets" in report and "python -m benchmarks --quick" in report


def test_servers_benchmark_counts_delivery_at_a_graceful_stop() -> None:
    from benchmarks.servers import run, table

    rows = run(["uvicorn"], requests=20, k=2, clients=("official", "shared"))
    assert [r["client"] for r in rows] == ["official", "shared"]
    for row in rows:
        assert row["tracked"] == row["answered"] * 2 == 40
        if row["client"] != "official":  # the official client may lose its last events
            assert (row["delivered"], row["duplicates"]) == (40, 0)
    assert "| uvicorn | shared | 20 | 40 / 40 (100.0%) | 0 |" in table(rows)
