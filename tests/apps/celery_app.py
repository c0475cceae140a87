"""A Celery app for the prefork tests: kombu's filesystem broker (no server needed).

``CELERY_FS_DIR`` names the broker folder. The one-line integration is the import;
``APP_NO_INTEGRATION=1`` leaves it out (an app that forgot it), and then imports cdpmp
*before* Celery, the harder order for cdpmp's own detection of a worker.
"""

from __future__ import annotations

import os

from cdpmp import analytics  # isort: skip  (before Celery: see the docstring)
from celery import Celery  # isort: skip

if os.environ.get("APP_NO_INTEGRATION") != "1":
    import cdpmp.integrations.celery  # noqa: F401  (connects the worker signals)

_folder = os.environ.get("CELERY_FS_DIR", "/tmp/cdpmp-celery")
os.makedirs(_folder, exist_ok=True)

app = Celery("cdpmp_tests", broker="filesystem://")
app.conf.broker_transport_options = {
    "data_folder_in": _folder,
    "data_folder_out": _folder,
    # kombu's default is "control" in the working directory: the repository.
    "control_folder": os.path.join(_folder, "control"),
}
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_hijack_root_logger = False


@app.task(name="emit")
def emit(rid: str, k: int) -> int:
    accepted = 0
    for j in range(k):
        ok, _ = analytics.track(
            user_id=rid, event="Task", message_id=f"{rid}-{j}", properties={"pid": os.getpid()}
        )
        accepted += int(ok)
    return accepted
