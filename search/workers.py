"""Parallel workers: one ``genre-search worker`` process per GPU or per share of the CPU cores.

``launch --gpus`` / ``launch --workers`` creates the study, its MLflow parent run, its trial
target and the feature cache in the launching process, and only then starts the workers, so
they never race to create any of them. Each worker is a separate process (its own CUDA
context, its own GIL) that runs trials of the shared study until the study's target of
finished trials is met in total.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import optuna

from search import settings
from search.config import StudyConfig, redact_url
from search.data import prepare_dataset
from search.runner import (
    FINISHED_STATES,
    WORKER_INDEX_ENV,
    count_finished,
    read_target,
    set_target,
)
from search.study import create_storage, open_study, study_exists
from search.tracking import StudyTracker, check_tracking_store
from search.training import resolve_device

_logger = logging.getLogger(__name__)

class LaunchError(ValueError):
    """The requested workers cannot be started (bad flags, no GPU, unsuitable storage)."""


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process to start.

    Attributes:
        index: Position among the launched workers, from 0.
        device: Value of the worker's ``--device`` flag.
        label: Name used in log lines, e.g. ``gpu 2`` (the physical index) or ``cpu 0``.
        env: Environment variables set for this worker only.
    """

    index: int
    device: str
    label: str
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerExit:
    """Exit status and run time of one worker process."""

    plan: WorkerPlan
    returncode: int
    seconds: float


@dataclass(frozen=True)
class LaunchSummary:
    """Outcome of the workers of one ``launch``."""

    exits: list[WorkerExit]
    interrupted_by: int | None
    n_finished: int
    target: int | None

    @property
    def exit_code(self) -> int:
        """0 when every worker succeeded, 128 + signal when interrupted, else 1."""
        if self.interrupted_by is not None:
            return 128 + self.interrupted_by
        if any(worker.returncode != 0 for worker in self.exits):
            return 1
        return 0

    @property
    def parent_status(self) -> str:
        """The MLflow status that ends the study's parent run."""
        if self.target is not None and self.n_finished >= self.target:
            return "FINISHED"
        return "KILLED" if self.interrupted_by is not None else "FAILED"


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------


def parse_gpu_list(spec: str, n_gpus: int) -> list[int]:
    """Turn ``all`` or a comma-separated list such as ``0,2`` into GPU indices.

    Args:
        spec: Value of ``--gpus``.
        n_gpus: Number of CUDA devices on this machine.

    Raises:
        LaunchError: There is no CUDA device, or the list is malformed, repeats an index or
            names a GPU this machine lacks.
    """
    if n_gpus == 0:
        raise LaunchError(
            f"--gpus {spec}: no CUDA device is visible (torch.cuda.device_count() == 0). "
            f"Check the driver and CUDA_VISIBLE_DEVICES, or use --workers N for CPU workers."
        )
    if spec.strip().lower() == "all":
        return list(range(n_gpus))
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", spec):
        raise LaunchError(f"--gpus {spec!r} is invalid. Pass `all` or indices such as 0,2.")
    indices = [int(part) for part in spec.split(",")]
    if len(set(indices)) != len(indices):
        raise LaunchError(f"--gpus {spec!r} repeats a GPU. Name each GPU once.")
    missing = [index for index in indices if index >= n_gpus]
    if missing:
        raise LaunchError(f"--gpus {spec!r}: GPU {missing[0]} does not exist; this machine has "
                          f"{n_gpus} (0 to {n_gpus - 1}).")
    return indices


def plan_gpu_workers(gpu_indices: Sequence[int], *, trials_per_gpu: int = 1) -> list[WorkerPlan]:
    """Plan ``trials_per_gpu`` workers per GPU, each seeing only its GPU as ``cuda:0``.

    Several workers on one GPU run several trials at once, which keeps a GPU busy when
    one small model cannot. Each worker is its own process with its own CUDA context
    (a few hundred MiB of GPU memory each).
    """
    if trials_per_gpu < 1:
        raise LaunchError(f"--trials-per-gpu {trials_per_gpu} is invalid. Pass 1 or more.")
    slots = [(gpu, slot) for gpu in gpu_indices for slot in range(trials_per_gpu)]
    return [
        WorkerPlan(index=index, device="cuda:0",
                   label=f"gpu {gpu}" if trials_per_gpu == 1 else f"gpu {gpu}.{slot}",
                   env={"CUDA_VISIBLE_DEVICES": str(gpu), WORKER_INDEX_ENV: str(index)})
        for index, (gpu, slot) in enumerate(slots)
    ]


def plan_cpu_workers(n_workers: int, *, threads: int | None, device: str | None = None,
                     n_cores: int | None = None) -> list[WorkerPlan]:
    """Plan ``n_workers`` workers that share this machine's CPU cores.

    Args:
        n_workers: Number of worker processes.
        threads: torch threads per worker; ``None`` divides the usable cores evenly, at
            least one thread each, so that workers do not oversubscribe the cores.
        device: ``--device`` of every worker; ``None`` means ``cpu``.
        n_cores: Usable cores; ``None`` reads this process's CPU affinity.
    """
    if n_workers < 1:
        raise LaunchError(f"--workers {n_workers} is invalid. Pass 1 or more.")
    cores = n_cores or available_cores()
    per_worker = threads or max(1, cores // n_workers)
    thread_env = {settings.NUM_THREADS.name: str(per_worker),
                  "OMP_NUM_THREADS": str(per_worker), "MKL_NUM_THREADS": str(per_worker)}
    name = device or "cpu"
    return [WorkerPlan(index=index, device=name, label=f"{name} {index}",
                       env={**thread_env, WORKER_INDEX_ENV: str(index)})
            for index in range(n_workers)]


def available_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_parallel_storage(storage_url: str, n_workers: int) -> None:
    """Reject SQLite as the storage of several workers.

    SQLite allows one writer at a time. With several workers, heartbeats and trial updates
    queue behind each other's locks, and a long wait ends in ``database is locked``, which
    fails trials. A database server has no such limit.

    Raises:
        LaunchError: ``n_workers`` > 1 and the storage is SQLite.
    """
    if n_workers < 2 or not storage_url.startswith("sqlite"):
        return
    raise LaunchError(
        f"{n_workers} workers cannot share the SQLite storage {redact_url(storage_url)}: "
        f"SQLite takes one writer at a time and parallel workers fail with `database is "
        f"locked`. Use PostgreSQL: start a server (e.g. `docker compose up -d postgres`), "
        f"create a database (`createdb optuna`), then pass --storage "
        f"postgresql+psycopg://USER@HOST/optuna or set GENRE_SEARCH_STORAGE, with the "
        f"password in PGPASSWORD or ~/.pgpass. Or run one worker (drop --workers/--gpus)."
    )


def read_storage_file(path: str | os.PathLike[str]) -> str:
    """Return the storage URL stored on the first line of ``path`` (GENRE_SEARCH_STORAGE_FILE).

    Raises:
        LaunchError: The file is missing, unreadable or empty.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise LaunchError(f"{settings.STORAGE_FILE.name}={str(path)!r} cannot be read "
                          f"({error.strerror}). Point it at a file holding the storage URL."
                          ) from None
    url = lines[0].strip() if lines else ""
    if not url:
        raise LaunchError(f"{settings.STORAGE_FILE.name}={str(path)!r} is empty. Write the "
                          f"storage URL on its first line.")
    return url


def check_attached_worker_storage(config: StudyConfig) -> None:
    """Reject a ``worker`` that would join other live workers on a SQLite storage.

    Trials whose worker stopped sending heartbeats are failed first, so a crashed worker
    does not block a new one for longer than the grace period.

    Raises:
        LaunchError: The storage is SQLite and the study has running trials.
    """
    if not config.storage.startswith("sqlite"):
        return
    storage = create_storage(config.storage)
    if not study_exists(config.name, storage):
        return
    study = optuna.load_study(study_name=config.name, storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        check_parallel_storage(config.storage, n_workers=1 + len(running))


@dataclass(frozen=True)
class LaunchOptions:
    """The ``launch`` flags that shape its workers.

    Storage and tracking URLs reach the workers through their environment (unexpanded,
    as given), never on their command line, where other users of the machine could read a
    password.
    """

    config_path: Path
    n_workers: int | None = None
    gpus: str | None = None
    threads: int | None = None
    device: str | None = None
    data: Path | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    cache_dir: Path | None = None
    timeout: float | None = None
    verbosity: int = 0
    trials_per_gpu: int = 1
    training_flags: tuple[str, ...] = ()


def plan_launch(config: StudyConfig, options: LaunchOptions) -> list[WorkerPlan]:
    """Plan the workers of ``options`` and check that the storage suits them.

    Raises:
        LaunchError: No GPU for ``--gpus``, or SQLite storage for several workers.
    """
    if options.gpus is not None:
        import torch

        plans = plan_gpu_workers(parse_gpu_list(options.gpus, torch.cuda.device_count()),
                                 trials_per_gpu=options.trials_per_gpu)
    else:
        plans = plan_cpu_workers(options.n_workers or 1, threads=options.threads,
                                 device=options.device)
    check_parallel_storage(config.storage, len(plans))
    return plans


def launch_workers(config: StudyConfig, options: LaunchOptions, *,
                   more_trials: int | None) -> int:
    """Prepare the study, run its workers until they exit and end the parent run.

    Returns:
        The exit status for ``launch``: 0 when every worker succeeded, 128 + signal number
        when interrupted, 1 when a worker failed.
    """
    plans = plan_launch(config, options)
    prepared = prepare_study(config, more_trials=more_trials)
    if prepared.target is not None and prepared.n_finished >= prepared.target:
        _logger.info("study %r already has %d finished trials (target %d); pass --n-trials N "
                     "to run more", config.name, prepared.n_finished, prepared.target)
        return 0

    exits, interrupted_by = run_workers(config.name, plans, extra_args=_worker_flags(options),
                                        env=_worker_env(options))
    n_finished, target, counts = study_progress(config)
    summary = LaunchSummary(exits=exits, interrupted_by=interrupted_by, n_finished=n_finished,
                            target=target)
    finish_study(config, summary)
    sys.stdout.write(format_summary(config, summary, counts) + "\n")
    return summary.exit_code


def _worker_flags(options: LaunchOptions) -> list[str]:
    flags = ["--config", str(options.config_path)]
    for name, value in (("--data", options.data), ("--cache-dir", options.cache_dir),
                        ("--timeout", options.timeout)):
        if value is not None:
            flags += [name, str(value)]
    flags += list(options.training_flags)
    if options.verbosity < 0:
        flags.append("--quiet")
    flags += ["--verbose"] * max(0, options.verbosity)
    return flags


def _worker_env(options: LaunchOptions) -> dict[str, str]:
    env = dict(os.environ)
    if options.storage:
        env[settings.STORAGE.name] = options.storage
    if options.tracking_uri:
        env[settings.TRACKING_URI.name] = options.tracking_uri
    return env


# --------------------------------------------------------------------------------------
# Preparing the study before the workers start
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedStudy:
    """The study state every worker attaches to."""

    target: int | None
    n_finished: int
    parent_run_id: str


def prepare_study(config: StudyConfig, *, more_trials: int | None) -> PreparedStudy:
    """Build the feature cache, then create the study, its trial target and its parent run.

    Running this once before the workers start means no two workers create the parent run,
    write the synthetic dataset or extract the same features at the same time.
    """
    storage = create_storage(config.storage, heartbeat=False)
    check_tracking_store(config.tracking_uri)
    # Unusable data is rejected before the study and its parent run are created.
    prepare_dataset(config, device=resolve_device("cpu"), progress=False)
    study = open_study(config, storage=storage)
    tracker = StudyTracker(config, study)
    target = set_target(study, config, more_trials=more_trials)
    parent_run_id = tracker.mark_parent_running()
    _logger.info("study %r prepared: target %s finished trials (%d already), parent run %s",
                 config.name, target, count_finished(study), parent_run_id)
    return PreparedStudy(target=target, n_finished=count_finished(study),
                         parent_run_id=parent_run_id)


def finish_study(config: StudyConfig, summary: LaunchSummary) -> None:
    """End the parent run with the launch's outcome once every worker has exited."""
    study = open_study(config, storage=create_storage(config.storage, heartbeat=False),
                       create=False)
    StudyTracker(config, study).finish_study(status=summary.parent_status)


def study_progress(config: StudyConfig) -> tuple[int, int | None, dict[str, int]]:
    """Return the finished trials, the target and the trial count per state of the study."""
    storage = create_storage(config.storage, heartbeat=False)
    study = optuna.load_study(study_name=config.name, storage=storage)
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
    return finished, read_target(study, config), counts


# --------------------------------------------------------------------------------------
# Running the worker processes
# --------------------------------------------------------------------------------------


def worker_command(study_name: str, plan: WorkerPlan, *, extra_args: Sequence[str]) -> list[str]:
    """Return the argv of one worker: ``python -m search worker STUDY --device ...``."""
    return [sys.executable, "-m", "search", "worker", study_name, "--device", plan.device,
            "--no-progress", *extra_args]


def run_workers(
    study_name: str,
    plans: Sequence[WorkerPlan],
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> tuple[list[WorkerExit], int | None]:
    """Start one process per plan, forward SIGINT/SIGTERM to them and wait for all.

    Workers run in their own sessions, so a Ctrl-C in the terminal reaches them once,
    through this process. At the first signal every worker closes its current trial
    (its MLflow run ends KILLED, its Optuna trial FAIL); a second one makes them exit at once.
    Each line a worker writes is copied to stderr behind its label.

    Args:
        study_name: The study every worker attaches to.
        plans: The workers to start.
        extra_args: More ``worker`` flags, such as ``--config``.
        env: Base environment of the workers; this process's environment when ``None``.

    Returns:
        How each worker ended, and the signal that interrupted the launch (or ``None``).
    """
    base_env = dict(os.environ if env is None else env)
    processes: list[tuple[WorkerPlan, subprocess.Popen[bytes], float]] = []
    copiers: list[threading.Thread] = []
    with _forward_signals(processes) as received:
        for plan in plans:
            if received:
                break
            command = worker_command(study_name, plan, extra_args=extra_args)
            process = subprocess.Popen(command, env={**base_env, **plan.env},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            processes.append((plan, process, time.monotonic()))
            _logger.info("started worker %d (%s, device %s, pid %d%s)", plan.index, plan.label,
                         plan.device, process.pid, _describe_env(plan.env))
            assert process.stdout is not None
            copier = threading.Thread(target=_copy_lines, args=(process.stdout, plan.label),
                                      daemon=True)
            copier.start()
            copiers.append(copier)
        exits = [_wait(plan, process, started) for plan, process, started in processes]
    for copier in copiers:
        copier.join(timeout=5)
    return exits, (received[0] if received else None)


def _wait(plan: WorkerPlan, process: subprocess.Popen[bytes], started: float) -> WorkerExit:
    returncode = process.wait()
    # A worker killed by a signal has a negative return code; report it the shell's way.
    code = 128 - returncode if returncode < 0 else returncode
    level = logging.INFO if code == 0 else logging.WARNING
    _logger.log(level, "worker %d (%s) exited with status %d after %.0f s", plan.index,
                plan.label, code, time.monotonic() - started)
    return WorkerExit(plan=plan, returncode=code, seconds=time.monotonic() - started)


@contextmanager
def _forward_signals(
    processes: list[tuple[WorkerPlan, subprocess.Popen[bytes], float]],
) -> Iterator[list[int]]:
    received: list[int] = []

    def forward(signal_number: int, frame: FrameType | None) -> None:
        name = signal.Signals(signal_number).name
        if received:
            _logger.warning("received %s again: workers exit at once", name)
        else:
            _logger.warning("received %s: workers close their current trials and stop "
                            "(send it again to stop them at once)", name)
        received.append(signal_number)
        for _, process, _ in processes:
            if process.poll() is None:
                process.send_signal(signal_number)

    previous = {number: signal.signal(number, forward)
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _copy_lines(stream: IO[bytes], label: str) -> None:
    for raw_line in iter(stream.readline, b""):
        line = raw_line.decode("utf-8", errors="replace").rstrip()
        sys.stderr.write(f"[{label}] {line}\n")
        sys.stderr.flush()
    stream.close()


def _describe_env(env: Mapping[str, str]) -> str:
    shown = [f"{key}={env[key]}" for key in ("CUDA_VISIBLE_DEVICES", settings.NUM_THREADS.name)
             if key in env]
    return ", " + ", ".join(shown) if shown else ""


def format_summary(config: StudyConfig, summary: LaunchSummary, counts: Mapping[str, int]) -> str:
    """Return the text ``launch`` prints when its workers have exited."""
    lines = [f"Study {config.name!r}: {summary.n_finished} finished trials of target "
             f"{summary.target}; trials by state: "
             + ", ".join(f"{state}={n}" for state, n in sorted(counts.items()))]
    for worker in summary.exits:
        lines.append(f"  worker {worker.plan.index} ({worker.plan.label}): exit status "
                     f"{worker.returncode} after {worker.seconds:.0f} s")
    if summary.interrupted_by is not None:
        lines.append(f"Interrupted by {signal.Signals(summary.interrupted_by).name}; run the "
                     f"same command again to resume.")
    lines.append(f"Parent run ended {summary.parent_status}. Inspect: genre-search status "
                 f"{config.name}")
    return "\n".join(lines)
