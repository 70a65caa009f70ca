"""Dataset discovery (genre sub-folders) and track-level train/valid/test splits."""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features._audio import AUDIO_EXTENSIONS
from features._errors import DatasetError

__all__ = ["Splits", "Track", "scan_folder", "split_from_lists", "split_random"]

_logger = logging.getLogger(__name__)

_N_NAMES_IN_WARNING = 5


@dataclass(frozen=True)
class Track:
    """One audio file of a dataset and its genre label.

    Attributes:
        path: Absolute path of the audio file.
        label: Genre, the name of the sub-folder of the dataset root that contains the file.
        track_id: Path relative to the dataset root in POSIX form,
            e.g. ``"blues/blues.00000.wav"``. Unique within a dataset.
    """

    path: Path
    label: str
    track_id: str


@dataclass(frozen=True)
class Splits:
    """Track ids of the train, validation and test splits, each sorted, never overlapping."""

    train: tuple[str, ...]
    valid: tuple[str, ...]
    test: tuple[str, ...]


def scan_folder(root: str | os.PathLike[str]) -> list[Track]:
    """List the tracks of a dataset laid out as ``<root>/<genre>/<file>`` (GTZAN layout).

    Files below a genre folder (nested folders included, symlinked folders not followed)
    whose extension, compared case-insensitively, is in :data:`AUDIO_EXTENSIONS` become
    tracks. Other files there are skipped with one WARNING each and a summary WARNING
    with their count. Files directly in ``root`` (a README, a manifest) are not tracks
    and are ignored at DEBUG level.
    Hidden files and folders (names starting with ``"."``) are ignored silently.

    Args:
        root: Dataset root folder.

    Returns:
        Tracks sorted by ``track_id``.

    Raises:
        DatasetError: If ``root`` is missing or not a folder, contains no audio files in
            genre sub-folders, or contains audio for fewer than two genres.
    """
    root_path = Path(root).expanduser().resolve()
    if not root_path.exists():
        raise DatasetError(
            f"dataset folder not found: root={str(root_path)!r}; pass the folder that "
            "contains one sub-folder per genre"
        )
    if not root_path.is_dir():
        raise DatasetError(
            f"dataset root is not a folder: root={str(root_path)!r}; pass the folder that "
            "contains one sub-folder per genre, not a file"
        )

    tracks: list[Track] = []
    skipped: list[Path] = []
    for entry in sorted(root_path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            _scan_genre(root_path, entry, tracks, skipped)
        else:
            _logger.debug("ignoring file outside genre folders: %s", entry)

    if skipped:
        _logger.warning("skipped %d non-audio file(s) under %s", len(skipped), root_path)
    _check_genres(root_path, tracks)
    return sorted(tracks, key=lambda track: track.track_id)


def _scan_genre(root: Path, genre_dir: Path, tracks: list[Track], skipped: list[Path]) -> None:
    # Symlinked sub-folders are not followed, so a link cycle cannot recurse forever.
    for dirpath, dirnames, filenames in os.walk(genre_dir):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = Path(dirpath, filename)
            if path.suffix.lower() not in AUDIO_EXTENSIONS:
                _logger.warning(
                    "skipping %s: extension %r is not an audio extension (expected one of %s)",
                    path,
                    path.suffix,
                    ", ".join(sorted(AUDIO_EXTENSIONS)),
                )
                skipped.append(path)
                continue
            track_id = path.relative_to(root).as_posix()
            tracks.append(Track(path=path, label=genre_dir.name, track_id=track_id))


def _check_genres(root: Path, tracks: Sequence[Track]) -> None:
    if not tracks:
        raise DatasetError(
            f"no audio files found under root={str(root)!r}; expected <root>/<genre>/<file> "
            f"with extensions {', '.join(sorted(AUDIO_EXTENSIONS))}"
        )
    genres = sorted({track.label for track in tracks})
    if len(genres) < 2:
        raise DatasetError(
            f"dataset root={str(root)!r} has audio for {len(genres)} genre(s) {genres}, but a "
            "classifier needs at least 2; add another genre sub-folder with audio files"
        )


def split_random(
    tracks: Sequence[Track], *, valid_fraction: float, test_fraction: float, seed: int
) -> Splits:
    """Split tracks at random into train, validation and test, stratified by label.

    Splitting is by track, so all segments of a track end up in one split. Each label is
    shuffled with its own draw from ``numpy.random.default_rng(seed)``, in sorted label
    order, so the result depends only on the track ids, labels, fractions and seed. Per
    label, ``round(n * fraction)`` tracks go to each held-out split. A label with at least
    2 tracks gets at least one validation track when ``valid_fraction > 0``, and at least
    one training track is always kept, taking tracks back from test first.

    Args:
        tracks: Tracks to split, ``track_id`` unique.
        valid_fraction: Fraction of each label's tracks for validation, in ``[0, 1)``.
        test_fraction: Fraction for test, in ``[0, 1)``, may be 0.
        seed: Seed of the random generator.

    Returns:
        The splits, each a sorted tuple of track ids.

    Raises:
        ValueError: If a fraction is outside ``[0, 1)`` or both together reach 1.
        DatasetError: If ``tracks`` is empty or has duplicate track ids.
    """
    _check_fractions(valid_fraction, test_fraction)
    by_label = _group_by_label(tracks)
    rng = np.random.default_rng(seed)

    train: list[str] = []
    valid: list[str] = []
    test: list[str] = []
    for label in sorted(by_label):
        track_ids = sorted(by_label[label])
        shuffled = [track_ids[i] for i in rng.permutation(len(track_ids))]
        n_valid, n_test = _held_out_counts(len(shuffled), valid_fraction, test_fraction)
        valid.extend(shuffled[:n_valid])
        test.extend(shuffled[n_valid : n_valid + n_test])
        train.extend(shuffled[n_valid + n_test :])
    return Splits(train=tuple(sorted(train)), valid=tuple(sorted(valid)), test=tuple(sorted(test)))


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {name}={value}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            "valid_fraction + test_fraction must be below 1 so that training tracks remain, got "
            f"valid_fraction={valid_fraction}, test_fraction={test_fraction}"
        )


def _group_by_label(tracks: Sequence[Track]) -> dict[str, list[str]]:
    if not tracks:
        raise DatasetError("cannot split an empty track list; check the dataset folder")
    _check_unique_ids(tracks)
    by_label: dict[str, list[str]] = {}
    for track in tracks:
        by_label.setdefault(track.label, []).append(track.track_id)
    return by_label


def _check_unique_ids(tracks: Iterable[Track]) -> None:
    seen: set[str] = set()
    duplicates: set[str] = set()
    for track in tracks:
        if track.track_id in seen:
            duplicates.add(track.track_id)
        seen.add(track.track_id)
    if duplicates:
        raise DatasetError(
            f"duplicate track ids {sorted(duplicates)[:_N_NAMES_IN_WARNING]}; each track "
            "must appear once, so pass the output of scan_folder unchanged"
        )


def _held_out_counts(n_tracks: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_valid = round(n_tracks * valid_fraction)
    n_test = round(n_tracks * test_fraction)
    if valid_fraction > 0 and n_tracks >= 2:
        n_valid = max(n_valid, 1)

    # Keep at least one training track, giving back test tracks before validation ones.
    excess = n_valid + n_test - (n_tracks - 1)
    if excess > 0:
        from_test = min(excess, n_test)
        n_test -= from_test
        n_valid -= excess - from_test
    return max(n_valid, 0), n_test


def split_from_lists(
    tracks: Sequence[Track], *, train: Path, valid: Path, test: Path | None = None
) -> Splits:
    """Build splits from split-list files.

    Each file contains one track id per line (``"blues/blues.00000.wav"``, relative to the
    dataset root, POSIX separators). Blank lines and lines starting with ``#`` are ignored,
    a leading ``./`` and backslash separators are accepted, and names are compared in
    Unicode NFC form. Names that are not among ``tracks`` (e.g. files removed from the
    dataset) are dropped with one WARNING giving their count and the first few names.
    Tracks in no list are left out of all splits.

    Args:
        tracks: Tracks of the dataset, e.g. from :func:`scan_folder`.
        train: Split list of the training tracks.
        valid: Split list of the validation tracks.
        test: Split list of the test tracks, or None for an empty test split.

    Returns:
        The splits, each a sorted tuple of track ids as spelled in ``tracks``.

    Raises:
        DatasetError: If a list file cannot be read, a track is listed in two lists (or
            twice in one), or the train or valid split is empty after filtering.
    """
    _check_unique_ids(tracks)
    known = {_normalize_track_id(track.track_id): track.track_id for track in tracks}
    list_paths = {"train": train, "valid": valid, "test": test}

    listed = {name: _read_split_list(path) for name, path in list_paths.items() if path is not None}
    _check_no_overlap(listed, list_paths)

    missing = [track_id for names in listed.values() for track_id in names if track_id not in known]
    if missing:
        _logger.warning(
            "ignoring %d track id(s) listed in split lists but not found in the dataset, "
            "first ones: %s",
            len(missing),
            missing[:_N_NAMES_IN_WARNING],
        )

    resolved = {
        name: tuple(sorted(known[track_id] for track_id in names if track_id in known))
        for name, names in listed.items()
    }
    for name in ("train", "valid"):
        if not resolved[name]:
            raise DatasetError(
                f"split list {name}={str(list_paths[name])!r} names no track of the dataset; "
                "check that its lines are track ids relative to the dataset root, "
                "e.g. 'blues/blues.00000.wav'"
            )
    return Splits(train=resolved["train"], valid=resolved["valid"], test=resolved.get("test", ()))


def _normalize_track_id(name: str) -> str:
    name = unicodedata.normalize("NFC", name.replace("\\", "/"))
    while name.startswith("./"):
        name = name[2:]
    return name


def _read_split_list(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(
            f"cannot read split list {str(path)!r}: {error}; pass an existing UTF-8 text file "
            "with one track id per line"
        ) from error

    names: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            names.append(_normalize_track_id(stripped))
    return names


def _check_no_overlap(listed: dict[str, list[str]], list_paths: dict[str, Path | None]) -> None:
    owner: dict[str, str] = {}
    for name, track_ids in listed.items():
        for track_id in track_ids:
            if track_id in owner:
                raise DatasetError(_overlap_message(track_id, owner[track_id], name, list_paths))
            owner[track_id] = name


def _overlap_message(
    track_id: str, first: str, second: str, list_paths: dict[str, Path | None]
) -> str:
    first_list = f"{first}={str(list_paths[first])!r}"
    if first == second:
        where = f"twice in split list {first_list}"
    else:
        where = f"in split list {first_list} and in {second}={str(list_paths[second])!r}"
    return (
        f"track {track_id!r} is listed {where}; a track must appear in exactly one split, "
        "so remove the extra line"
    )
