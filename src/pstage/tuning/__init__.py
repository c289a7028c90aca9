"""Hyper-parameter search: Optuna (and Ray Tune) trials that are runs."""
