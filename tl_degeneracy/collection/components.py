"""The streamed components other than the Jacobian (which has :mod:`tl_degeneracy.collection.jacobian`).

Routing only: each component says which hooks it reads and hands the tensors to a pure kernel of
:mod:`tl_degeneracy.collection.kernels`.

- :class:`ActivationMoments`: n, Σa and Σaaᵀ per site (SPEC §1);
- :class:`HeadSyncSums`, :class:`NeuronSyncSums`: synchronisation sums (paper §3.2; SPEC §4).

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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tl_degeneracy.adapter import ModelAdapter
from tl_degeneracy.collection.engine import BatchContext, Component, Hook, check_finite, flatten_site
from tl_degeneracy.collection.kernels import gate_at_zero, head_sync_increments, neuron_sync_increments
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import check_layers, hook_name


class ActivationMoments(Component):
    """n, Σa and Σaaᵀ per site over counted tokens (SPEC §1)."""

    meta_key = "ActivationMoments"

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
                ctx.add(f"act/{site}/outer", ctx.gram(x, buffer=f"act/{site}/outer"))

            return hook

        return [(site, make(site)) for site in self.sites]



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



def _sync_layers(adapter: ModelAdapter, layers: Sequence[int]) -> list[int]:
    out = check_layers(adapter, layers, what="sync_layers")
    if not out:
        raise BadInputError(
            f"sync_layers {list(layers)} invalid: give a non-empty list of layers in 0..{adapter.n_layers - 1}"
        )
    return out


class HeadSyncSums(Component):
    """Streams ``hsync/{l}/...`` from ``blocks.{l}.attn.hook_pattern`` and ``blocks.{l}.attn.hook_v``."""

    meta_key = "HeadSyncSums"

    def __init__(self, adapter: ModelAdapter, layers: Sequence[int]):
        self.layers = _sync_layers(adapter, layers)

    def hook_names(self) -> list[str]:
        return [hook_name(kind, x) for x in self.layers for kind in ("attn_pattern", "attn_v")]

    def fwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        hooks: list[Hook] = []
        for layer in self.layers:
            def compute(pattern: torch.Tensor, v: torch.Tensor, layer: int = layer) -> None:
                for key, value in head_sync_increments(pattern, v, ctx.mask).items():
                    ctx.add(f"hsync/{layer}/{key}", value)

            hooks += _pair_hooks(hook_name("attn_pattern", layer), hook_name("attn_v", layer), compute)
        return hooks

    def meta(self) -> dict[str, Any]:
        return {"layers": self.layers, "value_keys": "attended"}


class NeuronSyncSums(Component):
    """Streams ``nsync/{l}/...`` from ``blocks.{l}.mlp.hook_pre`` (p) and ``blocks.{l}.mlp.hook_post`` (f)."""

    meta_key = "NeuronSyncSums"

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
        self.layers = _sync_layers(adapter, layers)

    def hook_names(self) -> list[str]:
        return [hook_name(kind, x) for x in self.layers for kind in ("mlp_pre", "mlp_post")]

    def fwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        hooks: list[Hook] = []
        for layer in self.layers:
            def compute(pre: torch.Tensor, post: torch.Tensor, layer: int = layer) -> None:
                ws = ctx.workspace if ctx.workspace is not None and pre.device.type == "cpu" else None
                names = {key: f"nsync/{layer}/{key}" for key in ("cross", "pre_outer")}
                incs = neuron_sync_increments(pre, post, ctx.mask, self.at_zero, binary_gates=self.act_fn == "relu",
                                              out=None if ws is None else {k: ws.get(v) for k, v in names.items()})
                for key, value in incs.items():
                    ctx.add(f"nsync/{layer}/{key}", value)
                    if ws is not None and key in names:  # reused by the next batch (see BatchContext)
                        ws[names[key]] = value

            hooks += _pair_hooks(hook_name("mlp_pre", layer), hook_name("mlp_post", layer), compute)
        return hooks

    def meta(self) -> dict[str, Any]:
        return {"layers": self.layers, "act_fn": self.act_fn, "gate_at_zero": self.at_zero}

