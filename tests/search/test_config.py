"""Tests of studies.yaml parsing, validation and override precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from search.config import (
    ConfigError,
    Overrides,
    apply_overrides,
    load_studies,
    parse_studies,
    redact_url,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def minimal_study(**changes: Any) -> dict[str, Any]:
    study: dict[str, Any] = {
        "dataset": {"path": "audio"},
        "search_space": {
            "family": {"choices": ["cnn", "crnn"]},
            "learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
            "batch_size": {"choices": [16, 32]},
        },
    }
    study.update(changes)
    return study


def parse(study: dict[str, Any], defaults: dict[str, Any] | None = None,
          base_dir: Path = Path("/project")) -> Any:
    document = {"studies": {"s": study}}
    if defaults is not None:
        document["defaults"] = defaults
    return parse_studies(document, base_dir=base_dir).get("s")


def problems_of(study: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(study)
    return str(caught.value)


def test_repository_studies_file_loads() -> None:
    studies = load_studies(REPO_ROOT / "studies.yaml")
    # The README's demo and the GTZAN studies must always parse.
    assert {"demo", "gtzan", "gtzan-filtered"} <= set(studies.studies)


def test_minimal_study_gets_code_defaults() -> None:
    study = parse(minimal_study())
    assert study.training.epochs == 10
    assert study.sampler.name == "tpe"
    assert study.pruner.name == "median"
    assert study.metric == "val_loss"
    assert study.direction == "minimize"
    assert study.dataset.path == Path("/project/audio")


def test_study_entry_overrides_defaults_deeply() -> None:
    defaults = {"training": {"epochs": 3, "seed": 7}, "sampler": {"name": "random"}}
    study = parse(minimal_study(training={"epochs": 5}), defaults=defaults)
    # The study's own epochs win, the seed comes from defaults.
    assert study.training.epochs == 5
    assert study.training.seed == 7
    assert study.sampler.name == "random"


def test_relative_sqlite_url_is_resolved_against_config_folder() -> None:
    study = parse(minimal_study(storage="sqlite:///runs/optuna.db"))
    assert study.storage == "sqlite:////project/runs/optuna.db"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"epochs": "ten"}, "studies.s.training.epochs"),
        ({"n_trials": 0}, "studies.s.n_trials"),
        ({"sampler": {"name": "grid"}}, "studies.s.sampler.name"),
        ({"pruner": {"name": "patient"}}, "studies.s.pruner.name"),
        ({"pruner": {"name": "median", "warmup": 3}}, "studies.s.pruner.warmup"),
        ({"device": "gpu"}, "studies.s.device"),
        ({"n_trial": 3}, "Did you mean `n_trials`?"),
        ({"metric": "accuracy"}, "studies.s.metric"),
    ],
)
def test_invalid_field_is_reported_with_key_path(changes: dict[str, Any], expected: str) -> None:
    message = problems_of(minimal_study(**changes))
    assert expected in message


def test_unknown_key_suggests_the_closest_name() -> None:
    study = minimal_study()
    study["search_space"]["learnin_rate"] = {"low": 0.1, "high": 0.2}
    message = problems_of(study)
    assert "studies.s.search_space.learnin_rate" in message
    assert "Did you mean `learning_rate`?" in message


def test_empty_range_names_both_bounds() -> None:
    study = minimal_study()
    study["search_space"]["learning_rate"] = {"low": 0.1, "high": 0.01}
    message = problems_of(study)
    assert "low=0.1 is above high=0.01" in message
    assert "Swap them" in message


def test_log_range_with_zero_lower_bound_is_rejected() -> None:
    study = minimal_study()
    study["search_space"]["learning_rate"] = {"low": 0.0, "high": 0.01, "log": True}
    message = problems_of(study)
    assert "studies.s.search_space.learning_rate.low" in message
    assert "log-scale range needs low > 0" in message


def test_empty_choices_are_rejected() -> None:
    study = minimal_study()
    study["search_space"]["batch_size"] = {"choices": []}
    assert "studies.s.search_space.batch_size.choices" in problems_of(study)


def test_unknown_model_family_lists_known_ones() -> None:
    study = minimal_study()
    study["search_space"]["family"] = {"choices": ["cnn", "transformer"]}
    message = problems_of(study)
    assert "unknown model family 'transformer'" in message
    assert "cnn, crnn" in message


def test_unknown_architecture_parameter_is_rejected() -> None:
    study = minimal_study()
    study["search_space"]["architectures"] = {"cnn": {"n_heads": {"low": 1, "high": 4}}}
    assert "studies.s.search_space.architectures.cnn.n_heads" in problems_of(study)


def test_all_problems_are_reported_together() -> None:
    study = minimal_study(epochs=0, device="tpu")
    with pytest.raises(ConfigError) as caught:
        parse(study)
    # Both mistakes appear, so the user fixes them in one round.
    assert len(caught.value.problems) == 2


def test_literal_password_in_storage_is_rejected_and_redacted() -> None:
    message = problems_of(minimal_study(storage="postgresql+psycopg://bob:hunter2@db/optuna"))
    assert "hunter2" not in message
    assert "bob:***@db" in message


def test_password_from_environment_reference_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    study = parse(minimal_study(storage="postgresql+psycopg://bob:${DB_PASSWORD}@db/optuna"))
    resolved = apply_overrides(study, Overrides(), base_dir=Path("/project"))
    # The reference is kept in the config and expanded only when the study is resolved.
    assert "${DB_PASSWORD}" in study.storage
    assert resolved.storage == "postgresql+psycopg://bob:s3cret@db/optuna"


def test_cli_override_beats_environment_beats_file(monkeypatch: pytest.MonkeyPatch) -> None:
    study = parse(minimal_study(device="cpu"))
    monkeypatch.setenv("GENRE_SEARCH_DEVICE", "cuda:1")
    from_environment = apply_overrides(study, Overrides(), base_dir=Path("/project"))
    from_flag = apply_overrides(study, Overrides(device="cuda:2"), base_dir=Path("/project"))
    assert from_environment.device == "cuda:1"
    assert from_flag.device == "cuda:2"


def test_data_override_replaces_synthetic_dataset(tmp_path: Path) -> None:
    study = parse(minimal_study(dataset={"synthetic": {"n_genres": 3}}))
    resolved = apply_overrides(study, Overrides(data=tmp_path), base_dir=tmp_path)
    assert resolved.dataset.path == tmp_path.resolve()
    assert resolved.dataset.synthetic is None


def test_unknown_study_name_lists_known_studies(tmp_path: Path) -> None:
    path = tmp_path / "studies.yaml"
    path.write_text(yaml.safe_dump({"studies": {"alpha": minimal_study(),
                                                "beta": minimal_study()}}))
    studies = load_studies(path)
    with pytest.raises(ConfigError) as caught:
        studies.get("gamma")
    assert "Known studies: alpha, beta" in str(caught.value)


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "studies.yaml"
    path.write_text("studies:\n  s:\n    dataset: {path: audio\n    n_trials: 3\n")
    with pytest.raises(ConfigError) as caught:
        load_studies(path)
    assert "invalid YAML at line" in str(caught.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_studies(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(caught.value)
    assert "--config" in str(caught.value)


def test_split_lists_need_train_and_valid() -> None:
    message = problems_of(minimal_study(dataset={"path": "a", "split": {"method": "lists"}}))
    assert "studies.s.dataset.split.train" in message
    assert "studies.s.dataset.split.valid" in message


def test_redact_url_hides_only_the_password() -> None:
    redacted = redact_url("postgresql+psycopg://user:pa:ss@host:5432/db")
    assert redacted == "postgresql+psycopg://user:***@host:5432/db"


def test_f_max_above_nyquist_is_rejected() -> None:
    study = minimal_study(features={"f_max": 11025.0},
                          dataset={"path": "audio", "sample_rate": 16000})
    message = problems_of(study)
    assert "studies.s.features.f_max" in message
    assert "at most 8000 Hz" in message


def test_architecture_value_the_model_rejects_fails_at_load() -> None:
    study = minimal_study()
    study["search_space"]["architectures"] = {"cnn": {"n_conv_layers": {"low": 2, "high": 12}}}
    message = problems_of(study)
    # Twelve halvings would pool 96 mel bands away; the range is rejected before any trial.
    assert "studies.s.search_space.architectures.cnn.n_conv_layers" in message
    assert "n_conv_layers=12" in message


def test_step_larger_than_range_is_rejected() -> None:
    study = minimal_study()
    study["search_space"]["dropout"] = {"low": 0.0, "high": 0.4, "step": 0.7}
    message = problems_of(study)
    assert "studies.s.search_space.dropout.step" in message
    assert "step=0.7 is larger than the range" in message


def test_unknown_fatal_error_name_is_rejected() -> None:
    message = problems_of(minimal_study(training={"fatal_errors": ["MemoryEror"]}))
    assert "studies.s.training.fatal_errors" in message
    assert "Did you mean `MemoryError`?" in message


def test_known_fatal_error_names_are_accepted() -> None:
    study = parse(minimal_study(training={"fatal_errors": ["OutOfMemoryError",
                                                            "NonFiniteLossError"]}))
    assert study.training.fatal_errors == ("OutOfMemoryError", "NonFiniteLossError")


def test_hyperband_min_resource_zero_is_rejected() -> None:
    message = problems_of(minimal_study(pruner={"name": "hyperband", "min_resource": 0}))
    assert "studies.s.pruner.min_resource" in message


def test_mistake_in_defaults_is_reported_once_under_defaults() -> None:
    document = {
        "defaults": {"sampler": {"name": "grid"}},
        "studies": {"a": minimal_study(), "b": minimal_study()},
    }
    with pytest.raises(ConfigError) as caught:
        parse_studies(document, base_dir=Path("/project"))
    # One problem, at the key the user wrote, not one per study.
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("defaults.sampler.name:")


def test_studies_as_list_says_mapping_expected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_studies({"studies": ["demo"]}, base_dir=Path("/project"))
    assert "must be a mapping of study names" in str(caught.value)


def test_tracking_password_hint_names_tracking_variable() -> None:
    message = problems_of(minimal_study(tracking_uri="http://bob:s3cret@mlflow:5000"))
    assert "GENRE_SEARCH_TRACKING_URI" in message
    assert "s3cret" not in message


def test_user_defined_fatal_error_is_accepted_with_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="search.config"):
        study = parse(minimal_study(training={"fatal_errors": ["LabelMismatchError"]}))
    # The user's own exception classes are allowed, with a note that nothing else matches.
    assert study.training.fatal_errors == ("LabelMismatchError",)
    assert "LabelMismatchError" in caplog.text


def test_block_of_unsearched_known_family_is_allowed() -> None:
    study = minimal_study()
    study["search_space"]["family"] = "cnn"
    study["search_space"]["architectures"] = {"crnn": {"rnn_layers": {"low": 1, "high": 2}}}
    # `defaults` may hold every family's ranges; a CNN-only study ignores the CRNN block.
    assert parse(study).search_space.families() == ("cnn",)


def test_block_of_unknown_family_is_rejected() -> None:
    study = minimal_study()
    study["search_space"]["architectures"] = {"cnnn": {}}
    message = problems_of(study)
    assert "studies.s.search_space.architectures.cnnn" in message
    assert "unknown model family 'cnnn'" in message


@pytest.mark.parametrize("value", [0, "one", True, 2.5])
def test_invalid_segments_per_track_is_rejected(value: Any) -> None:
    message = problems_of(minimal_study(training={"segments_per_track": value}))
    assert "studies.s.training.segments_per_track" in message
