"""The behavioral-loss LLC of a TransformerLens model (SPEC §5): selections, masks, state, scale sweep.

Tiny random models (tiny.make_tiny_model: 2 layers, d_model 32, 4 heads of 8, vocabulary 50), a few
hundred SGLD steps: enough to order estimates that differ by large factors, not to pin values.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TL_MAJOR, make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.adapter import FunctionalModel, parameter_masks, parameter_selections
from tl_degeneracy.adapter.params import _tl_parameters
from tl_degeneracy.errors import BadInputError, SamplerDivergedError
from tl_degeneracy.llc.behavioral import LLCScaleSweep, behavioral_loss, estimate_llc, llc_scale_sweep

# nβ = 1000, γ = 100, ε = 1e-4 on these models: MALA acceptance 0.75–0.95, ε̂ ≈ 0.02–0.2.
SGLD = dict(nbeta=1000.0, step_size=1e-4, localization=100.0, n_chains=3, progress=False)




@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def data(model):
    return tld.token_batches(model, random_tokens(16, 16), batch_size=8)


def _snapshot(model):
    return {
        "params": [
            (m, n, p, p.detach().clone(), p.requires_grad, p.device)
            for m in model.modules()
            for n, p in m._parameters.items()
            if p is not None
        ],
        "modes": [(m, m.training) for m in model.modules()],
    }


def _assert_untouched(model, snap):
    for m, name, p, value, flag, device in snap["params"]:
        assert m._parameters[name] is p  # the same Parameter object, not a stand-in
        assert torch.equal(p.detach(), value) and p.requires_grad == flag and p.device == device
        assert p.grad is None  # no weight gradient was ever accumulated
    assert all(m.training == mode for m, mode in snap["modes"])


@pytest.mark.tl3
def test_kl_loss_is_zero_at_the_original_weights_and_positive_elsewhere(model, data):
    fm = FunctionalModel(model)
    values = {k: p.detach() for k, p in fm.parameters.items()}
    batch = next(iter(_teacher(model, data, "kl")))
    assert float(behavioral_loss(fm(values, batch.tokens), batch, "kl")) == pytest.approx(0.0, abs=1e-6)
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in values.items()}
    assert float(behavioral_loss(fm(moved, batch.tokens), batch, "kl")) > 1e-4
    # The functional forward at the model's own values is the model's forward.
    torch.testing.assert_close(fm(values, batch.tokens), model(batch.tokens))


def _teacher(model, data, loss):
    from tl_degeneracy.adapter import ModelAdapter
    from tl_degeneracy.llc.behavioral import _TeacherBatches

    return _TeacherBatches(ModelAdapter(model), data, loss, cache=True)


def test_one_layer_has_a_smaller_llc_than_all_parameters(model, data):
    # Sampling a subset of the parameters can only shrink λ̂: for a quadratic loss the restricted
    # Hessian's eigenvalues interlace the full one's and Σ nβh/(nβh + γ) is monotone. The chains are not
    # at equilibrium after 80 steps (both estimates still rise), but at every step the gap is a factor ≈ 2:
    # 89 ± 2 against 202 ± 8 here, 107 ± 4 against 212 ± 3 after 150 steps.
    layer = estimate_llc(model, data, params="blocks.1", n_steps=80, n_burnin=40, **SGLD)
    everything = estimate_llc(model, data, params="all", n_steps=80, n_burnin=40, **SGLD)
    spread = math.hypot(layer.llc_std, everything.llc_std)
    assert layer.llc_mean + 3 * spread < everything.llc_mean, (layer.llc_mean, everything.llc_mean, spread)
    assert layer.diagnostics["n_sampled_entries"] < everything.diagnostics["n_sampled_entries"]
    assert everything.settings["loss"] == "kl" and everything.settings["params"] == "all"
    assert everything.loss_at_optimum == 0.0 and everything.eps_hat == everything.llc_mean / 1000.0


def test_larger_nbeta_gives_a_smaller_loss_scale(model, data):
    sweep = llc_scale_sweep(
        model,
        data,
        nbetas=[200.0, 2000.0],
        step_size=5e-4,
        params="blocks.0.mlp",
        localization=100.0,
        n_steps=60,
        n_burnin=30,
        n_chains=3,
        progress=False,
    )
    assert [r["step_size"] for r in sweep.rows()] == pytest.approx([5e-4, 5e-5])  # ε·nβ held fixed
    eps = sweep.eps_hat
    assert eps[1] < 0.5 * eps[0], eps  # ε̂ = λ̂/nβ: ten times the nβ, a much smaller loss scale
    torch.testing.assert_close(sweep.n_eff, 2 * sweep.llc)


def test_scale_sweep_saves_and_loads(model, data, tmp_path):
    sweep = llc_scale_sweep(
        model,
        data,
        nbetas=[100.0, 1000.0],
        step_size=[1e-4, 1e-5],
        params="blocks.1.attn.h0",
        localization=100.0,
        n_steps=20,
        n_burnin=10,
        n_chains=2,
        progress=False,
    )
    back = LLCScaleSweep.load(sweep.save(tmp_path / "sweep"))
    torch.testing.assert_close(back.llc, sweep.llc)
    assert back.rows() == sweep.rows()


@pytest.mark.tl3
def test_head_masks_pick_exactly_that_heads_slices(model):
    # Perturb every masked entry of the model's own parameters, recompute the TransformerLens-style
    # tensors, and check that exactly head 2 of layer 1 changed: its W_Q/W_K/W_V/W_O/b_Q/b_K/b_V slices,
    # nothing else (other heads, b_O, other layers).
    masks = parameter_masks(model, "blocks.1.attn.h2")
    fm = FunctionalModel(model)
    before = {k: v.detach().clone() for k, v in _tl_parameters(model).items()}
    saved = {k: p.detach().clone() for k, p in fm.parameters.items()}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                fm.parameters[name][mask] += 1.0
        after = {k: v.detach().clone() for k, v in _tl_parameters(model).items()}  # views: copy now
    finally:
        with torch.no_grad():
            for k, p in fm.parameters.items():
                p.copy_(saved[k])
    for name, old in before.items():
        changed = (after[name] != old).reshape(old.shape[0], -1).any(dim=1) if old.ndim else after[name] != old
        if name.startswith("blocks.1.attn.") and name.rsplit(".", 1)[1] in (
            "W_Q",
            "W_K",
            "W_V",
            "W_O",
            "b_Q",
            "b_K",
            "b_V",
        ):
            assert changed.tolist() == [h == 2 for h in range(4)], name  # exactly head 2's slice
            assert bool((after[name][2] != old[2]).all()), name  # every entry of it
        else:
            assert not bool(torch.as_tensor(changed).any()), name
    n_head = sum(int(m.sum()) for m in masks.values())
    assert n_head == 4 * 32 * 8 + 3 * 8  # W_Q, W_K, W_V, W_O slices and b_Q, b_K, b_V slices


def test_sampling_moves_only_the_selected_head(model, data):
    # Watch the parameters the forward actually sees during sampling (chains run one by one, so the hook
    # sees plain tensors): only head 1 of layer 0's slices ever differ from θ*.
    fm = FunctionalModel(model)
    masks = parameter_masks(model, "blocks.0.attn.h1")
    theta = {k: p.detach().clone() for k, p in fm.parameters.items()}
    moved = {k: torch.zeros_like(p, dtype=torch.bool) for k, p in fm.parameters.items()}

    def watch(module, args):
        for name in fm.parameters:
            owner, attr = name.rsplit(".", 1)
            current = module.get_submodule(owner)._parameters[attr]
            moved[name] |= current.detach() != theta[name]

    handle = torch.nn.Module.register_forward_pre_hook(model, watch)
    try:
        res = estimate_llc(model, data, params="blocks.0.attn.h1", n_steps=12, n_burnin=4, vectorize=False, **SGLD)
    finally:
        handle.remove()
    assert res.diagnostics["n_sampled_entries"] == sum(int(m.sum()) for m in masks.values())
    for name in fm.parameters:
        expected = masks.get(name, torch.zeros_like(moved[name]))
        assert torch.equal(moved[name], expected), name


def test_batched_and_sequential_chains_agree_on_a_model(model, data):
    kw = dict(params="blocks.1.mlp", n_steps=30, n_burnin=10, seed=5, **SGLD)
    a = estimate_llc(model, data, vectorize=True, **kw)
    b = estimate_llc(model, data, vectorize=False, **kw)
    assert a.diagnostics["vectorized"] and not b.diagnostics["vectorized"]
    # Same noise; float32 gradients summed in a different order: traces agree to rounding.
    torch.testing.assert_close(a.loss_trace, b.loss_trace, rtol=2e-3, atol=1e-6)


def test_cross_entropy_subtracts_the_measured_loss_at_theta_star(model, data):
    res = estimate_llc(model, data, loss="ce", params="unembed", n_steps=20, n_burnin=10, **SGLD)
    # L(θ*) = mean over the post-burn-in batches (they alternate, 5 of each) of the next-token loss.
    per_batch = []
    with torch.no_grad():
        for b in data:
            logq = torch.log_softmax(model(b.tokens)[:, :-1].float(), dim=-1)
            nll = -logq.gather(-1, b.tokens[:, 1:, None]).squeeze(-1)
            w = b.mask[:, 1:].float()
            per_batch.append(float((nll * w).sum() / w.sum()))
    assert res.loss_at_optimum == pytest.approx(sum(per_batch) / 2, rel=1e-5)
    assert math.isfinite(res.llc_mean) and res.settings["loss"] == "ce"


def test_model_state_is_restored_after_success_and_after_an_exception(model, data):
    model.train()
    model.blocks[0].eval()  # a mixed state, to see every module's own flag come back
    frozen = next(iter(FunctionalModel(model).parameters.values()))
    frozen.requires_grad_(False)
    snap = _snapshot(model)
    try:
        estimate_llc(model, data, params="blocks.0", n_steps=6, n_burnin=2, **SGLD)
        _assert_untouched(model, snap)
        # A step size far too large: every chain diverges, an exception from deep inside the sampler.
        with pytest.raises(SamplerDivergedError, match="lower step_size"):
            estimate_llc(model, data, **{**SGLD, "step_size": 10.0, "n_steps": 20, "n_burnin": 5})
        _assert_untouched(model, snap)
        with pytest.raises(BadInputError, match="unknown parameter selection"):
            estimate_llc(model, data, params="blocks.0.atn", n_steps=6, n_burnin=2, **SGLD)
        _assert_untouched(model, snap)
    finally:
        frozen.requires_grad_(True)
        model.eval()


def test_model_is_in_eval_mode_while_sampling(model, data):
    modes = []
    handle = torch.nn.Module.register_forward_pre_hook(model, lambda m, args: modes.append(m.training))
    model.train()
    try:
        estimate_llc(model, data, params="blocks.1.mlp", n_steps=4, n_burnin=1, **SGLD)
    finally:
        handle.remove()
        model.eval()
    assert modes and not any(modes)


@pytest.mark.tl3
def test_unknown_selections_list_the_valid_ones(model):
    valid = parameter_selections(model)
    assert {"all", "embed", "unembed", "blocks.0", "blocks.1.attn", "blocks.1.mlp", "blocks.1.attn.h3"} <= set(valid)
    with pytest.raises(BadInputError, match=r"blocks\.1\.attn") as info:
        parameter_masks(model, "blocks.1.atn")
    assert "Valid selections" in str(info.value)
    with pytest.raises(BadInputError, match="heads 0..3"):
        parameter_masks(model, "blocks.1.attn.h7")
    union = parameter_masks(model, ["blocks.0.mlp", "unembed"])
    assert sum(int(m.sum()) for m in union.values()) == sum(
        int(m.sum()) for sel in ("blocks.0.mlp", "unembed") for m in parameter_masks(model, sel).values()
    )


@pytest.mark.skipif(TL_MAJOR < 4, reason="HF GPT-2 through boot_transformers is the 4.x path")
def test_hf_gpt2_head_masks_and_tied_embeddings(tiny_gpt2_path):
    gpt2 = tld.load_model(tiny_gpt2_path)
    fm = FunctionalModel(gpt2)
    masks = parameter_masks(gpt2, "blocks.1.attn.h2")
    q = next(m for name, m in masks.items() if name.endswith("attn.q._original_component.weight"))
    assert q[16:24].all() and not q[:16].any() and not q[24:].any()  # head 2 = rows 16:24 (d_head 8)
    # GPT-2 ties W_E and W_U: one parameter reachable under both module paths, swapped at both.
    tied = [name for name, paths in fm.paths.items() if len(paths) > 1]
    assert len(tied) == 1 and set(parameter_masks(gpt2, "unembed")) == set(tied)
    data = tld.token_batches(gpt2, random_tokens(4, 12, vocab=gpt2.cfg.d_vocab), batch_size=4)
    snap = _snapshot(gpt2)
    res = estimate_llc(gpt2, data, params="unembed", n_steps=10, n_burnin=4, **SGLD)
    _assert_untouched(gpt2, snap)
    assert res.diagnostics["vectorized"] and math.isfinite(res.llc_mean)
    # "all" samples the parameters the forward reads, each once (not the fused c_attn beside q/k/v).
    res = estimate_llc(gpt2, data, params="all", n_steps=4, n_burnin=2, **SGLD)
    assert res.diagnostics["n_sampled_entries"] == sum(int(m.sum()) for m in parameter_masks(gpt2, "all").values())
    assert res.diagnostics["n_sampled_entries"] < res.diagnostics["n_parameters"]


def test_all_parameters_of_a_bridge_exclude_the_fused_copies_the_forward_never_reads(tiny_gpt2_path):
    """HF GPT-2 through a 4.x bridge holds the fused c_attn beside the split q/k/v views the forward reads:
    "all" must count the model's real parameters once, and every selected entry must move the logits."""
    from transformers import GPT2LMHeadModel

    from tl_degeneracy.adapter import FunctionalModel, parameter_masks

    model = tld.load_model(tiny_gpt2_path)
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_path)
    real = sum(p.numel() for p in hf.parameters())
    masks = parameter_masks(model, "all")
    assert sum(int(m.sum()) for m in masks.values()) == real
    fm = FunctionalModel(model)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = fm({}, tokens)
        for name, mask in masks.items():
            if ".attn.k." in name and name.endswith("bias"):
                continue  # b_K adds q·b_K to every key's score alike: softmax removes it (a true degeneracy)
            p = fm.parameters[name]
            # a random perturbation (a constant shift of an embedding would be removed by LayerNorm)
            moved = fm(
                {name: p + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * mask}, tokens
            )
            assert (moved - base).abs().max() > 1e-6, name


@pytest.mark.tl3
def test_first_chain_runs_the_same_chains_as_a_larger_run():
    """Chain c's noise is seeded by (seed, c): chains 1, 2 of a 3-chain run are a 2-chain run from chain 1."""
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(4, 8, seed=2), batch_size=2)
    kw = dict(nbeta=500.0, step_size=1e-4, localization=100.0, n_steps=8, n_burnin=2, seed=3, vectorize=False,
              progress=False)
    three = tld.estimate_llc(model, data, n_chains=3, **kw)
    tail = tld.estimate_llc(model, data, n_chains=2, first_chain=1, **kw)
    assert torch.equal(tail.loss_trace, three.loss_trace[1:])
    with pytest.raises(tld.BadInputError, match="first_chain"):
        tld.estimate_llc(model, data, n_chains=1, first_chain=-1, **kw)


def test_sweep_scales_the_localization_with_nbeta_so_step_times_gamma_stays_fixed(model, data):
    from tl_degeneracy.llc.behavioral import sweep_localizations

    assert sweep_localizations([1e3, 3e3], 100.0, scale_localization=True) == [100.0, 300.0]
    assert sweep_localizations([1e3, 3e3], 100.0, scale_localization=False) == [100.0, 100.0]
    sweep = llc_scale_sweep(model, data, nbetas=[200.0, 600.0], step_size=3e-4, localization=50.0,
                            params="blocks.0.mlp", n_steps=6, n_burnin=2, n_chains=1, progress=False)
    rows = sweep.rows()
    assert [r["localization"] for r in rows] == pytest.approx([50.0, 150.0])
    assert [r["step_size"] * r["localization"] for r in rows] == pytest.approx([3e-4 * 50.0] * 2)
    fixed = llc_scale_sweep(model, data, nbetas=[200.0, 600.0], step_size=3e-4, localization=50.0,
                            scale_localization=False, params="blocks.0.mlp", n_steps=6, n_burnin=2, n_chains=1,
                            progress=False)
    assert [r["localization"] for r in fixed.rows()] == [50.0, 50.0]
