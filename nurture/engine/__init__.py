"""The pure run semantics: the interpreter over the intermediate form, the data a run exchanges
with its runtime, and local-time arithmetic. Workflow-safe: no I/O, no template engine."""
