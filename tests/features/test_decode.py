"""Tests of load_audio on files written here in every supported format, and on bad files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from feature_helpers import write_tone

from features import AUDIO_EXTENSIONS, AudioDecodeError, load_audio

RATE = 22050


@pytest.mark.parametrize(
    ("extension", "options"),
    [
        (".wav", {"subtype": "PCM_16"}),
        (".flac", {"subtype": "PCM_16"}),
        (".au", {"subtype": "PCM_16"}),
        (".wav", {"subtype": "FLOAT"}),
    ],
)
def test_load_audio_lossless_formats(
    tmp_path: Path, extension: str, options: dict[str, Any]
) -> None:
    path = tmp_path / f"tone{extension}"
    written = write_tone(path, seconds=0.5, sample_rate=RATE, **options)

    waveform = load_audio(path, sample_rate=RATE)

    # 1-D float32 of the written length.
    assert waveform.dtype == np.float32
    assert waveform.shape == (len(written),)
    # Values survive up to 16-bit quantization.
    np.testing.assert_allclose(waveform, written, atol=1e-4)


@pytest.mark.parametrize(("extension", "file_format"), [(".ogg", "OGG"), (".mp3", "MP3")])
def test_load_audio_lossy_formats(tmp_path: Path, extension: str, file_format: str) -> None:
    path = tmp_path / f"tone{extension}"
    try:
        written = write_tone(path, seconds=1.0, sample_rate=RATE, format=file_format)
    except (sf.LibsndfileError, TypeError, ValueError) as error:
        pytest.skip(f"this libsndfile cannot write {file_format}: {error}")

    waveform = load_audio(path, sample_rate=RATE)

    # 1-D float32.
    assert waveform.dtype == np.float32
    assert waveform.ndim == 1
    # Length within 50 ms, as encoders add or trim padding.
    assert abs(len(waveform) - len(written)) <= RATE // 20
    # The 440 Hz tone survives the codec: its RMS stays near 0.5 / sqrt(2).
    assert 0.3 < float(np.sqrt(np.mean(waveform**2))) < 0.45


def test_audio_extensions_cover_tested_formats() -> None:
    # Every format tested here is an accepted track extension.
    assert AUDIO_EXTENSIONS == frozenset({".wav", ".flac", ".ogg", ".mp3", ".au"})


def test_load_audio_downmixes_stereo(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    written = write_tone(path, seconds=0.5, sample_rate=RATE, channels=2, subtype="FLOAT")

    waveform = load_audio(path, sample_rate=RATE)

    # Stereo becomes mono (samples,).
    assert waveform.shape == (written.shape[0],)
    # Mono is the mean of the channels.
    np.testing.assert_allclose(waveform, written.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("file_rate", [44100, 48000, 16000])
def test_load_audio_resamples(tmp_path: Path, file_rate: int) -> None:
    path = tmp_path / f"tone_{file_rate}.wav"
    write_tone(path, seconds=1.0, sample_rate=file_rate, frequency=440.0)

    waveform = load_audio(path, sample_rate=RATE)

    # One second at file_rate becomes one second at 22050 Hz (within one sample).
    assert abs(len(waveform) - RATE) <= 1
    # The 440 Hz tone is still the strongest frequency after resampling.
    spectrum = np.abs(np.fft.rfft(waveform))
    peak_hz = np.argmax(spectrum) * RATE / len(waveform)
    assert abs(peak_hz - 440.0) < 2.0


def test_load_audio_rejects_zero_length_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")

    # The message names the file.
    with pytest.raises(AudioDecodeError, match="empty.wav"):
        load_audio(path, sample_rate=RATE)


def test_load_audio_rejects_truncated_header(tmp_path: Path) -> None:
    complete = tmp_path / "complete.wav"
    write_tone(complete, seconds=0.1, sample_rate=RATE)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(complete.read_bytes()[:20])

    with pytest.raises(AudioDecodeError, match="truncated.wav"):
        load_audio(truncated, sample_rate=RATE)


def test_load_audio_rejects_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))

    with pytest.raises(AudioDecodeError, match="noise.wav"):
        load_audio(path, sample_rate=RATE)


def test_load_audio_rejects_no_frames(tmp_path: Path) -> None:
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), RATE)

    # A valid header with zero frames is not usable audio.
    with pytest.raises(AudioDecodeError, match="no audio frames"):
        load_audio(path, sample_rate=RATE)


def test_load_audio_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav", sample_rate=RATE)


def test_load_audio_rejects_non_finite(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    samples = np.zeros(1000, dtype=np.float32)
    samples[10] = np.nan
    sf.write(path, samples, RATE, subtype="FLOAT")

    with pytest.raises(AudioDecodeError, match="NaN or infinite"):
        load_audio(path, sample_rate=RATE)


def test_load_audio_rejects_bad_sample_rate(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_tone(path, seconds=0.1, sample_rate=RATE)

    with pytest.raises(ValueError, match="sample_rate=0"):
        load_audio(path, sample_rate=0)


def test_load_audio_real_gtzan_clip(gtzan_root: Path) -> None:
    with open(gtzan_root / "manifest.csv", newline="", encoding="utf-8") as file:
        manifest = {row["path"]: row for row in csv.DictReader(file)}
    track_id = "blues/blues.00000.wav"

    waveform = load_audio(gtzan_root / track_id, sample_rate=RATE)

    # Mono float32 at the clip's native rate, so no resampling changes the length.
    assert waveform.dtype == np.float32
    assert waveform.ndim == 1
    # Duration matches the manifest (rounded to 10 ms there).
    assert abs(len(waveform) / RATE - float(manifest[track_id]["duration_s"])) < 0.01
    # 16-bit PCM decodes into [-1, 1] and the clip is not silent.
    assert float(np.abs(waveform).max()) <= 1.0
    assert float(np.sqrt(np.mean(waveform**2))) > 0.01
