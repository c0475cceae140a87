"""The ring's format at the byte level, on small rings: wrap-around with PAD records and
short remainders, damaged and truncated records, recount after a crash, headers that
disagree with their file, sparse files, and what the uploader does with damage."""

from __future__ import annotations

import base64
import json
import mmap
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List

import pytest

import cdpmp
from cdpmp._options import resolve, source_entry
from cdpmp.shared import holding
from cdpmp.shared.files import ensure_dir, write_source
from cdpmp.shared.layout import CORRUPT, HEADER_SIZE, PAD, REC, RECORD, RingFormatError
from cdpmp.shared.ring import Ring
from cdpmp.shared.sink import source_id
from cdpmp.testing import Collector

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def directory(tmp_path: Path) -> str:
    return ensure_dir(str(tmp_path / "rt"))


def _drain(ring: Ring) -> List[bytes]:
    """Read and release everything, as the uploader does; the payloads in order."""
    head, _, _ = ring.bounds()
    records = ring.read(head, 1 << 30, 1 << 30)
    by_source: Dict[int, int] = {}
    for r in records:
        by_source[r.source] = by_source.get(r.source, 0) + 1
    if records:
        ring.release(records[-1].end, len(records))
        holding.settle_counts(ring, by_source)
    return [r.payload for r in records if r.payload]


def test_wrap_around_with_pad_and_short_remainders_keeps_every_payload(directory: str) -> None:
    ring = Ring(directory, capacity=4096, max_count=1000)
    rnd = random.Random(5)
    sent: List[bytes] = []
    got: List[bytes] = []
    pads = shorts = 0
    for i in range(3000):
        payload = f"{i}:".encode() + b"x" * rnd.choice([1, 7, 8, 9, 100, 333, 700, 1500])
        _, tail, _ = ring.bounds()
        left = ring.capacity - tail % ring.capacity
        need = REC.size + ((len(payload) + 7) & ~7)
        if ring.put(7, payload):
            sent.append(payload)
            if left < need:
                pads += left >= REC.size
                shorts += left < REC.size
        else:  # full: drain and retry, as the uploader would
            got += _drain(ring)
            assert ring.put(7, payload)
            sent.append(payload)
        if rnd.random() < 0.2:
            got += _drain(ring)
    got += _drain(ring)
    assert got == sent
    assert pads > 10 and shorts > 0  # both kinds of wrap were exercised
    head, tail, count = ring.bounds()
    assert head == tail and count == 0
    assert ring.header.counters()["corrupt"] == 0


def test_a_pad_record_is_written_where_a_record_would_cross_the_end(directory: str) -> None:
    ring = Ring(directory, capacity=4096, max_count=100)
    assert ring.put(1, b"a" * 4000)
    _drain(ring)
    assert ring.put(1, b"b" * 100)  # 4016 + 16 + 104 > 4096: a PAD fills the rest
    length, marker, _ = REC.unpack_from(ring.mm, HEADER_SIZE + 4016)
    assert (marker, length) == (PAD, 4096 - 4016 - REC.size)
    assert _drain(ring) == [b"b" * 100]


def test_damaged_bytes_are_skipped_counted_and_never_stop_what_follows(directory: str) -> None:
    ring = Ring(directory, capacity=8192, max_count=100)
    for i in range(10):
        assert ring.put(3, json.dumps({"i": i}).encode())
    records = ring.read(0, 100, 1 << 20)
    victim = records[4]
    ring.mm[HEADER_SIZE + victim.start : HEADER_SIZE + victim.start + 8] = b"\xff" * 8  # a torn header
    again = ring.read(0, 100, 1 << 20)
    sources = [r.source for r in again]
    assert sources == [3] * 4 + [CORRUPT] + [3] * 5
    damaged = again[4]
    assert (damaged.start, damaged.end) == (victim.start, victim.end)
    assert [json.loads(r.payload)["i"] for r in again if r.source == 3] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert ring.header.counters()["corrupt"] == 1


def test_a_truncated_last_record_is_skipped_to_the_tail(directory: str) -> None:
    ring = Ring(directory, capacity=8192, max_count=100)
    for _i in range(3):
        assert ring.put(3, b"x" * 50)
    last = ring.read(0, 100, 1 << 20)[-1]
    REC.pack_into(ring.mm, HEADER_SIZE + last.start, 5000, RECORD, 3)  # claims to run past the tail
    records = ring.read(0, 100, 1 << 20)
    assert [r.source for r in records] == [3, 3, CORRUPT] and records[-1].end == ring.bounds()[1]


def test_recount_repairs_a_count_left_wrong_by_a_crash(directory: str) -> None:
    ring = Ring(directory, capacity=8192, max_count=100)
    for _ in range(7):
        ring.put(1, b"m")
    struct.pack_into("<Q", ring.mm, 48, 2)  # a producer died between its two stores
    assert holding.recount(ring) == 7 and ring.bounds()[2] == 7


@pytest.mark.parametrize(
    "damage",
    ["grown", "shrunk", "version", "head_past_tail", "count_too_big"],
)
def test_a_header_that_disagrees_with_its_file_is_refused(directory: str, damage: str) -> None:
    ring = Ring(directory, capacity=8192, max_count=100)
    ring.put(1, b"m")
    ring.close()
    path = os.path.join(directory, "ring")
    with open(path, "r+b") as fh:
        if damage == "grown":
            fh.truncate(os.path.getsize(path) + 4096)
        elif damage == "shrunk":
            fh.truncate(os.path.getsize(path) - 4096)
        else:
            mm = mmap.mmap(fh.fileno(), 0)
            if damage == "version":
                struct.pack_into("<I", mm, 8, 99)
            elif damage == "head_past_tail":
                struct.pack_into("<Q", mm, 32, 10_000)
            else:
                struct.pack_into("<Q", mm, 48, 10**9)
            mm.close()
    with pytest.raises(RingFormatError):
        Ring(directory, capacity=8192, max_count=100)


def test_a_damaged_ring_sends_the_client_to_direct_mode_with_a_warning(
    runtime_dir: str, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    ensure_dir(runtime_dir)
    with open(os.path.join(runtime_dir, "ring"), "wb") as fh:
        fh.write(b"not a ring at all" * 1000)
    client = cdpmp.Client(collector.write_key, endpoint=collector.url, mode="shared", upload_interval=0.05)
    try:
        assert client.stats()["mode"] == "direct"
        assert any("shared mode" in r.getMessage() for r in caplog.records)
        assert client.track("u", "E")[0] and client.flush(timeout=10)
        assert len(collector.messages) == 1
    finally:
        client.shutdown(timeout=5)


def test_a_sparse_ring_is_reserved_when_opened(directory: str) -> None:
    ring = Ring(directory, capacity=1 << 20, max_count=100)
    ring.close()
    path = os.path.join(directory, "ring")
    size = os.path.getsize(path)
    assert os.stat(path).st_blocks * 512 >= size  # created reserved
    # An older cdpmp made it sparse: punch the data area out again.
    with open(path, "r+b") as fh:
        header = fh.read(HEADER_SIZE)
        fh.truncate(0)
        fh.seek(0)
        fh.write(header)
        fh.truncate(size)
    assert os.stat(path).st_blocks * 512 < size
    Ring(directory, capacity=1 << 20, max_count=100).close()
    assert os.stat(path).st_blocks * 512 >= size


def test_the_uploader_quarantines_damage_and_delivers_the_rest(
    runtime_dir: str, collector: Collector
) -> None:
    directory = ensure_dir(runtime_dir)
    settings = resolve({"write_key": collector.write_key, "endpoint": collector.url, "upload_interval": 0.05})
    sid = source_id(settings)
    ring = Ring(directory, capacity=1 << 16, max_count=100)
    with ring.locked():
        write_source(directory, sid, source_entry(settings))
    good = []
    for _i in range(20):
        msg = cdpmp.Client(collector.write_key, endpoint=collector.url, send=False).track("u", "E")[1]
        good.append(msg["messageId"])
        assert ring.put(sid, json.dumps(msg).encode())
    victim = ring.read(0, 100, 1 << 20)[10]
    ring.mm[HEADER_SIZE + victim.start + 4 : HEADER_SIZE + victim.start + 8] = b"\0\0\0\0"  # marker gone
    del good[10]
    ring.put(sid, b"this is not json")  # a record of ours that no endpoint would take
    proc = subprocess.Popen([sys.executable, "-m", "cdpmp.shared.uploader", "--dir", directory])
    try:
        assert collector.wait_for(19, timeout=30)
        deadline = time.monotonic() + 30
        while ring.header.counters()["depth"] or not ring.header.counters()["dead_lettered"]:
            assert time.monotonic() < deadline, ring.header.counters()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    assert collector.unique_ids() == set(good) and collector.duplicates() == {}
    host = ring.header.counters()
    assert host["corrupt"] == 1 and host["dead_lettered"] == 1 and host["sent"] == 19
    lines = [json.loads(x) for x in Path(directory, "dead-letter.jsonl").read_text().splitlines()]
    by_source = {line["source"]: line for line in lines}
    assert set(by_source) == {CORRUPT, sid}
    assert "raw" in by_source[CORRUPT]["batch"][0]  # the damaged bytes, kept for inspection
    assert base64.b64decode(by_source[sid]["batch"][0]["raw"]) == b"this is not json"
    ring.close()


def test_each_source_is_held_to_its_own_limit(directory: str) -> None:
    ring = Ring(directory, capacity=1 << 16, max_count=10)  # the creator's limit: 10
    assert sum(ring.put(1, b"a", limit=5) for _ in range(8)) == 5
    assert sum(ring.put(2, b"b", limit=20) for _ in range(30)) == 20  # past the creator's 10
    assert sorted(ring.header.sources()) == [(1, 5, 5), (2, 20, 20)]
    head, _, _ = ring.bounds()
    records = ring.read(head, 3, 1 << 20)  # the uploader frees three of source 1's
    ring.release(records[-1].end, 3)
    holding.settle_counts(ring, {1: 3})
    assert sorted(ring.header.sources()) == [(1, 2, 5), (2, 20, 20)]
    assert sum(ring.put(1, b"a", limit=5) for _ in range(8)) == 3
    struct.pack_into("<Q", ring.mm, 1536 + 8, 99)  # drift left by a crash mid-put
    assert holding.recount(ring) == 25 and sorted(ring.header.sources()) == [(1, 5, 5), (2, 20, 20)]


def test_limits_follow_configuration_across_a_redeploy(runtime_dir: str, collector: Collector) -> None:
    collector.fail_next(10**6, status=503)  # down: everything stays in the ring

    def deploy(key: str, url: str, events: int, **options: object) -> List[str]:
        script = f"""
            import json, cdpmp
            c = cdpmp.Client({key!r}, endpoint={url!r}, mode="shared", upload_interval=0.05, **{options!r})
            print(json.dumps([m["messageId"] for ok, m in (c.track("u", "E") for _ in range({events})) if ok]))
            import os; os._exit(0)
        """
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))

    first = deploy(collector.write_key, collector.url, 2000)  # the ring is made with the default limit
    assert len(first) == 2000
    second = deploy(collector.write_key, collector.url, 1000, max_queue_size=2500)  # redeployed
    assert len(second) == 500  # 2,000 still held + 500 = the new limit
    with Collector(write_key="other-app") as other:
        other.fail_next(10**6, status=503)
        third = deploy("other-app", other.url, 1000, max_queue_size=300)  # a second app, its own limit
        assert len(third) == 300
        stats = subprocess.run(
            [sys.executable, "-m", "cdpmp", "stats"], capture_output=True, text=True, timeout=30
        )
        shown = sorted((s["depth"], s["limit"]) for s in json.loads(stats.stdout)["sources"])
        assert shown == [(300, 300), (2500, 2500)]
        collector.reset()
        other.reset()  # both endpoints are back
        assert collector.wait_for(2500, timeout=60) and other.wait_for(300, timeout=60)
        assert collector.unique_ids() == set(first + second) and collector.duplicates() == {}
        assert other.unique_ids() == set(third) and other.duplicates() == {}


def test_host_depth_counts_only_what_is_waiting_behind_a_held_record(directory: str) -> None:
    # Source B's one record holds the head (its endpoint is down); A's 500 behind it
    # were delivered. head cannot pass B's record, but depth is what waits: 1.
    ring = Ring(directory, capacity=1 << 16, max_count=1000)
    assert ring.put(2, b"b-0")
    for n in range(500):
        assert ring.put(1, b"a-%d" % n)
    assert ring.header.counters()["depth"] == 501
    holding.settle_counts(ring, {1: 500})  # the uploader delivered A's, not B's
    stats = ring.header.counters()
    assert stats["depth"] == 1 and ring.bounds()[2] == 501
    assert {s["source"]: s["depth"] for s in stats["sources"]} == {f"{1:016x}": 0, f"{2:016x}": 1}
    ring.close()
