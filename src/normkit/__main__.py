"""``python -m normkit``: the ``normkit`` command."""

from __future__ import annotations

import sys

from normkit.cli import main

if __name__ == "__main__":  # guarded: the runner's spawned workers import this module again
    sys.exit(main())
