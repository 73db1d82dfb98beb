"""The interaction graph (issue 19): local interaction basis, edges between consecutive sites, modules.

References are slow and obvious: a float64 model, ``torch.func.jacrev`` of the hooked map a → b (or of the
definition's F(α)) over the whole batch, explicit sums over positions, numpy's Gauss–Legendre nodes.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from tiny import TINY, TL_MAJOR, make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.collection.lib import local_jacobian_gram

pytestmark = pytest.mark.tl3

ATTN = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid")  # across attention: cross-position terms
MLP = ("blocks.0.mlp.hook_pre", "blocks.0.hook_resid_post")  # across the MLP's nonlinearity and W_out
LOGITS = ("blocks.1.hook_resid_post", "unembed.hook_out")  # into the logits, through ln_final (nonlinear)
CHAIN = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post"]


def _data(model, rows=3, seq=6, seed=0):
    tokens = random_tokens(rows, seq, seed=seed)
    mask = torch.ones(rows, seq, dtype=torch.bool)
    mask[0, -2:] = False  # right padding: positions that neither count nor move
    return tld.token_batches(model, tokens, batch_size=2, attention_mask=mask)


def _model64(**kw):
    return make_tiny_model(**kw).to(torch.float64)


def _random_basis(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(k, d, generator=g, dtype=torch.float64) / d**0.5
    return types.SimpleNamespace(C=C, C_pinv=torch.linalg.pinv(C), mean=torch.randn(d, generator=g,
                                 dtype=torch.float64) * 0.1, lambdas=torch.ones(k, dtype=torch.float64), kind="test")


def _b_of_a(model, tokens, site_a, site_b):
    """The map (whole activation tensor at A) → activation at B, through plain model hooks (reference)."""
    def fn(a_new):
        box = {}

        def put(act, hook):
            return a_new

        def grab(act, hook):
            box["b"] = act

        with model.hooks(fwd_hooks=[(site_a, put), (site_b, grab)]):
            model(tokens)
        return box["b"]

    return fn


def _act(model, tokens, site):
    box = {}
    with model.hooks(fwd_hooks=[(site, lambda act, hook: box.__setitem__("a", act.detach()))]):
        model(tokens)
    return box["a"]


def _reference_M(model, data, site_a, site_b, C_B):
    """(1/N) Σ_b Σ_t Σ_t' J(t',t)ᵀ C_Bᵀ C_B J(t',t) over counted t, t', with a full jacrev per batch."""
    M, N = 0.0, 0
    for batch in data:
        a = _act(model, batch.tokens, site_a)
        J = torch.func.jacrev(_b_of_a(model, batch.tokens, site_a, site_b))(a)  # [B,T,dB,B,T,dA]
        for s in range(a.shape[0]):
            for t in batch.mask[s].nonzero().flatten().tolist():
                for tp in batch.mask[s].nonzero().flatten().tolist():
                    CJ = C_B @ J[s, tp, :, s, t, :]
                    M = M + CJ.T @ CJ
        N += int(batch.mask.sum())
    return M / N


def _reference_edges(model, data, site_a, site_b, ba, bb, alphas, weights):
    """The definition: E[i,j] = (1/N) Σ_seq Σ_t_out (Σ_t_in f̂_i ∫ ∂F_j/∂f̂_i dα)², jacrev of F over x = α f̂."""
    E, N = 0.0, 0
    for batch in data:
        a0 = _act(model, batch.tokens, site_a)
        m = batch.mask[:, :, None]
        f = ((a0 - ba.mean) @ ba.C.T) * m
        r = a0 - ba.mean - f @ ba.C_pinv.T
        fwd = _b_of_a(model, batch.tokens, site_a, site_b)

        def F(x, m=m, r=r, a0=a0, fwd=fwd):
            a = torch.where(m, ba.mean + r + x @ ba.C_pinv.T, a0)
            return (fwd(a) - bb.mean) @ bb.C.T

        integral = sum(w * torch.func.jacrev(F)(al * f) for al, w in zip(alphas, weights, strict=True))
        for s in range(a0.shape[0]):
            for t_out in batch.mask[s].nonzero().flatten().tolist():
                inner = (integral[s, t_out, :, s, :, :] * f[s][None]).sum(1)  # [k_B, k_A], Σ over t_in
                E = E + inner.T ** 2
        N += int(batch.mask.sum())
    return E / N


# ---- edges --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [ATTN, MLP, LOGITS], ids=["attention", "mlp", "logits"])
@pytest.mark.parametrize("method", ["integrated", "gradient"])
def test_exact_edges_match_a_float64_jacrev_of_the_definition(pair, method):
    model = _model64()
    data = _data(model)
    a, b = pair
    ba = _random_basis(tld.ModelAdapter(model).d_mlp if "mlp" in a else TINY["d_model"], 5, seed=1)
    bb = _random_basis(TINY["d_vocab"] if b == LOGITS[1] else TINY["d_model"], 4, seed=2)
    graph = tld.interaction_graph(model, data, {a: ba, b: bb}, [a, b], method=method, n_points=3,
                                  estimator="exact")
    if method == "integrated":
        x, w = np.polynomial.legendre.leggauss(3)
        alphas, weights = (x + 1) / 2, w / 2
    else:
        alphas, weights = [1.0], [1.0]
    ref = _reference_edges(model, data, a, b, ba, bb, alphas, weights)
    E = graph.edges[(a, b)]
    assert E.dtype == torch.float64 and E.shape == (5, 4)
    # float64 throughout: only summation-order rounding separates the two (~1e-15 relative)
    torch.testing.assert_close(E, ref, rtol=1e-9, atol=1e-14)
    if pair == ATTN:  # cross-position terms matter here: the diagonal-in-position part alone differs
        assert E.abs().sum() > 0


def test_logits_are_the_last_node_layer_with_the_identity_basis():
    """The companion's output node layer: the logits in their own coordinates. ``ln_final`` → logits is affine
    (logits = x W_U + b_U), so E[i, j] = (1/N) Σ_counted (f̂_i (W_Uᵀ C_A⁺)_{j i})², one matrix product (float64:
    rounding only)."""
    model = _model64()
    data = _data(model)
    a, b = "ln_final.hook_normalized", "unembed.hook_out"
    assert tld.resolve_sites(model, ["ln_final", "logits"]) == [a, b]
    ba = _random_basis(TINY["d_model"], 5, seed=1)
    ident = tld.identity_basis(TINY["d_vocab"])
    assert ident.dim == TINY["d_vocab"] and torch.equal(ident.C, torch.eye(TINY["d_vocab"], dtype=torch.float64))
    graph = tld.interaction_graph(model, data, {a: ba, b: ident}, [a, b], method="integrated", n_points=2)
    W = model.W_U.detach().T @ ba.C_pinv  # [d_vocab, k_A]: logit j per unit of f̂_i
    ref, n = 0.0, 0
    for batch in data:
        f = (_act(model, batch.tokens, a) - ba.mean) @ ba.C.T  # [B, T, k_A]
        contrib = f[:, :, :, None] * W.T[None, None]  # [B, T, k_A, d_vocab]
        ref = ref + (contrib ** 2)[batch.mask].sum(0)
        n += int(batch.mask.sum())
    torch.testing.assert_close(graph.edges[(a, b)], ref / n, rtol=1e-10, atol=1e-14)
    with pytest.raises(tld.BadInputError, match="forward order"):  # the logits come after every other site
        tld.interaction_graph(model, data, {a: ba, b: ident}, [b, a])


def test_integrated_and_gradient_methods_differ_on_a_nonlinear_pair():
    model = _model64()
    data = _data(model)
    a, b = MLP
    bases = {a: _random_basis(TINY["d_mlp"], 5, seed=1), b: _random_basis(TINY["d_model"], 4, seed=2)}
    e_int = tld.interaction_graph(model, data, bases, [a, b], method="integrated", n_points=4).edges[(a, b)]
    e_grad = tld.interaction_graph(model, data, bases, [a, b], method="gradient").edges[(a, b)]
    assert not torch.allclose(e_int, e_grad, rtol=1e-3)


def test_stochastic_edges_are_unbiased():
    """Mean over seeds of the random-sign estimator vs the exact edges. Each seed's estimate is an
    independent draw; the mean's error has variance Σ var/S, estimated from the seeds themselves, so
    ‖mean − exact‖² ≈ Σ var/S; allow a factor 3 (a biased estimator misses by far more, see the end)."""
    model = _model64()
    data = _data(model)
    a, b = ATTN
    bases = {a: _random_basis(TINY["d_model"], 4, seed=1), b: _random_basis(TINY["d_model"], 3, seed=2)}
    exact = tld.interaction_graph(model, data, bases, [a, b], method="gradient").edges[(a, b)]
    draws = torch.stack([tld.interaction_graph(model, data, bases, [a, b], method="gradient", estimator="probe",
                                               n_probes=2, seed=s).edges[(a, b)] for s in range(40)])
    err2 = ((draws.mean(0) - exact) ** 2).sum()
    bound = draws.var(0).sum() / draws.shape[0]
    assert err2 < 3 * bound
    assert draws.var(0).sum() > 0  # the estimator is stochastic: the test could fail
    assert ((draws.mean(0) * 1.2 - exact) ** 2).sum() > 3 * bound  # a 20% bias would be caught


def test_graph_is_diagonal_for_a_deep_linear_network_in_interaction_coordinates():
    """Appendix A (eq. 44): with metric I, interaction coordinates of a linear network are the output's PCA
    coordinates at every layer, so each node talks to exactly one node of the next site."""
    model = _linear_model()
    data = _data(model, rows=8, seq=8)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    stats = tld.collect(model, data, sites=sites, jacobian="mse", estimator="exact", progress=False)
    bases = tld.interaction_bases(stats, rtol=1e-10, atol=_gap_cut(stats, sites[0]))
    graph = tld.interaction_graph(model, data, bases, sites, method="gradient")
    for (a, _), E in graph.edges.items():
        assert E.shape[0] == E.shape[1] >= 8
        # The statistics are float32 sums (SPEC §1): directions of C carry ~ε₃₂·Λ_max/gap rounding, and the
        # smallest Λ here are ~1e-4 of the largest and ~2x apart, so neighbouring small nodes leak into each
        # other at the 1e-2 level (measured 7e-3); everything else is far below.
        assert _off_diagonal(E) < 2e-2
        assert (E - torch.diag(torch.diagonal(E))).max() < 1e-4 * E.max()
        # E[i, i] = var(f̂_i)·(∂f̂_B,i/∂f̂_A,i)² = Λ_i (Λ equal at every layer, eq. 44), to the same rounding:
        # float32 rounding is relative to Λ_max (measured ≤ 6e-6·Λ_max, at the smallest Λ)
        lam = bases[a].lambdas
        torch.testing.assert_close(torch.diagonal(E), lam, rtol=1e-2, atol=2e-5 * lam.max().item())
    # control: in PCA coordinates the same network's graph is far from diagonal, so the test can fail
    pca = {s: tld.pca_basis(stats.gram(s), mean=stats.mean(s)) for s in sites}
    E = tld.interaction_graph(model, data, pca, sites[:2], method="gradient").edges[tuple(sites[:2])]
    assert _off_diagonal(E) > 0.1


def _off_diagonal(E):
    """max over i ≠ j of E[i, j] / sqrt(E[i, i] E[j, j])."""
    d = torch.diagonal(E)
    return ((E - torch.diag(d)) / (d[:, None] * d[None, :]).sqrt()).max().item()


# ---- local interaction basis -------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [ATTN, MLP], ids=["attention", "mlp"])
def test_lib_exact_gram_matches_a_float64_jacrev_reference(pair):
    model = _model64()
    data = _data(model)
    a, b = pair
    C_B = _random_basis(TINY["d_model"], 5, seed=3).C
    M, n = local_jacobian_gram(model, data, a, b, C_B, estimator="exact")
    ref = _reference_M(model, data, a, b, C_B)
    assert n == int(data.mask.sum())
    torch.testing.assert_close(M, ref, rtol=1e-9, atol=1e-14)


def test_lib_gram_of_a_float32_model_has_float32_products_and_float64_totals():
    # A float32 model: each chunk's Gram is one float32 product (TF32 off; upper triangle on the CPU), added to a
    # float64 total. Against the float64 jacrev reference of the same weights the error is float32 rounding of the
    # forward/backward and of the products (~1e-6 relative; asserted at 1e-4 relative to the largest entry).
    model64 = _model64()
    model32 = make_tiny_model()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    a, b = MLP
    C_B = _random_basis(TINY["d_model"], 5, seed=3).C
    M32, n = local_jacobian_gram(model32, _data(model32), a, b, C_B.float(), estimator="exact")
    ref = _reference_M(model64, _data(model64), a, b, C_B)
    assert M32.dtype == torch.float64 and n == int(_data(model32).mask.sum())
    torch.testing.assert_close(M32, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert torch.equal(M32, M32.T)  # exactly symmetric


def test_local_bases_use_the_next_sites_basis_and_the_two_steps_of_interaction_basis():
    model = _model64()
    data = _data(model)
    sites = list(ATTN)
    stats = tld.collect(model, data, sites=sites, jacobian="kl", estimator="exact", progress=False)
    bases = tld.local_interaction_bases(model, data, sites, stats=stats, estimator="exact")
    assert all(b.kind == "local" for b in bases.values())
    glob = tld.interaction_bases(stats, sites=[sites[1]])[sites[1]]
    torch.testing.assert_close(bases[sites[1]].C, glob.C)  # the last site: its global basis
    M = _reference_M(model, data, sites[0], sites[1], bases[sites[1]].C)
    want = tld.interaction_basis(stats.gram(sites[0]), M, mean=stats.mean(sites[0]))
    assert bases[sites[0]].dim == want.dim
    torch.testing.assert_close(bases[sites[0]].C, want.C, rtol=1e-6, atol=1e-8)


def test_lib_probes_are_unbiased():
    """Mean of the probe estimate of M_A over seeds vs the exact M_A: same derived bound as for the edges."""
    model = _model64()
    data = _data(model)
    a, b = ATTN
    C_B = _random_basis(TINY["d_model"], 5, seed=3).C
    exact, _ = local_jacobian_gram(model, data, a, b, C_B, estimator="exact")
    draws = torch.stack([local_jacobian_gram(model, data, a, b, C_B, n_probes=1, seed=s)[0] for s in range(40)])
    err2 = ((draws.mean(0) - exact) ** 2).sum()
    bound = draws.var(0).sum() / draws.shape[0]
    assert err2 < 3 * bound
    assert ((draws.mean(0) * 1.2 - exact) ** 2).sum() > 3 * bound


def test_lib_equals_the_global_interaction_basis_for_a_deep_linear_network():
    """Linear network, metric I: C_Bᵀ C_B is M_B projected on B's data span, which J_{B←A} maps A's span
    into, so M_A^local = M_A^global on A's span and the bases agree (up to sign, fixed by convention)."""
    model = _linear_model()
    data = _data(model, rows=8, seq=8)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    stats = tld.collect(model, data, sites=sites, jacobian="mse", estimator="exact", progress=False)
    atol = _gap_cut(stats, sites[0])
    glob = tld.interaction_bases(stats, rtol=1e-10, atol=atol)
    local = tld.local_interaction_bases(model, data, sites, stats=stats, estimator="exact", rtol=1e-10, atol=atol)
    for s in sites:
        assert local[s].dim == glob[s].dim >= 8
        # statistics are float32 sums (SPEC §1): agreement to ~1e-5 relative
        torch.testing.assert_close(local[s].lambdas, glob[s].lambdas, rtol=1e-4, atol=0)
        torch.testing.assert_close(local[s].C, glob[s].C, rtol=1e-3, atol=1e-3 * glob[s].C.abs().max().item())


def _gap_cut(stats, site):
    """ε at the widest gap of the site's Λ spectrum above 1e-5·Λ_max keeping ≥ 8 directions: the statistics
    are float32 sums (SPEC §1), so directions far below Λ_max are rounding-limited; cutting at a wide gap keeps only
    directions every layer resolves (Λ is the same at every layer of a linear network, eq. 44)."""
    lam = tld.interaction_bases(stats, sites=[site], rtol=1e-10)[site].all_lambdas
    lam = lam[lam > 1e-5 * lam[0]]
    i = 7 + int((lam[7:-1] / lam[8:]).argmax())
    return float((lam[i] * lam[i + 1]).sqrt())


def _linear_model():
    """A deep linear network on the user's model: no LayerNorm, attention output zeroed, ReLU MLPs whose
    pre-activations are shifted by +8 (≥ 8 standard deviations: ReLU = identity on the data) with the shift's
    output cancelled by b_out. Every weight is redrawn N(0, 0.15²) from one seed on both majors, so the
    spectrum is as well conditioned on 3.x as on 4.x (their default initialisations differ)."""
    cfg = {**TINY, "act_fn": "relu", "normalization_type": None}
    if TL_MAJOR >= 4:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg, seed=0)).eval()
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        torch.manual_seed(0)
        model = HookedTransformer(HookedTransformerConfig(**cfg, seed=0)).eval()
    model = model.to(torch.float64)
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.15 if p.ndim > 1 else 0.01))
        attn_out = [p for n, p in params.items()
                    if re.search(r"attn\.(W_O|b_O)$|attn\._original_component\.o\._original_component\.", n)]
        b_in = [p for n, p in params.items() if re.search(r"mlp\.b_in$|fc_in\._original_component\.bias$", n)]
        W_out = [p for n, p in params.items()
                 if re.search(r"mlp\.W_out$|fc_out\._original_component\.weight$", n)]
        b_out = [p for n, p in params.items() if re.search(r"mlp\.b_out$|fc_out\._original_component\.bias$", n)]
        n = TINY["n_layers"]
        assert (len(attn_out), len(b_in), len(W_out), len(b_out)) == (2 * n, n, n, n), "parameter names changed"
        for p in attn_out:
            p.zero_()
        for bi, Wo, bo in zip(b_in, W_out, b_out, strict=True):
            bi.add_(8.0)
            W = Wo if Wo.shape == (TINY["d_mlp"], TINY["d_model"]) else Wo.T  # [d_mlp, d_model]
            bo.sub_(8.0 * W.sum(0))
    return model


# ---- modules -----------------------------------------------------------------------------------------
def _planted(seed=0):
    """Two modules across three sites of 4 nodes: strong edges (≥ 1) inside, edges below ε = 1e-6 across."""
    g = torch.Generator().manual_seed(seed)
    sites = ["s0", "s1", "s2"]
    group = torch.tensor([0, 1, 0, 1])
    edges = {}
    for a, b in zip(sites, sites[1:], strict=False):
        same = group[:, None] == group[None, :]
        E = torch.where(same, 1 + torch.rand(4, 4, generator=g, dtype=torch.float64),
                        1e-7 * torch.rand(4, 4, generator=g, dtype=torch.float64))
        edges[(a, b)] = E
    return tld.InteractionGraph(sites=sites, edges=edges), group


def test_planted_modules_are_recovered_exactly_at_zero_cost():
    graph, group = _planted()
    mods = tld.find_modules(graph, eps=1e-6, seed=0)
    assert mods.n_modules == 2 and mods.cost == 0.0
    for labels in mods.labels.values():
        assert torch.equal(labels, group)  # numbered by first node in forward order: s0 node 0 → module 0
    assert mods.modularity > 0.4  # two equal halves with no edge across: 1/2 minus the half-and-half share


def test_module_cost_is_the_section5_cut_cost_and_reproducible_with_a_seed():
    graph, _ = _planted()
    # one cross edge above ε: its cost ½ log(E/ε) is counted once the partition cuts it
    edges = dict(graph.edges)
    E = edges[("s0", "s1")].clone()
    E[0, 1] = 1e-4
    edges[("s0", "s1")] = E
    g2 = tld.InteractionGraph(sites=graph.sites, edges=edges)
    m1 = tld.find_modules(g2, eps=1e-6, seed=3)
    m2 = tld.find_modules(g2, eps=1e-6, seed=3)
    assert m1.cost == m2.cost and all(torch.equal(m1.labels[s], m2.labels[s]) for s in g2.sites)
    assert m1.n_modules == 2
    assert m1.cost == pytest.approx(0.5 * np.log(1e-4 / 1e-6))
    cost = tld.analysis.graph.edge_cost(torch.tensor([1e-7, 1e-6, 1e-2]), 1e-6)
    torch.testing.assert_close(cost, torch.tensor([0.0, 0.0, 0.5 * np.log(1e4)], dtype=torch.float64))


def test_graph_round_trips_through_safetensors_and_json(tmp_path):
    graph, _ = _planted()
    graph = tld.InteractionGraph(sites=graph.sites, edges=graph.edges,
                                 lambdas={s: torch.arange(4.0) + 1 for s in graph.sites}, meta={"method": "x"})
    graph.save(tmp_path / "g")
    back = tld.InteractionGraph.load(tmp_path / "g")
    assert back.sites == graph.sites and back.meta == graph.meta
    assert all(torch.equal(back.edges[k], graph.edges[k]) for k in graph.edges)
    assert all(torch.equal(back.lambdas[s], graph.lambdas[s]) for s in graph.sites)
    nxg = back.to_networkx(eps=1e-6)
    assert nxg.number_of_nodes() == 12 and nxg.number_of_edges() == 2 * 8  # 8 strong edges per pair


# ---- bad input -----------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_pass():
    model = make_tiny_model()
    data = _data(model)
    a, b = ATTN
    bases = {a: _random_basis(TINY["d_model"], 3, 0), b: _random_basis(TINY["d_model"], 3, 1)}
    with pytest.raises(tld.BadInputError, match="forward order"):
        tld.interaction_graph(model, data, bases, [b, a])
    with pytest.raises(tld.BadInputError, match="no basis given"):
        tld.interaction_graph(model, data, {a: bases[a]}, [a, b])
    with pytest.raises(tld.BadInputError, match="dimension"):
        tld.interaction_graph(model, data, {a: _random_basis(TINY["d_mlp"], 3, 0), b: bases[b]}, [a, b])
    with pytest.raises(tld.BadInputError, match="method"):
        tld.interaction_graph(model, data, bases, [a, b], method="riemann")
    with pytest.raises(tld.BadInputError, match="at least two"):
        tld.interaction_graph(model, data, bases, [a])
    stats = tld.collect(model, data, sites=[b], progress=False)
    with pytest.raises(tld.BadInputError, match="forward order"):
        tld.local_interaction_bases(model, data, [b, a], stats=stats)
    with pytest.raises(tld.BadInputError, match="no statistics"):
        tld.local_interaction_bases(model, data, [a, b], stats=stats)
    with pytest.raises(tld.BadInputError, match="dim"):
        tld.InteractionGraph(sites=["x", "y", "z"], edges={("x", "y"): torch.ones(2, 3),
                                                           ("y", "z"): torch.ones(2, 2)})
    with pytest.raises(tld.BadInputError, match="consecutive"):
        tld.InteractionGraph(sites=["x", "y"], edges={("y", "x"): torch.ones(2, 3)})
    with pytest.raises(tld.BadInputError, match="eps"):
        tld.find_modules(_planted()[0], eps=0.0)


def test_graph_plot_draws_every_node_coloured_by_module(tmp_path):
    from tl_degeneracy.run.report import plot_interaction_graph

    graph, group = _planted()
    graph = tld.InteractionGraph(sites=graph.sites, edges=graph.edges,
                                 lambdas={s: torch.arange(4.0, 0, -1) for s in graph.sites})
    mods = tld.find_modules(graph, eps=1e-6)
    fig = plot_interaction_graph(graph, mods)
    ax = fig.axes[0]
    points = [c for c in ax.collections if c.get_offsets().shape[0] == 4]
    assert len(points) == 3  # one column of 4 nodes per site
    sizes = points[0].get_sizes()
    assert sizes[0] > sizes[-1]  # sized by Λ
    colours = points[0].get_facecolors()
    assert (colours[0] == colours[2]).all() and not (colours[0] == colours[1]).all()  # by module
    lines = [c for c in ax.collections if c not in points]
    assert len(lines) == 1 and len(lines[0].get_segments()) == 16  # cross-module edges are 1e-7 of max: hidden
    fig.savefig(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_probe_edges_report_their_standard_error():
    """The reported standard error (from the spread of the K probes within each batch) matches the spread
    of the estimate over seeds: Σ stderr² vs Σ var over 40 seeds, whose relative sampling error is ~√(2/39)
    per entry (≈ 0.23) and less in the sum; a factor 1.6 either way."""
    from tl_degeneracy.collection.edges import edge_matrix

    model = _model64()
    data = _data(model)
    a, b = ATTN
    ba, bb = _random_basis(TINY["d_model"], 4, seed=1), _random_basis(TINY["d_model"], 3, seed=2)
    runs = [edge_matrix(model, data, a, b, ba, bb, method="gradient", estimator="probe", n_probes=4, seed=s)
            for s in range(40)]
    reported = torch.stack([r["stderr"] ** 2 for r in runs]).mean(0).sum()
    observed = torch.stack([r["edges"] for r in runs]).var(0).sum()
    assert 1 / 1.6 < reported / observed < 1.6


# ---- the graph stage of `tl-degeneracy run` ------------------------------------------------------------
def test_graph_stage_is_on_for_the_bundled_model_only_by_default():
    from tl_degeneracy.run.pipeline import RunConfig, default_stages

    assert "graph" in default_stages(RunConfig())
    assert "graph" not in default_stages(RunConfig(model="some/other/model"))
    assert "graph" in default_stages(RunConfig(model="some/other/model", graph=True))
    assert "graph" not in default_stages(RunConfig(graph=False))
    assert "graph" not in default_stages(RunConfig(jacobian=None))
    assert "graph" not in default_stages(RunConfig(layers=(0,)))  # one resid_pre site: no pair
    assert "graph" not in default_stages(RunConfig(sites=("mlp_post",)))


def test_graph_stage_writes_local_bases_the_graph_modules_and_the_plot(tmp_path, tiny_gpt2_path):
    from tl_degeneracy.run.pipeline import RunConfig, read_marker, run_stages

    cfg = RunConfig(model=tiny_gpt2_path, n_tokens=120, seq_len=16, batch_size=4, graph_n_tokens=60,
                    graph_eps=1e-4, sites=("resid_pre",), sync=False, device="cpu")
    out = tmp_path / "run"
    run_stages(cfg, out, ["stats", "graph"], progress=False)
    graph = tld.InteractionGraph.load(out / "graph" / "graph")
    assert graph.sites == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    local = tld.InteractionBasis.load(out / "graph" / "blocks.0.hook_resid_pre.local")
    assert local.kind == "local" and graph.dims["blocks.0.hook_resid_pre"] == local.dim
    summary = read_marker(out, "graph")["summary"]
    assert summary["modules"]["n_modules"] >= 1 and summary["dims"][0] == local.dim
    run_stages(cfg, out, ["report"], progress=False)  # the report draws the graph from the saved file
    assert (out / "plots" / "interaction_graph.png").stat().st_size > 1000
    assert "](plots/interaction_graph.png)" in (out / "index.md").read_text()
    assert read_marker(out, "graph") is not None  # the report left the graph stage's outputs alone


def test_graph_options_of_the_command_line(tmp_path, tiny_gpt2_path, capsys):
    from tl_degeneracy.run.cli import main
    from tl_degeneracy.run.pipeline import read_marker

    out = tmp_path / "cli"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("def f(x):\n    return x + 1\n" * 40)
    base = ["run", "--model", tiny_gpt2_path, "--data", str(tokens), "--sites", "resid_pre", "--n-tokens", "120",
            "--seq-len", "16", "--batch-size", "4", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main([*base, "--stages", "stats,graph", "--graph-n-tokens", "60", "--graph-eps", "1e-4"]) == 0
    marker = read_marker(out, "graph")
    assert marker["settings"]["eps"] == 1e-4 and marker["settings"]["n_tokens"] == 60
    assert marker["summary"]["modules"]["eps"] == 1e-4
    assert main([*base, "--stages", "graph", "--no-graph"]) == 2
    assert "contradicts --no-graph" in capsys.readouterr().err
