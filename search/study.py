"""Creating and opening Optuna studies: storage, sampler and pruner from a study's config."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from search import settings
from search.config import (
    ConfigError,
    PrunerConfig,
    SamplerConfig,
    StudyConfig,
    redact_text,
    redact_url,
)

_logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_SECONDS = 10
"""Interval at which a running trial records in the storage that its worker is alive (default of
GENRE_SEARCH_HEARTBEAT_INTERVAL)."""

GRACE_PERIOD_SECONDS = 60
"""How long a trial may miss heartbeats before another worker marks it failed (default of
GENRE_SEARCH_GRACE_PERIOD)."""

MAX_RETRY = 2
"""How many times a trial whose worker died is re-queued."""

PARENT_RUN_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
CONFIG_ATTR = "genre_search_config"


class StorageError(RuntimeError):
    """The Optuna storage could not be opened."""


def create_sampler(config: SamplerConfig) -> optuna.samplers.BaseSampler:
    """Build the Optuna sampler named in ``config``."""
    options: dict[str, Any] = dict(config.options)
    if config.name == "tpe":
        return optuna.samplers.TPESampler(seed=config.seed, **options)
    if config.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=config.seed, **options)
    return optuna.samplers.RandomSampler(seed=config.seed)


def create_pruner(config: PrunerConfig) -> optuna.pruners.BasePruner:
    """Build the Optuna pruner named in ``config``."""
    options: dict[str, Any] = dict(config.options)
    if config.name == "median":
        return optuna.pruners.MedianPruner(**options)
    if config.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if config.name == "hyperband":
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


def create_storage(
    url: str,
    *,
    heartbeat: bool = True,
    on_failed_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """Open the Optuna storage at ``url``.

    Server databases get a small connection pool with pre-ping, so many workers do not
    exhaust the server's connections and a connection dropped by the server is replaced
    instead of failing a trial. Heartbeats let a surviving worker fail and retry the trials
    of a worker that died.

    Args:
        url: SQLAlchemy URL of the database.
        heartbeat: Record heartbeats of running trials.
        on_failed_trial: Called, after the trial is re-queued, for every trial that this
            process marks failed because its worker stopped sending heartbeats.

    Raises:
        StorageError: The database cannot be reached; the message has the URL without its
            password.
    """
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # A generous busy timeout lets several local processes share the SQLite file.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs.update(pool_size=2, max_overflow=2, pool_recycle=1800)
    heartbeat_kwargs: dict[str, Any] = {}
    if heartbeat:
        interval, grace_period = heartbeat_settings()
        heartbeat_kwargs = dict(
            heartbeat_interval=interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=_StaleTrialHandler(on_failed_trial),
        )
    try:
        with warnings.catch_warnings():
            # Heartbeats are marked experimental in Optuna 4.9 but are the documented way
            # to recover trials from dead workers.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)
    except Exception as error:  # SQLAlchemy raises many driver-specific types here.
        raise StorageError(
            f"cannot open the Optuna storage at {redact_url(url)}: {_first_line(error)}. "
            f"Check that the database server is running and reachable, the database exists "
            f"and the user may connect (set the password through the environment, e.g. "
            f"PGPASSWORD), or set `storage:` / GENRE_SEARCH_STORAGE to another URL."
        ) from None


def heartbeat_settings() -> tuple[int, int]:
    """Return the heartbeat interval and grace period in seconds.

    They come from GENRE_SEARCH_HEARTBEAT_INTERVAL and GENRE_SEARCH_GRACE_PERIOD, else the
    module defaults. Every worker of a study should use the same values.

    Raises:
        ConfigError: A value is not a positive integer, or the grace period is not longer
            than the interval.
    """
    interval = _positive_seconds(settings.HEARTBEAT_INTERVAL, HEARTBEAT_INTERVAL_SECONDS)
    grace_period = _positive_seconds(settings.GRACE_PERIOD, GRACE_PERIOD_SECONDS)
    if grace_period <= interval:
        raise ConfigError("environment", [
            f"{settings.GRACE_PERIOD.name}={grace_period} must be longer than "
            f"{settings.HEARTBEAT_INTERVAL.name}={interval}, or live trials are failed as "
            f"stale. Use a grace period of several intervals."
        ])
    return interval, grace_period


def _positive_seconds(variable: settings.EnvironmentVariable, default: int) -> int:
    text = variable.get()
    if text is None:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ConfigError("environment", [
            f"{variable.name}={text!r} is invalid. Set a whole number of seconds >= 1 or "
            f"unset it for the default of {default}."
        ])
    return int(text)


class _StaleTrialHandler:
    """Re-queue a trial whose worker died, then run an extra handler (closing its MLflow run)."""

    def __init__(self, extra: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        self.extra = extra

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _logger.warning("trial %d of study %r stopped sending heartbeats; marked failed and "
                        "re-queued", trial.number, study.study_name)
        self.retry(study, trial)
        if self.extra is not None:
            self.extra(study, trial)


def open_study(config: StudyConfig, *, storage: optuna.storages.BaseStorage | None = None,
               create: bool = True) -> optuna.Study:
    """Create the study, or load it if it already exists in the storage.

    Args:
        config: The study's resolved configuration.
        storage: An open storage; opened from ``config.storage`` when omitted.
        create: Create the study when it is missing. With ``False`` a missing study raises
            :class:`KeyError`.
    """
    storage = storage or create_storage(config.storage)
    sampler = create_sampler(config.sampler)
    pruner = create_pruner(config.pruner)
    if not create:
        return optuna.load_study(study_name=config.name, storage=storage, sampler=sampler,
                                 pruner=pruner)
    study = optuna.create_study(
        study_name=config.name, storage=storage, sampler=sampler, pruner=pruner,
        direction=config.direction, load_if_exists=True,
    )
    expected = optuna.study.StudyDirection.MINIMIZE if config.direction == "minimize" \
        else optuna.study.StudyDirection.MAXIMIZE
    if study.direction != expected:
        raise StorageError(
            f"study {config.name!r} already exists in {redact_url(config.storage)} with "
            f"direction={study.direction.name.lower()}, but the config says "
            f"direction={config.direction}. Rename the study or restore its direction."
        )
    return study


def study_exists(name: str, storage: optuna.storages.BaseStorage) -> bool:
    """Return whether a study called ``name`` exists in ``storage``."""
    return any(summary.study_name == name for summary in optuna.get_all_study_summaries(storage))


def _first_line(error: BaseException) -> str:
    text = redact_text(str(error)).strip().splitlines()
    return text[0] if text else type(error).__name__
