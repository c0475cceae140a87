"""What strict mode costs: requests for 10,000 events with one message the API refuses.

``python -m benchmarks.strict_cost``. The collector refuses one message (by a property);
with ``strict_mode`` on, the API's 400 refuses the whole batch and cdpmp bisects it until
the refused message stands alone (extra requests, the loss reported to ``on_error``); with
it off, the API answers 200 and drops the message unseen. Prints requests, statuses,
delivered, dropped and what ``on_error`` heard, for each setting.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import cdpmp
from cdpmp.testing import Collector

EVENTS = 10_000
BAD = 4321


def _refuse(message: Dict[str, Any]) -> Optional[str]:
    return "refused by the API" if message["properties"].get("i") == BAD else None


def run(strict: bool) -> Dict[str, Any]:
    reported: List[int] = []
    with Collector(refuse=_refuse, strict=False) as collector:
        client = cdpmp.Client(
            collector.write_key,
            endpoint=collector.url,
            strict_mode=strict,
            on_error=lambda error, batch: reported.append(len(batch)),
        )
        for i in range(EVENTS):
            client.track("u", "E", {"i": i})
        flushed = client.flush(120)
        client.shutdown(10)
        summary = collector.summary()
    return {
        "strict_mode": strict,
        "flush": flushed,
        "requests": summary["requests"],
        "statuses": summary["statuses"],
        "delivered": summary["delivered"],
        "dropped_unseen": summary["dropped"],
        "on_error_events": sum(reported),
    }


if __name__ == "__main__":
    for strict in (True, False):
        print(json.dumps(run(strict)))
