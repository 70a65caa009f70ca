"""MLflow's UI shows a study as nested runs whose compare view plots parallel coordinates.

A four-trial study on generated audio writes a SQLite MLflow store. `mlflow server` serves
that store on a free loopback port, and headless Chromium opens it. The browser is the
system's /usr/bin/chromium, never a downloaded one. Screenshots go to
GENRE_SEARCH_ARTIFACTS, or to the test's temporary folder when the variable is unset.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from search.config import Overrides, StudyConfig, apply_overrides, load_studies
from search.runner import run_worker
from search.study import EXPERIMENT_ATTR, PARENT_RUN_ATTR

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SERVER_START_SECONDS = 120
PAGE_TIMEOUT_MS = 60_000

STUDIES_YAML = """\
studies:
  tiny:
    dataset:
      synthetic: {n_genres: 3, tracks_per_genre: 6, seconds: 2.0, seed: 0}
      sample_rate: 8000
      segment_seconds: 0.5
      split: {method: random, valid_fraction: 0.34, seed: 0}
    features: {n_fft: 256, hop_length: 128, n_mels: 32, f_max: 4000.0}
    training: {epochs: 2, seed: 0}
    sampler: {name: random, seed: 2}
    pruner: {name: none}
    device: cpu
    search_space:
      family: {choices: [cnn]}
      learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
      batch_size: {choices: [8, 16]}
      dropout: {low: 0.0, high: 0.3}
      weight_decay: 1.0e-5
      optimizer: adam
      architectures:
        cnn: {n_conv_layers: 2, base_channels: {choices: [4, 8]}, kernel_size: 3}
    n_trials: 4
"""

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def study_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, optuna.Study]:
    """The tiny study after four trials, with its SQLite MLflow store."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Chromium (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    folder = tmp_path_factory.mktemp("browser")
    (folder / "studies.yaml").write_text(STUDIES_YAML, encoding="utf-8")
    overrides = Overrides(storage=f"sqlite:///{folder / 'optuna.db'}",
                          tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                          cache_dir=folder / "cache")
    config = apply_overrides(load_studies(folder / "studies.yaml").get("tiny"), overrides,
                             base_dir=folder)
    run_worker(config)
    return config, optuna.load_study(study_name=config.name, storage=config.storage)


@pytest.fixture(scope="module")
def server_url(study_store: tuple[StudyConfig, optuna.Study],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of an `mlflow server` on a free loopback port over the study's store."""
    config, _ = study_store
    port = free_port()
    log = (tmp_path_factory.mktemp("server") / "mlflow-server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", config.tracking_uri, "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    """Folder for screenshots: GENRE_SEARCH_ARTIFACTS, else the test's temporary folder."""
    folder = Path(os.environ.get("GENRE_SEARCH_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with status {process.returncode} before "
                        f"answering on {url}; see mlflow-server.log")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer on {url}/health within {SERVER_START_SECONDS} s")


def child_run_ids(study: optuna.Study) -> list[str]:
    return [str(trial.user_attrs["mlflow_run_id"]) for trial in study.trials]


def test_ui_nests_trials_under_parent(study_store: tuple[StudyConfig, optuna.Study],
                                      server_url: str, artifacts_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    _, study = study_store
    parent_id = study.user_attrs[PARENT_RUN_ATTR]
    experiment_id = study.user_attrs[EXPERIMENT_ATTR]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(f"{server_url}/#/experiments/{experiment_id}/runs",
                  wait_until="domcontentloaded")
        # The run-name cell of a parent row contains the button that expands its children.
        page.locator(f'[row-id="{parent_id}"] button[data-component-id*="runnamecell"]'
                     ).first.click()
        for run_id in child_run_ids(study):
            page.locator(f'[row-id="{run_id}"]').first.wait_for()
        page.screenshot(path=str(artifacts_dir / "mlflow-nested-runs.png"))
        trial_names = page.get_by_text("trial-", exact=False).count()
        browser.close()
    # Every trial's child run is listed once the parent row is expanded.
    assert trial_names == len(study.trials)


def test_compare_view_plots_parallel_coordinates(
        study_store: tuple[StudyConfig, optuna.Study], server_url: str,
        artifacts_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    _, study = study_store
    runs = urllib.parse.quote(json.dumps(child_run_ids(study)))
    experiments = urllib.parse.quote(json.dumps([study.user_attrs[EXPERIMENT_ATTR]]))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(f"{server_url}/#/compare-runs?runs={runs}&experiments={experiments}",
                  wait_until="domcontentloaded")
        page.locator("svg .parcoords").first.wait_for(state="attached")
        # Plotly draws the axes after the SVG group appears.
        page.locator("svg .parcoords .y-axis").first.wait_for(state="attached")
        page.screenshot(path=str(artifacts_dir / "mlflow-parallel-coordinates.png"),
                        full_page=True)
        n_axes = page.locator("svg .parcoords .y-axis").count()
        heading = page.get_by_text(f"Comparing {len(study.trials)} Runs").count()
        browser.close()
    # The compare view names all four trials and plots at least two axes.
    assert heading == 1
    assert n_axes >= 2
