"""Shared mode: one uploader per host and user, fed through a shared-memory ring.

Modules, each owning one thing:

* :mod:`.ring` — the ring file's binary format (specified in its docstring) and its
  lock discipline;
* :mod:`.files` — the 0700 runtime directory and every other file in it (the sources
  file that carries write keys to the uploader, the dead-letter file);
* :mod:`.sink` — the producer side: ``SharedSink``, what ``track()`` runs;
* :mod:`.lifecycle` — the uploader as seen from outside: liveness, the one launcher,
  ``ensure``, ``stop``;
* :mod:`.uploader` — the uploader process itself (``python -m cdpmp.shared.uploader``).
"""
