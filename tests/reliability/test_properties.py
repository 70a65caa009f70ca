"""Property-based tests: any config document or byte string fails only in the documented way."""

from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features import AudioDecodeError, load_audio
from search.config import ConfigError, load_studies, parse_studies

_REPOSITORY = Path(__file__).resolve().parents[2]
_REAL_STUDIES = yaml.safe_load((_REPOSITORY / "studies.yaml").read_text(encoding="utf-8"))

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_documents = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


_REAL_PATHS = _paths(_REAL_STUDIES)


def _mutate(path: tuple[Any, ...], replacement: Any, delete: bool) -> Any:
    document = copy.deepcopy(_REAL_STUDIES)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return document


_PROFILE = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@_PROFILE
@given(_documents)
def test_parse_studies_random_document(document: Any) -> None:
    try:
        parse_studies(document, base_dir=Path(tempfile.gettempdir()))
    except ConfigError:
        pass


@_PROFILE
@given(st.sampled_from(_REAL_PATHS), _documents, st.booleans())
def test_parse_studies_mutated_real_file(
        path: tuple[Any, ...], replacement: Any, delete: bool) -> None:
    document = _mutate(path, replacement, delete)
    try:
        parse_studies(document, base_dir=Path(tempfile.gettempdir()))
    except ConfigError:
        pass


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_load_studies_random_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "studies.yaml")
        path.write_text(text, encoding="utf-8")
        try:
            load_studies(path)
        except ConfigError:
            pass


def _encoded(format: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    tone = np.sin(np.linspace(0, 200, 4000)).astype(np.float32)
    sf.write(buffer, tone, 8000, format=format, subtype=subtype)
    return buffer.getvalue()


_REAL_HEADERS = [_encoded("WAV", "PCM_16"), _encoded("WAV", "FLOAT"), _encoded("FLAC", "PCM_16")]


def _check_decodes_or_raises(payload: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, f"clip{suffix}")
        path.write_bytes(payload)
        try:
            waveform = load_audio(path, sample_rate=8000)
        except AudioDecodeError:
            return
        # A decoded file is always a one-dimensional float32 waveform.
        assert waveform.dtype == np.float32
    # It has one dimension: samples.
    assert waveform.ndim == 1


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from([".wav", ".flac", ".mp3", ".ogg", ".au"]))
def test_load_audio_random_bytes(payload: bytes, suffix: str) -> None:
    _check_decodes_or_raises(payload, suffix)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(range(len(_REAL_HEADERS))), st.integers(0, 200), st.binary(max_size=512))
def test_load_audio_truncated_header(
        header_index: int, cut: int, tail: bytes) -> None:
    real = _REAL_HEADERS[header_index]
    suffix = ".flac" if header_index == 2 else ".wav"
    _check_decodes_or_raises(real[:cut] + tail, suffix)
