"""Faults inside trials: each is recorded on the trial's MLflow run and the study goes on."""

from __future__ import annotations

import sqlite3
import weakref
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import write_studies
from mlflow import MlflowClient
from torch import nn

from models import register_model
from search.cli import main


class FatalTestError(RuntimeError):
    """Stands for an error the user declared fatal in ``training.fatal_errors``."""


class _FaultyModel(nn.Module):
    """Tiny classifier whose first ``n_faults`` forward passes raise ``fault``."""

    fault: ClassVar[type[BaseException]] = RuntimeError
    n_faults: ClassVar[int] = 0
    instances: ClassVar[list[weakref.ref[nn.Module]]] = []

    def __init__(self, n_classes: int, n_mels: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.head = nn.Linear(n_mels, n_classes)
        self.dropout = nn.Dropout(dropout)
        # A large buffer stands for the GPU memory that a failed trial must give back.
        self.register_buffer("ballast", torch.zeros(1_000_000))
        type(self).instances.append(weakref.ref(self))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if type(self).n_faults > 0:
            type(self).n_faults -= 1
            raise type(self).fault("CUDA out of memory. Tried to allocate 20.00 GiB")
        pooled = features.mean(dim=-1).flatten(1)  # (batch, n_mels)
        logits: torch.Tensor = self.head(self.dropout(pooled))  # (batch, n_classes)
        return logits


@register_model("reliability_oom")
class _OutOfMemoryModel(_FaultyModel):
    fault = torch.OutOfMemoryError
    instances: ClassVar[list[weakref.ref[nn.Module]]] = []


@register_model("reliability_fatal")
class _FatalModel(_FaultyModel):
    fault = FatalTestError
    instances: ClassVar[list[weakref.ref[nn.Module]]] = []


@register_model("reliability_value")
class _ValueErrorModel(_FaultyModel):
    fault = ValueError
    instances: ClassVar[list[weakref.ref[nn.Module]]] = []


def _space(family: str, **common: Any) -> dict[str, Any]:
    return {"search_space": {"family": {"choices": [family]}, "architectures": None, **common}}


def _launch(folder: Path) -> Result:
    return CliRunner().invoke(main, ["launch", "tiny", "--config", str(folder / "studies.yaml"),
                                     "--no-progress"])


def _trial_states(folder: Path) -> list[str]:
    with sqlite3.connect(folder / "optuna.db") as connection:
        return [row[0] for row in connection.execute("SELECT state FROM trials ORDER BY number")]


def _trial_runs(folder: Path) -> dict[str, Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiment_ids, filter_string="tags.`genre_search.role` = 'trial'")
    return {run.info.run_name: run for run in runs}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("GENRE_SEARCH_STORAGE", "GENRE_SEARCH_TRACKING_URI", "GENRE_SEARCH_DATA",
                 "GENRE_SEARCH_CACHE_DIR", "GENRE_SEARCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_launch_out_of_memory_trial(in_tmp: Path) -> None:
    _OutOfMemoryModel.n_faults = 1
    write_studies(in_tmp, defaults=_space("reliability_oom"))

    result = _launch(in_tmp)

    # The worker survives the out-of-memory error and finishes the study.
    assert result.exit_code == 0, result.output
    # The failed trial is followed by two completed ones, which reach n_trials=2.
    assert _trial_states(in_tmp) == ["FAIL", "COMPLETE", "COMPLETE"]
    failed = _trial_runs(in_tmp)["trial-0"]
    # The failed trial's run is FAILED.
    assert failed.info.status == "FAILED"
    # Its error tag names the exception.
    assert "OutOfMemoryError" in failed.data.tags["error"]
    # The failed trial's model (and its memory) was released, not kept by a traceback.
    assert _OutOfMemoryModel.instances[0]() is None


def test_launch_unexpected_error_trial(in_tmp: Path) -> None:
    _ValueErrorModel.n_faults = 1
    write_studies(in_tmp, defaults=_space("reliability_value"))

    result = _launch(in_tmp)

    # An unexpected exception in one trial does not stop the study.
    assert result.exit_code == 0, result.output
    # The study reaches its target after the failed trial.
    assert _trial_states(in_tmp) == ["FAIL", "COMPLETE", "COMPLETE"]
    # The reason is on the failed run.
    assert "ValueError" in _trial_runs(in_tmp)["trial-0"].data.tags["error"]


def test_launch_fatal_error_stops_study(in_tmp: Path) -> None:
    _FatalModel.n_faults = 1
    write_studies(in_tmp, defaults={**_space("reliability_fatal"),
                                    "training": {"fatal_errors": ["FatalTestError"]}})

    result = _launch(in_tmp)

    # An error listed in training.fatal_errors stops the study with a non-zero status.
    assert result.exit_code != 0
    # No further trial is started after it.
    assert _trial_states(in_tmp) == ["FAIL"]
    # The trial's run is FAILED.
    assert _trial_runs(in_tmp)["trial-0"].info.status == "FAILED"


def test_launch_diverging_loss_stops(in_tmp: Path) -> None:
    write_studies(in_tmp, {"n_trials": 1}, defaults={"search_space": {
        "learning_rate": {"low": 1.0e20, "high": 1.0e21, "log": True},
        "optimizer": {"choices": ["sgd"]}}})

    result = _launch(in_tmp)

    # Every trial diverges, so the worker stops with a runtime error instead of looping.
    assert result.exit_code == 1, result.output
    # It stops after five failed trials in a row.
    assert _trial_states(in_tmp) == ["FAIL"] * 5
    # The message explains why it stopped and how to resume.
    assert "all failed, so it stops instead of retrying forever" in result.output
    # Each run carries the divergence as its reason.
    assert "NonFiniteLossError" in _trial_runs(in_tmp)["trial-0"].data.tags["error"]
