"""Sampling a trial's hyperparameters from a study's search space.

Architecture parameters are conditional on the model family. In Optuna they are named
``<family>.<parameter>`` so that two families may give the same parameter different ranges
without clashing distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from search.config import ParamSpec, SearchSpace

UNUSED = "unused"
"""Value logged to MLflow for an architecture parameter that the trial's family lacks."""


@dataclass(frozen=True)
class TrialParams:
    """Hyperparameters of one trial.

    Attributes:
        family: Model family name.
        common: Shared parameters (learning_rate, batch_size, dropout, weight_decay, optimizer).
        architecture: Parameters of the family's model, without the family prefix.
    """

    family: str
    common: dict[str, Any]
    architecture: dict[str, Any]

    def model_params(self) -> dict[str, Any]:
        """Return the keyword arguments for :func:`models.build_model`."""
        return {**self.architecture, "dropout": self.common["dropout"]}

    def flat(self) -> dict[str, Any]:
        """Return every parameter under its Optuna name."""
        flat: dict[str, Any] = {"family": self.family, **self.common}
        flat.update({f"{self.family}.{name}": value for name, value in self.architecture.items()})
        return flat


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> TrialParams:
    """Sample (or take the fixed value of) every parameter of ``space`` for ``trial``."""
    family = str(_suggest(trial, space.family, space.family.name))
    common = {spec.name: _suggest(trial, spec, spec.name) for spec in space.common}
    architecture = {
        spec.name: _suggest(trial, spec, f"{family}.{spec.name}")
        for spec in space.architectures.get(family, ())
    }
    return TrialParams(family=family, common=common, architecture=architecture)


def params_from_flat(flat: dict[str, Any], space: SearchSpace) -> TrialParams:
    """Rebuild :class:`TrialParams` from a finished trial's ``params`` and the space's fixed values."""
    family = str(flat.get("family", space.family.value))
    common = {spec.name: flat.get(spec.name, spec.value) for spec in space.common}
    architecture = {
        spec.name: flat.get(f"{family}.{spec.name}", spec.value)
        for spec in space.architectures.get(family, ())
    }
    return TrialParams(family=family, common=common, architecture=architecture)


def all_param_names(space: SearchSpace) -> list[str]:
    """Return the Optuna names of every parameter the space can produce, in a stable order."""
    names = [space.family.name, *(spec.name for spec in space.common)]
    for family in space.families():
        names.extend(f"{family}.{spec.name}" for spec in space.architectures.get(family, ()))
    return names


def params_for_logging(params: TrialParams, space: SearchSpace) -> dict[str, Any]:
    """Return every parameter of the space, with :data:`UNUSED` where the family lacks it.

    MLflow's parallel-coordinates plot needs the same axes on every run, so parameters of
    other families are logged too instead of left out.
    """
    flat = params.flat()
    return {name: flat.get(name, UNUSED) for name in all_param_names(space)}


def _suggest(trial: optuna.Trial, spec: ParamSpec, name: str) -> Any:
    if spec.kind == "fixed":
        return spec.value
    if spec.kind == "categorical":
        return trial.suggest_categorical(name, list(spec.choices))
    if spec.kind == "int":
        step = int(spec.step) if spec.step is not None else 1
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=step, log=spec.log)
    return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step, log=spec.log)
