"""Activation statistics from `collect` against dense references, plus storage, merge, resume and bad input."""

from __future__ import annotations

import pytest
import torch
from tiny import TL_MAJOR, make_tiny_model, random_tokens

import tl_degeneracy as tld

SITES = ["resid_pre", "resid_mid", "resid_post", "mlp_pre", "mlp_post", "attn_z", "ln_final"]


def dense_reference(model, tokens, mask, sites):
    """n, mean and uncentred Gram from run_with_cache, float64, positions selected by `mask`."""
    _, cache = model.run_with_cache(tokens, names_filter=list(sites))
    out = {}
    for site in sites:
        a = cache[site]
        a = a.flatten(2) if a.ndim == 4 else a
        x = a[mask].double()
        out[site] = (x.shape[0], x.mean(0), x.T @ x / x.shape[0])
    return out


def assert_matches_reference(stats, ref):
    for site, (n, mu, gram) in ref.items():
        assert stats.count(site) == n
        # per-batch products are float32 (SPEC §1): a relative error ~1e-7 per entry; 1e-5 of the scale is ample
        scale = gram.abs().max()
        torch.testing.assert_close(stats.gram(site, centered=False), gram, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(stats.mean(site), mu, rtol=0, atol=1e-5 * mu.abs().max())
        cov = gram - torch.outer(mu, mu)
        torch.testing.assert_close(stats.gram(site), cov, rtol=0, atol=1e-5 * scale)


@pytest.mark.tl3
def test_gram_mean_count_match_run_with_cache_on_tiny_model():
    model = make_tiny_model()
    tokens = random_tokens(7, 12)
    data = tld.token_batches(model, tokens, batch_size=3)
    sites = tld.resolve_sites(model, SITES)
    stats = tld.collect(model, data, sites=sites, progress=False)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    assert_matches_reference(stats, dense_reference(model, tokens, mask, sites))
    assert stats.n_tokens == 7 * 11


@pytest.mark.tl3
def test_gram_matches_reference_on_gpt2_folder_loaded_by_path(tiny_gpt2_path):
    model = tld.load_model(tiny_gpt2_path)
    assert not model.training
    texts = ["def f(x):\n    return x + 1\n", "import os\n", "class A:\n    pass\n" * 3]
    data = tld.token_batches(model, texts, seq_len=16, batch_size=2)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    stats = tld.collect(model, data, sites=sites, progress=False)
    assert_matches_reference(stats, dense_reference(model, data.tokens, data.mask, sites))


@pytest.mark.tl3
def test_bos_and_padding_positions_are_excluded_exactly():
    model = make_tiny_model()
    tokens = random_tokens(4, 10)
    attention = torch.ones_like(tokens, dtype=torch.bool)
    attention[1, 6:] = False  # padding at the end of row 1
    attention[3, 3:] = False
    data = tld.token_batches(model, tokens, batch_size=2, attention_mask=attention)
    expected = attention.clone()
    expected[:, 0] = False
    assert torch.equal(data.mask, expected)
    site = "blocks.1.hook_resid_pre"
    stats = tld.collect(model, data, sites=[site], progress=False)
    assert stats.count(site) == int(expected.sum()) == 9 + 5 + 9 + 2
    assert_matches_reference(stats, dense_reference(model, tokens, expected, [site]))
    with_bos = tld.token_batches(model, tokens, batch_size=2, attention_mask=attention, include_bos=True)
    assert tld.collect(model, with_bos, sites=[site], progress=False).count(site) == int(attention.sum())


@pytest.mark.tl3
def test_left_padding_is_refused_because_the_model_would_attend_to_it():
    model = make_tiny_model()
    tokens = random_tokens(2, 8)
    left = torch.ones_like(tokens, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(tld.BadInputError, match="left padding"):
        tld.token_batches(model, tokens, attention_mask=left)
    right = torch.ones_like(tokens, dtype=torch.bool)
    right[0, 5:] = False
    assert tld.token_batches(model, tokens, attention_mask=right).n_counted == 4 + 7


@pytest.mark.tl3
def test_merge_of_two_runs_equals_one_run_and_save_load_round_trips(tmp_path):
    model = make_tiny_model()
    a, b = random_tokens(4, 12, seed=1), random_tokens(6, 12, seed=2)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    run = lambda t: tld.collect(model, tld.token_batches(model, t, batch_size=2), sites=sites, progress=False)
    merged = run(a).merge(run(b))
    whole = run(torch.cat([a, b]))
    assert merged.n_tokens == whole.n_tokens
    for key, value in whole.tensors.items():
        # float64 totals added in another order: equal to float64 rounding
        torch.testing.assert_close(merged.tensors[key], value, rtol=1e-12, atol=1e-12)
    path = whole.save(tmp_path / "stats.safetensors")
    assert path.with_suffix(".json").exists()
    loaded = tld.Stats.load(path)
    assert loaded.meta == whole.meta
    assert set(loaded.tensors) == set(whole.tensors)
    for key, value in whole.tensors.items():
        assert loaded.tensors[key].dtype == value.dtype
        assert torch.equal(loaded.tensors[key], value)


def test_merge_adds_jacobian_runs_with_other_seeds_but_not_other_metrics():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
    run = lambda **kw: tld.collect(model, data, sites=["blocks.1.hook_resid_pre"], progress=False, **kw)
    a, b = run(jacobian="kl", seed=1), run(jacobian="kl", seed=2, n_probes=3)
    merged = a.merge(b)
    site = "blocks.1.hook_resid_pre"
    total = a.tensors[f"jac/{site}/outer"] + b.tensors[f"jac/{site}/outer"]
    torch.testing.assert_close(merged.tensors[f"jac/{site}/outer"], total, rtol=0, atol=0)
    assert [m["jacobian"]["seed"] for m in merged.meta["merged_from"]] == [1, 2]
    with pytest.raises(tld.IncompatibleStatsError, match="jacobian_metric"):
        a.merge(run(jacobian="mse"))
    with pytest.raises(tld.IncompatibleStatsError):
        a.merge(run())


def test_merge_refuses_other_sites_or_models():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
    a = tld.collect(model, data, sites=["blocks.0.hook_resid_pre"], progress=False)
    b = tld.collect(model, data, sites=["blocks.1.hook_resid_pre"], progress=False)
    with pytest.raises(tld.IncompatibleStatsError, match="sites"):
        a.merge(b)
    other = make_tiny_model(d_model=16, d_head=4)
    c = tld.collect(other, tld.token_batches(other, random_tokens(2, 8), batch_size=2),
                    sites=["blocks.0.hook_resid_pre"], progress=False)
    with pytest.raises(tld.IncompatibleStatsError, match="model"):
        a.merge(c)


class Crash(RuntimeError):
    pass


@pytest.mark.tl3
def test_resume_after_crash_inside_a_hook_equals_uninterrupted_run(tmp_path):
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(10, 12, seed=3), batch_size=2)  # 5 batches
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    whole = tld.collect(model, data, sites=sites, progress=False)

    ckpt = tmp_path / "ckpt.safetensors"
    calls = {"n": 0}

    def crash_at_batch_3(act, hook):
        calls["n"] += 1
        if calls["n"] == 4:  # fourth forward = batch index 3
            raise Crash("simulated crash")

    model.add_hook("blocks.0.hook_resid_pre", crash_at_batch_3)
    with pytest.raises(Crash):
        tld.collect(model, data, sites=sites, checkpoint=ckpt, checkpoint_every=1, progress=False)
    model.reset_hooks()
    partial = tld.Stats.load(ckpt)
    assert partial.meta["batches_done"] == 3
    resumed = tld.collect(model, data, sites=sites, checkpoint=ckpt, resume=True, progress=False)
    assert resumed.meta["batches_done"] == 5 and resumed.n_tokens == whole.n_tokens
    for key, value in whole.tensors.items():
        torch.testing.assert_close(resumed.tensors[key], value, rtol=1e-12, atol=0)


def test_resume_refuses_a_checkpoint_from_other_settings(tmp_path):
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(4, 8), batch_size=2)
    ckpt = tmp_path / "c.safetensors"
    tld.collect(model, data, sites=["blocks.0.hook_resid_pre"], checkpoint=ckpt, progress=False)
    with pytest.raises(tld.IncompatibleStatsError, match="sites"):
        tld.collect(model, data, sites=["blocks.1.hook_resid_pre"], checkpoint=ckpt, resume=True, progress=False)


@pytest.mark.tl3
def test_nan_names_site_and_batch_and_leaves_checkpoint_unchanged(tmp_path):
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(6, 8), batch_size=2)
    site = "blocks.1.hook_resid_pre"
    ckpt = tmp_path / "c.safetensors"
    tld.collect(model, data, sites=[site], checkpoint=ckpt, progress=False)
    before = ckpt.read_bytes()
    calls = {"n": 0}

    def poison_second_batch(act, hook):
        calls["n"] += 1
        if calls["n"] == 2:
            return torch.full_like(act, float("nan"))

    model.add_hook("blocks.0.hook_resid_post", poison_second_batch)
    try:
        with pytest.raises(tld.NonFiniteError, match=r"blocks\.1\.hook_resid_pre.*batch 1"):
            tld.collect(model, data, sites=[site], checkpoint=ckpt, checkpoint_every=1, progress=False)
    finally:
        model.reset_hooks()
    # batch 0 completed and was checkpointed, the poisoned batch 1 was never added
    partial = tld.Stats.load(ckpt)
    assert partial.meta["batches_done"] == 1
    assert partial.count(site) == 2 * 7
    ckpt2 = tmp_path / "untouched.safetensors"
    ckpt2.write_bytes(before)
    calls["n"] = 0
    model.add_hook("blocks.0.hook_resid_post", poison_second_batch)
    try:
        with pytest.raises(tld.NonFiniteError):
            tld.collect(model, data, sites=[site], checkpoint=ckpt2, checkpoint_every=5, progress=False)
    finally:
        model.reset_hooks()
    assert ckpt2.read_bytes() == before


@pytest.mark.tl3
def test_bad_inputs_fail_before_any_batch_runs(tiny_model):
    model = tiny_model
    fired = {"n": 0}
    model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: fired.__setitem__("n", fired["n"] + 1))
    try:
        good = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
        with pytest.raises(tld.UnknownHookError, match="close matches: blocks.0.hook_resid_pre"):
            tld.collect(model, good, sites=["blocks.0.hook_resid_pr"], progress=False)
        with pytest.raises(tld.BadInputError, match="outside the model's vocabulary"):
            tld.token_batches(model, random_tokens(2, 8, vocab=80), batch_size=2)
        with pytest.raises(tld.BadInputError, match="longer than the model's context"):
            tld.token_batches(model, random_tokens(2, 40), batch_size=2)
        with pytest.raises(tld.BadInputError, match="no counted tokens"):
            tld.token_batches(model, random_tokens(3, 1), batch_size=2)
        with pytest.raises(tld.BadInputError, match="jacobian must be"):
            tld.collect(model, good, sites=["resid_pre"], jacobian="l2", progress=False)
        with pytest.raises(tld.BadInputError, match="layers"):
            tld.resolve_sites(model, ["resid_pre"], layers=[5])
        with pytest.raises(tld.BadInputError, match="unknown site kind"):
            tld.resolve_sites(model, ["resid_pree"])
        with pytest.raises(tld.BadInputError, match="token_batches"):
            tld.collect(model, random_tokens(2, 8), sites=["resid_pre"], progress=False)
        assert fired["n"] == 0
    finally:
        model.reset_hooks()


@pytest.mark.tl3
def test_mode_flags_and_user_hooks_are_restored_after_an_exception():
    model = make_tiny_model()
    model.train()
    model.blocks[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    seen = {"n": 0, "training": []}

    def user_hook(act, hook):
        seen["n"] += 1

    def crash(act, hook):
        seen["training"].append(model.training)
        raise Crash("boom")

    model.add_hook("blocks.1.hook_resid_pre", user_hook)
    model.add_hook("blocks.0.hook_resid_post", crash)
    data = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
    with pytest.raises(Crash):
        tld.collect(model, data, sites=["blocks.1.hook_resid_pre"], progress=False)
    assert seen["training"] == [False]  # the run itself was in eval mode
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    model.reset_hooks()  # drop the crash hook, keep checking that the user's own hook survived collect
    model.add_hook("blocks.1.hook_resid_pre", user_hook)
    seen["n"] = 0
    model(random_tokens(1, 4))
    assert seen["n"] == 1
    model.reset_hooks()


@pytest.mark.tl3
def test_layers_after_the_last_site_are_not_computed():
    model = make_tiny_model()
    fired = []
    model.add_hook("blocks.1.hook_resid_pre", lambda act, hook: fired.append("late"))
    try:
        data = tld.token_batches(model, random_tokens(4, 8), batch_size=2)
        tld.collect(model, data, sites=["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"], progress=False)
    finally:
        model.reset_hooks()
    assert fired == []


def test_progress_false_prints_nothing_and_progress_true_shows_tokens(capsys):
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(2, 8), batch_size=2)
    tld.collect(model, data, sites=["resid_pre"], progress=False)
    assert capsys.readouterr().err == ""
    tld.collect(model, data, sites=["resid_pre"], progress=True)
    assert "tok" in capsys.readouterr().err


def test_metadata_records_what_a_reader_needs(tiny_model):
    data = tld.token_batches(tiny_model, random_tokens(2, 8), batch_size=2)
    stats = tld.collect(tiny_model, data, sites=["resid_pre"], seed=7, progress=False)
    meta = stats.meta
    assert meta["model"]["transformer_lens_version"].split(".")[0] == str(TL_MAJOR)
    assert "compatibility_mode" in meta["model"]
    assert meta["sites"] == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert meta["n_tokens"] == 14 and meta["seed"] == 7
    assert meta["library_version"] == tld.__version__
    assert meta["accumulator_dtype"] == "float64"
    assert meta["data"]["n_counted"] == 14
