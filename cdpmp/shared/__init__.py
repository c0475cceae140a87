"""Shared mode: one uploader per host and user, fed through a shared-memory ring.

Modules, each owning one thing:

* :mod:`.sink` — the producer side: ``SharedSink``, what ``track()`` runs, and its watch
  (a timed job of the process's sender threads);
* :mod:`.ring` — the handle on the ring and its lock discipline; :mod:`.layout` — the
  file's byte format (specified in its docstring), its checks and record parsing;
  :mod:`.header` — the header's bookkeeping fields (counters, uploader, producers);
* :mod:`.holding` — what each source holds in the ring, and moving a failing source's
  records out of the others' way;
* :mod:`.files` — the 0700 runtime directory and every other file in it (the sources
  file that carries write keys to the uploader, the dead-letter file);
  :mod:`.notices` — final rejections carried back to the producers of their source;
* :mod:`.lifecycle` — the uploader as seen from outside: liveness, the one launcher,
  ``ensure``, ``stop``;
* :mod:`.uploader` — the uploader process itself (``python -m cdpmp.shared.uploader``):
  election, signals, draining, idle exit, a replaced ring; it drives a
  :mod:`.dispatch` — ring records to per-source batches to requests, settled by the
  engine's rules — which keeps what a pass has read in a :mod:`.window` and each
  source's settings, transport and lane in :mod:`.sources`.
"""
