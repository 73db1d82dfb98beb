"""One streaming pass over token data that fills a :class:`~tl_degeneracy.stats.Stats` (SPEC §1, §2, §4).

The pass is built from *components*, each streaming one kind of statistic through hooks:
activation moments (always), output-Jacobian statistics (``jacobian=``), head and neuron synchronisation
sums (``head_sync=``, ``neuron_sync=``). Every component writes *per-batch increments* (sums over the
batch's counted tokens) into a scratch dict; only when the whole batch finished cleanly are they checked
for NaN/inf and added to the float64 totals. A failing batch is therefore never added, and a checkpoint on
disk is only ever replaced by a complete, consistent one.

Example::

    data = tld.token_batches(model, "stdlib-heldout", seq_len=128, batch_size=16, n_tokens=20_000)
    stats = tld.collect(model, data, sites=tld.resolve_sites(model, ["resid_pre", "mlp_post"]))
    stats.gram("blocks.0.hook_resid_pre")
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from tl_degeneracy import __version__
from tl_degeneracy.data import TokenBatch, TokenBatches
from tl_degeneracy.errors import BadInputError, IncompatibleStatsError, NonFiniteError
from tl_degeneracy.memory import available_bytes, plan_memory
from tl_degeneracy.model import ModelAdapter, as_adapter
from tl_degeneracy.sites import resolve_sites, site_kind
from tl_degeneracy.stats import Stats

Hook = tuple[str, Callable[..., Any]]


class _StopForward(Exception):
    """Raised from the last hook a pass needs, so layers after it are never computed."""


@dataclass
class BatchContext:
    """What a component sees for one batch.

    ``mask`` [B, T] (on the model's device) marks counted positions; ``increments`` collects this batch's
    sums; ``generator`` is seeded from (seed, batch index) so a resumed run draws the same probes.
    """

    batch: TokenBatch
    mask: Bool[torch.Tensor, "batch pos"]
    increments: dict[str, torch.Tensor]
    generator: torch.Generator
    adapter: ModelAdapter
    precision: str = "accurate"

    def add(self, key: str, value: torch.Tensor) -> None:
        self.increments[key] = self.increments[key] + value if key in self.increments else value

    def gram(self, x: Float[torch.Tensor, "n d"]) -> Float[torch.Tensor, "d d"]:
        """xᵀx of one batch's rows in float32 at this pass's precision (see :func:`gram_increment`)."""
        return gram_increment(x, fast=self.precision == "fast")


class Component:
    """A statistic streamed during the pass. Subclasses override the hooks they need."""

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
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            f"NaN or inf in {what} at batch {ctx.batch.index}; this batch was not added and any checkpoint "
            "on disk is unchanged. Check the model's weights and dtype (float16 overflows), or drop that batch"
        )


def gram_increment(x: Float[torch.Tensor, "n d"], *, fast: bool = False) -> Float[torch.Tensor, "d d"]:
    """xᵀx of one batch's rows with float32 output; callers add it to float64 totals.

    Accurate: float32 inputs and products (TF32 is off during :func:`collect`). Fast: bfloat16 inputs with
    float32 accumulation and output (``torch.mm(..., out_dtype=float32)`` on CUDA; elsewhere the same
    numbers by rounding the inputs to bfloat16 and multiplying in float32). Autocast is off inside, so the
    output is never rounded to bfloat16.
    """
    with torch.autocast(x.device.type, enabled=False):
        if not fast:
            x = x.float()
            return x.T @ x
        xb = x.to(torch.bfloat16)
        if xb.is_cuda:
            return torch.mm(xb.T, xb, out_dtype=torch.float32)
        xf = xb.float()
        return xf.T @ xf


class ActivationMoments(Component):
    """n, Σa and Σaaᵀ per site over counted tokens (SPEC §1)."""

    def __init__(self, sites: Sequence[str]):
        self.sites = list(sites)

    def hook_names(self) -> list[str]:
        return self.sites

    def fwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        def make(site: str) -> Callable[..., None]:
            def hook(act: torch.Tensor, hook: Any) -> None:
                a = flatten_site(act, site).detach()
                check_finite(a, f"the activation at site '{site}'", ctx)
                x = a[ctx.mask]
                ctx.add(f"act/{site}/n", torch.tensor(x.shape[0], dtype=torch.int64))
                ctx.add(f"act/{site}/sum", x.double().sum(0))
                ctx.add(f"act/{site}/outer", ctx.gram(x))

            return hook

        return [(site, make(site)) for site in self.sites]


@contextlib.contextmanager
def accurate_matmuls() -> Iterator[None]:
    """float32 products with TF32 off (SPEC §1); previous settings restored."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[0], prev[1]
        torch.set_float32_matmul_precision(prev[2])


def _components(
    adapter: ModelAdapter, sites: list[str], *, jacobian: str | None, estimator: str, n_probes: int,
    precision: str, head_layers: Sequence[int], neuron_layers: Sequence[int],
) -> list[Component]:
    comps: list[Component] = [ActivationMoments(sites)]
    if jacobian is not None and sites:
        from tl_degeneracy.jacobian import JacobianMoments

        comps.append(JacobianMoments(adapter, sites, metric=jacobian, estimator=estimator, n_probes=n_probes))
    if head_layers or neuron_layers:
        from tl_degeneracy.sync import HeadSyncSums, NeuronSyncSums

        if head_layers:
            comps.append(HeadSyncSums(adapter, list(head_layers)))
        if neuron_layers:
            comps.append(NeuronSyncSums(adapter, list(neuron_layers)))
    return comps


def run_batch(
    adapter: ModelAdapter, comps: Sequence[Component], batch: TokenBatch, seed: int, *, precision: str = "accurate"
) -> dict[str, torch.Tensor]:
    """One forward (and whatever backward passes the components ask for); returns the batch's increments."""
    device = adapter.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + batch.index)
    ctx = BatchContext(batch, batch.mask.to(device), {}, gen, adapter, precision=precision)
    fwd = [h for c in comps for h in c.fwd_hooks(ctx)]
    bwd = [h for c in comps for h in c.bwd_hooks(ctx)]
    needs_logits = any(c.needs_logits for c in comps)
    if not needs_logits:
        fwd = _with_early_stop(fwd, ctx)
    logits = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "fast")
    with adapter.hooks(fwd_hooks=fwd, bwd_hooks=bwd), autocast:
        with torch.set_grad_enabled(needs_logits):
            try:
                logits = adapter.forward(batch.tokens.to(device))
            except _StopForward:
                pass
        for c in comps:
            c.after_forward(ctx, logits)
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


def collect(
    model: Any,
    data: TokenBatches,
    *,
    sites: Sequence[str] | str = (),
    jacobian: str | None = None,
    estimator: str = "probe",
    n_probes: int = 1,
    seed: int = 0,
    head_sync: bool = False,
    neuron_sync: bool = False,
    sync_layers: Sequence[int] | None = None,
    precision: str = "accurate",
    memory_budget: float | str | None = "auto",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
) -> Stats:
    """Stream activation statistics (and optionally Jacobian and synchronisation sums) over the data.

    Per site: n, s = Σ_t a_t and S = Σ_t a_t a_tᵀ over counted tokens (SPEC §1), totals in float64. With
    ``jacobian="kl" | "mse"``: Σ_t g_t g_tᵀ with E[g gᵀ] = J_tᵀ F J_t (SPEC §2), K = ``n_probes`` backward
    passes per batch for all sites together. The model runs in eval mode with frozen parameters (no weight
    gradient is ever computed); its mode, ``requires_grad`` flags and the user's own hooks are restored
    afterwards, also after an exception.

    ``precision="accurate"`` (default): float32 model and products with TF32 off. ``"fast"``: the forward and
    backward under bfloat16 autocast and Gram products of bfloat16 inputs with float32 output; totals stay
    float64 (see benchmarks/RESULTS.md for its measured noise floor).

    ``memory_budget``: ``"auto"`` plans against the device's free memory, a number of bytes simulates a
    budget, ``None`` plans nothing. A plan that does not fit splits the statistics over several passes over
    the data (same probes in each, so the totals equal one pass) and may lower the batch size; it warns and
    records the plan in ``stats.meta["memory_plan"]``.

    ``checkpoint``: a ``.safetensors`` path rewritten atomically every ``checkpoint_every`` batches and at the
    end; ``resume=True`` continues from it (same model, sites, settings and data, else
    :class:`IncompatibleStatsError`), giving the same totals as an uninterrupted run.
    """
    adapter = as_adapter(model)
    if not isinstance(data, TokenBatches):
        raise BadInputError("data must come from tld.token_batches(model, source, ...)")
    data.validate_for(adapter)
    site_list = [sites] if isinstance(sites, str) else list(sites)
    if site_list or not (head_sync or neuron_sync):  # synchronisation alone needs no vector site
        site_list = resolve_sites(adapter, site_list)
    if jacobian not in (None, "kl", "mse"):
        raise BadInputError(f"jacobian must be None, 'kl' or 'mse', got {jacobian!r}")
    if estimator not in ("probe", "exact"):
        raise BadInputError(f"estimator must be 'probe' or 'exact', got {estimator!r}")
    if precision not in ("accurate", "fast"):
        raise BadInputError(f"precision must be 'accurate' or 'fast', got {precision!r}")
    if n_probes < 1:
        raise BadInputError(f"n_probes must be >= 1, got {n_probes}")
    if checkpoint_every < 1:
        raise BadInputError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if resume and checkpoint is None:
        raise BadInputError("resume=True needs checkpoint= (the path the interrupted run wrote)")
    layers = list(range(adapter.n_layers)) if sync_layers is None else [int(x) for x in sync_layers]
    if any(not 0 <= x < adapter.n_layers for x in layers):
        raise BadInputError(f"sync_layers {layers} out of range: the model has layers 0..{adapter.n_layers - 1}")
    settings = dict(jacobian=jacobian, estimator=estimator, n_probes=n_probes, precision=precision)
    comps = _components(adapter, site_list, head_layers=layers if head_sync else [],
                        neuron_layers=layers if neuron_sync else [], **settings)
    adapter.check_hooks([n for c in comps for n in c.hook_names()])

    plan = plan_memory(adapter, site_list, batch_size=data.batch_size, seq_len=data.seq_len,
                       jacobian=jacobian is not None, head_sync_layers=layers if head_sync else (),
                       neuron_sync_layers=layers if neuron_sync else (), precision=precision,
                       budget_bytes=_budget(memory_budget, adapter.device))
    if plan.notes:
        warnings.warn(plan.describe(), stacklevel=2)
    if plan.batch_size != data.batch_size:
        data = TokenBatches(data.tokens, data.mask, plan.batch_size, data.description)

    meta = {
        "model": adapter.describe(),
        "sites": site_list,
        "jacobian": {"metric": jacobian, "estimator": estimator if jacobian else None,
                     "n_probes": n_probes if jacobian else None, "seed": seed if jacobian else None},
        "head_sync": layers if head_sync else False,
        "neuron_sync": layers if neuron_sync else False,
        "components": {type(c).__name__: c.meta() for c in comps},
        "data": data.describe(),
        "library_version": __version__,
        "precision": precision,
        "accumulator_dtype": "float64",
        "product_dtype": "float32 (TF32 off)" if precision == "accurate" else "bfloat16 inputs, float32 output",
        "seed": seed,
        "memory_plan": plan.to_dict(),
    }
    parts = []
    for i, group in enumerate(plan.passes):
        g_sites = [u.site for u in group if u.site is not None]
        g_comps = comps if plan.n_passes == 1 else _components(
            adapter, g_sites, head_layers=[u.head_layer for u in group if u.head_layer is not None],
            neuron_layers=[u.neuron_layer for u in group if u.neuron_layer is not None], **settings)
        g_meta = meta if plan.n_passes == 1 else {**meta, "sites": g_sites, "pass": [i, plan.n_passes],
                                                  "components": {type(c).__name__: c.meta() for c in g_comps}}
        g_ckpt = checkpoint if checkpoint is None or plan.n_passes == 1 else _pass_path(Path(checkpoint), i)
        desc = "collect" if plan.n_passes == 1 else f"collect pass {i + 1}/{plan.n_passes}"
        parts.append(_run_pass(adapter, data, g_comps, g_meta, seed=seed, precision=precision, checkpoint=g_ckpt,
                               checkpoint_every=checkpoint_every, resume=resume, progress=progress, desc=desc))
    if plan.n_passes == 1:
        return parts[0]
    stats = Stats({k: v for part in parts for k, v in part.tensors.items()}, {
        **meta, "n_tokens": parts[0].n_tokens, "batches_done": parts[0].meta["batches_done"],
        "seconds": sum(p.meta["seconds"] for p in parts)})
    if checkpoint is not None:
        stats.save(checkpoint)
    return stats


def _budget(memory_budget: float | str | None, device: torch.device) -> float | None:
    if memory_budget is None:
        return None
    if memory_budget == "auto":
        return float(available_bytes(device))
    if isinstance(memory_budget, str) or memory_budget <= 0:
        raise BadInputError(f"memory_budget must be 'auto', None or a positive number of bytes, got {memory_budget!r}")
    return float(memory_budget)


def _pass_path(checkpoint: Path, i: int) -> Path:
    return checkpoint.with_name(f"{checkpoint.stem}.pass{i}.safetensors")


def _run_pass(
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
    try:
        with adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
            for batch in data:
                if batch.index < done:
                    continue
                increments = run_batch(adapter, comps, batch, seed, precision=precision)
                stats.add_(increments)
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
