"""Secrets stay out of logs and MLflow; weights never unpickle code; files stay in their folders."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import torch
from conftest import cli_env, free_port, real_data_study, run_cli, write_genres, write_studies
from mlflow.pyfunc.model import PythonModelContext

from search.config import redact_url
from search.registry import GenreClassifier

_PASSWORD = "s3cret-Pa55word"
_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database on the local server (trust auth), dropped afterwards."""
    name = f"reliability_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(_POSTGRES, autocommit=True, connect_timeout=3) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL server at 127.0.0.1:5432 ({error})")
    yield name
    with psycopg.connect(_POSTGRES, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _files_containing(folder: Path, secret: str) -> list[Path]:
    return [path for path in folder.rglob("*")
            if path.is_file() and secret.encode() in path.read_bytes()]


def test_redact_url_removes_password() -> None:
    redacted = redact_url(f"postgresql+psycopg://user:{_PASSWORD}@db.example:5432/optuna")
    # The password is gone.
    assert _PASSWORD not in redacted
    # Host, port and database stay, so the message is still useful.
    assert "db.example:5432/optuna" in redacted


def test_launch_storage_password_not_echoed(tmp_path: Path) -> None:
    write_studies(tmp_path)
    url = f"postgresql+psycopg://postgres:{_PASSWORD}@127.0.0.1:{free_port()}/optuna"
    result = run_cli(["launch", "tiny", "--no-progress", "--storage", url], cwd=tmp_path,
                     timeout=90)
    # The run fails (bad input or unreachable server), it does not go on.
    assert result.returncode in {1, 2}
    # The password is not echoed in any message.
    assert _PASSWORD not in result.stdout + result.stderr


def test_launch_tracking_password_hidden(tmp_path: Path) -> None:
    write_studies(tmp_path)
    uri = f"http://admin:${{TRACKING_PW}}@127.0.0.1:{free_port()}"
    result = run_cli(["launch", "tiny", "--no-progress", "--tracking-uri", uri], cwd=tmp_path,
                     env=cli_env(TRACKING_PW=_PASSWORD), timeout=90)
    # An unreachable server is a runtime error.
    assert result.returncode == 1, result.stderr[-3000:]
    # The expanded password appears nowhere in the output.
    assert _PASSWORD not in result.stdout + result.stderr


@pytest.mark.slow
def test_launch_storage_password_not_in_mlflow(tmp_path: Path,
                                                       postgres_database: str) -> None:
    data = write_genres(tmp_path / "data", {"rock": 300.0, "jazz": 600.0}, n_tracks=3)
    storage = f"postgresql+psycopg://postgres:${{STORAGE_PW}}@127.0.0.1:5432/{postgres_database}"
    write_studies(tmp_path, real_data_study(data, n_trials=1, storage=storage))

    result = run_cli(["launch", "tiny", "--no-progress", "-v"], cwd=tmp_path,
                     env=cli_env(STORAGE_PW=_PASSWORD), timeout=300)

    # Trust auth accepts any password, so the study runs against PostgreSQL.
    assert result.returncode == 0, result.stderr[-3000:]
    # The password is in no log line, even at DEBUG.
    assert _PASSWORD not in result.stdout + result.stderr
    # No MLflow param, tag, metric or artifact file (nor any other file written) contains it.
    assert _files_containing(tmp_path, _PASSWORD) == []


def _classifier_artifacts(folder: Path, state_dict_path: Path) -> PythonModelContext:
    config = {"classes": ["jazz", "rock"], "family": "cnn",
              "feature_settings": {"sample_rate": 8000, "n_fft": 256, "hop_length": 128,
                                   "n_mels": 16, "segment_seconds": 1.0},
              "model_params": {"n_conv_layers": 1, "base_channels": 4, "kernel_size": 3,
                               "dropout": 0.0}}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save({"mean": torch.zeros(16), "std": torch.ones(16)}, folder / "normalization.pt")
    artifacts = {"classifier_config": str(folder / "config.json"),
                 "normalization": str(folder / "normalization.pt"),
                 "state_dict": str(state_dict_path)}
    return PythonModelContext(artifacts=artifacts, model_config={})  # type: ignore[no-untyped-call]


class _RunsCode:
    """A pickle payload that creates a marker file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_classifier_rejects_pickled_code_in_weights(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    weights = tmp_path / "state_dict.pt"
    torch.save({"head.weight": _RunsCode(marker)}, weights)
    context = _classifier_artifacts(tmp_path, weights)

    # Loading refuses the payload instead of running it.
    with pytest.raises(pickle.UnpicklingError):
        GenreClassifier().load_context(context)
    # The payload's code never ran.
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["..\\..\\evil.wav", "evil\nname.wav", " -rf .wav", "~evil.wav"])
def test_launch_hostile_track_names(
        tmp_path: Path, name: str) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    data = write_genres(tmp_path / "data", {"rock": 300.0, "jazz": 600.0}, n_tracks=3)
    (data / "rock" / name).write_bytes((data / "rock" / "rock.00000.wav").read_bytes())
    write_studies(workspace, real_data_study(data, n_trials=1))
    before = {path for path in tmp_path.rglob("*")}

    result = run_cli(["launch", "tiny", "--no-progress"], cwd=workspace)

    # The oddly named file is an ordinary track: the study runs.
    assert result.returncode == 0, result.stderr[-3000:]
    created = {path for path in tmp_path.rglob("*")} - before
    # Every new file or folder is inside the workspace (stores, cache, artifacts).
    assert {path for path in created if workspace not in path.parents} == set()
