"""Ablation in a basis (issue 14; SPEC §5c): hooks, measured losses against a brute-force loop, the quadratic
prediction against exact answers, curves' save/load and input checks."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TINY, TL_MAJOR, make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.analysis.ablation import keep_schedule, predicted_kl, projector
from tl_degeneracy.collection import ablation as coll_ablation

SITE = "blocks.1.hook_resid_pre"
MLP_SITE = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model(seed=3)
    tokens = random_tokens(8, 16, seed=2)  # 8 × 15 = 120 counted tokens > d_mlp: full-rank Grams
    data = tld.token_batches(model, tokens, batch_size=4)
    stats = tld.collect(model, data, sites=[SITE, MLP_SITE], jacobian="kl", n_probes=8, progress=False)
    bases = {
        site: {"interaction": tld.interaction_bases(stats, sites=[site])[site],
               "pca": tld.pca_basis(stats.gram(site), mean=stats.mean(site))}
        for site in (SITE, MLP_SITE)
    }
    return model, tokens, data, stats, bases


def _capture(model, site, hooks, tokens):
    """The site's activation after the given hooks have run (a capture hook added last), and the logits."""
    seen = {}

    def grab(act, hook):
        seen["act"] = act.detach().clone()

    with model.hooks(fwd_hooks=[*hooks, (site, grab)]):
        logits = model(tokens)
    return seen["act"], logits


@pytest.mark.tl3
@pytest.mark.parametrize("site", [SITE, MLP_SITE])
def test_keep_dim_reproduces_the_data_and_keep_zero_gives_the_mean(setup, site):
    model, tokens, data, stats, bases = setup
    pb = bases[site]["pca"]
    clean_act, clean_logits = _capture(model, site, [], tokens)
    mask = data.mask
    act, logits = _capture(model, site, pb.ablation_hooks(site, keep=pb.dim, mask=mask), tokens)
    # float32 floor: P is applied in float32 to activations of size ~|a|; 1e-5·max|a| is ~100 float32 ulps
    scale = clean_act.abs().max().item()
    assert pb.dim == pb.rank_G == pb.input_dim  # 120 tokens span the whole site: nothing discarded
    assert (act - clean_act).abs().max().item() < 1e-5 * scale
    assert (logits - clean_logits).abs().max().item() < 1e-4 * clean_logits.abs().max().item()
    act0, _ = _capture(model, site, pb.ablation_hooks(site, keep=0, mask=mask), tokens)
    mu = stats.mean(site).to(act0.dtype)
    assert torch.allclose(act0[mask], mu.expand_as(act0[mask]), atol=1e-6 * scale)
    assert torch.equal(act0[~mask], clean_act[~mask])  # BOS position untouched: it is not counted
    # no mask: every position replaced
    act_all, _ = _capture(model, site, pb.ablation_hooks(site, keep=0), tokens)
    assert torch.allclose(act_all, mu.expand_as(act_all), atol=1e-6 * scale)


@pytest.mark.tl3
def test_projection_hooks_keep_a_subset_and_projector_is_idempotent(setup):
    model, tokens, data, stats, bases = setup
    ib = bases[SITE]["interaction"]
    P = projector(ib, [1, 3])
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert torch.allclose(ib.C[[1, 3]] @ P, ib.C[[1, 3]], atol=1e-10)
    assert torch.allclose(ib.C[[0, 2]] @ P, torch.zeros_like(ib.C[[0, 2]]), atol=1e-10)
    act, _ = _capture(model, SITE, ib.projection_hooks(SITE, keep=[1, 3]), tokens)
    f = ib.transform(act.to(torch.float64))
    assert f[..., [0, 2, 4]].abs().max().item() < 1e-5 * f[..., [1, 3]].abs().max().item()


@pytest.mark.tl3
def test_resid_mid_replaces_the_whole_stream(setup):
    """On 4.x hook_resid_mid feeds only the MLP: the raw hook refuses, full_stream_hooks replaces the stream
    (resid_post − mlp_out = the replaced resid_mid on both majors)."""
    model, tokens, data, stats, bases = setup
    site = "blocks.0.hook_resid_mid"
    s = tld.collect(model, data, sites=[site], progress=False)
    pb = tld.pca_basis(s.gram(site), mean=s.mean(site))
    raw = pb.ablation_hooks(site, keep=0, mask=data.mask)
    if TL_MAJOR >= 4:
        with pytest.raises(tld.BadInputError, match="feeds only the MLP"), model.hooks(fwd_hooks=raw):
            model(tokens)
    seen = {}

    def grab(name):
        def fn(act, hook):
            seen[name] = act.detach().clone()
        return fn

    hooks = tld.full_stream_hooks(model, raw)
    extra = [("blocks.0.hook_mlp_out", grab("mlp")), ("blocks.0.hook_resid_post", grab("post"))]
    with model.hooks(fwd_hooks=[*hooks, *extra]):
        model(tokens)
    mid = seen["post"] - seen["mlp"]
    mu = s.mean(site).to(mid.dtype)
    assert torch.allclose(mid[data.mask], mu.expand_as(mid[data.mask]), atol=1e-5)


@pytest.mark.tl3
def test_model_state_and_user_hooks_untouched_also_after_an_exception(setup):
    model, tokens, data, stats, bases = setup
    ib = bases[SITE]["interaction"]
    fired = []
    model.add_hook("blocks.0.hook_resid_post", lambda act, hook: fired.append(1))
    model.train()
    try:
        tld.ablation_curve(model, data, ib, site=SITE, keep=[0, 2], progress=False)
        assert model.training and all(p.requires_grad for p in model.parameters())

        def boom(batch):
            def fn(act, hook):
                raise RuntimeError("boom")
            return [(SITE, fn)]

        with pytest.raises(RuntimeError, match="boom"):
            tld.measure_losses(model, data, [boom], progress=False)
        assert model.training and all(p.requires_grad for p in model.parameters())
        fired.clear()
        model(tokens)
        assert fired == [1]  # the user's hook is still there, and only it
        clean = model(tokens)
        model.reset_hooks()
        assert torch.allclose(model(tokens), clean)  # no hook of ours was left behind
    finally:
        model.reset_hooks()
        model.eval()


def _brute_force(model, data, hooks_for, loss):
    """Explicit loops: run_with_hooks per batch, per position, per vocabulary entry."""
    total, count = 0.0, 0
    for batch in data:
        with torch.no_grad():
            ref_t = model(batch.tokens).double().log_softmax(-1)
            new_t = model.run_with_hooks(batch.tokens, fwd_hooks=hooks_for(batch)).double().log_softmax(-1)
        B, T, V = ref_t.shape
        ref, new = ref_t.tolist(), new_t.tolist()
        for b in range(B):
            for t in range(T):
                if not batch.mask[b, t]:
                    continue
                if loss == "kl":
                    total += sum(math.exp(ref[b][t][v]) * (ref[b][t][v] - new[b][t][v]) for v in range(V))
                elif loss == "top1":
                    total += float(int(ref_t[b, t].argmax()) != int(new_t[b, t].argmax()))
                else:
                    if t + 1 >= T or not batch.mask[b, t + 1]:
                        continue
                    y = int(batch.tokens[b, t + 1])
                    total += ref[b][t][y] - new[b][t][y]
                count += 1
    return total / count


@pytest.mark.tl3
@pytest.mark.parametrize("loss", ["kl", "ce", "top1"])
def test_measured_loss_matches_a_brute_force_loop(setup, loss):
    model, tokens, data, stats, bases = setup
    ib = bases[MLP_SITE]["interaction"]
    keep = [0, 3, ib.dim]
    curve = tld.ablation_curve(model, data, ib, site=MLP_SITE, keep=keep, loss=loss, progress=False)
    assert curve.keep == keep and curve.loss.dtype == torch.float64
    for i, k in enumerate(keep):
        ref = _brute_force(model, data, lambda b, k=k: ib.ablation_hooks(MLP_SITE, keep=k, mask=b.mask), loss)
        assert curve.loss[i].item() == pytest.approx(ref, rel=1e-6, abs=1e-9)
    # baseline: the unablated next-token cross-entropy, by the same loop
    assert curve.n_tokens > 0 and curve.baseline > 0
    # measure_loss (the reusable single measurement) agrees
    fixed = tld.measure_loss(model, tld.token_batches(model, tokens, batch_size=8), ib.ablation_hooks(
        MLP_SITE, keep=3, mask=data.mask), loss=loss)
    assert fixed == pytest.approx(curve.loss[1].item(), rel=1e-6, abs=1e-9)


def test_keep_schedules_agree_and_are_dense_at_both_ends():
    assert keep_schedule(20) == [0, 1, 2, 4, 8, 16, 17, 18, 19, 20]
    assert keep_schedule(0) == [0] and keep_schedule(3) == [0, 1, 2, 3]
    for dim in range(0, 70):
        assert coll_ablation._check_keep(None, dim, "b") == keep_schedule(dim)


def test_prediction_is_exact_on_a_deep_linear_network():
    """Metric I (squared error) on a deep linear network: the output change is W(P − I)(a − μ), so the loss
    ½ mean ‖Δy‖² is exactly ½ tr(WᵀW (I − P) G_c (I − P)ᵀ) (no higher order, no cross terms). Exact up to
    float64 rounding: 1e-10 relative."""
    g = torch.Generator().manual_seed(0)
    n, d_in, d = 4000, 6, 10
    W1 = torch.randn(d_in, d, generator=g, dtype=torch.float64)
    W2 = torch.randn(d, 5, generator=g, dtype=torch.float64)
    W3 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    A = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ W1 + 1.0  # rank 6 of 10, non-zero mean
    W = W2 @ W3  # the rest of the network: y = a W
    mu = A.mean(0)
    G_c = (A - mu).T @ (A - mu) / n
    M = W @ W.T  # (1/N) Σ Jᵀ I J with J = Wᵀ
    for basis in (tld.interaction_basis(G_c, M, mean=mu), tld.pca_basis(G_c, mean=mu)):
        ks = list(range(basis.dim + 1))
        pred = predicted_kl(basis, G_c, M, ks)
        for i, k in enumerate(ks):
            P = projector(basis, k)
            A_abl = mu + (A - mu) @ P.T
            measured = 0.5 * ((A_abl - A) @ W).pow(2).sum(1).mean()
            assert pred[i].item() == pytest.approx(measured.item(), rel=1e-10, abs=1e-10 * pred[0].item())
    ib = tld.interaction_basis(G_c, M, mean=mu)
    tail = [0.5 * ib.lambdas[k:].sum().item() for k in range(ib.dim + 1)]
    assert torch.allclose(ib.predicted_kl(G_c, M, list(range(ib.dim + 1))), torch.tensor(tail, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(12))
def test_interaction_prediction_never_above_pca(seed):
    """Eckart–Young: ½ tr(M (I−P) G (I−P)ᵀ) over rank-k reconstructions is smallest for the interaction basis."""
    g = torch.Generator().manual_seed(seed)
    d = 9
    rank_G = [9, 5, 3][seed % 3]
    rank_M = [9, 4, 7, 2][seed % 4]
    X = torch.randn(d, rank_G, generator=g, dtype=torch.float64)
    Y = torch.randn(d, rank_M, generator=g, dtype=torch.float64)
    G = X @ X.T
    M = Y @ Y.T
    ib, pb = tld.interaction_basis(G, M), tld.pca_basis(G)
    # what the interaction basis discarded at its tolerance (Λ below rtol·Λ_max): ½ Σ of those Λ
    discarded = 0.5 * ib.all_lambdas[ib.dim:].clamp(min=0).sum().item()
    full = predicted_kl(ib, G, M, [0])[0].item()
    assert predicted_kl(ib, G, M, [ib.dim])[0].item() == pytest.approx(discarded, abs=1e-9 * full)
    for k in range(pb.dim + 1):
        pred_pca = predicted_kl(pb, G, M, [k])[0].item()
        pred_ib = predicted_kl(ib, G, M, [min(k, ib.dim)])[0].item()
        slack = 1e-9 * full + (discarded if k > ib.dim else 0.0)  # float64 rounding of traces ~ 1e-13·full
        assert pred_ib <= pred_pca + slack


@pytest.mark.tl3
def test_small_ablations_follow_the_quadratic_prediction():
    """For ablations that move the output little (keep = dim − 1, dim − 2 at a residual site of a tiny model),
    measured KL / predicted ≈ 1. The prediction uses the exact M (estimator="exact") on the same data, so what
    is left is (i) the cross-position terms J_{s,t}ᵀ F J_{s,t'} (t ≠ t'), (ii) the token-by-token correlation of
    the activation change with its Jacobian and (iii) third-order terms. (iii) is O(KL^{3/2}) relative and
    negligible at KL ~ 1e-3; (i) and (ii) do not vanish with the ablation's size, so the bound is loose:
    0.5 < ratio < 2. Measured on this model and seed: 1.63 at k = dim − 1 and 1.29 at dim − 2 (the smallest
    ablations carry the least variance, so the neglected terms weigh most), 0.98–1.44 over the whole curve."""
    model = make_tiny_model(seed=5)
    tokens = random_tokens(6, 12, seed=7)
    data = tld.token_batches(model, tokens, batch_size=6)
    stats = tld.collect(model, data, sites=[SITE], jacobian="kl", estimator="exact", progress=False)
    ib = tld.interaction_bases(stats, sites=[SITE])[SITE]
    keep = [ib.dim - 1, ib.dim - 2]
    curve = tld.ablation_curve(model, data, ib, site=SITE, keep=keep, stats=stats, progress=False)
    ratio = curve.loss / curve.predicted
    assert curve.predicted.max().item() < 0.05  # small ablations
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio


@pytest.mark.tl3
def test_curves_side_by_side_save_load_bit_for_bit(setup, tmp_path):
    model, tokens, data, stats, bases = setup
    curves = tld.ablation_curves(model, data, bases[SITE], site=SITE, stats=stats, progress=False)
    assert set(curves) == {"interaction", "pca"}
    ib_curve = curves["interaction"]
    assert ib_curve.keep == keep_schedule(ib_curve.dim) and ib_curve.predicted is not None
    assert ib_curve.loss[-1].item() < 1e-6 * max(ib_curve.loss[0].item(), 1e-12) + 1e-9  # keep = dim: ~0
    for curve in curves.values():
        curve.save(tmp_path / curve.kind)
        back = tld.AblationCurve.load(tmp_path / curve.kind)
        assert torch.equal(back.loss, curve.loss) and torch.equal(back.predicted, curve.predicted)
        assert (back.site, back.kind, back.keep, back.loss_kind, back.baseline, back.n_tokens, back.dim) == (
            curve.site, curve.kind, curve.keep, curve.loss_kind, curve.baseline, curve.n_tokens, curve.dim)
    assert tld.directions_needed(ib_curve, 1e30) == 0
    assert tld.directions_needed(ib_curve, 0.0) in (None, ib_curve.dim)


def test_directions_needed():
    curve = tld.AblationCurve(site="s", kind="pca", keep=[0, 1, 2, 4], loss=torch.tensor(
        [0.5, 0.02, 0.009, 0.0], dtype=torch.float64), loss_kind="top1", predicted=None, baseline=1.0,
        n_tokens=10, dim=4)
    assert tld.directions_needed(curve, 0.01) == 2
    assert tld.directions_needed(curve, 0.5) == 0
    curve2 = tld.AblationCurve(site="s", kind="pca", keep=[0, 1, 2], loss=torch.tensor(
        [0.5, 0.001, 0.3], dtype=torch.float64), loss_kind="kl", predicted=None, baseline=1.0, n_tokens=10, dim=2)
    assert tld.directions_needed(curve2, 0.01) is None  # the loss must stay within tolerance for larger k
    with pytest.raises(tld.BadInputError):
        tld.directions_needed(curve, -1)


class _NoBatches(tld.TokenBatches):
    def __iter__(self):
        raise AssertionError("a batch ran before the input was checked")


@pytest.mark.tl3
def test_bad_input_is_refused_before_any_batch(setup):
    model, tokens, data, stats, bases = setup
    nob = _NoBatches(data.tokens, data.mask, data.batch_size)
    ib = bases[SITE]["interaction"]
    cases = [
        (dict(basis=ib, site=SITE, keep=[ib.dim + 1]), "out of range"),
        (dict(basis=ib, site="blocks.9.hook_resid_pre"), "no hook named"),  # UnknownHookError
        (dict(basis=bases[MLP_SITE]["interaction"], site=SITE), "another site"),
        (dict(basis=ib, site=SITE, loss="mse"), "loss must be one of"),
        (dict(basis=ib, site=SITE, stats=tld.collect(model, data, sites=[SITE], progress=False)),
         "Jacobian statistics"),
        (dict(basis=ib, site=SITE, stats=stats, loss="ce"), "prediction is of the KL"),
    ]
    for kwargs, message in cases:
        with pytest.raises((tld.BadInputError, tld.UnknownHookError), match=message):
            tld.ablation_curve(model, nob, progress=False, **kwargs)
    with pytest.raises(tld.BadInputError, match="out of range"):
        ib.ablation_hooks(SITE, keep=ib.dim + 1)
    with pytest.raises(tld.BadInputError, match="out of range"):
        ib.projection_hooks(SITE, keep=[0, ib.dim])
    wrong = bases[MLP_SITE]["pca"].ablation_hooks(SITE, keep=1)
    with pytest.raises(tld.BadInputError, match="another site"), model.hooks(fwd_hooks=wrong):
        model(tokens)


def test_tiny_model_width_is_what_the_tests_assume():
    assert TINY["d_model"] == 32 and TINY["d_mlp"] == 64


@pytest.mark.slow
@pytest.mark.tl3
def test_bundled_model_interaction_basis_needs_no_more_directions_than_pca():
    """On the bundled model (blocks.1.hook_resid_pre, d = 128), the interaction basis's measured KL curve is at or
    below PCA's at most k up to its dim (benchmarks/bench_ablation.py, 1024 tokens: at every such k, by up to 40%
    at k = 64; here, with 2048/512 tokens, at all but k = 1, 7% above), and keeping all its directions leaves the
    output unchanged: the directions it discards at its tolerance do not matter (KL at keep = dim below 1e-4 of
    the KL at keep = 0)."""
    model = tld.load_model(tld.bundled_model_path())
    site = "blocks.1.hook_resid_pre"
    stats = tld.collect(model, tld.load_data(model, None, seq_len=128, batch_size=8, n_tokens=2048),
                        sites=[site], jacobian="kl", n_probes=4, progress=False)
    data = tld.load_data(model, None, seq_len=128, batch_size=8, n_tokens=512)
    ib = tld.interaction_bases(stats, sites=[site])[site]
    pb = tld.pca_basis(stats.gram(site), mean=stats.mean(site))
    keep = [k for k in keep_schedule(ib.dim) if k <= ib.dim - 4] + [ib.dim]
    curves = tld.ablation_curves(model, data, {"interaction": ib, "pca": pb}, site=site, keep=keep,
                                 progress=False)
    c_ib, c_pca = curves["interaction"], curves["pca"]
    common = [i for i, k in enumerate(keep) if 0 < k < ib.dim]
    below = [i for i in common if c_ib.loss[i] <= c_pca.loss[i]]
    # The basis minimises the *predicted* KL (Eckart–Young); the measured KL of large ablations is ~2.5× the
    # prediction (cross-position terms), so at a single large ablation the order can flip: with these tokens
    # k = 1 gives 2.91 (interaction) vs 2.72 (PCA), 7% above. Allow 10% at any k (and 1e-6, float32 noise of
    # the KL); most k must be at or below.
    pairs = [(keep[i], c_ib.loss[i].item(), c_pca.loss[i].item()) for i in common]
    assert all(ib_kl <= 1.10 * pca_kl + 1e-6 for _, ib_kl, pca_kl in pairs), [p for p in pairs if p[1] > p[2]]
    assert len(below) >= 0.75 * len(common), (len(below), len(common))
    assert c_ib.loss[-1].item() < 1e-4 * c_ib.loss[0].item()


class _LastPositionOutputs(tld.TokenBatches):
    """Batches that carry an output mask (SPEC §5b): outputs at the last position only."""

    def __iter__(self):
        from types import SimpleNamespace

        for batch in super().__iter__():
            out = torch.zeros_like(batch.mask)
            out[:, -1] = True
            yield SimpleNamespace(tokens=batch.tokens, mask=batch.mask, index=batch.index, output_mask=out)


def test_output_mask_selects_the_positions_the_loss_averages_over(setup):
    model, tokens, data, stats, bases = setup
    ib = bases[SITE]["interaction"]
    last = _LastPositionOutputs(data.tokens, data.mask, data.batch_size)
    curve = tld.ablation_curve(model, last, ib, site=SITE, keep=[2], progress=False)
    assert curve.n_tokens == tokens.shape[0]  # one output per row
    with torch.no_grad():
        ref = model(tokens).double().log_softmax(-1)[:, -1]
        new = model.run_with_hooks(tokens, fwd_hooks=ib.ablation_hooks(SITE, keep=2, mask=data.mask))
        new = new.double().log_softmax(-1)[:, -1]
    expected = (ref.exp() * (ref - new)).sum(-1).mean().item()
    assert curve.loss[0].item() == pytest.approx(expected, rel=1e-6)
