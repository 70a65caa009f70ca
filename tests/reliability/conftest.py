"""Shared helpers of the reliability tests: a tiny study file and ways to run the CLI."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import yaml

TEST_DATA_VARIABLE = "GENRE_SEARCH_TEST_DATA"
SAMPLE_RATE = 8000

TINY_DEFAULTS: dict[str, Any] = {
    "storage": "sqlite:///optuna.db",
    "tracking_uri": "sqlite:///mlflow.db",
    "cache_dir": "cache",
    "device": "cpu",
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "training": {"epochs": 1, "seed": 0, "num_threads": 1},
    "features": {"n_fft": 256, "hop_length": 128, "n_mels": 16, "f_min": 0.0, "f_max": 4000.0},
    "search_space": {
        "family": {"choices": ["cnn"]},
        "learning_rate": {"low": 1.0e-3, "high": 2.0e-3, "log": True},
        "batch_size": {"choices": [8]},
        "dropout": {"low": 0.0, "high": 0.1},
        "weight_decay": {"low": 1.0e-6, "high": 1.0e-5, "log": True},
        "optimizer": {"choices": ["adam"]},
        "architectures": {
            "cnn": {
                "n_conv_layers": {"low": 1, "high": 2},
                "base_channels": {"choices": [4]},
                "kernel_size": {"choices": [3]},
            },
        },
    },
}

TINY_STUDY: dict[str, Any] = {
    "dataset": {
        "synthetic": {"n_genres": 2, "tracks_per_genre": 4, "seconds": 2.0, "seed": 0},
        "sample_rate": SAMPLE_RATE,
        "segment_seconds": 1.0,
        "split": {"method": "random", "valid_fraction": 0.25, "seed": 0},
    },
    "n_trials": 2,
}


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` deep-merged with ``changes``; a value of None deletes the key."""
    result = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def write_studies(folder: Path, study: Mapping[str, Any] | None = None, *,
                  defaults: Mapping[str, Any] | None = None, name: str = "tiny") -> Path:
    """Write a studies.yaml with one tiny study ``name`` into ``folder`` and return its path."""
    document = {
        "defaults": merge(TINY_DEFAULTS, defaults or {}),
        "studies": {name: merge(TINY_STUDY, study or {})},
    }
    path = folder / "studies.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def real_data_study(data: Path, **changes: Any) -> dict[str, Any]:
    """Study entry that reads audio folder ``data`` instead of generating audio."""
    return merge({"dataset": {"synthetic": None, "path": str(data)}}, changes)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: no GENRE_SEARCH_* leak-in, fast MLflow failures."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("GENRE_SEARCH_")}
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(args: list[str], *, cwd: Path, timeout: float = 120,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m search ARGS`` in ``cwd`` and return the finished process."""
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env=dict(env or cli_env()))


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_tone(path: Path, *, seconds: float = 2.0, frequency: float = 440.0,
               sample_rate: int = SAMPLE_RATE, channels: int = 1,
               subtype: str | None = None, format: str | None = None) -> Path:
    """Write a noisy sine tone, the kind of signal a tiny model can learn from."""
    rng = np.random.default_rng(int(frequency))
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    tone = 0.4 * np.sin(2 * np.pi * frequency * time) + 0.05 * rng.standard_normal(time.size)
    samples = np.repeat(tone[:, None], channels, axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate, subtype=subtype, format=format)
    return path


def write_genres(root: Path, genres: Mapping[str, float], *, n_tracks: int = 4,
                 seconds: float = 2.0) -> Path:
    """Write ``n_tracks`` clean tones per genre (genre name -> base frequency in Hz)."""
    for genre, frequency in genres.items():
        for index in range(n_tracks):
            write_tone(root / genre / f"{genre}.{index:05d}.wav", seconds=seconds,
                       frequency=frequency + 10 * index)
    return root


@pytest.fixture(scope="session")
def gtzan_root() -> Path:
    """Folder of the real gtzan-mini clips, from the GENRE_SEARCH_TEST_DATA variable."""
    value = os.environ.get(TEST_DATA_VARIABLE)
    if not value:
        pytest.skip(f"{TEST_DATA_VARIABLE} is not set; point it at the gtzan-mini clips")
    base = Path(value).expanduser()
    root = base / "gtzan-mini" if (base / "gtzan-mini").is_dir() else base
    if not (root / "blues").is_dir():
        pytest.fail(f"{TEST_DATA_VARIABLE}={value!r} has no blues/ sub-folder; set it to the "
                    "gtzan-mini folder or the folder that contains it")
    return root


def written_files(folder: Path) -> set[str]:
    """Relative paths of every file under ``folder`` (studies.yaml excluded)."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")
            if path.is_file() and path.name != "studies.yaml"}
