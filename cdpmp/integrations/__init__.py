"""One-line integrations with pre-fork servers.

Each submodule imports its framework only inside itself, so ``import cdpmp`` never
imports gunicorn, uWSGI or Celery:

* :mod:`cdpmp.integrations.gunicorn` — hooks for ``gunicorn.conf.py``;
* :mod:`cdpmp.integrations.uwsgi` — postfork registration and the threads check;
* :mod:`cdpmp.integrations.celery` — worker signals for the prefork pool.
"""
