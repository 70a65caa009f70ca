"""The ``genre-search`` command line: a thin layer over :mod:`search`'s functions."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click

from search import settings
from search.config import ConfigError, Overrides, StudyConfig, apply_overrides, load_studies

_logger = logging.getLogger("search.cli")

EXIT_INPUT_ERROR = 2
EXIT_RUNTIME_ERROR = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the current trial is closed and the process exits."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


# --------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes log records through tqdm so they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(verbosity: int) -> None:
    """Send genre-search's log records to stderr; ``verbosity`` is -1 quiet, 0, 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    for name in ("search", "features", "models"):
        package_logger = logging.getLogger(name)
        package_logger.handlers[:] = [handler]
        package_logger.setLevel(level)
        package_logger.propagate = False
    import optuna

    # Our own per-trial lines replace Optuna's, which repeat every parameter.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


MLFLOW_PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def disable_mlflow_progress_bars() -> None:
    """Turn off MLflow's "Downloading artifacts" bars unless the user set the variable.

    MLflow 3.17 reads MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR at each artifact transfer and
    draws its tqdm bars even when stderr is not a terminal.
    """
    os.environ.setdefault(MLFLOW_PROGRESS_BAR_VARIABLE, "false")


def fail(message: str, *, code: int) -> NoReturn:
    """Print ``message`` as an error on stderr and exit with ``code``."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _config_path(path: str | None) -> Path:
    return Path(path or settings.CONFIG.get() or "studies.yaml")


def resolve_study(config_path: str | None, name: str, overrides: Overrides) -> StudyConfig:
    """Load ``studies.yaml``, pick study ``name`` and apply CLI flags and environment variables.

    Exits with status 2 and every problem listed when the configuration is invalid.
    """
    path = _config_path(config_path)
    try:
        studies = load_studies(path)
        study = studies.get(name)
        resolved = apply_overrides(study, overrides, base_dir=path.resolve().parent)
    except ConfigError as error:
        fail(str(error), code=EXIT_INPUT_ERROR)
    return _apply_training_flags(resolved)


_TRAINING_FLAGS = "genre_search.training_flags"


def _training_flags(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add --mixed-precision/--no-mixed-precision and --compile/--no-compile to a command.

    The values go into the click context, and :func:`resolve_study` applies them over the
    study's ``training`` section, so the command's own signature does not change.
    """
    @functools.wraps(function)
    def command(*args: Any, mixed_precision: bool | None, compile_model: bool | None,
                **kwargs: Any) -> Any:
        flags = {"mixed_precision": mixed_precision, "compile": compile_model}
        click.get_current_context().meta[_TRAINING_FLAGS] = flags
        return function(*args, **kwargs)

    options = [
        click.option("--mixed-precision/--no-mixed-precision", default=None,
                     help="bfloat16 autocast and channels-last on CUDA "
                          "[default: training.mixed_precision, on]."),
        click.option("--compile/--no-compile", "compile_model", default=None,
                     help="Wrap each model with torch.compile [default: training.compile, off]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _training_flag_args() -> tuple[str, ...]:
    """Return the training flags given to this command, to pass on to worker processes."""
    flags = click.get_current_context().meta.get(_TRAINING_FLAGS, {})
    names = {"mixed_precision": "mixed-precision", "compile": "compile"}
    return tuple(f"--{name}" if flags[key] else f"--no-{name}"
                 for key, name in names.items() if flags.get(key) is not None)


def _apply_training_flags(study: StudyConfig) -> StudyConfig:
    context = click.get_current_context(silent=True)
    flags = context.meta.get(_TRAINING_FLAGS, {}) if context is not None else {}
    changes: dict[str, bool] = {key: value for key, value in flags.items() if value is not None}
    if changes.get("mixed_precision") is False:
        changes["channels_last"] = False
    if not changes:
        return study
    return dataclasses.replace(study, training=dataclasses.replace(study.training, **changes))


@contextmanager
def interrupt_handling() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into :class:`Interrupted`; a second one exits at once."""
    received: list[int] = []

    def handle(signal_number: int, frame: FrameType | None) -> None:
        if received:
            os._exit(128 + signal_number)
        received.append(signal_number)
        _logger.warning("received %s: stopping after closing the current trial "
                        "(send it again to exit at once)", signal.Signals(signal_number).name)
        raise Interrupted(signal_number)

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_guarded(action: Callable[[], Any]) -> Any:
    """Run a command's work, mapping our errors to exit statuses and clear messages."""
    from features import DatasetError
    from search.study import StorageError
    from search.tracking import TrackingError
    from search.runner import TrialsKeepFailingError
    from search.training import DeviceError
    from search.workers import LaunchError

    try:
        with interrupt_handling():
            return action()
    except Interrupted as interrupt:
        click.echo(f"Interrupted by {signal.Signals(interrupt.signal_number).name}.", err=True)
        sys.exit(128 + interrupt.signal_number)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(128 + signal.SIGINT)
    except (ConfigError, DatasetError, LaunchError, DeviceError) as error:
        fail(str(error), code=EXIT_INPUT_ERROR)
    except (StorageError, TrackingError, TrialsKeepFailingError) as error:
        fail(str(error), code=EXIT_RUNTIME_ERROR)


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------

_config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="Path of studies.yaml [env GENRE_SEARCH_CONFIG; default ./studies.yaml].",
)
_verbosity_options = [
    click.option("-v", "--verbose", count=True, help="Log every epoch (DEBUG)."),
    click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only."),
]


def _with_verbosity(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_verbosity_options):
        function = option(function)
    return function


def _study_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--n-trials", type=click.IntRange(min=1), default=None,
                     help="Run this many more trials in total across workers "
                          "[default: until the study's n_trials have finished]."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Stop starting new trials after this many seconds."),
        click.option("--device", default=None,
                     help="auto, cpu, cuda, cuda:N or mps [env GENRE_SEARCH_DEVICE; "
                          "default auto: a GPU when there is one]."),
        click.option("--data", type=click.Path(path_type=Path), default=None,
                     help="Folder of audio in genre sub-folders [env GENRE_SEARCH_DATA]."),
        click.option("--storage", default=None,
                     help="Optuna storage URL [env GENRE_SEARCH_STORAGE]."),
        click.option("--tracking-uri", default=None,
                     help="MLflow tracking URI [env GENRE_SEARCH_TRACKING_URI]."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Feature cache folder [env GENRE_SEARCH_CACHE_DIR]."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bars for features and epochs [default: on a terminal]."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genre-search")
def main() -> None:
    """Hyperparameter search for music-genre classifiers.

    Studies are declared in studies.yaml; each trial trains a PyTorch model on log-mel
    features and is tracked as a nested MLflow run.
    """


@main.command()
@click.argument("study")
@_config_option
@_study_options
@click.option("--workers", "n_workers", type=click.IntRange(min=1), default=None,
              help="Start this many worker processes on this machine, on --device "
                   "[default cpu]; they share the study's n_trials.")
@click.option("--gpus", default=None,
              help="Start one worker process per GPU: `all` or indices such as 0,2.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads per --workers process [default: CPU cores / workers].")
@click.option("--trials-per-gpu", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --gpus: worker processes per GPU, so that small models run several "
                   "trials on one GPU at once.")
@_training_flags
@_with_verbosity
def launch(study: str, config_path: str | None, n_trials: int | None, timeout: float | None,
           device: str | None, data: Path | None, storage: str | None,
           tracking_uri: str | None, cache_dir: Path | None, progress: bool | None,
           n_workers: int | None, gpus: str | None, threads: int | None,
           trials_per_gpu: int, verbose: int, quiet: bool) -> None:
    """Create STUDY (or resume it) and run its trials in this process or in workers."""
    configure_logging(-1 if quiet else verbose)
    if trials_per_gpu > 1 and gpus is None:
        raise click.UsageError(f"--trials-per-gpu {trials_per_gpu} applies to --gpus only. "
                               f"Pass --gpus all (or indices such as 0,2) too.")
    _check_worker_flags(n_workers=n_workers, gpus=gpus, device=device, threads=threads)
    _check_data_flag(data)
    overrides = Overrides(n_trials=n_trials, timeout=timeout, device=device, data=data,
                          storage=_storage_flag(storage), tracking_uri=tracking_uri,
                          cache_dir=cache_dir)
    config = resolve_study(config_path, study, overrides)
    if n_workers is not None or gpus is not None:
        from search.workers import LaunchOptions, launch_workers

        options = LaunchOptions(
            config_path=_config_path(config_path).resolve(), n_workers=n_workers, gpus=gpus,
            threads=threads, device=device, data=data, storage=storage,
            tracking_uri=tracking_uri, cache_dir=cache_dir, timeout=timeout,
            verbosity=-1 if quiet else verbose, trials_per_gpu=trials_per_gpu,
            training_flags=_training_flag_args(),
        )
        sys.exit(run_guarded(lambda: launch_workers(config, options, more_trials=n_trials)))
    show_progress = sys.stderr.isatty() if progress is None else progress
    from search.workers import check_attached_worker_storage

    # A second `launch` on a SQLite study that is running would share its sampler seed
    # and its database lock, so it is rejected like a second worker.
    run_guarded(lambda: check_attached_worker_storage(config))
    _run_study(config, more_trials=n_trials, progress=show_progress, set_target=True)


def _check_worker_flags(*, n_workers: int | None, gpus: str | None, device: str | None,
                        threads: int | None) -> None:
    if n_workers is not None and gpus is not None:
        raise click.UsageError("--workers and --gpus cannot be combined: --workers N starts N "
                               "workers on --device (default cpu), --gpus one worker per GPU. "
                               "Pass one of them.")
    if gpus is not None and device is not None:
        raise click.UsageError(f"--gpus {gpus} and --device {device} cannot be combined: --gpus "
                               f"sets each worker's device. Drop --device.")
    if threads is not None and n_workers is None:
        raise click.UsageError("--threads applies to --workers only. Pass --workers N too, or "
                               "set training.num_threads for a single process.")


def _storage_flag(storage: str | None) -> str | None:
    """Return --storage, else the URL in GENRE_SEARCH_STORAGE_FILE unless GENRE_SEARCH_STORAGE is set."""
    if storage or settings.STORAGE.get():
        return storage
    path = settings.STORAGE_FILE.get()
    if path is None:
        return None
    from search.workers import LaunchError, read_storage_file

    try:
        return read_storage_file(path)
    except LaunchError as error:
        fail(str(error), code=EXIT_INPUT_ERROR)


@main.command()
@click.argument("study")
@_config_option
@_study_options
@_training_flags
@_with_verbosity
def worker(study: str, config_path: str | None, n_trials: int | None, timeout: float | None,
           device: str | None, data: Path | None, storage: str | None,
           tracking_uri: str | None, cache_dir: Path | None, progress: bool | None,
           verbose: int, quiet: bool) -> None:
    """Attach one more worker to a running STUDY; its trials join the same parent run."""
    configure_logging(-1 if quiet else verbose)
    _check_data_flag(data)
    overrides = Overrides(n_trials=n_trials, timeout=timeout, device=device, data=data,
                          storage=_storage_flag(storage), tracking_uri=tracking_uri,
                          cache_dir=cache_dir)
    config = resolve_study(config_path, study, overrides)
    show_progress = sys.stderr.isatty() if progress is None else progress
    from search.workers import check_attached_worker_storage

    run_guarded(lambda: check_attached_worker_storage(config))
    _run_study(config, more_trials=n_trials, progress=show_progress, set_target=False)


def _check_data_flag(data: Path | None) -> None:
    if data is not None and not data.exists():
        fail(f"--data {str(data)!r}: folder not found. Pass a folder of audio in genre "
             f"sub-folders, e.g. data/gtzan/blues/blues.00000.wav.", code=EXIT_INPUT_ERROR)


def _run_study(config: StudyConfig, *, more_trials: int | None, progress: bool,
               set_target: bool) -> None:
    from search.runner import run_worker

    if not progress:
        disable_mlflow_progress_bars()

    def work() -> Any:
        if set_target and more_trials is None and config.n_trials is not None:
            already = _finished_trials(config)
            if already is not None and already >= config.n_trials:
                click.echo(f"Study {config.name!r} already has {already} finished trials "
                           f"(n_trials={config.n_trials}). Pass --n-trials N to run more.")
                return None
        return run_worker(config, more_trials=more_trials, progress=progress,
                          set_study_target=set_target)

    result = run_guarded(work)
    if result is None:
        return
    best = (f"best trial {result.best_trial_number}: {config.metric}={result.best_value:.4f}"
            if result.best_trial_number is not None else "no completed trial")
    stopped = (f", stopped at the timeout of {config.timeout:g} s"
               if result.stopped_at_timeout and config.timeout is not None else "")
    click.echo(f"Study {config.name!r}: ran {result.n_trials_run} trials in "
               f"{result.seconds:.0f} s{stopped}; {result.n_finished_in_study} finished in "
               f"total; {best}.")
    click.echo(f"Inspect: genre-search status {config.name}{_location_flags(config)}")
    click.echo(f"Compare: mlflow ui --backend-store-uri {_display_uri(config.tracking_uri)}")


def _location_flags(config: StudyConfig) -> str:
    """Return the flags that point `status` at this run's studies file and storage."""
    flags = ""
    config_path = _config_path(None)
    if click.get_current_context().params.get("config_path"):
        config_path = Path(click.get_current_context().params["config_path"])
    if config_path != Path("studies.yaml"):
        flags += f" --config {config_path}"
    try:
        from_file = load_studies(config_path).get(config.name)
    except ConfigError:
        return flags
    without_flags = apply_overrides(from_file, Overrides(), base_dir=config_path.resolve().parent)
    if config.storage != without_flags.storage:
        from search.config import redact_url

        flags += f" --storage '{redact_url(config.storage)}'"
    return flags


def _finished_trials(config: StudyConfig) -> int | None:
    import optuna

    from search.runner import count_finished
    from search.study import create_storage, study_exists

    storage = create_storage(config.storage, heartbeat=False)
    if not study_exists(config.name, storage):
        return None
    return count_finished(optuna.load_study(study_name=config.name, storage=storage))


def _display_uri(uri: str) -> str:
    from search.config import redact_url

    return redact_url(uri)


@main.command()
@click.argument("study")
@_config_option
@click.option("--storage", default=None, help="Optuna storage URL [env GENRE_SEARCH_STORAGE].")
def status(study: str, config_path: str | None, storage: str | None) -> None:
    """Print a table of STUDY's trials and its best trial."""
    from search.reports import format_status

    configure_logging(-1)
    config = resolve_study(config_path, study, Overrides(storage=_storage_flag(storage)))
    click.echo(run_guarded(lambda: format_status(config)))


@main.command()
@_config_option
@click.option("--storage", default=None, help="Optuna storage URL [env GENRE_SEARCH_STORAGE].")
def studies(config_path: str | None, storage: str | None) -> None:
    """List the studies of studies.yaml and whether each exists in its storage."""
    from search.reports import format_studies

    configure_logging(-1)
    path = _config_path(config_path)
    try:
        loaded = load_studies(path)
    except ConfigError as error:
        fail(str(error), code=EXIT_INPUT_ERROR)
    configs = [apply_overrides(config, Overrides(storage=storage), base_dir=path.resolve().parent)
               for config in loaded.studies.values()]
    click.echo(run_guarded(lambda: format_studies(configs)))



@main.command()
@click.argument("study")
@_config_option
@click.option("--storage", default=None, help="Optuna storage URL [env GENRE_SEARCH_STORAGE].")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [env GENRE_SEARCH_TRACKING_URI].")
def report(study: str, config_path: str | None, storage: str | None,
           tracking_uri: str | None) -> None:
    """Refresh STUDY's summary on its MLflow parent run and print where it is.

    The summary is the resolved study config, trials.csv and Optuna's plots as HTML
    (parallel coordinates, parameter importances, optimization history, intermediate values).
    """
    configure_logging(-1)
    config = resolve_study(config_path, study, Overrides(storage=_storage_flag(storage),
                                                         tracking_uri=tracking_uri))
    artifact_uri, names = run_guarded(lambda: _refresh_report(config))
    click.echo(f"Study {config.name!r}: summary of the parent run refreshed in {artifact_uri}")
    for name in names:
        click.echo(f"  {name}")


def _refresh_report(config: StudyConfig) -> tuple[str, list[str]]:
    import optuna

    from search.study import create_storage, study_exists
    from search.summary import log_study_summary
    from search.tracking import StudyTracker

    storage = create_storage(config.storage, heartbeat=False)
    if not study_exists(config.name, storage):
        fail(f"study {config.name!r} does not exist in {_display_uri(config.storage)}. "
             f"Run it first with: genre-search launch {config.name}", code=EXIT_INPUT_ERROR)
    tracker = StudyTracker(config, optuna.load_study(study_name=config.name, storage=storage))
    tracker.check_connection()
    return log_study_summary(tracker)


@main.command()
@click.argument("model_uri")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI that resolves models:/ and runs:/ URIs "
                   "[env GENRE_SEARCH_TRACKING_URI, then MLFLOW_TRACKING_URI].")
@click.option("--device", default="cpu", show_default=True,
              help="Device to classify on: cpu, cuda, cuda:N or mps.")
def predict(model_uri: str, files: tuple[Path, ...], tracking_uri: str | None,
            device: str) -> None:
    """Classify audio FILES with the model at MODEL_URI (e.g. models:/NAME@champion).

    Prints one line per file: the path, the genre and its probability. A file that cannot
    be read is reported on stderr and the others are still classified. Exits with status 0
    when every file was classified, 1 when some were not or the model could not be loaded.
    """
    configure_logging(-1)
    from search.training import resolve_device

    run_guarded(lambda: resolve_device(device))
    if not sys.stderr.isatty():
        disable_mlflow_progress_bars()
    uri = tracking_uri or settings.TRACKING_URI.get() or os.environ.get("MLFLOW_TRACKING_URI")
    model = run_guarded(lambda: _load_model(model_uri, uri, device))
    n_failed = 0
    for path in files:
        try:
            row = model.predict(_path_frame(path)).iloc[0]
        except Exception as error:  # Decode, resampling and shape errors all mean "skip".
            click.echo(f"Error: cannot classify {str(path)!r}: {error}", err=True)
            n_failed += 1
            continue
        genre = str(row["genre"])
        click.echo(f"{path}\t{genre}\t{float(row[f'prob_{genre}']):.3f}")
    if n_failed:
        click.echo(f"{n_failed} of {len(files)} files could not be classified.", err=True)
        sys.exit(EXIT_RUNTIME_ERROR)


def _load_model(model_uri: str, tracking_uri: str | None, device: str) -> Any:
    from mlflow.exceptions import MlflowException

    from search.registry import load_classifier

    try:
        return load_classifier(model_uri, tracking_uri=tracking_uri, device=device)
    except (MlflowException, OSError, ValueError) as error:
        fail(f"cannot load model {model_uri!r} from tracking URI "
             f"{_display_uri(tracking_uri or 'the MLflow default')}: {error}. Check the name "
             f"and alias, and pass --tracking-uri (e.g. sqlite:///mlflow.db).",
             code=EXIT_RUNTIME_ERROR)


def _path_frame(path: Path) -> Any:
    import pandas as pd

    return pd.DataFrame({"path": [str(path)]})


if __name__ == "__main__":
    main()
