"""The command line's one error: a usage mistake, answered with one line and exit 2
(raised by :mod:`cdpmp.cli` and by the commands it loads, such as ``cdpmp import``)."""


class UserError(Exception):
    """A mistake on the command line: one line on stderr, exit status 2."""
