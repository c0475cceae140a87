"""The ``cdpmp`` command: ``demo``, ``collector``, ``track``, ``import``, ``stats``, ``uploader``.

Write keys are read from ``--write-key-file`` or ``CDP_WRITE_KEY`` by preference:
``--write-key`` works too, but a process's argv is visible to every user of the host.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from ._message import MAX_DEPTH
from ._options import ENV
from ._usage import UserError


def _read_key(args: argparse.Namespace) -> Optional[str]:
    if args.write_key_file:
        try:
            with open(args.write_key_file, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise UserError(f"cannot read --write-key-file {args.write_key_file}: {exc.strerror}") from None
    return args.write_key or os.environ.get(ENV["write_key"])


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.workers < 0 or args.events < 0:
        raise UserError("--workers and --events must be 0 or more")
    return run_demo(args.workers, args.events, args.mode)


def cmd_collector(args: argparse.Namespace) -> int:
    from .testing import Collector, Conditions, Outage

    printing = threading.Lock()  # the handler threads print concurrently

    def show(msg: Dict[str, Any]) -> None:
        with printing:  # print() writes the text and its newline apart: one whole line each
            print(json.dumps(msg, sort_keys=True), flush=True)

    given = _read_key(args)
    key = given or "test-write-key"
    if args.rate_limit < 0:
        raise UserError("--rate-limit must be 0 (none) or more")
    try:
        conditions = Conditions(
            latency=args.latency,
            jitter=args.jitter,
            outages=tuple(Outage.parse(o) for o in args.outage),
            fault_rate=args.fault_rate,
        )
    except ValueError as exc:
        print(f"cdpmp collector: {exc}", file=sys.stderr)
        return 2
    try:
        collector = Collector(
            write_key=key,
            port=args.port,
            on_message=show,
            conditions=conditions,
            strict_mode=args.answers,
            rate_limit=None if args.rate_limit == 0 else (args.rate_limit, 3.0),
        )
    except (OSError, OverflowError) as exc:  # busy, privileged or out of range
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"cannot listen on 127.0.0.1:{args.port}: {reason}") from None
    with collector:
        print(f"collector listening on {collector.url} (POST /v1/batch); Ctrl-C stops", flush=True)
        if given:  # never print a real key: its last characters identify it
            source = (
                "--write-key-file"
                if args.write_key_file
                else "--write-key"
                if args.write_key
                else ENV["write_key"]
            )
            print(f"accepts the write key from {source} (ending ...{key[-4:]})", flush=True)
        else:
            print(
                f"accepts write key {key!r} (the default; set {ENV['write_key']} to choose one)", flush=True
            )
        if conditions != Conditions():
            print(f"network conditions: {conditions}", flush=True)
        modes = {None: "as the API: strict when a request sends X-Strict-Mode: 1, else permissive"}
        print(f"answers {modes.get(args.answers, 'strict' if args.answers else 'permissive')}", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            show(collector.summary())
    return 0


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest


def cmd_track(args: argparse.Namespace) -> int:
    from .client import Client
    from .errors import CdpmpError

    key = _read_key(args)
    if not key:
        raise UserError(f"no write key (use --write-key-file or {ENV['write_key']})")
    if not args.user_id and not args.anonymous_id:
        raise UserError("give --user-id or --anonymous-id")
    if not args.event:
        raise UserError("--event must not be empty")
    properties = None
    if args.properties:
        try:
            properties = json.loads(args.properties)
        except ValueError as exc:
            raise UserError(f"--properties is not valid JSON: {exc}") from None
        except RecursionError:  # the parser's own limit (Python < 3.13)
            raise UserError("--properties is nested too deeply") from None
        if _depth(properties) > MAX_DEPTH:  # what no message may carry, whatever parsed it
            raise UserError("--properties is nested too deeply")
        if not isinstance(properties, dict):
            raise UserError(f"--properties must be a JSON object, got {type(properties).__name__}")
    if not args.timeout > 0:
        raise UserError("--timeout must be more than 0")
    if args.endpoint is not None:
        given = args.endpoint.strip()
        parsed = urllib.parse.urlsplit(given if "://" in given else f"https://{given}")
        if not given or not parsed.hostname:  # "" once meant the production endpoint
            raise UserError(f"--endpoint {args.endpoint!r} names no host (e.g. https://cdp.customer.io)")
        try:
            parsed.port  # noqa: B018 - raises for a port out of range
        except ValueError as exc:
            raise UserError(f"--endpoint {args.endpoint!r}: {exc}") from None
    errors: List[str] = []
    try:
        client = Client(
            key,
            endpoint=args.endpoint,
            sync_mode=True,
            timeout=args.timeout,
            on_error=lambda error, _: errors.append(str(error)),
        )
    except CdpmpError as exc:
        raise UserError(str(exc)) from None
    url = client.settings.shown_url
    print(f"sending to {url} (up to {args.timeout:g} s)", file=sys.stderr, flush=True)
    # The failure is reported below in command-line words; the library's own WARNING
    # lines speak to an app ("see stats()") and would only repeat it.
    logging.getLogger("cdpmp").setLevel(logging.ERROR)
    try:
        ok, msg = client.track(
            user_id=args.user_id, anonymous_id=args.anonymous_id, event=args.event, properties=properties
        )
    except CdpmpError as exc:  # e.g. --event "": the argument named, one line
        raise UserError(str(exc).replace("event:", "--event:", 1)) from None
    if ok:
        print(f"sent: messageId={msg['messageId']}")
        return 0
    reason = "; ".join(errors) or "refused"
    if args.endpoint is not None and "://" not in args.endpoint and "SSL" in reason:
        reason += f" (an endpoint without a scheme is taken as https://; for a local collector give http://{args.endpoint.strip()})"
    print(
        f"cdpmp track: FAILED, messageId={msg['messageId']} not delivered to {url}: {reason}", file=sys.stderr
    )
    return 1


def cmd_stats(args: argparse.Namespace) -> int:
    from .prometheus import prometheus_text, read_counters
    from .shared.files import candidates

    try:
        found, counters = read_counters(args.dir)
    except OSError as exc:
        print(f"cdpmp stats: cannot read the ring: {exc}", file=sys.stderr)
        return 1
    if counters is None:  # never create a ring just to report on it
        where = " or ".join([args.dir] if args.dir else candidates())
        print(f"cdpmp stats: no shared-mode ring in {where}", file=sys.stderr)
        return 1
    if args.prometheus:
        print(prometheus_text(counters), end="")
    else:
        print(json.dumps({"runtime_dir": found, **counters}, indent=None if args.json else 2))
    return 0


def cmd_uploader(args: argparse.Namespace) -> int:
    from .shared.uploader import main as uploader_main

    return uploader_main(["--dir", args.dir] if args.dir else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdpmp", description="Customer.io Data Pipelines client tools.")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="send a realistic mix of events to an embedded local collector and show what arrived"
    )
    demo.add_argument("--workers", type=int, default=0, help="fork N worker processes (default: none)")
    demo.add_argument("--events", type=int, default=50, help="events per process (default 50)")
    demo.add_argument("--mode", choices=["direct", "shared"], default=None, help="delivery mode")
    demo.set_defaults(func=cmd_demo)

    col = sub.add_parser(
        "collector", help="run the local collector (answers as the API) and print each message"
    )
    col.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: ephemeral)")
    col.add_argument("--write-key", help="key the collector accepts (prefer CDP_WRITE_KEY)")
    col.add_argument("--write-key-file", help="file holding the key")
    col.add_argument("--latency", type=float, default=0.0, help="seconds before each answer (a round trip)")
    col.add_argument("--jitter", type=float, default=0.0, help="extra uniform 0..JITTER seconds per answer")
    col.add_argument(
        "--outage",
        action="append",
        default=[],
        metavar="START:END:STATUS|drop",
        help="from START to END seconds after start, answer STATUS (or drop connections); repeatable",
    )
    col.add_argument(
        "--fault-rate", type=float, default=0.0, help="probability a request is answered 503 (0..1)"
    )
    answers = col.add_mutually_exclusive_group()
    answers.add_argument(
        "--strict",
        dest="answers",
        action="store_const",
        const=True,
        default=None,
        help="always answer what the API refuses with 400/401 (default: only when asked, as the API)",
    )
    answers.add_argument(
        "--permissive",
        dest="answers",
        action="store_const",
        const=False,
        help="always answer 200 and drop what the API refuses (the API without X-Strict-Mode)",
    )
    col.add_argument(
        "--rate-limit",
        type=int,
        default=3000,
        metavar="N",
        help="requests per 3 s before answering 429, as the API (0: none)",
    )
    col.set_defaults(func=cmd_collector)

    track = sub.add_parser("track", help="send one track event (inline, with retries)")
    track.add_argument("--write-key", help="write key (visible in argv; prefer CDP_WRITE_KEY)")
    track.add_argument("--write-key-file", help="file holding the write key")
    track.add_argument("--endpoint", help="override the endpoint (default: from the key's region)")
    track.add_argument("--user-id")
    track.add_argument("--anonymous-id")
    track.add_argument("--event", required=True)
    track.add_argument("--properties", help="JSON object")
    track.add_argument("--timeout", type=float, default=15.0, help="seconds to keep trying (default 15)")
    track.set_defaults(func=cmd_track)

    from .backfill._command import add_parser as add_import

    add_import(sub, _read_key)

    stats = sub.add_parser("stats", help="print the host-wide shared-mode counters (ring and uploader)")
    stats.add_argument("--dir", help="runtime directory (default: as producers resolve it)")
    form = stats.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one line of JSON")
    form.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
    stats.set_defaults(func=cmd_stats)

    uploader = sub.add_parser(
        "uploader", help="run the shared-mode uploader in the foreground (for systemd or a sidecar)"
    )
    uploader.add_argument(
        "--dir", help="runtime directory (default: $CDP_RUNTIME_DIR or /dev/shm/cdpmp-<uid>)"
    )
    uploader.set_defaults(func=cmd_uploader)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"cdpmp {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
