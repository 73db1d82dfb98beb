"""Edge ablation on the interaction graph and edges needed (issue 19, "Edge ablation").

References are slow and obvious: explicit loops over output nodes, sources, sequences and positions computing
the patched activation and the KL, ``torch.func.jacrev`` of the hooked map for the linearisation, a linear
scan over every number of kept edges. Models are float64 so only summation order separates fast and slow.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from tiny import TINY, make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.collection.edge_ablation import keep_mask, patched_activation

pytestmark = pytest.mark.tl3

BLOCK = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")  # a whole block: attention, MLP, nonlinear
AFFINE = ("blocks.0.mlp.hook_post", "blocks.0.hook_resid_post")  # b = resid_mid + a W_out + b_out: affine in a
LOGITS = ("ln_final.hook_normalized", "unembed.hook_out")  # logits = a W_U + b_U: affine, and the last site


def _model64(**kw):
    return make_tiny_model(**kw).to(torch.float64)


def _data(model, rows=3, seq=6, seed=0):
    tokens = random_tokens(rows, seq, seed=seed)
    mask = torch.ones(rows, seq, dtype=torch.bool)
    mask[0, -2:] = False  # right padding: positions that neither count nor move
    return tld.token_batches(model, tokens, batch_size=2, attention_mask=mask)


def _basis(C_pinv, mean, kind="test"):
    C = torch.linalg.pinv(C_pinv)
    return types.SimpleNamespace(C=C, C_pinv=C_pinv, mean=mean, kind=kind, dim=C.shape[0],
                                 lambdas=torch.ones(C.shape[0], dtype=torch.float64))


def _random_basis(d, k, seed, kind="test"):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, k, generator=g, dtype=torch.float64)
    return _basis(P, torch.randn(d, generator=g, dtype=torch.float64) * 0.1, kind)


def _width(site):
    if site == LOGITS[1]:
        return TINY["d_vocab"]
    return TINY["d_mlp"] if ".mlp." in site else TINY["d_model"]


def _run(model, tokens, fwd_hooks, site=None):
    box = {}
    hooks = list(fwd_hooks)
    if site is not None:
        hooks.append((site, lambda act, hook: box.__setitem__("x", act.detach().clone())))
    with model.hooks(fwd_hooks=hooks), torch.no_grad():
        logits = model(tokens)
    return logits, box.get("x")


def _reference_kl(model, data, pair, ba, bb, keep):
    """Explicit loops: for each output node j, A rebuilt position by position from its kept sources only
    (others at the mean), B's coordinate j read off; b̃ = b + C_B⁺(F̃ − F); the KL summed position by position."""
    a_site, b_site = pair
    total, n = 0.0, 0
    for batch in data:
        tokens, mask = batch.tokens, batch.mask
        ref_logits, a0 = _run(model, tokens, [], a_site)
        _, b0 = _run(model, tokens, [], b_site)
        B, T, _ = a0.shape
        f = torch.zeros(B, T, ba.C.shape[0], dtype=torch.float64)
        r = a0.clone()
        for s in range(B):
            for t in range(T):
                if mask[s, t]:
                    f[s, t] = ba.C @ (a0[s, t] - ba.mean)
                    r[s, t] = a0[s, t] - ba.mean - ba.C_pinv @ f[s, t]
        F_new = torch.zeros(B, T, bb.C.shape[0], dtype=torch.float64)
        for j in range(bb.C.shape[0]):
            a_j = a0.clone()
            for s in range(B):
                for t in range(T):
                    if mask[s, t]:
                        v = ba.mean + r[s, t]
                        for i in range(ba.C.shape[0]):
                            if keep[i, j]:
                                v = v + f[s, t, i] * ba.C_pinv[:, i]
                        a_j[s, t] = v
            _, b_j = _run(model, tokens, [(a_site, lambda act, hook, a_j=a_j: a_j)], b_site)
            for s in range(B):
                for t in range(T):
                    F_new[s, t, j] = bb.C[j] @ (b_j[s, t] - bb.mean)
        b_new = b0.clone()
        for s in range(B):
            for t in range(T):
                if mask[s, t]:
                    F_old = bb.C @ (b0[s, t] - bb.mean)
                    b_new[s, t] = b0[s, t] + bb.C_pinv @ (F_new[s, t] - F_old)
        new_logits, _ = _run(model, tokens, [(b_site, lambda act, hook, b_new=b_new: b_new)])
        for s in range(B):
            for t in range(T):
                if mask[s, t]:
                    p = torch.log_softmax(ref_logits[s, t].double(), -1)
                    q = torch.log_softmax(new_logits[s, t].double(), -1)
                    total += float((p.exp() * (p - q)).sum())
                    n += 1
    return total / n


def _graph(pair, E, kinds=None):
    return tld.InteractionGraph(sites=list(pair), edges={tuple(pair): E},
                                meta={"basis_kinds": kinds} if kinds else {})


@pytest.mark.parametrize("pair", [BLOCK, LOGITS], ids=["block", "logits"])
def test_edge_ablation_matches_a_brute_force_loop(pair):
    model = _model64()
    data = _data(model)
    a, b = pair
    ba, bb = _random_basis(_width(a), 4, seed=1), _random_basis(_width(b), 3, seed=2)
    E = torch.rand(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = [0, 5, 11, 12]
    curve = tld.edge_ablation_curve(model, data, {a: ba, b: bb}, _graph(pair, E), pair=pair, keep=keep,
                                    progress=False)
    ref = torch.tensor([_reference_kl(model, data, pair, ba, bb, keep_mask(E, k)) for k in keep],
                       dtype=torch.float64)
    assert curve.loss[0] > 1e-4  # removing every edge moves the output: the comparison can fail
    # float64 throughout: summation order only (KL values ~1e-2, differences ~1e-16)
    torch.testing.assert_close(curve.loss, ref, rtol=1e-8, atol=1e-13)
    assert curve.loss[-1] == 0  # every edge kept: b̃ = b exactly


def test_keep_mask_keeps_the_strongest_edges_with_ties_by_index():
    E = torch.tensor([[1.0, 3.0, 0.0], [2.0, 3.0, 0.0]], dtype=torch.float64)
    assert keep_mask(E, 0).sum() == 0 and keep_mask(E, 6).all()
    assert keep_mask(E, 1).tolist() == [[False, True, False], [False, False, False]]  # tie 3, 3: first index
    assert keep_mask(E, 3).tolist() == [[False, True, False], [True, True, False]]
    assert keep_mask(E, 5).tolist() == [[True, True, True], [True, True, False]]
    for n in range(7):
        assert int(keep_mask(E, n).sum()) == n


def _linearised(model, tokens, mask, pair, ba, bb, keep):
    """F̃ = F − Σ_{removed i→j} Σ_{t_in} (C_B J C_A⁺)_{ji} f̂_i, with J = jacrev of the hooked map a → b."""
    a_site, b_site = pair
    _, a0 = _run(model, tokens, [], a_site)
    _, b0 = _run(model, tokens, [], b_site)

    J = torch.func.jacrev(lambda x: _grab(model, tokens, a_site, b_site, x))(a0)  # [B, T, dB, B, T, dA]
    m = mask[:, :, None].double()
    f = ((a0 - ba.mean) @ ba.C.T) * m
    # contribution of source i (all its positions) to output node j at (s, t_out)
    contrib = torch.einsum("jd,stdsue,ei,sui->stji", bb.C, J, ba.C_pinv, f)
    F = (b0 - bb.mean) @ bb.C.T
    removed = (~keep).T.double()  # [k_B, k_A]
    F_new = F - (contrib * removed).sum(-1)
    return b0, torch.where(mask[:, :, None], b0 + (F_new - F) @ bb.C_pinv.T, b0)


def _grab(model, tokens, a_site, b_site, a_new):
    box = {}

    def grab(act, hook):
        box["b"] = act

    with model.hooks(fwd_hooks=[(a_site, lambda act, hook: a_new), (b_site, grab)]):
        model(tokens)
    return box["b"]


def test_patching_is_exact_for_a_map_affine_in_a():
    """mlp_post → resid_post is affine in mlp_post: patching = subtracting the removed edges' linear
    contributions (over every input position), to float64 rounding; on the nonlinear block it is not."""
    model = _model64()
    batch = next(iter(_data(model)))
    E = torch.rand(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    keep = keep_mask(E, 9)
    adapter = tld.ModelAdapter(model)
    for pair, exact in ((AFFINE, True), (LOGITS, True), (BLOCK, False)):
        ba, bb = _random_basis(_width(pair[0]), 5, seed=5), _random_basis(_width(pair[1]), 4, seed=6)
        b0, patched = patched_activation(adapter, batch.tokens, batch.mask, *pair, ba, bb, keep)
        _, lin = _linearised(model, batch.tokens, batch.mask, pair, ba, bb, keep)
        assert (patched - b0).abs().max() > 1e-3  # the ablation does something
        close = torch.allclose(patched, lin, rtol=1e-9, atol=1e-11)
        assert close == exact, pair


def test_removing_zero_weight_edges_changes_nothing():
    """On the affine pair, A directions in the null space of C_B W_out give edges of weight exactly zero:
    direction 0 talks to no output node, direction 1 only to output node 0. Removing exactly those edges leaves
    the loss at zero; removing one more (the weakest nonzero edge) does not."""
    model = _model64()
    data = _data(model)
    a, b = AFFINE
    bb = _random_basis(_width(b), 3, seed=7)
    # C_B J_{B←A} at one position is C_B W_outᵀ, the same at every position: read it through the hooked map
    # (no weight names, which differ between the majors)
    batch = next(iter(data))
    _, a0 = _run(model, batch.tokens, [], a)
    J = torch.func.jacrev(lambda x: _grab(model, batch.tokens, a, b, x))(a0)[0, 0, :, 0, 0, :]  # [d_model, d_mlp]
    CW = bb.C @ J  # [k_B, d_mlp]
    null_all = torch.linalg.svd(CW).Vh[3:].T  # directions no output node reads
    null_0 = torch.linalg.svd(CW[1:]).Vh[2:].T  # directions output nodes 1 and 2 do not read
    g = torch.Generator().manual_seed(8)
    P = torch.cat([null_all[:, :1], null_0[:, :1] - null_all @ (null_all.T @ null_0[:, :1]),
                   torch.randn(_width(a), 2, generator=g, dtype=torch.float64)], 1)  # [d_mlp, 4]
    ba = _basis(P, torch.zeros(_width(a), dtype=torch.float64))
    bases = {a: ba, b: bb}
    graph = tld.interaction_graph(model, data, bases, [a, b], method="gradient")
    E = graph.edges[(a, b)]
    zero = E <= 1e-24 * E.max()  # float64 rounding of an exact zero
    assert zero[0].all() and zero[1, 1:].all() and int(zero.sum()) == 5, E
    n_nonzero = int((~zero).sum())
    curve = tld.edge_ablation_curve(model, data, bases, graph, keep=[n_nonzero, n_nonzero - 1, E.numel()],
                                    progress=False)
    # zero edges removed: unchanged to the float64 floor of the KL itself (Σ p·(log p − log q) with log q − log p
    # rounded at ~1e-16; measured 1.7e-17); every edge kept: exactly unchanged
    assert curve.loss[0] < 1e-14 and curve.loss[2] == 0
    assert curve.loss[1] > 1e-8  # the weakest nonzero edge removed: changed (measured 4e-6), so the test can fail


def test_keeping_every_edge_reproduces_the_unablated_model():
    model = make_tiny_model()  # float32, as users run it
    data = _data(model)
    a, b = BLOCK
    ba, bb = _random_basis(_width(a), 6, seed=1), _random_basis(_width(b), 5, seed=2)
    bases = {a: types.SimpleNamespace(**{**vars(ba), "C": ba.C.float(), "C_pinv": ba.C_pinv.float(),
                                          "mean": ba.mean.float()}),
             b: types.SimpleNamespace(**{**vars(bb), "C": bb.C.float(), "C_pinv": bb.C_pinv.float(),
                                          "mean": bb.mean.float()})}
    E = torch.rand(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for loss in ("kl", "ce", "top1"):
        curve = tld.edge_ablation_curve(model, data, bases, _graph(BLOCK, E), keep=[30, 0], loss=loss,
                                        progress=False)
        assert curve.loss[0] == 0 and curve.loss[1] != 0, loss
        assert curve.n_total == 30 and curve.keep == [30, 0]


def _scan(curve, tolerance):
    """Linear scan: the smallest n such that every n' ≥ n keeps the loss within the tolerance."""
    best = None
    for k, v in sorted(zip(curve.keep, curve.loss.tolist(), strict=True), reverse=True):
        if v > tolerance:
            break
        best = k
    return best


def test_edges_needed_bisection_equals_a_linear_scan():
    model = _model64()
    data = _data(model)
    a, b = BLOCK
    bases = {a: _random_basis(_width(a), 3, seed=11, kind="pca"), b: _random_basis(_width(b), 3, seed=12, kind="pca")}
    graph = tld.interaction_graph(model, data, bases, [a, b], method="gradient")
    n = graph.edges[BLOCK].numel()
    curve = tld.edge_ablation_curve(model, data, bases, graph, keep=list(range(n + 1)), progress=False)
    values = sorted(set(curve.loss.tolist()))
    tolerances = [0.0] + [(x + y) / 2 for x, y in zip(values, values[1:], strict=False)] + [values[-1] * 2]
    for tol in tolerances:
        needed = tld.edges_needed(model, data, bases, graph, tolerance=tol, progress=False)
        assert needed.n_edges == _scan(curve, tol), (tol, curve.loss)
        assert len(needed.probed) <= math.ceil(math.log2(n + 1))
        assert needed.kind == "pca" and needed.n_total == n
        # the probes' losses are the curve's (same ablation, same data)
        torch.testing.assert_close(needed.loss, curve.loss[needed.probed], rtol=1e-12, atol=0)


def test_results_round_trip(tmp_path):
    model = _model64()
    data = _data(model)
    a, b = BLOCK
    bases = {a: _random_basis(_width(a), 2, seed=1), b: _random_basis(_width(b), 2, seed=2)}
    E = torch.rand(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    curve = tld.edge_ablation_curve(model, data, bases, _graph(BLOCK, E), keep=[0, 4], progress=False)
    needed = tld.edges_needed(model, data, bases, _graph(BLOCK, E), tolerance=1e-3, progress=False)
    back = tld.EdgeAblationCurve.load(curve.save(tmp_path / "curve"))
    assert (back.pair, back.keep, back.n_total, back.kind) == (curve.pair, curve.keep, 4, "test")
    assert torch.equal(back.loss, curve.loss)
    back = tld.EdgesNeeded.load(needed.save(tmp_path / "needed"))
    assert (back.n_edges, back.probed, back.tolerance, back.fraction) == (needed.n_edges, needed.probed, 1e-3,
                                                                          needed.n_edges / 4)
    assert torch.equal(back.loss, needed.loss)
    with pytest.raises(tld.BadInputError, match="not an EdgesNeeded"):
        tld.EdgesNeeded.load(tmp_path / "curve")


def test_bad_input_is_refused_before_any_forward():
    model = _model64()
    data = _data(model)
    a, b = BLOCK
    bases = {a: _random_basis(_width(a), 3, seed=1, kind="pca"), b: _random_basis(_width(b), 2, seed=2, kind="pca")}
    E = torch.rand(3, 2, dtype=torch.float64)
    graph = _graph(BLOCK, E, kinds={a: "pca", b: "pca"})
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    cases = [
        (dict(graph=graph, pair=(b, a)), "not a pair of this graph"),
        (dict(graph=E), "must be a tld.InteractionGraph"),
        (dict(graph=graph, bases={a: bases[a]}), "with both"),
        (dict(graph=_graph(BLOCK, torch.rand(3, 3, dtype=torch.float64))), "graph has 3 nodes"),
        (dict(graph=graph, bases={**bases, a: _random_basis(_width(a), 3, seed=1, kind="local")}),
         "computed in 'pca' bases"),
        (dict(graph=graph, loss="mse"), "loss must be one of"),
        (dict(graph=graph, tolerance=-1.0), "tolerance must be"),
        (dict(graph=graph, tolerance=float("nan")), "tolerance must be"),
        (dict(graph=graph, keep=[7]), "out of range"),
        (dict(graph=_graph(("blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"), E)), "forward order"),
    ]
    for kw, match in cases:
        kw = {"bases": bases, **kw}
        fn = tld.edges_needed if "tolerance" in kw else tld.edge_ablation_curve
        if fn is tld.edge_ablation_curve:
            kw.pop("tolerance", None)
        with pytest.raises(tld.BadInputError, match=match):
            fn(model, data, progress=False, **kw)
    with pytest.raises(tld.BadInputError, match="site pairs"):
        three = tld.InteractionGraph(sites=[a, b, "blocks.1.hook_resid_post"],
                                     edges={(a, b): E, (b, "blocks.1.hook_resid_post"): torch.rand(2, 2)})
        tld.edges_needed(model, data, bases, three, tolerance=0.1, progress=False)
    assert not calls


def test_graph_stage_reports_edges_needed_per_basis_and_resumes(tmp_path, tiny_gpt2_path):
    from tl_degeneracy._io import json_safe, write_json
    from tl_degeneracy.run import report
    from tl_degeneracy.run.layout import RunFolder
    from tl_degeneracy.run.pipeline import RunConfig, _graph_settings, _marker_path, read_marker, run_stages

    cfg = RunConfig(model=tiny_gpt2_path, n_tokens=120, seq_len=16, batch_size=4, graph_n_tokens=60,
                    sites=("resid_pre",), sync=False, device="cpu", ablate_tolerance=0.01)
    out = tmp_path / "run"
    run_stages(cfg, out, ["stats", "graph"], progress=False)
    summary = read_marker(out, "graph")["summary"]["edges_needed"]
    assert summary["pair"] == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert set(summary["kinds"]) == {"local", "interaction", "pca"} and summary["tolerance"] == 0.01
    saved = RunFolder(out).saved_edges_needed()
    assert set(saved) == {"local", "interaction", "pca"}
    for kind, path in saved.items():
        needed = tld.EdgesNeeded.load(path)
        assert needed.kind == kind and needed.n_edges == summary["kinds"][kind]["n_edges"]
        assert 0 <= needed.n_edges <= needed.n_total
        # the bisection's bracket: the answer meets the tolerance, one fewer edge does not (when measured)
        probes = dict(zip(needed.probed, needed.loss.tolist(), strict=True))
        assert needed.n_edges == needed.n_total or probes[needed.n_edges] <= 0.01
        assert needed.n_edges == 0 or probes[needed.n_edges - 1] > 0.01
    rows = report.summary_rows(report.load_results(out))
    first = next(r for r in rows if r["site"] == "blocks.0.hook_resid_pre")
    assert first["lib_edges_needed"] == summary["kinds"]["local"]["n_edges"]
    assert first["pca_edges_needed"] == summary["kinds"]["pca"]["n_edges"]
    assert list(report.SUMMARY_COLUMNS)[-4:] == ["lib_edges_needed", "ib_edges_needed", "pca_edges_needed",
                                                "edges_total"]
    run_stages(cfg, out, ["report"], progress=False)
    assert "Edges needed on blocks.0.hook_resid_pre" in (out / "index.md").read_text()

    # an interrupted stage (no marker, a progress folder with its identity) resumes: finished parts are loaded
    progress = RunFolder(RunFolder(out).progress("graph"))
    progress.graph.mkdir(parents=True)
    write_json(progress.graph_identity, json_safe({"settings": _graph_settings(cfg),
                                                   "stats": read_marker(out, "stats")["id"]}))
    for kind, path in saved.items():
        tld.EdgesNeeded.load(path).save(progress.edges_needed(kind))
    _marker_path(out, "graph").unlink()
    logs = []
    run_stages(cfg, out, ["graph"], progress=False, log=logs.append)
    assert sum("done before the interruption" in m for m in logs) == 3
    assert read_marker(out, "graph")["summary"]["edges_needed"] == summary
    assert not progress.root.exists()  # discarded once the stage finished


def test_stacking_output_nodes_in_chunks_changes_nothing():
    """Output nodes with distinct source sets run stacked along the batch; one per forward gives the same b̃."""
    model = _model64()
    batch = next(iter(_data(model)))
    ba, bb = _random_basis(_width(BLOCK[0]), 4, seed=1), _random_basis(_width(BLOCK[1]), 5, seed=2)
    keep = keep_mask(torch.rand(4, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 8)
    adapter = tld.ModelAdapter(model)
    _, stacked = patched_activation(adapter, batch.tokens, batch.mask, *BLOCK, ba, bb, keep)
    _, single = patched_activation(adapter, batch.tokens, batch.mask, *BLOCK, ba, bb, keep, tokens_per_chunk=1)
    torch.testing.assert_close(stacked, single, rtol=1e-12, atol=1e-12)
