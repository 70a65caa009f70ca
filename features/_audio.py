"""Decoding of audio files into mono float32 waveforms at a fixed sample rate."""

from __future__ import annotations

import logging
import os

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional

from features._errors import AudioDecodeError

__all__ = ["AUDIO_EXTENSIONS", "load_audio"]

_logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS: frozenset[str] = frozenset({".wav", ".flac", ".ogg", ".mp3", ".au"})
"""File name extensions (lower case, with the dot) that are treated as audio tracks."""


def load_audio(path: str | os.PathLike[str], *, sample_rate: int) -> np.ndarray:
    """Decode an audio file into a mono waveform at ``sample_rate``.

    The file is decoded with soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, MP3, AU),
    multi-channel audio is downmixed by averaging the channels, and the waveform is
    resampled with ``torchaudio.functional.resample`` only when the file's rate differs.

    Args:
        path: Audio file to decode.
        sample_rate: Target sample rate in Hz, positive.

    Returns:
        Waveform of shape ``(samples,)``, dtype float32, nominally in ``[-1, 1]``.

    Raises:
        ValueError: If ``sample_rate`` is not positive.
        AudioDecodeError: If the file is missing, empty, corrupt or not audio, contains
            no frames, or contains non-finite samples.
    """
    if sample_rate <= 0:
        raise ValueError(
            f"sample_rate must be a positive number of Hz, got sample_rate={sample_rate}"
        )

    samples, file_rate = _decode(path)
    waveform = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]

    if file_rate != sample_rate:
        _logger.debug("resampling %s from %d Hz to %d Hz", path, file_rate, sample_rate)
        resampled = torchaudio.functional.resample(
            torch.from_numpy(waveform), file_rate, sample_rate
        )
        waveform = resampled.numpy()
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _decode(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Read all frames as float32 ``(frames, channels)`` and the file's sample rate."""
    # libsndfile reports a missing file or a folder only as "System error".
    if not os.path.exists(path):
        raise AudioDecodeError(f"file not found: {os.fspath(path)!r}. Check the path.")
    if os.path.isdir(path):
        raise AudioDecodeError(f"{os.fspath(path)!r} is a directory, not an audio file. "
                               f"Pass the audio files inside it.")
    try:
        samples, file_rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, EOFError, ValueError) as error:
        # libsndfile reports empty files, unreadable files and bad headers alike as errors,
        # and its message (e.g. "Format not recognised") is the most precise reason available.
        raise AudioDecodeError(f"cannot decode audio file {os.fspath(path)!r}: {error}") from error

    if samples.shape[0] == 0:
        raise AudioDecodeError(f"audio file {os.fspath(path)!r} contains no audio frames")
    if not np.isfinite(samples).all():
        raise AudioDecodeError(
            f"audio file {os.fspath(path)!r} contains NaN or infinite samples; re-export it "
            "as PCM or clean the floating-point data"
        )
    return samples, int(file_rate)
