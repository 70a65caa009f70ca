"""End-to-end studies on the real GTZAN clips: CLI, Optuna storage and MLflow store together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

import features._cache
from search.cli import main

pytestmark = pytest.mark.slow

EPOCHS = 4
GOOD_CNN = {"family": "cnn", "learning_rate": 3e-3, "batch_size": 16, "dropout": 0.1,
            "weight_decay": 1e-5, "optimizer": "adam", "cnn.n_conv_layers": 3,
            "cnn.base_channels": 16}
# A learning rate this small leaves the loss at chance level, so the median pruner stops it.
STALLED_CNN = {**GOOD_CNN, "learning_rate": 1e-7, "cnn.base_channels": 8}


def write_studies(folder: Path, data: Path) -> Path:
    study = {
        "dataset": {"path": str(data), "sample_rate": 22050, "segment_seconds": 3.0,
                    "split": {"method": "random", "valid_fraction": 0.2, "seed": 0}},
        "features": {"n_fft": 1024, "hop_length": 512, "n_mels": 64},
        "search_space": {
            "family": {"choices": ["cnn", "crnn"]},
            "learning_rate": {"low": 1.0e-7, "high": 3.0e-3, "log": True},
            "batch_size": {"choices": [16]},
            "dropout": {"low": 0.0, "high": 0.3},
            "weight_decay": {"low": 1.0e-6, "high": 1.0e-4, "log": True},
            "optimizer": {"choices": ["adam"]},
            "architectures": {
                "cnn": {"n_conv_layers": {"low": 2, "high": 3}, "base_channels": {"choices": [8, 16]}},
                "crnn": {"n_conv_layers": {"low": 2, "high": 3}, "base_channels": {"choices": [8]},
                         "rnn_hidden_size": {"choices": [32]}},
            },
        },
        "training": {"epochs": EPOCHS, "seed": 0, "num_threads": 2},
        "sampler": {"name": "tpe", "seed": 1},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "n_trials": 4,
        "storage": "sqlite:///optuna.db",
        "tracking_uri": "sqlite:///mlflow.db",
        "cache_dir": "cache",
    }
    path = folder / "studies.yaml"
    path.write_text(yaml.safe_dump({"studies": {"gtzan-e2e": study}}))
    return path


def child_runs(client: MlflowClient, parent_id: str) -> list[Any]:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=100,
    )


@pytest.fixture(scope="module")
def finished_study(gtzan_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("e2e")
    config = write_studies(folder, gtzan_mini)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    study = optuna.create_study(study_name="gtzan-e2e", storage=storage, direction="minimize")
    for params in (GOOD_CNN, GOOD_CNN, STALLED_CNN):
        study.enqueue_trial(params)

    result = CliRunner().invoke(main, ["launch", "gtzan-e2e", "--config", str(config),
                                       "--device", "cpu"], catch_exceptions=False)
    return {"folder": folder, "config": config, "storage": storage, "result": result}


def test_launch_exits_cleanly_and_prints_next_steps(finished_study: dict[str, Any]) -> None:
    result = finished_study["result"]
    assert result.exit_code == 0, result.output
    assert "genre-search status gtzan-e2e" in result.output
    assert "mlflow ui" in result.output


def test_study_has_four_finished_trials(finished_study: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    states = [trial.state for trial in study.trials]
    finished = [s for s in states if s in (optuna.trial.TrialState.COMPLETE,
                                           optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4
    # The enqueued trial with a stalled learning rate is stopped by the median pruner.
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED


def test_child_runs_sit_under_one_parent(finished_study: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study['folder'] / 'mlflow.db'}")
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    children = child_runs(client, parent_id)
    assert len(children) == 4
    assert sorted(run.info.run_name for run in children) == [f"trial-{n}" for n in range(4)]
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_child_runs_have_params_and_metric_history(finished_study: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study['folder'] / 'mlflow.db'}")
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        params = run.data.params
        assert params["trial_number"] == str(trial.number)
        assert params["device"] == "cpu"
        assert params["family"] == trial.params["family"]
        assert "dataset_fingerprint" in params
        assert "feature_fingerprint" in params
        epochs_trained = int(run.data.metrics["epochs_trained"])
        for metric in ("train_loss", "val_loss", "val_accuracy"):
            history = client.get_metric_history(run.info.run_id, metric)
            # One value per epoch, stepped by epoch number.
            assert [point.step for point in history] == list(range(1, epochs_trained + 1))


def test_pruned_run_is_killed_with_its_epoch(finished_study: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study['folder'] / 'mlflow.db'}")
    pruned = study.trials[2]
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.params["state"] == "PRUNED"
    assert run.data.metrics["pruned_at_epoch"] == pruned.last_step


def test_completed_runs_record_summary_metrics(finished_study: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study['folder'] / 'mlflow.db'}")
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for trial in completed:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["best_val_loss"] == pytest.approx(trial.value)
        assert run.data.metrics["epochs_trained"] == EPOCHS


def test_best_trial_beats_chance(finished_study: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study['folder'] / 'mlflow.db'}")
    best = client.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    # Ten genres: chance is 10 %.
    assert best.data.metrics["best_val_accuracy"] > 0.10


def test_parent_run_records_best_trial(finished_study: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study['folder'] / 'mlflow.db'}")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.family"] == study.best_trial.params["family"]


def test_status_lists_every_trial(finished_study: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["status", "gtzan-e2e", "--config",
                                       str(finished_study["config"])])
    assert result.exit_code == 0, result.output
    assert "PRUNED" in result.output
    assert "Best trial:" in result.output


def test_studies_command_shows_existing_study(finished_study: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["studies", "--config", str(finished_study["config"])])
    assert result.exit_code == 0, result.output
    assert "gtzan-e2e" in result.output
    assert "yes" in result.output


def test_relaunch_resumes_without_decoding_audio(
    finished_study: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("audio was decoded again although the feature cache is warm")

    monkeypatch.setattr(features._cache, "load_audio", no_decoding)
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    parent_id = study.user_attrs["mlflow_parent_run_id"]

    result = CliRunner().invoke(main, ["launch", "gtzan-e2e", "--config",
                                       str(finished_study["config"]), "--n-trials", "1",
                                       "--device", "cpu"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="gtzan-e2e", storage=finished_study["storage"])
    # Trial numbers continue and the same parent run collects the new child.
    assert [trial.number for trial in study.trials] == [0, 1, 2, 3, 4]
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study['folder'] / 'mlflow.db'}")
    assert len(child_runs(client, parent_id)) == 5


def test_relaunch_of_finished_study_explains_n_trials(finished_study: dict[str, Any]) -> None:
    result = CliRunner().invoke(main, ["launch", "gtzan-e2e", "--config",
                                       str(finished_study["config"]), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Pass --n-trials N to run more" in result.output
