"""Unreachable or briefly failing storage and tracking servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import cli_env, free_port, run_cli, write_studies
from mlflow import MlflowClient


def test_launch_unreachable_storage(tmp_path: Path) -> None:
    port = free_port()
    write_studies(tmp_path)
    url = f"postgresql+psycopg://postgres:${{PGPW_TEST}}@127.0.0.1:{port}/optuna"

    started = time.monotonic()
    result = run_cli(["launch", "tiny", "--no-progress", "--storage", url], cwd=tmp_path,
                     env=cli_env(PGPW_TEST="hunter2-secret"), timeout=90)

    # A storage server that is down is a runtime error: exit 1.
    assert result.returncode == 1, result.stderr[-3000:]
    # The message names the host and port it tried.
    assert f"127.0.0.1:{port}" in result.stderr
    # The message names what to check.
    assert "Check that the database server is running" in result.stderr
    # The password from the environment never appears.
    assert "hunter2-secret" not in result.stderr + result.stdout
    # It fails fast instead of hanging.
    assert time.monotonic() - started < 60


def test_launch_unreachable_tracking_server(tmp_path: Path) -> None:
    port = free_port()
    write_studies(tmp_path)

    started = time.monotonic()
    result = run_cli(["launch", "tiny", "--no-progress", "--tracking-uri",
                      f"http://127.0.0.1:{port}"], cwd=tmp_path, timeout=90)

    # A tracking server that is down is a runtime error: exit 1.
    assert result.returncode == 1, result.stderr[-3000:]
    # The message names the URI.
    assert f"http://127.0.0.1:{port}" in result.stderr
    # The message shows how to start a server.
    assert "mlflow server" in result.stderr
    # It fails fast instead of hanging.
    assert time.monotonic() - started < 60
    # No trial was started against the Optuna storage.
    assert "trial 0" not in result.stderr


def _start_launch(folder: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "search", "launch", "tiny", "--no-progress",
                             *args], cwd=folder, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)


def _read_until(process: subprocess.Popen[str], text: str, lines: list[str],
                *, timeout: float) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return
    pytest.fail(f"the CLI never logged {text!r}; its output was:\n{''.join(lines)[-3000:]}")


def _finish(process: subprocess.Popen[str], lines: list[str], *, timeout: float) -> str:
    remaining, _ = process.communicate(timeout=timeout)
    return "".join(lines) + remaining


_OUTAGE_STUDY = {"n_trials": 3, "dataset": {"synthetic": {"tracks_per_genre": 6}}}
_OUTAGE_DEFAULTS = {"training": {"epochs": 3}}


@pytest.mark.slow
def test_launch_storage_connections_killed(tmp_path: Path) -> None:
    name = f"reliability_{uuid.uuid4().hex[:10]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL server at 127.0.0.1:5432 ({error})")
    try:
        storage = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        write_studies(tmp_path, {**_OUTAGE_STUDY, "storage": storage}, defaults=_OUTAGE_DEFAULTS)
        process = _start_launch(tmp_path, env=cli_env())
        lines: list[str] = []
        _read_until(process, "trial 0 finished", lines, timeout=300)

        with psycopg.connect(admin, autocommit=True) as connection:
            killed = connection.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()
        output = _finish(process, lines, timeout=300)

        # The outage really cut the worker's connections.
        assert killed is not None and killed[0] >= 1
        # The worker reconnects and finishes the study.
        assert process.returncode == 0, output[-3000:]
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}") as connection:
            states = [row[0] for row in connection.execute(
                "SELECT state FROM trials ORDER BY number")]
        # Every trial completed; none was lost to the dropped connections.
        assert states == ["COMPLETE"] * 3
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _start_mlflow_server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts")],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    _stop_server(process)
    pytest.fail(f"mlflow server on port {port} did not start within 120 s")


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_launch_tracking_server_restart(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    write_studies(tmp_path, _OUTAGE_STUDY, defaults=_OUTAGE_DEFAULTS)
    server = _start_mlflow_server(tmp_path, port)
    try:
        process = _start_launch(tmp_path, "--tracking-uri", uri, env=cli_env())
        lines: list[str] = []
        _read_until(process, "trial 0 finished", lines, timeout=300)
        _stop_server(server)
        time.sleep(4)
        server = _start_mlflow_server(tmp_path, port)
        output = _finish(process, lines, timeout=400)

        # The worker rides out the outage and finishes the study.
        assert process.returncode == 0, output[-3000:]
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("tiny")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id],
                                  filter_string="tags.`genre_search.role` = 'trial'")
        # All three trial runs exist.
        assert len(runs) == 3
        for run in runs:
            history = client.get_metric_history(run.info.run_id, "val_loss")
            # Every epoch's metric reached the server, none lost to the outage.
            assert sorted(metric.step for metric in history) == [1, 2, 3], run.info.run_name
    finally:
        _stop_server(server)
