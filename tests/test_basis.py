"""Tests of the interaction basis (paper §6, Appendix A; SPEC §3) and its PCA baseline.

Tolerances: everything is float64 on matrices of size ≤ 16 whose condition numbers (and inverse eigen-gaps
of Λ) stay below ~1e4 for the seeds used, so round-off is at most ~1e-16 · 1e4 · small factors ≈ 1e-11
relative; the checks use 1e-9 relative unless a comment says otherwise.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.analysis.basis import InteractionBasis, interaction_bases, interaction_basis, pca_basis
from tl_degeneracy.errors import BadInputError, NonFiniteError

F64 = torch.float64
RTOL = 1e-9  # see the module docstring


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, scale: float | None = None) -> None:
    """max|actual − expected| <= rtol · scale; scale defaults to the largest |entry| of ``expected``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
        assert scale > 0, "give the scale explicitly when comparing with zero"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:.1g} x {scale:.3g}"


def _row_signs(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The diagonal S of ±1 with X ≈ S Y (per row), read from the sign of each row's inner product."""
    s = torch.sign((X * Y).sum(dim=1))
    assert (s != 0).all()
    return s


def _factor(d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A d×r matrix of rank r with singular values in [0.5, 2] (so B Bᵀ has condition number <= 16)."""
    U, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    return U @ torch.diag(0.5 + 1.5 * torch.rand(r, generator=gen, dtype=F64)) @ V


def _low_rank_data(n: int, d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """n activations in R^d that span an r-dimensional affine subspace (off the origin)."""
    Z = torch.randn(n, r, generator=gen, dtype=F64)
    B = _factor(d, r, gen)
    mu = torch.randn(d, generator=gen, dtype=F64)
    return Z @ B.T + mu


def _centred_gram(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = A.mean(0)
    X = A - mu
    return X.T @ X / A.shape[0], mu


def _jacobians(n: int, o: int, d: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """n Jacobians J_t [o, d] whose rows span an r-dimensional subspace of R^d."""
    E = torch.randn(n, o, r, generator=gen, dtype=F64)
    H = _factor(d, r, gen)
    return E @ H.T


# (a) f̂ coordinates ------------------------------------------------------------------------------------

RANKS = [(12, 12), (5, 12), (12, 4), (5, 3), (7, 9)]  # (rank of the activations, rank of the Jacobians)


@pytest.mark.parametrize(("r_G", "r_M"), RANKS)
def test_fhat_covariance_is_diag_lambda_and_jacobian_gram_is_identity(r_G: int, r_M: int) -> None:
    gen = _gen(100 * r_G + r_M)
    n, d, o = 300, 12, 6
    A = _low_rank_data(n, d, r_G, gen)
    J = _jacobians(n, o, d, r_M, gen)
    G, mu = _centred_gram(A)
    M = torch.einsum("nod,noe->de", J, J) / n
    ib = interaction_basis(G, M, mean=mu)

    assert ib.rank_G == r_G
    assert ib.dim == min(r_G, r_M)  # generic position: rank of G^{1/2} M G^{1/2}
    F = ib.transform(A)
    _close(F.T @ F / n, torch.diag(ib.lambdas))  # activation covariance in f̂ = diag(Λ₂)
    _close(F.mean(0), torch.zeros(ib.dim, dtype=F64), scale=ib.lambdas[0].sqrt().item())
    # a − μ = C⁺ f̂ on the data, so ∂o/∂f̂ = J C⁺ and its Gram is C⁺ᵀ M C⁺ = I
    JC = J @ ib.C_pinv
    _close(torch.einsum("nok,nol->kl", JC, JC) / n, torch.eye(ib.dim, dtype=F64))
    _close(ib.C @ ib.C_pinv, torch.eye(ib.dim, dtype=F64))
    assert (ib.lambdas[:-1] >= ib.lambdas[1:]).all()


@pytest.mark.parametrize(("r_G", "r_M"), RANKS)
def test_lambdas_are_the_nonzero_eigenvalues_of_G_times_M(r_G: int, r_M: int) -> None:
    """Dense reference: Λ₂ are the non-zero eigenvalues of the (non-symmetric) matrix G M, whose right
    eigenvectors are the columns of C⁺."""
    gen = _gen(7 + r_G * r_M)
    d = 12
    B, H = _factor(d, r_G, gen), _factor(d, r_M, gen)
    G, M = B @ B.T, H @ H.T
    ib = interaction_basis(G, M)

    reference = torch.linalg.eigvals(G @ M)
    assert reference.imag.abs().max() <= 1e-9 * reference.abs().max()
    reference = reference.real.sort(descending=True).values
    k = min(r_G, r_M)
    assert ib.dim == k
    _close(ib.lambdas, reference[:k])
    _close(reference[k:], torch.zeros(d - k, dtype=F64), scale=reference[0].item())
    _close(G @ M @ ib.C_pinv, ib.C_pinv * ib.lambdas)


# (b) invariance under a → R a (§6.2) -----------------------------------------------------------------


@pytest.mark.parametrize("r_G", [10, 6])
def test_interaction_basis_is_invariant_under_invertible_reparameterisation(r_G: int) -> None:
    gen = _gen(31 + r_G)
    n, d, o = 200, 10, 5
    A = _low_rank_data(n, d, r_G, gen)
    J = _jacobians(n, o, d, 8, gen)
    G, mu = _centred_gram(A)
    M = torch.einsum("nod,noe->de", J, J) / n
    R = _factor(d, d, gen)  # invertible, condition number <= 4
    R_inv = torch.linalg.inv(R)

    ib = interaction_basis(G, M, mean=mu)
    ib_R = interaction_basis(R @ G @ R.T, R_inv.T @ M @ R_inv, mean=R @ mu)

    assert ib_R.rank_G == ib.rank_G == r_G
    assert ib_R.dim == ib.dim == min(r_G, 8)
    _close(ib_R.lambdas, ib.lambdas)
    # Λ distinct (the condition of §6.2), so each row is determined up to its sign
    gaps = (ib.lambdas[:-1] - ib.lambdas[1:]) / ib.lambdas[0]
    assert gaps.min() > 1e-4
    S = _row_signs(ib_R.C @ R @ G, ib.C @ G)
    _close(ib_R.C @ R @ G, S[:, None] * (ib.C @ G))  # C_R R G = S C G, even when G is rank-deficient
    _close(ib_R.transform(A @ R.T), ib.transform(A) * S)  # same f̂ for every data point (up to S)
    if r_G == d:
        _close(ib_R.C @ R, S[:, None] * ib.C)


# (c) deep linear network (Appendix A) ----------------------------------------------------------------


def test_deep_linear_network_fhat_equals_output_pca_at_every_layer() -> None:
    """y = W_4 W_3 W_2 W_1 x with a width-3 bottleneck, metric I, exact G and M at every layer."""
    gen = _gen(5)
    widths = [6, 8, 3, 7, 5]
    Ws = [
        torch.randn(w_out, w_in, generator=gen, dtype=F64) / w_in**0.5
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
    ]
    L = torch.randn(widths[0], widths[0], generator=gen, dtype=F64)
    Sigma = L @ L.T + 0.1 * torch.eye(widths[0], dtype=F64)  # full-rank input covariance

    def prod(mats: list[torch.Tensor], size: int) -> torch.Tensor:
        out = torch.eye(size, dtype=F64)
        for W in mats:
            out = W @ out
        return out

    to_layer = [prod(Ws[:i], widths[0]) for i in range(len(widths))]  # a_l = A_l x
    to_output = [prod(Ws[i:], widths[i]) for i in range(len(widths))]  # y = B_l a_l
    bases = [
        interaction_basis(A_l @ Sigma @ A_l.T, B_l.T @ B_l)  # G_l, M_l = B_lᵀ B_l (metric I)
        for A_l, B_l in zip(to_layer, to_output, strict=True)
    ]
    pca_y = pca_basis(to_layer[-1] @ Sigma @ to_layer[-1].T)

    assert pca_y.dim == 3
    assert [ib.dim for ib in bases] == [3] * len(widths)
    assert [ib.rank_G for ib in bases] == [6, 6, 3, 3, 3]
    for ib, A_l in zip(bases, to_layer, strict=True):
        _close(ib.lambdas, pca_y.lambdas)  # Λ is the same at every layer: the PCA variances of y
        fhat_of_x = ib.C @ A_l  # f̂_l as a linear function of the input
        pca_of_x = pca_y.C @ to_layer[-1]
        S = _row_signs(fhat_of_x, pca_of_x)
        _close(fhat_of_x, S[:, None] * pca_of_x)
    # at the output M = I, so the interaction basis is the PCA basis, sign convention included
    _close(bases[-1].C, pca_y.C)
    for i in range(len(widths) - 1):
        step = bases[i + 1].C @ Ws[i] @ bases[i].C_pinv  # f̂_{i+1} as a function of f̂_i
        S = torch.sign(torch.diagonal(step))
        _close(step, torch.diag(S))  # ± identity


# (d) rank drops -------------------------------------------------------------------------------------


def _gram_from_float32_batches(A: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """As SPEC §1 collects it: float32 products per batch, float64 running totals, G = S/n − μμᵀ."""
    d = A.shape[1]
    S, s = torch.zeros(d, d, dtype=F64), torch.zeros(d, dtype=F64)
    for X in A.to(torch.float32).split(batch):
        S += (X.T @ X).to(F64)
        s += X.sum(0).to(F64)
    mu = s / A.shape[0]
    return S / A.shape[0] - torch.outer(mu, mu), mu


@pytest.mark.parametrize("r", [1, 3, 7, 10])
@pytest.mark.parametrize("float32_statistics", [False, True])
def test_planted_rank_drop_gives_rank_G_equal_to_the_span(r: int, float32_statistics: bool) -> None:
    gen = _gen(r)
    n, d = 512, 10
    A = _low_rank_data(n, d, r, gen)
    G, mu = _gram_from_float32_batches(A) if float32_statistics else _centred_gram(A)
    H = _factor(d, d, gen)
    ib_full = interaction_basis(G, H @ H.T, mean=mu)
    ib_rank2 = interaction_basis(G, H[:, :2] @ H[:, :2].T, mean=mu)

    assert ib_full.rank_G == r and ib_full.dim == r
    assert ib_rank2.rank_G == r and ib_rank2.dim == min(r, 2)
    assert pca_basis(G, mean=mu).dim == r


# degenerate sites -----------------------------------------------------------------------------------


def _constant_site_stats(float32_statistics: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _gen(3)
    c = 5.0 * torch.randn(16, generator=gen, dtype=F64)
    A = c.expand(1000, 16).clone()
    return _gram_from_float32_batches(A) if float32_statistics else _centred_gram(A)


@pytest.mark.parametrize("site", ["zero", "constant_float64", "constant_float32_statistics", "output_ignores_site"])
def test_degenerate_site_gives_dim_0_with_a_warning_and_no_nan(site: str) -> None:
    d = 16
    M = torch.eye(d, dtype=F64)
    if site == "zero":
        G, mu = torch.zeros(d, d, dtype=F64), torch.zeros(d, dtype=F64)
    elif site == "output_ignores_site":
        G, mu = torch.eye(d, dtype=F64), torch.ones(d, dtype=F64)
        M = torch.zeros(d, d, dtype=F64)
    else:
        G, mu = _constant_site_stats(float32_statistics=site.endswith("float32_statistics"))

    with pytest.warns(UserWarning, match="dim 0"):
        ib = interaction_basis(G, M, mean=mu)
    bases = [ib]
    if site != "output_ignores_site":
        with pytest.warns(UserWarning, match="dim 0"):
            bases.append(pca_basis(G, mean=mu))
    for b in bases:
        assert b.dim == 0 and b.C.shape == (0, d) and b.C_pinv.shape == (d, 0)
        for name in ("C", "C_pinv", "lambdas", "all_lambdas", "gram_eigenvalues", "mean"):
            assert torch.isfinite(getattr(b, name)).all(), name
        acts = torch.randn(3, 4, d)
        assert b.transform(acts).shape == (3, 4, 0)
        _close(b.inverse_transform(torch.zeros(3, 0)), mu.expand(3, d).to(torch.float32), rtol=1e-6, scale=1.0)
        eps, dims = b.dim_curve()
        assert (dims == 0).all() and torch.isfinite(eps).all()
    if site != "output_ignores_site":
        assert ib.rank_G == 0


# tolerances ------------------------------------------------------------------------------------------


def test_atol_and_rtol_cut_lambda_at_their_thresholds() -> None:
    spectrum = torch.tensor([10.0, 1.0, 0.1, 1e-3, 1e-9], dtype=F64)
    G, M = torch.eye(5, dtype=F64), torch.diag(spectrum)  # Λ = spectrum (G whitened already)
    assert interaction_basis(G, M).dim == 4  # default rtol 1e-6: 1e-9 < 1e-5
    ib = interaction_basis(G, M, atol=0.05)
    assert ib.dim == 3 and ib.lambda_tol == 0.05
    ib = interaction_basis(G, M, rtol=0.05)
    assert ib.dim == 2 and ib.lambda_tol == pytest.approx(0.5)
    ib = interaction_basis(G, M, rtol=0.0, atol=0.0)
    assert ib.dim == 5
    _close(ib.lambdas, spectrum)


def test_rtol_on_the_gram_drops_small_variance_directions() -> None:
    G = torch.diag(torch.tensor([1.0, 0.5, 1e-8, 1e-3], dtype=F64))
    M = torch.eye(4, dtype=F64)
    assert interaction_basis(G, M).rank_G == 3
    assert interaction_basis(G, M, rtol=1e-2).rank_G == 2
    assert interaction_basis(G, M, rtol=0.0).rank_G == 4


@pytest.mark.parametrize("c", [1e-4, 1e3])
def test_absolute_tolerance_does_not_depend_on_the_scale_of_the_activations(c: float) -> None:
    """a → c a maps G → c² G and M → M / c²; Λ and the kept dimension at any atol stay the same."""
    gen = _gen(11)
    B = _factor(8, 8, gen)
    H = _factor(8, 8, gen)
    G, M = B @ B.T, H @ H.T
    ib = interaction_basis(G, M, rtol=0.0)
    atol = (ib.lambdas[3] * ib.lambdas[4]).sqrt().item()  # cut between the 4th and 5th eigenvalue
    ib_c = interaction_basis(c**2 * G, M / c**2, rtol=0.0, atol=atol)
    _close(ib_c.lambdas, ib.lambdas[:4])
    assert ib_c.dim == interaction_basis(G, M, rtol=0.0, atol=atol).dim == 4


def test_dim_curve_is_non_increasing_and_matches_recomputed_bases() -> None:
    gen = _gen(21)
    B = _factor(10, 7, gen) * torch.logspace(0, -1.5, 7, dtype=F64)  # Λ spread over ~4 decades
    H = _factor(10, 10, gen)
    ib = interaction_basis(B @ B.T, H @ H.T)
    eps, dims = ib.dim_curve()

    assert (eps[1:] > eps[:-1]).all()  # ascending grid
    assert (dims[1:] <= dims[:-1]).all()  # fewer directions survive a larger noise scale
    assert dims[-1] == 0 and eps[-1] == ib.all_lambdas[0]
    assert dims[0] == 7 and eps[0] >= ib.lambda_floor
    for e in eps[::8].tolist():
        assert ib.dim_at(e) == interaction_basis(B @ B.T, H @ H.T, rtol=0.0, atol=e).dim
    assert ib.dim == ib.dim_at(ib.lambda_tol)
    custom = torch.tensor([1e-30, 1e300], dtype=F64)
    assert ib.dim_curve(custom)[1].tolist() == [7, 0]
    # rank-4 M: M̃ has 3 eigenvalues at rounding level, which no ε below the noise floor may count
    ib4 = interaction_basis(B @ B.T, H[:, :4] @ H[:, :4].T, rtol=0.0)
    assert ib4.all_lambdas.shape == (7,) and ib4.all_lambdas[4:].abs().max() < 1e-12
    assert ib4.dim == ib4.dim_at(0.0) == ib4.dim_at(-1.0) == ib4.dim_curve()[1][0] == 4


def test_invalid_inputs_raise_typed_errors() -> None:
    G, M = torch.eye(3, dtype=F64), torch.eye(3, dtype=F64)
    with pytest.raises(BadInputError, match="rtol"):
        interaction_basis(G, M, rtol=-1.0)
    with pytest.raises(BadInputError, match="atol"):
        interaction_basis(G, M, atol=float("nan"))
    with pytest.raises(BadInputError, match="scaling"):
        interaction_basis(G, M, scaling="sqrt")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="symmetric"):
        interaction_basis(torch.triu(torch.ones(3, 3, dtype=F64)), M)
    with pytest.raises(BadInputError, match="both must be"):
        interaction_basis(G, torch.eye(4, dtype=F64))
    with pytest.raises(BadInputError, match="mean"):
        interaction_basis(G, M, mean=torch.zeros(4))
    with pytest.raises(NonFiniteError):
        interaction_basis(G, M * float("nan"))
    with pytest.raises(BadInputError, match="last dimension"):
        interaction_basis(G, M).transform(torch.zeros(2, 4))


# scalings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scaling", "cov_power", "jac_power"),
    [("sqrt_lambda", 1, 0), ("inv_sqrt_lambda", -1, 2), ("whitened", 0, 1)],
)
def test_scaling_variants_satisfy_their_defining_identities(scaling: str, cov_power: int, jac_power: int) -> None:
    """C G Cᵀ = diag(Λ₂)^cov_power and C⁺ᵀ M C⁺ = diag(Λ₂)^jac_power; rows are rescaled sqrt_lambda rows."""
    gen = _gen(41)
    B = _factor(9, 6, gen)
    H = _factor(9, 5, gen)
    G, M = B @ B.T, H @ H.T
    ib = interaction_basis(G, M, scaling=scaling)  # type: ignore[arg-type]
    reference = interaction_basis(G, M)

    assert ib.scaling == scaling and ib.dim == 5
    lam = ib.lambdas
    _close(ib.C @ G @ ib.C.T, torch.diag(lam**cov_power))
    _close(ib.C_pinv.T @ M @ ib.C_pinv, torch.diag(lam**jac_power))
    _close(ib.C @ ib.C_pinv, torch.eye(5, dtype=F64))
    _close(ib.C, (lam ** ((cov_power - 1) / 2))[:, None] * reference.C)  # same rows, signs included


def test_inv_sqrt_lambda_is_the_section_6_formula() -> None:
    """f̂ = (D_M^{1/2})⁺ V (D_G^{1/2})⁺ U f, written out with explicit pseudo-inverses (full-rank G)."""
    gen = _gen(43)
    B = _factor(6, 6, gen)
    H = _factor(6, 6, gen)
    G, M = B @ B.T, H @ H.T
    D_G, Q = torch.linalg.eigh(G)
    U = Q.T
    whiten = torch.linalg.pinv(torch.diag(D_G.sqrt())) @ U
    M_white = torch.linalg.pinv(whiten).T @ M @ torch.linalg.pinv(whiten)  # M in whitened coordinates
    D_M, P = torch.linalg.eigh(M_white)
    order = D_M.argsort(descending=True)
    D_M, V = D_M[order], P[:, order].T
    reference = torch.linalg.pinv(torch.diag(D_M.sqrt())) @ V @ whiten

    ib = interaction_basis(G, M, scaling="inv_sqrt_lambda")
    S = _row_signs(ib.C, reference)
    _close(ib.C, S[:, None] * reference)
    _close(ib.lambdas, D_M)


# transform, sign convention, PCA ---------------------------------------------------------------------


def test_transform_keeps_dtype_and_batch_shape_and_inverts_on_the_data() -> None:
    gen = _gen(51)
    A = _low_rank_data(100, 8, 5, gen)
    G, mu = _centred_gram(A)
    H = _factor(8, 8, gen)
    ib = interaction_basis(G, H @ H.T, mean=mu)
    assert ib.dim == ib.rank_G == 5

    acts32 = A.to(torch.float32).reshape(4, 25, 8)
    f32 = ib.transform(acts32)
    assert f32.dtype == torch.float32 and f32.shape == (4, 25, 5)
    f64 = ib.transform(A)
    assert f64.dtype == F64
    _close(f32.reshape(100, 5).to(F64), f64, rtol=1e-5)  # float32 output rounding (and input rounding)
    assert ib.transform(torch.zeros(2, 8, dtype=torch.int64)).dtype == F64
    _close(ib.inverse_transform(f64), A)  # A lies in μ + span(C⁺) since dim == rank_G
    assert ib.inverse_transform(f32).dtype == torch.float32


def test_sign_convention_is_deterministic_and_makes_each_rows_largest_entry_positive() -> None:
    gen = _gen(61)
    B = _factor(7, 7, gen)
    H = _factor(7, 7, gen)
    G, M = B @ B.T, H @ H.T
    for ib in (interaction_basis(G, M), pca_basis(G)):
        rows = torch.arange(ib.dim)
        assert (ib.C[rows, ib.C.abs().argmax(dim=1)] > 0).all()
    assert torch.equal(interaction_basis(G, M).C, interaction_basis(G.clone(), M.clone()).C)


def test_pca_basis_is_the_orthonormal_eigenbasis_of_G() -> None:
    gen = _gen(71)
    A = _low_rank_data(200, 9, 6, gen)
    G, mu = _centred_gram(A)
    pb = pca_basis(G, mean=mu)
    assert pb.kind == "pca" and pb.dim == pb.rank_G == 6
    _close(pb.C @ pb.C.T, torch.eye(6, dtype=F64))
    _close(pb.C @ G @ pb.C.T, torch.diag(pb.lambdas))
    _close(pb.lambdas, torch.linalg.eigvalsh(G).flip(0)[:6])
    F = pb.transform(A)
    _close(F.T @ F / 200, torch.diag(pb.lambdas))
    assert pca_basis(G, mean=mu, atol=pb.lambdas[2].item()).dim == 2
    eps, dims = pb.dim_curve()
    assert dims[0] == 6 and dims[-1] == 0 and (dims[1:] <= dims[:-1]).all()


# save / load -----------------------------------------------------------------------------------------


def _assert_identical(a: InteractionBasis, b: InteractionBasis) -> None:
    for name in ("C", "C_pinv", "lambdas", "all_lambdas", "gram_eigenvalues", "mean"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == F64 and torch.equal(x, y), name
    for name in ("kind", "scaling", "rank_G", "rtol", "atol", "gram_tol", "lambda_tol", "lambda_floor"):
        assert getattr(a, name) == getattr(b, name), name


def test_save_load_round_trip_is_bit_for_bit(tmp_path) -> None:
    gen = _gen(81)
    A = _low_rank_data(100, 8, 5, gen)
    G, mu = _centred_gram(A)
    H = _factor(8, 3, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty basis warns
        empty = interaction_basis(torch.zeros(8, 8, dtype=F64), H @ H.T)
    originals = {
        "ib": interaction_basis(G, H @ H.T, mean=mu, rtol=1e-9, atol=1e-12, scaling="whitened"),
        "pca.safetensors": pca_basis(G, mean=mu),
        "sub/empty": empty,
    }
    for name, ib in originals.items():
        path = ib.save(tmp_path / name)
        assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
        loaded = InteractionBasis.load(tmp_path / name)
        _assert_identical(ib, loaded)
        assert torch.equal(loaded.transform(A), ib.transform(A))
    (tmp_path / "ib.json").write_text('{"format": "something else"}')
    with pytest.raises(BadInputError, match="not an InteractionBasis"):
        InteractionBasis.load(tmp_path / "ib")
    with pytest.raises(BadInputError, match="expected"):
        InteractionBasis.load(tmp_path / "missing")


# interaction_bases over a statistics object ----------------------------------------------------------


def _stats(data: dict[str, torch.Tensor], jacobians: dict[str, torch.Tensor]) -> tld.Stats:
    """A real tl_degeneracy.Stats holding the totals (SPEC §1–2) of the given activations [n, d] and
    Jacobians [n, o, d] (metric I)."""
    tensors: dict[str, torch.Tensor] = {}
    for site, A in data.items():
        tensors[f"act/{site}/n"] = torch.tensor(A.shape[0])
        tensors[f"act/{site}/sum"] = A.sum(0)
        tensors[f"act/{site}/outer"] = A.T @ A
    for site, J in jacobians.items():
        tensors[f"jac/{site}/n"] = torch.tensor(J.shape[0])
        tensors[f"jac/{site}/outer"] = torch.einsum("nod,noe->de", J, J)
    return tld.Stats(tensors, {"sites": list(data)})


def test_interaction_bases_reads_gram_mean_and_jacobian_gram_per_site() -> None:
    gen = _gen(91)
    data = {"a": _low_rank_data(150, 6, 4, gen), "b": _low_rank_data(150, 9, 9, gen)}
    jac = {"a": _jacobians(150, 3, 6, 6, gen), "b": _jacobians(150, 3, 9, 5, gen)}
    stats = _stats(data, jac)

    bases = interaction_bases(stats)
    assert list(bases) == ["a", "b"]
    for site, ib in bases.items():
        expected = interaction_basis(stats.gram(site), stats.jacobian_gram(site), mean=stats.mean(site))
        assert torch.equal(ib.C, expected.C) and torch.equal(ib.mean, stats.mean(site))
    assert (bases["a"].rank_G, bases["a"].dim) == (4, 4)
    assert (bases["b"].rank_G, bases["b"].dim) == (9, 5)

    uncentred = interaction_bases(stats, center=False, sites=["a"], scaling="whitened")
    assert list(uncentred) == ["a"]
    assert uncentred["a"].rank_G == 5  # the mean adds one direction
    assert torch.equal(uncentred["a"].mean, torch.zeros(6, dtype=F64))


def test_interaction_bases_without_jacobian_statistics_says_how_to_collect_them() -> None:
    gen = _gen(93)
    stats = _stats({"a": _low_rank_data(50, 4, 4, gen)}, {})
    with pytest.raises(BadInputError, match='jacobian="kl"'):
        interaction_bases(stats)
    with pytest.raises(BadInputError, match="not in these statistics"):
        interaction_bases(stats, sites=["nope"])


def test_interaction_bases_names_the_site_in_warnings() -> None:
    site = "blocks.0.hook_resid_pre"
    stats = _stats({site: torch.ones(20, 4, dtype=F64)}, {site: torch.ones(20, 2, 4, dtype=F64)})
    with pytest.warns(UserWarning, match=r"^blocks\.0\.hook_resid_pre: .*dim 0"):
        bases = interaction_bases(stats)
    assert bases["blocks.0.hook_resid_pre"].dim == 0


def test_package_exports_the_basis_api() -> None:
    assert tld.interaction_basis is interaction_basis and tld.interaction_bases is interaction_bases
    assert tld.pca_basis is pca_basis and tld.InteractionBasis is InteractionBasis


def test_identity_basis_is_the_sites_own_coordinates():
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    b = tld.identity_basis(3, mean=mean)
    a = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(b.transform(a), a - mean, rtol=0, atol=0)  # f̂ = a − μ, exactly
    torch.testing.assert_close(b.inverse_transform(b.transform(a)), a, rtol=0, atol=1e-15)
    assert (b.kind, b.dim, b.rank_G) == ("identity", 3, 3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(tld.BadInputError, match="dim must be"):
            tld.identity_basis(bad)
    with pytest.raises(tld.BadInputError, match="mean must be"):
        tld.identity_basis(3, mean=torch.zeros(2))
