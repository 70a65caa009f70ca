"""The Optuna objective: sample a model, train it, report every epoch, track it in MLflow."""

from __future__ import annotations

import gc
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from models import build_model
from search.config import StudyConfig
from search.data import PreparedDataset
from search.space import TrialParams, params_for_logging, suggest_params
from search.tracking import StudyTracker, TrialRun
from search.training import EpochResult, TrainingOptions, prepare_data, train_model

_logger = logging.getLogger(__name__)


class TrialFailedError(RuntimeError):
    """A trial failed; the study goes on. The original exception is the ``__cause__``."""


class SurplusTrialError(RuntimeError):
    """A trial started after the study's trial target was already claimed by other workers."""


@dataclass
class TrialOutcome:
    """Result of a completed trial, passed to callbacks such as model registration."""

    trial_number: int
    params: TrialParams
    value: float
    best_epoch: EpochResult
    history: list[EpochResult]
    state_dict: dict[str, torch.Tensor]
    run_id: str


@dataclass
class _Progress:
    history: list[EpochResult] = field(default_factory=list)
    best: EpochResult | None = None
    best_state: dict[str, torch.Tensor] | None = None


class Objective:
    """Callable passed to :meth:`optuna.Study.optimize`.

    Args:
        config: The study's resolved configuration.
        dataset: The prepared dataset; copied to ``device`` once, for every trial.
        tracker: The study's MLflow bridge.
        device: Where trials train.
        target_trials: Returns the study's current target of finished trials, or ``None``
            for no limit; a trial numbered past it is surplus and does not train.
        on_complete: Called with every completed trial's outcome.
        on_epoch: Called after every epoch (progress display).
    """

    def __init__(
        self,
        config: StudyConfig,
        dataset: PreparedDataset,
        tracker: StudyTracker,
        device: torch.device,
        *,
        target_trials: Callable[[], int | None] = lambda: None,
        on_complete: Callable[[TrialOutcome], None] | None = None,
        on_epoch: Callable[[int, EpochResult], None] | None = None,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.tracker = tracker
        self.device = device
        self.target_trials = target_trials
        self.on_complete = on_complete
        self.on_epoch = on_epoch
        self.data = prepare_data(dataset.feature_set, dataset.splits, device)
        self.fatal_errors = frozenset(config.training.fatal_errors)
        self.surplus = False
        self.current_run: TrialRun | None = None
        # Seconds per epoch spent in MLflow logging and Optuna report/should_prune, by trial
        # number; the benchmarks read it.
        self.tracking_seconds: dict[int, list[float]] = {}

    def __call__(self, trial: optuna.Trial) -> float:
        self._check_surplus(trial)
        params = suggest_params(trial, self.config.search_space)
        seed = self.config.training.seed + trial.number
        run = self.tracker.start_trial(trial, self._run_params(params, seed))
        self.current_run = run
        progress = _Progress()
        completed = False
        try:
            value = self._train(trial, params, seed, run, progress)
            completed = True
        except optuna.TrialPruned:
            self._finish_pruned(run, progress)
            raise
        except KeyboardInterrupt as error:
            run.finish("KILLED", metrics=_summary(progress), params={"state": "INTERRUPTED"},
                       error=error)
            raise
        except Exception as error:
            run.finish("FAILED", metrics=_summary(progress), params={"state": "FAIL"}, error=error)
            # Log records keep the exception, so its frames would keep the model's (GPU)
            # tensors alive. The run already has the traceback text.
            traceback.clear_frames(error.__traceback__)
            if type(error).__name__ in self.fatal_errors:
                raise
            raise TrialFailedError(f"trial {trial.number} failed: {type(error).__name__}: "
                                   f"{error} (traceback in MLflow run {run.run_id})") from error
        finally:
            # A completed trial's model is freed by reference counting. A full collection
            # (a few hundred ms with torch and MLflow loaded) is needed only when exception
            # frames may keep it alive, or to return cached blocks to the GPU.
            if not completed or self.device.type == "cuda":
                _release_memory(self.device)

        run.finish("FINISHED", metrics=_summary(progress), params={"state": "COMPLETE"})
        if self.on_complete is not None and progress.best is not None:
            assert progress.best_state is not None
            self.on_complete(TrialOutcome(
                trial_number=trial.number, params=params, value=value, best_epoch=progress.best,
                history=progress.history, state_dict=progress.best_state, run_id=run.run_id,
            ))
        return value

    def close_current_run(self, status: str = "KILLED") -> None:
        """End the latest trial's run if an interrupt left it open, e.g. between epochs'
        bookkeeping and the run's own ``finish``."""
        run = self.current_run
        if run is None or run.finished:
            return
        try:
            run.finish(status, params={"state": "INTERRUPTED"})
        except Exception as error:  # e.g. `state` was logged before the interrupt.
            _logger.warning("run %s: closing after the interrupt failed (%s); ending it %s",
                            run.run_id, error, status)
            run.client.set_terminated(run.run_id, status=status)

    def _check_surplus(self, trial: optuna.Trial) -> None:
        target = self.target_trials()
        if target is None:
            return
        alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                 optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=alive)
                   if t.number < trial.number]
        if len(earlier) >= target:
            self.surplus = True
            raise SurplusTrialError(
                f"trial {trial.number} is not needed: {len(earlier)} trials already reach "
                f"the target of {target}"
            )

    def _run_params(self, params: TrialParams, seed: int) -> dict[str, Any]:
        device_name = self.device.type
        if self.device.type == "cuda":
            device_name = torch.cuda.get_device_name(self.device)
        return {
            **params_for_logging(params, self.config.search_space),
            "device": str(self.device),
            "device_name": device_name,
            "seed": seed,
            "epochs": self.config.training.epochs,
            "dataset_fingerprint": self.dataset.fingerprint,
            "feature_fingerprint": self.dataset.settings.fingerprint(),
            "n_train_segments": int(self.data.x_train.shape[0]),
            "n_valid_segments": int(self.data.x_valid.shape[0]),
        }

    def _train(self, trial: optuna.Trial, params: TrialParams, seed: int, run: TrialRun,
               progress: _Progress) -> float:
        # Model initialization draws from a forked RNG, so trials never reseed the
        # process-wide generator that other code may rely on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(params.family, n_classes=len(self.data.classes),
                                n_mels=self.data.n_mels, params=params.model_params())
        options = TrainingOptions(
            optimizer=str(params.common["optimizer"]),
            learning_rate=float(params.common["learning_rate"]),
            weight_decay=float(params.common["weight_decay"]),
            batch_size=int(params.common["batch_size"]),
            epochs=self.config.training.epochs,
            seed=seed,
            mixed_precision=self.config.training.mixed_precision,
            channels_last=self.config.training.channels_last,
            compile=self.config.training.compile,
            segments_per_track=self.config.training.segments_per_track,
        )

        tracking_seconds = self.tracking_seconds.setdefault(trial.number, [])

        def report(result: EpochResult) -> None:
            progress.history.append(result)
            if self._is_better(result, progress.best):
                progress.best = result
                progress.best_state = {key: value.detach().to("cpu", copy=True)
                                       for key, value in model.state_dict().items()}
            if self.on_epoch is not None:
                self.on_epoch(trial.number, result)
            started = time.perf_counter()
            run.log_epoch(result.epoch, result.metrics())
            trial.report(self._metric(result), step=result.epoch)
            should_prune = trial.should_prune()
            tracking_seconds.append(time.perf_counter() - started)
            if should_prune:
                raise optuna.TrialPruned(f"pruned at epoch {result.epoch}")

        # Dropout and other in-training randomness draw from torch's global generator:
        # seed a fork of it, so a trial is repeatable and leaves the process state alone.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            train_model(model, self.data, options, self.device, on_epoch=report)
        assert progress.best is not None
        return self._metric(progress.best)

    def _metric(self, result: EpochResult) -> float:
        return result.val_loss if self.config.metric == "val_loss" else result.val_accuracy

    def _is_better(self, result: EpochResult, best: EpochResult | None) -> bool:
        if best is None:
            return True
        if self.config.direction == "minimize":
            return self._metric(result) < self._metric(best)
        return self._metric(result) > self._metric(best)

    def _finish_pruned(self, run: TrialRun, progress: _Progress) -> None:
        epoch = progress.history[-1].epoch if progress.history else 0
        run.finish("KILLED", metrics={**_summary(progress), "pruned_at_epoch": epoch},
                   params={"state": "PRUNED"}, tags={"pruned_at_epoch": epoch})


def _summary(progress: _Progress) -> dict[str, float]:
    summary: dict[str, float] = {"epochs_trained": float(len(progress.history))}
    if progress.best is not None:
        summary["best_val_loss"] = progress.best.val_loss
        summary["best_val_accuracy"] = progress.best.val_accuracy
    finite = [r.val_loss for r in progress.history if math.isfinite(r.val_loss)]
    if finite:
        summary["best_val_loss"] = min(finite)
    return summary


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
