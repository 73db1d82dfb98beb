"""Tiny models and data built in the tests, for whichever TransformerLens major is installed.

TransformerLens 4.x: ``TransformerBridge.boot_native`` and a tiny HF ``GPT2LMHeadModel`` saved to a temporary
folder and loaded by path (offline). 3.x: a tiny ``HookedTransformer``. Tests that need a specific major skip
on the other. Imported by test modules (``from tiny import make_tiny_model``); fixtures are in conftest.py.
"""

from __future__ import annotations

import importlib.metadata

import torch

import tl_degeneracy as tld

TL_MAJOR = int(importlib.metadata.version("transformer-lens").split(".")[0])

TINY = dict(d_model=32, n_layers=2, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=50)


def make_tiny_model(act_fn: str = "gelu_new", seed: int = 0, **overrides):
    """A tiny random TransformerLens model in eval mode (4.x bridge or 3.x HookedTransformer)."""
    cfg = {**TINY, **overrides, "act_fn": act_fn, "normalization_type": "LN"}
    if TL_MAJOR >= 4:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_native(TransformerBridgeConfig(**cfg, seed=seed)).eval()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    return HookedTransformer(HookedTransformerConfig(**cfg, seed=seed)).eval()


def save_tiny_gpt2(folder, *, vocab_size: int = 300, n_layer: int = 2, seed: int = 0) -> str:
    """Write a tiny random HF GPT-2 and a byte-level BPE tokenizer with ``save_pretrained``; return the path."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    raw = folder / "bpe"
    raw.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(raw))
    # transformers 5 ignores vocab_file/merges_file here: pass the vocabulary and merges themselves
    merges = [tuple(line.split()) for line in (raw / "merges.txt").read_text().splitlines()[1:] if line]
    tok = GPT2TokenizerFast(vocab=json.loads((raw / "vocab.json").read_text()), merges=merges,
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=n_layer, n_head=4, n_inner=64,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = folder / "tiny-gpt2"
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)



def random_tokens(rows: int, seq: int, vocab: int = TINY["d_vocab"], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def padded_data(model, *, rows: int = 3, seq: int = 7, batch_size: int = 2, pad_from: dict[int, int] | None = None,
                seed: int = 0, vocab: int = TINY["d_vocab"]) -> tld.TokenBatches:
    """Random tokens in batches, with right padding: row r is padding from position ``pad_from[r]`` on
    (default: the last two positions of row 1), so masks matter for activations and outputs alike."""
    attention = torch.ones(rows, seq, dtype=torch.long)
    for row, start in ({1: seq - 2} if pad_from is None else pad_from).items():
        attention[row, start:] = 0
    return tld.token_batches(model, random_tokens(rows, seq, vocab=vocab, seed=seed), batch_size=batch_size,
                             attention_mask=attention)
