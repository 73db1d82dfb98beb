"""Train the bundled grokked modular-addition transformer (``tl_degeneracy/bundled/modadd-113``).

The setup of the Local Interaction Basis paper (arXiv 2405.10928, after Nanda et al. 2023,
"Progress measures for grokking via mechanistic interpretability"):

Task
    Inputs ``a b =`` as three tokens ``[a, b, p]`` (numbers are tokens ``0..p-1``, ``=`` is token ``p``,
    so the input vocabulary has ``p + 1`` tokens); the answer ``(a + b) mod p`` is read at the last
    position, with logits over the ``p`` number tokens only (``d_vocab_out = p``, as in Nanda et al.;
    the model never has to rank ``=`` as an answer). Cross-entropy at the last position only.
Split
    All ``p²`` pairs in the order ``a * p + b``; a permutation drawn from ``torch.Generator`` seeded with
    ``--split-seed`` puts the first ``round(frac_train * p²)`` pairs in the training set.
Model
    One layer, ``d_model`` 128, 4 heads × ``d_head`` 32, ``d_mlp`` 512, ReLU, no LayerNorm, learned
    positional embeddings, TransformerLens conventions (attention scores divided by ``√d_head``).
    Weights are initialised like TransformerLens's legacy ``HookedTransformer`` (every matrix
    ``N(0, (0.8/√d_model)²)``); biases are zero and **frozen at zero**, as in TransformerLens's grokking
    demo (Nanda et al.), so every saved bias is an exact zero (226,048 trained parameters at p = 113).
Training
    Full batch (every training pair each step), AdamW, ``lr`` 1e-3, ``weight_decay`` 1.0 on every trained
    matrix, ``betas`` (0.9, 0.98) and a linear warm-up over the first 10 steps (both from Nanda et al.).
    The cross-entropy is computed in float64 from the float32 logits, as in Nanda et al.'s code: in
    float32 the training loss bottoms out near 1e-7 and then spikes back to ~1e-3 again and again
    ("slingshots"; a first float32 run here had 4.8% test accuracy after 4,900 steps).
    Every ``--check-every`` steps the model is evaluated on all ``p²`` pairs; training stops at the first
    check where the held-out accuracy is at least ``--target-accuracy`` (default 0.999), or at
    ``--max-steps``.

Speed
    The loss only reads the last position, and in a one-layer model the last position's logits depend
    on the other positions only through attention's keys and values, which are functions of (position,
    token) alone. The training forward (:func:`last_position_logits`, on the TransformerLens-format
    weights directly) therefore computes keys and values once per vocabulary entry and the MLP at the
    last position only: about 0.06 s of CPU time per full-batch step at p = 113 here, 2.5× less than
    TransformerLens's own full forward. After training, the saved weights are
    loaded back through ``tl_degeneracy.load_model`` (TransformerLens's own forward) and the logits and
    accuracy are compared with the training forward's; both go into ``training_summary.json``.

Determinism
    Given ``--seed``, ``--split-seed``, ``--threads``, the torch version and the CPU the run is bitwise
    reproducible (``torch.use_deterministic_algorithms(True)``; full batch, so no data order).

Output (``--out``, default the repository's ``tl_degeneracy/bundled/``)
    ``modadd-{p}/model.safetensors``   the weights, TransformerLens ``HookedTransformer`` state-dict
                                       names and shapes (``blocks.0.attn.W_Q`` [n_heads, d_model, d_head]...)
    ``modadd-{p}/config.json``         the ``HookedTransformerConfig`` fields, ``p``, the task's layout and
                                       its split (seed, fraction, SHA-256 of ``is_train``: ``split_digest``)
    ``modadd-{p}/training_summary.json``  seeds, steps, seconds, final losses and accuracies, the
                                       curve at every check, versions, machine, date
    ``modadd-{p}-tokens.safetensors``  ``tokens`` [p², 3] int32, ``labels`` [p²] int32,
                                       ``is_train`` [p²] bool (all pairs, row ``a * p + b``)

Usage::

    python scripts/train_modadd.py                    # the bundled model: p = 113, seed 0
    python scripts/train_modadd.py --p 13 --max-steps 50 --out /tmp/modadd   # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
FORMAT = "hooked_transformer_state_dict"


def model_config(p: int, *, d_model: int = 128, n_heads: int = 4, d_head: int = 32, d_mlp: int = 512) -> dict:
    """The ``HookedTransformerConfig`` fields of the model (also what ``config.json`` holds)."""
    return {
        "n_layers": 1,
        "d_model": d_model,
        "n_heads": n_heads,
        "d_head": d_head,
        "d_mlp": d_mlp,
        "d_vocab": p + 1,
        "d_vocab_out": p,
        "n_ctx": 3,
        "act_fn": "relu",
        "normalization_type": None,
        "attn_only": False,
        "positional_embedding_type": "standard",
        "model_name": f"modadd-{p}",
    }


def all_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [p², 3] (row ``a * p + b`` is ``[a, b, p]``) and labels [p²] ``(a + b) mod p``."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


def train_mask(p: int, *, frac_train: float, split_seed: int) -> torch.Tensor:
    """Bool [p²]: which pairs are in the training set (a seeded permutation's first share)."""
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(split_seed))
    mask = torch.zeros(p * p, dtype=torch.bool)
    mask[perm[: round(frac_train * p * p)]] = True
    return mask


def init_weights(cfg: dict, *, seed: int) -> dict[str, torch.Tensor]:
    """TransformerLens-named weights, legacy ``HookedTransformer`` init: matrices N(0, 0.64/d_model), biases 0."""
    gen = torch.Generator().manual_seed(seed)
    d, h, dh, m = cfg["d_model"], cfg["n_heads"], cfg["d_head"], cfg["d_mlp"]
    std = 0.8 / math.sqrt(d)
    shapes = {
        "embed.W_E": (cfg["d_vocab"], d),
        "pos_embed.W_pos": (cfg["n_ctx"], d),
        "blocks.0.attn.W_Q": (h, d, dh),
        "blocks.0.attn.W_K": (h, d, dh),
        "blocks.0.attn.W_V": (h, d, dh),
        "blocks.0.attn.W_O": (h, dh, d),
        "blocks.0.mlp.W_in": (d, m),
        "blocks.0.mlp.W_out": (m, d),
        "unembed.W_U": (d, cfg["d_vocab_out"]),
    }
    weights = {name: torch.randn(shape, generator=gen) * std for name, shape in shapes.items()}
    biases = {
        "blocks.0.attn.b_Q": (h, dh),
        "blocks.0.attn.b_K": (h, dh),
        "blocks.0.attn.b_V": (h, dh),
        "blocks.0.attn.b_O": (d,),
        "blocks.0.mlp.b_in": (m,),
        "blocks.0.mlp.b_out": (d,),
        "unembed.b_U": (cfg["d_vocab_out"],),
    }
    return {**weights, **{name: torch.zeros(shape) for name, shape in biases.items()}}


def last_position_logits(w: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, d_vocab_out] at the last position of ``tokens`` [B, T] (one layer, no LayerNorm).

    The same function as the TransformerLens forward at that position, with every bias included (they
    are zero here, but the saved model is the function this computes). Before attention a position's
    residual depends only on (position, token), so queries, keys and values are computed once per
    (position, vocabulary entry) and gathered per row; only the attention-weighted sum, the MLP and the
    unembedding run per row, at the last position alone.
    """
    pre = "blocks.0."
    n_heads, d_model, d_head = w[pre + "attn.W_Q"].shape
    n_pos = tokens.shape[1]
    table = w["embed.W_E"][None] + w["pos_embed.W_pos"][:n_pos, None]  # [T, V, d]: token v at position t

    def proj(name: str, inp: torch.Tensor) -> torch.Tensor:  # W_{name}[h] applied to every row: [..., h, e]
        flat = w[pre + f"attn.W_{name}"].permute(1, 0, 2).reshape(d_model, n_heads * d_head)
        out = torch.addmm(w[pre + f"attn.b_{name}"].reshape(-1), inp.reshape(-1, d_model), flat)
        return out.reshape(*inp.shape[:-1], n_heads, d_head)

    positions = torch.arange(n_pos)[None, :]
    q = proj("Q", table[-1])[tokens[:, -1]]  # [B, h, e]
    k = proj("K", table)[positions, tokens]  # [B, T, h, e]
    v = proj("V", table)[positions, tokens]
    # the last query attends to every position (the causal mask excludes nothing for it)
    pattern = torch.softmax((q[:, None] * k).sum(-1) / math.sqrt(d_head), dim=1)  # [B, T, h]
    z = (pattern[..., None] * v).sum(1)  # [B, h, e]
    resid = table[-1][tokens[:, -1]] + torch.addmm(
        w[pre + "attn.b_O"], z.reshape(-1, n_heads * d_head), w[pre + "attn.W_O"].reshape(n_heads * d_head, d_model)
    )
    hidden = torch.relu(torch.addmm(w[pre + "mlp.b_in"], resid, w[pre + "mlp.W_in"]))
    resid = resid + torch.addmm(w[pre + "mlp.b_out"], hidden, w[pre + "mlp.W_out"])
    return torch.addmm(w["unembed.b_U"], resid, w["unembed.W_U"])


@torch.no_grad()
def evaluate(w: dict[str, torch.Tensor], tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) at the answer position."""
    logits = last_position_logits(w, tokens)
    return float(F.cross_entropy(logits.double(), labels)), float((logits.argmax(-1) == labels).float().mean())


def train(
    *,
    p: int = 113,
    frac_train: float = 0.3,
    seed: int = 0,
    split_seed: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    warmup: int = 10,
    target_accuracy: float = 0.999,
    check_every: int = 100,
    max_steps: int = 100_000,
    log: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train from scratch; returns (TransformerLens-named weights, summary dict).

    Stops at the first check (every ``check_every`` steps) whose held-out accuracy is at least
    ``target_accuracy``, else after ``max_steps``; ``summary["reached_target"]`` says which.

    Example::

        w, summary = train(p=13, max_steps=20, check_every=10, log=False)
        summary["steps"], w["blocks.0.attn.W_Q"].shape     # 20, torch.Size([4, 128, 32])
    """
    cfg = model_config(p)
    tokens, labels = all_pairs(p)
    is_train = train_mask(p, frac_train=frac_train, split_seed=split_seed)
    x_tr, y_tr, x_te, y_te = tokens[is_train], labels[is_train], tokens[~is_train], labels[~is_train]

    w = init_weights(cfg, seed=seed)
    trained = {name: t.requires_grad_(True) for name, t in w.items() if ".W_" in name}
    opt = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 1.0) if warmup > 0 else 1.0)

    curve: dict[str, list] = {"step": [], "train_loss": [], "test_loss": [], "train_acc": [], "test_acc": []}
    t0 = time.perf_counter()
    step = 0
    reached = False
    while step < max_steps:
        loss = F.cross_entropy(last_position_logits(w, x_tr).double(), y_tr)  # float64: no slingshots
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % check_every == 0 or step == max_steps:
            tr_loss, tr_acc = evaluate(w, x_tr, y_tr)
            te_loss, te_acc = evaluate(w, x_te, y_te)
            for key, val in zip(curve, (step, tr_loss, te_loss, tr_acc, te_acc), strict=True):
                curve[key].append(val if key == "step" else float(f"{val:.6g}"))
            if log:
                print(
                    f"step {step:6d}  train loss {tr_loss:.3e} acc {tr_acc:.4f}  "
                    f"test loss {te_loss:.3e} acc {te_acc:.4f}  {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
            if te_acc >= target_accuracy:
                reached = True
                break
    seconds = time.perf_counter() - t0
    w = {name: t.detach().contiguous() for name, t in w.items()}
    tr_loss, tr_acc = evaluate(w, x_tr, y_tr)
    te_loss, te_acc = evaluate(w, x_te, y_te)
    summary = {
        "p": p,
        "seed": seed,
        "split_seed": split_seed,
        "frac_train": frac_train,
        "n_train": int(is_train.sum()),
        "n_test": int((~is_train).sum()),
        "steps": step,
        "reached_target": reached,
        "target_accuracy": target_accuracy,
        "train_seconds": round(seconds, 1),
        "train_minutes": round(seconds / 60, 2),
        "seconds_per_step": round(seconds / max(step, 1), 4),
        "final": {"train_loss": tr_loss, "train_accuracy": tr_acc, "test_loss": te_loss, "test_accuracy": te_acc},
        "optimizer": {
            "name": "AdamW",
            "lr": lr,
            "weight_decay": weight_decay,
            "betas": list(betas),
            "warmup_steps": warmup,
            "batch": "full (every training pair each step)",
            "trained": sorted(trained),
            "frozen_at_zero": sorted(n for n in w if n not in trained),
        },
        "check_every": check_every,
        "max_steps": max_steps,
        "n_trained_parameters": sum(t.numel() for t in trained.values()),
        "curve": curve,
    }
    return w, summary


def _library() -> Any:
    """``tl_degeneracy`` of this checkout (not another installed copy)."""
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import tl_degeneracy

    return tl_degeneracy


def save(out: Path, w: dict[str, torch.Tensor], summary: dict, *, split_seed: int, frac_train: float) -> Path:
    """Write the model folder and the token file under ``out``; returns the model folder."""
    from safetensors.torch import save_file

    p = summary["p"]
    folder = out / f"modadd-{p}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sorted(w.items())}, str(folder / "model.safetensors"))
    tokens, labels = all_pairs(p)
    is_train = train_mask(p, frac_train=frac_train, split_seed=split_seed)
    config = {
        **model_config(p),
        "tl_degeneracy_format": FORMAT,
        "task": {
            "name": "modular addition",
            "p": p,
            "input": "[a, b, p] (tokens 0..p-1 are numbers, token p is '=')",
            "answer": "(a + b) mod p, read at the last position (index 2), logits over the p number tokens",
            "tokens_file": f"modadd-{p}-tokens.safetensors",
            "split": {"split_seed": split_seed, "frac_train": frac_train, "n_train": int(is_train.sum()),
                      "is_train_sha256": _library().data.split_digest(is_train)},
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    info = {
        "p": p,
        "rows": "row a * p + b holds [a, b, p]; labels (a + b) mod p; is_train marks the training pairs",
        "split_seed": split_seed,
        "frac_train": frac_train,
        "answer_position": 2,
    }
    save_file(
        {"tokens": tokens.to(torch.int32), "labels": labels.to(torch.int32), "is_train": is_train},
        str(out / f"modadd-{p}-tokens.safetensors"),
        metadata={"info": json.dumps(info, sort_keys=True)},
    )
    (folder / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return folder


def check_through_transformer_lens(folder: Path, w: dict[str, torch.Tensor], p: int) -> dict:
    """Load the saved folder with ``tl_degeneracy.load_model`` and compare with the training forward."""
    tld = _library()
    model = tld.load_model(folder)
    tokens, labels = all_pairs(p)
    with torch.no_grad():
        tl_logits = model(tokens)[:, -1]
        ours = last_position_logits(w, tokens)
    return {
        "transformer_lens": tld.adapter.transformer_lens_version(),
        "model_class": type(model).__name__,
        "max_abs_logit_difference": float((tl_logits - ours).abs().max()),
        "argmax_agreement": float((tl_logits.argmax(-1) == ours.argmax(-1)).float().mean()),
        "accuracy_all_pairs": float((tl_logits.argmax(-1) == labels).float().mean()),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tl_degeneracy" / "bundled")
    ap.add_argument("--p", type=int, default=113)
    ap.add_argument("--frac-train", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0, help="weight initialisation")
    ap.add_argument("--split-seed", type=int, default=0, help="train/test split")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1.0)
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--target-accuracy", type=float, default=0.999)
    ap.add_argument("--check-every", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-tl-check", action="store_true", help="skip loading the result through TransformerLens")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    w, summary = train(
        p=args.p,
        frac_train=args.frac_train,
        seed=args.seed,
        split_seed=args.split_seed,
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=(0.9, args.beta2),
        warmup=args.warmup,
        target_accuracy=args.target_accuracy,
        check_every=args.check_every,
        max_steps=args.max_steps,
    )
    import safetensors

    summary["command"] = "python scripts/train_modadd.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "no_tl_check")
    )
    summary["date"] = started.strftime("%Y-%m-%d")
    summary["machine"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "load_average_1_5_15min": {"start": [round(x, 2) for x in load_before],
                                   "end": [round(x, 2) for x in os.getloadavg()]},
    }
    folder = save(args.out, w, summary, split_seed=args.split_seed, frac_train=args.frac_train)
    if not args.no_tl_check:
        summary["transformer_lens_check"] = check_through_transformer_lens(folder, w, args.p)
        (folder / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    f = summary["final"]
    print(
        f"{'reached' if summary['reached_target'] else 'did NOT reach'} test accuracy "
        f"{args.target_accuracy} after {summary['steps']} steps ({summary['train_minutes']} min): "
        f"train acc {f['train_accuracy']:.4f}, test acc {f['test_accuracy']:.4f}, test loss {f['test_loss']:.3e}; "
        f"saved to {folder}"
    )


if __name__ == "__main__":
    main()
