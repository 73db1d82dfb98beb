"""The interaction basis (paper §6, Appendix A) and its PCA baseline: pure tensors, float64, no model.

Given a site's activation Gram matrix G (eq. 38; centred by default, with the mean μ) and its output-Jacobian
Gram matrix M (eq. 40; ``M = (1/N) Σ_t J_tᵀ F J_t``, SPEC §2), the interaction basis is the linear map
``f̂ = C (a − μ)`` built in four steps (SPEC §3):

1. ``G = Q D Qᵀ``; keep the eigenpairs with ``D_i > tol_G``: ``Q₁, D₁`` (``k₁ = rank_G`` directions).
2. Whitening ``W = D₁^{-1/2} Q₁ᵀ`` (``k₁×d``).
3. ``M̃ = D₁^{1/2} Q₁ᵀ M Q₁ D₁^{1/2} = P Λ Pᵀ``; keep ``Λ_i > tol_M``: ``P₂, Λ₂`` (``k`` directions).
4. ``C = Λ₂^{1/2} P₂ᵀ W`` (``k×d``) with right inverse ``C⁺ = Q₁ D₁^{1/2} P₂ Λ₂^{-1/2}`` (``d×k``).

In ``f̂`` coordinates the activation covariance is ``C G Cᵀ = diag(Λ₂)`` and, since ``a − μ = C⁺ f̂`` on
the data, the Jacobian with respect to ``f̂`` is ``J C⁺`` and its Gram matrix is ``C⁺ᵀ M C⁺ = I``.
``Λ`` are the non-zero eigenvalues of ``G M``; they do not change under ``a → R a`` (§6.2), so they, not the
eigenvalues of G, carry the paper's noise scale ε.

Example::

    >>> G = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))   # third direction unused
    >>> M = torch.diag(torch.tensor([1.0, 9.0, 5.0], dtype=torch.float64))
    >>> ib = interaction_basis(G, M)
    >>> ib.rank_G, ib.dim, ib.lambdas.tolist()                 # Λ = eigenvalues of G M on the data
    (2, 2, [9.0, 4.0])
    >>> ib.transform(torch.tensor([[1.0, 1.0, 7.0]])).tolist()  # f̂ = Λ^{1/2} Pᵀ D^{-1/2} Q₁ᵀ a
    [[3.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degeneracy._io import (
    check_format,
    load_tensors,
    read_json,
    save_tensors,
    tensor_path,
    tensors_checksum,
    write_json,
)
from tl_degeneracy.analysis.ablation import predicted_kl, projection_hook
from tl_degeneracy.errors import BadInputError, CorruptFileError, NonFiniteError

__all__ = ["DimCurve", "InteractionBasis", "identity_basis", "interaction_basis", "interaction_bases", "pca_basis"]

Scaling = Literal["sqrt_lambda", "inv_sqrt_lambda", "whitened"]
_SCALINGS = ("sqrt_lambda", "inv_sqrt_lambda", "whitened")

DEFAULT_RTOL = 1e-6
"""Default relative tolerance. The statistics are sums of float32 products (SPEC §1), whose rounding is
ε₃₂ ≈ 1.2e-7 relative; an eigenvalue below ~8 such ulps of the largest one is not told apart from rounding."""

_EPS64 = torch.finfo(torch.float64).eps
_FORMAT = "tl_degeneracy.InteractionBasis"
_FORMAT_VERSION = 1
_TENSOR_FIELDS = ("C", "C_pinv", "lambdas", "all_lambdas", "gram_eigenvalues", "mean")


class DimCurve(NamedTuple):
    """Kept dimension against the noise scale ε (what :meth:`InteractionBasis.dim_curve` returns).

    A named tuple, so ``eps, dims = ib.dim_curve()`` and ``ib.dim_curve()[1]`` work as for a plain pair.

    Attributes:
        eps: ``[n]`` float64 tolerances ε (ascending on the default grid).
        dims: ``[n]`` int64, ``dims[i]`` = number of Λ above ``max(eps[i], lambda_floor)``.

    Example::

        >>> ib = interaction_basis(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)),
        ...                        torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64)))   # Λ = 9, 4
        >>> curve = ib.dim_curve(torch.tensor([0.0, 5.0]))
        >>> curve
        DimCurve(2 points: eps 0 → 5, dim 2 → 1)
        >>> curve.to_dataframe().columns.tolist()
        ['eps', 'dim']
    """

    eps: Float[Tensor, " n"]
    dims: Tensor

    def __repr__(self) -> str:
        n = int(self.eps.numel())
        if n == 0:
            return "DimCurve(0 points)"
        return (
            f"DimCurve({n} points: eps {self.eps[0].item():.3g} → {self.eps[-1].item():.3g}, "
            f"dim {int(self.dims[0])} → {int(self.dims[-1])})"
        )

    def to_dataframe(self) -> Any:
        """A ``pandas.DataFrame`` with columns ``eps`` and ``dim`` (needs pandas: ``pip install pandas``)."""
        pd = _pandas()
        return pd.DataFrame({"eps": self.eps.tolist(), "dim": [int(x) for x in self.dims.tolist()]})


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as err:
        raise ImportError("to_dataframe() needs pandas, which is not installed: pip install pandas") from err
    return pandas
_SCALAR_FIELDS = ("kind", "scaling", "rank_G", "rtol", "atol", "gram_tol", "lambda_tol", "lambda_floor")


@dataclass(frozen=True, eq=False)
class InteractionBasis:
    """A basis of one site's activation space: ``f̂ = C (a − μ)``, ``a ≈ μ + C⁺ f̂``.

    Built by :func:`interaction_basis` (``kind="interaction"``), :func:`pca_basis` (``kind="pca"``) or
    :func:`identity_basis` (``kind="identity"``, an output node layer);
    both share this class so they can be used side by side (same ``dim``, ``dim_curve``, ``transform``).
    All tensors are float64.

    Attributes:
        C: ``[k, d]`` the map to basis coordinates; rows are ordered by descending ``lambdas`` and signed so
            that each row's largest-magnitude entry is positive (the sign of a row is otherwise arbitrary:
            ``f̂_i → −f̂_i`` leaves G and M unchanged).
        C_pinv: ``[d, k]`` right inverse, ``C C⁺ = I_k``; its columns are the basis directions in activation
            space.
        lambdas: ``[k]`` the kept eigenvalues: Λ₂ (interaction) or the kept variances D (PCA). In both,
            with the default scaling, ``lambdas`` is the variance of each coordinate.
        all_lambdas: the full spectrum the second truncation chose from: eigenvalues of M̃ (``[k₁]``,
            interaction) or of G (``[d]``, PCA), descending.
        gram_eigenvalues: ``[d]`` all eigenvalues D of G, descending.
        mean: ``[d]`` the mean μ subtracted by :meth:`transform` (zeros when none was given).
        rank_G: k₁, the number of directions of G kept in step 1.
        kind: ``"interaction"`` or ``"pca"``.
        scaling: ``"sqrt_lambda"``, ``"inv_sqrt_lambda"``, ``"whitened"`` (interaction) or
            ``"orthonormal"`` (PCA).
        rtol, atol: the tolerances asked for.
        gram_tol: the threshold step 1 applied to D (``max(rtol·D_max, floor)``).
        lambda_tol: the threshold step 3 applied to Λ (``max(atol, rtol·Λ_max, lambda_floor)``).
        lambda_floor: the float64 noise floor of ``all_lambdas``; :meth:`dim_at` never counts below it.
    """

    C: Float[Tensor, "k d"] = field(repr=False)
    C_pinv: Float[Tensor, "d k"] = field(repr=False)
    lambdas: Float[Tensor, " k"] = field(repr=False)
    all_lambdas: Float[Tensor, " m"] = field(repr=False)
    gram_eigenvalues: Float[Tensor, " d"] = field(repr=False)
    mean: Float[Tensor, " d"] = field(repr=False)
    rank_G: int
    kind: str
    scaling: str
    rtol: float
    atol: float
    gram_tol: float
    lambda_tol: float
    lambda_floor: float
    #: fingerprints of the statistics it was computed from (model weights, token data), when known
    source: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def dim(self) -> int:
        """k, the number of kept directions."""
        return self.C.shape[0]

    @property
    def input_dim(self) -> int:
        """d, the dimension of the site's activations."""
        return self.C.shape[1]

    def __repr__(self) -> str:
        top = f", lambda_max={self.lambdas[0].item():.4g}" if self.dim else ""
        return (
            f"InteractionBasis(kind={self.kind!r}, input_dim={self.input_dim}, rank_G={self.rank_G}, "
            f"dim={self.dim}, scaling={self.scaling!r}{top})"
        )

    def transform(self, acts: Float[Tensor, "... d"]) -> Float[Tensor, "... k"]:
        """Basis coordinates ``f̂ = C (a − μ)`` of activations ``[..., d]``.

        Computed in float64 on ``acts``' device; returned in ``acts``' dtype when it is a floating dtype (so
        float32 hook activations give float32 coordinates; pass float64 to keep full precision), else float64.
        """
        out_dtype = _out_dtype(acts)
        if acts.shape[-1] != self.input_dim:
            raise BadInputError(
                f"activations have last dimension {acts.shape[-1]}, this basis expects {self.input_dim}"
            )
        C = self.C.to(acts.device)
        mu = self.mean.to(acts.device)
        return ((acts.to(torch.float64) - mu) @ C.T).to(out_dtype)

    def inverse_transform(self, f: Float[Tensor, "... k"]) -> Float[Tensor, "... d"]:
        """Activations ``a = μ + C⁺ f̂`` from coordinates ``[..., k]`` (same dtype rule as :meth:`transform`).

        ``inverse_transform(transform(a)) == a`` for ``a`` in ``μ + span(C⁺)``, which holds for the data
        when no direction of G is dropped by the second truncation (``dim == rank_G``).
        """
        out_dtype = _out_dtype(f)
        if f.shape[-1] != self.dim:
            raise BadInputError(f"coordinates have last dimension {f.shape[-1]}, this basis has {self.dim}")
        C_pinv = self.C_pinv.to(f.device)
        mu = self.mean.to(f.device)
        return (f.to(torch.float64) @ C_pinv.T + mu).to(out_dtype)

    def ablation_hooks(
        self, site: str, *, keep: int, mask: Tensor | None = None
    ) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
        """Forward hooks that keep only the top ``keep`` directions of this basis at ``site`` (SPEC §5c).

        Every position's activation a (or those where ``mask`` [B, T] is true) becomes
        ``μ + C⁺[:, :k] C[:k] (a − μ)``: the dropped directions and the ones the basis discarded at its
        tolerance are replaced by their mean. Use with ``model.hooks(fwd_hooks=...)`` on either
        TransformerLens major; on 4.x ``hook_resid_mid`` feeds only the MLP, so wrap the hooks with
        :func:`tl_degeneracy.full_stream_hooks` there (the hook refuses to run otherwise).

        Example::

            with model.hooks(fwd_hooks=ib.ablation_hooks("blocks.0.hook_resid_pre", keep=4)):
                logits = model(tokens)
        """
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise BadInputError(f"keep must be an int in 0..{self.dim}; for a subset use projection_hooks")
        return [(site, projection_hook(self, site, keep, mask=mask))]

    def projection_hooks(
        self, site: str, *, keep: Sequence[int], mask: Tensor | None = None
    ) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
        """Like :meth:`ablation_hooks`, keeping the directions with the given indices (any subset)."""
        if isinstance(keep, int):
            raise BadInputError("projection_hooks takes a list of direction indices; for the top k use ablation_hooks")
        return [(site, projection_hook(self, site, list(keep), mask=mask))]

    def predicted_kl(self, G_c: Tensor, M: Tensor, keep: int | Sequence[int]) -> Tensor:
        """``½ tr(M (I − P_k) G_c (I − P_k)ᵀ)`` for each k of ``keep``: the quadratic prediction of the KL of
        keeping the top k directions (SPEC §5c; :func:`tl_degeneracy.analysis.ablation.predicted_kl`)."""
        return predicted_kl(self, G_c, M, keep)

    def dim_at(self, eps: float) -> int:
        """Kept dimension at absolute tolerance ε: ``#{λ ∈ all_lambdas : λ > max(ε, lambda_floor)}``.

        This is the ``dim`` that ``atol=eps, rtol=0`` would give, with the same step-1 truncation of G.
        """
        return int(self.dim_curve(torch.tensor([float(eps)], dtype=torch.float64))[1][0])

    def dim_curve(
        self, eps_grid: Float[Tensor, " n"] | None = None, *, n_points: int = 64
    ) -> DimCurve:
        """Kept dimension as a function of the absolute tolerance ε (the paper's noise scale, §2.2.2).

        Returns a :class:`DimCurve` ``(eps, dims)`` (a named tuple: unpack it as a pair):
        ``dims[i] = dim_at(eps[i])`` (int64), non-increasing in ε. The default grid is
        ``n_points`` log-spaced values ascending from the float64 noise floor (``lambda_floor``, at least
        ``ε₆₄·λ_max``) to the largest eigenvalue ``λ_max`` (where the dimension is 0); it is empty when
        no eigenvalue is positive.
        """
        spectrum = self.all_lambdas.to(torch.float64)
        if eps_grid is None:
            hi = spectrum.max().item() if spectrum.numel() else 0.0
            if not hi > 0:
                eps_grid = torch.zeros(0, dtype=torch.float64)
            else:
                lo = max(self.lambda_floor, _EPS64 * hi)
                if lo >= hi:
                    eps_grid = torch.tensor([hi], dtype=torch.float64)
                else:
                    eps_grid = torch.logspace(math.log10(lo), math.log10(hi), n_points, dtype=torch.float64)
                    eps_grid[0], eps_grid[-1] = lo, hi  # exact endpoints despite 10**log10 rounding
        eps_grid = torch.as_tensor(eps_grid, dtype=torch.float64).reshape(-1).cpu()
        thresholds = eps_grid.clamp(min=self.lambda_floor)
        dims = (spectrum.cpu()[None, :] > thresholds[:, None]).sum(dim=1)
        return DimCurve(eps_grid, dims)

    def to_dataframe(self) -> Any:
        """The spectrum as a ``pandas.DataFrame``: one row per eigenvalue of ``all_lambdas`` (descending).

        Columns: ``index``, ``lambda``, ``kept`` (counted in ``dim``), ``above_floor`` (above the float64
        noise floor ``lambda_floor``; values below it are rounding, not data). Needs pandas.
        """
        pd = _pandas()
        lam = self.all_lambdas.to(torch.float64).cpu()
        return pd.DataFrame({
            "index": list(range(lam.numel())),
            "lambda": lam.tolist(),
            "kept": [i < self.dim for i in range(lam.numel())],
            "above_floor": (lam > self.lambda_floor).tolist(),
        })

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (the tensors) and ``<path>.json`` (everything else); no pickle.

        ``path`` may end in ``.safetensors`` or have no such suffix. Returns the tensor file's path.
        """
        t_path, json_path = _paths(path)
        # a PCA basis is orthonormal (C⁺ = Cᵀ): its C_pinv is not stored, and load() rebuilds it
        skip = {"C_pinv"} if self.kind == "pca" else set()
        tensors = {name: getattr(self, name) for name in _TENSOR_FIELDS if name not in skip}
        save_tensors(t_path, tensors, sidecar=False)
        meta: dict[str, Any] = {"format": _FORMAT, "version": _FORMAT_VERSION}
        meta.update({name: getattr(self, name) for name in _SCALAR_FIELDS})
        meta["source"] = self.source
        meta["sha256"] = tensors_checksum(tensors)
        write_json(json_path, meta, indent=2, nan_to_null=False)
        return t_path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> InteractionBasis:
        """Read a basis written by :meth:`save` (bit for bit; a PCA basis's ``C_pinv`` is rebuilt as ``Cᵀ``).

        Files that hold ``C_pinv`` for a PCA basis (written before it was left out) load as before.
        """
        t_path, json_path = _paths(path)
        if not t_path.exists() or not json_path.exists():
            raise BadInputError(f"expected {t_path} and {json_path}, written by InteractionBasis.save")
        meta = read_json(json_path, what="InteractionBasis file")
        if meta.get("format") == _FORMAT:
            check_format(meta.get("version"), _FORMAT_VERSION, json_path, writer=meta.get("library_version"),
                         what="InteractionBasis file")
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise BadInputError(
                f"{json_path} is not an InteractionBasis file of version {_FORMAT_VERSION} "
                f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
            )
        tensors, _ = load_tensors(t_path, device=device, what="InteractionBasis tensor file")
        if meta.get("sha256") not in (None, tensors_checksum(tensors)):
            raise CorruptFileError(f"{t_path} does not belong to {json_path} (their checksums differ); recompute it")
        if "C_pinv" not in tensors and meta.get("kind") == "pca" and "C" in tensors:
            tensors["C_pinv"] = tensors["C"].T.clone()
        return cls(**{name: tensors[name] for name in _TENSOR_FIELDS}, **{k: meta[k] for k in _SCALAR_FIELDS},
                   source=meta.get("source"))


def interaction_basis(
    G: Float[Tensor, "d d"],
    M: Float[Tensor, "d d"],
    *,
    mean: Float[Tensor, " d"] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    scaling: Scaling = "sqrt_lambda",
) -> InteractionBasis:
    """The interaction basis of one site from its activation Gram G (eq. 38) and Jacobian Gram M (eq. 40).

    Steps (SPEC §3; paper §6.1, with ``U = Qᵀ``, ``D_G = D``, ``V = Pᵀ``, ``D_M = Λ``)::

        G  = Q D Qᵀ,                     keep D_i > tol_G        → Q₁, D₁   (k₁ = rank_G)
        W  = D₁^{-1/2} Q₁ᵀ                                         (whitening, eq. 41: W G Wᵀ = I)
        M̃  = D₁^{1/2} Q₁ᵀ M Q₁ D₁^{1/2} = P Λ Pᵀ,  keep Λ_i > tol_M → P₂, Λ₂  (k = dim)
        C  = S Λ₂^{1/2} P₂ᵀ W,           C⁺ = Q₁ D₁^{1/2} P₂ Λ₂^{-1/2} S     (S = diag(±1), sign convention)

    ``scaling`` picks the final diagonal factor (the rows of C are the same up to it):

    - ``"sqrt_lambda"`` (default; Appendix A and the companion paper): ``C G Cᵀ = diag(Λ₂)``,
      ``C⁺ᵀ M C⁺ = I``. For a deep linear network with metric I, f̂ equals the output's PCA coordinates
      at every layer (Appendix A, eq. 44).
    - ``"inv_sqrt_lambda"``: the §6.1 formula ``f̂ = (D_M^{1/2})⁺ V (D_G^{1/2})⁺ U f``, i.e.
      ``C = Λ₂^{-1/2} P₂ᵀ W``: ``C G Cᵀ = diag(Λ₂)⁻¹``, ``C⁺ᵀ M C⁺ = diag(Λ₂)²``.
    - ``"whitened"``: stop after the rotation, ``C = P₂ᵀ W``: ``C G Cᵀ = I``, ``C⁺ᵀ M C⁺ = diag(Λ₂)``.

    Tolerances. ``tol_G = max(rtol·D_max, floor_G)`` and ``tol_M = max(atol, rtol·Λ_max, floor_M)``. The
    absolute tolerance ``atol`` is the paper's noise scale ε and applies to Λ only: Λ are the eigenvalues of
    ``G M``, in the units of the output metric and unchanged by ``a → R a`` (§6.2), while D has the units of
    the activations squared, so an absolute threshold on D would break that invariance. The floors are the
    float64 rounding level, ``d·ε₆₄·(D_max + ‖μ‖²)`` for G (``‖μ‖²``: a centred Gram is ``S/n − μμᵀ``) and
    ``d·ε₆₄·D₁,max·‖M‖_F`` for M̃, raised to twice the magnitude of the most negative eigenvalue when there
    is one: G and M̃ are positive semi-definite, so a negative eigenvalue measures the rounding in them (a
    constant site's centred Gram is pure rounding of this kind). All eigenvalues are kept in
    ``gram_eigenvalues`` / ``all_lambdas``; :meth:`InteractionBasis.dim_curve` gives ``dim`` against ε.

    Args:
        G: ``[d, d]`` activation Gram matrix (centred when ``mean`` is given). Converted to float64.
        M: ``[d, d]`` Jacobian Gram matrix ``(1/N) Σ_t J_tᵀ F J_t``. Converted to float64.
        mean: ``[d]`` the activation mean μ that ``transform`` subtracts; ``None`` for no centring.
        rtol: relative tolerance, to the largest eigenvalue of G (step 1) and of M̃ (step 3).
        atol: absolute tolerance ε on Λ (step 3).
        scaling: ``"sqrt_lambda"`` | ``"inv_sqrt_lambda"`` | ``"whitened"``.

    Returns:
        An :class:`InteractionBasis` with ``kind="interaction"``. A site without variance (all zero or
        constant), or one the output does not depend on, gives ``dim == 0`` and a warning.

    Example::

        >>> A = torch.randn(1000, 8, dtype=torch.float64) @ torch.randn(8, 16, dtype=torch.float64)
        >>> J = torch.randn(16, 16, dtype=torch.float64)
        >>> ib = interaction_basis(torch.cov(A.T), J.T @ J, mean=A.mean(0))
        >>> ib.rank_G, ib.dim                                     # activations span 8 of 16 dimensions
        (8, 8)
        >>> torch.allclose(torch.cov(ib.transform(A).T), torch.diag(ib.lambdas))
        True
    """
    if scaling not in _SCALINGS:
        raise BadInputError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")
    _check_tolerances(rtol, atol)
    G64 = _symmetric64(G, "G")
    d = G64.shape[0]
    M64 = _symmetric64(M, "M")
    if M64.shape != G64.shape:
        raise BadInputError(f"G is {tuple(G64.shape)} but M is {tuple(M64.shape)}; both must be [d, d]")
    mu = _mean64(mean, d, G64.device)

    D, Q, k1, gram_tol, _ = _gram_step(G64, mu, rtol)
    Q1, sqrt_D1 = Q[:, :k1], D[:k1].sqrt()  # D₁ > tol_G >= 0
    B = Q1 * sqrt_D1  # Q₁ D₁^{1/2}, [d, k₁]
    _check_psd(torch.linalg.eigvalsh(M64), "M", 0.0)
    M_tilde = B.T @ M64 @ B
    Lam, P = _eigh_descending((M_tilde + M_tilde.T) / 2)

    lam_max = max(Lam[0].item(), 0.0) if k1 else 0.0
    d1_max = sqrt_D1[0].item() ** 2 if k1 else 0.0
    lambda_floor = _noise_floor(Lam, d * _EPS64 * d1_max * torch.linalg.matrix_norm(M64).item())
    lambda_tol = max(atol, rtol * lam_max, lambda_floor)
    k = int((Lam > lambda_tol).sum().item())

    P2, Lam2 = P[:, :k], Lam[:k]
    W = (Q1 / sqrt_D1).T  # D₁^{-1/2} Q₁ᵀ, [k₁, d]
    if scaling == "sqrt_lambda":
        s = Lam2.sqrt()
    elif scaling == "inv_sqrt_lambda":
        s = Lam2.rsqrt()
    else:
        s = torch.ones_like(Lam2)
    C = s[:, None] * (P2.T @ W)
    C_pinv = (B @ P2) / s[None, :]
    C, C_pinv = _fix_signs(C, C_pinv)

    if k1 == 0:
        warnings.warn(
            "interaction_basis: the activations have no variance above the float64 noise floor (an all-zero "
            "or constant site); the basis is empty (dim 0).",
            stacklevel=2,
        )
    elif k == 0:
        warnings.warn(
            f"interaction_basis: no eigenvalue of M̃ exceeds the tolerance {lambda_tol:.3g} (the output "
            "does not depend on this site's activations at this scale); the basis is empty (dim 0).",
            stacklevel=2,
        )
    return InteractionBasis(
        C=C,
        C_pinv=C_pinv,
        lambdas=Lam2.clone(),
        all_lambdas=Lam,
        gram_eigenvalues=D,
        mean=mu,
        rank_G=k1,
        kind="interaction",
        scaling=scaling,
        rtol=float(rtol),
        atol=float(atol),
        gram_tol=gram_tol,
        lambda_tol=lambda_tol,
        lambda_floor=lambda_floor,
    )


def pca_basis(
    G: Float[Tensor, "d d"],
    *,
    mean: Float[Tensor, " d"] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
) -> InteractionBasis:
    """The PCA basis of a site, the baseline for :func:`interaction_basis` (``kind="pca"``).

    ``G = Q D Qᵀ``; keep ``D_i > max(atol, rtol·D_max, floor_G)`` → ``C = Q₁ᵀ``, ``C⁺ = Q₁`` (orthonormal,
    ``scaling="orthonormal"``), ``lambdas = D₁``, so ``C G Cᵀ = diag(D₁)`` just as the interaction basis
    gives ``diag(Λ₂)``. Here ``atol`` is a variance (the only spectrum there is); ``floor_G`` is as in
    :func:`interaction_basis`, and ``rank_G`` counts the directions above ``max(rtol·D_max, floor_G)``.
    ``dim_curve`` is the number of principal components with variance above ε.

    Example::

        >>> G = torch.diag(torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64))
        >>> pb = pca_basis(G)
        >>> pb.dim, pb.lambdas.tolist(), pb.C.tolist()
        (2, [3.0, 1.0], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    """
    _check_tolerances(rtol, atol)
    G64 = _symmetric64(G, "G")
    mu = _mean64(mean, G64.shape[0], G64.device)
    D, Q, k1, gram_tol, floor = _gram_step(G64, mu, rtol)
    lambda_tol = max(atol, gram_tol)
    k = int((D > lambda_tol).sum().item())
    Q1 = Q[:, :k]
    C, C_pinv = _fix_signs(Q1.T.clone(), Q1.clone())
    if k == 0:
        warnings.warn(
            "pca_basis: the activations have no variance above the tolerance (an all-zero or constant "
            "site); the basis is empty (dim 0).",
            stacklevel=2,
        )
    return InteractionBasis(
        C=C,
        C_pinv=C_pinv,
        lambdas=D[:k].clone(),
        all_lambdas=D,
        gram_eigenvalues=D,
        mean=mu,
        rank_G=k1,
        kind="pca",
        scaling="orthonormal",
        rtol=float(rtol),
        atol=float(atol),
        gram_tol=gram_tol,
        lambda_tol=lambda_tol,
        lambda_floor=floor,
    )


def identity_basis(dim: int, *, mean: Float[Tensor, " d"] | None = None) -> InteractionBasis:
    """The site's own coordinates as a basis (``kind="identity"``): ``C = C⁺ = I_d``, ``f̂ = a − μ``.

    The companion paper's output node layer: the logits with the identity metric (its MSE loss), the last site
    of an interaction graph (``sites=[..., "unembed.hook_out"]``, site kind ``logits``), so the edges into it
    say how much each direction of the site before moves each logit. Unlike the other bases its rows are
    not ordered by a spectrum: ``lambdas`` are all 1 and row j is coordinate j (logit j).

    Example::

        >>> b = identity_basis(3)
        >>> b.dim, b.C.tolist()[0], b.kind
        (3, [1.0, 0.0, 0.0], 'identity')
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise BadInputError(f"dim must be an integer >= 1, got {dim!r}")
    eye = torch.eye(dim, dtype=torch.float64)
    ones = torch.ones(dim, dtype=torch.float64)
    return InteractionBasis(C=eye, C_pinv=eye.clone(), lambdas=ones, all_lambdas=ones.clone(),
                            gram_eigenvalues=ones.clone(), mean=_mean64(mean, dim, eye.device), rank_G=dim,
                            kind="identity", scaling="identity", rtol=0.0, atol=0.0, gram_tol=0.0, lambda_tol=0.0,
                            lambda_floor=0.0)


def interaction_bases(
    stats: Any,
    *,
    center: bool = True,
    sites: list[str] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = 0.0,
    scaling: Scaling = "sqrt_lambda",
) -> dict[str, InteractionBasis]:
    """Interaction bases for every site of a :class:`tl_degeneracy.Stats` (or those in ``sites``).

    Reads ``stats.gram(site, centered=center)``, ``stats.mean(site)`` (subtracted only when ``center``) and
    ``stats.jacobian_gram(site)``, then calls :func:`interaction_basis` with the other options. Warnings
    about empty bases name the site.

    Raises:
        BadInputError: a site that is not in ``stats``, or one collected without Jacobian statistics
            (collect with ``jacobian="kl"`` or ``jacobian="mse"``).
    """
    available = list(stats.sites)
    wanted = available if sites is None else list(sites)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise BadInputError(f"sites {missing} are not in these statistics; they have {available}")
    bases: dict[str, InteractionBasis] = {}
    for site in wanted:
        M = _jacobian_gram_or_raise(stats, site)
        G = stats.gram(site, centered=center)
        mean = stats.mean(site) if center else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bases[site] = dataclasses.replace(
                interaction_basis(G, M, mean=mean, rtol=rtol, atol=atol, scaling=scaling), source=stats_source(stats))
        for w in caught:
            warnings.warn(f"{site}: {w.message}", w.category, stacklevel=2)
    return bases


def stats_source(stats: Any) -> dict[str, Any] | None:
    """The fingerprints a basis records of the statistics it came from: model weights and token data."""
    meta = getattr(stats, "meta", None)
    if not isinstance(meta, dict):
        return None
    draws = stats._draws() if hasattr(stats, "_draws") else []
    return {"weights": (meta.get("model") or {}).get("weights"), "data": draws}


def _jacobian_gram_or_raise(stats: Any, site: str) -> Tensor:
    hint = (
        f"no Jacobian statistics for site {site!r}: the interaction basis needs the output-Jacobian Gram M. "
        'Collect with tld.collect(..., jacobian="kl") (or jacobian="mse").'
    )
    try:
        M = stats.jacobian_gram(site)
    except (BadInputError, KeyError) as err:  # what Stats (or a dict-backed stand-in) raises when absent
        raise BadInputError(hint) from err
    if M is None:
        raise BadInputError(hint)
    return M


def _gram_step(G: Tensor, mu: Tensor, rtol: float) -> tuple[Tensor, Tensor, int, float, float]:
    """Step 1: G = Q D Qᵀ (descending), k₁ = #{D_i > tol_G}, tol_G and the noise floor of D."""
    D, Q = _eigh_descending(G)
    _check_psd(D, "G", (mu @ mu).item())
    d_max = max(D[0].item(), 0.0) if D.numel() else 0.0
    floor = _noise_floor(D, _gram_rounding(D, mu))
    gram_tol = max(rtol * d_max, floor)
    return D, Q, int((D > gram_tol).sum().item()), gram_tol, floor


#: relative tolerance of the PSD check: statistics summed from float32 products in float64 are PSD to about
#: ε₃₂·√(tokens per batch) ≈ 1e-6 of their scale (their largest eigenvalue plus ‖μ‖², which centring cancels);
#: an eigenvalue below −1e-5 of that scale is not rounding, the matrix is not a Gram matrix
PSD_RTOL = 1e-5


def _check_psd(evals: Tensor, name: str, mean_sq: float) -> None:
    """Refuse a matrix that is not positive-semidefinite within rounding, naming its most negative eigenvalue."""
    if not evals.numel():
        return
    lowest = evals.min().item()
    tol = PSD_RTOL * (evals.abs().max().item() + mean_sq) + evals.numel() * _EPS64 * (evals.abs().max().item()
                                                                                      + mean_sq)
    if lowest < -tol:
        raise BadInputError(
            f"{name} is not positive-semidefinite: its most negative eigenvalue is {lowest:.4g}, beyond the "
            f"rounding tolerance {tol:.3g}; pass a Gram matrix (1/N) Σ x xᵀ (e.g. stats.gram / stats.jacobian_gram), "
            "not a difference or an estimate of one"
        )


def _gram_rounding(D: Tensor, mu: Tensor) -> float:
    """d·ε₆₄·(D_max + ‖μ‖²): the float64 rounding level of a (centred) Gram matrix and its eigenvalues."""
    d_max = max(D[0].item(), 0.0) if D.numel() else 0.0
    return D.numel() * _EPS64 * (d_max + (mu @ mu).item())


def _noise_floor(evals: Tensor, rounding: float) -> float:
    """max(rounding level, 2·|most negative eigenvalue|) of a matrix that is PSD in exact arithmetic."""
    most_negative = -min(evals.min().item(), 0.0) if evals.numel() else 0.0
    return max(rounding, 2.0 * most_negative)


def _eigh_descending(A: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(A)
    return evals.flip(0), evecs.flip(1)


def _fix_signs(C: Tensor, C_pinv: Tensor) -> tuple[Tensor, Tensor]:
    """Sign convention: each row of C has its largest-magnitude entry positive (C⁺'s columns follow)."""
    if C.shape[0] == 0:
        return C, C_pinv
    idx = C.abs().argmax(dim=1)
    signs = torch.sign(C.gather(1, idx[:, None]).squeeze(1))
    signs[signs == 0] = 1.0
    return C * signs[:, None], C_pinv * signs[None, :]


def _symmetric64(A: Tensor, name: str) -> Tensor:
    if not isinstance(A, Tensor) or A.ndim != 2 or A.shape[0] != A.shape[1]:
        shape = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise BadInputError(f"{name} must be a square [d, d] tensor, got {shape}")
    A = A.detach().to(torch.float64)
    if not torch.isfinite(A).all():
        raise NonFiniteError(f"{name} contains NaN or inf; check the statistics it came from")
    # Statistics built from float32 products are symmetric to ~1e-7 relative; a matrix further from
    # symmetric than 1e-4 is not a Gram matrix (e.g. a Jacobian passed by mistake).
    norm = torch.linalg.matrix_norm(A).item()
    if torch.linalg.matrix_norm(A - A.T).item() > 1e-4 * norm:
        raise BadInputError(f"{name} is not symmetric; pass a Gram matrix (1/N) Σ x xᵀ")
    return (A + A.T) / 2


def _mean64(mean: Tensor | None, d: int, device: torch.device) -> Tensor:
    if mean is None:
        return torch.zeros(d, dtype=torch.float64, device=device)
    if not isinstance(mean, Tensor) or mean.shape != (d,):
        shape = tuple(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
        raise BadInputError(f"mean must be a [d] = [{d}] tensor, got {shape}")
    mu = mean.detach().to(device=device, dtype=torch.float64)
    if not torch.isfinite(mu).all():
        raise NonFiniteError("mean contains NaN or inf; check the statistics it came from")
    return mu


def _check_tolerances(rtol: float, atol: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise BadInputError(f"{name} must be a finite number >= 0, got {value!r}")


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float64


def _paths(path: str | Path) -> tuple[Path, Path]:
    t_path = tensor_path(path)
    return t_path, t_path.with_suffix(".json")
