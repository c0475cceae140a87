"""Run the official client's own test suite (and Segment's, which it derives from)
against cdpmp, unmodified, through an import shim.

The suites ship inside the wheels installed by the ``test`` extra; they are copied
out of the installed package into a temporary directory at test time, never into
this tree. The shim is ours: a package of the official name whose module-level API
*is* ``cdpmp.analytics`` (attribute reads and assignments forwarded, so
``analytics.write_key = ...`` and ``analytics.default_client`` act on cdpmp), whose
``client.Client`` is ``cdpmp.Client`` and whose ``version.VERSION`` is cdpmp's.
Internal modules (``request``, ``consumer``, ``utils``) are not shimmed: tests that
import or mock them test the official implementation, not the public API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

_PROXY = '''
"""Shim: the official module-level API, served by cdpmp.analytics."""
import sys as _sys
import types as _types

from cdpmp import analytics as _impl

_SUBMODULES = {"test", "client", "version"}


class _Proxy(_types.ModuleType):
    def __getattr__(self, name):
        return getattr(_impl, name)

    def __setattr__(self, name, value):
        if name.startswith("__") or name in _SUBMODULES:
            super().__setattr__(name, value)
        else:
            setattr(_impl, name, value)


_sys.modules[__name__].__class__ = _Proxy
'''


def build_shim(root: Path, package: str) -> Path:
    """``root/<package>/analytics`` as a shim over cdpmp, with the official suite
    (``<package>/analytics/test``) copied from the installed wheel."""
    spec = importlib.util.find_spec(f"{package}.analytics")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package}.analytics is not installed: install the project with '.[test]'")
    installed = Path(next(iter(spec.submodule_search_locations)))
    shim = root / package / "analytics"
    shim.mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (shim / "__init__.py").write_text(_PROXY)
    (shim / "client.py").write_text("from cdpmp import Client  # noqa: F401\n")
    (shim / "version.py").write_text("from cdpmp import __version__ as VERSION  # noqa: F401\n")
    shutil.copytree(installed / "test", shim / "test", ignore=shutil.ignore_patterns("__pycache__"))
    return root


_DRIVER = """
import json, sys, unittest
def _why(err):
    return f"{err[0].__name__}: {err[1]}"[:300]
suite = unittest.defaultTestLoader.loadTestsFromNames(sys.argv[2:])
# Segment's TestClient defines ``fail(self, e, batch)`` as its on_error callback, which
# shadows unittest's ``fail``: every failed assertion there was swallowed (its own
# client "passed" them too). Route a one-argument call back to unittest's.
def _tests(s):
    for t in s:
        yield from (_tests(t) if isinstance(t, unittest.TestSuite) else [t])
for cls in {type(t) for t in _tests(suite)}:
    own = cls.__dict__.get("fail")
    if own is not None and own is not unittest.TestCase.fail:
        def fail(self, *args, _own=own, **kw):
            if len(args) + len(kw) >= 2:
                return _own(self, *args, **kw)
            return unittest.TestCase.fail(self, *args, **kw)
        cls.fail = fail
outcomes = {}
class Result(unittest.TextTestResult):
    def addSuccess(self, test):
        super().addSuccess(test); outcomes[test.id()] = "ok"
    def addFailure(self, test, err):
        super().addFailure(test, err); outcomes[test.id()] = "FAIL: " + _why(err)
    def addError(self, test, err):
        super().addError(test, err); outcomes[test.id()] = "ERROR: " + _why(err)
    def addSkip(self, test, reason):
        super().addSkip(test, reason); outcomes[test.id()] = "skipped"
unittest.TextTestRunner(resultclass=Result, verbosity=2).run(suite)
with open(sys.argv[1], "w") as out:
    json.dump(outcomes, out)
"""


def run_suite(root: Path, modules: Sequence[str], env: Dict[str, str]) -> Dict[str, str]:
    """Run ``modules`` with unittest in a subprocess; each test id
    (``module.Class.test``) → ``ok``, ``skipped``, or ``FAIL: why`` / ``ERROR: why``."""
    report = root / "outcomes.json"
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(report), *modules],
        cwd=root,
        env={**env, "PYTHONPATH": os.pathsep.join([str(root), env.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not report.is_file():
        raise AssertionError("the suite did not run:\n" + done.stderr[-4000:])
    outcomes: Dict[str, str] = json.loads(report.read_text())
    return outcomes


def failures(outcomes: Dict[str, str]) -> List[str]:
    return sorted(t for t, o in outcomes.items() if o.startswith(("FAIL", "ERROR")))


# Tests that import or mock the official implementation's internal modules
# (``request``, ``consumer``): they test that implementation, not the public API.
INTERNAL = {
    "customerio.analytics.test.client.TestClient.test_api_key_sent_to_other_region_host_warns",
    "customerio.analytics.test.client.TestClient.test_api_key_sent_to_own_region_host_does_not_warn",
    "customerio.analytics.test.client.TestClient.test_other_region_host_warns_once_per_client",
    "customerio.analytics.test.client.TestClient.test_proxies",
    "customerio.analytics.test.client.TestClient.test_user_defined_upload_interval",
    "customerio.analytics.test.client.TestClient.test_user_defined_upload_size",
    "segment.analytics.test.test_client.TestClient.test_proxies",
    "segment.analytics.test.test_client.TestClient.test_user_defined_upload_size",
}

_LIBRARY = "`context.library` is `{name: cdpmp, version}`, not `analytics-python`"
_SEGMENT_ADVANCED = (
    "timestamps always carry milliseconds (`…T00:00:00.000+00:00`); `context.library` is cdpmp's"
    " (these assertions ran only once Segment's `fail` callback no longer shadowed unittest's)"
)
_BAD_KEY = (
    "cdpmp asks for strict mode (`X-Strict-Mode: 1`): a key the API does not know is answered 401 and"
    " reported to `on_error` (the official client hears 200 and its event is dropped unseen)"
)

# Public-API tests that fail, each for a documented difference (README, "Differences").
DIFFERENCES = {
    "customerio.analytics.test.client.TestClient.test_advanced_group": _LIBRARY,
    "customerio.analytics.test.client.TestClient.test_advanced_identify": _LIBRARY,
    "customerio.analytics.test.client.TestClient.test_advanced_page": _LIBRARY,
    "customerio.analytics.test.client.TestClient.test_advanced_screen": _LIBRARY,
    "customerio.analytics.test.client.TestClient.test_advanced_track": _LIBRARY,
    "customerio.analytics.test.client.TestClient.test_success_on_invalid_write_key": _BAD_KEY,
    "segment.analytics.test.test_client.TestClient.test_success_on_invalid_write_key": _BAD_KEY,
    **{
        f"segment.analytics.test.test_client.TestClient.test_advanced_{kind}": _SEGMENT_ADVANCED
        for kind in ("group", "identify", "page", "screen", "track")
    },
}

SUITES = {
    "customerio": ["customerio.analytics.test", "customerio.analytics.test.client"],
    "segment": [
        "segment.analytics.test.test_client",
        "segment.analytics.test.test_init",
        "segment.analytics.test.test_module",
    ],
}
