"""End-to-end tests of parallel workers on PostgreSQL with a real MLflow tracking server.

Each test gets a fresh database on 127.0.0.1:5432, owned by a role that logs in with a
password, so the tests also check that the password never reaches logs or MLflow. The
workers are real ``python -m search`` processes training tiny models on generated audio.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

psycopg = pytest.importorskip("psycopg")

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
ROLE = "genre_test"
PASSWORD_VARIABLE = "GENRE_TEST_DB_PASSWORD"
RUN_TIMEOUT_SECONDS = 420

STUDIES_YAML = """
defaults:
  cache_dir: cache
  device: cpu
studies:
  tiny:
    dataset:
      synthetic: {{n_genres: 3, tracks_per_genre: 4, seconds: 4.0, seed: 0}}
      sample_rate: 8000
      segment_seconds: 1.0
      split: {{method: random, valid_fraction: 0.25, seed: 0}}
    features: {{n_fft: 256, hop_length: 128, n_mels: 16, f_max: 4000.0}}
    training: {{epochs: {epochs}, num_threads: 1}}
    pruner: {{name: none}}
    sampler: {{name: random, seed: 0}}
    n_trials: {n_trials}
    search_space:
      family: {{choices: [cnn]}}
      learning_rate: {{low: 1.0e-3, high: 3.0e-3, log: true}}
      batch_size: {{choices: [16]}}
      dropout: {{low: 0.0, high: 0.1}}
      weight_decay: {{low: 1.0e-6, high: 1.0e-5, log: true}}
      optimizer: {{choices: [adam]}}
      architectures:
        cnn:
          n_conv_layers: {{low: 2, high: 2}}
          base_channels: {{choices: [4]}}
          kernel_size: {{choices: [3]}}
"""


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 as postgres: {error}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(uri, server, root / "server.log")
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _wait_for_health(uri: str, server: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server at {uri} not healthy after 120 s")


@dataclass
class Setup:
    """Where one test's workers run and what they share."""

    workdir: Path
    env: dict[str, str]
    storage_url: str
    password: str
    tracking_uri: str

    def study(self) -> optuna.Study:
        storage = optuna.storages.RDBStorage(self.storage_url)
        return optuna.load_study(study_name="tiny", storage=storage)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "search", *args], cwd=self.workdir,
                                env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


@pytest.fixture()
def database() -> Iterator[tuple[str, str]]:
    """A fresh database owned by a role with a password; yields its name and the password."""
    name = f"genre_test_{uuid.uuid4().hex[:10]}"
    password = f"pw-{uuid.uuid4().hex}"
    with _admin_connection() as admin:
        exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        admin.execute(f"{verb} ROLE {ROLE} LOGIN PASSWORD '{password}'")
        admin.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
    yield name, password
    with _admin_connection() as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _setup(tmp_path: Path, database: tuple[str, str], tracking_uri: str, *, epochs: int,
           n_trials: int) -> Setup:
    name, password = database
    (tmp_path / "studies.yaml").write_text(STUDIES_YAML.format(epochs=epochs, n_trials=n_trials))
    env = {key: value for key, value in os.environ.items() if not key.startswith("GENRE_SEARCH")}
    env.update({
        PASSWORD_VARIABLE: password,
        "GENRE_SEARCH_STORAGE": f"postgresql+psycopg://{ROLE}:${{{PASSWORD_VARIABLE}}}"
                                f"@127.0.0.1:5432/{name}",
        "GENRE_SEARCH_TRACKING_URI": tracking_uri,
        "GENRE_SEARCH_HEARTBEAT_INTERVAL": "1",
        "GENRE_SEARCH_GRACE_PERIOD": "4",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    })
    storage_url = f"postgresql+psycopg://{ROLE}:{password}@127.0.0.1:5432/{name}"
    return Setup(tmp_path, env, storage_url, password, tracking_uri)


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    return process.returncode, output


def _runs(setup: Setup) -> list[Run]:
    client = MlflowClient(tracking_uri=setup.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    assert experiment is not None
    study_name_tag = "genre_search.study"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent_id = setup.study().user_attrs["mlflow_parent_run_id"]
    # The experiment is shared by the tests of this file; keep this test's runs only.
    return [run for run in runs if run.data.tags.get(study_name_tag) == "tiny"
            and (run.info.run_id == parent_id
                 or run.data.tags.get("mlflow.parentRunId") == parent_id)]


def _children(setup: Setup) -> list[Run]:
    parent_id = setup.study().user_attrs["mlflow_parent_run_id"]
    return [run for run in _runs(setup) if run.data.tags.get("mlflow.parentRunId") == parent_id]


def _parent(setup: Setup) -> Run:
    parent_id = setup.study().user_attrs["mlflow_parent_run_id"]
    return MlflowClient(tracking_uri=setup.tracking_uri).get_run(parent_id)


def _wait_for_running(setup: Setup, n_running: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        try:
            trials = setup.study().get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:
            trials = []
        # A trial counts once its MLflow run exists, so a kill lands inside the trial.
        if len([trial for trial in trials if "mlflow_run_id" in trial.user_attrs]) >= n_running:
            return
        time.sleep(0.3)
    pytest.fail(f"{n_running} running trial(s) not seen within 240 s")


def _worker_pids(launch_pid: int) -> list[int]:
    children = Path(f"/proc/{launch_pid}/task/{launch_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def _artifact_texts(client: MlflowClient, run_id: str, path: str = "") -> Iterator[str]:
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            yield from _artifact_texts(client, run_id, info.path)
        elif (info.file_size or 0) < 2_000_000:
            local = client.download_artifacts(run_id, info.path)
            yield Path(local).read_bytes().decode("utf-8", errors="replace")


def test_three_workers_share_one_study(tmp_path: Path, database: tuple[str, str],
                                       tracking_uri: str) -> None:
    setup = _setup(tmp_path, database, tracking_uri, epochs=2, n_trials=9)
    returncode, output = _finish(setup.start("launch", "tiny", "--workers", "3"))
    assert returncode == 0, output[-3000:]

    study = setup.study()
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                        optuna.trial.TrialState.PRUNED))
    # Exactly the target of 9 trials finished, counted over all workers.
    assert len(finished) == 9
    children = _children(setup)
    finished_runs = [run for run in children if run.info.status == "FINISHED"]
    # Every finished trial has one finished child run under the single parent ...
    assert len(finished_runs) == 9
    # ... with no trial number logged twice ...
    numbers = [run.data.tags["genre_search.trial_number"] for run in finished_runs]
    assert len(set(numbers)) == 9
    # ... and no run left RUNNING, the parent included.
    assert [run.info.run_id for run in _runs(setup) if run.info.status == "RUNNING"] == []
    # The parent run ends FINISHED once the target is met.
    assert _parent(setup).info.status == "FINISHED"

    # The database password is in none of the logs ...
    assert setup.password not in output
    client = MlflowClient(tracking_uri=tracking_uri)
    for run in _runs(setup):
        # ... MLflow params ...
        assert not any(setup.password in value for value in run.data.params.values())
        # ... tags ...
        assert not any(setup.password in value for value in run.data.tags.values())
        # ... or artifacts.
        assert not any(setup.password in text
                       for text in _artifact_texts(client, run.info.run_id))
    # The Optuna study's stored config has no password either.
    assert setup.password not in str(study.user_attrs)


def test_killed_worker_trial_is_retried(tmp_path: Path, database: tuple[str, str],
                                        tracking_uri: str) -> None:
    setup = _setup(tmp_path, database, tracking_uri, epochs=40, n_trials=4)
    launch = setup.start("launch", "tiny", "--workers", "2")
    _wait_for_running(setup, 2, launch)
    time.sleep(0.5)  # Let both trials start their epochs.
    victim = _worker_pids(launch.pid)[0]
    os.kill(victim, signal.SIGKILL)
    returncode, output = _finish(launch)

    # launch reports the killed worker (exit 1) ...
    assert returncode == 1, output[-3000:]
    assert "exited with status 137" in output
    study = setup.study()
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                        optuna.trial.TrialState.PRUNED))
    # ... but the surviving worker finished the study's 4 trials.
    assert len(finished) == 4
    retries = [trial for trial in study.trials if "failed_trial" in trial.system_attrs]
    # The dead worker's trial was retried once ...
    assert len(retries) == 1
    stale = study.trials[retries[0].system_attrs["failed_trial"]]
    # ... after it was failed for its missing heartbeats ...
    assert stale.state == optuna.trial.TrialState.FAIL
    # ... with the parameters the dead worker had sampled.
    assert stale.params.items() <= retries[0].params.items()
    client = MlflowClient(tracking_uri=tracking_uri)
    # The dead worker's MLflow run is closed as FAILED.
    assert client.get_run(stale.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    # No run is left RUNNING.
    assert [run.info.run_id for run in _runs(setup) if run.info.status == "RUNNING"] == []


def test_sigterm_stops_worker(tmp_path: Path, database: tuple[str, str],
                              tracking_uri: str) -> None:
    setup = _setup(tmp_path, database, tracking_uri, epochs=40, n_trials=20)
    worker = setup.start("worker", "tiny")
    _wait_for_running(setup, 1, worker)
    time.sleep(1.0)  # Let the trial start its epochs.
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    returncode, output = _finish(worker)

    # The worker exits with 128 + SIGTERM ...
    assert returncode == 143, output[-3000:]
    # ... promptly, after closing its trial.
    assert time.monotonic() - started < 30
    trials = setup.study().trials
    # The interrupted trial is FAIL in Optuna, and no trial is left RUNNING.
    assert [trial.state for trial in trials][-1] == optuna.trial.TrialState.FAIL
    assert not any(trial.state == optuna.trial.TrialState.RUNNING for trial in trials)
    client = MlflowClient(tracking_uri=tracking_uri)
    # Its MLflow run ends KILLED.
    assert client.get_run(trials[-1].user_attrs["mlflow_run_id"]).info.status == "KILLED"
    # With no other worker running, the parent run ends KILLED too.
    assert _parent(setup).info.status == "KILLED"


def test_sigint_to_launch_stops_workers(tmp_path: Path, database: tuple[str, str],
                                        tracking_uri: str) -> None:
    # A target far above what runs before the signal, so both workers are still busy.
    setup = _setup(tmp_path, database, tracking_uri, epochs=40, n_trials=40)
    launch = setup.start("launch", "tiny", "--workers", "2")
    _wait_for_running(setup, 2, launch)
    launch.send_signal(signal.SIGINT)
    returncode, output = _finish(launch)

    # launch forwards the signal and exits with 128 + SIGINT.
    assert returncode == 130, output[-3000:]
    # Both workers were interrupted too.
    assert output.count("exited with status 130") == 2
    # No run is left RUNNING ...
    assert [run.info.run_id for run in _runs(setup) if run.info.status == "RUNNING"] == []
    # ... and the parent run ends KILLED because the target was not met.
    assert _parent(setup).info.status == "KILLED"
