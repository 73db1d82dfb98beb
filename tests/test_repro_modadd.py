"""The modular-addition reproduction (issue 20): ``reproductions/modadd.py`` and what it rests on."""

from __future__ import annotations

import pytest

import tl_degeneracy as tld


@pytest.fixture(scope="module")
def modadd():
    return tld.load_model("modadd-113")


@pytest.mark.tl3
def test_ablation_losses_on_a_model_with_a_smaller_output_vocabulary(modadd):
    """d_vocab_out (113) < d_vocab (114, "=" is input only): no intervention means zero loss, no index error."""
    tokens = tld.modadd_data(modadd, split="test").tokens[:256]
    data = tld.token_batches(modadd, tokens, batch_size=128, count="all", outputs="last")
    for loss in ("top1", "kl"):
        assert tld.measure_loss(modadd, data, [], loss=loss) == 0.0
