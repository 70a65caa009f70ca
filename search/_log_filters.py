"""Log filters that drop known, harmless records of Optuna and MLflow."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

OPTUNA_OPTIMIZE_LOGGER = "optuna.study._optimize"
"""The logger of Optuna 4.9's ``Trial N failed ...`` records."""

_FAILED_WITH_NO_VALUE = re.compile(r"Trial \d+ failed with value None\.$")


class MessagePrefixFilter(logging.Filter):
    """Drops records whose formatted message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        """Return ``False`` for the records to drop."""
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def drop_log_messages(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop the records of ``logger_name`` that start with ``prefix`` inside the block.

    The filter sits on the logger that creates the records, so it also applies to records
    that other threads log meanwhile, but only to those with this prefix.
    """
    logger = logging.getLogger(logger_name)
    message_filter = MessagePrefixFilter(prefix)
    logger.addFilter(message_filter)
    try:
        yield
    finally:
        logger.removeFilter(message_filter)


class OptunaTrialFailureFilter(logging.Filter):
    """Drops Optuna's warnings about trials that ended with one of ``quiet_errors``.

    Optuna logs ``Trial N failed with parameters ... because of the following error`` with
    the full traceback for every trial that raised, including a trial stopped by Ctrl-C and
    a trial that was not needed. Those records are dropped here because the caller reports
    them in one line. Records of other exceptions keep their traceback. The follow-up
    ``Trial N failed with value None.`` record is dropped for every trial, because it
    only repeats that the trial failed.

    Args:
        quiet_errors: Exception types whose failure records are dropped.
    """

    def __init__(self, quiet_errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.quiet_errors = quiet_errors

    def filter(self, record: logging.LogRecord) -> bool:
        """Return ``False`` for the records to drop."""
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and isinstance(error, self.quiet_errors):
            return False
        return _FAILED_WITH_NO_VALUE.match(record.getMessage()) is None


def install_optuna_trial_filter(quiet_errors: tuple[type[BaseException], ...]) -> None:
    """Add an :class:`OptunaTrialFailureFilter` to Optuna's optimize logger, once per process."""
    logger = logging.getLogger(OPTUNA_OPTIMIZE_LOGGER)
    if any(isinstance(existing, OptunaTrialFailureFilter) for existing in logger.filters):
        return
    logger.addFilter(OptunaTrialFailureFilter(quiet_errors))
