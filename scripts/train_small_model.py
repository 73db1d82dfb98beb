"""Train the small bundled GPT-2 (``tl_degeneracy/bundled/stdlib-gpt2``) on the Python standard library's source.

Everything here is deterministic given ``--seed``, the Python version whose stdlib is read, the
thread count and the library versions (torch, tokenizers, transformers); see ``data/README.md``
for the run that produced the bundled files.

Data
    Text: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path
    (POSIX form). Skipped: any path with a component in ``EXCLUDED_DIRS`` (installed third-party
    packages, the test suites, generated codec tables and the pydoc topic dump) and the
    machine-specific ``_sysconfigdata*`` module. A file is held out for evaluation when
    ``sha256(relative path)`` read as an integer is 0 mod ``HOLDOUT_MODULUS`` (about 5%).

Tokenizer
    Byte-level BPE (GPT-2 pre-tokenisation, no prefix space) trained on the training files only,
    with ``<|endoftext|>`` as the single special token (id 0), used as BOS, EOS, UNK and padding,
    as in GPT-2. Saved as a ``GPT2TokenizerFast`` with ``save_pretrained``.

Token streams
    Each document is preceded by ``<|endoftext|>`` and the stream ends with one, so the token sits
    between every two documents. Streams are stored as 1-D int32 (the vocabulary is tiny, int32
    halves the file size of int64; cast with ``.long()`` before indexing an embedding).

Model
    ``GPT2LMHeadModel`` (4 layers, d_model 128, 4 heads, d_mlp 512, context 256, tied embeddings,
    dropout 0), trained on CPU with AdamW, linear warm-up then cosine decay, on random
    non-overlapping 256-token windows of the training stream.

Held-out loss (the number recorded in ``training_summary.json``)
    The held-out stream is cut into consecutive non-overlapping windows of ``n_positions`` tokens
    (the last, shorter window included); the loss is the mean next-token cross-entropy in nats
    over all predictions inside the windows (no prediction crosses a window boundary).

Usage::

    python scripts/train_small_model.py --out data --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

EOT = "<|endoftext|>"
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",  # third-party packages, differ per machine
        "test",  # CPython's regression-test suite (larger than the library itself)
        "tests",  # package test suites (ctypes, lib2to3, sqlite3, unittest, ...)
        "idle_test",  # idlelib's tests
        "__pycache__",
        "encodings",  # generated codec tables: mostly hex literals
        "pydoc_data",  # one generated module holding the whole language reference as a string
    }
)
HOLDOUT_MODULUS = 20


def list_stdlib_files(root: Path) -> list[str]:
    """Sorted relative (POSIX) paths of the stdlib ``.py`` files kept for the corpus."""
    kept = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if any(part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        kept.append(rel.as_posix())
    return sorted(kept)


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode("utf-8")).hexdigest()
    return int(digest, 16) % HOLDOUT_MODULUS == 0


def read_texts(root: Path, rel_paths: list[str]) -> tuple[list[str], list[str]]:
    """Read files as UTF-8; files that do not decode or are empty are dropped (returned names)."""
    names, texts = [], []
    for rel in rel_paths:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            print(f"skipping non-UTF-8 file {rel}", file=sys.stderr)
            continue
        if text.strip():
            names.append(rel)
            texts.append(text)
    return names, texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        add_prefix_space=False,
        model_max_length=256,
    )
    return hf_tok


def encode_stream(hf_tok, texts: list[str]) -> torch.Tensor:
    eot_id = hf_tok.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    # The raw tokenizers backend: no special tokens added, no model_max_length warning.
    for enc in hf_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(eot_id)
        ids.extend(enc.ids)
    ids.append(eot_id)
    return torch.tensor(ids, dtype=torch.int32)


def save_tokens(path: Path, tokens: torch.Tensor, info: dict) -> None:
    """Write ``{"tokens": 1-D int32}``; ``info`` goes into the header as one sorted JSON string.

    One metadata key keeps the file byte-for-byte reproducible (safetensors does not fix the order
    of several metadata keys).
    """
    from safetensors.torch import save_file

    info = {"format": "1-D int32 token ids; <|endoftext|> before every document and at the end", **info}
    save_file(
        {"tokens": tokens.to(torch.int32).contiguous()},
        str(path),
        metadata={"info": json.dumps(info, sort_keys=True)},
    )


def windows(stream: torch.Tensor, n_ctx: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows; the last may be shorter (dropped if < 2 tokens)."""
    out = [stream[i : i + n_ctx] for i in range(0, stream.numel(), n_ctx)]
    return [w for w in out if w.numel() >= 2]


@torch.no_grad()
def eval_loss(model, wins: list[torch.Tensor], batch_size: int = 32) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over the given windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    full = [w for w in wins if w.numel() == wins[0].numel()]
    rest = [w for w in wins if w.numel() != wins[0].numel()]
    groups = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [w[None] for w in rest]
    for x in groups:
        x = x.long()
        logits = model(x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def unigram_cross_entropy(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> tuple[float, float]:
    """(entropy of the training unigram distribution, held-out cross-entropy under it, add-one)."""
    counts = torch.bincount(train.long(), minlength=vocab).double()
    p = counts / counts.sum()
    nz = p > 0
    entropy = float(-(p[nz] * p[nz].log()).sum())
    q = (counts + 1) / (counts.sum() + vocab)
    xent = float(-q.log()[heldout.long()].mean())
    return entropy, xent


def lr_at(step: int, total: int, peak: float, warmup: int, floor_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def plot_curve(log: dict, path: Path, unigram_xent: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(log["train_steps"], log["train_loss"], lw=1, label="train (mean over logging interval)")
    ax.plot(log["eval_steps"], log["eval_loss"], "o-", ms=3, label="held-out (eval subset)")
    ax.axhline(unigram_xent, color="gray", ls="--", lw=1, label="unigram cross-entropy (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_ylim(0, max(unigram_xent * 1.3, 1.0))
    ax.set_title("stdlib-gpt2 training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tl_degeneracy" / "bundled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16, help="windows of n_positions tokens per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows used during training")
    ap.add_argument("--train-sample-tokens", type=int, default=16384)
    ap.add_argument(
        "--summary-windows",
        type=int,
        default=32,
        help="also record the loss on the first K held-out windows (for fast tests)",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="optional: print a warning if training exceeds this many seconds",
    )
    args = ap.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    root = Path(sysconfig.get_paths()["stdlib"])
    rel_paths = list_stdlib_files(root)
    train_names, train_texts = read_texts(root, [p for p in rel_paths if not is_heldout(p)])
    held_names, held_texts = read_texts(root, [p for p in rel_paths if is_heldout(p)])
    print(
        f"stdlib {root}: {len(train_names)} train files, {len(held_names)} held-out files, "
        f"{sum(map(len, train_texts)) / 1e6:.2f}M / {sum(map(len, held_texts)) / 1e6:.2f}M characters"
    )

    t0 = time.time()
    hf_tok = train_tokenizer(train_texts, args.vocab_size)
    vocab = len(hf_tok)
    eot_id = hf_tok.convert_tokens_to_ids(EOT)
    train_stream = encode_stream(hf_tok, train_texts)
    held_stream = encode_stream(hf_tok, held_texts)
    print(
        f"tokenizer: vocab {vocab}, eot id {eot_id}; {train_stream.numel()} train tokens, "
        f"{held_stream.numel()} held-out tokens ({time.time() - t0:.1f}s)"
    )
    unigram_entropy, unigram_xent = unigram_cross_entropy(train_stream, held_stream, vocab)
    print(f"unigram entropy (train) {unigram_entropy:.4f} nats, held-out unigram cross-entropy {unigram_xent:.4f} nats")

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=256,
        n_ctx=256,  # GPT-2's legacy alias of n_positions; TransformerLens 3.x's config reader needs it
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
    )
    n_ctx = config.n_positions
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")

    # Training windows: non-overlapping, shuffled each epoch with a seeded generator.
    n_train_win = train_stream.numel() // n_ctx
    train_wins = train_stream[: n_train_win * n_ctx].view(n_train_win, n_ctx)
    held_wins = windows(held_stream, n_ctx)
    full_held = [w for w in held_wins if w.numel() == n_ctx]
    pick = torch.linspace(0, len(full_held) - 1, min(args.eval_windows, len(full_held))).round().long()
    eval_wins = [full_held[i] for i in pick.tolist()]

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_train_win, generator=gen)
    cursor = 0
    log = {"train_steps": [], "train_loss": [], "eval_steps": [], "eval_loss": []}
    running, running_n = 0.0, 0
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        if cursor + args.batch_size > n_train_win:
            order = torch.randperm(n_train_win, generator=gen)
            cursor = 0
        x = train_wins[order[cursor : cursor + args.batch_size]].long()
        cursor += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup, 0.1)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        running_n += 1
        if (step + 1) % args.log_every == 0:
            log["train_steps"].append(step + 1)
            log["train_loss"].append(round(running / running_n, 5))
            running, running_n = 0.0, 0
        if (step + 1) % args.eval_every == 0 or step == 0 or step + 1 == args.steps:
            ev = eval_loss(model, eval_wins)
            log["eval_steps"].append(step + 1)
            log["eval_loss"].append(round(ev, 5))
            el = time.time() - t_train
            shown = log["train_loss"][-1] if log["train_loss"] else loss.item()
            print(f"step {step + 1:5d}  train {shown:.4f}  held-out {ev:.4f}  {el:.0f}s", flush=True)
    train_seconds = time.time() - t_train
    if args.time_budget is not None and train_seconds > args.time_budget:
        print(f"warning: training took {train_seconds:.0f}s > budget {args.time_budget:.0f}s")

    model.eval()
    heldout_loss = eval_loss(model, held_wins)
    first_k = held_wins[: args.summary_windows]
    heldout_loss_first_k = eval_loss(model, first_k)
    print(
        f"final held-out loss {heldout_loss:.4f} nats (ppl {math.exp(heldout_loss):.2f}); "
        f"first {len(first_k)} windows {heldout_loss_first_k:.4f}"
    )

    out = args.out
    model_dir = out / "stdlib-gpt2"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    hf_tok.save_pretrained(model_dir)
    common = {"eot_id": eot_id, "vocab_size": vocab, "tokenizer": "stdlib-gpt2"}
    save_tokens(
        out / "stdlib-heldout.safetensors", held_stream, {**common, "split": "heldout", "n_documents": len(held_names)}
    )
    save_tokens(
        out / "stdlib-train-sample.safetensors",
        train_stream[: args.train_sample_tokens],
        {**common, "split": "train-sample (prefix of the training stream)"},
    )
    plot_curve(log, out / "loss_curve.png", unigram_xent)

    import tokenizers
    import transformers

    summary = {
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "heldout_loss_definition": "mean next-token cross-entropy (nats) over consecutive non-overlapping "
        f"{n_ctx}-token windows of tl_degeneracy/bundled/stdlib-heldout.safetensors (last window "
        "shorter), no BOS added",
        "heldout_loss_first_windows": {"n_windows": len(first_k), "loss": heldout_loss_first_k},
        "heldout_tokens": int(held_stream.numel()),
        "train_tokens": int(train_stream.numel()),
        "unigram_entropy_train": unigram_entropy,
        "unigram_cross_entropy_heldout": unigram_xent,
        "vocab_size": vocab,
        "eot_id": eot_id,
        "n_parameters": n_params,
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "tokens_seen": args.steps * args.batch_size * n_ctx,
        "epochs": round(args.steps * args.batch_size / n_train_win, 3),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "threads": args.threads,
        },
        "data": {
            "stdlib": "sysconfig.get_paths()['stdlib']",
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "holdout_rule": f"int(sha256(relative_path), 16) % {HOLDOUT_MODULUS} == 0",
            "n_train_files": len(train_names),
            "n_heldout_files": len(held_names),
            "heldout_files": held_names,
        },
        "loss_curve": log,
    }
    (model_dir / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"saved to {out} in {time.time() - t_start:.0f}s total")


if __name__ == "__main__":
    main()
