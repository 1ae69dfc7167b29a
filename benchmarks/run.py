"""Benchmark normkit's layers against their torch baselines; the same as ``normkit bench``.

    python benchmarks/run.py --quick
    python benchmarks/run.py --layers sabn,bcn --dtypes float32 --json bench.json

See ``python benchmarks/run.py --help`` and :mod:`normkit.bench`.
"""

from __future__ import annotations

import sys

from normkit.bench import main

if __name__ == "__main__":
    sys.exit(main())
