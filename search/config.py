"""Typed configuration of studies, parsed and validated from ``studies.yaml``.

The file has a ``defaults`` block and a ``studies`` mapping. Each study entry is deep-merged
over ``defaults`` and parsed into frozen dataclasses. Validation happens entirely at load
time: every problem is collected with its YAML key path, the offending value and the fix,
and :class:`ConfigError` lists them all before anything runs or is written.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from models import family_parameters, model_families

SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
DIRECTIONS = ("minimize", "maximize")
METRICS = {"val_loss": "minimize", "val_accuracy": "maximize"}
SPLIT_METHODS = ("random", "lists")
COMMON_PARAMETERS = ("learning_rate", "batch_size", "dropout", "weight_decay", "optimizer")
DEFAULT_COMMON_VALUES: dict[str, Any] = {"dropout": 0.0, "weight_decay": 0.0, "optimizer": "adam"}

_logger = logging.getLogger(__name__)

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """Invalid ``studies.yaml`` content, with every problem found.

    Attributes:
        problems: One line per problem: key path, value and fix.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}")


class _Invalid(Exception):
    """One problem at one key path; collected into a ConfigError."""


# --------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticDataConfig:
    """A generated dataset, written to the cache folder on first use."""

    n_genres: int = 4
    tracks_per_genre: int = 10
    seconds: float = 8.0
    seed: int = 0


@dataclass(frozen=True)
class SplitConfig:
    """Train, validation and test split of the tracks."""

    method: str = "random"
    valid_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    train: Path | None = None
    valid: Path | None = None
    test: Path | None = None


@dataclass(frozen=True)
class DatasetConfig:
    """Audio source of a study and the length of its segments.

    Attributes:
        path: Folder of audio in genre sub-folders, or ``None`` with ``synthetic`` set.
        synthetic: Settings of a generated dataset, used when ``path`` is ``None``.
        sample_rate: Rate every file is resampled to, in Hz.
        segment_seconds: Length of the fixed segments cut from each track, in seconds.
        split: Train/validation/test split by track.
    """

    path: Path | None = None
    synthetic: SyntheticDataConfig | None = None
    sample_rate: int = 22050
    segment_seconds: float = 3.0
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel spectrogram settings (STFT sizes in samples, frequencies in Hz)."""

    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 96
    f_min: float = 0.0
    f_max: float | None = None


@dataclass(frozen=True)
class ParamSpec:
    """One searched (or fixed) hyperparameter.

    ``kind`` is ``float``, ``int``, ``categorical`` or ``fixed``, or ``invalid`` for a
    parameter whose problem was already reported.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None


@dataclass(frozen=True)
class SearchSpace:
    """The study's search space: the model family, shared and per-family parameters."""

    family: ParamSpec
    common: tuple[ParamSpec, ...]
    architectures: Mapping[str, tuple[ParamSpec, ...]]

    def families(self) -> tuple[str, ...]:
        """Return the model families this space can sample."""
        if self.family.kind == "fixed":
            return (str(self.family.value),)
        return tuple(str(choice) for choice in self.family.choices)


@dataclass(frozen=True)
class SamplerConfig:
    """Optuna sampler name, seed and extra keyword arguments."""

    name: str = "tpe"
    seed: int | None = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerConfig:
    """Optuna pruner name and its keyword arguments."""

    name: str = "median"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingConfig:
    """Training settings shared by every trial.

    Attributes:
        epochs: Epochs per trial (the pruner may stop a trial earlier).
        seed: Base seed; trial ``n`` trains with ``seed + n``.
        num_threads: torch intra-op threads per worker, ``None`` for torch's default.
        mixed_precision: bfloat16 autocast on CUDA devices.
        channels_last: channels-last memory format on CUDA devices.
        compile: Wrap the model with ``torch.compile``.
        fatal_errors: Exception class names that stop the whole study instead of
            failing one trial.
        segments_per_track: Cached segments of each training track drawn at random for
            every epoch, ``None`` to train on every segment. Validation always uses every
            segment.
    """

    epochs: int = 10
    seed: int = 0
    num_threads: int | None = None
    mixed_precision: bool = True
    channels_last: bool = True
    compile: bool = False
    fatal_errors: tuple[str, ...] = ()
    segments_per_track: int | None = None


@dataclass(frozen=True)
class StudyConfig:
    """Everything needed to run one study, resolved from ``studies.yaml`` and overrides."""

    name: str
    description: str
    dataset: DatasetConfig
    features: FeatureConfig
    search_space: SearchSpace
    training: TrainingConfig
    sampler: SamplerConfig
    pruner: PrunerConfig
    direction: str
    metric: str
    n_trials: int | None
    timeout: float | None
    storage: str
    tracking_uri: str
    experiment_name: str
    cache_dir: Path
    device: str
    registered_model_name: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class StudiesFile:
    """A loaded ``studies.yaml``."""

    path: Path
    studies: Mapping[str, StudyConfig]

    def get(self, name: str) -> StudyConfig:
        """Return the study called ``name``.

        Raises:
            ConfigError: No study has that name; the message lists the known ones.
        """
        if name not in self.studies:
            known = ", ".join(sorted(self.studies)) or "(none)"
            raise ConfigError(
                str(self.path),
                [f"study={name!r} is not defined. Known studies: {known}. "
                 f"Add it under `studies:` or pick one of these."],
            )
        return self.studies[name]


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line or through environment variables."""

    n_trials: int | None = None
    timeout: float | None = None
    device: str | None = None
    data: Path | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    cache_dir: Path | None = None


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_studies(path: str | os.PathLike[str]) -> StudiesFile:
    """Load and validate every study of a ``studies.yaml`` file.

    Args:
        path: The YAML file. Relative paths inside it are resolved against its folder.

    Raises:
        ConfigError: The file is missing, is not valid YAML, or any study is invalid.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(
            source,
            [f"config file not found: path={str(path)!r}. Create it (see the README's "
             f"studies.yaml reference) or pass --config PATH / set GENRE_SEARCH_CONFIG."],
        )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(source, [_describe_yaml_error(error)]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(source, [f"file is not UTF-8 text ({error.reason}). "
                                   f"Save it as UTF-8."]) from None
    return parse_studies(document, base_dir=path.resolve().parent, source=source)


def parse_studies(document: Any, *, base_dir: Path, source: str = "studies.yaml") -> StudiesFile:
    """Validate an already parsed YAML document; see :func:`load_studies`."""
    problems: list[str] = []
    if not isinstance(document, Mapping):
        raise ConfigError(source, [
            f"top level must be a mapping with `defaults` and `studies`, "
            f"got {type(document).__name__}. Start the file with `studies:`."
        ])
    unknown = sorted(set(map(str, document)) - {"defaults", "studies"})
    for key in unknown:
        problems.append(f"{key}: unknown top-level key. Allowed keys: defaults, studies.")
    defaults = document.get("defaults") or {}
    studies = document.get("studies")
    if not isinstance(defaults, Mapping):
        problems.append(f"defaults: must be a mapping, got {_show(defaults)}.")
        defaults = {}
    if studies is not None and not isinstance(studies, Mapping):
        problems.append(f"studies: must be a mapping of study names to entries, got "
                        f"{_show(studies)}. Write `studies:` then each name with its keys "
                        f"indented below it.")
        studies = {}
    elif not studies:
        problems.append("studies: missing or empty. Define at least one study under `studies:`.")
        studies = {}

    parsed: dict[str, StudyConfig] = {}
    for name, entry in studies.items():
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            problems.append(f"studies.{name}: must be a mapping, got {_show(entry)}.")
            continue
        merged = _deep_merge(defaults, entry)
        study_problems: list[str] = []
        context = _Context(f"studies.{name}", study_problems, base_dir)
        study = _parse_study(str(name), merged, context)
        if study is not None:
            parsed[str(name)] = study
        for problem in study_problems:
            attributed = _attribute_to_defaults(problem, str(name), entry, defaults)
            if attributed not in problems:
                problems.append(attributed)
    if problems:
        raise ConfigError(source, problems)
    return StudiesFile(path=base_dir / Path(source).name, studies=parsed)


def _attribute_to_defaults(
    problem: str, name: str, entry: Mapping[str, Any], defaults: Mapping[str, Any]
) -> str:
    """Report a problem under ``defaults.`` when the offending key comes from that block.

    Each study is validated after merging ``defaults`` into it, so without this a mistake
    in ``defaults`` would be reported once per study, under keys the user never wrote there.
    """
    prefix = f"studies.{name}."
    key_path, separator, message = problem.partition(": ")
    if not separator or not key_path.startswith(prefix):
        return problem
    keys = key_path[len(prefix):].split(".")
    in_entry, in_defaults = entry, defaults
    for key in keys:
        if isinstance(in_entry, Mapping) and key in in_entry:
            in_entry = in_entry[key]
            in_defaults = in_defaults.get(key) if isinstance(in_defaults, Mapping) else None
            continue
        if isinstance(in_defaults, Mapping) and key in in_defaults:
            return f"defaults.{'.'.join(keys)}: {message}"
        return problem
    return problem


def apply_overrides(study: StudyConfig, overrides: Overrides, *, base_dir: Path) -> StudyConfig:
    """Apply CLI flags and environment variables over a study, in the documented order.

    CLI values in ``overrides`` win over the environment, which wins over the file.
    """
    from search import settings

    storage = overrides.storage or settings.STORAGE.get()
    tracking_uri = overrides.tracking_uri or settings.TRACKING_URI.get()
    data = overrides.data or _optional_path(settings.DATA.get())
    cache_dir = overrides.cache_dir or _optional_path(settings.CACHE_DIR.get())
    device = overrides.device or settings.DEVICE.get()

    changes: dict[str, Any] = {
        "storage": expand_env(
            resolve_database_url(storage, base_dir=Path.cwd()) if storage else study.storage
        ),
        "tracking_uri": expand_env(
            resolve_database_url(tracking_uri, base_dir=Path.cwd())
            if tracking_uri else study.tracking_uri
        ),
    }
    if cache_dir:
        changes["cache_dir"] = cache_dir.resolve()
    if device:
        try:
            changes["device"] = _device(device)
        except _Invalid as error:
            source = "--device" if overrides.device else "GENRE_SEARCH_DEVICE"
            raise ConfigError(source, [str(error)]) from None
    if overrides.n_trials is not None:
        changes["n_trials"] = overrides.n_trials
    if overrides.timeout is not None:
        changes["timeout"] = overrides.timeout
    if data:
        changes["dataset"] = replace(study.dataset, path=data.resolve(), synthetic=None)
    return replace(study, **changes)


# --------------------------------------------------------------------------------------
# Study parsing
# --------------------------------------------------------------------------------------


@dataclass
class _Context:
    path: str
    problems: list[str]
    base_dir: Path

    def child(self, key: str) -> _Context:
        return _Context(f"{self.path}.{key}", self.problems, self.base_dir)

    def report(self, message: str) -> None:
        self.problems.append(f"{self.path}: {message}")


_STUDY_KEYS = {
    "description", "dataset", "features", "search_space", "training", "epochs", "sampler",
    "pruner", "direction", "metric", "n_trials", "timeout", "storage", "tracking_uri",
    "experiment_name", "cache_dir", "device", "registered_model_name",
}


def _parse_study(name: str, entry: Mapping[str, Any], context: _Context) -> StudyConfig | None:
    n_before = len(context.problems)
    _reject_unknown(entry, _STUDY_KEYS, context)

    training_value = entry.get("training") or {}
    if not isinstance(training_value, Mapping):
        context.child("training").report(
            f"must be a mapping, got {_show(training_value)}. "
            f"Write e.g. `training: {{epochs: 10}}`."
        )
        training_value = {}
    training_entry = dict(training_value)
    if "epochs" in entry:
        training_entry.setdefault("epochs", entry["epochs"])
    metric = _field(entry, "metric", context, _choice(tuple(METRICS)), "val_loss")
    direction = _field(entry, "direction", context, _choice(DIRECTIONS), METRICS.get(metric, "minimize"))
    if metric in METRICS and direction != METRICS[metric]:
        context.child("direction").report(
            f"direction={direction!r} does not fit metric={metric!r}. "
            f"Use direction: {METRICS[metric]}."
        )

    values = dict(
        name=name,
        description=_field(entry, "description", context, _string, ""),
        dataset=_parse_dataset(entry.get("dataset"), context.child("dataset")),
        features=_parse_features(entry.get("features") or {}, context.child("features")),
        search_space=_parse_search_space(entry.get("search_space"), context.child("search_space")),
        training=_parse_training(training_entry, context.child("training")),
        sampler=_parse_sampler(entry.get("sampler") or {}, context.child("sampler")),
        pruner=_parse_pruner(entry.get("pruner") or {}, context.child("pruner")),
        direction=direction,
        metric=metric,
        n_trials=_field(entry, "n_trials", context, _optional(_integer(minimum=1)), None),
        timeout=_field(entry, "timeout", context, _optional(_number(minimum=0.0, exclusive=True)), None),
        storage=_field(entry, "storage", context, _storage_url, "sqlite:///genre-search.db"),
        tracking_uri=_field(entry, "tracking_uri", context, _tracking_uri, "sqlite:///mlflow.db"),
        experiment_name=_field(entry, "experiment_name", context, _string, name),
        cache_dir=_field(entry, "cache_dir", context, _path, Path(".genre-search/cache")),
        device=_field(entry, "device", context, _device, "auto"),
        registered_model_name=_field(
            entry, "registered_model_name", context, _string, f"genre-search-{name}"
        ),
        raw=_plain(entry),
    )
    if len(context.problems) == n_before:
        _check_frequencies(values["dataset"], values["features"], context.child("features"))
        _check_architectures(values["search_space"], values["features"].n_mels,
                             context.child("search_space").child("architectures"))
        _check_fatal_errors(values["training"].fatal_errors,
                            context.child("training").child("fatal_errors"))
    if len(context.problems) > n_before:
        return None
    values["storage"] = resolve_database_url(values["storage"], base_dir=context.base_dir)
    values["tracking_uri"] = resolve_database_url(values["tracking_uri"], base_dir=context.base_dir)
    values["cache_dir"] = _absolute(values["cache_dir"], context.base_dir)
    return StudyConfig(**values)


def _check_frequencies(dataset: DatasetConfig, features: FeatureConfig, context: _Context) -> None:
    nyquist = dataset.sample_rate / 2
    if features.f_max is not None and features.f_max > nyquist:
        context.child("f_max").report(
            f"f_max={features.f_max:g} Hz is above half the sample rate "
            f"(dataset.sample_rate={dataset.sample_rate}, so at most {nyquist:g} Hz). "
            f"Lower f_max or remove it to use {nyquist:g} Hz."
        )
    if features.f_min >= nyquist:
        context.child("f_min").report(
            f"f_min={features.f_min:g} Hz is not below half the sample rate "
            f"({nyquist:g} Hz for dataset.sample_rate={dataset.sample_rate}). Lower f_min."
        )


def _check_architectures(space: SearchSpace, n_mels: int, context: _Context) -> None:
    """Build each family's model at every extreme of its ranges, so that values the model
    rejects (a depth that pools the mel axis away, a layer count of 0) fail at load time."""
    from models import build_model

    for family, specs in space.architectures.items():
        for spec in specs:
            for value in _extreme_values(spec):
                try:
                    build_model(family, n_classes=2, n_mels=n_mels, params={spec.name: value})
                except (ValueError, TypeError) as error:
                    context.child(family).child(spec.name).report(
                        f"{spec.name}={value!r} is rejected by the {family} model with "
                        f"features.n_mels={n_mels}: {error} Narrow the range or the choices."
                    )
                    break


def _extreme_values(spec: ParamSpec) -> tuple[Any, ...]:
    if spec.kind == "categorical":
        return spec.choices
    if spec.kind == "fixed":
        return (spec.value,)
    if spec.kind in ("int", "float"):
        return (spec.low, spec.high)
    return ()


def _check_fatal_errors(names: tuple[str, ...], context: _Context) -> None:
    """Reject misspelled exception names; accept other names, which may be the user's own.

    A name that is not a built-in, torch or genre-search exception but is very close to one
    is almost surely a typo, and a typo would silently make a fatal error non-fatal.
    """
    import difflib

    known = _exception_names()
    for name in names:
        if not name.isidentifier():
            context.report(f"fatal_errors entry {name!r} is not a class name. Write the "
                           f"exception's class name, e.g. OutOfMemoryError.")
            continue
        if name in known:
            continue
        typo = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.88)
        if typo:
            context.report(f"fatal_errors entry {name!r} is not a known exception class. "
                           f"Did you mean `{typo[0]}`?")
            continue
        _logger.warning("%s: fatal_errors entry %r is not a built-in, torch or genre-search "
                        "exception; it matches only an exception class of that name raised "
                        "by your own code", context.path, name)


def _exception_names() -> set[str]:
    import builtins

    import torch

    import features
    from search import training

    names: set[str] = set()
    for module in (builtins, torch, features, training):
        for attribute in dir(module):
            value = getattr(module, attribute, None)
            if isinstance(value, type) and issubclass(value, BaseException):
                names.add(attribute)
    return names


def _parse_dataset(entry: Any, context: _Context) -> DatasetConfig:
    if entry is None:
        context.report("missing. Give `dataset: {path: FOLDER}` or `dataset: {synthetic: {}}`.")
        return DatasetConfig()
    if not isinstance(entry, Mapping):
        context.report(f"must be a mapping, got {_show(entry)}.")
        return DatasetConfig()
    _reject_unknown(entry, {"path", "synthetic", "sample_rate", "segment_seconds", "split"}, context)
    path = _field(entry, "path", context, _optional(_path), None)
    synthetic = None
    if "synthetic" in entry:
        synthetic = _parse_synthetic(entry["synthetic"] or {}, context.child("synthetic"))
    if path is None and synthetic is None:
        context.report("needs `path` (a folder of audio in genre sub-folders) or `synthetic`; "
                       "or pass --data PATH on the command line.")
    split = _parse_split(entry.get("split") or {}, context.child("split"))
    return DatasetConfig(
        path=_absolute(path, context.base_dir) if path is not None else None,
        synthetic=synthetic if path is None else None,
        sample_rate=_field(entry, "sample_rate", context, _integer(minimum=1000, maximum=192000), 22050),
        segment_seconds=_field(entry, "segment_seconds", context,
                               _number(minimum=0.1, maximum=120.0), 3.0),
        split=split,
    )


def _parse_synthetic(entry: Any, context: _Context) -> SyntheticDataConfig | None:
    if not isinstance(entry, Mapping):
        context.report(f"must be a mapping, got {_show(entry)}.")
        return None
    _reject_unknown(entry, {"n_genres", "tracks_per_genre", "seconds", "seed"}, context)
    return SyntheticDataConfig(
        n_genres=_field(entry, "n_genres", context, _integer(minimum=2, maximum=8), 4),
        tracks_per_genre=_field(entry, "tracks_per_genre", context, _integer(minimum=2), 10),
        seconds=_field(entry, "seconds", context, _number(minimum=0.5, maximum=600.0), 8.0),
        seed=_field(entry, "seed", context, _integer(), 0),
    )


def _parse_split(entry: Any, context: _Context) -> SplitConfig:
    if not isinstance(entry, Mapping):
        context.report(f"must be a mapping, got {_show(entry)}.")
        return SplitConfig()
    keys = {"method", "valid_fraction", "test_fraction", "seed", "train", "valid", "test"}
    _reject_unknown(entry, keys, context)
    method = _field(entry, "method", context, _choice(SPLIT_METHODS), "random")
    fraction = _number(minimum=0.0, maximum=0.9)
    split = SplitConfig(
        method=method,
        valid_fraction=_field(entry, "valid_fraction", context, fraction, 0.2),
        test_fraction=_field(entry, "test_fraction", context, fraction, 0.0),
        seed=_field(entry, "seed", context, _integer(), 0),
        train=_field(entry, "train", context, _optional(_path), None),
        valid=_field(entry, "valid", context, _optional(_path), None),
        test=_field(entry, "test", context, _optional(_path), None),
    )
    if method == "random" and split.valid_fraction + split.test_fraction >= 0.9:
        context.report(
            f"valid_fraction + test_fraction = {split.valid_fraction + split.test_fraction:g} "
            f"leaves too little to train on. Keep their sum below 0.9."
        )
    if method == "random" and split.valid_fraction <= 0:
        context.child("valid_fraction").report(
            "valid_fraction=0 leaves no validation data for the pruner. Use a value such as 0.2."
        )
    if method == "lists":
        for key in ("train", "valid"):
            if getattr(split, key) is None:
                context.child(key).report(f"missing: method=lists needs a `{key}` list file.")
        split = replace(
            split,
            train=_absolute(split.train, context.base_dir),
            valid=_absolute(split.valid, context.base_dir),
            test=_absolute(split.test, context.base_dir),
        )
    return split


def _parse_features(entry: Any, context: _Context) -> FeatureConfig:
    if not isinstance(entry, Mapping):
        context.report(f"must be a mapping, got {_show(entry)}.")
        return FeatureConfig()
    _reject_unknown(entry, {"n_fft", "hop_length", "n_mels", "f_min", "f_max"}, context)
    features = FeatureConfig(
        n_fft=_field(entry, "n_fft", context, _integer(minimum=16, maximum=16384), 1024),
        hop_length=_field(entry, "hop_length", context, _integer(minimum=1, maximum=16384), 512),
        n_mels=_field(entry, "n_mels", context, _integer(minimum=8, maximum=512), 96),
        f_min=_field(entry, "f_min", context, _number(minimum=0.0), 0.0),
        f_max=_field(entry, "f_max", context, _optional(_number(minimum=0.0, exclusive=True)), None),
    )
    if features.f_max is not None and features.f_max <= features.f_min:
        context.child("f_max").report(
            f"f_max={features.f_max:g} is not above f_min={features.f_min:g}. "
            f"Raise f_max or remove it to use half the sample rate."
        )
    if features.hop_length > features.n_fft:
        context.child("hop_length").report(
            f"hop_length={features.hop_length} exceeds n_fft={features.n_fft}, so samples "
            f"between frames are never analysed. Use hop_length <= n_fft (often n_fft / 2)."
        )
    return features


def _parse_training(entry: Mapping[str, Any], context: _Context) -> TrainingConfig:
    keys = {"epochs", "seed", "num_threads", "mixed_precision", "channels_last", "compile",
            "fatal_errors", "segments_per_track"}
    _reject_unknown(entry, keys, context)
    return TrainingConfig(
        epochs=_field(entry, "epochs", context, _integer(minimum=1, maximum=100000), 10),
        seed=_field(entry, "seed", context, _integer(), 0),
        num_threads=_field(entry, "num_threads", context, _optional(_integer(minimum=1)), None),
        mixed_precision=_field(entry, "mixed_precision", context, _boolean, True),
        channels_last=_field(entry, "channels_last", context, _boolean, True),
        compile=_field(entry, "compile", context, _boolean, False),
        fatal_errors=tuple(_field(entry, "fatal_errors", context, _string_list, [])),
        segments_per_track=_field(entry, "segments_per_track", context,
                                  _optional(_segments_per_track), None),
    )


def _segments_per_track(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(f"segments_per_track={_show(value)} is invalid. Use an integer of at "
                       f"least 1, or null to train on every segment of each track.")
    return value


_SAMPLER_OPTIONS = {
    "tpe": {"n_startup_trials": int, "multivariate": bool, "constant_liar": bool, "group": bool},
    "random": {},
    "cmaes": {"n_startup_trials": int, "sigma0": float, "restart_strategy": str},
}
# Smallest values Optuna accepts for integer options; the others accept 0.
_OPTION_MINIMUMS = {"min_resource": 1, "max_resource": 1, "reduction_factor": 2,
                    "interval_steps": 1}

_PRUNER_OPTIONS = {
    "median": {"n_startup_trials": int, "n_warmup_steps": int, "interval_steps": int},
    "successive_halving": {"min_resource": int, "reduction_factor": int,
                           "min_early_stopping_rate": int},
    "hyperband": {"min_resource": int, "max_resource": int, "reduction_factor": int},
    "none": {},
}


def _parse_sampler(entry: Any, context: _Context) -> SamplerConfig:
    if not isinstance(entry, Mapping):
        context.report(f"must be a mapping, got {_show(entry)}.")
        return SamplerConfig()
    name = _field(entry, "name", context, _choice(SAMPLERS), "tpe")
    seed = _field(entry, "seed", context, _optional(_integer()), 0)
    options = _parse_options(entry, _SAMPLER_OPTIONS.get(name, {}), {"name", "seed"}, context)
    return SamplerConfig(name=name, seed=seed, options=options)


def _parse_pruner(entry: Any, context: _Context) -> PrunerConfig:
    if not isinstance(entry, Mapping):
        context.report(f"must be a mapping, got {_show(entry)}.")
        return PrunerConfig()
    name = _field(entry, "name", context, _choice(PRUNERS), "median")
    options = _parse_options(entry, _PRUNER_OPTIONS.get(name, {}), {"name"}, context)
    return PrunerConfig(name=name, options=options)


def _parse_options(
    entry: Mapping[str, Any], allowed: Mapping[str, type], reserved: set[str], context: _Context
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in entry.items():
        if key in reserved:
            continue
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "(none)"
            context.child(str(key)).report(
                f"unknown option for name={entry.get('name')!r}. Allowed options: {names}."
            )
            continue
        minimum = _OPTION_MINIMUMS.get(key, 0)
        parser = {int: _integer(minimum=minimum), float: _number(), bool: _boolean,
                  str: _string}
        options[key] = _field(entry, key, context, parser[allowed[key]], None)
    return options


# --------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------


def _parse_search_space(entry: Any, context: _Context) -> SearchSpace:
    fallback_family = ParamSpec(name="family", kind="fixed", value="cnn")
    fallback = SearchSpace(family=fallback_family, common=(), architectures={})
    if not isinstance(entry, Mapping):
        context.report(
            f"missing or not a mapping (got {_show(entry)}). Declare at least `family` and "
            f"`learning_rate`; see the README's studies.yaml reference."
        )
        return fallback
    _reject_unknown(entry, {"family", *COMMON_PARAMETERS, "architectures"}, context)

    family = _parse_param("family", entry.get("family", "cnn"), context.child("family"))
    families = _family_names(family)
    for name in families:
        # Read the registry now, not at import, so families registered later are known.
        if name not in model_families():
            context.child("family").report(
                f"unknown model family {name!r}. Known families: {', '.join(model_families())}."
            )
    common: list[ParamSpec] = []
    for name in COMMON_PARAMETERS:
        if name not in entry and name not in DEFAULT_COMMON_VALUES:
            context.child(name).report(
                f"missing. Give a range such as `{name}: {_EXAMPLES[name]}` or a fixed value."
            )
            continue
        value = entry.get(name, DEFAULT_COMMON_VALUES.get(name))
        common.append(_parse_param(name, value, context.child(name)))
    _check_common_values(common, context)

    architectures = _parse_architectures(entry.get("architectures") or {}, families,
                                         context.child("architectures"))
    return SearchSpace(family=family, common=tuple(common), architectures=architectures)


_EXAMPLES = {
    "learning_rate": "{low: 1.0e-4, high: 1.0e-2, log: true}",
    "batch_size": "{choices: [16, 32, 64]}",
}


def _family_names(family: ParamSpec) -> tuple[str, ...]:
    if family.kind == "fixed":
        return (str(family.value),)
    if family.kind == "categorical":
        return tuple(str(choice) for choice in family.choices)
    return ()


def _check_common_values(common: list[ParamSpec], context: _Context) -> None:
    by_name = {spec.name: spec for spec in common}
    checks: dict[str, Callable[[Any], bool]] = {
        "learning_rate": lambda value: isinstance(value, (int, float)) and value > 0,
        "batch_size": lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        "dropout": lambda value: isinstance(value, (int, float)) and 0 <= value < 1,
        "weight_decay": lambda value: isinstance(value, (int, float)) and value >= 0,
        "optimizer": lambda value: value in OPTIMIZERS,
    }
    hints = {
        "learning_rate": "a positive number",
        "batch_size": "a positive integer",
        "dropout": "a number in [0, 1)",
        "weight_decay": "a number >= 0",
        "optimizer": f"one of {', '.join(OPTIMIZERS)}",
    }
    for name, check in checks.items():
        spec = by_name.get(name)
        if spec is None:
            continue
        for value in _spec_values(spec):
            if not check(value):
                context.child(name).report(f"{name}={value!r} is invalid: use {hints[name]}.")


def _spec_values(spec: ParamSpec) -> tuple[Any, ...]:
    if spec.kind == "invalid":
        return ()  # Its problem is already reported.
    if spec.kind == "fixed":
        return (spec.value,)
    if spec.kind == "categorical":
        return spec.choices
    return (spec.low, spec.high)


def _parse_architectures(
    entry: Any, families: tuple[str, ...], context: _Context
) -> dict[str, tuple[ParamSpec, ...]]:
    if not isinstance(entry, Mapping):
        context.report(f"must be a mapping of family name to parameters, got {_show(entry)}.")
        return {}
    for name in entry:
        # Blocks of known families that this study does not search are allowed, so that
        # `defaults` can hold the ranges of every family.
        if name not in model_families():
            context.child(str(name)).report(
                f"unknown model family {name!r}. Known families: "
                f"{', '.join(model_families())}. Rename or remove this block."
            )
    architectures: dict[str, tuple[ParamSpec, ...]] = {}
    for family in families:
        if family not in model_families():
            continue
        block = entry.get(family) or {}
        family_context = context.child(family)
        if not isinstance(block, Mapping):
            family_context.report(f"must be a mapping, got {_show(block)}.")
            continue
        accepted = set(family_parameters(family)) - {"dropout"}
        _reject_unknown(block, accepted, family_context)
        architectures[family] = tuple(
            _parse_param(str(name), value, family_context.child(str(name)))
            for name, value in block.items() if name in accepted
        )
    return architectures


def _parse_param(name: str, value: Any, context: _Context) -> ParamSpec:
    if not isinstance(value, Mapping):
        if isinstance(value, (list, tuple)):
            context.report(f"a bare list {_show(value)}: write `{{choices: {list(value)}}}`.")
        return ParamSpec(name=name, kind="fixed", value=value)
    _reject_unknown(value, {"type", "low", "high", "log", "step", "choices"}, context)
    kind = value.get("type")
    if kind is None:
        kind = "categorical" if "choices" in value else _infer_range_type(value)
    if kind not in ("float", "int", "categorical"):
        context.child("type").report(f"type={kind!r} is not one of float, int, categorical.")
        return ParamSpec(name=name, kind="invalid")
    if kind == "categorical":
        return _parse_categorical(name, value, context)
    return _parse_range(name, kind, value, context)


def _infer_range_type(value: Mapping[str, Any]) -> str:
    bounds = [value.get("low"), value.get("high"), value.get("step")]
    if all(isinstance(bound, int) and not isinstance(bound, bool) for bound in bounds if bound is not None):
        return "int"
    return "float"


def _parse_categorical(name: str, value: Mapping[str, Any], context: _Context) -> ParamSpec:
    choices = value.get("choices")
    for key in ("low", "high", "log", "step"):
        if key in value:
            context.child(key).report(f"`{key}` has no meaning with `choices`. Remove it.")
    if not isinstance(choices, (list, tuple)) or not choices:
        context.child("choices").report(
            f"choices={_show(choices)} must be a non-empty list, e.g. `choices: [16, 32]`."
        )
        return ParamSpec(name=name, kind="invalid")
    for choice in choices:
        if not isinstance(choice, (bool, int, float, str)) or choice is None:
            context.child("choices").report(
                f"choice {_show(choice)} is not a number, string or boolean."
            )
    if len(set(map(repr, choices))) != len(choices):
        context.child("choices").report(f"choices={list(choices)} repeats a value. List each once.")
    return ParamSpec(name=name, kind="categorical", choices=tuple(choices))


def _parse_range(name: str, kind: str, value: Mapping[str, Any], context: _Context) -> ParamSpec:
    number = _integer() if kind == "int" else _number()
    low = _field(value, "low", context, number, None, required=True)
    high = _field(value, "high", context, number, None, required=True)
    log = _field(value, "log", context, _boolean, False)
    step = _field(value, "step", context, _optional(_number(minimum=0.0, exclusive=True)), None)
    if "choices" in value:
        context.child("choices").report("`choices` cannot be combined with `low`/`high`. Remove one.")
    if low is None or high is None:
        return ParamSpec(name=name, kind="invalid")
    if low > high:
        context.report(f"empty range: low={low!r} is above high={high!r}. Swap them.")
    if log and low <= 0:
        context.child("low").report(
            f"low={low!r} with log: true; a log-scale range needs low > 0. "
            f"Use a positive lower bound such as 1.0e-5, or log: false."
        )
    if step is not None and low is not None and high is not None and step > high - low > 0:
        context.child("step").report(
            f"step={step!r} is larger than the range {low!r} to {high!r}, so only low would "
            f"ever be sampled. Use a step of at most {high - low:g}, or remove it."
        )
    if log and step is not None:
        context.child("step").report("step cannot be combined with log: true (Optuna forbids it). "
                                     "Remove one.")
    return ParamSpec(name=name, kind=kind, low=low, high=high, log=log, step=step)


# --------------------------------------------------------------------------------------
# Value parsers
# --------------------------------------------------------------------------------------


_Parser = Callable[[Any], Any]


def _field(
    entry: Mapping[str, Any], key: str, context: _Context, parser: _Parser, default: Any,
    *, required: bool = False,
) -> Any:
    if key not in entry:
        if required:
            context.child(key).report("missing.")
        return default
    try:
        return parser(entry[key])
    except _Invalid as error:
        context.child(key).report(str(error))
        return default


def _reject_unknown(entry: Mapping[str, Any], allowed: set[str], context: _Context) -> None:
    for key in entry:
        if key not in allowed:
            suggestion = _closest(str(key), allowed)
            hint = f"Did you mean `{suggestion}`?" if suggestion else "Remove it."
            context.child(str(key)).report(
                f"unknown key. {hint} Allowed keys: {', '.join(sorted(allowed))}."
            )


def _closest(word: str, candidates: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}.")
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Invalid(f"expected a list of strings, got {_show(value)}.")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}.")
    return value


def _integer(*, minimum: int | None = None, maximum: int | None = None) -> _Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_show(value)}.")
        _check_bounds(value, minimum, maximum, exclusive=False)
        return value

    return parse


def _number(
    *, minimum: float | None = None, maximum: float | None = None, exclusive: bool = False
) -> _Parser:
    def parse(value: Any) -> float:
        if isinstance(value, str):
            value = _parse_number_string(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"expected a number, got {_show(value)}.")
        if not math.isfinite(value):
            raise _Invalid(f"expected a finite number, got {value!r}.")
        _check_bounds(value, minimum, maximum, exclusive=exclusive)
        return float(value)

    return parse


def _parse_number_string(value: str) -> Any:
    # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number users meant.
    try:
        return float(value)
    except ValueError:
        return value


def _check_bounds(value: float, minimum: float | None, maximum: float | None, *, exclusive: bool) -> None:
    if minimum is not None and (value < minimum or (exclusive and value == minimum)):
        relation = "above" if exclusive else "at least"
        raise _Invalid(f"value={value!r} is out of range: use a value {relation} {minimum:g}.")
    if maximum is not None and value > maximum:
        raise _Invalid(f"value={value!r} is out of range: use a value at most {maximum:g}.")


def _choice(options: tuple[str, ...]) -> _Parser:
    def parse(value: Any) -> str:
        if value not in options:
            raise _Invalid(f"value={_show(value)} is not one of: {', '.join(options)}.")
        return str(value)

    return parse


def _optional(parser: _Parser) -> _Parser:
    def parse(value: Any) -> Any:
        return None if value is None else parser(value)

    return parse


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a path string, got {_show(value)}.")
    return Path(os.path.expanduser(value))


def _device(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise _Invalid(f"device={_show(value)} is invalid. Use auto, cpu, cuda, cuda:N or mps.")
    return value


def _database_url(variable: str, password_hint: str) -> _Parser:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(f"expected a URL string, got {_show(value)}.")
        if _has_literal_password(value):
            raise _Invalid(
                f"value={redact_url(value)!r} contains a password in clear. Keep secrets out "
                f"of studies.yaml: write `${{DB_PASSWORD}}` in its place and set that "
                f"environment variable, {password_hint}, or set {variable}."
            )
        return value

    return parse


_storage_url = _database_url("GENRE_SEARCH_STORAGE", "use PGPASSWORD or ~/.pgpass")
_tracking_uri = _database_url(
    "GENRE_SEARCH_TRACKING_URI",
    "use MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for an HTTP server",
)


# --------------------------------------------------------------------------------------
# URLs and paths
# --------------------------------------------------------------------------------------


def expand_env(value: str) -> str:
    """Replace ``${NAME}`` references with environment values.

    Raises:
        ConfigError: A referenced variable is unset.
    """
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError("environment", [
                f"${{{name}}} is referenced by a URL but the environment variable {name} is "
                f"not set. Export it before launching."
            ])
        return os.environ[name]

    return _ENV_REFERENCE.sub(substitute, value)


def _has_literal_password(url: str) -> bool:
    match = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:([^/@]*)@", url)
    return bool(match) and not _ENV_REFERENCE.fullmatch(match.group(1))


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for logs and errors."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)


def redact_text(text: str) -> str:
    """Return ``text`` with the password of every URL in it replaced by ``***``.

    For exception messages of database drivers and HTTP clients, which quote the URL they
    failed to reach, password included.
    """
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/@\s]*@", r"\1:***@", text)


def resolve_database_url(url: str, *, base_dir: Path) -> str:
    """Make a relative SQLite URL or bare path absolute against ``base_dir``.

    Other URLs are returned unchanged.
    """
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        relative = url[len("sqlite:///"):]
        if relative and not relative.startswith(":memory:"):
            return f"sqlite:///{(base_dir / relative).resolve()}"
    if "://" not in url and not url.startswith("sqlite:"):
        return str((base_dir / url).resolve())
    return url


def _absolute(path: Path | None, base_dir: Path) -> Path | None:
    if path is None:
        return None
    return path if path.is_absolute() else (base_dir / path).resolve()


def _optional_path(value: str | None) -> Path | None:
    return Path(os.path.expanduser(value)) if value else None


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return (f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}. "
                f"Fix the syntax there (indentation, a missing colon or quote).")
    return f"invalid YAML: {problem}."
