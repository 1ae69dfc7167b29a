"""Test-session settings: deterministic, and no thread oversubscription under pytest-xdist."""

from __future__ import annotations

import os

import torch


def pytest_configure() -> None:
    # Each xdist worker is a process; two workers with two threads each on two cores only
    # contend, and small tensors gain nothing from intra-op threads.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
