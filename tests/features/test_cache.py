"""Tests of load_features: cache hits, invalidation, atomic writes, skipped files, memmaps."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from feature_helpers import make_dataset, write_tone

import features._cache as cache_module
from features import (
    DatasetError,
    FeatureSet,
    LogMelSettings,
    LogMelSpectrogram,
    Track,
    dataset_fingerprint,
    load_audio,
    load_features,
    scan_folder,
)

GENRES = ("blues", "jazz", "rock")
N_TRACKS = 3  # per genre
SEGMENTS_PER_TRACK = 2  # 1.0 s clips, 0.5 s segments


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", GENRES, n_tracks=N_TRACKS, seconds=1.0)


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file load_features decodes; decoding itself is unchanged."""
    calls: list[Path] = []

    def recording_load_audio(path: Path, *, sample_rate: int) -> np.ndarray:
        calls.append(Path(path))
        return load_audio(path, sample_rate=sample_rate)

    monkeypatch.setattr(cache_module, "load_audio", recording_load_audio)
    return calls


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_load_audio(path: Path, *, sample_rate: int) -> np.ndarray:
        raise AssertionError(f"load_audio was called for {path} although the cache is warm")

    monkeypatch.setattr(cache_module, "load_audio", failing_load_audio)


def _entry(cache_dir: Path, feature_set: FeatureSet) -> Path:
    return cache_dir / feature_set.fingerprint


def _files_outside(root: Path, excluded: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for path in root.rglob("*")
        if not path.is_relative_to(excluded)
    }


def test_cache_second_call_decodes_nothing(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracks = scan_folder(dataset)
    first = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")
    first_features = np.array(first.features)

    _forbid_decoding(monkeypatch)
    second = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")

    # The warm call returns the same data without calling the decoder.
    np.testing.assert_array_equal(np.asarray(second.features), first_features)
    assert second.fingerprint == first.fingerprint
    assert second.track_ids == first.track_ids


def test_cache_contents_and_memmap(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings
) -> None:
    tracks = scan_folder(dataset)

    feature_set = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")
    n_segments = len(GENRES) * N_TRACKS * SEGMENTS_PER_TRACK

    # Features are a read-only float16 memmap of (n_segments, n_mels, n_frames).
    assert isinstance(feature_set.features, np.memmap)
    assert feature_set.features.dtype == np.float16
    assert feature_set.features.shape == (
        n_segments,
        small_settings.n_mels,
        small_settings.n_frames(),
    )
    assert not feature_set.features.flags.writeable
    # Labels and segment tracks are int64 vectors with one entry per segment.
    assert feature_set.labels.dtype == np.int64
    assert feature_set.labels.shape == (n_segments,)
    assert feature_set.segment_tracks.dtype == np.int64
    assert feature_set.segment_tracks.shape == (n_segments,)
    # Classes and tracks are sorted, and each segment's label is its track's label.
    assert feature_set.classes == GENRES
    assert feature_set.track_ids == tuple(sorted(track.track_id for track in tracks))
    segment_labels = [feature_set.classes[label] for label in feature_set.labels]
    assert segment_labels == [
        feature_set.track_labels[index] for index in feature_set.segment_tracks
    ]
    # Segments of one track are contiguous, in track order.
    assert list(feature_set.segment_tracks) == [
        index for index in range(len(tracks)) for _ in range(SEGMENTS_PER_TRACK)
    ]


def test_cache_features_match_module(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings
) -> None:
    tracks = scan_folder(dataset)
    feature_set = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")

    waveform = load_audio(tracks[0].path, sample_rate=small_settings.sample_rate)
    expected = LogMelSpectrogram(small_settings)(
        torch.from_numpy(waveform[: small_settings.segment_samples()])
    ).numpy()

    # The first cached segment equals the module's output up to float16 rounding (0.06 dB).
    np.testing.assert_allclose(
        np.asarray(feature_set.features[0], dtype=np.float32), expected, atol=0.07
    )


def test_cache_batch_size_does_not_change_features(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings
) -> None:
    tracks = scan_folder(dataset)

    single = load_features(tracks, small_settings, cache_dir=tmp_path / "single", batch_size=1)
    many = load_features(tracks, small_settings, cache_dir=tmp_path / "many", batch_size=5)

    np.testing.assert_allclose(
        np.asarray(single.features, np.float32), np.asarray(many.features, np.float32), atol=0.07
    )


def test_cache_touch_rebuilds(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings, decode_calls: list[Path]
) -> None:
    tracks = scan_folder(dataset)
    first = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")
    decode_calls.clear()

    stat = tracks[0].path.stat()
    os.utime(tracks[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")

    # A new modification time gives a new fingerprint and a rebuild that decodes again.
    assert second.fingerprint != first.fingerprint
    assert len(decode_calls) == len(tracks)


def test_cache_changed_content_rebuilds(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings
) -> None:
    tracks = scan_folder(dataset)
    first = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")
    before = np.array(first.features[0])

    write_tone(tracks[0].path, seconds=1.5, frequency=1234.0)
    second = load_features(scan_folder(dataset), small_settings, cache_dir=tmp_path / "cache")

    # A rewritten file yields new features under a new key.
    assert second.fingerprint != first.fingerprint
    assert second.features.shape[0] == first.features.shape[0] + 1
    assert not np.array_equal(np.asarray(second.features[0]), before)


def test_dataset_fingerprint_sensitivity(dataset: Path) -> None:
    tracks = scan_folder(dataset)
    base = dataset_fingerprint(tracks)
    relabelled = [Track(path=tracks[0].path, label="pop", track_id=tracks[0].track_id), *tracks[1:]]

    # Order of the input does not matter.
    assert dataset_fingerprint(list(reversed(tracks))) == base
    # Removing a track or changing a label changes the fingerprint.
    assert dataset_fingerprint(tracks[1:]) != base
    assert dataset_fingerprint(relabelled) != base


def test_cache_settings_change_rebuilds(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings
) -> None:
    tracks = scan_folder(dataset)
    other_settings = LogMelSettings(
        sample_rate=8000, n_fft=256, hop_length=128, n_mels=40, segment_seconds=0.5
    )

    first = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")
    second = load_features(tracks, other_settings, cache_dir=tmp_path / "cache")

    # Other settings use another entry, with their own shape.
    assert second.fingerprint != first.fingerprint
    assert second.features.shape[1] == 40


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip_bytes", "checksum"),
        ("truncate", "bytes"),
        ("delete_manifest", "manifest.json is missing"),
        ("garble_manifest", "manifest.json is missing or unreadable"),
        ("delete_array", "missing"),
    ],
)
def test_cache_damaged_entry_rebuilt(
    dataset: Path,
    tmp_path: Path,
    small_settings: LogMelSettings,
    caplog: pytest.LogCaptureFixture,
    decode_calls: list[Path],
    damage: str,
    reason: str,
) -> None:
    tracks = scan_folder(dataset)
    cache_dir = tmp_path / "cache"
    first = load_features(tracks, small_settings, cache_dir=cache_dir)
    original = np.array(first.features)
    entry = _entry(cache_dir, first)
    del first
    _DAMAGES[damage](entry)
    decode_calls.clear()

    with caplog.at_level(logging.WARNING, logger="features"):
        rebuilt = load_features(tracks, small_settings, cache_dir=cache_dir)
    warnings = [
        record.getMessage() for record in caplog.records if record.levelno == logging.WARNING
    ]

    # A warning names the entry and the reason.
    assert any(str(entry) in message and reason in message for message in warnings)
    # Audio was decoded again and the features are the same as before.
    assert len(decode_calls) == len(tracks)
    np.testing.assert_array_equal(np.asarray(rebuilt.features), original)
    # The rebuilt entry is valid, so a third call is a silent hit.
    caplog.clear()
    load_features(tracks, small_settings, cache_dir=cache_dir)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def _flip_bytes(entry: Path) -> None:
    path = entry / "features.npy"
    data = bytearray(path.read_bytes())
    data[-10:] = bytes(255 - value for value in data[-10:])
    path.write_bytes(bytes(data))


def _truncate(entry: Path) -> None:
    path = entry / "features.npy"
    path.write_bytes(path.read_bytes()[:200])


def _delete_manifest(entry: Path) -> None:
    (entry / "manifest.json").unlink()


def _garble_manifest(entry: Path) -> None:
    (entry / "manifest.json").write_text("{not json", encoding="utf-8")


def _delete_array(entry: Path) -> None:
    (entry / "labels.npy").unlink()


_DAMAGES: dict[str, Callable[[Path], None]] = {
    "flip_bytes": _flip_bytes,
    "truncate": _truncate,
    "delete_manifest": _delete_manifest,
    "garble_manifest": _garble_manifest,
    "delete_array": _delete_array,
}


def test_cache_interrupted_build_not_trusted(
    dataset: Path,
    tmp_path: Path,
    small_settings: LogMelSettings,
    caplog: pytest.LogCaptureFixture,
    decode_calls: list[Path],
) -> None:
    tracks = scan_folder(dataset)
    cache_dir = tmp_path / "cache"
    reference = load_features(tracks, small_settings, cache_dir=tmp_path / "reference")
    key = reference.fingerprint

    # An interrupted build: an old temporary folder with a partial array, and a fresh one.
    cache_dir.mkdir()
    stale = cache_dir / f".tmp-{key}-stale"
    stale.mkdir()
    (stale / "features.npy").write_bytes(b"\x93NUMPY partial")
    old = time.time() - cache_module.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = cache_dir / f".tmp-{key}-fresh"
    fresh.mkdir()
    (fresh / "features.npy").write_bytes(b"\x93NUMPY partial")
    decode_calls.clear()

    with caplog.at_level(logging.WARNING, logger="features"):
        feature_set = load_features(tracks, small_settings, cache_dir=cache_dir)

    # The partial builds were not used: the features were computed from audio.
    assert len(decode_calls) == len(tracks)
    np.testing.assert_array_equal(np.asarray(feature_set.features), np.asarray(reference.features))
    # The stale folder is deleted with a warning; the fresh one may belong to a running build.
    assert not stale.exists()
    assert any("interrupted cache build" in record.getMessage() for record in caplog.records)
    assert fresh.exists()


def test_cache_partial_entry_without_manifest(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings, caplog: pytest.LogCaptureFixture
) -> None:
    tracks = scan_folder(dataset)
    reference = load_features(tracks, small_settings, cache_dir=tmp_path / "reference")
    cache_dir = tmp_path / "cache"
    partial = cache_dir / reference.fingerprint
    partial.mkdir(parents=True)
    (partial / "features.npy").write_bytes(
        (tmp_path / "reference" / reference.fingerprint / "features.npy").read_bytes()
    )

    with caplog.at_level(logging.WARNING, logger="features"):
        feature_set = load_features(tracks, small_settings, cache_dir=cache_dir)

    # The entry under the right key but without a manifest is rebuilt with a warning.
    assert any("invalid" in record.getMessage() for record in caplog.records)
    assert (partial / "manifest.json").is_file()
    np.testing.assert_array_equal(np.asarray(feature_set.features), np.asarray(reference.features))


def test_cache_no_temporary_folders_left(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings
) -> None:
    cache_dir = tmp_path / "cache"

    feature_set = load_features(scan_folder(dataset), small_settings, cache_dir=cache_dir)

    # After a build, the cache contains exactly one entry with four files.
    assert [path.name for path in cache_dir.iterdir()] == [feature_set.fingerprint]
    assert sorted(path.name for path in _entry(cache_dir, feature_set).iterdir()) == [
        "features.npy",
        "labels.npy",
        "manifest.json",
        "segment_tracks.npy",
    ]


def test_cache_skips_unusable_files(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings, caplog: pytest.LogCaptureFixture
) -> None:
    (dataset / "jazz" / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2048))
    (dataset / "rock" / "empty.wav").write_bytes(b"")
    write_tone(dataset / "blues" / "short.wav", seconds=0.2)
    tracks = scan_folder(dataset)

    with caplog.at_level(logging.WARNING, logger="features"):
        feature_set = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")
    warnings = [
        record.getMessage() for record in caplog.records if record.levelno == logging.WARNING
    ]
    skipped_ids = {track_id for track_id, _ in feature_set.skipped}

    # The three unusable files are recorded with a reason and left out of the features.
    assert skipped_ids == {"jazz/corrupt.wav", "rock/empty.wav", "blues/short.wav"}
    assert not skipped_ids & set(feature_set.track_ids)
    assert dict(feature_set.skipped)["blues/short.wav"].startswith("audio is 0.20 s long")
    # One warning per file naming it, and one summary with the count.
    for track_id in skipped_ids:
        assert sum(track_id in message for message in warnings) == 1
    assert sum("skipped 3 of 12 track(s)" in message for message in warnings) == 1
    assert len(warnings) == 4
    # The other tracks are all there.
    assert len(feature_set.track_ids) == len(GENRES) * N_TRACKS


def test_cache_skipped_tracks_survive_warm_load(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    (dataset / "jazz" / "corrupt.wav").write_bytes(b"RIFF")
    tracks = scan_folder(dataset)
    first = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")

    _forbid_decoding(monkeypatch)
    second = load_features(tracks, small_settings, cache_dir=tmp_path / "cache")

    # The warm load reports the same skipped tracks.
    assert second.skipped == first.skipped
    assert [track_id for track_id, _ in second.skipped] == ["jazz/corrupt.wav"]


def test_cache_too_few_classes(tmp_path: Path, small_settings: LogMelSettings) -> None:
    root = make_dataset(tmp_path / "data", ("blues",), n_tracks=2, seconds=1.0)
    (root / "jazz").mkdir()
    (root / "jazz" / "broken.wav").write_bytes(b"not audio")
    tracks = scan_folder(root)

    # Only blues remains after skipping the broken jazz file.
    with pytest.raises(DatasetError, match=r"only 1 class\(es\) \['blues'\]"):
        load_features(tracks, small_settings, cache_dir=tmp_path / "cache")
    # Nothing is cached for a failed build.
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_rejects_bad_arguments(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings
) -> None:
    tracks = scan_folder(dataset)
    not_a_folder = tmp_path / "cache_file"
    not_a_folder.write_text("", encoding="utf-8")

    with pytest.raises(DatasetError, match="no tracks"):
        load_features([], small_settings, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="duplicate track ids"):
        load_features(tracks + tracks[:1], small_settings, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="batch_size=0"):
        load_features(tracks, small_settings, cache_dir=tmp_path / "cache", batch_size=0)
    with pytest.raises(NotADirectoryError, match="cache_file"):
        load_features(tracks, small_settings, cache_dir=not_a_folder)


def test_cache_writes_only_inside_cache_dir(tmp_path: Path, small_settings: LogMelSettings) -> None:
    root = make_dataset(tmp_path / "data", ("blues", "jazz"), n_tracks=1, seconds=1.0)
    real = scan_folder(root)
    # Track ids that would escape the cache folder if they were ever used as paths.
    hostile = [
        Track(path=real[0].path, label="blues", track_id="../../escape.wav"),
        Track(path=real[1].path, label="jazz", track_id="/etc/absolute.wav"),
    ]
    cache_dir = tmp_path / "nested" / "cache"
    before = _files_outside(tmp_path, cache_dir)

    feature_set = load_features(hostile, small_settings, cache_dir=cache_dir)

    # Apart from creating cache_dir itself, nothing outside it changed.
    assert _files_outside(tmp_path, cache_dir).keys() - before.keys() == {"nested"}
    assert {
        name: mtime
        for name, mtime in _files_outside(tmp_path, cache_dir).items()
        if name != "nested"
    } == before
    # The entry is named by the hex key only.
    assert [path.name for path in cache_dir.iterdir()] == [feature_set.fingerprint]
    assert all(character in "0123456789abcdef" for character in feature_set.fingerprint)


def test_segment_indices(dataset: Path, tmp_path: Path, small_settings: LogMelSettings) -> None:
    (dataset / "jazz" / "corrupt.wav").write_bytes(b"RIFF")
    feature_set = load_features(scan_folder(dataset), small_settings, cache_dir=tmp_path / "cache")

    indices = feature_set.segment_indices(
        ["jazz/jazz.00001.wav", "blues/blues.00000.wav", "jazz/corrupt.wav"]
    )

    # Both segments of each decoded track, sorted; the skipped track adds none.
    assert indices.dtype == np.int64
    assert list(indices) == [0, 1, 8, 9]
    # An empty request gives an empty index array.
    assert feature_set.segment_indices([]).shape == (0,)
    # An id that was never part of the set is an error.
    with pytest.raises(DatasetError, match="not part of this feature set"):
        feature_set.segment_indices(["pop/pop.00000.wav"])


def test_cache_progress_bar_on_stderr(
    dataset: Path,
    tmp_path: Path,
    small_settings: LogMelSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    load_features(scan_folder(dataset), small_settings, cache_dir=tmp_path / "cache", progress=True)
    captured = capsys.readouterr()

    # The bar counts tracks on stderr and leaves stdout alone.
    assert "9/9" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("existing_valid", [True, False])
def test_cache_publish_race(
    dataset: Path, tmp_path: Path, small_settings: LogMelSettings, existing_valid: bool
) -> None:
    """A build finishing after another process published the same key keeps a valid entry."""
    cache_dir = tmp_path / "cache"
    feature_set = load_features(scan_folder(dataset), small_settings, cache_dir=cache_dir)
    entry = _entry(cache_dir, feature_set)
    original = np.array(feature_set.features)
    # The losing process's complete build, with a marker file to tell the two apart.
    late_build = cache_dir / ".tmp-late-build"
    shutil.copytree(entry, late_build)
    (late_build / "late").touch()
    if not existing_valid:
        (entry / "manifest.json").unlink()

    cache_module._publish(late_build, entry, feature_set.fingerprint)

    # A valid published entry is kept, but an invalid one is replaced by the late build.
    assert (entry / "late").exists() is not existing_valid
    # Either way the entry under the key loads with the same features.
    reloaded = load_features(scan_folder(dataset), small_settings, cache_dir=cache_dir)
    np.testing.assert_array_equal(np.asarray(reloaded.features), original)
