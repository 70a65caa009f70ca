"""PyTorch genre classifiers over log-mel spectrograms, built by family name.

Every model maps a (batch, 1, n_mels, n_frames) float32 normalized log-mel tensor to
(batch, n_classes) logits. This package defines modules only: it reads no files and
imports neither MLflow nor Optuna.
"""

from __future__ import annotations

# Importing the family modules registers them, so these imports come before MODEL_FAMILIES.
from models._cnn import GenreCNN
from models._crnn import GenreCRNN
from models._registry import (
    ModelSpec,
    UnknownModelError,
    build_model,
    family_parameters,
    model_families,
    model_spec,
    register_model,
)
from models._resnet import GenreResNet

MODEL_FAMILIES: tuple[str, ...] = model_families()
"""Family names registered at import, for example ``("cnn", "crnn", "resnet")``.

NOTE: This tuple does not change after import. Call `model_families` to include families
registered later with `register_model`.
"""

__all__ = [
    "MODEL_FAMILIES",
    "GenreCNN",
    "GenreCRNN",
    "GenreResNet",
    "ModelSpec",
    "UnknownModelError",
    "build_model",
    "family_parameters",
    "model_families",
    "model_spec",
    "register_model",
]
