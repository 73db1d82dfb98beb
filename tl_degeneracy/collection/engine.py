"""The collection engine: the component protocol, one batch, one checkpointed pass (SPEC §1, §2, §4).

A pass is built from *components* (:mod:`tl_degeneracy.collection.components`,
:mod:`tl_degeneracy.collection.jacobian`), each streaming one kind of statistic through hooks. Every component
writes *per-batch increments* (sums over the batch's counted tokens) into the batch's :class:`BatchContext`;
only when the whole batch finished cleanly are they checked for NaN/inf and added to the float64 totals. A
failing batch is therefore never added, and a checkpoint on disk is only ever replaced by a complete one.

Per-batch state lives in the :class:`BatchContext` (owned by :func:`run_batch`) and in closures created for
that batch only, so nothing of a batch outlives it.

Example::

    comps = [ActivationMoments(["blocks.0.hook_resid_pre"])]
    increments = run_batch(adapter, comps, batch, seed=0)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from tl_degeneracy.adapter import ModelAdapter
from tl_degeneracy.collection.kernels import gram_increment
from tl_degeneracy.data import TokenBatch, TokenBatches
from tl_degeneracy.errors import IncompatibleStatsError, NonFiniteError
from tl_degeneracy.sites import site_kind
from tl_degeneracy.stats import Stats

Hook = tuple[str, Callable[..., Any]]


class _StopForward(Exception):
    """Raised from the last hook a pass needs, so layers after it are never computed."""


@dataclass
class BatchContext:
    """What a component sees for one batch.

    ``mask`` [B, T] (on the model's device) marks counted positions; ``output_mask`` the output positions
    (SPEC §5b; the counted ones unless the data says otherwise); ``increments`` collects this batch's sums;
    ``generator`` is seeded from (seed, batch index) so a resumed run draws the same probes.
    ``scratch`` holds what a component's hooks share during the batch (keyed by the component); it is the only
    place for such state, and :func:`run_batch` empties it in a ``finally``, so that nothing of the batch
    (activations, the autograd graph, gradients) outlives it. This matters: backward hooks registered with
    ``register_full_backward_hook`` hang on the graph's ``grad_fn`` nodes, so a hook closure that reaches a
    tensor of the graph forms a reference cycle through C++ that ``gc`` cannot break (issue 13).
    ``workspace`` (given by :func:`run_pass`, which adds and drops each batch's increments before the next
    batch) holds float32 output buffers reused by :meth:`gram` from batch to batch; without it (a caller that
    keeps increments) every Gram is a fresh matrix.
    """

    batch: TokenBatch
    mask: Bool[torch.Tensor, "batch pos"]
    increments: dict[str, torch.Tensor]
    generator: torch.Generator
    adapter: ModelAdapter
    precision: str = "accurate"
    outputs: Bool[torch.Tensor, "batch pos"] | None = None
    scratch: dict[Any, Any] = field(default_factory=dict)
    workspace: dict[str, torch.Tensor] | None = None

    def release(self) -> None:
        """Drop every per-batch object the components left in ``scratch`` (each value's ``clear()`` first)."""
        for value in self.scratch.values():
            clear = getattr(value, "clear", None)
            if callable(clear):
                clear()
        self.scratch.clear()

    @property
    def output_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        return self.mask if self.outputs is None else self.outputs

    def add(self, key: str, value: torch.Tensor) -> None:
        self.increments[key] = self.increments[key] + value if key in self.increments else value

    def gram(self, x: Float[torch.Tensor, "n d"], *, buffer: str | None = None) -> Float[torch.Tensor, "d d"]:
        """xᵀx of one batch's rows in float32 at this pass's precision (see :func:`gram_increment`).

        ``buffer`` names a workspace buffer for the result, reused by the next batch: the caller must not
        hold the result (or a second result with the same name) beyond this batch's increments."""
        if buffer is None or self.workspace is None or x.device.type != "cpu":
            return gram_increment(x, fast=self.precision == "fast")
        out = gram_increment(x, fast=self.precision == "fast", out=self.workspace.get(buffer))
        self.workspace[buffer] = out
        return out


class Component:
    """A statistic streamed during the pass. Subclasses override the hooks they need.

    ``meta_key`` names the component's settings in ``stats.meta["components"]`` (a file-format name, fixed
    independently of the class name).
    """

    meta_key: str = ""

    #: the pass must run to the logits (no early stop) and keep an autograd graph
    needs_logits: bool = False

    def hook_names(self) -> list[str]:
        """Forward hook names this component reads (validated before the run)."""
        return []

    def fwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        return []

    def bwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        return []

    def after_forward(self, ctx: BatchContext, logits: torch.Tensor | None) -> None:
        """Runs after the forward, with every hook still attached (e.g. backward passes)."""

    def meta(self) -> dict[str, Any]:
        """Settings recorded in the metadata; statistics merge/resume only when these agree."""
        return {}


def flatten_site(act: torch.Tensor, name: str) -> Float[torch.Tensor, "batch pos d"]:
    """A site's activation as [B, T, d] (``attn_z`` [B, T, H, d_head] flattens its heads)."""
    return act.flatten(2) if act.ndim == 4 and site_kind(name) == "attn_z" else act


def check_finite(x: torch.Tensor, what: str, ctx: BatchContext) -> None:
    """Stop with :class:`NonFiniteError` naming ``what`` and the batch if ``x`` holds a NaN or an inf.

    NaN and ±inf propagate through a sum, so a finite sum proves every entry finite without the
    ``isfinite(x)`` boolean copy of ``x`` (a [tokens, vocab] temporary for the logits). Only a non-finite sum
    (which a sum of huge finite entries can also give) runs the elementwise check.
    """
    if x.numel() == 0 or not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            f"NaN or inf in {what} at batch {ctx.batch.index}; this batch was not added and any checkpoint "
            "on disk is unchanged. Check the model's weights and dtype (float16 overflows), or drop that batch"
        )



@contextlib.contextmanager
def accurate_matmuls() -> Iterator[None]:
    """float32 products with TF32 off (SPEC §1); previous settings restored, through the API the user set them
    with: PyTorch refuses to mix the legacy ``allow_tf32`` flags with the newer ``fp32_precision`` ones."""
    try:
        prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision())
    except RuntimeError:  # the user set precision through the new API: use it too
        prev = None
    if prev is None:
        with _ieee_fp32():
            yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[0], prev[1]
        torch.set_float32_matmul_precision(prev[2])


#: the fp32_precision settings (PyTorch >= 2.9) that may lower float32 matmul precision
_FP32_BACKENDS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"))


@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """``fp32_precision = "ieee"`` on every backend that has it; previous values restored."""
    targets = [getattr(getattr(torch.backends, b), op) for b, op in _FP32_BACKENDS
               if hasattr(getattr(torch.backends, b, None), op)]
    targets = [t for t in targets if hasattr(t, "fp32_precision")]
    prev = [t.fp32_precision for t in targets]
    try:
        for t in targets:
            t.fp32_precision = "ieee"
        yield
    finally:
        for t, value in zip(targets, prev, strict=True):
            t.fp32_precision = value


def run_batch(
    adapter: ModelAdapter, comps: Sequence[Component], batch: TokenBatch, seed: int, *, precision: str = "accurate",
    workspace: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One forward (and whatever backward passes the components ask for); returns the batch's increments.

    With ``workspace`` (see :class:`BatchContext`) some increments live in its buffers: add them to the totals
    before the next call with the same workspace."""
    device = adapter.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + batch.index)
    outputs = None if batch.outputs is None else batch.outputs.to(device)
    ctx = BatchContext(batch, batch.mask.to(device), {}, gen, adapter, precision=precision, outputs=outputs,
                       workspace=workspace)
    fwd = [h for c in comps for h in c.fwd_hooks(ctx)]
    bwd = [h for c in comps for h in c.bwd_hooks(ctx)]
    needs_logits = any(c.needs_logits for c in comps)
    if not needs_logits:
        fwd = _with_early_stop(fwd, ctx)
    logits = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "fast")
    try:
        with adapter.hooks(fwd_hooks=fwd, bwd_hooks=bwd), autocast:
            with torch.set_grad_enabled(needs_logits):
                try:
                    logits = adapter.forward(batch.tokens.to(device))
                except _StopForward:
                    pass
            for c in comps:
                c.after_forward(ctx, logits)
    finally:  # break every path from the hook closures to the batch's graph, also after an exception
        ctx.release()
        del logits, fwd, bwd
    for key, value in ctx.increments.items():
        if value.is_floating_point():
            check_finite(value, f"the statistic '{key}'", ctx)
    return ctx.increments


def _with_early_stop(fwd: list[Hook], ctx: BatchContext) -> list[Hook]:
    """Wrap forward hooks so the forward stops once every hook has run (nothing later is computed)."""
    remaining = {id(fn) for _, fn in fwd}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def hook(act: torch.Tensor, hook: Any) -> Any:
            out = fn(act, hook)
            remaining.discard(id(fn))
            if not remaining:
                raise _StopForward
            return out

        return hook

    return [(name, wrap(fn)) for name, fn in fwd]



def run_pass(
    adapter: ModelAdapter, data: TokenBatches, comps: list[Component], meta: dict[str, Any], *, seed: int,
    precision: str, checkpoint: str | Path | None, checkpoint_every: int, resume: bool, progress: bool, desc: str,
) -> Stats:
    """One pass over the data with the given components, checkpointed and resumable."""
    stats = Stats(meta={**meta, "n_tokens": 0, "batches_done": 0})
    if resume and Path(checkpoint).exists():
        stats = Stats.load(checkpoint).to(adapter.device)
        for key in ("model", "sites", "jacobian", "head_sync", "neuron_sync", "data", "precision"):
            if stats.meta.get(key) != meta[key]:
                raise IncompatibleStatsError(
                    f"checkpoint '{checkpoint}' was written with a different '{key}'; "
                    "resume with the same model, sites, settings and data, or start afresh (resume=False)"
                )
    done = int(stats.meta["batches_done"])
    bar = tqdm(total=data.n_counted, initial=stats.n_tokens, unit="tok", unit_scale=True,
               disable=not progress, desc=desc)
    start = time.perf_counter()
    workspace: dict[str, torch.Tensor] = {}  # Gram buffers reused by every batch (see BatchContext)
    try:
        with adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
            for batch in data:
                if batch.index < done:
                    continue
                increments = run_batch(adapter, comps, batch, seed, precision=precision, workspace=workspace)
                stats.add_(increments)
                del increments  # else the batch's float32 increments stay alive through the next batch
                n_batch = int(batch.mask.sum())
                stats.meta["n_tokens"] += n_batch
                stats.meta["batches_done"] = batch.index + 1
                bar.update(n_batch)
                if checkpoint is not None and (batch.index + 1) % checkpoint_every == 0:
                    stats.save(checkpoint)
    finally:
        bar.close()
    stats.meta["seconds"] = stats.meta.get("seconds", 0.0) + time.perf_counter() - start
    stats.to("cpu")
    if checkpoint is not None:
        stats.save(checkpoint)
    return stats
