"""Ablation in a basis and its quadratic prediction (SPEC §5c; paper §6 and footnote 5): pure tensors, no model.

Keeping a set S of a basis's directions (``C``, ``C⁺``, ``μ``) at a site replaces an activation a by
``μ + P_S (a − μ)``, ``P_S = C⁺[:, S] C[S]``: the kept directions are kept, everything else — the dropped basis
directions *and* the directions the basis discarded at its tolerance — is replaced by its mean. With
``S = {0..k−1}`` (the top k) this is ``P_k``.

To second order in the change of the activations, the KL behavioral loss of that ablation is

    predicted[k] = ½ tr(M (I − P_k) G_c (I − P_k)ᵀ)

with G_c the centred activation Gram (eq. 38) and M the KL Jacobian Gram (eq. 40, SPEC §2; F is the Hessian
of the KL in the logits, footnote 5). For the interaction basis this is ½ Σ_{i ≥ k} Λ_i plus the part of G_c
the basis discarded; by Eckart–Young no rank-k linear reconstruction predicts less, so the interaction
basis's predicted curve lies on or below PCA's at every k. The prediction neglects (i) cross-position terms
``J_{s,t}ᵀ F J_{s,t'}`` (t ≠ t'; M holds only t = t'), (ii) the correlation, token by token, between the
activation change and its Jacobian (the trace uses the averages of both), and (iii) curvature beyond second
order. The measured curve (:func:`tl_degeneracy.ablation_curve`) says how far off it is.

Example::

    >>> G = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    >>> M = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    >>> ib = tld.interaction_basis(G, M)                  # Λ = [9, 4]
    >>> predicted_kl(ib, G, M, [0, 1, 2]).tolist()        # ½ Σ_{i ≥ k} Λ_i
    [6.5, 2.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import site_kind

__all__ = [
    "LOSSES",
    "check_keep",
    "directions_needed",
    "keep_schedule",
    "predicted_kl",
    "projection_hook",
    "projector",
]

#: the losses an ablation curve measures
LOSSES = ("kl", "ce", "top1")

def keep_schedule(dim: int) -> list[int]:
    """The default ``keep`` schedule from 0 to ``dim``: dense near both ends, doubling in between.

    Example: ``keep_schedule(20)`` → ``[0, 1, 2, 4, 8, 16, 17, 18, 19, 20]``.
    """
    if dim < 0:
        raise BadInputError(f"dim must be >= 0, got {dim}")
    points = {0, 1, 2, dim, dim - 1, dim - 2, dim - 3, dim - 4}
    k = 4
    while k < dim:
        points.add(k)
        k *= 2
    return sorted(p for p in points if 0 <= p <= dim)


def check_keep(keep: int | Sequence[int] | None, dim: int, *, what: str = "keep") -> list[int]:
    """A ``keep`` schedule checked against a basis of ``dim`` directions (``None`` → :func:`keep_schedule`)."""
    if keep is None:
        return keep_schedule(dim)
    values = [keep] if isinstance(keep, int) else list(keep)
    if not values:
        raise BadInputError(f"{what} is empty; pass numbers of kept directions in 0..{dim}, or None")
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= dim]
    if bad:
        raise BadInputError(f"{what} {bad} out of range: this basis has {dim} directions, so keep is in 0..{dim}")
    return [int(k) for k in values]


def _indices(basis: Any, keep: int | Sequence[int]) -> list[int]:
    """Top-``keep`` (an int) or the given direction indices (a list), checked against ``basis.dim``."""
    dim = basis.dim
    if isinstance(keep, int) and not isinstance(keep, bool):
        return list(range(check_keep(keep, dim)[0]))
    idx = list(keep)
    bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < dim]
    if bad:
        raise BadInputError(f"direction indices {bad} out of range: this basis has directions 0..{dim - 1}")
    if len(set(idx)) != len(idx):
        raise BadInputError(f"direction indices repeat: {idx}")
    return idx


def projector(basis: Any, keep: int | Sequence[int]) -> Float[Tensor, "d d"]:
    """``P_S = C⁺[:, S] C[S]`` (float64 ``[d, d]``): ``keep`` an int k (S = the top k) or a list of indices.

    ``P`` is the identity on the kept directions and zero on the others and on the directions the basis
    discarded (``C P = C[S]`` rows only; ``P² = P`` since ``C C⁺ = I``).
    """
    idx = _indices(basis, keep)
    C = basis.C.to(torch.float64)
    C_pinv = basis.C_pinv.to(torch.float64)
    if not idx:
        return torch.zeros(basis.input_dim, basis.input_dim, dtype=torch.float64, device=C.device)
    return C_pinv[:, idx] @ C[idx]


def predicted_kl(
    basis: Any, G_c: Float[Tensor, "d d"], M: Float[Tensor, "d d"], keep: int | Sequence[int]
) -> Float[Tensor, " n"]:
    """The quadratic prediction ``½ tr(M (I − P_k) G_c (I − P_k)ᵀ)`` of the KL at each ``keep`` (float64).

    ``G_c``: the centred activation Gram of the site (``stats.gram(site)``); ``M``: its KL Jacobian Gram
    (``stats.jacobian_gram(site)``, collected with ``jacobian="kl"``). See the module docstring for what the
    prediction neglects.
    """
    d = basis.input_dim
    for name, A in (("G_c", G_c), ("M", M)):
        if not isinstance(A, Tensor) or tuple(A.shape) != (d, d):
            shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
            raise BadInputError(f"{name} must be [{d}, {d}] (the basis's input dimension), got {shape}")
    ks = check_keep(keep, basis.dim)
    G64 = G_c.detach().to(torch.float64).cpu()
    M64 = M.detach().to(torch.float64).cpu()
    eye = torch.eye(d, dtype=torch.float64)
    out = []
    for k in ks:
        R = eye - projector(basis, k).cpu()
        out.append(0.5 * torch.trace(M64 @ R @ G64 @ R.T))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def projection_hook(
    basis: Any, site: str, keep: int | Sequence[int], *, mask: Bool[Tensor, "batch pos"] | None = None
) -> Callable[[Tensor, Any], Tensor]:
    """The forward-hook function behind :meth:`InteractionBasis.ablation_hooks` / ``projection_hooks``.

    Replaces the activation ``a`` ([B, T, d], or [B, T, H, d_head] for ``attn_z``) by ``μ + P (a − μ)`` at
    every position, or only where ``mask`` [B, T] is true. ``P`` is applied in the activation's dtype (so
    keep = dim reproduces float32 activations to the float32 floor).

    On TransformerLens 4.x ``hook_resid_mid`` is an alias of the second LayerNorm's input, which feeds only
    the MLP: replacing it there would leave the residual skip unablated. The hook detects that it fired
    under another name and raises :class:`BadInputError` (never a silently partial intervention); the curves
    (:func:`tl_degeneracy.ablation_curve`) and :func:`tl_degeneracy.full_stream_hooks` intervene on the whole
    stream instead.
    """
    P = projector(basis, keep)
    mu = basis.mean.to(torch.float64)
    offset = mu - P @ mu  # μ + P(a − μ) = P a + (μ − P μ)
    cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
    d = basis.input_dim
    check_alias = site_kind(site) == "resid_mid"

    def hook(act: Tensor, hook: Any) -> Tensor:
        if check_alias and getattr(hook, "name", site) != site:
            raise BadInputError(
                f"'{site}' fired as '{hook.name}': on TransformerLens 4.x hook_resid_mid feeds only the MLP "
                "branch, so this ablation would be partial. Wrap the hooks with "
                "tld.full_stream_hooks(model, hooks) (ablation_curve does), or ablate hook_resid_pre/post"
            )
        flat = act.flatten(2) if act.ndim == 4 else act
        if flat.shape[-1] != d:
            raise BadInputError(
                f"'{site}' activations have width {flat.shape[-1]}, this basis expects {d}: a basis of another site?"
            )
        key = (act.dtype, act.device)
        if key not in cache:
            cache[key] = (P.to(device=act.device, dtype=act.dtype), offset.to(device=act.device, dtype=act.dtype))
        P_, off = cache[key]
        new = flat @ P_.T + off
        if mask is not None:
            m = mask.to(act.device)
            if m.shape != flat.shape[:2]:
                raise BadInputError(f"mask is {tuple(m.shape)} but the activations are {tuple(flat.shape[:2])} [B, T]")
            new = torch.where(m[..., None], new, flat)
        return new.reshape(act.shape)

    return hook


def directions_needed(curve: Any, tolerance: float) -> int | None:
    """The smallest k of a curve's ``keep`` whose loss, and that of every larger k measured, is ≤ ``tolerance``.

    ``curve`` is an :class:`~tl_degeneracy.AblationCurve` (anything with ``.keep`` and ``.loss``).

    ``None`` when even the largest k measured exceeds it. Example: the companion paper's "accuracy within 1%
    of the unablated model" is ``directions_needed(ablation_curve(..., loss="top1"), 0.01)``.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise BadInputError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    order = sorted(range(len(curve.keep)), key=lambda i: curve.keep[i])
    best = None
    for i in reversed(order):
        if not float(curve.loss[i]) <= tolerance:
            break
        best = curve.keep[i]
    return best
