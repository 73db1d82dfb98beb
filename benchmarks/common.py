"""Shared pieces of the benchmark scripts: GPT-2-shaped random models, the cost model, timing records."""

from __future__ import annotations

import datetime
import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import tl_degeneracy as tld
from tl_degeneracy.adapter import ModelShape


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def gpt2_shaped_model(size: str = "small", *, device: str = "cpu", n_layer: int | None = None):
    """HF ``GPT2LMHeadModel(GPT2Config(...))`` with random weights, loaded through ``tld.load_model``.

    ``size="small"`` is HF ``GPT2Config()`` (compute-identical to GPT-2 small). The folder gets the
    bundled model's tokenizer files so the offline loader accepts it (ids are fed directly, the tokenizer
    is never used). ``n_layer`` overrides the depth (a quick CPU run).
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    shape = ModelShape.gpt2(size)
    cfg = GPT2Config(n_layer=n_layer or shape.n_layers, n_embd=shape.d_model, n_head=shape.n_heads,
                     n_positions=shape.n_ctx, vocab_size=shape.d_vocab)
    folder = Path(tempfile.mkdtemp(prefix=f"gpt2-{size}-"))
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tld.bundled_model_path()).save_pretrained(folder)
    return tld.load_model(folder, device=device)


@dataclass
class CostModel:
    """FLOPs per counted token (ECOSYSTEM §5): forward, Gram accumulation, and per probe a backward + M."""

    forward: float
    grams: float
    per_probe: float

    def total(self, n_probes: int) -> float:
        return self.forward + self.grams + n_probes * self.per_probe


def cost_model(shape: ModelShape, *, seq_len: int, site_dims: list[int], jacobian: bool) -> CostModel:
    """2·(matrix-multiply parameters) + attention + unembedding for the forward; 2·d² per site for a Gram;
    an activation-only backward costs about the forward less the unembedding's weight-gradient half."""
    d, m, L, V = shape.d_model, shape.d_mlp or 0, shape.n_layers, shape.d_vocab
    per_layer = 2 * (4 * d * d + 2 * d * m) + 2 * 2 * seq_len * d  # projections, MLP; QKᵀ and AV
    unembed = 2 * d * V
    forward = L * per_layer + unembed
    grams = sum(2 * k * k for k in site_dims)
    backward = L * per_layer + unembed  # grad w.r.t. activations only: one matmul per forward matmul
    return CostModel(forward, grams, (backward + grams) if jacobian else 0.0)


def record(path: Path, entry: dict) -> None:
    """Append one JSON line of results (kept next to RESULTS.md for the tables)."""
    entry = {"date": datetime.date.today().isoformat(), **entry}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
