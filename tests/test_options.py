"""The one options table, the one outcome policy and the module map.

Adding an option is a change in ``cdpmp/_option_table.py`` plus its use: these tests check
that everything else (``Client``'s signature, the module settings, the environment,
the uploader's source entries, the README) follows from that table.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

import cdpmp
from cdpmp import _options, analytics
from cdpmp._outcome import DROP_REASONS, Ledger, classify_exception, classify_status, loss_reason
from cdpmp.errors import APIError, InternalError, MessageRejected, ShutdownAbandoned, TransportError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cdpmp"


def test_the_configuration_page_table_is_the_options_table() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert _options.markdown_table() in page


def test_client_takes_the_official_positional_order() -> None:
    official = pytest.importorskip("customerio.analytics")
    theirs = [p for p in inspect.signature(official.Client.__init__).parameters if p != "self"]
    ours = list(inspect.signature(cdpmp.Client).parameters)
    assert ours[: len(theirs)] == theirs
    client = cdpmp.Client(
        "k", "http://127.0.0.1:1", False, 7, False, None, True, 3, False, 2.5, None, 1, 9, 0.2
    )
    settings = client.settings
    assert (settings.endpoint, settings.max_queue_size, settings.send, settings.gzip) == (
        "http://127.0.0.1:1",
        7,
        False,
        True,
    )
    assert (settings.max_retries, settings.timeout, settings.upload_size, settings.upload_interval) == (
        3,
        2.5,
        9,
        0.2,
    )


def test_every_option_is_a_module_setting_and_a_client_attribute() -> None:
    names = {f.name for f in _options.FIELDS}
    assert names | {"host"} == set(analytics.SETTINGS)
    client = cdpmp.Client("k", endpoint="http://127.0.0.1:1", send=False)
    for name in names:
        assert getattr(client, name) == getattr(client.settings, name)
    assert client.host == "http://127.0.0.1:1"


def test_unknown_argument_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="upload_sise"):
        cdpmp.Client("k", upload_sise=5)


@pytest.mark.parametrize("field", [f for f in _options.FIELDS + _options.HOST_FIELDS if f.metadata["env"]])
def test_every_environment_variable_is_read_through_the_table(field: Any) -> None:
    env_name = field.metadata["env"]
    value = {
        "write_key": "from-env",
        "endpoint": "http://127.0.0.1:9",
        "mode": "shared",
        "runtime_dir": "/nowhere",
    }.get(field.name)
    if value is None:
        flag = isinstance(field.default, bool)
        value = ("false" if field.default else "true") if flag else str((field.default or 0) + 1)
    if field in _options.HOST_FIELDS:
        resolved: Any = _options.host_settings(env={env_name: value})
    else:
        resolved = _options.resolve(
            {"write_key": "k"} if field.name != "write_key" else {}, env={env_name: value}
        )
    assert getattr(resolved, field.name) != field.default


def _string_constants(tree: ast.AST) -> Set[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_no_module_but_the_table_names_an_environment_variable() -> None:
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_option_table.py":
            continue
        names = _string_constants(ast.parse(path.read_text()))
        found = sorted(s for s in names if re.fullmatch(r"CDP_[A-Z0-9_]+", s))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


def test_source_entries_round_trip_without_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_UPLOAD_SIZE", "7")
    settings = _options.resolve({"write_key": "pk_eu_k", "gzip": True, "retry_budget": 3.0})
    entry = _options.source_entry(settings)
    assert set(entry) == set(_options.SOURCE_FIELDS)
    monkeypatch.setenv("CDP_UPLOAD_SIZE", "99")  # the uploader's environment does not apply
    rebuilt = _options.from_source_entry(entry)
    assert _options.source_entry(rebuilt) == entry
    assert rebuilt.upload_size == 7 and rebuilt.bearer and rebuilt.gzip


def _imports(path: Path) -> Set[str]:
    """Modules of cdpmp imported at module level by ``path`` (relative imports)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:
                out.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                out.add(target)
        elif isinstance(node, ast.If):  # TYPE_CHECKING blocks do not run
            continue
    return out


def test_module_level_imports_have_no_cycle() -> None:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()
    }
    # The package __init__ re-exports the public surface: it may import anything.
    graph["cdpmp"] = set()
    visiting: List[str] = []
    done: Set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(node) :], node])
        visiting.append(node)
        for nxt in graph[node]:
            visit(nxt)
        visiting.pop()
        done.add(node)

    for node in graph:
        visit(node)


def test_modules_stay_small() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 400} == {}


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "success"),
        (201, "success"),
        (202, "success"),
        (204, "success"),
        (301, "final"),
        (302, "final"),
        (307, "final"),
        (308, "final"),
        (400, "final"),
        (401, "final"),
        (403, "final"),
        (404, "final"),
        (408, "retry"),
        (413, "final"),
        (429, "retry"),
        (500, "retry"),
        (501, "final"),
        (502, "retry"),
        (503, "retry"),
        (504, "retry"),
        (505, "final"),
    ],
)
def test_one_response_classification(status: int, verdict: str) -> None:
    assert classify_status(status) == verdict


def test_exception_classification() -> None:
    import urllib3

    assert classify_exception(urllib3.exceptions.ReadTimeoutError(None, "/", "slow")) == "retry"
    assert classify_exception(urllib3.exceptions.NewConnectionError(None, "refused")) == "retry"
    assert classify_exception(ConnectionResetError()) == "retry"
    assert classify_exception(urllib3.exceptions.LocationValueError("bad url")) == "final"
    assert classify_exception(ZeroDivisionError()) == "final"


def test_every_loss_is_charged_to_one_reason() -> None:
    assert loss_reason(APIError(400, "bad", "no")) == "rejected"
    assert loss_reason(APIError(503, "down", "later", final=False)) == "undeliverable"
    assert loss_reason(TransportError("timeout")) == "undeliverable"
    assert loss_reason(ShutdownAbandoned("late")) == "shutdown"
    assert loss_reason(InternalError("bug")) == "undeliverable"
    for reason in ("queue_full", "oversize", "unserializable"):
        assert loss_reason(MessageRejected(reason, "x")) == reason
    assert set(DROP_REASONS) >= {"queue_full", "oversize", "unserializable", "shutdown"}


def test_ledger_counts_logs_once_and_survives_a_raising_callback(caplog: pytest.LogCaptureFixture) -> None:
    seen: List[Dict[str, Any]] = []

    def on_error(error: Exception, batch: List[Dict[str, Any]]) -> None:
        seen.extend(batch)
        raise RuntimeError("callback bug")

    ledger = Ledger(on_error)
    with caplog.at_level(logging.WARNING, logger="cdpmp"):
        for _ in range(3):
            ledger.lost(APIError(400, "bad", "no"), [b'{"messageId":"a"}', {"messageId": "b"}])
    stats = ledger.snapshot("direct", 0, None)
    assert stats["dropped"]["rejected"] == 6 and stats["failed"] == 6
    assert [m["messageId"] for m in seen] == ["a", "b"] * 3
    given_up = [r for r in caplog.records if "given up" in r.getMessage()]
    assert len(given_up) == 1  # rate-limited
    assert sum("on_error callback raised" in r.getMessage() for r in caplog.records) == 1


def test_an_internal_error_is_loud_final_and_counted(
    collector: Any, internal_errors: List[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cdpmp import _transport

    def broken(self: Any, body: bytes, timeout: float) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(_transport.Transport, "_post_once", broken)
    errors: List[Exception] = []
    client = cdpmp.Client(
        collector.write_key, endpoint=collector.url, sync_mode=True, on_error=lambda e, b: errors.append(e)
    )
    ok, _ = client.track("u", "E")
    stats = client.stats()
    assert not ok and isinstance(errors[0], InternalError)
    assert stats["requests"] == 1 and stats["retries"] == 0  # never retried
    assert stats["internal_errors"] >= 1 and stats["dropped"]["undeliverable"] == 1
    assert len(internal_errors) == 1 and internal_errors[0].levelno == logging.WARNING
    assert internal_errors[0].exc_info is not None
