"""A hooked sub-computation from one site A to the next site B, for the interaction graph (paper §4–5).

The model runs through the user's own hooks: a forward hook at A replaces the activation by a tensor built
from a detached leaf (the forward is cut there, so a backward pass from B stops at A and never reaches the
earlier layers or the weights), a forward hook at B captures b and stops the forward (nothing after B is
computed). Batched vector–Jacobian products from B to A use ``is_grads_batched`` (one vmapped backward for
many cotangents), in chunks.

Sites allowed at A are those whose hooked tensor is the one every later computation reads (``resid_pre``,
``resid_post``, ``mlp_pre``, ``mlp_post``, ``ln_final``, and ``resid_mid`` where the adapter has a single
gradient hook for it); ``attn_z`` and ``attn_pattern`` are refused (ECOSYSTEM.md gotcha 3). ``logits`` (the
unembedding's output) comes after every other site and can only be B, the end of a chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from tl_degeneracy.adapter import ModelAdapter
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import site_kind, site_layer

#: position of a site kind inside its block, in forward order
_ORDER = {"resid_pre": 0, "attn_z": 1, "resid_mid": 2, "mlp_pre": 3, "mlp_post": 4, "resid_post": 5}
_CUTTABLE = ("resid_pre", "resid_mid", "resid_post", "mlp_pre", "mlp_post", "ln_final")

#: cotangents per batched backward pass (memory: chunk × batch × pos × d floats)
VJP_CHUNK = 64


class _Stop(Exception):
    """Raised from B's hook: the forward stops once b is captured."""


def forward_key(adapter: ModelAdapter, site: str) -> tuple[int, int]:
    """(layer, place in the block) of a site; ``ln_final`` comes after every block, ``logits`` after it."""
    kind = site_kind(site)
    if kind in ("ln_final", "logits"):
        return (adapter.n_layers, 0 if kind == "ln_final" else 1)
    if kind is None or kind not in _ORDER:
        raise BadInputError(
            f"'{site}' is not a vector site of the interaction graph; use hook names of kinds {_CUTTABLE} "
            "(and 'logits' as the last site)"
        )
    return (int(site_layer(site)), _ORDER[kind])


def check_site_chain(adapter: ModelAdapter, sites: Sequence[str]) -> list[str]:
    """At least two sites, each known to the model, in strict forward order, every one but the last cuttable."""
    sites = list(sites)
    if len(sites) < 2:
        raise BadInputError(f"the interaction graph needs at least two sites in forward order, got {sites}")
    adapter.check_hooks(sites)
    keys = [forward_key(adapter, s) for s in sites]
    for (a, ka), (b, kb) in zip(zip(sites, keys, strict=True), zip(sites[1:], keys[1:], strict=True), strict=False):
        if not ka < kb:
            raise BadInputError(
                f"sites must be in forward order (each computed from the one before): '{b}' does not come after "
                f"'{a}'; sort them by layer and place in the block"
            )
    for site in sites[:-1]:
        kind = site_kind(site)
        if kind not in _CUTTABLE or len(adapter.gradient_hooks(site)) > 1:
            raise BadInputError(
                f"'{site}' cannot be the input side of an edge on this model (its hooked tensor is not the one "
                "every later layer reads); use hook_resid_pre/hook_resid_post or an MLP site instead"
            )
    return sites


def forward_until(
    adapter: ModelAdapter, tokens: torch.Tensor, stop: str, fwd_hooks: Sequence = (), *, grad: bool = False,
) -> torch.Tensor:
    """The activation at ``stop`` with ``fwd_hooks`` attached (they run first, e.g. a replacement at an earlier
    site); the forward stops right after ``stop``, so nothing later is computed. Keeps the autograd graph only
    with ``grad=True``."""
    box: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        box["b"] = act
        raise _Stop

    with adapter.hooks(fwd_hooks=[*fwd_hooks, (stop, grab)]), torch.set_grad_enabled(grad):
        try:
            adapter.forward(tokens)
        except _Stop:
            pass
    if "b" not in box:
        raise RuntimeError(f"the forward pass did not reach '{stop}'")
    return box["b"]


def activation(adapter: ModelAdapter, tokens: torch.Tensor, site: str) -> torch.Tensor:
    """The activation at ``site`` (detached), the forward stopped right after it."""
    return forward_until(adapter, tokens, site).detach()


def cut_forward(
    adapter: ModelAdapter, tokens: torch.Tensor, site_a: str, site_b: str,
    replace: Callable[[torch.Tensor], torch.Tensor], *, grad: bool = True,
) -> torch.Tensor:
    """b computed from ``replace(a)`` at A (``a`` detached); the forward stops at B. Keeps the autograd graph
    (``grad=False``: builds none, for passes that only read b)."""

    def cut(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return replace(act.detach())

    return forward_until(adapter, tokens, site_b, [(site_a, cut)], grad=grad)


def batched_vjp(output: torch.Tensor, leaf: torch.Tensor, n: int,
                cotangents: Callable[[int, int], torch.Tensor],
                chunk: int = VJP_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
    """For ``n`` cotangents at ``output``, built chunk by chunk by ``cotangents(start, stop)`` →
    ``[stop − start, *output.shape]``, yield ``(start, [m, *leaf.shape] gradients)``: one vmapped backward pass
    (``is_grads_batched``) per chunk, never a loop per cotangent, and never all cotangents in memory at once."""
    for start in range(0, n, chunk):
        cot = cotangents(start, min(start + chunk, n))
        (g,) = torch.autograd.grad(output, leaf, cot, retain_graph=True, is_grads_batched=True)
        yield start, g


def one_hot_cotangents(shape: tuple[int, int, int], mask: torch.Tensor, dtype: torch.dtype,
                       ) -> tuple[int, Callable[[int, int], torch.Tensor]]:
    """``T'·k`` cotangents at a ``[B, T, k]`` output, row ``p·k + j`` = 1 at (counted position p, coordinate j) of
    every sequence where that position counts (sequences do not interact, so they share a pass)."""
    B, T, k = shape
    positions = mask.any(0).nonzero().squeeze(1)

    def make(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=mask.device)
        pos, j = positions[rows // k], rows % k
        cot = torch.zeros(stop - start, B, T, k, dtype=dtype, device=mask.device)
        cot[torch.arange(stop - start, device=mask.device), :, pos, j] = mask[:, pos].T.to(dtype)
        return cot

    return positions.numel() * k, make
