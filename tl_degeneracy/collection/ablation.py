"""Ablation curves: run the model with intervention hooks and measure how far the output moves (SPEC §5b, §5c).

:func:`measure_losses` is the pass: for every batch one forward of the unablated model (its log-probabilities
cached for that batch only) serves every intervention, each one more forward. :func:`ablation_curves` builds
the interventions from bases (``basis.ablation_hooks``) and adds the quadratic prediction
(``basis.predicted_kl``, :mod:`tl_degeneracy.analysis.ablation`). The model's modes, parameter flags and the
user's hooks are left as they were, also after an exception.

Output positions: the batch's ``output_mask`` attribute when it has one, else its ``mask`` (SPEC §5b: for
text both are every non-BOS, non-pad position). Interventions act at the counted positions (``batch.mask``).

Example::

    ib, pb = tld.interaction_basis(...), tld.pca_basis(...)
    curves = tld.ablation_curves(model, data, {"interaction": ib, "pca": pb}, site="blocks.1.hook_resid_pre",
                                 stats=stats)
    curves["interaction"].loss, curves["interaction"].predicted
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_degeneracy._io import load_result, save_result
from tl_degeneracy.adapter import ModelAdapter, as_adapter
from tl_degeneracy.collection.distributed import context, shard, sharded_sums
from tl_degeneracy.collection.engine import accurate_matmuls
from tl_degeneracy.data import TokenBatch, TokenBatches
from tl_degeneracy.errors import BadInputError, NonFiniteError
from tl_degeneracy.sites import resolve_sites, site_dim

__all__ = ["AblationCurve", "LossMeasurement", "ablation_curve", "ablation_curves", "full_stream_hooks",
           "measure_loss", "measure_losses"]

LOSSES = ("kl", "ce", "top1")
Hooks = list[tuple[str, Callable[..., Any]]]
_FORMAT = "tl_degeneracy.AblationCurve"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LossMeasurement:
    """What :func:`measure_losses` returns.

    ``losses`` float64 [n]: one mean loss per intervention; ``baseline``: the unablated model's mean
    next-token cross-entropy (nats); ``n_tokens``: output positions averaged over; ``forwards``: model
    forwards run (batches × (1 + n)); ``seconds``: wall time.
    """

    losses: Float[Tensor, " n"]
    baseline: float
    n_tokens: int
    forwards: int
    seconds: float


def output_mask(batch: TokenBatch) -> Tensor:
    """The output positions of a batch: its ``output_mask`` when it carries one, else its counted ``mask``."""
    out = getattr(batch, "output_mask", None)
    return batch.mask if out is None else out


def measure_losses(
    model: Any,
    data: TokenBatches,
    interventions: Sequence[Callable[[TokenBatch], Hooks]],
    *,
    loss: str = "kl",
    progress: bool = True,
    desc: str = "ablate",
) -> LossMeasurement:
    """Mean loss of each intervention against the unablated model, over the data's output positions.

    Each intervention is a function ``batch → [(hook_name, fn), ...]`` (forward hooks that replace
    activations; :meth:`ModelAdapter.full_stream_hooks` is applied so 4.x ``hook_resid_mid`` replaces the
    whole stream). ``loss``: ``"kl"`` mean KL(p_original ‖ p_intervened); ``"ce"`` increase of the next-token
    cross-entropy; ``"top1"`` fraction of output positions whose argmax changed. Per batch: one unablated
    forward, then one forward per intervention (cost ``len(data) × (1 + n)`` forwards).

    Under ``torch.distributed`` (initialised, more than one rank) every rank measures its share of the
    batches (:func:`~tl_degeneracy.collection.distributed.shard`) and the sums are all-reduced, so every rank
    returns the same measurement as one process (up to float64 summation order); a rank that fails stops
    every rank, rank 0 naming it.
    """
    adapter = as_adapter(model)
    _check_loss(loss)
    if not isinstance(data, TokenBatches):
        raise BadInputError(f"data must be tld.token_batches(...) (TokenBatches), got {type(data).__name__}")
    data.validate_for(adapter)
    interventions = list(interventions)
    totals = torch.zeros(len(interventions), dtype=torch.float64)
    ce_total, n_out, n_ce, forwards = 0.0, 0, 0, 0
    start = time.perf_counter()
    ctx = context()
    bar = tqdm(total=len(data) * (1 + len(interventions)), unit="fwd", desc=desc,
               disable=not progress or (ctx is not None and not ctx.is_main))
    try:
        with sharded_sums(ctx) as acc, adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls(), \
                torch.no_grad():
            for batch in shard(data, ctx=ctx):
                tokens = batch.tokens.to(adapter.device)
                out = output_mask(batch).to(adapter.device)
                ref = torch.log_softmax(adapter.forward(tokens).to(torch.float64), dim=-1)
                targets, ce_mask = _next_tokens(tokens, out, batch.mask.to(adapter.device), ref.shape[-1])
                forwards += 1
                bar.update(1)
                ce_ref = -ref.gather(-1, targets[..., None]).squeeze(-1)
                ce_total += float(ce_ref[ce_mask].sum())
                n_out += int(out.sum())
                n_ce += int(ce_mask.sum())
                for i, make_hooks in enumerate(interventions):
                    hooks = adapter.full_stream_hooks(make_hooks(batch))
                    with adapter.hooks(fwd_hooks=hooks):
                        logits = adapter.forward(tokens)
                    forwards += 1
                    bar.update(1)
                    new = torch.log_softmax(logits.to(torch.float64), dim=-1)
                    if not bool(torch.isfinite(new[out]).all()):
                        raise NonFiniteError(f"NaN or inf in the logits of intervention {i} at batch {batch.index}")
                    totals[i] += _batch_loss(loss, ref, new, out, targets, ce_mask, ce_ref).cpu()
                del ref
                acc.sums = {"totals": totals, "ce": torch.tensor([ce_total], dtype=torch.float64),
                            "counts": torch.tensor([n_out, n_ce, forwards])}
    finally:
        bar.close()
    if acc.sums:  # the totals over ranks (sharded) or this process's
        totals = acc.sums["totals"].cpu()
        ce_total = float(acc.sums["ce"][0])
        n_out, n_ce, forwards = (int(x) for x in acc.sums["counts"].tolist())
    denom = n_ce if loss == "ce" else n_out
    if denom == 0:
        raise BadInputError("the data has no output positions to measure a loss on (check the masks)")
    return LossMeasurement(totals / denom, ce_total / max(n_ce, 1), denom, forwards, time.perf_counter() - start)


def measure_loss(
    model: Any, data: TokenBatches, fwd_hooks: Hooks, *, loss: str = "kl", progress: bool = False
) -> float:
    """Mean loss (see :func:`measure_losses`) of running the model with the fixed ``fwd_hooks``.

    Example: ``measure_loss(model, data, ib.ablation_hooks(site, keep=3))`` → the KL of that ablation
    (hooks that depend on the batch's mask: use :func:`measure_losses` with a function of the batch).
    """
    hooks = list(fwd_hooks)
    return float(measure_losses(model, data, [lambda _batch: hooks], loss=loss, progress=progress).losses[0])


def full_stream_hooks(model: Any, fwd_hooks: Hooks) -> Hooks:
    """Replacement hooks rewritten so they replace the whole stream on either TransformerLens major.

    On 4.x ``hook_resid_mid`` feeds only the MLP branch; this adds the change to ``hook_resid_post`` as well
    (:meth:`ModelAdapter.full_stream_hooks`). Other hooks pass unchanged. Example::

        with model.hooks(fwd_hooks=tld.full_stream_hooks(model, ib.ablation_hooks(site, keep=4))):
            logits = model(tokens)
    """
    return as_adapter(model).full_stream_hooks(fwd_hooks)


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise BadInputError(f"loss must be one of {LOSSES}, got {loss!r}")


def _next_tokens(tokens: Tensor, out: Tensor, counted: Tensor, n_out_vocab: int) -> tuple[Tensor, Tensor]:
    """Next-token targets [B, T] and where they exist: output positions whose next position is a real token
    inside the output vocabulary (``n_out_vocab`` logits; a model such as modular addition reads fewer
    tokens out than it reads in). Targets are 0 wherever the mask is False, so a gather never goes out of range.
    """
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    has_next = torch.zeros_like(out)
    has_next[:, :-1] = counted[:, 1:]
    ce_mask = out & has_next & (targets < n_out_vocab)
    return targets.masked_fill(~ce_mask, 0), ce_mask


def _batch_loss(loss: str, ref: Tensor, new: Tensor, out: Tensor, targets: Tensor, ce_mask: Tensor,
                ce_ref: Tensor) -> Tensor:
    """The batch's summed loss over its output positions (float64)."""
    if loss == "kl":
        kl = (ref.exp() * (ref - new)).sum(-1)
        return kl[out].sum()
    if loss == "ce":
        ce_new = -new.gather(-1, targets[..., None]).squeeze(-1)
        return (ce_new - ce_ref)[ce_mask].sum()
    changed = ref.argmax(-1) != new.argmax(-1)
    return changed[out].sum().to(torch.float64)


@dataclass(frozen=True, eq=False)
class AblationCurve:
    """Loss of keeping the top-k directions of a basis at one site, for each k of ``keep`` (SPEC §5c).

    Attributes:
        site: the hook name.
        kind: the basis's kind (``"interaction"``, ``"pca"``, ...).
        keep: the numbers of kept directions, in the order measured.
        loss: float64 ``[len(keep)]``: mean KL(p_original ‖ p_ablated) over the output positions
            (``"kl"``), the increase of the next-token cross-entropy (``"ce"``), or the fraction of output
            positions whose argmax changed (``"top1"``). 0 means unchanged for all three.
        loss_kind: ``"kl"`` | ``"ce"`` | ``"top1"``.
        predicted: float64 ``[len(keep)]`` quadratic prediction of the KL, or ``None`` (no ``stats``).
        baseline: the unablated model's mean next-token cross-entropy (nats) on the same data.
        n_tokens: output positions the loss averages over.
        dim: the basis's number of directions.
        meta: JSON-ready extra information (forwards, seconds, data).
    """

    site: str
    kind: str
    keep: list[int]
    loss: Float[Tensor, " n"] = field(repr=False)
    loss_kind: str
    predicted: Float[Tensor, " n"] | None = field(repr=False)
    baseline: float
    n_tokens: int
    dim: int
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (loss, predicted) and ``<path>.json`` (the rest); no pickle."""
        tensors = {"loss": self.loss}
        if self.predicted is not None:
            tensors["predicted"] = self.predicted
        info = {"site": self.site, "kind": self.kind, "keep": list(self.keep), "loss_kind": self.loss_kind,
                "baseline": self.baseline, "n_tokens": self.n_tokens, "dim": self.dim, "meta": self.meta}
        return save_result(path, tensors, info, fmt=_FORMAT, version=_FORMAT_VERSION)

    @classmethod
    def load(cls, path: str | Path) -> AblationCurve:
        """Read a curve written by :meth:`save` (bit for bit)."""
        tensors, meta = load_result(path, fmt=_FORMAT, version=_FORMAT_VERSION)
        return cls(site=meta["site"], kind=meta["kind"], keep=[int(k) for k in meta["keep"]],
                   loss=tensors["loss"], loss_kind=meta["loss_kind"], predicted=tensors.get("predicted"),
                   baseline=meta["baseline"], n_tokens=int(meta["n_tokens"]), dim=int(meta["dim"]),
                   meta=meta.get("meta", {}))


def ablation_curves(
    model: Any,
    data: TokenBatches,
    bases: Mapping[str, Any],
    *,
    site: str,
    keep: Sequence[int] | None = None,
    loss: str = "kl",
    stats: Any = None,
    progress: bool = True,
) -> dict[str, AblationCurve]:
    """Ablation curves of several bases of one site over the same batches (one unablated forward per batch).

    For each basis and each k of ``keep`` (``None``: :func:`~tl_degeneracy.analysis.ablation.keep_schedule`
    of that basis's ``dim``) the site's activation at every counted position becomes
    ``μ + C⁺[:, :k] C[:k] (a − μ)`` and the loss against the unablated model is measured (see
    :func:`measure_losses`). With ``stats`` holding KL Jacobian statistics of the site (``collect(...,
    jacobian="kl")``) each curve also gets ``predicted = ½ tr(M (I − P_k) G_c (I − P_k)ᵀ)`` (paper §6,
    footnote 5; SPEC §5c), a prediction of the KL (``loss="kl"`` only), times N_counted / N_outputs when the
    batches carry an output mask other than the counted mask (M is per counted token, the KL per output).

    Everything is checked before any batch runs: the site, each basis's input dimension, ``keep``, the loss
    and the statistics.

    Example::

        curves = tld.ablation_curves(model, data, {"interaction": ib, "pca": pb}, site=site, stats=stats)
        tld.directions_needed(curves["interaction"], 0.01)
    """
    adapter = as_adapter(model)
    _check_loss(loss)
    if not isinstance(data, TokenBatches):
        raise BadInputError(f"data must be tld.token_batches(...) (TokenBatches), got {type(data).__name__}")
    if not isinstance(bases, Mapping) or not bases:
        raise BadInputError("bases must be a non-empty dict {name: basis}, e.g. {'interaction': ib, 'pca': pb}")
    site = _one_site(adapter, site)
    d = site_dim(adapter, site)
    schedules: dict[str, list[int]] = {}
    for name, basis in bases.items():
        if not hasattr(basis, "ablation_hooks"):
            raise BadInputError(f"bases['{name}'] is a {type(basis).__name__}, not a basis (tld.interaction_basis)")
        if basis.input_dim != d:
            raise BadInputError(
                f"bases['{name}'] has input dimension {basis.input_dim} but site '{site}' has width {d}: "
                "a basis of another site?"
            )
        schedules[name] = _check_keep(keep, basis.dim, name)
    G_c = M = None
    if stats is not None:
        G_c, M = _kl_statistics(stats, site, loss, d)
    data.validate_for(adapter)

    order = [(name, k) for name, ks in schedules.items() for k in ks]
    interventions = [_intervention(bases[name], site, k) for name, k in order]
    measured = measure_losses(adapter, data, interventions, loss=loss, progress=progress, desc=f"ablate {site}")
    curves = {}
    for name, ks in schedules.items():
        losses = torch.stack([measured.losses[order.index((name, k))] for k in ks])
        predicted = None
        if G_c is not None:
            # M is per counted token (SPEC §5b: Σ over counted t of Σ over outputs s ≥ t, / N counted) while the
            # KL is averaged over output positions: scale by N_counted / N_outputs (1 when the masks agree)
            predicted = bases[name].predicted_kl(G_c, M, ks) * (data.n_counted / measured.n_tokens)
        meta = {"forwards_per_point": len(data), "unablated_forwards": len(data), "seconds": measured.seconds,
                "basis_kind": getattr(bases[name], "kind", name), "data": data.describe()}
        curves[name] = AblationCurve(site=site, kind=getattr(bases[name], "kind", name), keep=ks, loss=losses,
                                     loss_kind=loss, predicted=predicted, baseline=measured.baseline,
                                     n_tokens=measured.n_tokens, dim=bases[name].dim, meta=meta)
    return curves


def ablation_curve(
    model: Any,
    data: TokenBatches,
    basis: Any,
    *,
    site: str,
    keep: Sequence[int] | None = None,
    loss: str = "kl",
    stats: Any = None,
    progress: bool = True,
) -> AblationCurve:
    """The ablation curve of one basis at ``site`` (see :func:`ablation_curves`, which runs several at once).

    Example::

        curve = tld.ablation_curve(model, data, ib, site="blocks.1.hook_resid_pre", stats=stats)
        curve.keep, curve.loss, curve.predicted
    """
    name = getattr(basis, "kind", "basis")
    return ablation_curves(model, data, {name: basis}, site=site, keep=keep, loss=loss, stats=stats,
                           progress=progress)[name]


def _one_site(adapter: ModelAdapter, site: str) -> str:
    if not isinstance(site, str):
        raise BadInputError(f"site must be one hook name, e.g. 'blocks.0.hook_resid_pre', got {site!r}")
    names = resolve_sites(adapter, [site])
    if len(names) != 1:
        raise BadInputError(f"site '{site}' names {len(names)} hooks; pass one hook name, e.g. '{names[0]}'")
    return names[0]


def _check_keep(keep: Sequence[int] | None, dim: int, name: str) -> list[int]:
    from_schedule = keep is None
    if from_schedule:
        points = {0, 1, 2, dim, dim - 1, dim - 2, dim - 3, dim - 4}
        k = 4
        while k < dim:
            points.add(k)
            k *= 2
        return sorted(p for p in points if 0 <= p <= dim)
    values = [keep] if isinstance(keep, int) else list(keep)
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= dim]
    if not values or bad:
        raise BadInputError(f"keep {bad or values} out of range for bases['{name}'], which has {dim} directions "
                            f"(keep in 0..{dim})")
    return [int(k) for k in values]


def _kl_statistics(stats: Any, site: str, loss: str, d: int) -> tuple[Tensor, Tensor]:
    if loss != "kl":
        raise BadInputError(f"the quadratic prediction is of the KL; pass loss='kl' with stats, or stats=None "
                            f"for loss={loss!r}")
    metric = ((getattr(stats, "meta", {}) or {}).get("jacobian") or {}).get("metric")
    if site not in getattr(stats, "sites", []):
        raise BadInputError(f"stats have no site '{site}' (they have {list(getattr(stats, 'sites', []))})")
    if metric != "kl":
        raise BadInputError(f"a prediction needs KL Jacobian statistics for '{site}' (these have metric "
                            f"{metric!r}): collect with tld.collect(..., jacobian='kl'), or pass stats=None")
    M = stats.jacobian_gram(site)
    G_c = stats.gram(site, centered=True)
    if tuple(M.shape) != (d, d):
        raise BadInputError(f"the statistics of '{site}' are {tuple(M.shape)}, the site has width {d}")
    return G_c, M


def _intervention(basis: Any, site: str, k: int) -> Callable[[TokenBatch], Hooks]:
    def make(batch: TokenBatch) -> Hooks:
        return basis.ablation_hooks(site, keep=k, mask=batch.mask)

    return make
