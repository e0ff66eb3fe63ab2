"""integrations — testbed inside other people's code: the drop-in monitor for a user's DDP loop, the
HF Trainer callback, the pytest plugin (scenario files as test items).

Imports: engine (the hook, the row builder), gate (the plugin), record, diagnose, metrics.
"""
