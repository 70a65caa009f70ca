"""Log-mel features of a whole dataset, computed once and cached on disk.

A cache entry is the folder ``<cache_dir>/<key>/`` where ``key`` is a hash of the track
ids, labels, file sizes and modification times, the front-end settings and
:data:`FORMAT_VERSION`. It contains ``features.npy``, ``labels.npy``,
``segment_tracks.npy`` and ``manifest.json``. An entry is built in a temporary folder
inside ``cache_dir`` and renamed into place only when complete, and the manifest's
SHA-256 checksums are verified each time the entry is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from features._audio import load_audio
from features._dataset import Track, _check_unique_ids
from features._errors import AudioDecodeError, DatasetError
from features._logmel import LogMelSettings, LogMelSpectrogram, segment_waveform

__all__ = ["FORMAT_VERSION", "FeatureSet", "dataset_fingerprint", "load_features"]

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the cache layout and feature computation; bump it to invalidate old entries."""

STALE_TEMP_SECONDS = 3600.0
"""Age in seconds after which a leftover temporary build folder is deleted."""

_TEMP_PREFIX = ".tmp-"
_MANIFEST = "manifest.json"
_ARRAY_FILES = {
    "features": "features.npy",
    "labels": "labels.npy",
    "segment_tracks": "segment_tracks.npy",
}
_HASH_CHUNK_BYTES = 1 << 20

DEFAULT_BATCH_SIZE = 64
"""Segments per log-mel forward pass on a cache miss. One STFT call per track instead of
one per segment made cold extraction of the 60 gtzan-mini clips about 6x faster on 2 CPU
cores (bench/bench_peer.py); 64 segments of 3 s at 22050 Hz take about 17 MB as float32."""


@dataclass
class FeatureSet:
    """Log-mel segments of a dataset with their labels and tracks.

    Attributes:
        features: Log-mel power in dB, shape ``(n_segments, n_mels, n_frames)``, float16,
            memory-mapped read-only from the cache.
        labels: Class of each segment, shape ``(n_segments,)``, int64 index into ``classes``.
        segment_tracks: Track of each segment, shape ``(n_segments,)``, int64 index into
            ``track_ids``. Segments of one track are contiguous and in time order.
        track_ids: Ids of the decoded tracks, sorted.
        track_labels: Genre of each entry of ``track_ids``.
        classes: Sorted genre names present among the decoded tracks.
        fingerprint: Cache key (hex) of the dataset files and settings.
        skipped: ``(track_id, reason)`` of each track that could not be used.
    """

    features: np.ndarray
    labels: np.ndarray
    segment_tracks: np.ndarray
    track_ids: tuple[str, ...]
    track_labels: tuple[str, ...]
    classes: tuple[str, ...]
    fingerprint: str
    skipped: tuple[tuple[str, str], ...]

    def segment_indices(self, track_ids: Iterable[str]) -> np.ndarray:
        """Return the indices of all segments of the given tracks.

        Ids of skipped tracks are ignored, so a split made before decoding can be passed
        as is.

        Args:
            track_ids: Track ids, e.g. one split of :class:`~features.Splits`.

        Returns:
            Sorted segment indices, shape ``(n,)``, int64.

        Raises:
            DatasetError: If an id is neither a decoded nor a skipped track of this set.
        """
        position = {track_id: index for index, track_id in enumerate(self.track_ids)}
        skipped_ids = {track_id for track_id, _ in self.skipped}
        requested: list[int] = []
        unknown: list[str] = []
        for track_id in track_ids:
            if track_id in position:
                requested.append(position[track_id])
            elif track_id not in skipped_ids:
                unknown.append(track_id)

        if unknown:
            raise DatasetError(
                f"{len(unknown)} track id(s) are not part of this feature set, first ones: "
                f"{unknown[:5]}; build the splits from the same tracks passed to load_features"
            )
        mask = np.isin(self.segment_tracks, np.asarray(requested, dtype=np.int64))
        return np.flatnonzero(mask).astype(np.int64)


class _InvalidEntryError(Exception):
    """A cache entry is incomplete, corrupt or from another format version."""


def dataset_fingerprint(tracks: Sequence[Track]) -> str:
    """Hash the identity and state of a dataset's files.

    The hash covers each track's id, label, file size and modification time in
    nanoseconds, in track-id order, so touching, replacing, adding, removing or
    relabelling a file changes it. A file that cannot be stat'ed hashes as size -1.

    Args:
        tracks: Tracks of the dataset.

    Returns:
        A 32-digit hex digest.
    """
    digest = hashlib.sha256()
    for track in sorted(tracks, key=lambda track: track.track_id):
        try:
            stat = track.path.stat()
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime_ns = -1, -1
        record = json.dumps([track.track_id, track.label, size, mtime_ns], ensure_ascii=False)
        digest.update(record.encode("utf-8") + b"\n")
    return digest.hexdigest()[:32]


def _cache_key(tracks: Sequence[Track], settings: LogMelSettings) -> str:
    parts = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset_fingerprint(tracks),
        "settings": settings.fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def load_features(
    tracks: Sequence[Track],
    settings: LogMelSettings,
    *,
    cache_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> FeatureSet:
    """Return the log-mel segments of all tracks, computing them only on a cache miss.

    On a hit no audio is decoded. On a miss each track is decoded with
    :func:`~features.load_audio`, cut into non-overlapping segments of
    ``settings.segment_seconds`` (the tail is dropped), and turned into log-mel features
    on ``device``. Tracks that cannot be decoded or are shorter than one segment are
    skipped with one WARNING each and a summary WARNING instead of raising. Features are
    stored as float16, which keeps a dB value within about 0.03 dB at 60 dB. The entry is
    written atomically, and an existing entry that is partial or fails its checksum is
    logged, deleted and rebuilt. Temporary build folders older than
    :data:`STALE_TEMP_SECONDS` are deleted. Files are only created inside ``cache_dir``.

    Args:
        tracks: Tracks to load, ``track_id`` unique.
        settings: Front-end settings, part of the cache key.
        cache_dir: Cache folder, created if missing. Several processes may share it.
        device: Device on which log-mel features are computed on a miss.
        batch_size: Maximum number of segments per forward pass, at least 1.
        progress: Show a tqdm progress bar over tracks on stderr during a miss.

    Returns:
        The feature set, its arrays memory-mapped from the cache entry.

    Raises:
        DatasetError: If ``tracks`` is empty or has duplicate ids, or fewer than two
            classes remain after skipping unusable tracks.
        ValueError: If ``batch_size`` is below 1.
        NotADirectoryError: If ``cache_dir`` exists and is not a folder.
    """
    _check_load_arguments(tracks, batch_size)
    cache_root = _prepare_cache_dir(cache_dir)
    key = _cache_key(tracks, settings)
    entry = cache_root / key

    _remove_stale_temp_dirs(cache_root)
    cached = _load_entry(entry, key)
    if cached is not None:
        _log_cache_hit(entry, cached)
        return cached

    _logger.info("building feature cache entry %s for %d track(s)", entry, len(tracks))
    arrays, manifest = _compute(
        tracks, settings, device=device, batch_size=batch_size, progress=progress
    )
    manifest.update(key=key, dataset_fingerprint=dataset_fingerprint(tracks))
    _write_entry(cache_root, key, arrays, manifest)
    return _read_entry(entry, key)


def _check_load_arguments(tracks: Sequence[Track], batch_size: int) -> None:
    if not tracks:
        raise DatasetError("load_features got no tracks; pass the output of scan_folder")
    _check_unique_ids(tracks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 segment, got batch_size={batch_size}")


def _prepare_cache_dir(cache_dir: str | os.PathLike[str]) -> Path:
    cache_root = Path(cache_dir).expanduser().resolve()
    if cache_root.exists() and not cache_root.is_dir():
        raise NotADirectoryError(
            f"cache_dir={str(cache_root)!r} exists and is not a folder; pass a folder path"
        )
    cache_root.mkdir(parents=True, exist_ok=True)
    return cache_root


def _log_cache_hit(entry: Path, feature_set: FeatureSet) -> None:
    _logger.info(
        "loaded %d segment(s) of %d track(s) from feature cache entry %s",
        feature_set.features.shape[0],
        len(feature_set.track_ids),
        entry,
    )
    if feature_set.skipped:
        _logger.info(
            "%d track(s) were skipped when this cache entry was built; see FeatureSet.skipped",
            len(feature_set.skipped),
        )


# ---------------------------------------------------------------------------------------
# Computing features on a cache miss


def _compute(
    tracks: Sequence[Track],
    settings: LogMelSettings,
    *,
    device: str | torch.device,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    module = LogMelSpectrogram(settings).to(device).eval()
    ordered = sorted(tracks, key=lambda track: track.track_id)
    decoded: list[tuple[Track, np.ndarray]] = []
    skipped: list[tuple[str, str]] = []

    with _progress_bar(ordered, enabled=progress) as bar:
        for track in bar:
            reason, features = _track_features(track, settings, module, device, batch_size)
            if reason is None:
                decoded.append((track, features))
            else:
                _logger.warning("skipping track %s (%s): %s", track.track_id, track.path, reason)
                skipped.append((track.track_id, reason))

    if skipped:
        _logger.warning(
            "skipped %d of %d track(s) that could not be used", len(skipped), len(ordered)
        )
    return _assemble(decoded, skipped, settings)


@contextmanager
def _progress_bar(tracks: list[Track], *, enabled: bool) -> Iterator[Iterable[Track]]:
    if not enabled:
        yield tracks
        return
    # Route log records through tqdm so skip warnings do not break the bar's line.
    with (
        logging_redirect_tqdm(),
        tqdm(tracks, desc="log-mel", unit="track", file=sys.stderr) as bar,
    ):
        yield bar


def _track_features(
    track: Track,
    settings: LogMelSettings,
    module: LogMelSpectrogram,
    device: str | torch.device,
    batch_size: int,
) -> tuple[str | None, np.ndarray]:
    """Return ``(None, features)`` for a usable track, else ``(reason, empty array)``."""
    empty = np.empty((0,), dtype=np.float16)
    try:
        waveform = load_audio(track.path, sample_rate=settings.sample_rate)
    except AudioDecodeError as error:
        return str(error), empty

    segments = segment_waveform(waveform, segment_samples=settings.segment_samples())
    if segments.shape[0] == 0:
        seconds = waveform.shape[0] / settings.sample_rate
        reason = (
            f"audio is {seconds:.2f} s long, shorter than one segment "
            f"(segment_seconds={settings.segment_seconds})"
        )
        return reason, empty
    return None, _log_mel(module, segments, device, batch_size)


def _log_mel(
    module: LogMelSpectrogram, segments: np.ndarray, device: str | torch.device, batch_size: int
) -> np.ndarray:
    outputs: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, segments.shape[0], batch_size):
            batch = torch.from_numpy(segments[start : start + batch_size]).to(device)
            log_mel = module(batch)  # (batch, n_mels, frames)
            outputs.append(log_mel.to("cpu", torch.float16).numpy())
    return np.concatenate(outputs)  # (n_segments, n_mels, frames)


def _assemble(
    decoded: list[tuple[Track, np.ndarray]],
    skipped: list[tuple[str, str]],
    settings: LogMelSettings,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    classes = sorted({track.label for track, _ in decoded})
    if len(classes) < 2:
        raise DatasetError(
            f"only {len(classes)} class(es) {classes} remain after skipping {len(skipped)} "
            "unusable track(s), but a classifier needs at least 2; fix or replace the skipped "
            "files, or lower segment_seconds if tracks are too short"
        )

    class_index = {label: index for index, label in enumerate(classes)}
    labels = [
        np.full(len(features), class_index[track.label], dtype=np.int64)
        for track, features in decoded
    ]
    segment_tracks = [
        np.full(len(features), index, dtype=np.int64) for index, (_, features) in enumerate(decoded)
    ]
    arrays = {
        "features": np.concatenate([features for _, features in decoded]),
        "labels": np.concatenate(labels),
        "segment_tracks": np.concatenate(segment_tracks),
    }
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "settings": asdict(settings),
        "settings_fingerprint": settings.fingerprint(),
        "track_ids": [track.track_id for track, _ in decoded],
        "track_labels": [track.label for track, _ in decoded],
        "classes": classes,
        "skipped": [list(item) for item in skipped],
    }
    return arrays, manifest


# ---------------------------------------------------------------------------------------
# Writing an entry atomically


def _write_entry(
    cache_root: Path, key: str, arrays: dict[str, np.ndarray], manifest: dict[str, Any]
) -> None:
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{key}-", dir=cache_root))
    try:
        manifest["arrays"] = {
            name: _save_array(temp_dir / _ARRAY_FILES[name], array)
            for name, array in arrays.items()
        }
        manifest["created_unix_s"] = time.time()
        # The manifest is written last, so an entry without one is never complete.
        _write_synced(
            temp_dir / _MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")
        )
        _fsync_dir(temp_dir)
        _publish(temp_dir, cache_root / key, key)
        _fsync_dir(cache_root)
    finally:
        if temp_dir.exists():
            shutil.rmtree(temp_dir, ignore_errors=True)


def _save_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    with open(path, "wb") as file:
        np.save(file, array, allow_pickle=False)
        file.flush()
        os.fsync(file.fileno())
    return {
        "file": path.name,
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "bytes": path.stat().st_size,
        "sha256": _sha256_file(path),
    }


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable on POSIX. Windows cannot open folders.
    if os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _publish(temp_dir: Path, entry: Path, key: str) -> None:
    """Rename a complete build into place, replacing an invalid entry but not a valid one."""
    try:
        os.replace(temp_dir, entry)
        return
    except OSError:
        if not entry.exists():
            raise

    # Another process published this key first, or a broken entry appeared meanwhile.
    try:
        _read_entry(entry, key)
        _logger.info("feature cache entry %s was built concurrently; keeping that one", entry)
        return
    except _InvalidEntryError:
        _discard(entry)
    os.replace(temp_dir, entry)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Reading and validating an entry


def _load_entry(entry: Path, key: str) -> FeatureSet | None:
    if not entry.exists():
        return None
    try:
        return _read_entry(entry, key)
    except _InvalidEntryError as error:
        _logger.warning(
            "feature cache entry %s is invalid (%s); deleting and rebuilding it", entry, error
        )
        _discard(entry)
        return None


def _read_entry(entry: Path, key: str) -> FeatureSet:
    manifest = _read_manifest(entry)
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("key") != key:
        raise _InvalidEntryError(
            f"manifest has format_version={manifest.get('format_version')!r}, "
            f"key={manifest.get('key')!r}; expected {FORMAT_VERSION}, {key}"
        )
    try:
        arrays = {name: _load_array(entry, manifest["arrays"][name]) for name in _ARRAY_FILES}
        feature_set = FeatureSet(
            features=arrays["features"],
            labels=arrays["labels"],
            segment_tracks=arrays["segment_tracks"],
            track_ids=tuple(manifest["track_ids"]),
            track_labels=tuple(manifest["track_labels"]),
            classes=tuple(manifest["classes"]),
            fingerprint=key,
            skipped=tuple((str(track_id), str(reason)) for track_id, reason in manifest["skipped"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise _InvalidEntryError(f"manifest field is missing or malformed: {error!r}") from error
    _check_consistent(feature_set)
    return feature_set


def _read_manifest(entry: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((entry / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise _InvalidEntryError(f"{_MANIFEST} is missing or unreadable: {error}") from error
    if not isinstance(manifest, dict):
        raise _InvalidEntryError(f"{_MANIFEST} is not a JSON object")
    return manifest


def _load_array(entry: Path, record: dict[str, Any]) -> np.ndarray:
    path = entry / Path(record["file"]).name
    try:
        size = path.stat().st_size
    except OSError as error:
        raise _InvalidEntryError(f"array file {path.name} is missing: {error}") from error
    if size != record["bytes"]:
        raise _InvalidEntryError(
            f"{path.name} has {size} bytes, manifest records {record['bytes']}"
        )
    if _sha256_file(path) != record["sha256"]:
        raise _InvalidEntryError(f"{path.name} does not match its SHA-256 checksum")

    try:
        array: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _InvalidEntryError(f"cannot load {path.name}: {error}") from error
    if list(array.shape) != record["shape"] or array.dtype.str != record["dtype"]:
        raise _InvalidEntryError(
            f"{path.name} has shape={array.shape}, dtype={array.dtype.str}; manifest records "
            f"shape={record['shape']}, dtype={record['dtype']}"
        )
    return array


def _check_consistent(feature_set: FeatureSet) -> None:
    n_segments = feature_set.features.shape[0]
    problems = []
    if feature_set.features.ndim != 3 or feature_set.features.dtype != np.float16:
        problems.append("features must be 3-D float16")
    if feature_set.labels.shape != (n_segments,) or feature_set.segment_tracks.shape != (
        n_segments,
    ):
        problems.append("labels and segment_tracks must have one entry per segment")
    if len(feature_set.track_ids) != len(feature_set.track_labels):
        problems.append("track_ids and track_labels differ in length")
    if n_segments and int(feature_set.segment_tracks.max()) >= len(feature_set.track_ids):
        problems.append("segment_tracks points past track_ids")
    if n_segments and int(feature_set.labels.max()) >= len(feature_set.classes):
        problems.append("labels point past classes")
    if problems:
        raise _InvalidEntryError("; ".join(problems))


def _remove_stale_temp_dirs(cache_root: Path) -> None:
    now = time.time()
    for child in cache_root.iterdir():
        if not child.name.startswith(_TEMP_PREFIX) or not child.is_dir():
            continue
        try:
            age = now - child.stat().st_mtime
        except OSError:
            continue
        if age > STALE_TEMP_SECONDS:
            _logger.warning(
                "deleting temporary folder %s left by an interrupted cache build", child
            )
            shutil.rmtree(child, ignore_errors=True)


def _discard(entry: Path) -> None:
    # Rename first so that no reader sees a half-deleted entry under the key's name.
    trash = entry.with_name(f"{_TEMP_PREFIX}{entry.name}-discarded-{uuid.uuid4().hex}")
    try:
        os.replace(entry, trash)
    except FileNotFoundError:
        return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)
