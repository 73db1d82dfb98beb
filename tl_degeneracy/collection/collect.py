"""``collect``: one streaming pass over token data that fills a :class:`~tl_degeneracy.stats.Stats` (SPEC §1, §2, §4).

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

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_degeneracy._io import tensor_path
from tl_degeneracy._version import __version__
from tl_degeneracy.adapter import ModelAdapter, as_adapter
from tl_degeneracy.collection.components import ActivationMoments, HeadSyncSums, NeuronSyncSums
from tl_degeneracy.collection.distributed import agree_min, context, init_from_env, run_pass_sharded
from tl_degeneracy.collection.engine import Component, run_pass
from tl_degeneracy.collection.jacobian import JacobianMoments
from tl_degeneracy.collection.memory import available_bytes, plan_memory
from tl_degeneracy.data import TokenBatches
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import check_layers, resolve_sites
from tl_degeneracy.stats import Stats

#: backward passes per batch above which collect refuses without ``allow_expensive=True``
MAX_BACKWARDS_PER_BATCH = 4096


def _components(
    adapter: ModelAdapter, sites: list[str], *, jacobian: str | None, estimator: str, n_probes: int, top_k: int = 8,
    precision: str, head_layers: Sequence[int], neuron_layers: Sequence[int],
) -> list[Component]:
    comps: list[Component] = [ActivationMoments(sites)]
    if jacobian is not None and sites:
        comps.append(JacobianMoments(adapter, sites, metric=jacobian, estimator=estimator, n_probes=n_probes,
                                     top_k=top_k))
    if head_layers:
        comps.append(HeadSyncSums(adapter, list(head_layers)))
    if neuron_layers:
        comps.append(NeuronSyncSums(adapter, list(neuron_layers)))
    return comps



def collect(
    model: Any,
    data: TokenBatches,
    *,
    sites: Sequence[str] | str = (),
    jacobian: str | None = None,
    estimator: str = "probe",
    n_probes: int = 1,
    top_k: int = 8,
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
    allow_expensive: bool = False,
    distributed: bool | None = None,
) -> Stats:
    """Stream activation statistics (and optionally Jacobian and synchronisation sums) over the data.

    Per site: n, s = Σ_t a_t and S = Σ_t a_t a_tᵀ over counted tokens (SPEC §1), totals in float64. With
    ``jacobian="kl" | "mse"``: Σ_t g_t g_tᵀ with E[g gᵀ] = J_tᵀ F J_t (SPEC §2), K = ``n_probes`` backward
    passes per batch for all sites together. ``estimator="topk"`` (KL only; for peaked output distributions):
    the ``top_k`` largest columns of F^{1/2} exactly plus K tail probes, k + K backward passes per batch
    (:mod:`tl_degeneracy.collection.probes`); ``"exact"``: T · V backward passes per batch (tiny models).
    The model runs in eval mode with frozen parameters (no weight
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

    Cost guard: more than :data:`MAX_BACKWARDS_PER_BATCH` backward passes per batch (``n_probes``, or T·V
    for ``estimator="exact"``) is refused before anything runs unless ``allow_expensive=True``.
    ``distributed``: ``None`` (default) shards the batches over the ranks when ``torch.distributed`` is
    initialised; ``True`` also initialises it from the ``torchrun`` environment; ``False`` never shards.
    Sharded, every rank takes a disjoint share of the batches with the probe seeds of a single-process run,
    the float64 totals are all-reduced at checkpoints and at the end, every rank returns the same Stats and
    rank 0 alone writes the checkpoint; a checkpoint resumes with any world size
    (:mod:`tl_degeneracy.collection.distributed`).
    """
    adapter = as_adapter(model)
    if not isinstance(data, TokenBatches):
        raise BadInputError("data must come from tld.token_batches(model, source, ...)")
    data.validate_for(adapter)
    site_list = list(sites) if not isinstance(sites, str) else [sites] if sites else []
    if site_list or not (head_sync or neuron_sync):  # synchronisation alone needs no vector site
        site_list = resolve_sites(adapter, sites)
    if jacobian not in (None, "kl", "mse"):
        raise BadInputError(f"jacobian must be None, 'kl' or 'mse', got {jacobian!r}")
    if estimator not in ("probe", "exact", "topk"):
        raise BadInputError(f"estimator must be 'probe', 'exact' or 'topk', got {estimator!r}")
    if estimator == "topk" and (jacobian != "kl" or top_k < 1):
        raise BadInputError(f"estimator='topk' needs jacobian='kl' and top_k >= 1, got {jacobian!r}, top_k={top_k}")
    if precision not in ("accurate", "fast"):
        raise BadInputError(f"precision must be 'accurate' or 'fast', got {precision!r}")
    if n_probes < 1:
        raise BadInputError(f"n_probes must be >= 1, got {n_probes}")
    if jacobian is not None and not allow_expensive:
        backwards = data.seq_len * adapter.d_vocab if estimator == "exact" else n_probes
        if backwards > MAX_BACKWARDS_PER_BATCH:
            what = (f"estimator='exact' needs T·V = {data.seq_len}·{adapter.d_vocab}" if estimator == "exact"
                    else f"n_probes={n_probes} needs {n_probes}")
            raise BadInputError(
                f"{what} = {backwards} backward passes per batch of {len(data)} batches (hours or days); "
                f"at most {MAX_BACKWARDS_PER_BATCH} run without asking: use estimator='probe' with a few probes, "
                "or pass allow_expensive=True"
            )
    if checkpoint_every < 1:
        raise BadInputError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if resume and checkpoint is None:
        raise BadInputError("resume=True needs checkpoint= (the path the interrupted run wrote)")
    if checkpoint is not None:  # Stats.save appends .safetensors: resume must look where it was written
        checkpoint = tensor_path(checkpoint)
    if distributed not in (None, True, False):
        raise BadInputError(f"distributed must be None, True or False, got {distributed!r}")
    ctx = init_from_env() if distributed else context() if distributed is None else None
    layers = list(range(adapter.n_layers)) if sync_layers is None else check_layers(
        adapter, sync_layers, what="sync_layers", sort=False)
    settings = dict(jacobian=jacobian, estimator=estimator, n_probes=n_probes, top_k=top_k, precision=precision)
    comps = _components(adapter, site_list, head_layers=layers if head_sync else [],
                        neuron_layers=layers if neuron_sync else [], **settings)
    adapter.check_hooks([n for c in comps for n in c.hook_names()])

    plan = plan_memory(adapter, site_list, batch_size=data.batch_size, seq_len=data.seq_len,
                       jacobian=jacobian is not None, head_sync_layers=layers if head_sync else (),
                       neuron_sync_layers=layers if neuron_sync else (), precision=precision,
                       budget_bytes=_budget(memory_budget, adapter.device) if ctx is None else
                       agree_min(_budget(memory_budget, adapter.device), ctx=ctx))
    if plan.notes:
        warnings.warn(plan.describe(), stacklevel=2)
    if plan.batch_size != data.batch_size:
        data = data.with_batch_size(plan.batch_size)

    meta = {
        "model": {**adapter.describe(), "weights": adapter.weights_fingerprint()},  # resume/merge compare it
        "sites": site_list,
        "jacobian": {"metric": jacobian, "estimator": estimator if jacobian else None,
                     "n_probes": n_probes if jacobian else None, "seed": seed if jacobian else None,
                     **({"top_k": top_k} if jacobian and estimator == "topk" else {})},
        "head_sync": layers if head_sync else False,
        "neuron_sync": layers if neuron_sync else False,
        "components": {c.meta_key: c.meta() for c in comps},
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
                                                  "components": {c.meta_key: c.meta() for c in g_comps}}
        g_ckpt = checkpoint if checkpoint is None or plan.n_passes == 1 else _pass_path(Path(checkpoint), i)
        desc = "collect" if plan.n_passes == 1 else f"collect pass {i + 1}/{plan.n_passes}"
        options = dict(seed=seed, precision=precision, checkpoint=g_ckpt, checkpoint_every=checkpoint_every,
                       resume=resume, progress=progress, desc=desc)
        parts.append(run_pass(adapter, data, g_comps, g_meta, **options) if ctx is None else
                     run_pass_sharded(adapter, data, g_comps, g_meta, ctx=ctx, **options))
    if plan.n_passes == 1:
        return parts[0]
    stats = Stats({k: v for part in parts for k, v in part.tensors.items()}, {
        **meta, "n_tokens": parts[0].n_tokens, "batches_done": parts[0].meta["batches_done"],
        "seconds": sum(p.meta["seconds"] for p in parts)})
    if checkpoint is not None and (ctx is None or ctx.is_main):
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

