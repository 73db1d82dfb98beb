"""Data-parallel passes with ``torch.distributed`` (gloo on CPUs, NCCL on GPUs), launched by ``torchrun``.

The statistics are sums over batches, so they shard exactly: rank r of W takes the batches whose position
after the resume point is ≡ r (mod W) (:func:`shard`), each batch keeps the probe seeds of a single-process
run (they come from (seed, batch.index) in :func:`~tl_degeneracy.collection.engine.run_batch`), and the
per-rank partial sums are added with one all-reduce per dtype (:func:`all_reduce_sums`).

A pass advances in *rounds* of W consecutive batches (one per rank). Partial sums are reduced only at the end
of a round, so the set of finished batches at every synchronisation point is a *prefix* of the batch order:
a checkpoint records ``batches_done`` (that prefix) and can be resumed with any world size. Every round also
all-reduces a two-number status (failed?, tokens counted), which drives the global progress bar on rank 0
and stops every rank at the same round when one fails (exception or NaN); the error is re-raised on every
rank, named with the failing rank, and the last checkpoint on disk stays the last complete one.

Reusable API for other passes (graph, ablation): :func:`context` (rank, world size, backend, or None when
not distributed), :func:`init_from_env`, :func:`shard` and :func:`all_reduce_sums`.

Example (``torchrun --nproc_per_node=2 script.py``)::

    from tl_degeneracy.collection import distributed as tdist
    ctx = tdist.init_from_env()                       # reads RANK, WORLD_SIZE, MASTER_ADDR, ... from torchrun
    sums = {}
    for batch in tdist.shard(data):                   # this rank's share
        sums["x"] = sums.get("x", 0) + f(batch)
    totals = tdist.all_reduce_sums(sums)              # identical on every rank
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tl_degeneracy import errors
from tl_degeneracy.adapter import ModelAdapter
from tl_degeneracy.collection.engine import Component, accurate_matmuls, run_batch
from tl_degeneracy.data import TokenBatches
from tl_degeneracy.errors import BadInputError, IncompatibleStatsError
from tl_degeneracy.stats import Stats

T = TypeVar("T")

#: the metadata a checkpoint must share with the run that resumes it (as in the single-process pass)
_RESUME_KEYS = ("model", "sites", "jacobian", "head_sync", "neuron_sync", "data", "precision")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group."""

    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_json(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}


_LOCAL_ONLY = [0]  # > 0 inside local_only(): passes run in this process alone


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside the block, :func:`context` is None: every pass runs in this process alone although a process
    group exists (the command line's rank 0 runs the stages other than the statistics alone, while the other
    ranks have left). Example::

        with local_only():
            curves = tld.ablation_curves(model, data, bases, site=site)   # no collective
    """
    _LOCAL_ONLY[0] += 1
    try:
        yield
    finally:
        _LOCAL_ONLY[0] -= 1


def context() -> DistContext | None:
    """The current process group as a :class:`DistContext`, or None when torch.distributed is not initialised
    (or inside :func:`local_only`)."""
    if _LOCAL_ONLY[0] or not (dist.is_available() and dist.is_initialized()):
        return None
    return DistContext(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def init_from_env(*, backend: str | None = None) -> DistContext:
    """Initialise the default process group from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) unless it already is; backend NCCL when CUDA is visible, else gloo.

    Under ``torchrun`` with CUDA the current device becomes ``cuda:LOCAL_RANK`` (rank → local GPU).
    """
    ctx = context()
    if ctx is not None:
        return ctx
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise BadInputError(
            f"distributed=True needs the torchrun environment ({', '.join(missing)} unset): launch with "
            "`torchrun --nproc_per_node=N ...`, or initialise torch.distributed yourself"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return context()  # type: ignore[return-value]


def local_device(device: str) -> str:
    """``"cuda"`` → ``"cuda:LOCAL_RANK"`` under torchrun (one GPU per process); anything else unchanged."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def shard(items: Iterable[T], *, start: int = 0, ctx: DistContext | None = None) -> Iterator[T]:
    """This rank's share of ``items``: the k-th item at or after position ``start`` goes to rank k mod W.

    Deterministic and disjoint; the union over ranks is every item from ``start`` on. Without a process
    group (``ctx`` None and torch.distributed not initialised) every item from ``start`` on.
    """
    ctx = ctx or context()
    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
    for i, item in enumerate(items):
        if i >= start and (i - start) % world == rank:
            yield item


def all_reduce_sums(sums: dict[str, torch.Tensor], *, ctx: DistContext | None = None) -> dict[str, torch.Tensor]:
    """Sum ``{name: tensor}`` over ranks; every rank gets the same totals (float64 / int64).

    Ranks may hold different key sets (a rank that saw no batch holds nothing): the union is agreed first
    (one small object gather) and missing entries count as zeros. Floating tensors are summed in float64,
    integer and bool tensors in int64, each dtype as one flat buffer (one collective per dtype). The result
    lives on the device of the first tensor given (the current CUDA device under NCCL when none is given).
    """
    ctx = ctx or context()
    out = {k: v.detach().to(torch.float64 if v.is_floating_point() else torch.int64) for k, v in sums.items()}
    if ctx is None or ctx.world_size == 1:
        return out
    shapes = {k: (tuple(v.shape), v.is_floating_point()) for k, v in out.items()}
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, shapes)
    union: dict[str, tuple[tuple[int, ...], bool]] = {}
    for part in gathered:
        for k, spec in part.items():
            if union.setdefault(k, spec) != spec:
                raise BadInputError(f"the sum '{k}' has different shapes or dtypes on different ranks: {union[k]} "
                                    f"vs {spec}")
    device = next(iter(out.values())).device if out else _collective_device(ctx)
    result: dict[str, torch.Tensor] = {}
    for floating, dtype in ((True, torch.float64), (False, torch.int64)):
        keys = sorted(k for k, (_, f) in union.items() if f == floating)
        if not keys:
            continue
        flat = torch.cat([(out[k] if k in out else torch.zeros(union[k][0], dtype=dtype, device=device))
                          .to(device).reshape(-1) for k in keys])
        dist.all_reduce(flat)
        offset = 0
        for k in keys:
            n = int(torch.Size(union[k][0]).numel())
            result[k] = flat[offset:offset + n].reshape(union[k][0])
            offset += n
    return result


def _collective_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def agree_min(value: float | None, *, ctx: DistContext | None = None) -> float | None:
    """The smallest ``value`` over ranks (None stays None on every rank: ranks plan alike)."""
    ctx = ctx or context()
    if ctx is None or ctx.world_size == 1 or value is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


class RankFailedError(errors.TLDegeneracyError, RuntimeError):
    """Another rank of a distributed pass failed; the message names that rank and its error."""


def raise_if_any_failed(own: BaseException | None, *, ctx: DistContext | None = None) -> None:
    """Call on every rank after a sharded loop, with the exception this rank caught (or None): when any rank
    failed, every rank raises (rank 0 a :class:`RankFailedError` naming the first failing rank); otherwise
    nothing happens. One small all-reduce; for passes other than ``collect`` (ablation, graph)."""
    ctx = ctx or context()
    if ctx is None or ctx.world_size == 1:
        if own is not None:
            raise own
        return
    flag = torch.tensor([0.0 if own is None else 1.0], dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(flag)
    if float(flag.item()) > 0:
        _raise_agreed(ctx, own)


@contextlib.contextmanager
def sharded_sums(ctx: DistContext | None = None) -> Iterator[ShardedSums]:
    """The pattern of every pass that sums over batches (ablation losses, LIB Grams, edges): loop over
    :func:`shard` inside the block and put the per-rank sums in ``acc.sums``; on leaving, every rank learns
    whether some rank failed (:func:`raise_if_any_failed`) and ``acc.sums`` become the totals over ranks.
    Without a process group (or with one rank) it changes nothing.

    Example::

        with sharded_sums() as acc:
            for batch in shard(data):
                acc.sums["x"] = acc.sums.get("x", 0) + f(batch)
        total = acc.sums["x"]
    """
    ctx = ctx or context()
    acc = ShardedSums({}, ctx if ctx is not None and ctx.world_size > 1 else None)
    failure: BaseException | None = None
    try:
        yield acc
    except Exception as err:  # noqa: BLE001 - sharded: every rank must learn of it before the sums
        if acc.ctx is None:
            raise
        failure = err
    if acc.ctx is not None:
        raise_if_any_failed(failure, ctx=acc.ctx)
        acc.sums = all_reduce_sums(acc.sums, ctx=acc.ctx)


@dataclass
class ShardedSums:
    """What :func:`sharded_sums` yields: ``sums`` (name → tensor, this rank's, then the totals) and ``ctx``
    (the process group when sharded, else None)."""

    sums: dict[str, torch.Tensor]
    ctx: DistContext | None


def _raise_agreed(ctx: DistContext, own: BaseException | None) -> None:
    """Every rank learns which ranks failed and raises: the failing rank its own error, others (and rank 0
    always) an error naming the first failing rank and its message."""
    messages: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(messages, None if own is None else (type(own).__name__, str(own)))
    first = next(r for r, m in enumerate(messages) if m is not None)
    kind, text = messages[first]
    if own is not None and not (ctx.is_main and first != ctx.rank):
        raise own
    raise RankFailedError(f"rank {first} of {ctx.world_size} failed with {kind}: {text}") from own


def run_pass_sharded(
    adapter: ModelAdapter, data: TokenBatches, comps: list[Component], meta: dict[str, Any], *, seed: int,
    precision: str, checkpoint: str | Path | None, checkpoint_every: int, resume: bool, progress: bool, desc: str,
    ctx: DistContext,
) -> Stats:
    """:func:`~tl_degeneracy.collection.engine.run_pass` over this rank's share of the batches.

    Totals are all-reduced at the end of a round whenever a multiple of ``checkpoint_every`` batches has been
    passed, and at the end; rank 0 alone writes the checkpoint (atomically, :meth:`Stats.save`). Every rank
    returns the same :class:`Stats`. With W = 1 the checkpoints fall where the single-process pass's do.
    """
    stats = Stats(meta={**meta, "n_tokens": 0, "batches_done": 0})
    if resume:
        stats = _load_checkpoint(Path(checkpoint), meta, ctx)
    stats.to(adapter.device)
    done = int(stats.meta["batches_done"])
    batches = list(data)
    local = Stats()  # this rank's sums since the last synchronisation
    world = ctx.world_size
    main = ctx.is_main
    bar = tqdm(total=data.n_counted, initial=stats.n_tokens, unit="tok", unit_scale=True,
               disable=not (progress and main), desc=f"{desc} ×{world}")
    status_device = _collective_device(ctx)
    start = time.perf_counter()
    failure: BaseException | None = None
    try:
        with adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
            for first in range(done, len(batches), world):
                round_end = min(first + world, len(batches))
                mine = first + ctx.rank
                n_mine = 0
                if mine < round_end and failure is None:
                    try:
                        local.add_(run_batch(adapter, comps, batches[mine], seed, precision=precision))
                        n_mine = int(batches[mine].mask.sum())
                    except Exception as err:  # noqa: BLE001 - handed to every rank below
                        failure = err
                status = torch.tensor([float(failure is not None), float(n_mine)], dtype=torch.float64,
                                      device=status_device)
                dist.all_reduce(status)
                if status[0] > 0:
                    _raise_agreed(ctx, failure)
                local.meta["n_tokens"] = local.n_tokens + n_mine
                bar.update(int(status[1]))
                crossed = round_end // checkpoint_every > first // checkpoint_every
                if round_end == len(batches) or (checkpoint is not None and crossed):
                    _synchronise(stats, local, round_end, ctx)
                    local = Stats()
                    if checkpoint is not None and crossed and round_end < len(batches) and main:
                        stats.save(checkpoint)
    finally:
        bar.close()
    seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=status_device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    stats.meta["seconds"] = stats.meta.get("seconds", 0.0) + float(seconds.item())
    stats.to("cpu")
    if checkpoint is not None and main:
        stats.save(checkpoint)
    return stats


def _synchronise(stats: Stats, local: Stats, round_end: int, ctx: DistContext) -> None:
    """Add every rank's partial sums (and token counts) into ``stats``; all batches before ``round_end`` done."""
    sums = dict(local.tensors)
    sums["__n_tokens__"] = torch.tensor(local.n_tokens, dtype=torch.int64, device=_collective_device(ctx))
    totals = all_reduce_sums(sums, ctx=ctx)
    n_tokens = int(totals.pop("__n_tokens__").item())
    stats.add_(totals)
    stats.meta["n_tokens"] = stats.n_tokens + n_tokens
    stats.meta["batches_done"] = round_end


def _load_checkpoint(path: Path, meta: dict[str, Any], ctx: DistContext) -> Stats:
    """Rank 0 reads the checkpoint and sends it to every rank (no shared file system needed)."""
    box: list[Any] = [None]
    if ctx.is_main:
        if path.exists():
            loaded = Stats.load(path)
            box[0] = ({k: v.cpu() for k, v in loaded.tensors.items()}, loaded.meta)
        else:
            box[0] = ({}, {**meta, "n_tokens": 0, "batches_done": 0})
    dist.broadcast_object_list(box, src=0)
    tensors, loaded_meta = box[0]
    stats = Stats(tensors, loaded_meta)
    for key in _RESUME_KEYS:
        if stats.meta.get(key) != meta[key]:
            raise IncompatibleStatsError(
                f"checkpoint '{path}' was written with a different '{key}'; "
                "resume with the same model, sites, settings and data, or start afresh (resume=False)"
            )
    return stats

