"""Turn one benchmark run into ``results/<date>.json``, charts and ``BENCHMARKS.md``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


def machine() -> Dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def targets(results: Dict[str, Any]) -> List[Tuple[str, str, bool]]:
    """(target, measured, met) for each target of the benchmark issue that this run covers."""
    out: List[Tuple[str, str, bool]] = []
    call = results.get("call_cost", {}).get("targets")
    if call:
        shared = call["cdpmp-shared"]["caller_ratio"]
        out.append(("caller cost of track(), shared ≤ 0.25× official", f"{shared:.2f}×", shared <= 0.25))
        for mode in ("cdpmp-direct", "cdpmp-shared"):
            ratio = call[mode]["cpu_ratio"]
            out.append((f"CPU per delivered event, {mode} ≤ 0.25× official", f"{ratio:.2f}×", ratio <= 0.25))
    memory = results.get("call_cost", {}).get("memory", {}).get("cdpmp-shared")
    if memory:
        per = memory["ring_bytes_per_event"]
        out.append(("queued-event memory, shared ≤ 700 B/event host-wide", f"{per:.0f} B", per <= 700))
    load = results.get("load")
    if load:
        by = {(r["shape"], r["k"], r["client"]): r for r in load["rows"]}
        for (shape, k, client), row in sorted(by.items()):
            if client == "cdpmp-shared" and k == 1:
                off = by[(shape, k, "off")]["rps"]
                share = row["rps"] / off
                out.append(
                    (
                        f"gunicorn {shape} K=1: shared throughput ≥ 97 % of analytics-off",
                        f"{share:.1%}",
                        share >= 0.97,
                    )
                )
        low = {r["client"]: r for r in load.get("low_rate", [])}
        if low:
            direct = low["cdpmp-direct"]["http_requests_per_1000_events"]
            shared_requests = low["cdpmp-shared"]["http_requests_per_1000_events"]
            ratio = shared_requests / direct if direct else 0.0
            out.append(
                (
                    "8 workers at low rate: shared ≤ 1/8 of direct's HTTP requests",
                    f"{ratio:.3f}",
                    ratio <= 1 / 8,
                )
            )
        ratios = [
            r["delivered_ratio"]
            for r in load["rows"] + load.get("low_rate", [])
            if r["client"].startswith("cdpmp")
        ]
        out.append(
            (
                "delivered ÷ tracked = 1.0 for cdpmp in every scenario",
                f"min {min(ratios):.4f}",
                min(ratios) == 1.0,
            )
        )
    out += _network_targets(results.get("network"))
    out += _engine_targets(results.get("engine"))
    out += _instruction_targets(results.get("instructions"))
    return out


def _instruction_targets(counted: Optional[Dict[str, Any]]) -> List[Tuple[str, str, bool]]:
    """CPU instructions (callgrind, N calls minus 0): ≤ 0.15× official per call and per
    delivered event."""
    ratios = (counted or {}).get("ratios", {})
    names = {"cdpmp-call": "track(send=False)", "cdpmp-delivered": "delivered event, direct"}
    return [
        (f"instructions per {label} ≤ 0.15× official", f"{ratios[key]:.3f}×", ratios[key] <= 0.15)
        for key, label in names.items()
        if key in ratios
    ]


def _engine_targets(engine: Optional[Dict[str, Any]]) -> List[Tuple[str, str, bool]]:
    """The delivery engine's targets: caller cost ≤ 0.25× official in every cell (both
    endpoint placements), direct within 1.5× of its own ``send=False``, CPU ≤ 0.25×."""
    out: List[Tuple[str, str, bool]] = []
    for placement, rows in (engine or {}).get("placements", {}).items():
        where = "endpoint in another process" if placement == "out" else "endpoint in the caller's process"
        for name in ("direct", "shared", "sync"):
            ratio = rows[name]["burst_ratio"]
            out.append((f"{where}: {name} track() burst ≤ 0.25× official", f"{ratio:.2f}×", ratio <= 0.25))
        floor = rows["direct"]["burst_us"] / rows["floor"]["burst_us"]
        out.append((f"{where}: direct within 1.5× of send=False", f"{floor:.2f}×", floor <= 1.5))
        for name in ("direct", "shared"):
            paced = rows[name].get("p50_ratio")
            if paced is not None:
                out.append(
                    (f"{where}: {name} track() paced p50 ≤ 0.25× official", f"{paced:.2f}×", paced <= 0.25)
                )
        if placement == "out":
            for name in ("direct", "shared"):
                cpu = rows[name]["cpu_ratio"]
                out.append((f"{where}: CPU per event, {name} ≤ 0.25× official", f"{cpu:.2f}×", cpu <= 0.25))
            direct = rows["direct"]
            if "wakes_per_batch" in direct:
                wakes, threads = direct["wakes_per_batch"], direct["threads_paced"]
                out.append(
                    (f"{where}: direct, paced: sender wakes per batch ≤ 3", f"{wakes:.1f}", wakes <= 3)
                )
                out.append((f"{where}: direct, paced: threads ≤ 2", f"{threads}", threads <= 2))
    return out


def _network_targets(network: Optional[Dict[str, Any]]) -> List[Tuple[str, str, bool]]:
    if not network:
        return []
    out: List[Tuple[str, str, bool]] = []
    shared = [r for r in network["throughput"] if r["client"] == "cdpmp-shared"]
    if shared:
        eps = shared[0]["sustained_eps"]
        out.append(
            ("100 ms round trip: shared sustains ≥ 8,000 events/s host-wide", f"{eps:.0f}/s", eps >= 8000)
        )
    for row in network["sweep"]:
        if row["rtt_ms"] == 100 and row["client"].startswith("cdpmp"):
            p99 = row["ack_p99_ms"] or 0.0
            out.append(
                (
                    f"100 ms round trip, {row['client']}: p99 track→ack ≤ upload_interval + 3 round trips (800 ms)",
                    f"{p99:.0f} ms",
                    p99 <= 800,
                )
            )
    lost = [r for r in network["outage"] if r["client"].startswith("cdpmp")]
    if lost:
        worst = min(r["delivered_ratio"] for r in lost)
        out.append(
            (
                f"{lost[0]['outage_s']:.0f} s outage: nothing lost, direct and shared",
                f"min {worst:.4f}",
                worst == 1.0,
            )
        )
    return out


def charts(results: Dict[str, Any], directory: Path, stem: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    call = results.get("call_cost", {}).get("targets")
    if call:
        names = [n for n in call if n != "cdpmp-sync"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = range(len(names))
        ax.bar(
            [i - 0.2 for i in x],
            [call[n]["caller_us_median"] for n in names],
            0.4,
            label="caller µs / track()",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [call[n]["cpu_us_per_event"] for n in names],
            0.4,
            label="CPU µs / delivered event (all processes)",
        )
        ax.set_xticks(list(x), names)
        ax.set_ylabel("µs")
        ax.legend()
        ax.set_title("Cost of one track() call")
        fig.tight_layout()
        path = directory / f"{stem}-call-cost.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    load = results.get("load")
    if load:
        shapes = sorted({r["shape"] for r in load["rows"]})
        clients = ["off", "official", "cdpmp-direct", "cdpmp-shared"]
        ks = sorted({r["k"] for r in load["rows"]})
        fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 3.5), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for j, client in enumerate(clients):
                values = [
                    next(
                        (
                            r["rps"]
                            for r in load["rows"]
                            if r["shape"] == s and r["k"] == k and r["client"] == client
                        ),
                        0,
                    )
                    for s in shapes
                ]
                ax.bar([i + (j - 1.5) * 0.2 for i in range(len(shapes))], values, 0.2, label=client)
            ax.set_xticks(list(range(len(shapes))), shapes)
            ax.set_title(f"gunicorn requests/s, K={k} events per request")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = directory / f"{stem}-load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    scaling = results.get("scaling")
    if scaling:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        rows = scaling["producers"]
        left.plot(
            [r["producers"] for r in rows], [r["put_us_median"] for r in rows], marker="o", label="µs / put"
        )
        left.set_xlabel("producer processes on one ring")
        left.set_ylabel("caller µs per track()")
        twin = left.twinx()
        twin.plot(
            [r["producers"] for r in rows],
            [r["throughput_eps"] / 1000 for r in rows],
            marker="s",
            color="tab:orange",
            label="k events/s",
        )
        twin.set_ylabel("enqueued k events/s (all producers)")
        left.set_title("Shared mode: producers on one ring")
        sizes = scaling["sizes"]
        for target in ("official", "cdpmp-direct", "cdpmp-shared"):
            right.plot([r["size_kb"] for r in sizes], [r[target] for r in sizes], marker="o", label=target)
        right.set_xlabel("event size (KB)")
        right.set_ylabel("caller µs per track()")
        right.set_title("Cost by event size")
        right.legend()
        fig.tight_layout()
        path = directory / f"{stem}-scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    network = results.get("network")
    if network:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        for client in ("official", "cdpmp-direct", "cdpmp-shared"):
            rows = [r for r in network["sweep"] if r["client"] == client]
            rtts = [r["rtt_ms"] for r in rows]
            left.plot(rtts, [r["ack_p99_ms"] or 0 for r in rows], marker="o", label=client)
            right.plot(rtts, [r["cpu_ms_per_1000"] or 0 for r in rows], marker="o", label=client)
        left.set_xlabel("round trip (ms)")
        left.set_ylabel("p99 track() → acknowledgement (ms)")
        left.set_title("Time to acknowledgement")
        left.legend(fontsize=7)
        right.set_xlabel("round trip (ms)")
        right.set_ylabel("CPU ms per 1000 delivered events")
        right.set_title("CPU (workers + uploader)")
        fig.tight_layout()
        path = directory / f"{stem}-network.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    return made


def markdown(results: Dict[str, Any], chart_files: List[str], chart_dir: str) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Run {results['date']} on {m['cpus']} CPUs ({m['cpu_model'] or 'unknown model'}), Python {m['python']}, "
        f"{m['platform']}.",
        "",
        f"Command: `{results['command']}` (regenerates this file; raw numbers in "
        f"`benchmarks/results/{results['stem']}.json`). Ratios compare with customerio-cdp-analytics 1.1.0 "
        "measured in the same run: these machines are shared and noisy, so absolute numbers move between runs.",
        "",
    ]
    carried = results.get("carried")
    if carried:
        parts = ", ".join(f"{part} ({date})" for part, date in carried.items())
        lines += [f"Not re-run here, carried from earlier runs with their own ratios: {parts}.", ""]
    lines += [
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in targets(results)]
    call = results.get("call_cost")
    if call:
        lines += [
            "",
            "## 1. Call cost (fresh processes, median of chunks, "
            f"{call['reps']} repetitions × {call['events_per_rep']} events)",
            "",
            "| client | caller µs/track() | spread | × official | CPU µs/delivered event | × official | delivered |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in call["targets"].items():
            lines.append(
                f"| {name} | {row['caller_us_median']:.2f} | {row['caller_us_spread'][0]:.2f}–"
                f"{row['caller_us_spread'][1]:.2f} | {row['caller_ratio']:.2f} | {row['cpu_us_per_event']:.1f} | "
                f"{row['cpu_ratio']:.2f} | {row['delivered_ratio']:.3f} |"
            )
        lines += [
            "",
            "Memory per queued event while the endpoint stalls:",
            "",
            "| client | producer RSS growth B/event | ring B/event (host-wide) |",
            "|---|---|---|",
        ]
        for name, row in call["memory"].items():
            lines.append(
                f"| {name} | {row['producer_rss_bytes_per_event']:.0f} | "
                f"{_fmt(row.get('ring_bytes_per_event'), '.0f')} |"
            )
        lines.append("")
        lines.append(
            "In shared mode the producer's RSS growth *is* the ring's pages (a shared mapping); the "
            "ring column is the host-wide cost."
        )
    if results.get("engine"):
        from benchmarks import engine as engine_bench

        lines += ["", "## 1b. The delivery engine: call cost, paced latency, threads, in flight"]
        lines += engine_bench.markdown(results["engine"]).splitlines()
    counted = results.get("instructions")
    if counted and "instructions" in counted:
        from benchmarks import instructions as instruction_bench

        lines += [
            "",
            f"## 1a. CPU instructions (callgrind: {counted['calls']} calls minus 0, fresh processes)",
            "",
            "Repeatable where timings are not (DESIGN.md §9); kernel time and lock waits are not "
            "in them. `call`: `track()` with `send=False`; `delivered`: per event received by the "
            "collector in another process, sender threads included (shared: the producer only).",
            "",
        ]
        lines += instruction_bench.table(counted["instructions"]).splitlines()
    if results.get("soak"):
        from benchmarks import soak

        lines += ["", "## 1c. Soak with outages: threads and descriptors per worker", ""]
        lines += soak.markdown(results["soak"]).splitlines()
        if results.get("soak_shared"):
            lines += ["", "Shared mode, the uploader sending for the four workers:", ""]
            lines += soak.markdown(results["soak_shared"]).splitlines()
    load = results.get("load")
    if load:
        lines += [
            "",
            f"## 2. Under load: gunicorn, load generator in its own process "
            f"(concurrency {load['concurrency']}, {load['duration_s']} s per run, median of "
            f"{load.get('repetitions', 1)} interleaved runs per cell)",
            "",
            "| server | K | client | req/s (range) | p50 ms | p99 ms | delivered ÷ tracked | HTTP req / 1000 events "
            "| CPU s / 1000 events | RSS MB | PSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in load["rows"] + load.get("low_rate", []):
            spread = r.get("rps_spread")
            rps = f"{r['rps']:.0f}"
            if spread and spread[0] != spread[1]:
                rps += f" ({spread[0]:.0f}–{spread[1]:.0f})"
            lines.append(
                f"| {r['shape']} | {r['k']} | {r['client']} | {rps} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {_fmt(r['delivered_ratio'], '.4f')} | "
                f"{_fmt(r['http_requests_per_1000_events'], '.1f')} | {_fmt(r['cpu_s_per_1000_events'], '.3f')} | "
                f"{r['rss_mb']:.0f} | {r['pss_mb']:.0f} |"
            )
        lines.append("")
        lines.append("The last two rows are the low-rate scenario: 8 sync workers, 40 requests/s in all.")
    scaling = results.get("scaling")
    if scaling:
        lines += [
            "",
            "## 3. Scaling",
            "",
            "| producers on one ring | µs per put (median) | events/s enqueued | rejected |",
            "|---|---|---|---|",
        ]
        for r in scaling["producers"]:
            lines.append(
                f"| {r['producers']} | {r['put_us_median']:.2f} | {r['throughput_eps']:.0f} | {r['rejected']} |"
            )
        lines += [
            "",
            "| event size KB | official µs | cdpmp direct µs | cdpmp shared µs |",
            "|---|---|---|---|",
        ]
        for r in scaling["sizes"]:
            lines.append(
                f"| {r['size_kb']} | {r['official']:.1f} | {r['cdpmp-direct']:.1f} | {r['cdpmp-shared']:.1f} |"
            )
    lines += _network_section(results.get("network"))
    if chart_files:
        lines += ["", "## Charts", ""] + [f"![{name}]({chart_dir}/{name})" for name in chart_files]
    reading = results.get("reading")
    if reading:
        lines += ["", "## Reading", "", reading]
    return "\n".join(lines) + "\n"


def _network_section(network: Optional[Dict[str, Any]]) -> List[str]:
    if not network:
        return []
    lines = [
        "",
        "## 4. Behind a real network",
        "",
        "The collector answers each request after a fixed round trip; worker processes track at a fixed "
        "rate, then flush. Sustained = unique events delivered ÷ (first track() → last acknowledgement). "
        "Ack times: track() to the moment the acknowledging answer left the collector.",
        "",
        "| scenario | client | RTT ms | offered ev/s | delivered ÷ tracked | dup | sustained ev/s | "
        "ack p50 ms | ack p99 ms | HTTP requests | peak in flight | CPU ms / 1000 ev |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = (
        ("round trip", network["sweep"]),
        ("throughput", network["throughput"]),
        ("outage", network["outage"]),
    )
    for name, rows in groups:
        for r in rows:
            label = f"outage {r['outage_s']:.0f} s" if name == "outage" else name
            lines.append(
                f"| {label} | {r['client']} | {r['rtt_ms']} | {r['offered_eps']:.0f} | {r['delivered_ratio']:.4f} | "
                f"{r['duplicates']} | {r['sustained_eps']:.0f} | {_fmt(r['ack_p50_ms'], '.0f')} | "
                f"{_fmt(r['ack_p99_ms'], '.0f')} | {r['http_requests']} | {r['peak_concurrency']} | "
                f"{_fmt(r['cpu_ms_per_1000'], '.0f')} |"
            )
    idle = network.get("idle")
    if idle:
        lines += [
            "",
            f"Idle host, shared mode (one live producer, nothing to send, {idle['seconds']:.0f} s): uploader "
            f"{idle['uploader_cpu_pct']:.2f} % of a core, {idle['requests_per_min']:.1f} HTTP requests per minute.",
        ]
    return lines


def write(results: Dict[str, Any], output: Path, top: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    stem = results["stem"]
    (output / f"{stem}.json").write_text(json.dumps(results, indent=2))
    made = charts(results, output, stem)
    chart_dir = os.path.relpath(output, top)
    target = top / "BENCHMARKS.md"
    target.write_text(markdown(results, made, chart_dir))
    return target
