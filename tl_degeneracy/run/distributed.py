"""``torchrun --nproc_per_node=N -m tl_degeneracy run ...``: one run folder, written by rank 0.

Every rank parses the same command line. Rank 0 is the *lead*: it runs the stages in the run folder as a
single process would, and its statistics pass is sharded over all ranks (``collect`` shards whenever
``torch.distributed`` is initialised, :mod:`tl_degeneracy.collection.distributed`). The other ranks are
*followers*: they run only the statistics stage, in a private scratch folder that is deleted afterwards,
so they take part in its collectives and never write into the run folder. The lead sends them its marker of
that stage first, so every rank decides alike whether it runs (up to date → skipped everywhere). The
remaining stages (bases, synchronisation, LLC, report) run on rank 0.

A rank that fails exits non-zero; ``torchrun`` then stops the others. An exception inside the statistics
pass is agreed by all ranks at the next round (rank 0 names the failing rank) and the checkpoint left on
disk is the last complete one, which the next ``run`` resumes with any number of processes.

``--device cuda`` (or ``auto`` with GPUs) maps rank → ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tl_degeneracy._io import write_json
from tl_degeneracy.collection.distributed import DistContext, init_from_env
from tl_degeneracy.run.layout import RunFolder
from tl_degeneracy.run.pipeline import RunConfig, read_marker, run_stages

#: stages with collectives: every rank runs them
SHARDED_STAGES = ("stats",)


def start() -> DistContext | None:
    """Initialise torch.distributed when launched by torchrun with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return init_from_env()


def local_config(config: RunConfig) -> RunConfig:
    """``device`` ``cuda``/``auto`` (with CUDA) → ``cuda:LOCAL_RANK``: one GPU per process on each node."""
    if config.device in ("cuda", "auto") and torch.cuda.is_available():
        return dataclasses.replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return config


def share_markers(out: Path, ctx: DistContext) -> dict[str, Any]:
    """Rank 0's markers of the sharded stages, on every rank."""
    box: list[Any] = [{name: read_marker(out, name) for name in SHARDED_STAGES} if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(config: RunConfig, out: Path, stages: Sequence[str], ctx: DistContext, *, force: bool,
           threads: int | None) -> int:
    """A follower rank: run the sharded stages that rank 0 runs, in a scratch folder; returns 0."""
    markers = share_markers(out, ctx)
    mine = [s for s in stages if s in SHARDED_STAGES]
    if threads is not None:
        torch.set_num_threads(threads)
    scratch = Path(tempfile.mkdtemp(prefix=f"tl-degeneracy-rank{ctx.rank}-"))
    try:
        for name, marker in markers.items():
            if marker is not None:
                write_json(RunFolder(scratch).marker(name), marker)
        if mine:
            run_stages(config, scratch, mine, force=force, progress=False, log=lambda _: None, explicit=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
