"""One worker's loop: open the study, prepare the data once, run trials until the target."""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

from typing import TypeVar

import optuna
import sqlalchemy.exc
import torch
from tqdm import tqdm

from search import settings
from search._log_filters import install_optuna_trial_filter
from search.config import StudyConfig, redact_text, redact_url
from search.data import prepare_dataset
from search.objective import Objective, SurplusTrialError, TrialFailedError, TrialOutcome
from search.registry import BackgroundCallback, ChampionRegistrar, chain_callbacks
from search.study import create_storage, open_study
from search.summary import refresh_parent_summary
from search.tracking import (
    RUN_ID_ATTR,
    StudyTracker,
    check_tracking_store,
    close_orphaned_run,
)
from search.training import EpochResult, resolve_device

_logger = logging.getLogger(__name__)
_Result = TypeVar("_Result")

TARGET_ATTR = "target_n_trials"
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
WORKER_INDEX_ENV = "GENRE_SEARCH_WORKER_INDEX"
"""Set by ``launch --workers/--gpus`` for each worker process: its index, from 0."""
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)
"""Errors of a storage call that a dropped database connection causes."""
POLL_SECONDS = 2.0
STORAGE_RETRY_DELAYS_SECONDS = (1.0, 2.0, 4.0, 8.0)
MAX_CONSECUTIVE_FAILURES = 5
"""A worker stops after this many failed trials in a row instead of retrying forever."""


class TrialsKeepFailingError(RuntimeError):
    """Every recent trial of this worker failed; the cause is on their MLflow runs."""
"""How often a worker with nothing to run checks the study again."""


@dataclass(frozen=True)
class WorkerResult:
    """Summary of one worker's run."""

    n_trials_run: int
    n_finished_in_study: int
    best_value: float | None
    best_trial_number: int | None
    seconds: float
    stopped_at_timeout: bool = False
    """Whether the worker stopped because the study's timeout passed, not at the target."""


def count_finished(study: optuna.Study) -> int:
    """Return the number of completed or pruned trials of ``study``."""
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def set_target(study: optuna.Study, config: StudyConfig, *, more_trials: int | None) -> int | None:
    """Store the study's target number of finished trials and return it.

    ``more_trials`` (the ``--n-trials`` flag) requests that many trials on top of those
    already finished. Without it, the target is the config's ``n_trials`` in total. The target
    lives in the study's user attributes so that workers attached later share it.
    """
    if more_trials is not None:
        target: int | None = count_finished(study) + more_trials
    else:
        target = config.n_trials
    study.set_user_attr(TARGET_ATTR, target)
    return target


def read_target(study: optuna.Study, config: StudyConfig) -> int | None:
    """Return the target stored on the study, or the config's ``n_trials``."""
    stored = study.user_attrs.get(TARGET_ATTR)
    return int(stored) if stored is not None else config.n_trials


def run_worker(
    config: StudyConfig,
    *,
    more_trials: int | None = None,
    progress: bool = False,
    on_complete: Callable[[TrialOutcome], None] | None = None,
    set_study_target: bool = True,
) -> WorkerResult:
    """Run trials of ``config``'s study in this process until the study's target is met.

    Args:
        config: The study's resolved configuration (storage, tracking, device, data).
        more_trials: Run until this many more trials have finished in the study, counted
            across all workers; ``None`` uses the study's stored target or ``n_trials``.
        progress: Show progress bars for feature extraction and epochs.
        on_complete: Called with every completed trial (model registration).
        set_study_target: Store the target on the study (``launch``); attached workers
            only read it.

    Raises:
        search.study.StorageError: The Optuna storage is unreachable.
        search.tracking.TrackingError: The MLflow tracking store is unreachable.
        features.DatasetError: The dataset is unusable.
    """
    started = time.monotonic()
    # Interrupted and surplus trials get one line of ours instead of Optuna's traceback.
    install_optuna_trial_filter((KeyboardInterrupt, SurplusTrialError))
    if not set_study_target:
        config = _with_worker_sampler_seed(config)
    device = resolve_device(config.device)
    n_threads = worker_threads(config)
    if n_threads is not None:
        torch.set_num_threads(n_threads)

    tracker_holder: list[StudyTracker] = []
    storage = create_storage(
        config.storage,
        on_failed_trial=lambda study, trial: _close_stale_run(tracker_holder, trial),
    )
    check_tracking_store(config.tracking_uri)
    # The data is checked before the study and its parent run exist, so a launch rejected
    # for unusable data leaves nothing behind in the storage or the tracking store.
    dataset = prepare_dataset(config, device=device, progress=progress)

    study = open_study(config, storage=storage)
    tracker = StudyTracker(config, study)
    tracker_holder.append(tracker)
    if set_study_target:
        target = set_target(study, config, more_trials=more_trials)
    else:
        target = count_finished(study) + more_trials if more_trials is not None else None
    parent_run_id = tracker.mark_parent_running()
    _logger.info("study %r: storage %s, tracking %s, parent run %s, device %s%s, "
                 "%d torch threads", config.name, redact_url(config.storage),
                 redact_url(config.tracking_uri), parent_run_id, device,
                 _visible_gpus_note(device), torch.get_num_threads())

    def current_target() -> int | None:
        if target is not None and not set_study_target and more_trials is not None:
            return target
        return read_target(study, config)

    bar = _EpochBar(config.training.epochs, enabled=progress)
    objective = Objective(config, dataset, tracker, device, target_trials=current_target,
                          on_complete=on_complete, on_epoch=bar.update)
    registrar = BackgroundCallback(
        ChampionRegistrar(config, tracker, objective.data, dataset.settings, device))
    objective.on_complete = chain_callbacks(registrar, on_complete)
    n_run = 0
    timed_out = False
    status = "FINISHED"
    try:
        n_run, timed_out = _optimize_until_target(study, objective, config, current_target,
                                                  started, bar)
    except BaseException:
        status = "KILLED"
        objective.close_current_run()
        raise
    finally:
        bar.close()
        registrar.wait()
        _finish_parent_run(tracker, study, status)

    best_value, best_number = _best(study)
    return WorkerResult(n_trials_run=n_run, n_finished_in_study=count_finished(study),
                        best_value=best_value, best_trial_number=best_number,
                        seconds=time.monotonic() - started, stopped_at_timeout=timed_out)


def _with_worker_sampler_seed(config: StudyConfig) -> StudyConfig:
    """Give an attached worker its own sampler seed.

    Workers that share a seed sample the same parameters for their first trials. The
    offset is GENRE_SEARCH_WORKER_INDEX + 1 (set by ``launch``) or the process id.
    """
    seed = config.sampler.seed
    if seed is None:
        return config
    index = os.environ.get(WORKER_INDEX_ENV, "")
    offset = int(index) + 1 if index.isdigit() else os.getpid()
    _logger.info("sampler seed %d (study seed %d + worker offset %d)", seed + offset, seed,
                 offset)
    return replace(config, sampler=replace(config.sampler, seed=seed + offset))


def worker_threads(config: StudyConfig) -> int | None:
    """Return the torch thread count: GENRE_SEARCH_NUM_THREADS, else `training.num_threads`.

    Raises:
        ValueError: The environment variable is not a positive integer.
    """
    text = settings.NUM_THREADS.get()
    if text is None:
        return config.training.num_threads
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{settings.NUM_THREADS.name}={text!r} is invalid. Set a whole "
                         f"number >= 1, or unset it to use training.num_threads.")
    return int(text)


def _visible_gpus_note(device: torch.device) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type != "cuda" or not visible:
        return ""
    return f" (CUDA_VISIBLE_DEVICES={visible}, so {device} is physical GPU " \
           f"{visible.split(',')[device.index or 0]})"


def _finish_parent_run(tracker: StudyTracker, study: optuna.Study, status: str) -> None:
    """End the parent run, unless this worker stops early while others still run trials.

    An interrupted worker leaves the parent RUNNING when other workers' trials are running,
    because the last worker to stop (or ``launch``) ends it. A trial whose worker died is
    failed first, so it does not keep the parent open.
    """
    if status != "FINISHED":
        _fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if running:
            _logger.info("worker stopped (%s); parent run left RUNNING for the %d trial(s) "
                         "other workers are running", status, len(running))
            return
    refresh_parent_summary(tracker)
    tracker.finish_study(status=status)


def _optimize_until_target(
    study: optuna.Study,
    objective: Objective,
    config: StudyConfig,
    current_target: Callable[[], int | None],
    started: float,
    bar: _EpochBar,
) -> tuple[int, bool]:
    """Run trials until the target is met or the timeout passes.

    Returns:
        The number of trials this worker ran, and whether it stopped at the timeout.
    """
    n_run = 0
    states: list[optuna.trial.TrialState] = []
    storage_failures = 0
    while True:
        target = _with_storage_retry(current_target, what="read the trial target")
        if target is not None and not _with_storage_retry(
                functools.partial(_needs_more_trials, study, target),
                what="count finished trials"):
            break
        if config.timeout is not None and time.monotonic() - started >= config.timeout:
            _logger.info("study %r: timeout of %.0f s reached", config.name, config.timeout)
            return n_run, True
        bar.start_trial(_with_storage_retry(
            lambda: len(study.get_trials(deepcopy=False)), what="count trials"))
        try:
            study.optimize(objective, n_trials=1, catch=(TrialFailedError, SurplusTrialError),
                           callbacks=[_log_trial, lambda _, trial: states.append(trial.state)],
                           gc_after_trial=False)
        except STORAGE_ERRORS as error:
            # The database dropped a connection inside Optuna's own bookkeeping (creating
            # or telling a trial). A trial left RUNNING goes stale and is retried.
            if storage_failures >= len(STORAGE_RETRY_DELAYS_SECONDS):
                raise
            delay = STORAGE_RETRY_DELAYS_SECONDS[storage_failures]
            storage_failures += 1
            _logger.warning("storage call failed during a trial (attempt %d): %s; going on "
                            "in %.0f s", storage_failures,
                            redact_text(str(error)).splitlines()[0][:300], delay)
            time.sleep(delay)
            continue
        storage_failures = 0
        if objective.surplus:
            # Other workers claimed the remaining trials first; wait for them (or for their
            # trials to go stale and be re-queued) in the next iteration.
            objective.surplus = False
            time.sleep(POLL_SECONDS)
            continue
        n_run += 1
        _check_failure_streak(states, config)
    return n_run, False


def _with_storage_retry(action: Callable[[], _Result], *, what: str) -> _Result:
    """Run a storage read again when the database dropped the connection it was using.

    ``pool_pre_ping`` only replaces connections that died while idle in the pool; one cut
    during a query (a server restart, ``pg_terminate_backend``) fails that query once.
    """
    for attempt, delay in enumerate((*STORAGE_RETRY_DELAYS_SECONDS, None), start=1):
        try:
            return action()
        except STORAGE_ERRORS as error:
            if delay is None:
                raise
            _logger.warning("storage call failed (%s, attempt %d): %s; retrying in %.0f s",
                            what, attempt, redact_text(str(error)).splitlines()[0][:300], delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _check_failure_streak(states: list[optuna.trial.TrialState], config: StudyConfig) -> None:
    recent = states[-MAX_CONSECUTIVE_FAILURES:]
    if len(recent) < MAX_CONSECUTIVE_FAILURES:
        return
    if any(state != optuna.trial.TrialState.FAIL for state in recent):
        return
    raise TrialsKeepFailingError(
        f"study {config.name!r}: the last {MAX_CONSECUTIVE_FAILURES} trials of this worker "
        f"all failed, so it stops instead of retrying forever. The reason of each is in the "
        f"`error` tag of its MLflow run and in the warnings above; fix it (e.g. lower "
        f"learning_rate.high when the loss diverges) and run `genre-search launch "
        f"{config.name}` again to resume."
    )


def _needs_more_trials(study: optuna.Study, target: int) -> bool:
    """Return whether this worker should start another trial, waiting while others finish.

    A trial counts as claimed while it runs. When the running trials of other workers would
    reach the target, this worker waits instead of exiting, because one of those workers
    may have died: its trial then goes stale, is marked failed and re-queued (WAITING), and
    this worker runs it.
    """
    while True:
        if count_finished(study) >= target:
            return False
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            return True
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if count_finished(study) + len(running) < target:
            return True
        _fail_stale_trials(study)
        time.sleep(POLL_SECONDS)


def _fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        # Experimental in Optuna 4.9, like the heartbeats it relies on.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    best_value, best_number = _best(study)
    best = f"best is trial {best_number} with {best_value:.4f}" if best_number is not None \
        else "no completed trial yet"
    duration = trial.duration.total_seconds() if trial.duration else 0.0
    run_id = trial.user_attrs.get(RUN_ID_ATTR, "-")
    if trial.state == optuna.trial.TrialState.COMPLETE:
        _logger.info("trial %d finished: value=%.4f, %s, %.1f s, run %s; %s", trial.number,
                     trial.value, _short_params(trial.params), duration, run_id, best)
    elif trial.state == optuna.trial.TrialState.PRUNED:
        _logger.info("trial %d pruned at epoch %s, %.1f s, run %s; %s", trial.number,
                     trial.last_step, duration, run_id, best)
    # A failed trial is not logged here: Optuna's own warning shows it with its traceback,
    # and the TrialFailedError message in it names the MLflow run.


def _short_params(params: dict[str, object]) -> str:
    parts = []
    for name, value in params.items():
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{name}={shown}")
    return ", ".join(parts)


def _best(study: optuna.Study) -> tuple[float | None, int | None]:
    try:
        best = study.best_trial
    except ValueError:
        return None, None
    return best.value, best.number


def _close_stale_run(holder: list[StudyTracker], trial: optuna.trial.FrozenTrial) -> None:
    if not holder:
        return
    if close_orphaned_run(holder[0].client, trial, reason="worker stopped sending heartbeats; "
                                                          "trial re-queued"):
        _logger.warning("closed MLflow run %s of stale trial %d as FAILED",
                        trial.user_attrs.get(RUN_ID_ATTR), trial.number)


class _EpochBar:
    """A progress bar over the epochs of the current trial."""

    def __init__(self, epochs: int, *, enabled: bool) -> None:
        self.epochs = epochs
        self.enabled = enabled
        self._bar: tqdm | None = None  # type: ignore[type-arg]

    def start_trial(self, number: int) -> None:
        self.close()
        if self.enabled:
            self._bar = tqdm(total=self.epochs, desc=f"trial {number}", unit="epoch",
                             leave=False, dynamic_ncols=True)

    def update(self, trial_number: int, result: EpochResult) -> None:
        _logger.debug("trial %d epoch %d: train_loss=%.4f val_loss=%.4f val_accuracy=%.3f "
                      "(%.2f s)", trial_number, result.epoch, result.train_loss, result.val_loss,
                      result.val_accuracy, result.seconds)
        if self._bar is not None:
            self._bar.set_postfix(val_loss=f"{result.val_loss:.3f}",
                                  acc=f"{result.val_accuracy:.2f}")
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
