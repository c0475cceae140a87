"""gunicorn config used by the tests: the README's one line."""

from cdpmp.integrations.gunicorn import install

install(globals())
