"""integrations — testbed inside other people's code: the drop-in monitor for a user's DDP loop (with its
TensorBoard writer and logger scalars), the HF Trainer callback (and its loss reader), the Lightning
callback, the pytest plugin (scenario files as test items). One module per framework.

Imports: engine (the hook, the row builder), gate (the plugin), record, diagnose, metrics.
"""
