"""Runtime backends: one small interface, one registry, and the fallback chain.

A backend loads one artifact, runs (1, S) token ids to logits, hands out a generation `Stepper` when its artifact has
a KV cache, and describes what actually ran. Adding a backend: one new module here, its config, and one line in
`registry.SPECS` (what it can do, what it loads).
"""
