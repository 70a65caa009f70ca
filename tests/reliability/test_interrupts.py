"""SIGINT during feature extraction: exit 130, no half-written cache entry, a clean resume."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, real_data_study, run_cli, write_genres, write_studies

from features import load_features, scan_folder
from search.config import load_studies
from search.data import feature_settings


def _start_launch(folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "search", "launch", "tiny", "--no-progress"],
                            cwd=folder, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env())


def _wait_for_line(process: subprocess.Popen[str], text: str, *, timeout: float) -> list[str]:
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"the CLI never logged {text!r}; its output was:\n{''.join(lines)[-3000:]}")


def _entries(folder: Path) -> list[Path]:
    root = folder / "cache" / "features"
    return sorted(path for path in root.iterdir() if not path.name.startswith(".")) \
        if root.exists() else []


@pytest.mark.slow
def test_launch_sigint_during_extraction(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 2 x 40 clips of 6 s take seconds to decode and transform even on a fast machine.
    data = write_genres(tmp_path / "data", {"rock": 300.0, "jazz": 600.0}, n_tracks=40,
                        seconds=6.0)
    write_studies(tmp_path, real_data_study(data, n_trials=1))

    process = _start_launch(tmp_path)
    _wait_for_line(process, "building feature cache entry", timeout=120)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    # SIGINT ends the CLI with 128 + 2.
    assert process.returncode == 130, stderr[-3000:]
    # No finished-looking cache entry was left behind.
    assert _entries(tmp_path) == []

    rerun = run_cli(["launch", "tiny", "--no-progress"], cwd=tmp_path, timeout=400)
    # The rerun builds the features and completes the study.
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    config = load_studies(tmp_path / "studies.yaml").get("tiny")
    with caplog.at_level(logging.INFO, logger="features"):
        load_features(scan_folder(data), feature_settings(config),
                      cache_dir=tmp_path / "cache" / "features")
    # The entry written by the rerun passes its checksum verification and is reused.
    assert "loaded 480 segment(s) of 80 track(s)" in caplog.text
