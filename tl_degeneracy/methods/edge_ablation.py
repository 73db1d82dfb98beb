"""Edge ablation on the interaction graph and the companion paper's sparsity measure, edges needed.

For a site pair A → B of an :class:`~tl_degeneracy.InteractionGraph`, keep the n strongest edges (largest
E[i, j]) and remove the others by patching B's basis coordinates (rib's edge ablation, removed sources at their
mean; exact for maps affine in A: :mod:`tl_degeneracy.collection.edge_ablation`), then measure the loss of the
model's output against the unablated model as the ablation curves do (:func:`tl_degeneracy.measure_losses`:
KL, cross-entropy increase or top-1 changes over the output positions).

:func:`edges_needed` is the smallest number of kept edges whose ablation keeps the loss within a tolerance,
found by bisection over n ∈ [0, k_A·k_B] (keeping every edge is the unablated model, loss 0 by construction):
about log₂(k_A·k_B) measurements. Comparing it across the interaction, local and PCA bases of the same pair
is the companion paper's sparsity comparison (a sparser basis needs fewer edges).

Example::

    graph = tld.interaction_graph(model, data, bases, sites)
    needed = tld.edges_needed(model, data, bases, graph, pair=(sites[0], sites[1]), tolerance=0.01)
    needed.n_edges, needed.n_total
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degeneracy._io import load_result, save_result
from tl_degeneracy.adapter import as_adapter
from tl_degeneracy.analysis.ablation import LOSSES, check_keep
from tl_degeneracy.analysis.graph import InteractionGraph
from tl_degeneracy.collection.ablation import measure_losses
from tl_degeneracy.collection.cut import check_site_chain
from tl_degeneracy.collection.edge_ablation import edge_intervention, keep_mask
from tl_degeneracy.data import TokenBatches
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import site_dim

__all__ = ["EdgeAblationCurve", "EdgesNeeded", "edge_ablation_curve", "edges_needed"]

_CURVE_FORMAT, _NEEDED_FORMAT, _VERSION = "tl_degeneracy.EdgeAblationCurve", "tl_degeneracy.EdgesNeeded", 1


@dataclass(frozen=True, eq=False)
class EdgeAblationCurve:
    """Loss of keeping only the n strongest edges of a pair A → B, for each n of ``keep``.

    Attributes:
        pair: ``(A, B)`` hook names.
        kind: the bases' kind (``"local"``, ``"interaction"``, ``"pca"``, ...).
        keep: numbers of kept edges, in the order measured.
        loss: float64 ``[len(keep)]``, the loss against the unablated model (``loss_kind``; 0 = unchanged).
        loss_kind: ``"kl"`` | ``"ce"`` | ``"top1"`` (as :class:`~tl_degeneracy.AblationCurve`).
        baseline: the unablated model's mean next-token cross-entropy (nats) on the same data.
        n_tokens: output positions the loss averages over.
        n_total: k_A·k_B, the number of edges of the pair.
        meta: JSON-ready extras (forwards, seconds, ``dims`` [k_A, k_B], data).
    """

    pair: tuple[str, str]
    kind: str
    keep: list[int]
    loss: Float[Tensor, " n"] = field(repr=False)
    loss_kind: str
    baseline: float
    n_tokens: int
    n_total: int
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> Path:
        """``<path>.safetensors`` (loss) + ``<path>.json`` (the rest); no pickle."""
        return _save(path, {"loss": self.loss}, _CURVE_FORMAT, self._info())

    @classmethod
    def load(cls, path: str | Path) -> EdgeAblationCurve:
        """Read a curve written by :meth:`save`."""
        tensors, info = _load(path, _CURVE_FORMAT)
        return cls(pair=tuple(info["pair"]), kind=info["kind"], keep=[int(k) for k in info["keep"]],
                   loss=tensors["loss"], loss_kind=info["loss_kind"], baseline=info["baseline"],
                   n_tokens=int(info["n_tokens"]), n_total=int(info["n_total"]), meta=info.get("meta", {}))

    def _info(self) -> dict[str, Any]:
        return {"pair": list(self.pair), "kind": self.kind, "keep": list(self.keep), "loss_kind": self.loss_kind,
                "baseline": self.baseline, "n_tokens": self.n_tokens, "n_total": self.n_total, "meta": self.meta}


@dataclass(frozen=True, eq=False)
class EdgesNeeded:
    """The smallest number of kept edges of a pair whose edge ablation keeps the loss within ``tolerance``.

    Attributes:
        pair, kind, loss_kind, baseline, n_tokens, n_total: as in :class:`EdgeAblationCurve`.
        tolerance: the loss bound.
        n_edges: the bisection's answer: ``loss(n_edges) ≤ tolerance`` and ``loss(n_edges − 1) > tolerance``
            (both measured unless n_edges is 0 or ``n_total``; keeping every edge has loss 0).
        fraction: ``n_edges / n_total``.
        probed: the numbers of kept edges measured, in bisection order; ``loss`` float64 their losses.
        meta: JSON-ready extras (forwards, seconds, ``dims`` [k_A, k_B], data).
    """

    pair: tuple[str, str]
    kind: str
    tolerance: float
    n_edges: int
    n_total: int
    probed: list[int]
    loss: Float[Tensor, " n"] = field(repr=False)
    loss_kind: str
    baseline: float
    n_tokens: int
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def fraction(self) -> float:
        return self.n_edges / self.n_total if self.n_total else 0.0

    def save(self, path: str | Path) -> Path:
        """``<path>.safetensors`` (losses of the probes) + ``<path>.json`` (the rest); no pickle."""
        return _save(path, {"loss": self.loss}, _NEEDED_FORMAT,
                     {"pair": list(self.pair), "kind": self.kind, "tolerance": self.tolerance,
                      "n_edges": self.n_edges, "n_total": self.n_total, "probed": list(self.probed),
                      "loss_kind": self.loss_kind, "baseline": self.baseline, "n_tokens": self.n_tokens,
                      "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> EdgesNeeded:
        """Read a result written by :meth:`save`."""
        tensors, info = _load(path, _NEEDED_FORMAT)
        return cls(pair=tuple(info["pair"]), kind=info["kind"], tolerance=float(info["tolerance"]),
                   n_edges=int(info["n_edges"]), n_total=int(info["n_total"]),
                   probed=[int(k) for k in info["probed"]], loss=tensors["loss"], loss_kind=info["loss_kind"],
                   baseline=info["baseline"], n_tokens=int(info["n_tokens"]), meta=info.get("meta", {}))


def edge_ablation_curve(
    model: Any, data: TokenBatches, bases: Mapping[str, Any], graph: InteractionGraph, *,
    pair: tuple[str, str] | None = None, keep: int | Sequence[int] | None = None, loss: str = "kl",
    progress: bool = True,
) -> EdgeAblationCurve:
    """Loss of keeping only the n strongest edges of ``pair`` = (A, B) (removing the others), for each n in
    ``keep`` (``None``: 0, 1, 2, 4, 8, … and the last few up to k_A·k_B).

    Removal patches B's basis coordinates: output node j is recomputed from A with the sources of its
    removed edges at their mean, f̂_{A,i} → 0 (rib's edge ablation; exact — the removed edges' contributions
    subtracted — for maps affine in A). ``graph.edges[pair]`` ranks the edges; ``bases`` are the bases the
    graph was computed in (``{site: InteractionBasis}``, at least A and B). The loss is measured as in
    :func:`tl_degeneracy.measure_losses` (one unablated forward per batch serves every n).

    Args:
        pair: the consecutive pair ``(A, B)``; may be left out when the graph has one pair.
        keep: numbers of kept edges (each in 0..k_A·k_B).
        loss: ``"kl"`` | ``"ce"`` | ``"top1"``.

    Example::

        curve = tld.edge_ablation_curve(model, data, bases, graph, pair=(a, b), keep=[0, 10, 100])
        curve.loss                                          # KL at 0, 10 and 100 kept edges
    """
    adapter, (a, b), E = _check(model, data, bases, graph, pair, loss)
    ks = check_keep(keep, E.numel(), what="keep (numbers of kept edges)")
    start = time.perf_counter()
    interventions = [edge_intervention(adapter, a, b, bases[a], bases[b], keep_mask(E, k)) for k in ks]
    measured = measure_losses(adapter, data, interventions, loss=loss, progress=progress, desc=f"edges {a}")
    return EdgeAblationCurve(pair=(a, b), kind=_kind(bases, a), keep=ks, loss=measured.losses, loss_kind=loss,
                             baseline=measured.baseline, n_tokens=measured.n_tokens, n_total=E.numel(),
                             meta={"forwards": measured.forwards, "seconds": time.perf_counter() - start,
                                   "dims": list(E.shape), "data": data.describe()})


def edges_needed(
    model: Any, data: TokenBatches, bases: Mapping[str, Any], graph: InteractionGraph, *, tolerance: float,
    pair: tuple[str, str] | None = None, loss: str = "kl", progress: bool = True,
) -> EdgesNeeded:
    """The smallest number of kept edges of ``pair`` whose edge ablation keeps the loss ≤ ``tolerance``
    (the companion paper's sparsity measure), by bisection over n ∈ [0, k_A·k_B].

    Invariant: ``hi`` satisfies the tolerance (initially k_A·k_B: every edge kept is the unablated model),
    ``lo`` does not (initially −1); each step measures ``(lo + hi) // 2``, one
    :func:`edge_ablation_curve` point, until ``hi − lo = 1``: ⌈log₂(k_A·k_B + 1)⌉ measurements. The answer
    equals a scan from n = k_A·k_B down when the loss falls as edges are added (as the strongest-first order
    intends); otherwise it is still a point where the tolerance is crossed. Edge ablation and ``bases`` as in
    :func:`edge_ablation_curve`.

    Example (the companion paper compares bases on the same pair)::

        for kind, (bases, graph) in {"local": (lib, g_lib), "pca": (pca, g_pca)}.items():
            print(kind, tld.edges_needed(model, data, bases, graph, pair=pair, tolerance=0.01).n_edges)
    """
    if isinstance(tolerance, bool) or not (isinstance(tolerance, int | float) and math.isfinite(tolerance)
                                           and tolerance >= 0):
        raise BadInputError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    adapter, (a, b), E = _check(model, data, bases, graph, pair, loss)
    start = time.perf_counter()
    lo, hi = -1, E.numel()
    probed: list[int] = []
    losses: list[float] = []
    baseline, n_tokens, forwards = math.nan, 0, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measured = measure_losses(adapter, data, [edge_intervention(adapter, a, b, bases[a], bases[b],
                                                                    keep_mask(E, mid))],
                                  loss=loss, progress=progress, desc=f"edges {a} keep {mid}")
        value = float(measured.losses[0])
        baseline, n_tokens, forwards = measured.baseline, measured.n_tokens, forwards + measured.forwards
        probed.append(mid)
        losses.append(value)
        if value <= tolerance:
            hi = mid
        else:
            lo = mid
    return EdgesNeeded(pair=(a, b), kind=_kind(bases, a), tolerance=float(tolerance), n_edges=hi,
                       n_total=E.numel(), probed=probed, loss=torch.tensor(losses, dtype=torch.float64),
                       loss_kind=loss, baseline=baseline, n_tokens=n_tokens,
                       meta={"forwards": forwards, "seconds": time.perf_counter() - start, "dims": list(E.shape),
                             "data": data.describe()})


def _check(model: Any, data: TokenBatches, bases: Mapping[str, Any], graph: Any, pair: Any,
           loss: str) -> tuple[Any, tuple[str, str], Tensor]:
    """Everything checked before any forward: loss, data, graph, pair, bases and their dimensions."""
    if loss not in LOSSES:
        raise BadInputError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(data, TokenBatches):
        raise BadInputError(f"data must be tld.token_batches(...) (TokenBatches), got {type(data).__name__}")
    if not isinstance(graph, InteractionGraph):
        raise BadInputError(f"graph must be a tld.InteractionGraph (tld.interaction_graph), got "
                            f"{type(graph).__name__}")
    pairs = list(graph.edges)
    if pair is None:
        if len(pairs) != 1:
            raise BadInputError(f"the graph has {len(pairs)} site pairs; pass pair=(A, B), one of {pairs}")
        pair = pairs[0]
    if not (isinstance(pair, tuple | list) and len(pair) == 2 and tuple(pair) in graph.edges):
        raise BadInputError(f"pair {pair!r} is not a pair of this graph; pass one of {pairs}")
    a, b = tuple(pair)
    adapter = as_adapter(model)
    check_site_chain(adapter, [a, b])
    if not isinstance(bases, Mapping) or a not in bases or b not in bases:
        raise BadInputError(f"bases must be a dict {{site: basis}} with both '{a}' and '{b}' (the bases the graph "
                            "was computed in)")
    E = graph.edges[(a, b)]
    for site, basis, k in ((a, bases[a], E.shape[0]), (b, bases[b], E.shape[1])):
        d = site_dim(adapter, site)
        C = getattr(basis, "C", None)
        if not isinstance(C, Tensor) or tuple(C.shape) != (k, d) or tuple(basis.C_pinv.shape) != (d, k) \
                or tuple(basis.mean.shape) != (d,):
            shape = tuple(C.shape) if isinstance(C, Tensor) else None
            raise BadInputError(f"the basis of '{site}' has C {shape} but the graph has {k} nodes there and the "
                                f"site has width {d}; pass the bases the graph was computed in")
        graph_kind = ((graph.meta or {}).get("basis_kinds") or {}).get(site)
        kind = getattr(basis, "kind", None)
        if graph_kind is not None and kind is not None and graph_kind != kind:
            raise BadInputError(f"the graph was computed in {graph_kind!r} bases but bases['{site}'] is {kind!r}; "
                                "pass the bases the graph was computed in")
    data.validate_for(adapter)
    return adapter, (a, b), E


def _kind(bases: Mapping[str, Any], site: str) -> str:
    return str(getattr(bases[site], "kind", None) or "basis")


def _save(path: str | Path, tensors: dict[str, Tensor], fmt: str, info: dict[str, Any]) -> Path:
    return save_result(path, tensors, info, fmt=fmt, version=_VERSION)


def _load(path: str | Path, fmt: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return load_result(path, fmt=fmt, version=_VERSION)
