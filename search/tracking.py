"""The MLflow bridge: one parent run per study, one nested child run per trial.

Everything goes through an explicit :class:`mlflow.MlflowClient` with run ids passed around,
never through MLflow's fluent active-run stack, so several workers and threads can log at
once without sharing global state.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from search.config import StudyConfig, redact_text, redact_url
from search.study import CONFIG_ATTR, EXPERIMENT_ATTR, PARENT_RUN_ATTR

_logger = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"
STUDY_TAG = "genre_search.study"
ROLE_TAG = "genre_search.role"
TRIAL_TAG = "genre_search.trial_number"
MAX_TAG_LENGTH = 5000
RETRY_DELAYS_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)
PROBE_TIMEOUT_SECONDS = 5.0
"""Connect and read timeout of each request that checks a tracking server before a study."""
PROBE_RETRY_DELAYS_SECONDS = (1.0, 2.0)
"""Pauses between the attempts to reach a tracking server before giving up."""

_T = TypeVar("_T")


class TrackingError(RuntimeError):
    """The MLflow tracking server or store could not be used."""


def call_with_retry(action: Callable[[], _T], *, what: str) -> _T:
    """Run an MLflow call, retrying with exponential backoff on failure.

    MLflow's HTTP client already retries requests. This covers the store errors it gives up
    on, such as a server that restarts for longer than its own retries last.
    """
    for attempt, delay in enumerate((*RETRY_DELAYS_SECONDS, None), start=1):
        try:
            return action()
        except (MlflowException, OSError) as error:
            if delay is None or _is_permanent(error):
                raise
            _logger.warning("MLflow call failed (%s, attempt %d): %s; retrying in %.0f s",
                            what, attempt, _first_line(error), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_permanent(error: BaseException) -> bool:
    code = getattr(error, "error_code", "")
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"}


def check_tracking_store(tracking_uri: str, *, client: MlflowClient | None = None) -> None:
    """Check that the MLflow tracking store at ``tracking_uri`` responds.

    An http(s) server is probed first with :func:`check_tracking_server`, so a closed port
    fails within seconds. MLflow 3.17's default retries of a refused connection (7, with
    backoff factor 2) take about 4 minutes.

    Raises:
        TrackingError: The store is unreachable; the message names the redacted URI.
    """
    check_tracking_server(tracking_uri)
    client = client or MlflowClient(tracking_uri=tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # The REST and SQL stores raise unrelated types.
        raise TrackingError(
            f"cannot reach the MLflow tracking store at {redact_url(tracking_uri)}: "
            f"{_first_line(error)}. {_START_SERVER_HINT}"
        ) from None


_START_SERVER_HINT = ("Start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), "
                      "or correct the URI: --tracking-uri, GENRE_SEARCH_TRACKING_URI or "
                      "`tracking_uri:` in studies.yaml.")


def check_tracking_server(tracking_uri: str) -> None:
    """Probe an http(s) tracking server with short timeouts. Other URIs are not checked.

    Sends ``GET <uri>/health``, then a one-experiment search of the REST API when
    ``/health`` does not return 200 (a proxy may route the API only). Any HTTP response to
    either means the server is up. Each request has a timeout of
    :data:`PROBE_TIMEOUT_SECONDS` and no retries of its own; the probe is repeated after
    each of :data:`PROBE_RETRY_DELAYS_SECONDS`. MLflow's own long retries still cover
    outages during a study.

    Raises:
        TrackingError: No attempt got an HTTP response; the message names the redacted URI.
    """
    if urllib.parse.urlsplit(tracking_uri).scheme.lower() not in ("http", "https"):
        return
    _logger.info("connecting to tracking server %s", redact_url(tracking_uri))
    for attempt, delay in enumerate((*PROBE_RETRY_DELAYS_SECONDS, None), start=1):
        try:
            _probe_server(tracking_uri)
            return
        except MlflowException as error:  # http_request wraps connection errors and timeouts.
            reason = _first_line(_innermost_error(error))
            if delay is None:
                raise TrackingError(
                    f"cannot reach the MLflow tracking server at {redact_url(tracking_uri)} "
                    f"after {attempt} attempts with a {PROBE_TIMEOUT_SECONDS:.0f} s timeout "
                    f"each: {reason}. {_START_SERVER_HINT}"
                ) from None
            _logger.warning("tracking server %s did not respond (attempt %d): %s; retrying in "
                            "%.0f s", redact_url(tracking_uri), attempt, reason, delay)
            time.sleep(delay)


def _innermost_error(error: BaseException) -> BaseException:
    """Return the root cause, such as urllib3's "Connection refused", behind MLflow's wrapper."""
    current = error
    for _ in range(10):  # Bounded, in case an exception chain loops.
        inner = current.__cause__ or current.__context__ or getattr(current, "reason", None)
        if not isinstance(inner, BaseException) and current.args:
            inner = current.args[0]
        if not isinstance(inner, BaseException):
            return current
        current = inner
    return current


def _probe_server(tracking_uri: str) -> None:
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    # The host credentials carry the user's TLS and authentication settings.
    credentials = get_default_host_creds(tracking_uri)
    request = {"method": "GET", "max_retries": 0, "backoff_factor": 0,
               "timeout": PROBE_TIMEOUT_SECONDS, "raise_on_status": False}
    response = http_request(credentials, "/health", **request)
    if response.status_code == 200:
        return
    _logger.debug("tracking server %s: /health returned HTTP %d; trying the REST API",
                  redact_url(tracking_uri), response.status_code)
    http_request(credentials, "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                 **request)


def artifact_location(tracking_uri: str) -> str | None:
    """Return where a new experiment stores artifacts for a local SQLite tracking store.

    MLflow's client puts the artifacts of a SQLite store in ``./mlruns`` under the current
    working folder, so a study launched from another folder would scatter them. They go to
    ``mlartifacts/`` beside the database instead. A tracking server chooses its own
    location, so other URIs return ``None``.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or tracking_uri.endswith(":memory:"):
        return None
    database = Path(tracking_uri[len(prefix):])
    if not database.is_absolute():
        database = Path.cwd() / database
    return (database.parent / "mlartifacts").resolve().as_uri()


class StudyTracker:
    """Creates and finds the MLflow runs of one study.

    Args:
        config: The study's resolved configuration.
        study: The Optuna study; the parent run id is stored in its user attributes so
            that every worker attaches its trials to the same parent.
    """

    def __init__(self, config: StudyConfig, study: optuna.Study) -> None:
        self.config = config
        self.study = study
        self.client = MlflowClient(tracking_uri=config.tracking_uri)
        self._experiment_id: str | None = None

    def check_connection(self) -> None:
        """Raise :class:`TrackingError` naming the URI when the tracking store is unreachable."""
        check_tracking_store(self.config.tracking_uri, client=self.client)

    @property
    def experiment_id(self) -> str:
        """The id of the study's MLflow experiment, created on first use."""
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        name = self.config.experiment_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} is deleted. Restore it with "
                    f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
                    f"or set another `experiment_name:`."
                )
            return str(experiment.experiment_id)
        try:
            return str(self.client.create_experiment(
                name, artifact_location=artifact_location(self.config.tracking_uri),
                tags={STUDY_TAG: self.config.name},
            ))
        except MlflowException:
            # Another worker created it between the lookup and the create.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def parent_run_id(self) -> str:
        """Return the study's parent run id, creating the run if the study has none yet."""
        stored = self.study.user_attrs.get(PARENT_RUN_ATTR)
        if stored and self._run_exists(stored):
            return str(stored)
        if stored:
            _logger.warning("parent run %s of study %r is missing from %s; creating a new one",
                            stored, self.config.name, redact_url(self.config.tracking_uri))
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.config.name,
            tags={STUDY_TAG: self.config.name, ROLE_TAG: "parent",
                  "mlflow.note.content": self.config.description or f"Study {self.config.name}"},
        )
        run_id = run.info.run_id
        self.study.set_user_attr(PARENT_RUN_ATTR, run_id)
        self.study.set_user_attr(EXPERIMENT_ATTR, self.experiment_id)
        self.study.set_user_attr(CONFIG_ATTR, json.dumps(self.config.raw, default=str))
        self.client.log_dict(run_id, dict(self.config.raw), "study_config.yaml")
        _logger.info("created parent run %s for study %r in experiment %r",
                     run_id, self.config.name, self.config.experiment_name)
        return run_id

    def _run_exists(self, run_id: str) -> bool:
        # Only a definite "not found" means missing: an unreachable server is retried, so a
        # short outage never makes a second parent run.
        try:
            run = call_with_retry(lambda: self.client.get_run(run_id), what="find parent run")
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return run.info.lifecycle_stage != "deleted"

    def mark_parent_running(self) -> str:
        """Set the parent run's status to RUNNING while workers train, and return its id."""
        run_id = self.parent_run_id()
        call_with_retry(lambda: self.client.update_run(run_id, status="RUNNING"),
                        what="mark parent running")
        return run_id

    def start_trial(self, trial: optuna.Trial, params: Mapping[str, Any]) -> TrialRun:
        """Open the child run of ``trial`` and log its parameters.

        Args:
            trial: The running Optuna trial; the run id is stored in its user attributes.
            params: Every parameter to log at the start (sampled values, device, seed,
                fingerprints), so pruned and failed runs have them too.
        """
        parent_id = self.parent_run_id()
        run = call_with_retry(lambda: self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial.number}",
            tags={MLFLOW_PARENT_RUN_ID: parent_id, STUDY_TAG: self.config.name,
                  ROLE_TAG: "trial", TRIAL_TAG: str(trial.number)},
        ), what="create child run")
        trial_run = TrialRun(self.client, run.info.run_id)
        try:
            trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
            trial_run.log_params({"trial_number": trial.number, **params})
        except BaseException as error:
            # The caller never receives this run, so close it here: a Ctrl-C or a storage
            # error at this point would otherwise leave it RUNNING forever.
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            trial_run.finish(status, params={"state": "INTERRUPTED"}, error=error)
            raise
        return trial_run

    def finish_study(self, status: str = "FINISHED") -> None:
        """Record the best trial on the parent run and end it with ``status``."""
        run_id = self.parent_run_id()
        tags, metrics = summarize_best_trial(self.study)
        timestamp = int(time.time() * 1000)
        call_with_retry(lambda: self.client.log_batch(
            run_id,
            metrics=[Metric(key, value, timestamp, 0) for key, value in metrics.items()],
            tags=[RunTag(key, _truncate(str(value))) for key, value in tags.items()],
        ), what="log study summary")
        call_with_retry(lambda: self.client.set_terminated(run_id, status=status),
                        what="end parent run")


def summarize_best_trial(study: optuna.Study) -> tuple[dict[str, str], dict[str, float]]:
    """Return tags and metrics that describe the study's best trial so far.

    Parameters of the best trial are stored as ``best.<name>`` tags because MLflow params
    cannot change once logged, and the best trial changes as the study goes on.
    """
    states = (optuna.trial.TrialState.COMPLETE,)
    completed = study.get_trials(deepcopy=False, states=states)
    counts: dict[str, float] = {}
    for state in optuna.trial.TrialState:
        counts[f"n_trials_{state.name.lower()}"] = float(
            len(study.get_trials(deepcopy=False, states=(state,))))
    if not completed:
        return {"best_trial_number": "none"}, counts
    best = study.best_trial
    tags = {"best_trial_number": str(best.number)}
    tags.update({f"best.{name}": str(value) for name, value in best.params.items()})
    run_id = best.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        tags["best_run_id"] = str(run_id)
    metrics = {"best_value": float(best.value), "best_trial_number": float(best.number), **counts}
    return tags, metrics


class TrialRun:
    """The child run of one trial.

    Per-epoch metrics are logged from a background thread, so a slow tracking server does
    not hold up training; :meth:`finish` waits for them before ending the run. The thread
    is our own rather than MLflow's asynchronous logging, because ending a run that used
    MLflow's queue shuts the queue down, which took about 0.5 s per trial (MLflow 3.17).
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._pending: list[Future[None]] = []
        self._failed: list[Metric] = []
        self.finished = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters once (MLflow params are immutable)."""
        entries = [Param(str(key), _truncate(str(value), 6000)) for key, value in params.items()]
        for start in range(0, len(entries), 100):
            batch = entries[start:start + 100]
            call_with_retry(lambda batch=batch: self.client.log_batch(self.run_id, params=batch),
                            what="log params")

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Queue one epoch's metrics with ``step=epoch``."""
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp, epoch) for key, value in metrics.items()]
        self._pending.append(self._executor.submit(self._log_metrics, batch))

    def _log_metrics(self, batch: list[Metric]) -> None:
        try:
            call_with_retry(lambda: self.client.log_batch(self.run_id, metrics=batch),
                            what="log epoch metrics")
        except (MlflowException, OSError) as error:
            # Kept and sent again when the run ends, e.g. after a tracking server outage.
            _logger.warning("run %s: epoch metrics could not be logged (%s); sending them "
                            "again when the trial ends", self.run_id, _first_line(error))
            self._failed.extend(batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the run (long values are truncated to MLflow's limit)."""
        entries = [RunTag(str(key), _truncate(str(value))) for key, value in tags.items()]
        call_with_retry(lambda: self.client.log_batch(self.run_id, tags=entries), what="set tags")

    def flush(self) -> None:
        """Wait until every queued metric is stored."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        failed, self._failed = self._failed, []
        if failed:
            self._resend(failed)

    def _resend(self, batch: list[Metric]) -> None:
        try:
            call_with_retry(lambda: self.client.log_batch(self.run_id, metrics=batch),
                            what="log queued metrics")
        except (MlflowException, OSError) as error:
            _logger.warning("run %s: %d metric value(s) could not be logged: %s",
                            self.run_id, len(batch), _first_line(error))

    def finish(
        self,
        status: str,
        *,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Flush queued metrics, log the final values and end the run with ``status``.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
            metrics: Final metrics (step 0).
            tags: Final tags.
            params: Final params, such as the trial's state.
            error: The exception that ended the trial; its message becomes the ``error`` tag
                and its traceback the artifact ``error.txt``.
        """
        if self.finished:
            return
        self.flush()
        self._executor.shutdown(wait=True)
        timestamp = int(time.time() * 1000)
        all_tags = dict(tags or {})
        if error is not None:
            all_tags["error"] = redact_text(f"{type(error).__name__}: {error}")
            trace = redact_text("".join(
                traceback.format_exception(type(error), error, error.__traceback__)))
            call_with_retry(lambda: self.client.log_text(self.run_id, trace, "error.txt"),
                            what="log traceback")
        call_with_retry(lambda: self.client.log_batch(
            self.run_id,
            metrics=[Metric(key, float(value), timestamp, 0) for key, value in (metrics or {}).items()],
            params=[Param(str(key), str(value)) for key, value in (params or {}).items()],
            tags=[RunTag(str(key), _truncate(str(value))) for key, value in all_tags.items()],
        ), what="log final values")
        RunStatus.from_string(status)  # Raises on a misspelled status before anything ends.
        call_with_retry(lambda: self.client.set_terminated(self.run_id, status=status),
                        what="end child run")
        self.finished = True


def close_orphaned_run(client: MlflowClient, frozen_trial: optuna.trial.FrozenTrial,
                       *, reason: str) -> bool:
    """End the child run of a trial whose worker died, if it is still RUNNING.

    Returns:
        Whether a run was closed.
    """
    run_id = frozen_trial.user_attrs.get(RUN_ID_ATTR)
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status != "RUNNING":
        return False
    client.set_tag(run_id, "error", reason)
    client.log_param(run_id, "state", "FAIL")
    client.set_terminated(run_id, status="FAILED")
    return True


def _truncate(text: str, limit: int = MAX_TAG_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    lines = redact_text(str(error)).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
