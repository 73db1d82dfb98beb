"""The Jacobian Gram of the next site's basis coordinates, for the local interaction basis (companion paper).

For consecutive sites A → B and B's basis ``f̂_B = C_B (b − μ_B)``,

    M_A = (1/N) Σ_t Σ_{t'} J_{B←A}(t', t)ᵀ C_Bᵀ C_B J_{B←A}(t', t),        J_{B←A}(t', t) = ∂b_{t'}/∂a_t,

over counted positions t, t' of each sequence (N counted tokens). It replaces the output-Jacobian Gram
(eq. 40) in the two steps of :func:`tl_degeneracy.interaction_basis`. Backward passes run from B to A only:
the forward is cut at A (a detached leaf) and stopped at B, so nothing before A or after B is differentiated.

Estimators:

- ``probe`` (default): K probes per batch; a probe puts independent Rademacher signs v_{t'} ∈ {±1}^{k_B} at
  every counted position t' (zero elsewhere) in B's basis coordinates, and one backward pass gives
  g_t = Σ_{t'} J(t', t)ᵀ C_Bᵀ v_{t'}. Since E[v_{t'} v_{s'}ᵀ] = δ_{t's'} I, E[g_t g_tᵀ] = Σ_{t'} J(t',t)ᵀ C_Bᵀ C_B
  J(t',t): unbiased. Cost per batch: one forward to B and K backward passes to A (vmapped together).
- ``exact``: one cotangent per counted output position t' and coordinate j (all sequences of the batch at
  once: they do not interact), T·k_B backward passes per batch — the oracle, for tiny models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tl_degeneracy.adapter import as_adapter
from tl_degeneracy.collection.cut import batched_vjp, cut_forward, one_hot_cotangents
from tl_degeneracy.collection.distributed import shard, sharded_sums
from tl_degeneracy.collection.engine import accurate_matmuls, flatten_site
from tl_degeneracy.collection.kernels import gram_increment
from tl_degeneracy.data import TokenBatches
from tl_degeneracy.errors import BadInputError, NonFiniteError

ESTIMATORS = ("probe", "exact")


def local_jacobian_gram(
    model: Any, data: TokenBatches, site_a: str, site_b: str, C_B: torch.Tensor, *,
    estimator: str = "probe", n_probes: int = 4, seed: int = 0,
) -> tuple[torch.Tensor, int]:
    """``(M_A [d_A, d_A] float64, N)``: the Gram of ``C_B J_{B←A}`` (module docstring), one pass over ``data``.

    ``C_B`` is ``[k_B, d_B]`` (B's basis map). Sites are not checked here (the caller checks the whole chain).

    Example::

        M, n = local_jacobian_gram(model, data, "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre",
                                   basis_b.C, estimator="probe", n_probes=8)
    """
    if estimator not in ESTIMATORS:
        raise BadInputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise BadInputError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    adapter = as_adapter(model)
    device = adapter.device
    M: torch.Tensor | None = None
    workspace: torch.Tensor | None = None  # the float32 product's buffer, reused from chunk to chunk (CPU)
    n_total = 0
    with sharded_sums() as acc, adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
        for batch in shard(data):  # this rank's share under torch.distributed, else every batch
            mask = batch.mask.to(device)
            n = int(mask.sum())
            if n == 0:
                continue
            box: dict[str, torch.Tensor] = {}
            b = cut_forward(adapter, batch.tokens.to(device), site_a, site_b, _leaf_into(box))
            leaf = box["leaf"]
            F = flatten_site(b, site_b) @ C_B.to(device=device, dtype=b.dtype).T  # [B, T, k_B]
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch.index)
            n_cot, cot, weight = _cotangents(F, mask, estimator, n_probes, gen)
            d_a = flatten_site(leaf, site_a).shape[-1]
            inc = torch.zeros(d_a, d_a, dtype=torch.float64, device=device)
            for _, g in batched_vjp(F, leaf, n_cot, cot):
                g = g.flatten(3) if g.ndim == 5 else g
                rows = g[:, mask].reshape(-1, d_a)  # counted input positions t
                if rows.dtype == torch.float64:  # a float64 model keeps float64 products
                    part = rows.T @ rows
                else:  # float32 product (TF32 off; upper triangle on the CPU), added to the float64 total
                    part = workspace = gram_increment(rows, out=workspace)
                # NaN and inf in any row reach the Gram's diagonal (sums of squares): one check of d_a numbers
                if not bool(torch.isfinite(part.diagonal().sum())):
                    raise NonFiniteError(
                        f"NaN or inf in the B→A Jacobian at batch {batch.index} ({site_b} → {site_a})")
                inc += part
            M = inc * weight if M is None else M.add_(inc, alpha=weight)
            n_total += n
            acc.sums = {"M": M, "n": torch.tensor(n_total)}
    if acc.sums:  # totals over ranks when sharded
        M, n_total = acc.sums["M"], int(acc.sums["n"])
    if M is None:
        raise BadInputError("the data has no counted tokens")
    return (M / n_total).cpu(), n_total


def _leaf_into(box: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A's replacement: a detached leaf copy of the activation (kept in ``box``), so backward stops at A."""

    def replace(a: torch.Tensor) -> torch.Tensor:
        box["leaf"] = a.clone().requires_grad_(True)
        return box["leaf"]

    return replace


def _cotangents(
    F: torch.Tensor, mask: torch.Tensor, estimator: str, n_probes: int, gen: torch.Generator
) -> tuple[int, Callable[[int, int], torch.Tensor], float]:
    """How many cotangents at F, a maker of chunks of them, and the weight of each one's outer products."""
    if estimator == "probe":
        B, T, k = F.shape
        v = torch.empty(n_probes, B, T, k, dtype=F.dtype, device=F.device)
        v.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        v *= mask[None, :, :, None].to(F.dtype)
        return n_probes, lambda start, stop: v[start:stop], 1.0 / n_probes
    n, make = one_hot_cotangents(tuple(F.shape), mask, F.dtype)
    return n, make, 1.0
