"""The run directory: the contract every stage meets at."""
