"""``cdpmp import``: the real command against the collector in strict mode with the
API's rate limit on, killed and interrupted part-way and run again, every row counted
by messageId (delivered once; repeats only from the batches after the checkpoint at
the kill), every bad row named by its line in the rejects file."""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest

from cdpmp.backfill import import_files
from cdpmp.backfill._rows import derive_id
from cdpmp.testing import Collector, Conditions, Outage

pytestmark = pytest.mark.timeout(180)


def _refuse(message: Dict[str, Any]) -> Optional[str]:
    return (
        "properties.plan is not allowed" if message.get("properties", {}).get("plan") == "forbidden" else None
    )


def write_rows(path: Path, rows: int) -> Tuple[Set[str], Dict[int, str]]:
    """A JSON Lines file with bad rows among good ones: the ids every good row must
    arrive under, and each bad row's line with the words its reason must contain."""
    good: Set[str] = set()
    bad: Dict[int, str] = {}
    with open(path, "wb") as out:
        for line in range(1, rows + 1):
            if line % 997 == 0:
                out.write(b"{not json\n")
                bad[line] = "not JSON"
                continue
            row: Dict[str, Any] = {"type": "track", "event": "Order Completed", "userId": f"u{line % 311}",
                                   "timestamp": "2024-03-01T12:00:00Z", "properties": {"n": line}}  # fmt: skip
            if line % 1499 == 0:
                del row["userId"]
                bad[line] = "userId or anonymousId required"
            elif line % 2503 == 0:
                row["properties"]["blob"] = "x" * 40_000
                bad[line] = "over 32768"
            elif line % 3001 == 0:
                row["properties"]["plan"] = "forbidden"
                bad[line] = "refused by the API"
            if line % 2 == 0:
                row["messageId"] = f"m-{line}"
            raw = json.dumps(row).encode()
            out.write(raw + b"\n")
            if line not in bad:
                good.add(row.get("messageId") or derive_id(str(path), line, raw + b"\n"))
    return good, bad


def cdpmp_import(collector: Collector, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(CDP_WRITE_KEY=collector.write_key, CDP_ENDPOINT=collector.url)
    return subprocess.Popen(
        [sys.executable, "-m", "cdpmp", "import", *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> Tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def wait_checkpoint(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and json.loads(path.read_text())["line"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError(
        f"no checkpoint while it ran: {proc.poll()} {proc.stderr.read() if proc.stderr else ''}"
    )


def assert_rejects(path: Path, bad: Dict[int, str]) -> None:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["line"] for e in lines] == sorted(bad)  # each once, in line order
    for entry in lines:
        assert bad[entry["line"]] in entry["reason"], entry


def assert_delivered_once_after(collector: Collector, good: Set[str], line_at_kill: int) -> None:
    ids = collector.message_ids()
    assert set(ids) == good, (len(set(ids)), len(good))
    counts: Dict[str, int] = {}
    for mid in ids:
        counts[mid] = counts.get(mid, 0) + 1
    repeated = {mid for mid, n in counts.items() if n > 1}
    # Repeats only of rows after the checkpoint at the kill (the batches in flight).
    lines = {mid: n for n, mid in _ids_by_line(collector).items()}
    assert all(lines[mid] > line_at_kill for mid in repeated), sorted(lines[m] for m in repeated)[:5]
    assert all(n <= 2 for n in counts.values())


def _ids_by_line(collector: Collector) -> Dict[int, str]:
    return {m["properties"]["n"]: m["messageId"] for m in collector.messages}


@pytest.mark.servers
def test_a_killed_import_resumes_and_delivers_every_valid_row_once(tmp_path: Path) -> None:
    source = tmp_path / "orders.jsonl"
    good, bad = write_rows(source, 50_000)
    conditions = Conditions(latency=0.3)
    with Collector(
        strict_mode=None, refuse=_refuse, conditions=conditions, rate_limit=(3000, 3.0)
    ) as collector:
        proc = cdpmp_import(collector, str(source), "--in-flight", "2", "--no-progress")
        checkpoint = source.with_name("orders.jsonl.cdpmp-checkpoint")
        wait_checkpoint(checkpoint, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        line_at_kill = json.loads(checkpoint.read_text())["line"]
        assert 0 < line_at_kill < 50_000
        collector.set_conditions(Conditions())  # the resume need not wait: each refusal is bisected
        code, err = finish(cdpmp_import(collector, str(source), "--no-progress"))
        assert code == 1, err
        assert f"resumed after line {line_at_kill:,}" in err and f"rejected {len(bad):,}:" in err, err
        assert_delivered_once_after(collector, good, line_at_kill)
        assert_rejects(source.with_name("orders.jsonl.rejects.jsonl"), bad)
        assert 429 not in collector.summary()["statuses"]
        assert all(r.strict_header for r in collector.requests)
        # Run again: everything is behind the checkpoint, nothing is sent.
        before = len(collector.requests)
        code, err = finish(cdpmp_import(collector, str(source), "--no-progress"))
        assert code == 1 and len(collector.requests) == before and "read 0" in err, err


@pytest.mark.servers
def test_an_interrupted_import_on_a_slow_endpoint_resumes(tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    good, bad = write_rows(source, 12_000)
    with Collector(refuse=_refuse, conditions=Conditions(latency=0.1)) as collector:
        proc = cdpmp_import(collector, str(source), "--in-flight", "1", "--rate", "3")
        checkpoint = tmp_path / "events.jsonl.cdpmp-checkpoint"
        wait_checkpoint(checkpoint, proc)
        proc.send_signal(signal.SIGINT)
        code, err = finish(proc)
        assert code == 130 and "interrupted; run the same command to resume" in err, err
        line_at_stop = json.loads(checkpoint.read_text())["line"]
        code, err = finish(cdpmp_import(collector, str(source)))
        assert code == 1, err
        assert_delivered_once_after(collector, good, line_at_stop)
        assert_rejects(tmp_path / "events.jsonl.rejects.jsonl", bad)


def test_csv_and_gzip_inputs_become_the_same_messages(tmp_path: Path, collector: Collector) -> None:
    header = ["type", "userId", "event", "timestamp", "properties.total:number", "properties.gift:bool",
              "properties.sku", "traits.email", "messageId"]  # fmt: skip
    rows = [
        ["track", "42", "Order Completed", "2024-01-02T03:04:05Z", "19.5", "true", "00123", "", "c-1"],
        ["identify", "42", "", "2024-01-02", "", "", "", "ada@example.com", "c-2"],
        ["track", "43", "Refund", "2024-01-03T00:00:00+02:00", "abc", "", "", "", "c-3"],
    ]
    source = tmp_path / "orders.csv.gz"
    with gzip.open(source, "wt", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    report = import_files([str(source)], collector.write_key, collector.url)
    assert not report.ok and report.files[0].rejected == 1 and report.files[0].delivered == 2
    first, second = sorted(collector.messages, key=lambda m: m["messageId"])
    assert first["properties"] == {"total": 19.5, "gift": True, "sku": "00123"}
    assert (first["userId"], first["timestamp"]) == ("42", "2024-01-02T03:04:05.000+00:00")
    assert second["type"] == "identify" and second["traits"] == {"email": "ada@example.com"}
    assert second["timestamp"] == "2024-01-02T00:00:00.000+00:00"
    (reject,) = [json.loads(x) for x in Path(str(source) + ".rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 4 and "'abc' is not a number" in reject["reason"]


def test_the_rate_limit_is_never_exceeded(tmp_path: Path) -> None:
    # 30 KB rows fill a batch with 16: 60 requests, paced at 8/s against an API that
    # answers 429 past 10 in any second.
    source = tmp_path / "big.jsonl"
    with open(source, "w") as out:
        for n in range(960):
            out.write(json.dumps({"type": "track", "userId": "u", "event": "E", "messageId": f"b-{n}",
                                  "properties": {"pad": "x" * 30_000}}) + "\n")  # fmt: skip
    with Collector(rate_limit=(10, 1.0)) as collector:
        report = import_files([str(source)], collector.write_key, collector.url, rate=8, in_flight=4)
        assert report.ok, report
        assert collector.summary()["statuses"] == {200: report.requests}
        assert sorted(collector.message_ids()) == sorted(f"b-{n}" for n in range(960))


def test_an_endpoint_down_past_the_retry_budget_stops_the_run_and_it_resumes(
    tmp_path: Path, collector: Collector
) -> None:
    source = tmp_path / "e.jsonl"
    good, _ = write_rows(source, 300)
    collector.set_conditions(Conditions(outages=(Outage(0, 3600, 503),)))
    report = import_files([str(source)], collector.write_key, collector.url, retry_budget=1.0)
    assert report.failure is not None and "503" in report.failure and report.files[0].delivered == 0
    collector.set_conditions(Conditions())
    report = import_files([str(source)], collector.write_key, collector.url)
    assert report.ok and report.files[0].delivered == 300
    assert set(collector.message_ids()) == good


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["missing.jsonl"], "no such file: missing.jsonl"),
        (["a.jsonl", "b.jsonl", "--checkpoint", "c"], "only with a single file"),
        (["a.jsonl", "--rate", "0"], "rate: must be"),
        (["a.jsonl", "--in-flight", "0"], "in_flight: must be 1 to 64"),
        (["bad.csv"], "column 'price' is neither"),
        (["a.jsonl", "--endpoint", "ftp://x"], "endpoint"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(
    args: List[str], words: str, tmp_path: Path, collector: Collector
) -> None:
    (tmp_path / "a.jsonl").write_text('{"type": "track", "userId": "u", "event": "E"}\n')
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "bad.csv").write_text("type,userId,price\ntrack,u,1\n")
    env = {**os.environ, "CDP_WRITE_KEY": collector.write_key, "CDP_ENDPOINT": collector.url}
    done = subprocess.run([sys.executable, "-m", "cdpmp", "import", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and words in done.stderr, done.stderr
    assert collector.write_key not in done.stderr


def test_a_checkpoint_of_another_file_is_refused(tmp_path: Path, collector: Collector) -> None:
    source = tmp_path / "a.jsonl"
    source.write_text('{"type": "track", "userId": "u", "event": "E", "messageId": "one"}\n')
    assert import_files([str(source)], collector.write_key, collector.url).ok
    source.write_text('{"type": "track", "userId": "u", "event": "E", "messageId": "two"}\n')
    with pytest.raises(ValueError, match="give --restart"):
        import_files([str(source)], collector.write_key, collector.url)
    assert import_files([str(source)], collector.write_key, collector.url, restart=True).ok
    assert sorted(collector.message_ids()) == ["one", "two"]


@pytest.mark.parametrize("bar", [True, False], ids=["tqdm-bar", "lines"])
def test_a_person_sees_progress(
    bar: bool, tmp_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from cdpmp.backfill import _progress

    monkeypatch.setattr(_progress, "LINE_EVERY", 0.0)
    source = tmp_path / "p.jsonl"
    write_rows(source, 2_000)
    shown = io.StringIO()
    report = import_files([str(source)], collector.write_key, collector.url, progress=shown, bar=bar)
    assert report.files[0].rejected == 3 and report.files[0].delivered == 1_997
    text = shown.getvalue()
    if bar:  # tqdm's own bar: done / total, its rate, the rejected count as a postfix
        assert "2000/2000" in text and "rows/s" in text and "rejected=3" in text, text[-500:]
    else:
        assert "cdpmp import: p.jsonl: 2,000 / 2,000 rows" in text and "3 rejected" in text, text[-500:]


@pytest.mark.servers
def test_the_backfill_benchmark_counts_every_row() -> None:
    from benchmarks.backfill import run

    results = run(2_000, 0)
    assert set(results) == {"official loop", "cdpmp track() loop", "cdpmp import"}
    for name, row in results.items():
        assert row["duplicates"] == 0 and row["answered_429"] == 0, (name, row)
        if name.startswith("cdpmp"):
            assert row["delivered"] == 2_000, (name, row)


def test_stdin_with_a_checkpoint_resumes_by_line(tmp_path: Path, collector: Collector) -> None:
    # stdin has no name beside which to keep a checkpoint: --checkpoint gives one, and a
    # second run fed the same stream skips what the first acknowledged.
    rows = "".join(
        json.dumps({"type": "track", "userId": "u", "event": "E", "messageId": f"s-{n}"}) + "\n"
        for n in range(50)
    )
    env = {**os.environ, "CDP_WRITE_KEY": collector.write_key, "CDP_ENDPOINT": collector.url}
    command = [
        sys.executable,
        "-m",
        "cdpmp",
        "import",
        "-",
        "--checkpoint",
        str(tmp_path / "cp"),
        "--no-progress",
    ]
    for _ in range(2):
        done = subprocess.run(
            command, input=rows, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    assert "-(resumed after line 50): read 0" in done.stderr.replace(" (", "("), done.stderr
    assert sorted(collector.message_ids()) == sorted(f"s-{n}" for n in range(50))
    assert not (tmp_path / "stdin.rejects.jsonl").exists()
