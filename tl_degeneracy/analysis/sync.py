"""Synchronised attention heads and MLP neurons (paper §3.2, eq. 17–22; SPEC §4).

Analyses of the synchronisation sums that :func:`~tl_degeneracy.collect` streams with ``head_sync=True`` /
``neuron_sync=True`` (:mod:`tl_degeneracy.collection.components`); pure tensors in, results out:

- :func:`head_sync` → :class:`HeadSync`: pattern distance D[h, h'] = mean over counted query tokens of
  ‖A_h[q, :] − A_h'[q, :]‖², the value-weighted (output) distance, synchronised blocks and degrees of freedom.
- :func:`neuron_sync` → :class:`NeuronSync`: gates r_i = f_i / p_i (eq. 17), the directed mixing error
  E[i→j] = mean_t ((r_j − r_i) p_i)², D = max(E[i→j], E[j→i]) (SPEC's reading of eq. 20), blocks and the
  count Σ_a s_a² (eq. 21–22).

Example::

    stats = tld.collect(model, data, sites="resid_pre", head_sync=True, neuron_sync=True)
    hs = tld.head_sync(stats, layer=3)
    hs.distance                      # [H, H], symmetric, zero diagonal
    hs.blocks(1e-3)                  # [[0, 5], [1], [2], ...]  (single linkage on D ≤ τ)
    hs.dof(1e-3).extra               # Σ_S r_S² − Σ_h r_h²
    ns = tld.neuron_sync(stats, layer=3)
    ns.sweep().n_blocks              # number of blocks against a log-spaced τ grid
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_degeneracy._io import load_tensors, save_tensors
from tl_degeneracy.analysis.linkage import (
    SpanningTree,
    block_rank,
    blocks_of,
    minimum_spanning_tree,
    single_linkage_labels,
)
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.stats import Stats

#: header key of synchronisation result files (format unchanged since 0.1.0)
_SAVE_KEY = "tl_degeneracy_sync"


@dataclass(frozen=True)
class SyncDof:
    """Degrees of freedom at one threshold τ (SPEC §4).

    ``total`` = Σ_S r_S² over synchronised blocks S (eq. 22; r_S the rank of the block's value vectors for
    heads, of its preactivations s_a for neurons); ``generic`` = Σ_u r_u² over single units (what every
    head / neuron carries anyway); ``extra`` = total − generic, the freedom added by synchronisation. For
    neurons ``extra`` can be negative: synchronised neurons with linearly dependent preactivations (e.g. a
    duplicated neuron) already lose that freedom to the activation rank drop of §3.1.
    """

    tau: float
    measure: str
    total: int
    generic: int
    extra: int
    blocks: list[list[int]]
    ranks: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "measure": self.measure, "total": self.total, "generic": self.generic,
                "extra": self.extra, "blocks": self.blocks, "ranks": self.ranks}


@dataclass(frozen=True)
class SyncSweep:
    """Number of blocks, largest block and degrees of freedom against the threshold τ (for plotting);
    the dof entries and ``generic`` are -1 when the sweep ran with ``dof=False``."""

    measure: str
    taus: Float[torch.Tensor, " k"]
    n_blocks: Int[torch.Tensor, " k"]
    largest_block: Int[torch.Tensor, " k"]
    dof_total: Int[torch.Tensor, " k"]
    dof_extra: Int[torch.Tensor, " k"]
    generic: int

    def to_dict(self) -> dict[str, Any]:
        return {"measure": self.measure, "taus": self.taus.tolist(), "n_blocks": self.n_blocks.tolist(),
                "largest_block": self.largest_block.tolist(), "dof_total": self.dof_total.tolist(),
                "dof_extra": self.dof_extra.tolist(), "generic": self.generic}


class _SyncResult(abc.ABC):
    """Shared machinery: single-linkage blocks, block ranks, degrees of freedom, τ sweeps, export."""

    unit = "unit"
    #: attribute names of the symmetric distances that thresholds may be applied to
    measures: tuple[str, ...] = ("distance",)
    #: attribute names of the tensors :meth:`tensors` returns
    _tensor_names: tuple[str, ...] = ()
    #: constructor arguments that are tensors (what :meth:`save` writes; everything else derives from them)
    _state_names: tuple[str, ...] = ()
    distance: torch.Tensor

    def __init__(self, *, layer: int, n_tokens: int, rank_gram: torch.Tensor, unit_width: int):
        self.layer = layer
        self.n_tokens = n_tokens
        self.rank_gram = rank_gram
        self.unit_width = unit_width
        self._mst: dict[str, SpanningTree] = {}
        self._ranks: dict[tuple[tuple[int, ...], float], int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, {self.unit}s={self.n_units}, n_tokens={self.n_tokens})"

    @property
    def n_units(self) -> int:
        return int(self.distance.shape[0])

    # ---- thresholds and blocks ----------------------------------------------------------------
    def _matrix(self, measure: str) -> torch.Tensor:
        if measure not in self.measures:
            raise BadInputError(f"measure must be one of {', '.join(self.measures)}, got {measure!r}")
        return getattr(self, measure)

    def _tree(self, measure: str) -> SpanningTree:
        """The minimum spanning tree of the measure (:func:`~tl_degeneracy.analysis.linkage.minimum_spanning_tree`),
        computed once per measure: one tree answers every τ."""
        if measure not in self._mst:
            self._mst[measure] = minimum_spanning_tree(self._matrix(measure))
        return self._mst[measure]

    def labels(self, tau: float, *, measure: str = "distance") -> Int[torch.Tensor, " units"]:
        """Block label of every unit at threshold τ (a block's label is its smallest member)."""
        try:
            finite = math.isfinite(float(tau))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise BadInputError(f"the threshold τ must be a finite number, got {tau!r}")
        return single_linkage_labels(self._tree(measure), self.n_units, tau)

    def blocks(self, tau: float, *, measure: str = "distance") -> list[list[int]]:
        """Synchronised blocks: connected components of {distance ≤ τ} (single linkage), singletons included;
        each block sorted, blocks listed by smallest member."""
        return blocks_of(self.labels(tau, measure=measure))

    # ---- ranks and degrees of freedom ---------------------------------------------------------
    def block_rank(self, members: Sequence[int], *, rtol: float = 1e-5) -> int:
        """Rank of a block's vectors (value vectors for heads, preactivations s_a for neurons, eq. 21).

        Read off the block's sub-Gram rescaled to unit diagonal (so each unit's scale does not matter):
        eigenvalues above ``rtol`` × the largest. Dimensions that are exactly zero on the data count 0.
        The default 1e-5 sits above the float32 rounding of the streamed products (~1e-7 relative per
        entry, growing like √tokens within one batch) and far below a real independent direction.
        """
        key = (tuple(sorted(int(m) for m in members)), float(rtol))
        if key not in self._ranks:
            self._ranks[key] = block_rank(self.rank_gram, key[0], unit_width=self.unit_width, rtol=rtol)
        return self._ranks[key]

    def _generic(self, rtol: float) -> int:
        return sum(self.block_rank([u], rtol=rtol) ** 2 for u in range(self.n_units))

    def dof(self, tau: float, *, measure: str = "distance", rtol: float = 1e-5) -> SyncDof:
        """Degrees of freedom at threshold τ: total Σ_S r_S² (eq. 22), generic Σ_u r_u², extra = the difference."""
        blocks = self.blocks(tau, measure=measure)
        ranks = [self.block_rank(b, rtol=rtol) for b in blocks]
        total = sum(r * r for r in ranks)
        generic = self._generic(rtol)
        return SyncDof(float(tau), measure, total, generic, total - generic, blocks, ranks)

    def default_taus(self, *, measure: str = "distance", n: int = 25) -> Float[torch.Tensor, " k"]:
        """0, then ``n`` log-spaced thresholds from half the smallest positive merge distance up to the
        distance at which every unit is in one block."""
        ws = torch.tensor(self._tree(measure).w, dtype=torch.float64)
        ws = ws[torch.isfinite(ws) & (ws > 0)]
        zero = torch.zeros(1, dtype=torch.float64)
        if ws.numel() == 0:
            return zero
        lo, hi = float(ws.min()) / 2, float(ws.max())
        grid = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
        grid[-1] = hi  # exactly the last merge, which 10**log10(hi) may miss by rounding
        return torch.cat([zero, grid])

    def sweep(self, taus: Sequence[float] | torch.Tensor | None = None, *, measure: str = "distance",
              rtol: float = 1e-5, dof: bool = True) -> SyncSweep:
        """Number of blocks, largest block and degrees of freedom against τ (default :meth:`default_taus`).

        ``dof=False`` skips the rank computations (they dominate for thousands of neurons) and reports -1.
        """
        t = self.default_taus(measure=measure) if taus is None else torch.as_tensor(taus, dtype=torch.float64)
        generic = self._generic(rtol) if dof else -1
        n_blocks, largest, totals = [], [], []
        for tau in t.reshape(-1).tolist():
            blocks = self.blocks(tau, measure=measure)
            n_blocks.append(len(blocks))
            largest.append(max(len(b) for b in blocks))
            totals.append(sum(self.block_rank(b, rtol=rtol) ** 2 for b in blocks) if dof else -1)
        total = torch.tensor(totals, dtype=torch.int64)
        return SyncSweep(measure, t.reshape(-1), torch.tensor(n_blocks), torch.tensor(largest), total,
                         total - generic if dof else total.clone(), generic)

    # ---- export --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The result's matrices and vectors by name (what :meth:`save` writes)."""
        return {name: getattr(self, name) for name in self._tensor_names}

    def summary(self) -> dict[str, Any]:
        """JSON-ready scalars describing the result."""
        return {"kind": type(self).__name__, "layer": self.layer, "n_tokens": self.n_tokens, "unit": self.unit,
                "n_units": self.n_units}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: :meth:`summary` and every tensor as nested lists (prefer :meth:`save` for neurons)."""
        return {**self.summary(), **{k: v.tolist() for k, v in self.tensors().items()}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as safetensors (summary JSON in the header) and a ``.json`` sidecar, atomically.

        Only the inputs the result is built from are stored (for neurons: E[i→j], E[f²] and the preactivation
        Gram, 2·d_mlp² float64); :meth:`load` rebuilds the object, :func:`load_sync` its tensors by name.
        """
        tensors = {k: getattr(self, k) for k in self._state_names}
        return save_tensors(path, tensors, self.summary(), header_key=_SAVE_KEY)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Any:
        """Rebuild a result written by :meth:`save`."""
        summary, tensors = _read_sync_file(path)
        if summary.get("kind") != cls.__name__:
            raise BadInputError(f"'{path}' holds a {summary.get('kind')}, not a {cls.__name__}")
        return cls._from_saved(summary, tensors)

    @classmethod
    @abc.abstractmethod
    def _from_saved(cls, summary: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
        """Rebuild from :meth:`summary` and the tensors named in ``_state_names``."""


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0/0 → 0 and x/0 → inf (never NaN)."""
    den = den.expand_as(num)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.where(num > 0, math.inf, 0.0))


def _symmetric_max(directed: torch.Tensor) -> torch.Tensor:
    d = torch.maximum(directed, directed.T)
    d.fill_diagonal_(0.0)
    return d


class HeadSync(_SyncResult):
    """Attention-head synchronisation in one layer (paper §3.2 "Attention"; SPEC §4).

    - ``distance`` [H, H]: D[h, h'] = mean over counted query tokens q of ‖A_h[q, :] − A_h'[q, :]‖²
      (symmetric, zero diagonal, at most 2).
    - ``normalized_distance``: D[h, h'] / sqrt(m_h m_h'), m_h = mean_q ‖A_h[q, :]‖² (``mean_pattern_sq``).
    - ``value_distance_directed`` [h, h'] = mean_q ‖(A_h[q] − A_h'[q]) V_h‖²: the output error of moving
      head h's values into head h' (not symmetric). ``value_distance`` = max of the two directions (the
      error of the worse move). ``normalized_value_distance``: each direction divided by head h's own
      mean ‖A_h[q] V_h‖² (a relative output error), then the max.
    - ``value_gram`` [H·d_head, H·d_head]: uncentred Gram of the concatenated value vectors over attended
      keys; a block's rank r_S is read off its sub-Gram (:meth:`block_rank`).

    Degrees of freedom (:meth:`dof`): every head carries r_h² (d_head² at full rank; W_V ↦ W_V A,
    W_O ↦ A⁻¹ W_O); a block S carries r_S² (r_S ≤ |S|·d_head); extra freedom Σ_S r_S² − Σ_h r_h².
    """

    unit = "head"
    measures = ("distance", "normalized_distance", "value_distance", "normalized_value_distance")
    _tensor_names = ("distance", "normalized_distance", "mean_pattern_sq", "value_distance_directed",
                     "value_distance", "normalized_value_distance", "mean_value_sq", "value_gram")
    _state_names = ("pattern_gram", "value_distance_directed", "mean_value_sq", "value_gram")

    def __init__(self, *, layer: int, n_tokens: int, n_keys: int,
                 pattern_gram: Float[torch.Tensor, "head head"],
                 value_err: Float[torch.Tensor, "head head"],
                 value_sq: Float[torch.Tensor, " head"],
                 value_gram: Float[torch.Tensor, "hd hd"]):
        n_heads = pattern_gram.shape[0]
        super().__init__(layer=layer, n_tokens=n_tokens, rank_gram=value_gram,
                         unit_width=value_gram.shape[0] // n_heads)
        self.n_keys = n_keys
        self.pattern_gram = pattern_gram
        sq = pattern_gram.diagonal().clone()
        self.mean_pattern_sq: Float[torch.Tensor, " head"] = sq
        self.distance = (sq[:, None] + sq[None, :] - 2 * pattern_gram).clamp_min(0.0)
        self.distance.fill_diagonal_(0.0)
        self.normalized_distance = _safe_div(self.distance, torch.sqrt(sq[:, None] * sq[None, :]))
        self.value_distance_directed = value_err.clone()
        self.value_distance_directed.fill_diagonal_(0.0)
        self.mean_value_sq: Float[torch.Tensor, " head"] = value_sq
        self.value_distance = _symmetric_max(self.value_distance_directed)
        self.normalized_value_distance = _symmetric_max(_safe_div(self.value_distance_directed, value_sq[:, None]))

    @property
    def value_gram(self) -> Float[torch.Tensor, "hd hd"]:
        return self.rank_gram

    @property
    def d_head(self) -> int:
        return self.unit_width

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "d_head": self.d_head, "n_keys": self.n_keys}

    @classmethod
    def _from_saved(cls, summary: dict[str, Any], tensors: dict[str, torch.Tensor]) -> HeadSync:
        return cls(layer=summary["layer"], n_tokens=summary["n_tokens"], n_keys=summary["n_keys"],
                   pattern_gram=tensors["pattern_gram"], value_err=tensors["value_distance_directed"],
                   value_sq=tensors["mean_value_sq"], value_gram=tensors["value_gram"])


class NeuronSync(_SyncResult):
    """MLP-neuron synchronisation in one layer (paper §3.2, eq. 17–22; SPEC §4).

    - ``directed`` [i, j] = E[i→j] = mean_t ((r_j − r_i) p_i)², r = f/p the gate (eq. 17; ``gate_at_zero``
      where p = 0): the output error, per unit of c·W_out[:, j], of moving a fraction c of neuron i's input
      row into neuron j and compensating in W_out.
    - ``distance`` = max(E[i→j], E[j→i]) (SPEC's reading of eq. 20; symmetric, zero diagonal). For ReLU it
      is 0 exactly when the two neurons fire on the same tokens.
    - ``normalized_distance`` = D[i, j] / sqrt(E[f_i²] E[f_j²]) (0/0 → 0, x/0 → inf).
    - ``pre_gram`` [d_mlp, d_mlp]: uncentred (1/N) Σ_t p_t p_tᵀ; a block's s_a (eq. 21) is the rank of its
      sub-Gram (:meth:`block_rank`). Uncentred because eq. 21 is the span of the functions p_k over the data
      (a constant part is a direction of that span).
    - ``mean_f_sq`` [d_mlp] = E[f_i²].

    Degrees of freedom (:meth:`dof`): Σ_a s_a² (eq. 22), generic Σ_i s_i² (one scaling per live neuron).
    Small negative E from float32 cancellation (|E| ≲ 1e-6 · E[f²]) is clamped to 0.
    """

    unit = "neuron"
    measures = ("distance", "normalized_distance")
    _tensor_names = ("directed", "distance", "normalized_distance", "mean_f_sq", "pre_gram")
    _state_names = ("directed", "mean_f_sq", "pre_gram")

    def __init__(self, *, layer: int, n_tokens: int, gate_at_zero: float,
                 directed: Float[torch.Tensor, "neuron neuron"],
                 mean_f_sq: Float[torch.Tensor, " neuron"],
                 pre_gram: Float[torch.Tensor, "neuron neuron"]):
        super().__init__(layer=layer, n_tokens=n_tokens, rank_gram=pre_gram, unit_width=1)
        self.gate_at_zero = gate_at_zero
        self.directed = directed.clamp_min(0.0)
        self.directed.fill_diagonal_(0.0)
        self.distance = _symmetric_max(self.directed)
        self.mean_f_sq = mean_f_sq

    @cached_property
    def normalized_distance(self) -> Float[torch.Tensor, "neuron neuron"]:
        return _safe_div(self.distance, torch.sqrt(self.mean_f_sq[:, None] * self.mean_f_sq[None, :]))

    @property
    def pre_gram(self) -> Float[torch.Tensor, "neuron neuron"]:
        return self.rank_gram

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "gate_at_zero": self.gate_at_zero}

    @classmethod
    def _from_saved(cls, summary: dict[str, Any], tensors: dict[str, torch.Tensor]) -> NeuronSync:
        return cls(layer=summary["layer"], n_tokens=summary["n_tokens"], gate_at_zero=summary["gate_at_zero"],
                   directed=tensors["directed"], mean_f_sq=tensors["mean_f_sq"], pre_gram=tensors["pre_gram"])


def head_sync(stats: Stats, layer: int) -> HeadSync:
    """Head synchronisation of ``layer`` from streamed sums (needs ``collect(..., head_sync=True)``).

    Example::

        hs = tld.head_sync(stats, 0)
        hs.distance[0, 1]          # mean_q ‖A_0[q] − A_1[q]‖²
        hs.dof(1e-3).extra         # Σ_S r_S² − Σ_h r_h²
    """
    s = stats.sync_sums("head", layer, ("n", "pattern_gram", "value_err", "value_sq", "value_outer", "n_keys"))
    n, n_keys = int(s["n"]), int(s["n_keys"])
    return HeadSync(layer=layer, n_tokens=n, n_keys=n_keys, pattern_gram=s["pattern_gram"] / max(n, 1),
                    value_err=s["value_err"] / max(n, 1), value_sq=s["value_sq"] / max(n, 1),
                    value_gram=s["value_outer"] / max(n_keys, 1))


def neuron_sync(stats: Stats, layer: int) -> NeuronSync:
    """Neuron synchronisation of ``layer`` from streamed sums (needs ``collect(..., neuron_sync=True)``).

    E[i→j] = (cross[i, j] + Σ_t f_i²) / N with cross = Σ_t (p_i² r_j² − 2 f_i p_i r_j) (eq. 17, 20).

    Example::

        ns = tld.neuron_sync(stats, 0)
        ns.blocks(1e-4, measure="normalized_distance")
        ns.dof(1e-4, measure="normalized_distance").total      # Σ_a s_a² (eq. 22)
    """
    s = stats.sync_sums("neuron", layer, ("n", "cross", "f_sq", "pre_outer"))
    n = max(int(s["n"]), 1)
    return NeuronSync(layer=layer, n_tokens=int(s["n"]), gate_at_zero=stats.gate_at_zero,
                      directed=(s["cross"] + s["f_sq"][:, None]) / n, mean_f_sq=s["f_sq"] / n,
                      pre_gram=s["pre_outer"] / n)


def _read_sync_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors, summary = load_tensors(path, header_keys=(_SAVE_KEY,), what="synchronisation file")
    if summary is None:
        raise BadInputError(f"'{path}' was not written by HeadSync.save / NeuronSync.save")
    return summary, tensors


def load_sync(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by ``HeadSync.save`` / ``NeuronSync.save``: the summary and every tensor of
    :meth:`~HeadSync.tensors` by name (e.g. ``load_sync(p)["normalized_distance"]``)."""
    summary, tensors = _read_sync_file(path)
    kinds = {"HeadSync": HeadSync, "NeuronSync": NeuronSync}
    if summary.get("kind") not in kinds:
        raise BadInputError(f"'{path}' holds an unknown result kind {summary.get('kind')!r}")
    result = kinds[summary["kind"]]._from_saved(summary, tensors)
    return {**result.summary(), **result.tensors()}
