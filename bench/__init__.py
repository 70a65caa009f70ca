"""Benchmarks of genre-search against the usual Optuna + MLflow + DataLoader setup.

Run each script as a module from the repository root, e.g. ``python -m bench.bench_peer``.
"""
