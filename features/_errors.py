"""Exceptions raised by the features package."""

from __future__ import annotations

__all__ = ["AudioDecodeError", "DatasetError"]


class AudioDecodeError(Exception):
    """An audio file could not be decoded into samples.

    The message names the file and the reason (unreadable, empty, corrupt, non-finite).
    """


class DatasetError(ValueError):
    """A dataset folder, track list or split list is unusable as given.

    Raised for a missing or empty folder, fewer than two genres, a track listed in two
    splits, or a split that is empty after filtering. The message names the path or
    value and how to fix it.
    """
