"""Every way a plain Python process ends: SIGTERM under the default disposition (what
``docker stop`` and Kubernetes send to a worker script that installs no handler), a
handler the application installed, a disposition set in C (an embedding server), a
second SIGTERM during the drain, and the opt-out. Real processes and real signals;
counts by messageId."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

from cdpmp.testing import Collector, Conditions, Outage
from tests.servers import assert_exactly_once, free_port, load, runserver_command, start_server

pytestmark = pytest.mark.timeout(90)

EVENTS = 500


def _script(collector: Collector, before: str = "", after: str = "", interval: float = 60.0) -> str:
    """Queue EVENTS events that nothing sends before the process is stopped (a 60 s
    interval, batches larger than the queue), say "ready", then wait for a signal."""
    return textwrap.dedent(f"""
        import os, signal, sys, time
        {before}
        from cdpmp import analytics
        analytics.write_key = {collector.write_key!r}
        analytics.endpoint = {collector.url!r}
        analytics.upload_interval = {interval}
        analytics.upload_size = 1000
        for i in range({EVENTS}):
            assert analytics.track(user_id="u", event="E", message_id=f"m-{{i}}")[0]
        {after}
        print("ready", signal.getsignal(signal.SIGTERM), flush=True)
        time.sleep(60)
    """)


def _run_until_signalled(
    script: str, env: Dict[str, str], signals: List[int]
) -> subprocess.CompletedProcess[str]:
    """Start ``script``, wait for "ready", send ``signals`` (0.3 s apart), and wait."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("CDP_")},
            "PYTHONFAULTHANDLER": "1",
            **env,
        },
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready"), ready + proc.communicate(timeout=10)[1]
        for i, sig in enumerate(signals):
            if i:
                try:
                    proc.wait(timeout=0.3)
                except subprocess.TimeoutExpired:
                    pass
            proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            # Where every thread of the child stands (faulthandler, at SIGABRT), for
            # the failure's message: a stop that hangs is otherwise a bare timeout.
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=10)
            raise AssertionError(f"the child did not end within 40 s:\n{err[-6000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, ready + out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ids(n: int) -> List[str]:
    return [f"m-{i}" for i in range(n)]


@pytest.mark.parametrize("mode", ["direct", "shared"])
def test_sigterm_under_the_default_disposition_drains_then_dies_of_it(
    mode: str, collector: Collector, request: pytest.FixtureRequest
) -> None:
    collector.set_conditions(Conditions(latency=0.05))
    env = {"CDP_MODE": mode}
    if mode == "shared":  # the events wait in the host's ring, for the uploader's interval
        env["CDP_RUNTIME_DIR"] = request.getfixturevalue("runtime_dir")
    done = _run_until_signalled(
        _script(collector, interval=60.0 if mode == "direct" else 1.0), env, [signal.SIGTERM]
    )
    assert "_on_sigterm" in done.stdout, done.stdout
    assert done.returncode == -signal.SIGTERM, done.stderr[-3000:]  # dies of it, as before
    assert collector.wait_for(EVENTS, timeout=20), done.stderr[-3000:]
    assert sorted(collector.message_ids()) == sorted(_ids(EVENTS))  # each exactly once


def test_opting_out_leaves_sigterm_untouched(collector: Collector) -> None:
    done = _run_until_signalled(_script(collector), {"CDP_SIGTERM_DRAIN": "0"}, [signal.SIGTERM])
    assert done.returncode == -signal.SIGTERM
    assert "ready 0" in done.stdout or "SIG_DFL" in done.stdout, done.stdout
    assert collector.message_ids() == []  # what the process held died with it


def test_a_handler_the_application_installed_is_kept(collector: Collector) -> None:
    # Installed before cdpmp was imported: cdpmp must not replace it. The app's handler
    # exits normally, so atexit drains everything.
    before = "signal.signal(signal.SIGTERM, lambda s, f: (print('app handler', flush=True), sys.exit(3)))"
    done = _run_until_signalled(_script(collector, before=before), {}, [signal.SIGTERM])
    assert "<lambda>" in done.stdout and "app handler" in done.stdout, done.stdout
    assert done.returncode == 3
    assert sorted(collector.message_ids()) == sorted(_ids(EVENTS))


def test_a_handler_installed_after_cdpmp_wins(collector: Collector) -> None:
    after = "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(4))"
    done = _run_until_signalled(_script(collector, after=after), {}, [signal.SIGTERM])
    assert done.returncode == 4, done.stderr[-2000:]
    assert sorted(collector.message_ids()) == sorted(_ids(EVENTS))


def test_a_disposition_set_in_c_is_never_replaced(collector: Collector) -> None:
    # As an embedding server does (uWSGI installs its handlers in C, after Python
    # started, so Python still reports SIG_DFL): here SIG_IGN, set through libc.
    before = "import ctypes; ctypes.CDLL(None).signal(signal.SIGTERM, ctypes.c_void_p(1))"
    proc = subprocess.Popen(
        [sys.executable, "-c", _script(collector, before=before)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert "_on_sigterm" not in ready, ready  # Python's view still says SIG_DFL
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # ignored, as the C disposition says
    finally:
        proc.kill()
        proc.communicate()


def test_a_second_sigterm_during_the_drain_ends_the_process_at_once(collector: Collector) -> None:
    # The endpoint holds every request 30 s; the drain may take 60 s: only the second
    # SIGTERM can end the process within the 40 s this test waits.
    collector.set_conditions(Conditions(latency=30.0))
    done = _run_until_signalled(
        _script(collector), {"CDP_EXIT_TIMEOUT": "60"}, [signal.SIGTERM, signal.SIGTERM]
    )
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    # What it cost, in one line (the 500 events the endpoint was still holding).
    assert "a second SIGTERM ended the drain at once: 500 event(s) still queued are lost" in done.stderr


def test_a_sigterm_landing_inside_the_engines_lock_still_drains(collector: Collector) -> None:
    # The instant made deterministic: the main thread holds the engine's lock when the
    # signal arrives (as when it lands in track() activating a sender). Waiting in the
    # handler would wait on that lock: before, nothing was sent until exit_timeout.
    script = _script(collector).replace("time.sleep(60)", _deferred("time.sleep(60)"))
    done = _run_until_signalled(script, {"CDP_EXIT_TIMEOUT": "20"}, [])
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert sorted(collector.message_ids()) == sorted(_ids(EVENTS)), done.stderr[-2000:]
    assert "did not end" not in done.stderr


def _deferred(then: str, after_handler: str = "") -> str:
    """Lines that make SIGTERM land inside cdpmp (the deferred drain), run
    ``after_handler`` right after the handler returned (still inside), then ``then``.
    Only the main thread's call is the one: a sender thread asking first would take
    the process-directed kill itself."""
    return (
        "import threading\n"
        "from cdpmp._senders import engine\n"
        "wake = engine()._wake_locked\n"
        "def signalled(start):\n"
        "    if threading.current_thread() is not threading.main_thread():\n"
        "        return wake(start)\n"
        "    engine()._wake_locked = wake  # once\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    sum(range(1000))  # the handler runs here, inside activate(), its lock held\n"
        f"    {after_handler}\n"
        "    return wake(start)\n"
        "engine()._wake_locked = signalled\n"
        "analytics.flush(0.1)  # asks the engine for a sender: activate()\n" + then
    )


def test_a_deferred_drain_raises_again_until_the_main_thread_runs_its_handler(
    collector: Collector,
) -> None:
    # The drain thread's first raise at the main thread is lost, as one is when it
    # lands after the main thread let go of the GIL but before its sleep() began
    # (Python 3.9 under load: 3 runs in 10 slept their 60 s): the next one ends it.
    lose_one = (
        "real, lost = signal.pthread_kill, []\n"
        "def flaky(ident, signum):\n"
        "    if not lost:\n"
        "        lost.append(signum)\n"
        "        return\n"
        "    real(ident, signum)\n"
        "signal.pthread_kill = flaky\n"
    )
    script = _script(collector).replace("time.sleep(60)", _deferred(lose_one + "time.sleep(60)"))
    done = _run_until_signalled(script, {"CDP_EXIT_TIMEOUT": "20"}, [])
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert sorted(collector.message_ids()) == sorted(_ids(EVENTS)), done.stderr[-2000:]


def test_a_main_thread_that_never_runs_the_handler_still_ends(collector: Collector) -> None:
    # SIGTERM blocked in the main thread once the deferred drain began: no re-raise can
    # reach it, and the process exits with SIGTERM's status after RAISE_FOR seconds.
    block = "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])"
    script = _script(collector).replace("time.sleep(60)", _deferred("time.sleep(60)", block))
    done = _run_until_signalled(script, {"CDP_EXIT_TIMEOUT": "20"}, [])
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert sorted(collector.message_ids()) == sorted(_ids(EVENTS)), done.stderr[-2000:]
    assert "did not run the SIGTERM handler within 5 s: exiting" in done.stderr


def test_exit_under_load_drains_what_was_queued_and_counts_what_came_after(
    collector: Collector, tmp_path: Path
) -> None:
    # Eight threads keep tracking while SIGTERM's drain runs: it works on what was
    # queued when it began; what they track afterwards is refused and counted (each
    # accepted id is written down first, so the test knows what was promised).
    accepted = tmp_path / "accepted"
    collector.set_conditions(Conditions(latency=0.05))
    load_script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        from cdpmp import analytics
        analytics.write_key, analytics.endpoint = {collector.write_key!r}, {collector.url!r}
        out = open({str(accepted)!r}, "a", buffering=1)
        lock = threading.Lock()
        def worker(w):
            n = 0
            while True:
                ok, msg = analytics.track(user_id="u", event="E", message_id=f"w{{w}}-{{n}}")
                if ok:
                    with lock:
                        out.write(msg["messageId"] + "\\n")
                n += 1
                time.sleep(0.005)
        for w in range(8):
            threading.Thread(target=worker, args=(w,), daemon=True).start()
        time.sleep(1.0)
        print("ready", flush=True)
        time.sleep(60)
    """)
    done = _run_until_signalled(load_script, {"CDP_EXIT_TIMEOUT": "20"}, [signal.SIGTERM])
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    promised = set(accepted.read_text().split())
    assert promised and set(collector.message_ids()) == promised, done.stderr[-2000:]
    assert len(collector.message_ids()) == len(promised)
    assert "shutdown" in done.stderr and "did not end" not in done.stderr, done.stderr[-2000:]


@pytest.mark.servers
@pytest.mark.timeout(180)
def test_django_runserver_in_shared_mode_loses_nothing_to_its_reloader(
    tmp_path: Path, collector: Collector, runtime_dir: str
) -> None:
    # runserver's autoreloader answers SIGTERM by exiting, and subprocess.run kills the
    # serving child with SIGKILL on the way out: no Python code runs there, so direct
    # mode loses what the child held (the README says so). Shared mode keeps it in the
    # host's ring.
    pytest.importorskip("django", reason="the core suite runs without it")
    port = free_port()
    cmd = runserver_command(port)
    env = {"CDP_MODE": "shared", "CDP_RUNTIME_DIR": runtime_dir, "CDP_UPLOAD_INTERVAL": "5"}
    server = start_server(cmd, collector, tmp_path / "server.log", port, **env)
    ok = load(server.port, 300, k=3)
    server.stop(signal.SIGTERM)
    assert len(ok) == 300, server.output(5000)
    assert_exactly_once(collector, ok, 3, import_events=0)


def test_sigterm_during_an_outage_drains_once_the_endpoint_is_back(collector: Collector) -> None:
    # 100 ms away and answering 503 for the first 3 s of its life: the SIGTERM comes
    # during the outage; the drain keeps the events and retries within exit_timeout.
    collector.set_conditions(Conditions(latency=0.1, outages=(Outage(0.0, 3.0, 503),)))
    done = _run_until_signalled(_script(collector), {"CDP_EXIT_TIMEOUT": "20"}, [signal.SIGTERM])
    assert done.returncode == -signal.SIGTERM, done.stderr[-3000:]
    assert sorted(collector.message_ids()) == sorted(_ids(EVENTS)), done.stderr[-3000:]
    assert any(r.status == 503 for r in collector.requests)  # the outage was met
