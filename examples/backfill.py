"""Backfill historical orders into Customer.io, as its docs describe: ``timestamp=``
from the past, one event per order.

A backfill tracks faster than any endpoint takes events, so the queue fills (by
default ``track()`` then answers ``(False, msg)`` at once: the right thing on a web
request, never block it). ``block_on_full`` makes each call wait for room instead, up
to that many seconds: nothing is refused and memory stays bounded by
``max_queue_size``. Use it in scripts like this one, not in request handlers.

Run: ``CDP_WRITE_KEY=... python examples/backfill.py`` (``ORDERS`` orders, default 10,000).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Iterator

from cdpmp import analytics

analytics.block_on_full = 30.0  # seconds a call may wait for room (or CDP_BLOCK_ON_FULL=30)


def orders(count: int) -> Iterator[Dict[str, Any]]:
    """Stands in for reading your database or an export file."""
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    for n in range(count):
        yield {
            "id": n,
            "customer": f"customer-{n % 997}",
            "total": n % 500,
            "at": start + datetime.timedelta(minutes=n),
        }


def main(count: int) -> int:
    refused = 0
    for order in orders(count):
        ok, _ = analytics.track(
            user_id=order["customer"],
            event="Order Completed",
            properties={"total": order["total"]},
            timestamp=order["at"],
            message_id=f"order-{order['id']}",  # re-running the backfill sends the same ids
        )
        refused += not ok
    delivered = analytics.flush(timeout=120)  # True: every accepted order was delivered
    stats = analytics.stats()
    print(
        f"{count - refused} of {count} accepted, "
        f"{'all delivered' if delivered else 'NOT all delivered'}, dropped: {stats['dropped']}"
    )
    return refused + (not delivered)


if __name__ == "__main__":
    raise SystemExit(1 if main(int(os.environ.get("ORDERS", "10000"))) else 0)
