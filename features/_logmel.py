"""Log-mel spectrogram settings, the torch module that computes it, and segmentation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.transforms

__all__ = ["LogMelSettings", "LogMelSpectrogram", "segment_waveform"]

AMIN = 1e-10
"""Floor of the mel power before the logarithm, so silence maps to -100 dB."""


@dataclass(frozen=True)
class LogMelSettings:
    """Parameters of the log-mel front end and of the fixed-length segments it processes.

    Attributes:
        sample_rate: Sample rate in Hz that audio is resampled to.
        n_fft: FFT size in samples, also the length of the Hann window.
        hop_length: Hop between STFT frames in samples.
        n_mels: Number of mel bands.
        f_min: Lowest mel filter frequency in Hz.
        f_max: Highest mel filter frequency in Hz, or None for ``sample_rate / 2``.
        segment_seconds: Length of one segment (one classifier input) in seconds.
    """

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 96
    f_min: float = 0.0
    f_max: float | None = None
    segment_seconds: float = 3.0

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if not self.segment_seconds > 0:
            raise ValueError(
                f"segment_seconds must be positive, got segment_seconds={self.segment_seconds}"
            )
        self._check_frequencies()
        if self.segment_samples() < self.n_fft:
            raise ValueError(
                f"a segment of segment_seconds={self.segment_seconds} is "
                f"{self.segment_samples()} samples, shorter than n_fft={self.n_fft}; "
                "raise segment_seconds or lower n_fft"
            )

    def _check_frequencies(self) -> None:
        nyquist = self.sample_rate / 2
        if not 0.0 <= self.f_min < nyquist:
            raise ValueError(
                f"f_min must be in [0, sample_rate / 2) = [0, {nyquist}) Hz, got f_min={self.f_min}"
            )
        if self.f_max is not None and not self.f_min < self.f_max <= nyquist:
            raise ValueError(
                f"f_max must be None or in (f_min, sample_rate / 2] = ({self.f_min}, {nyquist}] "
                f"Hz, got f_max={self.f_max}"
            )

    def resolved_f_max(self) -> float:
        """Return the upper mel frequency in Hz, ``f_max`` or ``sample_rate / 2`` if None."""
        return float(self.sample_rate / 2 if self.f_max is None else self.f_max)

    def segment_samples(self) -> int:
        """Return the segment length in samples, ``round(segment_seconds * sample_rate)``."""
        return round(self.segment_seconds * self.sample_rate)

    def n_frames(self) -> int:
        """Return the number of STFT frames per segment for a centered STFT.

        With ``center=True`` the signal is padded by ``n_fft // 2`` on each side, which
        gives ``1 + segment_samples // hop_length`` frames.
        """
        return 1 + self.segment_samples() // self.hop_length

    def fingerprint(self) -> str:
        """Return a 16-hex-digit digest of all settings, stable across processes.

        ``f_max=None`` and ``f_max=sample_rate / 2`` give the same digest because they
        produce the same features.
        """
        fields = {
            "sample_rate": int(self.sample_rate),
            "n_fft": int(self.n_fft),
            "hop_length": int(self.hop_length),
            "n_mels": int(self.n_mels),
            "f_min": float(self.f_min),
            "f_max": self.resolved_f_max(),
            "segment_seconds": float(self.segment_seconds),
        }
        encoded = json.dumps(fields, sort_keys=True).encode("utf-8")
        return hashlib.sha256(encoded).hexdigest()[:16]


class LogMelSpectrogram(torch.nn.Module):
    """Log-mel power spectrogram in dB that matches librosa's defaults.

    The output equals ``librosa.power_to_db(librosa.feature.melspectrogram(y=x, sr=...,
    n_fft=..., hop_length=..., n_mels=..., fmin=..., fmax=...), ref=1.0, amin=1e-10,
    top_db=None)`` (librosa 0.10 and 0.11): a centered STFT with zero padding and a
    periodic Hann window, power 2, a mel filterbank on the Slaney mel scale with Slaney
    (area) normalisation, then ``10 * log10(max(power, 1e-10))`` without a top-dB clamp.
    The window and filterbank are buffers, so ``.to(device)`` moves the whole module.

    Args:
        settings: Front-end parameters. ``segment_seconds`` is not used here.
    """

    def __init__(self, settings: LogMelSettings) -> None:
        super().__init__()
        self.settings = settings
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=settings.sample_rate,
            n_fft=settings.n_fft,
            win_length=settings.n_fft,
            hop_length=settings.hop_length,
            f_min=settings.f_min,
            f_max=settings.resolved_f_max(),
            n_mels=settings.n_mels,
            power=2.0,
            center=True,
            pad_mode="constant",
            norm="slaney",
            mel_scale="slaney",
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Compute the log-mel spectrogram.

        Args:
            waveform: Audio at ``settings.sample_rate``, shape ``(batch, samples)`` or
                ``(samples,)``. Cast to the module's floating dtype.

        Returns:
            Log-mel power in dB, shape ``(batch, n_mels, frames)`` or ``(n_mels, frames)``
            with ``frames = 1 + samples // hop_length``.
        """
        if waveform.dim() not in (1, 2):
            raise ValueError(
                "waveform must have shape (samples,) or (batch, samples), "
                f"got shape={tuple(waveform.shape)}"
            )
        waveform = waveform.to(self.mel.spectrogram.window.dtype)
        power = self.mel(waveform)  # (batch, n_mels, frames)
        return 10.0 * torch.log10(torch.clamp(power, min=AMIN))


def segment_waveform(
    waveform: np.ndarray, *, segment_samples: int, hop_samples: int | None = None
) -> np.ndarray:
    """Cut a waveform into fixed-length segments.

    Args:
        waveform: Mono audio, shape ``(samples,)``.
        segment_samples: Segment length in samples, positive.
        hop_samples: Start-to-start distance of segments in samples. None means
            ``segment_samples`` (no overlap).

    Returns:
        Segments of shape ``(n_segments, segment_samples)`` with the dtype of
        ``waveform``, a copy. The tail shorter than a segment is dropped, so a clip
        shorter than one segment gives ``n_segments == 0``.
    """
    hop = segment_samples if hop_samples is None else hop_samples
    if waveform.ndim != 1:
        raise ValueError(f"waveform must have shape (samples,), got shape={waveform.shape}")
    if segment_samples <= 0:
        raise ValueError(f"segment_samples must be positive, got segment_samples={segment_samples}")
    if hop <= 0:
        raise ValueError(f"hop_samples must be positive or None, got hop_samples={hop_samples}")

    if waveform.shape[0] < segment_samples:
        return np.empty((0, segment_samples), dtype=waveform.dtype)
    n_segments = 1 + (waveform.shape[0] - segment_samples) // hop
    windows = np.lib.stride_tricks.sliding_window_view(waveform, segment_samples)
    return np.array(windows[::hop][:n_segments])  # (n_segments, segment_samples), a copy
