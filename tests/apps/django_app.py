"""Django in one module: its settings, URLconf and view, for ``runserver`` (``python -m
django runserver --settings tests.apps.django_app``). ``GET /?id=R&k=K`` tracks K events
with messageIds ``R-0 .. R-(K-1)`` and answers "ok" when every ``track()`` succeeded.
Settings come from the environment (``CDP_WRITE_KEY``, ``CDP_ENDPOINT``...)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path

from cdpmp import analytics

SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = __name__
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}


def track(request: HttpRequest) -> HttpResponse:
    rid = request.GET.get("id", "anon")
    ok = True
    for j in range(int(request.GET.get("k", "1"))):
        ok = analytics.track(user_id=rid, event="Request", message_id=f"{rid}-{j}")[0] is not False and ok
    return HttpResponse(b"ok" if ok else b"fail", content_type="text/plain")


urlpatterns = [path("", track)]
