"""Bad studies.yaml files and flags, through the real CLI: exit 2, a precise message, no files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import write_studies, written_files

from search.cli import main


def _launch(folder: Path, *args: str, study: str = "tiny") -> Result:
    runner = CliRunner()
    return runner.invoke(main, ["launch", study, "--config", str(folder / "studies.yaml"),
                                "--no-progress", *args])


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from an empty folder so that nothing can land next to the repository."""
    monkeypatch.chdir(tmp_path)
    for name in ("GENRE_SEARCH_STORAGE", "GENRE_SEARCH_TRACKING_URI", "GENRE_SEARCH_DATA",
                 "GENRE_SEARCH_CACHE_DIR", "GENRE_SEARCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


# Each row: the change to the tiny study's defaults or study entry, then the texts that the
# message must contain: the key path, the offending value and the fix. A mistake in the
# defaults block is reported under `defaults.`, where the user wrote it.
_BAD_STUDIES: list[tuple[str, dict[str, Any], dict[str, Any], tuple[str, ...]]] = [
    ("unknown_key", {}, {"epochz": 3},
     ("studies.tiny.epochz", "unknown key", "Did you mean `epochs`")),
    ("wrong_type", {}, {"n_trials": "many"},
     ("studies.tiny.n_trials", "'many'", "integer")),
    ("min_above_max", {"search_space": {"dropout": {"low": 0.5, "high": 0.1}}}, {},
     ("defaults.search_space.dropout", "low=0.5", "Swap them")),
    ("log_non_positive", {"search_space": {"learning_rate": {"low": 0.0, "high": 0.1}}}, {},
     ("defaults.search_space.learning_rate.low", "low=0.0", "log: false")),
    ("empty_choices", {"search_space": {"optimizer": {"choices": []}}}, {},
     ("defaults.search_space.optimizer.choices", "choices=[]", "non-empty list")),
    ("unknown_family", {"search_space": {"family": {"choices": ["transformer"]}}}, {},
     ("defaults.search_space.family", "'transformer'", "Known families: cnn")),
    ("unknown_sampler", {"sampler": {"name": "bayes"}}, {},
     ("defaults.sampler.name", "'bayes'", "tpe, random")),
    ("unknown_pruner", {"pruner": {"name": "sometimes"}}, {},
     ("defaults.pruner.name", "'sometimes'", "median")),
    ("training_not_mapping", {}, {"training": True},
     ("studies.tiny.training", "got True", "training: {epochs: 10}")),
]


@pytest.mark.parametrize(("case", "defaults", "study", "expected"), _BAD_STUDIES,
                         ids=[row[0] for row in _BAD_STUDIES])
def test_launch_bad_study_exits_2(
        in_tmp: Path, case: str, defaults: dict[str, Any], study: dict[str, Any],
        expected: tuple[str, ...]) -> None:
    write_studies(in_tmp, study, defaults=defaults)
    result = _launch(in_tmp)
    # A configuration problem is a usage error: exit status 2.
    assert result.exit_code == 2, result.output
    for text in expected:
        # The message names the key path, shows the value and gives the fix.
        assert text in result.output
    # Validation happens before any storage, tracking store or cache is created.
    assert written_files(in_tmp) == set()


def test_launch_missing_config_file(in_tmp: Path) -> None:
    result = _launch(in_tmp)
    # A missing file is a usage error.
    assert result.exit_code == 2
    # The message names the path it looked for.
    assert str(in_tmp / "studies.yaml") in result.output
    # The message names the flag that points at another file.
    assert "--config" in result.output
    # Nothing is created.
    assert written_files(in_tmp) == set()


def test_launch_invalid_yaml_reports_line(in_tmp: Path) -> None:
    (in_tmp / "studies.yaml").write_text(
        "defaults:\n  device: cpu\nstudies:\n  tiny: {dataset: [unclosed\n", encoding="utf-8")
    result = _launch(in_tmp)
    # Broken YAML is a usage error.
    assert result.exit_code == 2
    # The message points at the line of the syntax error.
    assert "line 4" in result.output or "line 5" in result.output, result.output
    # Nothing is created.
    assert written_files(in_tmp) == set()


def test_launch_unknown_study_lists_known_studies(in_tmp: Path) -> None:
    write_studies(in_tmp)
    result = _launch(in_tmp, study="nope")
    # An unknown study name is a usage error.
    assert result.exit_code == 2
    # The message shows the name that was asked for.
    assert "'nope'" in result.output
    # The message lists the studies that exist.
    assert "Known studies: tiny" in result.output
    # Nothing is created.
    assert written_files(in_tmp) == set()


def test_launch_missing_data_folder_exits_2(in_tmp: Path) -> None:
    write_studies(in_tmp)
    result = _launch(in_tmp, "--data", str(in_tmp / "no-such-folder"))
    # A missing --data folder is a usage error.
    assert result.exit_code == 2
    # The message names the flag and the folder.
    assert f"--data '{in_tmp / 'no-such-folder'}'" in result.output
    # Nothing is created.
    assert written_files(in_tmp) == set()


def test_launch_missing_dataset_path_in_file_exits_2(in_tmp: Path) -> None:
    write_studies(in_tmp, {"dataset": {"synthetic": None, "path": "nowhere"}})
    result = _launch(in_tmp)
    # A dataset path that does not exist is a usage error, reported before training.
    assert result.exit_code == 2, result.output
    # The message names the missing folder.
    assert str(in_tmp / "nowhere") in result.output


def test_status_bad_config_exits_2(in_tmp: Path) -> None:
    write_studies(in_tmp, {"n_trials": -3})
    result = CliRunner().invoke(main, ["status", "tiny", "--config", str(in_tmp / "studies.yaml")])
    # Every command validates the file the same way.
    assert result.exit_code == 2
    # The message names the key.
    assert "studies.tiny.n_trials" in result.output


def test_launch_non_mapping_document_exits_2(in_tmp: Path) -> None:
    (in_tmp / "studies.yaml").write_text("- just\n- a list\n", encoding="utf-8")
    result = _launch(in_tmp)
    # A document of the wrong shape is a usage error, not a traceback.
    assert result.exit_code == 2
    # The message states what the top level must be.
    assert "top level must be a mapping" in result.output
