"""Tests of scan_folder, split_random and split_from_lists, with a leakage check on real clips."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from feature_helpers import make_dataset, write_tone

from features import (
    DatasetError,
    LogMelSettings,
    Splits,
    Track,
    load_features,
    scan_folder,
    split_from_lists,
    split_random,
)


def _tracks(counts: dict[str, int]) -> list[Track]:
    """Tracks that need no files, for split tests."""
    return [
        Track(
            path=Path(f"/data/{label}/{label}.{index:05d}.wav"),
            label=label,
            track_id=f"{label}/{label}.{index:05d}.wav",
        )
        for label, n_tracks in counts.items()
        for index in range(n_tracks)
    ]


def _write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- scan_folder -----------------------------------------------------------------------


def test_scan_folder_gtzan_layout(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", ("rock", "blues"), n_tracks=2, seconds=0.1)

    tracks = scan_folder(root)

    # Sorted by track_id, labels from folder names.
    assert [track.track_id for track in tracks] == [
        "blues/blues.00000.wav",
        "blues/blues.00001.wav",
        "rock/rock.00000.wav",
        "rock/rock.00001.wav",
    ]
    assert [track.label for track in tracks] == ["blues", "blues", "rock", "rock"]
    # Paths are absolute and point at the files.
    assert all(track.path.is_absolute() and track.path.is_file() for track in tracks)


def test_scan_folder_skips_non_audio_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_dataset(tmp_path / "data", ("rock", "blues"), n_tracks=1, seconds=0.1)
    (root / "rock" / "notes.txt").write_text("liner notes", encoding="utf-8")
    (root / "blues" / "cover.jpg").write_bytes(b"\xff\xd8")
    (root / "blues" / ".DS_Store").write_bytes(b"\x00")
    (root / "README.md").write_text("about", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="features"):
        tracks = scan_folder(root)
    messages = [record.getMessage() for record in caplog.records]

    # Only the audio files are tracks.
    assert [track.track_id for track in tracks] == ["blues/blues.00000.wav", "rock/rock.00000.wav"]
    # One warning per skipped file in a genre folder, naming it.
    assert sum("notes.txt" in message for message in messages) == 1
    assert sum("cover.jpg" in message for message in messages) == 1
    # A summary with the count.
    assert any("skipped 2 non-audio file(s)" in message for message in messages)
    # Hidden files and files at the root are not warned about.
    assert not any(".DS_Store" in message or "README.md" in message for message in messages)
    # Exactly three warnings: two files and the summary.
    assert len(messages) == 3


def test_scan_folder_unicode_and_spaces(tmp_path: Path) -> None:
    root = tmp_path / "my data"
    write_tone(root / "música latina" / "canción número 1.wav", seconds=0.1)
    write_tone(root / "hip hop" / "track (live) 01.FLAC", seconds=0.1, format="FLAC")
    write_tone(root / "hip hop" / "日本語.wav", seconds=0.1)

    tracks = scan_folder(root)

    # Spaces, non-ASCII names and upper-case extensions are kept as they are on disk.
    assert [track.track_id for track in tracks] == [
        "hip hop/track (live) 01.FLAC",
        "hip hop/日本語.wav",
        "música latina/canción número 1.wav",
    ]
    assert [track.label for track in tracks] == ["hip hop", "hip hop", "música latina"]


def test_scan_folder_nested_files_keep_genre(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", ("rock", "blues"), n_tracks=1, seconds=0.1)
    write_tone(root / "rock" / "live" / "encore.wav", seconds=0.1)

    tracks = scan_folder(root)

    # A file in a nested folder belongs to the top-level genre folder.
    assert (
        Track(
            path=(root / "rock" / "live" / "encore.wav").resolve(),
            label="rock",
            track_id="rock/live/encore.wav",
        )
        in tracks
    )


def test_scan_folder_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found.*nowhere"):
        scan_folder(tmp_path / "nowhere")


def test_scan_folder_root_is_file(tmp_path: Path) -> None:
    path = tmp_path / "file.wav"
    path.write_bytes(b"")

    with pytest.raises(DatasetError, match="not a folder"):
        scan_folder(path)


def test_scan_folder_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "data" / "rock").mkdir(parents=True)

    with pytest.raises(DatasetError, match="no audio files found"):
        scan_folder(tmp_path / "data")


def test_scan_folder_one_genre(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", ("rock",), n_tracks=2, seconds=0.1)
    (root / "jazz").mkdir()

    # An empty genre folder does not count as a genre.
    with pytest.raises(DatasetError, match=r"1 genre\(s\) \['rock'\].*at least 2"):
        scan_folder(root)


# --- split_random ----------------------------------------------------------------------


def test_split_random_no_leakage() -> None:
    tracks = _tracks({"blues": 10, "jazz": 7, "rock": 3})

    splits = split_random(tracks, valid_fraction=0.2, test_fraction=0.2, seed=0)
    train, valid, test = set(splits.train), set(splits.valid), set(splits.test)

    # No track is in two splits.
    assert not train & valid
    assert not train & test
    assert not valid & test
    # Every track is in some split.
    assert train | valid | test == {track.track_id for track in tracks}


def test_split_random_stratified() -> None:
    tracks = _tracks({"blues": 20, "jazz": 10, "rock": 2})
    labels = {track.track_id: track.label for track in tracks}

    splits = split_random(tracks, valid_fraction=0.2, test_fraction=0.1, seed=1)
    valid_counts = Counter(labels[track_id] for track_id in splits.valid)
    test_counts = Counter(labels[track_id] for track_id in splits.test)

    # Each label contributes round(n * fraction) validation tracks.
    assert valid_counts == {"blues": 4, "jazz": 2, "rock": 1}
    # The label with 2 tracks keeps one for training, so it has no test track.
    assert test_counts == {"blues": 2, "jazz": 1}


@pytest.mark.parametrize(
    ("counts", "valid_fraction", "test_fraction", "expected_valid"),
    [
        ({"a": 2, "b": 2}, 0.1, 0.0, {"a": 1, "b": 1}),  # rounds to 0 but at least 1
        ({"a": 1, "b": 5}, 0.2, 0.0, {"b": 1}),  # a single track stays in train
        ({"a": 3, "b": 3}, 0.0, 0.3, {}),  # no validation when valid_fraction is 0
    ],
)
def test_split_random_small_labels(
    counts: dict[str, int],
    valid_fraction: float,
    test_fraction: float,
    expected_valid: dict[str, int],
) -> None:
    tracks = _tracks(counts)
    labels = {track.track_id: track.label for track in tracks}

    splits = split_random(
        tracks, valid_fraction=valid_fraction, test_fraction=test_fraction, seed=0
    )
    train_counts = Counter(labels[track_id] for track_id in splits.train)

    assert Counter(labels[track_id] for track_id in splits.valid) == expected_valid
    # Every label keeps at least one training track.
    assert set(train_counts) == set(counts)


def test_split_random_deterministic() -> None:
    tracks = _tracks({"blues": 10, "jazz": 10})

    first = split_random(tracks, valid_fraction=0.2, test_fraction=0.2, seed=7)
    second = split_random(list(reversed(tracks)), valid_fraction=0.2, test_fraction=0.2, seed=7)

    # Same seed, same result, whatever the input order.
    assert first == second


def test_split_random_seeds_differ() -> None:
    tracks = _tracks({"blues": 10, "jazz": 10})

    first = split_random(tracks, valid_fraction=0.2, test_fraction=0.2, seed=0)
    second = split_random(tracks, valid_fraction=0.2, test_fraction=0.2, seed=1)

    assert first.valid != second.valid


def test_split_random_sorted_tuples() -> None:
    splits = split_random(
        _tracks({"blues": 6, "jazz": 6}), valid_fraction=0.3, test_fraction=0.0, seed=3
    )

    assert splits.train == tuple(sorted(splits.train))
    assert splits.valid == tuple(sorted(splits.valid))
    # test_fraction=0 gives an empty test split.
    assert splits.test == ()


@pytest.mark.parametrize(
    ("valid_fraction", "test_fraction", "message"),
    [
        (-0.1, 0.0, "valid_fraction=-0.1"),
        (1.0, 0.0, "valid_fraction=1.0"),
        (0.2, 1.5, "test_fraction=1.5"),
        (0.5, 0.5, "must be below 1"),
    ],
)
def test_split_random_rejects_fractions(
    valid_fraction: float, test_fraction: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        split_random(
            _tracks({"a": 5, "b": 5}),
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
            seed=0,
        )


def test_split_random_rejects_duplicates_and_empty() -> None:
    tracks = _tracks({"a": 2, "b": 2})

    with pytest.raises(DatasetError, match="duplicate track ids"):
        split_random(tracks + tracks[:1], valid_fraction=0.2, test_fraction=0.0, seed=0)
    with pytest.raises(DatasetError, match="empty track list"):
        split_random([], valid_fraction=0.2, test_fraction=0.0, seed=0)


# --- split_from_lists ------------------------------------------------------------------


def test_split_from_lists_reads_files(tmp_path: Path) -> None:
    tracks = _tracks({"blues": 3, "jazz": 3})
    train = _write_list(
        tmp_path / "train.txt",
        [
            "# training tracks",
            "",
            "blues/blues.00000.wav",
            "./blues/blues.00001.wav",
            "jazz\\jazz.00000.wav",
            "  jazz/jazz.00001.wav  ",
        ],
    )
    valid = _write_list(tmp_path / "valid.txt", ["blues/blues.00002.wav"])
    test = _write_list(tmp_path / "test.txt", ["jazz/jazz.00002.wav"])

    splits = split_from_lists(tracks, train=train, valid=valid, test=test)

    # Comments and blank lines are ignored; ./ prefixes, backslashes and spaces are normalised.
    assert splits == Splits(
        train=(
            "blues/blues.00000.wav",
            "blues/blues.00001.wav",
            "jazz/jazz.00000.wav",
            "jazz/jazz.00001.wav",
        ),
        valid=("blues/blues.00002.wav",),
        test=("jazz/jazz.00002.wav",),
    )


def test_split_from_lists_without_test(tmp_path: Path) -> None:
    tracks = _tracks({"blues": 2})
    train = _write_list(tmp_path / "train.txt", ["blues/blues.00000.wav"])
    valid = _write_list(tmp_path / "valid.txt", ["blues/blues.00001.wav"])

    splits = split_from_lists(tracks, train=train, valid=valid)

    assert splits.test == ()


def test_split_from_lists_warns_missing_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracks = _tracks({"blues": 2, "jazz": 2})
    missing = [f"gone/gone.{index:05d}.wav" for index in range(8)]
    train = _write_list(
        tmp_path / "train.txt", ["blues/blues.00000.wav", "jazz/jazz.00000.wav", *missing[:6]]
    )
    valid = _write_list(tmp_path / "valid.txt", ["blues/blues.00001.wav", *missing[6:]])

    with caplog.at_level(logging.WARNING, logger="features"):
        splits = split_from_lists(tracks, train=train, valid=valid)
    warnings = [
        record.getMessage() for record in caplog.records if record.levelno == logging.WARNING
    ]

    # Missing names are dropped.
    assert splits.train == ("blues/blues.00000.wav", "jazz/jazz.00000.wav")
    # One warning in total, with the count and the first names.
    assert len(warnings) == 1
    assert "8 track id(s)" in warnings[0]
    assert "gone/gone.00000.wav" in warnings[0]
    # Only the first few names are listed.
    assert "gone/gone.00007.wav" not in warnings[0]


def test_split_from_lists_rejects_overlap(tmp_path: Path) -> None:
    tracks = _tracks({"blues": 3})
    train = _write_list(tmp_path / "train.txt", ["blues/blues.00000.wav", "blues/blues.00001.wav"])
    valid = _write_list(tmp_path / "valid.txt", ["blues/blues.00001.wav"])

    # The error names the track and both lists.
    with pytest.raises(DatasetError, match=r"blues\.00001\.wav.*train\.txt.*valid\.txt"):
        split_from_lists(tracks, train=train, valid=valid)


def test_split_from_lists_rejects_repeat_in_one_list(tmp_path: Path) -> None:
    tracks = _tracks({"blues": 3})
    train = _write_list(tmp_path / "train.txt", ["blues/blues.00000.wav", "blues/blues.00000.wav"])
    valid = _write_list(tmp_path / "valid.txt", ["blues/blues.00001.wav"])

    with pytest.raises(DatasetError, match="twice in split list train"):
        split_from_lists(tracks, train=train, valid=valid)


@pytest.mark.parametrize("empty_split", ["train", "valid"])
def test_split_from_lists_rejects_empty_split(tmp_path: Path, empty_split: str) -> None:
    tracks = _tracks({"blues": 3})
    lists = {
        "train": _write_list(tmp_path / "train.txt", ["blues/blues.00000.wav"]),
        "valid": _write_list(tmp_path / "valid.txt", ["blues/blues.00001.wav"]),
    }
    lists[empty_split] = _write_list(
        tmp_path / f"{empty_split}_empty.txt", ["# nothing", "other/x.wav"]
    )

    # The error names the list file that is empty after filtering.
    with pytest.raises(DatasetError, match=f"{empty_split}_empty.txt"):
        split_from_lists(tracks, train=lists["train"], valid=lists["valid"])


def test_split_from_lists_missing_file(tmp_path: Path) -> None:
    tracks = _tracks({"blues": 2})
    valid = _write_list(tmp_path / "valid.txt", ["blues/blues.00001.wav"])

    with pytest.raises(DatasetError, match="cannot read split list.*nope.txt"):
        split_from_lists(tracks, train=tmp_path / "nope.txt", valid=valid)


def test_split_from_lists_unicode_normalization(tmp_path: Path) -> None:
    # On-disk name in decomposed form (NFD, as macOS file systems store it), list in NFC.
    decomposed = "me\u0301tal/cancio\u0301n.wav"
    composed = "m\u00e9tal/canci\u00f3n.wav"
    tracks = [
        Track(path=Path("/d") / decomposed, label="me\u0301tal", track_id=decomposed),
        Track(path=Path("/d/rock/a.wav"), label="rock", track_id="rock/a.wav"),
    ]
    train = _write_list(tmp_path / "train.txt", [composed])
    valid = _write_list(tmp_path / "valid.txt", ["rock/a.wav"])

    splits = split_from_lists(tracks, train=train, valid=valid)

    # The track id is returned as spelled in the dataset.
    assert splits.train == (decomposed,)


# --- leakage on real audio -------------------------------------------------------------


def test_real_gtzan_segments_do_not_leak(gtzan_root: Path, tmp_path: Path) -> None:
    tracks = scan_folder(gtzan_root)
    splits = split_random(tracks, valid_fraction=0.2, test_fraction=0.2, seed=0)
    settings = LogMelSettings(n_fft=512, hop_length=512, n_mels=32, segment_seconds=3.0)
    feature_set = load_features(tracks, settings, cache_dir=tmp_path / "cache", batch_size=16)

    segment_track_ids = [feature_set.track_ids[index] for index in feature_set.segment_tracks]
    train_tracks = {segment_track_ids[index] for index in feature_set.segment_indices(splits.train)}
    valid_tracks = {segment_track_ids[index] for index in feature_set.segment_indices(splits.valid)}
    test_tracks = {segment_track_ids[index] for index in feature_set.segment_indices(splits.test)}

    # gtzan-mini has 10 genres x 6 clips, all decodable and longer than 3 s.
    assert len(tracks) == 60
    assert feature_set.skipped == ()
    # Every train segment maps to a train track, none to a valid or test track.
    assert train_tracks == set(splits.train)
    assert not train_tracks & (set(splits.valid) | set(splits.test))
    # The same holds for validation and test segments.
    assert valid_tracks == set(splits.valid)
    assert test_tracks == set(splits.test)
    # The three index sets partition all segments.
    n_indexed = sum(
        len(feature_set.segment_indices(split))
        for split in (splits.train, splits.valid, splits.test)
    )
    assert n_indexed == feature_set.features.shape[0]
