"""Regression tests for problems a new user hit when following the README.

Each test repeats the user's command through the real CLI on a tiny synthetic study
(2 genres x 4 tracks of 2 s at 8 kHz, one small CNN epoch), with its own SQLite storage,
MLflow store and feature cache in a temporary folder.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner, Result
from mlflow import MlflowClient

from features import AudioDecodeError, load_audio
from search.cli import MLFLOW_PROGRESS_BAR_VARIABLE, main
from search.tracking import check_tracking_server

STUDIES_YAML = """\
studies:
  tiny:
    storage: sqlite:///optuna.db
    tracking_uri: sqlite:///mlflow.db
    cache_dir: cache
    device: cpu
    dataset:
      synthetic: {{n_genres: 2, tracks_per_genre: 4, seconds: 2.0, seed: 0}}
      sample_rate: 8000
      segment_seconds: 0.5
      split: {{method: random, valid_fraction: 0.25, seed: 0}}
    features: {{n_fft: 256, hop_length: 128, n_mels: 32, f_max: 4000.0}}
    training: {{epochs: {epochs}, seed: 0}}
    sampler: {{name: random, seed: 0}}
    pruner: {{name: none}}
    search_space:
      family: {{choices: [cnn, crnn]}}
      learning_rate: {{low: 1.0e-3, high: 3.0e-3, log: true}}
      batch_size: 16
      dropout: 0.1
      weight_decay: 1.0e-5
      optimizer: adam
      architectures:
        cnn: {{n_conv_layers: 2, base_channels: 8, kernel_size: 3}}
        crnn: {{n_conv_layers: 2, base_channels: 8, rnn_hidden_size: 16, rnn_layers: 1}}
    n_trials: 2
"""


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    """A folder with the tiny study's studies.yaml; storage and stores are created in it."""
    (tmp_path / "studies.yaml").write_text(STUDIES_YAML.format(epochs=1), encoding="utf-8")
    return tmp_path


@pytest.fixture
def restore_progress_variable() -> Iterator[None]:
    """Unset the MLflow progress-bar variable for the test and restore it afterwards."""
    saved = os.environ.pop(MLFLOW_PROGRESS_BAR_VARIABLE, None)
    yield
    os.environ.pop(MLFLOW_PROGRESS_BAR_VARIABLE, None)
    if saved is not None:
        os.environ[MLFLOW_PROGRESS_BAR_VARIABLE] = saved


def invoke(folder: Path, *args: str) -> Result:
    """Run ``genre-search ARGS`` in-process with ``folder`` as the working directory."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(previous)


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_broken_clips(folder: Path) -> Path:
    """Write two genres of .wav files that contain text, so that no clip decodes."""
    for genre in ("rock", "jazz"):
        (folder / genre).mkdir(parents=True)
        for index in range(2):
            (folder / genre / f"{genre}.{index}.wav").write_text("not audio", encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------
# A rejected dataset leaves no study behind
# --------------------------------------------------------------------------------------


def test_launch_broken_data_creates_no_study(study_folder: Path) -> None:
    data = write_broken_clips(study_folder / "broken")

    result = invoke(study_folder, "launch", "tiny", "--data", str(data), "--no-progress")

    # Unusable data is an input error.
    assert result.exit_code == 2, result.output
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_folder / 'optuna.db'}")
    # The study was not created in the Optuna storage.
    assert optuna.get_all_study_summaries(storage) == []
    client = MlflowClient(tracking_uri=f"sqlite:///{study_folder / 'mlflow.db'}")
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    # No MLflow run (parent or trial) was created.
    assert client.search_runs(experiment_ids) == []


def test_studies_after_broken_data_lists_none(study_folder: Path) -> None:
    data = write_broken_clips(study_folder / "broken")
    invoke(study_folder, "launch", "tiny", "--data", str(data), "--no-progress")

    result = invoke(study_folder, "studies")

    row = next(line.split() for line in result.output.splitlines() if line.startswith("tiny"))
    # `studies` reports the study as not existing.
    assert row[1] == "no", result.output


# --------------------------------------------------------------------------------------
# An unreachable tracking server fails within seconds
# --------------------------------------------------------------------------------------


def test_launch_closed_tracking_port_fails_fast(study_folder: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()

    result = invoke(study_folder, "launch", "tiny", "--tracking-uri", uri, "--no-progress")

    seconds = time.monotonic() - started
    # A tracking store that cannot be reached is a runtime error.
    assert result.exit_code == 1, result.output
    # The check gives up within seconds, not after MLflow's minutes of retries.
    assert seconds < 20, f"launch took {seconds:.1f} s"
    # The message names the URL that failed.
    assert uri in result.output
    # The connection attempt is logged before the error.
    assert "connecting to tracking server" in result.output


def test_predict_closed_tracking_port_fails_fast(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()

    result = invoke(tmp_path, "predict", "models:/genre-search-tiny@champion",
                    str(tmp_path / "clip.wav"), "--tracking-uri", uri)

    seconds = time.monotonic() - started
    # The model cannot be loaded: exit status 1.
    assert result.exit_code == 1, result.output
    # Loading gives up within seconds.
    assert seconds < 20, f"predict took {seconds:.1f} s"
    # The message names the URL that failed.
    assert uri in result.output


class _NotFoundHandler(http.server.BaseHTTPRequestHandler):
    """Return 404 for every request, like a proxy that routes only part of a server."""

    def do_GET(self) -> None:  # noqa: N802 (the name is fixed by BaseHTTPRequestHandler)
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_tracking_probe_accepts_any_http_answer() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFoundHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # A server that responds, even with 404, is reachable: no TrackingError.
        check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------
# Missing files and folders get plain messages
# --------------------------------------------------------------------------------------


def test_load_audio_missing_file_says_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.wav"

    with pytest.raises(AudioDecodeError) as raised:
        load_audio(path, sample_rate=8000)

    # The message states that the file does not exist, not libsndfile's "System error".
    assert f"file not found: {str(path)!r}" in str(raised.value)


def test_load_audio_folder_says_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError) as raised:
        load_audio(tmp_path, sample_rate=8000)

    # The message names the path as a folder.
    assert "is a directory" in str(raised.value)


# --------------------------------------------------------------------------------------
# Noise on stderr
# --------------------------------------------------------------------------------------


def test_launch_timeout_summary_says_timeout(study_folder: Path) -> None:
    result = invoke(study_folder, "launch", "tiny", "--n-trials", "50", "--timeout", "0.01",
                    "--no-progress")

    # Stopping at the timeout is a normal end.
    assert result.exit_code == 0, result.output
    # The summary line gives the reason fewer trials ran than requested.
    assert "stopped at the timeout of 0.01 s" in result.output


@pytest.mark.usefixtures("restore_progress_variable")
def test_launch_no_progress_hides_mlflow_bars(study_folder: Path) -> None:
    result = invoke(study_folder, "launch", "tiny", "--n-trials", "1", "--no-progress")

    # The trial completed, so its model was logged and registered.
    assert result.exit_code == 0, result.output
    assert "is the new champion" in result.output
    # MLflow's artifact bars are off without --progress.
    assert "Downloading artifacts" not in result.output


def _start_launch(folder: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "search", "launch", "tiny", "--n-trials", "1",
               "--no-progress"]
    return subprocess.Popen(command, cwd=folder, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_for_line(process: subprocess.Popen[str], text: str, *, timeout: float) -> str:
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return "".join(lines)
    process.kill()
    pytest.fail(f"the CLI never logged {text!r}; its output was:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_launch_sigint_prints_no_traceback(tmp_path: Path) -> None:
    # 1000 epochs keep the trial running until the signal arrives.
    (tmp_path / "studies.yaml").write_text(STUDIES_YAML.format(epochs=1000), encoding="utf-8")
    process = _start_launch(tmp_path)
    before = _wait_for_line(process, "torch threads", timeout=120)
    time.sleep(2.0)

    process.send_signal(signal.SIGINT)
    _, after = process.communicate(timeout=120)
    stderr = before + after

    # SIGINT ends the CLI with 128 + 2.
    assert process.returncode == 130, stderr[-3000:]
    # Our one-line message ends the output.
    assert stderr.rstrip().endswith("Interrupted by SIGINT."), stderr[-3000:]
    # Optuna's failure record for the interrupted trial is not shown.
    assert "because of the following error" not in stderr, stderr[-3000:]
    # No traceback is printed.
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_launch_stderr_has_no_library_warnings(study_folder: Path) -> None:
    # A subprocess, because MLflow's and Optuna's handlers write to the real stderr.
    completed = subprocess.run([sys.executable, "-m", "search", "launch", "tiny",
                                "--no-progress"], cwd=study_folder, text=True,
                               capture_output=True, timeout=300, check=False)

    # Both trials ran: one cnn and one crnn, so each lacks the other's parameters.
    assert completed.returncode == 0, completed.stderr[-3000:]
    # No warning about pickling the model on every model log.
    assert "CloudPickle" not in completed.stderr
    # No warning about trials with missing (conditional) parameters from the plots.
    assert "missing parameters" not in completed.stderr
    # No artifact progress bars when stderr is not a terminal.
    assert "Downloading artifacts" not in completed.stderr
