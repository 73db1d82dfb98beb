"""The bundled grokked modular-addition transformer (``tl_degeneracy/bundled/modadd-113``) and its training script.

See ``scripts/train_modadd.py``. Tests marked ``tl3`` also run on TransformerLens 3.x;
the accuracies are computed here through TransformerLens's own forward, never read from a file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tl_degeneracy as tld
from tl_degeneracy.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_modadd.py"
MODEL_DIR = REPO / "tl_degeneracy" / "bundled" / "modadd-113"
TOKENS = REPO / "tl_degeneracy" / "bundled" / "modadd-113-tokens.safetensors"
P = 113
TARGET = 0.999
MAX_BYTES = 2_000_000  # model folder + token file


def _script():
    """The training script as a module (its pure functions: the split, the training forward)."""
    spec = importlib.util.spec_from_file_location("train_modadd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def model():
    return tld.load_model("modadd-113")


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((MODEL_DIR / "training_summary.json").read_text())


@pytest.mark.tl3
def test_shipped_model_is_grokked_on_held_out_pairs(model):
    test = tld.modadd_data(model, split="test")
    train = tld.modadd_data(model, split="train")
    assert len(test) + len(train) == P * P
    assert len(train) == round(0.3 * P * P)
    assert test.accuracy(model) >= TARGET
    assert train.accuracy(model) >= TARGET


@pytest.mark.tl3
def test_answers_are_modular_sums(model):
    """Direct check on a few hand-written inputs, independent of the token file."""
    a = torch.tensor([0, 1, 57, 112, 112, 100])
    b = torch.tensor([0, 112, 56, 112, 1, 50])
    tokens = torch.stack([a, b, torch.full_like(a, P)], dim=1)
    with torch.no_grad():
        answers = model(tokens)[:, -1].argmax(-1)
    assert answers.tolist() == ((a + b) % P).tolist()


@pytest.mark.tl3
def test_model_shape_and_hooks(model):
    adapter = tld.ModelAdapter(model)
    assert (adapter.n_layers, adapter.d_model, adapter.n_heads, adapter.d_head, adapter.d_mlp) == (1, 128, 4, 32, 512)
    assert (adapter.d_vocab, adapter.n_ctx, adapter.act_fn) == (P + 1, 3, "relu")
    assert model.cfg.normalization_type is None
    for name in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_post",
                 "blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post"):
        assert adapter.has_hook(name), name
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, P]])).shape == (1, 3, P)  # logits over the p numbers only


@pytest.mark.tl3
def test_name_and_path_load_the_same_model(model):
    by_path = tld.load_model(MODEL_DIR)
    tokens = tld.modadd_data(model).tokens[:500]
    with torch.no_grad():
        assert torch.equal(by_path(tokens), model(tokens))


@pytest.mark.tl3
def test_transformer_lens_forward_equals_training_forward(model):
    """The weights in the file, run through the script's last-position forward, give TransformerLens's logits."""
    weights = load_file(str(MODEL_DIR / "model.safetensors"))
    tokens = tld.modadd_data(model).tokens
    with torch.no_grad():
        ours = _script().last_position_logits(weights, tokens)
        theirs = model(tokens)[:, -1]
    assert (ours - theirs).abs().max().item() < 1e-3 * theirs.abs().max().item()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    biases = [t for name, t in weights.items() if ".b_" in name]
    assert biases and all(bool((t == 0).all()) for t in biases)  # frozen at zero in training


@pytest.mark.tl3
def test_token_file_layout_and_split(summary):
    entries = load_file(str(TOKENS))
    tokens, labels, is_train = entries["tokens"].long(), entries["labels"].long(), entries["is_train"]
    a = torch.arange(P).repeat_interleave(P)
    b = torch.arange(P).repeat(P)
    assert torch.equal(tokens, torch.stack([a, b, torch.full_like(a, P)], dim=1))
    assert torch.equal(labels, (a + b) % P)
    expected = _script().train_mask(P, frac_train=summary["frac_train"], split_seed=summary["split_seed"])
    assert torch.equal(is_train, expected)
    assert int(is_train.sum()) == summary["n_train"]


def test_shipped_files_are_small_and_pickle_free():
    files = [*MODEL_DIR.iterdir(), TOKENS]
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    assert {f.suffix for f in files} <= {".json", ".safetensors"}


def test_modadd_data_splits_and_checks():
    all_pairs = tld.modadd_data()  # p = 113 by default, no model needed
    test = tld.modadd_data(split="test")
    assert all_pairs.p == P and len(all_pairs) == P * P
    assert not bool(test.is_train.any()) and len(test) == P * P - int(all_pairs.is_train.sum())
    assert torch.equal(test.labels, (test.tokens[:, 0] + test.tokens[:, 1]) % P)
    with pytest.raises(BadInputError, match="split"):
        tld.modadd_data(split="valid")
    with pytest.raises(BadInputError, match="not found"):
        tld.modadd_data(p=7)


def test_modadd_data_feeds_token_batches(model):
    train = tld.modadd_data(model, split="train")
    data = tld.token_batches(model, train.tokens, count="all", outputs="last", batch_size=512)
    assert data.n_counted == 3 * len(train)
    assert sum(batch.tokens.shape[0] for batch in data) == len(train)


def test_script_smoke_run_on_tiny_p(tmp_path):
    """A few steps on p = 13 through the command line: files, summary and TransformerLens check agree."""
    out = _run_script("--p", "13", "--max-steps", "40", "--check-every", "20", "--target-accuracy", "1.01",
                      "--out", str(tmp_path), timeout=300)
    folder = tmp_path / "modadd-13"
    summary = json.loads((folder / "training_summary.json").read_text())
    assert summary["steps"] == 40 and not summary["reached_target"]
    assert "did NOT reach" in out.stdout
    model = tld.load_model(folder)
    data = tld.modadd_data(model, split="test", path=tmp_path / "modadd-13-tokens.safetensors")
    assert data.accuracy(model) == pytest.approx(summary["final"]["test_accuracy"], abs=1e-6)
    recorded = json.loads((folder / "config.json").read_text())["task"]["split"]
    assert recorded["is_train_sha256"] == tld.data.split_digest(tld.modadd_data(model).is_train)
    check = summary["transformer_lens_check"]
    assert check["max_abs_logit_difference"] < 1e-4 and check["argmax_agreement"] == 1.0

    # stops at the first check that reaches the target; the same seed gives the same weights
    _run_script("--p", "13", "--max-steps", "40", "--check-every", "5", "--target-accuracy", "0",
                "--out", str(tmp_path / "again"), "--no-tl-check", timeout=300)
    again = json.loads((tmp_path / "again" / "modadd-13" / "training_summary.json").read_text())
    assert again["steps"] == 5 and again["reached_target"]
    first5 = _script().train(p=13, check_every=5, max_steps=5, log=False)[0]
    saved = load_file(str(tmp_path / "again" / "modadd-13" / "model.safetensors"))
    assert all(torch.equal(first5[name], saved[name]) for name in saved)


@pytest.mark.slow
def test_training_script_reproduces_shipped_model(tmp_path):
    """From scratch with the shipped settings (≈ 40 minutes on one core of the 2-core CPU): grokked again. The
    run takes the optimiser settings from the shipped summary (weight decay 1.0, the companion's and the
    script's default), so it stays right if the shipped model is ever retrained with others."""
    summary = json.loads((MODEL_DIR / "training_summary.json").read_text())
    opt = summary["optimizer"]
    _run_script("--out", str(tmp_path), "--weight-decay", str(opt["weight_decay"]), "--lr", str(opt["lr"]),
                timeout=4 * 3600)
    folder = tmp_path / f"modadd-{P}"
    fresh = tld.load_model(folder)
    test = tld.modadd_data(fresh, split="test", path=tmp_path / f"modadd-{P}-tokens.safetensors")
    assert test.accuracy(fresh) >= TARGET
    assert torch.equal(test.tokens, tld.modadd_data(split="test").tokens)  # the same held-out pairs
    rerun = json.loads((folder / "training_summary.json").read_text())
    assert rerun["reached_target"]
    same = ("torch", "cpu", "threads")
    if all(rerun["machine"][key] == summary["machine"][key] for key in same):
        # bitwise deterministic given the torch version, thread count and CPU (its kernels); elsewhere a
        # different rounding can shift the grokking step, and only the accuracy above is promised
        assert rerun["steps"] == summary["steps"]
        shipped = load_file(str(MODEL_DIR / "model.safetensors"))
        again = load_file(str(folder / "model.safetensors"))
        assert max((shipped[k] - again[k]).abs().max().item() for k in shipped) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# the data follow the model: a model loaded from another folder gets the split of the token file beside it
# ---------------------------------------------------------------------------------------------------------
def _copy_with_split(tmp_path: Path, is_train: torch.Tensor, *, record_split: bool) -> Path:
    """The shipped model copied to ``tmp_path/modadd-113`` with a token file of another split beside it."""
    from safetensors.torch import save_file

    folder = tmp_path / "modadd-113"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes((MODEL_DIR / "model.safetensors").read_bytes())
    config = json.loads((MODEL_DIR / "config.json").read_text())
    config["task"].pop("split", None)
    if record_split:
        config["task"]["split"] = {"is_train_sha256": tld.data.split_digest(is_train)}
    (folder / "config.json").write_text(json.dumps(config))
    entries = load_file(str(TOKENS))
    save_file({**entries, "is_train": is_train}, str(tmp_path / "modadd-113-tokens.safetensors"))
    return folder


@pytest.mark.tl3
def test_modadd_data_reads_the_token_file_beside_the_model(tmp_path):
    """A model from another folder (another seed) must get its own split, not the bundled one's."""
    shipped = load_file(str(TOKENS))["is_train"]
    other = shipped.flip(0)  # same size, a different split
    assert not torch.equal(other, shipped)
    for record_split in (False, True):
        folder = _copy_with_split(tmp_path / str(record_split), other, record_split=record_split)
        model = tld.load_model(folder)
        assert torch.equal(tld.modadd_data(model).is_train, other)
        test = tld.modadd_data(model, split="test")
        assert not bool(test.is_train.any()) and len(test) == int((~other).sum())


@pytest.mark.tl3
def test_modadd_data_refuses_a_token_file_of_another_split(tmp_path):
    shipped = load_file(str(TOKENS))["is_train"]
    folder = _copy_with_split(tmp_path, shipped.flip(0), record_split=True)
    model = tld.load_model(folder)
    with pytest.raises(BadInputError, match="another train/test split"):
        tld.modadd_data(model, path=TOKENS)  # the bundled file: seed 0's split, not this model's
    bundled = tld.load_model("modadd-113")  # the shipped config records its split: the shipped file fits
    assert torch.equal(tld.modadd_data(bundled, path=TOKENS).is_train, shipped)
    with pytest.raises(BadInputError, match="another train/test split"):
        tld.modadd_data(bundled, path=tmp_path / "modadd-113-tokens.safetensors")


@pytest.mark.tl3
def test_modadd_data_refuses_to_guess_the_split_of_an_unknown_model(tmp_path):
    """A model not loaded from a train_modadd folder: no silent default to the bundled split."""
    import copy

    model = copy.deepcopy(tld.load_model("modadd-113"))  # not the loaded object: its origin is unknown
    with pytest.raises(BadInputError, match="path="):
        tld.modadd_data(model)
    assert len(tld.modadd_data(model, path=TOKENS)) == P * P  # an explicit file is the user's statement
    folder = _copy_with_split(tmp_path, load_file(str(TOKENS))["is_train"], record_split=False)
    (tmp_path / "modadd-113-tokens.safetensors").unlink()
    with pytest.raises(BadInputError, match="not found"):
        tld.modadd_data(tld.load_model(folder))


def test_the_training_script_records_the_digest_of_the_split_it_writes(tmp_path):
    script = _script()
    w, summary = script.train(p=13, max_steps=1, check_every=1, log=False)
    folder = script.save(tmp_path, w, summary, split_seed=summary["split_seed"], frac_train=summary["frac_train"])
    recorded = json.loads((folder / "config.json").read_text())["task"]["split"]["is_train_sha256"]
    written = load_file(str(tmp_path / "modadd-13-tokens.safetensors"))["is_train"]
    assert recorded == tld.data.split_digest(written)
    mask = load_file(str(TOKENS))["is_train"]
    assert tld.data.split_digest(mask) != tld.data.split_digest(mask.flip(0))
