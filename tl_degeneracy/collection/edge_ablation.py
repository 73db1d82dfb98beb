"""Edge ablation between consecutive sites A → B: keep some edges of the interaction graph, remove the rest.

Method (rib's edge ablation by patching B's basis coordinates, with mean ablation of the removed sources):
with bases (C_A, μ_A), (C_B, μ_B), at every counted position f̂_A = C_A (a − μ_A) and r_A = a − μ_A − C_A⁺ f̂_A.
A keep mask ``K [k_A, k_B]`` (``K[i, j]``: the edge i → j is kept) gives each output node j the sources
S_j = {i : K[i, j]}, and its patched coordinate is computed from A with every other source at its mean:

    a_j = μ_A + r_A + C_A⁺ (1_{S_j} ⊙ f̂_A),        F̃_j = C_B,j (b(a_j) − μ_B)

at the counted positions (uncounted positions keep their activation, all positions of a_j move together, so
cross-position paths of attention are removed with their source). B's activation becomes
``b̃ = b + C_B⁺ (F̃ − F)`` with F = C_B (b − μ_B) (the part of b outside B's basis is kept), and the model runs
on from B. For a map b(a) that is affine in a — every A → B pair of a deep linear network, or ``mlp_post`` →
``resid_post`` — F̃_j = F_j − Σ_{i ∉ S_j} (C_B J C_A⁺)_{j i} f̂_{A,i} exactly (J the Jacobian, over positions
too): the removed edges' contributions are subtracted and nothing else changes, so an edge of weight
E[i, j] = 0 (its contribution is zero on every token) changes nothing when removed. For nonlinear maps this is
rib's patching, not its first-order linearisation.

Cost: output nodes with the same source set share a sub-forward (``torch.unique`` over K's columns); nodes
whose sources are all kept need none (a_j = a). Each batch runs at most min(k_B, distinct source sets) forwards
from the start to B, stacked along the batch dimension in chunks of about ``tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_degeneracy.adapter import ModelAdapter
from tl_degeneracy.collection.cut import cut_forward, forward_until
from tl_degeneracy.collection.engine import flatten_site
from tl_degeneracy.data import TokenBatch
from tl_degeneracy.errors import BadInputError

__all__ = ["edge_intervention", "keep_mask", "patched_activation"]

#: tokens per stacked sub-forward (memory: that many × d floats per activation of the model, and the attention
#: patterns of tokens / pos sequences)
TOKENS = 16384

Hooks = list[tuple[str, Callable[..., Any]]]


def keep_mask(E: Float[Tensor, "ka kb"], n_keep: int) -> Bool[Tensor, "ka kb"]:
    """The ``n_keep`` strongest edges of ``E`` (ties broken by flat index, row-major), as a boolean mask.

    Example: ``keep_mask(torch.tensor([[1., 3.], [2., 0.]]), 2)`` → ``[[False, True], [True, False]]``.
    """
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 0 <= n_keep <= E.numel():
        raise BadInputError(f"the number of kept edges must be an integer in 0..{E.numel()}, got {n_keep!r}")
    flat = E.detach().to(torch.float64).flatten()
    order = torch.argsort(-flat, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=E.device)
    mask[order[:n_keep]] = True
    return mask.reshape(E.shape)


def _both(adapter: ModelAdapter, tokens: Tensor, site_a: str, site_b: str) -> tuple[Tensor, Tensor]:
    """The activations at A and B (detached), the forward stopped right after B."""
    box: dict[str, Tensor] = {}

    def grab_a(act: Tensor, hook: Any) -> None:
        box["a"] = act.detach()

    b = forward_until(adapter, tokens, site_b, [(site_a, grab_a)]).detach()
    if "a" not in box:
        raise RuntimeError(f"the forward pass did not reach '{site_a}' before '{site_b}'")
    return box["a"], b


def _replaced(adapter: ModelAdapter, tokens: Tensor, site_a: str, site_b: str, a_new: Tensor) -> Tensor:
    """B's activation (detached) with A's activation replaced by ``a_new``; the forward stops at B."""
    return cut_forward(adapter, tokens, site_a, site_b, lambda _a: a_new, grad=False).detach()


def patched_activation(
    adapter: ModelAdapter, tokens: Tensor, mask: Tensor, site_a: str, site_b: str, basis_a: Any, basis_b: Any,
    keep: Bool[Tensor, "ka kb"], *, tokens_per_chunk: int = TOKENS,
) -> tuple[Tensor, Tensor]:
    """``(b, b̃)``: B's activation without and with the edge ablation ``keep`` (module docstring), detached.

    ``mask`` [B, T]: the counted positions (the only ones that move at A or change at B).
    """
    a0, b0 = _both(adapter, tokens, site_a, site_b)
    dt, dev = a0.dtype, a0.device
    C_a, Cp_a, mu_a = (t.to(device=dev, dtype=dt) for t in (basis_a.C, basis_a.C_pinv, basis_a.mean))
    C_b, Cp_b, mu_b = (t.to(device=dev, dtype=dt) for t in (basis_b.C, basis_b.C_pinv, basis_b.mean))
    m3 = mask.to(dev)[:, :, None]
    f = ((a0 - mu_a) @ C_a.T) * m3.to(dt)
    r = a0 - mu_a - f @ Cp_a.T
    b_flat = flatten_site(b0, site_b)
    F0 = (b_flat - mu_b) @ C_b.T
    F = F0.clone()
    sources, group = keep.to(dev).T.unique(dim=0, return_inverse=True)  # [n_sets, k_A], [k_B]
    todo = [g for g in range(sources.shape[0]) if not bool(sources[g].all())]  # all kept: a_j = a, F̃_j = F_j
    per = max(1, tokens_per_chunk // tokens.numel())
    for start in range(0, len(todo), per):
        chunk = todo[start:start + per]
        a_new = torch.cat([torch.where(m3, mu_a + r + (f * sources[g].to(dt)) @ Cp_a.T, a0) for g in chunk])
        b_new = _replaced(adapter, tokens.repeat(len(chunk), 1), site_a, site_b, a_new.reshape(-1, *a0.shape[1:]))
        b_new = flatten_site(b_new, site_b).reshape(len(chunk), *b_flat.shape)
        for n, g in enumerate(chunk):
            out = group == g
            F[..., out] = (b_new[n] - mu_b) @ C_b[out].T
    b_tilde = torch.where(m3, b_flat + (F - F0) @ Cp_b.T, b_flat)
    return b0, b_tilde.reshape(b0.shape)


def edge_intervention(
    adapter: ModelAdapter, site_a: str, site_b: str, basis_a: Any, basis_b: Any, keep: Bool[Tensor, "ka kb"],
    *, tokens_per_chunk: int = TOKENS,
) -> Callable[[TokenBatch], Hooks]:
    """An intervention for :func:`~tl_degeneracy.collection.ablation.measure_losses`: per batch, the patched
    activation b̃ is computed first (its own forwards, :func:`patched_activation`) and a hook at B puts it in."""

    def make(batch: TokenBatch) -> Hooks:
        tokens = batch.tokens.to(adapter.device)
        _, b_tilde = patched_activation(adapter, tokens, batch.mask.to(adapter.device), site_a, site_b, basis_a,
                                        basis_b, keep, tokens_per_chunk=tokens_per_chunk)

        def put(act: Tensor, hook: Any) -> Tensor:
            if act.shape != b_tilde.shape:
                raise BadInputError(f"'{site_b}' has shape {tuple(act.shape)} here but {tuple(b_tilde.shape)} "
                                    "when patched")
            return b_tilde.to(act.dtype)

        return [(site_b, put)]

    return make
