"""Registry that maps a model family name to its module class and parameter defaults."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from torch import nn

ModuleType = TypeVar("ModuleType", bound=type[nn.Module])

# Every family must accept these keyword-only parameters, so a search space can tune them
# without knowing the family.
_COMMON_PARAMETERS = ("dropout",)


class UnknownModelError(ValueError):
    """Error for a model family name that is not registered."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered model family.

    Attributes:
        family: Name used in `studies.yaml` and in `build_model`, for example ``"cnn"``.
        model_class: The ``nn.Module`` subclass. Its constructor takes ``n_classes`` and
            ``n_mels`` positionally and the architecture parameters as keyword-only
            arguments with defaults.
        defaults: Architecture parameter names mapped to their default values (read-only).
    """

    family: str
    model_class: type[nn.Module]
    defaults: Mapping[str, Any]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(family: str) -> Callable[[ModuleType], ModuleType]:
    """Return a class decorator that registers an ``nn.Module`` under ``family``.

    The architecture parameters and their defaults are read from the keyword-only
    arguments of the class constructor, so the signature is the single source of truth.

    Raises:
        ValueError: If ``family`` is already registered.
        TypeError: If a keyword-only argument has no default or ``dropout`` is missing.
    """

    def decorator(model_class: ModuleType) -> ModuleType:
        if family in _REGISTRY:
            raise ValueError(
                f"Model family is already registered: family={family!r} "
                f"(class {_REGISTRY[family].model_class.__name__}). Choose another name."
            )
        defaults = _keyword_defaults(model_class)
        _REGISTRY[family] = ModelSpec(family, model_class, MappingProxyType(defaults))
        return model_class

    return decorator


def _keyword_defaults(model_class: type[nn.Module]) -> dict[str, Any]:
    signature = inspect.signature(model_class.__init__)
    defaults: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if parameter.default is inspect.Parameter.empty:
            raise TypeError(
                f"{model_class.__name__}: keyword-only argument {parameter.name!r} has no "
                "default. Give every architecture parameter a default value."
            )
        defaults[parameter.name] = parameter.default

    missing = [name for name in _COMMON_PARAMETERS if name not in defaults]
    if missing:
        raise TypeError(
            f"{model_class.__name__} does not accept the keyword-only arguments {missing} "
            "that every model family must accept. Add them with default values."
        )
    return defaults


def model_families() -> tuple[str, ...]:
    """Return the registered family names in registration order."""
    return tuple(_REGISTRY)


def model_spec(family: str) -> ModelSpec:
    """Return the registered spec of ``family``.

    Raises:
        UnknownModelError: If ``family`` is not registered. The message lists the
            registered names.
    """
    try:
        return _REGISTRY[family]
    except KeyError:
        raise UnknownModelError(
            f"Unknown model family: family={family!r}. Use one of: {', '.join(model_families())}."
        ) from None


def family_parameters(family: str) -> dict[str, Any]:
    """Return the architecture parameters that ``family`` accepts, with their defaults.

    The config validator uses the keys to reject unknown search-space entries. The
    returned dict is a copy, so callers may modify it.

    Raises:
        UnknownModelError: If ``family`` is not registered.
    """
    return dict(model_spec(family).defaults)


def build_model(
    family: str, *, n_classes: int, n_mels: int, params: Mapping[str, Any]
) -> nn.Module:
    """Build the module of ``family`` from a trial's architecture parameters.

    Parameters that ``params`` leaves out take the defaults from `family_parameters`.
    Each value must have the type of its default, except that an ``int`` is accepted
    (and converted) where the default is a ``float``.

    Args:
        family: Registered family name, one of `MODEL_FAMILIES`.
        n_classes: Number of output logits (genres).
        n_mels: Number of mel bands in the input features.
        params: Architecture parameters, usually a trial's sampled values.

    Returns:
        A module that maps log-mel input of shape (batch, 1, n_mels, n_frames) to logits
        of shape (batch, n_classes). It is in training mode, on the CPU.

    Raises:
        UnknownModelError: If ``family`` is not registered.
        ValueError: If a parameter name is unknown for ``family``, a value has the wrong
            type, or the model constructor rejects a value.
    """
    spec = model_spec(family)
    kwargs = dict(spec.defaults)
    for name, value in params.items():
        kwargs[name] = _checked_value(spec, name, value)
    return spec.model_class(n_classes, n_mels, **kwargs)


def _checked_value(spec: ModelSpec, name: str, value: Any) -> Any:
    if name not in spec.defaults:
        raise ValueError(
            f"Unknown parameter for model family {spec.family!r}: {name}={value!r}. "
            f"Accepted parameters: {', '.join(spec.defaults)}."
        )

    expected_type = type(spec.defaults[name])
    # bool is a subclass of int, so it is checked first: True is not a valid layer count.
    if isinstance(value, bool) != (expected_type is bool):
        _raise_wrong_type(spec, name, value, expected_type)
    if expected_type is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected_type):
        _raise_wrong_type(spec, name, value, expected_type)
    return value


def _raise_wrong_type(spec: ModelSpec, name: str, value: Any, expected_type: type) -> None:
    raise ValueError(
        f"Invalid type for parameter of model family {spec.family!r}: {name}={value!r} is "
        f"{type(value).__name__}, expected {expected_type.__name__}. "
        f"Default: {name}={spec.defaults[name]!r}."
    )
