"""Helpers that write small audio files and datasets for the features tests.

Kept out of conftest.py under a unique module name, so test modules can import them
without clashing with other test folders' conftest modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

TEST_DATA_VARIABLE = "GENRE_SEARCH_TEST_DATA"

SMALL_SAMPLE_RATE = 8000


def write_tone(
    path: Path,
    *,
    seconds: float,
    sample_rate: int = SMALL_SAMPLE_RATE,
    frequency: float = 440.0,
    channels: int = 1,
    seed: int = 0,
    **write_options: str,
) -> np.ndarray:
    """Write a sine plus a little noise to ``path`` and return the samples written.

    Returns:
        Samples of shape ``(frames,)`` for mono or ``(frames, channels)`` otherwise.
    """
    rng = np.random.default_rng(seed)
    time = np.arange(round(seconds * sample_rate)) / sample_rate
    mono = 0.5 * np.sin(2 * np.pi * frequency * time) + 0.01 * rng.standard_normal(time.shape)
    samples = (
        mono
        if channels == 1
        else np.stack([mono * (1 + k) / channels for k in range(channels)], axis=1)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), sample_rate, **write_options)
    return samples


def make_dataset(
    root: Path,
    genres: Sequence[str] = ("blues", "jazz", "rock"),
    *,
    n_tracks: int = 3,
    seconds: float = 1.0,
    sample_rate: int = SMALL_SAMPLE_RATE,
) -> Path:
    """Write ``<root>/<genre>/<genre>.<NNNNN>.wav`` tones, one pitch per genre."""
    for genre_index, genre in enumerate(genres):
        for track_index in range(n_tracks):
            write_tone(
                root / genre / f"{genre}.{track_index:05d}.wav",
                seconds=seconds,
                sample_rate=sample_rate,
                frequency=200.0 * (genre_index + 1) + 20.0 * track_index,
                seed=genre_index * 100 + track_index,
            )
    return root
