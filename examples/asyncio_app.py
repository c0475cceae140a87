"""An asyncio service (a queue consumer, a websocket server, a bot) that tracks events.

``track()`` never blocks: it only queues, so it is safe to call from a coroutine. To
wait for delivery, await ``analytics.aflush()`` / ``ashutdown()``: the waiting runs on
a thread of cdpmp's own, so the loop keeps serving meanwhile. (FastAPI and other ASGI apps
need only the ASGI line of the README; this is for asyncio code without a server.)

Run: ``CDP_WRITE_KEY=... python examples/asyncio_app.py`` (``JOBS`` jobs, default 100).
"""

from __future__ import annotations

import asyncio
import os

from cdpmp import analytics


async def handle(job: int) -> None:
    await asyncio.sleep(0)  # the job's real work
    analytics.track(
        user_id=f"user-{job % 10}", event="Job Done", message_id=f"job-{job}", properties={"job": job}
    )


async def main(jobs: int) -> None:
    await asyncio.gather(*(handle(job) for job in range(jobs)))
    if not await analytics.ashutdown(timeout=10):  # delivered, or counted in stats()
        print("some events were not delivered:", analytics.stats()["dropped"])


if __name__ == "__main__":
    asyncio.run(main(int(os.environ.get("JOBS", "100"))))
