"""Synchronised attention heads and MLP neurons (paper §3.2, eq. 17–22; SPEC §4).

Two streamed components fill a :class:`~tl_degeneracy.stats.Stats` during :func:`~tl_degeneracy.collect`
(``head_sync=True`` / ``neuron_sync=True``), with a few matrix products per batch and nothing kept across
batches; two analyses read the totals back:

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

Statistics written (all sums over counted tokens, so batches, runs and machines add exactly):

``hsync/{l}/n`` (int64) counted query tokens; ``hsync/{l}/pattern_gram`` [H, H] Σ_q ⟨A_h[q], A_h'[q]⟩
(float64 per batch); ``hsync/{l}/value_err`` [H, H] entry [h, h'] = Σ_q ‖(A_h[q] − A_h'[q]) V_h‖²;
``hsync/{l}/value_sq`` [H] Σ_q ‖A_h[q] V_h‖²; ``hsync/{l}/value_outer`` [H·d_head, H·d_head] Σ_k v_k v_kᵀ of
the concatenated per-head value vectors over the *attended keys* (every key position to which some counted
query gives non-zero attention: the BOS position is one, padding after the last counted token is not);
``hsync/{l}/n_keys`` (int64).

``nsync/{l}/n`` (int64) counted tokens; ``nsync/{l}/cross`` [d_mlp, d_mlp] entry [i, j] =
Σ_t (p_i² r_j² − 2 f_i p_i r_j); ``nsync/{l}/f_sq`` [d_mlp] Σ_t f_i²; ``nsync/{l}/pre_outer`` [d_mlp, d_mlp]
Σ_t p_t p_tᵀ. Per-batch products of [tokens, d] matrices run in float32 (TF32 off), totals in float64 — also
under ``collect(precision="fast")``: the distances come from differences of nearly equal sums, and bfloat16
inputs would leave a noise floor of ~1e-2 of E[f²] on them (and hide rank drops below 1e-2).

Memory: per layer the neuron sums are two d_mlp² matrices; for GPT-2 small (d_mlp = 3072, 12 layers) the
float64 totals take 2 · 3072² · 8 B · 12 = 1.69 GiB, and one batch's float32 increments another 0.84 GiB
while the batch runs (``sync_layers=`` collects fewer layers at a time). The head sums are small (the value
Gram is (H·d_head)² = 768² per layer: 54 MiB for all 12 layers).

Cost per counted token and layer: neurons, three d_mlp² products (two for ReLU), 6·d_mlp² FLOPs — about 2.7 ×
a whole GPT-2-small forward for all 12 layers; heads, 2·H²·T·d_head FLOPs for the value-weighted distance
(a sixth of a GPT-2-small layer's forward at T = 128). Measured figures: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import abc
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file

from tl_degeneracy.collect import BatchContext, Component, Hook, gram_increment
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.model import ModelAdapter
from tl_degeneracy.stats import Stats, _atomic_write

#: gate r_i = f_i / p_i at an exact zero p_i = 0 (eq. 17), the limit φ'(0) of each elementwise activation.
#: ReLU takes 1 (the paper's eq. 17 convention; its left limit would be 0); GELU variants and SiLU take
#: φ'(0) = ½; relu2 (ReLU(x)²) takes 0.
GATE_AT_ZERO: dict[str, float] = {
    "relu": 1.0,
    "gelu": 0.5,
    "gelu_new": 0.5,
    "gelu_fast": 0.5,
    "gelu_pytorch_tanh": 0.5,
    "silu": 0.5,
    "swish": 0.5,
    "relu2": 0.0,
}

_SAVE_KEY = "tl_degeneracy_sync"


def gate_at_zero(act_fn: str | None) -> float:
    """The gate value r(0) used where a preactivation is exactly zero (see :data:`GATE_AT_ZERO`)."""
    if act_fn not in GATE_AT_ZERO:
        raise BadInputError(
            f"neuron synchronisation needs an elementwise activation f = φ(p) with a known gate at p = 0; "
            f"the model's act_fn is {act_fn!r}. Supported: {', '.join(GATE_AT_ZERO)}"
        )
    return GATE_AT_ZERO[act_fn]


def _check_layers(adapter: ModelAdapter, layers: Sequence[int]) -> list[int]:
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < adapter.n_layers]
    if bad or not out:
        raise BadInputError(
            f"sync_layers {list(layers)} invalid: give a non-empty list of layers in 0..{adapter.n_layers - 1}"
        )
    return out


def _pair_hooks(first: str, second: str, compute: Callable[[torch.Tensor, torch.Tensor], None]) -> list[Hook]:
    """Hooks on two names that call ``compute(act_first, act_second)`` once both fired (in either order).

    ``compute`` runs with autocast off: the sync sums stay float32 under ``precision="fast"``, where the
    cancellations in the distances would leave a bfloat16 noise floor of about 1e-2.
    """
    held: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(act: torch.Tensor, hook: Any) -> None:
            held[name] = act.detach()
            if len(held) == 2:
                with torch.autocast(act.device.type, enabled=False):
                    compute(held.pop(first), held.pop(second))

        return hook

    return [(first, make(first)), (second, make(second))]


# ---------------------------------------------------------------------------------------------------------
# per-batch sums (pure functions of one batch's activations)
# ---------------------------------------------------------------------------------------------------------
def head_sync_increments(
    pattern: Float[torch.Tensor, "batch head q k"],
    v: Float[torch.Tensor, "batch k kv_head d_head"],
    mask: Bool[torch.Tensor, "batch q"],
) -> dict[str, torch.Tensor]:
    """One batch's head-synchronisation sums over counted query tokens (SPEC §4).

    With a = A_h[q, :] and V_h [k, d_head] the head's value vectors in the same sequence:

    - ``pattern_gram`` [h, h'] = Σ_q ⟨A_h[q], A_h'[q]⟩ (float64), so Σ‖A_h − A_h'‖² = G_hh + G_h'h' − 2 G_hh';
    - ``value_err`` [h, h'] = Σ_q ‖(A_h[q] − A_h'[q]) V_h‖², the output error of moving head h's values into
      head h' (directed; squares of the differences summed in float32, so synchronised heads give zeros
      rather than a cancellation of large terms);
    - ``value_sq`` [h] = Σ_q ‖A_h[q] V_h‖²;
    - ``value_outer`` = Σ_k v_k v_kᵀ over attended keys, v_k = concat_h V_h[k] (H·d_head), and ``n_keys``.

    Grouped-query models (fewer value heads than heads) have their value heads repeated to one per head.
    """
    b, n_heads, t_q, t_k = pattern.shape
    vals = v.float()
    if vals.shape[2] != n_heads:
        vals = vals.repeat_interleave(n_heads // vals.shape[2], dim=2)
    d_head = vals.shape[-1]
    mask = mask.to(pattern.device)
    # zero the rows of uncounted queries: they then add nothing to any sum below (no gathers needed)
    a = pattern.float() * mask[:, None, :, None]
    flat = a.double().transpose(0, 1).reshape(n_heads, -1)
    pattern_gram = flat @ flat.T
    # Z[b, g, q, h] = A_g[q] V_h: head g's pattern applied to head h's values, one batched product
    z = torch.matmul(a.reshape(b, n_heads * t_q, t_k), vals.reshape(b, t_k, n_heads * d_head))
    z = z.view(b, n_heads, t_q, n_heads, d_head)
    own = z.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()  # [B, h, q, d] = A_h V_h, own output
    err = (z - own.permute(0, 2, 1, 3).unsqueeze(1)).square_().sum(dim=(0, 2, 4))  # [g, h]
    attended = a.amax(dim=(1, 2)) > 0  # [B, Tk]: keys some counted query attends to
    keys = vals[attended].reshape(-1, n_heads * d_head)
    return {
        "n": mask.sum().to(torch.int64),
        "pattern_gram": pattern_gram,
        "value_err": err.T.double(),
        "value_sq": own.square().sum(dim=(0, 2, 3)).double(),
        "value_outer": gram_increment(keys),
        "n_keys": torch.tensor(keys.shape[0], dtype=torch.int64, device=a.device),
    }


def gates(
    pre: Float[torch.Tensor, "n d_mlp"], post: Float[torch.Tensor, "n d_mlp"], at_zero: float
) -> Float[torch.Tensor, "n d_mlp"]:
    """r = f / p elementwise (eq. 17), ``at_zero`` where p = 0 exactly (never NaN)."""
    nonzero = pre != 0
    return torch.where(nonzero, post / torch.where(nonzero, pre, torch.ones_like(pre)), at_zero)


def neuron_sync_increments(
    pre: Float[torch.Tensor, "batch pos d_mlp"],
    post: Float[torch.Tensor, "batch pos d_mlp"],
    mask: Bool[torch.Tensor, "batch pos"],
    at_zero: float,
    *,
    binary_gates: bool = False,
) -> dict[str, torch.Tensor]:
    """One batch's neuron-synchronisation sums over counted tokens (eq. 17, 20; SPEC §4).

    The directed mixing error expands as ((r_j − r_i) p_i)² = p_i² r_j² − 2 f_i p_i r_j + f_i² (f_i = r_i p_i),
    so with P2 = p², R = r, R2 = r², F = f over the batch's tokens [n, d_mlp]:

        n · E[i→j] = (P2ᵀ R2 − 2 (F ∘ P)ᵀ R)[i, j] + Σ_t f_i²

    — two d_mlp×d_mlp products (``cross``) and a vector (``f_sq``); plus the preactivation Gram
    ``pre_outer`` = Pᵀ P for the block ranks s_a (eq. 21). ``binary_gates=True`` (ReLU: r ∈ {0, 1}, so
    r² = r) needs one product for ``cross`` instead of two.
    """
    mask = mask.to(pre.device)
    p = pre[mask].float()
    f = post[mask].float()
    r = gates(p, f, at_zero)
    if binary_gates:  # r ∈ {0, 1} so r² = r: one product, P2ᵀR2 − 2(F∘P)ᵀR = (P2 ∘ (1 − 2R))ᵀ R
        cross = (p * p * (1.0 - 2.0 * r)).T @ r
    else:
        cross = (p * p).T @ (r * r)
        cross.addmm_((f * p).T, r, alpha=-2.0)
    return {
        "n": torch.tensor(p.shape[0], dtype=torch.int64, device=p.device),
        "cross": cross,
        "f_sq": f.double().square().sum(0),
        "pre_outer": gram_increment(p),
    }


# ---------------------------------------------------------------------------------------------------------
# streaming components
# ---------------------------------------------------------------------------------------------------------
class HeadSyncSums(Component):
    """Streams ``hsync/{l}/...`` from ``blocks.{l}.attn.hook_pattern`` and ``blocks.{l}.attn.hook_v``."""

    needs_logits = False

    def __init__(self, adapter: ModelAdapter, layers: Sequence[int]):
        self.layers = _check_layers(adapter, layers)

    def hook_names(self) -> list[str]:
        return [f"blocks.{x}.attn.{h}" for x in self.layers for h in ("hook_pattern", "hook_v")]

    def fwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        hooks: list[Hook] = []
        for layer in self.layers:
            def compute(pattern: torch.Tensor, v: torch.Tensor, layer: int = layer) -> None:
                for key, value in head_sync_increments(pattern, v, ctx.mask).items():
                    ctx.add(f"hsync/{layer}/{key}", value)

            hooks += _pair_hooks(f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v", compute)
        return hooks

    def meta(self) -> dict[str, Any]:
        return {"layers": self.layers, "value_keys": "attended"}


class NeuronSyncSums(Component):
    """Streams ``nsync/{l}/...`` from ``blocks.{l}.mlp.hook_pre`` (p) and ``blocks.{l}.mlp.hook_post`` (f)."""

    needs_logits = False

    def __init__(self, adapter: ModelAdapter, layers: Sequence[int]):
        if adapter.d_mlp is None:
            raise BadInputError("neuron_sync=True needs a model with MLP layers (cfg.d_mlp is None)")
        if getattr(adapter.model.cfg, "gated_mlp", False):
            raise BadInputError(
                "neuron_sync=True needs an elementwise MLP f = φ(p); gated MLPs (f = φ(p)·(W_in x)) have no gate "
                "r = f/p in the sense of eq. 17. Collect with neuron_sync=False"
            )
        self.act_fn = adapter.act_fn
        self.at_zero = gate_at_zero(adapter.act_fn)
        self.layers = _check_layers(adapter, layers)

    def hook_names(self) -> list[str]:
        return [f"blocks.{x}.mlp.{h}" for x in self.layers for h in ("hook_pre", "hook_post")]

    def fwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        hooks: list[Hook] = []
        for layer in self.layers:
            def compute(pre: torch.Tensor, post: torch.Tensor, layer: int = layer) -> None:
                incs = neuron_sync_increments(pre, post, ctx.mask, self.at_zero, binary_gates=self.act_fn == "relu")
                for key, value in incs.items():
                    ctx.add(f"nsync/{layer}/{key}", value)

            hooks += _pair_hooks(f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post", compute)
        return hooks

    def meta(self) -> dict[str, Any]:
        return {"layers": self.layers, "act_fn": self.act_fn, "gate_at_zero": self.at_zero}


# ---------------------------------------------------------------------------------------------------------
# analyses
# ---------------------------------------------------------------------------------------------------------
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
        self._mst: dict[str, tuple[list[int], list[int], list[float]]] = {}
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

    def _tree(self, measure: str) -> tuple[list[int], list[int], list[float]]:
        """Minimum spanning tree of the complete graph weighted by the distance (Prim, O(n²)), edges sorted.

        The connected components of {D ≤ τ} are those of the tree's edges with weight ≤ τ (single linkage),
        so one tree answers every τ.
        """
        if measure not in self._mst:
            d = self._matrix(measure)
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
            self._mst[measure] = ([us[i] for i in order], [vs[i] for i in order], [ws[i] for i in order])
        return self._mst[measure]

    def labels(self, tau: float, *, measure: str = "distance") -> Int[torch.Tensor, " units"]:
        """Block label of every unit at threshold τ (a block's label is its smallest member)."""
        us, vs, ws = self._tree(measure)
        root = list(range(self.n_units))

        def find(x: int) -> int:
            while root[x] != x:
                root[x] = root[root[x]]
                x = root[x]
            return x

        for u, v, w in zip(us, vs, ws, strict=True):
            if w > tau:
                break
            a, b = find(u), find(v)
            root[max(a, b)] = min(a, b)
        return torch.tensor([find(x) for x in range(self.n_units)], dtype=torch.long)

    def blocks(self, tau: float, *, measure: str = "distance") -> list[list[int]]:
        """Synchronised blocks: connected components of {distance ≤ τ} (single linkage), singletons included;
        each block sorted, blocks listed by smallest member."""
        groups: dict[int, list[int]] = {}
        for unit, label in enumerate(self.labels(tau, measure=measure).tolist()):
            groups.setdefault(label, []).append(unit)
        return [groups[k] for k in sorted(groups)]

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
            w = self.unit_width
            idx = torch.tensor([u * w + i for u in key[0] for i in range(w)], dtype=torch.long)
            g = self.rank_gram[idx][:, idx]
            diag = g.diagonal()
            keep = diag > 0
            if not bool(keep.any()):
                rank = 0
            else:
                s = diag[keep].rsqrt()
                ev = torch.linalg.eigvalsh(g[keep][:, keep] * s[:, None] * s[None, :])
                rank = int((ev > rtol * ev[-1]).sum())
            self._ranks[key] = rank
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
        ws = torch.tensor(self._tree(measure)[2], dtype=torch.float64)
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
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.summary(), indent=1, sort_keys=True)
        tensors = {k: getattr(self, k).contiguous() for k in self._state_names}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_SAVE_KEY: meta}))
        _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(meta + "\n"))
        return path

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


def _need(stats: Stats, prefix: str, layer: int, keys: Sequence[str], flag: str) -> dict[str, torch.Tensor]:
    missing = [k for k in keys if f"{prefix}/{layer}/{k}" not in stats.tensors]
    if missing:
        have = sorted({int(k.split("/")[1]) for k in stats.tensors if k.startswith(prefix + "/")})
        if not have:
            raise BadInputError(f"these statistics hold no {prefix} sums: collect with {flag}=True")
        raise BadInputError(
            f"no {prefix} sums for layer {layer}: collected layers are {have}; collect with {flag}=True and "
            f"sync_layers including {layer}"
        )
    return {k: stats.tensors[f"{prefix}/{layer}/{k}"].cpu() for k in keys}


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
    s = _need(stats, "hsync", layer, ("n", "pattern_gram", "value_err", "value_sq", "value_outer", "n_keys"),
              "head_sync")
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
    s = _need(stats, "nsync", layer, ("n", "cross", "f_sq", "pre_outer"), "neuron_sync")
    n = max(int(s["n"]), 1)
    comp = stats.meta.get("components", {}).get("NeuronSyncSums", {})
    return NeuronSync(layer=layer, n_tokens=int(s["n"]), gate_at_zero=float(comp.get("gate_at_zero", math.nan)),
                      directed=(s["cross"] + s["f_sq"][:, None]) / n, mean_f_sq=s["f_sq"] / n,
                      pre_gram=s["pre_outer"] / n)


def _read_sync_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".safetensors").exists():
        path = path.with_name(path.name + ".safetensors")
    if not path.exists():
        raise BadInputError(f"no synchronisation file at '{path}'")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if _SAVE_KEY not in header:
            raise BadInputError(f"'{path}' was not written by HeadSync.save / NeuronSync.save")
        return json.loads(header[_SAVE_KEY]), {k: f.get_tensor(k) for k in f.keys()}


def load_sync(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by ``HeadSync.save`` / ``NeuronSync.save``: the summary and every tensor of
    :meth:`~HeadSync.tensors` by name (e.g. ``load_sync(p)["normalized_distance"]``)."""
    summary, tensors = _read_sync_file(path)
    kinds = {"HeadSync": HeadSync, "NeuronSync": NeuronSync}
    if summary.get("kind") not in kinds:
        raise BadInputError(f"'{path}' holds an unknown result kind {summary.get('kind')!r}")
    result = kinds[summary["kind"]]._from_saved(summary, tensors)
    return {**result.summary(), **result.tensors()}
