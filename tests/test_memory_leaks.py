"""No pass keeps anything of a batch alive after it (issue 13): live tensor bytes after a call do not grow with
the number of batches (or SGLD steps). Tiny models, both TransformerLens majors."""

from __future__ import annotations

import pytest
import torch
from memory_helpers import assert_no_growth
from tiny import make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.llc.behavioral import estimate_llc
from tl_degeneracy.llc.sgld import sgld_llc

pytestmark = pytest.mark.tl3

ROWS, SEQ = 2, 8  # one batch = 2 rows of 8 tokens


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


def _collect(model, *, vocab: int = 50, **kw):
    def run(n_batches: int) -> None:
        tokens = random_tokens(ROWS * n_batches, SEQ, vocab=vocab)
        data = tld.token_batches(model, tokens, seq_len=SEQ, batch_size=ROWS)
        stats = tld.collect(model, data, progress=False, memory_budget=None, **kw)
        assert stats.meta["batches_done"] == n_batches

    return run


def test_activation_moments_do_not_grow_with_batches(model):
    assert_no_growth(_collect(model, sites=["resid_pre", "mlp_post"]), 2)


@pytest.mark.parametrize("metric", ["kl", "mse"])
def test_jacobian_probes_do_not_grow_with_batches(model, metric):
    assert_no_growth(_collect(model, sites=["resid_pre", "mlp_post", "attn_z"], jacobian=metric, n_probes=2), 2)


def test_exact_jacobian_does_not_grow_with_batches():
    small = make_tiny_model(d_vocab=6)  # exact: T·V backward passes per batch
    assert_no_growth(_collect(small, vocab=6, sites=["resid_pre"], jacobian="kl", estimator="exact"), 1)


def test_head_and_neuron_sync_do_not_grow_with_batches(model):
    assert_no_growth(_collect(model, sites=[], head_sync=True, neuron_sync=True), 2)


def test_everything_together_does_not_grow_with_batches(model):
    assert_no_growth(_collect(model, sites=["resid_pre"], jacobian="kl", head_sync=True, neuron_sync=True), 2)


@pytest.mark.parametrize("cache_teacher", [True, False])
def test_estimate_llc_does_not_grow_with_steps(model, cache_teacher):
    # The data (and so a teacher cache) is fixed; only the number of SGLD steps (each a batch) grows.
    # mala_every=2: the MALA acceptance checks run often.
    data = tld.token_batches(model, random_tokens(8, SEQ), seq_len=SEQ, batch_size=4)

    def run(n_steps: int) -> None:
        estimate_llc(model, data, params="blocks.1", nbeta=1000.0, step_size=1e-4, localization=100.0,
                     n_steps=n_steps, n_burnin=n_steps // 2, n_chains=2, cache_teacher=cache_teacher,
                     mala_every=2, progress=False)

    assert_no_growth(run, 4)


def test_sgld_llc_does_not_grow_with_steps():
    h = torch.linspace(0.5, 2.0, 64, dtype=torch.float64)

    def run(n_steps: int) -> None:
        sgld_llc(lambda p, _: 0.5 * (h * p["w"] ** 2).sum(), {"w": torch.zeros(64, dtype=torch.float64)}, None,
                 nbeta=10.0, step_size=1e-3, localization=1.0, n_steps=n_steps, n_burnin=n_steps // 2, n_chains=2,
                 mala_every=2, loss_at_optimum=0.0, progress=False)

    assert_no_growth(run, 8)


def test_failed_batches_leave_nothing_behind(model):
    # A NaN planted in the gradient of every batch: each call stops at its first batch with NonFiniteError.
    # n and 4n failing calls must leave the same live tensors (the finally clauses release the graph).
    def poison(grad, hook):
        return torch.full_like(grad, float("nan"))

    data = tld.token_batches(model, random_tokens(2 * ROWS, SEQ), seq_len=SEQ, batch_size=ROWS)

    def run(n_calls: int) -> None:
        model.add_hook("blocks.1.hook_resid_pre", poison, dir="bwd")
        try:
            for _ in range(n_calls):
                with pytest.raises(tld.NonFiniteError):
                    tld.collect(model, data, sites=["resid_pre"], jacobian="kl", progress=False, memory_budget=None)
        finally:
            model.reset_hooks(including_permanent=False)

    assert_no_growth(run, 2)
