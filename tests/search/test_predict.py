"""Classifying held-out real GTZAN clips with the registered champion.

A two-trial study trains on five clips per genre, linked from the real gtzan-mini clips
into a temporary folder. The sixth clip of each genre is never seen in training.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from search.cli import main
from search.config import Overrides, StudyConfig, apply_overrides, load_studies
from search.runner import run_worker

HELD_OUT_INDEX = 5

STUDIES_YAML = """\
studies:
  tiny:
    dataset:
      path: audio
      sample_rate: 11025
      segment_seconds: 3.0
      split: {method: random, valid_fraction: 0.2, test_fraction: 0.0, seed: 0}
    features: {n_fft: 512, hop_length: 256, n_mels: 32, f_max: 5512.5}
    training: {epochs: 2, seed: 0}
    sampler: {name: random, seed: 0}
    pruner: {name: none}
    device: cpu
    search_space:
      family: {choices: [cnn]}
      learning_rate: {low: 1.0e-3, high: 3.0e-3, log: true}
      batch_size: 16
      dropout: 0.1
      weight_decay: 1.0e-5
      optimizer: adam
      architectures:
        cnn: {n_conv_layers: 2, base_channels: 8, kernel_size: 3}
    n_trials: 2
"""

pytestmark = pytest.mark.slow


def clips_root(gtzan_mini: Path) -> Path:
    """Return the folder with the genre sub-folders: ``gtzan_mini`` or its ``gtzan-mini``."""
    root = gtzan_mini / "gtzan-mini" if (gtzan_mini / "gtzan-mini").is_dir() else gtzan_mini
    assert (root / "blues").is_dir(), f"{root} has no genre sub-folders such as blues/"
    return root


def link_training_clips(root: Path, folder: Path) -> list[Path]:
    """Link all but the held-out clip of each genre into ``folder``; return the held-out clips."""
    held_out = []
    for genre_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        clips = sorted(genre_dir.glob("*.wav"))
        (folder / genre_dir.name).mkdir(parents=True)
        for clip in clips[:HELD_OUT_INDEX]:
            (folder / genre_dir.name / clip.name).symlink_to(clip)
        held_out.extend(clips[HELD_OUT_INDEX:HELD_OUT_INDEX + 1])
    return held_out


@pytest.fixture(scope="module")
def trained(gtzan_mini: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, list[Path]]:
    """The tiny study trained on the real clips, and the held-out clips."""
    root = clips_root(gtzan_mini)
    folder = tmp_path_factory.mktemp("predict")
    held_out = link_training_clips(root, folder / "audio")
    (folder / "studies.yaml").write_text(STUDIES_YAML, encoding="utf-8")
    overrides = Overrides(storage=f"sqlite:///{folder / 'optuna.db'}",
                          tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                          cache_dir=folder / "cache")
    config = apply_overrides(load_studies(folder / "studies.yaml").get("tiny"), overrides,
                             base_dir=folder)
    run_worker(config)
    return config, held_out


def test_champion_classifies_held_out_path(trained: tuple[StudyConfig, list[Path]]) -> None:
    config, held_out = trained
    clip = held_out[0]
    script = textwrap.dedent(f"""
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({config.tracking_uri!r})
        model = mlflow.pyfunc.load_model("models:/{config.registered_model_name}@champion")
        print(model.predict(pd.DataFrame({{"path": [{str(clip)!r}]}})).to_json(orient="records"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])[0]
    probabilities = {key[len("prob_"):]: value for key, value in row.items()
                     if key.startswith("prob_")}
    # The model knows all ten genres and returns a distribution over them.
    assert len(probabilities) == 10
    assert math.isclose(sum(probabilities.values()), 1.0, rel_tol=1e-4)
    assert row["genre"] == max(probabilities, key=probabilities.__getitem__)


def test_predict_command_prints_genres(trained: tuple[StudyConfig, list[Path]]) -> None:
    config, held_out = trained
    uri = f"models:/{config.registered_model_name}@champion"
    result = CliRunner().invoke(main, ["predict", uri, *map(str, held_out[:3]),
                                       "--tracking-uri", config.tracking_uri])
    lines = [line for line in result.stdout.splitlines() if "\t" in line]
    assert result.exit_code == 0, result.output
    # One tab-separated line per file: path, genre and its probability.
    assert [line.split("\t")[0] for line in lines] == [str(path) for path in held_out[:3]]
    assert all(0.0 < float(line.split("\t")[2]) <= 1.0 for line in lines)


def test_predict_command_reports_bad_file(trained: tuple[StudyConfig, list[Path]],
                                          tmp_path: Path) -> None:
    config, held_out = trained
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    uri = f"models:/{config.registered_model_name}@champion"
    result = CliRunner().invoke(main, ["predict", uri, str(broken), str(held_out[0]),
                                       "--tracking-uri", config.tracking_uri])
    # The broken file is reported, the good one is still classified, and the status is 1.
    assert result.exit_code == 1
    assert f"cannot classify {str(broken)!r}" in result.stderr
    assert result.stdout.startswith(f"{held_out[0]}\t")
