"""Unclean audio folders through the real CLI: bad files are skipped, the rest trains.

Every file is written into ``tmp_path`` at test time; real GTZAN clips are copied there from
``GENRE_SEARCH_TEST_DATA`` and never into the repository.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import (
    SAMPLE_RATE,
    real_data_study,
    run_cli,
    write_genres,
    write_studies,
    write_tone,
)

# Bad files written into the `rock` genre folder, each with what the skip reason mentions.
_BAD_FILES = ("notes.txt", "empty.wav", "truncated.wav", "noise bytes.wav", "short.wav")


def _write_bad_files(genre_dir: Path) -> None:
    genre_dir.mkdir(parents=True, exist_ok=True)
    (genre_dir / "notes.txt").write_text("not audio\n", encoding="utf-8")
    (genre_dir / "empty.wav").write_bytes(b"")
    whole = write_tone(genre_dir / "whole.tmp.wav", seconds=2.0).read_bytes()
    (genre_dir / "whole.tmp.wav").unlink()
    (genre_dir / "truncated.wav").write_bytes(whole[:30])
    (genre_dir / "noise bytes.wav").write_bytes(np.random.default_rng(0).bytes(4096))
    write_tone(genre_dir / "short.wav", seconds=0.3)


def _write_odd_but_usable_files(root: Path) -> None:
    write_tone(root / "jazz" / "stereo 44k.wav", sample_rate=44100, channels=2, frequency=700)
    write_tone(root / "jazz" / "tone 48k.flac", sample_rate=48000, frequency=710)
    write_tone(root / "jazz" / "naïve ütf café.wav", frequency=720)
    write_tone(root / "jazz" / "compressed.mp3", sample_rate=22050, frequency=730,
               format="MP3", subtype="MPEG_LAYER_III")
    sf.write(root / "rock" / "silent.wav", np.zeros(2 * SAMPLE_RATE, dtype=np.float32),
             SAMPLE_RATE)


def _trial_states(folder: Path) -> list[str]:
    with sqlite3.connect(folder / "optuna.db") as connection:
        return [row[0] for row in connection.execute("SELECT state FROM trials ORDER BY number")]


def _logged_param(folder: Path, key: str) -> list[str]:
    with sqlite3.connect(folder / "mlflow.db") as connection:
        return [row[0] for row in connection.execute(
            "SELECT value FROM params WHERE key = ?", (key,))]


@pytest.mark.slow
def test_launch_dirty_folder_trains(tmp_path: Path) -> None:
    data = write_genres(tmp_path / "data", {"rock": 300.0, "jazz": 600.0}, n_tracks=3)
    _write_bad_files(data / "rock")
    _write_odd_but_usable_files(data)
    write_studies(tmp_path, real_data_study(data, n_trials=1))

    result = run_cli(["launch", "tiny", "--no-progress"], cwd=tmp_path)

    # The study runs to the end despite the bad files.
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    for name in _BAD_FILES:
        # Each unusable file gets exactly one warning naming it.
        assert sum(name in line for line in warnings) == 1, (name, warnings)
    # A summary line counts the undecodable or too short tracks.
    assert "skipped 4 of 15 track(s) that could not be used" in result.stderr
    # A summary line counts the non-audio files.
    assert "skipped 1 non-audio file(s)" in result.stderr
    # The usable tracks (odd formats, rates, channels and names included) trained one trial.
    assert _trial_states(tmp_path) == ["COMPLETE"]
    train, valid = (_logged_param(tmp_path, key) for key in ("n_train_segments",
                                                            "n_valid_segments"))
    # The 11 usable tracks of 2 s (15 audio files less 4 skipped) give 22 one-second segments.
    assert int(train[0]) + int(valid[0]) == 22


@pytest.mark.slow
def test_launch_real_clips_corrupt_copies(tmp_path: Path, gtzan_root: Path) -> None:
    data = tmp_path / "data"
    for genre in ("blues", "metal"):
        clips = sorted((gtzan_root / genre).glob("*.wav"))[:2]
        for clip in clips:
            (data / genre).mkdir(parents=True, exist_ok=True)
            shutil.copy(clip, data / genre / clip.name)
        # A copy of a real clip cut inside its header, and one with its header zeroed.
        header_cut = clips[0].read_bytes()[:40]
        (data / genre / "cut header.wav").write_bytes(header_cut)
        zeroed = bytearray(clips[1].read_bytes())
        zeroed[:44] = bytes(44)
        (data / genre / "zeroed header.wav").write_bytes(bytes(zeroed))
    write_studies(tmp_path, real_data_study(
        data, n_trials=1, dataset={"sample_rate": 8000, "segment_seconds": 3.0}))

    result = run_cli(["launch", "tiny", "--no-progress"], cwd=tmp_path)

    # The four real clips train although four copies are corrupt.
    assert result.returncode == 0, result.stderr[-3000:]
    # The corrupt copies are summarized.
    assert "skipped 4 of 8 track(s) that could not be used" in result.stderr
    # The trial completed.
    assert _trial_states(tmp_path) == ["COMPLETE"]


@pytest.mark.parametrize("layout", ["empty", "one_genre", "one_usable_genre"])
def test_launch_unusable_folder_exits_2(tmp_path: Path, layout: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if layout != "empty":
        write_genres(data, {"rock": 300.0}, n_tracks=2)
    if layout == "one_usable_genre":
        _write_bad_files(data / "jazz")
    write_studies(tmp_path, real_data_study(data))

    result = run_cli(["launch", "tiny", "--no-progress"], cwd=tmp_path)

    # A dataset that cannot make a classifier is a usage error.
    assert result.returncode == 2, result.stderr[-3000:]
    # The message states that two genres are needed, or that no audio was found.
    assert "at least 2" in result.stderr or "no audio files found" in result.stderr
    # No trial was started.
    assert not (tmp_path / "optuna.db").exists() or _trial_states(tmp_path) == []


@pytest.mark.slow
def test_launch_split_list_missing_tracks(tmp_path: Path) -> None:
    data = write_genres(tmp_path / "data", {"rock": 300.0, "jazz": 600.0}, n_tracks=3)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text(
        "rock/rock.00000.wav\nrock/rock.00001.wav\njazz/jazz.00000.wav\njazz/jazz.00001.wav\n"
        "jazz/gone.00009.wav\n", encoding="utf-8")
    (lists / "valid.txt").write_text("rock/rock.00002.wav\njazz/jazz.00002.wav\n"
                                     "rock/also-gone.wav\n", encoding="utf-8")
    write_studies(tmp_path, real_data_study(data, n_trials=1, dataset={"split": {
        "method": "lists", "train": str(lists / "train.txt"),
        "valid": str(lists / "valid.txt"), "valid_fraction": None, "seed": None}}))

    result = run_cli(["launch", "tiny", "--no-progress"], cwd=tmp_path)

    # The missing tracks do not stop the study.
    assert result.returncode == 0, result.stderr[-3000:]
    # One warning counts the missing names and shows them.
    assert "ignoring 2 track id(s) listed in split lists" in result.stderr
    # The trial completed on the remaining tracks.
    assert _trial_states(tmp_path) == ["COMPLETE"]


def _cache_entries(folder: Path) -> list[Path]:
    return sorted(path for path in (folder / "cache" / "features").iterdir()
                  if not path.name.startswith("."))


@pytest.mark.slow
def test_launch_changed_file_invalidates_cache(tmp_path: Path) -> None:
    data = write_genres(tmp_path / "data", {"rock": 300.0, "jazz": 600.0}, n_tracks=3)
    write_studies(tmp_path, real_data_study(data, n_trials=1))
    first = run_cli(["launch", "tiny", "--no-progress"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    write_tone(data / "rock" / "rock.00000.wav", seconds=3.0, frequency=333.0)
    second = run_cli(["launch", "tiny", "--no-progress", "--n-trials", "1"], cwd=tmp_path)

    # The rerun succeeds.
    assert second.returncode == 0, second.stderr[-3000:]
    # The changed file made the rerun compute features again.
    assert "building feature cache entry" in second.stderr
    # The new entry sits next to the old one, under another key.
    assert len(_cache_entries(tmp_path)) == 2


@pytest.mark.slow
def test_launch_corrupt_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    data = write_genres(tmp_path / "data", {"rock": 300.0, "jazz": 600.0}, n_tracks=3)
    write_studies(tmp_path, real_data_study(data, n_trials=1))
    first = run_cli(["launch", "tiny", "--no-progress"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (entry,) = _cache_entries(tmp_path)
    features = entry / "features.npy"
    corrupted = bytearray(features.read_bytes())
    corrupted[-64:] = bytes(64)
    features.write_bytes(bytes(corrupted))

    second = run_cli(["launch", "tiny", "--no-progress", "--n-trials", "1"], cwd=tmp_path)

    # The rerun succeeds.
    assert second.returncode == 0, second.stderr[-3000:]
    # The corrupt entry was noticed and rebuilt, not loaded.
    assert "building feature cache entry" in second.stderr
    # Both trials completed.
    assert _trial_states(tmp_path) == ["COMPLETE", "COMPLETE"]
