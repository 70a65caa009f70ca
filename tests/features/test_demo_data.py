"""Tests of synthesize_demo_dataset: decodable files, idempotence, determinism, learnability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from features import (
    DEMO_GENRES,
    LogMelSettings,
    load_audio,
    load_features,
    scan_folder,
    split_random,
    synthesize_demo_dataset,
)

SMALL: dict[str, Any] = {
    "n_genres": 3,
    "tracks_per_genre": 2,
    "seconds": 1.0,
    "sample_rate": 8000,
    "seed": 0,
}


def _mtimes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for path in root.rglob("*")
        if path.is_file()
    }


def test_demo_dataset_decodable(tmp_path: Path) -> None:
    root = synthesize_demo_dataset(tmp_path / "demo", **SMALL)
    tracks = scan_folder(root)

    # The GTZAN layout with the first three generators as genres.
    assert root == tmp_path / "demo"
    assert sorted({track.label for track in tracks}) == sorted(DEMO_GENRES[:3])
    assert [track.track_id for track in tracks if track.label == "tonal"] == [
        "tonal/tonal.00000.wav",
        "tonal/tonal.00001.wav",
    ]
    for track in tracks:
        waveform = load_audio(track.path, sample_rate=8000)
        # One second at 8 kHz, within full scale, not silent.
        assert waveform.shape == (8000,)
        assert float(np.abs(waveform).max()) <= 1.0
        assert float(np.sqrt(np.mean(waveform**2))) > 0.01


def test_demo_dataset_idempotent(tmp_path: Path) -> None:
    root = synthesize_demo_dataset(tmp_path / "demo", **SMALL)
    before = _mtimes(root)

    synthesize_demo_dataset(tmp_path / "demo", **SMALL)

    # A complete dataset with the same parameters is not rewritten.
    assert _mtimes(root) == before


def test_demo_dataset_repairs_missing_file(tmp_path: Path) -> None:
    root = synthesize_demo_dataset(tmp_path / "demo", **SMALL)
    missing = root / "bass" / "bass.00001.wav"
    original = missing.read_bytes()
    missing.unlink()

    synthesize_demo_dataset(tmp_path / "demo", **SMALL)

    # An incomplete dataset is written again, with identical content.
    assert missing.read_bytes() == original


def test_demo_dataset_new_parameters_replace_old_files(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    synthesize_demo_dataset(root, **SMALL)
    (root / "notes.txt").write_text("mine", encoding="utf-8")

    synthesize_demo_dataset(root, **{**SMALL, "n_genres": 2, "tracks_per_genre": 1})
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*.wav"))

    # Only the new dataset's files remain.
    assert files == ["percussive/percussive.00000.wav", "tonal/tonal.00000.wav"]
    # Files the generator did not write are left alone.
    assert (root / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_demo_dataset_deterministic(tmp_path: Path) -> None:
    first = synthesize_demo_dataset(tmp_path / "a", **SMALL)
    second = synthesize_demo_dataset(tmp_path / "b", **SMALL)
    other_seed = synthesize_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 1})
    name = "tonal/tonal.00000.wav"

    # The same seed gives the same bytes, another seed other audio.
    assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / name).read_bytes() != (other_seed / name).read_bytes()


def test_demo_dataset_all_genres(tmp_path: Path) -> None:
    root = synthesize_demo_dataset(
        tmp_path / "demo", n_genres=8, tracks_per_genre=1, seconds=0.5, sample_rate=8000
    )

    # Eight generators, eight genres.
    assert len({track.label for track in scan_folder(root)}) == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_genres": 9}, "n_genres=9"),
        ({"n_genres": 1}, "n_genres=1"),
        ({"tracks_per_genre": 0}, "tracks_per_genre=0"),
        ({"seconds": 0.0}, "seconds=0.0"),
        ({"sample_rate": 4000}, "sample_rate=4000"),
    ],
)
def test_demo_dataset_rejects_invalid(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize_demo_dataset(tmp_path / "demo", **{**SMALL, **overrides})
    # Nothing is written for invalid arguments.
    assert not (tmp_path / "demo").exists()


def test_demo_dataset_learnable(tmp_path: Path) -> None:
    """A nearest-centroid classifier on log-mel summary statistics beats chance.

    Each segment is summarised by its per-band mean (level removed) and standard
    deviation over time. With 4 genres chance is 25 %; requiring 50 % on held-out tracks
    shows the genres differ without a trained network. This classifier reaches about
    60-80 % across split seeds, so the task is not trivial either.
    """
    root = synthesize_demo_dataset(
        tmp_path / "demo", n_genres=4, tracks_per_genre=8, seconds=2.0, sample_rate=8000
    )
    tracks = scan_folder(root)
    splits = split_random(tracks, valid_fraction=0.25, test_fraction=0.0, seed=0)
    settings = LogMelSettings(
        sample_rate=8000, n_fft=256, hop_length=128, n_mels=32, segment_seconds=1.0
    )
    feature_set = load_features(tracks, settings, cache_dir=tmp_path / "cache", batch_size=16)

    log_mel = np.asarray(feature_set.features, dtype=np.float32)  # (segments, n_mels, frames)
    band_means = log_mel.mean(axis=2) - log_mel.mean(axis=(1, 2))[:, None]  # (segments, n_mels)
    profiles = np.concatenate([band_means, log_mel.std(axis=2)], axis=1)  # (segments, 2 * n_mels)
    train = feature_set.segment_indices(splits.train)
    valid = feature_set.segment_indices(splits.valid)
    centroids = np.stack(
        [profiles[train][feature_set.labels[train] == label].mean(axis=0) for label in range(4)]
    )
    distances = ((profiles[valid][:, None, :] - centroids[None]) ** 2).sum(axis=2)
    accuracy = float((distances.argmin(axis=1) == feature_set.labels[valid]).mean())

    assert accuracy >= 0.5
