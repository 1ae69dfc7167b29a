"""Process-group set-up shared by the multi-process tests (gloo on localhost, one thread each)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_gloo(rank: int, store_path: str, world_size: int, timeout_s: float) -> None:
    """Join a gloo process group through the file store at ``store_path``; a peer that never
    comes fails the collective after ``timeout_s`` seconds."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
