"""Squared interaction-graph edges between consecutive sites A → B (paper §4–5; rib's "squared" formula).

With bases (C_A, μ_A), (C_B, μ_B): at every counted position f̂_A = C_A (a − μ_A) and r_A = a − μ_A − C_A⁺ f̂_A
(held fixed); the path a(α) = μ_A + r_A + α C_A⁺ f̂_A moves all counted positions together (uncounted ones keep
their activation) and F(α) = C_B (b(a(α)) − μ_B) at counted positions. Then

    E[i, j] = (1/N_B) Σ_sequences Σ_{t_out} ( Σ_{t_in} f̂_{A,t_in,i} ∫₀¹ ∂F_{t_out,j}/∂f̂_{A,t_in,i}(α) dα )²

with the derivative taken at the point a(α). ``method="integrated"``: Gauss–Legendre on [0, 1] with
``n_points`` nodes (numpy's ``leggauss``); ``method="gradient"``: the integrand at α = 1 only.

Since the inner sum over t_in and the integral are linear in the gradient, each output node's gradient is
contracted with f̂_A at once: S_{t_out,j}[i] = Σ_q w_q Σ_{t_in} f̂_{t_in,i} g_q[t_in, i], E[i, j] = Σ S².

Estimators:

- ``exact``: one cotangent per counted output position and coordinate j (all sequences at once), vmapped
  (``is_grads_batched``) in chunks: T·k_B backward passes per node of the quadrature. The oracle.
- ``probe``: for each output coordinate j and probe, random signs s_{t_out} ∈ {±1} over the counted output
  positions: S = Σ_{t_out} s_{t_out} S_{t_out,j}, and E[S²] = Σ_{t_out} S_{t_out,j}² (the cross terms have mean
  zero) — unbiased, with k_B·K backward passes per node instead of T·k_B. The variance is measured: the
  standard error of E from the spread of the K probes (K ≥ 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tl_degeneracy.adapter import as_adapter
from tl_degeneracy.collection.cut import activation, batched_vjp, cut_forward, one_hot_cotangents
from tl_degeneracy.collection.distributed import shard, sharded_sums
from tl_degeneracy.collection.engine import accurate_matmuls, flatten_site
from tl_degeneracy.data import TokenBatches
from tl_degeneracy.errors import BadInputError, NonFiniteError

METHODS = ("integrated", "gradient")
ESTIMATORS = ("exact", "probe")


def quadrature(method: str, n_points: int) -> tuple[list[float], list[float]]:
    """Nodes α and weights w on [0, 1]: Gauss–Legendre (``integrated``) or α = 1, w = 1 (``gradient``).

    Example: ``quadrature("integrated", 1)`` → ``([0.5], [1.0])``.
    """
    if method not in METHODS:
        raise BadInputError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gradient":
        return [1.0], [1.0]
    if not (isinstance(n_points, int) and n_points >= 1):
        raise BadInputError(f"n_points must be an integer >= 1, got {n_points!r}")
    x, w = np.polynomial.legendre.leggauss(n_points)
    return [float((xi + 1) / 2) for xi in x], [float(wi / 2) for wi in w]


def edge_matrix(
    model: Any, data: TokenBatches, site_a: str, site_b: str, basis_a: Any, basis_b: Any, *,
    method: str = "integrated", n_points: int = 8, estimator: str = "exact", n_probes: int = 4, seed: int = 0,
) -> dict[str, Any]:
    """Squared edges ``E [k_A, k_B]`` (float64) from A to B over ``data`` (module docstring).

    ``basis_a``/``basis_b`` have ``C`` [k, d], ``C_pinv`` [d, k] and ``mean`` [d] (an
    :class:`~tl_degeneracy.InteractionBasis`). Returns ``{"edges": E, "stderr": standard error of E or None,
    "n_tokens": N_B}``.

    Example::

        out = edge_matrix(model, data, "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", ba, bb)
        out["edges"].shape                                   # (ba.dim, bb.dim)
    """
    alphas, weights = quadrature(method, n_points)
    if estimator not in ESTIMATORS:
        raise BadInputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "probe" and not (isinstance(n_probes, int) and n_probes >= 1):
        raise BadInputError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    adapter = as_adapter(model)
    device = adapter.device
    k_a, k_b = basis_a.C.shape[0], basis_b.C.shape[0]
    E = torch.zeros(k_a, k_b, dtype=torch.float64)
    var = torch.zeros(k_a, k_b, dtype=torch.float64)
    n_total = 0
    with sharded_sums() as acc, adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
        for batch in shard(data):  # this rank's share under torch.distributed, else every batch
            mask = batch.mask.to(device)
            n = int(mask.sum())
            if n == 0:
                continue
            tokens = batch.tokens.to(device)
            a0 = activation(adapter, tokens, site_a)
            dt = a0.dtype
            C_a, Cp_a, mu_a = (t.to(device=device, dtype=dt) for t in (basis_a.C, basis_a.C_pinv, basis_a.mean))
            C_b, mu_b = basis_b.C.to(device=device, dtype=dt), basis_b.mean.to(device=device, dtype=dt)
            m3 = mask[:, :, None]
            f = ((a0 - mu_a) @ C_a.T) * m3.to(dt)  # f̂_A, zero at uncounted positions
            r = a0 - mu_a - f @ Cp_a.T
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch.index)
            S: torch.Tensor | None = None  # [n_cotangents, B, k_A], Σ_q w_q Σ_t f̂ g_q
            cot: Callable[[int, int], torch.Tensor] | None = None
            for alpha, w in zip(alphas, weights, strict=True):
                x = (alpha * f).detach().requires_grad_(True)

                b = cut_forward(adapter, tokens, site_a, site_b, _on_path(m3, mu_a + r + x @ Cp_a.T))
                F = (flatten_site(b, site_b) - mu_b) @ C_b.T  # [B, T, k_B]
                if cot is None:  # drawn once per batch: the same probes at every node of the quadrature
                    n_cot, cot = _cotangents(F, mask, estimator, n_probes, gen)
                    S = torch.zeros(n_cot, F.shape[0], k_a, dtype=torch.float64, device=device)
                for start, g in batched_vjp(F, x, n_cot, cot):
                    S[start:start + g.shape[0]] += w * (g * f).sum(2).to(torch.float64)
            sq = S.square()
            if estimator == "exact":  # rows ordered (t_out, j)
                inc = sq.reshape(-1, k_b, sq.shape[1], k_a).sum((0, 2)).T
            else:  # rows ordered (probe, j)
                per_probe = sq.reshape(n_probes, k_b, sq.shape[1], k_a).sum(2)  # [K, k_B, k_A]
                inc = per_probe.mean(0).T
                if n_probes > 1:
                    var += (per_probe.var(0).T / n_probes).cpu()
            if not bool(torch.isfinite(inc).all()):
                raise NonFiniteError(f"NaN or inf in the edges {site_a} → {site_b} at batch {batch.index}")
            E += inc.cpu()
            n_total += n
            acc.sums = {"E": E, "var": var, "n": torch.tensor(n_total)}
    if acc.sums:  # totals over ranks when sharded
        E, var, n_total = acc.sums["E"].cpu(), acc.sums["var"].cpu(), int(acc.sums["n"])
    if n_total == 0:
        raise BadInputError("the data has no counted tokens")
    stderr = var.sqrt() / n_total if estimator == "probe" and n_probes > 1 else None
    return {"edges": E / n_total, "stderr": stderr, "n_tokens": n_total}


def _on_path(mask: torch.Tensor, path: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A's replacement: the path point at counted positions, the model's own activation elsewhere."""
    return lambda a: torch.where(mask, path, a)


def _cotangents(F: torch.Tensor, mask: torch.Tensor, estimator: str, n_probes: int,
                gen: torch.Generator) -> tuple[int, Callable[[int, int], torch.Tensor]]:
    """Cotangents at F ``[B, T, k_B]``, made chunk by chunk: one-hot per (counted position, j) for ``exact``;
    row ``probe·k_B + j``: random signs over the counted positions at coordinate j for ``probe``."""
    B, T, k = F.shape
    if estimator == "exact":
        return one_hot_cotangents((B, T, k), mask, F.dtype)
    signs = torch.empty(n_probes, B, T, dtype=F.dtype, device=F.device).bernoulli_(0.5, generator=gen)
    signs = (signs * 2 - 1) * mask.to(F.dtype)

    def make(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=F.device)
        cot = F.new_zeros(stop - start, B, T, k)
        cot[torch.arange(stop - start, device=F.device), :, :, rows % k] = signs[rows // k]
        return cot

    return n_probes * k, make
