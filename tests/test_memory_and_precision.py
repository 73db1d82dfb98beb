"""The memory plan (passes, batch shrinking) and the fast (bfloat16) precision of `collect`."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.adapter import ModelShape
from tl_degeneracy.collection.memory import BUDGET_FRACTION, plan_memory, site_totals_bytes, working_set_bytes
from tl_degeneracy.sites import site_dim

SITES = ["resid_pre", "mlp_post"]


def test_accumulator_estimate_equals_the_totals_collect_keeps():
    model = make_tiny_model()
    sites = tld.resolve_sites(model, SITES)
    stats = tld.collect(model, tld.token_batches(model, random_tokens(2, 8), batch_size=2), sites=sites,
                        progress=False)
    for site in sites:
        held = sum(t.nbytes for k, t in stats.tensors.items() if k.startswith(f"act/{site}/"))
        assert held == site_totals_bytes(site_dim(model, site), jacobian=False)


def test_sync_accumulator_estimates_cover_the_sums_collect_keeps():
    from tl_degeneracy.collection.memory import F32, F64, head_sync_bytes, neuron_sync_bytes

    model = make_tiny_model()
    stats = tld.collect(model, tld.token_batches(model, random_tokens(2, 8), batch_size=2), sites=[],
                        head_sync=True, neuron_sync=True, progress=False)
    assert stats.sites == [] and not any(k.startswith("act/") for k in stats.tensors)
    for layer in range(2):
        held_h = sum(t.nbytes for k, t in stats.tensors.items() if k.startswith(f"hsync/{layer}/"))
        held_n = sum(t.nbytes for k, t in stats.tensors.items() if k.startswith(f"nsync/{layer}/"))
        hd = 4 * 8
        # the estimates are the float64 totals plus the per-batch increments, which are at most float64 vectors
        # and float32 d×d products
        assert held_h == head_sync_bytes(4, 8) - F64 * (2 * 16 + 4) - F32 * hd * hd
        assert held_n == neuron_sync_bytes(64) - F32 * 2 * 64 * 64 - F64 * 64


def _budget_for(model, sites, *, batch_size, seq_len, fraction_of_accumulators):
    """A budget whose usable part holds one batch's working set plus a fraction of all accumulators."""
    plan = plan_memory(model, sites, batch_size=batch_size, seq_len=seq_len)
    usable = plan.working_bytes + fraction_of_accumulators * plan.accumulator_bytes
    return usable / BUDGET_FRACTION


def test_a_small_budget_splits_sites_over_passes_with_the_same_totals(tmp_path):
    model = make_tiny_model()
    sites = tld.resolve_sites(model, SITES)
    data = tld.token_batches(model, random_tokens(6, 12), batch_size=3)
    budget = _budget_for(model, sites, batch_size=3, seq_len=12, fraction_of_accumulators=0.6)
    plan = plan_memory(model, sites, batch_size=3, seq_len=12, budget_bytes=budget)
    assert plan.n_passes >= 2 and plan.batch_size == 3
    assert sorted(u.site for g in plan.passes for u in g) == sorted(sites)
    one = tld.collect(model, data, sites=sites, memory_budget=None, progress=False)
    with pytest.warns(UserWarning, match="passes"):
        split = tld.collect(model, data, sites=sites, memory_budget=budget, checkpoint=tmp_path / "s.safetensors",
                            progress=False)
    assert split.meta["memory_plan"]["n_passes"] == plan.n_passes
    assert split.sites == one.sites and split.n_tokens == one.n_tokens
    assert set(split.tensors) == set(one.tensors)
    for key, value in one.tensors.items():
        assert torch.equal(split.tensors[key], value)  # the same batches and products, only regrouped
    assert tld.Stats.load(tmp_path / "s.safetensors").count(sites[0]) == one.count(sites[0])


def test_a_budget_too_small_for_the_batch_lowers_the_batch_size():
    model = make_tiny_model()
    sites = tld.resolve_sites(model, SITES)
    # room for a batch of 2 rows (and all accumulators), not 8
    plan2 = plan_memory(model, sites, batch_size=2, seq_len=12)
    budget = (2.2 * plan2.working_bytes + plan2.accumulator_bytes) / BUDGET_FRACTION
    plan = plan_memory(model, sites, batch_size=8, seq_len=12, budget_bytes=budget)
    assert plan.batch_size < 8 and any("batch size lowered" in n for n in plan.notes)
    data = tld.token_batches(model, random_tokens(8, 12), batch_size=8)
    one = tld.collect(model, data, sites=sites, memory_budget=None, progress=False)
    with pytest.warns(UserWarning, match="batch size lowered"):
        small = tld.collect(model, data, sites=sites, memory_budget=budget, progress=False)
    assert small.meta["data"]["batch_size"] == plan.batch_size
    for key, value in one.tensors.items():
        # the same tokens summed in other batches: equal to float32-product rounding
        torch.testing.assert_close(small.tensors[key], value, rtol=1e-6, atol=1e-6 * value.abs().max().item())


def test_an_impossible_budget_fails_before_running():
    model = make_tiny_model()
    with pytest.raises(tld.BadInputError, match="memory budget"):
        tld.collect(model, tld.token_batches(model, random_tokens(2, 8), batch_size=2), sites=SITES,
                    memory_budget=1000, progress=False)


def test_gpt2_xl_with_jacobian_and_sync_plans_onto_one_80gb_gpu():
    xl = ModelShape.gpt2("xl")
    sites = [f"blocks.{lay}.hook_resid_pre" for lay in range(48)] + [f"blocks.{lay}.mlp.hook_post" for lay in range(48)]
    gb80 = 80 * 1000**3
    plan = plan_memory(xl, sites, batch_size=8, seq_len=1024, jacobian=True, head_sync_layers=range(48),
                       neuron_sync_layers=range(48), budget_bytes=gb80)
    assert plan.peak_bytes() <= BUDGET_FRACTION * gb80
    # the accumulators alone (two 6400² float64 totals per MLP site, two more for neuron sync) exceed 80 GB,
    # so the plan must split them
    assert plan.accumulator_bytes > gb80 and plan.n_passes >= 2
    small = plan_memory(ModelShape.gpt2("small"), [s.replace("48", "12") for s in sites[:12]], batch_size=16,
                        seq_len=128, jacobian=True, budget_bytes=gb80)
    assert small.n_passes == 1 and small.batch_size == 16


def test_working_set_grows_with_batch_and_with_the_jacobian():
    shape = ModelShape.gpt2("small")
    fwd = working_set_bytes(shape, batch_size=16, seq_len=128, first_layer=0, jacobian=False)
    bwd = working_set_bytes(shape, batch_size=16, seq_len=128, first_layer=0, jacobian=True)
    bwd2 = working_set_bytes(shape, batch_size=32, seq_len=128, first_layer=0, jacobian=True)
    assert fwd < bwd < bwd2 and bwd2 == 2 * bwd
    # the logits of 2048 tokens alone: 2048 × 50257 float32 ≈ 0.41 GB, kept in a few copies
    assert bwd > 4 * 2048 * 50257 * 4


def test_fast_precision_is_close_to_accurate_and_records_itself():
    model = make_tiny_model()
    sites = tld.resolve_sites(model, SITES)
    data = tld.token_batches(model, random_tokens(8, 12), batch_size=4)
    acc = tld.collect(model, data, sites=sites, progress=False)
    fast = tld.collect(model, data, sites=sites, precision="fast", progress=False)
    assert fast.meta["precision"] == "fast" and "bfloat16" in fast.meta["product_dtype"]
    for site in sites:
        g, gf = acc.gram(site, centered=False), fast.gram(site, centered=False)
        rel = (gf - g).norm() / g.norm()
        # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per input); activations pass
        # through a few bf16 matmuls, so a relative error of a few 1e-3 is the expected floor (1e-3 to 4e-3
        # seen here). Below 1e-5 would mean bf16 was not used; above 2e-2 that the float32 output was rounded
        # to bf16 again or the computation is wrong
        assert 1e-5 < rel < 2e-2, (site, rel)
    with pytest.raises(tld.BadInputError, match="precision"):
        tld.collect(model, data, sites=sites, precision="half", progress=False)


def test_fast_precision_runs_every_component_and_keeps_sync_sums_float32():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(4, 12), batch_size=2)
    kw = dict(sites=["resid_pre"], jacobian="kl", head_sync=True, neuron_sync=True, progress=False)
    acc = tld.collect(model, data, **kw)
    fast = tld.collect(model, data, precision="fast", **kw)
    assert set(fast.tensors) == set(acc.tensors)
    for key, value in acc.tensors.items():
        if key.startswith("nsync/") and value.is_floating_point():
            # the sync sums themselves are float32 products of bf16-autocast activations: the activations
            # carry bf16 error (~1e-2 relative through two layers), the sums add no bf16 rounding of their own
            err = float((fast.tensors[key] - value).norm() / value.norm().clamp_min(1e-30))
            assert err < 2e-2, (key, err)  # 3e-3 to 5e-3 seen
    for site in acc.sites:
        g = acc.jacobian_gram(site)
        assert float((fast.jacobian_gram(site) - g).norm() / g.norm()) < 0.5  # same probes up to bf16 flips


def test_plan_reports_the_weights_once_and_keeps_them_out_of_the_budget():
    from tl_degeneracy.collection.memory import weight_bytes

    model = make_tiny_model()
    module = getattr(model, "model", model)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.parameters(), *module.buffers()]}
    assert weight_bytes(model) == sum(storages.values()) > 0
    plan = plan_memory(model, tld.resolve_sites(model, SITES), batch_size=2, seq_len=12)
    assert plan.weight_bytes == weight_bytes(model)
    assert plan.total_bytes() == plan.peak_bytes() + plan.weight_bytes
    assert plan.to_dict()["total_bytes"] == plan.total_bytes()
    # GPT-2 small from its shape: 124.4M parameters with the unembedding tied, 163.0M untied (counted here)
    small = weight_bytes(ModelShape.gpt2("small"))
    assert abs(small / 4 - (124_439_808 + 768 * 50257 + 50257)) < 0.01 * small / 4
