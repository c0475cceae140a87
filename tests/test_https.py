"""HTTPS, as the real endpoint speaks it: delivery in every mode, and total deadlines
over TLS and where no thread may run. The CA is made per session (trustme) and given
to cdpmp through ``SSL_CERT_FILE``, as a corporate CA would be."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
import trustme

import cdpmp
from cdpmp.testing import Collector

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for 127.0.0.1, trusted by cdpmp in this process and its children."""
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def tls_collector(server_tls: ssl.SSLContext) -> Iterator[Collector]:
    with Collector(tls=server_tls) as collector:
        yield collector


@pytest.mark.parametrize("kind", ["direct", "sync", "shared"])
def test_every_mode_delivers_over_https_exactly_once(
    kind: str, tls_collector: Collector, request: pytest.FixtureRequest
) -> None:
    if kind == "shared":
        request.getfixturevalue("runtime_dir")
    assert tls_collector.url.startswith("https://")
    client = cdpmp.Client(
        tls_collector.write_key,
        endpoint=tls_collector.url,
        mode="shared" if kind == "shared" else "direct",
        sync_mode=kind == "sync",
        upload_interval=0.05,
    )
    try:
        ids = {f"{kind}-{i}" for i in range(250)}
        for mid in sorted(ids):
            assert client.track("u", "E", message_id=mid)[0]
        assert client.flush(timeout=60)
        assert tls_collector.wait_for(250, timeout=60)
        assert tls_collector.unique_ids() == ids and tls_collector.duplicates() == {}
    finally:
        client.shutdown(timeout=5)


def test_an_untrusted_certificate_is_refused(
    tls_collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    errors: List[Tuple[Exception, Any]] = []
    client = cdpmp.Client(
        tls_collector.write_key,
        endpoint=tls_collector.url,
        sync_mode=True,
        max_retries=0,
        on_error=lambda e, b: errors.append((e, b)),
    )
    ok, _ = client.track("u", "E")
    assert ok is False and "SSLError" in str(errors[0][0])
    assert tls_collector.messages == []


def _tls_trickler(context: ssl.SSLContext, sent: List[int]) -> Tuple[str, socket.socket]:
    """An HTTPS endpoint that answers one byte every 0.2 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def answer(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1 << 20)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
                    tls.sendall(bytes([byte]))
                    sent[0] += 1
                    time.sleep(0.2)
        except OSError:
            pass  # the client gave up: what the test wants

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"https://127.0.0.1:{listener.getsockname()[1]}", listener


def test_a_trickling_https_answer_cannot_outlast_the_deadline(server_tls: ssl.SSLContext) -> None:
    sent = [0]
    url, listener = _tls_trickler(server_tls, sent)
    errors: List[Tuple[Exception, Any]] = []
    client = cdpmp.Client(
        "k", endpoint=url, timeout=1.0, max_retries=0, on_error=lambda e, b: errors.append((e, b))
    )
    try:
        client.track("u", "E")
        client.flush(timeout=30)
        assert len(errors) == 1 and "no complete answer" in str(errors[0][0])
        assert sent[0] < 30  # cut after about five bytes, not served to the end (~8 s)
    finally:
        client.shutdown(timeout=2)
        listener.close()


def test_where_no_thread_may_run_an_inline_flush_keeps_its_deadline(tmp_path: Path) -> None:
    # A plain-HTTP trickler in a child process, a threadless client in another.
    server = textwrap.dedent("""
        import socket, sys, time
        listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(4)
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept(); conn.recv(1 << 20)
        for byte in b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}":
            conn.sendall(bytes([byte])); time.sleep(0.2)
        time.sleep(30)
    """)
    client = textwrap.dedent("""
        import sys, threading, cdpmp
        from cdpmp._process import PROCESS
        PROCESS.disable_threads()
        errors = []
        c = cdpmp.Client("k", endpoint=sys.argv[1], timeout=1.0, max_retries=0, upload_interval=60,
                         on_error=lambda e, b: errors.append(str(e)))
        c.track("u", "E")
        c.flush(timeout=30)
        assert threading.active_count() == 1, threading.enumerate()  # no thread was started
        assert len(errors) == 1 and "no complete answer" in errors[0], errors
        print("ok")
    """)
    with subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True) as srv:
        try:
            assert srv.stdout is not None
            port = srv.stdout.readline().strip()
            out = subprocess.run(
                [sys.executable, "-c", client, f"http://127.0.0.1:{port}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
        finally:
            srv.kill()
