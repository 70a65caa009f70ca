"""A study run twice with the same seeds gives the same trials and the same losses."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from search.cli import main

STUDY = {
    "dataset": {"synthetic": {"n_genres": 2, "tracks_per_genre": 4, "seconds": 2.0},
                "sample_rate": 8000, "segment_seconds": 0.5},
    "features": {"n_fft": 256, "hop_length": 128, "n_mels": 32},
    "search_space": {"family": "cnn", "learning_rate": {"low": 1.0e-3, "high": 1.0e-2},
                     "batch_size": 8, "dropout": 0.3},
    "training": {"epochs": 2, "num_threads": 1},
    "sampler": {"name": "random", "seed": 3},
    "n_trials": 1,
    "storage": "sqlite:///optuna.db",
    "tracking_uri": "sqlite:///mlflow.db",
    "cache_dir": "cache",
}


def run_once(folder: Path) -> list[float]:
    folder.mkdir()
    config = folder / "studies.yaml"
    config.write_text(yaml.safe_dump({"studies": {"repeat": STUDY}}))
    result = CliRunner().invoke(main, ["launch", "repeat", "--config", str(config),
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="repeat", storage=f"sqlite:///{folder / 'optuna.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    return [point.value for point in client.get_metric_history(run_id, "train_loss")]


def test_same_seeds_give_same_losses(tmp_path: Path) -> None:
    first = run_once(tmp_path / "first")
    second = run_once(tmp_path / "second")
    # Dropout included, a trial's training is a function of its seed alone.
    assert first == second
