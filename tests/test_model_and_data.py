"""The model adapter, site names and token data on both TransformerLens majors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny import TL_MAJOR, make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.adapter import ModelAdapter


@pytest.mark.tl3
def test_load_model_from_a_local_folder_matches_the_hf_model(tiny_gpt2_path):
    from transformers import GPT2LMHeadModel

    model = tld.load_model(tiny_gpt2_path)
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_path).eval()
    tokens = random_tokens(2, 10, vocab=hf.config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    # the same float32 computation in another order: agreement to ~1e-5 of the logit scale
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
    adapter = ModelAdapter(model)
    assert adapter.bos_token_id == hf.config.bos_token_id
    assert adapter.d_vocab == hf.config.vocab_size and adapter.n_layers == 2


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(tld.BadInputError, match="does not exist"):
        tld.load_model(str(tmp_path / "nowhere" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(tld.BadInputError, match="config.json"):
        tld.load_model(tmp_path / "empty")


@pytest.mark.tl3
def test_adapter_sees_the_same_surface_on_both_majors(tiny_model):
    adapter = ModelAdapter(tiny_model)
    assert adapter.is_bridge == (TL_MAJOR >= 4)
    assert (adapter.n_layers, adapter.d_model, adapter.d_mlp, adapter.n_heads, adapter.d_head) == (2, 32, 64, 4, 8)
    for name in ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post", "blocks.0.attn.hook_z",
                 "blocks.1.attn.hook_pattern", "ln_final.hook_normalized"]:
        assert adapter.has_hook(name)
    assert not adapter.has_hook("blocks.2.hook_resid_pre")
    assert "blocks.1.hook_resid_mid" in adapter.hook_names()
    desc = adapter.describe()
    assert desc["n_layers"] == 2 and "transformer_lens_version" in desc


def test_adapter_rejects_non_models():
    with pytest.raises(tld.BadInputError, match="TransformerLens model"):
        ModelAdapter(torch.nn.Linear(2, 2))


@pytest.mark.tl3
def test_resolve_sites_orders_by_kind_then_layer(tiny_model):
    names = tld.resolve_sites(tiny_model, "resid_pre,mlp_post,ln_final", layers=[1, 0])
    assert names == ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post",
                     "blocks.0.mlp.hook_post", "ln_final.hook_normalized"]
    assert tld.resolve_sites(tiny_model, ["blocks.0.hook_resid_post"]) == ["blocks.0.hook_resid_post"]


@pytest.mark.tl3
def test_gated_hooks_explain_the_switch(tiny_model):
    with pytest.raises(tld.UnknownHookError, match="set_use_attn_result"):
        tld.resolve_sites(tiny_model, ["blocks.0.attn.hook_result"])


def test_text_is_tokenised_concatenated_and_chunked_with_bos(tiny_gpt2_path):
    model = tld.load_model(tiny_gpt2_path)
    adapter = ModelAdapter(model)
    texts = ["def f(x):\n    return x + 1\n", "import os\n"]
    data = tld.token_batches(model, texts, seq_len=8, batch_size=2)
    ids = [i for t in texts for i in [*adapter.tokenize([t])[0], adapter.bos_token_id]]
    assert (data.tokens[:, 0] == adapter.bos_token_id).all()
    body = data.tokens[:, 1:][~(~data.mask[:, 1:] & (data.tokens[:, 1:] == 0))]
    # every stream token appears in order after the BOS column, padding only at the very end
    assert data.tokens[:, 1:].flatten()[: len(ids)].tolist() == ids
    assert data.n_counted == len(ids) and len(body) >= len(ids)
    assert not data.mask[:, 0].any()


def test_datasets_and_token_files_are_sources(tiny_gpt2_path, tmp_path):
    import datasets

    model = tld.load_model(tiny_gpt2_path)
    texts = ["def f(x):\n    return x + 1\n", "import os\n"] * 3
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(6))})
    from_ds = tld.token_batches(model, ds, seq_len=8, batch_size=4)
    from_list = tld.token_batches(model, texts, seq_len=8, batch_size=4)
    assert torch.equal(from_ds.tokens, from_list.tokens) and torch.equal(from_ds.mask, from_list.mask)
    stream = torch.tensor([i for t in ModelAdapter(model).tokenize(texts) for i in t], dtype=torch.int32)
    save_file({"tokens": stream}, str(tmp_path / "toks.safetensors"))
    from_file = tld.token_batches(model, tmp_path / "toks.safetensors", seq_len=8, batch_size=4)
    assert from_file.n_counted == stream.numel()
    with pytest.raises(tld.BadInputError, match="text_column"):
        tld.token_batches(model, datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]}), seq_len=8)
    with pytest.raises(tld.BadInputError, match="empty"):
        tld.token_batches(model, datasets.Dataset.from_dict({"text": []}), seq_len=8)


def test_n_tokens_caps_the_counted_tokens_exactly():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(6, 10), batch_size=4, n_tokens=23)
    assert data.n_counted == 23
    assert data.tokens.shape[0] == 3  # 9 counted per row: rows 0-1 full, row 2 cut to 5
    assert len(data) == 1
    assert [b.index for b in data] == [0]
    stream = tld.token_batches(model, torch.arange(40) % 50, seq_len=10, batch_size=2, prepend_bos=False)
    assert stream.tokens.shape == (4, 10) and stream.n_counted == 36


def test_strings_without_a_tokenizer_fail_clearly(tiny_model):
    with pytest.raises(tld.BadInputError, match="no tokenizer"):
        tld.token_batches(tiny_model, ["hello"], seq_len=8)
    with pytest.raises(tld.BadInputError, match="token file"):
        tld.token_batches(tiny_model, "not-a-dataset", seq_len=8)
    with pytest.raises(tld.BadInputError, match="integer ids"):
        tld.token_batches(tiny_model, torch.rand(2, 4))


def test_token_batches_iterate_deterministically(tiny_model):
    data = tld.token_batches(tiny_model, random_tokens(5, 6), batch_size=2)
    first = [(b.tokens.clone(), b.mask.clone()) for b in data]
    second = [(b.tokens, b.mask) for b in data]
    assert len(first) == len(data) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second, strict=True))


# ---- counted and output positions (SPEC §5b) ---------------------------------------------------------------
@pytest.mark.tl3
def test_count_and_outputs_choose_positions_and_padding_never_counts(tiny_model):
    tokens = random_tokens(3, 5)
    attention = torch.ones(3, 5, dtype=torch.long)
    attention[1, 3:] = 0  # row 1: positions 3, 4 are padding
    kw = dict(batch_size=2, attention_mask=attention)
    default = tld.token_batches(tiny_model, tokens, **kw)
    assert default.outputs is None and torch.equal(default.output_mask, default.mask)
    assert default.mask[:, 0].sum() == 0 and int(default.mask.sum()) == 4 + 2 + 4

    every = tld.token_batches(tiny_model, tokens, count="all", outputs="last", **kw)
    assert torch.equal(every.mask, attention.bool())
    last = torch.zeros(3, 5, dtype=torch.bool)
    last[0, 4] = last[1, 2] = last[2, 4] = True
    assert torch.equal(every.output_mask, last)
    assert [b.output_mask.sum().item() for b in every] == [2, 1]  # batches carry their rows' output positions
    assert every.describe()["n_outputs"] == 3 and every.description["outputs"] == "last"

    column = torch.tensor([False, True, False, True, True])
    masked = tld.token_batches(tiny_model, tokens, count=column, **kw)
    assert torch.equal(masked.mask, column.expand(3, 5) & attention.bool())
    assert tld.token_batches(tiny_model, tokens, count="last", **kw).n_counted == 3


def test_position_choices_are_checked_before_anything_runs(tiny_model):
    tokens = random_tokens(2, 4)
    with pytest.raises(tld.BadInputError, match="either include_bos"):
        tld.token_batches(tiny_model, tokens, include_bos=True, count="all")
    with pytest.raises(tld.BadInputError, match="'first' is not a position choice"):
        tld.token_batches(tiny_model, tokens, outputs="first")
    with pytest.raises(tld.BadInputError, match=r"count mask \(3,\)"):
        tld.token_batches(tiny_model, tokens, count=torch.ones(3, dtype=torch.bool))
    with pytest.raises(tld.BadInputError, match="boolean mask"):
        tld.token_batches(tiny_model, tokens, count=torch.ones(4))
    with pytest.raises(tld.BadInputError, match="no output positions"):
        tld.token_batches(tiny_model, tokens, outputs=torch.zeros(4, dtype=torch.bool))


def test_n_tokens_cuts_the_outputs_of_the_cut_row_too(tiny_model):
    data = tld.token_batches(tiny_model, random_tokens(3, 5), count="all", outputs="all", n_tokens=7)
    assert data.n_counted == 7 and data.tokens.shape[0] == 2
    assert torch.equal(data.output_mask, data.mask)  # row 1 is cut after position 1 in both masks


@pytest.mark.tl3
def test_behavioral_kl_loss_lives_at_the_output_positions(tiny_model):
    """Perturbing the model moves the KL at the last position only, when outputs='last'."""
    from tl_degeneracy.llc.behavioral import _TeacherBatches, behavioral_loss

    adapter = ModelAdapter(tiny_model)
    data = tld.token_batches(tiny_model, random_tokens(2, 5), count="all", outputs="last", batch_size=2)
    (batch,) = list(_TeacherBatches(adapter, data, "kl", cache=True))
    assert torch.equal(batch.weight.bool(), data.output_mask)
    logits = adapter.forward(data.tokens).detach().float()
    moved = logits.clone()
    moved[:, :-1] += torch.randn_like(moved[:, :-1])  # change every position but the last
    assert float(behavioral_loss(moved, batch, "kl")) == pytest.approx(0.0, abs=1e-6)
    moved[:, -1] += torch.randn_like(moved[:, -1])
    assert float(behavioral_loss(moved, batch, "kl")) > 1e-3
