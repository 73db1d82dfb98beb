"""The cheaper kernels of the speed issue (21) against their plain references: the two-stage categorical sampler
against ``torch.multinomial``, triangle-only Grams against full ones, sum-based NaN/inf checks."""

from __future__ import annotations

import math

import pytest
import torch

from tl_degeneracy.collection.kernels import sample_categorical

pytestmark = pytest.mark.tl3


def _chi2_critical(df: int, z: float = 4.265) -> float:
    """Upper 1e-5 quantile of χ²(df) (Wilson–Hilferty; z = Φ⁻¹(1 − 1e-5)): a false alarm once in 100,000 runs."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _pooled_counts(y: torch.Tensor, p: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and expected counts with the cells of expected count < 5 pooled into one (χ² validity)."""
    counts = torch.bincount(y.flatten(), minlength=p.numel()).double()
    expected = p.double() / p.sum() * n
    small = expected < 5
    counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    return counts[keep], expected[keep]


def _distributions() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    peaked = torch.softmax(torch.randn(1013, generator=g) * 4.0, 0)  # a few tokens hold most of the mass
    peaked[7] = 0.0  # an impossible token
    flat = torch.full((1013,), 1.0 / 1013)
    return {"peaked": peaked, "flat": flat}


@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_sampler_matches_the_distribution_and_torch_multinomial(kind):
    p = _distributions()[kind]
    rows, k = 400, 500  # 200,000 draws, 500 per row for 400 rows (each row the same distribution)
    P = p.expand(rows, -1).contiguous()
    ours = sample_categorical(P, k, generator=torch.Generator().manual_seed(0))
    ref = torch.multinomial(P, k, replacement=True, generator=torch.Generator().manual_seed(0))
    assert ours.shape == ref.shape == (rows, k) and ours.dtype == torch.int64
    assert not bool((ours == 7).any()) if kind == "peaked" else True  # p = 0 is never drawn
    n = rows * k
    for y in (ours, ref):  # goodness of fit of each sampler to p; the reference passes the same test
        counts, expected = _pooled_counts(y, p, n)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # Power (checked by hand): a 10% tilt of half the vocabulary gives χ² = 455 (peaked) and 1550 (flat)
        # against critical values 303 and 1216. An error in one cell hides in the sum, hence also the per-cell
        # test |z| < 5.3 (Bonferroni over ≤ 1013 cells: a false alarm about once in 10⁵ runs), which catches a
        # relative error above 5.3/√(n p) in any cell: 1.7% for the top token (p ≈ 0.5, n = 200,000).
        assert chi2 < _chi2_critical(len(counts) - 1), (kind, chi2, len(counts))
        z = ((counts - expected) / expected.sqrt()).abs().max()
        assert z < 5.3, (kind, float(z))
    # homogeneity of the two samples (a 2 × cells contingency table)
    a, _ = _pooled_counts(ours, p, n)
    b, _ = _pooled_counts(ref, p, n)
    pooled = (a + b) / 2
    chi2 = float((((a - pooled) ** 2 + (b - pooled) ** 2) / pooled.clamp(min=1e-12)).sum())
    assert chi2 < _chi2_critical(len(a) - 1), (kind, chi2)


def test_sampler_draws_are_reproducible_with_a_seed_and_differ_across_seeds():
    p = torch.softmax(torch.randn(16, 300, generator=torch.Generator().manual_seed(3)), -1)
    a = sample_categorical(p, 4, generator=torch.Generator().manual_seed(5))
    b = sample_categorical(p, 4, generator=torch.Generator().manual_seed(5))
    c = sample_categorical(p, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("vocab", [1, 2, 3, 50, 225, 226, 50257])
def test_sampler_handles_every_vocabulary_size_and_point_masses(vocab):
    # a point mass on the last token (the partial last block) and on the first: always drawn
    for target in {0, vocab - 1}:
        p = torch.zeros(3, vocab)
        p[:, target] = 0.25  # unnormalised rows are fine
        y = sample_categorical(p, 6, generator=torch.Generator().manual_seed(0))
        assert bool((y == target).all()), (vocab, target, y)


# ---- NaN/inf checks reduce to sums: a single bad entry still stops the run, naming the place and batch ----

def _poison_once(value: float, *, call: int = 2, entry=(0, 3, 5)):
    """A hook that puts ``value`` at one entry of its tensor on its ``call``-th call (batch 1 of 2-row batches)."""
    calls = {"n": 0}

    def hook(t, hook):
        calls["n"] += 1
        if calls["n"] == call:
            t = t.clone()
            t[entry] = value
            return t

    return hook


@pytest.mark.parametrize(
    ("hook_point", "direction", "value", "message"),
    [
        ("blocks.1.hook_resid_pre", "fwd", float("nan"), r"activation at site 'blocks\.1\.hook_resid_pre'"),
        ("ln_final.hook_normalized", "fwd", float("inf"), r"the logits"),
        ("blocks.1.hook_resid_pre", "bwd", float("nan"), r"gradient at site 'blocks\.0\.hook_resid_pre'"),
    ],
    ids=["activation", "logits", "gradient"],
)
def test_one_non_finite_entry_stops_the_run_naming_place_and_batch(hook_point, direction, value, message):
    from tiny import make_tiny_model, random_tokens

    import tl_degeneracy as tld

    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(6, 8), batch_size=2)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    model.add_hook(hook_point, _poison_once(value), dir=direction)
    try:
        with pytest.raises(tld.NonFiniteError, match=message + r".*batch 1"):
            tld.collect(model, data, sites=sites, jacobian="kl", progress=False, memory_budget=None)
    finally:
        model.reset_hooks(including_permanent=False)


def test_in_place_softmax_equals_torch_softmax_within_float32_rounding():
    from tl_degeneracy.collection.kernels import softmax_rows_

    x = torch.randn(64, 5000, generator=torch.Generator().manual_seed(2)) * 8
    ref = torch.softmax(x, dim=-1)
    y = x.clone()
    out = softmax_rows_(y)
    assert out.data_ptr() == y.data_ptr()  # in place
    # a few float32 ulps: exp of the same shifted inputs, one division by a float32 row sum
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-9)


def test_stats_add_in_chunks_is_bit_identical_to_converting_first():
    from tl_degeneracy.stats import ADD_CHUNK, Stats

    g = torch.Generator().manual_seed(4)
    d = 301  # d² = 90,601 > ADD_CHUNK: a full chunk and a partial one
    assert d * d > ADD_CHUNK
    incs = [torch.randn(d, d, generator=g) * 10 ** k for k in range(-3, 4)]
    stats = Stats({}, {})
    ref = None
    for inc in incs:
        stats.add_({"m": inc.T, "n": torch.tensor(3, dtype=torch.int64)})  # a transposed (strided) increment
        ref = inc.T.double().clone() if ref is None else ref + inc.T.double()
    assert stats.tensors["m"].dtype == torch.float64 and stats.tensors["m"].is_contiguous()
    assert torch.equal(stats.tensors["m"], ref)
    assert int(stats.tensors["n"]) == 3 * len(incs)


@pytest.mark.parametrize(("n", "d", "block"), [(1016, 1024, None), (37, 1030, None), (20, 50, 8), (5, 47, 16)])
def test_triangle_gram_equals_the_full_gram_within_float32_rounding(n, d, block):
    from tl_degeneracy.collection.kernels import TRIANGLE_MIN_D, gram_increment, gram_upper_

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(d)) * 3
    ref = x.double().T @ x.double()
    if block is None:  # the production path: d >= TRIANGLE_MIN_D, default block, partial last block for 1030
        assert d >= TRIANGLE_MIN_D
        out = torch.full((d, d), float("nan"))  # a reused buffer: every entry must be overwritten
        got = gram_increment(x, out=out)
        assert got.data_ptr() == out.data_ptr()
    else:  # small blocks: several block columns, partial blocks and tiles, cheaply
        got = gram_upper_(x, torch.full((d, d), float("nan")), block=block)
    assert torch.equal(got, got.T)  # exactly symmetric
    # float32 products of length n: rounding ≲ n ε |x_i||x_j| relative to the Cauchy–Schwarz bound
    bound = torch.outer(x.double().norm(dim=0), x.double().norm(dim=0))
    assert float(((got.double() - ref).abs() / bound).max()) < 4 * n * torch.finfo(torch.float32).eps
    full = x.T @ x  # the full float32 product: the same error bound
    assert float(((got.double() - full.double()).abs() / bound).max()) < 8 * n * torch.finfo(torch.float32).eps


def test_reused_gram_buffers_give_the_same_totals_as_fresh_ones(monkeypatch):
    """The pass's workspace buffers (reused every batch: activation and Jacobian Grams, also for K > 1 probes,
    and the neuron-synchronisation products) never alias a total: collect equals the float64 sum of per-batch
    increments computed without a workspace, bit for bit; with the triangle path forced on the tiny widths."""
    from tiny import make_tiny_model, random_tokens

    import tl_degeneracy as tld
    from tl_degeneracy.adapter import as_adapter
    from tl_degeneracy.collection import kernels
    from tl_degeneracy.collection.collect import _components
    from tl_degeneracy.collection.engine import accurate_matmuls, run_batch

    monkeypatch.setattr(kernels, "TRIANGLE_MIN_D", 1)
    monkeypatch.setattr(kernels, "TRIANGLE_BLOCK", 16)
    model = make_tiny_model()
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    data = tld.token_batches(model, random_tokens(6, 9), batch_size=2)
    settings = dict(jacobian="kl", estimator="probe", n_probes=2, top_k=8, precision="accurate")
    stats = tld.collect(model, data, sites=sites, seed=3, head_sync=True, neuron_sync=True, memory_budget=None,
                        progress=False, **{k: v for k, v in settings.items() if k != "top_k"})
    adapter = as_adapter(model)
    comps = _components(adapter, sites, head_layers=[0, 1], neuron_layers=[0, 1], **settings)
    ref: dict[str, torch.Tensor] = {}
    with adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
        for batch in data:
            for key, inc in run_batch(adapter, comps, batch, 3).items():
                inc = inc.double() if inc.is_floating_point() else inc
                ref[key] = ref[key] + inc if key in ref else inc
    assert len(data) == 3 and {"nsync/1/cross", "nsync/1/pre_outer", "jac/" + sites[-1] + "/outer"} <= set(ref)
    assert set(stats.tensors) == set(ref)
    for key, total in ref.items():
        assert torch.equal(stats.tensors[key], total), key
