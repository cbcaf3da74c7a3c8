"""``python -m bench``: see bench/cli.py for the options (``python -m bench --help``)."""

import sys

from bench.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
