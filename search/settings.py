"""Environment variables that genre-search reads, each with its default and meaning.

Precedence for every setting, highest first: an explicit CLI flag, then the environment
variable listed here, then the study's entry in ``studies.yaml``, then the ``defaults`` block
of ``studies.yaml``, then the code default in :mod:`search.config`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvironmentVariable:
    """One environment variable read by genre-search."""

    name: str
    meaning: str

    def get(self) -> str | None:
        """Return the variable's value, or ``None`` when it is unset or empty."""
        value = os.environ.get(self.name, "").strip()
        return value or None


CONFIG = EnvironmentVariable(
    "GENRE_SEARCH_CONFIG", "Path of studies.yaml (default: ./studies.yaml)."
)
STORAGE = EnvironmentVariable(
    "GENRE_SEARCH_STORAGE",
    "Optuna storage URL, e.g. postgresql+psycopg://user@host/optuna. Overrides `storage`.",
)
TRACKING_URI = EnvironmentVariable(
    "GENRE_SEARCH_TRACKING_URI",
    "MLflow tracking URI, e.g. http://127.0.0.1:5000. Overrides `tracking_uri`.",
)
DATA = EnvironmentVariable(
    "GENRE_SEARCH_DATA", "Dataset folder in genre sub-folders. Overrides `dataset.path`."
)
CACHE_DIR = EnvironmentVariable(
    "GENRE_SEARCH_CACHE_DIR", "Folder of the feature cache. Overrides `cache_dir`."
)
DEVICE = EnvironmentVariable(
    "GENRE_SEARCH_DEVICE", "Training device: auto, cpu, cuda, cuda:N or mps. Overrides `device`."
)

STORAGE_FILE = EnvironmentVariable(
    "GENRE_SEARCH_STORAGE_FILE",
    "File whose first line is the Optuna storage URL, password included (e.g. a container "
    "secret). Used when neither --storage nor GENRE_SEARCH_STORAGE is set.",
)
NUM_THREADS = EnvironmentVariable(
    "GENRE_SEARCH_NUM_THREADS",
    "torch intra-op threads of this worker. Overrides `training.num_threads`; `launch "
    "--workers N` sets it for each worker to the CPU cores divided by N.",
)
HEARTBEAT_INTERVAL = EnvironmentVariable(
    "GENRE_SEARCH_HEARTBEAT_INTERVAL",
    "Seconds between heartbeats of a running trial (default 10).",
)
GRACE_PERIOD = EnvironmentVariable(
    "GENRE_SEARCH_GRACE_PERIOD",
    "Seconds without a heartbeat after which another worker fails and retries a trial "
    "(default 60). Keep it several times the heartbeat interval.",
)

ALL_VARIABLES = (CONFIG, STORAGE, TRACKING_URI, DATA, CACHE_DIR, DEVICE, STORAGE_FILE,
                 NUM_THREADS, HEARTBEAT_INTERVAL, GRACE_PERIOD)
