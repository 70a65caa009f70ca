"""Audio decoding, dataset scanning and splitting, and cached log-mel features.

This package sits at the bottom of genre-search. It imports neither ``search`` nor
MLflow nor Optuna, so it can be used and tested on its own.
"""

from __future__ import annotations

from features._audio import AUDIO_EXTENSIONS, load_audio
from features._cache import FORMAT_VERSION, FeatureSet, dataset_fingerprint, load_features
from features._dataset import Splits, Track, scan_folder, split_from_lists, split_random
from features._demo import DEMO_GENRES, synthesize_demo_dataset
from features._errors import AudioDecodeError, DatasetError
from features._logmel import LogMelSettings, LogMelSpectrogram, segment_waveform

__all__ = [
    "AUDIO_EXTENSIONS",
    "DEMO_GENRES",
    "FORMAT_VERSION",
    "AudioDecodeError",
    "DatasetError",
    "FeatureSet",
    "LogMelSettings",
    "LogMelSpectrogram",
    "Splits",
    "Track",
    "dataset_fingerprint",
    "load_audio",
    "load_features",
    "scan_folder",
    "segment_waveform",
    "split_from_lists",
    "split_random",
    "synthesize_demo_dataset",
]
