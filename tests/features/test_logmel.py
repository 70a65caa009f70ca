"""Tests of LogMelSettings, LogMelSpectrogram (parity with librosa) and segment_waveform."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from features import LogMelSettings, LogMelSpectrogram, segment_waveform

SAMPLE_RATE = 22050

# (n_fft, hop_length, n_mels, f_max)
GRID = [
    (256, 64, 32, 4000.0),
    (512, 128, 40, None),
    (1024, 256, 64, 8000.0),
    (2048, 512, 96, None),
]


def _signal(name: str) -> np.ndarray:
    time = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    if name == "white_noise":
        return (0.1 * np.random.default_rng(1234).standard_normal(SAMPLE_RATE)).astype(np.float32)
    if name == "sine":
        return (0.5 * np.sin(2 * np.pi * 440.0 * time)).astype(np.float32)
    chirp = librosa.chirp(fmin=100.0, fmax=8000.0, sr=SAMPLE_RATE, duration=1.0)
    return (0.5 * chirp).astype(np.float32)


def _librosa_log_mel(
    signal: np.ndarray, n_fft: int, hop_length: int, n_mels: int, f_max: float | None
) -> np.ndarray:
    power = librosa.feature.melspectrogram(
        y=signal, sr=SAMPLE_RATE, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmax=f_max
    )
    log_mel: np.ndarray = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None)
    return log_mel


@pytest.mark.parametrize("signal_name", ["white_noise", "sine", "chirp"])
@pytest.mark.parametrize(("n_fft", "hop_length", "n_mels", "f_max"), GRID)
def test_logmel_matches_librosa(
    signal_name: str, n_fft: int, hop_length: int, n_mels: int, f_max: float | None
) -> None:
    """The dB values match librosa's defaults.

    Tolerances: within 80 dB of the loudest bin the two agree to 0.01 dB; measured
    differences there are below 0.002 dB and come from float32 (torch) against float64
    (librosa) arithmetic. Over the full range, including bins near the -100 dB floor
    (the spectral leakage of a pure sine), float32 rounding of tiny powers gives up to
    about 0.2 dB, so the whole array is checked with atol=0.5 dB.
    """
    signal = _signal(signal_name)
    settings = LogMelSettings(
        sample_rate=SAMPLE_RATE,
        n_fft=n_fft,
        hop_length=hop_length,
        n_mels=n_mels,
        f_max=f_max,
        segment_seconds=1.0,
    )
    ours = LogMelSpectrogram(settings)(torch.from_numpy(signal)).numpy()
    reference = _librosa_log_mel(signal, n_fft, hop_length, n_mels, f_max)
    loud = reference > reference.max() - 80.0

    # Same shape as librosa: (n_mels, frames).
    assert ours.shape == reference.shape
    # Loud bins agree closely.
    np.testing.assert_allclose(ours[loud], reference[loud], rtol=0, atol=0.01)
    # All bins agree within the float32 rounding at the floor.
    np.testing.assert_allclose(ours, reference, rtol=0, atol=0.5)


def test_logmel_silence_is_floor() -> None:
    settings = LogMelSettings(
        sample_rate=8000, n_fft=256, hop_length=128, n_mels=32, segment_seconds=0.5
    )
    output = LogMelSpectrogram(settings)(torch.zeros(settings.segment_samples()))

    # Silence maps to 10 * log10(1e-10) = -100 dB, with no top-dB clamp relative to the peak.
    np.testing.assert_allclose(output.numpy(), -100.0, atol=1e-4)


def test_logmel_batch_matches_single() -> None:
    settings = LogMelSettings(
        sample_rate=8000, n_fft=256, hop_length=128, n_mels=32, segment_seconds=0.5
    )
    module = LogMelSpectrogram(settings)
    batch = torch.from_numpy(
        0.1
        * np.random.default_rng(0)
        .standard_normal((3, settings.segment_samples()))
        .astype(np.float32)
    )

    batched = module(batch)
    singles = torch.stack([module(row) for row in batch])

    # Each batch row equals the same signal processed alone.
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("sample_rate", "n_fft", "hop_length", "n_mels", "segment_seconds"),
    [
        (22050, 1024, 512, 96, 3.0),
        (22050, 2048, 512, 128, 2.5),
        (16000, 400, 160, 64, 1.0),
        (8000, 256, 100, 32, 0.75),
    ],
)
def test_logmel_shape_matches_settings(
    sample_rate: int, n_fft: int, hop_length: int, n_mels: int, segment_seconds: float
) -> None:
    settings = LogMelSettings(
        sample_rate=sample_rate,
        n_fft=n_fft,
        hop_length=hop_length,
        n_mels=n_mels,
        segment_seconds=segment_seconds,
    )
    module = LogMelSpectrogram(settings)
    segment = torch.zeros(settings.segment_samples())

    # A 1-D segment gives (n_mels, n_frames).
    assert tuple(module(segment).shape) == (n_mels, settings.n_frames())
    # A batch of 2 gives (2, n_mels, n_frames).
    assert tuple(module(segment.expand(2, -1)).shape) == (2, n_mels, settings.n_frames())


def test_logmel_rejects_3d_input() -> None:
    module = LogMelSpectrogram(
        LogMelSettings(sample_rate=8000, n_fft=256, hop_length=128, n_mels=32)
    )

    with pytest.raises(ValueError, match=r"shape=\(1, 2, 8000\)"):
        module(torch.zeros(1, 2, 8000))


def test_logmel_accepts_float64_input() -> None:
    settings = LogMelSettings(
        sample_rate=8000, n_fft=256, hop_length=128, n_mels=32, segment_seconds=0.5
    )
    module = LogMelSpectrogram(settings)
    signal = np.random.default_rng(3).standard_normal(settings.segment_samples())

    output64 = module(torch.from_numpy(signal))
    output32 = module(torch.from_numpy(signal.astype(np.float32)))

    # float64 input is cast to the module's float32 and gives the same result.
    torch.testing.assert_close(output64, output32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logmel_cuda_matches_cpu() -> None:
    settings = LogMelSettings(
        sample_rate=8000, n_fft=256, hop_length=128, n_mels=32, segment_seconds=0.5
    )
    signal = torch.from_numpy(_signal("white_noise")[: settings.segment_samples()])
    cpu_output = LogMelSpectrogram(settings)(signal)

    cuda_output = LogMelSpectrogram(settings).to("cuda")(signal.to("cuda")).cpu()

    # The module works after .to("cuda") and agrees with the CPU result.
    torch.testing.assert_close(cuda_output, cpu_output, rtol=0, atol=1e-3)


def test_settings_fingerprint_stable_and_distinct() -> None:
    base = LogMelSettings()

    # Equal settings give equal digests.
    assert base.fingerprint() == LogMelSettings().fingerprint()
    # f_max=None and f_max=sample_rate / 2 produce the same features, so the same digest.
    assert base.fingerprint() == LogMelSettings(f_max=11025.0).fingerprint()
    # Changing any field changes the digest.
    assert base.fingerprint() != LogMelSettings(n_mels=64).fingerprint()
    assert base.fingerprint() != LogMelSettings(segment_seconds=2.0).fingerprint()
    # The digest is 16 hex digits.
    assert len(base.fingerprint()) == 16
    assert int(base.fingerprint(), 16) >= 0


def test_settings_segment_and_frame_counts() -> None:
    settings = LogMelSettings(sample_rate=22050, hop_length=512, segment_seconds=3.0)

    # 3 s at 22050 Hz.
    assert settings.segment_samples() == 66150
    # Centered STFT: 1 + 66150 // 512.
    assert settings.n_frames() == 130


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sample_rate": 0}, "sample_rate=0"),
        ({"n_fft": -1}, "n_fft=-1"),
        ({"hop_length": 0}, "hop_length=0"),
        ({"n_mels": 0}, "n_mels=0"),
        ({"f_min": -5.0}, "f_min=-5.0"),
        ({"f_max": 20000.0}, "f_max=20000.0"),
        ({"f_min": 4000.0, "f_max": 3000.0}, "f_max=3000.0"),
        ({"segment_seconds": 0.0}, "segment_seconds=0.0"),
        ({"segment_seconds": 0.01}, "shorter than n_fft=1024"),
    ],
)
def test_settings_reject_invalid(overrides: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LogMelSettings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n_samples", "segment_samples", "hop_samples", "n_segments"),
    [
        (1000, 250, None, 4),
        (1100, 250, None, 4),  # the 100-sample tail is dropped
        (249, 250, None, 0),  # shorter than one segment
        (250, 250, None, 1),
        (1000, 250, 125, 7),  # 50 % overlap
        (0, 250, None, 0),
    ],
)
def test_segment_waveform_counts(
    n_samples: int, segment_samples: int, hop_samples: int | None, n_segments: int
) -> None:
    waveform = np.arange(n_samples, dtype=np.float32)

    segments = segment_waveform(waveform, segment_samples=segment_samples, hop_samples=hop_samples)

    # (n_segments, segment_samples).
    assert segments.shape == (n_segments, segment_samples)
    # The dtype of the input is kept.
    assert segments.dtype == np.float32


def test_segment_waveform_values_and_copy() -> None:
    waveform = np.arange(10, dtype=np.float32)

    segments = segment_waveform(waveform, segment_samples=4, hop_samples=3)
    segments[0, 0] = -1.0

    # Segment k starts at k * hop_samples.
    np.testing.assert_array_equal(segments[1], [3, 4, 5, 6])
    np.testing.assert_array_equal(segments[2], [6, 7, 8, 9])
    # The result is a writable copy, so the input is unchanged.
    assert waveform[0] == 0.0


@pytest.mark.parametrize(
    ("waveform", "segment_samples", "hop_samples", "message"),
    [
        (np.zeros((2, 100)), 10, None, "shape"),
        (np.zeros(100), 0, None, "segment_samples=0"),
        (np.zeros(100), 10, 0, "hop_samples=0"),
    ],
)
def test_segment_waveform_rejects_invalid(
    waveform: np.ndarray, segment_samples: int, hop_samples: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        segment_waveform(waveform, segment_samples=segment_samples, hop_samples=hop_samples)
