"""Text reports of studies: the trials table and the list of configured studies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from search.config import StudyConfig, redact_url
from search.study import create_storage, study_exists
from search.tracking import RUN_ID_ATTR

_MAX_PARAM_COLUMNS = 6


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Return one row per trial: number, state, value, epochs, parameters, duration, run id."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        epochs = len(trial.intermediate_values)
        rows.append({
            "number": trial.number,
            "state": trial.state.name,
            "value": trial.value,
            "epochs": epochs,
            "duration_s": duration,
            "run_id": trial.user_attrs.get(RUN_ID_ATTR, ""),
            **{f"param.{name}": value for name, value in trial.params.items()},
        })
    return rows


def format_status(config: StudyConfig) -> str:
    """Return the trials table and best trial of ``config``'s study as text."""
    storage = create_storage(config.storage, heartbeat=False)
    if not study_exists(config.name, storage):
        return (f"Study {config.name!r} does not exist yet in {redact_url(config.storage)}. "
                f"Start it with: genre-search launch {config.name}")
    study = optuna.load_study(study_name=config.name, storage=storage)
    rows = trial_rows(study)
    if not rows:
        return f"Study {config.name!r} has no trials yet."
    param_names = _main_params(rows)
    header = ["#", "state", config.metric, "epochs", *param_names, "duration", "mlflow run"]
    table = [header]
    for row in rows:
        table.append([
            str(row["number"]),
            row["state"],
            _number(row["value"]),
            str(row["epochs"]),
            *(_value(row.get(f"param.{name}")) for name in param_names),
            _duration(row["duration_s"]),
            row["run_id"] or "-",
        ])
    lines = _align(table)
    lines.append("")
    lines.append(_best_line(study, config))
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines.append("Trials: " + ", ".join(f"{count} {state.lower()}"
                                         for state, count in sorted(counts.items())))
    return "\n".join(lines)


def format_studies(configs: Sequence[StudyConfig]) -> str:
    """Return one line per configured study: name, whether it exists, trials, storage."""
    table = [["study", "exists", "finished trials", "n_trials", "storage"]]
    storages: dict[str, optuna.storages.BaseStorage] = {}
    for config in configs:
        exists, finished = "no", "-"
        try:
            storage = storages.setdefault(config.storage,
                                          create_storage(config.storage, heartbeat=False))
            if study_exists(config.name, storage):
                study = optuna.load_study(study_name=config.name, storage=storage)
                states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                exists = "yes"
                finished = str(len(study.get_trials(deepcopy=False, states=states)))
        except Exception as error:  # One unreachable storage must not hide the other studies.
            exists = f"unknown ({type(error).__name__})"
        table.append([config.name, exists, finished, str(config.n_trials or "-"),
                      redact_url(config.storage)])
    return "\n".join(_align(table))


def _main_params(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("param.") and key[len("param."):] not in names:
                names.append(key[len("param."):])
    preferred = ["family", "learning_rate", "batch_size", "optimizer", "dropout"]
    ordered = [name for name in preferred if name in names]
    ordered += [name for name in names if name not in ordered]
    return ordered[:_MAX_PARAM_COLUMNS]


def _best_line(study: optuna.Study, config: StudyConfig) -> str:
    try:
        best = study.best_trial
    except ValueError:
        return "Best trial: none completed yet."
    params = ", ".join(f"{name}={_value(value)}" for name, value in best.params.items())
    run_id = best.user_attrs.get(RUN_ID_ATTR, "-")
    return (f"Best trial: {best.number} with {config.metric}={best.value:.4f} "
            f"(run {run_id}): {params}")


def _align(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in table]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
