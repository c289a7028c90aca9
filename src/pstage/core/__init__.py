"""Shared ground: errors, console, compat, devices, tasks, metrics, atomic file writes."""
