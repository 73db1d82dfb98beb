"""Public entry points of the interaction graph: the local interaction basis and the edges (paper §4–5).

They join a model pass (:mod:`tl_degeneracy.collection.lib`, :mod:`tl_degeneracy.collection.edges`) with
the pure analyses (:func:`tl_degeneracy.interaction_basis`, :class:`tl_degeneracy.InteractionGraph`), which
the layer order keeps apart, so they live in the layer that may use both.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

from tl_degeneracy.adapter import as_adapter
from tl_degeneracy.analysis.basis import DEFAULT_RTOL, InteractionBasis, interaction_bases, interaction_basis
from tl_degeneracy.analysis.graph import InteractionGraph
from tl_degeneracy.collection.cut import check_site_chain
from tl_degeneracy.collection.edges import ESTIMATORS as EDGE_ESTIMATORS
from tl_degeneracy.collection.edges import edge_matrix, quadrature
from tl_degeneracy.collection.lib import ESTIMATORS as LIB_ESTIMATORS
from tl_degeneracy.collection.lib import local_jacobian_gram
from tl_degeneracy.data import TokenBatches
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import site_dim

__all__ = ["interaction_graph", "local_interaction_bases"]


def local_interaction_bases(
    model: Any, data: TokenBatches, sites: Sequence[str], *, stats: Any, rtol: float = DEFAULT_RTOL,
    atol: float = 0.0, n_probes: int = 4, seed: int = 0, estimator: str = "probe",
) -> dict[str, InteractionBasis]:
    """Local interaction bases (LIB, companion paper), built backwards from the last site.

    The last site's basis is its global interaction basis (G and the output-Jacobian Gram M of ``stats``,
    eq. 38–40). For each earlier site A with next site B,

        M_A = (1/N) Σ_t Σ_{t'} J_{B←A}(t', t)ᵀ C_Bᵀ C_B J_{B←A}(t', t)

    (the Jacobian Gram of B's basis coordinates, not of the logits), then the same two steps as
    :func:`~tl_degeneracy.interaction_basis` with A's centred G and mean from ``stats``. Probes are drawn in B's
    basis coordinates and backpropagated from B to A only (``estimator="probe"``, ``n_probes`` per batch);
    ``estimator="exact"`` is the oracle for tiny models. **One pass over the data per site except the last**
    (each needs the next site's basis), each a forward to B and backward passes to A.

    Args:
        model: the TransformerLens model (run through hooks; its weights are never copied).
        data: token batches (:func:`tl_degeneracy.token_batches`).
        sites: hook names in forward order; every one but the last must be a residual or MLP site.
        stats: :class:`tl_degeneracy.Stats` with every site, and Jacobian statistics for the last site.
        rtol, atol: as in :func:`~tl_degeneracy.interaction_basis` (``atol`` is the noise scale ε on Λ).

    Returns:
        ``{site: InteractionBasis}`` with ``kind="local"``, in the order of ``sites``.

    Example::

        stats = tld.collect(model, data, sites=sites, jacobian="kl")
        bases = tld.local_interaction_bases(model, data, sites, stats=stats, n_probes=8)
    """
    adapter = as_adapter(model)
    sites = check_site_chain(adapter, sites)
    if estimator not in LIB_ESTIMATORS:
        raise BadInputError(f"estimator must be one of {LIB_ESTIMATORS}, got {estimator!r}")
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise BadInputError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    missing = [s for s in sites if s not in list(stats.sites)]
    if missing:
        raise BadInputError(f"stats have no statistics for sites {missing}; collect them with these sites")
    last = sites[-1]
    bases = {last: _local(interaction_bases(stats, sites=[last], rtol=rtol, atol=atol)[last])}
    for a, b in reversed(list(zip(sites, sites[1:], strict=False))):
        M, _ = local_jacobian_gram(adapter, data, a, b, bases[b].C, estimator=estimator, n_probes=n_probes,
                                   seed=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            basis = interaction_basis(stats.gram(a, centered=True), M, mean=stats.mean(a), rtol=rtol, atol=atol)
        for w in caught:
            warnings.warn(f"{a}: {w.message}", w.category, stacklevel=2)
        bases[a] = _local(basis)
    return {s: bases[s] for s in sites}


def interaction_graph(
    model: Any, data: TokenBatches, bases: dict[str, Any], sites: Sequence[str], *, method: str = "integrated",
    n_points: int = 8, estimator: str = "exact", n_probes: int = 4, seed: int = 0,
) -> InteractionGraph:
    """The interaction graph: squared edges between consecutive sites' basis directions (paper §4–5).

    For each consecutive pair A → B (B computed from A by the model between the two hooks), with bases
    (C_A, μ_A), (C_B, μ_B) and f̂_A = C_A (a − μ_A), r_A = a − μ_A − C_A⁺ f̂_A held fixed, the path
    a(α) = μ_A + r_A + α C_A⁺ f̂_A at all counted positions and F(α) = C_B (b(a(α)) − μ_B):

        E[i, j] = (1/N_B) Σ_seq Σ_{t_out} ( Σ_{t_in} f̂_{A,t_in,i} ∫₀¹ ∂F_{t_out,j}/∂f̂_{A,t_in,i}(α) dα )²

    ``method="integrated"`` (Gauss–Legendre, ``n_points`` nodes) or ``"gradient"`` (α = 1 only);
    ``estimator="exact"`` (T·k_B vmapped backward passes per node) or ``"probe"`` (random signs over output
    positions, k_B·``n_probes`` backward passes; unbiased, its standard error in ``graph.meta``). One pass
    over the data per pair; backward passes run from B to A only.

    Args:
        bases: ``{site: InteractionBasis}`` for every site (any kind: local, interaction, PCA).

    Example::

        graph = tld.interaction_graph(model, data, bases, sites, method="integrated", n_points=4)
        graph.edges[(sites[0], sites[1])].shape          # (bases[sites[0]].dim, bases[sites[1]].dim)
    """
    adapter = as_adapter(model)
    sites = check_site_chain(adapter, sites)
    quadrature(method, n_points)
    if estimator not in EDGE_ESTIMATORS:
        raise BadInputError(f"estimator must be one of {EDGE_ESTIMATORS}, got {estimator!r}")
    missing = [s for s in sites if s not in bases]
    if missing:
        raise BadInputError(f"no basis given for sites {missing}; pass bases for every site (e.g. from "
                            "tld.local_interaction_bases)")
    for s in sites:
        d, basis = site_dim(adapter, s), bases[s]
        if basis.C.ndim != 2 or basis.C.shape[1] != d or basis.C_pinv.shape != (d, basis.C.shape[0]) \
                or basis.mean.shape != (d,):
            raise BadInputError(f"the basis for '{s}' has C {tuple(basis.C.shape)}, but the site has dimension "
                                f"{d}; pass the basis built for this site")
    edges, stderr, seconds = {}, {}, {}
    n_tokens = 0
    for a, b in zip(sites, sites[1:], strict=False):
        start = time.perf_counter()
        out = edge_matrix(adapter, data, a, b, bases[a], bases[b], method=method, n_points=n_points,
                          estimator=estimator, n_probes=n_probes, seed=seed)
        seconds[f"{a}->{b}"] = time.perf_counter() - start
        edges[(a, b)] = out["edges"]
        n_tokens = out["n_tokens"]
        if out["stderr"] is not None:
            stderr[f"{a}->{b}"] = float(out["stderr"].max())
    meta = {"method": method, "n_points": n_points if method == "integrated" else 1, "estimator": estimator,
            "n_probes": n_probes if estimator == "probe" else None, "seed": seed, "n_tokens": n_tokens,
            "seconds": seconds, "max_stderr": stderr or None,
            "basis_kinds": {s: getattr(bases[s], "kind", None) for s in sites}}
    return InteractionGraph(sites=sites, edges=edges,
                            lambdas={s: bases[s].lambdas for s in sites}, meta=meta)


def _local(basis: InteractionBasis) -> InteractionBasis:
    return dataclasses.replace(basis, kind="local")
