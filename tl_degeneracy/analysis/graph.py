"""The interaction graph and its modules (paper §4–5, eq. 31–35): pure tensors, no model.

Nodes are the basis directions ``(site, i)`` of consecutive sites; the squared edge ``E[i, j]`` between
``(A, i)`` and ``(B, j)`` is computed by :func:`tl_degeneracy.interaction_graph`. §5 charges a connection
between modules ``log(w / ε^{1/2})`` with ``w = E^{1/2}``, counting ``w ≤ ε^{1/2}`` as zero, i.e.

    cost(edge) = max(0, ½ log(E / ε)),          cost(partition) = Σ over edges between modules of cost(edge).

:func:`find_modules` builds the graph with these weights and partitions it with networkx's Louvain community
detection (``resolution``, ``seed``), then reports the §5 cost of the partition it found and its modularity.

Example::

    >>> E = torch.tensor([[4.0, 1e-9], [1e-9, 9.0]], dtype=torch.float64)
    >>> g = InteractionGraph(sites=["a", "b"], edges={("a", "b"): E})
    >>> m = find_modules(g, eps=1e-6)
    >>> m.n_modules, m.cost, m.labels["a"].tolist() == m.labels["b"].tolist()
    (2, 0.0, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degeneracy._io import load_result, save_result
from tl_degeneracy.errors import BadInputError, NonFiniteError

__all__ = ["InteractionGraph", "Modules", "edge_cost", "find_modules"]

_FORMAT = "tl_degeneracy.InteractionGraph"
_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class InteractionGraph:
    """Squared edges between the basis directions of consecutive sites.

    Attributes:
        sites: hook names in forward order.
        edges: ``{(A, B): E}`` for every consecutive pair, ``E`` float64 ``[dim_A, dim_B]``, ``E ≥ 0``.
        lambdas: optional ``{site: Λ}`` (``[dim]``, the basis's eigenvalues; node sizes in the plot).
        meta: JSON-ready settings (method, estimator, tokens, ...).

    Example: ``InteractionGraph(sites=["a", "b"], edges={("a", "b"): torch.ones(2, 3)}).dims`` →
    ``{"a": 2, "b": 3}``.
    """

    sites: list[str]
    edges: dict[tuple[str, str], Float[Tensor, "da db"]] = field(repr=False)
    lambdas: dict[str, Float[Tensor, " d"]] | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        sites = list(self.sites)
        if len(sites) < 2 or len(set(sites)) != len(sites):
            raise BadInputError(f"an interaction graph needs two or more distinct sites, got {sites}")
        pairs = list(zip(sites, sites[1:], strict=False))
        keys = [tuple(k) for k in self.edges]
        if sorted(keys) != sorted(pairs):
            raise BadInputError(f"edges must be given for exactly the consecutive pairs {pairs}, got {keys}")
        edges: dict[tuple[str, str], Tensor] = {}
        for pair in pairs:
            E = self.edges[pair]
            if not isinstance(E, Tensor) or E.ndim != 2:
                raise BadInputError(f"edges{pair} must be a 2-D tensor [dim_A, dim_B]")
            E = E.detach().to(device="cpu", dtype=torch.float64)
            if not bool(torch.isfinite(E).all()):
                raise NonFiniteError(f"edges{pair} contain NaN or inf")
            if bool((E < 0).any()):
                raise BadInputError(f"edges{pair} has negative entries; squared edges are >= 0")
            edges[pair] = E
        for (a, b), (b2, c) in zip(pairs, pairs[1:], strict=False):
            if edges[(a, b)].shape[1] != edges[(b2, c)].shape[0]:
                raise BadInputError(
                    f"site '{b}' has dim {edges[(a, b)].shape[1]} in edges{(a, b)} but "
                    f"{edges[(b2, c)].shape[0]} in edges{(b2, c)}"
                )
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "edges", edges)
        if self.lambdas is not None:
            lam = {s: torch.as_tensor(v).detach().to("cpu", torch.float64) for s, v in self.lambdas.items()}
            dims = self.dims
            bad = [s for s in sites if s not in lam or lam[s].shape != (dims[s],)]
            if bad:
                raise BadInputError(f"lambdas must give a [dim] tensor for every site; wrong or missing for {bad}")
            object.__setattr__(self, "lambdas", {s: lam[s] for s in sites})

    @property
    def dims(self) -> dict[str, int]:
        """Number of nodes (basis directions) per site."""
        out = {a: E.shape[0] for (a, _), E in self.edges.items()}
        last = self.sites[-1]
        out[last] = self.edges[(self.sites[-2], last)].shape[1]
        return {s: out[s] for s in self.sites}

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """Every node ``(site, i)`` in forward order."""
        return [(s, i) for s, d in self.dims.items() for i in range(d)]

    def __repr__(self) -> str:
        return f"InteractionGraph(sites={self.sites}, dims={list(self.dims.values())})"

    def to_networkx(self, *, eps: float | None = None) -> nx.Graph:
        """An undirected ``networkx.Graph`` with nodes ``(site, i)`` (attributes ``site``, ``index``, ``column``,
        ``lam``) and edges with attribute ``E``.

        ``eps=None``: every non-zero edge, ``weight = E``. With ``eps``: only edges with ``E > eps``, with
        ``weight`` = the §5 cost ``½ log(E / eps)`` (> 0).
        """
        if eps is not None:
            _check_eps(eps)
        g = nx.Graph()
        for col, site in enumerate(self.sites):
            for i in range(self.dims[site]):
                lam = float(self.lambdas[site][i]) if self.lambdas is not None else None
                g.add_node((site, i), site=site, index=i, column=col, lam=lam)
        for (a, b), E in self.edges.items():
            ii, jj = (E > (0.0 if eps is None else eps)).nonzero(as_tuple=True)
            for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
                e = float(E[i, j])
                w = e if eps is None else 0.5 * math.log(e / eps)
                g.add_edge((a, i), (b, j), E=e, weight=w)
        return g

    def save(self, path: str | Path) -> Path:
        """``<path>.safetensors`` (edges, lambdas) + ``<path>.json`` (sites, meta); no pickle."""
        tensors = {f"edges/{i}": self.edges[(a, b)] for i, (a, b) in enumerate(zip(self.sites, self.sites[1:],
                                                                                    strict=False))}
        if self.lambdas is not None:
            tensors.update({f"lambdas/{i}": self.lambdas[s] for i, s in enumerate(self.sites)})
        info = {"sites": self.sites, "has_lambdas": self.lambdas is not None, "meta": self.meta}
        return save_result(path, tensors, info, fmt=_FORMAT, version=_FORMAT_VERSION, nan_to_null=True)

    @classmethod
    def load(cls, path: str | Path) -> InteractionGraph:
        """Read a graph written by :meth:`save`."""
        tensors, info = load_result(path, fmt=_FORMAT, version=_FORMAT_VERSION)
        sites = info["sites"]
        edges = {(a, b): tensors[f"edges/{i}"] for i, (a, b) in enumerate(zip(sites, sites[1:], strict=False))}
        lambdas = {s: tensors[f"lambdas/{i}"] for i, s in enumerate(sites)} if info["has_lambdas"] else None
        return cls(sites=sites, edges=edges, lambdas=lambdas, meta=info.get("meta", {}))


@dataclass(frozen=True)
class Modules:
    """A partition of an interaction graph's nodes (paper §5).

    Attributes:
        labels: ``{site: int64 [dim]}`` module of each node, numbered 0.. in order of each module's first node
            (forward order).
        n_modules: number of modules (an isolated node is a module of its own).
        cost: the §5 cut cost Σ over edges between modules of ``max(0, ½ log(E/ε))`` (nats).
        modularity: networkx modularity of the partition on the §5-weighted graph (0 when it has no edge).
        eps, resolution, seed: the settings used.
    """

    labels: dict[str, Int[Tensor, " d"]] = field(repr=False)
    n_modules: int
    cost: float
    modularity: float
    eps: float
    resolution: float
    seed: int


def edge_cost(E: Tensor, eps: float) -> Tensor:
    """§5 cost of squared edges: ``max(0, ½ log(E/ε))`` elementwise (float64; 0 where ``E ≤ ε``).

    Example: ``edge_cost(torch.tensor([1e-3, 1.0]), 1e-2)`` → ``[0.0, 2.3026]``.
    """
    _check_eps(eps)
    E = torch.as_tensor(E, dtype=torch.float64)
    return torch.where(E > eps, 0.5 * torch.log(E.clamp(min=eps) / eps), torch.zeros_like(E))


def find_modules(graph: InteractionGraph, *, eps: float, resolution: float = 1.0, seed: int = 0) -> Modules:
    """Modules of an interaction graph: Louvain communities of the §5-weighted graph (eq. 31–35).

    Edges ``E ≤ ε`` are dropped (they cost nothing to cut); the rest carry weight ``½ log(E/ε)``.
    ``networkx.community.louvain_communities(weight="weight", resolution=resolution, seed=seed)`` finds the
    partition (a larger ``resolution`` gives more, smaller modules); :attr:`Modules.cost` is the §5 cut cost
    of that partition, computed from every edge of the graph.

    Example::

        mods = find_modules(graph, eps=1e-4, seed=0)
        mods.n_modules, mods.cost, mods.labels["blocks.1.hook_resid_pre"]
    """
    if not isinstance(graph, InteractionGraph):
        raise BadInputError(f"find_modules takes an InteractionGraph, got {type(graph).__name__}")
    _check_eps(eps)
    if not (isinstance(resolution, int | float) and math.isfinite(resolution) and resolution > 0):
        raise BadInputError(f"resolution must be a finite number > 0, got {resolution!r}")
    g = graph.to_networkx(eps=eps)
    communities = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
    order = {node: n for n, node in enumerate(graph.nodes)}
    communities = sorted((sorted(c, key=order.__getitem__) for c in communities), key=lambda c: order[c[0]])
    labels = {s: torch.full((d,), -1, dtype=torch.int64) for s, d in graph.dims.items()}
    for m, comm in enumerate(communities):
        for site, i in comm:
            labels[site][i] = m
    cost = 0.0
    for (a, b), E in graph.edges.items():
        cross = labels[a][:, None] != labels[b][None, :]
        cost += float(edge_cost(E, eps)[cross].sum())
    modularity = nx.community.modularity(g, communities, weight="weight", resolution=resolution) \
        if g.number_of_edges() else 0.0
    return Modules(labels=labels, n_modules=len(communities), cost=cost, modularity=float(modularity),
                   eps=float(eps), resolution=float(resolution), seed=int(seed))


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise BadInputError(f"eps must be a finite number > 0 (the §5 noise scale), got {eps!r}")
