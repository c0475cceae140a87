"""Blocking waits (flush, shutdown, the drains of the integrations) run off the event
loop, on cdpmp's own short-lived threads.

Why not ``loop.run_in_executor(None, ...)``: the loop's default executor also resolves
every outgoing connection's host name (``getaddrinfo``). Waits parked there through an
outage held its few threads: an app's own connections waited 5.7 s behind 12
``aflush()`` calls, and a cancelled call kept its thread until its deadline. Here each
wait has a thread of its own that ends with it, at most :data:`MAX_WAITERS` per loop at
once (more calls wait their turn on the loop, not on a thread), and a cancelled call
sets ``stop``: a wait written in slices (:func:`sliced`) ends within one.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: Waits running at once per event loop.
MAX_WAITERS = 4
#: Seconds between two looks at ``stop`` in a sliced wait.
SLICE = 0.1

_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _settle(future: asyncio.Future[Any], result: Any, error: Any) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def run_off_loop(work: Callable[[threading.Event], T]) -> T:
    """``work(stop)`` on a thread of its own; ``stop`` is set if the caller is cancelled."""
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(MAX_WAITERS)
    async with slots:
        stop = threading.Event()
        future: asyncio.Future[T] = loop.create_future()

        def target() -> None:
            result: Any = None
            error: Any = None
            try:
                result = work(stop)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                error = exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting
                pass

        threading.Thread(target=target, name="cdpmp-wait", daemon=True).start()
        try:
            return await future
        except asyncio.CancelledError:
            stop.set()
            raise


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` off the loop (see the module docstring)."""
    return await run_off_loop(lambda stop: fn(*args))


def sliced(wait: Callable[[float], bool], timeout: float, stop: threading.Event) -> bool:
    """``wait(timeout)`` as waits of at most :data:`SLICE` seconds, ending early (False)
    once ``stop`` is set; True as soon as one answers True."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if wait(max(0.0, min(SLICE, left))):
            return True
        if stop.is_set() or left <= SLICE:
            return False
