"""scenario — what a run is: the TOML spec and its validation, the registries of pluggable kinds,
``[expect]`` and ``[sweep]`` tables, dotted overrides.

The bottom room: imports only the standard library (no torch, no numpy), so a scenario is refused
before any process starts and any room may read one.
"""
