"""An AWS Lambda function that tracks what each invocation did.

Deploy it with ``CDP_WRITE_KEY`` in the function's environment (and ``CDP_ENDPOINT``
for the EU region). ``@handler`` flushes every event before Lambda gets the answer and
freezes the environment, within the invocation's remaining time; an invocation that
tracked nothing costs nothing more. Works the same for Google Cloud Functions, Cloud
Run functions and Azure Functions (there, pass ``@handler(timeout=...)``).
"""

from __future__ import annotations

from typing import Any, Dict

from cdpmp import analytics
from cdpmp.integrations.serverless import handler


@handler
def lambda_handler(event: Dict[str, Any], context: Any) -> Dict[str, Any]:
    for n in range(int(event.get("k", 1))):
        # A messageId derived from the request: a retried invocation is deduplicated.
        analytics.track(user_id="lambda-user", event="Item Processed", message_id=f"{event['id']}-{n}")
    return {"statusCode": 200}
