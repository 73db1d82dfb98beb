"""The bundled small GPT-2 (``tl_degeneracy/bundled/stdlib-gpt2``) and its token files.

See ``data/README.md`` and ``scripts/train_small_model.py``. Everything here runs offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tl_degeneracy" / "bundled"
MODEL_DIR = DATA / "stdlib-gpt2"
HELDOUT = DATA / "stdlib-heldout.safetensors"
TRAIN_SAMPLE = DATA / "stdlib-train-sample.safetensors"
MAX_DATA_BYTES = 10_000_000
LOSS_TOL = 1e-4


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((MODEL_DIR / "training_summary.json").read_text())


@pytest.fixture(scope="module")
def hf_config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


def _load_tokens(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["tokens"]


def _first_windows(summary: dict) -> torch.Tensor:
    n_ctx = json.loads((MODEL_DIR / "config.json").read_text())["n_positions"]
    k = summary["heldout_loss_first_windows"]["n_windows"]
    tokens = _load_tokens(HELDOUT)
    return tokens[: k * n_ctx].long().view(k, n_ctx)


@pytest.fixture(scope="module")
def bridge():
    """The bundled folder through TransformerBridge.boot_transformers with the Hub switched off."""
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        model = bridge_mod.TransformerBridge.boot_transformers(str(MODEL_DIR), device="cpu")
    model.eval()
    return model


def test_data_folder_size():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total <= MAX_DATA_BYTES, f"tl_degeneracy/bundled/ holds {total} bytes"


def test_folder_has_save_pretrained_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (MODEL_DIR / name).is_file(), name


@pytest.mark.parametrize("path", [HELDOUT, TRAIN_SAMPLE], ids=["heldout", "train-sample"])
def test_token_files(path, hf_config, summary):
    tokens = _load_tokens(path)
    assert tokens.dtype == torch.int32 and tokens.dim() == 1
    assert int(tokens.min()) >= 0
    assert int(tokens.max()) < hf_config["vocab_size"]
    eot = summary["eot_id"]
    assert eot == hf_config["bos_token_id"] == hf_config["eos_token_id"]
    assert int(tokens[0]) == eot
    if path == HELDOUT:
        assert tokens.numel() == summary["heldout_tokens"]
        assert int(tokens[-1]) == eot
        # One <|endoftext|> before each document plus one at the end.
        assert int((tokens == eot).sum()) == summary["data"]["n_heldout_files"] + 1


def test_summary_loss_below_unigram(summary):
    assert summary["heldout_loss"] < summary["unigram_cross_entropy_heldout"] - 1.0
    assert summary["heldout_perplexity"] == pytest.approx(torch.tensor(summary["heldout_loss"]).exp().item())


def test_bridge_loss_matches_recorded_and_hf(bridge, summary):
    from transformers import GPT2LMHeadModel

    x = _first_windows(summary)
    with torch.no_grad():
        bridge_loss = bridge(x, return_type="loss").item()
        hf = GPT2LMHeadModel.from_pretrained(str(MODEL_DIR)).eval()
        hf_loss = hf(x, labels=x).loss.item()
    assert bridge_loss == pytest.approx(hf_loss, abs=1e-5)
    assert bridge_loss == pytest.approx(summary["heldout_loss_first_windows"]["loss"], abs=LOSS_TOL)


def test_bridge_tokenizer(bridge, summary, hf_config):
    toks = bridge.to_tokens("def foo():")
    assert toks.shape[0] == 1 and toks.shape[1] > 2
    assert int(toks[0, 0]) == summary["eot_id"]  # BOS prepended, as for GPT-2
    assert int(toks.max()) < hf_config["vocab_size"]
    text = "def foo(x):\n    return {'a': x ** 2}  # ünïcode\n"
    assert bridge.tokenizer.decode(bridge.to_tokens(text, prepend_bos=False)[0]) == text
    assert bridge.cfg.d_vocab == hf_config["vocab_size"]
    assert bridge.cfg.n_ctx == hf_config["n_positions"]


def test_boot_offline_in_fresh_process(summary):
    """A clean interpreter with HF_HUB_OFFLINE=1 from the start, as a user would run it."""
    pytest.importorskip("transformer_lens.model_bridge")
    code = (
        "import json, sys\n"
        "from transformer_lens.model_bridge import TransformerBridge\n"
        "m = TransformerBridge.boot_transformers(sys.argv[1], device='cpu')\n"
        "m.eval()\n"
        "print(json.dumps(m.to_tokens('def foo():')[0].tolist()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(MODEL_DIR)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids[0] == summary["eot_id"] and len(ids) > 2


@pytest.mark.tl3
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hooked_transformer_3x_local_folder(summary):
    """TransformerLens 3.x: HookedTransformer built from the local folder (no download) matches HF."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    except ImportError:
        pytest.skip("HookedTransformer needs transformer-lens < 4")
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(MODEL_DIR)).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner if c.n_inner is not None else 4 * c.n_embd,
        n_ctx=c.n_positions,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        normalization_type="LNPre",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        device="cpu",
        init_weights=False,
    )
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(str(MODEL_DIR)), move_to_device=False)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=True)
    model.eval()
    x = _first_windows(summary)[:4]
    with torch.no_grad():
        lp = model(x).log_softmax(-1)
        lp_ref = hf(x).logits.log_softmax(-1)
    assert (lp - lp_ref).abs().max().item() < 1e-4
