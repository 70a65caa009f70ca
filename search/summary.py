"""The study's summary on its parent run: config, trials table and Optuna's plots.

Also the best trial's confusion matrix and per-genre accuracy on the validation split.
Plots are standalone HTML files with plotly.js embedded, so they open without a network.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from mlflow import MlflowClient
from torch import nn

from search._log_filters import drop_log_messages
from search.reports import trial_rows
from search.tracking import StudyTracker, call_with_retry
from search.training import TrialData, predict_logits

_logger = logging.getLogger(__name__)

PLOTS_ARTIFACT_PATH = "plots"
TRIALS_CSV = "trials.csv"
CONFIG_YAML = "study_config.yaml"
MIN_TRIALS_FOR_IMPORTANCE = 2
_PARALLEL_COORDINATE_LOGGER = "optuna.visualization._parallel_coordinate"
_MISSING_PARAMETERS_WARNING = "Your study has only completed trials with missing parameters"
"""Parameter importances need at least this many completed trials."""

_PLOTS: dict[str, Callable[[optuna.Study], Any]] = {
    "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
    "param_importances": optuna.visualization.plot_param_importances,
    "optimization_history": optuna.visualization.plot_optimization_history,
    "intermediate_values": optuna.visualization.plot_intermediate_values,
}


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """Write one row per trial (from :func:`search.reports.trial_rows`) to ``path``."""
    rows = trial_rows(study)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns or ["number"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Write Optuna's plots of ``study`` as standalone HTML files into ``folder``.

    A plot that needs more completed trials than the study has is skipped with a log line.

    Returns:
        The files written.
    """
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written = []
    for name, plot in _PLOTS.items():
        if name == "param_importances" and len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
            _logger.info("study %r: skipping the %s plot, it needs %d completed trials and "
                         "has %d", study.study_name, name, MIN_TRIALS_FOR_IMPORTANCE,
                         len(completed))
            continue
        if not completed and name != "intermediate_values":
            _logger.info("study %r: skipping the %s plot, no trial has completed",
                         study.study_name, name)
            continue
        path = folder / f"{name}.html"
        # Parameters of one model family are missing from trials of another, which is
        # expected in this search space; Optuna warns about it on every parallel plot.
        with drop_log_messages(_PARALLEL_COORDINATE_LOGGER, _MISSING_PARAMETERS_WARNING):
            figure = plot(study)
        figure.write_html(str(path), include_plotlyjs=True, full_html=True)
        written.append(path)
    return written


def write_study_summary(study: optuna.Study, config_raw: Any, folder: Path) -> list[Path]:
    """Write the config, trials table and plots of ``study`` into ``folder``.

    Returns:
        The files written; plots are under ``folder / "plots"``.
    """
    import yaml

    config_path = folder / CONFIG_YAML
    config_path.write_text(yaml.safe_dump(json.loads(json.dumps(config_raw, default=str)),
                                          sort_keys=False), encoding="utf-8")
    plots = folder / PLOTS_ARTIFACT_PATH
    plots.mkdir(exist_ok=True)
    return [config_path, write_trials_csv(study, folder / TRIALS_CSV),
            *write_study_plots(study, plots)]


def log_study_summary(tracker: StudyTracker) -> tuple[str, list[str]]:
    """Write the study's summary and log it to the parent run, replacing older copies.

    Returns:
        The artifact URI of the parent run and the summary files' paths relative to it.
    """
    run_id = tracker.parent_run_id()
    with tempfile.TemporaryDirectory(prefix="genre-summary-") as folder:
        written = write_study_summary(tracker.study, dict(tracker.config.raw), Path(folder))
        call_with_retry(lambda: tracker.client.log_artifacts(run_id, folder),
                        what="log study summary")
        names = [path.relative_to(folder).as_posix() for path in written]
    _logger.info("study %r: logged %d summary files to parent run %s", tracker.config.name,
                 len(names), run_id)
    return str(tracker.client.get_run(run_id).info.artifact_uri), names


def confusion_matrix(predictions: np.ndarray, targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Return the (n_classes, n_classes) count matrix: row is the true class, column predicted."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (targets.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """Return each class's recall, correct over true segments, for classes that have segments."""
    totals = matrix.sum(axis=1)
    return {genre: float(matrix[index, index] / totals[index])
            for index, genre in enumerate(classes) if totals[index] > 0}


def save_confusion_matrix_plot(matrix: np.ndarray, classes: tuple[str, ...], path: Path) -> Path:
    """Draw ``matrix`` as a labelled heat map PNG at ``path`` (matplotlib, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = max(4.0, 0.6 * len(classes) + 2.0)
    figure = Figure(figsize=(size, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), labels=classes)
    axes.set_xlabel("predicted genre")
    axes.set_ylabel("true genre")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > threshold else "black")
    axes.set_title("Validation segments")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def log_confusion_matrix(client: MlflowClient, run_id: str, model: nn.Module,
                         data: TrialData) -> dict[str, float]:
    """Log the validation confusion matrix and ``val_accuracy.<genre>`` metrics to ``run_id``.

    Counts are per validation segment, the unit that ``val_accuracy`` is measured on.

    Returns:
        Accuracy per genre.
    """
    logits = predict_logits(model, data.x_valid, batch_size=64)
    predictions = logits.argmax(dim=1).cpu().numpy()
    targets = data.y_valid.cpu().numpy()
    matrix = confusion_matrix(predictions, targets, len(data.classes))
    accuracy = per_class_accuracy(matrix, data.classes)

    with tempfile.TemporaryDirectory(prefix="genre-confusion-") as folder:
        save_confusion_matrix_plot(matrix, data.classes, Path(folder) / "confusion_matrix.png")
        (Path(folder) / "confusion_matrix.json").write_text(json.dumps(
            {"classes": list(data.classes), "matrix": matrix.tolist(),
             "accuracy_per_genre": accuracy}, indent=2), encoding="utf-8")
        call_with_retry(lambda: client.log_artifacts(run_id, folder), what="log confusion matrix")
    for genre, value in accuracy.items():
        client.log_metric(run_id, f"val_accuracy.{genre}", value)
    return accuracy


def refresh_parent_summary(tracker: StudyTracker) -> None:
    """Log the study summary, logging a warning instead of raising when it fails."""
    try:
        log_study_summary(tracker)
    except Exception as error:  # An optional artifact must not end the study.
        _logger.warning("study %r: could not log the study summary: %s", tracker.config.name,
                        error, exc_info=True)

