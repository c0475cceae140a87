"""A small WSGI app used by the server tests and the load benchmark.

``GET /?id=R&k=K`` tracks K events with messageIds ``R-0 .. R-(K-1)``; the body says
whether every ``track()`` returned success. Settings come from the environment
(``CDP_WRITE_KEY``, ``CDP_ENDPOINT``...), never argv.

``APP_CLIENT=official`` uses customerio-cdp-analytics instead (for comparison
figures); ``APP_CLIENT=off`` tracks nothing. ``APP_TRACK_AT_IMPORT=1`` tracks one event
at import, i.e. in the master with ``--preload``/without ``lazy-apps``.
``APP_NO_SETUP=1`` leaves out the uWSGI line (an app that forgot it).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, List, Tuple
from urllib.parse import parse_qs

CLIENT = os.environ.get("APP_CLIENT", "cdpmp")

if CLIENT == "official":
    from customerio import analytics

    analytics.write_key = os.environ["CDP_WRITE_KEY"]
    analytics.host = os.environ["CDP_ENDPOINT"]
else:
    import cdpmp.integrations.uwsgi
    from cdpmp import analytics  # type: ignore[no-redef]

    if os.environ.get("APP_NO_SETUP") != "1":
        cdpmp.integrations.uwsgi.setup()  # a no-op outside uWSGI

if os.environ.get("APP_TRACK_AT_IMPORT") == "1" and CLIENT != "off":
    analytics.track(user_id="master", event="App Loaded", message_id=f"import-{os.getpid()}")


def app(
    environ: dict[str, Any], start_response: Callable[[str, List[Tuple[str, str]]], Any]
) -> Iterable[bytes]:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    rid = query.get("id", ["anon"])[0]
    k = int(query.get("k", ["1"])[0])
    ok = True
    if CLIENT != "off":
        for j in range(k):
            result = analytics.track(
                user_id=rid, event="Request", message_id=f"{rid}-{j}", properties={"pid": os.getpid(), "j": j}
            )
            ok = ok and result[0] is not False
    body = b"ok" if ok else b"fail"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


application = app
