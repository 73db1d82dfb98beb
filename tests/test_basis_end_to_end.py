"""Interaction bases for every residual and MLP site of a tiny model, from `collect` statistics with Jacobians.

The tiny model (d_model = 32, d_mlp = 64, LayerNorm) has degeneracies we can predict from its architecture:

- every path from the residual stream to the logits goes through a LayerNorm, which subtracts the mean over
  coordinates, so adding c·1 to a residual activation changes no logit: M 1 = 0 at every residual site, and
  the interaction basis has d_model − 1 directions although the activations span all d_model;
- ``mlp.hook_pre = W_in LN(resid_mid) + b_in``, and a LayerNorm output lies in a (d_model − 1)-dimensional
  affine subspace, so the 64-dimensional MLP pre-activations span d_model − 1 = 31 dimensions (rank_G);
- the output depends on ``mlp.hook_post`` only through ``W_out`` into the residual stream, so there too the
  interaction basis has d_model − 1 directions, while the 64 post-activations span all 64.
"""

from __future__ import annotations

import pytest
import torch
from tiny import TINY, make_tiny_model, random_tokens

import tl_degeneracy as tld

D_MODEL, D_MLP = TINY["d_model"], TINY["d_mlp"]
KINDS = ["resid_pre", "resid_mid", "resid_post", "mlp_pre", "mlp_post"]


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model()
    tokens = random_tokens(6, 16, seed=1)  # 6 × 15 = 90 counted tokens (BOS excluded) > d_mlp + 1
    data = tld.token_batches(model, tokens, batch_size=3)
    sites = tld.resolve_sites(model, KINDS)
    stats = {
        metric: tld.collect(model, data, sites=sites, jacobian=metric, n_probes=4, progress=False)
        for metric in ("kl", "mse")
    }
    return model, tokens, sites, stats


def _kind(site: str) -> str:
    return "mlp_pre" if site.endswith("mlp.hook_pre") else "mlp_post" if site.endswith("mlp.hook_post") else "resid"


@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_every_residual_and_mlp_site_gets_a_basis_with_the_fhat_identities(setup, metric: str) -> None:
    _, _, sites, all_stats = setup
    stats = all_stats[metric]
    bases = tld.interaction_bases(stats)
    assert list(bases) == sites and len(sites) == 2 * len(KINDS)
    for site, ib in bases.items():
        G, M = stats.gram(site), stats.jacobian_gram(site)
        for name in ("C", "C_pinv", "lambdas", "all_lambdas", "gram_eigenvalues", "mean"):
            assert torch.isfinite(getattr(ib, name)).all(), (site, name)
        assert 0 < ib.dim <= ib.rank_G <= ib.input_dim, site
        # algebraic identities on the collected float64 G and M; the whitening divides by √D down to
        # rtol·D_max = 1e-6·D_max, so round-off can grow to ~1e-16 · 1e6 · d: 1e-8 relative leaves margin
        k = ib.dim
        cov = ib.C @ G @ ib.C.T
        jac = ib.C_pinv.T @ M @ ib.C_pinv
        assert torch.allclose(cov, torch.diag(ib.lambdas), rtol=0, atol=1e-8 * ib.lambdas[0].item()), site
        assert torch.allclose(jac, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-8), site
        assert torch.allclose(ib.C @ ib.C_pinv, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-8), site
        eps, dims = ib.dim_curve()
        assert (dims[1:] <= dims[:-1]).all() and dims[-1] == 0 and dims[0] >= ib.dim


@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_layernorm_makes_the_all_ones_residual_direction_degenerate(setup, metric: str) -> None:
    _, _, sites, all_stats = setup
    stats = all_stats[metric]
    bases = tld.interaction_bases(stats)
    ones = torch.ones(D_MODEL, dtype=torch.float64)
    for site in sites:
        ib, kind = bases[site], _kind(site)
        if kind == "resid":
            assert ib.rank_G == D_MODEL and tld.pca_basis(stats.gram(site)).dim == D_MODEL, site
            assert ib.dim == D_MODEL - 1, site
            # f̂ ignores a shift along 1. M 1 = 0 holds to the float32 rounding of the gradients (~1e-7
            # relative), and C = C⁺ᵀ M when G has full rank, so C 1 is ~1e-7 of C: 1e-5 leaves margin
            assert (ib.C @ ones).abs().max() <= 1e-5 * ib.C.abs().max(), site
        elif kind == "mlp_post":
            assert ib.rank_G == D_MLP and ib.dim == D_MODEL - 1, site


def test_mlp_preactivations_span_d_model_minus_one_dimensions(setup) -> None:
    _, _, sites, all_stats = setup
    stats = all_stats["kl"]
    for site in (s for s in sites if _kind(s) == "mlp_pre"):
        ib = tld.interaction_bases(stats, sites=[site])[site]
        assert ib.input_dim == D_MLP and ib.rank_G == D_MODEL - 1, site
        assert tld.pca_basis(stats.gram(site), mean=stats.mean(site)).dim == D_MODEL - 1, site


def test_transform_of_the_models_own_activations_has_covariance_diag_lambda(setup) -> None:
    """The mean and Gram from `collect` and the basis agree with the activations the model produces."""
    model, tokens, _, all_stats = setup
    stats = all_stats["kl"]
    site = "blocks.1.hook_resid_mid"
    ib = tld.interaction_bases(stats, sites=[site])[site]
    _, cache = model.run_with_cache(tokens, names_filter=[site])
    acts = cache[site][:, 1:].reshape(-1, D_MODEL).double()  # counted tokens: every position but BOS
    f = ib.transform(acts)
    assert f.shape == (stats.count(site), ib.dim)
    cov = f.T @ f / f.shape[0]
    # activations are float32 (relative rounding ~1e-7) and collect's products too: 1e-5 of Λ_max
    assert torch.allclose(cov, torch.diag(ib.lambdas), rtol=0, atol=1e-5 * ib.lambdas[0].item())
    assert f.mean(0).abs().max() <= 1e-5 * ib.lambdas[0].sqrt()
