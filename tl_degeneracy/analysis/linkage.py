"""Single-linkage clustering and block ranks: pure functions of a distance matrix or a Gram (SPEC §4).

The connected components of the graph {D ≤ τ} are those of a minimum spanning tree's edges of weight ≤ τ
(single linkage), so one tree answers every threshold τ.

Example::

    tree = minimum_spanning_tree(D)            # edges sorted by weight
    single_linkage_labels(tree, n, tau=0.1)     # block label (smallest member) of every unit
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int


class SpanningTree(NamedTuple):
    """Edges (u[i], v[i]) of weight w[i] of a minimum spanning tree, sorted by weight."""

    u: list[int]
    v: list[int]
    w: list[float]


def minimum_spanning_tree(d: Float[torch.Tensor, "n n"]) -> SpanningTree:
    """Minimum spanning tree of the complete graph weighted by the symmetric matrix ``d`` (Prim, O(n²) with
    vectorised rows: for the dense graphs here — every pair of units has a distance — this beats a
    general graph library's O(E log n) on n² edges)."""
    n = d.shape[0]
    in_tree = torch.zeros(n, dtype=torch.bool)
    in_tree[0] = True
    best = d[0].clone()
    best[0] = math.inf
    parent = torch.zeros(n, dtype=torch.long)
    us, vs, ws = [], [], []
    for _ in range(n - 1):
        j = int(torch.argmin(best))
        us.append(int(parent[j]))
        vs.append(j)
        ws.append(float(best[j]))
        in_tree[j] = True
        parent = torch.where(d[j] < best, j, parent)
        best = torch.minimum(best, d[j])
        best[in_tree] = math.inf
    order = sorted(range(len(ws)), key=ws.__getitem__)
    return SpanningTree([us[i] for i in order], [vs[i] for i in order], [ws[i] for i in order])


def single_linkage_labels(tree: SpanningTree, n: int, tau: float) -> Int[torch.Tensor, " n"]:
    """Block label of each of the ``n`` units at threshold τ: the smallest member of its connected component
    of {D ≤ τ} (union–find over the tree's edges of weight ≤ τ)."""
    root = list(range(n))

    def find(x: int) -> int:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    for u, v, w in zip(tree.u, tree.v, tree.w, strict=True):
        if w > tau:
            break
        a, b = find(u), find(v)
        root[max(a, b)] = min(a, b)
    return torch.tensor([find(x) for x in range(n)], dtype=torch.long)


def blocks_of(labels: Int[torch.Tensor, " n"]) -> list[list[int]]:
    """Units grouped by label: each block sorted, blocks listed by smallest member."""
    groups: dict[int, list[int]] = {}
    for unit, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(unit)
    return [groups[k] for k in sorted(groups)]


def block_rank(gram: Float[torch.Tensor, "nw nw"], members: Sequence[int], *, unit_width: int = 1,
               rtol: float = 1e-5) -> int:
    """Rank of a block's vectors from the Gram of all units' vectors (``unit_width`` rows per unit).

    Read off the block's sub-Gram rescaled to unit diagonal (so each unit's scale does not matter):
    eigenvalues above ``rtol`` × the largest. Dimensions that are exactly zero on the data count 0.
    """
    w = unit_width
    idx = torch.tensor([u * w + i for u in members for i in range(w)], dtype=torch.long)
    g = gram[idx][:, idx]
    diag = g.diagonal()
    keep = diag > 0
    if not bool(keep.any()):
        return 0
    s = diag[keep].rsqrt()
    ev = torch.linalg.eigvalsh(g[keep][:, keep] * s[:, None] * s[None, :])
    return int((ev > rtol * ev[-1]).sum())
