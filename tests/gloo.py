"""Process groups for the multi-process tests: gloo on localhost, one thread per rank."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def run_ranks(
    worker: Callable[..., None], world_size: int, tmp: Path, *args: Any, timeout_s: float = 120
) -> list[dict[str, Any]]:
    """Start ``worker(rank, store_path, out_dir, *args)`` in one spawned process per rank, wait
    for all of them, and return what each saved to ``out_dir/rank{r}.pt``."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(rank, str(tmp / "store"), str(tmp), *args))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
