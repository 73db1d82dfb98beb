"""Head and neuron synchronisation (paper §3.2, eq. 17–22; SPEC §4) against dense references and planted cases.

The oracle is slow and obvious: activations cached with ``run_with_cache`` (explicit names), float64, and
explicit Python loops over every pair of heads / neurons. Planting weights needs the version-specific
parameter layout, which lives here (tests may know TransformerLens majors; the library may not).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TL_MAJOR, make_tiny_model, padded_data

import tl_degeneracy as tld
from tl_degeneracy.analysis.sync import HeadSync, NeuronSync, head_sync, load_sync, neuron_sync
from tl_degeneracy.collection.kernels import neuron_sync_increments
from tl_degeneracy.errors import BadInputError

SITE = "blocks.0.hook_resid_pre"  # collect needs a site; the sync sums are what these tests read


# ---- version-specific weight access (tests only) --------------------------------------------------------
def copy_head_qk(model, layer: int, src: int, dst: int) -> None:
    """Give head ``dst`` the query and key weights of head ``src``: identical attention patterns."""
    attn = model.blocks[layer].attn
    with torch.no_grad():
        if TL_MAJOR >= 4:  # HF-style Linear, weight [n_heads * d_head, d_model]
            d = model.cfg.d_head
            for lin in (attn.q, attn.k):
                lin.weight[dst * d:(dst + 1) * d] = lin.weight[src * d:(src + 1) * d]
                lin.bias[dst * d:(dst + 1) * d] = lin.bias[src * d:(src + 1) * d]
        else:  # W_Q [n_heads, d_model, d_head], b_Q [n_heads, d_head]
            for w in (attn.W_Q, attn.W_K, attn.b_Q, attn.b_K):
                w[dst] = w[src]


def neuron_input(model, layer: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    mlp = model.blocks[layer].mlp
    if TL_MAJOR >= 4:  # Linear "in", weight [d_mlp, d_model]
        lin = getattr(mlp, "in")
        return lin.weight[i].detach().clone(), lin.bias[i].detach().clone()
    return mlp.W_in[:, i].detach().clone(), mlp.b_in[i].detach().clone()  # W_in [d_model, d_mlp]


def set_neuron_input(model, layer: int, i: int, row: torch.Tensor, bias: torch.Tensor | float) -> None:
    mlp = model.blocks[layer].mlp
    with torch.no_grad():
        if TL_MAJOR >= 4:
            lin = getattr(mlp, "in")
            lin.weight[i] = row
            lin.bias[i] = bias
        else:
            mlp.W_in[:, i] = row
            mlp.b_in[i] = bias


# ---- data and dense reference --------------------------------------------------------------------------
#: 8 rows in batches of 3, right padding in rows 1 and 4 (padding never counts)
SYNC_DATA = dict(rows=8, seq=16, batch_size=3, pad_from={1: 9, 4: 5})


def cached(model, data, names):
    """Per counted token: the activations under ``names`` (float64), and per row the key positions counted
    queries can attend to (causal: every position up to the row's last counted query)."""
    out = {n: [] for n in names}
    keys = []
    for batch in data:
        _, cache = model.run_with_cache(batch.tokens, names_filter=list(names))
        for name in names:
            out[name].append((cache[name].double(), batch.mask))
        last = torch.where(batch.mask, torch.arange(batch.mask.shape[1]), -1).amax(dim=1)
        keys.append(torch.arange(batch.mask.shape[1])[None, :] <= last[:, None])
    return out, keys


def dense_head_reference(model, data, layer):
    """D, directed value distance and value Gram by explicit loops over head pairs and counted queries."""
    pat, val = f"blocks.{layer}.attn.hook_pattern", f"blocks.{layer}.attn.hook_v"
    acts, keys = cached(model, data, [pat, val])
    rows_a, rows_v, key_vecs = [], [], []
    for (a, mask), (v, _), kmask in zip(acts[pat], acts[val], keys, strict=True):
        for b in range(mask.shape[0]):
            for q in range(mask.shape[1]):
                if mask[b, q]:
                    rows_a.append(a[b, :, q, :])  # [H, Tk]
                    rows_v.append(v[b])  # [Tk, H, d_head]
            key_vecs.append(v[b][kmask[b]].flatten(1))
    a, v = torch.stack(rows_a), torch.stack(rows_v)  # [N, H, Tk], [N, Tk, H, d_head]
    n_heads = a.shape[1]
    dist = torch.zeros(n_heads, n_heads, dtype=torch.float64)
    value = torch.zeros(n_heads, n_heads, dtype=torch.float64)
    for h in range(n_heads):
        for g in range(n_heads):
            diff = a[:, h] - a[:, g]  # [N, Tk]
            dist[h, g] = (diff**2).sum(1).mean()
            value[h, g] = (torch.einsum("nk,nkd->nd", diff, v[:, :, h]) ** 2).sum(1).mean()
    kv = torch.cat(key_vecs)
    return dist, value, kv.T @ kv / kv.shape[0], a.shape[0]


def dense_neuron_reference(model, data, layer, at_zero):
    """E[i→j] = mean_t ((r_j − r_i) p_i)² by explicit loops over neuron pairs; r = f/p, ``at_zero`` at p = 0."""
    pre, post = f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"
    acts, _ = cached(model, data, [pre, post])
    p = torch.cat([x[m] for x, m in acts[pre]])
    f = torch.cat([x[m] for x, m in acts[post]])
    r = torch.full_like(p, at_zero)
    r[p != 0] = f[p != 0] / p[p != 0]
    d = p.shape[1]
    directed = torch.zeros(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            directed[i, j] = (((r[:, j] - r[:, i]) * p[:, i]) ** 2).mean()
    return directed, (f**2).mean(0), p.T @ p / p.shape[0], p


# ---- tests ---------------------------------------------------------------------------------------------
@pytest.mark.tl3
def test_streamed_head_distances_equal_pairwise_loops_over_cached_patterns():
    model = make_tiny_model("gelu_new")
    data = padded_data(model, **SYNC_DATA)
    stats = tld.collect(model, data, sites=SITE, head_sync=True, progress=False)
    for layer in range(model.cfg.n_layers):
        dist, value, gram, n = dense_head_reference(model, data, layer)
        hs = head_sync(stats, layer)
        assert hs.n_tokens == n == int(data.mask.sum())
        # pattern inner products are float64 sums of float32 patterns: agreement to double rounding
        torch.testing.assert_close(hs.distance, dist, rtol=0, atol=1e-12)
        # value products are float32 (relative rounding ~1e-7 per entry): 1e-5 of the scale is ample
        vscale = float(hs.mean_value_sq.max())
        torch.testing.assert_close(hs.value_distance_directed, value, rtol=0, atol=1e-5 * vscale)
        torch.testing.assert_close(hs.value_distance, torch.maximum(value, value.T), rtol=0, atol=1e-5 * vscale)
        torch.testing.assert_close(hs.value_gram, gram, rtol=0, atol=1e-5 * float(gram.abs().max()))
        assert torch.equal(hs.distance, hs.distance.T) and not bool(hs.distance.diagonal().any())
        assert not torch.equal(hs.value_distance_directed, hs.value_distance_directed.T)  # directed really is


@pytest.mark.tl3
@pytest.mark.parametrize("act_fn", ["relu", "gelu_new"])
def test_streamed_neuron_errors_equal_pairwise_loops_over_cached_activations(act_fn):
    model = make_tiny_model(act_fn)
    data = padded_data(model, **SYNC_DATA)
    stats = tld.collect(model, data, sites=SITE, neuron_sync=True, progress=False)
    for layer in range(model.cfg.n_layers):
        ns = neuron_sync(stats, layer)
        directed, f_sq, gram, p = dense_neuron_reference(model, data, layer, ns.gate_at_zero)
        assert ns.n_tokens == p.shape[0] == int(data.mask.sum())
        # E comes from float32 products whose terms cancel: errors ~1e-7 of the scale E[f²]; 1e-5 is ample
        scale = float(f_sq.max())
        torch.testing.assert_close(ns.directed, directed, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(ns.distance, torch.maximum(directed, directed.T), rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(ns.mean_f_sq, f_sq, rtol=1e-6, atol=0)
        torch.testing.assert_close(ns.pre_gram, gram, rtol=0, atol=1e-5 * float(gram.abs().max()))
        norm = ns.distance / torch.sqrt(f_sq[:, None] * f_sq[None, :])
        torch.testing.assert_close(ns.normalized_distance, norm.fill_diagonal_(0), rtol=1e-4, atol=1e-4)
        assert torch.equal(ns.distance, ns.distance.T) and not bool(ns.distance.diagonal().any())


@pytest.mark.tl3
def test_heads_with_identical_query_key_weights_form_one_block_with_hand_counted_dofs():
    model = make_tiny_model("relu")
    copy_head_qk(model, 0, src=0, dst=1)
    data = padded_data(model, **SYNC_DATA)
    stats = tld.collect(model, data, sites=SITE, head_sync=True, sync_layers=[0], progress=False)
    hs = head_sync(stats, 0)
    # identical float32 patterns up to rounding (≤1e-6 per entry) give D ≲ T·1e-12
    assert float(hs.distance[0, 1]) < 1e-10
    assert float(hs.value_distance[0, 1]) < 1e-10 * float(hs.mean_value_sq.max())
    others = [hs.distance[h, g] for h in range(4) for g in range(h + 1, 4) if (h, g) != (0, 1)]
    assert min(others) > 1e-3  # random heads attend differently
    tau = 1e-8
    assert hs.blocks(tau) == [[0, 1], [2], [3]]
    d_head = model.cfg.d_head
    # hand count: every head's values are full rank (r_h = d_head) and the pair's stacked values span
    # 2·d_head ≤ d_model − 1 directions, so total = (2 d_head)² + 2 d_head², extra = 2 d_head² (SPEC §4)
    dof = hs.dof(tau)
    assert dof.ranks == [2 * d_head, d_head, d_head]
    assert dof.generic == 4 * d_head**2
    assert dof.total == (2 * d_head) ** 2 + 2 * d_head**2
    assert dof.extra == 2 * d_head**2


@pytest.mark.tl3
def test_relu_duplicated_and_always_on_neurons_form_blocks_with_hand_counted_dofs():
    model = make_tiny_model("relu")
    layer = 1
    data = padded_data(model, **SYNC_DATA)
    pre = f"blocks.{layer}.mlp.hook_pre"
    before = torch.cat([c[pre][b.mask] for b in data for c in [model.run_with_cache(b.tokens,
                                                                                    names_filter=[pre])[1]]])
    row, bias = neuron_input(model, layer, 0)
    # neuron 1 = 0.37 × neuron 0, so p_1 = 0.37 p_0 up to float32 rounding (a factor that is not a power of two
    # leaves rounding noise, ~3e-8 of the block's largest Gram eigenvalue here, that the rank tolerance must absorb)
    set_neuron_input(model, layer, 1, 0.37 * row, 0.37 * bias)
    for i in (2, 3, 4):  # shift so p_i ∈ [max|p_i|, 3 max|p_i|]: always on, r_i ≡ 1, still independent
        row_i, bias_i = neuron_input(model, layer, i)
        set_neuron_input(model, layer, i, row_i, bias_i + 2 * before[:, i].abs().max())
    stats = tld.collect(model, data, sites=SITE, neuron_sync=True, sync_layers=[layer], progress=False)
    ns = neuron_sync(stats, layer)
    d_mlp = model.cfg.d_mlp
    # a neuron that already fires on every token of this small data set joins the always-on block
    on = [2, 3, 4] + [i for i in range(5, d_mlp) if bool((before[:, i] > 0).all())]
    assert not bool((before[:, 0] > 0).all()) and len(on) < 10
    assert bool((ns.mean_f_sq > 0).all())  # no dead neuron (two dead neurons would be synchronised too)
    nd = ns.normalized_distance
    planted = {(0, 1)} | {(i, j) for i in on for j in on if i < j}
    # synchronised pairs: equal gates, so E vanishes up to float32 cancellation (~1e-7 of E[f²])
    assert max(float(nd[i, j]) for i, j in planted) < 1e-6
    others = [float(nd[i, j]) for i in range(d_mlp) for j in range(i + 1, d_mlp) if (i, j) not in planted]
    assert min(others) > 1e-3
    tau = 1e-5
    blocks = ns.blocks(tau, measure="normalized_distance")
    assert blocks == sorted([[0, 1], on] + [[i] for i in range(2, d_mlp) if i not in on])
    # hand count (eq. 21–22): s = 1 for the duplicate (p_1 ∝ p_0), |on| for the always-on block (independent
    # preactivations), 1 for every other neuron; generic = one per live neuron
    k = len(on)
    dof = ns.dof(tau, measure="normalized_distance")
    assert sorted(dof.ranks) == sorted([1, k] + [1] * (d_mlp - 2 - k))
    assert dof.total == 1 + k**2 + (d_mlp - 2 - k)
    assert dof.generic == d_mlp
    assert dof.extra == k**2 - k - 1


@pytest.mark.tl3
def test_gelu_exact_zero_preactivation_uses_half_gate_and_never_nan():
    model = make_tiny_model("gelu_new")
    layer = 0
    row, _ = neuron_input(model, layer, 0)
    set_neuron_input(model, layer, 0, torch.zeros_like(row), 0.0)  # p_0 ≡ 0 exactly, f_0 = GELU(0) = 0
    data = padded_data(model, **SYNC_DATA)
    stats = tld.collect(model, data, sites=SITE, neuron_sync=True, sync_layers=[layer], progress=False)
    ns = neuron_sync(stats, layer)
    assert ns.gate_at_zero == 0.5
    for m in (ns.directed, ns.distance, ns.normalized_distance):
        assert not bool(m.isnan().any())
    assert not bool(ns.directed[0].any())  # E[0→j] = mean ((r_j − r_0)·0)² = 0 exactly
    # E[j→0] = mean ((½ − r_j) p_j)², with the gate ½ at p = 0 written out here, not taken from the library
    pre, post = f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"
    acts, _ = cached(model, data, [pre, post])
    p = torch.cat([x[m] for x, m in acts[pre]])
    f = torch.cat([x[m] for x, m in acts[post]])
    assert bool((p[:, 0] == 0).all())
    expected = (((0.5 - f[:, 1:] / p[:, 1:]) * p[:, 1:]) ** 2).mean(0)
    torch.testing.assert_close(ns.directed[1:, 0], expected, rtol=0, atol=1e-5 * float((f**2).mean(0).max()))
    assert math.isinf(float(ns.normalized_distance[0, 1]))  # D > 0 against a neuron with E[f²] = 0
    assert ns.block_rank([0]) == 0 and ns.dof(0.0).generic == model.cfg.d_mlp - 1


def test_gate_at_exact_zero_follows_each_activation_convention():
    p = torch.tensor([[[0.0, 2.0, -1.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    cases = ((torch.relu(p), 1.0, False), (torch.relu(p), 1.0, True), (torch.nn.functional.gelu(p), 0.5, False))
    for f, at_zero, binary in cases:  # ReLU also through the one-product path for gates in {0, 1}
        inc = neuron_sync_increments(p, f, mask, at_zero, binary_gates=binary)
        r = torch.tensor([at_zero, float(f[0, 0, 1] / 2.0), float(f[0, 0, 2] / -1.0)], dtype=torch.float64)
        pp = p[0, 0].double()
        # n·E[i→j] = (cross + f_sq)[i, j] against ((r_j − r_i) p_i)² written out, float32 products
        expected = ((r[None, :] - r[:, None]) * pp[:, None]) ** 2
        torch.testing.assert_close(inc["cross"].double() + inc["f_sq"][:, None], expected, rtol=0, atol=1e-6)


def test_single_linkage_blocks_equal_components_of_threshold_graph():
    gen = torch.Generator().manual_seed(1)
    n = 40
    directed = torch.rand(n, n, generator=gen, dtype=torch.float64) ** 4
    ns = NeuronSync(layer=0, n_tokens=1, gate_at_zero=1.0, directed=directed,
                    mean_f_sq=torch.ones(n, dtype=torch.float64), pre_gram=torch.eye(n, dtype=torch.float64))
    d = ns.distance
    for tau in [0.0, 1e-4, 1e-3, 5e-3, 2e-2, 0.1, 1.0]:
        adjacency = d <= tau
        seen, comps = set(), []
        for start in range(n):  # breadth-first search on {D ≤ τ}
            if start in seen:
                continue
            comp, frontier = {start}, [start]
            while frontier:
                u = frontier.pop()
                for v in adjacency[u].nonzero().flatten().tolist():
                    if v not in comp:
                        comp.add(v)
                        frontier.append(v)
            seen |= comp
            comps.append(sorted(comp))
        assert ns.blocks(tau) == comps
        # identity Gram: every block of k neurons has rank k, so Σ_S r_S² = Σ_S |S|²
        assert ns.dof(tau).total == sum(len(c) ** 2 for c in comps)


@pytest.mark.tl3
def test_sweep_agrees_with_dof_and_ends_in_one_block():
    model = make_tiny_model("relu")
    data = padded_data(model, **SYNC_DATA)
    stats = tld.collect(model, data, sites=SITE, head_sync=True, neuron_sync=True, sync_layers=[1], progress=False)
    for result, measure in ((head_sync(stats, 1), "value_distance"), (neuron_sync(stats, 1), "normalized_distance")):
        sw = result.sweep(measure=measure)
        assert float(sw.taus[0]) == 0.0 and bool((sw.taus[1:] > 0).all())
        assert bool((sw.n_blocks[:-1] >= sw.n_blocks[1:]).all()) and int(sw.n_blocks[-1]) == 1
        for tau, n_blocks, total in zip(sw.taus.tolist(), sw.n_blocks.tolist(), sw.dof_total.tolist(), strict=True):
            dof = result.dof(tau, measure=measure)
            assert (len(dof.blocks), dof.total, dof.extra) == (n_blocks, total, total - sw.generic)
        assert sw.to_dict()["n_blocks"] == sw.n_blocks.tolist()


@pytest.mark.tl3
def test_missing_sums_name_the_collect_flag(tmp_path):
    model = make_tiny_model("relu")
    data = padded_data(model, **SYNC_DATA)
    plain = tld.collect(model, data, sites=["resid_pre"], progress=False)
    with pytest.raises(BadInputError, match="head_sync=True"):
        head_sync(plain, 0)
    with pytest.raises(BadInputError, match="neuron_sync=True"):
        neuron_sync(plain, 0)
    some = tld.collect(model, data, sites=SITE, head_sync=True, neuron_sync=True, sync_layers=[1], progress=False)
    with pytest.raises(BadInputError, match=r"collected layers are \[1\]"):
        neuron_sync(some, 0)
    # saved statistics give the same analysis; a result saves and loads back
    path = some.save(tmp_path / "stats.safetensors")
    hs = head_sync(tld.Stats.load(path), 1)
    assert torch.equal(hs.distance, head_sync(some, 1).distance)
    back = load_sync(hs.save(tmp_path / "hs"))
    assert back["layer"] == 1 and torch.equal(back["normalized_value_distance"], hs.normalized_value_distance)
    ns = neuron_sync(some, 1)
    again = NeuronSync.load(ns.save(tmp_path / "ns"))
    assert torch.equal(again.normalized_distance, ns.normalized_distance)
    assert again.dof(1e-3).to_dict() == ns.dof(1e-3).to_dict()
    with pytest.raises(BadInputError, match="not a HeadSync"):
        HeadSync.load(tmp_path / "ns.safetensors")


@pytest.mark.tl3
def test_non_elementwise_activation_is_refused_before_running():
    model = make_tiny_model("solu_ln")
    with pytest.raises(BadInputError, match="act_fn"):
        tld.collect(model, padded_data(model, **SYNC_DATA), sites=SITE, neuron_sync=True, progress=False)
