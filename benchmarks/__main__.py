"""``python -m benchmarks [--quick] [--parts call,load,scaling,network,engine,instructions,soak]``: the whole benchmark.

Installs its comparison targets (customerio-cdp-analytics, segment-analytics-python)
and matplotlib if missing, runs the parts, and writes ``benchmarks/results/<date>.json``,
PNG charts beside it and ``BENCHMARKS.md`` at the top level. ``--quick`` (under a
minute) is what the test suite smoke-tests, into a temporary directory. ``--carry
FILE``: the parts not run this time are taken from an earlier run's JSON, and the
report says which, from when (a part's ratios are always from one run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

from benchmarks.common import progress

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARTS = "call,load,scaling,network,engine,instructions"
CARRIED = ("call_cost", "load", "scaling", "network", "engine", "instructions", "soak", "soak_shared")
NEEDED = {
    "customerio": "customerio-cdp-analytics==1.1.0",
    "segment": "segment-analytics-python",
    "matplotlib": "matplotlib",
    "gunicorn": "gunicorn",
}


def install_targets() -> None:
    missing = [spec for module, spec in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        progress(f"installing comparison targets: {' '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True, timeout=900)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small run (under a minute)")
    parser.add_argument(
        "--parts",
        default=DEFAULT_PARTS,
        help="comma-separated: call,load,scaling,network,engine,instructions,soak "
        "(the soak takes --soak-seconds; instructions needs valgrind)",
    )
    parser.add_argument("--carry", type=Path, help="an earlier results JSON for the parts not run now")
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="the soak's length")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--top", type=Path, default=ROOT, help="where BENCHMARKS.md is written")
    parser.add_argument("--reading", type=Path, help="a Markdown file with the reading of this run")
    args = parser.parse_args()
    install_targets()
    parts = set(args.parts.split(","))
    now = dt.datetime.now(dt.timezone.utc)
    from benchmarks.report import machine, write

    results: Dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "stem": now.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": " ".join(
            ["python -m benchmarks"]
            + (["--quick"] if args.quick else [])
            + ([f"--parts {args.parts}"] if args.parts != DEFAULT_PARTS else [])
            + (
                [f"--carry {args.carry.relative_to(ROOT) if args.carry.is_relative_to(ROOT) else args.carry}"]
                if args.carry
                else []
            )
        ),
        "quick": args.quick,
    }
    if "call" in parts:
        from benchmarks import call_cost

        progress("part 1: call cost")
        results["call_cost"] = call_cost.run(quick=args.quick)
    if "load" in parts:
        from benchmarks import load

        progress("part 2: gunicorn under load")
        results["load"] = load.run(quick=args.quick)
    if "scaling" in parts:
        from benchmarks import scaling

        progress("part 3: scaling")
        results["scaling"] = scaling.run(quick=args.quick)
    if "network" in parts:
        from benchmarks import network

        progress("part 4: behind a real network (round trips, outage)")
        results["network"] = network.run(quick=args.quick)
    if "engine" in parts:
        from benchmarks import engine

        progress("part 5: the delivery engine (call cost by endpoint placement)")
        results["engine"] = engine.run(quick=args.quick)
    if "instructions" in parts:
        from benchmarks import instructions

        progress("part 5b: CPU instructions per call and per delivered event (callgrind)")
        results["instructions"] = instructions.run(quick=args.quick)
    if "soak" in parts:
        from benchmarks import soak

        progress("part 6: soak with outages (threads and descriptors), direct mode then shared")
        results["soak"] = soak.run(args.soak_seconds)
        results["soak_shared"] = soak.run(args.soak_seconds, mode="shared")
    if args.carry:
        earlier = json.loads(args.carry.read_text())
        for part in CARRIED:
            if part not in results and part in earlier:
                results[part] = earlier[part]
                when = earlier.get("carried", {}).get(part, earlier["date"])  # carried twice: its own date
                results.setdefault("carried", {})[part] = when
    if args.reading:
        results["reading"] = args.reading.read_text()
    target = write(results, args.output_dir, args.top)
    progress(f"wrote {target} and {args.output_dir}/{results['stem']}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
