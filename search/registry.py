"""The best trial as a versioned MLflow model that classifies audio files.

:class:`GenreClassifier` is an :class:`mlflow.pyfunc.PythonModel` that does its own feature
extraction, so the registered model takes file paths or raw waveforms. It lives in this
installed package, which MLflow imports when it loads the model, so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` works in any process where
genre-search is installed. :class:`ChampionRegistrar` logs and registers the model when a
completed trial beats the current champion.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import torchaudio.functional
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from features import LogMelSettings, LogMelSpectrogram, load_audio, segment_waveform
from models import build_model
from search._log_filters import drop_log_messages
from search.config import StudyConfig
from search.objective import TrialOutcome
from search.study import PARENT_RUN_ATTR
from search.tracking import StudyTracker, call_with_retry, check_tracking_server
from search.training import TrialData

_logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_PATH = "model"
METRIC_TAG = "genre_search.metric"
VALUE_TAG = "genre_search.value"
DIRECTION_TAG = "genre_search.direction"
STUDY_TAG = "genre_search.study"
TRIAL_TAG = "genre_search.trial_number"
INPUT_EXAMPLE_SECONDS = 0.25
"""Length of the silent input example, shorter than a segment so it shows zero-padding."""


class GenreClassifier(PythonModel):
    """Genre classifier over audio, with the log-mel front end it was trained with.

    Input: a DataFrame with a ``path`` column (audio file paths), or ``waveform`` (mono
    samples as a list of floats) and ``sample_rate`` (Hz) columns. Each row may use
    either form. Each clip is resampled to the training rate, cut into segments of
    ``segment_seconds``, and the softmax probabilities of its segments are averaged. A clip
    shorter than one segment is zero-padded to one segment.

    Output: a DataFrame with one row per input row, the column ``genre`` (most probable
    genre) and one ``prob_<genre>`` column per genre.

    Pass ``model_config={"device": "cuda"}`` to :func:`mlflow.pyfunc.load_model` to
    classify on a GPU; the default is the CPU.
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Load the weights, the genres, the front-end settings and normalization stats."""
        with open(context.artifacts["classifier_config"], encoding="utf-8") as file:
            description = json.load(file)
        model_config = context.model_config or {}
        self.device = torch.device(str(model_config.get("device", "cpu")))
        self.classes: list[str] = list(description["classes"])
        self.settings = LogMelSettings(**description["feature_settings"])
        self.front_end = LogMelSpectrogram(self.settings).to(self.device).eval()

        normalization = torch.load(context.artifacts["normalization"], map_location="cpu",
                                   weights_only=True)
        self.mean = normalization["mean"].to(self.device)  # (n_mels,)
        self.std = normalization["std"].to(self.device)  # (n_mels,)

        self.model = build_model(description["family"], n_classes=len(self.classes),
                                 n_mels=self.settings.n_mels, params=description["model_params"])
        state_dict = torch.load(context.artifacts["state_dict"], map_location="cpu",
                                weights_only=True)
        self.model.load_state_dict(state_dict)
        self.model.to(self.device).eval()

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Classify every row of ``model_input``; see the class docstring for the columns.

        Raises:
            ValueError: A row has neither a path nor a waveform with its sample rate.
            features.AudioDecodeError: A file is missing, unreadable or not audio.
        """
        frame = pd.DataFrame(model_input)
        probabilities = np.stack([self._classify(self._waveform(row))
                                  for row in frame.to_dict(orient="records")])
        output = pd.DataFrame({"genre": [self.classes[int(i)]
                                         for i in probabilities.argmax(axis=1)]})
        for index, genre in enumerate(self.classes):
            output[f"prob_{genre}"] = probabilities[:, index].astype(np.float64)
        return output

    def _waveform(self, row: Mapping[str, Any]) -> np.ndarray:
        path = row.get("path")
        if _is_present(path):
            return load_audio(str(path), sample_rate=self.settings.sample_rate)
        samples, sample_rate = row.get("waveform"), row.get("sample_rate")
        if not _is_present(samples) or not _is_present(sample_rate):
            raise ValueError(
                f"input row has no audio: path={path!r}, sample_rate={sample_rate!r}. "
                f"Give a `path` column, or `waveform` (list of floats) and `sample_rate` (Hz)."
            )
        assert sample_rate is not None
        rate = int(sample_rate)
        waveform = torch.as_tensor(np.asarray(samples, dtype=np.float32))
        if rate != self.settings.sample_rate:
            waveform = torchaudio.functional.resample(waveform, rate, self.settings.sample_rate)
        return waveform.numpy()

    @torch.inference_mode()
    def _classify(self, waveform: np.ndarray) -> np.ndarray:
        segment_samples = self.settings.segment_samples()
        if waveform.shape[0] < segment_samples:
            waveform = np.pad(waveform, (0, segment_samples - waveform.shape[0]))
        segments = segment_waveform(waveform, segment_samples=segment_samples)
        log_mel = self.front_end(torch.from_numpy(segments).to(self.device))  # (n, mels, frames)
        # The feature cache stores float16, so training saw features rounded to it.
        log_mel = log_mel.to(torch.float16).float()
        normalized = ((log_mel - self.mean[:, None]) / self.std[:, None]).unsqueeze(1)
        probabilities = torch.softmax(self.model(normalized).float(), dim=1)  # (n, n_classes)
        return probabilities.mean(dim=0).cpu().numpy()


def _is_present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def model_signature(classes: list[str] | tuple[str, ...]) -> ModelSignature:
    """Return the pyfunc signature: optional audio input columns, genre and probabilities out."""
    inputs = Schema([
        ColSpec(DataType.string, "path", required=False),
        ColSpec(Array(DataType.double), "waveform", required=False),
        ColSpec(DataType.long, "sample_rate", required=False),
    ])
    outputs = Schema([ColSpec(DataType.string, "genre"),
                      *(ColSpec(DataType.double, f"prob_{genre}") for genre in classes)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def save_classifier(
    path: Path,
    *,
    family: str,
    model_params: Mapping[str, Any],
    classes: list[str] | tuple[str, ...],
    settings: LogMelSettings,
    mean: torch.Tensor,
    std: torch.Tensor,
    state_dict: Mapping[str, torch.Tensor],
) -> Path:
    """Write a :class:`GenreClassifier` pyfunc model to the new folder ``path``.

    Args:
        path: Folder to create; it must not exist.
        family: Model family name for :func:`models.build_model`.
        model_params: The family's architecture parameters and dropout.
        classes: Genre names in class-index order.
        settings: Log-mel front-end settings used in training.
        mean: (n_mels,) per-bin mean of the training features, in dB.
        std: (n_mels,) per-bin standard deviation of the training features, in dB.
        state_dict: Trained weights.

    Returns:
        ``path``.
    """
    staging = Path(tempfile.mkdtemp(prefix="genre-classifier-"))
    description = {"family": family, "model_params": dict(model_params),
                   "classes": list(classes), "feature_settings": asdict(settings)}
    (staging / "classifier.json").write_text(json.dumps(description, indent=2), encoding="utf-8")
    torch.save({key: value.detach().cpu() for key, value in state_dict.items()},
               staging / "state_dict.pt")
    torch.save({"mean": mean.detach().cpu().float(), "std": std.detach().cpu().float()},
               staging / "normalization.pt")

    example = pd.DataFrame({
        "waveform": [[0.0] * round(INPUT_EXAMPLE_SECONDS * settings.sample_rate)],
        "sample_rate": [settings.sample_rate],
    })
    # MLflow warns that a `python_model` object is pickled and that unpickling may run
    # arbitrary code. The pickle holds only an empty GenreClassifier, whose class is
    # imported from this installed package at load time, and the weights are separate
    # `weights_only` torch files, so the warning has no action to take.
    with drop_log_messages("mlflow.pyfunc", "Passing a Python object as `python_model`"):
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=GenreClassifier(),
            artifacts={"classifier_config": str(staging / "classifier.json"),
                       "state_dict": str(staging / "state_dict.pt"),
                       "normalization": str(staging / "normalization.pt")},
            signature=model_signature(classes),
            input_example=example,
            pip_requirements=_pip_requirements(),
            model_config={"device": "cpu"},
        )
    return path


def _pip_requirements() -> list[str]:
    # Pinned explicitly: MLflow's inference would load the model in a subprocess, which
    # is slow. genre-search itself is not on PyPI, so serving needs `--env-manager local`.
    requirements = []
    for package in ("genre-search", "torch", "torchaudio", "soundfile", "numpy", "pandas"):
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def load_classifier(model_uri: str, *, tracking_uri: str | None = None,
                    device: str = "cpu") -> Any:
    """Load a registered or logged classifier as an MLflow pyfunc model.

    Args:
        model_uri: ``models:/NAME@champion``, ``models:/NAME/3``, ``runs:/RUN_ID/model`` or
            a local folder.
        tracking_uri: Tracking and registry store that resolves ``models:/`` and ``runs:/``
            URIs; ``None`` uses MLflow's default (``MLFLOW_TRACKING_URI``).
        device: Device the model classifies on, such as ``cpu`` or ``cuda``.

    Returns:
        The loaded :class:`mlflow.pyfunc.PyFuncModel`.

    Raises:
        search.tracking.TrackingError: The http(s) tracking server that resolves a
            ``models:/`` or ``runs:/`` URI does not respond within seconds.
    """
    if tracking_uri is not None and model_uri.startswith(("models:/", "runs:/")):
        check_tracking_server(tracking_uri)
    if model_uri.startswith("models:/") and tracking_uri is not None:
        model_uri = _registered_model_source(model_uri, tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri)
    return mlflow.pyfunc.load_model(local, model_config={"device": device})


def _registered_model_source(model_uri: str, tracking_uri: str) -> str:
    # MLflow 3.17 resolves models:/ URIs against the global registry URI even when
    # download_artifacts gets registry_uri, so the version is looked up here instead.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    reference = model_uri[len("models:/"):].strip("/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        model_version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, _, model_version = reference.rpartition("/")
        if not name or not model_version.isdigit():
            raise ValueError(f"model_uri={model_uri!r} is invalid. Use models:/NAME@ALIAS or "
                             f"models:/NAME/VERSION.")
    return str(client.get_model_version_download_uri(name, model_version))


class ChampionRegistrar:
    """Registers a completed trial's model when it beats the current champion.

    Use an instance as the objective's ``on_complete`` callback. A better trial's model is
    saved as ``model/`` in its child run, registered as a new version of
    ``config.registered_model_name`` and given the alias ``champion``. Its child run also
    gets a confusion matrix and ``val_accuracy.<genre>`` metrics on the validation split.

    Args:
        config: The study's resolved configuration.
        tracker: The study's MLflow bridge.
        data: The trials' normalized data; its mean, std and validation split are used.
        settings: Log-mel settings the features were computed with.
        device: Device the validation predictions run on.
    """

    def __init__(self, config: StudyConfig, tracker: StudyTracker, data: TrialData,
                 settings: LogMelSettings, device: torch.device) -> None:
        self.config = config
        self.tracker = tracker
        self.client: MlflowClient = tracker.client
        self.data = data
        self.settings = settings
        self.device = device

    def __call__(self, outcome: TrialOutcome) -> None:
        """Register ``outcome`` if it beats the champion.

        Registration is a side feature: an MLflow or file error is logged as a warning and
        the study goes on.
        """
        try:
            if not self.is_better(outcome.value):
                return
            model_version = self.register(outcome)
        except (MlflowException, OSError, RuntimeError) as error:
            _logger.warning("trial %d: model registration failed: %s", outcome.trial_number,
                            error, exc_info=True)
            return
        _logger.info("trial %d is the new champion: %s version %s (%s=%.4f)",
                     outcome.trial_number, self.config.registered_model_name, model_version,
                     self.config.metric, outcome.value)

    def is_better(self, value: float) -> bool:
        """Return whether ``value`` beats the champion of this study's metric, if any."""
        champion = self.champion_tags()
        if champion is None or champion.get(METRIC_TAG) != self.config.metric:
            return True
        try:
            current = float(champion[VALUE_TAG])
        except (KeyError, ValueError):
            return True
        if self.config.direction == "minimize":
            return value < current
        return value > current

    def champion_tags(self) -> dict[str, str] | None:
        """Return the tags of the model version with the ``champion`` alias, or ``None``."""
        try:
            champion = self.client.get_model_version_by_alias(
                self.config.registered_model_name, CHAMPION_ALIAS)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return dict(champion.tags)

    def register(self, outcome: TrialOutcome) -> str:
        """Log the model and diagnostics to the trial's run, register it and move the alias.

        NOTE: Two workers that finish better trials at the same moment may both move the
        alias; the last one wins even if its value is worse.

        Returns:
            The new model version.
        """
        run_id = outcome.run_id
        self._log_diagnostics(outcome)
        with tempfile.TemporaryDirectory(prefix="genre-model-") as folder:
            model_dir = save_classifier(
                Path(folder) / MODEL_ARTIFACT_PATH, family=outcome.params.family,
                model_params=outcome.params.model_params(), classes=self.data.classes,
                settings=self.settings, mean=self.data.mean, std=self.data.std,
                state_dict=outcome.state_dict)
            call_with_retry(lambda: self.client.log_artifacts(run_id, str(model_dir),
                                                              MODEL_ARTIFACT_PATH),
                            what="log model")
        model_version = self._create_version(outcome)
        self.client.set_registered_model_alias(self.config.registered_model_name,
                                               CHAMPION_ALIAS, model_version)
        self.client.set_tag(run_id, "genre_search.model_version", model_version)
        parent_id = self.tracker.study.user_attrs.get(PARENT_RUN_ATTR)
        if parent_id:
            self.client.set_tag(parent_id, "champion_model_version", model_version)
        return model_version

    def _create_version(self, outcome: TrialOutcome) -> str:
        name = self.config.registered_model_name
        try:
            self.client.create_registered_model(
                name, description=f"Best model of genre-search study {self.config.name!r}.")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        artifact_uri = self.client.get_run(outcome.run_id).info.artifact_uri
        created = self.client.create_model_version(
            name, source=f"{artifact_uri}/{MODEL_ARTIFACT_PATH}", run_id=outcome.run_id,
            tags={METRIC_TAG: self.config.metric, VALUE_TAG: repr(float(outcome.value)),
                  DIRECTION_TAG: self.config.direction, STUDY_TAG: self.config.name,
                  TRIAL_TAG: str(outcome.trial_number)},
            description=f"Trial {outcome.trial_number} of study {self.config.name!r}: "
                        f"{self.config.metric}={outcome.value:.4f}.")
        return str(created.version)

    def _log_diagnostics(self, outcome: TrialOutcome) -> None:
        from search.summary import log_confusion_matrix

        model = build_model(outcome.params.family, n_classes=len(self.data.classes),
                            n_mels=self.data.n_mels, params=outcome.params.model_params())
        model.load_state_dict(outcome.state_dict)
        log_confusion_matrix(self.client, outcome.run_id, model.to(self.device), self.data)


def chain_callbacks(
    *callbacks: Callable[[TrialOutcome], None] | None,
) -> Callable[[TrialOutcome], None]:
    """Return one callback that calls every non-``None`` callback in order."""
    present = [callback for callback in callbacks if callback is not None]

    def call_all(outcome: TrialOutcome) -> None:
        for callback in present:
            callback(outcome)

    return call_all


class BackgroundCallback:
    """Runs a trial callback on one background thread, in the order trials complete.

    Logging and registering a champion's model takes longer than a short trial's epochs,
    so it runs beside the next trial instead of before it. One thread keeps the champion
    comparisons in order.

    Args:
        callback: The callback to run, such as a :class:`ChampionRegistrar`.
    """

    def __init__(self, callback: Callable[[TrialOutcome], None]) -> None:
        self.callback = callback
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="champion")
        self._futures: list[Future[None]] = []

    def __call__(self, outcome: TrialOutcome) -> None:
        self._futures.append(self._executor.submit(self.callback, outcome))

    def wait(self) -> None:
        """Block until every submitted call has finished, logging any error it raised."""
        futures, self._futures = self._futures, []
        for future in futures:
            try:
                future.result()
            except Exception as error:  # A side feature; the study's results are stored.
                _logger.warning("background trial callback failed: %s", error, exc_info=True)
        self._executor.shutdown(wait=True)
