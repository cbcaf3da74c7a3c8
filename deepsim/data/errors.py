"""The one exception type the data layer raises for bad input."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A dataset, folder or file is not what the loader expects.

    The message always names the file or folder at fault and says what was expected, e.g.
    ``"/data/stl10/unlabeled_X.bin: expected a multiple of 27648 bytes (N x 3 x 96 x 96 uint8), got 1000"``.
    """
