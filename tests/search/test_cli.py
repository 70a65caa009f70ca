"""Tests of the command line's flag checks, exit statuses and help texts."""

from __future__ import annotations

from pathlib import Path

import click
import optuna
import pytest
import yaml
from click.testing import CliRunner

from search.cli import main

TINY_STUDY = {
    "dataset": {"synthetic": {"n_genres": 2, "tracks_per_genre": 4, "seconds": 2.0},
                "sample_rate": 8000, "segment_seconds": 0.5},
    "features": {"n_fft": 256, "hop_length": 128, "n_mels": 32},
    "search_space": {"family": "cnn", "learning_rate": 1.0e-3, "batch_size": 8},
    "training": {"epochs": 1},
    "n_trials": 1,
    "storage": "sqlite:///optuna.db",
    "tracking_uri": "sqlite:///mlflow.db",
    "cache_dir": "cache",
}


@pytest.fixture
def studies_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("GENRE_SEARCH_STORAGE", "GENRE_SEARCH_TRACKING_URI", "GENRE_SEARCH_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "studies.yaml"
    path.write_text(yaml.safe_dump({"studies": {"tiny": TINY_STUDY}}))
    return path


def test_every_command_has_help_text() -> None:
    assert isinstance(main, click.Group)
    for name, command in main.commands.items():
        # `genre-search --help` lists a summary line for each command.
        assert command.help, f"command {name} has no help text"


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_launch_invalid_device_exits_2(studies_file: Path, device: str) -> None:
    result = CliRunner().invoke(main, ["launch", "tiny", "--config", str(studies_file),
                                       "--device", device])
    assert result.exit_code == 2, result.output
    assert f"device='{device}' is invalid" in result.output
    # Nothing is created for a rejected launch.
    assert not (studies_file.parent / "optuna.db").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_launch_unavailable_cuda_exits_2(studies_file: Path) -> None:
    result = CliRunner().invoke(main, ["launch", "tiny", "--config", str(studies_file),
                                       "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output
    assert "Traceback" not in result.output


def test_second_launch_on_running_sqlite_study_exits_2(studies_file: Path) -> None:
    storage = f"sqlite:///{studies_file.parent / 'optuna.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage)
    # A trial left RUNNING stands for another launch that is still training.
    study.ask()

    result = CliRunner().invoke(main, ["launch", "tiny", "--config", str(studies_file),
                                       "--device", "cpu", "--n-trials", "1"])

    assert result.exit_code == 2, result.output
    assert "PostgreSQL" in result.output
    # No second trial was started.
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 1


def test_launch_writes_nothing_in_working_folder(
    studies_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    result = CliRunner().invoke(main, ["launch", "tiny", "--config", str(studies_file),
                                       "--device", "cpu"])

    assert result.exit_code == 0, result.output
    # Storage, tracking store, artifacts and cache all live beside studies.yaml.
    assert list(elsewhere.iterdir()) == []
    assert (studies_file.parent / "mlartifacts").is_dir()
