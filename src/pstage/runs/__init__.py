"""The run directory: the contract every stage meets at (``RunInfo`` for run.json, ``RunDir`` for the folder)."""
