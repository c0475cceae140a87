"""How a process ends beyond ``atexit``: the SIGTERM drain, and servers that re-raise.

With Python's default SIGTERM disposition a process dies at once: no ``finally``, no
``atexit``, and everything direct mode still holds is lost (measured: a plain worker
script stopped as ``docker stop`` and Kubernetes stop it delivered 0 of 500 queued
events). So where SIGTERM would kill the process *untouched*, cdpmp installs a handler
that drains every client within its ``exit_timeout`` and then dies of SIGTERM as before:
the default disposition is put back and the signal raised again, so the exit status
(143, or -15 to a parent) and everything a supervisor reads from it stay the same.

The rules, and why:

* **Only over the default.** The handler is installed only where Python's handler is
  ``SIG_DFL`` *and* the C-level disposition is too (read with ``sigaction``): an
  embedding server (uWSGI, mod_wsgi) installs its handler in C after the interpreter
  started, and Python still reports ``SIG_DFL`` there. A handler the application or
  server installed is never replaced; one installed later simply replaces ours.
* **Only from the main thread**, which is where ``signal.signal`` may be called; it is
  tried when cdpmp is imported, when a client is made, and when a process first queues
  (per pid, so a worker whose server reset SIGTERM to the default is armed again).
* **The drain runs on its own thread** and the handler waits for it with a deadline: a
  handler runs between two bytecodes of the main thread, which may hold a client's lock
  or the logging lock at that moment; waiting inline could deadlock the process instead
  of ending it. The thread is started with ``_thread.start_new_thread``, which takes no
  lock of ``threading``'s (``Thread.start`` takes one the main thread may hold). If
  the signal interrupted cdpmp's own code (the engine's lock may be held by the very
  thread that would wait), the handler does not wait: it returns so that the call can
  end and let go, and the drain thread raises SIGTERM again once it is done (before:
  7 of 10 such stops sent nothing and waited out ``exit_timeout``). A second SIGTERM
  during the drain ends the process at once, with one line saying what it cost.
* **Uvicorn** catches SIGTERM itself, stops gracefully, then restores the handler it
  found and raises the signal again. If that handler was ours (cdpmp imported before
  the server started, as in gunicorn's ``UvicornWorker``, where the gunicorn hook arms
  it), the drain runs then. If the app is loaded after Uvicorn took the signal
  (``uvicorn app:app``, ``--workers N``), its server is adopted instead: its
  ``shutdown()`` drains once the server's own graceful stop (requests, lifespan) is
  over. Detected from the handler Uvicorn installed (``Server.handle_exit``); any other
  shape is left alone.

Opt out with ``CDP_SIGTERM_DRAIN=0`` (the process then dies of SIGTERM untouched).
Durations are seconds.
"""

from __future__ import annotations

import _thread
import asyncio
import ctypes
import inspect
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

from ._options import ENV, host_settings
from .errors import ConfigurationError

logger = logging.getLogger("cdpmp")

Drain = Callable[[Optional[float]], bool]
Budget = Callable[[], float]
JOIN_SLACK = 1.0  # seconds past the drain budget the handler waits for its thread
RAISE_EVERY = 0.1  # seconds between re-raises at the main thread (see _raise_at_main)
RAISE_FOR = 5.0  # ... for this long, then os._exit

_state: Dict[str, Any] = {"drain": None, "budget": None, "cap": None, "draining": False, "queued": None}


def enabled() -> bool:
    """``CDP_SIGTERM_DRAIN``; read at import too, so an unreadable value means the
    default (importing cdpmp never raises over a setting)."""
    name = ENV["sigterm_drain"]
    try:
        return host_settings({name: os.environ.get(name, "")}).sigterm_drain
    except ConfigurationError:
        return True


def _c_level_default(signum: int) -> bool:
    """The kernel's disposition for ``signum`` is ``SIG_DFL`` (True when it cannot be
    read: Python's own view is then all there is)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        old = ctypes.create_string_buffer(256)  # larger than any platform's struct sigaction
        if libc.sigaction(signum, None, old) != 0:
            return True
        # sa_handler is the first member on Linux and the BSDs; SIG_DFL is 0.
        return ctypes.c_void_p.from_buffer(old).value in (None, 0)
    except (OSError, AttributeError, TypeError):
        return True


def arm(
    drain: Drain, budget: Budget, cap: Optional[float] = None, queued: Optional[Callable[[], int]] = None
) -> bool:
    """Drain at SIGTERM where it would otherwise kill this process untouched (see the
    module docstring). ``drain(seconds)`` shuts every client down within that time;
    ``budget()`` is how long it may take (the clients' ``exit_timeout``), ``cap`` bounds
    it (a server's grace period); ``queued()`` counts what is still queued, without a
    lock (for the line of a drain cut short). True when our handler is in place."""
    _state["drain"], _state["budget"] = drain, budget
    if queued is not None:
        _state["queued"] = queued
    if cap is not None:
        _state["cap"] = cap
    if not enabled() or not hasattr(signal, "SIGTERM"):
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm:
        return True
    if current is not signal.SIG_DFL:
        _adopt_uvicorn(current, drain)
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if not _c_level_default(signal.SIGTERM):
        return False
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter
        return False
    return True


def _budget() -> float:
    """Seconds a drain may take: the longest ``exit_timeout``, within the cap."""
    own: float = _state["budget"]()
    cap = _state["cap"]
    return own if cap is None else min(own, cap)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside_cdpmp(frame: Any) -> bool:
    """The interrupted thread was running cdpmp's own code (one of its locks may be
    held there): a frame of the package, this module's excepted."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE) and name != __file__:
            return True
        frame = frame.f_back
    return False


def _queued() -> int:
    """Events still queued in this process (``arm``'s ``queued``), or -1."""
    queued = _state["queued"]
    try:
        return int(queued()) if queued is not None else -1
    except Exception:  # noqa: BLE001 - a best-effort count for a last line
        return -1


def _say(text: str) -> None:
    """One line on stderr without the logging module's lock (a signal handler may
    have interrupted a thread holding it)."""
    try:
        os.write(2, f"cdpmp: {text}\n".encode())
    except OSError:
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    drain = _state["drain"]
    if _state.get("finished") or drain is None:
        _die(signum)  # the deferred drain is over (see below): end as SIGTERM would
    if _state["draining"]:
        _say(f"a second SIGTERM ended the drain at once: {_queued()} event(s) still queued are lost")
        _die(signum)
    _state["draining"] = True
    budget = _budget()
    done = threading.Event()
    deferred = _inside_cdpmp(frame)

    def run() -> None:
        try:
            drain(budget)
        except Exception:
            logger.exception("cdpmp: the SIGTERM drain failed")
        finally:
            done.set()
            if deferred:
                _state["finished"] = True
                _raise_at_main(signum)

    try:
        _thread.start_new_thread(run, ())
    except RuntimeError:  # no thread can start (interpreter finalising)
        _die(signum)
    if deferred:
        # The signal landed inside cdpmp, maybe while this thread held the engine's or
        # a queue's lock: waiting here would wait on ourselves until the deadline, with
        # nothing sent. Return, so the interrupted call ends and lets go; the drain
        # thread raises SIGTERM again when it is done.
        return
    if not done.wait(budget + JOIN_SLACK):
        _say(
            f"SIGTERM: the drain did not end within {budget:.1f} s: {_queued()} event(s) still queued are lost"
        )
    _die(signum)


def _raise_at_main(signum: int) -> None:
    """Have the main thread run the handler again (it then dies of ``signum``), from the
    drain thread of a deferred drain; called last, the process ends while it runs.

    To the main thread itself: a process-wide kill may be delivered to this thread, and
    a main thread asleep in C would not wake to run the handler (CI saw it sleep on,
    everything delivered, for 40 s). And again until it does: a signal that lands
    after the main thread let go of the GIL but before its ``sleep()`` or ``select()``
    began wakes nothing, and Python runs the handler only when that call returns
    (measured on Python 3.9: 3 of 10 runs of the deferred-drain test slept their 60 s).
    If it never does (a C call that retries through signals, or SIGTERM blocked in the
    main thread), the process exits with the status a SIGTERM death reports, 143."""
    main = threading.main_thread().ident or 0
    deadline = time.monotonic() + RAISE_FOR
    while time.monotonic() < deadline:
        signal.pthread_kill(main, signum)
        time.sleep(RAISE_EVERY)
    _say(f"the main thread did not run the SIGTERM handler within {RAISE_FOR:.0f} s: exiting")
    os._exit(128 + signum)


def _die(signum: int) -> None:
    """End as the default disposition would have: killed by ``signum``."""
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # not reached: the signal kills the process first


def _adopt_uvicorn(handler: Any, drain: Drain) -> None:
    """Drain at the end of a Uvicorn server's graceful stop (see the module docstring)."""
    server = getattr(handler, "__self__", None)
    if (
        server is None
        or getattr(handler, "__name__", "") != "handle_exit"
        or not type(server).__module__.startswith("uvicorn.")
        or getattr(server, "_cdpmp_adopted", False)
        or not inspect.iscoroutinefunction(getattr(server, "shutdown", None))
    ):
        return
    original = server.shutdown

    async def shutdown(*args: Any, **kwargs: Any) -> None:
        try:
            await original(*args, **kwargs)
        finally:
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, drain, _budget()):
                logger.warning("cdpmp: the drain at the server's stop reached its deadline")

    server.shutdown = shutdown
    server._cdpmp_adopted = True
