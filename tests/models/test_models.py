"""Shape, gradient and validation contracts of every registered model family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from models import (
    MODEL_FAMILIES,
    UnknownModelError,
    build_model,
    family_parameters,
    model_families,
    register_model,
)

N_CLASSES = 10
# Names of the parameter that counts the blocks halving the mel axis, per architecture style.
DEPTH_PARAMETERS = ("n_conv_layers", "n_stages")


def _log_mel_batch(batch: int, n_mels: int, n_frames: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, n_mels, n_frames, generator=generator)


def _build(family: str, *, n_mels: int = 64, **params: Any) -> nn.Module:
    return build_model(family, n_classes=N_CLASSES, n_mels=n_mels, params=params)


def _depth_parameter(family: str) -> str:
    names = [name for name in DEPTH_PARAMETERS if name in family_parameters(family)]
    assert names, f"add the depth parameter of family {family!r} to DEPTH_PARAMETERS"
    return names[0]


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    # Parameter initialization draws from the global generator.
    torch.manual_seed(0)


def test_model_families_contains_required() -> None:
    # The search layer and studies.yaml rely on these two names.
    assert {"cnn", "crnn"} <= set(MODEL_FAMILIES)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
@pytest.mark.parametrize(
    ("batch", "n_mels", "n_frames"),
    [(1, 32, 16), (3, 64, 100), (2, 128, 431), (2, 256, 17), (4, 96, 1291)],
)
def test_build_model_output_shape(family: str, batch: int, n_mels: int, n_frames: int) -> None:
    model = _build(family, n_mels=n_mels).eval()

    logits = model(_log_mel_batch(batch, n_mels, n_frames))

    # One logit per class for every clip, whatever the clip length.
    assert logits.shape == (batch, N_CLASSES)
    # The output dtype follows the float32 input.
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_output_finite(family: str) -> None:
    model = _build(family).eval()

    logits = model(_log_mel_batch(2, 64, 50))

    # Normalized input must not produce NaN or infinite logits.
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_backward_fills_gradients(family: str) -> None:
    model = _build(family)
    targets = torch.tensor([0, 3, 9])

    loss = nn.functional.cross_entropy(model(_log_mel_batch(3, 64, 40)), targets)
    loss.backward()  # type: ignore[no-untyped-call]

    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    # Every parameter takes part in the forward pass, so every one gets a gradient.
    assert missing == []
    nonzero = [p.grad for p in model.parameters() if p.grad is not None and p.grad.any()]
    # At least the head receives a nonzero gradient from a random batch.
    assert len(nonzero) > 0


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_parameter_count_sane(family: str) -> None:
    model = _build(family, n_mels=128)

    n_parameters = sum(parameter.numel() for parameter in model.parameters())

    # The defaults describe a small model: more than a linear layer on 128 bands...
    assert n_parameters > 128 * N_CLASSES
    # ...and small enough to train on a CPU in a trial (under 5 million parameters).
    assert n_parameters < 5_000_000


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_channels_last_matches_contiguous(family: str) -> None:
    model = _build(family).eval()
    features = _log_mel_batch(2, 64, 48)
    expected = model(features)

    model = model.to(memory_format=torch.channels_last)
    logits = model(features.to(memory_format=torch.channels_last))

    # The memory format changes the layout, not the result.
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_eval_deterministic(family: str) -> None:
    model = _build(family, dropout=0.5).eval()
    features = _log_mel_batch(2, 64, 48)

    first = model(features)
    second = model(features)

    # Dropout is off and BatchNorm uses running statistics in eval mode.
    torch.testing.assert_close(first, second, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_train_dropout_active(family: str) -> None:
    model = _build(family, dropout=0.5).train()
    features = _log_mel_batch(4, 64, 48)

    first = model(features)
    second = model(features)

    # With dropout 0.5 two training passes draw different masks.
    assert not torch.equal(first, second)


def test_build_model_unknown_family_lists_names() -> None:
    with pytest.raises(UnknownModelError) as error:
        build_model("transformer", n_classes=N_CLASSES, n_mels=64, params={})

    message = str(error.value)
    # The message names the rejected value...
    assert "family='transformer'" in message
    # ...and every valid family.
    for family in MODEL_FAMILIES:
        assert family in message


def test_unknown_model_error_is_value_error() -> None:
    # Callers that catch ValueError for bad configuration also catch unknown families.
    assert issubclass(UnknownModelError, ValueError)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_unknown_param_named(family: str) -> None:
    with pytest.raises(ValueError) as error:
        _build(family, n_heads=4)

    message = str(error.value)
    # The message names the parameter with its value...
    assert "n_heads=4" in message
    # ...the family...
    assert repr(family) in message
    # ...and the accepted names.
    for name in family_parameters(family):
        assert name in message


@pytest.mark.parametrize("family", MODEL_FAMILIES)
@pytest.mark.parametrize(
    ("name", "value", "expected_text"),
    [
        ("base_channels", True, "base_channels=True"),
        ("base_channels", 16.0, "base_channels=16.0"),
        ("dropout", "0.3", "dropout='0.3'"),
        ("base_channels", None, "base_channels=None"),
    ],
)
def test_build_model_wrong_type_named(
    family: str, name: str, value: Any, expected_text: str
) -> None:
    with pytest.raises(ValueError) as error:
        _build(family, **{name: value})

    # The message shows the offending parameter as name=value.
    assert expected_text in str(error.value)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_int_dropout_accepted(family: str) -> None:
    # YAML and Optuna may give 0 instead of 0.0 for a float parameter.
    model = _build(family, dropout=0)

    dropout_rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    # The integer is used as the dropout probability.
    assert dropout_rates == [0.0]


@pytest.mark.parametrize("family", MODEL_FAMILIES)
@pytest.mark.parametrize(
    ("name", "value"),
    [("dropout", 1.0), ("dropout", -0.1), ("base_channels", 0)],
)
def test_build_model_out_of_range_named(family: str, name: str, value: Any) -> None:
    with pytest.raises(ValueError) as error:
        _build(family, **{name: value})

    # The constructor's message shows the rejected value.
    assert f"{name}={value!r}" in str(error.value)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_zero_depth_rejected(family: str) -> None:
    depth = _depth_parameter(family)

    with pytest.raises(ValueError) as error:
        _build(family, **{depth: 0})

    # A model needs at least one block, and the message shows the rejected value.
    assert f"{depth}=0" in str(error.value)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_too_deep_for_mels(family: str) -> None:
    # 32 mel bands allow 5 halvings (32 -> 1), not 6.
    depth = _depth_parameter(family)
    with pytest.raises(ValueError) as error:
        _build(family, n_mels=32, **{depth: 6})

    message = str(error.value)
    # The message shows both values in conflict...
    assert f"{depth}=6" in message
    assert "n_mels=32" in message
    # ...and the largest valid depth.
    assert f"{depth} <= 5" in message


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_max_depth_short_clip(family: str) -> None:
    # Five frame-halving blocks take 16 frames down to one frame or, without ceil_mode, to 0.
    model = _build(family, n_mels=32, **{_depth_parameter(family): 5}).eval()

    logits = model(_log_mel_batch(2, 32, 16))

    # The deepest valid model still accepts the shortest supported clip.
    assert logits.shape == (2, N_CLASSES)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_build_model_single_class_rejected(family: str) -> None:
    with pytest.raises(ValueError) as error:
        build_model(family, n_classes=1, n_mels=64, params={})

    # A one-class head cannot classify, so the message shows the rejected value.
    assert "n_classes=1" in str(error.value)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_family_parameters_defaults_build(family: str) -> None:
    defaults = family_parameters(family)

    model = _build(family, **defaults)

    # Building with exactly the advertised defaults is valid.
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_family_parameters_include_dropout(family: str) -> None:
    # Every family accepts dropout, so a shared search space can tune it.
    assert isinstance(family_parameters(family)["dropout"], float)


def test_family_parameters_returns_copy() -> None:
    parameters = family_parameters("cnn")
    parameters["dropout"] = 0.9

    # Changing the returned dict leaves the registered defaults untouched.
    assert family_parameters("cnn")["dropout"] == 0.2


def test_family_parameters_unknown_family_lists_names() -> None:
    with pytest.raises(UnknownModelError) as error:
        family_parameters("rnn")

    # The same error as build_model, naming the valid families.
    assert "cnn" in str(error.value)


def test_cnn_channels_capped() -> None:
    model = _build("cnn", n_conv_layers=4, base_channels=128)

    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    # Channels double per block but stop at 256.
    assert widths == [128, 256, 256, 256]


def test_cnn_even_kernel_rejected() -> None:
    with pytest.raises(ValueError) as error:
        _build("cnn", kernel_size=4)

    # Even kernels cannot keep the map size with symmetric padding.
    assert "kernel_size=4" in str(error.value)


@pytest.mark.parametrize(
    ("bidirectional", "rnn_layers"), [(False, 1), (True, 1), (False, 2), (True, 3)]
)
def test_crnn_rnn_variants_shape(bidirectional: bool, rnn_layers: int) -> None:
    model = _build(
        "crnn", bidirectional=bidirectional, rnn_layers=rnn_layers, rnn_hidden_size=8
    ).eval()

    logits = model(_log_mel_batch(2, 64, 30))

    # Every GRU configuration still ends in one logit per class.
    assert logits.shape == (2, N_CLASSES)


def test_crnn_head_width_follows_directions() -> None:
    model = _build("crnn", bidirectional=True, rnn_hidden_size=8)
    head = model.get_submodule("head")
    assert isinstance(head, nn.Linear)

    # The head reads the final hidden state of both directions.
    assert head.in_features == 16


def test_register_model_duplicate_rejected() -> None:
    with pytest.raises(ValueError) as error:

        @register_model("cnn")
        class _Duplicate(nn.Module):
            def __init__(self, n_classes: int, n_mels: int, *, dropout: float = 0.1) -> None:
                super().__init__()

    # Registering a taken name fails instead of replacing the family.
    assert "family='cnn'" in str(error.value)


def test_register_model_requires_dropout() -> None:
    with pytest.raises(TypeError) as error:

        @register_model("no-dropout")
        class _NoDropout(nn.Module):
            def __init__(self, n_classes: int, n_mels: int, *, width: int = 8) -> None:
                super().__init__()

    # The message names the missing common parameter.
    assert "dropout" in str(error.value)
    # The rejected class was not registered.
    assert "no-dropout" not in model_families()


@pytest.mark.parametrize("blocks_per_stage", [1, 2])
def test_resnet_stage_blocks_shape(blocks_per_stage: int) -> None:
    model = _build("resnet", blocks_per_stage=blocks_per_stage, n_stages=2).eval()

    logits = model(_log_mel_batch(2, 64, 30))

    # Extra blocks per stage keep the map size, so the head still gets one vector per clip.
    assert logits.shape == (2, N_CLASSES)
