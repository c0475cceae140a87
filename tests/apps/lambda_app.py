"""A Lambda function, and a simulated Lambda runtime to run it (``python -m
tests.apps.lambda_app``): one invocation per JSON line on stdin (``{"id": ..., "k":
...}``: track K events with messageIds ``ID-0 .. ID-(K-1)``), "done ID" on stdout when
the handler has returned — the moment AWS freezes the environment. The test freezes
(SIGSTOP) and reaps (SIGKILL) it as the platform does.

``APP_HANDLER``: ``sync`` (default), ``async`` (an ``async def`` handler, run with
``asyncio.run`` per invocation), ``bare`` (no decorator: what apps do today), or
``example`` (the README's ``examples/lambda_handler.py``).
Settings come from the environment (``CDP_WRITE_KEY``, ``CDP_ENDPOINT``...).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any, Dict

from cdpmp import analytics
from cdpmp.integrations.serverless import handler

KIND = os.environ.get("APP_HANDLER", "sync")


def _track(event: Dict[str, Any]) -> Dict[str, Any]:
    for j in range(int(event["k"])):
        assert analytics.track(user_id="u", event="Invoked", message_id=f"{event['id']}-{j}")[0]
    return {"statusCode": 200}


if KIND == "async":

    @handler
    async def lambda_handler(event: Dict[str, Any], context: Any) -> Dict[str, Any]:
        await asyncio.sleep(0)
        return _track(event)

elif KIND == "example":
    from examples.lambda_handler import lambda_handler  # type: ignore[assignment]

elif KIND == "bare":

    def lambda_handler(event: Dict[str, Any], context: Any) -> Dict[str, Any]:
        return _track(event)

else:

    @handler
    def lambda_handler(event: Dict[str, Any], context: Any) -> Dict[str, Any]:
        return _track(event)


class Context:
    """The part of AWS's context object the decorator reads."""

    def __init__(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int(max(0.0, self._deadline - time.monotonic()) * 1000)


if __name__ == "__main__":
    for line in sys.stdin:
        event = json.loads(line)
        result = lambda_handler(event, Context(3.0))
        if asyncio.iscoroutine(result):
            asyncio.run(result)
        print("done", event["id"], flush=True)
