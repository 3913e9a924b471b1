"""Contract suites for foliosync's adapters, shipped so that every adapter, ours or an app's, is
held to the same rules: a store, a fan-out or a feed that passes its suite can replace ours.

Each suite is a set of plain async checks taking a factory; ``tests/`` runs them against every
adapter foliosync ships, and an app runs them against its own (see each module's docstring).
"""
