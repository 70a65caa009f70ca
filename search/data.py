"""From a study's dataset config to cached log-mel segments and a split by track."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from features import (
    FeatureSet,
    LogMelSettings,
    Splits,
    Track,
    load_features,
    scan_folder,
    split_from_lists,
    split_random,
    synthesize_demo_dataset,
)
from search.config import StudyConfig

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedDataset:
    """Features and splits of a study's dataset, ready for trials."""

    root: Path
    feature_set: FeatureSet
    splits: Splits
    settings: LogMelSettings

    @property
    def fingerprint(self) -> str:
        """Cache key of the dataset's files together with the feature settings."""
        return self.feature_set.fingerprint


def feature_settings(config: StudyConfig) -> LogMelSettings:
    """Return the log-mel settings of a study."""
    return LogMelSettings(
        sample_rate=config.dataset.sample_rate,
        n_fft=config.features.n_fft,
        hop_length=config.features.hop_length,
        n_mels=config.features.n_mels,
        f_min=config.features.f_min,
        f_max=config.features.f_max,
        segment_seconds=config.dataset.segment_seconds,
    )


def dataset_root(config: StudyConfig) -> Path:
    """Return the study's audio folder, writing the synthetic dataset first if needed."""
    dataset = config.dataset
    if dataset.path is not None:
        return dataset.path
    synthetic = dataset.synthetic
    if synthetic is None:
        raise ValueError(f"study {config.name!r} has no dataset path. Pass --data PATH.")
    key = hashlib.sha256(repr((synthetic, dataset.sample_rate)).encode()).hexdigest()[:12]
    root = config.cache_dir / "synthetic" / key
    return synthesize_demo_dataset(
        root, n_genres=synthetic.n_genres, tracks_per_genre=synthetic.tracks_per_genre,
        seconds=synthetic.seconds, sample_rate=dataset.sample_rate, seed=synthetic.seed,
    )


def prepare_dataset(config: StudyConfig, *, device: torch.device,
                    progress: bool = False) -> PreparedDataset:
    """Scan, decode (or load from the cache) and split the study's dataset.

    Raises:
        features.DatasetError: The folder is missing, empty or has fewer than two genres,
            or a split list is invalid.
    """
    root = dataset_root(config)
    tracks = scan_folder(root)
    settings = feature_settings(config)
    feature_set = load_features(tracks, settings, cache_dir=config.cache_dir / "features",
                                device=device, progress=progress)
    splits = _split(config, feature_set)
    _logger.info(
        "dataset %s: %d tracks in %d genres, %d segments (train %d, valid %d, test %d tracks)",
        root, len(feature_set.track_ids), len(feature_set.classes), len(feature_set.labels),
        len(splits.train), len(splits.valid), len(splits.test),
    )
    return PreparedDataset(root=root, feature_set=feature_set, splits=splits, settings=settings)


def _split(config: StudyConfig, feature_set: FeatureSet) -> Splits:
    split = config.dataset.split
    usable = [
        Track(path=Path(track_id), label=label, track_id=track_id)
        for track_id, label in zip(feature_set.track_ids, feature_set.track_labels)
    ]
    if split.method == "lists":
        assert split.train is not None and split.valid is not None
        return split_from_lists(usable, train=split.train, valid=split.valid, test=split.test)
    return split_random(usable, valid_fraction=split.valid_fraction,
                        test_fraction=split.test_fraction, seed=split.seed)
