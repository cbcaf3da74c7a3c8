"""The errors a user can cause (bad input, a missing file); the CLI prints them as one line, no traceback."""

from __future__ import annotations

from deepsim.comparators import ComparatorWeightsError
from deepsim.data.errors import DataError
from deepsim.train.checkpoint import CheckpointError
from deepsim.train.loop import NonFiniteLossError

__all__ = ["USER_ERRORS"]


def _user_errors() -> tuple[type[BaseException], ...]:
    return (
        DataError,
        ComparatorWeightsError,
        CheckpointError,
        NonFiniteLossError,
        ValueError,
        KeyError,
        FileNotFoundError,
        FileExistsError,
    )


USER_ERRORS = _user_errors()
