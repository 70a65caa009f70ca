"""A small synthetic dataset of WAV files for demos and tests, generated without downloads.

Each genre is a different synthesis recipe (chords, drums, bass line, noise pads, ...).
Every track draws its own pitch, tempo, gain and noise level, and mixes in a quiet
background from another genre, so a classifier has to learn timbre and rhythm rather
than a single constant.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

__all__ = ["DEMO_GENRES", "synthesize_demo_dataset"]

_logger = logging.getLogger(__name__)

_MARKER = ".demo-dataset.json"
_MARKER_VERSION = 1
_MIN_SAMPLE_RATE = 8000

_Generator = Callable[[np.random.Generator, int, int], np.ndarray]


def _midi_to_hz(note: float) -> float:
    return float(440.0 * 2.0 ** ((note - 69.0) / 12.0))


def _beat_samples(
    rng: np.random.Generator, sample_rate: int, low_bpm: float, high_bpm: float
) -> int:
    return int(sample_rate * 60.0 / rng.uniform(low_bpm, high_bpm))


def _harmonic_tone(
    frequency: float, n_samples: int, sample_rate: int, n_harmonics: int
) -> np.ndarray:
    time = np.arange(n_samples) / sample_rate
    tone = np.zeros(n_samples)
    for harmonic in range(1, n_harmonics + 1):
        if frequency * harmonic < sample_rate / 2:
            tone += np.sin(2 * np.pi * frequency * harmonic * time) / harmonic
    return tone


def _decay(n_samples: int, sample_rate: int, seconds: float) -> np.ndarray:
    return np.exp(-np.arange(n_samples) / (seconds * sample_rate))


def _band_noise(
    rng: np.random.Generator, n_samples: int, sample_rate: int, low_hz: float, high_hz: float
) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n_samples))
    frequencies = np.fft.rfftfreq(n_samples, 1.0 / sample_rate)
    spectrum[(frequencies < low_hz) | (frequencies > high_hz)] = 0.0
    return np.fft.irfft(spectrum, n_samples)


def _place(output: np.ndarray, sound: np.ndarray, start: int) -> None:
    end = min(len(output), start + len(sound))
    if start < end:
        output[start:end] += sound[: end - start]


def _tonal(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize sustained triads with harmonics in the middle register, two beats per chord."""
    output = np.zeros(n_samples)
    chord_samples = 2 * _beat_samples(rng, sample_rate, 60, 110)
    root = rng.integers(52, 67)
    for start in range(0, n_samples, chord_samples):
        chord_root = root + rng.choice([0, 5, 7, 9, -3])
        third = 4 if rng.random() < 0.5 else 3
        for note in (chord_root, chord_root + third, chord_root + 7):
            tone = _harmonic_tone(
                _midi_to_hz(float(note)), chord_samples, sample_rate, n_harmonics=5
            )
            attack = np.minimum(1.0, np.arange(chord_samples) / (0.05 * sample_rate))
            _place(output, tone * attack * _decay(chord_samples, sample_rate, 1.5), start)
    return output


def _percussive(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize kick, snare and hi-hat hits on a beat grid."""
    output = np.zeros(n_samples)
    beat = _beat_samples(rng, sample_rate, 80, 160)
    hit_samples = int(0.3 * sample_rate)
    time = np.arange(hit_samples) / sample_rate
    kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-time * 30)) * time) * _decay(
        hit_samples, sample_rate, 0.08
    )
    for index, start in enumerate(range(0, n_samples, beat // 2)):
        if index % 4 == 0:
            _place(output, kick, start)
        elif index % 4 == 2:
            snare = _band_noise(rng, hit_samples, sample_rate, 1000, 6000) * _decay(
                hit_samples, sample_rate, 0.06
            )
            _place(output, 3 * snare, start)
        hat = _band_noise(rng, hit_samples, sample_rate, 6000, sample_rate / 2) * _decay(
            hit_samples, sample_rate, 0.015
        )
        _place(output, 2 * hat * rng.uniform(0.5, 1.0), start)
    return output


def _bass(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize a low bass line, one note per beat, with a plucked amplitude pulse."""
    output = np.zeros(n_samples)
    beat = _beat_samples(rng, sample_rate, 70, 140)
    root = rng.integers(28, 40)
    for start in range(0, n_samples, beat):
        note = root + rng.choice([0, 0, 3, 5, 7, 10, 12])
        tone = _harmonic_tone(_midi_to_hz(float(note)), beat, sample_rate, n_harmonics=4)
        _place(output, tone * _decay(beat, sample_rate, 0.25), start)
    return output


def _ambient(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize band-passed noise with a slow swell over a quiet drone."""
    center = rng.uniform(300, 2500)
    pad = _band_noise(rng, n_samples, sample_rate, center * 0.7, center * 1.4)
    pad /= np.abs(pad).max() + 1e-12
    time = np.arange(n_samples) / sample_rate
    swell = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * time + rng.uniform(0, 2 * np.pi))
    drone = 0.3 * np.sin(2 * np.pi * _midi_to_hz(float(rng.integers(40, 60))) * time)
    return pad * swell + drone


def _arpeggio(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize fast plucked notes of a broken chord in a high register."""
    output = np.zeros(n_samples)
    step = _beat_samples(rng, sample_rate, 90, 150) // 4
    root = rng.integers(72, 84)
    pattern = root + np.array([0, 4, 7, 12, 7, 4])
    for index, start in enumerate(range(0, n_samples, step)):
        tone = _harmonic_tone(
            _midi_to_hz(float(pattern[index % len(pattern)])), 2 * step, sample_rate, 3
        )
        _place(output, tone * _decay(2 * step, sample_rate, 0.05), start)
    return output


def _sweep(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize repeated sine glissandos between two random frequencies."""
    sweep_samples = int(rng.uniform(0.4, 1.2) * sample_rate)
    low, high = sorted(rng.uniform(200, min(4000, sample_rate / 2 - 200), size=2))
    frequency = np.linspace(low, high, sweep_samples)
    if rng.random() < 0.5:
        frequency = frequency[::-1]
    one_sweep = np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate) * np.hanning(sweep_samples)
    repeats = -(-n_samples // sweep_samples)
    return np.tile(one_sweep, repeats)[:n_samples]


def _bells(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize FM bell strikes with inharmonic partials and long decays."""
    output = np.zeros(n_samples)
    strike = _beat_samples(rng, sample_rate, 40, 90)
    ratio = rng.choice([1.4, 2.76, 3.5])
    time = np.arange(2 * strike) / sample_rate
    for start in range(0, n_samples, strike):
        carrier = _midi_to_hz(float(rng.integers(60, 84)))
        envelope = _decay(2 * strike, sample_rate, 0.8)
        tone = np.sin(
            2 * np.pi * carrier * time + 4 * envelope * np.sin(2 * np.pi * carrier * ratio * time)
        )
        _place(output, tone * envelope, start)
    return output


def _chiptune(rng: np.random.Generator, n_samples: int, sample_rate: int) -> np.ndarray:
    """Synthesize a square-wave melody in eighth notes with a random duty cycle."""
    output = np.zeros(n_samples)
    step = _beat_samples(rng, sample_rate, 100, 170) // 2
    duty = rng.uniform(0.15, 0.5)
    scale = rng.integers(60, 72) + np.array([0, 2, 4, 7, 9, 12])
    time = np.arange(step) / sample_rate
    for start in range(0, n_samples, step):
        phase = (_midi_to_hz(float(rng.choice(scale))) * time) % 1.0
        square = np.where(phase < duty, 1.0, -1.0) * (np.arange(step) < 0.8 * step)
        _place(output, 0.5 * square, start)
    return output


_GENERATORS: dict[str, _Generator] = {
    "tonal": _tonal,
    "percussive": _percussive,
    "bass": _bass,
    "ambient": _ambient,
    "arpeggio": _arpeggio,
    "sweep": _sweep,
    "bells": _bells,
    "chiptune": _chiptune,
}

DEMO_GENRES: tuple[str, ...] = tuple(_GENERATORS)
"""Genre names of the demo dataset in generation order, of which ``n_genres`` takes a prefix."""


def synthesize_demo_dataset(
    root: Path,
    *,
    n_genres: int = 4,
    tracks_per_genre: int = 10,
    seconds: float = 8.0,
    sample_rate: int = 22050,
    seed: int = 0,
) -> Path:
    """Write a synthetic genre dataset of 16-bit mono WAV files under ``root``.

    Files are laid out like GTZAN, ``<root>/<genre>/<genre>.<NNNNN>.wav``, with genres
    taken in order from :data:`DEMO_GENRES`. Track ``i`` of genre ``g`` uses
    ``numpy.random.default_rng([seed, g, i])``, so the files depend only on the
    arguments. A hidden marker file ``.demo-dataset.json`` is written last. When it
    records the same arguments and all its files exist with their recorded sizes, nothing
    is rewritten. Otherwise the files listed by an old marker are deleted before the new
    dataset is written. Other files under ``root`` are left alone.

    Args:
        root: Dataset folder, created if missing.
        n_genres: Number of genres, 2 to 8.
        tracks_per_genre: Tracks per genre, at least 1.
        seconds: Length of each track in seconds, positive.
        sample_rate: Sample rate in Hz, at least 8000.
        seed: Seed of all random draws.

    Returns:
        ``root``.

    Raises:
        ValueError: If an argument is out of range.
    """
    parameters = _check_parameters(n_genres, tracks_per_genre, seconds, sample_rate, seed)
    root = Path(root)
    marker = root / _MARKER
    previous = _read_marker(marker)
    if previous is not None and _is_complete(root, previous, parameters):
        _logger.debug("demo dataset under %s is complete; nothing to write", root)
        return root

    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    if previous is not None:
        _remove_listed_files(root, previous)

    _logger.info(
        "writing demo dataset (%d genres x %d tracks) to %s", n_genres, tracks_per_genre, root
    )
    files = _write_tracks(root, parameters)
    _write_marker(marker, {"version": _MARKER_VERSION, "parameters": parameters, "files": files})
    return root


def _check_parameters(
    n_genres: int, tracks_per_genre: int, seconds: float, sample_rate: int, seed: int
) -> dict[str, Any]:
    if not 2 <= n_genres <= len(_GENERATORS):
        raise ValueError(
            f"n_genres must be between 2 and {len(_GENERATORS)} (one per generator: "
            f"{', '.join(DEMO_GENRES)}), got n_genres={n_genres}"
        )
    if tracks_per_genre < 1:
        raise ValueError(
            f"tracks_per_genre must be at least 1, got tracks_per_genre={tracks_per_genre}"
        )
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got seconds={seconds}")
    if sample_rate < _MIN_SAMPLE_RATE:
        raise ValueError(
            f"sample_rate must be at least {_MIN_SAMPLE_RATE} Hz, got sample_rate={sample_rate}"
        )
    return {
        "n_genres": int(n_genres),
        "tracks_per_genre": int(tracks_per_genre),
        "seconds": float(seconds),
        "sample_rate": int(sample_rate),
        "seed": int(seed),
    }


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _is_complete(root: Path, marker: dict[str, Any], parameters: dict[str, Any]) -> bool:
    if marker.get("version") != _MARKER_VERSION or marker.get("parameters") != parameters:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for relative, size in files.items():
        path = root / relative
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _remove_listed_files(root: Path, marker: dict[str, Any]) -> None:
    files = marker.get("files")
    if not isinstance(files, dict):
        return
    resolved_root = root.resolve()
    for relative in files:
        path = (root / str(relative)).resolve()
        # Delete only WAV files inside root, whatever an edited marker lists.
        if path.suffix == ".wav" and path.is_relative_to(resolved_root) and path.is_file():
            path.unlink()


def _write_tracks(root: Path, parameters: dict[str, Any]) -> dict[str, int]:
    n_samples = round(parameters["seconds"] * parameters["sample_rate"])
    files: dict[str, int] = {}
    for genre_index, genre in enumerate(DEMO_GENRES[: parameters["n_genres"]]):
        (root / genre).mkdir(parents=True, exist_ok=True)
        for track_index in range(parameters["tracks_per_genre"]):
            rng = np.random.default_rng([parameters["seed"], genre_index, track_index])
            waveform = _synthesize_track(
                rng, genre, parameters["n_genres"], n_samples, parameters["sample_rate"]
            )
            relative = f"{genre}/{genre}.{track_index:05d}.wav"
            sf.write(root / relative, waveform, parameters["sample_rate"], subtype="PCM_16")
            files[relative] = (root / relative).stat().st_size
    return files


def _synthesize_track(
    rng: np.random.Generator, genre: str, n_genres: int, n_samples: int, sample_rate: int
) -> np.ndarray:
    main = _normalized(_GENERATORS[genre](rng, n_samples, sample_rate))

    # A quiet layer of another genre and white noise keep the classes from being trivial.
    others = [name for name in DEMO_GENRES[:n_genres] if name != genre]
    background = _normalized(_GENERATORS[str(rng.choice(others))](rng, n_samples, sample_rate))
    mix = main + background * 10 ** (rng.uniform(-22, -12) / 20)
    mix += rng.standard_normal(n_samples) * 10 ** (rng.uniform(-40, -20) / 20)

    peak_gain = rng.uniform(0.3, 0.9)
    return (_normalized(mix) * peak_gain).astype(np.float32)


def _normalized(waveform: np.ndarray) -> np.ndarray:
    normalized: np.ndarray = waveform / (np.abs(waveform).max() + 1e-12)
    return normalized


def _write_marker(marker: Path, content: dict[str, Any]) -> None:
    temporary = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, marker)
