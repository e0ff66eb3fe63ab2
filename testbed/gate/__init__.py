"""gate — judging runs against expectations and committed baselines: ``[expect]`` checks, baseline
comparison, the gate that runs scenarios, and its three reports (text, JUnit, markdown).

Imports: engine (to run), record, diagnose, scenario.
"""
