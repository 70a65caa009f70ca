"""Fixtures for the features tests: small front-end settings and the real GTZAN clips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from feature_helpers import SMALL_SAMPLE_RATE, TEST_DATA_VARIABLE

from features import LogMelSettings


@pytest.fixture
def small_settings() -> LogMelSettings:
    """Front-end settings for short 8 kHz clips: 0.5 s segments, 32 mel bands."""
    return LogMelSettings(
        sample_rate=SMALL_SAMPLE_RATE, n_fft=256, hop_length=128, n_mels=32, segment_seconds=0.5
    )


@pytest.fixture(scope="session")
def gtzan_root() -> Path:
    """Folder of the real gtzan-mini clips, from the GENRE_SEARCH_TEST_DATA variable.

    The variable may name the gtzan-mini folder itself or a folder that contains it.
    """
    value = os.environ.get(TEST_DATA_VARIABLE)
    if not value:
        pytest.skip(
            f"{TEST_DATA_VARIABLE} is not set; point it at the gtzan-mini clips to run this test"
        )
    base = Path(value).expanduser()
    root = base / "gtzan-mini" if (base / "gtzan-mini").is_dir() else base
    if not (root / "blues").is_dir():
        pytest.fail(
            f"{TEST_DATA_VARIABLE}={value!r} has no blues/ sub-folder; set it to the gtzan-mini "
            "folder or to the folder that contains it"
        )
    return root
