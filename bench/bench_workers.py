"""Measure trials per hour with 1 and with 2 CPU workers on the same study, side by side.

Usage (PostgreSQL on 127.0.0.1:5432 as user postgres, real clips in genre folders)::

    GENRE_SEARCH_BENCH_DATA=/path/to/gtzan-mini python bench/bench_workers.py --n-trials 6

Each run gets a fresh database and MLflow store and goes through ``genre-search launch
--workers N`` with one torch thread per worker. Throughput counts the span from the first
trial's start to the last trial's end, so process start and feature extraction are left
out. The wall time printed next to it includes them.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import psycopg

_logger = logging.getLogger("bench_workers")

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

STUDIES_YAML = """
defaults:
  cache_dir: {cache_dir}
  device: cpu
studies:
  bench:
    dataset:
      path: {data}
      sample_rate: 22050
      segment_seconds: 3.0
      split: {{method: random, valid_fraction: 0.2, test_fraction: 0.0, seed: 0}}
    training: {{epochs: {epochs}, num_threads: 1}}
    pruner: {{name: none}}
    sampler: {{name: random, seed: 0}}
    n_trials: {n_trials}
    search_space:
      family: {{choices: [cnn]}}
      learning_rate: {{low: 1.0e-3, high: 3.0e-3, log: true}}
      batch_size: {{choices: [16]}}
      dropout: {{low: 0.0, high: 0.2}}
      weight_decay: {{low: 1.0e-6, high: 1.0e-4, log: true}}
      optimizer: {{choices: [adam]}}
      architectures:
        cnn:
          n_conv_layers: {{low: 3, high: 3}}
          base_channels: {{choices: [8]}}
          kernel_size: {{choices: [3]}}
"""


def run_once(workdir: Path, n_workers: int, env: dict[str, str]) -> tuple[float, float]:
    """Run the study with ``n_workers`` workers; return (trials per hour, wall seconds)."""
    database = f"bench_workers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    storage = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    try:
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "search", "launch", "bench", "--workers", str(n_workers),
             "--threads", "1", "--storage", storage,
             "--tracking-uri", f"sqlite:///{workdir / f'mlflow-{n_workers}.db'}", "--quiet"],
            cwd=workdir, env=env, check=True,
        )
        wall = time.monotonic() - started
        study = optuna.load_study(study_name="bench", storage=storage)
        trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        span = (max(t.datetime_complete for t in trials)
                - min(t.datetime_start for t in trials)).total_seconds()
        return len(trials) * 3600.0 / span, wall
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def main() -> int:
    """Run the benchmark and print one line per worker count and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = os.environ.get("GENRE_SEARCH_BENCH_DATA") or os.environ.get("GENRE_SEARCH_TEST_DATA")
    if not data:
        _logger.error("set GENRE_SEARCH_BENCH_DATA (or GENRE_SEARCH_TEST_DATA) to a folder of "
                      "audio in genre sub-folders, e.g. gtzan-mini")
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-workers-") as temp:
        workdir = Path(temp)
        (workdir / "studies.yaml").write_text(STUDIES_YAML.format(
            cache_dir=workdir / "cache", data=Path(data).resolve(), epochs=args.epochs,
            n_trials=args.n_trials))
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("GENRE_SEARCH")}
        results = {n_workers: run_once(workdir, n_workers, env) for n_workers in (1, 2)}

    for n_workers, (rate, wall) in results.items():
        _logger.info("%d worker(s): %.0f trials/hour (%d trials, %d epochs, wall %.0f s)",
                     n_workers, rate, args.n_trials, args.epochs, wall)
    _logger.info("speed-up with 2 workers: %.2fx (cores: %d)", results[2][0] / results[1][0],
                 len(os.sched_getaffinity(0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
