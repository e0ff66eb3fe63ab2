"""schema: the keys of every record testbed writes, owned in one place (stdlib only, the bottom room).

A metrics row's keys (``row.py``) are written by ``metrics``/``engine``/``integrations`` and read by
``diagnose``, ``gate``, ``report`` and ``record``: each imports the names from here instead of
spelling the strings, so a key is renamed or added in one definition.
"""
