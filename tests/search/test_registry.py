"""The champion model in the MLflow registry, the child runs' columns and the parent's summary.

One tiny study (generated audio, three trials of two epochs, one fixed CNN) runs once per
module against a real SQLite Optuna storage and a real SQLite MLflow store.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from search.config import Overrides, StudyConfig, apply_overrides, load_studies
from search.registry import CHAMPION_ALIAS, TRIAL_TAG, VALUE_TAG, chain_callbacks
from search.runner import run_worker
from search.space import all_param_names
from search.study import PARENT_RUN_ATTR
from search.summary import confusion_matrix, per_class_accuracy, write_trials_csv

STUDIES_YAML = """\
studies:
  tiny:
    dataset:
      synthetic: {n_genres: 3, tracks_per_genre: 6, seconds: 2.0, seed: 0}
      sample_rate: 8000
      segment_seconds: 0.5
      split: {method: random, valid_fraction: 0.34, seed: 0}
    features: {n_fft: 256, hop_length: 128, n_mels: 32, f_max: 4000.0}
    training: {epochs: 2, seed: 0}
    sampler: {name: random, seed: 1}
    pruner: {name: none}
    device: cpu
    search_space:
      family: {choices: [cnn]}
      learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
      batch_size: 16
      dropout: {low: 0.0, high: 0.3}
      weight_decay: 1.0e-5
      optimizer: adam
      architectures:
        cnn: {n_conv_layers: 2, base_channels: 8, kernel_size: 3}
    n_trials: 3
"""


def tiny_study_config(folder: Path, studies_yaml: str = STUDIES_YAML) -> StudyConfig:
    """Write ``studies_yaml`` into ``folder`` and return its ``tiny`` study, paths under it."""
    path = folder / "studies.yaml"
    path.write_text(studies_yaml, encoding="utf-8")
    overrides = Overrides(storage=f"sqlite:///{folder / 'optuna.db'}",
                          tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                          cache_dir=folder / "cache")
    return apply_overrides(load_studies(path).get("tiny"), overrides, base_dir=folder)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, optuna.Study]:
    """The tiny study after three completed trials, with its config."""
    config = tiny_study_config(tmp_path_factory.mktemp("registry"))
    run_worker(config)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    return config, study


@pytest.fixture(scope="module")
def client(finished_study: tuple[StudyConfig, optuna.Study]) -> MlflowClient:
    return MlflowClient(tracking_uri=finished_study[0].tracking_uri)


def test_child_runs_have_every_param(finished_study: tuple[StudyConfig, optuna.Study],
                                     client: MlflowClient) -> None:
    config, study = finished_study
    expected = {*all_param_names(config.search_space), "trial_number", "state"}
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        # Every run has the same param columns, so the compare view can plot them.
        assert expected <= set(run.data.params)


def test_child_runs_have_summary_metrics(finished_study: tuple[StudyConfig, optuna.Study],
                                         client: MlflowClient) -> None:
    _, study = finished_study
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        # The compare view's metric axes exist on every completed run.
        assert {"best_val_loss", "val_accuracy", "epochs_trained"} <= set(run.data.metrics)


def test_parent_run_has_study_summary(finished_study: tuple[StudyConfig, optuna.Study],
                                      client: MlflowClient) -> None:
    _, study = finished_study
    parent_id = study.user_attrs[PARENT_RUN_ATTR]
    names = {item.path for item in client.list_artifacts(parent_id)}
    plots = {item.path for item in client.list_artifacts(parent_id, "plots")}
    # The resolved config and the trials table sit at the root of the parent run.
    assert {"study_config.yaml", "trials.csv"} <= names
    # All four Optuna plots are logged, importances included (three completed trials).
    assert plots == {"plots/parallel_coordinate.html", "plots/param_importances.html",
                     "plots/optimization_history.html", "plots/intermediate_values.html"}


def test_parent_plots_embed_plotly(finished_study: tuple[StudyConfig, optuna.Study],
                                   client: MlflowClient, tmp_path: Path) -> None:
    _, study = finished_study
    local = client.download_artifacts(study.user_attrs[PARENT_RUN_ATTR],
                                      "plots/parallel_coordinate.html", str(tmp_path))
    html = Path(local).read_text(encoding="utf-8")
    # plotly.js is inlined, so the plot opens without network access.
    assert 'src="https://cdn.plot.ly' not in html
    assert len(html) > 1_000_000


def test_champion_is_best_trial(finished_study: tuple[StudyConfig, optuna.Study],
                                client: MlflowClient) -> None:
    config, study = finished_study
    champion = client.get_model_version_by_alias(config.registered_model_name, CHAMPION_ALIAS)
    # The alias points at the study's best trial and stores its value.
    assert champion.tags[TRIAL_TAG] == str(study.best_trial.number)
    assert math.isclose(float(champion.tags[VALUE_TAG]), study.best_value)
    assert champion.run_id == study.best_trial.user_attrs["mlflow_run_id"]


def test_champion_run_has_confusion_matrix(finished_study: tuple[StudyConfig, optuna.Study],
                                           client: MlflowClient, tmp_path: Path) -> None:
    _, study = finished_study
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    names = {item.path for item in client.list_artifacts(run_id)}
    matrix = json.loads(Path(client.download_artifacts(
        run_id, "confusion_matrix.json", str(tmp_path))).read_text(encoding="utf-8"))
    genre_metrics = {key for key in client.get_run(run_id).data.metrics
                     if key.startswith("val_accuracy.")}
    assert {"confusion_matrix.png", "confusion_matrix.json", "model"} <= names
    # One accuracy metric per genre that has validation segments.
    assert genre_metrics == {f"val_accuracy.{genre}" for genre in matrix["accuracy_per_genre"]}
    assert len(matrix["matrix"]) == len(matrix["classes"])


def test_champion_loads_in_fresh_process(finished_study: tuple[StudyConfig, optuna.Study]) -> None:
    config, _ = finished_study
    # A waveform of 0.1 s is shorter than one 0.5 s segment, so it is zero-padded.
    script = textwrap.dedent(f"""
        import json, mlflow, pandas as pd
        mlflow.set_tracking_uri({config.tracking_uri!r})
        model = mlflow.pyfunc.load_model("models:/{config.registered_model_name}@champion")
        frame = pd.DataFrame({{"waveform": [[0.1, -0.1] * 400], "sample_rate": [8000]}})
        print(model.predict(frame).to_json(orient="records"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])[0]
    probabilities = [value for key, value in row.items() if key.startswith("prob_")]
    # One probability per genre, summing to one, and the genre is the most probable one.
    assert len(probabilities) == 3
    assert math.isclose(sum(probabilities), 1.0, rel_tol=1e-4)
    assert row[f"prob_{row['genre']}"] == max(probabilities)


def test_champion_rejects_row_without_audio(
        finished_study: tuple[StudyConfig, optuna.Study]) -> None:
    import mlflow

    config, _ = finished_study
    from search.registry import load_classifier

    model = load_classifier(f"models:/{config.registered_model_name}@{CHAMPION_ALIAS}",
                            tracking_uri=config.tracking_uri)
    frame = pd.DataFrame({"path": [None], "sample_rate": [8000]})
    with pytest.raises((ValueError, mlflow.exceptions.MlflowException), match="no audio"):
        model.predict(frame)


def test_trials_csv_has_row_per_trial(finished_study: tuple[StudyConfig, optuna.Study],
                                      tmp_path: Path) -> None:
    _, study = finished_study
    table = pd.read_csv(write_trials_csv(study, tmp_path / "trials.csv"))
    assert list(table["number"]) == [0, 1, 2]
    assert "param.learning_rate" in table.columns


def test_confusion_matrix_counts_pairs() -> None:
    matrix = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    # Rows are true classes and columns predictions: one class-2 segment went to class 1.
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_per_class_accuracy_skips_empty_class() -> None:
    matrix = np.array([[2, 0, 0], [0, 0, 0], [1, 0, 1]])
    accuracy = per_class_accuracy(matrix, ("blues", "jazz", "rock"))
    # jazz has no validation segments, so it has no accuracy.
    assert accuracy == {"blues": 1.0, "rock": 0.5}


def test_chain_callbacks_calls_in_order() -> None:
    calls: list[str] = []
    chained = chain_callbacks(lambda outcome: calls.append("first"), None,
                              lambda outcome: calls.append("second"))
    chained(None)  # type: ignore[arg-type]
    assert calls == ["first", "second"]
