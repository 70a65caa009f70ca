"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEST_DATA_VARIABLE = "GENRE_SEARCH_TEST_DATA"


@pytest.fixture(scope="session")
def gtzan_mini() -> Path:
    """The folder of real GTZAN clips named by GENRE_SEARCH_TEST_DATA.

    Tests that need real audio skip when the variable is unset, and fail when it names a
    folder that does not exist, so a CI misconfiguration is not mistaken for a skip.
    """
    value = os.environ.get(TEST_DATA_VARIABLE)
    if not value:
        pytest.skip(f"{TEST_DATA_VARIABLE} is unset; point it at a folder of GTZAN clips")
    path = Path(value)
    assert path.is_dir(), f"{TEST_DATA_VARIABLE}={value!r} is not a folder"
    return path
